//! A query result as text, and the comparison that decides whether two results are the same.
//!
//! # The rows file
//!
//! Each completed query's result is written as `{"rows": [["v", ...], ...]}`: every value as
//! text, NULL as `NULL`, rows in the engine's order. Both engines write it, this crate from
//! arrow and `scripts/tpch_duckdb.py` from DuckDB's Python values, with the same rules:
//! * integers, strings and dates as arrow displays them (which is Python's `str` of DuckDB's
//!   values, dates as ISO 8601);
//! * decimals exactly, as fixed-point text (`123.4500`: arrow's display, Python's
//!   `str(Decimal)`);
//! * floating-point numbers always with an exponent (`1.5e0`), the shortest text that reads
//!   back as the same double. The exponent is how [`same_value`] tells a float from a
//!   decimal without a type: a decimal is exact, a float is not.
//!
//! # The comparison
//!
//! [`same_rows`] sorts both row lists (by a key in which numbers are coarsened to 6
//! significant digits, so that two engines' near-equal floats sort alike) and compares them
//! value by value with [`same_value`]:
//! * equal text is equal;
//! * two decimals of the same scale must be equal exactly (DataFusion against DataFusion:
//!   every TPC-H column is a decimal, so a pool that changes one cent is caught);
//! * two decimals of different scales, or a decimal and a float, may differ by one unit in
//!   the last place of the coarser decimal (DuckDB gives some columns another scale than
//!   DataFusion, and `avg` of a decimal is a `DOUBLE` in DuckDB but a `DECIMAL` rounded to 6
//!   places in DataFusion);
//! * two floats may differ by 1e-8 relative (summation order differs between pools, between
//!   a spilled and an in-memory aggregate, and between engines).

use std::path::Path;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float16Type, Float32Type, Float64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Value, json};

/// The text of every value of `batches`, row by row.
pub fn render(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<Column<'_>> = batch
            .columns()
            .iter()
            .map(|c| Column::new(c.as_ref(), &options))
            .collect::<Result<_, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(columns.iter().map(|c| c.render(row)).collect());
        }
    }
    Ok(rows)
}

/// Writes `batches` as a rows file (see the module doc) at `path`.
pub fn write_rows(batches: &[RecordBatch], path: &Path) -> Result<(), String> {
    let text =
        serde_json::to_string(&json!({ "rows": render(batches)? })).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Reads a rows file.
pub fn read_rows(path: &Path) -> Result<Vec<Vec<String>>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let bad = || format!("{}: not a rows file", path.display());
    v["rows"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|r| {
            r.as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|f| f.as_str().map(str::to_owned).ok_or_else(bad))
                .collect()
        })
        .collect()
}

/// A float in the rows file's form: the shortest round-trip text, always with an exponent.
pub fn float_text(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        // -0.0 and 0.0 are the same number for a result's purposes.
        format!("{:e}", if x == 0.0 { 0.0 } else { x })
    }
}

/// One column's renderer.
enum Column<'a> {
    /// A floating-point column, by [`float_text`].
    Float(&'a dyn Array),
    /// Arrow's display.
    Display(ArrayFormatter<'a>),
}

impl<'a> Column<'a> {
    /// The renderer for `array`.
    fn new(array: &'a dyn Array, options: &FormatOptions<'a>) -> Result<Self, String> {
        Ok(match array.data_type() {
            DataType::Float16 | DataType::Float32 | DataType::Float64 => Column::Float(array),
            _ => {
                Column::Display(ArrayFormatter::try_new(array, options).map_err(|e| e.to_string())?)
            }
        })
    }

    /// Row `row`'s text.
    fn render(&self, row: usize) -> String {
        match self {
            Column::Float(a) if a.is_null(row) => "NULL".to_owned(),
            Column::Float(a) => float_text(match a.data_type() {
                DataType::Float16 => f64::from(a.as_primitive::<Float16Type>().value(row)),
                DataType::Float32 => f64::from(a.as_primitive::<Float32Type>().value(row)),
                _ => a.as_primitive::<Float64Type>().value(row),
            }),
            Column::Display(f) => f.value(row).to_string(),
        }
    }
}

/// The number of digits after the point of a decimal's text (`-12.340`: 3, `7`: 0), or
/// `None` when `s` is not fixed-point text (a float, a string, a date).
fn scale(s: &str) -> Option<usize> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    (!int.is_empty() && all_digits(int) && all_digits(frac)).then_some(frac.len())
}

