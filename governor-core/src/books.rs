//! The governor's books: the ledger with its counters and pressure signals, which is all a
//! [`ReservationToken`] needs.
//!
//! Tokens keep the books alive, not the whole [`MemoryGovernor`]: a token holds a counted
//! [`BooksHandle`](crate::handle::BooksHandle), so when the last `Arc<MemoryGovernor>` goes,
//! the reclaim runtime, reclaimers and registries go with it, while tokens still alive keep
//! giving their bytes back into a ledger nobody else reads. Everything a token does (admit,
//! book resident memory, give back, name the culprit of a denial, refresh pressure) lives here.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use crate::config::GovernorConfig;
use crate::engine::EngineId;
use crate::error::{Holders, MemError};
use crate::governor::MemoryGovernor;
use crate::handle::BooksHandle;
use crate::ledger::{Denial, EngineLedger, Ledger, NodeLedger};
use crate::node::thread_numa_node;
use crate::pressure::{PressureLevel, PressureSignal};
use crate::reservation::ReservationToken;

/// Counters kept per engine for metrics; touched only on slow paths.
#[derive(Debug, Default)]
pub(crate) struct EngineCounters {
    pub(crate) rejections: AtomicU64,
    pub(crate) reclaim_requests: AtomicU64,
    pub(crate) reclaimed_bytes: AtomicU64,
    pub(crate) reclaim_failures: AtomicU64,
    /// Times a reclaimer of this engine was quarantined for unbacked claims.
    pub(crate) reclaim_quarantines: AtomicU64,
    pub(crate) forced_bytes: AtomicU64,
    /// Reclaim calls whose memory the books saw come back (more than nothing).
    pub(crate) reclaim_freed: AtomicU64,
    /// Reclaim calls that answered but gave nothing back the books could see.
    pub(crate) reclaim_empty: AtomicU64,
    /// Units of work of this engine aborted (by the ladder or their owners).
    pub(crate) aborts: AtomicU64,
    /// Units of other engines aborted to give this engine its floor back.
    pub(crate) aborts_caused: AtomicU64,
    /// Bytes async `reserve` calls of this engine are waiting for right now (demand signal).
    pub(crate) waiting_bytes: AtomicUsize,
}

static NEXT_THREAD_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Each thread gets its own shard index, round-robin, on first use. A `const` cell keeps
    /// the lookup to one TLS read on the hot path (no lazy-init check).
    static THREAD_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// The calling thread's shard index (reduced modulo the shard count by the ledger).
#[inline]
pub(crate) fn thread_shard() -> usize {
    THREAD_SHARD.with(|s| {
        let shard = s.get();
        if shard == usize::MAX {
            let assigned = NEXT_THREAD_SHARD.fetch_add(1, Ordering::Relaxed);
            s.set(assigned);
            assigned
        } else {
            shard
        }
    })
}

/// A token whose bytes count against no NUMA node (node ceilings off, or a node without a row).
pub(crate) const NO_NODE: u16 = u16::MAX;

/// The ledger and what is counted and signalled with it.
#[derive(Debug)]
pub(crate) struct Books {
    pub(crate) config: GovernorConfig,
    pub(crate) configured: [bool; EngineId::COUNT],
    pub(crate) ledger: Ledger,
    /// Per-node books when the configuration bounds NUMA nodes.
    pub(crate) nodes: Option<NodeLedger>,
    pub(crate) counters: [EngineCounters; EngineId::COUNT],
    pub(crate) global_rejections: AtomicU64,
    pub(crate) engine_pressure: [PressureSignal; EngineId::COUNT],
    pub(crate) global_pressure: PressureSignal,
    /// The least global level the environment (the kernel's pressure stall information, OOM
    /// events) asks for; the books' own level is raised to it, never lowered by it.
    pub(crate) environment_pressure: std::sync::atomic::AtomicU8,
    /// Woken when memory comes back while async reservations wait.
    pub(crate) released: Notify,
    /// The governor these books belong to, for `ReservationToken::governor`.
    pub(crate) owner: Weak<MemoryGovernor>,
}

