//! Container discovery on fixture trees: each test writes a small `/proc` + `/sys/fs/cgroup`
//! under a private directory and points a [`ContainerProbe`] at it. The layouts are the ones
//! found in the wild: pure cgroup v2 (container with its own namespace, and a nested systemd
//! path), cgroup v1 with a bind-mounted subtree, the hybrid layout of this project's build
//! machines, and no cgroup at all. Where the machine lets root create a v1 memory cgroup, one
//! test also follows a real limit lowered under a running child process.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use governor_core::container::{EventCounter, FollowerReport};
use governor_core::{
    CeilingSource, ContainerFollower, ContainerProbe, EngineBudget, EngineId, FollowerSettings,
    GovernorConfig, MemError, MemoryEvents, PressureLevel, mib,
};

/// A fixture tree under Cargo's per-target temporary directory, removed on drop.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "container-fixture-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        Tree { root }
    }

    /// Writes `text` at `relative` (creating parents).
    fn file(&self, relative: &str, text: &str) -> &Tree {
        let path = self.root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
        self
    }

    fn dir(&self, relative: &str) -> &Tree {
        fs::create_dir_all(self.root.join(relative)).unwrap();
        self
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    fn probe(&self) -> ContainerProbe {
        ContainerProbe::with_root(&self.root)
    }

    /// 64 GiB of physical memory.
    fn meminfo(&self) -> &Tree {
        self.file(
            "proc/meminfo",
            "MemTotal:       67108864 kB\nMemFree:        1000 kB\n",
        )
    }

    /// A pure cgroup v2 host: the unified hierarchy at /sys/fs/cgroup.
    fn v2(&self, cgroup: &str) -> &Tree {
        self.file("proc/self/cgroup", &format!("0::{cgroup}\n"))
            .file(
                "proc/self/mountinfo",
                "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                 25 22 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
            )
            .meminfo()
    }

    /// The build machines' hybrid layout: `0::/` plus v1 controllers, the memory one in a
    /// nested cgroup, the unified hierarchy at /sys/fs/cgroup/unified.
    fn hybrid(&self) -> &Tree {
        self.file(
            "proc/self/cgroup",
            "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n",
        )
        .file(
            "proc/self/mountinfo",
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
             39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
             41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
        )
        .meminfo()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

const GIB64: usize = 64 << 30;
const V1_UNLIMITED: &str = "9223372036854771712\n";

fn v2_path(tree: &Tree, relative: &str) -> CeilingSource {
    CeilingSource::CgroupV2 {
        path: tree.path(relative),
    }
}

fn environment_error(err: &MemError) -> (&str, &str) {
    match err {
        MemError::Environment { path, reason } => (path, reason),
        other => panic!("expected an environment error, got {other:?}"),
    }
}

#[test]
fn v2_max_means_unlimited_so_physical_memory_decides() {
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "max\n")
        .file("sys/fs/cgroup/memory.high", "max\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, GIB64);
    assert_eq!(
        limit.source,
        CeilingSource::PhysicalMemory {
            path: tree.path("proc/meminfo")
        }
    );
    assert_eq!(limit.source.to_string(), "physical");
}

#[test]
fn v2_number_at_the_namespace_root() {
    // A container with its own cgroup namespace: `0::/` and the limit on the mount point.
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "536870912\n")
        .file("sys/fs/cgroup/memory.high", "max\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, mib(512));
    assert_eq!(limit.source, v2_path(&tree, "sys/fs/cgroup/memory.max"));
    assert_eq!(limit.source.label(), "cgroup_v2");
}

#[test]
fn v2_high_below_max_wins() {
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "536870912\n")
        .file("sys/fs/cgroup/memory.high", "402653184\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, mib(384));
    assert_eq!(limit.source, v2_path(&tree, "sys/fs/cgroup/memory.high"));
}

#[test]
fn v2_nested_path_with_a_lower_limit_in_a_parent() {
    // A pod's container: its own cgroup allows 2 GiB, the pod slice above it 1 GiB.
    let pod = "sys/fs/cgroup/kubepods.slice/pod1";
    let own = "sys/fs/cgroup/kubepods.slice/pod1/ctr";
    let tree = Tree::new();
    tree.v2("/kubepods.slice/pod1/ctr")
        .file(&format!("{own}/memory.max"), "2147483648\n")
        .file(&format!("{own}/memory.high"), "max\n")
        .file(&format!("{pod}/memory.max"), "1073741824\n")
        .file("sys/fs/cgroup/kubepods.slice/memory.max", "max\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, 1 << 30);
    assert_eq!(limit.source, v2_path(&tree, &format!("{pod}/memory.max")));

    // When the container's own limit is the lower one, it decides.
    tree.file(&format!("{own}/memory.high"), "805306368\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, mib(768));
    assert_eq!(limit.source, v2_path(&tree, &format!("{own}/memory.high")));
}

#[test]
fn v2_limit_at_or_above_physical_memory_does_not_bind() {
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", &format!("{}\n", 128_u64 << 30));
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, GIB64);
    assert_eq!(limit.source.label(), "physical");
}

#[test]
fn v2_without_mountinfo_uses_sys_fs_cgroup() {
    let tree = Tree::new();
    tree.file("proc/self/cgroup", "0::/app\n")
        .meminfo()
        .file("sys/fs/cgroup/app/memory.max", "268435456\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, mib(256));
    assert_eq!(limit.source, v2_path(&tree, "sys/fs/cgroup/app/memory.max"));
}

#[test]
fn v1_bind_mounted_subtree() {
    // Docker on cgroup v1: /proc/self/cgroup names the host path, the mount shows that
    // subtree at /sys/fs/cgroup/memory.
    let tree = Tree::new();
    tree.file(
        "proc/self/cgroup",
        "12:pids:/docker/abc\n5:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n",
    )
    .file(
        "proc/self/mountinfo",
        "700 699 0:40 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n\
         701 699 0:41 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n",
    )
    .meminfo()
    .file("sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824\n");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, 1 << 30);
    assert_eq!(
        limit.source,
        CeilingSource::CgroupV1 {
            path: tree.path("sys/fs/cgroup/memory/memory.limit_in_bytes")
        }
    );
    assert_eq!(limit.source.to_string(), "cgroup_v1");
}

#[test]
fn hybrid_reads_the_v1_memory_controller_and_its_parents() {
    let tree = Tree::new();
    tree.hybrid()
        .file("sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNLIMITED)
        .file(
            "sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
            "805306368\n",
        )
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
            V1_UNLIMITED,
        )
        // The unified hierarchy has no memory controller; a stray file there must not count.
        .dir("sys/fs/cgroup/unified");
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, mib(768));
    assert_eq!(
        limit.source,
        CeilingSource::CgroupV1 {
            path: tree.path("sys/fs/cgroup/memory/process_api/memory.limit_in_bytes")
        }
    );

    // Exactly the build machines: v1's "no limit" everywhere, so physical memory decides.
    tree.file(
        "sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
        V1_UNLIMITED,
    );
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, GIB64);
    assert_eq!(limit.source.label(), "physical");
}

#[test]
fn hybrid_ignores_a_memory_max_in_the_unified_hierarchy() {
    let tree = Tree::new();
    tree.hybrid()
        .file("sys/fs/cgroup/unified/memory.max", "1048576\n")
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
            "2147483648\n",
        );
    let limit = tree.probe().memory_limit().unwrap();
    assert_eq!(limit.bytes, 2 << 30);
    assert_eq!(limit.source.label(), "cgroup_v1");
}

