//! Rebalancing: moving budget from idle engines to busy ones, and back.
//!
//! # The policy
//!
//! * **Lending is immediate and demand-driven.** There is no timer between an engine asking and
//!   an engine getting: any engine may grow past its floor, up to its limit, while the ceiling
//!   has room. The room it uses is other engines' idle floors.
//! * **Demand signal.** An engine *wants* memory when a reservation of it is denied or waiting
//!   (`waiting_bytes`, fed by [`MemoryGovernor::reserve`]). Owed memory is the part of that
//!   demand below the engine's floor.
//! * **Taking back.** Each [`rebalance_once`](MemoryGovernor::rebalance_once) tick
//!   1. pays floor debts: for each engine waiting below its floor, asks the borrowers (largest
//!      borrowing first) for what it is owed;
//!   2. relieves the process: when global pressure is Critical or worse, asks borrowers for
//!      enough to bring the process back to the Warning threshold.
//!
//!   Each tick asks for at most `max_step` bytes (default 1/8 of the ceiling), so a burst does
//!   not make every borrower dump everything at once; at the default 100 ms interval the
//!   whole ceiling can move in about a second.
//! * **Returning.** Borrowers give memory back only through their reclaimers (spill, flush,
//!   evict) — the governor never takes memory from a live token.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::engine::EngineId;
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::pressure::PressureLevel;
use crate::reclaim::{ReclaimOutcome, ReclaimScope};

/// Settings of the background rebalancer.
#[derive(Clone, Copy, Debug)]
pub struct RebalancePolicy {
    /// Time between ticks.
    pub interval: Duration,
    /// Most bytes asked back per tick; `None` means 1/8 of the ceiling.
    pub max_step: Option<usize>,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            max_step: None,
        }
    }
}

/// The longest rebalancing interval accepted.
pub const MAX_REBALANCE_INTERVAL: Duration = Duration::from_hours(1);

impl RebalancePolicy {
    /// Checks the policy; `start_rebalancer` calls it.
    pub fn validate(&self) -> Result<(), MemError> {
        if self.interval.is_zero() {
            return Err(MemError::config(
                "RebalancePolicy.interval",
                "a zero interval would tick continuously; use at least a few milliseconds (default 100 ms)",
            ));
        }
        if self.interval > MAX_REBALANCE_INTERVAL {
            return Err(MemError::config(
                "RebalancePolicy.interval",
                format!(
                    "{:?} is longer than the maximum of {MAX_REBALANCE_INTERVAL:?}: floor debts would go unpaid \
                     that long; drop the handle instead to stop rebalancing",
                    self.interval
                ),
            ));
        }
        if self.max_step == Some(0) {
            return Err(MemError::config(
                "RebalancePolicy.max_step",
                "a zero step would never ask anyone for memory; use None for 1/8 of the ceiling",
            ));
        }
        Ok(())
    }
}

/// What one rebalancing tick did.
#[derive(Debug, Default, Clone)]
pub struct RebalanceReport {
    /// Floor debts paid: (engine owed, outcome).
    pub floor_debts: Vec<(EngineId, ReclaimOutcome)>,
    /// Relief of global pressure, if it was Critical or worse.
    pub pressure_relief: Option<ReclaimOutcome>,
}

impl RebalanceReport {
    /// Bytes freed in this tick.
    pub fn freed(&self) -> usize {
        self.floor_debts.iter().map(|(_, o)| o.freed).sum::<usize>()
            + self.pressure_relief.as_ref().map_or(0, |o| o.freed)
    }
}

/// Keeps the background rebalancer running; dropping it stops it.
#[must_use = "dropping the handle stops the rebalancer"]
#[derive(Debug)]
pub struct RebalancerHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RebalancerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MemoryGovernor {
    /// Bytes `engine` is owed: what it waits for, up to its floor.
    pub fn floor_debt(&self, engine: EngineId) -> usize {
        let waiting = self.books.counters[engine.index()]
            .waiting_bytes
            .load(std::sync::atomic::Ordering::Acquire);
        let reserved = self.reserved(engine);
        let owed = self.floor(engine).saturating_sub(reserved);
        waiting.min(owed)
    }

    /// Runs one rebalancing tick (see the module docs for the policy).
    pub async fn rebalance_once(self: &Arc<Self>, policy: &RebalancePolicy) -> RebalanceReport {
        let mut budget = policy.max_step.unwrap_or(self.ceiling() / 8).max(1);
        let mut report = RebalanceReport::default();
        for engine in EngineId::ALL {
            let debt = self.floor_debt(engine).min(budget);
            if debt == 0 {
                continue;
            }
            let outcome = self
                .reclaim(ReclaimScope::BorrowersExcept(engine), debt)
                .await;
            budget = budget.saturating_sub(outcome.requested);
            report.floor_debts.push((engine, outcome));
        }
        if self.global_pressure() >= PressureLevel::Critical && budget > 0 {
            let warning =
                self.ceiling() / 100 * usize::from(self.config().thresholds().warning_pct);
            let over = (self.global_reserved() + self.untracked()).saturating_sub(warning);
            if over > 0 {
                report.pressure_relief = Some(
                    self.reclaim(ReclaimScope::Borrowers, over.min(budget))
                        .await,
                );
            }
        }
        report
    }

    /// Starts the background rebalancer on the governor's own runtime.
    ///
    /// Fails with [`MemError::InvalidConfig`] for a zero interval (a timer that fires
    /// continuously; the task would otherwise die on the governor's runtime where nobody sees
    /// it), for one above [`MAX_REBALANCE_INTERVAL`], and for a zero `max_step` (a rebalancer that
    /// may never ask for anything).
    pub fn start_rebalancer(
        self: &Arc<Self>,
        policy: RebalancePolicy,
    ) -> Result<RebalancerHandle, MemError> {
        policy.validate()?;
        let weak: Weak<MemoryGovernor> = Arc::downgrade(self);
        let task = self.runtime().spawn(async move {
            let mut ticks = tokio::time::interval(policy.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(governor) = weak.upgrade() else {
                    break;
                };
                let report = governor.rebalance_once(&policy).await;
                if report.freed() > 0 {
                    tracing::info!(freed = report.freed(), "rebalanced");
                }
            }
        });
        Ok(RebalancerHandle { task })
    }
}
