//! `make chaos`: a seeded, randomized fault campaign against real processes.
//!
//! Per run: a bridge and one network namespace per host (`netns`), a 3-member etcd
//! cluster (`etcd_cluster`), a Kafka broker, and 3 `leasehold` instances, each with its
//! own handler sidecar (`leasehold-chaos-handler`: read-modify-write of counter files
//! without transactions). Load: gRPC Call clients from the root namespace over the bridge
//! (counter increments; every acknowledged value is recorded) and a Kafka producer of
//! keyed messages that the instances consume. Faults come from a `StdRng` seeded with
//! the run's seed; after each one heals, the time until every shard is owned and every
//! instance is ready is measured. At the end the invariants are checked from the suite's
//! own records (see `leasehold_integration_tests::chaos`), `docs/CHAOS.md` is written,
//! and the exit code is 1 on any violation. Needs root (namespaces).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use leasehold_integration_tests::chaos::{self, KafkaStats, Produced};
use leasehold_integration_tests::etcd_cluster::EtcdCluster;
use leasehold_integration_tests::netns::{self, Host, Topology};
use leasehold_proto::v1::entities_client::EntitiesClient;
use leasehold_proto::v1::entity_handler_client::EntityHandlerClient;
use leasehold_proto::v1::{CallRequest, HandleRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tonic::transport::Channel;

const TOPIC: &str = "chaos";
const DLQ_TOPIC: &str = "chaos-dlq";
const PARTITIONS: i32 = 4;
/// Longest wait for a heal before the suite calls it failed and repairs by restarting.
const HEAL_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
#[command(about = "Randomized, seeded fault campaign against real leasehold processes")]
struct Args {
    /// Runs, each on a fresh topology.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Campaign seed (run r uses seed + r). Default: random, printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of faults per run (the last fault may end a little later).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Lease TTL given to the instances, in seconds.
    #[arg(long, default_value_t = 3)]
    ttl: u64,
    /// Counter keys the gRPC clients increment.
    #[arg(long, default_value_t = 24)]
    keys: usize,
    /// Concurrent gRPC clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Kafka messages produced per second (0: no Kafka at all).
    #[arg(long, default_value_t = 40)]
    kafka_rate: u64,
    /// Report to write.
    #[arg(long, default_value = "docs/CHAOS.md")]
    out: PathBuf,
    /// Logs and data of each run (kept for inspection; emptied at start).
    #[arg(long, default_value = "/tmp/leasehold-chaos")]
    work_dir: PathBuf,
    /// Proves the checks can fail: the gRPC load calls the handler sidecars directly,
    /// around Leasehold, so concurrent read-modify-writes must show up as violations.
    #[arg(long)]
    self_test: bool,
    /// The `leasehold` binary. Default: `$LEASEHOLD_BIN`, else next to this one.
    #[arg(long)]
    leasehold_bin: Option<PathBuf>,
}

fn sibling_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current exe")
        .parent()
        .expect("bin dir")
        .join(name)
}

fn kafka_libs() -> PathBuf {
    std::env::var("LEASEHOLD_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/leasehold/kafka/libs")
        })
}

// ---------------------------------------------------------------------------------------
// Processes inside namespaces

/// A process run in a host's namespace; can be killed, stopped and started again with
/// the same arguments; killed on drop.
struct Proc {
    host: Host,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(host: &Host, program: PathBuf, args: Vec<String>, log: PathBuf) -> Proc {
        Proc {
            host: host.clone(),
            program,
            args,
            env: Vec::new(),
            log,
            child: None,
        }
    }

