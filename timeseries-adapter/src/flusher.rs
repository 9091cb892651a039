//! Where frozen memtable blocks go: the [`SegmentFlusher`] trait and its file-backed default.
//!
//! The trait is the seam for fault injection: a test wraps [`FileSegmentFlusher`] in a flusher
//! that fails some writes (an `io::Error` of kind `StorageFull`, say) and checks that the
//! adapter keeps the data in memory, reports the failure and retries.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::SeriesId;
use crate::error::{FlushError, SegmentError};
use crate::gorilla::Block;
use crate::segment::{self, RateLimiter, SEGMENT_EXT, SegmentMeta, TEMP_EXT, WriteOptions};

/// A batch of frozen blocks to persist as one segment: sorted by series, one block per series.
#[derive(Debug)]
pub struct SegmentBatch {
    /// Segment id to write.
    pub id: u64,
    /// Blocks, sorted by series id.
    pub blocks: Vec<(SeriesId, Block)>,
}

impl SegmentBatch {
    /// Heap bytes the batch holds (what its flush gives back to the governor).
    pub fn heap_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|(_, b)| b.heap_bytes())
            .sum::<usize>()
            + self.blocks.capacity() * std::mem::size_of::<(SeriesId, Block)>()
    }

    /// Points in the batch.
    pub fn point_count(&self) -> u64 {
        self.blocks.iter().map(|(_, b)| b.count).sum()
    }

    /// The block of `series`, if the batch has one.
    pub fn block(&self, series: SeriesId) -> Option<&Block> {
        self.blocks
            .binary_search_by_key(&series, |(s, _)| *s)
            .ok()
            .map(|i| &self.blocks[i].1)
    }
}

/// What a restart found in the segment store.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Segments that passed verification, by id.
    pub segments: Vec<SegmentMeta>,
    /// Segments that failed verification. They are not used (a file flusher renames them to
    /// `*.corrupt` so they are kept for inspection but never read again).
    pub corrupt: Vec<SegmentError>,
    /// Leftover temp files of flushes that never completed (removed: their data was never
    /// acknowledged as durable).
    pub removed_partial: Vec<PathBuf>,
}

/// Persists frozen memtable blocks as immutable segments and reads them back.
///
/// Contract the adapter relies on: when [`SegmentFlusher::write_segment`] returns `Ok`, the
/// segment is durable (a crash right after loses nothing); when it returns `Err`, nothing the
/// store will later list or read exists for that batch, and the adapter still holds the data.
#[async_trait]
pub trait SegmentFlusher: Send + Sync + 'static {
    /// Writes `batch` durably.
    async fn write_segment(&self, batch: Arc<SegmentBatch>) -> Result<SegmentMeta, FlushError>;

    /// Reads `series`'s block from a segment this store wrote, verified by its checksum.
    async fn read_block(
        &self,
        segment: &SegmentMeta,
        series: SeriesId,
    ) -> Result<Option<Block>, SegmentError>;

    /// Lists and verifies the segments on start-up.
    async fn recover(&self) -> Result<Recovery, SegmentError>;
}

/// The default store: one file per segment in a directory, written with page-cache hygiene.
///
/// Pick it unless you need another medium. Settings: [`FileSegmentFlusher::drop_page_cache`]
/// (default on) and [`FileSegmentFlusher::rate_limit`] (default none).
#[derive(Debug, Clone)]
pub struct FileSegmentFlusher {
    inner: Arc<FileInner>,
}

#[derive(Debug)]
struct FileInner {
    dir: PathBuf,
    drop_page_cache: bool,
    chunk_bytes: usize,
    rate: Option<RateLimiter>,
}

