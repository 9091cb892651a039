//! Which unit of work to abort when a floor must come back and reclaim cannot give it: a
//! cost-aware choice, written as one formula.
//!
//! # The formula
//!
//! For a request of engine *R* short of `shortfall` bytes, every registered unit *v* of work is
//! a candidate unless
//!
//! * it belongs to *R* itself (aborting its own work cannot give *R* its floor back),
//! * it is flagged unrebuildable ([`WorkSpec::unrebuildable`]: CRDT documents, acknowledged
//!   but unflushed timeseries points — state whose loss is data loss, not lost work),
//! * it is already aborted or holds nothing, or
//! * its engine holds no more than its own floor: a floor is never taken from its owner, only
//!   memory an engine borrowed is taken back.
//!
//! Among the candidates the victim is the one with the smallest key, compared left to right:
//!
//! ```text
//! useful(v) = min(held(v), borrowed(engine(v)))        bytes its abort gives back to lenders
//! lost(v)   = redo_cost(v)  if the owner gave one      (a vector index build: its rebuild time)
//!             age(v)        otherwise                   (time since it registered: work done)
//! key(v)    = ( useful(v) < shortfall,                  prefer one abort that frees enough alone
//!               priority(v),                            then the lowest priority
//!               lost(v),                                then the least work lost
//!               −useful(v),                             then the most memory back
//!               id(v) )                                 then the oldest registration (stable)
//! ```
//!
//! So a unit whose abort alone covers the shortfall is always preferred to several smaller
//! aborts (each of which throws work away), and within that group priority decides before cost.
//! When nobody frees enough alone, the ladder aborts the best by the same key and, once its
//! memory is back, asks again.
//!
//! # Compared with peers
//!
//! * **Velox's arbitrator** aborts the youngest query in the lowest-priority group and the
//!   largest capacity bucket. Size is bucketed and decides before age, so a huge low-priority
//!   query is killed even when a small one would have done, and priority alone shields huge
//!   queries (the complaints behind its badness-score proposals). Here size only matters as
//!   "frees enough alone or not", and what is weighed within a priority is the work lost.
//! * **ClickHouse's overcommit tracker** cancels the query with the highest usage / soft-limit
//!   ratio: cheap to compute, blind to priority and to how long the query has run, and hard
//!   for users to follow. Here the choice and its key are reported in the error
//!   ([`VictimChoice`]'s `Display`).
//! * Neither weighs what a victim costs to redo: a batch index build that ran for an hour
//!   looks young to Velox and small to ClickHouse. Its owner's `redo_cost` hint makes it
//!   expensive here.
//!
//! [`WorkSpec::unrebuildable`]: crate::WorkSpec::unrebuildable

use std::fmt;
use std::time::Duration;

use crate::engine::{EngineId, human_bytes};
use crate::work::WorkRef;

/// One registered unit as the victim choice sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) unit: WorkRef,
    pub(crate) priority: u8,
    pub(crate) held: usize,
    /// What the unit's engine holds above its floor.
    pub(crate) engine_borrowed: usize,
    pub(crate) lost: Duration,
    pub(crate) unrebuildable: bool,
    pub(crate) aborted: bool,
}

/// The unit chosen for abort and the figures that chose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VictimChoice {
    /// The unit aborted.
    pub victim: WorkRef,
    /// Its priority (lower is aborted first).
    pub priority: u8,
    /// Bytes it held.
    pub held: usize,
    /// Bytes its abort gives back to lenders: its held bytes, at most what its engine borrowed.
    pub useful: usize,
    /// Bytes the requester still needed.
    pub shortfall: usize,
    /// The work its abort throws away: its redo-cost hint, or its age.
    pub lost: Duration,
    /// Candidates it was chosen from (itself included).
    pub candidates: usize,
}

impl VictimChoice {
    /// True when this abort alone covers the shortfall.
    pub fn frees_enough(&self) -> bool {
        self.useful >= self.shortfall
    }
}

