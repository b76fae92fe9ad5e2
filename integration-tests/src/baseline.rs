//! What users write today, for the benchmark to compare with: a plain Kafka consumer
//! that calls a handler per message and commits what it processed, and a no-op
//! `EntityHandler` to call over gRPC.

use std::time::Duration;

use leasehold_proto::v1::entity_handler_client::EntityHandlerClient;
use leasehold_proto::v1::entity_handler_server::{EntityHandler, EntityHandlerServer};
use leasehold_proto::v1::{HandleRequest, HandleResponse, ShardEvent, ShardEventAck};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use tonic::{Request, Response, Status};

/// Answers every call at once with an empty payload.
struct Noop;

#[tonic::async_trait]
impl EntityHandler for Noop {
    async fn handle(&self, _: Request<HandleRequest>) -> Result<Response<HandleResponse>, Status> {
        Ok(Response::new(HandleResponse {
            payload: Default::default(),
        }))
    }

    async fn shard_acquired(
        &self,
        _: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        Ok(Response::new(ShardEventAck {}))
    }

    async fn shard_released(
        &self,
        _: Request<ShardEvent>,
    ) -> Result<Response<ShardEventAck>, Status> {
        Ok(Response::new(ShardEventAck {}))
    }
}

/// Serves the no-op handler on 127.0.0.1:`port` until the process ends.
pub async fn serve_noop_handler(port: u16) {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(EntityHandlerServer::new(Noop))
        .serve(([127, 0, 0, 1], port).into())
        .await
        .expect("no-op handler server");
}

/// A plain consumer-group member: for each message, call the handler (nothing, or the
/// `EntityHandler` at `handler` over gRPC), then store its offset; librdkafka
/// auto-commits the stored offsets every `commit_interval`. Runs until the process ends.
pub async fn plain_consumer(
    brokers: &str,
    topic: &str,
    group: &str,
    handler: Option<&str>,
    commit_interval: Duration,
) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            commit_interval.as_millis().to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut client = handler.map(|url| {
        EntityHandlerClient::new(
            tonic::transport::Endpoint::from_shared(url.to_owned())
                .expect("handler URL")
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        )
    });
    loop {
        let m = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("consume error: {e}");
                continue;
            }
        };
        if let Some(c) = client.as_mut() {
            let request = HandleRequest {
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                payload: m.payload().unwrap_or_default().to_vec().into(),
                ..Default::default()
            };
            // A failed call is retried, as a consumer that must not lose messages does.
            while let Err(e) = c.handle(request.clone()).await {
                eprintln!("handler: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // (librdkafka stores the message's offset + 1: the next one to read.)
        consumer
            .store_offset_from_message(&m)
            .expect("store offset");
    }
}
