//! The redb file: each document's latest snapshot and the log of updates after it.
//!
//! Tables: `snapshots: id → [crc32 LE][snapshot]`, `updates: (id, seq) → [crc32 LE][update]`,
//! `meta: name → u64` (`format`, `kind` = `mgcrdtdb` as big-endian bytes, `next_seq`). A document's stored state is its snapshot
//! plus every logged update (imports are idempotent, so an update both in the snapshot and
//! in the log is harmless). Every write is one transaction with redb's default immediate
//! durability.

use std::panic::AssertUnwindSafe;
use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError,
    TableHandle,
};

use crate::error::CrdtError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const UPDATES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("updates");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const FORMAT: u64 = 1;

/// `meta.kind`: which store a file is, so that the sparse index (which also writes a `meta`
/// table with `format = 1`) and this store refuse each other's files instead of adding
/// their tables to them. The bytes spell `mgcrdtdb`.
const KIND: u64 = u64::from_be_bytes(*b"mgcrdtdb");

/// The tables a document store has always created at open: a file with `format = 1`, no
/// `kind` and all of these was written before `kind` existed and is upgraded.
const OWN_TABLES: [&str; 3] = ["snapshots", "updates", "meta"];

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

/// Runs `f`, turning a panic into its message.
///
/// redb panics on some damaged pages (`Invalid page type byte …`, a slice index out of
/// range) instead of returning an error; every function of this module runs its redb
/// calls through this, so a damaged file is a typed error, never a panic. `AssertUnwindSafe`:
/// what `f` touched (transactions, tables) is dropped by the unwind, and a failed open keeps
/// nothing. (The sparse index also fences the handle off after a caught panic; here the
/// handle is owned by `docs.rs`, so a later call on the same damaged file meets the same
/// typed error again, or a fresh one.)
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "redb panicked".to_owned());
        format!("redb panicked reading it: {msg}")
    })
}

/// What the read-only look at a file found.
#[derive(PartialEq)]
enum Found {
    /// No tables at all: a new file, initialised now.
    New,
    /// Written before `meta.kind` existed; `kind` is added now.
    Unmarked,
    /// Ours, marked.
    Ours,
}

/// Opens or creates the store with a page cache of `cache_bytes`, and checks it is ours.
///
/// The check runs in a read transaction, so a file that is not ours (a sparse index, another
/// program's redb file) is refused without a byte written to it. A panic from redb on a
/// damaged file is [`CrdtError::Open`] with redb's `Corrupted`.
pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<Database, CrdtError> {
    catch(|| open_checked(path, cache_bytes)).unwrap_or_else(|reason| Err(damaged(path, reason)))
}

fn open_checked(path: &Path, cache_bytes: usize) -> Result<Database, CrdtError> {
    let open_err = |source: redb::Error| CrdtError::Open {
        path: path.to_owned(),
        source,
    };
    // Look through a read-only handle first: a read-write open writes to the file's header
    // even when nothing is committed, and a foreign file must stay byte for byte as it was.
    // A file the read-only open cannot read (one that needs redb's repair after a crash)
    // is looked at after the read-write open instead.
    let exists = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    let early = if exists {
        match Database::builder().open_read_only(path) {
            Ok(ro) => Some(look(&ro, path)?),
            Err(_) => None,
        }
    } else {
        Some(Found::New)
    };
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| open_err(e.into()))?;
    let found = match early {
        Some(found) => found,
        None => look(&db, path)?,
    };
    if found != Found::Ours {
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
            meta.insert("format", FORMAT)
                .map_err(|e| open_err(e.into()))?;
            meta.insert("kind", KIND).map_err(|e| open_err(e.into()))?;
            // Create the other tables now so readers never meet a missing one.
            txn.open_table(SNAPSHOTS)
                .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
            txn.open_table(UPDATES)
                .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
        }
        txn.commit().map_err(|e| open_err(e.into()))?;
    }
    Ok(db)
}

/// redb's panic on a damaged file, as the typed error the docs promise for a damaged file:
/// [`CrdtError::Open`] naming the file, with redb's `Corrupted` as its source.
fn damaged(path: &Path, reason: String) -> CrdtError {
    CrdtError::Open {
        path: path.to_owned(),
        source: redb::Error::Corrupted(reason),
    }
}

