//! Property test: random operation sequences against a simple sequential model of the books.
//!
//! Single-threaded, the governor must answer exactly like the model: a reservation succeeds if
//! and only if it fits under both the engine limit and the ceiling in force (the ceiling moves
//! up and down between operations, as `set_ceiling` moves it live), and every figure matches.

use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, ReservationToken,
};
use proptest::prelude::*;

const ENGINES: [EngineId; 3] = [EngineId::Query, EngineId::Vector, EngineId::Timeseries];
const LIMITS: [usize; 3] = [6_000, 5_000, 4_000];
const CEILING: usize = 10_000;

#[derive(Clone, Debug)]
enum Op {
    Reserve(usize, usize),
    Grow(usize, usize),
    Shrink(usize, usize),
    Split(usize, usize),
    Drop(usize),
    Charge(usize, usize),
    Untracked(usize),
    Ceiling(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3_000usize).prop_map(|(e, b)| Op::Reserve(e, b)),
        2 => (any::<usize>(), 0..2_000usize).prop_map(|(t, b)| Op::Grow(t, b)),
        2 => (any::<usize>(), 0..3_000usize).prop_map(|(t, b)| Op::Shrink(t, b)),
        1 => (any::<usize>(), 0..2_000usize).prop_map(|(t, b)| Op::Split(t, b)),
        3 => any::<usize>().prop_map(Op::Drop),
        1 => (0..3usize, 0..2_000usize).prop_map(|(e, b)| Op::Charge(e, b)),
        1 => (0..3_000usize).prop_map(Op::Untracked),
        1 => (1_000..14_000usize).prop_map(Op::Ceiling),
    ]
}

struct Model {
    reserved: [usize; 3],
    untracked: usize,
    ceiling: usize,
}

impl Model {
    /// Zero bytes always fit (nothing is taken), even when a charge overcommitted the books.
    fn fits(&self, e: usize, bytes: usize) -> bool {
        let total: usize = self.reserved.iter().sum();
        bytes == 0
            || (self.reserved[e] + bytes <= LIMITS[e]
                && total + self.untracked + bytes <= self.ceiling)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn governor_matches_sequential_model(ops in proptest::collection::vec(op(), 1..80), shards in 1usize..5) {
        let mut b = GovernorConfig::builder().global_ceiling(CEILING).reservation_shards(shards);
        for (e, l) in ENGINES.iter().zip(LIMITS) {
            b = b.engine(*e, EngineBudget::new(l));
        }
        let g = MemoryGovernor::new(b.build().unwrap()).unwrap();
        let mut model = Model { reserved: [0; 3], untracked: 0, ceiling: CEILING };
        let mut tokens: Vec<(usize, ReservationToken)> = Vec::new();
        for op in ops {
            match op {
                Op::Reserve(e, bytes) => {
                    let expect = model.fits(e, bytes);
                    match g.try_reserve(ENGINES[e], bytes) {
                        Ok(t) => {
                            prop_assert!(expect, "admitted {bytes} for {} but the model says no", ENGINES[e]);
                            model.reserved[e] += bytes;
                            tokens.push((e, t));
                        }
                        Err(err) => {
                            prop_assert!(!expect, "denied {bytes} for {}: {err}", ENGINES[e]);
                            prop_assert!(err.is_denial());
                        }
                    }
                }
                Op::Grow(t, bytes) if !tokens.is_empty() => {
                    let k = t % tokens.len();
                    let e = tokens[k].0;
                    let expect = model.fits(e, bytes);
                    let got = tokens[k].1.try_grow(bytes);
                    prop_assert_eq!(got.is_ok(), expect);
                    if got.is_ok() { model.reserved[e] += bytes; }
                }
                Op::Shrink(t, bytes) if !tokens.is_empty() => {
                    let k = t % tokens.len();
                    let e = tokens[k].0;
                    let held = tokens[k].1.size();
                    match tokens[k].1.shrink(bytes) {
                        Ok(()) => { prop_assert!(bytes <= held); model.reserved[e] -= bytes; }
                        Err(MemError::ShrinkBeyondHeld { requested, held: h, .. }) => {
                            prop_assert!(bytes > held);
                            prop_assert_eq!((requested, h), (bytes, held));
                        }
                        Err(other) => prop_assert!(false, "unexpected {other}"),
                    }
                }
                Op::Split(t, bytes) if !tokens.is_empty() => {
                    let k = t % tokens.len();
                    let e = tokens[k].0;
                    if let Ok(part) = tokens[k].1.split(bytes) { tokens.push((e, part)); }
                }
                Op::Drop(t) if !tokens.is_empty() => {
                    let (e, tok) = tokens.swap_remove(t % tokens.len());
                    model.reserved[e] -= tok.size();
                }
                Op::Charge(e, bytes) => {
                    tokens.push((e, g.charge(ENGINES[e], bytes)));
                    model.reserved[e] += bytes;
                }
                Op::Untracked(bytes) => {
                    g.set_untracked(bytes);
                    model.untracked = bytes;
                }
                Op::Ceiling(bytes) => {
                    // In force for admission when it returns; what is held above it stays held.
                    let change = g.set_ceiling(bytes).unwrap();
                    prop_assert_eq!(change.to, bytes);
                    model.ceiling = bytes;
                    prop_assert_eq!(g.ceiling(), bytes);
                }
                _ => {}
            }
            for (i, e) in ENGINES.iter().enumerate() {
                prop_assert_eq!(g.reserved(*e), model.reserved[i], "reserved of {}", e);
            }
            prop_assert_eq!(g.global_reserved(), model.reserved.iter().sum::<usize>());
        }
        drop(tokens);
        prop_assert_eq!(g.global_reserved(), 0);
    }
}
