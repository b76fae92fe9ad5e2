//! Request metadata that travels with a call (entry → Forward/Dispatch → the handler's
//! gRPC metadata), and the W3C trace context in it.
//!
//! When the process exports traces (`otlp_endpoint`), each hop's span continues the
//! trace the metadata carries and the metadata sent on names that span; otherwise the
//! trace context passes through unchanged, so a handler still sees its client's trace.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Keys always carried: the W3C trace context.
pub const TRACE_KEYS: [&str; 2] = [TRACEPARENT, TRACESTATE];

/// Metadata passed on to the handler: allow-listed client metadata (or a Kafka
/// record's trace headers) and the trace context. Keys are lower case, values ASCII.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallMetadata(pub Vec<(String, String)>);

impl CallMetadata {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    /// The entries of gRPC request metadata whose keys are in `allowed` or are trace
    /// keys; binary (`-bin`) and non-ASCII values are left out.
    pub fn from_grpc(metadata: &tonic::metadata::MetadataMap, allowed: &[String]) -> Self {
        let mut out = Vec::new();
        for key in TRACE_KEYS
            .iter()
            .copied()
            .chain(allowed.iter().map(String::as_str))
        {
            if out.iter().any(|(k, _): &(String, String)| k == key) {
                continue;
            }
            if let Some(v) = metadata.get(key).and_then(|v| v.to_str().ok()) {
                out.push((key.to_owned(), v.to_owned()));
            }
        }
        Self(out)
    }

    /// Writes the entries into gRPC request metadata (entries that are not valid there
    /// are skipped).
    pub fn to_grpc(&self, metadata: &mut tonic::metadata::MetadataMap) {
        for (k, v) in &self.0 {
            let (Ok(key), Ok(value)) = (
                tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes()),
                tonic::metadata::AsciiMetadataValue::try_from(v.as_str()),
            ) else {
                continue;
            };
            metadata.insert(key, value);
        }
    }
}

impl Extractor for CallMetadata {
    fn get(&self, key: &str) -> Option<&str> {
        CallMetadata::get(self, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct Injected<'a>(&'a mut CallMetadata);

impl Injector for Injected<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set(key, value);
    }
}

/// Makes `span` continue the trace `metadata` carries (no effect without export).
pub fn continue_trace(span: &tracing::Span, metadata: &CallMetadata) {
    if metadata.get(TRACEPARENT).is_none() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(metadata));
    let _ = span.set_parent(parent);
}

/// The metadata to send on from inside `span`: the same entries, with the trace context
/// naming `span` when traces are exported (else the received one, unchanged).
pub fn outgoing(span: &tracing::Span, metadata: &CallMetadata) -> CallMetadata {
    let mut out = metadata.clone();
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut Injected(&mut out))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_listed_and_trace_keys_are_taken_from_grpc_metadata() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        m.insert("x-tenant", "acme".parse().unwrap());
        m.insert("x-secret", "no".parse().unwrap());
        let got = CallMetadata::from_grpc(&m, &["x-tenant".into(), "x-absent".into()]);
        assert_eq!(
            got.0,
            vec![
                (
                    "traceparent".into(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()
                ),
                ("x-tenant".into(), "acme".into()),
            ]
        );
        let mut back = tonic::metadata::MetadataMap::new();
        got.to_grpc(&mut back);
        assert_eq!(back.get("x-tenant").unwrap(), "acme");
        assert!(back.get("x-secret").is_none());
    }

    #[test]
    fn without_export_the_trace_context_passes_through() {
        let m = CallMetadata(vec![(
            TRACEPARENT.into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        )]);
        let span = tracing::info_span!("call");
        continue_trace(&span, &m);
        assert_eq!(outgoing(&span, &m), m);
    }
}
