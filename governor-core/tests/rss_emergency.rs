//! Past the Emergency threshold the monitor purges jemalloc and asks borrowers to reclaim,
//! and when there is no borrower left, every holder, bringing real RSS back under the ceiling.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use governor_core::alloc::{process_resident_bytes, purge_all_arenas};
use governor_core::rss_monitor::{RssMonitorConfig, RssMonitorStats};
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, ReclaimError, Reclaimer,
    ReservationToken, human_bytes, mib,
};
use parking_lot::Mutex;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CEILING: usize = mib(160);
const CHUNK: usize = mib(4);

/// A cache that borrowed memory and drops chunks when asked.
#[derive(Default)]
struct Cache {
    chunks: Mutex<Vec<(ReservationToken, Vec<u8>)>>,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl Reclaimer for Cache {
    fn reclaimable(&self) -> usize {
        self.chunks.lock().len() * CHUNK
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut chunks = self.chunks.lock();
        let mut freed = 0;
        while freed < target {
            let Some((token, buffer)) = chunks.pop() else {
                break;
            };
            freed += token.size();
            drop((token, buffer));
        }
        Ok(freed)
    }
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn emergency_purges_and_reclaims_from_borrowers() {
    let stats = emergency_with_vector_floor(0);
    assert!(stats.reclaims >= 1, "{stats:?}");
    assert_eq!(stats.floor_reclaims, 0, "borrowers were enough: {stats:?}");
}

/// The vector cache holds only its floor, so there is no borrower to ask: the floors give way
/// to the ceiling and the monitor asks the holder itself.
#[test]
fn emergency_reclaims_below_floors_when_no_borrower_is_left() {
    let stats = emergency_with_vector_floor(mib(64));
    assert!(stats.floor_reclaims >= 1, "{stats:?}");
}

/// A 64 MiB vector cache (with `vector_floor`), then untracked memory until the process is
/// past the Emergency threshold: the monitor must purge and reclaim until RSS is back under
/// the Critical threshold. Returns the monitor's stats.
fn emergency_with_vector_floor(vector_floor: usize) -> RssMonitorStats {
    // RSS is the process's: the two tests must not add untracked memory at the same time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    purge_all_arenas().unwrap();
    let governor = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(CEILING)
            .engine(
                EngineId::Vector,
                EngineBudget::new(CEILING).with_floor(vector_floor),
            )
            .engine(
                EngineId::Query,
                EngineBudget::new(CEILING).with_floor(mib(32)),
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    let cache = Arc::new(Cache::default());
    let _reclaimer = governor.register_reclaimer(EngineId::Vector, cache.clone());
    // The vector cache borrows 64 MiB, all resident.
    for _ in 0..16 {
        let token = governor.try_reserve(EngineId::Vector, CHUNK).unwrap();
        cache
            .chunks
            .lock()
            .push((token, black_box(vec![3u8; CHUNK])));
    }
    let monitor = governor
        .start_rss_monitor(
            RssMonitorConfig::default()
                .with_interval(Duration::from_millis(20))
                .with_cooldown_ticks(2),
        )
        .unwrap();

    // Untracked memory grows until the process is past the Emergency threshold (95 %).
    let mut untracked = Vec::new();
    let emergency = CEILING / 100 * 95;
    // Stop adding as soon as the monitor starts reclaiming: memory the governor cannot
    // reclaim would otherwise keep RSS up whatever the borrowers give back.
    while process_resident_bytes().unwrap() < emergency + CHUNK
        && cache.calls.load(Ordering::SeqCst) == 0
    {
        untracked.push(black_box(vec![4u8; CHUNK]));
        assert!(
            untracked.len() < 64,
            "RSS does not grow: {}",
            human_bytes(process_resident_bytes().unwrap())
        );
    }
    let peak = process_resident_bytes().unwrap();

    wait_for("a reclaim from the vector cache", || {
        cache.calls.load(Ordering::SeqCst) > 0
    });
    wait_for(
        "RSS back under the Critical threshold plus headroom",
        || process_resident_bytes().unwrap() <= CEILING / 100 * 90,
    );
    // The monitor books what a reclaim freed when the reclaim returns, which can be after
    // RSS fell: near the ceiling freed pages go back to the kernel at once (`retention`).
    wait_for("the monitor to book what the reclaim freed", || {
        monitor.stats().reclaimed_bytes >= CHUNK
    });
    let stats = monitor.stats();
    let after = process_resident_bytes().unwrap();
    eprintln!(
        "peak {} -> {} after reclaim; vector reserved {}; {stats:?}",
        human_bytes(peak),
        human_bytes(after),
        human_bytes(governor.reserved(EngineId::Vector))
    );
    assert!(stats.emergencies >= 1 && stats.purges >= 1, "{stats:?}");
    assert!(stats.reclaimed_bytes >= CHUNK, "{stats:?}");
    assert!(
        governor.reserved(EngineId::Vector) < mib(64),
        "the cache gave memory back"
    );
    drop(monitor);
    drop(untracked);
    stats
}
