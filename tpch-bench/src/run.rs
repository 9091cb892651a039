//! `run`: the 22 queries under one engine and memory limit, in this process.
//!
//! The result file `<out>/<config>.json` is rewritten after every query, so a run that dies
//! (or gives up on a query that does not stop, see the crate doc) leaves what it had; started
//! again with the same arguments it resumes after the last recorded query. Each completed
//! query's rows go to `<out>/<config>.rows/qNN.json` (see [`crate::canon`]) for `report` to
//! compare with the unbounded run.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use datafusion::arrow::array::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool, UnboundedMemoryPool,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use datafusion_pool::{GovernorExt, memory_safe_state};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor};
use serde_json::{Value, json};

use crate::canon;
use crate::generate::{TABLES, table_dir};

/// The query file `datafusion-pool`'s tests and examples run, read by DuckDB's side as well.
const QUERIES: &str = include_str!("../../datafusion-pool/tpch/queries.sql");

#[path = "../../datafusion-pool/tpch/queries.rs"]
mod query_file;

/// The 22 queries as `(number, sql)`, in order.
pub fn queries() -> Result<Vec<(usize, String)>, String> {
    let out = query_file::parse_queries(QUERIES);
    if out.len() == 22 && out.iter().enumerate().all(|(i, (n, _))| *n == i + 1) {
        Ok(out)
    } else {
        Err("datafusion-pool/tpch/queries.sql must hold Q1..Q22 in order".to_owned())
    }
}

/// The DataFusion configurations a `run` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// DataFusion's `UnboundedMemoryPool`: the reference every result is checked against.
    Unbounded,
    /// DataFusion's `GreedyMemoryPool` (in a `TrackConsumersPool`, as DataFusion's own
    /// `with_memory_limit` builds it).
    Greedy,
    /// DataFusion's `FairSpillPool` (in a `TrackConsumersPool`).
    Fair,
    /// The governed pool in a plain `SessionContext::new_with_config_rt`.
    Governed,
    /// The governed pool in `SessionContext::new_with_state(memory_safe_state(..))`.
    GovernedSafe,
}

impl Engine {
    /// The name used in file names and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Unbounded => "unbounded",
            Engine::Greedy => "greedy",
            Engine::Fair => "fair",
            Engine::Governed => "governed",
            Engine::GovernedSafe => "governed-safe",
        }
    }
}

/// The arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Directory of the Parquet files (written by `gen`).
    #[arg(long)]
    pub data: PathBuf,
    /// The pool and session to measure.
    #[arg(long, value_enum)]
    pub engine: Engine,
    /// Memory limit, e.g. `64M` or `1G` (K, M, G, T: powers of 1024). Not for `unbounded`.
    #[arg(long)]
    pub limit: Option<String>,
    /// Target partitions, and the tokio runtime's worker threads.
    #[arg(long, default_value_t = 2)]
    pub partitions: usize,
    /// Seconds a query may run before it is aborted and recorded as a timeout.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Seconds an aborted query gets to stop; after that this process records what it has
    /// and exits with status 3 (run it again to resume after that query).
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Only these queries, e.g. `1,3,18` (default: all 22).
    #[arg(long, value_delimiter = ',')]
    pub queries: Vec<usize>,
    /// Directory of the results.
    #[arg(long)]
    pub out: PathBuf,
}

