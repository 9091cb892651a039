//! The RSS monitor steers jemalloc's retention of freed pages by pressure: near the ceiling a
//! free returns its pages at once (and what was kept is returned when it tightens), away from
//! it the decay jemalloc was started with comes back, and a stopped monitor puts it back too.

use std::sync::Arc;
use std::time::Duration;

use governor_core::alloc::decay::{configured_dirty_decay, default_dirty_decay};
use governor_core::alloc::{ArenaGuard, create_arena, pin_thread_arena_scoped};
use governor_core::retention::{AllocatorRetention, PressureRetention};
use governor_core::rss_monitor::{RssMonitorConfig, RssMonitorHandle};
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, PressureLevel, ReservationToken, mib,
};
use parking_lot::Mutex;
use tikv_jemalloc_ctl::{epoch, raw};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The decay is process-wide: the tests of this binary take turns.
static ALLOCATOR: Mutex<()> = Mutex::new(());

const CEILING: usize = mib(1024);

fn governor() -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(CEILING)
            .engine(EngineId::Query, EngineBudget::new(CEILING))
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A monitor whose thread never ticks during a test: the test drives it with `sample_now`.
fn monitor_config(hold_ticks: u32) -> RssMonitorConfig {
    RssMonitorConfig::default()
        .with_interval(Duration::from_hours(1))
        .with_allocator_retention(AllocatorRetention::FollowPressure(PressureRetention {
            hold_ticks,
            ..PressureRetention::default()
        }))
}

fn arena_decay_ms(arena: u32) -> isize {
    let key = format!("arena.{arena}.dirty_decay_ms\0");
    // SAFETY: `arena.<i>.dirty_decay_ms` is an `ssize_t`.
    unsafe { raw::read::<isize>(key.as_bytes()) }.unwrap()
}

fn arena_dirty_bytes(arena: u32) -> usize {
    epoch::advance().unwrap();
    let key = format!("stats.arenas.{arena}.pdirty\0");
    // SAFETY: `stats.arenas.<i>.pdirty` is a `size_t` count of pages.
    let pages = unsafe { raw::read::<usize>(key.as_bytes()) }.unwrap();
    // SAFETY: `arenas.page` is a `size_t`.
    pages * unsafe { raw::read::<usize>(b"arenas.page\0") }.unwrap()
}

/// Makes an arena that keeps freed pages for ever, leaves 64 MiB of them dirty in it, and
/// returns it with the calling thread still pinned to it (leaving an arena can make jemalloc
/// tidy it, which would spoil the "before").
fn arena_with_dirty_pages() -> (u32, ArenaGuard) {
    let arena = create_arena().unwrap();
    let key = format!("arena.{arena}.dirty_decay_ms\0");
    // SAFETY: `arena.<i>.dirty_decay_ms` is an `ssize_t`; -1 is "never decay".
    unsafe { raw::write::<isize>(key.as_bytes(), -1) }.unwrap();
    let pinned = pin_thread_arena_scoped(arena).unwrap();
    // 64 KiB pieces: above the thread cache's largest class and below the size that goes to
    // jemalloc's oversize arena, so they come from this arena and go back to it.
    let pieces: Vec<Vec<u8>> = (0..1024)
        .map(|i| vec![(i % 200) as u8 + 1; 64 * 1024])
        .collect();
    drop(std::hint::black_box(pieces));
    (arena, pinned)
}

