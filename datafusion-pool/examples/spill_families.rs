//! The spilling queries of issue 11, each run N times per pool (`GreedyMemoryPool`,
//! `FairSpillPool`, both in a `TrackConsumersPool`, and the governed pool) and per limit;
//! prints a markdown table of how many runs passed (returned exactly the unbounded run's rows).
//!
//! ```text
//! cargo run -p datafusion-pool --example spill_families -- [--runs 10] [--families a,b,c,d] [--quick] [--load] [--timeout 120]
//! ```
//!
//! * `a`: `SELECT k, SUM(v), COUNT(*) FROM t GROUP BY k ORDER BY k`, 2 M rows, 1 M distinct
//!   keys, 2 partitions, DataFusion's default 10 MiB sort spill reservation, 48 and 96 MiB: a
//!   sorter above its share that goes quiet.
//! * `b`: `row_number() OVER (PARTITION BY v % 100 ORDER BY v DESC)` over 1 M values, 2
//!   partitions, a 256 KiB sort spill reservation, 2 to 64 MiB: a merge refused while a quiet
//!   sorter holds memory.
//! * `c`: `SELECT count(DISTINCT payload) FROM t`, 2 M distinct 40-byte strings, 2 partitions,
//!   16 MiB, 1 MiB sort spill reservation, on a current-thread runtime: an aggregate refused by
//!   the fair-share rule after it has spilled.
//! * `d`: a sort-merge join of two 2 M-row tables at 16 MiB with a 1 MiB merge reservation
//!   (`prefer_hash_join = false`), 2 partitions: a wait measured in wall time.
//!
//! `--quick` divides the rows, the limits and the sort spill reservations by 4 and runs 3 times unless `--runs` says
//! otherwise; `--load` keeps two busy-looping threads per core running for the whole
//! measurement. Families a, b and d run on a 2-worker runtime.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::scenarios::{Flavor, Lcg, MIB, keys_and_payloads};
use common::{Outcome, PoolKind, context, make_pool, run};
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::row::OwnedRow;
use datafusion::datasource::MemTable;
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::prelude::SessionContext;
use governor_core::EngineId;

