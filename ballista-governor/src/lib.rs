//! Every Ballista executor on its own memory governor.
//!
//! # The problem
//!
//! A [`MemoryGovernor`] bounds one process. Data that outgrow one machine run on Ballista,
//! DataFusion's distributed engine: a scheduler plans stages and hands their tasks to executor
//! processes. In our database each executor's node also hosts the vector, sparse, CRDT and
//! timeseries engines, and Ballista's own memory handling (55.0) cannot see them:
//!
//! * every task's runtime gets a fresh `FairSpillPool` of a static slice,
//!   `memory_pool_size / vcores × vcores_consumed`, sized from host memory (or the root
//!   cgroup's limit) when no size is given. A task with one big join cannot use an idle slot's
//!   slice, concurrent tasks are not fair to each other, and other engines are invisible;
//! * a `override_runtime_producer` that installs the governor's pool is **silently replaced**
//!   by that per-task pool unless `memory_pool_size` is `Some(0)` — the obvious wiring leaves
//!   the executor ungoverned, and nothing says so.
//!
//! # What [`governed_executor`] does
//!
//! ```text
//!   scheduler ──poll/push──► executor (one process, one MemoryGovernor)
//!                              │
//!   task ─► AdmissionGate ─────┤ waits while Query cannot reserve a working set, or the
//!           (governor events,  │ governor is at Critical or above; bounded, then runs
//!            bounded)          ▼
//!                            runtime ── one GovernedMemoryPool for all tasks ──► Query engine
//!                              │           (spills into the work dir)             │
//!                              │                                                  ▼
//!   HNSW cache, timeseries ────┴──────────────── the same governor ─────► one ceiling
//! ```
//!
//! * It refuses a non-zero `memory_pool_size` with [`MemError::InvalidConfig`] (that size
//!   would replace the governed pool) and sets `Some(0)`, the value that keeps the producer's
//!   pool. A config left at Ballista's defaults (`None`, which means "a fraction of host
//!   memory") therefore comes back governed.
//! * It installs a runtime producer whose runtimes share **one** governed pool
//!   ([`GovernorExt::pool`](datafusion_pool::GovernorExt::pool)) and spill into the executor's
//!   work dir (resolved and created here; a user's own producer is kept, only its pool is
//!   replaced).
//! * It wraps the execution engine so that every task passes an [`AdmissionGate`] before it
//!   runs (see [`admission`]).
//!
//! # What the scheduler sees, and what it does not
//!
//! Ballista's scheduler knows nothing of memory. While a task waits at the gate it holds its
//! vcore slot, so the executor reports (pull: asks for) fewer free slots and gets less work:
//! back-pressure by occupancy, the only kind the protocol carries today. The scheduler may
//! still place the next task on the busiest executor when that one has a free slot. A
//! scheduler change would add the governor's pressure level (and the Query engine's available
//! bytes) to executor heartbeats, so that the scheduler could prefer executors with room and
//! stop handing tasks to one at Critical. The scheduler process itself is not governed.
//!
//! # Limits
//!
//! * Without an `override_execution_engine` of the user's, the gate wraps Ballista's default
//!   engine with a shuffle-client pool of this crate (Ballista's own pool type is private in
//!   ballista-executor 55.0), keeping idle connections `client_ttl` seconds like Ballista's.
//! * Shuffle files, Flight buffers and gRPC messages are outside DataFusion's pool and so
//!   outside the governor's books; the RSS monitor of `governor-core` is what sees them.
//!
//! # Two traps when starting executors yourself
//!
//! * The standalone scheduler's gRPC server gives no peer address: an executor that registers
//!   without `external_host` makes the scheduler panic. Set `external_host`.
//! * The standalone scheduler is pull-based and `ExecutorProcessConfig` defaults to push: tasks
//!   are never dispatched unless both use the same `task_scheduling_policy`.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
//! use ballista_governor::governed_executor;
//! use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let governor = MemoryGovernor::new(
//!     GovernorConfig::builder()
//!         .global_ceiling(mib(512))
//!         .engine(EngineId::Query, EngineBudget::new(mib(384)).with_floor(mib(64)))
//!         .engine(EngineId::Vector, EngineBudget::new(mib(256)).with_floor(mib(64)))
//!         .build()?,
//! )?;
//! let config = governed_executor(ExecutorProcessConfig::default(), governor)?;
//! start_executor_process(Arc::new(config)).await?;
//! # Ok(())
//! # }
//! ```

