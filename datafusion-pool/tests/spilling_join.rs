//! `SpillingHashJoinExec` against DataFusion's `HashJoinExec` on generated data: every join
//! type, both `NullEquality` modes, with and without a join filter and a projection, at
//! budgets that make it join in memory, spill once, split buckets again, and join a hot
//! key's bucket in chunks. Every run must return exactly `HashJoinExec`'s rows (run without
//! a limit), take the road the budget forces (read from its metrics, so a test cannot pass
//! by never spilling), and leave the governor's books empty.

mod common;

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{JoinSide, JoinType, NullEquality, Result};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column};
use datafusion::physical_expr::{Partitioning, PhysicalExprRef};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::utils::{ColumnIndex, JoinFilter};
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::metrics::MetricValue;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::prelude::SessionConfig;
use datafusion_pool::{GovernorExt, SpillingHashJoinExec};
use governor_core::EngineId;
use proptest::prelude::*;

use common::{canonical, query_governor};

const PARTITIONS: usize = 2;

const ALL_TYPES: [JoinType; 10] = [
    JoinType::Inner,
    JoinType::Left,
    JoinType::Right,
    JoinType::Full,
    JoinType::LeftSemi,
    JoinType::RightSemi,
    JoinType::LeftAnti,
    JoinType::RightAnti,
    JoinType::LeftMark,
    JoinType::RightMark,
];

/// A deterministic stream of numbers (a 64-bit LCG), so every run sees the same data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// What one side's rows look like.
#[derive(Clone, Copy, Debug)]
struct Side {
    rows: usize,
    /// Keys are drawn from `0..distinct`.
    distinct: u64,
    /// One row in `null_every` has a NULL key (0: none).
    null_every: usize,
    /// Rows (of `rows`) whose key is the hot key 7.
    hot: usize,
    seed: u64,
}

fn schema(prefix: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(format!("{prefix}_k"), DataType::Int64, true),
        Field::new(format!("{prefix}_v"), DataType::Int64, false),
        Field::new(format!("{prefix}_s"), DataType::Utf8, false),
    ]))
}

fn batches(prefix: &str, side: Side) -> Vec<RecordBatch> {
    let mut rng = Lcg(side.seed);
    let schema = schema(prefix);
    let mut out = Vec::new();
    let mut i = 0;
    while i < side.rows {
        let n = (side.rows - i).min(256);
        let keys: Int64Array = (i..i + n)
            .map(|r| {
                if side.null_every > 0 && r % side.null_every == 0 {
                    None
                } else if r < side.hot {
                    Some(7)
                } else {
                    Some((rng.next() % side.distinct) as i64)
                }
            })
            .collect();
        let values: Int64Array = (0..n).map(|_| (rng.next() % 5) as i64).collect();
        let strings: StringArray = (i..i + n)
            .map(|r| Some(format!("{prefix}-row-{r:06}-payload")))
            .collect();
        out.push(
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(keys), Arc::new(values), Arc::new(strings)],
            )
            .unwrap(),
        );
        i += n;
    }
    out
}

/// One side as a plan: its batches spread over two partitions, hash-partitioned by the key
/// as DataFusion partitions a partitioned join's inputs.
fn input(prefix: &str, side: Side) -> Arc<dyn ExecutionPlan> {
    let all = batches(prefix, side);
    let mut parts = vec![Vec::new(), Vec::new()];
    for (i, b) in all.into_iter().enumerate() {
        parts[i % 2].push(b);
    }
    let source = MemorySourceConfig::try_new_exec(&parts, schema(prefix), None).unwrap();
    let key: PhysicalExprRef = Arc::new(Column::new(&format!("{prefix}_k"), 0));
    Arc::new(RepartitionExec::try_new(source, Partitioning::Hash(vec![key], PARTITIONS)).unwrap())
}

/// One side as a plan already partitioned by its key (even keys and NULLs in partition 0, odd
/// keys in 1), with no `RepartitionExec`: the lifecycle tests below count spill files, and a
/// repartition spills files of its own that live as long as its plan.
fn input_partitioned_by_key(prefix: &str, side: Side) -> Arc<dyn ExecutionPlan> {
    use datafusion::arrow::array::{Array, BooleanArray};
    use datafusion::arrow::compute::filter_record_batch;
    let mut parts = vec![Vec::new(), Vec::new()];
    for b in batches(prefix, side) {
        let keys = b
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int64 keys");
        for (p, part) in parts.iter_mut().enumerate() {
            let mask: BooleanArray = (0..keys.len())
                .map(|i| {
                    let in_p = if keys.is_null(i) {
                        p == 0
                    } else {
                        keys.value(i).rem_euclid(2) as usize == p
                    };
                    Some(in_p)
                })
                .collect();
            part.push(filter_record_batch(&b, &mask).unwrap());
        }
    }
    MemorySourceConfig::try_new_exec(&parts, schema(prefix), None).unwrap()
}

