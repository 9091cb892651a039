//! A fuzz-style test of the whole governor: eight threads interleave reserve, async reserve,
//! grow, shrink, split, merge, drop, explicit reclaims and run-time limit and floor changes,
//! with honest, lying, slow, failing and thread-blocking reclaimers registered, while a
//! sampler checks the invariants the docs promise. At the end every token is dropped and the
//! books must be back at zero.
//!
//! It runs for `MEMGOV_FUZZ_SECS` seconds (default 3, what CI runs) with seed
//! `MEMGOV_FUZZ_SEED` (default: from the clock, printed so that a failure can be replayed):
//!
//! ```sh
//! MEMGOV_FUZZ_SECS=600 cargo test -p governor-core --test fuzz -- --nocapture
//! ```
//!
//! Duration only bounds how much is explored; nothing asserts how fast anything went.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReclaimError, ReclaimScope,
    Reclaimer, ReservationToken, kib, mib,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CEILING: usize = mib(64);
const THREADS: usize = 8;

/// (engine, limit, floor, reclaimer behaviour)
const ENGINES: [(EngineId, usize, usize, Behaviour); 5] = [
    (EngineId::Query, mib(48), mib(8), Behaviour::Honest),
    (EngineId::Vector, mib(32), mib(8), Behaviour::Liar),
    (EngineId::Timeseries, mib(32), mib(16), Behaviour::Slow),
    (EngineId::Sparse, mib(16), 0, Behaviour::Failing),
    (EngineId::Crdt, mib(16), mib(4), Behaviour::Blocking),
];

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Honest,
    Liar,
    Slow,
    Failing,
    Blocking,
}

/// Tokens parked where the engine's reclaimer can find them, and the test's own count of
/// what live tokens of each engine hold (raised after admission, lowered before release, so
/// it never exceeds what the governor has admitted).
struct Shared {
    pools: Vec<Mutex<Vec<ReservationToken>>>,
    held: Vec<AtomicUsize>,
    /// All engines together, in one atomic: the sum of the per-engine counts read one by one
    /// is not a snapshot and may add up past the ceiling although no instant did.
    total: AtomicUsize,
    stop: AtomicBool,
    ops: AtomicU64,
}

