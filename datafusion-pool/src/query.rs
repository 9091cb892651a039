//! [`GovernedQuery`]: one DataFusion query as a unit of work the governor may abort.
//!
//! The Query engine borrows other engines' idle floors. When an owner needs its floor back,
//! the governor asks the Query engine to give memory back, but an operator that has gone quiet
//! (a sort whose consumer stopped reading) never calls the pool again, so it is never told to
//! spill, and a hash-join build cannot spill at all. The governor's last resort is to abort a
//! registered unit of work (the `ladder` and `victim` modules of `governor-core`); a
//! `GovernedQuery` makes a query such a unit:
//!
//! ```text
//!   GovernedQuery ── register_work ──▶ MemoryGovernor (a victim candidate: priority, cost)
//!     │ per-query runtime: QueryPool ── delegates every call ──▶ the session's
//!     │   try_grow: fails with MemError::Aborted once aborted        GovernedMemoryPool
//!     │   (as DataFusionError::External)                             (fairness stays shared)
//!     └ GovernedStream ── on abort: drops the plan's stream (its operators and their
//!                         reservations) at once, even if nobody polls it; the next poll
//!                         ends the stream with the Aborted error
//! ```
//!
//! The per-query pool delegates to the session's own pool, so all queries of a session still
//! share one fair [`GovernedMemoryPool`](crate::GovernedMemoryPool) and the Query budget; it
//! adds only the abort check and the count of the query's bytes, which the victim choice
//! weighs. Queries run without a `GovernedQuery` are never aborted: the governor cannot stop
//! what it cannot name, and an owner waiting for its floor then times out with an error that
//! says who borrowed it and which reclaims failed.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, StreamExt};
use governor_core::{EngineId, MemError, WorkHandle, WorkSpec};
use parking_lot::Mutex;

use crate::pool::GovernedMemoryPool;

/// Builds a [`GovernedQuery`]: its label, priority and what redoing it would cost.
#[derive(Debug)]
pub struct GovernedQueryBuilder {
    /// The registration it will make: a unit of the Query engine's work.
    spec: WorkSpec,
}

impl GovernedQueryBuilder {
    /// How important the query is: lower priorities are aborted first (default
    /// [`DEFAULT_PRIORITY`](governor_core::DEFAULT_PRIORITY)).
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.spec = self.spec.priority(priority);
        self
    }

    /// What re-running the query would cost if it were aborted now; without it, the time it
    /// has run stands for the work it would lose.
    #[must_use]
    pub fn redo_cost(mut self, cost: Duration) -> Self {
        self.spec = self.spec.redo_cost(cost);
        self
    }

    /// Registers the query with the governor behind `ctx`'s memory pool.
    ///
    /// # Errors
    /// `DataFusionError::Configuration` when `ctx`'s pool is not a
    /// [`GovernedMemoryPool`] (the governor cannot abort what it does not book).
    pub fn build(self, ctx: &SessionContext) -> Result<GovernedQuery> {
        let base = ctx.runtime_env();
        let Some(governed) = base.memory_pool.downcast_ref::<GovernedMemoryPool>() else {
            return Err(DataFusionError::Configuration(
                "GovernedQuery needs a session whose memory pool is a GovernedMemoryPool \
                 (RuntimeEnvBuilder::new().with_memory_pool(governor.pool()))"
                    .into(),
            ));
        };
        let streams: Arc<Streams> = Arc::default();
        let on_abort = Arc::downgrade(&streams);
        let spec = self.spec.on_abort(move |_err| {
            if let Some(streams) = on_abort.upgrade() {
                streams.drop_all();
            }
        });
        let work = Arc::new(governed.governor().register_work(spec));
        let pool: Arc<dyn MemoryPool> = Arc::new(QueryPool {
            shared: Arc::clone(&base.memory_pool),
            work: Arc::clone(&work),
        });
        let runtime = RuntimeEnvBuilder::from_runtime_env(&base)
            .with_memory_pool(pool)
            .build_arc()?;
        Ok(GovernedQuery {
            work,
            runtime,
            streams,
        })
    }
}

/// One query registered with the governor as a unit of work it may abort to give an engine
/// its lent floor back: the governed way to run a DataFusion query (how it works:
/// `datafusion-pool/src/query.rs`).
///
/// Run the query's plan through [`execute`](Self::execute) (a stream) or
/// [`collect`](Self::collect); the stream ends with `MemError::Aborted` (as
/// `DataFusionError::External`) if the governor aborts the query, and its operators are
/// dropped at that moment, so their memory comes back even while nobody polls the stream.
/// The query stays registered while the `GovernedQuery`, its streams or its operators'
/// reservations live.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use datafusion::execution::runtime_env::RuntimeEnvBuilder;
/// use datafusion::prelude::{SessionConfig, SessionContext};
/// use datafusion_pool::{GovernedQuery, GovernorExt};
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(256))
///         .engine(EngineId::Query, EngineBudget::new(mib(256)))
///         .engine(EngineId::Timeseries, EngineBudget::new(mib(128)).with_floor(mib(128)))
///         .build()?,
/// )?;
/// let runtime = RuntimeEnvBuilder::new().with_memory_pool(governor.pool()).build_arc()?;
/// let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
///
/// let query = GovernedQuery::builder("nightly report")
///     .priority(10)
///     .redo_cost(Duration::from_secs(30))
///     .build(&ctx)?;
/// let rows = tokio::runtime::Runtime::new()?.block_on(async {
///     query.collect(ctx.sql("SELECT 1 + 1 AS two").await?).await
/// })?;
/// assert_eq!(rows[0].num_rows(), 1);
/// // Had the timeseries engine needed its floor back while the query held it, the query's
/// // stream would have ended with `MemError::Aborted` and its memory gone back at once.
/// assert!(query.work().abort_error().is_none());
/// # Ok(())
/// # }
/// ```
pub struct GovernedQuery {
    work: Arc<WorkHandle>,
    runtime: Arc<RuntimeEnv>,
    streams: Arc<Streams>,
}

