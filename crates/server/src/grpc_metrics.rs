//! Per-method gRPC metrics for every plane: `leasehold_grpc_requests_total{plane,
//! method, code}` and `leasehold_grpc_request_duration_seconds{plane, method}`, as a
//! tower layer under tonic's router.
//!
//! The status is read where gRPC puts it: the response headers for a trailers-only
//! answer (errors before any message), else the trailers at the end of the body. A body
//! dropped before its trailers (the client went away, a stream cut) counts as
//! `CANCELLED`, and so does a request dropped before its answer (the client's
//! `grpc-timeout` firing, a stream reset). Streams are measured from request to the end
//! of the response stream. Only methods of the services Leasehold serves are labelled by
//! name, and only when the service knew them (not `UNIMPLEMENTED`); every other path is
//! `unknown`, so requests cannot create series or put arbitrary text into labels.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use leasehold_metrics::{Counter, CounterFamily, Histogram, HistogramFamily, Registry};
use tonic::Code;

/// The metric families, shared by every plane.
#[derive(Clone)]
pub struct GrpcMetrics {
    requests: CounterFamily,
    duration: HistogramFamily,
}

impl GrpcMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            requests: registry.counter_family(
                "leasehold_grpc_requests_total",
                "gRPC requests served, by plane, method and status code.",
            ),
            duration: registry.histogram_family(
                "leasehold_grpc_request_duration_seconds",
                "gRPC request latency by plane and method (streams: until the response ends).",
            ),
        }
    }

    pub fn layer(&self, plane: &'static str) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            plane: Arc::new(Plane {
                unknown: Arc::new(MethodMetrics::new(self, plane, "unknown")),
                plane,
                metrics: self.clone(),
                methods: Default::default(),
            }),
        }
    }
}

/// One plane's series, resolved once per method: a request costs a map lookup and two
/// atomic updates, not a label set built and hashed per request.
struct Plane {
    plane: &'static str,
    metrics: GrpcMetrics,
    methods: RwLock<HashMap<String, Arc<MethodMetrics>>>,
    unknown: Arc<MethodMetrics>,
}

impl Plane {
    /// The series of `path`, or of `unknown` for a path no served service has.
    fn method(&self, path: &str) -> Arc<MethodMetrics> {
        if !is_served(path) {
            return self.unknown.clone();
        }
        if let Some(m) = self.methods.read().expect("methods lock").get(path) {
            return m.clone();
        }
        self.methods
            .write()
            .expect("methods lock")
            .entry(path.to_owned())
            .or_insert_with(|| Arc::new(MethodMetrics::new(&self.metrics, self.plane, path)))
            .clone()
    }
}

/// The series of one plane and method: its latency and a counter per status code (made
/// on first use).
struct MethodMetrics {
    requests: CounterFamily,
    plane: &'static str,
    method: String,
    duration: Histogram,
    codes: [OnceLock<Counter>; 17],
}

impl MethodMetrics {
    fn new(metrics: &GrpcMetrics, plane: &'static str, method: &str) -> Self {
        Self {
            requests: metrics.requests.clone(),
            plane,
            method: method.to_owned(),
            duration: metrics
                .duration
                .with(&[("plane", plane), ("method", method)]),
            codes: Default::default(),
        }
    }

    fn record(&self, code: Code, started: Instant) {
        let counter = self.codes[(code as usize).min(16)].get_or_init(|| {
            self.requests.with(&[
                ("plane", self.plane),
                ("method", &self.method),
                ("code", code_name(code)),
            ])
        });
        counter.inc();
        self.duration.observe(started.elapsed());
    }
}

/// The gRPC services the planes serve (checked against the generated servers' names
/// by a test).
const SERVICES: [&str; 6] = [
    "leasehold.v1.Entities",
    "leasehold.v1.Peer",
    "leasehold.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Whether `path` is `/<a served service>/<Method>` with a plain method name (a known
/// service answers an unknown method `UNIMPLEMENTED`, which is labelled `unknown`).
fn is_served(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    SERVICES.contains(&service)
        && !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `OK`, `NOT_FOUND`, … as gRPC documents them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(value))
}

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    plane: Arc<Plane>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            plane: self.plane.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    plane: Arc<Plane>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        // Only gRPC requests are counted (the admin plane also serves plain HTTP).
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let pending = grpc.then(|| Pending {
            method: self.plane.method(req.uri().path()),
            unknown: self.plane.unknown.clone(),
            started,
        });
        let future = self.inner.call(req);
        // Until the answer comes, dropping this future (the client's grpc-timeout, a
        // reset stream) records the request as CANCELLED.
        let mut waiting = Waiting(pending);
        Box::pin(async move {
            let response = future.await?;
            let mut pending = waiting.0.take();
            if let Some(code) = status_of(response.headers()) {
                if let Some(p) = pending.take() {
                    p.finish(code);
                }
            }
            Ok(response.map(|inner| MeteredBody { inner, pending }))
        })
    }
}

/// A request not answered yet; recorded as `CANCELLED` if dropped so.
struct Waiting(Option<Pending>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.finish(Code::Cancelled);
        }
    }
}

/// A request whose status is not known yet.
struct Pending {
    method: Arc<MethodMetrics>,
    unknown: Arc<MethodMetrics>,
    started: Instant,
}

impl Pending {
    fn finish(self, code: Code) {
        // A served service that does not know the method: not a series of its own.
        let series = if code == Code::Unimplemented {
            &self.unknown
        } else {
            &self.method
        };
        series.record(code, self.started);
    }
}

