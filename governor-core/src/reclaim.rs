//! Reclaim: taking lent memory back by asking its borrower to spill, flush or evict.
//!
//! Engines register a [`Reclaimer`]. When memory is needed back (an engine below its floor was
//! denied, the RSS monitor saw an emergency, the rebalancer found the process too full), the
//! governor builds a *plan*: the borrowers (engines above their floor), largest borrowing first,
//! each asked for at most what it borrowed.
//!
//! # Hostile reclaimers
//!
//! A reclaimer is user code, and the governor assumes it may error, panic, block its thread,
//! never return, or lie about what it freed:
//!
//! * **Each call runs on a thread of its own** (`governor-reclaim-call`, entering the
//!   governor's runtime so that timers and `tokio::spawn` work inside it), and the plan waits
//!   for its answer at most the configured reclaim timeout. A `tokio::time::timeout` alone
//!   cannot bound a future that blocks the thread polling it: with calls on the runtime's own
//!   workers, a few thread-blocking reclaimers starved the workers that drive the timer and
//!   `reclaim` never returned. Now a blocked call costs one parked thread and that one call;
//!   the plan abandons it at the deadline and moves on. The reclaimer is marked busy until its
//!   call really returns and is skipped meanwhile, so a hung reclaimer holds at most one
//!   thread however often it is asked.
//! * **Only what the books show is credited.** The engine's reserved bytes are read before and
//!   after each call; the step is credited with what came back (`freed`), whatever the
//!   reclaimer claims (`claimed`). A claim the books do not back leaves the plan's remainder
//!   unchanged, so the next borrower is asked; the `reclaimed_bytes` metric counts credited
//!   bytes only.
//! * **Liars are quarantined.** A reclaimer whose claims exceed twice what the books show
//!   [`UNBACKED_STREAK`] calls in a row is skipped for [`QUARANTINE`] (reported as a failure,
//!   like a hung one), then asked again on probation. Concurrent allocations of the same engine
//!   can make an honest claim look unbacked once; needing a streak keeps that from
//!   quarantining honest reclaimers on a busy engine, and a false quarantine only means the
//!   plan asks the next borrower first.
//!
//! What a reclaimer that never returns costs: one OS thread parked for as long as it blocks,
//! the memory it holds (the governor never takes memory from a live token), and a failed step
//! in every plan that reaches it meanwhile. It cannot wedge the plan, the caller, the
//! rebalancer or other reclaimers, and it cannot corrupt the books, because reclaimers free
//! memory only by dropping or shrinking their own tokens.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::engine::EngineId;
use crate::error::MemError;
use crate::governor::MemoryGovernor;

/// An engine's way of giving memory back when the governor asks.
///
/// Implementations free memory by dropping or shrinking their own
/// [`ReservationToken`](crate::ReservationToken)s (spilling a sort run, flushing a memtable,
/// evicting a cached segment) and report how many bytes that released.
#[async_trait]
pub trait Reclaimer: Send + Sync {
    /// Bytes this engine could give back right now. Cheap, no I/O; used to plan.
    fn reclaimable(&self) -> usize;

    /// Releases about `target` bytes (more is fine, less is allowed) and returns how many bytes
    /// were released.
    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError>;
}

/// A reclaimer's failure, in its own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimError(pub String);

impl ReclaimError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for ReclaimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReclaimError {}

/// Which engines a reclaim may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReclaimScope {
    /// Every borrower except this engine (it is the one that needs memory).
    BorrowersExcept(EngineId),
    /// Every borrower.
    Borrowers,
    /// Only this engine, even below its floor (it hit its own limit and must make room).
    Engine(EngineId),
    /// Every engine with a reclaimer, even below its floor, largest holder first: for when
    /// the process's real memory is at the ceiling and borrowers alone cannot bring it back,
    /// so that not every floor can be honoured (the RSS monitor's last resort).
    Holders,
}

