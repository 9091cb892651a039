//! The borrowing scenario: what a Query engine gains from memory other engines are not using,
//! and how fast they get their floors back when they wake.
//!
//! The ceiling is shared by the Query engine (a small floor, a limit near the ceiling) and two
//! engines that are idle at first. TPC-H's 22 queries (data generated in process) run twice:
//! while the others sleep, and while they wake up and take their floors. The same queries run
//! on DataFusion's own pools, sized two ways a fixed configuration could choose:
//! * **the Query floor** — a static split that keeps every other engine's guarantee, and
//!   leaves the Query engine only its share;
//! * **the whole ceiling** — fast, but when the other engines take their floors the process
//!   holds more than the ceiling (the pool does not know them); the table shows by how much.
//!
//! The governed pool borrows the idle floors and gives them back: a waking engine's
//! `reserve` waits until the queries' memory comes back (they spill and finish), and the
//! report gives those waits' p50 and p99.

#[path = "../../datafusion-pool/tests/common/tpch.rs"]
#[allow(dead_code, missing_docs)]
mod tpch;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::GovernorExt;
use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, human_bytes, mib};

/// The engines that sleep first and wake in the second round.
const SLEEPERS: [EngineId; 2] = [EngineId::Vector, EngineId::Timeseries];

/// Sizes of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct BorrowConfig {
    /// TPC-H scale factor.
    pub sf: f64,
    /// DataFusion partitions.
    pub partitions: usize,
    /// The global ceiling.
    pub ceiling: usize,
    /// The Query engine's floor (its limit is the ceiling).
    pub query_floor: usize,
    /// Each sleeping engine's floor (and limit).
    pub sleeper_floor: usize,
    /// How long each waking engine may wait for its floor.
    pub wake_timeout: Duration,
}

impl BorrowConfig {
    /// The size of `BENCHMARKS.md`'s table.
    pub fn demo() -> Self {
        Self {
            sf: 0.1,
            partitions: 2,
            ceiling: mib(64),
            query_floor: mib(8),
            sleeper_floor: mib(24),
            wake_timeout: Duration::from_mins(1),
        }
    }

    /// The test-suite size.
    pub fn small() -> Self {
        Self {
            sf: 0.02,
            partitions: 2,
            ceiling: mib(24),
            query_floor: mib(2),
            sleeper_floor: mib(8),
            wake_timeout: Duration::from_mins(1),
        }
    }
}

/// One configuration's result.
#[derive(Clone, Debug)]
pub struct PoolRun {
    /// Which pool and size.
    pub name: String,
    /// Queries completed while the other engines slept, and while they woke (of 22 each).
    pub completed: (usize, usize),
    /// Wall time of both rounds.
    pub elapsed: Duration,
    /// The most the Query engine's pool held plus the other engines' reservations at once,
    /// sampled every millisecond: above the ceiling, a guarantee was broken.
    pub peak_held: usize,
    /// Each waking engine's wait for its floor, in the order they woke.
    pub waits: Vec<Duration>,
    /// Waking engines that did not get their floor in time.
    pub floor_failures: usize,
}

/// What the scenario measured, one row per pool.
#[derive(Clone, Debug)]
pub struct BorrowReport {
    /// The sizes.
    pub config: BorrowConfig,
    /// Governed first, then the fixed pools.
    pub runs: Vec<PoolRun>,
}

impl BorrowReport {
    /// A markdown table of the runs.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "TPC-H SF {} ({} partitions) twice: other engines idle, then waking to take {} floors of {} each; ceiling {}, Query floor {}\n\n\
             | pool | completed, others idle | completed, others waking | time | peak held (pool + others) | over the ceiling | floor wait p50 / p99 | floors not given |\n\
             |---|---|---|---|---|---|---|---|\n",
            c.sf,
            c.partitions,
            SLEEPERS.len(),
            human_bytes(c.sleeper_floor),
            human_bytes(c.ceiling),
            human_bytes(c.query_floor),
        );
        for r in &self.runs {
            let (p50, p99) = crate::workload::p50_p99(&r.waits).unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {}/22 | {}/22 | {:.1?} | {} | {} | {:.1?} / {:.1?} | {} |",
                r.name,
                r.completed.0,
                r.completed.1,
                r.elapsed,
                human_bytes(r.peak_held),
                if r.peak_held > c.ceiling {
                    human_bytes(r.peak_held - c.ceiling)
                } else {
                    "-".to_owned()
                },
                p50,
                p99,
                r.floor_failures,
            );
        }
        s
    }
}

