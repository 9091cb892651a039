//! Reclaim: taking lent memory back by asking its borrower to spill, flush or evict.
//!
//! Engines register a [`Reclaimer`]. When memory is needed back (an engine below its floor was
//! denied, the RSS monitor saw an emergency, the rebalancer found the process too full), the
//! governor builds a *plan*: the borrowers (engines above their floor), largest borrowing first,
//! each asked for at most what it borrowed. Every call runs as its own task on the governor's
//! reclaim runtime, bounded by the configured timeout, so a reclaimer that errors, panics or
//! never returns is reported (metric + event) and skipped; it cannot wedge the governor or the
//! caller, and it cannot corrupt the books, because reclaimers free memory only by dropping or
//! shrinking their own tokens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Bytes it reported freed, or why it failed.
    pub result: Result<usize, MemError>,
    /// How long the call took.
    pub elapsed: Duration,
}

/// What a reclaim achieved.
#[derive(Debug, Clone, Default)]
pub struct ReclaimOutcome {
    /// Bytes asked for in total.
    pub requested: usize,
    /// Bytes the reclaimers reported freed.
    pub freed: usize,
    /// Each reclaimer call, in order.
    pub steps: Vec<ReclaimStep>,
    /// True when a blocking caller stopped waiting before the plan finished.
    pub abandoned: bool,
}

struct Entry {
    id: u64,
    engine: EngineId,
    reclaimer: Arc<dyn Reclaimer>,
    /// Set while a call is in flight; a reclaimer that hung is skipped until it returns.
    busy: Arc<AtomicBool>,
}

/// The registered reclaimers.
#[derive(Default)]
pub(crate) struct ReclaimRegistry {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

impl ReclaimRegistry {
    fn for_engine(&self, engine: EngineId) -> Vec<(Arc<dyn Reclaimer>, Arc<AtomicBool>)> {
        self.entries
            .lock()
            .iter()
            .filter(|e| e.engine == engine)
            .map(|e| (Arc::clone(&e.reclaimer), Arc::clone(&e.busy)))
            .collect()
    }

    fn has(&self, engine: EngineId) -> bool {
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
            busy: Arc::new(AtomicBool::new(false)),
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
        if bytes == 0 {
            return;
        }
        let governor = Arc::clone(self);
        self.runtime().spawn(async move {
            governor.run_plan(scope, bytes).await;
        });
    }

    /// The engines to ask and how much, largest borrowing first.
    pub(crate) fn plan(&self, scope: ReclaimScope, bytes: usize) -> Vec<(EngineId, usize)> {
        if let ReclaimScope::Engine(engine) = scope {
            return if self.reclaimers.has(engine) {
                vec![(engine, bytes)]
            } else {
                vec![]
            };
        }
        // What each engine may be asked for: what it borrowed, or everything it holds.
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
        let mut remaining = bytes;
        let mut plan = Vec::new();
        for (engine, borrowed) in borrowers {
            if remaining == 0 {
                break;
            }
            let ask = borrowed.min(remaining);
            plan.push((engine, ask));
            remaining -= ask;
        }
        plan
    }

    async fn run_plan(self: &Arc<Self>, scope: ReclaimScope, bytes: usize) -> ReclaimOutcome {
        let plan = self.plan(scope, bytes);
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
        for (engine, ask) in plan {
            let mut remaining = ask;
            for (reclaimer, busy) in self.reclaimers.for_engine(engine) {
                if remaining == 0 {
                    break;
                }
                let step = self
                    .call_reclaimer(engine, reclaimer, busy, remaining, timeout)
                    .await;
                if let Ok(freed) = step.result {
                    remaining = remaining.saturating_sub(freed);
                    outcome.freed += freed;
                }
                outcome.steps.push(step);
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
        busy: Arc<AtomicBool>,
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
        if busy.swap(true, Ordering::AcqRel) {
            return ReclaimStep {
                engine,
                asked: target,
                result: fail("its previous reclaim has not returned yet (hung?)".into()),
                elapsed: Duration::ZERO,
            };
        }
        tracing::info!(%engine, target, "asking engine to give memory back");
        // Its own task: a reclaimer that never yields pins one worker, not this orchestrator.
        let call = tokio::spawn(async move {
            let _clear = ClearOnDrop(busy);
            reclaimer.reclaim(target).await
        });
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(Ok(freed))) => {
                counters
                    .reclaimed_bytes
                    .fetch_add(freed as u64, Ordering::Relaxed);
                Ok(freed)
            }
            Ok(Ok(Err(err))) => fail(err.to_string()),
            Ok(Err(join)) if join.is_panic() => fail("the reclaimer panicked".into()),
            Ok(Err(join)) => fail(format!("the reclaim task was cancelled: {join}")),
            Err(_) => fail(format!("no answer within {timeout:?}")),
        };
        ReclaimStep {
            engine,
            asked: target,
            result,
            elapsed: started.elapsed(),
        }
    }
}

/// Clears a reclaimer's busy flag when its call ends, by return or by panic.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
