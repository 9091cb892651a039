//! An arbitration fuzz test in the spirit of Velox's arbitration fuzzer: eight threads
//! register units of work with random priorities, costs and abort callbacks, reserve for them
//! (now or waiting, within or past their engines' floors), grow and drop, cancel their own
//! units and abort others', while hostile reclaimers (honest, lying, failing, thread-blocking)
//! serve the borrowers and the ladder aborts victims for entitled requests. A sampler checks
//! at every step that the ceiling and every limit hold.
//!
//! The only outcomes a call may have are success, a typed denial (`BudgetExhausted`,
//! `GlobalCeilingExceeded`, `Timeout`) or a typed abort (`Aborted`); anything else fails the
//! test. Nothing may hang: every thread must finish within a generous deadline after the
//! stop. At the end every token is dropped and the books must be back at zero.
//!
//! It runs for `MEMGOV_ABORT_FUZZ_SECS` seconds (default 2, what CI runs) with seed
//! `MEMGOV_ABORT_FUZZ_SEED` (default: from the clock, printed so a failure can be replayed):
//!
//! ```sh
//! MEMGOV_ABORT_FUZZ_SECS=600 cargo test --workspace --test abort_fuzz -- --nocapture
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReclaimError, Reclaimer,
    UnitToken, WorkHandle, WorkSpec, kib, mib,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CEILING: usize = mib(64);
const THREADS: usize = 8;
/// Long enough that only a hung governor can miss it.
const DEADLINE: Duration = Duration::from_mins(2);

/// (engine, limit, floor, reclaimer behaviour)
const ENGINES: [(EngineId, usize, usize, Behaviour); 4] = [
    (EngineId::Query, mib(56), mib(8), Behaviour::Honest),
    (EngineId::Vector, mib(40), mib(16), Behaviour::Liar),
    (EngineId::Timeseries, mib(32), mib(24), Behaviour::Blocking),
    (EngineId::Sparse, mib(24), 0, Behaviour::Failing),
];

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    Honest,
    Liar,
    Failing,
    Blocking,
}

/// What the test counts itself (raised after admission, lowered before release, so it never
/// exceeds what the governor admitted) and the tokens reclaimers may drop.
struct Shared {
    held: Vec<AtomicUsize>,
    total: AtomicUsize,
    /// Tokens a reclaimer of the engine may drop.
    spillable: Vec<Mutex<Vec<UnitToken>>>,
    stop: AtomicBool,
    ops: AtomicU64,
    aborts_seen: AtomicU64,
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

