//! Coordination through etcd: who owns which shard, and how that changes.
//!
//! One [`Coord`] per instance runs three tasks, each a struct owning its state with a
//! `run(self, cancel)` that [`Coord::run`] supervises:
//! - the **lease keeper** (`lease::LeaseKeeper`) holds one etcd lease for the instance and
//!   keeps [`LeaseClock::valid_until`] current; when etcd reports the lease gone it drops
//!   every shard and takes a new lease;
//! - the **watcher** (`watcher::Watcher`) keeps the routing table ([`View`]) from a
//!   snapshot plus a watch, and resynchronises from a new snapshot when the watch is
//!   cancelled or compacted;
//! - the **reconciler** (`reconcile::Reconciler`) registers the member, campaigns for
//!   leadership, plans on the leader, acquires shards assigned here and hands off shards
//!   assigned elsewhere.
//!
//! Ownership is decided only by etcd transactions on `create_revision == 0`, so two
//! instances with stale views can never both own a shard.

mod backoff;
mod claims;
mod keys;
mod lease;
mod reconcile;
mod table;
mod view;
mod watcher;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use leasehold_metrics::{Counter, Gauge, Histogram, Registry};
use leasehold_types::{Epoch, MemberId, ShardId};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
pub use crate::claims::{claim, claim_value, Claim, ClaimMode};
pub use crate::keys::{
    ClusterConfig, KafkaHealthValue, KafkaSide, KafkaSideValue, Keys, LoadReport, MemberState,
    PartitionRef, PlacementValue,
};
use crate::lease::LeaseKeeper;
use crate::reconcile::Reconciler;
pub use crate::table::{Blocked, CallGuard, LeaseClock, LocalState, ShardTable};
pub use crate::view::{Member, PeerAddress, ShardLoad, ShardOwner, View, CALL_COST_SECONDS};
use crate::watcher::Watcher;

/// Errors of the coordination layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error(
        "cluster {cluster:?} in etcd has shard_count {stored_shards} and hash_version {stored_hash}, \
         this instance is configured with shard_count {shards} and hash_version {hash}; \
         shard count and hash cannot change for an existing cluster"
    )]
    ConfigMismatch {
        cluster: String,
        stored_shards: u32,
        stored_hash: u32,
        shards: u32,
        hash: u32,
    },
    #[error("member {0:?} is not registered")]
    UnknownMember(String),
    /// A placement request that cannot be applied (shard out of range, draining member).
    #[error("{0}")]
    Refused(String),
    #[error("not connected to etcd yet")]
    NotConnected,
    /// An essential task ended (or panicked) while the instance was running.
    #[error("the {task} stopped unexpectedly: {why}")]
    TaskEnded { task: &'static str, why: String },
    #[error("{0}")]
    Other(String),
}

/// Why an instance is not ready (`/readyz` 503): it takes no calls from a load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("waiting for the handler to answer")]
    AwaitingHandler,
    #[error("routing table not synced")]
    NotSynced,
    #[error("member not registered")]
    NotRegistered,
    #[error("lease not valid")]
    LeaseInvalid,
    #[error("draining")]
    Draining,
}

/// Why an instance is not live (`/healthz` 503): only a restart helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// An essential coordination task ended.
    #[error("{0}")]
    Stopped(String),
    /// The reconciler has not passed its loop for this long.
    #[error("the reconciler has not run for {0:?}")]
    Stalled(Duration),
}

/// Settings of the coordination layer.
#[derive(Debug, Clone)]
pub struct CoordOptions {
    pub cluster: String,
    pub member_id: MemberId,
    /// Client address (what Locate returns).
    pub address: String,
    pub admin_address: String,
    /// Where peers forward calls to this instance.
    pub peer_address: String,
    /// The identity this instance's peer certificate proves (empty without peer TLS).
    pub peer_identity: String,
    pub etcd_endpoints: Vec<String>,
    /// etcd user name and password, when etcd authentication is enabled.
    pub etcd_user: Option<(String, String)>,
    /// TLS to `https://` endpoints: the CA, and a client certificate and key (PEM).
    pub etcd_tls: Option<EtcdTls>,
    pub shard_count: u32,
    pub lease_ttl: Duration,
    /// How many owned shards the leader moves at once.
    pub max_moves: usize,
    /// Balance reported load within this fraction of the mean (`Some(0.1)` = ±10 %) when
    /// this instance leads; `None`: balance shard counts.
    pub load_tolerance: Option<f64>,
    pub version: String,
}

