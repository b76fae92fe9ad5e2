//! Consuming from a standby Kafka cluster while the primary is down: the options, the
//! primary's health probe, and positioning the standby's consumer group at a time. Which
//! side is read is decided for the whole Leasehold cluster (through etcd) by the server;
//! this module only talks to Kafka.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::SourceOptions;

/// The standby cluster of a source, and when to switch.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverOptions {
    /// The standby's bootstrap servers.
    pub brokers: String,
    /// The standby's topics, in the order of the source's topics (mirrored topics may be
    /// renamed, e.g. `A.orders` by MirrorMaker 2).
    pub topics: Vec<String>,
    /// librdkafka properties for the standby (the primary's are not inherited).
    pub properties: BTreeMap<String, String>,
    /// The primary counts as down once a majority of members failed to reach it for this
    /// long.
    pub down_after: Duration,
    /// Back to the primary once a majority reached it for this long (with
    /// `auto_fail_back`).
    pub fail_back_after: Duration,
    pub auto_fail_back: bool,
    /// How often each member probes the primary (a metadata request, this long at most).
    pub probe_interval: Duration,
    /// The standby is read from this long before the primary went down (records handled
    /// twice rather than lost: the handler deduplicates).
    pub overlap: Duration,
}

/// The side of a source that is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Primary,
    Standby,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Standby => "standby",
        }
    }
}

impl SourceOptions {
    /// The options that read `side` (the standby's brokers, topics and properties for the
    /// standby); the handler is told the side with every record. The consumer group is the
    /// same name on both clusters.
    pub fn on_side(&self, side: Side) -> SourceOptions {
        let mut o = self.clone();
        o.cluster = side.as_str().to_owned();
        if let (Side::Standby, Some(f)) = (side, &self.failover) {
            o.brokers = f.brokers.clone();
            o.topics = f.topics.clone();
            o.properties = f.properties.clone();
        }
        o
    }
}

fn client(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// A client for probing one cluster, kept while its probes succeed: a healthy cluster is
/// probed without a new librdkafka client (its threads, connections and handshakes) each
/// time. The caller drops it after a failed probe, so a cluster that is down is probed
/// with fresh clients, which connect at once when it is back (a kept client would wait
/// out librdkafka's reconnect backoff, up to 10 s), and once it is [`Prober::stale`], so
/// the bootstrap address, credentials and certificates are checked again as a new
/// consumer would meet them. Dropped, it closes the client on a thread of its own
/// (closing waits for librdkafka's threads).
pub struct Prober {
    consumer: Option<BaseConsumer>,
    made: std::time::Instant,
}

/// How long a [`Prober`] is kept at most.
const PROBER_MAX_AGE: Duration = Duration::from_secs(300);

impl Prober {
    pub fn new(brokers: &str, properties: &BTreeMap<String, String>) -> Result<Self, String> {
        let consumer = client(brokers, properties)
            .create()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            consumer: Some(consumer),
            made: std::time::Instant::now(),
        })
    }

    /// Old enough to be replaced by a fresh client.
    pub fn stale(&self) -> bool {
        self.made.elapsed() >= PROBER_MAX_AGE
    }

    /// Whether the cluster answers a metadata request for `topics` within `timeout`,
    /// with a leader for every partition (blocking: run it off the async threads).
    pub fn probe(&self, topics: &[String], timeout: Duration) -> Result<(), String> {
        let consumer = self.consumer.as_ref().expect("held until dropped");
        for topic in topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), timeout)
                .map_err(|e| format!("metadata of {topic}: {e}"))?;
            let t = metadata
                .topics()
                .first()
                .ok_or_else(|| format!("no metadata for {topic}"))?;
            if let Some(e) = t.error() {
                return Err(format!("{topic}: {e:?}"));
            }
            if t.partitions().is_empty() {
                return Err(format!("{topic} has no partitions"));
            }
            if let Some(p) = t.partitions().iter().find(|p| p.leader() < 0) {
                return Err(format!("{topic}/{} has no leader", p.id()));
            }
        }
        Ok(())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-prober-close".into())
                .spawn(move || drop(consumer));
        }
    }
}

/// Commits, for `group` on the given cluster, the first offset of every partition of
/// `topics` at or after `at_ms` (or the partition's time in `earlier`, when it has an
/// earlier one; the end where no record is that recent), so that the group's consumers
/// start there. Blocking. Returns the partitions positioned.
pub fn position_group(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    group: &str,
    topics: &[String],
    at_ms: i64,
    earlier: &std::collections::HashMap<(String, i32), i64>,
    timeout: Duration,
) -> Result<usize, String> {
    let consumer: BaseConsumer = client(brokers, properties)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let mut wanted = TopicPartitionList::new();
    // Ends read before the times: a record produced in between is then read, not skipped.
    let mut ends = std::collections::HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        for t in metadata.topics() {
            if let Some(e) = t.error() {
                return Err(format!("{topic}: {e:?}"));
            }
            for p in t.partitions() {
                let end = consumer
                    .fetch_watermarks(topic, p.id(), timeout)
                    .map_err(|e| format!("end of {topic}/{}: {e}", p.id()))?
                    .1;
                ends.insert((topic.clone(), p.id()), end);
                let at = earlier
                    .get(&(topic.clone(), p.id()))
                    .map_or(at_ms, |t| (*t).min(at_ms));
                wanted
                    .add_partition_offset(topic, p.id(), Offset::Offset(at))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    if wanted.count() == 0 {
        return Err(format!("no partitions found for {topics:?}"));
    }
    let found = consumer
        .offsets_for_times(wanted, timeout)
        .map_err(|e| format!("offsets for times (from {at_ms}): {e}"))?;
    let mut commit = TopicPartitionList::new();
    for e in found.elements() {
        if let Err(err) = e.error() {
            return Err(format!("{}/{}: {err}", e.topic(), e.partition()));
        }
        let offset = match e.offset() {
            Offset::Offset(o) => o,
            // No record at or after the time: start at the end (as it was before).
            _ => ends
                .get(&(e.topic().to_owned(), e.partition()))
                .copied()
                .ok_or_else(|| format!("no end for {}/{}", e.topic(), e.partition()))?,
        };
        commit
            .add_partition_offset(e.topic(), e.partition(), Offset::Offset(offset))
            .map_err(|e| e.to_string())?;
    }
    consumer
        .commit(&commit, CommitMode::Sync)
        .map_err(|e| format!("commit of the group's positions: {e}"))?;
    Ok(commit.count())
}
