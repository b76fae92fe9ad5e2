//! Kafka ingestion. Every instance joins the source's consumer group; each message's
//! key is extracted and the message is dispatched to the key's owner through the call
//! path. Many messages per partition are in flight at once, but a message waits for the
//! previous message with the same key from its partition; the committed offset is the
//! lowest offset not yet handled or dead-lettered.

pub mod failover;
mod group;
mod ingest;
mod key;
mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use crate::failover::{FailoverOptions, Side};
pub use crate::ingest::{FirstUnfinished, Ingest};
pub use crate::key::{KeyError, KeySource, KeySourceError};
pub use crate::window::Window;

/// Errors of Kafka ingestion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka source {source_name:?}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
    #[error("kafka source {source_name:?}: {error}")]
    Kafka {
        source_name: String,
        error: rdkafka::error::KafkaError,
    },
}

/// One Kafka source: topics read by one consumer group.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Name used in logs and metrics.
    pub name: String,
    pub brokers: String,
    pub topics: Vec<String>,
    pub group: String,
    pub key: KeySource,
    /// Where messages go that cannot be handled (no key, or the handler kept failing).
    pub dlq_topic: Option<String>,
    /// What happens to such messages; `DeadLetter` requires `dlq_topic`.
    pub on_failure: OnFailure,
    pub max_in_flight_per_partition: usize,
    pub max_in_flight: usize,
    pub retry_attempts: u32,
    pub retry_backoff: Duration,
    pub commit_interval: Duration,
    /// Passed to librdkafka unchanged (security.protocol, sasl.*, ssl.*, ...).
    pub properties: BTreeMap<String, String>,
    /// For a source with failover: which cluster these brokers are (`primary` or
    /// `standby`), told to the handler with every record; empty otherwise.
    pub cluster: String,
    /// Epoch of this consumer's partition claims: for a source with failover, the epoch
    /// of the side it reads (grows with every switch; 0 before the first one and without
    /// failover).
    pub claim_epoch: u64,
    /// The standby cluster, for a source that fails over.
    pub failover: Option<FailoverOptions>,
}

/// A source's consumer group on its partitions, as one instance last saw it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub group: String,
    pub topics: Vec<String>,
    /// When it was taken (Unix milliseconds); `None` before the first refresh.
    pub updated_ms: Option<u64>,
    /// Why the last refresh failed, if it did.
    pub error: Option<String>,
    pub partitions: Vec<PartitionStatus>,
}

/// One partition: its end, the group's committed offset (the next to read), the lag
/// between them, and whether this instance consumes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub end: Option<i64>,
    pub committed: Option<i64>,
    pub lag: Option<i64>,
    pub here: bool,
}

/// Shared with the admin surface.
pub type StatusHandle = std::sync::Arc<std::sync::Mutex<SourceStatus>>;

/// A message to run at its key's owner.
#[derive(Debug, Clone)]
pub struct KafkaCall {
    pub key: String,
    pub payload: Bytes,
    /// Shared, not copied per message (as are `topic` and `cluster`).
    pub group: Arc<str>,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// This consumer's claim of the partition (from [`Dispatcher::claim`]).
    pub fence: u64,
    /// The record's W3C trace context headers (`traceparent`, `tracestate`), passed on to
    /// the handler.
    pub trace: Vec<(String, String)>,
    /// `primary` or `standby` for a source with failover; empty otherwise.
    pub cluster: Arc<str>,
}

/// What happens to a message that cannot be handled: its key cannot be extracted, the
/// call path rejects it for good, or the handler kept failing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Written to the dead-letter topic with the reason in a header, then committed.
    DeadLetter,
    /// Logged with its offset and reason, counted (`leasehold_kafka_skipped_total`), and
    /// committed past: the message is lost, by the configuration's choice.
    Skip,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::DeadLetter => "dead-letter",
            OnFailure::Skip => "skip",
        }
    }
}

/// Why a message was not handled, as far as ingestion must tell the cases apart.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The handler itself answered with an error, or did not answer within its deadline:
    /// retried with back-off, then dead-lettered (or skipped).
    #[error("handler failed: {0}")]
    Handler(String),
    /// The call path refused the message for good (an empty key, a payload over the
    /// limit): dead-lettered (or skipped) at once.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The message did not reach a handler: no owner yet, lease not valid, owner or
    /// handler unreachable, queues full. Waited for with back-off, never dead-lettered:
    /// sending live messages away would let later messages for the key overtake them.
    #[error("not reached a handler: {0}")]
    Unavailable(String),
    /// Another member of the group claimed the partition since this consumer did: the
    /// group gave it away (this consumer was cut off for about its session timeout). The
    /// message did not run; nothing of the partition runs or commits here any more.
    #[error("partition claimed by another consumer: {0}")]
    Fenced(String),
}

/// Gets a message to its key's owner and runs the handler there (the call path).
pub trait Dispatcher: Send + Sync + 'static {
    fn dispatch(&self, call: KafkaCall) -> BoxFuture<'static, Result<(), DispatchError>>;

    /// Claims a partition assigned to this consumer in the group's `generation`, before
    /// any of its messages is dispatched; the answer (the fence) grows with every claim
    /// of the partition, and owners refuse messages read under a superseded claim.
    /// `Unavailable` is retried; `Fenced` means a later assignment holds the partition.
    /// `force` takes the partition whatever claim is held (see the reclaim of a fenced
    /// partition that is still assigned).
    /// `epoch` orders claims across a failover source's clusters (see
    /// [`SourceOptions::claim_epoch`]).
    fn claim(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        epoch: u64,
        generation: i32,
        force: bool,
    ) -> BoxFuture<'static, Result<u64, DispatchError>>;
}
