//! Issue 24's regression cases at a size CI can run: the TPC-H queries that every pool failed
//! at SF 1 under a 64 MiB Query budget (Q4 Q7 Q9 Q18 Q21, each with "HashJoinInput (can
//! spill: false)"), here at SF 0.1 under the same budget scaled down, in a session built by
//! `memory_safe_state` on the governed pool. Each must finish with exactly the unbounded
//! run's rows, inside the budget, leaving the books balanced; and the spilling join must
//! have gone to disk in at least one of them, so the test cannot pass on queries that
//! happened to fit.
//!
//! The same queries in a plain session on the same pool are run first and their outcomes
//! printed: at this limit some of them fail there (that is the defect), but which ones
//! depends on timing (two build sides race for the last bytes), so only the safe session's
//! results are asserted.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Outcome, assert_books_balanced, context, describe, outcome, query_governor, tpch};
use datafusion::arrow::row::OwnedRow;
use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::{GovernedMemoryPool, memory_safe_state};
use governor_core::EngineId;

const SF: f64 = 0.1;
const PARTITIONS: usize = 2;
/// 64 MiB at SF 1, scaled to SF 0.1 (and rounded down: tighter, not looser).
const LIMIT: usize = 6 * 1024 * 1024;
/// The queries that failed at SF 1 under 64 MiB with every pool.
const QUERIES: [usize; 5] = [4, 7, 9, 18, 21];
/// Only catches hangs: each query ends in seconds in a debug build.
const TIMEOUT: Duration = Duration::from_mins(3);

/// Bucket pairs the plan's spilling joins read back from disk.
fn spill_buckets(plan: &dyn ExecutionPlan) -> usize {
    let own = if plan.name() == "SpillingHashJoinExec" {
        plan.metrics()
            .and_then(|m| m.sum_by_name("spill_buckets"))
            .map_or(0, |v| v.as_usize())
    } else {
        0
    };
    own + plan
        .children()
        .into_iter()
        .map(|c| spill_buckets(c.as_ref()))
        .sum::<usize>()
}

/// Runs `sql`, returning its outcome and the plan's spilled join buckets (0 when it failed).
async fn run_counting_buckets(ctx: &SessionContext, sql: &str) -> (Outcome, usize) {
    let start = std::time::Instant::now();
    let mut buckets = 0;
    let work = async {
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        let batches = datafusion::physical_plan::collect(Arc::clone(&plan), ctx.task_ctx()).await?;
        buckets = spill_buckets(plan.as_ref());
        let spills = common::spill_count(plan.as_ref());
        drop(plan);
        Ok::<_, DataFusionError>((batches, spills))
    };
    let ended = tokio::time::timeout(TIMEOUT, work).await;
    (outcome(ended, start), buckets)
}

/// Each query's rows without a limit: what every bounded run must return.
async fn reference_rows(
    tables: &[tpch::Table],
    queries: &[(usize, String)],
) -> BTreeMap<usize, Vec<OwnedRow>> {
    let reference = context(
        Arc::new(UnboundedMemoryPool::default()),
        PARTITIONS,
        1024 * 1024,
    );
    tpch::register(&reference, tables);
    let mut expected = BTreeMap::new();
    for (n, sql) in queries {
        match common::run(&reference, sql, TIMEOUT).await {
            Outcome::Done { rows, .. } => {
                expected.insert(*n, rows);
            }
            other => panic!("Q{n} failed without a limit: {}", describe(&other)),
        }
    }
    expected
}

