//! The shard planner. It runs on the elected leader only and is a pure function of what
//! the leader sees, so it can be tested exhaustively and every instance would compute
//! the same answer from the same input.
//!
//! Properties (each has a property test below):
//! - **balanced**: once moves settle, every active member holds ⌊S/N⌋ or ⌈S/N⌉ shards;
//! - **minimal movement**: one member joining or leaving among N moves about S/N shards;
//! - **idempotent**: `plan` with its own output as the previous assignment returns it again;
//! - **rate-limited**: at most `max_moves` owned shards are assigned away from their owner
//!   at once (unowned shards are not moves: nothing has to be handed off);
//! - **pinned**: a shard an operator pinned to an active member is assigned to it (the
//!   other shards are balanced around the pins); a pin to a member that is not active is
//!   ignored, so a dead member's pinned shards are still re-homed;
//! - **frozen**: while frozen no new move takes an owned shard from an active owner (a
//!   joining member gets nothing, rebalancing stops; moves already decided finish), except
//!   for pins; shards without an active owner are still re-homed, to the members holding
//!   fewest.

use std::collections::HashMap;

use leasehold_types::MemberId;

/// What the leader sees when it plans.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanInput<'a> {
    /// Members that may receive shards (registered and not draining).
    pub active: &'a [MemberId],
    /// Current owner of each shard from the shard keys; `None` when unowned. Its length is
    /// the shard count.
    pub owners: &'a [Option<MemberId>],
    /// The previous assignment; empty when there is none yet.
    pub previous: &'a [Option<MemberId>],
    /// How many owned shards may be assigned away from their owner at once.
    pub max_moves: usize,
    /// Operator pins: (shard, member).
    pub pins: &'a [(usize, MemberId)],
    /// No voluntary moves (an incident): see the module documentation.
    pub frozen: bool,
}

/// Computes the desired owner of every shard.
///
/// A shard assigned to a member other than its owner is a move: the owner hands it off,
/// then the assigned member acquires it. `None` is only returned when there is no active
/// member at all.
pub fn plan(input: PlanInput<'_>) -> Vec<Option<MemberId>> {
    let shard_count = input.owners.len();
    let mut members: Vec<&MemberId> = input.active.iter().collect();
    members.sort();
    members.dedup();
    if members.is_empty() {
        // Nobody can take shards: leave everything where it is.
        return input.owners.to_vec();
    }
    let index: HashMap<&MemberId, usize> =
        members.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let active = |m: &Option<MemberId>| m.as_ref().and_then(|m| index.get(m).copied());
    let owner: Vec<Option<usize>> = input.owners.iter().map(active).collect();
    let previous = |s: usize| input.previous.get(s).and_then(active);

    let n = members.len();
    // Pins to active members; the last pin of a shard wins.
    let mut pinned: Vec<Option<usize>> = vec![None; shard_count];
    for (s, m) in input.pins {
        if let (Some(slot), Some(&i)) = (pinned.get_mut(*s), index.get(m)) {
            *slot = Some(i);
        }
    }
    let target = if input.frozen {
        frozen_targets(n, &pinned, &owner, previous)
    } else {
        balanced_targets(n, &pinned, &owner, previous)
    };

    // Rate limit: moves already in flight stay; new moves are admitted up to the budget,
    // shards of members that are leaving first.
    let is_move = |s: usize, t: &[Option<usize>]| input.owners[s].is_some() && t[s] != owner[s];
    let in_flight = (0..shard_count)
        .filter(|&s| is_move(s, &target) && previous(s).is_some() && previous(s) == target[s])
        .count();
    let mut budget = input.max_moves.saturating_sub(in_flight);
    let mut new_moves: Vec<usize> = (0..shard_count)
        .filter(|&s| is_move(s, &target) && !(previous(s).is_some() && previous(s) == target[s]))
        .collect();
    new_moves.sort_by_key(|&s| (owner[s].is_some(), s));

    let mut out: Vec<Option<MemberId>> = target
        .iter()
        .map(|t| t.map(|m| members[m].clone()))
        .collect();
    for s in new_moves {
        if budget > 0 {
            budget -= 1;
        } else {
            out[s] = input.owners[s].clone();
        }
    }
    out
}

