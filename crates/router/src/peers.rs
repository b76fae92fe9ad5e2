//! Pooled HTTP/2 channels to peers, and the forwarding hop.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use leasehold_proto::v1::{self as pb, forward_response, peer_client::PeerClient};
use leasehold_types::{Epoch, MemberId};
use tonic::transport::{Channel, Endpoint};

use crate::{CallError, CallSource, Job, Reply};

/// Metadata key set on every status the Peer service returns, so the sender can tell
/// the receiver's answer from a transport failure.
pub(crate) const ORIGIN_HEADER: &str = "leasehold-origin";

pub(crate) enum Forwarded {
    /// The owner answered (the handler's reply or its error).
    Done(Result<Reply, CallError>),
    /// The receiver no longer owns the shard.
    NotOwner,
    /// The call may not have reached the receiver.
    Unreachable(String),
}

pub(crate) struct Peers {
    channels: RwLock<HashMap<String, PeerClient<Channel>>>,
    max_message: usize,
}

impl Peers {
    pub(crate) fn new(max_message: usize) -> Self {
        Self {
            channels: RwLock::new(HashMap::new()),
            max_message,
        }
    }

    fn client(&self, address: &str) -> Result<PeerClient<Channel>, String> {
        if let Some(c) = self.channels.read().expect("peers lock").get(address) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("invalid peer address {address:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let client = PeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        self.channels
            .write()
            .expect("peers lock")
            .insert(address.to_owned(), client.clone());
        Ok(client)
    }

    pub(crate) async fn forward(&self, address: &str, job: &Job, expected: Epoch) -> Forwarded {
        let mut client = match self.client(address) {
            Ok(c) => c,
            Err(e) => return Forwarded::Unreachable(e),
        };
        let (entry, source) = match &job.source {
            CallSource::Grpc { entry } => (entry.0.clone(), None),
            CallSource::Kafka {
                topic,
                partition,
                offset,
            } => (
                String::new(),
                Some(pb::Source {
                    kind: Some(pb::source::Kind::Kafka(pb::KafkaSource {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *offset,
                    })),
                }),
            ),
        };
        let mut request = tonic::Request::new(pb::ForwardRequest {
            key: job.key.clone(),
            payload: job.payload.clone(),
            shard: job.shard.0,
            expected_epoch: expected.0,
            entry,
            source,
        });
        request.set_timeout(job.deadline.saturating_duration_since(Instant::now()));
        match client.forward(request).await {
            Ok(resp) => match resp.into_inner().result {
                Some(forward_response::Result::Ok(r)) => Forwarded::Done(Ok(Reply {
                    payload: r.payload,
                    shard: job.shard,
                    epoch: Epoch(r.epoch),
                    owner: MemberId(r.owner),
                })),
                Some(forward_response::Result::NotOwner(_)) => Forwarded::NotOwner,
                None => Forwarded::Unreachable("empty forward response".into()),
            },
            Err(s) if s.metadata().get(ORIGIN_HEADER).is_some() => {
                Forwarded::Done(Err(CallError::Handler(s)))
            }
            Err(s) => Forwarded::Unreachable(s.to_string()),
        }
    }
}
