//! Handlers: the user's code that runs for a key at its owner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use leasehold_proto::v1::{self as pb, entity_handler_client::EntityHandlerClient};
use leasehold_types::{Epoch, MemberId, ShardId};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// gRPC status codes, for a handler's error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl ErrorCode {
    fn to_grpc(self) -> tonic::Code {
        use tonic::Code as C;
        match self {
            ErrorCode::Cancelled => C::Cancelled,
            ErrorCode::Unknown => C::Unknown,
            ErrorCode::InvalidArgument => C::InvalidArgument,
            ErrorCode::DeadlineExceeded => C::DeadlineExceeded,
            ErrorCode::NotFound => C::NotFound,
            ErrorCode::AlreadyExists => C::AlreadyExists,
            ErrorCode::PermissionDenied => C::PermissionDenied,
            ErrorCode::ResourceExhausted => C::ResourceExhausted,
            ErrorCode::FailedPrecondition => C::FailedPrecondition,
            ErrorCode::Aborted => C::Aborted,
            ErrorCode::OutOfRange => C::OutOfRange,
            ErrorCode::Unimplemented => C::Unimplemented,
            ErrorCode::Internal => C::Internal,
            ErrorCode::Unavailable => C::Unavailable,
            ErrorCode::DataLoss => C::DataLoss,
            ErrorCode::Unauthenticated => C::Unauthenticated,
        }
    }

    fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code as C;
        match code {
            C::Cancelled => ErrorCode::Cancelled,
            C::InvalidArgument => ErrorCode::InvalidArgument,
            C::DeadlineExceeded => ErrorCode::DeadlineExceeded,
            C::NotFound => ErrorCode::NotFound,
            C::AlreadyExists => ErrorCode::AlreadyExists,
            C::PermissionDenied => ErrorCode::PermissionDenied,
            C::ResourceExhausted => ErrorCode::ResourceExhausted,
            C::FailedPrecondition => ErrorCode::FailedPrecondition,
            C::Aborted => ErrorCode::Aborted,
            C::OutOfRange => ErrorCode::OutOfRange,
            C::Unimplemented => ErrorCode::Unimplemented,
            C::Internal => ErrorCode::Internal,
            C::Unavailable => ErrorCode::Unavailable,
            C::DataLoss => ErrorCode::DataLoss,
            C::Unauthenticated => ErrorCode::Unauthenticated,
            // OK is no error; treat it, and anything unknown, as UNKNOWN.
            _ => ErrorCode::Unknown,
        }
    }
}

/// A handler's error answer: the client receives it as a gRPC status with this code,
/// message, details and metadata, through any forwarding hop.
#[derive(Debug, Clone)]
pub struct HandleError {
    code: ErrorCode,
    message: String,
    /// A serialised `google.rpc.Status` (`grpc-status-details-bin`), or empty.
    details: Bytes,
    /// ASCII metadata sent with the status (lower-case keys).
    metadata: Vec<(String, String)>,
    /// Set by the gRPC handler's transport, never by an application.
    transport: Option<Transport>,
}

/// How the connection to a gRPC handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The request never reached the handler (connect failed, stream refused): the call
    /// did not run.
    Unreachable,
    /// The connection failed after the request was sent: the call may have run.
    Lost,
}

impl HandleError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Bytes::new(),
            metadata: Vec::new(),
            transport: None,
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// Attaches a serialised `google.rpc.Status` with rich error details.
    pub fn with_details(mut self, details: impl Into<Bytes>) -> Self {
        self.details = details.into();
        self
    }

    /// Adds ASCII metadata to the status (keys are lower-cased; invalid pairs are
    /// dropped when the status is sent).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata
            .push((key.into().to_ascii_lowercase(), value.into()));
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// How the connection to a gRPC handler failed, if that is what this is.
    pub fn transport(&self) -> Option<Transport> {
        self.transport
    }

    /// An `UNAVAILABLE` saying the connection to the handler failed.
    pub(crate) fn transport_failure(kind: Transport, message: String) -> Self {
        Self {
            transport: Some(kind),
            ..Self::unavailable(message)
        }
    }

    /// The status the client receives.
    pub fn into_status(self) -> Status {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (k, v) in &self.metadata {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
                v.parse(),
            ) {
                metadata.insert(k, v);
            }
        }
        Status::with_details_and_metadata(self.code.to_grpc(), self.message, self.details, metadata)
    }

    /// A status an application's gRPC handler answered, kept whole.
    pub fn from_status(status: &Status) -> Self {
        let metadata = status
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        Self {
            code: ErrorCode::from_grpc(status.code()),
            message: status.message().to_owned(),
            details: status.details().to_vec().into(),
            metadata,
            transport: None,
        }
    }
}

