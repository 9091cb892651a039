//! The pool's books per DataFusion consumer, and their publication to the governor.
//!
//! DataFusion hands the pool a `MemoryReservation`, but policy is decided per
//! `MemoryConsumer`: one sort partition owns several reservations (`split`, `new_empty`) that
//! share one registration, and fairness between "a sort" and "an aggregate" must not depend on
//! how many reservations each happens to use. So every registered consumer gets one
//! [`Consumer`] entry, keyed by `MemoryConsumer::id()`, holding one governor
//! [`ReservationToken`] for all of its reservations.
//!
//! Mutations of one consumer are serialised by its token mutex; the counters next to it are
//! atomics so that readers (metrics, error messages) never wait behind a consumer that is
//! blocked in a bounded reclaim.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use datafusion::common::HashMap;
use governor_core::{ConsumerSnapshot, ConsumerStatsSource, EngineId, ReservationToken};
use parking_lot::{Mutex, RwLock};

use crate::policy::SORT_MERGE_PREFIX;

/// Upper bound on the number of distinct consumer names remembered after their consumers
/// are gone. DataFusion names are per operator and partition (`ExternalSorter[3]`), so the
/// set is small in practice; the cap only protects the metrics exporter from a caller that
/// invents a new name per query.
const MAX_RETIRED_NAMES: usize = 1024;
/// Name under which retired consumers beyond [`MAX_RETIRED_NAMES`] are folded.
const OVERFLOW_NAME: &str = "other";

/// One registered DataFusion `MemoryConsumer`.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub(crate) id: usize,
    pub(crate) name: String,
    pub(crate) can_spill: bool,
    /// The governor's booking of all bytes this consumer holds; `None` when the governor has
    /// no Query engine (the pool then refuses `try_grow` with a configuration error).
    pub(crate) token: Mutex<Option<ReservationToken>>,
    /// Bytes DataFusion believes this consumer holds; equals the token's size whenever the
    /// token mutex is free.
    pub(crate) reserved: AtomicUsize,
    /// Part of `reserved` booked by the infallible `grow` beyond what the budget allowed.
    pub(crate) overcommit: AtomicUsize,
    pub(crate) peak: AtomicUsize,
    pub(crate) denials: AtomicU64,
    /// A sort's merge reservation (see [`SORT_MERGE_PREFIX`]): what it gives back while
    /// its sort spills is kept for it.
    pub(crate) is_sort_merge: bool,
    /// The bytes of its first reservation, for a sort's merge reservation: what it will ask
    /// for again after each spill. 0 until it first reserves.
    pub(crate) first_reservation: AtomicUsize,
    /// Bytes granted under (S) of [`crate::policy`] since this consumer was last within its
    /// share: growth of a reservation the share fell under, bounded by the share grace.
    pub(crate) grace_used: AtomicUsize,
    /// Set once a wait of this consumer ended refused at its deadline: its later requests
    /// the governor cannot grant at once are refused at once (see `GovernedMemoryPool`'s
    /// slow path), so one consumer waits in vain at most once.
    pub(crate) waited_in_vain: AtomicBool,
    /// Set when the consumer unregisters, so a thread's cached entry is not used after.
    removed: AtomicBool,
}

impl Consumer {
    pub(crate) fn new(
        id: usize,
        name: String,
        can_spill: bool,
        token: Option<ReservationToken>,
    ) -> Self {
        let is_sort_merge = !can_spill && name.starts_with(SORT_MERGE_PREFIX);
        Self {
            id,
            name,
            can_spill,
            is_sort_merge,
            first_reservation: AtomicUsize::new(0),
            grace_used: AtomicUsize::new(0),
            waited_in_vain: AtomicBool::new(false),
            token: Mutex::new(token),
            reserved: AtomicUsize::new(0),
            overcommit: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            denials: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        }
    }

