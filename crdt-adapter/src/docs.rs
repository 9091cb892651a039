//! [`DocStore`]: resident documents in a governed cache, remote updates in a governed write
//! buffer, snapshots and update logs in redb.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use governed_blocks::{
    Batch, BatchSink, BufferStats, CacheError, CacheStats, EvictionHook, GovernedCache,
    GovernedWriteBuffer, PersistError, StoreSettings, Weighted,
};
use governor_core::{EngineId, MemoryGovernor, ReservationToken};
use loro::{ExportMode, LoroDoc, LoroValue, VersionVector};
use parking_lot::{Mutex, RwLock};
use redb::{Database, ReadableDatabase};

use crate::error::CrdtError;
use crate::model;
use crate::store::{self, Stored};

const ENGINE: EngineId = EngineId::Crdt;

/// The longest document id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 1024;

/// Figures of one store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocStats {
    /// Resident documents.
    pub cache: CacheStats,
    /// Remote updates waiting to be logged.
    pub buffer: BufferStats,
    /// Bytes reserved for the store's own page cache (fixed at open).
    pub store_cache_bytes: usize,
}

/// A remote update waiting in the write buffer.
#[derive(Debug)]
struct RemoteUpdate {
    id: String,
    bytes: Vec<u8>,
}

impl Weighted for RemoteUpdate {
    fn heap_bytes(&self) -> usize {
        self.id.capacity().saturating_add(self.bytes.capacity())
    }
}

/// What the store knows about a resident document besides the document itself.
// Independent facts kept under one lock (any combination occurs), not states of one machine.
#[allow(clippy::struct_excessive_bools)]
struct EntryState {
    /// Local edits since the last snapshot or logged delta.
    dirty: bool,
    /// Version the store holds for this document (snapshot plus logged deltas of ours).
    persisted_vv: VersionVector,
    /// Highest log sequence number this document has applied.
    applied_through: u64,
    /// An import left updates pending (missing dependencies): keep the whole log.
    has_pending: bool,
    /// Highest write-buffer sequence number imported.
    buffer_seen: u64,
    /// Encoded bytes the document was built from (for the byte model).
    encoded: usize,
    /// Its history is decoded in memory (a local edit, an import or a replayed log did
    /// it), which the byte model charges per change (see
    /// [`model::BYTES_PER_DECODED_CHANGE`]).
    decoded: bool,
    /// The load replayed logged updates: the next eviction writes a snapshot even if
    /// nothing changed, so the next load starts from encoded history (a smaller charge,
    /// and no replay) instead of decoding it again.
    compact: bool,
    /// Set by the eviction hook, under this lock, once the document's state is in the store
    /// and the cache is about to drop it: an edit that finds it set must load the document
    /// again, or its change would land in a copy nobody persists.
    evicted: bool,
}

/// A resident document.
pub(crate) struct DocEntry {
    id: String,
    doc: LoroDoc,
    state: Mutex<EntryState>,
}

impl DocEntry {
    /// What the document is charged now.
    fn charge(&self, st: &EntryState) -> usize {
        if st.decoded {
            self.decoded_charge(st)
        } else {
            model::charge(self.doc.len_ops(), st.encoded)
        }
    }

    /// What it is charged once an edit or import has decoded its history: what those
    /// reserve before they run.
    fn decoded_charge(&self, st: &EntryState) -> usize {
        model::decoded_charge(self.doc.len_ops(), st.encoded, self.doc.len_changes())
    }
}

struct Shared {
    db: Arc<Database>,
    cache: GovernedCache<String, DocEntry>,
    /// Loads hold it shared from reading the store until the document is resident and has
    /// caught up with the buffer; a flush holds it exclusively from its commit until every
    /// resident document has the flushed updates, so no load misses an update that has
    /// left the buffer.
    publish: RwLock<()>,
}

