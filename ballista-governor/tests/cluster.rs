//! A scheduler and governed executors in one process, against single-process DataFusion.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ballista::prelude::SessionContextExt;
use ballista_executor::executor_process::ExecutorProcessConfig;
use ballista_governor::{AdmissionOptions, governed_executor, tpch};
use datafusion::prelude::SessionContext;
use datafusion_pool::is_governed;
use governed_blocks::GovernedCache;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, mib};

use common::{start_executor, start_scheduler, wait_registered};

fn query_governor(limit: usize) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(limit)
            .engine(EngineId::Query, EngineBudget::new(limit))
            .build()
            .expect("config"),
    )
    .expect("governor")
}

fn tpch_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("data dir");
    tpch::write_tables(dir.path(), 0.1, 4).expect("TPC-H files");
    dir
}

async fn remote(scheduler: &common::Scheduler, data: &Path) -> SessionContext {
    let ctx = SessionContext::remote(&format!("df://127.0.0.1:{}", scheduler.addr.port()))
        .await
        .expect("remote context");
    tpch::register_tables(&ctx, data).await.expect("tables");
    ctx
}

/// Query `n` returns the same rows on the cluster as in one process.
async fn assert_same_rows(local: &SessionContext, cluster: &SessionContext, n: usize, sql: &str) {
    let expected = rows(local, sql)
        .await
        .unwrap_or_else(|e| panic!("Q{n} local: {e}"));
    let got = rows(cluster, sql)
        .await
        .unwrap_or_else(|e| panic!("Q{n} cluster: {e}"));
    assert_eq!(
        got, expected,
        "Q{n}: the cluster's rows differ from one process's"
    );
}

async fn rows(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<Vec<String>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    tpch::canonical_rows(&batches, false)
}

#[test]
fn a_non_zero_memory_pool_size_is_refused_with_the_reason() {
    let governor = query_governor(mib(64));
    let config = ExecutorProcessConfig {
        memory_pool_size: Some(mib(64) as u64),
        ..ExecutorProcessConfig::default()
    };
    let Err(err) = governed_executor(config, governor) else {
        panic!("a non-zero memory_pool_size was accepted");
    };
    let MemError::InvalidConfig { field, reason } = &err else {
        panic!("expected InvalidConfig, got {err}");
    };
    assert_eq!(field, "memory_pool_size");
    assert!(reason.contains("FairSpillPool"), "{reason}");
}

#[test]
fn a_governor_without_a_query_budget_is_refused() {
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(EngineId::Vector, EngineBudget::new(mib(64)))
            .build()
            .expect("config"),
    )
    .expect("governor");
    let Err(err) = governed_executor(ExecutorProcessConfig::default(), governor) else {
        panic!("a governor without a Query budget was accepted");
    };
    assert!(
        matches!(
            err,
            MemError::UnknownEngine {
                engine: EngineId::Query
            }
        ),
        "{err}"
    );
}

#[test]
fn a_working_set_above_the_query_limit_is_refused() {
    let governor = query_governor(mib(8));
    let Err(err) = ballista_governor::governed_executor_with(
        ExecutorProcessConfig::default(),
        governor,
        AdmissionOptions::default().min_working_set(mib(9)),
    ) else {
        panic!("a working set above the Query limit was accepted");
    };
    assert!(err.to_string().contains("min_working_set"), "{err}");
}

#[test]
fn defaults_come_back_governed_with_one_shared_pool() {
    let governor = query_governor(mib(64));
    let work = tempfile::tempdir().unwrap();
    let config = ExecutorProcessConfig {
        work_dir: Some(work.path().to_str().unwrap().to_owned()),
        ..ExecutorProcessConfig::default()
    };
    assert_eq!(
        config.memory_pool_size, None,
        "Ballista's default: a share of host memory"
    );
    let config = governed_executor(config, governor).expect("governed");
    assert_eq!(
        config.memory_pool_size,
        Some(0),
        "the value that keeps the producer's pool"
    );
    assert!(config.override_execution_engine.is_some());
    let produce = config
        .override_runtime_producer
        .as_ref()
        .expect("a producer");
    let session = datafusion::prelude::SessionConfig::new();
    let (a, b) = (produce(&session).unwrap(), produce(&session).unwrap());
    assert!(is_governed(&a) && is_governed(&b));
    assert!(
        Arc::ptr_eq(&a.memory_pool, &b.memory_pool),
        "one pool for every task"
    );
}

/// Every TPC-H query at SF 0.1 on a scheduler and two governed executors returns the rows of
/// single-process DataFusion; each executor's governor saw its tasks and stayed in its limit.
/// The second executor is left at Ballista's defaults apart from its addresses: it comes back
/// governed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tpch_on_two_governed_executors_matches_one_process() {
    let data = tpch_dir();
    let limit = mib(64);
    let scheduler = start_scheduler().await;
    let a = start_executor(
        &scheduler,
        query_governor(limit),
        ExecutorProcessConfig {
            vcores: 2,
            ..ExecutorProcessConfig::default()
        },
        AdmissionOptions::default(),
    )
    .await;
    let b = start_executor(
        &scheduler,
        query_governor(limit),
        ExecutorProcessConfig::default(),
        AdmissionOptions::default(),
    )
    .await;
    assert_eq!(b.config.memory_pool_size, Some(0));
    wait_registered(&scheduler, &[&a.id, &b.id]).await;

    let local = tpch::local_context(data.path()).await.expect("local");
    let cluster = remote(&scheduler, data.path()).await;
    for (n, sql) in tpch::queries() {
        assert_same_rows(&local, &cluster, n, &sql).await;
    }
    for (name, executor) in [("a", &a), ("b", &b)] {
        let snapshot = executor.governor.snapshot();
        let query = snapshot.engine(EngineId::Query).expect("Query row");
        assert!(
            query.peak > 0,
            "executor {name}: its governor saw none of its tasks"
        );
        assert!(
            query.peak <= limit,
            "executor {name}: peak {} over the limit",
            query.peak
        );
        assert!(
            snapshot.global_peak <= snapshot.ceiling,
            "executor {name}: over the ceiling"
        );
        let admitted = executor.governed.gate.stats();
        let tasks = executor.governed.tasks.stats();
        assert_eq!(
            admitted.at_once + admitted.after_wait + admitted.bound_passed,
            tasks.tasks,
            "{name}: every task passed the gate once: {admitted:?} {tasks:?}"
        );
        assert!(tasks.tasks > 0 && tasks.failed == 0, "{name}: {tasks:?}");
    }
}

