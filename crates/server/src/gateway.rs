//! The HTTP gateway on `--http-listen`: entities for clients that speak HTTP, not gRPC.
//!
//! `POST /v1/entities/{key}` runs the handler for `key` (body = payload; the answer's
//! body = the handler's payload) through the same call path as `Entities.Call`, and
//! `GET /v1/entities/{key}/location` answers like `Entities.Locate`. Errors are JSON with
//! the gRPC code, Leasehold's reason and whether a retry is safe, under the HTTP status
//! of [`http_status`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use leasehold_metrics::{Counter, Histogram, Registry};
use leasehold_router::{CallError, CallMetadata, CallSource, Router};
use leasehold_types::shard_for_key;
use tonic::Code;

/// Headers of a successful call: who ran it.
pub const SHARD_HEADER: &str = "leasehold-shard";
pub const EPOCH_HEADER: &str = "leasehold-epoch";
pub const OWNER_HEADER: &str = "leasehold-owner";
/// The call's deadline: a duration like `500ms` or `2s`.
pub const TIMEOUT_HEADER: &str = "leasehold-timeout";
/// The request's `Content-Type` reaches the handler under this metadata key (gRPC
/// reserves `content-type` for itself).
pub const CONTENT_TYPE_METADATA: &str = "leasehold-content-type";

/// The HTTP status for a gRPC code: the mapping Google's APIs and grpc-gateway use.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 Client Closed Request (nginx).
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Route labels of the gateway's metrics (a fixed set: paths never become labels).
const ROUTES: [&str; 3] = ["call", "locate", "other"];

struct Metrics {
    /// (route, status) → counter, created up front for every status this gateway sends.
    requests: Vec<((&'static str, u16), Arc<Counter>)>,
    duration: Vec<(&'static str, Arc<Histogram>)>,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let statuses = [
            200u16, 400, 401, 403, 404, 405, 409, 413, 429, 499, 500, 501, 503, 504,
        ];
        let mut requests = Vec::new();
        for route in ROUTES {
            for status in statuses {
                let code = status.to_string();
                requests.push((
                    (route, status),
                    registry.counter(
                        "leasehold_http_requests_total",
                        "HTTP gateway requests by route (call, locate, other) and status.",
                        &[("route", route), ("status", &code)],
                    ),
                ));
            }
        }
        let duration = ROUTES
            .iter()
            .map(|&route| {
                (
                    route,
                    registry.histogram(
                        "leasehold_http_request_duration_seconds",
                        "HTTP gateway request latency by route.",
                        &[("route", route)],
                    ),
                )
            })
            .collect();
        Self { requests, duration }
    }

    fn record(&self, route: &'static str, status: StatusCode, took: Duration) {
        if let Some((_, c)) = self
            .requests
            .iter()
            .find(|((r, s), _)| *r == route && *s == status.as_u16())
        {
            c.inc();
        }
        if let Some((_, h)) = self.duration.iter().find(|(r, _)| *r == route) {
            h.observe(took);
        }
    }
}

struct Gateway {
    router: Router,
    metrics: Metrics,
}

/// The gateway's routes; bodies above `max_payload` are refused with 413.
pub fn routes(router: Router, registry: &Registry) -> axum::Router {
    let limit = router.options().max_payload;
    let gateway = Arc::new(Gateway {
        router,
        metrics: Metrics::new(registry),
    });
    axum::Router::new()
        .route("/v1/entities/{key}", post(call))
        .route("/v1/entities/{key}/location", get(locate))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            refuse_other_sites,
        ))
        .with_state(gateway)
}

