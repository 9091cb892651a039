//! Document store throughput under the governor: document reads per second (a load from
//! redb when the document is cold) at 100 %, 25 % and 10 % of the documents resident, and
//! ingest of remote updates (receive + commit) under a budget of a tenth of the data
//! against a budget that never binds. `cargo test --benches` runs each once as a test;
//! `cargo bench -p crdt-adapter` measures.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crdt_adapter::DocStore;
use crdt_adapter::loro::{ExportMode, LoroDoc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use governed_blocks::testing;
use governor_core::{EngineId, MemoryGovernor, mib};

const DOCS: usize = 40;
const STORE_CACHE: usize = 256 * 1024;

fn governor(limit: usize) -> Arc<MemoryGovernor> {
    testing::governor(EngineId::Crdt, limit, mib(2048))
}

/// A peer's update: `n` characters typed into text `body`.
fn update(peer: u64, n: usize) -> Vec<u8> {
    let doc = LoroDoc::new();
    doc.set_peer_id(peer).unwrap();
    let text = doc.get_text("body");
    for i in 0..n {
        let c = char::from(b'a' + (i * 7 % 26) as u8);
        text.insert(i / 2, &c.to_string()).unwrap();
    }
    doc.commit();
    doc.export(ExportMode::all_updates()).unwrap()
}

fn open(gov: Arc<MemoryGovernor>, path: &Path) -> DocStore {
    DocStore::builder(gov, path)
        .store_cache_bytes(STORE_CACHE)
        .edit_headroom(64 * 1024)
        .receive_wait(Duration::from_secs(30))
        .open()
        .unwrap()
}

fn loads(c: &mut Criterion) {
    let rt = testing::runtime(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.redb");
    let ids: Vec<String> = (0..DOCS).map(|i| format!("doc-{i}")).collect();
    let data = {
        let store = open(governor(mib(1024)), &path);
        for (i, id) in ids.iter().enumerate() {
            store.create(id).unwrap();
            rt.block_on(store.receive(id, update(100 + i as u64, 1500)))
                .unwrap();
        }
        rt.block_on(store.commit()).unwrap();
        for id in &ids {
            store.value(id).unwrap();
        }
        store.stats().cache.resident_bytes
    };
    let mut group = c.benchmark_group("crdt_document_read");
    group.throughput(Throughput::Elements(1));
    for pct in [100usize, 25, 10] {
        let gov = governor(STORE_CACHE + 64 * 1024 + 64 * 1024 + data * pct / 100);
        let store = open(gov, &path);
        for id in &ids {
            store.value(id).unwrap();
        }
        let mut i = 0;
        group.bench_function(format!("residency_{pct}pct"), |b| {
            b.iter(|| {
                // A scattered order: at low residency most reads load.
                i = (i + 7) % ids.len();
                store.value(&ids[i]).unwrap()
            });
        });
        let s = store.stats().cache;
        println!(
            "residency {pct}%: {} loads, {} hits, {} evictions",
            s.misses, s.hits, s.evictions
        );
    }
    group.finish();
}

fn ingest(c: &mut Criterion) {
    let rt = testing::runtime(2);
    let ids: Vec<String> = (0..DOCS).map(|i| format!("doc-{i}")).collect();
    let updates: Vec<Vec<u8>> = (0..DOCS).map(|i| update(500 + i as u64, 400)).collect();
    let mut group = c.benchmark_group("crdt_ingest_40_updates");
    group.throughput(Throughput::Elements(DOCS as u64));
    // The cache's share: a tenth of what the 40 documents are charged when all resident
    // (about 60 KiB each for these updates); the store's page cache and buffer on top.
    for (name, limit) in [
        ("budget_never_binding", mib(1024)),
        (
            "budget_tenth_of_data",
            STORE_CACHE + 128 * 1024 + DOCS * 6 * 1024,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let store = open(governor(limit), &dir.path().join("d.redb"));
                    for id in &ids {
                        store.create(id).unwrap();
                    }
                    (dir, store)
                },
                |(dir, store)| {
                    rt.block_on(async {
                        for (id, u) in ids.iter().zip(&updates) {
                            store.receive(id, u.clone()).await.unwrap();
                            store.value(id).unwrap();
                        }
                        store.commit().await.unwrap();
                    });
                    drop(store);
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
    targets = loads, ingest
}
criterion_main!(benches);
