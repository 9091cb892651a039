//! [`GovernedWriteBuffer`]: items waiting to be written to a store, paid for by a
//! reservation that grows a chunk at a time and shrinks only once a batch is durable.
//!
//! ```text
//!  append(item) ── headroom? ─ yes ─▶ pending (seq n)        flush()
//!       │ no                                 │         ┌──────────────────────────────┐
//!       ├─ pressure < Critical: try_grow(chunk)          │ pending ─▶ in-flight batch   │
//!       ├─ denied / Critical: flush, reclaim, then wait  │ sink.write(batch) (blocking) │
//!       │   for pressure < Critical or reserve().await   │ Ok  → drop batch, shrink     │
//!       └─ still nothing: AppendError::Throttled(item)   │ Err → keep batch, retry next │
//!                                                        └──────────────────────────────┘
//!  after an append: flush when pending ≥ flush_bytes, or at Warning when ≥ min_flush_bytes
//! ```
//!
//! Rules the code keeps:
//! - **Reserve before allocate.** Every byte the buffer holds (the pending vector's capacity,
//!   the items' heap, the in-flight batch) is covered by its reservation before it exists;
//!   `reserved - used` stays below one chunk after a flush.
//! - **Nothing lost, nothing twice.** Each item gets a sequence number; it is in the
//!   pending vector or in the in-flight batch until the sink has returned `Ok` for its
//!   batch, and a failed batch is written again, whole and first, before anything newer.
//! - **Cancel-safe, and a drop writes once.** A flush's write runs on a blocking task
//!   that owns the flush lock and records the outcome itself, so a `flush()` future dropped
//!   mid-write leaves the write running to completion and booked: the next flush waits for
//!   it and finds nothing in flight. The buffer's last owner (the buffer, or an in-flight
//!   write that outlives it) writes what is left when it lets go, so a buffer dropped during
//!   a write neither writes that batch again nor waits for it.
//! - **Readers see everything.** [`GovernedWriteBuffer::visit`] shows in-flight and
//!   pending items with their sequence numbers; a store that records the last sequence
//!   number it holds lets readers skip what is already stored.

mod budget;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use governor_core::{
    ConsumerSnapshot, ConsumerStatsSource, EngineId, MemError, MemoryGovernor, PressureLevel,
    ReclaimError, Reclaimer, ReclaimerHandle, StatsSourceHandle,
};
use parking_lot::Mutex;

use crate::error::{AppendError, AppendRefusal, FlushError, PersistError};
use budget::Budget;

/// The longest single wait inside one append; longer waits (up to `Duration::MAX`) are
/// made of several, so no deadline arithmetic can overflow.
const WAIT_STEP: Duration = Duration::from_secs(1);

/// Growth of the pending vector, in items: doubling, but at most this many at a time so
/// the unused tail stays small next to a chunk.
const MAX_GROW_ITEMS: usize = 4096;

/// An item's memory beyond its inline size (its heap: strings, vectors, byte buffers).
pub trait Weighted {
    /// Heap bytes the item owns.
    fn heap_bytes(&self) -> usize;
}

impl Weighted for Vec<u8> {
    fn heap_bytes(&self) -> usize {
        self.capacity()
    }
}

/// Items handed to the sink in one write, oldest first, numbered consecutively from
/// [`Batch::first_seq`].
#[derive(Debug)]
pub struct Batch<T> {
    items: Vec<T>,
    first_seq: u64,
    bytes: usize,
}

impl<T> Batch<T> {
    /// The items, oldest first.
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Sequence number of the first item.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Sequence number of the last item (`first_seq - 1` for an empty batch).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.items.len() as u64 - 1
    }

    /// Bytes the batch is charged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Where a buffer's batches go: the store. `write` must make the whole batch durable
/// before returning `Ok`, or return an error having made none of it visible to readers
/// that skip stored items by sequence number (a store transaction does both).
pub trait BatchSink<T>: Send + Sync {
    /// Writes `batch` to the store. Runs on a blocking thread.
    fn write(&self, batch: &Batch<T>) -> Result<(), PersistError>;
}

