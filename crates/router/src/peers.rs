//! Pooled HTTP/2 channels to peers, and the forwarding hop: long-lived Dispatch streams
//! per peer (one for gRPC calls, one for Kafka records), unary Forwards where a stream
//! cannot be used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use leasehold_coord::PeerAddress;
use leasehold_proto::v1::{self as pb, forward_response, peer_client::PeerClient};
use leasehold_types::{Epoch, MemberId, ShardId};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::{CallError, CallSource, Job, Reply};

/// Metadata key set on every status the Peer service returns, so the sender can tell
/// the receiver's answer from a transport failure.
pub(crate) const ORIGIN_HEADER: &str = "leasehold-origin";
/// How long past a call's deadline the sender waits for the owner's answer.
const ANSWER_GRACE: Duration = Duration::from_secs(1);

/// Metadata key carrying [`CallError::kind`] on such a status.
pub(crate) const KIND_HEADER: &str = "leasehold-error-kind";

pub(crate) enum Forwarded {
    /// The owner answered (the handler's reply or its error).
    Done(Result<Reply, CallError>),
    /// The receiver no longer owns the shard.
    NotOwner,
    /// The call may not have reached the receiver.
    Unreachable(PeerError),
}

/// Why a forwarded call got no answer from its owner (it may not have reached it).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("invalid peer address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("dispatch stream to {peer} {reason}")]
    Stream { peer: String, reason: String },
    #[error("no answer from the owner before the deadline")]
    NoAnswer,
    #[error("owner of shard {0} changed during the forward")]
    OwnerChanged(ShardId),
    #[error("empty answer from the owner")]
    EmptyAnswer,
    #[error("{0}")]
    Transport(String),
    /// Certainly not delivered.
    #[error("dispatch stream to {0} closed before the call was sent")]
    NotSent(String),
    /// Given up before it was sent (still waiting for room on the stream): the shard moved.
    #[error("owner of shard {0} changed before the call was sent")]
    MovedBeforeSent(ShardId),
}

impl PeerError {
    /// Whether the owner may have received (and run) the call.
    pub(crate) fn may_have_run(&self) -> bool {
        !matches!(
            self,
            PeerError::Address { .. } | PeerError::NotSent(_) | PeerError::MovedBeforeSent(_)
        )
    }
}

/// Metadata key naming the sending member on every peer call; with peer TLS, the
/// receiver checks that the connection's certificate carries that member's identity.
pub(crate) const MEMBER_HEADER: &str = "leasehold-member";

/// Set on a Dispatch stream's answer headers by receivers that take gRPC calls on it:
/// they honour cancel messages and admit calls in stream order. Receivers of earlier
/// versions get gRPC calls as unary Forwards.
pub(crate) const STREAM_CALLS_HEADER: &str = "leasehold-stream-calls";

/// What a Dispatch stream carries. Each peer gets one stream per lane, so a Kafka backlog
/// never queues interactive calls behind it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Lane {
    Calls,
    Records,
}

pub(crate) struct Peers {
    channels: RwLock<HashMap<String, PeerClient<Channel>>>,
    /// This instance, named on every call.
    member: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    tls: Option<Arc<leasehold_tls::Reloading<rustls::ClientConfig>>>,
    /// Long-lived Dispatch streams, one per peer and lane.
    streams: Mutex<HashMap<(String, Lane), Arc<PeerStream>>>,
    /// Peers that refused this member's peer-frames greeting, and when: for a second
    /// their streams go over HTTP/2, whose refusal costs no new connection.
    frames_refused: Arc<Mutex<HashMap<String, Instant>>>,
    /// Streams opened over peer frames and over HTTP/2.
    opened: [Arc<leasehold_metrics::Counter>; 2],
    /// Set by [`Peers::close`]: later calls use unary Forwards (a stream opened then
    /// would never be ended).
    closing: AtomicBool,
    max_message: usize,
    /// Calls one stream may have unanswered: the receiver's `max_dispatch_in_flight`.
    window: usize,
    tasks: tokio_util::task::TaskTracker,
}

type Answer = Result<pb::DispatchResponse, PeerError>;

/// A request queued on a Dispatch stream, with the call's deadline: its `timeout_ms` is
/// set when it is written, so time spent queued here is not given to the owner again.
type Outgoing = (pb::DispatchRequest, Option<Instant>);

/// How long a cancel may wait for room on a full stream.
const CANCEL_SEND: Duration = Duration::from_secs(5);

/// A Dispatch stream to one peer: requests go out on `tx`, answers are matched to
/// `pending` by id. When the stream breaks, every pending call is answered
/// "unreachable" and the next call opens a new stream.
struct PeerStream {
    /// Taken at shutdown: the outgoing stream then ends, and the reader with it once the
    /// owner answered what it holds.
    tx: Mutex<Option<mpsc::Sender<Outgoing>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// Calls sent and neither answered nor cancelled stay within the receiver's in-flight
    /// limit, so the receiver reads every call as soon as it arrives: a call never waits
    /// unread on the stream (where its deadline, counted from when it is read, would
    /// stretch), and a cancel never waits behind calls. None until the stream is open
    /// (then as many as the receiver takes); closed when the stream fails, so calls
    /// waiting for one are "not sent" at once.
    credits: Arc<tokio::sync::Semaphore>,
    /// Credits of calls abandoned while the stream's queue was full, by id, until their
    /// cancel is queued or, if it never is, until the receiver answers the call (it
    /// frees the call's slot then); without this a full queue would shrink the stream's
    /// window for good.
    orphans: Arc<Mutex<HashMap<u64, tokio::sync::OwnedSemaphorePermit>>>,
    /// The receiver said it takes gRPC calls (see [`STREAM_CALLS_HEADER`]).
    takes_calls: AtomicBool,
    /// For a stream over HTTP/2: when to replace it by one that tries peer frames again
    /// (see [`Transport::Http2`]); set once the transport is known.
    replace_at: OnceLock<Instant>,
    /// The largest request frame the receiver reads, as it said in its answer to the
    /// greeting (`usize::MAX` until then, and when it did not say).
    max_request: AtomicUsize,
}