impl GovernedQuery {
    /// A builder for a query named `label` in errors and logs.
    pub fn builder(label: impl Into<String>) -> GovernedQueryBuilder {
        GovernedQueryBuilder {
            spec: WorkSpec::new(EngineId::Query, label),
        }
    }

    /// The query's registration: its bytes, its abort error, a way to cancel it.
    pub fn work(&self) -> &WorkHandle {
        &self.work
    }

    /// The runtime whose memory pool books for this query (for callers that build their own
    /// `TaskContext`).
    pub fn runtime(&self) -> &Arc<RuntimeEnv> {
        &self.runtime
    }

    /// Plans `df` and runs it under the query's pool; the stream ends with the abort error
    /// if the query is aborted.
    pub async fn execute(&self, df: DataFrame) -> Result<SendableRecordBatchStream> {
        self.work.check().map_err(aborted)?;
        let task = Arc::new(df.task_ctx().with_runtime(Arc::clone(&self.runtime)));
        let plan = df.create_physical_plan().await?;
        let inner = datafusion::physical_plan::execute_stream(plan, task)?;
        let schema = inner.schema();
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                inner: Some(inner),
                waker: None,
            }),
        });
        self.streams.add(&slot);
        // Aborted between the check above and the slot being listed: drop it ourselves.
        if self.work.abort_error().is_some() {
            slot.drop_inner();
        }
        Ok(Box::pin(GovernedStream {
            slot,
            schema,
            work: Arc::clone(&self.work),
            reported: false,
        }))
    }

    /// Runs `df` under the query's pool and collects its batches.
    pub async fn collect(&self, df: DataFrame) -> Result<Vec<RecordBatch>> {
        let mut stream = self.execute(df).await?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch?);
        }
        Ok(batches)
    }
}

impl fmt::Debug for GovernedQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernedQuery")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

/// The abort error as DataFusion carries it.
fn aborted(err: MemError) -> DataFusionError {
    DataFusionError::External(Box::new(err))
}

/// The running streams of one query, so that an abort can drop them.
#[derive(Default)]
struct Streams(Mutex<Vec<Weak<Slot>>>);

impl Streams {
    fn add(&self, slot: &Arc<Slot>) {
        let mut slots = self.0.lock();
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(slot));
    }

    fn drop_all(&self) {
        // Upgrade first, drop the plans outside our lock (dropping runs operators' code).
        let slots: Vec<Arc<Slot>> = self.0.lock().iter().filter_map(Weak::upgrade).collect();
        for slot in slots {
            slot.drop_inner();
        }
    }
}

/// One stream's plan, and who to wake when it is dropped.
struct Slot {
    state: Mutex<SlotState>,
}

struct SlotState {
    inner: Option<SendableRecordBatchStream>,
    waker: Option<Waker>,
}

impl Slot {
    /// Drops the plan's stream (its operators and their reservations) and wakes the reader.
    fn drop_inner(&self) {
        let (inner, waker) = {
            let mut state = self.state.lock();
            (state.inner.take(), state.waker.take())
        };
        drop(inner);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The stream [`GovernedQuery::execute`] returns.
struct GovernedStream {
    slot: Arc<Slot>,
    schema: SchemaRef,
    work: Arc<WorkHandle>,
    reported: bool,
}

impl Stream for GovernedStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(err) = self.work.abort_error() {
            self.slot.drop_inner();
            if self.reported {
                return Poll::Ready(None);
            }
            self.reported = true;
            return Poll::Ready(Some(Err(aborted(err))));
        }
        let mut state = self.slot.state.lock();
        state.waker = Some(cx.waker().clone());
        if let Some(inner) = state.inner.as_mut() {
            inner.poll_next_unpin(cx)
        } else {
            // Dropped by an abort that `abort_error` had not shown yet: poll again to report it.
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

impl RecordBatchStream for GovernedStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

/// The per-query [`MemoryPool`]: the session's pool, plus the abort check and the query's count.
struct QueryPool {
    shared: Arc<dyn MemoryPool>,
    work: Arc<WorkHandle>,
}

impl fmt::Debug for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryPool")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.work.work_ref(), self.shared)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &'static str {
        "governed_query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        // Infallible in DataFusion: the bytes are booked even after an abort (the operator
        // holds them either way); the next `try_grow` or the stream's drop ends the query.
        self.shared.grow(reservation, additional);
        self.work.note_grown(additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.work.note_shrunk(shrink);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        self.work.check().map_err(aborted)?;
        self.shared.try_grow(reservation, additional)?;
        self.work.note_grown(additional);
        Ok(())
    }

    /// The bytes this query's operators hold (the session pool reports all queries').
    fn reserved(&self) -> usize {
        self.work.held()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.shared.memory_limit()
    }
}
