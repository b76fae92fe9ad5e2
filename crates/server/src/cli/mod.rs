//! The command-line clients: `status`, `drain`, `call`, `locate`, `health`. Part of the
//! binary, not the library: they report errors to a person, or to a script with
//! `--output json`, and end with an exit status from sysexits.h (see [`report`]).

pub mod client;
pub mod report;
pub mod status;
pub mod tls;
