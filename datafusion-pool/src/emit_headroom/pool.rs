//! [`HeadroomPool`]: the memory pool an aggregate runs on inside a
//! [`GovernedAggregateExec`](super::GovernedAggregateExec).
//!
//! Every reservation of the aggregate goes to the session's pool unchanged (same consumer,
//! same sizes, same fair share), so the aggregate reads, spills and merges exactly as it
//! does without this pool. Beside the aggregate stream's own consumer (DataFusion names it
//! `…AggregateStream[p]`) the pool keeps an *emit headroom*: a reservation of its own in the
//! session's pool, topped up while the input is read when the session's pool has room for
//! it, never at the cost of a refusal. Once the input has ended, a growth of the aggregate
//! stream that the session's pool refuses is asked again after the headroom has given back
//! what the growth needs. The headroom is never more than the session's pool granted, so
//! nothing is booked past a limit; if another consumer takes the bytes between the give-back
//! and the second ask, the growth is refused as it would have been without the headroom.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, Gauge, MetricBuilder};
use parking_lot::Mutex;

/// The headroom kept beside an aggregate stream that holds `held` bytes while it reads its
/// input: a sixteenth of what it holds, at least `floor`.
///
/// Why a sixteenth: the growth measured while DataFusion 55's final aggregate emits (its
/// `ProducingOutput` state resizes the reservation to the table after every batch) was 77 to
/// 108 KiB on tables of 10 to 30 MiB (BENCHMARKS.md, the mixed workload), under 1 %.
pub(crate) fn headroom_target(held: usize, floor: usize) -> usize {
    (held / 16).max(floor)
}

/// Whether `consumer` is an aggregate stream's own reservation (DataFusion 55 names them
/// `FinalHashAggregateStream[p]`, `GroupedHashAggregateStream[p]`,
/// `SingleHashAggregateStream[p]`, `OrderedFinalAggregateStream[p]`, ...).
fn is_aggregate_stream(consumer: &MemoryConsumer) -> bool {
    consumer.name().contains("AggregateStream[")
}

/// The aggregate stream's consumer and its headroom.
#[derive(Debug)]
struct Books {
    /// The aggregate stream's consumer, once it has registered.
    main: Option<usize>,
    /// The headroom, a reservation in the session's pool (made when `main` registers).
    headroom: Option<MemoryReservation>,
    /// Bytes the aggregate stream's reservations hold.
    held: usize,
    /// The aggregate's input has ended: refused growth may draw on the headroom.
    emitting: bool,
    /// The stream was refused while reading (so it spills, and will emit through its spill
    /// merge): the headroom is given back and not kept again.
    spilled: bool,
}

/// The pool's figures, as the metrics `EXPLAIN ANALYZE` shows for the aggregate.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeadroomMetrics {
    /// The most headroom set aside at once.
    pub(crate) peak_headroom: Gauge,
    /// Bytes of growth while emitting that the session's pool granted only from the
    /// headroom given back.
    pub(crate) emitted_from_headroom: Count,
    /// Growths while emitting refused even after the headroom was given back.
    pub(crate) emit_refusals: Count,
}

impl HeadroomMetrics {
    /// The metrics of `partition` in `set`.
    pub(crate) fn new(set: &ExecutionPlanMetricsSet, partition: usize) -> Self {
        Self {
            peak_headroom: MetricBuilder::new(set).gauge("peak_emit_headroom", partition),
            emitted_from_headroom: MetricBuilder::new(set)
                .counter("emitted_from_headroom", partition),
            emit_refusals: MetricBuilder::new(set).counter("emit_refusals", partition),
        }
    }
}

/// A [`MemoryPool`] for one partition of one aggregate: the session's pool, plus an emit
/// headroom for the aggregate stream's output phase (see the [module documentation](self)).
#[derive(Debug)]
pub(crate) struct HeadroomPool {
    /// The session's pool, where every reservation is booked.
    session: Arc<dyn MemoryPool>,
    /// The least headroom kept (see [`headroom_target`]).
    floor: usize,
    books: Mutex<Books>,
    metrics: HeadroomMetrics,
}

