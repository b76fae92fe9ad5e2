//! How a client command's outcome reaches the terminal: the output format (`--output`),
//! the errors, and the exit status (from sysexits.h) each error ends the command with.

use std::process::ExitCode;

use serde_json::{json, Value};

/// The exit statuses of `leasehold`, shown by `leasehold --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0   success
  64  usage: bad flags or arguments (e.g. an empty key), INVALID_ARGUMENT, HTTP 400 or 404
  69  unavailable: cannot connect, UNAVAILABLE, HTTP 503, health not SERVING
  70  software: INTERNAL, UNKNOWN and any other failure
  75  temporary failure, try again: DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED,
      HTTP 429 or 504, drain not finished within --wait
  77  permission: UNAUTHENTICATED, PERMISSION_DENIED, HTTP 401 or 403

With --output json, a failed command also prints {\"error\": ..., \"code\": ...} on stdout.";

/// How a command ended, as an exit status from sysexits.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what it was asked.
    Ok,
    /// EX_USAGE (64): the command was given bad flags or arguments.
    Usage,
    /// EX_UNAVAILABLE (69): the instance cannot be reached or is not serving.
    Unavailable,
    /// EX_SOFTWARE (70): anything else went wrong.
    Software,
    /// EX_TEMPFAIL (75): a temporary failure; the same command may succeed later.
    TempFail,
    /// EX_NOPERM (77): the credentials were missing or refused.
    NoPerm,
}

impl Exit {
    /// The numeric exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Usage => 64,
            Exit::Unavailable => 69,
            Exit::Software => 70,
            Exit::TempFail => 75,
            Exit::NoPerm => 77,
        }
    }

    /// The `code` of an error found by the client itself (not sent by a server).
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Usage => "usage",
            Exit::Unavailable => "unavailable",
            Exit::Software => "software",
            Exit::TempFail => "tempfail",
            Exit::NoPerm => "noperm",
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// The exit status for a gRPC status code.
pub fn exit_for_grpc(code: tonic::Code) -> Exit {
    use tonic::Code;
    match code {
        Code::Ok => Exit::Ok,
        Code::InvalidArgument => Exit::Usage,
        Code::Unavailable => Exit::Unavailable,
        Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => Exit::TempFail,
        Code::Unauthenticated | Code::PermissionDenied => Exit::NoPerm,
        _ => Exit::Software,
    }
}

/// The exit status for an HTTP status from the admin plane.
pub fn exit_for_http(status: u16) -> Exit {
    match status {
        200..=299 => Exit::Ok,
        400 | 404 => Exit::Usage,
        401 | 403 => Exit::NoPerm,
        429 | 504 => Exit::TempFail,
        503 => Exit::Unavailable,
        _ => Exit::Software,
    }
}

/// The exit status for a command line clap could not parse: `--help` and `--version`
/// succeed, anything else is a usage error (not clap's own status 2).
pub fn exit_for_clap(kind: clap::error::ErrorKind) -> Exit {
    use clap::error::ErrorKind;
    match kind {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Exit::Ok,
        _ => Exit::Usage,
    }
}

/// The canonical name of a gRPC status code (`INVALID_ARGUMENT`), as in the gRPC spec.
pub use leasehold_server::grpc_metrics::code_name as grpc_code_name;

/// A transport error without its leading URL (the caller names the request).
fn without_url(t: &ureq::Transport) -> String {
    let text = t.to_string();
    match t.url() {
        Some(url) => text
            .strip_prefix(&format!("{url}: "))
            .map_or_else(|| text.clone(), str::to_owned),
        None => text,
    }
}

