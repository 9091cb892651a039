//! Policy tests without SQL: reservations made by hand against small budgets, so every number
//! the policy computes can be checked exactly.

// g = governor, p/d = pool and its `dyn` view, a/b = consumers: short names keep the
// scenarios readable.
#![allow(clippy::many_single_char_names)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use datafusion::common::DataFusionError;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, ReclaimError, Reclaimer,
    ReservationToken, kib,
};
use parking_lot::Mutex;

use crate::{GovernedMemoryPool, GovernorExt, is_governed, set_query_memory_limit};

/// A governor whose only engine is Query, with `limit` under a ceiling of the same size.
fn query_only(limit: usize) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(limit)
            .engine(EngineId::Query, EngineBudget::new(limit))
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn pool(
    governor: &Arc<MemoryGovernor>,
    headroom: f64,
    wait: Duration,
) -> (Arc<GovernedMemoryPool>, Arc<dyn MemoryPool>) {
    let p = Arc::new(
        GovernedMemoryPool::builder(governor)
            .unspillable_headroom(headroom)
            .reclaim_wait(wait)
            .build()
            .unwrap(),
    );
    let d: Arc<dyn MemoryPool> = Arc::clone(&p) as _;
    (p, d)
}

fn spiller(pool: &Arc<dyn MemoryPool>, name: &str) -> MemoryReservation {
    MemoryConsumer::new(name)
        .with_can_spill(true)
        .register(pool)
}

fn unspillable(pool: &Arc<dyn MemoryPool>, name: &str) -> MemoryReservation {
    MemoryConsumer::new(name).register(pool)
}

fn exhausted(r: datafusion::common::Result<()>) -> String {
    match r {
        Err(DataFusionError::ResourcesExhausted(m)) => m,
        other => panic!("expected ResourcesExhausted at the top level, got {other:?}"),
    }
}

#[test]
fn an_idle_registered_spiller_keeps_its_share_free() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let a = spiller(&d, "a");
    let idle = spiller(&d, "idle");
    // As in FairSpillPool, `a` gets half while `idle` is registered: lending it `idle`'s half
    // would leave `idle` depending on `a` calling the pool again to be told to spill.
    a.try_grow(kib(50)).unwrap();
    let m = exhausted(a.try_grow(kib(1)));
    assert!(
        m.contains("fair share is 50.0 KiB (2 registered spilling consumers"),
        "{m}"
    );
    // `a` goes quiet holding its share; `idle` still gets all of its own, at once.
    idle.try_grow(kib(50)).unwrap();
    assert_eq!(p.reserved(), kib(100));
    assert_eq!(p.stats().waits, 0);
    // A lone registered spiller gets the whole budget.
    drop((a, idle));
    let lone = spiller(&d, "lone");
    lone.try_grow(kib(100)).unwrap();
    assert_eq!(g.reserved(EngineId::Query), kib(100));
}

#[test]
fn a_spiller_left_above_a_shrunken_share_spills_for_an_entitled_one() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::from_secs(30));
    let a = Arc::new(spiller(&d, "a"));
    let b = Arc::new(spiller(&d, "b"));
    a.try_grow(kib(50)).unwrap();
    b.try_grow(kib(40)).unwrap();
    // A hash-join build side takes the rest: the spillers' share falls to 45 KiB, and `a`
    // is left 5 KiB above it.
    let build = unspillable(&d, "HashJoinInput[0]");
    build.try_grow(kib(10)).unwrap();
    // `b` is entitled to 5 KiB more; the governor has none. It waits, counted as starving,
    // so `a` is refused on its next request (its cue to spill)...
    let waiter = {
        let b = Arc::clone(&b);
        thread::spawn(move || b.try_grow(kib(5)))
    };
    while p.stats().waits == 0 {
        thread::yield_now();
    }
    let m = exhausted(a.try_grow(1));
    assert!(m.contains("fair share is 45.0 KiB"), "{m}");
    // ...and once it spills, the waiter is woken by the release and gets its bytes.
    a.free();
    waiter.join().unwrap().unwrap();
    assert_eq!(b.size(), kib(45));
    assert!(p.reserved() <= kib(100));
}

