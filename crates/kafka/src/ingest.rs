//! The consumer loop of one source.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use leasehold_metrics::{Counter, Gauge, Histogram, Registry};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::window::Window;
use crate::{Dispatcher, Error, KafkaCall, SourceOptions};

/// Rebalance events, forwarded out of librdkafka's callback (which runs inside the
/// poll and must not block).
enum Event {
    Revoked(Vec<(String, i32)>),
}

struct Context {
    source: String,
    events: mpsc::UnboundedSender<Event>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let parts: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(source = %self.source, partitions = ?parts, "partitions revoked; committing their watermark");
                // Commit what is stored for them without blocking the poll.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(source = %self.source, error = %e, "commit on revoke");
                }
                let _ = self.events.send(Event::Revoked(parts));
            }
            Rebalance::Assign(list) => {
                let parts: Vec<(String, i32)> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(source = %self.source, partitions = ?parts, "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(source = %self.source, error = %e, "rebalance error")
            }
        }
    }
}

type Done = Shared<BoxFuture<'static, ()>>;

/// The partitions assigned now, by (topic, partition).
type Partitions = Arc<Mutex<HashMap<(String, i32), Arc<Partition>>>>;

/// State of one assigned partition. Replaced when the partition is assigned again, so
/// work of an earlier assignment never stores offsets.
struct Partition {
    topic: String,
    partition: i32,
    window: Mutex<Window>,
    /// Key → completion of the latest message with that key (per-key order).
    chains: Mutex<HashMap<String, Done>>,
    limit: Arc<Semaphore>,
    revoked: AtomicBool,
    watermark: Arc<Gauge>,
    lag: Arc<Gauge>,
}

struct Metrics {
    consumed: Arc<Counter>,
    handled: Arc<Counter>,
    retries: Arc<Counter>,
    dead_lettered: Arc<Counter>,
    in_flight: Arc<Gauge>,
    latency: Arc<Histogram>,
    store_errors: Arc<Counter>,
}

/// Ingestion of one source. `run` until cancelled; then it stops fetching, lets
/// in-flight messages finish (bounded) and commits the watermarks.
pub struct Ingest {
    opts: SourceOptions,
    dispatcher: Arc<dyn Dispatcher>,
    registry: Registry,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(opts: SourceOptions, dispatcher: Arc<dyn Dispatcher>, registry: &Registry) -> Self {
        let l = format!("source=\"{}\"", opts.name);
        let metrics = Metrics {
            consumed: registry.counter(
                "leasehold_kafka_consumed_total",
                "Kafka messages consumed.",
                &l,
            ),
            handled: registry.counter(
                "leasehold_kafka_handled_total",
                "Kafka messages handled at their owner.",
                &l,
            ),
            retries: registry.counter(
                "leasehold_kafka_retries_total",
                "Handler attempts that failed and were retried.",
                &l,
            ),
            dead_lettered: registry.counter(
                "leasehold_kafka_dead_lettered_total",
                "Kafka messages written to the dead-letter topic.",
                &l,
            ),
            in_flight: registry.gauge(
                "leasehold_kafka_in_flight",
                "Kafka messages consumed and not yet done.",
                &l,
            ),
            latency: registry.histogram(
                "leasehold_kafka_end_to_end_seconds",
                "From the message's timestamp to done.",
                &l,
            ),
            store_errors: registry.counter(
                "leasehold_kafka_offset_store_errors_total",
                "Offset stores Kafka refused.",
                &l,
            ),
        };
        Self {
            opts,
            dispatcher,
            registry: registry.clone(),
            metrics: Arc::new(metrics),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.opts.brokers);
        for (k, v) in &self.opts.properties {
            c.set(k, v);
        }
        c
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let o = &self.opts;
        let kafka = |error| Error::Kafka {
            source_name: o.name.clone(),
            error,
        };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut config = self.client_config();
        config
            .set("group.id", &o.group)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                o.commit_interval.as_millis().to_string(),
            )
            // Offsets are stored by us, only up to the watermark.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky");
        let consumer: Arc<StreamConsumer<Context>> = Arc::new(
            config
                .create_with_context(Context {
                    source: o.name.clone(),
                    events: events_tx,
                })
                .map_err(kafka)?,
        );
        let topics: Vec<&str> = o.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(kafka)?;
        let producer: Option<FutureProducer> = match &o.dlq_topic {
            Some(_) => Some(
                self.client_config()
                    .set("enable.idempotence", "true")
                    .create()
                    .map_err(kafka)?,
            ),
            None => None,
        };
        tracing::info!(source = %o.name, topics = ?o.topics, group = %o.group, key = %o.key, dlq = ?o.dlq_topic, "kafka source started");

