//! All 22 TPC-H queries under several memory limits with DataFusion's `GreedyMemoryPool`, its
//! `FairSpillPool` (both in a `TrackConsumersPool`) and the governed pool; prints a markdown
//! table: queries completed per pool per limit, time relative to the unbounded run, peak RSS.
//!
//! ```text
//! cargo run --release -p datafusion-pool --example tpch_limits -- [--sf 1] [--limits 1G,256M,64M] [--partitions 4] [--timeout 300] [--runs 1]
//! ```
//!
//! Each (pool, limit) runs in a child process of this binary so that its peak RSS (`VmHWM`)
//! is its own. Every completed query's rows are checked against the unbounded run.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Outcome, PoolKind, context, make_pool, run, tpch};
use datafusion::prelude::SessionContext;

struct Args {
    sf: f64,
    limits: Vec<(String, Option<usize>)>,
    partitions: usize,
    timeout: Duration,
    /// Runs per query; the fastest completed run is reported (timings on a shared machine
    /// are noisy, the minimum is the least disturbed).
    runs: usize,
}

fn parse_size(s: &str) -> Result<usize, String> {
    SessionContext::parse_capacity_limit("limit", s).map_err(|e| e.to_string())
}

/// `--child POOL LIMIT`: run one configuration in this process.
type Child = Option<(PoolKind, Option<usize>)>;

fn args() -> Result<(Args, Child), String> {
    let mut a = Args {
        sf: 1.0,
        limits: Vec::new(),
        partitions: 4,
        timeout: Duration::from_mins(5),
        runs: 1,
    };
    let mut limits = "1G,256M,64M".to_owned();
    let mut child = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--sf" => a.sf = value()?.parse().map_err(|e| format!("--sf: {e}"))?,
            "--limits" => limits = value()?,
            "--partitions" => {
                a.partitions = value()?.parse().map_err(|e| format!("--partitions: {e}"))?;
            }
            "--timeout" => {
                a.timeout =
                    Duration::from_secs(value()?.parse().map_err(|e| format!("--timeout: {e}"))?);
            }
            "--runs" => {
                a.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?;
                if a.runs == 0 {
                    return Err("--runs must be at least 1".to_owned());
                }
            }
            "--child" => {
                let pool = match value()?.as_str() {
                    "greedy" => PoolKind::Greedy,
                    "fair" => PoolKind::Fair,
                    "governed" => PoolKind::Governed,
                    other => return Err(format!("unknown pool {other}")),
                };
                let limit = match value()?.as_str() {
                    "unbounded" => None,
                    l => Some(parse_size(l)?),
                };
                child = Some((pool, limit));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.limits.push(("unbounded".to_owned(), None));
    for l in limits.split(',').filter(|l| !l.is_empty()) {
        a.limits.push((l.to_owned(), Some(parse_size(l)?)));
    }
    Ok((a, child))
}

/// Runs the 22 queries with one pool and prints one line per query, then the peak RSS.
fn child(a: &Args, pool: PoolKind, limit: Option<usize>) {
    let tables = tpch::generate(a.sf, a.partitions as i32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pool, _governor) = make_pool(pool, limit);
    let ctx = context(pool, a.partitions, 10 * 1024 * 1024);
    tpch::register(&ctx, &tables);
    for (n, sql) in tpch::queries() {
        let mut outcome = rt.block_on(run(&ctx, &sql, a.timeout));
        for _ in 1..a.runs {
            let again = rt.block_on(run(&ctx, &sql, a.timeout));
            if let (Outcome::Done { elapsed: best, .. }, Outcome::Done { elapsed, .. }) =
                (&mut outcome, &again)
            {
                *best = (*best).min(*elapsed);
            }
        }
        let (status, ms, hash) = match &outcome {
            Outcome::Done { rows, elapsed, .. } => {
                let mut h = DefaultHasher::new();
                for r in rows {
                    r.as_ref().as_ref().hash(&mut h);
                }
                ("ok", elapsed.as_micros(), h.finish())
            }
            Outcome::Exhausted(m) => {
                eprintln!("Q{n} out of memory: {m}");
                ("oom", 0, 0)
            }
            Outcome::Failed(m) => {
                eprintln!("Q{n} failed: {m}");
                ("err", 0, 0)
            }
            Outcome::TimedOut => ("timeout", 0, 0),
        };
        println!("Q{n} {status} {ms} {hash}");
    }
    println!("PEAK_RSS {}", peak_rss());
}

/// The process's peak resident set (`VmHWM`), in bytes; 0 where /proc is unavailable.
fn peak_rss() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Default)]
struct Run {
    results: BTreeMap<usize, (String, u128, u64)>,
    peak_rss: usize,
}

