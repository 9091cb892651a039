//! # governor-core: one memory budget for a process of many engines
//!
//! A database process that runs a SQL engine, a vector index, a timeseries store and more has
//! one pool of RAM and no referee: a large `GROUP BY` grows until the kernel kills the process,
//! a timeseries flush pushes the vector index's hot layers out. The [`MemoryGovernor`] is that
//! referee. Every engine ([`EngineId`]) gets a *budget* — a hard **limit** and a guaranteed
//! **floor** — under one global **ceiling**, and every byte an engine wants to hold is first
//! reserved through the governor.
//!
//! ```text
//!             ┌─────────────────────── ceiling (e.g. 8 GiB) ────────────────────────┐
//!   ledger    │ vector ███████░░░ │ timeseries ████░░ │ query ██████████▒▒▒▒ │ free │
//!             └───────────────────────────────────────────────────────────────────────┘
//!                  █ reserved within floor   ░ idle floor (lendable)   ▒ borrowed
//!
//!   adapters ──try_reserve/reserve/charge──▶ MemoryGovernor ──▶ ledger (atomics, loom-checked)
//!      ▲                                          │
//!      └────── Reclaimer::reclaim(target) ◀───────┘  (spill / flush / evict, largest borrower first)
//! ```
//!
//! ## The ledger and admission
//!
//! Admission is a pair of compare-and-swaps, each against its own bound: the engine's room
//! under its limit, then the room under the global ceiling (rolled back if the ceiling says
//! no). Because each counter is only ever raised by a CAS that checks it, two invariants hold
//! at *every instant*, under any interleaving of threads: **Σ reserved ≤ ceiling** and, for
//! every engine, **reserved ≤ limit**. Small reservations are served from per-thread *credit*
//! (a quantum of bytes granted ahead), so the hot path is one uncontended atomic, as cheap as
//! DataFusion's `GreedyMemoryPool`, and scales with threads. See the `ledger` module; a loom
//! model checks it. To check the first invariant from outside while others reserve, read
//! [`MemoryGovernor::global_reserved`]: it starts from the one global counter admission
//! checks, whereas adding up each engine's [`reserved`](MemoryGovernor::reserved) reads the
//! engines at different instants and can see a total that never existed.
//!
//! A reservation is a [`ReservationToken`]: RAII, so dropping it gives the bytes back; it can
//! grow, shrink, split and merge but never release more than it holds. A token keeps the
//! governor's *books* (ledger, counters, pressure) alive, not the whole governor, and does so
//! without touching a shared reference count: the count it owns is parked in its thread's
//! shard word, in the same CAS that moves its bytes (the `handle` and `ledger` modules), so
//! `try_reserve` + drop is two atomic operations on a line no other thread writes. Memory that already
//! exists (loaded at start-up, replayed from the WAL) is booked with
//! [`MemoryGovernor::charge`], which is never refused for lack of room and shows any excess as
//! overcommit. Every size is bounded by [`MAX_BYTES`] (1 EiB): a configuration or request
//! beyond it is refused with a typed error instead of overflowing the ledger's arithmetic, and
//! a request larger than its engine's limit, the ceiling or its node's sub-ceiling is refused
//! at once, without touching the ledger and without waiting.
//!
//! ## Lending and reclaim
//!
//! Limits may add up to more than the ceiling: that is how idle memory is lent. An engine may
//! grow past its floor, up to its limit, while the ceiling has room — it borrows other engines'
//! idle floors. When an engine *below its floor* is refused because others borrowed, the
//! governor asks the borrowers, largest borrowing first, to give memory back through the
//! [`Reclaimer`] they registered (a DataFusion sort spills, a memtable flushes, the HNSW cache
//! evicts cold segments). Synchronous callers are refused at once so they can spill;
//! [`MemoryGovernor::reserve`] callers wait, bounded by a timeout, while the reclaim runs. Reclaimers
//! are treated as hostile: each call runs on a thread of its own and is abandoned at the
//! reclaim timeout, so one that errors, panics, blocks its thread or never returns is reported
//! and skipped and cannot wedge the governor; a step is credited with what the books show came
//! back, not what the reclaimer claims, and a reclaimer whose claims the books keep refuting is
//! quarantined (the `reclaim` module). The `rebalance` module states the policy and runs it on a
//! timer.
//!
//! ## When reclaim is not enough: aborting work
//!
//! A floor is a guarantee, and lending it is only safe if it always comes back. A borrower that
//! never calls the governor again (an operator gone quiet) or cannot spill (a hash-join build)
//! defeats reclaim, so units of work that may be stopped register with
//! [`MemoryGovernor::register_work`] (a query, a bulk ingest, an index build: engine,
//! priority, redo cost, abort callback). When a `reserve` *entitled* to memory — within its
//! engine's floor, lent out — still waits after reclaim had its chance, the governor aborts the
//! best victim: later reservations of that unit fail with [`MemError::Aborted`] and its owner
//! is told to drop its memory (the `work` and `ladder` modules). The victim is chosen by a
//! cost-aware formula (the `victim` module): one abort that frees enough, lowest priority,
//! least work lost, never a floor from its owner, never state that cannot be rebuilt. A request
//! past its floor never aborts anything. Timeouts and aborts carry a [`Story`]: who holds what,
//! who borrowed from whom, the reclaims tried and the victim's score (the `story` module).
//!
//! ## Pressure
//!
//! Each engine and the process have a [`PressureLevel`] (Normal, Warning, Critical, Emergency
//! at 70/85/95 % by default). Adapters subscribe to changes and act: flush at Warning, throttle
//! at Critical, shed at Emergency. [`SpillController`] gives consumers hysteresis.
//!
//! ## Truth from the allocator
//!
//! Reservations are promises, not RSS. The `alloc` module reads jemalloc's and the kernel's
//! figures; the `rss_monitor` charges the gap between real resident memory and Σ reserved to an
//! *untracked* account, so the room for reservations shrinks when memory leaks out of the
//! books; at Emergency it purges jemalloc and reclaims from borrowers, and if that is not
//! enough, from every holder below its floor too (floors protect an engine from other
//! engines, not from the process passing its ceiling). Near the ceiling it also has jemalloc
//! return freed pages at once rather than keep them for reuse (the `retention` module). With
//! one jemalloc arena per engine
//! ([`MemoryGovernor::engine_runtime_builder`], [`MemoryGovernor::enter_engine`]) the monitor
//! also reconciles each engine's books with its arena and charges an engine's own drift to
//! that engine alone (the `reconcile` module). The `numa` module places threads and
//! arenas on NUMA nodes, and optional per-node sub-ceilings bound what all engines together
//! hold on each node (the `node` module says which node a reservation counts against).
//!
//! ## Example
//!
//! ```
//! use governor_core::{EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, mib};
//!
//! let config = GovernorConfig::builder()
//!     .global_ceiling(mib(100))
//!     .engine(EngineId::Query, EngineBudget::new(mib(80)).with_floor(mib(20)))
//!     .engine(EngineId::Timeseries, EngineBudget::new(mib(60)).with_floor(mib(40)))
//!     .build()?;
//! let governor = MemoryGovernor::new(config)?;
//!
//! // The query borrows the timeseries engine's idle floor...
//! let query = governor.try_reserve(EngineId::Query, mib(70))?;
//! assert_eq!(governor.borrowed(EngineId::Query), mib(50));
//! // ...so the ceiling, not the timeseries budget, refuses this one, and names who holds it.
//! let err = governor.try_reserve(EngineId::Timeseries, mib(40)).unwrap_err();
//! assert!(matches!(err, MemError::GlobalCeilingExceeded { .. }));
//! assert!(err.to_string().contains("query 70.0 MiB"));
//! drop(query);
//! assert!(governor.try_reserve(EngineId::Timeseries, mib(40)).is_ok());
//! # Ok::<(), MemError>(())
//! ```

