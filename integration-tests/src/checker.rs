//! An `EntityHandler` that checks Leasehold's guarantees from the application's side:
//! no two concurrent calls for one key, and no call with an epoch older than one already
//! seen for its shard (a stale owner still running).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_proto::v1::entity_handler_server::{EntityHandler, EntityHandlerServer};
use leasehold_proto::v1::{HandleRequest, HandleResponse, ShardEvent, ShardEventAck};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct State {
    /// Key → (call id, owner, epoch, deadline in Unix ms) of the call running for it.
    running: HashMap<String, (u64, String, u64, i64)>,
    next_call: u64,
    /// Every violation, in words.
    pub violations: Vec<String>,
    pub calls: u64,
    /// Key → owners that ran it.
    pub owners: HashMap<String, BTreeSet<String>>,
    /// Shard → largest epoch seen.
    pub max_epoch: HashMap<u32, u64>,
    /// Key → payloads in the order they ran.
    pub history: HashMap<String, Vec<Vec<u8>>>,
    /// Kafka calls in the order they started: (key, partition, offset, owner).
    pub kafka: Vec<(String, i32, i64, String)>,
    /// The consumer's claim (fence) each of those calls carried, in the same order.
    pub kafka_fences: Vec<u64>,
    /// The cluster of each entry of `kafka` (empty without failover).
    pub kafka_clusters: Vec<String>,
    /// The distinct (partition, offset) pairs of `kafka`, kept as calls arrive: tests poll
    /// their count, and rebuilding it from `kafka` under this lock stalls the handler.
    pub kafka_distinct: std::collections::HashSet<(i32, i64)>,
    /// Key → the request metadata the handler received that the test asked to keep
    /// (`traceparent`, `tracestate`, `x-*`), last call wins.
    pub metadata: HashMap<String, Vec<(String, String)>>,
    /// The shards of the `ShardAcquired` hooks received, in the order they arrived.
    pub acquired: Vec<u32>,
}

/// Removes a call from `running` when the handler finishes or is cancelled (only this
/// call's entry: a later call for the key may have replaced it).
struct Running {
    state: Arc<Mutex<State>>,
    key: String,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap();
        if s.running.get(&self.key).is_some_and(|r| r.0 == self.id) {
            s.running.remove(&self.key);
        }
    }
}

#[derive(Clone)]
struct Service {
    state: Arc<Mutex<State>>,
    delay: Duration,
    /// Keys starting with this prefix fail with INTERNAL (for error-path tests).
    fail_prefix: Option<String>,
    /// How long each `ShardAcquired` hook takes.
    hook_delay: Duration,
}

