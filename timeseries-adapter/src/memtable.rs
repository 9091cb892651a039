//! The governed memtable: one Gorilla block per series, frozen batches awaiting a durable
//! flush, and the reservation that pays for both.
//!
//! # Accounting
//!
//! The memtable's `used` bytes are computed from what it actually holds, never estimated per
//! point:
//!
//! ```text
//! used = series index allocation   (hashbrown's allocation_size(), exact)
//!      + Σ active block capacity    (Vec<u64> capacity × 8, exact)
//!      + active series × SLOT       (room each series pre-pays for its frozen-batch entry)
//!      + a fixed 256 B              (the pending batch's Arc and list slot)
//!      + Σ frozen batch bytes       (block capacities + their pre-paid slots)
//!      + Σ flushed segment metadata (path + struct, kept for queries)
//! ```
//!
//! Rule: every allocation is reserved *before* it happens. Appends only reallocate when the
//! block lacks [`MAX_BITS_PER_POINT`] spare bits, and then grow by an explicit, bounded
//! amount (`reserve_exact`), so the growth is known in advance; a new series predicts the
//! index's growth (at most doubling) and re-measures it afterwards. The reservation is taken
//! from the governor in chunks (`try_grow` of a whole chunk when headroom runs out), so the
//! governor is touched about once per chunk, not once per point, and `reserved - used` stays
//! within one chunk. Frozen bytes are given back only after the segment holding them is
//! durable.

use std::sync::Arc;

use governor_core::{EngineId, MemError, MemoryGovernor, ReservationToken};

use crate::SeriesId;
use crate::flusher::SegmentBatch;
use crate::gorilla::{Block, Encoder, MAX_BITS_PER_POINT, Point};
use crate::segment::SegmentMeta;

/// Bytes each active series pre-pays so that freezing it never needs new memory: its entry in
/// the frozen batch's vector (allocated with exact capacity).
pub const SERIES_SLOT_BYTES: usize = std::mem::size_of::<(SeriesId, Block)>();

/// Fixed bookkeeping the memtable holds from the start: the one frozen batch's `Arc` and its
/// slot in the frozen list (the flush path freezes a new batch only when none is pending, so
/// there is at most one). Charged at start-up so freezing never allocates unreserved memory.
pub const FIXED_OVERHEAD_BYTES: usize = 256;

/// Smallest and largest growth step of a block, in words. Growing by half the current size
/// keeps reallocations logarithmic; the cap keeps the unused tail of a large block (reserved
/// but not yet written) under 4 KiB.
const MIN_GROW_WORDS: usize = 4;
const MAX_GROW_WORDS: usize = 512;

const _: () = assert!(MIN_GROW_WORDS as u64 * 64 >= MAX_BITS_PER_POINT);

#[derive(Debug)]
struct SeriesState {
    enc: Encoder,
    /// Order in which series got their current block: the tie-break for "oldest first".
    born: u64,
}

/// Where an append stopped.
#[derive(Debug)]
pub(crate) enum AppendStop {
    /// All points appended.
    Done,
    /// More memory is needed and could not be reserved without waiting.
    NeedMemory {
        /// Bytes missing.
        bytes: usize,
        /// The governor's refusal, when it was asked.
        cause: Option<MemError>,
    },
    /// The next point is not after the block's last timestamp.
    OutOfOrder { last: i64, got: i64 },
}

/// The memtable's reservation: normally one token; a token won by `reserve().await` is merged
/// into it (kept beside it only if the governor refuses the merge).
#[derive(Debug, Default)]
struct Budget {
    tokens: Vec<ReservationToken>,
}

impl Budget {
    fn size(&self) -> usize {
        self.tokens.iter().map(ReservationToken::size).sum()
    }

    fn try_grow(&mut self, gov: &Arc<MemoryGovernor>, bytes: usize) -> Result<(), MemError> {
        if let Some(t) = self.tokens.first_mut() {
            t.try_grow(bytes)
        } else {
            self.tokens
                .push(gov.try_reserve(EngineId::Timeseries, bytes)?);
            Ok(())
        }
    }

    fn absorb(&mut self, token: ReservationToken) {
        let token = match self.tokens.first_mut() {
            Some(main) => match main.merge(token) {
                Ok(()) => return,
                Err(token) => token,
            },
            None => token,
        };
        self.tokens.push(token);
    }

