//! What the governor knows of its memory environment: where its ceiling came from, how often
//! the ceiling changed, and the kernel's last word on the container (its charge, pressure
//! stall information, limit and OOM event counters).
//!
//! The container watch writes it on every sample; [`MemoryGovernor::environment`], the
//! snapshot and the Prometheus text read it. It is one small record behind a mutex: written
//! once a second at most, read by metrics scrapes, never on an admission path.

use parking_lot::Mutex;

use crate::container::{CeilingSource, ContainerSample, MemoryEvents, Psi};
use crate::governor::MemoryGovernor;

/// The governor's memory environment at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentSnapshot {
    /// Where the ceiling in force came from: the configuration, or the file of a cgroup v2,
    /// cgroup v1 or physical-memory limit.
    pub ceiling_source: CeilingSource,
    /// Ceiling changes since start (by [`MemoryGovernor::set_ceiling`], whoever called it).
    pub ceiling_changes: u64,
    /// Container samples taken by the watch, and how many could not be read (in full or in
    /// part).
    pub samples: u64,
    /// Samples or parts of samples that failed.
    pub sample_errors: u64,
    /// Emergencies raised because the kernel's limit or OOM counters rose.
    pub emergencies: u64,
    /// The kernel's charge for the process's cgroup at the last sample (v2 `memory.current`,
    /// v1 `memory.usage_in_bytes`); includes page cache the process caused.
    pub memory_current: Option<usize>,
    /// Memory pressure stall information at the last sample.
    pub psi: Option<Psi>,
    /// The cgroup's limit and OOM event counters at the last sample.
    pub events: Option<MemoryEvents>,
}

/// The record behind [`EnvironmentSnapshot`].
#[derive(Debug)]
pub(crate) struct EnvironmentBook(Mutex<EnvironmentSnapshot>);

impl EnvironmentBook {
    pub(crate) fn new(ceiling_source: CeilingSource) -> Self {
        Self(Mutex::new(EnvironmentSnapshot {
            ceiling_source,
            ceiling_changes: 0,
            samples: 0,
            sample_errors: 0,
            emergencies: 0,
            memory_current: None,
            psi: None,
            events: None,
        }))
    }

    pub(crate) fn snapshot(&self) -> EnvironmentSnapshot {
        self.0.lock().clone()
    }

    /// A change of the ceiling to one that came from `source`.
    pub(crate) fn ceiling_changed(&self, source: CeilingSource) {
        let mut e = self.0.lock();
        e.ceiling_changes += 1;
        e.ceiling_source = source;
    }

    /// One container sample: what it read replaces the last figures; what it could not read
    /// keeps them (a stale figure is marked by `sample_errors`, not erased).
    pub(crate) fn sampled(&self, sample: &ContainerSample) {
        let mut e = self.0.lock();
        e.samples += 1;
        e.sample_errors += sample.errors.len() as u64;
        if sample.current.is_some() {
            e.memory_current = sample.current;
        }
        if sample.pressure.is_some() {
            e.psi = sample.pressure;
        }
        if sample.events.is_some() {
            e.events = sample.events;
        }
    }

    pub(crate) fn sample_failed(&self) {
        let mut e = self.0.lock();
        e.samples += 1;
        e.sample_errors += 1;
    }

    pub(crate) fn emergency(&self) {
        self.0.lock().emergencies += 1;
    }
}

impl MemoryGovernor {
    /// Where the ceiling came from, how often it changed, and the container's last sample
    /// (when [`follow_container`](Self::follow_container) runs).
    pub fn environment(&self) -> EnvironmentSnapshot {
        self.environment.snapshot()
    }
}
