//! A child process ingesting documents is killed mid-ingest; every document it had
//! acknowledged (a commit that returned after its insert) is found after reopening.
//!
//! The test binary runs itself as the child (`governed_blocks::testing::CrashHarness`): with
//! `SPARSE_CRASH_CHILD` set, the test body ingests until killed instead of testing.

mod common;

use common::{corpus, governor, own_term};
use governed_blocks::testing::{CrashHarness, ack, runtime};
use governor_core::mib;
use sparse_adapter::{SparseIndex, SparseVector};

const HARNESS: CrashHarness = CrashHarness::new(
    "acknowledged_documents_survive_a_kill",
    "SPARSE_CRASH_CHILD",
);
const BATCH: u64 = 25;

fn child(path: &str) -> ! {
    runtime(2).block_on(async {
        let index = SparseIndex::builder(governor(mib(4)), path)
            .store_cache_bytes(256 * 1024)
            .flush_bytes(64 * 1024)
            .open()
            .unwrap();
        let docs = corpus(100_000, 9);
        for (i, (d, v)) in docs.into_iter().enumerate() {
            index.insert(d, v).await.unwrap();
            if (i as u64 + 1).is_multiple_of(BATCH) {
                index.commit().await.unwrap();
                ack(i as u64 + 1);
            }
        }
    });
    std::process::exit(0)
}

#[test]
fn acknowledged_documents_survive_a_kill() {
    if let Some(path) = HARNESS.child_path() {
        child(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    // Kill after the child acknowledged 8 batches: it is inserting or committing the next.
    let acked = HARNESS.run_and_kill(&path, 8 * BATCH);
    let index = SparseIndex::builder(governor(mib(8)), &path)
        .open()
        .expect("the store opens after a kill");
    let stored = index.stats().unwrap().stored_documents;
    assert!(stored >= acked, "{stored} stored < {acked} acknowledged");
    let docs = corpus(acked, 9);
    for (d, v) in &docs {
        let hits = index
            .search(&SparseVector::new(vec![(own_term(*d), 1.0)]).unwrap(), 1)
            .unwrap();
        assert_eq!(hits.first().map(|h| h.doc), Some(*d), "document {d} lost");
        // All of its postings are there: its own term weighted far above the rest makes it
        // the top hit, and its score is the sum over every one of its terms.
        let probe = SparseVector::new(
            v.terms()
                .iter()
                .map(|&(t, _)| (t, if t == own_term(*d) { 1000.0 } else { 1.0 }))
                .collect(),
        )
        .unwrap();
        let mut want = 0.0f32;
        for &(t, qw) in probe.terms() {
            want += qw * v.weight(t).unwrap();
        }
        let top = index.search(&probe, 1).unwrap();
        assert_eq!(
            (top[0].doc, top[0].score),
            (*d, want),
            "document {d} lost postings"
        );
    }
    println!("{acked} acknowledged, {stored} stored after the kill");
}
