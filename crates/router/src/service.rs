//! gRPC services of the call path: the client-facing `Entities` and the internal `Peer`.

use futures::future::{Either, FutureExt as _};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_proto::v1::{
    self as pb, entities_server::Entities, forward_response, peer_server::Peer,
};
use leasehold_types::{shard_for_key, Epoch, MemberId};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::peers::{KIND_HEADER, MEMBER_HEADER, ORIGIN_HEADER, STREAM_CALLS_HEADER};
use crate::trace::CallMetadata;
use crate::{Admitted, CallError, CallSource, Router};

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn client_timeout<T>(request: &Request<T>) -> Option<Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// `leasehold.v1.Entities`.
pub struct EntitiesService {
    router: Router,
}

impl EntitiesService {
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

#[tonic::async_trait]
impl Entities for EntitiesService {
    type WatchRoutingStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::RoutingTable, Status>>;

    async fn watch_routing(
        &self,
        _request: Request<pb::WatchRoutingRequest>,
    ) -> Result<Response<Self::WatchRoutingStream>, Status> {
        let rx = crate::routing::watch(&self.router)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let deadline = self.router.deadline(client_timeout(&request));
        let metadata = CallMetadata::from_grpc(request.metadata(), self.router.forward_metadata());
        let req = request.into_inner();
        let source = CallSource::Grpc {
            entry: self.router.coord().member_id().clone(),
        };
        let reply = self
            .router
            .call(req.key, req.payload, deadline, source, metadata)
            .await?;
        Ok(Response::new(pb::CallResponse {
            payload: reply.payload,
            shard: reply.shard.0,
            epoch: reply.epoch.0,
            owner: reply.owner.0,
        }))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let key = request.into_inner().key;
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        let view = self.router.coord().view();
        let shard = shard_for_key(key.as_bytes(), view.shard_count());
        let owner = view.owner(shard);
        Ok(Response::new(pb::LocateResponse {
            shard: shard.0,
            owner: owner.map(|o| o.owner.0.clone()).unwrap_or_default(),
            address: owner.map(|o| o.address.clone()).unwrap_or_default(),
            epoch: owner.map_or(0, |o| o.epoch.0),
        }))
    }
}

/// `leasehold.v1.Peer`: the receiving end of the forwarding hop.
pub struct PeerService {
    router: Router,
}

impl PeerService {
    pub fn new(router: Router) -> Self {
        Self { router }
    }
}

impl PeerService {
    /// With peer TLS: the call must name its sending member, that member must be
    /// registered, and the connection's certificate (already verified against the peer CA
    /// by the handshake) must carry the identity the member registered. Refused calls
    /// never reach the handler.
    fn authorize<T>(&self, request: &Request<T>) -> Result<Option<PeerCaller>, Status> {
        self.authorize_sender(
            request.extensions().get::<leasehold_tls::ConnInfo>(),
            request
                .metadata()
                .get(MEMBER_HEADER)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// [`PeerService::authorize`] for a connection and the member it names (peer frames
    /// name it in their first frame).
    fn authorize_sender(
        &self,
        conn: Option<&leasehold_tls::ConnInfo>,
        sender: Option<&str>,
    ) -> Result<Option<PeerCaller>, Status> {
        if self.router.options().peer_tls.is_none() {
            return Ok(None);
        }
        let Some(cert) = conn.and_then(|c| c.peer_cert.clone()) else {
            return Err(refused(
                "peer calls need a client certificate signed by the peer CA",
            ));
        };
        let sender = sender
            .ok_or_else(|| refused("peer calls must name their member (leasehold-member)"))?;
        let caller = PeerCaller {
            member: MemberId(sender.to_owned()),
            cert,
        };
        self.check(&caller)?;
        Ok(Some(caller))
    }

    /// The caller is a registered member and its certificate carries the identity that
    /// member registered (checked per call: a member whose lease ended stops here).
    fn check(&self, caller: &PeerCaller) -> Result<(), Status> {
        let view = self.router.coord().view();
        if !view.synced {
            return Err(Status::unavailable("routing table not synced; retry"));
        }
        let sender = &caller.member;
        let member = view
            .members
            .get(sender)
            .ok_or_else(|| refused(&format!("{sender} is not a registered member")))?;
        if !caller.cert.has_dns_name(&member.peer.identity) {
            tracing::warn!(
                %sender,
                registered_identity = %member.peer.identity,
                certificate = %caller.cert,
                "peer call refused: the certificate does not carry the member's identity"
            );
            return Err(refused(&format!(
                "the client certificate does not carry the identity member {sender} registered"
            )));
        }
        Ok(())
    }

    /// Admits a forwarded call (see [`Router::admit`]); the rest of the request is kept
    /// for [`PeerService::run`].
    fn admit(&self, req: &mut pb::ForwardRequest) -> Result<Admitted, CallError> {
        self.router.admit(
            std::mem::take(&mut req.key),
            std::mem::take(&mut req.payload),
        )
    }

    /// Runs one admitted forwarded call; `Err` is the owner's error for it. The future is
    /// built now and owns what it needs, once (it is spawned for every call).
    fn run(
        &self,
        call: Admitted,
        req: pb::ForwardRequest,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<pb::ForwardResponse, CallError>> + Send + 'static
    {
        let source = match req.source.and_then(|s| s.kind) {
            Some(pb::source::Kind::Kafka(k)) => CallSource::Kafka(k.into()),
            _ => CallSource::Grpc {
                entry: MemberId(req.entry),
            },
        };
        // Nobody reads a Kafka record's reply (its consumer only needs to know it was
        // handled): it does not travel back.
        let reply_wanted = !matches!(source, CallSource::Kafka(_));
        let served = self.router.serve_forwarded(
            call,
            deadline,
            source,
            Epoch(req.expected_epoch),
            CallMetadata::sanitized(req.metadata.into_iter().collect()),
        );
        served.map(move |served| {
            let result = match served {
                Ok(r) => forward_response::Result::Ok(pb::CallResponse {
                    payload: if reply_wanted {
                        r.payload
                    } else {
                        Default::default()
                    },
                    shard: r.shard.0,
                    epoch: r.epoch.0,
                    owner: r.owner.0,
                }),
                Err(CallError::NotOwner {
                    shard,
                    owner,
                    epoch,
                }) => forward_response::Result::NotOwner(pb::NotOwner {
                    shard: shard.0,
                    owner: owner.map(|o| o.0).unwrap_or_default(),
                    epoch: epoch.0,
                }),
                Err(e) => return Err(e),
            };
            Ok(pb::ForwardResponse {
                result: Some(result),
            })
        })
    }
}

type DispatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DispatchResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        self.authorize(&request).map_err(with_origin)?;
        let deadline = self.router.deadline(client_timeout(&request));
        let mut req = request.into_inner();
        let result = match self.admit(&mut req) {
            Ok(call) => self.run(call, req, deadline).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                let kind = e.kind();
                let mut status = Status::from(e);
                let metadata = status.metadata_mut();
                metadata.insert(ORIGIN_HEADER, MetadataValue::from_static("peer"));
                metadata.insert(KIND_HEADER, MetadataValue::from_static(kind));
                Err(status)
            }
        }
    }