/// One executor's governor also holds a governed cache (the Vector engine's). Before the
/// queries the cache borrows: it holds part of the Query engine's idle floor. While they run
/// the governor takes that back for the executor's tasks (a reclaim of the cache), the Query
/// engine borrows beyond its own floor, the cache keeps serving loads, and the two stay
/// within one ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_co_located_cache_and_the_executor_borrow_from_each_other() {
    let data = tpch_dir();
    let ceiling = mib(64);
    let (query_floor, query_limit) = (mib(12), mib(56));
    // The cache's limit is above what the Query floor leaves (52 MiB) and below Critical
    // (85 % of the ceiling), so a full cache borrows the Query floor without stalling tasks.
    // The Query limit leaves the cache its floor, so its loads always find room.
    let (vector_floor, vector_limit) = (mib(8), mib(54));
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(ceiling)
            .engine(
                EngineId::Query,
                EngineBudget::new(query_limit).with_floor(query_floor),
            )
            .engine(
                EngineId::Vector,
                EngineBudget::new(vector_limit).with_floor(vector_floor),
            )
            .build()
            .expect("config"),
    )
    .expect("governor");
    let cache: Arc<GovernedCache<u64, Vec<u8>>> = Arc::new(
        GovernedCache::builder(Arc::clone(&governor), EngineId::Vector)
            .name("vectors")
            .build()
            .expect("cache"),
    );
    let load = |cache: &GovernedCache<u64, Vec<u8>>, key: u64| {
        cache
            .get_or_try_load(&key, mib(1), || {
                Ok::<_, governed_blocks::CacheError>((vec![key as u8; mib(1)], mib(1)))
            })
            .map(|v| v.len())
    };

    // The cache borrows: with the Query engine idle it fills its limit, part of it the Query
    // engine's floor.
    for key in 0..64 {
        load(&cache, key).expect("a load evicts to make room; it never fails");
    }
    let vector_before = governor.reserved(EngineId::Vector);
    assert!(
        vector_before > ceiling - query_floor,
        "the cache holds {vector_before} bytes: it should hold part of the Query floor"
    );
    assert!(governor.borrowed(EngineId::Vector) > 0);

    let reclaims_before = cache.stats().reclaims;
    let scheduler = start_scheduler().await;
    let executor = start_executor(
        &scheduler,
        Arc::clone(&governor),
        ExecutorProcessConfig {
            vcores: 2,
            ..ExecutorProcessConfig::default()
        },
        // A working set the Query engine can always have: its floor.
        AdmissionOptions::default().min_working_set(query_floor),
    )
    .await;
    wait_registered(&scheduler, &[&executor.id]).await;

    // The other engine keeps working while the queries run: a hot set of 16 entries, read
    // and reloaded when a reclaim took them, every load succeeding. Paced at one operation a
    // millisecond (a workload, not a synchronisation): an engine loading in a busy loop would
    // take back every byte the reclaim frees before the query's retry can (see the report).
    let done = Arc::new(AtomicBool::new(false));
    let worker = std::thread::spawn({
        let (cache, done) = (Arc::clone(&cache), Arc::clone(&done));
        move || {
            let mut operations = 0_u64;
            while !done.load(Ordering::Acquire) || operations < 32 {
                load(&cache, 1_000 + operations % 16)
                    .expect("a cache load failed while queries ran");
                operations += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            operations
        }
    });

    let local = tpch::local_context(data.path()).await.expect("local");
    let cluster = remote(&scheduler, data.path()).await;
    // A sort of every lineitem row in one task (a window over the whole table): more than
    // the Query floor, with a one-row answer.
    let sql = "SELECT count(*) AS n, sum(rn) AS s FROM (SELECT row_number() OVER \
               (ORDER BY l_comment, l_orderkey, l_linenumber) AS rn FROM lineitem)";
    for (n, sql) in [(0, sql.to_owned())]
        .into_iter()
        .chain(tpch::queries().into_iter().take(5))
    {
        assert_same_rows(&local, &cluster, n, &sql).await;
    }
    done.store(true, Ordering::Release);
    let operations = worker.join().expect("the cache worker");

    let snapshot = governor.snapshot();
    let query = snapshot.engine(EngineId::Query).expect("Query row");
    assert!(
        query.peak > query_floor,
        "the Query engine never borrowed beyond its floor (peak {})",
        query.peak
    );
    let stats = cache.stats();
    assert!(
        stats.reclaims > reclaims_before,
        "the governor never took memory back from the cache for the queries: {stats:?}"
    );
    assert!(operations >= 32);
    assert!(
        snapshot.global_peak <= ceiling,
        "over the ceiling: {}",
        snapshot.global_peak
    );
    assert!(governor.reserved(EngineId::Vector) + governor.reserved(EngineId::Query) <= ceiling);
}
