//! The reconciler: register, lead, acquire what is assigned here, hand off the rest.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use leasehold_placement::{plan, PlanInput};
use leasehold_types::{Epoch, MemberId, ShardId};
use tokio_util::sync::CancellationToken;

use crate::keys::{AssignmentValue, MemberState, MemberValue, ShardValue};
use crate::{Coord, Error, LocalState, Session, View};

/// How many shard acquisitions run at once.
const ACQUIRE_CONCURRENCY: usize = 64;

impl Coord {
    pub(crate) async fn reconciler(self, cancel: CancellationToken) {
        let mut view_rx = self.inner.view.subscribe();
        let mut session_rx = self.inner.session.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registered = 0u64;
        let mut written_version = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = view_rx.changed() => {}
                _ = session_rx.changed() => {}
                _ = self.inner.wake.notified() => {}
                _ = tick.tick() => {}
            }
            // Let a burst of watch events land before acting on it.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let session = *session_rx.borrow_and_update();
            if session.lease == 0 {
                continue;
            }
            if registered != session.generation {
                match self.register(session).await {
                    Ok(()) => registered = session.generation,
                    Err(e) => {
                        tracing::warn!(error = %e, "member registration failed");
                        continue;
                    }
                }
            }
            let view = view_rx.borrow_and_update().clone();
            if !view.synced {
                continue;
            }
            let me = self.member_id().clone();
            if view
                .members
                .get(&me)
                .is_some_and(|m| m.state == MemberState::Draining)
                && !self.inner.draining.swap(true, Ordering::AcqRel)
            {
                tracing::info!("member marked draining");
            }
            if let Err(e) = self.lead(&view, session, &mut written_version).await {
                tracing::warn!(error = %e, "leader step failed");
            }
            self.check_lost(&view);
            self.acquire(&view, session).await;
            self.release(&view);
            self.refresh_metrics();
        }
    }

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
    async fn lead(&self, view: &View, session: Session, written: &mut u64) -> Result<(), Error> {
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
        if view.assignment_version < *written {
            return Ok(()); // our last write has not reached the view yet
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
        let assignment = plan(PlanInput {
            active: &active,
            owners: &owners,
            previous,
            max_moves: self.inner.opts.max_moves,
        });
        if view.assignment_version > 0 && assignment == view.assignment {
            return Ok(());
        }
        let version = view.assignment_version + 1;
        let value = serde_json::to_vec(&AssignmentValue::encode(version, &assignment))
            .expect("assignment serialises");
        // Only the holder of the leader key (by lease) may write the assignment.
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, session.lease)])
            .and_then([TxnOp::put(self.inner.keys.assignment(), value, None)]);
        if self.etcd(client.txn(txn)).await?.succeeded() {
            *written = version;
            let moves = leasehold_placement::pending_moves(&owners, &assignment);
            tracing::info!(version, members = active.len(), moves, "assignment written");
        }
        Ok(())
    }

    /// Acquires every free shard assigned to this instance.
    async fn acquire(&self, view: &View, session: Session) {
        if self.is_draining() {
            return;
        }
        let me = self.member_id();
        let table = &self.inner.table;
        let generation = table.generation();
        let wanted: Vec<ShardId> = (0..view.shard_count())
            .map(ShardId)
            .filter(|&s| view.assigned(s) == Some(me) && view.owner(s).is_none())
            .filter(|&s| table.state(s) == LocalState::NotOwned)
            .collect();
        if wanted.is_empty() {
            return;
        }
        let value = serde_json::to_vec(&ShardValue {
            owner: me.clone(),
            address: self.inner.opts.address.clone(),
        })
        .expect("shard value serialises");
        let attempts = futures::stream::iter(wanted).map(|shard| {
            let value = value.clone();
            async move {
                let key = self.inner.keys.shard(shard);
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key,
                        value,
                        Some(PutOptions::new().with_lease(session.lease)),
                    )]);
                let mut client = self.client()?;
                let resp = self.etcd(client.txn(txn)).await?;
                let revision = resp.header().map_or(0, |h| h.revision());
                Ok::<_, Error>((shard, resp.succeeded().then_some(Epoch(revision as u64))))
            }
        });
        let results: Vec<_> = attempts
            .buffer_unordered(ACQUIRE_CONCURRENCY)
            .collect()
            .await;
        let mut acquired = 0;
        let (mut failed, mut last_error) = (0, None);
        for result in results {
            match result {
                Ok((shard, Some(epoch))) => {
                    if table.set_owned(generation, shard, epoch) {
                        acquired += 1;
                        self.inner.listener.acquired(shard, epoch);
                    }
                }
                Ok((_, None)) => {} // someone else still holds it; the watch will tell
                Err(e) => {
                    failed += 1;
                    last_error = Some(e);
                }
            }
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

    /// Starts a handoff for every owned shard that is assigned elsewhere.
    fn release(&self, view: &View) {
        if view.assignment_version == 0 {
            return;
        }
        let me = self.member_id();
        for (shard, state) in self.inner.table.held() {
            if matches!(state, LocalState::Owned(_)) && view.assigned(shard) != Some(me) {
                let coord = self.clone();
                tokio::spawn(async move { coord.handoff(shard).await });
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
            self.inner.listener.released(shard, epoch);
            self.inner.metrics.released.inc();
            self.inner.metrics.handoff.observe(started.elapsed());
            tracing::debug!(%shard, %epoch, took = ?started.elapsed(), "shard handed off");
        }
    }

    /// Drops shards whose key the routing table shows gone or owned by another epoch.
    fn check_lost(&self, view: &View) {
        let me = self.member_id();
        let mut lost = Vec::new();
        for (shard, state) in self.inner.table.held() {
            let LocalState::Owned(epoch) = state else {
                continue;
            };
            if view.revision < epoch.0 as i64 {
                continue; // the view has not seen our acquisition yet
            }
            let ours = view
                .owner(shard)
                .is_some_and(|o| o.owner == *me && o.epoch == epoch);
            if !ours {
                self.inner.table.set_not_owned(shard);
                self.inner.listener.released(shard, epoch);
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
