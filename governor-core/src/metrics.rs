//! Metrics: a consistent-enough [`GovernorSnapshot`] of the books, rendered as Prometheus text.
//!
//! The snapshot reads the ledger without stopping it, so under load two figures may be a few
//! operations apart; each single figure is one atomic read. Adapters add their own consumers
//! (DataFusion operators, HNSW segments, memtables) through [`ConsumerStatsSource`].
//!
//! With engine arenas, each engine also carries its allocator truth from the RSS monitor's last
//! reconciliation ([`EngineAllocation`]): bytes allocated and resident in its arena, drift
//! against its reservations, and the drift charged to it. When those figures cannot be had the
//! snapshot says so ([`Reconciliation`]) and the Prometheus text leaves the series out rather
//! than publishing zeros.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::EngineId;
use crate::governor::MemoryGovernor;
use crate::pressure::PressureLevel;
use crate::reconcile::{EngineAllocation, Reconciliation};

/// One engine's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSnapshot {
    /// The engine.
    pub engine: EngineId,
    /// Whether it has a budget.
    pub configured: bool,
    /// Bytes held by live tokens.
    pub reserved: usize,
    /// Bytes granted (tokens plus idle per-thread credit).
    pub granted: usize,
    /// Guaranteed floor.
    pub floor: usize,
    /// Hard limit, as configured (it may be above the ceiling).
    pub limit: usize,
    /// What the engine can hold now: the smaller of `limit` and the ceiling.
    pub effective_limit: usize,
    /// High-water mark of what admissions and charges granted (tokens plus idle credit),
    /// without the allocator drift charged as untracked: at most `limit` unless bytes were
    /// booked past it by `charge`/`force_grow`. The drift's own peak is in `allocation`.
    pub peak: usize,
    /// Bytes held above the floor (borrowed from others' idle floors).
    pub borrowed: usize,
    /// Bytes booked past the limit by `charge`/`force_grow`.
    pub overcommit: usize,
    /// Total bytes ever booked through `charge`/`force_grow`.
    pub forced_bytes: u64,
    /// Denied reservations.
    pub rejections: u64,
    /// Reclaim calls made to this engine's reclaimers.
    pub reclaim_requests: u64,
    /// Bytes its reclaimers reported freed.
    pub reclaimed_bytes: u64,
    /// Reclaim calls that failed, panicked or timed out.
    pub reclaim_failures: u64,
    /// Times one of the engine's reclaimers was quarantined for claims the books did not back.
    pub reclaim_quarantines: u64,
    /// Reclaim calls to the engine's reclaimers after which the books showed memory back.
    pub reclaim_freed: u64,
    /// Reclaim calls that answered but gave back nothing the books could see.
    pub reclaim_empty: u64,
    /// Units of work of this engine aborted (by the ladder, or by their owners).
    pub aborts: u64,
    /// Units of other engines aborted to give this engine its floor back.
    pub aborts_caused: u64,
    /// Bytes async reservations of this engine are waiting for.
    pub waiting_bytes: usize,
    /// Pressure level.
    pub pressure: PressureLevel,
    /// Bytes of allocator drift charged to the engine as untracked (counted in `granted`).
    pub untracked: usize,
    /// The engine arena's figures from the last reconciliation; `None` when the engine has no
    /// arena or figures are unavailable ([`GovernorSnapshot::reconciliation`] says which).
    pub allocation: Option<EngineAllocation>,
}

/// One adapter-level consumer's figures (a DataFusion operator, an HNSW cache, a memtable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSnapshot {
    /// The engine it draws on.
    pub engine: EngineId,
    /// Its name, unique within the engine.
    pub name: String,
    /// Bytes it holds.
    pub reserved: usize,
    /// Its high-water mark.
    pub peak: usize,
    /// How often it was denied (for spilling operators: how often it had to spill).
    pub denials: u64,
    /// Bytes it keeps resident under pressure (HNSW routing layers).
    pub pinned: usize,
}

