//! Abortable work: units (a query, a bulk ingest, a batch index build) that the governor may
//! abort when an engine needs its lent floor back and reclaim cannot return it.
//!
//! Reclaim asks a borrower to give memory back; it cannot make a borrower that never calls
//! the governor again (an operator gone quiet, a hash-join build that cannot spill) let go.
//! A unit registered with [`MemoryGovernor::register_work`] can be told to stop instead:
//!
//! ```text
//!   owner ──register_work(WorkSpec)──▶ WorkHandle ──try_reserve / reserve──▶ UnitToken
//!                                         │  (or note_grown / note_shrunk when the unit's
//!                                         │   memory is booked elsewhere, e.g. a shared pool)
//!   ladder ── abort(victim) ─────────────▶│ every later reservation: MemError::Aborted
//!                                         │ on_abort callback (own thread), aborted().await
//!   owner drops its work ─▶ tokens drop ─▶ memory back in the books ─▶ the waiter is granted
//! ```
//!
//! Aborting only *signals*: the governor never takes memory from a live token. The owner's
//! callback (or a task awaiting [`WorkHandle::aborted`]) stops the work and drops what it
//! holds, so the memory comes back even if nothing of the unit ever calls the governor again.
//! The callback is user code and treated like a reclaimer (see the `reclaim` module): it runs
//! on a thread of its own, may block or panic, and neither wedges nor breaks the governor.
//!
//! Which unit is aborted, and when, is decided elsewhere: the `ladder` module (when) and the
//! `victim` module (which).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::engine::EngineId;
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::reservation::ReservationToken;
use crate::story::Story;
use crate::victim::Candidate;

/// The priority of a unit when its owner gives none (0 is aborted first, 255 last).
pub const DEFAULT_PRIORITY: u8 = 128;

/// What the owner of an abort callback is told.
type AbortCallback = Box<dyn FnOnce(&MemError) + Send>;

/// Names a registered unit of work in errors and stories.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkRef {
    /// The governor-wide id of the registration.
    pub id: u64,
    /// The engine the unit draws on.
    pub engine: EngineId,
    /// The owner's label ("query 42: nightly report"); shared, as a `WorkRef` is copied
    /// into every error and story that names the unit.
    pub label: Arc<str>,
}

impl std::fmt::Display for WorkRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} unit '{}' (#{})", self.engine, self.label, self.id)
    }
}

/// How a unit of work registers: its engine, label, priority and what its abort would cost.
///
/// ```
/// use std::time::Duration;
/// use governor_core::{EngineId, WorkSpec};
///
/// let build = WorkSpec::new(EngineId::Vector, "rebuild index 'docs'")
///     .priority(50)
///     .redo_cost(Duration::from_secs(600))
///     .on_abort(|err| eprintln!("stopping the build: {err}"));
/// # let _ = build;
/// ```
pub struct WorkSpec {
    engine: EngineId,
    label: String,
    priority: u8,
    redo_cost: Option<Duration>,
    unrebuildable: bool,
    on_abort: Option<AbortCallback>,
}

impl WorkSpec {
    /// A unit of `engine`'s work, named `label` in errors and logs, at [`DEFAULT_PRIORITY`].
    pub fn new(engine: EngineId, label: impl Into<String>) -> Self {
        Self {
            engine,
            label: label.into(),
            priority: DEFAULT_PRIORITY,
            redo_cost: None,
            unrebuildable: false,
            on_abort: None,
        }
    }

    /// How important the unit is: lower priorities are aborted first.
    #[must_use]
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// What redoing the unit would cost if it were aborted now (an index build: its rebuild
    /// time). Without it the unit's age stands for the work it would lose.
    #[must_use]
    pub fn redo_cost(mut self, cost: Duration) -> Self {
        self.redo_cost = Some(cost);
        self
    }

    /// The unit holds state that cannot be rebuilt (CRDT documents, acknowledged but unflushed
    /// timeseries points): it is never chosen as a victim.
    #[must_use]
    pub fn unrebuildable(mut self) -> Self {
        self.unrebuildable = true;
        self
    }