/// A response body that records the request when its trailers pass (or when dropped).
pub struct MeteredBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    if let Some(p) = self.pending.take() {
                        p.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.take() {
                    p.finish(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                // Ended without a status: not a valid gRPC answer.
                if let Some(p) = self.pending.take() {
                    p.finish(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(Code::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, Service, ServiceExt};

    fn grpc_request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    /// A body that yields one data frame, then the given trailers.
    struct Answer(Vec<Frame<bytes::Bytes>>);

    impl Body for Answer {
        type Data = bytes::Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Infallible>>> {
            Poll::Ready(if self.0.is_empty() {
                None
            } else {
                Some(Ok(self.0.remove(0)))
            })
        }
    }

    fn trailers(code: i32) -> Frame<bytes::Bytes> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.to_string().parse().unwrap());
        Frame::trailers(t)
    }

    async fn drain<B: Body + Unpin>(mut b: B) {
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut b).poll_frame(cx)).await {
            let _ = f;
        }
    }

    #[tokio::test]
    async fn codes_come_from_trailers_headers_or_a_dropped_body() {
        let registry = Registry::new();
        let metrics = GrpcMetrics::new(&registry);
        let service = tower::service_fn(|req: http::Request<()>| async move {
            let path = req.uri().path().to_owned();
            let mut response = http::Response::new(Answer(vec![
                Frame::data(bytes::Bytes::from_static(b"x")),
                trailers(if path.ends_with("Fail") { 5 } else { 0 }),
            ]));
            if path.starts_with("/x") || path.starts_with("/v1") {
                // Like axum's fallback: a plain HTTP answer, no gRPC status anywhere.
                return Ok::<_, Infallible>(http::Response::new(Answer(vec![Frame::data(
                    bytes::Bytes::from_static(b"{}"),
                )])));
            }
            if path.ends_with("Early") {
                response
                    .headers_mut()
                    .insert("grpc-status", "3".parse().unwrap());
            }
            if path.ends_with("Nope") {
                response
                    .headers_mut()
                    .insert("grpc-status", "12".parse().unwrap());
            }
            Ok::<_, Infallible>(response)
        });
        let mut svc = metrics.layer("client").layer(service);
        for path in [
            "/leasehold.v1.Entities/Call",
            "/leasehold.v1.Entities/Call",
            "/leasehold.v1.Entities/Fail",
            "/leasehold.v1.Admin/Early",
            "/leasehold.v1.Peer/Nope",
            // Paths of no served service, as the admin plane's HTTP fallback answers
            // them (no grpc-status at all): never a label of their own.
            "/x\"y",
            "/v1/shards/12345",
        ] {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(grpc_request(path))
                .await
                .unwrap();
            drain(response.into_body()).await;
        }
        // The client goes away before the trailers.
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(grpc_request("/leasehold.v1.Entities/Gone"))
            .await
            .unwrap();
        drop(response);
        // Plain HTTP on the same plane is not a gRPC request.
        let plain = http::Request::builder().uri("/metrics").body(()).unwrap();
        let response = svc.ready().await.unwrap().call(plain).await.unwrap();
        drain(response.into_body()).await;

        // Dropped before its answer (the client's deadline): CANCELLED as well.
        let mut slow =
            metrics
                .layer("client")
                .layer(tower::service_fn(|_: http::Request<()>| async {
                    std::future::pending::<Result<http::Response<Answer>, Infallible>>().await
                }));
        let call = slow
            .ready()
            .await
            .unwrap()
            .call(grpc_request("/leasehold.v1.Entities/Slow"));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), call)
                .await
                .is_err()
        );

        let text = registry.render();
        for line in [
            r#"leasehold_grpc_requests_total{plane="client",method="/leasehold.v1.Entities/Call",code="OK"} 2"#,
            r#"leasehold_grpc_requests_total{plane="client",method="/leasehold.v1.Entities/Fail",code="NOT_FOUND"} 1"#,
            r#"leasehold_grpc_requests_total{plane="client",method="/leasehold.v1.Admin/Early",code="INVALID_ARGUMENT"} 1"#,
            r#"leasehold_grpc_requests_total{plane="client",method="unknown",code="UNIMPLEMENTED"} 1"#,
            r#"leasehold_grpc_requests_total{plane="client",method="unknown",code="UNKNOWN"} 2"#,
            r#"leasehold_grpc_requests_total{plane="client",method="/leasehold.v1.Entities/Gone",code="CANCELLED"} 1"#,
            r#"leasehold_grpc_requests_total{plane="client",method="/leasehold.v1.Entities/Slow",code="CANCELLED"} 1"#,
            r#"leasehold_grpc_request_duration_seconds_count{plane="client",method="/leasehold.v1.Entities/Call"} 2"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("/metrics") && !text.contains("x\"y") && !text.contains("/v1/shards"),
            "{text}"
        );
        assert_eq!(
            text.matches("/leasehold.v1.Admin/Early").count(),
            1 + 17,
            "{text}"
        );
    }
}

#[cfg(test)]
mod served {
    use tonic::server::NamedService;

    #[test]
    fn the_served_services_are_the_generated_ones() {
        use leasehold_proto::v1::admin_server::AdminServer;
        use leasehold_proto::v1::entities_server::EntitiesServer;
        use leasehold_proto::v1::peer_server::PeerServer;
        for name in [
            <EntitiesServer<leasehold_router::EntitiesService> as NamedService>::NAME,
            <PeerServer<leasehold_router::PeerService> as NamedService>::NAME,
            <AdminServer<crate::admin::AdminService> as NamedService>::NAME,
        ] {
            assert!(super::SERVICES.contains(&name), "{name} is not labelled");
        }
        assert!(super::is_served("/leasehold.v1.Entities/Call"));
        assert!(!super::is_served("/leasehold.v1.Entities/"));
        assert!(!super::is_served("/leasehold.v1.Entities/Call\"x"));
        assert!(!super::is_served("/other.Service/Call"));
    }
}
