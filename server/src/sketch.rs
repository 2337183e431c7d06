//! Set reconciliation with an invertible Bloom lookup table (IBLT; Eppstein, Goodrich, Uyeda
//! and Varghese, "What's the Difference? Efficient Set Reconciliation without Prior Context",
//! SIGCOMM 2011).
//!
//! A client that cannot resume holds a set of items, one per key: the key's digest
//! contribution ([`contribution`](crate::protocol::contribution), a 64-bit hash of the key and
//! its revision). The server holds its own set. A sketch of `m` cells sums the items into
//! [`HASHES`] cells each; the server subtracts its sketch from the client's and peels the
//! difference: the items only the client holds (old revisions, deleted keys) and the items only
//! the server holds (what it must send). A sketch's size follows the difference, not the sets:
//! about 1.35 cells (18 bytes) per differing item, where bucket digests cost bytes per key held.
//! When the difference is larger than the sketch can peel, decoding says so and a larger sketch
//! (or the bucket digests) is used.
//!
//! ```
//! use kvsync_server::sketch::Sketch;
//!
//! let client = Sketch::of(30, [1, 2, 3, 4]);
//! let server = Sketch::of(30, [2, 3, 4, 5, 6]);
//! let (only_client, only_server) = client.minus(&server).unwrap().decode().unwrap();
//! assert_eq!(only_client, [1]);
//! let mut only_server = only_server;
//! only_server.sort();
//! assert_eq!(only_server, [5, 6]);
//! ```

use crate::protocol::{ProtocolError, fmix64};

/// The cells an item is added to (one in each third of the table).
pub const HASHES: usize = 3;

/// The bytes of one cell on the wire: count (1, modulo 256), item sum (8), check sum (4),
/// each little-endian. Counts modulo 256 suffice: a difference's cell that holds one item
/// counts 1 or 255, and the check sum tells it from a cell that holds more.
pub const CELL_BYTES: usize = 13;

/// The most cells a sketch may have (13 MiB).
pub const MAX_CELLS: usize = 1 << 20;

const SALTS: [u64; HASHES] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
];

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Cell {
    count: u8,
    id: u64,
    check: u32,
}

/// An IBLT of 64-bit items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sketch {
    cells: Vec<Cell>,
}

