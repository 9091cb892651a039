//! Typed errors. Each names the series or file involved and, for ingest, exactly which points
//! were stored, so a caller can retry the rest without guessing.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use governor_core::{MemError, PressureLevel};

use crate::SeriesId;
use crate::gorilla::DecodeError;

/// Why a batch of points was not (fully) stored. Points before index [`IngestError::accepted`]
/// are stored; the points from that index on are **not** stored and belong to the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// Memory stayed short for longer than the configured ingest wait.
    #[error(
        "ingest throttled for series {series}: stored {accepted} points of the batch; the points \
         from index {accepted} on were NOT stored (retry them later). Waited {waited:?} for \
         timeseries memory at {pressure:?} pressure{}",
        cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    Throttled {
        /// The series being appended to.
        series: SeriesId,
        /// Points of the batch that were stored (a prefix).
        accepted: usize,
        /// How long ingest waited before giving up.
        waited: Duration,
        /// The Timeseries engine's pressure when it gave up.
        pressure: PressureLevel,
        /// The governor's last answer, when a reservation was refused.
        cause: Option<MemError>,
    },
    /// A timestamp did not increase within the series' in-memory block.
    #[error(
        "out-of-order point for series {series} at batch index {accepted}: timestamp {got} is not \
         after {last}; the points from index {accepted} on were NOT stored"
    )]
    OutOfOrder {
        /// The series.
        series: SeriesId,
        /// Points of the batch that were stored (a prefix).
        accepted: usize,
        /// The series' last stored timestamp.
        last: i64,
        /// The rejected timestamp.
        got: i64,
    },
    /// The adapter is shutting down.
    #[error("timeseries adapter is closed; the points from index {accepted} on were NOT stored")]
    Closed {
        /// Points of the batch that were stored (a prefix).
        accepted: usize,
    },
}

impl IngestError {
    /// Points of the batch that were stored; `batch[accepted..]` was not.
    pub fn accepted(&self) -> usize {
        match self {
            Self::Throttled { accepted, .. }
            | Self::OutOfOrder { accepted, .. }
            | Self::Closed { accepted } => *accepted,
        }
    }
}

/// A segment could not be written durably. The memtable keeps the data and retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The file system refused (disk full, I/O error, permissions…).
    #[error("writing segment {path:?} failed: {source}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A custom flusher failed for another reason.
    #[error("segment flush failed: {0}")]
    Other(String),
}

/// A segment on disk cannot be trusted or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// Reading the file failed.
    #[error("reading segment {path:?} failed: {source}")]
    Io {
        /// The segment file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter or longer than its header says: a torn write or a truncation.
    #[error("segment {path:?} is torn: {len} bytes on disk, the header/footer imply {expected}")]
    Torn {
        /// The segment file.
        path: PathBuf,
        /// Bytes on disk.
        len: u64,
        /// Bytes the format requires.
        expected: u64,
    },
    /// A checksum does not match: the bytes changed after they were written.
    #[error(
        "segment {path:?}: checksum mismatch in {region} (stored {stored:#010x}, computed {computed:#010x})"
    )]
    Checksum {
        /// The segment file.
        path: PathBuf,
        /// Which part failed (`header`, `file`, `block of series N`).
        region: String,
        /// Checksum stored in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The header or directory is not a segment this version can read.
    #[error("segment {path:?} is not a valid segment: {reason}")]
    Format {
        /// The segment file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A block passed its checksum but does not decode.
    #[error("segment {path:?}: block of series {series} does not decode: {source}")]
    Decode {
        /// The segment file.
        path: PathBuf,
        /// The series whose block failed.
        series: SeriesId,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
}

/// A query could not return every point it should.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A flushed segment could not be read or verified.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// An in-memory block does not decode (a bug; reported rather than returning partial data).
    #[error("in-memory block of series {series} does not decode: {source}")]
    Memtable {
        /// The series.
        series: SeriesId,
        /// The decoder's error.
        #[source]
        source: DecodeError,
    },
}

/// The adapter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The segment store could not be listed.
    #[error("opening the segment store failed: {0}")]
    Store(#[source] SegmentError),
    /// A setting is out of range.
    #[error("invalid timeseries adapter setting `{field}`: {reason}")]
    InvalidConfig {
        /// The builder method at fault.
        field: &'static str,
        /// What to change.
        reason: String,
    },
    /// The store holds a segment numbered `u64::MAX`: no id is left for a new segment (ids
    /// are never reused, so that no new segment can take a quarantined one's name).
    #[error(
        "segment ids exhausted: the store holds id {highest}; move its segments to a new store"
    )]
    SegmentIdsExhausted {
        /// The highest id found in the store.
        highest: u64,
    },
    /// `open` must be called inside a tokio runtime (it spawns the flush worker).
    #[error("TimeseriesAdapter::open must run inside a tokio runtime: {0}")]
    NoRuntime(String),
}
