//! The routing table smart clients follow (`Entities.WatchRouting`).

use std::collections::HashMap;
use std::time::Duration;

use leasehold_coord::{MemberState, View};
use leasehold_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::Router;

/// At most one table per this interval: a rebalance moves many shards in a burst, and
/// one table after the burst serves clients as well as one per shard.
pub const COALESCE: Duration = Duration::from_millis(100);

/// The client's view of `view`: members by index, each shard's owner and epoch. Owners
/// that are not (or no longer) members still get an entry, so every owned shard has an
/// address.
pub fn routing_table(view: &View) -> pb::RoutingTable {
    let mut members: Vec<pb::RoutingMember> = view
        .members
        .values()
        .map(|m| pb::RoutingMember {
            id: m.id.0.clone(),
            address: m.address.clone(),
            draining: m.state == MemberState::Draining,
        })
        .collect();
    let mut index: HashMap<String, u32> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.clone(), i as u32 + 1))
        .collect();
    let mut owners = Vec::with_capacity(view.shards.len());
    let mut epochs = Vec::with_capacity(view.shards.len());
    for shard in &view.shards {
        match shard {
            None => {
                owners.push(0);
                epochs.push(0);
            }
            Some(o) => {
                let slot = *index.entry(o.owner.0.clone()).or_insert_with(|| {
                    members.push(pb::RoutingMember {
                        id: o.owner.0.clone(),
                        address: o.address.clone(),
                        draining: false,
                    });
                    members.len() as u32
                });
                owners.push(slot);
                epochs.push(o.epoch.0);
            }
        }
    }
    pb::RoutingTable {
        shard_count: view.shard_count(),
        hash_version: leasehold_types::HASH_VERSION,
        revision: view.revision,
        members,
        owners,
        epochs,
    }
}

/// Routing streams one instance serves at once; more are refused with
/// `RESOURCE_EXHAUSTED` (each costs a task and a table copy per change).
pub const MAX_WATCHERS: usize = 4096;

/// How long a stream waits on an instance without a current table (not synced with
/// etcd, or its lease invalid: cut off from etcd) before ending, so its client moves to
/// another instance.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The table of the latest view, built once per etcd revision and shared by every stream.
pub struct RoutingCache {
    latest: std::sync::Mutex<Option<(i64, std::sync::Arc<pb::RoutingTable>)>>,
    watchers: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for RoutingCache {
    fn default() -> Self {
        Self {
            latest: Default::default(),
            watchers: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
        }
    }
}

impl RoutingCache {
    fn table(&self, view: &View) -> std::sync::Arc<pb::RoutingTable> {
        let mut latest = self.latest.lock().expect("routing cache lock");
        match &*latest {
            Some((revision, table)) if *revision == view.revision => table.clone(),
            _ => {
                let table = std::sync::Arc::new(routing_table(view));
                *latest = Some((view.revision, table.clone()));
                table
            }
        }
    }
}

/// Starts a routing stream for one client, or refuses it when `MAX_WATCHERS` run.
pub fn watch(router: &Router) -> Result<mpsc::Receiver<Result<pb::RoutingTable, Status>>, Status> {
    let permit = router
        .routing_cache()
        .watchers
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Status::resource_exhausted(format!(
                "this instance already serves {MAX_WATCHERS} routing streams; watch another instance"
            ))
        })?;
    let (tx, rx) = mpsc::channel(1);
    let router = router.clone();
    tokio::spawn(async move {
        let _permit = permit;
        stream_routing(router, tx).await;
    });
    Ok(rx)
}

/// Sends the table now (once this instance has a current one) and after every change
/// that alters it, at most once per [`COALESCE`], until the client leaves, the router
/// closes (shutdown: the client reconnects elsewhere), or the instance has had no current
/// table for [`STALE_AFTER`].
async fn stream_routing(router: Router, tx: mpsc::Sender<Result<pb::RoutingTable, Status>>) {
    let mut views = router.coord().subscribe_view();
    let closing = router.closing().clone();
    let mut sent: Option<std::sync::Arc<pb::RoutingTable>> = None;
    let mut stale_since: Option<tokio::time::Instant> = None;
    loop {
        let view = views.borrow_and_update().clone();
        let current = view.synced && router.coord().table().lease().valid_until().is_some();
        if current {
            stale_since = None;
            let table = router.routing_cache().table(&view);
            let changed = sent.as_ref().is_none_or(|s| {
                s.owners != table.owners || s.epochs != table.epochs || s.members != table.members
            });
            if changed {
                tokio::select! {
                    _ = closing.cancelled() => return,
                    r = tx.send(Ok((*table).clone())) => if r.is_err() { return },
                }
                sent = Some(table);
            }
        } else {
            let since = *stale_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= STALE_AFTER {
                let _ = tx.try_send(Err(Status::unavailable(
                    "this instance has no current routing table (not synced with etcd, or its lease is invalid); watch another instance",
                )));
                return;
            }
        }
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tx.closed() => return,
            changed = views.changed() => if changed.is_err() { return },
            // Re-checks staleness while the view does not change.
            _ = tokio::time::sleep(STALE_AFTER / 5), if !current => {}
        }
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(COALESCE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use leasehold_coord::{Member, PeerAddress, ShardOwner};
    use leasehold_types::{Epoch, MemberId};

    use super::*;

    fn member(id: &str, state: MemberState) -> Member {
        Member {
            id: MemberId::new(id),
            address: format!("{id}:7070"),
            admin_address: String::new(),
            peer: PeerAddress::default(),
            state,
            lease: 1,
        }
    }

    fn owner(id: &str, epoch: u64) -> Option<Arc<ShardOwner>> {
        Some(Arc::new(ShardOwner {
            owner: MemberId::new(id),
            address: format!("{id}:7070"),
            peer: PeerAddress::default(),
            epoch: Epoch(epoch),
            lease: 1,
        }))
    }

    #[test]
    fn owners_are_indexed_into_members_and_unowned_shards_are_zero() {
        let mut view = View::empty(4);
        view.revision = 42;
        for m in [
            member("a", MemberState::Active),
            member("b", MemberState::Draining),
        ] {
            view.members.insert(m.id.clone(), m);
        }
        view.shards = vec![owner("b", 7), None, owner("a", 9), owner("gone", 3)];
        let t = routing_table(&view);
        assert_eq!((t.shard_count, t.hash_version, t.revision), (4, 1, 42));
        let ids: Vec<_> = t.members.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "gone"]);
        assert!(t.members[1].draining && !t.members[0].draining);
        assert_eq!(t.members[2].address, "gone:7070");
        assert_eq!(t.owners, [2, 0, 1, 3]);
        assert_eq!(t.epochs, [7, 0, 9, 3]);
    }
}
