//! `leasehold serve`: build the instance, run it, shut it down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leasehold_coord::{Coord, CoordOptions, NoListener, ShardListener};
use leasehold_metrics::Registry;
use leasehold_proto::v1::{
    admin_server::AdminServer, entities_server::EntitiesServer, peer_server::PeerServer,
};
use leasehold_router::{
    EchoHandler, EntitiesService, GrpcHandler, Handler, PeerService, Router, RouterOptions,
};
use leasehold_types::MemberId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::{self, AdminService};
use crate::config::{ConfigError, HandlerSpec, ServeOptions};

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

/// The two listeners of an instance, bound before the runtime work starts so that tests
/// and callers can use port 0.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
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
        let grpc = bind("listen", config.listen).await?;
        let admin = bind("admin_listen", config.admin_listen).await?;
        Ok(Self { grpc, admin })
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

/// Runs an instance until `shutdown` resolves, then leaves the cluster gracefully:
/// not ready → drain shards → stop servers → revoke the lease.
pub async fn serve(
    config: ServeOptions,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let registry = Registry::new();
    let grpc_bound = listeners.grpc.local_addr()?;
    let admin_bound = listeners.admin.local_addr()?;
    let address = advertised(&config.advertise, grpc_bound, "advertise");
    let admin_address = advertised(&config.admin_advertise, admin_bound, "admin_advertise");
    let member = MemberId::new(config.id.clone());
    let max_message = config.max_payload.bytes() + (1 << 20);

    let (handler, listener): (Arc<dyn Handler>, Arc<dyn ShardListener>) = match &config.handler {
        HandlerSpec::Echo => (Arc::new(EchoHandler), Arc::new(NoListener)),
        spec @ HandlerSpec::Grpc { .. } => {
            let url = spec.url().expect("a gRPC handler has a URL");
            let h = Arc::new(GrpcHandler::new(&url, max_message, member.clone())?);
            (h.clone(), h)
        }
    };
    let coord = Coord::new(
        CoordOptions {
            cluster: config.cluster.clone(),
            member_id: member.clone(),
            address: address.clone(),
            admin_address: admin_address.clone(),
            etcd_endpoints: config.etcd.0.clone(),
            etcd_user: config
                .etcd_credentials()?
                .map(|(user, password)| (user, password.expose().to_owned())),
            shard_count: config.shards,
            lease_ttl: config.lease_ttl,
            max_moves: config.max_moves,
            version: env!("CARGO_PKG_VERSION").into(),
        },
        listener,
        &registry,
    );
    let router = Router::new(
        coord.clone(),
        handler.clone(),
        RouterOptions {
            max_payload: config.max_payload.bytes(),
            request_timeout: config.request_timeout,
            max_concurrency: config.max_concurrency,
            mailbox_capacity: config.mailbox_capacity,
        },
        &registry,
    );
    tracing::info!(member = %member, cluster = %config.cluster, grpc = %grpc_bound, admin = %admin_bound, advertise = %address, shards = config.shards, "starting");

    // Kafka sources dispatch through the same call path as gRPC calls.
    let kafka_cancel = CancellationToken::new();
    let mut kafka_tasks = tokio::task::JoinSet::new();
    for source in config.kafka_sources()? {
        let dispatcher = Arc::new(RouterDispatch {
            router: router.clone(),
        });
        let ingest = leasehold_kafka::Ingest::new(source.clone(), dispatcher, &registry);
        let cancel = kafka_cancel.clone();
        let name = source.name.clone();
        let span = tracing::info_span!("kafka_source", source = %name);
        kafka_tasks.spawn(tracing::Instrument::instrument(
            async move {
                match ingest.run(cancel.clone()).await {
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

    let coord_cancel = CancellationToken::new();
    let servers_stop = CancellationToken::new();
    let mut coord_task = tokio::spawn(coord.clone().run(
        coord_cancel.clone(),
        Box::pin(handler_ready(handler.clone())),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(coord.clone(), health, servers_stop.clone()));
    let grpc = grpc_server(router.clone(), coord.clone(), max_message, health_service)?;
    let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
    let grpc_task = tokio::spawn({
        let stop = servers_stop.clone();
        async move {
            grpc.serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        }
    });
    let admin_routes = admin::http_routes(router.clone(), registry.clone());
    let admin_task = tokio::spawn({
        let stop = servers_stop.clone();
        async move {
            axum::serve(listeners.admin, admin_routes)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });

    // An essential task that ends ends the process with an error: an instance without
    // its coordination or one of its Kafka sources would stay up and do nothing.
    let mut fatal = None;
    tokio::select! {
        _ = shutdown => {}
        r = &mut coord_task => {
            servers_stop.cancel();
            kafka_cancel.cancel();
            return match r {
                Ok(Ok(())) => Err(ServeError::CoordStopped),
                Ok(Err(e)) => Err(e.into()),
                Err(source) => Err(ServeError::Panicked { task: "coordination", source }),
            };
        }
        Some(r) = kafka_tasks.join_next() => {
            let e = match r {
                Ok(Ok(())) => ServeError::KafkaStopped("(cancelled)".into()),
                Ok(Err(e)) => e,
                Err(source) => ServeError::Panicked { task: "kafka source", source },
            };
            tracing::error!(error = %e, "kafka source ended; shutting down");
            fatal = Some(e);
        }
    }

    // Stop intake first: Kafka sources stop fetching, finish or abandon in-flight
    // messages and commit their watermarks while every shard is still served.
    kafka_cancel.cancel();
    while let Some(r) = kafka_tasks.join_next().await {
        if let Ok(Err(e)) = r {
            tracing::error!(error = %e, "kafka source failed while stopping");
        }
    }
    tracing::info!(timeout = ?config.drain_timeout, "shutting down: draining shards");
    let started = std::time::Instant::now();
    coord.drain(config.drain_timeout).await;
    tracing::info!(took = ?started.elapsed(), "drained; stopping servers");
    // Peers' Dispatch streams into this instance are long-lived: stop reading them (and
    // end ours) so that the servers' graceful stop does not wait for them.
    router.close();
    servers_stop.cancel();
    let stop_grace = Duration::from_secs(5);
    if tokio::time::timeout(stop_grace, async {
        let _ = grpc_task.await;
        let _ = admin_task.await;
        let _ = health_task.await;
    })
    .await
    .is_err()
    {
        tracing::warn!("servers did not stop within {stop_grace:?}");
    }
    // Calls whose callers left and handoffs still hold shards: the lease must outlive them.
    coord.tasks().close();
    let grace = config.request_timeout + Duration::from_secs(1);
    if tokio::time::timeout(grace, async {
        router.tasks().wait().await;
        coord.tasks().wait().await;
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = router.tasks().len() + coord.tasks().len(),
            "background work still running after {grace:?}; abandoned"
        );
    }
    coord_cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), coord_task).await;
    coord.revoke().await;
    tracing::info!("stopped");
    fatal.map_or(Ok(()), Err)
}

/// Runs Kafka messages through the call path: the key's owner runs the handler.
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

struct RouterDispatch {
    router: Router,
}

impl leasehold_kafka::Dispatcher for RouterDispatch {
    fn dispatch(
        &self,
        call: leasehold_kafka::KafkaCall,
    ) -> futures::future::BoxFuture<'static, Result<(), leasehold_kafka::DispatchError>> {
        let router = self.router.clone();
        Box::pin(async move {
            let deadline = router.deadline(None);
            let source = leasehold_router::CallSource::Kafka(leasehold_router::KafkaRecord {
                group: call.group,
                topic: call.topic,
                partition: call.partition,
                offset: call.offset,
                fence: call.fence,
            });
            router
                .call(call.key, call.payload, deadline, source)
                .await
                .map(|_| ())
                .map_err(dispatch_error)
        })
    }

    fn claim(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        generation: i32,
        force: bool,
    ) -> futures::future::BoxFuture<'static, Result<u64, leasehold_kafka::DispatchError>> {
        let coord = self.router.coord().clone();
        let partition = leasehold_coord::PartitionRef {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        };
        Box::pin(async move {
            use leasehold_kafka::DispatchError as D;
            let mode = if force {
                leasehold_coord::ClaimMode::Force
            } else {
                leasehold_coord::ClaimMode::Ordered
            };
            match coord.claim_partition(&partition, generation, mode).await {
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

/// Builds the gRPC server: every service on one port, configured in one place.
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
        e @ (C::ResourceExhausted(_)
        | C::DeadlineExceeded(_)
        | C::OutcomeUnknown(_)
        | C::Unavailable(_)
        | C::NotOwner { .. }) => D::Unavailable(e.to_string()),
    }
}

fn grpc_server(
    router: Router,
    coord: Coord,
    max_message: usize,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::transport::server::Router, ServeError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(leasehold_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(tonic::transport::Server::builder()
        // Detect dead peers and clients on idle connections.
        // A connection whose peer stops answering pings for 3 s is closed on this side.
        // Requests a partitioned peer buffered before the cut then die with the
        // connection instead of arriving, and running, when the network comes back —
        // long after their sender gave up and a Kafka partition moved on (the broker's
        // session timeout is at least 6 s).
        .http2_keepalive_interval(Some(Duration::from_secs(1)))
        .http2_keepalive_timeout(Some(Duration::from_secs(2)))
        // Client-facing calls; per-key queues bound memory (RESOURCE_EXHAUSTED when full).
        .add_service(
            EntitiesServer::new(EntitiesService::new(router.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        // The forwarding hop between instances.
        .add_service(
            PeerServer::new(PeerService::new(router))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        // Admin reads and drain.
        .add_service(AdminServer::new(AdminService { coord }))
        // grpc.health.v1 and server reflection for tooling.
        .add_service(health)
        .add_service(reflection))
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
