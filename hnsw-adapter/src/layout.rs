//! The byte model of an `hnsw_rs` graph: what an insert or a load will allocate, computed
//! *before* it allocates so the governor can be asked first.
//!
//! `hnsw_rs` 0.3 stores every point as heap objects linked by `Arc`s (see `hnsw_rs::hnsw`):
//!
//! ```text
//!  points_by_layer[l]: Vec<Arc<Point>> ──▶ Arc<Point> { data: Vec<f32>, origin_id, p_id,
//!                                                       neighbours: Arc<RwLock<Vec<Vec<Arc<PointWithOrder>>>>> }
//!                                                                                  │ 16 layer slots,
//!                                                                                  ▼ one list per layer ≤ level
//!                                                             Arc<PointWithOrder { point_ref: Arc<Point>, dist: f32 }>
//! ```
//!
//! So a point costs: its `Arc<Point>`, its vector, the `Arc<RwLock<..>>` around its
//! neighbourhood, the 16-slot outer table, and per layer it lives in one list of 8-byte slots
//! plus one 32-byte `Arc<PointWithOrder>` per edge. The model rounds every allocation to
//! jemalloc's size classes (the allocator our binaries run with), which is what
//! `stats.allocated` counts.
//!
//! Two cases differ and get two formulas:
//! - **Built by inserts** ([`LayoutModel::insert_bound`]): a point's lists are cloned to the
//!   selected neighbours, then grow by reverse edges (`Vec::push` doubling) and are pruned back
//!   to the threshold (`M`, or `2M` at layer 0). A list's capacity therefore never passes
//!   `2 × threshold`, and it holds at most `threshold` edges: that is the bound we charge. It
//!   over-counts a typical graph by a third or so, but it is an upper bound no later reverse
//!   edge can break, because every list was charged its worst case when its point went in.
//! - **Reloaded from a dump** ([`loaded_point_bytes`]): `hnswio` pushes edges one by one into
//!   empty lists, so a list of `n` edges has capacity `max(4, n.next_power_of_two())`; we
//!   know every `n` from the graph at dump time and store the exact total in the manifest.
//!   The reload also builds a temporary `HashMap<PointId, Vec<Vec<Neighbour>>>` of the whole
//!   graph: [`load_transient_bytes`] estimates it so the load reserves its peak.
//!
//! The model is checked against jemalloc's `stats.allocated` in `tests/jemalloc_books.rs`.

use std::mem::size_of;

use hnsw_rs::hnsw::{Neighbour, Point};

/// `hnsw_rs`'s `NB_LAYER_MAX` (crate-private there): every point gets a 16-slot layer table.
pub const NB_LAYER_MAX: usize = 16;

/// Heap header of an `Arc` (strong + weak counts).
const ARC_HEADER: usize = 2 * size_of::<usize>();

/// `Arc<PointWithOrder>`: the header plus `{ Arc<Point>, f32 }` padded to 16 bytes.
/// `PointWithOrder` is crate-private in `hnsw_rs`, so its size is written out here.
const EDGE_ARC_BYTES: usize = ARC_HEADER + 2 * size_of::<usize>();

/// Fixed per-segment bytes outside the points: the `Hnsw` and `PointIndexation` structs, the
/// layer generator's `StdRng` behind an `Arc<Mutex<..>>`, a few `Arc<RwLock<..>>` counters,
/// our own wrapper, and the loader's buffers while a dump is read. Rounded up; small next
/// to a segment of thousands of points.
pub const SEGMENT_FIXED_BYTES: usize = 4 * 1024;

/// Rounds an allocation request up to jemalloc's size class (4 classes per doubling above
/// 128 bytes, 16-byte steps below). Zero-sized requests allocate nothing.
pub const fn size_class(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else if bytes <= 8 {
        8
    } else if bytes <= 128 {
        bytes.div_ceil(16) * 16
    } else {
        // Largest power of two strictly below `bytes`; classes step by a quarter of it.
        let k = usize::BITS - 1 - (bytes - 1).leading_zeros();
        let step = 1usize << (k - 2);
        bytes.div_ceil(step) * step
    }
}

/// Capacity a `Vec` reaches when `len` elements are pushed one by one into an empty `Vec` of
/// 8-byte elements (the standard library's amortized growth: 4, 8, 16, ...).
const fn pushed_capacity(len: usize) -> usize {
    if len == 0 {
        0
    } else if len <= 4 {
        4
    } else {
        len.next_power_of_two()
    }
}

/// Capacity after one more push into a `Vec` of 8-byte elements holding `len` of `cap`.
const fn grow_on_push(len: usize, cap: usize) -> usize {
    if len < cap {
        cap
    } else {
        let doubled = cap * 2;
        let at_least = if doubled > len + 1 { doubled } else { len + 1 };
        if at_least < 4 { 4 } else { at_least }
    }
}

