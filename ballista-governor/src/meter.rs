//! Counts an executor's tasks and what their operators spilled, from the plan metrics each
//! task leaves behind: the figures `BENCHMARKS.md` compares between pools.

use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::physical_plan::metrics::MetricsSet;

/// An executor's task counters.
#[derive(Debug, Default)]
pub struct TaskMeter {
    tasks: AtomicU64,
    failed: AtomicU64,
    spilled_bytes: AtomicU64,
    spills: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// Tasks that finished, successfully or not.
    pub tasks: u64,
    /// Tasks that returned an error.
    pub failed: u64,
    /// Bytes the tasks' operators wrote to spill files.
    pub spilled_bytes: u64,
    /// Spill files the tasks' operators wrote.
    pub spills: u64,
}

impl TaskMeter {
    /// Records one finished task and the metrics of its plan's operators.
    pub(crate) fn record(&self, ok: bool, metrics: &[MetricsSet]) {
        self.tasks.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let (mut bytes, mut spills) = (0_u64, 0_u64);
        for set in metrics {
            bytes = bytes.saturating_add(set.spilled_bytes().unwrap_or(0) as u64);
            spills = spills.saturating_add(set.spill_count().unwrap_or(0) as u64);
        }
        self.spilled_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.spills.fetch_add(spills, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn stats(&self) -> TaskStats {
        TaskStats {
            tasks: self.tasks.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            spilled_bytes: self.spilled_bytes.load(Ordering::Relaxed),
            spills: self.spills.load(Ordering::Relaxed),
        }
    }
}