impl Shared {
    /// Books a resident document's charge after an edit or import changed its memory.
    ///
    /// Growth is asked for like any reservation (colder documents are evicted for it). If
    /// the engine has no room even then, the document itself is persisted and dropped: its
    /// memory was never granted, and booking it past the limit would break the engine's
    /// budget for memory the adapter can give back at once. Only a document that cannot be
    /// evicted (pinned, in use by another caller, or failing to persist) is booked past the
    /// limit, because its memory exists; the overcommit then raises pressure and is logged.
    ///
    /// The caller holds neither the document's state lock nor its `Arc` (a held `Arc`
    /// makes the eviction answer "busy").
    fn settle_charge(&self, id: &String, bytes: usize) {
        match self.cache.resize(id, bytes, false) {
            Ok(()) | Err(CacheError::NotResident { .. }) => return,
            Err(CacheError::NoRoom { .. }) => {}
            Err(err) => {
                tracing::warn!(doc = %id, error = %err, "a changed document could not be charged");
                return;
            }
        }
        let err = match self.cache.evict(id) {
            Ok(_) | Err(CacheError::NotResident { .. }) => return,
            Err(err) => err,
        };
        tracing::warn!(doc = %id, error = %err, "no room for a grown document that cannot be evicted; booked past the Crdt limit");
        if let Err(err) = self.cache.resize(id, bytes, true) {
            tracing::warn!(doc = %id, error = %err, "a changed document could not be charged");
        }
    }
}

/// How many times an edit makes its document resident again when an eviction takes it
/// between the load and the edit, before it gives up (a cache so small that every load is
/// evicted at once).
const EDIT_PASSES: usize = 16;

/// Imports `bytes` into a resident document and records what that changed.
fn import_into(e: &DocEntry, st: &mut EntryState, bytes: &[u8]) -> Result<(), CrdtError> {
    let status = e
        .doc
        .import(bytes)
        .map_err(|source| CrdtError::MalformedUpdate {
            id: e.id.clone(),
            source,
        })?;
    st.has_pending |= status.pending.is_some();
    st.encoded = st.encoded.saturating_add(bytes.len());
    st.decoded = true;
    Ok(())
}

/// Writes a document's snapshot and drops the log entries it covers.
fn snapshot_and_compact(db: &Database, e: &DocEntry, st: &mut EntryState) -> Result<(), CrdtError> {
    let snapshot = e
        .doc
        .export(ExportMode::Snapshot)
        .map_err(|err| CrdtError::Export {
            id: e.id.clone(),
            reason: err.to_string(),
        })?;
    store::write_snapshot(db, &e.id, &snapshot, st.applied_through, st.has_pending)?;
    st.dirty = false;
    st.compact = false;
    st.persisted_vv = e.doc.oplog_vv();
    Ok(())
}

/// Persists a changed document before the cache drops it.
struct PersistOnEvict(Arc<Database>);

impl EvictionHook<String, DocEntry> for PersistOnEvict {
    fn before_evict(&self, _id: &String, e: &DocEntry) -> Result<(), PersistError> {
        let mut st = e.state.lock();
        if st.dirty {
            snapshot_and_compact(&self.0, e, &mut st)
                .map_err(|err| PersistError::new(format!("snapshot of {:?}", e.id), err))?;
        } else if st.compact
            && let Err(err) = snapshot_and_compact(&self.0, e, &mut st)
        {
            // Only an optimisation: the stored snapshot and log hold everything it applied, so
            // a failed write (a full disk) must not keep a clean document in memory.
            tracing::warn!(doc = %e.id, error = %err, "compacting snapshot not written; the next load replays the log");
        }
        // Otherwise snapshot plus log already hold everything it applied; buffered updates
        // it imported early are still in the buffer.
        st.evicted = true;
        Ok(())
    }
}

/// Logs a batch of remote updates, then applies it to the resident documents.
struct Sink(Arc<Shared>);