/// A byte count from `64M`-style text: a positive number and one of K, M, G, T (powers of
/// 1024), the units both this tool and `scripts/tpch_duckdb.py` accept.
pub fn parse_limit(text: &str) -> Result<usize, String> {
    let bad = || format!("bad limit {text:?}: want a positive number and K, M, G or T, e.g. 64M");
    let t = text.trim();
    let Some((at, unit)) = t.char_indices().next_back() else {
        return Err(bad());
    };
    let number = &t[..at];
    let scale: f64 = match unit {
        'K' | 'k' => 1024.0,
        'M' | 'm' => 1024.0 * 1024.0,
        'G' | 'g' => 1024.0 * 1024.0 * 1024.0,
        'T' | 't' => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    let bytes = n * scale;
    if !(n.is_finite() && n > 0.0 && bytes >= 1024.0 * 1024.0 && bytes < 2f64.powi(50)) {
        return Err(format!("{}; between 1M and 1024T", bad()));
    }
    Ok(bytes as usize)
}

/// A `kB` field of `/proc/self/status` (`VmHWM`, `VmRSS`), in bytes; 0 where unavailable.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The process's peak resident set (`VmHWM`), in bytes; 0 where /proc is unavailable.
pub fn peak_rss() -> u64 {
    status_bytes("VmHWM")
}

/// The configuration's name: `unbounded`, or `<engine>-<limit>`.
fn config_name(engine: Engine, limit: Option<&str>) -> String {
    match limit {
        None => engine.name().to_owned(),
        Some(l) => format!("{}-{l}", engine.name()),
    }
}

/// A governor with only a Query engine: limit and ceiling `limit`, floor `limit / 4`, as
/// `datafusion-pool`'s tests build it (`tests/common/mod.rs`, `query_governor`).
fn query_governor(limit: usize) -> Result<Arc<MemoryGovernor>, String> {
    let config = GovernorConfig::builder()
        .global_ceiling(limit)
        .engine(
            EngineId::Query,
            EngineBudget::new(limit).with_floor(limit / 4),
        )
        .build()
        .map_err(|e| format!("governor config: {e}"))?;
    MemoryGovernor::new(config).map_err(|e| format!("governor: {e}"))
}

/// The session for `engine` at `limit`, spilling into `spill`; plus the governor, which must
/// live as long as the session.
fn session(
    engine: Engine,
    limit: Option<usize>,
    partitions: usize,
    spill: &Path,
) -> Result<(SessionContext, Option<Arc<MemoryGovernor>>), String> {
    let top = NonZeroUsize::new(5).expect("5 is not zero");
    let mut governor = None;
    let pool: Arc<dyn MemoryPool> = match (engine, limit) {
        (Engine::Unbounded, None) => Arc::new(UnboundedMemoryPool::default()),
        (Engine::Unbounded, Some(_)) => return Err("unbounded takes no --limit".to_owned()),
        (_, None) => return Err(format!("{} needs --limit", engine.name())),
        (Engine::Greedy, Some(l)) => {
            Arc::new(TrackConsumersPool::new(GreedyMemoryPool::new(l), top))
        }
        (Engine::Fair, Some(l)) => Arc::new(TrackConsumersPool::new(FairSpillPool::new(l), top)),
        (Engine::Governed | Engine::GovernedSafe, Some(l)) => {
            let g = query_governor(l)?;
            let pool = g.pool();
            governor = Some(g);
            pool
        }
    };
    let runtime: Arc<RuntimeEnv> = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_temp_file_path(spill)
        .build_arc()
        .map_err(|e| format!("runtime: {e}"))?;
    let config = SessionConfig::new().with_target_partitions(partitions);
    let ctx = if engine == Engine::GovernedSafe {
        SessionContext::new_with_state(memory_safe_state(config, runtime))
    } else {
        SessionContext::new_with_config_rt(config, runtime)
    };
    Ok((ctx, governor))
}

/// What the query task sends the waiting main thread.
enum Msg {
    /// The query's result and its wall time (planning included).
    Done(Result<Vec<RecordBatch>, DataFusionError>, Duration),
    /// The task has ended (completed, failed or aborted): its plan and reservations are gone.
    Ended,
}

/// Sends [`Msg::Ended`] when the query task is dropped, however it ends.
struct EndGuard(Sender<Msg>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Ended);
    }
}