#[test]
fn a_spiller_the_share_fell_under_may_finish_a_small_adjustment() {
    // A final aggregate holds its table within its share; then the budget falls (its engine's
    // limit is lowered here, as the arena's drift or other engines' floors lower it in
    // production) and the share falls under it. Emitting its output it asks for a last small
    // resize and cannot spill: the grace grants it, once, within the governor's budget.
    let g = query_only(kib(512));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let table = spiller(&d, "FinalHashAggregateStream[1]");
    let other = spiller(&d, "FinalHashAggregateStream[0]");
    table.try_grow(kib(256)).unwrap();
    other.try_grow(kib(64)).unwrap();
    g.set_limit(EngineId::Query, kib(400)).unwrap();
    // Share 200 KiB, held 256: 3 KiB is within 1/32 of 256 KiB (8 KiB).
    table.try_grow(kib(3)).unwrap();
    assert_eq!(p.stats().grace_grants, 1);
    // The grace is spent in all, not per request: 3 + 6 > 8 KiB is the cue to spill.
    let m = exhausted(table.try_grow(kib(6)));
    assert!(m.contains("fair share is 200.0 KiB"), "{m}");
    // A request that crosses its share from within is never in grace (FairSpillPool's rule).
    let m = exhausted(other.try_grow(kib(137)));
    assert!(m.contains("fair share is 200.0 KiB"), "{m}");
    // Within its share again (it spilled), a later fall of the share starts a new grace.
    table.shrink(kib(259) - kib(150));
    table.try_grow(kib(10)).unwrap();
    g.set_limit(EngineId::Query, kib(300)).unwrap();
    // (A refusal reads the budget afresh; a grant may use a figure a few calls old.)
    exhausted(other.try_grow(kib(100)));
    table.try_grow(kib(4)).unwrap();
    assert_eq!(p.stats().grace_grants, 2);
    // The governor's hard limit is never passed in grace.
    assert!(g.reserved(EngineId::Query) <= kib(300));
}

#[test]
fn no_grace_when_turned_off_and_a_bad_grace_is_refused() {
    let g = query_only(kib(100));
    let strict = GovernedMemoryPool::builder(&g)
        .share_grace(0.0)
        .reclaim_wait(Duration::ZERO)
        .build()
        .unwrap();
    let d: Arc<dyn MemoryPool> = Arc::new(strict);
    let a = spiller(&d, "a");
    let b = spiller(&d, "b");
    a.try_grow(kib(50)).unwrap();
    b.try_grow(kib(10)).unwrap();
    g.set_limit(EngineId::Query, kib(80)).unwrap();
    let m = exhausted(a.try_grow(1));
    assert!(m.contains("fair share is 40.0 KiB"), "{m}");
    assert!(
        GovernedMemoryPool::builder(&g)
            .share_grace(0.5)
            .build()
            .is_err()
    );
}

#[test]
fn the_share_is_judged_per_reservation_like_fair_spill_pool() {
    let g = query_only(kib(100));
    let (_p, d) = pool(&g, 0.0, Duration::ZERO);
    let a = spiller(&d, "a");
    let b = spiller(&d, "b");
    b.try_grow(kib(30)).unwrap();
    a.try_grow(kib(40)).unwrap();
    // An aggregate replaying its spills holds a merge and a table under one registration:
    // each reservation is judged against the share on its own, as FairSpillPool does...
    let a2 = a.new_empty();
    a2.try_grow(kib(20)).unwrap();
    let m = exhausted(a2.try_grow(kib(31)));
    assert!(m.contains("fair share is 50.0 KiB"), "{m}");
    // ...and the governor's hard limit still holds for the consumer's total.
    let a3 = a.split(kib(10));
    let m = exhausted(a3.try_grow(kib(20)));
    assert!(m.contains("the governor refused"), "{m}");
    assert!(m.contains("with 60.0 KiB already allocated"), "{m}");
    drop((a, a2, a3));
    b.try_grow(kib(20)).unwrap();
}

#[test]
fn a_sorts_merge_reservation_is_kept_while_its_sort_spills() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let sort0 = spiller(&d, "ExternalSorter[0]");
    let merge0 = unspillable(&d, "ExternalSorterMerge[0]");
    let sort1 = spiller(&d, "ExternalSorter[1]");
    let _merge1 = unspillable(&d, "ExternalSorterMerge[1]");
    // The first batch reserves the merge's bytes, as DataFusion's sort does.
    merge0.try_grow(kib(20)).unwrap();
    sort0.try_grow(kib(30)).unwrap();
    // A sort that has not started is owed nothing yet: its own share covers it.
    assert_eq!(p.stats().kept, 0);
    // sort0 spills: it gives its merge bytes back for a moment. They stay kept: sort1's
    // share stays (100 - 20) / 2 = 40 KiB instead of growing into them.
    merge0.free();
    sort0.free();
    assert_eq!(p.stats().kept, kib(20));
    sort1.try_grow(kib(10)).unwrap();
    let m = exhausted(sort1.try_grow(kib(31)));
    assert!(m.contains("fair share is 40.0 KiB"), "{m}");
    sort1.try_grow(kib(30)).unwrap();
    // The spill ends and the merge takes its bytes again; a refusal here would fail the query.
    merge0.try_grow(kib(20)).unwrap();
    assert_eq!(p.stats().kept, 0);
    // When the sort is gone, nothing is kept for it.
    merge0.free();
    drop(merge0);
    assert_eq!(p.stats().kept, 0);
}

