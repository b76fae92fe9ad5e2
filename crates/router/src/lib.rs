//! The call path. Any instance accepts any key:
//!
//! 1. the key's shard is the stable hash of the key (`leasehold-types`);
//! 2. the call joins the key's mailbox on the accepting instance, so calls for a key leave
//!    it one at a time in arrival order;
//! 3. if this instance owns the shard and its lease is valid, the handler runs here;
//!    if a peer owns it, the call is forwarded once; if nobody does (or the shard is
//!    moving, or the lease is past `valid_until`) the call is held until that changes or
//!    its deadline passes;
//! 4. a peer that is not the owner any more answers "not owner" with its view, and the
//!    sender waits for its routing table to catch up and tries again.

mod events;
mod frames;
mod handler;
pub mod hot;
pub mod load;
mod mailbox;
mod peers;
pub mod routing;
mod service;
pub mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use leasehold_coord::{Blocked, CallGuard, Coord, LocalState};
use leasehold_metrics::{Counter, Gauge, Histogram, Registry};
use leasehold_types::{shard_for_key, Epoch, MemberId, ShardId};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};

pub use crate::events::ShardEvents;
pub use crate::handler::{
    CallSource, EchoHandler, ErrorCode, GrpcHandler, HandleCall, HandleError, Handler,
    HandlerError, KafkaRecord, ShardEvent,
};
use crate::mailbox::{Mailboxes, Turn, Waiting};
use crate::peers::{Forwarded, PeerError, Peers};
pub use crate::service::{parse_grpc_timeout, EntitiesService, PeerService};
pub use crate::trace::CallMetadata;

/// Limits of the call path.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Largest accepted payload in bytes.
    pub max_payload: usize,
    /// Deadline of a call whose client sets none, and the longest deadline accepted.
    pub request_timeout: Duration,
    /// Handler calls running at once on this instance (different keys).
    pub max_concurrency: usize,
    /// Calls queued per key before `RESOURCE_EXHAUSTED`.
    pub mailbox_capacity: usize,
    /// Longest accepted key in bytes.
    pub max_key_bytes: usize,
    /// Client gRPC metadata keys passed on to the handler (besides the trace context).
    pub forward_metadata: Vec<String>,
    /// Calls held or queued across all keys before `RESOURCE_EXHAUSTED`.
    pub max_pending_calls: usize,
    /// Messages a peer may have in flight on one Dispatch stream.
    pub max_dispatch_in_flight: usize,
    /// Mutual TLS to peers, and the identity checks of calls from peers.
    pub peer_tls: Option<PeerTls>,
}

/// Mutual TLS on the peer plane.
#[derive(Clone)]
pub struct PeerTls {
    /// This instance's client config: the peer CA and its own certificate.
    pub client: Arc<leasehold_tls::Reloading<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl RouterOptions {
    /// Largest message between instances: a payload of `max_payload` and room for the
    /// rest of the call (key, source, metadata).
    pub(crate) fn max_message(&self) -> usize {
        self.max_payload + (1 << 20)
    }
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            max_payload: 4 << 20,
            request_timeout: Duration::from_secs(5),
            max_concurrency: 1024,
            mailbox_capacity: 1024,
            max_key_bytes: 1024,
            max_pending_calls: 65_536,
            max_dispatch_in_flight: 4096,
            forward_metadata: Vec::new(),
            peer_tls: None,
        }
    }
}

/// The answer to a call.
#[derive(Debug, Clone)]
pub struct Reply {
    pub payload: Bytes,
    pub shard: ShardId,
    pub epoch: Epoch,
    pub owner: MemberId,
}

/// Why a call did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    /// The receiver of a forwarded call does not own the shard (its view attached).
    #[error("not the owner of shard {shard}")]
    NotOwner {
        shard: ShardId,
        owner: Option<MemberId>,
        epoch: Epoch,
    },
    /// The handler's own answer, passed through unchanged.
    #[error("{0}")]
    Handler(Status),
    /// The handler did not answer within its deadline.
    #[error("{0}")]
    HandlerTimeout(String),
    /// A Kafka record read under an older claim of its partition than the latest one
    /// known here: its consumer lost the partition (whether it knows yet or not).
    #[error("{0}")]
    Fenced(String),
    /// The deadline passed after the call was sent to its owner without an answer: it
    /// may or may not have run.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// The connection to the (gRPC) handler failed after the call was sent: it may have
    /// run.
    #[error("{0}")]
    HandlerLost(String),
}

impl CallError {
    /// Stable name of the variant, carried across the peer hop so the entry instance can
    /// tell the handler's own failure from a call that never reached a handler.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::InvalidArgument(_) => "invalid_argument",
            CallError::ResourceExhausted(_) => "resource_exhausted",
            CallError::DeadlineExceeded(_) => "deadline_exceeded",
            CallError::Unavailable(_) => "unavailable",
            CallError::NotOwner { .. } => "not_owner",
            CallError::Handler(_) => "handler",
            CallError::HandlerTimeout(_) => "handler_timeout",
            CallError::Fenced(_) => "fenced",
            CallError::OutcomeUnknown(_) => "outcome_unknown",
            CallError::HandlerLost(_) => "handler_lost",
        }
    }

    /// Rebuilds an owner's error from its status and [`CallError::kind`]; an unknown kind
    /// is the handler's (the status passes through unchanged).
    pub(crate) fn from_remote(status: Status, kind: &str) -> CallError {
        let m = status.message().to_owned();
        match kind {
            "invalid_argument" => CallError::InvalidArgument(m),
            "resource_exhausted" => CallError::ResourceExhausted(m),
            "deadline_exceeded" => CallError::DeadlineExceeded(m),
            "unavailable" => CallError::Unavailable(m),
            "handler_timeout" => CallError::HandlerTimeout(m),
            "fenced" => CallError::Fenced(m),
            "outcome_unknown" => CallError::OutcomeUnknown(m),
            "handler_lost" => CallError::HandlerLost(m),
            _ => CallError::Handler(status),
        }
    }
}

impl CallError {
    /// The gRPC code a client sees.
    pub fn code(&self) -> Code {
        match self {
            CallError::InvalidArgument(_) => Code::InvalidArgument,
            CallError::ResourceExhausted(_) => Code::ResourceExhausted,
            CallError::DeadlineExceeded(_)
            | CallError::HandlerTimeout(_)
            | CallError::OutcomeUnknown(_) => Code::DeadlineExceeded,
            CallError::Unavailable(_) | CallError::HandlerLost(_) => Code::Unavailable,
            CallError::NotOwner { .. } => Code::FailedPrecondition,
            CallError::Handler(s) => s.code(),
            CallError::Fenced(_) => Code::Aborted,
        }
    }

