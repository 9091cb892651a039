//! Bad input gets typed errors, never a panic: damaged or foreign store files, invalid
//! vectors, a budget too small for the store's cache.

mod common;

use common::governor;
use governor_core::{EngineId, kib, mib};
use sparse_adapter::{SparseError, SparseIndex, SparseVector};

#[test]
fn invalid_vectors_are_refused() {
    for (terms, what) in [
        (vec![(1, 0.5), (1, 0.7)], "repeated"),
        (vec![(1, f32::NAN)], "nan"),
        (vec![(1, f32::INFINITY)], "infinite"),
        (
            (0..=sparse_adapter::MAX_TERMS as u32)
                .map(|t| (t, 1.0))
                .collect(),
            "too many",
        ),
    ] {
        assert!(
            matches!(
                SparseVector::new(terms),
                Err(SparseError::InvalidVector { .. })
            ),
            "{what}"
        );
    }
    assert!(SparseVector::new(vec![]).unwrap().is_empty());
}

#[test]
fn garbage_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.redb");
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let gov = governor(mib(8));
    let err = SparseIndex::builder(gov.clone(), &path).open().unwrap_err();
    assert!(matches!(err, SparseError::Open { .. }), "{err}");
    assert_eq!(
        gov.reserved(EngineId::Sparse),
        0,
        "a failed open holds nothing"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn truncated_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.redb");
    let gov = governor(mib(8));
    {
        let index = SparseIndex::builder(gov.clone(), &path).open().unwrap();
        for (d, v) in common::corpus(200, 3) {
            index.insert(d, v).await.unwrap();
        }
        index.commit().await.unwrap();
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    match SparseIndex::builder(gov.clone(), &path).open() {
        Err(SparseError::Open { .. } | SparseError::Store(_)) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
        // redb may repair a file cut after its last commit's pages; then reads must still
        // be checked, not wrong.
        Ok(index) => {
            let q = SparseVector::new(vec![(0, 1.0)]).unwrap();
            if let Err(e) = index.search(&q, 5) {
                assert!(matches!(
                    e,
                    SparseError::Store(_) | SparseError::CorruptBlock { .. }
                ));
            }
        }
    }
}

#[test]
fn foreign_redb_file_is_not_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("meta");
            txn.open_table(def).unwrap().insert("format", "x").unwrap();
        }
        txn.commit().unwrap();
    }
    let err = SparseIndex::builder(governor(mib(8)), &path)
        .open()
        .unwrap_err();
    assert!(matches!(err, SparseError::NotAnIndex { .. }), "{err}");
}

#[test]
fn store_cache_larger_than_the_budget_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(kib(64));
    let err = SparseIndex::builder(gov.clone(), dir.path().join("x.redb"))
        .store_cache_bytes(mib(1))
        .open()
        .unwrap_err();
    assert!(matches!(err, SparseError::NoRoomForStore { .. }), "{err}");
    assert!(
        !dir.path().join("x.redb").exists(),
        "nothing created when refused"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_vector_larger_than_the_budget_is_refused_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(kib(256));
    let index = SparseIndex::builder(gov.clone(), dir.path().join("x.redb"))
        .store_cache_bytes(kib(64))
        .open()
        .unwrap();
    let huge = SparseVector::new((0..60_000).map(|t| (t, 1.0)).collect()).unwrap();
    let err = index.insert(7, huge).await.unwrap_err();
    assert!(matches!(err, SparseError::Refused { doc: 7, .. }), "{err}");
    assert_eq!(index.stats().unwrap().buffer.items, 0);
}
