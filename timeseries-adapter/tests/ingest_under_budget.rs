//! The main evidence: a million points across many series, ingested under a
//! Timeseries budget of about 5 % of their raw size while a fifth of the flushes fail (plus
//! one 300 ms outage that throttles ingest, whose writers retry what was refused); every
//! point reads back bit-exactly (before the final flush, after it, and after a restart), and
//! the Timeseries reservation never exceeds its limit (sampled by a thread).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{FlakyFlusher, assert_bit_eq, governor, series_points};
use governor_core::EngineId;
use timeseries_adapter::{FileSegmentFlusher, IngestError, Point, SeriesId, TimeseriesAdapter};

const SERIES: u64 = 250;
const POINTS_PER_SERIES: usize = 4_000; // 1,000,000 points
const BATCH: usize = 200;
const RAW_BYTES_PER_POINT: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn million_points_under_five_percent_budget_with_failing_flushes() {
    let total_points = SERIES as usize * POINTS_PER_SERIES;
    assert!(total_points >= 1_000_000);
    let limit = total_points * RAW_BYTES_PER_POINT / 20; // 5 % of raw
    let gov = governor(limit);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(FlakyFlusher::new(
        FileSegmentFlusher::new(dir.path()).unwrap(),
        200, // 20 % of flushes fail
        0x5eed,
    ));
    let ts = Arc::new(
        TimeseriesAdapter::builder(Arc::clone(&gov))
            .flusher(flaky.clone())
            .reservation_chunk(16 * 1024)
            .ingest_wait(Duration::from_millis(50))
            .retry_backoff(Duration::from_millis(2), Duration::from_millis(50))
            .open()
            .await
            .unwrap(),
    );

    // Sampler: the ledger must never show Timeseries above its limit.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (gov, stop) = (Arc::clone(&gov), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut samples, mut max_reserved, mut max_granted, mut violations) = (0u64, 0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                let r = gov.reserved(EngineId::Timeseries);
                let g = gov.granted(EngineId::Timeseries);
                if r > limit || g > limit {
                    violations += 1;
                }
                max_reserved = max_reserved.max(r);
                max_granted = max_granted.max(g);
                samples += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            (samples, max_reserved, max_granted, violations)
        })
    };

    let data: Arc<Vec<Vec<Point>>> = Arc::new(
        (0..SERIES)
            .map(|s| series_points(s, POINTS_PER_SERIES))
            .collect(),
    );
    let started = Instant::now();
    let throttled = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (ts, data, throttled) = (Arc::clone(&ts), Arc::clone(&data), Arc::clone(&throttled));
        writers.push(tokio::spawn(async move {
            for round in 0..POINTS_PER_SERIES / BATCH {
                for s in (w..SERIES).step_by(4) {
                    let mut batch = &data[s as usize][round * BATCH..(round + 1) * BATCH];
                    // A throttled append returns what it stored; retry exactly the rest.
                    loop {
                        match ts.append(SeriesId(s), batch).await {
                            Ok(()) => break,
                            Err(e @ IngestError::Throttled { .. }) => {
                                throttled.fetch_add(1, Ordering::Relaxed);
                                batch = &batch[e.accepted()..];
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => panic!("unexpected ingest error: {e}"),
                        }
                    }
                }
            }
        }));
    }
    // Besides the random failures, one 300 ms disk outage a third of the way in: the memtable
    // fills, appends wait their 50 ms and come back throttled, and the writers retry exactly
    // the points they were told were not stored.
    let outage = {
        let (ts, flaky) = (Arc::clone(&ts), Arc::clone(&flaky));
        tokio::spawn(async move {
            while ts.stats().points_ingested < total_points as u64 / 3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            flaky.always_fail.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(300)).await;
            flaky.always_fail.store(false, Ordering::Relaxed);
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    outage.await.unwrap();
    let ingest_time = started.elapsed();

    // Every point readable before the final flush: memtable + pending batch + segments.
    for s in 0..SERIES {
        let got = ts.query(SeriesId(s), i64::MIN..=i64::MAX).await.unwrap();
        assert_bit_eq(SeriesId(s), &got, &data[s as usize]);
    }
    // Drain: failures keep the data in memory, so retry until it is all on disk.
    let mut attempts = 0;
    while ts.memory().points_in_memory > 0 {
        attempts += 1;
        assert!(attempts < 1_000, "could not drain the memtable");
        if ts.flush_all().await.is_err() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (samples, max_reserved, max_granted, violations) = sampler.join().unwrap();

    let stats = ts.stats();
    let mem = ts.memory();
    let on_disk: u64 = ts.segments().iter().map(|m| m.file_len).sum();
    eprintln!(
        "ingested {total_points} points in {ingest_time:?}; limit {limit} B; \
         max reserved {max_reserved} B, max granted {max_granted} B over {samples} samples; \
         {stats:?}; throttled appends {}; on disk {on_disk} B ({:.2} B/point); {mem:?}",
        throttled.load(Ordering::Relaxed),
        on_disk as f64 / total_points as f64,
    );
    assert_eq!(violations, 0, "Timeseries reservation exceeded its limit");
    assert!(samples > 100, "the sampler must actually have sampled");
    assert!(max_reserved <= limit);
    assert_eq!(stats.points_ingested, total_points as u64);
    assert!(
        stats.flush_failures > 0,
        "failures were injected: {stats:?}"
    );
    assert_eq!(stats.flush_failures, flaky.failures.load(Ordering::Relaxed));
    assert!(
        stats.flushes >= 5,
        "a budget of 5% of raw must force many flushes"
    );
    assert!(mem.reserved >= mem.used);
    assert_eq!(gov.reserved(EngineId::Timeseries), mem.reserved);

    for s in 0..SERIES {
        let got = ts.query(SeriesId(s), i64::MIN..=i64::MAX).await.unwrap();
        assert_bit_eq(SeriesId(s), &got, &data[s as usize]);
    }
    // A sub-range returns exactly the points inside it.
    let probe = &data[7];
    let range = probe[1000].ts..=probe[2999].ts;
    let got = ts.query(SeriesId(7), range).await.unwrap();
    assert_bit_eq(SeriesId(7), &got, &probe[1000..3000]);

    // Restart: segments are verified by checksum and read back; partial temp files left by
    // the injected mid-write failures are removed, not used.
    drop(ts);
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .open()
        .await
        .unwrap();
    let rec = ts.recovery();
    assert!(rec.corrupt.is_empty(), "{:?}", rec.corrupt);
    assert_eq!(rec.points_loaded, total_points as u64);
    for s in 0..SERIES {
        let got = ts.query(SeriesId(s), i64::MIN..=i64::MAX).await.unwrap();
        assert_bit_eq(SeriesId(s), &got, &data[s as usize]);
    }
}
