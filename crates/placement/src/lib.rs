//! The shard planner. It runs on the elected leader only and is a pure function of what
//! the leader sees, so it can be tested exhaustively and every instance would compute
//! the same answer from the same input.
//!
//! Properties (each has a property test below):
//! - **balanced**: once moves settle, every active member holds ⌊S/N⌋ or ⌈S/N⌉ shards;
//! - **minimal movement**: one member joining or leaving among N moves about S/N shards;
//! - **idempotent**: `plan` with its own output as the previous assignment returns it again
//!   (a plan the move budget cut short is re-planned from until it repeats);
//! - **rate-limited**: at most `max_moves` owned shards are assigned away from their owner
//!   at once (unowned shards are not moves: nothing has to be handed off);
//! - **pinned**: a shard an operator pinned to an active member is assigned to it (the
//!   other shards are balanced around the pins); a pin to a member that is not active is
//!   ignored, so a dead member's pinned shards are still re-homed;
//! - **frozen**: while frozen no new move takes an owned shard from an active owner (a
//!   joining member gets nothing, rebalancing stops; moves already decided finish), except
//!   for pins; shards without an active owner are still re-homed, to the members holding
//!   fewest;
//! - **load-balanced** (when per-shard loads are given): every member's load ends within
//!   `tolerance` of the mean whenever shard sizes allow it; the planner only starts moving
//!   when a member is outside `tolerance` and then stops at half of it (hysteresis), so
//!   loads that wobble less than that never move a shard.
//!
//! Loads are what owners measured (handler busy time and calls per second, smoothed); a
//! shard cannot be split, so one shard hotter than a member's share stays where it is and
//! its member takes nothing else.

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
    /// Load of each shard (any non-negative unit; missing, negative or not finite = 0).
    /// `None`, or all zero: balance shard counts instead.
    pub loads: Option<&'a [f64]>,
    /// Load balance tolerance as a fraction of the mean (0.1 = ±10 %).
    pub tolerance: f64,
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
    let previous: Vec<Option<usize>> = (0..shard_count)
        .map(|s| input.previous.get(s).and_then(active))
        .collect();

    let n = members.len();
    // Pins to active members; the last pin of a shard wins.
    let mut pinned: Vec<Option<usize>> = vec![None; shard_count];
    for (s, m) in input.pins {
        if let (Some(slot), Some(&i)) = (pinned.get_mut(*s), index.get(m)) {
            *slot = Some(i);
        }
    }
    let shard_weights = match input.loads {
        Some(loads) if !input.frozen => weights(loads, shard_count),
        _ => None,
    };
    let decider = Decider {
        n,
        pinned: &pinned,
        owner: &owner,
        owned: input.owners,
        weights: shard_weights.as_deref(),
        tolerance: input.tolerance.clamp(0.0, 1.0),
        frozen: input.frozen,
        max_moves: input.max_moves,
    };
    // A plan the move budget cut short is not its own answer yet: the moves it deferred
    // leave their owners above their share, and planning again from it would balance
    // around them differently (shed another shard instead). Planning from each answer
    // until the answer repeats makes the result a fixed point, so the next pass, which
    // plans from it, returns it unchanged (idempotence). Each round keeps the budget (a
    // round's new moves fit in what the moves it keeps leave). A round may cancel a move
    // the caller's previous assignment had in flight, as the next pass would have. Should
    // the answers not repeat within the bound (never seen in 100 000 property cases), the
    // last one is returned: within the budget, but not a fixed point.
    let mut decided = decider.decide(&previous);
    for _ in 0..FIXED_POINT_ROUNDS {
        let again = decider.decide(&decided);
        if again == decided {
            break;
        }
        decided = again;
    }
    decided
        .iter()
        .zip(input.owners)
        .map(|(d, o)| d.map_or_else(|| o.clone(), |m| Some(members[m].clone())))
        .collect()
}

/// How many times `plan` re-plans from its own answer before it settles for it (in
/// practice the first re-plan repeats it, or the second).
const FIXED_POINT_ROUNDS: usize = 8;

