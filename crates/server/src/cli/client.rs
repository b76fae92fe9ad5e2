//! `leasehold call`, `leasehold locate` and `leasehold health`: a client in the terminal.

use std::time::Duration;

use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

use super::report::{CliError, CliResult, Exit, Rendered};
use super::tls::{channel, TlsArgs};
use leasehold_proto::v1::{CallResponse, LocateResponse};

/// Refuses an empty key before dialling (the server would answer INVALID_ARGUMENT).
fn check_key(key: &str) -> CliResult<()> {
    if key.is_empty() {
        return Err(CliError::usage("the key must not be empty (--key)"));
    }
    Ok(())
}

/// The Leasehold client for one command: through the instance at `addr` (it forwards to
/// the owner), retrying what did not run within `timeout`.
fn smart_client(
    addr: &str,
    tls: &TlsArgs,
    timeout: Duration,
) -> CliResult<leasehold_client::Client> {
    let mut builder = leasehold_client::Client::builder()
        .seed(addr)
        .timeout(timeout)
        // One call: the routing table would cost more than the hop it saves.
        .follow_routing(false);
    if addr.starts_with("https://") {
        let ca_file = tls.ca_file.clone().ok_or_else(|| {
            CliError::usage("an https:// address needs --ca-file (or LEASEHOLD_CA_FILE)")
        })?;
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(CliError::usage("--cert-file and --key-file go together")),
        };
        builder = builder.tls(leasehold_client::Tls {
            ca_file,
            identity,
            server_name: tls.server_name.clone(),
        });
    }
    builder.build().map_err(client_error)
}

fn client_error(e: leasehold_client::Error) -> CliError {
    match e {
        leasehold_client::Error::Status(s) => CliError::grpc(&s),
        leasehold_client::Error::Config(m) => CliError::usage(m),
        leasehold_client::Error::NoRouting(m) => CliError::new(Exit::Unavailable, m),
    }
}

/// `leasehold call`: sends one call through the instance at `addr`.
pub async fn call(
    addr: &str,
    tls: &TlsArgs,
    key: &str,
    payload: String,
    timeout: Duration,
) -> CliResult<Rendered> {
    check_key(key)?;
    let client = smart_client(addr, tls, timeout)?;
    let reply = client.call(key, payload).await.map_err(client_error)?;
    Ok(call_answer(
        key,
        &CallResponse {
            payload: reply.payload,
            shard: reply.shard,
            epoch: reply.epoch,
            owner: reply.owner,
        },
    ))
}

/// What `leasehold call` prints: the answer and who ran it.
pub fn call_answer(key: &str, r: &CallResponse) -> Rendered {
    let payload = String::from_utf8_lossy(&r.payload);
    Rendered {
        text: format!(
            "key {key:?} shard {} epoch {} owner {}: {payload}",
            r.shard, r.epoch, r.owner
        ),
        json: json!({
            "key": key,
            "payload": payload,
            "shard": r.shard,
            "epoch": r.epoch,
            "owner": r.owner,
        }),
    }
}

/// `leasehold locate`: asks the instance at `addr` where `key` lives.
pub async fn locate(addr: &str, tls: &TlsArgs, key: &str) -> CliResult<Rendered> {
    check_key(key)?;
    let client = smart_client(addr, tls, Duration::from_secs(5))?;
    let l = client.locate(key).await.map_err(client_error)?;
    Ok(locate_answer(
        key,
        &LocateResponse {
            shard: l.shard,
            owner: l.owner.unwrap_or_default(),
            address: l.address.unwrap_or_default(),
            epoch: l.epoch,
        },
    ))
}

