//! Gorilla compression of `(timestamp, f64)` streams (Pelkonen et al., *Gorilla: A Fast,
//! Scalable, In-Memory Time Series Database*, VLDB 2015, section 4.1).
//!
//! # Why this is written here rather than taken from a crate
//!
//! We looked at the crates on crates.io first. `tsz` (0.1.4, last release 2023) is the only
//! float-XOR Gorilla codec, and it does not fit a governed memtable:
//! * a timestamp earlier than the previous one underflows `u64` (`time - self.time`): a panic in
//!   debug builds and garbage in release, where we need a typed "out of order" error;
//! * the first delta is stored in 14 bits and a delta-of-delta is cast `as i32`, so a gap over
//!   ~4.5 hours, or nanosecond timestamps, are silently corrupted;
//! * the encoder owns its writer and only yields bytes on `close()`, so neither the encoded size
//!   (which we must account to the governor as it grows) nor the points written so far (which
//!   reads must see) are available while appending.
//!
//! `tsz-compress` is a macro-generated integer delta codec, not Gorilla floats. So the codec is
//! written here, small enough to read in one sitting and checked against the paper's worked
//! example (Figure 2) and by property tests that round-trip arbitrary `f64` bit patterns (NaN
//! payloads, `-0.0`, infinities, subnormals) and arbitrary increasing `i64` timestamps.
//!
//! # Format of one block
//!
//! ```text
//! header   : t_start, 64 bits (the first timestamp, or an aligned window start)
//! each point, timestamps (delta-of-delta D against the previous delta; the first point's
//! previous timestamp is t_start and its previous delta 0):
//!   D == 0                -> '0'
//!   D in [-63, 64]        -> '10'   + (D-1) in 7 bits (two's complement)
//!   D in [-255, 256]      -> '110'  + (D-1) in 9 bits
//!   D in [-2047, 2048]    -> '1110' + (D-1) in 12 bits
//!   otherwise             -> '1111' + D in 64 bits
//! values (XOR against the previous value's bits; the first value is stored raw in 64 bits):
//!   XOR == 0              -> '0'
//!   fits previous window  -> '10' + the meaningful bits of the previous window
//!   otherwise             -> '11' + leading zeros (5 bits, capped at 31)
//!                                 + meaningful length (6 bits, 64 written as 0) + the bits
//! ```
//!
//! Two deliberate departures from the paper, both because our timestamps are arbitrary `i64`
//! (often nanoseconds) rather than seconds inside a two-hour block: the first point's delta is
//! coded like every other delta-of-delta instead of in a fixed 14-bit field, and the widest
//! delta-of-delta bucket holds 64 bits instead of 32. Arithmetic on deltas wraps, so every
//! strictly increasing `i64` sequence round-trips, including `i64::MIN .. i64::MAX` jumps.
//!
//! Blocks do not carry an end marker: the memtable and the segment directory store the point
//! count and bit length, and the decoder stops on those, so a truncated block is a typed
//! [`DecodeError`] instead of a misread.

mod bits;

pub use bits::{BitReader, BitWriter};

/// One sample: a timestamp (any `i64` unit, typically ms or ns since the epoch) and a value.
///
/// Values are compared bit for bit by [`Point::bit_eq`]: `NaN` payloads and `-0.0` are data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Timestamp; strictly increasing within a series' in-memory block.
    pub ts: i64,
    /// The sample value, stored bit-exactly.
    pub value: f64,
}

impl Point {
    /// A point.
    pub const fn new(ts: i64, value: f64) -> Self {
        Self { ts, value }
    }

    /// Equality of timestamp and of the value's bit pattern (so `NaN == NaN` with the same
    /// payload, and `0.0 != -0.0`).
    pub fn bit_eq(&self, other: &Self) -> bool {
        self.ts == other.ts && self.value.to_bits() == other.value.to_bits()
    }
}

