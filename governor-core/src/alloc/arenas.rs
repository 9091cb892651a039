//! jemalloc arenas: pinning threads, per-arena statistics and one arena per collection.
//!
//! An arena is an independent jemalloc heap. Giving each (tenant, collection) its own arena
//! turns "how much memory does this collection really hold?" into one mallctl read
//! (`stats.arenas.<i>.resident`), fragmentation included, and lets a dropped collection give
//! its pages back with one purge, without touching its neighbours.
//!
//! Allocations go to the arena the *calling thread* is bound to (`thread.arena`), so work for
//! a collection runs inside [`CollectionArenaRegistry::enter`], which pins the thread and
//! restores its previous arena when the guard drops. Memory freed by another thread returns
//! to the arena it came from: accounting follows the allocation, not the thread that frees.
//!
//! Two jemalloc details matter here, and both are handled:
//! * the thread cache (tcache) keeps small freed objects per thread, whichever arena they came
//!   from; pinning flushes it, so later small allocations come from the new arena;
//! * requests above `opt.oversize_threshold` (8 MiB) leave *automatic* arenas for a dedicated
//!   huge arena, but arenas made by `arenas.create` are manual and keep them.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use libc::c_uint;
use parking_lot::Mutex;
use tikv_jemalloc_ctl::{arenas, epoch, raw};

use super::{ctl_error, flush_thread_cache, purge_arena};
use crate::{ConsumerSnapshot, ConsumerStatsSource, EngineId, MemError};

/// How many dedicated arenas a [`CollectionArenaRegistry`] makes at most, by default.
///
/// jemalloc never unmaps an arena's bookkeeping, so the count is bounded; retired arenas are
/// reused.
pub const DEFAULT_MAX_COLLECTION_ARENAS: usize = 256;

/// The number of arenas jemalloc has now (automatic ones plus those created), `arenas.narenas`.
pub fn arena_count() -> Result<u32, MemError> {
    arenas::narenas::read().map_err(|e| ctl_error("arenas.narenas", e))
}

/// Creates a new manual arena (`arenas.create`) and returns its index.
///
/// The arena lives as long as the process; prefer a [`CollectionArenaRegistry`], which bounds
/// and recycles them.
pub fn create_arena() -> Result<u32, MemError> {
    // SAFETY: `arenas.create` reads back an `unsigned` (c_uint) arena index.
    unsafe { raw::read::<c_uint>(b"arenas.create\0") }.map_err(|e| ctl_error("arenas.create", e))
}

/// The arena the calling thread allocates from (`thread.arena`).
pub fn current_thread_arena() -> Result<u32, MemError> {
    // SAFETY: `thread.arena` is an `unsigned` (c_uint).
    unsafe { raw::read::<c_uint>(b"thread.arena\0") }.map_err(|e| ctl_error("thread.arena", e))
}

/// Binds the calling thread to arena `index` and returns the arena it was bound to before.
///
/// Later allocations of this thread come from `index` (its small-object cache is flushed so
/// that cached objects of the old arena are not handed out). Prefer
/// [`pin_thread_arena_scoped`], which restores the previous arena.
///
/// # Errors
/// [`MemError::Allocator`] when `index` is not an existing arena.
pub fn pin_thread_arena(index: u32) -> Result<u32, MemError> {
    let count = arena_count()?;
    if index >= count {
        return Err(MemError::Allocator {
            reason: format!(
                "cannot pin the thread to arena {index}: jemalloc has {count} arenas (0..{count}); \
                 make a new one with create_arena() or a CollectionArenaRegistry"
            ),
        });
    }
    // SAFETY: `thread.arena` is an `unsigned` (c_uint) and `index` names an existing arena.
    let previous = unsafe { raw::update::<c_uint>(b"thread.arena\0", index) }
        .map_err(|e| ctl_error(&format!("thread.arena = {index}"), e))?;
    flush_thread_cache()?;
    Ok(previous)
}

/// Binds the calling thread to arena `index` until the returned guard drops, then restores
/// the arena it had.
///
/// ```
/// use governor_core::alloc::{create_arena, current_thread_arena, pin_thread_arena_scoped};
///
/// let before = current_thread_arena()?;
/// let arena = create_arena()?;
/// {
///     let _pinned = pin_thread_arena_scoped(arena)?;
///     assert_eq!(current_thread_arena()?, arena);
///     let _buffer = vec![0u8; 1 << 20]; // comes from `arena` when jemalloc is the allocator
/// }
/// assert_eq!(current_thread_arena()?, before);
/// # Ok::<(), governor_core::MemError>(())
/// ```
pub fn pin_thread_arena_scoped(index: u32) -> Result<ArenaGuard, MemError> {
    let previous = pin_thread_arena(index)?;
    Ok(ArenaGuard {
        previous,
        arena: index,
        _not_send: PhantomData,
    })
}

