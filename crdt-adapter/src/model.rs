//! The byte model: what a resident document is charged, from figures known before it is
//! loaded (its stored size and operation count) and cheap to keep current after edits.
//!
//! ```text
//! charge = DOC_BASE_BYTES + BYTES_PER_OP × ops + BYTES_PER_ENCODED × encoded
//! ```
//!
//! `ops` is the document's operation count (loro's `len_ops`, or, before a load, the span
//! of the stored blobs' version vectors); `encoded` is the size of the loro encoding the
//! document was built from: its snapshot and logged updates at load, plus every update
//! imported and every local edit's exported delta since. The operation term pays for
//! history bookkeeping (change metadata, id spans, the state's per-element structures), the
//! encoded term for content (text, values, peer tables), which an operation count alone
//! misses (one map insert of a 1 MiB string is one op).
//!
//! Calibration: `tests/jemalloc_books.rs` builds documents of three kinds (typed text,
//! map writes of mixed sizes, list pushes), loads them from their stored form and reads
//! their full value, and compares the charge with the net bytes jemalloc's thread
//! counters (`thread.allocatedp` − `thread.deallocatedp`) saw the load keep. The constants
//! below are the smallest round figures that keep the charge at or above the measured
//! bytes for all three; the test prints the ratios and fails if a kind falls below 1.0×
//! or above the bound it states. Measured ratios are in the crate documentation.

/// Fixed bytes of an empty loaded document (its arenas, maps and configuration).
pub const DOC_BASE_BYTES: usize = 24 * 1024;

/// Bytes charged per operation of history.
pub const BYTES_PER_OP: usize = 48;

/// Bytes charged per byte of loro encoding the document was built from.
pub const BYTES_PER_ENCODED: usize = 4;

/// The charge of a document with `ops` operations built from `encoded` bytes, saturating.
pub fn charge(ops: usize, encoded: usize) -> usize {
    DOC_BASE_BYTES
        .saturating_add(BYTES_PER_OP.saturating_mul(ops))
        .saturating_add(BYTES_PER_ENCODED.saturating_mul(encoded))
}

/// Operations a blob adds, from its metadata (the span between its version vectors).
pub(crate) fn blob_ops(meta: &loro::ImportBlobMetadata) -> usize {
    let end: usize = meta
        .partial_end_vv
        .values()
        .map(|c| usize::try_from(*c).unwrap_or(0))
        .sum();
    let start: usize = meta
        .partial_start_vv
        .values()
        .map(|c| usize::try_from(*c).unwrap_or(0))
        .sum();
    end.saturating_sub(start)
}
