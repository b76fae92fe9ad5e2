//! The lease keeper: one etcd lease per instance, kept alive by hand.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper as KeepAliveSender};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::{Coord, Error, Session};

enum End {
    Cancelled,
    Expired,
}

/// Holds this instance's lease: grants one, keeps it alive, and on its loss drops every
/// shard and grants a new one. Publishes each grant and loss as a new [`Session`].
pub(crate) struct LeaseKeeper {
    coord: Coord,
    /// TTL asked for in each grant.
    ttl_secs: i64,
    /// Between failed grants.
    backoff: Backoff,
    /// Set while etcd does not answer; cleared (and the watcher told) when it does again.
    unheard: AtomicBool,
}

impl LeaseKeeper {
    pub(crate) fn new(coord: Coord) -> Self {
        Self {
            ttl_secs: coord.inner.opts.lease_ttl.as_secs().max(1) as i64,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            unheard: AtomicBool::new(false),
            coord,
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        loop {
            let sent = Instant::now();
            let grant = tokio::select! {
                _ = cancel.cancelled() => return,
                r = async {
                    let client = self.coord.client()?;
                    self.coord.etcd(client.lease_client().grant(self.ttl_secs, None)).await
                } => r,
            };
            let (id, ttl) = match grant {
                Ok(g) => (g.id(), Duration::from_secs(g.ttl().max(0) as u64)),
                Err(e) => {
                    self.unheard.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?self.backoff.peek(), "lease grant failed, retrying");
                    // Sooner when the watcher finds etcd reachable again.
                    let back = self.coord.inner.etcd_back_to_keeper.notified();
                    if !self.backoff.wait_or(&cancel, back).await {
                        return;
                    }
                    continue;
                }
            };
            self.backoff.reset();
            self.heard();
            self.set_valid(sent, ttl);
            self.coord.inner.session.send_modify(|s| {
                *s = Session {
                    lease: id,
                    generation: s.generation + 1,
                };
            });
            tracing::info!(lease = id, ttl = ?ttl, "lease granted");

            match self.keep_alive(id, ttl, &cancel).await {
                End::Cancelled => return,
                End::Expired => self.lost(id),
            }
        }
    }

    /// etcd no longer has lease `id`: every shard held under it may be someone else's now.
    fn lost(&self, id: i64) {
        let inner = &self.coord.inner;
        inner.metrics.leases_lost.inc();
        inner.table.lease().invalidate();
        inner.session.send_modify(|s| {
            *s = Session {
                lease: 0,
                generation: s.generation + 1,
            };
        });
        let dropped = inner.table.drop_all();
        for (shard, epoch) in &dropped {
            inner.listener.lost(*shard, *epoch);
        }
        inner.metrics.released.add(dropped.len() as u64);
        tracing::warn!(
            lease = id,
            dropped = dropped.len(),
            "lease expired; dropped all shards, rejoining"
        );
    }

    /// etcd answered: if it had not for a while, the watcher may be waiting out its
    /// back-off; it re-syncs now.
    fn heard(&self) {
        if self.unheard.swap(false, Ordering::Relaxed) {
            self.coord.inner.etcd_back_to_watcher.notify_one();
        }
    }

    /// Moves `valid_until` to `sent` + `ttl` − the safety margin.
    fn set_valid(&self, sent: Instant, ttl: Duration) {
        let inner = &self.coord.inner;
        let until = sent + ttl.saturating_sub(inner.opts.safety_margin());
        inner.table.lease().set_valid_until(until);
        inner.metrics.lease_slack.set(inner.table.lease().slack());
        inner.table.bump();
    }

