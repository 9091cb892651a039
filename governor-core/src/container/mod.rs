//! What the kernel says this process may use: the container's memory limit, its charge, its
//! pressure stall information and its limit events.
//!
//! A database in a container that does not know its cgroup's limit configures a ceiling from
//! the host's memory and is OOM-killed by the kernel long before the governor would have said
//! no. [`ContainerProbe`] reads the limit the kernel enforces, from the same files the kernel
//! publishes, and says which file decided:
//!
//! ```text
//!   /proc/self/cgroup ──▶ which cgroup, and is `memory` on v1 or v2?
//!   /proc/self/mountinfo ──▶ where that hierarchy is mounted (default /sys/fs/cgroup[/memory])
//!        │
//!        ▼   own cgroup, then each parent up to the mount point: the smallest limit applies
//!   v2: memory.max, memory.high          v1: memory.limit_in_bytes
//!        │
//!        ▼   none finite, or not below the machine's memory
//!   /proc/meminfo MemTotal
//! ```
//!
//! * **Which hierarchy.** A controller is bound to exactly one hierarchy. If
//!   `/proc/self/cgroup` lists a v1 line with `memory` (`4:memory:/some/path`) the limit is
//!   read from v1, even when a `0::/` line is listed too: that is a *hybrid* host, whose
//!   unified hierarchy carries no memory controller. Otherwise the `0::<path>` line's cgroup in
//!   the unified (v2) hierarchy is read.
//! * **Parents count.** A parent's limit bounds its children, so the probe reads the process's
//!   own cgroup and every ancestor up to the root of the mounted hierarchy, and the smallest
//!   finite value wins. In the common container case `/proc/self/cgroup` says `0::/` and the
//!   limit sits at the cgroup namespace's root, which is the mount point itself.
//! * **`memory.high`.** Above `memory.high` the kernel throttles and reclaims hard; a
//!   database should treat it as its limit when it is below `memory.max`.
//! * **Unlimited.** v2 writes `max`; v1 writes `LONG_MAX` rounded to a page
//!   (9223372036854771712). Any value of 2^62 or more is read as unlimited, and a limit at or
//!   above the machine's physical memory (`MemTotal`) does not bind: the physical memory is
//!   the real bound then, and the source says so. The reported limit is therefore never above
//!   `MemTotal` when `/proc/meminfo` is readable.
//! * **Errors.** A file that is absent means "this level sets nothing" (the root cgroup has no
//!   `memory.max`, old kernels have no PSI). A file that exists but cannot be read (permission,
//!   a directory where a file should be) or does not parse is a [`MemError::Environment`]
//!   naming the file and the line: a misread limit is worse than none.
//!
//! Every path is resolved under an injectable root ([`ContainerProbe::with_root`]), so tests
//! run on fixture trees instead of the machine's `/proc` and `/sys`.
//!
//! The probe only reads. Following the limit over time, and turning pressure stall information
//! and limit events into pressure, is [`ContainerFollower`]'s job: pure logic fed with
//! [`ContainerSample`]s, so the thread that samples can live wherever the governor's monitor
//! lives.

mod follower;
mod parse;

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use crate::{GovernorConfigBuilder, MAX_BYTES, MemError, human_bytes};

pub use follower::{
    ContainerFollower, CounterRise, EventCounter, FollowerReport, FollowerSettings, LimitChange,
};

/// Files larger than this are refused: the kernel's memory files are a few hundred bytes, and
/// even a host's `mountinfo` with thousands of mounts stays far below it.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Where the global ceiling came from; shown in snapshots, metrics labels and logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CeilingSource {
    /// A number given in the configuration.
    Configured,
    /// A cgroup v2 limit file (`memory.max` or `memory.high`) of the process's cgroup or one of
    /// its parents.
    CgroupV2 {
        /// The file that set the limit.
        path: PathBuf,
    },
    /// A cgroup v1 `memory.limit_in_bytes` of the process's memory cgroup or one of its parents.
    CgroupV1 {
        /// The file that set the limit.
        path: PathBuf,
    },
    /// The machine's physical memory, because no cgroup limit below it applies.
    PhysicalMemory {
        /// The file it was read from (`/proc/meminfo`).
        path: PathBuf,
    },
}

