//! `leasehold serve`: build the instance, run it, shut it down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leasehold_coord::{Coord, CoordOptions};
use leasehold_metrics::Registry;
use leasehold_proto::v1::{entities_server::EntitiesServer, peer_server::PeerServer};
use leasehold_router::{
    EchoHandler, EntitiesService, GrpcHandler, Handler, PeerService, Router, RouterOptions,
    ShardEvents,
};
use leasehold_types::MemberId;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::admin::{self, AdminService};
use crate::config::{ConfigError, HandlerSpec, ServeOptions};
use crate::security::{Security, SecurityError};

/// Why an instance could not start, or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address} ({field}): {source}")]
    Listen {
        field: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error(transparent)]
    Handler(#[from] leasehold_router::HandlerError),
    #[error("kafka source {name}: {source}")]
    Kafka {
        name: String,
        source: Box<leasehold_kafka::Error>,
    },
    #[error("kafka source {0} stopped unexpectedly")]
    KafkaStopped(String),
    #[error(transparent)]
    Coord(#[from] leasehold_coord::Error),
    #[error("coordination stopped unexpectedly")]
    CoordStopped,
    #[error("{task} panicked: {source}")]
    Panicked {
        task: &'static str,
        source: tokio::task::JoinError,
    },
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("listener address: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// A problem with what the operator gave (settings, certificate files): exit 64.
    pub fn is_usage(&self) -> bool {
        matches!(self, ServeError::Config(_) | ServeError::Security(_))
    }
}

/// The listeners of an instance's three planes, bound before the runtime work starts so
/// that tests and callers can use port 0.
pub struct Listeners {
    /// Entities, health, reflection.
    pub client: TcpListener,
    /// Peer (forwarded calls).
    pub peer: TcpListener,
    /// Admin HTTP and gRPC.
    pub admin: TcpListener,
    /// The HTTP gateway, when `http_listen` is set.
    pub http: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &ServeOptions) -> Result<Self, ServeError> {
        let bind = |field, address| async move {
            TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::Listen {
                    field,
                    address,
                    source,
                })
        };
        Ok(Self {
            client: bind("listen", config.listen).await?,
            peer: bind("peer_listen", config.peer_listen).await?,
            admin: bind("admin_listen", config.admin_listen).await?,
            http: match config.http_listen {
                Some(address) => Some(bind("http_listen", address).await?),
                None => None,
            },
        })
    }
}

/// The address others use for a bound socket: the advertised one if configured, else the
/// bound address (with loopback standing in for an unspecified IP).
fn advertised(configured: &Option<String>, bound: SocketAddr, field: &str) -> String {
    if let Some(a) = configured {
        return a.clone();
    }
    if bound.ip().is_unspecified() {
        let a = format!("127.0.0.1:{}", bound.port());
        tracing::warn!(field, address = %a, "listening on all interfaces without an advertised address; peers on other hosts cannot reach this instance");
        return a;
    }
    bound.to_string()
}

/// The parts of a running instance.
struct Instance {
    coord: Coord,
    router: Router,
    handler: Arc<dyn Handler>,
    registry: Registry,
    status: Arc<crate::status::Status>,
}

