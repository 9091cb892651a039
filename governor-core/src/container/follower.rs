//! Turns successive [`ContainerSample`]s into what the governor should do: a new ceiling, a
//! pressure floor, an emergency.
//!
//! Pure logic with no clock and no thread: whoever samples (the RSS monitor or a sibling task)
//! calls [`ContainerFollower::observe`] with each sample and acts on the report. That keeps the
//! decisions testable with hand-written samples and keeps the sampling cadence in one place.
//!
//! * **Limit.** The first sample is the baseline; after it, any change in the effective
//!   limit's bytes is reported once, so the caller can move the ceiling. A sample without a
//!   limit (a read failed) changes nothing: the last known limit stays the baseline. A change
//!   the caller could not apply (a limit of 0 or 1 byte gives no usable ceiling) is handed
//!   back with [`ContainerFollower::refused`]: the baseline stays the limit the ceiling still
//!   follows, so a return to it is no change, and the refused value is not reported again
//!   while it stays.
//! * **PSI.** While `some avg10` or `full avg10` is at or above its threshold, the report asks
//!   for global pressure of at least [`PressureLevel::Warning`]. avg10 is already a smoothed
//!   10-second average, so no further hysteresis is added; a sample without PSI lifts the
//!   floor (no evidence of stalls is not a stall).
//! * **Events.** A rise of the `max`, `oom` or `oom_kill` counter since the previous sample is
//!   an emergency: the kernel has refused a charge at the limit or killed a process. Note that
//!   v2's `max` also rises when the kernel merely reclaims page cache at `memory.max`, which a
//!   read-heavy process can cause routinely; turn the events input off where that is normal.
//!   The first sample is the baseline (events from before the process started are history),
//!   and a counter that falls (the cgroup was recreated, or the process moved) is re-based,
//!   not reported.

use std::fmt;

use super::{ContainerSample, MemoryEvents, MemoryLimit};
use crate::{MemError, PressureLevel};

/// Which inputs a [`ContainerFollower`] acts on, and its PSI thresholds.
///
/// Defaults: follow the limit, PSI `some avg10` ≥ 10 % or `full avg10` ≥ 5 % asks for at
/// least Warning, and a rising `max`/`oom`/`oom_kill` counter is an emergency. Checked by
/// [`ContainerFollower::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FollowerSettings {
    follow_limit: bool,
    psi_some: Option<f64>,
    psi_full: Option<f64>,
    events: bool,
}

impl Default for FollowerSettings {
    fn default() -> Self {
        FollowerSettings {
            follow_limit: true,
            psi_some: Some(10.0),
            psi_full: Some(5.0),
            events: true,
        }
    }
}

impl FollowerSettings {
    /// The defaults (every input on).
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a change of the container's limit is reported.
    #[must_use]
    pub fn follow_limit(mut self, on: bool) -> Self {
        self.follow_limit = on;
        self
    }

    /// The `some avg10` percentage (0 < t ≤ 100) at which PSI asks for Warning; `None` ignores
    /// `some`.
    #[must_use]
    pub fn psi_some_threshold(mut self, percent: Option<f64>) -> Self {
        self.psi_some = percent;
        self
    }

    /// The `full avg10` percentage (0 < t ≤ 100) at which PSI asks for Warning; `None` ignores
    /// `full`.
    #[must_use]
    pub fn psi_full_threshold(mut self, percent: Option<f64>) -> Self {
        self.psi_full = percent;
        self
    }

    /// Turns PSI off altogether (both thresholds `None`).
    #[must_use]
    pub fn without_psi(self) -> Self {
        self.psi_some_threshold(None).psi_full_threshold(None)
    }

    /// Whether rising `max`/`oom`/`oom_kill` counters are reported as an emergency.
    #[must_use]
    pub fn emergency_on_events(mut self, on: bool) -> Self {
        self.events = on;
        self
    }

