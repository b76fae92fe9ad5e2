//! The etcd keyspace under `/leasehold/<cluster>/` and the JSON values stored in it.

use std::collections::BTreeMap;

use leasehold_types::{MemberId, ShardId, HASH_VERSION};
use serde::{Deserialize, Serialize};

/// Key layout of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A key of the cluster's keyspace, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Config,
    Member(MemberId),
    Leader,
    Assignment,
    /// Operator controls of placement: pins and the freeze.
    Placement,
    Shard(ShardId),
    /// A member's report of the load on the shards it owns.
    Load(MemberId),
    /// The latest claim of a Kafka partition by a consumer group member.
    KafkaFence(PartitionRef),
    /// Which cluster of a Kafka source with failover is read.
    KafkaSide(String),
    /// One member's view of a failover source's primary cluster: (member, source).
    KafkaHealth(MemberId, String),
}

/// A Kafka partition as read by one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionRef {
    /// Shared with the records that name it (a fence check per record).
    pub group: std::sync::Arc<str>,
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/leasehold/{cluster}/"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    pub fn member(&self, id: &MemberId) -> String {
        format!("{}members/{}", self.prefix, id)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn assignment(&self) -> String {
        format!("{}assignment", self.prefix)
    }

    pub fn placement(&self) -> String {
        format!("{}placement", self.prefix)
    }

    /// `loads/<member>`, attached to the member's lease.
    pub fn load(&self, id: &MemberId) -> String {
        format!("{}loads/{}", self.prefix, id)
    }

    pub fn shard(&self, shard: ShardId) -> String {
        format!("{}shards/{}", self.prefix, shard.0)
    }

    /// `kafka-fences/<topic>/<partition>/<group>`: written by each new assignee of the
    /// partition before it dispatches any record of it; its revision is the assignment's
    /// fence. The group goes last because it may contain `/` (topic names cannot).
    pub fn kafka_fence(&self, p: &PartitionRef) -> String {
        format!(
            "{}kafka-fences/{}/{}/{}",
            self.prefix, p.topic, p.partition, p.group
        )
    }

    /// `kafka-sides/<source>`: the active cluster of a source with failover; its mod
    /// revision fences switches (compare-and-set).
    pub fn kafka_side(&self, source: &str) -> String {
        format!("{}kafka-sides/{}", self.prefix, source)
    }

    /// `kafka-health/<member>/<source>`, on the member's lease.
    pub fn kafka_health(&self, member: &MemberId, source: &str) -> String {
        format!("{}kafka-health/{}/{}", self.prefix, member, source)
    }

    /// Parses a key of this cluster; `None` for keys this version does not know.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        match rest {
            "config" => Some(Key::Config),
            "leader" => Some(Key::Leader),
            "assignment" => Some(Key::Assignment),
            "placement" => Some(Key::Placement),
            _ => {
                if let Some(id) = rest.strip_prefix("members/") {
                    Some(Key::Member(MemberId::new(id)))
                } else if let Some(id) = rest.strip_prefix("loads/") {
                    Some(Key::Load(MemberId::new(id)))
                } else if let Some(source) = rest.strip_prefix("kafka-sides/") {
                    Some(Key::KafkaSide(source.to_owned()))
                } else if let Some(rest) = rest.strip_prefix("kafka-health/") {
                    let (member, source) = rest.split_once('/')?;
                    Some(Key::KafkaHealth(MemberId::new(member), source.to_owned()))
                } else if let Some(fence) = rest.strip_prefix("kafka-fences/") {
                    let mut parts = fence.splitn(3, '/');
                    let topic = parts.next()?.into();
                    let partition = parts.next()?.parse().ok()?;
                    let group = parts.next()?.into();
                    Some(Key::KafkaFence(PartitionRef {
                        group,
                        topic,
                        partition,
                    }))
                } else {
                    rest.strip_prefix("shards/")?
                        .parse()
                        .ok()
                        .map(|n| Key::Shard(ShardId(n)))
                }
            }
        }
    }
}

/// Value of `placement`: what operators decided (admin API), applied by the leader's
/// planner. Absent = no pins, not frozen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementValue {
    /// No voluntary moves (owned shards stay with their active owners; pins still apply).
    #[serde(default)]
    pub frozen: bool,
    /// Shard → the member it must live on (ignored while that member is not active).
    #[serde(default)]
    pub pins: std::collections::BTreeMap<u32, MemberId>,
    /// One-shot moves: shard → the member it goes to; the leader forgets each once the
    /// shard got there (or the member is no longer active). After that the shard is
    /// balanced like any other.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub moves: std::collections::BTreeMap<u32, MemberId>,
    /// Fields of a newer version, kept as they are when this version rewrites the value.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Value of `loads/<member>`: the load on each shard the member owns, smoothed over
/// `load_smoothing` (columns, to keep the value small).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub shards: Vec<u32>,
    /// Handler calls per second.
    pub calls: Vec<f64>,
    /// Handler busy time, seconds per second (0.5 = one call running half the time).
    pub busy: Vec<f64>,
}

/// A cluster of a Kafka source with failover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaSide {
    #[default]
    Primary,
    Standby,
}

impl KafkaSide {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSide::Primary => "primary",
            KafkaSide::Standby => "standby",
        }
    }
}