    /// True when the call did not run and sending it again (with a new deadline, after a
    /// back-off) may succeed: no owner yet, queues full, the deadline passed before the
    /// handler started. A handler's own error, a handler that timed out (it may have
    /// run) and a refused call are not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CallError::ResourceExhausted(_)
                | CallError::DeadlineExceeded(_)
                | CallError::Unavailable(_)
                | CallError::NotOwner { .. }
        )
    }

    /// The `google.rpc.ErrorInfo` reason clients can switch on (the handler's own errors
    /// pass through unchanged and have none from Leasehold).
    pub fn reason(&self) -> Option<&'static str> {
        Some(match self {
            CallError::InvalidArgument(_) => "INVALID_CALL",
            CallError::ResourceExhausted(_) => "OVERLOADED",
            CallError::DeadlineExceeded(_) => "DEADLINE_BEFORE_HANDLER",
            CallError::Unavailable(_) => "NO_OWNER_AVAILABLE",
            CallError::NotOwner { .. } => "NOT_OWNER",
            CallError::HandlerTimeout(_) => "HANDLER_TIMEOUT",
            CallError::Fenced(_) => "FENCED",
            CallError::OutcomeUnknown(_) => "OUTCOME_UNKNOWN",
            CallError::HandlerLost(_) => "HANDLER_CONNECTION_LOST",
            CallError::Handler(_) => return None,
        })
    }
}

/// A call's final result once an earlier attempt may have run at an owner that did not
/// answer: a "did not run, retry" error from a later attempt does not speak for that
/// one, so it becomes [`CallError::OutcomeUnknown`].
fn settle(result: Result<Reply, CallError>, sent_unanswered: bool) -> Result<Reply, CallError> {
    match result {
        Err(e) if sent_unanswered && e.is_retryable() => Err(CallError::OutcomeUnknown(format!(
            "{e}; an earlier attempt reached its owner without an answer and may have run"
        ))),
        other => other,
    }
}

/// `ErrorInfo.domain` of Leasehold's errors.
pub const ERROR_DOMAIN: &str = "leasehold.dev";

impl From<CallError> for Status {
    fn from(e: CallError) -> Status {
        use tonic_types::{ErrorDetails, StatusExt};
        let Some(reason) = e.reason() else {
            let CallError::Handler(s) = e else {
                unreachable!("only the handler's errors have no reason")
            };
            return without_leasehold_info(s);
        };
        let mut metadata = std::collections::HashMap::from([(
            "retryable".to_owned(),
            e.is_retryable().to_string(),
        )]);
        if let CallError::NotOwner {
            shard,
            owner,
            epoch,
        } = &e
        {
            metadata.insert("shard".into(), shard.0.to_string());
            metadata.insert("epoch".into(), epoch.0.to_string());
            if let Some(owner) = owner {
                metadata.insert("owner".into(), owner.0.clone());
            }
        }
        let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        Status::with_error_details(e.code(), e.to_string(), details)
    }
}

/// A handler's status without any `ErrorInfo` of Leasehold's domain. A handler that
/// relays an error Leasehold gave it (calling another entity, say) must not tell this
/// call's client "did not run, retry": this call did run.
fn without_leasehold_info(s: Status) -> Status {
    use prost::Message;
    if s.details().is_empty() {
        return s;
    }
    let Ok(mut rpc) = tonic_types::pb::Status::decode(s.details()) else {
        return s;
    };
    let before = rpc.details.len();
    rpc.details.retain(|any| {
        !(any.type_url.ends_with("/google.rpc.ErrorInfo")
            && tonic_types::pb::ErrorInfo::decode(any.value.as_slice())
                .is_ok_and(|info| info.domain == ERROR_DOMAIN))
    });
    if rpc.details.len() == before {
        return s;
    }
    Status::with_details_and_metadata(
        s.code(),
        s.message(),
        rpc.encode_to_vec().into(),
        s.metadata().clone(),
    )
}

/// How a call reached this instance.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Accepted here from a client: may be forwarded once.
    Entry,
    /// Forwarded by a peer that expects this instance to own the shard at `expected`:
    /// runs here only at that epoch, else is answered "not owner".
    Forwarded { expected: Epoch },
}

struct Job {
    key: String,
    shard: ShardId,
    payload: Bytes,
    deadline: Instant,
    origin: Origin,
    source: CallSource,
    /// Passed on to the handler (see [`trace::CallMetadata`]).
    metadata: CallMetadata,
}

struct Metrics {
    ok: Arc<Counter>,
    failed: Arc<Counter>,
    forwards: Arc<Counter>,
    not_owner_retries: Arc<Counter>,
    /// Forwarded copies answered "not owner" while queued for their key's turn.
    released_waiting: Arc<Counter>,
    held: Arc<Counter>,
    handler_latency: Arc<Histogram>,
    /// Calls run here per shard (series of shards no longer owned here are dropped).
    shard_calls: Arc<leasehold_metrics::IndexedCounter>,
    /// Calls per second of the hottest keys here, by rank (the keys themselves are on
    /// `/v1/hot-keys`: keys as label values would be unbounded, and often personal data).
    hot_keys: Vec<Arc<Gauge>>,
    mailboxes: Arc<Gauge>,
    stream_calls: Arc<Counter>,
    stream_cancels: Arc<Counter>,
    fenced: Arc<Counter>,
}

struct Inner {
    coord: Coord,
    handler: Arc<dyn Handler>,
    events: Arc<ShardEvents>,
    opts: RouterOptions,
    mailboxes: Arc<Mailboxes>,
    peers: Peers,
    concurrency: Arc<Semaphore>,
    /// Calls between acceptance and their end, across all keys (`max_pending_calls`).
    pending: Arc<std::sync::atomic::AtomicUsize>,
    metrics: Metrics,
    /// Work that outlives a request (a handler call whose caller left, Dispatch streams),
    /// awaited at shutdown before the lease is revoked.
    tasks: TaskTracker,
    /// Cancelled by [`Router::close`]: Dispatch streams from peers stop reading.
    closing: tokio_util::sync::CancellationToken,
    /// The routing table smart clients watch.
    routing: routing::RoutingCache,
    /// The keys taking the most calls here.
    hot: hot::HotKeys,
    /// Calls and busy time per shard, for load reports.
    load: load::LoadMeter,
}

/// A call counted as pending and queued for its key's turn (see [`Router::admit`]).
pub(crate) struct Admitted {
    key: String,
    payload: Bytes,
    pending: Pending,
    waiting: mailbox::Waiting,
}

/// One call counted against `max_pending_calls` until dropped.
struct Pending(Arc<std::sync::atomic::AtomicUsize>);

