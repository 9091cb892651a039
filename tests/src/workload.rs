//! The mixed workload: vector search + bulk timeseries ingest + SQL `GROUP BY` under one governor.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_pool::GovernorExt;
use futures::StreamExt;
use governor_core::alloc::ProcessMemory;
use governor_core::retention::AllocatorRetention;
use governor_core::rss_monitor::RssMonitorConfig;
use governor_core::{
    EngineBudget, EngineId, GovernorConfig, MemoryGovernor, ReservationToken, human_bytes, mib,
};
use hnsw_adapter::{HnswCache, HnswParams, SegmentId};
use parking_lot::Mutex;
use timeseries_adapter::{FileSegmentFlusher, Point, SeriesId, TimeseriesAdapter};

use crate::engines::{
    CrdtOutcome, CrdtWork, SparseOutcome, SparseWork, crdt_edit_and_merge, sparse_ingest_and_search,
};

/// Sizes and budgets of one run.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Global ceiling (also the RSS target).
    pub ceiling: usize,
    /// Vector engine limit.
    pub vector_limit: usize,
    /// Timeseries engine limit.
    pub timeseries_limit: usize,
    /// Query engine limit.
    pub query_limit: usize,
    /// Bridge engine limit (holds the SQL input table, booked as resident data).
    pub bridge_limit: usize,
    /// Sparse engine limit.
    pub sparse_limit: usize,
    /// Crdt engine limit.
    pub crdt_limit: usize,
    /// HNSW segments.
    pub segments: usize,
    /// Vectors per segment.
    pub vectors_per_segment: usize,
    /// Vector dimension.
    pub dim: usize,
    /// Searches to run.
    pub searches: usize,
    /// Timeseries series.
    pub series: usize,
    /// Points per series.
    pub points_per_series: usize,
    /// Points per append call.
    pub batch: usize,
    /// Rows of the SQL table.
    pub sql_rows: usize,
    /// Distinct `GROUP BY` keys.
    pub sql_groups: usize,
    /// `GROUP BY` queries to run.
    pub sql_queries: usize,
    /// DataFusion partitions.
    pub partitions: usize,
    /// Whether the RSS monitor may reclaim below engines' floors when borrowers are not enough
    /// (its default; off only to measure what that buys).
    pub shed_below_floors: bool,
    /// The RSS monitor's sampling interval.
    pub monitor_interval: Duration,
    /// How the RSS monitor steers jemalloc's retention of freed pages (its default follows
    /// pressure; the others only to measure what that buys).
    pub retention: AllocatorRetention,
    /// `Some(fraction)`: the ceiling is this share of the memory the environment allows (the
    /// cgroup's limit, else physical memory), and follows it while the run lasts (the container
    /// watch); `ceiling` is then ignored.
    pub ceiling_from_environment: Option<f64>,
    /// Ceiling drops while the timeseries ingest runs.
    pub drops: Option<CeilingDrops>,
    /// Report progress while the run lasts: bars on a terminal, a line every few seconds
    /// otherwise (on stderr).
    pub progress: bool,
    /// The Sparse engine's posting ingest and checked searches.
    pub sparse: SparseWork,
    /// The Crdt engine's edits and merges.
    pub crdt: CrdtWork,
}

/// How often the sampler records a [`TimelinePoint`] (it checks budgets every 5 ms).
pub const TIMELINE_STEP: Duration = Duration::from_millis(50);

/// The engines the workload runs, in the order the summary and the picture show them.
pub const ENGINES: [EngineId; 6] = [
    EngineId::Vector,
    EngineId::Timeseries,
    EngineId::Query,
    EngineId::Bridge,
    EngineId::Sparse,
    EngineId::Crdt,
];

/// One instant of the run: every engine's books and arena, the process, the governor.
#[derive(Clone, Debug)]
pub struct TimelinePoint {
    /// Seconds since the run started.
    pub seconds: f64,
    /// Process RSS.
    pub rss: usize,
    /// The ceiling in force.
    pub ceiling: usize,
    /// Global pressure level (0 normal … 3 emergency).
    pub pressure: u8,
    /// Reclaim requests so far, over all engines.
    pub reclaims: u64,
    /// Denials of the Query engine's DataFusion operators so far: each is normally a spill.
    pub spills: u64,
    /// Flushes so far of the timeseries memtables and the Sparse and CRDT write buffers.
    pub flushes: u64,
    /// Per engine in [`ENGINES`] order: reserved bytes, limit, and the arena's allocated
    /// bytes at the monitor's last tick (when jemalloc arenas are in use).
    pub engines: Vec<(EngineId, usize, usize, Option<usize>)>,
}

impl TimelinePoint {
    fn now(governor: &MemoryGovernor, started: Instant, rss: usize, flushes: u64) -> Self {
        let snapshot = governor.snapshot();
        let engines = ENGINES
            .iter()
            .filter_map(|&e| snapshot.engine(e).filter(|s| s.configured))
            .map(|s| {
                (
                    s.engine,
                    s.reserved,
                    s.limit,
                    s.allocation.map(|a| a.allocated),
                )
            })
            .collect();
        Self {
            seconds: started.elapsed().as_secs_f64(),
            rss,
            ceiling: snapshot.ceiling,
            pressure: snapshot.global_pressure as u8,
            reclaims: snapshot.engines.iter().map(|e| e.reclaim_requests).sum(),
            flushes,
            spills: snapshot
                .consumers
                .iter()
                .filter(|c| c.engine == EngineId::Query)
                .map(|c| c.denials)
                .sum(),
            engines,
        }
    }
}

/// Lowering the ceiling mid-run, as an operator resizing the container would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeilingDrops {
    /// The lowered ceiling.
    pub to: usize,
    /// How many drops, spread evenly over the ingest (one: at half time). Each but the last
    /// is undone once its drain ends, so every drop starts from the full ceiling; the last
    /// stays until the run ends.
    pub count: usize,
}

