//! The routing table: every instance's local copy of the cluster's keyspace, built from a
//! snapshot and kept current by a watch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use leasehold_types::{Epoch, MemberId, ShardId};

use crate::keys::{
    AssignmentValue, KafkaHealthValue, KafkaSideValue, Key, Keys, LoadReport, MemberState,
    MemberValue, PartitionRef, PlacementValue, ShardValue,
};

/// A member as seen in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    /// Client address.
    pub address: String,
    pub admin_address: String,
    /// Where peers forward to.
    pub peer: PeerAddress,
    pub state: MemberState,
    /// Lease the member key is attached to (used to mark another member draining).
    pub lease: i64,
}

/// Current owner of a shard as seen in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardOwner {
    pub owner: MemberId,
    /// The owner's client address (what Locate returns).
    pub address: String,
    /// Where to forward calls for the shard.
    pub peer: PeerAddress,
    pub epoch: Epoch,
    /// Lease the shard key is attached to (the owner's lease when it was acquired).
    pub lease: i64,
}

/// Where an instance takes forwarded calls, and the identity its certificate proves there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerAddress {
    pub address: String,
    /// Empty without peer TLS.
    pub identity: String,
}

impl PeerAddress {
    /// The peer address, or the client address of a member older than the plane split.
    fn of(peer_address: String, identity: String, address: &str) -> Self {
        Self {
            address: if peer_address.is_empty() {
                address.to_owned()
            } else {
                peer_address
            },
            identity,
        }
    }
}

/// The latest load reported for one shard (by whichever member reported it last: its
/// owner, or its previous owner until the new one reports).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardLoad {
    /// Handler calls per second.
    pub calls: f64,
    /// Handler busy time, seconds per second.
    pub busy: f64,
    /// etcd revision of the report (0: never reported).
    pub revision: i64,
}

/// What the load planner weighs per call besides its handler busy time. Busy time alone is
/// noise for fast handlers (one scheduling hiccup of a few milliseconds outweighs a
/// thousand microsecond calls), so every call also counts as 1 ms: call rates decide for
/// fast handlers, busy time for slow ones.
pub const CALL_COST_SECONDS: f64 = 1e-3;

impl ShardLoad {
    /// One number per shard for the planner: busy time plus the per-call cost.
    pub fn weight(&self) -> f64 {
        self.busy + self.calls * CALL_COST_SECONDS
    }
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
    /// The assignment key's mod revision (0: no key); the leader writes only over the
    /// value this view shows.
    pub assignment_revision: i64,
    /// Desired owner per shard (from the leader). Shared between views: it changes
    /// wholesale, rarely.
    pub assignment: Arc<Vec<Option<MemberId>>>,
    /// Actual owner per shard. Entries are shared between views, so publishing a new
    /// view after each watch event copies pointers, not owners (at 50 instances × 4096
    /// shards, deep copies per event kept every CPU busy).
    pub shards: Vec<Option<Arc<ShardOwner>>>,
    /// Latest fence (claim revision) per Kafka partition and consumer group.
    pub fences: Arc<HashMap<PartitionRef, u64>>,
    /// Operator pins and the freeze.
    pub placement: Arc<PlacementValue>,
    /// Latest reported load per shard (kept when the reporter leaves: the last known).
    pub loads: Arc<Vec<ShardLoad>>,
    /// Active side of each Kafka source with failover, with the key's mod revision.
    pub kafka_sides: Arc<BTreeMap<String, (KafkaSideValue, i64)>>,
    /// Members' health reports of failover sources' primaries: (source, member).
    pub kafka_health: Arc<BTreeMap<(String, MemberId), KafkaHealthValue>>,
}

impl View {
    pub fn empty(shard_count: u32) -> Self {
        Self {
            revision: 0,
            synced: false,
            members: BTreeMap::new(),
            leader: None,
            assignment_version: 0,
            assignment_revision: 0,
            assignment: Arc::new(vec![None; shard_count as usize]),
            shards: vec![None; shard_count as usize],
            fences: Arc::default(),
            placement: Arc::default(),
            loads: Arc::new(vec![ShardLoad::default(); shard_count as usize]),
            kafka_sides: Arc::default(),
            kafka_health: Arc::default(),
        }
    }

    /// The side a failover source reads (the primary when nothing was decided yet) and
    /// the revision to compare against when switching (0: no record).
    pub fn kafka_side(&self, source: &str) -> (KafkaSideValue, i64) {
        self.kafka_sides
            .get(source)
            .cloned()
            .unwrap_or((KafkaSideValue::default(), 0))
    }

    /// Each shard's planner weight; `None` when no shard has a reported load. A shard
    /// never reported weighs the mean of the reported ones (not 0: a member whose report
    /// is not in yet must not look idle).
    pub fn load_weights(&self) -> Option<Vec<f64>> {
        let reported: Vec<f64> = self
            .loads
            .iter()
            .filter(|l| l.revision > 0)
            .map(ShardLoad::weight)
            .collect();
        if reported.is_empty() {
            return None;
        }
        let mean = reported.iter().sum::<f64>() / reported.len() as f64;
        Some(
            self.loads
                .iter()
                .map(|l| if l.revision > 0 { l.weight() } else { mean })
                .collect(),
        )
    }

