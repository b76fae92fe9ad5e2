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

/// The value `pointer` (RFC 6901) points at in the JSON document `doc`, as
/// `serde_json::Value::pointer` finds it, but building only that value: every other
/// member and element is skipped (still checked to be JSON). A key is extracted from
/// every consumed message, and building the whole document cost more than the rest of
/// reading it.
fn pointed(doc: &[u8], pointer: &str) -> Result<Option<serde_json::Value>, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(doc);
    let found = At(pointer).deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// What is left of a pointer: "" (the value itself) or "/token...".
struct At<'p>(&'p str);

/// The next token of a pointer, unescaped (`~1` is `/`, `~0` is `~`).
fn next_token(rest: &str) -> (std::borrow::Cow<'_, str>, &str) {
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let (token, after) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let token = if token.contains('~') {
        std::borrow::Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        std::borrow::Cow::Borrowed(token)
    };
    (token, after)
}

impl<'de> serde::de::DeserializeSeed<'de> for At<'_> {
    type Value = Option<serde_json::Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        use serde::Deserialize;
        if self.0.is_empty() {
            return serde_json::Value::deserialize(d).map(Some);
        }
        let (token, rest) = next_token(self.0);
        d.deserialize_any(Step { token, rest })
    }
}

/// One step down a pointer: into the member or element named `token`.
struct Step<'p> {
    token: std::borrow::Cow<'p, str>,
    rest: &'p str,
}

impl<'de> serde::de::Visitor<'de> for Step<'_> {
    type Value = Option<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // A pointer that goes on past a scalar points at nothing.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_token) = map.next_key_seed(KeyIs(&self.token))? {
            if is_token {
                // A repeated member replaces the earlier one, as in a parsed document.
                found = map.next_value_seed(At(self.rest))?;
            } else {
                map.next_value_seed(Skip)?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // As serde_json reads an index: no sign, no leading zero.
        let index = if self.token.starts_with('+')
            || (self.token.starts_with('0') && self.token.len() != 1)
        {
            None
        } else {
            self.token.parse::<usize>().ok()
        };
        let mut found = None;
        for i in 0.. {
            if Some(i) == index {
                match seq.next_element_seed(At(self.rest))? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element_seed(Skip)?.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

/// Reads past a value, checking it as a full parse would (UTF-8 and escapes in strings,
/// numbers in range, nesting depth), building nothing. serde's `IgnoredAny` would not
/// check these: a document a parse refuses must not yield a key.
struct Skip;

impl<'de> serde::de::DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
}

/// Whether an object member's name is the token (compared without copying it).
struct KeyIs<'t>(&'t str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
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
                match pointed(payload, pointer).map_err(|e| KeyError::NotJson(e.to_string()))? {
                    None | Some(serde_json::Value::Null) => {
                        Err(KeyError::PointerMissing(pointer.clone()))
                    }
                    Some(serde_json::Value::String(s)) if s.is_empty() => {
                        Err(KeyError::PointerEmpty(pointer.clone()))
                    }
                    Some(serde_json::Value::String(s)) => Ok(s),
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

    /// The pointer walk finds what `serde_json::Value::pointer` finds in the parsed
    /// document, and refuses what does not parse.
    #[test]
    fn the_pointer_walk_agrees_with_a_parsed_document() {
        let docs = [
            r#"{"account":"a-1","pad":"xx","n":[1,{"a":2}]}"#,
            r#"{"a":{"b":{"c":"deep"}},"a/b":"slash","m~n":"tilde","":"empty name"}"#,
            r#"{"account":1,"account":"last wins"}"#,
            r#"{"account":{"x":1},"account":3}"#,
            r#"[10,[20,21],{"k":"v"}]"#,
            r#"{"s":"esc\"aped\u0041","e":"\\u00e9","f":1.5,"t":true,"z":null,"neg":-7}"#,
            r#""just a string""#,
            r#"42"#,
            r#"{"a":[{"b":[0,1,2]}]}"#,
            r#"{"\u0061ccount":"escaped name"}"#,
        ];
        let pointers = [
            "/account",
            "/pad",
            "/n",
            "/n/0",
            "/n/1/a",
            "/n/2",
            "/n/01",
            "/n/+1",
            "/a/b/c",
            "/a~1b",
            "/m~0n",
            "/",
            "/0",
            "/1/1",
            "/2/k",
            "/3",
            "/s",
            "/e",
            "/f",
            "/t",
            "/z",
            "/neg",
            "/a/0/b/2",
            "/a/0/b/3",
            "/account/x",
            "/missing",
            "/a/b/c/d",
        ];
        for doc in docs {
            let parsed: serde_json::Value = serde_json::from_str(doc).unwrap();
            for p in pointers {
                assert_eq!(
                    pointed(doc.as_bytes(), p).unwrap(),
                    parsed.pointer(p).cloned(),
                    "{p} in {doc}"
                );
            }
        }
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for bad in [
            &br#"{"pad":"\ud800","account":"a"}"#[..],
            br#"{"pad":1e400,"account":"a"}"#,
            b"{\"pad\":\"\xff\",\"account\":\"a\"}",
            br#"{"\ud800":1,"account":"a"}"#,
            deep.as_bytes(),
        ] {
            assert!(serde_json::from_slice::<serde_json::Value>(bad).is_err());
            assert!(
                pointed(bad, "/account").is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            r#"{"account":"a-1""#,
            r#"{"account":"a-1"} trailing"#,
            r#"{"account":"a-1","pad":}"#,
            r#"{"pad":[1,2,,],"account":"a"}"#,
            "",
        ] {
            assert!(pointed(bad.as_bytes(), "/account").is_err(), "{bad}");
        }
    }
}