/// Transport failures that mean the request never reached the peer: the connection could
/// not be made, it closed before the request was written, or the peer refused the stream
/// before reading it (HTTP/2 REFUSED_STREAM, after a GOAWAY).
pub(crate) fn never_sent(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    let mut text = s.message().to_ascii_lowercase();
    let mut source = s.source();
    while let Some(e) = source {
        // hyper hands back a request it never wrote when the connection closes first
        // ("canceled"): not sent.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        text.push(' ');
        text.push_str(&e.to_string().to_ascii_lowercase());
        source = e.source();
    }
    [
        "tcp connect error",
        "error trying to connect",
        "connection refused",
        "refused stream",
    ]
    .iter()
    .any(|p| text.contains(p))
}

fn stream_error(peer: &str, reason: impl Into<String>) -> PeerError {
    PeerError::Stream {
        peer: peer.to_owned(),
        reason: reason.into(),
    }
}

/// One call's place on a stream, from its registration to its answer. Dropped before the
/// answer came (the caller left, the owner changed, no answer in time), it cancels the
/// call if it was sent: the owner drops it unless its handler started.
struct StreamUse<'a> {
    stream: &'a PeerStream,
    id: u64,
    queued: bool,
    /// Released once the call is answered or its cancel is queued (the receiver frees
    /// the call's slot when it reads the cancel, which comes before any later call).
    credit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for StreamUse<'_> {
    fn drop(&mut self) {
        {
            let mut pending = self.stream.pending.lock().expect("pending lock");
            // Answered (or the stream failed, which answers every pending call): nothing
            // to cancel.
            let abandoned = pending.remove(&self.id).is_some();
            if !(abandoned && self.queued) {
                return;
            }
            // Until its cancel is queued the receiver may run the call and hold its slot:
            // the credit waits with the call's id, for the cancel to be queued or the
            // call's answer to arrive. Put there under the pending lock, so an answer
            // that arrives meanwhile finds it.
            if let Some(credit) = self.credit.take() {
                self.stream.orphan(self.id, credit);
            }
        }
        let id = self.id;
        let release = move |orphans: &Mutex<HashMap<u64, _>>| {
            orphans.lock().expect("orphans lock").remove(&id);
        };
        // Without `tx` the stream is closing: the owner answers what it holds.
        let Some(tx) = self.stream.tx.lock().expect("tx lock").clone() else {
            return;
        };
        let cancel = pb::DispatchRequest {
            id,
            cancel: true,
            ..Default::default()
        };
        // Behind the call on the same stream, so the owner reads it after the call (and
        // frees the call's slot when it reads it).
        match tx.try_send((cancel, None)) {
            // Closed: the writer is gone, so is the stream.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => release(&self.stream.orphans),
            Err(mpsc::error::TrySendError::Full(cancel)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let orphans = self.stream.orphans.clone();
                    rt.spawn(async move {
                        if tokio::time::timeout(CANCEL_SEND, tx.send(cancel))
                            .await
                            .is_ok()
                        {
                            release(&orphans);
                        }
                        // Never queued: the credit comes back with the call's answer.
                    });
                }
            }
        }
    }
}

/// A request as it is written: its `timeout_ms` is the time left now.
fn stamped((mut request, deadline): Outgoing) -> pb::DispatchRequest {
    if let Some(deadline) = deadline {
        // 0 when already past: the owner answers "deadline exceeded" without running it.
        request.timeout_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(u128::from(u32::MAX)) as u32;
    }
    request
}

/// Hands an answer to the call waiting for it; the answer of a call abandoned without
/// a cancel gives its credit back.
fn deliver(stream: &PeerStream, answer: pb::DispatchResponse) {
    let waiting = stream
        .pending
        .lock()
        .expect("pending lock")
        .remove(&answer.id);
    match waiting {
        Some(tx) => {
            let _ = tx.send(Ok(answer));
        }
        None => {
            stream
                .orphans
                .lock()
                .expect("orphans lock")
                .remove(&answer.id);
        }
    }
}

