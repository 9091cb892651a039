//! The memory governor as DataFusion's [`MemoryPool`]: queries get the Query engine's budget,
//! fairly, and never more.
//!
//! # The problem
//!
//! DataFusion asks a [`MemoryPool`] before its large operators (sorts, aggregates, join build
//! sides) buffer data; when the pool says no, a *spillable* operator writes to disk and tries
//! again, an *unspillable* one fails the query. The built-in pools have a fixed size and know
//! nothing of the rest of the process. In a multi-engine database the right size is not
//! fixed: it is the Query engine's budget in the [`MemoryGovernor`], which borrows memory that
//! idle engines are not using and gives it back when they need it, under one global ceiling.
//! The built-in policies also have known failure modes, measured on 55.2:
//! `GreedyMemoryPool` lets the first sort partition take everything so the second fails with
//! nothing to spill; `FairSpillPool` is not a hard limit (27–39 % over) and lets a competitor
//! take the merge reservation a spilling sort gave back for a moment.
//!
//! # The design
//!
//! ```text
//!  DataFusion operators                 GovernedMemoryPool                      MemoryGovernor
//!  ───────────────────                  ──────────────────                      ──────────────
//!  ExternalSorter[0] ─┐ reservations    one entry per MemoryConsumer id:
//!  ExternalSorter[0]' ┴──────────────►  ┌ name, can_spill, reserved, peak, ┐
//!                                       │ denials, overcommit              │   ReservationToken
//!  HashJoinInput[1] ─────────────────►  └ one ReservationToken ────────────┴──► (engine Query)
//!                                                                                     │
//!   try_grow(r, n): 1. policy: a spilling reservation within its fair share of what the
//!                      unspillable ones do not hold or are not owed; unspillable: always │
//!                   2. token.try_grow(n): Query limit and global ceiling, atomically ◄──┘
//!                   3. refused but entitled → other engines reclaim; this pool's spillers
//!                      above their shares are refused (they spill) while it waits on
//!                      releases, bounded by reclaim_wait → else ResourcesExhausted
//!   grow(n):        token.try_grow, else token.force_grow (booked as overcommit)
//!   shrink(n):      token.shrink; overcommit paid back first; waiters woken
//! ```
//!
//! * **Never worse than `FairSpillPool`.** The admission rule and the argument that no query
//!   `FairSpillPool` finishes at the same budget is failed by it — without relying on an
//!   operator that may never call the pool again — are in [`policy`]. In short: a spilling
//!   reservation gets at most `FairSpillPool`'s share (`(budget − unspillable) / registered
//!   spillers`, judged per reservation), less what sorts' merge reservations are owed, so
//!   the pool never lends one spiller's share to another; unspillable consumers get what
//!   `FairSpillPool` gives them. The two exceptions are bounded: a reservation holding
//!   nothing may take what the governor has, and one the share fell under (the budget
//!   shrank) may still grow by 1/32 of what it holds while nobody starves — the last resize
//!   of a final aggregate emitting its output, which cannot spill, no longer fails its query.
//! * **The budget is dynamic.** Every decision reads the governor: `budget = reserved(Query) +
//!   available(Query)`, the most the Query engine could hold at this instant. When other
//!   engines are idle it is the Query *limit*; when they hold their floors it shrinks. The
//!   governor's token is the only booking, so the Query engine never holds more than its
//!   limit (a hard limit, unlike `FairSpillPool`, which lets spillers overshoot) and the
//!   global ceiling holds.
//! * **Merges keep what they reserved.** A sort reserves `sort_spill_reservation_bytes` for
//!   its merge at its first batch, gives it back at the start of every spill and takes it
//!   again after, failing the query if it cannot. The pool learns each merge reservation's
//!   size from its first request and keeps it out of every spiller's share while it is owed
//!   — the headroom is what the plan actually reserves, not a fixed fraction (an optional
//!   extra fraction remains, 0 by default).
//! * **Reclaim and wait on events, not on the clock.** When the governor refuses a request
//!   the policy entitles, the pool asks engines that borrowed beyond their floors to give
//!   memory back ([`MemoryGovernor::reclaim_for_blocking`]); then, if this pool's spillers
//!   hold memory above their shares (or an unspillable consumer needs room they hold), it
//!   counts as starving, which makes each of them be refused on its next request (its cue to
//!   spill), and waits for their releases. The wait is bounded by
//!   [`reclaim_wait`](GovernedPoolBuilder::reclaim_wait) (5 s) only to limit the damage of a
//!   stuck plan, and is skipped on a current-thread runtime, where the holders cannot run
//!   while `try_grow` blocks.
//! * **Errors name the culprits.** `try_grow` fails with exactly
//!   `DataFusionError::ResourcesExhausted` (aggregates spill only on that variant), and the
//!   message names the consumer, the reason (fair share or the governor's refusal), the top
//!   consumers of the pool *and* the engines holding the ceiling.
//! * **Metrics.** Each consumer's reserved bytes, peak and denials (for a spiller, each denial
//!   is normally a spill) are published to [`MemoryGovernor::snapshot`] and so to its
//!   Prometheus text, aggregated by operator name to keep label sets bounded;
//!   [`GovernedMemoryPool::consumers`] and [`GovernedMemoryPool::stats`] give the per-id view.
//!
//! # Facts of DataFusion 55's trait this pool honours
//!
//! * `grow` is infallible and the reservation adds the bytes whatever the pool says, so the
//!   pool books them exactly (`force_grow`: visible as overcommit in the governor and in
//!   [`PoolStats::overcommit`]) and pays them back on `shrink`.
//! * `memory_limit()` returns `MemoryLimit::Finite(current Query limit)`: with `Unknown` the
//!   aggregate planner would pick streams that have no memory-limited path.
//! * `register`/`unregister` see each consumer once; `split`/`new_empty` reservations share
//!   that registration. Like `FairSpillPool`, the share is judged per reservation (an
//!   aggregate replaying its spills holds a merge and a table under one registration and
//!   needs both); while a consumer starves, each one is also judged as a whole.
//! * `shrink` beyond what a consumer holds (a caller bug) is clamped and counted in
//!   [`PoolStats::over_released`]; the books never underflow.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use datafusion::execution::runtime_env::RuntimeEnvBuilder;
//! use datafusion::prelude::{SessionConfig, SessionContext};
//! use datafusion_pool::GovernorExt;
//! use governor_core::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, mib};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let governor = MemoryGovernor::new(
//!     GovernorConfig::builder()
//!         .global_ceiling(mib(512))
//!         .engine(EngineId::Query, EngineBudget::new(mib(256)).with_floor(mib(64)))
//!         .engine(EngineId::Vector, EngineBudget::new(mib(256)).with_floor(mib(128)))
//!         .build()?,
//! )?;
//! let runtime = RuntimeEnvBuilder::new()
//!     .with_memory_pool(governor.pool())
//!     .build_arc()?;
//! let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
//!
//! let rows = tokio::runtime::Runtime::new()?.block_on(async {
//!     ctx.sql("SELECT v % 7 AS k, count(*) AS n FROM (SELECT unnest(range(0, 10000)) AS v) GROUP BY k")
//!         .await?
//!         .collect()
//!         .await
//! })?;
//! assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 7);
//! // The query's memory went back to the governor when it finished.
//! assert_eq!(governor.reserved(EngineId::Query), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # `SET datafusion.runtime.memory_limit`
//!
//! DataFusion handles this statement by building a new runtime whose pool is a
//! `TrackConsumersPool<GreedyMemoryPool>` of the given size (and `RESET` makes it unbounded):
//! the session silently leaves the governor, and its queries are then limited only by
//! that private number, outside the global ceiling. To keep the governor in charge:
//!
//! * run user SQL with statements disabled,
//!   `ctx.sql_with_options(sql, SQLOptions::new().with_allow_statements(false))`, and offer
//!   [`set_query_memory_limit`] instead, which parses the same syntax and moves the Query
//!   budget in the governor for every session at once;
//! * or check [`is_governed`]`(&ctx.runtime_env())` after running SQL you do not control.
//!
//! [`MemoryPool`]: datafusion::execution::memory_pool::MemoryPool
//! [`MemoryGovernor`]: governor_core::MemoryGovernor
//! [`MemoryGovernor::reclaim_for_blocking`]: governor_core::MemoryGovernor::reclaim_for_blocking
//! [`MemoryGovernor::snapshot`]: governor_core::MemoryGovernor::snapshot

mod consumers;
pub mod emit_headroom;
mod ext;
mod options;
pub mod policy;
mod pool;
mod query;
mod safe_config;
mod safe_state;
pub mod spilling_join;
mod wait;

pub use consumers::ConsumerMetrics;
pub use emit_headroom::{GovernedAggregateExec, GovernedAggregateRule};
pub use ext::{GovernorExt, is_governed, set_query_memory_limit};
pub use options::{
    DEFAULT_RECLAIM_WAIT, DEFAULT_SHARE_GRACE, DEFAULT_TOP_CONSUMERS, DEFAULT_UNSPILLABLE_HEADROOM,
    GovernedPoolBuilder, PoolOptions,
};
pub use pool::{GovernedMemoryPool, PoolStats};
pub use query::{GovernedQuery, GovernedQueryBuilder};
pub use safe_state::{SpillingJoinRule, memory_safe_state};
pub use spilling_join::SpillingHashJoinExec;

#[cfg(test)]
mod tests;
