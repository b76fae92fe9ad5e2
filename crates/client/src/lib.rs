//! A smart client for Leasehold's `Entities` API.
//!
//! It follows the cluster's routing table (`Entities.WatchRouting`), computes each key's
//! shard itself and calls the key's owner directly: no forwarding hop while the table is
//! current. A stale table costs one hop (the instance called forwards the call), never a
//! failure. Calls that Leasehold reports as not run, and calls that could not be sent,
//! are retried within the caller's deadline, on another instance when one was
//! unreachable.
//!
//! ```no_run
//! # async fn example() -> Result<(), leasehold_client::Error> {
//! let client = leasehold_client::Client::builder()
//!     .seeds(["127.0.0.1:7070", "127.0.0.1:7080"])
//!     .connect()
//!     .await?;
//! let reply = client.call("account-1", "deposit 10").await?;
//! println!("{} ran it at epoch {}", reply.owner, reply.epoch);
//! # Ok(())
//! # }
//! ```

mod error;
mod routing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use leasehold_proto::v1::{self as pb, entities_client::EntitiesClient};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::{Channel, Endpoint};

pub use crate::error::{Error, Retry};
pub use crate::routing::{Location, Routing, RoutingMember};

/// Largest message the client sends or accepts (Leasehold's default payload limit is
/// 4 MiB).
const MAX_MESSAGE: usize = 64 << 20;

/// TLS to the client plane: the CA the instances' certificates are signed by, and a
/// client certificate when the cluster requires one.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca_file: PathBuf,
    /// Certificate and key (PEM) presented to the instances.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Name the instances' certificates must carry when it is not the host dialled.
    pub server_name: Option<String>,
}

/// How to build a [`Client`].
#[derive(Debug, Clone)]
pub struct Builder {
    seeds: Vec<String>,
    tls: Option<Tls>,
    timeout: Duration,
    connect_timeout: Duration,
    follow_routing: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            seeds: Vec::new(),
            tls: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            follow_routing: true,
        }
    }
}

impl Builder {
    /// Instances to start from (`host:port`, `http://host:port` or `https://host:port`).
    /// Any one suffices; the table names the rest.
    pub fn seeds<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.seeds.extend(seeds.into_iter().map(Into::into));
        self
    }

    pub fn seed(self, seed: impl Into<String>) -> Self {
        self.seeds([seed])
    }

    /// TLS for every instance (seeds and owners alike).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Default deadline of a call, retries included (10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Bound on one connection attempt, and on [`Builder::connect`]'s wait for the table
    /// (2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether to follow the routing table (default). Without it every call goes to the
    /// seeds in turn and is forwarded there: the plain client, for comparison.
    pub fn follow_routing(mut self, follow: bool) -> Self {
        self.follow_routing = follow;
        self
    }

    /// The client, without waiting for the routing table (calls made before it arrives
    /// go to a seed and are forwarded there). Must be called inside a tokio runtime.
    pub fn build(self) -> Result<Client, Error> {
        if self.seeds.is_empty() {
            return Err(Error::Config("no seed instance given".into()));
        }
        let mut seeds = Vec::with_capacity(self.seeds.len());
        for seed in &self.seeds {
            seeds.push(normalize(seed, self.tls.is_some())?);
        }
        let tls = match &self.tls {
            None => None,
            Some(t) => {
                let identity = t.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                let config = leasehold_tls::client_config_with(
                    "client",
                    &t.ca_file,
                    identity,
                    &[b"h2"],
                    t.server_name.clone(),
                )
                .map_err(|e| Error::Config(format!("client TLS: {e}")))?;
                Some(leasehold_tls::Connector::new(config, t.server_name.clone()))
            }
        };
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            seeds,
            tls,
            connect_timeout: self.connect_timeout,
            channels: Mutex::default(),
            routing: watch::channel(None).0,
            hints: Mutex::default(),
            next: AtomicUsize::new(0),
        });
        if self.follow_routing {
            tokio::spawn(routing::follow(shared.clone(), stop.clone()));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                timeout: self.timeout,
                _stop: stop.drop_guard(),
            }),
        })
    }

    /// The client, once it has the routing table (or an error naming why no instance
    /// gave it within the connect timeout).
    pub async fn connect(self) -> Result<Client, Error> {
        let wait = self.connect_timeout;
        let client = self.build()?;
        client.wait_for_routing(wait).await?;
        Ok(client)
    }
}

