//! A 3-member etcd cluster for the chaos suite, each member in its own network namespace
//! (its own address, ports 2379/2380 on it). Members can be killed and started again on
//! their data directory; the leader and compaction go through etcd's JSON gateway
//! (`/v3/...`), so no `etcdctl` is needed.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::netns::Host;

pub struct Member {
    pub host: Host,
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://{}:2379", self.host.addr)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

fn post(endpoint: &str, path: &str, body: Value, timeout: Duration) -> Result<Value> {
    match ureq::post(&format!("{endpoint}{path}"))
        .timeout(timeout)
        .send_json(body)
    {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            bail!("{path}: {code}: {}", r.into_string().unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

impl EtcdCluster {
    /// Starts one member on each host (data and logs under `dir`) and waits until the
    /// cluster has a leader.
    pub async fn start(hosts: &[Host], dir: &std::path::Path) -> Result<EtcdCluster> {
        let initial_cluster = hosts
            .iter()
            .map(|h| format!("{}=http://{}:2380", h.name, h.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members: hosts
                .iter()
                .map(|h| Member {
                    host: h.clone(),
                    child: None,
                    data: dir.join(format!("{}.data", h.name)),
                    log: dir.join(format!("{}.log", h.name)),
                })
                .collect(),
            initial_cluster,
            token: format!("lhc-{:08x}", rand::random::<u32>()),
        };
        for i in 0..c.members.len() {
            c.spawn(i)?;
        }
        c.wait_leader(Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// The `--etcd` flag value: every member's client URL.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let addr = &m.host.addr;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let child = m
            .host
            .command("etcd")
            .args(["--name", &m.host.name, "--data-dir"])
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &format!("http://{addr}:2379,http://127.0.0.1:2379"),
                "--advertise-client-urls",
                &format!("http://{addr}:2379"),
                "--listen-peer-urls",
                &format!("http://{addr}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{addr}:2380"),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.token,
                // As etcd 3.5+ does by default: a member coming back from a partition asks
                // before campaigning, instead of deposing the leader with the higher term
                // it reached alone (≈3 s without a leader on etcd 3.4, enough to expire a
                // 3 s lease).
                "--pre-vote",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow!("start etcd (install etcd-server): {e}"))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// (member id, leader id) as member `i` reports them.
    fn status(&self, i: usize) -> Result<(String, String)> {
        let v = post(
            &self.members[i].endpoint(),
            "/v3/maintenance/status",
            json!({}),
            Duration::from_millis(700),
        )?;
        let id = v["header"]["member_id"].as_str().unwrap_or_default();
        let leader = v["leader"].as_str().unwrap_or_default();
        if id.is_empty() || leader.is_empty() || leader == "0" {
            bail!("member {i}: no leader");
        }
        Ok((id.to_owned(), leader.to_owned()))
    }

    /// Index of the leader as the running members see it.
    pub fn leader(&self) -> Option<usize> {
        let status: Vec<Option<(String, String)>> = (0..self.members.len())
            .map(|i| {
                if self.members[i].running() {
                    self.status(i).ok()
                } else {
                    None
                }
            })
            .collect();
        let leader_id = status.iter().flatten().map(|(_, l)| l.clone()).next()?;
        status
            .iter()
            .position(|s| s.as_ref().is_some_and(|(id, _)| *id == leader_id))
    }

    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("etcd: no leader after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// True when every running member answers /health.
    pub fn healthy(&self) -> bool {
        self.members.iter().filter(|m| m.running()).all(|m| {
            ureq::get(&format!("{}/health", m.endpoint()))
                .timeout(Duration::from_millis(700))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .is_some_and(|b| b.contains("true"))
        })
    }

    /// Compacts the keyspace up to the current revision (physically) through any member
    /// that answers; returns the revision.
    pub fn compact(&self) -> Result<i64> {
        // A member that just rejoined may refuse for a moment (seen as a bare 400), so
        // the whole round is tried a few times before the fault counts as not injected.
        let mut last = anyhow!("no running member");
        for round in 0..5 {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            match self.compact_once() {
                Ok(rev) => return Ok(rev),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn compact_once(&self) -> Result<i64> {
        let mut last = anyhow!("no running member");
        for m in self.members.iter().filter(|m| m.running()) {
            let ep = m.endpoint();
            let r = post(
                &ep,
                "/v3/kv/range",
                json!({"key": "AA=="}), // "\0": any key; only the header matters
                Duration::from_secs(2),
            )
            .and_then(|v| {
                let rev: i64 = v["header"]["revision"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow!("no revision in {v}"))?;
                match post(
                    &ep,
                    "/v3/kv/compaction",
                    json!({"revision": rev.to_string(), "physical": true}),
                    Duration::from_secs(5),
                ) {
                    Ok(_) => Ok(rev),
                    // Nothing written since the last compaction (lease keepalives do not
                    // move the revision): etcd answers "required revision has been
                    // compacted", which the gateway may send as a bare 400. The revision
                    // was read just before, so a 400 cannot mean a future revision.
                    Err(e)
                        if format!("{e:#}").contains("compacted")
                            || format!("{e:#}").contains("/v3/kv/compaction: 400") =>
                    {
                        Ok(rev)
                    }
                    Err(e) => Err(e),
                }
            });
            match r {
                Ok(rev) => return Ok(rev),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
