//! [`SpillingHashJoinExec`]: a partitioned hash join that finishes when its build side does
//! not fit the Query budget, by hashing both sides into buckets on disk and joining bucket
//! by bucket with DataFusion's own `HashJoinExec`.
//!
//! DataFusion 55's `HashJoinExec` cannot spill: its build side is one unspillable
//! reservation, and a build that the pool refuses fails the query. This operator stands in
//! for a `HashJoinExec` in `Partitioned` mode (the [`SpillingJoinRule`](crate::SpillingJoinRule)
//! installs it) and runs each output partition like this:
//!
//! ```text
//!  build input ──▶ buffer batches on the join's reservation (2× batch bytes + hash table)
//!      │ all fit ─────────────▶ HashJoinExec(build = the buffered batches, probe = the probe
//!      │                        input as it comes): the in-memory join, nothing spilled
//!      │ refused
//!      ▼
//!  split both sides by hash(keys, seed 0) into 16 bucket files (DataFusion's SpillManager)
//!      │ for each bucket pair:
//!      ├─ build bucket fits ──▶ HashJoinExec(build = bucket in memory, probe = bucket file)
//!      ├─ does not fit, splits ─▶ split both bucket files again with the next seed (depth+1)
//!      └─ one hot key / depth 4 ▶ chunked: join chunks that fit against the other side,
//!                                  streamed again for each chunk
//! ```
//!
//! * **Exact.** Equal keys hash alike, so every match lies within one bucket pair, and every
//!   row is in exactly one bucket: each bucket's join decides a row's fate (matched,
//!   unmatched, marked) as the whole join would. Semantics are DataFusion's own: each
//!   bucket runs a `HashJoinExec` with the original's join type, keys, filter, projection
//!   and `NullEquality` (null keys hash alike, so `NullEqualsNull` rows meet too). The
//!   chunked fallback keeps this per row: for joins whose unmatched or marked rows come
//!   from the build side it chunks the build side; for those that report probe rows it
//!   swaps the sides (`HashJoinExec::swap_inputs`) and chunks the probe side; a full outer
//!   join runs as a left join over build chunks plus the probe rows no build row matches.
//! * **Booked once.** The inner joins run on a [`PrepaidPool`](prepaid) whose every byte is
//!   booked on this operator's one spillable reservation in the session's pool: what was
//!   set aside for a bucket pays for the inner join's own reservation.
//! * **Not taken:** null-aware anti joins (`NOT IN`: one null anywhere decides every row,
//!   which no bucket can see) and joins with a pushed-down `fetch` stay `HashJoinExec`; the
//!   in-memory road builds no dynamic filter for the probe side (the probe input is already
//!   running when a bucket's build is known).
//! * **Cleanup.** Bucket files are DataFusion spill files: dropping the stream (completion,
//!   cancellation, error) drops them, and they are deleted. A disk that cannot take a
//!   bucket fails the query with the disk manager's error, named after this join.
//! * **Metrics** (in `EXPLAIN ANALYZE`): `spill_count`, `spilled_bytes`, `spilled_rows`,
//!   `spill_buckets` (bucket pairs joined from disk), `max_split_depth`, `chunked_rounds`.

mod buckets;
mod compact;
mod leaf;
mod prepaid;
mod run;

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::InputDistributionRequirements;
use datafusion::physical_plan::execution_plan::{
    ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::statistics::{ChildStats, StatisticsArgs};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, displayable,
};

/// A hash join that spills both sides into hash buckets when its build side does not fit
/// the memory pool; see the [module documentation](self).
///
/// Pick it (through [`memory_safe_state`](crate::memory_safe_state)) when queries must
/// finish under a memory budget smaller than their joins' build sides; a join that fits
/// runs as DataFusion's `HashJoinExec` with one extra reservation check per build batch.
#[derive(Debug)]
pub struct SpillingHashJoinExec {
    /// The join it stands for, in `Partitioned` mode: its keys, type, filter, projection and
    /// null handling are what every bucket's join runs with.
    join: Arc<HashJoinExec>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl SpillingHashJoinExec {
    /// Stands in for `join`, which is run in `Partitioned` mode whatever its mode was (the
    /// caller must then let DataFusion partition both inputs by their keys: the rule runs
    /// before `EnsureRequirements` for that). Refused for a null-aware join and one with a
    /// `fetch`, which only `HashJoinExec` runs correctly.
    pub fn try_new(join: &HashJoinExec) -> Result<Self> {
        if join.null_aware {
            return Err(DataFusionError::Plan(
                "SpillingHashJoinExec cannot run a null-aware anti join: a NULL key anywhere \
                 decides every row, which no bucket sees"
                    .into(),
            ));
        }
        if join.fetch().is_some() {
            return Err(DataFusionError::Plan(
                "SpillingHashJoinExec does not take a join with a fetch".into(),
            ));
        }
        let join = Arc::new(
            join.builder()
                .with_partition_mode(PartitionMode::Partitioned)
                .reset_state()
                .build()?,
        );
        // The inner joins do not keep the probe side's order once buckets are read from
        // disk, so no output order is claimed; the partitioning is the join's own (each
        // output partition joins the matching input partitions).
        let join_props = join.properties();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(join.schema()),
            join_props.output_partitioning().clone(),
            EmissionType::Final,
            join_props.boundedness,
        ));
        Ok(Self {
            join,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The `HashJoinExec` it stands for.
    pub fn join(&self) -> &Arc<HashJoinExec> {
        &self.join
    }
}

impl DisplayAs for SpillingHashJoinExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        if let DisplayFormatType::TreeRender = t {
            return write!(f, "join_type={}", self.join.join_type());
        }
        let inner = displayable(self.join.as_ref()).one_line().to_string();
        let inner = inner.trim_end();
        let rest = inner.strip_prefix("HashJoinExec: ").unwrap_or(inner);
        write!(f, "SpillingHashJoinExec: {rest}")
    }
}

impl ExecutionPlan for SpillingHashJoinExec {
    fn name(&self) -> &'static str {
        "SpillingHashJoinExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.join.input_distribution_requirements()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false, false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![self.join.left(), self.join.right()]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.join.apply_expressions(f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let join = self.join.builder().with_new_children(children)?.build()?;
        Ok(Arc::new(Self::try_new(&join)?))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::try_new(&self.join)?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        run::execute(&self.join, partition, context, &self.metrics)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        self.join.child_stats_requests(partition)
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        self.join.statistics_from_inputs(input_stats, args)
    }
}
