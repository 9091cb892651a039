//! Hash buckets on disk: rows split by a seeded hash of the join keys, each bucket one
//! spill file written through DataFusion's [`SpillManager`] (so its compression, disk
//! manager and disk limit apply, and dropping the file deletes it).

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::SpillFile;
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::spill::SpillManager;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;

use super::compact::copy_rows;

/// Buckets per split. Sixteen keeps the open files per split small (one per bucket and
/// side) while four levels of splitting reach 65,536 buckets, far more than a build side
/// that fits on disk needs at any budget a query can run under.
pub(crate) const FANOUT: usize = 16;

/// The seed of the hash that splits rows at `depth`: different from DataFusion's own hash
/// partitioning (whose partition of the rows this join's input already is, so the same
/// hash would put every row of the partition into a few buckets) and from every other
/// level's, so a bucket split again spreads over all its sub-buckets.
pub(crate) fn seed(depth: usize) -> RandomState {
    RandomState::with_seed(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(depth as u64 + 1) ^ 0x5eed)
}

/// One side of a bucket once written: its file (none when it holds no rows), rows, and the
/// bytes its batches took in memory (what reading it back will need).
#[derive(Clone, Default)]
pub(crate) struct Bucket {
    pub(crate) file: Option<Arc<dyn SpillFile>>,
    pub(crate) rows: usize,
    pub(crate) mem_bytes: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("rows", &self.rows)
            .field("mem_bytes", &self.mem_bytes)
            .finish_non_exhaustive()
    }
}

impl Bucket {
    /// The bucket's rows as a stream (empty when it has none), each batch in buffers of its
    /// own (see [`copy_rows`](super::compact::copy_rows)).
    pub(crate) fn read(&self, spill: &SpillManager) -> Result<SendableRecordBatchStream> {
        match &self.file {
            Some(file) => {
                let stream = spill.read_spill_as_stream(Arc::clone(file), None)?;
                let schema = stream.schema();
                let copied = stream.map(|b| b.and_then(|b| copy_rows(&b, 0, b.num_rows())));
                Ok(Box::pin(RecordBatchStreamAdapter::new(schema, copied)))
            }
            None => Ok(Box::pin(
                datafusion::physical_plan::memory::MemoryStream::try_new(
                    Vec::new(),
                    Arc::clone(spill.schema()),
                    None,
                )?,
            )),
        }
    }
}

/// What a bucket's open file is asked to do.
enum FileOp<'b> {
    Append(&'b RecordBatch),
    Finish,
}

/// What it answers.
enum FileDone {
    /// The appended batch's size in memory.
    Appended(usize),
    /// The closed file (none if nothing was written).
    Finished(Option<Arc<dyn SpillFile>>),
}

/// An open bucket file. DataFusion 55 returns its `InProgressSpillFile` from a module it
/// does not export, so the type cannot be named in a field; a closure that owns it can.
type OpenFile = Box<dyn for<'b> FnMut(FileOp<'b>) -> Result<FileDone> + Send>;

fn open_file(spill: &SpillManager, what: &str) -> Result<OpenFile> {
    let mut file = spill.create_in_progress_file(what)?;
    Ok(Box::new(move |op| match op {
        FileOp::Append(batch) => file.append_batch(batch).map(FileDone::Appended),
        FileOp::Finish => file.finish().map(FileDone::Finished),
    }))
}

/// Writes rows into [`FANOUT`] bucket files by the hash of their keys.
pub(crate) struct BucketWriter<'a> {
    spill: &'a SpillManager,
    keys: &'a [PhysicalExprRef],
    hash: RandomState,
    what: &'a str,
    files: Vec<Option<OpenFile>>,
    buckets: Vec<Bucket>,
    hashes: Vec<u64>,
}

impl<'a> BucketWriter<'a> {
    /// A writer splitting by `keys` with the hash of level `depth`; `what` names the join
    /// and side in errors and in the disk manager's requests.
    pub(crate) fn new(
        spill: &'a SpillManager,
        keys: &'a [PhysicalExprRef],
        depth: usize,
        what: &'a str,
    ) -> Self {
        Self {
            spill,
            keys,
            hash: seed(depth),
            what,
            files: (0..FANOUT).map(|_| None).collect(),
            buckets: vec![Bucket::default(); FANOUT],
            hashes: Vec::new(),
        }
    }

    /// Splits `batch` among the buckets and appends each part to its file.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let keys = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(n))
            .collect::<Result<Vec<_>>>()?;
        self.hashes.clear();
        self.hashes.resize(n, 0);
        create_hashes(&keys, &self.hash, &mut self.hashes)?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); FANOUT];
        for (i, h) in self.hashes.iter().enumerate() {
            // The high bits: the low ones may be what an earlier split of these rows used.
            rows[(h >> 40) as usize % FANOUT].push(i as u32);
        }
        for (b, idx) in rows.into_iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let part = if idx.len() == n {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(idx))?
            };
            self.append(b, &part)?;
        }
        Ok(())
    }

    fn append(&mut self, b: usize, part: &RecordBatch) -> Result<()> {
        let file = match &mut self.files[b] {
            Some(f) => f,
            slot @ None => {
                slot.insert(open_file(self.spill, self.what).map_err(|e| context(self.what, e))?)
            }
        };
        let FileDone::Appended(mem) =
            file(FileOp::Append(part)).map_err(|e| context(self.what, e))?
        else {
            return Err(DataFusionError::Internal(
                "a spill append answered a finish".into(),
            ));
        };
        let bucket = &mut self.buckets[b];
        bucket.rows += part.num_rows();
        bucket.mem_bytes += mem;
        Ok(())
    }

    /// Writes every batch of `stream`.
    pub(crate) async fn write_stream(
        &mut self,
        mut stream: SendableRecordBatchStream,
    ) -> Result<()> {
        while let Some(batch) = stream.next().await {
            self.write(&batch?)?;
        }
        Ok(())
    }

    /// Closes the files; the buckets in order.
    pub(crate) fn finish(mut self) -> Result<Vec<Bucket>> {
        for (b, file) in self.files.iter_mut().enumerate() {
            if let Some(f) = file {
                let FileDone::Finished(done) =
                    f(FileOp::Finish).map_err(|e| context(self.what, e))?
                else {
                    return Err(DataFusionError::Internal(
                        "a spill finish answered an append".into(),
                    ));
                };
                self.buckets[b].file = done;
            }
        }
        Ok(self.buckets)
    }
}

fn context(what: &str, e: DataFusionError) -> DataFusionError {
    e.context(format!("{what}: writing a spill bucket"))
}
