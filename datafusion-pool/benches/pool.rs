//! `try_grow` + `shrink` of one reservation: the governed pool against DataFusion's
//! `GreedyMemoryPool` and `FairSpillPool`, with 1 thread and with several threads (each with
//! its own consumer, as partitions of a query have), in the same run.
//!
//! ```text
//! cargo bench -p datafusion-pool --bench pool -- --quick
//! ```
//! `POOL_BENCH_THREADS` sets the thread counts (default "1,4").

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryPool,
};
use datafusion_pool::GovernorExt;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib};

/// Bytes per `try_grow`: a typical batch-sized request.
const GROW: usize = 64 * 1024;

fn pools() -> Vec<(&'static str, Arc<dyn MemoryPool>)> {
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(gib(64))
            .engine(EngineId::Query, EngineBudget::new(gib(64)))
            .build()
            .expect("config"),
    )
    .expect("governor");
    vec![
        ("greedy", Arc::new(GreedyMemoryPool::new(gib(64)))),
        ("fair", Arc::new(FairSpillPool::new(gib(64)))),
        ("governed", governor.pool()),
    ]
}

fn threads() -> Vec<usize> {
    std::env::var("POOL_BENCH_THREADS").ok().map_or_else(
        || vec![1, 4],
        |v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect(),
    )
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("try_grow_shrink");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for n in threads() {
        for (name, pool) in pools() {
            group.bench_with_input(BenchmarkId::new(name, format!("{n}t")), &n, |b, &n| {
                if n == 1 {
                    let r = MemoryConsumer::new("bench")
                        .with_can_spill(true)
                        .register(&pool);
                    b.iter(|| {
                        r.try_grow(black_box(GROW)).unwrap();
                        r.shrink(GROW);
                    });
                } else {
                    // Each thread does `iters` grow+shrink pairs on its own consumer; the time
                    // reported per iteration is wall time / iters, i.e. the cost of one pair
                    // when n threads run them at once.
                    b.iter_custom(|iters| {
                        let barrier = Arc::new(Barrier::new(n + 1));
                        std::thread::scope(|s| {
                            for _ in 0..n {
                                let pool = Arc::clone(&pool);
                                let barrier = Arc::clone(&barrier);
                                s.spawn(move || {
                                    let r = MemoryConsumer::new("bench")
                                        .with_can_spill(true)
                                        .register(&pool);
                                    barrier.wait();
                                    for _ in 0..iters {
                                        r.try_grow(black_box(GROW)).unwrap();
                                        r.shrink(GROW);
                                    }
                                });
                            }
                            barrier.wait();
                            let start = Instant::now();
                            // scope joins the threads before returning
                            start
                        })
                        .elapsed()
                    });
                }
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
