//! The runaway scenario (issue 18): an unspillable query borrows the timeseries engine's idle
//! floor, and then ingest needs it.
//!
//! The query is a hash join whose build side cannot spill, read by a slow client, so it holds
//! what it built for as long as the client takes. Once it holds part of the timeseries floor,
//! a bulk ingest starts. With aborts on, the query runs as a
//! [`datafusion_pool::GovernedQuery`]: ingest's entitled request aborts it and
//! gets its floor back after one bounded wait; the query is lost (the summary shows the abort
//! and the governor's story). With aborts off the same query runs unregistered: ingest stalls
//! (each append waits, is throttled and retried) until the query finishes on its own. The
//! summary gives the per-batch ingest stall (p50, p99, max) and the work completed in each.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::{GovernedQuery, GovernorExt};
use futures::StreamExt;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, human_bytes, mib};
use timeseries_adapter::{FileSegmentFlusher, Point, SeriesId, TimeseriesAdapter};

/// Sizes of one runaway run.
#[derive(Clone, Debug)]
pub struct RunawayConfig {
    /// Global ceiling.
    pub ceiling: usize,
    /// The timeseries engine's limit, all of it floor.
    pub timeseries_floor: usize,
    /// Rows of each side of the join (two Int64 columns each).
    pub join_rows: i64,
    /// How long the slow client waits between two result batches.
    pub client_delay: Duration,
    /// Series ingested.
    pub series: usize,
    /// Points per series.
    pub points_per_series: usize,
    /// Points per append call.
    pub batch: usize,
    /// The timeseries engine's disk, in bytes per second: a slow or shared disk, so that
    /// flushing cannot make room as fast as ingest fills it.
    pub flush_rate: u64,
    /// Whether the query runs as a `GovernedQuery` the governor may abort.
    pub aborts: bool,
}

impl RunawayConfig {
    /// The sizes the binary runs: a 32 MiB ceiling, a 16 MiB timeseries floor flushed to a
    /// 1 MiB/s disk, a join that builds about 27 MiB (so it holds most of that floor), and
    /// about 12 MiB of incompressible points to ingest (debug builds on two cores).
    pub fn small(aborts: bool) -> Self {
        Self {
            ceiling: mib(32),
            timeseries_floor: mib(16),
            join_rows: 1_800_000,
            client_delay: Duration::from_millis(20),
            series: 100,
            points_per_series: 15_000,
            batch: 500,
            flush_rate: 1 << 20,
            aborts,
        }
    }
}

/// How the runaway query ended.
#[derive(Clone, Debug)]
pub enum QueryOutcome {
    /// It returned all its rows.
    Completed {
        /// Rows returned.
        rows: usize,
    },
    /// The governor aborted it; the error's text.
    Aborted(String),
    /// It failed otherwise.
    Failed(String),
}

/// What a runaway run did.
#[derive(Clone, Debug)]
pub struct RunawayReport {
    /// The run's sizes.
    pub config: RunawayConfig,
    /// Bytes the query held when ingest started.
    pub query_held: usize,
    /// Per append batch: from its first attempt until all its points were stored.
    pub stalls: Vec<Duration>,
    /// Points stored.
    pub points_ingested: usize,
    /// From the first append until the last point was stored.
    pub ingest_elapsed: Duration,
    /// Appends throttled (and retried).
    pub throttles: usize,
    /// How the query ended.
    pub query: QueryOutcome,
    /// Units the governor aborted.
    pub aborts: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Prometheus text of the final snapshot.
    pub prometheus: String,
}

impl RunawayReport {
    /// The `q`-quantile (0..=1) of the ingest stalls.
    pub fn stall_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.stalls.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }

    /// True when all points were ingested, and with aborts on, the query was aborted.
    pub fn passed(&self) -> bool {
        let all = self.config.series * self.config.points_per_series;
        self.points_ingested == all
            && match &self.query {
                QueryOutcome::Aborted(_) => self.config.aborts,
                QueryOutcome::Completed { .. } => !self.config.aborts,
                QueryOutcome::Failed(_) => false,
            }
    }

    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "runaway scenario (aborts {}) in {:.1?}: the unspillable join held {} of the {} ceiling when ingest began (timeseries floor {})\n",
            if self.config.aborts { "on" } else { "off" },
            self.elapsed,
            human_bytes(self.query_held),
            human_bytes(self.config.ceiling),
            human_bytes(self.config.timeseries_floor),
        );
        let _ = writeln!(
            s,
            "ingest: {} points in {:.1?} ({:.0} points/s), {} batches, {} throttles retried; stall per batch p50 {:.1?}, p99 {:.1?}, max {:.1?}",
            self.points_ingested,
            self.ingest_elapsed,
            self.points_ingested as f64 / self.ingest_elapsed.as_secs_f64().max(1e-9),
            self.stalls.len(),
            self.throttles,
            self.stall_quantile(0.5),
            self.stall_quantile(0.99),
            self.stall_quantile(1.0),
        );
        match &self.query {
            QueryOutcome::Completed { rows } => {
                let _ = writeln!(s, "query: completed, {rows} rows");
            }
            QueryOutcome::Aborted(why) => {
                let _ = writeln!(s, "query: aborted ({} abort): {why}", self.aborts);
            }
            QueryOutcome::Failed(why) => {
                let _ = writeln!(s, "query: FAILED: {why}");
            }
        }
        s += if self.passed() { "PASS\n" } else { "FAIL\n" };
        s
    }
}

