//! The main job: the mixed workload on embedded data under one memory governor.
//!
//! `cargo run -p tests --bin mixed_workload -- --help` lists the options; exits 1 when any
//! engine exceeded its budget, RSS passed the ceiling, or any work did not complete, and 2
//! for a bad command line or a run that could not start.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use governor_core::retention::AllocatorRetention;
use tests::runaway::{RunawayConfig, run_runaway};
use tests::workload::{CeilingDrops, WorkloadConfig, run};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Vector search, bulk timeseries ingest and SQL `GROUP BY` at once under one memory
/// governor, on embedded in-process data with a temp dir for spills and segments. Prints each
/// engine's peaks against its limit and the process's RSS against the ceiling.
// Each bool is one independent command-line switch, not states of one machine.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Parser)]
#[command(name = "mixed_workload", version, about)]
struct Cli {
    /// The test-suite sizes (seconds instead of a minute).
    #[arg(long)]
    small: bool,
    /// The same work with budgets too large to matter: the no-governor baseline.
    #[arg(long, conflicts_with_all = ["ceiling", "ceiling_mib"])]
    ungoverned: bool,
    /// Another global ceiling in MiB (engine budgets unchanged).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    ceiling_mib: Option<u32>,
    /// `auto`: 90 % of what the environment allows (the cgroup's limit, v2 or v1, else
    /// physical memory), followed while the run lasts.
    #[arg(long, value_name = "auto", value_parser = ["auto"], conflicts_with = "ceiling_mib")]
    ceiling: Option<String>,
    /// Lower the ceiling to this many MiB at half of the ingest, as a pod resize would.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..))]
    shrink_to_mib: Option<u32>,
    /// With --shrink-to-mib: this many drops spread over the ingest, each but the last undone
    /// after its drain (for drain-time percentiles).
    #[arg(long, value_name = "K", default_value_t = 1, requires = "shrink_to_mib",
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    drops: u16,
    /// No progress report while the run lasts (bars on a terminal, a line every 5 s
    /// otherwise, both on stderr).
    #[arg(long)]
    quiet: bool,
    /// The RSS monitor never reclaims below engines' floors.
    #[arg(long)]
    keep_floors: bool,
    /// How the RSS monitor steers the allocator's retention of freed pages: `follow-pressure`
    /// (the default: returned at once from the Warning level on), `immediate` (always
    /// returned at once) or `untouched` (jemalloc's own decay), to measure what it buys.
    #[arg(long, value_enum, default_value_t = Retention::FollowPressure)]
    retention: Retention,
    /// The RSS monitor's sampling interval in milliseconds.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    monitor_ms: Option<u64>,
    /// Print the final metrics in the Prometheus text format.
    #[arg(long)]
    prometheus: bool,
    /// Write the full report (configuration, peaks, counts, failures, the sampled timeline)
    /// as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Draw the run's timeline (each engine's reserved and allocated bytes and limit, RSS,
    /// the ceiling, pressure changes and reclaims) as SVG to this file.
    #[arg(long, value_name = "PATH")]
    svg: Option<PathBuf>,
    /// Another scenario instead of the mixed workload.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// With `--scenario runaway`: never abort the runaway query (the comparison run).
    #[arg(long, requires = "scenario")]
    no_abort: bool,
}

/// The allocator retention policies the command line offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Retention {
    /// Freed pages go back at once from the Warning pressure level on.
    FollowPressure,
    /// Freed pages always go back at once.
    Immediate,
    /// jemalloc's own decay (10 s unless `MALLOC_CONF` says otherwise).
    Untouched,
}

impl Retention {
    fn policy(self) -> AllocatorRetention {
        match self {
            Self::FollowPressure => AllocatorRetention::default(),
            Self::Immediate => AllocatorRetention::Fixed(std::time::Duration::ZERO),
            Self::Untouched => AllocatorRetention::Untouched,
        }
    }
}

/// The scenarios besides the mixed workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// An unspillable query that would starve ingest of its floor, aborted for it (or, with
    /// --no-abort, not).
    Runaway,
    /// TPC-H borrowing idle engines' floors, then giving them back when they wake, against
    /// DataFusion's pools sized to the Query floor and to the whole ceiling (--small: test
    /// size).
    Borrow,
}

impl Cli {
    fn config(&self) -> WorkloadConfig {
        let mut config = if self.small {
            WorkloadConfig::small()
        } else {
            WorkloadConfig::demo()
        };
        if self.ungoverned {
            config = config.ungoverned();
        }
        config.shed_below_floors = !self.keep_floors;
        config.retention = self.retention.policy();
        config.progress = !self.quiet;
        if let Some(ms) = self.monitor_ms {
            config.monitor_interval = std::time::Duration::from_millis(ms);
        }
        if let Some(mib) = self.ceiling_mib {
            config.ceiling = governor_core::mib(mib as usize);
        }
        if self.ceiling.is_some() {
            config.ceiling_from_environment = Some(0.9);
        }
        if let Some(mib) = self.shrink_to_mib {
            config.drops = Some(CeilingDrops {
                to: governor_core::mib(mib as usize),
                count: usize::from(self.drops),
            });
        }
        config
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Denials are normal here (the cache evicts, DataFusion spills): they are `warn` events,
    // shown with RUST_LOG=warn.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    if cli.scenario == Some(Scenario::Runaway) {
        return runaway(!cli.no_abort, cli.prometheus).await;
    }
    if cli.scenario == Some(Scenario::Borrow) {
        let config = if cli.small {
            tests::borrow::BorrowConfig::small()
        } else {
            tests::borrow::BorrowConfig::demo()
        };
        println!("running the borrowing scenario: {config:?}");
        return match tests::borrow::run_borrow(config).await {
            Ok(report) => {
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("borrowing scenario could not start: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = cli.config();
    println!("running the mixed workload: {config:?}");
    match run(config).await {
        Ok(report) => {
            print!("{}", report.summary());
            if cli.prometheus {
                print!("{}", report.prometheus);
            }
            if let Some(path) = &cli.svg
                && let Err(e) = tests::picture::write_svg(&report, path)
            {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            if let Some(path) = &cli.json {
                let text = report.to_json().to_string();
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("cannot write the JSON report to {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mixed workload could not start: {e}");
            ExitCode::from(2)
        }
    }
}

/// The runaway scenario (see `tests::runaway`).
async fn runaway(aborts: bool, prometheus: bool) -> ExitCode {
    let config = RunawayConfig::small(aborts);
    println!("running the runaway scenario: {config:?}");
    match run_runaway(config).await {
        Ok(report) => {
            print!("{}", report.summary());
            if prometheus {
                print!("{}", report.prometheus);
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("runaway scenario could not start: {e}");
            ExitCode::from(2)
        }
    }
}
