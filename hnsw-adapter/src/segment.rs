//! One governed HNSW graph: [`GovernedHnsw`] reserves from [`EngineId::Vector`] before every
//! allocation it makes, and holds what it reserved in one [`ReservationToken`].
//!
//! Inserts are serialized by a mutex (searches are not): the reservation for an insert is
//! taken for the *worst* level the layer generator can draw, the insert runs, the level it
//! drew is read back from the layer counts, and the surplus is returned at once. That read
//! back is only exact if no other insert runs in between, hence the mutex; `hnsw_rs` builds
//! fast enough single-threaded for segments of a few thousand points.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use governor_core::{EngineId, MemoryGovernor, ReservationToken};
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::DistL2;
use parking_lot::Mutex;

use crate::error::HnswError;
use crate::layout::{LayoutModel, NB_LAYER_MAX};

/// The graph type: `f32` vectors under the L2 distance. `'a` borrows the loader, see
/// [`GraphCell`].
pub(crate) type Graph<'a> = Hnsw<'a, f32, DistL2>;

self_cell::self_cell!(
    /// A graph together with the `HnswIo` it was loaded from. `HnswIo::load_hnsw_with_dist`
    /// returns an `Hnsw<'b, ..>` borrowing the loader (for its optional mmap), so the two
    /// must live in one value; built graphs get an unused default loader.
    pub(crate) struct GraphCell {
        owner: HnswIo,
        #[not_covariant]
        dependent: Graph,
    }
);

/// Names one segment: a shard of a collection. Used in file names, so the collection name
/// is limited to ASCII letters, digits, `-` and `_`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SegmentId {
    collection: Arc<str>,
    shard: u32,
}

impl SegmentId {
    /// The segment `shard` of `collection`.
    pub fn new(collection: &str, shard: u32) -> Result<Self, HnswError> {
        let ok_len = !collection.is_empty() && collection.len() <= 64;
        let ok_chars = collection
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_len || !ok_chars {
            return Err(HnswError::InvalidConfig {
                field: "collection",
                reason: format!(
                    "{collection:?} must be 1 to 64 ASCII letters, digits, '-' or '_' \
                     (it names files on disk)"
                ),
            });
        }
        Ok(Self {
            collection: collection.into(),
            shard,
        })
    }

    /// The collection this segment belongs to.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// The shard number within the collection.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Stem of this segment's files (`collection.shard`).
    pub(crate) fn file_stem(&self) -> String {
        format!("{}.{}", self.collection, self.shard)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.collection, self.shard)
    }
}

/// Largest vector dimension: the byte model multiplies it by sizes and point counts, and a
/// vector of 4 MiB is far beyond any embedding.
const MAX_DIM: usize = 1 << 20;

/// HNSW construction settings of a segment.
///
/// ```
/// use hnsw_adapter::HnswParams;
/// let p = HnswParams::new(32).max_connections(16).ef_construction(100).expected_points(4_000);
/// assert!(p.validate().is_ok());
/// assert!(HnswParams::new(0).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    pub(crate) dim: usize,
    pub(crate) max_connections: usize,
    pub(crate) ef_construction: usize,
    pub(crate) expected_points: usize,
    pub(crate) max_layer: usize,
}

