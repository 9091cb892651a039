//! The live ceiling: changing the process's memory allowance without a restart.
//!
//! Containers are resized while they run, and the cgroup limit a process starts under is not
//! the one it ends under. [`MemoryGovernor::set_ceiling`] replaces the global ceiling at run
//! time, synchronously for admission:
//!
//! * **Raising** takes effect at once: the next grant sees the new room, and waiting
//!   [`reserve`](MemoryGovernor::reserve) calls are woken.
//! * **Lowering** is in force for admission when `set_ceiling` returns: every grant checks the
//!   ceiling inside its compare-and-swap, so no reservation admitted after the change passes
//!   the new ceiling, and idle per-thread credit granted under the old ceiling is drained
//!   (a release racing the change may still park the ledger's usual slack, at most two quanta
//!   per shard, ≤ 1/32 of a limit; see `Ledger::set_ceiling`).
//!   What is already *held* above the new ceiling is not revoked — the governor never takes
//!   memory from a live token — it is **drained**: reclaimed from borrowers first and then,
//!   if the [`CeilingPolicy`] allows, from holders below their floors, on the governor's
//!   runtime, bounded by the policy's deadline. The returned [`CeilingChange`] reports the
//!   change at once and the drain's outcome when it ends ([`CeilingChange::finished`] to
//!   await it, [`CeilingChange::outcome`] to poll it).
//!
//! When holders cannot give enough back, the governor stays *over* its ceiling until they
//! release: every admission is refused (with the usual typed denial naming the holders),
//! releases keep no per-thread credit, and global pressure reads Emergency, so adapters
//! shed what they can; `still_over` in the outcome says by how much it was over when the
//! drain gave up.
//!
//! Engine limits and floors that no longer fit under the new ceiling are **reported, not
//! silently changed** ([`CeilingMisfit`]): a limit above the ceiling is harmless (admission is
//! bounded by the ceiling anyway) but is reported so an operator can fix the configuration;
//! floors that add up to more than the ceiling cannot all be honoured, and are either reported
//! or, with [`CeilingPolicy::scale_floors`], scaled down proportionally (each floor times
//! `new ceiling / Σ floors`, rounded down) and the scaling reported. Raising the ceiling never
//! scales floors back up: floors are configuration, and only their owner knows what to
//! restore.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::MAX_BYTES;
use crate::container::CeilingSource;
use crate::engine::{EngineId, human_bytes};
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::ledger::Ledger;
use crate::reclaim::{ReclaimScope, ReclaimStep};

/// What a lowered ceiling does to memory held above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeilingPolicy {
    /// How long the drain may ask reclaimers for memory before it reports what is still over.
    pub drain_deadline: Duration,
    /// After the borrowers, also reclaim from engines below their floors (largest holder
    /// first). Off by default: floors are guarantees; turn it on where the ceiling is a hard
    /// container limit and the kernel's OOM killer is the alternative.
    pub drain_holders: bool,
    /// Scale all floors down proportionally when they no longer fit under a lowered ceiling,
    /// instead of only reporting the misfit.
    pub scale_floors: bool,
}

impl Default for CeilingPolicy {
    fn default() -> Self {
        Self {
            drain_deadline: Duration::from_secs(5),
            drain_holders: false,
            scale_floors: false,
        }
    }
}

/// The longest drain deadline accepted.
pub const MAX_DRAIN_DEADLINE: Duration = Duration::from_hours(1);

impl CeilingPolicy {
    /// Checks the policy; `GovernorConfigBuilder::build` calls it.
    pub fn validate(&self) -> Result<(), MemError> {
        if self.drain_deadline.is_zero() || self.drain_deadline > MAX_DRAIN_DEADLINE {
            return Err(MemError::config(
                "ceiling_policy.drain_deadline",
                format!(
                    "{:?} is outside (0, {MAX_DRAIN_DEADLINE:?}]: a zero deadline never drains, a longer one \
                     leaves the process over its ceiling without a report",
                    self.drain_deadline
                ),
            ));
        }
        Ok(())
    }
}

/// A part of the configuration that no longer fits under a new ceiling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CeilingMisfit {
    /// The engine's limit is above the new ceiling (harmless: admission is bounded by the
    /// ceiling; lower the limit with `set_limit` to make the configuration say so).
    LimitAboveCeiling {
        /// The engine.
        engine: EngineId,
        /// Its limit.
        limit: usize,
    },
    /// The floors add up to more than the new ceiling: not every floor can be honoured.
    FloorsAboveCeiling {
        /// Σ floors.
        floors: usize,
    },
    /// [`CeilingPolicy::scale_floors`] lowered this engine's floor.
    FloorScaled {
        /// The engine.
        engine: EngineId,
        /// The floor before.
        from: usize,
        /// The floor now.
        to: usize,
    },
    /// The NUMA node sub-ceilings add up to more than the new ceiling (each still bounds its
    /// node; the global ceiling bounds them all).
    NodeCeilingsAboveCeiling {
        /// Σ node sub-ceilings.
        sum: usize,
    },
}

