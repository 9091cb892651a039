//! The store under a Crdt budget of at most 10 % of its documents keeps working: every
//! document read back after eviction equals what was written (deep value and version), the
//! engine's sampled reservation never exceeds its limit, pinned documents stay, and a
//! governor reclaim frees what it asks or every unpinned document.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{KINDS, edit, governor, peer_updates};
use crdt_adapter::DocStore;
use crdt_adapter::loro::{ExportMode, LoroDoc};
use governor_core::{EngineId, EngineSnapshot, MemoryGovernor, mib};

const DOCS: usize = 60;
const LOCAL_PEER: u64 = 1;

/// Writes the same history into the store and into the test's own reference documents.
async fn write_all(store: &DocStore, shadows: &mut HashMap<String, LoroDoc>) {
    for i in 0..DOCS {
        let id = format!("doc-{i}");
        store.create(&id).unwrap();
        let shadow = LoroDoc::new();
        let kind = KINDS[i % 3];
        for round in 0..2u64 {
            let seed = (i as u64) * 10 + round;
            let local = |d: &LoroDoc| {
                d.set_peer_id(LOCAL_PEER).unwrap();
                edit(d, kind, 120, seed);
            };
            store.edit(&id, local).unwrap();
            local(&shadow);
            if (i + round as usize).is_multiple_of(2) {
                let update = peer_updates(KINDS[(i + 1) % 3], 150, 1000 + seed);
                shadow.import(&update).unwrap();
                store.receive(&id, update).await.unwrap();
            }
        }
        shadows.insert(id, shadow);
    }
}

fn check_all(store: &DocStore, shadows: &HashMap<String, LoroDoc>, order_seed: usize) {
    let mut ids: Vec<&String> = shadows.keys().collect();
    ids.sort();
    // A scattered order, so reads keep evicting each other.
    let n = ids.len();
    for k in 0..n {
        let id = ids[(k * 7 + order_seed) % n];
        let shadow = &shadows[id];
        assert_eq!(store.value(id).unwrap(), shadow.get_deep_value(), "{id}");
        assert_eq!(store.version(id).unwrap(), shadow.oplog_vv(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenth_of_the_documents_reads_back_everything() {
    let dir = tempfile::tempdir().unwrap();

    // The data: every document resident under a budget that holds them all.
    let big = governor(mib(512));
    let mut shadows = HashMap::new();
    let data = {
        let full = DocStore::builder(big.clone(), dir.path().join("full.redb"))
            .open()
            .unwrap();
        write_all(&full, &mut shadows).await;
        full.commit().await.unwrap();
        for id in shadows.keys() {
            full.value(id).unwrap();
        }
        full.stats().cache.resident_bytes
    };
    let limit = data / 10;
    println!("{DOCS} documents charged {data} B when all resident; Crdt limit {limit} B");

    let gov = governor(limit);
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (gov, peak, stop) = (gov.clone(), peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(gov.reserved(EngineId::Crdt), Ordering::Relaxed);
                std::thread::yield_now();
            }
        })
    };
    let path = dir.path().join("small.redb");
    let store = DocStore::builder(gov.clone(), &path)
        .store_cache_bytes(64 * 1024)
        // More than one test edit adds (120 map writes of up to 1 KiB): edits settle by
        // shrinking and are never charged past the limit.
        .edit_headroom(256 * 1024)
        .chunk_bytes(8 * 1024)
        .flush_bytes(64 * 1024)
        .open()
        .unwrap();
    let _watcher = store.spawn_pressure_watcher().unwrap();
    let mut written = HashMap::new();
    write_all(&store, &mut written).await;
    // Before the commit: reads see buffered updates and unlogged edits.
    check_all(&store, &written, 0);
    store.commit().await.unwrap();
    check_all(&store, &written, 3);
    check_all(&store, &written, 5);
    let s = store.stats();
    println!("budgeted: {s:?}");
    assert!(s.cache.evictions > 0, "a 10 % budget must evict");

    // A pinned document stays through a full reclaim.
    store.pin("doc-4").unwrap();
    let before = gov.reserved(EngineId::Crdt);
    let ask = s.cache.resident_bytes / 2;
    let out = gov.reclaim_from(EngineId::Crdt, ask).await;
    let after = store.stats();
    assert!(
        out.freed >= ask || after.cache.resident_bytes == after.cache.pinned_bytes,
        "asked {ask}, freed {}: {after:?}",
        out.freed
    );
    // The reclaimers' claims are backed by the books (the pressure watcher may shed more
    // at the same time).
    assert!(gov.reserved(EngineId::Crdt) <= before - out.freed);
    gov.reclaim_from(EngineId::Crdt, usize::MAX / 2).await;
    let after = store.stats();
    assert_eq!(after.cache.resident_bytes, after.cache.pinned_bytes);
    assert!(store.is_resident("doc-4"));
    store.unpin("doc-4").unwrap();
    check_all(&store, &written, 1);

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    println!("sampled Crdt peak {peak} B of {limit} B");
    assert!(peak <= limit, "sampled peak {peak} over the limit {limit}");

    // Reopened cold, every document is still what was written.
    drop(store);
    let reopened = DocStore::builder(gov.clone(), &path)
        .store_cache_bytes(64 * 1024)
        .open()
        .unwrap();
    check_all(&reopened, &written, 2);
}

/// The governor's figures for the Crdt engine.
fn crdt_figures(gov: &MemoryGovernor) -> EngineSnapshot {
    gov.snapshot()
        .engines
        .into_iter()
        .find(|e| e.engine == EngineId::Crdt)
        .expect("the Crdt engine is configured")
}

/// Edits and merged remote updates on a hot set of documents under a budget that holds a
/// few of them: every change is reserved before it is applied, or its document is
/// persisted and dropped, so nothing is ever booked past the Crdt limit (no forced
/// charge), and every document reads back with all its edits and merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_merges_are_never_booked_past_the_limit() {
    const DOCS: u64 = 24;
    const ROUNDS: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    // A quarter of what the documents grow to (the hottest reach about 150 KiB of charge),
    // and the store's own page cache.
    let limit = 64 * 1024 + 1024 * 1024;
    let gov = governor(limit);
    let store = DocStore::builder(gov.clone(), dir.path().join("docs.redb"))
        .store_cache_bytes(64 * 1024)
        .chunk_bytes(4 * 1024)
        .flush_bytes(16 * 1024)
        .open()
        .unwrap();
    let _watcher = store.spawn_pressure_watcher().unwrap();
    let peers: Vec<LoroDoc> = (0..DOCS)
        .map(|d| {
            let p = LoroDoc::new();
            p.set_peer_id(0xBEEF_0000 + d).unwrap();
            p
        })
        .collect();
    let mut shadows: Vec<LoroDoc> = (0..DOCS)
        .map(|d| {
            store.create(&format!("doc-{d}")).unwrap();
            let s = LoroDoc::new();
            s.set_peer_id(LOCAL_PEER).unwrap();
            s
        })
        .collect();
    for round in 0..ROUNDS {
        // Three rounds in four on a hot third of the documents.
        let d = if round % 4 == 0 {
            (round * 7919) % DOCS
        } else {
            (round * 31) % (DOCS / 3)
        } as usize;
        let id = format!("doc-{d}");
        let entry = format!("l{round};");
        let local = |doc: &LoroDoc| {
            doc.set_peer_id(LOCAL_PEER).unwrap();
            let text = doc.get_text("local");
            text.insert(text.len_unicode(), &entry).unwrap();
        };
        store.edit(&id, local).unwrap();
        local(&shadows[d]);
        let peer = &peers[d];
        let before = peer.oplog_vv();
        peer.get_map("remote")
            .insert(&format!("r{round}"), round as i64)
            .unwrap();
        peer.commit();
        let update = peer.export(ExportMode::updates(&before)).unwrap();
        shadows[d].import(&update).unwrap();
        store.receive(&id, update).await.unwrap();
        if round % 100 == 99 {
            store.commit().await.unwrap();
        }
    }
    store.commit().await.unwrap();
    for (d, shadow) in shadows.iter_mut().enumerate() {
        let id = format!("doc-{d}");
        assert_eq!(store.value(&id).unwrap(), shadow.get_deep_value(), "{id}");
    }
    let stats = store.stats();
    assert!(
        stats.cache.evictions > 0,
        "the budget must evict: {stats:?}"
    );
    let crdt = crdt_figures(&gov);
    println!(
        "{stats:?}\nCrdt peak {} of {limit} B, forced {} B",
        crdt.peak, crdt.forced_bytes
    );
    assert_eq!(
        crdt.forced_bytes, 0,
        "bytes booked past the limit: {crdt:?}"
    );
    assert!(crdt.peak <= limit, "{crdt:?}");
}

