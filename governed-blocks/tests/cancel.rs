//! Issue 25, defects 1, 2 and 6: a flush cancelled mid-write, a buffer dropped while a
//! reclaim's flush writes, and a cache request that can never fit.
//!
//! The sink blocks on a gate the test opens, and tells the test (through a condition
//! variable, not a poll) when a write has started, so every interleaving is forced, not
//! timed. Every wait has a generous bound only so that a regression fails with a message
//! instead of hanging; no outcome depends on how long anything takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use governed_blocks::{
    Batch, BatchSink, CacheError, GovernedCache, GovernedWriteBuffer, PersistError,
};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};
use parking_lot::{Condvar, Mutex};

const ENGINE: EngineId = EngineId::Crdt;

/// The bound on every wait in these tests (never reached when the code is right).
const BOUND: Duration = Duration::from_mins(2);

fn governor(limit: usize) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(ENGINE, EngineBudget::new(limit))
            .reclaim_timeout(Duration::from_mins(2))
            .build()
            .unwrap(),
    )
    .unwrap()
}

#[derive(Default)]
struct SinkState {
    /// Writes may finish.
    open: bool,
    /// Writes that have started (entered `write`).
    started: usize,
    /// Sequence numbers written, in order, once each write finished.
    written: Vec<u64>,
    /// Set when the test's dropper thread is done (returned or unwound).
    dropped: bool,
}

/// A sink whose writes wait until the gate is open; every change of its state is announced
/// on `cv`, so the test waits for states instead of polling them.
#[derive(Default)]
struct GatedSink {
    state: Mutex<SinkState>,
    cv: Condvar,
}

impl GatedSink {
    fn open(&self) {
        self.state.lock().open = true;
        self.cv.notify_all();
    }

    fn written(&self) -> Vec<u64> {
        self.state.lock().written.clone()
    }

    /// Blocks until `cond` holds for the state; false if it did not within [`BOUND`].
    fn wait_for(&self, mut cond: impl FnMut(&SinkState) -> bool) -> bool {
        let deadline = Instant::now() + BOUND;
        let mut st = self.state.lock();
        while !cond(&st) {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return cond(&st);
            }
        }
        true
    }
}

impl BatchSink<Vec<u8>> for GatedSink {
    fn write(&self, batch: &Batch<Vec<u8>>) -> Result<(), PersistError> {
        let deadline = Instant::now() + BOUND;
        let mut st = self.state.lock();
        st.started += 1;
        self.cv.notify_all();
        while !st.open {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return Err(PersistError::msg("the test never opened the gate"));
            }
        }
        st.written
            .extend((batch.first_seq()..).take(batch.items().len()));
        self.cv.notify_all();
        Ok(())
    }
}

/// Waits, off the runtime's workers, until the sink's state satisfies `cond`.
async fn sink_reaches(
    sink: &Arc<GatedSink>,
    cond: impl FnMut(&SinkState) -> bool + Send + 'static,
) -> bool {
    let s = Arc::clone(sink);
    tokio::task::spawn_blocking(move || s.wait_for(cond))
        .await
        .unwrap()
}

/// The defect: a `flush()` future dropped while the sink was writing left its batch "in
/// flight" although the write went on to complete, so the next `flush()` wrote the same
/// batch again (the sink received items 1..=5 twice). The future is dropped at a known
/// point: after the sink has entered `write` for the first batch and before it may finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_flush_writes_each_item_once() {
    let gov = governor(mib(1));
    let sink = Arc::new(GatedSink::default());
    let buffer = GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
        .build()
        .unwrap();
    for i in 0..5u8 {
        buffer.append(vec![i; 10]).await.unwrap();
    }
    let mut flush = Box::pin(buffer.flush());
    // Drives the flush until the sink is inside `write`; the gate is shut, so the flush
    // cannot finish first (if the gate's bound ran out it would, and that is a failure).
    tokio::select! {
        biased;
        r = &mut flush => panic!("the flush returned {r:?} with the sink's gate shut"),
        started = sink_reaches(&sink, |st| st.started == 1) => {
            assert!(started, "the first write never started");
        }
    }
    drop(flush);
    buffer.append(vec![9; 10]).await.unwrap();
    sink.open();
    buffer.flush().await.unwrap();
    assert_eq!(
        sink.written(),
        [1, 2, 3, 4, 5, 6],
        "every item exactly once"
    );
    assert_eq!(buffer.stats().items, 0);
    assert_eq!(gov.reserved(ENGINE), buffer.stats().reserved_bytes);
    // A flush after that has nothing left to write.
    buffer.flush().await.unwrap();
    assert_eq!(sink.written().len(), 6);
}

