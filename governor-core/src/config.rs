//! Configuration: the ceiling, each engine's budget and the policy knobs.
//!
//! Built with [`GovernorConfig::builder`]; every invariant the governor relies on is checked in
//! [`GovernorConfigBuilder::build`], so a governor can never start from a configuration that
//! could break its promises. Each error names the field and says how to fix it.

use std::time::Duration;

use crate::ceiling::CeilingPolicy;
use crate::engine::{EngineId, human_bytes};
use crate::error::MemError;

/// One engine's budget: a hard `limit` and a guaranteed `floor`.
///
/// The engine may always hold up to its floor (if others borrowed it, they are asked to give it
/// back); above the floor it *borrows* idle memory of other engines, up to its limit, while the
/// global ceiling has room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineBudget {
    limit: usize,
    floor: usize,
}

impl EngineBudget {
    /// A budget with a hard `limit` in bytes and no guaranteed floor.
    pub const fn new(limit: usize) -> Self {
        Self { limit, floor: 0 }
    }

    /// Guarantees `floor` bytes to the engine: memory others borrowed below it is reclaimed for it.
    #[must_use]
    pub const fn with_floor(mut self, floor: usize) -> Self {
        self.floor = floor;
        self
    }

    /// The hard limit in bytes.
    pub const fn limit(&self) -> usize {
        self.limit
    }

    /// The guaranteed floor in bytes.
    pub const fn floor(&self) -> usize {
        self.floor
    }
}

/// Utilisation percentages at which pressure rises to Warning, Critical and Emergency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressureThresholds {
    /// Percent of the limit (or ceiling) at which pressure becomes Warning (default 70).
    pub warning_pct: u8,
    /// Percent at which pressure becomes Critical (default 85).
    pub critical_pct: u8,
    /// Percent at which pressure becomes Emergency (default 95).
    pub emergency_pct: u8,
}

impl Default for PressureThresholds {
    fn default() -> Self {
        Self {
            warning_pct: 70,
            critical_pct: 85,
            emergency_pct: 95,
        }
    }
}

impl PressureThresholds {
    fn validate(self) -> Result<(), MemError> {
        let Self {
            warning_pct: w,
            critical_pct: c,
            emergency_pct: e,
        } = self;
        if !(0 < w && w < c && c < e && e <= 100) {
            return Err(MemError::config(
                "pressure_thresholds",
                format!(
                    "thresholds must increase strictly and stay within 1..=100 \
                     (warning < critical < emergency <= 100), got {w}/{c}/{e}; the default is 70/85/95"
                ),
            ));
        }
        Ok(())
    }
}

/// A validated governor configuration. Build one with [`GovernorConfig::builder`].
#[derive(Clone, Debug)]
pub struct GovernorConfig {
    pub(crate) ceiling: usize,
    pub(crate) engines: [Option<EngineBudget>; EngineId::COUNT],
    pub(crate) thresholds: PressureThresholds,
    pub(crate) reclaim_timeout: Duration,
    /// How long an entitled `reserve` waits on reclaim before it aborts a victim (`ladder`).
    pub(crate) abort_after: Duration,
    /// How long an entitled `reserve` waits for one aborted victim's memory (`ladder`).
    pub(crate) victim_wait: Duration,
    pub(crate) shards: usize,
    /// `(node, bytes)`, sorted by node; empty when NUMA nodes are not bounded.
    pub(crate) node_ceilings: Vec<(usize, usize)>,
    /// What [`MemoryGovernor::set_ceiling`](crate::MemoryGovernor::set_ceiling) does when the
    /// ceiling drops.
    pub(crate) ceiling_policy: CeilingPolicy,
    /// Where `ceiling` came from (a number, or a limit file found in the environment).
    pub(crate) ceiling_source: crate::container::CeilingSource,
}

impl GovernorConfig {
    /// Starts a configuration. A ceiling and at least one engine are required.
    pub fn builder() -> GovernorConfigBuilder {
        GovernorConfigBuilder::default()
    }