/// One ceiling drop and how the governor got back under it.
#[derive(Clone, Debug)]
pub struct DropRecord {
    /// The ceiling before and after.
    pub from: usize,
    /// The lowered ceiling.
    pub to: usize,
    /// Bytes counted against the ceiling above the new one at the drop.
    pub over: usize,
    /// What the drain reported.
    pub outcome: governor_core::DrainOutcome,
    /// From the drop until the books were under the new ceiling (or the drain gave up).
    pub drain_time: Duration,
}

impl WorkloadConfig {
    /// The demo: a 320 MiB ceiling over work that peaks at about 310 MiB of RSS without a
    /// governor (BENCHMARKS.md has both runs, and a tighter ceiling that was not held).
    pub fn demo() -> Self {
        Self {
            ceiling: mib(320),
            vector_limit: mib(32),
            timeseries_limit: mib(16),
            query_limit: mib(96),
            bridge_limit: mib(96),
            sparse_limit: mib(8),
            crdt_limit: mib(16),
            segments: 16,
            vectors_per_segment: 3_000,
            dim: 64,
            searches: 2_000,
            series: 1_000,
            points_per_series: 4_000,
            batch: 500,
            sql_rows: 3_000_000,
            sql_groups: 1_000_000,
            sql_queries: 4,
            partitions: 2,
            shed_below_floors: true,
            monitor_interval: governor_core::rss_monitor::DEFAULT_RSS_MONITOR_INTERVAL,
            retention: AllocatorRetention::default(),
            ceiling_from_environment: None,
            drops: None,
            progress: false,
            // About 11 MiB of decoded postings under an 8 MiB budget, and 384 documents
            // whose charges add up to more than the 16 MiB Crdt budget: both evict. Both
            // budgets leave room for the engines' allocator drift (up to 4 MiB measured).
            sparse: SparseWork {
                docs: 30_000,
                vocabulary: 20_000,
                terms_per_doc: 24,
                searches: 100,
                k: 10,
                commit_every: 2_000,
                store_cache_bytes: mib(1),
                flush_bytes: mib(1),
            },
            crdt: CrdtWork {
                docs: 384,
                rounds: 12_800,
                commit_every: 200,
                store_cache_bytes: mib(1),
                flush_bytes: 256 * 1024,
            },
        }
    }

    /// The same work with budgets so large that nothing is ever denied: what the process does
    /// without a governor (nothing spills, flushes early or evicts), for comparison.
    #[must_use]
    pub fn ungoverned(self) -> Self {
        let huge = governor_core::gib(64);
        Self {
            // Room for every floor (half of each limit) too.
            ceiling: 4 * huge,
            vector_limit: huge,
            timeseries_limit: huge,
            query_limit: huge,
            bridge_limit: huge,
            sparse_limit: huge,
            crdt_limit: huge,
            ..self
        }
    }

    /// A small run for the test suite (debug builds on 2 cores).
    pub fn small() -> Self {
        Self {
            ceiling: mib(192),
            // Room for the arena's real bytes too: each engine's allocator drift (the HNSW
            // graph's neighbour lists, memtable vectors' spare capacity) is charged to it.
            vector_limit: mib(4),
            timeseries_limit: mib(4),
            query_limit: mib(24),
            bridge_limit: mib(16),
            sparse_limit: mib(3),
            crdt_limit: mib(8),
            segments: 6,
            vectors_per_segment: 400,
            dim: 16,
            searches: 120,
            series: 100,
            points_per_series: 2_000,
            batch: 250,
            sql_rows: 300_000,
            sql_groups: 100_000,
            sql_queries: 2,
            partitions: 2,
            shed_below_floors: true,
            monitor_interval: governor_core::rss_monitor::DEFAULT_RSS_MONITOR_INTERVAL,
            retention: AllocatorRetention::default(),
            ceiling_from_environment: None,
            drops: None,
            progress: false,
            // More documents than the Crdt budget holds (about 36 KiB each), so it evicts;
            // the budgets leave the engines' allocator drift (redb, thread caches of evicted
            // documents) room under their limits.
            sparse: SparseWork {
                docs: 6_000,
                vocabulary: 2_000,
                terms_per_doc: 12,
                searches: 80,
                k: 10,
                commit_every: 500,
                store_cache_bytes: 256 * 1024,
                flush_bytes: 128 * 1024,
            },
            crdt: CrdtWork {
                docs: 256,
                rounds: 2_000,
                commit_every: 50,
                store_cache_bytes: 256 * 1024,
                flush_bytes: 32 * 1024,
            },
        }
    }
}

/// What a run did and saw.
#[derive(Clone, Debug, Default)]
pub struct WorkloadReport {
    /// Searches that returned results.
    pub searches_done: usize,
    /// Points stored by the timeseries engine.
    pub points_ingested: usize,
    /// Points read back equal to what was written.
    pub points_verified: usize,
    /// Times ingest was throttled (and retried: nothing is dropped).
    pub ingest_throttles: usize,
    /// SQL queries that completed with the right number of groups.
    pub queries_done: usize,
    /// Peak process RSS seen by the sampler.
    pub peak_rss: usize,
    /// The kernel's high-water mark of the process's RSS (`VmHWM`) at the end of the run.
    pub kernel_peak_rss: usize,
    /// Peak of everything booked against the ceiling.
    pub peak_booked: usize,
    /// Per engine: (engine, limit, peak grant).
    pub engine_peaks: Vec<(EngineId, usize, usize)>,
    /// Per engine with its own arena: what the allocator says it really held.
    pub engine_allocations: Vec<(EngineId, governor_core::EngineAllocation)>,
    /// What the Sparse engine's part did.
    pub sparse: SparseOutcome,
    /// What the Crdt engine's part did.
    pub crdt: CrdtOutcome,
    /// Invariant breaches the sampler saw, and work that did not complete.
    pub failures: Vec<String>,
    /// Sampler readings.
    pub samples: usize,
    /// Ceiling.
    pub ceiling: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Prometheus text of the final snapshot.
    pub prometheus: String,
    /// What the RSS monitor did: emergencies, reclaims from borrowers and below floors.
    pub monitor: governor_core::RssMonitorStats,
    /// Where the ceiling came from (`configured`, `cgroup_v2`, `cgroup_v1`, `physical`).
    pub ceiling_source: String,
    /// The ceiling in force at the end, and how often it changed during the run.
    pub final_ceiling: usize,
    /// Ceiling changes during the run (drops, restores, a followed container).
    pub ceiling_changes: u64,
    /// Every ceiling drop and its drain.
    pub drops: Vec<DropRecord>,
    /// What the sampler saw every [`TIMELINE_STEP`]: the run's picture.
    pub timeline: Vec<TimelinePoint>,
}

