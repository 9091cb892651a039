//! The redb file: posting blocks, the per-term block count, and a format marker.
//!
//! Tables: `postings: (term, block) → block bytes` (see [`crate::block`]), `terms: term →
//! number of blocks`, `meta: name → u64` (`format`, `documents`). A flush appends to the
//! last, partial block of each term it touches and starts new blocks after it, all in one
//! transaction committed with redb's default (immediate, fsynced) durability.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::block::{self, BLOCK_POSTINGS, Posting, PostingBlock};
use crate::error::SparseError;
use crate::vector::TermId;

pub(crate) const POSTINGS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("postings");
pub(crate) const TERMS: TableDefinition<u32, u32> = TableDefinition::new("terms");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the layout above.
const FORMAT: u64 = 1;

/// Opens or creates the store with a page cache of `cache_bytes`, and checks it is ours.
pub(crate) fn open(path: &Path, cache_bytes: usize) -> Result<Database, SparseError> {
    let open_err = |source: redb::Error| SparseError::Open {
        path: path.to_owned(),
        source,
    };
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| open_err(e.into()))?;
    let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| match e {
            TableError::TableTypeMismatch { .. } => SparseError::NotAnIndex {
                path: path.to_owned(),
                reason: format!("its meta table has other types: {e}"),
            },
            e => open_err(e.into()),
        })?;
        let format = meta
            .get("format")
            .map_err(|e| open_err(e.into()))?
            .map(|g| g.value());
        match format {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(SparseError::NotAnIndex {
                    path: path.to_owned(),
                    reason: format!("format {other}, this build reads {FORMAT}"),
                });
            }
            None => {
                meta.insert("format", FORMAT)
                    .map_err(|e| open_err(e.into()))?;
            }
        }
        // Create the other tables now so readers never meet a missing one.
        txn.open_table(POSTINGS)
            .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
        txn.open_table(TERMS)
            .map_err(|e| type_err(path, &e).unwrap_or_else(|| open_err(e.into())))?;
    }
    txn.commit().map_err(|e| open_err(e.into()))?;
    Ok(db)
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
