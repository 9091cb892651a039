//! Allocator retention follows pressure: freed pages go back to the kernel at once when the
//! ceiling is near, and are kept for reuse when it is not.
//!
//! jemalloc keeps the pages of freed memory resident for a while (its *dirty decay* time, 10 s
//! by default, see [`alloc::decay`](crate::alloc::decay)) so that the next allocation finds them
//! without a page fault. That retention is memory no engine holds and the kernel counts. Under
//! a ceiling it is the wrong trade exactly when the ceiling is near: measured on the mixed
//! workload (`BENCHMARKS.md`), retention was what put a 224 MiB ceiling out of reach.
//!
//! The RSS monitor steers it on every tick with [`RetentionSteer`], a pure state machine fed
//! the governor's pressure level:
//!
//! ```text
//!   level ≥ tight_from            → decay = tight (0: a free returns its pages at once;
//!                                   switching to 0 also purges what is dirty now)
//!   level < tight_from, tight was → after hold_ticks calm ticks in a row: decay = relaxed
//!   otherwise                     → nothing
//! ```
//!
//! The hold keeps a level that flickers around the threshold from flapping the allocator; a
//! switch costs one control write per arena. Below the threshold nothing changes, so a process
//! far from its ceiling pays nothing, and at it pays page faults on reuse (measured in
//! `BENCHMARKS.md`) instead of the kernel's OOM killer.
//!
//! The allocator is one per process: a monitor re-applies its decision when it finds the
//! default changed behind it (another monitor in the same process), and a stopped monitor puts
//! back the decay jemalloc was started with.

use std::time::Duration;

use crate::alloc::decay::validate_decay;
use crate::{MemError, PressureLevel};

/// How the RSS monitor steers jemalloc's retention of freed pages (see the
/// [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorRetention {
    /// Never touch the allocator's decay: it stays what `MALLOC_CONF` or jemalloc chose.
    Untouched,
    /// One decay time for every arena from the monitor's start to its stop.
    Fixed(Duration),
    /// The configured decay while pressure is low, a short one near the ceiling.
    FollowPressure(PressureRetention),
}

impl Default for AllocatorRetention {
    /// [`AllocatorRetention::FollowPressure`] with [`PressureRetention::default`].
    fn default() -> Self {
        Self::FollowPressure(PressureRetention::default())
    }
}

/// The parameters of [`AllocatorRetention::FollowPressure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressureRetention {
    /// From this global pressure level on, the decay is `tight` (default
    /// [`PressureLevel::Warning`]: the ceiling is near enough that kept pages may matter).
    pub tight_from: PressureLevel,
    /// The decay near the ceiling (default zero: freed pages go back at once).
    pub tight: Duration,
    /// The decay away from it; `None` (the default) is the decay jemalloc was started with.
    pub relaxed: Option<Duration>,
    /// Calm ticks in a row (below `tight_from`) before the decay is relaxed again (default 10,
    /// one second at the default interval).
    pub hold_ticks: u32,
}

impl Default for PressureRetention {
    fn default() -> Self {
        Self {
            tight_from: PressureLevel::Warning,
            tight: Duration::ZERO,
            relaxed: None,
            hold_ticks: 10,
        }
    }
}

impl AllocatorRetention {
    /// Checks the durations (each at most [`MAX_DECAY`](crate::alloc::decay::MAX_DECAY)) and
    /// that `tight_from` is a level a ceiling can reach.
    ///
    /// # Errors
    /// [`MemError::InvalidConfig`] naming the bad field.
    pub fn validate(&self) -> Result<(), MemError> {
        match self {
            Self::Untouched => Ok(()),
            Self::Fixed(decay) => validate_decay("rss_monitor.retention.fixed", *decay),
            Self::FollowPressure(p) => {
                validate_decay("rss_monitor.retention.tight", p.tight)?;
                if let Some(relaxed) = p.relaxed {
                    validate_decay("rss_monitor.retention.relaxed", relaxed)?;
                }
                if p.tight_from == PressureLevel::Normal {
                    return Err(MemError::InvalidConfig {
                        field: "rss_monitor.retention.tight_from".into(),
                        reason: "Normal is every level: use AllocatorRetention::Fixed for one \
                                 decay at all times"
                            .into(),
                    });
                }
                Ok(())
            }
        }
    }
}

/// A decay time for jemalloc: `None` is "never" (jemalloc's `-1`, possible only as the decay
/// it was started with).
pub type DecayTime = Option<Duration>;