impl WorkloadReport {
    /// The median and 99th percentile (nearest rank) of the drops' drain times.
    pub fn drain_percentiles(&self) -> Option<(Duration, Duration)> {
        let times: Vec<Duration> = self.drops.iter().map(|d| d.drain_time).collect();
        p50_p99(&times)
    }

    /// True when every promise held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "mixed workload in {:.1?}: {} searches, {} points ingested ({} verified, {} throttles retried), {} GROUP BY queries\n\
             peak RSS {} / ceiling {} ({:.0}%; kernel high-water mark {}), peak booked {}, {} samples\n",
            self.elapsed,
            self.searches_done,
            self.points_ingested,
            self.points_verified,
            self.ingest_throttles,
            self.queries_done,
            human_bytes(self.peak_rss),
            human_bytes(self.ceiling),
            self.peak_rss as f64 * 100.0 / self.ceiling as f64,
            human_bytes(self.kernel_peak_rss),
            human_bytes(self.peak_booked),
            self.samples,
        );
        let _ = writeln!(
            s,
            "sparse: {} documents inserted, {} top-k searches equal to brute force ({} refusals retried), {} block misses, {} evictions\n\
             crdt: {} edits and {} remote merges over {} documents read back as written ({} refusals retried, {} evictions)",
            self.sparse.inserted,
            self.sparse.searches_checked,
            self.sparse.refusals,
            self.sparse.block_misses,
            self.sparse.block_evictions,
            self.crdt.edits,
            self.crdt.merges,
            self.crdt.docs_verified,
            self.crdt.refusals,
            self.crdt.evictions,
        );
        let m = &self.monitor;
        let _ = writeln!(
            s,
            "RSS monitor: {} emergencies, {} reclaims from borrowers, {} below floors, {} freed, {} purges, {} allocator decay switches",
            m.emergencies,
            m.reclaims,
            m.floor_reclaims,
            human_bytes(m.reclaimed_bytes),
            m.purges,
            m.retention_switches
        );
        for (engine, limit, peak) in &self.engine_peaks {
            let _ = write!(
                s,
                "  {engine:<10} peak {:>10} of limit {:>10}",
                human_bytes(*peak),
                human_bytes(*limit)
            );
            match self.engine_allocations.iter().find(|(e, _)| e == engine) {
                Some((_, a)) => {
                    let _ = writeln!(
                        s,
                        "; arena: peak allocated {:>10}, drift {} .. {}{}",
                        human_bytes(a.peak_allocated),
                        signed_bytes(a.low_drift),
                        signed_bytes(a.peak_drift),
                        if a.low_drift < 0 {
                            " (negative: its byte model reserves more than it allocates)"
                        } else {
                            ""
                        }
                    );
                }
                None => s.push('\n'),
            }
        }
        let _ = writeln!(
            s,
            "ceiling source: {}, {} changes, {} at the end",
            self.ceiling_source,
            self.ceiling_changes,
            human_bytes(self.final_ceiling)
        );
        for d in &self.drops {
            let _ = writeln!(
                s,
                "ceiling drop {} -> {}: {} over at the drop, drained {} in {:.1?}, still over {}{}",
                human_bytes(d.from),
                human_bytes(d.to),
                human_bytes(d.over),
                human_bytes(d.outcome.drained),
                d.drain_time,
                human_bytes(d.outcome.still_over),
                if d.outcome.timed_out {
                    " (deadline passed)"
                } else {
                    ""
                }
            );
        }
        if let Some((p50, p99)) = self.drain_percentiles() {
            let _ = writeln!(
                s,
                "drop-to-drain over {} drops: p50 {p50:.1?}, p99 {p99:.1?}",
                self.drops.len()
            );
        }
        if self.failures.is_empty() {
            s += "PASS: no engine over budget, RSS within the ceiling, all work completed\n";
        } else {
            s += "FAIL:\n";
            for f in &self.failures {
                let _ = writeln!(s, "  - {f}");
            }
        }
        s
    }
}

/// The median and 99th percentile (nearest rank) of `times`; `None` when there are none.
pub fn p50_p99(times: &[Duration]) -> Option<(Duration, Duration)> {
    if times.is_empty() {
        return None;
    }
    let mut sorted = times.to_vec();
    sorted.sort();
    let n = sorted.len();
    let rank = |q: f64| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some((rank(0.5), rank(0.99)))
}

/// How far above its limit an engine's arena may peak: the allocator is read once per monitor
/// tick, so an engine can allocate past its books for up to one tick before its drift is
/// charged to it, plus jemalloc's thread caches. A tenth of the limit plus 2 MiB.
pub fn allocated_tolerance(limit: usize) -> usize {
    limit / 10 + mib(2)
}

