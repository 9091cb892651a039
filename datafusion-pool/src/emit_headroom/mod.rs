//! [`GovernedAggregateExec`]: an aggregate whose output phase has the memory it needs to
//! finish, because it was set aside while the aggregate read its input.
//!
//! # The failure
//!
//! DataFusion 55's final hash aggregate spills when it is refused memory while it reads its
//! input, but not while it emits: in its `ProducingOutput` state it resizes its reservation
//! to the table after every output batch, and a refused growth there ends the query
//! (`hash_stream.rs`). Emitting first materialises the whole table as one batch, which may
//! be somewhat larger than the table was; in the mixed workload a growth of 77 to 108 KiB
//! was refused at the ceiling and failed a `GROUP BY` that had read all its input.
//!
//! # Why a plan change, not a pool policy
//!
//! The session's pool cannot tell an aggregate that reads (and should spill when refused)
//! from one that emits (and cannot): both call `try_resize` on the same reservation. A pool
//! that granted emitting aggregates an overdraft would have to guess the phase from names
//! and sizes, and an overdraft past the budget breaks the governor's promise that its books
//! never pass a limit. The plan knows the phase exactly: the aggregate's input has ended.
//! So [`GovernedAggregateRule`] wraps every grouped aggregate that emits its whole result at
//! the end (modes `Final`, `FinalPartitioned`, `Single`, `SinglePartitioned`) in a
//! [`GovernedAggregateExec`], which runs DataFusion's own `AggregateExec` unchanged on a
//! [`HeadroomPool`](pool). Every reservation still goes to the session's pool as it is, so
//! the aggregate reads, spills and merges exactly as before; beside it, while the input is
//! read and only when the session's pool has the room, a sixteenth of what the aggregate
//! stream holds is booked as its *emit headroom*. Once the input has ended, a growth of the
//! stream that the session's pool refuses is asked again after the headroom has given back
//! what it needs. An aggregate refused while it reads spills, and then emits through its
//! spill merge, which sizes itself by refusals: its headroom is given back at once and not
//! kept again. Nothing is ever booked beyond what the session's pool granted.
//!
//! A first design booked the stream and its headroom on one reservation and refused a
//! growth whose headroom did not fit, so the aggregate spilled earlier; at tight budgets
//! that made DataFusion's spill merge fail where it had succeeded (measured in
//! `tests/aggregate_headroom.rs`'s setting: 3 of 6 queries failed at 8 and 3 MiB that a
//! plain session finished). A headroom that never costs a refusal keeps every outcome of the
//! plain session and adds only the emit retry.
//!
//! The input's end is seen by an `AggregateInputEndExec` put between the aggregate and its
//! input; it runs the input on the session's own task context, so only the aggregate's own
//! reservations go through the headroom pool.
//!
//! # What it does not promise
//!
//! An output phase that needs more than its headroom (or whose headroom could not be set
//! aside, the session's pool being full while it read) is refused as before, and the query
//! fails with DataFusion's `ResourcesExhausted`. `EXPLAIN ANALYZE` shows the headroom set
//! aside (`peak_emit_headroom`), the growth it paid for (`emitted_from_headroom`) and the
//! growths refused even so (`emit_refusals`).

mod input_end;
mod pool;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::execution::memory_pool::MemoryLimit;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::statistics::{ChildStats, StatisticsArgs};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputDistributionRequirements, PlanProperties,
    displayable,
};

use self::input_end::AggregateInputEndExec;
use self::pool::{HeadroomMetrics, HeadroomPool};

/// The least headroom kept beside an aggregate partition: a 64th of the session's limit,
/// between 16 and 256 KiB (the measured emit growths were 77 to 108 KiB).
fn headroom_floor(limit: &MemoryLimit) -> usize {
    const MIN: usize = 4 * 1024;
    const MAX: usize = 64 * 1024;
    match limit {
        MemoryLimit::Finite(limit) => (*limit / 1024).clamp(MIN, MAX),
        MemoryLimit::Infinite | MemoryLimit::Unknown => MAX,
    }
}

thread_local! {
    /// The hand-off from [`GovernedAggregateExec::execute`] to the
    /// [`AggregateInputEndExec`] of the same plan, which DataFusion's aggregate executes
    /// synchronously on this thread from inside its own `execute`: which plan, and what the
    /// input must run on.
    static HANDOFF: RefCell<Option<input_end::Handoff>> = const { RefCell::new(None) };
}

/// A grouped aggregate that keeps memory aside for its output phase; see the
/// [module documentation](self).
///
/// Put in place by [`GovernedAggregateRule`] (which
/// [`memory_safe_state`](crate::memory_safe_state) installs); its output is exactly its
/// `AggregateExec`'s.
#[derive(Debug)]
pub struct GovernedAggregateExec {
    /// The aggregate, whose input is an [`AggregateInputEndExec`] over `input`.
    aggregate: Arc<AggregateExec>,
    /// The aggregate's real input.
    input: Arc<dyn ExecutionPlan>,
    metrics: ExecutionPlanMetricsSet,
}

