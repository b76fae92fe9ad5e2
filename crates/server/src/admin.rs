//! The admin plane on `--admin-listen`: HTTP JSON, and the same reads (and drain) over
//! gRPC. With an admin token, the requests it protects need `Authorization: Bearer`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use leasehold_coord::{Coord, MemberState, View};
use leasehold_metrics::Registry;
use leasehold_proto::v1 as pb;
use leasehold_router::Router;
use leasehold_tls::ConnInfo;
use leasehold_types::{MemberId, ShardId};
use serde::Serialize;

use crate::security::AdminAuthz;
use crate::status::Status;

#[derive(Debug, Serialize)]
pub struct ClusterInfo {
    pub cluster: String,
    /// The member id of the instance answering.
    #[serde(rename = "self")]
    pub self_id: String,
    pub shard_count: u32,
    pub leader: Option<String>,
    pub assignment_version: u64,
    pub members: usize,
    pub unowned_shards: usize,
    /// Placement is frozen (operator control).
    pub frozen: bool,
    /// Operator pins: shard → member.
    pub pins: std::collections::BTreeMap<u32, String>,
    /// One-shot moves not done yet: shard → member.
    pub moves: std::collections::BTreeMap<u32, String>,
    /// What the leader balances (`count` or `load`; this instance's setting).
    pub balance: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ShardInfo {
    pub shard: u32,
    pub owner: Option<String>,
    pub address: Option<String>,
    pub epoch: u64,
    /// `owned`, `moving` or `unowned`.
    pub state: &'static str,
    pub assigned_to: Option<String>,
    /// Latest reported load (absent: never reported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadInfo>,
}

/// Load as owners report it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LoadInfo {
    /// Handler calls per second.
    pub calls_per_second: f64,
    /// Handler busy time, seconds per second.
    pub busy: f64,
}

impl LoadInfo {
    fn of(l: &leasehold_coord::ShardLoad) -> Option<Self> {
        (l.revision > 0).then_some(Self {
            calls_per_second: l.calls,
            busy: l.busy,
        })
    }

    fn add(&mut self, other: Self) {
        self.calls_per_second += other.calls_per_second;
        self.busy += other.busy;
    }

