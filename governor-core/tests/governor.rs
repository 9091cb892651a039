//! Behaviour of the public governor API: admission, lending, errors, pressure, reclaim.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, PressureLevel,
    RebalancePolicy, ReclaimError, Reclaimer, ReservationToken, kib, mib,
};

mod common;

use common::Spiller;

fn governor() -> Arc<MemoryGovernor> {
    governor_with_reclaim_timeout(Duration::from_millis(200))
}

fn governor_with_reclaim_timeout(timeout: Duration) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(mib(100))
        .engine(
            EngineId::Query,
            EngineBudget::new(mib(80)).with_floor(mib(20)),
        )
        .engine(
            EngineId::Timeseries,
            EngineBudget::new(mib(60)).with_floor(mib(40)),
        )
        .engine(
            EngineId::Vector,
            EngineBudget::new(mib(50)).with_floor(mib(10)),
        )
        .reclaim_timeout(timeout)
        .build()
        .unwrap();
    MemoryGovernor::new(config).unwrap()
}

#[test]
fn engine_limit_denial_is_descriptive_and_deterministic() {
    let g = governor();
    let _held = g.try_reserve(EngineId::Vector, mib(45)).unwrap();
    for _ in 0..3 {
        let err = g.try_reserve(EngineId::Vector, mib(10)).unwrap_err();
        assert_eq!(
            err,
            MemError::BudgetExhausted {
                engine: EngineId::Vector,
                requested: mib(10),
                available: mib(5),
                reserved: mib(45),
                limit: mib(50),
            }
        );
    }
    assert_eq!(g.snapshot().engine(EngineId::Vector).unwrap().rejections, 3);
    assert!(g.try_reserve(EngineId::Vector, mib(5)).is_ok());
}

#[test]
fn ceiling_denial_names_the_holders() {
    let g = governor();
    let _q = g.try_reserve(EngineId::Query, mib(70)).unwrap();
    let _v = g.try_reserve(EngineId::Vector, mib(20)).unwrap();
    let err = g.try_reserve(EngineId::Timeseries, mib(20)).unwrap_err();
    match &err {
        MemError::GlobalCeilingExceeded {
            engine,
            requested,
            reserved,
            ceiling,
            top_holders,
            ..
        } => {
            assert_eq!(
                (*engine, *requested, *reserved, *ceiling),
                (EngineId::Timeseries, mib(20), mib(90), mib(100))
            );
            assert_eq!(
                top_holders.0,
                vec![(EngineId::Query, mib(70)), (EngineId::Vector, mib(20))]
            );
        }
        other => panic!("expected a ceiling denial, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("held by: query 70.0 MiB, vector 20.0 MiB"),
        "{err}"
    );
}

#[test]
fn unknown_engine_is_refused_but_resident_memory_is_still_booked() {
    let g = governor();
    assert_eq!(
        g.try_reserve(EngineId::Wal, 1).unwrap_err(),
        MemError::UnknownEngine {
            engine: EngineId::Wal
        }
    );
    let charged = g.charge(EngineId::Wal, mib(1));
    assert_eq!(g.reserved(EngineId::Wal), mib(1));
    drop(charged);
    assert_eq!(g.reserved(EngineId::Wal), 0);
}

#[test]
fn tokens_cannot_release_more_than_they_hold() {
    let g = governor();
    let mut t = g.try_reserve(EngineId::Query, kib(64)).unwrap();
    assert_eq!(
        t.shrink(kib(65)).unwrap_err(),
        MemError::ShrinkBeyondHeld {
            engine: EngineId::Query,
            requested: kib(65),
            held: kib(64)
        }
    );
    assert!(t.split(kib(65)).is_err());
    let part = t.split(kib(16)).unwrap();
    assert_eq!((t.size(), part.size()), (kib(48), kib(16)));
    assert_eq!(g.reserved(EngineId::Query), kib(64));
    t.merge(part).unwrap();
    assert_eq!(t.size(), kib(64));
    let other = g.try_reserve(EngineId::Vector, 10).unwrap();
    let other = t.merge(other).unwrap_err();
    assert_eq!(other.engine(), EngineId::Vector);
    t.try_resize(kib(8)).unwrap();
    assert_eq!(g.reserved(EngineId::Query), kib(8));
    assert_eq!(t.free(), kib(8));
    assert_eq!(t.free(), 0);
    drop(t);
    drop(other);
    assert_eq!(g.global_reserved(), 0);
}

#[test]
fn tokens_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ReservationToken>();
    assert_send_sync::<MemoryGovernor>();
}

#[test]
fn charge_overcommits_raises_pressure_and_blocks_admission() {
    let g = governor();
    let resident = g.charge(EngineId::Vector, mib(60));
    let snap = g.snapshot();
    let v = snap.engine(EngineId::Vector).unwrap();
    assert_eq!(v.overcommit, mib(10));
    assert_eq!(v.pressure, PressureLevel::Emergency);
    assert!(matches!(
        g.try_reserve(EngineId::Vector, 1),
        Err(MemError::BudgetExhausted { .. })
    ));
    drop(resident);
    assert!(g.try_reserve(EngineId::Vector, mib(1)).is_ok());
}

