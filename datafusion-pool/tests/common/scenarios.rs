//! The harness of `peer_scenarios.rs`: one memory-limit scenario (tables, query, session
//! settings, limit), run under `GreedyMemoryPool`, `FairSpillPool` and the governed pool at
//! the same limit, on a current-thread and on a 2-worker runtime, and judged by one rule:
//! *the governed pool passes whenever either built-in pool passes*.
//!
//! A *pass* is a run that returned exactly the rows of an unbounded run. A run may also fail
//! with `ResourcesExhausted` (or an error the scenario documents); it may never hang (each run
//! has a timeout, and each runtime a watchdog thread), return wrong rows, leave spill files
//! behind, or leave bytes booked in the governor's Query engine.
//!
//! The data of every scenario is generated in process by the small deterministic generators
//! at the bottom of this file (no files: DataFusion is built without parquet here).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch, StringArray, StringViewArray,
    TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use datafusion::arrow::row::OwnedRow;
use datafusion::catalog::TableProvider;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::DataFusionError;
use datafusion::datasource::MemTable;
use datafusion::execution::TaskContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_optimizer::join_selection::JoinSelection;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, SendableRecordBatchStream, displayable,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::GovernedMemoryPool;
use governor_core::MemoryGovernor;

use super::{Outcome, PoolKind, assert_books_balanced, describe, make_pool, run};

/// One mebibyte.
pub const MIB: usize = 1024 * 1024;

/// The limit of an upstream case that gives DataFusion `limit` bytes with a memory fraction of
/// 0.95 (`RuntimeEnvBuilder::with_memory_limit(limit, 0.95)`): the pool's real size.
pub fn upstream_limit(limit: usize) -> usize {
    limit / 100 * 95 + limit % 100 * 95 / 100
}

/// Where a scenario's operators may spill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disk {
    /// DataFusion's default: files in the OS temporary directory, no size limit.
    Enabled,
    /// No disk manager: a spill fails (the "DiskManager is disabled" cases).
    Disabled,
    /// Files in the OS temporary directory, at most this many bytes at once.
    Limited(u64),
}

/// Which physical optimizer rules plan the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// DataFusion's default rules.
    Default,
    /// Only the join selection rule, so that no sort or repartition (which have memory
    /// budgets of their own) stands between the operator under test and the limit.
    JoinSelectionOnly,
}

/// A plan built by hand, for cases that have no SQL form.
pub type PlanBuilder = Arc<dyn Fn() -> Arc<dyn ExecutionPlan> + Send + Sync>;

/// What a scenario runs.
#[derive(Clone)]
pub enum Query {
    /// One SQL query, all output partitions collected together.
    Sql(String),
    /// One SQL query whose output partitions are drained one after the other, each to its end
    /// before the next starts: a slow consumer makes the other partitions' data queue up.
    SqlPartitionsInOrder(String),
    /// A hand-built plan, all output partitions collected together.
    Plan(PlanBuilder),
}

/// What the scenario says the *built-in* pools do; the governed pool is judged by the rule
/// "passes whenever a built-in passes" alone.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// The upstream case expects success: at least one built-in pool must pass, so the
    /// scenario keeps testing something.
    Pass,
    /// The upstream case expects a `ResourcesExhausted` error: both built-ins must fail with
    /// it.
    Exhausted,
    /// Both built-ins must fail with an error containing `error`: the upstream case expects
    /// that error, or DataFusion 55.2 fails a (newer) upstream case under every pool. `why`
    /// says which.
    Fails {
        /// Why the built-ins fail.
        why: &'static str,
        /// A fragment of every built-in pool's error.
        error: &'static str,
    },
    /// DataFusion 55.2 returns wrong rows for this (newer) upstream case whatever the pool:
    /// no built-in may pass, at least one pool must return wrong rows, and wrong rows are
    /// not held against any pool.
    WrongRows {
        /// The DataFusion defect.
        why: &'static str,
    },
    /// Timing decides what the built-ins do; nothing is asserted about them.
    Any,
}

