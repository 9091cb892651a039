//! The runaway scenario with aborts on (issue 18): the unspillable join that holds the
//! timeseries floor is aborted, every point is ingested, and the summary tells the story.
//! The run without aborts is the binary's `--scenario runaway --no-abort` (BENCHMARKS.md).

use std::time::Duration;

use tests::runaway::{QueryOutcome, RunawayConfig, run_runaway};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runaway_join_is_aborted_and_ingest_completes() {
    let mut config = RunawayConfig::small(true);
    // A client this slow holds the join's memory for over 20 s: ingest reaches the wall long
    // before the query could end on its own, however loaded the machine.
    config.client_delay = Duration::from_millis(100);
    let report = run_runaway(config).await.expect("the scenario starts");
    println!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    assert_eq!(report.aborts, 1);
    let QueryOutcome::Aborted(why) = &report.query else {
        panic!("{}", report.summary())
    };
    assert!(why.contains("runaway join"), "{why}");
    assert!(
        why.contains("to give the timeseries engine its floor back"),
        "{why}"
    );
    assert!(
        report
            .prometheus
            .contains(r#"memgov_engine_aborts_caused_total{engine="timeseries"} 1"#),
        "{}",
        report.prometheus
    );
}
