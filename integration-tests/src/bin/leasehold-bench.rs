//! `make bench`: the core's speed and memory targets, each measured against a baseline
//! taken in the same run on the same machine, written to docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_integration_tests::load::{self, Load};
use leasehold_integration_tests::{
    free_port, median_spread, shard_table, wait_until, Cluster, KillOnDrop,
};
use leasehold_proto::v1::entities_client::EntitiesClient;
use leasehold_proto::v1::entities_server::{Entities, EntitiesServer};
use leasehold_proto::v1::{
    CallRequest, CallResponse, LocateRequest, LocateResponse, RoutingTable, WatchRoutingRequest,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The baseline: a plain tonic server answering Call with its payload.
struct RawEcho;

#[tonic::async_trait]
impl Entities for RawEcho {
    async fn call(&self, r: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(CallResponse {
            payload: r.payload,
            shard: 0,
            epoch: 0,
            owner: String::new(),
        }))
    }

    async fn locate(&self, _: Request<LocateRequest>) -> Result<Response<LocateResponse>, Status> {
        Err(Status::unimplemented("raw echo"))
    }

    type WatchRoutingStream = futures::stream::Empty<Result<RoutingTable, Status>>;

    async fn watch_routing(
        &self,
        _: Request<WatchRoutingRequest>,
    ) -> Result<Response<Self::WatchRoutingStream>, Status> {
        Err(Status::unimplemented("raw echo"))
    }
}

fn raw_server(port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(EntitiesServer::new(RawEcho))
            .serve(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
    });
}

fn client(url: &str) -> EntitiesClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .connect_lazy();
    EntitiesClient::new(ch)
}

/// Calls per second over `secs` with `concurrency` callers and random keys.
async fn throughput(c: EntitiesClient<Channel>, concurrency: usize, secs: u64) -> f64 {
    let keys: Vec<String> = (0..concurrency)
        .flat_map(|w| (0..997).map(move |i| format!("k{w}-{i}")))
        .collect();
    keyed_throughput(c, Arc::new(keys), concurrency, secs).await
}

/// Calls per second over `secs` with `concurrency` callers spread over `keys`.
async fn keyed_throughput(
    c: EntitiesClient<Channel>,
    keys: Arc<Vec<String>>,
    concurrency: usize,
    secs: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (mut c, done, errors, stop) = (c.clone(), done.clone(), errors.clone(), stop.clone());
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            // Each caller walks its own stretch of the keys.
            let mut i = w * keys.len() / concurrency;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let req = CallRequest {
                    key: keys[i % keys.len()].clone(),
                    payload: vec![1u8; 64].into(),
                };
                match c.call(req).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let start = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate = (done.load(Ordering::Relaxed) - start.0) as f64 / start.1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "calls failed during the throughput run"
    );
    rate
}

/// p50 / p99 of sequential calls for `keys`.
async fn latency(
    mut c: EntitiesClient<Channel>,
    keys: &[String],
    rounds: usize,
) -> (Duration, Duration) {
    let mut l = Vec::new();
    for r in 0..rounds {
        let key = &keys[r % keys.len()];
        let t = Instant::now();
        c.call(CallRequest {
            key: key.clone(),
            payload: vec![1u8; 64].into(),
        })
        .await
        .unwrap();
        l.push(t.elapsed());
    }
    l.sort();
    (l[l.len() / 2], l[l.len() * 99 / 100])
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// CPU time (user + system) a process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is the 3rd field, utime the 14th and stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0] + f[1]) as f64 / clock_ticks()
}

/// The kernel's clock ticks per second (the unit of /proc CPU times).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("CLK_TCK")
    })
}

struct Row {
    name: &'static str,
    measured: String,
    baseline: String,
    target: &'static str,
    met: bool,
}

async fn bench() -> Vec<Row> {
    let mut rows = vec![owner_path_throughput().await];
    rows.extend(forwarded_latency().await);
    rows.push(idle_rss().await);
    rows.extend(tls_cost().await);
    rows.extend(recovery_and_drain().await);
    rows
}

