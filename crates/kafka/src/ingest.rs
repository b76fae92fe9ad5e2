//! The consumer loop of one source.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use leasehold_metrics::{Counter, Gauge, Histogram, Registry};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::window::Window;
use crate::{
    DispatchError, Dispatcher, Error, KafkaCall, OnFailure, PartitionStatus, SourceOptions,
    SourceStatus, StatusHandle,
};

/// The consumer's context: rebalance callbacks run inside the poll and must not block,
/// so they only flip flags and make non-blocking calls.
struct Context {
    source: String,
    partitions: Partitions,
    /// The consumer itself, set once it exists: each assigned partition gets its own
    /// queue, read only as fast as its messages find room (see [`Split`]).
    consumer: OnceLock<Weak<StreamConsumer<Context>>>,
    splits: mpsc::UnboundedSender<Split>,
    /// The reader of each assigned partition's queue, stopped when it is revoked.
    readers: Mutex<HashMap<(String, i32), Reader>>,
    /// Each partition's queue, split once and kept while the consumer lives: handles
    /// of one partition share librdkafka's queue and its wake-up, which dropping any
    /// handle turns off, so a reader that ends late must not drop the only handle after
    /// the next reader of the partition started. Cleared when the source stops (the
    /// handles hold the consumer).
    queues: Mutex<HashMap<(String, i32), Arc<PartitionQueue>>>,
    /// Stops every reader (the source is stopping).
    stop: CancellationToken,
    /// Testing only, and only in debug builds: how long the assign callback sleeps right
    /// after the assignment took effect (`FAILPOINT_KAFKA_AFTER_ASSIGN_MS`). It widens the
    /// window in which the first messages of a newly assigned partition are fetched, so
    /// a test can show that none of them reaches the consumer's own queue.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    after_assign: Option<Duration>,
    misrouted: Arc<Counter>,
    /// Partitions a misrouted message was logged for (once each).
    misrouted_logged: Mutex<std::collections::HashSet<(String, i32)>>,
}

type PartitionQueue = StreamPartitionQueue<Context>;

/// A running reader of one partition's queue, as the context knows it.
struct Reader {
    cancel: CancellationToken,
    /// The generation of the partition's latest assignment (see [`Split::generation`]).
    generation: Arc<AtomicI32>,
}

/// Drops every partition queue handle the consumer's context keeps.
struct ReleaseQueues(Arc<StreamConsumer<Context>>);

impl Drop for ReleaseQueues {
    fn drop(&mut self) {
        if let Ok(mut queues) = self.0.context().queues.lock() {
            queues.clear();
        }
    }
}

/// What a partition's reader took from its queue.
enum Taken {
    Message(Arc<Partition>, Parked),
    Failed(rdkafka::error::KafkaError),
    /// The reader was stopped (its partition revoked).
    Revoked,
}

/// An assigned partition's own message queue, split from the consumer's in the assign
/// callback. Its reader takes the next message only once the previous one has room to
/// run, so back-pressure is librdkafka's own: it stops fetching the partition at
/// `queued.min.messages` and resumes `fetch.queue.backoff.ms` after the reader caught
/// up. Pausing instead makes librdkafka drop what it prefetched, and a resumed
/// partition is only fetched again on its broker thread's next wake-up, up to a second
/// later: the whole pipeline idled about half of the time under a backlog.
struct Split {
    topic: String,
    partition: i32,
    queue: Arc<PartitionQueue>,
    /// The group generation the partition was assigned in (read in the callback); a
    /// later assignment that keeps the reader updates it.
    generation: Arc<AtomicI32>,
    /// Cancelled when the partition is revoked or the source stops.
    cancel: CancellationToken,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let parts = topic_partitions(list);
                tracing::info!(source = %self.source, partitions = ?parts, "partitions revoked; committing their watermark");
                // Marked here, inside the poll that revokes them, so no message of theirs
                // waiting in this instance starts after this point: the new assignee
                // re-reads from the watermark, and a stale copy must not run after it
                // handled newer offsets.
                // Under the partitions lock: a stopped reader takes no message and
                // creates no state (see `Ingest::take`).
                let mut map = self.partitions.lock().expect("partitions lock");
                let mut readers = self.readers.lock().expect("readers lock");
                for tp in &parts {
                    if let Some(p) = map.remove(tp) {
                        p.revoke();
                    }
                    if let Some(reader) = readers.remove(tp) {
                        reader.cancel.cancel();
                    }
                }
                drop(readers);
                drop(map);
                // Commit what is stored for them without blocking the poll.
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                    tracing::debug!(source = %self.source, error = %e, "commit on revoke");
                }
            }
            // Each new partition gets its own queue BEFORE the assignment takes effect:
            // fetching starts as soon as the group coordinator answered the committed
            // offsets, and messages fetched before the split would sit in the consumer's
            // queue, read by the consumer loop while the partition's reader reads the
            // later ones — two readers of one partition, whose keys' messages would start
            // out of order. librdkafka keeps a queue split by the application unforwarded
            // across assignments (`RD_KAFKA_Q_F_FWD_APP`).
            Rebalance::Assign(list) => self.split(consumer, &topic_partitions(list)),
            Rebalance::Error(e) => {
                tracing::warn!(source = %self.source, error = %e, "rebalance error")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            #[cfg(debug_assertions)]
            if let Some(pause) = self.after_assign {
                tracing::warn!(source = %self.source, ?pause, "failpoint: holding the assign callback");
                std::thread::sleep(pause);
            }
            let parts = topic_partitions(list);
            tracing::info!(source = %self.source, partitions = ?parts, "partitions assigned");
            // A partition paused for back-pressure when it was revoked may come back
            // paused; its new state starts empty, so fetch it again.
            if let Err(e) = consumer.resume(list) {
                tracing::debug!(source = %self.source, error = %e, "resume on assign");
            }
        }
    }
}

impl Context {
    /// Gives each partition about to be assigned its own queue and hands it to a reader.
    /// Called before the assignment takes effect, so none of the partition's messages
    /// reaches the consumer's own queue; a partition that cannot be split is read from it
    /// instead (and only from it).
    fn split(&self, base: &BaseConsumer<Self>, parts: &[(String, i32)]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let generation = crate::group::generation(base);
        let mut readers = self.readers.lock().expect("readers lock");
        let mut queues = self.queues.lock().expect("queues lock");
        for (topic, partition) in parts {
            let tp = (topic.clone(), *partition);
            // Assigned again without a revoke in between (not expected of the cooperative
            // protocol): its reader goes on. Replacing it would stop it with a message it
            // took and not yet started, which the shared state would never see again.
            if let Some(reader) = readers.get(&tp).filter(|r| !r.cancel.is_cancelled()) {
                tracing::warn!(source = %self.source, %topic, partition, generation, "partition assigned again while its reader runs; keeping the reader");
                reader.generation.store(generation, Ordering::Release);
                continue;
            }
            let queue = match queues.get(&tp) {
                Some(q) => q.clone(),
                None => match consumer.split_partition_queue(topic, *partition) {
                    Some(q) => queues.entry(tp).or_insert(Arc::new(q)).clone(),
                    None => {
                        tracing::warn!(source = %self.source, %topic, partition, "could not give the partition its own queue; reading it from the consumer's");
                        continue;
                    }
                },
            };
            let cancel = self.stop.child_token();
            let generation = Arc::new(AtomicI32::new(generation));
            readers.insert(
                (topic.clone(), *partition),
                Reader {
                    cancel: cancel.clone(),
                    generation: generation.clone(),
                },
            );
            let _ = self.splits.send(Split {
                topic: topic.clone(),
                partition: *partition,
                queue,
                generation,
                cancel,
            });
        }
    }