    pub(crate) fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> ConsumerMetrics {
        ConsumerMetrics {
            id: self.id,
            name: self.name.clone(),
            can_spill: self.can_spill,
            reserved: self.reserved(),
            peak: self.peak.load(Ordering::Relaxed),
            overcommit: self.overcommit.load(Ordering::Relaxed),
            denials: self.denials.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time view of one live consumer of a [`GovernedMemoryPool`](crate::GovernedMemoryPool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerMetrics {
    /// DataFusion's process-unique consumer id.
    pub id: usize,
    /// The operator's name, e.g. `ExternalSorter[0]`.
    pub name: String,
    /// Whether the operator can spill to disk when denied.
    pub can_spill: bool,
    /// Bytes held now.
    pub reserved: usize,
    /// Most bytes held at once.
    pub peak: usize,
    /// Bytes of `reserved` that were booked by DataFusion's infallible `grow` beyond the budget.
    pub overcommit: usize,
    /// `try_grow` calls refused; for a spillable consumer each one is normally a spill.
    pub denials: u64,
}

/// Totals kept for consumers that have unregistered, by name.
#[derive(Debug, Default, Clone, Copy)]
struct Retired {
    peak: usize,
    denials: u64,
}

/// All consumers of one pool: the live ones by id, the retired ones by name.
#[derive(Debug)]
pub(crate) struct Registry {
    /// Process-unique, to tell registries apart in the per-thread cache.
    id: usize,
    live: RwLock<HashMap<usize, Arc<Consumer>>>,
    retired: Mutex<HashMap<String, Retired>>,
}

impl Default for Registry {
    fn default() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            live: RwLock::default(),
            retired: Mutex::default(),
        }
    }
}

/// `(registry id, consumer id, consumer)` of the consumer a thread used last.
type CachedConsumer = (usize, usize, Arc<Consumer>);

thread_local! {
    /// The consumer this thread used last. DataFusion drives one operator partition's
    /// reservation from one task for many batches in a row, so consecutive calls on a thread
    /// nearly always name the same consumer; the cache saves the registry's read lock (an
    /// atomic on a line every thread writes), the hash lookup and an `Arc` clone per call,
    /// which were most of the pool's cost over `GreedyMemoryPool` (BENCHMARKS.md).
    static LAST_CONSUMER: Cell<Option<CachedConsumer>> = const { Cell::new(None) };
}

impl Registry {
    pub(crate) fn get(&self, id: usize) -> Option<Arc<Consumer>> {
        self.live.read().get(&id).cloned()
    }

    /// Runs `f` on the consumer `id`, from this thread's cache when it holds it, else from the
    /// registry (inserting `make()` when `make` is given and the id is unknown). `None` when
    /// the id is unknown and there is no `make`.
    pub(crate) fn with<R>(
        &self,
        id: usize,
        make: Option<&dyn Fn() -> Consumer>,
        f: impl FnOnce(&Consumer) -> R,
    ) -> Option<R> {
        // Taken out, not borrowed: `f` may come back here (for another consumer) and must
        // find the cell usable; it then simply misses.
        // `try_with`: a reservation dropped by another thread-local's destructor must still be
        // served, uncached, after this cell is gone.
        let cached = LAST_CONSUMER.try_with(Cell::take).ok().flatten();
        let consumer = match cached {
            Some((registry, cid, c))
                if registry == self.id && cid == id && !c.removed.load(Ordering::Acquire) =>
            {
                c
            }
            _ => match make {
                Some(make) => self.get_or_insert(id, make),
                None => self.get(id)?,
            },
        };
        let result = f(&consumer);
        // If the cell is gone (thread exiting), the entry is simply dropped.
        let _ = LAST_CONSUMER.try_with(|cell| cell.set(Some((self.id, id, consumer))));
        Some(result)
    }

    /// Inserts `make()` unless the id is known; returns the entry either way.
    pub(crate) fn get_or_insert(
        &self,
        id: usize,
        make: impl FnOnce() -> Consumer,
    ) -> Arc<Consumer> {
        if let Some(c) = self.get(id) {
            return c;
        }
        Arc::clone(
            self.live
                .write()
                .entry(id)
                .or_insert_with(|| Arc::new(make())),
        )
    }

    pub(crate) fn remove(&self, id: usize) -> Option<Arc<Consumer>> {
        let removed = self.live.write().remove(&id)?;
        removed.removed.store(true, Ordering::Release);
        let mut retired = self.retired.lock();
        let name = if retired.len() < MAX_RETIRED_NAMES || retired.contains_key(&removed.name) {
            removed.name.clone()
        } else {
            OVERFLOW_NAME.to_owned()
        };
        let entry = retired.entry(name).or_default();
        entry.peak = entry.peak.max(removed.peak.load(Ordering::Relaxed));
        entry.denials += removed.denials.load(Ordering::Relaxed);
        Some(removed)
    }

    pub(crate) fn live(&self) -> Vec<Arc<Consumer>> {
        self.live.read().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.live.read().len()
    }

    /// Consumers aggregated by name: live reserved bytes, peak and denials since start.
    ///
    /// Aggregating by name rather than publishing one series per consumer id keeps the
    /// Prometheus label set bounded: ids are process-unique and would create a new time
    /// series for every operator of every query.
    pub(crate) fn by_name(&self) -> Vec<ConsumerSnapshot> {
        let mut out: HashMap<String, ConsumerSnapshot> = HashMap::default();
        for (name, r) in self.retired.lock().iter() {
            out.insert(name.clone(), snapshot(name, 0, r.peak, r.denials, 0));
        }
        for c in self.live() {
            let m = c.metrics();
            let pinned = if m.can_spill { 0 } else { m.reserved };
            let e = out
                .entry(m.name.clone())
                .or_insert_with(|| snapshot(&m.name, 0, 0, 0, 0));
            e.reserved += m.reserved;
            e.peak = e.peak.max(m.peak);
            e.denials += m.denials;
            e.pinned += pinned;
        }
        let mut v: Vec<_> = out.into_values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

fn snapshot(
    name: &str,
    reserved: usize,
    peak: usize,
    denials: u64,
    pinned: usize,
) -> ConsumerSnapshot {
    ConsumerSnapshot {
        engine: EngineId::Query,
        name: name.to_owned(),
        reserved,
        peak,
        denials,
        pinned,
    }
}

/// Publishes a pool's consumers into the governor's snapshot (and so its Prometheus text).
///
/// Unspillable consumers report their bytes as `pinned`: like a pinned HNSW layer, the
/// governor cannot get that memory back by asking, only by waiting for the query to end.
#[derive(Debug)]
pub(crate) struct StatsSource(pub(crate) Arc<Registry>);

impl ConsumerStatsSource for StatsSource {
    fn consumers(&self) -> Vec<ConsumerSnapshot> {
        self.0.by_name()
    }
}
