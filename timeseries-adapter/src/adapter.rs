//! [`TimeseriesAdapter`]: ingest, flush scheduling, throttling, reclaim and queries.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor_core::{
    ConsumerSnapshot, ConsumerStatsSource, EngineId, MemError, MemoryGovernor, PressureLevel,
    ReclaimError, Reclaimer, ReclaimerHandle, StatsSourceHandle,
};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::SeriesId;
use crate::error::{FlushError, IngestError, OpenError, QueryError};
use crate::flusher::{Recovery, SegmentFlusher};
use crate::gorilla::Point;
use crate::memtable::{AppendStop, Memtable, MemtableMemory};
use crate::segment::{self, SegmentMeta};

const ENGINE: EngineId = EngineId::Timeseries;

/// Longest single wait `append` hands to the governor or a timer. A longer `ingest_wait`
/// (up to "no deadline") is a series of these: no wait a caller configures is ever added to
/// an `Instant` by code that might overflow on it.
const WAIT_SLICE: Duration = Duration::from_mins(1);

/// Builds a [`TimeseriesAdapter`]; see each method for its default.
pub struct TimeseriesAdapterBuilder {
    governor: Arc<MemoryGovernor>,
    flusher: Option<Arc<dyn SegmentFlusher>>,
    reservation_chunk: usize,
    ingest_wait: Duration,
    flush_target_pct: u8,
    min_flush_bytes: Option<usize>,
    retry_min: Duration,
    retry_max: Duration,
    name: String,
}

impl std::fmt::Debug for TimeseriesAdapterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeseriesAdapterBuilder")
            .field("reservation_chunk", &self.reservation_chunk)
            .field("ingest_wait", &self.ingest_wait)
            .field("flush_target_pct", &self.flush_target_pct)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TimeseriesAdapterBuilder {
    /// Where flushed segments go (required), e.g. a [`crate::FileSegmentFlusher`].
    #[must_use]
    pub fn flusher(mut self, flusher: Arc<dyn SegmentFlusher>) -> Self {
        self.flusher = Some(flusher);
        self
    }

    /// How much the memtable reserves from the governor at a time (default 64 KiB). Larger
    /// chunks touch the governor less often; smaller ones leave less reserved-but-unused.
    #[must_use]
    pub fn reservation_chunk(mut self, bytes: usize) -> Self {
        self.reservation_chunk = bytes;
        self
    }

    /// How long one `append` may wait for memory at Critical pressure or when the budget is
    /// full, before it fails with [`IngestError::Throttled`] (default 2 s). A wait too long
    /// to represent as a deadline (e.g. `Duration::MAX`) means no deadline: the append waits
    /// until flushes or other releases make room.
    #[must_use]
    pub fn ingest_wait(mut self, wait: Duration) -> Self {
        self.ingest_wait = wait;
        self
    }

    /// A pressure-triggered flush writes until the memtable is below this share of the
    /// Timeseries limit (default 40 %).
    #[must_use]
    pub fn flush_target_pct(mut self, pct: u8) -> Self {
        self.flush_target_pct = pct;
        self
    }

    /// Smallest flush the worker starts on its own (default: 4 reservation chunks), so global
    /// pressure from other engines does not make it write a stream of tiny segments.
    #[must_use]
    pub fn min_flush_bytes(mut self, bytes: usize) -> Self {
        self.min_flush_bytes = Some(bytes);
        self
    }

    /// Back-off between retries of a failed flush: doubles from `min` up to `max`
    /// (defaults 10 ms and 2 s).
    #[must_use]
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    /// Consumer name in governor snapshots (default `timeseries-memtable`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Recovers the segments in the store (verifying each by checksum), registers the
    /// adapter as the Timeseries reclaimer and stats source, and starts its flush worker.
    /// Must be called inside a tokio runtime.
    pub async fn open(self) -> Result<TimeseriesAdapter, OpenError> {
        let invalid = |field, reason: &str| OpenError::InvalidConfig {
            field,
            reason: reason.to_owned(),
        };
        let flusher = self.flusher.ok_or_else(|| {
            invalid(
                "flusher",
                "no segment flusher given; call .flusher(Arc::new(FileSegmentFlusher::new(dir)?))",
            )
        })?;
        if self.reservation_chunk == 0 {
            return Err(invalid("reservation_chunk", "must be > 0"));
        }
        if self.flush_target_pct == 0 || self.flush_target_pct >= 100 {
            return Err(invalid(
                "flush_target_pct",
                "must be between 1 and 99 (percent of the Timeseries limit)",
            ));
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return Err(invalid("retry_backoff", "need 0 < min <= max"));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| OpenError::NoRuntime(e.to_string()))?;

        let recovery = flusher.recover().await.map_err(OpenError::Store)?;
        // Above every id the store has seen, quarantined and partial files included: an id
        // handed out twice would put two segments' evidence under one name.
        let highest = recovery
            .segments
            .iter()
            .map(|m| m.id)
            .max()
            .max(recovery.highest_id);
        let next_id = match highest {
            None => 1,
            Some(h) => h
                .checked_add(1)
                .ok_or(OpenError::SegmentIdsExhausted { highest: h })?,
        };
        let mut mem = Memtable::new(Arc::clone(&self.governor), self.reservation_chunk);
        mem.load_segments(recovery.segments.clone());

        let inner = Arc::new(Inner {
            governor: Arc::clone(&self.governor),
            flusher,
            cfg: Config {
                chunk: self.reservation_chunk,
                ingest_wait: self.ingest_wait,
                flush_target_pct: self.flush_target_pct,
                min_flush_bytes: self
                    .min_flush_bytes
                    .unwrap_or(self.reservation_chunk.saturating_mul(4)),
                retry_min: self.retry_min,
                retry_max: self.retry_max,
                name: self.name,
            },
            mem: Mutex::new(mem),
            flush_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            next_segment: AtomicU64::new(next_id),
            closed: AtomicBool::new(false),
            stats: Counters::default(),
        });

        let reclaimer = self
            .governor
            .register_reclaimer(ENGINE, Arc::new(AdapterReclaimer(Arc::downgrade(&inner))));
        let stats_handle = self
            .governor
            .register_consumer_stats(Arc::new(AdapterStats(Arc::downgrade(&inner))));
        let worker = runtime.spawn(flush_worker(Arc::downgrade(&inner)));
        Ok(TimeseriesAdapter {
            inner,
            recovery: RecoveryReport::from(recovery),
            worker,
            _reclaimer: reclaimer,
            _stats: stats_handle,
        })
    }
}

