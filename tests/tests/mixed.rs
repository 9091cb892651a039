//! The validation target, small: every engine within budget, RSS within the ceiling, all work done.

use tests::workload::{WorkloadConfig, run};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// One workload at a time: each checks the whole process's RSS against its own ceiling, and
/// its RSS monitor charges everything outside its books, so two at once would see each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_workload_keeps_every_budget_and_completes_all_work() {
    let _serial = SERIAL.lock().await;
    let report = run(WorkloadConfig::small()).await.expect("workload starts");
    println!("{}", report.summary());
    assert!(report.samples > 10, "the sampler must have sampled");
    assert!(report.passed(), "{}", report.summary());
    assert!(report.prometheus.contains("memgov_engine_reserved_bytes"));
}

/// The ceiling is lowered three times while the engines run, as a pod resize would: every
/// drop drains (the books end under the lowered ceiling), and all work still completes.
/// 128 MiB is below the run's peak booking (~90 MiB plus the RSS monitor's untracked charge)
/// yet above what the engines' floors and the process itself need.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_workload_completes_while_the_ceiling_drops() {
    let _serial = SERIAL.lock().await;
    let mut config = WorkloadConfig::small();
    config.drops = Some(tests::workload::CeilingDrops {
        to: governor_core::mib(128),
        count: 3,
    });
    let report = run(config).await.expect("workload starts");
    println!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    assert_eq!(report.drops.len(), 3);
    for d in &report.drops {
        assert_eq!(d.outcome.still_over, 0, "{d:?}");
        assert_eq!(d.to, governor_core::mib(128));
    }
    assert_eq!(report.ceiling_source, "configured");
    assert!(report.prometheus.contains("memgov_ceiling_changes_total 5"));
}

/// `--ceiling auto`: the ceiling is a share of what the environment allows, and the report
/// says where it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_workload_takes_its_ceiling_from_the_environment() {
    let _serial = SERIAL.lock().await;
    let mut config = WorkloadConfig::small();
    config.ceiling_from_environment = Some(0.9);
    let report = run(config).await.expect("workload starts");
    assert!(report.passed(), "{}", report.summary());
    assert!(
        ["cgroup_v2", "cgroup_v1", "physical"].contains(&report.ceiling_source.as_str()),
        "{}",
        report.ceiling_source
    );
}
