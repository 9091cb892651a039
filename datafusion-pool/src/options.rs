//! Policy knobs of a [`GovernedMemoryPool`] and the builder that validates them.
//!
//! The knobs are few on purpose: the *size* of the pool is not one of them. The size is the
//! governor's Query budget, which changes at run time (`set_limit`, lending between engines),
//! so the pool asks the governor on every decision instead of copying a number at build time.

use std::sync::Arc;
use std::time::Duration;

use governor_core::{MemError, MemoryGovernor};

use crate::pool::GovernedMemoryPool;

/// Default share of the Query budget kept free for consumers that cannot spill, beyond what
/// they hold and what sorts' merge reservations are owed: none. The policy keeps exactly what
/// is known to be needed (see the crate's `policy` module); a fixed fraction either starves
/// spillers for nobody or is too small for the merge that needs it.
pub const DEFAULT_UNSPILLABLE_HEADROOM: f64 = 0.0;
/// Default bound on how long an entitled request waits for memory: it waits on events (a
/// release in the pool, the end of a reclaim), so the bound only limits the damage of a stuck
/// plan and is generous enough for a loaded machine.
pub const DEFAULT_RECLAIM_WAIT: Duration = Duration::from_secs(5);
/// Default share grace ((S) of the crate's `policy` module): a spilling reservation the
/// share fell under may still grow by 1/32 of what it holds, so an operator in a phase where it
/// cannot spill (a final aggregate emitting its output) is not failed for a last small
/// adjustment that the budget has room for.
pub const DEFAULT_SHARE_GRACE: f64 = 1.0 / 32.0;
/// Default number of consumers named in a `ResourcesExhausted` message.
pub const DEFAULT_TOP_CONSUMERS: usize = 5;

/// Largest allowed headroom fraction: above it spillable operators get so little memory that
/// every batch spills, which is never what a caller meant.
const MAX_UNSPILLABLE_HEADROOM: f64 = 0.9;
/// Largest allowed share grace: more would let a reservation the share fell under keep growing
/// long after it should have spilled.
const MAX_SHARE_GRACE: f64 = 0.25;
/// Largest allowed reclaim wait: `try_grow` is synchronous and runs on a query worker thread,
/// so a longer block would stall the whole runtime rather than protect a query.
const MAX_RECLAIM_WAIT: Duration = Duration::from_secs(30);

/// Validated policy of a [`GovernedMemoryPool`]; see [`GovernedPoolBuilder`] for each knob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolOptions {
    pub(crate) unspillable_headroom: f64,
    pub(crate) reclaim_wait: Duration,
    pub(crate) share_grace: f64,
    pub(crate) top_consumers: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            unspillable_headroom: DEFAULT_UNSPILLABLE_HEADROOM,
            reclaim_wait: DEFAULT_RECLAIM_WAIT,
            share_grace: DEFAULT_SHARE_GRACE,
            top_consumers: DEFAULT_TOP_CONSUMERS,
        }
    }
}

impl PoolOptions {
    /// Fraction of the Query budget spillable consumers may never take (kept for unspillable ones).
    pub fn unspillable_headroom(&self) -> f64 {
        self.unspillable_headroom
    }

    /// Longest time a denied unspillable consumer waits for reclaimed memory.
    pub fn reclaim_wait(&self) -> Duration {
        self.reclaim_wait
    }

    /// Fraction of what it holds by which a spilling reservation the share fell under may
    /// still grow ((S) of the crate's `policy` module).
    pub fn share_grace(&self) -> f64 {
        self.share_grace
    }

    /// How many consumers an out-of-memory message names.
    pub fn top_consumers(&self) -> usize {
        self.top_consumers
    }
}

/// Builds a [`GovernedMemoryPool`] with non-default policy, like `moka`'s cache builder:
/// setters take any value and [`build`](Self::build) rejects the bad ones with a message that
/// names the knob and the fix.
///
/// ```
/// # use std::time::Duration;
/// # use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
/// # use datafusion_pool::GovernedMemoryPool;
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(256))
///         .engine(EngineId::Query, EngineBudget::new(mib(128)).with_floor(mib(32)))
///         .build()?,
/// )?;
/// let pool = GovernedMemoryPool::builder(&governor)
///     .unspillable_headroom(0.3)
///     .reclaim_wait(Duration::from_millis(200))
///     .build()?;
/// assert_eq!(pool.options().unspillable_headroom(), 0.3);
///
/// // A headroom that leaves nothing for spilling operators is refused, not clamped.
/// assert!(GovernedMemoryPool::builder(&governor).unspillable_headroom(1.5).build().is_err());
/// # Ok::<(), governor_core::MemError>(())
/// ```
#[derive(Debug, Clone)]
pub struct GovernedPoolBuilder {
    governor: Arc<MemoryGovernor>,
    options: PoolOptions,
}