impl CoordOptions {
    /// Time subtracted from a keepalive's granted TTL when computing `valid_until`.
    pub fn safety_margin(&self) -> Duration {
        (self.lease_ttl / 5).max(Duration::from_millis(200))
    }

    /// Time allowed for one etcd request.
    fn op_timeout(&self) -> Duration {
        self.lease_ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(5))
    }
}

/// PEM material for TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Notified when this instance gains or loses a shard (the handler's hooks).
pub trait ShardListener: Send + Sync + 'static {
    /// About to own the shard: called before calls can start under `epoch`. When the
    /// ownership does not take effect after all (the lease was lost meanwhile),
    /// [`ShardListener::lost`] follows.
    fn acquired(&self, shard: ShardId, epoch: Epoch);
    /// A planned release: no call runs for the shard and none will start here; the shard
    /// key is deleted (and the next owner can take it) once the future resolves. The
    /// listener bounds its own wait.
    fn releasing(&self, shard: ShardId, epoch: Epoch) -> futures::future::BoxFuture<'static, ()>;
    /// The shard is gone without a planned release (lease expired, key replaced).
    fn lost(&self, shard: ShardId, epoch: Epoch);
}

/// A listener that ignores everything.
pub struct NoListener;

impl ShardListener for NoListener {
    fn acquired(&self, _: ShardId, _: Epoch) {}
    fn releasing(&self, _: ShardId, _: Epoch) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(futures::future::ready(()))
    }
    fn lost(&self, _: ShardId, _: Epoch) {}
}

/// The lease this instance currently holds. `generation` grows on every grant and loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    pub lease: i64,
    pub generation: u64,
}

struct Metrics {
    shards_owned: Arc<Gauge>,
    lease_slack: Arc<Gauge>,
    handoff: Arc<Histogram>,
    acquired: Arc<Counter>,
    released: Arc<Counter>,
    leases_lost: Arc<Counter>,
    watch_resyncs: Arc<Counter>,
    unowned: Arc<Gauge>,
    is_leader: Arc<Gauge>,
    assignment_version: Arc<Gauge>,
    ready: Arc<Gauge>,
    members: Arc<Gauge>,
}

impl Metrics {
    fn new(r: &Registry) -> Self {
        Self {
            shards_owned: r.gauge("leasehold_shards_owned", "Shards this instance owns.", &[]),
            lease_slack: r.gauge(
                "leasehold_lease_slack_seconds",
                "Time left until the lease's valid_until at the last keepalive (negative: expired).", &[],
            ),
            handoff: r.histogram("leasehold_handoff_duration_seconds", "Time to hand off one shard.", &[]),
            acquired: r.counter("leasehold_shard_acquisitions_total", "Shards acquired.", &[]),
            released: r.counter("leasehold_shard_releases_total", "Shards released or lost.", &[]),
            leases_lost: r.counter("leasehold_leases_lost_total", "Leases etcd reported expired.", &[]),
            watch_resyncs: r.counter("leasehold_watch_resyncs_total", "Routing table snapshots taken.", &[]),
            unowned: r.gauge(
                "leasehold_unowned_shards",
                "Shards without an owner in this instance's routing table.",
                &[],
            ),
            is_leader: r.gauge(
                "leasehold_is_leader",
                "1 on the instance the routing table names leader (it writes the assignment), else 0.",
                &[],
            ),
            assignment_version: r.gauge(
                "leasehold_assignment_version",
                "Version of the assignment in this instance's routing table (0: none yet).",
                &[],
            ),
            ready: r.gauge(
                "leasehold_ready",
                "1 while this instance is ready (registered, routing table synced, lease valid, not draining), else 0.",
                &[],
            ),
            members: r.gauge(
                "leasehold_members",
                "Members registered in this instance's routing table.",
                &[],
            ),
        }
    }
}

struct Inner {
    opts: CoordOptions,
    keys: Keys,
    table: Arc<ShardTable>,
    /// Set once connected; replaced when etcd's TLS files change.
    client: std::sync::RwLock<Option<Client>>,
    /// TLS to etcd as currently configured (starts as `opts.etcd_tls`).
    etcd_tls: std::sync::RwLock<Option<EtcdTls>>,
    view: watch::Sender<Arc<View>>,
    session: watch::Sender<Session>,
    draining: AtomicBool,
    /// Set until the handler first answers; no shard is taken before.
    awaiting_handler: AtomicBool,
    /// When etcd last refused a batch of shard keys (its `--max-txn-ops` is lower than a
    /// batch needs): for 10 minutes after it, acquisitions write their
    /// shards one by one from the start instead of paying a refused round trip per batch
    /// at every pass; then batches are tried again (the limit may have been raised).
    batches_refused: Mutex<Option<Instant>>,
    wake: Notify,
    /// Notified when the watcher re-synced after losing its watch: etcd answers again, so
    /// the lease keeper retries at once instead of at its next keepalive tick.
    etcd_back_to_keeper: Notify,
    /// Notified when the lease keeper hears from etcd again after failing to: the watcher
    /// takes its snapshot at once instead of at the end of its back-off.
    etcd_back_to_watcher: Notify,
    liveness: Liveness,
    listener: Arc<dyn ShardListener>,
    metrics: Metrics,
    /// Work started in the background (handoffs), awaited at shutdown.
    tasks: tokio_util::task::TaskTracker,
}

