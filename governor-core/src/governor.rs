//! [`MemoryGovernor`]: the public face of the ledger, with errors, pressure, waiting and events.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::books::Books;
use crate::config::{EngineBudget, GovernorConfig, validate_budget};
use crate::engine::{EngineId, human_bytes};
use crate::error::{Holders, MemError};
use crate::ledger::{EngineLedger, Ledger};
use crate::metrics::StatsRegistry;
use crate::pressure::PressureLevel;
use crate::reclaim::ReclaimRegistry;
use crate::reservation::ReservationToken;

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
    /// What tokens keep alive (see the `books` module).
    pub(crate) books: Arc<Books>,
    pub(crate) reclaimers: ReclaimRegistry,
    pub(crate) consumer_stats: StatsRegistry,
    pub(crate) runtime: OnceLock<tokio::runtime::Runtime>,
    /// Serialises run-time changes of limits, floors and the ceiling.
    pub(crate) config_changes: parking_lot::Mutex<()>,
    /// Per-engine allocator figures from the RSS monitor's reconciliation (`reconcile` module).
    pub(crate) allocation: crate::reconcile::AllocationBook,
    /// Units of work that may be aborted (`work` module).
    pub(crate) work: crate::work::WorkRegistry,
    /// Recent reclaim calls, for stories (`story` module).
    pub(crate) history: crate::story::History,
    /// Where the ceiling came from and the container's last sample (`environment` module).
    pub(crate) environment: crate::environment::EnvironmentBook,
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
        let environment = crate::environment::EnvironmentBook::new(config.ceiling_source.clone());
        Ok(Arc::new_cyclic(|owner| Self {
            environment,
            books: Arc::new(Books::new(config, owner.clone())),
            reclaimers: ReclaimRegistry::default(),
            consumer_stats: StatsRegistry::default(),
            runtime: OnceLock::new(),
            config_changes: parking_lot::Mutex::new(()),
            allocation: crate::reconcile::AllocationBook::default(),
            work: crate::work::WorkRegistry::default(),
            history: crate::story::History::default(),
        }))
    }

    /// The configuration this governor was built with (limits and floors as at start-up).
    pub fn config(&self) -> &GovernorConfig {
        &self.books.config
    }

    /// True when `engine` has a budget.
    pub fn is_configured(&self, engine: EngineId) -> bool {
        self.books.configured[engine.index()]
    }

    pub(crate) fn row(&self, engine: EngineId) -> &EngineLedger {
        self.books.row(engine)
    }

    fn configured_row(&self, engine: EngineId) -> Result<&EngineLedger, MemError> {
        self.books.configured_row(engine)
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
        self.books
            .new_token(engine, self.books.node_for(None), bytes)
    }

    /// As [`try_reserve`](Self::try_reserve), for memory that will live on NUMA node `node`
    /// (its OS index) whichever thread asks: for callers that place memory themselves. Without
    /// node sub-ceilings in the configuration this is `try_reserve`.
    ///
    /// Fails with [`MemError::NodeCeilingExceeded`] when the node's sub-ceiling would be
    /// exceeded, besides the denials of `try_reserve`.
    pub fn try_reserve_on_node(
        self: &Arc<Self>,
        engine: EngineId,
        node: usize,
        bytes: usize,
    ) -> Result<ReservationToken, MemError> {
        self.books
            .new_token(engine, self.books.node_for(Some(node)), bytes)
    }

    /// Bytes all engines hold on NUMA node `node`, and its sub-ceiling; `None` when the
    /// configuration does not bound that node's row (see
    /// [`GovernorConfigBuilder::numa_node_ceiling`](crate::GovernorConfigBuilder::numa_node_ceiling)).
    pub fn numa_node_usage(&self, node: usize) -> Option<(usize, usize)> {
        let nodes = self.books.nodes.as_ref().filter(|n| n.tracks(node))?;
        Some((nodes.held(node), nodes.ceiling(node)))
    }

    /// Reserves `bytes` for `engine`, waiting up to `timeout` for memory to be released or
    /// reclaimed. Needs a Tokio runtime with the time driver. Cancel-safe: dropping the future
    /// leaves nothing reserved.
    ///
    /// While it waits, releases of every engine return their idle credit at once and wake it.
    /// If the engine is below its floor, borrowers are asked to give memory back; if the engine
    /// hit its own limit, its own reclaimer (if any) is asked to free the shortfall. A request
    /// within the engine's floor, lent out, that reclaim cannot satisfy in time aborts a
    /// registered unit of work ([`register_work`](Self::register_work)) of a borrower; every
    /// other request only waits. A timeout carries the story of what was tried. See the
    /// `ladder` module.
    pub async fn reserve(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        timeout: Duration,
    ) -> Result<ReservationToken, MemError> {
        self.reserve_as(engine, bytes, timeout, None).await
    }

    /// Books `bytes` of memory that is already resident (loaded at start-up, WAL replay).
    /// Never refused for lack of room: the bytes exist whether the books like it or not. If
    /// they push the engine past its limit or the process past its ceiling, the excess shows
    /// as overcommit, pressure rises, and every new admission is denied until it is paid back.
    ///
    /// A size beyond [`MAX_BYTES`](crate::MAX_BYTES) cannot be real memory (it comes from a
    /// bad computation or a damaged file); it is booked as `MAX_BYTES`, logged as an error, and
    /// the token's [`size`](ReservationToken::size) says what was booked. Use
    /// [`try_charge`](Self::try_charge) to get an error instead.
    pub fn charge(self: &Arc<Self>, engine: EngineId, bytes: usize) -> ReservationToken {
        let booked = bytes.min(crate::MAX_BYTES);
        if booked < bytes {
            tracing::error!(%engine, bytes, booked, "charge beyond MAX_BYTES clamped; the size cannot be real memory");
        }
        self.book(engine, booked)
    }

    /// As [`charge`](Self::charge), but a size beyond [`MAX_BYTES`](crate::MAX_BYTES) is
    /// refused with [`MemError::InvalidConfig`] and nothing is booked.
    pub fn try_charge(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
    ) -> Result<ReservationToken, MemError> {
        if bytes > crate::MAX_BYTES {
            return Err(MemError::config(
                "charge",
                format!(
                    "{} cannot be resident memory: the governor accounts for at most {} (MAX_BYTES)",
                    human_bytes(bytes),
                    human_bytes(crate::MAX_BYTES)
                ),
            ));
        }
        Ok(self.book(engine, bytes))
    }

    fn book(self: &Arc<Self>, engine: EngineId, bytes: usize) -> ReservationToken {
        let node = self.books.node_for(None);
        self.books.book_resident(engine, node, bytes);
        ReservationToken::new(self.books.handle_for(engine), engine, node, bytes)
    }

    /// Engines holding memory, largest first.
    pub fn top_holders(&self) -> Holders {
        self.books.top_holders()
    }

    pub(crate) fn refresh_pressure(&self, engine: EngineId) {
        self.books.refresh_pressure(engine);
    }

    /// Bytes held by live tokens of `engine`.
    pub fn reserved(&self, engine: EngineId) -> usize {
        self.row(engine).reserved()
    }

    /// Bytes granted to `engine`: its tokens plus at most a few quanta of idle per-thread
    /// credit (see the `ledger` module), plus the allocator drift charged to it
    /// ([`engine_untracked`](Self::engine_untracked)). This is what pressure is computed from.
    pub fn granted(&self, engine: EngineId) -> usize {
        self.row(engine).granted()
    }

    /// The engine's current limit (0 when not configured).
    pub fn limit(&self, engine: EngineId) -> usize {
        self.row(engine).limit()
    }

    /// The most `engine` can hold now: the smaller of its [`limit`](Self::limit) and the
    /// ceiling in force. A configured limit may be above the ceiling (the ceiling may follow
    /// the container the process starts in); admission is then bounded by the ceiling.
    pub fn effective_limit(&self, engine: EngineId) -> usize {
        self.limit(engine).min(self.ceiling())
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
    /// under its limit (less the drift charged to it) and the room under the ceiling.
    pub fn available(&self, engine: EngineId) -> usize {
        if !self.is_configured(engine) {
            return 0;
        }
        let engine_room = self
            .limit(engine)
            .saturating_sub(self.reserved(engine) + self.engine_untracked(engine));
        let global_room = self.ceiling().saturating_sub(
            self.global_reserved() + self.untracked() + self.total_engine_untracked(),
        );
        engine_room.min(global_room)
    }

    /// Bytes held by live tokens of all engines (untracked memory and idle credit excluded),
    /// as one consistent figure: it is worked out from a single reading of the ledger's global
    /// counter, the figure every admission checks against the ceiling, less the idle credit
    /// and untracked memory that counter also holds.
    ///
    /// So while other threads reserve and release it is never above the ceiling (whereas
    /// adding [`reserved`](Self::reserved) of each engine reads the engines at different
    /// instants and can). The exceptions are the ones the ledger itself has: memory booked
    /// with [`charge`](Self::charge) past the ceiling, and a ceiling lowered by
    /// [`set_ceiling`](Self::set_ceiling) below what was already held, or untracked memory
    /// ([`set_untracked`](Self::set_untracked)) pushing the books past it. It equals the sum
    /// of the engines' `reserved` when no operation is in flight; while some are, it may be
    /// off by the bytes they are moving, in either direction, but never above the ceiling.
    pub fn global_reserved(&self) -> usize {
        self.books.global_reserved()
    }

    /// The global ceiling.
    pub fn ceiling(&self) -> usize {
        self.books.ceiling()
    }

    /// Untracked memory currently charged against the ceiling (see [`set_untracked`](Self::set_untracked)).
    pub fn untracked(&self) -> usize {
        self.books.untracked()
    }

    /// Charges `bytes` of memory the process holds outside any reservation against the
    /// ceiling, replacing the previous figure; the room left for reservations shrinks by it.
    /// The RSS monitor calls this; the figure is a fact and is not refused.
    pub fn set_untracked(&self, bytes: usize) {
        self.books.ledger.set_untracked(bytes);
        self.books.refresh_global_pressure();
    }

    /// The engine's pressure level (by its grant against its limit).
    pub fn engine_pressure(&self, engine: EngineId) -> PressureLevel {
        self.books.engine_pressure[engine.index()].level()
    }

    /// The process's pressure level (everything counted against the ceiling).
    pub fn global_pressure(&self) -> PressureLevel {
        self.books.global_pressure.level()
    }

    /// Raises the global pressure level to at least `level` for reasons outside the books:
    /// the kernel reports memory pressure (PSI) or OOM events although the reservations look
    /// fine. The books' own level still applies when it is higher; `PressureLevel::Normal`
    /// withdraws the request. The container watch calls this; callers with their own signal
    /// may too.
    pub fn set_environment_pressure(&self, level: PressureLevel) {
        let before = self
            .books
            .environment_pressure
            .swap(level as u8, Ordering::AcqRel);
        if before != level as u8 {
            tracing::info!(%level, "environment pressure changed");
            self.books.refresh_global_pressure();
        }
    }

    /// The least global level the environment currently asks for (see
    /// [`set_environment_pressure`](Self::set_environment_pressure)).
    pub fn environment_pressure(&self) -> PressureLevel {
        PressureLevel::from_u8(self.books.environment_pressure.load(Ordering::Acquire))
    }

    /// A receiver that sees every change of `engine`'s pressure level.
    pub fn subscribe_pressure(&self, engine: EngineId) -> watch::Receiver<PressureLevel> {
        self.books.engine_pressure[engine.index()].subscribe()
    }

    /// A receiver that sees every change of the global pressure level.
    pub fn subscribe_global_pressure(&self) -> watch::Receiver<PressureLevel> {
        self.books.global_pressure.subscribe()
    }

    /// Changes `engine`'s limit at run time. The new limit must keep the invariants: at least
    /// the floor, at most the ceiling in force, and at least what the engine holds now (reclaim
    /// first to go lower). (A limit configured at `build()` may be above the ceiling: see
    /// [`effective_limit`](Self::effective_limit).)
    pub fn set_limit(&self, engine: EngineId, bytes: usize) -> Result<(), MemError> {
        let row = self.configured_row(engine)?;
        let _serial = self.config_changes.lock();
        validate_budget(engine, EngineBudget::new(bytes).with_floor(row.floor()))?;
        // A limit set at run time must fit the ceiling in force: the operator asking for it is
        // told at once. (A configured limit above the ceiling is taken at `build()`, where the
        // ceiling may come from the container the process happens to start in.)
        let ceiling = self.ceiling();
        if bytes > ceiling {
            return Err(MemError::config(
                format!("engine({engine}).limit"),
                format!(
                    "the limit ({}) is above the global ceiling ({}); no engine can hold more than the ceiling, \
                     lower the limit to at most the ceiling",
                    human_bytes(bytes),
                    human_bytes(ceiling)
                ),
            ));
        }
        self.books.ledger.set_limit(row, bytes).map_err(|held| {
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
        validate_budget(engine, EngineBudget::new(row.limit()).with_floor(bytes))?;
        // Each floor is at most its limit, at most `MAX_BYTES`, so the sum cannot overflow; the
        // last addition is checked because `bytes` comes from the caller.
        let others: usize = EngineId::ALL
            .iter()
            .filter(|&&e| e != engine)
            .map(|&e| self.floor(e))
            .sum();
        let total = others.saturating_add(bytes);
        if total > self.ceiling() {
            return Err(MemError::config(
                format!("engine({engine}).floor"),
                format!(
                    "with this floor all floors would add up to {}, above the ceiling {}",
                    human_bytes(total),
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
        // Tokens may outlive the governor; the counts of the books parked in the shards'
        // stashes must not. After `close` no shard takes a handle, so each token still alive
        // releases its own count.
        for _ in 0..self.books.ledger.close() {
            // SAFETY: each stashed handle is one strong count of `self.books`, taken out of the
            // stash exactly once by `close`; `self.books` keeps the books alive meanwhile.
            unsafe { Arc::decrement_strong_count(Arc::as_ptr(&self.books)) };
        }
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