/// Bytes of one point that do not depend on its edges: `Arc<Point>`, its vector, the
/// `Arc<RwLock<Vec<..>>>` around its neighbourhood and the 16-slot layer table.
pub fn point_fixed_bytes(dim: usize) -> usize {
    size_class(ARC_HEADER + size_of::<Point<'static, f32>>())
        + size_class(dim * size_of::<f32>())
        + size_class(ARC_HEADER + size_of::<parking_lot::RwLock<Vec<Vec<usize>>>>())
        + size_class(NB_LAYER_MAX * size_of::<Vec<usize>>())
}

/// Exact bytes of one point as `hnswio` reloads it, given its edge count per layer.
pub fn loaded_point_bytes(dim: usize, edges_per_layer: &[usize]) -> usize {
    point_fixed_bytes(dim)
        + edges_per_layer
            .iter()
            .map(|&n| size_class(pushed_capacity(n) * size_of::<usize>()) + n * EDGE_ARC_BYTES)
            .sum::<usize>()
}

/// Bytes of the reload's temporary structures for one point: its entry in the neighbourhood
/// map (key + 16-slot `Vec<Vec<Neighbour>>`, its per-layer lists sized exactly) and the
/// map's bucket share, counted twice because a growing map holds old and new tables at once.
pub fn load_transient_point_bytes(edges_per_layer: &[usize]) -> usize {
    let bucket = size_of::<(hnsw_rs::hnsw::PointId, Vec<Vec<Neighbour>>)>() + 1;
    // Buckets run at most 7/8 full and double: between 8/7 and 16/7 buckets per point; the
    // old table lives on during a resize, so take 2 × 16/7 ≈ 5 buckets per point.
    5 * bucket
        + size_class(NB_LAYER_MAX * size_of::<Vec<Neighbour>>())
        + edges_per_layer
            .iter()
            .map(|&n| size_class(n * size_of::<Neighbour>()))
            .sum::<usize>()
}

/// Peak bytes the reload needs on top of the resident graph, for a dump of `points` points.
pub fn load_transient_bytes(per_point_transient_sum: usize) -> usize {
    // Two 8 KiB `BufReader`s and the description strings, plus the per-point sum.
    2 * size_class(8 * 1024) + per_point_transient_sum
}

/// What a graph reloaded from a dump of `layer_len` points per layer can take, whatever its
/// edges: resident bytes and the loader's transient peak, each as `(least, most)`. A point
/// holds at least its fixed part and at most full lists (`2M` edges at layer 0, `M` above,
/// up to the top layer). `None` when even the least cannot be represented (a damaged
/// figure: no such graph fits in memory). The most saturates at `usize::MAX`, which is
/// still an upper bound.
pub fn loaded_bounds(
    dim: usize,
    max_nb_connection: usize,
    layer_len: &[usize; NB_LAYER_MAX],
) -> Option<((usize, usize), (usize, usize))> {
    // Beyond this no allocation can exist; it also keeps `size_class` from overflowing.
    const MAX_ALLOC: usize = isize::MAX.unsigned_abs();
    let class = |bytes: usize| (bytes <= MAX_ALLOC).then(|| size_class(bytes));
    let vector = class(dim.checked_mul(size_of::<f32>())?)?;
    let fixed = point_fixed_bytes(0).checked_add(vector)?;
    let mut points = 0usize;
    let mut base = SEGMENT_FIXED_BYTES + size_class(NB_LAYER_MAX * size_of::<Vec<usize>>());
    for &n in layer_len {
        points = points.checked_add(n)?;
        base = base.checked_add(class(n.checked_mul(size_of::<usize>())?)?)?;
    }
    let least = points.checked_mul(fixed)?.checked_add(base)?;
    if least > MAX_ALLOC {
        return None;
    }
    let top = layer_len.iter().rposition(|&n| n > 0).unwrap_or(0);
    let mut full = [max_nb_connection; NB_LAYER_MAX];
    full[0] = 2 * max_nb_connection;
    let full = &full[..=top];
    let most = points
        .saturating_mul(loaded_point_bytes(0, full).saturating_add(vector))
        .saturating_add(base);
    let buffers = load_transient_bytes(0);
    let transient_least = points
        .checked_mul(load_transient_point_bytes(&[]))?
        .checked_add(buffers)?;
    let transient_most = points
        .saturating_mul(load_transient_point_bytes(full))
        .saturating_add(buffers);
    Some(((least, most), (transient_least, transient_most)))
}

/// How the capacity of one layer table (`points_by_layer[l]`) evolves, mirrored from
/// `PointIndexation::new`, so an insert can reserve the table's doubling before it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutModel {
    dim: usize,
    max_nb_connection: usize,
    max_layer: usize,
    layer_len: [usize; NB_LAYER_MAX],
    layer_cap: [usize; NB_LAYER_MAX],
}

