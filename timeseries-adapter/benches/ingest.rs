//! Ingest throughput with and without the governor (same run), compression, flush MB/s.
//!
//! * `ingest/bare_gorilla`: the codec alone, points into a `HashMap<SeriesId, Encoder>`: no
//!   governor, no lock, no flush. The ceiling.
//! * `ingest/governed_unbounded`: the adapter with a Timeseries budget larger than the data:
//!   accounting and locking, but never a flush. The price of governance itself.
//! * `ingest/governed_5pct`: the adapter under a budget of 5 % of the raw size, flushing
//!   real segments (fsync + fadvise) as it goes: the price of living within the budget.
//! * `flush/{fadvise,plain}`: writing a 16 MiB segment durably, with and without dropping its
//!   pages from the page cache.
//!
//! Run: `cargo bench -p timeseries-adapter --bench ingest -- --quick`. Bytes per point are
//! printed to stderr.

#![allow(missing_docs)]

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use timeseries_adapter::gorilla::Encoder;
use timeseries_adapter::{
    FileSegmentFlusher, IngestError, Point, SegmentFlusher, SeriesId, TimeseriesAdapter,
};

const SERIES: u64 = 100;
const POINTS: usize = 10_000; // per series: 1e6 points in all
const BATCH: usize = 100;

fn dataset() -> Vec<Vec<Point>> {
    (0..SERIES)
        .map(|s| common::series_points(s, POINTS))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Round-robin batches over all series, as a collector would send them.
async fn ingest(ts: &TimeseriesAdapter, data: &[Vec<Point>]) {
    for round in 0..POINTS / BATCH {
        for (s, pts) in data.iter().enumerate() {
            let mut batch = &pts[round * BATCH..(round + 1) * BATCH];
            loop {
                match ts.append(SeriesId(s as u64), batch).await {
                    Ok(()) => break,
                    Err(e @ IngestError::Throttled { .. }) => batch = &batch[e.accepted()..],
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}

fn bench_ingest(c: &mut Criterion) {
    let data = dataset();
    let total = SERIES as usize * POINTS;
    let raw = total * 16;
    let rt = runtime();

    // Compression, once: encoded bits per point over the whole data set.
    let bits: u64 = data
        .iter()
        .map(|pts| {
            let mut e = Encoder::new();
            for p in pts {
                e.append(p.ts, p.value).unwrap();
            }
            e.bit_len()
        })
        .sum();
    eprintln!(
        "compression: {:.3} bytes/point ({:.1}x vs 16 B raw) over {total} points",
        bits as f64 / 8.0 / total as f64,
        (raw * 8) as f64 / bits as f64
    );

    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(total as u64));
    g.sample_size(10);
    g.bench_function("bare_gorilla", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let mut map: HashMap<SeriesId, Encoder> = HashMap::new();
                let t = Instant::now();
                for round in 0..POINTS / BATCH {
                    for (s, pts) in data.iter().enumerate() {
                        let e = map.entry(SeriesId(s as u64)).or_default();
                        for p in &pts[round * BATCH..(round + 1) * BATCH] {
                            e.append(p.ts, p.value).unwrap();
                        }
                    }
                }
                spent += t.elapsed();
                black_box(map);
            }
            spent
        });
    });
    for (name, limit) in [("governed_unbounded", raw * 2), ("governed_5pct", raw / 20)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempfile::tempdir().unwrap();
                        let gov = common::governor(limit);
                        let ts = TimeseriesAdapter::builder(gov)
                            .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
                            .reservation_chunk(16 * 1024)
                            .open()
                            .await
                            .unwrap();
                        let t = Instant::now();
                        ingest(&ts, &data).await;
                        spent += t.elapsed();
                        let s = ts.stats();
                        black_box(s);
                    }
                    spent
                })
            });
        });
    }
    g.finish();
}

fn bench_flush(c: &mut Criterion) {
    let rt = runtime();
    let mib = 16usize;
    let batch = common::incompressible_batch(1, mib);
    let mut g = c.benchmark_group("flush");
    g.throughput(Throughput::Bytes((mib << 20) as u64));
    g.sample_size(10);
    for (name, drop_cache) in [("fadvise", true), ("plain", false)] {
        let dir = tempfile::tempdir().unwrap();
        let flusher = FileSegmentFlusher::new(dir.path())
            .unwrap()
            .drop_page_cache(drop_cache);
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(flusher.write_segment(Arc::clone(&batch)))
                    .unwrap()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ingest, bench_flush);
criterion_main!(benches);
