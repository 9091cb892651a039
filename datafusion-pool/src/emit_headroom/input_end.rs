//! [`AggregateInputEndExec`]: tells a [`HeadroomPool`] when its aggregate's input has ended,
//! and runs that input on the session's own task context.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::ReplaceChildrenOptions;
use datafusion::physical_plan::statistics::{ChildStats, StatisticsArgs};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::Stream;

use super::HANDOFF;
use super::pool::HeadroomPool;

/// What a [`GovernedAggregateExec`](super::GovernedAggregateExec) hands its input's marker
/// for one `execute` call.
pub(super) struct Handoff {
    /// Which input this is for: the address of the input plan, so that a marker of another
    /// aggregate (one nested in this input) does not take it.
    pub(super) plan: usize,
    /// The session's task context, which the input runs on.
    pub(super) context: Arc<TaskContext>,
    /// The aggregate's pool, told when the input ends.
    pub(super) pool: Arc<HeadroomPool>,
}

/// The input of a governed aggregate, unchanged; it tells the aggregate's
/// [`HeadroomPool`] when the input has ended. Transparent in every property.
#[derive(Debug)]
pub(crate) struct AggregateInputEndExec {
    input: Arc<dyn ExecutionPlan>,
}

impl AggregateInputEndExec {
    /// The marker over `input`.
    pub(crate) fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        Self { input }
    }

    /// The input it marks.
    pub(crate) fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }
}

impl DisplayAs for AggregateInputEndExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AggregateInputEndExec")
    }
}

impl ExecutionPlan for AggregateInputEndExec {
    fn name(&self) -> &'static str {
        "AggregateInputEndExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = super::only_child("AggregateInputEndExec", children)?;
        Ok(Arc::new(Self::new(input)))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::execution_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let me = Arc::as_ptr(&self.input).cast::<()>() as usize;
        let handoff = HANDOFF.with(|h| {
            let mut h = h.borrow_mut();
            if h.as_ref().is_some_and(|x| x.plan == me) {
                h.take()
            } else {
                None
            }
        });
        // Run outside a governed aggregate's `execute` (a caller executing the inner
        // aggregate directly), the marker is only a pass-through.
        let Some(Handoff { context, pool, .. }) = handoff else {
            return self.input.execute(partition, context);
        };
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(EndSignal {
            input,
            pool: Some(pool),
        }))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        input_stats.first().cloned().ok_or_else(|| {
            DataFusionError::Internal("AggregateInputEndExec got no input statistics".into())
        })
    }
}

/// The input's stream, telling the pool once it has ended.
struct EndSignal {
    input: SendableRecordBatchStream,
    /// Taken when the end is signalled.
    pool: Option<Arc<HeadroomPool>>,
}

impl Stream for EndSignal {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.input.as_mut().poll_next(cx);
        if let Poll::Ready(None) = next
            && let Some(pool) = self.pool.take()
        {
            pool.input_ended();
        }
        next
    }
}

impl RecordBatchStream for EndSignal {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}
