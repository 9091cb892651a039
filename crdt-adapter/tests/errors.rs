//! Bad input gets typed errors, never a panic, and changes nothing: unknown documents,
//! malformed update bytes, bad ids, damaged or foreign store files, corrupt stored state.

mod common;

use common::{Kind, governor, peer_updates};
use crdt_adapter::{CrdtError, DocStore};
use governor_core::{EngineId, mib};
use redb::ReadableTable;

fn open(dir: &tempfile::TempDir) -> DocStore {
    DocStore::builder(governor(mib(64)), dir.path().join("docs.redb"))
        .open()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn unknown_documents_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert!(matches!(
        store.value("nope"),
        Err(CrdtError::UnknownDocument { .. })
    ));
    assert!(matches!(
        store.edit("nope", |_| ()),
        Err(CrdtError::UnknownDocument { .. })
    ));
    let update = peer_updates(Kind::Text, 10, 5);
    assert!(matches!(
        store.receive("nope", update).await,
        Err(CrdtError::UnknownDocument { .. })
    ));
    assert!(matches!(store.create(""), Err(CrdtError::InvalidId { .. })));
    let long = "x".repeat(crdt_adapter::MAX_ID_BYTES + 1);
    assert!(matches!(
        store.value(&long),
        Err(CrdtError::InvalidId { .. })
    ));
    store.create("a").unwrap();
    assert!(matches!(
        store.create("a"),
        Err(CrdtError::DocumentExists { .. })
    ));
    assert_eq!(store.stats().buffer.items, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_updates_are_refused_and_nothing_is_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    store.create("d").unwrap();
    let good = peer_updates(Kind::Map, 50, 6);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for (bytes, what) in [
        (Vec::new(), "empty"),
        (vec![0u8; 3], "short"),
        (b"not a loro update at all, just text".to_vec(), "text"),
        (good[..good.len() / 2].to_vec(), "truncated"),
        (flipped, "flipped byte"),
    ] {
        let got = store.receive("d", bytes).await;
        assert!(
            matches!(got, Err(CrdtError::MalformedUpdate { .. })),
            "{what}: {got:?}"
        );
    }
    assert_eq!(store.stats().buffer.items, 0);
    // The document is untouched and still takes good updates.
    store.receive("d", good).await.unwrap();
    store.commit().await.unwrap();
    assert!(store.value("d").unwrap().as_map().is_some());
}

#[test]
fn garbage_and_foreign_files_are_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5Au8; 32 * 1024]).unwrap();
    let gov = governor(mib(8));
    let err = DocStore::builder(gov.clone(), &garbage).open().unwrap_err();
    assert!(matches!(err, CrdtError::Open { .. }), "{err}");
    assert_eq!(
        gov.reserved(EngineId::Crdt),
        0,
        "a failed open holds nothing"
    );

    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("snapshots");
            txn.open_table(def).unwrap().insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = DocStore::builder(gov, &foreign).open().unwrap_err();
    assert!(matches!(err, CrdtError::NotAStore { .. }), "{err}");
}

#[test]
fn corrupt_stored_snapshot_is_reported_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.redb");
    {
        let store = DocStore::builder(governor(mib(64)), &path).open().unwrap();
        store.create("d").unwrap();
    }
    {
        // Damage the stored snapshot behind the store's back (its checksum no longer matches).
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("snapshots");
            let mut t = txn.open_table(def).unwrap();
            let mut v = t.get("d").unwrap().unwrap().value().to_vec();
            let last = v.len() - 1;
            v[last] ^= 1;
            t.insert("d", v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let gov = governor(mib(64));
    let store = DocStore::builder(gov.clone(), &path).open().unwrap();
    let fixed = gov.reserved(EngineId::Crdt);
    assert!(matches!(
        store.value("d"),
        Err(CrdtError::CorruptDocument { .. })
    ));
    assert_eq!(gov.reserved(EngineId::Crdt), fixed, "nothing stays charged");
}

#[test]
fn document_larger_than_the_budget_is_refused_without_loading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.redb");
    {
        let store = DocStore::builder(governor(mib(64)), &path).open().unwrap();
        store.create("big").unwrap();
        store
            .edit("big", |d| common::edit(d, Kind::Map, 3000, 1))
            .unwrap();
        store.evict("big").unwrap();
    }
    let gov = governor(256 * 1024);
    let store = DocStore::builder(gov.clone(), &path)
        .store_cache_bytes(64 * 1024)
        .open()
        .unwrap();
    let got = store.value("big");
    assert!(matches!(got, Err(CrdtError::Cache(_))), "{got:?}");
    assert_eq!(gov.reserved(EngineId::Crdt), 64 * 1024);
}
