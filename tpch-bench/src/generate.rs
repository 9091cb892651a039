//! `gen`: the eight TPC-H tables as Parquet files, written once per directory and scale factor.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

/// The table names, as the queries use them.
pub const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

/// Rows per row group: DuckDB's default row group size, so the layout favours neither engine.
const ROW_GROUP_ROWS: usize = 122_880;

/// The file saying the directory holds a complete data set, and at which scale factor.
fn marker(dir: &Path) -> PathBuf {
    dir.join(".tpch-complete")
}

/// The directory of `table`'s Parquet files under `dir` (one directory per table, which both
/// DataFusion's `register_parquet` and DuckDB's `read_parquet('dir/*.parquet')` read whole).
pub fn table_dir(dir: &Path, table: &str) -> PathBuf {
    dir.join(table)
}

/// Writes the tables at scale factor `sf` into `dir`, unless its marker says they are there.
pub fn generate(sf: f64, dir: &Path) -> Result<ExitCode, String> {
    if !(sf.is_finite() && sf > 0.0 && sf <= 1000.0) {
        return Err(format!("--sf must be in (0, 1000], got {sf}"));
    }
    let want = format!("sf={sf}\n");
    if std::fs::read_to_string(marker(dir)).is_ok_and(|m| m == want) {
        println!("data at SF {sf} already in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    // A marker for another scale factor, or none: whatever is there is not this data set.
    let _ = std::fs::remove_file(marker(dir));
    for t in TABLES {
        let d = table_dir(dir, t);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(|e| format!("removing {}: {e}", d.display()))?;
        }
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let start = std::time::Instant::now();
    // The two big tables in two files each (their generators make disjoint parts), so that
    // the tables can be generated on both cores at once; the others in one file.
    let jobs: Vec<Box<dyn FnOnce() -> Result<(), String> + Send + '_>> = vec![
        Box::new(move || {
            write_parts(dir, "lineitem", 2, &LineItemArrow::schema_ref(), |p, n| {
                Box::new(LineItemArrow::new(LineItemGenerator::new(sf, p, n)))
            })
        }),
        Box::new(move || {
            write_parts(dir, "orders", 2, &OrderArrow::schema_ref(), |p, n| {
                Box::new(OrderArrow::new(OrderGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "customer", 1, &CustomerArrow::schema_ref(), |p, n| {
                Box::new(CustomerArrow::new(CustomerGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "part", 1, &PartArrow::schema_ref(), |p, n| {
                Box::new(PartArrow::new(PartGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "partsupp", 1, &PartSuppArrow::schema_ref(), |p, n| {
                Box::new(PartSuppArrow::new(PartSuppGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "supplier", 1, &SupplierArrow::schema_ref(), |p, n| {
                Box::new(SupplierArrow::new(SupplierGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "nation", 1, &NationArrow::schema_ref(), |p, n| {
                Box::new(NationArrow::new(NationGenerator::new(sf, p, n)))
            })?;
            write_parts(dir, "region", 1, &RegionArrow::schema_ref(), |p, n| {
                Box::new(RegionArrow::new(RegionGenerator::new(sf, p, n)))
            })
        }),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs.into_iter().map(|j| s.spawn(j)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a generator thread panicked".into()))
            })
            .collect::<Result<Vec<()>, String>>()
    })?;
    std::fs::write(marker(dir), want).map_err(|e| format!("writing the marker: {e}"))?;
    println!(
        "generated SF {sf} into {} in {:.1?}",
        dir.display(),
        start.elapsed()
    );
    Ok(ExitCode::SUCCESS)
}

/// A generator's batches.
type Batches = Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>>>;

/// Writes `table` as `parts` files, part `p` of `parts` from `make(p, parts)`.
fn write_parts(
    dir: &Path,
    table: &str,
    parts: i32,
    schema: &SchemaRef,
    make: impl Fn(i32, i32) -> Batches,
) -> Result<(), String> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    for p in 1..=parts {
        let path = table_dir(dir, table).join(format!("{table}-{p}.parquet"));
        let err = |e: &dyn std::fmt::Display| format!("writing {}: {e}", path.display());
        let file = File::create(&path).map_err(|e| err(&e))?;
        let mut writer = ArrowWriter::try_new(file, Arc::clone(schema), Some(props.clone()))
            .map_err(|e| err(&e))?;
        for batch in make(p, parts) {
            writer
                .write(&batch.map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
        }
        writer.close().map_err(|e| err(&e))?;
    }
    Ok(())
}
