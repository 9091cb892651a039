#![allow(missing_docs, unused)]
pub use governor_core::*;
#[path = "../src/alloc/mod.rs"]
pub mod alloc;
#[cfg(feature = "numa")]
#[path = "../src/numa/mod.rs"]
pub mod numa;
