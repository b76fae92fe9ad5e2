//! Leasehold inside a Rust program: the instance and its handler in one process, with
//! no sidecar and no loopback hop to the handler.
//!
//! ```no_run
//! use leasehold_server::{BoxFuture, Bytes, HandleCall, HandleError, Handler, Server, ServeOptions};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn handle(&self, call: HandleCall) -> BoxFuture<'static, Result<Bytes, HandleError>> {
//!         Box::pin(async move { Ok(call.payload) })
//!     }
//! }
//!
//! # async fn run() -> Result<(), leasehold_server::ServeError> {
//! let config = ServeOptions { id: "ledger-0".into(), ..ServeOptions::default() };
//! Server::builder()
//!     .config(config)
//!     .handler(Echo)
//!     .run(async { tokio::signal::ctrl_c().await.unwrap() })
//!     .await
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use leasehold_router::Handler;

use crate::config::{ConfigError, HandlerSpec, ServeOptions};
use crate::serve::{serve_with, Listeners, ServeError};

/// Entry point of the embedded API.
pub struct Server;

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

/// Settings and handler of an embedded instance.
#[derive(Default)]
pub struct ServerBuilder {
    config: ServeOptions,
    handler: Option<Arc<dyn Handler>>,
}

impl ServerBuilder {
    /// The instance's settings (the same as `leasehold serve`'s; load them with
    /// [`ServeOptions::load`] to accept its flags, variables and file too). The `handler`
    /// setting must stay unset: the embedded handler takes its place.
    pub fn config(mut self, config: ServeOptions) -> Self {
        self.config = config;
        self
    }

    /// The code that runs for each key at its owner.
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Binds the listeners, joins the cluster and serves until `shutdown` resolves, then
    /// leaves gracefully (drain, stop serving, revoke the lease). An error says why the
    /// instance could not start or stopped on its own.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Some(handler) = self.handler else {
            return Err(ConfigError::field(
                "handler",
                "an embedded server needs a handler (ServerBuilder::handler)",
            )
            .into());
        };
        self.config.validate()?;
        if self.config.handler != HandlerSpec::Echo {
            return Err(ConfigError::field(
                "handler",
                "the embedded handler takes the place of the handler setting; leave it unset",
            )
            .into());
        }
        let listeners = Listeners::bind(&self.config).await?;
        serve_with(self.config, listeners, Some(handler), shutdown).await
    }
}