    /// A message read from the consumer's own queue must belong to a partition that has
    /// no queue of its own; one that does is counted and logged as an error.
    fn check_unsplit(&self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let tp = (m.topic().to_owned(), m.partition());
        if !self.queues.lock().expect("queues lock").contains_key(&tp) {
            return;
        }
        self.misrouted.inc();
        if self
            .misrouted_logged
            .lock()
            .expect("misrouted lock")
            .insert(tp)
        {
            tracing::error!(source = %self.source, topic = m.topic(), partition = m.partition(), offset = m.offset(), "a message of a partition with its own queue arrived on the consumer's queue; per-key order on this partition is not guaranteed");
        }
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

type Done = Shared<BoxFuture<'static, ()>>;

/// The partitions assigned now, by (topic, partition).
type Partitions = Arc<Mutex<HashMap<(String, i32), Arc<Partition>>>>;

/// State of one assigned partition. Replaced when the partition is assigned again, so
/// work of an earlier assignment never stores offsets.
struct Partition {
    topic: Arc<str>,
    partition: i32,
    window: Mutex<Window>,
    /// Key → completion of the latest message with that key (per-key order).
    chains: Mutex<HashMap<String, Done>>,
    limit: Arc<Semaphore>,
    revoked: AtomicBool,
    /// The group generation in which this state's assignment was seen.
    generation: i32,
    /// Read from its own queue by a reader (see [`Split`]), which also reclaims it.
    split: bool,
    /// Claim whatever is held: this state replaces one whose claim was superseded while
    /// the partition stayed assigned here for a whole session timeout.
    force_claim: bool,
    /// This consumer's claim of the partition, made before its first dispatch.
    fence: tokio::sync::OnceCell<u64>,
    /// When an owner refused a message because another consumer claimed the partition
    /// since (see [`Partition::fenced`]).
    fenced_at: Mutex<Option<Instant>>,
    /// Where re-reading starts if this state is abandoned while the partition stays
    /// assigned: the first offset consumed, then every stored watermark.
    resume_from: AtomicI64,
    /// Cancelled on revoke: a dispatch still waiting in this instance (for an owner, a
    /// lease, its key's turn, a peer's answer) is dropped rather than run late.
    cancel: CancellationToken,
    /// Messages consumed while the partition was at its in-flight limit, in offset order
    /// (a drain task starts them as room frees up), so the consumer loop never blocks.
    parked: Mutex<VecDeque<Parked>>,
    /// Paused in librdkafka because `parked` reached the in-flight limit too (only a
    /// partition read from the consumer's queue; see [`Split`]). Only then: a pause
    /// makes librdkafka drop what it prefetched for the partition and fetch it again on
    /// resume (up to a second idle), so pausing at every burst that fills the in-flight
    /// limit cut throughput to a seventh.
    paused: AtomicBool,
    watermark: Arc<Gauge>,
    lag: Arc<Gauge>,
}

impl Partition {
    /// This instance no longer has the partition: nothing of it starts or stores again.
    fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        self.cancel.cancel();
        self.parked.lock().expect("parked lock").clear();
        self.lag.set(0.0); // another instance reports it now
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Another consumer claimed the partition since this one did: stop as on a revoke.
    /// The group normally tells this consumer within a heartbeat; if it still has the
    /// partition after its session timeout, it claims it again (see `Ingest::reclaim`).
    /// Returns true the first time.
    fn fenced(&self) -> bool {
        let mut at = self.fenced_at.lock().expect("fenced lock");
        let first = at.is_none();
        if first {
            *at = Some(Instant::now());
        }
        drop(at);
        self.revoke();
        first
    }

    fn fenced_since(&self) -> Option<Instant> {
        *self.fenced_at.lock().expect("fenced lock")
    }

    fn list(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        tpl
    }
}

/// How many messages a partition may park per message it may have in flight, before it
/// is paused: enough to absorb librdkafka's prefetch bursts without pausing (a pause
/// makes librdkafka drop and re-fetch what it prefetched).
const PARKED_PER_IN_FLIGHT: usize = 4;

/// A consumed message waiting for room in its partition.
struct Parked {
    record: Record,
    key: Result<String, crate::key::KeyError>,
    timestamp: Option<i64>,
}

struct Metrics {
    consumed: Arc<Counter>,
    handled: Arc<Counter>,
    retries: Arc<Counter>,
    dead_lettered: Arc<Counter>,
    in_flight: Arc<Gauge>,
    latency: Arc<Histogram>,
    store_errors: Arc<Counter>,
    waits: Arc<Counter>,
    skipped: Arc<Counter>,
    paused: Arc<Gauge>,
    fenced: Arc<Counter>,
    misrouted: Arc<Counter>,
    internal_errors: Arc<Counter>,
}

/// Ingestion of one source. `run` until cancelled; then it stops fetching, lets
/// in-flight messages finish (bounded) and commits the watermarks.
#[derive(Clone)]
pub struct Ingest {
    /// Shared, not cloned per message.
    opts: Arc<SourceOptions>,
    /// `opts.group` and `opts.cluster`, shared by every message's call.
    group: Arc<str>,
    cluster: Arc<str>,
    status: StatusHandle,
    dispatcher: Arc<dyn Dispatcher>,
    registry: Registry,
    metrics: Arc<Metrics>,
    /// Set before cancelling: stop without the grace for in-flight messages.
    abandon: Arc<AtomicBool>,
    first_unfinished: FirstUnfinished,
}

/// For each partition this consumer holds, by (topic, partition), the time of the first
/// record it read and has not finished ([`Window::first_unfinished_time`]), in Unix
/// milliseconds: every record of the partition that is not done is at or after it.
/// Refreshed every 5 s while [`Ingest::run`] runs, from this instance's own state.
#[derive(Debug, Clone, Default)]
pub struct FirstUnfinished(Arc<Mutex<Progress>>);

#[derive(Debug, Default)]
struct Progress {
    times: BTreeMap<(String, i32), i64>,
    /// Since when [`Ingest::run`] runs; `None` when it does not.
    running_since: Option<Instant>,
}

impl FirstUnfinished {
    pub fn get(&self) -> BTreeMap<(String, i32), i64> {
        self.0.lock().expect("first unfinished lock").times.clone()
    }

    /// How long the consumer has been running; `None` when it is not.
    pub fn running_for(&self) -> Option<Duration> {
        let p = self.0.lock().expect("first unfinished lock");
        p.running_since.map(|t| t.elapsed())
    }

    fn set(&self, times: BTreeMap<(String, i32), i64>) {
        self.0.lock().expect("first unfinished lock").times = times;
    }

    fn set_running(&self, running: bool) {
        self.0.lock().expect("first unfinished lock").running_since = running.then(Instant::now);
    }
}

/// Marks the consumer stopped however [`Ingest::run`] ends.
struct Running(FirstUnfinished);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.set_running(false);
    }
}

