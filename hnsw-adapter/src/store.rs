//! Segments on disk: `hnsw_rs`'s own dump format (`hnswio`: a `.hnsw.graph` and a
//! `.hnsw.data` file) plus a small JSON manifest of ours.
//!
//! The manifest carries what the cache must know *before* loading: the exact bytes the
//! reloaded graph will take and the loader's peak on top (so the load can be reserved
//! first), and CRC-32s of both dump files. The checksums matter more than usual:
//! `hnswio` asserts on malformed input and even calls `process::exit(1)` when a vector is
//! truncated, so a damaged file must be caught before the loader sees it.
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
    load_transient_point_bytes, loaded_point_bytes, size_class,
};
use crate::segment::{GovernedHnsw, GraphCell, HnswParams, SegmentId, layer_counts, no_panic};

/// Suffix of manifest files in the cache directory.
pub(crate) const MANIFEST_SUFFIX: &str = ".manifest.json";
const FORMAT: u32 = 1;

/// What the cache knows about a persisted segment without loading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentManifest {
    format: u32,
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
}

impl SegmentManifest {
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
        self.resident_bytes + self.load_transient_bytes
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

/// Reads every manifest in `dir`.
pub(crate) fn scan(dir: &Path) -> Result<Vec<SegmentManifest>, HnswError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| HnswError::io(dir, e))? {
        let path = entry.map_err(|e| HnswError::io(dir, e))?.path();
        let is_manifest = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(MANIFEST_SUFFIX));
        if is_manifest {
            out.push(read_manifest(&path)?);
        }
    }
    Ok(out)
}

fn read_manifest(path: &Path) -> Result<SegmentManifest, HnswError> {
    let text = fs::read_to_string(path).map_err(|e| HnswError::io(path, e))?;
    // Name the segment from the file name (`collection.shard.manifest.json`) when the
    // content cannot be trusted to.
    let from_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(MANIFEST_SUFFIX))
        .and_then(|stem| stem.rsplit_once('.'))
        .and_then(|(c, shard)| SegmentId::new(c, shard.parse().ok()?).ok());
    let corrupt = |reason: String| HnswError::Corrupt {
        segment: from_name
            .clone()
            .unwrap_or_else(|| SegmentId::new("unnamed", 0).expect("valid literal id")),
        path: path.to_owned(),
        reason,
    };
    let m: SegmentManifest =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(corrupt(format!(
            "manifest format {} (expected {FORMAT})",
            m.format
        )));
    }
    let id = m.segment()?;
    if m.params().validate().is_err() || m.layer_len.len() > NB_LAYER_MAX {
        return Err(HnswError::Corrupt {
            segment: id,
            path: path.to_owned(),
            reason: "manifest holds invalid HNSW settings".to_owned(),
        });
    }
    Ok(m)
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
            self.write_manifest(dir, &manifest, previous)?;
            self.mark_clean();
            Ok(manifest)
        })
    }

    /// Sizes the graph as `hnswio` will reload it and dumps it. Caller holds the write lock.
    fn dump_graph(&self, dir: &Path, generation: u64) -> Result<SegmentManifest, HnswError> {
        let id = self.id().clone();
        let params = *self.params();
        let (layer_len, resident, transient) = self.graph().with_dependent(|_, g| {
            let counts = layer_counts(g);
            let mut resident =
                SEGMENT_FIXED_BYTES + size_class(NB_LAYER_MAX * std::mem::size_of::<Vec<usize>>());
            let mut transient = 0;
            for (l, &n) in counts.iter().enumerate() {
                resident += size_class(n * std::mem::size_of::<usize>());
                for p in g.get_point_indexation().get_layer_iterator(l) {
                    let edges: Vec<usize> = p.get_neighborhood_id().iter().map(Vec::len).collect();
                    resident += loaded_point_bytes(params.dim, &edges);
                    transient += load_transient_point_bytes(&edges);
                }
            }
            (counts, resident, load_transient_bytes(transient))
        });
        let points: usize = layer_len.iter().sum();
        let mut m = SegmentManifest {
            format: FORMAT,
            collection: id.collection().to_owned(),
            shard: id.shard(),
            generation,
            basename: None,
            dim: params.dim,
            max_connections: params.max_connections,
            ef_construction: params.ef_construction,
            max_layer: params.max_layer,
            expected_points: params.expected_points,
            layer_len: layer_len.to_vec(),
            resident_bytes: resident,
            load_transient_bytes: transient,
            graph_crc32: 0,
            graph_len: 0,
            data_crc32: 0,
            data_len: 0,
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

    /// Writes the manifest atomically, then drops the previous generation's files.
    fn write_manifest(
        &self,
        dir: &Path,
        manifest: &SegmentManifest,
        previous: Option<&SegmentManifest>,
    ) -> Result<(), HnswError> {
        let id = self.id();
        let path = manifest_path(dir, id);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(manifest).map_err(|e| HnswError::Dump {
            segment: id.clone(),
            reason: e.to_string(),
        })?;
        File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| HnswError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| HnswError::io(&path, e))?;
        if let Some((old_graph, old_data)) = previous.and_then(|p| p.files(dir))
            && previous.and_then(|p| p.basename.as_ref()) != manifest.basename.as_ref()
        {
            // Best effort: a leftover old generation wastes disk, it does not corrupt.
            let _ = fs::remove_file(old_graph);
            let _ = fs::remove_file(old_data);
        }
        Ok(())
    }
}

/// Loads the graph a manifest points to, after checking its files against the checksums.
/// The caller has already reserved [`SegmentManifest::load_bytes`].
pub(crate) fn load_graph(
    dir: &Path,
    manifest: &SegmentManifest,
) -> Result<(GraphCell, LayoutModel), HnswError> {
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
        let cell = GraphCell::new(HnswIo::default(), |_| {
            hnsw_rs::hnsw::Hnsw::new(
                params.max_connections,
                0,
                params.max_layer,
                params.ef_construction,
                DistL2 {},
            )
        });
        return Ok((cell, model));
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
    let loaded = no_panic(|| {
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
    let counts = loaded.with_dependent(|_, g| layer_counts(g));
    if counts != manifest.layer_array() {
        return Err(HnswError::Corrupt {
            segment: id,
            path: graph_path,
            reason: format!(
                "layer sizes {counts:?} differ from the manifest's {:?}",
                manifest.layer_len
            ),
        });
    }
    Ok((loaded, model))
}