/// Owner path vs a raw tonic echo server, same client, alternating five times: the
/// median of the five back-to-back ratios (a slow stretch of the machine hits both sides
/// of a pair), with their spread.
async fn owner_path_throughput() -> Row {
    let (conc, secs, pairs) = (32, 3, 5);
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let mut raw = std::process::Command::new(exe)
        .args(["raw-server", &port.to_string()])
        .spawn()
        .unwrap();
    let cluster = Cluster::start(1, &["--max-concurrency", "4096"]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    let raw_c = client(&format!("http://127.0.0.1:{port}"));
    let lh_c = cluster.instances[0].client().await;
    // Warm-up: connections, the instance's first calls.
    throughput(raw_c.clone(), conc, 1).await;
    throughput(lh_c.clone(), conc, 1).await;
    let (mut raws, mut lhs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        let r = throughput(raw_c.clone(), conc, secs).await;
        let l = throughput(lh_c.clone(), conc, secs).await;
        raws.push(r);
        lhs.push(l);
        ratios.push(l / r);
    }
    let _ = raw.kill();
    let _ = raw.wait();
    let (lh, lh_lo, lh_hi) = median_spread(lhs);
    let (rw, rw_lo, rw_hi) = median_spread(raws);
    let (ratio, r_lo, r_hi) = median_spread(ratios);
    let spread = r_hi / r_lo - 1.0;
    eprintln!("owner path {lh:.0}/s raw {rw:.0}/s ratio {ratio:.2} ({r_lo:.2}–{r_hi:.2})");
    Row {
        name: "owner-path Call throughput (1 instance, echo, 32 callers)",
        measured: format!("{lh:.0} calls/s ({pairs} runs: {lh_lo:.0}–{lh_hi:.0})"),
        baseline: format!(
            "raw tonic echo {rw:.0} calls/s ({rw_lo:.0}–{rw_hi:.0}) → ratio {ratio:.2} (median of {pairs} back-to-back pairs: {r_lo:.2}–{r_hi:.2}){}",
            if spread > 0.3 {
                "; spread > 30 %: inconclusive"
            } else {
                ""
            }
        ),
        target: "≥ 0.8× raw",
        met: ratio >= 0.8,
    }
}

/// p50 / p99 of sequential calls for `keys` through the smart client.
async fn smart_latency(
    c: &leasehold_client::Client,
    keys: &[String],
    rounds: usize,
) -> (Duration, Duration) {
    let mut l = Vec::new();
    for r in 0..rounds {
        let key = &keys[r % keys.len()];
        let t = Instant::now();
        let reply = c.call(key, vec![1u8; 64]).await.unwrap();
        l.push(t.elapsed());
        assert!(
            !reply.forwarded,
            "the smart client called a non-owner for {key}"
        );
    }
    l.sort();
    (l[l.len() / 2], l[l.len() * 99 / 100])
}

/// The median of `runs` and the spread (max / min − 1) of a latency measured several times.
fn latency_median(mut runs: Vec<Duration>) -> (Duration, f64) {
    runs.sort();
    let spread = runs[runs.len() - 1].as_secs_f64() / runs[0].as_secs_f64() - 1.0;
    (runs[runs.len() / 2], spread)
}

/// Forwarded and smart-client latency against the direct call (2 instances; keys owned
/// by n0): direct to n0, through n1 (one hop), and the smart client seeded with n1 only
/// (it follows the routing table to n0). Runs alternate, 3 rounds; medians reported.
async fn forwarded_latency() -> Vec<Row> {
    // Before the cluster starts: nothing else runs while the floor is measured.
    let floor = tokio::task::spawn_blocking(relay_floor).await.unwrap();
    let cluster = Cluster::start(2, &[]).await;
    let table = cluster.wait_balanced(Duration::from_secs(10)).await;
    let count = table.len() as u32;
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("key-{i}"))
        .filter(|k| {
            table[leasehold_types::shard_for_key(k.as_bytes(), count).0 as usize]
                .1
                .as_deref()
                == Some("n0")
        })
        .take(200)
        .collect();
    let direct = cluster.instances[0].client().await;
    let forwarded = cluster.instances[1].client().await;
    let smart = leasehold_client::Client::builder()
        .seed(cluster.instances[1].grpc_url())
        .connect()
        .await
        .expect("routing table");
    latency(direct.clone(), &keys, 500).await; // warm-up every path
    latency(forwarded.clone(), &keys, 500).await;
    smart_latency(&smart, &keys, 500).await;
    let (mut d, mut f, mut m) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        d.push(latency(direct.clone(), &keys, 2000).await);
        f.push(latency(forwarded.clone(), &keys, 2000).await);
        m.push(smart_latency(&smart, &keys, 2000).await);
    }
    let p50 = |v: &[(Duration, Duration)]| latency_median(v.iter().map(|x| x.0).collect());
    let p99 = |v: &[(Duration, Duration)]| latency_median(v.iter().map(|x| x.1).collect());
    let ((d50, d50s), (d99, _)) = (p50(&d), p99(&d));
    let ((f50, f50s), (f99, _)) = (p50(&f), p99(&f));
    let ((m50, m50s), _) = (p50(&m), p99(&m));
    let (fr50, fr99) = (
        f50.as_secs_f64() / d50.as_secs_f64(),
        f99.as_secs_f64() / d99.as_secs_f64(),
    );
    let mr = m50.as_secs_f64() / d50.as_secs_f64();
    let spread = |s: f64| format!("spread {:.0} %", s * 100.0);
    // Throughput with 32 callers: every call entering the non-owner, against the same
    // calls sent to the owner; alternating, 3 rounds of 3 s.
    let owned = Arc::new(keys.clone());
    let (mut dt, mut ft) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        dt.push(keyed_throughput(direct.clone(), owned.clone(), 32, 3).await);
        ft.push(keyed_throughput(forwarded.clone(), owned.clone(), 32, 3).await);
    }
    let (dtm, dlo, dhi) = median_spread(dt);
    let (ftm, flo, fhi) = median_spread(ft);
    let (dts, fts) = (dhi / dlo - 1.0, fhi / flo - 1.0);
    let tr = ftm / dtm;
    vec![
        floor,
        Row {
            name: "forwarded Call throughput (2 instances, 32 callers, every call entering the non-owner)",
            measured: format!("{ftm:.0} calls/s (3 runs, spread {:.0} %)", fts * 100.0),
            baseline: format!(
                "the same calls sent to the owner: {dtm:.0} calls/s (spread {:.0} %) → ratio {tr:.2}",
                dts * 100.0
            ),
            target: "report",
            met: true,
        },
        Row {
            name: "forwarded Call p50 / p99 (sequential, 2 instances)",
            measured: format!("p50 {f50:?} ({}), p99 {f99:?}", spread(f50s)),
            baseline: format!(
                "direct-to-owner p50 {d50:?} ({}), p99 {d99:?} → ratios {fr50:.2} / {fr99:.2}",
                spread(d50s)
            ),
            target: "≤ 1.5× direct p50, ≤ 2× direct p99",
            met: fr50 <= 1.5 && fr99 <= 2.0,
        },
        Row {
            name: "smart client (leasehold-client, seeded with the non-owner) p50",
            measured: format!("p50 {m50:?} ({}), 0 forwards", spread(m50s)),
            baseline: format!(
                "direct-to-owner p50 {d50:?} → ratio {mr:.2}{}",
                if m50s.max(d50s) > 0.3 {
                    "; spread > 30 %: inconclusive"
                } else {
                    ""
                }
            ),
            target: "within 5 % of direct",
            met: mr <= 1.05,
        },
    ]
}