#[test]
fn pressure_changes_are_published() {
    let g = governor();
    let mut rx = g.subscribe_pressure(EngineId::Query);
    let mut global = g.subscribe_global_pressure();
    let t = g.try_reserve(EngineId::Query, mib(60)).unwrap();
    assert_eq!(*rx.borrow_and_update(), PressureLevel::Warning);
    assert_eq!(g.engine_pressure(EngineId::Query), PressureLevel::Warning);
    let mut t2 = g.try_reserve(EngineId::Query, mib(9)).unwrap();
    assert_eq!(*rx.borrow_and_update(), PressureLevel::Critical);
    t2.try_grow(mib(8)).unwrap();
    assert_eq!(*rx.borrow_and_update(), PressureLevel::Emergency);
    assert_eq!(
        *global.borrow_and_update(),
        PressureLevel::Emergency.min(g.global_pressure())
    );
    drop((t, t2));
    assert_eq!(*rx.borrow_and_update(), PressureLevel::Normal);
}

#[test]
fn runtime_limit_and_floor_changes_keep_invariants() {
    let g = governor();
    let held = g.try_reserve(EngineId::Query, mib(30)).unwrap();
    assert!(matches!(
        g.set_limit(EngineId::Query, mib(20)),
        Err(MemError::InvalidConfig { .. })
    ));
    assert!(matches!(
        g.set_limit(EngineId::Query, mib(101)),
        Err(MemError::InvalidConfig { .. })
    ));
    assert!(
        matches!(
            g.set_limit(EngineId::Query, mib(10)),
            Err(MemError::InvalidConfig { .. })
        ),
        "below floor"
    );
    g.set_limit(EngineId::Query, mib(35)).unwrap();
    assert!(g.try_reserve(EngineId::Query, mib(6)).is_err());
    assert!(
        matches!(
            g.set_floor(EngineId::Query, mib(51)),
            Err(MemError::InvalidConfig { .. })
        ),
        "floors > ceiling"
    );
    g.set_floor(EngineId::Query, mib(30)).unwrap();
    assert_eq!(g.floor(EngineId::Query), mib(30));
    drop(held);
}

#[test]
fn untracked_memory_takes_room_from_reservations() {
    let g = governor();
    g.set_untracked(mib(70));
    let err = g.try_reserve(EngineId::Query, mib(40)).unwrap_err();
    assert!(
        err.to_string()
            .contains("untracked (outside reservations): 70.0 MiB"),
        "{err}"
    );
    g.set_untracked(0);
    assert!(g.try_reserve(EngineId::Query, mib(40)).is_ok());
}

#[test]
fn prometheus_text_has_engine_and_consumer_series() {
    struct Source;
    impl governor_core::ConsumerStatsSource for Source {
        fn consumers(&self) -> Vec<governor_core::ConsumerSnapshot> {
            vec![governor_core::ConsumerSnapshot {
                engine: EngineId::Vector,
                name: "hnsw-cache".into(),
                reserved: 42,
                peak: 43,
                denials: 1,
                pinned: 7,
            }]
        }
    }
    let g = governor();
    let _t = g.try_reserve(EngineId::Query, mib(1)).unwrap();
    let handle = g.register_consumer_stats(Arc::new(Source));
    let text = g.snapshot().to_prometheus();
    assert!(
        text.contains("memgov_engine_reserved_bytes{engine=\"query\"} 1048576"),
        "{text}"
    );
    assert!(
        text.contains("memgov_consumer_pinned_bytes{engine=\"vector\",consumer=\"hnsw-cache\"} 7"),
        "{text}"
    );
    assert!(text.contains("memgov_ceiling_bytes 104857600"), "{text}");
    drop(handle);
    assert!(g.snapshot().consumers.is_empty());
}

#[tokio::test]
async fn engine_below_floor_gets_its_floor_back_from_the_borrower() {
    let g = governor();
    // Query borrows: 80 MiB, 60 above its 20 MiB floor, eating Timeseries' idle floor.
    let tokens = (0..8)
        .map(|_| g.try_reserve(EngineId::Query, mib(10)).unwrap())
        .collect();
    let spiller = Spiller::new(tokens);
    let _h = g.register_reclaimer(EngineId::Query, spiller.clone());
    assert_eq!(g.borrowed(EngineId::Query), mib(60));
    // The sync path says no at once...
    assert!(matches!(
        g.try_reserve(EngineId::Timeseries, mib(30)),
        Err(MemError::GlobalCeilingExceeded { .. })
    ));
    // ...the async path waits for the borrower to spill.
    let t = g
        .reserve(EngineId::Timeseries, mib(30), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(t.size(), mib(30));
    assert!(spiller.calls.load(Ordering::SeqCst) >= 1);
    // The waiter wakes as soon as the spiller drops tokens, which may be before the reclaim
    // plan has recorded what the reclaimer returned: give the metric a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let reclaimed = || {
        g.snapshot()
            .engine(EngineId::Query)
            .unwrap()
            .reclaimed_bytes
    };
    while reclaimed() < mib(10) as u64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(reclaimed() >= mib(10) as u64, "{}", reclaimed());
    let snap = g.snapshot();
    assert!(snap.global_reserved <= snap.ceiling);
}

