//! The RSS monitor: charges memory the books do not see to an *untracked* account.
//!
//! Reservations are what engines *said* they hold. The process really holds more: batches in
//! flight that DataFusion does not count, allocator fragmentation, freed pages jemalloc keeps
//! for reuse, code, stacks, libraries. The ceiling is about real RSS, so a background thread
//! measures it and charges the gap to the governor ([`MemoryGovernor::set_untracked`]); the
//! room left for reservations shrinks by it, and admission starts refusing *before* the kernel
//! sees the process over the ceiling.
//!
//! ```text
//!   every interval:  R = resident (kernel VmRSS)      T = Σ reserved (live tokens)
//!                    u = clamp(R − T, 0, C)            raw untracked
//!                    s = filter(u)                     control law below
//!                    governor.set_untracked(min(C, s + headroom))
//!                    retention: pressure ≥ Warning → jemalloc returns freed pages at once
//!                               (calm again for a hold → its start-up decay; `retention`)
//!   if global pressure ≥ Emergency (and not cooling down):
//!        purge jemalloc's dirty pages → re-measure → still Emergency?
//!        → reclaim from borrowers down to the Critical threshold → purge again
//!        → still Emergency? → reclaim from every holder, below floors too → purge → cool down
//! ```
//!
//! ## The control law
//!
//! The filter is an asymmetric peak follower with a dead band. With `s` the state, `u` the new
//! raw sample, `d` the dead band and `r ∈ (0, 1]` the release rate:
//!
//! * **attack** — `u > s`: `s ← u`. Growth is charged at once: under-counting is what lets RSS
//!   pass the ceiling, so there is no smoothing on the way up.
//! * **hold** — `s − d ≤ u ≤ s`: `s` unchanged. Dips smaller than the dead band (a reservation
//!   made but not yet touched, allocator jitter) do not move the books.
//! * **release** — `u < s − d`: `s ← s − ⌈r · (s − u)⌉`. Memory that left is returned
//!   geometrically, a fraction `r` of the gap per tick, never below `u`.
//!
//! The published figure is `min(C, s + headroom)`; the headroom covers untracked growth
//! within one interval (the monitor samples, it cannot see between samples).
//!
//! **Bounds.** At every tick `u ≤ s`, so the governor never counts less untracked memory than
//! it measured; `s ≤ max(u over the ticks since the last release)`, so it never invents
//! memory; after a drop to a constant `u`, `s − u ≤ max(d, (1 − r)^k · (s₀ − u))` after `k`
//! ticks, so it converges to within the dead band in `⌈ln(d / gap) / ln(1 − r)⌉` ticks.
//!
//! **No oscillation.** The law is monotone: for a rising input the output never falls, for a
//! falling input it never rises, and it never overshoots the input (attack lands exactly on
//! `u`, release stops at `u`). So the output can change direction only when the input does —
//! noise smaller than the dead band changes nothing at all — and there is no gain above 1
//! anywhere for a loop to amplify. The one loop that could feed itself is reclaim: freed reservations
//! lower `T` at once while jemalloc keeps the pages resident for a while, which looks like
//! *more* untracked memory. It is cut three ways: dirty pages are purged before and after
//! a reclaim (and only the drop in RSS a purge caused is credited back at once, see
//! [`UntrackedFilter::credit`]); a reclaim asks only for the excess over the Critical
//! threshold (a hysteresis band below Emergency); and reclaims are separated by a cool-down.
//!
//! **Floors give way to the ceiling.** Memory nobody reserved (batches in flight, allocator
//! retention, code) cannot be reclaimed, but reserved memory can be given up in its place.
//! When borrowers alone do not bring the process out of Emergency, the monitor asks every
//! engine with a reclaimer for the rest, largest holder first, even below its floor
//! ([`ReclaimScope::Holders`]): a floor protects an engine from other engines' borrowing,
//! not from the process being killed at the ceiling. Turn it off with
//! [`RssMonitorConfig::with_shed_below_floors`].
//! The unit tests drive the law over a synthetic ramp and a closed-loop simulation, without
//! threads.
//!
//! **Retention.** Part of what the books do not explain is not held by anyone: pages of freed
//! memory that jemalloc keeps resident for reuse (10 s by default). Near the ceiling each tick
//! has the allocator return them at once instead, and credits the resulting drop as it does
//! a purge's; away from it the allocator's own decay comes back. The policy and its state
//! machine are in the [`retention`](crate::retention) module
//! ([`RssMonitorConfig::with_allocator_retention`]).
//!
//! **Per engine.** When engines run on their own jemalloc arenas, each tick also reconciles
//! every engine's reservations with its arena and charges an engine's positive drift to that
//! engine alone; the global figure above then covers only what no engine arena explains
//! (`R − T − Σ charged`). The per-engine law and its dead band are stated in the
//! [`reconcile`](crate::reconcile) module.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::alloc::decay::{
    configured_dirty_decay, default_dirty_decay, set_dirty_decay_everywhere,
};
use crate::alloc::{
    Figure, JemallocStats, MemorySource, arenas_see_allocations, jemalloc_is_global_allocator,
    process_resident_bytes, purge_all_arenas,
};
use crate::reconcile::{DEFAULT_DRIFT_ALARM, EngineDriftLaw, Reconciled, Reconciler};
use crate::retention::{AllocatorRetention, RetentionSteer};
use crate::{MemError, MemoryGovernor, PressureLevel, ReclaimScope, human_bytes, mib};

