//! TPC-H for a cluster: tables written as Parquet files by `tpchgen` (Ballista ships plans,
//! not in-memory tables, so every process must be able to read the data), the 22 queries,
//! and a canonical form of results for comparing a cluster with one process.

use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::error::{DataFusionError, Result};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

/// The 22 queries, shared with `datafusion-pool`'s TPC-H tests.
const QUERIES: &str = include_str!("../../datafusion-pool/tpch/queries.sql");

/// The eight table names.
pub const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

#[path = "../../datafusion-pool/tpch/queries.rs"]
mod query_file;

/// The 22 queries as `(number, sql)`, in order, without trailing semicolons.
pub fn queries() -> Vec<(usize, String)> {
    query_file::parse_queries(QUERIES)
}

/// Writes every table at scale factor `sf` under `dir` as `dir/<table>/part-<i>.parquet`,
/// the big tables in `parts` files (nation and region in one). Returns `dir`.
///
/// # Errors
/// A scale factor that is not positive and finite, `parts` of 0, or an I/O or Parquet error.
pub fn write_tables(dir: &Path, sf: f64, parts: u16) -> Result<PathBuf> {
    if !(sf.is_finite() && sf > 0.0) || parts == 0 {
        return Err(DataFusionError::Configuration(format!(
            "TPC-H needs a positive scale factor and at least one part (got {sf}, {parts})"
        )));
    }
    let parts = i32::from(parts);
    macro_rules! table {
        ($name:literal, $arrow:ident, $gen:ident, $parts:expr) => {{
            let n = $parts;
            for p in 1..=n {
                let batches = $arrow::new($gen::new(sf, p, n));
                write_file(&dir.join($name), p, $arrow::schema_ref(), batches)?;
            }
        }};
    }
    table!("lineitem", LineItemArrow, LineItemGenerator, parts);
    table!("orders", OrderArrow, OrderGenerator, parts);
    table!("customer", CustomerArrow, CustomerGenerator, parts);
    table!("part", PartArrow, PartGenerator, parts);
    table!("partsupp", PartSuppArrow, PartSuppGenerator, parts);
    table!("supplier", SupplierArrow, SupplierGenerator, parts);
    table!("nation", NationArrow, NationGenerator, 1);
    table!("region", RegionArrow, RegionGenerator, 1);
    Ok(dir.to_path_buf())
}

fn write_file(
    table_dir: &Path,
    part: i32,
    schema: SchemaRef,
    batches: impl Iterator<Item = std::result::Result<RecordBatch, ArrowError>>,
) -> Result<()> {
    std::fs::create_dir_all(table_dir)?;
    let file = File::create(table_dir.join(format!("part-{part}.parquet")))?;
    let mut writer = ArrowWriter::try_new(file, schema, None)?;
    for batch in batches {
        writer.write(&batch?)?;
    }
    writer.close()?;
    Ok(())
}

/// Registers the tables written by [`write_tables`] under `dir` in `ctx`.
///
/// # Errors
/// When a table's folder cannot be listed or read.
pub async fn register_tables(ctx: &SessionContext, dir: &Path) -> Result<()> {
    for table in TABLES {
        let path = dir.join(table);
        let path = path.to_str().ok_or_else(|| {
            DataFusionError::Configuration(format!("{} is not UTF-8", path.display()))
        })?;
        ctx.register_parquet(table, path, ParquetReadOptions::default())
            .await?;
    }
    Ok(())
}

/// `batches` as one line per row, floats rounded to 6 significant digits (a distributed
/// aggregate adds in another order), and the lines sorted unless `ordered`: the form in which
/// a cluster's result must equal one process's.
///
/// # Errors
/// When a value cannot be formatted.
pub fn canonical_rows(batches: &[RecordBatch], ordered: bool) -> Result<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            let mut cells = Vec::with_capacity(formatters.len());
            for (col, formatter) in batch.columns().iter().zip(&formatters) {
                let text = formatter.value(row).to_string();
                cells.push(match col.data_type() {
                    DataType::Float16 | DataType::Float32 | DataType::Float64 => {
                        text.parse::<f64>().map_or(text, |v| format!("{v:.6e}"))
                    }
                    _ => text,
                });
            }
            rows.push(cells.join("|"));
        }
    }
    if !ordered {
        rows.sort();
    }
    Ok(rows)
}

/// A single-process context over the same files, for reference results.
///
/// # Errors
/// Those of [`register_tables`].
pub async fn local_context(dir: &Path) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    register_tables(&ctx, dir).await?;
    Ok(ctx)
}
