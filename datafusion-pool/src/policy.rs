//! Who may have more memory: the admission rule of the governed pool, and why no query that
//! DataFusion's `FairSpillPool` finishes at the same budget is failed by it.
//!
//! # Notation
//!
//! At one instant: `B` is the budget (what the Query engine holds plus what the governor
//! would still grant it), `U` the bytes held by consumers that cannot spill, `S` the bytes
//! held by consumers that can, `n` the number of *registered* spilling consumers (every one
//! DataFusion registered and has not unregistered, idle or not), `|r|` the size of the
//! reservation `r` that asks for `a` more bytes. `K` is what is *kept* for unspillable
//! consumers that are known to need it soon: merge reservations of sorts that have reserved
//! before and gave their bytes back while spilling (they take them again right after), plus
//! bytes that unspillable consumers are waiting for now; and `H` the optional configured
//! headroom (0 by default).
//!
//! `FairSpillPool` of size `B` grants
//! * (F1) a spiller's request when `|r| + a ≤ (B − U) / n`;
//! * (F2) an unspillable request when `U + S + a ≤ B`.
//!
//! The governed pool grants
//! * (G1) a spiller's request when `|r| + a ≤ share = (B − max(U + K, H)) / n` and the
//!   governor's hard check `U + S + a ≤ B` passes;
//! * (G2) an unspillable request when the governor's hard check `U + S + a ≤ B` passes;
//! * (E) a spiller's request beyond its share when `|r| = 0`, if the governor's hard check
//!   passes (when it does not, the request waits in the slow path like an unspillable one).
//!
//! * (M) an unspillable request of a sort's merge reservation past its first reservation (a
//!   merge of spill files, which takes what it can and merges fewer files at once when
//!   refused) only while the free memory after it still covers the first reservations of the
//!   registered sorts that have not started (`sort_spill_reservation_bytes` each, learned
//!   from the first merge that reserved) and `K`.
//!
//! * (S) a spiller's request beyond its share when the share had already fallen under it
//!   (`|r| > share` before the request), if nobody starves, the governor grants it at once and
//!   the consumer's growth under (S) since it was last within its share stays within the
//!   *share grace* `g · |r|` (`g` = 1/32 by default, 0 turns (S) off).
//!
//! (M) is stricter than (F2) for one kind of request that adapts when refused; it keeps a
//! greedy merge from taking the reservation a later sort needs for its first batch, which
//! fails that sort outright (DataFusion's join matrix, row 2, did exactly that under every
//! pool now and then).
//!
//! (E) is the one grant FSP refuses. A reservation that holds nothing has nothing to spill, so
//! a refusal fails its query at once — a final aggregate whose first hash-table allocation is
//! larger than its share because many registered operators have not started yet
//! (apache/datafusion#22036; TPC-H Q16 at 8 MiB is one). Granting it risks at most that the
//! excess `a − share` is missing for a later request, and the slow path below takes that back
//! by refusing this consumer on its next request. Within one query the grant is therefore
//! never worse than FSP's refusal: the query FSP fails now could at worst fail later.
//!
//! (S) is the other. A refusal is a spiller's cue to spill, but a spiller that has entered a
//! phase where it cannot spill fails its query instead: DataFusion 55's final hash aggregate
//! materialises its whole output, then resizes its reservation from the table's estimate to
//! the batch's size (a few hundred KiB more on tens of MiB) with no spill fallback. Its share
//! had fallen under it because the budget shrank (the Query arena's own allocator drift is
//! charged to the engine, other engines took their floors back). FSP fails that query at a
//! fixed budget too. The grace is bounded — per consumer `g · |r|` until it is within its share
//! again, so the pool's spillers hold at most a fraction `g` more than they held when their
//! shares fell under them — never taken while a consumer is waiting, and never given through the slow path, so a spiller in grace
//! never makes anyone else spill or wait. A spiller still reading input that uses its grace is
//! refused a few batches later and spills then.
//!
//! # The argument
//!
//! 1. **No grant FSP would refuse, but (E) and (S).** `K, H ≥ 0` makes (G1) at least as strict as
//!    (F1), and (G2) is (F2). So no spiller that can spill ever holds more than
//!    `FairSpillPool` would let it hold in the same state; in particular the pool never lends
//!    an idle spiller's share to an active one that could have spilled instead. (The previous policy did, counting only *active* spillers and letting a spiller
//!    above its share keep memory "while nobody waits". Memory lent that way comes back only
//!    when the borrower calls the pool again, and a sort that has finished buffering never
//!    does: that is how a quiet `ExternalSorter` starved an aggregate and a sort's merge.)
//! 2. **Every FSP grant that fits the budget is ours.** If FSP grants and the result stays
//!    within `B`, the hard check passes; (G2) then grants. (G1) grants unless `K > 0` or
//!    `H > U`: while a sort's merge reservation is being re-taken or an unspillable consumer
//!    waits, spillers are held to the smaller share and spill instead. That is the one place
//!    where the pool is stricter than FSP, and it is in favour of a request FSP would fail
//!    (the re-taken merge reservation cannot spill).
//! 3. **An entitled request does not depend on a consumer that may never call again.** Say
//!    every spilling consumer holds at most `share` (each judged per reservation, as FSP
//!    does). Then `S ≤ n · share ≤ B − U − K`, so the free memory `B − U − S` covers `K` and,
//!    for every spiller, the rest of its own share. A within-share request of a one-reservation
//!    consumer therefore fits at once; so does every kept merge reservation. Holdings above a
//!    share appear only when the share shrinks under them: the budget falls (other engines
//!    take their floors back), `U` grows past `K`, a new spiller registers, or one consumer
//!    holds several reservations (an aggregate replaying its spills holds a merge and a
//!    table, each judged alone as FSP judges them). For those cases the pool does not rely
//!    on the holder: it asks the governor to reclaim from *other engines* (their reclaimers
//!    run on the governor's runtime, not on a DataFusion worker), and while a consumer is
//!    starving every consumer above its share (an (E) grant included) is refused on its next
//!    request (its cue to spill). Waiting is for events — a release in this pool, the end of a reclaim — and its
//!    bound ([`reclaim_wait`](crate::GovernedPoolBuilder::reclaim_wait)) only limits the
//!    damage of a stuck plan; it is skipped where the holders cannot run while we block (a
//!    current-thread runtime).
//!
//! **Where a hard limit cannot follow FSP.** FSP judges each reservation against a share and
//! never checks the total, so it sometimes finishes by passing its limit. Two operators that
//! cannot spill at the same moment — two final aggregates both replaying their spills, each
//! needing its table while its merge holds its share — can then both get their bytes under
//! FSP, while under a hard limit one of them waits for the other and, if neither yields
//! within `reclaim_wait`, fails. The tests keep their budgets clear of that corner and say
//! so where they do.
//!
//! What the pool keeps over FSP: the limit is hard (FSP lets spillers overshoot by judging each
//! reservation against a share of `B − U` without checking `S`), the budget follows the
//! governor (borrowing and the global ceiling), a kept merge reservation is not given away
//! while its sort spills, and denials name their culprits.

