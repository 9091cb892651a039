//! Typed errors of the blocks: each names the block, the engine, what was asked and what
//! stood in the way.

use std::time::Duration;

use governor_core::{EngineId, MemError, PressureLevel};

/// A failure of an eviction hook or a batch sink, in its own words.
///
/// Hooks and sinks are written by the adapters (persist a document, merge postings into a
/// store); the blocks only need to know that it failed and why, to keep the data and say so.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PersistError {
    /// What went wrong.
    pub message: String,
    /// The underlying error, when there is one.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl PersistError {
    /// A failure described by `message` alone.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A failure caused by `source`.
    pub fn new(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Why a [`GovernedCache`](crate::GovernedCache) operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The entry's bytes could not be reserved even after evicting every unpinned entry
    /// that was not in use. Nothing was loaded or changed.
    #[error(
        "cache {cache}: {needed} B for an entry do not fit the {engine} budget \
         ({available} B free, {resident} B resident in this cache of which {pinned} B pinned): {source}"
    )]
    NoRoom {
        /// The cache's name.
        cache: String,
        /// Its engine.
        engine: EngineId,
        /// Bytes asked for.
        needed: usize,
        /// Bytes the engine had free at the last try.
        available: usize,
        /// Bytes this cache held at the last try.
        resident: usize,
        /// Bytes of those that are pinned.
        pinned: usize,
        /// The governor's last refusal.
        #[source]
        source: Box<MemError>,
    },
    /// The key has no resident entry.
    #[error("cache {cache}: no resident entry for this key")]
    NotResident {
        /// The cache's name.
        cache: String,
    },
    /// The entry is pinned; unpin it before evicting it.
    #[error("cache {cache}: the entry is pinned")]
    Pinned {
        /// The cache's name.
        cache: String,
    },
    /// The entry is in use (a caller still holds its value) or is being loaded.
    #[error("cache {cache}: the entry is in use")]
    Busy {
        /// The cache's name.
        cache: String,
    },
    /// The eviction hook refused (e.g. persisting the entry failed); the entry stays resident.
    #[error("cache {cache}: eviction hook failed, entry kept: {source}")]
    Hook {
        /// The cache's name.
        cache: String,
        /// The hook's failure.
        #[source]
        source: PersistError,
    },
    /// The caller's byte figure overflowed once the entry's overhead was added.
    #[error("cache {cache}: entry size {bytes} B overflows")]
    TooLarge {
        /// The cache's name.
        cache: String,
        /// The figure given.
        bytes: usize,
    },
    /// A pressure watcher needs a Tokio runtime.
    #[error("no Tokio runtime to run the pressure watcher on")]
    NoRuntime,
    /// An invalid builder setting.
    #[error("invalid setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Why an append to a [`GovernedWriteBuffer`](crate::GovernedWriteBuffer) was refused. The
/// item comes back with the error: nothing is stored, nothing is lost.
#[derive(Debug, thiserror::Error)]
#[error("write buffer {buffer}: {reason}")]
pub struct AppendError<T> {
    /// The buffer's name.
    pub buffer: String,
    /// Why.
    pub reason: AppendRefusal,
    /// The item, untouched.
    pub item: T,
}

/// What stopped an append.
#[derive(Debug, thiserror::Error)]
pub enum AppendRefusal {
    /// No memory within the wait: the engine stayed at Critical pressure, or the budget
    /// stayed full although the buffer flushed.
    #[error(
        "throttled after {waited:?} at {engine} pressure {pressure:?} ({needed} B needed){}",
        cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    Throttled {
        /// The engine.
        engine: EngineId,
        /// Bytes the item needed.
        needed: usize,
        /// How long the append waited.
        waited: Duration,
        /// The engine's pressure when it gave up.
        pressure: PressureLevel,
        /// The governor's last refusal, when it was asked.
        cause: Option<Box<MemError>>,
    },
    /// The item can never fit: it is larger than the engine's limit.
    #[error("an item of {needed} B exceeds the {engine} limit of {limit} B")]
    TooLarge {
        /// The engine.
        engine: EngineId,
        /// Bytes the item needs.
        needed: usize,
        /// The engine's limit.
        limit: usize,
    },
    /// The buffer is closed.
    #[error("closed")]
    Closed,
}

/// A flush that did not make its batch durable. The batch stays in the buffer, readable,
/// and is written first by the next flush.
#[derive(Debug, thiserror::Error)]
#[error(
    "write buffer {buffer}: flush of {items} items ({bytes} B) failed, kept for retry: {source}"
)]
pub struct FlushError {
    /// The buffer's name.
    pub buffer: String,
    /// Items in the batch that failed.
    pub items: usize,
    /// Bytes they hold.
    pub bytes: usize,
    /// The sink's failure.
    #[source]
    pub source: PersistError,
}