impl CeilingSource {
    /// A short, stable name for metrics labels: `configured`, `cgroup_v2`, `cgroup_v1` or
    /// `physical`.
    pub fn label(&self) -> &'static str {
        match self {
            CeilingSource::Configured => "configured",
            CeilingSource::CgroupV2 { .. } => "cgroup_v2",
            CeilingSource::CgroupV1 { .. } => "cgroup_v1",
            CeilingSource::PhysicalMemory { .. } => "physical",
        }
    }

    /// The file that decided, if the limit was discovered rather than configured.
    pub fn path(&self) -> Option<&Path> {
        match self {
            CeilingSource::Configured => None,
            CeilingSource::CgroupV2 { path }
            | CeilingSource::CgroupV1 { path }
            | CeilingSource::PhysicalMemory { path } => Some(path),
        }
    }
}

/// Writes [`label`](CeilingSource::label), so the text fits a metrics label.
impl fmt::Display for CeilingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The memory the kernel lets this process use, and what says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The effective limit in bytes: the smallest cgroup limit that applies, or the physical
    /// memory when that is smaller or no cgroup limit applies.
    pub bytes: usize,
    /// The file that decided.
    pub source: CeilingSource,
}

impl MemoryLimit {
    /// `fraction` of the limit, as a ceiling for the governor: the rest is headroom for memory
    /// outside reservations (code, stacks, allocator slack, page cache the kernel charges to
    /// the cgroup). Rounded down, and capped at [`MAX_BYTES`] (a limit that large means "no
    /// real bound").
    ///
    /// `fraction` must be finite, above 0 and at most 1; a ceiling that rounds to 0 bytes is
    /// refused too. Both are [`MemError::InvalidConfig`].
    pub fn ceiling(&self, fraction: f64) -> Result<usize, MemError> {
        validate_fraction(fraction)?;
        // The float product can land a hair above the limit for large values; never exceed it.
        let bytes = ((self.bytes as f64 * fraction) as usize).min(self.bytes);
        if bytes == 0 {
            return Err(MemError::config(
                "ceiling_from_environment",
                format!(
                    "{fraction} of the {} limit from {} ({}) is 0 bytes; \
                     raise the fraction or the container's memory limit",
                    human_bytes(self.bytes),
                    self.source,
                    self.source
                        .path()
                        .map_or_else(String::new, |p| p.display().to_string()),
                ),
            ));
        }
        Ok(bytes.min(MAX_BYTES))
    }
}

fn validate_fraction(fraction: f64) -> Result<(), MemError> {
    if fraction.is_finite() && fraction > 0.0 && fraction <= 1.0 {
        Ok(())
    } else {
        Err(MemError::config(
            "ceiling_from_environment",
            format!(
                "the fraction of the memory limit must be above 0 and at most 1 (e.g. 0.8), got {fraction}"
            ),
        ))
    }
}

/// Pressure stall information for memory (the cgroup's `memory.pressure`): the share of wall
/// time in which tasks waited for memory instead of running.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Psi {
    /// Time in which at least one task was stalled on memory.
    pub some: PsiAverages,
    /// Time in which all non-idle tasks were stalled at once; absent on kernels that do not
    /// report it.
    pub full: Option<PsiAverages>,
}

/// One PSI line: running averages in percent and the total stall time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PsiAverages {
    /// Percentage of the last 10 seconds spent stalled, in [0, 100].
    pub avg10: f64,
    /// Percentage of the last 60 seconds.
    pub avg60: f64,
    /// Percentage of the last 300 seconds.
    pub avg300: f64,
    /// Total stall time in microseconds since the cgroup was created.
    pub total_micros: u64,
}

