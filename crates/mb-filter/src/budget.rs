//! The bytes of messages one worker holds at once (`filter.max_inflight_bytes`).
//!
//! A scan reserves the size its client declares as the stream starts, before any of the
//! message is buffered, and keeps the reservation until its verdict is sent; a scan that
//! would take the worker past the budget is refused at once (the client tries another
//! worker, then tempfails the message) instead of the worker growing without bound.
//! Like Postfix with a message larger than its queue's limits, one message larger than
//! the whole budget is not refused forever: it is taken when nothing else is in flight,
//! or, once one such message has been refused, on its next try even beside other scans.
//! A busy worker is never idle, so "when nothing else is in flight" alone would starve
//! it; one oversized scan at a time bounds the worker's peak at the budget plus one
//! message (`smtp.message_size_limit`).

use std::sync::{Arc, Mutex};

/// What is reserved now.
#[derive(Debug, Default)]
pub struct Budget {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    bytes: u64,
    holders: usize,
    /// A scan larger than the budget holds a reservation.
    big_holder: bool,
    /// A scan larger than the budget was refused since the last one was taken: the next
    /// one is taken beside other scans.
    big_waited: bool,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{in_flight} bytes of messages in flight; {wanted} more would pass filter.max_inflight_bytes ({max})"
)]
pub struct Refused {
    pub in_flight: u64,
    pub wanted: u64,
    pub max: u64,
}

/// Bytes held by one scan, given back when it is dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
    /// Taken as the one scan larger than the budget.
    big: bool,
}

impl Budget {
    /// Reserves `bytes` under `max` (read live from the configuration by the caller).
    /// Granted when it fits, or when nothing else is in flight; a scan larger than `max`
    /// also after one was refused, if no other such scan is in flight.
    pub fn reserve(self: &Arc<Self>, bytes: u64, max: u64) -> Result<Reservation, Refused> {
        let mut s = self.lock();
        let big = bytes > max;
        if s.holders > 0 && s.bytes.saturating_add(bytes) > max {
            let its_turn = big && s.big_waited && !s.big_holder;
            if !its_turn {
                if big {
                    s.big_waited = true;
                }
                return Err(Refused {
                    in_flight: s.bytes,
                    wanted: bytes,
                    max,
                });
            }
        }
        if big {
            s.big_holder = true;
            s.big_waited = false;
        }
        s.bytes = s.bytes.saturating_add(bytes);
        s.holders += 1;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
            big,
        })
    }

    /// Bytes reserved now, and by how many scans.
    pub fn in_flight(&self) -> (u64, usize) {
        let s = self.lock();
        (s.bytes, s.holders)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two counters updated together: a panic elsewhere cannot leave
        // them half-written, so a poisoned lock is still right to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reservation {
    /// Takes `more` bytes for a scan whose size was not declared, as they arrive. The
    /// scan alone in flight may grow past `max`, as a declared one may start past it.
    pub fn grow(&mut self, more: u64, max: u64) -> Result<(), Refused> {
        let mut s = self.budget.lock();
        if s.holders > 1 && s.bytes.saturating_add(more) > max {
            return Err(Refused {
                in_flight: s.bytes,
                wanted: more,
                max,
            });
        }
        s.bytes = s.bytes.saturating_add(more);
        self.bytes = self.bytes.saturating_add(more);
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        s.bytes = s.bytes.saturating_sub(self.bytes);
        s.holders = s.holders.saturating_sub(1);
        if self.big {
            s.big_holder = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn reservations_fit_the_budget_and_are_given_back() {
        let b = Arc::new(Budget::default());
        let one = b.reserve(40 * M, 50 * M).unwrap();
        // The second 40 MB message would hold 80 MB under a 50 MB budget.
        let refused = b.reserve(40 * M, 50 * M).unwrap_err();
        assert_eq!((refused.in_flight, refused.wanted), (40 * M, 40 * M));
        // A small one still fits beside it.
        let small = b.reserve(10 * M, 50 * M).unwrap();
        assert_eq!(b.in_flight(), (50 * M, 2));
        drop(one);
        assert_eq!(b.in_flight(), (10 * M, 1));
        let two = b.reserve(40 * M, 50 * M).unwrap();
        drop(small);
        drop(two);
        assert_eq!(b.in_flight(), (0, 0));
    }

    #[test]
    fn a_message_larger_than_the_budget_passes_only_alone() {
        let b = Arc::new(Budget::default());
        let small = b.reserve(M, 50 * M).unwrap();
        assert!(
            b.reserve(60 * M, 50 * M).is_err(),
            "not beside another scan"
        );
        drop(small);
        let big = b.reserve(60 * M, 50 * M).unwrap();
        assert!(b.reserve(1, 50 * M).is_err(), "and nothing beside it");
        drop(big);
        assert_eq!(b.in_flight(), (0, 0));
    }

    /// On a worker that is never idle, a message larger than the budget is taken on its
    /// second try beside the others, one such message at a time.
    #[test]
    fn a_message_larger_than_the_budget_does_not_starve_on_a_busy_worker() {
        let b = Arc::new(Budget::default());
        let _busy = b.reserve(10 * M, 50 * M).unwrap();
        assert!(b.reserve(60 * M, 50 * M).is_err(), "the first try waits");
        let big = b.reserve(60 * M, 50 * M).expect("the second try is taken");
        assert_eq!(b.in_flight(), (70 * M, 2));
        assert!(
            b.reserve(70 * M, 50 * M).is_err(),
            "one oversized scan at a time"
        );
        assert!(
            b.reserve(70 * M, 50 * M).is_err(),
            "not even on its second try while the first is in flight"
        );
        drop(big);
        let second = b.reserve(70 * M, 50 * M).expect("its turn now");
        drop(second);
        assert!(
            b.reserve(70 * M, 50 * M).is_err(),
            "a new one waits once again"
        );
    }

    #[test]
    fn undeclared_sizes_grow_within_the_budget() {
        let b = Arc::new(Budget::default());
        let mut one = b.reserve(0, 10 * M).unwrap();
        let mut other = b.reserve(0, 10 * M).unwrap();
        one.grow(8 * M, 10 * M).unwrap();
        assert!(other.grow(4 * M, 10 * M).is_err(), "the budget is spent");
        drop(one);
        // Alone now: it may pass the budget, as a declared message may.
        other.grow(20 * M, 10 * M).unwrap();
        assert_eq!(other.bytes(), 20 * M);
        assert!(b.reserve(0, 10 * M).is_err(), "nothing beside it");
        drop(other);
        assert_eq!(b.in_flight(), (0, 0));
    }
}