    /// The global ceiling in bytes.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// Where the ceiling came from: the configuration, or a limit found in the environment
    /// ([`GovernorConfigBuilder::ceiling_from_environment`]).
    pub fn ceiling_source(&self) -> &crate::container::CeilingSource {
        &self.ceiling_source
    }

    /// The budget configured for `engine`, if any.
    pub fn budget(&self, engine: EngineId) -> Option<EngineBudget> {
        self.engines[engine.index()]
    }

    /// The pressure thresholds.
    pub fn thresholds(&self) -> PressureThresholds {
        self.thresholds
    }

    /// How long one reclaimer may take before it is abandoned and reported.
    pub fn reclaim_timeout(&self) -> Duration {
        self.reclaim_timeout
    }

    /// How long an entitled [`reserve`](crate::MemoryGovernor::reserve) waits for reclaim
    /// before it aborts a victim (at most half the caller's timeout; see the `ladder` module).
    pub fn abort_after(&self) -> Duration {
        self.abort_after
    }

    /// How long an entitled `reserve` waits for an aborted victim's memory before it may
    /// abort another.
    pub fn victim_wait(&self) -> Duration {
        self.victim_wait
    }

    /// Number of admission shards per engine (see the `ledger` module).
    pub fn reservation_shards(&self) -> usize {
        self.shards
    }

    /// Per-NUMA-node sub-ceilings `(node OS index, bytes)`, by node; empty when none are set.
    pub fn numa_node_ceilings(&self) -> &[(usize, usize)] {
        &self.node_ceilings
    }

    /// What a run-time ceiling change does (see [`CeilingPolicy`]).
    pub fn ceiling_policy(&self) -> CeilingPolicy {
        self.ceiling_policy
    }
}

/// Builder for [`GovernorConfig`]; invalid settings fail at [`build`](Self::build).
#[derive(Clone, Debug, Default)]
pub struct GovernorConfigBuilder {
    ceiling: Option<usize>,
    engines: Vec<(EngineId, EngineBudget)>,
    thresholds: Option<PressureThresholds>,
    reclaim_timeout: Option<Duration>,
    abort_after: Option<Duration>,
    victim_wait: Option<Duration>,
    shards: Option<usize>,
    node_ceilings: Vec<(usize, usize)>,
    ceiling_policy: Option<CeilingPolicy>,
    ceiling_source: Option<crate::container::CeilingSource>,
}

/// The reclaim timeout used when none is configured.
pub const DEFAULT_RECLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an entitled request waits on reclaim before aborting a victim, when none is
/// configured (capped per request at half its timeout, as Velox's arbitrator does).
pub const DEFAULT_ABORT_AFTER: Duration = Duration::from_secs(2);

/// How long an entitled request waits for an aborted victim's memory, when none is configured
/// (ClickHouse's overcommit tracker waits 5 s for its victim).
pub const DEFAULT_VICTIM_WAIT: Duration = Duration::from_secs(5);

/// The largest ceiling, limit or single request the governor accepts: 1 EiB.
///
/// The ledger keeps an engine's room as a signed word and adds grants, charges and untracked
/// memory together; bounding every configured size (and every single charge) at 2^60 leaves
/// room for all seven engines' limits and overcommit to be added without overflow, while no
/// real machine comes near it. A larger value is refused at `build()` instead of being accepted
/// and then refusing every reservation.
pub const MAX_BYTES: usize = 1 << 60;

/// The longest reclaim timeout accepted: a reclaimer slower than this is indistinguishable
/// from a hung one, and a longer bound would let one stuck call hold a whole plan.
pub const MAX_RECLAIM_TIMEOUT: Duration = Duration::from_hours(1);

/// Largest number of admission shards per engine.
pub const MAX_SHARDS: usize = 64;

/// NUMA node OS indexes must be below this (Linux's own `MAX_NUMNODES` is at most 1024).
pub const MAX_NUMA_NODES: usize = 1024;

impl GovernorConfigBuilder {
    /// The process-wide ceiling in bytes: the sum of all reservations never exceeds it.
    #[must_use]
    pub fn global_ceiling(mut self, bytes: usize) -> Self {
        self.ceiling = Some(bytes);
        self.ceiling_source = None;
        self
    }