/// The kernel's memory event counters for the process's cgroup: monotone counts of how often
/// a limit was met.
///
/// On cgroup v2 these are the process's own cgroup's `memory.events` (which counts its
/// subtree) plus each parent's `memory.events.local` (events at the parent's own limits,
/// which bind this process too); parents on kernels without the `.local` file (before 5.2)
/// are not counted. On cgroup v1 only two counters have a counterpart: `max` is the sum of
/// `memory.failcnt` (charges refused at a limit) over the cgroup and its parents, and
/// `oom_kill` is the own cgroup's `memory.oom_control` `oom_kill` (kernels from 4.13); the
/// others stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Times usage was below `memory.low` but memory was reclaimed anyway.
    pub low: u64,
    /// Times usage passed `memory.high` and the cgroup was throttled.
    pub high: u64,
    /// Times usage was about to pass `memory.max` (v1: a charge failed at the limit).
    pub max: u64,
    /// Times the cgroup ran out of memory and the OOM killer was invoked.
    pub oom: u64,
    /// Processes of the cgroup killed by the OOM killer.
    pub oom_kill: u64,
}

impl MemoryEvents {
    fn saturating_add(self, other: MemoryEvents) -> MemoryEvents {
        MemoryEvents {
            low: self.low.saturating_add(other.low),
            high: self.high.saturating_add(other.high),
            max: self.max.saturating_add(other.max),
            oom: self.oom.saturating_add(other.oom),
            oom_kill: self.oom_kill.saturating_add(other.oom_kill),
        }
    }
}

/// Everything one probe pass found; each part is `None` when its files are absent or failed,
/// and the failures are in `errors`, so one damaged file does not hide the others.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerSample {
    /// The effective memory limit.
    pub limit: Option<MemoryLimit>,
    /// The kernel's charge for the process's cgroup (includes page cache it caused).
    pub current: Option<usize>,
    /// Memory pressure stall information.
    pub pressure: Option<Psi>,
    /// Limit event counters.
    pub events: Option<MemoryEvents>,
    /// Why any part is missing other than its files being absent.
    pub errors: Vec<MemError>,
}

/// Reads the process's memory environment from `/proc` and the cgroup filesystem under a root
/// directory (see the [module documentation](self) for the rules).
///
/// Every call re-reads `/proc/self/cgroup` and `/proc/self/mountinfo`, so a process moved to
/// another cgroup is followed.
#[derive(Clone, Debug)]
pub struct ContainerProbe {
    root: PathBuf,
}

impl Default for ContainerProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// Which cgroup hierarchy holds the memory controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The directories of the process's cgroup in one hierarchy: its own first, then each parent,
/// ending at the mount point.
#[derive(Clone, Debug)]
struct Chain {
    dirs: Vec<PathBuf>,
}

impl Chain {
    fn own(&self) -> &Path {
        &self.dirs[0]
    }

    fn parents(&self) -> &[PathBuf] {
        &self.dirs[1..]
    }
}

/// Where the process's cgroups are on disk.
#[derive(Clone, Debug, Default)]
struct Layout {
    unified: Option<Chain>,
    v1_memory: Option<Chain>,
}

impl Layout {
    /// The hierarchy the memory controller is bound to (v1 wins: a controller listed on a v1
    /// line is not available in the unified hierarchy).
    fn memory(&self) -> Option<(Version, &Chain)> {
        self.v1_memory
            .as_ref()
            .map(|c| (Version::V1, c))
            .or_else(|| self.unified.as_ref().map(|c| (Version::V2, c)))
    }
}

impl ContainerProbe {
    /// A probe of this process's real environment (root `/`).
    pub fn new() -> Self {
        Self::with_root("/")
    }