/// What `open` found on disk.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Segments verified and in use.
    pub segments_loaded: usize,
    /// Points in those segments.
    pub points_loaded: u64,
    /// Segments that failed verification (torn or corrupt): reported here and in a `tracing`
    /// error event, quarantined, and **not** used.
    pub corrupt: Vec<crate::SegmentError>,
    /// Where each of `corrupt` was moved for inspection, in the same order (never over an
    /// earlier quarantined file).
    pub quarantined: Vec<std::path::PathBuf>,
    /// Temp files of flushes that never completed, removed.
    pub removed_partial: Vec<std::path::PathBuf>,
}

impl From<Recovery> for RecoveryReport {
    fn from(r: Recovery) -> Self {
        Self {
            segments_loaded: r.segments.len(),
            points_loaded: r.segments.iter().map(|m| m.point_count).sum(),
            corrupt: r.corrupt,
            quarantined: r.quarantined,
            removed_partial: r.removed_partial,
        }
    }
}

/// Counters of what the adapter did since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeseriesStats {
    /// Points stored by `append`.
    pub points_ingested: u64,
    /// Segments written durably.
    pub flushes: u64,
    /// Flush attempts that failed (the data stayed in memory).
    pub flush_failures: u64,
    /// Segment bytes written durably.
    pub bytes_flushed: u64,
    /// Time spent in successful segment writes, in microseconds.
    pub flush_micros: u64,
    /// Appends that gave up with [`IngestError::Throttled`].
    pub throttled: u64,
    /// Appends that had to wait for memory.
    pub waits: u64,
    /// Reclaim requests served for the governor.
    pub reclaims: u64,
}

#[derive(Debug, Default)]
struct Counters {
    points_ingested: AtomicU64,
    flushes: AtomicU64,
    flush_failures: AtomicU64,
    bytes_flushed: AtomicU64,
    flush_micros: AtomicU64,
    throttled: AtomicU64,
    waits: AtomicU64,
    reclaims: AtomicU64,
}

struct Config {
    chunk: usize,
    ingest_wait: Duration,
    flush_target_pct: u8,
    min_flush_bytes: usize,
    retry_min: Duration,
    retry_max: Duration,
    name: String,
}

struct Inner {
    governor: Arc<MemoryGovernor>,
    flusher: Arc<dyn SegmentFlusher>,
    cfg: Config,
    mem: Mutex<Memtable>,
    /// One flush at a time: keeps "retry the oldest failed batch first" simple and bounds the
    /// flush I/O to one stream.
    flush_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    next_segment: AtomicU64,
    closed: AtomicBool,
    stats: Counters,
}