/// One query's record in the result file.
fn record(q: usize, status: &str, ms: f64, rows: Option<usize>, error: Option<&str>) -> Value {
    let error = error.map(|e| {
        let mut e = e.replace('\n', " ");
        if e.len() > 600 {
            let mut cut = 600;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
            e.push('…');
        }
        e
    });
    json!({ "q": q, "status": status, "ms": ms, "rows": rows, "error": error })
}

/// The result file's state.
struct Results {
    /// Where it is written.
    path: PathBuf,
    /// Everything but the queries and the peak.
    header: Value,
    /// One record per query run so far, in order.
    queries: Vec<Value>,
    /// The highest peak RSS of earlier (resumed) processes of this configuration.
    earlier_peak: u64,
}

impl Results {
    /// Writes the file (through a temporary file, so a reader never sees half of it).
    fn write(&self, complete: bool) -> Result<(), String> {
        let mut v = self.header.clone();
        v["queries"] = Value::Array(self.queries.clone());
        v["peak_rss_bytes"] = json!(self.earlier_peak.max(peak_rss()));
        v["complete"] = json!(complete);
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

/// Runs the configuration `args` names; see the module doc.
pub fn run(args: &RunArgs) -> Result<ExitCode, String> {
    let all = queries()?;
    for q in &args.queries {
        if !(1..=22).contains(q) {
            return Err(format!("--queries: no query {q} (1..=22)"));
        }
    }
    if args.partitions == 0 || args.partitions > 256 {
        return Err("--partitions must be in 1..=256".to_owned());
    }
    if args.timeout == 0 {
        return Err("--timeout must be at least 1 second".to_owned());
    }
    let limit = args.limit.as_deref().map(parse_limit).transpose()?;
    for t in TABLES {
        let d = table_dir(&args.data, t);
        if !d.is_dir() {
            return Err(format!(
                "no table {t} in {} (run `tpch-bench gen --dir {}` first)",
                args.data.display(),
                args.data.display()
            ));
        }
    }
    let sf = std::fs::read_to_string(args.data.join(".tpch-complete"))
        .ok()
        .and_then(|m| m.trim().strip_prefix("sf=").map(str::to_owned))
        .ok_or_else(|| {
            format!(
                "{} holds no complete data set (run `gen`)",
                args.data.display()
            )
        })?;

    let name = config_name(args.engine, args.limit.as_deref());
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    let rows_dir = args.out.join(format!("{name}.rows"));
    std::fs::create_dir_all(&rows_dir)
        .map_err(|e| format!("creating {}: {e}", rows_dir.display()))?;
    // Spill files under the output directory, as DuckDB's temp_directory, on the same disk.
    let spill = args.out.join("spill").join(&name);
    std::fs::create_dir_all(&spill).map_err(|e| format!("creating {}: {e}", spill.display()))?;

    let mut results = Results {
        path: args.out.join(format!("{name}.json")),
        header: json!({
            "config": name,
            "engine": args.engine.name(),
            "limit": args.limit,
            "limit_bytes": limit,
            "partitions": args.partitions,
            "sf": sf,
            "timeout_s": args.timeout,
        }),
        queries: Vec::new(),
        earlier_peak: 0,
    };
    // Resume: keep what an earlier process of this configuration recorded.
    if let Ok(text) = std::fs::read_to_string(&results.path) {
        let old: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a result file: {e}", results.path.display()))?;
        if old["complete"] == json!(true) && old["partitions"] == json!(args.partitions) {
            println!("{name}: already complete in {}", results.path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if old["partitions"] == json!(args.partitions) && old["sf"] == json!(sf) {
            results.queries = old["queries"].as_array().cloned().unwrap_or_default();
            results.earlier_peak = old["peak_rss_bytes"].as_u64().unwrap_or(0);
        }
    }
    let done: Vec<u64> = results
        .queries
        .iter()
        .filter_map(|r| r["q"].as_u64())
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.partitions)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let (ctx, _governor) = session(args.engine, limit, args.partitions, &spill)?;
    rt.block_on(async {
        for t in TABLES {
            let dir = table_dir(&args.data, t);
            ctx.register_parquet(
                t,
                dir.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await
            .map_err(|e| format!("registering {}: {e}", dir.display()))?;
        }
        Ok::<_, String>(())
    })?;

    // What the process holds before the first query (runtime, allocator, table metadata).
    results.header["rss_at_start_bytes"] = json!(status_bytes("VmRSS"));
    let timeout = Duration::from_secs(args.timeout);
    let grace = Duration::from_secs(args.grace);
    for (q, sql) in all {
        if (!args.queries.is_empty() && !args.queries.contains(&q)) || done.contains(&(q as u64)) {
            continue;
        }
        let (tx, rx) = mpsc::channel();
        let task_ctx = ctx.clone();
        let handle = rt.spawn(async move {
            let _ended = EndGuard(tx.clone());
            let start = Instant::now();
            let result = async { task_ctx.sql(&sql).await?.collect().await }.await;
            let _ = tx.send(Msg::Done(result, start.elapsed()));
        });
        let rec = match rx.recv_timeout(timeout) {
            Ok(Msg::Done(Ok(batches), elapsed)) => {
                let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
                let file = rows_dir.join(format!("q{q:02}.json"));
                canon::write_rows(&batches, &file)?;
                record(q, "ok", elapsed.as_secs_f64() * 1e3, Some(n), None)
            }
            Ok(Msg::Done(Err(e), elapsed)) => {
                let status = if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) {
                    "oom"
                } else {
                    "error"
                };
                record(
                    q,
                    status,
                    elapsed.as_secs_f64() * 1e3,
                    None,
                    Some(&e.to_string()),
                )
            }
            // The task ended without a result: it panicked.
            Ok(Msg::Ended) | Err(RecvTimeoutError::Disconnected) => {
                record(q, "error", 0.0, None, Some("the query task panicked"))
            }
            Err(RecvTimeoutError::Timeout) => {
                handle.abort();
                let stopped = wait_ended(&rx, grace);
                results.queries.push(record(
                    q,
                    "timeout",
                    timeout.as_secs_f64() * 1e3,
                    None,
                    Some(&format!("no result in {}s", args.timeout)),
                ));
                if !stopped {
                    results.write(false)?;
                    eprintln!(
                        "{name}: Q{q} did not stop within {}s of its abort; exiting, run again to resume",
                        args.grace
                    );
                    // The stuck worker would block the runtime's shutdown: leave without it.
                    std::process::exit(3);
                }
                results.write(false)?;
                println!("{name}: Q{q} timeout");
                continue;
            }
        };
        // Wait for the task's end, so its plan has released every reservation before the
        // next query starts.
        wait_ended(&rx, grace);
        println!(
            "{name}: Q{q} {} {:.0} ms",
            rec["status"].as_str().unwrap_or("?"),
            rec["ms"].as_f64().unwrap_or(0.0)
        );
        results.queries.push(rec);
        results.write(false)?;
    }
    results.write(true)?;
    let _ = std::fs::remove_dir_all(&spill);
    rt.shutdown_timeout(grace);
    Ok(ExitCode::SUCCESS)
}

/// Waits up to `grace` for the task's [`Msg::Ended`]; whether it came.
fn wait_ended(rx: &mpsc::Receiver<Msg>, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Ended) | Err(RecvTimeoutError::Disconnected) => return true,
            Ok(Msg::Done(..)) => {}
            Err(RecvTimeoutError::Timeout) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_or_say_why() {
        assert_eq!(parse_limit("64M"), Ok(64 << 20));
        assert_eq!(parse_limit("1G"), Ok(1 << 30));
        assert_eq!(parse_limit("1.5G"), Ok(3 << 29));
        for bad in [
            "", "M", "64µ", "64", "64MiB", "-1G", "0M", "100K", "NaNG", "infG",
        ] {
            assert!(parse_limit(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_query_file_holds_22_queries() {
        assert_eq!(queries().map(|q| q.len()), Ok(22));
    }
}