impl HeadroomPool {
    /// A pool on `session`, keeping at least `floor` bytes of headroom while the input is
    /// read when the session has them, and recording into `metrics`.
    pub(crate) fn new(
        session: &Arc<dyn MemoryPool>,
        floor: usize,
        metrics: HeadroomMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            session: Arc::clone(session),
            floor,
            books: Mutex::new(Books {
                main: None,
                headroom: None,
                held: 0,
                emitting: false,
                spilled: false,
            }),
            metrics,
        })
    }

    /// The aggregate has read all of its input: from now on a refused growth of its stream
    /// is asked again with the headroom given back, and the headroom is not topped up.
    pub(crate) fn input_ended(&self) {
        self.books.lock().emitting = true;
    }

    /// Bytes set aside as headroom now.
    #[cfg(test)]
    pub(crate) fn headroom(&self) -> usize {
        self.books
            .lock()
            .headroom
            .as_ref()
            .map_or(0, MemoryReservation::size)
    }

    /// While reading: the headroom brought to its target for `held` bytes, as far as the
    /// session's pool grants it (a refused top-up is no error), or trimmed to it.
    fn fit_headroom(&self, b: &mut Books) {
        let target = if b.spilled {
            0
        } else {
            headroom_target(b.held, self.floor)
        };
        let Some(headroom) = b.headroom.as_mut() else {
            return;
        };
        let size = headroom.size();
        if size > target {
            headroom.shrink(size - target);
        } else if size < target && headroom.try_grow(target - size).is_ok() {
            self.metrics.peak_headroom.set_max(target);
        }
    }

    /// While emitting: gives back up to `bytes` of headroom; how much it gave.
    fn give_back(b: &mut Books, bytes: usize) -> usize {
        let Some(headroom) = b.headroom.as_mut() else {
            return 0;
        };
        let n = bytes.min(headroom.size());
        headroom.shrink(n);
        n
    }
}

impl std::fmt::Display for HeadroomPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.books.lock();
        write!(
            f,
            "GovernedAggregateHeadroom({} B held, {} B headroom{}) on {}",
            b.held,
            b.headroom.as_ref().map_or(0, MemoryReservation::size),
            if b.emitting { ", emitting" } else { "" },
            self.session
        )
    }
}