/// A Timeseries engine whose memtables live inside the governor's Timeseries budget.
///
/// Dropping it stops the flush worker and unregisters it from the governor; data not yet
/// flushed is lost with the process, as with any memtable: call
/// [`TimeseriesAdapter::flush_all`] before a planned shutdown.
pub struct TimeseriesAdapter {
    inner: Arc<Inner>,
    recovery: RecoveryReport,
    worker: JoinHandle<()>,
    _reclaimer: ReclaimerHandle,
    _stats: StatsSourceHandle,
}

impl std::fmt::Debug for TimeseriesAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeseriesAdapter")
            .field("memory", &self.memory())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for TimeseriesAdapter {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.worker.abort();
    }
}

impl TimeseriesAdapter {
    /// Starts building an adapter on `governor` (which must configure `EngineId::Timeseries`).
    pub fn builder(governor: Arc<MemoryGovernor>) -> TimeseriesAdapterBuilder {
        TimeseriesAdapterBuilder {
            governor,
            flusher: None,
            reservation_chunk: 64 * 1024,
            ingest_wait: Duration::from_secs(2),
            flush_target_pct: 40,
            min_flush_bytes: None,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_secs(2),
            name: "timeseries-memtable".to_owned(),
        }
    }

    /// What `open` recovered from disk.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Appends `points` (strictly increasing timestamps) to `series`.
    ///
    /// Fast path: the points go into the series' Gorilla block under a short lock, drawing on
    /// headroom reserved a chunk at a time. When headroom runs out the reservation grows with
    /// `try_grow`; at Warning pressure the flush worker is woken. At Critical pressure, or
    /// when the budget is full, the append waits (bounded by `ingest_wait`) for flushes to
    /// free memory and for `governor.reserve(..).await`, then fails with
    /// [`IngestError::Throttled`]. On any error, `points[..err.accepted()]` are stored and
    /// the rest are not: nothing is half-stored.
    pub async fn append(&self, series: SeriesId, points: &[Point]) -> Result<(), IngestError> {
        let inner = &*self.inner;
        let gov = &inner.governor;
        let mut accepted = 0;
        let mut started: Option<Instant> = None;
        let mut absorbed = false;
        loop {
            if inner.closed.load(Ordering::Acquire) {
                return Err(IngestError::Closed { accepted });
            }
            let pressure = gov.engine_pressure(ENGINE);
            let allow_grow = pressure < PressureLevel::Critical;
            let (n, stop) = {
                let mut mem = inner.mem.lock();
                let out = mem.append(series, &points[accepted..], allow_grow);
                if absorbed {
                    mem.trim();
                }
                out
            };
            accepted += n;
            inner
                .stats
                .points_ingested
                .fetch_add(n as u64, Ordering::Relaxed);
            match stop {
                AppendStop::Done => {
                    if pressure >= PressureLevel::Warning {
                        inner.wake.notify_one();
                    }
                    return Ok(());
                }
                AppendStop::OutOfOrder { last, got } => {
                    return Err(IngestError::OutOfOrder {
                        series,
                        accepted,
                        last,
                        got,
                    });
                }
                AppendStop::NeedMemory { bytes, cause } => {
                    inner.wake.notify_one();
                    let t0 = *started.get_or_insert_with(|| {
                        inner.stats.waits.fetch_add(1, Ordering::Relaxed);
                        Instant::now()
                    });
                    // `None`: a wait too long to add to an Instant (`Duration::MAX`) has no
                    // deadline; it still wakes on every event below, one slice at a time.
                    let deadline = t0.checked_add(inner.cfg.ingest_wait);
                    let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
                    let throttled = |cause: Option<MemError>| {
                        inner.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        let err = IngestError::Throttled {
                            series,
                            accepted,
                            waited: t0.elapsed(),
                            pressure: gov.engine_pressure(ENGINE),
                            cause,
                        };
                        tracing::warn!(engine = %ENGINE, series = %series, accepted,
                            rejected = points.len() - accepted, error = %err, "ingest throttled");
                        err
                    };
                    if past_deadline() {
                        return Err(throttled(cause));
                    }
                    let slice = deadline.map_or(WAIT_SLICE, |d| {
                        d.saturating_duration_since(Instant::now()).min(WAIT_SLICE)
                    });
                    if !allow_grow {
                        // Critical: wait for flushes to bring pressure down, bounded.
                        let mut rx = gov.subscribe_pressure(ENGINE);
                        match tokio::time::timeout(
                            slice,
                            rx.wait_for(|p| *p < PressureLevel::Critical),
                        )
                        .await
                        {
                            // The governor is gone: no flush can ever lower the pressure.
                            Ok(Err(_)) => return Err(throttled(cause)),
                            // Pressure dropped, or a slice ended: the loop re-checks both.
                            Ok(Ok(_)) | Err(_) => continue,
                        }
                    }
                    // A whole chunk if it can be had, never more than the limit (a request the
                    // limit can never satisfy would only be refused).
                    let ask = bytes.max(inner.cfg.chunk).min(gov.limit(ENGINE)).max(bytes);
                    match gov.reserve(ENGINE, ask, slice).await {
                        Ok(token) => {
                            inner.mem.lock().absorb(token);
                            absorbed = true;
                        }
                        Err(e @ MemError::Timeout { .. }) if past_deadline() => {
                            return Err(throttled(Some(e)));
                        }
                        // One slice of a longer wait ended: try the memtable again.
                        Err(MemError::Timeout { .. }) => {}
                        Err(_) => {
                            // Refused without waiting (e.g. over the limit right now): give
                            // the flush worker a moment, within the same bound.
                            tokio::time::sleep(slice.min(Duration::from_millis(2))).await;
                        }
                    }
                }
            }
        }
    }

