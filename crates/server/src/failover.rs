//! Kafka cluster failover: a source with a standby cluster reads the primary, and the
//! standby only while the primary is down.
//!
//! The Leasehold cluster decides, not each instance: every member probes the primary and
//! publishes what it sees (`kafka-health/<member>/<source>`, on its lease); the leader
//! switches the side (`kafka-sides/<source>`, compare-and-set on its revision) once a
//! majority of active members agree for long enough; every member reads the side from its
//! routing table and consumes only from it. A member that loses etcd (lease not valid)
//! stops consuming, so no member reads a side the cluster left.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use leasehold_coord::{Coord, KafkaHealthValue, KafkaSide, KafkaSideValue, MemberState};
use leasehold_kafka::failover::Prober;
use leasehold_kafka::{
    Dispatcher, FailoverOptions, FirstUnfinished, Ingest, Side, SourceOptions, StatusHandle,
};
use leasehold_metrics::Registry;
use leasehold_types::MemberId;
use tokio_util::sync::CancellationToken;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn side_of(s: KafkaSide) -> Side {
    match s {
        KafkaSide::Primary => Side::Primary,
        KafkaSide::Standby => Side::Standby,
    }
}

/// What the leader knows of one active member's view of the primary.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub primary_ok: bool,
    /// How long the leader has seen this answer (its own clock: members' clocks may be
    /// skewed).
    pub for_ms: u64,
    /// Since when the member says so (its clock), for the standby's start time.
    pub since_ms: u64,
    pub error: &'a str,
}

/// The side the leader should switch to, if any: to the standby once a majority of the
/// active members have failed to reach the primary for `down_after`; back (with
/// `auto_fail_back`) once a majority have reached it for `fail_back_after`. An operator's
/// choice (`manual`) is left alone. Pure: `observed` are the active members that
/// reported (the others count against a switch).
pub fn decide(
    current: &KafkaSideValue,
    observed: &[Observed<'_>],
    active: usize,
    now_ms: u64,
    policy: &FailoverOptions,
) -> Option<KafkaSideValue> {
    if current.manual || active == 0 {
        return None;
    }
    let quorum = active / 2 + 1;
    let lasting =
        |o: &&Observed<'_>, ok: bool, for_ms: u64| o.primary_ok == ok && o.for_ms >= for_ms;
    match current.active {
        KafkaSide::Primary => {
            let down_ms = policy.down_after.as_millis() as u64;
            let down: Vec<&Observed<'_>> = observed
                .iter()
                .filter(|o| lasting(o, false, down_ms))
                .collect();
            if down.len() < quorum {
                return None;
            }
            // When a majority had failed, each member's failure taken by the earlier of
            // both clocks (more overlap, never less); not the earliest member's: one
            // whose own path to the primary failed days ago would start the standby
            // days back.
            let mut failed: Vec<u64> = down
                .iter()
                .map(|o| o.since_ms.min(now_ms.saturating_sub(o.for_ms)))
                .collect();
            failed.sort_unstable();
            let since = failed.get(quorum - 1).copied().unwrap_or(now_ms);
            let error = down
                .iter()
                .map(|o| o.error)
                .find(|e| !e.is_empty())
                .unwrap_or("no answer");
            Some(KafkaSideValue {
                active: KafkaSide::Standby,
                since_ms: now_ms,
                reason: format!(
                    "primary unreachable from {} of {active} members for {}s or more: {error}",
                    down.len(),
                    policy.down_after.as_secs()
                ),
                manual: false,
                position_ms: Some(since.saturating_sub(policy.overlap.as_millis() as u64)),
                // Counted by the switch.
                epoch: 0,
            })
        }
        KafkaSide::Standby if policy.auto_fail_back => {
            let back_ms = policy.fail_back_after.as_millis() as u64;
            let healthy = observed
                .iter()
                .filter(|o| lasting(o, true, back_ms))
                .count();
            (healthy >= quorum).then(|| KafkaSideValue {
                active: KafkaSide::Primary,
                since_ms: now_ms,
                reason: format!(
                    "primary reachable from {healthy} of {active} members for {}s or more",
                    policy.fail_back_after.as_secs()
                ),
                manual: false,
                position_ms: None,
                epoch: 0,
            })
        }
        KafkaSide::Standby => None,
    }
}

/// Why a switch did not happen.
#[derive(Debug)]
pub enum SwitchError {
    /// Someone switched first (or this instance is no longer the leader): look again.
    Conflict,
    Failed(String),
}

impl std::fmt::Display for SwitchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchError::Conflict => {
                f.write_str("the side changed meanwhile; look again and retry")
            }
            SwitchError::Failed(why) => f.write_str(why),
        }
    }
}

/// By topic and partition of the primary, the time of the first record a consumer read
/// there and has not finished (see `KafkaHealthValue::first_unfinished_ms`).
pub type Unfinished = BTreeMap<String, BTreeMap<i32, u64>>;

/// The granularity of the health reports' times.
const UNFINISHED_STEP_MS: u64 = 30_000;
/// While the primary is up, a report's times are replaced by the consumer's (which may
/// be later, or hold fewer partitions) at most this often; an earlier time or a new
/// partition is added at once.
const UNFINISHED_REFRESH: Duration = Duration::from_secs(60);
/// And only once most members have reached the primary, and this member's consumer of
/// it has run, this long: after an outage (or a restart of the consumer) the group's
/// consumers rejoin and read their partitions again first.
const UNFINISHED_SETTLE: Duration = Duration::from_secs(120);
/// How long the members keep the times of a member whose report is gone, once the
/// primary is back and settled (see [`Remembered`]).
const REMEMBER_DEPARTED: Duration = Duration::from_secs(600);

/// A consumer's times, rounded down (earlier: more records read again, none missed).
fn rounded(times: &BTreeMap<(String, i32), i64>) -> Unfinished {
    let mut out = Unfinished::new();
    for ((topic, partition), t) in times {
        let t = (*t).max(0) as u64 / UNFINISHED_STEP_MS * UNFINISHED_STEP_MS;
        out.entry(topic.clone()).or_default().insert(*partition, t);
    }
    out
}

/// The earlier time of either, for every partition either has.
fn earliest(mut a: Unfinished, b: &Unfinished) -> Unfinished {
    for (topic, parts) in b {
        let mine = a.entry(topic.clone()).or_default();
        for (p, t) in parts {
            mine.entry(*p)
                .and_modify(|m| *m = (*m).min(*t))
                .or_insert(*t);
        }
    }
    a
}

