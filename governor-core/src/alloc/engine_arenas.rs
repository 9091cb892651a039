//! One jemalloc arena per engine: what each engine really allocates, read from the allocator.
//!
//! Reservations say what an engine *promised* to hold; its arena says what it *holds*. Every
//! engine gets one manual arena, made the first time the engine asks for it and kept for the
//! life of the process (jemalloc never destroys the bookkeeping of an arena, so making one per
//! governor would leak them in a process that builds many governors, such as a test binary).
//! Work gets onto it in two ways, both through the governor:
//!
//! ```text
//!   engine runtime thread ──on_thread_start──▶ thread.arena = arena(engine)   (for its life)
//!   shared thread ──enter_engine──▶ push (arena, previous) ──drop──▶ restore previous
//!
//!   per tick:  epoch.advance ─▶ stats.arenas.<i>.{small,large}.allocated, .resident
//! ```
//!
//! A free goes back to the arena the memory came from, whichever thread frees it, so the
//! figures follow the allocation, not the thread. Small objects freed on another thread sit in
//! that thread's cache for a while and still count as allocated in their arena until the cache
//! is flushed: that is the noise the reconciliation's dead band absorbs.
//!
//! When jemalloc is not the global allocator none of this can see anything the process
//! allocates, so no arena is made and every entry point here is a no-op that says so.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::marker::PhantomData;
use std::sync::OnceLock;

use libc::c_uint;
use parking_lot::Mutex;
use tikv_jemalloc_ctl::{epoch, raw};

use super::{create_arena, ctl_error, flush_thread_cache, jemalloc_is_global_allocator};
use crate::{EngineId, MemError};

/// Why the per-engine figures cannot be had in this process.
pub(crate) const NOT_GLOBAL_ALLOCATOR: &str = "jemalloc is not the global allocator, so engine \
    arenas would see none of the process's allocations; install tikv_jemallocator::Jemalloc as \
    #[global_allocator] in the binary to get per-engine allocator figures";

/// An engine's arena and the pre-resolved mallctl names of its statistics (resolving a name
/// costs a string walk through jemalloc's tree; a resolved one is an array lookup).
#[derive(Debug)]
struct EngineArena {
    arena: u32,
    small_allocated: [usize; 5],
    large_allocated: [usize; 5],
    resident: [usize; 4],
}

impl EngineArena {
    fn create() -> Result<Self, MemError> {
        let arena = create_arena()?;
        // jemalloc's control tree learns of a new arena's statistics at the next epoch; until
        // then `stats.arenas.<new>` does not resolve.
        advance_epoch()?;
        let mib = |field: &str, out: &mut [usize]| {
            let name = format!("stats.arenas.{arena}.{field}\0");
            raw::name_to_mib(name.as_bytes(), out).map_err(|e| ctl_error(&name, e))
        };
        let mut small_allocated = [0; 5];
        let mut large_allocated = [0; 5];
        let mut resident = [0; 4];
        mib("small.allocated", &mut small_allocated)?;
        mib("large.allocated", &mut large_allocated)?;
        mib("resident", &mut resident)?;
        Ok(Self {
            arena,
            small_allocated,
            large_allocated,
            resident,
        })
    }

    /// Reads the figures of the current stats epoch.
    fn read(&self) -> Result<ArenaFigures, MemError> {
        let read = |mib: &[usize], field: &str| {
            // SAFETY: each of these mibs names a `size_t` statistic of this arena.
            unsafe { raw::read_mib::<usize>(mib) }
                .map_err(|e| ctl_error(&format!("stats.arenas.{}.{field}", self.arena), e))
        };
        let small = read(&self.small_allocated, "small.allocated")?;
        let large = read(&self.large_allocated, "large.allocated")?;
        Ok(ArenaFigures {
            arena: self.arena,
            allocated: small.saturating_add(large),
            resident: read(&self.resident, "resident")?,
        })
    }
}

/// The engines' arenas, made on first use, once per process.
static ENGINE_ARENAS: [OnceLock<EngineArena>; EngineId::COUNT] =
    [const { OnceLock::new() }; EngineId::COUNT];
/// Serialises making arenas, so that two threads asking at once make one, not two.
static CREATING: Mutex<()> = Mutex::new(());

/// One engine arena's allocator figures at one stats epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaFigures {
    /// The arena index.
    pub arena: u32,
    /// Bytes in live objects of the arena (small + large), including small objects parked in
    /// thread caches.
    pub allocated: usize,
    /// Resident bytes of the arena: pages of live objects, dirty pages kept for reuse, metadata.
    pub resident: usize,
}

