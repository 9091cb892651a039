//! Damaged and foreign store files get typed errors naming the file, never a panic, and a
//! foreign file is refused without a byte written to it (issue 25, items 4 and 5).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use common::governor;
use governor_core::mib;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparse_adapter::{SparseError, SparseIndex, SparseVector};

/// Writes a committed index of 400 documents at `path` and closes it.
async fn write_index(path: &Path) {
    let index = SparseIndex::builder(governor(mib(16)), path)
        .open()
        .unwrap();
    for (d, v) in common::corpus(400, 7) {
        index.insert(d, v).await.unwrap();
    }
    index.commit().await.unwrap();
}

/// The typed errors a damaged file may give, each naming it where it can.
fn check_typed(e: &SparseError, path: &Path, case: &str) {
    match e {
        SparseError::Open { .. } | SparseError::NotAnIndex { .. } | SparseError::Damaged { .. } => {
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(
                e.to_string().contains(&*name),
                "{case}: {e} does not name the file"
            );
        }
        // Errors redb or the block checksum report without panicking are typed already.
        SparseError::Store(_) | SparseError::CorruptBlock { .. } => {}
        other => panic!("{case}: unexpected error kind: {other}"),
    }
}

/// Opens the damaged copy, runs searches and reads the figures; every failure typed.
fn exercise(path: &Path, case: &str) {
    let index = match SparseIndex::builder(governor(mib(16)), path).open() {
        Ok(index) => index,
        Err(e) => return check_typed(&e, path, case),
    };
    for t in [0, 1, 5, 40, 300, 1_000_123] {
        let q = SparseVector::new(vec![(t, 1.0), (t + 2, 0.5)]).unwrap();
        // Twice: a handle that met damage must refuse again, typed, not panic.
        for _ in 0..2 {
            if let Err(e) = index.search(&q, 10) {
                check_typed(&e, path, case);
            }
        }
    }
    if let Err(e) = index.stats() {
        check_typed(&e, path, case);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn flipped_bytes_are_typed_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.redb");
    write_index(&clean).await;
    let bytes = std::fs::read(&clean).unwrap();
    // A fixed seed: the same offsets on every run. Each case flips 16 bytes at one offset,
    // over the whole file (headers, tree pages, posting pages).
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
    // Losing nothing else: the clean file still opens and answers.
    let index = SparseIndex::builder(governor(mib(16)), &clean)
        .open()
        .unwrap();
    assert_eq!(index.stats().unwrap().stored_documents, 400);
}

/// A file with the CRDT document store's layout, written as that store writes it (older
/// files have no `kind`, newer ones `kind = "mgcrdtdb"`).
fn write_crdt_layout(path: &Path, kind: Option<u64>) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let mut meta = txn.open_table(meta).unwrap();
        meta.insert("format", 1).unwrap();
        if let Some(k) = kind {
            meta.insert("kind", k).unwrap();
        }
        let snaps: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("snapshots");
        txn.open_table(snaps)
            .unwrap()
            .insert("d", &[1u8, 2, 3][..])
            .unwrap();
        let ups: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("updates");
        txn.open_table(ups).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_crdt_store_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [
        ("old-crdt.redb", None),
        ("crdt.redb", Some(u64::from_be_bytes(*b"mgcrdtdb"))),
    ] {
        let path = dir.path().join(name);
        write_crdt_layout(&path, kind);
        let before = std::fs::read(&path).unwrap();
        let err = SparseIndex::builder(governor(mib(8)), &path)
            .open()
            .unwrap_err();
        assert!(
            matches!(err, SparseError::NotAnIndex { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
        assert!(
            std::fs::read(&path).unwrap() == before,
            "{name}: the refused file was written to"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_index_from_before_the_kind_marker_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    write_index(&path).await;
    // Take the marker out, as files written before it existed lack it.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            txn.open_table(meta).unwrap().remove("kind").unwrap();
        }
        txn.commit().unwrap();
    }
    let index = SparseIndex::builder(governor(mib(16)), &path)
        .open()
        .unwrap();
    assert_eq!(index.stats().unwrap().stored_documents, 400);
    let q = SparseVector::new(vec![(common::own_term(3), 1.0)]).unwrap();
    assert_eq!(index.search(&q, 1).unwrap()[0].doc, 3);
}
