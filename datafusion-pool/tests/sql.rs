//! Real SQL on in-memory tables under tight Query budgets.
//!
//! Every query is run twice: once on an unbounded pool for the expected rows, once on a
//! governed pool. The governed run must either finish *having spilled* with exactly the same
//! rows, or fail with `ResourcesExhausted` naming its consumers; afterwards the pool and the
//! governor must hold nothing. Every run has a timeout: DataFusion 55.2 can deadlock in
//! repartition spilling (apache/datafusion#24883), and a hang must fail the test, not CI.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use common::{Outcome, assert_books_balanced, context, run};
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::OwnedRow;
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::prelude::SessionContext;
use datafusion_pool::GovernedMemoryPool;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, ReclaimError, Reclaimer,
    ReservationToken, mib,
};
use parking_lot::Mutex;

/// Rows of table `t` (and `u`, its join partner). About 14 MiB of Arrow data: large enough
/// that sorts, aggregates and joins over it cannot fit the budgets below without spilling,
/// small enough for a debug build on two cores.
const ROWS: i64 = 250_000;
const PARTITIONS: usize = 2;
const BATCH: i64 = 8192;
/// Sort merge reservation per partition; DataFusion's default (10 MiB) alone would exceed
/// the budgets used here.
const SORT_RESERVATION: usize = 256 * 1024;
const TIMEOUT: Duration = Duration::from_mins(2);

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("s", DataType::Utf8, false),
    ]))
}

/// `k` unique, `g` = 2 000 groups, `v` a permutation-like scramble of `k`, `s` a payload.
fn batches(salt: i64) -> &'static [Vec<RecordBatch>] {
    static T: OnceLock<Vec<Vec<RecordBatch>>> = OnceLock::new();
    static U: OnceLock<Vec<Vec<RecordBatch>>> = OnceLock::new();
    let make = || {
        let mut parts = vec![Vec::new(); PARTITIONS];
        let mut start = 0;
        let mut batch_no = 0;
        while start < ROWS {
            let end = (start + BATCH).min(ROWS);
            let k: Vec<i64> = (start..end).collect();
            let v: Vec<i64> = k.iter().map(|k| (k * 7_919 + salt) % 1_000_003).collect();
            let g: Vec<i64> = k.iter().map(|k| k % 2_000).collect();
            let s: Vec<String> = v
                .iter()
                .map(|v| format!("payload-{v:010}-{salt}"))
                .collect();
            parts[batch_no % PARTITIONS].push(
                RecordBatch::try_new(
                    schema(),
                    vec![
                        Arc::new(Int64Array::from(k)),
                        Arc::new(Int64Array::from(g)),
                        Arc::new(Int64Array::from(v)),
                        Arc::new(StringArray::from(s)),
                    ],
                )
                .unwrap(),
            );
            start = end;
            batch_no += 1;
        }
        parts
    };
    if salt == 0 {
        T.get_or_init(make)
    } else {
        U.get_or_init(make)
    }
}

