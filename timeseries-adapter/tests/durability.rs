//! No data loss: failing flushes keep data in memory and are retried, throttled ingest says
//! exactly what it did not store, corrupt segments are reported and never used, and the
//! governor's reclaim flushes.

mod common;

use std::fs;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{FlakyFlusher, assert_bit_eq, governor, series_points};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, PressureLevel, mib};
use timeseries_adapter::{
    FileSegmentFlusher, IngestError, Point, QueryError, SegmentError, SeriesId, TimeseriesAdapter,
};

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_throttles_ingest_without_losing_a_point_then_recovers() {
    let limit = 256 * 1024;
    let gov = governor(limit);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(FlakyFlusher::new(
        FileSegmentFlusher::new(dir.path()).unwrap(),
        0,
        1,
    ));
    flaky.always_fail.store(true, Ordering::Relaxed);
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(flaky.clone())
        .reservation_chunk(8 * 1024)
        .ingest_wait(Duration::from_millis(200))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
        .open()
        .await
        .unwrap();

    // Random-bit values compress badly, so the budget fills quickly.
    let data = series_points(3, 200_000);
    let err = ts.append(SeriesId(3), &data).await.unwrap_err();
    let IngestError::Throttled {
        accepted,
        pressure,
        waited,
        ..
    } = &err
    else {
        panic!("expected Throttled, got {err}");
    };
    let accepted = *accepted;
    assert!(accepted > 0 && accepted < data.len(), "{err}");
    assert!(
        *waited >= Duration::from_millis(200),
        "bounded wait happened: {err}"
    );
    assert!(*pressure >= PressureLevel::Critical, "{err}");
    assert!(err.to_string().contains("NOT stored"), "{err}");
    assert!(gov.reserved(EngineId::Timeseries) <= limit);

    // The failed flushes were counted and retried, and the data is still all there.
    wait_until("retries", Duration::from_mins(1), || {
        ts.stats().flush_failures >= 3
    })
    .await;
    assert_eq!(ts.stats().flushes, 0);
    assert!(ts.stats().throttled >= 1);
    let got = ts.query(SeriesId(3), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(3), &got, &data[..accepted]);
    // The frozen batch is reported as pinned in the governor's snapshot.
    let snap = gov.snapshot();
    let me = snap
        .consumers
        .iter()
        .find(|c| c.name == "timeseries-memtable")
        .expect("adapter publishes consumer stats");
    assert!(me.pinned > 0 && me.denials >= 1, "{me:?}");

    // The disk recovers: the worker's retry succeeds on its own, and the rest goes in.
    flaky.always_fail.store(false, Ordering::Relaxed);
    wait_until("a retried flush", Duration::from_mins(1), || {
        ts.stats().flushes >= 1
    })
    .await;
    let mut rest = &data[accepted..];
    loop {
        match ts.append(SeriesId(3), rest).await {
            Ok(()) => break,
            Err(e @ IngestError::Throttled { .. }) => rest = &rest[e.accepted()..],
            Err(e) => panic!("{e}"),
        }
    }
    let got = ts.query(SeriesId(3), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(3), &got, &data);
    // No temp file of a failed flush is ever listed as a segment.
    assert!(
        ts.segments()
            .iter()
            .all(|m| m.path.extension().unwrap() == "seg")
    );
}

#[tokio::test]
async fn out_of_order_points_are_refused_with_the_stored_prefix() {
    let gov = governor(mib(4));
    let dir = tempfile::tempdir().unwrap();
    let ts = TimeseriesAdapter::builder(gov)
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .open()
        .await
        .unwrap();
    let pts = [
        Point::new(10, 1.0),
        Point::new(20, 2.0),
        Point::new(20, 3.0),
        Point::new(30, 4.0),
    ];
    let err = ts.append(SeriesId(1), &pts).await.unwrap_err();
    assert!(
        matches!(
            err,
            IngestError::OutOfOrder {
                accepted: 2,
                last: 20,
                got: 20,
                ..
            }
        ),
        "{err}"
    );
    let got = ts.query(SeriesId(1), 0..=100).await.unwrap();
    assert_bit_eq(SeriesId(1), &got, &pts[..2]);
    // After a flush the series starts a new block: a late point is accepted and merged.
    ts.flush_all().await.unwrap();
    ts.append(SeriesId(1), &[Point::new(15, 1.5)])
        .await
        .unwrap();
    let got: Vec<i64> = ts
        .query(SeriesId(1), 0..=100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.ts)
        .collect();
    assert_eq!(got, [10, 15, 20]);
}