/// What one hop costs on this machine with no protocol at all: sequential 100-byte
/// round trips over loopback TCP (blocking threads, `TCP_NODELAY`) to an echo server, and
/// the same through a relay thread that copies each message to the echo server and back.
/// The forward hop's p50 ratio is read against this floor.
fn relay_floor() -> Row {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    const SIZE: usize = 100;
    fn serve(listener: TcpListener, upstream: Option<std::net::SocketAddr>) {
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut up = upstream.map(|a| {
                        let s = TcpStream::connect(a).unwrap();
                        s.set_nodelay(true).unwrap();
                        s
                    });
                    let mut buf = [0u8; SIZE];
                    while conn.read_exact(&mut buf).is_ok() {
                        if let Some(up) = up.as_mut() {
                            if up.write_all(&buf).is_err() || up.read_exact(&mut buf).is_err() {
                                return;
                            }
                        }
                        if conn.write_all(&buf).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    let bind = || TcpListener::bind("127.0.0.1:0").unwrap();
    let (echo, relay) = (bind(), bind());
    let (echo_at, relay_at) = (echo.local_addr().unwrap(), relay.local_addr().unwrap());
    serve(echo, None);
    serve(relay, Some(echo_at));
    let run = |to: std::net::SocketAddr, n: usize| {
        let mut s = TcpStream::connect(to).unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [7u8; SIZE];
        let mut l: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                s.write_all(&buf).unwrap();
                s.read_exact(&mut buf).unwrap();
                t.elapsed()
            })
            .collect();
        l.sort();
        (l[n / 2], l[n * 99 / 100])
    };
    run(echo_at, 500);
    run(relay_at, 500);
    let (mut d, mut r) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        d.push(run(echo_at, 3000));
        r.push(run(relay_at, 3000));
    }
    let p50 = |v: &[(Duration, Duration)]| latency_median(v.iter().map(|x| x.0).collect());
    let p99 = |v: &[(Duration, Duration)]| latency_median(v.iter().map(|x| x.1).collect());
    let ((d50, _), (d99, _), (r50, r50s), (r99, _)) = (p50(&d), p99(&d), p50(&r), p99(&r));
    Row {
        name: "one hop with no protocol: loopback TCP through a relay (sequential 100 B round trips; informative floor of the forward hop)",
        measured: format!("p50 {r50:?} ({:.0} % spread), p99 {r99:?}", r50s * 100.0),
        baseline: format!(
            "the same round trips straight to the echo server: p50 {d50:?}, p99 {d99:?} → ratios {:.2} / {:.2}",
            r50.as_secs_f64() / d50.as_secs_f64(),
            r99.as_secs_f64() / d99.as_secs_f64()
        ),
        target: "report",
        met: true,
    }
}

/// `serve` flags for TLS on the client plane and mutual TLS on the peer plane, the
/// client's channel config, and the directory holding the files.
struct TlsSetup {
    args: Vec<String>,
    ca: String,
    client: leasehold_integration_tests::pki::Leaf,
    _dir: tempfile::TempDir,
}

fn tls_setup() -> TlsSetup {
    use leasehold_integration_tests::pki::{write, Ca};
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, peer_ca) = (Ca::new("client CA"), Ca::new("peer CA"));
    let server = client_ca.issue(&["127.0.0.1"]);
    let peer = peer_ca.issue(&["leasehold-peer"]);
    let d = dir.path();
    let args = [
        ("--tls-cert", write(d, "c.pem", &server.cert)),
        ("--tls-key", write(d, "c.key", &server.key)),
        ("--tls-client-ca", write(d, "ca.pem", &client_ca.pem)),
        ("--peer-ca", write(d, "pca.pem", &peer_ca.pem)),
        ("--peer-cert", write(d, "p.pem", &peer.cert)),
        ("--peer-key", write(d, "p.key", &peer.key)),
    ]
    .into_iter()
    .flat_map(|(f, v)| [f.to_owned(), v])
    .collect();
    TlsSetup {
        args,
        client: client_ca.issue(&["bench-client"]),
        ca: client_ca.pem,
        _dir: dir,
    }
}

fn tls_client(port: u16, tls: &TlsSetup) -> EntitiesClient<Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca))
        .identity(Identity::from_pem(&tls.client.cert, &tls.client.key))
        .domain_name("127.0.0.1");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true)
        .tls_config(config)
        .unwrap()
        .connect_lazy();
    EntitiesClient::new(ch)
}

/// Keys of shards `owner` owns.
fn keys_owned_by(table: &[(u64, Option<String>, u64)], owner: &str, n: usize) -> Vec<String> {
    let count = table.len() as u32;
    (0..100_000)
        .map(|i| format!("key-{i}"))
        .filter(|k| {
            table[leasehold_types::shard_for_key(k.as_bytes(), count).0 as usize]
                .1
                .as_deref()
                == Some(owner)
        })
        .take(n)
        .collect()
}