    fn rounded(self) -> Self {
        Self {
            calls_per_second: (self.calls_per_second * 1e3).round() / 1e3,
            busy: (self.busy * 1e6).round() / 1e6,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MemberInfo {
    pub id: String,
    pub address: String,
    pub admin_address: String,
    pub state: &'static str,
    pub shards: usize,
    /// Sum of the reported loads of the shards it owns.
    pub load: LoadInfo,
}

pub fn cluster_info(coord: &Coord) -> ClusterInfo {
    let view = coord.view();
    ClusterInfo {
        cluster: coord.options().cluster.clone(),
        self_id: coord.member_id().0.clone(),
        shard_count: view.shard_count(),
        leader: view.leader.as_ref().map(|l| l.0.clone()),
        assignment_version: view.assignment_version,
        members: view.members.len(),
        unowned_shards: view.unowned(),
        frozen: view.placement.frozen,
        pins: view
            .placement
            .pins
            .iter()
            .map(|(s, m)| (*s, m.0.clone()))
            .collect(),
        moves: view
            .placement
            .moves
            .iter()
            .map(|(s, m)| (*s, m.0.clone()))
            .collect(),
        balance: if coord.options().load_tolerance.is_some() {
            "load"
        } else {
            "count"
        },
    }
}

fn shard_info(view: &View, shard: ShardId) -> ShardInfo {
    let owner = view.owner(shard);
    let assigned = view.assigned(shard);
    let state = match owner {
        None => "unowned",
        Some(o) if assigned.is_some_and(|a| *a != o.owner) => "moving",
        Some(_) => "owned",
    };
    ShardInfo {
        shard: shard.0,
        owner: owner.map(|o| o.owner.0.clone()),
        address: owner.map(|o| o.address.clone()),
        epoch: owner.map_or(0, |o| o.epoch.0),
        state,
        assigned_to: assigned.map(|a| a.0.clone()),
        load: view.loads.get(shard.0 as usize).and_then(LoadInfo::of),
    }
}

pub fn shards(coord: &Coord) -> Vec<ShardInfo> {
    // One snapshot of the routing table for the whole list.
    let view = coord.view();
    (0..view.shard_count())
        .map(|s| shard_info(&view, ShardId(s)))
        .collect()
}

pub fn members(coord: &Coord) -> Vec<MemberInfo> {
    let view = coord.view();
    let mut loads: std::collections::HashMap<&MemberId, LoadInfo> = Default::default();
    for (owner, load) in view.shards.iter().zip(view.loads.iter()) {
        if let (Some(o), Some(l)) = (owner, LoadInfo::of(load)) {
            loads.entry(&o.owner).or_default().add(l);
        }
    }
    view.members
        .values()
        .map(|m| MemberInfo {
            id: m.id.0.clone(),
            address: m.address.clone(),
            admin_address: m.admin_address.clone(),
            state: m.state.as_str(),
            shards: view.owned_by(&m.id),
            load: loads.get(&m.id).copied().unwrap_or_default().rounded(),
        })
        .collect()
}

#[derive(Clone)]
struct AppState {
    router: Router,
    registry: Registry,
    status: Arc<Status>,
}

/// Refuses admin HTTP requests the token protects (401 with JSON, and nothing changes).
/// The kubelet's probes stay open: they carry no token.
async fn require_token(
    State(auth): State<Arc<AdminAuthz>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let host = crate::security::request_host(request.headers(), request.uri());
    if crate::security::misaddressed(request.extensions().get::<ConnInfo>(), host) {
        tracing::warn!(
            path,
            host,
            "admin request addressed to another host refused"
        );
        return error(
            StatusCode::FORBIDDEN,
            crate::security::misaddressed_refusal(host),
        );
    }
    // Probes, and the status page itself (its data endpoints ask for the token).
    if path == "/healthz" || path == "/readyz" || path == "/" {
        return next.run(request).await;
    }
    let mutation = !matches!(*request.method(), Method::GET | Method::HEAD);
    if mutation
        && crate::security::from_another_site(
            request.headers(),
            request.uri().authority().map(|a| a.as_str()),
        )
    {
        tracing::warn!(path, method = %request.method(), "admin request from another site's page refused");
        return error(
            StatusCode::FORBIDDEN,
            "admin changes are not taken from another site's page (its Origin or Sec-Fetch-Site says so); use the CLI, curl or the status page",
        );
    }
    // Hot keys are the application's own keys (account ids, addresses): protected by the
    // token as changes are, whatever it protects.
    let protected = mutation || path == "/v1/hot-keys";
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.check(authorization, protected) {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            tracing::warn!(path, method = %request.method(), reason = %denied, "admin request refused");
            let mut response = error(StatusCode::UNAUTHORIZED, denied.to_string());
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// The same check for the Admin gRPC service (`UNAUTHENTICATED`).
fn authorize<T>(
    auth: &AdminAuthz,
    request: &tonic::Request<T>,
    mutation: bool,
) -> Result<(), tonic::Status> {
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    auth.check(authorization, mutation)
        .map_err(|denied| tonic::Status::unauthenticated(denied.to_string()))
}

/// The largest Admin gRPC request read (its requests are a few names and numbers).
/// Reading happens before a method checks a mutation's token, so this also bounds what a
/// caller without one makes an instance buffer.
pub const MAX_GRPC_REQUEST: usize = 64 * 1024;

/// Concurrent HTTP/2 streams per admin connection: the same reason (an operator's tool or
/// status page needs a few).
pub const MAX_STREAMS: u32 = 32;

/// The Admin gRPC service, checking the content type (see
/// [`crate::security::grpc_content_type`]), the host an HTTP/1 request names (see
/// [`crate::security::misaddressed`]; a browser's requests are HTTP/1 here) and the
/// token a read needs from the request's headers before its body is read; each method
/// checks a mutation's token as well.
pub fn grpc_service(
    service: AdminService,
) -> tonic::service::interceptor::InterceptedService<
    pb::admin_server::AdminServer<AdminService>,
    impl tonic::service::Interceptor + Clone,
> {
    let auth = service.auth.clone();
    let server =
        pb::admin_server::AdminServer::new(service).max_decoding_message_size(MAX_GRPC_REQUEST);
    tonic::service::interceptor::InterceptedService::new(
        server,
        move |request: tonic::Request<()>| {
            crate::security::grpc_content_type(&request)?;
            let host = request
                .metadata()
                .get("host")
                .map(|h| h.to_str().unwrap_or(crate::security::NOT_ASCII));
            if crate::security::misaddressed(request.extensions().get::<ConnInfo>(), host) {
                return Err(tonic::Status::permission_denied(
                    crate::security::misaddressed_refusal(host),
                ));
            }
            authorize(&auth, &request, false).map(|()| request)
        },
    )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.into(), "status": status.as_u16() })),
    )
        .into_response()
}

/// The admin HTTP routes.
pub fn http_routes(
    router: Router,
    registry: Registry,
    status: Arc<Status>,
    auth: Arc<AdminAuthz>,
) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/v1/instance", get(get_instance))
        .route("/v1/moves", get(get_moves))
        .route("/v1/kafka", get(get_kafka))
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/shards", get(get_shards))
        .route("/v1/shards/{shard}", get(get_shard))
        .route("/v1/members", get(get_members))
        .route("/v1/members/{id}/drain", post(drain))
        .route("/v1/placement", get(get_placement))
        .route("/v1/hot-keys", get(get_hot_keys))
        .route("/v1/shards/{shard}/pin", post(pin).delete(unpin))
        .route("/v1/shards/{shard}/move", post(move_shard))
        .route("/v1/kafka/{source}", get(get_kafka_source))
        .route("/v1/kafka/{source}/switch", post(switch_kafka_source))
        .route("/v1/cluster/freeze", post(freeze))
        .route("/v1/cluster/unfreeze", post(unfreeze))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin endpoint; see / (status page), /v1/cluster, /v1/shards, /v1/members, /v1/placement, /v1/hot-keys, /v1/instance, /v1/moves, /v1/kafka, /healthz, /readyz, /metrics") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint") })
        .with_state(Arc::new(AppState {
            router,
            registry,
            status,
        }))
        .layer(axum::middleware::from_fn_with_state(auth, require_token))
}

