//! The cache against a sequential model: random load / get / pin / evict / remove /
//! resize / reclaim sequences with hooks that fail on demand. After every step the
//! governor's books equal the model's resident bytes, the resident set and its recency
//! order are the model's, and every value ever loaded is resident, evicted through the
//! hook exactly once, or removed: none lost, none duplicated.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use governed_blocks::{CacheError, ENTRY_OVERHEAD, EvictionHook, GovernedCache, PersistError};
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};
use parking_lot::Mutex;
use proptest::prelude::*;

const ENGINE: EngineId = EngineId::Sparse;
const LIMIT: usize = 12 * 1024;
const KEYS: u8 = 10;

#[derive(Debug, PartialEq, Eq)]
struct Val {
    key: u8,
    generation: u64,
}

const OH: usize = ENTRY_OVERHEAD + std::mem::size_of::<Val>();

#[derive(Default)]
struct Hook {
    failing: Mutex<HashSet<u8>>,
    evicted: Mutex<Vec<(u8, u64)>>,
}

impl EvictionHook<u8, Val> for Hook {
    fn before_evict(&self, key: &u8, value: &Val) -> Result<(), PersistError> {
        assert_eq!(*key, value.key);
        if self.failing.lock().contains(key) {
            return Err(PersistError::msg("injected persist failure"));
        }
        self.evicted.lock().push((value.key, value.generation));
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Load {
        key: u8,
        estimate: usize,
        actual: usize,
    },
    Get(u8),
    Pin(u8),
    Unpin(u8),
    Evict(u8),
    Remove(u8),
    Resize {
        key: u8,
        bytes: usize,
        force: bool,
    },
    Reclaim(usize),
    FailHook {
        key: u8,
        fail: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS;
    prop_oneof![
        6 => (key.clone(), 0..3000usize, 0..3000usize)
            .prop_map(|(key, estimate, actual)| Op::Load { key, estimate, actual }),
        3 => key.clone().prop_map(Op::Get),
        2 => key.clone().prop_map(Op::Pin),
        2 => key.clone().prop_map(Op::Unpin),
        2 => key.clone().prop_map(Op::Evict),
        1 => key.clone().prop_map(Op::Remove),
        2 => (key.clone(), 0..3000usize, proptest::bool::weighted(0.2))
            .prop_map(|(key, bytes, force)| Op::Resize { key, bytes, force }),
        2 => (0..8000usize).prop_map(Op::Reclaim),
        1 => (key, proptest::bool::ANY).prop_map(|(key, fail)| Op::FailHook { key, fail }),
    ]
}

struct Entry {
    charged: usize,
    pinned: bool,
    stamp: u64,
    generation: u64,
}

#[derive(Default)]
struct Model {
    entries: HashMap<u8, Entry>,
    clock: u64,
    failing: HashSet<u8>,
    evicted: Vec<(u8, u64)>,
    removed: Vec<(u8, u64)>,
    generation: u64,
    /// Set once a forced resize charged past the limit; the limit check is off after it.
    forced: bool,
    /// A load's reservation before its entry is resident.
    inflight: usize,
}

impl Model {
    fn reserved(&self) -> usize {
        self.entries.values().map(|e| e.charged).sum::<usize>() + self.inflight
    }

    fn available(&self) -> usize {
        LIMIT.saturating_sub(self.reserved())
    }

    fn touch(&mut self, key: u8) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.stamp = self.clock;
        }
    }

    /// Least recently used unpinned entries (never `except`), hook failures skipped, until
    /// `target` bytes are freed.
    fn evict_coldest(&mut self, target: usize, except: Option<u8>) -> usize {
        let mut order: Vec<(u64, u8)> = self
            .entries
            .iter()
            .filter(|(k, e)| !e.pinned && Some(**k) != except)
            .map(|(k, e)| (e.stamp, *k))
            .collect();
        order.sort_unstable();
        let mut freed = 0;
        for (_, key) in order {
            if freed >= target {
                break;
            }
            if self.failing.contains(&key) {
                continue;
            }
            let e = self.entries.remove(&key).unwrap();
            self.evicted.push((key, e.generation));
            freed += e.charged;
        }
        freed
    }

    /// Grows the books by `more` for `key`'s sake, evicting as the cache does.
    fn admit(&mut self, more: usize, except: Option<u8>) -> bool {
        if more <= self.available() {
            return true;
        }
        let shortfall = more - self.available();
        self.evict_coldest(shortfall.max(1), except);
        more <= self.available()
    }
}