/// One ported upstream case.
#[derive(Clone)]
pub struct Scenario {
    /// The upstream test this ports, for messages.
    pub upstream: &'static str,
    /// Tables registered in every session.
    pub tables: Vec<(&'static str, Arc<dyn TableProvider>)>,
    /// What to run.
    pub query: Query,
    /// The pool size, the same for every pool.
    pub limit: usize,
    /// Session settings (partitions, batch size, sort reservation, …).
    pub config: SessionConfig,
    /// Spilling allowed?
    pub disk: Disk,
    /// Optimizer rules.
    pub rules: Rules,
    /// What the built-in pools do.
    pub expect: Expect,
    /// Compare passing runs with an unbounded run. Off only for queries whose unbounded run
    /// would never end (the disk-limit case).
    pub reference: bool,
    /// At least one passing run must have spilled (the upstream case asserts a spill).
    pub must_spill: bool,
    /// Fragments the physical plan must show (the upstream case checks the plan's shape).
    pub plan_contains: Vec<&'static str>,
    /// Fragments the physical plan must not show.
    pub plan_lacks: Vec<&'static str>,
    /// Errors other than `ResourcesExhausted` that a run may fail with.
    pub documented_errors: Vec<&'static str>,
    /// Timeout of one run.
    pub timeout: Duration,
    /// A DataFusion deadlock this scenario is known to hit under any pool: a timed-out run
    /// counts as a failure, not a hang of the pool.
    pub known_deadlock: Option<&'static str>,
    /// Why only `FairSpillPool`'s passes bind the governed pool here (see
    /// [`Scenario::greedy_only_pass`]).
    pub greedy_only: Option<&'static str>,
}

impl Scenario {
    /// A scenario running `sql` at `limit` bytes, on two partitions with DataFusion's other
    /// defaults until [`Scenario::config`] says otherwise.
    pub fn sql(upstream: &'static str, sql: impl Into<String>, limit: usize) -> Self {
        Self::new(upstream, Query::Sql(sql.into()), limit)
    }

    /// A scenario running `query` at `limit` bytes.
    pub fn new(upstream: &'static str, query: Query, limit: usize) -> Self {
        Self {
            upstream,
            tables: Vec::new(),
            query,
            limit,
            config: SessionConfig::new().with_target_partitions(2),
            disk: Disk::Enabled,
            rules: Rules::Default,
            expect: Expect::Any,
            reference: true,
            must_spill: false,
            plan_contains: Vec::new(),
            plan_lacks: Vec::new(),
            documented_errors: Vec::new(),
            timeout: Duration::from_mins(1),
            known_deadlock: None,
            greedy_only: None,
        }
    }

    /// Registers `table` as `name`.
    pub fn table(mut self, name: &'static str, table: Arc<dyn TableProvider>) -> Self {
        self.tables.push((name, table));
        self
    }

    /// Session settings.
    pub fn config(mut self, config: SessionConfig) -> Self {
        self.config = config;
        self
    }

    /// Spilling.
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disk = disk;
        self
    }

    /// Optimizer rules.
    pub fn rules(mut self, rules: Rules) -> Self {
        self.rules = rules;
        self
    }

    /// What the built-ins do.
    pub fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    /// No unbounded reference run.
    pub fn without_reference(mut self) -> Self {
        self.reference = false;
        self
    }

    /// A passing run must have spilled.
    pub fn must_spill(mut self) -> Self {
        self.must_spill = true;
        self
    }

    /// The physical plan must show `fragment`.
    pub fn plan_contains(mut self, fragment: &'static str) -> Self {
        self.plan_contains.push(fragment);
        self
    }

    /// The physical plan must not show `fragment`.
    pub fn plan_lacks(mut self, fragment: &'static str) -> Self {
        self.plan_lacks.push(fragment);
        self
    }

    /// Timeout of one run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs that time out are DataFusion's deadlock `why`, tolerated under every pool.
    pub fn known_deadlock(mut self, why: &'static str) -> Self {
        self.known_deadlock = Some(why);
        self
    }

