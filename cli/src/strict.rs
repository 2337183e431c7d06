//! A strict reader of JSON and YAML documents into `serde_json::Value`, as kubectl's
//! `--validate=strict` reads them: a duplicate key in a mapping, a key that is not a string,
//! and a number JSON cannot represent (`.nan`, `.inf`) are errors naming the field path,
//! never a silent last-one-wins or `null`.

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// How much a file may expand to: each value read costs its text's bytes plus a node's
/// (aliases make a small YAML file expand to any size; this stops it before the memory is
/// spent).
#[derive(Clone)]
pub struct Budget {
    left: Rc<Cell<usize>>,
    limit: usize,
    max_string: usize,
}

impl Budget {
    /// `limit` bytes for the whole file, strings of at most `max_string` bytes.
    pub fn new(limit: usize, max_string: usize) -> Self {
        Budget {
            left: Rc::new(Cell::new(limit)),
            limit,
            max_string,
        }
    }

    fn string<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        if bytes > self.max_string {
            return Err(E::custom(format!(
                "a string of {bytes} bytes is over the limit of {} \
                 (KVSYNC_MAX_STRING_BYTES raises it)",
                self.max_string
            )));
        }
        self.spend(bytes)
    }

    fn spend<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        let cost = bytes.saturating_add(NODE_BYTES);
        match self.left.get().checked_sub(cost) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "the values expand past the limit of {} bytes (aliases?); \
                 KVSYNC_MAX_EXPANDED_BYTES raises it",
                self.limit
            ))),
        }
    }
}

/// What one value costs beyond its text: about a `serde_json::Value`'s size.
const NODE_BYTES: usize = 32;

/// Reads one value strictly; `path` names where it is (`spec.order`), empty at the top.
pub struct Strict {
    budget: Budget,
    path: String,
    /// Whether messages start with the path (serde_yaml_ng puts it there itself).
    says_path: bool,
}

impl Strict {
    /// A reader of a whole JSON document: messages name the field path.
    pub fn json_document(budget: &Budget) -> Self {
        Strict {
            budget: budget.clone(),
            path: String::new(),
            says_path: true,
        }
    }

    /// A reader of a whole YAML document (serde_yaml_ng's errors name the path).
    pub fn yaml_document(budget: &Budget) -> Self {
        Strict {
            budget: budget.clone(),
            path: String::new(),
            says_path: false,
        }
    }

    fn child(&self, key: &str) -> Strict {
        Strict {
            budget: self.budget.clone(),
            path: if self.path.is_empty() {
                key.to_owned()
            } else {
                format!("{}.{key}", self.path)
            },
            says_path: self.says_path,
        }
    }

    fn item(&self, i: usize) -> Strict {
        Strict {
            budget: self.budget.clone(),
            path: format!("{}[{i}]", self.path),
            says_path: self.says_path,
        }
    }

    fn at(&self) -> String {
        if self.path.is_empty() {
            "the top level".to_owned()
        } else {
            self.path.clone()
        }
    }

    /// `message`, after the path where the format does not give it.
    fn error<E: de::Error>(&self, message: String) -> E {
        if self.says_path {
            E::custom(format!("{}: {message}", self.at()))
        } else {
            E::custom(message)
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON value at {}", self.at())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.spend(0)?;
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| self.error(format!("{v} is not a number JSON can represent")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.string(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.string(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.budget.spend(0)?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.spend(0)?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self.item(items.len()))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.spend(0)?;
        let mut out = Map::new();
        while let Some(key) = map.next_key_seed(Strict {
            budget: self.budget.clone(),
            path: self.path.clone(),
            says_path: self.says_path,
        })? {
            let Value::String(key) = key else {
                return Err(self.error(format!("key {key} is not a string")));
            };
            if out.contains_key(&key) {
                return Err(self.error(format!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(self.child(&key))?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn yaml(text: &str) -> Result<Value, String> {
        Strict::yaml_document(&Budget::new(1 << 20, 1 << 20))
            .deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(|e| e.to_string())
    }

    fn json_text(text: &str) -> Result<Value, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        Strict::json_document(&Budget::new(1 << 20, 1 << 20))
            .deserialize(&mut de)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn duplicate_keys_are_errors_naming_where() {
        let err = yaml("metadata:\n  name: a\n  name: b\n").unwrap_err();
        assert!(err.contains("metadata: duplicate key \"name\""), "{err}");
        let err = json_text(r#"{"spec": {"x": 1, "x": 2}}"#).unwrap_err();
        assert!(err.contains("spec: duplicate key \"x\""), "{err}");
        let err = json_text(r#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(err.contains("the top level: duplicate key"), "{err}");
        assert!(
            yaml("a: 1\na: 2\n")
                .unwrap_err()
                .contains("duplicate key \"a\"")
        );
    }

    #[test]
    fn numbers_json_cannot_represent_are_errors_never_null() {
        for bad in [
            "spec:\n  order: .nan\n",
            "spec:\n  order: .inf\n",
            "spec:\n  l: [1, -.inf]\n",
        ] {
            let err = yaml(bad).unwrap_err();
            assert!(
                err.contains("is not a number JSON can represent"),
                "{bad}: {err}"
            );
            assert!(err.contains("spec."), "{bad}: {err}");
        }
    }

    #[test]
    fn aliases_that_expand_past_the_budget_stop_before_the_memory_is_spent() {
        let long = "x".repeat(10_000);
        let text = format!(
            "a0: &a0 \"{long}\"\na1: &a1 [{}]\na2: [{}]\n",
            vec!["*a0"; 50].join(","),
            vec!["*a1"; 50].join(",")
        );
        let err = Strict::yaml_document(&Budget::new(1 << 20, 1 << 20))
            .deserialize(serde_yaml_ng::Deserializer::from_str(&text))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expand past the limit of 1048576 bytes"),
            "{err}"
        );
    }

    #[test]
    fn keys_that_are_not_strings_are_errors() {
        let err = yaml("spec:\n  1: one\n").unwrap_err();
        assert!(err.contains("not a string"), "{err}");
    }

    #[test]
    fn good_documents_read_as_serde_json_reads_them() {
        let text = "a: [1, 2.5, true, null, x]\nb: {c: d}\n";
        assert_eq!(
            yaml(text).unwrap(),
            json!({"a": [1, 2.5, true, null, "x"], "b": {"c": "d"}})
        );
        assert_eq!(
            json_text(r#"{"a": [1, {"b": null}]}"#).unwrap(),
            json!({"a": [1, {"b": null}]})
        );
    }
}
