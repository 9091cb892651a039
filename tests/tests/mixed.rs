//! The validation target, small: every engine within budget, RSS within the ceiling, all work done.

use tests::workload::{WorkloadConfig, run};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_workload_keeps_every_budget_and_completes_all_work() {
    let report = run(WorkloadConfig::small()).await.expect("workload starts");
    println!("{}", report.summary());
    assert!(report.samples > 10, "the sampler must have sampled");
    assert!(report.passed(), "{}", report.summary());
    assert!(report.prometheus.contains("memgov_engine_reserved_bytes"));
}
