//! The main job's command line: bad input is refused with a message and a non-zero exit, and
//! the JSON report of a small run parses and names every engine.

use std::process::Command;

fn workload() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixed_workload"))
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    for args in [
        &["--ceiling", "240"][..],
        &["--ceiling-mib", "abc"],
        &["--ceiling-mib", "0"],
        &["--drops", "3"],
        &["--monitor-ms", "-5"],
        &["--no-such-flag"],
        &["--ungoverned", "--ceiling-mib", "100"],
    ] {
        let out = workload().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    let out = workload().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("mixed_workload "));
}

#[test]
fn the_json_report_of_a_small_run_has_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let out = workload()
        .args(["--small", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    let engines: Vec<&str> = report["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["engine"].as_str().unwrap())
        .collect();
    for engine in ["vector", "timeseries", "query", "bridge"] {
        assert!(engines.contains(&engine), "{engine} missing: {engines:?}");
    }
    assert!(report["peak_rss"].as_u64().unwrap() > 0);
}
