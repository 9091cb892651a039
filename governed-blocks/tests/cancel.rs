//! Issue 25, defects 1, 2 and 6: a flush cancelled mid-write, a buffer dropped while a
//! reclaim's flush writes, and a cache request that can never fit. The sink blocks on a
//! gate the test opens, so every interleaving is forced, not timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use governed_blocks::{
    Batch, BatchSink, CacheError, GovernedCache, GovernedWriteBuffer, PersistError,
};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};
use parking_lot::{Condvar, Mutex};

const ENGINE: EngineId = EngineId::Crdt;

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

/// A sink whose writes wait until the gate is open; it counts the writes that started.
#[derive(Default)]
struct GatedSink {
    state: Mutex<(bool, usize, Vec<u64>)>,
    cv: Condvar,
}

impl GatedSink {
    fn open(&self) {
        self.state.lock().0 = true;
        self.cv.notify_all();
    }
    fn started(&self) -> usize {
        self.state.lock().1
    }
    fn written(&self) -> Vec<u64> {
        self.state.lock().2.clone()
    }
}

impl BatchSink<Vec<u8>> for GatedSink {
    fn write(&self, batch: &Batch<Vec<u8>>) -> Result<(), PersistError> {
        let mut st = self.state.lock();
        st.1 += 1;
        while !st.0 {
            self.cv.wait(&mut st);
        }
        st.2.extend((batch.first_seq()..).take(batch.items().len()));
        Ok(())
    }
}

/// Waits (generously) for `cond`; the loop yields, it does not time anything.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_mins(2);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_flush_writes_each_item_once() {
    let gov = governor(mib(1));
    let sink = Arc::new(GatedSink::default());
    let buffer = Arc::new(
        GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
            .build()
            .unwrap(),
    );
    for i in 0..5u8 {
        buffer.append(vec![i; 10]).await.unwrap();
    }
    let b = Arc::clone(&buffer);
    let first = tokio::spawn(async move { b.flush().await });
    let s = Arc::clone(&sink);
    tokio::task::spawn_blocking(move || wait_until("the first write starts", || s.started() == 1))
        .await
        .unwrap();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
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
}

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
    let s = Arc::clone(&sink);
    tokio::task::spawn_blocking(move || {
        wait_until("the reclaim's write starts", || s.started() == 1);
    })
    .await
    .unwrap();
    buffer.append(vec![9; 10]).await.unwrap();
    // Drop on a thread of its own: before the fix it wrote the in-flight batch again.
    let dropper = std::thread::spawn(move || drop(buffer));
    let s = Arc::clone(&sink);
    let dropper = tokio::task::spawn_blocking(move || {
        wait_until("drop returns or writes", || {
            dropper.is_finished() || s.started() >= 2
        });
        s.open();
        dropper.join()
    })
    .await
    .unwrap();
    assert!(dropper.is_ok(), "drop panicked");
    reclaim.await.unwrap();
    let s = Arc::clone(&sink);
    tokio::task::spawn_blocking(move || wait_until("all written", || s.written().len() >= 6))
        .await
        .unwrap();
    assert_eq!(
        sink.written(),
        [1, 2, 3, 4, 5, 6],
        "every item exactly once"
    );
    let g = gov.clone();
    tokio::task::spawn_blocking(move || wait_until("books empty", || g.reserved(ENGINE) == 0))
        .await
        .unwrap();
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
