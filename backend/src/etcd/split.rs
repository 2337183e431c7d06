//! Where to split the rest of a list so that its parts can be read side by side.
//!
//! etcd 3.4 walks its whole in-memory index from a range's start to its end on every range
//! request, however small the limit, and serves one request on one core. A list read page
//! after page from one start to the prefix's end therefore pays that walk again for every
//! page and keeps etcd to one core. Reading the rest of a list as a few ranges with their
//! own ends, at the same revision and at the same time, removes both costs.
//!
//! The split keys are estimated from the keys of the first page: each key is read as a
//! number (where all the keys have one length and end in digits, those positions count in
//! base 10; any other position in base 40: end of key, `-`, `.`, `/`, digits, letters) and the rest of the keys are assumed
//! to follow at the first page's density. A poor estimate only makes the parts uneven: any
//! byte string is a valid range boundary, and the parts always cover the whole rest.

/// Positions of a key read as a number: 40^24 < 2^128.
const WINDOW: usize = 24;
/// Positions before the first one where the first page's keys differ, included in the
/// window because the keys after the first page may differ there.
const WINDOW_BACK: usize = 6;

/// The value of byte `b` at a position counted in base 40 (0 is the end of the key); the
/// map keeps byte order (bytes outside a key's alphabet share a neighbour's value).
fn symbol(b: Option<u8>) -> u128 {
    match b {
        None => 0,
        Some(b) => match b {
            0..=44 => 0,
            b'-' => 1,
            b'.' => 2,
            b'/' => 3,
            b'0'..=b'9' => 4 + (b - b'0') as u128,
            b':'..=b'`' => 13,
            b'a'..=b'z' => 14 + (b - b'a') as u128,
            _ => 39,
        },
    }
}

fn symbol_byte(v: u128) -> Option<u8> {
    match v {
        0 => None,
        1 => Some(b'-'),
        2 => Some(b'.'),
        3 => Some(b'/'),
        4..=13 => Some(b'0' + (v - 4) as u8),
        _ => Some(b'a' + (v.min(39) - 14) as u8),
    }
}

fn digit(b: Option<u8>) -> u128 {
    match b {
        Some(b @ b'0'..=b'9') => (b - b'0') as u128,
        Some(b) if b > b'9' => 9,
        _ => 0,
    }
}

/// How the positions of the window count.
struct Window {
    start: usize,
    /// Per position: true when it counts in base 10.
    digits: Vec<bool>,
}

impl Window {
    fn radix(&self, i: usize) -> u128 {
        if self.digits[i] { 10 } else { 40 }
    }

    /// The number past every key that starts with the window's prefix.
    fn capacity(&self) -> u128 {
        (0..self.digits.len()).map(|i| self.radix(i)).product()
    }

    fn number(&self, key: &[u8]) -> u128 {
        let mut n = 0u128;
        for (i, &is_digit) in self.digits.iter().enumerate() {
            let b = key.get(self.start + i).copied();
            let v = if is_digit { digit(b) } else { symbol(b) };
            n = n * self.radix(i) + v;
        }
        n
    }