/// `http://` or `https://` URL for an address.
fn normalize(address: &str, tls: bool) -> Result<String, Error> {
    let url = match address.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(Error::Config(format!(
                "{address}: TLS is configured, so instances are reached over https://"
            )))
        }
        Some(("https", _)) if !tls => {
            return Err(Error::Config(format!(
                "{address}: an https:// address needs TLS settings (a CA file)"
            )))
        }
        Some(("http" | "https", rest)) if !rest.is_empty() => address.to_owned(),
        Some(_) => {
            return Err(Error::Config(format!(
                "{address}: expected host:port, http://host:port or https://host:port"
            )))
        }
        None if tls => format!("https://{address}"),
        None => format!("http://{address}"),
    };
    Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Config(format!("invalid address {address:?}: {e}")))?;
    Ok(url)
}

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Deadline of the call, retries included (default: the client's).
    pub timeout: Option<Duration>,
    /// Request metadata (ASCII). The instance passes on what its `forward_metadata`
    /// setting allows, and the W3C trace context.
    pub metadata: Vec<(String, String)>,
}

/// A handler's answer and who ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub payload: Bytes,
    pub shard: u32,
    /// Fencing token of the ownership the handler ran under.
    pub epoch: u64,
    /// Member that ran the handler.
    pub owner: String,
    /// The member the client sent the call to did not run it: it forwarded the call (a
    /// stale table, a shard that was moving or unowned). False when the client did not
    /// know which member it sent the call to (no table yet).
    pub forwarded: bool,
}

/// A smart Leasehold client. Cheap to clone; the routing follower stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    timeout: Duration,
    _stop: DropGuard,
}

/// What the call path and the routing follower share.
struct Shared {
    /// URLs given at build time.
    seeds: Vec<String>,
    tls: Option<leasehold_tls::Connector>,
    connect_timeout: Duration,
    /// One channel per instance URL.
    channels: Mutex<HashMap<String, Channel>>,
    routing: watch::Sender<Option<Arc<Routing>>>,
    /// Owners learnt from answers since the last table (shard → member id).
    hints: Mutex<HashMap<u32, String>>,
    /// Round robin over instances when a call has no owner to go to.
    next: AtomicUsize,
}