fn governor() -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(ENGINE, EngineBudget::new(LIMIT))
            .engine(EngineId::Query, EngineBudget::new(kib(64)))
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn run(ops: &[Op]) {
    let gov = governor();
    let hook = Arc::new(Hook::default());
    let cache = GovernedCache::<u8, Val>::builder(gov.clone(), ENGINE)
        .name("model")
        .eviction_hook(hook.clone())
        .build()
        .unwrap();
    let mut m = Model::default();
    for (step, op) in ops.iter().enumerate() {
        match op.clone() {
            Op::Load {
                key,
                estimate,
                actual,
            } => {
                m.generation += 1;
                let generation = m.generation;
                let got = cache.get_or_try_load(&key, estimate, || {
                    Ok::<_, CacheError>((Val { key, generation }, actual))
                });
                if m.entries.contains_key(&key) {
                    m.touch(key);
                    assert_eq!(got.unwrap().generation, m.entries[&key].generation);
                } else {
                    let ok = m.admit(estimate + OH, Some(key)) && {
                        m.inflight = estimate + OH;
                        let ok = actual <= estimate || m.admit(actual - estimate, Some(key));
                        m.inflight = 0;
                        ok
                    };
                    if ok {
                        m.clock += 1;
                        m.entries.insert(
                            key,
                            Entry {
                                charged: actual + OH,
                                pinned: false,
                                stamp: m.clock,
                                generation,
                            },
                        );
                        assert_eq!(got.unwrap().generation, generation, "step {step}");
                    } else {
                        assert!(
                            matches!(got, Err(CacheError::NoRoom { .. })),
                            "step {step}: {got:?}"
                        );
                    }
                }
            }
            Op::Get(key) => {
                let got = cache.get(&key).map(|v| v.generation);
                m.touch(key);
                assert_eq!(got, m.entries.get(&key).map(|e| e.generation));
            }
            Op::Pin(key) | Op::Unpin(key) => {
                let pin = matches!(op, Op::Pin(_));
                let got = if pin {
                    cache.pin(&key)
                } else {
                    cache.unpin(&key)
                };
                match m.entries.get_mut(&key) {
                    Some(e) => {
                        got.unwrap();
                        e.pinned = pin;
                    }
                    None => assert!(matches!(got, Err(CacheError::NotResident { .. }))),
                }
            }
            Op::Evict(key) => {
                let got = cache.evict(&key);
                match m.entries.get(&key) {
                    None => assert!(matches!(got, Err(CacheError::NotResident { .. }))),
                    Some(e) if e.pinned => assert!(matches!(got, Err(CacheError::Pinned { .. }))),
                    Some(_) if m.failing.contains(&key) => {
                        assert!(matches!(got, Err(CacheError::Hook { .. })));
                    }
                    Some(_) => {
                        let e = m.entries.remove(&key).unwrap();
                        m.evicted.push((key, e.generation));
                        assert_eq!(got.unwrap(), e.charged);
                    }
                }
            }
            Op::Remove(key) => {
                let got = cache.remove(&key).map(|v| v.generation);
                let want = m.entries.remove(&key).map(|e| e.generation);
                assert_eq!(got, want);
                if let Some(g) = want {
                    m.removed.push((key, g));
                }
            }
            Op::Resize { key, bytes, force } => {
                let got = cache.resize(&key, bytes, force);
                let Some(cur) = m.entries.get(&key).map(|e| e.charged) else {
                    assert!(matches!(got, Err(CacheError::NotResident { .. })));
                    continue;
                };
                let want = bytes + OH;
                if want <= cur || m.admit(want - cur, Some(key)) {
                    got.unwrap();
                    m.entries.get_mut(&key).unwrap().charged = want;
                } else if force {
                    got.unwrap();
                    m.entries.get_mut(&key).unwrap().charged = want;
                    m.forced = true;
                } else {
                    assert!(matches!(got, Err(CacheError::NoRoom { .. })), "{got:?}");
                }
            }
            Op::Reclaim(target) => {
                let freed = cache.reclaim(target);
                let want = if target == 0 {
                    0
                } else {
                    m.evict_coldest(target, None)
                };
                assert_eq!(freed, want, "step {step}");
                let evictable: usize = m
                    .entries
                    .iter()
                    .filter(|(k, e)| !e.pinned && !m.failing.contains(k))
                    .map(|(_, e)| e.charged)
                    .sum();
                assert!(
                    freed >= target || evictable == 0,
                    "reclaim of {target} freed {freed} with {evictable} B evictable left"
                );
            }
            Op::FailHook { key, fail } => {
                if fail {
                    hook.failing.lock().insert(key);
                    m.failing.insert(key);
                } else {
                    hook.failing.lock().remove(&key);
                    m.failing.remove(&key);
                }
            }
        }
        // The books are the resident entries, exactly.
        let stats = cache.stats();
        assert_eq!(gov.reserved(ENGINE), m.reserved(), "step {step}: {op:?}");
        assert_eq!(stats.resident_bytes, m.reserved());
        assert_eq!(stats.entries, m.entries.len());
        let pinned: usize = m
            .entries
            .values()
            .filter(|e| e.pinned)
            .map(|e| e.charged)
            .sum();
        assert_eq!(stats.pinned_bytes, pinned);
        if !m.forced {
            assert!(gov.reserved(ENGINE) <= LIMIT);
        }
        // Same residents, same recency order.
        let mut order: Vec<(u64, u8)> = m.entries.iter().map(|(k, e)| (e.stamp, *k)).collect();
        order.sort_unstable();
        let order: Vec<u8> = order.into_iter().map(|(_, k)| k).collect();
        assert_eq!(cache.keys(), order, "step {step}");
        // Evictions went through the hook, once each, in the model's order.
        assert_eq!(*hook.evicted.lock(), m.evicted, "step {step}");
    }
    // No value lost or duplicated: every generation that became resident is resident now,
    // or was evicted once, or was removed once.
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (key, g) in m.evicted.iter().chain(m.removed.iter()) {
        assert!(*key < KEYS);
        *seen.entry(*g).or_default() += 1;
    }
    for key in 0..KEYS {
        if let Some(v) = cache.peek(&key) {
            *seen.entry(v.generation).or_default() += 1;
        }
    }
    assert!(seen.values().all(|n| *n == 1), "a value went away twice");
    drop(cache);
    assert_eq!(
        gov.reserved(ENGINE),
        0,
        "dropping the cache returns every byte"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn cache_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops);
    }
}

