//! The mixed workload's small size in a real memory cgroup whose limit is lowered while it
//! runs (`--ceiling auto` takes and follows the cgroup's limit): it must finish with every
//! promise kept and without the kernel's OOM killer. Runs where this process may create a
//! memory cgroup (root and a writable v1 memory controller, as on the project's build
//! machines); elsewhere it prints why it skipped.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor_core::{ContainerProbe, mib};

/// The cgroup made for the child: the child is killed and the directory removed on drop.
struct TestCgroup {
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

#[test]
fn the_workload_finishes_in_a_cgroup_whose_limit_drops() {
    let parent = match ContainerProbe::new().memory_cgroup_dir() {
        Ok(Some((dir, false))) => dir,
        Ok(Some((_, true))) => {
            println!(
                "skipped: memory is on cgroup v2 here; creating a child needs a delegated subtree"
            );
            return;
        }
        Ok(None) => {
            println!("skipped: this process is in no memory cgroup");
            return;
        }
        Err(e) => {
            println!("skipped: cannot read this process's cgroups: {e}");
            return;
        }
    };
    let dir = parent.join(format!("governor-workload-test-{}", std::process::id()));
    if let Err(e) = fs::create_dir(&dir) {
        println!(
            "skipped: cannot create a memory cgroup at {}: {e} (needs root and a writable v1 memory controller)",
            dir.display()
        );
        return;
    }
    let mut cgroup = TestCgroup { dir, child: None };
    let limit_file = cgroup.dir.join("memory.limit_in_bytes");
    fs::write(&limit_file, mib(1024).to_string()).unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_mixed_workload"))
        .args(["--small", "--ceiling", "auto"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let child = cgroup.child.insert(child);
    fs::write(cgroup.dir.join("cgroup.procs"), child.id().to_string()).unwrap();
    // The operator lowers the limit while the child starts and runs. Whether the child reads
    // the new limit at start or follows it later, it must end under it with nothing killed.
    fs::write(&limit_file, mib(384).to_string()).unwrap();
    let deadline = Instant::now() + Duration::from_mins(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the workload did not end in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    println!("{out}");
    let oom = fs::read_to_string(cgroup.dir.join("memory.oom_control")).unwrap_or_default();
    assert!(
        !oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "the kernel killed in the test cgroup: {oom}"
    );
    assert!(status.success(), "the workload failed: {status}\n{out}");
    assert!(out.contains("PASS"), "{out}");
    assert!(out.contains("ceiling source: cgroup_v1"), "{out}");
}