/// The status page: no external assets, so a strict policy holds.
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
                 base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::status::PAGE,
    )
        .into_response()
}

/// This instance: what only it knows (its lease, its readiness).
async fn get_instance(State(s): State<Arc<AppState>>) -> Response {
    let coord = s.router.coord();
    let ready = coord.readiness();
    Json(serde_json::json!({
        "id": coord.member_id().0,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": ready.is_ok(),
        "reason": ready.err().map(|r| r.to_string()),
        "lease_slack_seconds": coord.table().lease().slack(),
        "shards_owned": coord.table().held().len(),
    }))
    .into_response()
}

async fn get_moves(State(s): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({ "moves": s.status.moves() })).into_response()
}

async fn get_kafka(State(s): State<Arc<AppState>>) -> Response {
    let view = s.router.coord().view();
    let sources: Vec<serde_json::Value> = s
        .status
        .kafka()
        .into_iter()
        .map(|source| {
            let mut json = serde_json::to_value(&source).unwrap_or_default();
            if s.status.failover(&source.name).is_some() {
                let (side, _) = view.kafka_side(&source.name);
                json["failover"] = serde_json::json!({
                    "active": side.active.as_str(),
                    "reason": side.reason,
                    "manual": side.manual,
                });
            }
            json
        })
        .collect();
    Json(serde_json::json!({ "sources": sources })).into_response()
}

/// A source with a standby cluster as the admin APIs show it.
struct KafkaSourceView {
    name: String,
    source: leasehold_kafka::SourceOptions,
    failover: leasehold_kafka::FailoverOptions,
    side: leasehold_coord::KafkaSideValue,
    /// The side record's revision; 0 before the first switch.
    revision: i64,
    /// Each member's view of the primary.
    health: Vec<(MemberId, leasehold_coord::KafkaHealthValue)>,
}

impl KafkaSourceView {
    fn reason(&self) -> String {
        if self.revision == 0 {
            "no switch yet: the primary is read".to_owned()
        } else {
            self.side.reason.clone()
        }
    }

