//! [`GovernedCache`]: values under one engine's budget, each paid for by its own
//! reservation taken *before* the value is built, evicted least recently used first.
//!
//! ```text
//!   get_or_try_load(k, estimate, load)
//!        │  index: k → slot (recency stamp, pinned, bytes)      governor
//!        ▼                                                     ┌─────────┐
//!   slot k locked ── resident? ── yes ──▶ Arc<V>               │ engine  │
//!        │ no                                                  │ budget  │
//!        ├─ try_reserve(estimate) ────────────────────────────▶│         │
//!        │     denied → evict coldest unpinned (hook first) ──▶│ freed   │
//!        ├─ load() → (V, actual) ; settle token to actual      │         │
//!        └─ resident: Arc<V> + token                           └────┬────┘
//!                                                    reclaim(N) ◀───┘ pressure ──▶ shed
//! ```
//!
//! Rules the code keeps:
//! - **Books equal the sum of resident entries.** Each resident entry owns one
//!   [`ReservationToken`] of `bytes + ENTRY_OVERHEAD`; the cache holds nothing else from
//!   the governor. Evicting drops the token.
//! - **Nothing in use is freed on the books.** An entry whose value a caller still holds
//!   (`Arc` shared) is skipped by eviction, so the books never claim memory back that is
//!   still reachable.
//! - **The hook runs before the drop.** An entry is dropped only after the eviction hook
//!   returned `Ok` (it may persist the value); if the hook fails, the entry stays resident
//!   and is counted in [`CacheStats::hook_failures`].
//! - **Pinned entries are never evicted** by loads, reclaims or pressure (only by an
//!   explicit [`GovernedCache::remove`]); a pin lasts as long as the residency.
//! - **A reclaim frees what it asks or everything unpinned** that is not in use and whose
//!   hook succeeds.

mod policy;
mod state;

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor_core::{
    ConsumerSnapshot, ConsumerStatsSource, EngineId, MemError, MemoryGovernor, PressureLevel,
    ReclaimError, Reclaimer, ReclaimerHandle, ReservationToken, StatsSourceHandle,
};
use parking_lot::Mutex;

pub use policy::ShedPolicy;
use state::{Index, Resident, Slot};

use crate::error::{CacheError, PersistError};

/// How many times a load or resize evicts and retries before it reports
/// [`CacheError::NoRoom`]; more only helps when other threads keep taking what we free.
const MAX_ATTEMPTS: usize = 4;

/// How long eviction waits for an entry's lock before skipping it. Gets hold it for
/// microseconds, loads and hooks for milliseconds: this gets past the former without
/// stalling behind the latter, and two loaders evicting for each other cannot deadlock.
const SLOT_WAIT: Duration = Duration::from_millis(2);

/// Bytes each entry is charged on top of its value's own figure: its index entry (hash map
/// slot and recency-order node, each at about twice its size for load factor and tree
/// fan-out), its slot, the value's `Arc` header and the token. An upper bound for keys and
/// values whose inline size is at most 64 bytes; the value's inline size is added to it.
pub const ENTRY_OVERHEAD: usize = 256;

/// Runs before the cache drops an entry for room, pressure or a reclaim: the place to
/// persist a changed value. Returning an error keeps the entry resident.
///
/// It runs with the entry's lock held (a concurrent user of that key waits until the value
/// is persisted and dropped, then reloads it) and must not call back into the same cache.
pub trait EvictionHook<K, V>: Send + Sync {
    /// Persists `value` if it needs it.
    fn before_evict(&self, key: &K, value: &V) -> Result<(), PersistError>;
}