impl Sink {
    /// Imports a flushed update into a resident document; returns its new charge (booked
    /// by the caller once it has let go of the document).
    fn apply(
        e: &DocEntry,
        st: &mut EntryState,
        u: &RemoteUpdate,
        buffer_seq: u64,
        log_seq: u64,
    ) -> usize {
        if let Err(err) = import_into(e, st, &u.bytes) {
            // Checked at receipt: a failure here is loro's, and the next load meets it
            // again and reports it.
            tracing::error!(doc = %u.id, error = %err, "logged update failed to apply to the resident document");
            st.has_pending = true;
        }
        st.buffer_seen = buffer_seq;
        st.applied_through = st.applied_through.max(log_seq);
        e.charge(st)
    }
}

impl BatchSink<RemoteUpdate> for Sink {
    fn write(&self, batch: &Batch<RemoteUpdate>) -> Result<(), PersistError> {
        let shared = &self.0;
        let _publish = shared.publish.write();
        let seqs = store::append_log(
            &shared.db,
            batch
                .items()
                .iter()
                .map(|u| (u.id.as_str(), u.bytes.as_slice())),
        )
        .map_err(|e| PersistError::new("logging remote updates", e))?;
        for (i, (u, log_seq)) in batch.items().iter().zip(seqs).enumerate() {
            let buffer_seq = batch.first_seq() + i as u64;
            // Reserve what the import can add first; if there is no room, evict the document
            // instead (its log now holds the update for the next load). A document that
            // cannot be evicted (pinned or in use) must still see the update: a second pass
            // applies it without a reservation and `settle_charge` books it.
            let mut reserve = true;
            loop {
                let Some(e) = shared.cache.peek(&u.id) else {
                    break;
                };
                let mut st = e.state.lock();
                if buffer_seq <= st.buffer_seen {
                    st.applied_through = st.applied_through.max(log_seq);
                    break;
                }
                if reserve {
                    let want = e
                        .decoded_charge(&st)
                        .saturating_add(model::import_growth(&u.bytes));
                    if shared.cache.resize(&u.id, want, false).is_err() {
                        drop(st);
                        drop(e);
                        if shared.cache.evict(&u.id).is_ok() {
                            break;
                        }
                        reserve = false;
                        continue;
                    }
                }
                let after = Self::apply(&e, &mut st, u, buffer_seq, log_seq);
                drop(st);
                drop(e);
                // Within what was reserved unless an import resolved earlier pending updates.
                shared.settle_charge(&u.id, after);
                break;
            }
        }
        Ok(())
    }
}

/// Builds a [`DocStore`]; see [`DocStore::builder`].
pub struct DocStoreBuilder {
    governor: Arc<MemoryGovernor>,
    path: PathBuf,
    settings: StoreSettings,
    edit_headroom: usize,
}

impl DocStoreBuilder {
    /// Bytes of redb's own page cache, reserved from the Crdt budget at open (default 1 MiB).
    #[must_use]
    pub fn store_cache_bytes(mut self, bytes: usize) -> Self {
        self.settings.store_cache_bytes = bytes;
        self
    }

    /// Bytes reserved for a document before a local edit runs (default 16 KiB); the edit's
    /// actual growth is measured after and charged.
    #[must_use]
    pub fn edit_headroom(mut self, bytes: usize) -> Self {
        self.edit_headroom = bytes;
        self
    }

