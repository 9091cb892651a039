//! [`GovernedMemoryPool`]: DataFusion's `MemoryPool` trait answered by the governor.
//!
//! Every decision is two questions. First the pool's own policy ([`crate::policy`]): may
//! *this reservation* have more (its fair share for spillers, nothing extra for unspillable
//! ones)? Then the governor: does the Query engine have the bytes under its limit and the
//! global ceiling? Only when both say yes does the consumer's [`ReservationToken`] grow, so
//! the governor's books and DataFusion's agree at every instant. When the governor says no
//! to a request the policy entitles, the slow path ([`GovernedMemoryPool::grow_slow`]) asks
//! other engines to give memory back and waits, on events and bounded, for this pool's
//! consumers above their shares to spill.

use std::fmt::{self, Display, Formatter};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use governor_core::{
    EngineId, MemError, MemoryGovernor, ReservationToken, StatsSourceHandle, human_bytes,
};

use crate::consumers::{Consumer, ConsumerMetrics, Registry, StatsSource};
use crate::options::{GovernedPoolBuilder, PoolOptions};
use crate::policy::{Inputs, Share, merge_owed};
use crate::wait::ReleaseSignal;

/// The engine every governed pool books against.
const ENGINE: EngineId = EngineId::Query;
/// A cached Query budget is re-read from the governor after this many share computations.
const BUDGET_REFRESH: usize = 32;

/// A DataFusion [`MemoryPool`] whose size is the governor's budget for [`EngineId::Query`].
///
/// Pick it when DataFusion shares a process with other engines under one memory ceiling: the
/// pool is as large as the Query budget *now* (it grows when other engines are idle and
/// shrinks when they take their floors back), and it never lets the Query engine hold more
/// than that budget. Inside the budget it is fair between spilling operators and protects
/// the ones that cannot spill; see the [crate docs](crate) for the policy and its reasons.
///
/// Build one with [`GovernorExt::pool`](crate::GovernorExt::pool) or
/// [`GovernedMemoryPool::builder`]. Several `SessionContext`s may share one pool; several
/// pools on one governor share the Query budget (each is fair only among its own consumers).
#[derive(Debug)]
pub struct GovernedMemoryPool {
    governor: Arc<MemoryGovernor>,
    options: PoolOptions,
    registry: Arc<Registry>,
    /// `false` when the governor was built without a Query engine: every `try_grow` then
    /// fails with a configuration error instead of pretending there is memory.
    engine_configured: bool,
    /// Sum of all consumers' `reserved`.
    reserved: AtomicUsize,
    /// Sum of `reserved` over consumers that cannot spill.
    unspillable: AtomicUsize,
    /// Bytes unspillable consumers are waiting for; spillers' shares shrink by this much so
    /// that they spill and make room.
    pending_unspillable: AtomicUsize,
    /// Bytes sorts' merge reservations gave back while spilling and will take again (`K` of
    /// the policy, with `pending_unspillable`).
    kept_merges: AtomicUsize,
    /// Consumers waiting for memory that is theirs by right (unspillable ones, or spillers
    /// within their fair share). While any wait, every consumer is judged as a whole against
    /// the share, so one holding several reservations spills too.
    starving: AtomicUsize,
    /// Registered spilling consumers (`n` of the policy), idle ones included.
    spillers: AtomicUsize,
    /// Registered sort merge reservations that have not reserved yet (their sorts have not
    /// started), and the largest first reservation a merge made: what each of them will ask
    /// for (every sort of a session reserves the same `sort_spill_reservation_bytes`).
    merges_unstarted: AtomicUsize,
    merge_first: AtomicUsize,
    /// Signalled when this pool's consumers give bytes back; waiters sleep on it.
    release: ReleaseSignal,
    /// Registered consumers that cannot spill; the headroom is kept only while there are any.
    unspillable_consumers: AtomicUsize,
    /// The Query budget as last read from the governor, and calls since (see `budget`).
    budget_cache: AtomicUsize,
    budget_ticks: AtomicUsize,
    overcommit: AtomicUsize,
    peak_overcommit: AtomicUsize,
    denials: AtomicU64,
    over_released: AtomicUsize,
    reclaim_requests: AtomicU64,
    reclaimed: AtomicUsize,
    waits: AtomicU64,
    waits_in_vain: AtomicU64,
    grace_grants: AtomicU64,
    /// Unregisters the metrics source from the governor when the pool is dropped.
    _stats: StatsSourceHandle,
}

