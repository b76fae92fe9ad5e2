//! Logs, and traces exported over OTLP when `otlp_endpoint` is set.
//!
//! Spans: `call` (the entry instance's `Entities/Call` and the owner's `Peer/Forward`,
//! kind server; a Kafka record's call at the consuming instance), `forward` (the hop,
//! kind client) and `handler` (the handler call, kind client). Each continues the W3C
//! trace context that came with the call (client metadata or Kafka record headers) and
//! passes its own on, to the peer and to the handler as gRPC metadata. They are debug
//! spans, so without export they cost nothing on the call path.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, ServeOptions};

/// What must outlive the instance: the trace exporter, flushed by [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid otlp_endpoint: {0}")]
    Exporter(String),
}

/// Installs the global subscriber: logs on stderr per `log`/`log_format` (ANSI colour
/// when `colour`), and with `otlp_endpoint` the trace layer and the W3C propagator.
/// Call it inside the Tokio runtime (the exporter's gRPC client lives there).
pub fn init(config: &ServeOptions, colour: bool) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!(
            "warning: invalid log filter {:?} ({e}); using info",
            config.log
        );
        EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match config.log_format {
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
        LogFormat::Text => logs.with_filter(filter).boxed(),
    };
    let Some(endpoint) = &config.otlp_endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("leasehold")
        .with_attributes([
            KeyValue::new("service.instance.id", config.id.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("leasehold.cluster", config.cluster.clone()),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // The call path's spans are debug spans of these crates, whatever the log filter.
    let spans = Targets::new()
        .with_target("leasehold_router", LevelFilter::DEBUG)
        .with_target("leasehold_kafka", LevelFilter::INFO)
        .with_target("leasehold_coord", LevelFilter::INFO)
        .with_target("leasehold_server", LevelFilter::INFO);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("leasehold"))
        .with_filter(spans);
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .init();
    tracing::info!(endpoint = %endpoint, "exporting traces over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Sends the spans still buffered (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}
