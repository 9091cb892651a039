//! The ladder: how an async [`reserve`](MemoryGovernor::reserve) waits, and when it aborts
//! work so that an engine gets its lent floor back.
//!
//! Lending idle floors is only safe if the lender can always get its floor back. Reclaim asks
//! borrowers to give memory back, but a borrower that never calls the governor again (a sort
//! gone quiet) or cannot spill (a hash-join build) keeps it, and without a last resort the
//! wrong party fails: the lender waits out its timeout while the borrower keeps its floor.
//!
//! # Entitled requests
//!
//! A request is *entitled* when the engine, with it, stays within its floor
//! (`reserved + bytes ≤ floor`) and it was refused by the global ceiling: its floor is lent
//! out. An engine at or past its floor that wants more competes for common memory like anyone
//! else and is never entitled: it gets the ordinary typed denial (or a timeout), and no work is
//! ever aborted for it. (Memory above all floors is nobody's guarantee: what the ceiling holds
//! beyond the floors is lent on a first-come basis and not taken back by force.)
//!
//! # The steps
//!
//! ```text
//!  try_reserve ─ok─▶ granted
//!      │ denied (and it could fit one day)
//!      ▼
//!  1. reclaim: borrowers (below its floor) or its own reclaimers (at its limit), in the background
//!  2. wait on releases (event-driven, re-asking reclaim every 20 ms) until the first reclaim
//!     plan has answered and abort_after (config, default 2 s; at most half the caller's
//!     timeout) has passed
//!      │ still denied, and entitled
//!      ▼
//!  3. abort the best victim (the `victim` module's formula) with MemError::Aborted
//!  4. wait on releases for its memory, at most victim_wait (default 5 s) before another
//!     victim may be chosen, and never past the caller's deadline
//!      ▼
//!  granted ─ or ─ MemError::Timeout carrying the Story: holders, lending, reclaims, victims
//! ```
//!
//! A request that is not entitled stops at step 2. A unit's own request
//! ([`WorkHandle::reserve`](crate::WorkHandle::reserve)) fails with its abort error as soon as
//! the unit itself is aborted, also mid-wait. Every timeout and every abort is logged as a
//! `tracing` event carrying the same story as the error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::EngineId;
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::reservation::ReservationToken;
use crate::work::Unit;

/// How often a waiting `reserve` asks for reclaim again when no release woke it.
const RECLAIM_RETRY: Duration = Duration::from_millis(20);

/// A victim this request aborted and is waiting for.
struct Pending {
    unit: Arc<Unit>,
    since: Instant,
}

impl MemoryGovernor {
    /// True when `bytes` more for `engine`, refused with `denial`, is within the engine's floor
    /// and was refused by the ceiling: its floor is lent out (see the module doc).
    pub(crate) fn entitled(&self, engine: EngineId, bytes: usize, denial: &MemError) -> bool {
        matches!(denial, MemError::GlobalCeilingExceeded { .. })
            && self
                .reserved(engine)
                .checked_add(bytes)
                .is_some_and(|total| total <= self.floor(engine))
    }