    /// Called once, on a thread of its own, when the unit is aborted: stop the work and drop
    /// its memory. It may block or panic without harm to the governor. It is dropped without
    /// being called when the [`WorkHandle`] is dropped first, so it may own the unit's tokens.
    #[must_use]
    pub fn on_abort(mut self, callback: impl FnOnce(&MemError) + Send + 'static) -> Self {
        self.on_abort = Some(Box::new(callback));
        self
    }
}

impl std::fmt::Debug for WorkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkSpec")
            .field("engine", &self.engine)
            .field("label", &self.label)
            .field("priority", &self.priority)
            .field("redo_cost", &self.redo_cost)
            .field("unrebuildable", &self.unrebuildable)
            .field("on_abort", &self.on_abort.is_some())
            .finish()
    }
}

/// A registered unit, shared by its handle, its tokens and the registry.
pub(crate) struct Unit {
    pub(crate) at: WorkRef,
    priority: u8,
    redo_cost: Option<Duration>,
    unrebuildable: bool,
    registered: Instant,
    held: AtomicUsize,
    aborted: OnceLock<MemError>,
    notify: Notify,
    on_abort: Mutex<Option<AbortCallback>>,
}

impl Unit {
    /// The abort error, if the unit was aborted.
    pub(crate) fn abort_error(&self) -> Option<&MemError> {
        self.aborted.get()
    }

    fn check(&self) -> Result<(), MemError> {
        match self.aborted.get() {
            Some(err) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, bytes: usize) {
        // Saturating: an owner reporting more shrink than growth must not wrap the figure.
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            });
    }

    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// The registered units.
#[derive(Default)]
pub(crate) struct WorkRegistry {
    units: Mutex<Vec<Arc<Unit>>>,
    next_id: AtomicU64,
}

impl WorkRegistry {
    /// The units as the victim choice sees them, with each engine's borrowing from `borrowed`.
    pub(crate) fn candidates(&self, borrowed: impl Fn(EngineId) -> usize) -> Vec<Candidate> {
        let now = Instant::now();
        self.units
            .lock()
            .iter()
            .map(|u| Candidate {
                unit: u.at.clone(),
                priority: u.priority,
                held: u.held(),
                engine_borrowed: borrowed(u.at.engine),
                lost: u
                    .redo_cost
                    .unwrap_or_else(|| now.saturating_duration_since(u.registered)),
                unrebuildable: u.unrebuildable,
                aborted: u.aborted.get().is_some(),
            })
            .collect()
    }

    pub(crate) fn find(&self, id: u64) -> Option<Arc<Unit>> {
        self.units.lock().iter().find(|u| u.at.id == id).cloned()
    }

    /// Units per engine that could be aborted (for stories).
    pub(crate) fn abortable_per_engine(&self) -> [usize; EngineId::COUNT] {
        let mut counts = [0; EngineId::COUNT];
        for u in self.units.lock().iter() {
            if !u.unrebuildable && u.aborted.get().is_none() {
                counts[u.at.engine.index()] += 1;
            }
        }
        counts
    }
}

/// A registered unit of work; dropping it unregisters the unit (its tokens stay valid).
///
/// ```
/// use std::time::Duration;
/// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemError, MemoryGovernor, WorkSpec, mib};
///
/// let governor = MemoryGovernor::new(
///     GovernorConfig::builder()
///         .global_ceiling(mib(64))
///         .engine(EngineId::Query, EngineBudget::new(mib(64)))
///         .build()?,
/// )?;
/// let query = governor.register_work(WorkSpec::new(EngineId::Query, "report"));
/// let mut buffer = query.try_reserve(mib(8))?;
/// buffer.try_grow(mib(8))?;
/// assert_eq!(query.held(), mib(16));
///
/// // A user cancels the query (the ladder aborts victims the same way).
/// query.abort("cancelled by the user");
/// assert!(matches!(buffer.try_grow(mib(1)), Err(MemError::Aborted { .. })));
/// assert!(matches!(query.try_reserve(1), Err(MemError::Aborted { .. })));
/// drop(buffer);
/// assert_eq!(governor.reserved(EngineId::Query), 0);
/// # Ok::<(), MemError>(())
/// ```
#[must_use = "dropping the handle unregisters the unit of work"]
pub struct WorkHandle {
    governor: Arc<MemoryGovernor>,
    unit: Arc<Unit>,
}

