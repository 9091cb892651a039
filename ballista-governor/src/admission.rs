//! Admission by pressure: a task starts when the executor's Query engine has room for a
//! minimum working set and the process is below Critical pressure.
//!
//! The gate waits on the governor's events — a change of the global pressure level, and the
//! releases that wake [`MemoryGovernor::reserve`] — never on a clock tick. The wait has a
//! bound; past it the task runs anyway and the governed pool decides what each of its
//! operators gets (it spills or fails with `ResourcesExhausted` like any governed query). The
//! bound exists so that a stuck holder delays tasks instead of wedging the executor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor_core::{EngineId, MemError, MemoryGovernor, PressureLevel, human_bytes, mib};
use tokio::time::Instant;

/// The minimum working set a task must be able to reserve before it starts, by default.
pub const DEFAULT_MIN_WORKING_SET: usize = mib(4);

/// How long a task waits for room before it runs anyway, by default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// What a task needs before it starts, and how long it may wait for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionOptions {
    min_working_set: usize,
    max_wait: Duration,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        Self {
            min_working_set: DEFAULT_MIN_WORKING_SET,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

impl AdmissionOptions {
    /// Bytes the Query engine must be able to reserve before a task starts (0: only the
    /// pressure level is checked). It must not exceed the Query limit: such a task could never
    /// be admitted.
    #[must_use]
    pub fn min_working_set(mut self, bytes: usize) -> Self {
        self.min_working_set = bytes;
        self
    }

    /// The longest a task waits before it runs anyway. `Duration::ZERO` admits every task at
    /// once (no gate); `Duration::MAX` is accepted and means "as long as it takes" in practice.
    #[must_use]
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The configured minimum working set.
    pub fn working_set(&self) -> usize {
        self.min_working_set
    }

    /// The configured bound on a wait.
    pub fn wait_bound(&self) -> Duration {
        self.max_wait
    }

    /// Checks the options against `governor`: the Query engine must be configured and the
    /// working set must fit within its limit.
    pub(crate) fn validate(&self, governor: &MemoryGovernor) -> Result<(), MemError> {
        if !governor.is_configured(EngineId::Query) {
            return Err(MemError::UnknownEngine {
                engine: EngineId::Query,
            });
        }
        let limit = governor.limit(EngineId::Query);
        if self.min_working_set > limit {
            return Err(MemError::InvalidConfig {
                field: "min_working_set".into(),
                reason: format!(
                    "{} is above the Query limit of {}; no task could ever be admitted",
                    human_bytes(self.min_working_set),
                    human_bytes(limit)
                ),
            });
        }
        Ok(())
    }
}

/// How a task got through the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// There was room and pressure was below Critical on arrival.
    AtOnce,
    /// The task waited for room or for pressure to fall, and got it.
    AfterWait,
    /// The bound passed first; the task runs and the pool decides.
    BoundPassed,
}

/// Counters of the gate, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Tasks admitted without waiting.
    pub at_once: u64,
    /// Tasks admitted after a wait.
    pub after_wait: u64,
    /// Tasks that ran because the bound passed.
    pub bound_passed: u64,
    /// Tasks waiting at this moment.
    pub waiting: usize,
}

/// The gate every task of a governed executor passes before it runs.
#[derive(Debug)]
pub struct AdmissionGate {
    governor: Arc<MemoryGovernor>,
    options: AdmissionOptions,
    at_once: AtomicU64,
    after_wait: AtomicU64,
    bound_passed: AtomicU64,
    waiting: AtomicUsize,
}