#[test]
fn no_cgroup_at_all_falls_back_to_physical_memory() {
    let tree = Tree::new();
    tree.meminfo();
    let probe = tree.probe();
    let limit = probe.memory_limit().unwrap();
    assert_eq!(limit.bytes, GIB64);
    assert_eq!(limit.source.label(), "physical");
    assert_eq!(probe.memory_current().unwrap(), None);
    assert_eq!(probe.pressure().unwrap(), None);
    assert_eq!(probe.events().unwrap(), None);

    // Nothing at all: an error that names the file it needed.
    let empty = Tree::new();
    let err = empty.probe().memory_limit().unwrap_err();
    let (path, reason) = environment_error(&err);
    assert_eq!(path, empty.path("proc/meminfo").display().to_string());
    assert!(reason.contains("no cgroup memory limit"), "{reason}");
}

/// A file may be up to 4 MiB and its error is logged on every sample of the container watch:
/// the error quotes a bounded excerpt (with the total length), not the file, and still names
/// the file. Each case is one 4 MiB line of text that is not what the file should hold.
#[test]
fn errors_quote_a_bounded_excerpt_of_a_huge_file() {
    const FOUR_MIB: usize = 4 << 20;
    let garbage = "x".repeat(FOUR_MIB);
    let cases = [
        ("sys/fs/cgroup/memory.max", garbage.clone()),
        ("sys/fs/cgroup/memory.high", format!("1{}", &garbage[1..])),
        ("proc/meminfo", format!("MemTotal: {}", &garbage[10..])),
        ("proc/self/cgroup", garbage.clone()),
        ("proc/self/mountinfo", garbage.clone()),
    ];
    for (file, text) in &cases {
        assert_eq!(text.len(), FOUR_MIB);
        let tree = Tree::new();
        tree.v2("/")
            .file("sys/fs/cgroup/memory.max", "1048576\n")
            .file(file, text);
        let err = tree.probe().memory_limit().unwrap_err();
        let message = err.to_string();
        let (path, _) = environment_error(&err);
        assert_eq!(path, tree.path(file).display().to_string(), "{file}");
        assert!(
            message.len() < 1024,
            "{file}: a {} byte message: {}…",
            message.len(),
            message.chars().take(300).collect::<String>()
        );
        assert!(message.contains(path), "{file}: {message}");
        assert!(message.contains("bytes in all"), "{file}: {message}");
    }
    // The counters the watch samples every interval quote an excerpt too.
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "1048576\n")
        .file("sys/fs/cgroup/memory.current", &garbage)
        .file("sys/fs/cgroup/memory.events", &format!("max {garbage}"));
    let sample = tree.probe().sample().unwrap();
    assert_eq!(sample.errors.len(), 2, "memory.current and memory.events");
    for err in &sample.errors {
        let message = err.to_string();
        assert!(message.len() < 1024, "a {} byte message", message.len());
        assert!(message.contains("sys/fs/cgroup/memory."), "{message}");
    }
}

