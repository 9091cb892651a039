//! The live ceiling (`MemoryGovernor::set_ceiling`): raising wakes waiters, lowering refuses
//! new admissions at once and drains borrowers within the policy's deadline, a hanging
//! reclaimer does not hold the drain, misfits are reported (or floors scaled), and admissions
//! racing 1,000 ceiling changes never pass the ceiling they were admitted under.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use governor_core::{
    CeilingMisfit, CeilingPolicy, EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor,
    ReclaimError, Reclaimer, ReservationToken, mib,
};
mod common;

use common::Spiller;

/// Only a wedged governor misses it.
const DEADLINE: Duration = Duration::from_mins(1);

struct Hanging;

#[async_trait]
impl Reclaimer for Hanging {
    fn reclaimable(&self) -> usize {
        usize::MAX
    }

    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        std::future::pending().await
    }
}

fn governor(policy: CeilingPolicy) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(100))
            .engine(
                EngineId::Query,
                EngineBudget::new(mib(100)).with_floor(mib(10)),
            )
            .engine(
                EngineId::Vector,
                EngineBudget::new(mib(60)).with_floor(mib(30)),
            )
            .engine(
                EngineId::Timeseries,
                EngineBudget::new(mib(40)).with_floor(mib(20)),
            )
            .reclaim_timeout(Duration::from_millis(200))
            .ceiling_policy(policy)
            .build()
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_ceiling_wakes_a_waiter() {
    let g = governor(CeilingPolicy::default());
    let change = g.set_ceiling(mib(40)).unwrap();
    assert_eq!(
        (change.from, change.to, change.over),
        (mib(100), mib(40), 0)
    );
    let _held = g.try_reserve(EngineId::Query, mib(40)).unwrap();
    let waiter = {
        let g = Arc::clone(&g);
        tokio::spawn(async move { g.reserve(EngineId::Query, mib(30), DEADLINE).await })
    };
    let deadline = Instant::now() + DEADLINE;
    while g.snapshot().engine(EngineId::Query).unwrap().waiting_bytes == 0 {
        assert!(Instant::now() < deadline, "never waited");
        tokio::task::yield_now().await;
    }
    let mut change = g.set_ceiling(mib(100)).unwrap();
    assert_eq!(change.finished().await.still_over, 0);
    let token = waiter
        .await
        .unwrap()
        .expect("the raise admitted the waiter");
    assert_eq!(token.size(), mib(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_refuses_at_once_and_drains_borrowers() {
    let g = governor(CeilingPolicy::default());
    let spiller = Arc::new(Spiller::default());
    for _ in 0..60 {
        spiller
            .held
            .lock()
            .push(g.try_reserve(EngineId::Query, mib(1)).unwrap());
    }
    let _r = g.register_reclaimer(EngineId::Query, Arc::clone(&spiller) as Arc<dyn Reclaimer>);
    let resident = g.try_reserve(EngineId::Vector, mib(20)).unwrap();
    let mut change = g.set_ceiling(mib(50)).unwrap();
    assert_eq!(change.over, mib(30));
    // In force for admission when it returns.
    let err = g.try_reserve(EngineId::Timeseries, 1).unwrap_err();
    assert!(matches!(err, MemError::GlobalCeilingExceeded { ceiling, .. } if ceiling == mib(50)));
    let outcome = tokio::time::timeout(DEADLINE, change.finished())
        .await
        .expect("the drain ended");
    assert_eq!(outcome.still_over, 0, "{outcome:?}");
    assert!(outcome.drained >= mib(30));
    assert!(!outcome.timed_out);
    assert!(g.global_reserved() <= mib(50));
    assert_eq!(
        g.reserved(EngineId::Vector),
        mib(20),
        "the floor holder kept its memory"
    );
    drop(resident);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_reclaimer_does_not_hold_the_drain_past_its_deadline() {
    let g = governor(CeilingPolicy {
        drain_deadline: Duration::from_millis(300),
        ..CeilingPolicy::default()
    });
    let _held = g.try_reserve(EngineId::Query, mib(60)).unwrap();
    let _r = g.register_reclaimer(EngineId::Query, Arc::new(Hanging));
    let mut change = g.set_ceiling(mib(50)).unwrap();
    let outcome = tokio::time::timeout(DEADLINE, change.finished())
        .await
        .expect("the drain gave up");
    assert_eq!(outcome.still_over, mib(10), "{outcome:?}");
    assert_eq!(outcome.drained, 0);
    // Over until holders release: nothing is admitted, and pressure says so.
    assert!(g.try_reserve(EngineId::Vector, 1).is_err());
    assert_eq!(g.global_pressure(), governor_core::PressureLevel::Emergency);
}

#[test]
fn misfits_are_reported_and_floors_scaled_only_on_request() {
    let g = governor(CeilingPolicy::default());
    let change = g.set_ceiling(mib(50)).unwrap();
    assert!(change.misfits.contains(&CeilingMisfit::LimitAboveCeiling {
        engine: EngineId::Query,
        limit: mib(100)
    }));
    assert!(
        change
            .misfits
            .contains(&CeilingMisfit::FloorsAboveCeiling { floors: mib(60) })
    );
    assert_eq!(g.floor(EngineId::Vector), mib(30), "not silently changed");

    let g = governor(CeilingPolicy {
        scale_floors: true,
        ..CeilingPolicy::default()
    });
    let change = g.set_ceiling(mib(30)).unwrap();
    assert!(change.misfits.contains(&CeilingMisfit::FloorScaled {
        engine: EngineId::Vector,
        from: mib(30),
        to: mib(15)
    }));
    let floors: usize = [EngineId::Query, EngineId::Vector, EngineId::Timeseries]
        .iter()
        .map(|&e| g.floor(e))
        .sum();
    assert!(floors <= mib(30));
    for bad in [0, usize::MAX] {
        assert!(matches!(
            g.set_ceiling(bad),
            Err(MemError::InvalidConfig { .. })
        ));
    }
}

/// Eight threads admit and release while the ceiling moves up and down 1,000 times. Each
/// thread counts what it holds (after admission, before release); a sampler checks, after
/// every change, that the ledger's grant never passes the larger of the old and new ceiling
/// and that once a lowering has drained, what is admitted stays under the lowered ceiling.
#[test]
fn admissions_racing_ceiling_changes_respect_the_ceiling_in_force() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(EngineId::Query, EngineBudget::new(mib(64)))
            .engine(EngineId::Vector, EngineBudget::new(mib(64)))
            .reservation_shards(8)
            .build()
            .unwrap(),
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let held = AtomicUsize::new(0);
    let ceiling_now = AtomicUsize::new(mib(64));
    std::thread::scope(|s| {
        for t in 0..8usize {
            let (g, stop, held) = (&g, &stop, &held);
            s.spawn(move || {
                let engine = if t.is_multiple_of(2) {
                    EngineId::Query
                } else {
                    EngineId::Vector
                };
                let mut mine: Vec<ReservationToken> = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Acquire) {
                    i += 1;
                    let bytes = (i % 7 + 1) * 64 * 1024;
                    if let Ok(token) = g.try_reserve(engine, bytes) {
                        held.fetch_add(token.size(), Ordering::AcqRel);
                        mine.push(token);
                    }
                    if (mine.len() > 16 || i.is_multiple_of(5))
                        && let Some(token) = mine.pop()
                    {
                        held.fetch_sub(token.size(), Ordering::AcqRel);
                    }
                }
                for token in mine {
                    held.fetch_sub(token.size(), Ordering::AcqRel);
                }
            });
        }
        let (g, stop) = (&g, &stop);
        let held = &held;
        let ceiling_now = &ceiling_now;
        s.spawn(move || {
            for change in 0..1_000 {
                let new = if change % 2 == 0 { mib(16) } else { mib(64) };
                let before = ceiling_now.swap(new, Ordering::AcqRel);
                g.set_ceiling(new).unwrap();
                // What the ledger has granted never passes the larger of the two ceilings
                // (grants before the change saw the old one, after it the new one).
                let granted = g.snapshot().global_granted;
                assert!(
                    granted <= before.max(new),
                    "granted {granted} > {}",
                    before.max(new)
                );
                // After a lowering, once holders released enough to be under it, admissions
                // are bounded by it.
                if new < before {
                    let deadline = Instant::now() + DEADLINE;
                    while g.global_reserved() > new {
                        assert!(Instant::now() < deadline, "holders never came under {new}");
                        std::thread::yield_now();
                    }
                    for _ in 0..50 {
                        let tokens = held.load(Ordering::Acquire);
                        assert!(
                            tokens <= new,
                            "tokens hold {tokens} > the ceiling in force {new} (change {change})"
                        );
                    }
                }
            }
            stop.store(true, Ordering::Release);
        });
    });
    assert_eq!(g.global_reserved(), 0);
}

/// The RSS monitor's law follows a live ceiling: its headroom, sized from a large ceiling at
/// start, would otherwise be charged as untracked memory after a drop and refuse every
/// admission under a ceiling the process fits in with room to spare. Found by the workload's
/// cgroup test: 0.9 × 24 GiB of physical memory, then a container limit of 384 MiB.
#[test]
fn the_rss_monitor_follows_a_lowered_ceiling() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(governor_core::gib(64))
            .engine(EngineId::Query, EngineBudget::new(mib(256)))
            .build()
            .unwrap(),
    )
    .unwrap();
    // A long interval: only `sample_now` ticks, so the test decides when.
    let monitor = g
        .start_rss_monitor(
            governor_core::RssMonitorConfig::default().with_interval(Duration::from_hours(1)),
        )
        .unwrap();
    monitor.sample_now().unwrap();
    let resident = governor_core::alloc::ProcessMemory::query().unwrap().rss;
    // 2 % of 64 GiB of headroom on top of what is resident.
    assert!(g.untracked() > mib(1024), "{}", g.untracked());
    let lowered = resident + mib(512);
    g.set_ceiling(lowered).unwrap();
    monitor.sample_now().unwrap();
    assert!(
        g.untracked() < resident + mib(64),
        "untracked {} with {resident} resident under a {lowered} ceiling",
        g.untracked()
    );
    let query = g.try_reserve(EngineId::Query, mib(128));
    assert!(query.is_ok(), "{query:?}");
}