/// Figures of one buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Items waiting (pending and in flight).
    pub items: usize,
    /// Bytes they use.
    pub used_bytes: usize,
    /// Bytes reserved (used plus headroom).
    pub reserved_bytes: usize,
    /// Highest `reserved_bytes` seen.
    pub peak_reserved_bytes: usize,
    /// Items appended since the start.
    pub appended: u64,
    /// Batches written.
    pub flushes: u64,
    /// Batches whose write failed (kept and retried).
    pub flush_failures: u64,
    /// Appends that had to wait for memory.
    pub waits: u64,
    /// Appends refused after waiting.
    pub throttled: u64,
}

#[derive(Default)]
struct Counters {
    appended: AtomicU64,
    flushes: AtomicU64,
    flush_failures: AtomicU64,
    waits: AtomicU64,
    throttled: AtomicU64,
    peak: AtomicUsize,
}

/// Builds a [`GovernedWriteBuffer`]; see [`GovernedWriteBuffer::builder`].
pub struct WriteBufferBuilder<T> {
    governor: Arc<MemoryGovernor>,
    engine: EngineId,
    sink: Arc<dyn BatchSink<T>>,
    name: String,
    chunk: usize,
    flush_bytes: usize,
    min_flush_bytes: Option<usize>,
    wait: Duration,
}

impl<T: Weighted + Send + Sync + 'static> WriteBufferBuilder<T> {
    /// Name in metrics and errors (default `write-buffer`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Bytes taken from the governor at a time (default 64 KiB).
    #[must_use]
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk = bytes;
        self
    }

    /// Pending bytes that start a flush whatever the pressure (default 4 MiB).
    #[must_use]
    pub fn flush_bytes(mut self, bytes: usize) -> Self {
        self.flush_bytes = bytes;
        self
    }

    /// Pending bytes that start a flush at Warning pressure (default a quarter of
    /// `flush_bytes`): below it a flush would cost more than it frees.
    #[must_use]
    pub fn min_flush_bytes(mut self, bytes: usize) -> Self {
        self.min_flush_bytes = Some(bytes);
        self
    }

    /// How long an append may wait for memory before it is refused (default 2 s; zero
    /// refuses at once, `Duration::MAX` waits for ever).
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Checks the settings and registers the buffer as a reclaimer of its engine (a
    /// reclaim flushes) and as a source of consumer stats.
    pub fn build(self) -> Result<GovernedWriteBuffer<T>, crate::CacheError> {
        let invalid = |field, reason: &str| crate::CacheError::InvalidConfig {
            field,
            reason: reason.to_owned(),
        };
        if self.chunk == 0 {
            return Err(invalid("chunk_bytes", "must be at least 1"));
        }
        if self.flush_bytes == 0 {
            return Err(invalid("flush_bytes", "must be at least 1"));
        }
        let min_flush = self.min_flush_bytes.unwrap_or(self.flush_bytes / 4);
        if min_flush > self.flush_bytes {
            return Err(invalid("min_flush_bytes", "must not exceed flush_bytes"));
        }
        if !self.governor.is_configured(self.engine) {
            return Err(invalid(
                "engine",
                "the governor has no budget for this engine",
            ));
        }
        let inner = Arc::new(Inner {
            governor: Arc::clone(&self.governor),
            engine: self.engine,
            sink: self.sink,
            name: self.name,
            chunk: self.chunk,
            flush_bytes: self.flush_bytes,
            min_flush,
            wait: self.wait,
            state: Mutex::new(State {
                pending: Vec::new(),
                pending_heap: 0,
                next_seq: 1,
                inflight: None,
                budget: Budget::default(),
            }),
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            counters: Counters::default(),
        });
        let reclaimer = self.governor.register_reclaimer(
            self.engine,
            Arc::new(BufferReclaimer(Arc::downgrade(&inner))),
        );
        let stats = self
            .governor
            .register_consumer_stats(Arc::new(BufferStatsSource(Arc::downgrade(&inner))));
        Ok(GovernedWriteBuffer {
            inner,
            _reclaimer: reclaimer,
            _stats: stats,
        })
    }
}

