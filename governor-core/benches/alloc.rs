//! Cost of the allocator truth: one stats query, one RSS-monitor tick, the monitor's overhead
//! on the reservation hot path at its default interval, the per-engine reconciliation in a
//! tick, engine-arena pinning next to `try_reserve` and DataFusion's `GreedyMemoryPool`, and
//! one switch of the allocator's decay (what the retention policy does at a pressure change).
//!
//! `cargo bench -p governor-core --bench alloc -- --quick`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion_execution::memory_pool::{GreedyMemoryPool, MemoryConsumer, MemoryPool};
use governor_core::alloc::{JemallocStats, SystemMemoryStats, process_resident_bytes};
use governor_core::rss_monitor::RssMonitorConfig;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib, kib};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn governor() -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(gib(64))
        .engine(EngineId::Query, EngineBudget::new(gib(32)))
        .build()
        .expect("valid bench config");
    MemoryGovernor::new(config).expect("governor")
}

/// The mixed workload's three engines, each with its arena made and holding a little.
fn three_engine_governor() -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(gib(64))
        .engine(EngineId::Query, EngineBudget::new(gib(16)))
        .engine(EngineId::Vector, EngineBudget::new(gib(16)))
        .engine(EngineId::Timeseries, EngineBudget::new(gib(16)))
        .build()
        .expect("valid bench config");
    MemoryGovernor::new(config).expect("governor")
}

fn stats_queries(c: &mut Criterion) {
    let mut group = c.benchmark_group("stats_query");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("system_memory_stats", |b| {
        b.iter(|| black_box(SystemMemoryStats::query().unwrap()));
    });
    group.bench_function("jemalloc_only", |b| {
        b.iter(|| black_box(JemallocStats::query().unwrap()));
    });
    group.bench_function("proc_statm_rss", |b| {
        b.iter(|| black_box(process_resident_bytes().unwrap()));
    });
    group.finish();
}

fn monitor(c: &mut Criterion) {
    let mut group = c.benchmark_group("rss_monitor");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    // One tick, as the monitor thread runs it (read RSS, filter, publish, pressure check).
    let gov = governor();
    let handle = gov
        .start_rss_monitor(RssMonitorConfig::default().with_interval(Duration::from_hours(1)))
        .expect("monitor");
    group.bench_function("tick", |b| {
        b.iter(|| black_box(handle.sample_now().unwrap()));
    });
    drop(handle);

    // The hot path with and without the monitor running at its default interval, side by side.
    let gov = governor();
    group.bench_function("try_reserve_drop/monitor_off", |b| {
        b.iter(|| {
            drop(black_box(
                gov.try_reserve(EngineId::Query, kib(64)).unwrap(),
            ));
        });
    });
    let handle = gov
        .start_rss_monitor(RssMonitorConfig::default())
        .expect("monitor");
    group.bench_function("try_reserve_drop/monitor_on_default_interval", |b| {
        b.iter(|| {
            drop(black_box(
                gov.try_reserve(EngineId::Query, kib(64)).unwrap(),
            ));
        });
    });
    // Under `cargo test --benches` each case runs once, too briefly for a tick: report, not assert.
    eprintln!(
        "rss monitor ticks during the measurement: {}",
        handle.stats().ticks
    );
    drop(handle);
    group.finish();
}

/// One tick with and without the per-engine reconciliation (three engine arenas), side by side:
/// the difference is the reconciliation's cost (one epoch advance, three mallctls per arena,
/// the law, the ledger update).
fn reconciliation(c: &mut Criterion) {
    let mut group = c.benchmark_group("reconcile");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let gov = three_engine_governor();
    let mut held = Vec::new();
    for engine in [EngineId::Query, EngineId::Vector, EngineId::Timeseries] {
        let _pinned = gov.enter_engine(engine).expect("engine arena");
        held.push(vec![1u8; kib(256)]);
    }
    for (reconcile, name) in [
        (false, "tick_without_engines"),
        (true, "tick_3_engine_arenas"),
    ] {
        let handle = gov
            .start_rss_monitor(
                RssMonitorConfig::default()
                    .with_interval(Duration::from_hours(1))
                    .with_engine_reconciliation(reconcile),
            )
            .expect("monitor");
        group.bench_function(name, |b| {
            b.iter(|| black_box(handle.sample_now().unwrap()));
        });
        drop(handle);
    }
    drop(held);
    group.finish();
}

/// Arena pinning next to the one-thread admission figures of `benches/reserve.rs` (4 KiB, the
/// same operations), all in one group so the ratios come from one run.
fn pinning(c: &mut Criterion) {
    const BYTES: usize = kib(4);
    let mut group = c.benchmark_group("pinning_1_thread");
    let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(gib(4)));
    let reservation = MemoryConsumer::new("bench").register(&pool);
    group.bench_function("greedy_try_grow_shrink", |b| {
        b.iter(|| {
            reservation.try_grow(black_box(BYTES)).expect("room");
            reservation.shrink(black_box(BYTES));
        });
    });
    let gov = three_engine_governor();
    group.bench_function("try_reserve_drop/unpinned", |b| {
        b.iter(|| {
            drop(black_box(
                gov.try_reserve(EngineId::Query, black_box(BYTES))
                    .expect("room"),
            ));
        });
    });
    {
        // The engine-runtime case: the thread stays on its engine's arena.
        let _pinned = gov.enter_engine(EngineId::Query).expect("engine arena");
        group.bench_function("try_reserve_drop/on_engine_arena", |b| {
            b.iter(|| {
                drop(black_box(
                    gov.try_reserve(EngineId::Query, black_box(BYTES))
                        .expect("room"),
                ));
            });
        });
        // Re-entering the engine the thread is on: a read of `thread.arena`, no switch.
        group.bench_function("enter_same_engine+try_reserve_drop", |b| {
            b.iter(|| {
                let _again = gov.enter_engine(EngineId::Query).expect("engine arena");
                drop(black_box(
                    gov.try_reserve(EngineId::Query, black_box(BYTES))
                        .expect("room"),
                ));
            });
        });
    }
    // A shared thread switching into the engine's arena and back for one reservation: the
    // worst case (two arena switches, two thread-cache flushes).
    group.bench_function("enter_other_engine+try_reserve_drop", |b| {
        b.iter(|| {
            let _pinned = gov.enter_engine(EngineId::Query).expect("engine arena");
            drop(black_box(
                gov.try_reserve(EngineId::Query, black_box(BYTES))
                    .expect("room"),
            ));
        });
    });
    group.finish();
}

/// What the retention policy does when the pressure crosses its threshold: set every arena's
/// decay (to zero, which also returns what is dirty, and back). Each iteration first frees
/// 4 MiB of 64 KiB pieces so that the switch to zero has dirty pages to return, as it would.
fn retention_switch(c: &mut Criterion) {
    use governor_core::alloc::decay::{configured_dirty_decay, set_dirty_decay_everywhere};
    let mut group = c.benchmark_group("retention");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let configured = configured_dirty_decay().expect("decay");
    group.bench_function("free_4mib_then_switch_to_zero_and_back", |b| {
        b.iter(|| {
            let pieces: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
            drop(black_box(pieces));
            black_box(set_dirty_decay_everywhere(Some(Duration::ZERO)).unwrap());
            black_box(set_dirty_decay_everywhere(configured).unwrap());
        });
    });
    group.bench_function("free_4mib_only", |b| {
        b.iter(|| {
            let pieces: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
            drop(black_box(pieces));
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    stats_queries,
    monitor,
    reconciliation,
    pinning,
    retention_switch
);
criterion_main!(benches);
