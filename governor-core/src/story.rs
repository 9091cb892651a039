//! Explainable failures: the [`Story`] a timeout or an abort carries, and the bounded history of
//! recent reclaim calls it is told from.
//!
//! A person on call who reads "timeseries waited 2 s for 32 MiB" learns nothing they can act
//! on. What they need is what the governor saw: who holds what, who has borrowed from whom,
//! which reclaims were tried with what result and how long each took, and, when work was
//! aborted, which unit was chosen and why. A [`Story`] is that, taken when the request gives up
//! (or a victim is aborted), and it travels in the error ([`MemError::Timeout`],
//! [`MemError::Aborted`]) and in the `tracing` event logged with it.
//!
//! Reclaim calls are remembered in a ring of the last [`HISTORY_CAPACITY`] records
//! ([`MemoryGovernor::recent_reclaims`]), written by the reclaim plan as each call ends (or is
//! abandoned at the reclaim timeout). A story holds the records made since its request began,
//! so a request that waited long on a busy governor reports at most the newest ones; the ring
//! costs nothing on the reservation path.
//!
//! [`MemError::Timeout`]: crate::MemError::Timeout
//! [`MemError::Aborted`]: crate::MemError::Aborted

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::engine::{EngineId, human_bytes};
use crate::governor::MemoryGovernor;
use crate::victim::VictimChoice;

/// Reclaim calls the governor remembers (the oldest is forgotten first).
pub const HISTORY_CAPACITY: usize = 64;

/// One reclaimer call, as the reclaim plan saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimRecord {
    /// The engine whose reclaimer was asked.
    pub engine: EngineId,
    /// Bytes it was asked for.
    pub asked: usize,
    /// Bytes the books show came back, or why the call failed (in words).
    pub result: Result<usize, String>,
    /// How long the call took (until the plan stopped waiting for it).
    pub elapsed: Duration,
    /// When the call ended.
    pub(crate) at: Instant,
}

impl fmt::Display for ReclaimRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} asked for {} → ",
            self.engine,
            human_bytes(self.asked)
        )?;
        match &self.result {
            Ok(freed) => write!(f, "freed {}", human_bytes(*freed))?,
            Err(reason) => write!(f, "failed ({reason})")?,
        }
        write!(f, " in {:.1?}", self.elapsed)
    }
}

/// The bounded ring of recent reclaim calls.
#[derive(Debug, Default)]
pub(crate) struct History {
    records: Mutex<VecDeque<ReclaimRecord>>,
}

impl History {
    pub(crate) fn push(&self, record: ReclaimRecord) {
        let mut records = self.records.lock();
        if records.len() == HISTORY_CAPACITY {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The records of calls that ended at or after `since`, oldest first.
    pub(crate) fn since(&self, since: Instant) -> Vec<ReclaimRecord> {
        self.records
            .lock()
            .iter()
            .filter(|r| r.at >= since)
            .cloned()
            .collect()
    }
}

/// One engine's figures in a story.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLine {
    /// The engine.
    pub engine: EngineId,
    /// Bytes its live tokens hold.
    pub reserved: usize,
    /// Its guaranteed floor.
    pub floor: usize,
    /// Its limit.
    pub limit: usize,
    /// Whether a reclaimer is registered for it.
    pub has_reclaimer: bool,
    /// Units of work registered for it that could be aborted (not flagged unrebuildable).
    pub abortable_units: usize,
}

impl EngineLine {
    /// Bytes held above the floor: borrowed from other engines' idle floors.
    pub fn borrowed(&self) -> usize {
        self.reserved.saturating_sub(self.floor)
    }

    /// Bytes of the floor the engine does not use: what it lends.
    pub fn idle_floor(&self) -> usize {
        self.floor.saturating_sub(self.reserved)
    }
}

/// What the governor saw when a request failed or a victim was aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Story {
    /// The engine that asked.
    pub requester: EngineId,
    /// Bytes it asked for.
    pub requested: usize,
    /// Whether the request was entitled to memory (within its floor, lent out): only an
    /// entitled request may abort work.
    pub entitled: bool,
    /// The global ceiling.
    pub ceiling: usize,
    /// Memory held outside any reservation, charged against the ceiling.
    pub untracked: usize,
    /// Every configured engine, or one holding memory, in ledger order.
    pub engines: Vec<EngineLine>,
    /// Reclaim calls that ended while the request waited, oldest first.
    pub reclaims: Vec<ReclaimRecord>,
    /// The victim aborted for the request, with its score.
    pub victim: Option<VictimChoice>,
    /// Why no victim was aborted, when none was.
    pub no_victim: Option<String>,
}

