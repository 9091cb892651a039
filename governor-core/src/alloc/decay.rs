//! How long jemalloc keeps freed pages: the arenas' dirty-page decay time.
//!
//! When an allocation is freed jemalloc keeps its pages *dirty* (still resident, ready for
//! reuse) and returns them to the kernel gradually over `dirty_decay_ms` (10 s by default).
//! Between two bursts that is a good trade: no page faults when the memory is reused. Under a
//! tight ceiling it is memory nobody holds yet the kernel counts: measured on the mixed
//! workload at 224 MiB, it was ~30 MiB of the ~110 MiB outside the books (`BENCHMARKS.md`).
//!
//! The decay time is a per-arena setting; new arenas take `arenas.dirty_decay_ms`. Setting an
//! arena's time to zero also purges its dirty pages at once (jemalloc re-runs decay on a
//! change), so a switch to zero needs no separate purge.
//!
//! These are process-wide controls: the allocator is one per process, whichever governor asks.

use std::time::Duration;

use libc::c_uint;
use tikv_jemalloc_ctl::raw;

use super::{arena_count, ctl_error, jemalloc_is_global_allocator};
use crate::MemError;

/// The longest decay time accepted (a day): beyond it, pages are kept for practical purposes
/// forever, and jemalloc's millisecond counter must not be fed an overflowing figure such as
/// `Duration::MAX`.
pub const MAX_DECAY: Duration = Duration::from_hours(24);

/// Refuses a decay time above [`MAX_DECAY`], naming `field`.
pub(crate) fn validate_decay(field: &str, decay: Duration) -> Result<(), MemError> {
    if decay > MAX_DECAY {
        return Err(MemError::InvalidConfig {
            field: field.into(),
            reason: format!(
                "{decay:?} is above a day ({MAX_DECAY:?}); freed pages would never go back to \
                 the kernel in any run that matters"
            ),
        });
    }
    Ok(())
}

/// The decay time jemalloc was started with (`opt.dirty_decay_ms`, from `MALLOC_CONF` or its
/// built-in 10 s), `None` when it was started with `-1` (never decay).
///
/// This is the baseline to return to: unlike `arenas.dirty_decay_ms` it cannot have been
/// changed since start-up, by this module or anyone else.
///
/// # Errors
/// [`MemError::Allocator`] when the control cannot be read.
pub fn configured_dirty_decay() -> Result<Option<Duration>, MemError> {
    // SAFETY: `opt.dirty_decay_ms` is an `ssize_t`.
    let ms = unsafe { raw::read::<isize>(b"opt.dirty_decay_ms\0") }
        .map_err(|e| ctl_error("opt.dirty_decay_ms", e))?;
    Ok(u64::try_from(ms).ok().map(Duration::from_millis))
}

/// Sets the dirty-page decay time of every arena that exists and of every arena made later,
/// and returns how many existing arenas took it. Zero returns all their dirty pages now;
/// `None` keeps them for ever (jemalloc's `-1`, for putting back a start-up setting).
///
/// Does nothing and returns 0 when jemalloc is not the global allocator (its arenas then hold
/// none of the process's memory).
///
/// # Errors
/// [`MemError::InvalidConfig`] for a decay above [`MAX_DECAY`]; [`MemError::Allocator`] when a
/// control fails for an initialised arena.
pub fn set_dirty_decay_everywhere(decay: Option<Duration>) -> Result<usize, MemError> {
    let ms = match decay {
        Some(decay) => {
            validate_decay("dirty_decay", decay)?;
            // At most a day in milliseconds: far inside `isize`.
            isize::try_from(decay.as_millis()).unwrap_or(isize::MAX)
        }
        None => -1,
    };
    if !jemalloc_is_global_allocator() {
        return Ok(0);
    }
    // SAFETY: `arenas.dirty_decay_ms` is an `ssize_t`.
    unsafe { raw::write::<isize>(b"arenas.dirty_decay_ms\0", ms) }
        .map_err(|e| ctl_error("arenas.dirty_decay_ms", e))?;
    let mut set = 0;
    for arena in 0..arena_count()? {
        if set_arena_dirty_decay(arena, ms)? {
            set += 1;
        }
    }
    Ok(set)
}

/// Sets one arena's decay time; `false` when the arena index exists but was never initialised
/// (an automatic arena no thread has used yet takes the default when it is made).
fn set_arena_dirty_decay(arena: c_uint, ms: isize) -> Result<bool, MemError> {
    let key = format!("arena.{arena}.dirty_decay_ms\0");
    let mut value = ms;
    // SAFETY: `key` is NUL-terminated and names an `ssize_t` control; `value` outlives the
    // call and is of that type; no old value is read.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            key.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::from_mut(&mut value).cast(),
            std::mem::size_of::<isize>(),
        )
    };
    match rc {
        0 => Ok(true),
        // jemalloc answers EFAULT for an index below `arenas.narenas` that holds no arena yet.
        libc::EFAULT => Ok(false),
        rc => Err(MemError::Allocator {
            reason: format!(
                "jemalloc mallctl `arena.{arena}.dirty_decay_ms` failed: {}",
                std::io::Error::from_raw_os_error(rc)
            ),
        }),
    }
}

/// The decay time new arenas take now (`arenas.dirty_decay_ms`), `None` for never.
///
/// # Errors
/// [`MemError::Allocator`] when the control cannot be read.
pub fn default_dirty_decay() -> Result<Option<Duration>, MemError> {
    // SAFETY: `arenas.dirty_decay_ms` is an `ssize_t`.
    let ms = unsafe { raw::read::<isize>(b"arenas.dirty_decay_ms\0") }
        .map_err(|e| ctl_error("arenas.dirty_decay_ms", e))?;
    Ok(u64::try_from(ms).ok().map(Duration::from_millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_decay_is_refused_before_touching_the_allocator() {
        let before = default_dirty_decay().unwrap();
        let err = set_dirty_decay_everywhere(Some(Duration::MAX)).unwrap_err();
        assert!(
            matches!(&err, MemError::InvalidConfig { field, .. } if field == "dirty_decay"),
            "{err}"
        );
        assert!(err.to_string().contains("above a day"), "{err}");
        assert_eq!(default_dirty_decay().unwrap(), before);
    }

    #[test]
    fn the_configured_decay_is_the_start_up_option() {
        // Nothing in this test binary sets MALLOC_CONF, so jemalloc's built-in 10 s applies
        // (or whatever the environment running the tests configured, which is still a value).
        let configured = configured_dirty_decay().unwrap();
        if std::env::var_os("MALLOC_CONF").is_none() {
            assert_eq!(configured, Some(Duration::from_secs(10)));
        }
    }
}
