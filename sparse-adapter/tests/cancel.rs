//! Issue 25, defect 1 as a Sparse user met it: 3,000 documents inserted, a `commit()`
//! cancelled (`timeout(1 ms, commit())`), then `commit()` again stored 6,000 documents and
//! every score doubled (48.22 → 96.44), because the cancelled commit's batch was written by
//! its own (detached) write and again by the next commit.
//!
//! Here the cancellation point is fixed instead of timed: the commit future is polled
//! exactly once and dropped. That one poll takes the flush lock and starts the batch's
//! write on a blocking thread, which the drop cannot stop; so the drop always lands while
//! the write is running (a 3,000-document merge cannot finish within that one poll).

mod common;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::{corpus, governor, queries};
use governor_core::mib;
use sparse_adapter::{Hit, SparseIndex};

const DOCS: u64 = 3_000;

fn search_all(index: &SparseIndex, seed: u64) -> Vec<Vec<Hit>> {
    queries(30, seed)
        .iter()
        .map(|q| index.search(q, 10).unwrap())
        .collect()
}

fn assert_same_hits(before: &[Vec<Hit>], after: &[Vec<Hit>]) {
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(after) {
        let docs = |h: &[Hit]| h.iter().map(|h| h.doc).collect::<Vec<_>>();
        assert_eq!(docs(b), docs(a), "the same documents, in the same order");
        for (hb, ha) in b.iter().zip(a) {
            // The store sums postings in another order than the buffer: allow rounding.
            let tol = 1e-4 * hb.score.abs().max(1.0);
            assert!(
                (hb.score - ha.score).abs() <= tol,
                "doc {}: score {} became {}",
                hb.doc,
                hb.score,
                ha.score
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_commit_then_a_commit_stores_each_document_once() {
    let dir = tempfile::tempdir().unwrap();
    let index = SparseIndex::builder(governor(mib(64)), dir.path().join("sparse.redb"))
        // No flush before the commit: the whole corpus is one batch.
        .flush_bytes(mib(32))
        .open()
        .unwrap();
    for (doc, vector) in corpus(DOCS, 25) {
        index.insert(doc, vector).await.unwrap();
    }
    assert_eq!(index.stats().unwrap().stored_documents, 0);
    let before = search_all(&index, 26);

    // A fresh cooperative budget, so the one poll below is not turned away by tokio's
    // budgeting (it would then cancel before the write started: a weaker test).
    tokio::task::yield_now().await;
    let cancelled = {
        let mut commit = pin!(index.commit());
        let mut cx = Context::from_waker(Waker::noop());
        // Dropped at the end of this block, whatever the poll returned.
        commit.as_mut().poll(&mut cx)
    };
    index.commit().await.unwrap();

    let stats = index.stats().unwrap();
    assert_eq!(
        stats.stored_documents, DOCS,
        "each document stored once (the one poll returned {cancelled:?})"
    );
    assert_eq!(stats.buffer.items, 0);
    assert_same_hits(&before, &search_all(&index, 26));
    // Once more: a commit with nothing buffered changes nothing.
    index.commit().await.unwrap();
    assert_eq!(index.stats().unwrap().stored_documents, DOCS);
    assert!(
        matches!(cancelled, Poll::Pending | Poll::Ready(Ok(()))),
        "{cancelled:?}"
    );
}