/// Consumers whose name starts with this are the merge reservations of DataFusion's
/// `ExternalSorter`: unspillable, taken at the sort's first batch (`sort_spill_reservation_bytes`),
/// given back at the start of every spill and taken again right after. DataFusion gives the
/// pool no other sign of that promise than the name.
pub(crate) const SORT_MERGE_PREFIX: &str = "ExternalSorterMerge";

/// What the share of every spilling consumer is computed from, at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Inputs {
    /// The Query engine's budget: its reservations plus what the governor would still grant.
    pub(crate) budget: usize,
    /// Bytes held by unspillable consumers (`U`).
    pub(crate) unspillable: usize,
    /// Bytes kept for unspillable consumers known to need them soon (`K`).
    pub(crate) kept: usize,
    /// The configured headroom in bytes (`H`); 0 when no unspillable consumer is registered.
    pub(crate) headroom: usize,
    /// Registered spilling consumers (`n`), at least the asking one.
    pub(crate) spillers: usize,
}

/// A spilling consumer's fair share and what it was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Share {
    /// The most one spilling reservation may hold (`share`).
    pub(crate) per_reservation: usize,
    /// What spilling consumers may hold together: `B − max(U + K, H)`.
    pub(crate) spillable_budget: usize,
    /// Registered spilling consumers it is divided by.
    pub(crate) spillers: usize,
    /// What is held or kept for unspillable consumers: `max(U + K, H)`.
    pub(crate) for_unspillable: usize,
}