#[test]
fn a_reservation_holding_nothing_may_take_more_than_its_share_while_nobody_starves() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    // Ten registered operators, nine of them not started: the share is 10 KiB.
    let idle: Vec<_> = (0..9).map(|i| spiller(&d, &format!("idle{i}"))).collect();
    let agg = spiller(&d, "FinalHashAggregateStream[1]");
    // Its first hash table is larger than the share; refusing it would fail the query, as
    // FairSpillPool does, since it has nothing to spill.
    agg.try_grow(kib(15)).unwrap();
    // Holding something, it is back under the rule: its next request above the share is its
    // cue to spill.
    let m = exhausted(agg.try_grow(kib(1)));
    assert!(m.contains("fair share is 10.0 KiB (10 registered"), "{m}");
    // The other operators still get their shares.
    for r in &idle {
        r.try_grow(kib(9)).unwrap();
    }
    assert_eq!(p.reserved(), kib(96));
}

#[test]
fn a_growing_merge_leaves_room_for_the_merges_of_sorts_not_started() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let merge0 = unspillable(&d, "ExternalSorterMerge[0]");
    let merge1 = unspillable(&d, "ExternalSorterMerge[1]");
    let merge2 = unspillable(&d, "ExternalSorterMerge[2]");
    // The first sort reserves its merge bytes: 10 KiB, as every sort of the session will.
    merge0.try_grow(kib(10)).unwrap();
    // Merging its spill files, it takes what it can, but not the 20 KiB the two sorts that
    // have not started will reserve for their own merges.
    merge0.try_grow(kib(70)).unwrap();
    let m = exhausted(merge0.try_grow(kib(1)));
    assert!(
        m.contains("sort merge may grow past its first reservation"),
        "{m}"
    );
    assert_eq!(p.reserved(), kib(80));
    // The later sorts' first reservations fit.
    merge1.try_grow(kib(10)).unwrap();
    merge2.try_grow(kib(10)).unwrap();
}

#[test]
fn a_current_thread_runtime_is_never_blocked_waiting_for_its_own_tasks() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::from_secs(30));
    let sort = spiller(&d, "ExternalSorter[0]");
    sort.try_grow(kib(80)).unwrap();
    let build = unspillable(&d, "HashJoinInput[0]");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // The sort that must spill can only run on this runtime's one thread: blocking it would
    // wait out the bound for nothing, so the build side is refused at once.
    let result = rt.block_on(async { build.try_grow(kib(30)) });
    exhausted(result);
    assert_eq!(p.stats().waits, 0);
}

#[test]
fn headroom_is_kept_for_unspillable_consumers() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.25, Duration::ZERO);
    // With no unspillable consumer registered, there is nobody to keep headroom for.
    let agg = spiller(&d, "GroupedHashAggregateStream[0]");
    agg.try_grow(kib(100)).unwrap();
    drop(agg);

    // DataFusion registers operators when they start, before they ask for memory: once the
    // hash join is registered, a greedy sort may no longer take the last quarter.
    let build = unspillable(&d, "HashJoinInput[0]");
    let sort = spiller(&d, "ExternalSorter[0]");
    sort.try_grow(kib(50)).unwrap();
    exhausted(sort.try_grow(kib(26)));
    sort.try_grow(kib(25)).unwrap();
    // The late build side still finds its room.
    build.try_grow(kib(25)).unwrap();
    assert_eq!(p.stats().unspillable, kib(25));
    // Unspillable consumers may also use more than the headroom when it is free.
    drop(sort);
    build.try_grow(kib(70)).unwrap();
    // Spillers then share what the unspillable ones leave.
    let sort = spiller(&d, "ExternalSorter[1]");
    sort.try_grow(kib(5)).unwrap();
    exhausted(sort.try_grow(kib(1)));
}