    /// Records where the ceiling just set came from (see `ceiling_from_environment`).
    pub(crate) fn ceiling_source(mut self, source: crate::container::CeilingSource) -> Self {
        self.ceiling_source = Some(source);
        self
    }

    /// Gives `engine` a budget. Configuring the same engine twice is an error at `build()`.
    #[must_use]
    pub fn engine(mut self, engine: EngineId, budget: EngineBudget) -> Self {
        self.engines.push((engine, budget));
        self
    }

    /// Overrides the default 70/85/95 pressure thresholds.
    #[must_use]
    pub fn pressure_thresholds(mut self, thresholds: PressureThresholds) -> Self {
        self.thresholds = Some(thresholds);
        self
    }

    /// How long one reclaimer may run before it is abandoned and reported (default 5 s).
    #[must_use]
    pub fn reclaim_timeout(mut self, timeout: Duration) -> Self {
        self.reclaim_timeout = Some(timeout);
        self
    }

    /// How long a [`reserve`](crate::MemoryGovernor::reserve) that is *entitled* to memory
    /// (within its engine's floor, lent out) waits for reclaim before the governor aborts a
    /// registered unit of work for it (default 2 s; a request waits at most half its own
    /// timeout before that step). See the `ladder` module.
    #[must_use]
    pub fn abort_after(mut self, wait: Duration) -> Self {
        self.abort_after = Some(wait);
        self
    }

    /// How long an entitled request waits for an aborted victim's memory to come back before
    /// it may abort another (default 5 s).
    #[must_use]
    pub fn victim_wait(mut self, wait: Duration) -> Self {
        self.victim_wait = Some(wait);
        self
    }

    /// Number of admission shards per engine (default: the machine's parallelism, rounded up to
    /// a power of two, at most 64); other counts are rounded up to a power of two. One shard
    /// gives exact per-call accounting at the cost of contention on a single atomic; see the
    /// `ledger` module.
    #[must_use]
    pub fn reservation_shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Bounds what all engines together may hold on NUMA node `node` (its OS index) to
    /// `bytes`, within the global ceiling. A reservation counts against the node of the thread
    /// that makes it (see [`thread_numa_node`](crate::thread_numa_node)) or the node named in
    /// [`MemoryGovernor::try_reserve_on_node`](crate::MemoryGovernor::try_reserve_on_node).
    /// Nodes without a sub-ceiling are bounded by the global ceiling only. The sub-ceilings
    /// must add up to at most the ceiling.
    ///
    /// Costs one more atomic operation per admission and release, on the thread's own node
    /// credit (per-thread credit, like engine budgets), so it is cheap but not free: leave it
    /// unset on machines with one node.
    #[must_use]
    pub fn numa_node_ceiling(mut self, node: usize, bytes: usize) -> Self {
        self.node_ceilings.push((node, bytes));
        self
    }

    /// Every sub-ceiling of `ceilings` (for example [`NumaCeilings::proportional`]), as
    /// [`numa_node_ceiling`](Self::numa_node_ceiling) for each node.
    ///
    /// [`NumaCeilings::proportional`]: crate::numa::NumaCeilings::proportional
    #[cfg(feature = "numa")]
    #[must_use]
    pub fn numa_ceilings(mut self, ceilings: &crate::numa::NumaCeilings) -> Self {
        self.node_ceilings.extend(ceilings.iter());
        self
    }

    /// What [`MemoryGovernor::set_ceiling`](crate::MemoryGovernor::set_ceiling) does when the
    /// ceiling drops below what is held (default: drain borrowers for up to 5 s, keep floors).
    #[must_use]
    pub fn ceiling_policy(mut self, policy: CeilingPolicy) -> Self {
        self.ceiling_policy = Some(policy);
        self
    }