    fn validate(&self) -> Result<(), MemError> {
        for (field, value) in [
            ("psi_some_threshold", self.psi_some),
            ("psi_full_threshold", self.psi_full),
        ] {
            if let Some(t) = value
                && !(t.is_finite() && t > 0.0 && t <= 100.0)
            {
                return Err(MemError::config(
                    field,
                    format!(
                        "a PSI threshold is a percentage of time stalled, above 0 and at most 100 (e.g. 10), got {t}; \
                         use None to ignore this line"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A change of the effective limit, to be applied to the ceiling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitChange {
    /// The limit in bytes before.
    pub from: usize,
    /// The limit now, and the file that says so.
    pub to: MemoryLimit,
}

/// A kernel event counter whose rise is an emergency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventCounter {
    /// `max`: a charge met `memory.max` (v1: `memory.failcnt`).
    Max,
    /// `oom`: the cgroup ran out of memory.
    Oom,
    /// `oom_kill`: the OOM killer killed a process of the cgroup.
    OomKill,
}

impl EventCounter {
    /// The counter's name in `memory.events`.
    pub fn name(self) -> &'static str {
        match self {
            EventCounter::Max => "max",
            EventCounter::Oom => "oom",
            EventCounter::OomKill => "oom_kill",
        }
    }

    fn read(self, events: &MemoryEvents) -> u64 {
        match self {
            EventCounter::Max => events.max,
            EventCounter::Oom => events.oom,
            EventCounter::OomKill => events.oom_kill,
        }
    }

    const ALL: [EventCounter; 3] = [EventCounter::Max, EventCounter::Oom, EventCounter::OomKill];
}

/// Writes [`name`](EventCounter::name).
impl fmt::Display for EventCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A counter that rose between two samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRise {
    /// Which counter.
    pub counter: EventCounter,
    /// Its value in the previous sample.
    pub from: u64,
    /// Its value now.
    pub to: u64,
}

/// What one sample asks of the governor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FollowerReport {
    /// The limit moved: set the ceiling from `to` (reported once per change).
    pub limit_change: Option<LimitChange>,
    /// While PSI is at or above a threshold: `Some(Warning)`, the least global pressure level
    /// to hold.
    pub pressure_floor: Option<PressureLevel>,
    /// True when `pressure_floor` differs from the previous sample's (for logging the edge).
    pub pressure_floor_changed: bool,
    /// Emergency counters that rose since the previous sample, in the order max, oom,
    /// oom_kill.
    pub counter_rises: Vec<CounterRise>,
}

impl FollowerReport {
    /// True when a counter rose: the caller should treat the process as at Emergency.
    pub fn is_emergency(&self) -> bool {
        !self.counter_rises.is_empty()
    }
}

/// Follows a container's memory environment from sample to sample (see the
/// [module documentation](self)).
#[derive(Clone, Debug)]
pub struct ContainerFollower {
    settings: FollowerSettings,
    /// The limit the caller's ceiling follows: the baseline changes are measured against.
    limit: Option<usize>,
    /// The last change the caller refused, while the container stays at it: reporting it on
    /// every sample would only repeat the refusal (and its log line) every interval.
    refused: Option<usize>,
    events: Option<MemoryEvents>,
    floor: Option<PressureLevel>,
}

impl ContainerFollower {
    /// A follower with no baseline yet; fails with [`MemError::InvalidConfig`] on a PSI
    /// threshold that is not a percentage in (0, 100].
    pub fn new(settings: FollowerSettings) -> Result<Self, MemError> {
        settings.validate()?;
        Ok(ContainerFollower {
            settings,
            limit: None,
            refused: None,
            events: None,
            floor: None,
        })
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &FollowerSettings {
        &self.settings
    }

    /// The limit changes are measured against, in bytes: the last one seen, except that a
    /// change handed back with [`refused`](Self::refused) leaves the one before it.
    pub fn last_limit(&self) -> Option<usize> {
        self.limit
    }

    /// Hands back a change [`observe`](Self::observe) reported that the caller could not
    /// apply (the ceiling it gives was refused): the baseline goes back to `change.from`, the
    /// limit the ceiling still follows, so that a later sample at that value is not reported
    /// as a change, and `change.to` is not reported again until the limit moves elsewhere.
    ///
    /// Call it right after the `observe` that reported `change`; a change that is not the
    /// last one reported is ignored (the baseline has moved on since).
    pub fn refused(&mut self, change: &LimitChange) {
        if self.limit == Some(change.to.bytes) {
            self.limit = Some(change.from);
            self.refused = Some(change.to.bytes);
        }
    }

    /// Takes one sample into account and says what to do about it.
    pub fn observe(&mut self, sample: &ContainerSample) -> FollowerReport {
        let mut report = FollowerReport::default();
        if let Some(limit) = &sample.limit {
            if self.refused == Some(limit.bytes) {
                // Still at the value the caller refused: nothing new to report, and the
                // baseline stays what the ceiling follows.
            } else {
                self.refused = None;
                if let Some(previous) = self.limit
                    && previous != limit.bytes
                    && self.settings.follow_limit
                {
                    report.limit_change = Some(LimitChange {
                        from: previous,
                        to: limit.clone(),
                    });
                }
                self.limit = Some(limit.bytes);
            }
        }

        let floor = self.psi_floor(sample);
        report.pressure_floor_changed = floor != self.floor;
        report.pressure_floor = floor;
        self.floor = floor;

        if let Some(now) = sample.events {
            if let Some(before) = self.events
                && self.settings.events
            {
                report.counter_rises = EventCounter::ALL
                    .into_iter()
                    .filter_map(|counter| {
                        let (from, to) = (counter.read(&before), counter.read(&now));
                        (to > from).then_some(CounterRise { counter, from, to })
                    })
                    .collect();
            }
            self.events = Some(now);
        }
        report
    }

    fn psi_floor(&self, sample: &ContainerSample) -> Option<PressureLevel> {
        let psi = sample.pressure?;
        let some = self.settings.psi_some.is_some_and(|t| psi.some.avg10 >= t);
        let full = self
            .settings
            .psi_full
            .zip(psi.full)
            .is_some_and(|(t, full)| full.avg10 >= t);
        (some || full).then_some(PressureLevel::Warning)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::container::{CeilingSource, Psi, PsiAverages};

    fn limit(bytes: usize) -> MemoryLimit {
        MemoryLimit {
            bytes,
            source: CeilingSource::CgroupV2 {
                path: PathBuf::from("/sys/fs/cgroup/memory.max"),
            },
        }
    }

    fn sample(bytes: Option<usize>) -> ContainerSample {
        ContainerSample {
            limit: bytes.map(limit),
            ..ContainerSample::default()
        }
    }

    fn averages(avg10: f64) -> PsiAverages {
        PsiAverages {
            avg10,
            avg60: 0.0,
            avg300: 0.0,
            total_micros: 0,
        }
    }

    fn psi(some: f64, full: Option<f64>) -> ContainerSample {
        ContainerSample {
            pressure: Some(Psi {
                some: averages(some),
                full: full.map(averages),
            }),
            ..ContainerSample::default()
        }
    }

    fn events(max: u64, oom: u64, oom_kill: u64) -> ContainerSample {
        ContainerSample {
            events: Some(MemoryEvents {
                max,
                oom,
                oom_kill,
                high: 100,
                low: 0,
            }),
            ..ContainerSample::default()
        }
    }

    #[test]
    fn limit_changes_are_reported_once_after_the_baseline() {
        let mut f = ContainerFollower::new(FollowerSettings::new()).unwrap();
        assert_eq!(f.observe(&sample(Some(100))).limit_change, None);
        assert_eq!(f.observe(&sample(Some(100))).limit_change, None);
        let change = f.observe(&sample(Some(60))).limit_change.unwrap();
        assert_eq!((change.from, change.to.bytes), (100, 60));
        assert_eq!(f.observe(&sample(Some(60))).limit_change, None);
        // A failed read keeps the baseline.
        assert_eq!(f.observe(&sample(None)).limit_change, None);
        assert_eq!(f.last_limit(), Some(60));
        let change = f.observe(&sample(Some(80))).limit_change.unwrap();
        assert_eq!((change.from, change.to.bytes), (60, 80));
    }

    /// A 1-byte limit gives no usable ceiling; the caller refuses it. The baseline stays
    /// 100 (what the ceiling follows), so the return to 100 is no change, the refused value is
    /// not reported again while it stays, and a later move is measured from 100.
    #[test]
    fn a_refused_limit_leaves_the_baseline() {
        let mut f = ContainerFollower::new(FollowerSettings::new()).unwrap();
        f.observe(&sample(Some(100)));
        let change = f.observe(&sample(Some(1))).limit_change.unwrap();
        assert_eq!((change.from, change.to.bytes), (100, 1));
        f.refused(&change);
        assert_eq!(f.last_limit(), Some(100));
        assert_eq!(
            f.observe(&sample(Some(1))).limit_change,
            None,
            "refused once"
        );
        assert_eq!(f.observe(&sample(None)).limit_change, None);
        assert_eq!(
            f.observe(&sample(Some(100))).limit_change,
            None,
            "back to what the ceiling follows"
        );
        // Refused, then straight on to another value: measured from the baseline.
        let change = f.observe(&sample(Some(0))).limit_change.unwrap();
        f.refused(&change);
        let change = f.observe(&sample(Some(60))).limit_change.unwrap();
        assert_eq!((change.from, change.to.bytes), (100, 60));
        // Leaving the refused value and coming back to it is a new change, reported again.
        let change = f.observe(&sample(Some(1))).limit_change.unwrap();
        f.refused(&change);
        f.observe(&sample(Some(60)));
        let change = f.observe(&sample(Some(1))).limit_change.unwrap();
        assert_eq!((change.from, change.to.bytes), (60, 1));
        // A stale hand-back (the baseline has moved on) changes nothing.
        f.observe(&sample(Some(70)));
        f.refused(&change);
        assert_eq!(f.last_limit(), Some(70));
    }

    #[test]
    fn limit_following_can_be_turned_off() {
        let mut f = ContainerFollower::new(FollowerSettings::new().follow_limit(false)).unwrap();
        f.observe(&sample(Some(100)));
        assert_eq!(f.observe(&sample(Some(50))).limit_change, None);
        assert_eq!(f.last_limit(), Some(50));
    }

    #[test]
    fn psi_threshold_raises_a_warning_floor() {
        let settings = FollowerSettings::new()
            .psi_some_threshold(Some(20.0))
            .psi_full_threshold(Some(5.0));
        let mut f = ContainerFollower::new(settings).unwrap();
        let r = f.observe(&psi(19.99, Some(4.99)));
        assert_eq!(r.pressure_floor, None);
        assert!(!r.pressure_floor_changed);
        let r = f.observe(&psi(20.0, Some(0.0)));
        assert_eq!(r.pressure_floor, Some(PressureLevel::Warning));
        assert!(r.pressure_floor_changed);
        let r = f.observe(&psi(1.0, Some(5.0)));
        assert_eq!(r.pressure_floor, Some(PressureLevel::Warning), "full alone");
        assert!(!r.pressure_floor_changed);
        let r = f.observe(&psi(1.0, None));
        assert_eq!(r.pressure_floor, None);
        assert!(r.pressure_floor_changed);
        f.observe(&psi(50.0, None));
        let r = f.observe(&ContainerSample::default());
        assert_eq!(r.pressure_floor, None, "no PSI, no floor");
    }

    #[test]
    fn psi_can_be_turned_off_and_thresholds_are_checked() {
        let mut f = ContainerFollower::new(FollowerSettings::new().without_psi()).unwrap();
        assert_eq!(f.observe(&psi(100.0, Some(100.0))).pressure_floor, None);
        for bad in [0.0, -1.0, 100.5, f64::NAN, f64::INFINITY] {
            let err = ContainerFollower::new(FollowerSettings::new().psi_some_threshold(Some(bad)))
                .unwrap_err();
            assert!(err.to_string().contains("psi_some_threshold"), "{err}");
            let err = ContainerFollower::new(FollowerSettings::new().psi_full_threshold(Some(bad)))
                .unwrap_err();
            assert!(err.to_string().contains("psi_full_threshold"), "{err}");
        }
    }

    #[test]
    fn rising_counters_are_an_emergency() {
        let mut f = ContainerFollower::new(FollowerSettings::new()).unwrap();
        assert!(!f.observe(&events(5, 1, 1)).is_emergency(), "baseline");
        assert!(!f.observe(&events(5, 1, 1)).is_emergency());
        let r = f.observe(&events(7, 1, 2));
        assert_eq!(
            r.counter_rises,
            vec![
                CounterRise {
                    counter: EventCounter::Max,
                    from: 5,
                    to: 7
                },
                CounterRise {
                    counter: EventCounter::OomKill,
                    from: 1,
                    to: 2
                },
            ]
        );
        // Missing events keep the baseline; a fall re-bases without an alarm.
        assert!(!f.observe(&ContainerSample::default()).is_emergency());
        assert!(!f.observe(&events(0, 0, 0)).is_emergency());
        let r = f.observe(&events(0, 1, 0));
        assert_eq!(r.counter_rises[0].counter, EventCounter::Oom);
        assert_eq!(EventCounter::OomKill.to_string(), "oom_kill");
    }

    #[test]
    fn events_can_be_turned_off() {
        let mut f =
            ContainerFollower::new(FollowerSettings::new().emergency_on_events(false)).unwrap();
        f.observe(&events(0, 0, 0));
        assert!(!f.observe(&events(9, 9, 9)).is_emergency());
    }
}