pub mod admission;
pub mod cli;
mod client_pool;
mod engine;
pub mod meter;
mod runtime;
pub mod tpch;

use std::sync::Arc;

use ballista_executor::executor_process::ExecutorProcessConfig;
use governor_core::{MemError, MemoryGovernor};

pub use admission::{AdmissionGate, AdmissionOptions, AdmissionStats, Admitted};
pub use meter::{TaskMeter, TaskStats};

/// What a governed executor's caller can watch: its admission gate and its task counters.
#[derive(Clone, Debug)]
pub struct Governed {
    /// The gate every task passes.
    pub gate: Arc<AdmissionGate>,
    /// Tasks run and bytes spilled.
    pub tasks: Arc<TaskMeter>,
}

/// Makes `config` an executor governed by `governor` (the Query engine must be configured):
/// one shared governed pool for all its tasks, spilling into its work dir, and admission by
/// pressure with the default [`AdmissionOptions`]. See the [crate docs](crate).
///
/// # Errors
/// [`MemError::InvalidConfig`] for a non-zero `memory_pool_size` (it would replace the
/// governed pool with Ballista's per-task pools) or a work dir that cannot be created;
/// [`MemError::UnknownEngine`] when the governor has no Query budget.
pub fn governed_executor(
    config: ExecutorProcessConfig,
    governor: Arc<MemoryGovernor>,
) -> Result<ExecutorProcessConfig, MemError> {
    governed_executor_with(config, governor, AdmissionOptions::default()).map(|(c, _)| c)
}

/// As [`governed_executor`], with admission `options`; also returns the gate, whose
/// [`stats`](AdmissionGate::stats) show how tasks were admitted, and the task counters.
///
/// # Errors
/// Those of [`governed_executor`], and [`MemError::InvalidConfig`] when the minimum working
/// set is above the Query limit.
pub fn governed_executor_with(
    mut config: ExecutorProcessConfig,
    governor: Arc<MemoryGovernor>,
    options: AdmissionOptions,
) -> Result<(ExecutorProcessConfig, Governed), MemError> {
    match config.memory_pool_size {
        Some(bytes) if bytes > 0 => {
            return Err(MemError::InvalidConfig {
                field: "memory_pool_size".into(),
                reason: format!(
                    "Some({bytes}) makes Ballista give every task a FairSpillPool of \
                     {bytes} / vcores instead of the governed pool, so the governor would see \
                     none of the executor's memory; leave it None (or Some(0)) and size the \
                     Query engine in the governor"
                ),
            });
        }
        // `None` means "a fraction of host memory" to Ballista; only `Some(0)` keeps the pool
        // of the runtime producer.
        _ => config.memory_pool_size = Some(0),
    }
    // Every check before the first side effect (creating the work dir).
    options.validate(&governor)?;
    let work_dir = runtime::resolve_work_dir(config.work_dir.as_deref(), &config.executor_id)?;
    config.override_runtime_producer = Some(runtime::governed_producer(
        &governor,
        config.override_runtime_producer.take(),
        &work_dir,
    ));
    config.work_dir = Some(
        work_dir
            .to_str()
            .ok_or_else(|| MemError::InvalidConfig {
                field: "work_dir".into(),
                reason: format!("{} is not UTF-8, which Ballista needs", work_dir.display()),
            })?
            .to_owned(),
    );
    let gate = Arc::new(AdmissionGate::new(governor, options)?);
    let tasks = Arc::new(TaskMeter::default());
    config.override_execution_engine = Some(Arc::new(engine::GatedEngine::new(
        config.override_execution_engine.take(),
        config.client_ttl,
        Some(Arc::clone(&gate)),
        Arc::clone(&tasks),
    )));
    Ok((config, Governed { gate, tasks }))
}

/// Counts `config`'s tasks and spills without changing how its memory is handled: for a
/// baseline executor on Ballista's own pools, measured the same way as a governed one.
pub fn metered_executor(
    mut config: ExecutorProcessConfig,
) -> (ExecutorProcessConfig, Arc<TaskMeter>) {
    let tasks = Arc::new(TaskMeter::default());
    config.override_execution_engine = Some(Arc::new(engine::GatedEngine::new(
        config.override_execution_engine.take(),
        config.client_ttl,
        None,
        Arc::clone(&tasks),
    )));
    (config, tasks)
}
