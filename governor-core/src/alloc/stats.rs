//! `SystemMemoryStats`: one snapshot of jemalloc's and the kernel's memory figures.

use std::fmt;

use tikv_jemalloc_ctl::{epoch, stats, thread};

use super::ctl_error;
use crate::{MemError, human_bytes};

/// Where a memory figure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemorySource {
    /// jemalloc's `stats.*` mallctls (after `epoch` was advanced).
    Jemalloc,
    /// The kernel's `/proc/self/status` (`VmRSS`, `VmHWM`, ...).
    ProcStatus,
    /// The kernel's `/proc/self/statm` (resident pages only; cheaper to parse).
    ProcStatm,
}

impl fmt::Display for MemorySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemorySource::Jemalloc => "jemalloc stats",
            MemorySource::ProcStatus => "/proc/self/status",
            MemorySource::ProcStatm => "/proc/self/statm",
        })
    }
}

/// A byte count and the source it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Figure {
    /// The figure, in bytes.
    pub bytes: usize,
    /// Where it came from.
    pub source: MemorySource,
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (from {})", human_bytes(self.bytes), self.source)
    }
}

/// jemalloc's process-wide statistics ([`MemorySource::Jemalloc`]).
///
/// jemalloc guarantees `allocated ≤ active ≤ resident` and `active ≤ mapped`; `mapped` and
/// `resident` are not ordered (dirty pages of inactive extents count in one, not the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JemallocStats {
    /// Bytes in live allocations (`stats.allocated`).
    pub allocated: usize,
    /// Bytes in pages that hold live allocations (`stats.active`).
    pub active: usize,
    /// Bytes in physically resident pages jemalloc maps: active pages, dirty pages kept for
    /// reuse and allocator metadata (`stats.resident`).
    pub resident: usize,
    /// Bytes in extents jemalloc has mapped and not returned (`stats.mapped`).
    pub mapped: usize,
    /// Bytes of virtual memory retained for reuse, not resident (`stats.retained`).
    pub retained: usize,
    /// Bytes of allocator metadata (`stats.metadata`).
    pub metadata: usize,
}

impl JemallocStats {
    /// Reads the figures; advances jemalloc's stats epoch first, so they are current.
    pub fn query() -> Result<Self, MemError> {
        // jemalloc caches its statistics; they are refreshed only when the epoch advances.
        epoch::advance().map_err(|e| ctl_error("epoch", e))?;
        Ok(Self {
            allocated: stats::allocated::read().map_err(|e| ctl_error("stats.allocated", e))?,
            active: stats::active::read().map_err(|e| ctl_error("stats.active", e))?,
            resident: stats::resident::read().map_err(|e| ctl_error("stats.resident", e))?,
            mapped: stats::mapped::read().map_err(|e| ctl_error("stats.mapped", e))?,
            retained: stats::retained::read().map_err(|e| ctl_error("stats.retained", e))?,
            metadata: stats::metadata::read().map_err(|e| ctl_error("stats.metadata", e))?,
        })
    }

    /// External fragmentation: the share of active pages that holds no live object,
    /// `1 − allocated / active`, in `[0, 1)`. 0 when nothing is active.
    pub fn fragmentation(&self) -> f64 {
        if self.active == 0 {
            return 0.0;
        }
        1.0 - (self.allocated.min(self.active) as f64 / self.active as f64)
    }

    /// How many resident bytes each live byte costs, `resident / allocated` (≥ 1 in practice;
    /// 0 when nothing is allocated). Counts dirty pages kept for reuse and metadata as well.
    pub fn overhead_ratio(&self) -> f64 {
        if self.allocated == 0 {
            return 0.0;
        }
        self.resident as f64 / self.allocated as f64
    }

    /// Resident bytes jemalloc could give back by purging: resident pages that hold no live
    /// object and are not metadata.
    pub fn purgeable(&self) -> usize {
        self.resident
            .saturating_sub(self.active)
            .saturating_sub(self.metadata)
    }
}

/// The kernel's view of the process ([`MemorySource::ProcStatus`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set size (`VmRSS`): what the OOM killer counts.
    pub rss: usize,
    /// Peak resident set size since start or since the peak was last reset (`VmHWM`).
    pub peak_rss: usize,
    /// Anonymous resident memory (`RssAnon`): heap, stacks, anonymous maps.
    pub rss_anon: usize,
    /// File-backed resident memory (`RssFile`): code and mapped files.
    pub rss_file: usize,
}

impl ProcessMemory {
    /// Reads `/proc/self/status`.
    pub fn query() -> Result<Self, MemError> {
        let text =
            std::fs::read_to_string("/proc/self/status").map_err(|err| MemError::Allocator {
                reason: format!("cannot read /proc/self/status for the process RSS: {err}"),
            })?;
        Self::parse(&text)
    }

