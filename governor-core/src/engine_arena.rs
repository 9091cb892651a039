//! The governor's face for per-engine arenas: getting engine work onto its arena, and reading
//! what the reconciliation found (`alloc` holds the arenas, `reconcile` the control law).

use crate::alloc::{EngineGuard, engine_arena, engine_arena_or_create, pin_runtime_thread};
use crate::reconcile::{EngineAllocation, Reconciliation};
use crate::{EngineId, MemError, MemoryGovernor};

impl MemoryGovernor {
    /// A multi-thread Tokio runtime builder for `engine`'s own executor: every worker and
    /// blocking thread it starts is pinned to the engine's jemalloc arena, so everything a
    /// DataFusion query, an HNSW load or a memtable flush allocates on it is counted in that
    /// arena and reconciled with the engine's reservations by the RSS monitor.
    ///
    /// The builder comes with all drivers enabled and threads named `<engine>-engine`; set
    /// worker counts, names and the rest as usual. The pinning is its `on_thread_start` hook:
    /// a caller that sets its own hook replaces it and must call
    /// [`enter_engine`](Self::enter_engine) inside its tasks instead.
    ///
    /// When jemalloc is not the global allocator the builder pins nothing (there is no arena
    /// that would see the allocations) and
    /// [`reconciliation`](Self::reconciliation) says the figures are unavailable.
    ///
    /// ```
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
    ///
    /// let governor = MemoryGovernor::new(
    ///     GovernorConfig::builder()
    ///         .global_ceiling(mib(256))
    ///         .engine(EngineId::Query, EngineBudget::new(mib(128)))
    ///         .build()?,
    /// )?;
    /// let runtime = governor
    ///     .engine_runtime_builder(EngineId::Query)?
    ///     .worker_threads(2)
    ///     .build()
    ///     .expect("threads");
    /// let rows = runtime.block_on(async { vec![0u64; 1 << 16].len() }); // on the query arena
    /// assert_eq!(rows, 1 << 16);
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    ///
    /// # Errors
    /// [`MemError::UnknownEngine`] when `engine` has no budget; [`MemError::Allocator`] when
    /// jemalloc refuses to make the arena.
    pub fn engine_runtime_builder(
        &self,
        engine: EngineId,
    ) -> Result<tokio::runtime::Builder, MemError> {
        self.books.configured_row(engine)?;
        let arena = engine_arena_or_create(engine)?;
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name(format!("{engine}-engine"));
        if let Some(arena) = arena {
            // Tokio built with `--cfg loom` has no thread hooks; the loom run models the ledger
            // only and never starts an engine runtime.
            #[cfg(not(loom))]
            builder.on_thread_start(move || pin_runtime_thread(engine, arena));
            #[cfg(loom)]
            let _ = arena;
        }
        Ok(builder)
    }

    /// Charges what the calling thread allocates to `engine`'s arena until the guard drops:
    /// for engine work on a shared thread (a caller's runtime, a reclaim callback).
    ///
    /// Guards nest and restore: entering the vector engine inside a query scope moves the
    /// thread to the vector arena, dropping that guard moves it back to the query arena, and
    /// the thread always ends on the arena it had before the first guard. Entering the engine
    /// the thread is already on (an engine runtime's own thread) costs one allocator read and
    /// no switch. A switch flushes the thread's small-object cache (a few microseconds), so
    /// wrap a unit of work, not each allocation.
    ///
    /// When jemalloc is not the global allocator the guard is inert
    /// ([`EngineGuard::is_pinned`] is false).
    ///
    /// ```
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
    ///
    /// let governor = MemoryGovernor::new(
    ///     GovernorConfig::builder()
    ///         .global_ceiling(mib(256))
    ///         .engine(EngineId::Vector, EngineBudget::new(mib(64)))
    ///         .build()?,
    /// )?;
    /// let vectors = {
    ///     let _vector = governor.enter_engine(EngineId::Vector)?;
    ///     vec![0f32; 1 << 16] // allocated in the vector arena when jemalloc is the allocator
    /// };
    /// # drop(vectors);
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    ///
    /// # Errors
    /// [`MemError::UnknownEngine`] when `engine` has no budget; [`MemError::Allocator`] when
    /// jemalloc refuses to make the arena or to switch the thread.
    pub fn enter_engine(&self, engine: EngineId) -> Result<EngineGuard, MemError> {
        self.books.configured_row(engine)?;
        EngineGuard::enter(engine, engine_arena_or_create(engine)?)
    }

    /// `engine`'s arena, if one was made in this process.
    pub fn engine_arena(&self, engine: EngineId) -> Option<u32> {
        engine_arena(engine)
    }

    /// Bytes charged to `engine` as untracked by the reconciliation (its positive drift, after
    /// the control law of the [`reconcile`](crate::reconcile) module). They count against the
    /// engine's limit and the ceiling, not as reserved.
    pub fn engine_untracked(&self, engine: EngineId) -> usize {
        self.row(engine).untracked()
    }

