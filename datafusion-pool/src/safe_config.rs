//! Session settings that fit the budget a governed session is given: sorts' merge
//! reservations sized from the Query budget and the partition count instead of a fixed
//! 10 MiB per sort (see [`budget_aware_config`]).
//!
//! # Why the merge reservation, and why this size
//!
//! Every `SortExec` partition that may spill first reserves
//! `sort_spill_reservation_bytes` (unspillable) so that it can later merge what it spilled.
//! With `prefer_hash_join = false` a TPC-H plan holds two sorts per join per partition: Q7 at
//! 2 partitions holds about 20 of them, 200 MiB of merge reservations at DataFusion's 10 MiB
//! default, before a single row is sorted. Under a 64 MiB budget those reservations alone
//! refuse every sort ("Not enough memory to continue external sort").
//!
//! DataFusion 55 has no setting for the merge degree: its `MultiLevelMergeBuilder` merges as
//! many spill files at once as the merge reservation can seat (at least two) and writes the
//! result back as one sorted run, repeating until one pass is left. So a smaller reservation
//! costs merge passes, not answers; a larger one than the budget can hold costs the query.
//! We therefore give each sort `budget / (SORTS_PER_PARTITION × partitions)`, at least
//! [`MIN_MERGE_RESERVATION`] (a merge must seat two streams of one batch each; DataFusion
//! re-spills a run with halved batches when even that does not fit) and at most DataFusion's
//! default (a bigger reservation only saves merge passes the default already avoids).
//!
//! `sort_in_place_threshold_bytes` (1 MiB) is left alone: it is already below the smallest
//! merge reservation chosen here.
//!
//! # Why every repartition spill file holds one batch
//!
//! `max_spill_file_size_bytes` (128 MiB by default, used by `RepartitionExec` only) is set to
//! one byte, so that each batch a repartition spills finishes its own file. DataFusion 55.2's
//! spill pool (`SpillPoolReader`) reads only the file at the head of its queue and, while
//! that file is still open for writing, waits for its writer to add to it; but the writer
//! only writes when the repartition is refused memory, which under a tight budget may never
//! happen again, so the consumer waits forever with rows on disk (apache/datafusion#24883,
//! fixed after 55.2 by apache/datafusion#24891). TPC-H Q21 at SF 0.1 under 6 MiB hung this
//! way in `tests/tpch_safe.rs`. A finished file is read to its end without waiting. The cost
//! is one small file (and its IPC header) per spilled batch, paid only when spilling, and
//! DataFusion's own tests run the spill pool at this setting.
//!
//! # Settings the user chose
//!
//! A value that differs from DataFusion's default is the user's choice and is kept. A
//! `SessionConfig` does not record whether a value was set, so a user who sets exactly the
//! default value gets the budget-aware one; set `10 MiB + 1` to pin it.
//!
//! The final aggregate's output phase, which cannot spill while it emits, is not a matter
//! of settings (no DataFusion 55 setting changes it): see [`crate::emit_headroom`].

use std::sync::Arc;

use datafusion::common::config::{ConfigNonZeroUsize, ExecutionOptions};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool};
use datafusion::prelude::SessionConfig;

/// How many sorts a plan is assumed to run at once in each partition, for sizing their merge
/// reservations: a sort-merge join holds two, and TPC-H's widest plans (Q7, Q8, Q21) chain
/// up to eight joins, of which about half are in flight at a time.
const SORTS_PER_PARTITION: usize = 8;
/// The smallest merge reservation [`budget_aware_config`] chooses.
pub(crate) const MIN_MERGE_RESERVATION: usize = 512 * 1024;

