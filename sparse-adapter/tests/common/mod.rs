//! Shared data and setup for the sparse index tests: a deterministic corpus with a skewed
//! term distribution (a few long posting lists, many short ones), and governors.

#![allow(dead_code)]

use std::sync::Arc;

use governor_core::{EngineId, MemoryGovernor, mib};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparse_adapter::{DocId, SparseVector};

/// Terms of the shared vocabulary.
pub const VOCAB: u32 = 1500;

/// A term only document `doc` has: lets a test find one document by search.
pub fn own_term(doc: DocId) -> u32 {
    1_000_000 + u32::try_from(doc).unwrap()
}

/// `n` documents from `seed`: each has 20..40 vocabulary terms drawn with a skew towards
/// low ids (so posting lists span one to many blocks) and its own term.
pub fn corpus(n: u64, seed: u64) -> Vec<(DocId, SparseVector)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|doc| {
            let k = rng.random_range(20..40);
            let mut terms: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
            while terms.len() < k {
                // Square of a uniform draw: low ids far more often.
                let u: f64 = rng.random();
                let t = (u * u * f64::from(VOCAB)) as u32;
                if !terms.iter().any(|(x, _)| *x == t) {
                    terms.push((t, rng.random_range(0.01..1.0)));
                }
            }
            terms.push((own_term(doc), 1.0));
            (doc, SparseVector::new(terms).unwrap())
        })
        .collect()
}

/// `n` queries of 3..12 vocabulary terms.
pub fn queries(n: usize, seed: u64) -> Vec<SparseVector> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let k = rng.random_range(3..12);
            let mut terms: Vec<(u32, f32)> = Vec::new();
            while terms.len() < k {
                let t = rng.random_range(0..VOCAB);
                if !terms.iter().any(|(x, _)| *x == t) {
                    terms.push((t, rng.random_range(0.1..2.0)));
                }
            }
            SparseVector::new(terms).unwrap()
        })
        .collect()
}

/// A governor with a Sparse budget of `limit`.
pub fn governor(limit: usize) -> Arc<MemoryGovernor> {
    governed_blocks::testing::governor(EngineId::Sparse, limit, mib(512))
}