/// Restores the thread's previous arena when dropped (see [`pin_thread_arena_scoped`]).
///
/// Not `Send`: the binding belongs to the thread that made it.
#[must_use = "dropping the guard unpins the thread at once"]
pub struct ArenaGuard {
    previous: u32,
    arena: u32,
    _not_send: PhantomData<*const ()>,
}

impl ArenaGuard {
    /// The arena the thread is pinned to while the guard lives.
    pub fn arena(&self) -> u32 {
        self.arena
    }

    /// The arena the thread goes back to.
    pub fn previous(&self) -> u32 {
        self.previous
    }
}

impl fmt::Debug for ArenaGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArenaGuard")
            .field("arena", &self.arena)
            .field("previous", &self.previous)
            .finish()
    }
}

impl Drop for ArenaGuard {
    fn drop(&mut self) {
        // The previous arena existed when we left it and arenas are never destroyed here, so
        // this can only fail if jemalloc itself is broken; a drop cannot report it otherwise.
        if let Err(err) = pin_thread_arena(self.previous) {
            tracing::error!(error = %err, arena = self.previous, "could not restore the thread's arena");
        }
    }
}

/// One arena's statistics (`stats.arenas.<i>.*`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaStats {
    /// The arena index.
    pub arena: u32,
    /// Resident bytes: active pages, dirty pages kept for reuse, metadata
    /// (`stats.arenas.<i>.resident`).
    pub resident: usize,
    /// Mapped bytes (`stats.arenas.<i>.mapped`).
    pub mapped: usize,
    /// Bytes in pages holding live objects (`pactive` × page size).
    pub active: usize,
    /// Bytes in dirty pages a purge would give back (`pdirty` × page size).
    pub dirty: usize,
    /// Bytes in muzzy pages (`pmuzzy` × page size).
    pub muzzy: usize,
    /// Bytes in live small objects (`small.allocated`).
    pub small_allocated: usize,
    /// Bytes in live large objects (`large.allocated`).
    pub large_allocated: usize,
}

impl ArenaStats {
    /// Reads arena `arena`'s statistics, advancing jemalloc's stats epoch first.
    ///
    /// # Errors
    /// [`MemError::Allocator`] when the arena does not exist or was never used (jemalloc
    /// initialises automatic arenas lazily and keeps no statistics for them until then).
    pub fn query(arena: u32) -> Result<Self, MemError> {
        epoch::advance().map_err(|e| ctl_error("epoch", e))?;
        Self::read_current_epoch(arena)
    }

    /// Reads without advancing the epoch (for reading many arenas of one epoch).
    fn read_current_epoch(arena: u32) -> Result<Self, MemError> {
        let read = |field: &str| -> Result<usize, MemError> {
            let key = format!("stats.arenas.{arena}.{field}\0");
            // SAFETY: every field read here is a `size_t` in jemalloc's namespace.
            unsafe { raw::read::<usize>(key.as_bytes()) }.map_err(|e| MemError::Allocator {
                reason: format!(
                    "jemalloc mallctl `{}` failed: {e} (does arena {arena} exist and has it been used?)",
                    key.trim_end_matches('\0')
                ),
            })
        };
        // SAFETY: `arenas.page` is a `size_t`.
        let page = unsafe { raw::read::<usize>(b"arenas.page\0") }
            .map_err(|e| ctl_error("arenas.page", e))?;
        Ok(Self {
            arena,
            resident: read("resident")?,
            mapped: read("mapped")?,
            active: read("pactive")? * page,
            dirty: read("pdirty")? * page,
            muzzy: read("pmuzzy")? * page,
            small_allocated: read("small.allocated")?,
            large_allocated: read("large.allocated")?,
        })
    }

    /// Bytes in live objects of this arena (small + large).
    pub fn allocated(&self) -> usize {
        self.small_allocated + self.large_allocated
    }
}

/// A (tenant, collection) pair: the unit that gets its own arena.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CollectionKey {
    /// The tenant.
    pub tenant: String,
    /// The collection within the tenant.
    pub collection: String,
}

impl CollectionKey {
    /// Makes a key.
    pub fn new(tenant: impl Into<String>, collection: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            collection: collection.into(),
        }
    }
}

impl fmt::Display for CollectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.collection)
    }
}

