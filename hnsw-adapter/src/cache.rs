//! [`HnswCache`]: many segments under one Vector budget, loaded on demand, evicted coldest
//! first, hot ones pinned.
//!
//! Every segment is a `Slot`: its manifest (where its dump is), and, while resident, an
//! `Arc<GovernedHnsw>` holding its reservation. A slot's mutex is held for the whole load,
//! so concurrent searches of a cold segment wait for one load instead of starting several.
//! Searches and inserts clone the `Arc` under that mutex and work outside it; eviction takes
//! the mutex too and skips a segment whose `Arc` is shared, so memory in use is never
//! "freed" on the books while a search still walks it.
//!
//! Eviction order: unpinned segments by last access (least recent first), then — only in a
//! global Emergency — pinned ones the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use governor_core::{
    ConsumerSnapshot, ConsumerStatsSource, EngineId, MemError, MemoryGovernor, PressureLevel,
    ReclaimError, Reclaimer, ReclaimerHandle, ReservationToken, StatsSourceHandle,
};
use parking_lot::{Mutex, RwLock};

use crate::error::HnswError;
use crate::segment::{GovernedHnsw, HnswParams, SearchHit, SegmentId, check_vector};
use crate::store::{self, SegmentManifest};

/// How many times an insert or load evicts and retries before it reports backpressure;
/// more only helps when other threads keep taking the memory we free.
const MAX_ATTEMPTS: usize = 4;

/// How long eviction waits for a slot's lock. Searches and inserts hold it for
/// microseconds, a load or a persist for milliseconds: waiting this long gets past the
/// former without stalling behind the latter (and two loaders evicting for each other
/// cannot deadlock, they time out). Figures and planning never take it (see `Slot::charged`).
const SLOT_WAIT: Duration = Duration::from_millis(2);

/// How the cache answers pressure it is told about (see [`HnswCache::spawn_pressure_watcher`]).
///
/// Global pressure means *other* engines need memory: shed cold segments in proportion.
/// The Vector engine's own pressure means the cache is nearly full, which a cache normally
/// is; shedding down to `engine_headroom_pct` below the limit keeps room for the next load
/// or insert so the foreground path rarely has to evict synchronously.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressurePolicy {
    /// Share of unpinned resident bytes evicted on global Warning (default 25).
    pub warning_shed_pct: u8,
    /// Share evicted on global Critical (default 75). Pinned segments stay.
    pub critical_shed_pct: u8,
    /// On Vector engine Critical or worse, evict cold segments until this share of the
    /// Vector limit is free (default 10).
    pub engine_headroom_pct: u8,
}

impl Default for PressurePolicy {
    fn default() -> Self {
        Self {
            warning_shed_pct: 25,
            critical_shed_pct: 75,
            engine_headroom_pct: 10,
        }
    }
}

/// Figures of one cache, for dashboards and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Segments known (resident or on disk).
    pub segments: usize,
    /// Segments in memory.
    pub resident_segments: usize,
    /// Segments marked hot.
    pub pinned_segments: usize,
    /// Bytes held by resident segments.
    pub resident_bytes: usize,
    /// Bytes held by resident pinned segments.
    pub pinned_bytes: usize,
    /// Highest `resident_bytes` seen.
    pub peak_resident_bytes: usize,
    /// Searches and inserts that found their segment resident.
    pub hits: u64,
    /// Segments loaded from disk.
    pub loads: u64,
    /// Segments evicted.
    pub evictions: u64,
    /// Bytes released by evictions.
    pub evicted_bytes: u64,
    /// Loads or inserts refused for lack of Vector memory.
    pub denials: u64,
    /// Reclaim requests served (governor or pressure).
    pub reclaims: u64,
    /// Slowest reclaim request.
    pub reclaim_max_latency: Duration,
    /// Sum of reclaim latencies (divide by `reclaims` for the mean).
    pub reclaim_total_latency: Duration,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    denials: AtomicU64,
    reclaims: AtomicU64,
    reclaim_max_ns: AtomicU64,
    reclaim_total_ns: AtomicU64,
    peak: AtomicUsize,
}

struct SlotBody {
    resident: Option<Arc<GovernedHnsw>>,
    /// Where the last persist put it; `None` until the first persist.
    manifest: Option<SegmentManifest>,
}

/// A manifest that failed its checks: which file, and why.
#[derive(Clone, Debug)]
struct Damage {
    path: PathBuf,
    reason: String,
}

impl Damage {
    fn error(&self, segment: &SegmentId) -> HnswError {
        HnswError::Corrupt {
            segment: segment.clone(),
            path: self.path.clone(),
            reason: self.reason.clone(),
        }
    }
}