/// Upper bound on the bits one appended point can take, header included (the first point of a
/// block: 64-bit header + `'1111'` + 64-bit delta + 64-bit raw value). The memtable keeps at
/// least this much spare capacity reserved before it appends.
pub const MAX_BITS_PER_POINT: u64 = 64 + 4 + 64 + 64;

/// A point could not be appended to a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Timestamps in a block must strictly increase; this one does not.
    #[error(
        "out-of-order timestamp {got}: the block's last timestamp is {last}; timestamps must strictly increase"
    )]
    OutOfOrder {
        /// The block's last timestamp.
        last: i64,
        /// The rejected timestamp.
        got: i64,
    },
}

/// An encoded block could not be decoded (truncated or corrupt bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bits ran out before `count` points were read.
    #[error("block truncated: ran out of bits at bit {bit} while reading point {point} of {count}")]
    Truncated {
        /// Index of the point being read.
        point: u64,
        /// Points the block claims to hold.
        count: u64,
        /// Bit position where the stream ended.
        bit: u64,
    },
    /// The bits decode to something an encoder never writes.
    #[error("block corrupt at point {point}: {reason}")]
    Corrupt {
        /// Index of the point being read.
        point: u64,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Appends points to one Gorilla block, keeping the block readable at all times.
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    bits: BitWriter,
    count: u64,
    header: Option<i64>,
    first_ts: i64,
    last_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    window: Option<(u32, u32)>,
}

impl Encoder {
    /// An empty block; the first appended timestamp becomes its header. Owns no heap memory
    /// until capacity is granted with [`Encoder::grow_to_words`] or the first append.
    pub const fn new() -> Self {
        Self {
            bits: BitWriter::new(),
            count: 0,
            header: None,
            first_ts: 0,
            last_ts: 0,
            prev_delta: 0,
            prev_value: 0,
            window: None,
        }
    }

    /// An empty block whose header is `start` (the paper's aligned window start); the first
    /// point's timestamp must be `>= start`.
    pub fn with_header(start: i64) -> Self {
        let mut e = Self::new();
        e.header = Some(start);
        e
    }

    /// Points in the block.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// `true` when no point has been appended.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bits written (header included).
    pub fn bit_len(&self) -> u64 {
        self.bits.bit_len()
    }

    /// Bytes of heap the block owns (capacity, which is what the allocator handed out).
    pub fn heap_bytes(&self) -> usize {
        self.bits.heap_bytes()
    }

    /// Bits that can be appended without a reallocation.
    pub fn spare_bits(&self) -> u64 {
        self.bits.spare_bits()
    }

    /// Word capacity.
    pub fn capacity_words(&self) -> usize {
        self.bits.capacity_words()
    }

    /// Grows the buffer to exactly `words` words of capacity (no-op if already that large).
    pub fn grow_to_words(&mut self, words: usize) {
        self.bits.grow_to_words(words);
    }

    /// First timestamp (meaningless when empty).
    pub fn first_ts(&self) -> i64 {
        self.first_ts
    }

    /// Last timestamp (meaningless when empty).
    pub fn last_ts(&self) -> i64 {
        self.last_ts
    }

    /// Appends a point. Fails, leaving the block unchanged, when `ts` does not strictly
    /// increase.
    pub fn append(&mut self, ts: i64, value: f64) -> Result<(), EncodeError> {
        let value_bits = value.to_bits();
        if self.count == 0 {
            let start = match self.header {
                Some(h) if ts < h => return Err(EncodeError::OutOfOrder { last: h, got: ts }),
                Some(h) => h,
                None => ts,
            };
            self.bits.write_bits(start as u64, 64);
            self.last_ts = start;
            self.prev_delta = 0;
            self.write_timestamp(ts);
            self.bits.write_bits(value_bits, 64);
            self.first_ts = ts;
        } else {
            if ts <= self.last_ts {
                return Err(EncodeError::OutOfOrder {
                    last: self.last_ts,
                    got: ts,
                });
            }
            self.write_timestamp(ts);
            self.write_value(value_bits);
        }
        self.prev_value = value_bits;
        self.count += 1;
        Ok(())
    }