/// Whether two values' texts denote the same value (see the module doc for the rules).
pub fn same_value(left: &str, right: &str) -> bool {
    if left == right {
        return true;
    }
    let is_float = |s: &str| s.contains('e') && s.parse::<f64>().is_ok();
    let (Ok(lv), Ok(rv)) = (left.parse::<f64>(), right.parse::<f64>()) else {
        return false;
    };
    let tolerance = match (scale(left), scale(right)) {
        // Same scale, different text: different decimals.
        (Some(ls), Some(rs)) if ls == rs => return false,
        (Some(ls), Some(rs)) => 10f64.powi(-(ls.min(rs) as i32)),
        (Some(digits), None) | (None, Some(digits)) if is_float(left) || is_float(right) => {
            10f64.powi(-(digits as i32)) + 1e-8 * lv.abs().max(rv.abs())
        }
        (None, None) if is_float(left) && is_float(right) => 1e-8 * lv.abs().max(rv.abs()),
        _ => return false,
    };
    (lv - rv).abs() <= tolerance
}

/// A row's sort key: numbers coarsened to 6 significant digits, everything else as is.
fn sort_key(row: &[String]) -> Vec<String> {
    row.iter()
        .map(|v| match v.parse::<f64>() {
            Ok(x) if scale(v).is_some() || v.contains('e') => {
                format!("{:.5e}", if x == 0.0 { 0.0 } else { x })
            }
            _ => v.clone(),
        })
        .collect()
}

/// `rows` in the order of their [`sort_key`]s.
fn sorted(rows: &[Vec<String>]) -> Vec<&Vec<String>> {
    let mut keyed: Vec<(Vec<String>, &Vec<String>)> =
        rows.iter().map(|r| (sort_key(r), r)).collect();
    keyed.sort();
    keyed.into_iter().map(|(_, r)| r).collect()
}

/// Whether two results hold the same rows in any order; `Err` says where they differ.
pub fn same_rows(a: &[Vec<String>], b: &[Vec<String>]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} rows against {}", a.len(), b.len()));
    }
    for (i, (ra, rb)) in sorted(a).into_iter().zip(sorted(b)).enumerate() {
        let same = ra.len() == rb.len() && ra.iter().zip(rb).all(|(x, y)| same_value(x, y));
        if !same {
            return Err(format!("sorted row {i}: {ra:?} against {rb:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(r: &[&[&str]]) -> Vec<Vec<String>> {
        r.iter()
            .map(|r| r.iter().map(|s| (*s).to_owned()).collect())
            .collect()
    }

    #[test]
    fn floats_always_carry_an_exponent() {
        assert_eq!(float_text(1.5), "1.5e0");
        assert_eq!(float_text(-0.0), "0e0");
        assert_eq!(float_text(12_345.678), "1.2345678e4");
        assert_eq!("1.2345678e4".parse::<f64>(), Ok(12_345.678));
    }

    #[test]
    fn decimals_of_one_scale_compare_exactly() {
        assert!(same_value("123.45", "123.45"));
        assert!(!same_value("123.45", "123.46"));
        assert!(!same_value("38273.129735", "38273.129736"));
    }

    #[test]
    fn other_types_compare_within_their_precision() {
        // DuckDB's avg as a double against DataFusion's decimal rounded to 6 places.
        assert!(same_value("38273.129735", "3.827312973462e4"));
        assert!(!same_value("38273.129735", "3.8273131e4"));
        // Scales 2 and 4.
        assert!(same_value("0.05", "0.0500"));
        assert!(!same_value("0.05", "0.0700"));
        // Floats summed in another order.
        assert!(same_value("1.0000000000000002e0", "1e0"));
        assert!(!same_value("1.001e0", "1e0"));
        // Text is text.
        assert!(!same_value("Supplier#1", "Supplier#2"));
        assert!(!same_value("1995-03-15", "1995-03-16"));
        assert!(!same_value("NULL", "0"));
    }

    #[test]
    fn rows_compare_in_any_order() {
        let a = rows(&[&["A", "1.5e0"], &["B", "2"]]);
        let b = rows(&[&["B", "2"], &["A", "1.5000000000001e0"]]);
        assert_eq!(same_rows(&a, &b), Ok(()));
        let c = rows(&[&["B", "3"], &["A", "1.5e0"]]);
        assert!(same_rows(&a, &c).is_err());
        assert!(same_rows(&a, &a[..1]).is_err());
    }
}