fn spawn(a: &Args, pool: PoolKind, limit: &str) -> Run {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--sf",
            &a.sf.to_string(),
            "--partitions",
            &a.partitions.to_string(),
        ])
        .args(["--timeout", &a.timeout.as_secs().to_string()])
        .args(["--runs", &a.runs.to_string()])
        .args(["--child", pool.name(), limit])
        .output()
        .expect("spawn child");
    let mut run = Run::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["PEAK_RSS", b] => run.peak_rss = b.parse().unwrap_or(0),
            [q, status, ms, hash] => {
                let n = q.trim_start_matches('Q').parse().unwrap();
                run.results.insert(
                    n,
                    (
                        (*status).to_owned(),
                        ms.parse().unwrap(),
                        hash.parse().unwrap(),
                    ),
                );
            }
            _ => {}
        }
    }
    if run.results.len() != 22 {
        eprintln!(
            "{} at {limit}: child exited with {} after {} queries",
            pool.name(),
            out.status,
            run.results.len()
        );
    }
    run
}

fn main() {
    let (a, child_args) = match args() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tpch_limits: {e}");
            std::process::exit(2);
        }
    };
    if let Some((pool, limit)) = child_args {
        child(&a, pool, limit);
        return;
    }
    let started = Instant::now();
    // The baseline: DataFusion's unbounded pool (what Greedy and Fair are without a limit).
    let baseline = spawn(&a, PoolKind::Greedy, "unbounded");
    let base_ms: BTreeMap<usize, u128> = baseline.results.iter().map(|(n, r)| (*n, r.1)).collect();
    println!(
        "TPC-H SF {}, {} partitions, all 22 queries, best of {} run(s), timeout {:?} per query\n",
        a.sf, a.partitions, a.runs, a.timeout
    );
    println!(
        "| limit | pool | completed | wrong results | time ratio to unbounded (completed queries) | peak RSS | failed queries |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, _) in &a.limits {
        for pool in PoolKind::ALL {
            let r = if label == "unbounded" && pool != PoolKind::Governed {
                if pool == PoolKind::Greedy {
                    &baseline
                } else {
                    continue;
                }
            } else {
                &spawn(&a, pool, label)
            };
            let mut completed = 0;
            let mut wrong = 0;
            let (mut t, mut tb) = (0u128, 0u128);
            let mut failed = Vec::new();
            for (n, (status, ms, hash)) in &r.results {
                if status == "ok" {
                    completed += 1;
                    t += ms;
                    tb += base_ms.get(n).copied().unwrap_or(0);
                    if baseline.results.get(n).map(|b| b.2) != Some(*hash) {
                        wrong += 1;
                    }
                } else {
                    failed.push(format!("Q{n}:{status}"));
                }
            }
            let pool_name = if label == "unbounded" && pool == PoolKind::Greedy {
                "unbounded (DataFusion)"
            } else {
                pool.name()
            };
            println!(
                "| {label} | {pool_name} | {completed}/22 | {wrong} | {:.3} | {:.0} MiB | {} |",
                t as f64 / tb.max(1) as f64,
                r.peak_rss as f64 / 1_048_576.0,
                if failed.is_empty() {
                    "-".to_owned()
                } else {
                    failed.join(" ")
                },
            );
        }
    }
    eprintln!("total wall time {:.1?}", started.elapsed());
}
