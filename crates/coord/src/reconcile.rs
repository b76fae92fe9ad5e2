//! The reconciler: register, lead, acquire what is assigned here, hand off the rest.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use leasehold_placement::{plan, PlanInput};
use leasehold_types::{Epoch, MemberId, ShardId};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::{AssignmentValue, MemberState, MemberValue, ShardValue};
use crate::{Coord, Error, LocalState, Session, View};

/// What to do with a shard key attached to this instance's lease that its table lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repair {
    /// Assigned here: take it as owned, with the key's create revision as epoch.
    Adopt,
    /// Assigned elsewhere (or draining): delete it so the assignee can acquire it.
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OrphanKey {
    pub shard: ShardId,
    pub epoch: Epoch,
    pub action: Repair,
}

/// Shard keys the view shows attached to `lease` (this instance's) while the local table
/// does not hold the shard, and what to do with each. Pure: the caller checks each one
/// against etcd before acting.
pub(crate) fn orphans(
    view: &View,
    me: &MemberId,
    lease: i64,
    draining: bool,
    local: impl Fn(ShardId) -> LocalState,
) -> Vec<OrphanKey> {
    if lease == 0 || !view.synced {
        return Vec::new();
    }
    (0..view.shard_count())
        .map(ShardId)
        .filter_map(|shard| {
            let owner = view.owner(shard)?;
            if owner.lease != lease || owner.owner != *me || local(shard) != LocalState::NotOwned {
                return None;
            }
            let action = if !draining && view.assigned(shard) == Some(me) {
                Repair::Adopt
            } else {
                Repair::Delete
            };
            Some(OrphanKey {
                shard,
                epoch: owner.epoch,
                action,
            })
        })
        .collect()
}

/// What one reconciler pass does, decided from the routing table and the local table
/// alone (pure, so it is property-tested); the caller checks each step against etcd or
/// the local table again when it acts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Owned here, but the routing table (caught up with the acquisition) shows the key
    /// gone or another owner: drop.
    pub lost: Vec<(ShardId, Epoch)>,
    /// Keys on this instance's lease that its table lacks: adopt or delete.
    pub repair: Vec<OrphanKey>,
    /// Assigned here and free in the routing table: acquire.
    pub acquire: Vec<ShardId>,
    /// Owned here and assigned elsewhere: hand off.
    pub release: Vec<ShardId>,
}

/// Decides a reconciler pass. `local` is the local table's state of each shard.
pub(crate) fn decide(
    view: &View,
    me: &MemberId,
    lease: i64,
    draining: bool,
    local: impl Fn(ShardId) -> LocalState,
) -> Decision {
    if !view.synced {
        return Decision::default();
    }
    let shards = || (0..view.shard_count()).map(ShardId);
    let lost: Vec<(ShardId, Epoch)> = shards()
        .filter_map(|shard| match local(shard) {
            // A view that has not seen our acquisition yet cannot tell.
            LocalState::Owned(epoch) if view.revision >= epoch.0 as i64 => {
                let ours = view
                    .owner(shard)
                    .is_some_and(|o| o.owner == *me && o.epoch == epoch);
                (!ours).then_some((shard, epoch))
            }
            _ => None,
        })
        .collect();
    let lost_set: std::collections::HashSet<ShardId> = lost.iter().map(|(s, _)| *s).collect();
    let is_lost = |s: ShardId| lost_set.contains(&s);
    // What the local table holds once the lost shards are dropped.
    let after = |s: ShardId| {
        if is_lost(s) {
            LocalState::NotOwned
        } else {
            local(s)
        }
    };
    let repair = orphans(view, me, lease, draining, after);
    let acquire = if draining {
        Vec::new()
    } else {
        shards()
            .filter(|&s| view.assigned(s) == Some(me) && view.owner(s).is_none())
            .filter(|&s| after(s) == LocalState::NotOwned)
            .collect()
    };
    let release = if view.assignment_version == 0 {
        Vec::new()
    } else {
        shards()
            .filter(|&s| matches!(after(s), LocalState::Owned(_)) && view.assigned(s) != Some(me))
            .collect()
    };
    Decision {
        lost,
        repair,
        acquire,
        release,
    }
}

/// How many shard key repairs run at once.
const REPAIR_CONCURRENCY: usize = 64;