        let total = Arc::new(Semaphore::new(o.max_in_flight));
        let partitions: Partitions = Default::default();
        let mut series: HashMap<(String, i32), (Arc<Gauge>, Arc<Gauge>)> = HashMap::new();
        let lag_task = tokio::spawn(report_lag(
            consumer.clone(),
            partitions.clone(),
            cancel.clone(),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let message = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(Event::Revoked(list)) = events.recv() => {
                    for tp in list {
                        if let Some(p) = partitions.lock().expect("partitions lock").remove(&tp) {
                            p.revoked.store(true, Ordering::Release);
                            p.lag.set(0.0); // another instance reports it now
                        }
                    }
                    continue;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                m = consumer.recv() => m,
            };
            let m = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(source = %o.name, error = %e, "kafka consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.metrics.consumed.inc();
            let tp = (m.topic().to_owned(), m.partition());
            // One series per partition for the life of the process, reused when the
            // partition comes back (a second registration would duplicate the series).
            let gauges = series.entry(tp.clone()).or_insert_with(|| {
                let labels = format!(
                    "source=\"{}\",topic=\"{}\",partition=\"{}\"",
                    o.name, tp.0, tp.1
                );
                (
                    self.registry.gauge(
                        "leasehold_kafka_commit_watermark",
                        "Offset stored for commit (lowest offset not done) per partition.",
                        &labels,
                    ),
                    self.registry.gauge(
                        "leasehold_kafka_lag",
                        "Messages between the commit watermark and the partition's end.",
                        &labels,
                    ),
                )
            });
            let part = partitions
                .lock()
                .expect("partitions lock")
                .entry(tp.clone())
                .or_insert_with(|| {
                    Arc::new(Partition {
                        topic: tp.0.clone(),
                        partition: tp.1,
                        window: Mutex::new(Window::default()),
                        chains: Mutex::new(HashMap::new()),
                        limit: Arc::new(Semaphore::new(o.max_in_flight_per_partition)),
                        revoked: AtomicBool::new(false),
                        watermark: gauges.0.clone(),
                        lag: gauges.1.clone(),
                    })
                })
                .clone();
            // Back-pressure: wait for room (bounded by handler deadlines), then go on.
            let permits = tokio::select! {
                _ = cancel.cancelled() => break,
                p = acquire(&total, &part.limit) => p,
            };
            let offset = m.offset();
            part.window.lock().expect("window lock").start(offset);
            self.metrics.in_flight.add(1);
            let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
            let key = o.key.extract(m.key(), m.payload(), |name| {
                m.headers()
                    .and_then(|h| h.iter().find(|hd| hd.key == name).and_then(|hd| hd.value))
            });
            let timestamp = m.timestamp().to_millis();
            let record = Record {
                topic: tp.0.clone(),
                partition: tp.1,
                offset,
                key: m.key().map(Bytes::copy_from_slice),
                payload,
                headers: m.headers().map(|h| h.detach()),
            };
            drop(m);
            let worker = Worker {
                opts: self.opts.clone(),
                dispatcher: self.dispatcher.clone(),
                producer: producer.clone(),
                consumer: consumer.clone(),
                metrics: self.metrics.clone(),
                part: part.clone(),
            };
            match key {
                Err(reason) => {
                    tasks.spawn(async move {
                        worker.dead_letter(&record, &format!("key: {reason}")).await;
                        worker.finish(offset, timestamp);
                        drop(permits);
                    });
                }
                Ok(key) => {
                    let (done_tx, done_rx) = oneshot::channel::<()>();
                    let done: Done = done_rx.map(|_| ()).boxed().shared();
                    let previous = part
                        .chains
                        .lock()
                        .expect("chains lock")
                        .insert(key.clone(), done.clone());
                    tasks.spawn(async move {
                        if let Some(previous) = previous {
                            previous.await; // the previous message with this key, same partition
                        }
                        worker.handle(key.clone(), &record).await;
                        worker.finish(offset, timestamp);
                        let _ = done_tx.send(());
                        let mut chains = worker.part.chains.lock().expect("chains lock");
                        if chains.get(&key).is_some_and(|d| d.ptr_eq(&done)) {
                            chains.remove(&key);
                        }
                        drop(permits);
                    });
                }
            }
        }

        // Shutdown: stop fetching, give in-flight messages a bounded time, commit.
        let grace = Duration::from_secs(10);
        tracing::info!(source = %o.name, in_flight = tasks.len(), "kafka source stopping");
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!(source = %o.name, left = tasks.len(), "in-flight messages abandoned (not committed)");
            tasks.abort_all();
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(source = %o.name, error = %e, "final commit");
        }
        consumer.unsubscribe();
        lag_task.abort();
        tracing::info!(source = %o.name, "kafka source stopped");
        Ok(())
    }
}

