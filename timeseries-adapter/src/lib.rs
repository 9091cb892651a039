//! Timeseries engine memory on the governor: Gorilla memtables that flush and throttle
//! instead of growing.
//!
//! # The problem
//!
//! Bulk timeseries ingest grows memtables without bound, and the flush that finally follows
//! writes hundreds of megabytes through the page cache, evicting the vector index's and the
//! query engine's hot pages. This crate puts the memtable inside the governor's
//! `EngineId::Timeseries` budget and makes every flush leave the page cache as it found it.
//!
//! # The design, in one picture
//!
//! ```text
//!   append(series, points)                                    governor-core
//!        │                                               ┌──────────────────────┐
//!        ▼                       try_grow(chunk)         │ Timeseries budget    │
//!   ┌────────────────────┐ ───────────────────────────▶  │  reserved ≤ limit    │
//!   │ Memtable           │  reserve(bytes, wait).await   │  pressure watch ─────┼──┐
//!   │  series → Gorilla  │ ◀───────────────────────────  │  reclaim_for(...) ───┼┐ │
//!   │  block (XOR/DoD)   │      tokens shrink/drop       └──────────────────────┘│ │
//!   │  frozen batches    │ ◀──── only after fsync ────┐     Reclaimer::reclaim ◀─┘ │
//!   └─────────┬──────────┘                            │                           │
//!             │ freeze largest/oldest                 │     Warning: flush ◀──────┘
//!             ▼                                       │     Critical: ingest waits
//!   ┌────────────────────┐   write, crc, fsync,       │
//!   │ flush worker       │ ─ rename, fsync(dir) ──▶ segment file ── FADV_DONTNEED
//!   │ (one at a time,    │   rate cap (bytes/s)       │   (sync_file_range per chunk)
//!   │  retry w/ backoff) │ ── Ok(meta): publish ──────┘
//!   └────────────────────┘
//! ```
//!
//! * **Encoding** ([`gorilla`]): each series' in-memory block is Gorilla-compressed
//!   (delta-of-delta timestamps, XOR'd floats; Pelkonen et al., VLDB 2015), bit-exact for
//!   every `f64` including NaN payloads and `-0.0`. Regular series cost about two bits a
//!   point.
//! * **Accounting** ([`MemtableMemory`]): the memtable's reserved bytes cover its
//!   real heap (block capacities, the exact hash-index allocation, frozen batches), reserved
//!   *before* each allocation, taken from the governor a chunk at a time so the governor is
//!   not on the per-point path.
//! * **Pressure**: the flush worker watches the Timeseries (and global) pressure. At
//!   `Warning` it flushes the largest, then oldest, series down to a target share of the
//!   limit. At `Critical` an append stops growing the reservation and waits, bounded, for the
//!   flush to free memory (and for `governor.reserve(..).await` when the budget is full); past
//!   the bound it fails with [`IngestError::Throttled`], which says exactly which points were
//!   stored (a prefix) so the caller can retry the rest: nothing is lost or half-stored. The
//!   adapter is also the Timeseries [`Reclaimer`](governor_core::Reclaimer): when another
//!   engine needs its floor back, the governor's reclaim flushes.
//! * **Durability** ([`segment`], [`SegmentFlusher`]): a frozen batch becomes an immutable
//!   segment file (header, directory, data, footer; crc32 on the header, on each block and
//!   on the whole file), written to a temp name, fsynced, renamed, and its directory fsynced.
//!   Only then are its bytes given back. A failed write (disk full, I/O error — the flusher
//!   trait is the injection point) leaves the data in memory and readable, is counted and
//!   logged, and is retried with exponential back-off before anything new is frozen.
//! * **Page cache**: the file is written in chunks; each chunk's write-back is started with
//!   `sync_file_range`, and the previous chunk, once on disk, is dropped with
//!   `posix_fadvise(DONTNEED)`, so a flush's cache footprint stays at about two chunks.
//!   [`segment::resident_pages`] measures what the kernel actually kept.
//! * **Reads**: [`TimeseriesAdapter::query`] merges the active block, frozen batches and the
//!   segments whose time range overlaps, in time order.
//! * **Restart**: `open` verifies every segment by checksum before using it. Torn or corrupt
//!   files are reported ([`RecoveryReport::corrupt`], typed [`SegmentError`]s, and an error
//!   event), quarantined as `*.corrupt` (or `*.N.corrupt`: a quarantine never replaces an
//!   earlier one), and never read. Segment ids are never reused, quarantined ones included.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
//! use timeseries_adapter::{FileSegmentFlusher, Point, SeriesId, TimeseriesAdapter};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GovernorConfig::builder()
//!     .global_ceiling(mib(64))
//!     .engine(EngineId::Timeseries, EngineBudget::new(mib(8)))
//!     .build()?;
//! let governor = MemoryGovernor::new(config)?;
//! let dir = tempfile::tempdir()?;
//! let ts = TimeseriesAdapter::builder(governor)
//!     .flusher(Arc::new(FileSegmentFlusher::new(dir.path())?))
//!     .open()
//!     .await?;
//!
//! let points: Vec<Point> = (0..1000).map(|i| Point::new(i * 1000, 20.0 + (i % 7) as f64)).collect();
//! ts.append(SeriesId(1), &points).await?;
//! ts.flush_all().await?;                       // durable, memory given back
//! let back = ts.query(SeriesId(1), 0..=i64::MAX).await?;
//! assert_eq!(back.len(), 1000);
//! # Ok(())
//! # }
//! ```
//!
//! # Limits (on purpose, for now)
//!
//! * Timestamps must strictly increase within a series' in-memory block; an earlier point is
//!   refused with [`IngestError::OutOfOrder`]. After the block is flushed, the series starts a
//!   new block, so late data is accepted and queries merge it in time order.
//! * Segments are never compacted; each costs about 200 bytes of metadata in memory
//!   (accounted) and a directory binary search per query.
//! * Query results and the segment writer's 1 MiB staging buffer are transient and not
//!   accounted to the Timeseries budget.

pub mod adapter;
pub mod error;
pub mod flusher;
pub mod gorilla;
mod memtable;
pub mod segment;

pub use adapter::{RecoveryReport, TimeseriesAdapter, TimeseriesAdapterBuilder, TimeseriesStats};
pub use error::{FlushError, IngestError, OpenError, QueryError, SegmentError};
pub use flusher::{FileSegmentFlusher, Recovery, SegmentBatch, SegmentFlusher};
pub use gorilla::Point;
pub use memtable::{FIXED_OVERHEAD_BYTES, MemtableMemory, SERIES_SLOT_BYTES};
pub use segment::SegmentMeta;

/// Identifies a series (e.g. a hash of its metric name and tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesId(pub u64);

impl std::fmt::Display for SeriesId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