impl LayoutModel {
    /// The model of a fresh `Hnsw::new(max_nb_connection, max_elements, max_layer, ..)`.
    pub fn new_built(
        dim: usize,
        max_nb_connection: usize,
        max_elements: usize,
        max_layer: usize,
    ) -> Self {
        let max_layer = max_layer.min(NB_LAYER_MAX);
        let mut layer_cap = [0; NB_LAYER_MAX];
        // Same arithmetic as `PointIndexation::new`: the expected share of points per layer.
        let s = 1. / (max_nb_connection as f64).ln();
        for (i, cap) in layer_cap.iter_mut().enumerate().take(max_layer) {
            let frac = (-(i as f64) / s).exp() - (-((i + 1) as f64) / s).exp();
            *cap = (frac * max_elements as f64).round() as usize;
        }
        Self {
            dim,
            max_nb_connection,
            max_layer,
            layer_len: [0; NB_LAYER_MAX],
            layer_cap,
        }
    }

    /// The model of a graph reloaded by `hnswio`: every layer table sized exactly.
    pub fn new_loaded(
        dim: usize,
        max_nb_connection: usize,
        max_layer: usize,
        layer_len: [usize; NB_LAYER_MAX],
    ) -> Self {
        Self {
            dim,
            max_nb_connection,
            max_layer: max_layer.min(NB_LAYER_MAX),
            layer_len,
            layer_cap: layer_len,
        }
    }

    /// Points per layer, as the model last saw them.
    pub fn layer_len(&self) -> [usize; NB_LAYER_MAX] {
        self.layer_len
    }

    /// Number of points in the graph.
    pub fn points(&self) -> usize {
        self.layer_len.iter().sum()
    }

    /// Bytes of the empty graph: its layer tables plus [`SEGMENT_FIXED_BYTES`].
    pub fn base_bytes(&self) -> usize {
        SEGMENT_FIXED_BYTES
            + size_class(NB_LAYER_MAX * size_of::<Vec<usize>>())
            + self
                .layer_cap
                .iter()
                .map(|&c| size_class(c * size_of::<usize>()))
                .sum::<usize>()
    }

    /// Upper bound of the bytes one point inserted at `level` keeps for good (its own state;
    /// the reverse edges it adds to others stay inside *their* bounds), when the graph's entry
    /// point sits at `entry_level`.
    ///
    /// Besides its lists at layers `0..=level`, `Hnsw::insert` gives the point a one-edge list
    /// at every layer between its level and the entry point's ("projecting lower layer to
    /// upper layer"); those never receive reverse edges.
    pub fn point_bound(&self, level: usize, entry_level: usize) -> usize {
        let m = self.max_nb_connection;
        let list = |threshold: usize| {
            size_class(2 * threshold * size_of::<usize>()) + threshold * EDGE_ARC_BYTES
        };
        let projected = entry_level.saturating_sub(level)
            * (size_class(pushed_capacity(1) * size_of::<usize>()) + EDGE_ARC_BYTES);
        point_fixed_bytes(self.dim) + list(2 * m) + level * list(m) + projected
    }

    /// Bytes a layer table grows by when one point is added to layer `l`.
    fn table_growth(&self, l: usize) -> usize {
        let len = self.layer_len[l];
        let cap = self.layer_cap[l];
        let new_cap = grow_on_push(len, cap);
        size_class(new_cap * size_of::<usize>()) - size_class(cap * size_of::<usize>())
    }

    /// What to reserve before an insert whose level is not known yet: the worst level the
    /// generator can draw, plus the growth of its layer table. Exact cost comes from
    /// [`LayoutModel::record_insert`] once the level is known.
    pub fn insert_bound(&self, entry_level: usize) -> usize {
        (0..self.max_layer)
            .map(|l| self.point_bound(l, entry_level) + self.table_growth(l))
            .max()
            .unwrap_or(0)
    }

    /// Records that a point landed on `level` (the entry point being at `entry_level` before
    /// the insert) and returns the bytes it keeps.
    pub fn record_insert(&mut self, level: usize, entry_level: usize) -> usize {
        let cost = self.point_bound(level, entry_level) + self.table_growth(level);
        let len = self.layer_len[level];
        self.layer_cap[level] = grow_on_push(len, self.layer_cap[level]);
        self.layer_len[level] = len + 1;
        cost
    }

    /// Highest layer holding a point (the entry point's level), 0 when empty.
    pub fn top_level(&self) -> usize {
        self.layer_len.iter().rposition(|&n| n > 0).unwrap_or(0)
    }