/// A Dispatch stream over HTTP/2 (`Peer.Dispatch`).
async fn run_grpc(
    mut client: PeerClient<Channel>,
    member: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    rx: mpsc::Receiver<Outgoing>,
    stream: &PeerStream,
    peer: &str,
) {
    use tokio_stream::StreamExt as _;
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx).map(stamped);
    let mut outgoing = tonic::Request::new(requests);
    outgoing.metadata_mut().insert(MEMBER_HEADER, member);
    match client.dispatch(outgoing).await {
        Ok(answers) => {
            if answers.metadata().get(STREAM_CALLS_HEADER).is_some() {
                stream.takes_calls.store(true, Ordering::Release);
            }
            let mut answers = answers.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(a)) => deliver(stream, a),
                    Ok(None) => break stream.fail_all(stream_error(peer, "ended")),
                    Err(e) => break stream.fail_all(stream_error(peer, format!("failed: {e}"))),
                }
            }
        }
        // The stream never opened: nothing queued on it was sent, unless the failure came
        // after the first messages left (the body goes out before the answer's headers
        // arrive), so only a connection never made or a refusal from the peer itself
        // proves it.
        Err(s) if never_sent(&s) || s.metadata().get(ORIGIN_HEADER).is_some() => {
            stream.fail_all(PeerError::NotSent(peer.to_owned()))
        }
        Err(s) => stream.fail_all(stream_error(peer, format!("did not open: {s}"))),
    }
}

/// How long a peer that refused the peer-frames greeting is reached over HTTP/2.
const REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// How long a stream goes over HTTP/2 before peer frames are tried again: after a
/// refusal of this member's greeting (a restarted member is refused until the
/// receiver's routing table knows its new certificate), and after a greeting that got
/// no answer (a receiver that takes HTTP/2 only — an earlier version — or a connection
/// that broke: the two look alike, as an HTTP/2 server writes its settings and drops the
/// connection).
const AFTER_REFUSAL: Duration = Duration::from_secs(30);
const AFTER_NO_ANSWER: Duration = Duration::from_secs(600);

/// How a Dispatch stream to a peer goes.
enum Transport {
    Frames(Accepted),
    /// Over HTTP/2, with peer frames tried again by a new stream after this long.
    Http2(Duration),
}

/// Where to open a peer-frames connection, and as whom.
struct FramesTarget {
    /// The peer's key in [`Peers::frames_refused`].
    key: String,
    refused: Arc<Mutex<HashMap<String, Instant>>>,
    address: String,
    identity: String,
    tls: Option<Arc<leasehold_tls::Reloading<rustls::ClientConfig>>>,
    member: String,
    max_message: usize,
}

/// A peer-frames connection, accepted by its receiver.
struct Accepted {
    reader: crate::frames::FrameReader<tokio::io::ReadHalf<Box<dyn crate::frames::Io>>>,
    write: tokio::io::WriteHalf<Box<dyn crate::frames::Io>>,
    /// The receiver's `max_dispatch_in_flight` (at least 1).
    max_in_flight: usize,
    /// The largest frame the receiver reads (`usize::MAX` if it did not say).
    max_frame: usize,
}

impl FramesTarget {
    /// Connects (with the peer TLS config, checking the identity the member registered)
    /// and names this member. Nothing but the greeting has been sent when this returns
    /// an error, so every error is "not sent".
    async fn open(&self) -> Result<Transport, PeerError> {
        use crate::frames;
        use tokio::io::AsyncWriteExt as _;
        let not_sent = |why: String| {
            tracing::debug!(peer = %self.address, "peer-frames connection not made: {why}");
            PeerError::NotSent(self.address.clone())
        };
        {
            let mut refused = self.refused.lock().expect("refused lock");
            refused.retain(|_, at| at.elapsed() < REFUSAL_HOLD);
            if refused.contains_key(&self.key) {
                return Ok(Transport::Http2(AFTER_REFUSAL));
            }
        }
        let (host, port) = self
            .address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| PeerError::Address {
                address: self.address.clone(),
                reason: "expected host:port".into(),
            })?;
        let io: Box<dyn frames::Io> = match &self.tls {
            None => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let connect = tokio::net::TcpStream::connect((host, port));
                let tcp = tokio::time::timeout(Duration::from_secs(1), connect)
                    .await
                    .map_err(|_| not_sent("not connected within 1s".into()))?
                    .map_err(|e| not_sent(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            Some(tls) => {
                let identity = Some(self.identity.clone()).filter(|i| !i.is_empty());
                let connector = leasehold_tls::Connector::new(tls.clone(), identity);
                Box::new(
                    connector
                        .connect(host, port)
                        .await
                        .map_err(|e| not_sent(e.to_string()))?,
                )
            }
        };
        let (read, mut write) = tokio::io::split(io);
        let mut greeting = bytes::BytesMut::from(frames::MAGIC);
        frames::put_bytes(&mut greeting, self.member.as_bytes());
        // Then the largest answer this side reads, before any call (a receiver of an
        // earlier version takes it for a ping).
        let limit = pb::DispatchRequest {
            max_frame: u32::try_from(self.max_message).unwrap_or(u32::MAX),
            ..Default::default()
        };
        frames::put(&mut greeting, &limit);
        write
            .write_all(&greeting)
            .await
            .map_err(|e| not_sent(e.to_string()))?;
        write.flush().await.map_err(|e| not_sent(e.to_string()))?;
        // The answer to the greeting is small.
        let mut reader = frames::FrameReader::new(read, 64 * 1024);
        match reader.next::<pb::DispatchResponse>().await {
            Ok(Some(pb::DispatchResponse {
                id: 0,
                error: None,
                max_in_flight: max_in_flight @ 1..,
                max_frame,
                ..
            })) => {
                reader.set_max(self.max_message);
                Ok(Transport::Frames(Accepted {
                    reader,
                    write,
                    max_in_flight: max_in_flight as usize,
                    max_frame: match max_frame {
                        0 => usize::MAX,
                        n => n as usize,
                    },
                }))
            }
            Ok(Some(pb::DispatchResponse { error: Some(e), .. })) => {
                tracing::warn!(peer = %self.address, code = e.code, reason = %e.message, "peer refused this member's calls");
                self.refused
                    .lock()
                    .expect("refused lock")
                    .insert(self.key.clone(), Instant::now());
                Err(PeerError::NotSent(self.address.clone()))
            }
            Ok(Some(_)) => Err(not_sent("unexpected first answer".into())),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Err(not_sent(format!("no answer to the greeting: {e}")))
            }
            // Closed without an answer, or what came is no answer (an HTTP/2 server's
            // settings, a reset): a receiver that takes HTTP/2 only, or a broken
            // connection.
            Ok(None) | Err(_) => Ok(Transport::Http2(AFTER_NO_ANSWER)),
        }
    }
}

