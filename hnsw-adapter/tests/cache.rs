//! The cache under a tight Vector budget: same answers as fully resident, never over the
//! limit, reclaim and pressure evict cold segments and keep the pinned ones.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{brute_force, governor, ids, params, populate, seg, vectors};
use governor_core::{EngineId, MemoryGovernor, PressureLevel, mib};
use hnsw_adapter::HnswCache;

/// Samples the Vector engine's reserved and granted bytes until dropped; reports the max.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Sampler {
    fn start(gov: Arc<MemoryGovernor>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let handle = std::thread::spawn(move || {
            let mut samples = 0u64;
            while !s.load(Ordering::Relaxed) {
                let now = gov
                    .reserved(EngineId::Vector)
                    .max(gov.granted(EngineId::Vector));
                m.fetch_max(now, Ordering::Relaxed);
                samples += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            samples
        });
        Self {
            stop,
            max,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (usize, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.handle.take().unwrap().join().unwrap();
        (self.max.load(Ordering::Relaxed), samples)
    }
}

const SEGMENTS: usize = 12;
const PER: usize = 1_500;

#[test]
fn forty_percent_budget_gives_full_answers_within_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Build and persist everything with room to spare, then measure the whole index.
    let data = {
        let gov = governor(mib(512), mib(1024));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(PER))
            .build()
            .unwrap();
        populate(&cache, SEGMENTS, PER)
    };
    let full_gov = governor(mib(512), mib(1024));
    let full = HnswCache::builder(full_gov.clone(), dir.path())
        .build()
        .unwrap();
    assert_eq!(
        full.segments().len(),
        SEGMENTS,
        "segments found again on disk"
    );
    let queries = vectors(60, 4242);
    let expected = full.search_all_batch(&queries, 10, 64).unwrap();
    let total = full.stats().resident_bytes;
    assert_eq!(full.stats().resident_segments, SEGMENTS);

    let limit = total * 40 / 100;
    let gov = governor(limit, mib(1024));
    let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
    cache.pin(&seg(3)).unwrap();
    let sampler = Sampler::start(gov.clone());

    // A stream of single searches, each over all segments...
    for (q, want) in queries.iter().zip(&expected).take(15) {
        let got = cache.search_all(q, 10, 64).unwrap();
        assert_eq!(ids(&got), ids(want));
    }
    // ... and batches, which load each cold segment once per batch.
    for chunk in 0..3 {
        let qs = &queries[chunk * 20..(chunk + 1) * 20];
        let got = cache.search_all_batch(qs, 10, 64).unwrap();
        for (g, w) in got.iter().zip(&expected[chunk * 20..]) {
            assert_eq!(ids(g), ids(w));
        }
    }
    let (max_seen, samples) = sampler.finish();
    let stats = cache.stats();
    println!(
        "index {total} B, Vector limit {limit} B, max reserved seen {max_seen} B over {samples} samples; \
         {} loads, {} evictions",
        stats.loads, stats.evictions
    );
    assert!(samples > 10);
    assert!(
        max_seen <= limit,
        "Vector reserved {max_seen} B over its {limit} B limit"
    );
    assert!(
        stats.loads > SEGMENTS as u64,
        "a 40% budget must reload segments"
    );
    assert!(stats.evictions > 0);
    assert!(cache.is_resident(&seg(3)), "the pinned segment stayed");
    assert!(stats.peak_resident_bytes <= limit);

    // Recall@10 against brute force over all vectors.
    let mut found = 0;
    for (q, got) in queries.iter().zip(&expected) {
        let truth = brute_force(&data, q, 10);
        found += ids(got).iter().filter(|id| truth.contains(id)).count();
    }
    let recall = found as f64 / (10 * queries.len()) as f64;
    println!("recall@10 = {recall:.3}");
    assert!(recall >= 0.95, "recall@10 {recall}");

    // Pinned bytes reach the governor's snapshot.
    let snap = gov.snapshot();
    let me = snap
        .consumers
        .iter()
        .find(|c| c.name == "hnsw-cache")
        .expect("cache in snapshot");
    assert_eq!(me.engine, EngineId::Vector);
    assert!(me.pinned > 0 && me.pinned <= me.reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governor_reclaim_frees_what_it_asks_and_keeps_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(mib(256), mib(512));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .params(params(800))
        .build()
        .unwrap();
    populate(&cache, 8, 800);
    cache.pin(&seg(0)).unwrap();
    cache.pin(&seg(1)).unwrap();
    let before = gov.reserved(EngineId::Vector);
    let per_segment = before / 8;
    let n = 3 * per_segment;

    let t = Instant::now();
    let outcome = gov.reclaim_for(EngineId::Query, n).await;
    let latency = t.elapsed();
    let after = gov.reserved(EngineId::Vector);
    println!(
        "reclaim of {n} B freed {} B in {latency:?} (governor round trip)",
        outcome.freed
    );
    assert!(outcome.freed >= n, "asked {n}, freed {}", outcome.freed);
    assert_eq!(before - after, outcome.freed, "freed bytes left the books");
    assert!(cache.is_resident(&seg(0)) && cache.is_resident(&seg(1)));

    // Asking for everything frees every unpinned segment, and only those.
    let outcome = gov.reclaim_for(EngineId::Query, usize::MAX / 2).await;
    assert!(outcome.freed > 0);
    let stats = cache.stats();
    assert_eq!(stats.resident_segments, 2, "only the pinned remain");
    assert_eq!(stats.resident_bytes, stats.pinned_bytes);
    assert_eq!(gov.reserved(EngineId::Vector), stats.pinned_bytes);
    assert!(cache.is_resident(&seg(0)) && cache.is_resident(&seg(1)));
    assert!(stats.reclaims >= 2 && stats.reclaim_max_latency > Duration::ZERO);

    // Evicted segments still answer (they reload).
    let q = vectors(1, 9).pop().unwrap();
    assert!(!cache.search(&seg(5), &q, 5, 32).unwrap().is_empty());
}

/// Waits for `cond` with a deadline generous enough for a loaded 2-core machine; the
/// deadline only turns a hang into a failure, it bounds nothing the test measures.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reserves Timeseries bytes so the global figure lands on `target`.
fn drive_global_to(gov: &Arc<MemoryGovernor>, target: usize) -> governor_core::ReservationToken {
    let now = gov.snapshot().global_granted;
    gov.try_reserve(EngineId::Timeseries, target - now).unwrap()
}

fn unpinned(cache: &HnswCache) -> usize {
    let s = cache.stats();
    s.resident_bytes - s.pinned_bytes
}

/// The pressure watcher against the policy: Critical sheds three quarters of the cold bytes
/// and no pinned ones; an Emergency that evicting the cold segments ends takes every cold
/// segment and no pinned one; an Emergency that outlasts them takes pinned segments one at
/// a time, only while it lasts.
///
/// Each step waits for the state the policy guarantees, not for a count of evictions: the
/// watcher sheds in the background, and on a loaded machine it may be preempted between two
/// evictions of one shed (an earlier version checked right after the Emergency ended, with
/// the shed's last evictions still to come, and saw 3 segments instead of 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_pressure_sheds_cold_segments_and_pinned_go_last() {
    let dir = tempfile::tempdir().unwrap();
    let ceiling = mib(64);
    let gov = governor(mib(32), ceiling);
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .params(params(600))
        .build()
        .unwrap();
    populate(&cache, 8, 600);
    cache.pin(&seg(0)).unwrap();
    cache.pin(&seg(1)).unwrap();
    let _watcher = cache.spawn_pressure_watcher().unwrap();
    let pinned = cache.pinned_bytes();
    let vector = gov.reserved(EngineId::Vector);
    assert!(
        vector < ceiling * 3 / 10,
        "fixture: the cache must leave room for Timeseries"
    );

    // Another engine drives global pressure to Critical (85..95 %): the watcher sheds at
    // least 75 % of the cold bytes (whole segments), so at most a quarter stays.
    let ts = drive_global_to(&gov, ceiling * 88 / 100);
    let peak = gov.snapshot().global_peak;
    assert!(
        peak >= ceiling * 85 / 100 && peak < ceiling * 95 / 100,
        "Critical, not beyond"
    );
    let cold = vector - pinned;
    let cold_left = cold - cold / 100 * 75;
    wait_for("critical shedding", || unpinned(&cache) <= cold_left).await;
    let s = cache.stats();
    println!("after critical: {s:?}");
    assert!(
        cache.is_resident(&seg(0)) && cache.is_resident(&seg(1)),
        "pinned survive Critical"
    );
    assert_eq!(s.pinned_bytes, pinned);

    // An Emergency we are part of: every cold segment goes first, and that ends it (the
    // excess is half of the cold bytes, so it ends even if a late Warning shed of the
    // step before takes one of them first).
    drop(ts);
    let q = vectors(1, 5).pop().unwrap();
    for i in 2..6 {
        cache.search(&seg(i), &q, 5, 32).unwrap();
    }
    let cold = unpinned(&cache);
    let ts = drive_global_to(&gov, ceiling * 95 / 100 + cold / 2);
    // The watcher may already have answered; the high-water mark proves we got there.
    assert!(gov.snapshot().global_peak >= ceiling * 95 / 100);
    wait_for("every cold segment evicted", || {
        cache.stats().resident_segments <= 2
    })
    .await;
    wait_for("emergency over", || {
        gov.global_pressure() < PressureLevel::Emergency
    })
    .await;
    let s = cache.stats();
    assert_eq!(
        s.resident_segments, 2,
        "every cold segment went, no pinned one: {s:?}"
    );
    assert!(
        cache.is_resident(&seg(0)) && cache.is_resident(&seg(1)),
        "pinned outlive cold"
    );

    // An Emergency that outlasts the cold segments: pinned go one at a time, only while
    // it lasts (one pinned segment is enough to end this one).
    drop(ts);
    let one = pinned / 2;
    let _ts = drive_global_to(&gov, ceiling * 95 / 100 + one / 2);
    // The watcher may already have answered; the high-water mark proves we got there.
    assert!(gov.snapshot().global_peak >= ceiling * 95 / 100);
    wait_for("a pinned segment evicted", || {
        cache.stats().resident_segments <= 1
    })
    .await;
    wait_for("emergency over", || {
        gov.global_pressure() < PressureLevel::Emergency
    })
    .await;
    // Below Emergency nothing may take the last pinned segment: what the watcher runs on
    // every later change, and a governor reclaim, both leave it.
    let global = gov.global_pressure();
    assert_eq!(
        cache.shed_for_pressure(global, gov.engine_pressure(EngineId::Vector)),
        0
    );
    assert_eq!(cache.reclaim(usize::MAX), 0);
    assert_eq!(
        cache.stats().resident_segments,
        1,
        "the other pinned segment stays"
    );
}

