//! The memtable's reservation tracks its real memory: encoded blocks + index overhead, checked
//! against the Gorilla encoder's own bit counts and against what jemalloc says the process
//! allocated while the memtable grew. (Its own test binary: jemalloc's counters are
//! process-wide, so no other test may allocate meanwhile.)

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod common;

use std::sync::Arc;

use common::{governor, series_points};
use governor_core::{EngineId, mib};
use timeseries_adapter::{
    FIXED_OVERHEAD_BYTES, FileSegmentFlusher, Point, SERIES_SLOT_BYTES, SeriesId, TimeseriesAdapter,
};

/// Net bytes this thread has allocated so far. Per-thread counters are exact (the global
/// `stats.allocated` lags behind thread caches), and with a current-thread runtime every
/// append runs on this thread.
fn allocated() -> usize {
    use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp};
    let a = allocatedp::read().unwrap().get();
    let d = deallocatedp::read().unwrap().get();
    (a - d) as usize
}

#[tokio::test(flavor = "current_thread")]
async fn reserved_bytes_track_encoded_size_plus_index_overhead() {
    let chunk = 32 * 1024;
    let gov = governor(mib(256)); // large: no pressure, no flush during the measurement
    let dir = tempfile::tempdir().unwrap();
    let ts = TimeseriesAdapter::builder(Arc::clone(&gov))
        .flusher(Arc::new(FileSegmentFlusher::new(dir.path()).unwrap()))
        .reservation_chunk(chunk)
        .open()
        .await
        .unwrap();
    let series = 300u64;
    let data: Vec<Vec<Point>> = (0..series).map(|s| series_points(s, 3_000)).collect();

    let before = allocated();
    for round in 0..30 {
        for (s, pts) in data.iter().enumerate() {
            ts.append(SeriesId(s as u64), &pts[round * 100..(round + 1) * 100])
                .await
                .unwrap();
        }
    }
    let grown = allocated() - before;
    let mem = ts.memory();
    eprintln!("{mem:?}; jemalloc grew by {grown} B");

    // 1. The governor holds exactly what the memtable says it reserved, which covers what it
    //    uses and exceeds it by at most one reservation chunk.
    assert_eq!(gov.reserved(EngineId::Timeseries), mem.reserved);
    assert!(
        mem.used <= mem.reserved && mem.reserved <= mem.used + chunk,
        "{mem:?}"
    );

    // 2. `used` is the sum of its parts, and the parts are what the data needs: encoded bits
    //    from the encoder itself (bit-exact, recomputed independently here), block capacity
    //    above them bounded by the growth policy (≤ half a block, ≤ 4 KiB per series), index
    //    = the hash map plus one slot per series.
    let (mut encoded_bits, mut per_series_bytes) = (0u64, 0usize);
    for pts in &data {
        let mut e = timeseries_adapter::gorilla::Encoder::new();
        for p in pts {
            e.append(p.ts, p.value).unwrap();
        }
        encoded_bits += e.bit_len();
        per_series_bytes += e.bit_len().div_ceil(8) as usize;
    }
    assert_eq!(mem.active_encoded_bytes, per_series_bytes);
    assert!(mem.active_block_bytes * 8 >= encoded_bits as usize);
    assert!(
        mem.active_block_bytes <= mem.active_encoded_bytes * 3 / 2 + series as usize * 64,
        "block slack too large: {mem:?}"
    );
    assert_eq!(
        mem.used,
        mem.active_block_bytes + mem.index_bytes + mem.frozen_bytes + mem.segment_meta_bytes
    );
    let map_bytes = mem.index_bytes - FIXED_OVERHEAD_BYTES - series as usize * SERIES_SLOT_BYTES;
    assert!(map_bytes > 0 && map_bytes < 64 * 1024, "{mem:?}");

    // 3. Against the allocator: what the process really allocated while the memtable grew is
    //    close to what the memtable accounts for (jemalloc rounds to size classes, and the
    //    index slots are pre-paid, not yet allocated).
    let really_held = mem.active_block_bytes + map_bytes;
    let ratio = grown as f64 / really_held as f64;
    eprintln!("allocator/accounted ratio {ratio:.3}");
    assert!(
        (0.98..=1.08).contains(&ratio),
        "jemalloc grew {grown} B while the memtable accounts {really_held} B of heap"
    );
}