impl MemoryGovernor {
    /// The last [`HISTORY_CAPACITY`] reclaim calls, oldest first.
    pub fn recent_reclaims(&self) -> Vec<ReclaimRecord> {
        self.history.records.lock().iter().cloned().collect()
    }

    /// A story of the books as they are now, for a request of `requested` bytes by
    /// `requester` that began at `since`.
    pub(crate) fn story(&self, requester: EngineId, requested: usize, since: Instant) -> Story {
        let units = self.work.abortable_per_engine();
        let engines = EngineId::ALL
            .iter()
            .filter(|&&e| self.is_configured(e) || self.reserved(e) > 0)
            .map(|&engine| EngineLine {
                engine,
                reserved: self.reserved(engine),
                floor: self.floor(engine),
                limit: self.limit(engine),
                has_reclaimer: self.reclaimers.has(engine),
                abortable_units: units[engine.index()],
            })
            .collect();
        Story {
            requester,
            requested,
            entitled: false,
            ceiling: self.ceiling(),
            untracked: self.untracked() + self.total_engine_untracked(),
            engines,
            reclaims: self.history.since(since),
            victim: None,
            no_victim: None,
        }
    }
}

impl fmt::Display for Story {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let requester = self.engines.iter().find(|e| e.engine == self.requester);
        if let Some(line) = requester {
            write!(
                f,
                "{} holds {} of its {} floor ({} limit)",
                line.engine,
                human_bytes(line.reserved),
                human_bytes(line.floor),
                human_bytes(line.limit)
            )?;
        }
        if self.entitled {
            f.write_str(", so the request was entitled to its floor")?;
        } else {
            f.write_str(
                ", so the request was not entitled (past its floor): no work is aborted for it",
            )?;
        }
        let held: usize = self.engines.iter().map(|e| e.reserved).sum();
        write!(
            f,
            "; ceiling {}: {} reserved, {} untracked",
            human_bytes(self.ceiling),
            human_bytes(held),
            human_bytes(self.untracked)
        )?;
        f.write_str("; holders: ")?;
        let mut holders: Vec<&EngineLine> =
            self.engines.iter().filter(|e| e.reserved > 0).collect();
        holders.sort_by(|a, b| b.reserved.cmp(&a.reserved).then(a.engine.cmp(&b.engine)));
        if holders.is_empty() {
            f.write_str("nobody")?;
        }
        for (i, e) in holders.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(
                f,
                "{} {} (floor {})",
                e.engine,
                human_bytes(e.reserved),
                human_bytes(e.floor)
            )?;
        }
        let borrowers: Vec<&EngineLine> =
            self.engines.iter().filter(|e| e.borrowed() > 0).collect();
        let lenders: Vec<&EngineLine> =
            self.engines.iter().filter(|e| e.idle_floor() > 0).collect();
        if borrowers.is_empty() {
            f.write_str("; nobody borrowed")?;
        } else {
            f.write_str("; borrowed: ")?;
            for (i, e) in borrowers.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(
                    f,
                    "{} {} above its floor ({}, {} abortable unit{})",
                    e.engine,
                    human_bytes(e.borrowed()),
                    if e.has_reclaimer {
                        "has a reclaimer"
                    } else {
                        "no reclaimer"
                    },
                    e.abortable_units,
                    if e.abortable_units == 1 { "" } else { "s" }
                )?;
            }
            f.write_str(" from the idle floors of ")?;
            if lenders.is_empty() {
                f.write_str("nobody (the common memory above the floors)")?;
            }
            for (i, e) in lenders.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{} {}", e.engine, human_bytes(e.idle_floor()))?;
            }
        }
        if self.reclaims.is_empty() {
            f.write_str("; no reclaim call ended while it waited")?;
        } else {
            f.write_str("; reclaims tried: ")?;
            write_reclaims(f, &self.reclaims)?;
        }
        if let Some(victim) = &self.victim {
            write!(f, "; aborted {victim}")?;
        } else if let Some(why) = &self.no_victim {
            write!(f, "; no work aborted: {why}")?;
        }
        Ok(())
    }
}

