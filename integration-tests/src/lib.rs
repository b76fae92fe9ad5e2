//! Test harness: starts a real etcd and real `leasehold` processes on free loopback
//! ports in temp dirs, keeps their logs (printed when a test fails), and kills what it
//! started. Also an `EntityHandler` that checks the single-writer guarantee.

pub mod baseline;
pub mod browser;
pub mod chaos;
pub mod checker;
pub mod etcd_cluster;
pub mod kafka;
pub mod load;
pub mod netns;
pub mod openmetrics;
pub mod otlp;
pub mod pekko;
pub mod pki;
pub mod proxy;
pub mod scale;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_proto::v1::entities_client::EntitiesClient;
use serde_json::Value;
use tonic::transport::Channel;

/// A free TCP port on 127.0.0.1 for a server a test starts; one process is not given the
/// same port twice (until it has used up the range).
///
/// Taken from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so
/// that no port the kernel hands out on its own can take it between this check and the
/// server's bind: not a `:0` listener of an instance started earlier (a gateway on
/// `--http-listen 127.0.0.1:0` once took the admin port picked for the next instance),
/// and not the local end of an outgoing connection. Each process starts at its own
/// offset, so test processes running side by side rarely try the same ports; a port
/// something else listens on is skipped.
pub fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    let (low, high) = reserved_port_range();
    let span = high - low;
    let mut next = NEXT.lock().unwrap();
    let start = *next.get_or_insert_with(|| std::process::id().wrapping_mul(7919) % span);
    for i in 0..span {
        let offset = (start + i) % span;
        let port = (low + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            *next = Some((offset + 1) % span);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high}");
}

/// The ports `free_port` takes from: 10000 up to the start of the kernel's ephemeral
/// range (32768 by default).
fn reserved_port_range() -> (u32, u32) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    assert!(
        ephemeral_low > 11000,
        "the kernel's ephemeral port range starts at {ephemeral_low}: too low to keep test \
         servers' ports apart from it (net.ipv4.ip_local_port_range)"
    );
    (10000, ephemeral_low)
}

/// A child process killed (and reaped) when dropped, also when a panic unwinds.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Median and spread (min, max) of samples.
pub fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `leasehold` binary: `$LEASEHOLD_BIN`, else next to the test executable's folder.
pub fn leasehold_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LEASEHOLD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps → target/<profile>
    let bin = dir.join("leasehold");
    assert!(
        bin.exists(),
        "{} not found; build it with `cargo build --bin leasehold` or set LEASEHOLD_BIN",
        bin.display()
    );
    bin
}

/// `serve` flags of most scenarios: a 3 s lease, `handler`, and a 10 s request timeout
/// (room for a failover inside one call).
pub fn ttl_args(handler: &str) -> Vec<&str> {
    vec![
        "--lease-ttl",
        "3s",
        "--handler",
        handler,
        "--request-timeout",
        "10s",
    ]
}

/// An example program built next to the `leasehold` binary (`cargo build --example NAME`).
pub fn example_bin(name: &str) -> PathBuf {
    let bin = leasehold_bin()
        .parent()
        .expect("the binary's folder")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} not found; build it with `cargo build -p leasehold-server --example {name}`",
        bin.display()
    );
    bin
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A single-node etcd on loopback.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// `https` when started with TLS.
    scheme: &'static str,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags (e.g. `--auth-token-ttl`).
    pub async fn start_with(extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            scheme: "http",
        };
        etcd.spawn();
        etcd.wait_healthy().await;
        etcd
    }

    /// Starts etcd serving clients over TLS with `server` (for 127.0.0.1), and requiring
    /// client certificates signed by `ca`.
    pub async fn start_tls(ca: &pki::Ca, server: &pki::Leaf) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("tls");
        std::fs::create_dir_all(&files).unwrap();
        let ca_file = pki::write(&files, "ca.pem", &ca.pem);
        let cert = pki::write(&files, "server.pem", &server.cert);
        let key = pki::write(&files, "server.key", &server.key);
        let mut etcd = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
            extra: vec![
                "--cert-file".into(),
                cert,
                "--key-file".into(),
                key,
                "--trusted-ca-file".into(),
                ca_file,
                "--client-cert-auth".into(),
            ],
            scheme: "https",
        };
        etcd.spawn();
        // Its /health needs a client certificate: wait for the port instead (leasehold
        // retries until etcd answers).
        let port = etcd.client_port;
        wait_until(Duration::from_secs(20), "etcd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .await;
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd not found: install Debian's etcd-server (make test does)");
        self.child = Some(child);
    }

    async fn wait_healthy(&self) {
        let url = format!("{}/health", self.endpoint());
        wait_until(Duration::from_secs(20), "etcd to be healthy", || {
            let body = ureq::get(&url)
                .timeout(Duration::from_millis(500))
                .call()
                .ok()?
                .into_string()
                .ok()?;
            body.contains("true").then_some(())
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_healthy().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- etcd log (tail) ---\n{}",
                tail(&self.dir.path().join("etcd.log"), 20)
            );
        }
        self.stop();
    }
}

