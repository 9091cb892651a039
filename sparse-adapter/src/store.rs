//! The redb file: posting blocks, the per-term block count, and a format marker.
//!
//! Tables: `postings: (term, block) → block bytes` (see [`crate::block`]), `terms: term →
//! number of blocks`, `meta: name → u64` (`format`, `kind` = `mgsparse` as big-endian bytes, `documents`). A flush appends to the
//! last, partial block of each term it touches and starts new blocks after it, all in one
//! transaction committed with redb's default (immediate, fsynced) durability.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError, TableHandle};

use crate::block::{self, BLOCK_POSTINGS, Posting, PostingBlock};
use crate::error::SparseError;
use crate::vector::TermId;

pub(crate) const POSTINGS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("postings");
pub(crate) const TERMS: TableDefinition<u32, u32> = TableDefinition::new("terms");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the layout above.
const FORMAT: u64 = 1;

/// `meta.kind`: which store a file is, so that the CRDT store (which also writes a `meta`
/// table with `format = 1`) and this index refuse each other's files instead of adding
/// their tables to them. The bytes spell `mgsparse`.
const KIND: u64 = u64::from_be_bytes(*b"mgsparse");

/// The tables a sparse index has always created at open: a file with `format = 1`, no
/// `kind` and all of these was written before `kind` existed and is upgraded.
const OWN_TABLES: [&str; 3] = ["postings", "terms", "meta"];

/// The redb database of one store file, behind a fuse.
///
/// redb panics on some damaged pages (`Invalid page type byte …`, a slice index out of
/// range) instead of returning an error. Every store operation runs through
/// [`Store::guard`], which catches such a panic, reports [`SparseError::Damaged`] naming
/// the file, and blows the fuse: redb's state after a panic mid-operation is unknown, so
/// this handle refuses every later operation with the same typed error rather than risk
/// a second panic or a wrong answer. Other handles and files are untouched.
pub(crate) struct Store {
    db: Database,
    path: PathBuf,
    /// Set by the first caught panic; never cleared.
    damaged: AtomicBool,
}

impl Store {
    /// Runs `f` on the database unless the fuse is blown; a panic inside it becomes
    /// [`SparseError::Damaged`] and blows the fuse.
    pub(crate) fn guard<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, SparseError>,
    ) -> Result<T, SparseError> {
        if self.damaged.load(Ordering::Acquire) {
            return Err(self.damaged_err(
                "an earlier operation met damage; reopen the file after repairing it".to_owned(),
            ));
        }
        catch(|| f(&self.db)).unwrap_or_else(|reason| {
            self.damaged.store(true, Ordering::Release);
            Err(self.damaged_err(reason))
        })
    }

    fn damaged_err(&self, reason: String) -> SparseError {
        SparseError::Damaged {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Runs `f`, turning a panic into its message. `AssertUnwindSafe` is sound here because
/// whatever `f` touched is either dropped by the unwind (transactions, tables) or fenced
/// off by the caller (the [`Store`] fuse; a failed open keeps nothing).
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
/// The check runs in a read transaction, so a file that is not ours (a CRDT store, another
/// program's redb file) is refused without a byte written to it. A panic from redb on a
/// damaged file is [`SparseError::Damaged`].
pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<Store, SparseError> {
    let db = catch(|| open_checked(path, cache_bytes)).unwrap_or_else(|reason| {
        Err(SparseError::Damaged {
            path: path.to_owned(),
            reason,
        })
    })?;
    Ok(Store {
        db,
        path: path.to_owned(),
        damaged: AtomicBool::new(false),
    })
}

fn open_checked(path: &Path, cache_bytes: usize) -> Result<Database, SparseError> {
    let open_err = |source: redb::Error| SparseError::Open {
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
            txn.open_table(POSTINGS)
                .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
            txn.open_table(TERMS)
                .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
        }
        txn.commit().map_err(|e| open_err(e.into()))?;
    }
    Ok(db)
}

/// The read-only look at a file: new, ours, ours from before `kind`, or an error.
fn look(db: &impl ReadableDatabase, path: &Path) -> Result<Found, SparseError> {
    let open_err = |source: redb::Error| SparseError::Open {
        path: path.to_owned(),
        source,
    };
    let not_ours = |reason: String| SparseError::NotAnIndex {
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
                        "its kind is {spelt:?}, a sparse index's is \"mgsparse\""
                    )));
                }
                (Some(FORMAT), None) => {
                    return Err(not_ours(format!(
                        "no kind marker and not the tables of a sparse index (tables: {tables:?})"
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

fn type_err(path: &Path, e: &TableError) -> Option<SparseError> {
    matches!(e, TableError::TableTypeMismatch { .. }).then(|| SparseError::NotAnIndex {
        path: path.to_owned(),
        reason: format!("a table has other types: {e}"),
    })
}

/// Documents stored so far.
pub(crate) fn documents(db: &Database) -> Result<u64, SparseError> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    Ok(meta.get("documents")?.map_or(0, |g| g.value()))
}

/// Appends postings (grouped by term, each group in insertion order) for `docs` new
/// documents in one durable transaction. Returns the blocks whose stored content changed
/// (to drop from the cache).
pub(crate) fn append(
    db: &Database,
    by_term: &BTreeMap<TermId, Vec<Posting>>,
    docs: u64,
) -> Result<Vec<(TermId, u32)>, SparseError> {
    let txn = db.begin_write()?;
    let mut changed = Vec::new();
    {
        let mut terms = txn.open_table(TERMS)?;
        let mut postings = txn.open_table(POSTINGS)?;
        let mut meta = txn.open_table(META)?;
        for (&term, new) in by_term {
            let blocks = terms.get(term)?.map_or(0, |g| g.value());
            let mut rest = &new[..];
            let mut next = blocks;
            if blocks > 0 {
                let last = blocks - 1;
                let raw = postings
                    .get((term, last))?
                    .ok_or_else(|| SparseError::CorruptBlock {
                        term,
                        block: last,
                        reason: "listed in the term table but missing".to_owned(),
                    })?;
                let old = PostingBlock::decode(term, last, raw.value())?;
                drop(raw);
                if old.postings().len() < BLOCK_POSTINGS {
                    let take = (BLOCK_POSTINGS - old.postings().len()).min(rest.len());
                    let mut merged = old.postings().to_vec();
                    merged.extend_from_slice(&rest[..take]);
                    postings.insert((term, last), block::encode(&merged).as_slice())?;
                    changed.push((term, last));
                    rest = &rest[take..];
                }
            }
            for chunk in rest.chunks(BLOCK_POSTINGS) {
                postings.insert((term, next), block::encode(chunk).as_slice())?;
                next += 1;
            }
            terms.insert(term, next)?;
        }
        let before = meta.get("documents")?.map_or(0, |g| g.value());
        meta.insert("documents", before.saturating_add(docs))?;
    }
    txn.commit()?;
    Ok(changed)
}
