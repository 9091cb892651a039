//! One output partition of a [`SpillingHashJoinExec`](super::SpillingHashJoinExec): the
//! in-memory attempt, the split into buckets, the bucket joins and the chunked fallback.
//!
//! It runs as one task per partition feeding the partition's stream through a small
//! channel; dropping the stream aborts the task, which drops every bucket file it holds
//! (and so deletes them) and the reservation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use datafusion::arrow::array::{RecordBatch, new_null_array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::utils::memory::{estimate_memory_size, get_record_batch_memory_size};
use datafusion::common::{DataFusionError, JoinType, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::metrics::SpillMetrics;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, Gauge, MetricBuilder};
use datafusion::physical_plan::spill::SpillManager;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use futures::StreamExt;
use tokio::sync::mpsc::Sender;

use super::buckets::{Bucket, BucketWriter, FANOUT};
use super::compact::{copy_rows, shed_slack};
use super::leaf::StreamLeaf;
use super::prepaid::PrepaidPool;

/// Splits before a bucket counts as unsplittable and is joined in chunks. With
/// [`FANOUT`] 16 it is 65,536 buckets: a build side that still has a bucket too large for
/// memory then holds few distinct keys in it, which splitting cannot separate.
const MAX_SPLIT_DEPTH: usize = 4;

/// Batches waiting in the channel to the partition's stream.
const CHANNEL: usize = 2;

/// The part of the pool's limit that one join's build sides may hold in memory, over all
/// its partitions (each partition holds at most its share of it).
///
/// Why a cap and not only the pool's refusal: a join holds its build side for as long as it
/// probes, and the probe side's own operators (an aggregate, another join's build) register
/// with the pool only once probing starts. A build judged only by what the pool grants at
/// build time may take memory those operators need moments later and cannot do without
/// (TPC-H Q2 at a scaled 64 MiB: two build partitions held 4.4 of 6 MiB, and the final
/// aggregate under them was refused its first 334 KiB). A build larger than its part goes to
/// disk at once, where its buckets are joined after the probe side has finished. At a
/// budget that holds the data (TPC-H SF 1 at 1 GiB) no build side comes near the cap.
const BUILD_SHARE_OF_LIMIT: f64 = 0.5;

/// Starts partition `partition` of the join standing for `join`.
pub(crate) fn execute(
    join: &Arc<HashJoinExec>,
    partition: usize,
    context: Arc<TaskContext>,
    metrics: &ExecutionPlanMetricsSet,
) -> Result<SendableRecordBatchStream> {
    let run = PartitionRun::new(join, partition, context, metrics)?;
    let mut builder = RecordBatchReceiverStreamBuilder::new(join.schema(), CHANNEL);
    let tx = builder.tx();
    builder.spawn(async move { run.run(&tx).await });
    Ok(builder.build())
}

/// Bytes a hash table over `rows` build rows takes, as DataFusion's `collect_left_input`
/// reserves it (the table and the chain of row indices), plus the visited-rows bitmap of
/// outer, semi and anti joins: an upper bound, so an inner join that was judged to fit does
/// not ask the pool for more.
fn table_bytes(rows: usize) -> usize {
    let table = estimate_memory_size::<(u64, u64)>(rows, 256).unwrap_or(usize::MAX);
    table
        .saturating_add(rows.saturating_mul(8))
        .saturating_add(rows / 8 + 1)
}

/// Bytes buffering `batch` costs: the batch, and the copy `HashJoinExec` makes of all its
/// build batches when it concatenates them (which DataFusion does not reserve itself).
fn buffer_bytes(batch: &RecordBatch) -> usize {
    get_record_batch_memory_size(batch).saturating_mul(2)
}

/// `batch` in two halves, each in buffers of its own.
fn halves(batch: &RecordBatch) -> Result<(RecordBatch, RecordBatch)> {
    let (mid, n) = (batch.num_rows() / 2, batch.num_rows());
    Ok((copy_rows(batch, 0, mid)?, copy_rows(batch, mid, n)?))
}

