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
//! With NUMA node sub-ceilings configured, a [`NodeLedger`] adds one more bound per node,
//! taken before the engine's and rolled back if the engine or the ceiling says no. It has
//! per-thread credit of its own (same quantum rule, same drain-before-denial), so a node's
//! threads do not share one counter on the hot path.
//!
//! `charge` (memory already resident) raises both counters unchecked: it is a fact, not a
//! request. It can push an engine past its limit; then every admission is denied until the
//! overcommit is paid back.
//!
//! # Token handles ride in the shard word
//!
//! A token must keep the governor's books alive, which with a plain `Arc` costs two more
//! atomic operations per token on one reference count that every thread shares. Instead, each
//! shard word also holds a small *stash of handles* (counts of the books' `Arc` owned by the
//! stash rather than by a token):
//!
//! ```text
//!   bit 63     bits 46..61         bits 0..45
//!   CLOSED  │  stashed handles  │  credit (bytes)
//! ```
//!
//! Creating a token takes its bytes *and* a handle in the one CAS it already makes; dropping a
//! token returns both in one CAS. Only when a stash is empty (or full, [`STASH_MAX`]) does the
//! caller touch the shared count. When the governor closes, [`Ledger::close`] sets `CLOSED` in
//! every shard and takes the stashed handles for the caller to drop; a closed shard refuses
//! handles, so every handle is dropped exactly once: by the closer, or by the token that owns
//! it. Because the stash happens in the same single-location RMW as the `CLOSED` check, there
//! is no window in which a handle is stashed after the closer looked. A thread that stashed its
//! handle no longer owns a count and does not touch the ledger again.

use crate::loom::{AtomicIsize, AtomicUsize, CachePadded, Ordering};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("governor-core packs credit and handles into one 64-bit shard word");

/// Bits of a shard word that hold idle credit, in bytes (64 TiB).
const CREDIT_BITS: u32 = 46;
const CREDIT: usize = (1 << CREDIT_BITS) - 1;
/// One stashed handle.
const HANDLE: usize = 1 << CREDIT_BITS;
const HANDLES: usize = 0xFFFF << CREDIT_BITS;
/// Set by [`Ledger::close`]: the shard takes no more handles.
const CLOSED: usize = 1 << 63;
/// Handles a shard stashes at most; past it a dropped token releases its count itself. Far
/// below the field's 65 535, so concurrent stashers cannot overflow it.
pub(crate) const STASH_MAX: usize = 1024;
/// Releases at least this big bypass the shard word so that credit can never overflow its bits.
const LARGE_RELEASE: usize = CREDIT >> 2;

fn credit_of(word: usize) -> usize {
    word & CREDIT
}

fn handles_of(word: usize) -> usize {
    (word & HANDLES) >> CREDIT_BITS
}

/// A release worked out by [`Ledger::plan_release`]; [`apply`](Self::apply) performs it.
///
/// The split exists for the handle: the step that may stash it must be the last thing the
/// releasing thread does with the books, and must run in a frame that holds nothing of the
/// books but the shard's atomic (the same discipline as `Arc::drop`), because another thread
/// may free the books the moment the handle is in the stash.
#[derive(Debug)]
pub(crate) struct ReleasePlan<'a> {
    word: &'a AtomicUsize,
    bytes: usize,
    keep: usize,
    quantum: usize,
    strict: bool,
    handle: bool,
    moved: bool,
}

/// What [`ReleasePlan::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The engine and global counters moved, or must move by `trimmed` (pressure may change).
    pub(crate) moved: bool,
    /// Credit taken off the shard that the caller must hand back with [`Ledger::ungrant`].
    pub(crate) trimmed: usize,
    /// The handle went into the stash: the caller no longer owns a count of the books and must
    /// not touch them again. Never true when the counters moved (`trimmed > 0`, or a large
    /// release bypassed the shard) or when a waiter may need waking.
    pub(crate) handle_stashed: bool,
}