/// The retention policy as a state machine: feed it the pressure level of each tick, apply the
/// decay it returns (see the [module docs](self)).
///
/// ```
/// use std::time::Duration;
/// use governor_core::PressureLevel;
/// use governor_core::retention::{AllocatorRetention, PressureRetention, RetentionSteer};
///
/// let policy = PressureRetention { hold_ticks: 1, ..PressureRetention::default() };
/// let configured = Some(Duration::from_secs(10));
/// let mut steer = RetentionSteer::new(AllocatorRetention::FollowPressure(policy), configured);
/// // What the monitor does each tick: ask, apply, report back.
/// let mut tick = |level| {
///     let decay = steer.on_tick(level);
///     if let Some(decay) = decay {
///         steer.applied(decay); // the allocator took it
///     }
///     decay
/// };
/// assert_eq!(tick(PressureLevel::Normal), None); // far from the ceiling: untouched
/// assert_eq!(tick(PressureLevel::Critical), Some(Some(Duration::ZERO)));
/// assert_eq!(tick(PressureLevel::Warning), None); // still tight
/// assert_eq!(tick(PressureLevel::Normal), None); // one calm tick: held
/// assert_eq!(tick(PressureLevel::Normal), Some(configured)); // relaxed again
/// ```
#[derive(Clone, Debug)]
pub struct RetentionSteer {
    policy: AllocatorRetention,
    configured: DecayTime,
    applied: Option<DecayTime>,
    calm_ticks: u32,
}

impl RetentionSteer {
    /// A steer for `policy` in a process whose jemalloc was started with `configured`.
    pub fn new(policy: AllocatorRetention, configured: DecayTime) -> Self {
        Self {
            policy,
            configured,
            applied: None,
            calm_ticks: 0,
        }
    }

    /// Takes one tick's pressure level and returns the decay to apply now, if it changes.
    ///
    /// The caller reports back with [`RetentionSteer::applied`] once the allocator took it;
    /// until then the steer asks again on the next tick.
    pub fn on_tick(&mut self, level: PressureLevel) -> Option<DecayTime> {
        let wanted = match self.policy {
            AllocatorRetention::Untouched => return None,
            AllocatorRetention::Fixed(decay) => Some(decay),
            AllocatorRetention::FollowPressure(p) => {
                let relaxed = p.relaxed.or(self.configured);
                let tight = Some(p.tight);
                if level >= p.tight_from {
                    self.calm_ticks = 0;
                    tight
                } else if self.applied == Some(tight) && tight != relaxed {
                    self.calm_ticks = self.calm_ticks.saturating_add(1);
                    if self.calm_ticks <= p.hold_ticks {
                        return None;
                    }
                    relaxed
                } else if self.applied.is_none() && p.relaxed.is_none() {
                    // Nothing applied and the relaxed decay is jemalloc's own: nothing to do.
                    return None;
                } else {
                    relaxed
                }
            }
        };
        (self.applied != Some(wanted)).then_some(wanted)
    }

    /// Records that the allocator now runs with `decay`.
    pub fn applied(&mut self, decay: DecayTime) {
        if self.applied != Some(decay) {
            self.calm_ticks = 0;
        }
        self.applied = Some(decay);
    }

    /// Forgets what was applied, so the next tick decides afresh (the allocator was found
    /// changed behind the monitor's back).
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// The decay this steer last applied; `None` when it never applied one.
    pub fn current(&self) -> Option<DecayTime> {
        self.applied
    }

    /// Whether the decay in force is the policy's tight one.
    pub fn is_tight(&self) -> bool {
        match self.policy {
            AllocatorRetention::FollowPressure(p) => {
                self.applied == Some(Some(p.tight))
                    && Some(p.tight) != p.relaxed.or(self.configured)
            }
            _ => false,
        }
    }