    fn write_timestamp(&mut self, ts: i64) {
        let delta = ts.wrapping_sub(self.last_ts);
        let dod = delta.wrapping_sub(self.prev_delta);
        if dod == 0 {
            self.bits.write_bit(false);
        } else {
            // Zero has its own code, so each bucket is shifted by one: (D-1) in n bits covers
            // D in [-(2^(n-1)) + 1, 2^(n-1)], exactly the paper's ranges.
            let shifted = dod.wrapping_sub(1);
            if (-64..64).contains(&shifted) {
                self.bits.write_bits(0b10, 2);
                self.bits.write_bits(shifted as u64, 7);
            } else if (-256..256).contains(&shifted) {
                self.bits.write_bits(0b110, 3);
                self.bits.write_bits(shifted as u64, 9);
            } else if (-2048..2048).contains(&shifted) {
                self.bits.write_bits(0b1110, 4);
                self.bits.write_bits(shifted as u64, 12);
            } else {
                self.bits.write_bits(0b1111, 4);
                self.bits.write_bits(dod as u64, 64);
            }
        }
        self.prev_delta = delta;
        self.last_ts = ts;
    }

    fn write_value(&mut self, value_bits: u64) {
        let xor = value_bits ^ self.prev_value;
        if xor == 0 {
            self.bits.write_bit(false);
            return;
        }
        self.bits.write_bit(true);
        // 5 bits hold at most 31 leading zeros; a longer run is stored as part of the
        // meaningful bits, as in the paper.
        let leading = xor.leading_zeros().min(31);
        let trailing = xor.trailing_zeros();
        match self.window {
            Some((pl, pt)) if leading >= pl && trailing >= pt => {
                self.bits.write_bit(false);
                self.bits.write_bits(xor >> pt, 64 - pl - pt);
            }
            _ => {
                let meaningful = 64 - leading - trailing;
                self.bits.write_bit(true);
                self.bits.write_bits(u64::from(leading), 5);
                // 64 does not fit in 6 bits; a length of 0 never occurs, so 0 stands for 64.
                self.bits.write_bits(u64::from(meaningful & 63), 6);
                self.bits.write_bits(xor >> trailing, meaningful);
                self.window = Some((leading, trailing));
            }
        }
    }

    /// Decodes the points written so far.
    pub fn iter(&self) -> Decoder<'_> {
        Decoder::new(self.bits.words(), self.bits.bit_len(), self.count)
    }

    /// Seals the block into its immutable form, keeping the buffer (no copy).
    pub fn into_block(self) -> Block {
        let (words, bit_len) = self.bits.into_parts();
        Block {
            words,
            bit_len,
            count: self.count,
            first_ts: self.first_ts,
            last_ts: self.last_ts,
        }
    }

    /// The raw words written so far (the last one may be partly used).
    pub fn words(&self) -> &[u64] {
        self.bits.words()
    }
}

impl<'a> IntoIterator for &'a Encoder {
    type Item = Result<Point, DecodeError>;
    type IntoIter = Decoder<'a>;

    fn into_iter(self) -> Decoder<'a> {
        self.iter()
    }
}

/// An immutable encoded block: what the memtable freezes and a segment stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Encoded words, most significant bit first.
    pub words: Vec<u64>,
    /// Meaningful bits in `words`.
    pub bit_len: u64,
    /// Points in the block.
    pub count: u64,
    /// First timestamp.
    pub first_ts: i64,
    /// Last timestamp.
    pub last_ts: i64,
}

impl Block {
    /// Decodes the block.
    pub fn iter(&self) -> Decoder<'_> {
        Decoder::new(&self.words, self.bit_len, self.count)
    }

    /// Heap bytes owned by the block (its capacity).
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Words that carry data (`ceil(bit_len / 64)`), the part a segment stores.
    pub fn used_words(&self) -> usize {
        self.bit_len.div_ceil(64) as usize
    }
}

impl<'a> IntoIterator for &'a Block {
    type Item = Result<Point, DecodeError>;
    type IntoIter = Decoder<'a>;