#[cfg(test)]
thread_local! {
    /// Unit tests of the inert path: in this workspace jemalloc also replaces `malloc` (the
    /// `unprefixed_malloc` feature is unified into every test binary), so the probe cannot be
    /// made to fail for real; this makes the calling thread see it fail.
    pub(crate) static PRETEND_NOT_GLOBAL: Cell<bool> = const { Cell::new(false) };
}

/// Whether engine arenas can see the process's allocations: jemalloc serves them.
pub(crate) fn arenas_see_allocations() -> bool {
    #[cfg(test)]
    if PRETEND_NOT_GLOBAL.get() {
        return false;
    }
    jemalloc_is_global_allocator()
}

/// The arena of `engine`, made now if it has none yet; `None` when jemalloc is not the global
/// allocator (then no arena is made: it would see nothing).
pub(crate) fn engine_arena_or_create(engine: EngineId) -> Result<Option<u32>, MemError> {
    if !arenas_see_allocations() {
        return Ok(None);
    }
    let slot = &ENGINE_ARENAS[engine.index()];
    if let Some(made) = slot.get() {
        return Ok(Some(made.arena));
    }
    let _one_at_a_time = CREATING.lock();
    if let Some(made) = slot.get() {
        return Ok(Some(made.arena));
    }
    let made = EngineArena::create()?;
    let arena = made.arena;
    // We hold the creation lock and saw the slot empty, so this set cannot lose a race.
    let _ = slot.set(made);
    tracing::info!(%engine, arena, "engine arena created");
    Ok(Some(arena))
}

/// The arena of `engine` if one was made in this process (by
/// [`MemoryGovernor::engine_runtime_builder`](crate::MemoryGovernor::engine_runtime_builder) or
/// [`MemoryGovernor::enter_engine`](crate::MemoryGovernor::enter_engine)).
pub fn engine_arena(engine: EngineId) -> Option<u32> {
    ENGINE_ARENAS[engine.index()].get().map(|a| a.arena)
}

/// Advances jemalloc's stats epoch once, so that the next [`read_engine_arena`] calls all see
/// one consistent moment.
pub(crate) fn advance_epoch() -> Result<(), MemError> {
    epoch::advance()
        .map(|_| ())
        .map_err(|e| ctl_error("epoch", e))
}

/// The figures of `engine`'s arena at the current stats epoch (see [`advance_epoch`]); `None`
/// when the engine has no arena.
pub(crate) fn read_engine_arena(engine: EngineId) -> Option<Result<ArenaFigures, MemError>> {
    ENGINE_ARENAS[engine.index()].get().map(EngineArena::read)
}

/// The pre-resolved name of `thread.arena`.
fn thread_arena_mib() -> Result<&'static [usize; 2], MemError> {
    static MIB: OnceLock<[usize; 2]> = OnceLock::new();
    if let Some(mib) = MIB.get() {
        return Ok(mib);
    }
    let mut mib = [0; 2];
    raw::name_to_mib(b"thread.arena\0", &mut mib).map_err(|e| ctl_error("thread.arena", e))?;
    Ok(MIB.get_or_init(|| mib))
}

fn read_thread_arena() -> Result<u32, MemError> {
    // SAFETY: `thread.arena` is an `unsigned` (c_uint).
    unsafe { raw::read_mib::<c_uint>(thread_arena_mib()?) }
        .map_err(|e| ctl_error("thread.arena", e))
}

/// Moves the calling thread to `arena` (which exists: it is an engine arena or one the thread
/// was on before) and flushes its small-object cache, so that later small allocations come from
/// `arena` and not from objects cached for the old one.
fn switch_thread_arena(arena: u32) -> Result<(), MemError> {
    // SAFETY: `thread.arena` is an `unsigned` (c_uint) and `arena` names an existing arena.
    unsafe { raw::write_mib::<c_uint>(thread_arena_mib()?, arena) }
        .map_err(|e| ctl_error(&format!("thread.arena = {arena}"), e))?;
    flush_thread_cache()
}