    fn to_pb(&self) -> pb::KafkaFailover {
        pb::KafkaFailover {
            name: self.name.clone(),
            group: self.source.group.clone(),
            active: self.side.active.as_str().into(),
            since_ms: self.side.since_ms,
            reason: self.reason(),
            manual: self.side.manual,
            position_ms: self.side.position_ms.unwrap_or(0),
            revision: self.revision,
            health: self
                .health
                .iter()
                .map(|(member, h)| pb::KafkaPrimaryHealth {
                    member: member.0.clone(),
                    primary_ok: h.primary_ok,
                    since_ms: h.since_ms,
                    error: h.error.clone(),
                    first_unfinished: h
                        .first_unfinished_ms
                        .iter()
                        .flat_map(|(topic, parts)| {
                            parts.iter().map(|(p, t)| pb::PartitionTime {
                                topic: topic.clone(),
                                partition: *p,
                                time_ms: *t,
                            })
                        })
                        .collect(),
                    reading_standby: h.reading_standby != 0,
                })
                .collect(),
        }
    }
}

/// The options of source `name` if it has a standby cluster; else what to tell the caller.
fn failover_source(status: &Status, name: &str) -> Result<leasehold_kafka::SourceOptions, String> {
    status.failover(name).ok_or_else(|| {
        format!(
            "no Kafka source {name:?} with a standby cluster; sources with one: {:?}",
            status.failover_names()
        )
    })
}

/// The source `name` if it has a standby cluster; else what to tell the caller.
fn kafka_source(status: &Status, coord: &Coord, name: &str) -> Result<KafkaSourceView, String> {
    let source = failover_source(status, name)?;
    let view = coord.view();
    let (side, revision) = view.kafka_side(name);
    let health = view
        .kafka_health
        .iter()
        .filter(|((src, _), _)| src == name)
        .map(|((_, member), h)| (member.clone(), h.clone()))
        .collect();
    let failover = source.failover.clone().expect("a failover source");
    Ok(KafkaSourceView {
        name: name.to_owned(),
        source,
        failover,
        side,
        revision,
        health,
    })
}

/// Why an operator's switch was not made.
enum SwitchRefused {
    NotFound(String),
    BadRequest(String),
    /// The side changed meanwhile.
    Conflict(String),
    Unavailable(String),
}

/// An operator forces `to` ("primary" or "standby"; automatic switching then leaves it
/// alone) or hands the choice back ("auto").
async fn switch_kafka(
    status: &Status,
    coord: &Coord,
    name: &str,
    to: &str,
) -> Result<(leasehold_coord::KafkaSideValue, i64), SwitchRefused> {
    use leasehold_coord::{KafkaSide, KafkaSideValue};
    let source = failover_source(status, name).map_err(SwitchRefused::NotFound)?;
    let (current, revision) = coord.view().kafka_side(name);
    let value = match to {
        "primary" | "standby" => KafkaSideValue {
            active: if to == "primary" {
                KafkaSide::Primary
            } else {
                KafkaSide::Standby
            },
            since_ms: crate::failover::now_ms(),
            reason: format!("switched to the {to} by an operator"),
            manual: true,
            position_ms: None,
            // Counted by the switch.
            epoch: 0,
        },
        "auto" => KafkaSideValue {
            manual: false,
            reason: "handed back to automatic failover by an operator".into(),
            ..current.clone()
        },
        other => {
            return Err(SwitchRefused::BadRequest(format!(
                "the side to switch to is {other:?}; use primary, standby or auto"
            )))
        }
    };
    // Already there: only the manual flag and reason change (no repositioning).
    let value = if to != "auto" && value.active == current.active && revision != 0 {
        KafkaSideValue {
            manual: true,
            reason: value.reason,
            ..current
        }
    } else {
        value
    };
    use crate::failover::SwitchError;
    let remembered = status
        .remembered(&source.name)
        .map(|r| r.all())
        .unwrap_or_default();
    crate::failover::switch(coord, &source, value, revision, false, &remembered)
        .await
        .map_err(|e| match e {
            SwitchError::Conflict => SwitchRefused::Conflict(e.to_string()),
            SwitchError::Failed(_) => SwitchRefused::Unavailable(e.to_string()),
        })
}

