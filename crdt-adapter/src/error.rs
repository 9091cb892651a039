//! The document store's errors: each names the document and what was refused; none loses
//! an acknowledged update.

use std::path::PathBuf;

use governed_blocks::{AppendRefusal, CacheError, FlushError};
use governor_core::MemError;

/// Why a document store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CrdtError {
    /// A document id is empty or too long.
    #[error("invalid document id {id:?}: {reason}")]
    InvalidId {
        /// The id given (truncated to 64 bytes).
        id: String,
        /// Why.
        reason: &'static str,
    },
    /// No document with this id was created.
    #[error("unknown document {id:?}")]
    UnknownDocument {
        /// The id.
        id: String,
    },
    /// `create` of an id that exists.
    #[error("document {id:?} already exists")]
    DocumentExists {
        /// The id.
        id: String,
    },
    /// Update bytes that are not a loro update or snapshot, or fail its checksum. Nothing
    /// was buffered or applied.
    #[error("malformed update for document {id:?}: {source}")]
    MalformedUpdate {
        /// The document.
        id: String,
        /// loro's reason.
        #[source]
        source: loro::LoroError,
    },
    /// A stored snapshot or logged update of the document failed its checksum or did not
    /// decode.
    #[error("stored state of document {id:?} is corrupt: {reason}")]
    CorruptDocument {
        /// The document.
        id: String,
        /// What did not match.
        reason: String,
    },
    /// The store file could not be opened: not a redb file, damaged, or unreadable.
    #[error("cannot open document store {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// redb's reason.
        #[source]
        source: redb::Error,
    },
    /// The store file is a redb file, but not one this crate wrote.
    #[error("document store {path} is not ours: {reason}")]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// The store failed during a read or a write.
    #[error("document store: {0}")]
    Store(#[from] redb::Error),
    /// loro refused to export a document.
    #[error("exporting document {id:?}: {reason}")]
    Export {
        /// The document.
        id: String,
        /// loro's reason.
        reason: String,
    },
    /// No room for a document (even after evicting every other unpinned one).
    #[error(transparent)]
    Cache(Box<CacheError>),
    /// A remote update was refused for lack of memory; it is not buffered.
    #[error("update for document {id:?} not accepted: {reason}")]
    Refused {
        /// The document.
        id: String,
        /// Why.
        reason: Box<AppendRefusal>,
    },
    /// A flush could not log buffered updates; they stay buffered and readable.
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
}

governed_blocks::store_error_conversions!(CrdtError);