/// A Dispatch stream over a peer-frames connection: requests are written by a task of
/// their own (with a ping every second), answers read here until the connection ends,
/// breaks or falls silent.
async fn run_frames(
    Accepted {
        mut reader, write, ..
    }: Accepted,
    rx: mpsc::Receiver<Outgoing>,
    stream: &PeerStream,
    peer: &str,
) {
    use crate::frames;
    let ping = pb::DispatchRequest::default();
    let end = pb::DispatchRequest {
        cancel: true,
        ..Default::default()
    };
    let writer = tokio::spawn(frames::write_frames(
        write,
        rx,
        |o| Some(stamped(o)),
        Some(ping),
        Some(end),
    ));
    let why = loop {
        match reader.next::<pb::DispatchResponse>().await {
            // The receiver's ping.
            Ok(Some(a)) if a.id == 0 && a.error.is_none() => {}
            Ok(Some(a)) if a.id == 0 => {
                break stream_error(peer, format!("refused: {:?}", a.error.map(|e| e.message)))
            }
            Ok(Some(a)) => deliver(stream, a),
            Ok(None) => break stream_error(peer, "ended"),
            Err(e) => break stream_error(peer, format!("failed: {e}")),
        }
    };
    stream.fail_all(why);
    // Dropping both halves closes the connection; without the clean end the receiver
    // drops the calls it has not started.
    writer.abort();
}

impl PeerStream {
    fn new(tx: mpsc::Sender<Outgoing>) -> Self {
        Self {
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            credits: Arc::new(tokio::sync::Semaphore::new(0)),
            orphans: Arc::default(),
            takes_calls: AtomicBool::new(false),
            replace_at: OnceLock::new(),
            max_request: AtomicUsize::new(usize::MAX),
        }
    }

    /// Keeps the credit of a call abandoned before its cancel could be queued (see
    /// `orphans`).
    fn orphan(&self, id: u64, credit: tokio::sync::OwnedSemaphorePermit) {
        if !self.closed.load(Ordering::Acquire) {
            self.orphans
                .lock()
                .expect("orphans lock")
                .insert(id, credit);
        }
    }

    /// Ends the stream cleanly: no call is queued on it any more (one waiting for a credit
    /// or room is "not sent" at once), the owner answers what it holds, and the reader
    /// ends after the last answer.
    fn end(&self) {
        self.tx.lock().expect("tx lock").take();
        self.credits.close();
    }

    fn fail_all(&self, why: PeerError) {
        self.closed.store(true, Ordering::Release);
        self.credits.close();
        self.orphans.lock().expect("orphans lock").clear();
        for (_, tx) in self.pending.lock().expect("pending lock").drain() {
            let _ = tx.send(Err(why.clone()));
        }
    }
}

impl Peers {
    pub(crate) fn new(
        max_message: usize,
        window: usize,
        tasks: tokio_util::task::TaskTracker,
        member: MemberId,
        tls: Option<Arc<leasehold_tls::Reloading<rustls::ClientConfig>>>,
        opened: [Arc<leasehold_metrics::Counter>; 2],
    ) -> Self {
        Self {
            channels: RwLock::new(HashMap::new()),
            // Member ids are validated ([A-Za-z0-9._-]), so always a valid header value.
            member: member.0.parse().expect("member ids are valid metadata"),
            tls,
            streams: Mutex::new(HashMap::new()),
            frames_refused: Default::default(),
            opened,
            closing: AtomicBool::new(false),
            max_message,
            window: window.max(1),
            tasks,
        }
    }

    /// Channels and streams are kept per address *and* identity: a member that comes back
    /// at the same address with another certificate gets a new connection checked for
    /// its new identity.
    pub(crate) fn cache_key(peer: &PeerAddress) -> String {
        if peer.identity.is_empty() {
            peer.address.clone()
        } else {
            format!("{}#{}", peer.address, peer.identity)
        }
    }

