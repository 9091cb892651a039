//! Helpers shared by the integration tests: a governor with a Timeseries budget, a fault
//! injecting flusher, and deterministic series data.
#![allow(dead_code)]

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use async_trait::async_trait;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use timeseries_adapter::{
    FileSegmentFlusher, FlushError, Point, Recovery, SegmentBatch, SegmentError, SegmentFlusher,
    SegmentMeta, SeriesId, gorilla::Block,
};

/// A governor whose only configured engine is Timeseries, limited to `limit` bytes.
pub fn governor(limit: usize) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(limit * 4)
        .engine(EngineId::Timeseries, EngineBudget::new(limit))
        .build()
        .expect("valid config");
    MemoryGovernor::new(config).expect("governor")
}

/// Wraps the file flusher and fails a chosen share of writes, the way a full or failing
/// disk would: either before writing anything (`StorageFull`) or after leaving a partial temp
/// file behind (as a crash mid-write would), alternately.
pub struct FlakyFlusher {
    pub inner: FileSegmentFlusher,
    /// Failure probability in per mille.
    pub fail_per_mille: AtomicU32,
    /// When set, every write fails (a disk that stays full).
    pub always_fail: AtomicBool,
    pub failures: AtomicU64,
    pub successes: AtomicU64,
    rng: Mutex<StdRng>,
}

impl FlakyFlusher {
    pub fn new(inner: FileSegmentFlusher, fail_per_mille: u32, seed: u64) -> Self {
        Self {
            inner,
            fail_per_mille: AtomicU32::new(fail_per_mille),
            always_fail: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }
}

#[async_trait]
impl SegmentFlusher for FlakyFlusher {
    async fn write_segment(&self, batch: Arc<SegmentBatch>) -> Result<SegmentMeta, FlushError> {
        let fail = self.always_fail.load(Ordering::Relaxed)
            || self.rng.lock().random_range(0..1000) < self.fail_per_mille.load(Ordering::Relaxed);
        if fail {
            let n = self.failures.fetch_add(1, Ordering::Relaxed);
            let path = self.inner.dir().join(format!("{:020}.tmp", batch.id));
            let source = if n.is_multiple_of(2) {
                io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected: no space left on device",
                )
            } else {
                std::fs::write(&path, b"GORSEG\0\x01 partial").expect("write partial file");
                io::Error::other("injected: I/O error mid-write")
            };
            return Err(FlushError::Io { path, source });
        }
        let meta = self.inner.write_segment(batch).await?;
        self.successes.fetch_add(1, Ordering::Relaxed);
        Ok(meta)
    }

    async fn read_block(
        &self,
        segment: &SegmentMeta,
        series: SeriesId,
    ) -> Result<Option<Block>, SegmentError> {
        self.inner.read_block(segment, series).await
    }

    async fn recover(&self) -> Result<Recovery, SegmentError> {
        self.inner.recover().await
    }
}

/// splitmix64: a tiny deterministic hash for test data.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `n` points of series `s`: a mix of shapes Gorilla meets in practice (steady gauges,
/// counters, noisy random walks), with jittered timestamps and, in some series, the special
/// floats that must survive bit-exactly (NaN payloads, -0.0, ±inf).
pub fn series_points(s: u64, n: usize) -> Vec<Point> {
    let mut out = Vec::with_capacity(n);
    let mut ts: i64 = 1_700_000_000_000 + (s as i64) * 7;
    let mut v = (s % 100) as f64;
    for i in 0..n as u64 {
        let h = mix(s << 32 | i);
        ts += 10_000
            + if h.is_multiple_of(10) {
                (h >> 8) as i64 % 50 - 25
            } else {
                0
            };
        let value = match s % 4 {
            0 => {
                if h.is_multiple_of(50) {
                    v += 1.0;
                }
                v
            }
            1 => {
                v += ((h >> 16) % 100) as f64;
                v
            }
            2 => {
                v += (((h >> 20) % 2001) as f64 - 1000.0) / 100.0;
                (v * 10.0).round() / 10.0
            }
            _ => match h % 97 {
                0 => f64::from_bits(0x7ff8_0000_0000_0000 | (h >> 20)), // NaN with payload
                1 => -0.0,
                2 => f64::INFINITY,
                3 => f64::NEG_INFINITY,
                _ => f64::from_bits(h >> 2),
            },
        };
        out.push(Point::new(ts, value));
    }
    out
}

/// Asserts two point lists are equal bit for bit, naming the first difference.
pub fn assert_bit_eq(series: SeriesId, got: &[Point], want: &[Point]) {
    assert_eq!(got.len(), want.len(), "series {series}: point count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.bit_eq(w),
            "series {series}, point {i}: got {g:?}, want {w:?}"
        );
    }
}

/// A batch of `mib` MiB of incompressible words (the segment writer copies bits, it does not
/// care whether they decode; this keeps the debug-build test fast).
pub fn incompressible_batch(id: u64, mib: usize) -> Arc<SegmentBatch> {
    let words_per_series = 64 * 1024; // 512 KiB
    let series = mib * 2;
    let blocks = (0..series as u64)
        .map(|s| {
            let words: Vec<u64> = (0..words_per_series as u64)
                .map(|i| mix(s << 32 | i))
                .collect();
            let block = Block {
                bit_len: words.len() as u64 * 64,
                words,
                count: 1,
                first_ts: 0,
                last_ts: 0,
            };
            (SeriesId(s), block)
        })
        .collect();
    Arc::new(SegmentBatch { id, blocks })
}
