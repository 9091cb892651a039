//! Following the container while the process runs: the one place that turns the kernel's view
//! of memory into governor actions.
//!
//! [`MemoryGovernor::follow_container`] starts a thread (`governor-container`) that samples a
//! [`ContainerProbe`] every interval and feeds each sample to a [`ContainerFollower`]:
//!
//! * the container's limit changed (an operator resized the pod) → the ceiling becomes
//!   `fraction × new limit` through [`MemoryGovernor::set_ceiling`], which drains what is held
//!   above it. A limit that gives no usable ceiling (0 or 1 byte) is logged and counted as an
//!   error once, and the ceiling goes on following the previous limit: returning to it is no
//!   change ([`ContainerFollower::refused`]);
//! * pressure stall information crossed its threshold → the global pressure level is raised to
//!   at least Warning ([`MemoryGovernor::set_environment_pressure`]) until it falls back;
//! * a `max`, `oom` or `oom_kill` counter rose (the kernel hit the limit or killed something)
//!   → an Emergency: logged, the global level raised to Emergency until the next quiet sample,
//!   and borrowers asked for an eighth of the ceiling.
//!
//! A sample that cannot be read is logged and counted and the watch carries on: a transient
//! read error must not stop the governor from following later changes. The thread holds only a
//! weak reference to the governor and ends when the handle is dropped or the governor is gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::container::{ContainerFollower, ContainerProbe, FollowerSettings};
use crate::error::MemError;
use crate::governor::MemoryGovernor;
use crate::pressure::PressureLevel;
use crate::reclaim::ReclaimScope;

/// Settings of [`MemoryGovernor::follow_container`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContainerWatchConfig {
    /// Time between samples (default 1 s).
    pub interval: Duration,
    /// The share of the container's limit the ceiling follows (0 < f ≤ 1; default 0.9).
    pub fraction: f64,
    /// Which inputs act, and PSI thresholds.
    pub follower: FollowerSettings,
}

impl Default for ContainerWatchConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            fraction: 0.9,
            follower: FollowerSettings::default(),
        }
    }
}

/// What the watch has done so far.
#[derive(Debug, Default)]
pub struct ContainerWatchStats {
    /// Samples taken.
    pub samples: AtomicU64,
    /// Samples that could not be read.
    pub errors: AtomicU64,
    /// Ceiling changes made because the container's limit changed.
    pub ceiling_changes: AtomicU64,
    /// Emergencies raised by rising limit or OOM counters.
    pub emergencies: AtomicU64,
}

/// Keeps the container watch running; dropping it stops the thread.
#[must_use = "dropping the handle stops the container watch"]
#[derive(Debug)]
pub struct ContainerWatchHandle {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<ContainerWatchStats>,
}

impl ContainerWatchHandle {
    /// What the watch has done so far.
    pub fn stats(&self) -> &ContainerWatchStats {
        &self.stats
    }
}

impl Drop for ContainerWatchHandle {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread wakes at once; a sample in progress reads a few small files.
            let _ = thread.join();
        }
    }
}

impl MemoryGovernor {
    /// Follows the container `probe` reads (see the `container_watch` module): the ceiling
    /// tracks `fraction` of its limit, PSI raises pressure, limit and OOM events are
    /// emergencies.
    ///
    /// Fails with [`MemError::InvalidConfig`] for an interval under 1 ms or above one hour, an
    /// impossible fraction or invalid follower settings, and with the probe's error when the
    /// first sample cannot be read (so a misconfigured root is reported, not ignored).
    pub fn follow_container(
        self: &Arc<Self>,
        probe: ContainerProbe,
        config: ContainerWatchConfig,
    ) -> Result<ContainerWatchHandle, MemError> {
        if config.interval < Duration::from_millis(1) || config.interval > Duration::from_hours(1) {
            return Err(MemError::config(
                "container_watch.interval",
                format!("{:?} is outside [1 ms, 1 h]", config.interval),
            ));
        }
        if !(config.fraction.is_finite() && config.fraction > 0.0 && config.fraction <= 1.0) {
            return Err(MemError::config(
                "container_watch.fraction",
                format!(
                    "{} is not a share of the container's limit (0 < f ≤ 1)",
                    config.fraction
                ),
            ));
        }
        let mut follower = ContainerFollower::new(config.follower)?;
        // The limit must be readable to be followed: a misconfigured root or a damaged file is
        // reported now, not discovered later. The first sample sets the follower's baseline.
        probe.memory_limit()?;
        follower.observe(&probe.sample()?);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stats = Arc::new(ContainerWatchStats::default());
        let governor = Arc::downgrade(self);
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            std::thread::Builder::new()
                .name("governor-container".into())
                .spawn(move || watch(&governor, &probe, follower, config, &stop, &stats))
                .map_err(|err| MemError::Environment {
                    path: "governor-container thread".into(),
                    reason: format!("cannot start the container watch: {err}"),
                })?
        };
        Ok(ContainerWatchHandle {
            stop,
            thread: Some(thread),
            stats,
        })
    }
}

fn watch(
    governor: &Weak<MemoryGovernor>,
    probe: &ContainerProbe,
    mut follower: ContainerFollower,
    config: ContainerWatchConfig,
    stop: &(Mutex<bool>, Condvar),
    stats: &ContainerWatchStats,
) {
    loop {
        {
            let mut stopped = stop.0.lock();
            if !*stopped {
                stop.1.wait_for(&mut stopped, config.interval);
            }
            if *stopped {
                return;
            }
        }
        let Some(governor) = governor.upgrade() else {
            return;
        };
        stats.samples.fetch_add(1, Ordering::Relaxed);
        let sample = match probe.sample() {
            Ok(sample) => sample,
            Err(err) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                governor.environment.sample_failed();
                tracing::warn!(error = %err, "container sample failed; keeping the current ceiling");
                continue;
            }
        };
        governor.environment.sampled(&sample);
        if let Some(psi) = &sample.pressure {
            tracing::trace!(
                some_avg10 = psi.some.avg10,
                full_avg10 = psi.full.map(|f| f.avg10),
                current = sample.current,
                "container sample"
            );
        }
        for err in &sample.errors {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "part of the container sample could not be read");
        }
        let report = follower.observe(&sample);
        if let Some(change) = &report.limit_change {
            match change
                .to
                .ceiling(config.fraction)
                .and_then(|bytes| governor.set_ceiling_from(bytes, change.to.source.clone()))
            {
                Ok(done) => {
                    stats.ceiling_changes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(limit_from = change.from, limit_to = change.to.bytes, source = %change.to.source, ceiling = done.to, over = done.over, "container limit changed; ceiling follows");
                }
                Err(err) => {
                    // The ceiling still follows the old limit: so must the follower's
                    // baseline, or a return to that limit would count as a change.
                    follower.refused(change);
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, limit = change.to.bytes, "container limit changed but the ceiling could not follow");
                }
            }
        }
        let floor = report.pressure_floor.unwrap_or(PressureLevel::Normal);
        if report.is_emergency() {
            stats.emergencies.fetch_add(1, Ordering::Relaxed);
            governor.environment.emergency();
            let rises: Vec<String> = report
                .counter_rises
                .iter()
                .map(|r| format!("{} {}→{}", r.counter, r.from, r.to))
                .collect();
            tracing::error!(
                ?rises,
                "the kernel hit the container's memory limit: emergency"
            );
            governor.set_environment_pressure(PressureLevel::Emergency);
            governor.spawn_reclaim(ReclaimScope::Borrowers, governor.ceiling() / 8);
        } else {
            governor.set_environment_pressure(floor);
        }
    }
}
