//! How YAML 1.1 readers and YAML 1.2 readers read a plain (unquoted) scalar.
//!
//! kubectl reads manifests with go-yaml v2 through sigs.k8s.io/yaml, a YAML 1.1 reader, as
//! PyYAML is: there a plain `no`, `on` or `y` is a boolean, `0777` is octal, `1_000` and
//! `1:30` are numbers. serde_yaml_ng writes YAML 1.2 (core schema), where all of these are
//! strings and are left plain. [`plain_scalar_1_1`] resolves a plain scalar as a YAML 1.1
//! reader does (the tag resolution of yaml.org/type `null`, `bool`, `int`, `float`,
//! `timestamp`, with go-yaml v2's wider float syntax such as `1e3`), [`plain_scalar_1_2`] as
//! the YAML 1.2 core schema does; where they differ on a string, the writer must quote it.
//!
//! ```
//! use kvsync_cli::yaml11::{needs_quotes, plain_scalar_1_1};
//! use serde_json::json;
//!
//! assert_eq!(plain_scalar_1_1("no"), json!(false));
//! assert_eq!(plain_scalar_1_1("0x1F"), json!(31));
//! assert!(needs_quotes("no") && needs_quotes("1_000") && !needs_quotes("pool"));
//! ```

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Number, Value};

fn re(pattern: &str) -> Regex {
    // The patterns are constants of this file, checked by its tests.
    Regex::new(pattern).unwrap_or_else(|e| unreachable!("bad pattern {pattern}: {e}"))
}

static BOOL_1_1: LazyLock<Regex> = LazyLock::new(|| {
    re(r"^(y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$")
});
static NULL: LazyLock<Regex> = LazyLock::new(|| re(r"^(~|null|Null|NULL|)$"));
static INT_1_1: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^([-+]?0b[0-1_]+",
        r"|[-+]?0[0-7_]+",
        r"|[-+]?(0|[1-9][0-9_]*)",
        r"|[-+]?0x[0-9a-fA-F_]+",
        r"|[-+]?[1-9][0-9_]*(:[0-5]?[0-9])+)$"
    ))
});
static FLOAT_1_1: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^([-+]?([0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)([eE][-+]?[0-9]+)?",
        // go-yaml v2 also takes whatever Go's ParseFloat takes: `1e3`, `+1E-5`.
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+",
        r"|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+\.[0-9_]*",
        r"|[-+]?\.(inf|Inf|INF)",
        r"|\.(nan|NaN|NAN))$"
    ))
});
static TIMESTAMP_1_1: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^([0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?",
        r"([Tt]|[ \t]+)?([0-9][0-9]?:[0-9][0-9]:[0-9][0-9](\.[0-9]*)?",
        r"([ \t]*(Z|[-+][0-9][0-9]?(:[0-9][0-9])?))?)?)$"
    ))
});
static BOOL_1_2: LazyLock<Regex> = LazyLock::new(|| re(r"^(true|True|TRUE|false|False|FALSE)$"));
static INT_1_2: LazyLock<Regex> = LazyLock::new(|| re(r"^([-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"));
static FLOAT_1_2: LazyLock<Regex> = LazyLock::new(|| {
    re(concat!(
        r"^([-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?",
        r"|[-+]?\.(inf|Inf|INF)|\.nan|\.NaN|\.NAN)$"
    ))
});

