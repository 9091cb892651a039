//! A child process editing documents and receiving peers' updates is killed mid-ingest;
//! every acknowledged update (a commit that returned after it) is there after reopening.
//!
//! The test binary runs itself as the child (`governed_blocks::testing::CrashHarness`): with
//! `CRDT_CRASH_CHILD` set, the test body ingests until killed instead of testing.

mod common;

use common::governor;
use crdt_adapter::DocStore;
use crdt_adapter::loro::{ExportMode, LoroDoc, LoroValue};
use governed_blocks::testing::{CrashHarness, ack, runtime};
use governor_core::mib;

const HARNESS: CrashHarness =
    CrashHarness::new("acknowledged_updates_survive_a_kill", "CRDT_CRASH_CHILD");
const DOCS: u64 = 5;

fn doc_of(round: u64) -> String {
    format!("doc-{}", round % DOCS)
}

/// A peer's update for `round`: sets key `r<round>` in map `remote`.
fn remote(round: u64) -> Vec<u8> {
    let peer = LoroDoc::new();
    peer.set_peer_id(10_000 + round).unwrap();
    peer.get_map("remote")
        .insert(&format!("r{round}"), i64::try_from(round).unwrap())
        .unwrap();
    peer.commit();
    peer.export(ExportMode::all_updates()).unwrap()
}

fn child(path: &str) -> ! {
    runtime(2).block_on(async {
        // A small budget, so documents are evicted (snapshotted) while ingest runs.
        let store = DocStore::builder(governor(mib(2)), path)
            .store_cache_bytes(256 * 1024)
            .flush_bytes(16 * 1024)
            .open()
            .unwrap();
        for d in 0..DOCS {
            store.create(&format!("doc-{d}")).unwrap();
        }
        for round in 0..1_000_000u64 {
            let id = doc_of(round);
            store
                .edit(&id, |d| {
                    let t = d.get_text("log");
                    t.insert(t.len_unicode(), &format!("r{round};")).unwrap();
                })
                .unwrap();
            store.receive(&id, remote(round)).await.unwrap();
            if round % 3 == 2 {
                store.commit().await.unwrap();
                ack(round + 1);
            }
        }
    });
    std::process::exit(0)
}

#[test]
fn acknowledged_updates_survive_a_kill() {
    if let Some(path) = HARNESS.child_path() {
        child(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let acked = HARNESS.run_and_kill(&path, 60);
    let store = DocStore::builder(governor(mib(64)), &path)
        .open()
        .expect("the store opens after a kill");
    for d in 0..DOCS {
        let id = format!("doc-{d}");
        let value = store.value(&id).unwrap();
        let map = value.as_map().unwrap();
        let text = match map.get("log") {
            Some(LoroValue::String(s)) => s.to_string(),
            other => panic!("{id}: no log text: {other:?}"),
        };
        let remote = map.get("remote").and_then(LoroValue::as_map);
        for round in (d..acked).step_by(DOCS as usize) {
            assert!(
                text.contains(&format!("r{round};")),
                "{id}: local edit {round} lost"
            );
            assert!(
                remote.is_some_and(|m| m.contains_key(&format!("r{round}"))),
                "{id}: remote update {round} lost"
            );
        }
    }
    println!("{acked} rounds acknowledged, all found after the kill");
}