impl MemoryPool for HeadroomPool {
    fn name(&self) -> &'static str {
        "GovernedAggregateHeadroom"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.session.register(consumer);
        let mut b = self.books.lock();
        if b.main.is_none() && is_aggregate_stream(consumer) {
            b.main = Some(consumer.id());
            // Unspillable: nothing can be spilled from it, and giving it back is this
            // pool's own business.
            b.headroom = Some(
                MemoryConsumer::new(format!("{} emit headroom", consumer.name()))
                    .register(&self.session),
            );
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.session.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let mut b = self.books.lock();
        if b.main != Some(reservation.consumer().id()) {
            drop(b);
            return self.session.grow(reservation, additional);
        }
        // `grow` cannot fail: while emitting, the headroom gives back what it can first, so
        // the session's pool books as little of it past its limit as possible.
        if b.emitting {
            let given = Self::give_back(&mut b, additional);
            self.metrics.emitted_from_headroom.add(given);
        }
        self.session.grow(reservation, additional);
        b.held = b.held.saturating_add(additional);
        if !b.emitting {
            self.fit_headroom(&mut b);
        }
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let mut b = self.books.lock();
        self.session.shrink(reservation, shrink);
        if b.main == Some(reservation.consumer().id()) {
            b.held = b.held.saturating_sub(shrink);
            if !b.emitting {
                self.fit_headroom(&mut b);
            }
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut b = self.books.lock();
        if b.main != Some(reservation.consumer().id()) {
            drop(b);
            return self.session.try_grow(reservation, additional);
        }
        match self.session.try_grow(reservation, additional) {
            Ok(()) => {}
            Err(refused) if b.emitting => {
                let given = Self::give_back(&mut b, additional);
                if given == 0 {
                    return Err(refused);
                }
                if let Err(e) = self.session.try_grow(reservation, additional) {
                    self.metrics.emit_refusals.add(1);
                    return Err(e);
                }
                self.metrics.emitted_from_headroom.add(given);
            }
            Err(refused) => {
                // The aggregate spills now and will emit through its spill merge, which
                // sizes itself by refusals: the headroom would only narrow the fair share
                // of every spiller (measured: it failed queries at 3 MiB that finish
                // without it).
                b.spilled = true;
                self.fit_headroom(&mut b);
                return Err(refused);
            }
        }
        b.held = b.held.saturating_add(additional);
        if !b.emitting {
            self.fit_headroom(&mut b);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.session.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.session.memory_limit()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    use super::*;

    const KIB: usize = 1024;

    fn setup(limit: usize, floor: usize) -> (Arc<dyn MemoryPool>, Arc<HeadroomPool>) {
        let session: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(limit));
        let pool = HeadroomPool::new(&session, floor, HeadroomMetrics::default());
        (session, pool)
    }

    fn register(pool: &Arc<HeadroomPool>, name: &str) -> MemoryReservation {
        MemoryConsumer::new(name)
            .with_can_spill(true)
            .register(&(Arc::clone(pool) as Arc<dyn MemoryPool>))
    }

    #[test]
    fn reading_keeps_a_sixteenth_beside_the_stream_when_there_is_room() {
        let (session, pool) = setup(1024 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        r.try_grow(800 * KIB).unwrap();
        assert_eq!(pool.headroom(), 50 * KIB);
        assert_eq!(session.reserved(), 850 * KIB);
        // A spill shrinks the stream, and the headroom with it.
        r.shrink(600 * KIB);
        assert_eq!(pool.headroom(), 16 * KIB, "the floor");
        assert_eq!(session.reserved(), 216 * KIB);
    }

    #[test]
    fn the_headroom_never_costs_the_aggregate_a_growth_while_it_reads() {
        let (session, pool) = setup(1000 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        r.try_grow(960 * KIB).unwrap();
        // The 60 KiB target did not fit; what was granted is the stream's.
        assert_eq!(session.reserved(), 960 * KIB + pool.headroom());
        assert!(pool.headroom() <= 40 * KIB);
    }

    #[test]
    fn emitting_gets_a_refused_growth_from_the_headroom() {
        let (session, pool) = setup(1000 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        r.try_grow(800 * KIB).unwrap();
        assert_eq!(pool.headroom(), 50 * KIB);
        // Someone else takes what is left of the session's pool.
        let other = MemoryConsumer::new("other").register(&session);
        other.try_grow(150 * KIB).unwrap();
        pool.input_ended();
        r.try_grow(30 * KIB).unwrap();
        assert_eq!(pool.headroom(), 20 * KIB);
        assert_eq!(session.reserved(), 1000 * KIB, "nothing past the limit");
        assert_eq!(pool.metrics.emitted_from_headroom.value(), 30 * KIB);
        // Past the headroom the session decides, as before.
        assert!(r.try_grow(100 * KIB).is_err());
        assert_eq!(pool.metrics.emit_refusals.value(), 1);
        assert_eq!(r.size(), 830 * KIB);
        drop(r);
        drop(pool);
        assert_eq!(
            session.reserved(),
            150 * KIB,
            "the headroom left with the pool"
        );
    }

    #[test]
    fn a_refusal_while_reading_gives_the_headroom_back_for_good() {
        let (session, pool) = setup(1000 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        r.try_grow(800 * KIB).unwrap();
        assert_eq!(pool.headroom(), 50 * KIB);
        // Refused: the aggregate spills and will emit through its merge.
        assert!(r.try_grow(190 * KIB).is_err());
        assert_eq!(pool.headroom(), 0);
        r.shrink(700 * KIB);
        r.try_grow(100 * KIB).unwrap();
        assert_eq!(pool.headroom(), 0, "not kept again");
        assert_eq!(session.reserved(), 200 * KIB);
    }

    #[test]
    fn other_consumers_of_the_aggregate_earn_no_headroom() {
        let (session, pool) = setup(1000 * KIB, 16 * KIB);
        let merge = register(&pool, "ExternalSorterMerge[0]");
        merge.try_grow(400 * KIB).unwrap();
        assert_eq!(pool.headroom(), 0);
        let stream = register(&pool, "FinalHashAggregateStream[0]");
        stream.try_grow(160 * KIB).unwrap();
        assert_eq!(pool.headroom(), 16 * KIB);
        assert_eq!(session.reserved(), 576 * KIB);
        drop((merge, stream));
        drop(pool);
        assert_eq!(session.reserved(), 0);
    }

    #[test]
    fn an_infallible_grow_is_booked_whole() {
        let (session, pool) = setup(100 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        r.grow(50 * KIB);
        assert_eq!(session.reserved(), 50 * KIB + 16 * KIB);
        pool.input_ended();
        r.grow(10 * KIB);
        // The headroom gave back 10 KiB for it.
        assert_eq!(session.reserved(), 66 * KIB);
        r.free();
        drop(r);
        drop(pool);
        assert_eq!(session.reserved(), 0);
    }

    #[test]
    fn extreme_sizes_saturate_instead_of_overflowing() {
        assert_eq!(headroom_target(usize::MAX, 0), usize::MAX / 16);
        let (session, pool) = setup(100 * KIB, 16 * KIB);
        let r = register(&pool, "FinalHashAggregateStream[0]");
        assert!(r.try_grow(usize::MAX).is_err());
        pool.input_ended();
        assert!(r.try_grow(usize::MAX).is_err());
        assert_eq!(session.reserved(), 0);
    }
}