/// The monitor's default sampling interval.
///
/// One tick costs a read of `/proc/self/statm` and a few atomic loads (a few microseconds, see
/// `BENCHMARKS.md`), so 100 ms costs well under 0.1 % of one core while reacting faster than
/// any engine can allocate its way past a ceiling of a few GiB.
pub const DEFAULT_RSS_MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// Where the monitor reads the process's resident memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResidentSource {
    /// The kernel's RSS (`/proc/self/statm`) when readable, else jemalloc's `stats.resident`
    /// when jemalloc is the global allocator.
    #[default]
    Auto,
    /// Only the kernel's RSS: everything the process holds, allocator or not.
    ProcessRss,
    /// Only jemalloc's resident bytes: ignores code, stacks and non-jemalloc mappings.
    JemallocResident,
}

/// The parameters of the control law (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControlLaw {
    /// Dips of the raw untracked figure up to this many bytes are ignored.
    pub deadband: usize,
    /// Fraction of the gap returned per tick when untracked memory falls, in `(0, 1]`.
    pub release: f64,
    /// Bytes added to the published figure to cover growth between two samples.
    pub headroom: usize,
}

impl ControlLaw {
    /// Defaults scaled to a ceiling: dead band 1 % of it (at least 1 MiB), headroom 2 %,
    /// release a quarter of the gap per tick (a drop is mostly returned within ~16 ticks).
    pub fn for_ceiling(ceiling: usize) -> Self {
        Self {
            deadband: (ceiling / 100).max(mib(1)).min(ceiling / 4),
            release: 0.25,
            headroom: ceiling / 50,
        }
    }

    fn validate(&self, ceiling: usize) -> Result<(), MemError> {
        let invalid = |field: &str, reason: String| MemError::InvalidConfig {
            field: format!("rss_monitor.law.{field}"),
            reason,
        };
        if !(self.release > 0.0 && self.release <= 1.0) {
            return Err(invalid(
                "release",
                format!(
                    "{} is outside (0, 1]; 0 would never return memory, above 1 would overshoot",
                    self.release
                ),
            ));
        }
        if self.deadband >= ceiling {
            return Err(invalid(
                "deadband",
                format!(
                    "{} is not below the ceiling {}",
                    human_bytes(self.deadband),
                    human_bytes(ceiling)
                ),
            ));
        }
        if self.headroom >= ceiling {
            return Err(invalid(
                "headroom",
                format!(
                    "{} is not below the ceiling {}",
                    human_bytes(self.headroom),
                    human_bytes(ceiling)
                ),
            ));
        }
        Ok(())
    }
}

/// The control law as a pure state machine: feed it samples, get the figure to publish.
///
/// ```
/// use governor_core::rss_monitor::{ControlLaw, UntrackedFilter};
///
/// let law = ControlLaw { deadband: 10, release: 0.5, headroom: 0 };
/// let mut filter = UntrackedFilter::new(law, 1_000);
/// assert_eq!(filter.update(300, 100), 200); // attack: 200 untracked, charged at once
/// assert_eq!(filter.update(295, 100), 200); // a 5-byte dip is inside the dead band
/// assert_eq!(filter.update(200, 100), 150); // release: half the gap per tick
/// assert_eq!(filter.update(200, 100), 125);
/// ```
#[derive(Clone, Debug)]
pub struct UntrackedFilter {
    law: ControlLaw,
    ceiling: usize,
    state: Option<usize>,
}

impl UntrackedFilter {
    /// A filter for a governor with `ceiling`; the first sample is taken as it is.
    pub fn new(law: ControlLaw, ceiling: usize) -> Self {
        Self {
            law,
            ceiling,
            state: None,
        }
    }

    /// Takes one sample (`resident` bytes measured, `reserved` bytes booked) and returns the
    /// untracked figure to publish, `min(ceiling, s + headroom)`.
    pub fn update(&mut self, resident: usize, reserved: usize) -> usize {
        let raw = resident.saturating_sub(reserved).min(self.ceiling);
        let next = match self.state {
            None => raw,
            Some(s) if raw >= s => raw,
            Some(s) if s - raw <= self.law.deadband => s,
            Some(s) => {
                let gap = s - raw;
                // ceil(r · gap) ≥ 1 and ≤ gap because r ∈ (0, 1]: the step never passes `raw`.
                let step = ((gap as f64) * self.law.release).ceil() as usize;
                s - step.clamp(1, gap)
            }
        };
        self.state = Some(next);
        self.published()
    }

    /// Returns `returned` bytes at once, skipping the release, then takes a sample:
    /// `s ← max(u, s − returned)`. Used right after the monitor purged the allocator, with
    /// `returned` the drop in resident memory the purge caused: that much is known to have
    /// left, not a transient dip. Anything else stays under the normal law, and `s` never
    /// goes below the measured `u`.
    pub fn credit(&mut self, returned: usize, resident: usize, reserved: usize) -> usize {
        let raw = resident.saturating_sub(reserved).min(self.ceiling);
        let next = self
            .state
            .map_or(raw, |s| s.saturating_sub(returned).max(raw));
        self.state = Some(next);
        self.published()
    }

    /// Follows a new ceiling: publishes at most `ceiling` from now on, with `law`. The
    /// measured state is kept: the bytes outside the books did not change with the ceiling.
    pub fn retune(&mut self, law: ControlLaw, ceiling: usize) {
        self.law = law;
        self.ceiling = ceiling;
        self.state = self.state.map(|s| s.min(ceiling));
    }

