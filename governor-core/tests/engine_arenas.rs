//! One jemalloc arena per engine, reconciled with the engine's books by the RSS monitor.
//!
//! The engine arenas belong to the process, so the tests of this binary take turns (`SERIAL`)
//! and each gives back what it allocated. Monitor ticks are taken by hand (`sample_now`), so
//! "within a few ticks" is a count, not a clock.

use std::sync::Arc;
use std::time::Duration;

use governor_core::alloc::{ArenaStats, current_thread_arena, jemalloc_is_global_allocator};
use governor_core::rss_monitor::{RssMonitorConfig, RssMonitorHandle};
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, Reconciliation, gib, mib,
};
use parking_lot::Mutex;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

static SERIAL: Mutex<()> = Mutex::new(());

fn governor() -> Arc<MemoryGovernor> {
    // A ceiling far above what the test process holds, so that every engine's room is its
    // room under its limit and nothing else.
    let config = GovernorConfig::builder()
        .global_ceiling(gib(8))
        .engine(EngineId::Query, EngineBudget::new(mib(512)))
        .engine(EngineId::Vector, EngineBudget::new(mib(512)))
        .engine(EngineId::Timeseries, EngineBudget::new(mib(512)))
        .build()
        .expect("valid config");
    MemoryGovernor::new(config).expect("governor")
}

/// A monitor that ticks only when asked.
fn manual_monitor(governor: &Arc<MemoryGovernor>, alarm: f64) -> RssMonitorHandle {
    governor
        .start_rss_monitor(
            RssMonitorConfig::default()
                .with_interval(Duration::from_hours(24))
                .with_drift_alarm(alarm),
        )
        .expect("monitor")
}

fn engine_runtime(governor: &MemoryGovernor, engine: EngineId) -> tokio::runtime::Runtime {
    governor
        .engine_runtime_builder(engine)
        .expect("engine runtime builder")
        .worker_threads(1)
        .build()
        .expect("runtime")
}

/// Allocates `bytes` (touched) on a worker of `runtime`, outside any reservation.
fn allocate_on(runtime: &tokio::runtime::Runtime, bytes: usize) -> Vec<u8> {
    runtime
        .block_on(runtime.spawn(async move { vec![1u8; bytes] }))
        .expect("allocating task")
}

/// Ticks until `done` holds, at most `max` ticks; returns the ticks taken.
fn ticks_until(
    monitor: &RssMonitorHandle,
    max: usize,
    mut done: impl FnMut() -> bool,
) -> Option<usize> {
    for tick in 1..=max {
        monitor.sample_now().expect("tick");
        if done() {
            return Some(tick);
        }
    }
    None
}

fn within(actual: usize, expected: usize, tolerance: usize) -> bool {
    actual.abs_diff(expected) <= tolerance
}

#[test]
fn jemalloc_serves_this_binary() {
    assert!(jemalloc_is_global_allocator());
}