impl Pending {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Pending(count.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The name of a call's span: the RPC that brought it here, or the Kafka record.
fn span_name(forwarded: bool, source: &CallSource) -> &'static str {
    match (forwarded, source) {
        (false, CallSource::Grpc { .. }) => "leasehold.v1.Entities/Call",
        (false, CallSource::Kafka(_)) => "kafka record",
        (true, CallSource::Grpc { .. }) => "forwarded call",
        (true, CallSource::Kafka(_)) => "forwarded record",
    }
}

/// The call path of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

/// Pauses between forwards answered "not owner" by the same owner at the same epoch:
/// from 5 ms doubling to 200 ms, for 8 tries (about 0.7 s); then only table changes.
const NOT_OWNER_PAUSE_MIN: Duration = Duration::from_millis(5);
const NOT_OWNER_PAUSE_MAX: Duration = Duration::from_millis(200);
const NOT_OWNER_FAST_TRIES: u32 = 8;

/// A call whose deadline passed while it waited for its key's turn (it did not run).
fn queued_too_long(key: &str) -> CallError {
    CallError::DeadlineExceeded(format!(
        "deadline passed while queued behind earlier calls for key {key:?}"
    ))
}

/// A call whose ownership's ShardAcquired hook did not end before its deadline (it did
/// not run).
fn hook_pending(shard: ShardId) -> CallError {
    CallError::DeadlineExceeded(format!(
        "the handler's ShardAcquired hook for shard {shard} did not end before the call's deadline"
    ))
}

impl Router {
    /// Waits until the `acquired` hook of `shard` at `epoch` has been delivered (at once
    /// when it has); false if `deadline` came first.
    async fn announced(&self, shard: ShardId, epoch: Epoch, deadline: Instant) -> bool {
        match self.inner.events.acquiring(shard, epoch) {
            None => true,
            Some(hook) => tokio::time::timeout_at(deadline.into(), hook).await.is_ok(),
        }
    }

    /// `events` delivers `handler`'s shard hooks (it is `coord`'s listener); calls of an
    /// ownership wait for its `acquired` hook.
    pub fn new(
        coord: Coord,
        handler: Arc<dyn Handler>,
        events: Arc<ShardEvents>,
        opts: RouterOptions,
        registry: &Registry,
    ) -> Self {
        let metrics = Metrics {
            ok: registry.counter(
                "leasehold_calls_total",
                "Calls accepted by this instance, by result.",
                &[("result", "ok")],
            ),
            failed: registry.counter(
                "leasehold_calls_total",
                "Calls accepted by this instance, by result.",
                &[("result", "error")],
            ),
            forwards: registry.counter(
                "leasehold_forwards_total",
                "Calls forwarded to the owning peer.", &[],
            ),
            not_owner_retries: registry.counter(
                "leasehold_not_owner_retries_total",
                "Forwards answered \"not owner\" and retried (after a short pause, or once the routing table changed).", &[],
            ),
            released_waiting: registry.counter(
                "leasehold_forwarded_released_while_queued_total",
                "Forwarded calls answered \"not owner\" while queued for their key's turn, because the shard left this instance meanwhile (their senders route them again).", &[],
            ),
            held: registry.counter(
                "leasehold_held_calls_total",
                "Times a call waited for an owner, a handoff or the lease.", &[],
            ),
            handler_latency: registry.histogram(
                "leasehold_handler_duration_seconds",
                "Handler call latency at the owner.", &[],
            ),
            hot_keys: (1..=5)
                .map(|rank| {
                    registry.gauge(
                        "leasehold_hot_key_calls_per_second",
                        "Calls per second of the hottest keys at this instance, by rank (1 = hottest); the keys are on /v1/hot-keys.",
                        &[("rank", &rank.to_string())],
                    )
                })
                .collect(),
            shard_calls: registry.indexed_counter(
                "leasehold_shard_calls_total",
                "Handler calls run at this owner per shard (shards owned here only).",
                "shard",
                coord.options().shard_count as usize,
            ),
            mailboxes: registry.gauge(
                "leasehold_active_mailboxes",
                "Keys with queued or running calls.", &[],
            ),
            stream_calls: registry.counter(
                "leasehold_peer_stream_calls_total",
                "Forwarded calls and Kafka records received over peers' Dispatch streams.", &[],
            ),
            stream_cancels: registry.counter(
                "leasehold_peer_stream_cancels_total",
                "Cancel messages received over peers' Dispatch streams (their calls are dropped here unless their handler had started).", &[],
            ),
            fenced: registry.counter(
                "leasehold_fenced_records_total",
                "Kafka records refused at their owner because their consumer's claim of the partition was superseded.", &[],
            ),
        };
        let max_message = opts.max_message();
        let tasks = TaskTracker::new();
        Self {
            inner: Arc::new(Inner {
                mailboxes: Arc::new(Mailboxes::new(opts.mailbox_capacity)),
                peers: Peers::new(
                    max_message,
                    opts.max_dispatch_in_flight,
                    tasks.clone(),
                    coord.member_id().clone(),
                    opts.peer_tls.as_ref().map(|t| t.client.clone()),
                    ["frames", "grpc"].map(|transport| {
                        registry.counter(
                            "leasehold_peer_streams_opened_total",
                            "Dispatch streams this instance opened to peers, by transport (peer frames; gRPC to a peer that refused the frames greeting in the last second or did not answer it, such as one that only takes HTTP/2).",
                            &[("transport", transport)],
                        )
                    }),
                ),
                pending: Default::default(),
                tasks,
                closing: tokio_util::sync::CancellationToken::new(),
                routing: routing::RoutingCache::default(),
                hot: hot::HotKeys::default(),
                load: load::LoadMeter::new(coord.options().shard_count),
                concurrency: Arc::new(Semaphore::new(opts.max_concurrency)),
                coord,
                handler,
                events,
                opts,
                metrics,
            }),
        }
    }

    pub fn coord(&self) -> &Coord {
        &self.inner.coord
    }

    pub fn options(&self) -> &RouterOptions {
        &self.inner.opts
    }

    /// The keys that took the most calls at this instance (as their owner) over the
    /// last 10 to 20 seconds, hottest first.
    pub fn hot_keys(&self) -> Vec<hot::HotKey> {
        self.inner.hot.top()
    }

    pub(crate) fn routing_cache(&self) -> &routing::RoutingCache {
        &self.inner.routing
    }

    /// Cancelled by [`Router::close`]: long-lived streams into this instance end.
    pub fn closing(&self) -> &tokio_util::sync::CancellationToken {
        &self.inner.closing
    }

    /// Work that outlives a request; close and await it at shutdown, before the lease is
    /// revoked (a handler call still running holds its shard).
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// At shutdown, once no call arrives any more: ends the Dispatch streams to peers and
    /// closes [`Router::tasks`], so that awaiting it returns when the last handler call
    /// and stream finished.
    pub fn close(&self) {
        self.inner.closing.cancel();
        self.inner.peers.close();
        self.inner.tasks.close();
    }

    /// Publishes this instance's per-shard load every `interval` (smoothed over
    /// `smoothing`) until `cancel`; a failed write is logged and retried at the next tick.
    pub async fn report_load(
        &self,
        interval: Duration,
        smoothing: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut smoother = load::LoadSmoother::new(smoothing);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut written = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let held = self.inner.coord.table().held();
            let report = smoother.sample(&self.inner.load, &held, now - last);
            last = now;
            if let Err(e) = self.inner.coord.report_load(&report, &mut written).await {
                tracing::warn!(error = %e, "load report not written; retrying at the next interval");
            }
            self.forget_departed_peers();
        }
    }