/// A collection's arena and its figures, from [`CollectionArenaRegistry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionArenaStats {
    /// The collection.
    pub key: CollectionKey,
    /// The engine that owns it (its memory is shown under that engine in snapshots).
    pub engine: EngineId,
    /// The arena's statistics now.
    pub stats: ArenaStats,
    /// The highest resident figure seen by [`CollectionArenaRegistry::stats`].
    pub peak_resident: usize,
}

struct Slot {
    arena: u32,
    engine: EngineId,
    peak_resident: usize,
}

#[derive(Default)]
struct RegistryState {
    slots: HashMap<CollectionKey, Slot>,
    /// Arenas of retired collections, purged and ready for reuse.
    free: Vec<u32>,
    /// Arenas this registry made (in use or free).
    created: usize,
}

/// A dedicated jemalloc arena per (tenant, collection), with resident bytes per arena charged
/// to the owning engine.
///
/// Pick it when one process hosts many tenants' collections and you need to answer "who
/// holds the memory?" with the allocator's own numbers, fragmentation included, or to return
/// a dropped collection's pages at once ([`retire`](Self::retire)). Register it with
/// [`MemoryGovernor::register_consumer_stats`](crate::MemoryGovernor::register_consumer_stats)
/// so that snapshots show each arena under its engine.
///
/// ```
/// use governor_core::EngineId;
/// use governor_core::alloc::{CollectionArenaRegistry, CollectionKey};
///
/// let registry = CollectionArenaRegistry::new();
/// let key = CollectionKey::new("acme", "products");
/// let vectors = {
///     let _pinned = registry.enter(&key, EngineId::Vector)?; // this thread now allocates there
///     vec![0f32; 256 * 1024]
/// };
/// let arena = registry.arena(&key).unwrap();
/// assert!(registry.stats()?.iter().any(|s| s.stats.arena == arena));
/// # drop(vectors);
/// # Ok::<(), governor_core::MemError>(())
/// ```
pub struct CollectionArenaRegistry {
    state: Mutex<RegistryState>,
    max_arenas: usize,
}

impl Default for CollectionArenaRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CollectionArenaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("CollectionArenaRegistry")
            .field("collections", &state.slots.len())
            .field("free_arenas", &state.free.len())
            .field("max_arenas", &self.max_arenas)
            .finish()
    }
}

impl CollectionArenaRegistry {
    /// A registry that makes at most [`DEFAULT_MAX_COLLECTION_ARENAS`] arenas.
    pub fn new() -> Self {
        Self::with_max_arenas(DEFAULT_MAX_COLLECTION_ARENAS)
    }

    /// A registry that makes at most `max_arenas` arenas; collections beyond that are refused
    /// (retire some, or raise the bound).
    pub fn with_max_arenas(max_arenas: usize) -> Self {
        Self {
            state: Mutex::new(RegistryState::default()),
            max_arenas,
        }
    }

    /// The arena of `key`, made (or recycled) on first use and owned by `engine`.
    ///
    /// # Errors
    /// [`MemError::Allocator`] when the collection is already owned by another engine, when
    /// the registry is at its arena bound, or when jemalloc refuses a new arena.
    pub fn arena_for(&self, key: &CollectionKey, engine: EngineId) -> Result<u32, MemError> {
        let mut state = self.state.lock();
        if let Some(slot) = state.slots.get(key) {
            if slot.engine != engine {
                return Err(MemError::Allocator {
                    reason: format!(
                        "collection {key} has its arena charged to the {} engine, not {engine}; \
                         one collection's memory belongs to one engine",
                        slot.engine
                    ),
                });
            }
            return Ok(slot.arena);
        }
        let arena = if let Some(arena) = state.free.pop() {
            arena
        } else {
            if state.created >= self.max_arenas {
                return Err(MemError::Allocator {
                    reason: format!(
                        "no arena for collection {key}: all {} collection arenas are in use; retire \
                         dropped collections or raise CollectionArenaRegistry::with_max_arenas",
                        self.max_arenas
                    ),
                });
            }
            let arena = create_arena()?;
            state.created += 1;
            arena
        };
        state.slots.insert(
            key.clone(),
            Slot {
                arena,
                engine,
                peak_resident: 0,
            },
        );
        tracing::debug!(collection = %key, %engine, arena, "collection arena assigned");
        Ok(arena)
    }

    /// Pins the calling thread to `key`'s arena (making it on first use) until the guard drops.
    pub fn enter(&self, key: &CollectionKey, engine: EngineId) -> Result<ArenaGuard, MemError> {
        let arena = self.arena_for(key, engine)?;
        pin_thread_arena_scoped(arena)
    }

    /// The arena of `key`, if it has one.
    pub fn arena(&self, key: &CollectionKey) -> Option<u32> {
        self.state.lock().slots.get(key).map(|slot| slot.arena)
    }