/// Handle to the coordination layer. Cheap to clone.
#[derive(Clone)]
pub struct Coord {
    inner: Arc<Inner>,
}

impl Coord {
    pub fn new(opts: CoordOptions, listener: Arc<dyn ShardListener>, registry: &Registry) -> Self {
        let lease = Arc::new(LeaseClock::default());
        let table = Arc::new(ShardTable::new(opts.shard_count, lease));
        Self {
            inner: Arc::new(Inner {
                keys: Keys::new(&opts.cluster),
                view: watch::channel(Arc::new(View::empty(opts.shard_count))).0,
                session: watch::channel(Session::default()).0,
                table,
                client: std::sync::RwLock::new(None),
                etcd_tls: std::sync::RwLock::new(opts.etcd_tls.clone()),
                draining: AtomicBool::new(false),
                awaiting_handler: AtomicBool::new(true),
                batches_refused: Mutex::new(None),
                wake: Notify::new(),
                etcd_back_to_keeper: Notify::new(),
                etcd_back_to_watcher: Notify::new(),
                liveness: Liveness::default(),
                listener,
                metrics: Metrics::new(registry),
                tasks: tokio_util::task::TaskTracker::new(),
                opts,
            }),
        }
    }

    pub fn options(&self) -> &CoordOptions {
        &self.inner.opts
    }