/// A source of consumer figures, registered by an adapter.
pub trait ConsumerStatsSource: Send + Sync {
    /// The consumers' current figures.
    fn consumers(&self) -> Vec<ConsumerSnapshot>;
}

/// Everything the governor knows, at one moment.
#[derive(Clone, Debug)]
pub struct GovernorSnapshot {
    /// Per configured-or-used engine figures, in [`EngineId::ALL`] order.
    pub engines: Vec<EngineSnapshot>,
    /// Bytes held by live tokens of all engines.
    pub global_reserved: usize,
    /// Untracked memory charged by the RSS monitor.
    pub untracked: usize,
    /// Everything counted against the ceiling (grants plus untracked).
    pub global_granted: usize,
    /// The ceiling.
    pub ceiling: usize,
    /// High-water mark of `global_granted`.
    pub global_peak: usize,
    /// Denials because of the ceiling.
    pub global_rejections: u64,
    /// Process pressure level.
    pub global_pressure: PressureLevel,
    /// Adapter consumers.
    pub consumers: Vec<ConsumerSnapshot>,
    /// NUMA nodes with a row in the books (empty unless the configuration bounds nodes).
    pub numa_nodes: Vec<NumaNodeSnapshot>,
    /// Whether per-engine allocator figures exist, and if not, why.
    pub reconciliation: Reconciliation,
    /// Where the ceiling came from, its changes, and the container's last sample.
    pub environment: crate::environment::EnvironmentSnapshot,
}

/// What all engines hold on one NUMA node, when the configuration bounds nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNodeSnapshot {
    /// The node's OS index.
    pub node: usize,
    /// Bytes held by live tokens on the node.
    pub reserved: usize,
    /// Bytes counted against the node's sub-ceiling: `reserved` plus idle per-thread credit.
    pub granted: usize,
    /// The node's sub-ceiling; `None` for a node counted but bounded only globally.
    pub ceiling: Option<usize>,
}

impl GovernorSnapshot {
    /// The figures of `engine`.
    pub fn engine(&self, engine: EngineId) -> Option<&EngineSnapshot> {
        self.engines.iter().find(|e| e.engine == engine)
    }