struct Slot {
    id: SegmentId,
    body: Mutex<SlotBody>,
    /// Bytes the resident segment holds, 0 while cold; shared with the segment, which keeps
    /// it current. Figures and eviction planning read it without taking `body`: an observer
    /// preempted while holding a slot's lock would otherwise make eviction skip the slot as
    /// busy (and a pressure shed then leave a cold segment behind).
    charged: Arc<AtomicUsize>,
    pinned: AtomicBool,
    last_access: AtomicU64,
    /// The segment's manifest failed its checks: never loaded, and its id stays taken so
    /// nothing overwrites the files kept for inspection.
    damaged: Option<Damage>,
}

impl Slot {
    fn new(id: SegmentId, body: SlotBody, damaged: Option<Damage>) -> Self {
        Self {
            id,
            body: Mutex::new(body),
            charged: Arc::default(),
            pinned: AtomicBool::new(false),
            last_access: AtomicU64::new(0),
            damaged,
        }
    }

    /// Bytes held while resident, 0 when cold.
    fn charged(&self) -> usize {
        self.charged.load(Ordering::Acquire)
    }
}

pub(crate) struct Inner {
    governor: Arc<MemoryGovernor>,
    dir: PathBuf,
    /// Settings for new segments: given to the builder, or taken from a sound manifest.
    /// `None` only when neither was there and every manifest found was damaged; then
    /// creating a segment is refused, naming those manifests.
    params: Option<HnswParams>,
    policy: PressurePolicy,
    name: String,
    slots: RwLock<BTreeMap<SegmentId, Arc<Slot>>>,
    /// Damaged manifests whose file name names no segment (we never write such names).
    unnamed_damage: Vec<Damage>,
    clock: AtomicU64,
    counters: Counters,
}

/// Builds an [`HnswCache`]; see [`HnswCache::builder`].
pub struct HnswCacheBuilder {
    governor: Arc<MemoryGovernor>,
    dir: PathBuf,
    params: Option<HnswParams>,
    policy: PressurePolicy,
    name: String,
}

impl HnswCacheBuilder {
    /// Settings for segments this cache creates (required unless the directory already
    /// holds segments, whose own settings are kept). Without them, a directory that holds
    /// no sound manifest still builds when it holds damaged ones (it serves nothing, lists
    /// the damage, and refuses to create segments); an empty one fails the build.
    #[must_use]
    pub fn params(mut self, params: HnswParams) -> Self {
        self.params = Some(params);
        self
    }

    /// Reaction to pressure; default [`PressurePolicy::default`].
    #[must_use]
    pub fn pressure_policy(mut self, policy: PressurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Name in metrics (default `hnsw-cache`), unique per cache within the Vector engine.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Opens the directory (creating it), registers every persisted segment as cold, and
    /// registers the cache with the governor as the Vector engine's reclaimer and as a
    /// source of consumer stats.
    ///
    /// A manifest that fails its checks does not fail the build: its segment is listed but
    /// never loaded (every use of it, [`HnswCache::search_all`] included, returns
    /// [`HnswError::Corrupt`] naming the file), its files are left as they are, and
    /// [`HnswCache::damaged`] lists it. Every other segment is served.
    ///
    /// Without [`params`](Self::params) the settings for new segments come from a sound
    /// manifest. When every manifest is damaged there is none to take them from; the build
    /// still succeeds (so the damage can be listed), and
    /// [`HnswCache::create_segment`] fails with [`HnswError::InvalidConfig`] naming the
    /// damaged manifests. A directory without any manifest fails the build with
    /// [`HnswError::InvalidConfig`]: it needs `params`.
    pub fn build(self) -> Result<HnswCache, HnswError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| HnswError::io(&self.dir, e))?;
        let mut manifests = Vec::new();
        let mut damaged = BTreeMap::new();
        let mut unnamed_damage = Vec::new();
        for found in store::scan(&self.dir)? {
            match found {
                store::Scanned::Ok(m) => manifests.push(m),
                store::Scanned::Damaged {
                    segment: Some(id),
                    path,
                    reason,
                } => {
                    damaged.insert(id, Damage { path, reason });
                }
                store::Scanned::Damaged {
                    segment: None,
                    path,
                    reason,
                } => unnamed_damage.push(Damage { path, reason }),
            }
        }
        let params = match (self.params, manifests.first()) {
            (Some(p), _) => Some(p),
            (None, Some(m)) => Some(m.params()),
            // Damaged manifests are not an empty directory: build, so that `damaged()` can
            // say what is wrong; only creating a segment needs the settings.
            (None, None) if !damaged.is_empty() || !unnamed_damage.is_empty() => None,
            (None, None) => {
                return Err(HnswError::InvalidConfig {
                    field: "params",
                    reason: "an empty cache directory needs HnswCacheBuilder::params(..) to \
                             know how to build new segments"
                        .to_owned(),
                });
            }
        };
        if let Some(params) = &params {
            params.validate()?;
        }
        for (field, pct) in [
            ("warning_shed_pct", self.policy.warning_shed_pct),
            ("critical_shed_pct", self.policy.critical_shed_pct),
            ("engine_headroom_pct", self.policy.engine_headroom_pct),
        ] {
            if pct > 100 {
                return Err(HnswError::InvalidConfig {
                    field,
                    reason: format!("{pct} is not a percentage (0..=100)"),
                });
            }
        }
        let mut slots = BTreeMap::new();
        let cold = |id: SegmentId, manifest, damaged| {
            let body = SlotBody {
                resident: None,
                manifest,
            };
            Arc::new(Slot::new(id, body, damaged))
        };
        for m in manifests {
            let id = m.segment()?;
            slots.insert(id.clone(), cold(id, Some(m), None));
        }
        for (id, damage) in damaged {
            slots.insert(id.clone(), cold(id, None, Some(damage)));
        }
        let inner = Arc::new(Inner {
            governor: Arc::clone(&self.governor),
            dir: self.dir,
            params,
            policy: self.policy,
            name: self.name,
            slots: RwLock::new(slots),
            unnamed_damage,
            clock: AtomicU64::new(1),
            counters: Counters::default(),
        });
        // The governor holds these adapters, not the cache: a Weak lets the cache drop.
        let reclaimer = self.governor.register_reclaimer(
            EngineId::Vector,
            Arc::new(CacheReclaimer(Arc::downgrade(&inner))),
        );
        let stats = self
            .governor
            .register_consumer_stats(Arc::new(CacheStatsSource(Arc::downgrade(&inner))));
        Ok(HnswCache {
            inner,
            _reclaimer: reclaimer,
            _stats: stats,
            watcher: Mutex::new(None),
        })
    }
}

