//! Helpers shared by the SQL tests, the TPC-H test and the `tpch_limits` example: pools to
//! compare, running one query under a timeout with its spill count, and a canonical form of a
//! result so that runs whose output order differs can be compared exactly.

// Each test target uses a different subset of these helpers.
#![allow(dead_code)]

pub mod scenarios;
pub mod tpch;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool, UnboundedMemoryPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::{GovernedMemoryPool, GovernorExt};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor};

/// The pools compared by the tests and the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolKind {
    /// DataFusion's `GreedyMemoryPool` in a `TrackConsumersPool`.
    Greedy,
    /// DataFusion's `FairSpillPool` in a `TrackConsumersPool`.
    Fair,
    /// Our pool on a governor whose Query budget (and ceiling) is the limit.
    Governed,
}

impl PoolKind {
    pub const ALL: [PoolKind; 3] = [PoolKind::Greedy, PoolKind::Fair, PoolKind::Governed];

    pub fn name(self) -> &'static str {
        match self {
            PoolKind::Greedy => "greedy",
            PoolKind::Fair => "fair",
            PoolKind::Governed => "governed",
        }
    }
}

/// A pool of `kind` limited to `limit` bytes (`None`: unbounded), plus its governor if any.
pub fn make_pool(
    kind: PoolKind,
    limit: Option<usize>,
) -> (Arc<dyn MemoryPool>, Option<Arc<MemoryGovernor>>) {
    let top = NonZeroUsize::new(5).unwrap();
    match (kind, limit) {
        (PoolKind::Greedy | PoolKind::Fair, None) => {
            (Arc::new(UnboundedMemoryPool::default()), None)
        }
        (PoolKind::Greedy, Some(l)) => (
            Arc::new(TrackConsumersPool::new(GreedyMemoryPool::new(l), top)),
            None,
        ),
        (PoolKind::Fair, Some(l)) => (
            Arc::new(TrackConsumersPool::new(FairSpillPool::new(l), top)),
            None,
        ),
        (PoolKind::Governed, l) => {
            // "Unbounded" for the governed pool is a budget far above anything the data needs,
            // so the run measures the pool's overhead and not a different policy.
            let l = l.unwrap_or(1 << 40);
            let governor = query_governor(l, l);
            (governor.pool(), Some(governor))
        }
    }
}

/// A governor with only a Query engine: limit `query`, floor `query / 4`, ceiling `ceiling`.
pub fn query_governor(query: usize, ceiling: usize) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(ceiling)
            .engine(
                EngineId::Query,
                EngineBudget::new(query).with_floor(query / 4),
            )
            .build()
            .expect("valid governor config"),
    )
    .expect("governor")
}

/// A session on `pool` with `partitions` target partitions and a small sort reservation (the
/// default 10 MiB per partition would not fit the tight limits the tests use).
pub fn context(
    pool: Arc<dyn MemoryPool>,
    partitions: usize,
    sort_reservation: usize,
) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_sort_spill_reservation_bytes(sort_reservation);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .expect("runtime");
    SessionContext::new_with_config_rt(config, runtime)
}

/// What one query did.
#[derive(Debug)]
pub enum Outcome {
    /// Finished: canonical rows, spills of all operators, wall time.
    Done {
        rows: Vec<OwnedRow>,
        spills: usize,
        elapsed: Duration,
    },
    /// Failed with `ResourcesExhausted` somewhere in its error chain; the message.
    Exhausted(String),
    /// Failed otherwise.
    Failed(String),
    /// Did not finish in time.
    TimedOut,
}

impl Outcome {
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done { .. })
    }
}

/// Runs `sql` on `ctx` with a timeout. The plan is dropped before this returns, so every
/// reservation it made (some live in plan nodes, e.g. a collected hash-join build side) is
/// released by then.
pub async fn run(ctx: &SessionContext, sql: &str, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let work = async {
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        let batches = datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx()).await?;
        let spills = spill_count(plan.as_ref());
        drop(plan);
        Ok::<_, DataFusionError>((batches, spills))
    };
    outcome(tokio::time::timeout(timeout, work).await, start)
}

/// What a run that started at `start` came to: its batches and spill count, its error, or
/// the timeout that ended it.
pub fn outcome(
    ended: Result<Result<(Vec<RecordBatch>, usize), DataFusionError>, tokio::time::error::Elapsed>,
    start: Instant,
) -> Outcome {
    match ended {
        Err(_) => Outcome::TimedOut,
        Ok(Ok((batches, spills))) => Outcome::Done {
            rows: canonical(&batches),
            spills,
            elapsed: start.elapsed(),
        },
        Ok(Err(e)) => {
            if let DataFusionError::ResourcesExhausted(m) = e.find_root() {
                Outcome::Exhausted(format!("{e} -- {m}"))
            } else {
                Outcome::Failed(e.to_string())
            }
        }
    }
}

/// Spills of `plan` and all its children.
pub fn spill_count(plan: &dyn ExecutionPlan) -> usize {
    plan.metrics().and_then(|m| m.spill_count()).unwrap_or(0)
        + plan
            .children()
            .into_iter()
            .map(|c| spill_count(c.as_ref()))
            .sum::<usize>()
}

/// The rows of `batches` in a canonical order (sorted by their row-format bytes), so that two
/// runs of one query compare equal exactly when they returned the same multiset of rows.
pub fn canonical(batches: &[RecordBatch]) -> Vec<OwnedRow> {
    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let fields = first
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields).expect("row converter");
    let mut rows = Vec::new();
    for b in batches {
        let converted = converter.convert_columns(b.columns()).expect("rows");
        rows.extend(converted.iter().map(|r| r.owned()));
    }
    rows.sort_unstable();
    rows
}

/// Asserts the pool and the governor hold nothing after a query.
///
/// A failed query's operator tasks are aborted when its stream is dropped, and tokio drops
/// an aborted task (and the reservations it owns) asynchronously: only once the task is
/// polled again, which for a task blocked in the pool's bounded reclaim wait (up to the
/// pool's `reclaim_wait`, 20 s in some tests) is after that wait ends. The deadline is
/// generous so that a loaded machine cannot fail a query whose books do balance; a leak
/// still fails, only later.
pub async fn assert_books_balanced(pool: &GovernedMemoryPool, governor: &MemoryGovernor) {
    let deadline = Instant::now() + Duration::from_mins(2);
    while (pool.stats().reserved != 0 || governor.reserved(EngineId::Query) != 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        pool.stats().reserved,
        0,
        "pool still holds memory: {:?}",
        pool.consumers()
    );
    assert_eq!(pool.stats().overcommit, 0, "overcommit not paid back");
    assert_eq!(
        governor.reserved(EngineId::Query),
        0,
        "query engine still holds memory"
    );
    assert_eq!(
        governor.global_reserved(),
        0,
        "governor books do not balance"
    );
}

/// One line describing an outcome, for test logs and the benchmark.
pub fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Done {
            rows,
            spills,
            elapsed,
        } => {
            format!("done: {} rows, {spills} spills, {elapsed:.2?}", rows.len())
        }
        Outcome::Exhausted(m) => format!("exhausted: {m}"),
        Outcome::Failed(m) => format!("failed: {m}"),
        Outcome::TimedOut => "timed out".to_owned(),
    }
}
