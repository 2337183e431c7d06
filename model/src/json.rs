//! [`Json`]: a resource's value, decoded lazily.

use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// A resource's value as JSON, decoded once and only when looked at.
///
/// Backends hand over the stored text as it is (checked to be JSON, not decoded); a typed
/// consumer decodes that text straight into its own type with [`Json::decode`], and the first
/// look at it as a [`serde_json::Value`] (through `Deref`, e.g. `value["cidr"]`) parses it
/// once. Building a `serde_json::Value` costs several times what decoding into a struct does,
/// so a list of 100,000 keys that the consumer decodes into its types never builds one.
///
/// ```
/// use kvsync_model::Json;
/// use serde_json::json;
///
/// #[derive(serde::Deserialize)]
/// struct Pool { cidr: String }
///
/// let stored = Json::from_json_text(r#"{"cidr": "10.0.0.0/16"}"#.to_owned()).unwrap();
/// let pool: Pool = stored.decode().unwrap();
/// assert_eq!(pool.cidr, "10.0.0.0/16");
/// assert_eq!(stored["cidr"], "10.0.0.0/16");
/// assert_eq!(stored, json!({"cidr": "10.0.0.0/16"}));
/// ```
pub struct Json {
    /// The JSON text, when the value came from a datastore.
    raw: Option<Box<RawValue>>,
    /// The parsed value (set at once when built from a `Value`).
    value: OnceLock<Value>,
}

impl Json {
    /// A value from JSON text, checked to be JSON but not decoded.
    ///
    /// # Errors
    /// When `text` is not JSON.
    pub fn from_json_text(text: String) -> Result<Self, serde_json::Error> {
        Ok(Json::from_raw(RawValue::from_string(text)?))
    }

    /// A value from JSON text already checked by serde_json.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        Json {
            raw: Some(raw),
            value: OnceLock::new(),
        }
    }

    /// The value as a [`serde_json::Value`], parsed on first use (`Null` if the text is
    /// deeper than serde_json's recursion limit).
    pub fn as_value(&self) -> &Value {
        self.value.get_or_init(|| match &self.raw {
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            None => Value::Null,
        })
    }

    /// The value as a [`serde_json::Value`].
    pub fn into_value(self) -> Value {
        self.as_value();
        self.value.into_inner().unwrap_or(Value::Null)
    }

    /// Decodes the value into `T`: from the stored text when it was never parsed (the fast
    /// path), else from the parsed value.
    ///
    /// # Errors
    /// The serde error when the value is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match (self.value.get(), &self.raw) {
            (None, Some(raw)) => serde_json::from_str(raw.get()),
            _ => T::deserialize(self.as_value()),
        }
    }

    /// The stored JSON text, when the value came from one.
    pub fn json_text(&self) -> Option<&str> {
        self.raw.as_deref().map(RawValue::get)
    }
}

impl Default for Json {
    fn default() -> Self {
        Json::from(Value::Null)
    }
}

impl Deref for Json {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.as_value()
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Self {
        Json {
            raw: None,
            value: OnceLock::from(value),
        }
    }
}

impl From<Json> for Value {
    fn from(json: Json) -> Self {
        json.into_value()
    }
}

impl Clone for Json {
    fn clone(&self) -> Self {
        Json {
            raw: self.raw.clone(),
            value: self.value.clone(),
        }
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        match (&self.raw, &other.raw) {
            (Some(a), Some(b)) if a.get() == b.get() => true,
            _ => self.as_value() == other.as_value(),
        }
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        self.as_value() == other
    }
}

impl PartialEq<Json> for Value {
    fn eq(&self, other: &Json) -> bool {
        self == other.as_value()
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_value(), f)
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.value.get(), self.json_text()) {
            (None, Some(text)) => f.write_str(text),
            _ => fmt::Display::fmt(self.as_value(), f),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Through the parsed value: a RawValue serializes as JSON text only for serde_json.
        self.as_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Json::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_value_forms_agree() {
        let text = Json::from_json_text(r#"{"a": [1, 2], "b": "x"}"#.into()).unwrap();
        let value = Json::from(json!({"a": [1, 2], "b": "x"}));
        assert_eq!(text, value);
        assert_eq!(text["a"][1], 2);
        assert_eq!(
            serde_json::to_string(&text).unwrap(),
            r#"{"a":[1,2],"b":"x"}"#
        );
        assert_eq!(text.clone().into_value(), value.clone().into_value());
        #[derive(Deserialize, PartialEq, Debug)]
        struct T {
            b: String,
        }
        assert_eq!(text.decode::<T>().unwrap(), T { b: "x".into() });
        assert_eq!(value.decode::<T>().unwrap(), T { b: "x".into() });
    }

    #[test]
    fn bad_text_is_refused() {
        assert!(Json::from_json_text("{not json".into()).is_err());
    }
}