/// Settings for one instance; `args` are extra `serve` flags.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub id: String,
    pub etcd: String,
    pub args: Vec<String>,
}

/// A `leasehold serve` process.
pub struct Instance {
    pub id: String,
    pub grpc_port: u16,
    pub admin_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Instance {
    pub fn start(spec: &InstanceSpec) -> Instance {
        Self::start_program(&leasehold_bin(), &["serve"], spec)
    }

    /// [`Instance::start`] with extra environment variables (failpoints).
    pub fn start_with_env(spec: &InstanceSpec, env: &[(&str, &str)]) -> Instance {
        Self::spawn(&leasehold_bin(), &["serve"], spec, env)
    }

    /// An instance run by another program that takes `leasehold serve`'s flags after
    /// `leading` (an application embedding Leasehold).
    pub fn start_program(program: &Path, leading: &[&str], spec: &InstanceSpec) -> Instance {
        Self::spawn(program, leading, spec, &[])
    }

    fn spawn(
        program: &Path,
        leading: &[&str],
        spec: &InstanceSpec,
        env: &[(&str, &str)],
    ) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{}.log", spec.id));
        let (grpc_port, admin_port, peer_port) = (free_port(), free_port(), free_port());
        let mut command = Command::new(program);
        // The harness's own variables are no settings: the instance would warn of each.
        for own in [
            "LEASEHOLD_BIN",
            "LEASEHOLD_DEMO_BIN",
            "LEASEHOLD_KAFKA_LIBS",
            "LEASEHOLD_UPDATE_SCREENSHOTS",
            "LEASEHOLD_SOAK_SECONDS",
            "LEASEHOLD_PYTHON",
            "LEASEHOLD_CACHE",
            "LEASEHOLD_DEBUG_LOADS",
        ] {
            command.env_remove(own);
        }
        let child = command
            .args(leading)
            .args(["--id", &spec.id, "--etcd", &spec.etcd])
            .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--peer-listen", &format!("127.0.0.1:{peer_port}")])
            .args(&spec.args)
            .env("LEASEHOLD_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start leasehold");
        Instance {
            id: spec.id.clone(),
            grpc_port,
            admin_port,
            peer_port,
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        assert!(
            send_signal(self.pid(), sig),
            "kill -{sig} {} failed",
            self.pid()
        );
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let status = wait_until(timeout, "instance to exit", || child.try_wait().unwrap()).await;
        self.child = None;
        status.code()
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        get_json(&format!("{}{}", self.admin_url(), path))
    }

    /// Why `/readyz` says not ready (its 503 JSON `reason`); None when ready or unreachable.
    pub fn unready_reason(&self) -> Option<String> {
        match ureq::get(&format!("{}/readyz", self.admin_url()))
            .timeout(Duration::from_millis(500))
            .call()
        {
            Err(ureq::Error::Status(503, resp)) => resp
                .into_json::<Value>()
                .ok()?
                .get("reason")?
                .as_str()
                .map(str::to_owned),
            _ => None,
        }
    }

    pub fn ready(&self) -> bool {
        ureq::get(&format!("{}/readyz", self.admin_url()))
            .timeout(Duration::from_millis(500))
            .call()
            .is_ok()
    }

    pub async fn client(&self) -> EntitiesClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(self.grpc_url())
            .unwrap()
            .connect_lazy();
        EntitiesClient::new(ch)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of the series of the metric family `name` on `/metrics` whose line
    /// contains `label` (for example `transport="frames"`; 0 when it has none yet); None
    /// when the page cannot be read.
    pub fn metric_where(&self, name: &str, label: &str) -> Option<f64> {
        let text = ureq::get(&format!("{}/metrics", self.admin_url()))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        Some(
            text.lines()
                .filter(|l| l.split([' ', '{']).next() == Some(name) && l.contains(label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// [`Instance::metric_where`] over every series of `name`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metric_where(name, "")
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log (tail) ---\n{}", self.id, tail(&self.log, 40));
        }
        if let Some(mut c) = self.child.take() {
            send_signal(c.id() as i32, "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn send_signal(pid: i32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// GET a JSON document; None on any error.
pub fn get_json(url: &str) -> Option<Value> {
    ureq::get(url)
        .timeout(Duration::from_secs(2))
        .call()
        .ok()?
        .into_json()
        .ok()
}

/// Shard table from an admin endpoint: (shard, owner, epoch).
pub fn shard_table(instance: &Instance) -> Option<Vec<(u64, Option<String>, u64)>> {
    parse_shards(&instance.get("/v1/shards")?)
}

/// The (shard, owner, epoch) rows of a `/v1/shards` answer.
pub fn parse_shards(v: &Value) -> Option<Vec<(u64, Option<String>, u64)>> {
    Some(
        v["shards"]
            .as_array()?
            .iter()
            .map(|s| {
                (
                    s["shard"].as_u64().unwrap(),
                    s["owner"].as_str().map(str::to_owned),
                    s["epoch"].as_u64().unwrap(),
                )
            })
            .collect(),
    )
}

/// Every shard of `table` owned by one of `ids`, each owning its even share (within one).
pub fn balanced(table: &[(u64, Option<String>, u64)], ids: &[String]) -> bool {
    let (n, s) = (ids.len(), table.len());
    let counts: Vec<usize> = ids
        .iter()
        .map(|id| table.iter().filter(|t| t.1.as_deref() == Some(id)).count())
        .collect();
    counts.iter().sum::<usize>() == s && counts.iter().all(|&c| c >= s / n && c <= s.div_ceil(n))
}

/// A cluster of instances sharing one etcd.
pub struct Cluster {
    pub etcd: Etcd,
    pub instances: Vec<Instance>,
    pub args: Vec<String>,
}

impl Cluster {
    pub async fn start(n: usize, args: &[&str]) -> Cluster {
        let etcd = Etcd::start().await;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut c = Cluster {
            etcd,
            instances: Vec::new(),
            args,
        };
        for i in 0..n {
            c.add(&format!("n{i}"));
        }
        c
    }

    pub fn add(&mut self, id: &str) -> &Instance {
        let spec = InstanceSpec {
            id: id.into(),
            etcd: self.etcd.endpoint(),
            args: self.args.clone(),
        };
        self.instances.push(Instance::start(&spec));
        self.instances.last().unwrap()
    }

    /// Starts instance `i` again with the same id (after it was killed or stopped).
    pub fn restart(&mut self, i: usize) {
        let id = self.instances[i].id.clone();
        let spec = InstanceSpec {
            id,
            etcd: self.etcd.endpoint(),
            args: self.args.clone(),
        };
        self.instances[i] = Instance::start(&spec);
    }

    /// Waits until every shard is owned by a live instance and the counts are balanced.
    pub async fn wait_balanced(&self, timeout: Duration) -> Vec<(u64, Option<String>, u64)> {
        let ids: Vec<String> = self.instances.iter().map(|i| i.id.clone()).collect();
        let first = &self.instances[0];
        wait_until(timeout, "all shards owned and balanced", || {
            let table = shard_table(first)?;
            balanced(&table, &ids).then_some(table)
        })
        .await
    }
}