/// Refuses calls another site's page makes a browser send (a form needs no token or
/// preflight to post here), and requests a page on this machine addressed to its own name
/// (see [`crate::security::misaddressed`]): 403 with JSON, and nothing runs.
async fn refuse_other_sites(
    State(g): State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let authority = request.uri().authority().map(|a| a.as_str());
    let host = crate::security::request_host(request.headers(), request.uri());
    let conn = request.extensions().get::<leasehold_tls::ConnInfo>();
    let refused = if crate::security::misaddressed(conn, host) {
        tracing::warn!(
            path = request.uri().path(),
            host,
            "gateway request addressed to another host refused"
        );
        Some(crate::security::misaddressed_refusal(host))
    } else if request.method() != axum::http::Method::GET
        && crate::security::from_another_site(request.headers(), authority)
    {
        tracing::warn!(
            path = request.uri().path(),
            "gateway call from another site's page refused"
        );
        Some(
            "calls are not taken from another site's page (its Origin or Sec-Fetch-Site says so)"
                .to_owned(),
        )
    } else {
        None
    };
    if let Some(why) = refused {
        let r = plain_error(StatusCode::FORBIDDEN, why);
        let route = if request.uri().path().starts_with("/v1/entities/") {
            "call"
        } else {
            "other"
        };
        g.metrics.record(route, r.status(), started.elapsed());
        return r;
    }
    next.run(request).await
}

async fn not_found(State(g): State<Arc<Gateway>>) -> Response {
    let started = Instant::now();
    let r = plain_error(
        StatusCode::NOT_FOUND,
        "no such endpoint; the gateway serves POST /v1/entities/{key} and GET /v1/entities/{key}/location",
    );
    g.metrics.record("other", r.status(), started.elapsed());
    r
}

async fn method_not_allowed(State(g): State<Arc<Gateway>>) -> Response {
    let started = Instant::now();
    let r = plain_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: calls are POST /v1/entities/{key}, locations GET /v1/entities/{key}/location",
    );
    g.metrics.record("other", r.status(), started.elapsed());
    r
}

/// A JSON error that is not a call's (bad request, unknown path).
fn plain_error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => "NOT_FOUND",
        StatusCode::METHOD_NOT_ALLOWED => "UNIMPLEMENTED",
        StatusCode::PAYLOAD_TOO_LARGE => "RESOURCE_EXHAUSTED",
        StatusCode::FORBIDDEN => "PERMISSION_DENIED",
        _ => "INVALID_ARGUMENT",
    };
    (
        status,
        Json(serde_json::json!({
            "error": message.into(),
            "code": code,
            "status": status.as_u16(),
            "retryable": false,
        })),
    )
        .into_response()
}

/// A call's error as JSON: the gRPC code and message, and for Leasehold's own errors the
/// reason and whether the call certainly did not run (`retryable`).
fn call_error(e: CallError) -> Response {
    let (code, reason, retryable) = (e.code(), e.reason(), e.is_retryable());
    let message = match &e {
        CallError::Handler(s) => s.message().to_owned(),
        e => e.to_string(),
    };
    let status = http_status(code);
    let mut response = (
        status,
        Json(serde_json::json!({
            "error": message,
            "code": grpc_code_name(code),
            "reason": reason,
            "retryable": retryable,
            "status": status.as_u16(),
        })),
    )
        .into_response();
    if retryable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn grpc_code_name(code: Code) -> &'static str {
    crate::grpc_metrics::code_name(code)
}

/// `Leasehold-Timeout`: a positive duration like `500ms` or `2s`.
fn parse_timeout(value: &str) -> Option<Duration> {
    humantime::parse_duration(value)
        .ok()
        .filter(|d| !d.is_zero())
}

/// Trace context, the allow-listed metadata and the content type, for the handler.
fn metadata(headers: &HeaderMap, allowed: &[String]) -> CallMetadata {
    let grpc = tonic::metadata::MetadataMap::from_headers(headers.clone());
    let mut metadata = CallMetadata::from_grpc(&grpc, allowed);
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        metadata
            .0
            .push((CONTENT_TYPE_METADATA.to_owned(), ct.to_owned()));
        metadata = CallMetadata::sanitized(metadata.0);
    }
    metadata
}