/// What a member publishes next, from what it published and its consumer's times now:
/// the earlier of both for every partition either has, and the consumer's times alone
/// only when `refresh_due` (the primary up and settled, see [`UNFINISHED_SETTLE`], and
/// the last refresh [`UNFINISHED_REFRESH`] ago). Otherwise nothing rises and nothing is
/// dropped: the group's session timeout revokes the consumer's partitions (and a cut-off
/// from etcd restarts the consumer) before a switch may read the report, and after an
/// outage they are read again only once the group rejoined.
fn next_report(published: &Unfinished, current: Unfinished, refresh_due: bool) -> Unfinished {
    if refresh_due {
        current
    } else {
        earliest(published.clone(), &current)
    }
}

/// At a refresh, puts back into `next` (the consumer's own times) the partitions of
/// `published` it no longer has that no other member reports yet (`elsewhere`): their
/// new holder may not have read a record of them yet, and the primary may fail before it
/// does. Each is kept at most [`REMEMBER_DEPARTED`] after it was first missing
/// (`missing_since`, updated).
fn keep_unclaimed(
    next: &mut Unfinished,
    published: &Unfinished,
    elsewhere: impl Fn(&str, i32) -> bool,
    missing_since: &mut HashMap<(String, i32), tokio::time::Instant>,
    now: tokio::time::Instant,
) {
    let mut still = HashMap::new();
    for (topic, parts) in published {
        for (p, t) in parts {
            if next.get(topic).is_some_and(|n| n.contains_key(p)) || elsewhere(topic, *p) {
                continue;
            }
            let key = (topic.clone(), *p);
            let since = missing_since.get(&key).copied().unwrap_or(now);
            if now.duration_since(since) < REMEMBER_DEPARTED {
                next.entry(topic.clone()).or_default().insert(*p, *t);
                still.insert(key, since);
            }
        }
    }
    *missing_since = still;
}

/// Whether most members reporting on `source` reach its primary (the rule [`decide`]
/// switches by, without its duration): one member whose own path to the primary fails
/// does not make an outage.
fn cluster_up(view: &leasehold_coord::View, source: &str) -> bool {
    let (up, all) = view
        .kafka_health
        .iter()
        .filter(|((s, _), _)| s == source)
        .fold((0, 0), |(up, all), (_, h)| {
            (up + usize::from(h.primary_ok), all + 1)
        });
    all > 0 && up * 2 > all
}

/// Every member's last times of a source, kept by every instance (a new leader may have
/// to switch, and an operator may switch on any instance): a member that died with the
/// primary (one zone) takes its report with its lease, one restarted during an outage
/// reports nothing of its earlier partitions, and nobody could take them over.
#[derive(Debug, Clone, Default)]
pub struct Remembered(Arc<Mutex<Kept>>);

#[derive(Debug, Default)]
struct Kept {
    /// Each member's times, and when its report was last seen.
    members: HashMap<MemberId, (Unfinished, tokio::time::Instant)>,
    /// Since when most members reach the primary.
    up_since: Option<tokio::time::Instant>,
}

impl Remembered {
    /// Takes in the members' reports of `source`. Until most members have reached the
    /// primary for `UNFINISHED_SETTLE` + `UNFINISHED_REFRESH` (their own reports
    /// refresh by then), a member's times are only lowered or added to, and a member
    /// without a report is kept; after that its times are its report's, and a member
    /// without one is forgotten `REMEMBER_DEPARTED` after it was last seen.
    pub fn observe(&self, view: &leasehold_coord::View, source: &str) {
        let now = tokio::time::Instant::now();
        let mut kept = self.0.lock().expect("remembered lock");
        kept.up_since = if cluster_up(view, source) {
            kept.up_since.or(Some(now))
        } else {
            None
        };
        let settled = kept
            .up_since
            .is_some_and(|t| now.duration_since(t) >= UNFINISHED_SETTLE + UNFINISHED_REFRESH);
        for ((s, member), h) in view.kafka_health.iter() {
            if s != source {
                continue;
            }
            let entry = kept
                .members
                .entry(member.clone())
                .or_insert_with(|| (Unfinished::new(), now));
            entry.0 = if settled {
                h.first_unfinished_ms.clone()
            } else {
                earliest(std::mem::take(&mut entry.0), &h.first_unfinished_ms)
            };
            entry.1 = now;
        }
        if settled {
            kept.members
                .retain(|_, (_, at)| now.duration_since(*at) < REMEMBER_DEPARTED);
        } else {
            for (_, at) in kept.members.values_mut() {
                *at = now;
            }
        }
    }

    /// The earliest time kept for every partition.
    pub fn all(&self) -> Unfinished {
        self.0
            .lock()
            .expect("remembered lock")
            .members
            .values()
            .fold(Unfinished::new(), |all, (times, _)| earliest(all, times))
    }
}

/// Per partition of the standby (by its topic name), the time to read it from when that
/// is earlier than `from`: the earliest any report gives for the primary's partition.
fn rewinds(
    source: &SourceOptions,
    failover: &FailoverOptions,
    reports: &Unfinished,
    from: u64,
) -> HashMap<(String, i32), i64> {
    let mut out = HashMap::new();
    for (topic, parts) in reports {
        // The standby's topics are the source's, in order (the same names by default).
        let Some(i) = source.topics.iter().position(|t| t == topic) else {
            continue;
        };
        let standby = failover.topics.get(i).unwrap_or(topic);
        for (p, t) in parts {
            if *t < from {
                out.insert((standby.clone(), *p), *t as i64);
            }
        }
    }
    out
}

/// The earliest time a member says the primary has been failing (its clock), if any.
pub fn first_failure(coord: &Coord, source: &str) -> Option<u64> {
    coord
        .view()
        .kafka_health
        .iter()
        .filter(|((s, _), h)| s == source && !h.primary_ok)
        .map(|(_, h)| h.since_ms)
        .min()
}

