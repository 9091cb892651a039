//! [`SparseIndex`]: the inverted index, its governed read cache and write buffer, and the
//! lock that keeps readers from seeing a flush half done.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governed_blocks::{
    Batch, BatchSink, BufferStats, CacheError, CacheStats, GovernedCache, GovernedWriteBuffer,
    PersistError, StoreSettings, Weighted,
};
use governor_core::{EngineId, MemoryGovernor, ReservationToken};
use parking_lot::RwLock;
use redb::ReadableDatabase;

use crate::block::{MAX_BLOCK_BYTES, Posting, PostingBlock};
use crate::error::SparseError;
use crate::store;
use crate::vector::{DocId, SparseVector, TermId};

const ENGINE: EngineId = EngineId::Sparse;

/// One result of a search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The document.
    pub doc: DocId,
    /// Its dot product with the query.
    pub score: f32,
}

/// Figures of one index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseStats {
    /// The posting-block cache.
    pub cache: CacheStats,
    /// The write buffer of new documents.
    pub buffer: BufferStats,
    /// Bytes reserved for the store's own page cache (fixed at open).
    pub store_cache_bytes: usize,
    /// Documents in the store (not counting buffered ones).
    pub stored_documents: u64,
}

/// A document waiting in the write buffer.
#[derive(Debug)]
struct PendingDoc {
    doc: DocId,
    vector: SparseVector,
}

impl Weighted for PendingDoc {
    fn heap_bytes(&self) -> usize {
        self.vector.heap_bytes()
    }
}

struct Shared {
    /// Every use goes through [`store::Store::guard`], which turns redb's panics on a
    /// damaged file into [`SparseError::Damaged`].
    db: store::Store,
    cache: GovernedCache<(TermId, u32), PostingBlock>,
    /// Readers hold it shared for a whole search; a flush holds it exclusively from its
    /// commit until the cache and the watermark agree with the store, so a search sees a
    /// buffered document either in the buffer or in the store, never both or neither.
    publish: RwLock<()>,
    /// Sequence number of the last buffered document the store holds.
    stored_through: AtomicU64,
}

/// Merges a batch of buffered documents into the store.
struct Sink(Arc<Shared>);

impl BatchSink<PendingDoc> for Sink {
    fn write(&self, batch: &Batch<PendingDoc>) -> Result<(), PersistError> {
        // Grouping by term is transient (about the batch's own size) and not reserved.
        let mut by_term: BTreeMap<TermId, Vec<Posting>> = BTreeMap::new();
        for d in batch.items() {
            for &(term, weight) in d.vector.terms() {
                by_term
                    .entry(term)
                    .or_default()
                    .push(Posting { doc: d.doc, weight });
            }
        }
        let shared = &self.0;
        let _publish = shared.publish.write();
        let changed = shared
            .db
            .guard(|db| store::append(db, &by_term, batch.items().len() as u64))
            .map_err(|e| PersistError::new("merging postings into the store", e))?;
        for key in changed {
            shared.cache.remove(&key);
        }
        shared
            .stored_through
            .store(batch.last_seq(), Ordering::Release);
        Ok(())
    }
}

/// Builds a [`SparseIndex`]; see [`SparseIndex::builder`].
pub struct SparseIndexBuilder {
    governor: Arc<MemoryGovernor>,
    path: PathBuf,
    settings: StoreSettings,
}

impl SparseIndexBuilder {
    /// Bytes of redb's own page cache, reserved from the Sparse budget at open (default
    /// 1 MiB). redb keeps its read cache and write buffer together within this size.
    #[must_use]
    pub fn store_cache_bytes(mut self, bytes: usize) -> Self {
        self.settings.store_cache_bytes = bytes;
        self
    }

    /// Bytes the write buffer takes from the governor at a time (default 64 KiB).
    #[must_use]
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.settings.chunk_bytes = bytes;
        self
    }

    /// Buffered bytes that start a flush whatever the pressure (default 4 MiB).
    #[must_use]
    pub fn flush_bytes(mut self, bytes: usize) -> Self {
        self.settings.flush_bytes = bytes;
        self
    }

    /// How long an insert may wait for memory before it is refused (default 2 s).
    #[must_use]
    pub fn insert_wait(mut self, wait: Duration) -> Self {
        self.settings.wait = wait;
        self
    }

    /// Name in metrics (default `sparse`); the cache and buffer are `<name>-cache` and
    /// `<name>-buffer`.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// Opens (or creates) the store file and registers the cache and buffer with the
    /// governor. A file that is not a redb database, or not one of ours, is an error.
    pub fn open(self) -> Result<SparseIndex, SparseError> {
        let settings = &self.settings;
        let store_token = settings
            .reserve_store_cache(&self.governor, ENGINE)
            .map_err(|source| SparseError::NoRoomForStore {
                bytes: settings.store_cache_bytes,
                source,
            })?;
        let db = store::open(&self.path, settings.store_cache_bytes)?;
        let cache = settings.cache(&self.governor, ENGINE, "cache").build()?;
        let shared = Arc::new(Shared {
            db,
            cache,
            publish: RwLock::new(()),
            stored_through: AtomicU64::new(0),
        });
        let buffer = settings
            .write_buffer(
                &self.governor,
                ENGINE,
                "buffer",
                Arc::new(Sink(Arc::clone(&shared))),
            )
            .build()?;
        Ok(SparseIndex {
            shared,
            buffer,
            path: self.path,
            store_token,
        })
    }
}

