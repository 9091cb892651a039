//! The redb file: each document's latest snapshot and the log of updates after it.
//!
//! Tables: `snapshots: id → [crc32 LE][snapshot]`, `updates: (id, seq) → [crc32 LE][update]`,
//! `meta: name → u64` (`format`, `next_seq`). A document's stored state is its snapshot
//! plus every logged update (imports are idempotent, so an update both in the snapshot and
//! in the log is harmless). Every write is one transaction with redb's default immediate
//! durability.

use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError,
};

use crate::error::CrdtError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const UPDATES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("updates");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u64 = 1;

/// A document as stored, copied out of the store (transient).
pub(crate) struct Stored {
    pub(crate) snapshot: Vec<u8>,
    /// Logged updates, oldest first, with their sequence numbers.
    pub(crate) log: Vec<(u64, Vec<u8>)>,
}

impl Stored {
    pub(crate) fn encoded_bytes(&self) -> usize {
        self.log
            .iter()
            .fold(self.snapshot.len(), |n, (_, u)| n.saturating_add(u.len()))
    }
}

fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

fn unseal<'a>(id: &str, what: &str, raw: &'a [u8]) -> Result<&'a [u8], CrdtError> {
    let corrupt = |reason: String| CrdtError::CorruptDocument {
        id: id.to_owned(),
        reason,
    };
    if raw.len() < 4 {
        return Err(corrupt(format!("{what}: {} bytes, no checksum", raw.len())));
    }
    let (crc, body) = raw.split_at(4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(body)
}

/// Opens or creates the store with a page cache of `cache_bytes`, and checks it is ours.
pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<Database, CrdtError> {
    let open_err = |source: redb::Error| CrdtError::Open {
        path: path.to_owned(),
        source,
    };
    let not_ours = |e: &TableError| CrdtError::NotAStore {
        path: path.to_owned(),
        reason: format!("a table has other types: {e}"),
    };
    let table_err = |e: TableError| match e {
        TableError::TableTypeMismatch { .. } => not_ours(&e),
        e => open_err(e.into()),
    };
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| open_err(e.into()))?;
    let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
    {
        let mut meta = txn.open_table(META).map_err(table_err)?;
        let format = meta
            .get("format")
            .map_err(|e| open_err(e.into()))?
            .map(|g| g.value());
        match format {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(CrdtError::NotAStore {
                    path: path.to_owned(),
                    reason: format!("format {other}, this build reads {FORMAT}"),
                });
            }
            None => {
                meta.insert("format", FORMAT)
                    .map_err(|e| open_err(e.into()))?;
            }
        }
        txn.open_table(SNAPSHOTS).map_err(table_err)?;
        txn.open_table(UPDATES).map_err(table_err)?;
    }
    txn.commit().map_err(|e| open_err(e.into()))?;
    Ok(db)
}

/// True when `id` has a stored snapshot.
pub(crate) fn exists(db: &Database, id: &str) -> Result<bool, CrdtError> {
    let txn = db.begin_read()?;
    Ok(txn.open_table(SNAPSHOTS)?.get(id)?.is_some())
}

/// The stored snapshot and log of `id`, checksums verified; `None` if it was never created.
pub(crate) fn read(txn: &ReadTransaction, id: &str) -> Result<Option<Stored>, CrdtError> {
    let snapshots = txn.open_table(SNAPSHOTS)?;
    let Some(raw) = snapshots.get(id)? else {
        return Ok(None);
    };
    let snapshot = unseal(id, "snapshot", raw.value())?.to_vec();
    let updates = txn.open_table(UPDATES)?;
    let mut log = Vec::new();
    for entry in updates.range((id, 0)..=(id, u64::MAX))? {
        let (k, v) = entry?;
        let seq = k.value().1;
        log.push((seq, unseal(id, "logged update", v.value())?.to_vec()));
    }
    Ok(Some(Stored { snapshot, log }))
}

/// Stores a new document's first snapshot; false if it already exists.
pub(crate) fn create(db: &Database, id: &str, snapshot: &[u8]) -> Result<bool, CrdtError> {
    let txn = db.begin_write()?;
    {
        let mut snapshots = txn.open_table(SNAPSHOTS)?;
        if snapshots.get(id)?.is_some() {
            return Ok(false);
        }
        snapshots.insert(id, seal(snapshot).as_slice())?;
    }
    txn.commit()?;
    Ok(true)
}

/// Appends updates to their documents' logs in one transaction; returns each one's
/// sequence number, in order.
pub(crate) fn append_log<'a>(
    db: &Database,
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<u64>, CrdtError> {
    let txn = db.begin_write()?;
    let mut seqs = Vec::new();
    {
        let mut meta = txn.open_table(META)?;
        let mut updates = txn.open_table(UPDATES)?;
        let mut next = meta.get("next_seq")?.map_or(1, |g| g.value());
        for (id, bytes) in entries {
            updates.insert((id, next), seal(bytes).as_slice())?;
            seqs.push(next);
            next += 1;
        }
        meta.insert("next_seq", next)?;
    }
    txn.commit()?;
    Ok(seqs)
}

/// Replaces `id`'s snapshot and drops the logged updates it covers: those with sequence
/// numbers up to `covered_through`, or none when `keep_log` (the document holds updates
/// it could not apply yet, which the snapshot does not contain).
pub(crate) fn write_snapshot(
    db: &Database,
    id: &str,
    snapshot: &[u8],
    covered_through: u64,
    keep_log: bool,
) -> Result<(), CrdtError> {
    let txn = db.begin_write()?;
    {
        let mut snapshots = txn.open_table(SNAPSHOTS)?;
        snapshots.insert(id, seal(snapshot).as_slice())?;
        if !keep_log && covered_through > 0 {
            let mut updates = txn.open_table(UPDATES)?;
            updates.retain_in((id, 0)..=(id, covered_through), |_, _| false)?;
        }
    }
    txn.commit()?;
    Ok(())
}