/// Sets the side of `source` (the leader's decision when `as_leader`, else an
/// operator's): positions the standby's consumer group first when switching to it (at
/// `position_ms`, else the first reported failure of the primary, else now, minus the
/// overlap; earlier on a partition where a member reported, or `remembered` keeps, a
/// record not finished before that), then writes the side if nobody switched since
/// `expected`. Returns what it wrote and the etcd revision of the write.
pub async fn switch(
    coord: &Coord,
    source: &SourceOptions,
    mut value: KafkaSideValue,
    expected: i64,
    as_leader: bool,
    remembered: &Unfinished,
) -> Result<(KafkaSideValue, i64), SwitchError> {
    let failover = source.failover.clone().ok_or_else(|| {
        SwitchError::Failed(format!("source {:?} has no standby cluster", source.name))
    })?;
    // The members' reports (where to read the standby from) are in the view.
    if !coord.view().synced {
        return Err(SwitchError::Failed(
            "this instance's view of the cluster is not synced with etcd yet; retry".into(),
        ));
    }
    // Positioned only when the standby starts being read (not when an operator marks the
    // side it already reads as chosen).
    let (current, revision) = coord.view().kafka_side(&source.name);
    // Never move a group (nor count an epoch) for a side someone switched meanwhile.
    if revision != expected {
        return Err(SwitchError::Conflict);
    }
    // Every change of side starts a new epoch of partition claims (see `claim_value`).
    value.epoch = if value.active != current.active {
        current.epoch.max(revision.max(0) as u64) + 1
    } else {
        current.epoch
    };
    if value.active == KafkaSide::Standby && (current.active != KafkaSide::Standby || expected == 0)
    {
        let overlap = failover.overlap.as_millis() as u64;
        let from_failure = value.position_ms.unwrap_or_else(|| {
            first_failure(coord, &source.name)
                .unwrap_or_else(now_ms)
                .min(now_ms())
                .saturating_sub(overlap)
        });
        // Where the group lagged further back than the overlap, records older than it
        // were not handled yet: those partitions are read from the first of them.
        let reports = coord
            .view()
            .kafka_health
            .iter()
            .filter(|((s, _), _)| *s == source.name)
            .fold(remembered.clone(), |all, (_, h)| {
                earliest(all, &h.first_unfinished_ms)
            });
        let earlier = rewinds(source, &failover, &reports, from_failure);
        if let Some(first) = earlier.values().min() {
            tracing::warn!(source = %source.name, partitions = earlier.len(), from_failure, first, behind_s = (from_failure as i64 - first) / 1000, "the group had records older than the failure minus the overlap not finished: those partitions of the standby are read from the first of them");
        }
        let at_ms = from_failure;
        value.position_ms = Some(at_ms);
        let group = source.group.clone();
        let timeout = failover.probe_interval.max(Duration::from_secs(5));
        let positioned = tokio::task::spawn_blocking(move || {
            leasehold_kafka::failover::position_group(
                &failover.brokers,
                &failover.properties,
                &group,
                &failover.topics,
                at_ms as i64,
                &earlier,
                timeout,
            )
        })
        .await
        .map_err(|e| SwitchError::Failed(e.to_string()))?
        .map_err(|e| {
            SwitchError::Failed(format!(
                "could not position the standby's consumer group: {e}"
            ))
        })?;
        tracing::info!(source = %source.name, partitions = positioned, at_ms, "standby consumer group positioned");
    }
    match coord
        .set_kafka_side(&source.name, &value, expected, as_leader)
        .await
    {
        Ok(Some(revision)) => Ok((value, revision)),
        Ok(None) => Err(SwitchError::Conflict),
        Err(e) => Err(SwitchError::Failed(format!(
            "could not write the side: {e}"
        ))),
    }
}

/// Reads a failover source until `cancel`: probes the primary, lets the leader decide,
/// and consumes from the side the cluster chose, restarting the consumer when it changes.
pub async fn run(
    source: SourceOptions,
    coord: Coord,
    dispatcher: Arc<dyn Dispatcher>,
    registry: Registry,
    status: StatusHandle,
    remembered: Remembered,
    cancel: CancellationToken,
) -> Result<(), leasehold_kafka::Error> {
    let failover = source.failover.clone().expect("a failover source");
    let background = CancellationToken::new();
    let reports = ConsumerReports::default();
    let prober = tokio::spawn(probe_primary(
        source.clone(),
        failover.clone(),
        coord.clone(),
        reports.clone(),
        background.clone(),
    ));
    let decider = tokio::spawn(lead(
        source.clone(),
        failover.clone(),
        coord.clone(),
        remembered,
        background.clone(),
    ));
    let result = consume(source, coord, dispatcher, registry, status, reports, cancel).await;
    background.cancel();
    let _ = prober.await;
    let _ = decider.await;
    result
}

/// What this member's consumer tells its prober to publish with the health report.
#[derive(Clone, Default)]
struct ConsumerReports {
    first_unfinished: FirstUnfinished,
    on_standby: StandbyEpoch,
}

/// Why a member cut off from etcd does not consume (the source's status says it).
const CUT_OFF: &str =
    "not consuming: this member is cut off from etcd (lease not valid or routing table not synced)";

/// Tells when this member has been cut off from etcd (its lease not valid or its routing
/// table not synced) for a second: the cluster may then switch sides without it.
#[derive(Default)]
struct CutOff {
    since: Option<tokio::time::Instant>,
}

impl CutOff {
    fn for_a_second(&mut self, coord: &Coord) -> bool {
        if coord.view().synced && coord.table().lease().valid_until().is_some() {
            self.since = None;
            return false;
        }
        self.since
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed()
            >= Duration::from_secs(1)
    }
}

/// The standby side's epoch while this member reads it or drains it (0: neither),
/// published with its health report at once when it changes (see
/// `KafkaHealthValue::reading_standby`).
#[derive(Clone, Default)]
struct StandbyEpoch(Arc<StandbyEpochInner>);