    fn start(&mut self) -> Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .host
            .command(&self.program)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.signal_pid(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal_pid(&self, pid: u32, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status();
    }

    /// True while started and not exited.
    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-node KRaft broker in its own namespace, listening on the host's address.
struct Broker {
    proc: Proc,
    addr: String,
}

impl Broker {
    fn new(host: &Host, dir: &Path) -> Result<Broker> {
        let libs = kafka_libs();
        if !libs.join(".pom.sha256").exists() {
            bail!(
                "Kafka jars missing in {}: run scripts/install-kafka.sh",
                libs.display()
            );
        }
        let addr = format!("{}:9092", host.addr);
        let props = dir.join("server.properties");
        std::fs::write(
            &props,
            format!(
                "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:9093\n\
                 listeners=PLAINTEXT://{addr},CONTROLLER://127.0.0.1:9093\n\
                 advertised.listeners=PLAINTEXT://{addr}\ncontroller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={}\nnum.partitions=1\noffsets.topic.replication.factor=1\noffsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n",
                dir.join("kafka-data").display()
            ),
        )?;
        let cp = format!("{}/*", libs.display());
        let format = Command::new("java")
            .args(["-cp", &cp, "kafka.tools.StorageTool", "format", "-t"])
            .arg("lh-chaos-cluster-000001")
            .arg("-c")
            .arg(&props)
            .output()
            .context("java not found")?;
        if !format.status.success() {
            bail!(
                "kafka storage format: {}",
                String::from_utf8_lossy(&format.stderr)
            );
        }
        let args = [
            "-Xms256m",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-cp",
            &cp,
            "kafka.Kafka",
            &props.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        Ok(Broker {
            proc: Proc::new(host, "java".into(), args, dir.join("kafka.log")),
            addr,
        })
    }

    async fn start(&mut self) -> Result<()> {
        self.proc.start()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &self.addr)
                .create()?;
            let ok = tokio::task::block_in_place(|| {
                c.fetch_metadata(None, Duration::from_millis(1000)).is_ok()
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kafka not ready after 90s:\n{}", self.proc.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The world of one run

struct World {
    // Declared first, dropped first: the processes go before their namespaces.
    instances: Vec<Proc>,
    sidecars: Vec<Proc>,
    broker: Option<Broker>,
    etcd: EtcdCluster,
    topo: Topology,
    inst_hosts: Vec<String>,
    etcd_hosts: Vec<String>,
    sidecar_logs: Vec<PathBuf>,
    store: PathBuf,
}

impl World {
    async fn build(args: &Args, dir: &Path) -> Result<World> {
        let mut topo = Topology::new()?;
        let mut etcd_hosts_v = Vec::new();
        for i in 0..3u8 {
            etcd_hosts_v.push(topo.add_host(&format!("e{i}"), 11 + i)?);
        }
        let mut inst_hosts_v = Vec::new();
        for i in 0..3u8 {
            inst_hosts_v.push(topo.add_host(&format!("n{i}"), 21 + i)?);
        }
        let kafka_host = if args.kafka_rate > 0 {
            Some(topo.add_host("kafka", 31)?)
        } else {
            None
        };
        let etcd = EtcdCluster::start(&etcd_hosts_v, dir).await?;
        let mut broker = match &kafka_host {
            Some(h) => Some(Broker::new(h, dir)?),
            None => None,
        };
        if let Some(b) = broker.as_mut() {
            b.start().await?;
            create_topic(&b.addr).await?;
        }
        let store = dir.join("store");
        std::fs::create_dir_all(&store)?;
        let handler_bin = sibling_bin("leasehold-chaos-handler");
        let leasehold = args
            .leasehold_bin
            .clone()
            .or_else(|| std::env::var_os("LEASEHOLD_BIN").map(PathBuf::from))
            .unwrap_or_else(|| sibling_bin("leasehold"));
        for p in [&handler_bin, &leasehold] {
            if !p.exists() {
                bail!("{} not found (cargo build --bins)", p.display());
            }
        }
        let mut sidecars = Vec::new();
        let mut instances = Vec::new();
        let mut sidecar_logs = Vec::new();
        for h in &inst_hosts_v {
            let log = dir.join(format!("{}.executions.jsonl", h.name));
            sidecar_logs.push(log.clone());
            let a = vec![
                "--listen".into(),
                // On every address: leasehold uses 127.0.0.1, --self-test the bridge.
                "0.0.0.0:9000".into(),
                "--log".into(),
                log.display().to_string(),
                "--store".into(),
                store.display().to_string(),
                "--host".into(),
                h.name.clone(),
            ];
            let mut s = Proc::new(
                h,
                handler_bin.clone(),
                a,
                dir.join(format!("{}.sidecar.log", h.name)),
            );
            s.start()?;
            sidecars.push(s);
            let mut a: Vec<String> = [
                "serve",
                "--id",
                &h.name,
                "--etcd",
                &etcd.endpoints(),
                "--listen",
                "0.0.0.0:7070",
                "--admin-listen",
                "0.0.0.0:7071",
                "--peer-listen",
                "0.0.0.0:7072",
                "--advertise",
                &format!("{}:7070", h.addr),
                "--peer-advertise",
                &format!("{}:7072", h.addr),
                "--admin-advertise",
                &format!("{}:7071", h.addr),
                "--handler",
                "grpc://127.0.0.1:9000",
                "--lease-ttl",
                &format!("{}s", args.ttl),
                "--request-timeout",
                "10s",
            ]
            .map(String::from)
            .to_vec();
            if let Some(b) = &broker {
                a.extend(
                    [
                        "--kafka-brokers",
                        &b.addr,
                        "--kafka-topic",
                        TOPIC,
                        "--kafka-group",
                        "chaos",
                        "--kafka-key",
                        "json:/account",
                        "--kafka-dlq-topic",
                        DLQ_TOPIC,
                        "--kafka-property",
                        "session.timeout.ms=6000",
                        "--kafka-property",
                        "heartbeat.interval.ms=1000",
                    ]
                    .map(String::from),
                );
            }
            let mut p = Proc::new(
                h,
                leasehold.clone(),
                a,
                dir.join(format!("{}.leasehold.log", h.name)),
            );
            p.env.push(("LEASEHOLD_LOG".into(), "info".into()));
            p.start()?;
            instances.push(p);
        }
        Ok(World {
            instances,
            sidecars,
            broker,
            etcd,
            inst_hosts: inst_hosts_v.iter().map(|h| h.name.clone()).collect(),
            etcd_hosts: etcd_hosts_v.iter().map(|h| h.name.clone()).collect(),
            topo,
            sidecar_logs,
            store,
        })
    }

    fn admin(&self, i: usize) -> String {
        format!("http://{}:7071", self.topo.host(&self.inst_hosts[i]).addr)
    }

    fn grpc(&self, i: usize) -> String {
        format!("http://{}:7070", self.topo.host(&self.inst_hosts[i]).addr)
    }

    /// Why the cluster is not healed yet, or None when every instance answers /readyz
    /// 200 and its /v1/cluster shows 3 members and no unowned shard.
    fn not_healed(&self) -> Option<String> {
        for i in 0..self.instances.len() {
            let admin = self.admin(i);
            let name = &self.inst_hosts[i];
            match ureq::get(&format!("{admin}/readyz"))
                .timeout(Duration::from_millis(500))
                .call()
            {
                Ok(_) => {}
                Err(ureq::Error::Status(code, r)) => {
                    return Some(format!(
                        "{name} /readyz {code}: {}",
                        r.into_string().unwrap_or_default().trim()
                    ))
                }
                Err(e) => return Some(format!("{name} /readyz: {e}")),
            }
            let v: serde_json::Value = match ureq::get(&format!("{admin}/v1/cluster"))
                .timeout(Duration::from_millis(500))
                .call()
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_json().map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => return Some(format!("{name} /v1/cluster: {e}")),
            };
            let unowned = v["unowned_shards"].as_u64();
            let members = v["members"].as_u64();
            if unowned != Some(0) || members != Some(self.instances.len() as u64) {
                return Some(format!(
                    "{name} /v1/cluster: unowned_shards {unowned:?}, members {members:?}"
                ));
            }
        }
        None
    }

    /// Polls until healed; Ok(time taken) or Err(last reason) after `deadline`. Prints
    /// each new reason with its time, so that a slow heal shows where the time went.
    async fn wait_healed(&self, deadline: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let mut last: Option<String> = None;
        loop {
            let r = tokio::task::block_in_place(|| self.not_healed());
            if r.is_some() && r != last {
                let why = r.as_deref().unwrap_or_default();
                eprintln!("            +{:.2}s {why}", t0.elapsed().as_secs_f64());
            }
            match r {
                None => return Ok(t0.elapsed()),
                Some(why) if t0.elapsed() > deadline => return Err(why),
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            last = r;
        }
    }
}

async fn create_topic(brokers: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
    let dlq = NewTopic::new(DLQ_TOPIC, 1, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&topic, &dlq], &AdminOptions::new())
        .await?
    {
        r.map_err(|(n, e)| anyhow!("create topic {n}: {e}"))?;
    }
    Ok(())
}

/// (partition, offset) of every source record in the dead-letter topic, read from the
/// headers Leasehold adds, with the reasons.
/// Source (partition, offset) of each dead letter, and the first few reasons.
type DeadLetters = (HashSet<(i32, i64)>, Vec<String>);

fn read_dead_letters(brokers: &str) -> Result<DeadLetters> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("chaos-dlq-reader-{}", rand::random::<u32>()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let (_, end) = c.fetch_watermarks(DLQ_TOPIC, 0, Duration::from_secs(10))?;
    let mut out = HashSet::new();
    let mut reasons = Vec::new();
    if end == 0 {
        return Ok((out, reasons));
    }
    c.subscribe(&[DLQ_TOPIC])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut read = 0;
    while read < end && Instant::now() < deadline {
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        read = m.offset() + 1;
        let mut h: HashMap<String, String> = HashMap::new();
        if let Some(hs) = m.headers() {
            for x in hs.iter() {
                h.insert(
                    x.key.to_owned(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let p = h
            .get("leasehold.source.partition")
            .and_then(|s| s.parse().ok());
        let o = h
            .get("leasehold.source.offset")
            .and_then(|s| s.parse().ok());
        if let (Some(p), Some(o)) = (p, o) {
            out.insert((p, o));
        }
        if reasons.len() < 5 {
            reasons.push(h.get("leasehold.reason").cloned().unwrap_or_default());
        }
    }
    if read < end {
        bail!("read {read} of {end} dead letters");
    }
    Ok((out, reasons))
}

// ---------------------------------------------------------------------------------------
// Load

#[derive(Default)]
struct LoadRecords {
    /// key → acknowledged counter values.
    acks: HashMap<String, Vec<u64>>,
    /// (mono ns, gRPC code name) of every failed call.
    errors: Vec<(u64, String)>,
    produced: Vec<Produced>,
    produce_failures: u64,
}

fn start_grpc_load(
    world: &World,
    args: &Args,
    seed: u64,
    records: Arc<Mutex<LoadRecords>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let channel = |url: String| {
        tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(6))
            .connect_lazy()
    };
    let clients: Vec<EntitiesClient<Channel>> = (0..world.instances.len())
        .map(|i| EntitiesClient::new(channel(world.grpc(i))))
        .collect();
    // --self-test: the same load straight to the sidecars, around Leasehold.
    let bypass: Vec<EntityHandlerClient<Channel>> = (0..world.instances.len())
        .map(|i| {
            let addr = &world.topo.host(&world.inst_hosts[i]).addr;
            EntityHandlerClient::new(channel(format!("http://{addr}:9000")))
        })
        .collect();
    let self_test = args.self_test;
    (0..args.clients)
        .map(|w| {
            let (clients, bypass, records, stop, keys) = (
                clients.clone(),
                bypass.clone(),
                records.clone(),
                stop.clone(),
                args.keys,
            );
            let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (w as u64 + 1)));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("c-{}", rng.random_range(0..keys));
                    let target = rng.random_range(0..clients.len());
                    let r = if self_test {
                        let mut req = tonic::Request::new(HandleRequest {
                            key: key.clone(),
                            owner: "self-test".into(),
                            ..HandleRequest::default()
                        });
                        req.set_timeout(Duration::from_secs(5));
                        bypass[target]
                            .clone()
                            .handle(req)
                            .await
                            .map(|r| r.into_inner().payload)
                    } else {
                        let mut req = tonic::Request::new(CallRequest {
                            key: key.clone(),
                            payload: Default::default(),
                        });
                        req.set_timeout(Duration::from_secs(5));
                        clients[target]
                            .clone()
                            .call(req)
                            .await
                            .map(|r| r.into_inner().payload)
                    };
                    let failed = {
                        let mut rec = records.lock().unwrap();
                        match r {
                            Ok(payload) => {
                                let text = String::from_utf8_lossy(&payload).to_string();
                                match text.parse::<u64>() {
                                    Ok(v) => rec.acks.entry(key).or_default().push(v),
                                    Err(_) => rec
                                        .errors
                                        .push((chaos::mono_ns(), format!("bad payload {text:?}"))),
                                }
                                false
                            }
                            Err(s) => {
                                rec.errors
                                    .push((chaos::mono_ns(), format!("{:?}", s.code())));
                                true
                            }
                        }
                    };
                    if failed {
                        // A refused connection fails at once; do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect()
}

fn start_producer(
    brokers: &str,
    args: &Args,
    seed: u64,
    records: Arc<Mutex<LoadRecords>>,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .create()?;
    let (rate, keys) = (args.kafka_rate.max(1), args.keys);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_cafe);
    Ok(tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut seq = 0u64;
        let tick = Duration::from_micros(1_000_000 / rate);
        while !stop.load(Ordering::Relaxed) {
            let key = format!("q-{}", rng.random_range(0..keys));
            let value = format!(r#"{{"account":"{key}","seq":{seq}}}"#);
            seq += 1;
            let record = FutureRecord::to(TOPIC).key(&key).payload(&value);
            match producer.send_result(record) {
                Ok(f) => pending.push((key, f)),
                Err(_) => records.lock().unwrap().produce_failures += 1,
            }
            tokio::time::sleep(tick).await;
        }
        for (key, f) in pending {
            let r = tokio::time::timeout(Duration::from_secs(130), f).await;
            let mut rec = records.lock().unwrap();
            match r {
                Ok(Ok(Ok(d))) => rec.produced.push(Produced {
                    key,
                    partition: d.partition,
                    offset: d.offset,
                }),
                _ => rec.produce_failures += 1,
            }
        }
    }))
}

// ---------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    EtcdPartitionShort,
    EtcdPartitionLong,
    PeerPartition,
    Isolate,
    Kill,
    StopPastTtl,
    EtcdLeaderKill,
    EtcdMemberPartition,
    EtcdCompaction,
    KafkaRestart,
    HandlerDown,
    Combo,
}

const SINGLE: [Kind; 11] = [
    Kind::EtcdPartitionShort,
    Kind::EtcdPartitionLong,
    Kind::PeerPartition,
    Kind::Isolate,
    Kind::Kill,
    Kind::StopPastTtl,
    Kind::EtcdLeaderKill,
    Kind::EtcdMemberPartition,
    Kind::EtcdCompaction,
    Kind::KafkaRestart,
    Kind::HandlerDown,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::EtcdPartitionShort => "instance-etcd partition < TTL",
            Kind::EtcdPartitionLong => "instance-etcd partition > TTL",
            Kind::PeerPartition => "instance-peers partition",
            Kind::Isolate => "instance isolated (link down)",
            Kind::Kill => "instance SIGKILL + restart",
            Kind::StopPastTtl => "instance SIGSTOP past TTL + SIGCONT",
            Kind::EtcdLeaderKill => "etcd leader kill + restart",
            Kind::EtcdMemberPartition => "etcd member partitioned",
            Kind::EtcdCompaction => "etcd compaction",
            Kind::KafkaRestart => "Kafka broker restart",
            Kind::HandlerDown => "handler sidecar down",
            Kind::Combo => "combination of two",
        }
    }
}

/// What undoes a fault.
#[derive(Debug, Clone)]
enum Undo {
    Uncut(String, String),
    Unisolate(String),
    StartInstance(usize),
    Cont(usize),
    StartEtcd(usize),
    StartKafka,
    StartSidecar(usize),
}

#[derive(Debug, Clone)]
struct FaultRecord {
    kinds: Vec<Kind>,
    what: String,
    at_s: f64,
    hold_s: f64,
    heal: Result<Duration, String>,
    deadline_exceeded: u64,
    failed_calls: u64,
}

/// Injects one fault of `kind`; returns (description, hold, undo). Instance faults take
/// `inst`, so that a combination can keep its two faults on different instances.
fn inject(
    world: &mut World,
    rng: &mut StdRng,
    kind: Kind,
    inst: usize,
    ttl: f64,
) -> Result<(String, f64, Vec<Undo>)> {
    let n = world.inst_hosts[inst].clone();
    let mut undo = Vec::new();
    let r = |rng: &mut StdRng, a: f64, b: f64| (rng.random_range(a..b) * 10.0).round() / 10.0;
    let (what, hold) = match kind {
        Kind::EtcdPartitionShort | Kind::EtcdPartitionLong => {
            let hold = if kind == Kind::EtcdPartitionShort {
                r(rng, 0.5, ttl * 0.7)
            } else {
                r(rng, ttl + 1.0, ttl + 5.0)
            };
            for e in world.etcd_hosts.clone() {
                world.topo.partition(&n, &e)?;
                undo.push(Undo::Uncut(n.clone(), e.clone()));
                undo.push(Undo::Uncut(e, n.clone()));
            }
            (format!("{n} cut from every etcd member for {hold}s"), hold)
        }
        Kind::PeerPartition => {
            let hold = r(rng, 2.0, 8.0);
            for p in world.inst_hosts.clone() {
                if p != n {
                    world.topo.partition(&n, &p)?;
                    undo.push(Undo::Uncut(n.clone(), p.clone()));
                    undo.push(Undo::Uncut(p, n.clone()));
                }
            }
            (format!("{n} cut from its peers for {hold}s"), hold)
        }
        Kind::Isolate => {
            let hold = r(rng, 2.0, 8.0);
            world.topo.isolate(&n)?;
            undo.push(Undo::Unisolate(n.clone()));
            (format!("{n} link down for {hold}s"), hold)
        }
        Kind::Kill => {
            let hold = r(rng, 0.5, 4.0);
            world.instances[inst].signal("KILL");
            undo.push(Undo::StartInstance(inst));
            (format!("{n} SIGKILL, restarted after {hold}s"), hold)
        }
        Kind::StopPastTtl => {
            let hold = r(rng, ttl + 1.0, ttl + 4.0);
            world.instances[inst].signal("STOP");
            undo.push(Undo::Cont(inst));
            (format!("{n} SIGSTOP for {hold}s"), hold)
        }
        Kind::EtcdLeaderKill => {
            let hold = r(rng, 1.0, 6.0);
            // Right after an earlier etcd fault the members may still be electing.
            let l = tokio::task::block_in_place(|| {
                let until = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(l) = world.etcd.leader() {
                        return Some(l);
                    }
                    if Instant::now() > until {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .ok_or_else(|| anyhow!("etcd has no leader to kill (none elected within 10 s)"))?;
            world.etcd.kill(l);
            undo.push(Undo::StartEtcd(l));
            (
                format!(
                    "etcd leader {} killed, restarted after {hold}s",
                    world.etcd_hosts[l]
                ),
                hold,
            )
        }
        Kind::EtcdMemberPartition => {
            let hold = r(rng, 2.0, 8.0);
            let m = world.etcd_hosts[rng.random_range(0..3)].clone();
            world.topo.isolate(&m)?;
            undo.push(Undo::Unisolate(m.clone()));
            (format!("etcd member {m} link down for {hold}s"), hold)
        }
        Kind::EtcdCompaction => {
            let rev = world.etcd.compact()?;
            (format!("etcd compacted at revision {rev}"), 0.5)
        }
        Kind::KafkaRestart => match world.broker.as_mut() {
            Some(b) => {
                let hold = r(rng, 0.5, 4.0);
                b.proc.kill();
                undo.push(Undo::StartKafka);
                (
                    format!("Kafka broker killed, restarted after {hold}s"),
                    hold,
                )
            }
            None => ("Kafka not running: nothing".into(), 0.1),
        },
        Kind::HandlerDown => {
            let hold = r(rng, 1.0, 5.0);
            world.sidecars[inst].kill();
            undo.push(Undo::StartSidecar(inst));
            (format!("{n} handler sidecar killed for {hold}s"), hold)
        }
        Kind::Combo => unreachable!("combinations are split by the caller"),
    };
    Ok((what, hold, undo))
}

async fn apply_undo(world: &mut World, undo: &[Undo]) -> Result<()> {
    for u in undo {
        match u {
            Undo::Uncut(a, b) => world.topo.uncut(a, b)?,
            Undo::Unisolate(h) => world.topo.unisolate(h)?,
            Undo::StartInstance(i) => world.instances[*i].start()?,
            Undo::Cont(i) => world.instances[*i].signal("CONT"),
            Undo::StartEtcd(i) => world.etcd.restart(*i)?,
            Undo::StartKafka => {
                if let Some(b) = world.broker.as_mut() {
                    b.start().await?;
                }
            }
            Undo::StartSidecar(i) => world.sidecars[*i].start()?,
        }
    }
    Ok(())
}

/// Last resort after a failed heal: restarts instances that are down or not ready, and
/// anything else that is not running.
async fn repair(world: &mut World) -> Result<Vec<String>> {
    let mut did = Vec::new();
    for i in 0..world.sidecars.len() {
        if !world.sidecars[i].alive() {
            world.sidecars[i].start()?;
            did.push(format!("restarted sidecar {}", world.inst_hosts[i]));
        }
    }
    for i in 0..world.etcd.members.len() {
        if !world.etcd.members[i].running() {
            world.etcd.restart(i)?;
            did.push(format!("restarted etcd {}", world.etcd_hosts[i]));
        }
    }
    for i in 0..world.instances.len() {
        let ready = ureq::get(&format!("{}/readyz", world.admin(i)))
            .timeout(Duration::from_millis(500))
            .call()
            .is_ok();
        if !ready || !world.instances[i].alive() {
            world.instances[i].kill();
            world.instances[i].start()?;
            did.push(format!("restarted {}", world.inst_hosts[i]));
        }
    }
    Ok(did)
}

// ---------------------------------------------------------------------------------------
// One run

#[derive(Default)]
struct RunReport {
    seed: u64,
    faults: Vec<FaultRecord>,
    violations: Vec<String>,
    executions: usize,
    grpc_executions: usize,
    acks: usize,
    errors_by_code: BTreeMap<String, u64>,
    deadline_in_faults: u64,
    deadline_outside: u64,
    kafka: KafkaStats,
    produce_failures: u64,
    aborted: Option<String>,
    dead_letter_reasons: Vec<String>,
    repairs: Vec<String>,
    dir: PathBuf,
}

async fn run_once(args: &Args, seed: u64, dir: &Path) -> RunReport {
    let mut report = RunReport {
        seed,
        dir: dir.to_owned(),
        ..RunReport::default()
    };
    let world = match World::build(args, dir).await {
        Ok(w) => w,
        Err(e) => {
            report.aborted = Some(format!("setup failed: {e:#}"));
            report.violations.push(format!("setup failed: {e:#}"));
            return report;
        }
    };
    run_with(args, seed, world, &mut report).await;
    report
}

async fn run_with(args: &Args, seed: u64, mut world: World, report: &mut RunReport) {
    eprintln!("[seed {seed}] waiting for the cluster to form");
    if let Err(why) = world.wait_healed(Duration::from_secs(60)).await {
        let tails: Vec<String> = world
            .instances
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.host.name, p.log_tail(15)))
            .collect();
        let msg = format!("cluster never formed: {why}\n{}", tails.join("\n"));
        report.aborted = Some(msg.clone());
        report.violations.push(msg);
        return;
    }
    let records = Arc::new(Mutex::new(LoadRecords::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers = start_grpc_load(&world, args, seed, records.clone(), stop.clone());
    let producer = match world.broker.as_ref() {
        Some(b) => match start_producer(&b.addr, args, seed, records.clone(), stop.clone()) {
            Ok(p) => Some(p),
            Err(e) => {
                report.violations.push(format!("producer: {e:#}"));
                None
            }
        },
        None => None,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    // Load before the first fault, so that every fault hits a running system.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut windows: Vec<(u64, u64, usize)> = Vec::new(); // (from ns, to ns, fault index)
    while t0.elapsed() < Duration::from_secs(args.duration) {
        let (window, go_on) = one_fault(&mut world, &mut rng, args, seed, t0, report).await;
        windows.push(window);
        if !go_on {
            break;
        }
        // A quiet gap, so that the next fault starts from a healed cluster under load.
        tokio::time::sleep(Duration::from_secs_f64(rng.random_range(1.0..3.0))).await;
    }
    eprintln!("[seed {seed}] faults done; stopping the load");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    if let Some(p) = producer {
        let _ = p.await;
    }
    let healthy = report.aborted.is_none();
    // Every delivered message must get handled (or dead-lettered): wait for that (only on
    // a healed cluster).
    if healthy {
        let produced = records.lock().unwrap().produced.clone();
        await_kafka_handled(&world, &produced).await;
    }
    // Let calls the instances still run settle before reading the store.
    tokio::time::sleep(Duration::from_millis(500)).await;
    check_run(&world, &records, &windows, healthy, report);
    drop(world);
}

/// Injects one fault (or a combination of two), holds it, undoes it and waits for the
/// cluster to heal, repairing it by restarts if it does not. Returns the fault's window
/// (start, end in monotonic ns, index in `report.faults`) and whether the run can go on.
async fn one_fault(
    world: &mut World,
    rng: &mut StdRng,
    args: &Args,
    seed: u64,
    t0: Instant,
    report: &mut RunReport,
) -> ((u64, u64, usize), bool) {
    let ttl = args.ttl as f64;
    let target = Duration::from_secs_f64(ttl + 2.0);
    let kind = if rng.random_bool(0.15) {
        Kind::Combo
    } else {
        SINGLE[rng.random_range(0..SINGLE.len())]
    };
    let (kinds, insts) = if kind == Kind::Combo {
        let a = SINGLE[rng.random_range(0..SINGLE.len())];
        let mut b = SINGLE[rng.random_range(0..SINGLE.len())];
        while b == a {
            b = SINGLE[rng.random_range(0..SINGLE.len())];
        }
        let i = rng.random_range(0..3);
        (vec![a, b], vec![i, (i + 1 + rng.random_range(0..2)) % 3])
    } else {
        (vec![kind], vec![rng.random_range(0..3)])
    };
    let from_ns = chaos::mono_ns();
    let at_s = t0.elapsed().as_secs_f64();
    let mut whats = Vec::new();
    let mut hold: f64 = 0.0;
    let mut undo = Vec::new();
    let mut failed: Option<String> = None;
    for (k, i) in kinds.iter().zip(&insts) {
        match inject(world, rng, *k, *i, ttl) {
            Ok((w, h, u)) => {
                whats.push(w);
                hold = hold.max(h);
                undo.extend(u);
            }
            Err(e) => {
                let v = format!("suite: could not inject {}: {e:#}", k.name());
                eprintln!("[seed {seed}]          {v}");
                report.violations.push(v);
                whats.push(format!("({} not injected)", k.name()));
            }
        }
    }
    eprintln!("[seed {seed}] {at_s:6.1}s  {}", whats.join(" + "));
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    if let Err(e) = apply_undo(world, &undo).await {
        failed = Some(format!("heal: {e:#}"));
    }
    let heal = match failed {
        Some(e) => Err(e),
        None => world.wait_healed(HEAL_DEADLINE).await,
    };
    let to_ns = chaos::mono_ns();
    let window = (from_ns, to_ns, report.faults.len());
    match &heal {
        Ok(d) => eprintln!("[seed {seed}]          healed in {:.2}s", d.as_secs_f64()),
        Err(why) => eprintln!("[seed {seed}]          NOT healed: {why}"),
    }
    let mut rec = FaultRecord {
        kinds: if kinds.len() > 1 {
            let mut k = vec![Kind::Combo];
            k.extend(&kinds);
            k
        } else {
            kinds.clone()
        },
        what: whats.join(" + "),
        at_s,
        hold_s: hold,
        heal: heal.clone(),
        deadline_exceeded: 0,
        failed_calls: 0,
    };
    match &heal {
        Ok(d) if *d > target => report.violations.push(format!(
            "slow heal: {} took {:.2}s (target {:.1}s)",
            rec.what,
            d.as_secs_f64(),
            target.as_secs_f64()
        )),
        Ok(_) => {}
        Err(why) => {
            report.violations.push(format!(
                "no heal: {} not healed within {}s: {why}",
                rec.what,
                HEAL_DEADLINE.as_secs()
            ));
            match repair(world).await {
                Ok(did) => {
                    eprintln!("[seed {seed}]          repair: {}", did.join(", "));
                    report.repairs.push(did.join(", "));
                }
                Err(e) => report.repairs.push(format!("repair failed: {e:#}")),
            }
            if let Err(why) = world.wait_healed(HEAL_DEADLINE).await {
                report.aborted = Some(format!("not healed even after restarting instances: {why}"));
                rec.heal = Err(why);
                report.faults.push(rec);
                return (window, false);
            }
        }
    }
    report.faults.push(rec);
    (window, true)
}

/// Waits (up to 60 s) until every produced record was handled at least once.
async fn await_kafka_handled(world: &World, produced: &[Produced]) {
    if produced.is_empty() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let execs = chaos::read_executions(&world.sidecar_logs);
        let done: std::collections::HashSet<(i32, i64)> = execs
            .iter()
            .filter_map(|e| e.kafka.as_ref().map(|k| (k.partition, k.offset)))
            .collect();
        if produced
            .iter()
            .all(|p| done.contains(&(p.partition, p.offset)))
            || Instant::now() > deadline
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads what the handlers did and checks it against what the load saw: no overlapping
/// executions of a key, counters that match the acknowledged calls, every Kafka record
/// handled in order or dead-lettered; attributes failed calls to the fault windows.
fn check_run(
    world: &World,
    records: &Mutex<LoadRecords>,
    windows: &[(u64, u64, usize)],
    healthy: bool,
    report: &mut RunReport,
) {
    let execs = chaos::read_executions(&world.sidecar_logs);
    report.executions = execs.len();
    report.grpc_executions = execs.iter().filter(|e| e.kafka.is_none()).count();
    report.violations.extend(chaos::check_no_overlap(&execs));
    let rec = records.lock().unwrap();
    let finals: HashMap<String, u64> = rec
        .acks
        .keys()
        .map(|k| {
            let v = std::fs::read_to_string(world.store.join(k))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            (k.clone(), v)
        })
        .collect();
    report.acks = rec.acks.values().map(Vec::len).sum();
    report
        .violations
        .extend(chaos::check_counters(&rec.acks, &finals));
    let dead = match world.broker.as_ref() {
        Some(b) => {
            let addr = b.addr.clone();
            match tokio::task::block_in_place(|| read_dead_letters(&addr)) {
                Ok((d, reasons)) => {
                    report.dead_letter_reasons = reasons;
                    d
                }
                Err(e) => {
                    report.violations.push(format!("dead-letter topic: {e:#}"));
                    HashSet::new()
                }
            }
        }
        None => HashSet::new(),
    };
    let (kv, kstats) = chaos::check_kafka(TOPIC, &rec.produced, &dead, &execs, healthy);
    report.violations.extend(kv);
    report.kafka = kstats;
    report.produce_failures = rec.produce_failures;
    for (t, code) in &rec.errors {
        *report.errors_by_code.entry(code.clone()).or_default() += 1;
        let window = windows.iter().find(|(a, b, _)| t >= a && t <= b);
        if let Some((_, _, i)) = window {
            report.faults[*i].failed_calls += 1;
        }
        if code == "DeadlineExceeded" {
            match window {
                Some((_, _, i)) => {
                    report.deadline_in_faults += 1;
                    report.faults[*i].deadline_exceeded += 1;
                }
                None => report.deadline_outside += 1,
            }
        }
    }
    if rec.acks.is_empty() {
        report
            .violations
            .push("no call was acknowledged at all".into());
    }
    drop(rec);
}

// ---------------------------------------------------------------------------------------
// Report

fn markdown(args: &Args, seed: u64, reports: &[RunReport], elapsed: Duration) -> String {
    let mut s = String::new();
    let violations: usize = reports.iter().map(|r| r.violations.len()).sum();
    let _ = writeln!(s, "# Chaos campaign\n");
    let _ = writeln!(
        s,
        "Written by `leasehold-chaos` (`make chaos`); see `integration-tests/src/chaos.rs` for \
         the invariants and `integration-tests/src/bin/leasehold-chaos.rs` for the faults.\n"
    );
    let _ = writeln!(
        s,
        "Reproduce: `make chaos RUNS={} SEED={seed} DURATION={}` (run r uses seed {seed}+r; \
         the fault schedule is determined by the seed, process timing is not).\n",
        args.runs, args.duration
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| runs | {} |", reports.len());
    let _ = writeln!(s, "| seed | {seed} |");
    let _ = writeln!(s, "| fault phase per run | {} s |", args.duration);
    let _ = writeln!(
        s,
        "| lease TTL | {} s (heal target {} s) |",
        args.ttl,
        args.ttl + 2
    );
    let _ = writeln!(s, "| wall time | {:.0} s |", elapsed.as_secs_f64());
    let execs: usize = reports.iter().map(|r| r.executions).sum();
    let grpc: usize = reports.iter().map(|r| r.grpc_executions).sum();
    let acks: usize = reports.iter().map(|r| r.acks).sum();
    let produced: usize = reports.iter().map(|r| r.kafka.produced).sum();
    let _ = writeln!(
        s,
        "| handler executions checked | {execs} ({grpc} gRPC, {} Kafka) |",
        execs - grpc
    );
    let _ = writeln!(s, "| acknowledged increments | {acks} |");
    let _ = writeln!(
        s,
        "| Kafka records produced / dead-lettered / re-deliveries / replays | {produced} / {} / {} / {} |",
        reports.iter().map(|r| r.kafka.dead_lettered).sum::<usize>(),
        reports.iter().map(|r| r.kafka.repeats).sum::<usize>(),
        reports.iter().map(|r| r.kafka.rewinds).sum::<usize>()
    );
    let in_f: u64 = reports.iter().map(|r| r.deadline_in_faults).sum();
    let out_f: u64 = reports.iter().map(|r| r.deadline_outside).sum();
    let _ = writeln!(
        s,
        "| DEADLINE_EXCEEDED during faults / outside | {in_f} / {out_f} |"
    );
    let heals: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.faults.iter())
        .filter_map(|f| f.heal.as_ref().ok().map(Duration::as_secs_f64))
        .collect();
    let unhealed = reports
        .iter()
        .flat_map(|r| r.faults.iter())
        .filter(|f| f.heal.is_err())
        .count();
    let worst = heals.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        s,
        "| worst heal time | {worst:.2} s{} |",
        if unhealed > 0 {
            format!(
                " ({unhealed} faults never healed within {} s)",
                HEAL_DEADLINE.as_secs()
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "| violations | {violations} |\n");

    let _ = writeln!(s, "## What is checked\n");
    let _ = writeln!(
        s,
        "From the suite's own records only (handler sidecar logs with CLOCK_MONOTONIC \
         intervals, acknowledged values, counter files, producer delivery reports, the \
         dead-letter topic), never from Leasehold's metrics:\n\n\
         - **(a) single writer**: no two handler executions of one key overlap in time.\n\
         - **(b) no lost update**: per gRPC key every acknowledged counter value is unique, \
         and the final counter is at least the number of acknowledged increments and at \
         least the largest acknowledged value.\n\
         - **(c) Kafka**: every delivered record is executed at least once (or is in the \
         dead-letter topic) with the key it was produced with; per key and partition, in \
         start order, each execution runs the next produced offset or goes back to an \
         earlier one (a replay after a rebalance or crash). Jumping forward past an offset \
         is a violation: out of order, or a *stale re-run* (an old offset executed again \
         after a larger one, and the sequence then going on without replaying what follows \
         it).\n\
         - **(d) heal**: after each fault is undone, every instance answers /readyz 200 and \
         its /v1/cluster shows 3 members and unowned_shards 0 within TTL + 2 s (polled every \
         100 ms; given up after {} s, then the suite restarts unready instances and goes on).\n\n\
         `leasehold-chaos --self-test` sends the same load straight to the sidecars, around \
         Leasehold: (a) and (b) must then report violations, which shows they can fail.\n",
        HEAL_DEADLINE.as_secs()
    );
    let _ = writeln!(s, "## Faults injected\n");
    let _ = writeln!(
        s,
        "| kind | injected | healed in target | slow | never | worst heal (s) | DEADLINE_EXCEEDED |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let mut kinds: Vec<Kind> = SINGLE.to_vec();
    kinds.push(Kind::Combo);
    let target = (args.ttl + 2) as f64;
    for k in kinds {
        let fs: Vec<&FaultRecord> = reports
            .iter()
            .flat_map(|r| r.faults.iter())
            .filter(|f| f.kinds.contains(&k))
            .collect();
        let ok = fs
            .iter()
            .filter(|f| f.heal.as_ref().is_ok_and(|d| d.as_secs_f64() <= target))
            .count();
        let never = fs.iter().filter(|f| f.heal.is_err()).count();
        let worst = fs
            .iter()
            .filter_map(|f| f.heal.as_ref().ok().map(Duration::as_secs_f64))
            .fold(0.0, f64::max);
        let de: u64 = fs.iter().map(|f| f.deadline_exceeded).sum();
        let _ = writeln!(
            s,
            "| {} | {} | {ok} | {} | {never} | {worst:.2} | {de} |",
            k.name(),
            fs.len(),
            fs.len() - ok - never
        );
    }
    let _ = writeln!(s, "\n## Violations\n");
    if violations == 0 {
        let _ = writeln!(s, "None.");
    }
    for r in reports {
        if r.violations.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "Seed {} ({} violations; logs in `{}`):\n",
            r.seed,
            r.violations.len(),
            r.dir.display()
        );
        for v in r.violations.iter().take(40) {
            let first = v.lines().next().unwrap_or_default();
            let _ = writeln!(s, "- {}", first.replace('|', "\\|"));
        }
        if r.violations.len() > 40 {
            let _ = writeln!(s, "- … {} more", r.violations.len() - 40);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Runs\n");
    for r in reports {
        let _ = writeln!(
            s,
            "### Seed {}\n\n{} executions, {} acknowledged increments, errors by code: {:?}{}\n",
            r.seed,
            r.executions,
            r.acks,
            r.errors_by_code,
            r.aborted
                .as_ref()
                .map(|a| format!("; ABORTED: {}", a.lines().next().unwrap_or_default()))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "| at (s) | fault | hold (s) | heal (s) | failed calls | DEADLINE_EXCEEDED |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for f in &r.faults {
            let heal = match &f.heal {
                Ok(d) => format!("{:.2}", d.as_secs_f64()),
                Err(e) => format!("never: {}", e.replace('|', "\\|")),
            };
            let _ = writeln!(
                s,
                "| {:.1} | {} | {:.1} | {heal} | {} | {} |",
                f.at_s, f.what, f.hold_s, f.failed_calls, f.deadline_exceeded
            );
        }
        if !r.dead_letter_reasons.is_empty() {
            let _ = writeln!(
                s,
                "\nDead-letter reasons (first {}): {}",
                r.dead_letter_reasons.len(),
                r.dead_letter_reasons.join("; ").replace('|', "\\|")
            );
        }
        if !r.repairs.is_empty() {
            let _ = writeln!(s, "\nRepairs after failed heals: {}", r.repairs.join("; "));
        }
        let _ = writeln!(s);
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Err(e) = netns::ip(&["netns", "list"]) {
        eprintln!("leasehold-chaos needs root and iproute2: {e:#}");
        std::process::exit(2);
    }
    let removed = netns::cleanup_stale();
    if !removed.is_empty() {
        eprintln!(
            "removed leftovers of an earlier run: {}",
            removed.join(", ")
        );
    }
    // Ctrl-C: the drop guards do not run on a signal, so clean up here.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted; removing namespaces");
            netns::cleanup_stale();
            std::process::exit(130);
        }
    });
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    eprintln!(
        "chaos campaign: {} runs, seed {seed}, {} s of faults per run, TTL {} s",
        args.runs, args.duration, args.ttl
    );
    let _ = std::fs::remove_dir_all(&args.work_dir);
    let started = Instant::now();
    let mut reports = Vec::new();
    for r in 0..args.runs {
        let run_seed = seed.wrapping_add(r);
        let dir = args.work_dir.join(format!("seed-{run_seed}"));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("create {}: {e}", dir.display());
            std::process::exit(2);
        }
        eprintln!("=== run {}/{} (seed {run_seed}) ===", r + 1, args.runs);
        let report = run_once(&args, run_seed, &dir).await;
        eprintln!(
            "=== run {} done: {} faults, {} executions, {} violations ===",
            r + 1,
            report.faults.len(),
            report.executions,
            report.violations.len()
        );
        for v in report.violations.iter().take(10) {
            eprintln!("  VIOLATION {}", v.lines().next().unwrap_or_default());
        }
        reports.push(report);
        let left = netns::cleanup_stale();
        if !left.is_empty() {
            eprintln!("warning: run left {} behind (removed now)", left.join(", "));
        }
    }
    let md = markdown(&args, seed, &reports, started.elapsed());
    if let Some(parent) = args.out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(&args.out, &md) {
        eprintln!("write {}: {e}", args.out.display());
    }
    let summary: String = md
        .split("## Violations")
        .next()
        .unwrap_or_default()
        .to_string();
    println!("{summary}");
    let violations: usize = reports.iter().map(|r| r.violations.len()).sum();
    let clean = netns::nothing_left();
    if !clean {
        eprintln!("error: lhc* namespaces or links are still present");
    }
    if args.self_test {
        // Around Leasehold the checks must fire; a self-test without them is the failure.
        let all: Vec<&String> = reports.iter().flat_map(|r| r.violations.iter()).collect();
        let overlap = all.iter().filter(|v| v.starts_with("overlap")).count();
        let lost = all.iter().filter(|v| v.starts_with("lost update")).count();
        eprintln!("self-test: {overlap} overlaps, {lost} lost updates found");
        if overlap == 0 || lost == 0 || !clean {
            eprintln!("self-test FAILED: the checks did not catch unserialised writes");
            std::process::exit(1);
        }
        eprintln!("self-test passed: the checks catch unserialised writes");
        return;
    }
    if violations > 0 || !clean {
        eprintln!(
            "chaos: {violations} violations (see {}); reproduce with `make chaos RUNS={} SEED={seed} DURATION={}`",
            args.out.display(),
            args.runs,
            args.duration
        );
        std::process::exit(1);
    }
    eprintln!("chaos: no violations (seed {seed})");
}
