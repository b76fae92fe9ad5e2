//! What a failed call tells the caller, and whether sending it again is safe.

use std::error::Error as _;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// `google.rpc.ErrorInfo` domain of Leasehold's own errors.
pub const ERROR_DOMAIN: &str = "leasehold.dev";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call's status: the handler's own answer, or Leasehold's (see
    /// [`Error::reason`]).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// Bad client settings or arguments.
    #[error("{0}")]
    Config(String),
    /// No routing table arrived in time.
    #[error("{0}")]
    NoRouting(String),
}

impl Error {
    /// The gRPC code (`INVALID_ARGUMENT` for bad arguments, `UNAVAILABLE` without a table).
    pub fn code(&self) -> Code {
        match self {
            Error::Status(s) => s.code(),
            Error::Config(_) => Code::InvalidArgument,
            Error::NoRouting(_) => Code::Unavailable,
        }
    }

    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(s) => Some(s),
            _ => None,
        }
    }

    /// Leasehold's reason (`NO_OWNER_AVAILABLE`, `OUTCOME_UNKNOWN`, …); `None` for the
    /// handler's own errors and for transport failures.
    pub fn reason(&self) -> Option<String> {
        leasehold_info(self.status()?).map(|(reason, _)| reason)
    }
}

/// Whether a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Leasehold says the call did not run (no owner yet, queues full, the deadline
    /// passed before the handler started).
    NotRun,
    /// The request never left: the instance could not be connected to, or refused the
    /// stream (shutting down).
    NotSent,
    /// The handler's answer, a refusal, or a failure after the request was sent (it may
    /// have run): the caller decides.
    No,
}

impl Retry {
    pub fn of(status: &Status) -> Retry {
        if let Some((_, retryable)) = leasehold_info(status) {
            return if retryable { Retry::NotRun } else { Retry::No };
        }
        if not_sent(status) {
            return Retry::NotSent;
        }
        Retry::No
    }
}

/// Leasehold's ErrorInfo in a status: (reason, retryable).
fn leasehold_info(status: &Status) -> Option<(String, bool)> {
    let info = status.get_details_error_info()?;
    (info.domain == ERROR_DOMAIN).then(|| {
        let retryable = info.metadata.get("retryable").is_some_and(|v| v == "true");
        (info.reason, retryable)
    })
}

/// A transport failure that proves the request was not sent: connecting failed, the
/// connection closed while the request still waited to be written (hyper's "canceled",
/// e.g. the instance shutting down), or the server refused the stream before processing
/// it (HTTP/2 REFUSED_STREAM, or a stream its GOAWAY left out).
fn not_sent(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // REFUSED_STREAM, or a GOAWAY from the server for a stream above its last
            // processed one: the server did not process it (RFC 9113 §6.8).
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // Failures of connect(2) (raw, from the TLS connector too); a connection that
            // breaks after sending reports a reset or a broken pipe instead.
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::AddrNotAvailable
            ) {
                return true;
            }
        }
        // hyper-util's connector errors (no public type to downcast to).
        let text = e.to_string();
        if text.starts_with("tcp connect error") || text.starts_with("dns error") {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn leasehold(code: Code, reason: &str, retryable: bool) -> Status {
        let details = ErrorDetails::with_error_info(
            reason,
            ERROR_DOMAIN,
            HashMap::from([("retryable".to_owned(), retryable.to_string())]),
        );
        Status::with_error_details(code, "m", details)
    }

    #[test]
    fn leasehold_says_what_did_not_run() {
        let s = leasehold(Code::Unavailable, "NO_OWNER_AVAILABLE", true);
        assert_eq!(Retry::of(&s), Retry::NotRun);
        let s = leasehold(Code::DeadlineExceeded, "OUTCOME_UNKNOWN", false);
        assert_eq!(Retry::of(&s), Retry::No);
        assert_eq!(
            Error::Status(s).reason().as_deref(),
            Some("OUTCOME_UNKNOWN")
        );
    }

    #[test]
    fn the_handlers_own_errors_and_foreign_domains_are_answers() {
        assert_eq!(Retry::of(&Status::unavailable("busy")), Retry::No);
        let foreign = Status::with_error_details(
            Code::Unavailable,
            "m",
            ErrorDetails::with_error_info("X", "example.com", HashMap::new()),
        );
        assert_eq!(Retry::of(&foreign), Retry::No);
        assert_eq!(Error::Status(foreign).reason(), None);
    }

    #[tokio::test]
    async fn a_refused_connection_was_not_sent() {
        // A port nothing listens on: bind, note it, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = leasehold_proto::v1::entities_client::EntitiesClient::new(channel)
            .call(leasehold_proto::v1::CallRequest::default())
            .await
            .expect_err("nothing listens");
        assert_eq!(Retry::of(&status), Retry::NotSent, "{status:?}");
    }
}
