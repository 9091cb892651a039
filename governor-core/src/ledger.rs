//! The admission ledger: the lock-free algorithm that decides every reservation.
//!
//! This file is the governor's `batch_semaphore`: small, free of policy, and model-checked with
//! loom (`RUSTFLAGS="--cfg loom" cargo test -p governor-core --lib loom`).
//!
//! # Three levels of grants
//!
//! ```text
//!   global  [granted ≤ ceiling]          one atomic, CAS-checked against the ceiling
//!     │  grant(k) / ungrant(k)
//!   engine  [room = limit − granted ≥ 0] one atomic per engine, CAS-checked to stay ≥ 0
//!     │  refill / trim (quantum-sized)
//!   shard   [credit]                     one padded atomic per (engine, shard); threads map to shards
//!     │  fast path: credit -= n / credit += n
//!   ReservationToken (n bytes)
//! ```
//!
//! A reservation first tries to take `n` bytes of *credit* from its thread's shard: one CAS on a
//! cache line that few threads share. Only when the shard is short does it go up a level and
//! take `n + quantum` from the engine (CAS against the limit) and then from the global counter
//! (CAS against the ceiling), rolling the engine back if the ceiling says no.
//!
//! # Why the invariants hold at every instant
//!
//! Each counter is only ever raised by a compare-and-swap that checks its own bound, so
//! `global ≤ ceiling` and `engine.granted ≤ limit` hold after every single atomic step, whatever
//! the interleaving. Bytes held by live tokens of an engine are always covered by that engine's
//! grant (`Σ tokens + Σ credit = engine.granted`, up to the instant between two steps of one
//! operation, where the inequality is always in the safe direction), and every engine's grant is
//! covered by the global counter. Hence `Σ tokens ≤ Σ granted ≤ ceiling` and
//! `tokens(engine) ≤ limit(engine)` — the checks nodedb-mem makes in two separate steps are here
//! each a single atomic step.
//!
//! The price of credit is *slack*: at most `2 × quantum` idle bytes per shard. The quantum is
//! sized so that all shards together strand at most 1/32 of an engine's limit, and a denial
//! first drains the slack (the engine's own for a limit denial, every engine's for a ceiling
//! denial) and retries, so a single thread sees exact answers: a reservation fails if and only
//! if `reserved + n` exceeds the limit or the ceiling.
//!
//! `charge` (memory already resident) raises both counters unchecked: it is a fact, not a
//! request. It can push an engine past its limit; then every admission is denied until the
//! overcommit is paid back.

use crate::loom::{AtomicIsize, AtomicUsize, CachePadded, Ordering};

/// Why the ledger refused a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Denial {
    /// The engine's limit would be exceeded; `granted` is what the engine held then.
    Limit { granted: usize, limit: usize },
    /// The global ceiling would be exceeded; `global` is what was granted then.
    Ceiling { global: usize },
}

/// One engine's row in the ledger.
///
/// The engine counter stores *room* (`limit − granted`) rather than `granted`, so that changing
/// the limit at run time is one atomic step on the same word that admission checks: lowering the
/// limit takes room away with a CAS that fails if the room is not free, and no grant can read a
/// stale limit. `room` goes negative only through `charge` (overcommit).
#[derive(Debug)]
pub(crate) struct EngineLedger {
    limit: AtomicUsize,
    floor: AtomicUsize,
    quantum: usize,
    room: CachePadded<AtomicIsize>,
    peak: AtomicUsize,
    shards: Box<[CachePadded<AtomicUsize>]>,
}

impl EngineLedger {
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    pub(crate) fn floor(&self) -> usize {
        self.floor.load(Ordering::Acquire)
    }

    /// Bytes granted to the engine: held by tokens plus idle shard credit.
    pub(crate) fn granted(&self) -> usize {
        let room = self.room.load(Ordering::Acquire);
        (self.limit() as isize - room).max(0) as usize
    }

    /// High-water mark of `granted`.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Bytes held by live tokens. Exact when no operation is in flight; a concurrent reader may
    /// see a value off by the bytes of the operations in flight.
    pub(crate) fn reserved(&self) -> usize {
        let credit: usize = self.shards.iter().map(|s| s.load(Ordering::Acquire)).sum();
        self.granted().saturating_sub(credit)
    }

