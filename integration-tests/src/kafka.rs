//! An Apache Kafka broker (KRaft, combined broker + controller) from Maven Central's
//! jars on loopback, plus the admin, produce and consume helpers the tests need.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::{free_port, wait_until};

fn libs() -> PathBuf {
    std::env::var("LEASEHOLD_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/leasehold/kafka/libs")
        })
}

/// A consumed record: (partition, offset, value, headers).
pub type Record = (i32, i64, Vec<u8>, Vec<(String, String)>);

/// A single-node Kafka broker; killed on drop.
pub struct Kafka {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Kafka {
    pub async fn start() -> Kafka {
        let libs = libs();
        assert!(
            libs.join(".pom.sha256").exists(),
            "Kafka jars missing in {}: run scripts/install-kafka.sh (make test does)",
            libs.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let (port, controller_port) = (free_port(), free_port());
        let props = format!(
            "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={}\nnum.partitions=1\noffsets.topic.replication.factor=1\noffsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("server.properties"), props).unwrap();
        let cp = format!("{}/*", libs.display());
        let format = Command::new("java")
            .args([
                "-cp",
                &cp,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                "lh-test-cluster-0000001",
                "-c",
            ])
            .arg(dir.path().join("server.properties"))
            .output()
            .expect("java not found");
        assert!(
            format.status.success(),
            "kafka storage format failed: {}",
            String::from_utf8_lossy(&format.stderr)
        );
        let mut k = Kafka {
            child: None,
            port,
            dir,
        };
        k.spawn();
        k.wait_ready().await;
        k
    }

    fn spawn(&mut self) {
        let cp = format!("{}/*", libs().display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("broker.log"))
            .unwrap();
        let child = Command::new("java")
            .args([
                "-Xms256m",
                "-Xmx768m",
                "-XX:+UseG1GC",
                "-cp",
                &cp,
                "kafka.Kafka",
            ])
            .arg(self.dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kafka");
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        let brokers = self.brokers();
        wait_until(
            Duration::from_secs(60),
            "kafka broker to answer metadata",
            || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .ok()?;
                c.fetch_metadata(None, Duration::from_millis(1000))
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
        self.wait_ready().await;
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await;
    }

    /// Creates a topic with topic-level configuration (`max.message.bytes`, say).
    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let r = admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .unwrap();
        for t in r {
            t.unwrap_or_else(|(n, e)| panic!("create topic {n}: {e}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .unwrap()
    }

    /// Produces `values` with null keys (the partitioner spreads them), in order.
    pub async fn produce(&self, topic: &str, values: &[Vec<u8>]) {
        send_all(&self.producer(), topic, values).await;
    }

    /// Reads a whole topic: (partition, offset, value, headers).
    pub fn read_all(&self, topic: &str, expect: usize, timeout: Duration) -> Vec<Record> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", format!("reader-{}", rand::random::<u64>()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < expect && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.partition(),
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
        }
        out
    }

    /// Committed offsets of a group for a topic's partitions (-1: none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// How far the group has read each partition: its committed offset, or 0 where it
    /// never committed (a test topic starts at offset 0, and a partition the producer's
    /// partitioner left empty has nothing to commit).
    pub fn position(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        self.committed(group, topic, partitions)
            .into_iter()
            .map(|c| c.max(0))
            .collect()
    }

    /// Polls until the group's position (see [`Kafka::position`]) reaches the end of
    /// every partition; on timeout, fails naming both.
    pub async fn wait_committed_to_end(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
        timeout: Duration,
    ) {
        let end = self.end_offsets(topic, partitions);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let position = self.position(group, topic, partitions);
            if position == end {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "group {group} on {topic}: committed {position:?}, end {end:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// High watermarks (end offsets) per partition.
    pub fn end_offsets(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .collect()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- kafka log (tail) ---\n{}", self.log_tail());
        }
        self.stop();
    }
}

/// Enqueues every value at once (null keys), then waits for every delivery.
pub async fn send_all(p: &FutureProducer, topic: &str, values: &[Vec<u8>]) {
    let mut pending = Vec::new();
    for v in values {
        let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).payload(&v[..]);
        loop {
            match p.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((e, r)) => {
                    record = r;
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "{e}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        if pending.len() >= 10_000 {
            for f in pending.drain(..) {
                f.await.unwrap().unwrap();
            }
        }
    }
    for f in pending {
        f.await.unwrap().unwrap();
    }
}
