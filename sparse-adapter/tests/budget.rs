//! The index under a Sparse budget of at most 10 % of its data keeps working: every top-k
//! equals the unbudgeted index's, the engine's sampled reservation never exceeds its limit,
//! and a governor reclaim frees what it asks or everything that can go.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{corpus, governor, queries};
use governor_core::{EngineId, mib};
use sparse_adapter::SparseIndex;

const DOCS: u64 = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenth_of_the_data_gives_the_same_top_k() {
    let dir = tempfile::tempdir().unwrap();
    let docs = corpus(DOCS, 1);
    let qs = queries(60, 2);

    // The reference: everything fits.
    let big = governor(mib(256));
    let full = SparseIndex::builder(big.clone(), dir.path().join("full.redb"))
        .open()
        .unwrap();
    for (d, v) in &docs {
        full.insert(*d, v.clone()).await.unwrap();
    }
    full.commit().await.unwrap();
    let want: Vec<_> = qs.iter().map(|q| full.search(q, 10).unwrap()).collect();

    // The data: every posting decoded, as the cache would hold it at full residency.
    let postings: usize = docs.iter().map(|(_, v)| v.len()).sum();
    let data = postings * std::mem::size_of::<sparse_adapter::block::Posting>();
    let limit = data / 10;
    assert!(
        limit > 64 * 1024 + 4 * sparse_adapter::block::MAX_BLOCK_BYTES,
        "the corpus is too small for a meaningful 10 % budget"
    );
    println!("data {data} B in {postings} postings; Sparse limit {limit} B");

    let gov = governor(limit);
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (gov, peak, stop) = (gov.clone(), peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(gov.reserved(EngineId::Sparse), Ordering::Relaxed);
                std::thread::yield_now();
            }
        })
    };
    let small = SparseIndex::builder(gov.clone(), dir.path().join("small.redb"))
        .store_cache_bytes(64 * 1024)
        .chunk_bytes(8 * 1024)
        .flush_bytes(32 * 1024)
        .open()
        .unwrap();
    let _watcher = small.spawn_pressure_watcher().unwrap();
    // Ingest under the budget: the buffer flushes as it fills, never past the limit.
    for (d, v) in &docs {
        small.insert(*d, v.clone()).await.unwrap();
    }
    // Searches before the commit see buffered documents too.
    for (q, w) in qs.iter().zip(&want) {
        assert_eq!(&small.search(q, 10).unwrap(), w, "before commit");
    }
    small.commit().await.unwrap();
    for round in 0..2 {
        for (q, w) in qs.iter().zip(&want) {
            assert_eq!(&small.search(q, 10).unwrap(), w, "round {round}");
        }
    }
    let s = small.stats().unwrap();
    println!("budgeted: {s:?}");
    assert!(s.cache.evictions > 0, "a 10 % budget must evict");
    assert!(s.cache.misses > s.cache.evictions / 2);
    assert_eq!(s.stored_documents, DOCS);

    // A governor reclaim frees what it asks, or everything that can go.
    let before = gov.reserved(EngineId::Sparse);
    let ask = s.cache.resident_bytes / 2;
    let out = gov.reclaim_from(EngineId::Sparse, ask).await;
    let after = small.stats().unwrap();
    assert!(
        out.freed >= ask || after.cache.resident_bytes == after.cache.pinned_bytes,
        "asked {ask}, freed {}: {after:?}",
        out.freed
    );
    // The reclaimers' claims are backed by the books (the pressure watcher may shed more
    // at the same time).
    assert!(gov.reserved(EngineId::Sparse) <= before - out.freed);
    let out = gov.reclaim_from(EngineId::Sparse, usize::MAX / 2).await;
    let after = small.stats().unwrap();
    assert_eq!(
        after.cache.resident_bytes, 0,
        "everything unpinned goes: {out:?}"
    );
    // What stays: the store's page cache and at most a chunk of buffer headroom.
    assert!(gov.reserved(EngineId::Sparse) <= 64 * 1024 + 8 * 1024);
    // And it still answers.
    assert_eq!(small.search(&qs[0], 10).unwrap(), want[0]);

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    println!("sampled Sparse peak {peak} B of {limit} B");
    assert!(peak <= limit, "sampled peak {peak} over the limit {limit}");
    assert!(peak > limit / 2, "the sampler saw the engine busy");

    // Reopened cold, the budgeted store still gives the reference answers.
    drop(small);
    let reopened = SparseIndex::builder(gov.clone(), dir.path().join("small.redb"))
        .store_cache_bytes(64 * 1024)
        .open()
        .unwrap();
    for (q, w) in qs.iter().zip(&want).take(10) {
        assert_eq!(&reopened.search(q, 10).unwrap(), w, "reopened");
    }
}