/// What TLS costs: the owner path's throughput and the forwarded call's latency with
/// TLS on the client plane and mutual TLS on the peer plane, against the same clusters
/// in plaintext, alternating.
async fn tls_cost() -> Vec<Row> {
    let (conc, secs) = (32, 5);
    let tls = tls_setup();
    let tls_args: Vec<&str> = tls.args.iter().map(String::as_str).collect();
    let mut owner_args = vec!["--max-concurrency", "4096"];
    owner_args.extend(&tls_args);
    let plain1 = Cluster::start(1, &["--max-concurrency", "4096"]).await;
    let tls1 = Cluster::start(1, &owner_args).await;
    plain1.wait_balanced(Duration::from_secs(10)).await;
    tls1.wait_balanced(Duration::from_secs(10)).await;
    let plain_c = plain1.instances[0].client().await;
    let tls_c = tls_client(tls1.instances[0].grpc_port, &tls);
    let (mut plain_best, mut tls_best) = (0f64, 0f64);
    for _ in 0..2 {
        plain_best = plain_best.max(throughput(plain_c.clone(), conc, secs).await);
        tls_best = tls_best.max(throughput(tls_c.clone(), conc, secs).await);
    }
    drop((plain1, tls1));
    let throughput_ratio = tls_best / plain_best;

    let plain2 = Cluster::start(2, &[]).await;
    let tls2 = Cluster::start(2, &tls_args).await;
    let plain_table = plain2.wait_balanced(Duration::from_secs(10)).await;
    let tls_table = tls2.wait_balanced(Duration::from_secs(10)).await;
    let plain_keys = keys_owned_by(&plain_table, "n0", 200);
    let tls_keys = keys_owned_by(&tls_table, "n0", 200);
    let plain_fwd = plain2.instances[1].client().await;
    let tls_fwd = tls_client(tls2.instances[1].grpc_port, &tls);
    let tls_direct = tls_client(tls2.instances[0].grpc_port, &tls);
    latency(plain_fwd.clone(), &plain_keys, 500).await; // warm-up
    latency(tls_fwd.clone(), &tls_keys, 500).await;
    latency(tls_direct.clone(), &tls_keys, 500).await;
    let (p50, p99) = latency(plain_fwd, &plain_keys, 3000).await;
    let (t50, t99) = latency(tls_fwd, &tls_keys, 3000).await;
    let (d50, _) = latency(tls_direct, &tls_keys, 3000).await;
    let latency_ratio = t50.as_secs_f64() / p50.as_secs_f64();
    eprintln!(
        "TLS owner path {tls_best:.0}/s vs {plain_best:.0}/s; forwarded p50 {t50:?} vs {p50:?}"
    );
    vec![
        Row {
            name:
                "owner-path Call throughput over TLS + client certificates (1 instance, 32 callers)",
            measured: format!("{tls_best:.0} calls/s"),
            baseline: format!("plaintext {plain_best:.0} calls/s → ratio {throughput_ratio:.2}"),
            target: "report (cost of TLS)",
            met: true,
        },
        Row {
            name:
                "forwarded Call p50 with TLS clients and mutual-TLS peers (sequential, 2 instances)",
            measured: format!("p50 {t50:?}, p99 {t99:?} (direct over TLS: p50 {d50:?})"),
            baseline: format!(
                "plaintext forwarded p50 {p50:?}, p99 {p99:?} → ratio {latency_ratio:.2}"
            ),
            target: "report (cost of TLS)",
            met: true,
        },
    ]
}