impl Instance {
    fn build(
        config: &ServeOptions,
        listeners: &Listeners,
        security: &Security,
        embedded: Option<Arc<dyn Handler>>,
    ) -> Result<Self, ServeError> {
        let registry = Registry::new();
        let hash_version = leasehold_types::HASH_VERSION.to_string();
        registry.build_info(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("hash_version", &hash_version),
        ]);
        let address = advertised(
            &config.advertise,
            listeners.client.local_addr()?,
            "advertise",
        );
        let peer_address = advertised(
            &config.peer_advertise,
            listeners.peer.local_addr()?,
            "peer_advertise",
        );
        let admin_address = advertised(
            &config.admin_advertise,
            listeners.admin.local_addr()?,
            "admin_advertise",
        );
        let member = MemberId::new(config.id.clone());
        let max_message = config.max_payload.bytes() + (1 << 20);
        let handler: Arc<dyn Handler> = match (embedded, &config.handler) {
            (Some(h), _) => h,
            (None, HandlerSpec::Echo) => Arc::new(EchoHandler),
            (None, spec @ HandlerSpec::Grpc { .. }) => {
                let url = spec.url().expect("a gRPC handler has a URL");
                Arc::new(GrpcHandler::new(
                    &url,
                    max_message,
                    member.clone(),
                    security.handler.clone(),
                )?)
            }
        };
        let events = ShardEvents::new(
            handler.clone(),
            config.shard_event_timeout,
            config.shards,
            &registry,
        );
        let coord = Coord::new(
            CoordOptions {
                cluster: config.cluster.clone(),
                member_id: member.clone(),
                address,
                admin_address,
                peer_address,
                peer_identity: security.peer_identity.clone(),
                etcd_endpoints: config.etcd.0.clone(),
                etcd_user: config
                    .etcd_credentials()?
                    .map(|(user, password)| (user, password.expose().to_owned())),
                etcd_tls: security.etcd.as_ref().map(|t| (*t.current()).clone()),
                shard_count: config.shards,
                lease_ttl: config.lease_ttl,
                max_moves: config.max_moves,
                load_tolerance: (config.balance == crate::config::Balance::Load)
                    .then(|| config.balance_tolerance as f64 / 100.0),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            events.clone(),
            &registry,
        );
        let router = Router::new(
            coord.clone(),
            handler.clone(),
            events,
            RouterOptions {
                max_payload: config.max_payload.bytes(),
                request_timeout: config.request_timeout,
                max_concurrency: config.max_concurrency,
                mailbox_capacity: config.mailbox_capacity,
                max_key_bytes: config.max_key_bytes.bytes(),
                forward_metadata: config.forward_metadata.0.clone(),
                max_pending_calls: config.max_pending_calls,
                max_dispatch_in_flight: config.max_dispatch_in_flight,
                peer_tls: security
                    .peer_client
                    .clone()
                    .map(|client| leasehold_router::PeerTls { client }),
            },
            &registry,
        );
        Ok(Self {
            coord,
            router,
            handler,
            registry,
            status: Default::default(),
        })
    }

    /// Starts a task per Kafka source; they dispatch through the same call path as gRPC
    /// calls.
    fn start_kafka(
        &self,
        config: &ServeOptions,
        cancel: &CancellationToken,
    ) -> Result<JoinSet<Result<(), ServeError>>, ServeError> {
        let mut tasks = JoinSet::new();
        for source in config.kafka_sources_resolved()? {
            let dispatcher = Arc::new(RouterDispatch {
                router: self.router.clone(),
            });
            let cancel = cancel.clone();
            let name = source.name.clone();
            let span = tracing::info_span!("kafka_source", source = %name);
            let run: futures::future::BoxFuture<'static, Result<(), leasehold_kafka::Error>> =
                if source.failover.is_some() {
                    let status = leasehold_kafka::StatusHandle::default();
                    self.status.add_kafka(status.clone());
                    let remembered = crate::failover::Remembered::default();
                    self.status.add_failover(source.clone(), remembered.clone());
                    Box::pin(crate::failover::run(
                        source.clone(),
                        self.coord.clone(),
                        dispatcher,
                        self.registry.clone(),
                        status,
                        remembered,
                        cancel.clone(),
                    ))
                } else {
                    let ingest =
                        leasehold_kafka::Ingest::new(source.clone(), dispatcher, &self.registry);
                    self.status.add_kafka(ingest.status());
                    Box::pin(ingest.run(cancel.clone()))
                };
            tasks.spawn(tracing::Instrument::instrument(
                async move {
                    match run.await {
                        Ok(()) if cancel.is_cancelled() => Ok(()),
                        Ok(()) => Err(ServeError::KafkaStopped(name)),
                        Err(source) => Err(ServeError::Kafka {
                            name,
                            source: Box::new(source),
                        }),
                    }
                },
                span,
            ));
        }
        Ok(tasks)
    }