/// The kernel writes a limit as `max` or decimal digits, then a newline. A sign, a space or a
/// second word is not a limit, whatever Rust's integer parsing would make of it.
#[test]
fn limit_files_hold_max_or_digits_and_nothing_else() {
    for (text, expected) in [
        ("5\n", Some(5)),
        ("5", Some(5)),
        ("max\n", None),
        ("max", None),
    ] {
        let tree = Tree::new();
        tree.file("proc/self/cgroup", "0::/\n")
            .file("sys/fs/cgroup/memory.max", text);
        let limit = tree.probe().memory_limit();
        match expected {
            Some(bytes) => assert_eq!(limit.unwrap().bytes, bytes, "{text:?}"),
            // `max` with no meminfo: no limit is known at all.
            None => assert!(
                environment_error(&limit.unwrap_err())
                    .0
                    .ends_with("proc/meminfo"),
                "{text:?}"
            ),
        }
    }
    for bad in [
        "+5", "+5\n", " 5", "5 5", "-1", "5\n\n", " max", "0x10", "5k",
    ] {
        let tree = Tree::new();
        tree.file("proc/self/cgroup", "0::/\n")
            .file("sys/fs/cgroup/memory.max", bad);
        let err = tree.probe().memory_limit().unwrap_err();
        let (path, reason) = environment_error(&err);
        assert!(path.ends_with("sys/fs/cgroup/memory.max"), "{bad:?}: {err}");
        assert!(reason.contains("neither `max` nor"), "{bad:?}: {err}");
    }
}

#[test]
fn a_cgroup_limit_stands_without_meminfo() {
    let tree = Tree::new();
    tree.file("proc/self/cgroup", "0::/\n")
        .file("sys/fs/cgroup/memory.max", "1048576\n");
    assert_eq!(tree.probe().memory_limit().unwrap().bytes, mib(1));
}