#[tokio::test]
async fn corrupt_and_torn_segments_are_reported_on_restart_and_never_used() {
    let gov = governor(mib(8));
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<Vec<Point>> = (0..3).map(|s| series_points(s, 3_000)).collect();
    {
        let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
            .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
            .open()
            .await
            .unwrap();
        // Three segments, one series each.
        for (s, pts) in data.iter().enumerate() {
            ts.append(SeriesId(s as u64), pts).await.unwrap();
            ts.flush_all().await.unwrap();
        }
        assert_eq!(ts.segments().len(), 3);
    }
    let mut files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3);
    // Segment 1: one flipped bit in the middle (bit rot). Segment 2: torn (cut short).
    let mut bytes = fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    fs::write(&files[0], &bytes).unwrap();
    let bytes = fs::read(&files[1]).unwrap();
    fs::write(&files[1], &bytes[..bytes.len() - 100]).unwrap();

    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .open()
        .await
        .unwrap();
    let rec = ts.recovery();
    assert_eq!(rec.segments_loaded, 1);
    assert_eq!(rec.corrupt.len(), 2, "{:?}", rec.corrupt);
    assert!(
        matches!(rec.corrupt[0], SegmentError::Checksum { .. }),
        "{}",
        rec.corrupt[0]
    );
    assert!(
        matches!(rec.corrupt[1], SegmentError::Torn { .. }),
        "{}",
        rec.corrupt[1]
    );
    assert!(files[0].with_extension("corrupt").exists());
    // The intact segment is served; the quarantined ones are not read at all.
    let got = ts.query(SeriesId(2), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(2), &got, &data[2]);
    assert!(
        ts.query(SeriesId(0), i64::MIN..=i64::MAX)
            .await
            .unwrap()
            .is_empty()
    );

    // Corruption after start-up is caught by the block checksum at query time.
    let live = &ts.segments()[0].path;
    let mut bytes = fs::read(live).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x01; // inside the data region, before the footer
    fs::write(live, &bytes).unwrap();
    let err = ts
        .query(SeriesId(2), i64::MIN..=i64::MAX)
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueryError::Segment(SegmentError::Checksum { .. })),
        "{err}"
    );
}

