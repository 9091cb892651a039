//! Issue 24, item 2: a grouped final aggregate's output phase, which DataFusion 55 cannot
//! spill in, has memory set aside for it while it reads its input
//! ([`GovernedAggregateExec`], installed by `memory_safe_state`).

mod common;

use std::sync::Arc;

use common::{assert_books_balanced, canonical, query_governor};
use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect, displayable};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::{GovernedMemoryPool, memory_safe_state};

const ROWS: usize = 300_000;
const GROUPS: u64 = 100_000;
const PARTITIONS: usize = 2;

fn mix(i: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x
}

fn table() -> Arc<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("s", DataType::Utf8, true),
        Field::new("v", DataType::Float64, false),
    ]));
    let mut partitions = vec![Vec::new(); PARTITIONS];
    for (b, start) in (0..ROWS).step_by(8192).enumerate() {
        let end = (start + 8192).min(ROWS);
        let keys: Vec<i64> = (start..end)
            .map(|i| (mix(i as u64) % GROUPS) as i64)
            .collect();
        let s: StringArray = keys
            .iter()
            .map(|k| (k % 7 != 0).then(|| format!("group-{:06}", k % 40_000)))
            .collect();
        let v: Float64Array = (start..end).map(|i| (i % 100) as f64).collect();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(keys)), Arc::new(s), Arc::new(v)],
        )
        .unwrap();
        partitions[b % PARTITIONS].push(batch);
    }
    Arc::new(MemTable::try_new(schema, partitions).unwrap())
}

fn safe_context(pool: Arc<dyn MemoryPool>) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let config = SessionConfig::new()
        .with_target_partitions(PARTITIONS)
        .with_sort_spill_reservation_bytes(1 << 20);
    SessionContext::new_with_state(memory_safe_state(config, runtime))
}

fn metric(plan: &dyn ExecutionPlan, name: &str) -> usize {
    let own = if plan.name() == "GovernedAggregateExec" {
        plan.metrics()
            .and_then(|m| m.sum_by_name(name))
            .map_or(0, |v| v.as_usize())
    } else {
        0
    };
    own + plan
        .children()
        .into_iter()
        .map(|c| metric(c.as_ref(), name))
        .sum::<usize>()
}

const QUERIES: [&str; 4] = [
    "SELECT k, count(*), sum(v), avg(v) FROM t GROUP BY k",
    "SELECT s, count(*), max(v) FROM t GROUP BY s",
    "SELECT k, count(DISTINCT v) FROM t GROUP BY k",
    "SELECT k % 1000 AS g, s, min(v) FROM t GROUP BY k % 1000, s HAVING count(*) > 1",
];

/// Every grouped final aggregate runs governed; each query returns exactly the plain
/// session's rows, without a limit and under budgets that make it spill; the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governed_aggregates_return_datafusion_rows_inside_the_budget() {
    let t = table();
    let plain = common::context(
        Arc::new(UnboundedMemoryPool::default()),
        PARTITIONS,
        1 << 20,
    );
    plain.register_table("t", Arc::clone(&t) as _).unwrap();
    let mut expected = Vec::new();
    for sql in QUERIES {
        expected.push(canonical(
            &plain.sql(sql).await.unwrap().collect().await.unwrap(),
        ));
    }
    for limit in [64 << 20, 8 << 20] {
        let governor = query_governor(limit, limit);
        let pool = Arc::new(GovernedMemoryPool::new(&governor));
        let ctx = safe_context(Arc::clone(&pool) as _);
        ctx.register_table("t", Arc::clone(&t) as _).unwrap();
        for (sql, expected) in QUERIES.iter().zip(&expected) {
            let plan = ctx
                .sql(sql)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            let shown = displayable(plan.as_ref()).indent(true).to_string();
            assert!(
                shown.contains("GovernedAggregateExec")
                    && !shown
                        .lines()
                        .any(|l| l.trim_start().starts_with("AggregateExec: mode=Final")),
                "a final aggregate not governed: {shown}"
            );
            let got = collect(Arc::clone(&plan), ctx.task_ctx())
                .await
                .unwrap_or_else(|e| panic!("{sql} at {limit} B: {e}"));
            assert!(
                canonical(&got) == *expected,
                "{sql} at {limit} B: other rows"
            );
            // At 64 MiB the pool always has room for the headroom beside these aggregates
            // (a few MiB each); at 8 MiB whether it had depends on the interleaving, and an
            // aggregate refused early gives its headroom up.
            if limit == 64 << 20 {
                assert!(
                    metric(plan.as_ref(), "peak_emit_headroom") > 0,
                    "{sql} at {limit} B: no headroom was set aside"
                );
            }
            drop(plan);
            assert_books_balanced(&pool, &governor).await;
            let peak = governor
                .snapshot()
                .engine(governor_core::EngineId::Query)
                .unwrap()
                .peak;
            assert!(peak <= limit, "{sql}: the Query engine peaked at {peak} B");
        }
    }
}

/// The rule leaves alone what does not emit at the end: partial aggregates and aggregates
/// without groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_and_ungrouped_aggregates_are_left_as_they_are() {
    let ctx = safe_context(Arc::new(UnboundedMemoryPool::default()));
    ctx.register_table("t", table() as _).unwrap();
    let plan = ctx
        .sql("SELECT count(*), sum(v) FROM t")
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let shown = displayable(plan.as_ref()).indent(true).to_string();
    assert!(!shown.contains("GovernedAggregateExec"), "{shown}");
    let plan = ctx
        .sql(QUERIES[0])
        .await
        .unwrap()
        .create_physical_plan()
        .await
        .unwrap();
    let shown = displayable(plan.as_ref()).indent(true).to_string();
    assert!(shown.contains("AggregateExec: mode=Partial"), "{shown}");
}