    fn shard(&self, index: usize) -> &AtomicUsize {
        &self.shards[index % self.shards.len()]
    }
}

/// The whole ledger: the ceiling, the global counter and one row per configured engine.
#[derive(Debug)]
pub(crate) struct Ledger {
    ceiling: usize,
    global: CachePadded<AtomicUsize>,
    global_peak: AtomicUsize,
    untracked: AtomicUsize,
    waiters: AtomicUsize,
    engines: Box<[EngineLedger]>,
}

/// Sizes the credit quantum so that all shards together strand at most 1/32 of the limit
/// (each shard keeps at most two quanta), capped at 1 MiB. Zero disables credit: every call
/// then goes to the engine counter, which is exact but contended.
pub(crate) fn quantum_for(limit: usize, shards: usize) -> usize {
    (limit / (64 * shards.max(1))).min(1 << 20)
}

impl Ledger {
    /// A ledger with `ceiling` and one row per `(limit, floor)`. An engine without a budget
    /// gets a row with limit 0: nothing can be reserved there, but resident memory can still be
    /// charged to it, so `charge` never has to fail.
    pub(crate) fn new(ceiling: usize, budgets: &[(usize, usize)], shards: usize) -> Self {
        Self::with_quantum(ceiling, budgets, shards, |limit| quantum_for(limit, shards))
    }

    /// As [`Ledger::new`] with an explicit credit quantum per limit (models and tests).
    pub(crate) fn with_quantum(
        ceiling: usize,
        budgets: &[(usize, usize)],
        shards: usize,
        quantum: impl Fn(usize) -> usize,
    ) -> Self {
        let engines = budgets
            .iter()
            .map(|&(limit, floor)| EngineLedger {
                limit: AtomicUsize::new(limit),
                floor: AtomicUsize::new(floor),
                quantum: quantum(limit),
                room: CachePadded(AtomicIsize::new(limit as isize)),
                peak: AtomicUsize::new(0),
                shards: (0..shards.max(1))
                    .map(|_| CachePadded(AtomicUsize::new(0)))
                    .collect(),
            })
            .collect();
        Self {
            ceiling,
            global: CachePadded(AtomicUsize::new(0)),
            global_peak: AtomicUsize::new(0),
            untracked: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            engines,
        }
    }

    pub(crate) fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The row of engine slot `slot`.
    pub(crate) fn engine(&self, slot: usize) -> &EngineLedger {
        &self.engines[slot]
    }

    /// Bytes counted against the ceiling: every engine's grant plus untracked memory.
    pub(crate) fn global(&self) -> usize {
        self.global.load(Ordering::Acquire)
    }

    pub(crate) fn global_peak(&self) -> usize {
        self.global_peak.load(Ordering::Acquire)
    }

    pub(crate) fn untracked(&self) -> usize {
        self.untracked.load(Ordering::Acquire)
    }

