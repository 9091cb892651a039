//! Sparse vectors: the input of inserts and queries, checked once at the door.

use crate::error::SparseError;

/// Identifies a term (a vocabulary or hashed-feature id).
pub type TermId = u32;

/// Identifies a document.
pub type DocId = u64;

/// The most terms one vector may have: bounds what one insert or query can allocate.
pub const MAX_TERMS: usize = 1 << 16;

/// A sparse vector: distinct terms, each with a finite weight, kept sorted by term.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseVector {
    terms: Vec<(TermId, f32)>,
}

impl SparseVector {
    /// Checks and sorts `terms`. Fails on a repeated term, a weight that is not finite, or
    /// more than [`MAX_TERMS`] terms.
    pub fn new(mut terms: Vec<(TermId, f32)>) -> Result<Self, SparseError> {
        if terms.len() > MAX_TERMS {
            return Err(SparseError::InvalidVector {
                reason: format!("{} terms, at most {MAX_TERMS} allowed", terms.len()),
            });
        }
        if let Some((t, w)) = terms.iter().find(|(_, w)| !w.is_finite()) {
            return Err(SparseError::InvalidVector {
                reason: format!("term {t} has weight {w}, which is not finite"),
            });
        }
        terms.sort_unstable_by_key(|(t, _)| *t);
        if let Some(pair) = terms.windows(2).find(|p| p[0].0 == p[1].0) {
            return Err(SparseError::InvalidVector {
                reason: format!("term {} appears more than once", pair[0].0),
            });
        }
        terms.shrink_to_fit();
        Ok(Self { terms })
    }

    /// The terms and weights, sorted by term.
    pub fn terms(&self) -> &[(TermId, f32)] {
        &self.terms
    }

    /// The weight of `term`, if present.
    pub fn weight(&self, term: TermId) -> Option<f32> {
        self.terms
            .binary_search_by_key(&term, |(t, _)| *t)
            .ok()
            .map(|i| self.terms[i].1)
    }

    /// Number of terms.
    pub fn len(&self) -> usize {
        self.terms.len()
    }

    /// True when the vector has no terms.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Heap bytes the vector holds.
    pub fn heap_bytes(&self) -> usize {
        self.terms.capacity() * std::mem::size_of::<(TermId, f32)>()
    }
}