    /// A pass of `GreedyMemoryPool` alone does not bind the governed pool, for the reason
    /// `why`: the governed pool keeps every registered operator's share, as FairSpillPool
    /// does (`datafusion-pool/src/policy.rs`), and Greedy passes only by giving one operator
    /// the whole budget. A known gap, stated in the test and kept visible in its output.
    pub fn greedy_only_pass(mut self, why: &'static str) -> Self {
        self.greedy_only = Some(why);
        self
    }

    /// A run may fail with an error containing `fragment`.
    pub fn documented_error(mut self, fragment: &'static str) -> Self {
        self.documented_errors.push(fragment);
        self
    }
}

/// The two runtimes every scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `new_current_thread`: every operator task on the test's own thread.
    CurrentThread,
    /// `new_multi_thread` with two workers.
    TwoWorkers,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::CurrentThread => "current-thread",
            Flavor::TwoWorkers => "2 workers",
        })
    }
}

impl Flavor {
    /// A runtime of this flavour.
    pub fn runtime(self) -> tokio::runtime::Runtime {
        let mut builder = match self {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Flavor::TwoWorkers => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(2);
                b
            }
        };
        builder.enable_all().build().expect("tokio runtime")
    }
}

/// Runs `scenario` on both runtimes and asserts the rule; panics with all outcomes otherwise.
pub fn check(scenario: Scenario) {
    let scenario = Arc::new(scenario);
    for flavor in [Flavor::CurrentThread, Flavor::TwoWorkers] {
        let summary = on_watchdog(&scenario, flavor);
        eprintln!("{} [{flavor}]\n{summary}", scenario.upstream);
    }
}

/// Runs the scenario on a thread of its own and waits for it with a deadline far above the
/// runs' own timeouts, so that even a run that blocks its runtime's thread (where a timeout
/// cannot fire) fails the test instead of hanging it.
fn on_watchdog(scenario: &Arc<Scenario>, flavor: Flavor) -> String {
    let (done, finished) = mpsc::channel();
    let s = Arc::clone(scenario);
    let worker = std::thread::Builder::new()
        .name(format!("{} [{flavor}]", scenario.upstream))
        .spawn(move || {
            let summary = flavor.runtime().block_on(check_on(&s, flavor));
            let _ = done.send(summary);
        })
        .expect("scenario thread");
    // Four pool runs and one reference run, each with its timeout, plus settling time.
    let deadline = scenario.timeout * 6 + Duration::from_mins(1);
    match finished.recv_timeout(deadline) {
        Ok(summary) => {
            worker.join().expect("scenario thread");
            summary
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            // The thread panicked: an assertion of check_on failed; pass it on.
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the scenario thread ended without an answer"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "{} [{flavor}]: no answer within {deadline:?}: a run hangs and blocks its runtime",
            scenario.upstream
        ),
    }
}

/// A governed pool and its governor, whose books are checked after each run.
type GovernedBooks = (Arc<GovernedMemoryPool>, Arc<MemoryGovernor>);

/// The pool of `kind` at `limit`; for the governed pool also its books.
fn pool_for(kind: PoolKind, limit: usize) -> (Arc<dyn MemoryPool>, Option<GovernedBooks>) {
    match kind {
        PoolKind::Greedy | PoolKind::Fair => (make_pool(kind, Some(limit)).0, None),
        PoolKind::Governed => {
            // The same governor `make_pool` builds, but the pool is kept as its own type to
            // read its books afterwards.
            let governor = super::query_governor(limit, limit);
            let pool = Arc::new(GovernedMemoryPool::new(&governor));
            (Arc::clone(&pool) as _, Some((pool, governor)))
        }
    }
}

