//! RAII reservations: a [`ReservationToken`] *is* the memory it accounts for.
//!
//! There is no `release()` to forget or to call twice: dropping the token gives its bytes back,
//! and every method that gives bytes back checks that the token holds them first, so a token can
//! never release more than it holds and the books cannot underflow.

use std::fmt;
use std::sync::Arc;

use crate::books::{Books, NO_NODE, thread_shard};
use crate::engine::EngineId;
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::handle::BooksHandle;
use crate::ledger::Ledger;

/// Bytes of one engine's budget, held until the token is dropped.
///
/// Obtained from [`MemoryGovernor::try_reserve`], [`MemoryGovernor::reserve`] or
/// [`MemoryGovernor::charge`]. A zero-sized token is cheap and is the usual starting point for a
/// consumer that grows as it goes (`governor.try_reserve(engine, 0)`).
///
/// ```
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
///
/// let config = GovernorConfig::builder()
///     .global_ceiling(mib(64))
///     .engine(EngineId::Vector, EngineBudget::new(mib(32)))
///     .build()?;
/// let governor = MemoryGovernor::new(config)?;
/// let mut token = governor.try_reserve(EngineId::Vector, mib(8))?;
/// token.try_grow(mib(8))?;
/// assert_eq!(governor.reserved(EngineId::Vector), mib(16));
/// drop(token);
/// assert_eq!(governor.reserved(EngineId::Vector), 0);
/// # Ok::<(), governor_core::MemError>(())
/// ```
pub struct ReservationToken {
    books: BooksHandle,
    engine: EngineId,
    /// The NUMA node the bytes count against, or `NO_NODE`.
    node: u16,
    size: usize,
}

impl ReservationToken {
    /// Wraps bytes the ledger has already admitted for `engine`.
    pub(crate) fn new(books: BooksHandle, engine: EngineId, node: u16, size: usize) -> Self {
        Self {
            books,
            engine,
            node,
            size,
        }
    }

    fn books(&self) -> &Books {
        self.books.books()
    }

    /// Bytes this token holds.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The engine whose budget this token draws on.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// The NUMA node this token's bytes count against, when the governor bounds nodes
    /// (`None` otherwise, or for a node without a sub-ceiling row).
    pub fn numa_node(&self) -> Option<usize> {
        (self.node != NO_NODE).then_some(usize::from(self.node))
    }

    /// The governor this token belongs to, or `None` once every `Arc<MemoryGovernor>` has
    /// been dropped (the token still gives its bytes back to the governor's books when dropped).
    pub fn governor(&self) -> Option<Arc<MemoryGovernor>> {
        self.books().owner.upgrade()
    }

    /// Takes `bytes` more from the engine's budget, or fails without changing anything.
    pub fn try_grow(&mut self, bytes: usize) -> Result<(), MemError> {
        self.books().admit(self.engine, self.node, bytes)?;
        // Cannot overflow: the bytes were admitted under a limit of at most `MAX_BYTES`, and
        // the token's own bytes are counted in the same books.
        self.size += bytes;
        Ok(())
    }

    /// Books `bytes` more that are already allocated, even past the limit or the ceiling; the
    /// excess is reported as overcommit and raises pressure. For infallible paths only.
    ///
    /// The token never passes [`MAX_BYTES`](crate::MAX_BYTES): a growth beyond it cannot be
    /// real memory, so it is booked only up to that bound and logged as an error (see
    /// [`MemoryGovernor::charge`]).
    pub fn force_grow(&mut self, bytes: usize) {
        let room = crate::MAX_BYTES.saturating_sub(self.size);
        let booked = bytes.min(room);
        if booked < bytes {
            tracing::error!(engine = %self.engine, size = self.size, bytes, booked, "force_grow beyond MAX_BYTES clamped; the size cannot be real memory");
        }
        self.books().book_resident(self.engine, self.node, booked);
        self.size += booked;
    }

    /// Gives `bytes` back. Giving back more than the token holds is an error and changes nothing.
    pub fn shrink(&mut self, bytes: usize) -> Result<(), MemError> {
        self.check_held(bytes)?;
        self.size -= bytes;
        self.books().give_back(self.engine, self.node, bytes);
        Ok(())
    }

    /// Grows or shrinks the token to exactly `new_size` bytes.
    pub fn try_resize(&mut self, new_size: usize) -> Result<(), MemError> {
        if new_size >= self.size {
            self.try_grow(new_size - self.size)
        } else {
            self.shrink(self.size - new_size)
        }
    }

    /// Moves `bytes` of this token into a new token of the same engine; the ledger is untouched.
    pub fn split(&mut self, bytes: usize) -> Result<ReservationToken, MemError> {
        self.check_held(bytes)?;
        self.size -= bytes;
        Ok(ReservationToken::new(
            self.books.another(self.engine),
            self.engine,
            self.node,
            bytes,
        ))
    }

    /// Absorbs `other` into this token. Both must belong to the same governor, engine and
    /// NUMA node; otherwise `other` is handed back unchanged.
    pub fn merge(&mut self, mut other: ReservationToken) -> Result<(), ReservationToken> {
        if other.engine != self.engine
            || other.node != self.node
            || !other.books.same_books(&self.books)
        {
            return Err(other);
        }
        self.size += std::mem::take(&mut other.size);
        Ok(())
    }

    /// Refuses to take more out of the token than it holds.
    fn check_held(&self, bytes: usize) -> Result<(), MemError> {
        if bytes > self.size {
            return Err(MemError::ShrinkBeyondHeld {
                engine: self.engine,
                requested: bytes,
                held: self.size,
            });
        }
        Ok(())
    }

    /// Gives everything back now and returns how many bytes that was; the token stays usable
    /// (at size 0).
    pub fn free(&mut self) -> usize {
        let bytes = std::mem::take(&mut self.size);
        self.books().give_back(self.engine, self.node, bytes);
        bytes
    }
}

impl Drop for ReservationToken {
    fn drop(&mut self) {
        let shard = thread_shard();
        let books = self.books.books();
        books.release_node(self.node, self.size);
        let row = books.row(self.engine);
        let applied = books
            .ledger
            .plan_release(row, shard, self.size, true)
            .apply();
        if applied.handle_stashed {
            // The count is parked in the stash: the books may be gone already.
            return;
        }
        books.finish_release(self.engine, applied.trimmed, applied.moved);
        if Ledger::stash_handle(row.shard_word(shard)) {
            return;
        }
        // SAFETY: the count was not parked, this is the handle's only release, and neither the
        // handle nor `books` is used after it.
        unsafe { self.books.release() }
    }
}

impl fmt::Debug for ReservationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationToken")
            .field("engine", &self.engine)
            .field("numa_node", &self.numa_node())
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}