    /// Leaves the cluster in order: Kafka intake stops, shards drain, servers stop,
    /// background work ends, and only then the lease goes.
    async fn shutdown(
        self,
        config: &ServeOptions,
        mut kafka: JoinSet<Result<(), ServeError>>,
        kafka_cancel: CancellationToken,
        servers: Servers,
        coord_cancel: CancellationToken,
        coord_task: tokio::task::JoinHandle<Result<(), leasehold_coord::Error>>,
    ) {
        let Instance { coord, router, .. } = self;
        // Stop intake first: Kafka sources stop fetching, finish or abandon in-flight
        // messages and commit their watermarks while every shard is still served.
        kafka_cancel.cancel();
        while let Some(r) = kafka.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "kafka source failed while stopping");
            }
        }
        tracing::info!(timeout = ?config.drain_timeout, "shutting down: draining shards");
        let started = std::time::Instant::now();
        coord
            .drain(config.drain_timeout, handoff_bound(config))
            .await;
        tracing::info!(took = ?started.elapsed(), "drained; stopping servers");
        // Peers' Dispatch streams into this instance are long-lived: stop reading them (and
        // end ours) so that the servers' graceful stop does not wait for them.
        router.close();
        servers.stop().await;
        // Calls whose callers left and handoffs still hold shards: the lease must outlive them.
        coord.tasks().close();
        // Waiting is for the lease's sake: once it has expired in etcd (no keepalive
        // answered for a full TTL), its keys are gone and there is nothing left to protect.
        let grace = handoff_bound(config) + Duration::from_secs(1);
        tokio::select! {
            done = tokio::time::timeout(grace, async {
                router.tasks().wait().await;
                coord.tasks().wait().await;
            }) => {
                if done.is_err() {
                    tracing::warn!(
                        left = router.tasks().len() + coord.tasks().len(),
                        "background work still running after {grace:?}; abandoned"
                    );
                }
            }
            _ = coord.lease_gone() => tracing::warn!(
                left = router.tasks().len() + coord.tasks().len(),
                "the lease has expired in etcd; not waiting for the rest of the background work"
            ),
        }
        coord_cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), coord_task).await;
        coord.revoke().await;
    }
}

/// The longest a handoff takes: its running calls end (by their deadline), then the
/// ownership's pending `acquired` hook and its `released` hook (each bounded). The lease
/// must outlive it, or the next owner could start before the release hook ended.
fn handoff_bound(config: &ServeOptions) -> Duration {
    config.request_timeout + 2 * config.shard_event_timeout
}

/// Runs an instance until `shutdown` resolves, then leaves the cluster gracefully:
/// not ready → drain shards → stop servers → revoke the lease.
pub async fn serve(
    config: ServeOptions,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_with(config, listeners, None, shutdown).await
}

/// [`serve`] with the handler given (an embedded one) instead of the `handler` setting.
pub async fn serve_with(
    config: ServeOptions,
    listeners: Listeners,
    handler: Option<Arc<dyn Handler>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let security = Security::load(&config)?;
    let instance = Instance::build(&config, &listeners, &security, handler)?;
    tracing::info!(
        member = %instance.coord.member_id(),
        cluster = %config.cluster,
        client = %listeners.client.local_addr()?,
        http = ?listeners.http.as_ref().and_then(|l| l.local_addr().ok()),
        peer = %listeners.peer.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        client_tls = security.client.is_some(),
        peer_tls = security.peer_server.is_some(),
        admin_tls = security.admin.is_some(),
        admin_token = config.admin_token_file.is_some(),
        shards = config.shards,
        "starting"
    );
    let kafka_cancel = CancellationToken::new();
    let kafka = instance.start_kafka(&config, &kafka_cancel)?;
    let coord_cancel = CancellationToken::new();
    let coord_task = tokio::spawn(instance.coord.clone().run(
        coord_cancel.clone(),
        Box::pin(handler_ready(instance.handler.clone())),
    ));
    let servers = Servers::start(&config, &instance, listeners, &security)?;
    run_until_stopped(
        shutdown,
        coord_task,
        kafka,
        instance,
        &config,
        kafka_cancel,
        servers,
        coord_cancel,
    )
    .await
}