/// One planning round on member indices.
struct Decider<'a> {
    n: usize,
    pinned: &'a [Option<usize>],
    owner: &'a [Option<usize>],
    /// The owners as given: a shard whose move is deferred stays with it, active or not.
    owned: &'a [Option<MemberId>],
    /// Shard weights when balancing load.
    weights: Option<&'a [f64]>,
    tolerance: f64,
    frozen: bool,
    max_moves: usize,
}

impl Decider<'_> {
    /// The member index each shard is assigned to from `previous`; `None` for a shard
    /// whose move was deferred while its owner is not active (it stays with that owner).
    fn decide(&self, previous: &[Option<usize>]) -> Vec<Option<usize>> {
        let (n, pinned, owner) = (self.n, self.pinned, self.owner);
        let shard_count = owner.len();
        let previous = |s: usize| previous.get(s).copied().flatten();
        let target = match self.weights {
            _ if self.frozen => frozen_targets(n, pinned, owner, previous),
            Some(weights) => load_targets(
                n,
                pinned,
                owner,
                previous,
                weights,
                self.tolerance,
                self.max_moves,
            ),
            None => balanced_targets(n, pinned, owner, previous),
        };

        // Rate limit: moves already in flight stay; new moves are admitted up to the
        // budget, shards of members that are leaving first.
        let is_move = |s: usize, t: &[Option<usize>]| self.owned[s].is_some() && t[s] != owner[s];
        let in_flight = (0..shard_count)
            .filter(|&s| is_move(s, &target) && previous(s).is_some() && previous(s) == target[s])
            .count();
        let mut budget = self.max_moves.saturating_sub(in_flight);
        let mut new_moves: Vec<usize> = (0..shard_count)
            .filter(|&s| {
                is_move(s, &target) && !(previous(s).is_some() && previous(s) == target[s])
            })
            .collect();
        new_moves.sort_by_key(|&s| (owner[s].is_some(), s));

        let mut out = target;
        for s in new_moves {
            if budget > 0 {
                budget -= 1;
            } else {
                out[s] = owner[s];
            }
        }
        out
    }
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

/// The weight the load planner balances per shard: its load plus 1 % of the mean shard
/// load, so idle shards still spread over members instead of piling onto one. `None` when
/// there is no load at all.
fn weights(loads: &[f64], shard_count: usize) -> Option<Vec<f64>> {
    let load = |s: usize| {
        loads
            .get(s)
            .copied()
            .filter(|l| l.is_finite() && *l > 0.0)
            .unwrap_or(0.0)
    };
    let total: f64 = (0..shard_count).map(load).sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let floor = 0.01 * total / shard_count as f64;
    Some((0..shard_count).map(|s| load(s) + floor).collect())
}

/// A member's place in the order "least loaded first": load, then shard count, then index.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Lightest(f64, usize, usize);

impl Eq for Lightest {}

impl PartialOrd for Lightest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Lightest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: the binary heap pops the least loaded member first.
        other
            .0
            .total_cmp(&self.0)
            .then(other.1.cmp(&self.1))
            .then(other.2.cmp(&self.2))
    }
}

