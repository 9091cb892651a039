//! Issue 18's evidence: a Timeseries floor lent to a DataFusion query that will not give it
//! back (a sort gone quiet, an unspillable hash-join build). Ingest then needs its floor: the
//! query is aborted with `MemError::Aborted` (as a DataFusion error), ingest completes, a
//! second query within its share completes, and the Query engine returns to 0 bytes. Without
//! a registered query the ingest fails with an error that shows the lending and the reclaims.
//!
//! Waits are on conditions with generous deadlines; nothing asserts how fast anything ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::DataFusionError;
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::{GovernedQuery, GovernorExt};
use futures::StreamExt;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReclaimError, Reclaimer, mib,
};

/// Long enough that only a wedged governor or a hung plan can miss it.
const DEADLINE: Duration = Duration::from_mins(2);
const CEILING: usize = mib(64);
const TS_FLOOR: usize = mib(52);
/// Rows of each big table: 1M rows of two Int64 columns, 16 MiB of Arrow data.
const ROWS: i64 = 1_000_000;
const BATCH: i64 = 8192;

fn governor() -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(CEILING)
            .reclaim_timeout(Duration::from_millis(200))
            .abort_after(Duration::from_millis(100))
            .engine(
                EngineId::Timeseries,
                EngineBudget::new(TS_FLOOR).with_floor(TS_FLOOR),
            )
            .engine(EngineId::Query, EngineBudget::new(CEILING))
            .build()
            .expect("valid config"),
    )
    .expect("governor")
}

fn table(rows: i64, salt: i64) -> Arc<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < rows {
        let end = (start + BATCH).min(rows);
        let k: Vec<i64> = (start..end).collect();
        let v: Vec<i64> = k.iter().map(|k| (k * 7_919 + salt) % 1_000_003).collect();
        batches.push(
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(k)), Arc::new(Int64Array::from(v))],
            )
            .expect("valid batch"),
        );
        start = end;
    }
    Arc::new(MemTable::try_new(schema, vec![batches]).expect("table"))
}

fn context(governor: &Arc<MemoryGovernor>) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(governor.pool())
        .build_arc()
        .expect("runtime");
    let mut config = SessionConfig::new().with_target_partitions(1);
    // DataFusion's default 10 MiB merge reservation per sort would blur the figures.
    config.options_mut().execution.sort_spill_reservation_bytes = 256 * 1024;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    ctx.register_table("t", table(ROWS, 1)).expect("t");
    ctx.register_table("u", table(ROWS, 2)).expect("u");
    ctx.register_table("small", table(20_000, 3))
        .expect("small");
    ctx
}

/// A borrower's reclaimer that cannot reach the quiet operator: it answers and frees nothing.
struct Quiet(AtomicUsize);

#[async_trait]
impl Reclaimer for Quiet {
    fn reclaimable(&self) -> usize {
        0
    }

    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        self.0.fetch_add(1, Ordering::AcqRel);
        Ok(0)
    }
}

fn mem_error(err: &DataFusionError) -> Option<&MemError> {
    match err.find_root() {
        DataFusionError::External(inner) => inner.downcast_ref::<MemError>(),
        _ => None,
    }
}

/// Polls `stream` for its first batch, after which the query goes quiet: its operators keep
/// what they hold and never call the pool again until polled.
async fn first_batch(stream: &mut SendableRecordBatchStream) {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the first batch came")
        .expect("a batch")
        .expect("no error");
}

/// Waits until the Query engine holds nothing. Dropping a plan's stream drops its operators
/// at once, but operators that run in tasks of their own (a sort's buffered per-batch
/// streams) are dropped when the runtime processes their cancellation, a moment later.
async fn query_back_to_zero(g: &MemoryGovernor) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while g.reserved(EngineId::Query) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the Query engine still holds {} bytes",
            g.reserved(EngineId::Query)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The scenario with a registered query running `sql`.
