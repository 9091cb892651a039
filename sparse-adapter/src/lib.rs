//! Sparse engine memory on the governor: an inverted index of sparse vectors in a `redb`
//! file, with a governed posting-block cache and a governed write buffer.
//!
//! # The problem
//!
//! A sparse-vector index (learned sparse embeddings, BM25-style term weights) maps each
//! term to a posting list of (document, weight). The lists of a large corpus do not fit
//! the [`EngineId::Sparse`](governor_core::EngineId) budget, and bulk ingest must not grow
//! past it either. So the lists live on disk, cut into blocks; blocks are cached while the
//! budget allows; new documents wait in a bounded buffer until a flush merges them in.
//!
//! ```text
//!   insert(doc, vector)            search(query, k)
//!        │                             │ (shared publish lock)
//!        ▼                             ▼
//!  GovernedWriteBuffer ◀── visit ── term at a time: blocks (cache or store), then buffer
//!   (chunks, Warning flush,            │
//!    Critical wait)            GovernedCache<(term, block), PostingBlock>
//!        │ flush = one redb txn         │ miss: reserve ≤ MAX_BLOCK_BYTES, read, decode
//!        ▼ (exclusive publish lock)     ▼
//!   redb file: postings (term, block) → [count, (doc, weight)…, crc32]
//!              terms term → blocks · meta format, documents
//! ```
//!
//! # Accounting
//!
//! Everything long-lived is reserved from the Sparse budget before it is allocated:
//! - **redb's page cache**: its configured size
//!   ([`SparseIndexBuilder::store_cache_bytes`]), reserved once at open (redb keeps its
//!   read cache and write buffer together within that size);
//! - **cached posting blocks**: each block's decoded size plus the cache's per-entry
//!   overhead, reserved at [`block::MAX_BLOCK_BYTES`] before it is read and settled to
//!   the exact size after decoding;
//! - **buffered documents**: their vectors plus the buffer's vector, taken in chunks.
//!
//! Transient and not reserved: a search's score accumulator (one map entry per matching
//! document) and a flush's per-term grouping of its batch (about the batch's size).
//!
//! # Durability: what "acknowledged" means
//!
//! A document is **acknowledged** when a [`SparseIndex::commit`] that started after its
//! [`SparseIndex::insert`] returned has returned `Ok`. Acknowledged documents survive a
//! crash of the process (the flush is one redb transaction with immediate durability:
//! fsynced before commit returns). A document inserted but not yet acknowledged is
//! searchable at once, and may already be durable (a flush at Warning pressure or a full
//! buffer writes it), but a crash may lose it. A crash never leaves a half-written batch:
//! redb commits all of a transaction or none of it. `tests/crash.rs` kills (SIGKILL) a
//! child process in the middle of ingest and checks this.
//!
//! # Reads see every write
//!
//! A search sees every document whose insert returned, resident or not: stored blocks
//! through the cache (a miss reads the store), and buffered documents through the buffer.
//! A flush holds the publish lock exclusively from its commit until it has dropped the
//! blocks it rewrote from the cache and moved the "stored through" watermark, so a search
//! counts each document exactly once. Scores do not depend on residency: every document
//! sums its terms in query order, so a starved index returns bit-identical top-k.
//!
//! # Pressure
//!
//! The cache and the buffer are both [`Reclaimer`](governor_core::Reclaimer)s of the
//! Sparse engine (a reclaim evicts unpinned blocks, or flushes). Inserts follow the
//! engine's pressure (flush at Warning, wait at Critical, refuse after the insert wait),
//! and [`SparseIndex::spawn_pressure_watcher`] sheds cached blocks under global pressure
//! and before the engine fills.
//!
//! # Limits, and what a production engine would add
//!
//! Term-at-a-time accumulation touches every posting of every query term. A production
//! engine would store block maxima and skip blocks that cannot enter the top-k
//! (block-max WAND / MaxScore), compress postings (delta-coded doc ids, quantised
//! weights), support deletes and updates (a document table and tombstones; here ids are
//! the caller's and an id inserted twice counts twice), compact small blocks, and publish
//! versions so that searches never wait for a flush's commit (here they wait for it).
//!
//! # Example
//!
//! ```
//! use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
//! use sparse_adapter::{SparseIndex, SparseVector};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let governor = MemoryGovernor::new(
//!     GovernorConfig::builder()
//!         .global_ceiling(mib(64))
//!         .engine(EngineId::Sparse, EngineBudget::new(mib(8)))
//!         .build()?,
//! )?;
//! let dir = tempfile::tempdir()?;
//! let index = SparseIndex::builder(governor, dir.path().join("sparse.redb")).open()?;
//! index.insert(1, SparseVector::new(vec![(7, 0.5), (9, 1.0)])?).await?;
//! index.insert(2, SparseVector::new(vec![(7, 2.0)])?).await?;
//! index.commit().await?; // both durable now
//! let hits = index.search(&SparseVector::new(vec![(7, 1.0), (9, 1.0)])?, 1)?;
//! assert_eq!(hits[0].doc, 2);
//! # Ok(()) }
//! ```

pub mod block;
pub mod error;
mod index;
mod store;
pub mod vector;

pub use error::SparseError;
pub use index::{Hit, SparseIndex, SparseIndexBuilder, SparseStats};
pub use vector::{DocId, MAX_TERMS, SparseVector, TermId};