    fn into_iter(self) -> Decoder<'a> {
        self.iter()
    }
}

/// Streams the points of a block, stopping after `count` points; each item is a point or the
/// reason the block cannot be read further.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    reader: BitReader<'a>,
    count: u64,
    read: u64,
    last_ts: i64,
    prev_delta: i64,
    prev_value: u64,
    window: Option<(u32, u32)>,
    failed: bool,
}

impl<'a> Decoder<'a> {
    /// A decoder over `count` points in the first `bit_len` bits of `words`.
    pub fn new(words: &'a [u64], bit_len: u64, count: u64) -> Self {
        Self {
            reader: BitReader::new(words, bit_len),
            count,
            read: 0,
            last_ts: 0,
            prev_delta: 0,
            prev_value: 0,
            window: None,
            failed: false,
        }
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            point: self.read,
            count: self.count,
            bit: self.reader.position(),
        }
    }

    fn bits(&mut self, n: u32) -> Result<u64, DecodeError> {
        self.reader.read_bits(n).map_err(|_| self.truncated())
    }

    fn bit(&mut self) -> Result<bool, DecodeError> {
        self.bits(1).map(|b| b == 1)
    }

    fn read_timestamp(&mut self) -> Result<i64, DecodeError> {
        // The control code is a run of up to four '1's ended by a '0' (the fourth '1' needs
        // no terminator): its length picks the field width.
        let mut ones = 0;
        while ones < 4 && self.bit()? {
            ones += 1;
        }
        let dod = match ones {
            0 => 0,
            4 => self.bits(64)? as i64,
            _ => {
                let width = [7, 9, 12][ones - 1];
                let raw = self.bits(width)?;
                // Sign-extend the n-bit two's complement field, then undo the shift by one.
                let shift = 64 - width;
                (((raw << shift) as i64) >> shift).wrapping_add(1)
            }
        };
        let delta = self.prev_delta.wrapping_add(dod);
        let ts = self.last_ts.wrapping_add(delta);
        if self.read > 0 && ts <= self.last_ts {
            return Err(DecodeError::Corrupt {
                point: self.read,
                reason: "timestamps do not increase",
            });
        }
        self.prev_delta = delta;
        self.last_ts = ts;
        Ok(ts)
    }

    fn read_value(&mut self) -> Result<u64, DecodeError> {
        let point = self.read;
        if !self.bit()? {
            return Ok(self.prev_value);
        }
        let xor = if self.bit()? {
            let leading = self.bits(5)? as u32;
            let mut meaningful = self.bits(6)? as u32;
            if meaningful == 0 {
                meaningful = 64;
            }
            if leading + meaningful > 64 {
                return Err(DecodeError::Corrupt {
                    point,
                    reason: "leading zeros + meaningful bits exceed 64",
                });
            }
            let trailing = 64 - leading - meaningful;
            self.window = Some((leading, trailing));
            self.bits(meaningful)? << trailing
        } else {
            let Some((pl, pt)) = self.window else {
                return Err(DecodeError::Corrupt {
                    point,
                    reason: "value reuses a window before one was set",
                });
            };
            self.bits(64 - pl - pt)? << pt
        };
        Ok(self.prev_value ^ xor)
    }

    fn next_point(&mut self) -> Result<Point, DecodeError> {
        if self.read == 0 {
            let header = self.bits(64)?;
            self.last_ts = header as i64;
            self.prev_delta = 0;
            let ts = self.read_timestamp()?;
            let value = self.bits(64)?;
            self.prev_value = value;
            return Ok(Point::new(ts, f64::from_bits(value)));
        }
        let ts = self.read_timestamp()?;
        let value = self.read_value()?;
        self.prev_value = value;
        Ok(Point::new(ts, f64::from_bits(value)))
    }
}