    fn client(&self, peer: &PeerAddress) -> Result<PeerClient<Channel>, PeerError> {
        let address = peer.address.as_str();
        let key = Self::cache_key(peer);
        if let Some(c) = self.channels.read().expect("peers lock").get(&key) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| PeerError::Address {
                address: address.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // Notice a peer that stopped answering within ~3 s: pending calls fail over
            // and the next one opens a new connection.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        // With TLS the peer must prove the identity it registered (or, for a member
        // without one, the host it is reached at).
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(leasehold_tls::Connector::new(
                tls.clone(),
                Some(peer.identity.clone()).filter(|i| !i.is_empty()),
            )),
            None => endpoint.connect_lazy(),
        };
        let client = PeerClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        self.channels
            .write()
            .expect("peers lock")
            .insert(key, client.clone());
        Ok(client)
    }

    /// Forgets the connections and streams of peers not in `live` (cache keys of the
    /// members and shard owners the routing table knows) and streams that broke: each
    /// peer address ever reached would otherwise keep its channel (with its task) and
    /// stream for the life of this instance, and pod addresses change with every
    /// restart. A stream still open to a peer that left ends cleanly (its calls are
    /// answered; one about to be queued is "not sent" and routed again). A stream over
    /// HTTP/2 ends the same way once due (see [`Transport::Http2`]), so the next call
    /// tries peer frames again. Returns the peers forgotten because they left (sorted),
    /// and how many broken streams to peers still named were dropped.
    pub(crate) fn retain(&self, live: &std::collections::HashSet<String>) -> (Vec<String>, usize) {
        let now = Instant::now();
        let mut departed = std::collections::BTreeSet::new();
        self.channels.write().expect("peers lock").retain(|key, _| {
            let keep = live.contains(key);
            if !keep {
                departed.insert(key.clone());
            }
            keep
        });
        let (mut ended, mut broken) = (Vec::new(), 0);
        self.streams
            .lock()
            .expect("streams lock")
            .retain(|(key, _), stream| {
                if !live.contains(key) {
                    departed.insert(key.clone());
                } else if stream.closed.load(Ordering::Acquire) {
                    broken += 1;
                } else if stream.replace_at.get().is_none_or(|at| *at > now) {
                    return true;
                }
                ended.push(stream.clone());
                false
            });
        for stream in ended {
            stream.end();
        }
        (departed.into_iter().collect(), broken)
    }

    /// Ends every Dispatch stream (their readers finish once the owners answered what
    /// they hold).
    pub(crate) fn close(&self) {
        let mut streams = self.streams.lock().expect("streams lock");
        self.closing.store(true, Ordering::Release);
        for (_, stream) in streams.drain() {
            stream.end();
        }
    }

    /// The peer's Dispatch stream for `lane`, opened on first use or after it broke.
    fn stream(&self, peer: &PeerAddress, lane: Lane) -> Result<Arc<PeerStream>, PeerError> {
        let address = peer.address.as_str();
        let key = (Self::cache_key(peer), lane);
        let mut streams = self.streams.lock().expect("streams lock");
        if self.closing.load(Ordering::Acquire) {
            return Err(PeerError::NotSent(address.to_owned()));
        }
        if let Some(s) = streams
            .get(&key)
            .filter(|s| !s.closed.load(Ordering::Acquire))
        {
            return Ok(s.clone());
        }
        let client = self.client(peer)?;
        let member = self.member.clone();
        let (tx, rx) = mpsc::channel(4096);
        let stream = Arc::new(PeerStream::new(tx));
        let reader = stream.clone();
        let window = self.window;
        let [frames_opened, grpc_opened] = self.opened.clone();
        let target = FramesTarget {
            key: key.0.clone(),
            refused: self.frames_refused.clone(),
            address: address.to_owned(),
            identity: peer.identity.clone(),
            tls: self.tls.clone(),
            member: self.member.to_str().unwrap_or_default().to_owned(),
            max_message: self.max_message,
        };
        self.tasks.spawn(async move {
            // Peer frames first; over HTTP/2 to a receiver that does not take them.
            match target.open().await {
                Ok(Transport::Frames(conn)) => {
                    // Within the receiver's limit if it is lower than ours, so it always
                    // reads what arrives (see `PeerStream::credits`).
                    frames_opened.inc();
                    // Set before the credits: no call is checked against the default.
                    reader.max_request.store(conn.max_frame, Ordering::Release);
                    reader.credits.add_permits(conn.max_in_flight.min(window));
                    reader.takes_calls.store(true, Ordering::Release);
                    run_frames(conn, rx, &reader, &target.address).await;
                }
                Ok(Transport::Http2(frames_again)) => {
                    grpc_opened.inc();
                    let _ = reader.replace_at.set(Instant::now() + frames_again);
                    reader.credits.add_permits(window);
                    run_grpc(client, member, rx, &reader, &target.address).await
                }
                Err(e) => reader.fail_all(e),
            }
        });
        streams.insert(key, stream.clone());
        Ok(stream)
    }