/// Figures of one cache, for dashboards and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Resident entries.
    pub entries: usize,
    /// Bytes charged for resident entries (values plus overhead): the cache's books.
    pub resident_bytes: usize,
    /// Bytes of those held by pinned entries.
    pub pinned_bytes: usize,
    /// Highest `resident_bytes` seen.
    pub peak_bytes: usize,
    /// Lookups that found their entry resident.
    pub hits: u64,
    /// Lookups that had to load.
    pub misses: u64,
    /// Entries evicted (after their hook succeeded).
    pub evictions: u64,
    /// Bytes released by evictions.
    pub evicted_bytes: u64,
    /// Eviction hooks that failed (their entries stayed).
    pub hook_failures: u64,
    /// Loads or growths refused for lack of memory.
    pub denials: u64,
    /// Reclaim requests served (governor or caller).
    pub reclaims: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    hook_failures: AtomicU64,
    denials: AtomicU64,
    reclaims: AtomicU64,
}

/// Builds a [`GovernedCache`]; see [`GovernedCache::builder`].
pub struct CacheBuilder<K, V> {
    governor: Arc<MemoryGovernor>,
    engine: EngineId,
    name: String,
    hook: Option<Arc<dyn EvictionHook<K, V>>>,
    policy: ShedPolicy,
}

impl<K, V> CacheBuilder<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Name in metrics and errors (default `cache`), unique within the engine.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Runs before each eviction (default: none, entries are simply dropped).
    #[must_use]
    pub fn eviction_hook(mut self, hook: Arc<dyn EvictionHook<K, V>>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Reaction to pressure (default [`ShedPolicy::default`]).
    #[must_use]
    pub fn shed_policy(mut self, policy: ShedPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Checks the settings and registers the cache with the governor as a reclaimer of its
    /// engine and as a source of consumer stats.
    pub fn build(self) -> Result<GovernedCache<K, V>, CacheError> {
        self.policy.validate()?;
        if self.name.is_empty() {
            return Err(CacheError::InvalidConfig {
                field: "name",
                reason: "a cache needs a name for its metrics and errors".to_owned(),
            });
        }
        let inner = Arc::new(Inner {
            governor: Arc::clone(&self.governor),
            engine: self.engine,
            name: self.name,
            hook: self.hook,
            policy: self.policy,
            index: Mutex::new(Index::new()),
            counters: Counters::default(),
        });
        // The governor's registries hold Weak references: dropping the cache unregisters it.
        let reclaimer = self.governor.register_reclaimer(
            self.engine,
            Arc::new(CacheReclaimer(Arc::downgrade(&inner))),
        );
        let stats = self
            .governor
            .register_consumer_stats(Arc::new(CacheStatsSource(Arc::downgrade(&inner))));
        Ok(GovernedCache {
            inner,
            _reclaimer: reclaimer,
            _stats: stats,
            watcher: Mutex::new(None),
        })
    }
}

/// A byte-weighted cache whose capacity is whatever the governor grants its engine.
///
/// Pick it when values can be rebuilt or reloaded (posting blocks from a store, documents
/// from snapshots) and must share an engine budget with other consumers: it has no
/// capacity of its own, reserves each entry before building it, evicts least recently used
/// unpinned entries when a reservation is denied, when pressure rises and when the governor
/// reclaims, and lets an [`EvictionHook`] persist a value before it goes.
///
/// ```
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
/// use governed_blocks::GovernedCache;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(64))
///         .engine(EngineId::Sparse, EngineBudget::new(mib(1)))
///         .build()?,
/// )?;
/// let cache = GovernedCache::<u32, Vec<u8>>::builder(governor.clone(), EngineId::Sparse).build()?;
/// // Reserve 1000 B (evicting colder entries if needed), then build the value.
/// let v = cache.get_or_try_load(&7, 1000, || Ok::<_, governed_blocks::CacheError>((vec![0u8; 1000], 1000)))?;
/// assert_eq!(v.len(), 1000);
/// assert_eq!(governor.reserved(EngineId::Sparse), cache.stats().resident_bytes);
/// drop(v);
/// assert_eq!(cache.reclaim(1), cache.stats().evicted_bytes as usize);
/// assert_eq!(governor.reserved(EngineId::Sparse), 0);
/// # Ok(()) }
/// ```
pub struct GovernedCache<K, V> {
    inner: Arc<Inner<K, V>>,
    _reclaimer: ReclaimerHandle,
    _stats: StatsSourceHandle,
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl<K, V> Drop for GovernedCache<K, V> {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.lock().take() {
            w.abort();
        }
    }
}

impl<K, V> std::fmt::Debug for GovernedCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovernedCache")
            .field("name", &self.inner.name)
            .field("engine", &self.inner.engine)
            .finish_non_exhaustive()
    }
}