#[test]
fn near_the_ceiling_freed_pages_go_back_and_away_from_it_the_start_up_decay_returns() {
    let _turn = ALLOCATOR.lock();
    let configured = configured_dirty_decay().unwrap();
    let configured_ms = configured.map_or(-1, |d| d.as_millis() as isize);
    let (arena, _pinned) = arena_with_dirty_pages();
    assert!(
        arena_dirty_bytes(arena) >= mib(60),
        "the arena keeps what was freed: {} dirty",
        arena_dirty_bytes(arena)
    );

    let governor = governor();
    let monitor = governor.start_rss_monitor(monitor_config(2)).unwrap();
    monitor.sample_now().unwrap();
    assert_eq!(governor.global_pressure(), PressureLevel::Normal);
    assert_eq!(
        monitor.stats().retention_switches,
        0,
        "far from the ceiling: untouched"
    );
    assert!(arena_dirty_bytes(arena) >= mib(60));

    // 80 % of the ceiling booked: Warning, the tight threshold.
    let token = governor
        .try_reserve(EngineId::Query, CEILING / 10 * 8)
        .unwrap();
    monitor.sample_now().unwrap();
    assert!(governor.global_pressure() >= PressureLevel::Warning);
    let stats = monitor.stats();
    assert!(stats.retention_tight, "{stats:?}");
    assert_eq!(stats.retention_switches, 1);
    assert_eq!(default_dirty_decay().unwrap(), Some(Duration::ZERO));
    assert_eq!(
        arena_decay_ms(arena),
        0,
        "existing arenas follow, not only new ones"
    );
    assert_eq!(
        arena_dirty_bytes(arena),
        0,
        "tightening returned the kept pages"
    );

    // Calm again: held for two ticks, relaxed on the third.
    drop(token);
    for tick in 1..=2 {
        monitor.sample_now().unwrap();
        assert_eq!(governor.global_pressure(), PressureLevel::Normal);
        assert!(
            monitor.stats().retention_tight,
            "calm tick {tick} is within the hold"
        );
    }
    monitor.sample_now().unwrap();
    let stats = monitor.stats();
    assert!(!stats.retention_tight, "{stats:?}");
    assert_eq!(stats.retention_switches, 2);
    assert_eq!(default_dirty_decay().unwrap(), configured);
    assert_eq!(arena_decay_ms(arena), configured_ms);
}

/// A governor 90 % booked and its monitor, ticked once: tight, with a long hold.
fn tight_monitor() -> (Arc<MemoryGovernor>, RssMonitorHandle, ReservationToken) {
    let governor = governor();
    let monitor = governor.start_rss_monitor(monitor_config(100)).unwrap();
    let token = governor
        .try_reserve(EngineId::Query, CEILING / 10 * 9)
        .unwrap();
    monitor.sample_now().unwrap();
    assert!(monitor.stats().retention_tight);
    assert_eq!(default_dirty_decay().unwrap(), Some(Duration::ZERO));
    (governor, monitor, token)
}

#[test]
fn a_monitor_stopped_while_tight_puts_the_start_up_decay_back() {
    let _turn = ALLOCATOR.lock();
    let configured = configured_dirty_decay().unwrap();
    let (_governor, monitor, token) = tight_monitor();
    drop(monitor);
    assert_eq!(default_dirty_decay().unwrap(), configured);
    drop(token);
}

#[test]
fn a_decay_changed_behind_the_monitor_is_applied_again() {
    let _turn = ALLOCATOR.lock();
    let configured = configured_dirty_decay().unwrap();
    let (_governor, monitor, token) = tight_monitor();
    // Another party (a second monitor stopping, the application) relaxes it.
    governor_core::alloc::decay::set_dirty_decay_everywhere(configured).unwrap();
    monitor.sample_now().unwrap();
    assert_eq!(default_dirty_decay().unwrap(), Some(Duration::ZERO));
    assert_eq!(monitor.stats().retention_switches, 2);
    drop(monitor);
    drop(token);
}

#[test]
fn untouched_leaves_the_allocator_alone_at_any_pressure() {
    let _turn = ALLOCATOR.lock();
    let before = default_dirty_decay().unwrap();
    let governor = governor();
    let monitor = governor
        .start_rss_monitor(
            RssMonitorConfig::default()
                .with_interval(Duration::from_hours(1))
                .with_allocator_retention(AllocatorRetention::Untouched),
        )
        .unwrap();
    let token = governor
        .try_reserve(EngineId::Query, CEILING / 10 * 9)
        .unwrap();
    monitor.sample_now().unwrap();
    assert!(governor.global_pressure() >= PressureLevel::Critical);
    assert_eq!(monitor.stats().retention_switches, 0);
    assert_eq!(default_dirty_decay().unwrap(), before);
    drop(token);
}

#[test]
fn a_bad_policy_is_refused_at_start() {
    let governor = governor();
    let err = governor
        .start_rss_monitor(
            RssMonitorConfig::default()
                .with_allocator_retention(AllocatorRetention::Fixed(Duration::MAX)),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("rss_monitor.retention.fixed"),
        "{err}"
    );
}