    /// Parses the text of a `/proc/<pid>/status` file. `VmRSS` and `VmHWM` are required;
    /// `RssAnon`/`RssFile` (absent on kernels before 4.5) default to 0.
    pub fn parse(status: &str) -> Result<Self, MemError> {
        let mut rss = None;
        let mut peak = None;
        let mut anon = 0;
        let mut file = 0;
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let slot = match key {
                "VmRSS" => &mut rss,
                "VmHWM" => &mut peak,
                "RssAnon" | "RssFile" => {
                    let kib = parse_kib(key, value)?;
                    if key == "RssAnon" {
                        anon = kib;
                    } else {
                        file = kib;
                    }
                    continue;
                }
                _ => continue,
            };
            *slot = Some(parse_kib(key, value)?);
        }
        let missing = |key: &str| MemError::Allocator {
            reason: format!("/proc/self/status has no {key} line; is this a Linux /proc?"),
        };
        Ok(Self {
            rss: rss.ok_or_else(|| missing("VmRSS"))?,
            peak_rss: peak.ok_or_else(|| missing("VmHWM"))?,
            rss_anon: anon,
            rss_file: file,
        })
    }
}

/// Parses `"   1234 kB"` into bytes.
fn parse_kib(key: &str, value: &str) -> Result<usize, MemError> {
    let bad = || MemError::Allocator {
        reason: format!("cannot parse /proc/self/status {key}: {value:?} (expected \"<n> kB\")"),
    };
    let number = value.trim().strip_suffix("kB").ok_or_else(bad)?.trim();
    let kib: usize = number.parse().map_err(|_| bad())?;
    kib.checked_mul(1024).ok_or_else(bad)
}

/// The process's resident set size from `/proc/self/statm` ([`MemorySource::ProcStatm`]).
///
/// The cheapest exact RSS Linux offers (one short line of numbers, no key lookup); the RSS
/// monitor reads it every tick. Equal to `VmRSS` of `/proc/self/status`.
pub fn process_resident_bytes() -> Result<usize, MemError> {
    let text = std::fs::read_to_string("/proc/self/statm").map_err(|err| MemError::Allocator {
        reason: format!("cannot read /proc/self/statm for the process RSS: {err}"),
    })?;
    let pages: usize = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| MemError::Allocator {
            reason: format!(
                "cannot parse /proc/self/statm: {text:?} (expected \"size resident ...\" in pages)"
            ),
        })?;
    Ok(pages * page_size())
}

/// The kernel's page size (statm counts pages).
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; _SC_PAGESIZE is always supported on Linux.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // A negative answer cannot happen on Linux; 4 KiB is the only sane fallback.
    usize::try_from(size).unwrap_or(4096)
}

/// One snapshot of everything known about the process's memory.
///
/// Each part is `None` when its source is unavailable (no `/proc`, or the jemalloc control
/// interface failed); [`query`](Self::query) fails only when both are.
///
/// ```
/// use governor_core::alloc::SystemMemoryStats;
///
/// let stats = SystemMemoryStats::query()?;
/// let resident = stats.resident().expect("Linux has /proc");
/// println!("resident: {resident}"); // e.g. "23.4 MiB (from /proc/self/status)"
/// # Ok::<(), governor_core::MemError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SystemMemoryStats {
    /// jemalloc's figures.
    pub jemalloc: Option<JemallocStats>,
    /// The kernel's figures.
    pub process: Option<ProcessMemory>,
    /// Whether jemalloc serves the process's allocations (it is the `#[global_allocator]` or
    /// replaced `malloc`). When false, the jemalloc figures describe only jemalloc's own small
    /// heap and must not be read as the process's memory.
    pub jemalloc_is_global_allocator: bool,
}

impl SystemMemoryStats {
    /// Reads both sources. Cost: one `epoch` advance, six mallctl reads and one read of
    /// `/proc/self/status` (see `BENCHMARKS.md`).
    pub fn query() -> Result<Self, MemError> {
        let jemalloc = JemallocStats::query();
        let process = ProcessMemory::query();
        if let (Err(je), Err(proc_err)) = (&jemalloc, &process) {
            return Err(MemError::Allocator {
                reason: format!("no memory statistics available: {je}; {proc_err}"),
            });
        }
        Ok(Self {
            jemalloc: jemalloc.ok(),
            process: process.ok(),
            jemalloc_is_global_allocator: jemalloc_is_global_allocator(),
        })
    }

    /// The best figure for what the process really holds: the kernel's RSS when available,
    /// else jemalloc's resident bytes when jemalloc serves the process's allocations.
    pub fn resident(&self) -> Option<Figure> {
        if let Some(process) = &self.process {
            return Some(Figure {
                bytes: process.rss,
                source: MemorySource::ProcStatus,
            });
        }
        self.jemalloc
            .filter(|_| self.jemalloc_is_global_allocator)
            .map(|je| Figure {
                bytes: je.resident,
                source: MemorySource::Jemalloc,
            })
    }

    /// The peak resident set size, from the kernel only (jemalloc keeps no peak).
    pub fn peak_resident(&self) -> Option<Figure> {
        self.process.map(|p| Figure {
            bytes: p.peak_rss,
            source: MemorySource::ProcStatus,
        })
    }