impl HnswParams {
    /// Defaults for vectors of `dim` components: `M = 16`, `ef_construction = 200`,
    /// 16 layers, 10 000 expected points per segment.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            max_connections: 16,
            ef_construction: 200,
            expected_points: 10_000,
            max_layer: NB_LAYER_MAX,
        }
    }

    /// `M`: links per point and layer (twice that at layer 0). 2..=255.
    #[must_use]
    pub fn max_connections(mut self, m: usize) -> Self {
        self.max_connections = m;
        self
    }

    /// Candidate list size while building. Larger builds a better graph, slower.
    #[must_use]
    pub fn ef_construction(mut self, ef: usize) -> Self {
        self.ef_construction = ef;
        self
    }

    /// Points a segment is expected to hold: `hnsw_rs` preallocates its layer tables for
    /// them (and that allocation is reserved when the segment is created).
    #[must_use]
    pub fn expected_points(mut self, n: usize) -> Self {
        self.expected_points = n;
        self
    }

    /// Number of layers, 1..=16.
    #[must_use]
    pub fn max_layer(mut self, layers: usize) -> Self {
        self.max_layer = layers;
        self
    }

    /// The vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Checks every setting; `hnsw_rs` itself exits the process on some bad values.
    pub fn validate(&self) -> Result<(), HnswError> {
        let bad = |field, reason: &str| {
            Err(HnswError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if !(1..=MAX_DIM).contains(&self.dim) {
            return bad("dim", "must be in 1..=1048576 (a vector is at most 4 MiB)");
        }
        if !(2..=255).contains(&self.max_connections) {
            return bad(
                "max_connections",
                "must be in 2..=255 (stored as a byte in dumps)",
            );
        }
        if self.ef_construction == 0 {
            return bad("ef_construction", "must be at least 1 (try 100..400)");
        }
        if !(1..=NB_LAYER_MAX).contains(&self.max_layer) {
            return bad("max_layer", "must be in 1..=16");
        }
        if self.expected_points > (1 << 32) {
            return bad(
                "expected_points",
                "must be at most 2^32 per segment; shard further",
            );
        }
        Ok(())
    }
}

/// One search result: the caller's vector id and its L2 distance to the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SearchHit {
    /// Id given at insert.
    pub id: usize,
    /// L2 distance to the query.
    pub distance: f32,
}

/// What inserts change under the write mutex.
struct WriteState {
    model: LayoutModel,
    token: ReservationToken,
    /// False for a graph reloaded with its exact size: before its first insert it must
    /// reserve up to the per-point bound, because reverse edges can grow old lists.
    writable: bool,
}

/// An HNSW graph whose every allocation is reserved from the Vector engine first.
///
/// Pick it alone when one index per process is enough; [`crate::HnswCache`] keeps many of
/// them under one budget and evicts the cold ones.
///
/// Field order matters: `graph` is dropped before `state`, so the token (in `state`) gives
/// the bytes back only once the graph's memory is really freed.
pub struct GovernedHnsw {
    graph: GraphCell,
    state: Mutex<WriteState>,
    id: SegmentId,
    params: HnswParams,
    /// Mirror of the token's size, readable without the write mutex. Shared with the
    /// cache's slot, whose lock-free figures read it (0 there means "not resident").
    charged: Arc<AtomicUsize>,
    /// Set by inserts, cleared by a successful persist: evicting a dirty segment must dump it.
    dirty: AtomicBool,
}

impl GovernedHnsw {
    /// An empty graph, reserving its preallocated layer tables first.
    pub fn create(
        governor: &Arc<MemoryGovernor>,
        id: SegmentId,
        params: HnswParams,
    ) -> Result<Self, HnswError> {
        Self::create_metered(governor, id, params, Arc::default())
    }

    /// [`GovernedHnsw::create`], mirroring its charged bytes into `meter`.
    pub(crate) fn create_metered(
        governor: &Arc<MemoryGovernor>,
        id: SegmentId,
        params: HnswParams,
        meter: Arc<AtomicUsize>,
    ) -> Result<Self, HnswError> {
        params.validate()?;
        let model = LayoutModel::new_built(
            params.dim,
            params.max_connections,
            params.expected_points,
            params.max_layer,
        );
        let needed = model.base_bytes();
        let token = governor
            .try_reserve(EngineId::Vector, needed)
            .map_err(|source| HnswError::Backpressure {
                segment: id.clone(),
                needed,
                source,
            })?;
        let graph = GraphCell::new(HnswIo::default(), |_| {
            Hnsw::new(
                params.max_connections,
                params.expected_points,
                params.max_layer,
                params.ef_construction,
                DistL2 {},
            )
        });
        Ok(Self::assemble(graph, model, token, id, params, true, meter))
    }

    /// Puts a graph and its reservation together; `meter` will mirror the charged bytes.
    pub(crate) fn assemble(
        graph: GraphCell,
        model: LayoutModel,
        token: ReservationToken,
        id: SegmentId,
        params: HnswParams,
        writable: bool,
        meter: Arc<AtomicUsize>,
    ) -> Self {
        meter.store(token.size(), Ordering::Release);
        let charged = meter;
        Self {
            graph,
            state: Mutex::new(WriteState {
                model,
                token,
                writable,
            }),
            id,
            params,
            charged,
            dirty: AtomicBool::new(false),
        }
    }

