//! `leasehold status`: the cluster as tables in a terminal.

use std::fmt::Write;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::tls::{AdminArgs, AdminClient};

#[derive(Debug, Deserialize)]
struct Cluster {
    cluster: String,
    shard_count: u32,
    leader: Option<String>,
    assignment_version: u64,
    members: usize,
    unowned_shards: usize,
}

#[derive(Debug, Deserialize)]
struct Member {
    id: String,
    address: String,
    admin_address: String,
    state: String,
    shards: usize,
}

#[derive(Debug, Deserialize)]
struct Members {
    members: Vec<Member>,
}

#[derive(Debug, Deserialize)]
struct Shard {
    shard: u32,
    owner: Option<String>,
    epoch: u64,
    state: String,
    assigned_to: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Shards {
    shards: Vec<Shard>,
}

fn fetch<T: for<'de> Deserialize<'de>>(admin: &AdminClient, path: &str) -> anyhow::Result<T> {
    let url = format!("{}{path}", admin.base);
    let resp = admin
        .request("GET", path)
        .call()
        .map_err(explain)
        .with_context(|| format!("GET {url}"))?;
    resp.into_json().with_context(|| format!("reading {url}"))
}

/// An HTTP error with the JSON `error` the admin plane sent.
fn explain(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let body: serde_json::Value = resp.into_json().unwrap_or_default();
            anyhow::anyhow!(
                "HTTP {code}: {}",
                body["error"].as_str().unwrap_or("(no message)")
            )
        }
        e => anyhow::Error::new(e),
    }
}

/// Renders shard numbers as ranges: `0-3,7,9-12`.
pub fn ranges(shards: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < shards.len() {
        let start = shards[i];
        let mut end = start;
        while i + 1 < shards.len() && shards[i + 1] == end + 1 {
            i += 1;
            end = shards[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// Prints the cluster summary, the members, and shard ownership (grouped by owner and
/// state, or one row per shard with `per_shard`).
pub fn run(args: &AdminArgs, per_shard: bool) -> anyhow::Result<String> {
    let admin = &AdminClient::new(args)?;
    let c: Cluster = fetch(admin, "/v1/cluster")?;
    let m: Members = fetch(admin, "/v1/members")?;
    let s: Shards = fetch(admin, "/v1/shards")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}  shards {}  members {}  leader {}  assignment v{}  unowned {}\n",
        c.cluster,
        c.shard_count,
        c.members,
        c.leader.as_deref().unwrap_or("-"),
        c.assignment_version,
        c.unowned_shards
    );
    let _ = writeln!(
        out,
        "{:<24} {:<9} {:>6}  {:<22} {}",
        "MEMBER", "STATE", "SHARDS", "ADDRESS", "ADMIN"
    );
    for m in &m.members {
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:>6}  {:<22} {}",
            m.id, m.state, m.shards, m.address, m.admin_address
        );
    }
    out.push('\n');
    if per_shard {
        let _ = writeln!(
            out,
            "{:>6}  {:<24} {:>10}  {:<8} {}",
            "SHARD", "OWNER", "EPOCH", "STATE", "ASSIGNED"
        );
        for s in &s.shards {
            let _ = writeln!(
                out,
                "{:>6}  {:<24} {:>10}  {:<8} {}",
                s.shard,
                s.owner.as_deref().unwrap_or("-"),
                s.epoch,
                s.state,
                s.assigned_to.as_deref().unwrap_or("-")
            );
        }
    } else {
        let mut groups: std::collections::BTreeMap<(String, String), Vec<u32>> = Default::default();
        for s in &s.shards {
            groups
                .entry((
                    s.owner.clone().unwrap_or_else(|| "-".into()),
                    s.state.clone(),
                ))
                .or_default()
                .push(s.shard);
        }
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>6}  {}",
            "OWNER", "STATE", "COUNT", "SHARDS"
        );
        for ((owner, state), shards) in groups {
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:>6}  {}",
                owner,
                state,
                shards.len(),
                ranges(&shards)
            );
        }
    }
    Ok(out)
}

/// `leasehold drain`: marks the member behind `admin` draining (or `member`, when given)
/// and waits until it owns no shard. Used as the Kubernetes preStop hook.
pub fn drain(args: &AdminArgs, member: Option<&str>, wait: Duration) -> anyhow::Result<String> {
    let admin = &AdminClient::new(args)?;
    let id = match member {
        Some(m) => m.to_owned(),
        None => fetch::<serde_json::Value>(admin, "/v1/cluster")?["self"]
            .as_str()
            .context("admin endpoint did not say which member it is")?
            .to_owned(),
    };
    let path = format!("/v1/members/{id}/drain");
    admin
        .request("POST", &path)
        .call()
        .map_err(explain)
        .with_context(|| format!("POST {}{path}", admin.base))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        let members: Members = fetch(admin, "/v1/members")?;
        let owned = members
            .members
            .iter()
            .find(|m| m.id == id)
            .map_or(0, |m| m.shards);
        if owned == 0 {
            return Ok(format!("member {id} drained"));
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("member {id} still owns {owned} shards after {wait:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn shard_ranges_are_compact() {
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[5]), "5");
    }
}
