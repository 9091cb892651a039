//! Admission cost: the governor against a bare atomic and DataFusion's `GreedyMemoryPool`,
//! measured side by side in one run, on one thread and on many.
//!
//! `cargo bench -p governor-core --bench reserve` (the figures in BENCHMARKS.md);
//! `cargo test -p governor-core --benches` runs each case once as a smoke test.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion_execution::memory_pool::{GreedyMemoryPool, MemoryConsumer, MemoryPool};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib, kib};

const BYTES: usize = kib(4);

/// The governor the cases run on; `node_ceilings` adds a NUMA sub-ceiling on nodes 0 and 1
/// (enough here: threads count against the node of their CPU), to price the per-node counter.
fn governor(threads: usize, node_ceilings: bool) -> Arc<MemoryGovernor> {
    let mut config = GovernorConfig::builder()
        .global_ceiling(gib(8))
        .engine(EngineId::Query, EngineBudget::new(gib(4)))
        .engine(EngineId::Vector, EngineBudget::new(gib(4)))
        .reservation_shards(threads.next_power_of_two());
    if node_ceilings {
        config = config
            .numa_node_ceiling(0, gib(4))
            .numa_node_ceiling(1, gib(4));
    }
    MemoryGovernor::new(config.build().expect("valid config")).expect("governor")
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve_1_thread");
    let atomic = AtomicUsize::new(0);
    group.bench_function("atomic_fetch_add_sub", |b| {
        b.iter(|| {
            atomic.fetch_add(black_box(BYTES), Ordering::AcqRel);
            atomic.fetch_sub(black_box(BYTES), Ordering::AcqRel);
        });
    });
    let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(gib(4)));
    let reservation = MemoryConsumer::new("bench").register(&pool);
    group.bench_function("greedy_try_grow_shrink", |b| {
        b.iter(|| {
            reservation.try_grow(black_box(BYTES)).expect("room");
            reservation.shrink(black_box(BYTES));
        });
    });
    let g = governor(1, false);
    let mut token = g.try_reserve(EngineId::Query, 0).expect("empty token");
    group.bench_function("governor_token_grow_shrink", |b| {
        b.iter(|| {
            token.try_grow(black_box(BYTES)).expect("room");
            token.shrink(black_box(BYTES)).expect("held");
        });
    });
    group.bench_function("governor_try_reserve_drop", |b| {
        b.iter(|| {
            drop(black_box(
                g.try_reserve(EngineId::Query, black_box(BYTES))
                    .expect("room"),
            ));
        });
    });
    let numa = governor(1, true);
    group.bench_function("governor_try_reserve_drop_numa_ceilings", |b| {
        b.iter(|| {
            drop(black_box(
                numa.try_reserve(EngineId::Query, black_box(BYTES))
                    .expect("room"),
            ));
        });
    });
    group.finish();
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns the wall time, so the
/// reported figure is wall time per operation per thread (lower is better, flat is scaling).
fn contended(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..iters {
                    op();
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let start = Instant::now();
        barrier.wait();
        start.elapsed()
    })
}

fn many_threads(c: &mut Criterion) {
    let max = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let mut counts: Vec<usize> = [2, 4, 8, 16]
        .into_iter()
        .filter(|&n| n <= max.max(2))
        .collect();
    if !counts.contains(&max) && max <= 64 {
        counts.push(max);
    }
    for threads in counts {
        let mut group = c.benchmark_group(format!("reserve_{threads}_threads"));
        group.sample_size(20);
        let atomic = AtomicUsize::new(0);
        group.bench_function("atomic_fetch_add_sub", |b| {
            b.iter_custom(|iters| {
                contended(threads, iters, &|| {
                    atomic.fetch_add(black_box(BYTES), Ordering::AcqRel);
                    atomic.fetch_sub(black_box(BYTES), Ordering::AcqRel);
                })
            });
        });
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(gib(4)));
        group.bench_function("greedy_try_grow_shrink", |b| {
            b.iter_custom(|iters| {
                contended(threads, iters, &|| {
                    // Each thread's operator has its own reservation, as in DataFusion.
                    thread_local! { static R: std::cell::RefCell<Option<datafusion_execution::memory_pool::MemoryReservation>> = const { std::cell::RefCell::new(None) }; }
                    R.with(|r| {
                        let mut r = r.borrow_mut();
                        let res = r.get_or_insert_with(|| MemoryConsumer::new("bench").register(&pool));
                        res.try_grow(black_box(BYTES)).expect("room");
                        res.shrink(black_box(BYTES));
                    });
                })
            });
        });
        let g = governor(threads, false);
        group.bench_function("governor_try_reserve_drop", |b| {
            b.iter_custom(|iters| {
                contended(threads, iters, &|| {
                    drop(black_box(
                        g.try_reserve(EngineId::Query, black_box(BYTES))
                            .expect("room"),
                    ));
                })
            });
        });
        let numa = governor(threads, true);
        group.bench_function("governor_try_reserve_drop_numa_ceilings", |b| {
            b.iter_custom(|iters| {
                contended(threads, iters, &|| {
                    drop(black_box(
                        numa.try_reserve(EngineId::Query, black_box(BYTES))
                            .expect("room"),
                    ));
                })
            });
        });
        group.bench_function("governor_token_grow_shrink", |b| {
            b.iter_custom(|iters| {
                contended(threads, iters, &|| {
                    thread_local! { static T: std::cell::RefCell<Vec<governor_core::ReservationToken>> = const { std::cell::RefCell::new(Vec::new()) }; }
                    T.with(|t| {
                        let mut t = t.borrow_mut();
                        if t.is_empty() {
                            t.push(g.try_reserve(EngineId::Query, 0).expect("empty token"));
                        }
                        let token = &mut t[0];
                        token.try_grow(black_box(BYTES)).expect("room");
                        token.shrink(black_box(BYTES)).expect("held");
                    });
                })
            });
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = single_thread, many_threads
}
criterion_main!(benches);
