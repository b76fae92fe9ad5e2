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

/// Sends the table now (once this instance has synced with etcd) and after every change
/// that alters it, at most once per [`COALESCE`], until the client leaves or the router
/// closes (shutdown: the client reconnects elsewhere).
pub async fn stream_routing(router: Router, tx: mpsc::Sender<Result<pb::RoutingTable, Status>>) {
    let mut views = router.coord().subscribe_view();
    let closing = router.closing().clone();
    let mut sent: Option<pb::RoutingTable> = None;
    loop {
        let view = views.borrow_and_update().clone();
        if view.synced {
            let table = routing_table(&view);
            let changed = sent.as_ref().is_none_or(|s| {
                s.owners != table.owners || s.epochs != table.epochs || s.members != table.members
            });
            if changed {
                if tx.send(Ok(table.clone())).await.is_err() {
                    return;
                }
                sent = Some(table);
            }
        }
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tx.closed() => return,
            changed = views.changed() => if changed.is_err() { return },
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
