//! [`memory_safe_state`]: a DataFusion session whose queries finish inside the memory pool
//! they are given, by spilling where DataFusion 55's own operators cannot.
//!
//! Two changes make it, both from one call:
//! * the [`SpillingJoinRule`] physical optimizer rule puts a
//!   [`SpillingHashJoinExec`](crate::SpillingHashJoinExec) in place of every hash join it can
//!   run exactly (all but null-aware anti joins and joins with a pushed-down fetch), so a
//!   build side the pool refuses is split into buckets on disk instead of failing the query;
//! * the [`GovernedAggregateRule`] runs every grouped final aggregate as a
//!   [`GovernedAggregateExec`](crate::GovernedAggregateExec), which sets memory aside while
//!   it reads for the output phase DataFusion 55 cannot spill in;
//! * the session's memory settings (sort merge reservations, repartition spill files) are
//!   fitted to the pool's budget and the partition count.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::SessionState;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::prelude::SessionConfig;

use crate::emit_headroom::GovernedAggregateRule;
use crate::safe_config::budget_aware_config;
use crate::spilling_join::SpillingHashJoinExec;

/// The name of the rule [`SpillingJoinRule`] must run before: the one that inserts the
/// repartitioning (and sorts) that operators' input requirements ask for.
const ENSURE_REQUIREMENTS: &str = "EnsureRequirements";

/// A session state on `runtime` whose hash joins spill and whose memory settings fit the
/// runtime's pool: `SessionContext::new_with_state(memory_safe_state(config, runtime))`,
/// with `runtime` built on `governor.pool()`, is the whole change for a user.
///
/// The state has DataFusion's default features and optimizer rules, with
/// [`SpillingJoinRule`] run just before `EnsureRequirements`, and `config`'s memory settings
/// adjusted to the pool's budget (a setting the caller changed from DataFusion's default
/// is kept).
///
/// ```
/// use datafusion::execution::runtime_env::RuntimeEnvBuilder;
/// use datafusion::prelude::{SessionConfig, SessionContext};
/// use datafusion_pool::{GovernorExt, memory_safe_state};
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(64))
///         .engine(EngineId::Query, EngineBudget::new(mib(64)))
///         .build()?,
/// )?;
/// let runtime = RuntimeEnvBuilder::new().with_memory_pool(governor.pool()).build_arc()?;
/// let ctx = SessionContext::new_with_state(memory_safe_state(SessionConfig::new(), runtime));
/// let rows = tokio::runtime::Runtime::new()?.block_on(async {
///     ctx.sql(
///         "SELECT count(*) FROM (SELECT unnest(range(0, 1000)) AS a) l \
///          JOIN (SELECT unnest(range(0, 1000)) AS b) r ON l.a = r.b",
///     )
///     .await?
///     .collect()
///     .await
/// })?;
/// assert_eq!(rows[0].num_rows(), 1);
/// # Ok(())
/// # }
/// ```
pub fn memory_safe_state(config: SessionConfig, runtime: Arc<RuntimeEnv>) -> SessionState {
    let config = budget_aware_config(config, &runtime.memory_pool);
    SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rules(memory_safe_rules())
        .build()
}

/// DataFusion's default physical optimizer rules with [`SpillingJoinRule`] before
/// `EnsureRequirements` (at the start if a future DataFusion renames that rule, where it
/// still runs before any partitioning is decided) and [`GovernedAggregateRule`] after all.
fn memory_safe_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::new().rules;
    let at = rules
        .iter()
        .position(|r| r.name() == ENSURE_REQUIREMENTS)
        .unwrap_or(0);
    rules.insert(at, Arc::new(SpillingJoinRule));
    // Last: every DataFusion rule that looks for an `AggregateExec` has run.
    rules.push(Arc::new(GovernedAggregateRule));
    rules
}

/// Replaces each `HashJoinExec` that [`SpillingHashJoinExec`] runs exactly by one, in
/// `Partitioned` mode.
///
/// It must run after `JoinSelection` (which picks build sides and modes from statistics)
/// and before `EnsureRequirements`, which then partitions both inputs of each spilling join
/// by its keys. A `CollectLeft` join whose build side the statistics show to be small
/// (DataFusion's `hash_join_single_partition_threshold`, which the budget-aware settings
/// bound) is left as it is: it fits, and one shared build beats a repartitioned probe side.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpillingJoinRule;

impl PhysicalOptimizerRule for SpillingJoinRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let threshold = config.optimizer.hash_join_single_partition_threshold;
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if join.null_aware || join.fetch().is_some() {
                return Ok(Transformed::no(node));
            }
            if *join.partition_mode() == PartitionMode::CollectLeft
                && build_is_small(join, threshold)
            {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                Arc::new(SpillingHashJoinExec::try_new(join)?) as Arc<dyn ExecutionPlan>,
            ))
        })
        .data()
    }

    fn name(&self) -> &'static str {
        "SpillingJoinRule"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether statistics bound `join`'s build side below `threshold` bytes.
fn build_is_small(join: &HashJoinExec, threshold: usize) -> bool {
    #[expect(
        deprecated,
        reason = "the statistics context needs a session; this is a bound"
    )]
    let stats = join.left().partition_statistics(None);
    stats
        .ok()
        .and_then(|s| s.total_byte_size.get_value().copied())
        .is_some_and(|bytes| bytes <= threshold)
}