impl ReleasePlan<'_> {
    /// One CAS on the shard word: add the bytes to the credit, trim the credit to what the
    /// shard may keep, and stash the handle if nothing else is left to do.
    #[inline]
    pub(crate) fn apply(self) -> Applied {
        let Self {
            word,
            bytes,
            keep,
            quantum,
            strict,
            handle,
            moved,
        } = self;
        let mut applied = Applied {
            moved,
            trimmed: 0,
            handle_stashed: false,
        };
        if bytes == 0 && !handle {
            return applied;
        }
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let now = credit_of(w) + bytes;
            let trim = now > keep && (now > 2 * quantum || keep == 0);
            applied.trimmed = if trim { now - keep } else { 0 };
            // Not when the counters moved (a large release bypassed the shard): pressure must
            // be refreshed afterwards, which needs the books.
            applied.handle_stashed = handle
                && !trim
                && !strict
                && !moved
                && w & CLOSED == 0
                && handles_of(w) < STASH_MAX;
            let credit = if trim { keep } else { now };
            let stashed = if applied.handle_stashed { HANDLE } else { 0 };
            Some((w & !CREDIT) + credit + stashed)
        });
        applied.moved |= applied.trimmed > 0;
        applied
    }
}

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
    /// Bytes the engine's arena holds beyond its tokens (allocator drift, set by the RSS
    /// monitor's reconciliation): taken from `room` and from the global counter like a grant,
    /// but never counted as reserved.
    untracked: AtomicUsize,
}

impl EngineLedger {
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    pub(crate) fn floor(&self) -> usize {
        self.floor.load(Ordering::Acquire)
    }

    /// Bytes granted to the engine: held by tokens plus idle shard credit, plus the drift
    /// charged to it as untracked (everything counted against its limit).
    pub(crate) fn granted(&self) -> usize {
        let room = self.room.load(Ordering::Acquire);
        (self.limit() as isize - room).max(0) as usize
    }

    /// High-water mark of what admissions and charges granted: tokens plus idle credit,
    /// without the drift charged as untracked. (That drift is a measurement that rises
    /// between admissions; counting it here only when an admission happened to coincide
    /// would make the figure depend on timing. Its own peak is in the reconciliation.)
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Records a grant that left `granted_after` counted against the limit; the drift
    /// charged as untracked is not part of the peak (see [`Self::peak`]).
    fn note_peak(&self, granted_after: usize) {
        self.peak.fetch_max(
            granted_after.saturating_sub(self.untracked()),
            Ordering::AcqRel,
        );
    }

    /// Bytes held by live tokens. Exact when no operation is in flight; a concurrent reader may
    /// see a value off by the bytes of the operations in flight.
    pub(crate) fn reserved(&self) -> usize {
        let credit: usize = self
            .shards
            .iter()
            .map(|s| credit_of(s.load(Ordering::Acquire)))
            .sum();
        self.granted()
            .saturating_sub(credit)
            .saturating_sub(self.untracked())
    }

    /// Bytes charged to the engine as untracked (see [`Ledger::set_engine_untracked`]).
    pub(crate) fn untracked(&self) -> usize {
        self.untracked.load(Ordering::Acquire)
    }

    /// The shard word of shard `index` (threads map to shards modulo the shard count).
    #[inline]
    pub(crate) fn shard_word(&self, index: usize) -> &AtomicUsize {
        // The shard count is a power of two (see `Ledger::with_quantum`): a mask, not a division,
        // on the hot path.
        &self.shards[index & (self.shards.len() - 1)]
    }

    /// Takes one stashed handle from the shard, if it has one.
    pub(crate) fn take_handle(&self, shard: usize) -> bool {
        self.shard_word(shard)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (handles_of(w) > 0).then(|| w - HANDLE)
            })
            .is_ok()
    }
}