/// Items on their way to a store, inside an engine's budget.
///
/// Pick it for the write path of an engine whose store prefers batches (a B-tree
/// transaction per batch, an update log): appends are cheap and bounded, flushes follow
/// size and pressure, and a failing store never loses an item. Needs a Tokio runtime
/// (flushes run the sink on the blocking pool; appends may wait).
///
/// ```
/// use std::sync::Arc;
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
/// use governed_blocks::{Batch, BatchSink, GovernedWriteBuffer, PersistError};
///
/// struct Log(parking_lot::Mutex<Vec<Vec<u8>>>);
/// impl BatchSink<Vec<u8>> for Log {
///     fn write(&self, batch: &Batch<Vec<u8>>) -> Result<(), PersistError> {
///         self.0.lock().extend(batch.items().iter().cloned());
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(64))
///         .engine(EngineId::Crdt, EngineBudget::new(mib(1)))
///         .build()?,
/// )?;
/// let log = Arc::new(Log(Default::default()));
/// let buffer = GovernedWriteBuffer::builder(governor.clone(), EngineId::Crdt, log.clone()).build()?;
/// buffer.append(b"update".to_vec()).await.map_err(|e| e.reason)?;
/// assert!(governor.reserved(EngineId::Crdt) > 0);
/// buffer.flush().await?;
/// assert_eq!(log.0.lock().len(), 1);
/// assert_eq!(buffer.stats().used_bytes, 0);
/// # Ok(()) }
/// ```
pub struct GovernedWriteBuffer<T: Weighted + Send + Sync + 'static> {
    inner: Arc<Inner<T>>,
    _reclaimer: ReclaimerHandle,
    _stats: StatsSourceHandle,
}

impl<T> Drop for Inner<T> {
    /// Writes what is still buffered, synchronously: items appended but not yet flushed
    /// must not vanish with the buffer. It runs when the last owner lets go: the dropped
    /// [`GovernedWriteBuffer`] when no write is in flight (on the dropping thread), else the
    /// in-flight write's blocking task once its write is booked (on that thread), so the
    /// buffer's drop never waits for a write and never writes a batch already being
    /// written. Nothing else can reach the buffer here (`&mut self`), so no lock is needed.
    /// Never panics: a sink failure or panic is logged (a destructor cannot return it);
    /// call [`GovernedWriteBuffer::flush`] first to handle errors yourself.
    fn drop(&mut self) {
        if let Err(e) = self.flush_blocking() {
            tracing::error!(buffer = %self.name, error = %e, "buffered items not written on drop");
        }
    }
}

impl<T: Weighted + Send + Sync + 'static> std::fmt::Debug for GovernedWriteBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovernedWriteBuffer")
            .field("name", &self.inner.name)
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