    /// Checks every invariant and returns the configuration.
    pub fn build(self) -> Result<GovernorConfig, MemError> {
        let ceiling = self.ceiling.ok_or_else(|| {
            MemError::config(
                "global_ceiling",
                "no ceiling set; call .global_ceiling(bytes) with the most memory all engines may hold together",
            )
        })?;
        if ceiling == 0 {
            return Err(MemError::config(
                "global_ceiling",
                "the ceiling is 0 bytes, so nothing could ever be reserved; set it to the process's memory allowance",
            ));
        }
        if ceiling > MAX_BYTES {
            return Err(MemError::config(
                "global_ceiling",
                format!(
                    "{} is more than the governor can account for (at most {} = MAX_BYTES); \
                     for \"no real bound\" use the machine's memory",
                    human_bytes(ceiling),
                    human_bytes(MAX_BYTES)
                ),
            ));
        }
        if self.engines.is_empty() {
            return Err(MemError::config(
                "engine",
                "no engine has a budget; add at least one with .engine(EngineId::.., EngineBudget::new(limit))",
            ));
        }
        let mut engines = [None; EngineId::COUNT];
        let mut floors: usize = 0;
        for (engine, budget) in &self.engines {
            let slot = &mut engines[engine.index()];
            if slot.is_some() {
                return Err(MemError::config(
                    format!("engine({engine})"),
                    "configured twice; give each engine exactly one budget",
                ));
            }
            validate_budget(*engine, *budget)?;
            floors = floors.saturating_add(budget.floor);
            *slot = Some(*budget);
        }
        if floors > ceiling {
            return Err(MemError::config(
                "floor",
                format!(
                    "the floors add up to {} but the ceiling is {}; guaranteed shares cannot all be honoured, \
                     lower some floors or raise the ceiling",
                    human_bytes(floors),
                    human_bytes(ceiling)
                ),
            ));
        }
        let thresholds = self.thresholds.unwrap_or_default();
        thresholds.validate()?;
        let reclaim_timeout = self.reclaim_timeout.unwrap_or(DEFAULT_RECLAIM_TIMEOUT);
        if reclaim_timeout.is_zero() {
            return Err(MemError::config(
                "reclaim_timeout",
                "a zero timeout would abandon every reclaimer at once; use at least a few milliseconds",
            ));
        }
        if reclaim_timeout > MAX_RECLAIM_TIMEOUT {
            return Err(MemError::config(
                "reclaim_timeout",
                format!(
                    "{reclaim_timeout:?} is longer than the maximum of {MAX_RECLAIM_TIMEOUT:?}: a reclaimer that \
                     slow cannot be told from a hung one, and one hung call would hold the whole reclaim plan"
                ),
            ));
        }
        let abort_after = self.abort_after.unwrap_or(DEFAULT_ABORT_AFTER);
        let victim_wait = self.victim_wait.unwrap_or(DEFAULT_VICTIM_WAIT);
        if victim_wait.is_zero() {
            return Err(MemError::config(
                "victim_wait",
                "a zero wait would abort a new victim on every retry before the last one could \
                 give its memory back; use at least a few milliseconds",
            ));
        }
        for (field, wait) in [("abort_after", abort_after), ("victim_wait", victim_wait)] {
            if wait > MAX_RECLAIM_TIMEOUT {
                return Err(MemError::config(
                    field,
                    format!("{wait:?} is longer than the maximum of {MAX_RECLAIM_TIMEOUT:?}"),
                ));
            }
        }
        let shards = match self.shards {
            Some(0) => {
                return Err(MemError::config(
                    "reservation_shards",
                    "0 shards; use 1 for exact single-atomic accounting or more for many threads",
                ));
            }
            Some(n) if n > MAX_SHARDS => {
                return Err(MemError::config(
                    "reservation_shards",
                    format!("{n} shards is more than the maximum of {MAX_SHARDS}"),
                ));
            }
            // A power of two lets the hot path pick a shard with a mask instead of a division.
            Some(n) => n.next_power_of_two(),
            None => default_shards(),
        };
        let node_ceilings = validate_node_ceilings(self.node_ceilings, ceiling)?;
        let ceiling_policy = self.ceiling_policy.unwrap_or_default();
        ceiling_policy.validate()?;
        Ok(GovernorConfig {
            ceiling,
            engines,
            thresholds,
            reclaim_timeout,
            abort_after,
            victim_wait,
            shards,
            node_ceilings,
            ceiling_policy,
            ceiling_source: self
                .ceiling_source
                .unwrap_or(crate::container::CeilingSource::Configured),
        })
    }
}