#[tonic::async_trait]
impl EntityHandler for Service {
    async fn handle(
        &self,
        request: Request<HandleRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let kept: Vec<(String, String)> = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    let k = k.as_str();
                    (k == "traceparent" || k == "tracestate" || k.starts_with("x-"))
                        .then(|| (k.to_owned(), v.to_str().unwrap_or_default().to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let r = request.into_inner();
        if !kept.is_empty() {
            self.state
                .lock()
                .unwrap()
                .metadata
                .insert(r.key.clone(), kept);
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if r.deadline_unix_ms > 0 && now_ms >= r.deadline_unix_ms {
            return Err(Status::deadline_exceeded("received past its deadline"));
        }
        if let Some(leasehold_proto::v1::source::Kind::Kafka(k)) =
            r.source.as_ref().and_then(|s| s.kind.as_ref())
        {
            let entry = (r.key.clone(), k.partition, k.offset, r.owner.clone());
            let mut s = self.state.lock().unwrap();
            s.kafka_distinct.insert((k.partition, k.offset));
            s.kafka.push(entry);
            s.kafka_fences.push(k.fence);
            s.kafka_clusters.push(k.cluster.clone());
        }
        if self
            .fail_prefix
            .as_deref()
            .is_some_and(|p| r.key.starts_with(p))
        {
            // A rich error (details and metadata), as applications send them.
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("x-reason", "refused".parse().unwrap());
            return Err(Status::with_details_and_metadata(
                tonic::Code::Internal,
                format!("checker refuses key {}", r.key),
                bytes::Bytes::from_static(b"refusal-details"),
                metadata,
            ));
        }
        let id = {
            let s = &mut *self.state.lock().unwrap();
            s.calls += 1;
            // Like a handler that honours its deadline: a call received past it (sent late
            // by a paused instance) is refused, not run. A call still running past its
            // deadline is the handler's to stop (this one only notices when its future is
            // dropped): Leasehold promises the next call for the key does not start before
            // the running one answered or its deadline passed.
            if let Some((_, owner, epoch, deadline)) = s.running.get(&r.key) {
                if *deadline == 0 || now_ms < *deadline {
                    let v = format!(
                        "key {}: call by {}@{} while {}@{} still runs (its deadline is {} ms away)",
                        r.key,
                        r.owner,
                        r.epoch,
                        owner,
                        epoch,
                        deadline - now_ms
                    );
                    s.violations.push(v);
                }
            }
            let max = *s.max_epoch.get(&r.shard).unwrap_or(&0);
            if r.epoch < max {
                let v = format!(
                    "shard {}: call by {} with epoch {} after epoch {}",
                    r.shard, r.owner, r.epoch, max
                );
                s.violations.push(v);
            }
            s.max_epoch.insert(r.shard, max.max(r.epoch));
            s.next_call += 1;
            let id = s.next_call;
            s.running.insert(
                r.key.clone(),
                (id, r.owner.clone(), r.epoch, r.deadline_unix_ms),
            );
            s.owners
                .entry(r.key.clone())
                .or_default()
                .insert(r.owner.clone());
            s.history
                .entry(r.key.clone())
                .or_default()
                .push(r.payload.to_vec());
            id
        };
        // The call ends when this handler returns or is dropped: a caller that dies
        // mid-call (SIGKILL) cancels it, and then it is not running any more.
        let running = Running {
            state: self.state.clone(),
            key: r.key.clone(),
            id,
        };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        drop(running);
        Ok(Response::new(HandleResponse { payload: r.payload }))
    }

    async fn shard_acquired(
        &self,
        r: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        self.state.lock().unwrap().acquired.push(r.get_ref().shard);
        if !self.hook_delay.is_zero() {
            tokio::time::sleep(self.hook_delay).await;
        }
        Ok(Response::new(ShardEventAck {}))
    }

    async fn shard_released(
        &self,
        _: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        Ok(Response::new(ShardEventAck {}))
    }
}

/// A running checker handler; stops when dropped.
pub struct Checker {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl Checker {
    /// Starts the checker on a free loopback port; each call takes `delay`.
    pub async fn start(delay: Duration, fail_prefix: Option<&str>) -> Checker {
        Self::start_on(0, delay, fail_prefix).await
    }

    /// Starts the checker on a given loopback port (0: any free one), e.g. one that
    /// instances were pointed at before their handler existed.
    pub async fn start_on(port: u16, delay: Duration, fail_prefix: Option<&str>) -> Checker {
        Self::start_with(port, delay, fail_prefix, None, Duration::ZERO).await
    }

    /// Starts the checker serving TLS with `identity` (certificate, key PEM).
    pub async fn start_tls(identity: &crate::pki::Leaf) -> Checker {
        Self::start_with(0, Duration::ZERO, None, Some(identity), Duration::ZERO).await
    }

    /// Starts the checker with calls answered at once and each `ShardAcquired` hook
    /// taking `hook_delay`.
    pub async fn start_slow_hooks(hook_delay: Duration) -> Checker {
        Self::start_with(0, Duration::ZERO, None, None, hook_delay).await
    }

    async fn start_with(
        port: u16,
        delay: Duration,
        fail_prefix: Option<&str>,
        tls: Option<&crate::pki::Leaf>,
        hook_delay: Duration,
    ) -> Checker {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let svc = Service {
            state: state.clone(),
            delay,
            fail_prefix: fail_prefix.map(str::to_owned),
            hook_delay,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let mut server = tonic::transport::Server::builder();
        if let Some(leaf) = tls {
            server = server
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(&leaf.cert, &leaf.key)),
                )
                .unwrap();
        }
        tokio::spawn(async move {
            server
                .add_service(EntityHandlerServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await
                .unwrap();
        });
        Checker {
            port,
            state,
            _stop: tx,
        }
    }

    pub fn handler_flag(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn calls(&self) -> u64 {
        self.state.lock().unwrap().calls
    }
}
