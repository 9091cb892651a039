//! The cache's index: which keys have a slot, in which recency order, pinned or not, and
//! how many bytes each resident one holds. One mutex guards it; it is held for map
//! operations only, never across a load, a hook or a governor call that may reclaim.
//!
//! A slot exists while its entry is resident or being loaded. Lock order: a slot's body may
//! be held while this index is locked, never the other way round.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use governor_core::ReservationToken;
use parking_lot::Mutex;

/// A resident value and the reservation that pays for it.
pub(crate) struct Resident<V> {
    pub(crate) value: Arc<V>,
    pub(crate) token: ReservationToken,
}

/// One key's place: its body lock is held for the whole of a load or an eviction, so
/// concurrent users of the key wait for one load instead of starting several.
pub(crate) struct Slot<V> {
    pub(crate) body: Mutex<Option<Resident<V>>>,
}

struct Entry<V> {
    slot: Arc<Slot<V>>,
    stamp: u64,
    pinned: bool,
    /// Mirror of the resident token's size; `None` while loading.
    bytes: Option<usize>,
}

/// Totals of the index at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Totals {
    pub(crate) entries: usize,
    pub(crate) resident: usize,
    pub(crate) pinned: usize,
    /// Highest `resident` ever recorded.
    pub(crate) peak: usize,
}

pub(crate) struct Index<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Recency order: stamp → key. Every entry has exactly one stamp here.
    order: BTreeMap<u64, K>,
    clock: u64,
    resident_bytes: usize,
    pinned_bytes: usize,
    resident_entries: usize,
    /// Highest `resident_bytes`, updated in the same critical section that raises it, so
    /// it is a figure the index really held. The callers keep `resident_bytes` at most the
    /// tokens they hold (raised after a token grows, lowered before it shrinks or drops),
    /// so the peak never exceeds what the governor granted.
    peak_bytes: usize,
}

impl<K: Eq + Hash + Clone, V> Index<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            resident_bytes: 0,
            pinned_bytes: 0,
            resident_entries: 0,
            peak_bytes: 0,
        }
    }

    pub(crate) fn totals(&self) -> Totals {
        Totals {
            entries: self.resident_entries,
            resident: self.resident_bytes,
            pinned: self.pinned_bytes,
            peak: self.peak_bytes,
        }
    }

    fn next_stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The key's slot, made most recently used; `None` if it has none.
    pub(crate) fn touch(&mut self, key: &K) -> Option<Arc<Slot<V>>> {
        let stamp = self.next_stamp();
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.stamp);
        entry.stamp = stamp;
        self.order.insert(stamp, key.clone());
        Some(Arc::clone(&entry.slot))
    }

    /// The key's slot without changing its recency.
    pub(crate) fn slot(&self, key: &K) -> Option<Arc<Slot<V>>> {
        self.entries.get(key).map(|e| Arc::clone(&e.slot))
    }

    /// The key's slot, most recently used, created empty if absent.
    pub(crate) fn touch_or_create(&mut self, key: &K) -> Arc<Slot<V>> {
        if let Some(slot) = self.touch(key) {
            return slot;
        }
        let stamp = self.next_stamp();
        let slot = Arc::new(Slot {
            body: Mutex::new(None),
        });
        self.entries.insert(
            key.clone(),
            Entry {
                slot: Arc::clone(&slot),
                stamp,
                pinned: false,
                bytes: None,
            },
        );
        self.order.insert(stamp, key.clone());
        slot
    }

    fn entry_of(&mut self, key: &K, slot: &Arc<Slot<V>>) -> Option<&mut Entry<V>> {
        self.entries
            .get_mut(key)
            .filter(|e| Arc::ptr_eq(&e.slot, slot))
    }

    /// Records that `slot` now holds `bytes` (after a load or a resize).
    pub(crate) fn set_bytes(&mut self, key: &K, slot: &Arc<Slot<V>>, bytes: usize) {
        let Some(entry) = self.entry_of(key, slot) else {
            debug_assert!(false, "a slot with a holder left the index");
            return;
        };
        let old = entry.bytes.replace(bytes);
        let pinned = entry.pinned;
        if let Some(old) = old {
            self.resident_bytes = self.resident_bytes - old + bytes;
            if pinned {
                self.pinned_bytes = self.pinned_bytes - old + bytes;
            }
        } else {
            self.resident_entries += 1;
            self.resident_bytes += bytes;
            if pinned {
                self.pinned_bytes += bytes;
            }
        }
        self.peak_bytes = self.peak_bytes.max(self.resident_bytes);
    }

    /// Records that `slot` is empty again (evicted, removed, or its load failed) and drops
    /// it from the index unless someone besides the caller still holds it (they will find
    /// it empty and load or leave it). Unpins it: a pin lasts as long as the residency.
    pub(crate) fn emptied(&mut self, key: &K, slot: &Arc<Slot<V>>) {
        let Some(entry) = self.entry_of(key, slot) else {
            return;
        };
        let old = entry.bytes.take();
        let was_pinned = std::mem::replace(&mut entry.pinned, false);
        let stamp = entry.stamp;
        if let Some(old) = old {
            self.resident_entries -= 1;
            self.resident_bytes -= old;
            if was_pinned {
                self.pinned_bytes -= old;
            }
        }
        // The index's own reference plus the caller's.
        if Arc::strong_count(slot) <= 2 {
            self.entries.remove(key);
            self.order.remove(&stamp);
        }
    }

    /// Pins or unpins a resident entry; false if the key is not resident.
    pub(crate) fn set_pinned(&mut self, key: &K, pinned: bool) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        let Some(bytes) = entry.bytes else {
            return false;
        };
        if entry.pinned != pinned {
            entry.pinned = pinned;
            if pinned {
                self.pinned_bytes += bytes;
            } else {
                self.pinned_bytes -= bytes;
            }
        }
        true
    }

    pub(crate) fn is_pinned(&self, key: &K) -> bool {
        self.entries.get(key).is_some_and(|e| e.pinned)
    }

    pub(crate) fn is_resident(&self, key: &K) -> bool {
        self.entries.get(key).is_some_and(|e| e.bytes.is_some())
    }

    /// Resident, unpinned entries, least recently used first, skipping `except` and the
    /// keys in `skip`, until their bytes add up to `target` (at least one entry).
    pub(crate) fn coldest(
        &self,
        target: usize,
        except: Option<&K>,
        skip: &dyn Fn(&K) -> bool,
    ) -> Vec<(K, Arc<Slot<V>>)> {
        let mut out = Vec::new();
        let mut sum = 0usize;
        for key in self.order.values() {
            if sum >= target && !out.is_empty() {
                break;
            }
            if Some(key) == except || skip(key) {
                continue;
            }
            let Some(entry) = self.entries.get(key) else {
                continue;
            };
            let Some(bytes) = entry.bytes else { continue };
            if entry.pinned {
                continue;
            }
            sum = sum.saturating_add(bytes);
            out.push((key.clone(), Arc::clone(&entry.slot)));
        }
        out
    }

    /// Resident keys, least recently used first.
    pub(crate) fn keys(&self) -> Vec<K> {
        self.order
            .values()
            .filter(|k| self.is_resident(k))
            .cloned()
            .collect()
    }
}