    /// Forgets connections and streams to peer addresses the routing table no longer
    /// names (see `Peers::retain`); run with each load report.
    fn forget_departed_peers(&self) {
        let view = self.inner.coord.view();
        if !view.synced {
            return;
        }
        let mut live: std::collections::HashSet<String> = view
            .members
            .values()
            .map(|m| Peers::cache_key(&m.peer))
            .collect();
        // A shard whose owner's member key is gone is still forwarded to its key's address.
        for o in view.shards.iter().flatten() {
            if !view.members.contains_key(&o.owner) {
                live.insert(Peers::cache_key(&o.peer));
            }
        }
        let (departed, broken) = self.inner.peers.retain(&live);
        if !departed.is_empty() {
            tracing::info!(?departed, "forgot connections to peers that left");
        }
        if broken > 0 {
            tracing::debug!(broken, "dropped broken streams to peers");
        }
    }

    pub fn refresh_metrics(&self) {
        let top = self.inner.hot.top();
        for (rank, gauge) in self.inner.metrics.hot_keys.iter().enumerate() {
            gauge.set(top.get(rank).map_or(0.0, |k| k.calls_per_second));
        }
        self.inner
            .metrics
            .mailboxes
            .set(self.inner.mailboxes.active() as f64);
        let table = self.inner.coord.table();
        let calls = &self.inner.metrics.shard_calls;
        for shard in 0..calls.len() {
            if table.state(ShardId(shard as u32)) == leasehold_coord::LocalState::NotOwned {
                calls.clear(shard);
            }
        }
    }

    /// Client metadata keys passed on to the handler (besides the trace context).
    pub fn forward_metadata(&self) -> &[String] {
        &self.inner.opts.forward_metadata
    }

    /// Checks a key and payload against the limits.
    pub fn validate(&self, key: &str, payload: &[u8]) -> Result<(), CallError> {
        if key.is_empty() {
            return Err(CallError::InvalidArgument("key must not be empty".into()));
        }
        if key.len() > self.inner.opts.max_key_bytes {
            return Err(CallError::InvalidArgument(format!(
                "key is {} bytes; the limit (max_key_bytes) is {} bytes",
                key.len(),
                self.inner.opts.max_key_bytes
            )));
        }
        if payload.len() > self.inner.opts.max_payload {
            return Err(CallError::InvalidArgument(format!(
                "payload is {} bytes; the limit (max_payload) is {} bytes",
                payload.len(),
                self.inner.opts.max_payload
            )));
        }
        Ok(())
    }

    /// The deadline of a call given the client's timeout, capped by `request_timeout`.
    pub fn deadline(&self, client_timeout: Option<Duration>) -> Instant {
        let limit = self.inner.opts.request_timeout;
        Instant::now() + client_timeout.map_or(limit, |t| t.min(limit))
    }

    /// Runs a call accepted by this instance, wherever its key lives.
    ///
    /// The call is admitted (counted as pending, queued for its key's turn) when this is
    /// called, not when the future is first polled. The future owns what it needs and
    /// holds each part once: futures are allocated per call (boxed, spawned), and their
    /// size is copied and allocated every time (see ARCHITECTURE.md, "Per-call future
    /// size").
    pub fn call(
        &self,
        key: String,
        payload: Bytes,
        deadline: Instant,
        source: CallSource,
        metadata: CallMetadata,
    ) -> impl std::future::Future<Output = Result<Reply, CallError>> + Send + 'static {
        use futures::future::{Either, FutureExt as _};
        // Combinators, not an async block awaiting `run`: that would hold the future twice.
        let run = match self.admit(key, payload) {
            Ok(call) => Either::Left(self.proceed(call, deadline, Origin::Entry, source, metadata)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        };
        let inner = self.inner.clone();
        run.inspect(move |result| match result {
            Ok(_) => inner.metrics.ok.inc(),
            Err(_) => inner.metrics.failed.inc(),
        })
    }

    /// Admits a call forwarded by a peer: counted as pending and queued for its key's
    /// turn now, so calls read from one stream take their keys' turns in the order they
    /// were read. Run it with [`Router::serve_forwarded`].
    pub(crate) fn admit(&self, key: String, payload: Bytes) -> Result<Admitted, CallError> {
        self.validate(&key, &payload)?;
        let pending = Pending::enter(&self.inner.pending, self.inner.opts.max_pending_calls)
            .ok_or_else(|| {
                CallError::ResourceExhausted(format!(
                    "{} calls already pending on this instance (max_pending_calls)",
                    self.inner.opts.max_pending_calls
                ))
            })?;
        let waiting = self.inner.mailboxes.enter(&key).map_err(|_| {
            CallError::ResourceExhausted(format!(
                "{} calls already queued for key {key:?} (mailbox_capacity)",
                self.inner.opts.mailbox_capacity
            ))
        })?;
        Ok(Admitted {
            key,
            payload,
            pending,
            waiting,
        })
    }