/// A session of `scenario` on `pool` with spilling per `disk`.
pub fn session(scenario: &Scenario, pool: Arc<dyn MemoryPool>, disk: Disk) -> SessionContext {
    let disk = match disk {
        Disk::Enabled => DiskManagerBuilder::default(),
        Disk::Disabled => DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        Disk::Limited(bytes) => DiskManagerBuilder::default().with_max_temp_directory_size(bytes),
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(disk)
        .build_arc()
        .expect("runtime");
    let mut state = SessionStateBuilder::new()
        .with_config(scenario.config.clone())
        .with_runtime_env(runtime)
        .with_default_features();
    if scenario.rules == Rules::JoinSelectionOnly {
        state = state.with_physical_optimizer_rules(vec![Arc::new(JoinSelection::new())]);
    }
    let ctx = SessionContext::new_with_state(state.build());
    for (name, table) in &scenario.tables {
        ctx.register_table(*name, Arc::clone(table))
            .expect("register table");
    }
    ctx
}

/// Runs `query` on `ctx` with a timeout.
pub async fn execute(ctx: &SessionContext, query: &Query, timeout: Duration) -> Outcome {
    match query {
        Query::Sql(sql) => run(ctx, sql, timeout).await,
        Query::SqlPartitionsInOrder(sql) => {
            let sql = sql.clone();
            run_plan(ctx, timeout, true, async move |ctx: SessionContext| {
                ctx.sql(&sql).await?.create_physical_plan().await
            })
            .await
        }
        Query::Plan(build) => {
            let build = Arc::clone(build);
            run_plan(ctx, timeout, false, async move |_| Ok(build())).await
        }
    }
}

/// Like `common::run`, for a plan made by `plan`; `in_order` drains the output partitions one
/// after the other instead of together.
async fn run_plan<F>(ctx: &SessionContext, timeout: Duration, in_order: bool, plan: F) -> Outcome
where
    F: AsyncFnOnce(SessionContext) -> datafusion::common::Result<Arc<dyn ExecutionPlan>>,
{
    let start = Instant::now();
    let work = async {
        let plan = plan(ctx.clone()).await?;
        let task: Arc<TaskContext> = ctx.task_ctx();
        let batches = if in_order {
            let mut all = Vec::new();
            for p in 0..plan.output_partitioning().partition_count() {
                let stream = Arc::clone(&plan).execute(p, Arc::clone(&task))?;
                all.extend(datafusion::physical_plan::common::collect(stream).await?);
            }
            all
        } else {
            datafusion::physical_plan::collect(Arc::clone(&plan), task).await?
        };
        let spills = super::spill_count(plan.as_ref());
        drop(plan);
        Ok::<_, DataFusionError>((batches, spills))
    };
    super::outcome(tokio::time::timeout(timeout, work).await, start)
}

/// The physical plan of `query`, indented, for shape checks.
async fn plan_text(ctx: &SessionContext, query: &Query) -> String {
    let plan = match query {
        Query::Sql(sql) | Query::SqlPartitionsInOrder(sql) => ctx
            .sql(sql)
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical plan"),
        Query::Plan(build) => build(),
    };
    displayable(plan.as_ref()).indent(true).to_string()
}

/// The unbounded run's rows.
async fn reference(scenario: &Scenario) -> Vec<OwnedRow> {
    let ctx = session(
        scenario,
        Arc::new(UnboundedMemoryPool::default()),
        Disk::Enabled,
    );
    match execute(&ctx, &scenario.query, scenario.timeout).await {
        Outcome::Done { rows, .. } => rows,
        other => panic!(
            "{}: the unbounded run failed: {}",
            scenario.upstream,
            describe(&other)
        ),
    }
}

/// One runtime's worth of the scenario: the three pools, then the verdict. Returns a summary
/// of the outcomes for the test log.
async fn check_on(s: &Scenario, flavor: Flavor) -> String {
    let name = format!("{} [{flavor}] at {} B", s.upstream, s.limit);
    let mut outcomes: BTreeMap<PoolKind, Outcome> = BTreeMap::new();
    for kind in PoolKind::ALL {
        let (pool, governed) = pool_for(kind, s.limit);
        let ctx = session(s, pool, s.disk);
        if kind == PoolKind::Greedy && (!s.plan_contains.is_empty() || !s.plan_lacks.is_empty()) {
            let text = plan_text(&ctx, &s.query).await;
            for f in &s.plan_contains {
                assert!(text.contains(f), "{name}: the plan lacks {f}:\n{text}");
            }
            for f in &s.plan_lacks {
                assert!(!text.contains(f), "{name}: the plan has {f}:\n{text}");
            }
        }
        let outcome = execute(&ctx, &s.query, s.timeout).await;
        let disk = Arc::clone(&ctx.runtime_env().disk_manager);
        drop(ctx);
        if let Some((pool, governor)) = governed {
            assert_books_balanced(&pool, &governor).await;
        }
        // Spill files belong to operator tasks that an aborted query drops asynchronously.
        let deadline = Instant::now() + Duration::from_secs(10);
        while disk.used_disk_space() != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            disk.used_disk_space(),
            0,
            "{name}, {}: spill files left behind",
            kind.name()
        );
        outcomes.insert(kind, outcome);
    }

    let summary = outcomes
        .iter()
        .map(|(k, o)| format!("  {:8} {}", k.name(), one_line(o)))
        .collect::<Vec<_>>()
        .join("\n");

    // Every run is a pass with the right rows, `ResourcesExhausted`, or a documented error.
    let mut want: Option<Vec<OwnedRow>> = None;
    let mut wrong_rows = Vec::new();
    for (kind, outcome) in &outcomes {
        match outcome {
            Outcome::Done { rows, .. } => {
                if s.reference {
                    if want.is_none() {
                        want = Some(reference(s).await);
                    }
                    if want.as_ref() != Some(rows) {
                        wrong_rows.push(*kind);
                        assert!(
                            matches!(s.expect, Expect::WrongRows { .. }),
                            "{name}, {}: wrong rows ({} rows, the unbounded run {})\n{summary}",
                            kind.name(),
                            rows.len(),
                            want.as_ref().map_or(0, Vec::len)
                        );
                    }
                }
            }
            Outcome::Exhausted(_) => {}
            Outcome::Failed(m) => assert!(
                s.documented_errors.iter().any(|f| m.contains(f)),
                "{name}, {}: failed with an undocumented error: {m}\n{summary}",
                kind.name()
            ),
            // A built-in pool that hangs simply did not pass (DataFusion 55.2's repartition
            // spill deadlock, apache/datafusion#24883, can catch any plan that spills through
            // a RepartitionExec); the governed pool may hang only where the scenario names a
            // deadlock DataFusion has under every pool.
            Outcome::TimedOut => assert!(
                s.known_deadlock.is_some() || *kind != PoolKind::Governed,
                "{name}, {}: timed out\n{summary}",
                kind.name()
            ),
        }
    }

    let passed = |k: PoolKind| outcomes[&k].is_done() && !wrong_rows.contains(&k);
    match s.expect {
        // Upstream's case passes: so must some pool here, or the scaled case tests nothing.
        // Which built-in gets through a tight case can be timing (the order in which two
        // sorts' merges take their reservations), so a run where only the governed pool
        // passed counts too.
        Expect::Pass => assert!(
            passed(PoolKind::Greedy) || passed(PoolKind::Fair) || passed(PoolKind::Governed),
            "{name}: the upstream case passes, but no pool did\n{summary}"
        ),
        Expect::Exhausted => {
            for k in [PoolKind::Greedy, PoolKind::Fair] {
                assert!(
                    matches!(outcomes[&k], Outcome::Exhausted(_)),
                    "{name}: the upstream case fails with ResourcesExhausted, {} did not\n{summary}",
                    k.name()
                );
            }
        }
        Expect::Fails { why, error } => {
            for k in [PoolKind::Greedy, PoolKind::Fair] {
                let message = match &outcomes[&k] {
                    Outcome::Exhausted(m) | Outcome::Failed(m) => m.as_str(),
                    _ => "",
                };
                assert!(
                    message.contains(error),
                    "{name}: {} must fail with \"{error}\" ({why}); if DataFusion fixed it, \
                     make this scenario a pass\n{summary}",
                    k.name()
                );
            }
        }
        Expect::WrongRows { why } => {
            assert!(
                !passed(PoolKind::Greedy) && !passed(PoolKind::Fair) && !wrong_rows.is_empty(),
                "{name}: DataFusion 55.2 was expected to return wrong rows ({why}); if it no \
                 longer does, make this scenario a pass\n{summary}"
            );
        }
        Expect::Any => {}
    }
    if s.must_spill {
        assert!(
            outcomes
                .values()
                .any(|o| matches!(o, Outcome::Done { spills, .. } if *spills > 0)),
            "{name}: no passing run spilled; the limit no longer makes the case spill\n{summary}"
        );
    }

    // The rule. A governed run caught in a deadlock DataFusion has under every pool (the
    // scenario names it, and a built-in run hit it too in this test's history) says nothing
    // about the pool: which run the deadlock catches is a matter of timing.
    let deadlocked = s.known_deadlock.is_some()
        && matches!(outcomes.get(&PoolKind::Governed), Some(Outcome::TimedOut));
    let binding = passed(PoolKind::Fair) || (passed(PoolKind::Greedy) && s.greedy_only.is_none());
    if let (Some(why), true) = (
        s.greedy_only,
        passed(PoolKind::Greedy) && !passed(PoolKind::Governed),
    ) {
        eprintln!("{name}: only GreedyMemoryPool passed; known gap: {why}");
    }
    if binding && !deadlocked {
        assert!(
            passed(PoolKind::Governed),
            "{name}: a built-in pool passed, the governed pool did not\n{summary}"
        );
    }
    summary
}