/// Balance: every member ends with its quota of shards (⌊S/N⌋ or ⌈S/N⌉), counting its
/// pins; a member pinned beyond its quota keeps its pins and gets nothing else.
fn balanced_targets(
    n: usize,
    pinned: &[Option<usize>],
    owner: &[Option<usize>],
    previous: impl Fn(usize) -> Option<usize>,
) -> Vec<Option<usize>> {
    let shard_count = owner.len();
    let quota = quotas(n, shard_count, pinned);

    // Start from the pins, then the previous assignment (moves in flight stay), else the
    // current owner.
    let mut target: Vec<Option<usize>> = (0..shard_count)
        .map(|s| pinned[s].or(previous(s)).or(owner[s]))
        .collect();
    let mut count = held(n, &target);

    // Take shards away from members above quota: never pinned ones; first those whose
    // move has not happened yet (cheap to cancel), then the highest shard numbers.
    for m in 0..n {
        if count[m] <= quota[m] {
            continue;
        }
        let mut held: Vec<usize> = (0..shard_count)
            .filter(|&s| target[s] == Some(m) && pinned[s].is_none())
            .collect();
        held.sort_by_key(|&s| (owner[s] == Some(m), std::cmp::Reverse(s)));
        let excess = count[m] - quota[m];
        for &s in held.iter().take(excess) {
            target[s] = None;
        }
        count[m] -= excess.min(held.len());
    }

    // Give unassigned shards back to their owner when it has room (no move needed) ...
    for s in 0..shard_count {
        if let (None, Some(o)) = (target[s], owner[s]) {
            if count[o] < quota[o] {
                target[s] = Some(o);
                count[o] += 1;
            }
        }
    }
    // ... and the rest, in shard order, to members below quota in member order, so each
    // member receives contiguous runs (readable shard maps). Members only ever exceed
    // their quota by pins, so the room left is at least the shards left.
    let mut m = 0;
    for t in target.iter_mut().filter(|t| t.is_none()) {
        while count[m] >= quota[m] {
            m += 1;
        }
        *t = Some(m);
        count[m] += 1;
    }
    target
}

/// How many shards each of `n` members is given in `targets`.
fn held(n: usize, targets: &[Option<usize>]) -> Vec<usize> {
    let mut count = vec![0usize; n];
    for t in targets.iter().flatten() {
        count[*t] += 1;
    }
    count
}

/// Each member's share: ⌊S/N⌋ or ⌈S/N⌉, except that a member pinned beyond its share
/// holds exactly its pins and the others share the rest (repeated until no member's pins
/// exceed its share). Depends on the member set and the pins only, which keeps repeated
/// plans stable.
fn quotas(n: usize, shard_count: usize, pinned: &[Option<usize>]) -> Vec<usize> {
    let pins = held(n, pinned);
    let mut fixed = vec![false; n];
    loop {
        let rest: Vec<usize> = (0..n).filter(|&m| !fixed[m]).collect();
        let left = shard_count - (0..n).filter(|&m| fixed[m]).map(|m| pins[m]).sum::<usize>();
        // Never empty: every member left over its share would need more pins than shards.
        let share = |i: usize| left / rest.len() + usize::from(i < left % rest.len());
        let over: Vec<usize> = rest
            .iter()
            .enumerate()
            .filter(|&(i, &m)| pins[m] > share(i))
            .map(|(_, &m)| m)
            .collect();
        if over.is_empty() {
            let mut quota = pins.clone();
            for (i, &m) in rest.iter().enumerate() {
                quota[m] = share(i);
            }
            return quota;
        }
        for m in over {
            fixed[m] = true;
        }
    }
}

