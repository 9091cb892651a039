//! The ladder (issue 18): an engine entitled to its lent floor gets it back by aborting a
//! registered unit of work when reclaim cannot give the memory back; requests that are not
//! entitled never abort anything; every failure carries its story.
//!
//! Every wait here is on a condition, with a generous deadline after which the test fails
//! instead of hanging; no assertion depends on how fast anything ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReclaimError, Reclaimer,
    UnitToken, WorkSpec, mib,
};
use parking_lot::{Condvar, Mutex};

mod common;

use common::Spiller;

/// Long enough that only a wedged governor can miss it, on any machine.
const DEADLINE: Duration = Duration::from_mins(1);

/// The timeout of a request that is meant to fail: the window in which its first reclaim
/// plan answers and the ladder reaches its abort step, generous for a loaded machine (the
/// tests assert what the failure reports, so it must have got that far).
const GIVE_UP: Duration = Duration::from_secs(2);

/// Ceiling 64 MiB; Timeseries owns a 48 MiB floor; Query may borrow it (limit 64 MiB).
fn governor(abort_after: Duration) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .reclaim_timeout(Duration::from_millis(200))
            .abort_after(abort_after)
            .engine(
                EngineId::Timeseries,
                EngineBudget::new(mib(48)).with_floor(mib(48)),
            )
            .engine(EngineId::Query, EngineBudget::new(mib(64)))
            .engine(EngineId::Vector, EngineBudget::new(mib(64)))
            .build()
            .expect("valid config"),
    )
    .expect("governor")
}

/// A reclaimer of a borrower that cannot reach its memory (an operator gone quiet): it answers
/// at once and frees nothing.
struct Quiet {
    calls: AtomicUsize,
}

#[async_trait]
impl Reclaimer for Quiet {
    fn reclaimable(&self) -> usize {
        0
    }

    async fn reclaim(&self, _target: usize) -> Result<usize, ReclaimError> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        Ok(0)
    }
}