impl Books {
    pub(crate) fn new(config: GovernorConfig, owner: Weak<MemoryGovernor>) -> Self {
        let budgets: Vec<(usize, usize)> = config
            .engines
            .iter()
            .map(|b| b.map_or((0, 0), |b| (b.limit(), b.floor())))
            .collect();
        let ledger = Ledger::new(config.ceiling, &budgets, config.shards);
        let configured = std::array::from_fn(|i| config.engines[i].is_some());
        Self {
            configured,
            ledger,
            nodes: NodeLedger::new(&config.node_ceilings, config.shards),
            counters: Default::default(),
            global_rejections: AtomicU64::new(0),
            engine_pressure: std::array::from_fn(|_| PressureSignal::new()),
            global_pressure: PressureSignal::new(),
            environment_pressure: std::sync::atomic::AtomicU8::new(PressureLevel::Normal as u8),
            released: Notify::new(),
            owner,
            config,
        }
    }

    pub(crate) fn row(&self, engine: EngineId) -> &EngineLedger {
        self.ledger.engine(engine.index())
    }

    pub(crate) fn configured_row(&self, engine: EngineId) -> Result<&EngineLedger, MemError> {
        if self.configured[engine.index()] {
            Ok(self.row(engine))
        } else {
            Err(MemError::UnknownEngine { engine })
        }
    }

    /// A new token of `bytes` for `engine`: bytes and handle come out of the thread's shard in
    /// one step when it has both.
    pub(crate) fn new_token(
        self: &Arc<Self>,
        engine: EngineId,
        node: u16,
        bytes: usize,
    ) -> Result<ReservationToken, MemError> {
        let row = self.configured_row(engine)?;
        self.refuse_impossible(engine, node, bytes)?;
        self.grant_node(engine, node, bytes)?;
        match self.ledger.reserve_with_handle(row, thread_shard(), bytes) {
            Ok((moved, from_stash)) => {
                if moved {
                    self.refresh_pressure(engine);
                }
                Ok(ReservationToken::new(
                    BooksHandle::new(self, from_stash),
                    engine,
                    node,
                    bytes,
                ))
            }
            Err(denial) => {
                self.release_node(node, bytes);
                Err(self.deny(engine, bytes, denial))
            }
        }
    }

    /// Refuses, without touching the ledger, a request that no release could ever make fit:
    /// more than the engine's limit, the ceiling or the node's sub-ceiling. The ledger would
    /// refuse it too, but only after moving counters (and, for sizes near `usize::MAX`, only
    /// because its arithmetic is guarded); refusing here keeps the answer typed and exact and
    /// lets `reserve` fail at once instead of waiting out its timeout.
    pub(crate) fn refuse_impossible(
        &self,
        engine: EngineId,
        node: u16,
        bytes: usize,
    ) -> Result<(), MemError> {
        if self.could_ever_fit(engine, node, bytes) {
            return Ok(());
        }
        let row = self.row(engine);
        if bytes > row.limit() {
            let granted = row.granted();
            return Err(self.deny(
                engine,
                bytes,
                Denial::Limit {
                    granted,
                    limit: row.limit(),
                },
            ));
        }
        if bytes > self.ceiling() {
            return Err(self.deny(
                engine,
                bytes,
                Denial::Ceiling {
                    global: self.ledger.global(),
                },
            ));
        }
        if let Some(nodes) = self.nodes.as_ref().filter(|_| node != NO_NODE)
            && bytes > nodes.ceiling(usize::from(node))
        {
            return Err(self.deny_node(
                engine,
                usize::from(node),
                bytes,
                nodes.held(usize::from(node)),
            ));
        }
        Ok(())
    }