    /// A probe that resolves `/proc/...` and `/sys/...` under `root` instead of `/`: for tests
    /// on fixture trees, or for reading a container's files from the host.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        ContainerProbe { root: root.into() }
    }

    /// The root every path is resolved under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the cgroup this process's memory is charged to, and whether it is a
    /// cgroup v2 (`true`) or v1 (`false`) hierarchy; `None` outside any cgroup with a memory
    /// controller. Useful to place a child process in a sub-cgroup (as the workload's cgroup
    /// test does) or to read files the probe does not.
    pub fn memory_cgroup_dir(&self) -> Result<Option<(PathBuf, bool)>, MemError> {
        let layout = self.layout()?;
        Ok(layout
            .memory()
            .map(|(version, chain)| (chain.own().to_path_buf(), version == Version::V2)))
    }

    /// The effective memory limit and the file that decided it.
    ///
    /// Errors when a file that exists cannot be read or parsed, or when neither a cgroup
    /// limit nor `/proc/meminfo` is available.
    pub fn memory_limit(&self) -> Result<MemoryLimit, MemError> {
        let layout = self.layout()?;
        self.limit_in(&layout)
    }

    /// The kernel's memory charge for the process's cgroup (v2 `memory.current`, v1
    /// `memory.usage_in_bytes`), which includes page cache the process caused; `None` when the
    /// file is absent (no cgroup, or the root cgroup of v2).
    pub fn memory_current(&self) -> Result<Option<usize>, MemError> {
        let layout = self.layout()?;
        Self::current_in(&layout)
    }

    /// Memory pressure stall information of the process's cgroup (`memory.pressure` in the
    /// unified hierarchy, present on hybrid hosts too when the kernel has PSI); `None` when
    /// absent.
    pub fn pressure(&self) -> Result<Option<Psi>, MemError> {
        let layout = self.layout()?;
        Self::pressure_in(&layout)
    }

    /// The memory event counters (see [`MemoryEvents`] for which files); `None` when none of
    /// the files exists.
    pub fn events(&self) -> Result<Option<MemoryEvents>, MemError> {
        let layout = self.layout()?;
        Self::events_in(&layout)
    }

    /// Reads the limit, the charge, the pressure and the events in one pass. Fails only when
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` cannot be read or parsed; other failures
    /// are collected in [`ContainerSample::errors`].
    pub fn sample(&self) -> Result<ContainerSample, MemError> {
        fn keep<T>(errors: &mut Vec<MemError>, read: Result<Option<T>, MemError>) -> Option<T> {
            read.unwrap_or_else(|e| {
                errors.push(e);
                None
            })
        }
        let layout = self.layout()?;
        let mut errors = Vec::new();
        let limit = keep(&mut errors, self.limit_in(&layout).map(Some));
        let current = keep(&mut errors, Self::current_in(&layout));
        let pressure = keep(&mut errors, Self::pressure_in(&layout));
        let events = keep(&mut errors, Self::events_in(&layout));
        Ok(ContainerSample {
            limit,
            current,
            pressure,
            events,
            errors,
        })
    }

    fn limit_in(&self, layout: &Layout) -> Result<MemoryLimit, MemError> {
        let mut best: Option<(u64, CeilingSource)> = None;
        if let Some((version, chain)) = layout.memory() {
            let files: &[&str] = match version {
                Version::V2 => &["memory.max", "memory.high"],
                Version::V1 => &["memory.limit_in_bytes"],
            };
            for dir in &chain.dirs {
                for name in files {
                    let path = dir.join(name);
                    let Some(text) = read_optional(&path)? else {
                        continue;
                    };
                    let Some(value) = parse::limit(&text, &path)? else {
                        continue;
                    };
                    // Strictly smaller: on a tie the process's own cgroup and `memory.max`,
                    // read first, are named.
                    if best.as_ref().is_none_or(|(b, _)| value < *b) {
                        let source = match version {
                            Version::V2 => CeilingSource::CgroupV2 { path },
                            Version::V1 => CeilingSource::CgroupV1 { path },
                        };
                        best = Some((value, source));
                    }
                }
            }
        }
        let meminfo = self.path("proc/meminfo");
        let physical = read_optional(&meminfo)?
            .map(|text| parse::mem_total(&text, &meminfo))
            .transpose()?;
        let (bytes, source) = match (best, physical) {
            (Some((cgroup, source)), physical) if physical.is_none_or(|p| cgroup < p) => {
                (cgroup, source)
            }
            (_, Some(physical)) => (physical, CeilingSource::PhysicalMemory { path: meminfo }),
            // (Some, None) was taken by the first arm.
            (_, None) => {
                return Err(parse::malformed(
                    &meminfo,
                    "the file is absent and no cgroup memory limit applies, so the machine's memory is unknown",
                ));
            }
        };
        Ok(MemoryLimit {
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            source,
        })
    }

    fn current_in(layout: &Layout) -> Result<Option<usize>, MemError> {
        let Some((version, chain)) = layout.memory() else {
            return Ok(None);
        };
        let name = match version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        let path = chain.own().join(name);
        read_optional(&path)?
            .map(|text| parse::count(&text, &path))
            .transpose()
            .map(|v| v.map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX)))
    }

    fn pressure_in(layout: &Layout) -> Result<Option<Psi>, MemError> {
        let Some(chain) = &layout.unified else {
            return Ok(None);
        };
        let path = chain.own().join("memory.pressure");
        read_optional(&path)?
            .map(|text| parse::psi(&text, &path))
            .transpose()
    }

    fn events_in(layout: &Layout) -> Result<Option<MemoryEvents>, MemError> {
        let Some((version, chain)) = layout.memory() else {
            return Ok(None);
        };
        let mut total: Option<MemoryEvents> = None;
        let mut add = |e: MemoryEvents| {
            total = Some(total.unwrap_or_default().saturating_add(e));
        };
        match version {
            Version::V2 => {
                let own = chain.own().join("memory.events");
                if let Some(text) = read_optional(&own)? {
                    add(parse::events(&text, &own)?);
                }
                for dir in chain.parents() {
                    let path = dir.join("memory.events.local");
                    if let Some(text) = read_optional(&path)? {
                        add(parse::events(&text, &path)?);
                    }
                }
            }
            Version::V1 => {
                for dir in &chain.dirs {
                    let path = dir.join("memory.failcnt");
                    if let Some(text) = read_optional(&path)? {
                        let max = parse::count(&text, &path)?;
                        add(MemoryEvents {
                            max,
                            ..MemoryEvents::default()
                        });
                    }
                }
                let path = chain.own().join("memory.oom_control");
                if let Some(text) = read_optional(&path)?
                    && let Some(oom_kill) = parse::oom_control_kills(&text, &path)?
                {
                    add(MemoryEvents {
                        oom_kill,
                        ..MemoryEvents::default()
                    });
                }
            }
        }
        Ok(total)
    }

    /// `relative` (no leading `/`) under the probe's root.
    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative.trim_start_matches('/'))
    }

    fn layout(&self) -> Result<Layout, MemError> {
        let cgroup_path = self.path("proc/self/cgroup");
        let Some(text) = read_optional(&cgroup_path)? else {
            // No cgroups (not Linux, or /proc not mounted): only physical memory is known.
            return Ok(Layout::default());
        };
        let cgroups = parse::proc_cgroup(&text, &cgroup_path)?;
        let mountinfo_path = self.path("proc/self/mountinfo");
        let mounts = read_optional(&mountinfo_path)?
            .map(|text| parse::mountinfo(&text, &mountinfo_path))
            .transpose()?;
        let default_mount = |mount_point: &str| parse::CgroupMount {
            mount_point: mount_point.to_owned(),
            root: "/".to_owned(),
        };
        let unified = cgroups.unified.as_deref().and_then(|path| {
            let mount = match &mounts {
                Some(m) => pick_mount(&m.unified, path)?,
                None => default_mount("/sys/fs/cgroup"),
            };
            Some(self.chain(&mount, path))
        });
        let v1_memory = cgroups.v1_memory.as_deref().and_then(|path| {
            let mount = match &mounts {
                Some(m) => pick_mount(&m.v1_memory, path)?,
                None => default_mount("/sys/fs/cgroup/memory"),
            };
            Some(self.chain(&mount, path))
        });
        Ok(Layout { unified, v1_memory })
    }

    /// The directories from the process's cgroup up to the mount point. The cgroup path is
    /// relative to the hierarchy's root; the mount shows the subtree at `mount.root`, so that
    /// prefix is removed. A path outside the mounted subtree, or one with `..` (a cgroup
    /// outside the reader's cgroup namespace), cannot be placed: then only the mount point is
    /// read, which is the namespace's (or the bind-mounted subtree's) own cgroup.
    fn chain(&self, mount: &parse::CgroupMount, cgroup_path: &str) -> Chain {
        let mount_dir = self.path(&mount.mount_point);
        let relative = strip_root(cgroup_path, &mount.root).unwrap_or("");
        let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty()).collect();
        let mut dirs = vec![mount_dir];
        if !parts.iter().any(|p| *p == "." || *p == "..") {
            for part in parts {
                let next = dirs[dirs.len() - 1].join(part);
                dirs.push(next);
            }
        }
        dirs.reverse();
        Chain { dirs }
    }
}

/// `path` relative to `root` when `root` is `path` or one of its ancestors.
fn strip_root<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return Some(path);
    }
    let rest = path.strip_prefix(root)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The mount that shows the process's cgroup, else the first one (a cgroup outside every
/// mounted subtree is then read at that mount's root); `None` when the hierarchy is not
/// mounted at all.
fn pick_mount(mounts: &[parse::CgroupMount], cgroup_path: &str) -> Option<parse::CgroupMount> {
    mounts
        .iter()
        .find(|m| strip_root(cgroup_path, &m.root).is_some())
        .or_else(|| mounts.first())
        .cloned()
}

/// Reads a small text file: `Ok(None)` when it does not exist, an error naming it when it
/// exists but cannot be read whole as UTF-8 text.
fn read_optional(path: &Path) -> Result<Option<String>, MemError> {
    let error = |e: std::io::Error| parse::malformed(path, e.to_string());
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(e)),
    };
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(error)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(parse::malformed(
            path,
            format!("larger than {MAX_FILE_BYTES} bytes; this is not a kernel memory file"),
        ));
    }
    Ok(Some(text))
}

impl GovernorConfigBuilder {
    /// Sets the global ceiling to `fraction` of the memory this process may use, as discovered
    /// by [`ContainerProbe::new`]: the cgroup (v2 or v1, including parents) limit, or the
    /// machine's physical memory when no cgroup limit applies. See
    /// [`MemoryLimit::ceiling`] for the rounding and the checks on `fraction`.
    ///
    /// ```no_run
    /// use governor_core::{EngineBudget, EngineId, GovernorConfig, MemError, mib};
    ///
    /// let config = GovernorConfig::builder()
    ///     .ceiling_from_environment(0.8)?
    ///     .engine(EngineId::Query, EngineBudget::new(mib(512)))
    ///     .build()?;
    /// # Ok::<(), MemError>(())
    /// ```
    pub fn ceiling_from_environment(self, fraction: f64) -> Result<Self, MemError> {
        self.ceiling_from_probe(&ContainerProbe::new(), fraction)
    }

    /// As [`ceiling_from_environment`](Self::ceiling_from_environment), with the limit read by
    /// `probe` (for example one over a fixture tree).
    pub fn ceiling_from_probe(
        self,
        probe: &ContainerProbe,
        fraction: f64,
    ) -> Result<Self, MemError> {
        // An impossible fraction is the caller's mistake; say so before touching any file.
        validate_fraction(fraction)?;
        let limit = probe.memory_limit()?;
        let ceiling = limit.ceiling(fraction)?;
        tracing::info!(
            limit = limit.bytes,
            source = %limit.source,
            file = %limit.source.path().map_or_else(String::new, |p| p.display().to_string()),
            fraction,
            ceiling,
            "global ceiling taken from the memory environment"
        );
        Ok(self.global_ceiling(ceiling).ceiling_source(limit.source))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn strip_root_is_component_wise() {
        assert_eq!(strip_root("/a/b", "/"), Some("/a/b"));
        assert_eq!(strip_root("/a/b", "/a"), Some("/b"));
        assert_eq!(strip_root("/a/b", "/a/b"), Some(""));
        assert_eq!(strip_root("/ab", "/a"), None);
        assert_eq!(strip_root("/x", "/a"), None);
    }

    #[test]
    fn chain_runs_from_own_cgroup_to_mount_point() {
        let probe = ContainerProbe::with_root("/r");
        let mount = parse::CgroupMount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        let chain = probe.chain(&mount, "/a/b");
        assert_eq!(
            chain.dirs,
            vec![
                PathBuf::from("/r/sys/fs/cgroup/a/b"),
                PathBuf::from("/r/sys/fs/cgroup/a"),
                PathBuf::from("/r/sys/fs/cgroup"),
            ]
        );
        // Outside the namespace: only the mount point.
        let chain = probe.chain(&mount, "/../../x");
        assert_eq!(chain.dirs, vec![PathBuf::from("/r/sys/fs/cgroup")]);
        let bind = parse::CgroupMount {
            mount_point: "/sys/fs/cgroup/memory".into(),
            root: "/docker/abc".into(),
        };
        let chain = probe.chain(&bind, "/docker/abc");
        assert_eq!(chain.dirs, vec![PathBuf::from("/r/sys/fs/cgroup/memory")]);
    }

    #[test]
    fn ceiling_fraction_is_checked_and_rounded_down() {
        let limit = MemoryLimit {
            bytes: 1000,
            source: CeilingSource::Configured,
        };
        assert_eq!(limit.ceiling(0.5).unwrap(), 500);
        assert_eq!(limit.ceiling(1.0).unwrap(), 1000);
        assert_eq!(limit.ceiling(0.9999).unwrap(), 999);
        for bad in [0.0, -0.5, 1.01, f64::NAN, f64::INFINITY] {
            let err = limit.ceiling(bad).unwrap_err();
            assert!(
                matches!(err, MemError::InvalidConfig { ref field, .. } if field == "ceiling_from_environment"),
                "{bad}: {err}"
            );
        }
        assert!(limit.ceiling(0.0001).is_err(), "rounds to 0 bytes");
        let huge = MemoryLimit {
            bytes: usize::MAX,
            source: CeilingSource::Configured,
        };
        assert_eq!(huge.ceiling(1.0).unwrap(), MAX_BYTES);
    }

    #[test]
    fn source_labels() {
        let p = PathBuf::from("/x");
        assert_eq!(CeilingSource::Configured.to_string(), "configured");
        assert_eq!(
            CeilingSource::CgroupV2 { path: p.clone() }.to_string(),
            "cgroup_v2"
        );
        assert_eq!(
            CeilingSource::CgroupV1 { path: p.clone() }.to_string(),
            "cgroup_v1"
        );
        assert_eq!(
            CeilingSource::PhysicalMemory { path: p.clone() }.label(),
            "physical"
        );
        assert_eq!(
            CeilingSource::CgroupV1 { path: p.clone() }.path(),
            Some(p.as_path())
        );
        assert_eq!(CeilingSource::Configured.path(), None);
    }
}