impl Ingest {
    pub fn new(opts: SourceOptions, dispatcher: Arc<dyn Dispatcher>, registry: &Registry) -> Self {
        let l = [("source", opts.name.as_str())];
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
            waits: registry.counter(
                "leasehold_kafka_routing_waits_total",
                "Dispatches that did not reach a handler (no owner, lease, unreachable) and were retried.",
                &l,
            ),
            skipped: registry.counter(
                "leasehold_kafka_skipped_total",
                "Messages that could not be handled and were skipped (on_failure = skip).",
                &l,
            ),
            paused: registry.gauge(
                "leasehold_kafka_paused_partitions",
                "Partitions paused because their in-flight limit is reached.",
                &l,
            ),
            fenced: registry.counter(
                "leasehold_kafka_fenced_partitions_total",
                "Partitions this consumer stopped because another consumer of the group claimed them since.",
                &l,
            ),
            misrouted: registry.counter(
                "leasehold_kafka_misrouted_messages_total",
                "Messages of a partition read from its own queue that arrived on the consumer's queue (never expected: their order against the partition's queue is not kept).",
                &l,
            ),
            internal_errors: registry.counter(
                "leasehold_kafka_internal_errors_total",
                "Messages whose handling hit an internal error (a panic in Leasehold, never expected); each then failed like a message that cannot be handled (on_failure).",
                &l,
            ),
        };
        let status = Arc::new(Mutex::new(SourceStatus {
            name: opts.name.clone(),
            group: opts.group.clone(),
            topics: opts.topics.clone(),
            ..SourceStatus::default()
        }));
        Self {
            group: opts.group.as_str().into(),
            cluster: opts.cluster.as_str().into(),
            opts: Arc::new(opts),
            status,
            dispatcher,
            registry: registry.clone(),
            metrics: Arc::new(metrics),
            abandon: Arc::default(),
            first_unfinished: FirstUnfinished::default(),
        }
    }

    /// Reports into `handle` (one across consumers of the same source, e.g. on either
    /// side of a failover), starting it afresh.
    pub fn with_first_unfinished(mut self, handle: FirstUnfinished) -> Self {
        handle.set(BTreeMap::new());
        handle.set_running(false);
        self.first_unfinished = handle;
        self
    }

    /// A switch that, set before [`Ingest::run`]'s token is cancelled, makes the stop
    /// abandon the messages in flight at once instead of giving them a grace: those not
    /// running a handler yet (waiting their turn, parked, between retries) never start,
    /// and are read again by whoever consumes the partition next. For a failover source
    /// leaving a side: the other side may start soon, and with other topic names no
    /// partition claim fences this side's records there.
    pub fn abandon_switch(&self) -> Arc<AtomicBool> {
        self.abandon.clone()
    }

    /// The group's position on the source's partitions, refreshed every 5 s while
    /// [`Ingest::run`] runs (empty until the first refresh).
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Reports into `status` (one handle across consumers of the same source, e.g. on
    /// either side of a failover), starting it afresh.
    pub fn with_status(mut self, status: StatusHandle) -> Self {
        let fresh = self.status.lock().expect("source status lock").clone();
        *status.lock().expect("source status lock") = fresh;
        self.status = status;
        self
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
        if o.on_failure == OnFailure::DeadLetter && o.dlq_topic.is_none() {
            return Err(Error::Config {
                source_name: o.name.clone(),
                message: "on_failure = dead-letter needs a dead-letter topic".into(),
            });
        }
        self.first_unfinished.set_running(true);
        let _running = Running(self.first_unfinished.clone());
        let partitions: Partitions = Default::default();
        let (split_tx, mut splits) = mpsc::unbounded_channel();
        let readers_stop = CancellationToken::new();
        let (consumer, producer) = self.connect(&partitions, split_tx, readers_stop.clone())?;
        tracing::info!(source = %o.name, topics = ?o.topics, group = %o.group, key = %o.key, dlq = ?o.dlq_topic, on_failure = o.on_failure.as_str(), "kafka source started");
        let lag_task = tokio::spawn(report_lag(
            consumer.clone(),
            partitions.clone(),
            self.opts.clone(),
            self.status.clone(),
            self.first_unfinished.clone(),
            cancel.clone(),
        ));
        let state = Consuming {
            total: Arc::new(Semaphore::new(o.max_in_flight)),
            series: Default::default(),
            tasks: TaskTracker::new(),
            consumer,
            producer,
            partitions,
        };
        let reclaim_after = session_timeout(&o.properties) + Duration::from_secs(1);
        let mut reclaim_tick = tokio::time::interval(Duration::from_secs(1));
        reclaim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = state.consumer.clone();
        let readers = TaskTracker::new();
        // Drops the partitions' queue handles also if this loop unwinds: they hold the
        // consumer, which holds them (in its context), so it would never be closed.
        let release_queues = ReleaseQueues(consumer.clone());
        loop {
            let message = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = reclaim_tick.tick() => {
                    let stale = self.fenced_unsplit(&state, reclaim_after);
                    if !stale.is_empty() {
                        // The seeks wait for librdkafka: off the async threads. This loop
                        // takes no message meanwhile, as `reclaim` requires.
                        let (this, st) = (self.clone(), state.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            for (tp, part) in stale {
                                this.reclaim(&st, &tp, &part);
                            }
                        })
                        .await;
                    }
                    self.store_missed_watermarks(&state);
                    continue;
                }
                Some(split) = splits.recv() => {
                    readers.spawn(self.clone().read(state.clone(), split, reclaim_after));
                    continue;
                }
                // Serves the group's events; messages arrive here only for a partition
                // that could not be given its own queue.
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
            let generation = crate::group::generation(consumer.as_ref());
            consumer.context().check_unsplit(&m);
            let part = self.partition(&state, &m, generation);
            let parked = parked(&m, &part, &o.key);
            drop(m);
            self.admit(&state, part, parked);
        }
        // Abandoning: nothing not yet running starts from here on (see `abandon_switch`).
        if self.abandon.load(Ordering::Acquire) {
            for p in state.partitions.lock().expect("partitions lock").values() {
                p.revoke();
            }
        }
        // The readers hold the consumer too (through their queues): they end, and every
        // queue handle is dropped, before it is closed.
        readers_stop.cancel();
        readers.close();
        readers.wait().await;
        drop(splits);
        drop(release_queues);
        drop(consumer);
        self.stop(state, lag_task).await;
        Ok(())
    }

    /// Reads one assigned partition's own queue (see [`Split`]) until it is revoked: a
    /// message is taken only once the previous one has room to start, in offset order.
    /// A partition fenced by another consumer's claim is not read until this reader
    /// reclaims it (see `Ingest::reclaim`).
    async fn read(self, state: Consuming, split: Split, reclaim_after: Duration) {
        let Split {
            topic,
            partition,
            queue,
            generation,
            cancel,
        } = split;
        let source = self.opts.name.as_str();
        let tp = (topic.clone(), partition);
        // However this reader ends (a panic too), its partition's next assignment sees it
        // stopped and starts another.
        let _stopped = cancel.clone().drop_guard();
        tracing::debug!(source, %topic, partition, generation = generation.load(Ordering::Acquire), "reading the partition's own queue");
        loop {
            let current = self.partitions(&state).get(&tp).cloned();
            if let Some(part) = current
                .as_ref()
                .filter(|p| p.split && p.fenced_since().is_some())
            {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if part
                    .fenced_since()
                    .is_some_and(|t| t.elapsed() >= reclaim_after)
                {
                    // The seek waits for librdkafka: off the async threads.
                    let (this, st, tp, part) =
                        (self.clone(), state.clone(), tp.clone(), part.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || this.reclaim(&st, &tp, &part)).await;
                }
                continue;
            }
            // Woken also when the partition's state is stopped (fenced: time to wait for
            // the reclaim, even if no further message comes).
            let stopped = current
                .filter(|p| !p.is_revoked())
                .map(|p| p.cancel.clone());
            let stopped = async {
                match stopped {
                    Some(token) => token.cancelled_owned().await,
                    None => std::future::pending().await,
                }
            };
            let next = self.take(
                &state,
                &tp,
                &queue,
                generation.load(Ordering::Acquire),
                &cancel,
            );
            let taken = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = stopped => continue,
                t = next => t,
            };
            let (part, parked) = match taken {
                Taken::Revoked => return,
                Taken::Failed(e) => {
                    tracing::warn!(source, %topic, partition, error = %e, "kafka consume error");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
                Taken::Message(part, parked) => (part, parked),
            };
            self.metrics.consumed.inc();
            if !part.split {
                // A state the consumer loop made (a message of this partition reached
                // the consumer's queue, never expected; counted there).
                self.admit(&state, part, parked);
                continue;
            }
            if part.is_revoked() {
                continue; // fenced: re-read once reclaimed, or by the claimant
            }
            let permits = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = part.cancel.cancelled() => continue,
                p = acquire(&state.total, &part.limit) => p,
            };
            let worker = self.worker(&state, &part);
            // Started under the partition's parking lock, like the consumer loop does.
            let waiting = part.parked.lock().expect("parked lock");
            if part.is_revoked() {
                continue;
            }
            let run = worker.start(parked, permits);
            drop(waiting);
            state.tasks.spawn(run);
        }
    }

    /// Takes the partition's next message and the state it belongs to, both under the
    /// partitions lock, which the revoke callback holds while it stops this reader: a
    /// message taken here belongs to this reader's assignment, never to the next one
    /// (whose reader shares the queue), and none is taken once the reader is stopped.
    async fn take(
        &self,
        state: &Consuming,
        tp: &(String, i32),
        queue: &PartitionQueue,
        generation: i32,
        cancel: &CancellationToken,
    ) -> Taken {
        let mut recv = std::pin::pin!(queue.recv());
        std::future::poll_fn(|cx| {
            let mut map = self.partitions(state);
            if cancel.is_cancelled() {
                return std::task::Poll::Ready(Taken::Revoked);
            }
            let m = match std::future::Future::poll(recv.as_mut(), cx) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Taken::Failed(e)),
                std::task::Poll::Ready(Ok(m)) => m,
            };
            // A partition's own queue holds only its messages.
            debug_assert!(m.topic() == tp.0 && m.partition() == tp.1);
            let first = (m.offset(), m.timestamp().to_millis());
            let part = self.state_for(&mut map, state, tp, first, generation, true);
            let parked = parked(&m, &part, &self.opts.key);
            std::task::Poll::Ready(Taken::Message(part, parked))
        })
        .await
    }

    /// The consumer (subscribed, with the rebalance callbacks) and, when messages that
    /// cannot be handled are dead-lettered, the producer for them.
    fn connect(
        &self,
        partitions: &Partitions,
        splits: mpsc::UnboundedSender<Split>,
        readers_stop: CancellationToken,
    ) -> Result<(Arc<StreamConsumer<Context>>, Option<DeadLetterProducer>), Error> {
        let o = &self.opts;
        let kafka = |error| Error::Kafka {
            source_name: o.name.clone(),
            error,
        };
        let mut config = ClientConfig::new();
        // Prefetch per partition (each has its own queue, which its reader drains only as
        // fast as messages get room). librdkafka keeps one fetch per broker in flight, and
        // when the other partitions of that fetch have nothing new it is held at the
        // broker for `fetch.wait.max.ms` (500 ms): a partition whose prefetch ran dry
        // meanwhile idles. A prefetch of ten times what may be in flight rides that out
        // (1 000 messages capped one busy partition at ~10 k msg/s in the benchmark's
        // tail); librdkafka's own default (100 000 messages, 64 MiB per partition once
        // partitions have their own queues) would hold too much memory per partition.
        // The source's properties can still set both.
        config.set(
            "queued.min.messages",
            (o.max_in_flight_per_partition.max(100) * 10)
                .min(10_000_000)
                .to_string(),
        );
        config.set("queued.max.messages.kbytes", "16384");
        // When a partition's prefetch is full librdkafka postpones its next fetch by this
        // (1 s by default), however soon the reader has drained it.
        config.set("fetch.queue.backoff.ms", "10");
        // Members learn that the group rebalances (a member joined or left) from their
        // next heartbeat, and a cooperative rebalance takes two rounds: with librdkafka's
        // 3 s, a restarted instance's partitions moved up to 6 s late, and 1 start in 4
        // of the benchmark waited 3.3 s instead of 1.1–1.2 s for its first commit (with
        // 1 s: 4 of 4 within 1.3 s). One heartbeat a second per consumer costs little.
        config.set("heartbeat.interval.ms", "1000");
        for (k, v) in self.client_config().config_map() {
            config.set(k, v);
        }
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
                    partitions: partitions.clone(),
                    consumer: OnceLock::new(),
                    splits,
                    readers: Mutex::new(HashMap::new()),
                    queues: Mutex::new(HashMap::new()),
                    stop: readers_stop,
                    after_assign: std::env::var("FAILPOINT_KAFKA_AFTER_ASSIGN_MS")
                        .ok()
                        .and_then(|ms| ms.parse().ok())
                        .map(Duration::from_millis),
                    misrouted: self.metrics.misrouted.clone(),
                    misrouted_logged: Default::default(),
                })
                .map_err(kafka)?,
        );
        // Before subscribing: the first assignment already splits its partitions.
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = o.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(kafka)?;
        let producer = match &o.dlq_topic {
            Some(_) if o.on_failure == OnFailure::DeadLetter => {
                let mut config = self.client_config();
                config
                    .set("enable.idempotence", "true")
                    // One dead letter per batch (they are rare): a "too large" answer is
                    // then about that record alone, never a neighbour's.
                    .set("batch.num.messages", "1");
                Some(DeadLetterProducer::new(config).map_err(kafka)?)
            }
            _ => None,
        };
        Ok((consumer, producer))
    }

    /// The state of an assigned partition whose message came through the consumer's own
    /// queue, created on its first message after an assignment (at its offset).
    fn partition(
        &self,
        state: &Consuming,
        m: &rdkafka::message::BorrowedMessage<'_>,
        generation: i32,
    ) -> Arc<Partition> {
        let tp = (m.topic().to_owned(), m.partition());
        self.state_for(
            &mut self.partitions(state),
            state,
            &tp,
            (m.offset(), m.timestamp().to_millis()),
            generation,
            false,
        )
    }

    /// The state of partition `tp` in `map`, created at `first` (the offset and time of
    /// the message just read) if it has none (`split`: read from its own queue).
    fn state_for(
        &self,
        map: &mut HashMap<(String, i32), Arc<Partition>>,
        state: &Consuming,
        tp: &(String, i32),
        first: (i64, Option<i64>),
        generation: i32,
        split: bool,
    ) -> Arc<Partition> {
        if let Some(p) = map.get(tp) {
            return p.clone();
        }
        let part = self.new_state(state, tp, first, false, generation, split);
        map.insert(tp.clone(), part.clone());
        part
    }

    fn partitions<'a>(
        &self,
        state: &'a Consuming,
    ) -> std::sync::MutexGuard<'a, HashMap<(String, i32), Arc<Partition>>> {
        state.partitions.lock().expect("partitions lock")
    }

    fn worker(&self, state: &Consuming, part: &Arc<Partition>) -> Worker {
        Worker {
            opts: self.opts.clone(),
            group: self.group.clone(),
            cluster: self.cluster.clone(),
            dispatcher: self.dispatcher.clone(),
            producer: state.producer.clone(),
            consumer: state.consumer.clone(),
            metrics: self.metrics.clone(),
            part: part.clone(),
        }
    }

    /// A new state for a partition starting at `offset` (with the time of the record
    /// there, if it was read); `force_claim` for a reclaim.
    fn new_state(
        &self,
        state: &Consuming,
        tp: &(String, i32),
        (offset, timestamp): (i64, Option<i64>),
        force_claim: bool,
        generation: i32,
        split: bool,
    ) -> Arc<Partition> {
        let o = &self.opts;
        // One series per partition for the life of the process, reused when the
        // partition comes back (a second registration would duplicate the series).
        let mut series = state.series.lock().expect("series lock");
        let gauges = series.entry(tp.clone()).or_insert_with(|| {
            let partition = tp.1.to_string();
            let labels = [
                ("source", o.name.as_str()),
                ("topic", tp.0.as_str()),
                ("partition", partition.as_str()),
            ];
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
        Arc::new(Partition {
            topic: tp.0.as_str().into(),
            partition: tp.1,
            window: Mutex::new(Window::read_from(timestamp)),
            chains: Mutex::new(HashMap::new()),
            limit: Arc::new(Semaphore::new(o.max_in_flight_per_partition)),
            revoked: AtomicBool::new(false),
            // Read in the loop that serves the group's callbacks (or in the assign
            // callback itself): the partition is assigned in this generation.
            generation,
            split,
            force_claim,
            fence: tokio::sync::OnceCell::new(),
            fenced_at: Mutex::new(None),
            resume_from: AtomicI64::new(offset),
            cancel: CancellationToken::new(),
            parked: Mutex::new(VecDeque::new()),
            paused: AtomicBool::new(false),
            watermark: gauges.0.clone(),
            lag: gauges.1.clone(),
        })
    }

    /// A partition whose claim was superseded normally leaves this consumer within a
    /// heartbeat (the group took it away). One still assigned here a whole session
    /// timeout later is this consumer's in the group's eyes: its abandoned state is
    /// replaced by one that re-reads from the last stored watermark under a forced claim.
    /// These are such partitions read by the consumer loop itself (no queue of their
    /// own), fenced for `after`; the loop reclaims them with [`Ingest::reclaim`].
    fn fenced_unsplit(
        &self,
        state: &Consuming,
        after: Duration,
    ) -> Vec<((String, i32), Arc<Partition>)> {
        // A partition with its own queue is reclaimed by its reader (see `Ingest::read`).
        state
            .partitions
            .lock()
            .expect("partitions lock")
            .iter()
            .filter(|(_, p)| !p.split && p.fenced_since().is_some_and(|t| t.elapsed() >= after))
            .map(|(tp, p)| (tp.clone(), p.clone()))
            .collect()
    }

    /// Replaces a fenced partition's abandoned state by one that re-reads from the last
    /// stored watermark under a forced claim, if the partition is still assigned here.
    /// Runs where the partition's messages are read (the consumer loop, or its reader),
    /// so none is taken between the seek and replacing the state; librdkafka discards
    /// what it had fetched before the seek. The seek waits for librdkafka to perform it
    /// (a rare path; a short block): a seek that failed must keep the old state, or the
    /// new one would start past messages never handled.
    fn reclaim(&self, state: &Consuming, tp: &(String, i32), part: &Arc<Partition>) {
        let source = self.opts.name.as_str();
        match state.consumer.assignment() {
            Ok(list) if topic_partitions(&list).contains(tp) => {}
            Ok(_) => return, // the revoke callback removes it
            Err(e) => {
                tracing::debug!(source, error = %e, "reading the assignment failed");
                return;
            }
        }
        // The seek is made under the partitions lock, which the revoke callback takes
        // first: a reader reclaims off the consumer loop's thread, and a revoke followed
        // by a new assignment of the partition (whose reader may have started later
        // offsets already) must not come between the check that this state is still the
        // partition's and the seek, or that assignment would be rewound (librdkafka
        // applies a seek queued before the revoke's stop to the old assignment). Briefly:
        // readers and the revoke callback wait for this lock on the async threads. A seek
        // that takes longer fails here and is retried on the next tick; should it land
        // later, the fenced state has taken nothing meanwhile.
        let mut map = self.partitions(state);
        if !map.get(tp).is_some_and(|p| Arc::ptr_eq(p, part)) {
            return; // revoked meanwhile
        }
        let from = part.resume_from.load(Ordering::Acquire);
        let seek = state.consumer.seek(
            &tp.0,
            tp.1,
            Offset::Offset(from),
            Duration::from_millis(200),
        );
        if let Err(e) = seek {
            tracing::warn!(source, topic = %tp.0, partition = tp.1, from, error = %e, "re-reading a reclaimed partition failed; retrying");
            return;
        }
        let generation = crate::group::generation(state.consumer.as_ref());
        // Its first unfinished record is the old state's (re-read from `from`).
        let first = part
            .window
            .lock()
            .expect("window lock")
            .first_unfinished_time();
        let fresh = self.new_state(state, tp, (from, first), true, generation, part.split);
        map.insert(tp.clone(), fresh);
        drop(map);
        if let Err(e) = state.consumer.resume(&part.list()) {
            tracing::debug!(source, topic = %tp.0, partition = tp.1, error = %e, "resume on reclaim");
        }
        tracing::warn!(source, topic = %tp.0, partition = tp.1, from, "partition still assigned a session timeout after its claim was superseded; claiming it again and re-reading");
    }

    /// Stores again each partition's watermark whose last store librdkafka refused (during
    /// a rebalance, say): otherwise a partition whose last messages were done by then
    /// would never commit them, as nothing else would store its offset again.
    fn store_missed_watermarks(&self, state: &Consuming) {
        let parts: Vec<Arc<Partition>> = state
            .partitions
            .lock()
            .expect("partitions lock")
            .values()
            .cloned()
            .collect();
        for part in parts {
            if part.is_revoked() {
                continue;
            }
            let Some(watermark) = part.window.lock().expect("window lock").watermark() else {
                continue;
            };
            // Checked again after the read, as `finish` does: a record abandoned by a
            // revoke (fenced, say) leaves the window right after the revoke, so a
            // watermark read past it is one the partition did not reach.
            if part.is_revoked() || watermark <= part.resume_from.load(Ordering::Acquire) {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            if tpl
                .add_partition_offset(&part.topic, part.partition, Offset::Offset(watermark))
                .is_err()
            {
                continue;
            }
            let stored = state.consumer.store_offsets(&tpl).is_ok()
                && tpl.elements().iter().all(|e| e.error().is_ok());
            if stored {
                part.watermark.set(watermark as f64);
                part.resume_from.store(watermark, Ordering::Release);
                tracing::debug!(source = %self.opts.name, topic = %part.topic, partition = part.partition, watermark, "stored a watermark a refused store had left behind");
            }
        }
    }

    /// Starts a message, or parks it behind its partition's queue. Back-pressure without
    /// blocking the consumer loop (which must keep polling for the group and its
    /// rebalance callbacks): a partition at its limit parks its messages, in order, until
    /// a drain task has room for them; once as many are parked as may be in flight, the
    /// partition is also paused (fetching stops) until its parked messages have started.
    fn admit(&self, state: &Consuming, part: Arc<Partition>, parked: Parked) {
        let worker = self.worker(state, &part);
        let mut queue = part.parked.lock().expect("parked lock");
        if part.is_revoked() {
            return; // revoked while this message was being read
        }
        if !queue.is_empty() {
            queue.push_back(parked);
            if queue.len() >= PARKED_PER_IN_FLIGHT * self.opts.max_in_flight_per_partition
                && !part.paused.swap(true, Ordering::AcqRel)
            {
                let (source, topic, partition) = (&self.opts.name, &part.topic, part.partition);
                if let Err(e) = state.consumer.pause(&part.list()) {
                    tracing::warn!(%source, %topic, partition, error = %e, "pausing a full partition failed");
                }
                self.metrics.paused.add(1);
                tracing::debug!(%source, %topic, partition, parked = queue.len(), "partition at its in-flight and parking limits; paused");
            }
            return;
        }
        if let Some(permits) = try_acquire(&state.total, &part.limit) {
            let run = worker.start(parked, permits);
            drop(queue);
            state.tasks.spawn(run);
            return;
        }
        queue.push_back(parked);
        drop(queue);
        state
            .tasks
            .spawn(drain(worker, state.total.clone(), state.tasks.clone()));
    }

    /// Shutdown: stop fetching, give in-flight messages a bounded time, commit.
    async fn stop(&self, state: Consuming, lag_task: tokio::task::JoinHandle<()>) {
        let o = &self.opts;
        let Consuming {
            tasks,
            partitions,
            consumer,
            producer,
            ..
        } = state;
        let abandon = self.abandon.load(Ordering::Acquire);
        // Abandoning, the tasks only unwind (nothing new starts; waits watch the revoke);
        // a moment for them to let go of the consumer, whose last handle closes it.
        let grace = if abandon {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        // (Abandoning, `run` revoked every partition already.)
        tracing::info!(source = %o.name, in_flight = tasks.len(), abandon, "kafka source stopping");
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(source = %o.name, left = tasks.len(), "in-flight messages abandoned (not committed)");
        }
        // Whatever still waits is abandoned (the next assignee re-reads it), and nothing
        // stores an offset after the final commit.
        for p in partitions.lock().expect("partitions lock").values() {
            p.revoke();
        }
        lag_task.abort();
        let _ = lag_task.await;
        // The final commit, the group leave and closing the clients block (for long when
        // the cluster is down, as when a failover source switches away from it): off the
        // async threads.
        let name = o.name.clone();
        let closed = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(source = %name, error = %e, "final commit");
            }
            consumer.unsubscribe();
            drop(consumer);
            drop(producer);
        })
        .await;
        if let Err(e) = closed {
            tracing::warn!(source = %o.name, error = %e, "closing the consumer failed");
        }
        tracing::info!(source = %o.name, "kafka source stopped");
    }
}