impl Inputs {
    /// The share (G1) of every spilling reservation.
    pub(crate) fn share(self) -> Share {
        let for_unspillable = self
            .unspillable
            .saturating_add(self.kept)
            .max(self.headroom);
        let spillable_budget = self.budget.saturating_sub(for_unspillable);
        let spillers = self.spillers.max(1);
        Share {
            per_reservation: spillable_budget / spillers,
            spillable_budget,
            spillers,
            for_unspillable,
        }
    }
}

/// Bytes a merge reservation is still owed: what it reserved first, less what it holds.
/// Zero for a consumer that never reserved (its sort has not started: the sort's own share
/// covers it, since every registered spiller's share is kept free).
pub(crate) fn merge_owed(first_reservation: usize, held: usize) -> usize {
    first_reservation.saturating_sub(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (F1) of `FairSpillPool`, for comparison.
    fn fair_spill_grants(
        budget: usize,
        unspillable: usize,
        spillers: usize,
        r: usize,
        a: usize,
    ) -> bool {
        r + a <= budget.saturating_sub(unspillable) / spillers.max(1)
    }

    #[test]
    fn with_nothing_kept_the_share_is_fair_spill_pools() {
        for (budget, u, n) in [(100, 0, 1), (100, 30, 2), (1 << 30, 12345, 7), (5, 9, 3)] {
            let s = Inputs {
                budget,
                unspillable: u,
                kept: 0,
                headroom: 0,
                spillers: n,
            }
            .share();
            for r in [0, 1, s.per_reservation / 2, s.per_reservation] {
                for a in [1, 2, 10, 1000] {
                    assert_eq!(
                        r + a <= s.per_reservation,
                        fair_spill_grants(budget, u, n, r, a),
                        "B {budget} U {u} n {n} r {r} a {a}"
                    );
                }
            }
        }
    }

    #[test]
    fn never_more_than_fair_spill_pool() {
        // Claim 1 over a grid: whatever is kept, (G1) never grants what (F1) refuses.
        for budget in [0, 7, 100, 4096] {
            for u in [0, 3, 50, 5000] {
                for kept in [0, 1, 40] {
                    for headroom in [0, 20, 5000] {
                        for n in 1..4 {
                            let s = Inputs {
                                budget,
                                unspillable: u,
                                kept,
                                headroom,
                                spillers: n,
                            }
                            .share();
                            for r in [0, 5, 30] {
                                for a in [1, 10, 100] {
                                    if r + a <= s.per_reservation {
                                        assert!(fair_spill_grants(budget, u, n, r, a));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shares_of_all_spillers_leave_what_is_kept_free() {
        // Claim 3: n spillers at their full share leave exactly U + K (or H) of the budget.
        let i = Inputs {
            budget: 1000,
            unspillable: 100,
            kept: 150,
            headroom: 0,
            spillers: 3,
        };
        let s = i.share();
        assert_eq!(s.per_reservation, 250);
        assert!(s.per_reservation * 3 + 100 + 150 <= 1000);
        assert_eq!(merge_owed(256, 0), 256);
        assert_eq!(merge_owed(256, 300), 0);
    }
}