/// Whether `status` is this client's deadline expiring rather than an answer.
fn is_client_deadline(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A failed command: what to tell the person, the `code` for scripts, and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit status the command ends with.
    pub exit: Exit,
    /// For `--output json`: the gRPC code name, the HTTP status, or the [`Exit::name`]
    /// of an error the client found itself.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Whether Leasehold marked the failure `OUTCOME_UNKNOWN` (`google.rpc.ErrorInfo`).
fn outcome_unknown(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .is_some_and(|info| info.reason == "OUTCOME_UNKNOWN")
}

/// The result of a client command.
pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    /// An error the client found itself; its `code` is the exit status's name.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            code: exit.name().to_owned(),
            message: message.into(),
        }
    }

    /// Bad flags or arguments (exit 64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    /// A bad argument found by a helper that reports with anyhow (TLS files, addresses).
    pub fn usage_from(e: &anyhow::Error) -> Self {
        Self::usage(format!("{e:#}"))
    }

    /// A status a gRPC server answered with. The client's own deadline expiring (tonic
    /// reports CANCELLED) counts as DEADLINE_EXCEEDED, as in gRPC.
    pub fn grpc(status: &tonic::Status) -> Self {
        if is_client_deadline(status) {
            return Self {
                exit: Exit::TempFail,
                code: grpc_code_name(tonic::Code::DeadlineExceeded).to_owned(),
                message: "DeadlineExceeded: no answer within the call's timeout (--timeout)"
                    .to_owned(),
            };
        }
        // A call that may have run although it failed is not "try again" (it could run
        // twice): its own code, and exit 70.
        if outcome_unknown(status) {
            return Self {
                exit: Exit::Software,
                code: "OUTCOME_UNKNOWN".to_owned(),
                message: format!(
                    "{:?} (outcome unknown: the call may have run): {}",
                    status.code(),
                    status.message()
                ),
            };
        }
        Self {
            exit: exit_for_grpc(status.code()),
            code: grpc_code_name(status.code()).to_owned(),
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    }

    /// An HTTP error status from the admin plane, with the `error` text it sent.
    pub fn http(status: u16, error: &str) -> Self {
        Self {
            exit: exit_for_http(status),
            code: status.to_string(),
            message: format!("HTTP {status}: {error}"),
        }
    }

    /// An admin request that failed: its HTTP status, or the transport error (a bad URL
    /// is a usage error; everything else means the instance could not be reached).
    pub fn from_ureq(e: ureq::Error) -> Self {
        match e {
            ureq::Error::Status(status, response) => {
                let body: Value = response.into_json().unwrap_or_default();
                Self::http(status, body["error"].as_str().unwrap_or("(no message)"))
            }
            ureq::Error::Transport(t) => {
                use ureq::ErrorKind;
                let exit = match t.kind() {
                    ErrorKind::InvalidUrl
                    | ErrorKind::UnknownScheme
                    | ErrorKind::InvalidProxyUrl => Exit::Usage,
                    _ => Exit::Unavailable,
                };
                Self::new(exit, without_url(&t))
            }
        }
    }

    /// The same error, its message preceded by what was being done (`GET URL: ...`).
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The error as printed with `--output json`.
    pub fn to_json(&self) -> Value {
        json!({ "error": self.message, "code": self.code })
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// How a client command prints its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Lines and tables for a person.
    #[default]
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// The `--output` flag of every client command.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArgs {
    /// Output format: text for people, json for scripts (one JSON document on stdout;
    /// errors too, as {"error", "code"}).
    #[arg(
        long,
        value_enum,
        env = "LEASEHOLD_OUTPUT",
        default_value_t = Format::Text,
        value_name = "FORMAT"
    )]
    pub output: Format,
}

/// A command's answer in both formats.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// What `--output text` prints (no trailing newline).
    pub text: String,
    /// What `--output json` prints.
    pub json: Value,
}

impl Rendered {
    /// The answer as printed in `format` (JSON on one line).
    pub fn in_format(&self, format: Format) -> String {
        match format {
            Format::Text => self.text.clone(),
            Format::Json => self.json.to_string(),
        }
    }
}

/// Prints a command's answer on stdout, or its error on stderr (and, with JSON output,
/// as a JSON document on stdout too), and returns the exit status.
pub fn finish(result: CliResult<Rendered>, format: Format) -> ExitCode {
    match result {
        Ok(answer) => {
            println!("{}", answer.in_format(format));
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_error(&e, format);
            e.exit.into()
        }
    }
}