impl Shared {
    fn add(&self, slot: usize, bytes: usize) {
        self.held[slot].fetch_add(bytes, Ordering::AcqRel);
        self.total.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, slot: usize, bytes: usize) {
        self.total.fetch_sub(bytes, Ordering::AcqRel);
        self.held[slot].fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Takes tokens of `slot` out of its pool until `target` bytes are freed.
    fn free_from_pool(&self, slot: usize, target: usize) -> usize {
        let mut freed = 0;
        let mut pool = self.pools[slot].lock();
        while freed < target {
            let Some(token) = pool.pop() else { break };
            self.sub(slot, token.size());
            freed += token.size();
        }
        freed
    }
}

struct FuzzReclaimer {
    slot: usize,
    behaviour: Behaviour,
    shared: Arc<Shared>,
    calls: AtomicU64,
}

#[async_trait]
impl Reclaimer for FuzzReclaimer {
    fn reclaimable(&self) -> usize {
        self.shared.pools[self.slot]
            .lock()
            .iter()
            .map(ReservationToken::size)
            .sum()
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        match self.behaviour {
            Behaviour::Honest => Ok(self.shared.free_from_pool(self.slot, target)),
            Behaviour::Liar => Ok(target.saturating_mul(2).max(usize::MAX / 2)),
            Behaviour::Slow => {
                tokio::time::sleep(Duration::from_millis(call % 7)).await;
                Ok(self.shared.free_from_pool(self.slot, target))
            }
            Behaviour::Failing => {
                assert!(!call.is_multiple_of(3), "a reclaimer that panics");
                Err(ReclaimError::new("cannot spill: disk full"))
            }
            Behaviour::Blocking => {
                // Blocks its thread past the reclaim timeout, then frees honestly.
                std::thread::sleep(Duration::from_millis(60 + call % 40));
                Ok(self.shared.free_from_pool(self.slot, target))
            }
        }
    }
}

fn expect_typed(err: &MemError) {
    assert!(
        matches!(
            err,
            MemError::BudgetExhausted { .. }
                | MemError::GlobalCeilingExceeded { .. }
                | MemError::Timeout { .. }
                | MemError::ShrinkBeyondHeld { .. }
                | MemError::InvalidConfig { .. }
        ),
        "unexpected error: {err:?}"
    );
}

fn random_size(rng: &mut StdRng) -> usize {
    match rng.random_range(0..100) {
        0 => usize::MAX,
        1 => 1usize << 63,
        2 => usize::MAX - (1 << 30) + 1,
        3 => mib(49),
        4..=20 => 0,
        _ => rng.random_range(1..=kib(1536)),
    }
}

#[allow(clippy::too_many_lines)]
fn worker(g: &Arc<MemoryGovernor>, shared: &Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let mut mine: Vec<(usize, ReservationToken)> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        shared.ops.fetch_add(1, Ordering::Relaxed);
        let slot = rng.random_range(0..ENGINES.len());
        let engine = ENGINES[slot].0;
        match rng.random_range(0..100) {
            0..=29 => match g.try_reserve(engine, random_size(&mut rng)) {
                Ok(t) => {
                    shared.add(slot, t.size());
                    mine.push((slot, t));
                }
                Err(err) => expect_typed(&err),
            },
            30..=39 => {
                let bytes = random_size(&mut rng);
                let timeout = Duration::from_millis(rng.random_range(0..30));
                match runtime.block_on(g.reserve(engine, bytes, timeout)) {
                    Ok(t) => {
                        shared.add(slot, t.size());
                        mine.push((slot, t));
                    }
                    Err(err) => expect_typed(&err),
                }
            }
            40..=49 if !mine.is_empty() => {
                let i = rng.random_range(0..mine.len());
                let (slot, token) = &mut mine[i];
                let bytes = random_size(&mut rng);
                // Count first: between admission and our count the bytes are held but not
                // yet counted, the safe direction.
                match token.try_grow(bytes) {
                    Ok(()) => shared.add(*slot, bytes),
                    Err(err) => expect_typed(&err),
                }
            }
            50..=57 if !mine.is_empty() => {
                let i = rng.random_range(0..mine.len());
                let (slot, token) = &mut mine[i];
                let bytes = rng.random_range(0..=token.size().saturating_add(kib(64)));
                if bytes <= token.size() {
                    shared.sub(*slot, bytes);
                    token.shrink(bytes).expect("held");
                } else {
                    let err = token.shrink(bytes).unwrap_err();
                    assert!(matches!(err, MemError::ShrinkBeyondHeld { .. }), "{err}");
                }
            }
            58..=62 if !mine.is_empty() => {
                let i = rng.random_range(0..mine.len());
                let (slot, token) = &mut mine[i];
                let slot = *slot;
                if let Ok(part) = token.split(token.size() / 2) {
                    mine.push((slot, part));
                }
            }
            63..=65 if mine.len() >= 2 => {
                let (slot, other) = mine.pop().expect("two tokens");
                let i = rng.random_range(0..mine.len());
                if let Err(back) = mine[i].1.merge(other) {
                    mine.push((slot, back));
                }
            }
            66..=79 if !mine.is_empty() => {
                let i = rng.random_range(0..mine.len());
                let (slot, token) = mine.swap_remove(i);
                if rng.random_bool(0.5) {
                    // Park it where the engine's reclaimer can give it back.
                    shared.pools[slot].lock().push(token);
                } else {
                    shared.sub(slot, token.size());
                    drop(token);
                }
            }
            80..=85 => {
                let scope = match rng.random_range(0..4) {
                    0 => ReclaimScope::Borrowers,
                    1 => ReclaimScope::BorrowersExcept(engine),
                    2 => ReclaimScope::Engine(engine),
                    _ => ReclaimScope::Holders,
                };
                let wait = Duration::from_millis(rng.random_range(0..20));
                let outcome = g.reclaim_blocking(scope, random_size(&mut rng), wait);
                assert!(outcome.freed <= CEILING, "credited more than can exist");
            }
            86..=92 => {
                let (_, limit, floor, _) = ENGINES[slot];
                let new = rng.random_range(floor.max(1)..=limit);
                match g.set_limit(engine, new) {
                    Ok(()) => {}
                    Err(err) => expect_typed(&err),
                }
                if rng.random_bool(0.5) {
                    // Put it back, so that limits do not ratchet down for the whole run.
                    let _ = g.set_limit(engine, limit);
                }
            }
            93..=96 => {
                let (_, _, floor, _) = ENGINES[slot];
                let new = if rng.random_bool(0.1) {
                    usize::MAX
                } else {
                    rng.random_range(0..=floor)
                };
                match g.set_floor(engine, new) {
                    Ok(()) => {}
                    Err(err) => expect_typed(&err),
                }
            }
            _ => {
                // An over-sized charge is refused, typed; nothing is booked.
                let err = g.try_charge(engine, usize::MAX).unwrap_err();
                expect_typed(&err);
            }
        }
    }
    for (slot, token) in mine {
        shared.sub(slot, token.size());
        drop(token);
    }
}

