//! [`MemoryGovernor`]: the public face of the ledger, with errors, pressure, waiting and events.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::config::{EngineBudget, GovernorConfig, validate_budget};
use crate::engine::{EngineId, human_bytes};
use crate::error::{Holders, MemError};
use crate::ledger::{Denial, EngineLedger, Ledger};
use crate::metrics::StatsRegistry;
use crate::pressure::{PressureLevel, PressureSignal};
use crate::reclaim::ReclaimRegistry;
use crate::reservation::ReservationToken;

/// Counters kept per engine for metrics; touched only on slow paths.
#[derive(Debug, Default)]
pub(crate) struct EngineCounters {
    pub(crate) rejections: AtomicU64,
    pub(crate) reclaim_requests: AtomicU64,
    pub(crate) reclaimed_bytes: AtomicU64,
    pub(crate) reclaim_failures: AtomicU64,
    pub(crate) forced_bytes: AtomicU64,
    /// Bytes async `reserve` calls of this engine are waiting for right now (demand signal).
    pub(crate) waiting_bytes: AtomicUsize,
}

/// The memory governor: per-engine budgets under one global ceiling.
///
/// Create one per process with [`MemoryGovernor::new`] and hand the `Arc` to every engine.
/// See the [crate documentation](crate) for the design.
///
/// # Memory ordering
///
/// When [`try_reserve`](Self::try_reserve) returns `Ok`, the bytes are already counted in the
/// engine's and the global books (all ledger updates are `AcqRel`), so any other thread's
/// admission decision made after that point sees them; and a reservation that succeeds because
/// another token was dropped happens-after that drop.
pub struct MemoryGovernor {
    config: GovernorConfig,
    configured: [bool; EngineId::COUNT],
    pub(crate) ledger: Ledger,
    pub(crate) counters: [EngineCounters; EngineId::COUNT],
    pub(crate) global_rejections: AtomicU64,
    engine_pressure: [PressureSignal; EngineId::COUNT],
    global_pressure: PressureSignal,
    released: Notify,
    pub(crate) reclaimers: ReclaimRegistry,
    pub(crate) consumer_stats: StatsRegistry,
    pub(crate) runtime: OnceLock<tokio::runtime::Runtime>,
    config_changes: parking_lot::Mutex<()>,
}

static NEXT_THREAD_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// Each thread gets its own shard index, round-robin, on first use. A `const` cell keeps
    /// the lookup to one TLS read on the hot path (no lazy-init check).
    static THREAD_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

fn thread_shard() -> usize {
    THREAD_SHARD.with(|s| {
        let shard = s.get();
        if shard == usize::MAX {
            let assigned = NEXT_THREAD_SHARD.fetch_add(1, Ordering::Relaxed);
            s.set(assigned);
            assigned
        } else {
            shard
        }
    })
}