impl std::fmt::Display for CeilingMisfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CeilingMisfit::LimitAboveCeiling { engine, limit } => {
                write!(
                    f,
                    "{engine} limit {} is above the ceiling",
                    human_bytes(*limit)
                )
            }
            CeilingMisfit::FloorsAboveCeiling { floors } => write!(
                f,
                "floors add up to {}, more than the ceiling",
                human_bytes(*floors)
            ),
            CeilingMisfit::FloorScaled { engine, from, to } => write!(
                f,
                "{engine} floor scaled from {} to {}",
                human_bytes(*from),
                human_bytes(*to)
            ),
            CeilingMisfit::NodeCeilingsAboveCeiling { sum } => write!(
                f,
                "NUMA node sub-ceilings add up to {}, more than the ceiling",
                human_bytes(*sum)
            ),
        }
    }
}

/// How the drain after a lowered ceiling ended.
#[derive(Clone, Debug, Default)]
pub struct DrainOutcome {
    /// Bytes the books show came back through reclaim during the drain.
    pub drained: usize,
    /// Bytes still held above the ceiling when the drain ended (0: under the ceiling).
    pub still_over: usize,
    /// True when the deadline ended the drain before it got under the ceiling.
    pub timed_out: bool,
    /// Every reclaimer call of the drain.
    pub steps: Vec<ReclaimStep>,
}

/// What [`MemoryGovernor::set_ceiling`] did, and the drain it started.
#[derive(Debug)]
pub struct CeilingChange {
    /// The ceiling before.
    pub from: usize,
    /// The ceiling now.
    pub to: usize,
    /// Bytes held above the new ceiling when it took effect (what the drain must bring back).
    pub over: usize,
    /// Configuration that no longer fits (see [`CeilingMisfit`]).
    pub misfits: Vec<CeilingMisfit>,
    outcome: watch::Receiver<Option<DrainOutcome>>,
}

impl CeilingChange {
    /// The drain's outcome, or `None` while it runs.
    pub fn outcome(&self) -> Option<DrainOutcome> {
        self.outcome.borrow().clone()
    }

    /// Waits for the drain to end and returns its outcome (at once when nothing was over).
    pub async fn finished(&mut self) -> DrainOutcome {
        let over = self.over;
        match self.outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_default(),
            // The governor went away before the drain ended.
            Err(_) => DrainOutcome {
                still_over: over,
                ..DrainOutcome::default()
            },
        }
    }
}

impl MemoryGovernor {
    /// Replaces the global ceiling at run time (see the `ceiling` module for the semantics).
    ///
    /// The new ceiling is in force for admission when this returns; raising wakes waiters;
    /// lowering below what is held starts a drain on the governor's runtime, reported through
    /// the returned [`CeilingChange`]. Fails with [`MemError::InvalidConfig`] for 0 bytes or
    /// more than [`MAX_BYTES`].
    ///
    /// ```
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
    ///
    /// let governor = MemoryGovernor::new(
    ///     GovernorConfig::builder()
    ///         .global_ceiling(mib(100))
    ///         .engine(EngineId::Query, EngineBudget::new(mib(100)))
    ///         .build()?,
    /// )?;
    /// let held = governor.try_reserve(EngineId::Query, mib(60))?;
    /// let change = governor.set_ceiling(mib(50))?;
    /// assert_eq!((change.from, change.to, change.over), (mib(100), mib(50), mib(10)));
    /// assert!(governor.try_reserve(EngineId::Query, 1).is_err(), "over: nothing is admitted");
    /// drop(held);
    /// assert!(governor.try_reserve(EngineId::Query, mib(50)).is_ok());
    /// # Ok::<(), governor_core::MemError>(())
    /// ```
    pub fn set_ceiling(&self, bytes: usize) -> Result<CeilingChange, MemError> {
        self.set_ceiling_from(bytes, CeilingSource::Configured)
    }

