//! The routing table: every instance's local copy of the cluster's keyspace, built from a
//! snapshot and kept current by a watch.

use std::collections::BTreeMap;

use leasehold_types::{Epoch, MemberId, ShardId};

use crate::keys::{AssignmentValue, Key, Keys, MemberState, MemberValue, ShardValue};

/// A member as seen in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    pub address: String,
    pub admin_address: String,
    pub state: MemberState,
    /// Lease the member key is attached to (used to mark another member draining).
    pub lease: i64,
}

/// Current owner of a shard as seen in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOwner {
    pub owner: MemberId,
    pub address: String,
    pub epoch: Epoch,
    /// Lease the shard key is attached to (the owner's lease when it was acquired).
    pub lease: i64,
}

/// A consistent picture of the cluster at one etcd revision.
#[derive(Debug, Clone)]
pub struct View {
    /// etcd revision this view reflects.
    pub revision: i64,
    /// True once a snapshot was loaded and the watch is running.
    pub synced: bool,
    pub members: BTreeMap<MemberId, Member>,
    pub leader: Option<MemberId>,
    pub assignment_version: u64,
    /// Desired owner per shard (from the leader).
    pub assignment: Vec<Option<MemberId>>,
    /// Actual owner per shard.
    pub shards: Vec<Option<ShardOwner>>,
}

impl View {
    pub fn empty(shard_count: u32) -> Self {
        Self {
            revision: 0,
            synced: false,
            members: BTreeMap::new(),
            leader: None,
            assignment_version: 0,
            assignment: vec![None; shard_count as usize],
            shards: vec![None; shard_count as usize],
        }
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn owner(&self, shard: ShardId) -> Option<&ShardOwner> {
        self.shards.get(shard.0 as usize)?.as_ref()
    }

    pub fn assigned(&self, shard: ShardId) -> Option<&MemberId> {
        self.assignment.get(shard.0 as usize)?.as_ref()
    }

    pub fn unowned(&self) -> usize {
        self.shards.iter().filter(|s| s.is_none()).count()
    }

    /// Number of shards each member owns.
    pub fn owned_by(&self, member: &MemberId) -> usize {
        self.shards
            .iter()
            .flatten()
            .filter(|s| s.owner == *member)
            .count()
    }

    /// Applies a put (`Some(value)`) or delete (`None`) of one key.
    pub fn apply(&mut self, keys: &Keys, key: &[u8], put: Option<(&[u8], i64, i64)>) {
        let Some(key) = keys.parse(key) else { return };
        match (key, put) {
            (Key::Config, _) => {}
            (Key::Member(id), Some((value, _, lease))) => {
                match serde_json::from_slice::<MemberValue>(value) {
                    Ok(v) => {
                        self.members.insert(
                            id.clone(),
                            Member {
                                id,
                                address: v.address,
                                admin_address: v.admin_address,
                                state: v.state,
                                lease,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(member = %id, error = %e, "ignoring unreadable member value")
                    }
                }
            }
            (Key::Member(id), None) => {
                self.members.remove(&id);
            }
            (Key::Leader, Some((value, _, _))) => {
                self.leader = Some(MemberId::new(String::from_utf8_lossy(value)));
            }
            (Key::Leader, None) => self.leader = None,
            (Key::Assignment, Some((value, _, _))) => {
                match serde_json::from_slice::<AssignmentValue>(value) {
                    Ok(v) if v.shards.len() == self.shards.len() => {
                        self.assignment_version = v.version;
                        self.assignment = v.decode();
                    }
                    Ok(v) => tracing::warn!(
                        shards = v.shards.len(),
                        "ignoring assignment for another shard count"
                    ),
                    Err(e) => tracing::warn!(error = %e, "ignoring unreadable assignment"),
                }
            }
            (Key::Assignment, None) => {
                self.assignment_version = 0;
                self.assignment.iter_mut().for_each(|a| *a = None);
            }
            (Key::Shard(shard), put) => {
                let Some(slot) = self.shards.get_mut(shard.0 as usize) else {
                    return;
                };
                *slot = match put {
                    Some((value, create_revision, lease)) => {
                        match serde_json::from_slice::<ShardValue>(value) {
                            Ok(v) => Some(ShardOwner {
                                owner: v.owner,
                                address: v.address,
                                epoch: Epoch(create_revision as u64),
                                lease,
                            }),
                            Err(e) => {
                                tracing::warn!(%shard, error = %e, "ignoring unreadable shard value");
                                None
                            }
                        }
                    }
                    None => None,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_puts_and_deletes() {
        let keys = Keys::new("c");
        let mut v = View::empty(4);
        let shard = serde_json::to_vec(&ShardValue {
            owner: MemberId::new("a"),
            address: "x:1".into(),
        })
        .unwrap();
        v.apply(
            &keys,
            keys.shard(ShardId(2)).as_bytes(),
            Some((&shard, 42, 7)),
        );
        assert_eq!(v.owner(ShardId(2)).unwrap().epoch, Epoch(42));
        assert_eq!(v.unowned(), 3);
        v.apply(&keys, keys.shard(ShardId(2)).as_bytes(), None);
        assert_eq!(v.unowned(), 4);
        // A shard outside the configured count is ignored, not a panic.
        v.apply(
            &keys,
            keys.shard(ShardId(9)).as_bytes(),
            Some((&shard, 43, 7)),
        );
        let a = serde_json::to_vec(&AssignmentValue::encode(
            5,
            &[None, Some(MemberId::new("a")), None, None],
        ))
        .unwrap();
        v.apply(&keys, keys.assignment().as_bytes(), Some((&a, 50, 0)));
        assert_eq!(
            (v.assignment_version, v.assigned(ShardId(1)).cloned()),
            (5, Some(MemberId::new("a")))
        );
    }
}