    /// Gives back up to `bytes`; returns what was given back.
    fn release(&mut self, bytes: usize) -> usize {
        let mut left = bytes;
        while left > 0 {
            let n = self.tokens.len();
            let Some(last) = self.tokens.last_mut() else {
                break;
            };
            let size = last.size();
            if size <= left {
                left -= size;
                // Keep one token alive (possibly empty) as the main one.
                if n > 1 {
                    self.tokens.pop();
                } else {
                    last.free();
                    break;
                }
            } else {
                last.shrink(left)
                    .expect("shrinking less than the token holds cannot fail");
                left = 0;
            }
        }
        bytes - left
    }
}

/// A frozen batch plus what it costs in the ledger.
#[derive(Debug)]
struct Frozen {
    batch: Arc<SegmentBatch>,
    accounted: usize,
}

/// Breakdown of the memtable's memory, for tests and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemtableMemory {
    /// Heap of active (appendable) Gorilla blocks.
    pub active_block_bytes: usize,
    /// Bits actually written in active blocks, in bytes (≤ `active_block_bytes`).
    pub active_encoded_bytes: usize,
    /// Series index: the hash map's allocation, each active series' pre-paid slot, and the
    /// fixed bookkeeping.
    pub index_bytes: usize,
    /// Frozen blocks awaiting a durable flush (with their slots).
    pub frozen_bytes: usize,
    /// Metadata of flushed segments.
    pub segment_meta_bytes: usize,
    /// Sum of the above.
    pub used: usize,
    /// Bytes the memtable holds reserved from the governor (≥ `used`).
    pub reserved: usize,
    /// Active series.
    pub series: usize,
    /// Points in active and frozen blocks.
    pub points_in_memory: u64,
}

/// Result of a successful flush being published.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Published {
    pub released: usize,
}

pub(crate) struct Memtable {
    governor: Arc<MemoryGovernor>,
    series: hashbrown::HashMap<SeriesId, SeriesState>,
    frozen: Vec<Frozen>,
    segments: Vec<Arc<SegmentMeta>>,
    budget: Budget,
    chunk: usize,
    active_bytes: usize,
    frozen_bytes: usize,
    segment_meta_bytes: usize,
    index_alloc: usize,
    born: u64,
    peak: usize,
}

fn meta_bytes(meta: &SegmentMeta) -> usize {
    // The struct in its Arc (two counters), its path's heap, and its slot in the list.
    std::mem::size_of::<SegmentMeta>() + 16 + meta.path.capacity() + 16
}

impl Memtable {
    pub(crate) fn new(governor: Arc<MemoryGovernor>, chunk: usize) -> Self {
        let mut budget = Budget::default();
        budget.absorb(governor.charge(EngineId::Timeseries, FIXED_OVERHEAD_BYTES));
        Self {
            governor,
            series: hashbrown::HashMap::new(),
            frozen: Vec::with_capacity(1),
            segments: Vec::new(),
            budget,
            chunk,
            active_bytes: 0,
            frozen_bytes: 0,
            segment_meta_bytes: 0,
            index_alloc: 0,
            born: 0,
            peak: 0,
        }
    }

    /// Segments found at start-up: already resident, so they are *charged* (never refused).
    pub(crate) fn load_segments(&mut self, metas: Vec<SegmentMeta>) {
        let bytes: usize = metas.iter().map(meta_bytes).sum();
        self.segments.extend(metas.into_iter().map(Arc::new));
        self.segment_meta_bytes += bytes;
        if bytes > 0 {
            self.budget
                .absorb(self.governor.charge(EngineId::Timeseries, bytes));
        }
    }

    pub(crate) fn used(&self) -> usize {
        FIXED_OVERHEAD_BYTES
            + self.index_alloc
            + self.series.len() * SERIES_SLOT_BYTES
            + self.active_bytes
            + self.frozen_bytes
            + self.segment_meta_bytes
    }