impl fmt::Display for VictimChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (score: {} {} of the {} needed, priority {}, work lost {:.1?}, chosen from {} candidate{})",
            self.victim,
            if self.frees_enough() {
                "frees enough alone:"
            } else {
                "frees only"
            },
            human_bytes(self.useful),
            human_bytes(self.shortfall),
            self.priority,
            self.lost,
            self.candidates,
            if self.candidates == 1 { "" } else { "s" }
        )
    }
}

/// Why a unit is not a candidate, or `None` when it is one.
fn excluded(c: &Candidate, requester: EngineId) -> Option<&'static str> {
    if c.unit.engine == requester {
        Some("belongs to the requesting engine")
    } else if c.unrebuildable {
        Some("holds state that cannot be rebuilt")
    } else if c.aborted {
        Some("already aborted")
    } else if c.held == 0 {
        Some("holds nothing")
    } else if c.engine_borrowed == 0 {
        Some("its engine is within its floor")
    } else {
        None
    }
}

/// Chooses the victim for `requester`, short of `shortfall` bytes, or says why there is none.
pub(crate) fn choose(
    candidates: &[Candidate],
    requester: EngineId,
    shortfall: usize,
) -> Result<VictimChoice, String> {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| excluded(c, requester).is_none())
        .collect();
    let useful = |c: &Candidate| c.held.min(c.engine_borrowed);
    let Some(best) = eligible.iter().min_by(|a, b| {
        let key = |c: &Candidate| {
            (
                useful(c) < shortfall,
                c.priority,
                c.lost,
                std::cmp::Reverse(useful(c)),
                c.unit.id,
            )
        };
        key(a).cmp(&key(b))
    }) else {
        return Err(no_candidate(candidates, requester));
    };
    Ok(VictimChoice {
        victim: best.unit.clone(),
        priority: best.priority,
        held: best.held,
        useful: useful(best),
        shortfall,
        lost: best.lost,
        candidates: eligible.len(),
    })
}

