//! `leasehold call` and `leasehold locate`: a client in the terminal.

use std::time::Duration;

use super::tls::{channel, TlsArgs};
use leasehold_proto::v1::{entities_client::EntitiesClient, CallRequest, LocateRequest};

async fn connect(
    addr: &str,
    tls: &TlsArgs,
) -> anyhow::Result<EntitiesClient<tonic::transport::Channel>> {
    Ok(EntitiesClient::new(channel(addr, tls).await?.0))
}

pub async fn call(
    addr: &str,
    tls: &TlsArgs,
    key: &str,
    payload: String,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut client = connect(addr, tls).await?;
    let mut request = tonic::Request::new(CallRequest {
        key: key.into(),
        payload: payload.into(),
    });
    request.set_timeout(timeout);
    let r = client
        .call(request)
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(format!(
        "key {key:?} shard {} epoch {} owner {}: {}",
        r.shard,
        r.epoch,
        r.owner,
        String::from_utf8_lossy(&r.payload)
    ))
}

pub async fn locate(addr: &str, tls: &TlsArgs, key: &str) -> anyhow::Result<String> {
    let mut client = connect(addr, tls).await?;
    let r = client
        .locate(LocateRequest { key: key.into() })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let owner = if r.owner.is_empty() {
        "-".to_owned()
    } else {
        format!("{} at {}", r.owner, r.address)
    };
    Ok(format!(
        "key {key:?} shard {} epoch {} owner {owner}",
        r.shard, r.epoch
    ))
}

/// `leasehold health`: the standard gRPC health check (serving = ready).
pub async fn health(addr: &str, tls: &TlsArgs, service: &str) -> anyhow::Result<String> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let (channel, url) = channel(addr, tls).await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .status;
    let status = ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown);
    if status != ServingStatus::Serving {
        anyhow::bail!("{url} is {}", status.as_str_name());
    }
    Ok(format!("{url} is SERVING"))
}