/// The test: 64 MiB outside the books on the query runtime cuts the query engine's
/// room by about that much within a few ticks and leaves the vector engine's room alone; when
/// the memory is freed (on another thread) the room comes back.
#[test]
fn an_engine_pays_for_its_own_drift_and_only_it() {
    let _serial = SERIAL.lock();
    let governor = governor();
    let query_runtime = engine_runtime(&governor, EngineId::Query);
    let monitor = manual_monitor(&governor, 0.1);
    for _ in 0..3 {
        monitor.sample_now().expect("settling tick");
    }
    assert_eq!(governor.reconciliation(), Reconciliation::Active);
    let query_room = governor.available(EngineId::Query);
    let vector_room = governor.available(EngineId::Vector);
    let charged_before = governor.engine_untracked(EngineId::Query);

    let outside_the_books = allocate_on(&query_runtime, mib(64));
    let ticks = ticks_until(&monitor, 5, || {
        governor.engine_untracked(EngineId::Query) >= charged_before + mib(60)
    })
    .unwrap_or_else(|| {
        panic!(
            "query charge still {} after 5 ticks: {:?}",
            governor.engine_untracked(EngineId::Query),
            governor.engine_allocation(EngineId::Query)
        )
    });
    assert!(ticks <= 3, "took {ticks} ticks");
    let cut = query_room - governor.available(EngineId::Query);
    // About 64 MiB: the dead band (5.1 MiB for a 512 MiB limit) and the runtime's own few
    // allocations are the slack.
    assert!(within(cut, mib(64), mib(6)), "query room cut by {cut}");
    assert_eq!(governor.available(EngineId::Vector), vector_room);
    assert_eq!(governor.engine_untracked(EngineId::Vector), 0);

    let figures = governor
        .engine_allocation(EngineId::Query)
        .expect("query reconciled");
    assert!(
        figures.drift >= i64::try_from(mib(60)).unwrap(),
        "{figures:?}"
    );
    assert!(figures.allocated >= mib(64) && figures.resident >= mib(64));
    assert_eq!(figures.reserved, 0);
    assert!(figures.alarms >= 1, "64 MiB is past 10 % of 512 MiB");
    assert!(monitor.stats().drift_alarms >= 1);
    let snapshot = governor.snapshot();
    let query = snapshot.engine(EngineId::Query).expect("query");
    assert_eq!(query.untracked, governor.engine_untracked(EngineId::Query));
    assert_eq!(
        query.allocation,
        governor.engine_allocation(EngineId::Query)
    );
    let text = snapshot.to_prometheus();
    assert!(
        text.contains("memgov_engine_reconciliation{state=\"active\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("memgov_engine_drift_bytes{engine=\"query\"}"),
        "{text}"
    );

    // A reservation of the query engine now meets a smaller room; the vector engine's not.
    assert!(
        governor
            .try_reserve(EngineId::Query, query_room - mib(32))
            .is_err(),
        "the drift must take room from the query engine"
    );
    drop(
        governor
            .try_reserve(EngineId::Vector, vector_room)
            .expect("vector room untouched"),
    );

    // Freed on this (unpinned) thread: still credited to the query arena, room returns.
    drop(outside_the_books);
    ticks_until(&monitor, 60, || {
        governor.available(EngineId::Query) + mib(6) >= query_room
    })
    .expect("the room comes back as the drift falls");
    drop(monitor);
    query_runtime.shutdown_timeout(Duration::from_secs(30));
}

/// jemalloc returns a block to the arena it came from whichever thread frees it.
#[test]
fn frees_on_another_thread_are_credited_to_the_allocating_arena() {
    let _serial = SERIAL.lock();
    let governor = governor();
    let vector_runtime = engine_runtime(&governor, EngineId::Vector);
    let vector_arena = governor.engine_arena(EngineId::Vector).expect("arena");
    let timeseries_arena = {
        let _made = governor.enter_engine(EngineId::Timeseries).expect("pin");
        governor.engine_arena(EngineId::Timeseries).expect("arena")
    };
    let allocated = |arena| ArenaStats::query(arena).expect("arena stats").allocated();
    let (vector_before, timeseries_before) = (allocated(vector_arena), allocated(timeseries_arena));

    let block = allocate_on(&vector_runtime, mib(32));
    let vector_holding = allocated(vector_arena);
    assert!(
        vector_holding >= vector_before + mib(32),
        "{vector_holding} vs {vector_before}"
    );

    // Dropped on a plain thread that works for the timeseries engine.
    let governor_for_thread = Arc::clone(&governor);
    std::thread::spawn(move || {
        let _timeseries = governor_for_thread
            .enter_engine(EngineId::Timeseries)
            .expect("pin");
        drop(block);
    })
    .join()
    .expect("freeing thread");

    let vector_after = allocated(vector_arena);
    assert!(
        within(vector_after, vector_before, mib(1)),
        "vector arena {vector_before} → {vector_holding} → {vector_after}"
    );
    let timeseries_after = allocated(timeseries_arena);
    assert!(
        within(timeseries_after, timeseries_before, mib(1)),
        "the freeing thread's arena must not be credited: {timeseries_before} → {timeseries_after}"
    );
    vector_runtime.shutdown_timeout(Duration::from_secs(30));
}

#[test]
fn nested_enter_engine_restores_in_any_order() {
    let _serial = SERIAL.lock();
    let governor = governor();
    let start = current_thread_arena().expect("arena");
    let query = {
        let guard = governor.enter_engine(EngineId::Query).expect("pin");
        guard.arena().expect("jemalloc serves this binary")
    };
    let vector = {
        let guard = governor.enter_engine(EngineId::Vector).expect("pin");
        guard.arena().expect("jemalloc serves this binary")
    };
    assert_eq!(current_thread_arena().unwrap(), start);
    assert_ne!(query, vector);

    // In order, with a re-entry of the same engine in the middle.
    {
        let outer = governor.enter_engine(EngineId::Query).expect("pin");
        assert!(outer.is_pinned());
        assert_eq!(current_thread_arena().unwrap(), query);
        {
            let _inner = governor.enter_engine(EngineId::Vector).expect("pin");
            assert_eq!(current_thread_arena().unwrap(), vector);
            {
                let _again = governor.enter_engine(EngineId::Vector).expect("pin");
                assert_eq!(current_thread_arena().unwrap(), vector);
            }
            assert_eq!(current_thread_arena().unwrap(), vector);
            // What the inner scope allocates lands in the vector arena.
            let before = ArenaStats::query(vector).unwrap().allocated();
            let block = vec![1u8; mib(8)];
            assert!(ArenaStats::query(vector).unwrap().allocated() >= before + mib(8));
            drop(block);
        }
        assert_eq!(current_thread_arena().unwrap(), query);
    }
    assert_eq!(current_thread_arena().unwrap(), start);

    // Out of order: the outer guard goes first; the thread stays on the newest live pin and
    // still ends where it started.
    let outer = governor.enter_engine(EngineId::Query).expect("pin");
    let inner = governor.enter_engine(EngineId::Vector).expect("pin");
    drop(outer);
    assert_eq!(current_thread_arena().unwrap(), vector);
    drop(inner);
    assert_eq!(current_thread_arena().unwrap(), start);

    // On an engine runtime's thread: entering another engine and leaving returns to the
    // runtime's own arena.
    let runtime = engine_runtime(&governor, EngineId::Query);
    let governor_for_task = Arc::clone(&governor);
    let seen = runtime
        .block_on(runtime.spawn(async move {
            let own = current_thread_arena().unwrap();
            let inside = {
                let _vector = governor_for_task.enter_engine(EngineId::Vector).unwrap();
                current_thread_arena().unwrap()
            };
            (own, inside, current_thread_arena().unwrap())
        }))
        .expect("task");
    assert_eq!(seen, (query, vector, query));
    // Blocking threads of an engine runtime are pinned too.
    let blocking = runtime
        .block_on(runtime.spawn_blocking(|| current_thread_arena().unwrap()))
        .expect("blocking task");
    assert_eq!(blocking, query);
    runtime.shutdown_timeout(Duration::from_secs(30));
}

/// An engine that reserves more than it allocates shows negative drift and is never charged.
#[test]
fn over_reservation_is_negative_drift_and_not_charged() {
    let _serial = SERIAL.lock();
    let governor = governor();
    let runtime = engine_runtime(&governor, EngineId::Timeseries);
    let monitor = manual_monitor(&governor, 0.25);
    let token = governor
        .try_reserve(EngineId::Timeseries, mib(200))
        .expect("room");
    let block = allocate_on(&runtime, mib(100));
    monitor.sample_now().expect("tick");
    let figures = governor
        .engine_allocation(EngineId::Timeseries)
        .expect("reconciled");
    assert!(
        figures.drift <= -i64::try_from(mib(90)).unwrap(),
        "{figures:?}"
    );
    assert!(figures.low_drift <= figures.drift);
    assert_eq!(governor.engine_untracked(EngineId::Timeseries), 0);
    assert_eq!(figures.charged, 0);
    drop((block, token));
    drop(monitor);
    runtime.shutdown_timeout(Duration::from_secs(30));
}
