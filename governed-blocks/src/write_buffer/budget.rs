//! The buffer's reservation: normally one token that grows a chunk at a time and shrinks
//! after a flush, so the governor is asked about once per chunk, not once per item.

use std::sync::Arc;

use governor_core::{EngineId, MemError, MemoryGovernor, ReservationToken};

#[derive(Debug, Default)]
pub(crate) struct Budget {
    /// The first token is the main one; a token won by waiting is merged into it, or kept
    /// beside it when the merge is refused (a token booked on another NUMA node's row).
    tokens: Vec<ReservationToken>,
}

impl Budget {
    pub(crate) fn size(&self) -> usize {
        self.tokens.iter().map(ReservationToken::size).sum()
    }

    pub(crate) fn try_grow(
        &mut self,
        governor: &Arc<MemoryGovernor>,
        engine: EngineId,
        bytes: usize,
    ) -> Result<(), MemError> {
        if let Some(t) = self.tokens.first_mut() {
            t.try_grow(bytes)
        } else {
            self.tokens.push(governor.try_reserve(engine, bytes)?);
            Ok(())
        }
    }

    /// Takes in a token won by waiting (`reserve(..).await`).
    pub(crate) fn absorb(&mut self, token: ReservationToken) {
        let token = match self.tokens.first_mut() {
            Some(main) => match main.merge(token) {
                Ok(()) => return,
                Err(token) => token,
            },
            None => token,
        };
        self.tokens.push(token);
    }

    /// Gives back `bytes` (at most what is held); returns what was given back.
    pub(crate) fn shrink(&mut self, bytes: usize) -> usize {
        let mut left = bytes;
        while left > 0 {
            let n = self.tokens.len();
            let Some(last) = self.tokens.last_mut() else {
                break;
            };
            let size = last.size();
            if size <= left {
                left -= size;
                if n > 1 {
                    self.tokens.pop();
                } else {
                    last.free();
                    break;
                }
            } else {
                last.shrink(left)
                    .expect("shrinking less than the token holds cannot fail");
                left = 0;
            }
        }
        bytes - left
    }
}