    /// The ceiling the published figure is bounded by.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The filtered untracked bytes (without headroom), `None` before the first sample.
    pub fn smoothed(&self) -> Option<usize> {
        self.state
    }

    /// The figure to publish for the current state (0 before the first sample).
    pub fn published(&self) -> usize {
        self.state
            .map_or(0, |s| s.saturating_add(self.law.headroom).min(self.ceiling))
    }
}

/// How the RSS monitor runs. Build it from [`Default`] and the `with_*` methods.
// Each flag is an independent on/off switch of one `with_*` method, not states of one machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug)]
pub struct RssMonitorConfig {
    interval: Duration,
    source: ResidentSource,
    law: Option<ControlLaw>,
    purge_on_emergency: bool,
    reclaim_on_emergency: bool,
    shed_below_floors: bool,
    reclaim_wait: Duration,
    cooldown_ticks: u32,
    reconcile_engines: bool,
    engine_law: Option<EngineDriftLaw>,
    drift_alarm: f64,
    retention: AllocatorRetention,
}

impl Default for RssMonitorConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_RSS_MONITOR_INTERVAL,
            source: ResidentSource::Auto,
            law: None,
            purge_on_emergency: true,
            reclaim_on_emergency: true,
            shed_below_floors: true,
            reclaim_wait: Duration::from_secs(2),
            cooldown_ticks: 5,
            reconcile_engines: true,
            engine_law: None,
            drift_alarm: DEFAULT_DRIFT_ALARM,
            retention: AllocatorRetention::default(),
        }
    }
}

impl RssMonitorConfig {
    /// How often to sample (default [`DEFAULT_RSS_MONITOR_INTERVAL`]); at least 1 ms.
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Where to read resident memory (default [`ResidentSource::Auto`]).
    #[must_use]
    pub fn with_source(mut self, source: ResidentSource) -> Self {
        self.source = source;
        self
    }

    /// The control law (default [`ControlLaw::for_ceiling`] of the governor's ceiling).
    #[must_use]
    pub fn with_law(mut self, law: ControlLaw) -> Self {
        self.law = Some(law);
        self
    }

    /// Whether to purge jemalloc's dirty pages at Emergency (default true).
    #[must_use]
    pub fn with_purge_on_emergency(mut self, purge: bool) -> Self {
        self.purge_on_emergency = purge;
        self
    }

    /// Whether to ask borrowers to reclaim at Emergency (default true), and how long one tick
    /// waits for them (default 2 s; the reclaim goes on in the background after that).
    #[must_use]
    pub fn with_reclaim_on_emergency(mut self, reclaim: bool, wait: Duration) -> Self {
        self.reclaim_on_emergency = reclaim;
        self.reclaim_wait = wait;
        self
    }

    /// Whether, when reclaiming from borrowers did not end the Emergency, to ask every engine
    /// with a reclaimer for the rest, even below its floor (default true; see the module docs).
    #[must_use]
    pub fn with_shed_below_floors(mut self, shed: bool) -> Self {
        self.shed_below_floors = shed;
        self
    }

    /// Ticks to wait after an Emergency action before the next one (default 5), so freed
    /// memory shows up in RSS before the monitor judges again.
    #[must_use]
    pub fn with_cooldown_ticks(mut self, ticks: u32) -> Self {
        self.cooldown_ticks = ticks;
        self
    }

    /// Whether each tick reconciles every engine's books with its arena and charges its drift
    /// to it (default true; see the [`reconcile`](crate::reconcile) module). Without jemalloc
    /// as the global allocator it reports the figures unavailable either way.
    #[must_use]
    pub fn with_engine_reconciliation(mut self, reconcile: bool) -> Self {
        self.reconcile_engines = reconcile;
        self
    }

    /// One drift law for every engine (default [`EngineDriftLaw::for_limit`] of each engine's
    /// limit).
    #[must_use]
    pub fn with_engine_law(mut self, law: EngineDriftLaw) -> Self {
        self.engine_law = Some(law);
        self
    }

    /// Raise a drift alarm when an engine's drift (either sign) passes this fraction of its
    /// limit (default [`DEFAULT_DRIFT_ALARM`], a quarter); must be finite and above 0.
    #[must_use]
    pub fn with_drift_alarm(mut self, fraction_of_limit: f64) -> Self {
        self.drift_alarm = fraction_of_limit;
        self
    }