#[test]
fn a_denied_unspillable_consumer_fails_with_names_after_a_bounded_wait() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::from_millis(50));
    let sort = spiller(&d, "ExternalSorter[0]");
    sort.try_grow(kib(80)).unwrap();
    let build = unspillable(&d, "HashJoinInput[1]");
    let started = std::time::Instant::now();
    let m = exhausted(build.try_grow(kib(30)));
    assert!(started.elapsed() < Duration::from_secs(5));
    for needle in [
        "HashJoinInput[1]",
        "ExternalSorter[0]",
        "can spill: false",
        "query 80.0 KiB",
    ] {
        assert!(m.contains(needle), "{needle:?} missing in {m}");
    }
    // Nobody else borrowed, so there was nothing to reclaim; the sort never spilled.
    assert_eq!(p.stats().reclaim_requests, 0);
    assert_eq!(p.stats().waits, 1);
    assert_eq!(p.reserved(), kib(80));
    assert_eq!(g.reserved(EngineId::Query), kib(80));
}

#[test]
fn a_consumer_that_waited_in_vain_is_refused_at_once_when_it_retries() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::from_millis(50));
    let sort = spiller(&d, "ExternalSorter[0]");
    sort.try_grow(kib(80)).unwrap();
    let build = unspillable(&d, "HashJoinInput[1]");
    exhausted(build.try_grow(kib(30)));
    assert_eq!((p.stats().waits, p.stats().waits_in_vain), (1, 1));
    // An operator retrying in a loop (as DataFusion's sorts and merges do) no longer waits
    // `reclaim_wait` per try: the retries are refused without a wait, with the same message.
    for _ in 0..10 {
        let m = exhausted(build.try_grow(kib(30)));
        assert!(
            m.contains("HashJoinInput[1]") && m.contains("limit 100.0 KiB"),
            "{m}"
        );
    }
    assert_eq!((p.stats().waits, p.stats().waits_in_vain), (1, 1));
    // What the governor can grant at once is still granted.
    drop(sort);
    build.try_grow(kib(30)).unwrap();
}

#[test]
fn spillers_are_squeezed_to_make_room_for_an_unspillable_consumer() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::from_secs(5));
    let sort = spiller(&d, "ExternalSorter[0]");
    sort.try_grow(kib(80)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // The sort keeps buffering in another thread and spills (frees everything) when denied,
    // as DataFusion's ExternalSorter does.
    let sorter = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut spills = 0;
            while !stop.load(Ordering::Relaxed) {
                if sort.try_grow(kib(1)).is_err() {
                    sort.free();
                    spills += 1;
                }
                thread::sleep(Duration::from_millis(1));
            }
            spills
        })
    };
    let build = unspillable(&d, "HashJoinInput[0]");
    build.try_grow(kib(60)).unwrap();
    stop.store(true, Ordering::Relaxed);
    let spills = sorter.join().unwrap();
    assert!(spills >= 1);
    assert_eq!(build.size(), kib(60));
    assert!(p.reserved() <= kib(100));
    drop(build);
    assert_eq!(p.reserved(), 0);
    assert_eq!(g.reserved(EngineId::Query), 0);
}

/// An engine that borrowed memory and gives it back when asked.
struct Lender(Mutex<Option<ReservationToken>>);

#[async_trait::async_trait]
impl Reclaimer for Lender {
    fn reclaimable(&self) -> usize {
        self.0.lock().as_ref().map_or(0, ReservationToken::size)
    }

    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        Ok(self.0.lock().take().map_or(0, |mut t| t.free()))
    }
}

#[test]
fn an_unspillable_consumer_gets_memory_reclaimed_from_a_borrowing_engine() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(kib(200))
            .engine(
                EngineId::Query,
                EngineBudget::new(kib(150)).with_floor(kib(50)),
            )
            .engine(
                EngineId::Vector,
                EngineBudget::new(kib(150)).with_floor(kib(50)),
            )
            .build()
            .unwrap(),
    )
    .unwrap();
    // Vector borrowed 70 KiB beyond its floor while Query was idle.
    let lender = Arc::new(Lender(Mutex::new(Some(
        g.try_reserve(EngineId::Vector, kib(120)).unwrap(),
    ))));
    let _handle = g.register_reclaimer(EngineId::Vector, Arc::clone(&lender) as _);
    let (p, d) = pool(&g, 0.0, Duration::from_secs(5));
    let build = unspillable(&d, "HashJoinInput");
    build.try_grow(kib(100)).unwrap();
    assert_eq!(g.reserved(EngineId::Vector), 0);
    assert_eq!(g.reserved(EngineId::Query), kib(100));
    assert_eq!(p.stats().reclaim_requests, 1);
    assert!(p.stats().reclaimed >= kib(70));
    assert!(g.global_reserved() <= g.ceiling());
}

