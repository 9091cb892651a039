//! Bit-granular writer and reader over `u64` words.
//!
//! Bits are stored most-significant-first inside each word (bit `i` of the stream is bit
//! `63 - i % 64` of word `i / 64`), which is the order the Gorilla paper draws its figures in
//! and lets a reader pull a field with two shifts. Words (not bytes) keep the hot append path
//! to one or two shift/or operations per field.
//!
//! The writer never reallocates on its own initiative beyond what `Vec::push` would do; the
//! memtable grows the capacity explicitly (see [`BitWriter::grow_to_words`]) so that every byte
//! it holds was reserved from the governor *before* it was allocated.

/// Appends bit fields to a growable buffer of `u64` words.
#[derive(Debug, Default, Clone)]
pub struct BitWriter {
    words: Vec<u64>,
    bit_len: u64,
}

impl BitWriter {
    /// An empty writer that owns no heap memory yet.
    pub const fn new() -> Self {
        Self {
            words: Vec::new(),
            bit_len: 0,
        }
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> u64 {
        self.bit_len
    }

    /// Bits that can still be written without reallocating.
    pub fn spare_bits(&self) -> u64 {
        (self.words.capacity() as u64) * 64 - self.bit_len
    }

    /// Heap bytes owned by this writer (its capacity, not just the used part).
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Grows so that `capacity == target_words` (or more if it already is larger).
    pub fn grow_to_words(&mut self, target_words: usize) {
        if self.words.capacity() < target_words {
            self.words.reserve_exact(target_words - self.words.len());
        }
    }

    /// Word capacity.
    pub fn capacity_words(&self) -> usize {
        self.words.capacity()
    }

    /// Writes the low `n` bits of `value` (`n <= 64`), most significant first.
    pub fn write_bits(&mut self, value: u64, n: u32) {
        debug_assert!(n <= 64);
        if n == 0 {
            return;
        }
        let value = if n == 64 {
            value
        } else {
            value & ((1u64 << n) - 1)
        };
        let used = (self.bit_len % 64) as u32;
        if used == 0 {
            // Starting a fresh word: the value goes to its top bits.
            self.words.push(value << (64 - n));
        } else {
            let free = 64 - used;
            let last = self.words.len() - 1;
            if n <= free {
                self.words[last] |= value << (free - n);
            } else {
                // Split: the high `free` bits end this word, the rest opens the next one.
                let rest = n - free;
                self.words[last] |= value >> rest;
                self.words.push(value << (64 - rest));
            }
        }
        self.bit_len += u64::from(n);
    }

    /// Writes one bit.
    pub fn write_bit(&mut self, bit: bool) {
        self.write_bits(u64::from(bit), 1);
    }

    /// The written words (the last one may be partially used).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Gives up the buffer: `(words, bit_len)`.
    pub fn into_parts(self) -> (Vec<u64>, u64) {
        (self.words, self.bit_len)
    }
}

/// Reads bit fields back from words written by [`BitWriter`], refusing to read past `bit_len`.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    words: &'a [u64],
    bit_len: u64,
    pos: u64,
}

/// The stream ended before a field was complete (truncated or corrupt block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfStream;

impl<'a> BitReader<'a> {
    /// A reader over the first `bit_len` bits of `words`. `bit_len` is clamped to the words
    /// actually present, so a lying length cannot make the reader index out of bounds.
    pub fn new(words: &'a [u64], bit_len: u64) -> Self {
        let bit_len = bit_len.min(words.len() as u64 * 64);
        Self {
            words,
            bit_len,
            pos: 0,
        }
    }

    /// Bits consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads `n <= 64` bits as an unsigned value.
    pub fn read_bits(&mut self, n: u32) -> Result<u64, EndOfStream> {
        debug_assert!(n <= 64);
        if n == 0 {
            return Ok(0);
        }
        if self.pos + u64::from(n) > self.bit_len {
            return Err(EndOfStream);
        }
        let word = (self.pos / 64) as usize;
        let offset = (self.pos % 64) as u32;
        let avail = 64 - offset;
        let value = if n <= avail {
            let w = self.words[word] << offset;
            w >> (64 - n)
        } else {
            let rest = n - avail;
            let hi = (self.words[word] << offset) >> offset; // low `avail` bits
            let lo = self.words[word + 1] >> (64 - rest);
            (hi << rest) | lo
        };
        self.pos += u64::from(n);
        Ok(value)
    }

    /// Reads one bit.
    pub fn read_bit(&mut self) -> Result<bool, EndOfStream> {
        self.read_bits(1).map(|b| b == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_across_word_boundaries() {
        let mut w = BitWriter::new();
        let fields: Vec<(u64, u32)> = (1..=64u32)
            .map(|n| (0xDEAD_BEEF_CAFE_F00Du64.rotate_left(n), n))
            .collect();
        for &(v, n) in &fields {
            w.write_bits(v, n);
        }
        let total: u64 = fields.iter().map(|&(_, n)| u64::from(n)).sum();
        assert_eq!(w.bit_len(), total);
        let mut r = BitReader::new(w.words(), w.bit_len());
        for &(v, n) in &fields {
            let mask = if n == 64 { u64::MAX } else { (1 << n) - 1 };
            assert_eq!(r.read_bits(n).unwrap(), v & mask, "field of {n} bits");
        }
        assert_eq!(r.read_bit(), Err(EndOfStream));
    }

    #[test]
    fn reader_clamps_a_lying_length() {
        let words = [u64::MAX];
        let mut r = BitReader::new(&words, 1_000);
        assert_eq!(r.read_bits(64), Ok(u64::MAX));
        assert_eq!(r.read_bits(1), Err(EndOfStream));
    }

    #[test]
    fn growth_is_exact() {
        let mut w = BitWriter::new();
        w.grow_to_words(10);
        assert_eq!(w.capacity_words(), 10);
        assert_eq!(w.spare_bits(), 640);
        w.write_bits(1, 1);
        assert_eq!(w.spare_bits(), 639);
    }
}
