//! Search throughput of an [`HnswCache`] with 100 %, 50 % and 25 % of its index resident,
//! and the latency of reclaiming one segment's worth of bytes (p50/p99).
//!
//! ```text
//! cargo run --release -p hnsw-adapter --example hnsw_bench            # 16 segments x 2000 x dim 32
//! HNSW_BENCH_SEGMENTS=8 HNSW_BENCH_PER=1000 cargo run --release -p hnsw-adapter --example hnsw_bench
//! ```
//!
//! Prints a markdown table. Every figure comes from this run on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib, mib};
use hnsw_adapter::{HnswCache, HnswParams, SegmentId};

// The tests' fixtures: the same clustered vectors (and dimension) the tests search.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{DIM, vectors};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn governor(vector_limit: usize) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(gib(4))
        .engine(EngineId::Vector, EngineBudget::new(vector_limit))
        .engine(
            EngineId::Query,
            EngineBudget::new(gib(1)).with_floor(mib(1)),
        )
        .build()
        .expect("config");
    MemoryGovernor::new(config).expect("governor")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let segments = env("HNSW_BENCH_SEGMENTS", 16);
    let per = env("HNSW_BENCH_PER", 2_000);
    let queries = vectors(env("HNSW_BENCH_QUERIES", 300), 77);
    let dir = tempfile::tempdir().expect("tempdir");
    let params = HnswParams::new(DIM)
        .max_connections(16)
        .ef_construction(100)
        .expected_points(per);

    let t = Instant::now();
    {
        let cache = HnswCache::builder(governor(gib(2)), dir.path())
            .params(params)
            .build()
            .expect("cache");
        for s in 0..segments {
            let id = SegmentId::new("bench", s as u32).expect("id");
            cache.create_segment(&id).expect("create");
            for (r, v) in vectors(per, s as u64).iter().enumerate() {
                cache.insert(&id, s * 1_000_000 + r, v).expect("insert");
            }
        }
        cache.persist_all().expect("persist");
    }
    let build = t.elapsed();
    let total = {
        let cache = HnswCache::builder(governor(gib(2)), dir.path())
            .build()
            .expect("cache");
        cache.search_all(&queries[0], 10, 64).expect("warm");
        cache.stats().resident_bytes
    };
    println!(
        "index: {segments} segments x {per} vectors x dim {DIM}, {:.1} MiB resident when fully loaded; built in {build:.1?}\n",
        total as f64 / f64::from(1 << 20)
    );
    println!(
        "| resident budget | Vector limit | search_all QPS (k=10, ef=64) | loads/query | batch of 64: QPS |"
    );
    println!("|---|---|---|---|---|");
    for pct in [100usize, 50, 25] {
        // 100 % gets a little headroom for the loader's transient peak.
        let limit = if pct == 100 {
            total * 2
        } else {
            total * pct / 100
        };
        let cache = HnswCache::builder(governor(limit), dir.path())
            .build()
            .expect("cache");
        cache.search_all(&queries[0], 10, 64).expect("warm");
        let loads0 = cache.stats().loads;
        let t = Instant::now();
        for q in &queries {
            cache.search_all(q, 10, 64).expect("search");
        }
        let single = queries.len() as f64 / t.elapsed().as_secs_f64();
        let loads = (cache.stats().loads - loads0) as f64 / queries.len() as f64;
        let t = Instant::now();
        let mut batched = 0;
        for chunk in queries.chunks(64) {
            cache.search_all_batch(chunk, 10, 64).expect("batch");
            batched += chunk.len();
        }
        let batch = batched as f64 / t.elapsed().as_secs_f64();
        println!(
            "| {pct} % | {:.1} MiB | {single:.0} | {loads:.2} | {batch:.0} |",
            limit as f64 / f64::from(1 << 20)
        );
    }

    // Reclaim latency: all resident, the governor asks for one segment's worth of bytes.
    let rounds = env("HNSW_BENCH_RECLAIMS", 100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let gov = governor(gib(2));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .build()
        .expect("cache");
    let pin = SegmentId::new("bench", 0).expect("id");
    cache.pin(&pin).expect("pin");
    let ask = total / segments;
    let mut direct = Vec::with_capacity(rounds);
    let mut via_governor = Vec::with_capacity(rounds);
    for i in 0..rounds {
        cache
            .search_all(&queries[i % queries.len()], 10, 64)
            .expect("reload");
        if i % 2 == 0 {
            let t = Instant::now();
            let freed = cache.reclaim(ask);
            direct.push(t.elapsed());
            assert!(freed >= ask);
        } else {
            let t = Instant::now();
            let out = rt.block_on(gov.reclaim_for(EngineId::Query, ask));
            via_governor.push(t.elapsed());
            assert!(out.freed >= ask);
        }
        assert!(cache.is_resident(&pin));
    }
    direct.sort();
    via_governor.sort();
    println!(
        "\n| reclaim of one segment ({:.2} MiB), {rounds} rounds | p50 | p99 |",
        ask as f64 / f64::from(1 << 20)
    );
    println!("|---|---|---|");
    println!(
        "| HnswCache::reclaim (eviction only) | {:.1?} | {:.1?} |",
        percentile(&direct, 0.5),
        percentile(&direct, 0.99)
    );
    println!(
        "| governor.reclaim_for(Query, n) round trip | {:.1?} | {:.1?} |",
        percentile(&via_governor, 0.5),
        percentile(&via_governor, 0.99)
    );
}