    /// Runs an admitted call forwarded by a peer; never forwards it again. `expected` is
    /// the epoch the sender routed by (`Epoch::NONE`: any). Dropping it before its
    /// handler started drops the call (its turn passes on).
    pub(crate) fn serve_forwarded(
        &self,
        call: Admitted,
        deadline: Instant,
        source: CallSource,
        expected: Epoch,
        metadata: CallMetadata,
    ) -> impl std::future::Future<Output = Result<Reply, CallError>> + Send + 'static {
        self.proceed(
            call,
            deadline,
            Origin::Forwarded { expected },
            source,
            metadata,
        )
    }

    /// Waits for the call's turn for its key, then routes it. The job is built now, and
    /// the future owns it and a handle to the router (no copy of its parts).
    fn proceed(
        &self,
        call: Admitted,
        deadline: Instant,
        origin: Origin,
        source: CallSource,
        metadata: CallMetadata,
    ) -> impl std::future::Future<Output = Result<Reply, CallError>> + Send + 'static {
        let Admitted {
            key,
            payload,
            pending,
            waiting,
        } = call;
        let shard = shard_for_key(key.as_bytes(), self.inner.coord.table().shard_count());
        let job = Job {
            key,
            shard,
            payload,
            deadline,
            origin,
            source,
            metadata,
        };
        let this = self.clone();
        async move {
            let _pending = pending;
            let turn = match job.origin {
                Origin::Forwarded { expected } => {
                    this.forwarded_turn(&job, waiting, expected).await?
                }
                Origin::Entry => tokio::time::timeout_at(job.deadline.into(), waiting.turn())
                    .await
                    .map_err(|_| queued_too_long(&job.key))?,
            };
            let forwarded = matches!(job.origin, Origin::Forwarded { .. });
            let span = tracing::debug_span!(
                "call",
                otel.name = span_name(forwarded, &job.source),
                otel.kind = if forwarded || matches!(job.source, CallSource::Grpc { .. }) { "server" } else { "consumer" },
                key_hash = format_args!("{:016x}", leasehold_types::key_hash(job.key.as_bytes())),
                shard = %job.shard,
                forwarded,
            );
            trace::continue_trace(&span, &job.metadata);
            tracing::Instrument::instrument(this.route(&job, Arc::new(turn)), span).await
        }
    }

    /// Waits for a forwarded copy's turn for its key, and answers "not owner" as soon as
    /// this instance stops owning the shard at the epoch its sender routed by.
    ///
    /// The sender holds the key's turn at its own instance while it waits for this
    /// answer. A call queued here ahead of the copy may itself be waiting for the shard,
    /// which moved to that sender: it forwards there and queues behind the sender's call.
    /// Without this check the two instances wait on each other until the deadline (a
    /// planned move under calls for one key entering both). Answering early changes
    /// nothing else: at its turn the copy would get the same answer, and the sender keeps
    /// its own turn, so calls that entered there after it still wait behind it.
    async fn forwarded_turn(
        &self,
        job: &Job,
        waiting: Waiting,
        expected: Epoch,
    ) -> Result<Turn, CallError> {
        use futures::FutureExt as _;
        let turn = waiting.turn();
        tokio::pin!(turn);
        // The usual case: first in line, nothing to watch.
        if let Some(turn) = (&mut turn).now_or_never() {
            return Ok(turn);
        }
        // The local table (ownership here) and the routing table (see `moved_away`).
        let mut changes = self.inner.coord.table().subscribe();
        let mut views = self.inner.coord.subscribe_view();
        let deadline = tokio::time::sleep_until(job.deadline.into());
        tokio::pin!(deadline);
        let (mut watching, mut viewing) = (true, true);
        loop {
            changes.borrow_and_update();
            views.borrow_and_update();
            if let Some(not_owner) = self.moved_away(job.shard, expected) {
                self.inner.metrics.released_waiting.inc();
                return Err(not_owner);
            }
            tokio::select! {
                biased;
                turn = &mut turn => return Ok(turn),
                _ = &mut deadline => return Err(queued_too_long(&job.key)),
                changed = changes.changed(), if watching => watching = changed.is_ok(),
                changed = views.changed(), if viewing => viewing = changed.is_ok(),
            }
        }
    }

    /// "Not owner" for a forwarded copy routed to `shard` at `expected` when this
    /// instance no longer owns it at that epoch (a shard being handed off still is: its
    /// move ends once its running calls have; so is one the routing table shows this
    /// instance holding at that epoch while its own table has not recorded it yet).
    fn moved_away(&self, shard: ShardId, expected: Epoch) -> Option<CallError> {
        let coord = &self.inner.coord;
        let gone = match coord.table().state(shard) {
            LocalState::NotOwned => !coord.view().owner(shard).is_some_and(|o| {
                o.owner == *coord.member_id() && (expected == Epoch::NONE || o.epoch == expected)
            }),
            LocalState::Owned(epoch) | LocalState::Moving(epoch) => {
                expected != Epoch::NONE && epoch != expected
            }
        };
        gone.then(|| {
            let view = coord.view();
            let owner = view.owner(shard);
            CallError::NotOwner {
                shard,
                owner: owner.map(|o| o.owner.clone()),
                epoch: owner.map_or(Epoch::NONE, |o| o.epoch),
            }
        })
    }

    async fn route(&self, job: &Job, turn: Arc<Turn>) -> Result<Reply, CallError> {
        let coord = &self.inner.coord;
        let table = coord.table();
        let mut changes = table.subscribe();
        let mut waited = false;
        let mut reason = "no owner";
        // Set once a forward got no answer after it may have reached its owner: the
        // call may have run, and a timeout must not say it did not.
        let mut sent_unanswered = false;
        // Fast retries after "not owner" answers from one owner at one epoch.
        let mut not_owner_from: Option<(MemberId, Epoch)> = None;
        let mut not_owner_tries = 0u32;
        let mut not_owner_pause = NOT_OWNER_PAUSE_MIN;
        loop {
            changes.borrow_and_update();
            if Instant::now() >= job.deadline {
                let why = format!(
                    "deadline passed while waiting for shard {} ({reason})",
                    job.shard
                );
                return Err(if sent_unanswered {
                    CallError::OutcomeUnknown(format!(
                        "{why}; an earlier attempt reached its owner without an answer and may have run"
                    ))
                } else {
                    CallError::DeadlineExceeded(why)
                });
            }
            // Startable here: run it (execute re-checks once it holds a permit).
            let blocked = match table.check(job.shard) {
                Ok(()) => match self.execute(job, &turn).await {
                    Ok(result) => return settle(result, sent_unanswered),
                    Err(blocked) => blocked,
                },
                Err(blocked) => blocked,
            };
            match blocked {
                Blocked::Moving => reason = "shard moving",
                Blocked::LeaseInvalid => reason = "lease not valid",
                Blocked::Behind => reason = "routing table catching up",
                Blocked::NotOwned => {
                    if let Origin::Forwarded { .. } = job.origin {
                        let view = coord.view();
                        let owner = view.owner(job.shard);
                        return Err(CallError::NotOwner {
                            shard: job.shard,
                            owner: owner.map(|o| o.owner.clone()),
                            epoch: owner.map_or(Epoch::NONE, |o| o.epoch),
                        });
                    }
                    let view = coord.view();
                    match view.owner(job.shard) {
                        Some(o) if o.owner != *coord.member_id() => {
                            self.inner.metrics.forwards.inc();
                            // The member's own record (rewritten under every lease) says
                            // where it takes peer calls now; the shard key's copy is what
                            // it said when it acquired the shard.
                            let peer = view.members.get(&o.owner).map_or(&o.peer, |m| &m.peer);
                            // Boxed: the forward future is large and the owner path should not carry it.
                            let forward = self.forward(job, &o.owner, peer, o.epoch, &mut changes);
                            match Box::pin(forward).await {
                                Forwarded::Done(result) => return settle(result, sent_unanswered),
                                Forwarded::NotOwner => {
                                    self.inner.metrics.not_owner_retries.inc();
                                    reason = "owner changed";
                                    // The owner's own table is behind the routing table
                                    // (its acquisition is still being recorded) or ahead
                                    // of ours. Nothing here signals when the owner catches
                                    // up, so try again after a short, growing pause (or
                                    // sooner if our own table changes) rather than only on
                                    // a local change, which may be a keepalive seconds
                                    // away. A disagreement that outlasts a few tries is
                                    // left to table changes, as other holds are.
                                    let same = not_owner_from.as_ref()
                                        == Some(&(o.owner.clone(), o.epoch));
                                    if !same {
                                        not_owner_from = Some((o.owner.clone(), o.epoch));
                                        not_owner_tries = 0;
                                        not_owner_pause = NOT_OWNER_PAUSE_MIN;
                                    }
                                    not_owner_tries += 1;
                                    if not_owner_tries <= NOT_OWNER_FAST_TRIES {
                                        if !waited {
                                            waited = true;
                                            self.inner.metrics.held.inc();
                                        }
                                        let pause =
                                            (Instant::now() + not_owner_pause).min(job.deadline);
                                        let _ = tokio::time::timeout_at(
                                            pause.into(),
                                            changes.changed(),
                                        )
                                        .await;
                                        not_owner_pause =
                                            (not_owner_pause * 2).min(NOT_OWNER_PAUSE_MAX);
                                        continue;
                                    }
                                }
                                Forwarded::Unreachable(e) => {
                                    tracing::debug!(peer = %o.owner, error = %e, "peer unreachable");
                                    sent_unanswered |= e.may_have_run();
                                    reason = "owner unreachable";
                                }
                            }
                            // Give the routing table a moment to catch up before retrying.
                            let pause = Instant::now() + Duration::from_millis(10);
                            tokio::time::sleep_until(pause.min(job.deadline).into()).await;
                        }
                        _ => reason = "no owner",
                    }
                }
            }
            if !waited {
                waited = true;
                self.inner.metrics.held.inc();
            }
            // Hold until ownership, the routing table or the lease changes.
            let _ = tokio::time::timeout_at(job.deadline.into(), changes.changed()).await;
        }
    }

    /// Forwards a job to `owner` at `epoch`, giving up early when the routing table shows
    /// a new owner and the call was not sent yet (it waits for room on the stream), or
    /// `owner` is no longer a member (it crashed, or paused past its lease: it runs
    /// nothing more), so the call can follow the shard.
    ///
    /// While `owner` is still a member, its answer is awaited even after the shard moved:
    /// in a planned handoff it ran the call before releasing the shard, or answers "not
    /// owner" — following the shard instead would run a call that already ran a second
    /// time whenever the routing table's change arrived before the answer. Its answer
    /// also wins over a change seen in the same instant.
    async fn forward(
        &self,
        job: &Job,
        owner: &MemberId,
        peer: &leasehold_coord::PeerAddress,
        epoch: Epoch,
        changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Forwarded {
        let shard = job.shard;
        let span = tracing::debug_span!(
            "forward",
            otel.kind = "client",
            peer = %peer.address,
            %epoch,
        );
        let sent = std::sync::atomic::AtomicBool::new(false);
        let forward = tracing::Instrument::instrument(
            self.inner.peers.forward(
                peer,
                job,
                epoch,
                trace::outgoing(&span, &job.metadata),
                &sent,
            ),
            span,
        );
        tokio::pin!(forward);
        loop {
            tokio::select! {
                biased;
                result = &mut forward => return result,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Forwarded::Unreachable(PeerError::OwnerChanged(shard));
                    }
                    let view = self.inner.coord.view();
                    if view.owner(shard).map(|o| o.epoch) == Some(epoch) {
                        continue;
                    }
                    // Still waiting for room on the stream: not sent, follow the shard.
                    if !sent.load(std::sync::atomic::Ordering::Acquire) {
                        return Forwarded::Unreachable(PeerError::MovedBeforeSent(shard));
                    }
                    if !view.members.contains_key(owner) {
                        return Forwarded::Unreachable(PeerError::OwnerChanged(shard));
                    }
                }
            }
        }
    }

    /// Runs the handler for a job at this owner. `Err(Blocked)` when the shard stopped
    /// being startable while waiting for a concurrency permit.
    ///
    /// The handler call holds the shard's call guard and the key's turn until it ends:
    /// if the caller goes away mid-call, the rest of the call moves to a task (see
    /// [`Running`]), so it still counts as in flight (a handoff waits for it) and the next
    /// call for the key still waits for it, until the handler answers or its deadline.
    async fn execute(
        &self,
        job: &Job,
        turn: &Arc<Turn>,
    ) -> Result<Result<Reply, CallError>, Blocked> {
        // The ownership's ShardAcquired hook ends before its first call (bounded by
        // shard_event_timeout; the call's deadline may come first). Waited for before a
        // handler slot is taken, so a slow hook does not hold slots other shards need.
        if let LocalState::Owned(epoch) = self.inner.coord.table().state(job.shard) {
            if !self.announced(job.shard, epoch, job.deadline).await {
                return Ok(Err(hook_pending(job.shard)));
            }
        }
        let acquire = self.inner.concurrency.clone().acquire_owned();
        let permit = match tokio::time::timeout_at(job.deadline.into(), acquire).await {
            Ok(Ok(p)) => p,
            _ => {
                return Ok(Err(CallError::ResourceExhausted(format!(
                    "no handler slot free before the deadline ({} calls running, max_concurrency)",
                    self.inner.opts.max_concurrency
                ))))
            }
        };
        let coord = &self.inner.coord;
        let guard = coord.table().try_start(job.shard)?;
        // A forwarded copy runs only under the ownership its sender routed it to. Checked
        // when its turn came, not on arrival: a copy that waited here while the shard
        // moved away and back must not run after newer calls for its key ran elsewhere.
        if let Origin::Forwarded { expected } = job.origin {
            if expected != Epoch::NONE && expected != guard.epoch {
                return Ok(Err(CallError::NotOwner {
                    shard: job.shard,
                    owner: Some(coord.member_id().clone()),
                    epoch: guard.epoch,
                }));
            }
        }
        if let CallSource::Kafka(record) = &job.source {
            if let Err(e) = self.check_fence(record, guard.epoch) {
                if matches!(e, CallError::Fenced(_)) {
                    self.inner.metrics.fenced.inc();
                }
                return match e {
                    CallError::Unavailable(_) => Err(Blocked::Behind),
                    e => Ok(Err(e)),
                };
            }
        }
        let deadline = job.deadline.min(guard.valid_until);
        let epoch = guard.epoch;
        // Acquired since the check above (rare): wait here, then make sure the shard is
        // still ours — it may have been lost meanwhile.
        if self.inner.events.acquiring(job.shard, epoch).is_some() {
            if !self.announced(job.shard, epoch, deadline).await {
                return Ok(Err(hook_pending(job.shard)));
            }
            if coord.table().state(job.shard) != LocalState::Owned(epoch) {
                return Err(Blocked::NotOwned);
            }
        }
        let span = tracing::debug_span!("handler", otel.kind = "client", %epoch);
        let call = HandleCall {
            key: job.key.clone(),
            payload: job.payload.clone(),
            shard: job.shard,
            epoch,
            owner: coord.member_id().clone(),
            source: job.source.clone(),
            deadline,
            metadata: trace::outgoing(&span, &job.metadata),
        };
        let started = Instant::now();
        // `handle` may do work before returning its future; after a pause (the hook wait
        // above can end late) the deadline or the lease's validity may have passed already:
        // the caller's loop then ends the call, or waits for the lease.
        if started >= deadline {
            return Err(Blocked::LeaseInvalid);
        }
        self.inner.metrics.shard_calls.inc(job.shard.0 as usize);
        self.inner.hot.record(&job.key, job.shard);
        let handle = tracing::Instrument::instrument(caught(&*self.inner.handler, call), span);
        let running = Running {
            call: Some(Box::pin(until_deadline(deadline.into(), handle))),
            hold: Some((guard, permit, turn.clone())),
            tasks: self.inner.tasks.clone(),
        };
        let result = running.await;
        let busy = started.elapsed();
        self.inner.metrics.handler_latency.observe(busy);
        self.inner.load.record(job.shard, busy);
        Ok(match result {
            Ok(Ok(payload)) => Ok(Reply {
                payload,
                shard: job.shard,
                epoch,
                owner: coord.member_id().clone(),
            }),
            Ok(Err(e)) if e.transport() == Some(handler::Transport::Unreachable) => {
                Err(CallError::Unavailable(e.message().to_owned()))
            }
            Ok(Err(e)) if e.transport() == Some(handler::Transport::Lost) => {
                Err(CallError::HandlerLost(e.message().to_owned()))
            }
            Ok(Err(e)) => Err(CallError::Handler(e.into_status())),
            Err(_) => Err(CallError::HandlerTimeout(format!(
                "handler did not answer within its deadline of {:?}",
                deadline.saturating_duration_since(started)
            ))),
        })
    }
}