impl<T: Weighted + Send + Sync + 'static> GovernedWriteBuffer<T> {
    /// Starts a builder for a buffer on `engine`'s budget writing to `sink`.
    pub fn builder(
        governor: Arc<MemoryGovernor>,
        engine: EngineId,
        sink: Arc<dyn BatchSink<T>>,
    ) -> WriteBufferBuilder<T> {
        WriteBufferBuilder {
            governor,
            engine,
            sink,
            name: "write-buffer".to_owned(),
            chunk: 64 * 1024,
            flush_bytes: 4 * 1024 * 1024,
            min_flush_bytes: None,
            wait: Duration::from_secs(2),
        }
    }

    /// Bytes an item is charged: its inline size plus its heap. `None` on overflow.
    pub fn charge_for(item: &T) -> Option<usize> {
        std::mem::size_of::<T>().checked_add(item.heap_bytes())
    }

    /// Buffers `item` and returns its sequence number. Draws on reserved headroom; when it
    /// runs out, grows the reservation by a chunk (below Critical pressure). When memory
    /// cannot be had, flushes, and at Critical asks the engine's reclaimers once for the
    /// missing bytes; then waits (bounded by the configured wait) for pressure to fall
    /// below Critical or for the governor to grant the bytes; past the bound the item
    /// comes back in [`AppendError`]. After the append, flushes when the buffer reached
    /// `flush_bytes`, or `min_flush_bytes` at Warning pressure; a failing flush does not
    /// fail the append (the item is buffered; the error is logged and counted).
    ///
    /// Cancel-safe in this sense: dropped before the item was buffered (while it waits for
    /// memory), the item is dropped with the future and nothing of it stays (bytes won by
    /// a wait stay in the buffer's headroom); dropped after (during the flush that follows
    /// an append), the item stays buffered and is written by a later flush exactly as if
    /// the call had returned `Ok`. [`GovernedWriteBuffer::visit`] tells which.
    pub async fn append(&self, item: T) -> Result<u64, AppendError<T>> {
        let inner = &*self.inner;
        let refuse = |reason, item| AppendError {
            buffer: inner.name.clone(),
            reason,
            item,
        };
        let Some(needed) = Self::charge_for(&item) else {
            let reason = AppendRefusal::TooLarge {
                engine: inner.engine,
                needed: usize::MAX,
                limit: inner.governor.limit(inner.engine),
            };
            return Err(refuse(reason, item));
        };
        let limit = inner.governor.limit(inner.engine);
        if needed > limit {
            let reason = AppendRefusal::TooLarge {
                engine: inner.engine,
                needed,
                limit,
            };
            return Err(refuse(reason, item));
        }
        let mut item = item;
        let mut started: Option<Instant> = None;
        let mut asked_reclaim = false;
        loop {
            let pressure = inner.governor.engine_pressure(inner.engine);
            let allow_grow = pressure < PressureLevel::Critical;
            let (missing, cause) = match inner.try_push(item, allow_grow) {
                Ok((seq, pending)) => {
                    let flush = pending >= inner.flush_bytes
                        || (pressure >= PressureLevel::Warning && pending >= inner.min_flush);
                    if flush && let Err(e) = self.flush().await {
                        tracing::warn!(buffer = %inner.name, error = %e, "flush after append failed; data kept");
                    }
                    return Ok(seq);
                }
                Err((back, missing, cause)) => {
                    item = back;
                    (missing, cause)
                }
            };
            let t0 = *started.get_or_insert_with(|| {
                inner.counters.waits.fetch_add(1, Ordering::Relaxed);
                Instant::now()
            });
            // A flush frees the buffer's own bytes: try that before waiting on others.
            if inner.has_data() && self.flush().await.is_ok() {
                continue;
            }
            let remaining = inner.wait.saturating_sub(t0.elapsed());
            if remaining.is_zero() {
                inner.counters.throttled.fetch_add(1, Ordering::Relaxed);
                let reason = AppendRefusal::Throttled {
                    engine: inner.engine,
                    needed: missing,
                    waited: t0.elapsed(),
                    pressure: inner.governor.engine_pressure(inner.engine),
                    cause: cause.map(Box::new),
                };
                tracing::warn!(buffer = %inner.name, %reason, "append throttled");
                return Err(refuse(reason, item));
            }
            let step = remaining.min(WAIT_STEP);
            if allow_grow {
                // The budget is full: wait for the governor (it asks reclaimers for us).
                let ask = missing.max(inner.chunk).min(limit).max(missing);
                match inner.governor.reserve(inner.engine, ask, step).await {
                    Ok(token) => inner.state.lock().budget.absorb(token),
                    Err(MemError::Timeout { .. }) => {}
                    Err(_) => {
                        // Refused outright (over the limit at this moment): let others run,
                        // within the same bound.
                        tokio::time::sleep(step.min(Duration::from_millis(5))).await;
                    }
                }
            } else {
                if !asked_reclaim {
                    // Critical: ask the engine's own reclaimers (a cache sheds, this buffer
                    // flushes) for what we miss, once per append, then wait for the level.
                    asked_reclaim = true;
                    inner.governor.reclaim_from(inner.engine, missing).await;
                    continue;
                }
                let mut rx = inner.governor.subscribe_pressure(inner.engine);
                let _ =
                    tokio::time::timeout(step, rx.wait_for(|p| *p < PressureLevel::Critical)).await;
            }
        }
    }

    /// Writes everything buffered: first a batch whose earlier write failed, then the
    /// pending items as one batch. Returns the bytes given back to the governor. On a
    /// sink failure the batch stays buffered and readable, and the next flush writes it
    /// first. One flush runs at a time; appends continue meanwhile.
    ///
    /// Cancel-safe: dropped while it waits for another flush, nothing happened; dropped
    /// once its write started, the write runs to completion on its blocking task and its
    /// outcome is booked there (written items leave the buffer, a failed batch stays for
    /// the next flush), and the next flush waits for it. No item is ever written twice
    /// because a flush was cancelled, so calling `flush` again after a cancelled one is
    /// always right.
    pub async fn flush(&self) -> Result<usize, FlushError> {
        self.inner.flush().await
    }

    /// Calls `f` with every buffered item and its sequence number, oldest first (the
    /// in-flight batch, then pending items), under the buffer's lock: keep `f` short.
    pub fn visit(&self, mut f: impl FnMut(u64, &T)) {
        let st = self.inner.state.lock();
        if let Some(b) = &st.inflight {
            for (i, item) in b.items.iter().enumerate() {
                f(b.first_seq + i as u64, item);
            }
        }
        let first = st.next_seq - st.pending.len() as u64;
        for (i, item) in st.pending.iter().enumerate() {
            f(first + i as u64, item);
        }
    }

    /// Current figures.
    pub fn stats(&self) -> BufferStats {
        self.inner.stats()
    }

    /// The engine it draws on.
    pub fn engine(&self) -> EngineId {
        self.inner.engine
    }
}