/// Waits for `shutdown` or for an essential task to end, then shuts down. An essential
/// task that ends ends the process with an error: an instance without its coordination
/// or one of its Kafka sources would stay up and do nothing.
#[allow(clippy::too_many_arguments)]
async fn run_until_stopped(
    shutdown: impl Future<Output = ()>,
    mut coord_task: tokio::task::JoinHandle<Result<(), leasehold_coord::Error>>,
    mut kafka: JoinSet<Result<(), ServeError>>,
    instance: Instance,
    config: &ServeOptions,
    kafka_cancel: CancellationToken,
    servers: Servers,
    coord_cancel: CancellationToken,
) -> Result<(), ServeError> {
    let mut fatal = None;
    tokio::select! {
        _ = shutdown => {}
        r = &mut coord_task => {
            servers.stop_now();
            kafka_cancel.cancel();
            return match r {
                Ok(Ok(())) => Err(ServeError::CoordStopped),
                Ok(Err(e)) => Err(e.into()),
                Err(source) => Err(ServeError::Panicked { task: "coordination", source }),
            };
        }
        Some(r) = kafka.join_next() => {
            let e = match r {
                Ok(Ok(())) => ServeError::KafkaStopped("(cancelled)".into()),
                Ok(Err(e)) => e,
                Err(source) => ServeError::Panicked { task: "kafka source", source },
            };
            tracing::error!(error = %e, "kafka source ended; shutting down");
            fatal = Some(e);
        }
    }
    instance
        .shutdown(
            config,
            kafka,
            kafka_cancel,
            servers,
            coord_cancel,
            coord_task,
        )
        .await;
    tracing::info!("stopped");
    fatal.map_or(Ok(()), Err)
}

/// The three planes' servers, the health reporter and the TLS file watcher.
struct Servers {
    stop: CancellationToken,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl Servers {
    fn start(
        config: &ServeOptions,
        instance: &Instance,
        listeners: Listeners,
        security: &Security,
    ) -> Result<Self, ServeError> {
        let stop = CancellationToken::new();
        let max_message = config.max_payload.bytes() + (1 << 20);
        let mut tasks = Vec::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        tasks.push((
            "health reporter",
            tokio::spawn(report_health(instance.coord.clone(), health, stop.clone())),
        ));
        tasks.push((
            "TLS file watcher",
            tokio::spawn(watch_files(
                security.reloadable.clone(),
                config.tls_reload_interval,
                instance.registry.clone(),
                stop.clone(),
            )),
        ));
        tasks.push((
            "load reporter",
            tokio::spawn({
                let router = instance.router.clone();
                let (interval, smoothing) = (config.load_report_interval, config.load_smoothing);
                let stop = stop.clone();
                async move { router.report_load(interval, smoothing, stop).await }
            }),
        ));
        tasks.push((
            "shard move recorder",
            tokio::spawn(crate::status::record_moves(
                instance.coord.clone(),
                instance.status.clone(),
                stop.clone(),
            )),
        ));
        if let Some(etcd) = security.etcd.clone() {
            tasks.push((
                "etcd TLS watcher",
                tokio::spawn(watch_etcd_tls(
                    etcd,
                    instance.coord.clone(),
                    config.tls_reload_interval,
                    stop.clone(),
                )),
            ));
        }
        let incoming = |plane, listener, tls: &Option<_>, alongside| {
            leasehold_tls::incoming(
                plane,
                listener,
                tls.clone(),
                config.max_connections,
                stop.clone(),
                alongside,
            )
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(leasehold_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let grpc_metrics = crate::grpc_metrics::GrpcMetrics::new(&instance.registry);
        // Client-facing calls; per-key queues bound memory (RESOURCE_EXHAUSTED when full).
        let client = server_builder(config)
            .layer(grpc_metrics.layer("client"))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                EntitiesServer::new(EntitiesService::new(instance.router.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
                |request: tonic::Request<()>| {
                    crate::security::grpc_content_type(&request).map(|()| request)
                },
            ))
            // grpc.health.v1 and server reflection for tooling.
            .add_service(health_service)
            .add_service(reflection);
        let peer = server_builder(config)
            .layer(grpc_metrics.layer("peer"))
            .add_service(
                PeerServer::new(PeerService::new(instance.router.clone()))
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            );
        let auth = security.admin_auth.clone();
        let admin_routes = tonic::service::Routes::from(admin::http_routes(
            instance.router.clone(),
            instance.registry.clone(),
            instance.status.clone(),
            auth.clone(),
        ))
        .add_service(admin::grpc_service(AdminService {
            coord: instance.coord.clone(),
            auth,
            status: instance.status.clone(),
        }));
        let admin = server_builder(config)
            .max_concurrent_streams(admin::MAX_STREAMS)
            .accept_http1(true)
            .layer(grpc_metrics.layer("admin"))
            .add_routes(admin_routes);
        let planes = [
            (
                "client",
                incoming("client", listeners.client, &security.client, None),
                client,
            ),
            (
                "peer",
                // Dispatch streams also come as peer frames, without HTTP/2.
                incoming(
                    "peer",
                    listeners.peer,
                    &security.peer_server,
                    Some(PeerService::frames(instance.router.clone())),
                ),
                peer,
            ),
            (
                "admin",
                incoming("admin", listeners.admin, &security.admin, None),
                admin,
            ),
        ];
        if let Some(listener) = listeners.http {
            // Counted by its own HTTP metrics, not the gRPC layer's.
            let gateway =
                server_builder(config)
                    .accept_http1(true)
                    .add_routes(tonic::service::Routes::from(crate::gateway::routes(
                        instance.router.clone(),
                        &instance.registry,
                    )));
            let incoming = incoming("http", listener, &security.http, None);
            let stop = stop.clone();
            tasks.push((
                "http",
                tokio::spawn(async move {
                    if let Err(e) = gateway
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                    {
                        tracing::error!(plane = "http", error = %e, "server failed");
                    }
                }),
            ));
        }
        for (plane, incoming, server) in planes {
            let stop = stop.clone();
            tasks.push((
                plane,
                tokio::spawn(async move {
                    if let Err(e) = server
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                    {
                        tracing::error!(plane, error = %e, "server failed");
                    }
                }),
            ));
        }
        Ok(Self { stop, tasks })
    }

    fn stop_now(&self) {
        self.stop.cancel();
    }

    /// Graceful stop: connections finish their requests (bounded).
    async fn stop(self) {
        self.stop.cancel();
        let grace = Duration::from_secs(5);
        if tokio::time::timeout(grace, async {
            for (_, t) in self.tasks {
                let _ = t.await;
            }
        })
        .await
        .is_err()
        {
            tracing::warn!("servers did not stop within {grace:?}");
        }
    }
}

/// HTTP/2 settings shared by the planes.
fn server_builder(config: &ServeOptions) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Detect dead peers and clients on idle connections.
        // A connection whose peer stops answering pings for 3 s is closed on this side.
        // Requests a partitioned peer buffered before the cut then die with the
        // connection instead of arriving, and running, when the network comes back —
        // long after their sender gave up and a Kafka partition moved on (the broker's
        // session timeout is at least 6 s).
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)))
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(config.max_header_bytes.bytes() as u32)
}

