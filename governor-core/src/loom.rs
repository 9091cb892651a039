//! The atomics the ledger uses, from `loom` under `--cfg loom` and from `std` otherwise, so the
//! model-checked code is the production code (the tokio pattern).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// Keeps a hot atomic on its own cache line so shards of different threads do not false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
