//! The main job: the mixed workload on embedded data under one memory governor.
//!
//! `cargo run -p tests --bin mixed_workload [-- --small] [-- --prometheus]`; exits non-zero
//! when any engine exceeded its budget, RSS passed the ceiling, or any work did not complete.

use tests::runaway::{RunawayConfig, run_runaway};
use tests::workload::{WorkloadConfig, run};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Denials are normal here (the cache evicts, DataFusion spills): they are `warn` events,
    // shown with RUST_LOG=warn.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "mixed_workload [--small] [--ungoverned] [--ceiling-mib N | --ceiling auto] [--shrink-to-mib N [--drops K]] [--keep-floors] [--monitor-ms N] [--prometheus]\n  \
             --small          the test-suite sizes\n  \
             --ungoverned     the same work with budgets too large to matter (the no-governor baseline)\n  \
             --ceiling-mib N  a different global ceiling (engine budgets unchanged)\n  \
             --ceiling auto   the ceiling is 90% of what the environment allows (cgroup v2/v1 limit, else physical memory)\n  \
             --shrink-to-mib N  lower the ceiling to N MiB at half of the ingest, as a pod resize would\n  \
             --drops K        with --shrink-to-mib: K drops spread over the ingest (each but the last undone after its drain), for drain-time percentiles\n  \
             --keep-floors    the RSS monitor never reclaims below engines' floors\n  \
             --monitor-ms N   the RSS monitor's sampling interval (default 100)\n  \
             --prometheus     print the final metrics\n  \
             --scenario runaway [--no-abort]  an unspillable query that would starve ingest of its\n                   \
             floor, aborted for it (or, with --no-abort, not)"
        );
        return std::process::ExitCode::SUCCESS;
    }
    if let Some(i) = args.iter().position(|a| a == "--scenario") {
        return match args.get(i + 1).map(String::as_str) {
            Some("runaway") => {
                let aborts = !args.iter().any(|a| a == "--no-abort");
                runaway(aborts, args.iter().any(|a| a == "--prometheus")).await
            }
            other => {
                eprintln!("unknown scenario {other:?}; the one there is: runaway");
                std::process::ExitCode::from(2)
            }
        };
    }
    let mut config = if args.iter().any(|a| a == "--small") {
        WorkloadConfig::small()
    } else {
        WorkloadConfig::demo()
    };
    if args.iter().any(|a| a == "--ungoverned") {
        config = config.ungoverned();
    }
    if args.iter().any(|a| a == "--keep-floors") {
        config.shed_below_floors = false;
    }
    if let Some(i) = args.iter().position(|a| a == "--monitor-ms") {
        match args.get(i + 1).and_then(|n| n.parse::<u64>().ok()) {
            Some(n) if n > 0 => config.monitor_interval = std::time::Duration::from_millis(n),
            _ => {
                eprintln!("--monitor-ms needs a positive number of milliseconds");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--ceiling-mib") {
        match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => config.ceiling = governor_core::mib(n),
            _ => {
                eprintln!("--ceiling-mib needs a positive number of MiB");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--ceiling") {
        match args.get(i + 1).map(String::as_str) {
            Some("auto") => config.ceiling_from_environment = Some(0.9),
            _ => {
                eprintln!("--ceiling takes `auto` (use --ceiling-mib N for a number)");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if let Some(i) = args.iter().position(|a| a == "--shrink-to-mib") {
        let count = match args.iter().position(|a| a == "--drops") {
            Some(j) => match args.get(j + 1).and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if (1..=1000).contains(&n) => n,
                _ => {
                    eprintln!("--drops needs a number of drops from 1 to 1000");
                    return std::process::ExitCode::from(2);
                }
            },
            None => 1,
        };
        match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n > 0 => {
                config.drops = Some(tests::workload::CeilingDrops {
                    to: governor_core::mib(n),
                    count,
                });
            }
            _ => {
                eprintln!("--shrink-to-mib needs a positive number of MiB");
                return std::process::ExitCode::from(2);
            }
        }
    }
    println!("running the mixed workload: {config:?}");
    match run(config).await {
        Ok(report) => {
            print!("{}", report.summary());
            if args.iter().any(|a| a == "--prometheus") {
                print!("{}", report.prometheus);
            }
            if report.passed() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("mixed workload could not start: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The runaway scenario (see `tests::runaway`).
async fn runaway(aborts: bool, prometheus: bool) -> std::process::ExitCode {
    let config = RunawayConfig::small(aborts);
    println!("running the runaway scenario: {config:?}");
    match run_runaway(config).await {
        Ok(report) => {
            print!("{}", report.summary());
            if prometheus {
                print!("{}", report.prometheus);
            }
            if report.passed() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("runaway scenario could not start: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