    /// Bytes in live allocations, from jemalloc, when it serves the process's allocations.
    pub fn allocated(&self) -> Option<Figure> {
        self.jemalloc
            .filter(|_| self.jemalloc_is_global_allocator)
            .map(|je| Figure {
                bytes: je.allocated,
                source: MemorySource::Jemalloc,
            })
    }
}

impl fmt::Display for SystemMemoryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.process {
            Some(p) => write!(
                f,
                "rss {} peak {} (anon {}, file {}) [{}]",
                human_bytes(p.rss),
                human_bytes(p.peak_rss),
                human_bytes(p.rss_anon),
                human_bytes(p.rss_file),
                MemorySource::ProcStatus
            )?,
            None => f.write_str("rss unknown (no /proc)")?,
        }
        match &self.jemalloc {
            Some(je) => write!(
                f,
                "; allocated {} active {} resident {} mapped {} retained {} fragmentation {:.1}% [{}{}]",
                human_bytes(je.allocated),
                human_bytes(je.active),
                human_bytes(je.resident),
                human_bytes(je.mapped),
                human_bytes(je.retained),
                je.fragmentation() * 100.0,
                MemorySource::Jemalloc,
                if self.jemalloc_is_global_allocator {
                    ""
                } else {
                    ", not the global allocator"
                }
            ),
            None => f.write_str("; jemalloc stats unavailable"),
        }
    }
}

/// True when an allocation through Rust's global allocator is counted by jemalloc, i.e.
/// jemalloc is the `#[global_allocator]` (or replaced the system `malloc`).
///
/// Probed once per process: a 16 KiB allocation must move the calling thread's
/// `thread.allocated` counter. Watching the allocator is more reliable than any build flag,
/// because the choice is made by the final binary, not by this library.
pub fn jemalloc_is_global_allocator() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let Ok(counter) = thread::allocatedp::read() else {
            return false;
        };
        let before = counter.get();
        let probe = std::hint::black_box(vec![0u8; 16 * 1024]);
        let after = counter.get();
        drop(probe);
        after.wrapping_sub(before) >= 16 * 1024
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcargo\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n\
                          RssAnon:\t  512 kB\nRssFile:\t  500 kB\nRssShmem:\t 12 kB\n";

    #[test]
    fn parses_proc_status() {
        let p = ProcessMemory::parse(STATUS).unwrap();
        assert_eq!(p.rss, 1024 * 1024);
        assert_eq!(p.peak_rss, 2048 * 1024);
        assert_eq!(p.rss_anon, 512 * 1024);
        assert_eq!(p.rss_file, 500 * 1024);
    }

    #[test]
    fn missing_or_garbled_status_is_a_typed_error() {
        let err = ProcessMemory::parse("Name:\tx\nVmHWM:\t 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("VmRSS"), "{err}");
        let err = ProcessMemory::parse("VmRSS:\t lots\nVmHWM:\t 1 kB\n").unwrap_err();
        assert!(err.to_string().contains("cannot parse"), "{err}");
        let err =
            ProcessMemory::parse("VmRSS:\t 99999999999999999999 kB\nVmHWM:\t 1 kB\n").unwrap_err();
        assert!(matches!(err, MemError::Allocator { .. }));
    }

    #[test]
    fn fragmentation_and_overhead() {
        let je = JemallocStats {
            allocated: 75,
            active: 100,
            resident: 150,
            mapped: 200,
            retained: 0,
            metadata: 10,
        };
        assert!((je.fragmentation() - 0.25).abs() < 1e-9);
        assert!((je.overhead_ratio() - 2.0).abs() < 1e-9);
        assert_eq!(je.purgeable(), 40);
        let empty = JemallocStats {
            allocated: 0,
            active: 0,
            resident: 0,
            mapped: 0,
            retained: 0,
            metadata: 0,
        };
        assert!(empty.fragmentation().abs() < f64::EPSILON);
        assert!(empty.overhead_ratio().abs() < f64::EPSILON);
    }

    #[test]
    fn live_query_is_consistent() {
        let stats = SystemMemoryStats::query().unwrap();
        let process = stats.process.expect("this crate's CI runs on Linux");
        assert!(process.rss > 0 && process.peak_rss >= process.rss);
        let statm = process_resident_bytes().unwrap();
        // Both read the same kernel counter a moment apart; allow for test threads allocating.
        assert!(
            statm.abs_diff(process.rss) < 64 * 1024 * 1024,
            "{statm} vs {}",
            process.rss
        );
        let je = stats.jemalloc.expect("jemalloc ctl is linked");
        assert!(
            je.allocated <= je.active && je.active <= je.resident && je.active <= je.mapped,
            "{je:?}"
        );
        assert_eq!(stats.resident().unwrap().source, MemorySource::ProcStatus);
        assert!(stats.to_string().contains("/proc/self/status"));
    }
}
