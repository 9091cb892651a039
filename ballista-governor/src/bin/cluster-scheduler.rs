//! `cluster-scheduler`: a Ballista scheduler over the `ballista-scheduler` library, for
//! `scripts/run-cluster.sh`. Pull-based by default (the policy `governed-executor` defaults
//! to); the scheduler process is not governed.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use clap::{Parser, ValueEnum};

/// A Ballista scheduler.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Local IP address to bind to.
    #[arg(long, default_value = "127.0.0.1")]
    bind_host: String,
    /// gRPC port.
    #[arg(short = 'p', long, default_value_t = 50050)]
    bind_port: u16,
    /// Must match the executors' policy.
    #[arg(short = 's', long, value_enum, default_value_t = Policy::PullStaged)]
    scheduler_policy: Policy,
}

/// Ballista's scheduling policies.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Policy {
    /// Executors poll for tasks.
    PullStaged,
    /// The scheduler pushes tasks to executors.
    PushStaged,
}

async fn run(args: Args) -> Result<(), String> {
    let address: SocketAddr = format!("{}:{}", args.bind_host, args.bind_port)
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let policy = match args.scheduler_policy {
        Policy::PullStaged => TaskSchedulingPolicy::PullStaged,
        Policy::PushStaged => TaskSchedulingPolicy::PushStaged,
    };
    let config = SchedulerConfig::default()
        .with_hostname(args.bind_host.clone())
        .with_port(args.bind_port)
        .with_scheduler_policy(policy);
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("cluster-scheduler listening on {address} ({policy})");
    start_server(cluster, address, Arc::new(config))
        .await
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match ballista_governor::cli::block_on_main("cluster-scheduler", run(args)) {
        Some(()) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}
