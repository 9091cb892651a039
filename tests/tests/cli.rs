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

/// Checks that `text` is well-formed XML as far as elements go: every start tag is closed by a
/// matching end tag in order, or closes itself. (Attribute values here never contain `>`.)
fn assert_well_formed(text: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let end = start + rest[start..].find('>').expect("an unclosed tag");
        let tag = &rest[start + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            open.push(tag.split_whitespace().next().expect("a tag name"));
        }
        rest = &rest[end + 1..];
    }
    assert!(open.is_empty(), "unclosed elements: {open:?}");
}

#[test]
fn the_reports_of_a_small_run_have_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let svg = dir.path().join("run.svg");
    let out = workload()
        .args(["--small", "--json"])
        .arg(&path)
        .arg("--svg")
        .arg(&svg)
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
    let timeline = report["timeline"].as_array().unwrap();
    assert!(timeline.len() > 2, "{} timeline points", timeline.len());

    // The picture: an SVG document with one reserved-bytes series (and legend entry) per
    // engine, besides RSS and the ceiling.
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg"),
        "{}",
        &picture[..picture.len().min(200)]
    );
    assert_well_formed(&picture);
    for engine in engines {
        assert!(
            picture.contains(&format!("{engine} reserved")),
            "no series for {engine}"
        );
    }
    assert!(picture.contains("process RSS") && picture.contains("ceiling"));

    // Flushes are counted on the timeline and marked in the picture: the ingest's memtables
    // flush long before it ends, and the sampler records a point at least every 50 ms.
    let flushes = timeline.last().unwrap()["flushes"].as_u64().unwrap();
    assert!(flushes > 0, "no flush on the timeline");
    assert!(picture.contains("write buffer flushed"));
}
