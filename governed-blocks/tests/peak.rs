//! Issue 25, defect 7: `CacheStats::peak_bytes` read 202–204 KB against a 196,608 B limit
//! under 8 threads while the governor's own books stayed within it. The peak was taken
//! from the cache's index, which an eviction lowered only after its token had given the
//! bytes back (so another thread's load could be booked in the index first), and it was
//! sampled after the index lock was let go.
//!
//! A race cannot be forced from outside, so this test makes it as likely as it can (every
//! load on a full cache evicts, 8 threads at once) and checks the invariant the fix makes
//! hold under every interleaving: the peak is never above the limit. Before the fix it
//! failed in most runs; after it, it cannot.

use std::sync::Arc;

use governed_blocks::{CacheError, GovernedCache};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};

const ENGINE: EngineId = EngineId::Sparse;
/// The limit of the report.
const LIMIT: usize = 196_608;
const THREADS: u64 = 8;
const OPS: u64 = 20_000;

fn governor() -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(ENGINE, EngineBudget::new(LIMIT))
            .build()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn peak_bytes_never_exceeds_the_limit_under_eight_threads() {
    let gov = governor();
    let cache = Arc::new(
        GovernedCache::<u32, Vec<u8>>::builder(gov.clone(), ENGINE)
            .build()
            .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let cache = Arc::clone(&cache);
            let gov = gov.clone();
            s.spawn(move || {
                // xorshift: a fixed, per-thread sequence of operations.
                let mut x = (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for _ in 0..OPS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = u32::try_from(x % 256).unwrap();
                    // 2..18 KiB: a dozen or more entries fill the limit, so loads evict.
                    let size = kib(2) + usize::try_from((x >> 16) % 16_384).unwrap();
                    if x % 8 == 0 {
                        let _ = cache.resize(&key, size, false);
                    } else {
                        let _ = cache.get_or_try_load(&key, size, || {
                            Ok::<_, CacheError>((Vec::new(), size))
                        });
                    }
                    let peak = cache.stats().peak_bytes;
                    assert!(
                        peak <= LIMIT,
                        "peak_bytes {peak} B over the {LIMIT} B limit"
                    );
                    assert!(gov.reserved(ENGINE) <= LIMIT);
                }
            });
        }
    });
    let stats = cache.stats();
    assert!(
        stats.peak_bytes <= LIMIT,
        "peak_bytes {} B over the {LIMIT} B limit",
        stats.peak_bytes
    );
    assert!(stats.evictions > 0, "the cache never filled: {stats:?}");
    assert_eq!(gov.reserved(ENGINE), stats.resident_bytes);
}
