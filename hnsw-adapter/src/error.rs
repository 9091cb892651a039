//! The adapter's one error type: every refusal says which segment, how many bytes, and what
//! the caller can do about it.

use std::path::PathBuf;

use governor_core::MemError;

use crate::segment::SegmentId;

/// Why an index or cache operation was refused.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum HnswError {
    /// An insert could not reserve the bytes its point will take, even after evicting every
    /// cold segment the cache could. Back off and retry, or raise the Vector budget.
    #[error(
        "vector insert into {segment} refused (backpressure): it needs {needed} bytes and the \
         Vector engine cannot give them ({source}); retry after searches/evictions free memory, \
         or raise the Vector budget"
    )]
    Backpressure {
        /// Segment the insert was for.
        segment: SegmentId,
        /// Bytes the insert had to reserve first.
        needed: usize,
        /// The governor's refusal.
        #[source]
        source: MemError,
    },
    /// A segment could not be loaded (or created) without going over the Vector budget: what
    /// is resident is pinned or busy, and what is free is not enough.
    #[error(
        "cannot make {segment} resident: loading it needs {needed} bytes, the Vector engine \
         has {available} free and {pinned} bytes are pinned by hot segments ({source}); \
         unpin a segment or raise the Vector budget"
    )]
    NoRoom {
        /// Segment that could not be loaded.
        segment: SegmentId,
        /// Bytes the load had to reserve (resident size plus the loader's peak).
        needed: usize,
        /// Bytes the governor could still grant when we gave up.
        available: usize,
        /// Bytes held by pinned segments, which loads never evict.
        pinned: usize,
        /// The governor's last refusal.
        #[source]
        source: MemError,
    },
    /// No segment with this id is known to the cache.
    #[error("unknown vector segment {0}; create it with HnswCache::create_segment first")]
    UnknownSegment(SegmentId),
    /// `create_segment` for an id that already exists.
    #[error("vector segment {0} already exists")]
    SegmentExists(SegmentId),
    /// A vector of the wrong length.
    #[error("vector of dimension {got} given to {segment}, which holds dimension {expected}")]
    DimensionMismatch {
        /// Segment (or query target).
        segment: SegmentId,
        /// The index's dimension.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A vector with a NaN or infinite component (HNSW's distance ordering panics on NaN).
    #[error("vector for {segment} has a non-finite value at position {position}")]
    NonFinite {
        /// Segment (or query target).
        segment: SegmentId,
        /// First bad component.
        position: usize,
    },
    /// An invalid parameter or name, named with its fix.
    #[error("invalid HNSW setting {field}: {reason}")]
    InvalidConfig {
        /// The setting.
        field: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A dump on disk fails its checksum or cannot be parsed: it is not loaded.
    #[error("segment {segment} on disk at {path} is corrupt: {reason}")]
    Corrupt {
        /// Segment whose files are bad.
        segment: SegmentId,
        /// File that failed.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Reading or writing segment files failed.
    #[error("I/O on {path} failed: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `hnsw_rs` failed to dump a segment.
    #[error("dumping segment {segment} failed: {reason}")]
    Dump {
        /// Segment being persisted.
        segment: SegmentId,
        /// The library's message.
        reason: String,
    },
    /// A governor call failed outside the cases above (e.g. `Vector` has no budget).
    #[error(transparent)]
    Governor(#[from] MemError),
    /// The pressure watcher needs a Tokio runtime.
    #[error("HnswCache::spawn_pressure_watcher must be called inside a Tokio runtime")]
    NoRuntime,
}

impl HnswError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// True for the two "not enough Vector memory right now" errors: the caller may retry
    /// later, nothing is wrong with the data.
    pub fn is_backpressure(&self) -> bool {
        matches!(self, Self::Backpressure { .. } | Self::NoRoom { .. })
    }
}