    type DispatchStream = DispatchStream;

    /// Runs every call arriving on the stream concurrently (each entry sends a key's next
    /// call only after the previous one answered), at most `max_dispatch_in_flight` at
    /// once: past that the stream is not read, so a sender that never waits for answers
    /// is slowed down instead of growing memory here (senders of this version stay
    /// within the limit by themselves). Calls take their keys' turns in the order they
    /// are read; a cancel message drops its call unless its handler started, and so does
    /// a connection that breaks, as for unary Forwards whose streams reset.
    async fn dispatch(
        &self,
        request: Request<tonic::Streaming<pb::DispatchRequest>>,
    ) -> Result<Response<DispatchStream>, Status> {
        let caller = self.authorize(&request).map_err(with_origin)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let this = PeerService {
            router: self.router.clone(),
        };
        let mut incoming = Requests::Grpc(request.into_inner());
        self.router.tasks().spawn(async move {
            this.run_stream(caller, &mut incoming, tx).await;
        });
        let mut response = Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as DispatchStream
        );
        response
            .metadata_mut()
            .insert(STREAM_CALLS_HEADER, MetadataValue::from_static("1"));
        Ok(response)
    }
}

/// Where a Dispatch stream's requests come from.
enum Requests {
    Grpc(tonic::Streaming<pb::DispatchRequest>),
    Frames {
        reader: crate::frames::FrameReader<tokio::io::ReadHalf<leasehold_tls::Conn>>,
        /// The sender's clean end was read: it sends nothing more.
        ended: bool,
    },
}