/// Checks the NUMA sub-ceilings and returns them sorted by node.
fn validate_node_ceilings(
    mut nodes: Vec<(usize, usize)>,
    ceiling: usize,
) -> Result<Vec<(usize, usize)>, MemError> {
    nodes.sort_unstable();
    for pair in nodes.windows(2) {
        if pair[0].0 == pair[1].0 {
            return Err(MemError::config(
                format!("numa_node_ceiling({})", pair[0].0),
                "the node is given a sub-ceiling twice; give each node one",
            ));
        }
    }
    let mut sum: usize = 0;
    for &(node, bytes) in &nodes {
        let field = format!("numa_node_ceiling({node})");
        if node >= MAX_NUMA_NODES {
            return Err(MemError::config(
                field,
                format!("node {node} is not a NUMA node index (they are below {MAX_NUMA_NODES})"),
            ));
        }
        if bytes == 0 {
            return Err(MemError::config(
                field,
                "a 0-byte sub-ceiling would refuse every reservation on the node; leave the node out to bound it by the global ceiling only",
            ));
        }
        sum = sum.saturating_add(bytes);
    }
    if sum > ceiling {
        return Err(MemError::config(
            "numa_node_ceiling",
            format!(
                "the node sub-ceilings add up to {} but the global ceiling is {}; lower them so they fit inside it",
                human_bytes(sum),
                human_bytes(ceiling)
            ),
        ));
    }
    Ok(nodes)
}

/// Checks one engine's budget; shared by `build()` and run-time updates.
///
/// A limit above the ceiling is *not* refused: one configuration must start in any container
/// (`ceiling_from_environment`, `follow_container`, `set_ceiling` move the ceiling after it was
/// written). An engine can never hold more than the ceiling anyway (every admission checks
/// both), so its effective limit is the smaller of the two
/// ([`MemoryGovernor::effective_limit`](crate::MemoryGovernor::effective_limit), reported in
/// the snapshot). `MemoryGovernor::set_limit` checks the ceiling in force itself.
pub(crate) fn validate_budget(engine: EngineId, budget: EngineBudget) -> Result<(), MemError> {
    if budget.limit == 0 {
        return Err(MemError::config(
            format!("engine({engine}).limit"),
            "the limit is 0 bytes; leave the engine out instead, or give it a positive limit",
        ));
    }
    if budget.floor > budget.limit {
        return Err(MemError::config(
            format!("engine({engine}).floor"),
            format!(
                "the floor ({}) is above the limit ({}); a guarantee cannot exceed the maximum, lower the floor",
                human_bytes(budget.floor),
                human_bytes(budget.limit)
            ),
        ));
    }
    if budget.limit > MAX_BYTES {
        return Err(MemError::config(
            format!("engine({engine}).limit"),
            format!(
                "the limit ({}) is above the largest supported size ({}, MAX_BYTES)",
                human_bytes(budget.limit),
                human_bytes(MAX_BYTES)
            ),
        ));
    }
    Ok(())
}