/// Pool-wide counters of a [`GovernedMemoryPool`], from [`GovernedMemoryPool::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by all consumers of this pool.
    pub reserved: usize,
    /// Bytes held by consumers that cannot spill.
    pub unspillable: usize,
    /// The Query engine's limit in the governor now.
    pub limit: usize,
    /// Live consumers.
    pub consumers: usize,
    /// Bytes booked by DataFusion's infallible `grow` beyond the budget and not yet returned.
    pub overcommit: usize,
    /// Most overcommitted bytes at once.
    pub peak_overcommit: usize,
    /// `try_grow` calls refused.
    pub denials: u64,
    /// Bytes `shrink` was asked to release beyond what the consumer held (a caller bug the
    /// pool absorbed instead of underflowing its books).
    pub over_released: usize,
    /// Times an entitled request the governor refused made the pool ask other engines that
    /// borrowed memory to give it back.
    pub reclaim_requests: u64,
    /// Bytes the governor reported freed by those reclaims.
    pub reclaimed: usize,
    /// Bytes kept out of spillers' shares for sorts' merge reservations that gave them back
    /// while spilling.
    pub kept: usize,
    /// Entitled requests that waited for this pool's consumers to spill.
    pub waits: u64,
    /// Of those, waits that ended refused at their deadline; each consumer has at most one.
    pub waits_in_vain: u64,
    /// Growths granted under the share grace ((S) of [`crate::policy`]) to reservations the
    /// fair share had fallen under.
    pub grace_grants: u64,
}

/// Why a `try_grow` was refused; rendered into the `ResourcesExhausted` message.
enum Denial {
    FairShare(Share),
    /// (M): a sort merge's growth past its first reservation would take what sorts that
    /// have not started, or spilling ones, will reserve.
    MergeGrowth {
        owed: usize,
        free: usize,
    },
    Governor(MemError),
    NotConfigured,
}

impl GovernedMemoryPool {
    /// A pool with the default policy (see [`GovernedPoolBuilder`] for the knobs).
    pub fn new(governor: &Arc<MemoryGovernor>) -> Self {
        Self::with_options(governor, PoolOptions::default())
    }

    /// A builder to set the policy knobs.
    pub fn builder(governor: &Arc<MemoryGovernor>) -> GovernedPoolBuilder {
        GovernedPoolBuilder::new(governor)
    }

    pub(crate) fn with_options(governor: &Arc<MemoryGovernor>, options: PoolOptions) -> Self {
        let engine_configured = governor.is_configured(ENGINE);
        let registry = Arc::new(Registry::default());
        let stats = governor.register_consumer_stats(Arc::new(StatsSource(Arc::clone(&registry))));
        Self {
            governor: Arc::clone(governor),
            options,
            registry,
            engine_configured,
            reserved: AtomicUsize::new(0),
            unspillable: AtomicUsize::new(0),
            pending_unspillable: AtomicUsize::new(0),
            kept_merges: AtomicUsize::new(0),
            starving: AtomicUsize::new(0),
            spillers: AtomicUsize::new(0),
            merges_unstarted: AtomicUsize::new(0),
            merge_first: AtomicUsize::new(0),
            release: ReleaseSignal::default(),
            unspillable_consumers: AtomicUsize::new(0),
            budget_cache: AtomicUsize::new(0),
            budget_ticks: AtomicUsize::new(0),
            overcommit: AtomicUsize::new(0),
            peak_overcommit: AtomicUsize::new(0),
            denials: AtomicU64::new(0),
            over_released: AtomicUsize::new(0),
            reclaim_requests: AtomicU64::new(0),
            reclaimed: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            waits_in_vain: AtomicU64::new(0),
            grace_grants: AtomicU64::new(0),
            _stats: stats,
        }
    }

    /// The governor this pool books against.
    pub fn governor(&self) -> &Arc<MemoryGovernor> {
        &self.governor
    }

