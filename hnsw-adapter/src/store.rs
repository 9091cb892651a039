//! Segments on disk: `hnsw_rs`'s own dump format (`hnswio`: a `.hnsw.graph` and a
//! `.hnsw.data` file) plus a small JSON manifest of ours.
//!
//! The manifest carries what the cache must know *before* loading: the exact bytes the
//! reloaded graph will take and the loader's peak on top (so the load can be reserved
//! first), and CRC-32s of both dump files. The checksums matter more than usual:
//! `hnswio` asserts on malformed input and even calls `process::exit(1)` when a vector is
//! truncated, so a damaged file must be caught before the loader sees it.
//!
//! # The manifest is not trusted either
//!
//! Its figures decide how much Vector memory a load reserves, so a damaged one could load a
//! segment booked at a byte, or overflow the reservation arithmetic. Three checks:
//! - **Checksum.** The manifest (format 2) is written as `{format, crc32, manifest}`, the
//!   CRC-32 taken over the manifest's compact JSON. Reading re-serializes what it parsed and
//!   compares, so any change to a value is caught (whitespace is not content).
//! - **Plausible figures.** The resident bytes and the loader's peak must lie between what a
//!   graph of the manifest's points, dimension and `M` takes with no edges and with every
//!   list full ([`crate::layout::loaded_bounds`]), computed with checked arithmetic.
//! - **Re-measured after loading.** The cache books what the loaded graph measures (the
//!   same byte model, walked over the graph), never the file's claim; the manifest only
//!   sizes the reservation taken before the load.
//!
//! A manifest that fails a check is a [`HnswError::Corrupt`] naming the file; the cache
//! keeps the segment listed as damaged (so nothing overwrites the evidence) and serves every
//! other one. Manifests of the earlier, unchecksummed format 1 are still read: their
//! figures pass the same plausibility check, their load reserves the worst case the bounds
//! allow, and after it the manifest is rewritten as format 2 with the measured figures.
//!
//! Writes never overwrite: each persist dumps a new generation (`stem.gN.hnsw.*`), syncs
//! it, then atomically renames the manifest that points at it, then removes the old files.
//! A crash leaves either the old or the new generation referenced, never a torn one.

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::HnswIo;
use hnsw_rs::prelude::DistL2;
use serde::{Deserialize, Serialize};

use crate::error::HnswError;
use crate::layout::{
    LayoutModel, NB_LAYER_MAX, SEGMENT_FIXED_BYTES, load_transient_bytes,
    load_transient_point_bytes, loaded_bounds, loaded_point_bytes, size_class,
};
use crate::segment::{
    GovernedHnsw, Graph, GraphCell, HnswParams, SegmentId, layer_counts, no_panic,
};

/// Suffix of manifest files in the cache directory.
pub(crate) const MANIFEST_SUFFIX: &str = ".manifest.json";
/// The manifest format written now: checksummed.
const FORMAT: u32 = 2;
/// The format written before manifests carried a checksum; still read.
const FORMAT_UNCHECKSUMMED: u32 = 1;

/// What the cache knows about a persisted segment without loading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentManifest {
    collection: String,
    shard: u32,
    generation: u64,
    /// Basename of the dump files; `None` for a segment persisted while empty (`hnsw_rs`
    /// cannot dump a graph without an entry point).
    basename: Option<String>,
    dim: usize,
    max_connections: usize,
    ef_construction: usize,
    max_layer: usize,
    expected_points: usize,
    layer_len: Vec<usize>,
    /// Bytes the reloaded graph takes (allocator size classes included).
    pub(crate) resident_bytes: usize,
    /// Extra bytes the loader holds at its peak.
    pub(crate) load_transient_bytes: usize,
    graph_crc32: u32,
    graph_len: u64,
    data_crc32: u32,
    data_len: u64,
    /// False for a format-1 manifest, whose figures no checksum vouches for.
    #[serde(skip)]
    checksummed: bool,
}

/// A manifest as written: its content and the CRC-32 of that content's compact JSON.
#[derive(Serialize)]
struct Envelope<'a> {
    format: u32,
    crc32: u32,
    manifest: &'a SegmentManifest,
}

#[derive(Deserialize)]
struct ReadEnvelope {
    crc32: u32,
    manifest: SegmentManifest,
}

/// Just the format number, to choose how to read the rest.
#[derive(Deserialize)]
struct FormatProbe {
    format: u32,
}