impl WorkHandle {
    /// The unit's name in errors and stories.
    pub fn work_ref(&self) -> &WorkRef {
        &self.unit.at
    }

    /// The engine the unit draws on.
    pub fn engine(&self) -> EngineId {
        self.unit.at.engine
    }

    /// Bytes the unit holds: its [`UnitToken`]s plus what its owner reported with
    /// [`note_grown`](Self::note_grown).
    pub fn held(&self) -> usize {
        self.unit.held()
    }

    /// The [`MemError::Aborted`] the unit was aborted with, if it was.
    pub fn abort_error(&self) -> Option<MemError> {
        self.unit.abort_error().cloned()
    }

    /// `Err` with the abort error once the unit is aborted: for owners that check between
    /// steps.
    pub fn check(&self) -> Result<(), MemError> {
        self.unit.check()
    }

    /// Waits until the unit is aborted and returns the error it was aborted with. Cancel-safe.
    pub async fn aborted(&self) -> MemError {
        loop {
            let notified = self.unit.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(err) = self.unit.abort_error() {
                return err.clone();
            }
            notified.await;
        }
    }

    /// Reserves `bytes` for the unit now, or says why not (also when it was aborted).
    pub fn try_reserve(&self, bytes: usize) -> Result<UnitToken, MemError> {
        self.unit.check()?;
        let token = self.governor.try_reserve(self.engine(), bytes)?;
        Ok(UnitToken::tie(token, &self.unit))
    }

    /// Reserves `bytes` for the unit, waiting up to `timeout` as
    /// [`MemoryGovernor::reserve`] does; fails with the abort error as soon as the unit is
    /// aborted, also while it waits. The unit's own work is never chosen as a victim for it.
    pub async fn reserve(&self, bytes: usize, timeout: Duration) -> Result<UnitToken, MemError> {
        self.unit.check()?;
        let token = self
            .governor
            .reserve_as(self.engine(), bytes, timeout, Some(&self.unit))
            .await?;
        Ok(UnitToken::tie(token, &self.unit))
    }

    /// Counts `bytes` more as the unit's, for memory booked by someone else on its behalf (a
    /// DataFusion pool shared by queries books each operator; the query reports its part).
    pub fn note_grown(&self, bytes: usize) {
        self.unit.add(bytes);
    }

    /// Counts `bytes` fewer as the unit's (saturating at zero).
    pub fn note_shrunk(&self, bytes: usize) {
        self.unit.sub(bytes);
    }

    /// Aborts the unit by its owner's wish (a cancellation). Returns false when it was already
    /// aborted; the first reason stands.
    pub fn abort(&self, reason: impl Into<String>) -> bool {
        self.governor
            .abort_unit(&self.unit, None, reason.into(), None)
    }
}

impl Drop for WorkHandle {
    fn drop(&mut self) {
        let id = self.unit.at.id;
        self.governor.work.units.lock().retain(|u| u.at.id != id);
        // An unregistered unit is never aborted, so its callback will not run. Dropping it
        // now matters: a callback usually owns what the unit holds (its tokens), and those
        // tokens keep the unit alive, a cycle that would otherwise keep the memory forever.
        let callback = self.unit.on_abort.lock().take();
        drop(callback);
    }
}

impl std::fmt::Debug for WorkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkHandle")
            .field("unit", &self.unit.at)
            .field("held", &self.held())
            .field("aborted", &self.unit.abort_error().is_some())
            .finish_non_exhaustive()
    }
}

/// A [`ReservationToken`] tied to a unit of work: its bytes count as the unit's, and it cannot
/// grow once the unit is aborted. Dropping it gives the bytes back.
pub struct UnitToken {
    token: ReservationToken,
    unit: Arc<Unit>,
}