    /// True when `bytes` is within the engine's limit, the ceiling and `node`'s sub-ceiling,
    /// so that releases could one day make room for it.
    pub(crate) fn could_ever_fit(&self, engine: EngineId, node: u16, bytes: usize) -> bool {
        bytes <= self.row(engine).limit()
            && bytes <= self.ceiling()
            && self
                .nodes
                .as_ref()
                .filter(|_| node != NO_NODE)
                .is_none_or(|nodes| bytes <= nodes.ceiling(usize::from(node)))
    }

    /// The node a new token's bytes count against: `node` if given, else the calling thread's;
    /// [`NO_NODE`] when nodes are not bounded or the node has no row.
    pub(crate) fn node_for(&self, node: Option<usize>) -> u16 {
        let Some(nodes) = &self.nodes else {
            return NO_NODE;
        };
        let node = node.unwrap_or_else(thread_numa_node);
        if nodes.tracks(node) {
            // Rows exist only below `MAX_NUMA_NODES` (1024), so this fits.
            u16::try_from(node).unwrap_or(NO_NODE)
        } else {
            NO_NODE
        }
    }

    fn grant_node(&self, engine: EngineId, node: u16, bytes: usize) -> Result<(), MemError> {
        let Some(nodes) = self.nodes.as_ref().filter(|_| node != NO_NODE && bytes > 0) else {
            return Ok(());
        };
        let index = usize::from(node);
        nodes
            .grant(index, thread_shard(), bytes)
            .map_err(|reserved| self.deny_node(engine, index, bytes, reserved))
    }

    fn deny_node(
        &self,
        engine: EngineId,
        node: usize,
        requested: usize,
        reserved: usize,
    ) -> MemError {
        self.counters[engine.index()]
            .rejections
            .fetch_add(1, Ordering::Relaxed);
        let ceiling = self.nodes.as_ref().map_or(usize::MAX, |n| n.ceiling(node));
        let err = MemError::NodeCeilingExceeded {
            engine,
            node,
            requested,
            reserved,
            ceiling,
        };
        tracing::warn!(%engine, node, requested, reserved, ceiling, error = %err, "memory reservation denied");
        err
    }

    /// Gives back `bytes` a token held on `node`.
    pub(crate) fn release_node(&self, node: u16, bytes: usize) {
        if let Some(nodes) = self.nodes.as_ref().filter(|_| node != NO_NODE && bytes > 0) {
            nodes.release(usize::from(node), thread_shard(), bytes);
        }
    }

    /// A handle for one more token (`split`, `charge`): from the thread's stash if it has one.
    pub(crate) fn handle_for(self: &Arc<Self>, engine: EngineId) -> BooksHandle {
        let from_stash = self.row(engine).take_handle(thread_shard());
        BooksHandle::new(self, from_stash)
    }

    /// Admits `bytes` more for an existing token of `engine` on `node`.
    pub(crate) fn admit(&self, engine: EngineId, node: u16, bytes: usize) -> Result<(), MemError> {
        let row = self.configured_row(engine)?;
        self.refuse_impossible(engine, node, bytes)?;
        self.grant_node(engine, node, bytes)?;
        match self.ledger.reserve(row, thread_shard(), bytes) {
            Ok(moved) => {
                if moved {
                    self.refresh_pressure(engine);
                }
                Ok(())
            }
            Err(denial) => {
                self.release_node(node, bytes);
                Err(self.deny(engine, bytes, denial))
            }
        }
    }

    /// Books memory that is already resident, unchecked against the bounds (see
    /// `MemoryGovernor::charge`). Callers keep `bytes` within [`MAX_BYTES`](crate::MAX_BYTES).
    pub(crate) fn book_resident(&self, engine: EngineId, node: u16, bytes: usize) {
        debug_assert!(bytes <= crate::config::MAX_BYTES);
        if bytes == 0 {
            return;
        }
        if let Some(nodes) = self.nodes.as_ref().filter(|_| node != NO_NODE) {
            nodes.charge(usize::from(node), bytes);
        }
        self.ledger.charge(self.row(engine), bytes);
        self.counters[engine.index()]
            .forced_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let row = self.row(engine);
        if row.granted() > row.limit() {
            tracing::warn!(%engine, bytes, granted = row.granted(), limit = row.limit(), "resident memory booked past the engine limit (overcommit)");
        }
        self.refresh_pressure(engine);
    }

