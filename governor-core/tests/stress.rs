//! Stress: 8 threads × 100k mixed operations while a sampler checks the invariants.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};

const THREADS: usize = 8;
const OPS: usize = 100_000;
const ENGINES: [EngineId; 3] = [EngineId::Query, EngineId::Vector, EngineId::Timeseries];

/// Tiny xorshift so the test needs no RNG crate and is reproducible per thread.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn invariants_hold_under_contention() {
    let ceiling = mib(8);
    let limits = [mib(6), mib(5), mib(4)];
    let mut builder = GovernorConfig::builder().global_ceiling(ceiling);
    for (e, l) in ENGINES.iter().zip(limits) {
        builder = builder.engine(*e, EngineBudget::new(l).with_floor(mib(1)));
    }
    let g = MemoryGovernor::new(builder.reservation_shards(8).build().unwrap()).unwrap();
    // What the test itself knows is held: raised after admission, lowered before release, so
    // it never exceeds what the ledger holds.
    let held: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicUsize::new(0));

    let sampler = {
        let (g, held, stop, violations) =
            (g.clone(), held.clone(), stop.clone(), violations.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Acquire) {
                let snap = g.snapshot();
                let mut total = 0;
                for (i, e) in ENGINES.iter().enumerate() {
                    let h = held[i].load(Ordering::Acquire);
                    total += h;
                    let granted = g.granted(*e);
                    if h > limits[i] || granted > limits[i] {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if total > ceiling || snap.global_granted > ceiling {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
                samples += 1;
            }
            samples
        })
    };

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (g, held) = (g.clone(), held.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let mut tokens = Vec::new();
                let mut denials = 0usize;
                for _ in 0..OPS {
                    let r = next(&mut rng);
                    let i = (r % 3) as usize;
                    match (r >> 8) % 4 {
                        0 | 1 => {
                            let bytes = kib(1 + ((r >> 16) % 256) as usize);
                            match g.try_reserve(ENGINES[i], bytes) {
                                Ok(tok) => {
                                    held[i].fetch_add(bytes, Ordering::AcqRel);
                                    tokens.push((i, tok));
                                }
                                Err(_) => denials += 1,
                            }
                        }
                        2 if !tokens.is_empty() => {
                            let k = (r >> 20) as usize % tokens.len();
                            let (i, tok) = &mut tokens[k];
                            let bytes = kib(((r >> 32) % 64) as usize);
                            if tok.try_grow(bytes).is_ok() {
                                held[*i].fetch_add(bytes, Ordering::AcqRel);
                            }
                        }
                        _ if !tokens.is_empty() => {
                            let k = (r >> 20) as usize % tokens.len();
                            let (i, tok) = tokens.swap_remove(k);
                            held[i].fetch_sub(tok.size(), Ordering::AcqRel);
                            drop(tok);
                        }
                        _ => {}
                    }
                    if tokens.len() > 16 {
                        let (i, tok) = tokens.swap_remove(0);
                        held[i].fetch_sub(tok.size(), Ordering::AcqRel);
                    }
                }
                for (i, tok) in tokens {
                    held[i].fetch_sub(tok.size(), Ordering::AcqRel);
                }
                denials
            })
        })
        .collect();
    let denials: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    stop.store(true, Ordering::Release);
    let samples = sampler.join().unwrap();

    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "invariant violations in {samples} samples"
    );
    assert!(
        samples > 10,
        "the sampler must actually have sampled ({samples})"
    );
    assert!(
        denials > 0,
        "the workload must reach the limits to test anything"
    );
    for e in ENGINES {
        assert_eq!(g.reserved(e), 0, "{e} leaked");
    }
    let snap = g.snapshot();
    assert!(
        snap.engines.iter().all(|e| e.peak <= e.limit),
        "a peak passed its limit"
    );
    assert!(
        snap.global_peak <= ceiling,
        "the global peak passed the ceiling"
    );
}