/// An item's check value: a cell holding exactly one item has `check == check_of(id)`.
fn check_of(id: u64) -> u32 {
    (fmix64(id ^ 0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

impl Sketch {
    /// An empty sketch of about `cells` cells (rounded up to a multiple of [`HASHES`], at most
    /// [`MAX_CELLS`]).
    pub fn new(cells: usize) -> Sketch {
        let n = cells.clamp(HASHES, MAX_CELLS).div_ceil(HASHES) * HASHES;
        Sketch {
            cells: vec![Cell::default(); n],
        }
    }

    /// A sketch of about `cells` cells holding `items`.
    pub fn of(cells: usize, items: impl IntoIterator<Item = u64>) -> Sketch {
        let mut s = Sketch::new(cells);
        for id in items {
            s.add(id, 1);
        }
        s
    }

    /// How many cells it has.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether it has no cells (never: a sketch has [`HASHES`] at least).
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    fn positions(&self, id: u64) -> [usize; HASHES] {
        let sub = self.cells.len() / HASHES;
        let mut out = [0; HASHES];
        for (j, slot) in out.iter_mut().enumerate() {
            *slot = j * sub + (fmix64(id ^ SALTS[j]) % sub as u64) as usize;
        }
        out
    }

    fn add(&mut self, id: u64, sign: u8) {
        let check = check_of(id);
        for p in self.positions(id) {
            let c = &mut self.cells[p];
            c.count = c.count.wrapping_add(sign);
            c.id ^= id;
            c.check ^= check;
        }
    }

    /// Adds `id` (`true`) or takes it out (`false`): a sketch kept in step with a changing set.
    pub fn toggle(&mut self, id: u64, add: bool) {
        self.add(id, if add { 1 } else { u8::MAX });
    }

    /// This sketch minus `other` (of the same size): a sketch of the items only this one
    /// holds (count +1) and those only `other` holds (count -1).
    ///
    /// # Errors
    /// When the sizes differ.
    pub fn minus(&self, other: &Sketch) -> Result<Sketch, ProtocolError> {
        if self.cells.len() != other.cells.len() {
            return Err(ProtocolError::Corrupt(format!(
                "sketches of {} and {} cells",
                self.cells.len(),
                other.cells.len()
            )));
        }
        Ok(Sketch {
            cells: self
                .cells
                .iter()
                .zip(&other.cells)
                .map(|(a, b)| Cell {
                    count: a.count.wrapping_sub(b.count),
                    id: a.id ^ b.id,
                    check: a.check ^ b.check,
                })
                .collect(),
        })
    }

    /// Peels a difference ([`Sketch::minus`]): the items only the first sketch held, and those
    /// only the second held; `None` when the difference is too large for the sketch (or the
    /// sketch is not a difference of two sets).
    pub fn decode(mut self) -> Option<(Vec<u64>, Vec<u64>)> {
        let pure = |c: &Cell| (c.count == 1 || c.count == u8::MAX) && c.check == check_of(c.id);
        let mut plus = Vec::new();
        let mut minus = Vec::new();
        let mut stack: Vec<usize> = (0..self.cells.len())
            .filter(|&i| pure(&self.cells[i]))
            .collect();
        // Each step takes one item out; more steps than cells can hold items is garbage.
        let mut budget = self.cells.len() * 2;
        while let Some(i) = stack.pop() {
            let c = self.cells[i];
            if !pure(&c) {
                continue;
            }
            budget = budget.checked_sub(1)?;
            if c.count == 1 {
                plus.push(c.id);
            } else {
                minus.push(c.id);
            }
            self.add(c.id, c.count.wrapping_neg());
            for p in self.positions(c.id) {
                if pure(&self.cells[p]) {
                    stack.push(p);
                }
            }
        }
        self.cells
            .iter()
            .all(|c| *c == Cell::default())
            .then_some((plus, minus))
    }

    /// The sketch as a [`Message::Sketch`](crate::protocol::Message::Sketch) carries it:
    /// [`CELL_BYTES`] a cell, in base64.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(self.cells.len() * CELL_BYTES);
        for c in &self.cells {
            bytes.push(c.count);
            bytes.extend_from_slice(&c.id.to_le_bytes());
            bytes.extend_from_slice(&c.check.to_le_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A sketch of exactly `cells` cells from its text ([`Sketch::encode`]).
    ///
    /// # Errors
    /// [`ProtocolError::Corrupt`] when the text is not base64 of `cells` cells, or `cells` is
    /// not a multiple of [`HASHES`] up to [`MAX_CELLS`].
    pub fn decode_text(cells: usize, text: &str) -> Result<Sketch, ProtocolError> {
        use base64::Engine;
        if cells == 0 || cells % HASHES != 0 || cells > MAX_CELLS {
            return Err(ProtocolError::Corrupt(format!(
                "a sketch of {cells} cells (a multiple of {HASHES}, at most {MAX_CELLS})"
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| ProtocolError::Corrupt(format!("sketch: {e}")))?;
        if bytes.len() != cells * CELL_BYTES {
            return Err(ProtocolError::Corrupt(format!(
                "{} bytes of sketch where {cells} cells need {}",
                bytes.len(),
                cells * CELL_BYTES
            )));
        }
        Ok(Sketch {
            cells: bytes
                .chunks_exact(CELL_BYTES)
                .map(|c| Cell {
                    count: c[0],
                    id: u64::from_le_bytes(c[1..9].try_into().unwrap_or_default()),
                    check: u32::from_le_bytes(c[9..13].try_into().unwrap_or_default()),
                })
                .collect(),
        })
    }

    /// The largest [`Message::Sketch`](crate::protocol::Message::Sketch) frame of `cells`
    /// cells: what a server accepts once it asked for one.
    pub fn frame_limit(cells: usize) -> usize {
        (cells.min(MAX_CELLS) * CELL_BYTES).div_ceil(3) * 4 + 256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64)
            .map(|i| fmix64((seed << 40) | (i + 1)))
            .collect()
    }

    #[test]
    fn differences_peel_exactly_when_the_sketch_is_large_enough() {
        let common = ids(1, 100_000);
        let only_a = ids(2, 700);
        let only_b = ids(3, 900);
        let a = Sketch::of(3000, common.iter().chain(&only_a).copied());
        let b = Sketch::of(3000, common.iter().chain(&only_b).copied());
        let (mut plus, mut minus) = a.minus(&b).unwrap().decode().expect("peels");
        let (mut want_a, mut want_b) = (only_a.clone(), only_b.clone());
        for v in [&mut plus, &mut minus, &mut want_a, &mut want_b] {
            v.sort_unstable();
        }
        assert_eq!((plus, minus), (want_a, want_b));
        // The same difference in a sketch too small for it: a clear no, never a wrong answer.
        let a = Sketch::of(600, common.iter().chain(&only_a).copied());
        let b = Sketch::of(600, common.iter().chain(&only_b).copied());
        assert_eq!(a.minus(&b).unwrap().decode(), None);
        // No difference: nothing either way.
        let a = Sketch::of(30, common.iter().copied());
        assert_eq!(
            a.minus(&a.clone()).unwrap().decode(),
            Some((Vec::new(), Vec::new()))
        );
    }

    #[test]
    fn sketches_round_trip_and_bad_text_is_an_error() {
        let s = Sketch::of(31, [1, 2, 3]);
        assert_eq!(s.len(), 33);
        let text = s.encode();
        assert_eq!(Sketch::decode_text(33, &text).unwrap(), s);
        assert!(text.len() < Sketch::frame_limit(33));
        assert!(Sketch::decode_text(36, &text).is_err(), "the wrong size");
        assert!(
            Sketch::decode_text(34, &text).is_err(),
            "not a multiple of 3"
        );
        assert!(Sketch::decode_text(33, "!!").is_err());
        assert!(Sketch::of(30, [1]).minus(&Sketch::of(60, [1])).is_err());
        // Garbage decodes to a no, not a panic or a loop.
        let junk = Sketch::decode_text(33, &{
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(
                (0..33 * CELL_BYTES)
                    .map(|i| (i * 37 % 251) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .unwrap();
        let _ = junk.decode();
    }
}