    /// Gives `bytes` of a live token on `node` back.
    pub(crate) fn give_back(&self, engine: EngineId, node: u16, bytes: usize) {
        self.release_node(node, bytes);
        let moved = self.ledger.release(self.row(engine), thread_shard(), bytes);
        self.finish_release(engine, 0, moved);
    }

    fn wake_waiters(&self) {
        if self.ledger.has_waiters() {
            self.released.notify_waiters();
        }
    }

    /// What is left to do after bytes went back to the shard: return trimmed credit, refresh
    /// pressure if the counters moved, wake waiters. A dropped token calls it only when its
    /// handle could not be stashed in the same step; it still owns the handle and offers it to
    /// the stash afterwards.
    pub(crate) fn finish_release(&self, engine: EngineId, trimmed: usize, moved: bool) {
        self.ledger.ungrant(self.row(engine), trimmed);
        if moved {
            self.refresh_pressure(engine);
        }
        self.wake_waiters();
    }

    pub(crate) fn deny(&self, engine: EngineId, requested: usize, denial: Denial) -> MemError {
        self.counters[engine.index()]
            .rejections
            .fetch_add(1, Ordering::Relaxed);
        let reserved = self.reserved(engine);
        let err = match denial {
            Denial::Limit { limit, .. } => MemError::BudgetExhausted {
                engine,
                requested,
                // The allocator drift charged to the engine takes room like a reservation.
                available: limit.saturating_sub(reserved + self.row(engine).untracked()),
                reserved,
                limit,
            },
            Denial::Ceiling { .. } => {
                self.global_rejections.fetch_add(1, Ordering::Relaxed);
                MemError::GlobalCeilingExceeded {
                    engine,
                    requested,
                    reserved: self.global_reserved() + self.untracked(),
                    ceiling: self.ceiling(),
                    top_holders: self.top_holders(),
                    untracked: self.untracked(),
                }
            }
        };
        tracing::warn!(%engine, requested, reserved, limit = self.row(engine).limit(), global = self.ledger.global(), ceiling = self.ceiling(), error = %err, "memory reservation denied");
        err
    }

    /// Engines holding memory, largest first.
    pub(crate) fn top_holders(&self) -> Holders {
        let mut holders: Vec<(EngineId, usize)> = EngineId::ALL
            .iter()
            .map(|&e| (e, self.reserved(e)))
            .filter(|&(_, bytes)| bytes > 0)
            .collect();
        holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Holders(holders)
    }

    pub(crate) fn refresh_pressure(&self, engine: EngineId) {
        let row = self.row(engine);
        let thresholds = self.config.thresholds;
        if self.configured[engine.index()] {
            // The level is computed inside the publish, from the books as they are then (see
            // `PressureSignal::publish_with`).
            let current =
                || PressureLevel::from_utilization(row.granted(), row.limit(), &thresholds);
            if let Some(previous) = self.engine_pressure[engine.index()].publish_with(current) {
                let level = self.engine_pressure[engine.index()].level();
                tracing::info!(%engine, from = %previous, to = %level, granted = row.granted(), limit = row.limit(), "engine pressure changed");
            }
        }
        self.refresh_global_pressure();
    }

    pub(crate) fn refresh_global_pressure(&self) {
        let current = || {
            let books = PressureLevel::from_utilization(
                self.ledger.global(),
                self.ceiling(),
                &self.config.thresholds,
            );
            books.max(PressureLevel::from_u8(
                self.environment_pressure.load(Ordering::Acquire),
            ))
        };
        if let Some(previous) = self.global_pressure.publish_with(current) {
            let level = self.global_pressure.level();
            tracing::info!(from = %previous, to = %level, global = self.ledger.global(), untracked = self.untracked(), ceiling = self.ceiling(), "global pressure changed");
        }
    }