    /// How the monitor steers jemalloc's retention of freed pages (default
    /// [`AllocatorRetention::FollowPressure`]: returned at once from the Warning level on; see
    /// the [`retention`](crate::retention) module). Without jemalloc as the global allocator
    /// there is nothing to steer and this does nothing.
    #[must_use]
    pub fn with_allocator_retention(mut self, retention: AllocatorRetention) -> Self {
        self.retention = retention;
        self
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// What the monitor has seen and done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RssMonitorStats {
    /// Samples taken.
    pub ticks: u64,
    /// The last resident figure and its source.
    pub last_resident: Option<Figure>,
    /// The last raw untracked figure, resident − reserved.
    pub last_raw_untracked: usize,
    /// The last figure published to the governor.
    pub published_untracked: usize,
    /// Ticks that found the governor at Emergency and acted.
    pub emergencies: u64,
    /// jemalloc purges done.
    pub purges: u64,
    /// Reclaims requested from borrowers.
    pub reclaims: u64,
    /// Reclaims requested from every holder, below floors, because borrowers were not enough.
    pub floor_reclaims: u64,
    /// Bytes the reclaimers reported freed.
    pub reclaimed_bytes: usize,
    /// Engine drift alarms raised (see the [`reconcile`](crate::reconcile) module).
    pub drift_alarms: u64,
    /// Σ bytes charged to engines as their own untracked memory at the last tick.
    pub engine_charged: usize,
    /// Times the monitor changed jemalloc's decay of freed pages (see
    /// [`RssMonitorConfig::with_allocator_retention`]).
    pub retention_switches: u64,
    /// Whether freed pages are returned at once now because the ceiling is near.
    pub retention_tight: bool,
    /// Samples that failed (the previous figure stays in force).
    pub errors: u64,
    /// The last failure, for a person on call.
    pub last_error: Option<String>,
}

struct MonitorState {
    filter: UntrackedFilter,
    reconciler: Reconciler,
    retention: RetentionSteer,
    cooldown: u32,
}

struct Shared {
    config: RssMonitorConfig,
    /// Held for a whole tick, so that `sample_now` and the thread never interleave.
    state: Mutex<MonitorState>,
    /// Held only for a moment, so that `stats()` never waits for a slow reclaim.
    stats: Mutex<RssMonitorStats>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// Keeps the RSS monitor running; dropping it stops the thread and waits for it (at most
/// the reclaim wait of an Emergency tick in progress).
///
/// The monitor holds the governor weakly: it also stops when the governor is dropped.
#[must_use = "dropping the handle stops the monitor"]
pub struct RssMonitorHandle {
    shared: Arc<Shared>,
    governor: Weak<MemoryGovernor>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RssMonitorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RssMonitorHandle")
            .field("interval", &self.shared.config.interval)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RssMonitorHandle {
    /// What the monitor has seen and done so far.
    pub fn stats(&self) -> RssMonitorStats {
        self.shared.stats.lock().clone()
    }

    /// Takes a sample now, on the calling thread, exactly as a tick of the monitor would
    /// (including Emergency actions), and returns the figure published.
    ///
    /// # Errors
    /// [`MemError::Allocator`] when resident memory cannot be read; [`MemError::InvalidConfig`]
    /// when the governor was dropped.
    pub fn sample_now(&self) -> Result<usize, MemError> {
        let governor = self
            .governor
            .upgrade()
            .ok_or_else(|| MemError::InvalidConfig {
                field: "rss_monitor".into(),
                reason: "the governor this monitor watched has been dropped".into(),
            })?;
        tick(&governor, &self.shared)
    }

    /// Stops the monitor and waits for its thread (what dropping the handle does).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the monitor thread was already reported by the panic hook; there is
            // nothing more a drop can do with it.
            let _ = thread.join();
        }
        // Leave the allocator as the monitor found it: a stopped monitor cannot relax a tight
        // decay later, and the process would pay page faults for nothing.
        let mut state = self.shared.state.lock();
        if let Some(decay) = state.retention.restore() {
            match set_dirty_decay_everywhere(decay) {
                Ok(_) => state.retention.applied(decay),
                Err(err) => {
                    tracing::warn!(error = %err, "RSS monitor could not restore the allocator's decay");
                }
            }
        }
    }
}

impl Drop for RssMonitorHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl MemoryGovernor {
    /// Starts the RSS monitor on a thread of its own (no async runtime needed): every
    /// interval it charges resident − reserved to the untracked account, and at Emergency it
    /// purges the allocator and reclaims from borrowers. See the
    /// [`rss_monitor`](crate::rss_monitor) module for the control law.
    ///
    /// ```
    /// use std::time::Duration;
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, gib};
    /// use governor_core::rss_monitor::RssMonitorConfig;
    ///
    /// let governor = MemoryGovernor::new(
    ///     GovernorConfig::builder().global_ceiling(gib(4)).engine(EngineId::Query, EngineBudget::new(gib(2))).build()?,
    /// )?;
    /// let monitor = governor.start_rss_monitor(RssMonitorConfig::default())?;
    /// monitor.sample_now()?; // the process's code and heap are now charged as untracked
    /// assert!(governor.untracked() > 0);
    /// drop(monitor); // stops the thread
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    ///
    /// # Errors
    /// [`MemError::InvalidConfig`] for an interval under 1 ms or above a week, or an invalid
    /// control law;
    /// [`MemError::Allocator`] when no source of resident memory works here; never for a
    /// failure later on (those are counted in [`RssMonitorStats::errors`] and logged).
    pub fn start_rss_monitor(
        self: &Arc<Self>,
        config: RssMonitorConfig,
    ) -> Result<RssMonitorHandle, MemError> {
        if config.interval < Duration::from_millis(1) {
            return Err(MemError::InvalidConfig {
                field: "rss_monitor.interval".into(),
                reason: format!(
                    "{:?} is below 1 ms; the monitor would spin",
                    config.interval
                ),
            });
        }
        if config.interval > Duration::from_hours(7 * 24) {
            // Also keeps `Instant + interval` below overflow (`Duration::MAX` panicked there).
            return Err(MemError::InvalidConfig {
                field: "rss_monitor.interval".into(),
                reason: format!(
                    "{:?} is above a week; memory outside the books would go unseen that long",
                    config.interval
                ),
            });
        }
        let law = config
            .law
            .unwrap_or_else(|| ControlLaw::for_ceiling(self.ceiling()));
        law.validate(self.ceiling())?;
        if let Some(engine_law) = &config.engine_law {
            engine_law.validate()?;
        }
        config.retention.validate()?;
        if !(config.drift_alarm.is_finite() && config.drift_alarm > 0.0) {
            return Err(MemError::InvalidConfig {
                field: "rss_monitor.drift_alarm".into(),
                reason: format!(
                    "{} is not a positive fraction of the engine's limit",
                    config.drift_alarm
                ),
            });
        }
        // Fail now, not silently in the thread, when there is nothing to measure.
        read_resident(config.source)?;
        let reconciler = Reconciler::start(
            self,
            config.reconcile_engines,
            config.engine_law,
            config.drift_alarm,
        );
        // Without jemalloc as the global allocator its decay steers none of the process's
        // memory: nothing to do, whatever the policy.
        let retention = if arenas_see_allocations() {
            RetentionSteer::new(config.retention, configured_dirty_decay()?)
        } else {
            RetentionSteer::new(AllocatorRetention::Untouched, None)
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(MonitorState {
                filter: UntrackedFilter::new(law, self.ceiling()),
                reconciler,
                retention,
                cooldown: 0,
            }),
            stats: Mutex::new(RssMonitorStats::default()),
            config,
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let governor = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("governor-rss-monitor".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let governor = governor.clone();
                move || run(&governor, &shared)
            })
            .map_err(|err| MemError::Allocator {
                reason: format!("cannot start the RSS monitor thread: {err}"),
            })?;
        tracing::info!(interval = ?shared.config.interval, ?law, "RSS monitor started");
        Ok(RssMonitorHandle {
            shared,
            governor,
            thread: Some(thread),
        })
    }
}