/// Shards written per acquisition transaction: 32 comparisons and 32 puts, under etcd's
/// default limit of 128 of each per transaction (`--max-txn-ops`; a lower limit makes
/// etcd refuse the batch, whose shards are then written one by one).
const ACQUIRE_BATCH: usize = 32;

/// How long shard keys are written one by one after etcd refused a batch of them.
const BATCHES_AGAIN_AFTER: Duration = Duration::from_secs(600);

/// Acquisition transactions in flight at once (chunks, or single shards after a chunk
/// could not be written whole)...
const ACQUIRE_TXNS_AT_ONCE: usize = 64;

/// ...and the shards they write, at most.
const ACQUIRE_SHARDS_AT_ONCE: usize = 256;

/// Brings this instance in line with the routing table, one pass per change (or every
/// 500 ms): registers the member under each new lease, leads when it is the leader, and
/// applies [`decide`]'s verdict to the local table.
pub(crate) struct Reconciler {
    coord: Coord,
    view: watch::Receiver<Arc<View>>,
    session: watch::Receiver<Session>,
    /// The session generation the member key was last written under.
    registered: u64,
    /// The assignment version this instance last wrote as leader, and when.
    written_version: Option<(u64, std::time::Instant)>,
}

impl Reconciler {
    pub(crate) fn new(coord: Coord) -> Self {
        Self {
            view: coord.inner.view.subscribe(),
            session: coord.inner.session.subscribe(),
            registered: 0,
            written_version: None,
            coord,
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.view.changed() => {}
                _ = self.session.changed() => {}
                _ = self.coord.inner.wake.notified() => {}
                _ = tick.tick() => {}
            }
            self.coord.inner.liveness.pass(Instant::now());
            // Let a burst of watch events land before acting on it.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.pass().await;
        }
    }

    async fn pass(&mut self) {
        let coord = &self.coord;
        let session = *self.session.borrow_and_update();
        if session.lease == 0 {
            return;
        }
        if self.registered != session.generation {
            match coord.register(session).await {
                Ok(()) => self.registered = session.generation,
                Err(e) => {
                    tracing::warn!(error = %e, "member registration failed");
                    return;
                }
            }
        }
        let view = self.view.borrow_and_update().clone();
        if !view.synced {
            return;
        }
        let me = coord.member_id();
        if view
            .members
            .get(me)
            .is_some_and(|m| m.state == MemberState::Draining)
            && !coord.inner.draining.swap(true, Ordering::AcqRel)
        {
            tracing::info!("member marked draining");
        }
        if let Err(e) = coord.lead(&view, session, &mut self.written_version).await {
            tracing::warn!(error = %e, "leader step failed");
        }
        let table = &coord.inner.table;
        let decision = decide(&view, me, session.lease, coord.is_draining(), |s| {
            table.state(s)
        });
        coord.drop_lost(&decision.lost);
        coord.repair(decision.repair, session).await;
        coord.acquire(decision.acquire, session).await;
        coord.release(decision.release);
        coord.refresh_metrics();
    }
}

impl Coord {
    /// Writes `members/<id>` attached to the session's lease.
    pub(crate) async fn register(&self, session: Session) -> Result<(), Error> {
        let opts = &self.inner.opts;
        let state = if self.is_draining() {
            MemberState::Draining
        } else {
            MemberState::Active
        };
        let value = MemberValue {
            address: opts.address.clone(),
            admin_address: opts.admin_address.clone(),
            peer_address: opts.peer_address.clone(),
            peer_identity: opts.peer_identity.clone(),
            state,
            version: opts.version.clone(),
        };
        let mut client = self.client()?;
        self.etcd(client.put(
            self.inner.keys.member(&opts.member_id),
            serde_json::to_vec(&value).expect("member serialises"),
            Some(PutOptions::new().with_lease(session.lease)),
        ))
        .await?;
        tracing::info!(member = %opts.member_id, state = state.as_str(), lease = session.lease, "member registered");
        Ok(())
    }

