//! [`StreamLeaf`]: a one-partition plan leaf that yields a stream it was given (in-memory
//! build batches, a spill file being read, the join's own probe input), so that
//! DataFusion's `HashJoinExec` can run on one bucket as on any other input.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;

/// A function that opens the leaf's stream when it is first polled.
type Open = Box<dyn FnOnce() -> Result<SendableRecordBatchStream> + Send>;

/// A leaf whose single partition is a stream handed over once.
pub(crate) struct StreamLeaf {
    stream: Mutex<Option<SendableRecordBatchStream>>,
    properties: Arc<PlanProperties>,
}

impl StreamLeaf {
    /// A leaf yielding `stream`.
    pub(crate) fn new(stream: SendableRecordBatchStream) -> Arc<Self> {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(stream.schema()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Arc::new(Self {
            stream: Mutex::new(Some(stream)),
            properties,
        })
    }

    /// A leaf yielding `batches` (already in memory, already reserved by the join).
    pub(crate) fn batches(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Arc<Self>> {
        Ok(Self::new(Box::pin(MemoryStream::try_new(
            batches, schema, None,
        )?)))
    }

    /// A leaf whose stream is opened by `open` on its first poll, and whether that happened:
    /// until then the input it stands for has not been touched, and the join may still
    /// take another road with it.
    pub(crate) fn lazy(schema: SchemaRef, open: Open) -> (Arc<Self>, Arc<AtomicBool>) {
        let opened = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&opened);
        let inner = futures::stream::once(async move {
            flag.store(true, Ordering::Release);
            open()
        })
        .try_flatten();
        let stream = Box::pin(RecordBatchStreamAdapter::new(schema, inner.boxed()));
        (Self::new(stream), opened)
    }
}

impl fmt::Debug for StreamLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamLeaf")
    }
}

impl DisplayAs for StreamLeaf {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("SpillingHashJoinBucketInput")
    }
}

impl ExecutionPlan for StreamLeaf {
    fn name(&self) -> &'static str {
        "SpillingHashJoinBucketInput"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
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
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "SpillingHashJoinBucketInput has no children".into(),
            ))
        }
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

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "SpillingHashJoinBucketInput has one partition, asked for {partition}"
            )));
        }
        self.stream.lock().take().ok_or_else(|| {
            DataFusionError::Internal("SpillingHashJoinBucketInput executed twice".into())
        })
    }
}