    pub(crate) fn reserved(&self) -> usize {
        self.budget.size()
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    pub(crate) fn frozen_bytes(&self) -> usize {
        self.frozen_bytes
    }

    /// Bytes a flush could give back (active and frozen blocks).
    pub(crate) fn flushable(&self) -> usize {
        self.active_bytes + self.frozen_bytes
    }

    pub(crate) fn has_frozen(&self) -> bool {
        !self.frozen.is_empty()
    }

    fn headroom(&self) -> usize {
        self.reserved().saturating_sub(self.used())
    }

    /// Makes `need` bytes of headroom available, growing the reservation by a whole chunk
    /// when it can. With `allow_grow == false` (Critical pressure) only existing headroom
    /// is used.
    fn ensure(&mut self, need: usize, allow_grow: bool) -> Result<(), AppendStop> {
        let head = self.headroom();
        if head >= need {
            return Ok(());
        }
        let missing = need - head;
        if !allow_grow {
            return Err(AppendStop::NeedMemory {
                bytes: missing,
                cause: None,
            });
        }
        // Top up to a full chunk of headroom so the next appends need not ask again.
        let want = need.max(self.chunk) - head;
        match self.budget.try_grow(&self.governor, want) {
            Ok(()) => Ok(()),
            Err(_) if want > missing => {
                self.budget
                    .try_grow(&self.governor, missing)
                    .map_err(|cause| AppendStop::NeedMemory {
                        bytes: missing,
                        cause: Some(cause),
                    })
            }
            Err(cause) => Err(AppendStop::NeedMemory {
                bytes: missing,
                cause: Some(cause),
            }),
        }
    }

    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.reserved());
        debug_assert!(
            self.used() <= self.reserved(),
            "memtable uses {} bytes but reserved only {}",
            self.used(),
            self.reserved()
        );
    }

    /// Appends a prefix of `points` to `series`; returns how many were appended and why it
    /// stopped.
    pub(crate) fn append(
        &mut self,
        series: SeriesId,
        points: &[Point],
        allow_grow: bool,
    ) -> (usize, AppendStop) {
        if points.is_empty() {
            return (0, AppendStop::Done);
        }
        if !self.series.contains_key(&series) {
            // A new series: its pre-paid slot, plus the index growth if the map is full
            // (hashbrown at most doubles its allocation; rehashing in place costs nothing).
            let mut need = SERIES_SLOT_BYTES;
            if self.series.len() == self.series.capacity() {
                let entry = std::mem::size_of::<(SeriesId, SeriesState)>() + 1;
                need += (2 * self.index_alloc).max(4 * entry + 16) - self.index_alloc;
            }
            if let Err(stop) = self.ensure(need, allow_grow) {
                return (0, stop);
            }
            self.born += 1;
            self.series.insert(
                series,
                SeriesState {
                    enc: Encoder::new(),
                    born: self.born,
                },
            );
            self.index_alloc = self.series.allocation_size();
            self.note_peak();
        }
        let mut i = 0;
        loop {
            // One lookup per run of appends: the inner loop appends while the block has room
            // for a worst-case point, and leaves only to grow the block (a reservation step).
            let state = self.series.get_mut(&series).expect("inserted above");
            while i < points.len() && state.enc.spare_bits() >= MAX_BITS_PER_POINT {
                let p = points[i];
                if let Err(crate::gorilla::EncodeError::OutOfOrder { last, got }) =
                    state.enc.append(p.ts, p.value)
                {
                    return (i, AppendStop::OutOfOrder { last, got });
                }
                i += 1;
            }
            if i == points.len() {
                break;
            }
            // Refuse an out-of-order point before paying for growth it would not use.
            if !state.enc.is_empty() && points[i].ts <= state.enc.last_ts() {
                let last = state.enc.last_ts();
                return (
                    i,
                    AppendStop::OutOfOrder {
                        last,
                        got: points[i].ts,
                    },
                );
            }
            let cap = state.enc.capacity_words();
            let grow = (cap / 2).clamp(MIN_GROW_WORDS, MAX_GROW_WORDS);
            if let Err(stop) = self.ensure(grow * 8, allow_grow) {
                return (i, stop);
            }
            let state = self.series.get_mut(&series).expect("inserted above");
            state.enc.grow_to_words(cap + grow);
            self.active_bytes += (state.enc.capacity_words() - cap) * 8;
            self.note_peak();
        }
        (points.len(), AppendStop::Done)
    }

    /// Adds a token won by `reserve().await`, then trims headroom back to one chunk.
    pub(crate) fn absorb(&mut self, token: ReservationToken) {
        self.budget.absorb(token);
        self.note_peak();
    }

    /// Gives back headroom beyond one chunk.
    pub(crate) fn trim(&mut self) -> usize {
        let excess = self
            .reserved()
            .saturating_sub(self.used().saturating_add(self.chunk));
        if excess > 0 {
            self.budget.release(excess)
        } else {
            0
        }
    }

    /// Freezes the largest (then oldest) series until at least `target` bytes are frozen.
    /// Returns the new batch, or `None` when there is nothing to freeze.
    pub(crate) fn freeze(&mut self, target: usize, id: u64) -> Option<Arc<SegmentBatch>> {
        let mut candidates: Vec<(SeriesId, usize, u64)> = self
            .series
            .iter()
            .filter(|(_, s)| !s.enc.is_empty())
            .map(|(id, s)| (*id, s.enc.heap_bytes(), s.born))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        let mut picked = Vec::new();
        let mut bytes = 0;
        for (id, heap, _) in candidates {
            if bytes >= target.max(1) {
                break;
            }
            picked.push(id);
            bytes += heap;
        }
        picked.sort_unstable();
        // The batch vector is paid for by the slots of the series it takes (exact capacity).
        let mut blocks = Vec::with_capacity(picked.len());
        for id in picked {
            let state = self.series.remove(&id).expect("candidate exists");
            self.active_bytes -= state.enc.heap_bytes();
            blocks.push((id, state.enc.into_block()));
        }
        let accounted = blocks.iter().map(|(_, b)| b.heap_bytes()).sum::<usize>()
            + blocks.len() * SERIES_SLOT_BYTES;
        self.frozen_bytes += accounted;
        let batch = Arc::new(SegmentBatch { id, blocks });
        self.frozen.push(Frozen {
            batch: Arc::clone(&batch),
            accounted,
        });
        self.note_peak();
        Some(batch)
    }

    /// The oldest frozen batch (a failed flush is retried before anything new is frozen).
    pub(crate) fn oldest_frozen(&self) -> Option<Arc<SegmentBatch>> {
        self.frozen.first().map(|f| Arc::clone(&f.batch))
    }

    /// A frozen batch is durable as `meta`: make the segment visible to queries and drop the
    /// batch in one step (so no query sees both or neither), then give the memory back.
    pub(crate) fn publish(&mut self, batch_id: u64, meta: SegmentMeta) -> Published {
        let Some(pos) = self.frozen.iter().position(|f| f.batch.id == batch_id) else {
            return Published { released: 0 };
        };
        let frozen = self.frozen.remove(pos);
        let kept = meta_bytes(&meta);
        self.segments.push(Arc::new(meta));
        self.frozen_bytes -= frozen.accounted;
        self.segment_meta_bytes += kept;
        if kept > frozen.accounted {
            // Only with an unusually long path: the metadata outgrew its pre-paid share.
            let extra = kept - frozen.accounted;
            if self.budget.try_grow(&self.governor, extra).is_err() {
                self.budget
                    .absorb(self.governor.charge(EngineId::Timeseries, extra));
            }
        }
        drop(frozen);
        let released = self.trim();
        Published { released }
    }

    /// What a query of `series` over `range` needs, captured atomically: the matching points
    /// of the active block, the frozen blocks and the segments that may hold the series.
    pub(crate) fn snapshot(
        &self,
        series: SeriesId,
        range: &std::ops::RangeInclusive<i64>,
    ) -> Result<Snapshot, crate::gorilla::DecodeError> {
        let mut points = Vec::new();
        if let Some(state) = self.series.get(&series) {
            for p in &state.enc {
                let p = p?;
                if range.contains(&p.ts) {
                    points.push(p);
                }
            }
        }
        let frozen = self
            .frozen
            .iter()
            .filter(|f| {
                f.batch
                    .block(series)
                    .is_some_and(|b| b.first_ts <= *range.end() && b.last_ts >= *range.start())
            })
            .map(|f| Arc::clone(&f.batch))
            .collect();
        let segments = self
            .segments
            .iter()
            .filter(|m| m.min_ts <= *range.end() && m.max_ts >= *range.start())
            .cloned()
            .collect();
        Ok(Snapshot {
            points,
            frozen,
            segments,
        })
    }

    pub(crate) fn segments(&self) -> Vec<Arc<SegmentMeta>> {
        self.segments.clone()
    }

    pub(crate) fn memory(&self) -> MemtableMemory {
        let active_encoded_bytes = self
            .series
            .values()
            .map(|s| s.enc.bit_len().div_ceil(8) as usize)
            .sum();
        let points_in_memory = self.series.values().map(|s| s.enc.len()).sum::<u64>()
            + self
                .frozen
                .iter()
                .map(|f| f.batch.point_count())
                .sum::<u64>();
        MemtableMemory {
            active_block_bytes: self.active_bytes,
            active_encoded_bytes,
            index_bytes: FIXED_OVERHEAD_BYTES
                + self.index_alloc
                + self.series.len() * SERIES_SLOT_BYTES,
            frozen_bytes: self.frozen_bytes,
            segment_meta_bytes: self.segment_meta_bytes,
            used: self.used(),
            reserved: self.reserved(),
            series: self.series.len(),
            points_in_memory,
        }
    }
}