/// `l_v != r_v`: drops some key matches, so filtered rows count as unmatched.
fn filter() -> JoinFilter {
    let schema = Arc::new(Schema::new(vec![
        Field::new("l_v", DataType::Int64, false),
        Field::new("r_v", DataType::Int64, false),
    ]));
    let expr = Arc::new(BinaryExpr::new(
        Arc::new(Column::new("l_v", 0)),
        Operator::NotEq,
        Arc::new(Column::new("r_v", 1)),
    ));
    JoinFilter::new(
        expr,
        vec![
            ColumnIndex {
                index: 1,
                side: JoinSide::Left,
            },
            ColumnIndex {
                index: 1,
                side: JoinSide::Right,
            },
        ],
        schema,
    )
}

#[derive(Clone, Copy, Debug)]
struct Case {
    join_type: JoinType,
    nulls: NullEquality,
    filter: bool,
    projection: bool,
    build: Side,
    probe: Side,
}

fn hash_join(case: Case) -> HashJoinExec {
    hash_join_over(case, input)
}

/// `case` as a `HashJoinExec` whose sides are made by `side`.
fn hash_join_over(case: Case, side: fn(&str, Side) -> Arc<dyn ExecutionPlan>) -> HashJoinExec {
    let input = side;
    let on: Vec<(PhysicalExprRef, PhysicalExprRef)> = vec![(
        Arc::new(Column::new("l_k", 0)),
        Arc::new(Column::new("r_k", 0)),
    )];
    // A projection keeping the key and payload of whichever sides the join type outputs.
    let projection = case.projection.then(|| match case.join_type {
        JoinType::LeftSemi | JoinType::LeftAnti | JoinType::RightSemi | JoinType::RightAnti => {
            vec![2, 0]
        }
        JoinType::LeftMark | JoinType::RightMark => vec![3, 0],
        _ => vec![5, 0, 3],
    });
    HashJoinExec::try_new(
        input("l", case.build),
        input("r", case.probe),
        on,
        case.filter.then(filter),
        &case.join_type,
        projection,
        PartitionMode::Partitioned,
        case.nulls,
        false,
    )
    .unwrap()
}

fn task(pool: Arc<dyn MemoryPool>) -> Arc<TaskContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    Arc::new(
        TaskContext::default()
            .with_session_config(SessionConfig::new().with_target_partitions(PARTITIONS))
            .with_runtime(runtime),
    )
}

async fn collect(plan: Arc<dyn ExecutionPlan>, task: Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
    datafusion::physical_plan::collect(plan, task).await
}

/// Sum of a named metric of the spilling join over its partitions.
fn metric(plan: &SpillingHashJoinExec, name: &str) -> usize {
    let Some(metrics) = plan.metrics() else {
        return 0;
    };
    metrics
        .iter()
        .filter_map(|m| match m.value() {
            MetricValue::Count { name: n, count } if n == name => Some(count.value()),
            MetricValue::Gauge { name: n, gauge } if n == name => Some(gauge.value()),
            MetricValue::SpillCount(c) if name == "spill_count" => Some(c.value()),
            _ => None,
        })
        .max_by_key(|v| *v)
        .into_iter()
        .sum()
}

/// What a run must show it did.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Road {
    /// Joined in memory: nothing spilled.
    InMemory,
    /// Spilled into buckets, each joined in memory.
    SpilledOnce,
    /// A bucket was split again.
    Resplit,
    /// A bucket was joined in chunks.
    Chunked,
}

/// Runs `case` under a Query budget of `budget` bytes and checks rows, road and books.
async fn check(case: Case, budget: Option<usize>, road: Road) {
    let expected = {
        let join = Arc::new(hash_join(case));
        canonical(
            &collect(join, task(Arc::new(UnboundedMemoryPool::default())))
                .await
                .expect("HashJoinExec without a limit"),
        )
    };
    let governor = query_governor(budget.unwrap_or(1 << 40), budget.unwrap_or(1 << 40));
    let plan = Arc::new(SpillingHashJoinExec::try_new(&hash_join(case)).unwrap());
    let batches = tokio::time::timeout(
        Duration::from_mins(2),
        collect(Arc::clone(&plan) as _, task(governor.pool())),
    )
    .await
    .unwrap_or_else(|_| panic!("{case:?}: the join hung"))
    .unwrap_or_else(|e| panic!("{case:?} at {budget:?} B failed: {e}"));
    let got = canonical(&batches);
    assert_eq!(
        got.len(),
        expected.len(),
        "{case:?} at {budget:?} B: row count"
    );
    assert!(
        got == expected,
        "{case:?} at {budget:?} B: other rows than HashJoinExec's"
    );

    let spills = metric(&plan, "spill_count");
    let depth = metric(&plan, "max_split_depth");
    let chunks = metric(&plan, "chunked_rounds");
    match road {
        Road::InMemory => assert_eq!(spills, 0, "{case:?}: spilled with room to spare"),
        Road::SpilledOnce => {
            assert!(spills > 0, "{case:?}: did not spill");
            assert_eq!(chunks, 0, "{case:?}: chunked");
        }
        Road::Resplit => assert!(
            depth >= 2,
            "{case:?}: no bucket split again (depth {depth})"
        ),
        Road::Chunked => assert!(chunks > 0, "{case:?}: no chunked round"),
    }
    assert_eq!(
        governor.reserved(EngineId::Query),
        0,
        "{case:?}: the Query engine holds memory after the join"
    );
    if let Some(b) = budget {
        assert!(governor.snapshot().engine(EngineId::Query).unwrap().peak <= b);
    }
}