    pub(crate) fn reserved(&self, engine: EngineId) -> usize {
        self.row(engine).reserved()
    }

    /// Bytes held by live tokens of all engines, from one reading of the ledger's global
    /// counter (see [`Ledger::reserved`]) rather than a sum of engine rows read one after
    /// another, which under concurrency could exceed the ceiling the ledger never passed.
    pub(crate) fn global_reserved(&self) -> usize {
        self.ledger.reserved()
    }

    pub(crate) fn ceiling(&self) -> usize {
        self.ledger.ceiling()
    }

    pub(crate) fn untracked(&self) -> usize {
        self.ledger.untracked()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use crate::{EngineBudget, EngineId, GovernorConfig, MemoryGovernor, kib, mib};

    fn governor() -> Arc<MemoryGovernor> {
        let config = GovernorConfig::builder()
            .global_ceiling(mib(64))
            .engine(EngineId::Query, EngineBudget::new(mib(32)))
            .reservation_shards(4)
            .build()
            .expect("valid config");
        MemoryGovernor::new(config).expect("governor")
    }

    /// Handles parked in stashes by dropped tokens do not keep the books alive once the
    /// governor is gone.
    #[test]
    fn books_are_freed_with_the_governor_when_no_token_lives() {
        let governor = governor();
        let books = Arc::downgrade(&governor.books);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        drop(governor.try_reserve(EngineId::Query, kib(4)).expect("room"));
                    }
                });
            }
        });
        assert!(books.upgrade().is_some());
        drop(governor);
        assert!(
            books.upgrade().is_none(),
            "stashed handles leaked the books"
        );
    }

    /// Tokens may outlive the governor, be split, merged and dropped on other threads; the
    /// books go with the last of them, exactly once.
    #[test]
    fn tokens_outlive_the_governor_and_free_the_books_last() {
        let governor = governor();
        let books = Arc::downgrade(&governor.books);
        let mut tokens: Vec<_> = (0..64)
            .map(|_| governor.try_reserve(EngineId::Query, kib(4)).expect("room"))
            .collect();
        let mut half = tokens.split_off(32);
        let split = half[0].split(kib(1)).expect("held");
        assert!(split.governor().is_some());
        drop(governor);
        assert!(split.governor().is_none(), "the governor is gone");
        assert!(books.upgrade().is_some(), "live tokens keep the books");
        let mut merged = tokens.pop().expect("token");
        merged.merge(split).expect("same books and engine");
        std::thread::scope(|s| {
            s.spawn(move || drop(tokens));
            s.spawn(move || {
                for mut token in half.drain(..) {
                    token
                        .try_grow(kib(1))
                        .expect("room in the dead governor's books");
                }
            });
        });
        assert!(books.upgrade().is_some(), "one token left");
        drop(merged);
        assert!(books.upgrade().is_none(), "the last token frees the books");
    }

    /// A token too large for a shard's credit bits goes straight back to the counters on
    /// drop, and pressure is refreshed after it (the handle is not parked in that step).
    #[test]
    fn a_huge_token_drops_through_the_counters_and_refreshes_pressure() {
        let tib = |n: usize| n << 40;
        let config = GovernorConfig::builder()
            .global_ceiling(tib(64))
            .engine(EngineId::Query, EngineBudget::new(tib(32)))
            .build()
            .expect("valid config");
        let governor = MemoryGovernor::new(config).expect("governor");
        let token = governor
            .try_reserve(EngineId::Query, tib(31))
            .expect("room");
        assert_eq!(
            governor.engine_pressure(EngineId::Query),
            crate::PressureLevel::Emergency
        );
        drop(token);
        assert_eq!(governor.reserved(EngineId::Query), 0);
        assert!(
            governor.granted(EngineId::Query) <= crate::mib(2),
            "at most idle credit"
        );
        assert_eq!(
            governor.engine_pressure(EngineId::Query),
            crate::PressureLevel::Normal
        );
    }
}
