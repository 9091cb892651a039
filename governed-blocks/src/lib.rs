//! Building blocks for engine adapters on the governor: a byte-weighted reclaimable cache
//! and a governed write buffer.
//!
//! # The problem
//!
//! Every engine adapter needs the same two things. A *read side*: values it can rebuild
//! from its store (posting blocks, documents, graph segments) kept in memory while the
//! engine's budget allows, dropped coldest first when it does not, persisted first when
//! they changed. A *write side*: new data collected in memory until a batch is worth a
//! store transaction, without growing past the budget, without losing data when the store
//! fails. Written once, here, they follow the governor's rules the same way in every
//! engine: reserve before allocating, give memory back when asked, say who holds what.
//!
//! ```text
//!              adapter (sparse-adapter, crdt-adapter)
//!      reads ──▶ GovernedCache<K, V>          writes ──▶ GovernedWriteBuffer<T>
//!                 │ one token per entry                   │ one token, grown by chunks
//!                 │ LRU, pins, EvictionHook               │ BatchSink::write(batch)
//!                 ▼                                       ▼
//!      ┌─────────────────────── MemoryGovernor (one engine's budget) ──────────────┐
//!      │ try_reserve / reserve().await · pressure channels · reclaim → both blocks │
//!      └────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! * [`GovernedCache`]: each entry reserves its bytes before it is built and holds them
//!   while resident, so the engine's books always equal the sum of resident entries. A
//!   denied reservation evicts least recently used unpinned entries, as do pressure (see
//!   [`ShedPolicy`]) and the governor's reclaim (the cache is a
//!   [`Reclaimer`](governor_core::Reclaimer)). An [`EvictionHook`] runs before an entry is
//!   dropped and may persist it; if it fails, the entry stays.
//! * [`GovernedWriteBuffer`]: appends draw on a reservation taken a chunk at a time; a
//!   flush hands a batch to a [`BatchSink`] and gives its bytes back only once the sink
//!   has made it durable. It flushes at a size threshold and at Warning pressure, makes
//!   appends wait (bounded) at Critical, and keeps a failed batch, readable, for the next
//!   flush. A reclaim flushes.
//!
//! Both are checked against sequential models by property tests (`tests/cache_model.rs`,
//! `tests/write_buffer_model.rs`): after every step of random sequences the governor's
//! books equal the model's resident or buffered bytes, and no entry or item is lost or
//! duplicated.
//!
//! # Why not the HNSW cache and the timeseries memtable (yet)
//!
//! `hnsw-adapter`'s `HnswCache` and `timeseries-adapter`'s memtable came first and solve
//! the same problems with engine-specific twists, which is why they do not stand on these
//! blocks today (a follow-up; their owners keep their measured figures meanwhile):
//! - The HNSW cache grows a resident segment's token *inside* the segment on every insert
//!   (upper bound first, surplus back after), reserves a load's transient peak on top of
//!   its resident size, and in a global Emergency evicts pinned segments last. The cache
//!   here covers the first two with [`GovernedCache::resize`] and the estimate/actual
//!   settlement of [`GovernedCache::get_or_try_load`]; Emergency eviction of pinned
//!   entries is not offered (pins here are absolute), so moving it needs that policy as an
//!   option, and its `jemalloc_books` and cache benchmarks rerun to show the figures hold.
//! - The timeseries memtable appends *into* per-series Gorilla blocks, so its memory is
//!   block capacity, not a list of items; it freezes the largest and oldest series rather
//!   than everything, and pays for index growth it measures after the fact. The buffer
//!   here batches whole items. It could stand on [`GovernedWriteBuffer`] only with a
//!   pluggable container (item = point, container = series → block), which would add a
//!   trait to this crate for one user; not worth it until a third engine needs the same.
//!
//! # Shared adapter plumbing
//!
//! [`StoreSettings`] builds both blocks from the knobs every adapter over an embedded store
//! has, and [`store_error_conversions!`] gives an adapter's error type its conversions from
//! the blocks' errors and `redb`'s. With the feature `testing` (for adapters'
//! dev-dependencies), `testing` holds a test governor, a runtime and the kill-a-child
//! crash harness the adapters' crash tests share.
//!
//! # Limits
//!
//! The cache's LRU order is exact (a recency stamp per access, a B-tree of stamps) at the
//! cost of one short lock per lookup; at millions of lookups a second from many threads a
//! sampled or segmented policy would scale better. Values are reference-counted, and one
//! still held by a caller is never evicted, so a caller that keeps values for long keeps
//! their bytes booked. The write buffer's sink runs on Tokio's blocking pool.

pub mod cache;
pub mod error;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod write_buffer;

pub use cache::{
    CacheBuilder, CacheStats, ENTRY_OVERHEAD, EvictionHook, GovernedCache, ShedPolicy,
};
pub use error::{AppendError, AppendRefusal, CacheError, FlushError, PersistError};
pub use store::StoreSettings;
pub use write_buffer::{
    Batch, BatchSink, BufferStats, GovernedWriteBuffer, Weighted, WriteBufferBuilder,
};
