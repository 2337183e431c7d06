//! [`Json`]: a resource's value, decoded lazily.

use std::fmt;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// A resource's value as JSON, decoded once and only when looked at.
///
/// Backends hand over the stored text as it is (checked to be JSON, not decoded); a typed
/// consumer decodes that text straight into its own type with [`Json::decode`], and the first
/// look at it as a [`serde_json::Value`] ([`Json::as_value`]) parses it once. Building a
/// `serde_json::Value` costs several times what decoding into a struct does, so a list of
/// 100,000 keys that the consumer decodes into its types never builds one.
///
/// Reading is where a value can fail: text deeper than serde_json's recursion limit passes
/// the check on the way in but cannot be built as a `Value`, and [`Json::as_value`] says so
/// with an error rather than a `Null`.
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
/// assert_eq!(stored.as_value().unwrap()["cidr"], "10.0.0.0/16");
/// assert_eq!(stored, json!({"cidr": "10.0.0.0/16"}));
/// ```
pub struct Json {
    /// The JSON text, when the value came from a datastore.
    raw: Option<Text>,
    /// The parsed value (set at once when built from a `Value`).
    value: OnceLock<Value>,
}

/// Checked JSON text: the whole of `buf`, or the part of it from `start` to `end` (a value
/// kept inside the stored record it came in, so that the record is not copied).
#[derive(Clone)]
struct Text {
    buf: Box<str>,
    start: usize,
    end: usize,
}

impl Text {
    fn get(&self) -> &str {
        // Both ends were taken from a `RawValue` inside `buf`, so they are in bounds and on
        // character boundaries; `get` keeps even a broken invariant from panicking (the
        // empty text then fails to parse where it is read).
        self.buf.get(self.start..self.end).unwrap_or("")
    }
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
        let buf: Box<str> = raw.into();
        let end = buf.len();
        Json::from_text(Text { buf, start: 0, end })
    }

    fn from_text(text: Text) -> Self {
        Json {
            raw: Some(text),
            value: OnceLock::new(),
        }
    }

    /// A value that is part of a larger JSON text, such as the `spec` of a stored record,
    /// kept without copying it out: `parse` reads `text` (checking it) and returns the part
    /// that is the value, and anything else it read from the text.
    ///
    /// ```
    /// use kvsync_model::Json;
    /// use serde_json::value::RawValue;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Record<'a> {
    ///     uid: String,
    ///     #[serde(borrow)]
    ///     spec: &'a RawValue,
    /// }
    ///
    /// let text = r#"{"uid": "u-1", "spec": {"cidr": "10.0.0.0/16"}}"#.to_owned();
    /// let (spec, uid) = Json::from_part_of(text, |t| {
    ///     serde_json::from_str::<Record>(t).map(|r| (r.spec, r.uid))
    /// })
    /// .unwrap();
    /// assert_eq!(uid, "u-1");
    /// assert_eq!(spec.as_value().unwrap()["cidr"], "10.0.0.0/16");
    /// assert_eq!(spec.json_text(), Some(r#"{"cidr": "10.0.0.0/16"}"#));
    /// ```
    ///
    /// # Errors
    /// Whatever `parse` returns, with `text` given back (e.g. to report what was stored).
    pub fn from_part_of<T, E>(
        text: String,
        parse: impl for<'t> FnOnce(&'t str) -> Result<(&'t RawValue, T), E>,
    ) -> Result<(Self, T), (E, String)> {
        let (start, end, other) = {
            let (part, other) = match parse(&text) {
                Ok(parsed) => parsed,
                Err(e) => return Err((e, text)),
            };
            let base = text.as_ptr() as usize;
            let at = part.get().as_ptr() as usize;
            let inside = at >= base && at + part.get().len() <= base + text.len();
            if !inside {
                // A part from elsewhere: copied out.
                return Ok((Json::from_raw(part.to_owned()), other));
            }
            let start = at - base;
            (start, start + part.get().len(), other)
        };
        let text = Text {
            buf: text.into_boxed_str(),
            start,
            end,
        };
        Ok((Json::from_text(text), other))
    }

    /// The value as a [`serde_json::Value`], parsed on first use.
    ///
    /// # Errors
    /// When the stored text cannot be built as a `Value` (deeper than serde_json's recursion
    /// limit); the text is kept and the next call tries again.
    pub fn as_value(&self) -> Result<&Value, serde_json::Error> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let text = self.raw.as_ref().map_or("null", Text::get);
        let parsed: Value = serde_json::from_str(text)?;
        Ok(self.value.get_or_init(|| parsed))
    }

    /// The value as a [`serde_json::Value`].
    ///
    /// # Errors
    /// As [`Json::as_value`].
    pub fn into_value(self) -> Result<Value, serde_json::Error> {
        self.as_value()?;
        Ok(self.value.into_inner().unwrap_or(Value::Null))
    }

    /// Decodes the value into `T`: from the stored text when it was never parsed (the fast
    /// path), else from the parsed value.
    ///
    /// # Errors
    /// The serde error when the value is not a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match (self.value.get(), &self.raw) {
            (None, Some(raw)) => serde_json::from_str(raw.get()),
            (Some(v), _) => T::deserialize(v),
            (None, None) => T::deserialize(Value::Null),
        }
    }

    /// Whether the value is a JSON object (read from the text's first character when the
    /// value was never parsed).
    pub fn is_object(&self) -> bool {
        match (self.value.get(), self.json_text()) {
            (Some(v), _) => v.is_object(),
            (None, Some(text)) => text.trim_start().starts_with('{'),
            (None, None) => false,
        }
    }

    /// What kind of JSON value this is, for messages: `an object`, `an array`, `a string`,
    /// `a number`, `a boolean` or `null`.
    pub fn kind_name(&self) -> &'static str {
        let first = match (self.value.get(), self.json_text()) {
            (Some(v), _) => match v {
                Value::Object(_) => '{',
                Value::Array(_) => '[',
                Value::String(_) => '"',
                Value::Number(_) => '0',
                Value::Bool(_) => 't',
                Value::Null => 'n',
            },
            (None, Some(text)) => text.trim_start().chars().next().unwrap_or('n'),
            (None, None) => 'n',
        };
        match first {
            '{' => "an object",
            '[' => "an array",
            '"' => "a string",
            't' | 'f' => "a boolean",
            'n' => "null",
            _ => "a number",
        }
    }

    /// Decodes the value into `T` like [`Json::decode`], and on failure says where: the path
    /// of the field that failed (`natOutgoing`, `ingress[0].ports`; `.` for the value itself).
    ///
    /// # Errors
    /// The path and the serde error when the value is not a `T`.
    pub fn decode_at_path<T: DeserializeOwned>(&self) -> Result<T, (String, serde_json::Error)> {
        let result = match (self.value.get(), &self.raw) {
            (None, Some(raw)) => {
                let mut de = serde_json::Deserializer::from_str(raw.get());
                serde_path_to_error::deserialize(&mut de)
            }
            (Some(v), _) => serde_path_to_error::deserialize(v),
            (None, None) => serde_path_to_error::deserialize(&Value::Null),
        };
        result.map_err(|e| (e.path().to_string(), e.into_inner()))
    }

    /// The stored JSON text, when the value came from one.
    pub fn json_text(&self) -> Option<&str> {
        self.raw.as_ref().map(Text::get)
    }
}