/// A partition's commit watermark and lag gauges.
type Series = (Arc<Gauge>, Arc<Gauge>);

/// The dead-letter producer, replaced when librdkafka reports it failed for good (a
/// fatal error: the cluster refused the idempotent producer's id, or its sequence
/// broke). Such a producer fails every later write, so the partitions waiting for a dead
/// letter waited until the process restarted, even after the cause was fixed.
#[derive(Clone)]
struct DeadLetterProducer(Arc<DeadLetterInner>);

struct DeadLetterInner {
    config: ClientConfig,
    /// The producer and how many times it was replaced.
    current: Mutex<(u64, FutureProducer)>,
}

impl DeadLetterProducer {
    fn new(config: ClientConfig) -> rdkafka::error::KafkaResult<Self> {
        let producer = config.create()?;
        Ok(Self(Arc::new(DeadLetterInner {
            config,
            current: Mutex::new((0, producer)),
        })))
    }

    fn current(&self) -> (u64, FutureProducer) {
        self.0
            .current
            .lock()
            .expect("dead-letter producer lock")
            .clone()
    }

    /// After a write through `producer` (the `generation`th) failed: replaces it when it
    /// failed for good and nobody has yet. True when a newer producer is in place.
    fn renew_if_fatal(&self, generation: u64, producer: &FutureProducer) -> bool {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return false;
        };
        let mut current = self.0.current.lock().expect("dead-letter producer lock");
        if current.0 != generation {
            return true;
        }
        match self.0.config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(error = ?code, reason, "the dead-letter producer failed for good; writing through a new one");
                *current = (generation + 1, fresh);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the dead-letter producer failed for good and a new one could not be made; retrying");
                false
            }
        }
    }
}

