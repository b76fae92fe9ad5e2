//! Kafka sources: `[[kafka]]` tables, and the `--kafka-*` flags that set the first one.

use std::collections::BTreeMap;
use std::time::Duration;

use leasehold_kafka::{KeySource, OnFailure, SourceOptions};
use serde::{Deserialize, Serialize, Serializer};

use super::values::{self, List, Secret};
use super::ConfigError;

/// One Kafka source: topics read by one consumer group, each message run at its key's
/// owner. Every field but `brokers` and `topics` has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaOptions {
    /// Name in logs and metrics. Default: the first topic.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Topics to consume (a list, or comma separated).
    pub topics: List,
    /// Consumer group. Default: `leasehold-<cluster>-<name>`.
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Where the entity key comes from: `key`, `json:/pointer` or `header:NAME`.
    pub key: String,
    /// Dead-letter topic: where messages that cannot be handled go (with the reason).
    #[serde(with = "values::opt_string", skip_serializing_if = "Option::is_none")]
    pub dlq_topic: Option<String>,
    /// `dead-letter` (needs `dlq_topic`) or `skip` (logged, counted, committed past).
    #[serde(with = "on_failure")]
    pub on_failure: OnFailure,
    /// Messages of one partition in flight at once (different keys).
    #[serde(with = "values::num")]
    pub max_in_flight_per_partition: usize,
    /// Messages of this source in flight at once.
    #[serde(with = "values::num")]
    pub max_in_flight: usize,
    /// Handler attempts before a message cannot be handled.
    #[serde(with = "values::num")]
    pub retry_attempts: u32,
    /// Back-off after the first failed attempt (doubling, at most 5 s).
    #[serde(with = "values::duration")]
    pub retry_backoff: Duration,
    /// How often the stored watermarks are committed.
    #[serde(with = "values::duration")]
    pub commit_interval: Duration,
    /// Passed to librdkafka (`security.protocol`, `sasl.*`, `ssl.*`, ...); values of
    /// `sasl.*` and `ssl.*` are never printed. A value `${env:NAME}` or `${file:PATH}` is
    /// read from that variable or file when the instance starts, so secrets need not be
    /// written into the configuration.
    #[serde(serialize_with = "redacted_properties")]
    pub properties: BTreeMap<String, String>,
    /// A standby cluster read while the primary (`brokers`) is down: `[kafka.failover]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverConfig>,
}

/// `[kafka.failover]`: the standby cluster of a source, and when the cluster switches to
/// it and back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// The standby's bootstrap servers, comma separated.
    pub brokers: String,
    /// The standby's topics, in the order of the source's topics. Default: the same names.
    pub topics: List,
    /// librdkafka properties for the standby (the primary's are not inherited).
    #[serde(serialize_with = "redacted_properties")]
    pub properties: BTreeMap<String, String>,
    /// The primary counts as down once most members failed to reach it for this long.
    #[serde(with = "values::duration")]
    pub down_after: Duration,
    /// Back to the primary once most members reached it for this long.
    #[serde(with = "values::duration")]
    pub fail_back_after: Duration,
    /// Whether the cluster goes back to the primary by itself.
    #[serde(with = "values::boolean")]
    pub auto_fail_back: bool,
    /// How often each member probes the primary.
    #[serde(with = "values::duration")]
    pub probe_interval: Duration,
    /// The standby is read from this long before the primary went down (or earlier, from
    /// the first record the group had not finished).
    #[serde(with = "values::duration")]
    pub overlap: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topics: List::default(),
            properties: BTreeMap::new(),
            down_after: Duration::from_secs(30),
            fail_back_after: Duration::from_secs(60),
            auto_fail_back: true,
            probe_interval: Duration::from_secs(2),
            overlap: Duration::from_secs(60),
        }
    }
}