pub mod alloc;
mod books;
pub mod ceiling;
mod config;
pub mod container;
pub mod container_watch;
mod engine;
mod engine_arena;
pub mod environment;
mod error;
mod governor;
mod handle;
mod ladder;
mod ledger;
mod loom;
pub mod metrics;
pub mod node;
#[cfg(feature = "numa")]
pub mod numa;
pub mod pressure;
pub mod rebalance;
pub mod reclaim;
pub mod reconcile;
mod reservation;
pub mod retention;
pub mod rss_monitor;
pub mod spill;
pub mod story;
pub mod victim;
mod work;

pub use ceiling::{CeilingChange, CeilingMisfit, CeilingPolicy, DrainOutcome};
pub use config::{
    DEFAULT_ABORT_AFTER, DEFAULT_RECLAIM_TIMEOUT, DEFAULT_VICTIM_WAIT, EngineBudget,
    GovernorConfig, GovernorConfigBuilder, MAX_BYTES, MAX_NUMA_NODES, MAX_RECLAIM_TIMEOUT,
    MAX_SHARDS, PressureThresholds,
};
pub use container::{
    CeilingSource, ContainerFollower, ContainerProbe, ContainerSample, FollowerSettings,
    MemoryEvents, MemoryLimit, Psi,
};
pub use container_watch::{ContainerWatchConfig, ContainerWatchHandle, ContainerWatchStats};
pub use engine::{EngineId, gib, human_bytes, kib, mib};
pub use environment::EnvironmentSnapshot;
pub use error::{Holders, MemError};
pub use governor::MemoryGovernor;
pub use metrics::{
    ConsumerSnapshot, ConsumerStatsSource, EngineSnapshot, GovernorSnapshot, NumaNodeSnapshot,
    StatsSourceHandle,
};
pub use node::{set_thread_numa_node, thread_numa_node};
pub use pressure::PressureLevel;
pub use rebalance::{MAX_REBALANCE_INTERVAL, RebalancePolicy, RebalanceReport, RebalancerHandle};
pub use reclaim::{
    ReclaimError, ReclaimOutcome, ReclaimScope, ReclaimStep, Reclaimer, ReclaimerHandle,
};
pub use reservation::ReservationToken;
pub use spill::{SpillAction, SpillConfig, SpillController};
pub use story::{EngineLine, HISTORY_CAPACITY, ReclaimRecord, Story};
pub use victim::VictimChoice;
pub use work::{DEFAULT_PRIORITY, UnitToken, WorkHandle, WorkRef, WorkSpec};

// --- allocator & NUMA (issue 6) ---
pub use alloc::{
    CollectionArenaRegistry, CollectionKey, EngineGuard, SystemMemoryStats, current_thread_arena,
    pin_thread_arena,
};
#[cfg(feature = "numa")]
pub use numa::{NumaCeilings, NumaTopology, bind_thread_to_local_numa};
pub use reconcile::{EngineAllocation, Reconciliation};
pub use rss_monitor::{RssMonitorConfig, RssMonitorHandle, RssMonitorStats};
