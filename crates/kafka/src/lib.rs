//! Kafka ingestion. Every instance joins the source's consumer group; each message's
//! key is extracted and the message is dispatched to the key's owner through the call
//! path. Many messages per partition are in flight at once, but a message waits for the
//! previous message with the same key from its partition; the committed offset is the
//! lowest offset not yet handled or dead-lettered.

mod ingest;
mod key;
mod window;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use crate::ingest::Ingest;
pub use crate::key::KeySource;
pub use crate::window::Window;

/// Errors of Kafka ingestion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// Without one, such messages are retried until they succeed.
    pub dlq_topic: Option<String>,
    pub max_in_flight_per_partition: usize,
    pub max_in_flight: usize,
    pub retry_attempts: u32,
    pub retry_backoff: Duration,
    pub commit_interval: Duration,
    /// Passed to librdkafka unchanged (security.protocol, sasl.*, ssl.*, ...).
    pub properties: BTreeMap<String, String>,
}

/// A message to run at its key's owner.
#[derive(Debug, Clone)]
pub struct KafkaCall {
    pub key: String,
    pub payload: Bytes,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Gets a message to its key's owner and runs the handler there (the call path).
pub trait Dispatcher: Send + Sync + 'static {
    /// `Err` carries the reason (the handler's error, or why the owner was not
    /// reached); the message is retried, then dead-lettered with the last reason.
    fn dispatch(&self, call: KafkaCall) -> BoxFuture<'static, Result<(), String>>;
}