impl GovernedAggregateExec {
    /// Stands in for `aggregate`. Refused for an aggregate that does not group or that is
    /// partial (neither emits its whole result at the end).
    pub fn try_new(aggregate: &AggregateExec) -> Result<Self> {
        if !emits_at_the_end(aggregate) {
            return Err(DataFusionError::Plan(format!(
                "GovernedAggregateExec takes a grouped final or single aggregate, not mode {:?}{}",
                aggregate.mode(),
                if aggregate.group_expr().is_true_no_grouping() {
                    " without groups"
                } else {
                    ""
                }
            )));
        }
        // An aggregate taken from another governed one already reads through a marker.
        let input = match aggregate.input().downcast_ref::<AggregateInputEndExec>() {
            Some(end) => Arc::clone(end.input()),
            None => Arc::clone(aggregate.input()),
        };
        let end = Arc::new(AggregateInputEndExec::new(Arc::clone(&input)));
        let aggregate = with_input(aggregate, end)?;
        Ok(Self {
            aggregate,
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The `AggregateExec` it runs (whose input is the marker of its input's end).
    pub fn aggregate(&self) -> &Arc<AggregateExec> {
        &self.aggregate
    }

    /// The task context the aggregate runs on: `context` with its pool replaced by `pool`.
    fn headroom_context(context: &TaskContext, pool: Arc<HeadroomPool>) -> Result<TaskContext> {
        let runtime = RuntimeEnvBuilder::from_runtime_env(&context.runtime_env())
            .with_memory_pool(pool)
            .build_arc()?;
        Ok(TaskContext::new(
            context.task_id(),
            context.session_id(),
            context.session_config().clone(),
            context.scalar_functions().clone(),
            context.higher_order_functions().clone(),
            context.aggregate_functions().clone(),
            context.window_functions().clone(),
            runtime,
        ))
    }
}

/// The one child of a one-child node `name`, or an internal error saying how many came.
fn only_child(name: &str, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
    let [child] = <[_; 1]>::try_from(children).map_err(|c| {
        DataFusionError::Internal(format!("{name} has one child, {} given", c.len()))
    })?;
    Ok(child)
}

/// `aggregate` reading from `input` instead of its own input.
fn with_input(
    aggregate: &AggregateExec,
    input: Arc<dyn ExecutionPlan>,
) -> Result<Arc<AggregateExec>> {
    let plan = Arc::new(aggregate.clone()).replace_children(
        vec![input],
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )?;
    plan.downcast_ref::<AggregateExec>()
        .cloned()
        .map(Arc::new)
        .ok_or_else(|| {
            DataFusionError::Internal("an aggregate with a new input changed type".into())
        })
}

/// Whether `aggregate` groups and emits its whole result once its input has ended.
fn emits_at_the_end(aggregate: &AggregateExec) -> bool {
    matches!(
        aggregate.mode(),
        AggregateMode::Final
            | AggregateMode::FinalPartitioned
            | AggregateMode::Single
            | AggregateMode::SinglePartitioned
    ) && !aggregate.group_expr().is_true_no_grouping()
}

impl DisplayAs for GovernedAggregateExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        if let DisplayFormatType::TreeRender = t {
            return write!(f, "mode={:?}", self.aggregate.mode());
        }
        let inner = displayable(self.aggregate.as_ref()).one_line().to_string();
        let inner = inner.trim_end();
        let rest = inner.strip_prefix("AggregateExec: ").unwrap_or(inner);
        write!(f, "GovernedAggregateExec: {rest}")
    }
}

impl ExecutionPlan for GovernedAggregateExec {
    fn name(&self) -> &'static str {
        "GovernedAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.aggregate.properties()
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.aggregate.input_distribution_requirements()
    }

    fn required_input_ordering(
        &self,
    ) -> Vec<Option<datafusion::physical_expr::OrderingRequirements>> {
        self.aggregate.required_input_ordering()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        self.aggregate.maintains_input_order()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.aggregate.apply_expressions(f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = only_child("GovernedAggregateExec", children)?;
        let aggregate = with_input(&self.aggregate, input)?;
        Ok(Arc::new(Self::try_new(&aggregate)?))
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
        let aggregate = Arc::clone(&self.aggregate).reset_state()?;
        let aggregate = aggregate
            .downcast_ref::<AggregateExec>()
            .ok_or_else(|| DataFusionError::Internal("reset aggregate changed type".into()))?;
        let aggregate = with_input(aggregate, Arc::clone(&self.input))?;
        Ok(Arc::new(Self::try_new(&aggregate)?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        // The pool lives as long as the aggregate's stream: its reservations point at it.
        let pool = HeadroomPool::new(
            context.memory_pool(),
            headroom_floor(&context.memory_pool().memory_limit()),
            HeadroomMetrics::new(&self.metrics, partition),
        );
        let inner = Arc::new(Self::headroom_context(&context, Arc::clone(&pool))?);
        let previous = HANDOFF.with(|h| {
            h.replace(Some(input_end::Handoff {
                plan: Arc::as_ptr(&self.input).cast::<()>() as usize,
                context,
                pool: Arc::clone(&pool),
            }))
        });
        let stream = self.aggregate.execute(partition, inner);
        HANDOFF.with(|h| h.replace(previous));
        stream
    }

    fn metrics(&self) -> Option<MetricsSet> {
        let mut set = self.aggregate.metrics().unwrap_or_default();
        for m in self.metrics.clone_inner().iter() {
            set.push(Arc::clone(m));
        }
        Some(set)
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        self.aggregate.child_stats_requests(partition)
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        self.aggregate.statistics_from_inputs(input_stats, args)
    }
}

/// Wraps every grouped aggregate that emits its whole result at the end in a
/// [`GovernedAggregateExec`]. It must run after every rule that looks for `AggregateExec`
/// (it runs last in [`memory_safe_state`](crate::memory_safe_state)).
#[derive(Debug, Default, Clone, Copy)]
pub struct GovernedAggregateRule;

impl PhysicalOptimizerRule for GovernedAggregateRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &datafusion::common::config::ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            if !emits_at_the_end(aggregate) {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                Arc::new(GovernedAggregateExec::try_new(aggregate)?) as Arc<dyn ExecutionPlan>,
            ))
        })
        .data()
    }

    fn name(&self) -> &'static str {
        "GovernedAggregateRule"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