/// Sets `dropped` when the dropper thread ends, returning or unwinding.
struct Dropped(Arc<GatedSink>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.state.lock().dropped = true;
        self.0.cv.notify_all();
    }
}

/// The defect: dropping the buffer while a reclaim's flush was writing wrote the in-flight
/// batch a second time from `Drop` and then panicked there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_during_reclaim_flush_writes_once_without_panic() {
    let gov = governor(mib(1));
    let sink = Arc::new(GatedSink::default());
    let buffer = GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
        .build()
        .unwrap();
    for i in 0..5u8 {
        buffer.append(vec![i; 10]).await.unwrap();
    }
    let g = gov.clone();
    let reclaim = tokio::spawn(async move { g.reclaim_from(ENGINE, mib(1)).await });
    assert!(
        sink_reaches(&sink, |st| st.started == 1).await,
        "the reclaim's write never started"
    );
    buffer.append(vec![9; 10]).await.unwrap();
    // Drop on a thread of its own: before the fix its drop wrote the in-flight batch again
    // (a second write starts and waits at the gate), after it the drop returns at once.
    let marker = Dropped(Arc::clone(&sink));
    let dropper = std::thread::spawn(move || {
        let _marker = marker;
        drop(buffer);
    });
    assert!(
        sink_reaches(&sink, |st| st.dropped || st.started >= 2).await,
        "the drop neither returned nor wrote"
    );
    sink.open();
    let dropped = tokio::task::spawn_blocking(move || dropper.join())
        .await
        .unwrap();
    assert!(dropped.is_ok(), "drop panicked");
    reclaim.await.unwrap();
    assert!(
        sink_reaches(&sink, |st| st.written.len() >= 6).await,
        "written: {:?}",
        sink.written()
    );
    assert_eq!(
        sink.written(),
        [1, 2, 3, 4, 5, 6],
        "every item exactly once"
    );
    // The batch's bytes are given back after its write returns, on the writing thread: wait
    // for that (the bound only turns a leak into a failure instead of a hang).
    let deadline = Instant::now() + BOUND;
    while gov.reserved(ENGINE) != 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped buffer's books never emptied: {} B",
            gov.reserved(ENGINE)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn impossible_load_and_resize_evict_nothing() {
    let gov = governor(kib(64));
    let cache = GovernedCache::<u32, Vec<u8>>::builder(gov.clone(), ENGINE)
        .build()
        .unwrap();
    for k in 0..10 {
        cache
            .get_or_try_load(&k, 4000, || Ok::<_, CacheError>((vec![0; 4000], 4000)))
            .unwrap();
    }
    let err = cache
        .get_or_try_load(&99, kib(64) + 1, || Ok::<_, CacheError>((Vec::new(), 0)))
        .unwrap_err();
    assert!(matches!(err, CacheError::NoRoom { .. }), "{err}");
    assert_eq!(
        cache.stats().entries,
        10,
        "an impossible load evicts nothing"
    );
    let err = cache.resize(&0, kib(64) + 1, false).unwrap_err();
    assert!(matches!(err, CacheError::NoRoom { .. }), "{err}");
    assert_eq!(
        cache.stats().entries,
        10,
        "an impossible resize evicts nothing"
    );
    assert_eq!(cache.stats().evictions, 0);
}