    /// [`set_ceiling`](Self::set_ceiling), recording where the new ceiling came from (the
    /// container watch passes the limit file it followed).
    pub(crate) fn set_ceiling_from(
        &self,
        bytes: usize,
        source: CeilingSource,
    ) -> Result<CeilingChange, MemError> {
        if bytes == 0 || bytes > MAX_BYTES {
            return Err(MemError::config(
                "set_ceiling",
                format!(
                    "{} is not a usable ceiling: it must be above 0 and at most {} (MAX_BYTES)",
                    human_bytes(bytes),
                    human_bytes(MAX_BYTES)
                ),
            ));
        }
        let policy = self.config().ceiling_policy();
        let _serial = self.config_changes.lock();
        let from = self.books.ledger.set_ceiling(bytes);
        let misfits = self.fit_configuration(bytes, policy.scale_floors);
        self.books.refresh_global_pressure();
        if bytes > from {
            // Waiters re-check on any wake-up; a raise may be exactly what they wait for.
            self.books.released.notify_waiters();
        }
        let over = self.held_against_ceiling().saturating_sub(bytes);
        tracing::info!(
            from,
            to = bytes,
            over,
            source = %source,
            misfits = misfits.len(),
            "global ceiling changed"
        );
        self.environment.ceiling_changed(source);
        for misfit in &misfits {
            tracing::warn!(%misfit, ceiling = bytes, "configuration does not fit the new ceiling");
        }
        let (tx, rx) = watch::channel(None);
        if over == 0 {
            let _ = tx.send(Some(DrainOutcome::default()));
        } else if let Some(governor) = self.books.owner.upgrade() {
            self.runtime().spawn(async move {
                let outcome = governor.drain_to_ceiling(policy).await;
                tracing::info!(
                    drained = outcome.drained,
                    still_over = outcome.still_over,
                    timed_out = outcome.timed_out,
                    "drain after a ceiling drop ended"
                );
                let _ = tx.send(Some(outcome));
            });
        }
        // Without an owner the governor is being dropped: the receiver reports `over`.
        Ok(CeilingChange {
            from,
            to: bytes,
            over,
            misfits,
            outcome: rx,
        })
    }

    /// Bytes counted against the ceiling: live tokens plus untracked memory.
    fn held_against_ceiling(&self) -> usize {
        self.global_reserved().saturating_add(self.untracked())
    }

    /// Reports what no longer fits under `ceiling` and, if asked, scales floors to fit.
    fn fit_configuration(&self, ceiling: usize, scale_floors: bool) -> Vec<CeilingMisfit> {
        let mut misfits = Vec::new();
        let configured: Vec<EngineId> = EngineId::ALL
            .iter()
            .copied()
            .filter(|&e| self.is_configured(e))
            .collect();
        for &engine in &configured {
            let limit = self.limit(engine);
            if limit > ceiling {
                misfits.push(CeilingMisfit::LimitAboveCeiling { engine, limit });
            }
        }
        // Floors are each at most MAX_BYTES and there are seven engines: no overflow.
        let floors: usize = configured.iter().map(|&e| self.floor(e)).sum();
        if floors > ceiling {
            misfits.push(CeilingMisfit::FloorsAboveCeiling { floors });
            if scale_floors {
                for &engine in &configured {
                    let from = self.floor(engine);
                    let to = (from as u128 * ceiling as u128 / floors as u128) as usize;
                    if to != from {
                        Ledger::set_floor(self.row(engine), to);
                        misfits.push(CeilingMisfit::FloorScaled { engine, from, to });
                    }
                }
            }
        }
        let nodes: usize = self
            .config()
            .numa_node_ceilings()
            .iter()
            .map(|&(_, b)| b)
            .sum();
        if nodes > ceiling {
            misfits.push(CeilingMisfit::NodeCeilingsAboveCeiling { sum: nodes });
        }
        misfits
    }

    /// Reclaims what is held above the ceiling: borrowers first, then (by policy) holders,
    /// until under the ceiling or past the deadline.
    async fn drain_to_ceiling(self: &Arc<Self>, policy: CeilingPolicy) -> DrainOutcome {
        let mut outcome = DrainOutcome::default();
        let scopes: &[ReclaimScope] = if policy.drain_holders {
            &[ReclaimScope::Borrowers, ReclaimScope::Holders]
        } else {
            &[ReclaimScope::Borrowers]
        };
        let drain = async {
            for &scope in scopes {
                let over = self.held_against_ceiling().saturating_sub(self.ceiling());
                if over == 0 {
                    break;
                }
                let step = self.reclaim(scope, over).await;
                outcome.drained = outcome.drained.saturating_add(step.freed);
                outcome.steps.extend(step.steps);
            }
        };
        // Each reclaimer call is bounded by the reclaim timeout; the deadline bounds the whole
        // drain (a plan cut short keeps running in the background and is not waited for).
        let timed_out = tokio::time::timeout(policy.drain_deadline, drain)
            .await
            .is_err();
        outcome.timed_out = timed_out;
        outcome.still_over = self.held_against_ceiling().saturating_sub(self.ceiling());
        outcome
    }
}