impl FailoverConfig {
    fn to_options(
        &self,
        index: usize,
        primary_topics: &[String],
    ) -> Result<leasehold_kafka::FailoverOptions, ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(error(
                index,
                "failover.brokers",
                "required: the standby cluster's bootstrap servers",
            ));
        }
        let topics = if self.topics.0.is_empty() {
            primary_topics.to_vec()
        } else {
            self.topics.0.clone()
        };
        if topics.len() != primary_topics.len() {
            return Err(error(
                index,
                "failover.topics",
                format!(
                    "names {} topics for the source's {} (one standby topic per topic, in order)",
                    topics.len(),
                    primary_topics.len()
                ),
            ));
        }
        if self.probe_interval < Duration::from_millis(100) {
            return Err(error(
                index,
                "failover.probe_interval",
                "must be at least 100ms",
            ));
        }
        for (field, d) in [
            ("failover.down_after", self.down_after),
            ("failover.fail_back_after", self.fail_back_after),
        ] {
            if d < self.probe_interval {
                return Err(error(
                    index,
                    field,
                    format!(
                        "{} is shorter than probe_interval ({}): one failed probe would switch",
                        humantime::format_duration(d),
                        humantime::format_duration(self.probe_interval)
                    ),
                ));
            }
        }
        Ok(leasehold_kafka::FailoverOptions {
            brokers: self.brokers.trim().to_owned(),
            topics,
            properties: self.properties.clone(),
            down_after: self.down_after,
            fail_back_after: self.fail_back_after,
            auto_fail_back: self.auto_fail_back,
            probe_interval: self.probe_interval,
            overlap: self.overlap,
        })
    }
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self {
            name: None,
            brokers: String::new(),
            topics: List::default(),
            group: None,
            key: "key".into(),
            dlq_topic: None,
            on_failure: OnFailure::DeadLetter,
            max_in_flight_per_partition: 1000,
            max_in_flight: 10_000,
            retry_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            commit_interval: Duration::from_secs(1),
            properties: BTreeMap::new(),
            failover: None,
        }
    }
}

mod on_failure {
    use leasehold_kafka::OnFailure;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OnFailure, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "dead-letter" => Ok(OnFailure::DeadLetter),
            "skip" => Ok(OnFailure::Skip),
            other => Err(de::Error::custom(format!(
                "{other:?} is not one of \"dead-letter\", \"skip\""
            ))),
        }
    }

    pub fn serialize<S: Serializer>(v: &OnFailure, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_str())
    }
}

fn redacted_properties<S: Serializer>(
    props: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let shown: BTreeMap<&str, &str> = props
        .iter()
        .map(|(k, v)| {
            let secret = k.starts_with("sasl.") || k.starts_with("ssl.");
            (
                k.as_str(),
                if secret { Secret::REDACTED } else { v.as_str() },
            )
        })
        .collect();
    shown.serialize(s)
}

/// Shortcut flags for one source (they set or override the first `[[kafka]]` table).
/// Each also reads its `LEASEHOLD_KAFKA_*` variable, except `--kafka-property`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct KafkaFlags {
    /// Kafka bootstrap servers of the first Kafka source. [env: LEASEHOLD_KAFKA_BROKERS]
    #[arg(long, value_name = "HOST:PORT,...")]
    pub kafka_brokers: Option<String>,
    /// Topics to consume, comma separated. [env: LEASEHOLD_KAFKA_TOPIC]
    #[arg(long, value_name = "TOPIC,...")]
    pub kafka_topic: Option<String>,
    /// Consumer group id. [env: LEASEHOLD_KAFKA_GROUP]
    #[arg(long, value_name = "GROUP")]
    pub kafka_group: Option<String>,
    /// Where the entity key comes from: key, json:/pointer or header:NAME.
    /// [env: LEASEHOLD_KAFKA_KEY]
    #[arg(long, value_name = "SOURCE")]
    pub kafka_key: Option<String>,
    /// Dead-letter topic. [env: LEASEHOLD_KAFKA_DLQ_TOPIC]
    #[arg(long, value_name = "TOPIC")]
    pub kafka_dlq_topic: Option<String>,
    /// What happens to a message that cannot be handled: dead-letter (needs a dead-letter
    /// topic) or skip (logged and counted, then committed past).
    /// [env: LEASEHOLD_KAFKA_ON_FAILURE]
    #[arg(long, value_name = "POLICY")]
    pub kafka_on_failure: Option<String>,
    /// librdkafka property KEY=VALUE for the first Kafka source; repeatable.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_properties: Vec<String>,
}