#[test]
fn fuzz_reservations_reclaims_and_config_changes() {
    let secs: u64 = std::env::var("MEMGOV_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("MEMGOV_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    println!("fuzz: MEMGOV_FUZZ_SEED={seed} MEMGOV_FUZZ_SECS={secs}");
    let mut builder = GovernorConfig::builder()
        .global_ceiling(CEILING)
        .reclaim_timeout(Duration::from_millis(40))
        .reservation_shards(4);
    for (engine, limit, floor, _) in ENGINES {
        builder = builder.engine(engine, EngineBudget::new(limit).with_floor(floor));
    }
    let g = MemoryGovernor::new(builder.build().expect("valid")).expect("governor");
    let shared = Arc::new(Shared {
        pools: ENGINES.iter().map(|_| Mutex::new(Vec::new())).collect(),
        held: ENGINES.iter().map(|_| AtomicUsize::new(0)).collect(),
        total: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
    });
    let handles: Vec<_> = ENGINES
        .iter()
        .enumerate()
        .map(|(slot, &(engine, _, _, behaviour))| {
            g.register_reclaimer(
                engine,
                Arc::new(FuzzReclaimer {
                    slot,
                    behaviour,
                    shared: Arc::clone(&shared),
                    calls: AtomicU64::new(0),
                }),
            )
        })
        .collect();
    let rebalancer = g
        .start_rebalancer(governor_core::RebalancePolicy {
            interval: Duration::from_millis(5),
            max_step: None,
        })
        .expect("valid policy");
    let samples = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (g, shared) = (&g, &shared);
            s.spawn(move || worker(g, shared, seed.wrapping_add(t as u64)));
        }
        // The sampler: the promised invariants, at every instant it can see.
        s.spawn(|| {
            while !shared.stop.load(Ordering::Acquire) {
                let snapshot = g.snapshot();
                assert!(
                    snapshot.global_granted <= CEILING,
                    "global grant {} above the ceiling",
                    snapshot.global_granted
                );
                for (slot, &(engine, limit, _, _)) in ENGINES.iter().enumerate() {
                    let held = shared.held[slot].load(Ordering::Acquire);
                    assert!(held <= limit, "{engine} holds {held} > its limit {limit}");
                }
                let total = shared.total.load(Ordering::Acquire);
                assert!(total <= CEILING, "tokens hold {total} > the ceiling");
                samples.fetch_add(1, Ordering::Relaxed);
            }
        });
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(50));
        }
        shared.stop.store(true, Ordering::Release);
    });
    drop(rebalancer);
    for pool in &shared.pools {
        for token in pool.lock().drain(..) {
            drop(token);
        }
    }
    println!(
        "fuzz: {} operations, {} invariant samples",
        shared.ops.load(Ordering::Relaxed),
        samples.load(Ordering::Relaxed)
    );
    assert!(samples.load(Ordering::Relaxed) > 0);
    for (engine, ..) in ENGINES {
        assert_eq!(
            g.reserved(engine),
            0,
            "{engine} books did not return to zero"
        );
        assert_eq!(
            g.snapshot().engine(engine).unwrap().waiting_bytes,
            0,
            "{engine} still has waiters"
        );
    }
    assert_eq!(g.global_reserved(), 0);
    drop(handles);
}