/// The read-only look at a file: new, ours, ours from before `kind`, or an error.
fn look(db: &impl ReadableDatabase, path: &Path) -> Result<Found, CrdtError> {
    let open_err = |source: redb::Error| CrdtError::Open {
        path: path.to_owned(),
        source,
    };
    let not_ours = |reason: String| CrdtError::NotAStore {
        path: path.to_owned(),
        reason,
    };
    Ok({
        let txn = db.begin_read().map_err(|e| open_err(e.into()))?;
        let tables: Vec<String> = txn
            .list_tables()
            .map_err(|e| open_err(e.into()))?
            .map(|t| t.name().to_owned())
            .collect();
        if tables.is_empty() {
            Found::New
        } else {
            let meta = match txn.open_table(META) {
                Ok(meta) => meta,
                Err(TableError::TableDoesNotExist(_)) => {
                    return Err(not_ours(format!(
                        "it has no meta table (tables: {tables:?})"
                    )));
                }
                Err(e) => return Err(type_err(path, &e).unwrap_or_else(|| open_err(e.into()))),
            };
            let get = |key: &str| {
                meta.get(key)
                    .map(|g| g.map(|g| g.value()))
                    .map_err(|e| open_err(e.into()))
            };
            match (get("format")?, get("kind")?) {
                (Some(FORMAT), Some(KIND)) => Found::Ours,
                (Some(FORMAT), None)
                    if OWN_TABLES.iter().all(|t| tables.iter().any(|n| n == t)) =>
                {
                    Found::Unmarked
                }
                (Some(FORMAT), Some(kind)) => {
                    let spelt = String::from_utf8_lossy(&kind.to_be_bytes()).into_owned();
                    return Err(not_ours(format!(
                        "its kind is {spelt:?}, a document store's is \"mgcrdtdb\""
                    )));
                }
                (Some(FORMAT), None) => {
                    return Err(not_ours(format!(
                        "no kind marker and not the tables of a document store (tables: {tables:?})"
                    )));
                }
                (Some(other), _) => {
                    return Err(not_ours(format!(
                        "format {other}, this build reads {FORMAT}"
                    )));
                }
                (None, _) => return Err(not_ours("its meta table has no format".to_owned())),
            }
        }
    })
}

fn type_err(path: &Path, e: &TableError) -> Option<CrdtError> {
    matches!(e, TableError::TableTypeMismatch { .. }).then(|| CrdtError::NotAStore {
        path: path.to_owned(),
        reason: format!("a table has other types: {e}"),
    })
}

/// True when `id` has a stored snapshot.
pub(crate) fn exists(db: &Database, id: &str) -> Result<bool, CrdtError> {
    catch(|| {
        let txn = db.begin_read()?;
        Ok(txn.open_table(SNAPSHOTS)?.get(id)?.is_some())
    })
    .unwrap_or_else(|reason| Err(redb::Error::Corrupted(reason).into()))
}

/// The stored snapshot and log of `id`, checksums verified; `None` if it was never created.
pub(crate) fn read(txn: &ReadTransaction, id: &str) -> Result<Option<Stored>, CrdtError> {
    catch(|| {
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
    })
    .unwrap_or_else(|reason| {
        Err(CrdtError::CorruptDocument {
            id: id.to_owned(),
            reason: format!("the store file is damaged: {reason}"),
        })
    })
}

/// Stores a new document's first snapshot; false if it already exists.
pub(crate) fn create(db: &Database, id: &str, snapshot: &[u8]) -> Result<bool, CrdtError> {
    catch(|| {
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
    })
    .unwrap_or_else(|reason| Err(redb::Error::Corrupted(reason).into()))
}

/// Appends updates to their documents' logs in one transaction; returns each one's
/// sequence number, in order.
pub(crate) fn append_log<'a>(
    db: &Database,
    entries: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<u64>, CrdtError> {
    catch(|| {
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
    })
    .unwrap_or_else(|reason| Err(redb::Error::Corrupted(reason).into()))
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
    catch(|| {
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
    })
    .unwrap_or_else(|reason| Err(redb::Error::Corrupted(reason).into()))
}