/// One reclaimer call in a plan.
#[derive(Debug, Clone)]
pub struct ReclaimStep {
    /// The engine asked.
    pub engine: EngineId,
    /// Bytes asked for.
    pub asked: usize,
    /// Bytes the engine's books show came back during the call (what the step is credited
    /// with), or why the call failed.
    pub result: Result<usize, MemError>,
    /// Bytes the reclaimer said it freed (0 when it failed).
    pub claimed: usize,
    /// How long the call took (until the plan stopped waiting for it).
    pub elapsed: Duration,
}

/// What a reclaim achieved.
#[derive(Debug, Clone, Default)]
pub struct ReclaimOutcome {
    /// Bytes asked for in total.
    pub requested: usize,
    /// Bytes the books show came back over all steps (not what reclaimers claimed).
    pub freed: usize,
    /// Each reclaimer call, in order.
    pub steps: Vec<ReclaimStep>,
    /// True when a blocking caller stopped waiting before the plan finished.
    pub abandoned: bool,
}

/// Unbacked claims in a row after which a reclaimer is quarantined.
pub const UNBACKED_STREAK: u32 = 3;

/// How long a quarantined reclaimer is skipped before it is asked again on probation.
pub const QUARANTINE: Duration = Duration::from_secs(10);

/// What the governor has learnt about one registered reclaimer.
#[derive(Debug, Default)]
struct Health {
    /// Set while a call is in flight; a reclaimer that hung is skipped until it returns.
    busy: AtomicBool,
    /// Consecutive calls whose claim the books did not back.
    unbacked: AtomicU32,
    /// Until when the reclaimer is skipped for lying.
    quarantined_until: Mutex<Option<Instant>>,
}

impl Health {
    /// Records one answered call; returns true when it put the reclaimer in quarantine.
    fn record(&self, claimed: usize, freed: usize) -> bool {
        if claimed > freed.saturating_mul(2) {
            let streak = self.unbacked.fetch_add(1, Ordering::AcqRel) + 1;
            if streak >= UNBACKED_STREAK {
                self.unbacked.store(0, Ordering::Release);
                *self.quarantined_until.lock() = Instant::now().checked_add(QUARANTINE);
                return true;
            }
        } else {
            self.unbacked.store(0, Ordering::Release);
        }
        false
    }

    /// True while the reclaimer is in quarantine.
    fn quarantined(&self) -> bool {
        let mut until = self.quarantined_until.lock();
        match *until {
            Some(end) if Instant::now() < end => true,
            Some(_) => {
                // Probation: asked again; the next unbacked streak quarantines it again.
                *until = None;
                false
            }
            None => false,
        }
    }
}

struct Entry {
    id: u64,
    engine: EngineId,
    reclaimer: Arc<dyn Reclaimer>,
    health: Arc<Health>,
}

/// The registered reclaimers.
#[derive(Default)]
pub(crate) struct ReclaimRegistry {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

impl ReclaimRegistry {
    fn for_engine(&self, engine: EngineId) -> Vec<(Arc<dyn Reclaimer>, Arc<Health>)> {
        self.entries
            .lock()
            .iter()
            .filter(|e| e.engine == engine)
            .map(|e| (Arc::clone(&e.reclaimer), Arc::clone(&e.health)))
            .collect()
    }

    pub(crate) fn has(&self, engine: EngineId) -> bool {
        self.entries.lock().iter().any(|e| e.engine == engine)
    }