/// Idle RSS with 1024 shards, against an idle etcd-free baseline of the same binary.
async fn idle_rss() -> Row {
    let cluster = Cluster::start(3, &[]).await;
    cluster.wait_balanced(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss: Vec<u64> = cluster.instances.iter().map(|i| rss_kib(i.pid())).collect();
    let single = {
        let c1 = Cluster::start(1, &[]).await;
        c1.wait_balanced(Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss_kib(c1.instances[0].pid())
    };
    let max = *rss.iter().max().unwrap();
    Row {
        name: "idle RSS per instance, 1024 shards",
        measured: format!(
            "3 instances: {} MiB max; 1 instance owning all 1024: {:.1} MiB",
            fmt_mib(max),
            single as f64 / 1024.0
        ),
        baseline: "—".into(),
        target: "≤ 30 MB",
        met: max.max(single) * 1024 <= 30_000_000,
    }
}

/// Recovery after SIGKILL (default TTL 5 s) and SIGTERM drain, both under load.
async fn recovery_and_drain() -> Vec<Row> {
    let mut rows = Vec::new();
    for (scenario, signal) in [("kill", "KILL"), ("term2", "TERM"), ("term3", "TERM")] {
        let n = if scenario == "term2" { 2 } else { 3 };
        let mut cluster = Cluster::start(n, &[]).await;
        let before = cluster.wait_balanced(Duration::from_secs(10)).await;
        let targets = load::targets(&cluster.instances).await;
        let victim = cluster.instances.len() - 1;
        let victim_id = cluster.instances[victim].id.clone();
        let moved = before
            .iter()
            .filter(|s| s.1.as_deref() == Some(victim_id.as_str()))
            .count();
        let stop = Arc::new(AtomicBool::new(false));
        let spec = Load {
            keys: 1000,
            concurrency: 16,
            total: None,
            timeout: Duration::from_secs(10),
            payload: 64,
        };
        let loader = tokio::spawn(load::run(targets.clone(), spec, stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            targets.take_out(&victim_id, Duration::from_secs(10)).await,
            "calls sent to {victim_id} still ran 10 s after it was taken out"
        );
        let t = Instant::now();
        cluster.instances[victim].signal(signal);
        let took = if signal == "KILL" {
            wait_until(Duration::from_secs(20), "shards re-owned", || {
                let table = shard_table(&cluster.instances[0])?;
                table
                    .iter()
                    .all(|s| s.1.is_some() && s.1.as_deref() != Some(victim_id.as_str()))
                    .then_some(())
            })
            .await;
            t.elapsed()
        } else {
            cluster.instances[victim]
                .wait_exit(Duration::from_secs(20))
                .await;
            t.elapsed()
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let report = loader.await.unwrap();
        for (instance, error) in report.failed.iter().take(5) {
            eprintln!("{scenario}: a call through {instance} failed: {error}");
        }
        if signal == "KILL" {
            cluster.instances.remove(victim);
            rows.push(Row {
                name: "recovery after SIGKILL (lease TTL 5 s, 3 instances, under load)",
                measured: format!(
                    "{took:.2?} for {moved} shards; {} calls ok, {} failed",
                    report.ok,
                    report.failed.len()
                ),
                baseline: "TTL 5 s".into(),
                target: "≤ TTL + 1 s",
                met: took <= Duration::from_secs(6) && report.failed.is_empty(),
            });
        } else {
            rows.push(Row {
                name: if n == 2 {
                    "SIGTERM drain to exit (2 instances, 1024 shards)"
                } else {
                    "SIGTERM drain to exit (3 instances, 1024 shards)"
                },
                measured: format!(
                    "{took:.2?} moving {moved} shards; {} calls ok, {} failed",
                    report.ok,
                    report.failed.len()
                ),
                baseline: "—".into(),
                target: "≤ 2 s, 0 failed calls",
                met: took <= Duration::from_secs(2) && report.failed.is_empty(),
            });
        }
    }
    rows
}

/// One timed run of a consumer group over a topic.
struct GroupRun {
    /// Messages per second from the group's start to its last commit.
    rate: f64,
    /// Messages per second while the group committed from 20 % to 80 % of them: the
    /// steady rate, without the group's start (members joining, rebalancing) and tail.
    steady: f64,
    /// CPU seconds the group's processes used meanwhile.
    cpu: f64,
}

/// The group's committed total over time, polled until it reaches `end`.
async fn follow_commits(
    kafka: &leasehold_integration_tests::kafka::Kafka,
    topic: &str,
    group: &str,
    end: &[i64],
    start: Instant,
) -> Vec<(f64, i64)> {
    // `KAFKA_BENCH_TIMELINE=1`: print each sample (where the time goes: start,
    // rebalances, steady rate).
    let timeline = std::env::var_os("KAFKA_BENCH_TIMELINE").is_some();
    let mut samples = Vec::new();
    wait_until(Duration::from_secs(1800), "all messages committed", || {
        let committed = kafka.position(group, topic, end.len() as i32);
        let done: i64 = committed.iter().sum();
        samples.push((start.elapsed().as_secs_f64(), done));
        if timeline {
            eprintln!(
                "  {:>6.2} s  committed {done} {committed:?} of {end:?}",
                start.elapsed().as_secs_f64()
            );
        }
        (committed == end).then_some(())
    })
    .await;
    samples
}

/// The rate between the first samples at or past 20 % and 80 % of `total`.
fn steady_rate(samples: &[(f64, i64)], total: usize) -> f64 {
    let at = |share: f64| {
        samples
            .iter()
            .find(|(_, done)| *done as f64 >= share * total as f64)
            .copied()
    };
    match (at(0.2), at(0.8)) {
        (Some((t1, d1)), Some((t2, d2))) if t2 > t1 => (d2 - d1) as f64 / (t2 - t1),
        _ => 0.0,
    }
}

/// How often both sides of the Kafka pairs commit (`KAFKA_BENCH_COMMIT_MS`, default
/// 100): the run ends at the group's last commit, and the plain no-op group finishes a
/// million messages in one to three seconds, so librdkafka's usual second between
/// commits made its figure jump between two values (310 k and 820 k msg/s) with where
/// its last message fell between two commits.
fn kafka_commit_interval() -> Duration {
    let ms = std::env::var("KAFKA_BENCH_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ms)
}

/// Messages per second for a consumer group of `n` plain consumer processes (handler:
/// none, or the no-op `EntityHandler` at `handler`), from their start until the group
/// committed every message, and the CPU seconds the processes used meanwhile.
async fn plain_group(
    kafka: &leasehold_integration_tests::kafka::Kafka,
    topic: &str,
    group: &str,
    n: usize,
    handler: Option<&str>,
    total: usize,
) -> GroupRun {
    let exe = std::env::current_exe().unwrap();
    let end = kafka.end_offsets(topic, 6);
    let t = Instant::now();
    // Killed when dropped, also when the wait below panics.
    let procs: Vec<KillOnDrop> = (0..n)
        .map(|_| {
            KillOnDrop(
                std::process::Command::new(&exe)
                    .args(["plain-consumer", &kafka.brokers(), topic, group])
                    .args(handler)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let samples = follow_commits(kafka, topic, group, &end, t).await;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let cpu = procs.iter().map(|p| cpu_seconds(p.0.id() as i32)).sum();
    drop(procs);
    GroupRun {
        rate,
        steady: steady_rate(&samples, total),
        cpu,
    }
}

/// Messages per second for Leasehold: `n` instances (on a running etcd) with `handler`,
/// from their start until the group committed every message, the CPU seconds the
/// instances used meanwhile, and the cluster.
async fn leasehold_group(
    kafka: &leasehold_integration_tests::kafka::Kafka,
    topic: &str,
    group: &str,
    n: usize,
    handler: &str,
    total: usize,
) -> (GroupRun, Cluster) {
    let brokers = kafka.brokers();
    let log = std::env::var("KAFKA_BENCH_LOG").unwrap_or_else(|_| "info".into());
    let args = [
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        topic,
        "--kafka-group",
        group,
        "--kafka-key",
        "json:/account",
        // Every message has a key and the handler never fails.
        "--kafka-on-failure",
        "skip",
        "--handler",
        handler,
        "--log",
        &log,
    ];
    // Extra instance flags for diagnosis, e.g. `--kafka-property debug=cgrp`.
    let extra = std::env::var("KAFKA_BENCH_ARGS").unwrap_or_default();
    let args: Vec<&str> = args
        .iter()
        .copied()
        .chain(extra.split_whitespace())
        .collect();
    // The same commit interval as the plain group's (see `kafka_commit_interval`).
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[[kafka]]\ncommit_interval = \"{}ms\"\n",
            kafka_commit_interval().as_millis()
        ),
    )
    .unwrap();
    let config_path = config.path().display().to_string();
    let args: Vec<&str> = ["--config", config_path.as_str()]
        .into_iter()
        .chain(args)
        .collect();
    let end = kafka.end_offsets(topic, 6);
    // etcd first, outside the timing: the baseline has no coordination service to start.
    let mut cluster = Cluster::start(0, &args).await;
    let t = Instant::now();
    for i in 0..n {
        cluster.add(&format!("n{i}"));
    }
    let samples = follow_commits(kafka, topic, group, &end, t).await;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    let cpu = cluster.instances.iter().map(|i| cpu_seconds(i.pid())).sum();
    // `KAFKA_BENCH_KEEP_LOGS=dir`: the instances' logs of every run, for diagnosis.
    if let Some(dir) = std::env::var_os("KAFKA_BENCH_KEEP_LOGS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for i in &cluster.instances {
            std::fs::write(dir.join(format!("{group}-{}.log", i.id)), i.log_text()).unwrap();
        }
    }
    let run = GroupRun {
        rate,
        steady: steady_rate(&samples, total),
        cpu,
    };
    (run, cluster)
}

/// Kafka throughput against what users write today, alternating A/B three times.
async fn kafka_bench() -> Vec<Row> {
    use leasehold_integration_tests::kafka::{send_all, Kafka};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::ClientConfig;

    // The no-op pair runs long enough that start-up (group join, which takes up to a
    // heartbeat interval when members join one after another) and the last commit
    // interval are a small part of it on both sides; the gRPC pair is 30 times slower
    // per message and reads fewer.
    let total: usize = std::env::var("KAFKA_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let total_grpc: usize = std::env::var("KAFKA_BENCH_GRPC_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let instances: usize = std::env::var("KAFKA_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kafka = Kafka::start().await;
    let pad = "x".repeat(150);
    for (topic, total) in [("bench", total), ("bench-grpc", total_grpc)] {
        kafka.create_topic(topic, 6).await;
        let values: Vec<Vec<u8>> = (0..total)
            .map(|i| {
                format!(
                    r#"{{"account":"acct-{}","seq":{i},"pad":"{pad}"}}"#,
                    i % 10_000
                )
                .into_bytes()
            })
            .collect();
        let t = Instant::now();
        send_all(&kafka.producer(), topic, &values).await;
        eprintln!(
            "produced {total} messages of ~{} B to {topic} in {:?}",
            values[0].len(),
            t.elapsed()
        );
    }

    // Informative: a raw consume-only loop (also warms the broker's page cache).
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("group.id", "raw-baseline")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["bench"]).unwrap();
    let mut n = 0;
    let t = Instant::now();
    while n < total {
        consumer.recv().await.unwrap();
        n += 1;
    }
    let raw = total as f64 / t.elapsed().as_secs_f64();
    drop(consumer);
    eprintln!("raw consume: {raw:.0} msg/s");

    let handler_port = free_port();
    // Killed also when a phase panics (no stray handler left behind).
    let mut handler = KillOnDrop(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["noop-handler", &handler_port.to_string()])
            .spawn()
            .unwrap(),
    );
    let handler_url = format!("grpc://127.0.0.1:{handler_port}");
    let plain_url = format!("http://127.0.0.1:{handler_port}");
    // `KAFKA_BENCH_NOOP_ONLY=1` (diagnosis): the gRPC-handler pair is skipped and
    // reported as 0, and so is the latency run.
    let noop_only = std::env::var_os("KAFKA_BENCH_NOOP_ONLY").is_some();
    let mut samples: [Vec<f64>; 4] = Default::default();
    // CPU microseconds per message of the no-op pair: plain group, Leasehold.
    let mut cpu: [Vec<f64>; 2] = Default::default();
    // Steady rates of the no-op pair: plain group, Leasehold.
    let mut steady: [Vec<f64>; 2] = Default::default();
    let mut last = None;
    // `KAFKA_BENCH_ROUNDS` (default 3) for quicker diagnosis runs.
    let rounds: usize = std::env::var("KAFKA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    for round in 0..rounds {
        let plain = plain_group(
            &kafka,
            "bench",
            &format!("plain-noop-{round}"),
            instances,
            None,
            total,
        )
        .await;
        let (lh, cluster) = leasehold_group(
            &kafka,
            "bench",
            &format!("lh-noop-{round}"),
            instances,
            "echo",
            total,
        )
        .await;
        drop(cluster);
        for (i, run) in [plain, lh].iter().enumerate() {
            samples[i].push(run.rate);
            cpu[i].push(run.cpu * 1e6 / total as f64);
            steady[i].push(run.steady);
        }
        if noop_only {
            samples[2].push(0.0);
            samples[3].push(0.0);
            eprintln!(
                "kafka round {round}: plain no-op {:.0}, leasehold no-op {:.0} msg/s (steady {:.0} / {:.0}); CPU {:.2} / {:.2} µs per message",
                samples[0][round], samples[1][round], steady[0][round], steady[1][round], cpu[0][round], cpu[1][round]
            );
            continue;
        }
        samples[2].push(
            plain_group(
                &kafka,
                "bench-grpc",
                &format!("plain-grpc-{round}"),
                instances,
                Some(&plain_url),
                total_grpc,
            )
            .await
            .rate,
        );
        let (run, cluster) = leasehold_group(
            &kafka,
            "bench-grpc",
            &format!("lh-grpc-{round}"),
            instances,
            &handler_url,
            total_grpc,
        )
        .await;
        samples[3].push(run.rate);
        eprintln!(
            "kafka round {round}: plain no-op {:.0}, leasehold no-op {:.0}, plain gRPC {:.0}, leasehold gRPC {:.0} msg/s",
            samples[0][round], samples[1][round], samples[2][round], samples[3][round]
        );
        last = Some(cluster);
    }
    let [plain_noop, lh_noop, plain_grpc, lh_grpc] = samples.map(median_spread);
    let [plain_cpu, lh_cpu] = cpu.map(median_spread);
    let [plain_steady, lh_steady] = steady.map(median_spread);
    let fmt =
        |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} msg/s ({rounds} runs: {lo:.0}–{hi:.0})");
    // Two runs' medians are only comparable when their spreads do not swamp the gap.
    let wide = |(m, lo, hi): (f64, f64, f64)| (hi - lo) / m > 0.3;
    let note = |a, b| {
        if wide(a) || wide(b) {
            "; spread > 30 %: inconclusive"
        } else {
            ""
        }
    };
    let mut rows = vec![
        Row {
            name: "Kafka → route → no-op handler → commit (3 instances, 6 partitions, 1 M messages)",
            measured: fmt(lh_noop),
            baseline: format!(
                "plain consumer group of 3, no-op handler, auto-commit of stored offsets (both sides every {} ms): {} → ratio {:.2}{}",
                kafka_commit_interval().as_millis(),
                fmt(plain_noop),
                lh_noop.0 / plain_noop.0,
                note(lh_noop, plain_noop)
            ),
            target: "≥ 0.7× plain no-op group",
            met: lh_noop.0 / plain_noop.0 >= 0.7,
        },
        Row {
            name: "Kafka → route → gRPC no-op EntityHandler → commit (3 instances, 6 partitions, 300 k messages)",
            measured: fmt(lh_grpc),
            baseline: format!(
                "plain consumer group of 3 calling the same handler per message: {} → ratio {:.2}{}",
                fmt(plain_grpc),
                lh_grpc.0 / plain_grpc.0,
                note(lh_grpc, plain_grpc)
            ),
            target: "≥ 0.9× plain gRPC group",
            met: lh_grpc.0 / plain_grpc.0 >= 0.9,
        },
        Row {
            name: "Kafka no-op pipeline: CPU per message (all processes of the group, start to last commit; informative)",
            measured: format!(
                "Leasehold {:.1} µs/msg ({} runs: {:.1}–{:.1})",
                lh_cpu.0, rounds, lh_cpu.1, lh_cpu.2
            ),
            baseline: format!(
                "plain consumer group {:.1} µs/msg ({:.1}–{:.1}) → ratio {:.1}",
                plain_cpu.0,
                plain_cpu.1,
                plain_cpu.2,
                lh_cpu.0 / plain_cpu.0
            ),
            target: "report",
            met: true,
        },
        Row {
            name: "Kafka no-op pipeline: steady rate (while the group committed 20 % to 80 % of the messages; informative)",
            measured: fmt(lh_steady),
            baseline: format!(
                "plain consumer group of 3: {} → ratio {:.2}{}",
                fmt(plain_steady),
                lh_steady.0 / plain_steady.0,
                note(lh_steady, plain_steady)
            ),
            target: "report",
            met: true,
        },
        Row {
            name: "Kafka raw consume-only loop (1 consumer; informative)",
            measured: format!("{raw:.0} msg/s over {total} messages of ~200 B"),
            baseline: "—".into(),
            target: "report",
            met: true,
        },
    ];
    if noop_only {
        return rows;
    }
    let cluster = last.expect("at least one round ran");
    let last_group = format!("lh-grpc-{}", rounds - 1);

    // Produce-to-handle latency at a fixed rate, from the end-to-end histogram.
    let before = histogram(&cluster);
    let rate = 1000;
    let producer = kafka.producer();
    let t = Instant::now();
    for second in 0..10 {
        let batch: Vec<Vec<u8>> = (0..rate)
            .map(|i| format!(r#"{{"account":"acct-{}","pad":"{pad}"}}"#, i % 10_000).into_bytes())
            .collect();
        send_all(&producer, "bench-grpc", &batch).await;
        tokio::time::sleep_until((t + Duration::from_secs(second + 1)).into()).await;
    }
    let end = kafka.end_offsets("bench-grpc", 6);
    wait_until(Duration::from_secs(60), "latency run committed", || {
        (kafka.position(&last_group, "bench-grpc", 6) == end).then_some(())
    })
    .await;
    let after = histogram(&cluster);
    let delta: Vec<(f64, f64)> = after
        .iter()
        .zip(&before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let (p50, p99) = (quantile(&delta, 0.5), quantile(&delta, 0.99));
    rows.push(Row {
        name: "Kafka produce-to-handle latency (1000 msg/s for 10 s, 3 instances, gRPC no-op handler)",
        measured: format!("p50 ≤ {p50} s, p99 ≤ {p99} s (histogram bucket bounds)"),
        baseline: "—".into(),
        target: "report",
        met: true,
    });
    // The last cluster's handler serves the latency run: stopped only after it.
    let _ = handler.0.kill();
    let _ = handler.0.wait();
    rows
}

/// Sum over instances of `leasehold_kafka_end_to_end_seconds` buckets: (le, count).
fn histogram(cluster: &Cluster) -> Vec<(f64, f64)> {
    let mut buckets: std::collections::BTreeMap<String, f64> = Default::default();
    for i in &cluster.instances {
        let text = ureq::get(&format!("{}/metrics", i.admin_url()))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with("leasehold_kafka_end_to_end_seconds_bucket"))
        {
            let le = line
                .split("le=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned();
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *buckets.entry(le).or_default() += v;
        }
    }
    let mut v: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, c)| {
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                c,
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    v
}

/// Upper bound of the bucket holding quantile `q` of cumulative buckets.
fn quantile(cumulative: &[(f64, f64)], q: f64) -> f64 {
    let total = cumulative.last().map_or(0.0, |b| b.1);
    cumulative
        .iter()
        .find(|(_, c)| *c >= total * q)
        .map_or(f64::NAN, |b| b.0)
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `text` with the section starting at `heading` (up to the next `## `) replaced by
/// `section`, or `section` inserted before `## Notes` (else appended).
fn replace_section(text: &str, heading: &str, section: &str) -> String {
    if let Some(start) = text.find(&format!("\n{heading}\n")) {
        let rest = &text[start + 1..];
        let end = rest[heading.len()..]
            .find("\n## ")
            // From the newline that ends the section: the blank line before the next
            // heading stays.
            .map_or(text.len(), |i| start + 1 + heading.len() + i);
        return format!("{}\n{}{}", &text[..start], section, &text[end..]);
    }
    match text.find("\n## Notes") {
        Some(i) => format!("{}\n{}{}", &text[..i], section, &text[i..]),
        None => format!("{text}\n{section}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("raw-server") {
        raw_server(args[2].parse().unwrap());
        return;
    }
    if args.get(1).map(String::as_str) == Some("noop-handler") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(leasehold_integration_tests::baseline::serve_noop_handler(
            args[2].parse().unwrap(),
        ));
        return;
    }
    if args.get(1).map(String::as_str) == Some("plain-consumer") {
        // plain-consumer BROKERS TOPIC GROUP [HANDLER_URL]
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(leasehold_integration_tests::baseline::plain_consumer(
            &args[2],
            &args[3],
            &args[4],
            args.get(5).map(String::as_str),
            kafka_commit_interval(),
        ));
        return;
    }
    if args.get(1).map(String::as_str) == Some("load") {
        // Load one address for profiling: leasehold-bench load URL SECONDS
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let rate =
            rt.block_on(async { throughput(client(&args[2]), 32, args[3].parse().unwrap()).await });
        println!("{rate:.0} calls/s");
        return;
    }
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let only_kafka = args.iter().any(|a| a == "--kafka-only");
    // `make bench-scale`: its own table, in its own section of the file.
    if args.iter().any(|a| a == "--scale") {
        let figures = rt.block_on(leasehold_integration_tests::scale::run());
        let intro = format!(
            "Reproduce with `make bench-scale` (`SCALE_INSTANCES`, `SCALE_SHARDS`; release build). Measured {} on {} ({} cores), every instance and etcd on this one machine.",
            now(),
            host(),
            cores()
        );
        write_section("## Scale", &intro, &figures, out.as_deref());
        return;
    }
    // `make bench-pekko`: likewise.
    if args.iter().any(|a| a == "--pekko") {
        let dir = tempfile::tempdir().unwrap();
        let figures = rt.block_on(leasehold_integration_tests::pekko::run(
            dir.path().to_path_buf(),
        ));
        let intro = format!(
            "Reproduce with `make bench-pekko` (release build; Java 17). Measured {} on {} ({} cores): Apache Pekko Cluster Sharding 1.1.5 (entities that echo, Jackson CBOR between nodes, gRPC front on each node) and Leasehold (echo handler), driven by the same Java gRPC client loop (`integration-tests/pekko`: 32 calls in flight, 1000 keys, 100 B payloads); each cluster warmed up first (Pekko 150 s, `PEKKO_BENCH_WARMUP_S`; Leasehold 20 s), then 8 s warm-up and 10 s measured per run, alternating three times; medians with (min–max).",
            now(),
            host(),
            cores()
        );
        write_section("## Pekko", &intro, &figures, out.as_deref());
        return;
    }
    // A quick look at one figure alone (three runs), for comparing changes to it.
    let single = args.iter().find_map(|a| match a.as_str() {
        "--owner-only" | "--forward-only" | "--recovery-only" => Some(a.clone()),
        _ => None,
    });
    if let Some(which) = single {
        rt.block_on(async {
            for _ in 0..3 {
                let rows = match which.as_str() {
                    "--owner-only" => vec![owner_path_throughput().await],
                    "--recovery-only" => recovery_and_drain().await,
                    _ => forwarded_latency().await,
                };
                for r in rows {
                    println!("{}: {} | {}", r.name, r.measured, r.baseline);
                }
            }
        });
        return;
    }
    let rows = rt.block_on(async {
        let mut rows = if only_kafka {
            Vec::new()
        } else {
            bench().await
        };
        rows.extend(kafka_bench().await);
        rows
    });
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(md, "Reproduce with `make bench` (release build; writes this file). Measured {} on {} ({} cores).", now(), host(), cores());
    let _ = writeln!(md, "Every figure is compared with a baseline or target measured in the same run; these machines are noisy, so read ratios, not absolute numbers.\n");
    let _ = writeln!(
        md,
        "| benchmark | measured | baseline (same run) | target | met |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.measured,
            r.baseline,
            r.target,
            if r.met { "yes" } else { "**no**" }
        );
    }
    print!("{md}");
    if let Some(path) = out {
        // The sections other commands write (## Scale) and the notes stay.
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| {
                old.find("\n## Scale")
                    .or_else(|| old.find("\n## Notes"))
                    .map(|i| old[i..].to_owned())
            })
            .unwrap_or_default();
        std::fs::write(&path, format!("{md}{kept}")).unwrap();
        eprintln!("wrote {path}");
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Prints a section of its own (`heading`, `intro`, a table of `figures`) and, with
/// `out`, writes it into that file in place of the section's previous figures.
fn write_section(
    heading: &str,
    intro: &str,
    figures: &[leasehold_integration_tests::scale::Figure],
    out: Option<&str>,
) {
    let mut md = String::new();
    let _ = writeln!(md, "{heading}\n\n{intro}\n");
    let _ = writeln!(md, "| benchmark | measured | target | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for f in figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(md, "| {} | {} | {} | {met} |", f.name, f.measured, f.target);
    }
    print!("{md}");
    if let Some(path) = out {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, replace_section(&old, heading, &md)).unwrap();
    }
}

fn now() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn host() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