/// See [`Memtable::snapshot`].
pub(crate) struct Snapshot {
    pub points: Vec<Point>,
    pub frozen: Vec<Arc<SegmentBatch>>,
    pub segments: Vec<Arc<SegmentMeta>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor_core::{EngineBudget, GovernorConfig, mib};

    fn gov(limit: usize) -> Arc<MemoryGovernor> {
        MemoryGovernor::new(
            GovernorConfig::builder()
                .global_ceiling(mib(64))
                .engine(EngineId::Timeseries, EngineBudget::new(limit))
                .build()
                .unwrap(),
        )
        .unwrap()
    }

    fn points(n: usize, start: i64) -> Vec<Point> {
        (0..n as i64)
            .map(|i| Point::new(start + i * 10, (i * 7919 % 1000) as f64 / 3.0))
            .collect()
    }

    #[test]
    fn freezes_largest_then_oldest_and_releases_only_when_published() {
        let g = gov(mib(8));
        let mut m = Memtable::new(Arc::clone(&g), 4096);
        // Series 1 and 2 equal and small (1 older), series 3 large.
        for (s, n) in [(1, 50), (2, 50), (3, 2000)] {
            let (k, stop) = m.append(SeriesId(s), &points(n, 0), true);
            assert_eq!(k, n);
            assert!(matches!(stop, AppendStop::Done));
        }
        let b = m.freeze(1, 1).unwrap();
        assert_eq!(
            b.blocks.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [SeriesId(3)]
        );
        let large = b.blocks[0].1.heap_bytes();
        let b2_ids = {
            // The pending batch stays accounted until published.
            assert!(m.used() > large);
            let reserved_before = m.reserved();
            let meta = SegmentMeta {
                id: 1,
                path: "/x/1.seg".into(),
                series_count: 1,
                point_count: 2000,
                min_ts: 0,
                max_ts: 20_000,
                file_len: 100,
            };
            let p = m.publish(1, meta);
            assert!(p.released > 0 && m.reserved() < reserved_before);
            assert!(m.reserved() <= m.used() + 4096);
            let small = m.freeze(1, 2).unwrap();
            small.blocks.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        };
        // Equal sizes: the older series goes first.
        assert_eq!(b2_ids, [SeriesId(1)]);
        assert_eq!(g.reserved(EngineId::Timeseries), m.reserved());
    }