fn safe_context(pool: Arc<dyn MemoryPool>) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .expect("runtime");
    let config = SessionConfig::new().with_target_partitions(PARTITIONS);
    SessionContext::new_with_state(memory_safe_state(config, runtime))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpch_queries_that_failed_at_64_mib_finish_in_a_memory_safe_session() {
    let tables = tpch::generate(SF, PARTITIONS as i32);
    let all = tpch::queries();
    let queries: Vec<(usize, String)> = all
        .into_iter()
        .filter(|(n, _)| QUERIES.contains(n))
        .collect();

    let expected = reference_rows(&tables, &queries).await;

    // The defect, for the log: a plain session on the same pool.
    {
        let governor = query_governor(LIMIT, LIMIT);
        let pool = Arc::new(GovernedMemoryPool::new(&governor));
        let plain = context(Arc::clone(&pool) as _, PARTITIONS, 1024 * 1024);
        tpch::register(&plain, &tables);
        for (n, sql) in &queries {
            let outcome = common::run(&plain, sql, TIMEOUT).await;
            eprintln!("plain session, Q{n} at {LIMIT} B: {}", describe(&outcome));
            assert_books_balanced(&pool, &governor).await;
        }
    }

    let governor = query_governor(LIMIT, LIMIT);
    let pool = Arc::new(GovernedMemoryPool::new(&governor));
    let ctx = safe_context(Arc::clone(&pool) as _);
    tpch::register(&ctx, &tables);
    let mut buckets_in_all = 0;
    for (n, sql) in &queries {
        let (outcome, buckets) = run_counting_buckets(&ctx, sql).await;
        eprintln!(
            "memory-safe session, Q{n} at {LIMIT} B: {} ({buckets} join buckets from disk; {:?})",
            describe(&outcome),
            pool.stats()
        );
        match &outcome {
            Outcome::Done { rows, .. } => {
                assert!(rows == &expected[n], "Q{n}: wrong rows");
            }
            other => panic!(
                "Q{n} at {LIMIT} B in a memory-safe session: {}",
                describe(other)
            ),
        }
        buckets_in_all += buckets;
        assert_books_balanced(&pool, &governor).await;
        let peak = governor
            .snapshot()
            .engine(EngineId::Query)
            .expect("query")
            .peak;
        assert!(peak <= LIMIT, "Q{n}: the Query engine peaked at {peak} B");
    }
    assert!(
        buckets_in_all > 0,
        "no join spilled at {LIMIT} B: the test no longer exercises the spilling join"
    );
}

/// All 22 queries at the scaled 64, 32 and 16 MiB budgets: how many the memory-safe session
/// finishes against a plain session on the governed pool and against `FairSpillPool`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_safe_session_finishes_every_query_at_the_scaled_64_mib_budget() {
    let tables = tpch::generate(SF, PARTITIONS as i32);
    let queries = tpch::queries();
    let expected = reference_rows(&tables, &queries).await;
    for limit in [LIMIT, LIMIT / 2, LIMIT / 4] {
        let mut done = BTreeMap::new();
        for safe in [false, true] {
            let governor = query_governor(limit, limit);
            let pool = Arc::new(GovernedMemoryPool::new(&governor));
            let ctx = if safe {
                safe_context(Arc::clone(&pool) as _)
            } else {
                context(Arc::clone(&pool) as _, PARTITIONS, 1024 * 1024)
            };
            tpch::register(&ctx, &tables);
            let mut failed = Vec::new();
            for (n, sql) in &queries {
                let outcome = common::run(&ctx, sql, TIMEOUT).await;
                match &outcome {
                    Outcome::Done { rows, .. } => {
                        assert!(
                            rows == &expected[n],
                            "Q{n} at {limit} B (safe {safe}): wrong rows"
                        );
                    }
                    Outcome::Exhausted(m) => {
                        // A refusal by the pool names the engine and its budget; DataFusion's
                        // own merge gives up in words of its own ("Cannot merge sorted runs"),
                        // typed all the same.
                        assert!(
                            m.contains("Query") || !m.contains("Failed to allocate"),
                            "Q{n}: the pool's refusal names no engine: {m}"
                        );
                        failed.push(*n);
                        if safe {
                            eprintln!("safe Q{n} at {limit} B: {}", &m[..m.len().min(2500)]);
                        }
                    }
                    other => panic!("Q{n} at {limit} B (safe {safe}): {}", describe(other)),
                }
                assert_books_balanced(&pool, &governor).await;
            }
            eprintln!(
                "{limit} B, {}: {}/22, failed {failed:?}",
                if safe { "memory-safe" } else { "plain" },
                22 - failed.len()
            );
            done.insert(safe, 22 - failed.len());
        }
        assert!(done[&true] >= done[&false], "at {limit} B: {done:?}");
        if limit == LIMIT {
            assert_eq!(done[&true], 22, "at {limit} B");
        }
    }
}