/// Letters that do not compress, so a value's charge follows its length.
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// An edit that grows its document past what the engine can still grant (the rest is
/// pinned) is kept, and the document is persisted and dropped instead of being booked
/// past the limit; it reads back whole once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_outgrows_the_budget_is_persisted_not_overbooked() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * 1024 + 1024 * 1024;
    let gov = governor(limit);
    let store = DocStore::builder(gov.clone(), dir.path().join("docs.redb"))
        .store_cache_bytes(64 * 1024)
        .open()
        .unwrap();
    store.create("filler").unwrap();
    store.create("big").unwrap();
    for k in 0..3 {
        store
            .edit("filler", |d| {
                d.get_map("m")
                    .insert(&format!("v{k}"), noise(100 * 1024, k))
            })
            .unwrap()
            .unwrap();
    }
    store.pin("filler").unwrap();
    let held = gov.reserved(EngineId::Crdt);
    assert!(held > limit / 2, "the filler holds {held} of {limit} B");

    let value = noise(100 * 1024, 7);
    store
        .edit("big", |d| d.get_map("m").insert("v", value.clone()))
        .unwrap()
        .unwrap();
    assert!(
        !store.is_resident("big"),
        "no room for it: it must have been dropped"
    );
    let crdt = crdt_figures(&gov);
    assert_eq!(crdt.forced_bytes, 0, "booked past the limit: {crdt:?}");
    assert!(crdt.peak <= limit, "{crdt:?}");

    store.unpin("filler").unwrap();
    let read = store.value("big").unwrap();
    let got = read
        .as_map()
        .and_then(|m| m.get("m"))
        .and_then(|m| m.as_map())
        .and_then(|m| m.get("v"))
        .cloned();
    assert_eq!(got, Some(value.into()));
}
