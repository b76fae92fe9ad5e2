//! Kafka cluster failover: a source with a standby cluster reads the primary, and the
//! standby only while the primary is down.
//!
//! The Leasehold cluster decides, not each instance: every member probes the primary and
//! publishes what it sees (`kafka-health/<member>/<source>`, on its lease); the leader
//! switches the side (`kafka-sides/<source>`, compare-and-set on its revision) once a
//! majority of active members agree for long enough; every member reads the side from its
//! routing table and consumes only from it. A member that loses etcd (lease not valid)
//! stops consuming, so no member reads a side the cluster left.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use leasehold_coord::{Coord, KafkaHealthValue, KafkaSide, KafkaSideValue, MemberState};
use leasehold_kafka::{Dispatcher, FailoverOptions, Ingest, Side, SourceOptions, StatusHandle};
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

/// The side the leader should switch to, if any: to the standby once a majority of the
/// active members have failed to reach the primary for `down_after`; back (with
/// `auto_fail_back`) once a majority have reached it for `fail_back_after`. An operator's
/// choice (`manual`) is left alone. Pure: `reports` are the active members' latest.
pub fn decide(
    current: &KafkaSideValue,
    reports: &[&KafkaHealthValue],
    active: usize,
    now_ms: u64,
    policy: &FailoverOptions,
) -> Option<KafkaSideValue> {
    if current.manual || active == 0 {
        return None;
    }
    let quorum = active / 2 + 1;
    let lasting = |r: &&KafkaHealthValue, ok: bool, for_ms: u64| {
        r.primary_ok == ok && now_ms.saturating_sub(r.since_ms) >= for_ms
    };
    match current.active {
        KafkaSide::Primary => {
            let down_ms = policy.down_after.as_millis() as u64;
            let down: Vec<&&KafkaHealthValue> = reports
                .iter()
                .filter(|r| lasting(r, false, down_ms))
                .collect();
            if down.len() < quorum {
                return None;
            }
            let since = down.iter().map(|r| r.since_ms).min().unwrap_or(now_ms);
            let error = down
                .iter()
                .map(|r| r.error.as_str())
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
            })
        }
        KafkaSide::Standby if policy.auto_fail_back => {
            let back_ms = policy.fail_back_after.as_millis() as u64;
            let healthy = reports.iter().filter(|r| lasting(r, true, back_ms)).count();
            (healthy >= quorum).then(|| KafkaSideValue {
                active: KafkaSide::Primary,
                since_ms: now_ms,
                reason: format!(
                    "primary reachable from {healthy} of {active} members for {}s or more",
                    policy.fail_back_after.as_secs()
                ),
                manual: false,
                position_ms: None,
            })
        }
        KafkaSide::Standby => None,
    }
}

/// Sets the side of `source` (an operator's switch when `manual`, else the leader's):
/// positions the standby's consumer group first when switching to it, then writes the
/// side if nobody switched since `expected`. Returns the record written, or why not.
pub async fn switch(
    coord: &Coord,
    source: &SourceOptions,
    mut value: KafkaSideValue,
    expected: i64,
) -> Result<KafkaSideValue, String> {
    let failover = source
        .failover
        .clone()
        .ok_or_else(|| format!("source {:?} has no standby cluster", source.name))?;
    if value.active == KafkaSide::Standby {
        let at_ms = value
            .position_ms
            .unwrap_or_else(|| now_ms().saturating_sub(failover.overlap.as_millis() as u64));
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
                timeout,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("could not position the standby's consumer group: {e}"))?;
        tracing::info!(source = %source.name, partitions = positioned, at_ms, "standby consumer group positioned");
    }
    match coord.set_kafka_side(&source.name, &value, expected).await {
        Ok(true) => Ok(value),
        Ok(false) => Err("the side changed meanwhile; look again and retry".into()),
        Err(e) => Err(format!("could not write the side: {e}")),
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
    cancel: CancellationToken,
) -> Result<(), leasehold_kafka::Error> {
    let failover = source.failover.clone().expect("a failover source");
    let background = CancellationToken::new();
    let prober = tokio::spawn(probe_primary(
        source.clone(),
        failover.clone(),
        coord.clone(),
        background.clone(),
    ));
    let decider = tokio::spawn(lead(
        source.clone(),
        failover.clone(),
        coord.clone(),
        background.clone(),
    ));
    let result = consume(source, coord, dispatcher, registry, status, cancel).await;
    background.cancel();
    let _ = prober.await;
    let _ = decider.await;
    result
}

