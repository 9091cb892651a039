//! Criterion benchmarks of the HNSW cache: `search_all` with 100 %, 50 % and 25 % of the
//! index resident, and reclaiming one segment's bytes. Small on purpose (8 segments x 1000
//! vectors) so `cargo bench -- --quick` stays short; `examples/hnsw_bench.rs` runs the larger
//! table with p50/p99.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib};
use hnsw_adapter::{HnswCache, HnswParams, SegmentId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DIM: usize = 32;
const SEGMENTS: usize = 8;
const PER: usize = 1_000;

fn governor(vector_limit: usize) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(gib(4))
        .engine(EngineId::Vector, EngineBudget::new(vector_limit))
        .build()
        .expect("config");
    MemoryGovernor::new(config).expect("governor")
}

fn vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect()
}

fn bench_cache(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let cache = HnswCache::builder(governor(gib(1)), dir.path())
            .params(
                HnswParams::new(DIM)
                    .ef_construction(64)
                    .expected_points(PER),
            )
            .build()
            .expect("cache");
        for s in 0..SEGMENTS {
            let id = SegmentId::new("bench", s as u32).expect("id");
            cache.create_segment(&id).expect("create");
            for (r, v) in vectors(PER, s as u64).iter().enumerate() {
                cache.insert(&id, s * 1_000_000 + r, v).expect("insert");
            }
        }
        cache.persist_all().expect("persist");
    }
    let queries = vectors(64, 99);
    let total = {
        let cache = HnswCache::builder(governor(gib(1)), dir.path())
            .build()
            .expect("cache");
        cache.search_all(&queries[0], 10, 64).expect("warm");
        cache.stats().resident_bytes
    };

    let mut group = c.benchmark_group("hnsw_cache_search_all");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for pct in [100usize, 50, 25] {
        let limit = if pct == 100 {
            total * 2
        } else {
            total * pct / 100
        };
        let cache = HnswCache::builder(governor(limit), dir.path())
            .build()
            .expect("cache");
        let mut i = 0;
        group.bench_function(format!("resident_{pct}pct"), |b| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                black_box(cache.search_all(&queries[i], 10, 64).expect("search"))
            });
        });
    }
    group.finish();

    let gov = governor(gib(1));
    let cache = HnswCache::builder(gov, dir.path()).build().expect("cache");
    let ask = total / SEGMENTS;
    let mut group = c.benchmark_group("hnsw_cache_reclaim");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("one_segment", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                cache.search_all(&queries[0], 10, 64).expect("reload");
                let t = Instant::now();
                black_box(cache.reclaim(ask));
                spent += t.elapsed();
            }
            spent
        });
    });
    group.finish();
}

criterion_group!(benches, bench_cache);
criterion_main!(benches);