async fn floor_comes_back_by_abort(sql: &str) {
    let g = governor();
    let ctx = context(&g);
    let _reclaimer = g.register_reclaimer(EngineId::Query, Arc::new(Quiet(AtomicUsize::new(0))));

    let big = GovernedQuery::builder("quiet borrower")
        .priority(10)
        .build(&ctx)
        .expect("governed session");
    let mut big_stream = big.execute(ctx.sql(sql).await.unwrap()).await.unwrap();
    first_batch(&mut big_stream).await;
    let held = g.reserved(EngineId::Query);
    assert!(
        held > CEILING - TS_FLOOR,
        "the query must borrow the timeseries floor for this test to mean anything; it holds {held}"
    );
    assert_eq!(big.work().held(), held);

    // A second query within its share, also registered, also holding memory.
    let small = GovernedQuery::builder("small report")
        .priority(10)
        .build(&ctx)
        .unwrap();
    let mut small_stream = small
        .execute(ctx.sql("SELECT k, v FROM small ORDER BY v").await.unwrap())
        .await
        .unwrap();
    first_batch(&mut small_stream).await;

    // Ingest needs its floor.
    let ingest = tokio::time::timeout(
        DEADLINE,
        g.reserve(EngineId::Timeseries, TS_FLOOR, DEADLINE),
    )
    .await
    .expect("the ladder returned")
    .expect("ingest got its floor");
    assert_eq!(ingest.size(), TS_FLOOR);

    // The big query was the victim: it frees enough alone; the small one does not.
    let err = big.work().abort_error().expect("the big query was aborted");
    let MemError::Aborted {
        requester, story, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*requester, Some(EngineId::Timeseries));
    let choice = story.as_ref().unwrap().victim.as_ref().unwrap();
    assert!(choice.frees_enough(), "{choice}");
    assert_eq!(choice.candidates, 2, "{choice}");
    assert!(small.work().abort_error().is_none());

    // Its stream ends with the abort error, as a DataFusion error.
    let next = tokio::time::timeout(DEADLINE, big_stream.next())
        .await
        .expect("the aborted stream answered")
        .expect("an item");
    let df_err = next.unwrap_err();
    assert!(
        matches!(mem_error(&df_err), Some(MemError::Aborted { .. })),
        "{df_err}"
    );
    assert!(df_err.to_string().contains("quiet borrower"), "{df_err}");
    println!("the aborted query's error: {df_err}");
    assert!(
        big_stream.next().await.is_none(),
        "the stream ends after the error"
    );
    // Further work under the aborted query fails at once.
    assert!(
        big.collect(ctx.sql("SELECT 1").await.unwrap())
            .await
            .is_err()
    );

    // The second query completes.
    let mut rows = 0;
    while let Some(batch) = tokio::time::timeout(DEADLINE, small_stream.next())
        .await
        .expect("the small query progressed")
    {
        rows += batch.expect("the small query is not aborted").num_rows();
    }
    assert!(rows > 0);
    drop(small_stream);
    drop(big_stream);
    drop(ingest);
    query_back_to_zero(&g).await;
    assert_eq!(g.snapshot().engine(EngineId::Query).unwrap().aborts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_sort_is_aborted_so_ingest_gets_its_floor() {
    floor_comes_back_by_abort("SELECT k, v FROM t ORDER BY v").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unspillable_join_build_is_aborted_so_ingest_gets_its_floor() {
    floor_comes_back_by_abort("SELECT t.k, u.v FROM t JOIN u ON t.k = u.k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registered_query_ingest_fails_with_the_lending_and_reclaims() {
    let g = governor();
    let ctx = context(&g);
    let quiet = Arc::new(Quiet(AtomicUsize::new(0)));
    let _reclaimer = g.register_reclaimer(EngineId::Query, Arc::clone(&quiet) as _);
    let mut stream = ctx
        .sql("SELECT k, v FROM t ORDER BY v")
        .await
        .unwrap()
        .execute_stream()
        .await
        .unwrap();
    first_batch(&mut stream).await;
    let held = g.reserved(EngineId::Query);
    assert!(held > CEILING - TS_FLOOR, "holds {held}");

    // Meant to time out; long enough that its reclaim plans answer on a loaded machine, as
    // the message must list them.
    let err = g
        .reserve(EngineId::Timeseries, TS_FLOOR, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(matches!(err, MemError::Timeout { .. }), "{err:?}");
    let text = err.to_string();
    println!("the ingest's error: {text}");
    assert!(text.contains("entitled to its floor"), "{text}");
    assert!(text.contains("borrowed: query"), "{text}");
    assert!(
        text.contains("from the idle floors of timeseries"),
        "{text}"
    );
    assert!(text.contains("reclaims tried: query asked for"), "{text}");
    assert!(text.contains("no unit of work is registered"), "{text}");
    assert!(quiet.0.load(Ordering::Acquire) > 0);
    // Nothing was taken from the query: it still completes.
    while let Some(batch) = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the query progressed")
    {
        batch.expect("not aborted");
    }
    drop(stream);
    query_back_to_zero(&g).await;
}
