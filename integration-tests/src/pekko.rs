//! Side by side with Apache Pekko Cluster Sharding (`make bench-pekko`): the same Java
//! client loop (`integration-tests/pekko`, `leasehold.pekko.Load`) drives a Leasehold
//! cluster (echo handler) and a Pekko cluster whose sharded entities echo, one and three
//! nodes on this machine: both clusters warmed up, then measured alternately three times.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::scale::Figure;
use crate::{free_port, median_spread as median, Cluster, KillOnDrop};

/// What one run of the client loop measured.
#[derive(Clone, Copy, Debug)]
struct Run {
    calls_per_second: f64,
    p50_us: f64,
    errors: u64,
}

/// Warm-up of each measured run (the client loop's JVM and the servers' paths).
const WARMUP_S: u64 = 8;
const MEASURE_S: u64 = 10;
const IN_FLIGHT: &str = "32";
const KEYS: usize = 1000;
const ROUNDS: usize = 3;

/// Warm-up of a Pekko cluster once started (`PEKKO_BENCH_WARMUP_S`): its JVMs compile
/// while they serve, and with three nodes and the client on two cores the rate still
/// climbed after a minute (2.3 k, 5 k, 12 k calls/s at 25, 50 and 75 s).
fn cluster_warmup() -> u64 {
    std::env::var("PEKKO_BENCH_WARMUP_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

fn classpath() -> String {
    std::env::var("PEKKO_BENCH_CLASSPATH")
        .expect("PEKKO_BENCH_CLASSPATH (set by `make bench-pekko`): the Java classes and jars")
}

/// The JVM flags both Java programs run with. With fewer than three cores the JDK's
/// common pool has one thread, and `CompletableFuture` then starts a new thread for
/// every asynchronous step (Pekko's `ask` takes several): a JDK quirk, not Pekko's
/// design, so it is tuned away (measured here: 4.4 k calls/s without, 22 k with).
const JVM_FLAGS: &[&str] = &["-Djava.util.concurrent.ForkJoinPool.common.parallelism=4"];

/// Runs the client loop against `target` (ports, or `@file` of `key port` lines).
fn load(target: &[String]) -> Run {
    load_for(WARMUP_S, MEASURE_S, target)
}

fn load_for(warmup: u64, measure: u64, target: &[String]) -> Run {
    let out = Command::new("java")
        .args(JVM_FLAGS)
        .args(["-cp", &classpath(), "leasehold.pekko.Load"])
        .args([warmup.to_string(), measure.to_string()])
        .args([IN_FLIGHT, &KEYS.to_string()])
        .args(target)
        .stderr(Stdio::null())
        .output()
        .expect("java");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> f64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("client loop printed no {name}: {text}"))
    };
    Run {
        calls_per_second: field("calls_per_second"),
        p50_us: field("p50_us"),
        errors: field("errors") as u64,
    }
}

/// A Pekko cluster of `n` nodes on loopback; dropped, it is killed.
struct Pekko {
    /// Killed when the cluster is dropped.
    _nodes: Vec<KillOnDrop>,
    grpc_ports: Vec<u16>,
}

impl Pekko {
    fn start(n: usize) -> Pekko {
        let seed = free_port();
        let mut nodes = Vec::new();
        let mut grpc_ports = Vec::new();
        let mut outputs = Vec::new();
        for i in 0..n {
            let port = if i == 0 { seed } else { free_port() };
            let grpc = free_port();
            let mut child = Command::new("java")
                .args(JVM_FLAGS)
                .args(["-cp", &classpath(), "leasehold.pekko.Node"])
                .args([port, grpc, seed].map(|p| p.to_string()))
                .arg(n.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a Pekko node");
            outputs.push(child.stdout.take().expect("stdout"));
            nodes.push(KillOnDrop(child));
            grpc_ports.push(grpc);
        }
        // Each node prints "ready" once all n are up.
        let (tx, rx) = std::sync::mpsc::channel();
        for out in outputs {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let ready = BufReader::new(out)
                    .lines()
                    .map_while(Result::ok)
                    .any(|l| l.trim() == "ready");
                let _ = tx.send(ready);
            });
        }
        for _ in 0..n {
            let ready = rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
            assert!(ready, "a Pekko node did not report its cluster up");
        }
        Pekko {
            _nodes: nodes,
            grpc_ports,
        }
    }
}

fn ports(ports: &[u16]) -> Vec<String> {
    ports.iter().map(u16::to_string).collect()
}

