//! `governed-executor`: a drop-in for Ballista's `ballista-executor` whose tasks run on one
//! governed pool under a memory governor (see the `ballista-governor` crate docs).
//!
//! Besides Ballista's essential flags it takes the governor's: a ceiling (bytes, or a
//! fraction of the container's or host's memory, followed live), the Query engine's limit and
//! floor, and budgets of co-located engines. `--metrics-port` serves the governor's
//! Prometheus text. On exit it prints one `governor:` line with the peaks, for scripts.
//! `--ballista-pool-size` runs Ballista's own per-vcore `FairSpillPool` instead (the baseline
//! of `BENCHMARKS.md`), with the governor only watching. `--config FILE` reads flags from a
//! file, one `name = value` (or a bare `name`) a line, `#` comments; flags given on the
//! command line win.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_governor::{AdmissionOptions, TaskMeter, governed_executor_with, metered_executor};
use clap::{Parser, ValueEnum};
use governor_core::{
    ContainerProbe, ContainerWatchConfig, EngineBudget, EngineId, GovernorConfig, MemError,
    MemoryGovernor, human_bytes,
};
use tokio::io::AsyncWriteExt;

/// A Ballista executor on a memory governor.
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// Read flags from this file first: `name = value` lines (`ceiling = 2G`,
    /// `engine = vector=1G/256M`), `#` comments; the command line wins.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Scheduler host.
    #[arg(long, default_value = "localhost")]
    scheduler_host: String,
    /// Scheduler port.
    #[arg(long, default_value_t = 50050)]
    scheduler_port: u16,
    /// Local IP address to bind to.
    #[arg(long, default_value = "0.0.0.0")]
    bind_host: String,
    /// Host name or IP address to register with the scheduler (needed when the scheduler
    /// cannot see the peer address, as with Ballista's standalone scheduler).
    #[arg(long)]
    external_host: Option<String>,
    /// Executor id (a fresh UUID by default).
    #[arg(long = "id")]
    executor_id: Option<String>,
    /// Arrow Flight (shuffle) port.
    #[arg(short = 'p', long, default_value_t = 50051)]
    bind_port: u16,
    /// gRPC port (push scheduling).
    #[arg(long, default_value_t = 50052)]
    bind_grpc_port: u16,
    /// Directory for shuffle files and spills (a folder under the temp dir by default).
    #[arg(long)]
    work_dir: Option<String>,
    /// Task slots advertised to the scheduler (0: the number of CPUs).
    #[arg(long, default_value_t = 0)]
    vcores: usize,
    /// Must match the scheduler's policy.
    #[arg(short = 's', long, value_enum, default_value_t = Policy::PullStaged)]
    task_scheduling_policy: Policy,

    /// The governor's ceiling, e.g. `512M`, `2G` (default: a fraction of the container's or
    /// the host's memory, followed live).
    #[arg(long, value_parser = parse_size)]
    ceiling: Option<usize>,
    /// The fraction of the container's (or host's) memory used as the ceiling when
    /// `--ceiling` is not given.
    #[arg(long, default_value_t = 0.9)]
    ceiling_fraction: f64,
    /// The Query engine's limit (default: the ceiling).
    #[arg(long, value_parser = parse_size)]
    query_limit: Option<usize>,
    /// The Query engine's floor.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    query_floor: usize,
    /// A co-located engine's budget, `ENGINE=LIMIT[/FLOOR]` (e.g. `vector=1G/256M`);
    /// repeatable. Engines: vector, sparse, crdt, timeseries, wal, bridge.
    #[arg(long = "engine", value_parser = parse_engine)]
    engines: Vec<(EngineId, EngineBudget)>,
    /// What a task must be able to reserve before it starts.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    min_working_set: usize,
    /// The longest a task waits for that, in seconds, before it runs anyway.
    #[arg(long, default_value_t = 30)]
    admission_wait_secs: u64,
    /// Serve the governor's Prometheus text on this port (`GET /metrics`).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Baseline: run Ballista's own per-vcore FairSpillPool of this total size instead of
    /// the governed pool (the governor then sees nothing of the queries).
    #[arg(long, value_parser = parse_size)]
    ballista_pool_size: Option<usize>,
}