    /// The key for `n` (which is below the capacity), after `prefix` (the window's prefix).
    fn key(&self, prefix: &[u8], mut n: u128) -> Vec<u8> {
        let mut values = vec![0u128; self.digits.len()];
        for i in (0..self.digits.len()).rev() {
            values[i] = n % self.radix(i);
            n /= self.radix(i);
        }
        let mut key = prefix.to_vec();
        for (i, v) in values.into_iter().enumerate() {
            if self.digits[i] {
                key.push(b'0' + v as u8);
            } else {
                match symbol_byte(v) {
                    Some(b) => key.push(b),
                    None => break,
                }
            }
        }
        key
    }
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

/// Up to `parts - 1` keys, strictly increasing, strictly between `after` and `end`, that split
/// the range from `after` to `end` (where `remaining` keys are) into `parts` parts of about
/// as many keys each, estimated from `seen`: the sorted keys read so far, all of which start
/// with `floor` (the list's prefix). Empty when the keys give nothing to go by.
pub(super) fn split_keys(
    seen: &[&[u8]],
    floor: usize,
    after: &[u8],
    end: &[u8],
    remaining: usize,
    parts: usize,
) -> Vec<Vec<u8>> {
    let (Some(first), Some(last)) = (seen.first(), seen.last()) else {
        return Vec::new();
    };
    if seen.len() < 2 || parts < 2 {
        return Vec::new();
    }
    let differ = first
        .iter()
        .zip(last.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let start = differ
        .saturating_sub(WINDOW_BACK)
        .max(floor)
        .min(last.len());
    // Base 10 only where every key ends in digits there (a number at the end of names of one
    // length): elsewhere a position that held digits so far may hold letters further on.
    let len = last.len();
    let same_len = seen.iter().all(|k| k.len() == len);
    let digits_from = seen
        .iter()
        .map(|k| k.len() - k.iter().rev().take_while(|b| b.is_ascii_digit()).count())
        .max()
        .unwrap_or(len);
    let digits = (0..WINDOW)
        .map(|i| same_len && start + i >= digits_from && start + i < len)
        .collect();
    let window = Window { start, digits };
    let (f, l) = (window.number(first), window.number(last));
    if l <= f {
        return Vec::new();
    }
    let prefix = &last[..start];
    let capacity = window.capacity();
    // Numbers per key, as seen in the keys read.
    let step = (l - f) as f64 / (seen.len() - 1) as f64;
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for i in 1..parts {
        let ahead = step * remaining as f64 * i as f64 / parts as f64;
        let target = l as f64 + ahead;
        let key = if target < capacity as f64 {
            window.key(prefix, (target as u128).min(capacity - 1))
        } else {
            // Past every key with the window's prefix: the rest lies after it.
            match successor(prefix) {
                Some(k) if start > floor => k,
                _ => break,
            }
        };
        let above = keys.last().map_or(after, Vec::as_slice);
        if key.as_slice() > above && key.as_slice() < end {
            keys.push(key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many of `keys` fall in each part that `splits` make.
    fn counts(keys: &[Vec<u8>], splits: &[Vec<u8>]) -> Vec<usize> {
        let mut counts = vec![0; splits.len() + 1];
        for k in keys {
            let part = splits.iter().filter(|s| k >= *s).count();
            counts[part] += 1;
        }
        counts
    }

    fn check_even(keys: Vec<Vec<u8>>, first_page: usize, parts: usize) -> Vec<usize> {
        let floor = b"/kvsync/v1/ippools/".len();
        let seen: Vec<&[u8]> = keys[..first_page].iter().map(Vec::as_slice).collect();
        let mut after = keys[first_page - 1].clone();
        after.push(0);
        let splits = split_keys(
            &seen,
            floor,
            &after,
            b"/kvsync/v1/ippools0",
            keys.len() - first_page,
            parts,
        );
        counts(&keys[first_page..], &splits)
    }

    fn sorted(mut keys: Vec<String>) -> Vec<Vec<u8>> {
        keys.sort();
        keys.into_iter().map(String::into_bytes).collect()
    }

    #[test]
    fn numbered_names_split_evenly() {
        let keys = sorted(
            (0..100_000)
                .map(|i| format!("/kvsync/v1/ippools/pool-{i:07}"))
                .collect(),
        );
        let c = check_even(keys, 10_000, 2);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|&n| n > 40_000), "{c:?}");
        // Names numbered without padding sort as text: still two real parts.
        let keys = sorted(
            (0..100_000)
                .map(|i| format!("/kvsync/v1/ippools/pool-{i}"))
                .collect(),
        );
        let c = check_even(keys, 10_000, 2);
        assert!(c.iter().all(|&n| n > 10_000), "{c:?}");
    }

    #[test]
    fn random_names_split_evenly() {
        // xorshift: deterministic, and no dependency for one test.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let keys = sorted(
            (0..50_000)
                .map(|_| {
                    let suffix: String = (0..10)
                        .map(|_| alphabet[next(alphabet.len())] as char)
                        .collect();
                    format!("/kvsync/v1/ippools/web-{suffix}")
                })
                .collect(),
        );
        let c = check_even(keys, 5_000, 3);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|&n| n > 10_000), "{c:?}");
    }

    #[test]
    fn splits_stay_inside_the_range_whatever_the_keys() {
        let cases: Vec<Vec<&[u8]>> = vec![
            vec![b"/p/a", b"/p/b"],
            vec![b"/p/\xff\xff", b"/p/\xff\xff\xff"],
            vec![b"/p/a", b"/p/a"],
            vec![b"/p/", b"/p/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"],
            vec![b"/p/0", b"/p/9"],
            vec![b"/p/a-1/x", b"/p/a-2/y", b"/p/zz/q"],
        ];
        for seen in cases {
            for remaining in [0, 1, 10, 1_000_000] {
                for parts in [1, 2, 5] {
                    let mut after = seen.last().unwrap().to_vec();
                    after.push(0);
                    let splits = split_keys(&seen, 3, &after, b"/p0", remaining, parts);
                    assert!(splits.len() < parts.max(1));
                    let mut low = after.clone();
                    for s in &splits {
                        assert!(*s > low, "{seen:?} {s:?}");
                        low = s.clone();
                    }
                    assert!(splits.iter().all(|s| s.as_slice() < b"/p0".as_slice()));
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever the keys read so far (sorted, under the prefix), the splits are strictly
        /// increasing and strictly inside the rest of the range.
        #[test]
        fn splits_are_ordered_and_inside_the_range(
            mut tails in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..30), 1..40),
            remaining in 0usize..10_000_000,
            parts in 1usize..10,
        ) {
            let prefix = b"/kvsync/v1/ippools/".to_vec();
            tails.sort();
            tails.dedup();
            let keys: Vec<Vec<u8>> = tails
                .iter()
                .map(|t| [prefix.as_slice(), t.as_slice()].concat())
                .collect();
            let seen: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let mut after = keys.last().cloned().unwrap_or_default();
            after.push(0);
            let end = b"/kvsync/v1/ippools0";
            let splits = split_keys(&seen, prefix.len(), &after, end, remaining, parts);
            proptest::prop_assert!(splits.len() < parts.max(2));
            let mut low = after.clone();
            for s in &splits {
                proptest::prop_assert!(*s > low);
                proptest::prop_assert!(s.as_slice() < end.as_slice());
                low = s.clone();
            }
        }
    }
}