async fn call(
    State(g): State<Arc<Gateway>>,
    key: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let response = match (key, body) {
        (Err(e), _) => plain_error(
            StatusCode::BAD_REQUEST,
            format!("the key: {}", e.body_text()),
        ),
        (Ok(Path(key)), Ok(body)) => run_call(&g.router, key, headers, body).await,
        (_, Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => plain_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the payload is larger than max_payload ({} bytes)",
                g.router.options().max_payload
            ),
        ),
        (_, Err(e)) => plain_error(e.status(), e.body_text()),
    };
    g.metrics
        .record("call", response.status(), started.elapsed());
    response
}

async fn run_call(router: &Router, key: String, headers: HeaderMap, body: Bytes) -> Response {
    let timeout = match headers.get(TIMEOUT_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => match parse_timeout(v.trim()) {
            Some(t) => Some(t),
            None => {
                return plain_error(
                    StatusCode::BAD_REQUEST,
                    format!("{TIMEOUT_HEADER}: {v:?} is not a duration like 500ms or 2s"),
                )
            }
        },
        Some(Err(_)) => {
            return plain_error(
                StatusCode::BAD_REQUEST,
                format!("{TIMEOUT_HEADER} is not ASCII"),
            )
        }
    };
    let deadline = router.deadline(timeout);
    let metadata = metadata(&headers, router.forward_metadata());
    let source = CallSource::Grpc {
        entry: router.coord().member_id().clone(),
    };
    match router.call(key, body, deadline, source, metadata).await {
        Ok(reply) => {
            let mut response = reply.payload.into_response();
            let h = response.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HeaderName::from_static(SHARD_HEADER), reply.shard.0.into());
            h.insert(HeaderName::from_static(EPOCH_HEADER), reply.epoch.0.into());
            if let Ok(owner) = HeaderValue::from_str(&reply.owner.0) {
                h.insert(HeaderName::from_static(OWNER_HEADER), owner);
            }
            response
        }
        Err(e) => call_error(e),
    }
}

async fn locate(
    State(g): State<Arc<Gateway>>,
    key: Result<Path<String>, PathRejection>,
) -> Response {
    let started = Instant::now();
    let response = if let Err(e) = &key {
        plain_error(
            StatusCode::BAD_REQUEST,
            format!("the key: {}", e.body_text()),
        )
    } else {
        let Ok(Path(key)) = key else {
            unreachable!("checked above")
        };
        let view = g.router.coord().view();
        let shard = shard_for_key(key.as_bytes(), view.shard_count());
        let owner = view.owner(shard);
        Json(serde_json::json!({
            "key": key,
            "shard": shard.0,
            "owner": owner.map(|o| o.owner.0.clone()),
            "address": owner.map(|o| o.address.clone()),
            "epoch": owner.map_or(0, |o| o.epoch.0),
        }))
        .into_response()
    };
    g.metrics
        .record("locate", response.status(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_usual_http_statuses() {
        for (code, status) in [
            (Code::InvalidArgument, 400),
            (Code::FailedPrecondition, 400),
            (Code::NotFound, 404),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Cancelled, 499),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn the_handler_gets_the_content_type_trace_and_allowed_headers_only() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", HeaderValue::from_static(tp));
        h.insert("x-tenant", HeaderValue::from_static("acme"));
        h.insert("authorization", HeaderValue::from_static("Bearer secret"));
        let m = metadata(&h, &["x-tenant".to_owned()]);
        assert_eq!(m.get(CONTENT_TYPE_METADATA), Some("application/json"));
        assert_eq!(m.get("traceparent"), Some(tp));
        assert_eq!(m.get("x-tenant"), Some("acme"));
        assert_eq!(m.get("authorization"), None);
    }

    #[test]
    fn timeouts_are_durations() {
        assert_eq!(parse_timeout("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_timeout("0s"), None);
        assert_eq!(parse_timeout("soon"), None);
    }
}
