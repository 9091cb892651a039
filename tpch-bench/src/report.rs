//! `report`: the markdown table of a directory of result files (`run`'s and DuckDB's), every
//! completed query checked against the unbounded DataFusion run, and the time ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::canon;

/// The arguments of `report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Directory of the result files.
    #[arg(long)]
    pub dir: PathBuf,
}

/// The engines in the table's order; the reference first.
const ENGINES: [&str; 6] = [
    "unbounded",
    "greedy",
    "fair",
    "governed",
    "governed-safe",
    "duckdb",
];

/// How the report names an engine.
fn label(engine: &str) -> &str {
    match engine {
        "unbounded" => "DataFusion, unbounded (reference)",
        "greedy" => "DataFusion + GreedyMemoryPool",
        "fair" => "DataFusion + FairSpillPool",
        "governed" => "DataFusion + governed pool",
        "governed-safe" => "DataFusion + governed pool + memory_safe_state",
        "duckdb" => "DuckDB",
        other => other,
    }
}

/// The short name of an engine in the ratio table's header.
fn short(engine: &str) -> &str {
    match engine {
        "governed-safe" => "safe",
        "greedy" => "Greedy",
        "fair" => "Fair",
        "duckdb" => "DuckDB",
        other => other,
    }
}

/// One query's outcome in one configuration.
struct Query {
    /// `ok`, `oom`, `error` or `timeout`.
    status: String,
    /// Wall time in milliseconds.
    ms: f64,
    /// Whether its rows match the reference's: `None` when not completed or not checkable.
    right: Option<bool>,
}

/// One configuration's results.
struct Config {
    /// Engine name, one of [`ENGINES`].
    engine: String,
    /// The limit as given (`64M`), `None` for the reference.
    limit: Option<String>,
    /// The limit in bytes, for ordering.
    limit_bytes: u64,
    /// Peak RSS of its process(es).
    peak_rss: u64,
    /// Whether the run recorded every query it meant to.
    complete: bool,
    /// The queries it ran.
    queries: BTreeMap<u64, Query>,
    /// Where its rows files are.
    rows_dir: PathBuf,
    /// Mismatches found, for the notes.
    mismatches: Vec<String>,
}

impl Config {
    /// The completed queries.
    fn completed(&self) -> impl Iterator<Item = (&u64, &Query)> {
        self.queries.iter().filter(|(_, q)| q.status == "ok")
    }
}

/// Reads one result file.
fn read_config(path: &Path) -> Result<Config, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let name = v["config"]
        .as_str()
        .ok_or_else(|| format!("{}: no \"config\"", path.display()))?;
    let engine = v["engine"].as_str().unwrap_or_default().to_owned();
    let mut queries = BTreeMap::new();
    for q in v["queries"].as_array().into_iter().flatten() {
        let Some(n) = q["q"].as_u64() else { continue };
        queries.insert(
            n,
            Query {
                status: q["status"].as_str().unwrap_or("?").to_owned(),
                ms: q["ms"].as_f64().unwrap_or(0.0),
                right: None,
            },
        );
    }
    Ok(Config {
        engine,
        limit: v["limit"].as_str().map(str::to_owned),
        limit_bytes: v["limit_bytes"].as_u64().unwrap_or(u64::MAX),
        peak_rss: v["peak_rss_bytes"].as_u64().unwrap_or(0),
        complete: v["complete"].as_bool().unwrap_or(false),
        queries,
        rows_dir: path.with_file_name(format!("{name}.rows")),
        mismatches: Vec::new(),
    })
}

/// Checks every completed query of `config` against `reference`'s rows (read once each).
fn check(config: &mut Config, reference: &BTreeMap<u64, Vec<Vec<String>>>) {
    for (n, q) in &mut config.queries {
        if q.status != "ok" {
            continue;
        }
        let Some(want) = reference.get(n) else {
            continue;
        };
        let file = config.rows_dir.join(format!("q{n:02}.json"));
        let verdict = canon::read_rows(&file).and_then(|got| canon::same_rows(&got, want));
        q.right = Some(verdict.is_ok());
        if let Err(mut e) = verdict {
            if e.len() > 400 {
                let mut cut = 400;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
                e.push('…');
            }
            config.mismatches.push(format!("Q{n}: {e}"));
        }
    }
}

/// `a`'s summed time over `b`'s on the queries both completed, and how many those are.
fn ratio(a: &Config, b: &Config) -> Option<(f64, usize)> {
    let (mut ta, mut tb, mut n) = (0.0, 0.0, 0);
    for (q, qa) in a.completed() {
        if let Some(qb) = b.queries.get(q).filter(|qb| qb.status == "ok") {
            ta += qa.ms;
            tb += qb.ms;
            n += 1;
        }
    }
    (n > 0 && tb > 0.0).then(|| (ta / tb, n))
}