/// An integer of YAML 1.1 syntax (underscores, `0b`, `0x`, leading-zero octal, base 60).
fn int_1_1(s: &str) -> Option<Value> {
    let clean: String = s.chars().filter(|c| *c != '_').collect();
    let (negative, digits) = match clean.as_bytes().first() {
        Some(b'-') => (true, &clean[1..]),
        Some(b'+') => (false, &clean[1..]),
        _ => (false, clean.as_str()),
    };
    let magnitude: i128 = if let Some(b) = digits.strip_prefix("0b") {
        i128::from_str_radix(b, 2).ok()?
    } else if let Some(h) = digits.strip_prefix("0x") {
        i128::from_str_radix(h, 16).ok()?
    } else if digits.contains(':') {
        digits.split(':').try_fold(0i128, |acc, part| {
            Some(acc * 60 + part.parse::<i128>().ok()?)
        })?
    } else if digits.len() > 1 && digits.starts_with('0') {
        i128::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    let n = if negative { -magnitude } else { magnitude };
    i64::try_from(n)
        .map(Number::from)
        .ok()
        .or_else(|| u64::try_from(n).ok().map(Number::from))
        .map(Value::Number)
}

/// A float of YAML 1.1 syntax; infinities and NaN (which JSON cannot hold) as their text.
fn float_1_1(s: &str) -> Value {
    let clean: String = s.chars().filter(|c| *c != '_').collect();
    let value = if clean.contains(':') {
        let (sign, body) = match clean.strip_prefix('-') {
            Some(b) => (-1.0, b),
            None => (1.0, clean.trim_start_matches('+')),
        };
        body.split(':')
            .try_fold(0.0, |acc, part| {
                Some(acc * 60.0 + part.parse::<f64>().ok()?)
            })
            .map(|v| sign * v)
    } else {
        clean.parse::<f64>().ok()
    };
    value
        .and_then(Number::from_f64)
        .map_or_else(|| Value::String(format!("float:{s}")), Value::Number)
}

/// What a YAML 1.1 reader (kubectl's go-yaml v2, PyYAML) reads a plain scalar as. Timestamps
/// come back as `"timestamp:<text>"` (a reader turns them into times, not strings).
pub fn plain_scalar_1_1(s: &str) -> Value {
    if NULL.is_match(s) {
        Value::Null
    } else if BOOL_1_1.is_match(s) {
        Value::Bool(matches!(
            s,
            "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON"
        ))
    } else if INT_1_1.is_match(s) {
        int_1_1(s).unwrap_or_else(|| float_1_1(s))
    } else if FLOAT_1_1.is_match(s) {
        float_1_1(s)
    } else if TIMESTAMP_1_1.is_match(s) {
        Value::String(format!("timestamp:{s}"))
    } else {
        Value::String(s.to_owned())
    }
}

/// What a YAML 1.2 reader (core schema) reads a plain scalar as.
pub fn plain_scalar_1_2(s: &str) -> Value {
    if NULL.is_match(s) {
        Value::Null
    } else if BOOL_1_2.is_match(s) {
        Value::Bool(s.eq_ignore_ascii_case("true"))
    } else if INT_1_2.is_match(s) {
        let parsed = if let Some(o) = s.strip_prefix("0o") {
            i64::from_str_radix(o, 8).ok()
        } else if let Some(h) = s.strip_prefix("0x") {
            i64::from_str_radix(h, 16).ok()
        } else {
            s.parse::<i64>().ok()
        };
        parsed.map_or_else(|| float_1_1(s), |n| Value::Number(n.into()))
    } else if FLOAT_1_2.is_match(s) {
        float_1_1(s)
    } else {
        Value::String(s.to_owned())
    }
}

/// Whether a plain scalar that a YAML 1.2 writer left plain as a string (because a YAML 1.2
/// reader reads it as that string) would be read as something else by a YAML 1.1 reader:
/// such a scalar must be quoted for kubectl.
pub fn misread_by_1_1(s: &str) -> bool {
    let string = Value::String(s.to_owned());
    plain_scalar_1_2(s) == string && plain_scalar_1_1(s) != string
}

/// Whether a string written as a plain scalar would be read as something else than that
/// string by a YAML 1.1 or a YAML 1.2 reader: such a string must be quoted.
pub fn needs_quotes(s: &str) -> bool {
    plain_scalar_1_1(s) != Value::String(s.to_owned())
        || plain_scalar_1_2(s) != Value::String(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of yaml.org/type (bool, int, float, null, timestamp).
    #[test]
    fn the_yaml_1_1_type_examples_resolve_as_the_types_say() {
        for (text, want) in [
            ("y", json!(true)),
            ("NO", json!(false)),
            ("on", json!(true)),
            ("Off", json!(false)),
            ("~", Value::Null),
            ("null", Value::Null),
            ("685230", json!(685_230)),
            ("+685_230", json!(685_230)),
            ("02472256", json!(685_230)),
            ("0x_0A_74_AE", json!(685_230)),
            ("0b1010_0111_0100_1010_1110", json!(685_230)),
            ("190:20:30", json!(685_230)),
            ("6.8523015e+5", json!(685_230.15)),
            ("685.230_15e+03", json!(685_230.15)),
            ("685_230.15", json!(685_230.15)),
            ("190:20:30.15", json!(685_230.15)),
            ("1e3", json!(1000.0)),
            ("-.inf", json!("float:-.inf")),
            (".NaN", json!("float:.NaN")),
            ("2001-12-14", json!("timestamp:2001-12-14")),
            (
                "2001-12-14t21:59:43.10-05:00",
                json!("timestamp:2001-12-14t21:59:43.10-05:00"),
            ),
            ("pool", json!("pool")),
            ("10.0.0.0/16", json!("10.0.0.0/16")),
            ("1.2.3", json!("1.2.3")),
            ("kvsync.dev", json!("kvsync.dev")),
        ] {
            assert_eq!(plain_scalar_1_1(text), want, "{text}");
        }
    }

    #[test]
    fn yaml_1_2_reads_the_1_1_only_forms_as_strings() {
        for s in ["no", "on", "y", "1_000", "0b101", "1:30", "2001-12-14"] {
            assert_eq!(plain_scalar_1_2(s), json!(s), "{s}");
            assert!(needs_quotes(s) && misread_by_1_1(s), "{s}");
        }
        // Numbers and booleans a 1.2 writer wrote as such are read the same by both.
        for s in ["26", "1.5", "true", "null", "1e3"] {
            assert!(!misread_by_1_1(s), "{s}");
        }
        assert_eq!(plain_scalar_1_1("."), json!("."));
        assert_eq!(plain_scalar_1_2("0o17"), json!(15));
        assert_eq!(plain_scalar_1_2("true"), json!(true));
        assert_eq!(plain_scalar_1_2("1e3"), json!(1000.0));
        for s in [
            "pool",
            "kvsync-controller",
            "10.0.0.0/16",
            "RuntimeDefault",
            "v1",
        ] {
            assert!(!needs_quotes(s), "{s}");
        }
    }
}