fn run(governor: &Weak<MemoryGovernor>, shared: &Shared) {
    let mut next = Instant::now() + shared.config.interval;
    loop {
        {
            let mut stop = shared.stop.lock();
            while !*stop {
                if shared.wake.wait_until(&mut stop, next).timed_out() {
                    break;
                }
            }
            if *stop {
                return;
            }
        }
        // Fixed-rate schedule; after a long stall (a slow reclaim) start afresh, not in a burst.
        next += shared.config.interval;
        let now = Instant::now();
        if next < now {
            next = now + shared.config.interval;
        }
        let Some(governor) = governor.upgrade() else {
            return;
        };
        // Errors are recorded in the stats by `tick`; the monitor keeps going.
        let _ = tick(&governor, shared);
    }
}

/// Reads resident memory from `source`.
fn read_resident(source: ResidentSource) -> Result<Figure, MemError> {
    let from_proc = || {
        process_resident_bytes().map(|bytes| Figure {
            bytes,
            source: MemorySource::ProcStatm,
        })
    };
    let from_jemalloc = || {
        if !jemalloc_is_global_allocator() {
            return Err(MemError::Allocator {
                reason: "jemalloc is not the global allocator, so its resident figure does not \
                         describe the process; use ResidentSource::ProcessRss or install \
                         tikv_jemallocator::Jemalloc as #[global_allocator]"
                    .into(),
            });
        }
        let stats = JemallocStats::query()?;
        Ok(Figure {
            bytes: stats.resident,
            source: MemorySource::Jemalloc,
        })
    };
    match source {
        ResidentSource::ProcessRss => from_proc(),
        ResidentSource::JemallocResident => from_jemalloc(),
        ResidentSource::Auto => from_proc().or_else(|proc_err| {
            from_jemalloc().map_err(|je_err| MemError::Allocator {
                reason: format!("no resident-memory figure: {proc_err}; {je_err}"),
            })
        }),
    }
}