impl GovernedPoolBuilder {
    pub(crate) fn new(governor: &Arc<MemoryGovernor>) -> Self {
        Self {
            governor: Arc::clone(governor),
            options: PoolOptions::default(),
        }
    }

    /// Fraction (0.0 ..= 0.9) of the Query limit that spillable consumers may not take while an
    /// unspillable consumer is registered, so that a late unspillable consumer (a hash-join
    /// build side) still finds room after sorts and aggregates have taken their shares.
    /// Default 0: sorts' merge reservations are kept for exactly what they reserved without
    /// it, and a hash join gets what `FairSpillPool` would give it.
    ///
    /// Unspillable consumers are not limited by it: they may use the whole budget.
    #[must_use]
    pub fn unspillable_headroom(mut self, fraction: f64) -> Self {
        self.options.unspillable_headroom = fraction;
        self
    }

    /// How long (at most 30 s) a request the policy entitles may wait, when the governor
    /// refuses it, while engines that borrowed memory give it back and this pool's consumers
    /// above their shares spill. It waits on those events; the bound only limits the damage of
    /// a stuck plan. Default 5 s. `Duration::ZERO` still asks other engines once, without
    /// waiting.
    #[must_use]
    pub fn reclaim_wait(mut self, wait: Duration) -> Self {
        self.options.reclaim_wait = wait;
        self
    }

    /// Fraction (0.0 ..= 0.25) of what it holds by which a spilling reservation may still grow
    /// after the fair share fell under it (the budget shrank: other engines took their floors
    /// back, its own arena drifted, a new consumer registered), in all until it is within its
    /// share again, and only while no consumer of the pool is starving and the governor grants
    /// it. Default 1/32.
    ///
    /// Why: a refusal is a spiller's cue to spill, but some spillers reach phases where they
    /// cannot (DataFusion 55's final hash aggregate resizes its reservation once more after it
    /// has materialised its output, and a refusal then fails the query). `FairSpillPool` fails
    /// such a query; the grace lets it finish when the budget has the bytes. 0 restores strict
    /// `FairSpillPool` shares.
    #[must_use]
    pub fn share_grace(mut self, fraction: f64) -> Self {
        self.options.share_grace = fraction;
        self
    }

    /// Number of consumers (at least 1) that a `ResourcesExhausted` message names. Default 5.
    #[must_use]
    pub fn top_consumers(mut self, n: usize) -> Self {
        self.options.top_consumers = n;
        self
    }

    /// Validates the knobs and builds the pool.
    ///
    /// # Errors
    /// [`MemError::InvalidConfig`] naming the knob, when the headroom is not a number in
    /// `0.0..=0.9`, the share grace is not one in `0.0..=0.25`, the reclaim wait exceeds 30 s,
    /// or `top_consumers` is 0.
    pub fn build(self) -> Result<GovernedMemoryPool, MemError> {
        let o = &self.options;
        if !(0.0..=MAX_UNSPILLABLE_HEADROOM).contains(&o.unspillable_headroom) {
            return Err(invalid(
                "unspillable_headroom",
                format!(
                    "must be a fraction in 0.0..={MAX_UNSPILLABLE_HEADROOM}, got {}; \
                     use e.g. 0.2 to keep a fifth of the Query budget for unspillable consumers",
                    o.unspillable_headroom
                ),
            ));
        }
        if !(0.0..=MAX_SHARE_GRACE).contains(&o.share_grace) {
            return Err(invalid(
                "share_grace",
                format!(
                    "must be a fraction in 0.0..={MAX_SHARE_GRACE}, got {}; \
                     0 keeps strict fair shares, the default is 1/32",
                    o.share_grace
                ),
            ));
        }
        if o.reclaim_wait > MAX_RECLAIM_WAIT {
            return Err(invalid(
                "reclaim_wait",
                format!(
                    "must be at most {MAX_RECLAIM_WAIT:?}, got {:?}: try_grow blocks a query \
                     worker thread while it waits; use a few hundred milliseconds",
                    o.reclaim_wait
                ),
            ));
        }
        if o.top_consumers == 0 {
            return Err(invalid(
                "top_consumers",
                "must be at least 1 so that an out-of-memory error names its culprit".to_owned(),
            ));
        }
        Ok(GovernedMemoryPool::with_options(
            &self.governor,
            self.options,
        ))
    }
}

fn invalid(field: &str, reason: String) -> MemError {
    MemError::InvalidConfig {
        field: field.to_owned(),
        reason,
    }
}