    /// Raises both counters if both bounds allow; the one step that admits memory.
    fn grant(&self, e: &EngineLedger, bytes: usize) -> Result<(), Denial> {
        let signed = bytes as isize;
        let room_before = e
            .room
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r >= signed).then_some(r - signed)
            })
            .map_err(|room| {
                let limit = e.limit();
                Denial::Limit {
                    granted: (limit as isize - room).max(0) as usize,
                    limit,
                }
            })?;
        let ceiling = self.ceiling;
        match self
            .global
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                g.checked_add(bytes).filter(|&n| n <= ceiling)
            }) {
            Ok(global_before) => {
                let granted_after = (e.limit() as isize - room_before + signed).max(0) as usize;
                e.peak.fetch_max(granted_after, Ordering::AcqRel);
                self.global_peak
                    .fetch_max(global_before + bytes, Ordering::AcqRel);
                Ok(())
            }
            Err(global) => {
                e.room.fetch_add(signed, Ordering::AcqRel);
                Err(Denial::Ceiling { global })
            }
        }
    }

    fn ungrant(&self, e: &EngineLedger, bytes: usize) {
        if bytes > 0 {
            e.room.fetch_add(bytes as isize, Ordering::AcqRel);
            self.global.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Returns every shard's idle credit of `e` to the engine and global counters.
    fn drain(&self, e: &EngineLedger) {
        for shard in &*e.shards {
            let credit = shard.swap(0, Ordering::AcqRel);
            self.ungrant(e, credit);
        }
    }

    /// Admits `bytes` for engine row `e` on `shard`. `Ok(true)` when the engine and global
    /// counters moved (the slow path), `Ok(false)` when shard credit sufficed.
    pub(crate) fn reserve(
        &self,
        e: &EngineLedger,
        shard: usize,
        bytes: usize,
    ) -> Result<bool, Denial> {
        if bytes == 0 {
            return Ok(false);
        }
        let credit = e.shard(shard);
        if credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                c.checked_sub(bytes)
            })
            .is_ok()
        {
            return Ok(false);
        }
        // Slow path. Hand back the shard's too-small credit first, so a shard never sits on
        // more than its two quanta of slack.
        let leftover = credit.swap(0, Ordering::AcqRel);
        self.ungrant(e, leftover);
        if e.quantum > 0
            && self.waiters.load(Ordering::Acquire) == 0
            && let Some(with_refill) = bytes.checked_add(e.quantum)
            && self.grant(e, with_refill).is_ok()
        {
            credit.fetch_add(e.quantum, Ordering::AcqRel);
            return Ok(true);
        }
        // Before saying no, take back the slack: the engine's own credit for a limit denial,
        // every engine's for a ceiling denial. This is what makes single-threaded answers exact.
        // Bounded: other threads may refill credit between our drain and our retry.
        let mut drained_all = false;
        let mut drained_own = 0;
        loop {
            match self.grant(e, bytes) {
                Ok(()) => return Ok(true),
                Err(Denial::Limit { .. })
                    if drained_own < 2
                        && e.shards.iter().any(|s| s.load(Ordering::Acquire) > 0) =>
                {
                    drained_own += 1;
                    self.drain(e);
                }
                Err(Denial::Ceiling { .. }) if !drained_all => {
                    drained_all = true;
                    self.drain_all();
                }
                Err(denial) => return Err(denial),
            }
        }
    }

    /// Books `bytes` that are already resident, without checking any bound.
    pub(crate) fn charge(&self, e: &EngineLedger, bytes: usize) {
        let room_before = e.room.fetch_sub(bytes as isize, Ordering::AcqRel);
        let global_before = self.global.fetch_add(bytes, Ordering::AcqRel);
        let granted_after = (e.limit() as isize - room_before + bytes as isize).max(0) as usize;
        e.peak.fetch_max(granted_after, Ordering::AcqRel);
        self.global_peak
            .fetch_max(global_before + bytes, Ordering::AcqRel);
        if granted_after > e.limit() || global_before + bytes > self.ceiling {
            // Overcommitted: idle credit must not admit anything more until it is paid back.
            self.drain_all();
        }
    }

    /// Gives `bytes` of a token back through `shard`, keeping a little credit for the next call
    /// unless someone is waiting for memory (then everything goes back at once). Returns true
    /// when the engine and global counters moved.
    pub(crate) fn release(&self, e: &EngineLedger, shard: usize, bytes: usize) -> bool {
        if bytes == 0 {
            return false;
        }
        let credit = e.shard(shard);
        let now = credit.fetch_add(bytes, Ordering::AcqRel) + bytes;
        // Keep no credit while someone waits or while the books are overcommitted (a charge or
        // untracked memory pushed them past a bound): idle credit would admit past the bound.
        let strict = self.waiters.load(Ordering::Acquire) > 0
            || e.room.load(Ordering::Acquire) < 0
            || self.global.load(Ordering::Acquire) > self.ceiling;
        let keep = if strict { 0 } else { e.quantum };
        if (now > 2 * e.quantum || keep == 0)
            && let Ok(before) = credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c > keep).then_some(keep)
            })
        {
            self.ungrant(e, before - keep);
            return true;
        }
        false
    }

    /// True while some async reservation waits for memory.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters.load(Ordering::Acquire) > 0
    }

    /// Sets the untracked-memory charge (the RSS monitor's view of memory outside reservations).
    /// Like `charge`, this is a fact and is not bounded by the ceiling.
    pub(crate) fn set_untracked(&self, bytes: usize) {
        let before = self.untracked.swap(bytes, Ordering::AcqRel);
        // Credit granted before the room shrank must not admit past the new room.
        self.drain_all();
        if bytes >= before {
            let global_before = self.global.fetch_add(bytes - before, Ordering::AcqRel);
            self.global_peak
                .fetch_max(global_before + bytes - before, Ordering::AcqRel);
        } else {
            self.global.fetch_sub(before - bytes, Ordering::AcqRel);
        }
    }

    /// Changes an engine's limit. Raising adds room; lowering takes room away in one CAS that
    /// fails (returning the bytes granted) if the engine holds more than the new limit even after
    /// its idle credit was drained. Callers serialise limit changes of one engine.
    pub(crate) fn set_limit(&self, e: &EngineLedger, limit: usize) -> Result<(), usize> {
        self.drain(e);
        let old = e.limit();
        if limit >= old {
            e.room.fetch_add((limit - old) as isize, Ordering::AcqRel);
        } else {
            let cut = (old - limit) as isize;
            e.room
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    (r >= cut).then_some(r - cut)
                })
                .map_err(|room| (old as isize - room).max(0) as usize)?;
        }
        e.limit.store(limit, Ordering::Release);
        Ok(())
    }

    pub(crate) fn set_floor(e: &EngineLedger, floor: usize) {
        e.floor.store(floor, Ordering::Release);
    }

    /// Registers an async waiter: while any wait, releases return all credit immediately.
    pub(crate) fn add_waiter(&self) {
        self.waiters.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn remove_waiter(&self) {
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }

    /// Returns every engine's idle credit; used before reading exact figures.
    pub(crate) fn drain_all(&self) {
        for e in &self.engines {
            self.drain(e);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ledger(quantum: usize) -> Ledger {
        Ledger::with_quantum(100, &[(60, 10), (60, 10)], 2, |_| quantum)
    }

    #[test]
    fn credit_serves_small_reservations_and_slack_is_bounded() {
        let l = ledger(8);
        let e = l.engine(0);
        assert_eq!(l.reserve(e, 0, 4), Ok(true));
        assert_eq!(e.granted(), 12);
        assert_eq!(e.reserved(), 4);
        assert_eq!(l.reserve(e, 0, 4), Ok(false), "served from credit");
        assert!(!l.release(e, 0, 8));
        assert_eq!(e.reserved(), 0);
        assert!(
            e.granted() <= 16,
            "at most two quanta per shard stay granted"
        );
    }

    #[test]
    fn denials_are_exact_after_draining_slack() {
        let l = ledger(8);
        let (a, b) = (l.engine(0), l.engine(1));
        l.reserve(a, 0, 50).unwrap();
        l.reserve(b, 1, 1).unwrap(); // leaves b with credit
        // a: 50 + 10 = 60 = limit: must fit exactly, after its own credit is drained.
        assert_eq!(l.reserve(a, 1, 10), Ok(true));
        assert!(matches!(l.reserve(a, 0, 1), Err(Denial::Limit { .. })));
        // global: 60 (a) + 1 (b) + 39 = 100 = ceiling: must fit after b's credit is drained.
        assert_eq!(l.reserve(b, 0, 39), Ok(true));
        assert!(matches!(l.reserve(b, 0, 1), Err(Denial::Ceiling { .. })));
        assert_eq!(l.global(), 100);
    }

    #[test]
    fn charge_overcommits_and_blocks_admission_until_paid_back() {
        let l = ledger(0);
        let e = l.engine(0);
        l.charge(e, 70);
        assert_eq!(e.granted(), 70);
        assert!(matches!(l.reserve(e, 0, 1), Err(Denial::Limit { .. })));
        l.release(e, 0, 20);
        assert_eq!(l.reserve(e, 0, 10), Ok(true));
    }

    #[test]
    fn lowering_the_limit_cannot_go_below_holdings() {
        let l = ledger(4);
        let e = l.engine(0);
        l.reserve(e, 0, 30).unwrap();
        assert_eq!(l.set_limit(e, 20), Err(30));
        assert_eq!(e.limit(), 60);
        assert_eq!(l.set_limit(e, 30), Ok(()));
        assert!(matches!(l.reserve(e, 0, 1), Err(Denial::Limit { .. })));
        assert_eq!(l.set_limit(e, 40), Ok(()));
        assert_eq!(l.reserve(e, 0, 10), Ok(true));
    }

    #[test]
    fn untracked_memory_shrinks_the_room() {
        let l = ledger(0);
        l.set_untracked(50);
        let e = l.engine(0);
        assert!(matches!(l.reserve(e, 0, 51), Err(Denial::Ceiling { .. })));
        l.set_untracked(40);
        assert_eq!(l.reserve(e, 0, 51), Ok(true));
        assert_eq!(l.global(), 91);
    }
}

/// Loom model of the admission algorithm: `RUSTFLAGS="--cfg loom" cargo test -p governor-core --lib loom`.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const CEILING: usize = 10;
    const LIMIT: usize = 8;

    fn check(l: &Ledger) {
        assert!(l.global() <= CEILING, "global {} > ceiling", l.global());
        for slot in 0..2 {
            assert!(
                l.engine(slot).granted() <= LIMIT,
                "engine {slot} over its limit"
            );
        }
    }

    /// Two threads, two engines, one shared shard each way: reserve, grow, release and lend.
    /// In every interleaving the bounds hold at every step, the two reservations that cannot
    /// both fit under the ceiling never both succeed, and everything balances at the end.
    #[test]
    fn loom_reserve_grow_release_lend() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let ledger = Arc::new(Ledger::with_quantum(
                CEILING,
                &[(LIMIT, 2), (LIMIT, 2)],
                2,
                |_| 1,
            ));
            let a = {
                let l = Arc::clone(&ledger);
                thread::spawn(move || {
                    let e = l.engine(0);
                    let first = l.reserve(e, 0, 3).is_ok();
                    check(&l);
                    let grown = first && l.reserve(e, 0, 3).is_ok();
                    check(&l);
                    let held = usize::from(first) * 3 + usize::from(grown) * 3;
                    (l.clone(), held)
                })
            };
            let b = {
                let l = Arc::clone(&ledger);
                thread::spawn(move || {
                    let e = l.engine(1);
                    let ok = l.reserve(e, 1, 5).is_ok();
                    check(&l);
                    usize::from(ok) * 5
                })
            };
            let (l, held_a) = a.join().unwrap();
            let held_b = b.join().unwrap();
            assert!(
                held_a + held_b <= CEILING,
                "admitted {held_a} + {held_b} past the ceiling"
            );
            check(&l);
            l.release(l.engine(0), 0, held_a);
            l.release(l.engine(1), 1, held_b);
            l.drain_all();
            assert_eq!(l.global(), 0);
            assert_eq!(l.engine(0).granted(), 0);
            assert_eq!(l.engine(1).granted(), 0);
        });
    }

    /// A limit change racing a grant never leaves the engine above its (new) limit.
    #[test]
    fn loom_set_limit_races_grant() {
        loom::model(|| {
            let ledger = Arc::new(Ledger::with_quantum(CEILING, &[(LIMIT, 0)], 1, |_| 0));
            let l = Arc::clone(&ledger);
            let t = thread::spawn(move || l.reserve(l.engine(0), 0, 5).is_ok());
            let lowered = ledger.set_limit(ledger.engine(0), 4).is_ok();
            let granted = t.join().unwrap();
            let e = ledger.engine(0);
            assert!(
                e.granted() <= e.limit(),
                "granted {} > limit {}",
                e.granted(),
                e.limit()
            );
            assert!(
                !(lowered && granted),
                "both a 5-byte grant and a limit of 4 took effect"
            );
        });
    }
}