#[test]
fn denials_name_the_engines_holding_the_ceiling() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(kib(100))
            .engine(EngineId::Query, EngineBudget::new(kib(100)))
            .engine(EngineId::Timeseries, EngineBudget::new(kib(100)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let _ts = g.try_reserve(EngineId::Timeseries, kib(70)).unwrap();
    let (_p, d) = pool(&g, 0.0, Duration::ZERO);
    let agg = spiller(&d, "GroupedHashAggregateStream[0]");
    let m = exhausted(agg.try_grow(kib(40)));
    assert!(m.contains("timeseries 70.0 KiB"), "{m}");
    assert!(m.contains("GroupedHashAggregateStream[0]"), "{m}");
}

#[test]
fn infallible_grow_is_booked_exactly_and_paid_back_first() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let r = unspillable(&d, "r");
    r.grow(kib(150));
    assert_eq!(r.size(), kib(150));
    assert_eq!(p.reserved(), kib(150));
    assert_eq!(
        g.reserved(EngineId::Query),
        kib(150),
        "the governor sees every byte"
    );
    assert_eq!(
        p.stats().overcommit,
        kib(50),
        "only what did not fit is overcommit"
    );
    exhausted(r.try_grow(1));
    r.shrink(kib(60));
    assert_eq!(p.stats().overcommit, 0);
    assert_eq!(p.stats().peak_overcommit, kib(50));
    assert_eq!(g.reserved(EngineId::Query), kib(90));
    drop(r);
    assert_eq!(g.reserved(EngineId::Query), 0);
}

#[test]
fn over_release_is_clamped_and_counted() {
    let g = query_only(kib(100));
    let (p, d) = pool(&g, 0.0, Duration::ZERO);
    let r = spiller(&d, "r");
    r.try_grow(kib(10)).unwrap();
    // A buggy caller tells the pool to release more than the consumer holds.
    d.shrink(&r, kib(25));
    assert_eq!(p.reserved(), 0);
    assert_eq!(g.reserved(EngineId::Query), 0);
    assert_eq!(p.stats().over_released, kib(15));
    // The reservation still believes it holds 10 KiB and frees it on drop: clamped again.
    drop(r);
    assert_eq!(p.reserved(), 0);
    assert_eq!(p.stats().over_released, kib(25));
    // The pool still works.
    let r = spiller(&d, "r2");
    r.try_grow(kib(100)).unwrap();
}

