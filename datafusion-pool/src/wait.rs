//! Waiting for memory in a synchronous `try_grow`: on events, with a bound.
//!
//! DataFusion's `try_grow` is synchronous, so a consumer that must wait blocks its worker
//! thread. It waits for an *event* — bytes released in this pool (a spill, a finished
//! operator) — not for a span of wall time: on a loaded machine a spiller may take a long
//! time to reach its next request, and a fixed short sleep then fails queries that only
//! needed patience. Releases by other engines are not signalled here; the waiter re-checks
//! on a short backstop tick so that those are seen too, which costs latency, never a grant.
//! The overall bound only limits the damage of a stuck plan.

use std::sync::atomic::{AtomicUsize, Ordering, fence};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// How often a waiter re-checks without an event (releases outside this pool).
const BACKSTOP: Duration = Duration::from_millis(20);

/// Signalled whenever this pool's consumers give bytes back.
#[derive(Debug, Default)]
pub(crate) struct ReleaseSignal {
    /// Threads inside [`wait_until`](Self::wait_until); releases skip the lock when zero.
    waiters: AtomicUsize,
    /// Bumped by every signalled release.
    epoch: Mutex<u64>,
    cond: Condvar,
}

impl ReleaseSignal {
    /// Called after bytes went back to the governor. Cheap when nobody waits (one load).
    pub(crate) fn released(&self) {
        // Pairs with the fence in `wait_until`: either the waiter's next attempt sees the
        // released bytes, or this load sees the waiter and wakes it.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) > 0 {
            *self.epoch.lock() += 1;
            self.cond.notify_all();
        }
    }

    /// Calls `attempt` until it returns `Some`, or until `deadline`; between attempts sleeps
    /// until a release (or the backstop tick). `None` when the deadline passed first.
    pub(crate) fn wait_until<T>(
        &self,
        deadline: Instant,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let result = loop {
            let seen = *self.epoch.lock();
            if let Some(v) = attempt() {
                break Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            let mut epoch = self.epoch.lock();
            if *epoch == seen {
                let _ = self
                    .cond
                    .wait_for(&mut epoch, (deadline - now).min(BACKSTOP));
            }
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn a_release_wakes_the_waiter_and_the_deadline_ends_a_hopeless_wait() {
        let signal = Arc::new(ReleaseSignal::default());
        let room = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (signal, room) = (Arc::clone(&signal), Arc::clone(&room));
            std::thread::spawn(move || {
                signal.wait_until(Instant::now() + Duration::from_mins(1), || {
                    room.load(Ordering::SeqCst).then_some(())
                })
            })
        };
        room.store(true, Ordering::SeqCst);
        signal.released();
        assert_eq!(waiter.join().unwrap(), Some(()));
        let none: Option<()> = signal.wait_until(Instant::now(), || None);
        assert_eq!(none, None);
    }
}