impl Router {
    /// Lets a Kafka record run here only under the latest claim of its partition, so a
    /// consumer that lost its partition (the group gave it to another member while this
    /// one was cut off) cannot run a record after the new assignee's re-reading started:
    /// per key, offsets stay in order.
    ///
    /// The latest claim is the one in the routing table (a record never runs with a
    /// fence the table does not show, so no record that ran here knew a later one). The
    /// table is required to have caught up with this
    /// instance's acquisition of the shard (`epoch`): a record of the key that ran under
    /// an earlier owner ran before that acquisition, and its consumer claimed the
    /// partition before dispatching it, so the claim is in the table by then.
    /// `Unavailable` means "not caught up yet; wait".
    fn check_fence(&self, record: &KafkaRecord, epoch: Epoch) -> Result<(), CallError> {
        if record.fence == 0 {
            return Ok(()); // a sender without claims (an older version)
        }
        let view = self.inner.coord.view();
        if (view.revision as u64) < epoch.0 {
            return Err(CallError::Unavailable(
                "routing table behind this shard's acquisition".into(),
            ));
        }
        let partition = record.partition_ref();
        let known = view.fence(&partition);
        // A fence is the etcd revision of a claim: past it, the routing table shows every
        // claim up to there. A record ahead of what the table shows waits for it; one
        // whose claim the table should show but does not was never claimed (a forged
        // fence would otherwise fence the partition's real records here).
        if record.fence > known {
            return Err(if view.revision as u64 >= record.fence {
                CallError::InvalidArgument(format!(
                    "record {}/{}@{} carries fence {} but no claim of its partition has it (latest {known})",
                    record.topic, record.partition, record.offset, record.fence
                ))
            } else {
                CallError::Unavailable("routing table behind the record's claim".into())
            });
        }
        if record.fence < known {
            return Err(CallError::Fenced(format!(
                "record {}/{}@{} was read under claim {} of its partition; claim {known} superseded it",
                record.topic, record.partition, record.offset, record.fence
            )));
        }
        Ok(())
    }
}