#[test]
fn concurrent_searches_and_inserts_stay_within_limit() {
    let dir = tempfile::tempdir().unwrap();
    {
        let gov = governor(mib(512), mib(1024));
        let cache = HnswCache::builder(gov, dir.path())
            .params(params(800))
            .build()
            .unwrap();
        populate(&cache, 8, 800);
    }
    let total = {
        let gov = governor(mib(512), mib(1024));
        let cache = HnswCache::builder(gov, dir.path()).build().unwrap();
        cache.search_all(&vectors(1, 1)[0], 1, 16).unwrap();
        cache.stats().resident_bytes
    };
    let limit = total / 2;
    let gov = governor(limit, mib(1024));
    let cache = Arc::new(HnswCache::builder(gov.clone(), dir.path()).build().unwrap());
    let sampler = Sampler::start(gov.clone());
    let fresh = hnsw_adapter::SegmentId::new("fresh", 0).unwrap();
    cache.create_segment(&fresh).unwrap();
    std::thread::scope(|s| {
        for t in 0..3 {
            let cache = &cache;
            s.spawn(move || {
                for q in vectors(8, 500 + t) {
                    match cache.search_all(&q, 10, 32) {
                        Ok(hits) => assert_eq!(hits.len(), 10),
                        // Three loaders at once can each hold a load's peak: a refusal for
                        // room is allowed, anything else is a bug.
                        Err(e) => assert!(e.is_backpressure(), "{e}"),
                    }
                }
            });
        }
        let cache = &cache;
        let fresh = &fresh;
        s.spawn(move || {
            for (i, v) in vectors(400, 77).iter().enumerate() {
                match cache.insert(fresh, i, v) {
                    Ok(()) => {}
                    Err(e) => assert!(e.is_backpressure(), "{e}"),
                }
            }
        });
    });
    let (max_seen, _) = sampler.finish();
    println!(
        "concurrent: limit {limit} B, max seen {max_seen} B, {:?}",
        cache.stats()
    );
    assert!(max_seen <= limit);
    assert!(
        !cache
            .search(&fresh, &vectors(400, 77)[0], 1, 16)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn pressure_policy_sheds_in_proportion_and_keeps_headroom() {
    let dir = tempfile::tempdir().unwrap();
    let gov = governor(mib(64), mib(256));
    let cache = HnswCache::builder(gov.clone(), dir.path())
        .params(params(400))
        .build()
        .unwrap();
    populate(&cache, 8, 400);
    cache.pin(&seg(0)).unwrap();
    let s = cache.stats();
    let unpinned = s.resident_bytes - s.pinned_bytes;

    // Warning: about a quarter of the cold bytes (whole segments, so at least that much).
    let freed = cache.shed_for_pressure(PressureLevel::Warning, PressureLevel::Normal);
    assert!(
        freed >= unpinned / 4 && freed < unpinned / 2,
        "warning shed {freed} of {unpinned}"
    );
    assert!(cache.is_resident(&seg(0)));
    // Normal: nothing.
    assert_eq!(
        cache.shed_for_pressure(PressureLevel::Normal, PressureLevel::Normal),
        0
    );
    // Critical: three quarters of what is left, pinned untouched.
    let s = cache.stats();
    let left = s.resident_bytes - s.pinned_bytes;
    let freed = cache.shed_for_pressure(PressureLevel::Critical, PressureLevel::Normal);
    assert!(freed >= left * 3 / 4, "critical shed {freed} of {left}");
    assert!(cache.is_resident(&seg(0)));

    // The Vector engine itself near its limit (the cache plus another Vector consumer):
    // shed cold segments until 10 % of the limit is free again.
    let limit = mib(16);
    let gov = governor(limit, mib(256));
    let cache = HnswCache::builder(gov.clone(), dir.path()).build().unwrap();
    for i in 0..8 {
        cache.search(&seg(i), &vectors(1, 2)[0], 1, 8).unwrap();
    }
    let cached = gov.reserved(EngineId::Vector);
    assert!(
        cached < limit * 8 / 10,
        "fixture: the cache alone is not near the limit"
    );
    let _other = gov
        .try_reserve(EngineId::Vector, limit * 96 / 100 - cached)
        .unwrap();
    let freed = cache.shed_for_pressure(PressureLevel::Normal, PressureLevel::Emergency);
    assert!(freed > 0);
    assert!(gov.reserved(EngineId::Vector) <= limit * 9 / 10);
    assert!(
        cache.stats().resident_segments > 0,
        "only what the headroom needs was shed"
    );
}