/// Says, unit by unit, why nobody could be aborted.
fn no_candidate(candidates: &[Candidate], requester: EngineId) -> String {
    if candidates.is_empty() {
        return "no unit of work is registered with an abort handle".into();
    }
    let reasons: Vec<String> = candidates
        .iter()
        .filter_map(|c| excluded(c, requester).map(|why| format!("{} {why}", c.unit)))
        .collect();
    format!("no registered unit may be aborted: {}", reasons.join("; "))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::engine::mib;

    fn unit(id: u64, engine: EngineId, held: usize) -> Candidate {
        Candidate {
            unit: WorkRef {
                id,
                engine,
                label: format!("u{id}").into(),
            },
            priority: 10,
            held,
            engine_borrowed: mib(1000),
            lost: Duration::from_secs(1),
            unrebuildable: false,
            aborted: false,
        }
    }

    fn pick(candidates: &[Candidate], shortfall: usize) -> u64 {
        choose(candidates, EngineId::Timeseries, shortfall)
            .expect("a victim")
            .victim
            .id
    }

    #[test]
    fn one_that_frees_enough_alone_beats_a_lower_priority_one_that_does_not() {
        let mut small = unit(1, EngineId::Query, mib(8));
        small.priority = 0;
        let big = unit(2, EngineId::Query, mib(64));
        assert_eq!(pick(&[small, big], mib(32)), 2);
    }

    #[test]
    fn lower_priority_goes_first_among_those_that_free_enough() {
        let mut low = unit(1, EngineId::Query, mib(40));
        low.priority = 1;
        low.lost = Duration::from_hours(1);
        let high = unit(2, EngineId::Query, mib(40));
        assert_eq!(pick(&[high, low], mib(32)), 1);
    }

    #[test]
    fn among_equals_the_least_work_lost_goes_first() {
        let mut old = unit(1, EngineId::Query, mib(40));
        old.lost = Duration::from_mins(10);
        let mut young = unit(2, EngineId::Query, mib(40));
        young.lost = Duration::from_millis(50);
        assert_eq!(pick(&[old, young], mib(32)), 2);
    }

    #[test]
    fn a_vector_index_build_costs_its_rebuild_time() {
        // The build registered a moment ago but would take ten minutes to redo; the query has
        // run for a minute. Age alone would pick the build.
        let mut build = unit(1, EngineId::Vector, mib(64));
        build.lost = Duration::from_mins(10);
        let mut query = unit(2, EngineId::Query, mib(64));
        query.lost = Duration::from_mins(1);
        assert_eq!(pick(&[build, query], mib(32)), 2);
    }

    #[test]
    fn a_floor_is_never_taken_from_its_owner() {
        let mut within_floor = unit(1, EngineId::Vector, mib(64));
        within_floor.engine_borrowed = 0;
        within_floor.priority = 0;
        let borrower = unit(2, EngineId::Query, mib(64));
        assert_eq!(pick(&[within_floor.clone(), borrower], mib(32)), 2);
        let err = choose(&[within_floor], EngineId::Timeseries, mib(32)).unwrap_err();
        assert!(err.contains("within its floor"), "{err}");
    }

    #[test]
    fn only_borrowed_bytes_count_towards_the_shortfall() {
        // Holds 64 MiB but its engine borrowed only 8: its abort gives lenders 8 MiB.
        let mut mostly_floor = unit(1, EngineId::Vector, mib(64));
        mostly_floor.engine_borrowed = mib(8);
        mostly_floor.priority = 0;
        let borrower = unit(2, EngineId::Query, mib(40));
        assert_eq!(pick(&[mostly_floor, borrower], mib(32)), 2);
    }

    #[test]
    fn unrebuildable_state_is_never_a_victim() {
        let mut doc = unit(1, EngineId::Crdt, mib(64));
        doc.unrebuildable = true;
        doc.priority = 0;
        let err = choose(&[doc.clone()], EngineId::Timeseries, mib(32)).unwrap_err();
        assert!(err.contains("cannot be rebuilt"), "{err}");
        let query = unit(2, EngineId::Query, mib(8));
        assert_eq!(pick(&[doc, query], mib(32)), 2);
    }

    #[test]
    fn the_requesters_own_work_and_empty_or_aborted_units_are_skipped() {
        let own = unit(1, EngineId::Timeseries, mib(64));
        let empty = unit(2, EngineId::Query, 0);
        let mut aborted = unit(3, EngineId::Query, mib(64));
        aborted.aborted = true;
        let err = choose(&[own, empty, aborted], EngineId::Timeseries, mib(1)).unwrap_err();
        assert!(err.contains("requesting engine"), "{err}");
        assert!(err.contains("holds nothing"), "{err}");
        assert!(err.contains("already aborted"), "{err}");
        assert!(
            choose(&[], EngineId::Timeseries, 1)
                .unwrap_err()
                .contains("no unit of work is registered")
        );
    }

    #[test]
    fn when_nobody_frees_enough_the_best_by_the_same_key_goes_and_the_choice_explains_itself() {
        let mut a = unit(1, EngineId::Query, mib(8));
        a.priority = 5;
        let b = unit(2, EngineId::Query, mib(16));
        let choice = choose(&[a, b], EngineId::Timeseries, mib(32)).expect("a victim");
        assert_eq!(choice.victim.id, 1);
        assert!(!choice.frees_enough());
        let text = choice.to_string();
        assert!(text.contains("query unit 'u1'"), "{text}");
        assert!(
            text.contains("frees only 8.0 MiB of the 32.0 MiB needed"),
            "{text}"
        );
        assert!(text.contains("priority 5"), "{text}");
        assert!(text.contains("2 candidates"), "{text}");
    }
}