/// What `leasehold locate` prints: shard, epoch and owner (`null` / `-` when unowned).
pub fn locate_answer(key: &str, r: &LocateResponse) -> Rendered {
    let owned = !r.owner.is_empty();
    let text_owner = if owned {
        format!("{} at {}", r.owner, r.address)
    } else {
        "-".to_owned()
    };
    Rendered {
        text: format!(
            "key {key:?} shard {} epoch {} owner {text_owner}",
            r.shard, r.epoch
        ),
        json: json!({
            "key": key,
            "shard": r.shard,
            "owner": owned.then_some(&r.owner),
            "address": owned.then_some(&r.address),
            "epoch": r.epoch,
        }),
    }
}

/// `leasehold health`: the standard gRPC health check (serving = ready).
pub async fn health(addr: &str, tls: &TlsArgs, service: &str) -> CliResult<Rendered> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let (channel, url) = channel(addr, tls).await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => CliError::usage(format!(
                "{url} has no service named {service:?} (--service)"
            )),
            _ => CliError::grpc(&s),
        })?
        .into_inner()
        .status;
    health_answer(
        &url,
        ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown),
    )
}

/// What `leasehold health` prints; anything but SERVING is an error (exit 69) whose
/// `code` is the serving status (`NOT_SERVING`).
pub fn health_answer(url: &str, status: ServingStatus) -> CliResult<Rendered> {
    let name = status.as_str_name();
    if status != ServingStatus::Serving {
        return Err(CliError {
            exit: Exit::Unavailable,
            code: name.to_owned(),
            message: format!("{url} is {name}"),
        });
    }
    Ok(Rendered {
        text: format!("{url} is {name}"),
        json: json!({ "status": name, "address": url }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_prints_the_answer_and_who_ran_it() {
        let r = CallResponse {
            payload: b"pong".to_vec().into(),
            shard: 7,
            epoch: 42,
            owner: "n1".into(),
        };
        let answer = call_answer("user-1", &r);
        assert_eq!(
            answer.text,
            r#"key "user-1" shard 7 epoch 42 owner n1: pong"#
        );
        assert_eq!(
            answer.json,
            json!({"key": "user-1", "payload": "pong", "shard": 7, "epoch": 42, "owner": "n1"})
        );
    }

    #[test]
    fn locate_prints_the_owner_and_its_address() {
        let r = LocateResponse {
            shard: 3,
            owner: "n0".into(),
            address: "http://10.0.0.1:7070".into(),
            epoch: 9,
        };
        let answer = locate_answer("k", &r);
        assert_eq!(
            answer.text,
            r#"key "k" shard 3 epoch 9 owner n0 at http://10.0.0.1:7070"#
        );
        assert_eq!(
            answer.json,
            json!({"key": "k", "shard": 3, "owner": "n0", "address": "http://10.0.0.1:7070", "epoch": 9})
        );
    }

    #[test]
    fn an_unowned_shard_has_no_owner() {
        let r = LocateResponse {
            shard: 3,
            owner: String::new(),
            address: String::new(),
            epoch: 0,
        };
        let answer = locate_answer("k", &r);
        assert_eq!(answer.text, r#"key "k" shard 3 epoch 0 owner -"#);
        assert_eq!(
            answer.json,
            json!({"key": "k", "shard": 3, "owner": null, "address": null, "epoch": 0})
        );
    }

    #[test]
    fn only_serving_is_healthy() {
        let ok = health_answer("http://h:7070", ServingStatus::Serving).expect("serving");
        assert_eq!(ok.text, "http://h:7070 is SERVING");
        assert_eq!(
            ok.json,
            json!({"status": "SERVING", "address": "http://h:7070"})
        );
        let e = health_answer("http://h:7070", ServingStatus::NotServing).expect_err("not serving");
        assert_eq!(
            (e.exit, e.code.as_str()),
            (Exit::Unavailable, "NOT_SERVING")
        );
        assert_eq!(e.message, "http://h:7070 is NOT_SERVING");
    }

    #[test]
    fn an_empty_key_is_a_usage_error() {
        assert_eq!(check_key("").map_err(|e| e.exit), Err(Exit::Usage));
        assert!(check_key("k").is_ok());
    }
}
