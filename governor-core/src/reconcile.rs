//! Reconciliation: each engine's books against what its own jemalloc arena holds.
//!
//! The global RSS figure says *that* memory leaked out of the books, not *whose* it is, so on
//! its own it can only shrink every engine's room. With one arena per engine (see
//! [`MemoryGovernor::engine_runtime_builder`] and [`MemoryGovernor::enter_engine`]) the RSS
//! monitor's tick also reads, after one jemalloc epoch advance, each engine arena's
//! `allocated` and `resident` bytes and computes per engine
//!
//! ```text
//!   drift = allocated − reserved          (bytes the engine holds but never reserved)
//!
//!   drift > 0 ──law──▶ charged ──▶ that engine's untracked account: its room under its limit
//!                                  shrinks (its own admissions are refused earlier, so it
//!                                  spills, flushes or evicts); other engines' rooms do not move
//!   drift < 0 ──────▶ shown, never charged: the adapter reserves more than it allocates
//!                     (the HNSW insert estimate, reservations made before the bytes are)
//!
//!   global untracked = RSS − Σ reserved − Σ charged     (what no engine arena explains:
//!                                                        code, stacks, other arenas, dirty pages)
//! ```
//!
//! ## The control law
//!
//! Per engine, with `p = max(0, drift)` the tick's positive drift, `s` the charged figure
//! (starting at 0), `d` the dead band and `r ∈ (0, 1]` the release rate
//! ([`EngineDriftLaw`]; by default `d` = 1 % of the engine's limit but at least 1 MiB and at
//! most a quarter of the limit, `r` = 0.25):
//!
//! * **dead band** — `|p − s| ≤ d`: `s` unchanged. Thread caches keep small freed objects
//!   counted as allocated in their arena until they are flushed, and a reservation is often
//!   made a moment before its bytes are allocated; those few KiB to few MiB move nothing.
//! * **attack** — `p > s + d`: `s ← p`. Beyond the band the whole drift is charged at once:
//!   an engine under-charged is what lets the process pass its ceiling, so nothing is smoothed
//!   on the way up.
//! * **release** — `p < s − d`: `s ← s − ⌈r · (s − p)⌉`, never below `p`. Memory the engine
//!   gave back is returned a quarter of the gap per tick, so that an engine that frees and
//!   re-allocates in bursts does not see its room swing with every burst.
//!
//! So the charge never exceeds the largest drift seen since the last release began, is at
//! most `d` under the current drift, and settles within `d` of a constant drift after
//! `⌈ln(d / gap) / ln(1 − r)⌉` ticks. It is monotone in the same way as the global law in
//! [`rss_monitor`](crate::rss_monitor), hence cannot oscillate on its own.
//!
//! When a charge rises by `Δ`, the same `Δ` is credited to the global untracked figure in the
//! same tick (it moved from "nobody's" to "this engine's"), so the bytes are not counted twice
//! while the global filter's release catches up.
//!
//! ## Alarm
//!
//! A drift above a configurable fraction of the engine's limit (either sign; default 25 %,
//! [`RssMonitorConfig::with_drift_alarm`](crate::RssMonitorConfig::with_drift_alarm)) is a bug
//! in an adapter's byte model. It raises one `warn` event per crossing (re-armed when the drift
//! falls below half the threshold) and is counted in [`EngineAllocation::alarms`].
//!
//! ## Without jemalloc
//!
//! When jemalloc is not the global allocator no engine arena exists; the figures are
//! [`Reconciliation::Unavailable`] with the reason, and no engine is charged. The global RSS
//! charge works as before.
//!
//! One governor per process is assumed (as everywhere in this crate): the engine arenas are
//! the process's, so two governors reconciling the same engine would each see both.

use std::fmt;

use parking_lot::Mutex;

use crate::alloc::{
    NOT_GLOBAL_ALLOCATOR, advance_epoch, arenas_see_allocations, read_engine_arena,
};
use crate::{EngineId, MemError, MemoryGovernor, human_bytes, mib};

/// The default drift alarm: a quarter of the engine's limit.
pub const DEFAULT_DRIFT_ALARM: f64 = 0.25;

/// The parameters of one engine's drift law (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineDriftLaw {
    /// Changes of the positive drift up to this many bytes are ignored.
    pub deadband: usize,
    /// Fraction of the gap returned per tick when the drift falls, in `(0, 1]`.
    pub release: f64,
}