    /// This segment's id.
    pub fn id(&self) -> &SegmentId {
        &self.id
    }

    /// Construction settings.
    pub fn params(&self) -> &HnswParams {
        &self.params
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.graph.with_dependent(|_, g| g.get_nb_point())
    }

    /// True when the graph holds no point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this graph holds from the Vector engine.
    pub fn charged_bytes(&self) -> usize {
        self.charged.load(Ordering::Acquire)
    }

    /// True when inserts happened since the last persist.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    pub(crate) fn mark_clean(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    pub(crate) fn graph(&self) -> &GraphCell {
        &self.graph
    }

    /// Runs `f` with the write mutex held (no insert runs meanwhile): persist uses it for a
    /// consistent dump.
    pub(crate) fn with_write_lock<R>(&self, f: impl FnOnce(&LayoutModel) -> R) -> R {
        let st = self.state.lock();
        f(&st.model)
    }

    pub(crate) fn check_vector(&self, v: &[f32]) -> Result<(), HnswError> {
        check_vector(&self.id, self.params.dim, v)
    }

    /// Adds one vector under the caller's `id`, reserving its bytes first. On
    /// [`HnswError::Backpressure`] nothing was allocated and the graph is unchanged.
    pub fn insert(&self, id: usize, vector: &[f32]) -> Result<(), HnswError> {
        self.check_vector(vector)?;
        let mut st = self.state.lock();
        let entry_level = st.model.top_level();
        let upgrade = if st.writable {
            0
        } else {
            st.model.writable_bytes().saturating_sub(st.token.size())
        };
        let needed = st.model.insert_bound(entry_level) + upgrade;
        st.token
            .try_grow(needed)
            .map_err(|source| HnswError::Backpressure {
                segment: self.id.clone(),
                needed,
                source,
            })?;
        let before = st.model.layer_len();
        let after = self.graph.with_dependent(|_, g| {
            g.insert_slice((vector, id));
            layer_counts(g)
        });
        // The only point added since `before` is ours (inserts hold the mutex).
        let level = (0..NB_LAYER_MAX)
            .find(|&l| after[l] > before[l])
            .unwrap_or(0);
        let kept = st.model.record_insert(level, entry_level) + upgrade;
        st.writable = true;
        // `kept <= needed` because `insert_bound` is the max over levels of the same cost.
        let surplus = needed.saturating_sub(kept);
        if st.token.shrink(surplus).is_err() {
            tracing::error!(segment = %self.id, surplus, "token smaller than its own reservation");
        }
        self.charged.store(st.token.size(), Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The `k` nearest points to `query`, exploring `ef` candidates (`ef` is raised to `k`).
    /// Search scratch space (a few heaps of `ef` entries) is transient and not reserved.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<Vec<SearchHit>, HnswError> {
        self.check_vector(query)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let hits = self
            .graph
            .with_dependent(|_, g| g.search(query, k, ef.max(k)));
        Ok(hits
            .into_iter()
            .map(|n| SearchHit {
                id: n.d_id,
                distance: n.distance,
            })
            .collect())
    }
}

impl fmt::Debug for GovernedHnsw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernedHnsw")
            .field("id", &self.id)
            .field("points", &self.len())
            .field("charged", &self.charged_bytes())
            .field("dirty", &self.is_dirty())
            .finish_non_exhaustive()
    }
}

/// Points per layer of a graph.
pub(crate) fn layer_counts(g: &Graph<'_>) -> [usize; NB_LAYER_MAX] {
    let pi = g.get_point_indexation();
    std::array::from_fn(|l| pi.get_layer_nb_point(l))
}

/// Dimension and finiteness check shared by inserts and searches.
pub(crate) fn check_vector(id: &SegmentId, dim: usize, v: &[f32]) -> Result<(), HnswError> {
    if v.len() != dim {
        return Err(HnswError::DimensionMismatch {
            segment: id.clone(),
            expected: dim,
            got: v.len(),
        });
    }
    if let Some(position) = v.iter().position(|x| !x.is_finite()) {
        return Err(HnswError::NonFinite {
            segment: id.clone(),
            position,
        });
    }
    Ok(())
}

/// Runs `f`, turning a panic inside `hnsw_rs` (it asserts on malformed dumps) into a message.
pub(crate) fn no_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "hnsw_rs panicked".to_owned())
    })
}
