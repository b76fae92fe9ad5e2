//! Handlers: the user's code that runs for a key at its owner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use leasehold_coord::ShardListener;
use leasehold_proto::v1::{self as pb, entity_handler_client::EntityHandlerClient};
use leasehold_types::{Epoch, MemberId, ShardId};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// Metadata key marking a status as "the handler could not be reached" (set by the
/// transport, never by the application): such a call did not run and is retried as
/// routing unavailability, whereas an `UNAVAILABLE` the application returns is its answer.
pub const UNREACHABLE_MARK: &str = "leasehold-handler-unreachable";

/// An `UNAVAILABLE` status saying the handler was not reached.
pub fn unreachable(message: String) -> Status {
    let mut s = Status::unavailable(message);
    s.metadata_mut().insert(
        UNREACHABLE_MARK,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

/// A monotonic instant as wall-clock milliseconds since the Unix epoch. Both clocks are
/// read together, so the mapping holds whenever it is computed (also after a pause).
pub fn unix_millis(at: Instant) -> i64 {
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let wall = match at.checked_duration_since(now) {
        Some(ahead) => wall + ahead,
        None => wall - now.duration_since(at),
    };
    wall.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Why a handler cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    #[error("invalid handler address {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("handler at {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
}

/// Where a call came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallSource {
    /// An `Entities.Call`, accepted by the instance `entry`.
    Grpc { entry: MemberId },
    /// A Kafka record.
    Kafka(KafkaRecord),
}

/// Origin of a Kafka record, with the reading consumer's claim of its partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The consumer's claim of the partition (see `Coord::claim_partition`); 0: none.
    pub fence: u64,
}

impl KafkaRecord {
    pub fn partition_ref(&self) -> leasehold_coord::PartitionRef {
        leasehold_coord::PartitionRef {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }
}

impl From<pb::KafkaSource> for KafkaRecord {
    fn from(k: pb::KafkaSource) -> Self {
        Self {
            group: k.group,
            topic: k.topic,
            partition: k.partition,
            offset: k.offset,
            fence: k.fence,
        }
    }
}

impl From<KafkaRecord> for pb::KafkaSource {
    fn from(k: KafkaRecord) -> Self {
        Self {
            topic: k.topic,
            partition: k.partition,
            offset: k.offset,
            group: k.group,
            fence: k.fence,
        }
    }
}

/// One handler invocation.
#[derive(Debug, Clone)]
pub struct HandleCall {
    pub key: String,
    pub payload: Bytes,
    pub shard: ShardId,
    /// Fencing token: grows with every new owner of the shard.
    pub epoch: Epoch,
    pub owner: MemberId,
    pub source: CallSource,
    /// min(request deadline, lease valid_until): the handler must be done by then.
    pub deadline: Instant,
    /// Client metadata and trace context to pass on (the gRPC handler sends them as
    /// request metadata).
    pub metadata: crate::trace::CallMetadata,
}

/// The embedded handler interface: implement it to link Leasehold into a Rust program.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, Status>>;

    /// Whether the handler can take calls now. An instance takes no shard before this
    /// succeeds once, so a new member whose handler is still starting does not pull
    /// shards away from members that can serve them.
    fn ready(&self) -> BoxFuture<'static, Result<(), HandlerError>> {
        Box::pin(futures::future::ready(Ok(())))
    }
}

/// Answers every call with its payload (benchmarks, demos, smoke tests).
pub struct EchoHandler;

impl Handler for EchoHandler {
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, Status>> {
        Box::pin(futures::future::ready(Ok(call.payload)))
    }
}

/// Calls an application's `EntityHandler` service (sidecar style, any language).
#[derive(Clone)]
pub struct GrpcHandler {
    url: Arc<str>,
    endpoint: Endpoint,
    /// TLS to the handler (`grpcs://`).
    tls: Option<leasehold_tls::Connector>,
    client: EntityHandlerClient<Channel>,
    events: mpsc::Sender<(bool, ShardId, Epoch)>,
}