/// Decrements the waiting count however the wait ends (including the future being dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AdmissionGate {
    /// A gate for `governor`'s Query engine.
    pub fn new(governor: Arc<MemoryGovernor>, options: AdmissionOptions) -> Result<Self, MemError> {
        options.validate(&governor)?;
        Ok(Self {
            governor,
            options,
            at_once: AtomicU64::new(0),
            after_wait: AtomicU64::new(0),
            bound_passed: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    /// The options the gate was built with.
    pub fn options(&self) -> AdmissionOptions {
        self.options
    }

    /// The gate's counters now.
    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            at_once: self.at_once.load(Ordering::Relaxed),
            after_wait: self.after_wait.load(Ordering::Relaxed),
            bound_passed: self.bound_passed.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Whether a task could start now: pressure below Critical and the working set reservable.
    fn room_now(&self) -> bool {
        if self.governor.global_pressure() >= PressureLevel::Critical {
            return false;
        }
        self.options.min_working_set == 0
            || self
                .governor
                .try_reserve(EngineId::Query, self.options.min_working_set)
                .is_ok()
    }

    /// Waits until a task may start, or until the bound passes. Needs a Tokio runtime with the
    /// time driver. Cancel-safe: nothing is held when the future is dropped.
    pub async fn admit(&self) -> Admitted {
        // The probe token is dropped at once: admission checks that the working set *could*
        // be had; the task's operators then reserve through the pool, which is the only
        // booking (holding the probe would count the same bytes twice).
        if self.options.max_wait.is_zero() || self.room_now() {
            self.at_once.fetch_add(1, Ordering::Relaxed);
            return Admitted::AtOnce;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        // `Duration::MAX` overflows an `Instant`: a year is "as long as it takes".
        let deadline = Instant::now()
            .checked_add(self.options.max_wait)
            .unwrap_or_else(|| Instant::now() + Duration::from_hours(365 * 24));
        if self.wait(deadline).await {
            self.after_wait.fetch_add(1, Ordering::Relaxed);
            Admitted::AfterWait
        } else {
            self.bound_passed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                bound = ?self.options.max_wait,
                query_reserved = self.governor.reserved(EngineId::Query),
                pressure = ?self.governor.global_pressure(),
                "task admitted after waiting the full bound; the governed pool decides from here"
            );
            Admitted::BoundPassed
        }
    }

    /// The event-driven wait; `true` when a task may start before `deadline`.
    async fn wait(&self, deadline: Instant) -> bool {
        let mut pressure = self.governor.subscribe_global_pressure();
        loop {
            // 1. Pressure: wait for the level to change while it is Critical or above.
            while *pressure.borrow_and_update() >= PressureLevel::Critical {
                match tokio::time::timeout_at(deadline, pressure.changed()).await {
                    Err(_) => return false,
                    // The governor is gone; nothing left to wait for.
                    Ok(Err(_)) => return true,
                    Ok(Ok(())) => {}
                }
            }
            // 2. Room: the governor's own waiting reserve, woken by every release.
            if self.options.min_working_set == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .governor
                .reserve(EngineId::Query, self.options.min_working_set, left)
                .await
            {
                // Room now; start unless pressure rose again in the meantime.
                Ok(_probe) => {
                    if *pressure.borrow_and_update() < PressureLevel::Critical {
                        return true;
                    }
                }
                Err(MemError::Timeout { .. }) => return false,
                Err(other) => {
                    // Any other refusal (e.g. an abort) is not worth holding the task for.
                    tracing::debug!(error = %other, "admission reserve refused; admitting");
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use governor_core::{EngineBudget, GovernorConfig};

    use super::*;

    fn governor(query_limit: usize) -> Arc<MemoryGovernor> {
        MemoryGovernor::new(
            GovernorConfig::builder()
                .global_ceiling(mib(64))
                .engine(EngineId::Query, EngineBudget::new(query_limit))
                .build()
                .unwrap(),
        )
        .unwrap()
    }

    /// Runs the current-thread runtime's other tasks until `gate` has a waiter: no clock
    /// involved, each yield lets the spawned task run to its next await.
    async fn until_waiting(gate: &AdmissionGate) {
        for _ in 0..10_000 {
            if gate.stats().waiting == 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the task never started waiting: {:?}", gate.stats());
    }

    #[tokio::test]
    async fn with_room_and_no_pressure_a_task_starts_at_once_and_holds_nothing() {
        let g = governor(mib(64));
        let gate = AdmissionGate::new(Arc::clone(&g), AdmissionOptions::default()).unwrap();
        assert_eq!(gate.admit().await, Admitted::AtOnce);
        assert_eq!(g.reserved(EngineId::Query), 0, "the probe is not kept");
    }

    #[tokio::test]
    async fn a_task_waits_out_critical_pressure_and_starts_when_it_falls() {
        let g = governor(mib(64));
        g.set_environment_pressure(PressureLevel::Critical);
        let options = AdmissionOptions::default().max_wait(Duration::from_hours(1));
        let gate = Arc::new(AdmissionGate::new(Arc::clone(&g), options).unwrap());
        let task = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit().await }
        });
        until_waiting(&gate).await;
        g.set_environment_pressure(PressureLevel::Normal);
        assert_eq!(task.await.unwrap(), Admitted::AfterWait);
        assert_eq!(gate.stats().waiting, 0);
    }

    #[tokio::test]
    async fn a_task_waits_for_its_working_set_and_a_release_wakes_it() {
        let g = governor(mib(8));
        let held = g.try_reserve(EngineId::Query, mib(8)).unwrap();
        let options = AdmissionOptions::default()
            .min_working_set(mib(1))
            .max_wait(Duration::from_hours(1));
        let gate = Arc::new(AdmissionGate::new(Arc::clone(&g), options).unwrap());
        let task = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.admit().await }
        });
        until_waiting(&gate).await;
        drop(held);
        assert_eq!(task.await.unwrap(), Admitted::AfterWait);
        assert_eq!(g.reserved(EngineId::Query), 0);
    }

    #[tokio::test]
    async fn past_the_bound_a_task_runs_anyway() {
        let g = governor(mib(64));
        g.set_environment_pressure(PressureLevel::Emergency);
        let options = AdmissionOptions::default().max_wait(Duration::from_millis(20));
        let gate = AdmissionGate::new(Arc::clone(&g), options).unwrap();
        assert_eq!(gate.admit().await, Admitted::BoundPassed);
        let stats = gate.stats();
        assert_eq!((stats.bound_passed, stats.waiting), (1, 0));
    }

    #[test]
    fn a_zero_bound_admits_at_once_and_a_huge_one_is_accepted() {
        let g = governor(mib(64));
        g.set_environment_pressure(PressureLevel::Emergency);
        let gate = AdmissionGate::new(
            Arc::clone(&g),
            AdmissionOptions::default().max_wait(Duration::ZERO),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(gate.admit()), Admitted::AtOnce);
        assert!(AdmissionGate::new(g, AdmissionOptions::default().max_wait(Duration::MAX)).is_ok());
    }
}
