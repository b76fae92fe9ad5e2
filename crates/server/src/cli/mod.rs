//! The command-line clients: `status`, `drain`, `call`, `locate`, `health`. Part of the
//! binary, not the library: they report errors to a person (anyhow, with context).

pub mod client;
pub mod status;
pub mod tls;