impl GrpcHandler {
    /// Connects lazily to `http://host:port` (through `tls` when given); calls made while
    /// it is down fail with `UNAVAILABLE`. Must be created inside a tokio runtime (it
    /// starts the task that delivers shard notifications in order).
    pub fn new(
        url: &str,
        max_message: usize,
        owner: MemberId,
        tls: Option<leasehold_tls::Connector>,
    ) -> Result<Self, HandlerError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| HandlerError::InvalidUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = match &tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.clone()),
            None => endpoint.connect_lazy(),
        };
        let client = EntityHandlerClient::new(channel)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let (events, rx) = mpsc::channel(4096);
        tokio::spawn(notify_loop(url.to_owned(), owner, client.clone(), rx));
        Ok(Self {
            url: url.into(),
            endpoint,
            tls,
            client,
            events,
        })
    }
}

impl Handler for GrpcHandler {
    /// Ready once an HTTP/2 connection to the application succeeds.
    fn ready(&self) -> BoxFuture<'static, Result<(), HandlerError>> {
        let (endpoint, url, tls) = (self.endpoint.clone(), self.url.clone(), self.tls.clone());
        Box::pin(async move {
            let connected = match tls {
                Some(tls) => endpoint.connect_with_connector(tls).await,
                None => endpoint.connect().await,
            };
            connected
                .map(|_| ())
                .map_err(|e| HandlerError::Unreachable {
                    url: url.to_string(),
                    reason: e.to_string(),
                })
        })
    }

    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, Status>> {
        let mut client = self.client.clone();
        let url = self.url.clone();
        Box::pin(async move {
            let timeout = call.deadline.saturating_duration_since(Instant::now());
            let source = match call.source {
                CallSource::Grpc { entry } => {
                    pb::source::Kind::Grpc(pb::GrpcSource { entry: entry.0 })
                }
                CallSource::Kafka(record) => pb::source::Kind::Kafka(record.into()),
            };
            let mut request = tonic::Request::new(pb::HandleRequest {
                key: call.key,
                payload: call.payload,
                shard: call.shard.0,
                epoch: call.epoch.0,
                owner: call.owner.0,
                source: Some(pb::Source { kind: Some(source) }),
                deadline_unix_ms: unix_millis(call.deadline),
            });
            call.metadata.to_grpc(request.metadata_mut());
            request.set_timeout(timeout);
            match client.handle(request).await {
                Ok(resp) => Ok(resp.into_inner().payload),
                // A status without metadata is the transport's, not the application's.
                Err(s) if s.code() == tonic::Code::Unavailable && s.metadata().is_empty() => Err(
                    unreachable(format!("handler at {url} unreachable: {}", s.message())),
                ),
                Err(s) => Err(s),
            }
        })
    }
}

impl ShardListener for GrpcHandler {
    fn acquired(&self, shard: ShardId, epoch: Epoch) {
        let _ = self.events.try_send((true, shard, epoch));
    }

    fn released(&self, shard: ShardId, epoch: Epoch) {
        let _ = self.events.try_send((false, shard, epoch));
    }
}

/// Delivers ShardAcquired / ShardReleased in the order they happened. Applications that
/// do not implement them answer UNIMPLEMENTED, which is fine.
async fn notify_loop(
    url: String,
    owner: MemberId,
    mut client: EntityHandlerClient<Channel>,
    mut rx: mpsc::Receiver<(bool, ShardId, Epoch)>,
) {
    while let Some((acquired, shard, epoch)) = rx.recv().await {
        let mut request = tonic::Request::new(pb::ShardEvent {
            shard: shard.0,
            epoch: epoch.0,
            owner: owner.0.clone(),
        });
        request.set_timeout(Duration::from_secs(2));
        let result = if acquired {
            client.shard_acquired(request).await
        } else {
            client.shard_released(request).await
        };
        if let Err(s) = result {
            if s.code() != tonic::Code::Unimplemented {
                tracing::debug!(handler = %url, %shard, %epoch, acquired, error = %s, "shard notification failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_map_to_wall_clock_time_ahead_and_behind() {
        let wall_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let ahead = unix_millis(Instant::now() + Duration::from_secs(5));
        assert!(
            (ahead - wall_now - 5000).abs() < 200,
            "{ahead} vs {wall_now}"
        );
        let earlier = Instant::now()
            .checked_sub(Duration::from_secs(3))
            .expect("the monotonic clock is past 3 s");
        let behind = unix_millis(earlier);
        assert!(
            (wall_now - behind - 3000).abs() < 200,
            "{behind} vs {wall_now}"
        );
    }
}
