//! [`PrepaidPool`]: the memory pool of the hash joins the spilling join runs inside itself.
//!
//! The spilling join reserves what a bucket's join will need (its build batches, their
//! concatenated copy, the hash table) on its own reservation in the session's pool *before*
//! it starts DataFusion's `HashJoinExec` on that bucket. The inner join then books its own
//! `HashJoinInput` reservation here, and this pool pays it out of that prepaid reservation,
//! so the bucket's memory is booked exactly once in the governor, and an inner join whose
//! bucket was judged to fit cannot be refused for lack of what was set aside for it. What
//! the inner join asks beyond the prepaid bytes is asked of the session's pool through the
//! same reservation (and may be refused, like any other request).

use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use parking_lot::Mutex;

/// The join's reservation in the session's pool and how much of it the inner join has not
/// drawn yet.
#[derive(Debug)]
struct Books {
    /// The spilling join's reservation in the session's pool.
    outer: MemoryReservation,
    /// Bytes of `outer` the inner join may still draw without asking the session's pool.
    prepaid: usize,
    /// Bytes the inner join holds.
    drawn: usize,
    /// The most the join books for build sides it holds in memory (see
    /// [`PrepaidPool::try_reserve`]).
    cap: usize,
}

/// A [`MemoryPool`] whose every byte is booked on one reservation of another pool.
#[derive(Debug)]
pub(crate) struct PrepaidPool {
    books: Mutex<Books>,
}

impl PrepaidPool {
    /// A pool booking on `outer` (a reservation of the session's pool) that holds at most
    /// `cap` bytes for build sides.
    pub(crate) fn new(outer: MemoryReservation, cap: usize) -> Arc<Self> {
        Arc::new(Self {
            books: Mutex::new(Books {
                outer,
                prepaid: 0,
                drawn: 0,
                cap,
            }),
        })
    }

    /// Grows the join's own reservation by `bytes` (it buffers a batch before any inner join
    /// runs). Refused as the session's pool refuses, and when the reservation would pass the
    /// join's cap: the join then splits to disk rather than hold more than its part of the
    /// budget while the operators beside it run.
    pub(crate) fn try_reserve(&self, bytes: usize) -> Result<()> {
        let mut b = self.books.lock();
        let after = b.outer.size().saturating_add(bytes);
        if after > b.cap {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "a spilling hash join holds at most {} B of build side in memory, {after} B asked",
                b.cap
            )));
        }
        b.outer.try_grow(bytes)?;
        b.prepaid += bytes;
        Ok(())
    }

    /// Gives back everything the join holds that no inner join has drawn (its buffered
    /// batches are gone). What a running inner join holds stays booked until it shrinks.
    pub(crate) fn release_prepaid(&self) {
        let mut b = self.books.lock();
        let n = b.prepaid;
        b.outer.shrink(n);
        b.prepaid = 0;
    }
}

impl std::fmt::Display for PrepaidPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.books.lock();
        write!(
            f,
            "SpillingHashJoinPrepaid({} B drawn, {} B prepaid)",
            b.drawn, b.prepaid
        )
    }
}

impl MemoryPool for PrepaidPool {
    fn name(&self) -> &'static str {
        "SpillingHashJoinPrepaid"
    }

    fn register(&self, _consumer: &MemoryConsumer) {}

    fn unregister(&self, _consumer: &MemoryConsumer) {}

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        let mut b = self.books.lock();
        let from_prepaid = additional.min(b.prepaid);
        b.prepaid -= from_prepaid;
        // `grow` cannot fail: what the prepaid bytes do not cover is booked as the session's
        // pool books an infallible grow (the governed pool records it as overcommit).
        b.outer.grow(additional - from_prepaid);
        b.drawn += additional;
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        let mut b = self.books.lock();
        let n = shrink.min(b.drawn);
        b.drawn -= n;
        b.outer.shrink(n);
    }

    fn try_grow(&self, _reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut b = self.books.lock();
        let from_prepaid = additional.min(b.prepaid);
        let rest = additional - from_prepaid;
        if rest > 0 {
            b.outer.try_grow(rest)?;
        }
        b.prepaid -= from_prepaid;
        b.drawn += additional;
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.books.lock().drawn
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Unknown
    }
}