/// `describe`, cut to one line of reasonable length for the summary.
fn one_line(outcome: &Outcome) -> String {
    let text = describe(outcome).replace('\n', " | ");
    // Long enough to keep the pool's list of top consumers: that is what explains a failure.
    if text.len() > 2400 {
        let mut end = 2400;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    }
}

// ---------------------------------------------------------------------------------------------
// Data. Small deterministic generators; every value is a function of the row number and a seed.
// ---------------------------------------------------------------------------------------------

/// A 64-bit linear congruential generator: reproducible pseudo-random numbers without a
/// dependency.
pub struct Lcg(u64);

impl Lcg {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number, from the generator's high bits (the low bits of an LCG are weak).
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// A dictionary-encoded string column.
fn dictionary<'a>(values: impl IntoIterator<Item = &'a str>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<DictionaryArray<Int32Type>>())
}

/// `rows` rows of a web server's access log in batches of `batch_rows`: `service`, `host`,
/// `pod`, `container` (dictionary strings, few distinct), `time` (unique per pod),
/// `request_bytes` and `response_bytes` (many distinct).
pub fn access_log(rows: usize, batch_rows: usize) -> Vec<RecordBatch> {
    const SERVICES: [&str; 3] = ["frontend", "backend", "database"];
    let mut rng = Lcg::new(7);
    let mut batches = Vec::new();
    for start in (0..rows).step_by(batch_rows) {
        let range = start..(start + batch_rows).min(rows);
        let service: Vec<&str> = range.clone().map(|i| SERVICES[(i / 97) % 3]).collect();
        let host: Vec<String> = range
            .clone()
            .map(|i| format!("host-{}", (i / 31) % 7))
            .collect();
        let pod: Vec<String> = range
            .clone()
            .map(|i| format!("pod-{:02}", (i / 13) % 11))
            .collect();
        let container: Vec<String> = range.clone().map(|i| format!("c-{}", i % 5)).collect();
        let time: Vec<i64> = range
            .clone()
            .map(|i| 1_700_000_000_000_000_000 + i as i64 * 1_000_000)
            .collect();
        let request: Vec<i32> = range
            .clone()
            .map(|_| (rng.next() % 50_000) as i32)
            .collect();
        let response: Vec<i32> = range.map(|_| (rng.next() % 20_000) as i32).collect();
        let batch = RecordBatch::try_from_iter(vec![
            ("service", dictionary(service)),
            ("host", dictionary(host.iter().map(String::as_str))),
            ("pod", dictionary(pod.iter().map(String::as_str))),
            (
                "container",
                dictionary(container.iter().map(String::as_str)),
            ),
            (
                "time",
                Arc::new(TimestampNanosecondArray::from(time)) as ArrayRef,
            ),
            (
                "request_bytes",
                Arc::new(Int32Array::from(request)) as ArrayRef,
            ),
            (
                "response_bytes",
                Arc::new(Int32Array::from(response)) as ArrayRef,
            ),
        ])
        .expect("access log batch");
        batches.push(batch);
    }
    batches
}

