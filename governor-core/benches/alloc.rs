//! Cost of the allocator truth: one stats query, one RSS-monitor tick, and the monitor's
//! overhead on the reservation hot path at its default interval.
//!
//! `cargo bench -p governor-core --bench alloc -- --quick`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, stats_queries, monitor);
criterion_main!(benches);