    /// Number of collections with an arena.
    pub fn len(&self) -> usize {
        self.state.lock().slots.len()
    }

    /// True when no collection has an arena.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets `key` (its collection was dropped): purges its arena, returning the freed pages
    /// to the OS, and keeps the arena for the next new collection. Returns the arena, or
    /// `None` when `key` had none.
    ///
    /// Objects of the old collection still alive when it is retired stay in the arena and
    /// would be counted against the next collection using it: retire after dropping them.
    pub fn retire(&self, key: &CollectionKey) -> Result<Option<u32>, MemError> {
        let mut state = self.state.lock();
        let Some(slot) = state.slots.remove(key) else {
            return Ok(None);
        };
        state.free.push(slot.arena);
        drop(state);
        purge_arena(slot.arena)?;
        Ok(Some(slot.arena))
    }

    /// Each collection's arena figures, read in one stats epoch, sorted by collection.
    pub fn stats(&self) -> Result<Vec<CollectionArenaStats>, MemError> {
        epoch::advance().map_err(|e| ctl_error("epoch", e))?;
        let mut state = self.state.lock();
        let mut out = Vec::with_capacity(state.slots.len());
        for (key, slot) in &mut state.slots {
            let stats = ArenaStats::read_current_epoch(slot.arena)?;
            slot.peak_resident = slot.peak_resident.max(stats.resident);
            out.push(CollectionArenaStats {
                key: key.clone(),
                engine: slot.engine,
                stats,
                peak_resident: slot.peak_resident,
            });
        }
        drop(state);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Resident bytes of all collection arenas, summed per owning engine (engines without
    /// collections omitted), in [`EngineId::ALL`] order.
    pub fn resident_by_engine(&self) -> Result<Vec<(EngineId, usize)>, MemError> {
        let stats = self.stats()?;
        Ok(EngineId::ALL
            .iter()
            .filter_map(|&engine| {
                let mut owned = stats.iter().filter(|s| s.engine == engine).peekable();
                owned.peek()?;
                Some((engine, owned.map(|s| s.stats.resident).sum()))
            })
            .collect())
    }
}

/// Publishes one consumer per collection arena, named `arena:<tenant>/<collection>`, under its
/// owning engine: `reserved` carries the arena's *resident* bytes and `peak` their high-water
/// mark, so a snapshot shows what each collection really holds next to what was reserved.
impl ConsumerStatsSource for CollectionArenaRegistry {
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        match self.stats() {
            Ok(stats) => stats
                .into_iter()
                .map(|s| ConsumerSnapshot {
                    engine: s.engine,
                    name: format!("arena:{}", s.key),
                    reserved: s.stats.resident,
                    peak: s.peak_resident,
                    denials: 0,
                    pinned: 0,
                })
                .collect(),
            Err(err) => {
                // A snapshot must not fail because one source did; say why it is missing.
                tracing::warn!(error = %err, "collection arena statistics unavailable");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_a_missing_arena_names_the_fix() {
        let err = pin_thread_arena(u32::MAX).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("create_arena"), "{text}");
    }

    #[test]
    fn scoped_pin_restores_the_previous_arena() {
        let before = current_thread_arena().unwrap();
        let arena = create_arena().unwrap();
        {
            let guard = pin_thread_arena_scoped(arena).unwrap();
            assert_eq!(guard.arena(), arena);
            assert_eq!(guard.previous(), before);
            assert_eq!(current_thread_arena().unwrap(), arena);
        }
        assert_eq!(current_thread_arena().unwrap(), before);
    }

    #[test]
    fn registry_bounds_checks_owner_and_recycles() {
        let registry = CollectionArenaRegistry::with_max_arenas(1);
        let a = CollectionKey::new("t", "a");
        let b = CollectionKey::new("t", "b");
        let arena = registry.arena_for(&a, EngineId::Vector).unwrap();
        assert_eq!(registry.arena_for(&a, EngineId::Vector).unwrap(), arena);
        let err = registry.arena_for(&a, EngineId::Sparse).unwrap_err();
        assert!(err.to_string().contains("vector"), "{err}");
        let err = registry.arena_for(&b, EngineId::Vector).unwrap_err();
        assert!(err.to_string().contains("with_max_arenas"), "{err}");
        assert_eq!(registry.retire(&a).unwrap(), Some(arena));
        assert_eq!(registry.retire(&a).unwrap(), None);
        assert_eq!(
            registry.arena_for(&b, EngineId::Sparse).unwrap(),
            arena,
            "retired arena is reused"
        );
        assert_eq!(registry.len(), 1);
    }
}