/// `GET /v1/kafka/{source}`: the side a source with a standby cluster reads, why, and
/// what each member sees of the primary.
async fn get_kafka_source(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let v = match kafka_source(&s.status, s.router.coord(), &name) {
        Ok(v) => v,
        Err(why) => return error(StatusCode::NOT_FOUND, why),
    };
    let health: Vec<serde_json::Value> = v
        .health
        .iter()
        .map(|(member, h)| {
            serde_json::json!({
                "member": member.0,
                "primary_ok": h.primary_ok,
                "since_ms": h.since_ms,
                "error": h.error,
                "first_unfinished_ms": h.first_unfinished_ms,
                "reading_standby": h.reading_standby != 0,
            })
        })
        .collect();
    let (source, failover) = (&v.source, &v.failover);
    Json(serde_json::json!({
        "name": v.name,
        "group": source.group,
        "active": v.side.active.as_str(),
        "since_ms": v.side.since_ms,
        "reason": v.reason(),
        "manual": v.side.manual,
        "position_ms": v.side.position_ms,
        "revision": v.revision,
        "primary": {"brokers": source.brokers, "topics": source.topics},
        "standby": {"brokers": failover.brokers, "topics": failover.topics},
        "policy": {
            "down_after_seconds": failover.down_after.as_secs_f64(),
            "fail_back_after_seconds": failover.fail_back_after.as_secs_f64(),
            "auto_fail_back": failover.auto_fail_back,
            "probe_interval_seconds": failover.probe_interval.as_secs_f64(),
            "overlap_seconds": failover.overlap.as_secs_f64(),
        },
        "health": health,
    }))
    .into_response()
}

#[derive(serde::Deserialize)]
struct SwitchRequest {
    to: String,
}

/// `POST /v1/kafka/{source}/switch {"to": "primary" | "standby" | "auto"}`: an operator
/// forces a side (automatic switching then leaves it alone) or hands the choice back.
async fn switch_kafka_source(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Json<SwitchRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if s.status.failover(&name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no Kafka source {name:?} with a standby cluster"),
        );
    }
    let Ok(Json(request)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            r#"the body must be JSON like {"to": "standby"} (primary, standby or auto)"#,
        );
    };
    match switch_kafka(&s.status, s.router.coord(), &name, &request.to).await {
        Ok((v, _)) => Json(serde_json::json!({
            "name": name,
            "active": v.active.as_str(),
            "manual": v.manual,
            "reason": v.reason,
            "position_ms": v.position_ms,
        }))
        .into_response(),
        Err(SwitchRefused::NotFound(why)) => error(StatusCode::NOT_FOUND, why),
        Err(SwitchRefused::BadRequest(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(SwitchRefused::Conflict(why)) => error(StatusCode::CONFLICT, why),
        Err(SwitchRefused::Unavailable(why)) => error(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn get_cluster(State(s): State<Arc<AppState>>) -> Response {
    Json(cluster_info(s.router.coord())).into_response()
}

async fn get_shards(State(s): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({ "shards": shards(s.router.coord()) })).into_response()
}

async fn get_shard(State(s): State<Arc<AppState>>, Path(shard): Path<String>) -> Response {
    let count = s.router.coord().options().shard_count;
    match shard.parse::<u32>() {
        Ok(n) if n < count => {
            Json(shard_info(&s.router.coord().view(), ShardId(n))).into_response()
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("shard {shard:?} does not exist; shards are 0..{count}"),
        ),
    }
}

async fn get_members(State(s): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({ "members": members(s.router.coord()) })).into_response()
}

async fn drain(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    match s.router.coord().drain_member(&MemberId(id.clone())).await {
        Ok(m) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "id": m.id.0,
                "state": MemberState::Draining.as_str(),
                "address": m.address,
                "admin_address": m.admin_address,
            })),
        )
            .into_response(),
        Err(leasehold_coord::Error::UnknownMember(_)) => error(
            StatusCode::NOT_FOUND,
            format!("member {id:?} is not registered"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not drain {id:?}: {e}"),
        ),
    }
}

/// Pins, moves and the freeze as JSON:
/// `{"frozen": false, "pins": {"12": "n1"}, "moves": {"40": "n2"}}`.
fn placement_json(p: &leasehold_coord::PlacementValue) -> serde_json::Value {
    let map = |m: &std::collections::BTreeMap<u32, MemberId>| {
        m.iter()
            .map(|(s, m)| (s.to_string(), serde_json::Value::from(m.0.clone())))
            .collect::<serde_json::Map<_, _>>()
    };
    serde_json::json!({
        "frozen": p.frozen,
        "pins": map(&p.pins),
        "moves": map(&p.moves),
    })
}