/// Runs the comparison; `out_dir` holds the routes file of the owner-path runs.
pub async fn run(out_dir: PathBuf) -> Vec<Figure> {
    // (Leasehold runs, Pekko runs) per cluster size; Leasehold's owner-path runs.
    let mut one = (Vec::new(), Vec::new());
    let mut three = (Vec::new(), Vec::new());
    let mut owner = Vec::new();
    for n in [1usize, 3] {
        // Both clusters stay up for the configuration's rounds (idle, each costs the
        // other little); each is warmed up first, Pekko's JVMs for longer.
        let cluster = Cluster::start(n, &["--max-concurrency", "4096"]).await;
        let table = cluster.wait_balanced(Duration::from_secs(30)).await;
        let grpc: Vec<u16> = cluster.instances.iter().map(|i| i.grpc_port).collect();
        let pekko = Pekko::start(n);
        load_for(cluster_warmup(), 1, &ports(&pekko.grpc_ports));
        load_for(20, 1, &ports(&grpc));
        // Each key with its owner's port: what a client using the routing table
        // (leasehold-client, or Locate) does.
        let routes = out_dir.join("routes.txt");
        if n == 3 {
            let count = table.len() as u32;
            let lines: String = (0..KEYS)
                .map(|i| {
                    let key = format!("key-{i}");
                    let shard = leasehold_types::shard_for_key(key.as_bytes(), count);
                    let owner = table[shard.0 as usize].1.as_deref().expect("balanced");
                    let port = cluster
                        .instances
                        .iter()
                        .find(|i| i.id == owner)
                        .expect("owner is a member")
                        .grpc_port;
                    format!("{key} {port}\n")
                })
                .collect();
            std::fs::write(&routes, lines).unwrap();
        }
        for round in 0..ROUNDS {
            let lh = load(&ports(&grpc));
            let pk = load(&ports(&pekko.grpc_ports));
            let owner_run = (n == 3).then(|| load(&[format!("@{}", routes.display())]));
            eprintln!(
                "pekko round {round}, {n} node(s): Leasehold {:.0} calls/s p50 {} µs ({} errors), Pekko {:.0} calls/s p50 {} µs ({} errors){}",
                lh.calls_per_second, lh.p50_us, lh.errors, pk.calls_per_second, pk.p50_us, pk.errors,
                owner_run.map_or(String::new(), |o| format!(", Leasehold to the owner {:.0} calls/s p50 {} µs", o.calls_per_second, o.p50_us))
            );
            let runs = if n == 1 { &mut one } else { &mut three };
            runs.0.push(lh);
            runs.1.push(pk);
            owner.extend(owner_run);
        }
    }
    let errors = |v: &[Run]| v.iter().map(|r| r.errors).sum::<u64>();
    // Pekko on three nodes far below Pekko on one (same machine, same client) points at
    // the Pekko set-up rather than at Pekko: such rows say so and count as no result.
    let pk_one = median(one.1.iter().map(|r| r.calls_per_second).collect()).0;
    let figure = |name: &str, lh: &[Run], pk: &[Run]| {
        let (l, llo, lhi) = median(lh.iter().map(|r| r.calls_per_second).collect());
        let (p, plo, phi) = median(pk.iter().map(|r| r.calls_per_second).collect());
        let (l50, _, _) = median(lh.iter().map(|r| r.p50_us).collect());
        let (p50, _, _) = median(pk.iter().map(|r| r.p50_us).collect());
        // A wide spread leaves the order open only where the two ranges overlap: every
        // run of one ahead of every run of the other (alternating) is a result.
        let separated = llo > phi || plo > lhi;
        let wide = ((lhi - llo) / l > 0.3 || (phi - plo) / p > 0.3) && !separated;
        let suspect = p < pk_one / 4.0;
        Figure {
            name: name.into(),
            measured: format!(
                "Leasehold {l:.0} calls/s ({llo:.0}–{lhi:.0}), p50 {l50:.0} µs; Pekko {p:.0} calls/s ({plo:.0}–{phi:.0}), p50 {p50:.0} µs → throughput ratio {:.2}, p50 ratio {:.2}; errors {} / {}{}",
                l / p,
                l50 / p50,
                errors(lh),
                errors(pk),
                if suspect {
                    "; **Pekko below a quarter of its one-node figure: set-up suspect, no result**"
                } else if wide {
                    "; spread > 30 % and the ranges overlap: inconclusive"
                } else if separated {
                    "; every run of one ahead of every run of the other"
                } else {
                    ""
                }
            ),
            target: "ahead of Pekko (ratio > 1)".into(),
            met: (!suspect).then_some(l > p && !wide),
        }
    };
    vec![
        figure(
            "1 node: calls to the only instance",
            &one.0,
            &one.1,
        ),
        figure(
            "3 nodes: every call enters a random instance (Leasehold forwards 2 in 3 to the owner; Pekko forwards to the shard's home)",
            &three.0,
            &three.1,
        ),
        figure(
            "3 nodes: Leasehold calls sent to each key's owner (routing table) against Pekko calls entering a random node",
            &owner,
            &three.1,
        ),
    ]
}