#[test]
fn memory_limit_follows_the_governor() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(kib(400))
            .engine(EngineId::Query, EngineBudget::new(kib(100)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let d = g.pool();
    assert!(matches!(d.memory_limit(), MemoryLimit::Finite(l) if l == kib(100)));
    assert_eq!(set_query_memory_limit(&g, "300K").unwrap(), kib(300));
    assert!(matches!(d.memory_limit(), MemoryLimit::Finite(l) if l == kib(300)));
    assert!(set_query_memory_limit(&g, "lots").is_err());
    assert!(
        set_query_memory_limit(&g, "1G").is_err(),
        "above the ceiling"
    );
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(d)
        .build()
        .unwrap();
    assert!(is_governed(&runtime));
}

#[test]
fn consumers_are_published_in_the_governor_snapshot() {
    let g = query_only(kib(100));
    let (_p, d) = pool(&g, 0.0, Duration::ZERO);
    let a = spiller(&d, "ExternalSorter[0]");
    let b = unspillable(&d, "HashJoinInput[0]");
    a.try_grow(kib(30)).unwrap();
    b.try_grow(kib(20)).unwrap();
    exhausted(a.try_grow(kib(90)));
    let snap = g.snapshot();
    let sorter = snap
        .consumers
        .iter()
        .find(|c| c.name == "ExternalSorter[0]")
        .unwrap();
    assert_eq!(
        (
            sorter.engine,
            sorter.reserved,
            sorter.denials,
            sorter.pinned
        ),
        (EngineId::Query, kib(30), 1, 0)
    );
    let build = snap
        .consumers
        .iter()
        .find(|c| c.name == "HashJoinInput[0]")
        .unwrap();
    assert_eq!((build.reserved, build.pinned), (kib(20), kib(20)));
    assert!(snap.to_prometheus().contains("ExternalSorter[0]"));
    // After the query the peak and denials stay visible under the same name.
    drop((a, b));
    let snap = g.snapshot();
    let sorter = snap
        .consumers
        .iter()
        .find(|c| c.name == "ExternalSorter[0]")
        .unwrap();
    assert_eq!(
        (sorter.reserved, sorter.peak, sorter.denials),
        (0, kib(30), 1)
    );
}

#[test]
fn a_governor_without_a_query_engine_gets_a_clear_error_not_a_panic() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(kib(100))
            .engine(EngineId::Vector, EngineBudget::new(kib(100)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let d = g.pool();
    let r = spiller(&d, "a");
    let m = exhausted(r.try_grow(1));
    assert!(m.contains("no budget for the query engine"), "{m}");
    r.grow(kib(1));
    assert_eq!(d.reserved(), kib(1));
    drop(r);
    assert_eq!(d.reserved(), 0);
}

#[test]
fn builder_rejects_bad_knobs_by_name() {
    let g = query_only(kib(100));
    for (bad, field) in [
        (
            GovernedMemoryPool::builder(&g).unspillable_headroom(-0.1),
            "unspillable_headroom",
        ),
        (
            GovernedMemoryPool::builder(&g).unspillable_headroom(f64::NAN),
            "unspillable_headroom",
        ),
        (
            GovernedMemoryPool::builder(&g).reclaim_wait(Duration::from_mins(1)),
            "reclaim_wait",
        ),
        (
            GovernedMemoryPool::builder(&g).top_consumers(0),
            "top_consumers",
        ),
    ] {
        let e = bad.build().unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
}

#[test]
fn concurrent_consumers_never_exceed_the_limit() {
    let g = query_only(kib(256));
    let (p, d) = pool(&g, 0.1, Duration::from_millis(1));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let d = Arc::clone(&d);
            let g = Arc::clone(&g);
            thread::spawn(move || {
                let r = MemoryConsumer::new(format!("c{i}"))
                    .with_can_spill(i % 2 == 0)
                    .register(&d);
                for n in 0..2000 {
                    let bytes = 512 + (n * 97 + i * 31) % 4096;
                    if r.try_grow(bytes).is_err() {
                        r.free();
                    }
                    assert!(g.reserved(EngineId::Query) <= kib(256));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.reserved(), 0);
    assert_eq!(g.reserved(EngineId::Query), 0);
    assert_eq!(p.stats().over_released, 0);
}

/// The per-thread consumer cache: consumers of two pools used alternately on one thread keep
/// exact books, an unregistered consumer's cached entry holds nothing, and a shrink of a
/// consumer the pool never saw is absorbed, not booked.
#[test]
fn thread_consumer_cache_keeps_each_pools_books_exact() {
    let g = query_only(kib(1024));
    let (p1, d1) = pool(&g, 0.0, Duration::from_millis(10));
    let (p2, d2) = pool(&g, 0.0, Duration::from_millis(10));
    let a = spiller(&d1, "a");
    let b = spiller(&d2, "b");
    let c = spiller(&d1, "c");
    for round in 1..=3 {
        a.try_grow(kib(10)).unwrap();
        b.try_grow(kib(20)).unwrap();
        c.try_grow(kib(30)).unwrap();
        assert_eq!(p1.stats().reserved, round * kib(40));
        assert_eq!(p2.stats().reserved, round * kib(20));
    }
    a.shrink(kib(5));
    b.shrink(kib(5));
    assert_eq!(a.size(), kib(25));
    assert_eq!(p1.stats().reserved, kib(115));
    assert_eq!(p2.stats().reserved, kib(55));
    assert_eq!(g.reserved(EngineId::Query), kib(170));
    // `c` was the last consumer this thread used; once it unregisters, neither its bytes nor
    // its governor token stay behind in the cache.
    drop((a, b));
    c.try_grow(kib(1)).unwrap();
    drop(c);
    assert_eq!(g.reserved(EngineId::Query), 0);
    assert_eq!(p1.stats().consumers, 0);
    assert_eq!(p1.stats().reserved, 0);
    // A shrink for a consumer the pool does not know is counted as over-released.
    let stranger = MemoryConsumer::new("stranger").register(&d2);
    d1.shrink(&stranger, kib(1));
    assert_eq!(p1.stats().over_released, kib(1));
    assert_eq!(p1.stats().reserved, 0);
}