fn is_exhausted(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

/// Whether a bucket pair whose sides hold `build` and `probe` rows can produce no output.
fn output_is_empty(join_type: JoinType, build: usize, probe: usize) -> bool {
    match join_type {
        JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi => build == 0 || probe == 0,
        JoinType::Left | JoinType::LeftAnti | JoinType::LeftMark => build == 0,
        JoinType::Right | JoinType::RightAnti | JoinType::RightMark => probe == 0,
        JoinType::Full => build == 0 && probe == 0,
    }
}

/// One side of a bucket pair and the bucket depth it was split at.
struct Pair {
    build: Bucket,
    probe: Bucket,
    /// Splits that made it (1 for the first).
    depth: usize,
    /// A split that put all of its parent's build rows into it: splitting again will not
    /// help (one hot key), so it is joined in chunks.
    hot: bool,
}

/// How an attempt to join a build side held in memory went.
enum Attempt {
    /// Joined; every output batch was sent (or the consumer went away).
    Done,
    /// The inner join was refused memory before it read any probe row or sent any output:
    /// nothing happened that cannot be done another way.
    DidNotFit,
}

/// The figures shown in `EXPLAIN ANALYZE` beside the spill metrics.
struct JoinMetrics {
    buckets: Count,
    max_depth: Gauge,
    chunked_rounds: Count,
}

struct PartitionRun {
    join: Arc<HashJoinExec>,
    partition: usize,
    context: Arc<TaskContext>,
    /// The inner joins' context: the session's settings, with every byte booked on this
    /// join's reservation.
    inner_context: Arc<TaskContext>,
    pool: Arc<PrepaidPool>,
    left_spill: SpillManager,
    right_spill: SpillManager,
    left_keys: Vec<PhysicalExprRef>,
    right_keys: Vec<PhysicalExprRef>,
    schema: SchemaRef,
    name: String,
    metrics: JoinMetrics,
}

impl PartitionRun {
    fn new(
        join: &Arc<HashJoinExec>,
        partition: usize,
        context: Arc<TaskContext>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Self> {
        let name = format!("SpillingHashJoin[{partition}]");
        let reservation = MemoryConsumer::new(name.clone())
            .with_can_spill(true)
            .register(context.memory_pool());
        let partitions = join
            .properties()
            .output_partitioning()
            .partition_count()
            .max(1);
        let cap = match context.memory_pool().memory_limit() {
            MemoryLimit::Finite(limit) => {
                (limit as f64 * BUILD_SHARE_OF_LIMIT / partitions as f64) as usize
            }
            MemoryLimit::Infinite | MemoryLimit::Unknown => usize::MAX,
        };
        let pool = PrepaidPool::new(reservation, cap);
        let runtime = RuntimeEnvBuilder::from_runtime_env(&context.runtime_env())
            .with_memory_pool(Arc::clone(&pool) as _)
            .build_arc()?;
        // The inner joins evaluate physical expressions only, so they need the session's
        // settings but none of its function registries.
        let inner_context = Arc::new(
            TaskContext::default()
                .with_session_config(context.session_config().clone())
                .with_runtime(runtime),
        );
        let compression = context.session_config().spill_compression();
        let spill = |schema| {
            SpillManager::new(
                context.runtime_env(),
                SpillMetrics::new(metrics, partition),
                schema,
            )
            .with_compression_type(compression)
        };
        let (left_keys, right_keys) = join
            .on()
            .iter()
            .map(|(l, r)| (Arc::clone(l), Arc::clone(r)))
            .unzip();
        Ok(Self {
            left_spill: spill(join.left().schema()),
            right_spill: spill(join.right().schema()),
            join: Arc::clone(join),
            partition,
            context,
            inner_context,
            pool,
            left_keys,
            right_keys,
            schema: join.schema(),
            metrics: JoinMetrics {
                buckets: MetricBuilder::new(metrics).counter("spill_buckets", partition),
                max_depth: MetricBuilder::new(metrics).gauge("max_split_depth", partition),
                chunked_rounds: MetricBuilder::new(metrics).counter("chunked_rounds", partition),
            },
            name,
        })
    }

    async fn run(self, tx: &Sender<Result<RecordBatch>>) -> Result<()> {
        let mut left = self
            .join
            .left()
            .execute(self.partition, Arc::clone(&self.context))?;
        let mut batches = Vec::new();
        let mut rows = 0;
        let mut fits = true;
        while let Some(batch) = left.next().await {
            let batch = batch?;
            if batch.num_rows() == 0 {
                continue;
            }
            let need = buffer_bytes(&batch);
            rows += batch.num_rows();
            batches.push(batch);
            if self.pool.try_reserve(need).is_err() {
                fits = false;
                break;
            }
        }
        fits = fits && self.pool.try_reserve(table_bytes(rows)).is_ok();
        if fits {
            let right = Arc::clone(self.join.right());
            let (partition, context) = (self.partition, Arc::clone(&self.context));
            let probe = move || right.execute(partition, context);
            match self.try_join(batches.clone(), Box::new(probe), tx).await? {
                Attempt::Done => return Ok(()),
                // The estimate was short and the pool had no more: split after all.
                Attempt::DidNotFit => {}
            }
        }
        self.spill(batches, left, tx).await
    }

    /// The road for a build side that does not fit: split both sides into buckets and join
    /// them one by one. `batches` are the build batches buffered so far (reserved), `left`
    /// the rest of the build input.
    async fn spill(
        &self,
        batches: Vec<RecordBatch>,
        left: SendableRecordBatchStream,
        tx: &Sender<Result<RecordBatch>>,
    ) -> Result<()> {
        let what = format!("{} build side", self.name);
        let mut build = BucketWriter::new(&self.left_spill, &self.left_keys, 0, &what);
        for batch in &batches {
            build.write(batch)?;
        }
        drop(batches);
        self.pool.release_prepaid();
        build.write_stream(left).await?;
        let build = build.finish()?;

        let what = format!("{} probe side", self.name);
        let mut probe = BucketWriter::new(&self.right_spill, &self.right_keys, 0, &what);
        let right = self
            .join
            .right()
            .execute(self.partition, Arc::clone(&self.context))?;
        probe.write_stream(right).await?;
        let probe = probe.finish()?;

        let mut work: Vec<Pair> = build
            .into_iter()
            .zip(probe)
            .map(|(build, probe)| Pair {
                build,
                probe,
                depth: 1,
                hot: false,
            })
            .rev()
            .collect();
        while let Some(pair) = work.pop() {
            if tx.is_closed() {
                return Ok(());
            }
            if output_is_empty(*self.join.join_type(), pair.build.rows, pair.probe.rows) {
                continue;
            }
            self.metrics.buckets.add(1);
            self.metrics.max_depth.set_max(pair.depth);
            if !pair.hot {
                if let Some(batches) = self.load(&pair.build).await? {
                    let probe_bucket = pair.probe.clone();
                    let spill = self.right_spill.clone();
                    let open = move || probe_bucket.read(&spill);
                    match self.try_join(batches, Box::new(open), tx).await? {
                        Attempt::Done => continue,
                        Attempt::DidNotFit => {}
                    }
                }
                if pair.depth < MAX_SPLIT_DEPTH {
                    work.extend(self.split(&pair).await?.into_iter().rev());
                    continue;
                }
            }
            self.chunked(&pair, tx).await?;
        }
        Ok(())
    }

    /// Reads a build bucket into memory if its bytes (and its join's) can be reserved now.
    async fn load(&self, bucket: &Bucket) -> Result<Option<Vec<RecordBatch>>> {
        // What the file's batches took when written, doubled for the join's copy, plus an
        // eighth for what decoding them may add (buffers are re-aligned).
        let need = bucket
            .mem_bytes
            .saturating_mul(2)
            .saturating_add(bucket.mem_bytes / 8)
            .saturating_add(table_bytes(bucket.rows));
        if self.pool.try_reserve(need).is_err() {
            return Ok(None);
        }
        let mut stream = bucket.read(&self.left_spill)?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch?);
        }
        Ok(Some(batches))
    }

    /// Splits both sides of `pair` into the buckets of the next level.
    async fn split(&self, pair: &Pair) -> Result<Vec<Pair>> {
        let what = format!("{} build side (split {})", self.name, pair.depth);
        let mut build = BucketWriter::new(&self.left_spill, &self.left_keys, pair.depth, &what);
        build
            .write_stream(pair.build.read(&self.left_spill)?)
            .await?;
        let build = build.finish()?;
        let what = format!("{} probe side (split {})", self.name, pair.depth);
        let mut probe = BucketWriter::new(&self.right_spill, &self.right_keys, pair.depth, &what);
        probe
            .write_stream(pair.probe.read(&self.right_spill)?)
            .await?;
        let probe = probe.finish()?;
        debug_assert_eq!(build.len(), FANOUT);
        let parent_rows = pair.build.rows;
        Ok(build
            .into_iter()
            .zip(probe)
            .map(|(build, probe)| Pair {
                hot: parent_rows > 1 && build.rows == parent_rows,
                build,
                probe,
                depth: pair.depth + 1,
            })
            .collect())
    }

    /// Joins a pair whose build side cannot be held whole: in chunks that fit, each joined
    /// against the whole other side, read again for every chunk. The side that is chunked
    /// is the one whose rows the join type reports on its own (see the module docs).
    async fn chunked(&self, pair: &Pair, tx: &Sender<Result<RecordBatch>>) -> Result<()> {
        match self.join.join_type() {
            JoinType::Inner
            | JoinType::Left
            | JoinType::LeftSemi
            | JoinType::LeftAnti
            | JoinType::LeftMark => self.chunk_rounds(pair, Chunking::Build, None, tx).await,
            JoinType::Right | JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
                self.chunk_rounds(pair, Chunking::Probe, None, tx).await
            }
            JoinType::Full => {
                // Matched pairs and unmatched build rows, chunk by chunk of the build side;
                // then the probe rows no build row matched.
                self.chunk_rounds(pair, Chunking::Build, Some(JoinType::Left), tx)
                    .await?;
                self.chunk_rounds(pair, Chunking::Probe, Some(JoinType::RightAnti), tx)
                    .await
            }
        }
    }

    async fn chunk_rounds(
        &self,
        pair: &Pair,
        chunking: Chunking,
        join_type: Option<JoinType>,
        tx: &Sender<Result<RecordBatch>>,
    ) -> Result<()> {
        let (chunked, chunked_spill, streamed, streamed_spill) = match chunking {
            Chunking::Build => (
                &pair.build,
                &self.left_spill,
                &pair.probe,
                &self.right_spill,
            ),
            Chunking::Probe => (
                &pair.probe,
                &self.right_spill,
                &pair.build,
                &self.left_spill,
            ),
        };
        let mut reader = chunked.read(chunked_spill)?;
        // Batches read but not yet in a chunk, oldest first (halves of a batch too large
        // for the pool on its own wait here).
        let mut pending: VecDeque<RecordBatch> = VecDeque::new();
        loop {
            let mut chunk = Vec::new();
            let mut rows = 0;
            loop {
                let batch = match pending.pop_front() {
                    Some(b) => b,
                    None => match reader.next().await {
                        Some(b) => b?,
                        None => break,
                    },
                };
                let table_growth = table_bytes(rows + batch.num_rows()) - table_bytes(rows);
                let need = buffer_bytes(&batch).saturating_add(table_growth);
                if let Err(e) = self.pool.try_reserve(need) {
                    if !chunk.is_empty() {
                        pending.push_front(batch);
                        break;
                    }
                    if batch.num_rows() > 1 {
                        // Spill files hold batches as large as they were written; a chunk
                        // can be as small as one row, so halve it (copied, so that each
                        // half is charged its own bytes, not the whole batch's buffers).
                        let (first, second) = halves(&batch)?;
                        pending.push_front(second);
                        pending.push_front(first);
                        continue;
                    }
                    return Err(DataFusionError::ResourcesExhausted(format!(
                        "{}: a bucket with a single hot key is joined in chunks, and not \
                         even one row ({need} B with its hash table) fits the memory pool: {e}",
                        self.name
                    )));
                }
                rows += batch.num_rows();
                chunk.push(batch);
            }
            if chunk.is_empty() {
                return Ok(());
            }
            self.metrics.chunked_rounds.add(1);
            let chunk_leaf = StreamLeaf::batches(Arc::clone(chunked_spill.schema()), chunk)?;
            let streamed_leaf = StreamLeaf::new(streamed.read(streamed_spill)?);
            let stream = match chunking {
                Chunking::Build => self.inner_join(join_type, chunk_leaf, streamed_leaf, false)?,
                // The chunk is the probe side's: swap so that it is what gets hashed.
                Chunking::Probe => self.inner_join(join_type, streamed_leaf, chunk_leaf, true)?,
            };
            let pad = join_type == Some(JoinType::RightAnti);
            let sent = self.forward(stream, tx, pad).await;
            self.pool.release_prepaid();
            if !sent? {
                return Ok(());
            }
        }
    }

    /// Joins `build` (held in memory, reserved) with the probe side `open` opens, unless
    /// the inner join is refused memory before it touched the probe side.
    async fn try_join(
        &self,
        build: Vec<RecordBatch>,
        open: Box<dyn FnOnce() -> Result<SendableRecordBatchStream> + Send>,
        tx: &Sender<Result<RecordBatch>>,
    ) -> Result<Attempt> {
        let build = StreamLeaf::batches(self.join.left().schema(), build)?;
        let (probe, opened) = StreamLeaf::lazy(self.join.right().schema(), open);
        let mut stream = self.inner_join(None, build, probe, false)?;
        // The first batch (or error) decides: a refusal before the probe side was opened
        // left nothing done that another road cannot do.
        let first = stream.next().await;
        let result = match first {
            None => Ok(Attempt::Done),
            Some(Err(e)) if is_exhausted(&e) && !opened.load(Ordering::Acquire) => {
                Ok(Attempt::DidNotFit)
            }
            Some(Err(e)) => Err(e),
            Some(Ok(batch)) => {
                if tx.send(Ok(self.adapt(batch, false)?)).await.is_err() {
                    Ok(Attempt::Done)
                } else {
                    self.forward(stream, tx, false).await.map(|_| Attempt::Done)
                }
            }
        };
        self.pool.release_prepaid();
        result
    }

    /// The inner `HashJoinExec` over two one-partition leaves: the original join's keys,
    /// filter, projection and null handling, in `CollectLeft` mode, of `join_type` if given
    /// (then without the projection, which is the caller's to apply), swapped if asked.
    fn inner_join(
        &self,
        join_type: Option<JoinType>,
        build: Arc<StreamLeaf>,
        probe: Arc<StreamLeaf>,
        swap: bool,
    ) -> Result<SendableRecordBatchStream> {
        let mut builder = self
            .join
            .builder()
            .with_new_children(vec![build as _, probe as _])?
            .with_partition_mode(PartitionMode::CollectLeft)
            .reset_state();
        if let Some(join_type) = join_type {
            builder = builder.with_type(join_type);
            if join_type == JoinType::RightAnti {
                builder = builder.with_projection(None);
            }
        }
        let join = builder.build()?;
        let plan: Arc<dyn ExecutionPlan> = if swap {
            join.swap_inputs(PartitionMode::CollectLeft)?
        } else {
            Arc::new(join)
        };
        plan.execute(0, Arc::clone(&self.inner_context))
    }

    /// Sends every batch of `stream`; `false` when the consumer went away.
    async fn forward(
        &self,
        mut stream: SendableRecordBatchStream,
        tx: &Sender<Result<RecordBatch>>,
        pad: bool,
    ) -> Result<bool> {
        while let Some(batch) = stream.next().await {
            let batch = self.adapt(batch?, pad)?;
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A batch of an inner join in this join's output schema. The inner joins give the same
    /// columns; a full join's parts differ in nullability (a left join's build columns are
    /// not nullable) or, for its unmatched probe rows (`pad`), lack the build columns, which
    /// are all NULL there.
    fn adapt(&self, batch: RecordBatch, pad: bool) -> Result<RecordBatch> {
        let batch = shed_slack(batch)?;
        if !pad {
            if batch.schema() == self.schema {
                return Ok(batch);
            }
            return Ok(RecordBatch::try_new(
                Arc::clone(&self.schema),
                batch.columns().to_vec(),
            )?);
        }
        let left = self.join.left().schema();
        let n_left = left.fields().len();
        let rows = batch.num_rows();
        let column = |i: usize| {
            if i < n_left {
                new_null_array(left.field(i).data_type(), rows)
            } else {
                Arc::clone(batch.column(i - n_left))
            }
        };
        let columns = match self.join.projection.as_deref() {
            Some(p) => p.iter().map(|&i| column(i)).collect(),
            None => (0..n_left + batch.num_columns()).map(column).collect(),
        };
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), columns)?)
    }
}

/// Which side of a bucket pair the chunked fallback holds in memory a chunk at a time.
#[derive(Clone, Copy)]
enum Chunking {
    Build,
    Probe,
}