    /// The policy this pool was built with.
    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    /// Pool-wide counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            reserved: self.reserved.load(Ordering::Relaxed),
            unspillable: self.unspillable.load(Ordering::Relaxed),
            limit: self.governor.limit(ENGINE),
            consumers: self.registry.len(),
            overcommit: self.overcommit.load(Ordering::Relaxed),
            peak_overcommit: self.peak_overcommit.load(Ordering::Relaxed),
            denials: self.denials.load(Ordering::Relaxed),
            over_released: self.over_released.load(Ordering::Relaxed),
            reclaim_requests: self.reclaim_requests.load(Ordering::Relaxed),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
            kept: self.kept_merges.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            waits_in_vain: self.waits_in_vain.load(Ordering::Relaxed),
            grace_grants: self.grace_grants.load(Ordering::Relaxed),
        }
    }

    /// The live consumers, largest holder first.
    pub fn consumers(&self) -> Vec<ConsumerMetrics> {
        let mut v: Vec<_> = self.registry.live().iter().map(|c| c.metrics()).collect();
        v.sort_by(|a, b| b.reserved.cmp(&a.reserved).then(a.id.cmp(&b.id)));
        v
    }

    /// The share of every spilling reservation right now, per [`crate::policy`].
    ///
    /// `budget` is what the Query engine could hold in total at this instant: its own
    /// reservations plus what the governor would still grant (the smaller of the room under
    /// its limit and the room under the ceiling). What unspillable consumers hold, are owed
    /// (sorts' merge reservations re-taken after a spill) or wait for comes first; the rest
    /// is split evenly among all *registered* spillers, as `FairSpillPool` does, so an idle
    /// spiller's share is never lent to another one that might keep it without calling again.
    fn share(&self, fresh: bool) -> Share {
        Inputs {
            budget: self.budget(fresh),
            unspillable: self.unspillable.load(Ordering::Relaxed),
            kept: self.kept_merges.load(Ordering::Relaxed)
                + self.pending_unspillable.load(Ordering::Relaxed),
            headroom: self.headroom(),
            spillers: self.spillers.load(Ordering::Relaxed),
        }
        .share()
    }

    /// The configured headroom (`H` of the policy): the configured fraction of the Query
    /// limit while any unspillable consumer is registered, nothing otherwise (the default
    /// fraction is 0: what sorts' merges need is kept exactly, see [`crate::policy`]).
    fn headroom(&self) -> usize {
        if self.unspillable_consumers.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        (self.governor.limit(ENGINE) as f64 * self.options.unspillable_headroom) as usize
    }

    /// What the Query engine could hold in total now: `reserved + available` in the governor.
    ///
    /// Those exact figures sum the governor's per-thread credit shards of every engine,
    /// which would make each `try_grow` several times as expensive as DataFusion's own
    /// pools. The share is a policy target, not the limit (the token enforces that exactly),
    /// so a grant may rely on a figure up to `BUDGET_REFRESH` computations old; a denial is
    /// always re-checked with a `fresh` one, so staleness never refuses memory.
    fn budget(&self, fresh: bool) -> usize {
        if fresh
            || self
                .budget_ticks
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(BUDGET_REFRESH)
        {
            let b = self.governor.reserved(ENGINE) + self.governor.available(ENGINE);
            self.budget_cache.store(b, Ordering::Relaxed);
            b
        } else {
            self.budget_cache.load(Ordering::Relaxed)
        }
    }

    /// Bytes held by this pool's spillable consumers.
    fn spillable_reserved(&self) -> usize {
        self.reserved
            .load(Ordering::Relaxed)
            .saturating_sub(self.unspillable.load(Ordering::Relaxed))
    }

    /// Runs `f` on the pool's entry for `c`, from the calling thread's cache when it can.
    fn with_consumer<R>(&self, c: &MemoryConsumer, f: impl FnOnce(&Consumer) -> R) -> R {
        // DataFusion always registers before growing; a reservation that reaches us without a
        // registration (e.g. a wrapper pool that forwards only some calls) is booked anyway so
        // that its bytes are never lost from the books.
        let make = || self.new_consumer(c);
        self.registry
            .with(c.id(), Some(&make), f)
            .expect("an entry is inserted when missing")
    }

    /// Called by the registry only when `c` is actually inserted.
    fn new_consumer(&self, c: &MemoryConsumer) -> Consumer {
        if c.can_spill() {
            self.spillers.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unspillable_consumers.fetch_add(1, Ordering::Relaxed);
        }
        let token = self
            .engine_configured
            .then(|| self.governor.charge(ENGINE, 0));
        let consumer = Consumer::new(c.id(), c.name().to_owned(), c.can_spill(), token);
        if consumer.is_sort_merge {
            self.merges_unstarted.fetch_add(1, Ordering::Relaxed);
        }
        consumer
    }

    /// (M) of the policy: a sort's merge growing past its first reservation (a merge of spill
    /// files, which takes what it can get and merges fewer files at once when refused) must
    /// leave the first reservations of the sorts that have not started, and what is kept for
    /// spilling sorts, free. Refusing it costs a merge pass; taking that memory would fail the
    /// later sort's first batch outright.
    fn merge_growth_refused(&self, c: &Consumer, additional: usize) -> Option<Denial> {
        let first = c.first_reservation.load(Ordering::Relaxed);
        if !c.is_sort_merge || first == 0 || c.reserved() + additional <= first {
            return None;
        }
        let owed = self
            .merges_unstarted
            .load(Ordering::Relaxed)
            .saturating_mul(self.merge_first.load(Ordering::Relaxed))
            .saturating_add(self.kept_merges.load(Ordering::Relaxed));
        if owed == 0 {
            return None;
        }
        let free = self
            .budget(true)
            .saturating_sub(self.reserved.load(Ordering::Relaxed));
        (free < additional.saturating_add(owed)).then_some(Denial::MergeGrowth { owed, free })
    }

    /// Records `bytes` more held by `c` (its token already grew).
    ///
    /// Called with `c`'s token mutex held, like `released`: a consumer's own counters have one
    /// writer at a time, so plain load/store is exact and cheaper than read-modify-write;
    /// they are atomics only so that metrics can read them without the mutex.
    fn booked(&self, c: &Consumer, bytes: usize) {
        let before = c.reserved.load(Ordering::Relaxed);
        c.reserved.store(before + bytes, Ordering::Relaxed);
        if before + bytes > c.peak.load(Ordering::Relaxed) {
            c.peak.store(before + bytes, Ordering::Relaxed);
        }
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        if !c.can_spill {
            self.unspillable.fetch_add(bytes, Ordering::Relaxed);
            if c.is_sort_merge {
                if c.first_reservation.load(Ordering::Relaxed) == 0 {
                    // Its first reservation: from now on it is owed what it took.
                    c.first_reservation.store(before + bytes, Ordering::Relaxed);
                    self.merge_first
                        .fetch_max(before + bytes, Ordering::Relaxed);
                    self.merges_unstarted.fetch_sub(1, Ordering::Relaxed);
                } else {
                    self.move_kept(c, before, before + bytes);
                }
            }
        }
    }

    /// Follows what a sort's merge reservation is owed as it goes from `before` to `after`
    /// bytes (called under its token mutex).
    fn move_kept(&self, c: &Consumer, before: usize, after: usize) {
        let first = c.first_reservation.load(Ordering::Relaxed);
        let (was, is) = (merge_owed(first, before), merge_owed(first, after));
        if is > was {
            self.kept_merges.fetch_add(is - was, Ordering::Relaxed);
        } else if was > is {
            self.kept_merges.fetch_sub(was - is, Ordering::Relaxed);
        }
    }

    /// Records `bytes` fewer held by `c` (its token already shrank).
    fn released(&self, c: &Consumer, bytes: usize) {
        let before = c.reserved.load(Ordering::Relaxed);
        c.reserved.store(before - bytes, Ordering::Relaxed);
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
        if !c.can_spill {
            self.unspillable.fetch_sub(bytes, Ordering::Relaxed);
            if c.is_sort_merge {
                self.move_kept(c, before, before - bytes);
            }
        }
        // Overcommitted bytes are paid back first: once the consumer is under budget again the
        // metric should say so. The common case (no overcommit) costs one load.
        let owed = c.overcommit.load(Ordering::Relaxed);
        if owed > 0 {
            let paid = owed.min(bytes);
            c.overcommit.store(owed - paid, Ordering::Relaxed);
            self.overcommit.fetch_sub(paid, Ordering::Relaxed);
        }
    }

    /// Bytes this pool's spilling consumers other than `except` hold above `share`: what a
    /// starving consumer can hope they spill.
    fn held_above_share(&self, except: usize, share: usize) -> usize {
        self.registry
            .live()
            .iter()
            .filter(|o| o.can_spill && o.id != except)
            .map(|o| o.reserved().saturating_sub(share))
            .sum()
    }

    /// Whether blocking this thread can let this pool's other consumers make progress: not on
    /// a current-thread runtime, whose only thread is the one that would block.
    fn may_wait_for_consumers() -> bool {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread,
            // A plain thread (a test, a custom executor): other threads drive the consumers.
            Err(_) => true,
        }
    }

    fn on_multi_thread_runtime() -> bool {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    }

    /// The slow path of a request the policy entitles but the governor refused (`first`).
    ///
    /// 1. Engines that borrowed beyond their floors are asked to give memory back; their
    ///    reclaimers run on the governor's runtime, so this needs nothing from DataFusion.
    /// 2. If this pool's spillers hold memory above their shares, or an unspillable consumer
    ///    needs room they hold, the requester counts as starving (and an unspillable one's
    ///    bytes are kept from every share), so each of them is refused on its next request and
    ///    spills; the requester waits for those releases, bounded by `reclaim_wait`.
    ///
    /// A spiller that holds bytes of its own is not made to wait when nobody is above their
    /// share: a denial is its cue to spill, which is faster than any wait.
    ///
    /// **Bound.** One request spends at most `2 × reclaim_wait` here (the reclaim, then the
    /// wait), and a consumer whose wait once ended refused never waits again: its later
    /// refusals are immediate. So a query that cannot get its memory fails with
    /// `ResourcesExhausted` (naming the consumer, the Query limit and the top consumers)
    /// after at most `2 × reclaim_wait` per consumer of the query in waits that led nowhere
    /// (10 s each at the default), however often its operators retry.
    fn grow_slow(
        &self,
        c: &Consumer,
        token: &mut ReservationToken,
        reservation_size: usize,
        bytes: usize,
        first: MemError,
    ) -> Result<(), MemError> {
        if !first.is_denial() {
            return Err(first);
        }
        // Bound (issue 24, item 4): a consumer waits in vain at most once. Operators retry
        // a refused request in loops (a sort spilling its sorted run asks again per batch, a
        // multi-level merge re-asks per pass and per halved batch size), and a wait that
        // already ran to its deadline says the memory is not coming; waiting `reclaim_wait`
        // again per retry is what kept sort-merge plans busy for minutes where
        // `FairSpillPool` failed them at once. After one futile wait its refusals are its
        // cue to spill, or its query's typed error.
        if c.waited_in_vain.load(Ordering::Relaxed) {
            return Err(first);
        }
        let deadline = Instant::now() + self.options.reclaim_wait;
        let borrowed_elsewhere = EngineId::ALL
            .iter()
            .filter(|&&e| e != ENGINE)
            .any(|&e| self.governor.borrowed(e) > 0);
        let mut last = first;
        if borrowed_elsewhere {
            self.reclaim_requests.fetch_add(1, Ordering::Relaxed);
            let outcome =
                self.governor
                    .reclaim_for_blocking(ENGINE, bytes, self.options.reclaim_wait);
            self.reclaimed.fetch_add(outcome.freed, Ordering::Relaxed);
            match token.try_grow(bytes) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        // A reclaim that ran (up to `reclaim_wait`) and did not help counts as a wait in vain.
        let give_up = |last: MemError| -> Result<(), MemError> {
            if borrowed_elsewhere {
                c.waited_in_vain.store(true, Ordering::Relaxed);
            }
            Err(last)
        };
        if !Self::may_wait_for_consumers() {
            return give_up(last);
        }
        let share = self.share(true);
        // A spilling reservation that holds nothing cannot spill either (an aggregate
        // replaying its spills asks for its table while its merge holds the rest): like an
        // unspillable consumer it squeezes the other spillers rather than fail.
        let cannot_spill = !c.can_spill || reservation_size == 0;
        let squeeze = if cannot_spill {
            let others = self.spillable_reserved().saturating_sub(if c.can_spill {
                c.reserved()
            } else {
                0
            });
            // Another requester's reclaim of the same loan may still be running (a reclaimer
            // is asked by one plan at a time): its bytes are worth waiting for too.
            if others == 0 && !borrowed_elsewhere {
                return Err(last);
            }
            bytes
        } else {
            if self.held_above_share(c.id, share.per_reservation) == 0 {
                return give_up(last);
            }
            0
        };
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.pending_unspillable
            .fetch_add(squeeze, Ordering::Relaxed);
        self.starving.fetch_add(1, Ordering::Relaxed);
        let mut wait = || {
            self.release
                .wait_until(deadline, || match token.try_grow(bytes) {
                    Ok(()) => Some(()),
                    Err(e) => {
                        last = e;
                        None
                    }
                })
        };
        // On a multi-thread runtime the worker's other tasks (among them, likely, the very
        // spillers we wait for) move to another thread while this one blocks; outside a
        // runtime this just runs the wait.
        let granted = if Self::on_multi_thread_runtime() {
            tokio::task::block_in_place(wait)
        } else {
            wait()
        };
        self.starving.fetch_sub(1, Ordering::Relaxed);
        self.pending_unspillable
            .fetch_sub(squeeze, Ordering::Relaxed);
        if granted.is_none() {
            // Also after a reclaim that came too late: the next request is granted at once
            // or refused at once.
            c.waited_in_vain.store(true, Ordering::Relaxed);
            self.waits_in_vain.fetch_add(1, Ordering::Relaxed);
        }
        granted.ok_or(last)
    }

    /// The spillable half of `try_grow`: (G1) of [`crate::policy`], judged per reservation
    /// as `FairSpillPool` judges it, and per consumer as a whole while anyone starves.
    fn grow_spillable(
        &self,
        c: &Consumer,
        token: &mut ReservationToken,
        reservation_size: usize,
        additional: usize,
    ) -> Result<(), Denial> {
        let over = |s: &Share| {
            let mine = reservation_size.saturating_add(additional);
            mine > s.per_reservation
                || (self.starving.load(Ordering::Relaxed) > 0
                    && c.reserved().saturating_add(additional) > s.per_reservation)
        };
        // A cached budget may grant; only a fresh one may refuse.
        if over(&self.share(false)) {
            let s = self.share(true);
            // (E) of the policy: a reservation holding nothing cannot spill, so a refusal
            // fails its query at once; it may take what the governor has. Even while another
            // consumer starves: if the governor has nothing, it waits in the slow path like
            // the starving one rather than fail outright.
            if over(&s) && reservation_size > 0 {
                return self.grow_in_grace(c, token, reservation_size, additional, s);
            }
        }
        if c.grace_used.load(Ordering::Relaxed) != 0 {
            // Within its share again: a later fall of the share starts a new grace.
            c.grace_used.store(0, Ordering::Relaxed);
        }
        match token.try_grow(additional) {
            Ok(()) => Ok(()),
            Err(first) => self
                .grow_slow(c, token, reservation_size, additional, first)
                .map_err(Denial::Governor),
        }
    }

    /// (S) of [`crate::policy`]: a reservation the share fell under (it held more than its
    /// share before this request) may still grow by the share grace — in all, until it is
    /// within its share again — while no consumer starves and the governor grants it at once.
    /// Anything else is the fair-share refusal, the consumer's cue to spill.
    fn grow_in_grace(
        &self,
        c: &Consumer,
        token: &mut ReservationToken,
        reservation_size: usize,
        additional: usize,
        share: Share,
    ) -> Result<(), Denial> {
        let refused = Err(Denial::FairShare(share));
        if reservation_size <= share.per_reservation || self.starving.load(Ordering::Relaxed) > 0 {
            return refused;
        }
        let grace = (reservation_size as f64 * self.options.share_grace) as usize;
        let used = c.grace_used.load(Ordering::Relaxed);
        if used.saturating_add(additional) > grace {
            return refused;
        }
        // No slow path: a consumer above its share never makes others wait or spill.
        if token.try_grow(additional).is_err() {
            return refused;
        }
        c.grace_used.fetch_add(additional, Ordering::Relaxed);
        self.grace_grants.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn deny(&self, c: &Consumer, additional: usize, why: &Denial) -> DataFusionError {
        c.denials.fetch_add(1, Ordering::Relaxed);
        self.denials.fetch_add(1, Ordering::Relaxed);
        let message = self.exhausted_message(c, additional, why);
        if c.can_spill {
            tracing::debug!(consumer = %c.name, requested = additional, "spillable consumer denied");
        } else {
            tracing::warn!(
                engine = %ENGINE,
                consumer = %c.name,
                requested = additional,
                "unspillable consumer denied after reclaim: {message}"
            );
        }
        DataFusionError::ResourcesExhausted(message)
    }

    /// The out-of-memory message: who asked, why not, the pool's top consumers and the
    /// engines holding the ceiling, so whoever reads it at 3 a.m. knows where memory went.
    fn exhausted_message(&self, c: &Consumer, additional: usize, why: &Denial) -> String {
        use std::fmt::Write as _;
        let hs = human_bytes;
        let mut m = format!(
            "Failed to allocate additional {} for {}#{} (can spill: {}) with {} already allocated: ",
            hs(additional),
            c.name,
            c.id,
            c.can_spill,
            hs(c.reserved()),
        );
        match why {
            Denial::FairShare(s) => {
                let _ = write!(
                    m,
                    "its fair share is {} ({} registered spilling consumers share the Query budget after {} held or kept for unspillable ones)",
                    hs(s.per_reservation),
                    s.spillers,
                    hs(s.for_unspillable),
                );
            }
            Denial::Governor(e) => {
                let _ = write!(m, "the governor refused: {e}");
            }
            Denial::MergeGrowth { owed, free } => {
                let _ = write!(
                    m,
                    "a sort merge may grow past its first reservation only while {} stays free for the merge reservations of sorts that have not started or are spilling ({} free)",
                    hs(*owed),
                    hs(*free)
                );
            }
            Denial::NotConfigured => {
                m.push_str(
                    "the memory governor has no budget for the query engine; configure one with \
                     GovernorConfig::builder().engine(EngineId::Query, EngineBudget::new(..))",
                );
                return m;
            }
        }
        let _ = write!(
            m,
            ". Query engine: {} reserved of limit {} ({} of it by this pool); global: {} of ceiling {}",
            hs(self.governor.reserved(ENGINE)),
            hs(self.governor.limit(ENGINE)),
            hs(self.reserved.load(Ordering::Relaxed)),
            hs(self.governor.global_reserved()),
            hs(self.governor.ceiling()),
        );
        let _ = write!(
            m,
            ". Engines holding the ceiling: {}",
            self.governor.top_holders()
        );
        m.push_str(". Top consumers of this pool: ");
        let top = self.consumers();
        for (i, t) in top.iter().take(self.options.top_consumers).enumerate() {
            let _ = write!(
                m,
                "{}{}#{}(can spill: {}) consumed {}, peak {}, denials {}",
                if i == 0 { "" } else { ", " },
                t.name,
                t.id,
                t.can_spill,
                hs(t.reserved),
                hs(t.peak),
                t.denials
            );
        }
        if top.is_empty() {
            m.push_str("none");
        }
        m.push('.');
        m
    }
}

impl MemoryPool for GovernedMemoryPool {
    fn name(&self) -> &'static str {
        "governed"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.with_consumer(consumer, |_| ());
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if let Some(c) = self.registry.remove(consumer.id()) {
            if c.can_spill {
                self.spillers.fetch_sub(1, Ordering::Relaxed);
            } else {
                self.unspillable_consumers.fetch_sub(1, Ordering::Relaxed);
            }
            // DataFusion frees every reservation before the registration goes; if a caller
            // did not, the token's drop gives the bytes back rather than leak them in the
            // governor. Taken out so that a thread's cached entry holds nothing.
            let mut slot = c.token.lock();
            let token = slot.take();
            let left = c.reserved();
            if left > 0 {
                self.released(&c, left);
            }
            if c.is_sort_merge {
                // Its sort is gone: nothing is owed any more.
                let first = c.first_reservation.swap(0, Ordering::Relaxed);
                self.kept_merges
                    .fetch_sub(merge_owed(first, 0), Ordering::Relaxed);
                if first == 0 {
                    self.merges_unstarted.fetch_sub(1, Ordering::Relaxed);
                }
            }
            drop(slot);
            drop(token);
            self.release.released();
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        if additional == 0 {
            return;
        }
        self.with_consumer(reservation.consumer(), |c| {
            self.grow_consumer(c, additional);
        });
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let consumer = reservation.consumer();
        if self
            .registry
            .with(consumer.id(), None, |c| self.shrink_consumer(c, shrink))
            .is_none()
        {
            self.over_released.fetch_add(shrink, Ordering::Relaxed);
            tracing::error!(
                consumer = consumer.name(),
                bytes = shrink,
                "shrink of an unknown consumer ignored"
            );
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        if additional == 0 {
            return Ok(());
        }
        self.with_consumer(reservation.consumer(), |c| {
            self.try_grow_consumer(c, reservation.size(), additional)
        })
    }

    fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        // The effective limit: a Query limit above the ceiling cannot be had.
        MemoryLimit::Finite(self.governor.effective_limit(ENGINE))
    }
}

impl GovernedMemoryPool {
    fn grow_consumer(&self, c: &Consumer, additional: usize) {
        let mut token = c.token.lock();
        if let Some(t) = token.as_mut()
            && t.try_grow(additional).is_err()
        {
            // `grow` cannot fail and DataFusion adds the bytes to the reservation anyway, so
            // the governor must count them. What still fits is booked normally; only the rest
            // goes through force_grow, which the governor counts as overcommit, and we
            // remember it here until it is shrunk away.
            let room = self.governor.available(ENGINE).min(additional);
            let fit = if room > 0 && t.try_grow(room).is_ok() {
                room
            } else {
                0
            };
            let over = additional - fit;
            t.force_grow(over);
            c.overcommit.fetch_add(over, Ordering::Relaxed);
            let now = self.overcommit.fetch_add(over, Ordering::Relaxed) + over;
            self.peak_overcommit.fetch_max(now, Ordering::Relaxed);
            tracing::debug!(consumer = %c.name, bytes = over, "infallible grow booked as overcommit");
        }
        self.booked(c, additional);
    }

    fn shrink_consumer(&self, c: &Consumer, shrink: usize) {
        let mut token = c.token.lock();
        let held = c.reserved();
        let bytes = shrink.min(held);
        if bytes < shrink {
            // A pool must never underflow; DataFusion's MemoryReservation prevents this, so a
            // hit here is a caller bug: record it and release what is actually held.
            self.over_released
                .fetch_add(shrink - bytes, Ordering::Relaxed);
            tracing::error!(consumer = %c.name, requested = shrink, held, "shrink beyond held clamped");
        }
        if bytes == 0 {
            return;
        }
        if let Some(t) = token.as_mut()
            && let Err(e) = t.shrink(bytes)
        {
            // Cannot happen while `reserved` mirrors the token under this lock; keep the
            // governor's word if it does.
            tracing::error!(consumer = %c.name, error = %e, "governor token out of step with pool books");
        }
        self.released(c, bytes);
        drop(token);
        self.release.released();
    }

    fn try_grow_consumer(
        &self,
        c: &Consumer,
        reservation_size: usize,
        additional: usize,
    ) -> Result<()> {
        let mut token = c.token.lock();
        let Some(t) = token.as_mut() else {
            return Err(self.deny(c, additional, &Denial::NotConfigured));
        };
        if c.can_spill {
            if let Err(why) = self.grow_spillable(c, t, reservation_size, additional) {
                return Err(self.deny(c, additional, &why));
            }
        } else if let Some(why) = self.merge_growth_refused(c, additional) {
            return Err(self.deny(c, additional, &why));
        } else if let Err(first) = t.try_grow(additional)
            && let Err(e) = self.grow_slow(c, t, reservation_size, additional, first)
        {
            return Err(self.deny(c, additional, &Denial::Governor(e)));
        }
        self.booked(c, additional);
        Ok(())
    }
}

impl Display for GovernedMemoryPool {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}(engine: {ENGINE}, reserved: {}, query limit: {}, consumers: {})",
            self.name(),
            human_bytes(self.reserved.load(Ordering::Relaxed)),
            human_bytes(self.governor.limit(ENGINE)),
            self.registry.len(),
        )
    }
}