/// Ballista's scheduling policies (its own type parses only with Ballista's CLI feature).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    /// The executor polls the scheduler for tasks.
    PullStaged,
    /// The scheduler pushes tasks to the executor.
    PushStaged,
}

/// A byte size: digits with an optional `K`, `M`, `G` or `T` (binary units, optional `i`/`B`).
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a size like 512M or 2G"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches('B')
        .trim_end_matches('I')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: unknown unit (use K, M, G or T)")),
    };
    number
        .checked_mul(1_usize << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// `ENGINE=LIMIT[/FLOOR]`.
fn parse_engine(text: &str) -> Result<(EngineId, EngineBudget), String> {
    let (name, budget) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected ENGINE=LIMIT[/FLOOR]"))?;
    let engine = EngineId::ALL
        .into_iter()
        .find(|e| e.name().eq_ignore_ascii_case(name.trim()))
        .ok_or_else(|| format!("{name:?}: unknown engine"))?;
    if engine == EngineId::Query {
        return Err("use --query-limit and --query-floor for the Query engine".into());
    }
    let (limit, floor) = match budget.split_once('/') {
        Some((limit, floor)) => (parse_size(limit)?, parse_size(floor)?),
        None => (parse_size(budget)?, 0),
    };
    Ok((engine, EngineBudget::new(limit).with_floor(floor)))
}

/// The governor the flags describe, and whether its ceiling follows the container.
fn build_governor(args: &Args) -> Result<(Arc<MemoryGovernor>, bool), MemError> {
    let base = || match args.ceiling {
        Some(bytes) => Ok(GovernorConfig::builder().global_ceiling(bytes)),
        None => GovernorConfig::builder().ceiling_from_environment(args.ceiling_fraction),
    };
    // The Query limit defaults to the ceiling, which may come from the environment: learn it
    // from a first build with the ceiling and a placeholder budget (a config needs one).
    let ceiling = base()?
        .engine(EngineId::Query, EngineBudget::new(1))
        .build()?
        .ceiling();
    let query = args.query_limit.unwrap_or(ceiling);
    let mut builder = base()?.engine(
        EngineId::Query,
        EngineBudget::new(query).with_floor(args.query_floor),
    );
    for (engine, budget) in &args.engines {
        builder = builder.engine(*engine, *budget);
    }
    Ok((
        MemoryGovernor::new(builder.build()?)?,
        args.ceiling.is_none(),
    ))
}

/// Answers every connection on `port` with the governor's Prometheus text.
async fn serve_metrics(port: u16, governor: Arc<MemoryGovernor>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut socket, _) = listener.accept().await?;
        let body = governor.snapshot().to_prometheus();
        tokio::spawn(async move {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            // A scraper that hangs up early only loses its own answer.
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// One line for scripts: the governor's peaks and the tasks' spills.
fn summary(governor: &MemoryGovernor, tasks: &TaskMeter) -> String {
    let snapshot = governor.snapshot();
    let query = snapshot.engine(EngineId::Query);
    let tasks = tasks.stats();
    format!(
        "governor: query_peak={} query_limit={} global_peak={} ceiling={} tasks={} failed_tasks={} spills={} spilled_bytes={}",
        query.map_or(0, |q| q.peak),
        query.map_or(0, |q| q.limit),
        snapshot.global_peak,
        snapshot.ceiling,
        tasks.tasks,
        tasks.failed,
        tasks.spills,
        tasks.spilled_bytes,
    )
}

async fn run(args: Args) -> Result<(), String> {
    let (governor, follows) = build_governor(&args).map_err(|e| e.to_string())?;
    // The live ceiling: re-read the container's limit and follow it.
    let _watch = if follows {
        Some(
            governor
                .follow_container(ContainerProbe::new(), ContainerWatchConfig::default())
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let mut config = ExecutorProcessConfig {
        scheduler_host: args.scheduler_host.clone(),
        scheduler_port: args.scheduler_port,
        bind_host: args.bind_host.clone(),
        external_host: args.external_host.clone(),
        port: args.bind_port,
        grpc_port: args.bind_grpc_port,
        work_dir: args.work_dir.clone(),
        vcores: args.vcores,
        task_scheduling_policy: match args.task_scheduling_policy {
            Policy::PullStaged => TaskSchedulingPolicy::PullStaged,
            Policy::PushStaged => TaskSchedulingPolicy::PushStaged,
        },
        ..ExecutorProcessConfig::default()
    };
    if let Some(id) = &args.executor_id {
        config.executor_id.clone_from(id);
    }
    let (config, tasks) = if let Some(bytes) = args.ballista_pool_size {
        eprintln!(
            "baseline: Ballista's per-vcore FairSpillPool of {} in total",
            human_bytes(bytes)
        );
        config.memory_pool_size = Some(bytes as u64);
        metered_executor(config)
    } else {
        let options = AdmissionOptions::default()
            .min_working_set(args.min_working_set)
            .max_wait(Duration::from_secs(args.admission_wait_secs));
        let (config, governed) = governed_executor_with(config, Arc::clone(&governor), options)
            .map_err(|e| e.to_string())?;
        (config, governed.tasks)
    };
    eprintln!(
        "governed-executor {}: ceiling {}, Query limit {}, work dir {:?}",
        config.executor_id,
        human_bytes(governor.ceiling()),
        human_bytes(governor.limit(EngineId::Query)),
        config.work_dir
    );
    if let Some(port) = args.metrics_port {
        let governor = Arc::clone(&governor);
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(port, governor).await {
                eprintln!("metrics endpoint stopped: {e}");
            }
        });
    }
    let result = start_executor_process(Arc::new(config)).await;
    println!("{}", summary(&governor, &tasks));
    result.map_err(|e| e.to_string())
}

/// The flags of the `--config` file at `path`, as command-line arguments.
fn config_file_args(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let mut args = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (line, None),
        };
        if name.is_empty()
            || name == "config"
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "{}:{}: not a flag name: {name:?}",
                path.display(),
                n + 1
            ));
        }
        args.push(format!("--{}", name.replace('_', "-")));
        args.extend(value.map(str::to_owned));
    }
    Ok(args)
}

