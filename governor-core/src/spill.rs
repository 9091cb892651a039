//! A hysteresis state machine that tells a consumer when to start and stop spilling.
//!
//! Without hysteresis a consumer hovering at its threshold flips between spilling and not on
//! every batch. The controller starts spilling at `begin_pct` of the limit and keeps spilling
//! until usage falls below `restore_pct`.

use crate::error::MemError;

/// Thresholds for [`SpillController`], in percent of the consumer's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillConfig {
    /// Start spilling at or above this utilisation (default 90).
    pub begin_pct: u8,
    /// Stop spilling once utilisation is below this (default 75).
    pub restore_pct: u8,
}

impl Default for SpillConfig {
    fn default() -> Self {
        Self {
            begin_pct: 90,
            restore_pct: 75,
        }
    }
}

/// What the consumer should do after an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpillAction {
    /// Not spilling, and no need to.
    Continue,
    /// Crossed `begin_pct`: start spilling now.
    BeginSpill,
    /// Spilling, and still above `restore_pct`: keep going.
    KeepSpilling,
    /// Fell below `restore_pct`: stop spilling.
    Restore,
}

/// The hysteresis state of one consumer.
#[derive(Clone, Debug)]
pub struct SpillController {
    config: SpillConfig,
    spilling: bool,
}

impl SpillController {
    /// A controller with validated thresholds (`0 < restore_pct < begin_pct <= 100`).
    pub fn new(config: SpillConfig) -> Result<Self, MemError> {
        if !(0 < config.restore_pct
            && config.restore_pct < config.begin_pct
            && config.begin_pct <= 100)
        {
            return Err(MemError::config(
                "spill_config",
                format!(
                    "need 0 < restore_pct < begin_pct <= 100 for hysteresis, got restore {} / begin {}",
                    config.restore_pct, config.begin_pct
                ),
            ));
        }
        Ok(Self {
            config,
            spilling: false,
        })
    }

    /// True while in the spilling state.
    pub fn is_spilling(&self) -> bool {
        self.spilling
    }

    /// Feeds the current usage and returns what to do.
    pub fn observe(&mut self, used: usize, limit: usize) -> SpillAction {
        let pct = if limit == 0 {
            100
        } else {
            (used as u128 * 100 / limit as u128).min(1000) as u16
        };
        match (self.spilling, pct) {
            (false, p) if p >= u16::from(self.config.begin_pct) => {
                self.spilling = true;
                SpillAction::BeginSpill
            }
            (false, _) => SpillAction::Continue,
            (true, p) if p < u16::from(self.config.restore_pct) => {
                self.spilling = false;
                SpillAction::Restore
            }
            (true, _) => SpillAction::KeepSpilling,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_between_thresholds() {
        let mut c = SpillController::new(SpillConfig::default()).unwrap();
        assert_eq!(c.observe(80, 100), SpillAction::Continue);
        assert_eq!(c.observe(90, 100), SpillAction::BeginSpill);
        assert_eq!(c.observe(80, 100), SpillAction::KeepSpilling);
        assert_eq!(c.observe(75, 100), SpillAction::KeepSpilling);
        assert_eq!(c.observe(74, 100), SpillAction::Restore);
        assert_eq!(c.observe(89, 100), SpillAction::Continue);
        assert!(!c.is_spilling());
    }

    #[test]
    fn rejects_inverted_thresholds() {
        let bad = SpillConfig {
            begin_pct: 70,
            restore_pct: 80,
        };
        assert!(matches!(
            SpillController::new(bad),
            Err(MemError::InvalidConfig { .. })
        ));
    }
}
