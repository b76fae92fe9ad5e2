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

impl FromStr for KeySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "key" {
            Ok(KeySource::MessageKey)
        } else if let Some(p) = s.strip_prefix("json:") {
            if p.is_empty() || !p.starts_with('/') {
                return Err(format!(
                    "{s:?}: a JSON pointer starts with '/', e.g. json:/account"
                ));
            }
            Ok(KeySource::JsonPointer(p.to_owned()))
        } else if let Some(h) = s.strip_prefix("header:") {
            if h.is_empty() {
                return Err(format!("{s:?}: name the header, e.g. header:entity-id"));
            }
            Ok(KeySource::Header(h.to_owned()))
        } else {
            Err(format!("{s:?}: use key, json:/pointer or header:NAME"))
        }
    }
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
    ) -> Result<String, String> {
        let text = |bytes: &[u8], what: &str| -> Result<String, String> {
            let s = std::str::from_utf8(bytes).map_err(|_| format!("{what} is not UTF-8"))?;
            if s.is_empty() {
                return Err(format!("{what} is empty"));
            }
            Ok(s.to_owned())
        };
        match self {
            KeySource::MessageKey => text(key.ok_or("message has no key")?, "message key"),
            KeySource::Header(name) => text(
                header(name).ok_or_else(|| format!("header {name:?} missing"))?,
                &format!("header {name:?}"),
            ),
            KeySource::JsonPointer(pointer) => {
                let payload = payload.ok_or("message has no value")?;
                let doc: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| format!("value is not JSON: {e}"))?;
                match doc.pointer(pointer) {
                    None | Some(serde_json::Value::Null) => {
                        Err(format!("JSON pointer {pointer} not found in value"))
                    }
                    Some(serde_json::Value::String(s)) if s.is_empty() => {
                        Err(format!("JSON pointer {pointer} is an empty string"))
                    }
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        Ok(v.to_string())
                    }
                    Some(_) => Err(format!(
                        "JSON pointer {pointer} is an object or array, not a key"
                    )),
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
        let err = |r: Result<String, String>| r.unwrap_err();
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