/// The command line with the `--config` file's flags put first, so that the command line's own
/// flags override them.
fn arguments() -> Result<Vec<String>, String> {
    let cli: Vec<String> = std::env::args().collect();
    let mut config = None;
    for (i, arg) in cli.iter().enumerate() {
        if let Some(path) = arg.strip_prefix("--config=") {
            config = Some(path.to_owned());
        } else if arg == "--config" {
            config = cli.get(i + 1).cloned();
        }
    }
    let Some(path) = config else {
        return Ok(cli);
    };
    let mut args = vec![cli.first().cloned().unwrap_or_default()];
    args.extend(config_file_args(std::path::Path::new(&path))?);
    args.extend(cli.into_iter().skip(1));
    Ok(args)
}

fn main() -> ExitCode {
    let args = match arguments() {
        Ok(args) => Args::parse_from(args),
        Err(e) => {
            eprintln!("governed-executor: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match ballista_governor::cli::block_on_main("governed-executor", run(args)) {
        Some(()) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_engines_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        let (engine, budget) = parse_engine("vector=1G/256M").unwrap();
        assert_eq!(engine, EngineId::Vector);
        assert_eq!((budget.limit(), budget.floor()), (1 << 30, 256 << 20));
        assert!(parse_engine("query=1G").is_err());
        assert!(parse_engine("nope=1G").is_err());
    }

    #[test]
    fn a_config_file_gives_flags_that_the_command_line_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executor.conf");
        std::fs::write(
            &path,
            "# governor\nceiling = 2G\nquery_limit = 1G  # the rest for others\nengine = vector=512M/128M\n",
        )
        .unwrap();
        let mut argv = vec!["governed-executor".to_owned()];
        argv.extend(config_file_args(&path).unwrap());
        argv.extend(["--query-limit".to_owned(), "512M".to_owned()]);
        let args = Args::try_parse_from(argv).unwrap();
        assert_eq!(args.ceiling, Some(2 << 30));
        assert_eq!(args.query_limit, Some(512 << 20));
        assert_eq!(args.engines.len(), 1);

        std::fs::write(&path, "../etc = 1\n").unwrap();
        assert!(
            config_file_args(&path)
                .unwrap_err()
                .contains("not a flag name")
        );
        assert!(config_file_args(&dir.path().join("missing")).is_err());
    }
}