impl Default for Json {
    fn default() -> Self {
        Json::from(Value::Null)
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

impl TryFrom<Json> for Value {
    type Error = serde_json::Error;

    fn try_from(json: Json) -> Result<Self, serde_json::Error> {
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
            // A value that cannot be read equals nothing but its own text.
            _ => matches!((self.as_value(), other.as_value()), (Ok(a), Ok(b)) if a == b),
        }
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        self.as_value().is_ok_and(|v| v == other)
    }
}

impl PartialEq<Json> for Value {
    fn eq(&self, other: &Json) -> bool {
        other == self
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.value.get(), self.json_text()) {
            (Some(v), _) => fmt::Debug::fmt(v, f),
            (None, Some(text)) => write!(f, "Json({text})"),
            (None, None) => f.write_str("Json(null)"),
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.value.get(), self.json_text()) {
            (Some(v), _) => fmt::Display::fmt(v, f),
            (None, Some(text)) => f.write_str(text),
            (None, None) => f.write_str("null"),
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Through the parsed value: a RawValue serializes as JSON text only for serde_json.
        self.as_value()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
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
        assert_eq!(text.as_value().unwrap()["a"][1], 2);
        assert_eq!(
            serde_json::to_string(&text).unwrap(),
            r#"{"a":[1,2],"b":"x"}"#
        );
        assert_eq!(
            text.clone().into_value().unwrap(),
            value.clone().into_value().unwrap()
        );
        #[derive(Deserialize, PartialEq, Debug)]
        struct T {
            b: String,
        }
        assert_eq!(text.decode::<T>().unwrap(), T { b: "x".into() });
        assert_eq!(value.decode::<T>().unwrap(), T { b: "x".into() });
    }

    #[test]
    fn a_part_is_kept_in_place_or_copied_when_from_elsewhere() {
        let text = r#"{"m": 1, "spec":  [1, {"x": "y"}] }"#.to_owned();
        let (part, n) = Json::from_part_of(text, |t| {
            #[derive(Deserialize)]
            struct R<'a> {
                m: u8,
                #[serde(borrow)]
                spec: &'a RawValue,
            }
            serde_json::from_str::<R>(t).map(|r| (r.spec, r.m))
        })
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(part.json_text(), Some(r#"[1, {"x": "y"}]"#));
        assert_eq!(part, serde_json::json!([1, {"x": "y"}]));
        assert_eq!(part.clone().decode::<(u8, Value)>().unwrap().0, 1);

        let elsewhere: &'static RawValue = Box::leak(RawValue::from_string("true".into()).unwrap());
        let (part, ()) = Json::from_part_of::<_, ()>("{}".into(), |_| Ok((elsewhere, ()))).unwrap();
        assert_eq!(part.json_text(), Some("true"));

        let failed = Json::from_part_of("{".into(), |t| {
            serde_json::from_str::<&RawValue>(t).map(|r| (r, ()))
        });
        assert_eq!(failed.err().map(|(_, text)| text).as_deref(), Some("{"));
    }

    #[test]
    fn bad_text_is_refused() {
        assert!(Json::from_json_text("{not json".into()).is_err());
    }

    #[test]
    fn text_too_deep_to_build_is_an_error_where_it_is_read_never_null() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let json = Json::from_json_text(deep.clone()).unwrap();
        let err = json.as_value().unwrap_err();
        assert!(err.to_string().contains("recursion"), "{err}");
        assert!(json.clone().into_value().is_err());
        assert!(serde_json::to_string(&json).is_err());
        assert_ne!(json, Value::Null);
        assert_eq!(json.to_string(), deep, "Display shows the stored text");
    }
}