/// Reconnects to etcd when its TLS files change (its connections check a client
/// certificate only at the handshake, so an expiring one must be replaced before the next
/// reconnect needs it).
async fn watch_etcd_tls(
    tls: Arc<leasehold_tls::Reloading<leasehold_coord::EtcdTls>>,
    coord: Coord,
    interval: Duration,
    stop: CancellationToken,
) {
    use leasehold_tls::Reload;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match tls.reload_if_changed() {
            None => {}
            Some(Ok(())) => coord.reload_etcd_tls((*tls.current()).clone()).await,
            Some(Err(e)) => tracing::warn!(
                error = %e,
                "etcd TLS files changed but cannot be used; keeping the current connection"
            ),
        }
    }
}

/// Re-reads changed TLS files and the admin token, and publishes each certificate's
/// remaining validity (`leasehold_tls_certificate_expiry_seconds`).
async fn watch_files(
    items: Vec<Arc<dyn leasehold_tls::Reload>>,
    interval: Duration,
    registry: Registry,
    stop: CancellationToken,
) {
    let gauges: std::collections::HashMap<&'static str, _> = items
        .iter()
        .filter(|i| i.certificate().is_some())
        .map(|i| {
            (
                i.name(),
                registry.gauge(
                    "leasehold_tls_certificate_expiry_seconds",
                    "Seconds until the certificate this instance presents expires (negative: expired).",
                    &[("tls", i.name())],
                ),
            )
        })
        .collect();
    let warned = std::sync::Mutex::new(std::collections::HashSet::new());
    leasehold_tls::watch(items, interval, stop, |item| {
        let Some(cert) = item.certificate() else {
            return;
        };
        let now = std::time::SystemTime::now();
        if let Some(g) = gauges.get(item.name()) {
            g.set(cert.seconds_left(now));
        }
        let soon = cert
            .remaining(now)
            .is_none_or(|left| left < leasehold_tls::EXPIRY_WARNING);
        if soon && warned.lock().expect("warned lock").insert(cert.clone()) {
            tracing::warn!(tls = item.name(), certificate = %cert, "certificate expires within 7 days (or has expired); rotate it");
        }
    })
    .await
}

