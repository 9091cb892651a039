//! [`BooksHandle`]: how a token keeps the governor's books alive without a shared reference
//! count on its hot path.
//!
//! A handle owns one strong count of the books' `Arc`, exactly like an `Arc` clone. The
//! difference is where the count comes from and goes to: a new token takes a count parked in
//! its thread's shard word in the same CAS that takes its bytes, and a dropped token parks its
//! count there in the same CAS that gives its bytes back (see the `ledger` module). Only when a
//! stash is empty, full or closed does a handle touch the `Arc`'s own counter. With a plain
//! `Arc`, every token would cost two more atomic operations on one cache line that all threads
//! share; measured, that was the difference between 1.3× and 1.0× of DataFusion's pool on one
//! thread (BENCHMARKS.md), and a line bouncing between all cores on many.
//!
//! No crate offers "a reference count sharded into someone else's atomic word", so this is our
//! own, kept to this file and the ledger's stash (model-checked with loom).

use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::books::Books;
use crate::engine::EngineId;

/// One owned strong count of an `Arc<Books>`.
///
/// Deliberately not `Drop`: the owner ([`ReservationToken`](crate::ReservationToken)) either
/// parks the count in a stash or calls [`release`](Self::release), as the last thing it does
/// with the books.
pub(crate) struct BooksHandle {
    books: NonNull<Books>,
}

// SAFETY: a handle is a counted pointer to `Books`, which is `Send + Sync`; it is as
// thread-safe as the `Arc<Books>` whose count it owns.
unsafe impl Send for BooksHandle {}
// SAFETY: as above; `&BooksHandle` only gives out `&Books`.
unsafe impl Sync for BooksHandle {}

impl BooksHandle {
    /// A handle for `books`. `from_stash`: the caller took a parked count out of a shard word
    /// and hands it over; otherwise a fresh count is taken from the `Arc`.
    pub(crate) fn new(books: &Arc<Books>, from_stash: bool) -> Self {
        let raw = if from_stash {
            Arc::as_ptr(books)
        } else {
            // A fresh count, owned by the handle from here on.
            Arc::into_raw(Arc::clone(books))
        };
        Self {
            // Kept as the `Arc`'s own pointer (not a `&Books`), so it may go back to
            // `Arc::from_raw` / `decrement_strong_count`.
            books: NonNull::new(raw.cast_mut()).expect("an Arc's pointer is never null"),
        }
    }

    /// Another handle to the same books, for a new token of `engine` (`split`).
    pub(crate) fn another(&self, engine: EngineId) -> Self {
        // SAFETY: `books` came from an `Arc<Books>` and this handle owns a count, so the
        // allocation is alive; `ManuallyDrop` keeps this borrowed `Arc` from giving the count
        // back.
        let books = ManuallyDrop::new(unsafe { Arc::from_raw(self.books.as_ptr()) });
        books.handle_for(engine)
    }

    /// The books. Valid as long as this handle owns its count.
    pub(crate) fn books(&self) -> &Books {
        // SAFETY: the handle owns a strong count, so the allocation is alive.
        unsafe { self.books.as_ref() }
    }

    /// True when both handles point to the same books.
    pub(crate) fn same_books(&self, other: &Self) -> bool {
        self.books == other.books
    }

    /// Drops the count this handle owns, possibly freeing the books.
    ///
    /// # Safety
    /// Call at most once per handle, only when its count was not parked in a stash, and do not
    /// use the handle (or any `&Books` obtained from it) afterwards.
    pub(crate) unsafe fn release(&self) {
        // SAFETY: the pointer came from an `Arc<Books>` and this handle owns one count of it
        // (the caller promises not to give it back twice).
        unsafe { Arc::decrement_strong_count(self.books.as_ptr()) }
    }
}
