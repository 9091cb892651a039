//! Sparse index throughput under the governor: searches per second at 100 %, 25 % and
//! 10 % of the posting blocks resident, and ingest (insert + commit) under a budget of a
//! tenth of the data against a budget that never binds. `cargo test --benches` runs each
//! once as a test; `cargo bench -p sparse-adapter` measures.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use governed_blocks::testing;
use governor_core::{EngineId, MemoryGovernor, mib};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparse_adapter::block::Posting;
use sparse_adapter::{SparseIndex, SparseVector};

const DOCS: u64 = 3000;
const STORE_CACHE: usize = 256 * 1024;
const CHUNK: usize = 16 * 1024;

fn corpus(n: u64, seed: u64) -> Vec<(u64, SparseVector)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|doc| {
            let k = rng.random_range(20..40);
            let mut terms: Vec<(u32, f32)> = Vec::with_capacity(k);
            while terms.len() < k {
                let u: f64 = rng.random();
                let t = (u * u * 1500.0) as u32;
                if !terms.iter().any(|(x, _)| *x == t) {
                    terms.push((t, rng.random_range(0.01..1.0)));
                }
            }
            (doc, SparseVector::new(terms).unwrap())
        })
        .collect()
}

fn queries(n: usize) -> Vec<SparseVector> {
    let mut rng = StdRng::seed_from_u64(77);
    (0..n)
        .map(|_| {
            let mut terms: Vec<(u32, f32)> = Vec::new();
            while terms.len() < 8 {
                let t = rng.random_range(0..1500);
                if !terms.iter().any(|(x, _)| *x == t) {
                    terms.push((t, 1.0));
                }
            }
            SparseVector::new(terms).unwrap()
        })
        .collect()
}

fn governor(limit: usize) -> Arc<MemoryGovernor> {
    testing::governor(EngineId::Sparse, limit, mib(1024))
}

async fn ingest(index: &SparseIndex, docs: &[(u64, SparseVector)]) {
    for (d, v) in docs {
        index.insert(*d, v.clone()).await.unwrap();
    }
    index.commit().await.unwrap();
}

/// Decoded posting bytes of the corpus: what full residency of the cache holds.
fn data_bytes(docs: &[(u64, SparseVector)]) -> usize {
    docs.iter().map(|(_, v)| v.len()).sum::<usize>() * std::mem::size_of::<Posting>()
}

fn open(gov: Arc<MemoryGovernor>, path: &Path) -> SparseIndex {
    SparseIndex::builder(gov, path)
        .store_cache_bytes(STORE_CACHE)
        .chunk_bytes(CHUNK)
        .flush_bytes(256 * 1024)
        .insert_wait(Duration::from_secs(30))
        .open()
        .unwrap()
}

fn search(c: &mut Criterion) {
    let rt = testing::runtime(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.redb");
    let docs = corpus(DOCS, 1);
    let data = data_bytes(&docs);
    rt.block_on(ingest(&open(governor(mib(512)), &path), &docs));
    let qs = queries(64);
    let mut group = c.benchmark_group("sparse_search_top10");
    group.throughput(Throughput::Elements(1));
    for pct in [100usize, 25, 10] {
        // The cache's share of the budget; the store's page cache and a buffer chunk on top.
        let cache = (data + data / 2) * pct / 100;
        let gov = governor(STORE_CACHE + CHUNK + cache);
        let index = open(gov, &path);
        for q in &qs {
            index.search(q, 10).unwrap();
        }
        let mut i = 0;
        group.bench_function(format!("residency_{pct}pct"), |b| {
            b.iter(|| {
                i = (i + 1) % qs.len();
                index.search(&qs[i], 10).unwrap()
            });
        });
    }
    group.finish();
}

fn ingest_bench(c: &mut Criterion) {
    let rt = testing::runtime(2);
    let docs = corpus(500, 2);
    let data = data_bytes(&docs);
    let mut group = c.benchmark_group("sparse_ingest_500_docs");
    group.throughput(Throughput::Elements(docs.len() as u64));
    for (name, limit) in [
        ("budget_never_binding", mib(512)),
        (
            "budget_tenth_of_data",
            STORE_CACHE + CHUNK + (data / 10).max(64 * 1024),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let index = open(governor(limit), &dir.path().join("i.redb"));
                    rt.block_on(ingest(&index, &docs));
                    drop(index);
                    dir
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3));
    targets = search, ingest_bench
}
criterion_main!(benches);
