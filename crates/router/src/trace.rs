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

/// Longest `tracestate` passed on (the W3C limit) and longest other value.
const MAX_TRACESTATE: usize = 512;
const MAX_VALUE: usize = 1024;

/// A W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>` (lower case; version `ff` invalid).
fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && (parts[0] != "00" || (parts.len() == 4 && v.len() == 55))
}

impl CallMetadata {
    /// The entries worth passing on: a well-formed `traceparent`, a `tracestate` within
    /// the W3C limit, other values up to 1 KiB, ASCII only; the rest is dropped (a
    /// handler's metadata limit is often 8 KiB, and a malformed trace context would be
    /// worse than none).
    pub fn sanitized(entries: Vec<(String, String)>) -> Self {
        Self(
            entries
                .into_iter()
                .filter(|(k, v)| {
                    v.is_ascii()
                        && !v.bytes().any(|b| b.is_ascii_control())
                        && match k.as_str() {
                            TRACEPARENT => is_traceparent(v),
                            TRACESTATE => v.len() <= MAX_TRACESTATE,
                            _ => v.len() <= MAX_VALUE,
                        }
                })
                .collect(),
        )
    }

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
        Self::sanitized(out)
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
    fn malformed_or_oversized_trace_context_is_dropped() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let m = CallMetadata::sanitized(vec![
            (TRACEPARENT.into(), good.into()),
            (TRACESTATE.into(), "x".repeat(513)),
            ("x-big".into(), "y".repeat(1025)),
            ("x-ok".into(), "fine".into()),
        ]);
        assert_eq!(
            m.0,
            vec![
                (TRACEPARENT.into(), good.into()),
                ("x-ok".into(), "fine".into())
            ]
        );
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert!(
                CallMetadata::sanitized(vec![(TRACEPARENT.into(), bad.into())])
                    .0
                    .is_empty(),
                "{bad}"
            );
        }
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