/// Many HNSW segments (one per collection shard) under the Vector engine's budget.
///
/// Pick it when the vectors do not all fit the Vector budget: segments live on disk in
/// `hnsw_rs`'s dump format and are loaded when searched; cold ones are evicted when a load
/// or insert needs room, when pressure rises, and when the governor reclaims. Segments
/// marked hot ([`HnswCache::pin`]) hold the routing data a workload needs every time and
/// stay resident through Warning and Critical pressure.
///
/// ```
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
/// use hnsw_adapter::{HnswCache, HnswParams, SegmentId};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(512))
///         .engine(EngineId::Vector, EngineBudget::new(mib(64)))
///         .build()?,
/// )?;
/// let dir = tempfile::tempdir()?;
/// let cache = HnswCache::builder(governor.clone(), dir.path())
///     .params(HnswParams::new(4).expected_points(100))
///     .build()?;
/// // Inside a Tokio runtime, also: let _watcher = cache.spawn_pressure_watcher()?;
/// let seg = SegmentId::new("docs", 0)?;
/// cache.create_segment(&seg)?;
/// cache.insert(&seg, 7, &[0.5, 0.1, 0.0, 1.0])?;
/// cache.insert(&seg, 8, &[9.0, 9.0, 9.0, 9.0])?;
/// cache.persist_all()?;
/// cache.evict(&seg)?; // back on disk only
/// assert_eq!(governor.reserved(EngineId::Vector), 0);
/// let hits = cache.search_all(&[0.5, 0.1, 0.0, 0.9], 1, 16)?; // loads it again
/// assert_eq!(hits[0].id, 7);
/// assert_eq!(governor.reserved(EngineId::Vector), cache.stats().resident_bytes);
/// # Ok(()) }
/// ```
pub struct HnswCache {
    inner: Arc<Inner>,
    _reclaimer: ReclaimerHandle,
    _stats: StatsSourceHandle,
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for HnswCache {
    /// Stops the pressure watcher and writes changed segments to disk: inserts since the
    /// last persist must not vanish with the cache. A failure is logged (a destructor
    /// cannot return it); call [`HnswCache::persist_all`] first to handle errors yourself.
    fn drop(&mut self) {
        if let Some(w) = self.watcher.lock().take() {
            w.abort();
        }
        if let Err(e) = self.persist_all() {
            tracing::error!(cache = %self.inner.name, error = %e, "changed vector segments not persisted on drop");
        }
    }
}

impl HnswCache {
    /// Starts a builder for a cache whose segments live in `dir`.
    pub fn builder(governor: Arc<MemoryGovernor>, dir: impl AsRef<Path>) -> HnswCacheBuilder {
        HnswCacheBuilder {
            governor,
            dir: dir.as_ref().to_owned(),
            params: None,
            policy: PressurePolicy::default(),
            name: "hnsw-cache".to_owned(),
        }
    }

    /// Settings used for new segments: those given to the builder, else a sound manifest's.
    /// `None` when neither was there because every manifest in the directory is damaged
    /// (see [`HnswCacheBuilder::build`]); [`create_segment`](Self::create_segment) is then
    /// refused.
    pub fn params(&self) -> Option<&HnswParams> {
        self.inner.params.as_ref()
    }

    /// The segments known, in id order.
    pub fn segments(&self) -> Vec<SegmentId> {
        self.inner.slots.read().keys().cloned().collect()
    }

