//! `tpch-cluster`: writes TPC-H Parquet files with `tpchgen` and runs the 22 queries on a
//! Ballista cluster through `SessionContext::remote`, for `scripts/run-cluster.sh`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ballista::prelude::SessionContextExt;
use ballista_governor::tpch;
use clap::Parser;
use datafusion::prelude::SessionContext;

/// Runs TPC-H on a Ballista cluster.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The scheduler, `host:port`.
    #[arg(long, default_value = "localhost:50050")]
    scheduler: String,
    /// Where the tables are (written there first when the folder has no `lineitem`).
    #[arg(long)]
    data: PathBuf,
    /// Scale factor of the tables to write.
    #[arg(long, default_value_t = 0.1)]
    sf: f64,
    /// Files per big table (one task per file in the scan stages).
    #[arg(long, default_value_t = 4)]
    parts: u16,
    /// Only write the tables.
    #[arg(long)]
    generate_only: bool,
    /// Also run every query in this process and compare the rows.
    #[arg(long)]
    verify: bool,
}

async fn run(args: Args) -> Result<bool, String> {
    if !args.data.join("lineitem").exists() {
        let started = Instant::now();
        tpch::write_tables(&args.data, args.sf, args.parts).map_err(|e| e.to_string())?;
        eprintln!("wrote TPC-H SF {} in {:.1?}", args.sf, started.elapsed());
    }
    if args.generate_only {
        return Ok(true);
    }
    let ctx = SessionContext::remote(&format!("df://{}", args.scheduler))
        .await
        .map_err(|e| format!("cannot reach the scheduler at {}: {e}", args.scheduler))?;
    tpch::register_tables(&ctx, &args.data)
        .await
        .map_err(|e| e.to_string())?;
    let local = if args.verify {
        Some(
            tpch::local_context(&args.data)
                .await
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let (mut completed, mut wrong) = (0, 0);
    let started = Instant::now();
    let queries = tpch::queries();
    for (n, sql) in &queries {
        let t = Instant::now();
        let result = async {
            let batches = ctx.sql(sql).await?.collect().await?;
            tpch::canonical_rows(&batches, false)
        }
        .await;
        match result {
            Ok(rows) => {
                completed += 1;
                let mut verdict = String::new();
                if let Some(local) = &local {
                    let expected = async {
                        let batches = local.sql(sql).await?.collect().await?;
                        tpch::canonical_rows(&batches, false)
                    }
                    .await
                    .map_err(|e| e.to_string())?;
                    if expected == rows {
                        verdict.push_str(" same rows as one process");
                    } else {
                        wrong += 1;
                        verdict.push_str(" ROWS DIFFER from one process");
                    }
                }
                println!(
                    "Q{n:02} ok {:>4} rows {:>8.2?}{verdict}",
                    rows.len(),
                    t.elapsed()
                );
            }
            Err(e) => {
                let message = e.to_string();
                let first = message.lines().next().unwrap_or("");
                println!("Q{n:02} FAILED {:>8.2?} {first}", t.elapsed());
            }
        }
    }
    println!(
        "completed {completed}/{} in {:.1?}{}",
        queries.len(),
        started.elapsed(),
        if args.verify {
            format!(", {wrong} with different rows")
        } else {
            String::new()
        }
    );
    Ok(completed == queries.len() && wrong == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match ballista_governor::cli::block_on_main("tpch-cluster", run(args)) {
        Some(true) => ExitCode::SUCCESS,
        Some(false) => ExitCode::from(3),
        None => ExitCode::FAILURE,
    }
}
