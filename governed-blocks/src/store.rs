//! What every adapter over an embedded store sets up the same way: the store's page cache
//! reserved once at open, a [`GovernedCache`] for what it reads and a
//! [`GovernedWriteBuffer`] for what it writes, named after the adapter, and the error
//! conversions of an adapter's error type.
//!
//! `sparse-adapter` and `crdt-adapter` both open a `redb` file under their engine's budget
//! with the same knobs (page-cache bytes, buffer chunk, flush threshold, how long a write
//! may wait, a name for metrics). [`StoreSettings`] holds those knobs with their defaults
//! and builds the blocks from them, so an adapter's builder keeps only its own settings and
//! its public setters forward here.

use std::sync::Arc;
use std::time::Duration;

use governor_core::{EngineId, MemError, MemoryGovernor, ReservationToken};

use crate::{
    BatchSink, CacheBuilder, GovernedCache, GovernedWriteBuffer, Weighted, WriteBufferBuilder,
};

/// The settings an adapter over an embedded store shares with every other such adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSettings {
    /// Bytes of the store's own page cache, reserved once at open (default 1 MiB).
    pub store_cache_bytes: usize,
    /// Bytes the write buffer takes from the governor at a time (default 64 KiB).
    pub chunk_bytes: usize,
    /// Buffered bytes that start a flush whatever the pressure (default 4 MiB).
    pub flush_bytes: usize,
    /// How long a write may wait for memory before it is refused (default 2 s).
    pub wait: Duration,
    /// Name in metrics; the blocks are `<name>-<role>`.
    pub name: String,
}

impl StoreSettings {
    /// The defaults, named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            store_cache_bytes: 1024 * 1024,
            chunk_bytes: 64 * 1024,
            flush_bytes: 4 * 1024 * 1024,
            wait: Duration::from_secs(2),
            name: name.into(),
        }
    }

    /// Reserves the store's page cache from `engine`'s budget: before the store is opened,
    /// so a store that does not fit is never opened.
    pub fn reserve_store_cache(
        &self,
        governor: &Arc<MemoryGovernor>,
        engine: EngineId,
    ) -> Result<ReservationToken, MemError> {
        governor.try_reserve(engine, self.store_cache_bytes)
    }

    /// A cache builder on `engine`'s budget named `<name>-<role>`; add a hook or a policy,
    /// then build.
    pub fn cache<K, V>(
        &self,
        governor: &Arc<MemoryGovernor>,
        engine: EngineId,
        role: &str,
    ) -> CacheBuilder<K, V>
    where
        K: Eq + std::hash::Hash + Clone + Send + Sync + 'static,
        V: Send + Sync + 'static,
    {
        GovernedCache::builder(Arc::clone(governor), engine).name(format!("{}-{role}", self.name))
    }

    /// A write buffer builder on `engine`'s budget writing to `sink`, named `<name>-<role>`,
    /// with these settings' chunk, flush threshold and wait.
    pub fn write_buffer<T: Weighted + Send + Sync + 'static>(
        &self,
        governor: &Arc<MemoryGovernor>,
        engine: EngineId,
        role: &str,
        sink: Arc<dyn BatchSink<T>>,
    ) -> WriteBufferBuilder<T> {
        GovernedWriteBuffer::builder(Arc::clone(governor), engine, sink)
            .name(format!("{}-{role}", self.name))
            .chunk_bytes(self.chunk_bytes)
            .flush_bytes(self.flush_bytes)
            .wait(self.wait)
    }
}

/// Implements the conversions an adapter's error type needs from the blocks' errors and
/// from `redb`'s: [`CacheError`](crate::CacheError) and [`FlushError`](crate::FlushError)
/// boxed into its `Cache` and `Flush` variants (boxed: they are large, and an adapter's
/// `Result`s should stay small), and each of `redb`'s specific errors through `redb::Error`
/// into its `Store` variant.
///
/// The type must have the variants `Store(redb::Error)`, `Cache(Box<CacheError>)` and
/// `Flush(Box<FlushError>)`, and the calling crate must depend on `redb` (this crate does
/// not).
#[macro_export]
macro_rules! store_error_conversions {
    ($error:ident) => {
        impl From<$crate::CacheError> for $error {
            fn from(e: $crate::CacheError) -> Self {
                $error::Cache(Box::new(e))
            }
        }

        impl From<$crate::FlushError> for $error {
            fn from(e: $crate::FlushError) -> Self {
                $error::Flush(Box::new(e))
            }
        }

        $crate::store_error_conversions!(@redb $error: redb::StorageError, redb::TableError,
            redb::TransactionError, redb::CommitError);
    };
    (@redb $error:ident: $($t:ty),*) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                $error::Store(e.into())
            }
        }
    )*};
}