type HandlerResult = Result<Result<Bytes, HandleError>, TimedOut>;

/// A handler call that reached its deadline.
#[derive(Debug)]
struct TimedOut;

/// Runs a handler call until `deadline`, reading the clock before every poll. tokio's
/// `timeout_at` polls its future before its timer: after a pause longer than the time
/// left (the process stopped, the runtime stalled), a handler whose I/O became ready
/// meanwhile would take one more step — a write, say — past the lease's validity, when
/// another owner may already run the key. Here it is dropped without that step.
async fn until_deadline<F>(deadline: tokio::time::Instant, call: F) -> HandlerResult
where
    F: std::future::Future<Output = Result<Bytes, HandleError>>,
{
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer, call);
    std::future::poll_fn(|cx| {
        if tokio::time::Instant::now() >= deadline {
            return std::task::Poll::Ready(Err(TimedOut));
        }
        if let std::task::Poll::Ready(answer) = call.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(answer));
        }
        std::future::Future::poll(timer.as_mut(), cx).map(|()| Err(TimedOut))
    })
    .await
}

/// The handler's answer to `call`, with a panic (in `handle` or its future) turned into
/// the handler's error `INTERNAL`: only that call fails, whichever path it came by (a
/// Kafka record is retried, then dead-lettered), and nothing else unwinds with it.
fn caught(
    handler: &dyn Handler,
    call: HandleCall,
) -> impl std::future::Future<Output = Result<Bytes, HandleError>> {
    use futures::FutureExt;
    let panicked = || HandleError::internal("the handler panicked");
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(call)));
    async move {
        match started {
            Ok(answer) => std::panic::AssertUnwindSafe(answer)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(panicked())),
            Err(_) => Err(panicked()),
        }
    }
}

/// A handler call in progress, with what it holds: the shard's call guard, a concurrency
/// permit and the key's turn. Awaited inline (no task per call); if it is dropped before
/// it finished (the caller went away), the remainder runs to completion in a task and
/// only then releases what it holds.
struct Running {
    call: Option<futures::future::BoxFuture<'static, HandlerResult>>,
    hold: Option<(CallGuard, tokio::sync::OwnedSemaphorePermit, Arc<Turn>)>,
    tasks: TaskTracker,
}

