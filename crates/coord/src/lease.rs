//! The lease keeper: one etcd lease per instance, kept alive by hand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper as KeepAliveSender};
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

    /// Sends a keepalive every TTL/3 and reads its answer. Returns when etcd reports the
    /// lease expired (TTL ≤ 0) or on cancel; transport errors only reopen the stream, as
    /// the lease may well survive a short etcd outage.
    ///
    /// When the watcher finds etcd reachable again while keepalives are failing here, a
    /// pending attempt (sent while etcd was out of reach, it may hang until its timeout) is
    /// dropped and the stream reopened at once: a lease that expired meanwhile is found
    /// gone, and re-granted, up to a keepalive interval sooner. A stream that answers is
    /// never dropped for it. Dropping a round always drops its stream too, so no answer to
    /// an abandoned keepalive is ever read as the answer to a later one.
    async fn keep_alive(&self, id: i64, ttl: Duration, cancel: &CancellationToken) -> End {
        let interval = (ttl / 3).max(Duration::from_millis(100));
        let back = &self.coord.inner.etcd_back_to_keeper;
        let failing = || self.unheard.load(Ordering::Relaxed);
        let mut stream: Option<(KeepAliveSender, LeaseKeepAliveStream)> = None;
        loop {
            let sent = Instant::now();
            if stream.is_none() {
                let opened = async {
                    let client = self.coord.client()?;
                    self.coord.etcd(client.lease_client().keep_alive(id)).await
                };
                let opened = tokio::select! {
                    _ = cancel.cancelled() => return End::Cancelled,
                    _ = back.notified(), if failing() => {
                        tracing::info!(lease = id, "etcd reachable again; reopening the keepalive stream");
                        continue;
                    }
                    r = opened => r,
                };
                match opened {
                    Ok(s) => stream = Some(s),
                    // Opening sends a first keepalive; etcd answers TTL 0 for a lease it
                    // no longer has, which the client reports as "lease not found". That
                    // lease is gone for good (it expired while etcd was out of reach).
                    Err(Error::Etcd(etcd_client::Error::LeaseKeepAliveError(e)))
                        if e.contains("not found") =>
                    {
                        self.heard();
                        return End::Expired;
                    }
                    Err(e) => {
                        self.unheard.store(true, Ordering::Relaxed);
                        tracing::warn!(lease = id, error = %e, "keepalive stream failed to open")
                    }
                }
            }
            if let Some((keeper, answers)) = stream.as_mut() {
                let round = async {
                    keeper.keep_alive().await?;
                    answers.message().await
                };
                let answer = tokio::select! {
                    _ = cancel.cancelled() => return End::Cancelled,
                    _ = back.notified(), if failing() => {
                        tracing::info!(lease = id, "etcd reachable again; reopening the keepalive stream");
                        stream = None;
                        continue;
                    }
                    r = tokio::time::timeout(interval, round) => r,
                };
                match answer {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        self.heard();
                        self.set_valid(sent, Duration::from_secs(resp.ttl() as u64));
                    }
                    Ok(Ok(Some(_))) => {
                        self.heard();
                        return End::Expired;
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(lease = id, "keepalive stream closed");
                        stream = None;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(lease = id, error = %e, "keepalive failed");
                        stream = None;
                    }
                    Err(_) => {
                        tracing::warn!(lease = id, "keepalive unanswered");
                        stream = None;
                    }
                }
                if stream.is_none() {
                    self.unheard.store(true, Ordering::Relaxed);
                }
            }
            let next = sent + interval;
            tokio::select! {
                _ = cancel.cancelled() => return End::Cancelled,
                _ = back.notified(), if stream.is_none() && failing() => {}
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }
}
