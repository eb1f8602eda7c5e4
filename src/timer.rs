//! The timer wheel: each connection's next deadline (command-mode idle,
//! connect timeout, RTIM, PACE, linger) and the accept retry.
//!
//! In scope: `arm`, `cancel`, `expired(now)`, `next_deadline()`. Out of
//! scope: the clock (every call takes `now`) and what a deadline means: a
//! timer that fires only tells the loop to look; the connection knows its
//! real deadline. That keeps the hot path free of timer work: RTIM is not
//! re-armed on every read, it is re-armed (once) when it fires early.
//!
//! The wheel is an ordered set rather than slots of a fixed tick: deadlines
//! stay exact (PACE must never fire early, a 5 s connect timeout must not
//! round), `next_deadline` is the first entry, and arming is O(log n). At
//! the few thousand connections a router sees this beats scanning slots.

use std::collections::BTreeSet;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A connection's next deadline (`Conn::poll_at`: command-mode idle,
    /// connect timeout, RTIM, PACE, linger); one per connection.
    Conn,
    /// A listener may try `accept` again after running out of descriptors.
    Accept,
}

#[derive(Default)]
pub struct Timers {
    set: BTreeSet<(Instant, usize, Kind)>,
}

impl Timers {
    pub fn arm(&mut self, at: Instant, key: usize, kind: Kind) {
        self.set.insert((at, key, kind));
    }

    pub fn cancel(&mut self, at: Instant, key: usize, kind: Kind) {
        self.set.remove(&(at, key, kind));
    }

    /// Removes and returns every timer due at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<(usize, Kind)> {
        let mut due = Vec::new();
        while let Some(&(at, key, kind)) = self.set.first() {
            if at > now {
                break;
            }
            self.set.pop_first();
            due.push((key, kind));
        }
        due
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.set.first().map(|&(at, _, _)| at)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_order_never_early() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = Timers::default();
        assert_eq!(w.next_deadline(), None);
        w.arm(ms(30), 1, Kind::Conn);
        w.arm(ms(10), 2, Kind::Accept);
        w.arm(ms(20), 3, Kind::Conn);
        w.arm(ms(20), 3, Kind::Conn); // same timer twice: one entry
        assert_eq!(w.len(), 3);
        assert_eq!(w.next_deadline(), Some(ms(10)));
        assert_eq!(w.expired(ms(9)), vec![]);
        assert_eq!(w.expired(ms(20)), vec![(2, Kind::Accept), (3, Kind::Conn)]);
        w.cancel(ms(30), 1, Kind::Conn);
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.expired(ms(1000)), vec![]);
    }
}