impl EngineDriftLaw {
    /// Defaults scaled to an engine's limit: dead band 1 % of it, at least 1 MiB and at most a
    /// quarter of the limit; release a quarter of the gap per tick.
    pub fn for_limit(limit: usize) -> Self {
        Self {
            deadband: (limit / 100).max(mib(1)).min(limit / 4),
            release: 0.25,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), MemError> {
        if self.release > 0.0 && self.release <= 1.0 {
            Ok(())
        } else {
            Err(MemError::InvalidConfig {
                field: "rss_monitor.engine_law.release".into(),
                reason: format!(
                    "{} is outside (0, 1]; 0 would never return room, above 1 would overshoot",
                    self.release
                ),
            })
        }
    }
}

/// One engine's drift law as a pure state machine: feed it drifts, get the charge.
///
/// ```
/// use governor_core::reconcile::{DriftFilter, EngineDriftLaw};
///
/// let mut filter = DriftFilter::new(EngineDriftLaw { deadband: 10, release: 0.5 });
/// assert_eq!(filter.update(8), 0);     // inside the dead band: tcache noise
/// assert_eq!(filter.update(-500), 0);  // negative drift (over-reservation) is never charged
/// assert_eq!(filter.update(200), 200); // attack: charged at once
/// assert_eq!(filter.update(195), 200); // a dip inside the band
/// assert_eq!(filter.update(100), 150); // release: half the gap per tick
/// ```
#[derive(Clone, Debug)]
pub struct DriftFilter {
    law: EngineDriftLaw,
    charged: usize,
}

impl DriftFilter {
    /// A filter with nothing charged yet.
    pub fn new(law: EngineDriftLaw) -> Self {
        Self { law, charged: 0 }
    }

    /// Replaces the law (an engine's limit changed); the charge stays.
    pub fn set_law(&mut self, law: EngineDriftLaw) {
        self.law = law;
    }

    /// Takes one drift sample (allocated − reserved, bytes) and returns the charge.
    pub fn update(&mut self, drift: i64) -> usize {
        let positive = usize::try_from(drift.max(0)).unwrap_or(usize::MAX);
        let s = self.charged;
        let d = self.law.deadband;
        self.charged = if positive > s.saturating_add(d) {
            positive
        } else if positive.saturating_add(d) >= s {
            s
        } else {
            let gap = s - positive;
            // ceil(r · gap) is in [1, gap] because r ∈ (0, 1]: never below the drift.
            let step = ((gap as f64) * self.law.release).ceil() as usize;
            s - step.clamp(1, gap)
        };
        self.charged
    }

    /// The current charge.
    pub fn charged(&self) -> usize {
        self.charged
    }
}

/// Whether per-engine allocator figures exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Reconciliation {
    /// No RSS monitor reconciles this governor (none started, or started with reconciliation
    /// off).
    #[default]
    NotRunning,
    /// Figures cannot be had in this process; `reason` says why (usually: jemalloc is not the
    /// global allocator). No engine is charged.
    Unavailable {
        /// Why, for a person reading a snapshot.
        reason: String,
    },
    /// The RSS monitor reconciles every engine that has an arena, every tick.
    Active,
}

impl Reconciliation {
    /// A short label (`not_running`, `unavailable`, `active`) for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotRunning => "not_running",
            Self::Unavailable { .. } => "unavailable",
            Self::Active => "active",
        }
    }
}

impl fmt::Display for Reconciliation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRunning => f.write_str("per-engine allocator figures: not running"),
            Self::Unavailable { reason } => {
                write!(f, "per-engine allocator figures unavailable: {reason}")
            }
            Self::Active => f.write_str("per-engine allocator figures: active"),
        }
    }
}

/// One engine's allocator truth as of the RSS monitor's last tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineAllocation {
    /// The engine's arena.
    pub arena: u32,
    /// Bytes in live objects of the arena.
    pub allocated: usize,
    /// Resident bytes of the arena (live pages, dirty pages kept for reuse, metadata).
    pub resident: usize,
    /// Bytes the engine's tokens held at the same tick.
    pub reserved: usize,
    /// `allocated − reserved`: positive when the engine holds bytes it never reserved, negative
    /// when it reserved more than it allocated.
    pub drift: i64,
    /// The highest drift seen.
    pub peak_drift: i64,
    /// The lowest drift seen (the largest over-reservation, when negative).
    pub low_drift: i64,
    /// The highest `allocated` seen.
    pub peak_allocated: usize,
    /// Bytes charged to the engine's untracked account now (the law's output).
    pub charged: usize,
    /// Drift alarms raised.
    pub alarms: u64,
    /// Ticks that read this arena.
    pub ticks: u64,
}