    /// Campaigns when there is no leader; plans when this instance leads.
    async fn lead(
        &self,
        view: &View,
        session: Session,
        written: &mut Option<(u64, std::time::Instant)>,
    ) -> Result<(), Error> {
        let me = self.member_id();
        let key = self.inner.keys.leader();
        let mut client = self.client()?;
        match &view.leader {
            None => {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key,
                        me.as_str(),
                        Some(PutOptions::new().with_lease(session.lease)),
                    )]);
                if self.etcd(client.txn(txn)).await?.succeeded() {
                    tracing::info!(member = %me, "elected leader");
                }
                return Ok(());
            }
            Some(leader) if leader != me => return Ok(()),
            Some(_) => {}
        }
        if let Some((version, at)) = *written {
            if view.assignment_version < version {
                // Our last write has not reached the view yet; if it still has not long
                // after, the key went back (deleted, or etcd restored from a backup):
                // plan from what the view shows rather than never again (the write is
                // refused if the view is only slow: it compares the key's revision).
                if at.elapsed() < self.inner.opts.lease_ttl * 4 {
                    return Ok(());
                }
                tracing::warn!(
                    written = version,
                    seen = view.assignment_version,
                    "the assignment this leader wrote never appeared (the key was deleted or went back); planning from the current one"
                );
                *written = None;
            }
        }
        let active: Vec<MemberId> = view
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.id.clone())
            .collect();
        let owners: Vec<Option<MemberId>> = view
            .shards
            .iter()
            .map(|s| s.as_ref().map(|s| s.owner.clone()))
            .collect();
        let previous: &[Option<MemberId>] = if view.assignment_version == 0 {
            &[]
        } else {
            &view.assignment
        };
        // One-shot moves act as pins until done; a pin of the same shard wins.
        let placement = &view.placement;
        let pins: Vec<(usize, MemberId)> = placement
            .moves
            .iter()
            .filter(|(s, _)| !placement.pins.contains_key(s))
            .chain(&placement.pins)
            .map(|(s, m)| (*s as usize, m.clone()))
            .collect();
        let loads = self
            .inner
            .opts
            .load_tolerance
            .and_then(|_| view.load_weights());
        let assignment = plan(PlanInput {
            active: &active,
            owners: &owners,
            previous,
            max_moves: self.inner.opts.max_moves,
            pins: &pins,
            frozen: placement.frozen,
            loads: loads.as_deref(),
            tolerance: self.inner.opts.load_tolerance.unwrap_or(0.0),
        });
        self.forget_finished_moves(view, &active).await;
        if view.assignment_version > 0 && assignment == *view.assignment {
            return Ok(());
        }
        let version = view.assignment_version + 1;
        let value = serde_json::to_vec(&AssignmentValue::encode(version, &assignment))
            .expect("assignment serialises");
        // Only the holder of the leader key (by lease) may write the assignment, and only
        // over the value it planned from: a plan from a view behind the key (its own last
        // write not seen yet) would undo moves under way.
        let txn = Txn::new()
            .when([
                Compare::lease(key, CompareOp::Equal, session.lease),
                Compare::mod_revision(
                    self.inner.keys.assignment(),
                    CompareOp::Equal,
                    view.assignment_revision,
                ),
            ])
            .and_then([TxnOp::put(self.inner.keys.assignment(), value, None)]);
        if self.etcd(client.txn(txn)).await?.succeeded() {
            *written = Some((version, std::time::Instant::now()));
            let moves = leasehold_placement::pending_moves(&owners, &assignment);
            tracing::info!(version, members = active.len(), moves, "assignment written");
        }
        Ok(())
    }

    /// Drops one-shot moves whose shard reached its member, or whose member is no longer
    /// active (the leader's job: it alone plans).
    async fn forget_finished_moves(&self, view: &View, active: &[MemberId]) {
        let finished = |s: &u32, m: &MemberId| {
            !active.contains(m) || view.owner(ShardId(*s)).is_some_and(|o| o.owner == *m)
        };
        if !view.placement.moves.iter().any(|(s, m)| finished(s, m)) {
            return;
        }
        let done: Vec<(u32, MemberId)> = view
            .placement
            .moves
            .iter()
            .filter(|(s, m)| finished(s, m))
            .map(|(s, m)| (*s, m.clone()))
            .collect();
        let result = self
            .update_placement(|p| {
                for (s, m) in &done {
                    if p.moves.get(s) == Some(m) {
                        p.moves.remove(s);
                    }
                }
            })
            .await;
        match result {
            Ok(_) => tracing::info!(moves = ?done, "one-shot moves done"),
            Err(e) => tracing::warn!(error = %e, "could not forget finished moves"),
        }
    }

    /// Acquires free shards assigned to this instance.
    async fn acquire(&self, wanted: Vec<ShardId>, session: Session) {
        if self.is_draining() {
            return; // started draining since the pass was decided
        }
        let me = self.member_id();
        let table = &self.inner.table;
        let generation = table.generation();
        let wanted: Vec<ShardId> = wanted
            .into_iter()
            .filter(|&s| table.state(s) == LocalState::NotOwned)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let value = serde_json::to_vec(&ShardValue {
            owner: me.clone(),
            address: self.inner.opts.address.clone(),
            peer_address: self.inner.opts.peer_address.clone(),
            peer_identity: self.inner.opts.peer_identity.clone(),
        })
        .expect("shard value serialises");
        // Chunks first; a chunk whose keys are not all free (the routing table was
        // behind) or that etcd refuses outright (a lowered `--max-txn-ops`) comes back
        // as single shards. Each shard is marked owned as soon as its own transaction
        // succeeded, not once every one did: peers see the key (and route calls here)
        // as soon as it is written, and calls reaching this instance before its table
        // says so are answered "not owner" (after a SIGKILL, hundreds of shards are
        // taken at once).
        let refused_lately = self
            .inner
            .batches_refused
            .lock()
            .expect("batches lock")
            .is_some_and(|at| at.elapsed() < BATCHES_AGAIN_AFTER);
        let batch = if refused_lately { 1 } else { ACQUIRE_BATCH };
        let mut pending: std::collections::VecDeque<Vec<ShardId>> =
            wanted.chunks(batch).map(<[_]>::to_vec).collect();
        let mut running = futures::stream::FuturesUnordered::new();
        let mut shards_in_flight = 0;
        let mut acquired = 0;
        let (mut failed, mut last_error) = (0, None);
        let mut refused = None;
        loop {
            while let Some(next) = pending.front() {
                if running.len() >= ACQUIRE_TXNS_AT_ONCE
                    || shards_in_flight + next.len() > ACQUIRE_SHARDS_AT_ONCE
                {
                    break;
                }
                let shards = pending.pop_front().expect("a front");
                shards_in_flight += shards.len();
                running.push(async {
                    let result = self.write_shards(&shards, &value, session.lease).await;
                    (shards, result)
                });
            }
            let Some((shards, result)) = running.next().await else {
                break;
            };
            shards_in_flight -= shards.len();
            match result {
                Ok(None) if shards.len() > 1 => {
                    pending.extend(shards.into_iter().map(|s| vec![s]));
                }
                Err(Error::Etcd(etcd_client::Error::GRpcStatus(status)))
                    if shards.len() > 1 && status.code() == tonic::Code::InvalidArgument =>
                {
                    refused = Some(status.message().to_owned());
                    pending.extend(shards.into_iter().map(|s| vec![s]));
                }
                Ok(Some(epoch)) => {
                    for shard in shards {
                        // Announced first: no call of the ownership may start before
                        // its `acquired` hook was queued.
                        self.inner.listener.acquired(shard, epoch);
                        if table.set_owned(generation, shard, epoch) {
                            acquired += 1;
                        } else {
                            self.inner.listener.lost(shard, epoch);
                        }
                    }
                }
                Ok(None) => {} // someone else still holds it; the watch will tell
                // The write may have been applied all the same: the repair pass adopts
                // keys held under this lease that the table lacks.
                Err(e) => {
                    failed += shards.len();
                    last_error = Some(e);
                }
            }
        }
        if let Some(reason) = refused {
            let mut refused_at = self.inner.batches_refused.lock().expect("batches lock");
            if !refused_lately {
                tracing::warn!(%reason, "etcd refused a batch of shard keys (is its --max-txn-ops below 32?); writing shard keys one by one for the next 10 minutes");
            }
            *refused_at = Some(Instant::now());
        }
        if let Some(e) = last_error {
            tracing::warn!(shards = failed, error = %e, "shard acquisition failed");
        }
        if acquired > 0 {
            self.inner.metrics.acquired.add(acquired);
            tracing::info!(
                shards = acquired,
                owned = table.held().len(),
                "shards acquired"
            );
        }
    }

    /// Writes the keys of `shards` under `lease` in one transaction if none of them
    /// exists; the epoch they then share is that transaction's revision. A chunk costs one
    /// etcd round trip and one raft entry instead of one per shard.
    async fn write_shards(
        &self,
        shards: &[ShardId],
        value: &[u8],
        lease: i64,
    ) -> Result<Option<Epoch>, Error> {
        let keys: Vec<String> = shards.iter().map(|&s| self.inner.keys.shard(s)).collect();
        let when: Vec<Compare> = keys
            .iter()
            .map(|k| Compare::create_revision(k.clone(), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = keys
            .into_iter()
            .map(|k| TxnOp::put(k, value, Some(PutOptions::new().with_lease(lease))))
            .collect();
        let mut client = self.client()?;
        let resp = self
            .etcd(client.txn(Txn::new().when(when).and_then(puts)))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(resp.succeeded().then_some(Epoch(revision as u64)))
    }

    /// Starts a handoff for owned shards assigned elsewhere.
    fn release(&self, shards: Vec<ShardId>) {
        for shard in shards {
            if matches!(self.inner.table.state(shard), LocalState::Owned(_)) {
                let coord = self.clone();
                let span = tracing::info_span!("handoff", %shard);
                self.inner.tasks.spawn(tracing::Instrument::instrument(
                    async move { coord.handoff(shard).await },
                    span,
                ));
            }
        }
    }

    /// Planned move: stop new work, let in-flight work finish, delete the shard key.
    ///
    /// In-flight handler calls end by their deadline at the latest, so the wait is bounded
    /// by the request timeout; the key is never deleted while a call still runs.
    pub(crate) async fn handoff(self, shard: ShardId) {
        let table = &self.inner.table;
        let started = Instant::now();
        // None: not owned, or another handoff of this shard is already running.
        let Some(epoch) = table.begin_move(shard) else {
            return;
        };
        table.wait_idle(shard).await;
        if table.state(shard) != LocalState::Moving(epoch) {
            return; // lost meanwhile (the lease or the key went): reported lost already
        }
        // No call runs for the shard now and none starts: the handler flushes what it
        // keeps for it before the next owner can take it.
        self.inner.listener.releasing(shard, epoch).await;
        let key = self.inner.keys.shard(shard);
        let mut backoff = Duration::from_millis(50);
        loop {
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    epoch.0 as i64,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            let result = async {
                let mut client = self.client()?;
                self.etcd(client.txn(txn)).await
            }
            .await;
            match result {
                Ok(_) => break, // deleted, or already gone with our lease
                Err(e) if table.state(shard) == LocalState::Moving(epoch) => {
                    tracing::warn!(%shard, error = %e, "shard release failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(_) => return, // the lease was lost meanwhile; drop_all already released it
            }
        }
        if table.state(shard) == LocalState::Moving(epoch) {
            table.set_not_owned(shard);
            self.inner.metrics.released.inc();
            self.inner.metrics.handoff.observe(started.elapsed());
            tracing::debug!(%shard, %epoch, took = ?started.elapsed(), "shard handed off");
        }
    }

    /// Repairs shard keys attached to this instance's lease that its table does not hold.
    ///
    /// Nobody serves such a shard until it is repaired: peers route to this instance,
    /// which answers "not owner". They appear when an acquisition committed but its answer
    /// was lost (timeout), or when a shard was dropped on a view that ran ahead of its
    /// events. Runs between the acquisitions of this loop, so none is in flight; every
    /// repair is checked against etcd, never decided on the view alone.
    async fn repair(&self, repairs: Vec<OrphanKey>, session: Session) {
        let table = &self.inner.table;
        let repairs = repairs
            .into_iter()
            // A shard dropped while calls still run on it is deleted only once they ended
            // (a later pass): its next owner must not overlap them.
            .filter(|r| r.action == Repair::Adopt || table.in_flight(r.shard) == 0);
        let passes = futures::stream::iter(repairs).map(|repair| async move {
            let generation = table.generation();
            let (shard, epoch) = (repair.shard, repair.epoch);
            let key = self.inner.keys.shard(shard);
            let txn = match repair.action {
                Repair::Adopt => Txn::new()
                    .when([
                        Compare::create_revision(key.clone(), CompareOp::Equal, epoch.0 as i64),
                        Compare::lease(key.clone(), CompareOp::Equal, session.lease),
                    ])
                    .and_then([TxnOp::get(key, None)]),
                Repair::Delete => Txn::new()
                    .when([Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        epoch.0 as i64,
                    )])
                    .and_then([TxnOp::delete(key, None)]),
            };
            let result = async {
                let mut client = self.client()?;
                self.etcd(client.txn(txn)).await
            }
            .await;
            match (result, repair.action) {
                (Ok(r), Repair::Adopt) if r.succeeded() => {
                    self.inner.listener.acquired(shard, epoch);
                    if !table.set_owned(generation, shard, epoch) {
                        self.inner.listener.lost(shard, epoch);
                    } else {
                        self.inner.metrics.acquired.inc();
                        tracing::warn!(%shard, %epoch, "adopted a shard key held by this instance's lease but missing from its table");
                    }
                }
                (Ok(r), Repair::Delete) if r.succeeded() => {
                    tracing::warn!(%shard, %epoch, "deleted a shard key held by this instance's lease but assigned elsewhere");
                }
                (Ok(_), _) => {} // gone or replaced meanwhile: the view was behind
                (Err(e), _) => {
                    tracing::warn!(%shard, error = %e, "shard key repair failed; retrying on the next pass")
                }
            }
        });
        passes
            .buffer_unordered(REPAIR_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Drops shards whose key the routing table shows gone or owned by another epoch.
    fn drop_lost(&self, shards: &[(ShardId, Epoch)]) {
        let mut lost = Vec::new();
        for &(shard, epoch) in shards {
            // Still as decided (a handoff may have started meanwhile).
            if self.inner.table.state(shard) == LocalState::Owned(epoch) {
                self.inner.table.set_not_owned(shard);
                self.inner.listener.lost(shard, epoch);
                lost.push(shard.0);
            }
        }
        if !lost.is_empty() {
            self.inner.metrics.released.add(lost.len() as u64);
            tracing::warn!(
                shards = lost.len(),
                first = lost[0],
                "shard keys gone from etcd (lease expired?); dropped them"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShardOwner;

    fn view_with(owners: &[(u32, &str, u64, i64)], assigned: &[(u32, &str)]) -> View {
        let mut v = View::empty(4);
        v.synced = true;
        v.assignment_version = 1;
        for &(s, owner, epoch, lease) in owners {
            v.shards[s as usize] = Some(Arc::new(ShardOwner {
                owner: MemberId::new(owner),
                address: String::new(),
                peer: Default::default(),
                epoch: Epoch(epoch),
                lease,
            }));
        }
        for &(s, m) in assigned {
            Arc::make_mut(&mut v.assignment)[s as usize] = Some(MemberId::new(m));
        }
        v
    }

    #[test]
    fn keys_on_our_lease_missing_locally_are_adopted_or_deleted() {
        let me = MemberId::new("a");
        let view = view_with(
            &[
                (0, "a", 10, 7),
                (1, "a", 11, 7),
                (2, "a", 12, 7),
                (3, "b", 13, 9),
            ],
            &[(0, "a"), (1, "b"), (2, "a"), (3, "b")],
        );
        // Shard 2 is held locally; shard 3 belongs to another member's lease.
        let local = |s: ShardId| {
            if s.0 == 2 {
                LocalState::Owned(Epoch(12))
            } else {
                LocalState::NotOwned
            }
        };
        assert_eq!(
            orphans(&view, &me, 7, false, local),
            vec![
                OrphanKey {
                    shard: ShardId(0),
                    epoch: Epoch(10),
                    action: Repair::Adopt
                },
                OrphanKey {
                    shard: ShardId(1),
                    epoch: Epoch(11),
                    action: Repair::Delete
                },
            ]
        );
        // Draining: nothing is adopted.
        assert!(orphans(&view, &me, 7, true, local)
            .iter()
            .all(|o| o.action == Repair::Delete));
        // Keys of an earlier lease of ours are not touched (they expire with it).
        assert!(orphans(&view, &me, 8, false, local).is_empty());
        // No lease, or a view not synced: nothing.
        assert!(orphans(&view, &me, 0, false, local).is_empty());
        let mut unsynced = view.clone();
        unsynced.synced = false;
        assert!(orphans(&unsynced, &me, 7, false, local).is_empty());
    }

    mod decide {
        use proptest::prelude::*;

        use super::*;

        const MEMBERS: [&str; 3] = ["a", "b", "c"];
        const OUR_LEASE: i64 = 7;

        #[derive(Debug, Clone)]
        struct Case {
            view: View,
            local: Vec<LocalState>,
            lease: i64,
            draining: bool,
        }

        fn case() -> impl Strategy<Value = Case> {
            let shard = (
                prop::option::of((
                    0..3usize,
                    1..60u64,
                    prop_oneof![Just(7i64), Just(8), Just(9)],
                )),
                prop::option::of(0..3usize),
                prop_oneof![
                    Just(None),
                    (1..60u64).prop_map(|e| Some(LocalState::Owned(Epoch(e)))),
                    (1..60u64).prop_map(|e| Some(LocalState::Moving(Epoch(e)))),
                ],
            );
            (
                prop::collection::vec(shard, 1..24),
                0..70i64,
                any::<bool>(),
                prop_oneof![Just(0u64), Just(3)],
                prop_oneof![Just(OUR_LEASE), Just(0)],
                any::<bool>(),
            )
                .prop_map(|(shards, revision, synced, version, lease, draining)| {
                    let mut view = View::empty(shards.len() as u32);
                    view.revision = revision;
                    view.synced = synced;
                    view.assignment_version = version;
                    let mut local = Vec::new();
                    for (i, (owner, assigned, state)) in shards.into_iter().enumerate() {
                        view.shards[i] = owner.map(|(m, epoch, lease)| {
                            Arc::new(ShardOwner {
                                owner: MemberId::new(MEMBERS[m]),
                                address: String::new(),
                                peer: Default::default(),
                                epoch: Epoch(epoch),
                                lease,
                            })
                        });
                        Arc::make_mut(&mut view.assignment)[i] =
                            assigned.map(|m| MemberId::new(MEMBERS[m]));
                        local.push(state.unwrap_or(LocalState::NotOwned));
                    }
                    Case {
                        view,
                        local,
                        lease,
                        draining,
                    }
                })
        }

        proptest! {
            #[test]
            fn a_pass_takes_only_what_is_free_and_assigned_and_drops_only_what_it_lost(c in case()) {
                let me = MemberId::new("a");
                let local = |s: ShardId| c.local[s.0 as usize];
                let d = decide(&c.view, &me, c.lease, c.draining, local);
                let v = &c.view;
                if !v.synced {
                    prop_assert_eq!(d, Decision::default());
                    return Ok(());
                }
                let lost: Vec<ShardId> = d.lost.iter().map(|(s, _)| *s).collect();
                // Lost: exactly the owned shards whose key the caught-up view shows gone
                // or owned by another (member, epoch).
                for s in (0..v.shard_count()).map(ShardId) {
                    let expected = match local(s) {
                        LocalState::Owned(e) if v.revision >= e.0 as i64 => !v
                            .owner(s)
                            .is_some_and(|o| o.owner == me && o.epoch == e),
                        _ => false,
                    };
                    prop_assert_eq!(lost.contains(&s), expected, "lost {}", s);
                }
                for &s in &d.acquire {
                    // Never a shard the view shows owned, never while draining, only ours.
                    prop_assert!(!c.draining);
                    prop_assert!(v.owner(s).is_none());
                    prop_assert_eq!(v.assigned(s), Some(&me));
                    prop_assert!(local(s) == LocalState::NotOwned || lost.contains(&s));
                }
                for &s in &d.release {
                    prop_assert!(v.assignment_version > 0);
                    prop_assert!(matches!(local(s), LocalState::Owned(_)));
                    prop_assert!(!lost.contains(&s) && !d.acquire.contains(&s));
                    prop_assert_ne!(v.assigned(s), Some(&me));
                }
                for r in &d.repair {
                    let owner = v.owner(r.shard).expect("a repaired key exists");
                    prop_assert_eq!(owner.lease, c.lease);
                    prop_assert_eq!(&owner.owner, &me);
                    prop_assert!(!d.acquire.contains(&r.shard));
                    if r.action == Repair::Adopt {
                        prop_assert!(!c.draining);
                        prop_assert_eq!(v.assigned(r.shard), Some(&me));
                    }
                }
                // Completeness: every free shard assigned here is acquired (unless draining).
                for s in (0..v.shard_count()).map(ShardId) {
                    let free = v.assigned(s) == Some(&me)
                        && v.owner(s).is_none()
                        && (local(s) == LocalState::NotOwned || lost.contains(&s));
                    prop_assert_eq!(d.acquire.contains(&s), free && !c.draining, "acquire {}", s);
                }
            }
        }
    }
}