    /// Sends a forwarded call over a Dispatch stream to the peer at `address`.
    async fn dispatch(
        &self,
        stream: &PeerStream,
        address: &str,
        request: pb::ForwardRequest,
        job: &Job,
        left: &AtomicBool,
    ) -> Forwarded {
        let not_sent = || Forwarded::Unreachable(PeerError::NotSent(address.to_owned()));
        // Within the receiver's in-flight limit (see `PeerStream::credits`).
        let credit =
            tokio::time::timeout_at(job.deadline.into(), stream.credits.clone().acquire_owned());
        let Ok(Ok(credit)) = credit.await else {
            return not_sent();
        };
        // A frame over the receiver's limit would break the connection (and every call
        // on it), again at each retry: refused here as the owner would refuse a payload
        // over its max_payload. The envelope's other fields take at most 32 bytes.
        let max = stream.max_request.load(Ordering::Acquire);
        let size = prost::Message::encoded_len(&request);
        if size + 32 > max {
            let why = if max < self.max_message {
                "that instance's max_payload is lower than this one's (give every instance the same max_payload)"
            } else {
                "its key and forwarded metadata leave too little room beside the payload"
            };
            return Forwarded::Done(Err(CallError::InvalidArgument(format!(
                "the call is {size} bytes as forwarded, over the {max} bytes its key's owner (peer {address}) reads: {why}"
            ))));
        }
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        stream.pending.lock().expect("pending lock").insert(id, tx);
        let mut used = StreamUse {
            stream,
            id,
            queued: false,
            credit: Some(credit),
        };
        let request = pb::DispatchRequest {
            id,
            call: Some(request),
            ..Default::default()
        };
        let tx = stream.tx.lock().expect("tx lock").clone();
        // Bounded by the call's deadline: a peer that stops reading fills the queue. A
        // slot is reserved first, so the waiting future does not hold the request.
        let sent = match tx {
            Some(tx) => tokio::time::timeout_at(job.deadline.into(), tx.reserve())
                .await
                .map(|permit| match permit {
                    Ok(permit) => {
                        permit.send((request, Some(job.deadline)));
                        true
                    }
                    Err(_) => false,
                }),
            // Closed at shutdown: the calls already on it are still answered.
            None => return not_sent(),
        };
        match sent {
            // Still queued nowhere: not sent, and the stream itself is fine.
            Err(_) => return not_sent(),
            // The writer is gone: the stream broke.
            Ok(false) => {
                stream.fail_all(stream_error(address, "closed"));
                return not_sent();
            }
            Ok(true) => {
                used.queued = true;
                left.store(true, Ordering::Release);
            }
        }
        // Closed before our call was registered: nobody will answer it.
        if stream.closed.load(Ordering::Acquire)
            && stream
                .pending
                .lock()
                .expect("pending lock")
                .remove(&id)
                .is_some()
        {
            return Forwarded::Unreachable(stream_error(address, "closed"));
        }
        // The owner's own deadline starts one hop later: wait a little past ours so a
        // handler that timed out there is reported as such, not as a lost answer.
        let answer = match tokio::time::timeout_at((job.deadline + ANSWER_GRACE).into(), rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => Err(stream_error(address, "dropped the call")),
            Err(_) => Err(PeerError::NoAnswer),
        };
        drop(used);
        match answer {
            Err(e) => Forwarded::Unreachable(e),
            Ok(a) => match (a.answer, a.error) {
                (_, Some(e)) => {
                    let mut metadata = tonic::metadata::MetadataMap::new();
                    crate::trace::CallMetadata(e.metadata.into_iter().collect())
                        .to_grpc(&mut metadata);
                    let status = tonic::Status::with_details_and_metadata(
                        tonic::Code::from(e.code),
                        e.message,
                        e.details,
                        metadata,
                    );
                    Forwarded::Done(Err(CallError::from_remote(status, &e.kind)))
                }
                (Some(answer), None) => Self::answer(answer, job),
                (None, None) => Forwarded::Unreachable(PeerError::EmptyAnswer),
            },
        }
    }

    fn answer(answer: pb::ForwardResponse, job: &Job) -> Forwarded {
        match answer.result {
            Some(forward_response::Result::Ok(r)) => Forwarded::Done(Ok(Reply {
                payload: r.payload,
                shard: job.shard,
                epoch: Epoch(r.epoch),
                owner: MemberId(r.owner),
            })),
            Some(forward_response::Result::NotOwner(_)) => Forwarded::NotOwner,
            None => Forwarded::Unreachable(PeerError::EmptyAnswer),
        }
    }

    /// Forwards a call to the owner at `peer`; `sent` is set once the call may have left
    /// this instance (queued on a stream, or its unary RPC started).
    pub(crate) async fn forward(
        &self,
        peer: &PeerAddress,
        job: &Job,
        expected: Epoch,
        metadata: crate::trace::CallMetadata,
        sent: &AtomicBool,
    ) -> Forwarded {
        let (entry, source) = match &job.source {
            CallSource::Grpc { entry } => (entry.0.clone(), None),
            CallSource::Kafka(record) => (
                String::new(),
                Some(pb::Source {
                    kind: Some(pb::source::Kind::Kafka(record.clone().into())),
                }),
            ),
        };
        let call = pb::ForwardRequest {
            key: job.key.clone(),
            payload: job.payload.clone(),
            shard: job.shard.0,
            expected_epoch: expected.0,
            entry,
            source,
            metadata: metadata.0.into_iter().collect(),
        };
        // A stream per peer and lane instead of one RPC per call (see ARCHITECTURE.md,
        // "Forwarded calls share Dispatch streams").
        let lane = match job.source {
            CallSource::Grpc { .. } => Lane::Calls,
            CallSource::Kafka(_) => Lane::Records,
        };
        match self.stream(peer, lane) {
            Ok(s) if lane == Lane::Records || s.takes_calls.load(Ordering::Acquire) => {
                self.dispatch(&s, &peer.address, call, job, sent).await
            }
            // gRPC calls to a receiver that has not said it takes them on a stream (an
            // earlier version, or a stream whose answer headers have not come yet), and
            // every call once this instance closed its streams at shutdown.
            // Boxed: a unary call's future is three times the size of the stream path's,
            // and every forward would otherwise carry it (see ARCHITECTURE.md, "Per-call
            // future size").
            Ok(_) | Err(PeerError::NotSent(_)) => {
                sent.store(true, Ordering::Release);
                Box::pin(self.unary(peer, call, job)).await
            }
            Err(e) => Forwarded::Unreachable(e),
        }
    }