/// Issue 25: a configuration written for the biggest container starts in a smaller one. A
/// limit above the ceiling is not a start-up error: the engine's effective limit is the
/// smaller of the two, admission is bounded by the ceiling, and raising the ceiling gives
/// the engine its configured limit back.
#[test]
fn a_limit_above_the_ceiling_builds_and_is_bounded_by_the_ceiling() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(32))
            .engine(EngineId::Query, EngineBudget::new(mib(64)))
            .engine(
                EngineId::Vector,
                EngineBudget::new(mib(48)).with_floor(mib(8)),
            )
            .build()
            .expect("limits above the ceiling build"),
    )
    .unwrap();
    assert_eq!(g.limit(EngineId::Query), mib(64));
    assert_eq!(g.effective_limit(EngineId::Query), mib(32));
    let snap = g.snapshot();
    let q = snap.engine(EngineId::Query).unwrap();
    assert_eq!((q.limit, q.effective_limit), (mib(64), mib(32)));
    assert!(g.try_reserve(EngineId::Query, mib(32) + 1).is_err());
    let held = g.try_reserve(EngineId::Query, mib(24)).unwrap();
    assert!(g.global_reserved() <= g.ceiling());
    drop(held);
    g.set_ceiling(mib(128)).unwrap();
    assert_eq!(g.effective_limit(EngineId::Query), mib(64));
    assert!(g.try_reserve(EngineId::Query, mib(64) + 1).is_err());
    let held = g.try_reserve(EngineId::Query, mib(60)).unwrap();
    assert_eq!(g.reserved(EngineId::Query), mib(60));
    drop(held);
    // At run time a limit is set within the ceiling in force (the operator is told at once).
    g.set_ceiling(mib(32)).unwrap();
    assert!(matches!(
        g.set_limit(EngineId::Vector, mib(100)),
        Err(MemError::InvalidConfig { .. })
    ));
    assert_eq!(g.effective_limit(EngineId::Vector), mib(32));
}