impl SegmentManifest {
    /// Reads and checks one manifest file (checksum, settings, plausible figures).
    ///
    /// # Errors
    /// [`HnswError::Corrupt`] naming the file when any check fails, [`HnswError::Io`] when
    /// it cannot be read.
    pub fn read(path: &Path) -> Result<Self, HnswError> {
        read_manifest(path)
    }

    /// False for a manifest of the old, unchecksummed format 1: its load reserves the worst
    /// case, and the cache rewrites it as a checksummed one after loading it.
    pub fn is_checksummed(&self) -> bool {
        self.checksummed
    }

    /// The segment this manifest describes.
    pub fn segment(&self) -> Result<SegmentId, HnswError> {
        SegmentId::new(&self.collection, self.shard)
    }

    /// Number of points in the dump.
    pub fn points(&self) -> usize {
        self.layer_len.iter().sum()
    }

    /// Bytes the segment will hold once loaded.
    pub fn resident_bytes(&self) -> usize {
        self.resident_bytes
    }

    /// Bytes to reserve for loading it: resident size plus the loader's peak.
    pub fn load_bytes(&self) -> usize {
        // Checked when read; saturating keeps a hand-built value from overflowing here.
        self.resident_bytes
            .saturating_add(self.load_transient_bytes)
    }

    /// What a load reserves before it starts: [`SegmentManifest::load_bytes`] when the
    /// checksum vouches for them, else the most a graph of this shape can take.
    pub(crate) fn load_reservation(&self) -> usize {
        if self.checksummed {
            return self.load_bytes();
        }
        loaded_bounds(self.dim, self.max_connections, &self.layer_array())
            .map_or(usize::MAX, |((_, most), (_, t_most))| {
                most.saturating_add(t_most)
            })
    }

    /// This manifest with the figures measured on its loaded graph, checksummed from now on.
    pub(crate) fn remeasured(&self, m: &Measured) -> Self {
        Self {
            resident_bytes: m.resident,
            load_transient_bytes: m.transient,
            checksummed: true,
            ..self.clone()
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn params(&self) -> HnswParams {
        HnswParams::new(self.dim)
            .max_connections(self.max_connections)
            .ef_construction(self.ef_construction)
            .max_layer(self.max_layer)
            .expected_points(self.expected_points)
    }

    fn layer_array(&self) -> [usize; NB_LAYER_MAX] {
        std::array::from_fn(|l| self.layer_len.get(l).copied().unwrap_or(0))
    }

    fn files(&self, dir: &Path) -> Option<(PathBuf, PathBuf)> {
        self.basename.as_ref().map(|b| dump_files(dir, b))
    }
}

fn dump_files(dir: &Path, basename: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{basename}.hnsw.graph")),
        dir.join(format!("{basename}.hnsw.data")),
    )
}

pub(crate) fn manifest_path(dir: &Path, id: &SegmentId) -> PathBuf {
    dir.join(format!("{}{MANIFEST_SUFFIX}", id.file_stem()))
}

/// CRC-32 and length of a file, streamed.
fn checksum(path: &Path) -> Result<(u32, u64), HnswError> {
    let file = File::open(path).map_err(|e| HnswError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = [0u8; 16 * 1024];
    let mut len = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| HnswError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hasher.finalize(), len))
}

fn sync_file(path: &Path) -> Result<(), HnswError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| HnswError::io(path, e))
}

/// One manifest file found by [`scan`].
pub(crate) enum Scanned {
    /// Checked and usable.
    Ok(SegmentManifest),
    /// Failed a check: the segment stays listed as damaged, its files untouched.
    Damaged {
        /// From the file name, when it names a segment (ours always do).
        segment: Option<SegmentId>,
        path: PathBuf,
        reason: String,
    },
}