/// One monitor tick: sample, publish, and act at Emergency.
fn tick(governor: &Arc<MemoryGovernor>, shared: &Shared) -> Result<usize, MemError> {
    // One tick at a time: `sample_now` and the thread must not interleave their filter updates.
    let mut state = shared.state.lock();
    let config = &shared.config;
    shared.stats.lock().ticks += 1;
    let resident = match read_resident(config.source) {
        Ok(resident) => resident,
        Err(err) => {
            let mut stats = shared.stats.lock();
            stats.errors += 1;
            if stats.errors == 1 {
                tracing::warn!(error = %err, "RSS monitor cannot read resident memory; untracked figure frozen");
            }
            stats.last_error = Some(err.to_string());
            return Err(err);
        }
    };
    // A live ceiling (`set_ceiling`, a followed container) moves the law's scale with it: a
    // headroom sized for the old ceiling would, after a drop, charge more than the new one
    // allows and refuse every admission.
    let ceiling = governor.ceiling();
    if ceiling != state.filter.ceiling() {
        let law = config.law.map_or_else(
            || ControlLaw::for_ceiling(ceiling),
            |law| ControlLaw {
                deadband: law.deadband.min(ceiling / 4),
                headroom: law.headroom.min(ceiling / 4),
                ..law
            },
        );
        state.filter.retune(law, ceiling);
    }
    let reconciled = reconcile(governor, &mut state.reconciler, &shared.stats);
    // What the books explain: tokens, and each engine's own drift charged to it.
    let reserved = governor.global_reserved() + reconciled.charged;
    let published = if reconciled.rise > 0 {
        // Bytes that moved from "nobody's" to an engine's account leave the global one now.
        state
            .filter
            .credit(reconciled.rise, resident.bytes, reserved)
    } else {
        state.filter.update(resident.bytes, reserved)
    };
    record(&shared.stats, resident, reserved, published);
    governor.set_untracked(published);
    let published =
        steer_retention(governor, &mut state, shared, resident.bytes).unwrap_or(published);

    if state.cooldown > 0 {
        state.cooldown -= 1;
        return Ok(published);
    }
    if governor.global_pressure() < PressureLevel::Emergency {
        return Ok(published);
    }
    shared.stats.lock().emergencies += 1;
    state.cooldown = config.cooldown_ticks;
    tracing::warn!(
        resident = resident.bytes,
        reserved,
        untracked = published,
        ceiling = governor.ceiling(),
        "RSS monitor: emergency pressure, purging allocator and reclaiming"
    );
    let mut published = published;
    let mut last_resident = resident.bytes;
    if config.purge_on_emergency && purge(&shared.stats) {
        (published, last_resident) = remeasure(
            governor,
            &mut state.filter,
            &shared.stats,
            config.source,
            last_resident,
        )
        .unwrap_or((published, last_resident));
    }
    if config.reclaim_on_emergency {
        let thresholds = governor.config().thresholds();
        let target_used =
            (governor.ceiling() as u128 * u128::from(thresholds.critical_pct) / 100) as usize;
        // Borrowers first; if that does not end the Emergency, every holder: the floors give
        // way to the ceiling.
        let stages = [
            (ReclaimScope::Borrowers, true),
            (ReclaimScope::Holders, config.shed_below_floors),
        ];
        for (scope, enabled) in stages {
            let excess =
                (governor.global_reserved() + governor.total_engine_untracked() + published)
                    .saturating_sub(target_used);
            if !enabled || excess == 0 || governor.global_pressure() < PressureLevel::Emergency {
                continue;
            }
            {
                let mut stats = shared.stats.lock();
                if scope == ReclaimScope::Holders {
                    stats.floor_reclaims += 1;
                } else {
                    stats.reclaims += 1;
                }
            }
            let freed = reclaim(governor, scope, excess, config.reclaim_wait);
            shared.stats.lock().reclaimed_bytes += freed;
            if scope == ReclaimScope::Holders {
                tracing::warn!(
                    asked = excess,
                    freed,
                    "RSS monitor reclaim below floors: borrowers could not end the emergency"
                );
            } else {
                tracing::info!(asked = excess, freed, "RSS monitor reclaim from borrowers");
            }
            if config.purge_on_emergency && freed > 0 && purge(&shared.stats) {
                (published, last_resident) = remeasure(
                    governor,
                    &mut state.filter,
                    &shared.stats,
                    config.source,
                    last_resident,
                )
                .unwrap_or((published, last_resident));
            }
        }
    }
    Ok(published)
}

/// One tick of the retention policy (see the [`retention`](crate::retention) module). When it
/// tightened the decay, jemalloc returned the dirty pages at once: the drop is measured and
/// credited like a purge's, and the new published figure is returned.
fn steer_retention(
    governor: &Arc<MemoryGovernor>,
    state: &mut MonitorState,
    shared: &Shared,
    resident_before: usize,
) -> Option<usize> {
    // The allocator is one per process: another monitor (or the application) may have set
    // the decay since; then decide afresh instead of trusting what this steer applied.
    if let Some(applied) = state.retention.current()
        && default_dirty_decay().is_ok_and(|now| now != applied)
    {
        state.retention.forget();
    }
    let decay = state.retention.on_tick(governor.global_pressure())?;
    if let Err(err) = set_dirty_decay_everywhere(decay) {
        let mut stats = shared.stats.lock();
        if stats.errors == 0 {
            tracing::warn!(error = %err, "RSS monitor cannot set the allocator's decay");
        }
        stats.errors += 1;
        stats.last_error = Some(err.to_string());
        return None;
    }
    state.retention.applied(decay);
    let tight = state.retention.is_tight();
    {
        let mut stats = shared.stats.lock();
        stats.retention_switches += 1;
        stats.retention_tight = tight;
    }
    tracing::info!(
        ?decay,
        tight,
        pressure = ?governor.global_pressure(),
        "RSS monitor: allocator decay of freed pages changed"
    );
    if !tight {
        return None;
    }
    remeasure(
        governor,
        &mut state.filter,
        &shared.stats,
        shared.config.source,
        resident_before,
    )
    .map(|(published, _)| published)
}

/// Reconciles every engine arena; a failure is counted and the charges stay as they were.
fn reconcile(
    governor: &MemoryGovernor,
    reconciler: &mut Reconciler,
    stats: &Mutex<RssMonitorStats>,
) -> Reconciled {
    let (reconciled, error) = reconciler.tick(governor);
    let mut stats = stats.lock();
    stats.drift_alarms += reconciled.alarms;
    stats.engine_charged = reconciled.charged;
    if let Some(err) = error {
        if stats.errors == 0 {
            tracing::warn!(error = %err, "RSS monitor cannot read an engine arena; its charge is frozen");
        }
        stats.errors += 1;
        stats.last_error = Some(err.to_string());
    }
    reconciled
}

fn record(stats: &Mutex<RssMonitorStats>, resident: Figure, reserved: usize, published: usize) {
    let mut stats = stats.lock();
    stats.last_resident = Some(resident);
    stats.last_raw_untracked = resident.bytes.saturating_sub(reserved);
    stats.published_untracked = published;
}