/// Prints the report of `args.dir`.
pub fn report(args: &ReportArgs) -> Result<ExitCode, String> {
    let entries =
        std::fs::read_dir(&args.dir).map_err(|e| format!("reading {}: {e}", args.dir.display()))?;
    let mut configs = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            configs.push(read_config(&path)?);
        }
    }
    if configs.is_empty() {
        return Err(format!("no result files in {}", args.dir.display()));
    }
    let reference_rows: BTreeMap<u64, Vec<Vec<String>>> =
        match configs.iter().find(|c| c.engine == "unbounded") {
            Some(r) => r
                .completed()
                .filter_map(|(n, _)| {
                    canon::read_rows(&r.rows_dir.join(format!("q{n:02}.json")))
                        .ok()
                        .map(|rows| (*n, rows))
                })
                .collect(),
            None => BTreeMap::new(),
        };
    for c in &mut configs {
        if c.engine != "unbounded" {
            check(c, &reference_rows);
        }
    }
    let rank = |e: &str| {
        ENGINES
            .iter()
            .position(|x| *x == e)
            .unwrap_or(ENGINES.len())
    };
    configs.sort_by(|a, b| {
        b.limit_bytes
            .cmp(&a.limit_bytes)
            .then(rank(&a.engine).cmp(&rank(&b.engine)))
    });

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| limit | configuration | completed | wrong results | time of completed (s) | peak RSS (MiB) | not completed |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for c in &configs {
        let completed = c.completed().count();
        let wrong = c
            .queries
            .values()
            .filter(|q| q.right == Some(false))
            .count();
        let unchecked = c.completed().filter(|(_, q)| q.right.is_none()).count();
        let time: f64 = c.completed().map(|(_, q)| q.ms).sum::<f64>() / 1e3;
        let failed: Vec<String> = c
            .queries
            .iter()
            .filter(|(_, q)| q.status != "ok")
            .map(|(n, q)| format!("Q{n} {}", q.status))
            .collect();
        let wrong_cell = if c.engine == "unbounded" {
            "(reference)".to_owned()
        } else if unchecked > 0 {
            format!("{wrong} ({unchecked} unchecked)")
        } else {
            wrong.to_string()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {completed}/{}{} | {wrong_cell} | {time:.2} | {:.0} | {} |",
            c.limit.as_deref().unwrap_or("none"),
            label(&c.engine),
            c.queries.len().max(22),
            if c.complete { "" } else { " (run incomplete)" },
            c.peak_rss as f64 / 1_048_576.0,
            if failed.is_empty() {
                "-".to_owned()
            } else {
                failed.join(", ")
            },
        );
    }

    // Ratios: on the queries both configurations completed, so each compares like with like.
    let _ = writeln!(
        out,
        "\nTime ratios, each on the queries both sides completed (count in brackets); below 1 means the first is faster:\n"
    );
    let pairs = [
        ("governed-safe", "greedy"),
        ("governed-safe", "fair"),
        ("governed-safe", "governed"),
        ("governed-safe", "duckdb"),
        ("governed", "greedy"),
        ("governed", "fair"),
        ("governed", "duckdb"),
    ];
    let _ = write!(out, "| limit |");
    for (a, b) in pairs {
        let _ = write!(out, " {} / {} |", short(a), short(b));
    }
    let _ = write!(out, "\n|---|");
    for _ in pairs {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    let mut limits: Vec<(u64, &str)> = configs
        .iter()
        .filter_map(|c| c.limit.as_deref().map(|l| (c.limit_bytes, l)))
        .collect();
    limits.sort_by(|a, b| b.cmp(a));
    limits.dedup();
    for (bytes, l) in limits {
        let find = |e: &str| {
            configs
                .iter()
                .find(|c| c.engine == e && c.limit_bytes == bytes)
        };
        let _ = write!(out, "| {l} |");
        for (a, b) in pairs {
            let cell = match (find(a), find(b)) {
                (Some(ca), Some(cb)) => match ratio(ca, cb) {
                    Some((r, n)) => format!("{r:.2}× ({n})"),
                    None => "-".to_owned(),
                },
                _ => "not run".to_owned(),
            };
            let _ = write!(out, " {cell} |");
        }
        let _ = writeln!(out);
    }

    let mismatches: Vec<String> = configs
        .iter()
        .flat_map(|c| {
            c.mismatches.iter().map(move |m| {
                format!(
                    "- {} at {}: {m}",
                    label(&c.engine),
                    c.limit.as_deref().unwrap_or("none")
                )
            })
        })
        .collect();
    if reference_rows.is_empty() {
        let _ = writeln!(out, "\nNo unbounded reference run: no result was checked.");
    } else if mismatches.is_empty() {
        let _ = writeln!(
            out,
            "\nNo result differs from the unbounded DataFusion run."
        );
    } else {
        let _ = writeln!(
            out,
            "\nResults that differ from the unbounded DataFusion run:\n"
        );
        for m in mismatches {
            let _ = writeln!(out, "{m}");
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