    /// The environment's series: the ceiling's source as an info-style gauge, its changes,
    /// and (once the container watch has sampled them) the kernel's charge, PSI and event
    /// counters.
    fn environment_metrics(&self, r: &mut Registry) {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct SourceLabel {
            source: String,
            file: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct EventLabel {
            event: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct StallLabel {
            kind: String,
        }
        let env = &self.environment;
        let source = Family::<SourceLabel, Gauge>::default();
        source
            .get_or_create(&SourceLabel {
                source: env.ceiling_source.label().to_owned(),
                file: env
                    .ceiling_source
                    .path()
                    .map_or_else(String::new, |p| p.display().to_string()),
            })
            .set(1);
        r.register(
            "ceiling_source",
            "Where the ceiling in force came from (1 for the current source)",
            source,
        );
        let changes: Counter = Counter::default();
        changes.inc_by(env.ceiling_changes);
        r.register("ceiling_changes", "Ceiling changes since start", changes);
        let emergencies: Counter = Counter::default();
        emergencies.inc_by(env.emergencies);
        r.register(
            "container_emergencies",
            "Emergencies raised because the kernel's memory limit or OOM counters rose",
            emergencies,
        );
        if let Some(current) = env.memory_current {
            let g: Gauge = Gauge::default();
            g.set(i64::try_from(current).unwrap_or(i64::MAX));
            r.register(
                "container_memory_current_bytes",
                "The kernel's charge for the process's cgroup at the last sample",
                g,
            );
        }
        if let Some(psi) = env.psi {
            let stall = Family::<StallLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
            stall
                .get_or_create(&StallLabel {
                    kind: "some".into(),
                })
                .set(psi.some.avg10);
            if let Some(full) = psi.full {
                stall
                    .get_or_create(&StallLabel {
                        kind: "full".into(),
                    })
                    .set(full.avg10);
            }
            r.register(
                "memory_pressure_stall_avg10_percent",
                "Memory pressure stall information of the cgroup: share of the last 10 s stalled",
                stall,
            );
        }
        if let Some(events) = env.events {
            let family = Family::<EventLabel, Counter>::default();
            for (event, n) in [
                ("low", events.low),
                ("high", events.high),
                ("max", events.max),
                ("oom", events.oom),
                ("oom_kill", events.oom_kill),
            ] {
                family
                    .get_or_create(&EventLabel {
                        event: event.into(),
                    })
                    .inc_by(n);
            }
            r.register(
                "container_memory_events",
                "The cgroup's memory limit and OOM event counters",
                family,
            );
        }
    }

    /// Renders the snapshot in the Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct EngineLabel {
            engine: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct StateLabel {
            state: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct OutcomeLabel {
            engine: String,
            outcome: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct NodeLabel {
            node: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct ConsumerLabel {
            engine: String,
            consumer: String,
        }
        fn as_gauge(value: usize) -> i64 {
            i64::try_from(value).unwrap_or(i64::MAX)
        }
        /// Engines worth a series: configured ones, and any that holds charged memory.
        fn listed(
            snapshot: &GovernorSnapshot,
        ) -> impl Iterator<Item = (EngineLabel, &EngineSnapshot)> {
            snapshot
                .engines
                .iter()
                .filter(|e| e.configured || e.reserved > 0)
                .map(|e| {
                    (
                        EngineLabel {
                            engine: e.engine.to_string(),
                        },
                        e,
                    )
                })
        }
        fn gauge(registry: &mut Registry, name: &str, help: &str, value: usize) {
            let g: Gauge = Gauge::default();
            g.set(as_gauge(value));
            registry.register(name, help, g);
        }
        fn engine_gauge(
            registry: &mut Registry,
            snapshot: &GovernorSnapshot,
            name: &str,
            help: &str,
            value: impl Fn(&EngineSnapshot) -> usize,
        ) {
            let family = Family::<EngineLabel, Gauge>::default();
            for (label, e) in listed(snapshot) {
                family.get_or_create(&label).set(as_gauge(value(e)));
            }
            registry.register(name, help, family);
        }
        /// Per-engine allocator figures, only for engines that have them.
        fn allocation_gauge(
            registry: &mut Registry,
            snapshot: &GovernorSnapshot,
            name: &str,
            help: &str,
            value: impl Fn(&EngineAllocation) -> i64,
        ) {
            let family = Family::<EngineLabel, Gauge>::default();
            for (label, e) in listed(snapshot) {
                if let Some(allocation) = &e.allocation {
                    family.get_or_create(&label).set(value(allocation));
                }
            }
            registry.register(name, help, family);
        }
        fn engine_counter(
            registry: &mut Registry,
            snapshot: &GovernorSnapshot,
            name: &str,
            help: &str,
            value: impl Fn(&EngineSnapshot) -> u64,
        ) {
            let family = Family::<EngineLabel, Counter>::default();
            for (label, e) in listed(snapshot) {
                family.get_or_create(&label).inc_by(value(e));
            }
            registry.register(name, help, family);
        }
        fn consumer_gauge(
            registry: &mut Registry,
            snapshot: &GovernorSnapshot,
            name: &str,
            help: &str,
            value: impl Fn(&ConsumerSnapshot) -> usize,
        ) {
            let family = Family::<ConsumerLabel, Gauge>::default();
            for c in &snapshot.consumers {
                family
                    .get_or_create(&ConsumerLabel {
                        engine: c.engine.to_string(),
                        consumer: c.name.clone(),
                    })
                    .set(as_gauge(value(c)));
            }
            registry.register(name, help, family);
        }

        let mut registry = Registry::with_prefix("memgov");
        let r = &mut registry;
        gauge(r, "ceiling_bytes", "Global memory ceiling", self.ceiling);
        gauge(
            r,
            "reserved_bytes",
            "Bytes held by live reservations of all engines",
            self.global_reserved,
        );
        gauge(
            r,
            "untracked_bytes",
            "Resident memory outside any reservation, charged against the ceiling",
            self.untracked,
        );
        gauge(
            r,
            "granted_bytes",
            "Bytes counted against the ceiling",
            self.global_granted,
        );
        gauge(
            r,
            "peak_bytes",
            "High-water mark of bytes counted against the ceiling",
            self.global_peak,
        );
        gauge(
            r,
            "pressure_level",
            "Global pressure: 0 normal, 1 warning, 2 critical, 3 emergency",
            self.global_pressure as usize,
        );
        self.environment_metrics(r);
        if !self.numa_nodes.is_empty() {
            let reserved = Family::<NodeLabel, Gauge>::default();
            let ceiling = Family::<NodeLabel, Gauge>::default();
            for n in &self.numa_nodes {
                let label = NodeLabel {
                    node: n.node.to_string(),
                };
                reserved.get_or_create(&label).set(as_gauge(n.reserved));
                if let Some(bytes) = n.ceiling {
                    ceiling.get_or_create(&label).set(as_gauge(bytes));
                }
            }
            r.register(
                "numa_node_reserved_bytes",
                "Bytes held by live reservations on the NUMA node",
                reserved,
            );
            r.register(
                "numa_node_ceiling_bytes",
                "The NUMA node's sub-ceiling",
                ceiling,
            );
        }
        let c: Counter = Counter::default();
        c.inc_by(self.global_rejections);
        r.register(
            "ceiling_rejections",
            "Reservations denied by the global ceiling",
            c,
        );
        engine_gauge(
            r,
            self,
            "engine_reserved_bytes",
            "Bytes held by the engine's live reservations",
            |e| e.reserved,
        );
        engine_gauge(
            r,
            self,
            "engine_limit_bytes",
            "The engine's hard limit",
            |e| e.limit,
        );
        engine_gauge(
            r,
            self,
            "engine_floor_bytes",
            "The engine's guaranteed floor",
            |e| e.floor,
        );
        engine_gauge(
            r,
            self,
            "engine_peak_bytes",
            "High-water mark of the engine's grant",
            |e| e.peak,
        );
        engine_gauge(
            r,
            self,
            "engine_borrowed_bytes",
            "Bytes held above the floor",
            |e| e.borrowed,
        );
        engine_gauge(
            r,
            self,
            "engine_overcommit_bytes",
            "Bytes booked past the limit",
            |e| e.overcommit,
        );
        engine_gauge(
            r,
            self,
            "engine_waiting_bytes",
            "Bytes async reservations are waiting for",
            |e| e.waiting_bytes,
        );
        engine_gauge(
            r,
            self,
            "engine_pressure_level",
            "Engine pressure: 0 normal .. 3 emergency",
            |e| e.pressure as usize,
        );
        engine_counter(r, self, "engine_rejections", "Denied reservations", |e| {
            e.rejections
        });
        engine_counter(
            r,
            self,
            "engine_reclaim_requests",
            "Reclaim calls to the engine's reclaimers",
            |e| e.reclaim_requests,
        );
        engine_counter(
            r,
            self,
            "engine_reclaimed_bytes",
            "Bytes the engine's books show its reclaimers freed (not what they claimed)",
            |e| e.reclaimed_bytes,
        );
        engine_counter(
            r,
            self,
            "engine_reclaim_failures",
            "Reclaim calls that failed, panicked or timed out",
            |e| e.reclaim_failures,
        );
        engine_counter(
            r,
            self,
            "engine_reclaim_quarantines",
            "Times a reclaimer was quarantined for claims the books did not back",
            |e| e.reclaim_quarantines,
        );
        let outcomes = Family::<OutcomeLabel, Counter>::default();
        for (label, e) in listed(self) {
            for (outcome, value) in [
                ("freed", e.reclaim_freed),
                ("nothing", e.reclaim_empty),
                ("failed", e.reclaim_failures),
            ] {
                outcomes
                    .get_or_create(&OutcomeLabel {
                        engine: label.engine.clone(),
                        outcome: outcome.into(),
                    })
                    .inc_by(value);
            }
        }
        r.register(
            "engine_reclaim_outcomes",
            "Reclaim calls to the engine's reclaimers by outcome: freed (the books saw memory back), \
             nothing (answered, nothing came back), failed (error, panic, timeout, skipped)",
            outcomes,
        );
        engine_counter(
            r,
            self,
            "engine_aborts",
            "Units of work of the engine aborted (by the ladder or their owners)",
            |e| e.aborts,
        );
        engine_counter(
            r,
            self,
            "engine_aborts_caused",
            "Units of other engines aborted to give this engine its floor back",
            |e| e.aborts_caused,
        );
        engine_counter(
            r,
            self,
            "engine_forced_bytes",
            "Bytes booked without admission (resident memory)",
            |e| e.forced_bytes,
        );
        engine_gauge(
            r,
            self,
            "engine_untracked_bytes",
            "Allocator drift charged to the engine against its limit",
            |e| e.untracked,
        );
        let state = Family::<StateLabel, Gauge>::default();
        for candidate in ["not_running", "unavailable", "active"] {
            let value = i64::from(self.reconciliation.label() == candidate);
            state
                .get_or_create(&StateLabel {
                    state: candidate.into(),
                })
                .set(value);
        }
        r.register(
            "engine_reconciliation",
            "1 for the state of the per-engine allocator reconciliation (not_running, unavailable, active)",
            state,
        );
        if self.engines.iter().any(|e| e.allocation.is_some()) {
            allocation_gauge(
                r,
                self,
                "engine_allocated_bytes",
                "Bytes in live objects of the engine's jemalloc arena",
                |a| as_gauge(a.allocated),
            );
            allocation_gauge(
                r,
                self,
                "engine_resident_bytes",
                "Resident bytes of the engine's jemalloc arena",
                |a| as_gauge(a.resident),
            );
            allocation_gauge(
                r,
                self,
                "engine_drift_bytes",
                "Arena allocated minus reserved (negative: reserved more than allocated)",
                |a| a.drift,
            );
            allocation_gauge(
                r,
                self,
                "engine_peak_drift_bytes",
                "Highest drift seen",
                |a| a.peak_drift,
            );
            allocation_gauge(
                r,
                self,
                "engine_peak_allocated_bytes",
                "Highest arena allocated seen",
                |a| as_gauge(a.peak_allocated),
            );
            let alarms = Family::<EngineLabel, Counter>::default();
            for (label, e) in listed(self) {
                if let Some(a) = &e.allocation {
                    alarms.get_or_create(&label).inc_by(a.alarms);
                }
            }
            r.register(
                "engine_drift_alarms",
                "Times the engine's drift passed the alarm fraction of its limit",
                alarms,
            );
        }
        consumer_gauge(
            r,
            self,
            "consumer_reserved_bytes",
            "Bytes held by one consumer",
            |c| c.reserved,
        );
        consumer_gauge(
            r,
            self,
            "consumer_peak_bytes",
            "High-water mark of one consumer",
            |c| c.peak,
        );
        consumer_gauge(
            r,
            self,
            "consumer_pinned_bytes",
            "Bytes one consumer keeps resident under pressure",
            |c| c.pinned,
        );
        consumer_gauge(
            r,
            self,
            "consumer_denials",
            "Times one consumer was denied (spilled)",
            |c| c.denials as usize,
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The registered consumer-stats sources.
#[derive(Default)]
pub(crate) struct StatsRegistry {
    sources: Mutex<Vec<(u64, Arc<dyn ConsumerStatsSource>)>>,
    next_id: AtomicU64,
}

/// Keeps a stats source registered; dropping it unregisters.
#[must_use = "dropping the handle unregisters the stats source"]
pub struct StatsSourceHandle {
    governor: Weak<MemoryGovernor>,
    id: u64,
}

impl Drop for StatsSourceHandle {
    fn drop(&mut self) {
        if let Some(governor) = self.governor.upgrade() {
            governor
                .consumer_stats
                .sources
                .lock()
                .retain(|(id, _)| *id != self.id);
        }
    }
}

impl std::fmt::Debug for StatsSourceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsSourceHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MemoryGovernor {
    /// Publishes an adapter's consumers in every snapshot while the handle lives.
    pub fn register_consumer_stats(
        self: &Arc<Self>,
        source: Arc<dyn ConsumerStatsSource>,
    ) -> StatsSourceHandle {
        let id = self.consumer_stats.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumer_stats.sources.lock().push((id, source));
        StatsSourceHandle {
            governor: Arc::downgrade(self),
            id,
        }
    }

    /// The current figures of every engine and consumer.
    pub fn snapshot(&self) -> GovernorSnapshot {
        let engines = EngineId::ALL
            .iter()
            .map(|&engine| {
                let c = &self.books.counters[engine.index()];
                let limit = self.limit(engine);
                let granted = self.granted(engine);
                EngineSnapshot {
                    engine,
                    configured: self.is_configured(engine),
                    reserved: self.reserved(engine),
                    granted,
                    floor: self.floor(engine),
                    limit,
                    effective_limit: self.effective_limit(engine),
                    peak: self.row(engine).peak(),
                    borrowed: self.borrowed(engine),
                    overcommit: granted.saturating_sub(limit),
                    forced_bytes: c.forced_bytes.load(Ordering::Relaxed),
                    rejections: c.rejections.load(Ordering::Relaxed),
                    reclaim_requests: c.reclaim_requests.load(Ordering::Relaxed),
                    reclaimed_bytes: c.reclaimed_bytes.load(Ordering::Relaxed),
                    reclaim_failures: c.reclaim_failures.load(Ordering::Relaxed),
                    reclaim_quarantines: c.reclaim_quarantines.load(Ordering::Relaxed),
                    reclaim_freed: c.reclaim_freed.load(Ordering::Relaxed),
                    reclaim_empty: c.reclaim_empty.load(Ordering::Relaxed),
                    aborts: c.aborts.load(Ordering::Relaxed),
                    aborts_caused: c.aborts_caused.load(Ordering::Relaxed),
                    waiting_bytes: c.waiting_bytes.load(Ordering::Relaxed),
                    pressure: self.engine_pressure(engine),
                    untracked: self.engine_untracked(engine),
                    allocation: self.engine_allocation(engine),
                }
            })
            .collect();
        // Collect the sources first: a source may take its own locks, never while we hold ours.
        let sources: Vec<_> = self
            .consumer_stats
            .sources
            .lock()
            .iter()
            .map(|(_, s)| Arc::clone(s))
            .collect();
        let consumers = sources.iter().flat_map(|s| s.consumers()).collect();
        GovernorSnapshot {
            engines,
            global_reserved: self.global_reserved(),
            untracked: self.untracked(),
            global_granted: self.books.ledger.global(),
            ceiling: self.ceiling(),
            global_peak: self.books.ledger.global_peak(),
            global_rejections: self.books.global_rejections.load(Ordering::Relaxed),
            global_pressure: self.global_pressure(),
            consumers,
            numa_nodes: self.books.nodes.as_ref().map_or_else(Vec::new, |nodes| {
                nodes
                    .nodes()
                    .map(|node| NumaNodeSnapshot {
                        node,
                        reserved: nodes.held(node),
                        granted: nodes.granted(node),
                        ceiling: Some(nodes.ceiling(node)).filter(|&c| c != usize::MAX),
                    })
                    .collect()
            }),
            reconciliation: self.reconciliation(),
            environment: self.environment(),
        }
    }
}