fn register(ctx: &SessionContext) {
    for (name, salt) in [("t", 0), ("u", 13)] {
        let table = MemTable::try_new(schema(), batches(salt).to_vec()).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
}

fn session(pool: Arc<dyn MemoryPool>) -> SessionContext {
    let ctx = context(pool, PARTITIONS, SORT_RESERVATION);
    register(&ctx);
    ctx
}

async fn expected(sql: &str) -> Vec<OwnedRow> {
    match run(
        &session(Arc::new(UnboundedMemoryPool::default())),
        sql,
        TIMEOUT,
    )
    .await
    {
        Outcome::Done { rows, .. } => rows,
        other => panic!("unbounded run of {sql} failed: {other:?}"),
    }
}

/// A governor with only a Query engine of `limit` bytes, and a governed pool on it.
fn governed(limit: usize) -> (Arc<MemoryGovernor>, Arc<GovernedMemoryPool>) {
    let governor = common::query_governor(limit, limit);
    let pool = Arc::new(GovernedMemoryPool::new(&governor));
    (governor, pool)
}

/// Runs `sql` under a `limit`-byte Query budget and checks the contract of this file.
/// Returns whether it completed.
async fn check(sql: &str, limit: usize, set: &[&str]) -> bool {
    let want = expected(sql).await;
    let (governor, pool) = governed(limit);
    let ctx = session(Arc::clone(&pool) as _);
    for s in set {
        ctx.sql(s).await.unwrap().collect().await.unwrap();
    }
    let outcome = run(&ctx, sql, TIMEOUT).await;
    drop(ctx);
    let completed = assert_outcome(&outcome, &want, sql);
    assert_books_balanced(&pool, &governor).await;
    completed
}

fn assert_outcome(outcome: &Outcome, want: &[OwnedRow], sql: &str) -> bool {
    assert_outcome_of(outcome, want, sql, true, true)
}

/// `must_spill`: the budget is tight for this query alone. Among concurrent queries it is
/// not a property of the query: when another one fails early, the rest may fit.
/// `governed`: the failure message must be the governed pool's, which names its culprits.
fn assert_outcome_of(
    outcome: &Outcome,
    want: &[OwnedRow],
    sql: &str,
    must_spill: bool,
    governed: bool,
) -> bool {
    eprintln!("{sql}\n  -> {}", common::describe(outcome));
    match outcome {
        Outcome::Done { rows, spills, .. } => {
            assert!(
                *spills > 0 || !must_spill,
                "{sql}: finished without spilling; the budget is not tight"
            );
            assert_eq!(
                rows.len(),
                want.len(),
                "{sql}: row count differs from the unbounded run"
            );
            assert!(rows == want, "{sql}: rows differ from the unbounded run");
            true
        }
        Outcome::Exhausted(m) => {
            assert!(
                !governed || (m.contains("can spill:") && m.contains("Top consumers")),
                "{sql}: {m}"
            );
            false
        }
        other => panic!("{sql}: neither a spilled result nor ResourcesExhausted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_cardinality_group_by_spills_and_matches() {
    let sql = "SELECT k, count(*) AS c, sum(v) AS sv, min(s) AS ms FROM t GROUP BY k";
    // 16 MiB: tight enough that both final aggregates spill, with room for the one moment
    // no hard limit can arbitrate: both replaying their spills at once, each needing its
    // table while its merge holds its share (at 12 MiB that failed about 1 run in 13 under
    // two busy loops per core; FairSpillPool gets through it by passing its limit).
    assert!(check(sql, mib(16), &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_spills_and_matches() {
    // Unique sort key, so the order is fully determined; the canonical comparison checks the
    // rows, and the query's own order is checked below.
    let sql = "SELECT v, k, s FROM t ORDER BY v, k";
    // The sort's merge phase holds unspillable memory proportional to its spill files and
    // sometimes needs more while its own sorter holds the rest of the budget; no pool can take
    // that back, so a clean ResourcesExhausted is allowed on an attempt (`check` verifies it),
    // but one of three attempts must finish with spills and the right rows.
    let mut completed = false;
    for _ in 0..3 {
        if check(sql, mib(16), &[]).await {
            completed = true;
            break;
        }
    }
    assert!(completed, "ORDER BY never completed at 16 MiB");

    let (governor, pool) = governed(mib(32));
    let ctx = session(Arc::clone(&pool) as _);
    let batches = tokio::time::timeout(TIMEOUT, async { ctx.sql(sql).await?.collect().await })
        .await
        .expect("timeout")
        .expect("query");
    let v: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(v.len(), ROWS as usize);
    assert!(v.windows(2).all(|w| w[0] <= w[1]), "output not ordered");
    drop(ctx);
    assert_books_balanced(&pool, &governor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_join_spills_around_it_or_fails_naming_its_build_side() {
    // The aggregate above the join spills; the build side (unspillable) must fit.
    let sql = "SELECT t.k, count(*) AS c, sum(u.v) AS sv FROM t JOIN u ON t.k = u.k AND t.g = u.g GROUP BY t.k";
    assert!(check(sql, mib(24), &[]).await);

    // With a budget smaller than the build side the query must fail cleanly, naming it.
    let sql = "SELECT t.s, u.s FROM t JOIN u ON t.k = u.k";
    let (governor, pool) = governed(mib(2));
    let ctx = session(Arc::clone(&pool) as _);
    match run(&ctx, sql, TIMEOUT).await {
        Outcome::Exhausted(m) => {
            assert!(m.contains("HashJoinInput"), "{m}");
            assert!(m.contains("Engines holding the ceiling"), "{m}");
        }
        other => panic!("expected the build side to be refused, got {other:?}"),
    }
    drop(ctx);
    assert_books_balanced(&pool, &governor).await;
}

/// An engine that borrowed idle memory and gives it back when the governor asks.
struct Lender(Mutex<Option<ReservationToken>>);

#[async_trait]
impl Reclaimer for Lender {
    fn reclaimable(&self) -> usize {
        self.0.lock().as_ref().map_or(0, ReservationToken::size)
    }

    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        Ok(self.0.lock().take().map_or(0, |mut t| t.free()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_join_finishes_by_reclaiming_memory_another_engine_borrowed() {
    let sql = "SELECT t.s, u.s FROM t JOIN u ON t.k = u.k";
    let want = expected(sql).await;
    // The vector engine borrowed most of the ceiling while queries were idle. The join's
    // build side cannot spill; a fixed 8 MiB pool (what is left) fails, the governed pool asks
    // the governor to take the loan back and finishes.
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(40))
            .engine(
                EngineId::Query,
                EngineBudget::new(mib(32)).with_floor(mib(8)),
            )
            .engine(
                EngineId::Vector,
                EngineBudget::new(mib(32)).with_floor(mib(8)),
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    let loan = governor.try_reserve(EngineId::Vector, mib(32)).unwrap();
    let lender = Arc::new(Lender(Mutex::new(Some(loan))));
    let _handle = governor.register_reclaimer(EngineId::Vector, Arc::clone(&lender) as _);

    let greedy = common::make_pool(common::PoolKind::Greedy, Some(mib(8))).0;
    assert!(
        matches!(
            run(&session(greedy), sql, TIMEOUT).await,
            Outcome::Exhausted(_)
        ),
        "an 8 MiB greedy pool should not fit this build side"
    );

    let pool = Arc::new(GovernedMemoryPool::new(&governor));
    let ctx = session(Arc::clone(&pool) as _);
    match run(&ctx, sql, TIMEOUT).await {
        Outcome::Done { rows, .. } => assert!(rows == want, "rows differ"),
        other => panic!("expected the reclaim to let the join finish, got {other:?}"),
    }
    assert!(pool.stats().reclaim_requests >= 1);
    assert_eq!(
        governor.reserved(EngineId::Vector),
        0,
        "the loan was taken back"
    );
    assert!(
        governor.snapshot().global_peak <= mib(40),
        "the ceiling held"
    );
    drop(ctx);
    assert_books_balanced(&pool, &governor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sort_merge_join_spills_and_matches() {
    let sql = "SELECT t.k, t.v, u.v AS uv, u.s FROM t JOIN u ON t.k = u.k";
    assert!(
        check(
            sql,
            mib(16),
            &["SET datafusion.optimizer.prefer_hash_join = false"]
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_query_spills_and_matches() {
    let sql = "SELECT k, g, sum(v) OVER (PARTITION BY g ORDER BY k ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running FROM t";
    assert!(check(sql, mib(10), &[]).await);
}

/// The three queries of `concurrent_queries_share_one_pool`.
const CONCURRENT: [&str; 3] = [
    "SELECT k, count(*) AS c, sum(v) AS sv FROM t GROUP BY k",
    "SELECT v, k, s FROM u ORDER BY v, k",
    "SELECT k, sum(v) OVER (PARTITION BY g ORDER BY k ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS r FROM t",
];
/// The shared limit of the three concurrent queries: tight enough that they must share.
const CONCURRENT_LIMIT: usize = 24 << 20;
/// Attempts per pool: which query wins a race for the last bytes is timing, under any pool.
const CONCURRENT_TRIES: usize = 3;

/// Runs the three queries at once on one session of `pool`; returns how many completed (each
/// completed one is checked against `want`) and how many spilled.
async fn run_concurrently(
    pool: Arc<dyn MemoryPool>,
    want: &[Vec<OwnedRow>],
    governed: bool,
) -> (usize, usize) {
    let ctx = session(pool);
    let runs = CONCURRENT.map(|q| {
        let ctx = ctx.clone();
        tokio::spawn(async move { run(&ctx, q, TIMEOUT).await })
    });
    let (mut completed, mut spilled) = (0, 0);
    for ((run, q), want) in runs.into_iter().zip(CONCURRENT).zip(want) {
        let outcome = run.await.unwrap();
        if let Outcome::Done { spills, .. } = &outcome {
            spilled += spills;
        }
        completed += usize::from(assert_outcome_of(&outcome, want, q, false, governed));
    }
    (completed, spilled)
}

/// Three different queries at once share one governed pool: at least two of them complete
/// (best of the same number of attempts), every completed one is right, and the pool ends
/// empty. FairSpillPool's count at the same limit is printed for comparison, not asserted:
/// it lets concurrent spillers pass its limit (27–39 % measured), which a hard limit cannot
/// match, so in some runs it finishes all three where the governed pool finishes two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_one_pool() {
    let mut want = Vec::new();
    for q in CONCURRENT {
        want.push(expected(q).await);
    }
    let mut fair_best = 0;
    for _ in 0..CONCURRENT_TRIES {
        let (pool, _) = common::make_pool(common::PoolKind::Fair, Some(CONCURRENT_LIMIT));
        fair_best = fair_best.max(run_concurrently(pool, &want, false).await.0);
    }
    let (governor, pool) = governed(CONCURRENT_LIMIT);
    let mut governed_best = 0;
    let mut spilled = 0;
    for _ in 0..CONCURRENT_TRIES {
        let (completed, spills) = run_concurrently(Arc::clone(&pool) as _, &want, true).await;
        governed_best = governed_best.max(completed);
        spilled += spills;
        assert!(pool.consumers().is_empty());
        assert_books_balanced(&pool, &governor).await;
        if governed_best == CONCURRENT.len() {
            break;
        }
    }
    eprintln!("concurrent: governed completed {governed_best}, FairSpillPool {fair_best} of 3");
    assert!(
        governed_best >= 2,
        "governed completed {governed_best} of 3 concurrent queries (FairSpillPool {fair_best})"
    );
    assert!(
        spilled > 0,
        "no query spilled: the shared budget is not tight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_memory_limit_takes_the_session_out_of_the_governor() {
    let (governor, pool) = governed(mib(64));
    let ctx = session(Arc::clone(&pool) as _);
    assert!(datafusion_pool::is_governed(&ctx.runtime_env()));
    ctx.sql("SET datafusion.runtime.memory_limit = '1G'")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    // Documented DataFusion behaviour: the SET replaced the pool.
    assert!(!datafusion_pool::is_governed(&ctx.runtime_env()));
    // The governed way moves the governor's budget instead, for every session.
    datafusion_pool::set_query_memory_limit(&governor, "48M").unwrap();
    assert_eq!(governor.limit(EngineId::Query), mib(48));
}