/// A quiet query: registered, holding `bytes`, dropping them only from its abort callback.
fn quiet_query(
    g: &Arc<MemoryGovernor>,
    label: &str,
    bytes: usize,
) -> (governor_core::WorkHandle, Arc<Mutex<Vec<UnitToken>>>) {
    let held: Arc<Mutex<Vec<UnitToken>>> = Arc::default();
    let on_abort = Arc::clone(&held);
    let work = g.register_work(
        WorkSpec::new(EngineId::Query, label).on_abort(move |_| on_abort.lock().clear()),
    );
    held.lock()
        .push(work.try_reserve(bytes).expect("room to borrow"));
    (work, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entitled_request_aborts_a_quiet_borrower_and_gets_its_floor() {
    let g = governor(Duration::from_millis(50));
    let _quiet = g.register_reclaimer(
        EngineId::Query,
        Arc::new(Quiet {
            calls: AtomicUsize::new(0),
        }),
    );
    let (sort, _held) = quiet_query(&g, "sort gone quiet", mib(56));
    assert_eq!(g.borrowed(EngineId::Query), mib(56));

    let ingest = g
        .reserve(EngineId::Timeseries, mib(48), DEADLINE)
        .await
        .expect("the floor came back");
    assert_eq!(ingest.size(), mib(48));
    assert_eq!(g.reserved(EngineId::Query), 0);

    let err = sort.abort_error().expect("the sort was aborted");
    let MemError::Aborted {
        victim,
        requester,
        story,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(victim, sort.work_ref());
    assert_eq!(*requester, Some(EngineId::Timeseries));
    let story = story.as_ref().expect("a ladder abort tells its story");
    assert!(story.entitled);
    assert!(story.victim.as_ref().expect("the choice").frees_enough());
    let text = err.to_string();
    assert!(text.contains("query unit 'sort gone quiet'"), "{text}");
    assert!(
        text.contains("to give the timeseries engine its floor back"),
        "{text}"
    );
    assert!(text.contains("frees enough alone"), "{text}");
    assert!(
        text.contains("borrowed: query 56.0 MiB above its floor"),
        "{text}"
    );
    assert!(text.contains("reclaims tried: query asked for"), "{text}");
    // Later reservations of the unit fail with the same error.
    assert_eq!(sort.try_reserve(1).unwrap_err(), err);
    assert_eq!(sort.aborted().await, err);

    let snapshot = g.snapshot();
    assert_eq!(snapshot.engine(EngineId::Query).unwrap().aborts, 1);
    assert_eq!(
        snapshot.engine(EngineId::Timeseries).unwrap().aborts_caused,
        1
    );
    let text = snapshot.to_prometheus();
    assert!(
        text.contains(r#"memgov_engine_aborts_total{engine="query"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"memgov_engine_reclaim_outcomes_total{engine="query",outcome="nothing"}"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_abort_handle_the_ingest_fails_with_the_lending_and_reclaims() {
    let g = governor(Duration::from_millis(50));
    let quiet = Arc::new(Quiet {
        calls: AtomicUsize::new(0),
    });
    let _reclaimer = g.register_reclaimer(EngineId::Query, Arc::clone(&quiet) as _);
    let _sort = g
        .try_reserve(EngineId::Query, mib(56))
        .expect("room to borrow");

    let err = g
        .reserve(EngineId::Timeseries, mib(48), GIVE_UP)
        .await
        .unwrap_err();
    let MemError::Timeout { story, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(story.entitled);
    assert!(story.victim.is_none());
    assert!(
        !story.reclaims.is_empty(),
        "the reclaim attempts are listed"
    );
    assert!(quiet.calls.load(Ordering::Acquire) > 0);
    let text = err.to_string();
    assert!(
        text.contains("timeseries holds 0 B of its 48.0 MiB floor"),
        "{text}"
    );
    assert!(text.contains("entitled to its floor"), "{text}");
    assert!(
        text.contains("borrowed: query 56.0 MiB above its floor (has a reclaimer, 0 abortable units) from the idle floors of timeseries 48.0 MiB"),
        "{text}"
    );
    assert!(text.contains("query asked for"), "{text}");
    assert!(text.contains("freed 0 B"), "{text}");
    assert!(text.contains("no unit of work is registered"), "{text}");
    assert_eq!(g.reserved(EngineId::Query), mib(56), "nothing was taken");
    assert_eq!(g.snapshot().engine(EngineId::Query).unwrap().aborts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_abort_when_reclaim_alone_suffices() {
    // The abort step is far away; an honest spiller gives the floor back long before.
    let g = governor(Duration::from_secs(30));
    let work = g.register_work(WorkSpec::new(EngineId::Query, "spilling sort"));
    let token = g.try_reserve(EngineId::Query, mib(56)).unwrap();
    work.note_grown(token.size());
    let spiller = Spiller::new(vec![token]);
    let _reclaimer = g.register_reclaimer(EngineId::Query, Arc::clone(&spiller) as _);
    let ingest = g
        .reserve(EngineId::Timeseries, mib(48), DEADLINE)
        .await
        .expect("reclaim gave the floor back");
    assert_eq!(ingest.size(), mib(48));
    assert!(work.abort_error().is_none());
    assert_eq!(g.snapshot().engine(EngineId::Query).unwrap().aborts, 0);
    // The waiter may wake on the spiller's release before the plan records the call.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !g
        .recent_reclaims()
        .iter()
        .any(|r| r.engine == EngineId::Query && r.result == Ok(mib(56)))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the call was never recorded"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_floor_never_aborts() {
    let g = governor(Duration::ZERO);
    let _ts = g.try_reserve(EngineId::Timeseries, mib(8)).unwrap();
    let (sort, _held) = quiet_query(&g, "big sort", mib(56));
    // Timeseries holds 8 of its 48 MiB floor; the ceiling is full. A request within its floor
    // would abort the sort; Vector has no floor, so its request is never entitled.
    let err = g
        .reserve(EngineId::Vector, mib(8), Duration::from_millis(200))
        .await
        .unwrap_err();
    let MemError::Timeout { story, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(!story.entitled);
    assert!(err.to_string().contains("not entitled"), "{err}");
    assert!(
        sort.abort_error().is_none(),
        "no abort for a request past its floor"
    );
    assert_eq!(g.snapshot().engine(EngineId::Query).unwrap().aborts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrebuildable_work_and_the_requesters_own_work_are_never_victims() {
    let g = governor(Duration::ZERO);
    let crdt_like = g.register_work(WorkSpec::new(EngineId::Query, "documents").unrebuildable());
    let _doc = crdt_like.try_reserve(mib(56)).unwrap();
    let err = g
        .reserve(EngineId::Timeseries, mib(48), GIVE_UP)
        .await
        .unwrap_err();
    assert!(crdt_like.abort_error().is_none());
    assert!(err.to_string().contains("cannot be rebuilt"), "{err}");

    // The requester's own unit is not a victim for it either.
    let ingest = g.register_work(WorkSpec::new(EngineId::Timeseries, "ingest"));
    let err = ingest.reserve(mib(48), GIVE_UP).await.unwrap_err();
    assert!(matches!(err, MemError::Timeout { .. }), "{err:?}");
    assert!(ingest.abort_error().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_waiting_for_memory_fails_as_soon_as_it_is_aborted() {
    let g = governor(Duration::from_secs(30));
    let _hog = g.try_reserve(EngineId::Query, mib(64)).unwrap();
    let work = Arc::new(g.register_work(WorkSpec::new(EngineId::Vector, "index build")));
    let waiter = {
        let work = Arc::clone(&work);
        tokio::spawn(async move { work.reserve(mib(8), DEADLINE).await })
    };
    // Cancel it once it waits.
    let deadline = std::time::Instant::now() + DEADLINE;
    while g.snapshot().engine(EngineId::Vector).unwrap().waiting_bytes == 0 {
        assert!(std::time::Instant::now() < deadline, "never waited");
        tokio::task::yield_now().await;
    }
    assert!(work.abort("cancelled by the user"));
    assert!(!work.abort("twice"), "the first reason stands");
    let err = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the waiter returned")
        .expect("no panic")
        .unwrap_err();
    let MemError::Aborted {
        requester, reason, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*requester, None);
    assert_eq!(&**reason, "cancelled by the user");
    assert_eq!(g.reserved(EngineId::Vector), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_or_panicking_abort_callback_cannot_wedge_the_ladder() {
    let g = governor(Duration::from_millis(20));
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let blocker = {
        let gate = Arc::clone(&gate);
        g.register_work(WorkSpec::new(EngineId::Query, "blocks").on_abort(move |_| {
            let mut open = gate.0.lock();
            while !*open {
                gate.1.wait(&mut open);
            }
        }))
    };
    let _b = blocker.try_reserve(mib(40)).unwrap();
    let panicker = g.register_work(
        WorkSpec::new(EngineId::Query, "panics").on_abort(|_| panic!("callback panics")),
    );
    let _p = panicker.try_reserve(mib(16)).unwrap();
    // Neither callback frees anything; the request aborts what it can and times out with a
    // story that says so.
    let err = tokio::time::timeout(DEADLINE, g.reserve(EngineId::Timeseries, mib(48), GIVE_UP))
        .await
        .expect("the ladder returned")
        .unwrap_err();
    assert!(blocker.abort_error().is_some() || panicker.abort_error().is_some());
    assert!(
        err.to_string()
            .contains("its memory did not come back in time"),
        "{err}"
    );
    *gate.0.lock() = true;
    gate.1.notify_all();
}

#[test]
fn a_callback_that_owns_the_units_tokens_is_dropped_with_the_handle() {
    let g = governor(Duration::from_secs(30));
    let (work, held) = quiet_query(&g, "finished normally", mib(8));
    drop(held);
    assert_eq!(g.reserved(EngineId::Query), mib(8));
    // The callback owns the tokens and the tokens keep the unit alive: unregistering must
    // break that cycle, or the memory would stay booked forever.
    drop(work);
    assert_eq!(g.reserved(EngineId::Query), 0);
}