#[test]
fn malformed_files_are_named_in_the_error() {
    let cases: [(&str, &str); 6] = [
        ("sys/fs/cgroup/memory.max", "lots\n"),
        ("sys/fs/cgroup/memory.max", ""),
        ("sys/fs/cgroup/memory.high", "-1\n"),
        ("proc/meminfo", "MemFree: 1 kB\n"),
        ("proc/self/cgroup", "this is not a cgroup line\n"),
        ("proc/self/mountinfo", "25 22 0:22 / /sys/fs/cgroup rw\n"),
    ];
    for (file, text) in cases {
        let tree = Tree::new();
        tree.v2("/")
            .file("sys/fs/cgroup/memory.max", "1048576\n")
            .file(file, text);
        let err = tree.probe().memory_limit().unwrap_err();
        let (path, reason) = environment_error(&err);
        assert_eq!(path, tree.path(file).display().to_string(), "{file}: {err}");
        assert!(!reason.is_empty());
        assert!(
            err.to_string()
                .contains(&tree.path(file).display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn unreadable_files_are_named_in_the_error() {
    // A directory where a file should be cannot be read even by root.
    for file in [
        "sys/fs/cgroup/memory.max",
        "proc/meminfo",
        "proc/self/cgroup",
        "proc/self/mountinfo",
    ] {
        let tree = Tree::new();
        tree.v2("/");
        let _ = fs::remove_file(tree.path(file));
        tree.dir(file);
        let err = tree.probe().memory_limit().unwrap_err();
        let (path, reason) = environment_error(&err);
        assert_eq!(path, tree.path(file).display().to_string(), "{file}: {err}");
        assert!(reason.to_lowercase().contains("directory"), "{reason}");
    }
    // A parent's limit file too.
    let tree = Tree::new();
    tree.v2("/a/b").dir("sys/fs/cgroup/a/memory.max");
    let err = tree.probe().memory_limit().unwrap_err();
    assert_eq!(
        environment_error(&err).0,
        tree.path("sys/fs/cgroup/a/memory.max")
            .display()
            .to_string()
    );
}

#[test]
fn v2_current_pressure_and_events() {
    let tree = Tree::new();
    tree.v2("/app")
        .file("sys/fs/cgroup/app/memory.max", "1073741824\n")
        .file("sys/fs/cgroup/app/memory.current", "123456789\n")
        .file(
            "sys/fs/cgroup/app/memory.pressure",
            "some avg10=12.34 avg60=5.00 avg300=1.00 total=987654\n\
             full avg10=3.21 avg60=1.00 avg300=0.50 total=12345\n",
        )
        .file(
            "sys/fs/cgroup/app/memory.events",
            "low 0\nhigh 4\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        // The root cgroup has no memory.events.local; a limited parent would, and its events
        // bind this process too.
        .file(
            "sys/fs/cgroup/memory.events.local",
            "low 0\nhigh 0\nmax 5\noom 0\noom_kill 0\n",
        );
    let probe = tree.probe();
    assert_eq!(probe.memory_current().unwrap(), Some(123_456_789));
    let psi = probe.pressure().unwrap().unwrap();
    assert!((psi.some.avg10 - 12.34).abs() < 1e-9);
    assert!((psi.full.unwrap().avg10 - 3.21).abs() < 1e-9);
    assert_eq!(psi.some.total_micros, 987_654);
    assert_eq!(
        probe.events().unwrap(),
        Some(MemoryEvents {
            low: 0,
            high: 4,
            max: 7,
            oom: 1,
            oom_kill: 1
        })
    );
    let sample = probe.sample().unwrap();
    assert!(sample.errors.is_empty(), "{:?}", sample.errors);
    assert_eq!(sample.limit.unwrap().bytes, 1 << 30);
    assert_eq!(sample.current, Some(123_456_789));
    assert!(sample.pressure.is_some());
    assert_eq!(sample.events.unwrap().max, 7);
}

#[test]
fn hybrid_current_events_from_v1_and_pressure_from_the_unified_hierarchy() {
    let tree = Tree::new();
    tree.hybrid()
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.usage_in_bytes",
            "544768\n",
        )
        .file("sys/fs/cgroup/memory/process_api/abc/memory.failcnt", "3\n")
        .file("sys/fs/cgroup/memory/process_api/memory.failcnt", "2\n")
        .file(
            "sys/fs/cgroup/memory/process_api/abc/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .file(
            "sys/fs/cgroup/unified/memory.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
    let probe = tree.probe();
    assert_eq!(probe.memory_current().unwrap(), Some(544_768));
    assert_eq!(
        probe.events().unwrap(),
        Some(MemoryEvents {
            max: 5,
            oom_kill: 4,
            ..MemoryEvents::default()
        })
    );
    assert!(probe.pressure().unwrap().unwrap().some.avg10.abs() < 1e-9);
}

#[test]
fn damaged_optional_files_are_errors_in_the_sample_not_silence() {
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "1048576\n")
        .file("sys/fs/cgroup/memory.current", "a lot\n")
        .file("sys/fs/cgroup/memory.pressure", "some avg10=oops\n")
        .file("sys/fs/cgroup/memory.events", "max many\n");
    let probe = tree.probe();
    assert!(probe.memory_current().is_err());
    assert!(probe.pressure().is_err());
    assert!(probe.events().is_err());
    let sample = probe.sample().unwrap();
    // The limit still comes through; each damaged file is reported by name.
    assert_eq!(sample.limit.unwrap().bytes, mib(1));
    assert_eq!(
        (sample.current, sample.pressure, sample.events),
        (None, None, None)
    );
    let named: Vec<String> = sample
        .errors
        .iter()
        .map(|e| environment_error(e).0.to_owned())
        .collect();
    for file in ["memory.current", "memory.pressure", "memory.events"] {
        let path = tree.path(&format!("sys/fs/cgroup/{file}"));
        assert!(
            named.contains(&path.display().to_string()),
            "{file}: {named:?}"
        );
    }
}

/// Runs the follower over successive samples of a probe.
fn follow(probe: &ContainerProbe, follower: &mut ContainerFollower) -> FollowerReport {
    let sample = probe.sample().unwrap();
    assert!(sample.errors.is_empty(), "{:?}", sample.errors);
    follower.observe(&sample)
}

#[test]
fn a_limit_that_changes_between_two_reads_is_followed() {
    let tree = Tree::new();
    tree.v2("/").file("sys/fs/cgroup/memory.max", "536870912\n");
    let probe = tree.probe();
    let mut follower = ContainerFollower::new(FollowerSettings::new()).unwrap();
    assert_eq!(follow(&probe, &mut follower).limit_change, None);
    assert_eq!(follow(&probe, &mut follower).limit_change, None);

    // The operator resizes the pod: 512 MiB -> 384 MiB via memory.high.
    tree.file("sys/fs/cgroup/memory.high", "402653184\n");
    let change = follow(&probe, &mut follower).limit_change.unwrap();
    assert_eq!(change.from, mib(512));
    assert_eq!(change.to.bytes, mib(384));
    assert_eq!(
        change.to.source,
        v2_path(&tree, "sys/fs/cgroup/memory.high")
    );
    assert_eq!(follow(&probe, &mut follower).limit_change, None);

    // And back up, unlimited: physical memory now decides.
    tree.file("sys/fs/cgroup/memory.high", "max\n")
        .file("sys/fs/cgroup/memory.max", "max\n");
    let change = follow(&probe, &mut follower).limit_change.unwrap();
    assert_eq!((change.from, change.to.bytes), (mib(384), GIB64));
    assert_eq!(change.to.source.label(), "physical");
}

#[test]
fn psi_past_the_threshold_asks_for_warning() {
    let tree = Tree::new();
    tree.v2("/").file("sys/fs/cgroup/memory.max", "536870912\n");
    let psi = |some: f64, full: f64| {
        tree.file(
            "sys/fs/cgroup/memory.pressure",
            &format!(
                "some avg10={some:.2} avg60=0.00 avg300=0.00 total=1\n\
                 full avg10={full:.2} avg60=0.00 avg300=0.00 total=1\n"
            ),
        );
    };
    let probe = tree.probe();
    let settings = FollowerSettings::new()
        .psi_some_threshold(Some(25.0))
        .psi_full_threshold(None);
    let mut follower = ContainerFollower::new(settings).unwrap();
    psi(24.99, 90.0);
    let report = follow(&probe, &mut follower);
    assert_eq!(report.pressure_floor, None, "full is turned off");
    psi(25.0, 0.0);
    let report = follow(&probe, &mut follower);
    assert_eq!(report.pressure_floor, Some(PressureLevel::Warning));
    assert!(report.pressure_floor_changed);
    psi(3.0, 0.0);
    let report = follow(&probe, &mut follower);
    assert_eq!(report.pressure_floor, None);
    assert!(report.pressure_floor_changed);
}

#[test]
fn rising_oom_kill_or_max_counters_are_an_emergency() {
    let tree = Tree::new();
    tree.v2("/").file("sys/fs/cgroup/memory.max", "536870912\n");
    let events = |high: u64, max: u64, oom_kill: u64| {
        tree.file(
            "sys/fs/cgroup/memory.events",
            &format!("low 0\nhigh {high}\nmax {max}\noom {oom_kill}\noom_kill {oom_kill}\n"),
        );
    };
    let probe = tree.probe();
    let mut follower = ContainerFollower::new(FollowerSettings::new()).unwrap();
    events(10, 3, 1);
    assert!(
        !follow(&probe, &mut follower).is_emergency(),
        "history before the first sample is not an emergency"
    );
    events(50, 3, 1);
    assert!(
        !follow(&probe, &mut follower).is_emergency(),
        "`high` alone only throttles"
    );
    events(50, 4, 1);
    let report = follow(&probe, &mut follower);
    assert!(report.is_emergency());
    assert_eq!(report.counter_rises.len(), 1);
    assert_eq!(report.counter_rises[0].counter, EventCounter::Max);
    events(50, 4, 2);
    let report = follow(&probe, &mut follower);
    let counters: Vec<_> = report.counter_rises.iter().map(|r| r.counter).collect();
    assert_eq!(counters, vec![EventCounter::Oom, EventCounter::OomKill]);
    assert_eq!(
        (report.counter_rises[1].from, report.counter_rises[1].to),
        (1, 2)
    );

    // Turned off, the same rise is not reported.
    let mut quiet =
        ContainerFollower::new(FollowerSettings::new().emergency_on_events(false)).unwrap();
    follow(&probe, &mut quiet);
    events(50, 9, 9);
    assert!(!follow(&probe, &mut quiet).is_emergency());
}

#[test]
fn builder_takes_its_ceiling_from_the_probe() {
    let tree = Tree::new();
    tree.v2("/")
        .file("sys/fs/cgroup/memory.max", "1073741824\n");
    let config = GovernorConfig::builder()
        .ceiling_from_probe(&tree.probe(), 0.75)
        .unwrap()
        .engine(EngineId::Query, EngineBudget::new(mib(256)))
        .build()
        .unwrap();
    assert_eq!(config.ceiling(), mib(768));

    for bad in [0.0, 1.5, f64::NAN, -1.0] {
        let err = GovernorConfig::builder()
            .ceiling_from_probe(&tree.probe(), bad)
            .unwrap_err();
        assert!(
            matches!(&err, MemError::InvalidConfig { field, .. } if field == "ceiling_from_environment"),
            "{bad}: {err}"
        );
    }
    // A damaged environment is an error, not a guessed ceiling.
    tree.file("sys/fs/cgroup/memory.max", "garbage\n");
    let err = GovernorConfig::builder()
        .ceiling_from_probe(&tree.probe(), 0.5)
        .unwrap_err();
    assert!(matches!(err, MemError::Environment { .. }), "{err}");
}

#[test]
fn this_machine() {
    let probe = ContainerProbe::new();
    let limit = probe
        .memory_limit()
        .expect("the real probe reads this machine");
    assert!(limit.bytes > 0);
    let sample = probe.sample().unwrap();
    println!(
        "this machine: limit {} bytes from {} ({:?}); current {:?}; pressure {:?}; events {:?}; errors {:?}",
        limit.bytes,
        limit.source,
        limit.source.path(),
        sample.current,
        sample.pressure,
        sample.events,
        sample.errors
    );
    assert!(sample.errors.is_empty(), "{:?}", sample.errors);
    let config = GovernorConfig::builder()
        .ceiling_from_environment(0.5)
        .unwrap()
        .engine(EngineId::Query, EngineBudget::new(mib(1)))
        .build()
        .unwrap();
    assert!(config.ceiling() > 0 && config.ceiling() <= limit.bytes);
}

/// Set in the environment of the child that `a_real_cgroup_limit_is_followed` starts inside the
/// cgroup it made; `real_cgroup_child` does nothing without it.
const CHILD_ENV: &str = "GOVERNOR_CONTAINER_TEST_CHILD";

/// The child half of `a_real_cgroup_limit_is_followed`: on each line from the parent, probes
/// the real environment and prints what it found and what the follower reports.
#[test]
fn real_cgroup_child() {
    use std::io::Write;

    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let probe = ContainerProbe::new();
    let mut follower = ContainerFollower::new(FollowerSettings::new()).unwrap();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap() > 0 {
        line.clear();
        let sample = probe.sample().unwrap();
        let report = follower.observe(&sample);
        let limit = sample.limit.unwrap();
        // Straight to the file descriptor: the test harness captures `println!`.
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "CHILD {} {} {} {:?}",
            limit.bytes,
            limit.source,
            limit.source.path().unwrap().display(),
            report.limit_change.map(|c| (c.from, c.to.bytes))
        )
        .unwrap();
        out.flush().unwrap();
    }
}

/// The v1 memory cgroup directory of this process, if the memory controller is on v1.
fn own_v1_memory_cgroup() -> Result<PathBuf, String> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })
        .ok_or(
            "the memory controller is not on cgroup v1 here (pure v2 needs a delegated subtree)",
        )?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let (root, mount_point) = mounts
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mut tail = after.split_whitespace();
            let is_memory =
                tail.next()? == "cgroup" && tail.nth(1)?.split(',').any(|o| o == "memory");
            let fields: Vec<&str> = before.split_whitespace().collect();
            is_memory.then(|| (fields[3].to_owned(), fields[4].to_owned()))
        })
        .ok_or("no v1 memory controller in /proc/self/mountinfo")?;
    let relative = if root == "/" {
        path.as_str()
    } else {
        path.strip_prefix(&root)
            .ok_or("this process's memory cgroup is outside the mounted subtree")?
    };
    Ok(Path::new(&mount_point).join(relative.trim_start_matches('/')))
}