#[derive(Debug, Default)]
struct BookState {
    status: Reconciliation,
    engines: [Option<EngineAllocation>; EngineId::COUNT],
}

/// The figures the monitor publishes and snapshots read; one per governor.
#[derive(Debug, Default)]
pub(crate) struct AllocationBook {
    state: Mutex<BookState>,
}

impl AllocationBook {
    pub(crate) fn status(&self) -> Reconciliation {
        self.state.lock().status.clone()
    }

    pub(crate) fn engine(&self, engine: EngineId) -> Option<EngineAllocation> {
        self.state.lock().engines[engine.index()]
    }

    fn set_status(&self, status: Reconciliation) {
        self.state.lock().status = status;
    }

    fn record(&self, engine: EngineId, figures: EngineAllocation) {
        self.state.lock().engines[engine.index()] = Some(figures);
    }
}

/// What one reconciliation tick charged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Reconciled {
    /// Σ charged over engines after the tick.
    pub(crate) charged: usize,
    /// Σ of the rises of the engines' charges in this tick (credited to the global figure).
    pub(crate) rise: usize,
    /// Alarms raised in this tick.
    pub(crate) alarms: u64,
}

#[derive(Debug, Default)]
struct EngineState {
    filter: Option<DriftFilter>,
    alarmed: bool,
}

/// The monitor's per-engine state.
#[derive(Debug)]
pub(crate) struct Reconciler {
    law: Option<EngineDriftLaw>,
    alarm_fraction: f64,
    active: bool,
    engines: [EngineState; EngineId::COUNT],
}

impl Reconciler {
    /// Starts reconciling `governor`, or says in its book why it cannot.
    pub(crate) fn start(
        governor: &MemoryGovernor,
        enabled: bool,
        law: Option<EngineDriftLaw>,
        alarm_fraction: f64,
    ) -> Self {
        let status = if !enabled {
            Reconciliation::NotRunning
        } else if arenas_see_allocations() {
            Reconciliation::Active
        } else {
            Reconciliation::Unavailable {
                reason: NOT_GLOBAL_ALLOCATOR.into(),
            }
        };
        let active = status == Reconciliation::Active;
        if let Reconciliation::Unavailable { reason } = &status {
            tracing::info!(%reason, "RSS monitor: no per-engine reconciliation");
        }
        governor.allocation.set_status(status);
        Self {
            law,
            alarm_fraction,
            active,
            engines: Default::default(),
        }
    }