/// Reads every manifest in `dir`. A damaged manifest is reported, not fatal: the other
/// segments stay usable. Only failing to list or read the directory fails the scan.
pub(crate) fn scan(dir: &Path) -> Result<Vec<Scanned>, HnswError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| HnswError::io(dir, e))? {
        let path = entry.map_err(|e| HnswError::io(dir, e))?.path();
        let is_manifest = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(MANIFEST_SUFFIX));
        if !is_manifest {
            continue;
        }
        match read_manifest(&path) {
            Ok(m) => out.push(Scanned::Ok(m)),
            Err(HnswError::Corrupt { reason, .. }) => {
                tracing::error!(path = %path.display(), %reason,
                    "vector segment manifest is damaged; segment NOT loaded, files kept");
                out.push(Scanned::Damaged {
                    segment: id_from_file_name(&path),
                    path,
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The segment a manifest's file name (`collection.shard.manifest.json`) is for.
fn id_from_file_name(path: &Path) -> Option<SegmentId> {
    let stem = path.file_name()?.to_str()?.strip_suffix(MANIFEST_SUFFIX)?;
    let (collection, shard) = stem.rsplit_once('.')?;
    SegmentId::new(collection, shard.parse().ok()?).ok()
}

fn read_manifest(path: &Path) -> Result<SegmentManifest, HnswError> {
    let text = fs::read_to_string(path).map_err(|e| HnswError::io(path, e))?;
    // Name the segment from the file name when the content cannot be trusted to.
    let from_name = id_from_file_name(path);
    let corrupt = |reason: String| HnswError::Corrupt {
        segment: from_name
            .clone()
            .unwrap_or_else(|| SegmentId::new("unnamed", 0).expect("valid literal id")),
        path: path.to_owned(),
        reason,
    };
    let probe: FormatProbe =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest: {e}")))?;
    let m = match probe.format {
        FORMAT => {
            let env: ReadEnvelope =
                serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest: {e}")))?;
            let body =
                serde_json::to_vec(&env.manifest).map_err(|e| corrupt(format!("manifest: {e}")))?;
            let crc = crc32fast::hash(&body);
            if crc != env.crc32 {
                return Err(corrupt(format!(
                    "manifest checksum {crc:08x}, the file says {:08x}: it changed after it \
                     was written",
                    env.crc32
                )));
            }
            SegmentManifest {
                checksummed: true,
                ..env.manifest
            }
        }
        FORMAT_UNCHECKSUMMED => {
            serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest: {e}")))?
        }
        other => {
            return Err(corrupt(format!(
                "manifest format {other} (this version reads {FORMAT_UNCHECKSUMMED} and {FORMAT})"
            )));
        }
    };
    check_manifest(&m, from_name.as_ref()).map_err(corrupt)?;
    Ok(m)
}

/// Everything a manifest claims that can be checked without loading its graph.
fn check_manifest(m: &SegmentManifest, from_name: Option<&SegmentId>) -> Result<(), String> {
    let id = m
        .segment()
        .map_err(|e| format!("manifest names no valid segment: {e}"))?;
    if let Some(named) = from_name
        && *named != id
    {
        return Err(format!(
            "manifest describes segment {id} but its file is named for {named}"
        ));
    }
    if let Err(e) = m.params().validate() {
        return Err(format!("manifest holds invalid HNSW settings: {e}"));
    }
    if m.layer_len.len() > NB_LAYER_MAX {
        return Err(format!(
            "manifest lists {} layers; HNSW graphs have at most {NB_LAYER_MAX}",
            m.layer_len.len()
        ));
    }
    let plain_name = |b: &str| {
        !b.is_empty() && !b.starts_with('.') && !b.contains(['/', '\\']) && !b.contains('\0')
    };
    match &m.basename {
        Some(b) if !plain_name(b) => {
            return Err(format!(
                "dump name {b:?} is not a plain file name in the cache directory"
            ));
        }
        None if m.layer_len.iter().any(|&n| n > 0) => {
            return Err("manifest lists points but names no dump files".to_owned());
        }
        _ => {}
    }
    let layers = m.layer_array();
    let Some(((least, most), (t_least, t_most))) = loaded_bounds(m.dim, m.max_connections, &layers)
    else {
        return Err(format!(
            "layer sizes {:?} of dimension {} cannot fit in any memory",
            m.layer_len, m.dim
        ));
    };
    let points = m.layer_len.iter().fold(0usize, |a, &n| a.saturating_add(n));
    if !(least..=most).contains(&m.resident_bytes) {
        return Err(format!(
            "manifest claims {} resident bytes; {points} points of dimension {} take \
             {least}..={most}",
            m.resident_bytes, m.dim
        ));
    }
    if !(t_least..=t_most).contains(&m.load_transient_bytes) {
        return Err(format!(
            "manifest claims a load peak of {} bytes; loading {points} points takes \
             {t_least}..={t_most}",
            m.load_transient_bytes
        ));
    }
    if m.resident_bytes
        .checked_add(m.load_transient_bytes)
        .is_none_or(|b| b > isize::MAX.unsigned_abs())
    {
        return Err(format!(
            "manifest's load of {} + {} bytes cannot be reserved",
            m.resident_bytes, m.load_transient_bytes
        ));
    }
    Ok(())
}

/// What a graph takes once reloaded by `hnswio`, measured on the graph itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Measured {
    /// Points per layer.
    pub(crate) layer_len: [usize; NB_LAYER_MAX],
    /// Bytes the reloaded graph holds.
    pub(crate) resident: usize,
    /// The loader's extra peak for a graph like it.
    pub(crate) transient: usize,
    /// True when every vector has `dim` components.
    pub(crate) dims_match: bool,
}

/// Walks `g` with the byte model of a reloaded graph (see [`crate::layout`]).
fn measure(g: &Graph<'_>, dim: usize) -> Measured {
    let layer_len = layer_counts(g);
    let mut resident =
        SEGMENT_FIXED_BYTES + size_class(NB_LAYER_MAX * std::mem::size_of::<Vec<usize>>());
    let mut transient = 0;
    let mut dims_match = true;
    for (l, &n) in layer_len.iter().enumerate() {
        resident += size_class(n * std::mem::size_of::<usize>());
        for p in g.get_point_indexation().get_layer_iterator(l) {
            dims_match &= p.get_v().len() == dim;
            let edges: Vec<usize> = p.get_neighborhood_id().iter().map(Vec::len).collect();
            resident += loaded_point_bytes(dim, &edges);
            transient += load_transient_point_bytes(&edges);
        }
    }
    Measured {
        layer_len,
        resident,
        transient: load_transient_bytes(transient),
        dims_match,
    }
}

impl GovernedHnsw {
    /// Dumps this graph into `dir` as generation `generation` and returns its manifest (the
    /// manifest file is written last, atomically). Inserts wait for the whole persist, so
    /// no insert can land between the dump and clearing the dirty flag.
    pub(crate) fn persist(
        &self,
        dir: &Path,
        generation: u64,
        previous: Option<&SegmentManifest>,
    ) -> Result<SegmentManifest, HnswError> {
        self.with_write_lock(|_| {
            let manifest = self.dump_graph(dir, generation)?;
            replace_manifest(dir, &manifest, previous)?;
            self.mark_clean();
            Ok(manifest)
        })
    }

    /// Sizes the graph as `hnswio` will reload it and dumps it. Caller holds the write lock.
    fn dump_graph(&self, dir: &Path, generation: u64) -> Result<SegmentManifest, HnswError> {
        let id = self.id().clone();
        let params = *self.params();
        let measured = self.graph().with_dependent(|_, g| measure(g, params.dim));
        let points: usize = measured.layer_len.iter().sum();
        let mut m = SegmentManifest {
            collection: id.collection().to_owned(),
            shard: id.shard(),
            generation,
            basename: None,
            dim: params.dim,
            max_connections: params.max_connections,
            ef_construction: params.ef_construction,
            max_layer: params.max_layer,
            expected_points: params.expected_points,
            layer_len: measured.layer_len.to_vec(),
            resident_bytes: measured.resident,
            load_transient_bytes: measured.transient,
            graph_crc32: 0,
            graph_len: 0,
            data_crc32: 0,
            data_len: 0,
            checksummed: true,
        };
        if points > 0 {
            let wanted = format!("{}.g{generation}", id.file_stem());
            let dumped = no_panic(|| {
                self.graph()
                    .with_dependent(|_, g| g.file_dump(dir, &wanted))
            })
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|reason| HnswError::Dump {
                segment: id.clone(),
                reason,
            })?;
            let (graph, data) = dump_files(dir, &dumped);
            sync_file(&graph)?;
            sync_file(&data)?;
            (m.graph_crc32, m.graph_len) = checksum(&graph)?;
            (m.data_crc32, m.data_len) = checksum(&data)?;
            m.basename = Some(dumped);
        }
        Ok(m)
    }
}

/// Writes the manifest atomically, then drops the previous generation's files.
fn replace_manifest(
    dir: &Path,
    manifest: &SegmentManifest,
    previous: Option<&SegmentManifest>,
) -> Result<(), HnswError> {
    write_manifest_file(dir, manifest)?;
    if let Some((old_graph, old_data)) = previous.and_then(|p| p.files(dir))
        && previous.and_then(|p| p.basename.as_ref()) != manifest.basename.as_ref()
    {
        // Best effort: a leftover old generation wastes disk, it does not corrupt.
        let _ = fs::remove_file(old_graph);
        let _ = fs::remove_file(old_data);
    }
    Ok(())
}

/// Writes `manifest` (checksummed) to its file atomically: temp file, sync, rename.
pub(crate) fn write_manifest_file(dir: &Path, manifest: &SegmentManifest) -> Result<(), HnswError> {
    let id = manifest.segment()?;
    let failed = |e: serde_json::Error| HnswError::Dump {
        segment: id.clone(),
        reason: e.to_string(),
    };
    let path = manifest_path(dir, &id);
    let tmp = path.with_extension("json.tmp");
    let crc32 = crc32fast::hash(&serde_json::to_vec(manifest).map_err(failed)?);
    let text = serde_json::to_string_pretty(&Envelope {
        format: FORMAT,
        crc32,
        manifest,
    })
    .map_err(failed)?;
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| HnswError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| HnswError::io(&path, e))?;
    Ok(())
}

/// A graph loaded from disk, with what it measures.
pub(crate) struct Loaded {
    pub(crate) graph: GraphCell,
    pub(crate) model: LayoutModel,
    pub(crate) measured: Measured,
}

/// Loads the graph a manifest points to, after checking its files against the checksums,
/// and measures it. The caller has already reserved [`SegmentManifest::load_reservation`].
pub(crate) fn load_graph(dir: &Path, manifest: &SegmentManifest) -> Result<Loaded, HnswError> {
    let id = manifest.segment()?;
    let params = manifest.params();
    // `hnswio` rebuilds the layer generator with all 16 layers whatever the dump's setting,
    // so inserts into a reloaded graph are bounded over 16 levels.
    let model = LayoutModel::new_loaded(
        params.dim,
        params.max_connections,
        NB_LAYER_MAX,
        manifest.layer_array(),
    );
    let Some((graph_path, data_path)) = manifest.files(dir) else {
        // Persisted while empty: an empty graph is the whole content.
        let graph = GraphCell::new(HnswIo::default(), |_| {
            hnsw_rs::hnsw::Hnsw::new(
                params.max_connections,
                0,
                params.max_layer,
                params.ef_construction,
                DistL2 {},
            )
        });
        let measured = graph.with_dependent(|_, g| measure(g, params.dim));
        return Ok(Loaded {
            graph,
            model,
            measured,
        });
    };
    for (path, crc, len) in [
        (&graph_path, manifest.graph_crc32, manifest.graph_len),
        (&data_path, manifest.data_crc32, manifest.data_len),
    ] {
        let (got_crc, got_len) = checksum(path)?;
        if (got_crc, got_len) != (crc, len) {
            return Err(HnswError::Corrupt {
                segment: id,
                path: path.clone(),
                reason: format!(
                    "checksum {got_crc:08x} over {got_len} bytes, manifest says {crc:08x} over {len}"
                ),
            });
        }
    }
    let basename = manifest.basename.clone().unwrap_or_default();
    let graph = no_panic(|| {
        GraphCell::try_new(HnswIo::new(dir, &basename), |io| {
            io.load_hnsw_with_dist(DistL2 {})
        })
    })
    .and_then(|r| r.map_err(|e| e.to_string()))
    .map_err(|reason| HnswError::Corrupt {
        segment: id.clone(),
        path: graph_path.clone(),
        reason,
    })?;
    let measured = graph.with_dependent(|_, g| measure(g, params.dim));
    let reason = if measured.layer_len != manifest.layer_array() {
        format!(
            "layer sizes {:?} differ from the manifest's {:?}",
            measured.layer_len, manifest.layer_len
        )
    } else if !measured.dims_match {
        format!(
            "vectors are not all of the manifest's dimension {}",
            params.dim
        )
    } else {
        return Ok(Loaded {
            graph,
            model,
            measured,
        });
    };
    Err(HnswError::Corrupt {
        segment: id,
        path: graph_path,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};

    use super::*;

    /// A persisted 40-point segment and its manifest.
    fn persisted(dir: &Path) -> SegmentManifest {
        let gov = MemoryGovernor::new(
            GovernorConfig::builder()
                .global_ceiling(mib(64))
                .engine(EngineId::Vector, EngineBudget::new(mib(32)))
                .build()
                .unwrap(),
        )
        .unwrap();
        let id = SegmentId::new("t", 0).unwrap();
        let params = HnswParams::new(4).expected_points(40);
        let seg = GovernedHnsw::create(&gov, id, params).unwrap();
        for i in 0..40u16 {
            let x = f32::from(i);
            seg.insert(usize::from(i), &[x, -x, x * 0.5, 1.0]).unwrap();
        }
        seg.persist(dir, 1, None).unwrap()
    }

    /// Writes `m` with a valid checksum (as a forger, or a bug, would) and reads it back.
    fn round_trip(dir: &Path, m: &SegmentManifest) -> Result<SegmentManifest, HnswError> {
        write_manifest_file(dir, m).unwrap();
        read_manifest(&manifest_path(dir, &m.segment().unwrap()))
    }

    fn reason(r: Result<SegmentManifest, HnswError>) -> String {
        match r {
            Err(HnswError::Corrupt { reason, .. }) => reason,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn written_manifests_read_back_checksummed() {
        let dir = tempfile::tempdir().unwrap();
        let m = persisted(dir.path());
        let back = read_manifest(&manifest_path(dir.path(), &m.segment().unwrap())).unwrap();
        assert_eq!(back, m);
        assert!(back.is_checksummed());
        assert_eq!(back.load_reservation(), back.load_bytes());
    }

    #[test]
    fn checksummed_figures_out_of_bounds_are_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let m = persisted(dir.path());
        for resident in [0, 1, usize::MAX / 2, usize::MAX] {
            let forged = SegmentManifest {
                resident_bytes: resident,
                ..m.clone()
            };
            let why = reason(round_trip(dir.path(), &forged));
            assert!(why.contains("resident bytes"), "{resident}: {why}");
        }
        let forged = SegmentManifest {
            load_transient_bytes: usize::MAX,
            ..m.clone()
        };
        assert!(reason(round_trip(dir.path(), &forged)).contains("load peak"));
        let mut layers = m.layer_len.clone();
        layers[0] = usize::MAX;
        let forged = SegmentManifest {
            layer_len: layers,
            ..m.clone()
        };
        assert!(reason(round_trip(dir.path(), &forged)).contains("cannot fit"));
        let forged = SegmentManifest {
            basename: Some("../elsewhere".to_owned()),
            ..m.clone()
        };
        assert!(reason(round_trip(dir.path(), &forged)).contains("plain file name"));
        let forged = SegmentManifest {
            basename: None,
            ..m.clone()
        };
        assert!(reason(round_trip(dir.path(), &forged)).contains("no dump files"));
        let forged = SegmentManifest {
            shard: 9,
            ..m.clone()
        };
        // Written under its own (shard 9) name; move it to shard 0's name.
        write_manifest_file(dir.path(), &forged).unwrap();
        let at = manifest_path(dir.path(), &m.segment().unwrap());
        fs::rename(manifest_path(dir.path(), &forged.segment().unwrap()), &at).unwrap();
        assert!(reason(read_manifest(&at)).contains("named for"));
    }

    #[test]
    fn a_graph_that_differs_from_its_manifest_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let m = persisted(dir.path());
        let mut layers = m.layer_len.clone();
        layers[0] += 1;
        let forged = SegmentManifest {
            layer_len: layers,
            ..m.clone()
        };
        let err = load_graph(dir.path(), &forged).err().unwrap();
        assert!(
            matches!(&err, HnswError::Corrupt { reason, .. } if reason.contains("layer sizes")),
            "{err}"
        );
        let loaded = load_graph(dir.path(), &m).unwrap();
        assert_eq!(loaded.measured.resident, m.resident_bytes);
        assert_eq!(loaded.measured.transient, m.load_transient_bytes);
    }

    #[test]
    fn old_manifests_reserve_the_worst_case_until_remeasured() {
        let dir = tempfile::tempdir().unwrap();
        let m = persisted(dir.path());
        let old = SegmentManifest {
            checksummed: false,
            ..m.clone()
        };
        let ((_, most), (_, t_most)) =
            loaded_bounds(m.dim, m.max_connections, &m.layer_array()).unwrap();
        assert_eq!(old.load_reservation(), most + t_most);
        assert!(old.load_reservation() > m.load_bytes());
        let loaded = load_graph(dir.path(), &old).unwrap();
        let again = old.remeasured(&loaded.measured);
        assert_eq!(again, m);
    }
}
