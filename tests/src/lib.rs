//! Cross-crate integration: the mixed workload that is this project's validation target.
//!
//! One [`MemoryGovernor`](governor_core::MemoryGovernor) governs five engines at once in one
//! process: the vector engine answers HNSW searches from a byte-budgeted segment cache, the
//! timeseries engine ingests a bulk load into Gorilla memtables that flush to segment files,
//! and the SQL engine runs high-cardinality `GROUP BY` queries through the governed DataFusion
//! pool, spilling to a temp dir; the sparse engine ingests postings into a redb inverted index
//! and answers top-k searches checked against a brute-force scan, and the CRDT engine edits
//! loro documents and merges a remote peer's updates ([`engines`]). A sampler watches every engine's books and the process's real
//! RSS. The run passes when no engine ever exceeded its budget, RSS stayed within the ceiling,
//! and every search, every query and every ingested point completed and read back exactly.
//!
//! The binary `mixed_workload` runs the demo sizes; `tests/mixed.rs` runs a small one.
//! `mixed_workload --scenario runaway [--no-abort]` runs the [`runaway`] scenario instead: an
//! unspillable query that would starve ingest of its floor, with and without aborts.

pub mod borrow;
pub mod engines;
pub mod picture;
pub mod progress;
pub mod runaway;
pub mod workload;