/// Load balance: pins and moves in flight stay; shards without an active owner go,
/// heaviest first, to the least loaded member; then, only if some member is outside
/// `tolerance` of the mean (half of it when shards were just placed), shards
/// move from heavy to light members until all are within
/// half of it (or no move makes the pair more even).
fn load_targets(
    n: usize,
    pinned: &[Option<usize>],
    owner: &[Option<usize>],
    previous: impl Fn(usize) -> Option<usize>,
    weight: &[f64],
    tolerance: f64,
    max_moves: usize,
) -> Vec<Option<usize>> {
    let shard_count = owner.len();
    let mut target: Vec<Option<usize>> = (0..shard_count)
        .map(|s| pinned[s].or(previous(s)).or(owner[s]))
        .collect();
    // Owned shards assigned away from their owner: the greedy stops when they reach the
    // move budget (the plan would not admit more, and at 65 536 shards computing them all
    // is the expensive part).
    let mut away = (0..shard_count)
        .filter(|&s| owner[s].is_some() && target[s] != owner[s])
        .count();
    let mut load = vec![0.0f64; n];
    let mut count = vec![0usize; n];
    for (s, t) in target.iter().enumerate() {
        if let Some(m) = *t {
            load[m] += weight[s];
            count[m] += 1;
        }
    }
    let mut free: Vec<usize> = (0..shard_count).filter(|&s| target[s].is_none()).collect();
    let placed_free = !free.is_empty();
    free.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    let mut heap: std::collections::BinaryHeap<Lightest> =
        (0..n).map(|m| Lightest(load[m], count[m], m)).collect();
    for s in free {
        let Lightest(_, _, m) = heap.pop().expect("n > 0");
        target[s] = Some(m);
        load[m] += weight[s];
        count[m] += 1;
        heap.push(Lightest(load[m], count[m], m));
    }

    let band = Band::new(weight, n);
    let mut giants = vec![(0usize, 0.0f64); n];
    for (s, t) in target.iter().enumerate() {
        if let (Some(m), true) = (*t, band.giant[s]) {
            giants[m].0 += 1;
            giants[m].1 += weight[s];
        }
    }
    // Hysteresis: act when a member is outside the tolerance (half of it when shards were
    // just placed), then even out to half of it. A rebalance cut short by the move budget
    // ends within the tolerance, not necessarily within half of it.
    let trigger = if placed_free {
        tolerance / 2.0
    } else {
        tolerance
    };
    if !band.outside(&load, &giants, trigger) {
        return target;
    }
    // Shards each member may give away, sorted by weight: not pinned, and either held by
    // it or placed in this round (a decision under way — a move, or an unowned shard
    // waiting for its member — is never redirected).
    let mut movable: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n];
    for (s, t) in target.iter().enumerate() {
        if let Some(m) = *t {
            let placed_now = owner[s].is_none() && previous(s).is_none();
            if pinned[s].is_none() && (placed_now || owner[s] == Some(m)) {
                movable[m].push((weight[s], s));
            }
        }
    }
    for v in &mut movable {
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Every move makes the sum of squared member loads strictly smaller, so this ends;
    // the bound only caps the work.
    for _ in 0..2 * shard_count + n {
        if away >= max_moves || !band.outside(&load, &giants, tolerance / 2.0) {
            break;
        }
        order.sort_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)));
        let (lightest, heaviest) = (order[0], order[n - 1]);
        // The heaviest member gives to the lightest that can take; else the lightest takes
        // from the heaviest that can give.
        let pairs = order[..n - 1]
            .iter()
            .map(|&r| (heaviest, r))
            .chain(order[1..].iter().rev().map(|&g| (g, lightest)));
        let mut moved = false;
        for (giver, receiver) in pairs {
            // A move must leave the receiver below the giver's old load by a real margin
            // (half the tolerance): one that merely swaps two loads, or gains less than
            // the loads wobble, would be undone by a later plan. Where shards are too
            // coarse for that, a move that brings the pair from outside a band (half the
            // tolerance, else the tolerance) to inside it is still made if it narrows the
            // pair's spread by that margin (so no wobble below it makes the move back
            // worth making); without it the plan stopped outside the band, and the first
            // wobble that opened the margin moved the shard after all.
            let margin = band.mean * (tolerance / 2.0).max(1e-3);
            let gap = load[giver] - load[receiver] - margin;
            let plain = giants[giver].0 == 0 && giants[receiver].0 == 0;
            let into_band = |within: f64| {
                let (from, to) = (load[giver], load[receiver]);
                let (lo, hi) = (band.mean * (1.0 - within), band.mean * (1.0 + within));
                // Both end inside [lo, hi], and |(from − w) − (to + w)| ≤ from − to − margin.
                let fits = (from - hi).max(lo - to).max(margin / 2.0)
                    ..=(from - lo).min(hi - to).min(from - to - margin / 2.0);
                (plain && (from > hi || to < lo))
                    .then(|| shard_within(&movable[giver], fits, (from - to) / 2.0))
                    .flatten()
            };
            let pick = (gap > 0.0)
                .then(|| best_shard(&movable[giver], gap))
                .flatten()
                .or_else(|| into_band(tolerance / 2.0))
                .or_else(|| into_band(tolerance));
            if let Some(i) = pick {
                let (w, s) = movable[giver].remove(i);
                let at = movable[receiver].partition_point(|x| (x.0, x.1) < (w, s));
                movable[receiver].insert(at, (w, s));
                if owner[s].is_some() {
                    let was_away = target[s] != owner[s];
                    let is_away = Some(receiver) != owner[s];
                    away = away + usize::from(is_away) - usize::from(was_away);
                }
                target[s] = Some(receiver);
                load[giver] -= w;
                load[receiver] += w;
                if band.giant[s] {
                    giants[giver].0 -= 1;
                    giants[giver].1 -= w;
                    giants[receiver].0 += 1;
                    giants[receiver].1 += w;
                }
                moved = true;
                break;
            }
        }
        if !moved {
            break;
        }
    }
    target
}