/// Timeseries may borrow up to 12 of 16 MiB while the Query engine's 8 MiB floor is idle, so
/// a reclaim for Query lands on Timeseries; `reclaim_timeout` bounds each reclaimer call.
fn borrowing_governor(reclaim_timeout: Duration) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(mib(16))
        .engine(EngineId::Timeseries, EngineBudget::new(mib(12)))
        .engine(
            EngineId::Query,
            EngineBudget::new(mib(12)).with_floor(mib(8)),
        )
        .reclaim_timeout(reclaim_timeout)
        .build()
        .unwrap();
    MemoryGovernor::new(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governor_reclaim_flushes_the_memtable() {
    // The default 5 s per reclaimer can pass while a loaded machine writes the segment; this
    // test is about what a reclaim does, so give it a deadline nothing healthy reaches.
    let gov = borrowing_governor(Duration::from_mins(1));
    let dir = tempfile::tempdir().unwrap();
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .open()
        .await
        .unwrap();
    let data: Vec<Vec<Point>> = (0..20).map(|s| series_points(s, 20_000)).collect();
    for (s, pts) in data.iter().enumerate() {
        ts.append(SeriesId(s as u64), pts).await.unwrap();
    }
    let before = ts.memory().used;
    assert!(before > mib(1));
    // The Query engine needs its floor back: the governor asks Timeseries, which flushes.
    let outcome = gov.reclaim_for(EngineId::Query, mib(1)).await;
    assert!(outcome.freed >= mib(1), "{outcome:?}");
    assert!(ts.memory().used < before);
    assert!(ts.stats().reclaims >= 1 && ts.stats().flushes >= 1);
    for (s, pts) in data.iter().enumerate() {
        let got = ts
            .query(SeriesId(s as u64), i64::MIN..=i64::MAX)
            .await
            .unwrap();
        assert_bit_eq(SeriesId(s as u64), &got, pts);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warning_pressure_schedules_a_flush_without_being_asked() {
    let limit = mib(2);
    let gov = governor(limit);
    let dir = tempfile::tempdir().unwrap();
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .reservation_chunk(16 * 1024)
        .open()
        .await
        .unwrap();
    // Fill to just past Warning (70 %) and stop well below Critical (85 %).
    let mut s = 0;
    while gov.engine_pressure(EngineId::Timeseries) < PressureLevel::Warning {
        ts.append(SeriesId(s), &series_points(s, 5_000))
            .await
            .unwrap();
        s += 1;
        assert!(s < 1_000);
    }
    assert!(gov.reserved(EngineId::Timeseries) < limit * 85 / 100);
    wait_until("the worker's flush", Duration::from_mins(1), || {
        ts.stats().flushes >= 1
            && gov.engine_pressure(EngineId::Timeseries) == PressureLevel::Normal
    })
    .await;
    // Flushed down to the target share (40 % of the limit), largest series first.
    assert!(ts.memory().used <= limit * 45 / 100, "{:?}", ts.memory());
    for s2 in 0..s {
        let got = ts.query(SeriesId(s2), i64::MIN..=i64::MAX).await.unwrap();
        assert_bit_eq(SeriesId(s2), &got, &series_points(s2, 5_000));
    }
}

/// A flusher whose writes take a while (a slow or rate-capped disk).
struct SlowFlusher {
    inner: FileSegmentFlusher,
    delay: Duration,
}

#[async_trait::async_trait]
impl timeseries_adapter::SegmentFlusher for SlowFlusher {
    async fn write_segment(
        &self,
        batch: Arc<timeseries_adapter::SegmentBatch>,
    ) -> Result<timeseries_adapter::SegmentMeta, timeseries_adapter::FlushError> {
        tokio::time::sleep(self.delay).await;
        self.inner.write_segment(batch).await
    }
    async fn read_block(
        &self,
        segment: &timeseries_adapter::SegmentMeta,
        series: SeriesId,
    ) -> Result<Option<timeseries_adapter::gorilla::Block>, SegmentError> {
        self.inner.read_block(segment, series).await
    }
    async fn recover(&self) -> Result<timeseries_adapter::Recovery, SegmentError> {
        self.inner.recover().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_that_times_out_does_not_abandon_its_flush() {
    let gov = borrowing_governor(Duration::from_millis(30));
    let dir = tempfile::tempdir().unwrap();
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(SlowFlusher {
            inner: FileSegmentFlusher::new(dir.path()).unwrap(),
            delay: Duration::from_millis(300),
        }))
        .open()
        .await
        .unwrap();
    let data: Vec<Vec<Point>> = (0..4).map(|s| series_points(s, 20_000)).collect();
    for (s, pts) in data.iter().enumerate() {
        ts.append(SeriesId(s as u64), pts).await.unwrap();
    }
    let before = ts.memory().used;
    // The governor gives up on the reclaim after 30 ms; the flush it started goes on.
    let _ = gov.reclaim_for(EngineId::Query, mib(1)).await;
    wait_until(
        "the abandoned flush to finish",
        Duration::from_mins(1),
        || ts.stats().flushes >= 1,
    )
    .await;
    assert!(ts.memory().used < before);
    for (s, pts) in data.iter().enumerate() {
        let got = ts
            .query(SeriesId(s as u64), i64::MIN..=i64::MAX)
            .await
            .unwrap();
        assert_bit_eq(SeriesId(s as u64), &got, pts);
    }
    let leftovers = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "tmp")
        .count();
    assert_eq!(leftovers, 0);
}

/// A governor whose ceiling, not the Timeseries limit, is what runs out: another engine
/// (Query) holds almost all of it, so the memtable's growth is refused while its own
/// pressure is Normal, and `append` has to wait in `governor.reserve`.
fn ceiling_bound_governor() -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(mib(4))
        .engine(EngineId::Timeseries, EngineBudget::new(mib(2)))
        .engine(EngineId::Query, EngineBudget::new(mib(4)))
        .build()
        .unwrap();
    MemoryGovernor::new(config).unwrap()
}

/// `ingest_wait(Duration::MAX)` means "no deadline". Waiting in `governor.reserve` (the
/// ceiling is held by another engine) must not add `Duration::MAX` to an `Instant` (it used
/// to panic inside `append`), and a wait without deadline still wakes when the memory is
/// released: well before the adapter's own 60 s wait slice would end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_ingest_wait_waits_in_reserve_and_wakes_on_release() {
    let gov = ceiling_bound_governor();
    let dir = tempfile::tempdir().unwrap();
    // The disk is down: nothing the adapter holds can be flushed to make room.
    let flaky = Arc::new(FlakyFlusher::new(
        FileSegmentFlusher::new(dir.path()).unwrap(),
        0,
        1,
    ));
    flaky.always_fail.store(true, Ordering::Relaxed);
    let ts = Arc::new(
        TimeseriesAdapter::builder(Arc::clone(&gov))
            .flusher(flaky.clone())
            .reservation_chunk(8 * 1024)
            .ingest_wait(Duration::MAX)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
            .open()
            .await
            .unwrap(),
    );
    let query = gov
        .try_reserve(EngineId::Query, mib(4) - 128 * 1024)
        .unwrap();
    // Random-bit values: about 8 bytes a point, so 40 000 need far more than 128 KiB.
    let data = series_points(3, 40_000);
    let append = tokio::spawn({
        let (ts, data) = (Arc::clone(&ts), data.clone());
        async move { ts.append(SeriesId(3), &data).await }
    });
    wait_until(
        "the append to wait for memory",
        Duration::from_mins(1),
        || ts.stats().waits >= 1 || append.is_finished(),
    )
    .await;
    assert!(
        gov.engine_pressure(EngineId::Timeseries) < PressureLevel::Critical,
        "fixture: the wait is in reserve, not on Timeseries pressure"
    );
    assert!(!append.is_finished(), "the append must still be waiting");

    drop(query);
    let stored = tokio::time::timeout(Duration::from_secs(45), append)
        .await
        .expect("a release wakes an append that waits without deadline")
        .expect("append must not panic");
    stored.unwrap();
    assert_eq!(ts.stats().throttled, 0);
    let got = ts.query(SeriesId(3), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(3), &got, &data);
}

/// The same "no deadline" at Critical Timeseries pressure: the append waits on the pressure
/// channel for as long as the disk is down, and goes on when flushes bring pressure down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_ingest_wait_waits_out_critical_pressure() {
    let gov = governor(256 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(FlakyFlusher::new(
        FileSegmentFlusher::new(dir.path()).unwrap(),
        0,
        1,
    ));
    flaky.always_fail.store(true, Ordering::Relaxed);
    let ts = Arc::new(
        TimeseriesAdapter::builder(Arc::clone(&gov))
            .flusher(flaky.clone())
            .reservation_chunk(8 * 1024)
            .ingest_wait(Duration::MAX)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(20))
            .open()
            .await
            .unwrap(),
    );
    let data = series_points(3, 200_000);
    let append = tokio::spawn({
        let (ts, data) = (Arc::clone(&ts), data.clone());
        async move { ts.append(SeriesId(3), &data).await }
    });
    wait_until(
        "Critical pressure and failed flushes",
        Duration::from_mins(1),
        || {
            (gov.engine_pressure(EngineId::Timeseries) >= PressureLevel::Critical
                && flaky.failures.load(Ordering::Relaxed) >= 2)
                || append.is_finished()
        },
    )
    .await;
    assert!(!append.is_finished(), "the append must still be waiting");

    flaky.always_fail.store(false, Ordering::Relaxed);
    let stored = tokio::time::timeout(Duration::from_mins(2), append)
        .await
        .expect("flushes bring pressure down and the append finishes")
        .expect("append must not panic");
    stored.unwrap();
    assert_eq!(ts.stats().throttled, 0);
    let got = ts.query(SeriesId(3), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(3), &got, &data);
}