/// `batches` as a one-partition in-memory table.
pub fn mem_table(batches: Vec<RecordBatch>) -> Arc<dyn TableProvider> {
    let schema = batches[0].schema();
    Arc::new(MemTable::try_new(schema, vec![batches]).expect("memtable"))
}

/// A partition that replays its batches every time it is executed.
#[derive(Debug)]
struct Replay {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl PartitionStream for Replay {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        Box::pin(
            MemoryStream::try_new(self.batches.clone(), Arc::clone(&self.schema), None)
                .expect("memory stream"),
        )
    }
}

/// `batches` as an unbounded (streaming) one-partition table: the planner must pick operators
/// that work on infinite input (a symmetric hash join, no blocking sort).
pub fn streaming_table(batches: Vec<RecordBatch>) -> Arc<dyn TableProvider> {
    let schema = batches[0].schema();
    let partition = Arc::new(Replay {
        schema: Arc::clone(&schema),
        batches,
    });
    Arc::new(
        StreamingTable::try_new(schema, vec![partition])
            .expect("streaming table")
            .with_infinite_table(true),
    )
}

/// Five batches of 50 rows of two identical, ascending, dictionary-encoded string columns `a`
/// and `b` (each value repeated 16 times).
pub fn sorted_dictionary_batches() -> Vec<RecordBatch> {
    (0..5)
        .map(|b| {
            let values: Vec<String> = (b * 50..b * 50 + 50)
                .map(|x| format!("{:010}", x / 16))
                .collect();
            let column = dictionary(values.iter().map(String::as_str));
            RecordBatch::try_from_iter(vec![("a", Arc::clone(&column)), ("b", column)])
                .expect("dictionary batch")
        })
        .collect()
}