/// Purges every jemalloc arena; false (and counted as an error) when it failed.
fn purge(stats: &Mutex<RssMonitorStats>) -> bool {
    let result = purge_all_arenas();
    let mut stats = stats.lock();
    match result {
        Ok(()) => {
            stats.purges += 1;
            true
        }
        Err(err) => {
            stats.errors += 1;
            stats.last_error = Some(err.to_string());
            false
        }
    }
}

/// After our own purge: measure again and credit what the purge returned (see
/// [`UntrackedFilter::credit`]). Returns the published figure and the resident bytes measured.
fn remeasure(
    governor: &Arc<MemoryGovernor>,
    filter: &mut UntrackedFilter,
    stats: &Mutex<RssMonitorStats>,
    source: ResidentSource,
    resident_before: usize,
) -> Option<(usize, usize)> {
    let resident = read_resident(source).ok()?;
    let reserved = governor.global_reserved() + governor.total_engine_untracked();
    let returned = resident_before.saturating_sub(resident.bytes);
    let published = filter.credit(returned, resident.bytes, reserved);
    record(stats, resident, reserved, published);
    governor.set_untracked(published);
    Some((published, resident.bytes))
}

/// Asks the engines of `scope` for `bytes` and waits at most `wait`; returns the bytes
/// reported freed by then (the plan goes on in the background).
fn reclaim(
    governor: &Arc<MemoryGovernor>,
    scope: ReclaimScope,
    bytes: usize,
    wait: Duration,
) -> usize {
    governor.reclaim_blocking(scope, bytes, wait).freed
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn law() -> ControlLaw {
        ControlLaw {
            deadband: 2 * MB,
            release: 0.25,
            headroom: 0,
        }
    }

    /// Direction changes of a sequence, ignoring flat stretches.
    fn reversals(values: &[usize]) -> usize {
        let mut last_dir = 0i8;
        let mut count = 0;
        for w in values.windows(2) {
            let dir = match w[1].cmp(&w[0]) {
                std::cmp::Ordering::Greater => 1,
                std::cmp::Ordering::Less => -1,
                std::cmp::Ordering::Equal => continue,
            };
            if last_dir != 0 && dir != last_dir {
                count += 1;
            }
            last_dir = dir;
        }
        count
    }

    /// Deterministic noise in [-amp, amp] (a small LCG; no randomness in unit tests).
    fn noise(i: usize, amp: usize) -> isize {
        let x = (i as u64)
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let span = 2 * amp as u64 + 1;
        ((x >> 33) % span) as isize - amp as isize
    }

    #[test]
    fn ramp_up_plateau_noise_ramp_down() {
        let ceiling = 1024 * MB;
        let mut filter = UntrackedFilter::new(law(), ceiling);
        let mut input = Vec::new();
        let mut output = Vec::new();
        // Ramp 0 → 200 MiB in 2 MiB steps, plateau with ±1 MiB noise (inside the dead band),
        // ramp down to 40 MiB, then hold.
        for i in 0..=100 {
            input.push(i * 2 * MB);
        }
        for i in 0..200 {
            input.push((200 * MB).saturating_add_signed(noise(i, MB)) - MB);
        }
        for i in 0..=80 {
            input.push(200 * MB - i * 2 * MB);
        }
        input.extend(std::iter::repeat_n(40 * MB, 40));

        let reserved = 64 * MB; // constant bookings: the filter sees resident − reserved
        for &u in &input {
            output.push(filter.update(u + reserved, reserved));
        }
        for (k, (&u, &s)) in input.iter().zip(&output).enumerate() {
            assert!(s >= u, "tick {k}: published {s} under measured {u}");
        }
        // Attack is exact on the way up.
        assert_eq!(&output[..=100], &input[..=100]);
        // The plateau's noise never moves the output.
        let plateau = &output[101..301];
        assert!(plateau.iter().all(|&s| s == plateau[0]), "plateau moved");
        // One rise and one fall in all: no oscillation, although the input reversed ~100 times.
        assert!(reversals(&input) > 50);
        assert_eq!(reversals(&output), 1);
        // Converged to within the dead band of the final input, and never below it.
        let last = *output.last().unwrap();
        assert!(
            last >= 40 * MB && last - 40 * MB <= law().deadband,
            "{last}"
        );
    }

    #[test]
    fn release_is_geometric_and_bounded() {
        let mut filter = UntrackedFilter::new(law(), usize::MAX);
        filter.update(100 * MB, 0);
        let mut gap = 100 * MB;
        for k in 1..=30 {
            let s = filter.update(0, 0);
            let bound = law()
                .deadband
                .max(((100 * MB) as f64 * 0.75f64.powi(k)).ceil() as usize);
            assert!(s <= bound, "tick {k}: {s} > {bound}");
            assert!(s <= gap, "never rises on a falling input");
            gap = s;
        }
        assert!(gap <= law().deadband);
    }

    #[test]
    fn published_is_clamped_and_carries_headroom() {
        let law = ControlLaw {
            headroom: 5 * MB,
            ..law()
        };
        let mut filter = UntrackedFilter::new(law, 100 * MB);
        assert_eq!(filter.published(), 0);
        assert_eq!(filter.update(10 * MB, 0), 15 * MB);
        assert_eq!(
            filter.update(usize::MAX, 0),
            100 * MB,
            "clamped to the ceiling"
        );
        assert_eq!(filter.smoothed(), Some(100 * MB));
        assert_eq!(
            filter.update(0, 50 * MB),
            80 * MB,
            "reserved above resident is 0 untracked; release starts"
        );
        // 75 MiB smoothed: a purge that returned 30 MiB lowers it to 45, never below the sample.
        assert_eq!(filter.credit(30 * MB, 20 * MB, 0), 50 * MB);
        assert_eq!(filter.credit(100 * MB, 20 * MB, 0), 25 * MB);
        // A dip the purge did not cause (an untouched reservation) is not taken at once.
        assert_eq!(filter.credit(0, 0, 0), 25 * MB);
    }

    /// Closed loop without threads: an engine takes whatever room admission leaves each tick,
    /// while untracked memory ramps up and back down. Resident = untracked + reserved.
    #[test]
    fn closed_loop_keeps_resident_under_ceiling_and_settles() {
        let ceiling = 256 * MB;
        let law = ControlLaw::for_ceiling(ceiling);
        let mut filter = UntrackedFilter::new(law, ceiling);
        let step = 4 * MB; // the engine grows by at most one chunk per tick
        let mut reserved = 0usize;
        let mut published = 0usize;
        let mut reserved_trace = Vec::new();
        for t in 0..600usize {
            // Untracked: ramps 0 → 120 MiB by 1 MiB per tick, holds, then falls to 30 MiB.
            let untracked = match t {
                0..120 => t * MB,
                120..300 => 120 * MB,
                300..390 => (120 - (t - 300)) * MB,
                _ => 30 * MB,
            };
            // Admission: the engine grows while the room allows, and gives back what the room
            // no longer covers (its reclaimer), as the governor would ask it to.
            let room = ceiling.saturating_sub(published + reserved);
            if room >= step {
                reserved += step;
            } else if published + reserved > ceiling {
                reserved = ceiling.saturating_sub(published);
            }
            let resident = untracked + reserved;
            // The growth inside one tick is at most 1 MiB of untracked, within the headroom.
            assert!(
                resident <= ceiling + MB,
                "tick {t}: resident {resident} over the ceiling"
            );
            published = filter.update(resident, reserved);
            reserved_trace.push(reserved);
        }
        // Once untracked memory has settled, the engine's share settles too: no limit cycle.
        let tail = &reserved_trace[500..];
        assert!(
            tail.iter().all(|&r| r == tail[0]),
            "reservations keep moving: {:?}",
            &tail[..10]
        );
        assert!(
            tail[0] >= ceiling - 30 * MB - law.headroom - law.deadband - step,
            "room was returned: {}",
            tail[0]
        );
    }

    #[test]
    fn invalid_laws_are_rejected_with_the_field() {
        let bad = ControlLaw {
            release: 0.0,
            ..law()
        };
        assert!(
            bad.validate(100 * MB)
                .unwrap_err()
                .to_string()
                .contains("release")
        );
        let bad = ControlLaw {
            release: 1.5,
            ..law()
        };
        assert!(bad.validate(100 * MB).is_err());
        let bad = ControlLaw {
            deadband: 100 * MB,
            ..law()
        };
        assert!(
            bad.validate(100 * MB)
                .unwrap_err()
                .to_string()
                .contains("deadband")
        );
        let bad = ControlLaw {
            headroom: 100 * MB,
            ..law()
        };
        assert!(
            bad.validate(100 * MB)
                .unwrap_err()
                .to_string()
                .contains("headroom")
        );
        assert!(ControlLaw::for_ceiling(100 * MB).validate(100 * MB).is_ok());
        assert!(
            ControlLaw::for_ceiling(mib(2)).validate(mib(2)).is_ok(),
            "small ceilings get a valid law"
        );
    }

    /// This unit-test binary runs on the system allocator: jemalloc's decay steers nothing of
    /// it, so even an always-immediate policy at Emergency leaves the allocator alone.
    #[test]
    fn without_jemalloc_as_the_allocator_retention_is_inert() {
        use crate::{EngineBudget, EngineId, GovernorConfig};
        // jemalloc also replaces `malloc` in this workspace's test binaries (see
        // `PRETEND_NOT_GLOBAL`): the monitor is started and ticked on this thread, which is
        // told it is not.
        crate::alloc::PRETEND_NOT_GLOBAL.set(true);
        let before = default_dirty_decay().unwrap();
        let governor = MemoryGovernor::new(
            GovernorConfig::builder()
                .global_ceiling(64 * MB)
                .engine(EngineId::Query, EngineBudget::new(64 * MB))
                .build()
                .unwrap(),
        )
        .unwrap();
        let monitor = governor
            .start_rss_monitor(
                RssMonitorConfig::default()
                    .with_interval(Duration::from_hours(1))
                    .with_reclaim_on_emergency(false, Duration::ZERO)
                    .with_allocator_retention(AllocatorRetention::Fixed(Duration::ZERO)),
            )
            .unwrap();
        let _token = governor.try_reserve(EngineId::Query, 63 * MB).unwrap();
        monitor.sample_now().unwrap();
        assert_eq!(governor.global_pressure(), PressureLevel::Emergency);
        assert_eq!(monitor.stats().retention_switches, 0);
        assert_eq!(default_dirty_decay().unwrap(), before);
        drop(monitor);
        crate::alloc::PRETEND_NOT_GLOBAL.set(false);
    }
}