/// Probes the primary every `probe_interval` and publishes the answer when it changes
/// (and again every ten probes, so a new lease carries it).
async fn probe_primary(
    source: SourceOptions,
    failover: FailoverOptions,
    coord: Coord,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(failover.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<KafkaHealthValue> = None;
    let mut unchanged = 0u32;
    let mut written = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (brokers, properties, topics) = (
            source.brokers.clone(),
            source.properties.clone(),
            source.topics.clone(),
        );
        let timeout = failover.probe_interval.max(Duration::from_millis(500));
        let result = tokio::task::spawn_blocking(move || {
            leasehold_kafka::failover::probe(&brokers, &properties, &topics, timeout)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let ok = result.is_ok();
        let error = result.err().unwrap_or_default();
        let changed = current.as_ref().is_none_or(|c| c.primary_ok != ok);
        if changed {
            if current.is_some() {
                tracing::warn!(source = %source.name, reachable = ok, %error, "primary Kafka cluster reachability changed");
            }
            current = Some(KafkaHealthValue {
                primary_ok: ok,
                since_ms: now_ms(),
                error: error.clone(),
            });
            unchanged = 0;
            written = false;
        } else {
            unchanged += 1;
            if let Some(c) = current.as_mut() {
                c.error = error;
            }
        }
        if !written || unchanged % 10 == 0 {
            let value = current.clone().expect("set above");
            written = coord
                .report_kafka_health(&source.name, &value)
                .await
                .is_ok();
        }
    }
}

/// On the leader: switches the side when [`decide`] says so.
async fn lead(
    source: SourceOptions,
    failover: FailoverOptions,
    coord: Coord,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(failover.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let view = coord.view();
        if !view.synced
            || view.leader.as_ref() != Some(coord.member_id())
            || coord.table().lease().valid_until().is_none()
        {
            continue;
        }
        let active: Vec<&MemberId> = view
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| &m.id)
            .collect();
        let reports: Vec<&KafkaHealthValue> = active
            .iter()
            .filter_map(|m| view.kafka_health.get(&(source.name.clone(), (*m).clone())))
            .collect();
        let (current, revision) = view.kafka_side(&source.name);
        let Some(next) = decide(&current, &reports, active.len(), now_ms(), &failover) else {
            continue;
        };
        tracing::warn!(source = %source.name, to = next.active.as_str(), reason = %next.reason, "switching the Kafka source's cluster");
        if let Err(e) = switch(&coord, &source, next, revision).await {
            tracing::warn!(source = %source.name, error = %e, "Kafka cluster switch failed; retrying");
        }
    }
}

/// Consumes from the chosen side; stops while this member's lease is not valid, and
/// restarts on the other side when the cluster switches.
async fn consume(
    source: SourceOptions,
    coord: Coord,
    dispatcher: Arc<dyn Dispatcher>,
    registry: Registry,
    status: StatusHandle,
    cancel: CancellationToken,
) -> Result<(), leasehold_kafka::Error> {
    let mut views = coord.subscribe_view();
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
        let options = source.on_side(side_of(side.active));
        tracing::info!(source = %source.name, side = side.active.as_str(), brokers = %options.brokers, "consuming");
        let ingest =
            Ingest::new(options, dispatcher.clone(), &registry).with_status(status.clone());
        let stop = cancel.child_token();
        let mut running = tokio::spawn(ingest.run(stop.clone()));
        let mut invalid_since: Option<tokio::time::Instant> = None;
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
            let (now, now_revision) = coord.view().kafka_side(&source.name);
            if now_revision != revision && now.active != side.active {
                tracing::warn!(source = %source.name, from = side.active.as_str(), to = now.active.as_str(), "the cluster switched sides; restarting the consumer");
                break None;
            }
            // A member cut off from etcd stops reading: the cluster may switch without it.
            if coord.table().lease().valid_until().is_none() {
                let since = *invalid_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(source = %source.name, "lease not valid; this member stops consuming until it is");
                    break None;
                }
            } else {
                invalid_since = None;
            }
        };
        let result = match ended {
            Some(r) => r,
            None => {
                stop.cancel();
                // A consumer of a cluster that went down may take long to close (its
                // last commits and the group leave time out); the next side does not wait
                // for it past this. (With the same topic names on both sides, the new
                // side's claims of the partitions fence its records at the owners.)
                match tokio::time::timeout(Duration::from_secs(10), &mut running).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(source = %source.name, "the previous consumer is still closing; going on without it");
                        Ok(Ok(()))
                    }
                }
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn report(ok: bool, since_ms: u64) -> KafkaHealthValue {
        KafkaHealthValue {
            primary_ok: ok,
            since_ms,
            error: if ok {
                String::new()
            } else {
                "timed out".into()
            },
        }
    }

    #[test]
    fn a_majority_down_long_enough_switches_to_the_standby() {
        let p = policy();
        let primary = KafkaSideValue::default();
        let now = 1_000_000;
        let (down_long, down_short, up) = (
            report(false, now - 11_000),
            report(false, now - 5_000),
            report(true, now - 100_000),
        );
        // One of three members: not a majority.
        assert_eq!(decide(&primary, &[&down_long, &up, &up], 3, now, &p), None);
        // Two of three, but one not for long enough.
        assert_eq!(
            decide(&primary, &[&down_long, &down_short, &up], 3, now, &p),
            None
        );
        // Two of three for long enough: the standby, read from the overlap before the
        // earliest failure.
        let next = decide(&primary, &[&down_long, &down_long, &up], 3, now, &p).unwrap();
        assert_eq!(next.active, KafkaSide::Standby);
        assert_eq!(next.position_ms, Some(now - 11_000 - 60_000));
        assert!(
            next.reason.contains("2 of 3") && next.reason.contains("timed out"),
            "{}",
            next.reason
        );
        // Members that did not report count as not agreeing.
        assert_eq!(decide(&primary, &[&down_long], 3, now, &p), None);
    }

    #[test]
    fn fail_back_needs_a_healthy_majority_and_the_policy() {
        let mut p = policy();
        let standby = KafkaSideValue {
            active: KafkaSide::Standby,
            ..Default::default()
        };
        let now = 1_000_000;
        let (up_long, up_short) = (report(true, now - 31_000), report(true, now - 10_000));
        assert_eq!(decide(&standby, &[&up_long, &up_short], 2, now, &p), None);
        let back = decide(&standby, &[&up_long, &up_long], 2, now, &p).unwrap();
        assert_eq!(back.active, KafkaSide::Primary);
        p.auto_fail_back = false;
        assert_eq!(decide(&standby, &[&up_long, &up_long], 2, now, &p), None);
        // An operator's choice is never undone automatically.
        let manual = KafkaSideValue {
            manual: true,
            ..Default::default()
        };
        assert_eq!(
            decide(
                &manual,
                &[&report(false, 0), &report(false, 0)],
                2,
                now,
                &policy()
            ),
            None
        );
    }
}