impl Requests {
    /// The next request; `Ok(None)` when the sender ended the stream, `Err` when its
    /// connection broke (or, for frames, fell silent).
    async fn message(&mut self) -> Result<Option<pb::DispatchRequest>, ()> {
        match self {
            Requests::Grpc(s) => s.message().await.map_err(|_| ()),
            Requests::Frames { ended: true, .. } => Ok(None),
            Requests::Frames { reader, ended } => match reader.next().await {
                // The sender's clean end.
                Ok(Some(pb::DispatchRequest {
                    id: 0,
                    cancel: true,
                    ..
                })) => {
                    *ended = true;
                    Ok(None)
                }
                Ok(Some(req)) => Ok(Some(req)),
                // Ended without saying so, failed, or silent.
                _ => Err(()),
            },
        }
    }

    /// Reads (and drops) what the sender still writes until it ends or closes, for at
    /// most a second: a socket closed with bytes unread is reset, which can drop what
    /// this side wrote last before the sender reads it.
    async fn drain(&mut self) {
        let drain = async { while let Ok(Some(_)) = self.message().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

/// Answers on a Dispatch stream (whichever way they travel).
type Answers = tokio::sync::mpsc::Sender<Result<pb::DispatchResponse, Status>>;

impl PeerService {
    /// Takes the peer-frames connections of the peer plane (see `frames`): the same
    /// Dispatch streams as [`Peer::dispatch`], without HTTP/2.
    pub fn frames(router: Router) -> leasehold_tls::Alongside {
        leasehold_tls::Alongside {
            magic: crate::frames::MAGIC,
            serve: Arc::new(move |conn| {
                let this = PeerService::new(router.clone());
                router.tasks().spawn(this.serve_frames(conn));
            }),
        }
    }

    async fn serve_frames(self, conn: leasehold_tls::Conn) {
        use crate::frames;
        let info = conn.info().clone();
        let (read, write) = tokio::io::split(conn);
        // The greeting is read before the sender is known: a member id, not a call.
        let mut reader = frames::FrameReader::new(read, 256);
        // Within the silence as a whole: trickling it a byte at a time holds no slot.
        let greeting = tokio::time::timeout(frames::SILENCE, reader.next_bytes());
        let sender = match greeting.await {
            Ok(Ok(Some(member))) => String::from_utf8(member.to_vec()).ok(),
            _ => {
                tracing::debug!(remote = %info.remote, "peer-frames connection closed before it named its member");
                return;
            }
        };
        reader.set_max(self.router.options().max_message());
        let verdict = if self.router.inner.closing.is_cancelled() {
            // Calls sent now would never be read: "not sent" instead.
            Err(Status::unavailable("shutting down"))
        } else {
            self.authorize_sender(Some(&info), sender.as_deref())
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        // The answer to the greeting is queued before the writer starts, so it is the
        // first frame (not a ping).
        let first = match &verdict {
            Ok(_) => pb::DispatchResponse {
                max_in_flight: u32::try_from(self.router.options().max_dispatch_in_flight)
                    .unwrap_or(u32::MAX)
                    .max(1),
                max_frame: u32::try_from(self.router.options().max_message()).unwrap_or(u32::MAX),
                ..Default::default()
            },
            Err(refusal) => error_answer(0, refusal, "unavailable"),
        };
        tx.try_send(Ok(first)).expect("an empty channel has room");
        // Pings every second, so the sender hears this side is alive while its calls run.
        let ping = Some(pb::DispatchResponse::default());
        let mut writer = tokio::spawn(frames::write_frames(write, rx, Result::ok, ping, None));
        let mut incoming = Requests::Frames {
            reader,
            ended: false,
        };
        let caller = match verdict {
            Ok(caller) => caller,
            Err(refusal) => {
                tracing::warn!(remote = %info.remote, sender = sender.as_deref().unwrap_or("?"), reason = %refusal.message(), "peer-frames connection refused");
                drop(tx);
                let _ = tokio::time::timeout(frames::SILENCE, writer).await;
                incoming.drain().await;
                return;
            }
        };
        // Calls read while this instance closes are answered "not owner" while the writer
        // still runs (without keeping it running: it ends once the calls' answers are
        // written).
        let late = tx.downgrade();
        let this = PeerService {
            router: self.router.clone(),
        };
        match self.run_stream(caller, &mut incoming, tx).await {
            // Nobody waits for the answers of calls still running: close now.
            Ended::Broken => writer.abort(),
            // The sender still reads the answers of the calls it sent.
            Ended::Finished => {
                let _ = writer.await;
            }
            // Every answer is written before the connection closes, and the sender's
            // side is read to its end: a socket closed with bytes unread is reset, which
            // drops answers not yet delivered. Calls read meanwhile are not run; they are
            // answered "not owner" (did not run: their senders route them again) while
            // the writer takes answers, and otherwise end with the connection.
            Ended::Closing => loop {
                tokio::select! {
                    biased;
                    _ = &mut writer => {
                        incoming.drain().await;
                        break;
                    }
                    r = incoming.message() => match r {
                        Ok(Some(req)) => {
                            if let (Some(call), Some(tx)) = (req.call, late.upgrade()) {
                                let answer = tx.send(Ok(this.not_owner(req.id, call.shard)));
                                let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
                            }
                        }
                        // The sender's clean end: it reads the answers still to come.
                        Ok(None) => {
                            let _ = (&mut writer).await;
                            break;
                        }
                        Err(()) => {
                            writer.abort();
                            break;
                        }
                    },
                }
            },
        }
    }

    /// Runs every call arriving on a Dispatch stream; see [`Peer::dispatch`].
    async fn run_stream(
        self,
        caller: Option<PeerCaller>,
        incoming: &mut Requests,
        tx: Answers,
    ) -> Ended {
        let this = Arc::new(self);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(
            this.router.options().max_dispatch_in_flight,
        ));
        let tasks = this.router.tasks().clone();
        // Answers fit in a frame the sender reads: our own limit, or the sender's if it
        // said it is lower (its first message, before any call).
        let mut max_answer = this.router.options().max_message();
        let closing = this.router.inner.closing.clone();
        // Calls read and not yet answered, by id; removing one drops its call.
        let running: StreamCalls = Arc::new(Mutex::new(HashMap::new()));
        let ended = loop {
            let req = tokio::select! {
                biased;
                _ = closing.cancelled() => break Ended::Closing,
                r = incoming.message() => r,
            };
            let req = match req {
                Ok(Some(req)) => req,
                Ok(None) => break Ended::Finished,
                Err(_) => break Ended::Broken,
            };
            // A peer-frames ping (it kept the connection alive by arriving), or the
            // sender's limit (never below 1 MiB + 1 byte: any other value is a sender's
            // bug, which would otherwise turn every answer into an error).
            if req.id == 0 {
                if req.max_frame > 1 << 20 {
                    max_answer = max_answer.min(req.max_frame as usize);
                }
                continue;
            }
            if req.cancel {
                this.router.inner.metrics.stream_cancels.inc();
                // Its task wakes up and drops the call (or finds it done).
                running.lock().expect("running lock").remove(&req.id);
                continue;
            }
            let (id, Some(mut call)) = (req.id, req.call) else {
                continue;
            };
            this.router.inner.metrics.stream_calls.inc();
            // Counted from the read: the sender keeps its calls within our slots, so
            // it was written just now.
            let deadline = this
                .router
                .deadline(Some(Duration::from_millis(u64::from(req.timeout_ms))));
            if let Some(caller) = &caller {
                if let Err(refusal) = this.check(caller) {
                    // Not run; the calls after it are checked on their own. A sender that
                    // reads no answer for this long is gone.
                    let answer = error_answer(id, &refusal, "unavailable");
                    let sent = tokio::time::timeout(crate::frames::SILENCE, tx.send(Ok(answer)));
                    if sent.await.is_err() {
                        break Ended::Broken;
                    }
                    continue;
                }
            }
            let slot = tokio::select! {
                biased;
                _ = closing.cancelled() => {
                    let answer = tx.send(Ok(this.not_owner(id, call.shard)));
                    let _ = tokio::time::timeout(crate::frames::SILENCE, answer).await;
                    break Ended::Closing;
                }
                s = in_flight.clone().acquire_owned() => s.expect("never closed"),
            };
            // Admitted before the next message is read: its key's turn in stream order.
            let run = match this.admit(&mut call) {
                Ok(admitted) => Either::Left(this.run(admitted, call, deadline)),
                Err(e) => Either::Right(std::future::ready(Err(e))),
            };
            let (cancel, registration) = futures::future::AbortHandle::new_pair();
            running
                .lock()
                .expect("running lock")
                .insert(id, CancelOnDrop(cancel));
            let (tx, running) = (tx.clone(), running.clone());
            // Combinators rather than an async block awaiting `run`, which would hold
            // the call's future twice (see ARCHITECTURE.md, "Per-call future size").
            // A cancel read before the call first ran stops it here: `Abortable`
            // checks for it before each poll.
            let work = futures::future::Abortable::new(run, registration).then(move |outcome| {
                // Cancelled: the call's future is dropped with the `Abortable` (a
                // started handler finishes in the background); the sender expects no
                // answer.
                let result = outcome.ok();
                async move {
                    let Some(result) = result else { return };
                    running.lock().expect("running lock").remove(&id);
                    let _ = tx.send(Ok(answer_within(id, result, max_answer))).await;
                    drop(slot);
                }
            });
            tasks.spawn(work);
        };
        match ended {
            // The sender's connection broke: nobody waits for these answers.
            Ended::Broken => running.lock().expect("running lock").clear(),
            // Shutting down (this instance no longer owns shards): calls already
            // here are answered "not owner" without running, so their senders route
            // them again; calls read before still answer.
            Ended::Closing => {
                while let Some(Ok(Some(req))) = futures::FutureExt::now_or_never(incoming.message())
                {
                    if req.cancel {
                        this.router.inner.metrics.stream_cancels.inc();
                        running.lock().expect("running lock").remove(&req.id);
                    } else if let Some(call) = req.call {
                        let answer = this.not_owner(req.id, call.shard);
                        let send = tx.send(Ok(answer));
                        if tokio::time::timeout(Duration::from_secs(1), send)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            Ended::Finished => {}
        }
        ended
    }
}

/// Why a Dispatch stream's read loop ended.
#[derive(Clone, Copy)]
enum Ended {
    /// The sender ended its side.
    Finished,
    /// The sender's connection broke.
    Broken,
    /// This instance is shutting down.
    Closing,
}

impl PeerService {
    /// "Not owner" with this instance's view of the shard: the call did not run here.
    fn not_owner(&self, id: u64, shard: u32) -> pb::DispatchResponse {
        let view = self.router.coord().view();
        let owner = view.owner(leasehold_types::ShardId(shard));
        pb::DispatchResponse {
            id,
            answer: Some(pb::ForwardResponse {
                result: Some(forward_response::Result::NotOwner(pb::NotOwner {
                    shard,
                    owner: owner.map(|o| o.owner.0.clone()).unwrap_or_default(),
                    epoch: owner.map_or(0, |o| o.epoch.0),
                })),
            }),
            error: None,
            ..Default::default()
        }
    }
}

/// A call's answer on a Dispatch stream.
fn answer(id: u64, result: Result<pb::ForwardResponse, CallError>) -> pb::DispatchResponse {
    match result {
        Ok(answer) => pb::DispatchResponse {
            id,
            answer: Some(answer),
            error: None,
            ..Default::default()
        },
        Err(e) => {
            let kind = e.kind();
            error_answer(id, &Status::from(e), kind)
        }
    }
}

/// A call's answer, or, if it would not fit in a frame the sender reads (`max_answer`:
/// the lower of the two instances' max_payload + 1 MiB), an error saying so: an oversized
/// frame would break the stream and fail every call on it.
fn answer_within(
    id: u64,
    result: Result<pb::ForwardResponse, CallError>,
    max_answer: usize,
) -> pb::DispatchResponse {
    let a = answer(id, result);
    let size = prost::Message::encoded_len(&a);
    if size <= max_answer {
        return a;
    }
    // The handler's own outcome (kind "handler"): not to be retried, since it ran.
    let e = CallError::Handler(Status::resource_exhausted(format!(
        "the handler ran, but its reply ({size} bytes with its envelope) is larger than a forwarded answer may be ({max_answer} bytes: the lower max_payload of the two instances + 1 MiB); call the key's owner directly or return less"
    )));
    answer(id, Err(e))
}

/// A call's error on a Dispatch stream: the status whole, and what failed (`kind`).
fn error_answer(id: u64, s: &Status, kind: &str) -> pb::DispatchResponse {
    pb::DispatchResponse {
        id,
        answer: None,
        error: Some(pb::DispatchError {
            code: s.code() as i32,
            message: s.message().to_owned(),
            kind: kind.to_owned(),
            details: s.details().to_vec().into(),
            metadata: ascii_metadata(s.metadata()),
        }),
        ..Default::default()
    }
}

/// The calls of one Dispatch stream still running, by id, with what cancels each.
type StreamCalls = Arc<Mutex<HashMap<u64, CancelOnDrop>>>;

/// Cancels a call read from a Dispatch stream when dropped (taken out of
/// [`StreamCalls`] by a cancel message or a broken stream). Dropped after the call's
/// answer was written, it does nothing.
struct CancelOnDrop(futures::future::AbortHandle);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A peer whose calls were accepted: who it says it is, and its certificate.
struct PeerCaller {
    member: MemberId,
    cert: std::sync::Arc<leasehold_tls::CertInfo>,
}

fn refused(why: &str) -> Status {
    Status::permission_denied(format!("peer call refused: {why}"))
}

/// Marks a refusal as this receiver's answer, so the sender knows the call never ran.
fn with_origin(mut status: Status) -> Status {
    let metadata = status.metadata_mut();
    metadata.insert(ORIGIN_HEADER, MetadataValue::from_static("peer"));
    metadata.insert(KIND_HEADER, MetadataValue::from_static("unavailable"));
    status
}

/// A status's ASCII metadata as a map (binary entries are carried in `details`).
fn ascii_metadata(m: &tonic::metadata::MetadataMap) -> std::collections::HashMap<String, String> {
    m.iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn a_reply_too_large_for_the_senders_frames_is_answered_resource_exhausted() {
        let reply = |bytes: usize| {
            Ok(pb::ForwardResponse {
                result: Some(forward_response::Result::Ok(pb::CallResponse {
                    payload: vec![7; bytes].into(),
                    shard: 1,
                    epoch: 2,
                    owner: "n0".into(),
                })),
            })
        };
        let fits = answer_within(9, reply(1000), 2000);
        assert_eq!(fits.id, 9);
        assert!(fits.error.is_none() && fits.answer.is_some(), "{fits:?}");
        let over = answer_within(9, reply(2000), 2000);
        assert_eq!(over.id, 9);
        assert!(over.answer.is_none());
        let e = over.error.expect("an error answer");
        assert_eq!(e.code, tonic::Code::ResourceExhausted as i32);
        // The handler's outcome: not retried (it ran), passed through as it is.
        assert_eq!(e.kind, "handler");
        let at_sender = CallError::from_remote(
            Status::new(tonic::Code::from(e.code), e.message.clone()),
            &e.kind,
        );
        assert!(!at_sender.is_retryable(), "{at_sender:?}");
        assert_eq!(at_sender.code(), tonic::Code::ResourceExhausted);
        assert!(e.message.contains("2000 bytes"), "{}", e.message);
        assert!(
            prost::Message::encoded_len(&pb::DispatchResponse {
                id: 9,
                answer: None,
                error: Some(e),
                ..Default::default()
            }) <= 2000
        );
    }
}