/// The whole ledger: the ceiling, the global counter and one row per configured engine.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// The global ceiling; changed at run time by [`set_ceiling`](Self::set_ceiling).
    ceiling: AtomicUsize,
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
        let shards = shards.max(1).next_power_of_two();
        Self::with_quantum(ceiling, budgets, shards, |limit| quantum_for(limit, shards))
    }

    /// As [`Ledger::new`] with an explicit credit quantum per limit (models and tests).
    pub(crate) fn with_quantum(
        ceiling: usize,
        budgets: &[(usize, usize)],
        shards: usize,
        quantum: impl Fn(usize) -> usize,
    ) -> Self {
        let shards = shards.max(1).next_power_of_two();
        let engines = budgets
            .iter()
            .map(|&(limit, floor)| EngineLedger {
                limit: AtomicUsize::new(limit),
                floor: AtomicUsize::new(floor),
                quantum: quantum(limit),
                room: CachePadded(AtomicIsize::new(limit as isize)),
                peak: AtomicUsize::new(0),
                untracked: AtomicUsize::new(0),
                shards: (0..shards)
                    .map(|_| CachePadded(AtomicUsize::new(0)))
                    .collect(),
            })
            .collect();
        Self {
            ceiling: AtomicUsize::new(ceiling),
            global: CachePadded(AtomicUsize::new(0)),
            global_peak: AtomicUsize::new(0),
            untracked: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            engines,
        }
    }

    pub(crate) fn ceiling(&self) -> usize {
        self.ceiling.load(Ordering::Acquire)
    }

    /// Replaces the global ceiling and returns the previous one.
    ///
    /// Every grant checks the ceiling inside its compare-and-swap, so from the store on no
    /// grant passes the new ceiling: `global ≤ ceiling` holds for every grant made under the
    /// ceiling in force when it was made. Lowering below what is granted does not take anything
    /// back (holders give memory back through reclaim); it makes the ledger *overcommitted*,
    /// so every grant is refused and releases keep no credit until `global` is under the new
    /// ceiling. Idle credit is drained here so that bytes granted ahead under the old ceiling
    /// stop serving new tokens, and a refill racing this call re-checks the ceiling after it
    /// lands (see `reserve_slow`). What can remain is the ledger's ordinary slack: a release
    /// racing the change may still park up to its shard's two quanta of credit that were
    /// granted under the old ceiling (the loom model below finds such an interleaving), so
    /// after a lowering at most that slack — never more than 1/32 of an engine's limit — can
    /// serve new tokens past the new ceiling until it is drained by the next denial. Callers
    /// serialise ceiling changes.
    pub(crate) fn set_ceiling(&self, ceiling: usize) -> usize {
        let before = self.ceiling.swap(ceiling, Ordering::AcqRel);
        if ceiling < before {
            self.drain_all();
        }
        before
    }

    /// The row of engine slot `slot`.
    pub(crate) fn engine(&self, slot: usize) -> &EngineLedger {
        &self.engines[slot]
    }

    /// Bytes counted against the ceiling: every engine's grant plus untracked memory.
    pub(crate) fn global(&self) -> usize {
        self.global.load(Ordering::Acquire)
    }

    /// Bytes held by live tokens of every engine, as one consistent figure: one reading of the
    /// global counter (the figure every grant checks against the ceiling), less what that
    /// counter holds besides tokens (idle shard credit and untracked memory).
    ///
    /// Summing engine rows one after another would combine figures from different instants:
    /// bytes released by one engine and granted to another could be counted in both, and the
    /// sum read above a ceiling the ledger never passed. Here everything read after the global
    /// counter is only ever *subtracted* from it, so the figure is never above what the counter
    /// held at that instant, hence never above the ceiling unless the counter itself is
    /// (memory booked by `charge` or untracked memory past the ceiling, or a ceiling lowered
    /// below what is granted). Exact when no operation is in flight; while some are, it may be
    /// off by the bytes they move, either way (a refill's credit landing after the counter
    /// was read makes it low; one granted but not yet landed makes it high), never above
    /// the counter.
    pub(crate) fn reserved(&self) -> usize {
        let global = self.global();
        let mut besides_tokens = self.untracked();
        for e in &*self.engines {
            besides_tokens = besides_tokens.saturating_add(e.untracked());
            for word in &*e.shards {
                besides_tokens =
                    besides_tokens.saturating_add(credit_of(word.load(Ordering::Acquire)));
            }
        }
        global.saturating_sub(besides_tokens)
    }

    pub(crate) fn global_peak(&self) -> usize {
        self.global_peak.load(Ordering::Acquire)
    }

    pub(crate) fn untracked(&self) -> usize {
        self.untracked.load(Ordering::Acquire)
    }

    /// Raises both counters if both bounds allow; the one step that admits memory.
    fn grant(&self, e: &EngineLedger, bytes: usize) -> Result<(), Denial> {
        // A request that does not fit a signed word can never fit a limit; converting it with
        // `as` would turn it negative and make the CAS below *add* room.
        let Ok(signed) = isize::try_from(bytes) else {
            return Err(Denial::Limit {
                granted: e.granted(),
                limit: e.limit(),
            });
        };
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
        // The ceiling is read inside the CAS loop: a grant that lands after a lowering sees it.
        match self
            .global
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                g.checked_add(bytes).filter(|&n| n <= self.ceiling())
            }) {
            Ok(global_before) => {
                let granted_after = (e.limit() as isize - room_before + signed).max(0) as usize;
                e.note_peak(granted_after);
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

    /// Returns `bytes` of `e`'s grant to the engine and global counters.
    pub(crate) fn ungrant(&self, e: &EngineLedger, bytes: usize) {
        if bytes > 0 {
            e.room.fetch_add(bytes as isize, Ordering::AcqRel);
            self.global.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Returns one shard's idle credit to the engine and global counters (its handles stay).
    fn drain_shard(&self, e: &EngineLedger, word: &AtomicUsize) {
        if let Ok(before) = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (credit_of(w) > 0).then_some(w & !CREDIT)
        }) {
            self.ungrant(e, credit_of(before));
        }
    }

    /// Returns every shard's idle credit of `e` to the engine and global counters.
    fn drain(&self, e: &EngineLedger) {
        for word in &*e.shards {
            self.drain_shard(e, word);
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
        self.admit(e, shard, bytes, false).map(|(moved, _)| moved)
    }

    /// As [`reserve`](Self::reserve) for a new token, which also takes a stashed handle when
    /// the shard has one: `Ok((moved, handle_taken))`. Without a stashed handle the caller
    /// takes a fresh count of the books.
    pub(crate) fn reserve_with_handle(
        &self,
        e: &EngineLedger,
        shard: usize,
        bytes: usize,
    ) -> Result<(bool, bool), Denial> {
        self.admit(e, shard, bytes, true)
    }

    #[inline]
    fn admit(
        &self,
        e: &EngineLedger,
        shard: usize,
        bytes: usize,
        want_handle: bool,
    ) -> Result<(bool, bool), Denial> {
        if bytes == 0 {
            return Ok((false, want_handle && e.take_handle(shard)));
        }
        let word = e.shard_word(shard);
        let mut took_handle = false;
        if word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                if credit_of(w) < bytes {
                    return None;
                }
                took_handle = want_handle && handles_of(w) > 0;
                Some(w - bytes - if took_handle { HANDLE } else { 0 })
            })
            .is_ok()
        {
            return Ok((false, took_handle));
        }
        self.reserve_slow(e, word, bytes)?;
        Ok((true, want_handle && e.take_handle(shard)))
    }

    /// Admission when the shard's credit is short: the engine and global counters move.
    fn reserve_slow(
        &self,
        e: &EngineLedger,
        word: &AtomicUsize,
        bytes: usize,
    ) -> Result<(), Denial> {
        // Hand back the shard's too-small credit first, so a shard never sits on more than its
        // two quanta of slack.
        self.drain_shard(e, word);
        if e.quantum > 0
            && self.waiters.load(Ordering::Acquire) == 0
            && let Some(with_refill) = bytes.checked_add(e.quantum)
            && self.grant(e, with_refill).is_ok()
        {
            word.fetch_add(e.quantum, Ordering::AcqRel);
            // A ceiling lowered (or untracked memory raised) between our grant and this refill
            // drained the shards before our credit landed: take it back ourselves, so that no
            // credit serves new tokens while the ledger is overcommitted.
            if self.is_strict(e) {
                self.drain_shard(e, word);
            }
            return Ok(());
        }
        // Before saying no, take back the slack: the engine's own credit for a limit denial,
        // every engine's for a ceiling denial. This is what makes single-threaded answers exact.
        // Bounded: other threads may refill credit between our drain and our retry.
        let mut drained_all = false;
        let mut drained_own = 0;
        loop {
            match self.grant(e, bytes) {
                Ok(()) => return Ok(()),
                Err(Denial::Limit { .. })
                    if drained_own < 2
                        && e.shards
                            .iter()
                            .any(|s| credit_of(s.load(Ordering::Acquire)) > 0) =>
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

    /// Books `bytes` that are already resident, without checking any bound. The caller keeps
    /// `bytes` within [`MAX_BYTES`](crate::MAX_BYTES) so that the signed room cannot overflow.
    pub(crate) fn charge(&self, e: &EngineLedger, bytes: usize) {
        debug_assert!(bytes <= crate::config::MAX_BYTES);
        let room_before = e.room.fetch_sub(bytes as isize, Ordering::AcqRel);
        let global_before = self.global.fetch_add(bytes, Ordering::AcqRel);
        let granted_after = (e.limit() as isize - room_before + bytes as isize).max(0) as usize;
        e.note_peak(granted_after);
        self.global_peak
            .fetch_max(global_before + bytes, Ordering::AcqRel);
        if granted_after > e.limit() || global_before + bytes > self.ceiling() {
            // Overcommitted: idle credit must not admit anything more until it is paid back.
            self.drain_all();
        }
    }

    /// Gives `bytes` of a token back through `shard`, keeping a little credit for the next call
    /// unless someone is waiting for memory (then everything goes back at once). Returns true
    /// when the engine and global counters moved.
    pub(crate) fn release(&self, e: &EngineLedger, shard: usize, bytes: usize) -> bool {
        if bytes >= LARGE_RELEASE {
            self.ungrant(e, bytes);
            return true;
        }
        if bytes == 0 {
            return false;
        }
        // No handle moves here, so the bytes can go in with one add and the trim follow.
        let word = e.shard_word(shard);
        let now = credit_of(word.fetch_add(bytes, Ordering::AcqRel)) + bytes;
        let keep = if self.is_strict(e) { 0 } else { e.quantum };
        if (now > 2 * e.quantum || keep == 0)
            && let Ok(before) = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (credit_of(w) > keep).then_some((w & !CREDIT) | keep)
            })
        {
            self.ungrant(e, credit_of(before) - keep);
            return true;
        }
        false
    }

    /// Keep no credit while someone waits or while the books are overcommitted (a charge or
    /// untracked memory pushed them past a bound): idle credit would admit past the bound.
    #[inline]
    fn is_strict(&self, e: &EngineLedger) -> bool {
        self.waiters.load(Ordering::Acquire) > 0
            || e.room.load(Ordering::Acquire) < 0
            || self.global.load(Ordering::Acquire) > self.ceiling()
    }

    /// Works out a release of `bytes` through `shard` (and, for a token being dropped, of its
    /// handle) against the ledger's current state. Everything the release needs is read here,
    /// before the shard word changes: once [`ReleasePlan::apply`] has stashed the handle, the
    /// caller owns no count of the books and may not touch the ledger again.
    #[inline]
    pub(crate) fn plan_release<'a>(
        &'a self,
        e: &'a EngineLedger,
        shard: usize,
        bytes: usize,
        handle: bool,
    ) -> ReleasePlan<'a> {
        let mut plan = ReleasePlan {
            word: e.shard_word(shard),
            bytes,
            keep: e.quantum,
            quantum: e.quantum,
            strict: false,
            handle,
            moved: false,
        };
        if bytes >= LARGE_RELEASE {
            self.ungrant(e, bytes);
            plan.bytes = 0;
            plan.moved = true;
        }
        plan.strict = self.is_strict(e);
        if plan.strict {
            plan.keep = 0;
        }
        plan
    }

    /// Offers a handle to a shard's stash (`word` from [`EngineLedger::shard_word`]). `false`
    /// when the shard is closed or full: the caller still owns the count and must drop it.
    /// `true`: the caller no longer owns a count and must not touch the ledger again, which is
    /// why this takes only the atomic.
    pub(crate) fn stash_handle(word: &AtomicUsize) -> bool {
        word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (w & CLOSED == 0 && handles_of(w) < STASH_MAX).then(|| w + HANDLE)
        })
        .is_ok()
    }

    /// Closes every shard to handles and returns how many were stashed; the caller drops that
    /// many counts. Called once, by the governor's last owner, while it still holds a count.
    pub(crate) fn close(&self) -> usize {
        let mut handles = 0;
        for e in &self.engines {
            for word in &*e.shards {
                let before = word.fetch_or(CLOSED, Ordering::AcqRel);
                // Handles stashed before the flag went up; none can be stashed after it.
                if handles_of(before) > 0 {
                    let taken = word.fetch_and(!HANDLES, Ordering::AcqRel);
                    handles += handles_of(taken);
                }
            }
        }
        handles
    }

    /// True while some async reservation waits for memory.
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiters.load(Ordering::Acquire) > 0
    }

    /// Sets the untracked-memory charge (the RSS monitor's view of memory outside reservations).
    /// Like `charge`, this is a fact and is not bounded by the ceiling.
    pub(crate) fn set_untracked(&self, bytes: usize) {
        // A measurement, clamped so that adding it to the grants cannot overflow.
        let bytes = bytes.min(crate::config::MAX_BYTES);
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

    /// Sets the untracked charge of one engine (what its arena holds beyond its tokens),
    /// replacing the previous figure. Like [`set_untracked`](Self::set_untracked) it is a fact,
    /// not a request: it takes room from the engine and from the ceiling unchecked, so a large
    /// drift can leave the engine's room negative (every admission of that engine is then
    /// refused until it comes down), while other engines' rooms under their limits stay as
    /// they were. Clamped to the ceiling: more than that cannot be refused any harder.
    pub(crate) fn set_engine_untracked(&self, e: &EngineLedger, bytes: usize) {
        let bytes = bytes.min(self.ceiling());
        let before = e.untracked.swap(bytes, Ordering::AcqRel);
        if bytes >= before {
            let rise = bytes - before;
            // Both fit an isize: they are at most the ceiling, a validated configuration value.
            e.room.fetch_sub(rise as isize, Ordering::AcqRel);
            let global_before = self.global.fetch_add(rise, Ordering::AcqRel);
            self.global_peak
                .fetch_max(global_before + rise, Ordering::AcqRel);
            // Credit granted before the room shrank must not admit past the new room.
            self.drain_all();
        } else {
            let fall = before - bytes;
            e.room.fetch_add(fall as isize, Ordering::AcqRel);
            self.global.fetch_sub(fall, Ordering::AcqRel);
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

/// Per-NUMA-node books: what all engines hold on each node with a row, granted only by a CAS
/// against the node's sub-ceiling, so `granted(node) ≤ ceiling(node)` at every instant like
/// the other bounds.
///
/// Like engine rows, node rows hand out per-thread *credit* (a quantum granted ahead, at most
/// two quanta idle per shard, all shards together at most 1/32 of the sub-ceiling), so that
/// threads of one node do not all hit one counter; a denial first drains the node's idle
/// credit and retries, so a single thread still sees exact answers. Node credit is separate
/// from engine credit because one token's bytes count against one engine *and* one node,
/// and the two are bounded independently.
#[derive(Debug)]
pub(crate) struct NodeLedger {
    rows: Box<[NodeRow]>,
}

#[derive(Debug)]
struct NodeRow {
    /// `usize::MAX` for a node that is counted but bounded only globally.
    ceiling: usize,
    quantum: usize,
    /// Held by tokens plus idle credit.
    granted: CachePadded<AtomicUsize>,
    credit: Box<[CachePadded<AtomicUsize>]>,
}

impl NodeRow {
    fn credit(&self, shard: usize) -> &AtomicUsize {
        &self.credit[shard & (self.credit.len() - 1)]
    }

    /// Raises `granted` by `bytes` if the sub-ceiling allows.
    fn grant(&self, bytes: usize) -> Result<(), usize> {
        let ceiling = self.ceiling;
        self.granted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| {
                g.checked_add(bytes).filter(|&n| n <= ceiling)
            })
            .map(|_| ())
    }

    fn ungrant(&self, bytes: usize) {
        if bytes > 0 {
            self.granted.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    fn drain(&self) {
        for credit in &*self.credit {
            self.ungrant(credit.swap(0, Ordering::AcqRel));
        }
    }

    fn held(&self) -> usize {
        let idle: usize = self.credit.iter().map(|c| c.load(Ordering::Acquire)).sum();
        self.granted.load(Ordering::Acquire).saturating_sub(idle)
    }
}

impl NodeLedger {
    /// Books for `(node, ceiling)` pairs with `shards` credit shards per node (a power of two,
    /// as for engines); `None` when there are no pairs. Nodes between the listed ones are
    /// counted without a bound; nodes above the highest are not counted.
    pub(crate) fn new(ceilings: &[(usize, usize)], shards: usize) -> Option<Self> {
        let len = ceilings.iter().map(|&(node, _)| node + 1).max()?;
        let shards = shards.max(1).next_power_of_two();
        let mut bounds = vec![usize::MAX; len];
        for &(node, bytes) in ceilings {
            bounds[node] = bytes;
        }
        let rows = bounds
            .into_iter()
            .map(|ceiling| NodeRow {
                ceiling,
                quantum: quantum_for(ceiling, shards),
                granted: CachePadded(AtomicUsize::new(0)),
                credit: (0..shards)
                    .map(|_| CachePadded(AtomicUsize::new(0)))
                    .collect(),
            })
            .collect();
        Some(Self { rows })
    }

    /// True when `node` has a row here.
    pub(crate) fn tracks(&self, node: usize) -> bool {
        node < self.rows.len()
    }

    /// Nodes with a row, in order.
    pub(crate) fn nodes(&self) -> std::ops::Range<usize> {
        0..self.rows.len()
    }

    /// The node's sub-ceiling (`usize::MAX` when it has none).
    pub(crate) fn ceiling(&self, node: usize) -> usize {
        self.rows[node].ceiling
    }

    /// Bytes held by tokens on `node` (exact when no operation is in flight).
    pub(crate) fn held(&self, node: usize) -> usize {
        self.rows[node].held()
    }

    /// Bytes granted on `node`: held plus idle credit; never above the sub-ceiling except
    /// through `charge`.
    pub(crate) fn granted(&self, node: usize) -> usize {
        self.rows[node].granted.load(Ordering::Acquire)
    }

    /// Takes `bytes` on `node` through `shard` if its sub-ceiling allows; otherwise returns
    /// what the node's tokens held.
    pub(crate) fn grant(&self, node: usize, shard: usize, bytes: usize) -> Result<(), usize> {
        let row = &self.rows[node];
        let credit = row.credit(shard);
        if credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                c.checked_sub(bytes)
            })
            .is_ok()
        {
            return Ok(());
        }
        row.ungrant(credit.swap(0, Ordering::AcqRel));
        if row.quantum > 0
            && let Some(with_refill) = bytes.checked_add(row.quantum)
            && row.grant(with_refill).is_ok()
        {
            credit.fetch_add(row.quantum, Ordering::AcqRel);
            return Ok(());
        }
        if row.grant(bytes).is_ok() {
            return Ok(());
        }
        // Before saying no, take back every shard's idle credit of the node.
        row.drain();
        row.grant(bytes).map_err(|_| row.held())
    }

    /// Books `bytes` on `node` unchecked (resident memory, see `Ledger::charge`); idle credit
    /// is returned so that it cannot admit past an overcommitted sub-ceiling.
    pub(crate) fn charge(&self, node: usize, bytes: usize) {
        let row = &self.rows[node];
        let before = row.granted.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > row.ceiling {
            row.drain();
        }
    }

    /// Gives back `bytes` a token held on `node`, through `shard`, keeping at most two quanta
    /// of credit there (none while the node is overcommitted).
    pub(crate) fn release(&self, node: usize, shard: usize, bytes: usize) {
        let row = &self.rows[node];
        let credit = row.credit(shard);
        let now = credit.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let keep = if row.granted.load(Ordering::Acquire) > row.ceiling {
            0
        } else {
            row.quantum
        };
        if (now > 2 * row.quantum || keep == 0)
            && let Ok(before) = credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c > keep).then_some(keep)
            })
        {
            row.ungrant(before - keep);
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
    fn node_ledger_bounds_listed_nodes_and_counts_the_ones_between() {
        assert!(NodeLedger::new(&[], 2).is_none());
        let n = NodeLedger::new(&[(0, 10), (2, 5)], 2).unwrap();
        assert!(n.tracks(1) && !n.tracks(3));
        assert_eq!(n.grant(0, 0, 10), Ok(()));
        assert_eq!(n.grant(0, 1, 1), Err(10));
        assert_eq!(
            n.grant(1, 0, usize::MAX / 2),
            Ok(()),
            "node 1 has no sub-ceiling"
        );
        assert_eq!(n.grant(2, 0, 6), Err(0));
        n.charge(2, 6);
        assert_eq!(n.held(2), 6);
        assert_eq!(n.grant(2, 0, 1), Err(6), "overcommitted by a charge");
        n.release(2, 0, 6);
        assert_eq!(n.grant(2, 1, 5), Ok(()));
    }

    #[test]
    fn node_credit_serves_small_grants_and_denials_stay_exact() {
        // 64 KiB sub-ceiling, 2 shards: a 512-byte quantum.
        let n = NodeLedger::new(&[(0, 64 << 10)], 2).unwrap();
        assert_eq!(n.grant(0, 0, 100), Ok(()));
        assert_eq!(n.granted(0), 100 + 512, "a quantum of credit came with it");
        assert_eq!(n.held(0), 100);
        assert_eq!(n.grant(0, 0, 100), Ok(()));
        assert_eq!(n.granted(0), 612, "served from credit");
        n.release(0, 1, 200);
        assert_eq!(n.held(0), 0);
        assert!(
            n.granted(0) <= 2 * 2 * 512,
            "at most two quanta idle per shard"
        );
        // Idle credit on both shards does not make the node refuse what fits exactly.
        assert_eq!(n.grant(0, 1, 64 << 10), Ok(()));
        assert_eq!(n.grant(0, 0, 1), Err(64 << 10));
        assert_eq!(n.granted(0), 64 << 10);
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

    /// A token of `bytes` is created on `shard`, with the books' strong count simulated by
    /// `count`: it takes a stashed handle or a fresh count.
    fn create_token(l: &Ledger, count: &AtomicUsize, shard: usize, bytes: usize) {
        let Ok((_, from_stash)) = l.reserve_with_handle(l.engine(0), shard, bytes) else {
            panic!("{bytes} bytes fit under the limit");
        };
        if !from_stash {
            count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A token of `bytes` is dropped on `shard`: it parks its handle in the same step as the
    /// bytes, or finishes the release and offers the handle, or releases the count itself.
    fn drop_token(l: &Ledger, count: &AtomicUsize, shard: usize, bytes: usize) {
        let e = l.engine(0);
        let applied = l.plan_release(e, shard, bytes, true).apply();
        if applied.handle_stashed {
            return; // the books may be gone: nothing more may touch them
        }
        assert!(count.load(Ordering::Acquire) > 0, "books used after free");
        l.ungrant(e, applied.trimmed);
        if !Ledger::stash_handle(e.shard_word(shard)) {
            let before = count.fetch_sub(1, Ordering::AcqRel);
            assert!(before > 0, "a count was released twice");
        }
    }

    /// Tokens dropped on two threads sharing a shard (one also splits off and drops a second
    /// token, taking a handle from the stash the other may have just filled) while the
    /// governor closes: every count of the books is released exactly once (none leaks, none is
    /// released twice), whichever of stash, take and close wins each race.
    #[test]
    fn loom_handle_stash_and_close() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let ledger = Arc::new(Ledger::with_quantum(CEILING, &[(LIMIT, 0)], 1, |_| 1));
            // The governor's own count; tokens are created while the governor is alive.
            let count = Arc::new(AtomicUsize::new(1));
            create_token(&ledger, &count, 0, 2);
            create_token(&ledger, &count, 0, 3);
            let (l, c) = (Arc::clone(&ledger), Arc::clone(&count));
            let a = thread::spawn(move || drop_token(&l, &c, 0, 2));
            let (l, c) = (Arc::clone(&ledger), Arc::clone(&count));
            let b = thread::spawn(move || {
                // `split`: a new token while this thread still owns one.
                let from_stash = l.engine(0).take_handle(0);
                if !from_stash {
                    c.fetch_add(1, Ordering::AcqRel);
                }
                drop_token(&l, &c, 0, 0);
                drop_token(&l, &c, 0, 3);
            });
            // The governor goes away while the tokens die.
            let stashed = ledger.close();
            let before = count.fetch_sub(stashed + 1, Ordering::AcqRel);
            assert!(before > stashed, "close released counts it did not own");
            a.join().unwrap();
            b.join().unwrap();
            assert_eq!(
                count.load(Ordering::Acquire),
                0,
                "a count of the books leaked"
            );
            let word = ledger.engine(0).shard_word(0).load(Ordering::Acquire);
            assert_eq!(handles_of(word), 0, "a handle stayed in a closed stash");
        });
    }

    /// Two threads taking node credit and grants under one sub-ceiling: the node's grant never
    /// passes it, the admitted bytes fit under it, and everything balances at the end.
    #[test]
    fn loom_node_credit_respects_the_sub_ceiling() {
        const NODE_CEILING: usize = 256; // 2 shards: a quantum of 2 bytes
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let nodes = Arc::new(NodeLedger::new(&[(0, NODE_CEILING)], 2).unwrap());
            let spawn = |shard: usize, grants: usize| {
                let n = Arc::clone(&nodes);
                thread::spawn(move || {
                    let mut held = 0;
                    for _ in 0..grants {
                        if n.grant(0, shard, 100).is_ok() {
                            held += 100;
                        }
                        assert!(n.granted(0) <= NODE_CEILING, "node over its sub-ceiling");
                    }
                    held
                })
            };
            let (a, b) = (spawn(0, 2), spawn(1, 1));
            let (held_a, held_b) = (a.join().unwrap(), b.join().unwrap());
            assert!(
                held_a + held_b <= NODE_CEILING,
                "admitted {held_a} + {held_b}"
            );
            assert!(held_a + held_b >= 200, "two of the three grants always fit");
            nodes.release(0, 0, held_a);
            nodes.release(0, 1, held_b);
            assert_eq!(nodes.held(0), 0);
            nodes.rows[0].drain();
            assert_eq!(nodes.granted(0), 0);
        });
    }

    /// A ceiling lowered while one thread admits (taking credit ahead) and another releases:
    /// every grant respects the ceiling it saw, and once the change is done and the ledger is
    /// overcommitted, the idle credit left is at most the ledger's slack (two quanta per
    /// shard, granted under the old ceiling). Loom finds interleavings where a racing release
    /// keeps that slack, so the bound, not zero, is what is promised.
    #[test]
    fn loom_set_ceiling_races_admission_and_release() {
        const LOWERED: usize = 4;
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let ledger = Arc::new(Ledger::with_quantum(
                CEILING,
                &[(LIMIT, 0), (LIMIT, 0)],
                2,
                |_| 1,
            ));
            assert_eq!(ledger.reserve(ledger.engine(0), 1, 2), Ok(true));
            let l = Arc::clone(&ledger);
            let admit = thread::spawn(move || {
                let e = l.engine(0);
                let a = usize::from(l.reserve(e, 0, 3).is_ok()) * 3;
                let b = usize::from(l.reserve(e, 0, 1).is_ok());
                check(&l);
                a + b
            });
            let l = Arc::clone(&ledger);
            let release = thread::spawn(move || l.release(l.engine(0), 1, 2));
            assert_eq!(ledger.set_ceiling(LOWERED), CEILING);
            let held = admit.join().unwrap();
            release.join().unwrap();
            check(&ledger);
            let e = ledger.engine(0);
            let credit: usize = (0..2)
                .map(|s| credit_of(e.shard_word(s).load(Ordering::Acquire)))
                .sum();
            if ledger.global() > LOWERED {
                assert!(
                    credit <= 2 * 2,
                    "more than two quanta per shard survived an overcommit (held {held})"
                );
            }
            assert!(held <= CEILING);
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
