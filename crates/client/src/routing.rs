//! The routing table as the client keeps it, and the task that follows it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use leasehold_proto::v1::{self as pb, entities_client::EntitiesClient};
use leasehold_types::{shard_for_key, HASH_VERSION};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// A member as the table names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingMember {
    pub id: String,
    /// Client address (`host:port`).
    pub address: String,
    pub draining: bool,
}

/// Where a key lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub shard: u32,
    /// `None` while the shard has no owner.
    pub owner: Option<String>,
    pub address: Option<String>,
    pub epoch: u64,
}

/// A routing table received from the cluster.
#[derive(Debug, Clone)]
pub struct Routing {
    /// etcd revision it reflects.
    pub revision: i64,
    pub shard_count: u32,
    /// Whether this client computes shards with the cluster's hash; if not, every call
    /// goes to any instance.
    pub hash_known: bool,
    members: Vec<RoutingMember>,
    by_id: HashMap<String, usize>,
    /// Per shard: index into `members` + 1, 0 = unowned.
    owners: Vec<u32>,
    epochs: Vec<u64>,
}

impl Routing {
    /// Checks and indexes a table; `None` when it is malformed (lengths or indices that
    /// do not fit), which the follower logs and skips.
    pub fn from_table(t: pb::RoutingTable) -> Option<Routing> {
        let shards = t.shard_count as usize;
        if t.owners.len() != shards
            || t.epochs.len() != shards
            || t.owners.iter().any(|&o| o as usize > t.members.len())
        {
            return None;
        }
        let members: Vec<RoutingMember> = t
            .members
            .into_iter()
            .map(|m| RoutingMember {
                id: m.id,
                address: m.address,
                draining: m.draining,
            })
            .collect();
        let by_id = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        Some(Routing {
            revision: t.revision,
            shard_count: t.shard_count,
            hash_known: t.hash_version == HASH_VERSION && t.shard_count > 0,
            members,
            by_id,
            owners: t.owners,
            epochs: t.epochs,
        })
    }

    pub fn members(&self) -> &[RoutingMember] {
        &self.members
    }

    pub fn member(&self, id: &str) -> Option<&RoutingMember> {
        self.by_id.get(id).map(|&i| &self.members[i])
    }

    /// The member whose client address, made a URL by `url`, is `target`.
    pub(crate) fn member_at(
        &self,
        target: &str,
        url: impl Fn(&str) -> String,
    ) -> Option<&RoutingMember> {
        self.members.iter().find(|m| url(&m.address) == target)
    }

    /// The key's shard, if this client knows the cluster's hash.
    pub fn shard_for(&self, key: &str) -> Option<u32> {
        self.hash_known
            .then(|| shard_for_key(key.as_bytes(), self.shard_count).0)
    }

    /// The shard's owner, if it has one.
    pub fn owner(&self, shard: u32) -> Option<&RoutingMember> {
        match *self.owners.get(shard as usize)? {
            0 => None,
            i => self.members.get(i as usize - 1),
        }
    }

    pub fn epoch(&self, shard: u32) -> u64 {
        self.epochs.get(shard as usize).copied().unwrap_or(0)
    }

    /// Where `key` lives in this table.
    pub fn locate(&self, key: &str) -> Option<Location> {
        let shard = self.shard_for(key)?;
        let owner = self.owner(shard);
        Some(Location {
            shard,
            owner: owner.map(|m| m.id.clone()),
            address: owner.map(|m| m.address.clone()),
            epoch: self.epoch(shard),
        })
    }

    /// Shards each member owns.
    pub fn shards_by_owner(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for shard in 0..self.shard_count {
            if let Some(m) = self.owner(shard) {
                *counts.entry(m.id.as_str()).or_default() += 1;
            }
        }
        counts
    }
}

/// How long a new stream may take to deliver its first table.
const FIRST_TABLE: Duration = Duration::from_secs(5);

