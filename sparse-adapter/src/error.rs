//! The sparse index's errors: each says what was refused and why; none loses data.

use std::path::PathBuf;

use governed_blocks::{AppendRefusal, CacheError, FlushError};
use governor_core::MemError;

use crate::vector::{DocId, TermId};

/// Why a sparse index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    /// A vector was refused at the door (repeated term, non-finite weight, too many terms).
    #[error("invalid sparse vector: {reason}")]
    InvalidVector {
        /// What is wrong with it.
        reason: String,
    },
    /// The store file could not be opened: not a redb file, damaged, or unreadable.
    #[error("cannot open sparse store {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// redb's reason.
        #[source]
        source: redb::Error,
    },
    /// The store file is a redb file, but not one this crate wrote (or a newer format).
    #[error("sparse store {path} is not a sparse index: {reason}")]
    NotAnIndex {
        /// The file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// The store file is damaged: redb met a page it could not read (it panicked, and the
    /// panic was caught at this crate's boundary). The handle that met it refuses every
    /// later store operation with this error, since redb's state after a panic is unknown;
    /// other files and handles are unaffected.
    #[error("sparse store {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What redb reported.
        reason: String,
    },
    /// A stored posting block failed its length or checksum check.
    #[error("posting block {block} of term {term} is corrupt: {reason}")]
    CorruptBlock {
        /// Its term.
        term: TermId,
        /// Its number within the term.
        block: u32,
        /// What did not match.
        reason: String,
    },
    /// The store failed during a read or a write.
    #[error("sparse store: {0}")]
    Store(#[from] redb::Error),
    /// The read cache could not hold a block the query needs, even after evicting.
    #[error(transparent)]
    Cache(Box<CacheError>),
    /// An insert was refused for lack of memory; the document is not stored.
    #[error("document {doc} not inserted: {reason}")]
    Refused {
        /// The document.
        doc: DocId,
        /// Why.
        reason: Box<AppendRefusal>,
    },
    /// A flush could not write buffered postings; they stay buffered and searchable.
    #[error(transparent)]
    Flush(Box<FlushError>),
    /// The store's own page cache could not be reserved at open.
    #[error("no room for the store's page cache of {bytes} B: {source}")]
    NoRoomForStore {
        /// Its size.
        bytes: usize,
        /// The governor's refusal.
        #[source]
        source: MemError,
    },
    /// An invalid builder setting.
    #[error("invalid setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

governed_blocks::store_error_conversions!(SparseError);