    fn reclaimable(&self, engine: EngineId) -> usize {
        self.for_engine(engine)
            .iter()
            .map(|(r, _)| r.reclaimable())
            .sum()
    }
}

/// Keeps a reclaimer registered; dropping it unregisters.
#[must_use = "dropping the handle unregisters the reclaimer"]
pub struct ReclaimerHandle {
    governor: Weak<MemoryGovernor>,
    id: u64,
    engine: EngineId,
}

impl ReclaimerHandle {
    /// The engine the reclaimer serves.
    pub fn engine(&self) -> EngineId {
        self.engine
    }
}

impl Drop for ReclaimerHandle {
    fn drop(&mut self) {
        if let Some(governor) = self.governor.upgrade() {
            governor
                .reclaimers
                .entries
                .lock()
                .retain(|e| e.id != self.id);
        }
    }
}

impl std::fmt::Debug for ReclaimerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReclaimerHandle")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl MemoryGovernor {
    /// Registers `reclaimer` for `engine`; it stays registered while the handle lives.
    pub fn register_reclaimer(
        self: &Arc<Self>,
        engine: EngineId,
        reclaimer: Arc<dyn Reclaimer>,
    ) -> ReclaimerHandle {
        let id = self.reclaimers.next_id.fetch_add(1, Ordering::Relaxed);
        self.reclaimers.entries.lock().push(Entry {
            id,
            engine,
            reclaimer,
            health: Arc::default(),
        });
        ReclaimerHandle {
            governor: Arc::downgrade(self),
            id,
            engine,
        }
    }

    /// Bytes the engine's reclaimers say they could give back now.
    pub fn reclaimable(&self, engine: EngineId) -> usize {
        self.reclaimers.reclaimable(engine)
    }

    /// Asks borrowers other than `requester`, largest borrowing first, to free `bytes`.
    pub async fn reclaim_for(
        self: &Arc<Self>,
        requester: EngineId,
        bytes: usize,
    ) -> ReclaimOutcome {
        self.reclaim(ReclaimScope::BorrowersExcept(requester), bytes)
            .await
    }

    /// Asks `engine`'s own reclaimers to free `bytes`, even below its floor.
    pub async fn reclaim_from(self: &Arc<Self>, engine: EngineId, bytes: usize) -> ReclaimOutcome {
        self.reclaim(ReclaimScope::Engine(engine), bytes).await
    }

    /// Runs a reclaim of `bytes` over `scope` on the governor's reclaim runtime and waits for it.
    pub async fn reclaim(self: &Arc<Self>, scope: ReclaimScope, bytes: usize) -> ReclaimOutcome {
        let governor = Arc::clone(self);
        let task = self
            .runtime()
            .spawn(async move { governor.run_plan(scope, bytes).await });
        task.await.unwrap_or_else(|err| ReclaimOutcome {
            requested: bytes,
            abandoned: true,
            steps: vec![],
            freed: {
                tracing::error!(error = %err, "reclaim orchestration task failed");
                0
            },
        })
    }

    /// [`reclaim_for`](Self::reclaim_for) for synchronous callers (a DataFusion `try_grow`):
    /// waits at most `wait`, then returns what was freed so far with `abandoned` set; the plan
    /// keeps running in the background.
    pub fn reclaim_for_blocking(
        self: &Arc<Self>,
        requester: EngineId,
        bytes: usize,
        wait: Duration,
    ) -> ReclaimOutcome {
        self.reclaim_blocking(ReclaimScope::BorrowersExcept(requester), bytes, wait)
    }

    /// [`reclaim`](Self::reclaim) for synchronous callers: runs the plan on the governor's
    /// reclaim runtime and waits at most `wait` for it (it keeps running after that). Blocks
    /// the calling thread, so never call it from a task of the governor's own runtime.
    pub fn reclaim_blocking(
        self: &Arc<Self>,
        scope: ReclaimScope,
        bytes: usize,
        wait: Duration,
    ) -> ReclaimOutcome {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let governor = Arc::clone(self);
        self.runtime().spawn(async move {
            let outcome = governor.run_plan(scope, bytes).await;
            // The caller may have stopped waiting; then nobody needs the outcome.
            let _ = tx.send(outcome);
        });
        rx.recv_timeout(wait).unwrap_or_else(|_| ReclaimOutcome {
            requested: bytes,
            freed: 0,
            steps: vec![],
            abandoned: true,
        })
    }