/// The governor of one run: Query with a small floor and a limit of the whole ceiling, the
/// sleepers with their floors.
fn governor(c: &BorrowConfig) -> Result<Arc<MemoryGovernor>, String> {
    let mut b = GovernorConfig::builder().global_ceiling(c.ceiling).engine(
        EngineId::Query,
        EngineBudget::new(c.ceiling).with_floor(c.query_floor),
    );
    for e in SLEEPERS {
        b = b.engine(
            e,
            EngineBudget::new(c.sleeper_floor).with_floor(c.sleeper_floor),
        );
    }
    MemoryGovernor::new(b.build().map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// Runs the scenario: the governed pool, then DataFusion's pools at the Query floor and at the
/// whole ceiling.
pub async fn run_borrow(config: BorrowConfig) -> Result<BorrowReport, String> {
    let tables = tpch::generate(config.sf, config.partitions as i32);
    let mut runs = Vec::new();
    let governed = governor(&config)?;
    runs.push(
        run_pool(
            "governed (Query floor, borrows up to the ceiling)",
            governed.pool(),
            Some(&governed),
            &tables,
            &config,
        )
        .await?,
    );
    for (name, pool) in [
        (
            format!(
                "Greedy at the Query floor ({})",
                human_bytes(config.query_floor)
            ),
            fixed(GreedyMemoryPool::new(config.query_floor)),
        ),
        (
            format!(
                "FairSpill at the Query floor ({})",
                human_bytes(config.query_floor)
            ),
            fixed(FairSpillPool::new(config.query_floor)),
        ),
        (
            format!("Greedy at the ceiling ({})", human_bytes(config.ceiling)),
            fixed(GreedyMemoryPool::new(config.ceiling)),
        ),
        (
            format!("FairSpill at the ceiling ({})", human_bytes(config.ceiling)),
            fixed(FairSpillPool::new(config.ceiling)),
        ),
    ] {
        // The other engines still reserve their floors from a governor; the pool knows
        // nothing of it, as with any fixed configuration.
        let g = governor(&config)?;
        runs.push(run_pool(&name, pool, Some(&g), &tables, &config).await?);
    }
    Ok(BorrowReport { config, runs })
}

fn fixed<P: MemoryPool + 'static>(pool: P) -> Arc<dyn MemoryPool> {
    Arc::new(TrackConsumersPool::new(
        pool,
        std::num::NonZeroUsize::new(5).expect("5"),
    ))
}

/// Two rounds of the 22 queries on `pool`; in the second the sleepers reserve their floors
/// from `governor` while the queries run, and hold them to the end.
async fn run_pool(
    name: &str,
    pool: Arc<dyn MemoryPool>,
    governor: Option<&Arc<MemoryGovernor>>,
    tables: &[tpch::Table],
    c: &BorrowConfig,
) -> Result<PoolRun, String> {
    let pool_in_governor = pool.is::<datafusion_pool::GovernedMemoryPool>();
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::clone(&pool))
        .build_arc()
        .map_err(|e| e.to_string())?;
    let session = SessionConfig::new()
        .with_target_partitions(c.partitions)
        .with_sort_spill_reservation_bytes(256 * 1024);
    let ctx = SessionContext::new_with_config_rt(session, runtime);
    tpch::register(&ctx, tables);
    let queries = tpch::queries();
    let started = Instant::now();

    // A sampler of what is held against the ceiling: the pool's bytes (for the governed pool
    // they are also the Query engine's) plus the sleepers' reservations.
    let peak = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (pool, peak, stop) = (Arc::clone(&pool), Arc::clone(&peak), Arc::clone(&stop));
        let governor = governor.cloned();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                // One reading when the pool books in the governor (two reads at different
                // instants could add bytes that were never held together).
                let held = match &governor {
                    Some(g) if pool_in_governor => g.global_reserved(),
                    Some(g) => {
                        pool.reserved() + SLEEPERS.iter().map(|&e| g.reserved(e)).sum::<usize>()
                    }
                    None => pool.reserved(),
                };
                peak.fetch_max(held, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut completed = (0, 0);
    for (n, sql) in &queries {
        if run_query(&ctx, sql).await {
            completed.0 += 1;
        } else {
            tracing::debug!(query = n, pool = name, "query failed while others slept");
        }
    }
    // The sleepers wake while the second round runs: each asks for its floor once a quarter
    // of the way in, and holds it to the end.
    let mut wakers = Vec::new();
    if let Some(g) = governor {
        for (i, &engine) in SLEEPERS.iter().enumerate() {
            let (g, floor, timeout) = (Arc::clone(g), c.sleeper_floor, c.wake_timeout);
            wakers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50 * (i as u64 + 1))).await;
                let asked = Instant::now();
                let token = g.reserve(engine, floor, timeout).await;
                (asked.elapsed(), token)
            }));
        }
    }
    for (_, sql) in &queries {
        if run_query(&ctx, sql).await {
            completed.1 += 1;
        }
    }
    let mut waits = Vec::new();
    let mut floor_failures = 0;
    let mut tokens = Vec::new();
    for w in wakers {
        let (waited, token) = w.await.map_err(|e| e.to_string())?;
        match token {
            Ok(t) => {
                waits.push(waited);
                tokens.push(t);
            }
            Err(_) => floor_failures += 1,
        }
    }
    stop.store(true, Ordering::Release);
    sampler.join().map_err(|_| "sampler panicked".to_string())?;
    drop(tokens);
    Ok(PoolRun {
        name: name.to_owned(),
        completed,
        elapsed: started.elapsed(),
        peak_held: peak.load(Ordering::Acquire),
        waits,
        floor_failures,
    })
}

async fn run_query(ctx: &SessionContext, sql: &str) -> bool {
    let work = async { ctx.sql(sql).await?.collect().await };
    matches!(
        tokio::time::timeout(Duration::from_mins(2), work).await,
        Ok(Ok(_))
    )
}
