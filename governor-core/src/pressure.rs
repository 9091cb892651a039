//! Pressure levels: how full an engine (or the whole process) is, as a signal adapters act on.
//!
//! Levels are derived from utilisation (`granted / limit`, or `global / ceiling`) and the
//! configured [`PressureThresholds`]. The governor recomputes them whenever an engine's grant
//! moves (the ledger's slow path), so the hot path pays nothing; adapters subscribe to a
//! `tokio::sync::watch` channel per engine and see only changes.

use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::PressureThresholds;

/// How close to its limit an engine, or the process to its ceiling, is.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub enum PressureLevel {
    /// Below the warning threshold: nothing to do.
    #[default]
    Normal,
    /// Past the warning threshold: flush or evict in the background.
    Warning,
    /// Past the critical threshold: throttle producers, spill aggressively.
    Critical,
    /// Past the emergency threshold: shed everything that can be shed.
    Emergency,
}

impl PressureLevel {
    /// The level for `used` bytes out of `capacity`.
    pub fn from_utilization(used: usize, capacity: usize, thresholds: &PressureThresholds) -> Self {
        if capacity == 0 {
            return PressureLevel::Emergency;
        }
        // u128 keeps `used * 100` exact for any usize.
        let pct = (used as u128 * 100) / capacity as u128;
        if pct >= u128::from(thresholds.emergency_pct) {
            PressureLevel::Emergency
        } else if pct >= u128::from(thresholds.critical_pct) {
            PressureLevel::Critical
        } else if pct >= u128::from(thresholds.warning_pct) {
            PressureLevel::Warning
        } else {
            PressureLevel::Normal
        }
    }

    /// Lower-case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            PressureLevel::Normal => "normal",
            PressureLevel::Warning => "warning",
            PressureLevel::Critical => "critical",
            PressureLevel::Emergency => "emergency",
        }
    }

    pub(crate) const fn from_u8(v: u8) -> Self {
        match v {
            0 => PressureLevel::Normal,
            1 => PressureLevel::Warning,
            2 => PressureLevel::Critical,
            _ => PressureLevel::Emergency,
        }
    }
}

impl std::fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The current level of one scope (an engine or the process) and its subscribers.
///
/// Publishers are serialised and each computes the level *inside* the critical section from the
/// books as they are then. Without that, two publishers racing (one computed Critical from a
/// grant read just before the other's release, the other Normal after it) could store their
/// levels in one order and send them in the other, leaving subscribers on a level the books no
/// longer show until the next slow path happened to publish again. With it, the last publisher
/// to enter has read the books after every change whose own publish came before it, and every
/// later change publishes again, so the atomic and the channel always converge to the level of
/// the current books.
#[derive(Debug)]
pub(crate) struct PressureSignal {
    level: AtomicU8,
    sender: watch::Sender<PressureLevel>,
    /// Serialises `publish_with`; held only while a level is computed and stored.
    publishing: Mutex<()>,
}

impl PressureSignal {
    pub(crate) fn new() -> Self {
        let (sender, _) = watch::channel(PressureLevel::Normal);
        Self {
            level: AtomicU8::new(PressureLevel::Normal as u8),
            sender,
            publishing: Mutex::new(()),
        }
    }

    /// The last published level.
    pub(crate) fn level(&self) -> PressureLevel {
        PressureLevel::from_u8(self.level.load(Ordering::Acquire))
    }

    /// Publishes the level `current` computes from the books now; returns the previous level
    /// when it changed. `current` runs under the signal's lock, so it must be cheap and must
    /// not publish itself.
    pub(crate) fn publish_with(
        &self,
        current: impl FnOnce() -> PressureLevel,
    ) -> Option<PressureLevel> {
        let _serial = self.publishing.lock();
        let level = current();
        let previous = PressureLevel::from_u8(self.level.load(Ordering::Acquire));
        if previous == level {
            return None;
        }
        self.level.store(level as u8, Ordering::Release);
        self.sender.send_replace(level);
        Some(previous)
    }

    /// Publishes a level computed by the caller (tests and fixed levels).
    #[cfg(test)]
    pub(crate) fn publish(&self, level: PressureLevel) -> Option<PressureLevel> {
        self.publish_with(|| level)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<PressureLevel> {
        self.sender.subscribe()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn thresholds_map_to_levels() {
        let t = PressureThresholds::default();
        assert_eq!(
            PressureLevel::from_utilization(69, 100, &t),
            PressureLevel::Normal
        );
        assert_eq!(
            PressureLevel::from_utilization(70, 100, &t),
            PressureLevel::Warning
        );
        assert_eq!(
            PressureLevel::from_utilization(85, 100, &t),
            PressureLevel::Critical
        );
        assert_eq!(
            PressureLevel::from_utilization(95, 100, &t),
            PressureLevel::Emergency
        );
        assert_eq!(
            PressureLevel::from_utilization(300, 100, &t),
            PressureLevel::Emergency
        );
        assert_eq!(
            PressureLevel::from_utilization(usize::MAX, usize::MAX, &t),
            PressureLevel::Emergency
        );
    }

    /// The race behind a stale channel: publisher A reads the books (Critical) and is
    /// preempted; the books change (Normal) and publisher B publishes. Whatever the order in
    /// which the two finish, the signal ends at the books' current level, because each level
    /// is computed inside the serialised publish.
    #[test]
    fn a_publisher_with_a_stale_reading_cannot_have_the_last_word() {
        use std::sync::atomic::AtomicU8;
        use std::sync::mpsc;
        let signal = PressureSignal::new();
        let books = AtomicU8::new(PressureLevel::Critical as u8);
        let read = || PressureLevel::from_u8(books.load(Ordering::Acquire));
        let (a_has_read, wait_for_a) = mpsc::channel();
        let (resume_a, a_resumes) = mpsc::channel::<()>();
        let mut rx = signal.subscribe();
        let (signal_ref, read_ref) = (&signal, &read);
        std::thread::scope(|s| {
            s.spawn(move || {
                signal_ref.publish_with(|| {
                    let level = read_ref();
                    a_has_read.send(()).unwrap();
                    a_resumes.recv().unwrap();
                    level
                })
            });
            wait_for_a.recv().unwrap();
            books.store(PressureLevel::Normal as u8, Ordering::Release);
            let b = s.spawn(move || signal_ref.publish_with(read_ref));
            resume_a.send(()).unwrap();
            b.join().unwrap();
        });
        assert_eq!(signal.level(), PressureLevel::Normal);
        assert_eq!(*rx.borrow_and_update(), PressureLevel::Normal);
    }

    #[test]
    fn signal_publishes_only_changes() {
        let signal = PressureSignal::new();
        let mut rx = signal.subscribe();
        assert_eq!(signal.publish(PressureLevel::Normal), None);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(
            signal.publish(PressureLevel::Critical),
            Some(PressureLevel::Normal)
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), PressureLevel::Critical);
        assert_eq!(signal.level(), PressureLevel::Critical);
    }
}