async fn open_file_store(gov: &Arc<MemoryGovernor>, dir: &std::path::Path) -> TimeseriesAdapter {
    TimeseriesAdapter::builder(Arc::clone(gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir).unwrap()))
        .open()
        .await
        .unwrap()
}

/// Flips one bit in the middle of a file (bit rot) and returns the damaged bytes.
fn rot(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    fs::write(path, &bytes).unwrap();
    bytes
}

/// Appends one series, flushes it, and returns the new segment's id and path.
async fn write_one(ts: &TimeseriesAdapter, s: u64, data: &[Point]) -> (u64, std::path::PathBuf) {
    let before: Vec<u64> = ts.segments().iter().map(|m| m.id).collect();
    ts.append(SeriesId(s), data).await.unwrap();
    ts.flush_all().await.unwrap();
    let new: Vec<_> = ts
        .segments()
        .iter()
        .filter(|m| !before.contains(&m.id))
        .map(|m| (m.id, m.path.clone()))
        .collect();
    assert_eq!(new.len(), 1, "one new segment");
    new[0].clone()
}

/// Evidence kept for inspection is never overwritten. A store whose newest segment is
/// quarantined must not hand its id out again (it did: the next id was `max(valid) + 1`),
/// or when the new segment is quarantined in turn it lands on the first `.corrupt` file.
#[tokio::test]
async fn quarantined_ids_are_never_reused_and_evidence_never_overwritten() {
    let gov = governor(mib(8));
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<Vec<Point>> = (0..3).map(|s| series_points(s, 2_000)).collect();
    let (first_id, first) = {
        let ts = open_file_store(&gov, dir.path()).await;
        write_one(&ts, 0, &data[0]).await
    };
    let first_evidence = rot(&first);
    let (second_id, second) = {
        let ts = open_file_store(&gov, dir.path()).await;
        let rec = ts.recovery();
        assert_eq!(rec.corrupt.len(), 1, "{:?}", rec.corrupt);
        assert_eq!(rec.quarantined, [first.with_extension("corrupt")]);
        let (id, path) = write_one(&ts, 1, &data[1]).await;
        assert!(id > first_id, "id {id} was the quarantined segment's");
        (id, path)
    };
    let second_evidence = rot(&second);
    let ts = open_file_store(&gov, dir.path()).await;
    let rec = ts.recovery();
    assert_eq!(rec.corrupt.len(), 1, "{:?}", rec.corrupt);
    assert_eq!(rec.quarantined, [second.with_extension("corrupt")]);
    assert_eq!(
        fs::read(first.with_extension("corrupt")).unwrap(),
        first_evidence,
        "the first quarantined segment is kept as it was"
    );
    assert_eq!(fs::read(&rec.quarantined[0]).unwrap(), second_evidence);
    let (third_id, _) = write_one(&ts, 2, &data[2]).await;
    assert!(third_id > second_id);
    let got = ts.query(SeriesId(2), i64::MIN..=i64::MAX).await.unwrap();
    assert_bit_eq(SeriesId(2), &got, &data[2]);
}