/// Keeps a `WatchRouting` stream open to one instance after another (seeds and the
/// members the table names), publishing each newer table, until `stop`.
pub(crate) async fn follow(shared: Arc<Shared>, stop: CancellationToken) {
    let mut turn = 0usize;
    let mut backoff = Duration::from_millis(50);
    loop {
        let instances = shared.instances();
        let url = instances[turn % instances.len()].clone();
        turn += 1;
        let got_one = tokio::select! {
            _ = stop.cancelled() => return,
            r = watch_one(&shared, &url) => r,
        };
        if got_one {
            backoff = Duration::from_millis(50);
        } else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Follows one instance's stream until it ends; true if it delivered a table.
async fn watch_one(shared: &Shared, url: &str) -> bool {
    let Ok(channel) = shared.channel(url) else {
        return false;
    };
    let mut client = EntitiesClient::new(channel).max_decoding_message_size(crate::MAX_MESSAGE);
    let mut stream = match client.watch_routing(pb::WatchRoutingRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            tracing::debug!(instance = url, error = %e, "routing stream did not open");
            return false;
        }
    };
    let mut delivered = false;
    loop {
        // An instance without a current table says nothing; move on after a while.
        let next = if delivered {
            stream.message().await
        } else {
            match tokio::time::timeout(FIRST_TABLE, stream.message()).await {
                Ok(next) => next,
                Err(_) => {
                    tracing::debug!(
                        instance = url,
                        "no routing table within {FIRST_TABLE:?}; trying another instance"
                    );
                    return false;
                }
            }
        };
        match next {
            Ok(Some(table)) => {
                let revision = table.revision;
                let Some(routing) = Routing::from_table(table) else {
                    tracing::warn!(instance = url, revision, "malformed routing table skipped");
                    continue;
                };
                delivered = true;
                // The instance streaming is the authority while connected (revisions may
                // also go back after an etcd restore): its table replaces ours.
                shared.prune_channels(&routing);
                shared.routing.send_replace(Some(Arc::new(routing)));
                shared.hints.lock().expect("hints lock").clear();
            }
            Ok(None) => return delivered,
            Err(e) => {
                tracing::debug!(instance = url, error = %e, "routing stream ended");
                return delivered;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(owners: Vec<u32>, hash_version: u32) -> pb::RoutingTable {
        let n = owners.len();
        pb::RoutingTable {
            shard_count: n as u32,
            hash_version,
            revision: 7,
            members: vec![
                pb::RoutingMember {
                    id: "a".into(),
                    address: "a:1".into(),
                    draining: false,
                },
                pb::RoutingMember {
                    id: "b".into(),
                    address: "b:1".into(),
                    draining: true,
                },
            ],
            epochs: (0..n as u64).map(|e| e * 10).collect(),
            owners,
        }
    }

    #[test]
    fn a_key_is_located_with_the_clusters_hash() {
        let owners: Vec<u32> = (0..1024).map(|s| (s % 3) as u32).collect();
        let r = Routing::from_table(table(owners, 1)).expect("valid");
        // "account-1" is shard 71 of 1024 (the hash's published test vector).
        let l = r.locate("account-1").expect("hash known");
        assert_eq!(l.shard, 71);
        assert_eq!(l.owner.as_deref(), Some("b"));
        assert_eq!(l.address.as_deref(), Some("b:1"));
        assert_eq!(l.epoch, 710);
        // Shard 72 % 3 == 0: unowned.
        assert_eq!(r.owner(72), None);
        assert_eq!(r.shards_by_owner()["a"], 341);
    }

    #[test]
    fn an_unknown_hash_computes_no_shard() {
        let r = Routing::from_table(table(vec![1, 2], 2)).expect("valid");
        assert!(!r.hash_known);
        assert_eq!(r.shard_for("k"), None);
        assert_eq!(r.locate("k"), None);
    }

    #[test]
    fn malformed_tables_are_refused() {
        let mut t = table(vec![1, 2], 1);
        t.owners[1] = 3;
        assert!(Routing::from_table(t).is_none());
        let mut t = table(vec![1, 2], 1);
        t.epochs.pop();
        assert!(Routing::from_table(t).is_none());
    }
}