    /// Sends a forwarded call as its own `Peer.Forward` RPC.
    async fn unary(&self, peer: &PeerAddress, call: pb::ForwardRequest, job: &Job) -> Forwarded {
        let mut client = match self.client(peer) {
            Ok(c) => c,
            Err(e) => return Forwarded::Unreachable(e),
        };
        let mut request = tonic::Request::new(call);
        request
            .metadata_mut()
            .insert(MEMBER_HEADER, self.member.clone());
        request.set_timeout(job.deadline.saturating_duration_since(Instant::now()));
        match client.forward(request).await {
            Ok(resp) => Self::answer(resp.into_inner(), job),
            Err(s) if s.metadata().get(ORIGIN_HEADER).is_some() => {
                let kind = s
                    .metadata()
                    .get(KIND_HEADER)
                    .and_then(|k| k.to_str().ok())
                    .unwrap_or("handler")
                    .to_owned();
                Forwarded::Done(Err(CallError::from_remote(s, &kind)))
            }
            Err(s) if never_sent(&s) => {
                Forwarded::Unreachable(PeerError::NotSent(peer.address.clone()))
            }
            Err(s) => Forwarded::Unreachable(PeerError::Transport(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn target(address: std::net::SocketAddr) -> FramesTarget {
        FramesTarget {
            key: address.to_string(),
            refused: Default::default(),
            address: address.to_string(),
            identity: String::new(),
            tls: None,
            member: "m1".into(),
            max_message: 1 << 20,
        }
    }

    /// Reads the greeting a sender writes: the magic, then its member id in a frame, then
    /// a request of id 0 with the largest frame it reads.
    async fn greeting(conn: &mut tokio::net::TcpStream) -> String {
        let mut magic = [0; 24];
        conn.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic[..], crate::frames::MAGIC);
        let mut frames = Vec::new();
        for _ in 0..2 {
            let len = conn.read_u32().await.unwrap() as usize;
            let mut bytes = vec![0; len];
            conn.read_exact(&mut bytes).await.unwrap();
            frames.push(bytes);
        }
        let limit: pb::DispatchRequest = prost::Message::decode(&frames[1][..]).unwrap();
        let member = frames.swap_remove(0);
        assert_eq!(
            (limit.id, limit.max_frame, limit.call.is_none()),
            (0, 1 << 20, true)
        );
        String::from_utf8(member).unwrap()
    }

    /// A call abandoned while the stream's queue is full gives its credit back once the
    /// receiver can free the call's slot: when its cancel is finally queued, or, if it
    /// never is, when the receiver answers the call.
    #[tokio::test(start_paused = true)]
    async fn a_call_abandoned_on_a_full_queue_gives_its_credit_back() {
        let (tx, mut rx) = mpsc::channel(1);
        let stream = PeerStream::new(tx.clone());
        stream.credits.add_permits(2);
        let abandon = |stream: &PeerStream| {
            let credit = stream.credits.clone().try_acquire_owned().unwrap();
            let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
            let (answer_tx, _answer_rx) = oneshot::channel();
            stream.pending.lock().unwrap().insert(id, answer_tx);
            drop(StreamUse {
                stream,
                id,
                queued: true,
                credit: Some(credit),
            });
            id
        };
        let idle = || tokio::task::yield_now();
        tx.try_send((pb::DispatchRequest::default(), None)).unwrap(); // the queue is full
                                                                      // Its cancel is queued once the writer takes the frame before it.
        abandon(&stream);
        assert_eq!(stream.credits.available_permits(), 1);
        rx.recv().await.unwrap();
        idle().await;
        assert_eq!(
            stream.credits.available_permits(),
            2,
            "back when its cancel is queued"
        );
        // Its cancel is never queued (the writer stays stuck past the cancel's time):
        // the receiver still answers the call, and the credit comes back then.
        let id = abandon(&stream);
        tokio::time::sleep(CANCEL_SEND * 2).await;
        assert_eq!(stream.credits.available_permits(), 1);
        deliver(
            &stream,
            pb::DispatchResponse {
                id,
                ..Default::default()
            },
        );
        assert_eq!(
            stream.credits.available_permits(),
            2,
            "back with the answer"
        );
    }

    #[tokio::test]
    async fn peers_that_left_and_broken_streams_are_forgotten() {
        let peers = Peers::new(
            1 << 20,
            16,
            Default::default(),
            MemberId("m1".into()),
            None,
            [Arc::default(), Arc::default()],
        );
        let address = |a: &str| PeerAddress {
            address: a.into(),
            identity: String::new(),
        };
        for a in ["10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"] {
            peers.client(&address(a)).unwrap();
        }
        // An open stream to a peer that stays, one to a peer that left, and a broken one
        // to a peer that stays.
        let mut outgoing = Vec::new();
        let mut stream = |key: &str, lane: Lane| {
            let (tx, rx) = mpsc::channel(1);
            outgoing.push(rx);
            let s = Arc::new(PeerStream::new(tx));
            peers
                .streams
                .lock()
                .unwrap()
                .insert((key.to_owned(), lane), s.clone());
            s
        };
        let stays = stream("10.0.0.1:7001", Lane::Calls);
        let left = stream("10.0.0.2:7001", Lane::Calls);
        let broken = stream("10.0.0.1:7001", Lane::Records);
        broken.fail_all(PeerError::NoAnswer);
        // Over HTTP/2 for want of peer frames: kept a while, then replaced.
        let fallback = |key: &str, due_in: Duration| {
            let (tx, _) = mpsc::channel(1);
            let s = PeerStream::new(tx);
            s.replace_at.set(Instant::now() + due_in).unwrap();
            let s = Arc::new(s);
            let lane = Lane::Calls;
            peers
                .streams
                .lock()
                .unwrap()
                .insert((key.to_owned(), lane), s.clone());
            s
        };
        let recent = fallback("10.0.0.3:7001", AFTER_REFUSAL);
        let old = fallback("10.0.0.4:7001", Duration::ZERO);
        let live = ["10.0.0.1:7001", "10.0.0.3:7001", "10.0.0.4:7001"]
            .map(String::from)
            .into();
        assert_eq!(peers.retain(&live), (vec!["10.0.0.2:7001".to_owned()], 1));
        assert!(
            recent.tx.lock().unwrap().is_some(),
            "a recent fallback is kept"
        );
        assert!(old.tx.lock().unwrap().is_none(), "an old fallback ends");
        let mut channels: Vec<String> = peers.channels.read().unwrap().keys().cloned().collect();
        channels.sort();
        assert_eq!(channels, ["10.0.0.1:7001", "10.0.0.3:7001"]);
        let streams = peers.streams.lock().unwrap();
        assert_eq!(streams.len(), 2, "the open stream and the recent fallback");
        assert!(Arc::ptr_eq(
            &streams[&("10.0.0.1:7001".to_owned(), Lane::Calls)],
            &stays
        ));
        drop(streams);
        assert!(stays.tx.lock().unwrap().is_some());
        assert!(
            left.tx.lock().unwrap().is_none(),
            "the stream to the peer that left ends"
        );
        // Nothing more to forget.
        assert_eq!(peers.retain(&live), (vec![], 0));
    }

    /// A receiver that does not answer the greeting — an HTTP/2 server (it writes its
    /// settings, reads a bad preface and drops the connection) or one that closes it —
    /// is reached over HTTP/2, with peer frames tried again much later.
    #[tokio::test]
    async fn a_receiver_that_does_not_answer_the_greeting_is_reached_over_http2() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let refused = h2::server::handshake(conn).await;
            assert!(refused.is_err(), "the greeting is no HTTP/2 preface");
            let (mut conn, _) = listener.accept().await.unwrap();
            greeting(&mut conn).await;
            conn.shutdown().await.unwrap();
            let _ = conn.read_u8().await; // until the sender closes
        });
        for receiver in ["an HTTP/2 server", "one that closes"] {
            match target(address).open().await {
                Ok(Transport::Http2(again)) => assert_eq!(again, AFTER_NO_ANSWER, "{receiver}"),
                Ok(Transport::Frames(_)) => panic!("{receiver}: accepted"),
                Err(e) => panic!("{receiver}: {e}"),
            }
        }
        receiver.await.unwrap();
    }