#[tokio::test]
async fn reserve_times_out_with_a_clear_error_and_leaves_nothing_behind() {
    let g = governor();
    let _q = g.try_reserve(EngineId::Query, mib(80)).unwrap();
    let err = g
        .reserve(EngineId::Vector, mib(30), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MemError::Timeout {
                engine: EngineId::Vector,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(g.reserved(EngineId::Vector), 0);
    assert_eq!(
        g.snapshot().engine(EngineId::Vector).unwrap().waiting_bytes,
        0
    );
}

#[tokio::test]
async fn reserve_wakes_when_memory_is_released() {
    let g = governor();
    let q = g.try_reserve(EngineId::Query, mib(80)).unwrap();
    let g2 = Arc::clone(&g);
    let waiter = tokio::spawn(async move {
        g2.reserve(EngineId::Vector, mib(30), Duration::from_secs(10))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(q);
    let t = waiter.await.unwrap().unwrap();
    assert_eq!(t.size(), mib(30));
}

struct Failing;
#[async_trait]
impl Reclaimer for Failing {
    fn reclaimable(&self) -> usize {
        usize::MAX
    }
    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        Err(ReclaimError::new("spill disk full"))
    }
}

struct Panicking;
#[async_trait]
impl Reclaimer for Panicking {
    fn reclaimable(&self) -> usize {
        1
    }
    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        panic!("reclaimer bug")
    }
}

struct Hanging;
#[async_trait]
impl Reclaimer for Hanging {
    fn reclaimable(&self) -> usize {
        1
    }
    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        std::future::pending::<()>().await;
        Ok(0)
    }
}

#[tokio::test]
async fn failing_panicking_and_hanging_reclaimers_are_reported_and_skipped() {
    // Long enough that a loaded CI machine still sees the panic before the timeout.
    let g = governor_with_reclaim_timeout(Duration::from_secs(2));
    let _q = g.try_reserve(EngineId::Query, mib(50)).unwrap();
    let _v = g.try_reserve(EngineId::Vector, mib(30)).unwrap();
    let _h1 = g.register_reclaimer(EngineId::Query, Arc::new(Failing));
    let _h2 = g.register_reclaimer(EngineId::Query, Arc::new(Panicking));
    let _h3 = g.register_reclaimer(EngineId::Vector, Arc::new(Hanging));
    let outcome = g.reclaim_for(EngineId::Timeseries, mib(40)).await;
    assert_eq!(outcome.freed, 0);
    assert_eq!(outcome.steps.len(), 3, "{outcome:?}");
    assert!(
        outcome
            .steps
            .iter()
            .all(|s| matches!(s.result, Err(MemError::ReclaimFailed { .. })))
    );
    let reasons: Vec<String> = outcome
        .steps
        .iter()
        .map(|s| format!("{:?}", s.result))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("spill disk full")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("panicked")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no answer within")),
        "{reasons:?}"
    );
    // The hung one is skipped next time instead of being called again.
    let again = g.reclaim_for(EngineId::Timeseries, mib(40)).await;
    assert!(format!("{again:?}").contains("has not returned yet"));
    // The sync variant is bounded too.
    let blocking = g.reclaim_for_blocking(EngineId::Timeseries, mib(10), Duration::from_millis(50));
    assert_eq!(blocking.freed, 0);
    let snap = g.snapshot();
    assert!(snap.engine(EngineId::Query).unwrap().reclaim_failures >= 4);
    assert_eq!(
        g.global_reserved(),
        mib(80),
        "books untouched by failing reclaimers"
    );
}

#[tokio::test]
async fn rebalancer_relieves_critical_global_pressure_from_borrowers() {
    let g = governor();
    let tokens = (0..9)
        .map(|_| g.try_reserve(EngineId::Query, mib(8)).unwrap())
        .collect();
    let spiller = Spiller::new(tokens);
    let _h = g.register_reclaimer(EngineId::Query, spiller.clone());
    let _v = g.try_reserve(EngineId::Vector, mib(18)).unwrap();
    assert!(g.global_pressure() >= PressureLevel::Critical);
    let report = g.rebalance_once(&RebalancePolicy::default()).await;
    let relief = report
        .pressure_relief
        .expect("critical pressure must be relieved");
    assert!(relief.freed > 0);
    assert!(
        g.global_reserved() <= mib(70) + mib(8),
        "brought back near the warning threshold"
    );
}