/// What "balanced" means for one set of shard weights. A shard heavier than a member's
/// share (a *giant*: one hot key, say) cannot be split; its member is balanced when it holds
/// that shard and (almost) nothing else, and the other members share the rest: `mean` is
/// the share of a member without a giant.
struct Band {
    giant: Vec<bool>,
    mean: f64,
}

impl Band {
    fn new(weight: &[f64], n: usize) -> Self {
        let total: f64 = weight.iter().sum();
        let mut by_weight: Vec<usize> = (0..weight.len()).collect();
        by_weight.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
        let mut giants = 0;
        let mut rest = total;
        let mut mean = total / n as f64;
        // Peel off shards heavier than the share of the members left (at most n − 1).
        while giants + 1 < n && by_weight.get(giants).is_some_and(|&s| weight[s] > mean) {
            rest -= weight[by_weight[giants]];
            giants += 1;
            mean = rest / (n - giants) as f64;
        }
        let mut giant = vec![false; weight.len()];
        for &s in &by_weight[..giants] {
            giant[s] = true;
        }
        Self { giant, mean }
    }

    /// Whether some member is off by more than `tolerance` × the share: a member without a
    /// giant away from the share, one with a giant holding more than that beside it, or
    /// one holding two giants.
    fn outside(&self, load: &[f64], giants: &[(usize, f64)], tolerance: f64) -> bool {
        let slack = self.mean * tolerance;
        load.iter()
            .zip(giants)
            .any(|(&l, &(count, giant))| match count {
                0 => (l - self.mean).abs() > slack,
                1 => l - giant > slack,
                _ => true,
            })
    }
}

/// Index of the shard (sorted by weight) whose move evens out a pair `gap` apart best: the
/// weight closest to `gap / 2` among those below `gap` (moving one at or above it would
/// not make the pair more even).
fn best_shard(sorted: &[(f64, usize)], gap: f64) -> Option<usize> {
    let below = sorted.partition_point(|x| x.0 < gap);
    if below == 0 {
        return None;
    }
    let half = sorted.partition_point(|x| x.0 < gap / 2.0);
    [half.checked_sub(1), (half < below).then_some(half)]
        .into_iter()
        .flatten()
        .min_by(|&a, &b| {
            (sorted[a].0 - gap / 2.0)
                .abs()
                .total_cmp(&(sorted[b].0 - gap / 2.0).abs())
                .then(a.cmp(&b))
        })
}