    /// Bytes the update buffer takes from the governor at a time (default 64 KiB).
    #[must_use]
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.settings.chunk_bytes = bytes;
        self
    }

    /// Buffered update bytes that start a flush whatever the pressure (default 4 MiB).
    #[must_use]
    pub fn flush_bytes(mut self, bytes: usize) -> Self {
        self.settings.flush_bytes = bytes;
        self
    }

    /// How long `receive` may wait for memory before it refuses (default 2 s).
    #[must_use]
    pub fn receive_wait(mut self, wait: Duration) -> Self {
        self.settings.wait = wait;
        self
    }

    /// Name in metrics (default `crdt`).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// Opens (or creates) the store file and registers the document cache and the update
    /// buffer with the governor.
    pub fn open(self) -> Result<DocStore, CrdtError> {
        let settings = &self.settings;
        let store_token = settings
            .reserve_store_cache(&self.governor, ENGINE)
            .map_err(|source| CrdtError::NoRoomForStore {
                bytes: settings.store_cache_bytes,
                source,
            })?;
        let db = Arc::new(store::open(&self.path, settings.store_cache_bytes)?);
        let cache = settings
            .cache(&self.governor, ENGINE, "documents")
            .eviction_hook(Arc::new(PersistOnEvict(Arc::clone(&db))))
            .build()?;
        let shared = Arc::new(Shared {
            db,
            cache,
            publish: RwLock::new(()),
        });
        let buffer = settings
            .write_buffer(
                &self.governor,
                ENGINE,
                "updates",
                Arc::new(Sink(Arc::clone(&shared))),
            )
            .build()?;
        Ok(DocStore {
            shared,
            buffer,
            edit_headroom: self.edit_headroom,
            path: self.path,
            store_token,
        })
    }
}

/// Collaborative documents (loro CRDTs) under the Crdt engine's budget. See the crate
/// documentation for the design and what "acknowledged" means.
pub struct DocStore {
    shared: Arc<Shared>,
    buffer: GovernedWriteBuffer<RemoteUpdate>,
    edit_headroom: usize,
    path: PathBuf,
    store_token: ReservationToken,
}

impl std::fmt::Debug for DocStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for DocStore {
    /// Snapshots every resident document with unlogged edits (the update buffer then
    /// writes what it holds as it drops): closing the store must not lose edits that no
    /// commit covered yet. Failures are logged (a destructor cannot return them); call
    /// [`DocStore::commit`] first to handle errors yourself.
    fn drop(&mut self) {
        let shared = &self.shared;
        for key in shared.cache.keys() {
            let Some(e) = shared.cache.peek(&key) else {
                continue;
            };
            let mut st = e.state.lock();
            if st.dirty
                && let Err(err) = snapshot_and_compact(&shared.db, &e, &mut st)
            {
                tracing::error!(doc = %key, error = %err, "edited document not persisted on drop");
            }
        }
    }
}

fn check_id(id: &str) -> Result<(), CrdtError> {
    let bad = |reason| CrdtError::InvalidId {
        id: id.chars().take(64).collect(),
        reason,
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(bad("longer than MAX_ID_BYTES"));
    }
    Ok(())
}

impl DocStore {
    /// Starts a builder for the store in `path`.
    pub fn builder(governor: Arc<MemoryGovernor>, path: impl AsRef<Path>) -> DocStoreBuilder {
        DocStoreBuilder {
            governor,
            path: path.as_ref().to_owned(),
            settings: StoreSettings::new("crdt"),
            edit_headroom: 16 * 1024,
        }
    }

    /// Creates an empty document. Durable when it returns.
    pub fn create(&self, id: &str) -> Result<(), CrdtError> {
        check_id(id)?;
        let empty = LoroDoc::new()
            .export(ExportMode::Snapshot)
            .map_err(|e| CrdtError::Export {
                id: id.to_owned(),
                reason: e.to_string(),
            })?;
        if store::create(&self.shared.db, id, &empty)? {
            Ok(())
        } else {
            Err(CrdtError::DocumentExists { id: id.to_owned() })
        }
    }

    /// True when the document exists.
    pub fn exists(&self, id: &str) -> Result<bool, CrdtError> {
        check_id(id)?;
        store::exists(&self.shared.db, id)
    }

