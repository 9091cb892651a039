//! Closing and reopening: edits that no commit covered survive a clean drop of the store;
//! an evicted document reloads equal to what it was, and its update log is folded into
//! the snapshot the eviction wrote.

mod common;

use common::{Kind, edit, governor, peer_updates};
use crdt_adapter::DocStore;
use governor_core::mib;

#[tokio::test(flavor = "current_thread")]
async fn drop_keeps_uncommitted_edits_and_reload_is_equal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docs.redb");
    let (value, version) = {
        let store = DocStore::builder(governor(mib(64)), &path).open().unwrap();
        store.create("d").unwrap();
        store.edit("d", |d| edit(d, Kind::Text, 300, 1)).unwrap();
        store
            .receive("d", peer_updates(Kind::List, 100, 2))
            .await
            .unwrap();
        store.commit().await.unwrap();
        // Evicted after edits: the snapshot holds everything; reload is equal.
        let before = store.value("d").unwrap();
        store.edit("d", |d| edit(d, Kind::Map, 50, 3)).unwrap();
        let edited = store.value("d").unwrap();
        assert_ne!(before, edited);
        store.evict("d").unwrap();
        assert!(!store.is_resident("d"));
        assert_eq!(store.value("d").unwrap(), edited);
        // Edits after the last commit, then a clean drop.
        store.edit("d", |d| edit(d, Kind::Text, 40, 4)).unwrap();
        store
            .receive("d", peer_updates(Kind::Map, 20, 5))
            .await
            .unwrap();
        (store.value("d").unwrap(), store.version("d").unwrap())
    };
    let store = DocStore::builder(governor(mib(64)), &path).open().unwrap();
    assert_eq!(store.value("d").unwrap(), value);
    assert_eq!(store.version("d").unwrap(), version);
}
