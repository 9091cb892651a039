//! Batches in buffers of their own, so that what holds a few rows is charged (and keeps
//! alive) only those rows.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;

/// Bytes a batch may hold beyond twice what its rows use before [`shed_slack`] copies it:
/// below this, a copy costs more than it frees.
const SLACK: usize = 64 * 1024;

/// Rows `from..to` of `batch` in buffers of their own.
///
/// A batch read from a spill file holds all its columns in slices of one buffer (the IPC
/// message body), and string views point into the data buffers they were taken from. Each
/// column's memory size then counts the whole shared buffer, and whatever holds on to a
/// few rows (a `TopK` above the join keeping 100 of them, an output batch taken from a
/// bucket's build side) keeps, and is charged, the whole file batch: TPC-H Q2 at a scaled
/// 64 MiB had a `TopK` charged 4.1 MiB for its 100 rows. A copy (views garbage-collected)
/// holds and is charged what it has.
pub(crate) fn copy_rows(batch: &RecordBatch, from: usize, to: usize) -> Result<RecordBatch> {
    let idx = UInt32Array::from_iter_values(from as u32..to as u32);
    let taken = take_record_batch(batch, &idx)?;
    let columns: Vec<ArrayRef> = taken
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => Arc::clone(c),
        })
        .collect();
    Ok(RecordBatch::try_new(taken.schema(), columns)?)
}

/// `batch` copied into buffers of its own when its columns hold far more memory than its
/// rows use; otherwise `batch` as it is.
///
/// Two things make a join's output batch hold more than its rows: buffers allocated for a
/// full batch and finished with a few rows (a semi join's last rows, a coalescer flushed at
/// the end: 3 rows holding 1.1 MiB in TPC-H Q2), and string views taken from the build side,
/// which keep the build side's whole data buffers. An operator above that keeps such batches
/// (`TopK` keeps every batch one of its rows is in) is charged for all of it, and keeps it
/// alive. Dense batches are left alone, so a join whose output is full-sized pays only the
/// check.
pub(crate) fn shed_slack(batch: RecordBatch) -> Result<RecordBatch> {
    let mut used = 0usize;
    let mut held = 0usize;
    for c in batch.columns() {
        held = held.saturating_add(c.get_array_memory_size());
        used = used.saturating_add(match view_bytes(c) {
            Some((data, _)) => data.saturating_add(c.len().saturating_mul(16)),
            None => c.to_data().get_slice_memory_size().unwrap_or(usize::MAX),
        });
    }
    if held <= used.saturating_mul(2).saturating_add(SLACK) {
        return Ok(batch);
    }
    copy_rows(&batch, 0, batch.num_rows())
}

/// Bytes a view column's views point at and the bytes of the data buffers it holds.
fn view_bytes(c: &ArrayRef) -> Option<(usize, usize)> {
    match c.data_type() {
        DataType::Utf8View => {
            let a = c.as_string_view();
            Some((
                a.total_bytes_len(),
                a.data_buffers()
                    .iter()
                    .map(datafusion::arrow::buffer::Buffer::len)
                    .sum(),
            ))
        }
        DataType::BinaryView => {
            let a = c.as_binary_view();
            Some((
                a.total_bytes_len(),
                a.data_buffers()
                    .iter()
                    .map(datafusion::arrow::buffer::Buffer::len)
                    .sum(),
            ))
        }
        _ => None,
    }
}