/// The bytes DataFusion accounts for `batches` (shared buffers counted once per batch).
pub fn accounted_size(batches: &[RecordBatch]) -> usize {
    batches
        .iter()
        .map(datafusion::physical_plan::spill::get_record_batch_memory_size)
        .sum()
}

/// `partitions` copies of the sorted dictionary batches, declared sorted by `a, b`.
pub fn sorted_dictionary_table(partitions: usize) -> Arc<dyn TableProvider> {
    use datafusion::prelude::col;
    let batches = sorted_dictionary_batches();
    let schema = batches[0].schema();
    let table = MemTable::try_new(schema, vec![batches; partitions])
        .expect("memtable")
        .with_sort_order(vec![vec![
            col("a").sort(true, false),
            col("b").sort(true, false),
        ]]);
    Arc::new(table)
}

/// `batches` batches of `rows` rows: a string of `width` printable characters and a small
/// integer, both pseudo-random; strings as `Utf8View` when `view`.
pub fn strings_and_numbers(
    batches: usize,
    rows: usize,
    width: usize,
    view: bool,
) -> Vec<RecordBatch> {
    let mut rng = Lcg::new(11);
    (0..batches)
        .map(|_| {
            let strings: Vec<String> = (0..rows)
                .map(|_| {
                    (0..width)
                        .map(|_| char::from(b'!' + (rng.next() % 90) as u8))
                        .collect()
                })
                .collect();
            let numbers: Vec<i32> = (0..rows).map(|_| (rng.next() % 1001) as i32).collect();
            let strings: ArrayRef = if view {
                Arc::new(StringViewArray::from_iter_values(strings))
            } else {
                Arc::new(StringArray::from_iter_values(strings))
            };
            RecordBatch::try_from_iter(vec![
                ("strings", strings),
                (
                    "random_numbers",
                    Arc::new(Int32Array::from(numbers)) as ArrayRef,
                ),
            ])
            .expect("string batch")
        })
        .collect()
}

