//! Validation rules for names, namespaces and common value fields.
//!
//! The rules are Kubernetes' (so every kvsync key is also a valid Kubernetes object name):
//! names are DNS-1123 subdomains, namespaces DNS-1123 labels.

use crate::error::{Error, Result};

/// The longest allowed name (a DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// The longest allowed namespace (a DNS-1123 label).
pub const MAX_NAMESPACE_LEN: usize = 63;

fn check_common(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            field,
            format!("must not contain control characters (found {c:?})"),
        ));
    }
    if value.contains('/') {
        return Err(Error::invalid(field, "must not contain '/'"));
    }
    if value.contains("..") {
        return Err(Error::invalid(field, "must not contain '..'"));
    }
    Ok(())
}

/// Whether `b` is a DNS-1123 subdomain of at most `max` bytes, in one pass: the common case
/// of every valid name, checked before the rule-by-rule checks that explain a failure.
fn is_subdomain_fast(b: &[u8], max: usize, dots: bool) -> bool {
    if b.is_empty() || b.len() > max {
        return false;
    }
    let mut prev = b'.';
    for &c in b {
        let ok = match c {
            b'a'..=b'z' | b'0'..=b'9' => true,
            b'-' => prev != b'.',
            b'.' => dots && prev != b'.' && prev != b'-',
            _ => false,
        };
        if !ok {
            return false;
        }
        prev = c;
    }
    prev.is_ascii_alphanumeric()
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    // Kubernetes' subdomain regex does not bound its labels' length; namespaces are bounded
    // by their own length check.
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Checks that `name` is a DNS-1123 subdomain: at most 253 characters of lower-case
/// letters, digits, `-` and `.`, made of labels that start and end with a letter or digit.
///
/// ```
/// use kvsync_model::validation::validate_name;
/// assert!(validate_name("pool-1.example").is_ok());
/// assert!(validate_name("Bad_Name").is_err());
/// ```
///
/// # Errors
/// [`Error::Invalid`] with field `name` and the rule that was broken.
pub fn validate_name(name: &str) -> Result<()> {
    validate_subdomain("name", name)
}

/// Like [`validate_name`] for any field that must be a DNS-1123 subdomain.
///
/// # Errors
/// [`Error::Invalid`] naming `field` and the rule that was broken.
pub fn validate_subdomain(field: &str, name: &str) -> Result<()> {
    if is_subdomain_fast(name.as_bytes(), MAX_NAME_LEN, true) {
        return Ok(());
    }
    check_common(field, name)?;
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {MAX_NAME_LEN} characters (got {})",
                name.len()
            ),
        ));
    }
    if !name.split('.').all(is_label) {
        return Err(Error::invalid(
            field,
            format!(
                "{name:?} is not a DNS-1123 subdomain: use lower-case letters, digits, '-' and \
                 '.', starting and ending each part with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Checks that `namespace` is a DNS-1123 label: at most 63 characters of lower-case letters,
/// digits and `-`, starting and ending with a letter or digit.
///
/// # Errors
/// [`Error::Invalid`] with field `namespace` and the rule that was broken.
pub fn validate_namespace(namespace: &str) -> Result<()> {
    if is_subdomain_fast(namespace.as_bytes(), MAX_NAMESPACE_LEN, false) {
        return Ok(());
    }
    check_common("namespace", namespace)?;
    if namespace.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(
            "namespace",
            format!(
                "must be at most {MAX_NAMESPACE_LEN} characters (got {})",
                namespace.len()
            ),
        ));
    }
    if !is_label(namespace) {
        return Err(Error::invalid(
            "namespace",
            format!(
                "{namespace:?} is not a DNS-1123 label: use lower-case letters, digits and '-', \
                 starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// Parses an IPv4 or IPv6 CIDR such as `10.0.0.0/16`, checking that the host bits are zero.
///
/// Returns the prefix length and whether the address is IPv6.
///
/// # Errors
/// [`Error::Invalid`] naming `field` when the text is no CIDR or has host bits set.
pub fn parse_cidr(field: &str, cidr: &str) -> Result<(u8, bool)> {
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| Error::invalid(field, format!("{cidr:?} is not a CIDR (missing '/')")))?;
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| Error::invalid(field, format!("{addr:?} is not an IP address")))?;
    // Canonical decimal only: Rust's integer parser would also take `+8`.
    let canonical = !len.is_empty()
        && len.len() <= 3
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len == "0" || !len.starts_with('0'));
    let len: u8 = canonical
        .then(|| len.parse().ok())
        .flatten()
        .ok_or_else(|| {
            Error::invalid(
                field,
                format!(
                    "{len:?} is not a prefix length (a decimal number without sign or leading zero)"
                ),
            )
        })?;
    let (bits, value): (u8, u128) = match ip {
        std::net::IpAddr::V4(v4) => (32, u32::from(v4) as u128),
        std::net::IpAddr::V6(v6) => (128, u128::from(v6)),
    };
    if len > bits {
        return Err(Error::invalid(
            field,
            format!("prefix length {len} is longer than {bits}"),
        ));
    }
    let host_bits = bits - len;
    let mask = if host_bits == 0 {
        0
    } else {
        (1u128 << host_bits) - 1
    };
    if value & mask != 0 {
        return Err(Error::invalid(
            field,
            format!("{cidr:?} has host bits set; use the network address"),
        ));
    }
    Ok((len, matches!(ip, std::net::IpAddr::V6(_))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_1123_subdomain_rules() {
        for ok in ["a", "a-b", "a.b", "0", "x".repeat(253).as_str()] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a..b",
            "a/b",
            ".a",
            "a\n",
            "a_b",
            "x".repeat(254).as_str(),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(
                matches!(err, Error::Invalid { ref field, .. } if field == "name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_fast_check_agrees_with_the_rules() {
        // Every string of up to 5 characters over an alphabet that exercises each rule.
        let alphabet = ['a', '0', '-', '.', 'A', '_'];
        let mut words = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = words
                .iter()
                .filter(|w| w.len() == words.last().map_or(0, String::len))
                .flat_map(|w| alphabet.iter().map(move |c| format!("{w}{c}")))
                .collect();
            words.extend(longer);
        }
        for w in &words {
            let b = w.as_bytes();
            let name_rules = check_common("name", w).is_ok() && w.split('.').all(is_label);
            assert_eq!(
                is_subdomain_fast(b, MAX_NAME_LEN, true),
                name_rules,
                "{w:?}"
            );
            let ns_rules = check_common("namespace", w).is_ok() && is_label(w);
            assert_eq!(
                is_subdomain_fast(b, MAX_NAMESPACE_LEN, false),
                ns_rules,
                "{w:?}"
            );
        }
        assert!(words.len() > 9_000);
    }

    #[test]
    fn namespaces_follow_dns_1123_label_rules() {
        assert!(validate_namespace("kube-system").is_ok());
        for bad in ["a.b", "", "x".repeat(64).as_str(), "A"] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(parse_cidr("cidr", "10.0.0.0/16").unwrap(), (16, false));
        assert_eq!(parse_cidr("cidr", "fd00::/64").unwrap(), (64, true));
        assert!(parse_cidr("cidr", "10.0.0.1/16").is_err());
        assert!(parse_cidr("cidr", "10.0.0.0/33").is_err());
        assert!(parse_cidr("cidr", "10.0.0.0").is_err());
        assert!(parse_cidr("cidr", "nope/8").is_err());
        // The prefix length is canonical decimal: no sign, no leading zero, no spaces.
        for bad in [
            "10.0.0.0/+8",
            "10.0.0.0/08",
            "10.0.0.0/ 8",
            "10.0.0.0/-8",
            "10.0.0.0/",
        ] {
            let err = parse_cidr("spec.cidr", bad).unwrap_err();
            assert!(err.to_string().contains("spec.cidr"), "{bad}: {err}");
        }
        assert_eq!(parse_cidr("cidr", "0.0.0.0/0").unwrap(), (0, false));
    }
}