    /// Σ [`engine_untracked`](Self::engine_untracked) over all engines.
    pub fn total_engine_untracked(&self) -> usize {
        EngineId::ALL
            .iter()
            .map(|&e| self.engine_untracked(e))
            .sum()
    }

    /// Replaces `engine`'s untracked charge (the reconciliation calls this each tick).
    pub(crate) fn set_engine_untracked(&self, engine: EngineId, bytes: usize) {
        self.books
            .ledger
            .set_engine_untracked(self.row(engine), bytes);
        self.books.refresh_pressure(engine);
    }

    /// Whether per-engine allocator figures exist, and if not, why.
    pub fn reconciliation(&self) -> Reconciliation {
        self.allocation.status()
    }

    /// `engine`'s allocator figures as of the RSS monitor's last tick; `None` while the
    /// engine has no arena or no tick has read it (see [`reconciliation`](Self::reconciliation)).
    pub fn engine_allocation(&self, engine: EngineId) -> Option<EngineAllocation> {
        self.allocation.engine(engine)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::alloc::PRETEND_NOT_GLOBAL;
    use crate::rss_monitor::RssMonitorConfig;
    use crate::{
        EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, Reconciliation, gib, mib,
    };

    fn governor() -> Arc<MemoryGovernor> {
        let config = GovernorConfig::builder()
            .global_ceiling(gib(1))
            .engine(EngineId::Query, EngineBudget::new(mib(64)))
            .build()
            .expect("valid config");
        MemoryGovernor::new(config).expect("governor")
    }

    /// Every entry point works and pins nothing, and every report says why there are no
    /// figures instead of showing zeros.
    #[test]
    fn without_jemalloc_the_api_is_inert_and_says_so() {
        PRETEND_NOT_GLOBAL.set(true);
        let governor = governor();
        assert_eq!(governor.reconciliation(), Reconciliation::NotRunning);

        let guard = governor.enter_engine(EngineId::Query).expect("inert guard");
        assert!(!guard.is_pinned());
        assert_eq!(guard.arena(), None);
        assert_eq!(guard.engine(), EngineId::Query);
        drop(guard);

        let runtime = governor
            .engine_runtime_builder(EngineId::Query)
            .expect("plain builder")
            .worker_threads(1)
            .build()
            .expect("runtime");
        let answer = runtime.block_on(async { tokio::spawn(async { 6 * 7 }).await });
        assert_eq!(answer.expect("task"), 42);

        let monitor = governor
            .start_rss_monitor(RssMonitorConfig::default().with_interval(Duration::from_hours(1)))
            .expect("monitor");
        monitor.sample_now().expect("tick");
        match governor.reconciliation() {
            Reconciliation::Unavailable { reason } => {
                assert!(reason.contains("global allocator"), "{reason}");
            }
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert_eq!(governor.engine_allocation(EngineId::Query), None);
        assert_eq!(governor.engine_untracked(EngineId::Query), 0);
        let snapshot = governor.snapshot();
        assert!(
            snapshot
                .engine(EngineId::Query)
                .expect("query")
                .allocation
                .is_none()
        );
        assert!(snapshot.reconciliation.to_string().contains("unavailable"));
        let text = snapshot.to_prometheus();
        assert!(
            text.contains("memgov_engine_reconciliation{state=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(!text.contains("engine_allocated_bytes"), "{text}");
        assert!(!text.contains("engine_drift_bytes"), "{text}");
        PRETEND_NOT_GLOBAL.set(false);
    }

    #[test]
    fn unconfigured_engines_are_refused() {
        let governor = governor();
        assert!(matches!(
            governor.enter_engine(EngineId::Sparse),
            Err(MemError::UnknownEngine {
                engine: EngineId::Sparse
            })
        ));
        assert!(matches!(
            governor.engine_runtime_builder(EngineId::Sparse),
            Err(MemError::UnknownEngine { .. })
        ));
    }

    #[test]
    fn reconciliation_turned_off_is_not_running() {
        let governor = governor();
        let _monitor = governor
            .start_rss_monitor(
                RssMonitorConfig::default()
                    .with_interval(Duration::from_hours(1))
                    .with_engine_reconciliation(false),
            )
            .expect("monitor");
        assert_eq!(governor.reconciliation(), Reconciliation::NotRunning);
        let err = governor
            .start_rss_monitor(RssMonitorConfig::default().with_drift_alarm(f64::NAN))
            .unwrap_err();
        assert!(err.to_string().contains("drift_alarm"), "{err}");
        let err = governor
            .start_rss_monitor(RssMonitorConfig::default().with_drift_alarm(0.0))
            .unwrap_err();
        assert!(matches!(err, MemError::InvalidConfig { .. }), "{err}");
    }
}