/// Flag (and `LEASEHOLD_` variable) name → key of the first `[[kafka]]` table.
pub(super) const FLAG_KEYS: &[(&str, &str)] = &[
    ("kafka_brokers", "brokers"),
    ("kafka_topic", "topics"),
    ("kafka_group", "group"),
    ("kafka_key", "key"),
    ("kafka_dlq_topic", "dlq_topic"),
    ("kafka_on_failure", "on_failure"),
];

impl KafkaFlags {
    pub(super) fn given(&self) -> Vec<(&'static str, &str)> {
        let values = [
            &self.kafka_brokers,
            &self.kafka_topic,
            &self.kafka_group,
            &self.kafka_key,
            &self.kafka_dlq_topic,
            &self.kafka_on_failure,
        ];
        FLAG_KEYS
            .iter()
            .zip(values)
            .filter_map(|((flag, _), v)| Some((*flag, v.as_deref()?)))
            .collect()
    }
}

fn error(index: usize, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Kafka {
        index,
        field: field.to_owned(),
        message: message.into(),
        origin: String::new(),
    }
}

/// A property value, with `${env:NAME}` and `${file:PATH}` read.
pub fn resolve_property(index: usize, key: &str, value: &str) -> Result<String, ConfigError> {
    let field = format!("properties.{key}");
    if let Some(name) = value
        .strip_prefix("${env:")
        .and_then(|v| v.strip_suffix('}'))
    {
        return std::env::var(name).map_err(|_| {
            error(
                index,
                &field,
                format!("the variable {name} it refers to is not set"),
            )
        });
    }
    if let Some(path) = value
        .strip_prefix("${file:")
        .and_then(|v| v.strip_suffix('}'))
    {
        return std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| error(index, &field, format!("cannot read {path}: {e}")));
    }
    Ok(value.to_owned())
}

impl KafkaOptions {
    /// Validates the source (`index` is its place among the `[[kafka]]` tables) and
    /// resolves its defaults.
    pub fn to_source(&self, index: usize, cluster: &str) -> Result<SourceOptions, ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(error(
                index,
                "brokers",
                "required (host:port, comma separated)",
            ));
        }
        let topics = self.topics.0.clone();
        if topics.is_empty() {
            return Err(error(index, "topics", "at least one topic is required"));
        }
        let name = self.name.clone().unwrap_or_else(|| topics[0].clone());
        let key: KeySource = self
            .key
            .parse()
            .map_err(|e: leasehold_kafka::KeySourceError| error(index, "key", e.to_string()))?;
        for (field, n) in [
            (
                "max_in_flight_per_partition",
                self.max_in_flight_per_partition,
            ),
            ("max_in_flight", self.max_in_flight),
            ("retry_attempts", self.retry_attempts as usize),
        ] {
            if n == 0 {
                return Err(error(index, field, "must be a positive whole number"));
            }
        }
        // Without somewhere to put them, messages that cannot be handled would be lost
        // silently; losing them must be a choice the configuration states.
        if self.on_failure == OnFailure::DeadLetter && self.dlq_topic.is_none() {
            return Err(error(
                index,
                "dlq_topic",
                "is required: messages that cannot be handled (no key, or the handler kept \
                 failing) go there (on_failure = \"dead-letter\", the default); set dlq_topic \
                 (--kafka-dlq-topic), or on_failure = \"skip\" (--kafka-on-failure skip) to \
                 log, count and skip them",
            ));
        }
        Ok(SourceOptions {
            group: self
                .group
                .clone()
                .unwrap_or_else(|| format!("leasehold-{cluster}-{name}")),
            name,
            brokers: self.brokers.trim().to_owned(),
            topics,
            key,
            dlq_topic: self.dlq_topic.clone(),
            on_failure: self.on_failure,
            max_in_flight_per_partition: self.max_in_flight_per_partition,
            max_in_flight: self.max_in_flight,
            retry_attempts: self.retry_attempts,
            retry_backoff: self.retry_backoff,
            commit_interval: self.commit_interval,
            properties: self.properties.clone(),
            cluster: String::new(),
            claim_epoch: 0,
            failover: match &self.failover {
                None => None,
                Some(f) => Some(f.to_options(index, &self.topics.0)?),
            },
        })
    }
}