    fn drop_tokens(&self, slot: usize, tokens: Vec<UnitToken>) -> usize {
        let mut freed = 0;
        for token in tokens {
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
        self.shared.spillable[self.slot]
            .lock()
            .iter()
            .map(UnitToken::size)
            .sum()
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let honest = || {
            let mut pool = self.shared.spillable[self.slot].lock();
            let mut taken = Vec::new();
            let mut freed = 0;
            while freed < target {
                let Some(token) = pool.pop() else { break };
                freed += token.size();
                taken.push(token);
            }
            drop(pool);
            self.shared.drop_tokens(self.slot, taken)
        };
        match self.behaviour {
            Behaviour::Honest => Ok(honest()),
            Behaviour::Liar => Ok(target.saturating_mul(3)),
            Behaviour::Failing => {
                assert!(!call.is_multiple_of(4), "a reclaimer that panics");
                Err(ReclaimError::new("cannot spill: disk full"))
            }
            Behaviour::Blocking => {
                std::thread::sleep(Duration::from_millis(30 + call % 50));
                Ok(honest())
            }
        }
    }
}

/// One registered unit and the tokens its owner holds (dropped on abort by the callback).
struct Owned {
    slot: usize,
    handle: WorkHandle,
    tokens: Arc<Mutex<Vec<UnitToken>>>,
}

fn expect_typed(err: &MemError, shared: &Shared) {
    match err {
        MemError::BudgetExhausted { .. }
        | MemError::GlobalCeilingExceeded { .. }
        | MemError::Timeout { .. } => {}
        MemError::Aborted { .. } => {
            shared.aborts_seen.fetch_add(1, Ordering::Relaxed);
        }
        other => panic!("unexpected outcome: {other:?}"),
    }
}

fn register(g: &Arc<MemoryGovernor>, shared: &Arc<Shared>, rng: &mut StdRng) -> Owned {
    let slot = rng.random_range(0..ENGINES.len());
    let tokens: Arc<Mutex<Vec<UnitToken>>> = Arc::default();
    let mut spec = WorkSpec::new(ENGINES[slot].0, format!("unit {}", rng.random::<u16>()))
        .priority(rng.random_range(0..4));
    if rng.random_bool(0.3) {
        spec = spec.redo_cost(Duration::from_millis(rng.random_range(0..5000)));
    }
    if rng.random_bool(0.1) {
        spec = spec.unrebuildable();
    }
    match rng.random_range(0..10) {
        // Most owners stop their work and drop their memory when told.
        0..=6 => {
            let tokens = Arc::clone(&tokens);
            let shared = Arc::clone(shared);
            spec = spec.on_abort(move |err| {
                assert!(matches!(err, MemError::Aborted { .. }), "{err:?}");
                let taken = std::mem::take(&mut *tokens.lock());
                shared.drop_tokens(slot, taken);
            });
        }
        // A hostile callback: it panics (the owner notices on its next call).
        7 => spec = spec.on_abort(|_| panic!("abort callback panics")),
        // No callback: the owner notices by checking.
        _ => {}
    }
    Owned {
        slot,
        handle: g.register_work(spec),
        tokens,
    }
}

fn size(rng: &mut StdRng) -> usize {
    match rng.random_range(0..100) {
        0 => usize::MAX,
        1..=10 => 0,
        11..=20 => mib(rng.random_range(4..24)),
        _ => rng.random_range(1..=kib(2048)),
    }
}

#[allow(clippy::too_many_lines)]
fn worker(g: &Arc<MemoryGovernor>, shared: &Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let mut units: Vec<Owned> = Vec::new();
    let keep = |owned: &Owned, token: UnitToken, shared: &Shared, spill: bool| {
        shared.add(owned.slot, token.size());
        if spill {
            shared.spillable[owned.slot].lock().push(token);
        } else {
            owned.tokens.lock().push(token);
        }
    };
    while !shared.stop.load(Ordering::Acquire) {
        shared.ops.fetch_add(1, Ordering::Relaxed);
        if units.is_empty() || rng.random_range(0..10) == 0 {
            units.push(register(g, shared, &mut rng));
        }
        let i = rng.random_range(0..units.len());
        match rng.random_range(0..100) {
            0..=34 => {
                let owned = &units[i];
                match owned.handle.try_reserve(size(&mut rng)) {
                    Ok(t) => {
                        let spill = rng.random_bool(0.3);
                        keep(owned, t, shared, spill);
                    }
                    Err(err) => expect_typed(&err, shared),
                }
            }
            35..=54 => {
                let owned = &units[i];
                let timeout = Duration::from_millis(rng.random_range(0..40));
                match runtime.block_on(owned.handle.reserve(size(&mut rng), timeout)) {
                    Ok(t) => keep(owned, t, shared, false),
                    Err(err) => expect_typed(&err, shared),
                }
            }
            55..=64 => {
                // A plain engine request, entitled or not, through the ladder.
                let slot = rng.random_range(0..ENGINES.len());
                let timeout = Duration::from_millis(rng.random_range(0..40));
                match runtime.block_on(g.reserve(ENGINES[slot].0, size(&mut rng), timeout)) {
                    // Dropped at once: the test counts only unit tokens.
                    Ok(t) => drop(t),
                    Err(err) => expect_typed(&err, shared),
                }
            }
            65..=74 => {
                let owned = &units[i];
                let mut tokens = owned.tokens.lock();
                if let Some(token) = tokens.last_mut() {
                    let bytes = size(&mut rng);
                    match token.try_grow(bytes) {
                        Ok(()) => shared.add(owned.slot, bytes),
                        Err(err) => expect_typed(&err, shared),
                    }
                }
            }
            75..=84 => {
                let owned = &units[i];
                let taken = std::mem::take(&mut *owned.tokens.lock());
                shared.drop_tokens(owned.slot, taken);
            }
            85..=89 => {
                // Cancellation, of our own unit.
                units[i].handle.abort("cancelled");
            }
            _ => {
                // Done: the owner drops its memory and unregisters.
                let owned = units.swap_remove(i);
                let taken = std::mem::take(&mut *owned.tokens.lock());
                shared.drop_tokens(owned.slot, taken);
            }
        }
        // An owner without a working callback notices its abort on its own.
        for owned in &units {
            if owned.handle.check().is_err() {
                let taken = std::mem::take(&mut *owned.tokens.lock());
                shared.drop_tokens(owned.slot, taken);
            }
        }
    }
    for owned in units {
        let taken = std::mem::take(&mut *owned.tokens.lock());
        shared.drop_tokens(owned.slot, taken);
    }
}

#[test]
fn arbitration_fuzz_keeps_every_bound_and_every_outcome_typed() {
    let secs: u64 = std::env::var("MEMGOV_ABORT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("MEMGOV_ABORT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("abort fuzz: {secs} s, seed {seed} (MEMGOV_ABORT_FUZZ_SEED={seed} to replay)");
    let mut builder = GovernorConfig::builder()
        .global_ceiling(CEILING)
        .reclaim_timeout(Duration::from_millis(20))
        .abort_after(Duration::from_millis(5))
        .victim_wait(Duration::from_millis(10))
        .reservation_shards(4);
    for (engine, limit, floor, _) in ENGINES {
        builder = builder.engine(engine, EngineBudget::new(limit).with_floor(floor));
    }
    let g = MemoryGovernor::new(builder.build().expect("valid config")).expect("governor");
    let shared = Arc::new(Shared {
        held: ENGINES.iter().map(|_| AtomicUsize::new(0)).collect(),
        total: AtomicUsize::new(0),
        spillable: ENGINES.iter().map(|_| Mutex::default()).collect(),
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        aborts_seen: AtomicU64::new(0),
    });
    let _reclaimers: Vec<_> = ENGINES
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
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let g = Arc::clone(&g);
            let shared = Arc::clone(&shared);
            let done = done_tx.clone();
            std::thread::spawn(move || {
                worker(&g, &shared, seed.wrapping_add(t as u64));
                let _ = done.send(());
            })
        })
        .collect();
    // The sampler: the ceiling and the limits hold at every instant the test can see.
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let total = shared.total.load(Ordering::Acquire);
        assert!(total <= CEILING, "units hold {total} past the ceiling");
        for (slot, &(engine, limit, _, _)) in ENGINES.iter().enumerate() {
            let held = shared.held[slot].load(Ordering::Acquire);
            assert!(held <= limit, "{engine} units hold {held} past its limit");
        }
        std::thread::yield_now();
    }
    shared.stop.store(true, Ordering::Release);
    for _ in 0..THREADS {
        done_rx
            .recv_timeout(DEADLINE)
            .expect("a worker hung after the stop");
    }
    for w in workers {
        w.join().expect("no worker panicked");
    }
    for (slot, _) in ENGINES.iter().enumerate() {
        let taken = std::mem::take(&mut *shared.spillable[slot].lock());
        shared.drop_tokens(slot, taken);
    }
    // Panicking callbacks and blocking reclaimers may still be finishing; wait for the books.
    let deadline = Instant::now() + DEADLINE;
    while ENGINES.iter().any(|&(e, ..)| g.reserved(e) != 0) {
        assert!(Instant::now() < deadline, "memory never came back");
        std::thread::sleep(Duration::from_millis(5));
    }
    let snapshot = g.snapshot();
    let aborts: u64 = snapshot.engines.iter().map(|e| e.aborts).sum();
    println!(
        "abort fuzz: {} ops, {aborts} aborts ({} seen by callers)",
        shared.ops.load(Ordering::Relaxed),
        shared.aborts_seen.load(Ordering::Relaxed)
    );
}
