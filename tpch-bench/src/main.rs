//! `tpch-bench`: the 22 TPC-H queries on Parquet files under one memory pool per process, for
//! issue 24's side-by-side run against DuckDB (`scripts/tpch-bench.sh` drives it and
//! `scripts/tpch_duckdb.py` is DuckDB's side).
//!
//! # Design
//!
//! `gen` writes the eight tables once with `tpchgen-arrow` through parquet's `ArrowWriter`,
//! so that DataFusion and DuckDB read *the same files*: the engines are compared on their
//! query processing, not on who generated or loaded data faster. Row groups hold 122 880 rows,
//! DuckDB's own default, so that neither engine's scan is favoured by the file layout.
//!
//! `run` measures one configuration (engine × limit) and nothing else in its process: the
//! peak RSS it reports (`VmHWM`) is then that configuration's own, and a query that leaves a
//! stuck thread behind cannot slow the next configuration. The tokio runtime has as many
//! workers as `--partitions`, matching DuckDB's `threads`. Each query runs as a task on the
//! runtime while the main thread waits on a plain channel with a deadline, so the timeout
//! holds even when the workers are blocked in synchronous code; a timed-out query is aborted,
//! and if its task does not end within a grace period the run writes what it has, marks
//! itself incomplete and exits, and the next invocation with the same `--out` resumes after
//! that query (see [`run`]).
//!
//! Results are compared as text ([`canon`]): each completed query's rows are written with
//! every value as text (decimals exact, floats always with an exponent), by this tool from
//! arrow and by `scripts/tpch_duckdb.py` from DuckDB's Python values, and `report` compares
//! them with the unbounded DataFusion run's rows in any order: decimals of the same scale
//! exactly, values whose types differ between the engines (DuckDB's `avg(DECIMAL)` is a
//! `DOUBLE`, DataFusion's a `DECIMAL`) within the coarser one's precision, floats within
//! 1e-8 relative (summation order differs between pools and between engines).
//!
//! `report` reads a directory of such JSON files and prints the markdown table of the
//! benchmark and the ratios issue 24 asks for.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod canon;
mod generate;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "tpch-bench",
    about = "TPC-H on Parquet under DataFusion's pools and the governed pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What to do.
#[derive(Subcommand, Debug)]
enum Command {
    /// Generate the eight TPC-H tables as Parquet files (skipped when already there).
    Gen {
        /// Scale factor.
        #[arg(long, default_value_t = 1.0)]
        sf: f64,
        /// Directory of the Parquet files.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run the 22 queries under one engine and limit, in this process.
    Run(run::RunArgs),
    /// Print the markdown table of a directory of results.
    Report(report::ReportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen { sf, dir } => generate::generate(sf, &dir),
        Command::Run(args) => run::run(&args),
        Command::Report(args) => report::report(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tpch-bench: {e}");
            ExitCode::from(2)
        }
    }
}