/// Binds an engine runtime's thread to `arena` for the rest of its life (its `on_thread_start`).
pub(crate) fn pin_runtime_thread(engine: EngineId, arena: u32) {
    if let Err(err) = switch_thread_arena(arena) {
        // A thread start hook has no caller to tell; the thread still works, its allocations
        // are just charged to the arena it had, which the reconciliation then does not see.
        tracing::error!(%engine, arena, error = %err, "could not pin an engine runtime thread to its arena");
    }
}

/// One live [`EngineGuard`] on this thread.
struct Pin {
    id: u64,
    arena: u32,
    /// The arena to go back to when this pin goes: the thread's before it, or, when a pin
    /// under it went first, what that one would have gone back to.
    previous: u32,
}

thread_local! {
    /// This thread's live engine guards, oldest first.
    static PINS: RefCell<Vec<Pin>> = const { RefCell::new(Vec::new()) };
    static NEXT_PIN: Cell<u64> = const { Cell::new(0) };
}

/// Pins the calling thread to `arena` and records how to undo it; returns the pin's id.
fn push_pin(arena: u32) -> Result<u64, MemError> {
    let current = read_thread_arena()?;
    if current != arena {
        switch_thread_arena(arena)?;
    }
    let id = NEXT_PIN.with(|next| {
        let id = next.get();
        next.set(id.wrapping_add(1));
        id
    });
    PINS.with_borrow_mut(|pins| {
        pins.push(Pin {
            id,
            arena,
            previous: current,
        });
    });
    Ok(id)
}

/// Undoes pin `id`. Guards dropped in the reverse order of their making restore each other's
/// arenas in turn; one dropped out of order hands its `previous` to the pin above it, so the
/// thread stays on the newest live pin's arena and ends where it started.
fn pop_pin(id: u64) -> Result<(), MemError> {
    // `try_with`: a guard that lives in another thread-local may be dropped during teardown,
    // when the thread's arena no longer matters.
    let restore = PINS
        .try_with(|pins| {
            let mut pins = pins.borrow_mut();
            let at = pins.iter().position(|p| p.id == id)?;
            let gone = pins.remove(at);
            if let Some(above) = pins.get_mut(at) {
                above.previous = gone.previous;
                None
            } else {
                (gone.previous != gone.arena).then_some(gone.previous)
            }
        })
        .ok()
        .flatten();
    match restore {
        Some(arena) => switch_thread_arena(arena),
        None => Ok(()),
    }
}

/// Work on a shared thread charged to one engine's arena until the guard drops; from
/// [`MemoryGovernor::enter_engine`](crate::MemoryGovernor::enter_engine).
///
/// Guards nest: entering another engine inside moves the thread there, and dropping the inner
/// guard moves it back. They may even be dropped out of order; the thread always ends on the
/// arena it had before the first guard. Not `Send`: the binding belongs to the thread.
///
/// When jemalloc is not the global allocator the guard is *inert*: it pins nothing and
/// [`is_pinned`](Self::is_pinned) says so.
#[must_use = "dropping the guard unpins the thread at once"]
pub struct EngineGuard {
    engine: EngineId,
    pin: Option<(u64, u32)>,
    _not_send: PhantomData<*const ()>,
}

impl EngineGuard {
    /// Pins the calling thread to `arena` on behalf of `engine`; `None` makes an inert guard.
    pub(crate) fn enter(engine: EngineId, arena: Option<u32>) -> Result<Self, MemError> {
        let pin = match arena {
            Some(arena) => Some((push_pin(arena)?, arena)),
            None => None,
        };
        Ok(Self {
            engine,
            pin,
            _not_send: PhantomData,
        })
    }

    /// The engine whose arena the thread allocates from while the guard lives.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// The arena the thread is pinned to; `None` for an inert guard.
    pub fn arena(&self) -> Option<u32> {
        self.pin.map(|(_, arena)| arena)
    }

    /// False when the guard is inert because jemalloc is not the global allocator.
    pub fn is_pinned(&self) -> bool {
        self.pin.is_some()
    }
}

impl fmt::Debug for EngineGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pin's id is bookkeeping of this thread's stack, of no use to a reader.
        f.debug_struct("EngineGuard")
            .field("engine", &self.engine)
            .field("arena", &self.arena())
            .finish_non_exhaustive()
    }
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        if let Some((id, arena)) = self.pin
            && let Err(err) = pop_pin(id)
        {
            // The arenas involved exist for the life of the process, so only a broken jemalloc
            // gets here; a drop cannot report it otherwise.
            tracing::error!(engine = %self.engine, arena, error = %err, "could not restore the thread's arena");
        }
    }
}
