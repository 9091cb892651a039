//! Damaged and foreign store files get typed errors, never a panic, and a foreign file is
//! refused without a byte written to it (issue 25, items 4 and 5).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use common::governor;
use crdt_adapter::{CrdtError, DocStore};
use governor_core::mib;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DOCS: usize = 12;

/// Writes a committed store of `DOCS` text documents at `path` and closes it.
async fn write_store(path: &Path) {
    let store = DocStore::builder(governor(mib(64)), path).open().unwrap();
    for d in 0..DOCS {
        let id = format!("doc-{d}");
        store.create(&id).unwrap();
        store
            .edit(&id, |doc| {
                let text = doc.get_text("t");
                for i in 0..200 {
                    text.insert(0, &format!("line {i} of {d}\n")).unwrap();
                }
            })
            .unwrap();
    }
    store.commit().await.unwrap();
}

fn check_typed(e: &CrdtError, path: &Path, case: &str) {
    match e {
        CrdtError::Open { .. } | CrdtError::NotAStore { .. } => {
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(
                e.to_string().contains(&*name),
                "{case}: {e} does not name the file"
            );
        }
        CrdtError::Store(_) | CrdtError::CorruptDocument { .. } => {}
        other => panic!("{case}: unexpected error kind: {other}"),
    }
}

fn exercise(path: &Path, case: &str) {
    let store = match DocStore::builder(governor(mib(64)), path).open() {
        Ok(store) => store,
        Err(e) => return check_typed(&e, path, case),
    };
    for d in 0..DOCS {
        let id = format!("doc-{d}");
        if let Err(e) = store.exists(&id) {
            check_typed(&e, path, case);
        }
        if let Err(e) = store.value(&id) {
            check_typed(&e, path, case);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn flipped_bytes_are_typed_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.redb");
    write_store(&clean).await;
    let bytes = std::fs::read(&clean).unwrap();
    let mut rng = StdRng::seed_from_u64(25);
    let mut offsets: Vec<usize> = (0..60).map(|_| rng.random_range(0..bytes.len())).collect();
    offsets.extend([0, 64, 512, 4096, 4096 + 8, 8192, 12288 + 100]);
    let mut panics = Vec::new();
    for (i, &at) in offsets.iter().enumerate() {
        if at >= bytes.len() {
            continue;
        }
        let path = dir.path().join(format!("damaged-{i}.redb"));
        let mut damaged = bytes.clone();
        for b in &mut damaged[at..(at + 16).min(bytes.len())] {
            *b ^= 0xA5;
        }
        std::fs::write(&path, &damaged).unwrap();
        let case = format!("16 bytes flipped at offset {at}");
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| exercise(&path, &case))) {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panics.push(format!("{case}: panicked: {msg}"));
        }
    }
    assert!(
        panics.is_empty(),
        "{} of {} cases panicked:\n{}",
        panics.len(),
        offsets.len(),
        panics.join("\n")
    );
    let store = DocStore::builder(governor(mib(64)), &clean).open().unwrap();
    assert!(store.value("doc-3").is_ok());
}

/// A file with the sparse index's layout (older files have no `kind`, newer ones
/// `kind = "mgsparse"`).
fn write_sparse_layout(path: &Path, kind: Option<u64>) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let mut meta = txn.open_table(meta).unwrap();
        meta.insert("format", 1).unwrap();
        meta.insert("documents", 1).unwrap();
        if let Some(k) = kind {
            meta.insert("kind", k).unwrap();
        }
        let postings: redb::TableDefinition<(u32, u32), &[u8]> =
            redb::TableDefinition::new("postings");
        txn.open_table(postings)
            .unwrap()
            .insert((1, 0), &[1u8, 2, 3][..])
            .unwrap();
        let terms: redb::TableDefinition<u32, u32> = redb::TableDefinition::new("terms");
        txn.open_table(terms).unwrap().insert(1, 1).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_sparse_index_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [
        ("old-sparse.redb", None),
        ("sparse.redb", Some(u64::from_be_bytes(*b"mgsparse"))),
    ] {
        let path = dir.path().join(name);
        write_sparse_layout(&path, kind);
        let before = std::fs::read(&path).unwrap();
        let err = DocStore::builder(governor(mib(8)), &path)
            .open()
            .unwrap_err();
        assert!(matches!(err, CrdtError::NotAStore { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
        assert!(
            std::fs::read(&path).unwrap() == before,
            "{name}: the refused file was written to"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_from_before_the_kind_marker_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    write_store(&path).await;
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            txn.open_table(meta).unwrap().remove("kind").unwrap();
        }
        txn.commit().unwrap();
    }
    let store = DocStore::builder(governor(mib(64)), &path).open().unwrap();
    assert!(store.value("doc-3").is_ok());
}