    /// Sends a keepalive every TTL/3 without waiting for the earlier ones' answers (up to
    /// `MAX_UNANSWERED` on a stream), and counts each answer from its own keepalive's send
    /// time: an etcd whose answers take up to
    /// TTL − TTL/3 − the safety margin keeps the lease valid here too. Returns when etcd
    /// reports the lease expired (TTL ≤ 0) or on cancel; transport errors only reopen the
    /// stream, as the lease may well survive a short etcd outage.
    ///
    /// etcd answers a stream's keepalives one by one, in order, so each answer belongs to
    /// the oldest unanswered send of its stream. A stream whose oldest keepalive has been
    /// unanswered for TTL/3 (or half as long again as its slowest recent answer took, at
    /// most until a keepalive sent an interval later could no longer answer in time) is
    /// silent: another is opened to replace it, and the silent one is still read until
    /// its answers could no longer extend the lease. An opening's own keepalive counts
    /// too, from the opening's start (etcd renews a lease to its granted TTL).
    ///
    /// When the watcher finds etcd reachable again while keepalives are failing here,
    /// another stream is opened at once (a pending opening, sent while etcd was out of
    /// reach, may hang until its timeout): a lease that expired meanwhile is found gone,
    /// and re-granted, up to a keepalive interval sooner. The streams already open stay.
    async fn keep_alive(&self, id: i64, ttl: Duration, cancel: &CancellationToken) -> End {
        let interval = (ttl / 3).max(Duration::from_millis(100));
        // An answer to a keepalive sent longer ago than this no longer extends the lease.
        let useful = ttl.saturating_sub(self.coord.inner.opts.safety_margin());
        // How long a keepalive may stay unanswered before its stream counts as silent:
        // not past `useful` − an interval (the next keepalive, an interval later, must be
        // able to answer in time on a new stream), not below an interval.
        let patience = |latency: Duration| {
            (latency * 3 / 2)
                .min(useful.saturating_sub(interval))
                .max(interval)
        };
        let back = &self.coord.inner.etcd_back_to_keeper;
        let failing = || self.unheard.load(Ordering::Relaxed);
        let open = || async {
            let client = self.coord.client()?;
            self.coord.etcd(client.lease_client().keep_alive(id)).await
        };
        // Where keepalives are sent, and the stream it replaced while its answers may
        // still count.
        let mut current: Option<Lane> = None;
        let mut previous: Option<Lane> = None;
        let mut opening = Some((Instant::now(), Box::pin(open())));
        // The latest keepalive sent (an opening's included); the next is due an interval
        // later, or as soon as a stream is open if that has passed.
        let mut last_sent = Instant::now();
        loop {
            if previous.as_ref().is_some_and(|l| l.spent(useful)) {
                previous = None;
            }
            let due = last_sent + interval;
            let silent_at = current
                .as_ref()
                .filter(|l| !l.silent)
                .and_then(|l| l.silent_at(patience(l.latency)));
            tokio::select! {
                _ = cancel.cancelled() => return End::Cancelled,
                _ = back.notified(), if failing() => {
                    // An opening sent while etcd was out of reach may hang until its
                    // timeout: another goes now, unless the pending one is younger than an
                    // interval (wake-ups coming faster than an opening is answered would
                    // otherwise never let one finish). The streams stay (one may still
                    // answer).
                    if opening.as_ref().is_none_or(|(sent, _)| sent.elapsed() >= interval) {
                        tracing::info!(lease = id, "etcd reachable again; opening a keepalive stream");
                        opening = Some((Instant::now(), Box::pin(open())));
                    }
                }
                opened = async { opening.as_mut().expect("guarded").1.as_mut().await }, if opening.is_some() => {
                    let (sent, _) = opening.take().expect("guarded");
                    match opened {
                        Ok((sender, answers)) => {
                            self.heard();
                            self.set_valid(sent, ttl);
                            if current.as_ref().is_some_and(|l| !l.unanswered.is_empty()) {
                                previous = current.take();
                            }
                            current = Some(Lane::new(sender, answers, sent.elapsed()));
                        }
                        // Opening sends a first keepalive; etcd answers TTL 0 for a lease
                        // it no longer has, which the client reports as "lease not found".
                        // That lease is gone for good (it expired while etcd was out of
                        // reach).
                        Err(Error::Etcd(etcd_client::Error::LeaseKeepAliveError(e)))
                            if e.contains("not found") =>
                        {
                            self.heard();
                            return End::Expired;
                        }
                        Err(e) => {
                            if current.as_ref().is_none_or(|l| l.silent) {
                                self.unheard.store(true, Ordering::Relaxed);
                            }
                            tracing::warn!(lease = id, error = %e, "keepalive stream failed to open");
                        }
                    }
                }
                answer = Lane::next(&mut current) => {
                    if let Some(end) = self.answered(id, &mut current, answer) {
                        return end;
                    }
                    if current.is_none() {
                        // Its stream failed: another at once (each opening waits for an
                        // answer from etcd, so this cannot spin).
                        self.unheard.store(true, Ordering::Relaxed);
                        if opening.is_none() {
                            opening = Some((Instant::now(), Box::pin(open())));
                        }
                    }
                }
                answer = Lane::next(&mut previous) => {
                    if let Some(end) = self.answered(id, &mut previous, answer) {
                        return end;
                    }
                }
                _ = tokio::time::sleep_until(silent_at.unwrap_or(due).into()), if silent_at.is_some() => {
                    let lane = current.as_mut().expect("guarded");
                    lane.silent = true;
                    self.unheard.store(true, Ordering::Relaxed);
                    tracing::warn!(lease = id, unanswered = lane.unanswered.len(), "keepalive unanswered; opening another stream beside it");
                    if opening.is_none() {
                        opening = Some((Instant::now(), Box::pin(open())));
                    }
                }
                _ = tokio::time::sleep_until(due.into()), if current.is_some() || opening.is_none() => {
                    last_sent = Instant::now();
                    // A stream with this many unanswered is silent; more keepalives there
                    // add nothing.
                    if let Some(lane) = current.as_mut().filter(|l| l.unanswered.len() < MAX_UNANSWERED) {
                        if lane.sender.keep_alive().await.is_ok() {
                            lane.unanswered.push_back(last_sent);
                        } else {
                            tracing::warn!(lease = id, "keepalive stream ended");
                            self.unheard.store(true, Ordering::Relaxed);
                            current = None;
                        }
                    }
                    // No stream, or a silent one whose replacement failed to open: try
                    // again.
                    if opening.is_none() && current.as_ref().is_none_or(|l| l.silent) {
                        opening = Some((last_sent, Box::pin(open())));
                    }
                }
            }
        }
    }

