//! The chaos suite's application: an `EntityHandler` sidecar that does a read-modify-write
//! of a per-key counter file WITHOUT any transaction (read, sleep 1-5 ms, write value+1
//! by rename) and answers the new value. Every execution is appended to a JSON-lines log
//! with its CLOCK_MONOTONIC start and end, so the suite can check from the outside that
//! no two executions of one key overlapped. Killed with SIGKILL by the suite to play
//! "handler down".

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use leasehold_integration_tests::chaos::{mono_ns, Execution, KafkaPos};
use leasehold_proto::v1::entity_handler_server::{EntityHandler, EntityHandlerServer};
use leasehold_proto::v1::{source, HandleRequest, HandleResponse, ShardEvent, ShardEventAck};
use rand::Rng;
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
struct Args {
    /// Address to serve EntityHandler on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: std::net::SocketAddr,
    /// JSON-lines execution log (appended).
    #[arg(long)]
    log: PathBuf,
    /// Folder of the counter files (shared by every sidecar).
    #[arg(long)]
    store: PathBuf,
    /// Name written into each record.
    #[arg(long)]
    host: String,
}

#[derive(Clone)]
struct Sidecar {
    log: Arc<Mutex<std::fs::File>>,
    store: PathBuf,
    host: String,
    tmp: Arc<AtomicU64>,
}

impl Sidecar {
    /// The read-modify-write; runs on a blocking thread and is never cancelled half-way,
    /// so the logged interval covers the real store accesses.
    fn execute(&self, r: HandleRequest) -> std::io::Result<u64> {
        let kafka = match r.source.and_then(|s| s.kind) {
            Some(source::Kind::Kafka(k)) => Some(KafkaPos {
                topic: k.topic,
                partition: k.partition,
                offset: k.offset,
            }),
            _ => None,
        };
        let name: String = r
            .key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.store.join(name);
        let start_ns = mono_ns();
        let read: u64 = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_micros(rand::rng().random_range(1000..=5000)));
        // Rename, so a SIGKILL never leaves a half-written counter behind.
        let tmp = self.store.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.tmp.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, (read + 1).to_string())?;
        std::fs::rename(&tmp, &path)?;
        let end_ns = mono_ns();
        let rec = Execution {
            host: self.host.clone(),
            key: r.key,
            shard: r.shard,
            epoch: r.epoch,
            owner: r.owner,
            kafka,
            start_ns,
            end_ns,
            read,
            wrote: read + 1,
        };
        let mut line = serde_json::to_string(&rec).expect("serialise");
        line.push('\n');
        self.log.lock().unwrap().write_all(line.as_bytes())?;
        Ok(read + 1)
    }
}

#[tonic::async_trait]
impl EntityHandler for Sidecar {
    async fn handle(
        &self,
        request: Request<HandleRequest>,
    ) -> Result<Response<HandleResponse>, Status> {
        let r = request.into_inner();
        // Honour the deadline as an absolute time: a call delivered late (its instance was
        // paused between its lease check and sending it) must not run.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if r.deadline_unix_ms > 0 && now_ms >= r.deadline_unix_ms {
            return Err(Status::deadline_exceeded(format!(
                "received {} ms past its deadline",
                now_ms - r.deadline_unix_ms
            )));
        }
        let me = self.clone();
        let value = tokio::task::spawn_blocking(move || me.execute(r))
            .await
            .map_err(|e| Status::internal(format!("handler task: {e}")))?
            .map_err(|e| Status::internal(format!("counter store: {e}")))?;
        Ok(Response::new(HandleResponse {
            payload: value.to_string().into_bytes().into(),
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.store)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)?;
    let sidecar = Sidecar {
        log: Arc::new(Mutex::new(log)),
        store: args.store,
        host: args.host,
        tmp: Arc::new(AtomicU64::new(0)),
    };
    tonic::transport::Server::builder()
        .add_service(EntityHandlerServer::new(sidecar))
        .serve(args.listen)
        .await?;
    Ok(())
}