    #[test]
    fn a_full_budget_stops_the_append_with_the_missing_bytes() {
        let g = gov(16 * 1024);
        let mut m = Memtable::new(Arc::clone(&g), 4096);
        let pts: Vec<Point> = (0..100_000i64)
            .map(|i| {
                Point::new(
                    i,
                    f64::from_bits((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                )
            })
            .collect();
        let (n, stop) = m.append(SeriesId(1), &pts, true);
        assert!(n > 0 && n < pts.len());
        assert!(
            matches!(stop, AppendStop::NeedMemory { bytes, cause: Some(_) } if bytes > 0),
            "{stop:?}"
        );
        assert!(g.reserved(EngineId::Timeseries) <= 16 * 1024);
        assert!(m.used() <= m.reserved());
        // With growth forbidden (Critical), only existing headroom is used.
        let (_, stop) = m.append(SeriesId(2), &pts, false);
        assert!(matches!(stop, AppendStop::NeedMemory { cause: None, .. }));
        let got: Vec<Point> = m
            .snapshot(SeriesId(1), &(i64::MIN..=i64::MAX))
            .unwrap()
            .points;
        assert_eq!(got.len(), n);
    }

    #[test]
    fn budget_release_never_gives_back_more_than_asked() {
        let g = gov(mib(1));
        let mut b = Budget::default();
        b.try_grow(&g, 1000).unwrap();
        b.absorb(g.try_reserve(EngineId::Timeseries, 500).unwrap());
        assert_eq!(b.size(), 1500);
        assert_eq!(b.release(700), 700);
        assert_eq!(b.size(), 800);
        assert_eq!(b.release(5000), 800);
        assert_eq!(b.size(), 0);
        assert_eq!(g.reserved(EngineId::Timeseries), 0);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use governor_core::{EngineBudget, GovernorConfig};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append { series: u64, n: usize },
        Freeze { target: usize },
        Publish,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..6, 1usize..300).prop_map(|(series, n)| Op::Append { series, n }),
            1 => (1usize..20_000).prop_map(|target| Op::Freeze { target }),
            1 => Just(Op::Publish),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Under any sequence of appends, freezes and publishes, with a budget small enough to
        /// refuse some appends: reserved covers used and exceeds it by at most a chunk (after a
        /// publish), the governor agrees with the memtable, the limit holds, and every point
        /// stored (active, frozen or published) is exactly what was appended.
        #[test]
        fn accounting_and_contents_stay_exact(ops in proptest::collection::vec(op(), 1..60)) {
            let limit = 48 * 1024;
            let chunk = 4096;
            let g = MemoryGovernor::new(
                GovernorConfig::builder()
                    .global_ceiling(1 << 20)
                    .engine(EngineId::Timeseries, EngineBudget::new(limit))
                    .build()
                    .unwrap(),
            )
            .unwrap();
            let mut m = Memtable::new(Arc::clone(&g), chunk);
            let mut model: Vec<Vec<Point>> = vec![Vec::new(); 6];
            let mut published: Vec<Arc<SegmentBatch>> = Vec::new();
            let mut next_ts = [0i64; 6];
            let mut id = 0;
            for op in ops {
                match op {
                    Op::Append { series, n } => {
                        let s = series as usize;
                        let pts: Vec<Point> = (0..n as i64)
                            .map(|i| {
                                let ts = next_ts[s] + 1 + i * (1 + (i % 3));
                                Point::new(ts, f64::from_bits(ts as u64 ^ 0x4000_0000_0000_0000))
                            })
                            .collect();
                        let (k, _) = m.append(SeriesId(series), &pts, true);
                        model[s].extend_from_slice(&pts[..k]);
                        if k > 0 {
                            next_ts[s] = pts[k - 1].ts;
                        }
                    }
                    Op::Freeze { target } => {
                        if m.oldest_frozen().is_none() {
                            id += 1;
                            m.freeze(target, id);
                        }
                    }
                    Op::Publish => {
                        if let Some(b) = m.oldest_frozen() {
                            let meta = SegmentMeta {
                                id: b.id,
                                path: format!("/seg/{}", b.id).into(),
                                series_count: 1,
                                point_count: b.point_count(),
                                min_ts: i64::MAX,
                                max_ts: i64::MIN, // never matches a query range: read from `published`
                                file_len: 0,
                            };
                            published.push(Arc::clone(&b));
                            m.publish(b.id, meta);
                            prop_assert!(m.reserved() <= m.used() + chunk);
                        }
                    }
                }
                prop_assert!(m.used() <= m.reserved(), "used {} > reserved {}", m.used(), m.reserved());
                prop_assert_eq!(g.reserved(EngineId::Timeseries), m.reserved());
                prop_assert!(g.reserved(EngineId::Timeseries) <= limit);
            }
            for (s, want) in model.iter().enumerate() {
                let series = SeriesId(s as u64);
                let snap = m.snapshot(series, &(i64::MIN..=i64::MAX)).unwrap();
                let mut got = snap.points;
                for b in snap.frozen.iter().chain(&published) {
                    if let Some(block) = b.block(series) {
                        got.extend(block.iter().map(Result::unwrap));
                    }
                }
                got.sort_by_key(|p| p.ts);
                prop_assert_eq!(got.len(), want.len());
                for (a, b) in got.iter().zip(want) {
                    prop_assert!(a.bit_eq(b));
                }
            }
        }
    }
}