    /// Applies an answer read on `lane`: moves the lease's validity, or ends the stream.
    /// Returns `Some(End::Expired)` when etcd says the lease is gone.
    fn answered(
        &self,
        id: i64,
        lane: &mut Option<Lane>,
        answer: Option<Result<LeaseKeepAliveResponse, etcd_client::Error>>,
    ) -> Option<End> {
        match answer {
            Some(Ok(resp)) if resp.ttl() > 0 => {
                self.heard();
                let l = lane.as_mut().expect("read from an open stream");
                match l.unanswered.pop_front() {
                    Some(sent) => {
                        // Slow answers count at once, fast ones bring it down gradually:
                        // an etcd whose answers vary is not taken for silent each time
                        // one is slower than the last.
                        l.latency = sent.elapsed().max(l.latency * 3 / 4);
                        self.set_valid(sent, Duration::from_secs(resp.ttl() as u64));
                    }
                    // Never sent here: nothing says when etcd renewed the lease.
                    None => {
                        tracing::warn!(lease = id, "keepalive answer without a keepalive; ignored")
                    }
                }
                None
            }
            Some(Ok(_)) => {
                self.heard();
                Some(End::Expired)
            }
            Some(Err(e)) => {
                tracing::warn!(lease = id, error = %e, "keepalive failed");
                *lane = None;
                None
            }
            None => {
                tracing::warn!(lease = id, "keepalive stream closed");
                *lane = None;
                None
            }
        }
    }
}

/// At most this many keepalives wait for an answer on one stream. They go an interval
/// (TTL/3) apart and a stream is silent once its oldest has waited at most
/// 2 × interval − margin, so by the fourth a replacement is already opening.
const MAX_UNANSWERED: usize = 3;

/// One keepalive stream and the send times of its unanswered keepalives, oldest first.
struct Lane {
    sender: KeepAliveSender,
    answers: LeaseKeepAliveStream,
    unanswered: VecDeque<Instant>,
    /// Found silent: another stream is opened to replace it (it is still read).
    silent: bool,
    /// How long its answers (and its opening) took: the slowest recent one.
    latency: Duration,
}

impl Lane {
    fn new(sender: KeepAliveSender, answers: LeaseKeepAliveStream, latency: Duration) -> Self {
        Lane {
            sender,
            answers,
            unanswered: VecDeque::new(),
            silent: false,
            latency,
        }
    }

    /// The next answer on `lane`; never, without one.
    async fn next(
        lane: &mut Option<Lane>,
    ) -> Option<Result<LeaseKeepAliveResponse, etcd_client::Error>> {
        match lane {
            Some(l) => l.answers.next().await,
            None => std::future::pending().await,
        }
    }

    /// When it counts as silent: a keepalive unanswered for `patience`, even while the
    /// ones before it were answered (an etcd renewing slowly answers each in turn, later
    /// and later, while the lease lapses here; a new stream's opening counts at once).
    fn silent_at(&self, patience: Duration) -> Option<Instant> {
        Some(*self.unanswered.front()? + patience)
    }

    /// Nothing left to wait for: every keepalive answered, or the oldest sent so long ago
    /// that its answer would no longer extend the lease.
    fn spent(&self, useful: Duration) -> bool {
        self.unanswered
            .front()
            .is_none_or(|sent| sent.elapsed() >= useful)
    }
}
