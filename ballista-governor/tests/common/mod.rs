//! A Ballista cluster in one test process: a pull-based scheduler on a free port and governed
//! executors started with `start_executor_process`, each on its own governor.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_governor::{AdmissionOptions, Governed, governed_executor_with};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use governor_core::MemoryGovernor;
use tokio::task::JoinHandle;

/// Generous: a loaded 2-core machine may take long to start a process's services.
pub const STARTUP_DEADLINE: Duration = Duration::from_mins(5);

/// A running scheduler.
pub struct Scheduler {
    pub addr: SocketAddr,
    server: SchedulerServer<LogicalPlanNode, PhysicalPlanNode>,
    task: JoinHandle<()>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running executor and what the test needs to see of it.
pub struct Executor {
    pub id: String,
    pub governor: Arc<MemoryGovernor>,
    pub governed: Governed,
    pub config: Arc<ExecutorProcessConfig>,
    task: JoinHandle<()>,
    _work_dir: tempfile::TempDir,
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nobody listens on now (the OS picks it; it is released at once for the executor).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A pull-based scheduler, like Ballista's standalone one, on a free port.
pub async fn start_scheduler() -> Scheduler {
    let config = Arc::new(
        SchedulerConfig::default().with_scheduler_policy(TaskSchedulingPolicy::PullStaged),
    );
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .expect("cluster state");
    let server = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .expect("scheduler");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("scheduler port");
    let addr = listener.local_addr().expect("scheduler address");
    let task = tokio::spawn({
        let server = server.clone();
        async move {
            if let Err(e) = start_grpc_service_with_listener(listener, server).await {
                panic!("scheduler stopped: {e}");
            }
        }
    });
    Scheduler { addr, server, task }
}

/// `base` pointed at `scheduler` on free ports, with the two settings an in-process cluster
/// needs (see the crate docs' traps), made governed by `governor`, and started.
pub async fn start_executor(
    scheduler: &Scheduler,
    governor: Arc<MemoryGovernor>,
    base: ExecutorProcessConfig,
    options: AdmissionOptions,
) -> Executor {
    let work_dir = tempfile::tempdir().expect("work dir");
    let config = ExecutorProcessConfig {
        bind_host: "127.0.0.1".into(),
        // The scheduler's listener gives no peer address: without this it panics.
        external_host: Some("127.0.0.1".into()),
        port: free_port(),
        grpc_port: free_port(),
        scheduler_host: "127.0.0.1".into(),
        scheduler_port: scheduler.addr.port(),
        // The scheduler pulls; a push executor would never get a task.
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
        work_dir: Some(work_dir.path().to_str().expect("utf-8 temp dir").to_owned()),
        ..base
    };
    let (config, governed) =
        governed_executor_with(config, Arc::clone(&governor), options).expect("governed executor");
    let config = Arc::new(config);
    let id = config.executor_id.clone();
    let task = tokio::spawn({
        let config = Arc::clone(&config);
        async move {
            if let Err(e) = start_executor_process(config).await {
                panic!("executor stopped: {e}");
            }
        }
    });
    Executor {
        id,
        governor,
        governed,
        config,
        task,
        _work_dir: work_dir,
    }
}

/// Waits until the scheduler knows every executor in `ids` (each registers on its first poll).
pub async fn wait_registered(scheduler: &Scheduler, ids: &[&str]) {
    let manager = &scheduler.server.state.executor_manager;
    let deadline = tokio::time::Instant::now() + STARTUP_DEADLINE;
    for id in ids {
        // A condition wait with a generous deadline: registration has no event to await in
        // pull mode.
        while manager.get_executor_metadata(id).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "executor {id} did not register within {STARTUP_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
