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
    /// Where each of `corrupt` was moved for inspection, in the same order. A quarantine
    /// never replaces an earlier one: a name already taken gets a numbered one instead.
    pub quarantined: Vec<PathBuf>,
    /// Leftover temp files of flushes that never completed (removed: their data was never
    /// acknowledged as durable).
    pub removed_partial: Vec<PathBuf>,
    /// Highest segment id the store has ever held, counting quarantined and partial files as
    /// well as `segments`. New segments are numbered above it, so an id is never handed out
    /// twice (a reused id would make a later quarantine collide with an earlier one). A store
    /// that leaves it `None` gets ids above its highest verified segment.
    pub highest_id: Option<u64>,
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
        if let Some(id) = store_file_id(&path) {
            rec.highest_id = rec.highest_id.max(Some(id));
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some(TEMP_EXT) => {
                tracing::warn!(path = %path.display(), "removing segment of an unfinished flush");
                fs::remove_file(&path).map_err(io_err)?;
                rec.removed_partial.push(path);
            }
            Some(SEGMENT_EXT) => match segment::verify_segment(&path) {
                Ok(meta) => {
                    rec.highest_id = rec.highest_id.max(Some(meta.id));
                    rec.segments.push(meta);
                }
                // A file we cannot read right now (permissions, I/O) is not known to be
                // corrupt: fail the start-up loudly rather than quarantine good data.
                Err(err @ SegmentError::Io { .. }) => return Err(err),
                Err(err) => {
                    let quarantined = quarantine(&path).map_err(|source| SegmentError::Io {
                        path: path.clone(),
                        source,
                    })?;
                    tracing::error!(path = %path.display(), quarantined = %quarantined.display(),
                        error = %err, "segment failed verification; quarantined, NOT used");
                    rec.corrupt.push(err);
                    rec.quarantined.push(quarantined);
                }
            },
            _ => {}
        }
    }
    rec.segments.sort_by_key(|m| m.id);
    Ok(rec)
}

/// File-name suffix of a quarantined segment.
const QUARANTINE_EXT: &str = "corrupt";

/// The segment id in the name of a file this store writes: `ID.seg`, `ID.tmp`,
/// `ID.corrupt` or `ID.N.corrupt` (ID in decimal). Other files are not ours.
fn store_file_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let (id, rest) = name.split_once('.')?;
    let ours = rest == SEGMENT_EXT
        || rest == TEMP_EXT
        || rest == QUARANTINE_EXT
        || rest.strip_suffix(QUARANTINE_EXT).is_some_and(|n| {
            n.strip_suffix('.')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
    if !ours || id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// Moves a segment that failed verification to `ID.corrupt`, or `ID.N.corrupt` with the
/// first `N` not taken, and returns the new path. Evidence is never overwritten: the move is
/// a hard link (which fails rather than replace an existing name) followed by removing the
/// old name, and the directory is synced so the move survives a crash. A crash between the
/// two steps leaves both names; the next start quarantines the `.seg` again under a new name.
fn quarantine(path: &Path) -> io::Result<PathBuf> {
    const MAX_TRIES: u32 = 10_000;
    let dir = path.parent().unwrap_or(Path::new("."));
    for n in 0..MAX_TRIES {
        let target = if n == 0 {
            path.with_extension(QUARANTINE_EXT)
        } else {
            path.with_extension(format!("{n}.{QUARANTINE_EXT}"))
        };
        match fs::hard_link(path, &target) {
            Ok(()) => {
                fs::remove_file(path)?;
                fs::File::open(dir)?.sync_all()?;
                return Ok(target);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{MAX_TRIES} quarantine names for {} are taken; move old *.{QUARANTINE_EXT} files away",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_file_ids_come_from_our_names_only() {
        let id = |n: &str| store_file_id(Path::new(n));
        assert_eq!(id("00000000000000000007.seg"), Some(7));
        assert_eq!(id("/d/00000000000000000007.tmp"), Some(7));
        assert_eq!(id("00000000000000000009.corrupt"), Some(9));
        assert_eq!(id("00000000000000000009.12.corrupt"), Some(9));
        assert_eq!(id("18446744073709551615.seg"), Some(u64::MAX));
        for other in [
            "notes.txt",
            "x7.seg",
            "7.seg.bak",
            "7.x.corrupt",
            ".corrupt",
            "7..corrupt",
            "18446744073709551616.seg",
        ] {
            assert_eq!(id(other), None, "{other}");
        }
    }

    #[test]
    fn quarantine_never_replaces_earlier_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("00000000000000000003.seg");
        let mut moved = Vec::new();
        for round in 0..3u8 {
            fs::write(&seg, [round; 8]).unwrap();
            moved.push(quarantine(&seg).unwrap());
            assert!(!seg.exists());
        }
        let names: Vec<_> = moved
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "00000000000000000003.corrupt",
                "00000000000000000003.1.corrupt",
                "00000000000000000003.2.corrupt"
            ]
        );
        for (round, path) in moved.iter().enumerate() {
            assert_eq!(fs::read(path).unwrap(), [round as u8; 8], "{path:?} kept");
        }
    }
}
