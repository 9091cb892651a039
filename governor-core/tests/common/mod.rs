//! Reclaimers shared by the integration tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use governor_core::{ReclaimError, Reclaimer, ReservationToken};
use parking_lot::Mutex;

/// A borrower that frees its held tokens when asked, as a spilling operator would: an honest
/// reclaimer, whose claims the books always back.
#[derive(Default)]
pub struct Spiller {
    /// The tokens it gives back, last pushed first.
    pub held: Mutex<Vec<ReservationToken>>,
    /// How often it was asked.
    pub calls: AtomicUsize,
}

impl Spiller {
    /// A spiller holding `held`.
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub fn new(held: Vec<ReservationToken>) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(held),
            calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Reclaimer for Spiller {
    fn reclaimable(&self) -> usize {
        self.held.lock().iter().map(ReservationToken::size).sum()
    }

    async fn reclaim(&self, target: usize) -> Result<usize, ReclaimError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut freed = 0;
        let mut held = self.held.lock();
        while freed < target {
            let Some(token) = held.pop() else { break };
            freed += token.size();
        }
        Ok(freed)
    }
}