    /// Starts a reclaim in the background (used by waiters and the monitors).
    pub(crate) fn spawn_reclaim(self: &Arc<Self>, scope: ReclaimScope, bytes: usize) {
        drop(self.spawn_reclaim_tracked(scope, bytes));
    }

    /// As `spawn_reclaim`, returning the plan's task so the caller can tell when it has
    /// answered (`None` when there is nothing to ask for).
    pub(crate) fn spawn_reclaim_tracked(
        self: &Arc<Self>,
        scope: ReclaimScope,
        bytes: usize,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if bytes == 0 {
            return None;
        }
        let governor = Arc::clone(self);
        Some(self.runtime().spawn(async move {
            governor.run_plan(scope, bytes).await;
        }))
    }

    /// The engines that may be asked and the most each may be asked for (what it borrowed, or
    /// for [`ReclaimScope::Holders`] everything it holds), largest first. Every candidate is
    /// listed, not just enough to cover the request on paper: a reclaimer may free less than
    /// it is asked (or lie about it), and then the plan moves on to the next one.
    pub(crate) fn plan(&self, scope: ReclaimScope) -> Vec<(EngineId, usize)> {
        if let ReclaimScope::Engine(engine) = scope {
            return if self.reclaimers.has(engine) {
                vec![(engine, usize::MAX)]
            } else {
                vec![]
            };
        }
        let share = |e: EngineId| {
            if scope == ReclaimScope::Holders {
                self.reserved(e)
            } else {
                self.borrowed(e)
            }
        };
        let mut borrowers: Vec<(EngineId, usize)> = EngineId::ALL
            .iter()
            .copied()
            .filter(|&e| scope != ReclaimScope::BorrowersExcept(e) && self.reclaimers.has(e))
            .map(|e| (e, share(e)))
            .filter(|&(_, bytes)| bytes > 0)
            .collect();
        borrowers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        borrowers
    }

    async fn run_plan(self: &Arc<Self>, scope: ReclaimScope, bytes: usize) -> ReclaimOutcome {
        let plan = self.plan(scope);
        let timeout = self.config().reclaim_timeout();
        let mut outcome = ReclaimOutcome {
            requested: bytes,
            ..ReclaimOutcome::default()
        };
        if plan.is_empty() {
            tracing::debug!(
                ?scope,
                bytes,
                "reclaim requested but nobody can give memory back"
            );
        }
        // What is still to be found, credited only with what the books show came back.
        let mut remaining = bytes;
        for (engine, share) in plan {
            // Each engine gives at most its share, counted across its reclaimers.
            let mut share = share;
            for (reclaimer, health) in self.reclaimers.for_engine(engine) {
                let ask = share.min(remaining);
                if ask == 0 {
                    break;
                }
                let step = self
                    .call_reclaimer(engine, reclaimer, health, ask, timeout)
                    .await;
                if let Ok(freed) = step.result {
                    remaining = remaining.saturating_sub(freed);
                    share = share.saturating_sub(freed);
                    outcome.freed = outcome.freed.saturating_add(freed);
                }
                outcome.steps.push(step);
            }
            if remaining == 0 {
                break;
            }
        }
        if outcome.freed > 0 {
            tracing::info!(
                ?scope,
                requested = bytes,
                freed = outcome.freed,
                "reclaim finished"
            );
        }
        outcome
    }