impl Iterator for Decoder<'_> {
    type Item = Result<Point, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.read >= self.count {
            return None;
        }
        let item = self.next_point();
        match item {
            Ok(_) => self.read += 1,
            Err(_) => self.failed = true,
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads the bits a test expects, as a string of '0'/'1'.
    fn bit_string(words: &[u64], from: u64, to: u64) -> String {
        let mut r = BitReader::new(words, to);
        r.read_bits(from.min(64) as u32).unwrap();
        let mut skipped = from.min(64);
        while skipped < from {
            let n = (from - skipped).min(64);
            r.read_bits(n as u32).unwrap();
            skipped += n;
        }
        (from..to)
            .map(|_| if r.read_bit().unwrap() { '1' } else { '0' })
            .collect()
    }

    /// Figure 2 of the paper: a block starting at 2015-03-24 02:00:00 with points at 02:01:02
    /// (12), 02:02:02 (12) and 02:03:02 (24).
    #[test]
    fn paper_figure_2_worked_example() {
        let start = 1_427_162_400; // 2015-03-24T02:00:00Z, seconds
        let mut e = Encoder::with_header(start);
        e.append(start + 62, 12.0).unwrap();
        e.append(start + 122, 12.0).unwrap();
        e.append(start + 182, 24.0).unwrap();
        let w = e.words();

        // Header: the window start, raw.
        assert_eq!(BitReader::new(w, 64).read_bits(64).unwrap(), start as u64);
        // First point: delta 62 against a previous delta of 0 -> '10' + (62-1) in 7 bits,
        // then the value 12.0 raw in 64 bits.
        assert_eq!(bit_string(w, 64, 66), "10");
        assert_eq!(bit_string(w, 66, 73), format!("{:07b}", 61));
        let mut r = BitReader::new(w, e.bit_len());
        r.read_bits(64).unwrap();
        r.read_bits(9).unwrap();
        assert_eq!(r.read_bits(64).unwrap(), 12.0f64.to_bits());
        // Second point: delta 60, delta-of-delta -2 -> '10' followed by -2 (stored as -3 in
        // 7-bit two's complement); the value repeats -> '0'.
        let p2 = 64 + 9 + 64;
        assert_eq!(bit_string(w, p2, p2 + 2), "10");
        assert_eq!(
            bit_string(w, p2 + 2, p2 + 9),
            format!("{:07b}", (-3i64 as u64) & 0x7f)
        );
        assert_eq!(bit_string(w, p2 + 9, p2 + 10), "0");
        // Third point: delta-of-delta 0 -> '0'; 24.0 XOR 12.0 has 11 leading and 52 trailing
        // zeros -> '11' : 11 (5 bits) : 1 (6 bits) : '1', exactly the paper's figure.
        let p3 = p2 + 10;
        assert_eq!(bit_string(w, p3, p3 + 1), "0");
        assert_eq!(bit_string(w, p3 + 1, p3 + 3), "11");
        assert_eq!(bit_string(w, p3 + 3, p3 + 8), "01011");
        assert_eq!(bit_string(w, p3 + 8, p3 + 14), "000001");
        assert_eq!(bit_string(w, p3 + 14, p3 + 15), "1");
        assert_eq!(e.bit_len(), p3 + 15);

        let back: Vec<Point> = e.iter().map(Result::unwrap).collect();
        assert_eq!(
            back,
            vec![
                Point::new(start + 62, 12.0),
                Point::new(start + 122, 12.0),
                Point::new(start + 182, 24.0)
            ]
        );
    }

    #[test]
    fn regular_series_cost_two_bits_per_repeated_point() {
        // The paper's headline case: fixed interval and repeated value -> 1 bit + 1 bit.
        let mut e = Encoder::new();
        for i in 0..1000 {
            e.append(1_000 + i * 60, 42.0).unwrap();
        }
        // header 64 + first ('0' + 64) + second ('10'+7 + '0') + 998 * 2
        assert_eq!(e.bit_len(), 64 + 65 + 10 + 998 * 2);
    }

    #[test]
    fn out_of_order_and_duplicate_timestamps_are_rejected_without_change() {
        let mut e = Encoder::new();
        e.append(10, 1.0).unwrap();
        let before = e.bit_len();
        assert_eq!(
            e.append(10, 2.0),
            Err(EncodeError::OutOfOrder { last: 10, got: 10 })
        );
        assert_eq!(
            e.append(9, 2.0),
            Err(EncodeError::OutOfOrder { last: 10, got: 9 })
        );
        assert_eq!(e.bit_len(), before);
        assert_eq!(e.len(), 1);
        let mut h = Encoder::with_header(100);
        assert!(matches!(
            h.append(99, 0.0),
            Err(EncodeError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn special_floats_round_trip_bit_exactly() {
        let specials = [
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN payload
            f64::from_bits(0xfff8_dead_beef_0001), // negative quiet NaN with payload
            f64::MIN_POSITIVE,
            f64::from_bits(1), // smallest subnormal
            f64::MAX,
            f64::MIN,
        ];
        let mut e = Encoder::new();
        for (i, v) in specials.iter().enumerate() {
            e.append(i as i64, *v).unwrap();
        }
        for (got, want) in e.iter().zip(specials) {
            assert_eq!(got.unwrap().value.to_bits(), want.to_bits());
        }
    }

    #[test]
    fn extreme_timestamp_jumps_round_trip() {
        let ts = [i64::MIN, i64::MIN + 1, 0, i64::MAX - 1, i64::MAX];
        let mut e = Encoder::new();
        for t in ts {
            e.append(t, 1.0).unwrap();
        }
        let back: Vec<i64> = e.iter().map(|p| p.unwrap().ts).collect();
        assert_eq!(back, ts);
    }

    #[test]
    fn truncated_block_is_a_typed_error() {
        let mut e = Encoder::new();
        for i in 0..100 {
            e.append(i * 7 + i * i, (i as f64).sin()).unwrap();
        }
        let block = e.into_block();
        let short = Decoder::new(&block.words, block.bit_len - 5, block.count);
        let last = short.last().unwrap();
        assert!(
            matches!(last, Err(DecodeError::Truncated { .. })),
            "{last:?}"
        );
    }

    fn arb_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            Just(f64::NAN),
            Just(-0.0),
            Just(0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            (-1000i32..1000).prop_map(|v| f64::from(v) / 4.0),
        ]
    }

    fn arb_series() -> impl Strategy<Value = Vec<Point>> {
        (
            any::<i64>(),
            proptest::collection::vec(
                (
                    prop_oneof![1u64..3, 1u64..5000, 1u64..(1 << 40), 1u64..u64::MAX],
                    arb_value(),
                ),
                0..300,
            ),
        )
            .prop_map(|(start, steps)| {
                let mut ts = start;
                let mut out = Vec::new();
                for (i, (step, v)) in steps.into_iter().enumerate() {
                    if i > 0 {
                        match ts.checked_add_unsigned(step) {
                            Some(next) => ts = next,
                            None => break,
                        }
                    }
                    out.push(Point::new(ts, v));
                }
                out
            })
    }

    proptest! {
        #[test]
        fn round_trip_is_bit_exact(points in arb_series()) {
            let mut e = Encoder::new();
            for p in &points {
                e.append(p.ts, p.value).unwrap();
                prop_assert!(e.bit_len() <= e.len() * MAX_BITS_PER_POINT);
            }
            let back: Vec<Point> = e.iter().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(back.len(), points.len());
            for (a, b) in back.iter().zip(&points) {
                prop_assert!(a.bit_eq(b), "{:?} != {:?}", a, b);
            }
            // Sealing keeps the same bits.
            let block = e.clone().into_block();
            let again: Vec<Point> = block.iter().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(again.len(), points.len());
        }

        #[test]
        fn decoding_garbage_never_panics(words in proptest::collection::vec(any::<u64>(), 0..8),
                                         bit_len in 0u64..600, count in 0u64..50) {
            for p in Decoder::new(&words, bit_len, count) {
                let _ = p;
            }
        }
    }
}