    /// `reserve` for an engine, or for a unit of work when `unit` is given (see the module doc).
    pub(crate) async fn reserve_as(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        timeout: Duration,
        unit: Option<&Arc<Unit>>,
    ) -> Result<ReservationToken, MemError> {
        let started = Instant::now();
        // `None`: no deadline (a timeout too large to add to the clock, e.g. `Duration::MAX`).
        let deadline = started.checked_add(timeout);
        let first = match self.try_reserve(engine, bytes) {
            Ok(token) => return Ok(token),
            Err(err) if err.is_denial() => err,
            Err(err) => return Err(err),
        };
        if !self
            .books
            .could_ever_fit(engine, self.books.node_for(None), bytes)
        {
            // No amount of waiting can satisfy it: above the limit, the ceiling or the node's
            // sub-ceiling.
            return Err(first);
        }
        let abort_at = started.checked_add(self.config().abort_after().min(timeout / 2));
        let victim_wait = self.config().victim_wait();
        let _waiter = WaiterGuard::new(self, engine, bytes);
        let mut asked_reclaim = false;
        let mut pending: Option<Pending> = None;
        let mut aborted = Vec::new();
        let mut no_victim = None;
        let mut first_plan = None;
        loop {
            let notified = self.books.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(err) = unit.and_then(|u| u.abort_error()) {
                return Err(err.clone());
            }
            let last = match self.try_reserve(engine, bytes) {
                Ok(token) => return Ok(token),
                Err(err) if err.is_denial() => err,
                Err(err) => return Err(err),
            };
            if !asked_reclaim {
                asked_reclaim = true;
                let plan = self.request_reclaim_for_waiter(engine, bytes, &last);
                if first_plan.is_none() {
                    first_plan = plan;
                }
            }
            let now = Instant::now();
            let entitled = self.entitled(engine, bytes, &last);
            // Reclaim gets its answer before anyone is aborted: a plan ends within its
            // steps' reclaim timeouts, whatever its reclaimers do.
            let reclaim_answered = first_plan
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished);
            if entitled && reclaim_answered && abort_at.is_some_and(|at| now >= at) {
                // A victim whose memory came back, or that kept it past `victim_wait`, no
                // longer stands in the way of choosing another.
                if pending
                    .as_ref()
                    .is_some_and(|p| p.unit.held() == 0 || now - p.since >= victim_wait)
                {
                    pending = None;
                }
                if pending.is_none() {
                    match self.abort_victim(engine, bytes, started, unit) {
                        Ok(victim) => {
                            aborted.push(victim.at.clone());
                            pending = Some(Pending {
                                unit: victim,
                                since: now,
                            });
                        }
                        Err(why) => no_victim = Some(why),
                    }
                }
            }
            if deadline.is_some_and(|d| now >= d) {
                let mut story = self.story(engine, bytes, started);
                story.entitled = entitled;
                story.no_victim = if aborted.is_empty() {
                    no_victim.or_else(|| {
                        Some(if entitled {
                            "the request gave up before its abort step".into()
                        } else {
                            "the request was not entitled".into()
                        })
                    })
                } else {
                    let names: Vec<String> = aborted.iter().map(ToString::to_string).collect();
                    Some(format!(
                        "aborted {} but its memory did not come back in time",
                        names.join(", ")
                    ))
                };
                let err = MemError::Timeout {
                    engine,
                    requested: bytes,
                    waited: now - started,
                    story: Box::new(story),
                };
                tracing::warn!(%engine, requested = bytes, waited_ms = timeout.as_millis() as u64, cause = %last, error = %err, "reservation timed out");
                return Err(err);
            }
            // The sleep is a backstop: a release wakes us through `released`, and a reclaim in
            // flight may free memory in several steps.
            let mut nap = RECLAIM_RETRY;
            if let Some(d) = deadline {
                nap = nap.min(d - now);
            }
            if let Some(at) = abort_at.filter(|&at| at > now && entitled) {
                nap = nap.min(at - now);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(nap) => {
                    // Ask again if the first reclaim did not do it.
                    asked_reclaim = false;
                }
            }
        }
    }

    /// Chooses and aborts a victim for `engine`'s entitled request of `bytes`; the unit aborted,
    /// or why there was none.
    fn abort_victim(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        started: Instant,
        requester_unit: Option<&Arc<Unit>>,
    ) -> Result<Arc<Unit>, String> {
        let shortfall = bytes.saturating_sub(self.available(engine)).max(1);
        let mut candidates = self.work.candidates(|e| self.borrowed(e));
        if let Some(own) = requester_unit {
            candidates.retain(|c| c.unit.id != own.at.id);
        }
        let choice = crate::victim::choose(&candidates, engine, shortfall)?;
        let Some(victim) = self.work.find(choice.victim.id) else {
            return Err(format!(
                "{} unregistered before it could be aborted",
                choice.victim
            ));
        };
        let mut story = self.story(engine, bytes, started);
        story.entitled = true;
        // The choice and its score are told by the story, which the error's text includes.
        let reason = format!(
            "reclaim did not give back the {} it needed within its floor in time",
            crate::engine::human_bytes(shortfall),
        );
        story.victim = Some(choice);
        if self.abort_unit(&victim, Some(engine), reason, Some(story)) {
            Ok(victim)
        } else {
            Err(format!(
                "{} was aborted by someone else meanwhile",
                victim.at
            ))
        }
    }

    /// Starts the reclaim a waiter's denial calls for; its plan's task, if one was started.
    fn request_reclaim_for_waiter(
        self: &Arc<Self>,
        engine: EngineId,
        bytes: usize,
        denial: &MemError,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let reserved = self.reserved(engine);
        let floor = self.floor(engine);
        match denial {
            MemError::BudgetExhausted { available, .. } => {
                let shortfall = bytes.saturating_sub(*available);
                self.spawn_reclaim_tracked(crate::reclaim::ReclaimScope::Engine(engine), shortfall)
            }
            MemError::GlobalCeilingExceeded { .. } if reserved < floor => {
                let owed = floor - reserved;
                self.spawn_reclaim_tracked(
                    crate::reclaim::ReclaimScope::BorrowersExcept(engine),
                    bytes.min(owed),
                )
            }
            _ => None,
        }
    }
}

/// Marks one async waiter for its whole wait, including on cancellation.
struct WaiterGuard<'a> {
    governor: &'a MemoryGovernor,
    engine: EngineId,
    bytes: usize,
}

impl<'a> WaiterGuard<'a> {
    fn new(governor: &'a MemoryGovernor, engine: EngineId, bytes: usize) -> Self {
        governor.books.ledger.add_waiter();
        governor.books.counters[engine.index()]
            .waiting_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        // Idle credit parked in shards would otherwise hide freed memory from us.
        governor.books.ledger.drain_all();
        Self {
            governor,
            engine,
            bytes,
        }
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.governor.books.counters[self.engine.index()]
            .waiting_bytes
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        self.governor.books.ledger.remove_waiter();
    }
}