struct State<T> {
    pending: Vec<T>,
    pending_heap: usize,
    /// Sequence number the next append gets.
    next_seq: u64,
    /// The batch being written, or whose write failed (written first next time).
    inflight: Option<Arc<Batch<T>>>,
    budget: Budget,
}

impl<T> State<T> {
    fn used(&self) -> usize {
        self.pending.capacity() * std::mem::size_of::<T>()
            + self.pending_heap
            + self.inflight.as_ref().map_or(0, |b| b.bytes)
    }

    fn items(&self) -> usize {
        self.pending.len() + self.inflight.as_ref().map_or(0, |b| b.items.len())
    }
}

struct Inner<T> {
    governor: Arc<MemoryGovernor>,
    engine: EngineId,
    sink: Arc<dyn BatchSink<T>>,
    name: String,
    chunk: usize,
    flush_bytes: usize,
    min_flush: usize,
    wait: Duration,
    state: Mutex<State<T>>,
    /// Held by the blocking task that writes, for the whole write and its booking; shared
    /// so that task can own it past a cancelled `flush()` future.
    flush_lock: Arc<tokio::sync::Mutex<()>>,
    counters: Counters,
}

type PushRefused<T> = (T, usize, Option<MemError>);

/// The writing half, without bounds on `T`: the destructor needs it too.
impl<T> Inner<T> {
    /// The next batch to write: a failed one again, else the pending items.
    fn next_batch(&self) -> Option<Arc<Batch<T>>> {
        let mut st = self.state.lock();
        if let Some(b) = &st.inflight {
            return Some(Arc::clone(b));
        }
        if st.pending.is_empty() {
            return None;
        }
        let bytes = st.pending.capacity() * std::mem::size_of::<T>() + st.pending_heap;
        let items = std::mem::take(&mut st.pending);
        let first_seq = st.next_seq - items.len() as u64;
        st.pending_heap = 0;
        let batch = Arc::new(Batch {
            items,
            first_seq,
            bytes,
        });
        st.inflight = Some(Arc::clone(&batch));
        Some(batch)
    }