/// Every 5 s: consumer lag per assigned partition = end offset − commit watermark.
/// Fetching end offsets blocks, so it runs on the blocking pool.
async fn report_lag(
    consumer: Arc<StreamConsumer<Context>>,
    partitions: Partitions,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let parts: Vec<Arc<Partition>> = partitions
            .lock()
            .expect("partitions lock")
            .values()
            .cloned()
            .collect();
        let consumer = consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for p in parts {
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&p.topic, p.partition, Duration::from_secs(1))
                {
                    let done_up_to = p
                        .window
                        .lock()
                        .expect("window lock")
                        .watermark()
                        .unwrap_or(high);
                    p.lag.set((high - done_up_to).max(0) as f64);
                }
            }
        })
        .await;
    }
}

async fn acquire(
    total: &Arc<Semaphore>,
    part: &Arc<Semaphore>,
) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
    let p = part.clone().acquire_owned().await.expect("semaphore open");
    let t = total.clone().acquire_owned().await.expect("semaphore open");
    (p, t)
}

/// A consumed message, detached from the consumer's buffer.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Option<OwnedHeaders>,
}

struct Worker {
    opts: SourceOptions,
    dispatcher: Arc<dyn Dispatcher>,
    producer: Option<FutureProducer>,
    consumer: Arc<StreamConsumer<Context>>,
    metrics: Arc<Metrics>,
    part: Arc<Partition>,
}

impl Worker {
    /// Dispatches with retries; dead-letters after the last attempt (or retries forever
    /// without a dead-letter topic, so nothing is lost).
    async fn handle(&self, key: String, r: &Record) {
        let call = KafkaCall {
            key,
            payload: r.payload.clone(),
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if self.part.revoked.load(Ordering::Acquire) && attempt > 1 {
                return; // another instance owns the partition now and will re-read it
            }
            match self.dispatcher.dispatch(call.clone()).await {
                Ok(()) => {
                    self.metrics.handled.inc();
                    return;
                }
                Err(reason) => {
                    if self.producer.is_some() && attempt >= self.opts.retry_attempts {
                        let why = format!("handler failed {attempt} times; last error: {reason}");
                        self.dead_letter(r, &why).await;
                        return;
                    }
                    self.metrics.retries.inc();
                    let backoff = self
                        .opts
                        .retry_backoff
                        .saturating_mul(1 << (attempt - 1).min(6))
                        .min(Duration::from_secs(10));
                    tracing::debug!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, attempt, error = %reason, "handler failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Writes the message unchanged to the dead-letter topic with the reason and origin
    /// in headers; retries the write until it is acknowledged.
    async fn dead_letter(&self, r: &Record, reason: &str) {
        let (Some(producer), Some(topic)) = (&self.producer, &self.opts.dlq_topic) else {
            tracing::error!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, reason, "message cannot be handled and no dead-letter topic is configured; skipping it");
            return;
        };
        let partition = r.partition.to_string();
        let offset = r.offset.to_string();
        let mut headers = r.headers.clone().unwrap_or_default();
        for (k, v) in [
            ("leasehold.reason", reason),
            ("leasehold.source.topic", r.topic.as_str()),
            ("leasehold.source.partition", partition.as_str()),
            ("leasehold.source.offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(&r.payload[..])
                .headers(headers.clone());
            if let Some(k) = &r.key {
                record = record.key(&k[..]);
            }
            match producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    self.metrics.dead_lettered.inc();
                    tracing::warn!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, reason, dlq = %topic, "message dead-lettered");
                    return;
                }
                Err((e, _)) => {
                    tracing::warn!(dlq = %topic, error = %e, "dead-letter write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Marks a message done and stores the new watermark for the next commit.
    fn finish(&self, offset: i64, timestamp: Option<i64>) {
        self.metrics.in_flight.add(-1);
        if let Some(ts) = timestamp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            self.metrics
                .latency
                .observe(Duration::from_millis(now.saturating_sub(ts).max(0) as u64));
        }
        let watermark = self.part.window.lock().expect("window lock").finish(offset);
        let Some(watermark) = watermark else { return };
        if self.part.revoked.load(Ordering::Acquire) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(
                &self.part.topic,
                self.part.partition,
                Offset::Offset(watermark),
            )
            .is_err()
        {
            return;
        }
        // store_offsets stores exactly the value given and reports per-partition failures
        // in the list, not in its result.
        let result = self.consumer.store_offsets(&tpl);
        let failed = result.err().map(|e| e.to_string()).or_else(|| {
            tpl.elements()
                .iter()
                .find_map(|e| e.error().err().map(|e| e.to_string()))
        });
        match failed {
            None => self.part.watermark.set(watermark as f64),
            Some(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(topic = %self.part.topic, partition = self.part.partition, watermark, error = %e, "offset store refused (partition revoked?)");
            }
        }
    }
}