    /// Segments whose manifest failed its checks when the cache was built, as the
    /// [`HnswError::Corrupt`] each use of them returns (naming the file and what is wrong).
    /// Their files are kept as found; remove or restore them, then build the cache again.
    pub fn damaged(&self) -> Vec<HnswError> {
        let unnamed = SegmentId::new("unnamed", 0).expect("valid literal id");
        let mut out: Vec<HnswError> = self
            .inner
            .slots
            .read()
            .values()
            .filter_map(|s| s.damaged.as_ref().map(|d| d.error(&s.id)))
            .collect();
        out.extend(self.inner.unnamed_damage.iter().map(|d| d.error(&unnamed)));
        out
    }

    /// Creates an empty, resident segment (reserving its tables first).
    ///
    /// Fails with [`HnswError::InvalidConfig`] (field `params`) when the cache has no
    /// settings for new segments: built without [`HnswCacheBuilder::params`] on a directory
    /// whose only manifests are damaged; the error names them.
    pub fn create_segment(&self, id: &SegmentId) -> Result<(), HnswError> {
        self.inner.create_segment(id)
    }

    /// Adds a vector to a segment, loading the segment first if it is cold. When the insert
    /// cannot reserve its bytes, colder segments are evicted and it retries; if that is not
    /// enough it returns [`HnswError::Backpressure`] having allocated nothing.
    pub fn insert(
        &self,
        id: &SegmentId,
        vector_id: usize,
        vector: &[f32],
    ) -> Result<(), HnswError> {
        self.inner.insert(id, vector_id, vector)
    }

    /// The `k` nearest vectors of one segment, loading it if needed.
    pub fn search(
        &self,
        id: &SegmentId,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<Vec<SearchHit>, HnswError> {
        let seg = self.inner.resident(id)?;
        seg.search(query, k, ef)
    }

    /// The `k` nearest vectors over all segments (resident ones searched first, then each
    /// cold one loaded in turn, evicting colder ones as needed).
    pub fn search_all(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Result<Vec<SearchHit>, HnswError> {
        let mut out = self.search_all_batch(std::slice::from_ref(&query), k, ef)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// [`HnswCache::search_all`] for many queries at once: each cold segment is loaded once
    /// for the whole batch, which is what a byte-starved cache needs to stay fast.
    pub fn search_all_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        ef: usize,
    ) -> Result<Vec<Vec<SearchHit>>, HnswError> {
        self.inner.search_all_batch(queries, k, ef)
    }

    /// Marks a segment hot and makes it resident: it survives Warning and Critical pressure
    /// and reclaims, and goes last (after every cold segment) in an Emergency. If it cannot
    /// be loaded now ([`HnswError::NoRoom`]), it stays marked hot and the error is returned.
    /// Hotness is a run-time choice of the caller; it is not persisted.
    pub fn pin(&self, id: &SegmentId) -> Result<(), HnswError> {
        let slot = self.inner.slot(id)?;
        slot.pinned.store(true, Ordering::Release);
        self.inner.resident(id).map(drop)
    }

    /// Makes a hot segment ordinary again (it stays resident until evicted).
    pub fn unpin(&self, id: &SegmentId) -> Result<(), HnswError> {
        self.inner.slot(id)?.pinned.store(false, Ordering::Release);
        Ok(())
    }

    /// True when the segment is in memory.
    pub fn is_resident(&self, id: &SegmentId) -> bool {
        self.inner.slot(id).is_ok_and(|s| s.charged() > 0)
    }

    /// True when the segment is marked hot.
    pub fn is_pinned(&self, id: &SegmentId) -> bool {
        self.inner
            .slot(id)
            .is_ok_and(|s| s.pinned.load(Ordering::Acquire))
    }

    /// Writes one segment to disk if it changed since its last persist.
    pub fn persist(&self, id: &SegmentId) -> Result<(), HnswError> {
        let slot = self.inner.slot(id)?;
        let mut body = slot.body.lock();
        self.inner.persist_locked(&slot, &mut body)
    }

    /// Writes every changed segment to disk.
    pub fn persist_all(&self) -> Result<(), HnswError> {
        for id in self.segments() {
            self.persist(&id)?;
        }
        Ok(())
    }

    /// Evicts one segment now (persisting it first if it changed). Returns the bytes
    /// released, 0 if it was not resident or is in use.
    pub fn evict(&self, id: &SegmentId) -> Result<usize, HnswError> {
        let slot = self.inner.slot(id)?;
        Ok(self.inner.try_evict(&slot))
    }

    /// Reacts to a pressure level as the watcher would (see [`PressurePolicy`]); returns
    /// bytes released. Exposed for callers that poll pressure themselves.
    pub fn shed_for_pressure(&self, global: PressureLevel, vector: PressureLevel) -> usize {
        self.inner.shed_for_pressure(global, vector)
    }

    /// Evicts cold segments (and, in a global Emergency, hot ones last) until `target`
    /// bytes are released; what the governor's reclaim calls. Returns bytes released.
    pub fn reclaim(&self, target: usize) -> usize {
        self.inner.reclaim(target)
    }

    /// Spawns a task on the current Tokio runtime that follows the global and Vector
    /// pressure channels and sheds segments per the [`PressurePolicy`]. It stops when the
    /// cache is dropped.
    pub fn spawn_pressure_watcher(&self) -> Result<tokio::task::JoinHandle<()>, HnswError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| HnswError::NoRuntime)?;
        let mut global = self.inner.governor.subscribe_global_pressure();
        let mut vector = self.inner.governor.subscribe_pressure(EngineId::Vector);
        let weak = Arc::downgrade(&self.inner);
        let task = handle.spawn(async move {
            loop {
                let g = *global.borrow_and_update();
                let v = *vector.borrow_and_update();
                if g > PressureLevel::Normal || v >= PressureLevel::Critical {
                    let Some(inner) = weak.upgrade() else { break };
                    // Eviction may dump a changed segment to disk: keep it off the workers.
                    let shed = tokio::task::spawn_blocking(move || inner.shed_for_pressure(g, v));
                    if shed.await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    r = global.changed() => if r.is_err() { break },
                    r = vector.changed() => if r.is_err() { break },
                }
            }
        });
        if let Some(old) = self.watcher.lock().replace(task.abort_handle()) {
            old.abort();
        }
        Ok(task)
    }