/// Prints an error for a person on stderr and, with JSON output, for scripts on stdout.
pub fn print_error(e: &CliError, format: Format) {
    eprintln!("error: {e}");
    if format == Format::Json {
        println!("{}", e.to_json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn every_grpc_code_has_an_exit_status() {
        let expected = [
            (Code::Ok, Exit::Ok),
            (Code::Cancelled, Exit::Software),
            (Code::Unknown, Exit::Software),
            (Code::InvalidArgument, Exit::Usage),
            (Code::DeadlineExceeded, Exit::TempFail),
            (Code::NotFound, Exit::Software),
            (Code::AlreadyExists, Exit::Software),
            (Code::PermissionDenied, Exit::NoPerm),
            (Code::ResourceExhausted, Exit::TempFail),
            (Code::FailedPrecondition, Exit::Software),
            (Code::Aborted, Exit::TempFail),
            (Code::OutOfRange, Exit::Software),
            (Code::Unimplemented, Exit::Software),
            (Code::Internal, Exit::Software),
            (Code::Unavailable, Exit::Unavailable),
            (Code::DataLoss, Exit::Software),
            (Code::Unauthenticated, Exit::NoPerm),
        ];
        for (code, exit) in expected {
            assert_eq!(exit_for_grpc(code), exit, "{code:?}");
        }
        // Every code is covered (the i32 values are 0..=16).
        assert_eq!(expected.len(), 17);
        for (i, (code, _)) in expected.iter().enumerate() {
            assert_eq!(*code as i32, i as i32);
        }
    }

    #[test]
    fn a_call_that_may_have_run_is_not_worth_a_retry() {
        use tonic_types::{ErrorDetails, StatusExt};
        let details = |reason: &str| {
            ErrorDetails::with_error_info(reason, "leasehold.dev", std::collections::HashMap::new())
        };
        let unknown = tonic::Status::with_error_details(
            Code::DeadlineExceeded,
            "no answer",
            details("OUTCOME_UNKNOWN"),
        );
        let e = CliError::grpc(&unknown);
        assert_eq!(
            (e.exit, e.code.as_str()),
            (Exit::Software, "OUTCOME_UNKNOWN")
        );
        let before = tonic::Status::with_error_details(
            Code::DeadlineExceeded,
            "queued too long",
            details("DEADLINE_BEFORE_HANDLER"),
        );
        let e = CliError::grpc(&before);
        assert_eq!(
            (e.exit, e.code.as_str()),
            (Exit::TempFail, "DEADLINE_EXCEEDED")
        );
    }

    #[test]
    fn exit_statuses_are_the_sysexits_numbers() {
        let numbers = [
            (Exit::Ok, 0),
            (Exit::Usage, 64),
            (Exit::Unavailable, 69),
            (Exit::Software, 70),
            (Exit::TempFail, 75),
            (Exit::NoPerm, 77),
        ];
        for (exit, n) in numbers {
            assert_eq!(exit.code(), n, "{exit:?}");
        }
    }

    #[test]
    fn http_statuses_have_an_exit_status() {
        for (status, exit) in [
            (200, Exit::Ok),
            (202, Exit::Ok),
            (400, Exit::Usage),
            (404, Exit::Usage),
            (401, Exit::NoPerm),
            (403, Exit::NoPerm),
            (503, Exit::Unavailable),
            (429, Exit::TempFail),
            (504, Exit::TempFail),
            (405, Exit::Software),
            (500, Exit::Software),
            (502, Exit::Software),
        ] {
            assert_eq!(exit_for_http(status), exit, "HTTP {status}");
        }
    }

    #[test]
    fn clap_errors_are_usage_errors_except_help_and_version() {
        use clap::error::ErrorKind;
        assert_eq!(exit_for_clap(ErrorKind::DisplayHelp), Exit::Ok);
        assert_eq!(exit_for_clap(ErrorKind::DisplayVersion), Exit::Ok);
        for kind in [
            ErrorKind::InvalidValue,
            ErrorKind::UnknownArgument,
            ErrorKind::InvalidSubcommand,
            ErrorKind::ValueValidation,
            ErrorKind::ArgumentConflict,
            ErrorKind::MissingRequiredArgument,
            ErrorKind::MissingSubcommand,
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
        ] {
            assert_eq!(exit_for_clap(kind), Exit::Usage, "{kind:?}");
        }
    }

    #[test]
    fn grpc_errors_carry_the_code_name() {
        let e = CliError::grpc(&tonic::Status::invalid_argument("key must not be empty"));
        assert_eq!(e.exit, Exit::Usage);
        assert_eq!(
            e.to_json(),
            json!({"error": "InvalidArgument: key must not be empty", "code": "INVALID_ARGUMENT"})
        );
        let e = CliError::grpc(&tonic::Status::deadline_exceeded("no owner for shard 3"));
        assert_eq!(
            (e.exit, e.code.as_str()),
            (Exit::TempFail, "DEADLINE_EXCEEDED")
        );
    }

    #[test]
    fn the_clients_own_deadline_is_a_temporary_failure() {
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        let e = CliError::grpc(&status);
        assert_eq!(
            (e.exit, e.code.as_str()),
            (Exit::TempFail, "DEADLINE_EXCEEDED")
        );
        // A CANCELLED the server sent stays CANCELLED.
        let e = CliError::grpc(&tonic::Status::cancelled("shutting down"));
        assert_eq!((e.exit, e.code.as_str()), (Exit::Software, "CANCELLED"));
    }

    #[test]
    fn admin_http_errors_carry_the_status_and_the_servers_message() {
        let response = ureq::Response::new(401, "Unauthorized", r#"{"error":"missing token"}"#)
            .expect("response");
        let e = CliError::from_ureq(ureq::Error::Status(401, response)).context("GET /v1/cluster");
        assert_eq!(e.exit, Exit::NoPerm);
        assert_eq!(
            e.to_json(),
            json!({"error": "GET /v1/cluster: HTTP 401: missing token", "code": "401"})
        );
        let response =
            ureq::Response::new(503, "Service Unavailable", "not json").expect("response");
        let e = CliError::from_ureq(ureq::Error::Status(503, response));
        assert_eq!(
            (e.exit, e.message.as_str()),
            (Exit::Unavailable, "HTTP 503: (no message)")
        );
    }

    #[test]
    fn transport_errors_name_the_url_once() {
        // ureq refuses the scheme before opening any connection.
        let url = "ftp://127.0.0.1/v1/cluster";
        let e = ureq::get(url).call().expect_err("unknown scheme");
        let e = CliError::from_ureq(e).context(format!("GET {url}"));
        assert_eq!((e.exit, e.code.as_str()), (Exit::Usage, "usage"));
        assert_eq!(e.message.matches(url).count(), 1, "{}", e.message);
    }

    #[test]
    fn a_bad_admin_url_is_a_usage_error() {
        let e = ureq::get("no-scheme-here").call().expect_err("invalid URL");
        assert_eq!(CliError::from_ureq(e).exit, Exit::Usage);
    }

    #[test]
    fn client_errors_use_the_exit_name_as_code() {
        let e = CliError::new(Exit::Unavailable, "cannot connect to http://127.0.0.1:1");
        assert_eq!(
            e.to_json(),
            json!({"error": "cannot connect to http://127.0.0.1:1", "code": "unavailable"})
        );
    }

    #[test]
    fn json_answers_are_one_line() {
        let r = Rendered {
            text: "a\nb".into(),
            json: json!({"a": [1, 2], "b": {"c": null}}),
        };
        assert_eq!(r.in_format(Format::Text), "a\nb");
        assert_eq!(r.in_format(Format::Json), r#"{"a":[1,2],"b":{"c":null}}"#);
    }
}