    /// Points of `series` with timestamps in `range`, from memory and flushed segments,
    /// merged in time order. Each segment block read is verified by its checksum; a corrupt
    /// block is an error, not a silently shorter answer.
    pub async fn query(
        &self,
        series: SeriesId,
        range: RangeInclusive<i64>,
    ) -> Result<Vec<Point>, QueryError> {
        let snap = self
            .inner
            .mem
            .lock()
            .snapshot(series, &range)
            .map_err(|source| QueryError::Memtable { series, source })?;
        let mut out = snap.points;
        for batch in &snap.frozen {
            if let Some(block) = batch.block(series) {
                for p in block {
                    let p = p.map_err(|source| QueryError::Memtable { series, source })?;
                    if range.contains(&p.ts) {
                        out.push(p);
                    }
                }
            }
        }
        for seg in &snap.segments {
            if let Some(block) = self.inner.flusher.read_block(seg, series).await? {
                segment::decode_block_into(seg, series, &block, &range, &mut out)?;
            }
        }
        // Blocks of one series never interleave, but a batch whose flush failed and was
        // retried can land after a later one, so sort (stable: equal timestamps keep order).
        out.sort_by_key(|p| p.ts);
        Ok(out)
    }

    /// Flushes everything in memory. Returns the bytes given back to the governor, or the
    /// first flush error (the data stays in memory; call again to retry).
    pub async fn flush_all(&self) -> Result<usize, FlushError> {
        Inner::flush(&self.inner, usize::MAX).await
    }

    /// Memory breakdown of the memtable (see [`MemtableMemory`]).
    pub fn memory(&self) -> MemtableMemory {
        self.inner.mem.lock().memory()
    }

    /// Counters since open.
    pub fn stats(&self) -> TimeseriesStats {
        let c = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TimeseriesStats {
            points_ingested: l(&c.points_ingested),
            flushes: l(&c.flushes),
            flush_failures: l(&c.flush_failures),
            bytes_flushed: l(&c.bytes_flushed),
            flush_micros: l(&c.flush_micros),
            throttled: l(&c.throttled),
            waits: l(&c.waits),
            reclaims: l(&c.reclaims),
        }
    }

    /// Segments currently visible to queries.
    pub fn segments(&self) -> Vec<Arc<SegmentMeta>> {
        self.inner.mem.lock().segments()
    }

    /// Wakes the flush worker now (it otherwise wakes on pressure changes and on ingest).
    pub fn schedule_flush(&self) {
        self.inner.wake.notify_one();
    }
}