/// Frozen: pins, else the move already decided (it finishes), else the active owner, else
/// the member holding fewest shards.
fn frozen_targets(
    n: usize,
    pinned: &[Option<usize>],
    owner: &[Option<usize>],
    previous: impl Fn(usize) -> Option<usize>,
) -> Vec<Option<usize>> {
    let shard_count = owner.len();
    let mut target: Vec<Option<usize>> = (0..shard_count)
        .map(|s| pinned[s].or_else(|| previous(s)).or(owner[s]))
        .collect();
    let mut count = held(n, &target);
    for t in target.iter_mut().filter(|t| t.is_none()) {
        let m = (0..n).min_by_key(|&m| (count[m], m)).expect("n > 0");
        *t = Some(m);
        count[m] += 1;
    }
    target
}

/// Number of owned shards whose assignment differs from their owner.
pub fn pending_moves(owners: &[Option<MemberId>], assignment: &[Option<MemberId>]) -> usize {
    owners
        .iter()
        .zip(assignment)
        .filter(|(o, a)| o.is_some() && o != a)
        .count()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ids(n: usize) -> Vec<MemberId> {
        (0..n).map(|i| MemberId(format!("m{i}"))).collect()
    }

    fn counts(assignment: &[Option<MemberId>], members: &[MemberId]) -> Vec<usize> {
        members
            .iter()
            .map(|m| assignment.iter().filter(|a| a.as_ref() == Some(m)).count())
            .collect()
    }

    fn assert_balanced(assignment: &[Option<MemberId>], members: &[MemberId]) {
        let s = assignment.len();
        let n = members.len();
        assert!(assignment
            .iter()
            .all(|a| a.as_ref().is_some_and(|a| members.contains(a))));
        for c in counts(assignment, members) {
            assert!(
                c >= s / n && c <= s.div_ceil(n),
                "count {c} outside {}..{}",
                s / n,
                s.div_ceil(n)
            );
        }
    }

    /// Simulates moves completing: owners become what was assigned.
    fn settle(
        members: &[MemberId],
        owners: Vec<Option<MemberId>>,
        max_moves: usize,
    ) -> (Vec<Option<MemberId>>, usize) {
        let mut owners = owners;
        let mut previous = Vec::new();
        for round in 0..1000 {
            let a = plan(PlanInput {
                active: members,
                owners: &owners,
                previous: &previous,
                max_moves,
                ..Default::default()
            });
            if a == owners {
                return (owners, round);
            }
            owners = a.clone();
            previous = a;
        }
        panic!("did not settle");
    }

    fn arb_state() -> impl Strategy<Value = (usize, Vec<Option<usize>>, Vec<Option<usize>>, usize)>
    {
        (1usize..8, 1usize..300).prop_flat_map(|(n, s)| {
            let slot = proptest::option::of(0..n + 2); // indices ≥ n are members that left
            (
                Just(n),
                proptest::collection::vec(slot.clone(), s),
                proptest::collection::vec(slot, s),
                0usize..400,
            )
        })
    }

    fn to_ids(v: &[Option<usize>]) -> Vec<Option<MemberId>> {
        v.iter()
            .map(|o| o.map(|i| MemberId(format!("m{i}"))))
            .collect()
    }

    proptest! {
        #[test]
        fn unlimited_plans_are_balanced((n, owners, previous, _) in arb_state()) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let a = plan(PlanInput { active: &members, owners: &owners, previous: &previous, max_moves: usize::MAX, ..Default::default() });
            assert_balanced(&a, &members);
        }

        #[test]
        fn plans_are_idempotent((n, owners, previous, max_moves) in arb_state()) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let a = plan(PlanInput { active: &members, owners: &owners, previous: &previous, max_moves, ..Default::default() });
            let b = plan(PlanInput { active: &members, owners: &owners, previous: &a, max_moves, ..Default::default() });
            prop_assert_eq!(a, b);
        }

        #[test]
        fn new_moves_respect_the_limit((n, owners, _, max_moves) in arb_state()) {
            let members = ids(n);
            let owners = to_ids(&owners);
            let a = plan(PlanInput { active: &members, owners: &owners, previous: &[], max_moves, ..Default::default() });
            prop_assert!(pending_moves(&owners, &a) <= max_moves);
        }

        #[test]
        fn limited_plans_converge_to_balance((n, owners, _, max_moves) in arb_state()) {
            let members = ids(n);
            let max_moves = max_moves.max(1);
            let (settled, _) = settle(&members, to_ids(&owners), max_moves);
            assert_balanced(&settled, &members);
        }

        #[test]
        fn a_join_moves_about_one_share(n in 1usize..10, s in 1usize..1100) {
            let members = ids(n);
            let (balanced, _) = settle(&members, vec![None; s], usize::MAX);
            let grown = ids(n + 1);
            let a = plan(PlanInput { active: &grown, owners: &balanced, previous: &balanced, max_moves: usize::MAX, ..Default::default() });
            let moved = pending_moves(&balanced, &a);
            // The newcomer's share, plus at most one shard per member from re-deciding who
            // holds the remainder.
            prop_assert!(moved <= s.div_ceil(n + 1) + n, "moved {} of {} shards", moved, s);
        }

        #[test]
        fn a_leave_moves_only_the_leavers_shards_and_the_remainder(n in 2usize..10, s in 1usize..1100, leaver in 0usize..10) {
            let members = ids(n);
            let (balanced, _) = settle(&members, vec![None; s], usize::MAX);
            let gone = MemberId(format!("m{}", leaver % n));
            let rest: Vec<MemberId> = members.iter().filter(|m| **m != gone).cloned().collect();
            // The leaver's lease expired: its shards are unowned.
            let owners: Vec<Option<MemberId>> = balanced.iter().map(|o| o.clone().filter(|o| *o != gone)).collect();
            let a = plan(PlanInput { active: &rest, owners: &owners, previous: &balanced, max_moves: usize::MAX, ..Default::default() });
            assert_balanced(&a, &rest);
            prop_assert!(pending_moves(&owners, &a) <= n, "moved {} owned shards", pending_moves(&owners, &a));
        }
    }

    /// Pins drawn over members that may have left (indices ≥ n).
    fn arb_pins(s: usize, n: usize) -> impl Strategy<Value = Vec<(usize, MemberId)>> {
        proptest::collection::vec((0..s, 0..n + 2), 0..12).prop_map(|v| {
            let mut seen = std::collections::HashSet::new();
            v.into_iter()
                .filter(|(s, _)| seen.insert(*s)) // one pin per shard
                .map(|(s, m)| (s, MemberId(format!("m{m}"))))
                .collect()
        })
    }

    type PinnedState = (
        usize,
        Vec<Option<usize>>,
        Vec<Option<usize>>,
        Vec<(usize, MemberId)>,
    );

    fn arb_pinned_state() -> impl Strategy<Value = PinnedState> {
        arb_state().prop_flat_map(|(n, owners, previous, _)| {
            let s = owners.len();
            (Just(n), Just(owners), Just(previous), arb_pins(s, n))
        })
    }

    proptest! {
        #[test]
        fn pins_to_active_members_hold_and_the_rest_is_balanced_around_them(
            (n, owners, previous, pins) in arb_pinned_state()
        ) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let a = plan(PlanInput {
                active: &members, owners: &owners, previous: &previous,
                max_moves: usize::MAX, pins: &pins, frozen: false,
            });
            let s = a.len();
            prop_assert!(a.iter().all(|t| t.as_ref().is_some_and(|t| members.contains(t))));
            for (shard, m) in &pins {
                if members.contains(m) {
                    prop_assert_eq!(a[*shard].as_ref(), Some(m), "pin of shard {}", shard);
                }
            }
            // Members hold their pins; those not pinned beyond the rest's share are within
            // one shard of each other.
            let held: Vec<usize> = counts(&a, &members);
            let pinned: Vec<usize> = members.iter().map(|m| pins.iter().filter(|(_, p)| p == m).count()).collect();
            let free: Vec<usize> = (0..n).filter(|&i| held[i] > pinned[i] || pinned[i] == 0).map(|i| held[i]).collect();
            if let (Some(lo), Some(hi)) = (free.iter().min(), free.iter().max()) {
                prop_assert!(hi - lo <= 1, "held {:?}, pins {:?} ({} shards)", held, pinned, s);
            }
        }

        #[test]
        fn frozen_plans_move_nothing_from_an_active_owner_but_pins(
            (n, owners, previous, pins) in arb_pinned_state(),
            max_moves in 0usize..400,
        ) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let a = plan(PlanInput {
                active: &members, owners: &owners, previous: &previous,
                max_moves, pins: &pins, frozen: true,
            });
            for (shard, owner) in owners.iter().enumerate() {
                let pinned = pins.iter().any(|(p, m)| *p == shard && members.contains(m));
                let decided = previous.get(shard).cloned().flatten().filter(|p| members.contains(p));
                match owner {
                    Some(o) if members.contains(o) && !pinned => prop_assert!(
                        a[shard].as_ref() == Some(o) || a[shard] == decided,
                        "shard {} moved while frozen", shard
                    ),
                    // A shard without an owner (its member died) is still re-homed; one a
                    // leaving member still holds moves within the budget.
                    None if !pinned => prop_assert!(a[shard].as_ref().is_some_and(|t| members.contains(t))),
                    Some(o) if !pinned => prop_assert!(
                        a[shard].as_ref().is_some_and(|t| members.contains(t) || t == o)
                    ),
                    _ => {}
                }
            }
        }

        #[test]
        fn pinned_and_frozen_plans_are_idempotent(
            (n, owners, previous, pins) in arb_pinned_state(),
            frozen in any::<bool>(),
            max_moves in 0usize..400,
        ) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let input = PlanInput { active: &members, owners: &owners, previous: &previous, max_moves, pins: &pins, frozen };
            let a = plan(input);
            let b = plan(PlanInput { previous: &a, ..input });
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn members_without_pins_share_what_the_pins_leave() {
        // 9 shards, 3 members, 6 pinned to m2: m0 and m1 share the other 3.
        let members = ids(3);
        let pins: Vec<(usize, MemberId)> = (0..6).map(|s| (s, members[2].clone())).collect();
        let a = plan(PlanInput {
            active: &members,
            owners: &vec![None; 9],
            max_moves: usize::MAX,
            pins: &pins,
            ..Default::default()
        });
        assert_eq!(counts(&a, &members), vec![2, 1, 6]);
    }

    #[test]
    fn a_joining_member_gets_nothing_while_frozen() {
        let members = ids(2);
        let (balanced, _) = settle(&members, vec![None; 100], usize::MAX);
        let grown = ids(3);
        let a = plan(PlanInput {
            active: &grown,
            owners: &balanced,
            previous: &balanced,
            max_moves: usize::MAX,
            frozen: true,
            ..Default::default()
        });
        assert_eq!(a, balanced);
        assert_eq!(counts(&a, &grown)[2], 0);
    }

    #[test]
    fn three_members_get_341_or_342_of_1024() {
        let members = ids(3);
        let a = plan(PlanInput {
            active: &members,
            owners: &vec![None; 1024],
            previous: &[],
            max_moves: 16,
            ..Default::default()
        });
        let mut c = counts(&a, &members);
        c.sort();
        assert_eq!(c, vec![341, 341, 342]);
    }

    #[test]
    fn draining_members_move_first_under_a_limit() {
        let members = ids(3);
        let mut owners: Vec<Option<MemberId>> = vec![None; 30];
        for (s, o) in owners.iter_mut().enumerate() {
            *o = Some(MemberId(format!("m{}", s % 4))); // m3 is draining
        }
        let a = plan(PlanInput {
            active: &members,
            owners: &owners,
            previous: &[],
            max_moves: 5,
            ..Default::default()
        });
        let moved: Vec<usize> = (0..30).filter(|&s| owners[s] != a[s]).collect();
        assert_eq!(moved.len(), 5);
        assert!(moved.iter().all(|&s| s % 4 == 3), "moved {moved:?}");
    }

    #[test]
    fn no_active_members_leaves_owners_in_place() {
        let owners = vec![Some(MemberId::new("gone")), None];
        assert_eq!(
            plan(PlanInput {
                active: &[],
                owners: &owners,
                previous: &[],
                max_moves: 1,
                ..Default::default()
            }),
            owners
        );
    }
}
