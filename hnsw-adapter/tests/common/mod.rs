//! Shared test fixtures: a governor with a Vector budget, clustered vectors, brute force.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
use hnsw_adapter::{HnswCache, HnswParams, SearchHit, SegmentId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const DIM: usize = 32;

/// Governor with a Vector budget of `vector_limit` (floor 0, so it may be reclaimed from),
/// a large Timeseries budget other tests use to drive global pressure, and a Query budget.
pub fn governor(vector_limit: usize, ceiling: usize) -> Arc<MemoryGovernor> {
    let config = GovernorConfig::builder()
        .global_ceiling(ceiling)
        .engine(EngineId::Vector, EngineBudget::new(vector_limit))
        .engine(EngineId::Timeseries, EngineBudget::new(ceiling))
        .engine(
            EngineId::Query,
            EngineBudget::new(ceiling).with_floor(mib(1)),
        )
        .reclaim_timeout(Duration::from_secs(10))
        // Many shards keep the per-thread credit quantum (idle slack counted in the
        // global figure) small next to the byte margins the pressure tests set up.
        .reservation_shards(16)
        .build()
        .expect("valid test config");
    MemoryGovernor::new(config).expect("governor")
}

pub fn params(points: usize) -> HnswParams {
    HnswParams::new(DIM)
        .max_connections(16)
        .ef_construction(100)
        .expected_points(points)
}

/// `n` vectors in 16 loose clusters, deterministic for a seed.
pub fn vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centers: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let c = &centers[i % centers.len()];
            c.iter()
                .map(|x| x + rng.random_range(-0.35..0.35))
                .collect()
        })
        .collect()
}

pub fn seg(i: usize) -> SegmentId {
    SegmentId::new("docs", i as u32).expect("valid id")
}

/// Vector ids are globally unique: segment `s`, row `r` → `s * 1_000_000 + r`.
pub fn vid(s: usize, r: usize) -> usize {
    s * 1_000_000 + r
}

/// Creates `segments` segments of `per` vectors each, inserts, persists; returns the data.
pub fn populate(cache: &HnswCache, segments: usize, per: usize) -> Vec<(usize, Vec<f32>)> {
    let mut all = Vec::new();
    for s in 0..segments {
        let id = seg(s);
        cache.create_segment(&id).expect("create");
        for (r, v) in vectors(per, 1000 + s as u64).into_iter().enumerate() {
            cache.insert(&id, vid(s, r), &v).expect("insert");
            all.push((vid(s, r), v));
        }
        // Persist as we go so a small budget can evict finished segments.
        cache.persist(&id).expect("persist");
    }
    all
}

pub fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>()
}

pub fn brute_force(data: &[(usize, Vec<f32>)], q: &[f32], k: usize) -> Vec<usize> {
    let mut d: Vec<(f32, usize)> = data.iter().map(|(id, v)| (l2(v, q), *id)).collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    d.into_iter().take(k).map(|(_, id)| id).collect()
}

pub fn ids(hits: &[SearchHit]) -> Vec<usize> {
    hits.iter().map(|h| h.id).collect()
}