impl MemoryGovernor {
    /// Builds a governor from a validated configuration.
    ///
    /// ```
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib, mib};
    ///
    /// let config = GovernorConfig::builder()
    ///     .global_ceiling(gib(4))
    ///     .engine(EngineId::Query, EngineBudget::new(gib(2)).with_floor(mib(512)))
    ///     .engine(EngineId::Vector, EngineBudget::new(gib(3)).with_floor(gib(1)))
    ///     .engine(EngineId::Timeseries, EngineBudget::new(gib(1)).with_floor(mib(256)))
    ///     .build()?;
    /// let governor = MemoryGovernor::new(config)?;
    /// let scan = governor.try_reserve(EngineId::Query, mib(64))?;
    /// assert_eq!(governor.reserved(EngineId::Query), mib(64));
    /// # drop(scan);
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    pub fn new(config: GovernorConfig) -> Result<Arc<Self>, MemError> {
        let budgets: Vec<(usize, usize)> = config
            .engines
            .iter()
            .map(|b| b.map_or((0, 0), |b| (b.limit(), b.floor())))
            .collect();
        let ledger = Ledger::new(config.ceiling, &budgets, config.shards);
        let configured = std::array::from_fn(|i| config.engines[i].is_some());
        Ok(Arc::new(Self {
            configured,
            ledger,
            counters: Default::default(),
            global_rejections: AtomicU64::new(0),
            engine_pressure: std::array::from_fn(|_| PressureSignal::new()),
            global_pressure: PressureSignal::new(),
            released: Notify::new(),
            reclaimers: ReclaimRegistry::default(),
            consumer_stats: StatsRegistry::default(),
            runtime: OnceLock::new(),
            config_changes: parking_lot::Mutex::new(()),
            config,
        }))
    }

    /// The configuration this governor was built with (limits and floors as at start-up).
    pub fn config(&self) -> &GovernorConfig {
        &self.config
    }

    /// True when `engine` has a budget.
    pub fn is_configured(&self, engine: EngineId) -> bool {
        self.configured[engine.index()]
    }

    pub(crate) fn row(&self, engine: EngineId) -> &EngineLedger {
        self.ledger.engine(engine.index())
    }

    fn configured_row(&self, engine: EngineId) -> Result<&EngineLedger, MemError> {
        if self.configured[engine.index()] {
            Ok(self.row(engine))
        } else {
            Err(MemError::UnknownEngine { engine })
        }
    }

    /// Reserves `bytes` for `engine` now, or says why not. Never blocks.
    ///
    /// Fails with [`MemError::BudgetExhausted`] when the engine's limit would be exceeded and
    /// with [`MemError::GlobalCeilingExceeded`] when the ceiling would be; a caller that can
    /// spill should spill and retry. A denial does not wait for reclaim: use
    /// [`reserve`](Self::reserve) for that.
    pub fn try_reserve(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
    ) -> Result<ReservationToken, MemError> {
        self.admit(engine, bytes)?;
        Ok(ReservationToken::new(Arc::clone(self), engine, bytes))
    }

    /// Reserves `bytes` for `engine`, waiting up to `timeout` for memory to be released or
    /// reclaimed. Needs a Tokio runtime with the time driver. Cancel-safe: dropping the future
    /// leaves nothing reserved.
    ///
    /// While it waits, releases of every engine return their idle credit at once and wake it.
    /// If the engine is below its floor, borrowers are asked to give memory back; if the engine
    /// hit its own limit, its own reclaimer (if any) is asked to free the shortfall.
    pub async fn reserve(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        timeout: Duration,
    ) -> Result<ReservationToken, MemError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let first = match self.try_reserve(engine, bytes) {
            Ok(token) => return Ok(token),
            Err(err) if err.is_denial() => err,
            Err(err) => return Err(err),
        };
        if bytes > self.limit(engine) || bytes > self.ceiling() {
            // No amount of waiting can satisfy it.
            return Err(first);
        }
        let _waiter = WaiterGuard::new(self, engine, bytes);
        let mut asked_reclaim = false;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let last = match self.try_reserve(engine, bytes) {
                Ok(token) => return Ok(token),
                Err(err) if err.is_denial() => err,
                Err(err) => return Err(err),
            };
            if !asked_reclaim {
                asked_reclaim = true;
                self.request_reclaim_for_waiter(engine, bytes, &last);
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(%engine, requested = bytes, waited_ms = timeout.as_millis() as u64, cause = %last, "reservation timed out");
                return Err(MemError::Timeout {
                    engine,
                    requested: bytes,
                    waited: now - started,
                });
            }
            // The sleep is a backstop: a release wakes us through `released`, and a reclaim in
            // flight may free memory in several steps.
            let nap = (deadline - now).min(Duration::from_millis(20));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {
                    // Ask again if the first reclaim did not do it.
                    asked_reclaim = false;
                }
            }
        }
    }

    fn request_reclaim_for_waiter(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        denial: &MemError,
    ) {
        let reserved = self.reserved(engine);
        let floor = self.floor(engine);
        match denial {
            MemError::BudgetExhausted { available, .. } => {
                let shortfall = bytes.saturating_sub(*available);
                self.spawn_reclaim(crate::reclaim::ReclaimScope::Engine(engine), shortfall);
            }
            MemError::GlobalCeilingExceeded { .. } if reserved < floor => {
                let owed = floor - reserved;
                self.spawn_reclaim(
                    crate::reclaim::ReclaimScope::BorrowersExcept(engine),
                    bytes.min(owed),
                );
            }
            _ => {}
        }
    }

    /// Books `bytes` of memory that is already resident (loaded at start-up, WAL replay).
    /// Never fails: the bytes exist whether the books like it or not. If they push the engine
    /// past its limit or the process past its ceiling, the excess shows as overcommit, pressure
    /// rises, and every new admission is denied until it is paid back.
    pub fn charge(self: &Arc<Self>, engine: EngineId, bytes: usize) -> ReservationToken {
        self.book_resident(engine, bytes);
        ReservationToken::new(Arc::clone(self), engine, bytes)
    }

    pub(crate) fn admit(&self, engine: EngineId, bytes: usize) -> Result<(), MemError> {
        let row = self.configured_row(engine)?;
        match self.ledger.reserve(row, thread_shard(), bytes) {
            Ok(moved) => {
                if moved {
                    self.refresh_pressure(engine);
                }
                Ok(())
            }
            Err(denial) => Err(self.deny(engine, bytes, denial)),
        }
    }

    pub(crate) fn book_resident(&self, engine: EngineId, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.ledger.charge(self.row(engine), bytes);
        self.counters[engine.index()]
            .forced_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let row = self.row(engine);
        if row.granted() > row.limit() {
            tracing::warn!(%engine, bytes, granted = row.granted(), limit = row.limit(), "resident memory booked past the engine limit (overcommit)");
        }
        self.refresh_pressure(engine);
    }

    pub(crate) fn give_back(&self, engine: EngineId, bytes: usize) {
        if self.ledger.release(self.row(engine), thread_shard(), bytes) {
            self.refresh_pressure(engine);
        }
        if self.ledger.has_waiters() {
            self.released.notify_waiters();
        }
    }

    fn deny(&self, engine: EngineId, requested: usize, denial: Denial) -> MemError {
        self.counters[engine.index()]
            .rejections
            .fetch_add(1, Ordering::Relaxed);
        let reserved = self.reserved(engine);
        let err = match denial {
            Denial::Limit { limit, .. } => MemError::BudgetExhausted {
                engine,
                requested,
                available: limit.saturating_sub(reserved),
                reserved,
                limit,
            },
            Denial::Ceiling { .. } => {
                self.global_rejections.fetch_add(1, Ordering::Relaxed);
                MemError::GlobalCeilingExceeded {
                    engine,
                    requested,
                    reserved: self.global_reserved() + self.untracked(),
                    ceiling: self.ceiling(),
                    top_holders: self.top_holders(),
                    untracked: self.untracked(),
                }
            }
        };
        tracing::warn!(%engine, requested, reserved, limit = self.limit(engine), global = self.ledger.global(), ceiling = self.ceiling(), error = %err, "memory reservation denied");
        err
    }

    /// Engines holding memory, largest first.
    pub fn top_holders(&self) -> Holders {
        let mut holders: Vec<(EngineId, usize)> = EngineId::ALL
            .iter()
            .map(|&e| (e, self.reserved(e)))
            .filter(|&(_, bytes)| bytes > 0)
            .collect();
        holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Holders(holders)
    }

    fn refresh_pressure(&self, engine: EngineId) {
        let row = self.row(engine);
        let thresholds = self.config.thresholds;
        if self.configured[engine.index()] {
            let level = PressureLevel::from_utilization(row.granted(), row.limit(), &thresholds);
            if let Some(previous) = self.engine_pressure[engine.index()].publish(level) {
                tracing::info!(%engine, from = %previous, to = %level, granted = row.granted(), limit = row.limit(), "engine pressure changed");
            }
        }
        let level =
            PressureLevel::from_utilization(self.ledger.global(), self.ceiling(), &thresholds);
        if let Some(previous) = self.global_pressure.publish(level) {
            tracing::info!(from = %previous, to = %level, global = self.ledger.global(), ceiling = self.ceiling(), "global pressure changed");
        }
    }

    /// Bytes held by live tokens of `engine`.
    pub fn reserved(&self, engine: EngineId) -> usize {
        self.row(engine).reserved()
    }

    /// Bytes granted to `engine`: its tokens plus at most a few quanta of idle per-thread
    /// credit (see the `ledger` module). This is what pressure is computed from.
    pub fn granted(&self, engine: EngineId) -> usize {
        self.row(engine).granted()
    }

    /// The engine's current limit (0 when not configured).
    pub fn limit(&self, engine: EngineId) -> usize {
        self.row(engine).limit()
    }

    /// The engine's current floor.
    pub fn floor(&self, engine: EngineId) -> usize {
        self.row(engine).floor()
    }

    /// Bytes `engine` holds above its floor, i.e. borrowed from other engines' idle floors.
    pub fn borrowed(&self, engine: EngineId) -> usize {
        self.reserved(engine).saturating_sub(self.floor(engine))
    }

    /// Bytes a `try_reserve` of `engine` could get right now: the smaller of the engine's room
    /// under its limit and the room under the ceiling.
    pub fn available(&self, engine: EngineId) -> usize {
        if !self.configured[engine.index()] {
            return 0;
        }
        let engine_room = self.limit(engine).saturating_sub(self.reserved(engine));
        let global_room = self
            .ceiling()
            .saturating_sub(self.global_reserved() + self.untracked());
        engine_room.min(global_room)
    }

    /// Bytes held by live tokens of all engines (untracked memory excluded).
    pub fn global_reserved(&self) -> usize {
        EngineId::ALL.iter().map(|&e| self.reserved(e)).sum()
    }

    /// The global ceiling.
    pub fn ceiling(&self) -> usize {
        self.ledger.ceiling()
    }

    /// Untracked memory currently charged against the ceiling (see [`set_untracked`](Self::set_untracked)).
    pub fn untracked(&self) -> usize {
        self.ledger.untracked()
    }

    /// Charges `bytes` of memory the process holds outside any reservation against the
    /// ceiling, replacing the previous figure; the room left for reservations shrinks by it.
    /// The RSS monitor calls this; the figure is a fact and is not refused.
    pub fn set_untracked(&self, bytes: usize) {
        self.ledger.set_untracked(bytes);
        let level = PressureLevel::from_utilization(
            self.ledger.global(),
            self.ceiling(),
            &self.config.thresholds,
        );
        if let Some(previous) = self.global_pressure.publish(level) {
            tracing::info!(from = %previous, to = %level, untracked = bytes, "global pressure changed");
        }
    }

    /// The engine's pressure level (by its grant against its limit).
    pub fn engine_pressure(&self, engine: EngineId) -> PressureLevel {
        self.engine_pressure[engine.index()].level()
    }

    /// The process's pressure level (everything counted against the ceiling).
    pub fn global_pressure(&self) -> PressureLevel {
        self.global_pressure.level()
    }

    /// A receiver that sees every change of `engine`'s pressure level.
    pub fn subscribe_pressure(&self, engine: EngineId) -> watch::Receiver<PressureLevel> {
        self.engine_pressure[engine.index()].subscribe()
    }

    /// A receiver that sees every change of the global pressure level.
    pub fn subscribe_global_pressure(&self) -> watch::Receiver<PressureLevel> {
        self.global_pressure.subscribe()
    }

    /// Changes `engine`'s limit at run time. The new limit must keep the invariants: at least
    /// the floor, at most the ceiling, and at least what the engine holds now (reclaim first to
    /// go lower).
    pub fn set_limit(&self, engine: EngineId, bytes: usize) -> Result<(), MemError> {
        let row = self.configured_row(engine)?;
        let _serial = self.config_changes.lock();
        validate_budget(
            engine,
            EngineBudget::new(bytes).with_floor(row.floor()),
            self.ceiling(),
        )?;
        self.ledger.set_limit(row, bytes).map_err(|held| {
            MemError::config(
                format!("engine({engine}).limit"),
                format!(
                    "the engine holds {} which is more than the new limit {}; reclaim from it first \
                     (MemoryGovernor::reclaim_from) or choose a higher limit",
                    human_bytes(held),
                    human_bytes(bytes)
                ),
            )
        })?;
        tracing::info!(%engine, limit = bytes, "engine limit changed");
        self.refresh_pressure(engine);
        Ok(())
    }

    /// Changes `engine`'s floor at run time; the floor must stay within the limit and all
    /// floors together within the ceiling.
    pub fn set_floor(&self, engine: EngineId, bytes: usize) -> Result<(), MemError> {
        let row = self.configured_row(engine)?;
        let _serial = self.config_changes.lock();
        validate_budget(
            engine,
            EngineBudget::new(row.limit()).with_floor(bytes),
            self.ceiling(),
        )?;
        let others: usize = EngineId::ALL
            .iter()
            .filter(|&&e| e != engine)
            .map(|&e| self.floor(e))
            .sum();
        if others + bytes > self.ceiling() {
            return Err(MemError::config(
                format!("engine({engine}).floor"),
                format!(
                    "with this floor all floors would add up to {}, above the ceiling {}",
                    human_bytes(others + bytes),
                    human_bytes(self.ceiling())
                ),
            ));
        }
        Ledger::set_floor(row, bytes);
        tracing::info!(%engine, floor = bytes, "engine floor changed");
        Ok(())
    }

    /// The governor's own small runtime for reclaim and rebalancing, started on first use, so
    /// that reclaim works from sync callers and is isolated from the callers' runtimes.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .thread_name("governor-reclaim")
                .enable_time()
                .build()
                .unwrap_or_else(|err| {
                    // Without threads the process cannot do anything useful; there is no error
                    // path to report it through from here.
                    panic!("cannot start the governor's reclaim runtime: {err}")
                })
        })
    }
}

impl Drop for MemoryGovernor {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime inside another runtime's context panics; this never blocks.
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("ceiling", &self.ceiling())
            .field("global_reserved", &self.global_reserved())
            .field("untracked", &self.untracked())
            .finish_non_exhaustive()
    }
}

/// Marks one async waiter for its whole wait, including on cancellation.
struct WaiterGuard<'a> {
    governor: &'a MemoryGovernor,
    engine: EngineId,
    bytes: usize,
}

impl<'a> WaiterGuard<'a> {
    fn new(governor: &'a MemoryGovernor, engine: EngineId, bytes: usize) -> Self {
        governor.ledger.add_waiter();
        governor.counters[engine.index()]
            .waiting_bytes
            .fetch_add(bytes, Ordering::AcqRel);
        // Idle credit parked in shards would otherwise hide freed memory from us.
        governor.ledger.drain_all();
        Self {
            governor,
            engine,
            bytes,
        }
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.governor.counters[self.engine.index()]
            .waiting_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
        self.governor.ledger.remove_waiter();
    }
}
