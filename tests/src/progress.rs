//! Progress of the mixed workload while it runs: one bar per kind of work and a line with RSS
//! against the ceiling and the pressure level, drawn with `indicatif` when stderr is a
//! terminal; a plain line every few seconds otherwise, so CI logs stay readable.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use governor_core::alloc::ProcessMemory;
use governor_core::{MemoryGovernor, human_bytes};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the bars are refreshed on a terminal.
const BAR_EVERY: Duration = Duration::from_millis(200);

/// Work done so far, written by the workload's tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Vector searches answered.
    pub searches: Arc<AtomicUsize>,
    /// Timeseries points stored.
    pub points: Arc<AtomicUsize>,
    /// `GROUP BY` queries completed.
    pub queries: Arc<AtomicUsize>,
    /// Sparse documents inserted.
    pub sparse_docs: Arc<AtomicUsize>,
    /// CRDT edit-and-merge rounds done.
    pub crdt_rounds: Arc<AtomicUsize>,
    /// Flushes so far of the timeseries memtables and the Sparse and CRDT write buffers.
    pub flushes: Arc<AtomicU64>,
}

/// Adds one engine's running flush count to a total shared by several engines.
#[derive(Debug)]
pub struct FlushTally<'a> {
    total: &'a AtomicU64,
    seen: u64,
}

impl<'a> FlushTally<'a> {
    /// A tally adding to `total`.
    pub fn new(total: &'a AtomicU64) -> Self {
        Self { total, seen: 0 }
    }

    /// Records that the engine has flushed `count` times in all.
    pub fn note(&mut self, count: u64) {
        if count > self.seen {
            self.total.fetch_add(count - self.seen, Ordering::Relaxed);
            self.seen = count;
        }
    }
}

/// How much work there is in all.
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    /// Searches to run.
    pub searches: usize,
    /// Points to ingest.
    pub points: usize,
    /// Queries to run.
    pub queries: usize,
    /// Sparse documents to insert.
    pub sparse_docs: usize,
    /// CRDT rounds to run.
    pub crdt_rounds: usize,
}

/// Reports until dropped.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    /// Starts reporting on a thread of its own.
    pub fn start(governor: Arc<MemoryGovernor>, counters: Arc<Counters>, totals: Totals) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                if std::io::stderr().is_terminal() {
                    bars(&governor, &counters, totals, &stop);
                } else {
                    plain(&governor, &counters, totals, &stop);
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// RSS against the ceiling and the pressure level, as one line.
fn memory_line(governor: &MemoryGovernor) -> String {
    let rss = ProcessMemory::query().map_or(0, |p| p.rss);
    format!(
        "RSS {} of ceiling {}, pressure {:?}",
        human_bytes(rss),
        human_bytes(governor.ceiling()),
        governor.global_pressure()
    )
}

/// Sleeps `step` in short slices so that a stop is seen quickly; false once stopped.
fn pause(stop: &AtomicBool, step: Duration) -> bool {
    let until = Instant::now() + step;
    while Instant::now() < until {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(step));
    }
    !stop.load(Ordering::Acquire)
}

fn plain(governor: &MemoryGovernor, counters: &Counters, totals: Totals, stop: &AtomicBool) {
    let started = Instant::now();
    while pause(stop, PLAIN_EVERY) {
        eprintln!(
            "[{:>6.1?}] searches {}/{}, points {}/{}, queries {}/{}, sparse docs {}/{}, crdt rounds {}/{}; {}",
            started.elapsed(),
            counters.searches.load(Ordering::Acquire),
            totals.searches,
            counters.points.load(Ordering::Acquire),
            totals.points,
            counters.queries.load(Ordering::Acquire),
            totals.queries,
            counters.sparse_docs.load(Ordering::Acquire),
            totals.sparse_docs,
            counters.crdt_rounds.load(Ordering::Acquire),
            totals.crdt_rounds,
            memory_line(governor)
        );
    }
}

fn bars(governor: &MemoryGovernor, counters: &Counters, totals: Totals, stop: &AtomicBool) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = |name: &str, len: usize| {
        multi.add(
            ProgressBar::new(len as u64)
                .with_style(style.clone())
                .with_prefix(name.to_owned()),
        )
    };
    let searches = bar("searches", totals.searches);
    let points = bar("points", totals.points);
    let queries = bar("queries", totals.queries);
    let sparse = bar("sparse", totals.sparse_docs);
    let crdt = bar("crdt", totals.crdt_rounds);
    let memory = multi.add(ProgressBar::new_spinner());
    while pause(stop, BAR_EVERY) {
        searches.set_position(counters.searches.load(Ordering::Acquire) as u64);
        points.set_position(counters.points.load(Ordering::Acquire) as u64);
        queries.set_position(counters.queries.load(Ordering::Acquire) as u64);
        sparse.set_position(counters.sparse_docs.load(Ordering::Acquire) as u64);
        crdt.set_position(counters.crdt_rounds.load(Ordering::Acquire) as u64);
        memory.set_message(memory_line(governor));
        memory.tick();
    }
    for b in [&searches, &points, &queries, &sparse, &crdt, &memory] {
        b.finish_and_clear();
    }
}