    /// Runs a local edit on the document (loading it if cold) and commits it in loro.
    /// Reserves the edit headroom first (evicting colder documents; fails with
    /// [`CrdtError::Cache`] if even that cannot be had, without running `edit`), then
    /// charges what the document actually grew to. Durable after the next
    /// [`DocStore::commit`] (or when the document is evicted).
    pub fn edit<R>(&self, id: &str, edit: impl FnOnce(&LoroDoc) -> R) -> Result<R, CrdtError> {
        // The document may be evicted between being made resident and being locked here; the
        // eviction hook marks it under the same lock, so the edit never lands in a copy that
        // has already been persisted and dropped. Each pass makes it resident again.
        let mut edit = Some(edit);
        for _ in 0..EDIT_PASSES {
            let e = self.resident(id)?;
            let key = e.id.clone();
            // An edit decodes the history of a document loaded from its snapshot.
            let before = {
                let st = e.state.lock();
                e.decoded_charge(&st)
            };
            self.shared
                .cache
                .resize(&key, before.saturating_add(self.edit_headroom), false)?;
            let mut st = e.state.lock();
            if st.evicted {
                continue;
            }
            let vv = e.doc.oplog_vv();
            let out = (edit.take().expect("applied once, in the pass that returns"))(&e.doc);
            e.doc.commit();
            // From here on the edit is applied: nothing below may report it as failed, or a
            // caller that retries a refused edit would apply it twice.
            if e.doc.oplog_vv() != vv {
                st.dirty = true;
                st.decoded = true;
                match e.doc.export(ExportMode::updates(&vv)) {
                    Ok(delta) => st.encoded = st.encoded.saturating_add(delta.len()),
                    // Only the byte model misses it; the document (dirty) is persisted whole.
                    Err(err) => {
                        tracing::warn!(doc = %key, error = %err, "could not size an applied edit");
                    }
                }
            }
            let after = e.charge(&st);
            drop(st);
            drop(e);
            // An eviction since the lock was dropped persisted the edit (its hook takes the
            // same lock): then there is nothing left to charge.
            self.shared.settle_charge(&key, after);
            return Ok(out);
        }
        Err(CrdtError::Cache(Box::new(CacheError::NotResident {
            cache: self.shared.cache.name().to_owned(),
        })))
    }

    /// Accepts an update (or snapshot) from a remote peer for the document. The bytes are
    /// checked first (header and checksum): malformed bytes are refused with
    /// [`CrdtError::MalformedUpdate`] and nothing is buffered. Reads see the update at
    /// once; it is durable after the next [`DocStore::commit`] returns (or an earlier flush).
    pub async fn receive(&self, id: &str, update: Vec<u8>) -> Result<(), CrdtError> {
        check_id(id)?;
        LoroDoc::decode_import_blob_meta(&update, true).map_err(|source| {
            CrdtError::MalformedUpdate {
                id: id.to_owned(),
                source,
            }
        })?;
        if !self.shared.cache.contains(&id.to_owned()) && !store::exists(&self.shared.db, id)? {
            return Err(CrdtError::UnknownDocument { id: id.to_owned() });
        }
        self.buffer
            .append(RemoteUpdate {
                id: id.to_owned(),
                bytes: update,
            })
            .await
            .map(drop)
            .map_err(|e| CrdtError::Refused {
                id: id.to_owned(),
                reason: Box::new(e.reason),
            })
    }

    /// The document's current value (every container, deeply), loading it if cold.
    pub fn value(&self, id: &str) -> Result<LoroValue, CrdtError> {
        Ok(self.resident(id)?.doc.get_deep_value())
    }

    /// The document's full state as a loro snapshot, for a peer or a backup.
    pub fn export_snapshot(&self, id: &str) -> Result<Vec<u8>, CrdtError> {
        let e = self.resident(id)?;
        e.doc
            .export(ExportMode::Snapshot)
            .map_err(|err| CrdtError::Export {
                id: id.to_owned(),
                reason: err.to_string(),
            })
    }

    /// The document's operation log version (what a peer needs to ask for updates).
    pub fn version(&self, id: &str) -> Result<VersionVector, CrdtError> {
        Ok(self.resident(id)?.doc.oplog_vv())
    }