impl FileSegmentFlusher {
    /// A store in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self {
            inner: Arc::new(FileInner {
                dir,
                drop_page_cache: true,
                chunk_bytes: 1 << 20,
                rate: None,
            }),
        })
    }

    fn edit(mut self, f: impl FnOnce(&mut FileInner)) -> Self {
        let mut inner = FileInner {
            dir: self.inner.dir.clone(),
            drop_page_cache: self.inner.drop_page_cache,
            chunk_bytes: self.inner.chunk_bytes,
            rate: self
                .inner
                .rate
                .as_ref()
                .map(|r| RateLimiter::new(r.bytes_per_sec())),
        };
        f(&mut inner);
        self.inner = Arc::new(inner);
        self
    }

    /// Whether flushes drop their pages from the page cache (`sync_file_range` +
    /// `POSIX_FADV_DONTNEED`). Turn off only to measure what it saves.
    #[must_use]
    pub fn drop_page_cache(self, on: bool) -> Self {
        self.edit(|i| i.drop_page_cache = on)
    }

    /// Caps flush writes at `bytes_per_sec` (shared by all flushes of this store), so a large
    /// flush cannot saturate the disk other engines read from.
    #[must_use]
    pub fn rate_limit(self, bytes_per_sec: u64) -> Self {
        self.edit(|i| i.rate = Some(RateLimiter::new(bytes_per_sec)))
    }

    /// Write-back chunk (bytes, at least 4 KiB): the dirty page-cache footprint of a flush is
    /// about two chunks.
    #[must_use]
    pub fn write_chunk(self, bytes: usize) -> Self {
        self.edit(|i| i.chunk_bytes = bytes.max(4096))
    }

    /// The directory segments live in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}

#[async_trait]
impl SegmentFlusher for FileSegmentFlusher {
    async fn write_segment(&self, batch: Arc<SegmentBatch>) -> Result<SegmentMeta, FlushError> {
        let inner = Arc::clone(&self.inner);
        let path = inner.dir.join(segment::segment_file_name(batch.id));
        blocking(move || {
            let opts = WriteOptions {
                drop_page_cache: inner.drop_page_cache,
                chunk_bytes: inner.chunk_bytes,
                rate: inner.rate.as_ref(),
            };
            segment::write_segment(&inner.dir, batch.id, &batch.blocks, opts)
        })
        .await
        .map_err(|e| FlushError::Other(format!("flush task failed: {e}")))?
        .map_err(|source| FlushError::Io { path, source })
    }

    async fn read_block(
        &self,
        segment: &SegmentMeta,
        series: SeriesId,
    ) -> Result<Option<Block>, SegmentError> {
        let meta = segment.clone();
        blocking(move || segment::read_block(&meta, series))
            .await
            .map_err(|e| SegmentError::Io {
                path: segment.path.clone(),
                source: io::Error::other(e.to_string()),
            })?
    }

    async fn recover(&self) -> Result<Recovery, SegmentError> {
        let dir = self.inner.dir.clone();
        blocking(move || recover_dir(&dir))
            .await
            .map_err(|e| SegmentError::Io {
                path: self.inner.dir.clone(),
                source: io::Error::other(e.to_string()),
            })?
    }
}

fn recover_dir(dir: &Path) -> Result<Recovery, SegmentError> {
    let io_err = |source| SegmentError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut rec = Recovery::default();
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err)?;
    paths.sort();
    for path in paths {
        match path.extension().and_then(|e| e.to_str()) {
            Some(TEMP_EXT) => {
                tracing::warn!(path = %path.display(), "removing segment of an unfinished flush");
                fs::remove_file(&path).map_err(io_err)?;
                rec.removed_partial.push(path);
            }
            Some(SEGMENT_EXT) => match segment::verify_segment(&path) {
                Ok(meta) => rec.segments.push(meta),
                // A file we cannot read right now (permissions, I/O) is not known to be
                // corrupt: fail the start-up loudly rather than quarantine good data.
                Err(err @ SegmentError::Io { .. }) => return Err(err),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err,
                        "segment failed verification; quarantined, NOT used");
                    let quarantined = path.with_extension("corrupt");
                    fs::rename(&path, &quarantined).map_err(io_err)?;
                    rec.corrupt.push(err);
                }
            },
            _ => {}
        }
    }
    rec.segments.sort_by_key(|m| m.id);
    Ok(rec)
}
