//! The write buffer against a sequential model: random appends (some too big for the
//! moment), flushes with a sink that fails on demand, reclaims and outside pressure on the
//! same engine. After every step the governor's books equal the buffer's reservation,
//! which covers what it uses within one chunk after a flush, and every acknowledged item
//! is either buffered or written, exactly once, in sequence order; a refused item comes
//! back untouched.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use governed_blocks::{
    AppendRefusal, Batch, BatchSink, GovernedWriteBuffer, PersistError, Weighted,
};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};
use parking_lot::Mutex;
use proptest::prelude::*;

const ENGINE: EngineId = EngineId::Crdt;
const LIMIT: usize = 64 * 1024;
const CHUNK: usize = 4 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    id: u64,
    payload: Vec<u8>,
}

impl Weighted for Item {
    fn heap_bytes(&self) -> usize {
        self.payload.capacity()
    }
}

#[derive(Default)]
struct Sink {
    fail: AtomicBool,
    written: Mutex<Vec<(u64, Item)>>,
}

impl BatchSink<Item> for Sink {
    fn write(&self, batch: &Batch<Item>) -> Result<(), PersistError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(PersistError::msg("injected disk full"));
        }
        let mut w = self.written.lock();
        for (i, item) in batch.items().iter().enumerate() {
            w.push((batch.first_seq() + i as u64, item.clone()));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Flush,
    Fail(bool),
    Reclaim(usize),
    /// Another consumer of the same engine holds this many bytes.
    Squeeze(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3000usize).prop_map(Op::Append),
        2 => Just(Op::Flush),
        1 => proptest::bool::weighted(0.4).prop_map(Op::Fail),
        1 => (0..LIMIT).prop_map(Op::Reclaim),
        1 => (0..LIMIT).prop_map(Op::Squeeze),
    ]
}

