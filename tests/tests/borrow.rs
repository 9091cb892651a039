//! The borrowing scenario at test size: the governed pool completes more TPC-H queries than
//! DataFusion's pools sized to the Query engine's floor, never holds more than the ceiling
//! together with the other engines, and every waking engine gets its floor back.

use tests::borrow::{BorrowConfig, run_borrow};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowing_beats_a_static_split_and_gives_every_floor_back() {
    let report = run_borrow(BorrowConfig::small())
        .await
        .expect("the scenario starts");
    println!("{}", report.table());
    let total = |i: usize| report.runs[i].completed.0 + report.runs[i].completed.1;
    let governed = &report.runs[0];
    assert!(governed.name.starts_with("governed"));
    assert!(
        total(0) > total(1) && total(0) > total(2),
        "governed {} against Greedy {} and FairSpill {} at the Query floor",
        total(0),
        total(1),
        total(2)
    );
    assert_eq!(
        governed.floor_failures, 0,
        "a waking engine did not get its floor"
    );
    assert_eq!(governed.waits.len(), 2);
    assert!(
        governed.peak_held <= report.config.ceiling,
        "the governed run held {} against a ceiling of {}",
        governed.peak_held,
        report.config.ceiling
    );
}
