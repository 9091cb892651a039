//! The immutable segment file: what a flush writes and a restart verifies.
//!
//! ```text
//! offset 0      header (64 bytes)
//!               magic "GORSEG\0\x01" | version u32 | series_count u32 | segment_id u64
//!               point_count u64 | min_ts i64 | max_ts i64 | data_len u64 | 0u32 | header crc32
//! offset 64     directory: series_count entries of 64 bytes, sorted by series id
//!               series u64 | first_ts i64 | last_ts i64 | count u64 | bit_len u64
//!               data_offset u64 | data_len u32 | data crc32 | entry crc32 | 0u32
//! ...           data: each block's used words, little-endian u64
//! end - 16      footer: crc32 of every byte before the footer | 0u32 | magic "GORSEGOK"
//! ```
//!
//! All integers are little-endian. Four checksums, four jobs: the header crc lets a reader
//! trust the sizes before it reads anything else; each directory entry's crc lets a query's
//! binary search trust every entry it probes (a flipped series id cannot make a block
//! silently "missing"); the per-block crc lets a query verify just the block it reads; the
//! whole-file crc is what a restart checks before a segment is used at all. The footer is written last, so a torn write (crash mid-flush) is caught by length,
//! footer magic or crc: it is never silently used.
//!
//! # Writing without flooding the page cache
//!
//! A flush writes the file through a small buffer in chunks. After each chunk it starts
//! write-back for that chunk (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), waits for the
//! *previous* chunk's write-back to finish and drops those now-clean pages
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`). This is the classic streaming-writer pattern: the
//! dirty footprint stays at about two chunks, and pages are dropped as soon as they are on
//! disk, instead of the whole segment sitting in the page cache (evicting other engines' hot
//! pages) until the kernel's own write-back gets to it. After `fsync` and the rename, the
//! whole file is advised `DONTNEED` once more. Both calls are advice: a file system may ignore
//! them (tmpfs keeps its pages because they *are* the storage); [`resident_pages`] lets a test
//! or an operator check what the kernel actually did.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::SeriesId;
use crate::error::SegmentError;
use crate::gorilla::{Block, Point};

const MAGIC: &[u8; 8] = b"GORSEG\0\x01";
const FOOTER_MAGIC: &[u8; 8] = b"GORSEGOK";
const VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_LEN: u64 = 64;
/// Directory entry size in bytes.
pub const DIR_ENTRY_LEN: u64 = 64;
/// Footer size in bytes.
pub const FOOTER_LEN: u64 = 16;

/// File-name suffix of a complete segment.
pub const SEGMENT_EXT: &str = "seg";
/// File-name suffix of a segment being written (never read; removed on restart).
pub const TEMP_EXT: &str = "tmp";

/// What the adapter keeps in memory about a flushed segment (a few dozen bytes; the
/// per-series directory stays on disk and is binary-searched by queries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    /// Segment id (monotonic, also in the file name).
    pub id: u64,
    /// Path of the file.
    pub path: PathBuf,
    /// Series in the segment.
    pub series_count: u32,
    /// Points in the segment.
    pub point_count: u64,
    /// Smallest timestamp.
    pub min_ts: i64,
    /// Largest timestamp.
    pub max_ts: i64,
    /// File size in bytes.
    pub file_len: u64,
}

/// Name of segment `id`'s file.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.{SEGMENT_EXT}")
}

/// Paces writes to a byte rate shared by every flush that holds it.
///
/// A virtual clock: each `acquire(n)` books `n / rate` seconds after the previous booking and
/// sleeps until its slot starts, so the long-run rate is capped without bursts piling up.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter that lets `bytes_per_sec` through (must be > 0).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// The configured rate.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Blocks the calling (blocking-pool) thread until `bytes` may be written.
    pub fn acquire_blocking(&self, bytes: u64) {
        // A slot too long for a Duration or an Instant (u64::MAX bytes at 1 B/s) cannot be
        // booked; it is not paced rather than panicking the flush.
        let cost = Duration::try_from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
            .unwrap_or(Duration::MAX);
        let start = {
            let mut next = self.next_free.lock();
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start.checked_add(cost).unwrap_or(start);
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

/// How a segment is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions<'a> {
    /// Drop written pages from the page cache (`sync_file_range` + `POSIX_FADV_DONTNEED`).
    pub drop_page_cache: bool,
    /// Write-back chunk size in bytes.
    pub chunk_bytes: usize,
    /// Optional I/O rate cap.
    pub rate: Option<&'a RateLimiter>,
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `posix_fadvise(DONTNEED)` on a byte range. Advice only: errors are ignored on purpose (the
/// data is already durable; failing to drop cache must not fail the flush).
fn drop_cached(file: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on a valid, open file descriptor; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// `sync_file_range` with the given flags (Linux only); a no-op elsewhere.
#[allow(unused_variables)]
fn sync_range(file: &File, offset: u64, len: u64, flags: u32) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscall on a valid, open file descriptor; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
const SFR_WRITE: u32 = libc::SYNC_FILE_RANGE_WRITE;
#[cfg(target_os = "linux")]
const SFR_WAIT_ALL: u32 = libc::SYNC_FILE_RANGE_WAIT_BEFORE
    | libc::SYNC_FILE_RANGE_WRITE
    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
#[cfg(not(target_os = "linux"))]
const SFR_WRITE: u32 = 0;
#[cfg(not(target_os = "linux"))]
const SFR_WAIT_ALL: u32 = 0;

/// Streams bytes to the file in chunks, checksumming them and keeping the page cache clean.
struct ChunkWriter<'a> {
    file: &'a File,
    buf: Vec<u8>,
    written: u64,
    crc: crc32fast::Hasher,
    prev_chunk: Option<(u64, u64)>,
    opts: WriteOptions<'a>,
}

impl<'a> ChunkWriter<'a> {
    fn new(file: &'a File, opts: WriteOptions<'a>) -> Self {
        Self {
            file,
            buf: Vec::with_capacity(opts.chunk_bytes),
            written: 0,
            crc: crc32fast::Hasher::new(),
            prev_chunk: None,
            opts,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = self.opts.chunk_bytes - self.buf.len();
            let take = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.opts.chunk_bytes {
                self.emit()?;
            }
        }
        Ok(())
    }

    /// Writes bytes that are not part of the checksum (the footer).
    fn put_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let len = self.buf.len() as u64;
        if let Some(rate) = self.opts.rate {
            rate.acquire_blocking(len);
        }
        self.file.write_all_at(&self.buf, self.written)?;
        let this = (self.written, len);
        self.written += len;
        self.buf.clear();
        if self.opts.drop_page_cache {
            // Start write-back of this chunk now, then wait for the previous one and drop it.
            sync_range(self.file, this.0, this.1, SFR_WRITE)?;
            if let Some((off, l)) = self.prev_chunk {
                sync_range(self.file, off, l, SFR_WAIT_ALL)?;
                drop_cached(self.file, off, l);
            }
            self.prev_chunk = Some(this);
        }
        Ok(())
    }

    fn checksum(&self) -> u32 {
        self.crc.clone().finalize()
    }
}

/// Writes `blocks` (sorted by series, each non-empty) as segment `id` in `dir`, durably:
/// temp file, fsync, rename, fsync of the directory, then page-cache drop.
pub fn write_segment(
    dir: &Path,
    id: u64,
    blocks: &[(SeriesId, Block)],
    opts: WriteOptions<'_>,
) -> io::Result<SegmentMeta> {
    debug_assert!(blocks.windows(2).all(|w| w[0].0 < w[1].0));
    let final_path = dir.join(segment_file_name(id));
    let tmp_path = final_path.with_extension(TEMP_EXT);

    let series_count = u32::try_from(blocks.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many series"))?;
    let point_count: u64 = blocks.iter().map(|(_, b)| b.count).sum();
    let min_ts = blocks.iter().map(|(_, b)| b.first_ts).min().unwrap_or(0);
    let max_ts = blocks.iter().map(|(_, b)| b.last_ts).max().unwrap_or(0);
    let data_len: u64 = blocks.iter().map(|(_, b)| b.used_words() as u64 * 8).sum();

    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    put_u32(&mut header, VERSION);
    put_u32(&mut header, series_count);
    put_u64(&mut header, id);
    put_u64(&mut header, point_count);
    put_u64(&mut header, min_ts as u64);
    put_u64(&mut header, max_ts as u64);
    put_u64(&mut header, data_len);
    put_u32(&mut header, 0);
    let hcrc = crc32fast::hash(&header);
    put_u32(&mut header, hcrc);

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)?;
    let result = (|| {
        let mut w = ChunkWriter::new(&file, opts);
        w.put(&header)?;
        let mut offset = HEADER_LEN + DIR_ENTRY_LEN * u64::from(series_count);
        let mut entry = Vec::with_capacity(DIR_ENTRY_LEN as usize);
        for (series, block) in blocks {
            let bytes = block.used_words() as u64 * 8;
            let crc = block_crc(&block.words[..block.used_words()]);
            entry.clear();
            put_u64(&mut entry, series.0);
            put_u64(&mut entry, block.first_ts as u64);
            put_u64(&mut entry, block.last_ts as u64);
            put_u64(&mut entry, block.count);
            put_u64(&mut entry, block.bit_len);
            put_u64(&mut entry, offset);
            put_u32(
                &mut entry,
                u32::try_from(bytes)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "block over 4 GiB"))?,
            );
            put_u32(&mut entry, crc);
            let ecrc = crc32fast::hash(&entry);
            put_u32(&mut entry, ecrc);
            put_u32(&mut entry, 0);
            w.put(&entry)?;
            offset += bytes;
        }
        for (_, block) in blocks {
            for word in &block.words[..block.used_words()] {
                w.put(&word.to_le_bytes())?;
            }
        }
        let fcrc = w.checksum();
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        put_u32(&mut footer, fcrc);
        put_u32(&mut footer, 0);
        footer.extend_from_slice(FOOTER_MAGIC);
        w.put_raw(&footer);
        w.emit()?;
        file.sync_all()?;
        fs::rename(&tmp_path, &final_path)?;
        File::open(dir)?.sync_all()?;
        if opts.drop_page_cache {
            drop_cached(&file, 0, 0); // len 0 = to the end of the file
        }
        Ok(w.written)
    })();
    match result {
        Ok(file_len) => Ok(SegmentMeta {
            id,
            path: final_path,
            series_count,
            point_count,
            min_ts,
            max_ts,
            file_len,
        }),
        Err(e) => {
            // Nothing half-written may be mistaken for a segment later.
            let _ = fs::remove_file(&tmp_path);
            Err(e)
        }
    }
}

fn block_crc(words: &[u64]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for w in words {
        h.update(&w.to_le_bytes());
    }
    h.finalize()
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses and checks the header; returns the meta (without verifying the body).
fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<SegmentMeta, SegmentError> {
    let format = |reason: String| SegmentError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if header.len() < HEADER_LEN as usize || &header[..8] != MAGIC {
        return Err(format("bad magic (not a segment file)".into()));
    }
    let stored = get_u32(header, 60);
    let computed = crc32fast::hash(&header[..60]);
    if stored != computed {
        return Err(SegmentError::Checksum {
            path: path.to_path_buf(),
            region: "header".into(),
            stored,
            computed,
        });
    }
    let version = get_u32(header, 8);
    if version != VERSION {
        return Err(format(format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let series_count = get_u32(header, 12);
    let data_len = get_u64(header, 48);
    let expected = HEADER_LEN
        .checked_add(DIR_ENTRY_LEN * u64::from(series_count))
        .and_then(|v| v.checked_add(data_len))
        .and_then(|v| v.checked_add(FOOTER_LEN))
        .ok_or_else(|| format("sizes overflow".into()))?;
    if expected != file_len {
        return Err(SegmentError::Torn {
            path: path.to_path_buf(),
            len: file_len,
            expected,
        });
    }
    Ok(SegmentMeta {
        id: get_u64(header, 16),
        path: path.to_path_buf(),
        series_count,
        point_count: get_u64(header, 24),
        min_ts: get_u64(header, 32) as i64,
        max_ts: get_u64(header, 40) as i64,
        file_len,
    })
}

/// Reads the whole file, checks header, length, footer and whole-file checksum, and returns
/// its meta. This is what a restart runs before a segment is used; a torn or corrupt file is
/// an error, never a partial result. Pages read are dropped from the cache afterwards.
pub fn verify_segment(path: &Path) -> Result<SegmentMeta, SegmentError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if file_len < HEADER_LEN + FOOTER_LEN {
        return Err(SegmentError::Torn {
            path: path.to_path_buf(),
            len: file_len,
            expected: HEADER_LEN + FOOTER_LEN,
        });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0).map_err(io_err(path))?;
    let meta = parse_header(path, &header, file_len)?;

    let body_len = file_len - FOOTER_LEN;
    let mut footer = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut footer, body_len)
        .map_err(io_err(path))?;
    if &footer[8..] != FOOTER_MAGIC || get_u32(&footer, 4) != 0 {
        return Err(SegmentError::Torn {
            path: path.to_path_buf(),
            len: file_len,
            expected: file_len,
        });
    }
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0;
    while at < body_len {
        let n = (body_len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(io_err(path))?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    drop_cached(&file, 0, 0);
    let computed = h.finalize();
    let stored = get_u32(&footer, 0);
    if stored != computed {
        return Err(SegmentError::Checksum {
            path: path.to_path_buf(),
            region: "file".into(),
            stored,
            computed,
        });
    }
    Ok(meta)
}

/// Reads series `series`'s block from a segment, if it has one: binary search over the
/// on-disk directory (a few small `pread`s), then the block, checked against its crc.
pub fn read_block(meta: &SegmentMeta, series: SeriesId) -> Result<Option<Block>, SegmentError> {
    let path = meta.path.as_path();
    let file = File::open(path).map_err(io_err(path))?;
    let mut entry = [0u8; DIR_ENTRY_LEN as usize];
    let (mut lo, mut hi) = (0u64, u64::from(meta.series_count));
    let found = loop {
        if lo >= hi {
            break None;
        }
        let mid = lo + (hi - lo) / 2;
        file.read_exact_at(&mut entry, HEADER_LEN + mid * DIR_ENTRY_LEN)
            .map_err(io_err(path))?;
        let (stored, computed) = (get_u32(&entry, 56), crc32fast::hash(&entry[..56]));
        if stored != computed || get_u32(&entry, 60) != 0 {
            return Err(SegmentError::Checksum {
                path: path.to_path_buf(),
                region: format!("directory entry {mid}"),
                stored,
                computed,
            });
        }
        let id = get_u64(&entry, 0);
        match id.cmp(&series.0) {
            std::cmp::Ordering::Equal => break Some(entry),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    };
    let Some(entry) = found else {
        return Ok(None);
    };
    let offset = get_u64(&entry, 40);
    let len = u64::from(get_u32(&entry, 48));
    let stored = get_u32(&entry, 52);
    let bit_len = get_u64(&entry, 32);
    let data_end = meta.file_len.saturating_sub(FOOTER_LEN);
    if len % 8 != 0 || offset.checked_add(len).is_none_or(|end| end > data_end) || bit_len > len * 8
    {
        return Err(SegmentError::Format {
            path: path.to_path_buf(),
            reason: format!("directory entry of series {series} points outside the data"),
        });
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, offset)
        .map_err(io_err(path))?;
    let computed = crc32fast::hash(&bytes);
    if computed != stored {
        return Err(SegmentError::Checksum {
            path: path.to_path_buf(),
            region: format!("block of series {series}"),
            stored,
            computed,
        });
    }
    let words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Some(Block {
        words,
        bit_len,
        count: get_u64(&entry, 24),
        first_ts: get_u64(&entry, 8) as i64,
        last_ts: get_u64(&entry, 16) as i64,
    }))
}

/// Decodes a block read from `meta`, keeping the points with `range.contains(ts)`.
pub fn decode_block_into(
    meta: &SegmentMeta,
    series: SeriesId,
    block: &Block,
    range: &std::ops::RangeInclusive<i64>,
    out: &mut Vec<Point>,
) -> Result<(), SegmentError> {
    for p in block {
        let p = p.map_err(|source| SegmentError::Decode {
            path: meta.path.clone(),
            series,
            source,
        })?;
        if range.contains(&p.ts) {
            out.push(p);
        }
    }
    Ok(())
}

/// Pages of `path` resident in the page cache, and the file's total pages, measured with
/// `mincore` on a read-only mapping (mapping does not fault pages in).
///
/// Lets tests and operators check whether `POSIX_FADV_DONTNEED` was honoured.
pub fn resident_pages(path: &Path) -> io::Result<(usize, usize)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Ok((0, 0));
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let pages = len.div_ceil(page);
    // SAFETY: a fresh shared read-only mapping of an open file, length > 0; unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` is a live mapping of `len` bytes and `vec` holds one byte per page.
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping created above.
    unsafe { libc::munmap(addr, len) };
    if rc != 0 {
        return Err(err);
    }
    Ok((vec.iter().filter(|&&b| b & 1 == 1).count(), pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gorilla::Encoder;

    fn blocks(n_series: u64, points: i64) -> Vec<(SeriesId, Block)> {
        (0..n_series)
            .map(|s| {
                let mut e = Encoder::new();
                for i in 0..points {
                    e.append(i * 10, (s as f64) + (i as f64) * 0.5).unwrap();
                }
                (SeriesId(s * 3), e.into_block())
            })
            .collect()
    }

    fn opts() -> WriteOptions<'static> {
        WriteOptions {
            drop_page_cache: true,
            chunk_bytes: 4096,
            rate: None,
        }
    }

    #[test]
    fn written_segment_verifies_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let b = blocks(50, 200);
        let meta = write_segment(dir.path(), 7, &b, opts()).unwrap();
        assert_eq!(meta.point_count, 50 * 200);
        assert_eq!(verify_segment(&meta.path).unwrap(), meta);
        for (s, block) in &b {
            let got = read_block(&meta, *s).unwrap().unwrap();
            assert_eq!(got.words[..], block.words[..block.used_words()]);
            assert_eq!(got.count, block.count);
        }
        assert_eq!(read_block(&meta, SeriesId(1)).unwrap(), None);
        assert_eq!(read_block(&meta, SeriesId(10_000)).unwrap(), None);
        assert!(!meta.path.with_extension(TEMP_EXT).exists());
    }

    #[test]
    fn every_single_byte_flip_or_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write_segment(dir.path(), 1, &blocks(3, 20), opts()).unwrap();
        let good = fs::read(&meta.path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            fs::write(&meta.path, &bad).unwrap();
            assert!(verify_segment(&meta.path).is_err(), "flip at byte {at}");
        }
        for len in [0, 10, 64, good.len() / 2, good.len() - 1] {
            fs::write(&meta.path, &good[..len]).unwrap();
            let err = verify_segment(&meta.path).unwrap_err();
            assert!(
                matches!(err, SegmentError::Torn { .. } | SegmentError::Format { .. }),
                "truncated to {len}: {err}"
            );
        }
    }

    #[test]
    fn block_crc_catches_corruption_at_query_time() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write_segment(dir.path(), 2, &blocks(2, 50), opts()).unwrap();
        let mut bytes = fs::read(&meta.path).unwrap();
        let data_start = (HEADER_LEN + 2 * DIR_ENTRY_LEN) as usize;
        bytes[data_start + 3] ^= 1;
        fs::write(&meta.path, &bytes).unwrap();
        let err = read_block(&meta, SeriesId(0)).unwrap_err();
        assert!(matches!(err, SegmentError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_flipped_directory_byte_is_an_error_at_query_time_never_a_silent_miss() {
        let dir = tempfile::tempdir().unwrap();
        let b = blocks(8, 30);
        let meta = write_segment(dir.path(), 3, &b, opts()).unwrap();
        let good = fs::read(&meta.path).unwrap();
        let dir_start = HEADER_LEN as usize;
        let dir_end = dir_start + 8 * DIR_ENTRY_LEN as usize;
        for at in dir_start..dir_end {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            fs::write(&meta.path, &bad).unwrap();
            for (s, block) in &b {
                match read_block(&meta, *s) {
                    Ok(Some(got)) => assert_eq!(got.words[..], block.words[..block.used_words()]),
                    Ok(None) => panic!("byte {at}: series {s} silently missing"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn rate_limiter_paces_bytes() {
        let r = RateLimiter::new(1_000_000);
        let t = Instant::now();
        for _ in 0..5 {
            r.acquire_blocking(20_000);
        }
        // 100 kB at 1 MB/s: the first slot starts at once, the last at 80 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(75),
            "{:?}",
            t.elapsed()
        );
    }
}