/// `config` with the memory settings of its sorts and aggregates fitted to `pool`'s budget.
/// Called by [`memory_safe_state`](crate::memory_safe_state).
///
/// The budget is `pool.memory_limit()` (the governed pool reports the Query engine's limit at
/// this moment); an unbounded or unknown pool leaves `config` as it is.
pub(crate) fn budget_aware_config(
    mut config: SessionConfig,
    pool: &Arc<dyn MemoryPool>,
) -> SessionConfig {
    let MemoryLimit::Finite(budget) = pool.memory_limit() else {
        return config;
    };
    let default = ExecutionOptions::default().sort_spill_reservation_bytes;
    let partitions = config.target_partitions().max(1);
    let execution = &mut config.options_mut().execution;
    if execution.sort_spill_reservation_bytes == default {
        execution.sort_spill_reservation_bytes = merge_reservation(budget, partitions).min(default);
    }
    if execution.max_spill_file_size_bytes == ExecutionOptions::default().max_spill_file_size_bytes
    {
        execution.max_spill_file_size_bytes = one_batch_per_spill_file();
    }
    config
}

/// The `max_spill_file_size_bytes` of a governed session: every batch a repartition spills
/// finishes its file (see the module doc: apache/datafusion#24883).
fn one_batch_per_spill_file() -> ConfigNonZeroUsize {
    ConfigNonZeroUsize::try_new(1).expect("1 is not zero")
}

/// The merge reservation of one sort partition under `budget` with `partitions` partitions
/// (before the cap at DataFusion's default).
fn merge_reservation(budget: usize, partitions: usize) -> usize {
    (budget / SORTS_PER_PARTITION.saturating_mul(partitions.max(1))).max(MIN_MERGE_RESERVATION)
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::{
        FairSpillPool, GreedyMemoryPool, UnboundedMemoryPool,
    };

    use super::*;

    const MIB: usize = 1024 * 1024;

    fn reservation(config: &SessionConfig) -> usize {
        config.options().execution.sort_spill_reservation_bytes
    }

    fn fitted(pool: impl MemoryPool + 'static, partitions: usize) -> SessionConfig {
        let pool: Arc<dyn MemoryPool> = Arc::new(pool);
        budget_aware_config(
            SessionConfig::new().with_target_partitions(partitions),
            &pool,
        )
    }

    #[test]
    fn merge_reservations_shrink_with_the_budget_and_grow_no_further_than_the_default() {
        assert_eq!(
            reservation(&fitted(GreedyMemoryPool::new(64 * MIB), 2)),
            4 * MIB
        );
        assert_eq!(
            reservation(&fitted(FairSpillPool::new(64 * MIB), 4)),
            2 * MIB
        );
        assert_eq!(
            reservation(&fitted(GreedyMemoryPool::new(1 << 30), 2)),
            10 * MIB
        );
        assert_eq!(
            reservation(&fitted(GreedyMemoryPool::new(2 * MIB), 16)),
            MIN_MERGE_RESERVATION
        );
    }

    #[test]
    fn a_pool_without_a_limit_and_a_users_own_value_are_left_alone() {
        assert_eq!(
            reservation(&fitted(UnboundedMemoryPool::default(), 2)),
            10 * MIB
        );
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(64 * MIB));
        let mine = SessionConfig::new().with_sort_spill_reservation_bytes(3 * MIB);
        assert_eq!(reservation(&budget_aware_config(mine, &pool)), 3 * MIB);
    }

    fn spill_file_size(config: &SessionConfig) -> usize {
        config.options().execution.max_spill_file_size_bytes.get()
    }

    #[test]
    fn repartition_spill_files_hold_one_batch_unless_the_user_chose_a_size() {
        assert_eq!(
            spill_file_size(&fitted(GreedyMemoryPool::new(64 * MIB), 2)),
            1
        );
        assert_eq!(
            spill_file_size(&fitted(UnboundedMemoryPool::default(), 2)),
            128 * MIB,
            "an unbounded pool leaves the session as it is"
        );
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(64 * MIB));
        let mut mine = SessionConfig::new();
        mine.options_mut().execution.max_spill_file_size_bytes =
            ConfigNonZeroUsize::try_new(MIB).unwrap();
        assert_eq!(spill_file_size(&budget_aware_config(mine, &pool)), MIB);
    }

    #[test]
    fn zero_partitions_do_not_divide_by_zero() {
        assert_eq!(
            merge_reservation(usize::MAX, 0),
            usize::MAX / SORTS_PER_PARTITION
        );
        assert_eq!(merge_reservation(0, usize::MAX), MIN_MERGE_RESERVATION);
    }
}
