//! Allocator truth: what jemalloc and the kernel say the process really holds.
//!
//! Reservations are promises. DataFusion does not count batches in flight, allocators keep
//! freed pages in caches, and fragmentation turns 1 GiB of live objects into 1.3 GiB of
//! resident pages. The validation target of the governor is *total RSS within the ceiling*, so
//! it needs the real numbers; this module reads them and steers the allocator.
//!
//! ```text
//!   SystemMemoryStats::query()
//!     ├─ jemalloc (tikv-jemalloc-ctl, after epoch::advance)
//!     │    allocated ≤ active ≤ resident, active ≤ mapped (+ retained: virtual, not resident)
//!     └─ kernel (/proc/self/status)
//!          VmRSS (all resident pages, allocator or not), VmHWM (peak)
//!
//!   arenas:  thread ──thread.arena──▶ arena i ──stats.arenas.i.resident──▶ bytes per arena
//!            engine arenas: one per engine, entered through MemoryGovernor::enter_engine or
//!                           an engine runtime (MemoryGovernor::engine_runtime_builder)
//!            CollectionArenaRegistry: (tenant, collection) ──▶ dedicated arena ──▶ owning engine
//!   purge:   arena.<ALL>.purge / arena.<ALL>.decay  (give dirty pages back to the OS now)
//!   decay:   arena.<i>.dirty_decay_ms              (how long freed pages stay; see `decay`)
//! ```
//!
//! ## Which figure to trust
//!
//! * **`/proc/self/status` `VmRSS`** is what the kernel (and the OOM killer) counts: every
//!   resident page of the process, whatever allocated it. It works whatever the global
//!   allocator is. The [`rss_monitor`](crate::rss_monitor) uses it by default.
//! * **jemalloc's `stats.*`** split that memory into live objects (`allocated`), pages holding
//!   them (`active`), pages the allocator keeps (`resident`, `mapped`, `retained`). They only
//!   describe memory that jemalloc serves, so they are meaningful when jemalloc is the global
//!   allocator ([`SystemMemoryStats::jemalloc_is_global_allocator`] says whether it is, by
//!   watching a probe allocation).
//!
//! Every figure says where it came from ([`MemorySource`]).
//!
//! ## jemalloc without forcing it on users
//!
//! This library links jemalloc (for its control interface) but never installs a global
//! allocator: that choice belongs to the binary. Binaries and tests in this workspace opt in
//! with the usual one-liner:
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
//!
//! fn main() {
//!     assert!(governor_core::alloc::jemalloc_is_global_allocator());
//! }
//! ```
//!
//! Without it, the arena functions still work but steer jemalloc's own (empty) heap, and the
//! RSS monitor falls back to the kernel's figure, which is always right.

mod arenas;
pub mod decay;
mod engine_arenas;
mod stats;

pub use arenas::{
    ArenaGuard, ArenaStats, CollectionArenaRegistry, CollectionArenaStats, CollectionKey,
    DEFAULT_MAX_COLLECTION_ARENAS, arena_count, create_arena, current_thread_arena,
    pin_thread_arena, pin_thread_arena_scoped,
};
#[cfg(test)]
pub(crate) use engine_arenas::PRETEND_NOT_GLOBAL;
pub use engine_arenas::{ArenaFigures, EngineGuard, engine_arena};
pub(crate) use engine_arenas::{
    NOT_GLOBAL_ALLOCATOR, advance_epoch, arenas_see_allocations, engine_arena_or_create,
    pin_runtime_thread, read_engine_arena,
};
pub use stats::{
    Figure, JemallocStats, MemorySource, ProcessMemory, SystemMemoryStats,
    jemalloc_is_global_allocator, process_resident_bytes,
};

use crate::MemError;

/// jemalloc's pseudo arena index that addresses every arena at once (`MALLCTL_ARENAS_ALL`).
pub const MALLCTL_ARENAS_ALL: u32 = 4096;

/// Turns a mallctl failure into the crate's error, naming the key so that a person on call can
/// look it up in `man jemalloc`.
pub(crate) fn ctl_error(key: &str, err: tikv_jemalloc_ctl::Error) -> MemError {
    MemError::Allocator {
        reason: format!("jemalloc mallctl `{key}` failed: {err}"),
    }
}

/// Calls a `void` mallctl (one that takes neither input nor output, such as `arena.<i>.purge`).
///
/// `tikv_jemalloc_ctl::raw::write` always passes a value pointer, which jemalloc rejects with
/// `EPERM` for these keys, so this goes through `tikv-jemalloc-sys` with null pointers.
fn mallctl_void(key: &str) -> Result<(), MemError> {
    let name = std::ffi::CString::new(key).map_err(|_| MemError::Allocator {
        reason: format!("mallctl key {key:?} contains a NUL byte"),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; jemalloc reads
    // nothing and writes nothing through the null old/new pointers, which is exactly what a
    // void control expects.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(MemError::Allocator {
            reason: format!(
                "jemalloc mallctl `{key}` failed: {}",
                std::io::Error::from_raw_os_error(rc)
            ),
        })
    }
}

/// Returns the dirty and muzzy pages of `arena` to the operating system now
/// (`arena.<i>.purge`). Pass [`MALLCTL_ARENAS_ALL`] for every arena.
///
/// This is the blunt instrument: it costs page faults later if the memory is reused. The RSS
/// monitor uses it only past the Emergency threshold.
pub fn purge_arena(arena: u32) -> Result<(), MemError> {
    mallctl_void(&format!("arena.{arena}.purge"))
}

/// Lets `arena`'s decay policy run now (`arena.<i>.decay`): only pages whose decay time has
/// passed are returned, so it is cheaper and gentler than [`purge_arena`].
pub fn decay_arena(arena: u32) -> Result<(), MemError> {
    mallctl_void(&format!("arena.{arena}.decay"))
}

/// Purges every arena ([`purge_arena`] of [`MALLCTL_ARENAS_ALL`]).
pub fn purge_all_arenas() -> Result<(), MemError> {
    purge_arena(MALLCTL_ARENAS_ALL)
}

/// Flushes the calling thread's cache of small objects back to their arenas
/// (`thread.tcache.flush`), so that later small allocations come from the thread's current
/// arena rather than from objects cached while it was pinned elsewhere.
///
/// A thread without a cache (jemalloc built or configured without tcache) is not an error.
pub fn flush_thread_cache() -> Result<(), MemError> {
    match mallctl_void("thread.tcache.flush") {
        Ok(()) => Ok(()),
        // EFAULT: this thread has no tcache, so there is nothing to flush.
        Err(_) if !tcache_enabled() => Ok(()),
        Err(err) => Err(err),
    }
}

fn tcache_enabled() -> bool {
    // SAFETY: `thread.tcache.enabled` is a `bool` in jemalloc's mallctl namespace.
    unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"thread.tcache.enabled\0") }.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn void_controls_succeed_on_all_arenas() {
        purge_all_arenas().unwrap();
        decay_arena(MALLCTL_ARENAS_ALL).unwrap();
        flush_thread_cache().unwrap();
    }

    #[test]
    fn unknown_arena_is_a_typed_error() {
        let err = purge_arena(999_999).unwrap_err();
        assert!(matches!(err, MemError::Allocator { .. }), "{err}");
        assert!(err.to_string().contains("arena.999999.purge"), "{err}");
    }

    #[test]
    fn key_with_nul_is_rejected() {
        let err = mallctl_void("arena.0\0.purge").unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
    }
}
