//! A posting block: up to [`BLOCK_POSTINGS`] postings of one term, as stored in redb and as
//! held in the cache.
//!
//! Stored form: `count: u32 LE`, `count × (doc: u64 LE, weight: f32 LE)`, `crc32: u32 LE`
//! over everything before it. A value whose length or checksum does not match is reported
//! as [`SparseError::CorruptBlock`], never decoded into wrong postings.

use crate::error::SparseError;
use crate::vector::{DocId, TermId};

/// Postings per block: a query term costs one cache entry per block, a flush rewrites at
/// most one partial block per term.
pub const BLOCK_POSTINGS: usize = 128;

const POSTING_BYTES: usize = 12;

/// One posting: a document and the term's weight in it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Posting {
    /// The document.
    pub doc: DocId,
    /// The term's weight in it.
    pub weight: f32,
}

/// The decoded postings of one block, in insertion order.
#[derive(Debug, PartialEq)]
pub struct PostingBlock {
    postings: Vec<Posting>,
}

/// The most a decoded block may be charged: what the cache reserves before loading one.
pub const MAX_BLOCK_BYTES: usize = BLOCK_POSTINGS * std::mem::size_of::<Posting>();

impl PostingBlock {
    /// The postings.
    pub fn postings(&self) -> &[Posting] {
        &self.postings
    }

    /// Heap bytes the decoded block holds.
    pub fn heap_bytes(&self) -> usize {
        self.postings.capacity() * std::mem::size_of::<Posting>()
    }

    /// Decodes a stored block of `term`, checking its length and checksum.
    pub fn decode(term: TermId, block: u32, raw: &[u8]) -> Result<Self, SparseError> {
        let corrupt = |reason: String| SparseError::CorruptBlock {
            term,
            block,
            reason,
        };
        if raw.len() < 8 {
            return Err(corrupt(format!(
                "{} bytes, shorter than a header",
                raw.len()
            )));
        }
        let (body, crc) = raw.split_at(raw.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32fast::hash(body) != stored {
            return Err(corrupt("checksum mismatch".to_owned()));
        }
        let count = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
        if count > BLOCK_POSTINGS || body.len() != 4 + count * POSTING_BYTES {
            return Err(corrupt(format!(
                "{count} postings do not fit {} bytes (at most {BLOCK_POSTINGS})",
                body.len()
            )));
        }
        let mut postings = Vec::with_capacity(count);
        for p in body[4..].chunks_exact(POSTING_BYTES) {
            postings.push(Posting {
                doc: u64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
                weight: f32::from_le_bytes(p[8..].try_into().expect("4 bytes")),
            });
        }
        Ok(Self { postings })
    }
}

/// Encodes postings (at most [`BLOCK_POSTINGS`]) in the stored form.
pub fn encode(postings: &[Posting]) -> Vec<u8> {
    debug_assert!(postings.len() <= BLOCK_POSTINGS);
    let mut out = Vec::with_capacity(8 + postings.len() * POSTING_BYTES);
    out.extend_from_slice(&(postings.len() as u32).to_le_bytes());
    for p in postings {
        out.extend_from_slice(&p.doc.to_le_bytes());
        out.extend_from_slice(&p.weight.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let ps: Vec<Posting> = (0..5)
            .map(|i| Posting {
                doc: i * 7,
                weight: i as f32 * 0.5,
            })
            .collect();
        let raw = encode(&ps);
        assert_eq!(
            PostingBlock::decode(1, 0, &raw).unwrap().postings(),
            &ps[..]
        );
        for cut in [0, 3, 7, raw.len() - 1] {
            assert!(PostingBlock::decode(1, 0, &raw[..cut]).is_err());
        }
        let mut flipped = raw.clone();
        flipped[9] ^= 1;
        assert!(matches!(
            PostingBlock::decode(1, 0, &flipped),
            Err(SparseError::CorruptBlock { .. })
        ));
    }
}