    /// The decay to put back when the monitor stops: jemalloc's start-up one, if this steer
    /// ever changed it.
    pub fn restore(&self) -> Option<DecayTime> {
        self.applied
            .filter(|applied| *applied != self.configured)
            .map(|_| self.configured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_S: DecayTime = Some(Duration::from_secs(10));
    const ZERO: DecayTime = Some(Duration::ZERO);

    fn follow(hold_ticks: u32) -> RetentionSteer {
        RetentionSteer::new(
            AllocatorRetention::FollowPressure(PressureRetention {
                hold_ticks,
                ..PressureRetention::default()
            }),
            TEN_S,
        )
    }

    /// Drives a steer over `levels`, applying whatever it asks, and returns the decay in
    /// force after each tick.
    fn drive(steer: &mut RetentionSteer, levels: &[PressureLevel]) -> Vec<Option<DecayTime>> {
        levels
            .iter()
            .map(|&level| {
                if let Some(decay) = steer.on_tick(level) {
                    steer.applied(decay);
                }
                steer.current()
            })
            .collect()
    }

    #[test]
    fn tight_at_the_threshold_and_relaxed_only_after_the_hold() {
        use PressureLevel::*;
        let mut steer = follow(2);
        let trace = drive(
            &mut steer,
            &[
                Normal, Warning, Normal, Normal, Critical, Normal, Normal, Normal, Normal,
            ],
        );
        assert_eq!(
            trace,
            vec![
                None,       // never touched while calm from the start
                Some(ZERO), // Warning: tight at once
                Some(ZERO), // calm 1 of 2
                Some(ZERO), // calm 2 of 2
                Some(ZERO), // Critical: the hold restarts
                Some(ZERO),
                Some(ZERO),
                Some(TEN_S), // third calm tick in a row: relaxed
                Some(TEN_S),
            ]
        );
        assert!(!steer.is_tight());
        assert_eq!(steer.restore(), None, "already back at the start-up decay");
    }

    #[test]
    fn a_flickering_level_does_not_flap_the_allocator() {
        use PressureLevel::*;
        let mut steer = follow(3);
        let mut switches = 0;
        for i in 0..100 {
            let level = if i % 2 == 0 { Warning } else { Normal };
            if let Some(decay) = steer.on_tick(level) {
                steer.applied(decay);
                switches += 1;
            }
        }
        assert_eq!(
            switches, 1,
            "one switch to tight, none back while it flickers"
        );
        assert!(steer.is_tight());
        assert_eq!(steer.restore(), Some(TEN_S));
    }

    #[test]
    fn a_failed_application_is_asked_again() {
        let mut steer = follow(0);
        assert_eq!(steer.on_tick(PressureLevel::Emergency), Some(ZERO));
        // The caller could not apply it: the next tick asks again.
        assert_eq!(steer.on_tick(PressureLevel::Emergency), Some(ZERO));
        steer.applied(ZERO);
        assert_eq!(steer.on_tick(PressureLevel::Emergency), None);
        steer.forget();
        assert_eq!(steer.on_tick(PressureLevel::Emergency), Some(ZERO));
    }

    #[test]
    fn fixed_applies_once_and_untouched_never() {
        let mut fixed =
            RetentionSteer::new(AllocatorRetention::Fixed(Duration::from_millis(500)), TEN_S);
        let trace = drive(
            &mut fixed,
            &[PressureLevel::Normal, PressureLevel::Emergency],
        );
        assert_eq!(trace, vec![Some(Some(Duration::from_millis(500))); 2]);
        assert_eq!(fixed.restore(), Some(TEN_S));
        let mut untouched = RetentionSteer::new(AllocatorRetention::Untouched, TEN_S);
        for level in [PressureLevel::Normal, PressureLevel::Emergency] {
            assert_eq!(untouched.on_tick(level), None);
        }
        assert_eq!(untouched.restore(), None);
    }

    #[test]
    fn an_explicit_relaxed_decay_is_applied_from_the_first_tick() {
        let mut steer = RetentionSteer::new(
            AllocatorRetention::FollowPressure(PressureRetention {
                relaxed: Some(Duration::from_secs(1)),
                ..PressureRetention::default()
            }),
            TEN_S,
        );
        let trace = drive(&mut steer, &[PressureLevel::Normal]);
        assert_eq!(trace, vec![Some(Some(Duration::from_secs(1)))]);
    }

    #[test]
    fn a_process_started_with_never_decay_gets_never_back() {
        let mut steer = RetentionSteer::new(
            AllocatorRetention::FollowPressure(PressureRetention {
                hold_ticks: 0,
                ..PressureRetention::default()
            }),
            None,
        );
        let trace = drive(
            &mut steer,
            &[PressureLevel::Critical, PressureLevel::Normal],
        );
        assert_eq!(trace, vec![Some(ZERO), Some(None)]);
    }

    #[test]
    fn bad_policies_are_refused_with_the_field() {
        let too_long = AllocatorRetention::FollowPressure(PressureRetention {
            relaxed: Some(Duration::MAX),
            ..PressureRetention::default()
        });
        let err = too_long.validate().unwrap_err().to_string();
        assert!(err.contains("rss_monitor.retention.relaxed"), "{err}");
        let every_level = AllocatorRetention::FollowPressure(PressureRetention {
            tight_from: PressureLevel::Normal,
            ..PressureRetention::default()
        });
        let err = every_level.validate().unwrap_err().to_string();
        assert!(err.contains("tight_from"), "{err}");
        assert!(AllocatorRetention::Fixed(Duration::MAX).validate().is_err());
        assert!(AllocatorRetention::default().validate().is_ok());
    }
}