impl<K, V> GovernedCache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Starts a builder for a cache drawing on `engine`'s budget.
    pub fn builder(governor: Arc<MemoryGovernor>, engine: EngineId) -> CacheBuilder<K, V> {
        CacheBuilder {
            governor,
            engine,
            name: "cache".to_owned(),
            hook: None,
            policy: ShedPolicy::default(),
        }
    }

    /// Bytes an entry of `bytes` is charged: `bytes` plus [`ENTRY_OVERHEAD`] plus the
    /// value's inline size. `None` on overflow.
    pub fn charge_for(bytes: usize) -> Option<usize> {
        bytes.checked_add(ENTRY_OVERHEAD + std::mem::size_of::<V>())
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The engine it draws on.
    pub fn engine(&self) -> EngineId {
        self.inner.engine
    }

    /// The resident value of `key`, marked most recently used.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let slot = self.inner.index.lock().touch(key)?;
        let body = slot.body.lock();
        let value = body.as_ref().map(|r| Arc::clone(&r.value));
        if value.is_some() {
            self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        }
        value
    }

    /// The resident value of `key` without changing its recency (for maintenance paths
    /// that must not keep an entry warm).
    pub fn peek(&self, key: &K) -> Option<Arc<V>> {
        let slot = self.inner.index.lock().slot(key)?;
        let body = slot.body.lock();
        body.as_ref().map(|r| Arc::clone(&r.value))
    }

    /// The resident value of `key`, or loads it: reserves `estimate` bytes first (evicting
    /// colder entries until the governor grants them), then runs `load`, which returns the
    /// value and its actual size; the reservation is then settled to the actual size. If
    /// the actual size exceeds the estimate and the difference cannot be had, the value is
    /// dropped and [`CacheError::NoRoom`] returned: the cache never keeps more than the
    /// engine grants. Concurrent callers for the same key wait for one load.
    pub fn get_or_try_load<E>(
        &self,
        key: &K,
        estimate: usize,
        load: impl FnOnce() -> Result<(V, usize), E>,
    ) -> Result<Arc<V>, E>
    where
        E: From<CacheError>,
    {
        self.inner.get_or_try_load(key, estimate, load)
    }

    /// Sets the charge of a resident entry to `bytes` (its value grew or shrank). Growth
    /// evicts colder entries when denied; if that is not enough, with `force` the bytes
    /// are charged anyway (for memory that already exists: the excess shows as overcommit
    /// and raises pressure), without it [`CacheError::NoRoom`] is returned and nothing
    /// changes.
    pub fn resize(&self, key: &K, bytes: usize, force: bool) -> Result<(), CacheError> {
        self.inner.resize(key, bytes, force)
    }

    /// Drops `key`'s entry without running the hook (the caller is deleting it, or has
    /// persisted it itself), pinned or not. Returns the value if it was resident.
    pub fn remove(&self, key: &K) -> Option<Arc<V>> {
        let slot = self.inner.index.lock().slot(key)?;
        let mut body = slot.body.lock();
        let resident = body.take()?;
        self.inner.index.lock().emptied(key, &slot);
        drop(body);
        Some(resident.value)
    }

    /// Evicts `key` now (hook first). Returns the bytes released.
    pub fn evict(&self, key: &K) -> Result<usize, CacheError> {
        let inner = &self.inner;
        let not_resident = || CacheError::NotResident {
            cache: inner.name.clone(),
        };
        let slot = inner.index.lock().slot(key).ok_or_else(not_resident)?;
        let mut body = slot.body.lock();
        inner.evict_locked(key, &slot, &mut body)
    }

    /// Keeps `key` resident through loads, pressure and reclaims until [`Self::unpin`] or
    /// [`Self::remove`]. Fails with [`CacheError::NotResident`] if it is not resident.
    pub fn pin(&self, key: &K) -> Result<(), CacheError> {
        self.set_pinned(key, true)
    }

    /// Makes a pinned entry evictable again.
    pub fn unpin(&self, key: &K) -> Result<(), CacheError> {
        self.set_pinned(key, false)
    }

    fn set_pinned(&self, key: &K, pinned: bool) -> Result<(), CacheError> {
        let inner = &self.inner;
        let not_resident = || CacheError::NotResident {
            cache: inner.name.clone(),
        };
        let slot = inner.index.lock().slot(key).ok_or_else(not_resident)?;
        // Holding the body serialises the pin with an eviction of the same entry.
        let body = slot.body.lock();
        if body.is_none() || !inner.index.lock().set_pinned(key, pinned) {
            return Err(not_resident());
        }
        Ok(())
    }

    /// True when `key` is resident.
    pub fn contains(&self, key: &K) -> bool {
        self.inner.index.lock().is_resident(key)
    }

    /// True when `key` is resident and pinned.
    pub fn is_pinned(&self, key: &K) -> bool {
        self.inner.index.lock().is_pinned(key)
    }

    /// Resident keys, least recently used first.
    pub fn keys(&self) -> Vec<K> {
        self.inner.index.lock().keys()
    }

    /// Evicts least recently used unpinned entries until `target` bytes are released or
    /// none is left that can go; what the governor's reclaim calls. Returns bytes released.
    pub fn reclaim(&self, target: usize) -> usize {
        self.inner.reclaim(target)
    }

    /// Bytes a reclaim could release now: resident unpinned entries.
    pub fn reclaimable(&self) -> usize {
        let t = self.inner.index.lock().totals();
        t.resident - t.pinned
    }

    /// Sheds entries for the given pressure levels per the [`ShedPolicy`]; returns bytes
    /// released. What the watcher calls; exposed for callers that poll pressure themselves.
    pub fn shed_for_pressure(&self, global: PressureLevel, engine: PressureLevel) -> usize {
        self.inner.shed_for_pressure(global, engine)
    }

    /// Spawns a task on the current Tokio runtime that follows the global and engine
    /// pressure channels and sheds per the [`ShedPolicy`]. It stops when the cache drops.
    pub fn spawn_pressure_watcher(&self) -> Result<tokio::task::JoinHandle<()>, CacheError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| CacheError::NoRuntime)?;
        let mut global = self.inner.governor.subscribe_global_pressure();
        let mut own = self.inner.governor.subscribe_pressure(self.inner.engine);
        let weak = Arc::downgrade(&self.inner);
        let task = handle.spawn(async move {
            loop {
                let g = *global.borrow_and_update();
                let e = *own.borrow_and_update();
                if g > PressureLevel::Normal || e >= PressureLevel::Critical {
                    let Some(inner) = weak.upgrade() else { break };
                    // Hooks may persist: keep them off the runtime's workers.
                    let shed = tokio::task::spawn_blocking(move || inner.shed_for_pressure(g, e));
                    if shed.await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    r = global.changed() => if r.is_err() { break },
                    r = own.changed() => if r.is_err() { break },
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
}

struct Inner<K, V> {
    governor: Arc<MemoryGovernor>,
    engine: EngineId,
    name: String,
    hook: Option<Arc<dyn EvictionHook<K, V>>>,
    policy: ShedPolicy,
    index: Mutex<Index<K, V>>,
    counters: Counters,
}

impl<K, V> Inner<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn charge(&self, bytes: usize) -> Result<usize, CacheError> {
        GovernedCache::<K, V>::charge_for(bytes).ok_or_else(|| CacheError::TooLarge {
            cache: self.name.clone(),
            bytes,
        })
    }

    fn get_or_try_load<E: From<CacheError>>(
        &self,
        key: &K,
        estimate: usize,
        load: impl FnOnce() -> Result<(V, usize), E>,
    ) -> Result<Arc<V>, E> {
        let slot = self.index.lock().touch_or_create(key);
        let mut body = slot.body.lock();
        if let Some(r) = body.as_ref() {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(&r.value));
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let fail = |body: parking_lot::MutexGuard<'_, Option<Resident<V>>>| {
            self.index.lock().emptied(key, &slot);
            drop(body);
        };
        let charged = match self.charge(estimate) {
            Ok(c) => c,
            Err(e) => {
                fail(body);
                return Err(e.into());
            }
        };
        let mut token = match self.reserve_evicting(Some(key), charged) {
            Ok(t) => t,
            Err(e) => {
                fail(body);
                return Err(e.into());
            }
        };
        let (value, actual) = match load() {
            Ok(v) => v,
            Err(e) => {
                drop(token);
                fail(body);
                return Err(e);
            }
        };
        let settled = self
            .charge(actual)
            .and_then(|actual| self.settle(key, &mut token, actual, false, 0));
        if let Err(e) = settled {
            drop(value);
            drop(token);
            fail(body);
            return Err(e.into());
        }
        let value = Arc::new(value);
        let bytes = token.size();
        *body = Some(Resident {
            value: Arc::clone(&value),
            token,
        });
        self.index.lock().set_bytes(key, &slot, bytes);
        drop(body);
        Ok(value)
    }

    /// Brings `token` to exactly `charged` bytes, evicting other entries for growth.
    fn settle(
        &self,
        key: &K,
        token: &mut ReservationToken,
        charged: usize,
        force: bool,
        own_pinned: usize,
    ) -> Result<(), CacheError> {
        let held = token.size();
        if charged <= held {
            token
                .shrink(held - charged)
                .expect("shrinking less than the token holds cannot fail");
            return Ok(());
        }
        let more = charged - held;
        let mut last = None;
        for attempt in 0..MAX_ATTEMPTS {
            match token.try_grow(more) {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 && !force && self.can_never_fit(charged, own_pinned) => {
                    // Evicting cannot make it fit: refuse before evicting anything.
                    return Err(self.no_room(more, e));
                }
                Err(e) => last = Some(e),
            }
            if self.make_room(more, Some(key)) == 0 {
                break;
            }
        }
        let source = match token.try_grow(more) {
            Ok(()) => return Ok(()),
            Err(e) => last.unwrap_or(e),
        };
        if force {
            token.force_grow(more);
            return Ok(());
        }
        Err(self.no_room(more, source))
    }

    fn resize(&self, key: &K, bytes: usize, force: bool) -> Result<(), CacheError> {
        let not_resident = || CacheError::NotResident {
            cache: self.name.clone(),
        };
        let charged = self.charge(bytes)?;
        let slot = self.index.lock().slot(key).ok_or_else(not_resident)?;
        let mut body = slot.body.lock();
        let resident = body.as_mut().ok_or_else(not_resident)?;
        if charged <= resident.token.size() {
            // Shrinking: lower the books' mirror before the token, so the index never
            // shows more than the tokens hold (the peak is read from it).
            self.index.lock().set_bytes(key, &slot, charged);
            let held = resident.token.size();
            resident
                .token
                .shrink(held - charged)
                .expect("shrinking less than the token holds cannot fail");
            return Ok(());
        }
        let pinned_here = if self.index.lock().is_pinned(key) {
            resident.token.size()
        } else {
            0
        };
        if !force && self.can_never_fit(charged, pinned_here) {
            // Refuse before evicting anything: evicting could not make it fit.
            let more = charged - resident.token.size();
            let source = match resident.token.try_grow(more) {
                Ok(()) => {
                    let size = resident.token.size();
                    self.index.lock().set_bytes(key, &slot, size);
                    return Ok(());
                }
                Err(e) => e,
            };
            return Err(self.no_room(more, source));
        }
        self.settle(key, &mut resident.token, charged, force, pinned_here)?;
        let size = resident.token.size();
        self.index.lock().set_bytes(key, &slot, size);
        drop(body);
        Ok(())
    }

    fn no_room(&self, needed: usize, source: MemError) -> CacheError {
        self.counters.denials.fetch_add(1, Ordering::Relaxed);
        let t = self.index.lock().totals();
        CacheError::NoRoom {
            cache: self.name.clone(),
            engine: self.engine,
            needed,
            available: self.governor.available(self.engine),
            resident: t.resident,
            pinned: t.pinned,
            source: Box::new(source),
        }
    }

    /// A reservation of `bytes`, evicting colder entries (never `except`, never pinned
    /// ones) until the governor grants it.
    fn reserve_evicting(
        &self,
        except: Option<&K>,
        bytes: usize,
    ) -> Result<ReservationToken, CacheError> {
        let mut last = None;
        for attempt in 0..MAX_ATTEMPTS {
            match self.governor.try_reserve(self.engine, bytes) {
                Ok(t) => return Ok(t),
                Err(e) if attempt == 0 && self.can_never_fit(bytes, 0) => {
                    // Refused before evicting anything: NoRoom promises nothing changed.
                    return Err(self.no_room(bytes, e));
                }
                Err(e) if e.is_denial() => last = Some(e),
                Err(e) => return Err(self.no_room(bytes, e)),
            }
            if self.make_room(bytes, except) == 0 {
                break;
            }
        }
        match self.governor.try_reserve(self.engine, bytes) {
            Ok(t) => Ok(t),
            Err(e) => Err(self.no_room(bytes, last.unwrap_or(e))),
        }
    }

    /// Evicts cold entries until `needed` more bytes could be granted; returns bytes freed.
    fn make_room(&self, needed: usize, except: Option<&K>) -> usize {
        let shortfall = needed
            .saturating_sub(self.governor.available(self.engine))
            .max(1);
        self.evict_coldest(shortfall, except)
    }

    /// Evicts least recently used unpinned entries until `target` bytes are released.
    /// Entries in use, being loaded, or whose hook fails are skipped.
    fn evict_coldest(&self, target: usize, except: Option<&K>) -> usize {
        let mut freed = 0usize;
        let mut tried: HashSet<K> = HashSet::new();
        while freed < target {
            let batch = self
                .index
                .lock()
                .coldest(target - freed, except, &|k| tried.contains(k));
            if batch.is_empty() {
                break;
            }
            for (key, slot) in batch {
                if freed >= target {
                    break;
                }
                let Some(mut body) = slot.body.try_lock_for(SLOT_WAIT) else {
                    tried.insert(key);
                    continue;
                };
                if let Ok(n) = self.evict_locked(&key, &slot, &mut body) {
                    freed = freed.saturating_add(n);
                }
                drop(body);
                tried.insert(key);
            }
        }
        freed
    }

    /// Drops a locked entry's value if nobody uses it and it is not pinned, after its hook.
    fn evict_locked(
        &self,
        key: &K,
        slot: &Arc<Slot<V>>,
        body: &mut Option<Resident<V>>,
    ) -> Result<usize, CacheError> {
        let Some(resident) = body.as_ref() else {
            return Err(CacheError::NotResident {
                cache: self.name.clone(),
            });
        };
        if Arc::strong_count(&resident.value) > 1 {
            return Err(CacheError::Busy {
                cache: self.name.clone(),
            });
        }
        if self.index.lock().is_pinned(key) {
            return Err(CacheError::Pinned {
                cache: self.name.clone(),
            });
        }
        if let Some(hook) = &self.hook
            && let Err(source) = hook.before_evict(key, &resident.value)
        {
            self.counters.hook_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cache = %self.name, error = %source, "eviction hook failed; entry kept");
            return Err(CacheError::Hook {
                cache: self.name.clone(),
                source,
            });
        }
        let resident = body.take().expect("checked resident above");
        let bytes = resident.token.size();
        // The index first, then the token: the index never shows more than tokens hold.
        self.index.lock().emptied(key, slot);
        drop(resident);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    fn reclaim(&self, target: usize) -> usize {
        self.counters.reclaims.fetch_add(1, Ordering::Relaxed);
        if target == 0 {
            return 0;
        }
        let freed = self.evict_coldest(target, None);
        tracing::debug!(cache = %self.name, target, freed, "cache reclaimed");
        freed
    }

    fn shed_for_pressure(&self, global: PressureLevel, engine: PressureLevel) -> usize {
        let t = self.index.lock().totals();
        let unpinned = t.resident - t.pinned;
        let share = |pct: u8| unpinned / 100 * usize::from(pct);
        let mut freed = match global {
            PressureLevel::Normal => 0,
            PressureLevel::Warning => self.evict_coldest(share(self.policy.warning_shed_pct), None),
            PressureLevel::Critical => {
                self.evict_coldest(share(self.policy.critical_shed_pct), None)
            }
            PressureLevel::Emergency => self.evict_coldest(usize::MAX, None),
        };
        if engine >= PressureLevel::Critical {
            let limit = self.governor.limit(self.engine);
            let keep_free = limit / 100 * usize::from(self.policy.engine_headroom_pct);
            let used = self.governor.reserved(self.engine);
            let target = used.saturating_add(keep_free).saturating_sub(limit);
            if target > 0 {
                freed += self.evict_coldest(target, None);
            }
        }
        if freed > 0 {
            tracing::debug!(cache = %self.name, ?global, ?engine, freed, "cache shed under pressure");
        }
        freed
    }

    /// True when `charged` bytes cannot be granted even if every entry this cache could
    /// evict were evicted and every other holder let go: more than the most the engine is
    /// ever granted (its limit, or the ceiling if lower; borrowing never goes past the
    /// limit) less the pinned bytes of this cache other than `own_pinned` (the entry's own,
    /// for a resize). Read at one moment: a later unpin or limit change can make it fit.
    fn can_never_fit(&self, charged: usize, own_pinned: usize) -> bool {
        let most = self
            .governor
            .limit(self.engine)
            .min(self.governor.ceiling());
        let pinned = self.index.lock().totals().pinned.saturating_sub(own_pinned);
        charged > most.saturating_sub(pinned)
    }

    fn stats(&self) -> CacheStats {
        let t = self.index.lock().totals();
        let c = &self.counters;
        CacheStats {
            entries: t.entries,
            resident_bytes: t.resident,
            pinned_bytes: t.pinned,
            peak_bytes: t.peak,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            evicted_bytes: c.evicted_bytes.load(Ordering::Relaxed),
            hook_failures: c.hook_failures.load(Ordering::Relaxed),
            denials: c.denials.load(Ordering::Relaxed),
            reclaims: c.reclaims.load(Ordering::Relaxed),
        }
    }
}

/// The cache as its engine's reclaimer; a `Weak` so the registry does not keep it alive.
struct CacheReclaimer<K, V>(Weak<Inner<K, V>>);

#[async_trait::async_trait]
impl<K, V> Reclaimer for CacheReclaimer<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn reclaimable(&self) -> usize {
        self.0.upgrade().map_or(0, |i| {
            let t = i.index.lock().totals();
            t.resident - t.pinned
        })
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        let inner = self
            .0
            .upgrade()
            .ok_or_else(|| ReclaimError::new("cache already dropped"))?;
        // Eviction is synchronous (hooks may persist); it runs on the governor's reclaim
        // runtime, which bounds it with its reclaim timeout.
        Ok(inner.reclaim(target))
    }
}

/// Publishes the cache's resident and pinned bytes in governor snapshots.
struct CacheStatsSource<K, V>(Weak<Inner<K, V>>);

impl<K, V> ConsumerStatsSource for CacheStatsSource<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        let Some(inner) = self.0.upgrade() else {
            return Vec::new();
        };
        let s = inner.stats();
        vec![ConsumerSnapshot {
            engine: inner.engine,
            name: inner.name.clone(),
            reserved: s.resident_bytes,
            peak: s.peak_bytes,
            denials: s.denials,
            pinned: s.pinned_bytes,
        }]
    }
}