    /// Records a batch's outcome; on success drops it and gives back its bytes (keeping at
    /// most a chunk of headroom). Returns the bytes given back.
    fn finish(
        &self,
        batch: &Arc<Batch<T>>,
        result: Result<(), PersistError>,
    ) -> Result<usize, FlushError> {
        match result {
            Ok(()) => {
                let mut st = self.state.lock();
                // Only the flush lock's holder writes, so the batch in flight is this one.
                // Should that ever not hold, keep what is there (it is not written yet)
                // rather than panic, possibly inside a destructor.
                if st.inflight.as_ref().is_some_and(|b| Arc::ptr_eq(b, batch)) {
                    st.inflight = None;
                } else {
                    tracing::error!(buffer = %self.name, "a written batch was no longer in flight; kept what is");
                }
                let used = st.used();
                let surplus = st.budget.size().saturating_sub(used);
                let keep = surplus.min(self.chunk);
                let freed = st.budget.shrink(surplus - keep);
                drop(st);
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(freed)
            }
            Err(source) => {
                self.counters.flush_failures.fetch_add(1, Ordering::Relaxed);
                let err = FlushError {
                    buffer: self.name.clone(),
                    items: batch.items.len(),
                    bytes: batch.bytes,
                    source,
                };
                tracing::warn!(buffer = %self.name, error = %err, "flush failed; batch kept for retry");
                Err(err)
            }
        }
    }

    /// Writes and books up to a retried batch and one of pending items, on this thread.
    /// The caller holds the flush lock (or, in the destructor, is the only owner).
    fn flush_blocking(&self) -> Result<usize, FlushError> {
        let mut freed = 0;
        for _ in 0..2 {
            let Some(batch) = self.next_batch() else {
                break;
            };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.sink.write(&batch)))
                    .unwrap_or_else(|_| Err(PersistError::msg("sink panicked")));
            freed += self.finish(&batch, result)?;
        }
        Ok(freed)
    }
}