impl UnitToken {
    fn tie(token: ReservationToken, unit: &Arc<Unit>) -> Self {
        unit.add(token.size());
        Self {
            token,
            unit: Arc::clone(unit),
        }
    }

    /// Bytes this token holds.
    pub fn size(&self) -> usize {
        self.token.size()
    }

    /// The engine whose budget this token draws on.
    pub fn engine(&self) -> EngineId {
        self.token.engine()
    }

    /// Takes `bytes` more, or fails without changing anything; fails with the abort error once
    /// the unit is aborted.
    pub fn try_grow(&mut self, bytes: usize) -> Result<(), MemError> {
        self.unit.check()?;
        self.token.try_grow(bytes)?;
        self.unit.add(bytes);
        Ok(())
    }

    /// Gives `bytes` back; more than the token holds is an error and changes nothing.
    pub fn shrink(&mut self, bytes: usize) -> Result<(), MemError> {
        if bytes <= self.token.size() {
            // Counted down first: the unit's figure never shows more than it holds... and never
            // less than zero, since `sub` saturates.
            self.unit.sub(bytes);
        }
        self.token.shrink(bytes)
    }

    /// Gives everything back now and returns how many bytes that was.
    pub fn free(&mut self) -> usize {
        self.unit.sub(self.token.size());
        self.token.free()
    }
}

impl Drop for UnitToken {
    fn drop(&mut self) {
        self.unit.sub(self.token.size());
    }
}

impl std::fmt::Debug for UnitToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitToken")
            .field("unit", &self.unit.at)
            .field("size", &self.token.size())
            .finish()
    }
}

impl MemoryGovernor {
    /// Registers a unit of work that may be aborted to give a lent floor back (see the `work`
    /// and `ladder` modules); it stays registered while the handle lives.
    pub fn register_work(self: &Arc<Self>, spec: WorkSpec) -> WorkHandle {
        let id = self.work.next_id.fetch_add(1, Ordering::Relaxed);
        let unit = Arc::new(Unit {
            at: WorkRef {
                id,
                engine: spec.engine,
                label: spec.label.into(),
            },
            priority: spec.priority,
            redo_cost: spec.redo_cost,
            unrebuildable: spec.unrebuildable,
            registered: Instant::now(),
            held: AtomicUsize::new(0),
            aborted: OnceLock::new(),
            notify: Notify::new(),
            on_abort: Mutex::new(spec.on_abort),
        });
        self.work.units.lock().push(Arc::clone(&unit));
        WorkHandle {
            governor: Arc::clone(self),
            unit,
        }
    }

    /// Marks `unit` aborted for `requester` (None: by its owner), wakes its waiters and runs its
    /// callback on a thread of its own. False when it was already aborted.
    pub(crate) fn abort_unit(
        &self,
        unit: &Arc<Unit>,
        requester: Option<EngineId>,
        reason: String,
        story: Option<Story>,
    ) -> bool {
        let err = MemError::Aborted {
            victim: unit.at.clone(),
            requester,
            reason: reason.into(),
            story: story.map(Box::new),
        };
        if unit.aborted.set(err.clone()).is_err() {
            return false;
        }
        let counters = &self.books.counters;
        counters[unit.at.engine.index()]
            .aborts
            .fetch_add(1, Ordering::Relaxed);
        if let Some(requester) = requester {
            counters[requester.index()]
                .aborts_caused
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(victim = %unit.at, requester = ?requester.map(EngineId::name), held = unit.held(), error = %err, "unit of work aborted");
        unit.notify.notify_waiters();
        if let Some(callback) = unit.on_abort.lock().take() {
            let label = unit.at.clone();
            let spawned = std::thread::Builder::new()
                .name("governor-abort-call".into())
                .spawn(move || {
                    let call = std::panic::AssertUnwindSafe(|| callback(&err));
                    if std::panic::catch_unwind(call).is_err() {
                        tracing::error!(victim = %label, "the abort callback panicked");
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(victim = %unit.at, error = %e, "cannot start a thread for the abort callback; the owner must notice the abort by itself");
            }
        }
        true
    }
}