    /// One tick: reads every engine arena once, charges positive drift to its engine, records
    /// the figures. An engine whose arena cannot be read keeps its charge; the first such
    /// error comes back with what the other engines did.
    pub(crate) fn tick(&mut self, governor: &MemoryGovernor) -> (Reconciled, Option<MemError>) {
        let mut out = Reconciled::default();
        if !self.active {
            return (out, None);
        }
        if let Err(err) = advance_epoch() {
            // Keep every charge as it is: stale figures are safer than none.
            out.charged = governor.total_engine_untracked();
            return (out, Some(err));
        }
        let mut first_error = None;
        for engine in EngineId::ALL {
            if !governor.is_configured(engine) {
                continue;
            }
            let figures = match read_engine_arena(engine) {
                None => continue, // no arena yet: nothing of this engine runs on one
                Some(Ok(figures)) => figures,
                Some(Err(err)) => {
                    out.charged += governor.engine_untracked(engine);
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            let reserved = governor.reserved(engine);
            let limit = governor.limit(engine);
            let drift = signed_difference(figures.allocated, reserved);
            let law = self.law.unwrap_or_else(|| EngineDriftLaw::for_limit(limit));
            let state = &mut self.engines[engine.index()];
            let filter = state.filter.get_or_insert_with(|| DriftFilter::new(law));
            filter.set_law(law);
            let charged = filter.update(drift);
            let before = governor.engine_untracked(engine);
            if charged != before {
                governor.set_engine_untracked(engine, charged);
            }
            out.rise += charged.saturating_sub(before);
            out.charged += charged;

            let previous = governor.allocation.engine(engine);
            let threshold = (limit as f64 * self.alarm_fraction) as u64;
            let size = drift.unsigned_abs();
            let mut alarms = previous.map_or(0, |p| p.alarms);
            if !state.alarmed && size > threshold {
                state.alarmed = true;
                alarms += 1;
                out.alarms += 1;
                let model = if drift > 0 {
                    "allocates more than it reserves (its byte model under-counts)"
                } else {
                    "reserves more than it allocates (its byte model over-charges)"
                };
                tracing::warn!(
                    %engine, drift, allocated = figures.allocated, reserved, limit,
                    threshold, "engine drift alarm: the {engine} engine {model}; drift {} is past {:.0}% of its limit {}",
                    signed_human(drift), self.alarm_fraction * 100.0, human_bytes(limit)
                );
            } else if state.alarmed && size < threshold / 2 {
                state.alarmed = false;
            }
            let figures = EngineAllocation {
                arena: figures.arena,
                allocated: figures.allocated,
                resident: figures.resident,
                reserved,
                drift,
                peak_drift: previous.map_or(drift, |p| p.peak_drift.max(drift)),
                low_drift: previous.map_or(drift, |p| p.low_drift.min(drift)),
                peak_allocated: previous.map_or(figures.allocated, |p| {
                    p.peak_allocated.max(figures.allocated)
                }),
                charged,
                alarms,
                ticks: previous.map_or(1, |p| p.ticks + 1),
            };
            tracing::debug!(
                %engine, arena = figures.arena, allocated = figures.allocated,
                resident = figures.resident, reserved, drift, peak_drift = figures.peak_drift,
                charged, "engine reconciled"
            );
            governor.allocation.record(engine, figures);
        }
        (out, first_error)
    }
}

/// `a − b` as a signed byte count, saturating at the ends of `i64`.
fn signed_difference(a: usize, b: usize) -> i64 {
    let wide = a as i128 - b as i128;
    i64::try_from(wide).unwrap_or(if wide > 0 { i64::MAX } else { i64::MIN })
}

/// `−12.0 MiB` / `+3.0 MiB`.
pub(crate) fn signed_human(bytes: i64) -> String {
    let sign = if bytes < 0 { "−" } else { "+" };
    let size = usize::try_from(bytes.unsigned_abs()).unwrap_or(usize::MAX);
    format!("{sign}{}", human_bytes(size))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MB: i64 = 1 << 20;

    fn law() -> EngineDriftLaw {
        EngineDriftLaw {
            deadband: mib(1),
            release: 0.25,
        }
    }

    #[test]
    fn noise_inside_the_dead_band_charges_nothing() {
        let mut filter = DriftFilter::new(law());
        // A few KiB to 1 MiB of thread-cache noise, up and down, for a long time.
        for i in 0..1_000i64 {
            let noise = (i * 7_919) % (MB + 1) - MB / 2;
            assert_eq!(filter.update(noise), 0, "tick {i}");
        }
    }

    #[test]
    fn attack_is_exact_and_release_geometric() {
        let mut filter = DriftFilter::new(law());
        assert_eq!(filter.update(64 * MB), mib(64));
        let mut last = mib(64);
        for k in 1..=40 {
            let s = filter.update(0);
            assert!(s <= last, "never rises on a falling drift");
            let bound = mib(1).max((mib(64) as f64 * 0.75f64.powi(k)).ceil() as usize);
            assert!(s <= bound, "tick {k}: {s} > {bound}");
            last = s;
        }
        assert!(last <= mib(1));
    }

    #[test]
    fn negative_and_extreme_drift() {
        let mut filter = DriftFilter::new(law());
        assert_eq!(filter.update(i64::MIN), 0);
        assert_eq!(filter.update(i64::MAX), usize::try_from(i64::MAX).unwrap());
        assert_eq!(signed_difference(0, usize::MAX), i64::MIN);
        assert_eq!(signed_difference(usize::MAX, 0), i64::MAX);
        assert_eq!(signed_difference(5, 7), -2);
        assert_eq!(signed_human(-(mib(3) as i64)), "−3.0 MiB");
    }

    #[test]
    fn default_law_scales_with_the_limit() {
        assert_eq!(EngineDriftLaw::for_limit(mib(1000)).deadband, mib(10));
        assert_eq!(EngineDriftLaw::for_limit(mib(32)).deadband, mib(1));
        assert_eq!(EngineDriftLaw::for_limit(mib(2)).deadband, mib(2) / 4);
        assert_eq!(EngineDriftLaw::for_limit(0).deadband, 0);
        let bad = EngineDriftLaw {
            release: 0.0,
            ..law()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("release"));
        assert!(
            EngineDriftLaw {
                release: f64::NAN,
                ..law()
            }
            .validate()
            .is_err()
        );
    }
}