/// A cgroup made by the test: the child is killed and the directory removed on drop.
struct RealCgroup {
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Drop for RealCgroup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!(
                "could not remove the test cgroup {}: {e}",
                self.dir.display()
            );
        }
    }
}

#[test]
fn a_real_cgroup_limit_is_followed() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    // Opt-in: the child is a debug test binary of this crate running under a 256 → 128 MiB
    // limit, and on a loaded machine paging its own text in under that limit once took past
    // the 5-minute answer deadline. Run it with MEMGOV_REAL_CGROUP=1 (as root, on a machine
    // with a writable v1 memory controller).
    if std::env::var_os("MEMGOV_REAL_CGROUP").is_none() {
        println!("skipped: set MEMGOV_REAL_CGROUP=1 to run against a real memory cgroup");
        return;
    }
    let parent = match own_v1_memory_cgroup() {
        Ok(dir) => dir,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let outer = ContainerProbe::new().memory_limit().unwrap().bytes;
    if outer <= mib(256) {
        println!("skipped: the surrounding limit ({outer} bytes) is already below the test's");
        return;
    }
    let dir = parent.join(format!("governor-container-test-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        println!(
            "skipped: cannot create a memory cgroup at {}: {e} (needs root and a writable v1 memory controller)",
            dir.display()
        );
        return;
    }
    let mut cgroup = RealCgroup { dir, child: None };
    let limit_file = cgroup.dir.join("memory.limit_in_bytes");
    fs::write(&limit_file, mib(256).to_string()).unwrap();

    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "real_cgroup_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let child = cgroup.child.insert(child);
    fs::write(cgroup.dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    let mut to_child = child.stdin.take().unwrap();
    let from_child = BufReader::new(child.stdout.take().unwrap());
    // Lines arrive through a thread so that a child that never answers fails the test at a
    // generous deadline instead of hanging it.
    let (lines, answers) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in from_child.lines().map_while(Result::ok) {
            // The harness may print "test real_cgroup_child ... " on the same line first.
            if let Some((_, rest)) = line.split_once("CHILD ")
                && lines.send(rest.trim().to_owned()).is_err()
            {
                return;
            }
        }
    });
    let ask = |to_child: &mut std::process::ChildStdin| {
        to_child.write_all(b"probe\n").unwrap();
        answers
            .recv_timeout(std::time::Duration::from_mins(5))
            .expect("the child answers within 5 minutes")
    };
    let expected_file = limit_file.display().to_string();
    let first = ask(&mut to_child);
    assert_eq!(
        first,
        format!("{} cgroup_v1 {expected_file} None", mib(256)),
        "first probe"
    );
    // The operator lowers the limit under the running process.
    fs::write(&limit_file, mib(128).to_string()).unwrap();
    let second = ask(&mut to_child);
    assert_eq!(
        second,
        format!(
            "{} cgroup_v1 {expected_file} Some(({}, {}))",
            mib(128),
            mib(256),
            mib(128)
        ),
        "second probe"
    );
    drop(to_child);
    let status = cgroup.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "child: {status}");
    println!(
        "followed a real v1 cgroup at {}: {first} -> {second}",
        cgroup.dir.display()
    );
}
