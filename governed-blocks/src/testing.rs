//! Test support for the adapters built on these blocks (feature `testing`, which adapters
//! enable in their dev-dependencies only): a governor for one engine, a runtime, and the
//! kill-a-child crash harness.
//!
//! # The crash harness
//!
//! An adapter promises that what it acknowledged survives a crash. The test proves it by
//! running *itself* as a child process: the test binary is started again with only the
//! crash test selected and an environment variable set; the test body sees the variable
//! and, instead of testing, ingests and prints `ACK <n>` after each acknowledgement
//! ([`ack`]). The parent reads those lines, kills the child (SIGKILL: no destructor, no
//! flush) once it acknowledged enough, reads the lines already written, and reopens the
//! store to check that the highest acknowledged `n` is all there.
//!
//! ```text
//!   parent: CrashHarness::run_and_kill ──spawn(env)──▶ child: CrashHarness::child_path → ingest
//!          ◀── stdout "ACK 25" / "ACK 50" … ─────────────        ack(n) after each commit
//!          kill after `kill_after` ─────────── SIGKILL ──▶ ✕
//!          ◀── returns the highest n seen ── reopen the store and check it
//! ```

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};

/// A governor with `engine` limited to `limit` under a global `ceiling`, and a Query
/// budget of 64 MiB beside it (so the engine is not alone: reclaims have somewhere to go).
/// Reclaims may take 30 s: a loaded CI machine must not time a test out.
pub fn governor(engine: EngineId, limit: usize, ceiling: usize) -> Arc<MemoryGovernor> {
    MemoryGovernor::new(
        GovernorConfig::builder()
            .global_ceiling(ceiling)
            .engine(engine, EngineBudget::new(limit))
            .engine(EngineId::Query, EngineBudget::new(mib(64)))
            .reclaim_timeout(Duration::from_secs(30))
            .build()
            .expect("valid test governor config"),
    )
    .expect("test governor")
}

/// A multi-thread runtime of `workers` threads with time and I/O.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("test runtime")
}

/// Prints the acknowledgement line the parent counts, and flushes it: a line still in the
/// child's buffer when it is killed was never seen, so it must not count.
pub fn ack(n: u64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ACK {n}");
    let _ = out.flush();
}

/// One crash test: the name of the test function (the child runs only it) and the
/// environment variable that turns the test body into the child.
#[derive(Clone, Copy, Debug)]
pub struct CrashHarness {
    test: &'static str,
    env: &'static str,
}

impl CrashHarness {
    /// The harness for test function `test`, with `env` marking the child.
    pub const fn new(test: &'static str, env: &'static str) -> Self {
        Self { test, env }
    }

    /// In the child: the store path the parent passed. `None` in the parent.
    pub fn child_path(&self) -> Option<String> {
        std::env::var(self.env).ok()
    }

    /// Starts this test binary as the child on the store at `path`, kills it once it has
    /// acknowledged at least `kill_after`, and returns the highest acknowledgement it
    /// printed (lines written before the kill count too).
    ///
    /// Panics when the child ends before acknowledging `kill_after`: it failed.
    pub fn run_and_kill(&self, path: impl AsRef<OsStr>, kill_after: u64) -> u64 {
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args([self.test, "--exact", "--nocapture", "--test-threads=1"])
            .env(self.env, path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the crash child");
        let acked_in = |line: &str| line.strip_prefix("ACK ").and_then(|n| n.parse().ok());
        let mut acked = 0u64;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        while acked < kill_after {
            let line = lines
                .next()
                .expect("child ended before acknowledging enough")
                .expect("reading the child's output");
            if let Some(n) = acked_in(&line) {
                acked = n;
            }
        }
        child.kill().expect("killing the child");
        child.wait().expect("reaping the child");
        for line in lines.map_while(Result::ok) {
            if let Some(n) = acked_in(&line) {
                acked = acked.max(n);
            }
        }
        acked
    }
}
