//! Vector engine memory on the governor: HNSW graphs that reserve before they allocate, and a
//! byte-budgeted cache of graph segments that keeps its hot ones.
//!
//! # The problem
//!
//! The vector engine keeps HNSW graphs, with their vectors, in memory. Two things must hold
//! at once: the engine never grows past its [`EngineId::Vector`](governor_core::EngineId)
//! budget, and a burst elsewhere (a flush, a big query) must not push out the data every
//! search needs. So the graphs are cut into *segments* (one per collection shard), each
//! accounted byte for byte, persisted on disk, and loaded only while there is budget.
//!
//! ```text
//!                      search / insert
//!                            │
//!                 ┌──────────▼───────────┐   reserve first    ┌──────────────────┐
//!                 │      HnswCache       │───────────────────▶│  MemoryGovernor  │
//!                 │  LRU over segments   │◀── reclaim(N) ─────│  Vector budget   │
//!                 │  pinned = hot        │◀── pressure watch ─│  global ceiling  │
//!                 └──┬───────┬───────┬───┘── consumer stats ─▶└──────────────────┘
//!        resident:   │       │       │   cold:
//!   ┌────────────────▼┐ ┌────▼──────┐ │  ┌─────────────────────────────┐
//!   │ GovernedHnsw    │ │ Governed… │ └─▶│ dir/coll.3.manifest.json     │ hnsw_rs dump
//!   │ hnsw_rs graph   │ │ (pinned)  │    │ dir/coll.3.g7.hnsw.{graph,data}│ + our manifest
//!   │ ReservationToken│ │  token    │    └─────────────────────────────┘
//!   └─────────────────┘ └───────────┘
//! ```
//!
//! # Accounting: reserve, then allocate
//!
//! [`GovernedHnsw`] owns one `hnsw_rs` graph and one
//! [`ReservationToken`](governor_core::ReservationToken). Before an insert it grows the token
//! by an upper bound of what the point will keep (its vector, its `Arc`s, its neighbour
//! lists at the worst level the layer generator may draw, and the doubling of the layer
//! table if it is full); after the insert it reads back the level actually drawn and returns
//! the surplus. If the token cannot grow, the insert fails with
//! [`HnswError::Backpressure`] having allocated nothing. The byte model lives in
//! [`layout`], derived from `hnsw_rs`'s real structures and jemalloc's size classes, and a
//! test compares it with jemalloc's `stats.allocated`: a graph built by inserts is charged
//! about 1.7× what it allocates (every neighbour list at its worst capacity, so later
//! reverse edges never outgrow the books); once persisted and reloaded it is charged its
//! exact size (1.00×), so evicting a freshly built segment returns the difference.
//!
//! # The cache
//!
//! [`HnswCache`] holds many segments under the Vector budget:
//! - **Load on demand.** A search of a cold segment reserves the segment's resident size
//!   *plus* the loader's peak (both stored in its checksummed manifest at dump time, and
//!   checked against what a graph of that shape can take), evicting colder segments until
//!   the governor grants it; then loads; then books what the loaded graph measures and
//!   returns the rest. A damaged manifest leaves its segment listed as damaged
//!   ([`HnswCache::damaged`]) and every other segment served (see [`store`]).
//!   If even evicting every cold segment is not enough, it fails with
//!   [`HnswError::NoRoom`]; it never loads over budget.
//! - **Evict coldest first.** Least recently used, unpinned first. Triggered by a load or
//!   insert that needs room, by pressure (a watcher task follows the governor's global and
//!   Vector channels, see [`PressurePolicy`]), and by the governor's reclaim: the cache is
//!   the Vector engine's [`Reclaimer`](governor_core::Reclaimer).
//! - **Hot segments pinned.** `hnsw_rs` keeps a point's upper-layer links inside the same
//!   `Point` as its layer-0 links, and a search walks from the upper layers straight into
//!   layer 0 of the same objects, so the routing layers cannot be kept without the rest of
//!   the graph. We therefore pin whole segments marked hot ([`HnswCache::pin`]): they stay
//!   through Warning and Critical pressure and reclaims, and in a global Emergency go last,
//!   one at a time, only while the Emergency lasts. Pinned bytes are published in the
//!   governor's snapshots (`ConsumerSnapshot::pinned`).
//!
//! # Why `hnsw_rs`, and why not `moka`
//!
//! `hnsw_rs` (0.3) builds incrementally (`insert` one point at a time: each insert can be
//! reserved on its own), searches concurrently, and has its own dump/reload format
//! (`hnswio`). `instant-distance` only builds a whole index from a batch, so an insert
//! could not be admitted point by point, and it has no reload short of serde of the whole
//! structure. `hnsw_rs`'s weak spots are handled here: its loader borrows itself (kept
//! together with [`self_cell`]), and it asserts or exits on damaged files (we verify CRC-32s
//! from our manifest before it reads a byte).
//!
//! A `moka` cache was considered: it is byte-weighted and has an eviction listener, but its
//! capacity is fixed at build time while ours is whatever the governor grants at the moment
//! (it shrinks when other engines borrow), its admission policy may refuse to keep a
//! segment we just loaded for a search, it cannot be asked to "evict N bytes now, coldest
//! first, except these" (what reclaim needs, with an exact count of bytes freed), and it
//! has no notion of pinned entries. The governor already is the capacity authority, so the
//! cache only needs an ordering: a last-access clock per segment, sorted at eviction time
//! (segments number in the hundreds, not millions).
//!
//! # Limits
//!
//! Vectors are `f32` under L2 distance. Search scratch space (heaps of `ef` entries) is
//! transient and not reserved; nor are the few kilobytes a dump allocates while it writes.
//! Eviction of a changed segment writes it to disk first, inline.

pub mod cache;
pub mod error;
pub mod layout;
pub mod segment;
pub mod store;

pub use cache::{CacheStats, HnswCache, HnswCacheBuilder, PressurePolicy};
pub use error::HnswError;
pub use segment::{GovernedHnsw, HnswParams, SearchHit, SegmentId};
pub use store::SegmentManifest;
