//! Where a message's entity key comes from.

use std::fmt;
use std::str::FromStr;

/// `key` (the Kafka message key), `json:/pointer` (RFC 6901 pointer into a JSON
/// payload) or `header:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    MessageKey,
    JsonPointer(String),
    Header(String),
}

/// A key source that cannot be parsed, with what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?}: {hint}")]
pub struct KeySourceError {
    pub given: String,
    pub hint: &'static str,
}

impl FromStr for KeySource {
    type Err = KeySourceError;

    fn from_str(s: &str) -> Result<Self, KeySourceError> {
        let err = |hint| KeySourceError {
            given: s.to_owned(),
            hint,
        };
        if s == "key" {
            Ok(KeySource::MessageKey)
        } else if let Some(p) = s.strip_prefix("json:") {
            if p.is_empty() || !p.starts_with('/') {
                return Err(err("a JSON pointer starts with '/', e.g. json:/account"));
            }
            Ok(KeySource::JsonPointer(p.to_owned()))
        } else if let Some(h) = s.strip_prefix("header:") {
            if h.is_empty() {
                return Err(err("name the header, e.g. header:entity-id"));
            }
            Ok(KeySource::Header(h.to_owned()))
        } else {
            Err(err("use key, json:/pointer or header:NAME"))
        }
    }
}

/// Why a message's key cannot be extracted (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("message has no key")]
    NoKey,
    #[error("message has no value")]
    NoValue,
    #[error("header {0:?} missing")]
    HeaderMissing(String),
    #[error("{0} is not UTF-8")]
    NotUtf8(String),
    #[error("{0} is empty")]
    Empty(String),
    #[error("value is not JSON: {0}")]
    NotJson(String),
    #[error("JSON pointer {0} not found in value")]
    PointerMissing(String),
    #[error("JSON pointer {0} is an empty string")]
    PointerEmpty(String),
    #[error("JSON pointer {0} is an object or array, not a key")]
    PointerNotScalar(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::MessageKey => f.write_str("key"),
            KeySource::JsonPointer(p) => write!(f, "json:{p}"),
            KeySource::Header(h) => write!(f, "header:{h}"),
        }
    }
}

impl KeySource {
    /// Extracts the key, or says why it cannot (the dead-letter reason).
    pub fn extract<'a>(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        header: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<String, KeyError> {
        let text = |bytes: &[u8], what: String| -> Result<String, KeyError> {
            let s = std::str::from_utf8(bytes).map_err(|_| KeyError::NotUtf8(what.clone()))?;
            if s.is_empty() {
                return Err(KeyError::Empty(what));
            }
            Ok(s.to_owned())
        };
        match self {
            KeySource::MessageKey => text(key.ok_or(KeyError::NoKey)?, "message key".into()),
            KeySource::Header(name) => text(
                header(name).ok_or_else(|| KeyError::HeaderMissing(name.clone()))?,
                format!("header {name:?}"),
            ),
            KeySource::JsonPointer(pointer) => {
                let payload = payload.ok_or(KeyError::NoValue)?;
                let doc: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| KeyError::NotJson(e.to_string()))?;
                match doc.pointer(pointer) {
                    None | Some(serde_json::Value::Null) => {
                        Err(KeyError::PointerMissing(pointer.clone()))
                    }
                    Some(serde_json::Value::String(s)) if s.is_empty() => {
                        Err(KeyError::PointerEmpty(pointer.clone()))
                    }
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Ok(v.to_string())
                    }
                    Some(_) => Err(KeyError::PointerNotScalar(pointer.clone())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<&'static [u8]> {
        None
    }

    #[test]
    fn parses_and_prints_key_sources() {
        for s in ["key", "json:/account", "json:/a/b~1c", "header:entity"] {
            assert_eq!(s.parse::<KeySource>().unwrap().to_string(), s);
        }
        assert!("json:account".parse::<KeySource>().is_err());
        assert!("header:".parse::<KeySource>().is_err());
        assert!("value".parse::<KeySource>().is_err());
    }

    #[test]
    fn extracts_keys_or_says_why_not() {
        let json = KeySource::JsonPointer("/account".into());
        assert_eq!(
            json.extract(None, Some(br#"{"account":"a-1"}"#), none),
            Ok("a-1".into())
        );
        assert_eq!(
            json.extract(None, Some(br#"{"account":42}"#), none),
            Ok("42".into())
        );
        let err = |r: Result<String, KeyError>| r.unwrap_err().to_string();
        assert!(err(json.extract(None, Some(b"not json"), none)).contains("not JSON"));
        assert!(err(json.extract(None, Some(br#"{"other":1}"#), none)).contains("not found"));
        assert!(err(json.extract(None, Some(br#"{"account":""}"#), none)).contains("empty"));
        assert!(err(json.extract(None, Some(br#"{"account":{}}"#), none)).contains("object"));
        let key = KeySource::MessageKey;
        assert_eq!(key.extract(Some(b"k"), None, none), Ok("k".into()));
        assert!(err(key.extract(None, None, none)).contains("no key"));
        let header = KeySource::Header("id".into());
        assert_eq!(
            header.extract(None, None, |h| (h == "id").then_some(&b"x"[..])),
            Ok("x".into())
        );
        assert!(err(header.extract(None, None, none)).contains("missing"));
    }
}