const BUILD: Side = Side {
    rows: 4000,
    distinct: 1500,
    null_every: 37,
    hot: 0,
    seed: 1,
};
const PROBE: Side = Side {
    rows: 3000,
    distinct: 2000,
    null_every: 41,
    hot: 0,
    seed: 2,
};

/// Every join type × both null modes × {filter, no filter} on the road `budget` forces.
async fn every_type(budget: Option<usize>, road: Road, build: Side, probe: Side) {
    for join_type in ALL_TYPES {
        for nulls in [
            NullEquality::NullEqualsNothing,
            NullEquality::NullEqualsNull,
        ] {
            for filter in [false, true] {
                let case = Case {
                    join_type,
                    nulls,
                    filter,
                    projection: filter,
                    build,
                    probe,
                };
                check(case, budget, road).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fits_in_memory_like_hash_join() {
    every_type(None, Road::InMemory, BUILD, PROBE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spills_once_when_the_build_side_does_not_fit() {
    every_type(Some(96 * 1024), Road::SpilledOnce, BUILD, PROBE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_a_bucket_again_when_it_does_not_fit() {
    let build = Side {
        rows: 16_000,
        distinct: 8000,
        ..BUILD
    };
    every_type(Some(24 * 1024), Road::Resplit, build, PROBE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_a_hot_key_in_chunks() {
    let build = Side { hot: 2500, ..BUILD };
    let probe = Side { hot: 40, ..PROBE };
    every_type(Some(64 * 1024), Road::Chunked, build, probe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_on_the_probe_side_of_a_right_join_is_chunked_too() {
    // Right-side joins chunk the probe side: make that the big one.
    let build = Side { hot: 2500, ..BUILD };
    let probe = Side {
        hot: 2500,
        rows: 6000,
        ..PROBE
    };
    for join_type in [JoinType::Right, JoinType::RightAnti, JoinType::Full] {
        let case = Case {
            join_type,
            nulls: NullEquality::NullEqualsNothing,
            filter: true,
            projection: false,
            build,
            probe,
        };
        check(case, Some(64 * 1024), Road::Chunked).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random sizes, key ranges, null rates, hot keys and budgets: always HashJoinExec's rows.
    #[test]
    fn random_inputs_give_hash_join_rows(
        type_index in 0..ALL_TYPES.len(),
        null_equal in any::<bool>(),
        filter in any::<bool>(),
        build_rows in 1usize..3000,
        probe_rows in 0usize..3000,
        distinct in 1u64..2000,
        hot in 0usize..1500,
        null_every in 0usize..50,
        budget_kib in 24usize..256,
        seed in any::<u64>(),
    ) {
        let case = Case {
            join_type: ALL_TYPES[type_index],
            nulls: if null_equal { NullEquality::NullEqualsNull } else { NullEquality::NullEqualsNothing },
            filter,
            projection: false,
            build: Side { rows: build_rows, distinct, null_every, hot: hot.min(build_rows), seed },
            probe: Side { rows: probe_rows, distinct, null_every, hot: hot.min(probe_rows) / 10, seed: seed ^ 1 },
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            // Whatever road the budget makes it take; the rows are what matters here.
            check_rows_only(case, budget_kib * 1024).await;
        });
    }
}

/// Like [`check`] without asserting the road (random budgets take any of them).
async fn check_rows_only(case: Case, budget: usize) {
    let expected = canonical(
        &collect(
            Arc::new(hash_join(case)),
            task(Arc::new(UnboundedMemoryPool::default())),
        )
        .await
        .unwrap(),
    );
    let governor = query_governor(budget, budget);
    let plan = Arc::new(SpillingHashJoinExec::try_new(&hash_join(case)).unwrap());
    let got = tokio::time::timeout(
        Duration::from_mins(2),
        collect(plan as _, task(governor.pool())),
    )
    .await
    .expect("hung");
    match got {
        Ok(batches) => assert!(canonical(&batches) == expected, "{case:?} at {budget} B"),
        // A budget below one batch and its table cannot join a hot key at all: that must be
        // the typed refusal, never wrong rows.
        Err(e) => assert!(
            e.to_string().contains("Resources exhausted"),
            "{case:?} at {budget} B: {e}"
        ),
    }
    assert_eq!(governor.reserved(EngineId::Query), 0);
}

/// Regular files under `dir`, at any depth (DataFusion's disk manager writes its spill files
/// into a directory of its own under each configured one).
fn files_under(dir: &std::path::Path) -> usize {
    // A directory that is gone holds no files.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(std::result::Result::ok)
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                usize::from(path.is_file())
            }
        })
        .sum()
}

/// A task context whose spill files go to `dir`, at most `max_disk` bytes of them.
fn task_spilling_to(
    pool: Arc<dyn MemoryPool>,
    dir: &std::path::Path,
    max_disk: u64,
) -> Arc<TaskContext> {
    use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![dir.to_path_buf()]))
                .with_max_temp_directory_size(max_disk),
        )
        .build_arc()
        .unwrap();
    Arc::new(
        TaskContext::default()
            .with_session_config(SessionConfig::new().with_target_partitions(PARTITIONS))
            .with_runtime(runtime),
    )
}

/// Waits (on a generous deadline that only a hang reaches) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_mins(2);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A join dropped while its buckets are on disk (after its first output batch, before the
/// last) removes every spill file and gives back every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cancelled_mid_spill_leaves_no_files_and_no_bytes() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let governor = query_governor(96 * 1024, 96 * 1024);
    let case = Case {
        join_type: JoinType::Inner,
        nulls: NullEquality::NullEqualsNothing,
        filter: false,
        projection: false,
        build: BUILD,
        probe: PROBE,
    };
    let plan = Arc::new(
        SpillingHashJoinExec::try_new(&hash_join_over(case, input_partitioned_by_key)).unwrap(),
    );
    let task = task_spilling_to(governor.pool(), dir.path(), u64::MAX);
    let mut stream = plan.execute(0, task).unwrap();
    let first = tokio::time::timeout(Duration::from_mins(2), stream.next())
        .await
        .expect("the join hung")
        .expect("a first batch")
        .expect("no error");
    assert!(first.num_rows() > 0);
    assert!(
        metric(&plan, "spill_count") > 0 && files_under(dir.path()) > 0,
        "the join is not mid-spill: {} spills, {} files",
        metric(&plan, "spill_count"),
        files_under(dir.path())
    );
    drop(stream);
    // The partition's task is aborted with its stream; tokio drops it (and its files and
    // reservations) when it is next polled, not at once.
    eventually("the spill files are removed", || {
        files_under(dir.path()) == 0
    })
    .await;
    eventually("the bytes are given back", || {
        governor.reserved(EngineId::Query) == 0
    })
    .await;
}

/// Spill files past the disk manager's limit fail the join with DataFusion's error (an I/O
/// error saying the spill directory's limit was passed), named by the join and what it was
/// writing; no panic, no hang, nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spill_disk_is_an_error_naming_the_join() {
    let dir = tempfile::tempdir().unwrap();
    let governor = query_governor(96 * 1024, 96 * 1024);
    let case = Case {
        join_type: JoinType::Left,
        nulls: NullEquality::NullEqualsNothing,
        filter: false,
        projection: false,
        build: Side {
            rows: 16_000,
            ..BUILD
        },
        probe: PROBE,
    };
    let plan = Arc::new(
        SpillingHashJoinExec::try_new(&hash_join_over(case, input_partitioned_by_key)).unwrap(),
    );
    // Room for a few buckets' files, not for the build side.
    let task = task_spilling_to(governor.pool(), dir.path(), 64 * 1024);
    let got = tokio::time::timeout(Duration::from_mins(2), collect(plan as _, task))
        .await
        .expect("the join hung on a full disk");
    let err = got.expect_err("the join cannot finish with 64 KiB of spill disk");
    let text = err.to_string();
    assert!(
        text.contains("max_temp_directory_size"),
        "not the disk manager's limit: {text}"
    );
    assert!(
        text.contains("SpillingHashJoin[") && text.contains("writing a spill bucket"),
        "the error names neither the join nor what it wrote: {text}"
    );
    eventually("the spill files are removed", || {
        files_under(dir.path()) == 0
    })
    .await;
    eventually("the bytes are given back", || {
        governor.reserved(EngineId::Query) == 0
    })
    .await;
}