/// `rows` rows of `(g, v)`: `g = row % groups`, `v = row` (unique), in batches of 8192.
pub fn groups_and_unique_values(rows: usize, groups: i64) -> Vec<RecordBatch> {
    (0..rows)
        .step_by(8192)
        .map(|start| {
            let range = start..(start + 8192).min(rows);
            RecordBatch::try_from_iter(vec![
                (
                    "g",
                    Arc::new(Int64Array::from_iter_values(
                        range.clone().map(|r| r as i64 % groups),
                    )) as ArrayRef,
                ),
                (
                    "v",
                    Arc::new(Int64Array::from_iter_values(range.map(|r| r as i64))) as ArrayRef,
                ),
            ])
            .expect("group batch")
        })
        .collect()
}

/// `rows` rows of `(id, payload)` where each payload is `row_bytes` long, in batches of
/// `batch_rows`; payload as `Utf8View` when `view`.
pub fn wide_rows(rows: usize, row_bytes: usize, batch_rows: usize, view: bool) -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "payload",
            if view {
                DataType::Utf8View
            } else {
                DataType::Utf8
            },
            false,
        ),
    ]));
    (0..rows)
        .step_by(batch_rows)
        .map(|start| {
            let range = start..(start + batch_rows).min(rows);
            let payload = range
                .clone()
                .map(|i| format!("{i:08}{}", "w".repeat(row_bytes)));
            let payload: ArrayRef = if view {
                Arc::new(StringViewArray::from_iter_values(payload))
            } else {
                Arc::new(StringArray::from_iter_values(payload))
            };
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(range.map(|i| i as i64))),
                    payload,
                ],
            )
            .expect("wide batch")
        })
        .collect()
}

/// `rows` rows of a nullable key `k` (`distinct_keys` values, about 2 % null) and a nullable
/// value column named `value_column` (0..60), from `seed`, in one batch.
pub fn keyed(rows: usize, value_column: &str, seed: u64, distinct_keys: u64) -> RecordBatch {
    let mut rng = Lcg::new(seed);
    let keys: Int32Array = (0..rows)
        .map(|_| (!rng.next().is_multiple_of(50)).then(|| (rng.next() % distinct_keys) as i32))
        .collect();
    let values: Int32Array = (0..rows).map(|_| Some((rng.next() % 60) as i32)).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int32, true),
        Field::new(value_column, DataType::Int32, true),
    ]));
    RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(values)]).expect("keyed batch")
}

/// `rows` rows of `(k, payload)`: `k` = 1..=rows, `payload` a distinct 40-odd-byte string,
/// in batches of `batch_rows`.
pub fn keys_and_payloads(rows: usize, batch_rows: usize) -> Vec<RecordBatch> {
    (1..=rows)
        .step_by(batch_rows)
        .map(|start| {
            let range = start..(start + batch_rows).min(rows + 1);
            let payload = range
                .clone()
                .map(|v| format!("payload-{v}-xxxxxxxxxxxxxxxxxxxxxxxx"));
            RecordBatch::try_from_iter(vec![
                (
                    "k",
                    Arc::new(Int64Array::from_iter_values(range.map(|v| v as i64))) as ArrayRef,
                ),
                (
                    "payload",
                    Arc::new(StringArray::from_iter_values(payload)) as ArrayRef,
                ),
            ])
            .expect("payload batch")
        })
        .collect()
}
