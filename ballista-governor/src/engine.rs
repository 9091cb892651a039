//! The execution engine of a governed executor: Ballista's own engine (or the user's), with
//! every query stage passing the [`AdmissionGate`] before it runs and its spills counted.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ballista_core::JobId;
use ballista_core::serde::protobuf::{
    RuntimeStatsReport, ShuffleWritePartition, TaskColumnStats, WindowStateReport,
};
use ballista_executor::execution_engine::{
    DefaultExecutionEngine, ExecutionEngine, QueryStageExecutor,
};
use datafusion::error::Result;
use datafusion::execution::context::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::prelude::SessionConfig;

use crate::admission::AdmissionGate;
use crate::client_pool::ShuffleClientPool;
use crate::meter::TaskMeter;

/// Wraps an execution engine so that its stages are admitted by pressure (when there is a
/// gate) and metered.
pub(crate) struct GatedEngine {
    inner: Arc<dyn ExecutionEngine>,
    gate: Option<Arc<AdmissionGate>>,
    meter: Arc<TaskMeter>,
}

impl GatedEngine {
    /// Gates `inner`: the user's `override_execution_engine`, or Ballista's default engine
    /// with a shuffle-client pool whose idle connections live `client_ttl` seconds (none for
    /// 0), as `start_executor_process` builds it when no engine is given.
    pub(crate) fn new(
        inner: Option<Arc<dyn ExecutionEngine>>,
        client_ttl: u64,
        gate: Option<Arc<AdmissionGate>>,
        meter: Arc<TaskMeter>,
    ) -> Self {
        let inner = inner.unwrap_or_else(|| {
            if client_ttl == 0 {
                Arc::new(DefaultExecutionEngine::new())
            } else {
                Arc::new(DefaultExecutionEngine::with_client_pool(Arc::new(
                    ShuffleClientPool::new(Duration::from_secs(client_ttl)),
                )))
            }
        });
        Self { inner, gate, meter }
    }
}

impl ExecutionEngine for GatedEngine {
    fn create_query_stage_exec(
        &self,
        job_id: JobId,
        stage_id: usize,
        task_id: usize,
        global_output_partition_ids: Vec<usize>,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> Result<Arc<dyn QueryStageExecutor>> {
        let inner = self.inner.create_query_stage_exec(
            job_id,
            stage_id,
            task_id,
            global_output_partition_ids,
            plan,
            work_dir,
            config,
        )?;
        Ok(Arc::new(GatedStage {
            inner,
            gate: self.gate.clone(),
            meter: Arc::clone(&self.meter),
        }))
    }
}

/// One query stage that waits at the gate before it executes.
struct GatedStage {
    inner: Arc<dyn QueryStageExecutor>,
    gate: Option<Arc<AdmissionGate>>,
    meter: Arc<TaskMeter>,
}

impl fmt::Debug for GatedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for GatedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

#[async_trait]
impl QueryStageExecutor for GatedStage {
    async fn execute_query_stage(
        &self,
        task_id: usize,
        context: Arc<TaskContext>,
    ) -> Result<Vec<ShuffleWritePartition>> {
        // The task holds its vcore slot while it waits, so the executor asks the scheduler
        // for less work: the only back-pressure Ballista's protocol offers today.
        if let Some(gate) = &self.gate {
            let admitted = gate.admit().await;
            tracing::debug!(task_id, ?admitted, "task admitted");
        }
        let result = self.inner.execute_query_stage(task_id, context).await;
        self.meter
            .record(result.is_ok(), &self.inner.collect_plan_metrics());
        result
    }

    fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
        self.inner.collect_plan_metrics()
    }

    fn collect_runtime_stats_reports(&self) -> Vec<RuntimeStatsReport> {
        self.inner.collect_runtime_stats_reports()
    }

    fn collect_window_state_reports(&self) -> Result<Vec<WindowStateReport>> {
        self.inner.collect_window_state_reports()
    }

    fn collect_column_stats(&self) -> Vec<TaskColumnStats> {
        self.inner.collect_column_stats()
    }
}