impl Shared {
    fn url(&self, address: &str) -> String {
        if address.contains("://") {
            return address.to_owned();
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{address}")
    }

    /// The (lazily connecting) channel to `url`.
    fn channel(&self, url: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(url) {
            return Ok(c.clone());
        }
        // The connector does the TLS; the endpoint itself speaks plain HTTP/2 over it.
        let endpoint = Endpoint::from_shared(url.replacen("https://", "http://", 1))
            .map_err(|e| Error::Config(format!("invalid address {url:?}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.clone()),
            None => endpoint.connect_lazy(),
        };
        channels.insert(url.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets the channels of instances that are neither seeds nor in `routing` (pods
    /// come and go; their addresses do not come back).
    fn prune_channels(&self, routing: &Routing) {
        let keep: std::collections::HashSet<String> = self
            .seeds
            .iter()
            .cloned()
            .chain(routing.members().iter().map(|m| self.url(&m.address)))
            .collect();
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|url, _| keep.contains(url));
    }

    /// Every instance URL known: the seeds, then the table's members.
    fn instances(&self) -> Vec<String> {
        let mut all = self.seeds.clone();
        if let Some(r) = self.routing.borrow().as_ref() {
            for m in r.members() {
                let url = self.url(&m.address);
                if !all.contains(&url) {
                    all.push(url);
                }
            }
        }
        all
    }

    /// Any instance but `avoid`, in turn.
    fn any_instance(&self, avoid: &[String]) -> String {
        let all = self.instances();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..all.len())
            .map(|i| &all[(start + i) % all.len()])
            .find(|u| !avoid.contains(u))
            .unwrap_or(&all[start % all.len()])
            .clone()
    }

    /// Where to send a call for `key`: its owner's URL and member id, or any instance.
    fn target(&self, key: &str, avoid: &[String]) -> (String, Option<String>, Option<u32>) {
        let routing = self.routing.borrow().clone();
        if let Some(r) = routing {
            if let Some(shard) = r.shard_for(key) {
                let hinted = self.hints.lock().expect("hints lock").get(&shard).cloned();
                let owner = match hinted {
                    Some(id) => r.member(&id).map(|m| (m.id.clone(), m.address.clone())),
                    None => r.owner(shard).map(|m| (m.id.clone(), m.address.clone())),
                };
                if let Some((id, address)) = owner {
                    let url = self.url(&address);
                    if !avoid.contains(&url) {
                        return (url, Some(id), Some(shard));
                    }
                }
                let url = self.any_instance(avoid);
                let member = r.member_at(&url, |a| self.url(a)).map(|m| m.id.clone());
                return (url, member, Some(shard));
            }
        }
        (self.any_instance(avoid), None, None)
    }
}

impl Client {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Runs the handler for `key` at its owner and returns the answer, retrying what did
    /// not run until the client's default timeout.
    pub async fn call(&self, key: &str, payload: impl Into<Bytes>) -> Result<Reply, Error> {
        self.call_with(key, payload.into(), CallOptions::default())
            .await
    }

    /// [`Client::call`] with a deadline and metadata.
    pub async fn call_with(
        &self,
        key: &str,
        payload: Bytes,
        options: CallOptions,
    ) -> Result<Reply, Error> {
        if key.is_empty() {
            return Err(Error::Config("the key must not be empty".into()));
        }
        let shared = &self.inner.shared;
        let deadline = Instant::now() + options.timeout.unwrap_or(self.inner.timeout);
        let mut unreachable: Vec<String> = Vec::new();
        let mut backoff = Duration::from_millis(10);
        loop {
            let (url, member, shard) = shared.target(key, &unreachable);
            let channel = shared.channel(&url)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut request = tonic::Request::new(pb::CallRequest {
                key: key.to_owned(),
                payload: payload.clone(),
            });
            request.set_timeout(left.max(Duration::from_millis(1)));
            for (k, v) in &options.metadata {
                let key = tonic::metadata::AsciiMetadataKey::from_bytes(k.as_bytes())
                    .map_err(|_| Error::Config(format!("invalid metadata key {k:?}")))?;
                let value = v
                    .parse()
                    .map_err(|_| Error::Config(format!("metadata {k:?}: value is not ASCII")))?;
                request.metadata_mut().insert(key, value);
            }
            let mut client = EntitiesClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let status = match client.call(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    let forwarded = member.as_deref().is_some_and(|m| m != answer.owner);
                    if member.as_deref() != Some(answer.owner.as_str())
                        && shard == Some(answer.shard)
                    {
                        // The owner that ran it is the best guess until the next table.
                        shared
                            .hints
                            .lock()
                            .expect("hints lock")
                            .insert(answer.shard, answer.owner.clone());
                    }
                    return Ok(Reply {
                        payload: answer.payload,
                        shard: answer.shard,
                        epoch: answer.epoch,
                        owner: answer.owner,
                        forwarded,
                    });
                }
                Err(status) => status,
            };
            match Retry::of(&status) {
                Retry::No => return Err(Error::Status(status)),
                Retry::NotRun => {
                    if let Some(shard) = shard {
                        shared.hints.lock().expect("hints lock").remove(&shard);
                    }
                }
                Retry::NotSent => {
                    tracing::debug!(instance = %url, error = %status, "instance unreachable; trying another");
                    unreachable.push(url);
                    if unreachable.len() >= shared.instances().len() {
                        unreachable.clear();
                    }
                }
            }
            let now = Instant::now();
            if now + backoff >= deadline {
                return Err(Error::Status(status));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Where `key` lives now, from the local table (asks an instance when there is none
    /// yet).
    pub async fn locate(&self, key: &str) -> Result<Location, Error> {
        if key.is_empty() {
            return Err(Error::Config("the key must not be empty".into()));
        }
        let shared = &self.inner.shared;
        if let Some(location) = shared.routing.borrow().as_ref().and_then(|r| r.locate(key)) {
            return Ok(location);
        }
        let url = shared.any_instance(&[]);
        let mut request = tonic::Request::new(pb::LocateRequest {
            key: key.to_owned(),
        });
        request.set_timeout(self.inner.timeout);
        let answer = EntitiesClient::new(shared.channel(&url)?)
            .locate(request)
            .await
            .map_err(Error::Status)?
            .into_inner();
        Ok(Location {
            shard: answer.shard,
            owner: (!answer.owner.is_empty()).then_some(answer.owner),
            address: (!answer.address.is_empty()).then_some(answer.address),
            epoch: answer.epoch,
        })
    }

    /// The routing table as last received (none before the first).
    pub fn routing(&self) -> Option<Arc<Routing>> {
        self.inner.shared.routing.borrow().clone()
    }

    /// Waits until a routing table has arrived.
    pub async fn wait_for_routing(&self, timeout: Duration) -> Result<Arc<Routing>, Error> {
        let mut rx = self.inner.shared.routing.subscribe();
        let wait = async { rx.wait_for(|r| r.is_some()).await.map(|r| r.clone()) };
        let waited = tokio::time::timeout(timeout, wait).await;
        match waited {
            Ok(Ok(Some(r))) => Ok(r),
            _ => Err(Error::NoRouting(format!(
                "no instance of {} sent its routing table within {timeout:?}",
                self.inner.shared.seeds.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_scheme_tls_implies() {
        assert_eq!(normalize("h:1", false).unwrap(), "http://h:1");
        assert_eq!(normalize("h:1", true).unwrap(), "https://h:1");
        assert_eq!(normalize("http://h:1", false).unwrap(), "http://h:1");
        assert!(normalize("http://h:1", true)
            .unwrap_err()
            .to_string()
            .contains("https://"));
        assert!(normalize("https://h:1", false)
            .unwrap_err()
            .to_string()
            .contains("CA file"));
        assert!(normalize("ftp://h:1", false).is_err());
    }

    #[tokio::test]
    async fn a_client_needs_a_seed() {
        let e = Client::builder().build().err().expect("no seeds");
        assert!(e.to_string().contains("seed"), "{e}");
    }
}