#[derive(Default)]
struct StandbyEpochInner {
    epoch: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl StandbyEpoch {
    fn set(&self, epoch: u64) {
        self.0
            .epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
        self.0.changed.notify_one();
    }

    fn get(&self) -> u64 {
        self.0.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves at the next `set` (or at once, if one came since the last wait).
    async fn changed(&self) {
        self.0.changed.notified().await
    }
}

/// Probes the primary every `probe_interval` and publishes the answer, with the time of
/// the first record this member's consumer has not finished and whether it reads the
/// standby, when any of them changes (or this member's lease did).
async fn probe_primary(
    source: SourceOptions,
    failover: FailoverOptions,
    coord: Coord,
    reports: ConsumerReports,
    cancel: CancellationToken,
) {
    let ConsumerReports {
        first_unfinished,
        on_standby,
    } = reports;
    let mut tick = tokio::time::interval(failover.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<KafkaHealthValue> = None;
    let mut written = None;
    // The consumer's times as published (see `next_report`), seeded from this member's
    // report still in etcd (a crash restarted within the lease's TTL, while the primary
    // is down); since when most members have reached the primary, and when the times
    // were last replaced.
    let mut published = Unfinished::new();
    let mut seeded = false;
    let mut up_since: Option<tokio::time::Instant> = None;
    let mut refreshed: Option<tokio::time::Instant> = None;
    let mut missing_since = HashMap::new();
    // One client for the probes while they succeed (see `Prober`).
    let mut prober: Option<Prober> = None;
    loop {
        tokio::select! {
            // The prober closes its client off the async threads when dropped.
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            // Reading the standby began or ended: published now, not at the next tick.
            _ = on_standby.changed() => {}
        }
        let (brokers, properties, topics) = (
            source.brokers.clone(),
            source.properties.clone(),
            source.topics.clone(),
        );
        let timeout = failover.probe_interval.max(Duration::from_millis(500));
        let held = prober.take().filter(|p| !p.stale());
        let probed = tokio::task::spawn_blocking(move || {
            let p = match held {
                Some(p) => p,
                None => match Prober::new(&brokers, &properties) {
                    Ok(p) => p,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = p.probe(&topics, timeout);
            // Kept only while the cluster answers (see `Prober`).
            (result.is_ok().then_some(p), result)
        })
        .await;
        let result = match probed {
            Ok((p, result)) => {
                prober = p;
                result
            }
            Err(e) => Err(e.to_string()),
        };
        let ok = result.is_ok();
        let view = coord.view();
        if !seeded && view.synced {
            seeded = true;
            let mine = (source.name.clone(), coord.member_id().clone());
            if let Some(h) = view.kafka_health.get(&mine) {
                published = earliest(published, &h.first_unfinished_ms);
            }
        }
        up_since = if view.synced && cluster_up(&view, &source.name) {
            up_since.or_else(|| Some(tokio::time::Instant::now()))
        } else {
            None
        };
        if current.as_ref().is_none_or(|c| c.primary_ok != ok) {
            let error = result.err().unwrap_or_default();
            if current.is_some() {
                tracing::warn!(source = %source.name, reachable = ok, %error, "primary Kafka cluster reachability changed");
            }
            current = Some(KafkaHealthValue {
                primary_ok: ok,
                since_ms: now_ms(),
                error,
                // Set below, at every probe.
                first_unfinished_ms: Unfinished::new(),
                reading_standby: 0,
            });
        }
        let mut value = current.clone().expect("set above");
        value.reading_standby = on_standby.get();
        let refresh_due = up_since.is_some_and(|at| at.elapsed() >= UNFINISHED_SETTLE)
            && first_unfinished
                .running_for()
                .is_some_and(|d| d >= UNFINISHED_SETTLE)
            && refreshed.is_none_or(|at| at.elapsed() >= UNFINISHED_REFRESH);
        let mut next = next_report(&published, rounded(&first_unfinished.get()), refresh_due);
        if refresh_due {
            refreshed = Some(tokio::time::Instant::now());
            // Reported by another member (see `keep_unclaimed`).
            let elsewhere = |topic: &str, p: i32| {
                view.kafka_health.iter().any(|((s, m), h)| {
                    *s == source.name
                        && m != coord.member_id()
                        && h.first_unfinished_ms
                            .get(topic)
                            .is_some_and(|parts| parts.contains_key(&p))
                })
            };
            keep_unclaimed(
                &mut next,
                &published,
                elsewhere,
                &mut missing_since,
                tokio::time::Instant::now(),
            );
        }
        drop(view);
        published = next;
        value.first_unfinished_ms = published.clone();
        // Not before this member's earlier report was read: it would be overwritten.
        if !seeded {
            continue;
        }
        if let Err(e) = coord
            .report_kafka_health(&source.name, &value, &mut written)
            .await
        {
            tracing::debug!(source = %source.name, error = %e, "health report not written");
        }
    }
}

/// On the leader: switches the side when [`decide`] says so.
/// On every instance, keeps the members' times in `remembered`.
async fn lead(
    source: SourceOptions,
    failover: FailoverOptions,
    coord: Coord,
    remembered: Remembered,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(failover.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when (this instance's clock) each member has given its current answer.
    let mut seen: HashMap<MemberId, (bool, tokio::time::Instant)> = Default::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let view = coord.view();
        if view.synced {
            remembered.observe(&view, &source.name);
        }
        if !view.synced
            || view.leader.as_ref() != Some(coord.member_id())
            || coord.table().lease().valid_until().is_none()
        {
            seen.clear(); // a new term starts counting afresh
            continue;
        }
        let now = tokio::time::Instant::now();
        let active: Vec<&MemberId> = view
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| &m.id)
            .collect();
        seen.retain(|m, _| active.contains(&m));
        let mut observed = Vec::new();
        for m in &active {
            let Some(h) = view.kafka_health.get(&(source.name.clone(), (*m).clone())) else {
                seen.remove(*m);
                continue;
            };
            let entry = seen.entry((*m).clone()).or_insert((h.primary_ok, now));
            if entry.0 != h.primary_ok {
                *entry = (h.primary_ok, now);
            }
            observed.push(Observed {
                primary_ok: h.primary_ok,
                for_ms: now.duration_since(entry.1).as_millis() as u64,
                since_ms: h.since_ms,
                error: &h.error,
            });
        }
        let (current, revision) = view.kafka_side(&source.name);
        let Some(next) = decide(&current, &observed, active.len(), now_ms(), &failover) else {
            continue;
        };
        tracing::warn!(source = %source.name, to = next.active.as_str(), reason = %next.reason, "switching the Kafka source's cluster");
        if let Err(e) = switch(&coord, &source, next, revision, true, &remembered.all()).await {
            tracing::warn!(source = %source.name, error = %e, "Kafka cluster switch failed; retrying");
        }
    }
}

/// Consumes from the chosen side; stops while this member's lease is not valid or its
/// routing table is not synced, and restarts on the other side when the cluster switches
/// — after draining the standby when going back to the primary, and not before every
/// member can have seen the switch when it is recent.
async fn consume(
    source: SourceOptions,
    coord: Coord,
    dispatcher: Arc<dyn Dispatcher>,
    registry: Registry,
    status: StatusHandle,
    reports: ConsumerReports,
    cancel: CancellationToken,
) -> Result<(), leasehold_kafka::Error> {
    let ConsumerReports {
        first_unfinished,
        on_standby,
    } = reports;
    let mut views = coord.subscribe_view();
    let reading_standby = registry.gauge(
        "leasehold_kafka_reading_standby",
        "1 while this member consumes the source's standby cluster, else 0.",
        &[("source", source.name.as_str())],
    );
    let failover = source.failover.clone().expect("a failover source");
    // A member that missed the switch reads the old side until its lease lapses (it
    // stops then): the new side starts once that time has passed since the switch.
    let settle = coord.options().lease_ttl + Duration::from_secs(2);
    // The side record this member saw last, and when (its own clock).
    let mut first_seen: Option<(i64, tokio::time::Instant)> = None;
    loop {
        // Wait for a current view of the side.
        loop {
            let usable = {
                let v = views.borrow_and_update();
                v.synced && coord.table().lease().valid_until().is_some()
            };
            if usable {
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = views.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        let (side, revision) = coord.view().kafka_side(&source.name);
        if revision != 0 {
            let seen_at = match first_seen {
                Some((r, at)) if r == revision => at,
                _ => first_seen.insert((revision, tokio::time::Instant::now())).1,
            };
            let age = switch_age(now_ms(), side.since_ms, seen_at.elapsed(), settle);
            let window = settle + drain_limit(&failover);
            let window_ends = tokio::time::Instant::now() + window.saturating_sub(age);
            if age < settle {
                let wait = settle - age;
                tracing::info!(source = %source.name, side = side.active.as_str(), ?wait, "waiting for every member to leave the previous side");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
                if coord.view().kafka_side(&source.name).1 != revision {
                    continue; // switched again meanwhile
                }
            }
            // Back on the primary: not while another member still drains the standby.
            // Claims fence by topic name, so with the same names on both clusters this
            // member's claims on the primary would fence the drain, and the standby's
            // records not read yet would be left there.
            if side.active == KafkaSide::Primary
                && age < window
                && !wait_for_drains(
                    &source.name,
                    &coord,
                    side.epoch,
                    revision,
                    window_ends,
                    &cancel,
                )
                .await
            {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                continue; // switched again meanwhile
            }
        }
        let mut options = source.on_side(side_of(side.active));
        options.claim_epoch = side.epoch;
        reading_standby.set(if side.active == KafkaSide::Standby {
            1.0
        } else {
            0.0
        });
        tracing::info!(source = %source.name, side = side.active.as_str(), brokers = %options.brokers, "consuming");
        let mut ingest =
            Ingest::new(options, dispatcher.clone(), &registry).with_status(status.clone());
        // Only the primary's records matter to a switch to the standby; while the standby
        // is read the last times stay (the primary's group resumes from there).
        if side.active == KafkaSide::Primary {
            ingest = ingest.with_first_unfinished(first_unfinished.clone());
        }
        let abandon = ingest.abandon_switch();
        // Reading the standby is published from the start (not only once a drain begins),
        // so a member that sees the switch back sees it at once.
        if side.active == KafkaSide::Standby {
            on_standby.set(side.epoch.max(1));
        }
        let stop = cancel.child_token();
        let mut running = tokio::spawn(ingest.run(stop.clone()));
        let mut cut_off = CutOff::default();
        let mut stopped_because = None;
        let mut drain = false;
        let ended = loop {
            tokio::select! {
                r = &mut running => break Some(r),
                _ = cancel.cancelled() => {}
                _ = views.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if cancel.is_cancelled() {
                break None;
            }
            let view = coord.view();
            let (now, now_revision) = view.kafka_side(&source.name);
            // Also when the side is the same but its epoch changed (two switches seen as
            // one): the consumer's claims must carry the group's epoch.
            if now_revision != revision && (now.active != side.active || now.epoch != side.epoch) {
                tracing::warn!(source = %source.name, from = side.active.as_str(), to = now.active.as_str(), epoch = now.epoch, "the cluster switched sides; restarting the consumer");
                first_seen = Some((now_revision, tokio::time::Instant::now()));
                drain = side.active == KafkaSide::Standby;
                // Leaving the primary: its records not running yet must not start once
                // the standby may have (its topics may have other names, and then no
                // claim fences them); they are read again when the primary is read next.
                // (Going back, the standby is drained first: best effort, see README.)
                if !drain {
                    abandon.store(true, std::sync::atomic::Ordering::Release);
                }
                break None;
            }
            // A member cut off from etcd stops reading: the cluster may switch without it.
            if cut_off.for_a_second(&coord) {
                tracing::warn!(source = %source.name, "lease not valid or routing table not synced; this member stops consuming until both are");
                stopped_because = Some(CUT_OFF);
                abandon.store(true, std::sync::atomic::Ordering::Release);
                break None;
            }
        };
        if drain && ended.is_none() {
            // Back to the primary: what the standby received until the switch is read
            // first (records produced there during the outage are not left behind). The
            // published reading of the standby stays, so no member starts the primary
            // meanwhile.
            let drained =
                drain_standby(&source, &coord, &status, drain_limit(&failover), &cancel).await;
            if drained == Drained::CutOff {
                stopped_because = Some(CUT_OFF);
                abandon.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let result = match ended {
            Some(r) => r,
            None => {
                stop.cancel();
                running.await
            }
        };
        // Cleared once nothing of the standby runs here any more.
        on_standby.set(0);
        reading_standby.set(0.0);
        if let Some(why) = stopped_because {
            // What /v1/kafka shows until a consumer runs again.
            let mut st = status.lock().expect("source status lock");
            st.error = Some(why.to_owned());
            for p in &mut st.partitions {
                p.here = false;
            }
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(leasehold_kafka::Error::Config {
                    source_name: source.name.clone(),
                    message: format!("consumer task failed: {e}"),
                })
            }
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
    }
}

/// How long ago a side was chosen, as far as waiting for the members to leave the
/// previous side goes: since this member first saw it (`seen`, its own clock), not by
/// the switcher's clock (`since_ms`), which may be behind this member's by more than the
/// wait — it would start the new side while a member that missed the switch still reads
/// the old one. Unless the switcher's clock says the switch is long past (more than 10
/// minutes beyond the wait): a member started long after a switch does not wait.
fn switch_age(now_ms: u64, since_ms: u64, seen: Duration, settle: Duration) -> Duration {
    let by_clock = Duration::from_millis(now_ms.saturating_sub(since_ms));
    if by_clock >= settle + Duration::from_secs(600) {
        by_clock
    } else {
        seen
    }
}

/// How long a member drains the standby after a switch back, at most.
fn drain_limit(failover: &FailoverOptions) -> Duration {
    failover.fail_back_after.max(Duration::from_secs(30))
}

/// Waits until no other member reports reading (or draining) a standby side older than
/// `epoch` (the primary's), or `deadline`. False when the side changed from `revision`
/// meanwhile, or on cancel.
async fn wait_for_drains(
    source: &str,
    coord: &Coord,
    epoch: u64,
    revision: i64,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> bool {
    let mut views = coord.subscribe_view();
    let mut logged = false;
    loop {
        let drainers: Vec<MemberId> = {
            let view = views.borrow_and_update();
            if view.kafka_side(source).1 != revision {
                return false;
            }
            view.kafka_health
                .iter()
                .filter(|((s, m), h)| {
                    s == source
                        && m != coord.member_id()
                        && h.reading_standby != 0
                        && h.reading_standby < epoch
                })
                .map(|((_, m), _)| m.clone())
                .collect()
        };
        if drainers.is_empty() {
            if logged {
                tracing::info!(
                    source,
                    "every member has drained the standby; reading the primary"
                );
            }
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                source,
                ?drainers,
                "members still drain the standby; reading the primary anyway"
            );
            return true;
        }
        if !logged {
            logged = true;
            tracing::info!(
                source,
                ?drainers,
                "waiting for members draining the standby before reading the primary"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = views.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// How a drain of the standby ended.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    Done,
    /// At the limit, or cancelled.
    GaveUp,
    /// This member was cut off from etcd (lease not valid or routing table not synced
    /// for 1 s): it stops reading, as it would on any side.
    CutOff,
}

/// The standby's partitions and their ends, from a status snapshot taken after `since_ms`
/// that covers every partition with its end; `None` until there is one (a consumer just
/// started has none, and one with an error may leave partitions out). With `partial`,
/// also from one that leaves some out (a source whose ends never all arrive within a
/// refresh's budget): the partitions it has.
fn drain_targets(
    status: &StatusHandle,
    since_ms: u64,
    partial: bool,
) -> Option<Vec<(String, i32, i64)>> {
    let st = status.lock().expect("source status lock");
    if st.updated_ms.is_none_or(|at| at < since_ms) {
        return None;
    }
    let targets: Vec<_> = st
        .partitions
        .iter()
        .filter_map(|p| Some((p.topic.clone(), p.partition, p.end?)))
        .collect();
    let complete = st.error.is_none() && targets.len() == st.partitions.len();
    (!targets.is_empty() && (complete || partial)).then_some(targets)
}

/// How long a drain waits for a complete status of the standby before it takes the
/// partitions a partial one has.
const DRAIN_COMPLETE_WAIT: Duration = Duration::from_secs(15);

/// Waits (at most `limit`) until the group's committed offsets on the standby reach the
/// ends a status snapshot taken after the switch back was seen shows.
async fn drain_standby(
    source: &SourceOptions,
    coord: &Coord,
    status: &StatusHandle,
    limit: Duration,
    cancel: &CancellationToken,
) -> Drained {
    let since_ms = now_ms();
    let started = tokio::time::Instant::now();
    let mut targets = None;
    let mut cut_off = CutOff::default();
    loop {
        if cut_off.for_a_second(coord) {
            tracing::warn!(source = %source.name, "lease not valid or routing table not synced while draining the standby; this member stops consuming until both are");
            return Drained::CutOff;
        }
        if targets.is_none() {
            targets = drain_targets(status, since_ms, started.elapsed() >= DRAIN_COMPLETE_WAIT);
        }
        let behind = targets.as_ref().map(|targets| {
            let st = status.lock().expect("source status lock");
            targets
                .iter()
                .filter(|(t, p, end)| {
                    !st.partitions.iter().any(|s| {
                        s.topic == *t && s.partition == *p && s.committed.is_some_and(|c| c >= *end)
                    })
                })
                .count()
        });
        if behind == Some(0) {
            tracing::info!(source = %source.name, took = ?started.elapsed(), "standby drained up to the switch");
            return Drained::Done;
        }
        if started.elapsed() >= limit {
            match behind {
                Some(behind) => {
                    tracing::warn!(source = %source.name, behind, "standby not drained within {limit:?}; going back to the primary anyway")
                }
                None => {
                    tracing::warn!(source = %source.name, "no complete status of the standby within {limit:?} (its ends unknown); going back to the primary without draining it")
                }
            }
            return Drained::GaveUp;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Drained::GaveUp,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_targets_only_a_complete_status_taken_after_the_switch() {
        let part = |partition, end| leasehold_kafka::PartitionStatus {
            topic: "pay".into(),
            partition,
            end,
            committed: None,
            lag: None,
            here: true,
        };
        let status = |updated_ms, error: Option<&str>, partitions| -> StatusHandle {
            Arc::new(std::sync::Mutex::new(leasehold_kafka::SourceStatus {
                updated_ms,
                error: error.map(str::to_owned),
                partitions,
                ..Default::default()
            }))
        };
        let complete = vec![part(0, Some(10)), part(1, Some(4))];
        let both = Some(vec![("pay".into(), 0, 10), ("pay".into(), 1, 4)]);
        for partial in [false, true] {
            // A consumer just started (empty), or one from before the switch: never.
            assert_eq!(
                drain_targets(&status(None, None, vec![]), 100, partial),
                None
            );
            let empty = status(Some(200), None, vec![]);
            assert_eq!(drain_targets(&empty, 100, partial), None);
            let old = status(Some(99), None, complete.clone());
            assert_eq!(drain_targets(&old, 100, partial), None);
            // Complete: at once.
            let fresh = status(Some(200), None, complete.clone());
            assert_eq!(drain_targets(&fresh, 100, partial), both);
        }
        // With an error, or an end missing: not yet; later, what it has.
        let failed = status(Some(200), Some("partitions left out"), complete.clone());
        assert_eq!(drain_targets(&failed, 100, false), None);
        assert_eq!(drain_targets(&failed, 100, true), both);
        let short = status(Some(200), None, vec![part(0, Some(10)), part(1, None)]);
        assert_eq!(drain_targets(&short, 100, false), None);
        assert_eq!(
            drain_targets(&short, 100, true),
            Some(vec![("pay".into(), 0, 10)])
        );
    }

    #[test]
    fn a_switch_is_as_old_as_this_member_has_seen_it_unless_long_past() {
        let settle = Duration::from_secs(5);
        let seen = Duration::from_secs(1);
        // The switcher's clock behind this member's by a minute: still 1 s old here.
        assert_eq!(switch_age(100_000, 40_000, seen, settle), seen);
        // Ahead: the same.
        assert_eq!(switch_age(100_000, 160_000, seen, settle), seen);
        // Long past by the switcher's clock (a member started long after): no wait.
        let old = switch_age(1_000_000, 100_000, seen, settle);
        assert_eq!(old, Duration::from_secs(900));
        assert!(old >= settle);
    }

    fn policy() -> FailoverOptions {
        FailoverOptions {
            brokers: "b:9092".into(),
            topics: vec!["t".into()],
            properties: Default::default(),
            down_after: Duration::from_secs(10),
            fail_back_after: Duration::from_secs(30),
            auto_fail_back: true,
            probe_interval: Duration::from_secs(1),
            overlap: Duration::from_secs(60),
        }
    }

    /// A member's answer, held `for_ms` by the leader's clock and since `since_ms` by its
    /// own.
    fn report(ok: bool, for_ms: u64, since_ms: u64) -> Observed<'static> {
        Observed {
            primary_ok: ok,
            for_ms,
            since_ms,
            error: if ok { "" } else { "timed out" },
        }
    }

    fn times(entries: &[(&str, i32, u64)]) -> Unfinished {
        let mut out = Unfinished::new();
        for (topic, p, t) in entries {
            out.entry((*topic).to_owned()).or_default().insert(*p, *t);
        }
        out
    }

    #[test]
    fn reports_rise_or_drop_partitions_only_at_a_refresh() {
        let published = times(&[("a", 0, 60_000), ("a", 1, 90_000)]);
        // The consumer lost partition 1 (revoked), moved on on partition 0 and got 2.
        let now = times(&[("a", 0, 120_000), ("a", 2, 30_000)]);
        assert_eq!(
            next_report(&published, now.clone(), false),
            times(&[("a", 0, 60_000), ("a", 1, 90_000), ("a", 2, 30_000)])
        );
        let went_back = times(&[("a", 0, 30_000)]);
        assert_eq!(
            next_report(&published, went_back, false),
            times(&[("a", 0, 30_000), ("a", 1, 90_000)])
        );
        assert_eq!(next_report(&published, now.clone(), true), now);
    }

    /// Until most members have reached the primary for a while, the members' times are
    /// only lowered or added to (a member restarted during the outage reports nothing of
    /// its earlier partitions) and a member whose report is gone is kept; after that,
    /// each member's times are its own, and one gone 10 minutes is forgotten.
    #[tokio::test(start_paused = true)]
    async fn members_times_are_kept_through_an_outage_until_the_primary_settles() {
        let report = |ok: bool, t: &[(&str, i32, u64)]| KafkaHealthValue {
            primary_ok: ok,
            since_ms: 1,
            error: String::new(),
            first_unfinished_ms: times(t),
            reading_standby: 0,
        };
        let view = |reports: Vec<(&str, KafkaHealthValue)>| {
            let mut v = leasehold_coord::View::empty(1);
            v.kafka_health = Arc::new(
                reports
                    .into_iter()
                    .map(|(m, h)| (("s".to_owned(), MemberId::new(m)), h))
                    .collect(),
            );
            v
        };
        let settle = UNFINISHED_SETTLE + UNFINISHED_REFRESH;
        let r = Remembered::default();
        // The primary fails; n2 dies; n1 restarts and reports nothing of its partition.
        r.observe(
            &view(vec![
                ("n1", report(false, &[("a", 0, 60_000)])),
                ("n2", report(false, &[("a", 1, 90_000)])),
            ]),
            "s",
        );
        tokio::time::advance(REMEMBER_DEPARTED * 2).await;
        r.observe(&view(vec![("n1", report(false, &[]))]), "s");
        assert_eq!(r.all(), times(&[("a", 0, 60_000), ("a", 1, 90_000)]));
        // One member's own path to the primary works: not the cluster's view.
        r.observe(
            &view(vec![
                ("n1", report(false, &[])),
                ("n3", report(true, &[("a", 1, 200_000)])),
            ]),
            "s",
        );
        assert_eq!(r.all(), times(&[("a", 0, 60_000), ("a", 1, 90_000)]));
        // Back, but not settled: still only lowered or added to.
        let up = |t: &[(&str, i32, u64)]| view(vec![("n1", report(true, t))]);
        r.observe(&up(&[("a", 2, 150_000)]), "s");
        tokio::time::advance(settle / 2).await;
        r.observe(&up(&[("a", 2, 150_000)]), "s");
        assert_eq!(
            r.all(),
            times(&[("a", 0, 60_000), ("a", 1, 90_000), ("a", 2, 150_000)])
        );
        // Settled: n1's times are its own; n2 and n3, gone, are forgotten 10 minutes
        // after they were last seen, counted from then.
        tokio::time::advance(settle).await;
        r.observe(&up(&[("a", 0, 180_000)]), "s");
        assert_eq!(r.all(), times(&[("a", 0, 180_000), ("a", 1, 90_000)]));
        tokio::time::advance(REMEMBER_DEPARTED).await;
        r.observe(&up(&[("a", 0, 180_000)]), "s");
        assert_eq!(r.all(), times(&[("a", 0, 180_000)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_no_longer_held_stays_until_another_member_reports_it() {
        let mut missing = HashMap::new();
        // One refresh: the consumer's own times, and what `keep_unclaimed` puts back.
        let mut refresh = |published: &Unfinished, held, elsewhere: &dyn Fn(&str, i32) -> bool| {
            let mut next = held;
            keep_unclaimed(
                &mut next,
                published,
                elsewhere,
                &mut missing,
                tokio::time::Instant::now(),
            );
            next
        };
        let published = times(&[("a", 0, 60_000), ("a", 1, 90_000), ("a", 2, 30_000)]);
        // Partition 0 is still held; 1 is reported by another member; 2 not.
        let next = refresh(&published, times(&[("a", 0, 120_000)]), &|t, p| {
            (t, p) == ("a", 1)
        });
        assert_eq!(next, times(&[("a", 0, 120_000), ("a", 2, 30_000)]));
        // Still unclaimed at later refreshes: kept for 10 minutes from the first.
        let nowhere = |_: &str, _: i32| false;
        tokio::time::advance(REMEMBER_DEPARTED / 2).await;
        let next = refresh(&next, times(&[("a", 0, 150_000)]), &nowhere);
        assert_eq!(next, times(&[("a", 0, 150_000), ("a", 2, 30_000)]));
        tokio::time::advance(REMEMBER_DEPARTED / 2).await;
        let next = refresh(&next, times(&[("a", 0, 150_000)]), &nowhere);
        assert_eq!(next, times(&[("a", 0, 150_000)]));
        assert!(missing.is_empty());
    }

    #[test]
    fn a_consumers_times_are_rounded_down_per_partition() {
        let mut raw = BTreeMap::new();
        raw.insert(("a".to_owned(), 0), 59_999);
        raw.insert(("a".to_owned(), 3), 60_000);
        raw.insert(("b".to_owned(), 1), -5);
        assert_eq!(
            rounded(&raw),
            times(&[("a", 0, 30_000), ("a", 3, 60_000), ("b", 1, 0)])
        );
    }

    #[test]
    fn only_partitions_behind_the_overlap_are_read_earlier_on_the_standby_topic() {
        let mut source = SourceOptions {
            name: "s".into(),
            brokers: "p:9092".into(),
            topics: vec!["orders".into(), "pay".into()],
            group: "g".into(),
            key: leasehold_kafka::KeySource::MessageKey,
            dlq_topic: None,
            on_failure: leasehold_kafka::OnFailure::Skip,
            max_in_flight_per_partition: 1,
            max_in_flight: 1,
            retry_attempts: 1,
            retry_backoff: Duration::from_millis(10),
            commit_interval: Duration::from_secs(1),
            properties: Default::default(),
            cluster: String::new(),
            claim_epoch: 0,
            failover: None,
        };
        let mut f = policy();
        f.topics = vec!["a.orders".into(), "a.pay".into()];
        source.failover = Some(f.clone());
        let reports = earliest(
            times(&[("pay", 0, 50), ("pay", 1, 500), ("gone", 0, 1)]),
            &times(&[("pay", 1, 40), ("orders", 2, 100)]),
        );
        let r = rewinds(&source, &f, &reports, 100);
        let mut r: Vec<_> = r.into_iter().collect();
        r.sort();
        assert_eq!(
            r,
            [(("a.pay".to_owned(), 0), 50), (("a.pay".to_owned(), 1), 40)],
            "later than the failure minus the overlap, or of a topic not read: left out"
        );
    }

    #[test]
    fn a_majority_down_long_enough_switches_to_the_standby() {
        let p = policy();
        let primary = KafkaSideValue::default();
        let now = 1_000_000;
        let (down_long, down_short, up) = (
            report(false, 11_000, now - 11_000),
            report(false, 5_000, now - 5_000),
            report(true, 100_000, now - 100_000),
        );
        // One of three members: not a majority.
        assert_eq!(decide(&primary, &[down_long, up, up], 3, now, &p), None);
        // Two of three, but one not for long enough.
        assert_eq!(
            decide(&primary, &[down_long, down_short, up], 3, now, &p),
            None
        );
        // Two of three for long enough: the standby, read from the overlap before the
        // earliest failure.
        let next = decide(&primary, &[down_long, down_long, up], 3, now, &p).unwrap();
        assert_eq!(next.active, KafkaSide::Standby);
        assert_eq!(next.position_ms, Some(now - 11_000 - 60_000));
        assert!(
            next.reason.contains("2 of 3") && next.reason.contains("timed out"),
            "{}",
            next.reason
        );
        // Members that did not report count as not agreeing.
        assert_eq!(decide(&primary, &[down_long], 3, now, &p), None);
        // One member that has not reached the primary for a day (its own path): the
        // standby starts from when a majority had failed, not from a day ago.
        let now = 100_000_000;
        let down_for_a_day = report(false, 86_400_000, now - 86_400_000);
        let down_long = report(false, 11_000, now - 11_000);
        let next = decide(&primary, &[down_for_a_day, down_long, up], 3, now, &p).unwrap();
        assert_eq!(next.position_ms, Some(now - 11_000 - 60_000));
    }

    #[test]
    fn durations_come_from_the_leaders_clock() {
        let p = policy();
        let primary = KafkaSideValue::default();
        let now = 1_000_000;
        // A member whose clock is far behind claims a failure long ago: the leader has
        // seen it for 1 s only, so no switch.
        let skewed = report(false, 1_000, now - 600_000);
        assert_eq!(decide(&primary, &[skewed, skewed], 2, now, &p), None);
        // A member whose clock is ahead (since in the future) still counts once the
        // leader has seen it long enough; the start is the earlier of the two clocks.
        let ahead = report(false, 12_000, now + 50_000);
        let next = decide(&primary, &[ahead, ahead], 2, now, &p).unwrap();
        assert_eq!(next.position_ms, Some(now - 12_000 - 60_000));
    }

    #[test]
    fn fail_back_needs_a_healthy_majority_and_the_policy() {
        let mut p = policy();
        let standby = KafkaSideValue {
            active: KafkaSide::Standby,
            ..Default::default()
        };
        let now = 1_000_000;
        let (up_long, up_short) = (report(true, 31_000, 0), report(true, 10_000, 0));
        assert_eq!(decide(&standby, &[up_long, up_short], 2, now, &p), None);
        // A member that did not report counts against.
        assert_eq!(decide(&standby, &[up_long], 2, now, &p), None);
        let back = decide(&standby, &[up_long, up_long], 2, now, &p).unwrap();
        assert_eq!(back.active, KafkaSide::Primary);
        p.auto_fail_back = false;
        assert_eq!(decide(&standby, &[up_long, up_long], 2, now, &p), None);
        // An operator's choice is never undone automatically.
        let manual = KafkaSideValue {
            manual: true,
            ..Default::default()
        };
        let down = report(false, 100_000, 0);
        assert_eq!(decide(&manual, &[down, down], 2, now, &policy()), None);
    }
}