fn default_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .next_power_of_two()
        .min(MAX_SHARDS)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::engine::mib;

    fn field_of(err: MemError) -> String {
        match err {
            MemError::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn valid_config_builds_and_limits_may_oversubscribe() {
        let cfg = GovernorConfig::builder()
            .global_ceiling(mib(100))
            .engine(
                EngineId::Query,
                EngineBudget::new(mib(80)).with_floor(mib(20)),
            )
            .engine(
                EngineId::Vector,
                EngineBudget::new(mib(80)).with_floor(mib(40)),
            )
            .build()
            .expect("valid");
        assert_eq!(cfg.ceiling(), mib(100));
        assert_eq!(cfg.budget(EngineId::Vector).unwrap().floor(), mib(40));
        assert!(cfg.budget(EngineId::Wal).is_none());
        assert_eq!(cfg.thresholds(), PressureThresholds::default());
    }

    #[test]
    fn each_invalid_setting_names_its_field() {
        let base = || GovernorConfig::builder().global_ceiling(mib(100));
        let q = EngineId::Query;
        assert_eq!(
            field_of(GovernorConfig::builder().build().unwrap_err()),
            "global_ceiling"
        );
        assert_eq!(
            field_of(
                GovernorConfig::builder()
                    .global_ceiling(0)
                    .engine(q, EngineBudget::new(1))
                    .build()
                    .unwrap_err()
            ),
            "global_ceiling"
        );
        assert_eq!(field_of(base().build().unwrap_err()), "engine");
        assert_eq!(
            field_of(
                base()
                    .engine(q, EngineBudget::new(mib(10)).with_floor(mib(11)))
                    .build()
                    .unwrap_err()
            ),
            "engine(query).floor"
        );
        // A limit above the ceiling builds (issue 25: the ceiling may come from the
        // container); it is bounded by the ceiling instead.
        assert!(
            base()
                .engine(q, EngineBudget::new(mib(101)))
                .build()
                .is_ok()
        );
        assert_eq!(
            field_of(
                base()
                    .engine(q, EngineBudget::new(MAX_BYTES + 1))
                    .build()
                    .unwrap_err()
            ),
            "engine(query).limit"
        );
        assert_eq!(
            field_of(
                base()
                    .engine(q, EngineBudget::new(mib(60)).with_floor(mib(60)))
                    .engine(
                        EngineId::Wal,
                        EngineBudget::new(mib(60)).with_floor(mib(41))
                    )
                    .build()
                    .unwrap_err()
            ),
            "floor"
        );
        assert_eq!(
            field_of(
                base()
                    .engine(q, EngineBudget::new(1))
                    .engine(q, EngineBudget::new(2))
                    .build()
                    .unwrap_err()
            ),
            "engine(query)"
        );
        for (w, c, e) in [(70, 70, 95), (85, 70, 95), (70, 85, 101), (0, 85, 95)] {
            let t = PressureThresholds {
                warning_pct: w,
                critical_pct: c,
                emergency_pct: e,
            };
            assert_eq!(
                field_of(
                    base()
                        .engine(q, EngineBudget::new(1))
                        .pressure_thresholds(t)
                        .build()
                        .unwrap_err()
                ),
                "pressure_thresholds"
            );
        }
        assert_eq!(
            field_of(
                base()
                    .engine(q, EngineBudget::new(1))
                    .reservation_shards(0)
                    .build()
                    .unwrap_err()
            ),
            "reservation_shards"
        );
    }

    #[test]
    fn numa_node_ceilings_are_validated() {
        let q = EngineId::Query;
        let base = || {
            GovernorConfig::builder()
                .global_ceiling(mib(100))
                .engine(q, EngineBudget::new(mib(50)))
        };
        let field = |b: GovernorConfigBuilder| field_of(b.build().unwrap_err());
        assert_eq!(
            field(
                base()
                    .numa_node_ceiling(1, mib(10))
                    .numa_node_ceiling(1, mib(10))
            ),
            "numa_node_ceiling(1)"
        );
        assert_eq!(
            field(base().numa_node_ceiling(0, 0)),
            "numa_node_ceiling(0)"
        );
        assert_eq!(
            field(base().numa_node_ceiling(MAX_NUMA_NODES, 1)),
            format!("numa_node_ceiling({MAX_NUMA_NODES})")
        );
        assert_eq!(
            field(
                base()
                    .numa_node_ceiling(0, mib(60))
                    .numa_node_ceiling(1, mib(41))
            ),
            "numa_node_ceiling"
        );
        let config = base()
            .numa_node_ceiling(1, mib(40))
            .numa_node_ceiling(0, mib(60))
            .build()
            .unwrap();
        assert_eq!(config.numa_node_ceilings(), &[(0, mib(60)), (1, mib(40))]);
    }
}