    /// Makes every update received and every edit made before this call durable: when it
    /// returns `Ok`, they survive a crash. Buffered remote updates are logged first; then
    /// each resident document's local changes since its last persist are logged as one
    /// delta. On error nothing acknowledged so far is lost; call again to retry.
    pub async fn commit(&self) -> Result<(), CrdtError> {
        self.buffer.flush().await?;
        let mut entries: Vec<Arc<DocEntry>> = self
            .shared
            .cache
            .keys()
            .iter()
            .filter_map(|k| self.shared.cache.peek(k))
            .collect();
        // One lock order for every caller, so two commits at once cannot deadlock.
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        let mut locked: Vec<_> = entries
            .iter()
            .map(|e| (e, e.state.lock()))
            .filter(|(_, st)| st.dirty)
            .collect();
        if locked.is_empty() {
            return Ok(());
        }
        let mut deltas = Vec::with_capacity(locked.len());
        for (e, st) in &locked {
            let delta = e
                .doc
                .export(ExportMode::updates(&st.persisted_vv))
                .map_err(|err| CrdtError::Export {
                    id: e.id.clone(),
                    reason: err.to_string(),
                })?;
            deltas.push(delta);
        }
        let seqs = store::append_log(
            &self.shared.db,
            locked
                .iter()
                .zip(&deltas)
                .map(|((e, _), d)| (e.id.as_str(), d.as_slice())),
        )?;
        for ((e, st), seq) in locked.iter_mut().zip(seqs) {
            st.dirty = false;
            st.persisted_vv = e.doc.oplog_vv();
            st.applied_through = st.applied_through.max(seq);
        }
        Ok(())
    }

    /// Evicts the document now (snapshotting it first if it changed); returns the bytes
    /// released.
    pub fn evict(&self, id: &str) -> Result<usize, CrdtError> {
        check_id(id)?;
        Ok(self.shared.cache.evict(&id.to_owned())?)
    }

    /// Keeps the document resident (loading it if cold) through pressure and reclaims.
    pub fn pin(&self, id: &str) -> Result<(), CrdtError> {
        let e = self.resident(id)?;
        let key = e.id.clone();
        drop(e);
        Ok(self.shared.cache.pin(&key)?)
    }

    /// Makes a pinned document evictable again.
    pub fn unpin(&self, id: &str) -> Result<(), CrdtError> {
        check_id(id)?;
        Ok(self.shared.cache.unpin(&id.to_owned())?)
    }

    /// True when the document is resident.
    pub fn is_resident(&self, id: &str) -> bool {
        self.shared.cache.contains(&id.to_owned())
    }

    /// Evicts unpinned documents, least recently used first, until `target` bytes are
    /// released (what the governor's reclaim does); returns bytes released.
    pub fn shed(&self, target: usize) -> usize {
        self.shared.cache.reclaim(target)
    }

    /// Spawns a task on the current Tokio runtime that evicts documents under pressure
    /// (see [`governed_blocks::ShedPolicy`]); it stops when the store drops.
    pub fn spawn_pressure_watcher(&self) -> Result<tokio::task::JoinHandle<()>, CacheError> {
        self.shared.cache.spawn_pressure_watcher()
    }

    /// Current figures.
    pub fn stats(&self) -> DocStats {
        DocStats {
            cache: self.shared.cache.stats(),
            buffer: self.buffer.stats(),
            store_cache_bytes: self.store_token.size(),
        }
    }

    /// The resident document, loading it if cold, caught up with buffered updates.
    fn resident(&self, id: &str) -> Result<Arc<DocEntry>, CrdtError> {
        check_id(id)?;
        let key = id.to_owned();
        let shared = &*self.shared;
        // Recursive: a load may evict, and eviction must not queue behind a waiting flush.
        let _publish = shared.publish.read_recursive();
        let e = if let Some(e) = shared.cache.get(&key) {
            e
        } else {
            let txn = shared.db.begin_read()?;
            let stored = store::read(&txn, id)?
                .ok_or_else(|| CrdtError::UnknownDocument { id: key.clone() })?;
            drop(txn);
            let estimate = estimate(id, &stored)?;
            shared
                .cache
                .get_or_try_load(&key, estimate, || load(id, &stored))?
        };
        self.catch_up(&e)?;
        Ok(e)
    }