    async fn call_reclaimer(
        self: &Arc<Self>,
        engine: EngineId,
        reclaimer: Arc<dyn Reclaimer>,
        health: Arc<Health>,
        target: usize,
        timeout: Duration,
    ) -> ReclaimStep {
        let counters = &self.books.counters[engine.index()];
        counters.reclaim_requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let fail = |reason: String| {
            counters.reclaim_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%engine, target, %reason, "reclaimer failed; skipped");
            Err(MemError::ReclaimFailed { engine, reason })
        };
        let skipped = |result: Result<usize, MemError>| {
            self.history.push(crate::story::ReclaimRecord {
                engine,
                asked: target,
                result: result.as_ref().copied().map_err(ToString::to_string),
                elapsed: Duration::ZERO,
                at: Instant::now(),
            });
            ReclaimStep {
                engine,
                asked: target,
                result,
                claimed: 0,
                elapsed: Duration::ZERO,
            }
        };
        if health.quarantined() {
            return skipped(fail(
                "quarantined: its recent claims were not backed by the books".into(),
            ));
        }
        if health.busy.swap(true, Ordering::AcqRel) {
            return skipped(fail(
                "its previous reclaim has not returned yet (hung?)".into(),
            ));
        }
        tracing::info!(%engine, target, "asking engine to give memory back");
        let before = self.reserved(engine);
        let answer = match self.spawn_call(reclaimer, &health, target) {
            Ok(answer) => answer,
            Err(reason) => return skipped(fail(reason)),
        };
        let mut claimed = 0;
        let result = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(Ok(Ok(said)))) => {
                claimed = said;
                // The books, not the claim: what the engine holds less than before the call.
                let freed = before.saturating_sub(self.reserved(engine));
                counters
                    .reclaimed_bytes
                    .fetch_add(freed as u64, Ordering::Relaxed);
                if health.record(claimed, freed) {
                    counters.reclaim_quarantines.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%engine, claimed, freed, quarantine = ?QUARANTINE, "reclaimer quarantined: its claims are not backed by the books");
                } else if claimed > freed {
                    tracing::debug!(%engine, claimed, freed, "reclaimer claimed more than the books show came back");
                }
                Ok(freed)
            }
            Ok(Ok(Ok(Err(err)))) => fail(err.to_string()),
            Ok(Ok(Err(()))) => fail("the reclaimer panicked".into()),
            Ok(Err(_)) => fail("the reclaimer's thread ended without an answer".into()),
            Err(_) => fail(format!(
                "no answer within {timeout:?}; abandoned (its thread is left to finish)"
            )),
        };
        match &result {
            Ok(0) => counters.reclaim_empty.fetch_add(1, Ordering::Relaxed),
            Ok(_) => counters.reclaim_freed.fetch_add(1, Ordering::Relaxed),
            Err(_) => 0,
        };
        let elapsed = started.elapsed();
        self.history.push(crate::story::ReclaimRecord {
            engine,
            asked: target,
            result: result.as_ref().copied().map_err(ToString::to_string),
            elapsed,
            at: Instant::now(),
        });
        ReclaimStep {
            engine,
            asked: target,
            result,
            claimed,
            elapsed,
        }
    }

    /// Runs one reclaimer call on a thread of its own (see the module doc) and returns where
    /// its answer arrives: `Err(())` inside when it panicked. Clears `busy` when the call
    /// really ends, however long that takes.
    fn spawn_call(
        &self,
        reclaimer: Arc<dyn Reclaimer>,
        health: &Arc<Health>,
        target: usize,
    ) -> Result<ReclaimAnswer, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = self.runtime().handle().clone();
        let clear = ClearOnDrop(Arc::clone(health));
        std::thread::Builder::new()
            .name("governor-reclaim-call".into())
            .spawn(move || {
                let call =
                    std::panic::AssertUnwindSafe(|| runtime.block_on(reclaimer.reclaim(target)));
                let answer = std::panic::catch_unwind(call).map_err(|_| ());
                // Not busy any more before the answer is seen: a caller that gets it and
                // asks again at once must not find the reclaimer "still busy".
                drop(clear);
                // The plan may have stopped waiting; then nobody needs the answer.
                let _ = tx.send(answer);
            })
            .map_err(|err| format!("cannot start a thread for the call: {err}"))?;
        Ok(rx)
    }
}

/// Where one reclaimer call's answer arrives.
type ReclaimAnswer = tokio::sync::oneshot::Receiver<Result<Result<usize, ReclaimError>, ()>>;

/// Clears a reclaimer's busy flag when its call ends, by return or by panic.
struct ClearOnDrop(Arc<Health>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}