/// The keys taking the most calls at this instance (as their owner).
async fn get_hot_keys(State(s): State<Arc<AppState>>) -> Response {
    let keys: Vec<serde_json::Value> = s
        .router
        .hot_keys()
        .into_iter()
        .map(|k| {
            serde_json::json!({
                "key": k.key,
                "shard": k.shard,
                "calls_per_second": (k.calls_per_second * 10.0).round() / 10.0,
            })
        })
        .collect();
    Json(serde_json::json!({
        "member": s.router.coord().member_id().0,
        "window_seconds": leasehold_router::hot::PERIOD.as_secs() * 2,
        "sampled_every": leasehold_router::hot::SAMPLE_EVERY,
        "keys": keys,
    }))
    .into_response()
}

async fn get_placement(State(s): State<Arc<AppState>>) -> Response {
    Json(placement_json(&s.router.coord().view().placement)).into_response()
}

/// A placement change's answer: the controls now, or why it was refused.
fn placement_answer(
    result: Result<leasehold_coord::PlacementValue, leasehold_coord::Error>,
) -> Response {
    use leasehold_coord::Error as E;
    match result {
        Ok(p) => Json(placement_json(&p)).into_response(),
        Err(E::UnknownMember(m)) => error(
            StatusCode::BAD_REQUEST,
            format!("member {m:?} is not registered; see /v1/members"),
        ),
        Err(E::Refused(why)) if why.contains("out of range") => error(StatusCode::NOT_FOUND, why),
        Err(E::Refused(why)) => error(StatusCode::CONFLICT, why),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not change placement: {e}"),
        ),
    }
}

/// The shard a path names, or the 404 to answer.
fn parse_shard(shard: &str, count: u32) -> Result<ShardId, Box<Response>> {
    match shard.parse::<u32>() {
        Ok(n) if n < count => Ok(ShardId(n)),
        _ => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("shard {shard:?} does not exist; shards are 0..{count}"),
        ))),
    }
}

#[derive(serde::Deserialize)]
struct PinRequest {
    to: String,
}

/// The shard a path names and the member a `{"to": member}` body names, or the answer
/// that refuses them.
fn shard_and_member(
    coord: &Coord,
    shard: &str,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(ShardId, MemberId), Box<Response>> {
    let shard = parse_shard(shard, coord.options().shard_count)?;
    let Ok(Json(request)) = body else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            r#"the body must be JSON like {"to": "member-id"}"#,
        )));
    };
    Ok((shard, MemberId(request.to)))
}

/// `POST /v1/shards/{n}/pin {"to": member}`: the shard lives on that member until unpinned
/// (moved there through a planned handoff).
async fn pin(
    State(s): State<Arc<AppState>>,
    Path(shard): Path<String>,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let coord = s.router.coord();
    match shard_and_member(coord, &shard, body) {
        Ok((shard, member)) => placement_answer(coord.pin(shard, Some(member)).await),
        Err(r) => *r,
    }
}

/// `POST /v1/shards/{n}/move {"to": member}`: moves the shard there once (a planned
/// handoff); afterwards it is balanced like any other shard.
async fn move_shard(
    State(s): State<Arc<AppState>>,
    Path(shard): Path<String>,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let coord = s.router.coord();
    match shard_and_member(coord, &shard, body) {
        Ok((shard, member)) => placement_answer(coord.move_shard(shard, member).await),
        Err(r) => *r,
    }
}

async fn unpin(State(s): State<Arc<AppState>>, Path(shard): Path<String>) -> Response {
    let coord = s.router.coord();
    match parse_shard(&shard, coord.options().shard_count) {
        Ok(shard) => placement_answer(coord.pin(shard, None).await),
        Err(r) => *r,
    }
}

async fn freeze(State(s): State<Arc<AppState>>) -> Response {
    placement_answer(s.router.coord().freeze(true).await)
}

async fn unfreeze(State(s): State<Arc<AppState>>) -> Response {
    placement_answer(s.router.coord().freeze(false).await)
}