fn signed_bytes(bytes: i64) -> String {
    let magnitude = human_bytes(bytes.unsigned_abs() as usize);
    if bytes < 0 {
        format!("-{magnitude}")
    } else {
        format!("+{magnitude}")
    }
}

/// Deterministic pseudo-random numbers (splitmix64), so every run and every check sees the
/// same data without storing it.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn unit(x: u64) -> f32 {
    (mix(x) >> 40) as f32 / (1u64 << 24) as f32
}

fn vector(seed: u64, dim: usize) -> Vec<f32> {
    (0..dim).map(|i| unit(seed * 1_000 + i as u64)).collect()
}

fn point(series: usize, i: usize) -> Point {
    let ts =
        1_700_000_000_000 + (i as i64) * 1_000 + (mix(series as u64 * 31 + i as u64) % 7) as i64;
    let value =
        ((series * 7 + i) % 1_000) as f64 / 8.0 + f64::from(u8::try_from(i % 3).unwrap_or(0));
    Point::new(ts, value)
}

/// One multi-thread runtime per engine, pinned to the engine's arena
/// ([`MemoryGovernor::engine_runtime_builder`]). Shut down in the background when dropped: the
/// workload drops them from async code, where a blocking shutdown is not allowed.
struct EngineRuntimes {
    /// Vector, Timeseries, Query, Sparse, Crdt; `None` only while being dropped.
    runtimes: [Option<tokio::runtime::Runtime>; 5],
}

impl EngineRuntimes {
    fn new(governor: &MemoryGovernor) -> Result<Self, String> {
        let build = |engine: EngineId, workers: usize| {
            governor
                .engine_runtime_builder(engine)
                .map_err(|e| format!("{engine} runtime: {e}"))?
                .worker_threads(workers)
                .thread_name(format!("{engine}-engine"))
                .enable_all()
                .build()
                .map(Some)
                .map_err(|e| format!("{engine} runtime: {e}"))
        };
        Ok(Self {
            runtimes: [
                build(EngineId::Vector, 1)?,
                build(EngineId::Timeseries, 1)?,
                build(EngineId::Query, 2)?,
                build(EngineId::Sparse, 1)?,
                build(EngineId::Crdt, 1)?,
            ],
        })
    }

    fn get(&self, i: usize) -> &tokio::runtime::Handle {
        self.runtimes[i].as_ref().expect("live until drop").handle()
    }

    fn vector(&self) -> &tokio::runtime::Handle {
        self.get(0)
    }

    fn timeseries(&self) -> &tokio::runtime::Handle {
        self.get(1)
    }

    fn query(&self) -> &tokio::runtime::Handle {
        self.get(2)
    }

    fn sparse(&self) -> &tokio::runtime::Handle {
        self.get(3)
    }

    fn crdt(&self) -> &tokio::runtime::Handle {
        self.get(4)
    }
}

impl Drop for EngineRuntimes {
    fn drop(&mut self) {
        for rt in self.runtimes.iter_mut().filter_map(Option::take) {
            rt.shutdown_background();
        }
    }
}

