//! The routing-table watcher: snapshot, then watch from the snapshot's revision.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::view::Put;
use crate::{Coord, Error, View};

impl Coord {
    pub(crate) async fn watcher(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let synced_before = self.inner.view.borrow().synced;
            match self.sync(&cancel).await {
                Ok(()) => return,
                Err(e) => {
                    if synced_before {
                        self.inner
                            .view
                            .send_modify(|v| Arc::make_mut(v).synced = false);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "routing table watch lost; taking a new snapshot");
                }
            }
            if !backoff.wait(&cancel).await {
                return;
            }
        }
    }

    /// Loads a snapshot, publishes it, then applies watch events until an error.
    async fn sync(&self, cancel: &CancellationToken) -> Result<(), Error> {
        let keys = &self.inner.keys;
        let mut client = self.client()?;
        let snapshot = self
            .etcd(client.get(keys.prefix(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut view = View::empty(self.inner.opts.shard_count);
        for kv in snapshot.kvs() {
            view.apply(keys, kv.key(), Some(Put::of(kv)));
        }
        view.revision = snapshot.header().map_or(0, |h| h.revision());
        view.synced = true;
        self.inner.metrics.watch_resyncs.inc();
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
            .etcd(client.watch(keys.prefix(), Some(options)))
            .await?;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = stream.message() => m?,
            };
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
                continue;
            }
            if resp.events().is_empty() {
                // A progress notification: every event up to its header revision was sent.
                if let Some(h) = resp.header().filter(|h| h.revision() > view.revision) {
                    view.revision = h.revision();
                    self.publish(&view);
                }
                continue;
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
            self.publish(&view);
        }
    }

    fn publish(&self, view: &View) {
        self.inner.view.send_replace(Arc::new(view.clone()));
        self.inner.table.bump();
    }
}