    /// Background work of this layer (handoffs in progress); close and await it at
    /// shutdown, before the lease is revoked.
    pub fn tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.tasks
    }

    pub fn member_id(&self) -> &MemberId {
        &self.inner.opts.member_id
    }

    pub fn table(&self) -> &Arc<ShardTable> {
        &self.inner.table
    }

    /// The current routing table.
    pub fn view(&self) -> Arc<View> {
        self.inner.view.borrow().clone()
    }

    pub fn subscribe_view(&self) -> watch::Receiver<Arc<View>> {
        self.inner.view.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Ready = registered in the routing table, table synced, lease valid.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.inner.awaiting_handler.load(Ordering::Acquire) {
            return Err(NotReady::AwaitingHandler);
        }
        let view = self.view();
        if !view.synced {
            return Err(NotReady::NotSynced);
        }
        if !view.members.contains_key(self.member_id()) {
            return Err(NotReady::NotRegistered);
        }
        if self.table().lease().valid_until().is_none() {
            return Err(NotReady::LeaseInvalid);
        }
        if self.is_draining() {
            return Err(NotReady::Draining);
        }
        Ok(())
    }

    /// Live = the coordination tasks run and the reconciler passes its loop (`/healthz`).
    /// Waiting for etcd is live; a stopped task or a loop stuck for minutes is not, and
    /// only a restart helps then.
    pub fn liveness(&self) -> Result<(), Unhealthy> {
        self.inner.liveness.check(Instant::now())
    }

    /// Connects to etcd (retrying with backoff until `cancel`), checks the cluster config,
    /// then runs the keeper, watcher and reconciler until `cancel`. Any of them ending
    /// before `cancel` (a panic, say) ends `run` with [`Error::TaskEnded`]: an instance
    /// without one of them would stay up but never serve again.
    ///
    /// The reconciler (which registers the member and takes shards) starts only once
    /// `handler_ready` resolves; the routing table is kept meanwhile, so calls accepted
    /// here are forwarded to the owners.
    pub async fn run(
        self,
        cancel: CancellationToken,
        handler_ready: futures::future::BoxFuture<'static, ()>,
    ) -> Result<(), Error> {
        let Some(client) = self.connect(&cancel).await? else {
            return Ok(());
        };
        *self.inner.client.write().expect("client lock") = Some(client);
        use futures::FutureExt;
        use tracing::Instrument;
        let member = self.member_id().clone();
        let reconciler = {
            let (this, cancel) = (self.clone(), cancel.clone());
            async move {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = handler_ready => {}
                }
                this.inner.awaiting_handler.store(false, Ordering::Release);
                Reconciler::new(this).run(cancel).await
            }
        };
        let tasks: Vec<(&'static str, futures::future::BoxFuture<'static, ()>)> = vec![
            (
                "lease keeper",
                LeaseKeeper::new(self.clone())
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("lease_keeper", %member))
                    .boxed(),
            ),
            (
                "routing table watcher",
                Watcher::new(self.clone())
                    .run(cancel.clone())
                    .instrument(tracing::info_span!("watcher", %member))
                    .boxed(),
            ),
            (
                "reconciler",
                reconciler
                    .instrument(tracing::info_span!("reconciler", %member))
                    .boxed(),
            ),
        ];
        let result = supervise(tasks, &cancel).await;
        if let Err(e) = &result {
            self.inner.liveness.stopped(e.to_string());
        }
        result
    }

    async fn connect(&self, cancel: &CancellationToken) -> Result<Option<Client>, Error> {
        let opts = &self.inner.opts;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = async {
                let connect = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
                    .with_keep_alive_while_idle(true)
                    // A member cut off from its cluster has no leader: with this, it
                    // refuses requests and cancels watches ("no leader") instead of
                    // serving a frozen routing table that still looks synced.
                    .with_require_leader(true)
                    // etcd's auth tokens expire (simple tokens after 5 idle minutes, all of
                    // them on an etcd restart); authenticate again instead of failing.
                    .with_auto_token_refresh(true);
                let connect = match &opts.etcd_user {
                    Some((user, password)) => connect.with_user(user, password),
                    None => connect,
                };
                let tls = self.inner.etcd_tls.read().expect("tls lock").clone();
                let connect = match &tls {
                    Some(tls) => {
                        use etcd_client::{Certificate, Identity, TlsOptions};
                        let mut t =
                            TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
                        if let Some((cert, key)) = &tls.identity {
                            t = t.identity(Identity::from_pem(cert, key));
                        }
                        connect.with_tls(t)
                    }
                    None => connect,
                };
                let client = Client::connect(&opts.etcd_endpoints, Some(connect)).await?;
                self.ensure_config(client.clone()).await?;
                Ok::<_, Error>(client)
            };
            let result = tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                r = tokio::time::timeout(opts.op_timeout(), attempt) => r.unwrap_or(Err(Error::Timeout(opts.op_timeout()))),
            };
            match result {
                Ok(client) => {
                    tracing::info!(endpoints = ?opts.etcd_endpoints, cluster = %opts.cluster, "connected to etcd");
                    return Ok(Some(client));
                }
                Err(e @ Error::ConfigMismatch { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoints = ?opts.etcd_endpoints, error = %e, retry_in = ?backoff.peek(), "etcd unreachable, retrying");
                }
            }
            if !backoff.wait(cancel).await {
                return Ok(None);
            }
        }
    }

    /// New TLS material for etcd (its files changed): connects with it and, once that
    /// works, uses the new connection for every later request. Streams open on the old
    /// connection (the lease keepalive, the watch) move over when they next reopen. On
    /// failure the old connection stays in use.
    pub async fn reload_etcd_tls(&self, tls: EtcdTls) {
        *self.inner.etcd_tls.write().expect("tls lock") = Some(tls);
        let once = CancellationToken::new();
        let attempt = async {
            // One attempt (connect retries forever): cancel it after the op timeout.
            let t = self.inner.opts.op_timeout();
            tokio::time::timeout(t + Duration::from_secs(1), self.connect(&once)).await
        };
        match attempt.await {
            Ok(Ok(Some(client))) => {
                *self.inner.client.write().expect("client lock") = Some(client);
                tracing::info!("etcd TLS files changed; reconnected with them");
            }
            _ => tracing::warn!(
                "etcd TLS files changed but a connection with them failed; keeping the current one"
            ),
        }
    }

    /// Writes the cluster config if absent, else checks it matches ours.
    async fn ensure_config(&self, mut client: Client) -> Result<(), Error> {
        let opts = &self.inner.opts;
        let ours = ClusterConfig::new(opts.shard_count);
        let key = self.inner.keys.config();
        let value = serde_json::to_vec(&ours).expect("config serialises");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                if let Some(kv) = get.kvs().first() {
                    let stored: ClusterConfig =
                        serde_json::from_slice(kv.value()).map_err(|e| {
                            Error::Other(format!("unreadable cluster config in etcd: {e}"))
                        })?;
                    if stored != ours {
                        return Err(Error::ConfigMismatch {
                            cluster: opts.cluster.clone(),
                            stored_shards: stored.shard_count,
                            stored_hash: stored.hash_version,
                            shards: ours.shard_count,
                            hash: ours.hash_version,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn client(&self) -> Result<Client, Error> {
        self.inner
            .client
            .read()
            .expect("client lock")
            .clone()
            .ok_or(Error::NotConnected)
    }

    /// Runs one etcd request with the operation timeout.
    async fn etcd<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        let t = self.inner.opts.op_timeout();
        tokio::time::timeout(t, f)
            .await
            .map_err(|_| Error::Timeout(t))?
            .map_err(Error::from)
    }

    /// Claims a Kafka partition for this instance's consumer, assigned to it in the
    /// group's `generation` of the source's `epoch` (see [`claim_value`], [`claim`] and
    /// [`ClaimMode`]).
    pub async fn claim_partition(
        &self,
        partition: &PartitionRef,
        epoch: u64,
        generation: i32,
        mode: ClaimMode,
    ) -> Result<Claim, Error> {
        let key = self.inner.keys.kafka_fence(partition);
        let value = claim_value(epoch, generation, self.member_id());
        let mut client = self.client()?;
        self.etcd(claim(&mut client, key, epoch, value, mode)).await
    }

    /// Marks a member draining so the leader moves all its shards away.
    pub async fn drain_member(&self, id: &MemberId) -> Result<Member, Error> {
        if id == self.member_id() {
            self.start_draining().await?;
        } else {
            let view = self.view();
            let member = view
                .members
                .get(id)
                .ok_or_else(|| Error::UnknownMember(id.to_string()))?;
            let key = self.inner.keys.member(id);
            let value = keys::MemberValue {
                address: member.address.clone(),
                admin_address: member.admin_address.clone(),
                peer_address: member.peer.address.clone(),
                peer_identity: member.peer.identity.clone(),
                state: MemberState::Draining,
                version: String::new(),
            };
            let txn = Txn::new()
                .when([Compare::lease(key.clone(), CompareOp::Equal, member.lease)])
                .and_then([TxnOp::put(
                    key,
                    serde_json::to_vec(&value).expect("member serialises"),
                    Some(PutOptions::new().with_lease(member.lease)),
                )]);
            let mut client = self.client()?;
            if !self.etcd(client.txn(txn)).await?.succeeded() {
                return Err(Error::UnknownMember(id.to_string()));
            }
        }
        let mut member = self
            .view()
            .members
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownMember(id.to_string()))?;
        member.state = MemberState::Draining;
        Ok(member)
    }

    /// Pins `shard` to `member` (`Some`) or removes its pin (`None`). The member must be
    /// registered and active; the leader moves the shard through a planned handoff.
    pub async fn pin(
        &self,
        shard: ShardId,
        member: Option<MemberId>,
    ) -> Result<PlacementValue, Error> {
        let view = self.view();
        match &member {
            Some(m) => self.check_placement_target(&view, shard, m)?,
            None if !view.synced => {
                return Err(Error::Other(
                    "this instance has not synced its routing table with etcd yet; try again"
                        .into(),
                ))
            }
            None if shard.0 >= view.shard_count() => {
                return Err(Error::Refused(format!(
                    "shard {shard} is out of range (the cluster has {} shards)",
                    view.shard_count()
                )))
            }
            None => {}
        }
        self.update_placement(|p| match &member {
            Some(m) => {
                // The pin decides from now on: a pending one-shot move of the shard is void.
                p.moves.remove(&shard.0);
                p.pins.insert(shard.0, m.clone());
            }
            None => {
                p.pins.remove(&shard.0);
            }
        })
        .await
    }

    /// Moves a shard to a member once: the leader assigns it there (a planned handoff) and
    /// forgets the request when it got there; afterwards the shard is balanced like any
    /// other. Refused for a pinned shard (the pin decides).
    pub async fn move_shard(
        &self,
        shard: ShardId,
        member: MemberId,
    ) -> Result<PlacementValue, Error> {
        let view = self.view();
        self.check_placement_target(&view, shard, &member)?;
        if let Some(pinned) = view.placement.pins.get(&shard.0) {
            if *pinned != member {
                return Err(Error::Refused(format!(
                    "shard {shard} is pinned to {pinned}; unpin it first, or pin it to {member}"
                )));
            }
        }
        self.update_placement(|p| {
            p.moves.insert(shard.0, member.clone());
        })
        .await
    }

    /// The checks a pin or a move must pass: a synced view, the shard in range, the member
    /// active.
    fn check_placement_target(
        &self,
        view: &View,
        shard: ShardId,
        member: &MemberId,
    ) -> Result<(), Error> {
        if !view.synced {
            return Err(Error::Other(
                "this instance has not synced its routing table with etcd yet; try again".into(),
            ));
        }
        if shard.0 >= view.shard_count() {
            return Err(Error::Refused(format!(
                "shard {shard} is out of range (the cluster has {} shards, 0..{})",
                view.shard_count(),
                view.shard_count() - 1
            )));
        }
        match view.members.get(member) {
            None => Err(Error::UnknownMember(member.to_string())),
            Some(info) if info.state != MemberState::Active => Err(Error::Refused(format!(
                "member {member:?} is draining and cannot take shards"
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Publishes this member's view of a failover source's primary
    /// (`kafka-health/<id>/<source>`, on its lease), unless `last` says it is there
    /// already under the current lease.
    pub async fn report_kafka_health(
        &self,
        source: &str,
        value: &KafkaHealthValue,
        last: &mut Option<(i64, KafkaHealthValue)>,
    ) -> Result<(), Error> {
        let session = *self.inner.session.borrow();
        if session.lease == 0 {
            return Err(Error::Other("no lease yet".into()));
        }
        if last
            .as_ref()
            .is_some_and(|(lease, v)| *lease == session.lease && v == value)
        {
            return Ok(());
        }
        let mut client = self.client()?;
        self.etcd(client.put(
            self.inner.keys.kafka_health(self.member_id(), source),
            serde_json::to_vec(value).expect("health serialises"),
            Some(PutOptions::new().with_lease(session.lease)),
        ))
        .await?;
        *last = Some((session.lease, value.clone()));
        Ok(())
    }

    /// Switches a failover source's side if its record is still at `expected` (its mod
    /// revision; 0: no record) and, with `as_leader`, this instance still holds the leader
    /// key under its current lease (a leader that lost its seat while it prepared the
    /// switch must not write it): false otherwise.
    pub async fn set_kafka_side(
        &self,
        source: &str,
        value: &KafkaSideValue,
        expected: i64,
        as_leader: bool,
    ) -> Result<Option<i64>, Error> {
        let key = self.inner.keys.kafka_side(source);
        let mut client = self.client()?;
        let mut when = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )];
        if as_leader {
            let lease = self.inner.session.borrow().lease;
            if lease == 0 {
                return Ok(None);
            }
            when.push(Compare::lease(
                self.inner.keys.leader(),
                CompareOp::Equal,
                lease,
            ));
        }
        let txn = Txn::new().when(when).and_then([TxnOp::put(
            key,
            serde_json::to_vec(value).expect("side serialises"),
            None,
        )]);
        let response = self.etcd(client.txn(txn)).await?;
        if !response.succeeded() {
            return Ok(None);
        }
        tracing::info!(%source, side = value.active.as_str(), reason = %value.reason, "Kafka source side set");
        Ok(Some(response.header().map_or(0, |h| h.revision())))
    }

    /// Publishes this member's load report (`loads/<id>`, on its lease), unless `last`
    /// (what this member wrote last, and under which lease) says it is there already: an
    /// idle member writes nothing.
    pub async fn report_load(
        &self,
        report: &LoadReport,
        last: &mut Option<(i64, LoadReport)>,
    ) -> Result<(), Error> {
        let session = *self.inner.session.borrow();
        if session.lease == 0 {
            return Ok(()); // no lease yet: nothing to attach the report to
        }
        if last
            .as_ref()
            .is_some_and(|(lease, r)| *lease == session.lease && r == report)
        {
            return Ok(());
        }
        let mut client = self.client()?;
        self.etcd(client.put(
            self.inner.keys.load(self.member_id()),
            serde_json::to_vec(report).expect("load report serialises"),
            Some(PutOptions::new().with_lease(session.lease)),
        ))
        .await?;
        *last = Some((session.lease, report.clone()));
        Ok(())
    }

    /// Freezes (`true`) or unfreezes placement: while frozen no voluntary move happens;
    /// shards of members that left are still re-homed.
    pub async fn freeze(&self, frozen: bool) -> Result<PlacementValue, Error> {
        self.update_placement(|p| p.frozen = frozen).await
    }

    /// Read-modify-write of the `placement` key, retried when another writer got there
    /// first.
    async fn update_placement(
        &self,
        change: impl Fn(&mut PlacementValue),
    ) -> Result<PlacementValue, Error> {
        let key = self.inner.keys.placement();
        for _ in 0..5 {
            let mut client = self.client()?;
            let current = self.etcd(client.get(key.clone(), None)).await?;
            let (mut value, revision) = match current.kvs().first() {
                Some(kv) => (
                    // Never overwrite what cannot be read (a newer version's format).
                    serde_json::from_slice::<PlacementValue>(kv.value()).map_err(|e| {
                        Error::Other(format!(
                            "the placement controls in etcd ({key}) cannot be read: {e}"
                        ))
                    })?,
                    kv.mod_revision(),
                ),
                None => (PlacementValue::default(), 0),
            };
            change(&mut value);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    serde_json::to_vec(&value).expect("placement serialises"),
                    None,
                )]);
            if self.etcd(client.txn(txn)).await?.succeeded() {
                tracing::info!(
                    frozen = value.frozen,
                    pins = value.pins.len(),
                    moves = value.moves.len(),
                    "placement controls updated"
                );
                return Ok(value);
            }
        }
        Err(Error::Other(
            "the placement controls kept changing under this update; try again".into(),
        ))
    }

    async fn start_draining(&self) -> Result<(), Error> {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.table.bump();
        let session = *self.inner.session.borrow();
        if session.lease != 0 {
            self.register(session).await?;
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Graceful leave, step one: mark this member draining, wait until the leader moved
    /// every shard away (or `timeout`), then hand off whatever is left directly, waiting
    /// at most `handoff` for each (its calls to end and its release hook).
    pub async fn drain(&self, timeout: Duration, handoff: Duration) {
        if let Err(e) = self.start_draining().await {
            tracing::warn!(error = %e, "could not mark member draining; releasing shards directly");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.table.subscribe();
        while !self.inner.table.held().is_empty() {
            if !self.others_active() {
                tracing::info!("no other active member to take the shards; releasing them");
                break;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                tracing::warn!("drain timed out; releasing remaining shards");
                break;
            }
        }
        let left = self.inner.table.held();
        if !left.is_empty() {
            let handoffs = left.into_iter().map(|(s, _)| self.clone().handoff(s));
            // Bounded: with etcd unreachable the keys expire with the lease anyway, so
            // there is nothing to wait for once it is no longer valid.
            let bound = self.inner.opts.lease_ttl + handoff;
            tokio::select! {
                done = tokio::time::timeout(bound, futures::future::join_all(handoffs)) => {
                    if done.is_err() {
                        tracing::warn!(
                            "could not release every shard within {bound:?}; they expire with the lease"
                        );
                    }
                }
                _ = self.lease_gone() => tracing::warn!(
                    "the lease has expired in etcd (no keepalive answered for a TTL); the remaining shard keys went with it"
                ),
            }
        }
    }

    /// Resolves once this instance's lease is certainly gone in etcd: never granted or
    /// given up, or no keepalive answered for a full TTL (plus a second for the
    /// keepalive's trip) — etcd has expired it, so no later keepalive can revive it and its
    /// shard keys are deleted. Merely past `valid_until` is not enough: that leaves a
    /// safety margin during which one answered keepalive extends the lease again.
    pub async fn lease_gone(&self) {
        let slack = self.inner.opts.safety_margin() + Duration::from_secs(1);
        let mut changes = self.inner.table.subscribe();
        loop {
            let gone_at = self.inner.table.lease().last_deadline().map(|d| d + slack);
            let now = tokio::time::Instant::now().into_std();
            match gone_at {
                None => return,
                Some(at) if now >= at => return,
                Some(at) => {
                    // A keepalive moves the deadline (and bumps the table): look again.
                    let _ = tokio::time::timeout_at(at.into(), changes.changed()).await;
                }
            }
        }
    }

    /// True when another member is registered and active (someone can take shards).
    fn others_active(&self) -> bool {
        let view = self.view();
        view.synced
            && view
                .members
                .values()
                .any(|m| m.id != *self.member_id() && m.state == MemberState::Active)
    }

    /// Graceful leave, last step: revoke the lease so member and leader keys vanish now.
    pub async fn revoke(&self) {
        let session = *self.inner.session.borrow();
        self.inner.table.lease().invalidate();
        if session.lease == 0 {
            return;
        }
        let Ok(client) = self.client() else { return };
        match self.etcd(client.lease_client().revoke(session.lease)).await {
            Ok(_) => tracing::info!(lease = session.lease, "lease revoked"),
            Err(e) => {
                tracing::warn!(error = %e, "lease revoke failed; etcd expires it after the TTL")
            }
        }
    }

    /// Updates metrics that are cheaper to compute when scraped.
    pub fn refresh_metrics(&self) {
        let m = &self.inner.metrics;
        m.lease_slack.set(self.inner.table.lease().slack());
        m.shards_owned.set(self.inner.table.held().len() as f64);
        let view = self.view();
        m.unowned.set(view.unowned() as f64);
        let leader = view.leader.as_ref() == Some(self.member_id());
        m.is_leader.set(if leader { 1.0 } else { 0.0 });
        m.assignment_version.set(view.assignment_version as f64);
        m.members.set(view.members.len() as f64);
        m.ready
            .set(if self.readiness().is_ok() { 1.0 } else { 0.0 });
    }
}

/// Runs essential tasks until `cancel`; the first to end before it ends them all with
/// [`Error::TaskEnded`] naming it.
pub(crate) async fn supervise(
    tasks: Vec<(&'static str, futures::future::BoxFuture<'static, ()>)>,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    use futures::FutureExt;

    let mut set = tokio::task::JoinSet::new();
    for (name, task) in tasks {
        // Panics are caught inside, so the report names the task that panicked.
        set.spawn(async move {
            (
                name,
                std::panic::AssertUnwindSafe(task).catch_unwind().await,
            )
        });
    }
    let mut result = Ok(());
    while let Some(ended) = set.join_next().await {
        // After cancel, or once one failed and the rest were aborted, endings are expected.
        if cancel.is_cancelled() || result.is_err() {
            continue;
        }
        let (task, why) = match ended {
            Ok((name, Ok(()))) => (name, "it returned".to_owned()),
            Ok((name, Err(panic))) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                (name, format!("it panicked: {message}"))
            }
            Err(e) => ("coordination task", e.to_string()),
        };
        tracing::error!(task, why, "essential task ended; stopping the instance");
        result = Err(Error::TaskEnded { task, why });
        set.abort_all();
    }
    result
}

/// What `/healthz` reports: whether the coordination loop still runs and makes progress.
#[derive(Debug, Default)]
struct Liveness {
    /// When the reconciler last began a pass (None before its first).
    last_pass: Mutex<Option<Instant>>,
    stopped: Mutex<Option<String>>,
}

impl Liveness {
    /// A reconciler pass is bounded by etcd timeouts; one that has not begun for this
    /// long is stuck.
    const STALL: Duration = Duration::from_secs(120);

    fn pass(&self, now: Instant) {
        *self.last_pass.lock().expect("liveness lock") = Some(now);
    }

    fn stopped(&self, why: String) {
        *self.stopped.lock().expect("liveness lock") = Some(why);
    }

    fn check(&self, now: Instant) -> Result<(), Unhealthy> {
        if let Some(why) = self.stopped.lock().expect("liveness lock").as_ref() {
            return Err(Unhealthy::Stopped(why.clone()));
        }
        match *self.last_pass.lock().expect("liveness lock") {
            Some(at) if now.saturating_duration_since(at) > Self::STALL => {
                Err(Unhealthy::Stalled(now.saturating_duration_since(at)))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_essential_task_that_ends_ends_the_others_with_its_name() {
        let cancel = CancellationToken::new();
        let forever = |c: CancellationToken| -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async move { c.cancelled().await })
        };
        let tasks = vec![
            ("lease keeper", forever(cancel.clone())),
            (
                "reconciler",
                Box::pin(async {}) as futures::future::BoxFuture<'static, ()>,
            ),
        ];
        let err = tokio::time::timeout(Duration::from_secs(5), supervise(tasks, &cancel))
            .await
            .expect("supervise returns when a task ends")
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::TaskEnded {
                    task: "reconciler",
                    ..
                }
            ),
            "{err}"
        );

        let tasks = vec![(
            "watcher",
            Box::pin(async { panic!("boom") }) as futures::future::BoxFuture<'static, ()>,
        )];
        let err = supervise(tasks, &cancel).await.unwrap_err();
        assert!(
            err.to_string().contains("watcher") && err.to_string().contains("panicked: boom"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tasks_ending_on_cancel_are_not_failures() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let tasks = vec![(
            "reconciler",
            Box::pin(async move { c.cancelled().await }) as futures::future::BoxFuture<'static, ()>,
        )];
        cancel.cancel();
        supervise(tasks, &cancel).await.unwrap();
    }

    #[test]
    fn liveness_fails_when_the_loop_stalls_or_a_task_stopped() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert!(l.check(t0).is_ok(), "waiting for the first pass is live");
        l.pass(t0);
        assert!(l.check(t0 + Duration::from_secs(60)).is_ok());
        assert!(l
            .check(t0 + Liveness::STALL + Duration::from_secs(1))
            .is_err());
        l.pass(t0 + Duration::from_secs(200));
        assert!(l.check(t0 + Duration::from_secs(201)).is_ok());
        l.stopped("the reconciler stopped".into());
        assert!(l.check(t0 + Duration::from_secs(201)).is_err());
    }
}