impl Inner {
    /// Flushes: first any frozen batches (oldest first: a failed flush is retried before new
    /// data is frozen), then freezes and writes the largest/oldest series until `target`
    /// bytes were given back. Stops at the first failure, keeping the failed batch in memory.
    ///
    /// The flush runs as its own task, so a caller that stops waiting (a reclaim cut off by
    /// the governor's timeout, a dropped `flush_all`) never abandons a segment write half
    /// way: the write finishes, and is published, on its own.
    async fn flush(self: &Arc<Self>, target: usize) -> Result<usize, FlushError> {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.flush_in_task(target).await })
            .await
            .map_err(|e| FlushError::Other(format!("flush task failed: {e}")))?
    }

    async fn flush_in_task(&self, target: usize) -> Result<usize, FlushError> {
        let _one_at_a_time = self.flush_lock.lock().await;
        let mut released = 0usize;
        loop {
            let batch = {
                let mut mem = self.mem.lock();
                match mem.oldest_frozen() {
                    Some(b) => Some(b),
                    None if released < target => {
                        let id = self
                            .next_segment
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| {
                                id.checked_add(1)
                            })
                            .map_err(|_| {
                                FlushError::Other(
                                    "segment ids exhausted (the next id would wrap to 0)"
                                        .to_owned(),
                                )
                            })?;
                        mem.freeze(target - released, id)
                    }
                    None => None,
                }
            };
            let Some(batch) = batch else {
                return Ok(released);
            };
            let t = Instant::now();
            match self.flusher.write_segment(Arc::clone(&batch)).await {
                Ok(meta) => {
                    let file_len = meta.file_len;
                    let points = meta.point_count;
                    let done = self.mem.lock().publish(batch.id, meta);
                    released += done.released;
                    let s = &self.stats;
                    s.flushes.fetch_add(1, Ordering::Relaxed);
                    s.bytes_flushed.fetch_add(file_len, Ordering::Relaxed);
                    s.flush_micros
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    tracing::debug!(engine = %ENGINE, segment = batch.id, points, bytes = file_len,
                        released = done.released, "segment flushed");
                }
                Err(err) => {
                    self.stats.flush_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(engine = %ENGINE, segment = batch.id,
                        points = batch.point_count(), held_bytes = batch.heap_bytes(),
                        error = %err, "segment flush failed; data kept in memory, will retry");
                    return Err(err);
                }
            }
        }
    }

    /// How much the worker should flush now (0 = nothing).
    fn flush_need(&self) -> usize {
        let pressure = self
            .governor
            .engine_pressure(ENGINE)
            .max(self.governor.global_pressure());
        let mem = self.mem.lock();
        if mem.has_frozen() {
            return 1; // retry the failed batch
        }
        if pressure < PressureLevel::Warning {
            return 0;
        }
        let limit = self.governor.limit(ENGINE);
        let goal = limit / 100 * usize::from(self.cfg.flush_target_pct);
        let over = mem.used().saturating_sub(goal);
        let flushable = mem.flushable();
        if flushable < self.cfg.min_flush_bytes.min(over.max(1)) {
            return 0;
        }
        over.max(self.cfg.min_flush_bytes).min(flushable)
    }
}

async fn flush_worker(weak: Weak<Inner>) {
    let (mut engine_rx, mut global_rx, retry_min) = {
        let Some(inner) = weak.upgrade() else { return };
        (
            inner.governor.subscribe_pressure(ENGINE),
            inner.governor.subscribe_global_pressure(),
            inner.cfg.retry_min,
        )
    };
    let mut backoff = retry_min;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let need = inner.flush_need();
        if need > 0 {
            match inner.flush(need).await {
                Ok(released) if released > 0 || !inner.mem.lock().has_frozen() => {
                    backoff = inner.cfg.retry_min;
                    if released > 0 {
                        continue;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let wait = backoff;
                    backoff = backoff.saturating_mul(2).min(inner.cfg.retry_max);
                    drop(inner);
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
        }
        // Sleep until ingest, a pressure change, or a periodic check wakes us. The periodic
        // check covers a wake-up that raced with the previous flush.
        let notified = inner.wake.notified();
        tokio::select! {
            () = notified => {}
            _ = engine_rx.changed() => {}
            _ = global_rx.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// The adapter as the governor sees it when another engine needs memory back.
struct AdapterReclaimer(Weak<Inner>);

#[async_trait]
impl Reclaimer for AdapterReclaimer {
    fn reclaimable(&self) -> usize {
        // Cheap and non-blocking, as the trait asks: a busy memtable reports nothing now.
        self.0
            .upgrade()
            .and_then(|i| i.mem.try_lock().map(|m| m.flushable()))
            .unwrap_or(0)
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let Some(inner) = self.0.upgrade() else {
            return Ok(0);
        };
        inner.stats.reclaims.fetch_add(1, Ordering::Relaxed);
        inner
            .flush(target.max(1))
            .await
            .map_err(|e| ReclaimError::new(format!("timeseries flush failed: {e}")))
    }
}

/// Publishes the memtable into governor snapshots.
struct AdapterStats(Weak<Inner>);

impl ConsumerStatsSource for AdapterStats {
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        let Some(inner) = self.0.upgrade() else {
            return Vec::new();
        };
        let mem = inner.mem.lock();
        vec![ConsumerSnapshot {
            engine: ENGINE,
            name: inner.cfg.name.clone(),
            reserved: mem.reserved(),
            peak: mem.peak(),
            denials: inner.stats.throttled.load(Ordering::Relaxed),
            // Frozen bytes cannot be given back until their segment is durable.
            pinned: mem.frozen_bytes(),
        }]
    }
}
