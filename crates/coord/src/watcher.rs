//! The routing-table watcher: snapshot, then watch from the snapshot's revision.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::view::Put;
use crate::{Coord, Error, View};

/// The first wait before a new snapshot after a lost watch.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// A watch that held this long resets the back-off when it is lost.
const STABLE_WATCH: Duration = Duration::from_secs(5);

/// Keeps the routing table: publishes a snapshot of the cluster's keys, then every watch
/// event after it; on a lost or cancelled watch marks the table unsynced and starts over.
pub(crate) struct Watcher {
    coord: Coord,
    /// Between failed snapshots.
    backoff: Backoff,
}

impl Watcher {
    pub(crate) fn new(coord: Coord) -> Self {
        Self {
            coord,
            backoff: Backoff::new(FIRST_RETRY, Duration::from_secs(2)),
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut lost = false;
        loop {
            let synced_before = self.coord.inner.view.borrow().synced;
            let started = Instant::now();
            match self.sync(&cancel, lost).await {
                Ok(()) => return,
                Err(e) => {
                    if synced_before {
                        self.coord
                            .inner
                            .view
                            .send_modify(|v| Arc::make_mut(v).synced = false);
                    }
                    // The back-off counts failures in a row: a watch that held for a
                    // while was a success (one that fails right after each snapshot,
                    // e.g. on a member without a leader, is not).
                    if started.elapsed() >= STABLE_WATCH {
                        self.backoff.reset();
                    }
                    tracing::warn!(error = %e, retry_in = ?self.backoff.peek(), "routing table watch lost; taking a new snapshot");
                    lost = true;
                }
            }
            // Sooner when the lease keeper hears from etcd again, yet never more often
            // than the back-off's first step.
            let back = async {
                self.coord.inner.etcd_back_to_watcher.notified().await;
                tokio::time::sleep(FIRST_RETRY).await;
            };
            if !self.backoff.wait_or(&cancel, back).await {
                return;
            }
        }
    }

    /// Loads a snapshot, publishes it, then applies watch events until an error. After a
    /// lost watch (`after_loss`), a snapshot read means etcd is reachable again: the lease
    /// keeper is told, as its lease may have expired meanwhile.
    async fn sync(&self, cancel: &CancellationToken, after_loss: bool) -> Result<(), Error> {
        let keys = &self.coord.inner.keys;
        let mut client = self.coord.client()?;
        let snapshot = self
            .coord
            .etcd(client.get(keys.prefix(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut view = View::empty(self.coord.inner.opts.shard_count);
        // Load reports last: a report counts only for shards its member owns in the view.
        let is_load = |kv: &&etcd_client::KeyValue| {
            matches!(keys.parse(kv.key()), Some(crate::keys::Key::Load(_)))
        };
        for kv in snapshot.kvs().iter().filter(|kv| !is_load(kv)) {
            view.apply(keys, kv.key(), Some(Put::of(kv)));
        }
        for kv in snapshot.kvs().iter().filter(is_load) {
            view.apply(keys, kv.key(), Some(Put::of(kv)));
        }
        view.revision = snapshot.header().map_or(0, |h| h.revision());
        view.synced = true;
        if after_loss {
            // One stored permit at most: the keeper takes it on its next wait.
            self.coord.inner.etcd_back_to_keeper.notify_one();
        }
        self.coord.inner.metrics.watch_resyncs.inc();
        tracing::info!(
            revision = view.revision,
            members = view.members.len(),
            "routing table synced"
        );
        self.publish(&view);

        let options = WatchOptions::new()
            .with_prefix()
            .with_progress_notify()
            .with_start_revision(view.revision + 1);
        let mut stream = self
            .coord
            .etcd(client.watch(keys.prefix(), Some(options)))
            .await?;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = stream.message() => m?,
            };
            let mut changed = self.apply(msg, &mut view)?;
            // Apply the responses already received before publishing once: in a burst
            // (a cluster starting, a member draining) each publish wakes every reader.
            // At most 256, so a stream that never runs dry still publishes and yields.
            for _ in 0..256 {
                let Some(msg) = futures::FutureExt::now_or_never(stream.message()) else {
                    break;
                };
                changed |= self.apply(msg?, &mut view)?;
            }
            if changed {
                self.publish(&view);
            }
        }
    }

    /// Applies one watch response to `view`; true when the view changed (events or a
    /// progress notification that moved its revision).
    fn apply(
        &self,
        msg: Option<etcd_client::WatchResponse>,
        view: &mut View,
    ) -> Result<bool, Error> {
        let keys = &self.coord.inner.keys;
        let Some(resp) = msg else {
            return Err(Error::Other("watch stream closed".into()));
        };
        if resp.canceled() {
            return Err(Error::Other(format!(
                "watch cancelled (compact revision {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        if resp.created() {
            // The reply that confirms the watch: its header carries etcd's current
            // revision, not how far the events sent so far go.
            return Ok(false);
        }
        if resp.events().is_empty() {
            // A progress notification: every event up to its header revision was sent.
            return Ok(
                match resp.header().filter(|h| h.revision() > view.revision) {
                    Some(h) => {
                        view.revision = h.revision();
                        true
                    }
                    None => false,
                },
            );
        }
        // Only the events say how far the view got: a response's header revision can
        // run ahead of events still to come in later responses, and the reconciler
        // trusts `view.revision` to decide that a shard key it does not see is gone.
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let put = match ev.event_type() {
                EventType::Put => Some(Put::of(kv)),
                EventType::Delete => None,
            };
            view.apply(keys, kv.key(), put);
            view.revision = view.revision.max(kv.mod_revision());
        }
        Ok(true)
    }

    fn publish(&self, view: &View) {
        self.coord.inner.view.send_replace(Arc::new(view.clone()));
        self.coord.inner.table.bump();
    }
}