impl std::future::Future for Running {
    type Output = HandlerResult;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<HandlerResult> {
        // Out of `self` while polled: a handler that panics is dropped with the unwind,
        // and `drop` does not poll it again in a task (it would panic again, or run
        // again); what it holds is released.
        let mut call = self.call.take().expect("polled after completion");
        match call.as_mut().poll(cx) {
            std::task::Poll::Pending => {
                self.call = Some(call);
                std::task::Poll::Pending
            }
            std::task::Poll::Ready(result) => {
                self.hold = None;
                std::task::Poll::Ready(result)
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let (Some(call), hold) = (self.call.take(), self.hold.take()) {
            self.tasks.spawn(async move {
                let _ = call.await;
                drop(hold);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_types::StatusExt;

    use leasehold_coord::{LeaseClock, ShardTable};

    use super::*;

    #[tokio::test]
    async fn a_handler_past_its_deadline_is_not_polled_again() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // As after a pause: the deadline passed while the handler's next step was ready.
        // (`tokio::time::timeout_at` would poll it once more and let it write.)
        let wrote = Arc::new(AtomicBool::new(false));
        let step = {
            let wrote = wrote.clone();
            async move {
                wrote.store(true, Ordering::SeqCst);
                Ok(Bytes::from_static(b"written"))
            }
        };
        let past = tokio::time::Instant::now() - Duration::from_millis(1);
        assert!(matches!(until_deadline(past, step).await, Err(TimedOut)));
        assert!(
            !wrote.load(Ordering::SeqCst),
            "the handler took a step past its deadline"
        );
        // Before the deadline it runs, and a slow one is cut off at it.
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        let answer = until_deadline(soon, async { Ok(Bytes::from_static(b"ok")) }).await;
        assert_eq!(answer.unwrap().unwrap(), Bytes::from_static(b"ok"));
        let near = tokio::time::Instant::now() + Duration::from_millis(20);
        let slow = until_deadline(near, std::future::pending()).await;
        assert!(matches!(slow, Err(TimedOut)));
    }

    #[test]
    fn errors_carry_their_code_a_reason_and_whether_to_retry() {
        let cases = [
            (
                CallError::InvalidArgument("k".into()),
                Code::InvalidArgument,
                "INVALID_CALL",
                false,
            ),
            (
                CallError::ResourceExhausted("m".into()),
                Code::ResourceExhausted,
                "OVERLOADED",
                true,
            ),
            (
                CallError::Unavailable("o".into()),
                Code::Unavailable,
                "NO_OWNER_AVAILABLE",
                true,
            ),
            (
                CallError::HandlerTimeout("t".into()),
                Code::DeadlineExceeded,
                "HANDLER_TIMEOUT",
                false,
            ),
            (
                CallError::DeadlineExceeded("d".into()),
                Code::DeadlineExceeded,
                "DEADLINE_BEFORE_HANDLER",
                true,
            ),
            (
                CallError::OutcomeUnknown("u".into()),
                Code::DeadlineExceeded,
                "OUTCOME_UNKNOWN",
                false,
            ),
            (
                CallError::NotOwner {
                    shard: ShardId(3),
                    owner: Some(MemberId::new("b")),
                    epoch: Epoch(9),
                },
                Code::FailedPrecondition,
                "NOT_OWNER",
                true,
            ),
        ];
        for (error, code, reason, retryable) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, ERROR_DOMAIN)
            );
            assert_eq!(info.metadata["retryable"], retryable.to_string());
            if reason == "NOT_OWNER" {
                assert_eq!(
                    (
                        info.metadata["shard"].as_str(),
                        info.metadata["owner"].as_str()
                    ),
                    ("3", "b")
                );
            }
        }
        // The handler's own status reaches the client unchanged.
        let own = Status::already_exists("dup");
        let status = Status::from(CallError::Handler(own));
        assert_eq!(
            (status.code(), status.message()),
            (Code::AlreadyExists, "dup")
        );
        assert!(status.get_details_error_info().is_none());
    }

    #[test]
    fn after_an_unanswered_attempt_no_error_says_the_call_did_not_run() {
        let retryable = || Err(CallError::Unavailable("no owner".into()));
        assert!(matches!(
            settle(retryable(), false),
            Err(CallError::Unavailable(_))
        ));
        assert!(matches!(
            settle(retryable(), true),
            Err(CallError::OutcomeUnknown(_))
        ));
        // The handler's own answer stands.
        let relayed = Status::from(CallError::Unavailable("no owner".into()));
        let passed = Status::from(CallError::Handler(relayed));
        assert_eq!(passed.code(), Code::Unavailable);
        assert!(
            tonic_types::StatusExt::get_details_error_info(&passed).is_none(),
            "a relayed Leasehold ErrorInfo does not reach the client"
        );
        let own = Err(CallError::Handler(Status::not_found("x")));
        assert!(matches!(settle(own, true), Err(CallError::Handler(_))));
        // Only failures before the request left count as "not sent".
        assert!(peers::never_sent(&Status::unavailable("tcp connect error")));
        assert!(peers::never_sent(&Status::unavailable(
            "h2 protocol error: refused stream before processing any application logic"
        )));
        assert!(!peers::never_sent(&Status::unavailable(
            "error reading a body: connection reset by peer"
        )));
    }

    type Hold = (CallGuard, tokio::sync::OwnedSemaphorePermit, Arc<Turn>);

    /// Shard 1 owned here, and what a call on key "k" holds while it runs: the shard's
    /// call guard, a concurrency permit and the key's turn.
    async fn a_running_calls_hold() -> (Arc<ShardTable>, Arc<Mailboxes>, Hold) {
        let lease = Arc::new(LeaseClock::default());
        lease.set_valid_until(Instant::now() + Duration::from_secs(60));
        let table = Arc::new(ShardTable::new(4, lease));
        assert!(table.set_owned(0, ShardId(1), Epoch(5)));
        let boxes = Arc::new(Mailboxes::new(8));
        let turn = Arc::new(boxes.enter("k").unwrap().turn().await);
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let guard = table.try_start(ShardId(1)).unwrap();
        (table, boxes, (guard, permit, turn))
    }

    #[tokio::test]
    async fn a_call_whose_caller_left_keeps_its_shard_and_key_until_the_handler_ends() {
        let (table, boxes, hold) = a_running_calls_hold().await;
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let handler = async move {
            let _ = finished.await;
            Ok::<_, HandleError>(Bytes::new())
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let running = Running {
            call: Some(Box::pin(until_deadline(deadline, handler))),
            hold: Some(hold),
            tasks: TaskTracker::new(),
        };
        // The caller gives up while the handler still runs.
        assert!(tokio::time::timeout(Duration::from_millis(20), running)
            .await
            .is_err());
        assert_eq!(
            table.in_flight(ShardId(1)),
            1,
            "a handoff must still wait for the call"
        );
        let next = boxes.enter("k").unwrap();
        let next_turn = tokio::spawn(next.turn());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !next_turn.is_finished(),
            "the next call for the key must still wait"
        );
        finish.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), table.wait_idle(ShardId(1)))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), next_turn)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_handler_that_panics_fails_only_its_call_with_internal() {
        /// Panics in `handle` itself for key "now", in its future for any other key.
        struct Panics;
        impl Handler for Panics {
            fn handle(
                &self,
                call: HandleCall,
            ) -> futures::future::BoxFuture<'static, Result<Bytes, HandleError>> {
                assert_ne!(call.key, "now", "the handler fails hard");
                Box::pin(async move { panic!("the handler fails hard on {}", call.key) })
            }
        }
        for key in ["now", "later"] {
            let call = HandleCall {
                key: key.into(),
                payload: Bytes::new(),
                shard: ShardId(1),
                epoch: Epoch(5),
                owner: MemberId("n0".into()),
                source: CallSource::Grpc {
                    entry: MemberId("n0".into()),
                },
                deadline: Instant::now() + Duration::from_secs(5),
                metadata: Default::default(),
            };
            let error = caught(&Panics, call).await.unwrap_err();
            assert_eq!(error.code(), ErrorCode::Internal, "{key}");
            assert_eq!(error.message(), "the handler panicked", "{key}");
        }
    }

    #[tokio::test]
    async fn a_handler_that_panics_releases_its_shard_and_key_and_is_not_polled_again() {
        use futures::FutureExt;
        let (table, boxes, hold) = a_running_calls_hold().await;
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = polls.clone();
        let handler = futures::future::poll_fn(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            panic!("the handler fails hard")
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let handler: futures::future::BoxFuture<'static, Result<Bytes, HandleError>> =
            Box::pin(handler);
        let tasks = TaskTracker::new();
        let running = Running {
            call: Some(Box::pin(until_deadline(deadline, handler))),
            hold: Some(hold),
            tasks: tasks.clone(),
        };
        let caught = std::panic::AssertUnwindSafe(running).catch_unwind().await;
        assert!(caught.is_err(), "the panic reaches the caller");
        assert_eq!(tasks.len(), 0, "nothing polls the panicked handler again");
        assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(table.in_flight(ShardId(1)), 0, "the shard's call ended");
        tokio::time::timeout(Duration::from_secs(5), boxes.enter("k").unwrap().turn())
            .await
            .expect("the key's next call gets its turn");
    }
}