/// Index of the shard (sorted by weight) whose weight lies in `fits` and is closest to
/// `ideal`.
fn shard_within(
    sorted: &[(f64, usize)],
    fits: std::ops::RangeInclusive<f64>,
    ideal: f64,
) -> Option<usize> {
    let from = sorted.partition_point(|x| x.0 < *fits.start());
    let to = sorted.partition_point(|x| x.0 <= *fits.end());
    (from..to).min_by(|&a, &b| {
        (sorted[a].0 - ideal)
            .abs()
            .total_cmp(&(sorted[b].0 - ideal).abs())
            .then(a.cmp(&b))
    })
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
                max_moves: usize::MAX, pins: &pins, frozen: false, ..Default::default()
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
                max_moves, pins: &pins, frozen: true, ..Default::default()
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
            let input = PlanInput { active: &members, owners: &owners, previous: &previous, max_moves, pins: &pins, frozen, ..Default::default() };
            let a = plan(input);
            let b = plan(PlanInput { previous: &a, ..input });
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn a_plan_the_move_budget_cut_short_is_its_own_answer() {
        // Found by the property test: shard 9 is taken from m0 (over its share) and its
        // move from m4 deferred (budget spent on shard 17's move), so m4 keeps one shard
        // beyond its share; planning again from that answer gave shard 19 (unowned,
        // decided for m4) away instead. The answer must already be that fixed point.
        let ix = |v: &[i8]| -> Vec<Option<MemberId>> {
            v.iter()
                .map(|&i| (i >= 0).then(|| MemberId(format!("m{i}"))))
                .collect()
        };
        let owners = ix(&[
            -1, -1, -1, -1, 0, -1, -1, 4, -1, 4, -1, 5, 2, -1, 3, -1, 2, 2, -1, -1, -1, 0, 6, -1, 6,
        ]);
        let previous = ix(&[
            6, -1, 6, -1, -1, 4, 4, -1, -1, 0, 3, -1, -1, 0, -1, 3, -1, 4, -1, 4, -1, 2, 0, -1, -1,
        ]);
        let pins: Vec<(usize, MemberId)> =
            [(1, 0), (3, 0), (0, 2), (13, 5), (15, 4), (6, 0), (21, 0)]
                .iter()
                .map(|&(s, m)| (s, MemberId(format!("m{m}"))))
                .collect();
        let members = ids(5);
        let input = PlanInput {
            active: &members,
            owners: &owners,
            previous: &previous,
            max_moves: 1,
            pins: &pins,
            ..Default::default()
        };
        let a = plan(input);
        assert!(pending_moves(&owners, &a) <= 1, "the budget is one move");
        assert_eq!(
            plan(PlanInput {
                previous: &a,
                ..input
            }),
            a
        );
    }

    #[test]
    fn a_member_outside_the_tolerance_is_brought_inside_where_shards_are_too_coarse_for_the_margin()
    {
        // m0 holds 111 of 300 (11 % over the mean): its smallest shard (13) is above every
        // gap the margin rule allows, but moving it to m2 leaves everyone within 10 %.
        let members = ids(3);
        let loads = [49.0, 49.0, 13.0, 19.0, 19.0, 19.0, 19.0, 19.0, 47.0, 47.0];
        let owners: Vec<Option<MemberId>> = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
            .iter()
            .map(|&i| Some(members[i].clone()))
            .collect();
        let input = PlanInput {
            active: &members,
            owners: &owners,
            previous: &owners,
            max_moves: usize::MAX,
            loads: Some(&loads),
            tolerance: 0.1,
            ..Default::default()
        };
        let a = plan(input);
        assert_eq!(a[2].as_ref(), Some(&members[2]), "{a:?}");
        assert_eq!(pending_moves(&owners, &a), 1, "{a:?}");
        for l in member_loads(&a, &members, &loads) {
            assert!(
                (l - 100.0).abs() <= 10.0,
                "{:?}",
                member_loads(&a, &members, &loads)
            );
        }
        // Settled: the same loads, and loads within 2 % of them, move nothing more.
        assert_eq!(
            plan(PlanInput {
                owners: &a,
                previous: &a,
                ..input
            }),
            a
        );
        let wobbled: Vec<f64> = loads
            .iter()
            .enumerate()
            .map(|(s, l)| l * if s % 2 == 0 { 1.02 } else { 0.98 })
            .collect();
        let again = plan(PlanInput {
            owners: &a,
            previous: &a,
            loads: Some(&wobbled),
            ..input
        });
        assert_eq!(pending_moves(&a, &again), 0);
    }

    /// Each member's summed load under `assignment`.
    fn member_loads(
        assignment: &[Option<MemberId>],
        members: &[MemberId],
        loads: &[f64],
    ) -> Vec<f64> {
        members
            .iter()
            .map(|m| {
                assignment
                    .iter()
                    .zip(loads)
                    .filter(|(a, _)| a.as_ref() == Some(m))
                    .map(|(_, l)| l)
                    .sum()
            })
            .collect()
    }

    /// Simulates moves completing under load-aware plans.
    fn settle_loads(
        members: &[MemberId],
        owners: Vec<Option<MemberId>>,
        loads: &[f64],
        max_moves: usize,
    ) -> Vec<Option<MemberId>> {
        let mut owners = owners;
        let mut previous = Vec::new();
        for _ in 0..1000 {
            let a = plan(PlanInput {
                active: members,
                owners: &owners,
                previous: &previous,
                max_moves,
                loads: Some(loads),
                tolerance: 0.1,
                ..Default::default()
            });
            if a == owners {
                return owners;
            }
            owners = a.clone();
            previous = a;
        }
        panic!("did not settle");
    }

    /// Members, owners, previous assignment, budget, loads (small shards, sometimes one
    /// hot shard at 20× the others).
    type Loaded = (
        usize,
        Vec<Option<usize>>,
        Vec<Option<usize>>,
        usize,
        Vec<f64>,
    );

    fn arb_loaded() -> impl Strategy<Value = Loaded> {
        (1usize..7, 60usize..400).prop_flat_map(|(n, s)| {
            let slot = proptest::option::of(0..n + 2);
            (
                Just(n),
                proptest::collection::vec(slot.clone(), s),
                proptest::collection::vec(slot, s),
                1usize..400,
                proptest::collection::vec(1u32..10, s),
                proptest::option::of(0..s),
            )
                .prop_map(|(n, owners, previous, max_moves, loads, hot)| {
                    let mut loads: Vec<f64> = loads.into_iter().map(f64::from).collect();
                    if let Some(h) = hot {
                        loads[h] = 20.0 * 5.0;
                    }
                    (n, owners, previous, max_moves, loads)
                })
        })
    }

    proptest! {
        #[test]
        fn load_plans_settle_within_tolerance((n, owners, _, max_moves, loads) in arb_loaded()) {
            let members = ids(n);
            let settled = settle_loads(&members, to_ids(&owners), &loads, max_moves);
            prop_assert!(settled.iter().all(|a| a.as_ref().is_some_and(|a| members.contains(a))));
            let l = member_loads(&settled, &members, &loads);
            // Shards heavier than the share of the members left cannot be split: their
            // members hold them (and no more than the band beside them); the others are
            // within the tolerance (plus the 1 % idle floor; a rebalance the move budget
            // cut short may end anywhere inside it). A shard just above the share may be
            // taken for one either way (the planner weighs the idle floor in), so both
            // readings are accepted from the share up to 6 % above it.
            let mut by_weight = loads.clone();
            by_weight.sort_by(|a, b| b.total_cmp(a));
            let within = |margin: f64| -> Result<(), String> {
                let (mut k, mut rest) = (0, loads.iter().sum::<f64>());
                let mut share = rest / n as f64;
                while k + 1 < n && by_weight[k] > share * margin {
                    rest -= by_weight[k];
                    k += 1;
                    share = rest / (n - k) as f64;
                }
                let giant = |s: usize| k > 0 && loads[s] >= by_weight[k - 1];
                for (i, m) in members.iter().enumerate() {
                    let held_giant: f64 = (0..loads.len()).filter(|&s| giant(s) && settled[s].as_ref() == Some(m)).map(|s| loads[s]).sum();
                    if held_giant > 0.0 {
                        if l[i] - held_giant > share * 0.11 {
                            return Err(format!("member {i} holds {} beside its giant; loads {l:?}", l[i] - held_giant));
                        }
                    } else if (l[i] - share).abs() > share * 0.11 {
                        return Err(format!("member {i} at {}, share {share}; loads {l:?}", l[i]));
                    }
                }
                Ok(())
            };
            if let (Err(e), Err(_)) = (within(1.06), within(1.0)) {
                prop_assert!(false, "{}", e);
            }
        }

        #[test]
        fn load_plans_are_idempotent_and_respect_the_budget(
            (n, owners, previous, max_moves, loads) in arb_loaded(),
            frozen in any::<bool>(),
        ) {
            let members = ids(n);
            let (owners, previous) = (to_ids(&owners), to_ids(&previous));
            let pins = vec![(0usize, MemberId::new("m0"))];
            let input = PlanInput {
                active: &members, owners: &owners, previous: &previous, max_moves,
                pins: &pins, frozen, loads: Some(&loads), tolerance: 0.1,
            };
            let a = plan(input);
            let b = plan(PlanInput { previous: &a, ..input });
            prop_assert_eq!(&a, &b);
            let fresh = plan(PlanInput { previous: &[], ..input });
            prop_assert!(pending_moves(&owners, &fresh) <= max_moves);
        }

        #[test]
        fn loads_wobbling_less_than_the_hysteresis_move_nothing(
            (n, owners, _, _, loads) in arb_loaded(),
            noise in proptest::collection::vec(-0.02f64..0.02, 400),
        ) {
            let members = ids(n);
            let settled = settle_loads(&members, to_ids(&owners), &loads, usize::MAX);
            let wobbled: Vec<f64> = loads.iter().zip(&noise).map(|(l, e)| l * (1.0 + e)).collect();
            let again = plan(PlanInput {
                active: &members, owners: &settled, previous: &settled, max_moves: usize::MAX,
                loads: Some(&wobbled), tolerance: 0.1, ..Default::default()
            });
            prop_assert_eq!(pending_moves(&settled, &again), 0);
        }
    }

    #[test]
    fn one_shard_at_20_times_the_others_is_balanced_around() {
        // 64 shards, 3 members, shard 5 at 20×: counts balance leaves its member ~45 %
        // over the mean; load balance gives that member fewer shards.
        let members = ids(3);
        let mut loads = vec![1.0; 64];
        loads[5] = 20.0;
        let (counted, _) = settle(&members, vec![None; 64], usize::MAX);
        let before = member_loads(&counted, &members, &loads);
        let mean = loads.iter().sum::<f64>() / 3.0;
        assert!(before.iter().any(|l| *l > mean * 1.3), "{before:?}");
        let settled = settle_loads(&members, counted, &loads, 4);
        let after = member_loads(&settled, &members, &loads);
        for l in &after {
            assert!((l - mean).abs() <= mean * 0.1, "{after:?} around {mean}");
        }
        let hot = settled[5].clone().unwrap();
        let c = counts(&settled, &members);
        let hot_count = c[members.iter().position(|m| *m == hot).unwrap()];
        assert!(
            hot_count < 64 / 3,
            "the hot shard's member holds {hot_count} shards"
        );
    }

    #[test]
    fn coarse_shards_that_cannot_meet_the_tolerance_do_not_churn() {
        // 8 equal shards on 3 members: 3/3/2 is 12.5 % off the mean at best; loads
        // wobbling by 2 % must not move shards back and forth.
        let members = ids(3);
        let loads = vec![1.0; 8];
        let settled = settle_loads(&members, vec![None; 8], &loads, usize::MAX);
        for round in 0..200u32 {
            let wobbled: Vec<f64> = (0..8u32)
                .map(|s| 1.0 + 0.02 * (((s * 7 + round * 13) % 5) as f64 - 2.0) / 2.0)
                .collect();
            let a = plan(PlanInput {
                active: &members,
                owners: &settled,
                previous: &settled,
                max_moves: usize::MAX,
                loads: Some(&wobbled),
                tolerance: 0.1,
                ..Default::default()
            });
            assert_eq!(pending_moves(&settled, &a), 0, "round {round}");
        }
    }

    #[test]
    fn the_greedy_stops_at_the_move_budget() {
        // Everything on m0, two members join: at most 16 moves per plan.
        let members = ids(3);
        let owners = vec![Some(members[0].clone()); 600];
        let loads: Vec<f64> = (0..600).map(|s| 1.0 + (s % 7) as f64).collect();
        let a = plan(PlanInput {
            active: &members,
            owners: &owners,
            max_moves: 16,
            loads: Some(&loads),
            tolerance: 0.1,
            ..Default::default()
        });
        assert_eq!(pending_moves(&owners, &a), 16);
        let settled = settle_loads(&members, owners, &loads, 16);
        let l = member_loads(&settled, &members, &loads);
        let mean = l.iter().sum::<f64>() / 3.0;
        assert!(l.iter().all(|x| (x - mean).abs() <= mean * 0.1), "{l:?}");
    }

    #[test]
    fn no_load_falls_back_to_count_balance() {
        let members = ids(3);
        let a = plan(PlanInput {
            active: &members,
            owners: &vec![None; 1024],
            max_moves: 16,
            loads: Some(&[0.0; 1024]),
            tolerance: 0.1,
            ..Default::default()
        });
        let mut c = counts(&a, &members);
        c.sort();
        assert_eq!(c, vec![341, 341, 342]);
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