/// Groups of reclaim calls shown in a story's text at most; older groups are counted.
const SHOWN_GROUPS: usize = 8;

/// Writes `records`, runs of the same call (engine, bytes asked, result) folded into one entry
/// with a count and the range of durations: a waiter re-asks every few milliseconds, and a
/// story of fifty identical lines hides the one that differs.
fn write_reclaims(f: &mut fmt::Formatter<'_>, records: &[ReclaimRecord]) -> fmt::Result {
    let mut groups: Vec<(&ReclaimRecord, usize, Duration, Duration)> = Vec::new();
    for r in records {
        match groups.last_mut() {
            Some((first, count, min, max))
                if first.engine == r.engine
                    && first.asked == r.asked
                    && first.result == r.result =>
            {
                *count += 1;
                *min = (*min).min(r.elapsed);
                *max = (*max).max(r.elapsed);
            }
            _ => groups.push((r, 1, r.elapsed, r.elapsed)),
        }
    }
    let hidden = groups.len().saturating_sub(SHOWN_GROUPS);
    if hidden > 0 {
        let calls: usize = groups[..hidden].iter().map(|g| g.1).sum();
        write!(
            f,
            "{calls} earlier call{}, then ",
            if calls == 1 { "" } else { "s" }
        )?;
    }
    for (i, (r, count, min, max)) in groups[hidden..].iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        if *count == 1 {
            write!(f, "{r}")?;
        } else {
            write!(f, "{} asked for {} → ", r.engine, human_bytes(r.asked))?;
            match &r.result {
                Ok(freed) => write!(f, "freed {}", human_bytes(*freed))?,
                Err(reason) => write!(f, "failed ({reason})")?,
            }
            write!(f, " ×{count} in {min:.1?}–{max:.1?} each")?;
        }
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::engine::mib;

    fn record(engine: EngineId, result: Result<usize, String>, ms: u64) -> ReclaimRecord {
        ReclaimRecord {
            engine,
            asked: mib(8),
            result,
            elapsed: Duration::from_millis(ms),
            at: Instant::now(),
        }
    }

    #[test]
    fn repeated_calls_fold_and_old_groups_are_counted() {
        let mut story = Story {
            requester: EngineId::Timeseries,
            requested: mib(8),
            entitled: true,
            ceiling: mib(64),
            untracked: 0,
            engines: vec![],
            reclaims: vec![
                record(EngineId::Query, Ok(0), 1),
                record(EngineId::Query, Ok(0), 3),
                record(EngineId::Vector, Err("hung".into()), 200),
            ],
            victim: None,
            no_victim: Some("nobody registered".into()),
        };
        let text = story.to_string();
        assert!(
            text.contains("query asked for 8.0 MiB → freed 0 B ×2 in 1.0ms–3.0ms each, vector asked for 8.0 MiB → failed (hung) in 200.0ms"),
            "{text}"
        );
        assert!(
            text.contains("no work aborted: nobody registered"),
            "{text}"
        );
        story.reclaims = (0..20)
            .map(|i| {
                record(
                    if i % 2 == 0 {
                        EngineId::Query
                    } else {
                        EngineId::Vector
                    },
                    Ok(0),
                    1,
                )
            })
            .collect();
        let text = story.to_string();
        assert!(text.contains("12 earlier calls, then "), "{text}");
    }

    #[test]
    fn the_ring_keeps_the_newest_records() {
        let history = History::default();
        let start = Instant::now();
        for i in 0..HISTORY_CAPACITY + 5 {
            history.push(record(EngineId::Query, Ok(i), 0));
        }
        let kept = history.since(start);
        assert_eq!(kept.len(), HISTORY_CAPACITY);
        assert_eq!(kept[0].result, Ok(5));
    }
}
