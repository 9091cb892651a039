//! jemalloc arenas: allocations land in the pinned arena, per-arena resident grows, and a
//! collection's arena is charged to its engine in governor snapshots.

use std::hint::black_box;
use std::sync::Arc;

use governor_core::alloc::{
    ArenaStats, CollectionArenaRegistry, CollectionKey, SystemMemoryStats, create_arena,
    current_thread_arena, jemalloc_is_global_allocator, pin_thread_arena_scoped,
};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `count` buffers of `size` bytes, every page written so it is resident.
fn touched_buffers(count: usize, size: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| vec![(i % 251) as u8 + 1; size])
        .collect()
}

#[test]
fn jemalloc_serves_this_test_binary() {
    assert!(jemalloc_is_global_allocator());
    let before = SystemMemoryStats::query().unwrap();
    let held = black_box(touched_buffers(24, mib(4)));
    let after = SystemMemoryStats::query().unwrap();
    // Other tests of this binary allocate and free concurrently (about 25 MiB in all), so
    // only a margin below the 96 MiB held here is certain.
    let grown = after.allocated().unwrap().bytes as i64 - before.allocated().unwrap().bytes as i64;
    assert!(
        grown >= mib(64) as i64,
        "jemalloc allocated grew by {grown}"
    );
    assert!(after.resident().unwrap().bytes >= mib(96), "{after}");
    drop(held);
}

#[test]
fn large_allocations_land_in_the_pinned_arena_and_its_resident_grows() {
    let arena = create_arena().unwrap();
    let before = ArenaStats::query(arena).unwrap();
    let buffers = {
        let _pinned = pin_thread_arena_scoped(arena).unwrap();
        assert_eq!(current_thread_arena().unwrap(), arena);
        // 64 KiB is above the thread cache's largest class: straight from the arena.
        black_box(touched_buffers(256, 64 * 1024))
    };
    let during = ArenaStats::query(arena).unwrap();
    let want = 256 * 64 * 1024;
    assert!(
        during.large_allocated >= before.large_allocated + want,
        "{before:?} -> {during:?}"
    );
    assert!(
        during.resident >= before.resident + want,
        "{before:?} -> {during:?}"
    );
    assert!(during.active >= want);
    // Freed from an unpinned thread, the memory still goes back to the arena it came from.
    drop(buffers);
    let after = ArenaStats::query(arena).unwrap();
    assert!(
        after.large_allocated + want <= during.large_allocated,
        "{during:?} -> {after:?}"
    );
}

#[test]
fn small_allocations_follow_the_pin_despite_the_thread_cache() {
    let arena = create_arena().unwrap();
    // Warm this thread's cache with small objects of its original arena first.
    drop(black_box((0..10_000).map(Box::new).collect::<Vec<_>>()));
    let before = ArenaStats::query(arena).unwrap();
    let objects = {
        let _pinned = pin_thread_arena_scoped(arena).unwrap();
        black_box((0..20_000u64).map(|i| Box::new([i; 6])).collect::<Vec<_>>())
    };
    let after = ArenaStats::query(arena).unwrap();
    // 20 000 × 48-byte objects; the outer Vec is large. Allow for a few cached leftovers.
    let want = 20_000 * 48 * 9 / 10;
    assert!(
        after.small_allocated >= before.small_allocated + want,
        "{before:?} -> {after:?}"
    );
    drop(objects);
}

#[test]
fn collection_arenas_are_charged_to_their_engine_in_snapshots() {
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(512))
            .engine(EngineId::Vector, EngineBudget::new(mib(256)))
            .engine(EngineId::Sparse, EngineBudget::new(mib(256)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let registry = Arc::new(CollectionArenaRegistry::new());
    let _stats = governor.register_consumer_stats(registry.clone());
    let products = CollectionKey::new("acme", "products");
    let docs = CollectionKey::new("acme", "docs");

    let vectors = {
        let _in = registry.enter(&products, EngineId::Vector).unwrap();
        black_box(touched_buffers(96, 64 * 1024)) // 6 MiB
    };
    let postings = {
        let _in = registry.enter(&docs, EngineId::Sparse).unwrap();
        black_box(touched_buffers(32, 64 * 1024)) // 2 MiB
    };
    let stats = registry.stats().unwrap();
    let of = |key: &CollectionKey| stats.iter().find(|s| &s.key == key).unwrap().clone();
    assert!(
        of(&products).stats.resident >= mib(6),
        "{:?}",
        of(&products)
    );
    assert!(of(&docs).stats.resident >= mib(2), "{:?}", of(&docs));
    assert!(of(&products).stats.resident > of(&docs).stats.resident);

    let snapshot = governor.snapshot();
    let consumer = |name: &str| snapshot.consumers.iter().find(|c| c.name == name).cloned();
    let vector = consumer("arena:acme/products").expect("products arena in the snapshot");
    assert_eq!(vector.engine, EngineId::Vector);
    assert!(vector.reserved >= mib(6) && vector.peak >= vector.reserved);
    assert_eq!(
        consumer("arena:acme/docs").unwrap().engine,
        EngineId::Sparse
    );
    let by_engine = registry.resident_by_engine().unwrap();
    assert_eq!(
        by_engine.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        vec![EngineId::Vector, EngineId::Sparse]
    );

    // Retiring a dropped collection gives its pages back to the OS.
    drop(vectors);
    let arena = registry.retire(&products).unwrap().unwrap();
    let purged = ArenaStats::query(arena).unwrap();
    assert!(purged.dirty == 0 && purged.resident < mib(6), "{purged:?}");
    drop(postings);
}
