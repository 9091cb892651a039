//! TPC-H data generated in process (`tpchgen-arrow`) and the 22 queries of `tpch/queries.sql`.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use tpchgen::generators::{
    CustomerGenerator, LineItemGenerator, NationGenerator, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};
use tpchgen_arrow::{
    CustomerArrow, LineItemArrow, NationArrow, OrderArrow, PartArrow, PartSuppArrow, RegionArrow,
    SupplierArrow,
};

const QUERIES: &str = include_str!("../../tpch/queries.sql");

#[path = "../../tpch/queries.rs"]
mod query_file;

/// The 22 queries as `(number, sql)`, in order.
pub fn queries() -> Vec<(usize, String)> {
    let out = query_file::parse_queries(QUERIES);
    assert_eq!(out.len(), 22, "tpch/queries.sql must hold Q1..Q22");
    out
}

/// One generated table: name, schema, and `parts` partitions of batches.
pub struct Table {
    pub name: &'static str,
    pub schema: SchemaRef,
    pub partitions: Vec<Vec<RecordBatch>>,
}

/// All eight tables at scale factor `sf`, each split into `parts` partitions (the generators
/// produce disjoint parts, so the partitions can be scanned in parallel).
pub fn generate(sf: f64, parts: i32) -> Vec<Table> {
    fn collect<I>(iter: I) -> Vec<RecordBatch>
    where
        I: Iterator<Item = Result<RecordBatch, datafusion::arrow::error::ArrowError>>,
    {
        iter.map(|b| b.expect("tpchgen batch")).collect()
    }
    macro_rules! table {
        ($name:literal, $arrow:ident, $gen:ident) => {
            Table {
                name: $name,
                schema: $arrow::schema_ref(),
                partitions: (1..=parts)
                    .map(|p| collect($arrow::new($gen::new(sf, p, parts))))
                    .collect(),
            }
        };
    }
    vec![
        table!("lineitem", LineItemArrow, LineItemGenerator),
        table!("orders", OrderArrow, OrderGenerator),
        table!("customer", CustomerArrow, CustomerGenerator),
        table!("part", PartArrow, PartGenerator),
        table!("partsupp", PartSuppArrow, PartSuppGenerator),
        table!("supplier", SupplierArrow, SupplierGenerator),
        // nation and region are fixed-size; one partition each.
        Table {
            name: "nation",
            schema: NationArrow::schema_ref(),
            partitions: vec![collect(NationArrow::new(NationGenerator::new(sf, 1, 1)))],
        },
        Table {
            name: "region",
            schema: RegionArrow::schema_ref(),
            partitions: vec![collect(RegionArrow::new(RegionGenerator::new(sf, 1, 1)))],
        },
    ]
}

/// Registers `tables` in `ctx` as in-memory tables (sharing the batches' buffers).
pub fn register(ctx: &SessionContext, tables: &[Table]) {
    for t in tables {
        let mem = MemTable::try_new(Arc::clone(&t.schema), t.partitions.clone()).expect("memtable");
        ctx.register_table(t.name, Arc::new(mem)).expect("register");
    }
}