fn table(rows: i64, salt: i64) -> Result<Arc<MemTable>, String> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let mut batches = Vec::new();
    for start in (0..rows).step_by(8_192) {
        let end = (start + 8_192).min(rows);
        let k: Int64Array = (start..end).collect();
        let v: Int64Array = (start..end)
            .map(|k| (k * 7_919 + salt) % 1_000_003)
            .collect();
        batches.push(
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(k), Arc::new(v)])
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(Arc::new(
        MemTable::try_new(schema, vec![batches]).map_err(|e| e.to_string())?,
    ))
}

/// Runs the scenario; `Err` only for set-up failures.
pub async fn run_runaway(config: RunawayConfig) -> Result<RunawayReport, String> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(config.ceiling)
            .abort_after(Duration::from_millis(100))
            .engine(
                EngineId::Timeseries,
                EngineBudget::new(config.timeseries_floor).with_floor(config.timeseries_floor),
            )
            .engine(EngineId::Query, EngineBudget::new(config.ceiling))
            .build()
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;

    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(governor.pool())
        .build_arc()
        .map_err(|e| e.to_string())?;
    let ctx =
        SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(1), runtime);
    ctx.register_table("b", table(config.join_rows, 1)?)
        .map_err(|e| e.to_string())?;
    ctx.register_table("p", table(config.join_rows, 2)?)
        .map_err(|e| e.to_string())?;
    let df = ctx
        .sql("SELECT b.k, p.v FROM b JOIN p ON b.k = p.k")
        .await
        .map_err(|e| e.to_string())?;
    let governed = if config.aborts {
        Some(
            GovernedQuery::builder("runaway join")
                .build(&ctx)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let mut stream = match &governed {
        Some(query) => query.execute(df).await,
        None => df.execute_stream().await,
    }
    .map_err(|e| e.to_string())?;
    // The first batch: the build side is complete and held from here on.
    let mut rows = match stream.next().await {
        Some(Ok(batch)) => batch.num_rows(),
        Some(Err(e)) => return Err(format!("the join failed before ingest began: {e}")),
        None => 0,
    };
    let query_held = governor.reserved(EngineId::Query);
    let delay = config.client_delay;
    let query = tokio::spawn(async move {
        // The slow client: one batch per `delay`.
        loop {
            tokio::time::sleep(delay).await;
            match stream.next().await {
                Some(Ok(batch)) => rows += batch.num_rows(),
                Some(Err(e)) => {
                    let aborted = e.find_root().to_string().contains("was aborted");
                    return if aborted {
                        QueryOutcome::Aborted(e.to_string())
                    } else {
                        QueryOutcome::Failed(e.to_string())
                    };
                }
                None => return QueryOutcome::Completed { rows },
            }
        }
    });

    let flusher = FileSegmentFlusher::new(dir.path().join("ts"))
        .map_err(|e| format!("segments: {e}"))?
        .rate_limit(config.flush_rate);
    let adapter = TimeseriesAdapter::builder(Arc::clone(&governor))
        .flusher(Arc::new(flusher))
        .open()
        .await
        .map_err(|e| e.to_string())?;
    let mut stalls = Vec::new();
    let ingest_started = Instant::now();
    let mut ingested = 0;
    let mut throttles = 0;
    for start in (0..config.points_per_series).step_by(config.batch) {
        let end = (start + config.batch).min(config.points_per_series);
        for series in 0..config.series {
            let batch: Vec<Point> = (start..end)
                .map(|i| {
                    // Random values: Gorilla cannot compress them, so ingest needs memory.
                    let bits = crate::workload::mix((series * 1_000_003 + i) as u64) >> 11;
                    Point::new(
                        1_700_000_000_000 + i as i64 * 1_000,
                        bits as f64 / (1u64 << 53) as f64,
                    )
                })
                .collect();
            let mut rest: &[Point] = &batch;
            let t0 = Instant::now();
            while !rest.is_empty() {
                match adapter.append(SeriesId(series as u64), rest).await {
                    Ok(()) => {
                        ingested += rest.len();
                        rest = &[];
                    }
                    Err(e @ timeseries_adapter::IngestError::Throttled { .. }) => {
                        throttles += 1;
                        ingested += e.accepted();
                        rest = &rest[e.accepted()..];
                    }
                    Err(e) => return Err(format!("ingest: {e}")),
                }
            }
            stalls.push(t0.elapsed());
        }
    }
    let ingest_elapsed = ingest_started.elapsed();
    let query = query
        .await
        .unwrap_or_else(|e| QueryOutcome::Failed(format!("the client task failed: {e}")));
    let snapshot = governor.snapshot();
    Ok(RunawayReport {
        config,
        query_held,
        stalls,
        points_ingested: ingested,
        ingest_elapsed,
        throttles,
        query,
        aborts: snapshot.engines.iter().map(|e| e.aborts).sum(),
        elapsed: started.elapsed(),
        prometheus: snapshot.to_prometheus(),
    })
}