    /// The latest claim of a partition this view has seen (0: none).
    pub fn fence(&self, p: &PartitionRef) -> u64 {
        self.fences.get(p).copied().unwrap_or(0)
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn owner(&self, shard: ShardId) -> Option<&ShardOwner> {
        self.shards.get(shard.0 as usize)?.as_deref()
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
    pub fn apply(&mut self, keys: &Keys, key: &[u8], put: Option<Put<'_>>) {
        let Some(key) = keys.parse(key) else { return };
        match (
            key,
            put.map(|p| (p.value, p.create_revision, p.lease, p.mod_revision)),
        ) {
            (Key::Config, _) => {}
            (Key::KafkaSide(source), Some((value, _, _, mod_revision))) => {
                match serde_json::from_slice::<KafkaSideValue>(value) {
                    Ok(v) => {
                        Arc::make_mut(&mut self.kafka_sides).insert(source, (v, mod_revision));
                    }
                    Err(e) => {
                        tracing::warn!(%source, error = %e, "ignoring unreadable Kafka side record")
                    }
                }
            }
            (Key::KafkaSide(source), None) => {
                Arc::make_mut(&mut self.kafka_sides).remove(&source);
            }
            (Key::KafkaHealth(member, source), Some((value, _, _, _))) => {
                if let Ok(v) = serde_json::from_slice::<KafkaHealthValue>(value) {
                    Arc::make_mut(&mut self.kafka_health).insert((source, member), v);
                }
            }
            (Key::KafkaHealth(member, source), None) => {
                Arc::make_mut(&mut self.kafka_health).remove(&(source, member));
            }
            (Key::Load(id), Some((value, _, _, mod_revision))) => {
                match serde_json::from_slice::<LoadReport>(value) {
                    Ok(r) => {
                        let shards = &self.shards;
                        let loads = Arc::make_mut(&mut self.loads);
                        for ((&shard, &calls), &busy) in r.shards.iter().zip(&r.calls).zip(&r.busy)
                        {
                            let Some(slot) = loads.get_mut(shard as usize) else {
                                continue;
                            };
                            // Only the owner's word counts: a member that lost the shard
                            // (its local table lagging) must not overwrite the new owner's
                            // rate with its own decaying one.
                            let owned = shards
                                .get(shard as usize)
                                .and_then(|o| o.as_ref())
                                .is_some_and(|o| o.owner == id);
                            if owned
                                && slot.revision <= mod_revision
                                && calls.is_finite()
                                && busy.is_finite()
                                && calls >= 0.0
                                && busy >= 0.0
                            {
                                *slot = ShardLoad {
                                    calls,
                                    busy,
                                    revision: mod_revision,
                                };
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(member = %id, error = %e, "ignoring unreadable load report")
                    }
                }
            }
            // The member left: its shards' last known loads stay until their new owners
            // report.
            (Key::Load(_), None) => {}
            (Key::KafkaFence(p), Some((_, _, _, mod_revision))) => {
                let fence = Arc::make_mut(&mut self.fences).entry(p).or_default();
                *fence = (*fence).max(mod_revision as u64);
            }
            // A claim ends with its claimant's lease; its fence stays the one to beat (a
            // consumer still running under it must not fall below a forgotten claim).
            (Key::KafkaFence(_), None) => {}
            (Key::Member(id), Some((value, _, lease, _))) => {
                match serde_json::from_slice::<MemberValue>(value) {
                    Ok(v) => {
                        self.members.insert(
                            id.clone(),
                            Member {
                                id,
                                peer: PeerAddress::of(v.peer_address, v.peer_identity, &v.address),
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
            (Key::Leader, Some((value, _, _, _))) => {
                self.leader = Some(MemberId::new(String::from_utf8_lossy(value)));
            }
            (Key::Leader, None) => self.leader = None,
            (Key::Assignment, Some((value, _, _, mod_revision))) => {
                self.assignment_revision = mod_revision;
                match serde_json::from_slice::<AssignmentValue>(value) {
                    Ok(v) if v.shards.len() == self.shards.len() => {
                        self.assignment_version = v.version;
                        self.assignment = Arc::new(v.decode());
                    }
                    Ok(v) => tracing::warn!(
                        shards = v.shards.len(),
                        "ignoring assignment for another shard count"
                    ),
                    Err(e) => tracing::warn!(error = %e, "ignoring unreadable assignment"),
                }
            }
            (Key::Placement, Some((value, _, _, _))) => {
                match serde_json::from_slice::<PlacementValue>(value) {
                    Ok(v) => self.placement = Arc::new(v),
                    Err(e) => tracing::warn!(error = %e, "ignoring unreadable placement controls"),
                }
            }
            (Key::Placement, None) => self.placement = Arc::default(),
            (Key::Assignment, None) => {
                self.assignment_version = 0;
                self.assignment_revision = 0;
                self.assignment = Arc::new(vec![None; self.shards.len()]);
            }
            (Key::Shard(shard), put) => {
                let Some(slot) = self.shards.get_mut(shard.0 as usize) else {
                    return;
                };
                *slot = match put {
                    Some((value, create_revision, lease, _)) => {
                        match serde_json::from_slice::<ShardValue>(value) {
                            Ok(v) => Some(Arc::new(ShardOwner {
                                owner: v.owner,
                                peer: PeerAddress::of(v.peer_address, v.peer_identity, &v.address),
                                address: v.address,
                                epoch: Epoch(create_revision as u64),
                                lease,
                            })),
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

/// A put as the view needs it.
#[derive(Debug, Clone, Copy)]
pub struct Put<'a> {
    pub value: &'a [u8],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl<'a> Put<'a> {
    pub fn of(kv: &'a etcd_client::KeyValue) -> Self {
        Self {
            value: kv.value(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(value: &[u8], create_revision: i64, lease: i64) -> Put<'_> {
        Put {
            value,
            create_revision,
            mod_revision: create_revision,
            lease,
        }
    }

    #[test]
    fn keeps_the_latest_fence_per_partition() {
        let keys = Keys::new("c");
        let mut v = View::empty(4);
        let p = PartitionRef {
            group: "g".into(),
            topic: "t".into(),
            partition: 0,
        };
        assert_eq!(v.fence(&p), 0);
        let key = keys.kafka_fence(&p);
        v.apply(&keys, key.as_bytes(), Some(put(b"a", 10, 0)));
        let mut newer = put(b"b", 10, 0);
        newer.mod_revision = 15;
        v.apply(&keys, key.as_bytes(), Some(newer));
        assert_eq!(v.fence(&p), 15);
        let other = PartitionRef {
            partition: 1,
            ..p.clone()
        };
        assert_eq!(v.fence(&other), 0);
    }

    #[test]
    fn loads_count_from_the_owner_only_and_unreported_shards_weigh_the_mean() {
        let keys = Keys::new("c");
        let mut v = View::empty(3);
        assert_eq!(v.load_weights(), None);
        let owner = |m: &str| {
            serde_json::to_vec(&ShardValue {
                owner: MemberId::new(m),
                address: "x:1".into(),
                peer_address: String::new(),
                peer_identity: String::new(),
            })
            .unwrap()
        };
        v.apply(
            &keys,
            keys.shard(ShardId(0)).as_bytes(),
            Some(put(&owner("a"), 5, 1)),
        );
        v.apply(
            &keys,
            keys.shard(ShardId(1)).as_bytes(),
            Some(put(&owner("b"), 6, 2)),
        );
        let report = |shards: Vec<u32>, calls: Vec<f64>| {
            serde_json::to_vec(&LoadReport {
                busy: vec![0.0; shards.len()],
                shards,
                calls,
            })
            .unwrap()
        };
        // a reports shards 0 (its own) and 1 (b's): only shard 0 counts.
        let r = report(vec![0, 1], vec![10.0, 99.0]);
        v.apply(
            &keys,
            keys.load(&MemberId::new("a")).as_bytes(),
            Some(put(&r, 7, 1)),
        );
        assert_eq!(v.loads[0].calls, 10.0);
        assert_eq!(v.loads[1].revision, 0);
        // Garbage is dropped, not stored.
        let r = report(vec![1], vec![f64::NAN]);
        v.apply(
            &keys,
            keys.load(&MemberId::new("b")).as_bytes(),
            Some(put(&r, 8, 2)),
        );
        assert_eq!(v.loads[1].revision, 0);
        // Shards 1 and 2 were never reported: they weigh what shard 0 weighs.
        let w = v.load_weights().unwrap();
        assert_eq!(w, vec![w[0]; 3]);
        assert!(w[0] > 0.0);
    }

    #[test]
    fn applies_puts_and_deletes() {
        let keys = Keys::new("c");
        let mut v = View::empty(4);
        let shard = serde_json::to_vec(&ShardValue {
            owner: MemberId::new("a"),
            address: "x:1".into(),
            peer_address: String::new(),
            peer_identity: String::new(),
        })
        .unwrap();
        v.apply(
            &keys,
            keys.shard(ShardId(2)).as_bytes(),
            Some(put(&shard, 42, 7)),
        );
        assert_eq!(v.owner(ShardId(2)).unwrap().epoch, Epoch(42));
        assert_eq!(v.unowned(), 3);
        v.apply(&keys, keys.shard(ShardId(2)).as_bytes(), None);
        assert_eq!(v.unowned(), 4);
        // A shard outside the configured count is ignored, not a panic.
        v.apply(
            &keys,
            keys.shard(ShardId(9)).as_bytes(),
            Some(put(&shard, 43, 7)),
        );
        let a = serde_json::to_vec(&AssignmentValue::encode(
            5,
            &[None, Some(MemberId::new("a")), None, None],
        ))
        .unwrap();
        v.apply(&keys, keys.assignment().as_bytes(), Some(put(&a, 50, 0)));
        assert_eq!(
            (v.assignment_version, v.assigned(ShardId(1)).cloned()),
            (5, Some(MemberId::new("a")))
        );
    }
}