    #[tokio::test]
    async fn a_greeting_is_accepted_or_refused_by_the_receivers_first_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let mut members = Vec::new();
            for refuse in [false, true] {
                let (mut conn, _) = listener.accept().await.unwrap();
                members.push(greeting(&mut conn).await);
                let answer = pb::DispatchResponse {
                    max_in_flight: if refuse { 0 } else { 16 },
                    max_frame: 1000,
                    error: refuse.then(|| pb::DispatchError {
                        code: tonic::Code::PermissionDenied as i32,
                        message: "not a member".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let mut frame = bytes::BytesMut::new();
                crate::frames::put(&mut frame, &answer);
                conn.write_all(&frame).await.unwrap();
                if !refuse {
                    // Held open until the sender is done with it.
                    let _ = conn.read_u8().await;
                }
            }
            members
        });
        let accepted = target(address).open().await.unwrap();
        let Transport::Frames(accepted) = accepted else {
            panic!("not accepted")
        };
        assert_eq!((accepted.max_in_flight, accepted.max_frame), (16, 1000));
        drop(accepted);
        let refusing = target(address);
        let refused = refusing.open().await;
        assert!(
            matches!(refused, Err(PeerError::NotSent(_))),
            "{:?}",
            refused.err()
        );
        // For a while, streams to the peer that refused go over HTTP/2 (no connection
        // is made here: the receiver would not answer a third greeting).
        assert!(matches!(
            refusing.open().await.unwrap(),
            Transport::Http2(AFTER_REFUSAL)
        ));
        assert_eq!(receiver.await.unwrap(), ["m1", "m1"]);
    }
}