/// A sparse-vector index (term → postings of (document, weight)) in a redb file, under the
/// Sparse engine's budget. See the crate documentation for the design.
pub struct SparseIndex {
    shared: Arc<Shared>,
    buffer: GovernedWriteBuffer<PendingDoc>,
    path: PathBuf,
    store_token: ReservationToken,
}

impl std::fmt::Debug for SparseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseIndex")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SparseIndex {
    /// Starts a builder for the index stored in `path`.
    pub fn builder(governor: Arc<MemoryGovernor>, path: impl AsRef<Path>) -> SparseIndexBuilder {
        SparseIndexBuilder {
            governor,
            path: path.as_ref().to_owned(),
            settings: StoreSettings::new("sparse"),
        }
    }

    /// Buffers a document. It is searchable when this returns, and durable after the next
    /// [`SparseIndex::commit`] returns `Ok` (or an earlier flush at Warning pressure or
    /// when the buffer is full). Refused with [`SparseError::Refused`] when no memory can
    /// be had within the insert wait: then it is not stored at all. Document ids are the
    /// caller's: inserting an id twice adds its postings twice.
    pub async fn insert(&self, doc: DocId, vector: SparseVector) -> Result<(), SparseError> {
        self.buffer
            .append(PendingDoc { doc, vector })
            .await
            .map(drop)
            .map_err(|e| SparseError::Refused {
                doc,
                reason: Box::new(e.reason),
            })
    }

    /// Makes every document inserted before this call durable: when it returns `Ok`, they
    /// survive a crash of the process. On error they stay buffered and searchable; call
    /// again to retry.
    pub async fn commit(&self) -> Result<(), SparseError> {
        self.buffer.flush().await?;
        Ok(())
    }

    /// The `k` documents with the highest dot product with `query`, best first (ties by
    /// document id), over every inserted document, stored or buffered.
    ///
    /// Term at a time: for each query term, every posting block of the term (from the
    /// cache, loading it from the store if cold), then the buffered documents. The score
    /// accumulator is transient and not reserved.
    pub fn search(&self, query: &SparseVector, k: usize) -> Result<Vec<Hit>, SparseError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let shared = &*self.shared;
        let _publish = shared.publish.read();
        let stored_through = shared.stored_through.load(Ordering::Acquire);
        let mut acc: HashMap<DocId, f32> = HashMap::new();
        shared.db.guard(|db| {
            let txn = db.begin_read()?;
            let terms = txn.open_table(store::TERMS)?;
            let postings = txn.open_table(store::POSTINGS)?;
            for &(term, qw) in query.terms() {
                let blocks = terms.get(term)?.map_or(0, |g| g.value());
                for b in 0..blocks {
                    let block =
                        shared
                            .cache
                            .get_or_try_load(&(term, b), MAX_BLOCK_BYTES, || {
                                let raw = postings.get((term, b))?.ok_or_else(|| {
                                    SparseError::CorruptBlock {
                                        term,
                                        block: b,
                                        reason: "listed in the term table but missing".to_owned(),
                                    }
                                })?;
                                let block = PostingBlock::decode(term, b, raw.value())?;
                                let bytes = block.heap_bytes();
                                Ok::<_, SparseError>((block, bytes))
                            })?;
                    for p in block.postings() {
                        *acc.entry(p.doc).or_insert(0.0) += qw * p.weight;
                    }
                }
            }
            Ok(())
        })?;
        // Buffered documents not yet in the store. A document is wholly in one place, and
        // its terms are visited in query order in both, so its score is the same sum in
        // the same order wherever it lives.
        self.buffer.visit(|seq, d| {
            if seq <= stored_through {
                return;
            }
            for &(term, qw) in query.terms() {
                if let Some(w) = d.vector.weight(term) {
                    *acc.entry(d.doc).or_insert(0.0) += qw * w;
                }
            }
        });
        let mut hits: Vec<Hit> = acc
            .into_iter()
            .map(|(doc, score)| Hit { doc, score })
            .collect();
        let order = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc));
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, order);
            hits.truncate(k);
        }
        hits.sort_unstable_by(order);
        Ok(hits)
    }

    /// Spawns a task on the current Tokio runtime that sheds cached blocks under pressure
    /// (see [`governed_blocks::ShedPolicy`]); it stops when the index drops.
    pub fn spawn_pressure_watcher(&self) -> Result<tokio::task::JoinHandle<()>, CacheError> {
        self.shared.cache.spawn_pressure_watcher()
    }

    /// Evicts cached blocks until `target` bytes are released (what the governor's
    /// reclaim does); returns bytes released.
    pub fn shed_cache(&self, target: usize) -> usize {
        self.shared.cache.reclaim(target)
    }

    /// The write buffer's figures alone: unlike [`Self::stats`] it reads nothing from the
    /// store, so progress reporters can call it after every insert.
    pub fn buffer_stats(&self) -> BufferStats {
        self.buffer.stats()
    }

    /// Current figures.
    pub fn stats(&self) -> Result<SparseStats, SparseError> {
        Ok(SparseStats {
            cache: self.shared.cache.stats(),
            buffer: self.buffer.stats(),
            store_cache_bytes: self.store_token.size(),
            stored_documents: self.shared.db.guard(store::documents)?,
        })
    }
}
