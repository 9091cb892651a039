//! The engines that share one process's memory.
//!
//! An [`EngineId`] is the unit of budgeting: every reservation belongs to exactly one engine,
//! and every engine has its own limit and floor under the one global ceiling.

use std::fmt;

/// One of the engines that share the process's memory.
///
/// The set is closed on purpose: budgets are configured per engine, and the ledger keeps one
/// fixed slot per engine so that admission never has to look anything up in a map.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum EngineId {
    /// HNSW indexes and vector caches.
    Vector,
    /// The sparse (inverted) index.
    Sparse,
    /// The CRDT engine's documents and operation logs.
    Crdt,
    /// Timeseries memtables.
    Timeseries,
    /// SQL execution (DataFusion operators).
    Query,
    /// Write-ahead-log buffers.
    Wal,
    /// Buffers that move data between engines.
    Bridge,
}

impl EngineId {
    /// Every engine, in ledger-slot order.
    pub const ALL: [EngineId; 7] = [
        EngineId::Vector,
        EngineId::Sparse,
        EngineId::Crdt,
        EngineId::Timeseries,
        EngineId::Query,
        EngineId::Wal,
        EngineId::Bridge,
    ];

    /// Number of engines (slots in the ledger).
    pub const COUNT: usize = Self::ALL.len();

    /// The lower-case name used in errors, metrics labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            EngineId::Vector => "vector",
            EngineId::Sparse => "sparse",
            EngineId::Crdt => "crdt",
            EngineId::Timeseries => "timeseries",
            EngineId::Query => "query",
            EngineId::Wal => "wal",
            EngineId::Bridge => "bridge",
        }
    }

    /// The engine's fixed slot in the ledger.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EngineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `n` KiB in bytes.
pub const fn kib(n: usize) -> usize {
    n * 1024
}

/// `n` MiB in bytes.
pub const fn mib(n: usize) -> usize {
    n * 1024 * 1024
}

/// `n` GiB in bytes.
pub const fn gib(n: usize) -> usize {
    n * 1024 * 1024 * 1024
}

/// Renders a byte count for people (`"64.0 MiB"`), used in error messages and logs.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_case_and_unique() {
        let names: std::collections::HashSet<_> =
            EngineId::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(names.len(), EngineId::COUNT);
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase()))
        );
        assert_eq!(EngineId::Timeseries.to_string(), "timeseries");
    }

    #[test]
    fn slots_follow_all_order() {
        for (i, e) in EngineId::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(mib(64)), "64.0 MiB");
        assert_eq!(human_bytes(gib(3) / 2), "1.5 GiB");
    }
}
