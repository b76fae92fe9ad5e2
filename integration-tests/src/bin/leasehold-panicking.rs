//! A Leasehold instance whose handler panics when a call's payload is `panic` and echoes
//! every other payload, and whose `shard_acquired` hook panics for shards 1 and 3 mod 4
//! (before its future, and in it): the tests of a handler that panics, on every path
//! (the call's owner, across the forward hop, a shard hook). It takes every
//! `leasehold serve` flag except `--handler`.

use std::process::ExitCode;

use clap::Parser;
use leasehold_server::config::ServeArgs;
use leasehold_server::{
    BoxFuture, Bytes, HandleCall, HandleError, Handler, ServeOptions, Server, ShardEvent,
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

struct Panicking;

impl Handler for Panicking {
    fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
        Box::pin(async move {
            // After a first await: the panic happens while the handler's future is polled.
            tokio::task::yield_now().await;
            if call.payload.as_ref() == b"panic" {
                panic!("the test handler was asked to panic (key {})", call.key);
            }
            Ok(call.payload)
        })
    }

    fn shard_acquired(&self, event: ShardEvent) -> BoxFuture<'static, Result<(), HandleError>> {
        let shard = event.shard.0;
        if shard % 4 == 1 {
            panic!("the test handler's hook panics for shard {shard}");
        }
        Box::pin(async move {
            tokio::task::yield_now().await;
            if shard % 4 == 3 {
                panic!("the test handler's hook panics in its future for shard {shard}");
            }
            Ok(())
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ServeOptions::load(&args.serve) {
        Ok(loaded) => loaded.options,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match Server::builder()
        .config(config)
        .handler(Panicking)
        .run(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(70)
        }
    }
}