struct Args {
    runs: usize,
    families: Vec<char>,
    quick: bool,
    load: bool,
    timeout: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        runs: 0,
        families: vec!['a', 'b', 'c', 'd'],
        quick: false,
        load: false,
        timeout: Duration::from_mins(2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--runs" => {
                a.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?;
                if a.runs == 0 {
                    return Err("--runs must be at least 1".to_owned());
                }
            }
            "--families" => {
                a.families = Vec::new();
                for f in value()?.split(',') {
                    match f.trim() {
                        "a" => a.families.push('a'),
                        "b" => a.families.push('b'),
                        "c" => a.families.push('c'),
                        "d" => a.families.push('d'),
                        other => return Err(format!("unknown family {other:?} (a, b, c or d)")),
                    }
                }
            }
            "--quick" => a.quick = true,
            "--load" => a.load = true,
            "--timeout" => {
                a.timeout =
                    Duration::from_secs(value()?.parse().map_err(|e| format!("--timeout: {e}"))?);
            }
            "--help" | "-h" => {
                return Err(
                    "usage: spill_families [--runs N] [--families a,b,c,d] [--quick] \
                            [--load] [--timeout SECS]"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.runs == 0 {
        a.runs = if a.quick { 3 } else { 10 };
    }
    Ok(a)
}

/// One family: its data, query and settings, at a scale (`1` or `4` for `--quick`).
struct Family {
    id: char,
    title: &'static str,
    sql: &'static str,
    /// The tables, made once per family.
    tables: Vec<(&'static str, Vec<Vec<RecordBatch>>)>,
    limits: Vec<usize>,
    partitions: usize,
    sort_reservation: usize,
    prefer_hash_join: bool,
    flavor: Flavor,
}

/// `rows` rows of `(k, v)` with `k` drawn from `keys` values (high cardinality) in two
/// partitions of batches of 8192.
fn keys_and_values(rows: usize, keys: u64) -> Vec<Vec<RecordBatch>> {
    let mut rng = Lcg::new(3);
    let batches: Vec<RecordBatch> = (0..rows)
        .step_by(8192)
        .map(|start| {
            let n = 8192.min(rows - start);
            let k = Int64Array::from_iter_values((0..n).map(|_| (rng.next() % keys) as i64));
            let v = Int64Array::from_iter_values((start..start + n).map(|i| (i % 1000) as i64));
            RecordBatch::try_from_iter(vec![
                ("k", Arc::new(k) as ArrayRef),
                ("v", Arc::new(v) as ArrayRef),
            ])
            .expect("batch")
        })
        .collect();
    halves(batches)
}

/// `rows` distinct payloads of 40 bytes, two partitions.
fn distinct_payloads(rows: usize) -> Vec<Vec<RecordBatch>> {
    let batches = (0..rows)
        .step_by(8192)
        .map(|start| {
            let n = 8192.min(rows - start);
            let payload = StringArray::from_iter_values(
                (start..start + n).map(|i| format!("payload-{i:012}-{:019}", i * 7)),
            );
            RecordBatch::try_from_iter(vec![("payload", Arc::new(payload) as ArrayRef)])
                .expect("batch")
        })
        .collect();
    halves(batches)
}

/// `batches` split into two partitions of alternate batches.
fn halves(batches: Vec<RecordBatch>) -> Vec<Vec<RecordBatch>> {
    let mut parts = vec![Vec::new(), Vec::new()];
    for (i, b) in batches.into_iter().enumerate() {
        parts[i % 2].push(b);
    }
    parts
}

fn family(id: char, scale: usize) -> Family {
    let rows = 2_000_000 / scale;
    let limit = |mib: usize| mib * MIB / scale;
    match id {
        'a' => Family {
            id,
            title: "GROUP BY k ORDER BY k, high-cardinality keys",
            sql: "SELECT k, SUM(v), COUNT(*) FROM t GROUP BY k ORDER BY k",
            tables: vec![("t", keys_and_values(rows, (rows / 2) as u64))],
            limits: vec![limit(48), limit(96)],
            partitions: 2,
            sort_reservation: 10 * MIB / scale,
            prefer_hash_join: true,
            flavor: Flavor::TwoWorkers,
        },
        'b' => Family {
            id,
            title: "row_number() OVER (PARTITION BY v % 100 ORDER BY v DESC)",
            sql: if scale == 1 {
                "SELECT v, row_number() OVER (PARTITION BY v % 100 ORDER BY v DESC) \
                 FROM generate_series(1, 1000000) AS t(v)"
            } else {
                "SELECT v, row_number() OVER (PARTITION BY v % 100 ORDER BY v DESC) \
                 FROM generate_series(1, 250000) AS t(v)"
            },
            tables: Vec::new(),
            limits: [2, 4, 8, 16, 32, 64].into_iter().map(limit).collect(),
            partitions: 2,
            sort_reservation: 256 * 1024 / scale,
            prefer_hash_join: true,
            flavor: Flavor::TwoWorkers,
        },
        'c' => Family {
            id,
            title: "count(DISTINCT payload), current-thread runtime",
            sql: "SELECT count(DISTINCT payload) FROM t",
            tables: vec![("t", distinct_payloads(rows))],
            limits: vec![limit(16)],
            partitions: 2,
            sort_reservation: MIB / scale,
            prefer_hash_join: true,
            flavor: Flavor::CurrentThread,
        },
        'd' => {
            let both = halves(keys_and_payloads(rows, 8192));
            Family {
                id,
                title: "sort-merge join, prefer_hash_join = false",
                sql: "SELECT count(*) FROM t_probe p JOIN t_build b ON p.k = b.k",
                tables: vec![("t_build", both.clone()), ("t_probe", both)],
                limits: vec![limit(16)],
                partitions: 2,
                sort_reservation: MIB / scale,
                prefer_hash_join: false,
                flavor: Flavor::TwoWorkers,
            }
        }
        _ => unreachable!("families are checked by args()"),
    }
}

async fn session(f: &Family, pool: Arc<dyn MemoryPool>) -> SessionContext {
    let ctx = context(pool, f.partitions, f.sort_reservation);
    for (name, parts) in &f.tables {
        let schema = parts[0][0].schema();
        let table = MemTable::try_new(schema, parts.clone()).expect("memtable");
        ctx.register_table(*name, Arc::new(table))
            .expect("register");
    }
    if !f.prefer_hash_join {
        ctx.sql("SET datafusion.optimizer.prefer_hash_join = false")
            .await
            .expect("set")
            .collect()
            .await
            .expect("set");
    }
    ctx
}

/// Pass counts and the first failure of each pool at one limit.
#[derive(Default)]
struct Tally {
    passed: usize,
    first_failure: Option<String>,
}

async fn measure(f: &Family, args: &Args) -> BTreeMap<(usize, PoolKind), Tally> {
    let want: Vec<OwnedRow> = match run(
        &session(f, Arc::new(UnboundedMemoryPool::default())).await,
        f.sql,
        args.timeout,
    )
    .await
    {
        Outcome::Done { rows, .. } => rows,
        other => panic!("family {}: the unbounded run failed: {other:?}", f.id),
    };
    let mut tallies = BTreeMap::new();
    for &limit in &f.limits {
        for kind in PoolKind::ALL {
            let tally: &mut Tally = tallies.entry((limit, kind)).or_default();
            for _ in 0..args.runs {
                let (pool, governor) = make_pool(kind, Some(limit));
                let ctx = session(f, pool).await;
                let outcome = run(&ctx, f.sql, args.timeout).await;
                drop(ctx);
                let failure = match outcome {
                    Outcome::Done { rows, .. } if rows == want => None,
                    Outcome::Done { rows, .. } => Some(format!(
                        "WRONG ROWS: {} rows, the unbounded run {}",
                        rows.len(),
                        want.len()
                    )),
                    Outcome::Exhausted(m) => Some(format!("exhausted: {m}")),
                    Outcome::Failed(m) => Some(format!("failed: {m}")),
                    Outcome::TimedOut => Some(format!("timed out after {:?}", args.timeout)),
                };
                match failure {
                    None => tally.passed += 1,
                    Some(m) => {
                        tally.first_failure.get_or_insert(m);
                    }
                }
                if let Some(g) = governor {
                    // A failed query's tasks drop their reservations asynchronously.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while g.reserved(EngineId::Query) != 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let left = g.reserved(EngineId::Query);
                    if left != 0 {
                        tally
                            .first_failure
                            .get_or_insert(format!("Query engine still holds {left} B"));
                    }
                }
            }
        }
    }
    tallies
}

/// Two busy-looping threads per core until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2 * cores)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn mib(bytes: usize) -> String {
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// `text` cut to `max` bytes on a character boundary, on one line.
fn short(text: &str, max: usize) -> String {
    let text = text.replace('\n', " ");
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let scale = if args.quick { 4 } else { 1 };
    let load = args.load.then(Load::start);
    let started = Instant::now();

    let mut table = vec![
        format!(
            "runs per cell: {}{}{}",
            args.runs,
            if args.quick {
                ", --quick (rows, limits and sort reservations / 4)"
            } else {
                ""
            },
            if args.load {
                ", under load (2 busy loops per core)"
            } else {
                ""
            }
        ),
        String::new(),
        "| family | query | limit | runtime | greedy | fair | governed |".to_owned(),
        "|---|---|---|---|---|---|---|".to_owned(),
    ];
    let mut notes = Vec::new();
    for &id in &args.families {
        let f = family(id, scale);
        let tallies = f.flavor.runtime().block_on(measure(&f, &args));
        for &limit in &f.limits {
            let cell = |k: PoolKind| format!("{}/{}", tallies[&(limit, k)].passed, args.runs);
            table.push(format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.id,
                f.title,
                mib(limit),
                f.flavor,
                cell(PoolKind::Greedy),
                cell(PoolKind::Fair),
                cell(PoolKind::Governed),
            ));
            for kind in PoolKind::ALL {
                if let Some(m) = &tallies[&(limit, kind)].first_failure {
                    notes.push(format!(
                        "- {} at {}, {}: {}",
                        f.id,
                        mib(limit),
                        kind.name(),
                        short(m, 400)
                    ));
                }
            }
        }
        // Print as we go: a full run takes a while.
        eprintln!("family {id} done after {:.0?}", started.elapsed());
    }
    drop(load);
    println!("{}", table.join("\n"));
    if !notes.is_empty() {
        println!("\nFirst failure per cell:\n{}", notes.join("\n"));
    }
}