/// Value of `kafka-sides/<source>`: which cluster the source reads, since when and why.
/// Absent = the primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaSideValue {
    pub active: KafkaSide,
    /// When the side was chosen (Unix milliseconds, the writer's clock).
    pub since_ms: u64,
    pub reason: String,
    /// Chosen by an operator: the leader does not switch automatically until an operator
    /// hands it back (`auto`).
    #[serde(default)]
    pub manual: bool,
    /// For the standby: the time its consumer group was positioned at (records from then
    /// on are read; earlier on partitions where the group had records not finished
    /// before it, see `KafkaHealthValue::first_unfinished_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_ms: Option<u64>,
    /// The epoch of the side's partition claims (see `claim_value`): set by the switch
    /// whenever the side changes, above every earlier epoch (the record's revision at the
    /// switch + 1, so a value lost to an older version's rewrite is not reused).
    #[serde(default)]
    pub epoch: u64,
}

/// Value of `kafka-health/<member>/<source>`: whether that member reaches the source's
/// primary cluster, and since when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaHealthValue {
    pub primary_ok: bool,
    /// Since when (Unix milliseconds, the member's clock) the answer has been the same.
    pub since_ms: u64,
    /// The last probe's error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Per topic and partition this member's consumer of the primary holds or held, the
    /// time (Unix ms, rounded down to 30 s) of the first record it read there and has
    /// not finished: a switch reads the standby's partition from no later than this, so
    /// records the group had not handled when the primary failed are read there too.
    /// Times only go back and partitions are only added, except at a refresh once most
    /// members have reached the primary, and the consumer has run, for 2 minutes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub first_unfinished_ms: BTreeMap<String, BTreeMap<i32, u64>>,
    /// While this member reads the standby, and after a switch back until it has drained
    /// it: the standby side's epoch (0: not reading it). No member starts reading the
    /// primary while another reads an older standby side (its claims would fence the
    /// drain).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reading_standby: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Value of `config`: written once by the first instance, checked by every later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub shard_count: u32,
    pub hash_version: u32,
}

impl ClusterConfig {
    pub fn new(shard_count: u32) -> Self {
        Self {
            shard_count,
            hash_version: HASH_VERSION,
        }
    }
}

/// State of a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Active,
    Draining,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Draining => "draining",
        }
    }
}

/// Value of `members/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberValue {
    /// Client address (what Locate returns).
    pub address: String,
    /// Admin address.
    pub admin_address: String,
    /// Peer address other instances forward to (empty for members older than the plane
    /// split, which take peer calls on `address`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_address: String,
    /// The name its peer certificate carries (empty without peer TLS); a peer call on a
    /// connection whose certificate lacks the sender's registered identity is refused.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_identity: String,
    pub state: MemberState,
    pub version: String,
}

/// Value of `shards/<n>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardValue {
    pub owner: MemberId,
    /// The owner's client address.
    pub address: String,
    /// The owner's peer address (empty: use `address`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_address: String,
    /// The owner's peer certificate identity (empty without peer TLS).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_identity: String,
}

/// Value of `assignment`: the leader's desired owner of every shard.
///
/// Stored compactly as a member table plus one index per shard (−1: none), so 1024
/// shards take a few kilobytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentValue {
    pub version: u64,
    pub members: Vec<MemberId>,
    pub shards: Vec<i32>,
}

impl AssignmentValue {
    pub fn encode(version: u64, shards: &[Option<MemberId>]) -> Self {
        let mut members: Vec<MemberId> = shards.iter().flatten().cloned().collect();
        members.sort();
        members.dedup();
        let shards = shards
            .iter()
            .map(|m| match m {
                Some(m) => members.binary_search(m).map_or(-1, |i| i as i32),
                None => -1,
            })
            .collect();
        Self {
            version,
            members,
            shards,
        }
    }

    pub fn decode(&self) -> Vec<Option<MemberId>> {
        self.shards
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.members.get(i).cloned())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("prod");
        let m = MemberId::new("leasehold-0");
        assert_eq!(k.parse(k.member(&m).as_bytes()), Some(Key::Member(m)));
        assert_eq!(
            k.parse(k.shard(ShardId(17)).as_bytes()),
            Some(Key::Shard(ShardId(17)))
        );
        assert_eq!(k.parse(k.leader().as_bytes()), Some(Key::Leader));
        assert_eq!(
            k.parse(k.load(&MemberId::new("a")).as_bytes()),
            Some(Key::Load(MemberId::new("a")))
        );
        assert_eq!(k.parse(b"/leasehold/other/leader"), None);
        assert_eq!(k.parse(b"/leasehold/prod/shards/x"), None);
        let p = PartitionRef {
            group: "billing/eu".into(),
            topic: "payments".into(),
            partition: 3,
        };
        assert_eq!(
            k.parse(k.kafka_fence(&p).as_bytes()),
            Some(Key::KafkaFence(p))
        );
        assert_eq!(k.parse(b"/leasehold/prod/kafka-fences/t/x/g"), None);
        assert_eq!(
            k.parse(k.kafka_health(&MemberId::new("n1"), "orders/eu").as_bytes()),
            Some(Key::KafkaHealth(MemberId::new("n1"), "orders/eu".into()))
        );
        assert_eq!(
            k.parse(k.kafka_side("orders/eu").as_bytes()),
            Some(Key::KafkaSide("orders/eu".into()))
        );
    }

    #[test]
    fn placement_keeps_fields_of_a_newer_version() {
        let json = r#"{"frozen":true,"pins":{"3":"a"},"weights":{"a":2}}"#;
        let mut p: PlacementValue = serde_json::from_str(json).unwrap();
        p.moves.insert(4, MemberId::new("b"));
        let again: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(again["weights"], serde_json::json!({"a": 2}));
        assert_eq!(again["moves"], serde_json::json!({"4": "b"}));
    }

    #[test]
    fn assignment_round_trips() {
        let a = vec![Some(MemberId::new("b")), None, Some(MemberId::new("a"))];
        let v = AssignmentValue::encode(3, &a);
        assert_eq!(v.shards, vec![1, -1, 0]);
        assert_eq!(v.decode(), a);
    }
}