    /// Bound of all points now in the graph, as if each had been inserted here: what a
    /// reloaded (exactly charged) graph must hold before it may take inserts, since reverse
    /// edges can grow its lists up to this bound.
    pub fn writable_bytes(&self) -> usize {
        let top = self.top_level();
        self.base_bytes()
            + self
                .layer_len
                .iter()
                .enumerate()
                .map(|(l, &n)| n * self.point_bound(l, top))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_match_jemalloc() {
        let expect = [
            (1, 8),
            (8, 8),
            (9, 16),
            (17, 32),
            (33, 48),
            (100, 112),
            (128, 128),
            (129, 160),
            (256, 256),
            (257, 320),
            (384, 384),
            (385, 448),
            (4097, 5120),
        ];
        for (n, class) in expect {
            assert_eq!(size_class(n), class, "size class of {n}");
        }
        assert_eq!(size_class(0), 0);
    }

    #[test]
    fn vec_growth_matches_std() {
        // Drive a real Vec and compare its capacity with the model after every push.
        let mut v: Vec<usize> = Vec::new();
        let mut cap = 0;
        for i in 0..200 {
            cap = grow_on_push(v.len(), cap);
            v.push(i);
            assert_eq!(v.capacity(), cap, "after {} pushes", i + 1);
            assert_eq!(pushed_capacity(v.len()), cap);
        }
        let mut w: Vec<usize> = Vec::with_capacity(5);
        let mut cap = 5;
        for i in 0..50 {
            cap = grow_on_push(w.len(), cap);
            w.push(i);
            assert_eq!(w.capacity(), cap);
        }
    }

    #[test]
    fn insert_bound_covers_every_level_and_records_exact_cost() {
        let mut m = LayoutModel::new_built(32, 16, 100, 16);
        let bound = m.insert_bound(3);
        for level in 0..16 {
            assert!(m.point_bound(level, 3) <= bound);
        }
        // Projected one-edge lists above the point's own level are charged.
        assert!(m.point_bound(0, 3) > m.point_bound(0, 0));
        let before = m.points();
        let cost = m.record_insert(0, 3);
        assert!(cost <= bound);
        assert_eq!(m.points(), before + 1);
        // A reloaded graph's writable bound counts every point at its own level.
        let mut lens = [0; NB_LAYER_MAX];
        lens[0] = 10;
        lens[1] = 2;
        let loaded = LayoutModel::new_loaded(32, 16, 16, lens);
        assert_eq!(
            loaded.writable_bytes() - loaded.base_bytes(),
            10 * loaded.point_bound(0, 1) + 2 * loaded.point_bound(1, 1)
        );
    }

    #[test]
    fn loaded_bounds_hold_every_edge_count_and_refuse_impossible_sizes() {
        let mut lens = [0; NB_LAYER_MAX];
        lens[0] = 90;
        lens[1] = 9;
        lens[2] = 1;
        let ((least, most), (t_least, t_most)) = loaded_bounds(32, 16, &lens).unwrap();
        let base = SEGMENT_FIXED_BYTES
            + size_class(NB_LAYER_MAX * 24)
            + size_class(90 * 8)
            + size_class(9 * 8)
            + size_class(8);
        assert_eq!(least, base + 100 * loaded_point_bytes(32, &[]));
        // A point at layer 2 with full lists is the most any point can hold.
        assert_eq!(most, base + 100 * loaded_point_bytes(32, &[32, 16, 16]));
        assert!(least < most && t_least < t_most);
        assert_eq!(
            t_most,
            load_transient_bytes(100 * load_transient_point_bytes(&[32, 16, 16]))
        );
        // Sizes no memory can hold have no lower bound; the upper one saturates.
        assert_eq!(loaded_bounds(usize::MAX, 16, &lens), None);
        lens[3] = usize::MAX / 2;
        assert_eq!(loaded_bounds(32, 16, &lens), None);
        let mut empty = [0; NB_LAYER_MAX];
        let ((least, most), _) = loaded_bounds(32, 16, &empty).unwrap();
        assert_eq!(least, most);
        empty[0] = usize::MAX / 64;
        assert_eq!(loaded_bounds(1, 255, &empty), None);
    }

    #[test]
    fn loaded_bytes_grow_with_edges() {
        let lonely = loaded_point_bytes(32, &[0]);
        let linked = loaded_point_bytes(32, &[20, 3]);
        // 20 edges: 32 slots (256 B) + 20 Arcs; 3 edges: 4 slots (32 B) + 3 Arcs.
        assert_eq!(linked - lonely, 256 + 20 * 32 + 32 + 3 * 32);
    }
}