#[test]
fn value_in_use_is_not_evicted_and_books_follow_it() {
    let gov = governor();
    let cache = GovernedCache::<u8, Val>::builder(gov.clone(), ENGINE)
        .build()
        .unwrap();
    let held = cache
        .get_or_try_load(&1, 100, || {
            Ok::<_, CacheError>((
                Val {
                    key: 1,
                    generation: 1,
                },
                100,
            ))
        })
        .unwrap();
    assert_eq!(
        cache.reclaim(usize::MAX),
        0,
        "a value a caller holds stays booked"
    );
    assert!(matches!(cache.evict(&1), Err(CacheError::Busy { .. })));
    drop(held);
    assert_eq!(cache.reclaim(usize::MAX), 100 + OH);
    assert_eq!(gov.reserved(ENGINE), 0);
}

#[test]
fn hostile_sizes_are_typed_errors() {
    let gov = governor();
    let cache = GovernedCache::<u8, Val>::builder(gov.clone(), ENGINE)
        .build()
        .unwrap();
    let load = || {
        Ok::<_, CacheError>((
            Val {
                key: 2,
                generation: 1,
            },
            usize::MAX,
        ))
    };
    assert!(matches!(
        cache.get_or_try_load(&2, usize::MAX, load),
        Err(CacheError::TooLarge { .. })
    ));
    assert!(matches!(
        cache.get_or_try_load(&2, 10, load),
        Err(CacheError::TooLarge { .. })
    ));
    assert!(matches!(
        cache.get_or_try_load(&2, LIMIT + 1, load),
        Err(CacheError::NoRoom { .. })
    ));
    assert_eq!(gov.reserved(ENGINE), 0);
    assert!(cache.keys().is_empty());
}

/// Several threads loading, resizing and reclaiming on a tiny budget: the limit holds at
/// every sample and the books equal the resident entries once they stop.
#[test]
fn concurrent_use_keeps_the_books() {
    let gov = governor();
    let cache = Arc::new(
        GovernedCache::<u8, Val>::builder(gov.clone(), ENGINE)
            .build()
            .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let cache = Arc::clone(&cache);
            let gov = gov.clone();
            s.spawn(move || {
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for i in 0..2_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = (x % 16) as u8;
                    let size = (x >> 8) as usize % 2000;
                    match x % 5 {
                        0 => {
                            let _ = cache.resize(&key, size, false);
                        }
                        1 => {
                            cache.reclaim(size);
                        }
                        _ => {
                            let _ = cache.get_or_try_load(&key, size, || {
                                Ok::<_, CacheError>((Val { key, generation: i }, size))
                            });
                        }
                    }
                    assert!(gov.reserved(ENGINE) <= LIMIT);
                }
            });
        }
    });
    assert_eq!(gov.reserved(ENGINE), cache.stats().resident_bytes);
    cache.reclaim(usize::MAX);
    assert_eq!(gov.reserved(ENGINE), 0);
}