/// Runs the workload and reports; `Err` only for set-up failures (temp dir, engine start).
pub async fn run(config: WorkloadConfig) -> Result<WorkloadReport, String> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let builder = match config.ceiling_from_environment {
        Some(fraction) => GovernorConfig::builder()
            .ceiling_from_environment(fraction)
            .map_err(|e| format!("ceiling from the environment: {e}"))?,
        None => GovernorConfig::builder().global_ceiling(config.ceiling),
    };
    // Floors: half the limit for the engines that hold state, a quarter for the queries, none
    // for the bridge's input tables.
    let mut builder = builder
        .engine(
            EngineId::Query,
            EngineBudget::new(config.query_limit).with_floor(config.query_limit / 4),
        )
        .engine(EngineId::Bridge, EngineBudget::new(config.bridge_limit));
    for (engine, limit) in [
        (EngineId::Vector, config.vector_limit),
        (EngineId::Timeseries, config.timeseries_limit),
        (EngineId::Sparse, config.sparse_limit),
        (EngineId::Crdt, config.crdt_limit),
    ] {
        builder = builder.engine(engine, EngineBudget::new(limit).with_floor(limit / 2));
    }
    let governor = MemoryGovernor::new(builder.build().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    // From here on the ceiling in force is the governor's (it may have come from the
    // environment); every check below is against it.
    let mut config = config;
    config.ceiling = governor.ceiling();
    // A ceiling from the environment also follows it: a resized container moves the ceiling,
    // and the kernel's pressure and OOM counters reach the governor.
    let _container_watch = match config.ceiling_from_environment {
        Some(fraction) => Some(
            governor
                .follow_container(
                    governor_core::ContainerProbe::new(),
                    governor_core::ContainerWatchConfig {
                        fraction,
                        ..governor_core::ContainerWatchConfig::default()
                    },
                )
                .map_err(|e| format!("following the container: {e}"))?,
        ),
        None => None,
    };
    let monitor = governor
        .start_rss_monitor(
            RssMonitorConfig::default()
                .with_shed_below_floors(config.shed_below_floors)
                .with_interval(config.monitor_interval)
                .with_allocator_retention(config.retention),
        )
        .map_err(|e| format!("RSS monitor: {e}"))?;

    // Each engine on its own runtime whose threads allocate from the engine's jemalloc arena,
    // so the RSS monitor can compare what each engine really allocated with what it reserved.
    let runtimes = EngineRuntimes::new(&governor)?;

    // Work done so far, for the progress reporter and the ceiling drops.
    let counters = Arc::new(crate::progress::Counters::default());
    let _reporter = config.progress.then(|| {
        crate::progress::Reporter::start(
            Arc::clone(&governor),
            Arc::clone(&counters),
            crate::progress::Totals {
                searches: config.searches,
                points: config.series * config.points_per_series,
                queries: config.sql_queries,
                sparse_docs: config.sparse.docs as usize,
                crdt_rounds: config.crdt.rounds as usize,
            },
        )
    });

    // The sampler: every engine's grant against its limit, and real RSS against the ceiling.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let peak_rss = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let timeline = Arc::new(Mutex::new(Vec::<TimelinePoint>::new()));
    let sampler = {
        let (governor, stop, failures, peak_rss, samples, timeline) = (
            governor.clone(),
            stop.clone(),
            failures.clone(),
            peak_rss.clone(),
            samples.clone(),
            timeline.clone(),
        );
        let flushes = Arc::clone(&counters.flushes);
        std::thread::spawn(move || {
            let mut last_point: Option<Instant> = None;
            while !stop.load(Ordering::Acquire) {
                for engine in ENGINES {
                    // The promise the books keep at every instant: live reservations within
                    // the limit. (`granted` also carries the allocator drift charged to the
                    // engine, a measured fact that may pass the limit for a tick; the
                    // arena's peak is checked against the limit at the end.)
                    let (reserved, limit) = (governor.reserved(engine), governor.limit(engine));
                    if reserved > limit {
                        failures.lock().push(format!(
                            "{engine} held {} over its limit {}",
                            human_bytes(reserved),
                            human_bytes(limit)
                        ));
                    }
                }
                let rss = ProcessMemory::query().map_or(0, |p| p.rss);
                peak_rss.fetch_max(rss, Ordering::AcqRel);
                if last_point.is_none_or(|t| t.elapsed() >= TIMELINE_STEP) {
                    last_point = Some(Instant::now());
                    timeline.lock().push(TimelinePoint::now(
                        &governor,
                        started,
                        rss,
                        flushes.load(Ordering::Relaxed),
                    ));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // --- vector engine: build, persist, pin the hot segment --------------------------------
    let cache = Arc::new(
        HnswCache::builder(governor.clone(), dir.path().join("vector"))
            .params(HnswParams::new(config.dim).expected_points(config.vectors_per_segment))
            .build()
            .map_err(|e| format!("HNSW cache: {e}"))?,
    );
    let _pressure_watch = cache.spawn_pressure_watcher().map_err(|e| e.to_string())?;
    let ids: Vec<SegmentId> = (0..config.segments)
        .map(|s| SegmentId::new("docs", s as u32).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    {
        let (cache, ids, cfg) = (cache.clone(), ids.clone(), config.clone());
        runtimes
            .vector()
            .spawn_blocking(move || -> Result<(), String> {
                for (s, id) in ids.iter().enumerate() {
                    cache.create_segment(id).map_err(|e| e.to_string())?;
                    for v in 0..cfg.vectors_per_segment {
                        let seed = (s * cfg.vectors_per_segment + v) as u64;
                        insert_with_retry(&cache, id, v, &vector(seed, cfg.dim))?;
                    }
                    cache.persist(id).map_err(|e| e.to_string())?;
                }
                cache.pin(&ids[0]).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??;
    }

    // --- the three engines at once -----------------------------------------------------
    let searches = {
        let (cache, cfg) = (cache.clone(), config.clone());
        let searched = Arc::clone(&counters.searches);
        runtimes
            .vector()
            .spawn_blocking(move || vector_searches(&cache, &cfg, &searched))
    };
    let progress = Arc::clone(&counters.points);
    let ingest = {
        let (governor, cfg, path, progress, flushes) = (
            governor.clone(),
            config.clone(),
            dir.path().join("timeseries"),
            progress.clone(),
            Arc::clone(&counters.flushes),
        );
        runtimes.timeseries().spawn(async move {
            timeseries_ingest(governor, &cfg, path, &progress, &flushes).await
        })
    };
    let dropper = config.drops.map(|drops| {
        let (governor, progress) = (governor.clone(), progress.clone());
        let total = config.series * config.points_per_series;
        tokio::spawn(async move { drop_ceiling(governor, drops, &progress, total).await })
    });
    let sql = {
        let (governor, cfg, path) = (governor.clone(), config.clone(), dir.path().join("spill"));
        let queried = Arc::clone(&counters.queries);
        runtimes
            .query()
            .spawn(async move { sql_group_by(governor, &cfg, path, &queried).await })
    };
    let sparse = {
        let (governor, work, dir) = (governor.clone(), config.sparse, dir.path().to_owned());
        let done = Arc::clone(&counters.sparse_docs);
        let flushes = Arc::clone(&counters.flushes);
        runtimes.sparse().spawn(async move {
            sparse_ingest_and_search(governor, work, &dir, &done, &flushes).await
        })
    };
    let crdt = {
        let (governor, work, dir) = (governor.clone(), config.crdt, dir.path().to_owned());
        let done = Arc::clone(&counters.crdt_rounds);
        let flushes = Arc::clone(&counters.flushes);
        runtimes
            .crdt()
            .spawn(async move { crdt_edit_and_merge(governor, work, &dir, &done, &flushes).await })
    };
    let mut report = WorkloadReport {
        ceiling: config.ceiling,
        ..WorkloadReport::default()
    };
    match searches.await.map_err(|e| e.to_string())? {
        Ok(done) => report.searches_done = done,
        Err(e) => failures.lock().push(format!("vector search: {e}")),
    }
    match ingest.await.map_err(|e| e.to_string())? {
        Ok((ingested, verified, throttles)) => {
            report.points_ingested = ingested;
            report.points_verified = verified;
            report.ingest_throttles = throttles;
        }
        Err(e) => failures.lock().push(format!("timeseries: {e}")),
    }
    if let Err(e) = sql.await.map_err(|e| e.to_string())? {
        failures.lock().push(format!("sql: {e}"));
    }
    // Counted as each query finishes, so those done before a failing one still count.
    report.queries_done = counters.queries.load(Ordering::Acquire);
    match sparse.await.map_err(|e| e.to_string())? {
        Ok(outcome) => report.sparse = outcome,
        Err(e) => failures.lock().push(format!("sparse: {e}")),
    }
    match crdt.await.map_err(|e| e.to_string())? {
        Ok(outcome) => report.crdt = outcome,
        Err(e) => failures.lock().push(format!("crdt: {e}")),
    }
    if let Some(dropper) = dropper {
        match dropper.await.map_err(|e| e.to_string())? {
            Ok(drops) => report.drops = drops,
            Err(e) => failures.lock().push(format!("ceiling drop: {e}")),
        }
    }
    let environment = governor.environment();
    report.ceiling_source = environment.ceiling_source.to_string();
    report.ceiling_changes = environment.ceiling_changes;
    report.final_ceiling = governor.ceiling();
    stop.store(true, Ordering::Release);
    sampler
        .join()
        .map_err(|_| "sampler thread panicked".to_string())?;
    report.monitor = monitor.stats();
    drop(monitor);

    let expected_points = config.series * config.points_per_series;
    let mut failures = std::mem::take(&mut *failures.lock());
    if report.searches_done != config.searches {
        failures.push(format!(
            "{} of {} searches completed",
            report.searches_done, config.searches
        ));
    }
    if report.points_verified != expected_points {
        failures.push(format!(
            "{} of {expected_points} points read back",
            report.points_verified
        ));
    }
    if report.sparse.searches_checked != config.sparse.searches {
        failures.push(format!(
            "{} of {} sparse searches checked",
            report.sparse.searches_checked, config.sparse.searches
        ));
    }
    if report.crdt.docs_verified != config.crdt.docs {
        failures.push(format!(
            "{} of {} documents read back",
            report.crdt.docs_verified, config.crdt.docs
        ));
    }
    if report.queries_done != config.sql_queries {
        failures.push(format!(
            "{} of {} queries completed",
            report.queries_done, config.sql_queries
        ));
    }
    report.peak_rss = peak_rss.load(Ordering::Acquire);
    // The sampler sees RSS every 5 ms and can miss a spike between two samples; the kernel's
    // high-water mark cannot. It covers the whole process since start, which is this run.
    report.kernel_peak_rss = ProcessMemory::query().map_or(0, |p| p.peak_rss);
    let peak = report.peak_rss.max(report.kernel_peak_rss);
    if peak > config.ceiling {
        failures.push(format!(
            "peak RSS {} (sampler {}, kernel high-water mark {}) above the ceiling {}",
            human_bytes(peak),
            human_bytes(report.peak_rss),
            human_bytes(report.kernel_peak_rss),
            human_bytes(config.ceiling)
        ));
    }
    let snapshot = governor.snapshot();
    report.peak_booked = snapshot.global_peak;
    report.engine_peaks = snapshot
        .engines
        .iter()
        .filter(|e| e.configured)
        .map(|e| (e.engine, e.limit, e.peak))
        .collect();
    for d in &report.drops {
        if d.outcome.still_over > 0 {
            failures.push(format!(
                "after the ceiling drop to {} the books stayed {} over it",
                human_bytes(d.to),
                human_bytes(d.outcome.still_over)
            ));
        }
    }
    report.engine_allocations = snapshot
        .engines
        .iter()
        .filter(|e| e.configured)
        .filter_map(|e| e.allocation.map(|a| (e.engine, a)))
        .collect();
    for (engine, allocation) in &report.engine_allocations {
        let limit = governor.limit(*engine);
        if allocation.peak_allocated > limit + allocated_tolerance(limit) {
            failures.push(format!(
                "{engine}'s arena peaked at {} allocated, over its limit {} + {} tolerance",
                human_bytes(allocation.peak_allocated),
                human_bytes(limit),
                human_bytes(allocated_tolerance(limit))
            ));
        }
    }
    for (engine, limit, peak) in &report.engine_peaks {
        if peak > limit {
            failures.push(format!(
                "{engine} peaked at {} over its limit {}",
                human_bytes(*peak),
                human_bytes(*limit)
            ));
        }
    }
    failures.dedup();
    report.failures = failures;
    report.samples = samples.load(Ordering::Relaxed);
    report.timeline = std::mem::take(&mut *timeline.lock());
    report.prometheus = snapshot.to_prometheus();
    report.elapsed = started.elapsed();
    Ok(report)
}

fn insert_with_retry(
    cache: &HnswCache,
    id: &SegmentId,
    v: usize,
    vector: &[f32],
) -> Result<(), String> {
    for attempt in 0..200 {
        match cache.insert(id, v, vector) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_backpressure() && attempt < 199 => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("insert retries exhausted".into())
}

/// Lowers the ceiling to `drops.to` at evenly spread points of the ingest and measures, for
/// each drop, the time until the books are back under it; every drop but the last is undone
/// once its drain ends.
async fn drop_ceiling(
    governor: Arc<MemoryGovernor>,
    drops: CeilingDrops,
    progress: &AtomicUsize,
    total_points: usize,
) -> Result<Vec<DropRecord>, String> {
    let full = governor.ceiling();
    let mut records = Vec::with_capacity(drops.count);
    for k in 1..=drops.count {
        let mark = total_points * k / (drops.count + 1);
        // Progress is polled, not waited on: it moves every append, and a missed instant
        // only moves the drop by one batch.
        while progress.load(Ordering::Acquire) < mark {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        let mut change = governor.set_ceiling(drops.to).map_err(|e| e.to_string())?;
        let outcome = change.finished().await;
        records.push(DropRecord {
            from: full,
            to: drops.to,
            over: change.over,
            outcome,
            drain_time: started.elapsed(),
        });
        if k < drops.count {
            governor.set_ceiling(full).map_err(|e| e.to_string())?;
        }
    }
    Ok(records)
}

/// Queries per `search_all_batch` call: each cold segment is loaded once per batch, which is
/// how a vector engine with 30 % of its index resident keeps its throughput.
const SEARCH_BATCH: usize = 50;

fn vector_searches(
    cache: &HnswCache,
    cfg: &WorkloadConfig,
    progress: &AtomicUsize,
) -> Result<usize, String> {
    let mut done = 0;
    let queries: Vec<Vec<f32>> = (0..cfg.searches)
        .map(|q| {
            // Queries near stored vectors of every segment, so the cache must load and evict.
            let seed = mix(q as u64) % (cfg.segments * cfg.vectors_per_segment) as u64;
            vector(seed, cfg.dim)
        })
        .collect();
    for (b, batch) in queries.chunks(SEARCH_BATCH).enumerate() {
        let mut attempt = 0;
        loop {
            match cache.search_all_batch(batch, 10, 64) {
                Ok(results) => {
                    if let Some(q) = results.iter().position(Vec::is_empty) {
                        return Err(format!("search {} returned nothing", b * SEARCH_BATCH + q));
                    }
                    done += results.len();
                    progress.store(done, Ordering::Release);
                    break;
                }
                // Another engine's burst can leave no room for a load for a moment: wait, retry.
                Err(e) if e.is_backpressure() && attempt < 200 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("search batch {b}: {e}")),
            }
        }
    }
    Ok(done)
}

async fn timeseries_ingest(
    governor: Arc<MemoryGovernor>,
    cfg: &WorkloadConfig,
    dir: std::path::PathBuf,
    progress: &AtomicUsize,
    flushes: &AtomicU64,
) -> Result<(usize, usize, usize), String> {
    let mut tally = crate::progress::FlushTally::new(flushes);
    let flusher = FileSegmentFlusher::new(&dir).map_err(|e| format!("segment dir: {e}"))?;
    let adapter = TimeseriesAdapter::builder(governor)
        .flusher(Arc::new(flusher))
        .open()
        .await
        .map_err(|e| e.to_string())?;
    let mut ingested = 0;
    let mut throttles = 0;
    for start in (0..cfg.points_per_series).step_by(cfg.batch) {
        let end = (start + cfg.batch).min(cfg.points_per_series);
        for series in 0..cfg.series {
            let batch: Vec<Point> = (start..end).map(|i| point(series, i)).collect();
            let mut rest: &[Point] = &batch;
            while !rest.is_empty() {
                match adapter.append(SeriesId(series as u64), rest).await {
                    Ok(()) => {
                        ingested += rest.len();
                        rest = &[];
                        progress.store(ingested, Ordering::Release);
                        tally.note(adapter.stats().flushes);
                    }
                    Err(e @ timeseries_adapter::IngestError::Throttled { .. }) => {
                        // Lossless backpressure: keep the unstored suffix and try again.
                        throttles += 1;
                        ingested += e.accepted();
                        rest = &rest[e.accepted()..];
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
    let mut verified = 0;
    for series in 0..cfg.series {
        let got = adapter
            .query(SeriesId(series as u64), i64::MIN..=i64::MAX)
            .await
            .map_err(|e| e.to_string())?;
        let exact = got.len() == cfg.points_per_series
            && got.iter().enumerate().all(|(i, p)| {
                *p == point(series, i)
                    || (p.ts == point(series, i).ts
                        && p.value.to_bits() == point(series, i).value.to_bits())
            });
        if !exact {
            return Err(format!(
                "series {series}: read back {} points, not the ones written",
                got.len()
            ));
        }
        verified += got.len();
    }
    Ok((ingested, verified, throttles))
}

/// How many distinct keys `mix(i) % groups` takes for `i < rows`: the groups every `GROUP BY`
/// of the workload must return.
fn distinct_keys(rows: usize, groups: usize) -> usize {
    let mut seen = vec![0u64; groups.div_ceil(64)];
    for i in 0..rows {
        let key = (mix(i as u64) % groups as u64) as usize;
        seen[key / 64] |= 1 << (key % 64);
    }
    seen.iter().map(|w| w.count_ones() as usize).sum()
}

async fn sql_group_by(
    governor: Arc<MemoryGovernor>,
    cfg: &WorkloadConfig,
    spill: std::path::PathBuf,
    progress: &AtomicUsize,
) -> Result<(), String> {
    std::fs::create_dir_all(&spill).map_err(|e| e.to_string())?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Float64, false),
    ]));
    let per_batch = 8_192;
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); cfg.partitions];
    let mut table_token: ReservationToken = governor.charge(EngineId::Bridge, 0);
    // The table is booked on the Bridge engine, so its bytes go to the Bridge arena: built on
    // the Query runtime's thread without this, they would count as the Query engine's drift
    // as well (twice in all).
    let bridge = governor
        .enter_engine(EngineId::Bridge)
        .map_err(|e| e.to_string())?;
    for (b, start) in (0..cfg.sql_rows).step_by(per_batch).enumerate() {
        let end = (start + per_batch).min(cfg.sql_rows);
        let k: Int64Array = (start..end)
            .map(|i| (mix(i as u64) % cfg.sql_groups as u64) as i64)
            .collect();
        let v: Float64Array = (start..end).map(|i| (i % 100) as f64).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(v)])
            .map_err(|e| e.to_string())?;
        // The table is resident input data: booked on the Bridge engine, never exceeding it.
        table_token
            .try_grow(batch.get_array_memory_size())
            .map_err(|e| format!("SQL input does not fit the bridge budget: {e}"))?;
        partitions[b % cfg.partitions].push(batch);
    }
    let table = MemTable::try_new(schema, partitions).map_err(|e| e.to_string())?;
    drop(bridge);
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(governor.pool())
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Directories(vec![spill])),
        )
        .build_arc()
        .map_err(|e| e.to_string())?;
    let session = SessionConfig::new()
        .with_target_partitions(cfg.partitions)
        .with_batch_size(8_192);
    // The memory-safe session: its final aggregates keep headroom for their output phase,
    // which DataFusion 55 cannot spill in (a GROUP BY refused 82 KiB while emitting failed
    // the run at 192 MiB before).
    let ctx = SessionContext::new_with_state(datafusion_pool::memory_safe_state(session, runtime));
    ctx.register_table("t", Arc::new(table))
        .map_err(|e| e.to_string())?;
    // The check's own scratch is nobody's engine memory, yet it counts against the ceiling
    // like any other: one bit per possible key (125 KiB for a million groups), not a sorted
    // copy of every key (24 MiB for three million rows).
    let expected_groups = distinct_keys(cfg.sql_rows, cfg.sql_groups);
    let mut done = 0;
    for q in 0..cfg.sql_queries {
        let sql = if q % 2 == 0 {
            "SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k"
        } else {
            "SELECT k, avg(v) AS a, max(v) AS m FROM t GROUP BY k"
        };
        // Streamed and counted, as a server streams rows to its client: collecting ~1 M
        // groups would hold every result batch at once, tens of MiB that no operator
        // reserved (they showed as the Query arena's drift).
        let run = async {
            let mut stream = ctx.sql(sql).await?.execute_stream().await?;
            let mut rows = 0;
            while let Some(batch) = stream.next().await {
                rows += batch?.num_rows();
            }
            Ok::<_, datafusion::error::DataFusionError>(rows)
        };
        let rows = tokio::time::timeout(Duration::from_mins(10), run)
            .await
            .map_err(|_| format!("query {q} timed out"))?
            .map_err(|e| format!("query {q}: {e}"))?;
        if rows != expected_groups {
            return Err(format!(
                "query {q}: {rows} groups, expected {expected_groups}"
            ));
        }
        done += 1;
        progress.store(done, Ordering::Release);
    }
    Ok(())
}

impl WorkloadReport {
    /// The whole report as JSON, for scripts that compare runs: counts, peaks per engine
    /// (with the arena's figures where there are any), the drops and the failures.
    pub fn to_json(&self) -> serde_json::Value {
        let engines: Vec<serde_json::Value> = self
            .engine_peaks
            .iter()
            .map(|(engine, limit, peak)| {
                let arena = self
                    .engine_allocations
                    .iter()
                    .find(|(e, _)| e == engine)
                    .map(|(_, a)| {
                        serde_json::json!({
                            "peak_allocated": a.peak_allocated,
                            "peak_drift": a.peak_drift,
                            "low_drift": a.low_drift,
                            "alarms": a.alarms,
                        })
                    });
                serde_json::json!({
                    "engine": engine.to_string(),
                    "limit": limit,
                    "peak_reserved": peak,
                    "arena": arena,
                })
            })
            .collect();
        let drops: Vec<serde_json::Value> = self
            .drops
            .iter()
            .map(|d| {
                serde_json::json!({
                    "from": d.from,
                    "to": d.to,
                    "over": d.over,
                    "drained": d.outcome.drained,
                    "still_over": d.outcome.still_over,
                    "timed_out": d.outcome.timed_out,
                    "drain_seconds": d.drain_time.as_secs_f64(),
                })
            })
            .collect();
        serde_json::json!({
            "passed": self.passed(),
            "failures": self.failures,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "searches_done": self.searches_done,
            "points_ingested": self.points_ingested,
            "points_verified": self.points_verified,
            "ingest_throttles": self.ingest_throttles,
            "queries_done": self.queries_done,
            "peak_rss": self.peak_rss,
            "kernel_peak_rss": self.kernel_peak_rss,
            "peak_booked": self.peak_booked,
            "ceiling": self.ceiling,
            "ceiling_source": self.ceiling_source,
            "ceiling_changes": self.ceiling_changes,
            "final_ceiling": self.final_ceiling,
            "samples": self.samples,
            "engines": engines,
            "sparse": {
                "inserted": self.sparse.inserted,
                "searches_checked": self.sparse.searches_checked,
                "refusals": self.sparse.refusals,
                "block_misses": self.sparse.block_misses,
                "block_evictions": self.sparse.block_evictions,
            },
            "crdt": {
                "edits": self.crdt.edits,
                "merges": self.crdt.merges,
                "docs_verified": self.crdt.docs_verified,
                "refusals": self.crdt.refusals,
                "evictions": self.crdt.evictions,
            },
            "drops": drops,
            "timeline": self
                .timeline
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "seconds": p.seconds,
                        "rss": p.rss,
                        "ceiling": p.ceiling,
                        "pressure": p.pressure,
                        "reclaims": p.reclaims,
                        "spills": p.spills,
                        "flushes": p.flushes,
                        "engines": p.engines.iter().map(|(e, reserved, limit, allocated)| {
                            serde_json::json!({
                                "engine": e.to_string(),
                                "reserved": reserved,
                                "limit": limit,
                                "allocated": allocated,
                            })
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect::<Vec<_>>(),
            "monitor": {
                "emergencies": self.monitor.emergencies,
                "reclaims": self.monitor.reclaims,
                "floor_reclaims": self.monitor.floor_reclaims,
                "reclaimed_bytes": self.monitor.reclaimed_bytes,
                "purges": self.monitor.purges,
                "retention_switches": self.monitor.retention_switches,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_counts_what_a_set_counts() {
        for (rows, groups) in [(0, 10), (1, 1), (10_000, 3_000), (5_000, 64), (5_000, 65)] {
            let set: std::collections::BTreeSet<u64> =
                (0..rows).map(|i| mix(i as u64) % groups as u64).collect();
            assert_eq!(
                distinct_keys(rows, groups),
                set.len(),
                "{rows} rows, {groups} groups"
            );
        }
    }
}
