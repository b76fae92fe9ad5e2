//! Value types of the settings and their serde forms.
//!
//! Every value deserialises from its TOML form *and* from the string an environment
//! variable or a flag gives (`shards = 64` and `LEASEHOLD_SHARDS=64` alike), with an error
//! message that says what a valid value looks like. Each serialises to the form the TOML
//! file accepts, so `--print-config` reads back.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A TOML scalar as given: numbers may be written bare or as strings.
enum Scalar {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a whole number")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Whole numbers: `64` or `"64"`.
pub mod num {
    use super::*;

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + TryFrom<i64>,
    {
        match Scalar::deserialize(d)? {
            Scalar::Int(i) => {
                T::try_from(i).map_err(|_| de::Error::custom(format!("{i} is out of range")))
            }
            Scalar::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| de::Error::custom(format!("{s:?} is not a whole number"))),
        }
    }

    pub fn serialize<S: Serializer, T: Serialize>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
}

/// Booleans from TOML (`true`) or from a variable or flag (`"true"`, `"false"`).
pub mod boolean {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Bool(bool),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match Given::deserialize(d)? {
            Given::Bool(b) => Ok(b),
            Given::Str(s) => match s.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(de::Error::custom(format!("{other:?} is not true or false"))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*v)
    }
}

/// Durations as humans write them: `"5s"`, `"500ms"`, `"1m 30s"`.
pub mod duration {
    use super::*;

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like 5s or 500ms: {e}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

/// Socket addresses to listen on: `"0.0.0.0:7070"`.
pub mod addr {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.trim().parse().map_err(|_| {
            de::Error::custom(format!("{s:?} is not an IP:PORT address like 0.0.0.0:7070"))
        })
    }

    pub fn serialize<S: Serializer>(v: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
}

/// An optional listen address; empty means "not set".
pub mod opt_addr {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = super::string::deserialize(d)?;
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| {
            de::Error::custom(format!("{s:?} is not an IP:PORT address like 0.0.0.0:8080"))
        })
    }

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }
}

/// Optional strings where an empty value means "not set" (an environment variable set
/// to nothing, as Kubernetes manifests often leave them).
pub mod opt_string {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let s = super::string::deserialize(d)?;
        Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty()))
    }

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(v),
            None => s.serialize_none(),
        }
    }
}

/// A list: a TOML array, or one comma-separated string (`"a:1,b:2"`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct List(pub Vec<String>);

impl List {
    pub fn of<const N: usize>(items: [&str; N]) -> Self {
        Self(items.iter().map(|s| s.to_string()).collect())
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Str(String),
        }
        let items = match Form::deserialize(d)? {
            Form::List(l) => l,
            Form::Str(s) => s.split(',').map(str::to_owned).collect(),
        };
        Ok(List(
            items
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }
}

impl Serialize for List {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A size in bytes: `4194304`, `"4MiB"`, `"512KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub const MIB: usize = 1 << 20;

    pub fn bytes(self) -> usize {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: usize = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 4MiB or 4194304"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n % size == 0 {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Scalar::deserialize(d)? {
            Scalar::Int(i) => usize::try_from(i)
                .map(ByteSize)
                .map_err(|_| de::Error::custom(format!("{i} is not a size"))),
            Scalar::Str(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A secret (a password): never printed, in logs, `Debug`, `--print-config` or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Untagged: a mistyped value is refused without being echoed.
        match Scalar::deserialize(d) {
            Ok(Scalar::Str(s)) => Ok(Secret(s)),
            Ok(Scalar::Int(i)) => Ok(Secret(i.to_string())),
            Err(_) => Err(de::Error::custom("expected a string (value not shown)")),
        }
    }
}

/// Optional secrets, where an empty value means "not set".
pub mod opt_secret {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
        Ok(Some(Secret::deserialize(d)?).filter(|s| !s.0.is_empty()))
    }

    pub fn serialize<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_none(),
        }
    }
}

/// Strings that TOML may also give as a bare number (`id = 7`).
pub mod string {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(match Scalar::deserialize(d)? {
            Scalar::Str(s) => s,
            Scalar::Int(i) => i.to_string(),
        })
    }

    pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }
}

impl Secret {
    pub const REDACTED: &'static str = "<redacted>";

    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Self::REDACTED)
    }
}

/// The handler that runs calls at the owner: `echo`, or `grpc://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSpec {
    /// Answers every call with its payload (for trying Leasehold out).
    Echo,
    /// An `EntityHandler` gRPC service at `address` (HOST:PORT); over TLS when `tls`.
    Grpc { address: String, tls: bool },
}

impl HandlerSpec {
    /// The URL to connect to, for a gRPC handler.
    pub fn url(&self) -> Option<String> {
        match self {
            HandlerSpec::Echo => None,
            // A TLS handler is reached through Leasehold's own connector (it dials the
            // host itself), so the channel's URL keeps the plain scheme.
            HandlerSpec::Grpc { address, .. } => Some(format!("http://{address}")),
        }
    }
}

impl FromStr for HandlerSpec {
    type Err = String;