/// Resolves once the handler answers, retrying with back-off: an instance takes no shard
/// before (its calls would only fail or wait).
async fn handler_ready(handler: Arc<dyn Handler>) {
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    loop {
        match handler.ready().await {
            Ok(()) => {
                if tries > 0 {
                    tracing::info!("handler answers; taking shards");
                }
                return;
            }
            Err(e) => {
                tries += 1;
                if tries == 1 || tries.is_power_of_two() {
                    tracing::warn!(error = %e, tries, "waiting for the handler before taking shards");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs Kafka messages through the call path: the key's owner runs the handler.
struct RouterDispatch {
    router: Router,
}

impl leasehold_kafka::Dispatcher for RouterDispatch {
    fn dispatch(
        &self,
        call: leasehold_kafka::KafkaCall,
    ) -> futures::future::BoxFuture<'static, Result<(), leasehold_kafka::DispatchError>> {
        let deadline = self.router.deadline(None);
        let source = leasehold_router::CallSource::Kafka(leasehold_router::KafkaRecord {
            group: call.group,
            topic: call.topic,
            partition: call.partition,
            offset: call.offset,
            fence: call.fence,
            cluster: call.cluster,
        });
        let metadata = leasehold_router::CallMetadata::sanitized(call.trace);
        // Built here, so the boxed future holds the call once (see ARCHITECTURE.md,
        // "Per-call future size").
        let run = self
            .router
            .call(call.key, call.payload, deadline, source, metadata);
        Box::pin(futures::FutureExt::map(run, |r| {
            r.map(|_| ()).map_err(dispatch_error)
        }))
    }

    fn claim(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        epoch: u64,
        generation: i32,
        force: bool,
    ) -> futures::future::BoxFuture<'static, Result<u64, leasehold_kafka::DispatchError>> {
        let coord = self.router.coord().clone();
        let partition = leasehold_coord::PartitionRef {
            group: group.into(),
            topic: topic.into(),
            partition,
        };
        Box::pin(async move {
            use leasehold_kafka::DispatchError as D;
            let mode = if force {
                leasehold_coord::ClaimMode::Force
            } else {
                leasehold_coord::ClaimMode::Ordered
            };
            match coord
                .claim_partition(&partition, epoch, generation, mode)
                .await
            {
                Ok(leasehold_coord::Claim::Claimed { fence }) => Ok(fence),
                Ok(leasehold_coord::Claim::Superseded { holder }) => Err(D::Fenced(format!(
                    "{}/{} is claimed by {holder} (a later assignment than generation {generation})",
                    partition.topic, partition.partition
                ))),
                Err(e) => Err(D::Unavailable(format!(
                    "claiming {}/{}: {e}",
                    partition.topic, partition.partition
                ))),
            }
        })
    }
}

/// Only the handler's own answer is a handler failure; a call that did not reach a
/// handler is waited for, and one the call path refuses for good is not retried.
fn dispatch_error(e: leasehold_router::CallError) -> leasehold_kafka::DispatchError {
    use leasehold_kafka::DispatchError as D;
    use leasehold_router::CallError as C;
    match e {
        C::Handler(s) => D::Handler(format!("{:?}: {}", s.code(), s.message())),
        e @ C::HandlerTimeout(_) => D::Handler(e.to_string()),
        e @ C::InvalidArgument(_) => D::Rejected(e.to_string()),
        C::Fenced(m) => D::Fenced(m),
        // A handler connection lost mid-call is waited for and sent again (at least once).
        e @ (C::ResourceExhausted(_)
        | C::DeadlineExceeded(_)
        | C::OutcomeUnknown(_)
        | C::HandlerLost(_)
        | C::Unavailable(_)
        | C::NotOwner { .. }) => D::Unavailable(e.to_string()),
    }
}

/// Mirrors `/readyz` into grpc.health.v1 (overall and for leasehold.v1.Entities).
async fn report_health(
    coord: Coord,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let status = if coord.readiness().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health
                .set_service_status("leasehold.v1.Entities", status)
                .await;
            last = Some(status);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
