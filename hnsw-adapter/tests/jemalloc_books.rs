//! The byte model against the allocator: with jemalloc as the global allocator, the bytes
//! the Vector engine's books hold must match what jemalloc says the segments allocated.
//!
//! One test in its own binary: `stats.allocated` is process-wide, so nothing else may run
//! beside it.

mod common;

use common::{DIM, governor, params, seg, vectors, vid};
use governor_core::{EngineId, mib};
use hnsw_adapter::HnswCache;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("epoch");
    tikv_jemalloc_ctl::stats::allocated::read().expect("stats.allocated")
}

/// Peak of this thread's net allocations since it started (jemalloc 5.3 `thread.peak`).
fn thread_peak() -> u64 {
    // SAFETY: "thread.peak.read" is a read-only uint64_t mallctl.
    unsafe { tikv_jemalloc_ctl::raw::read::<u64>(b"thread.peak.read\0") }.expect("thread.peak")
}

/// Slack for what the allocator counts but the model does not own: thread caches holding
/// freed scratch objects, rayon's and tokio's bookkeeping.
const SLACK: usize = 512 * 1024;

#[test]
fn books_match_jemalloc() {
    let per = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(mib(512), mib(1024));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .params(params(per))
        .build()
        .unwrap();
    let data = vectors(per, 7);
    let others: Vec<Vec<Vec<f32>>> = (1..5).map(|s| vectors(1_500, 100 + s)).collect();

    // Warm-up: rayon's pool (used by hnsw_rs's drop), thread-locals, first-use statics.
    {
        let warm = common::seg(99);
        cache.create_segment(&warm).unwrap();
        for (r, v) in data.iter().take(300).enumerate() {
            cache.insert(&warm, r, v).unwrap();
        }
        cache.persist(&warm).unwrap();
        cache.evict(&warm).unwrap();
        cache.search(&warm, &data[0], 10, 32).unwrap();
        cache.evict(&warm).unwrap();
    }
    assert_eq!(gov.reserved(EngineId::Vector), 0);

    // 1. Built by inserts: the books hold an upper bound, not a wild one.
    let a0 = allocated();
    let id = seg(0);
    cache.create_segment(&id).unwrap();
    for (r, v) in data.iter().enumerate() {
        cache.insert(&id, vid(0, r), v).unwrap();
    }
    let built = allocated().saturating_sub(a0);
    let books = gov.reserved(EngineId::Vector);
    println!(
        "built {per} x {DIM}: jemalloc {built} B, books {books} B ({:.2}x)",
        books as f64 / built as f64
    );
    assert!(
        built <= books + SLACK,
        "allocated {built} > books {books}: the insert bound is not a bound"
    );
    // Measured 1.74x on this data: lists are charged at their worst capacity (2 x threshold).
    assert!(
        books <= built * 2,
        "books {books} over 2x allocated {built}"
    );

    // 2. Evicted: the memory and the books both go back.
    cache.persist(&id).unwrap();
    let freed_books = cache.evict(&id).unwrap();
    assert_eq!(freed_books, books);
    assert_eq!(gov.reserved(EngineId::Vector), 0);
    let after_evict = allocated();
    println!(
        "after evict: {} B above start",
        after_evict as i64 - a0 as i64
    );
    assert!(
        after_evict <= a0 + SLACK,
        "eviction left {} B allocated",
        after_evict - a0
    );

    // 3. Reloaded: exact model of hnswio's layout; the load's peak stays within its reservation.
    let a1 = allocated();
    let cache_ref = &cache;
    let id_ref = &id;
    let q = data[1].clone();
    let peak = std::thread::scope(|s| {
        s.spawn(move || {
            cache_ref.search(id_ref, &q, 10, 32).unwrap();
            thread_peak()
        })
        .join()
        .unwrap()
    });
    let loaded = allocated().saturating_sub(a1);
    let books = gov.reserved(EngineId::Vector);
    let manifest_load = {
        // The reservation a load takes: resident + the loader's transient share.
        let m =
            hnsw_adapter::SegmentManifest::read(&dir.path().join("docs.0.manifest.json")).unwrap();
        assert_eq!(m.resident_bytes(), books);
        m.load_bytes()
    };
    println!(
        "reloaded: jemalloc {loaded} B, books {books} B ({:.3}x); load peak {peak} B, reserved for load {manifest_load} B",
        books as f64 / loaded as f64
    );
    assert!(
        loaded.abs_diff(books) <= books / 10 + SLACK,
        "reloaded graph {loaded} B vs books {books} B"
    );
    assert!(
        peak as usize <= manifest_load + SLACK,
        "load peaked at {peak} B over its {manifest_load} B reservation"
    );

    // 4. Several segments: the whole cache against the Vector engine's books.
    for (s, vs) in others.iter().enumerate() {
        let id = seg(s + 1);
        cache.create_segment(&id).unwrap();
        for (r, v) in vs.iter().enumerate() {
            cache.insert(&id, vid(s + 1, r), v).unwrap();
        }
        cache.persist(&id).unwrap();
        cache.evict(&id).unwrap();
    }
    let a2 = allocated();
    let before = gov.reserved(EngineId::Vector);
    for s in 1..5 {
        cache.search(&seg(s), &data[2], 10, 32).unwrap();
    }
    let grew = allocated().saturating_sub(a2);
    let booked = gov.reserved(EngineId::Vector) - before;
    println!("4 more segments: jemalloc {grew} B, books {booked} B");
    assert!(
        grew.abs_diff(booked) <= booked / 10 + SLACK,
        "cache {grew} B vs books {booked} B"
    );
    assert_eq!(cache.stats().resident_bytes, gov.reserved(EngineId::Vector));
    drop(cache);
    assert_eq!(gov.reserved(EngineId::Vector), 0);

    // 5. A stream of searches under a 40 % budget: after every query, what jemalloc holds
    //    for the cache matches the books, while loads and evictions churn underneath.
    let manifests: Vec<hnsw_adapter::SegmentManifest> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
        .map(|p| hnsw_adapter::SegmentManifest::read(&p).unwrap())
        .collect();
    let total: usize = manifests
        .iter()
        .map(hnsw_adapter::SegmentManifest::resident_bytes)
        .sum();
    let biggest_load = manifests
        .iter()
        .map(hnsw_adapter::SegmentManifest::load_bytes)
        .max()
        .unwrap();
    // 40 % of the index, or just enough for the 3000-point segment's load peak.
    let limit = (total * 40 / 100).max(biggest_load + biggest_load / 4);
    let gov = governor(limit, mib(1024));
    let a3 = allocated();
    let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
    let mut worst = 0f64;
    for q in vectors(12, 31) {
        cache.search_all(&q, 10, 32).unwrap();
        let held = allocated().saturating_sub(a3);
        let books = gov.reserved(EngineId::Vector);
        assert!(books <= limit);
        assert!(
            held.abs_diff(books) <= books / 10 + SLACK,
            "after a query: jemalloc {held} B, books {books} B"
        );
        worst = worst.max(held.abs_diff(books) as f64 / books as f64);
    }
    println!(
        "40% budget stream: {} loads, {} evictions, worst |jemalloc - books| / books = {worst:.3}",
        cache.stats().loads,
        cache.stats().evictions
    );
    assert!(cache.stats().evictions > 0);
}