    /// Imports buffered updates for `e` it has not seen yet, and charges what they added.
    fn catch_up(&self, e: &Arc<DocEntry>) -> Result<(), CrdtError> {
        let mut st = e.state.lock();
        let mut todo = Vec::new();
        let mut last = st.buffer_seen;
        self.buffer.visit(|seq, u| {
            if seq > st.buffer_seen && u.id == e.id {
                // A transient copy: importing under the buffer's lock would stall appends.
                todo.push(u.bytes.clone());
            }
            last = last.max(seq);
        });
        if todo.is_empty() {
            return Ok(());
        }
        // Reserve the most the imports can add before they allocate (evicting colder
        // documents); if that cannot be had the read fails and the updates stay buffered.
        let grow = todo
            .iter()
            .fold(0usize, |n, b| n.saturating_add(model::import_growth(b)));
        let before = e.decoded_charge(&st);
        self.shared
            .cache
            .resize(&e.id, before.saturating_add(grow), false)?;
        for bytes in &todo {
            import_into(e, &mut st, bytes)?;
        }
        st.buffer_seen = last;
        let after = e.charge(&st);
        drop(st);
        // At most what was reserved (a shrink) unless an import resolved earlier pending
        // updates; the caller's `Arc` keeps the document from being evicted for it here.
        self.shared.settle_charge(&e.id, after);
        Ok(())
    }
}

/// The charge of a stored document before it is loaded, from its blobs' metadata.
fn estimate(id: &str, stored: &Stored) -> Result<usize, CrdtError> {
    let corrupt = |what: &str, e: loro::LoroError| CrdtError::CorruptDocument {
        id: id.to_owned(),
        reason: format!("{what}: {e}"),
    };
    let snapshot = LoroDoc::decode_import_blob_meta(&stored.snapshot, true)
        .map_err(|e| corrupt("snapshot", e))?;
    let mut ops = model::blob_ops(&snapshot);
    let mut changes = snapshot.change_num as usize;
    for (_, u) in &stored.log {
        let meta =
            LoroDoc::decode_import_blob_meta(u, true).map_err(|e| corrupt("logged update", e))?;
        ops = ops.saturating_add(model::blob_ops(&meta));
        changes = changes.saturating_add(meta.change_num as usize);
    }
    // Replaying logged updates decodes the history (see `EntryState::decoded`).
    Ok(if stored.log.is_empty() {
        model::charge(ops, stored.encoded_bytes())
    } else {
        model::decoded_charge(ops, stored.encoded_bytes(), changes)
    })
}

/// Builds a document from its stored snapshot and log.
fn load(id: &str, stored: &Stored) -> Result<(DocEntry, usize), CrdtError> {
    let corrupt = |what: &str, e: loro::LoroError| CrdtError::CorruptDocument {
        id: id.to_owned(),
        reason: format!("{what}: {e}"),
    };
    let doc = LoroDoc::new();
    let mut has_pending = doc
        .import(&stored.snapshot)
        .map_err(|e| corrupt("snapshot", e))?
        .pending
        .is_some();
    let mut applied_through = 0;
    for (seq, u) in &stored.log {
        let status = doc.import(u).map_err(|e| corrupt("logged update", e))?;
        has_pending |= status.pending.is_some();
        applied_through = *seq;
    }
    let state = EntryState {
        dirty: false,
        persisted_vv: doc.oplog_vv(),
        applied_through,
        has_pending,
        buffer_seen: 0,
        encoded: stored.encoded_bytes(),
        decoded: !stored.log.is_empty(),
        compact: !stored.log.is_empty(),
        evicted: false,
    };
    let entry = DocEntry {
        id: id.to_owned(),
        doc,
        state: Mutex::new(state),
    };
    let bytes = {
        let st = entry.state.lock();
        entry.charge(&st)
    };
    Ok((entry, bytes))
}