    /// Current figures.
    pub fn stats(&self) -> CacheStats {
        self.inner.stats()
    }

    /// Bytes held by resident pinned segments.
    pub fn pinned_bytes(&self) -> usize {
        self.inner.stats().pinned_bytes
    }
}

impl Inner {
    fn slot(&self, id: &SegmentId) -> Result<Arc<Slot>, HnswError> {
        self.slots
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| HnswError::UnknownSegment(id.clone()))
    }

    fn touch(&self, slot: &Slot) {
        slot.last_access.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Why `id` cannot be created without settings: the only manifests found were damaged,
    /// named here (the first few, and how many more) so the operator knows what to restore.
    fn no_params(&self, id: &SegmentId) -> HnswError {
        /// Manifests named at most; a directory of thousands must not make a huge message.
        const NAMED: usize = 5;
        let slots = self.slots.read();
        let paths: Vec<String> = slots
            .values()
            .filter_map(|s| s.damaged.as_ref())
            .chain(&self.unnamed_damage)
            .map(|d| d.path.display().to_string())
            .collect();
        let named = paths
            .iter()
            .take(NAMED)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let more = if paths.len() > NAMED {
            format!(" and {} more", paths.len() - NAMED)
        } else {
            String::new()
        };
        HnswError::InvalidConfig {
            field: "params",
            reason: format!(
                "cannot create segment {id}: the cache was built without \
                 HnswCacheBuilder::params(..) and the only manifests in {} are damaged \
                 ({named}{more}), so there are no settings to take; give params, or restore or \
                 remove the damaged manifests (HnswCache::damaged says what is wrong)",
                self.dir.display()
            ),
        }
    }

    fn create_segment(&self, id: &SegmentId) -> Result<(), HnswError> {
        if self.slots.read().contains_key(id) {
            return Err(HnswError::SegmentExists(id.clone()));
        }
        let Some(params) = self.params else {
            return Err(self.no_params(id));
        };
        let charged = Arc::new(AtomicUsize::new(0));
        let mut attempt = 0;
        let seg = loop {
            let meter = Arc::clone(&charged);
            match GovernedHnsw::create_metered(&self.governor, id.clone(), params, meter) {
                Ok(seg) => break seg,
                Err(HnswError::Backpressure { needed, source, .. }) => {
                    attempt += 1;
                    if attempt >= MAX_ATTEMPTS || self.make_room(needed, Some(id)) == 0 {
                        return Err(self.no_room(id, needed, source));
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let body = SlotBody {
            resident: Some(Arc::new(seg)),
            manifest: None,
        };
        let slot = Arc::new(Slot {
            charged,
            ..Slot::new(id.clone(), body, None)
        });
        self.touch(&slot);
        let mut slots = self.slots.write();
        if slots.contains_key(id) {
            // Lost a race with another create: our segment (and its token) is dropped.
            return Err(HnswError::SegmentExists(id.clone()));
        }
        slots.insert(id.clone(), slot);
        drop(slots);
        self.note_peak();
        Ok(())
    }

    fn no_room(&self, id: &SegmentId, needed: usize, source: MemError) -> HnswError {
        self.counters.denials.fetch_add(1, Ordering::Relaxed);
        HnswError::NoRoom {
            segment: id.clone(),
            needed,
            available: self.governor.available(EngineId::Vector),
            pinned: self.pinned_bytes(),
            source,
        }
    }

    fn insert(&self, id: &SegmentId, vector_id: usize, vector: &[f32]) -> Result<(), HnswError> {
        let seg = self.resident(id)?;
        let mut attempt = 0;
        loop {
            match seg.insert(vector_id, vector) {
                Err(HnswError::Backpressure {
                    segment,
                    needed,
                    source,
                }) => {
                    attempt += 1;
                    if attempt >= MAX_ATTEMPTS || self.make_room(needed, Some(id)) == 0 {
                        self.counters.denials.fetch_add(1, Ordering::Relaxed);
                        return Err(HnswError::Backpressure {
                            segment,
                            needed,
                            source,
                        });
                    }
                }
                other => {
                    self.note_peak();
                    return other;
                }
            }
        }
    }

    /// The segment, loading it if it is cold. The load reserves its peak first and evicts
    /// colder segments for it; it never loads over budget.
    fn resident(&self, id: &SegmentId) -> Result<Arc<GovernedHnsw>, HnswError> {
        let slot = self.slot(id)?;
        self.touch(&slot);
        let mut body = slot.body.lock();
        if let Some(seg) = &body.resident {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(seg));
        }
        if let Some(damage) = &slot.damaged {
            return Err(damage.error(id));
        }
        let Some(manifest) = body.manifest.clone() else {
            // A never-persisted segment is resident until persisted; reaching here would
            // mean it was dropped unpersisted, which eviction never does.
            return Err(HnswError::UnknownSegment(id.clone()));
        };
        let mut token = self.reserve_evicting(id, manifest.load_reservation())?;
        let loaded = store::load_graph(&self.dir, &manifest)?;
        // Book what the loaded graph measures, not what the file claims (the loader's
        // temporary map is gone by now). On failure the graph goes before its token.
        let bytes = loaded.measured.resident;
        if let Err(e) = self.rebook(&mut token, bytes, id) {
            drop(loaded);
            return Err(e);
        }
        if manifest.is_checksummed() && manifest.resident_bytes() != bytes {
            tracing::warn!(segment = %id, manifest = manifest.resident_bytes(), measured = bytes,
                "vector segment measures other than its manifest says; booked as measured");
        }
        if !manifest.is_checksummed() {
            // An old, unchecksummed manifest: rewrite it with the measured figures so later
            // loads reserve what this one found instead of the worst case.
            let upgraded = manifest.remeasured(&loaded.measured);
            match store::write_manifest_file(&self.dir, &upgraded) {
                Ok(()) => body.manifest = Some(upgraded),
                Err(e) => tracing::warn!(segment = %id, error = %e,
                    "could not rewrite an old vector manifest; it stays unchecksummed"),
            }
        }
        let seg = Arc::new(GovernedHnsw::assemble(
            loaded.graph,
            loaded.model,
            token,
            id.clone(),
            manifest.params(),
            false,
            Arc::clone(&slot.charged),
        ));
        body.resident = Some(Arc::clone(&seg));
        drop(body);
        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.note_peak();
        tracing::debug!(segment = %id, bytes, "vector segment loaded");
        Ok(seg)
    }

    /// Resizes a load's reservation to `bytes`: returns the surplus, or grows it (evicting
    /// colder segments as a load would) when the graph measures more than was reserved.
    fn rebook(
        &self,
        token: &mut ReservationToken,
        bytes: usize,
        id: &SegmentId,
    ) -> Result<(), HnswError> {
        let held = token.size();
        if bytes <= held {
            token.shrink(held - bytes)?;
            return Ok(());
        }
        let more = bytes - held;
        let mut attempt = 0;
        loop {
            let refused = match token.try_grow(more) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            attempt += 1;
            if attempt >= MAX_ATTEMPTS || self.make_room(more, Some(id)) == 0 {
                return Err(self.no_room(id, bytes, refused));
            }
        }
    }

    /// A reservation of `needed` Vector bytes, evicting colder segments (never `id`, never
    /// pinned ones) until the governor grants it.
    fn reserve_evicting(
        &self,
        id: &SegmentId,
        needed: usize,
    ) -> Result<ReservationToken, HnswError> {
        let mut last = None;
        // Pinned bytes are never evicted for a load: if the rest of the limit is too small,
        // say so at once instead of emptying the cache for nothing.
        let limit = self.governor.limit(EngineId::Vector);
        if needed > limit.saturating_sub(self.pinned_bytes()) {
            let source = match self.governor.try_reserve(EngineId::Vector, needed) {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            return Err(self.no_room(id, needed, source));
        }
        for _ in 0..MAX_ATTEMPTS {
            match self.governor.try_reserve(EngineId::Vector, needed) {
                Ok(t) => return Ok(t),
                Err(e) => last = Some(e),
            }
            if self.make_room(needed, Some(id)) == 0 {
                break;
            }
        }
        let source = match last {
            Some(e) => e,
            None => match self.governor.try_reserve(EngineId::Vector, needed) {
                Ok(t) => return Ok(t),
                Err(e) => e,
            },
        };
        Err(self.no_room(id, needed, source))
    }

    /// Evicts cold segments until `needed` more bytes could be granted; returns bytes freed.
    fn make_room(&self, needed: usize, except: Option<&SegmentId>) -> usize {
        let shortfall = needed
            .saturating_sub(self.governor.available(EngineId::Vector))
            .max(1);
        self.evict_coldest(shortfall, except, false)
    }

    /// Evicts least-recently-used segments until `target` bytes are released: unpinned ones
    /// first, pinned ones only when `include_pinned`. Busy segments are skipped.
    fn evict_coldest(
        &self,
        target: usize,
        except: Option<&SegmentId>,
        include_pinned: bool,
    ) -> usize {
        let mut candidates: Vec<(bool, u64, Arc<Slot>)> = self
            .slots
            .read()
            .values()
            .filter(|s| Some(&s.id) != except)
            .map(|s| {
                (
                    s.pinned.load(Ordering::Acquire),
                    s.last_access.load(Ordering::Relaxed),
                    Arc::clone(s),
                )
            })
            .filter(|(pinned, _, _)| include_pinned || !pinned)
            .collect();
        candidates.sort_by_key(|(pinned, last, _)| (*pinned, *last));
        let mut freed = 0;
        for (_, _, slot) in candidates {
            if freed >= target {
                break;
            }
            freed += self.try_evict(&slot);
        }
        freed
    }

    /// Drops a slot's resident graph if nobody uses it, persisting it first if it changed.
    fn try_evict(&self, slot: &Slot) -> usize {
        // A slot being loaded holds its lock for long; skip it rather than wait.
        let Some(mut body) = slot.body.try_lock_for(SLOT_WAIT) else {
            return 0;
        };
        let Some(seg) = body.resident.as_ref() else {
            return 0;
        };
        if Arc::strong_count(seg) > 1 {
            return 0;
        }
        if (seg.is_dirty() || body.manifest.is_none())
            && let Err(e) = self.persist_locked(slot, &mut body)
        {
            tracing::warn!(segment = %slot.id, error = %e, "not evicting a segment that failed to persist");
            return 0;
        }
        let Some(seg) = body.resident.take() else {
            return 0;
        };
        let bytes = seg.charged_bytes();
        drop(seg);
        slot.charged.store(0, Ordering::Release);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        tracing::debug!(segment = %slot.id, bytes, "vector segment evicted");
        bytes
    }

    fn persist_locked(&self, slot: &Slot, body: &mut SlotBody) -> Result<(), HnswError> {
        let Some(seg) = body.resident.as_ref() else {
            return Ok(()); // cold: its dump is current
        };
        if !seg.is_dirty() && body.manifest.is_some() {
            return Ok(());
        }
        let generation = body.manifest.as_ref().map_or(1, |m| m.generation() + 1);
        let manifest = seg.persist(&self.dir, generation, body.manifest.as_ref())?;
        tracing::debug!(segment = %slot.id, generation, "vector segment persisted");
        body.manifest = Some(manifest);
        Ok(())
    }

    fn search_all_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        ef: usize,
    ) -> Result<Vec<Vec<SearchHit>>, HnswError> {
        let slots: Vec<Arc<Slot>> = self.slots.read().values().cloned().collect();
        let mut results = vec![Vec::new(); queries.len()];
        // Resident segments first: a later load may evict them.
        let mut order: Vec<(bool, Arc<Slot>)> =
            slots.into_iter().map(|s| (s.charged() == 0, s)).collect();
        order.sort_by_key(|(cold, s)| (*cold, s.id.clone()));
        for (_, slot) in order {
            let seg = self.resident(&slot.id)?;
            for (q, out) in queries.iter().zip(results.iter_mut()) {
                check_vector(&slot.id, seg.params().dim(), q.as_ref())?;
                out.extend(seg.search(q.as_ref(), k, ef)?);
            }
        }
        for out in &mut results {
            out.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
            out.truncate(k);
        }
        Ok(results)
    }

    fn pressure(&self) -> PressureLevel {
        self.governor.global_pressure()
    }

    fn shed_for_pressure(&self, global: PressureLevel, vector: PressureLevel) -> usize {
        let start = Instant::now();
        // Two separate reads: a load or pin between them can make pinned exceed the older
        // resident figure, so the difference must not underflow.
        let unpinned = self
            .stats()
            .resident_bytes
            .saturating_sub(self.pinned_bytes());
        let share = |pct: u8| unpinned / 100 * usize::from(pct);
        let mut freed = match global {
            PressureLevel::Normal => 0,
            PressureLevel::Warning => {
                self.evict_coldest(share(self.policy.warning_shed_pct), None, false)
            }
            PressureLevel::Critical => {
                self.evict_coldest(share(self.policy.critical_shed_pct), None, false)
            }
            PressureLevel::Emergency => self.emergency_shed(usize::MAX),
        };
        if vector >= PressureLevel::Critical {
            let limit = self.governor.limit(EngineId::Vector);
            let keep_free = limit / 100 * usize::from(self.policy.engine_headroom_pct);
            let used = self.governor.reserved(EngineId::Vector);
            let target = (used + keep_free).saturating_sub(limit);
            if target > 0 {
                freed += self.evict_coldest(target, None, false);
            }
        }
        if freed > 0 {
            tracing::info!(
                cache = %self.name, ?global, ?vector, freed,
                elapsed_us = start.elapsed().as_micros() as u64,
                "vector cache shed segments under pressure"
            );
        }
        freed
    }

    /// Emergency: every unpinned segment, then pinned ones coldest first while the global
    /// Emergency lasts (each eviction may end it).
    fn emergency_shed(&self, target: usize) -> usize {
        let mut freed = self.evict_coldest(target, None, false);
        while freed < target && self.pressure() == PressureLevel::Emergency {
            let one = self.evict_coldest(1, None, true);
            if one == 0 {
                break;
            }
            freed += one;
        }
        freed
    }

    fn reclaim(&self, target: usize) -> usize {
        let start = Instant::now();
        let freed = if self.pressure() == PressureLevel::Emergency {
            self.emergency_shed(target)
        } else {
            self.evict_coldest(target, None, false)
        };
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters.reclaims.fetch_add(1, Ordering::Relaxed);
        self.counters
            .reclaim_total_ns
            .fetch_add(ns, Ordering::Relaxed);
        self.counters
            .reclaim_max_ns
            .fetch_max(ns, Ordering::Relaxed);
        tracing::info!(cache = %self.name, target, freed, elapsed_us = ns / 1000, "vector cache reclaimed");
        freed
    }

    /// What a reclaim could release now without touching hot segments (unless Emergency).
    fn reclaimable(&self) -> usize {
        let emergency = self.pressure() == PressureLevel::Emergency;
        self.slots
            .read()
            .values()
            .filter(|s| emergency || !s.pinned.load(Ordering::Acquire))
            // A segment in use by a search at this instant is counted too: this is a plan,
            // and what a reclaim really frees is what it reports.
            .map(|s| s.charged())
            .sum()
    }

    fn pinned_bytes(&self) -> usize {
        self.resident_bytes_where(true)
    }

    fn resident_bytes_where(&self, pinned_only: bool) -> usize {
        self.slots
            .read()
            .values()
            .filter(|s| !pinned_only || s.pinned.load(Ordering::Acquire))
            // A slot being loaded reads 0 until the load completes and books its token.
            .map(|s| s.charged())
            .sum()
    }

    fn note_peak(&self) {
        let now = self.resident_bytes_where(false);
        self.counters.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn stats(&self) -> CacheStats {
        let slots = self.slots.read();
        let mut s = CacheStats {
            segments: slots.len(),
            ..CacheStats::default()
        };
        for slot in slots.values() {
            let pinned = slot.pinned.load(Ordering::Acquire);
            s.pinned_segments += usize::from(pinned);
            let charged = slot.charged();
            if charged > 0 {
                s.resident_segments += 1;
                s.resident_bytes += charged;
                if pinned {
                    s.pinned_bytes += charged;
                }
            }
        }
        drop(slots);
        let c = &self.counters;
        s.peak_resident_bytes = c
            .peak
            .fetch_max(s.resident_bytes, Ordering::Relaxed)
            .max(s.resident_bytes);
        s.hits = c.hits.load(Ordering::Relaxed);
        s.loads = c.loads.load(Ordering::Relaxed);
        s.evictions = c.evictions.load(Ordering::Relaxed);
        s.evicted_bytes = c.evicted_bytes.load(Ordering::Relaxed);
        s.denials = c.denials.load(Ordering::Relaxed);
        s.reclaims = c.reclaims.load(Ordering::Relaxed);
        s.reclaim_max_latency = Duration::from_nanos(c.reclaim_max_ns.load(Ordering::Relaxed));
        s.reclaim_total_latency = Duration::from_nanos(c.reclaim_total_ns.load(Ordering::Relaxed));
        s
    }
}

/// The cache as the Vector engine's reclaimer. Holds a `Weak` so the governor's registry
/// does not keep a dropped cache alive.
struct CacheReclaimer(Weak<Inner>);

#[async_trait::async_trait]
impl Reclaimer for CacheReclaimer {
    fn reclaimable(&self) -> usize {
        self.0.upgrade().map_or(0, |i| i.reclaimable())
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let inner = self
            .0
            .upgrade()
            .ok_or_else(|| ReclaimError::new("HNSW cache already dropped"))?;
        // Eviction is synchronous (it may persist a changed segment); it runs on the
        // governor's reclaim runtime, which bounds it with its reclaim timeout.
        Ok(inner.reclaim(target))
    }
}

/// Publishes the cache's reserved and pinned bytes in governor snapshots.
struct CacheStatsSource(Weak<Inner>);

impl ConsumerStatsSource for CacheStatsSource {
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        let Some(inner) = self.0.upgrade() else {
            return Vec::new();
        };
        let s = inner.stats();
        vec![ConsumerSnapshot {
            engine: EngineId::Vector,
            name: inner.name.clone(),
            reserved: s.resident_bytes,
            peak: s.peak_resident_bytes,
            denials: s.denials,
            pinned: s.pinned_bytes,
        }]
    }
}
