//! When to log an event that may repeat without end (a refused client, a
//! dropped notification): the first of an episode at once, then at most one
//! summary line per interval carrying the count of events since the last
//! line, and one closing count when the episode ends. On a Vera the log
//! lives in RAM; a flood of one line per event would fill it.
//!
//! In scope: the decision, from events and `now`. Out of scope: the text of
//! the lines and the clock (callers pass `Instant`s); a timer to close an
//! episode (a caller with one calls `end`, else the count waits for the next
//! event after the interval). No I/O.

use std::time::{Duration, Instant};

/// The usual interval between two lines about the same kind of event.
pub const INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RateLog {
    interval: Duration,
    /// When the last line was written; `None` between episodes.
    last: Option<Instant>,
    /// Events since the last line that no line has counted yet.
    quiet: u64,
}

impl RateLog {
    pub const fn new(interval: Duration) -> RateLog {
        RateLog {
            interval,
            last: None,
            quiet: 0,
        }
    }

    /// One more event. `Some(n)`: write a line now, covering `n` events
    /// (this one and those not logged since the last line; 1 for the first
    /// of an episode). `None`: stay quiet, the event is counted.
    pub fn event(&mut self, now: Instant) -> Option<u64> {
        self.quiet = self.quiet.saturating_add(1);
        let due = match self.last {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.interval,
        };
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }

    /// The episode is over (the condition went away). `Some(n)`: `n` events
    /// were not logged yet, say so; the next event starts a new episode and
    /// is logged at once.
    pub fn end(&mut self) -> Option<u64> {
        self.last = None;
        Some(std::mem::take(&mut self.quiet)).filter(|&n| n > 0)
    }

    /// Events counted but not logged yet.
    pub fn pending(&self) -> u64 {
        self.quiet
    }
}

impl Default for RateLog {
    fn default() -> RateLog {
        RateLog::new(INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_at_once_then_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut r = RateLog::new(ms(10_000));
        assert_eq!(r.event(t0), Some(1), "the first is logged at once");
        for i in 1..1000 {
            assert_eq!(r.event(t0 + ms(i)), None, "event {i} inside the interval");
        }
        assert_eq!(r.pending(), 999);
        // The first event at or past the interval writes the summary: the
        // 999 quiet ones and itself.
        assert_eq!(r.event(t0 + ms(10_000)), Some(1000));
        assert_eq!(r.pending(), 0);
        // The next interval counts from that line, not from the first.
        assert_eq!(r.event(t0 + ms(15_000)), None);
        assert_eq!(r.event(t0 + ms(19_999)), None);
        assert_eq!(r.event(t0 + ms(20_000)), Some(3));
    }

    #[test]
    fn a_lone_event_after_a_quiet_spell_is_logged_alone() {
        let t0 = Instant::now();
        let mut r = RateLog::new(ms(100));
        assert_eq!(r.event(t0), Some(1));
        assert_eq!(r.event(t0 + ms(5_000)), Some(1));
        assert_eq!(r.event(t0 + ms(5_001)), None);
    }

    #[test]
    fn end_reports_what_was_not_logged_and_restarts_the_episode() {
        let t0 = Instant::now();
        let mut r = RateLog::new(ms(10_000));
        assert_eq!(r.end(), None, "no episode, nothing to say");
        assert_eq!(r.event(t0), Some(1));
        assert_eq!(r.end(), None, "everything was logged");
        assert_eq!(r.event(t0 + ms(1)), Some(1), "a new episode: at once");
        assert_eq!(r.event(t0 + ms(2)), None);
        assert_eq!(r.event(t0 + ms(3)), None);
        assert_eq!(r.end(), Some(2));
        assert_eq!(r.end(), None);
        assert_eq!(r.event(t0 + ms(4)), Some(1));
    }

    #[test]
    fn a_clock_that_goes_back_is_inside_the_interval() {
        let t0 = Instant::now() + ms(60_000);
        let mut r = RateLog::new(ms(10_000));
        assert_eq!(r.event(t0), Some(1));
        assert_eq!(r.event(t0 - ms(50_000)), None);
        assert_eq!(r.pending(), 1);
    }
}