fn governor() -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(ENGINE, EngineBudget::new(LIMIT))
            .engine(EngineId::Query, EngineBudget::new(kib(64)))
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn run(ops: &[Op]) {
    runtime().block_on(async {
        let gov = governor();
        let sink = Arc::new(Sink::default());
        let buffer = GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
            .chunk_bytes(CHUNK)
            .flush_bytes(16 * 1024)
            .min_flush_bytes(4 * 1024)
            .wait(Duration::ZERO)
            .build()
            .unwrap();
        let mut squeeze = gov.try_reserve(ENGINE, 0).unwrap();
        let mut acked: Vec<(u64, Item)> = Vec::new();
        let mut next_id = 0u64;
        for (step, op) in ops.iter().enumerate() {
            match op.clone() {
                Op::Append(len) => {
                    next_id += 1;
                    let item = Item {
                        id: next_id,
                        payload: vec![next_id as u8; len],
                    };
                    match buffer.append(item.clone()).await {
                        Ok(seq) => {
                            if let Some((last, _)) = acked.last() {
                                assert!(seq > *last, "sequence numbers increase");
                            }
                            acked.push((seq, item));
                        }
                        Err(e) => {
                            assert_eq!(e.item, item, "a refused item comes back untouched");
                            assert!(matches!(e.reason, AppendRefusal::Throttled { .. }));
                        }
                    }
                }
                Op::Flush => {
                    let failing = sink.fail.load(Ordering::SeqCst);
                    let had = buffer.stats().items;
                    let r = buffer.flush().await;
                    if failing && had > 0 {
                        assert!(r.is_err(), "a failing sink fails the flush");
                    } else {
                        r.unwrap();
                        assert_eq!(buffer.stats().items, 0);
                    }
                }
                Op::Fail(f) => sink.fail.store(f, Ordering::SeqCst),
                Op::Reclaim(bytes) => {
                    let before = gov.reserved(ENGINE);
                    let out = gov.reclaim_from(ENGINE, bytes).await;
                    assert!(out.freed <= before);
                }
                Op::Squeeze(bytes) => {
                    let _ = squeeze.try_resize(bytes);
                }
            }
            let s = buffer.stats();
            // Books: the buffer's reservation plus the squeeze token, nothing else.
            assert_eq!(
                gov.reserved(ENGINE),
                s.reserved_bytes + squeeze.size(),
                "step {step}: {op:?}"
            );
            assert!(s.used_bytes <= s.reserved_bytes, "step {step}: {s:?}");
            assert!(gov.reserved(ENGINE) <= LIMIT);
            if s.items == 0 {
                assert!(
                    s.reserved_bytes <= CHUNK,
                    "step {step}: idle buffer holds {s:?}"
                );
            }
            // Every acknowledged item exactly once: written, or buffered; in order.
            let mut buffered = Vec::new();
            buffer.visit(|seq, item| buffered.push((seq, item.clone())));
            let heap: usize = buffered.iter().map(|(_, i)| i.payload.capacity()).sum();
            assert!(
                s.used_bytes >= heap + buffered.len() * std::mem::size_of::<Item>(),
                "step {step}: used {} below what the items hold",
                s.used_bytes
            );
            let written = sink.written.lock().clone();
            let mut all = written.clone();
            all.extend(buffered);
            assert_eq!(
                all, acked,
                "step {step}: written + buffered != acknowledged"
            );
        }
        sink.fail.store(false, Ordering::SeqCst);
        drop(buffer);
        assert_eq!(*sink.written.lock(), acked, "drop writes what was buffered");
        drop(squeeze);
        assert_eq!(gov.reserved(ENGINE), 0);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn write_buffer_matches_model(ops in proptest::collection::vec(op(), 1..100)) {
        run(&ops);
    }
}

/// At Critical pressure an append that needs more memory waits instead of growing, and
/// completes once the pressure is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_waits_at_critical_then_proceeds() {
    let gov = governor();
    let sink = Arc::new(Sink::default());
    let buffer = Arc::new(
        GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
            .chunk_bytes(CHUNK)
            .wait(Duration::from_mins(2))
            .build()
            .unwrap(),
    );
    // 90 % of the limit held elsewhere: Critical (85 %).
    let hog = gov.try_reserve(ENGINE, LIMIT * 9 / 10).unwrap();
    let task = {
        let buffer = Arc::clone(&buffer);
        tokio::spawn(async move {
            buffer
                .append(Item {
                    id: 1,
                    payload: vec![1; 100],
                })
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while buffer.stats().waits == 0 {
        assert!(std::time::Instant::now() < deadline, "append never waited");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!task.is_finished());
    assert_eq!(buffer.stats().items, 0, "nothing stored while waiting");
    drop(hog);
    let seq = task.await.unwrap().unwrap();
    assert_eq!(seq, 1);
    assert_eq!(buffer.stats().items, 1);
}

/// A failed flush keeps its batch; the next flush writes it first, then newer items.
#[tokio::test(flavor = "current_thread")]
async fn failed_batch_is_retried_first() {
    let gov = governor();
    let sink = Arc::new(Sink::default());
    let buffer = GovernedWriteBuffer::builder(gov.clone(), ENGINE, sink.clone())
        .build()
        .unwrap();
    let item = |id| Item {
        id,
        payload: vec![0; 10],
    };
    buffer.append(item(1)).await.unwrap();
    buffer.append(item(2)).await.unwrap();
    sink.fail.store(true, Ordering::SeqCst);
    let err = buffer.flush().await.unwrap_err();
    assert_eq!(err.items, 2);
    let held = gov.reserved(ENGINE);
    assert!(held > 0, "the failed batch stays booked");
    buffer.append(item(3)).await.unwrap();
    sink.fail.store(false, Ordering::SeqCst);
    buffer.flush().await.unwrap();
    let ids: Vec<u64> = sink.written.lock().iter().map(|(_, i)| i.id).collect();
    assert_eq!(ids, [1, 2, 3]);
    let s = buffer.stats();
    assert_eq!((s.flushes, s.flush_failures), (2, 1));
}

#[tokio::test(flavor = "current_thread")]
async fn hostile_items_are_typed_errors() {
    struct Huge;
    impl Weighted for Huge {
        fn heap_bytes(&self) -> usize {
            usize::MAX
        }
    }
    struct Nowhere;
    impl BatchSink<Huge> for Nowhere {
        fn write(&self, _: &Batch<Huge>) -> Result<(), PersistError> {
            Ok(())
        }
    }
    let gov = governor();
    let buffer = GovernedWriteBuffer::builder(gov.clone(), ENGINE, Arc::new(Nowhere))
        .build()
        .unwrap();
    let err = buffer.append(Huge).await.unwrap_err();
    assert!(matches!(err.reason, AppendRefusal::TooLarge { .. }));
    assert_eq!(gov.reserved(ENGINE), 0);
    let bad =
        GovernedWriteBuffer::builder(gov.clone(), EngineId::Vector, Arc::new(Nowhere)).build();
    assert!(bad.is_err(), "an engine without a budget is a config error");
}