/// Live while the coordination tasks run and make progress (Kubernetes restarts the pod
/// otherwise); an instance waiting for etcd is live.
async fn healthz(State(s): State<Arc<AppState>>) -> Response {
    match s.router.coord().liveness() {
        Ok(()) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "failing", "reason": reason.to_string() })),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    match s.router.coord().readiness() {
        Ok(()) => Json(serde_json::json!({ "ready": true })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reason": reason.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.router.coord().refresh_metrics();
    s.router.refresh_metrics();
    (
        [(header::CONTENT_TYPE, leasehold_metrics::CONTENT_TYPE)],
        s.registry.render(),
    )
        .into_response()
}

/// `leasehold.v1.Admin`.
pub struct AdminService {
    pub coord: Coord,
    pub auth: Arc<AdminAuthz>,
    /// Kafka sources, for the failover controls.
    pub status: Arc<Status>,
}

fn member_pb(m: MemberInfo) -> pb::MemberInfo {
    pb::MemberInfo {
        id: m.id,
        address: m.address,
        admin_address: m.admin_address,
        state: m.state.into(),
        shards: m.shards as u32,
        calls_per_second: m.load.calls_per_second,
        busy: m.load.busy,
    }
}

/// A placement change's gRPC answer.
fn placement_grpc(
    result: Result<leasehold_coord::PlacementValue, leasehold_coord::Error>,
) -> Result<tonic::Response<pb::Placement>, tonic::Status> {
    use leasehold_coord::Error as E;
    match result {
        Ok(p) => Ok(tonic::Response::new(pb::Placement {
            frozen: p.frozen,
            pins: p.pins.into_iter().map(|(s, m)| (s, m.0)).collect(),
            moves: p.moves.into_iter().map(|(s, m)| (s, m.0)).collect(),
        })),
        Err(E::UnknownMember(m)) => Err(tonic::Status::invalid_argument(format!(
            "member {m:?} is not registered"
        ))),
        Err(E::Refused(why)) if why.contains("out of range") => {
            Err(tonic::Status::out_of_range(why))
        }
        Err(E::Refused(why)) => Err(tonic::Status::failed_precondition(why)),
        Err(e) => Err(tonic::Status::unavailable(format!(
            "could not change placement: {e}"
        ))),
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_cluster(
        &self,
        request: tonic::Request<pb::GetClusterRequest>,
    ) -> Result<tonic::Response<pb::ClusterInfo>, tonic::Status> {
        authorize(&self.auth, &request, false)?;
        let c = cluster_info(&self.coord);
        Ok(tonic::Response::new(pb::ClusterInfo {
            cluster: c.cluster,
            shard_count: c.shard_count,
            leader: c.leader.unwrap_or_default(),
            assignment_version: c.assignment_version,
            members: c.members as u32,
            unowned_shards: c.unowned_shards as u32,
            frozen: c.frozen,
            pins: c.pins.into_iter().collect(),
            balance: c.balance.into(),
            moves: c.moves.into_iter().collect(),
        }))
    }

    async fn r#move(
        &self,
        request: tonic::Request<pb::MoveRequest>,
    ) -> Result<tonic::Response<pb::Placement>, tonic::Status> {
        authorize(&self.auth, &request, true)?;
        let r = request.into_inner();
        if r.member.is_empty() {
            return Err(tonic::Status::invalid_argument("member must not be empty"));
        }
        placement_grpc(
            self.coord
                .move_shard(ShardId(r.shard), MemberId(r.member))
                .await,
        )
    }

    async fn pin(
        &self,
        request: tonic::Request<pb::PinRequest>,
    ) -> Result<tonic::Response<pb::Placement>, tonic::Status> {
        authorize(&self.auth, &request, true)?;
        let r = request.into_inner();
        let member = (!r.member.is_empty()).then_some(MemberId(r.member));
        placement_grpc(self.coord.pin(ShardId(r.shard), member).await)
    }

    async fn freeze(
        &self,
        request: tonic::Request<pb::FreezeRequest>,
    ) -> Result<tonic::Response<pb::Placement>, tonic::Status> {
        authorize(&self.auth, &request, true)?;
        placement_grpc(self.coord.freeze(request.into_inner().frozen).await)
    }

    async fn list_shards(
        &self,
        request: tonic::Request<pb::ListShardsRequest>,
    ) -> Result<tonic::Response<pb::ListShardsResponse>, tonic::Status> {
        authorize(&self.auth, &request, false)?;
        let shards = shards(&self.coord)
            .into_iter()
            .map(|s| pb::ShardInfo {
                shard: s.shard,
                owner: s.owner.unwrap_or_default(),
                address: s.address.unwrap_or_default(),
                epoch: s.epoch,
                state: s.state.into(),
                assigned_to: s.assigned_to.unwrap_or_default(),
                calls_per_second: s.load.map_or(0.0, |l| l.calls_per_second),
                busy: s.load.map_or(0.0, |l| l.busy),
            })
            .collect();
        Ok(tonic::Response::new(pb::ListShardsResponse { shards }))
    }

    async fn list_members(
        &self,
        request: tonic::Request<pb::ListMembersRequest>,
    ) -> Result<tonic::Response<pb::ListMembersResponse>, tonic::Status> {
        authorize(&self.auth, &request, false)?;
        let members = members(&self.coord).into_iter().map(member_pb).collect();
        Ok(tonic::Response::new(pb::ListMembersResponse { members }))
    }

    async fn drain(
        &self,
        request: tonic::Request<pb::DrainRequest>,
    ) -> Result<tonic::Response<pb::DrainResponse>, tonic::Status> {
        authorize(&self.auth, &request, true)?;
        let id = request.into_inner().member;
        if id.is_empty() {
            return Err(tonic::Status::invalid_argument("member must not be empty"));
        }
        match self.coord.drain_member(&MemberId(id.clone())).await {
            Ok(m) => Ok(tonic::Response::new(pb::DrainResponse {
                member: Some(pb::MemberInfo {
                    id: m.id.0.clone(),
                    address: m.address,
                    admin_address: m.admin_address,
                    state: "draining".into(),
                    shards: self.coord.view().owned_by(&m.id) as u32,
                    ..Default::default()
                }),
            })),
            Err(leasehold_coord::Error::UnknownMember(_)) => Err(tonic::Status::not_found(
                format!("member {id:?} is not registered"),
            )),
            Err(e) => Err(tonic::Status::unavailable(format!(
                "could not drain {id:?}: {e}"
            ))),
        }
    }

    async fn get_kafka_source(
        &self,
        request: tonic::Request<pb::GetKafkaSourceRequest>,
    ) -> Result<tonic::Response<pb::KafkaFailover>, tonic::Status> {
        authorize(&self.auth, &request, false)?;
        let name = request.into_inner().name;
        kafka_source(&self.status, &self.coord, &name)
            .map(|v| tonic::Response::new(v.to_pb()))
            .map_err(tonic::Status::not_found)
    }

    async fn switch_kafka_source(
        &self,
        request: tonic::Request<pb::SwitchKafkaSourceRequest>,
    ) -> Result<tonic::Response<pb::KafkaFailover>, tonic::Status> {
        authorize(&self.auth, &request, true)?;
        let r = request.into_inner();
        let to = match pb::KafkaSwitchTo::try_from(r.to) {
            Ok(pb::KafkaSwitchTo::Primary) => "primary",
            Ok(pb::KafkaSwitchTo::Standby) => "standby",
            Ok(pb::KafkaSwitchTo::Auto) => "auto",
            _ => {
                return Err(tonic::Status::invalid_argument(format!(
                    "to is {}; use KAFKA_SWITCH_TO_PRIMARY, KAFKA_SWITCH_TO_STANDBY or KAFKA_SWITCH_TO_AUTO",
                    r.to
                )))
            }
        };
        match switch_kafka(&self.status, &self.coord, &r.name, to).await {
            // The source with what was written (this instance's view may not have it yet).
            Ok((side, revision)) => {
                let mut v = kafka_source(&self.status, &self.coord, &r.name)
                    .map_err(tonic::Status::not_found)?;
                if v.revision < revision {
                    (v.side, v.revision) = (side, revision);
                }
                Ok(tonic::Response::new(v.to_pb()))
            }
            Err(SwitchRefused::NotFound(why)) => Err(tonic::Status::not_found(why)),
            Err(SwitchRefused::BadRequest(why)) => Err(tonic::Status::invalid_argument(why)),
            Err(SwitchRefused::Conflict(why)) => Err(tonic::Status::aborted(why)),
            Err(SwitchRefused::Unavailable(why)) => Err(tonic::Status::unavailable(why)),
        }
    }
}