/// What the consumer loop of one source (and its partitions' readers) hold while it runs.
#[derive(Clone)]
struct Consuming {
    consumer: Arc<StreamConsumer<Context>>,
    producer: Option<DeadLetterProducer>,
    partitions: Partitions,
    /// Gauges (commit watermark, lag) per partition ever assigned here.
    series: Arc<Mutex<HashMap<(String, i32), Series>>>,
    /// The source's in-flight limit.
    total: Arc<Semaphore>,
    tasks: TaskTracker,
}

/// A consumed message, detached from the consumer's buffer, with its key (or why there
/// is none).
fn parked(
    m: &rdkafka::message::BorrowedMessage<'_>,
    part: &Partition,
    key: &crate::KeySource,
) -> Parked {
    let extracted = key.extract(m.key(), m.payload(), |name| {
        m.headers()
            .and_then(|h| h.iter().find(|hd| hd.key == name).and_then(|hd| hd.value))
    });
    Parked {
        timestamp: m.timestamp().to_millis(),
        record: Record {
            topic: part.topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers: m.headers().map(|h| h.detach()),
        },
        key: extracted,
    }
}

/// The record's `traceparent` and `tracestate` headers (UTF-8 values only).
fn trace_headers(headers: Option<&OwnedHeaders>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter(|h| h.key == "traceparent" || h.key == "tracestate")
        .filter_map(|h| {
            let value = std::str::from_utf8(h.value?).ok()?;
            Some((h.key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Starts a paused partition's waiting messages, in order, as room frees up; resumes the
/// partition once none is left. Ends when the partition is revoked.
async fn drain(worker: Worker, total: Arc<Semaphore>, tasks: TaskTracker) {
    let part = worker.part.clone();
    loop {
        let permits = acquire(&total, &part.limit).await;
        let mut queue = part.parked.lock().expect("parked lock");
        if part.is_revoked() {
            if part.paused.swap(false, Ordering::AcqRel) {
                worker.metrics.paused.add(-1);
            }
            return;
        }
        let Some(next) = queue.pop_front() else {
            unreachable!("a drain task runs only while messages are parked");
        };
        // Started under the queue's lock, so the consumer loop cannot start a later
        // message of this partition first.
        let run = worker.clone_for(&part).start(next, permits);
        tasks.spawn(run);
        if queue.is_empty() {
            if part.paused.swap(false, Ordering::AcqRel) {
                if let Err(e) = worker.consumer.resume(&part.list()) {
                    tracing::warn!(topic = %part.topic, partition = part.partition, error = %e, "resuming a partition failed");
                }
                worker.metrics.paused.add(-1);
                tracing::debug!(topic = %part.topic, partition = part.partition, "partition resumed");
            }
            return;
        }
    }
}

/// librdkafka's `session.timeout.ms` for a source (its default: 45 s).
fn session_timeout(properties: &std::collections::BTreeMap<String, String>) -> Duration {
    properties
        .get("session.timeout.ms")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(45), Duration::from_millis)
}

/// Every 5 s: consumer lag per assigned partition = end offset − commit watermark, and
/// the group's position on every partition of the source's topics (end offset and
/// committed offset, whichever instance consumes it) for the status snapshot.
/// The broker calls block, so they run on the blocking pool.
async fn report_lag(
    consumer: Arc<StreamConsumer<Context>>,
    partitions: Partitions,
    opts: Arc<SourceOptions>,
    status: StatusHandle,
    first_unfinished: FirstUnfinished,
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
        // From this instance's own state, before any broker request (the cluster may be
        // the one that is down).
        first_unfinished.set(
            parts
                .iter()
                .filter(|p| !p.is_revoked())
                .filter_map(|p| {
                    let time = p
                        .window
                        .lock()
                        .expect("window lock")
                        .first_unfinished_time()?;
                    Some(((p.topic.to_string(), p.partition), time))
                })
                .collect(),
        );
        let consumer = consumer.clone();
        let opts = opts.clone();
        let status = status.clone();
        let cancel = cancel.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // Bounded, and given up at shutdown: a blocking task still running would hold
            // the process's exit (a broker that does not answer costs a timeout per call).
            let budget = Instant::now() + Duration::from_secs(4);
            let go_on = || !cancel.is_cancelled() && Instant::now() < budget;
            for p in &parts {
                if !go_on() {
                    break;
                }
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
            // Assigned here: the group's assignment as the consumer knows it (a partition
            // assigned after its last record has no state here until a record arrives),
            // else the partitions with state that are not revoked.
            let here: std::collections::HashSet<(String, i32)> = match consumer.assignment() {
                Ok(assigned) => assigned
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect(),
                Err(_) => parts
                    .iter()
                    .filter(|p| !p.is_revoked())
                    .map(|p| (p.topic.to_string(), p.partition))
                    .collect(),
            };
            // Its own budget: a slow lag pass must not leave the snapshot stale.
            let budget = Instant::now() + Duration::from_secs(4);
            let go_on = || !cancel.is_cancelled() && Instant::now() < budget;
            let snapshot = group_position(&consumer, &opts, &here, &go_on);
            *status.lock().expect("status lock") = snapshot;
        })
        .await;
    }
}

/// What the group has committed on every partition of the source's topics, against
/// each partition's end (one metadata, one committed-offsets and one watermark request
/// per partition).
fn group_position(
    consumer: &StreamConsumer<Context>,
    opts: &SourceOptions,
    here: &std::collections::HashSet<(String, i32)>,
    go_on: &dyn Fn() -> bool,
) -> SourceStatus {
    let timeout = Duration::from_secs(1);
    let mut status = SourceStatus {
        name: opts.name.clone(),
        group: opts.group.clone(),
        topics: opts.topics.clone(),
        updated_ms: None,
        error: None,
        partitions: Vec::new(),
    };
    let mut tpl = TopicPartitionList::new();
    for topic in &opts.topics {
        match consumer.fetch_metadata(Some(topic), timeout) {
            Ok(md) => {
                for t in md.topics() {
                    for p in t.partitions() {
                        tpl.add_partition(t.name(), p.id());
                    }
                }
            }
            Err(e) => {
                status.error = Some(format!("metadata of {topic}: {e}"));
                return status;
            }
        }
    }
    let committed = match consumer.committed_offsets(tpl.clone(), timeout) {
        Ok(c) => c,
        Err(e) => {
            status.error = Some(format!("committed offsets: {e}"));
            return status;
        }
    };
    for e in tpl.elements() {
        if !go_on() {
            status.error = Some("the broker answered too slowly; partitions left out".into());
            break;
        }
        let (topic, partition) = (e.topic().to_owned(), e.partition());
        let watermarks = consumer.fetch_watermarks(&topic, partition, timeout).ok();
        let end = watermarks.map(|(_, high)| high);
        let committed =
            committed
                .find_partition(&topic, partition)
                .and_then(|c| match c.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
        // Without a commit the group would start at the oldest retained record (or the
        // end, with auto.offset.reset=latest): count from the oldest, not from 0.
        let lag = watermarks.map(|(low, high)| (high - committed.unwrap_or(low)).max(0));
        let here = here.contains(&(topic.clone(), partition));
        status.partitions.push(PartitionStatus {
            topic,
            partition,
            end,
            committed,
            lag,
            here,
        });
    }
    status.updated_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64);
    status
}

type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

async fn acquire(total: &Arc<Semaphore>, part: &Arc<Semaphore>) -> Permits {
    let p = part.clone().acquire_owned().await.expect("semaphore open");
    let t = total.clone().acquire_owned().await.expect("semaphore open");
    (p, t)
}

fn try_acquire(total: &Arc<Semaphore>, part: &Arc<Semaphore>) -> Option<Permits> {
    let p = part.clone().try_acquire_owned().ok()?;
    let t = total.clone().try_acquire_owned().ok()?;
    Some((p, t))
}

/// A consumed message, detached from the consumer's buffer.
struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    payload: Bytes,
    headers: Option<OwnedHeaders>,
}

struct Worker {
    /// Shared, not cloned per message.
    opts: Arc<SourceOptions>,
    group: Arc<str>,
    cluster: Arc<str>,
    dispatcher: Arc<dyn Dispatcher>,
    producer: Option<DeadLetterProducer>,
    consumer: Arc<StreamConsumer<Context>>,
    metrics: Arc<Metrics>,
    part: Arc<Partition>,
}

impl Worker {
    fn clone_for(&self, part: &Arc<Partition>) -> Worker {
        Worker {
            opts: self.opts.clone(),
            group: self.group.clone(),
            cluster: self.cluster.clone(),
            dispatcher: self.dispatcher.clone(),
            producer: self.producer.clone(),
            consumer: self.consumer.clone(),
            metrics: self.metrics.clone(),
            part: part.clone(),
        }
    }

    /// Registers a message with its partition (window, per-key chain) now, in offset
    /// order, and returns the work that handles it. Call with the partition's queue
    /// locked.
    fn start(self, m: Parked, permits: Permits) -> impl std::future::Future<Output = ()> {
        let Parked {
            record,
            key,
            timestamp,
        } = m;
        let offset = record.offset;
        self.part
            .window
            .lock()
            .expect("window lock")
            .start(offset, timestamp);
        self.metrics.in_flight.add(1);
        let chain = key.map(|key| {
            let (done_tx, done_rx) = oneshot::channel::<()>();
            let done: Done = done_rx.map(|_| ()).boxed().shared();
            let previous = self
                .part
                .chains
                .lock()
                .expect("chains lock")
                .insert(key.clone(), done.clone());
            (key, previous, done_tx, done)
        });
        let span = tracing::debug_span!(
            "record",
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset
        );
        let work = async move {
            match chain {
                Err(reason) => Box::pin(self.fail(&record, &format!("key: {reason}"))).await,
                Ok((key, previous, done_tx, done)) => {
                    if let Some(previous) = previous {
                        previous.await; // the previous message with this key, same partition
                    }
                    // A panic here is a bug of this consumer (a handler's own panic is its
                    // call's error): the message fails like one that cannot be handled and
                    // its offset still finishes, so the partition's commits go on rather
                    // than stop at it until the next rebalance.
                    let handled = std::panic::AssertUnwindSafe(self.handle(key.clone(), &record))
                        .catch_unwind()
                        .await;
                    if let Err(panic) = handled {
                        let panic = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        self.metrics.internal_errors.inc();
                        tracing::error!(source = %self.opts.name, topic = %record.topic, partition = record.partition, offset = record.offset, panic, "internal error while handling a message");
                        // Revoked meanwhile: nothing of it is stored here; its next
                        // assignee reads it again.
                        if !self.part.is_revoked() {
                            let why = format!(
                                "internal error (the call may have run at its owner): {panic}"
                            );
                            Box::pin(self.fail(&record, &why)).await;
                        }
                    }
                    let _ = done_tx.send(());
                    let mut chains = self.part.chains.lock().expect("chains lock");
                    if chains.get(&key).is_some_and(|d| d.ptr_eq(&done)) {
                        chains.remove(&key);
                    }
                }
            }
            self.finish(offset, timestamp);
            drop(permits);
        };
        tracing::Instrument::instrument(work, span)
    }

    /// Dispatches until handled. Routing unavailability is waited for (never a failure);
    /// the handler's own errors are retried `retry_attempts` times, then the message
    /// fails (dead-letter or skip). Stops when the partition is revoked: the new
    /// assignee re-reads the message.
    async fn handle(&self, key: String, r: &Record) {
        let mut call = KafkaCall {
            key,
            payload: r.payload.clone(),
            group: self.group.clone(),
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            fence: 0,
            trace: trace_headers(r.headers.as_ref()),
            cluster: self.cluster.clone(),
        };
        let mut attempt = 0u32;
        let mut waits = 0u32;
        loop {
            // librdkafka marks the assignment lost as soon as its group session timed out,
            // before the revoke callback is served on the next poll; the group may have
            // given the partition to another member already.
            if !self.part.is_revoked() && self.consumer.assignment_lost() {
                tracing::warn!(source = %self.opts.name, topic = %r.topic, partition = r.partition, "group session lost; abandoning the partition's waiting messages");
                self.part.revoke();
            }
            if self.part.is_revoked() {
                return;
            }
            let dispatched = tokio::select! {
                biased;
                // Dropping the call path's future abandons a call that has not started
                // (one already running finishes at its owner first).
                _ = self.part.cancel.cancelled() => return,
                r = self.claimed_dispatch(&mut call) => r,
            };
            let backoff = match dispatched {
                Ok(()) => {
                    self.metrics.handled.inc();
                    return;
                }
                Err(DispatchError::Fenced(reason)) => {
                    if self.part.fenced() {
                        self.metrics.fenced.inc();
                        // Nothing of it runs here any more: stop fetching it too.
                        if let Err(e) = self.consumer.pause(&self.part.list()) {
                            tracing::debug!(topic = %r.topic, partition = r.partition, error = %e, "pausing a fenced partition");
                        }
                        tracing::warn!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, reason = %reason, "partition claimed by another consumer; abandoning its messages here (they are re-read there)");
                    }
                    return;
                }
                Err(DispatchError::Rejected(reason)) => {
                    Box::pin(self.fail(r, &format!("rejected: {reason}"))).await;
                    return;
                }
                Err(DispatchError::Handler(reason)) => {
                    attempt += 1;
                    if attempt >= self.opts.retry_attempts {
                        let why = format!("handler failed {attempt} times; last error: {reason}");
                        Box::pin(self.fail(r, &why)).await;
                        return;
                    }
                    self.metrics.retries.inc();
                    tracing::debug!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, attempt, error = %reason, "handler failed; retrying");
                    self.opts
                        .retry_backoff
                        .saturating_mul(1 << (attempt - 1).min(6))
                }
                Err(DispatchError::Unavailable(reason)) => {
                    waits += 1;
                    self.metrics.waits.inc();
                    if waits == 1 || waits.is_power_of_two() {
                        tracing::info!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, waits, reason = %reason, "message not reached a handler yet; waiting");
                    }
                    self.opts.retry_backoff.saturating_mul(1 << waits.min(5))
                }
            };
            let backoff = backoff.clamp(Duration::from_millis(10), Duration::from_secs(5));
            tokio::select! {
                biased;
                _ = self.part.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Claims the partition on its first dispatch (once per assignment), then dispatches.
    async fn claimed_dispatch(&self, call: &mut KafkaCall) -> Result<(), DispatchError> {
        if call.fence == 0 {
            let generation = self.part.generation;
            let force = self.part.force_claim;
            let claim = || {
                self.dispatcher.claim(
                    &call.group,
                    &call.topic,
                    call.partition,
                    self.opts.claim_epoch,
                    generation,
                    force,
                )
            };
            let fence = *self.part.fence.get_or_try_init(claim).await?;
            tracing::debug!(source = %self.opts.name, topic = %call.topic, partition = call.partition, generation, fence, "partition claimed");
            call.fence = fence;
            // The claim may have taken a while (etcd slow, retried): the group may have
            // moved on meanwhile.
            if self.consumer.assignment_lost() {
                return Err(DispatchError::Fenced(
                    "group session lost while claiming the partition".into(),
                ));
            }
        }
        // The claim may have taken a while: a partition revoked meanwhile starts nothing.
        // (`handle` then returns: its wait ends on the revoke.)
        if self.part.is_revoked() {
            return Err(DispatchError::Unavailable("partition revoked".into()));
        }
        self.dispatcher.dispatch(call.clone()).await
    }

    /// A message that cannot be handled: dead-lettered, or skipped, as configured.
    /// Callers box it: the dead-letter write is a large future on a rare path, and every
    /// message's task would otherwise carry its size.
    async fn fail(&self, r: &Record, reason: &str) {
        match self.opts.on_failure {
            OnFailure::DeadLetter => self.dead_letter(r, reason).await,
            OnFailure::Skip => {
                self.metrics.skipped.inc();
                tracing::error!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, reason, "message cannot be handled; skipped (on_failure = skip)");
            }
        }
    }

    /// Writes the message unchanged to the dead-letter topic with the reason and origin
    /// in headers; retries the write until it is acknowledged. A message too large for
    /// the dead-letter topic is written without its payload (header
    /// `leasehold.payload-omitted` says why; the payload stays at its source offset), and
    /// if need be with Leasehold's headers alone: retrying could never succeed and would
    /// hold its partition for good. Stops when the partition is revoked (its next
    /// assignee reads the message again).
    async fn dead_letter(&self, r: &Record, reason: &str) {
        let (Some(dead_letters), Some(topic)) = (&self.producer, &self.opts.dlq_topic) else {
            unreachable!("on_failure = dead-letter is validated to have a dead-letter topic");
        };
        let partition = r.partition.to_string();
        let offset = r.offset.to_string();
        // What Leasehold adds, and what a smaller form left out.
        let ours = |reason: &str, omitted: &[(&str, &str)]| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in [
                ("leasehold.reason", reason),
                ("leasehold.source.topic", &*r.topic),
                ("leasehold.source.partition", partition.as_str()),
                ("leasehold.source.offset", offset.as_str()),
            ]
            .into_iter()
            .chain(omitted.iter().copied())
            {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            headers
        };
        // The record's own headers, then Leasehold's.
        let with_source_headers = |omitted: &[(&str, &str)]| {
            let mut headers = r.headers.clone().unwrap_or_default();
            for h in ours(reason, omitted).iter() {
                headers = headers.insert(h);
            }
            headers
        };
        // Forms tried in turn while the dead-letter topic refuses the record as too large:
        // whole; without the payload; Leasehold's headers alone (no key, no source
        // headers, the reason cut to 1 KB). Retrying one it refused could never succeed
        // and would hold the partition for good.
        let why = format!(
            "the record (payload {} bytes, key {} bytes, with its headers) is more than the dead-letter topic takes; the payload is at the source offset",
            r.payload.len(),
            r.key.as_ref().map_or(0, |k| k.len())
        );
        let mut cut = reason.len().min(1024);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let short = &reason[..cut];
        let mut form = 0;
        let mut failures = 0u32;
        loop {
            let (headers, payload, key) = match form {
                0 => (
                    with_source_headers(&[]),
                    Some(&r.payload[..]),
                    r.key.as_deref(),
                ),
                1 => (
                    with_source_headers(&[("leasehold.payload-omitted", &why)]),
                    None,
                    r.key.as_deref(),
                ),
                _ => {
                    let mut omitted = vec![
                        ("leasehold.payload-omitted", why.as_str()),
                        ("leasehold.key-and-headers-omitted", "true"),
                    ];
                    if cut < reason.len() {
                        omitted.push(("leasehold.reason-truncated", "true"));
                    }
                    (ours(short, &omitted), None, None)
                }
            };
            let mut record = FutureRecord::to(topic).headers(headers);
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(k) = key {
                record = record.key(k);
            }
            let (generation, producer) = dead_letters.current();
            let sent = tokio::select! {
                biased;
                // The partition's next assignee reads the message again.
                _ = self.part.cancel.cancelled() => return,
                sent = producer.send(record, Duration::from_secs(10)) => sent,
            };
            match sent {
                Ok(_) => {
                    self.metrics.dead_lettered.inc();
                    tracing::warn!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, reason, dlq = %topic, form, "message dead-lettered");
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))
                    if form < 2 =>
                {
                    form += 1;
                    tracing::error!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, dlq = %topic, size = r.payload.len(), form, "message too large for the dead-letter topic; dead-lettering a smaller form of it (without its payload)");
                }
                Err((e, _)) => {
                    failures += 1;
                    // Failed for good: the next try goes through a new producer (after the
                    // pause below, so a cause that persists makes one every few seconds).
                    // Closing the old one blocks (its flush and destroy): off the async
                    // threads.
                    if dead_letters.renew_if_fatal(generation, &producer) {
                        tokio::task::spawn_blocking(move || drop(producer));
                    }
                    if form == 2 {
                        // Nothing is dropped: the partition waits until the topic takes it.
                        tracing::error!(source = %self.opts.name, topic = %r.topic, partition = r.partition, offset = r.offset, dlq = %topic, error = %e, "the dead-letter topic refuses even Leasehold's own headers for this message (is its max.message.bytes below 2 KB?); retrying");
                    } else {
                        tracing::warn!(dlq = %topic, error = %e, "dead-letter write failed; retrying");
                    }
                    let pause = Duration::from_millis(500).saturating_mul(failures.min(10));
                    tokio::select! {
                        biased;
                        _ = self.part.cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
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
        if self.part.is_revoked() {
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
            None => {
                self.part.watermark.set(watermark as f64);
                self.part.resume_from.store(watermark, Ordering::Release);
            }
            Some(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(topic = %self.part.topic, partition = self.part.partition, watermark, error = %e, "offset store refused (partition revoked?)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeySource;

    /// Raises a fatal error in `producer` through librdkafka's own hook for tests.
    #[allow(unsafe_code)]
    fn fail_for_good(producer: &FutureProducer) {
        use rdkafka::bindings as rd;
        // SAFETY: the handle is the producer's own, alive while `producer` is; the reason
        // is a NUL-terminated string librdkafka copies.
        let raised = unsafe {
            rd::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"raised by the test".as_ptr(),
            )
        };
        assert_eq!(raised, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }

    #[tokio::test]
    async fn a_dead_letter_producer_that_failed_for_good_is_replaced_once() {
        let mut config = ClientConfig::new();
        // No broker needed: the producer is made, never written through.
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("enable.idempotence", "true");
        let dead_letters = DeadLetterProducer::new(config).unwrap();
        let (generation, producer) = dead_letters.current();
        // A write that failed for another reason keeps the producer.
        assert!(!dead_letters.renew_if_fatal(generation, &producer));
        assert_eq!(dead_letters.current().0, generation);

        fail_for_good(&producer);
        assert!(producer.client().fatal_error().is_some());
        assert!(dead_letters.renew_if_fatal(generation, &producer));
        let (renewed, fresh) = dead_letters.current();
        assert_eq!(renewed, generation + 1);
        assert!(fresh.client().fatal_error().is_none());
        // Another write that failed through the old one replaces nothing more.
        assert!(dead_letters.renew_if_fatal(generation, &producer));
        assert_eq!(dead_letters.current().0, renewed);
    }

    /// A call path with a bug: every dispatch panics.
    struct Panics;

    impl Dispatcher for Panics {
        fn dispatch(&self, _: KafkaCall) -> BoxFuture<'static, Result<(), DispatchError>> {
            async { panic!("a bug in the call path") }.boxed()
        }

        fn claim(
            &self,
            _: &str,
            _: &str,
            _: i32,
            _: u64,
            _: i32,
            _: bool,
        ) -> BoxFuture<'static, Result<u64, DispatchError>> {
            async { Ok(1) }.boxed()
        }
    }

    #[tokio::test]
    async fn a_panic_while_handling_fails_the_message_and_its_offset_still_finishes() {
        let opts = SourceOptions {
            name: "s".into(),
            // Nothing listens there: the consumer is made, never used.
            brokers: "127.0.0.1:9".into(),
            topics: vec!["t".into()],
            group: "g".into(),
            key: KeySource::MessageKey,
            dlq_topic: None,
            on_failure: OnFailure::Skip,
            max_in_flight_per_partition: 4,
            max_in_flight: 8,
            retry_attempts: 3,
            retry_backoff: Duration::from_millis(10),
            commit_interval: Duration::from_secs(1),
            properties: Default::default(),
            cluster: String::new(),
            claim_epoch: 0,
            failover: None,
        };
        let ingest = Ingest::new(opts, Arc::new(Panics), &Registry::new());
        let partitions = Partitions::default();
        let (splits, _splits) = mpsc::unbounded_channel();
        let (consumer, producer) = ingest
            .connect(&partitions, splits, CancellationToken::new())
            .unwrap();
        let state = Consuming {
            consumer,
            producer,
            partitions,
            series: Default::default(),
            total: Arc::new(Semaphore::new(8)),
            tasks: TaskTracker::new(),
        };
        let part = ingest.new_state(&state, &("t".into(), 0), (5, None), false, 1, true);
        let record = |offset| Parked {
            record: Record {
                topic: "t".into(),
                partition: 0,
                offset,
                key: Some(Bytes::from_static(b"k")),
                payload: Bytes::new(),
                headers: None,
            },
            key: Ok("k".into()),
            timestamp: None,
        };
        // Two messages of one key, spawned like the partition's reader does: the second
        // waits for the first's turn, which a panic must end too.
        let mut runs = Vec::new();
        for offset in [5, 6] {
            let permits = try_acquire(&state.total, &part.limit).unwrap();
            let run = ingest.worker(&state, &part).start(record(offset), permits);
            runs.push(tokio::spawn(run));
        }
        for run in runs {
            let ended = tokio::time::timeout(Duration::from_secs(10), run).await;
            ended
                .expect("the message's task ends")
                .expect("the panic stays inside the message's task");
        }
        assert_eq!(ingest.metrics.internal_errors.get(), 2);
        assert_eq!(ingest.metrics.skipped.get(), 2, "failed as on_failure says");
        let window = part.window.lock().unwrap();
        assert_eq!(window.in_flight(), 0);
        assert_eq!(window.watermark(), Some(7), "both offsets finished");
        drop(window);
        assert_eq!(
            part.limit.available_permits(),
            4,
            "their room is free again"
        );
        assert!(part.chains.lock().unwrap().is_empty());
    }
}
