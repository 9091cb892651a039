//! The evidence: a workload allocates untracked memory (outside any reservation) and
//! then reserves tracked memory up to the ceiling. With the RSS monitor on, peak RSS stays
//! within the ceiling and reservations are denied instead; with it off, RSS goes over. Both
//! runs happen in this one process, one after the other, from the same baseline.
//!
//! Only one test lives in this binary so that nothing else moves the process's RSS.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use governor_core::alloc::{process_resident_bytes, purge_all_arenas};
use governor_core::rss_monitor::RssMonitorConfig;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReservationToken,
    human_bytes, mib,
};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CEILING: usize = mib(256);
const UNTRACKED: usize = mib(96);
const CHUNK: usize = mib(4);

/// Samples the process RSS every millisecond and keeps the maximum.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(process_resident_bytes().unwrap()));
        let thread = std::thread::spawn({
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(process_resident_bytes().unwrap(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        // One last exact reading: the workload still holds everything at this point.
        self.peak
            .fetch_max(process_resident_bytes().unwrap(), Ordering::Relaxed)
    }
}

struct Outcome {
    peak_rss: usize,
    reserved: usize,
    denial: Option<MemError>,
}

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

/// Untracked memory first, then tracked chunks (reserved, then allocated and touched) until
/// the governor says no or the whole ceiling is reserved.
fn workload(governor: &Arc<MemoryGovernor>, monitored: bool) -> Outcome {
    let sampler = PeakSampler::start();
    let untracked: Vec<Vec<u8>> = (0..UNTRACKED / CHUNK)
        .map(|_| black_box(vec![1u8; CHUNK]))
        .collect();
    if monitored {
        // Wait for the monitor to have charged the untracked memory (however slow the
        // machine); the assertion on RSS below does not depend on this timing, only the
        // denial does.
        let deadline = Instant::now() + Duration::from_secs(30);
        while governor.untracked() < UNTRACKED {
            assert!(
                Instant::now() < deadline,
                "the RSS monitor never charged the untracked memory"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut held: Vec<(ReservationToken, Vec<u8>)> = Vec::new();
    let mut denial = None;
    for _ in 0..CEILING / CHUNK {
        match governor.try_reserve(EngineId::Query, CHUNK) {
            Ok(token) => held.push((token, black_box(vec![2u8; CHUNK]))),
            Err(err) => {
                denial = Some(err);
                break;
            }
        }
    }
    let outcome = Outcome {
        peak_rss: sampler.finish(),
        reserved: governor.reserved(EngineId::Query),
        denial,
    };
    drop(held);
    drop(untracked);
    // Give the pages back so the next run starts from the same baseline.
    purge_all_arenas().unwrap();
    outcome
}

#[test]
fn monitor_keeps_rss_under_the_ceiling_by_denying_reservations() {
    purge_all_arenas().unwrap();
    let baseline = process_resident_bytes().unwrap();
    assert!(
        baseline < mib(64),
        "test process baseline {} leaves no room for the test",
        human_bytes(baseline)
    );

    // Monitor on.
    let on_governor = governor();
    let monitor = on_governor
        .start_rss_monitor(RssMonitorConfig::default().with_interval(Duration::from_millis(20)))
        .unwrap();
    let on = workload(&on_governor, true);
    let stats = monitor.stats();
    drop(monitor);

    // Monitor off: same workload, same process, a fresh governor that sees only reservations.
    let off = workload(&governor(), false);

    eprintln!(
        "baseline {}; monitor on: peak RSS {} reserved {} (ticks {}, emergencies {}, purges {}); \
         monitor off: peak RSS {} reserved {}",
        human_bytes(baseline),
        human_bytes(on.peak_rss),
        human_bytes(on.reserved),
        stats.ticks,
        stats.emergencies,
        stats.purges,
        human_bytes(off.peak_rss),
        human_bytes(off.reserved),
    );

    assert!(
        on.peak_rss <= CEILING,
        "monitor on: peak RSS {} over the ceiling",
        human_bytes(on.peak_rss)
    );
    match &on.denial {
        Some(MemError::GlobalCeilingExceeded { untracked, .. }) => {
            assert!(*untracked >= UNTRACKED, "{untracked}");
        }
        other => panic!("monitor on: expected a ceiling denial, got {other:?}"),
    }
    assert!(
        on.reserved <= CEILING - UNTRACKED,
        "reservations were cut by the untracked memory"
    );

    assert!(
        off.denial.is_none(),
        "monitor off: every reservation fits the books: {:?}",
        off.denial
    );
    assert_eq!(off.reserved, CEILING);
    assert!(
        off.peak_rss > CEILING,
        "monitor off: peak RSS {} should pass the ceiling",
        human_bytes(off.peak_rss)
    );
}