impl<T: Weighted + Send + Sync + 'static> Inner<T> {
    /// Pushes `item` if its bytes (and the vector's growth) can be covered now; returns its
    /// sequence number and the pending bytes, or the item with the bytes missing.
    fn try_push(&self, item: T, allow_grow: bool) -> Result<(u64, usize), PushRefused<T>> {
        let size = std::mem::size_of::<T>();
        let heap = item.heap_bytes();
        let mut st = self.state.lock();
        let (len, cap) = (st.pending.len(), st.pending.capacity());
        let grow_items = if len == cap {
            cap.clamp(16, MAX_GROW_ITEMS)
        } else {
            0
        };
        let Some(need) = (grow_items * size).checked_add(heap) else {
            return Err((item, usize::MAX, None));
        };
        let used = st.used();
        let head = st.budget.size().saturating_sub(used);
        if head < need {
            let missing = need - head;
            if !allow_grow {
                return Err((item, missing, None));
            }
            // Top up to a whole chunk of headroom so the next appends need not ask.
            let want = need.max(self.chunk) - head;
            if let Err(e) = st.budget.try_grow(&self.governor, self.engine, want) {
                if want == missing {
                    return Err((item, missing, Some(e)));
                }
                if let Err(e) = st.budget.try_grow(&self.governor, self.engine, missing) {
                    return Err((item, missing, Some(e)));
                }
            }
        }
        if grow_items > 0 {
            st.pending.reserve_exact(grow_items);
        }
        st.pending.push(item);
        st.pending_heap += heap;
        let seq = st.next_seq;
        st.next_seq += 1;
        let reserved = st.budget.size();
        let pending = st.used();
        debug_assert!(
            pending <= reserved,
            "buffer uses {pending} B, reserved {reserved} B"
        );
        drop(st);
        self.counters.appended.fetch_add(1, Ordering::Relaxed);
        self.counters.peak.fetch_max(reserved, Ordering::Relaxed);
        Ok((seq, pending))
    }

    fn has_data(&self) -> bool {
        self.state.lock().items() > 0
    }

    /// Takes the flush lock, then, in the same poll (no cancellation point between),
    /// hands it to a blocking task that writes *and* books the outcome: a dropped future
    /// detaches the task, which still records what it wrote and only then lets the next
    /// flush in.
    async fn flush(self: &Arc<Self>) -> Result<usize, FlushError> {
        let guard = Arc::clone(&self.flush_lock).lock_owned().await;
        let inner = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let result = inner.flush_blocking();
            drop(guard);
            // `inner` may be the last owner (the buffer dropped meanwhile): its drop
            // writes what was appended since, here, after the lock is free.
            drop(inner);
            result
        });
        task.await.unwrap_or_else(|e| {
            // Only a runtime shutting down cancels a blocking task before it runs (a
            // sink's panic is caught inside); the items are still buffered.
            Err(FlushError {
                buffer: self.name.clone(),
                items: 0,
                bytes: 0,
                source: PersistError::msg(format!("flush task did not run: {e}")),
            })
        })
    }

    /// Gives back headroom, then flushes if that was not enough. Cancel-safe like
    /// [`GovernedWriteBuffer::flush`]: a reclaim dropped mid-flush leaves the write to
    /// finish and be booked; only the figure it would have returned is lost.
    async fn reclaim(self: &Arc<Self>, target: usize) -> usize {
        let mut freed = {
            let mut st = self.state.lock();
            let surplus = st.budget.size().saturating_sub(st.used());
            st.budget.shrink(surplus)
        };
        if freed < target {
            match self.flush().await {
                Ok(n) => freed += n,
                Err(e) => tracing::warn!(buffer = %self.name, error = %e, "reclaim flush failed"),
            }
            let mut st = self.state.lock();
            let surplus = st.budget.size().saturating_sub(st.used());
            freed += st.budget.shrink(surplus);
        }
        freed
    }

    fn stats(&self) -> BufferStats {
        let st = self.state.lock();
        let c = &self.counters;
        let reserved = st.budget.size();
        BufferStats {
            items: st.items(),
            used_bytes: st.used(),
            reserved_bytes: reserved,
            peak_reserved_bytes: c.peak.fetch_max(reserved, Ordering::Relaxed).max(reserved),
            appended: c.appended.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            flush_failures: c.flush_failures.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
        }
    }
}

/// The buffer as its engine's reclaimer: a reclaim flushes.
struct BufferReclaimer<T>(Weak<Inner<T>>);

#[async_trait::async_trait]
impl<T: Weighted + Send + Sync + 'static> Reclaimer for BufferReclaimer<T> {
    fn reclaimable(&self) -> usize {
        self.0.upgrade().map_or(0, |i| i.state.lock().budget.size())
    }

    /// Flushes (see [`Inner::reclaim`]). Cancel-safe: the governor may drop this future at
    /// its reclaim timeout; a write already started completes and is booked.
    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let inner = self
            .0
            .upgrade()
            .ok_or_else(|| ReclaimError::new("write buffer already dropped"))?;
        Ok(inner.reclaim(target).await)
    }
}

/// Publishes the buffer's reservation in governor snapshots.
struct BufferStatsSource<T>(Weak<Inner<T>>);

impl<T: Weighted + Send + Sync + 'static> ConsumerStatsSource for BufferStatsSource<T> {
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        let Some(inner) = self.0.upgrade() else {
            return Vec::new();
        };
        let s = inner.stats();
        vec![ConsumerSnapshot {
            engine: inner.engine,
            name: inner.name.clone(),
            reserved: s.reserved_bytes,
            peak: s.peak_reserved_bytes,
            denials: s.throttled,
            pinned: 0,
        }]
    }
}
