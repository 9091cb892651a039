//! `MemoryGovernor::follow_container` on a fixture cgroup v2 tree whose files the test rewrites
//! while the watch runs: the ceiling follows a resized limit, PSI raises pressure and lets it
//! fall back, and a rising OOM counter is an emergency. Every wait is on a condition with a
//! generous deadline.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use governor_core::{
    ContainerProbe, ContainerWatchConfig, EngineBudget, EngineId, GovernorConfig, MemError,
    MemoryGovernor, PressureLevel, mib,
};

const DEADLINE: Duration = Duration::from_mins(1);

struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Tree {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("container-watch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let tree = Tree(root);
        tree.write("proc/self/cgroup", "0::/\n");
        tree.write("proc/meminfo", "MemTotal:       67108864 kB\n");
        tree.write(
            "proc/self/mountinfo",
            "25 22 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n",
        );
        tree.limit(mib(200));
        tree.psi(0.0);
        tree.events(0);
        tree
    }

    fn write(&self, relative: &str, text: &str) {
        let path = self.0.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Write then rename, so the watch never reads a half-written file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(tmp, path).unwrap();
    }

    fn limit(&self, bytes: usize) {
        self.write("sys/fs/cgroup/memory.max", &format!("{bytes}\n"));
    }

    fn psi(&self, some: f64) {
        self.write(
            "sys/fs/cgroup/memory.pressure",
            &format!(
                "some avg10={some:.2} avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            ),
        );
    }

    fn events(&self, oom_kill: u64) {
        self.write(
            "sys/fs/cgroup/memory.events",
            &format!("low 0\nhigh 0\nmax 0\noom {oom_kill}\noom_kill {oom_kill}\n"),
        );
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_ceiling_follows_the_container_and_the_kernel_raises_pressure() {
    let tree = Tree::new("follow");
    let probe = ContainerProbe::with_root(&tree.0);
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .ceiling_from_probe(&probe, 0.5)
            .unwrap()
            .engine(EngineId::Query, EngineBudget::new(mib(100)))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(g.ceiling(), mib(100));
    // Where the ceiling came from is known from the start, file included.
    let env = g.environment();
    assert_eq!(env.ceiling_source.label(), "cgroup_v2");
    assert!(
        env.ceiling_source
            .path()
            .is_some_and(|p| p.ends_with("memory.max")),
        "{env:?}"
    );
    assert_eq!(env.ceiling_changes, 0);
    assert!(env.psi.is_none(), "nothing sampled yet: {env:?}");
    let watch = g
        .follow_container(
            probe,
            ContainerWatchConfig {
                interval: Duration::from_millis(5),
                fraction: 0.5,
                ..ContainerWatchConfig::default()
            },
        )
        .unwrap();
    // An operator shrinks the pod: the ceiling follows.
    tree.limit(mib(120));
    wait_until("the ceiling follows the limit down", || {
        g.ceiling() == mib(60)
    });
    assert!(g.try_reserve(EngineId::Query, mib(61)).is_err());
    tree.limit(mib(300));
    wait_until("the ceiling follows the limit up", || {
        g.ceiling() == mib(150)
    });
    assert!(
        watch
            .stats()
            .ceiling_changes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // The kernel reports stalls: pressure rises although the books are empty, then falls.
    tree.psi(40.0);
    wait_until("PSI raises pressure", || {
        g.global_pressure() >= PressureLevel::Warning
    });
    tree.psi(0.0);
    wait_until("pressure falls back", || {
        g.global_pressure() == PressureLevel::Normal
    });
    // The kernel killed something in the cgroup: an emergency.
    tree.events(1);
    wait_until("an OOM kill is an emergency", || {
        watch
            .stats()
            .emergencies
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    });
    // Everything the watch saw is in the snapshot and the Prometheus text.
    wait_until("the environment records the OOM kill", || {
        g.environment().events.is_some_and(|e| e.oom_kill == 1)
    });
    let env = g.environment();
    assert_eq!(env.ceiling_source.label(), "cgroup_v2");
    assert!(env.ceiling_changes >= 2, "{env:?}");
    assert!(env.emergencies >= 1, "{env:?}");
    assert!(env.psi.is_some(), "{env:?}");
    let text = g.snapshot().to_prometheus();
    for needle in [
        "memgov_ceiling_source{source=\"cgroup_v2\"",
        "memgov_ceiling_changes_total ",
        "memgov_container_emergencies_total ",
        "memgov_memory_pressure_stall_avg10_percent{kind=\"some\"}",
        "memgov_memory_pressure_stall_avg10_percent{kind=\"full\"}",
        "memgov_container_memory_events_total{event=\"oom_kill\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
    // Set by hand, the ceiling is a configured number again.
    g.set_ceiling(mib(140)).unwrap();
    let env = g.environment();
    assert_eq!(env.ceiling_source.label(), "configured");
    assert!(env.ceiling_source.path().is_none());
    drop(watch);
    // Stopped: nothing changes the ceiling any more.
    tree.limit(mib(40));
    assert_eq!(g.ceiling(), mib(140));
}

/// A container limit that gives no usable ceiling (1 byte, or 0: half of either is 0 bytes)
/// is refused and the ceiling stays where it was. The limit the ceiling follows stays the
/// baseline, so when the container returns to it nothing changes: no ceiling is set again
/// and no change is counted.
#[test]
fn a_refused_limit_leaves_the_baseline_where_the_ceiling_is() {
    let tree = Tree::new("refused");
    let probe = ContainerProbe::with_root(&tree.0);
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .ceiling_from_probe(&probe, 0.5)
            .unwrap()
            .engine(EngineId::Query, EngineBudget::new(mib(100)))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(g.ceiling(), mib(100));
    let watch = g
        .follow_container(
            probe,
            ContainerWatchConfig {
                interval: Duration::from_millis(5),
                fraction: 0.5,
                ..ContainerWatchConfig::default()
            },
        )
        .unwrap();
    // Waits until a sample that began after the files were written has been acted on. The
    // environment's sample count is raised under its mutex after each sample is read: the
    // sample counted `now + 1` may have read the files before they were written, the one
    // counted `now + 2` read them after, and it has been acted on once `now + 3` is counted.
    // Reading the count through that mutex also makes everything the watch did before it
    // visible here.
    let acted_on = || {
        let now = g.environment().samples;
        wait_until("three more samples", || g.environment().samples >= now + 3);
    };
    let errors = || {
        watch
            .stats()
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for refused in [1, 0] {
        tree.limit(refused);
        acted_on();
        assert!(errors() >= 1, "a {refused} B limit must be refused");
        assert_eq!(g.ceiling(), mib(100));
        // Back to the limit the ceiling follows: not a change.
        tree.limit(mib(200));
        acted_on();
        let env = g.environment();
        assert_eq!(env.ceiling_changes, 0, "after {refused} B: {env:?}");
        assert_eq!(
            watch
                .stats()
                .ceiling_changes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(g.ceiling(), mib(100));
    }
    // A usable change is still followed, measured from the baseline.
    tree.limit(mib(120));
    wait_until("the ceiling follows the limit down", || {
        g.ceiling() == mib(60)
    });
}

#[test]
fn bad_watch_settings_and_unreadable_environments_are_refused() {
    let g = MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(mib(10))
            .engine(EngineId::Query, EngineBudget::new(mib(10)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let tree = Tree::new("bad");
    for config in [
        ContainerWatchConfig {
            interval: Duration::ZERO,
            ..ContainerWatchConfig::default()
        },
        ContainerWatchConfig {
            fraction: f64::NAN,
            ..ContainerWatchConfig::default()
        },
        ContainerWatchConfig {
            fraction: 1.5,
            ..ContainerWatchConfig::default()
        },
    ] {
        assert!(matches!(
            g.follow_container(ContainerProbe::with_root(&tree.0), config),
            Err(MemError::InvalidConfig { .. })
        ));
    }
    tree.write("sys/fs/cgroup/memory.max", "lots\n");
    assert!(matches!(
        g.follow_container(
            ContainerProbe::with_root(&tree.0),
            ContainerWatchConfig::default()
        ),
        Err(MemError::Environment { .. })
    ));
}