    fn from_str(h: &str) -> Result<Self, String> {
        match h.trim() {
            "echo" => Ok(HandlerSpec::Echo),
            h => {
                let (addr, tls) = match (h.strip_prefix("grpc://"), h.strip_prefix("grpcs://")) {
                    (Some(a), _) => (a, false),
                    (_, Some(a)) => (a, true),
                    _ => ("", false),
                };
                if addr.contains(':') && !addr.contains('/') {
                    Ok(HandlerSpec::Grpc {
                        address: addr.to_owned(),
                        tls,
                    })
                } else {
                    Err(format!(
                        "{h:?}: use `echo`, `grpc://HOST:PORT` or `grpcs://HOST:PORT`"
                    ))
                }
            }
        }
    }
}

impl fmt::Display for HandlerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerSpec::Echo => f.write_str("echo"),
            HandlerSpec::Grpc {
                address,
                tls: false,
            } => write!(f, "grpc://{address}"),
            HandlerSpec::Grpc { address, tls: true } => write!(f, "grpcs://{address}"),
        }
    }
}

/// `FromStr` + `Display` types as TOML strings.
macro_rules! string_serde {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(de::Error::custom)
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

string_serde!(HandlerSpec);

/// What the leader balances across members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Shard counts (every member holds ⌊S/N⌋ or ⌈S/N⌉ shards).
    Count,
    /// The load owners report per shard (handler busy time and calls), within
    /// `balance_tolerance` of the mean; counts while there are no reports.
    Load,
}

impl FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "count" => Ok(Balance::Count),
            "load" => Ok(Balance::Load),
            other => Err(format!("{other:?}: use count or load")),
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::Count => "count",
            Balance::Load => "load",
        })
    }
}

string_serde!(Balance);

/// What the admin token protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuth {
    /// Mutations only (drain); reads stay open.
    Mutations,
    /// Every admin request but the kubelet's probes (`/healthz`, `/readyz`) and the status
    /// page itself (`/`; the data it shows comes from endpoints the token protects).
    All,
}

impl FromStr for AdminAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "mutations" => Ok(AdminAuth::Mutations),
            "all" => Ok(AdminAuth::All),
            other => Err(format!("{other:?}: use mutations or all")),
        }
    }
}

impl fmt::Display for AdminAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminAuth::Mutations => "mutations",
            AdminAuth::All => "all",
        })
    }
}

string_serde!(AdminAuth);

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For terminals (coloured only on a terminal without `NO_COLOR`).
    Text,
    /// One JSON object per line, for collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: use text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

string_serde!(LogFormat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_in_the_largest_exact_unit() {
        assert_eq!("4MiB".parse(), Ok(ByteSize(4 << 20)));
        assert_eq!("1000".parse(), Ok(ByteSize(1000)));
        assert!("4XB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(4 << 20).to_string(), "4MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(3 << 10).to_string(), "3KiB");
    }

    #[test]
    fn handlers_parse_and_print_back() {
        for h in ["echo", "grpc://app:9000"] {
            assert_eq!(h.parse::<HandlerSpec>().unwrap().to_string(), h);
        }
        assert!("http://app:9000".parse::<HandlerSpec>().is_err());
        assert!("grpc://app".parse::<HandlerSpec>().is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("s3cret");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert_eq!(s.expose(), "s3cret");
    }
}