impl std::fmt::Display for HandleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for HandleError {}

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
    /// Shared, not copied per record (as are `topic` and `cluster`).
    pub group: Arc<str>,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The consumer's claim of the partition (see `Coord::claim_partition`); 0: none.
    pub fence: u64,
    /// `primary` or `standby` for a source with failover; empty otherwise.
    pub cluster: Arc<str>,
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
            group: k.group.into(),
            topic: k.topic.into(),
            partition: k.partition,
            offset: k.offset,
            fence: k.fence,
            cluster: k.cluster.into(),
        }
    }
}

impl From<KafkaRecord> for pb::KafkaSource {
    fn from(k: KafkaRecord) -> Self {
        Self {
            topic: k.topic.to_string(),
            partition: k.partition,
            offset: k.offset,
            group: k.group.to_string(),
            fence: k.fence,
            cluster: k.cluster.to_string(),
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

/// A change of this instance's ownership of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEvent {
    pub shard: ShardId,
    /// The ownership's fencing token.
    pub epoch: Epoch,
    /// For `shard_released`: the shard was lost without a planned move (the lease
    /// expired, e.g. a partition from etcd). Another instance may own it already and may
    /// have written newer state: do not write back what this instance kept.
    pub lost: bool,
}

/// The embedded handler interface: implement it to link Leasehold into a Rust program.
///
/// Leasehold runs `handle` one call at a time per key, at the key's owner only. The
/// shard hooks are delivered per shard in epoch order: `shard_acquired` before the first
/// call of the ownership, `shard_released` after its last call — for a planned move
/// (rebalancing, drain, shutdown) before the next owner can take the shard. Each hook is
/// bounded by `shard_event_timeout`; past it, or when it fails or panics, Leasehold goes
/// on without it and says so (log and `leasehold_shard_event_failures_total`). A `handle`
/// that panics fails only its call, with `INTERNAL`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>>;

    /// This instance became the owner of a shard (load local state here). No call of
    /// the ownership runs before this returns.
    fn shard_acquired(&self, _event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        Box::pin(futures::future::ready(Ok(())))
    }

    /// This instance stops owning a shard. For a planned move (`event.lost` false) no
    /// call runs for it any more and the next owner waits for this to return: flush
    /// local state here. For a shard lost without one (`event.lost`: the lease expired)
    /// it comes after the fact — another instance may own the shard already and calls
    /// may still be finishing here — so discard what was kept instead of writing it.
    fn shard_released(&self, _event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        Box::pin(futures::future::ready(Ok(())))
    }

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
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
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
    owner: MemberId,
}

impl GrpcHandler {
    /// Connects lazily to `http://host:port` (through `tls` when given); calls made while
    /// it is down fail with `UNAVAILABLE`. Must be created inside a tokio runtime.
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
        Ok(Self {
            url: url.into(),
            endpoint,
            tls,
            client,
            owner,
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

    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
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
                Err(s) if s.metadata().is_empty() && crate::peers::never_sent(&s) => {
                    Err(HandleError::transport_failure(
                        Transport::Unreachable,
                        format!("handler at {url} unreachable: {}", s.message()),
                    ))
                }
                // Also an HTTP/2 error of the connection, which tonic reports as INTERNAL
                // (as when the handler's server stops while the call is sent); not an
                // INTERNAL the handler sent, or one about its answer's encoding.
                Err(s)
                    if s.metadata().is_empty()
                        && (s.code() == tonic::Code::Unavailable
                            || (s.code() == tonic::Code::Internal && connection_failed(&s))) =>
                {
                    Err(HandleError::transport_failure(
                        Transport::Lost,
                        format!(
                            "the connection to the handler at {url} failed during the call (it may have run): {}",
                            s.message()
                        ),
                    ))
                }
                Err(s) => Err(HandleError::from_status(&s)),
            }
        })
    }

    fn shard_acquired(&self, event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        self.notify(true, event)
    }

    fn shard_released(&self, event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        self.notify(false, event)
    }
}

/// A status tonic made from a failure of the connection (a hyper error in its source
/// chain), not one the handler sent: those carry no source, and neither do tonic's own
/// errors about a response it could not decode.
fn connection_failed(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    let mut source = s.source();
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

impl GrpcHandler {
    /// ShardAcquired / ShardReleased. An application that does not implement them
    /// answers UNIMPLEMENTED, which is fine.
    fn notify(
        &self,
        acquired: bool,
        event: ShardEvent,
    ) -> BoxFuture<'static, Result<(), HandleError>> {
        let mut client = self.client.clone();
        let request = pb::ShardEvent {
            shard: event.shard.0,
            epoch: event.epoch.0,
            owner: self.owner.0.clone(),
            lost: event.lost,
        };
        Box::pin(async move {
            let result = if acquired {
                client.shard_acquired(request).await
            } else {
                client.shard_released(request).await
            };
            match result {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
                Err(s) => Err(HandleError::from_status(&s)),
            }
        })
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
