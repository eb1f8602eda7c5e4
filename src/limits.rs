//! The descriptor limit (RLIMIT_NOFILE): raised at start to what the system
//! allows, and the number of connections it can carry.
//!
//! In scope: raising the soft limit to the hard one; counting the
//! descriptors the daemon holds and will hold besides its connections;
//! `conn_limit` (pure) sizes `max_conns` so that every connection's two
//! descriptors fit with a reserve, and a notification never fails for want
//! of one; `Budget` keeps what was counted at start, so that a reload
//! (SIGHUP) sizes a new `max_conns`, with more or fewer listeners, the same
//! way. Out of scope: refusing clients (the loop's `ERR BUSY` path, at
//! `Config::max_conns`), logging (`main` and the loop's reload say what was
//! decided).

use std::io;

use crate::{notify, resolve};

/// Descriptors per connection: the client and the remote.
pub const PER_CONN: u64 = 2;
/// Descriptors the loop opens after `main` has counted: the poll (and the
/// registry's clone of it), the waker, the signal pipe's two ends.
const LOOP: u64 = 5;
/// One while the log file is reopened (SIGHUP), beside the old one.
const LOG_REOPEN: u64 = 1;
/// Per resolver thread while it looks up: a DNS socket and a file
/// (/etc/hosts, /etc/resolv.conf).
const PER_LOOKUP: u64 = 2;
/// Kept free beyond all of the above: a refused client's socket between
/// accept and close, a notifier resolving Luup's host name, a library
/// opening a file we did not count.
pub const RESERVE: u64 = 16;
/// Soft limit asked for when the hard one is unlimited (Linux's default
/// `fs.nr_open`).
const UNLIMITED: u64 = 1 << 20;

/// RLIMIT_NOFILE before and after `raise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub was: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one. `Err` if the limit
/// cannot be read; a raise that fails leaves `soft == was` (and returns the
/// error beside it, for the log).
pub fn raise_nofile() -> io::Result<(Nofile, Option<io::Error>)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 here, u32 on 32-bit glibc targets.
    #[allow(clippy::useless_conversion)]
    let (was, hard) = (u64::from(lim.rlim_cur), u64::from(lim.rlim_max));
    let want = if lim.rlim_max == libc::RLIM_INFINITY {
        UNLIMITED
    } else {
        hard
    };
    if want <= was {
        return Ok((
            Nofile {
                was,
                soft: was,
                hard,
            },
            None,
        ));
    }
    let new = libc::rlimit {
        rlim_cur: libc::rlim_t::try_from(want).unwrap_or(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        let e = io::Error::last_os_error();
        return Ok((
            Nofile {
                was,
                soft: was,
                hard,
            },
            Some(e),
        ));
    }
    Ok((
        Nofile {
            was,
            soft: want,
            hard,
        },
        None,
    ))
}

/// Descriptors open now (stdio, the log, the listeners, any inherited), from
/// /proc/self/fd; `fallback` where /proc is not mounted.
pub fn open_now(fallback: u64) -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        // The directory's own descriptor is among the entries.
        Ok(dir) => u64::try_from(dir.count())
            .unwrap_or(fallback)
            .saturating_sub(1),
        Err(_) => fallback,
    }
}

/// Descriptors the daemon needs besides its connections, when `open` are
/// open before the loop starts: the loop's own, the notifier's sockets, the
/// resolver threads', a log reopen, and the reserve.
pub fn fixed(open: u64) -> u64 {
    let workers = u64::try_from(notify::WORKERS).unwrap_or(u64::MAX);
    let lookups = u64::try_from(resolve::MAX_THREADS).unwrap_or(u64::MAX);
    open.saturating_add(LOOP)
        .saturating_add(LOG_REOPEN)
        .saturating_add(workers)
        .saturating_add(lookups.saturating_mul(PER_LOOKUP))
        .saturating_add(RESERVE)
}

/// The connections that fit in `nofile` descriptors beside `fixed`, at most
/// `configured`.
pub fn conn_limit(configured: usize, nofile: u64, fixed: u64) -> usize {
    let fit = nofile.saturating_sub(fixed) / PER_CONN;
    usize::try_from(fit).map_or(configured, |fit| fit.min(configured))
}

/// The descriptors `max_conns` is sized against: the soft limit, and those
/// the daemon keeps for itself besides its listeners. Measured once, before
/// the loop starts; a reload counts only its listeners again (a count from
/// /proc then would include the connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub nofile: u64,
    /// `fixed` without the listeners.
    pub fixed: u64,
}

impl Budget {
    /// Counts now, with `listeners` bound and nothing else of the loop's open.
    pub fn measure(nofile: u64, listeners: usize) -> Budget {
        let listeners = u64::try_from(listeners).unwrap_or(u64::MAX);
        // stdio, the log, the listeners: what /proc would show.
        let guess = listeners.saturating_add(4);
        Budget {
            nofile,
            fixed: fixed(open_now(guess)).saturating_sub(listeners),
        }
    }

    /// `configured` lowered so that every connection's descriptors fit
    /// beside the daemon's own with `listeners` bound; with the warning to
    /// log when it is lowered.
    pub fn max_conns(&self, configured: usize, listeners: usize) -> (usize, Option<String>) {
        let fixed = self
            .fixed
            .saturating_add(u64::try_from(listeners).unwrap_or(u64::MAX));
        let fit = conn_limit(configured, self.nofile, fixed);
        let warning = (fit < configured).then(|| {
            format!(
                "max_conns={configured} lowered to {fit}: {} descriptors (RLIMIT_NOFILE) \
                 hold {fit} connections at {PER_CONN} each beside the {fixed} the daemon \
                 keeps for itself; raise the hard limit (ulimit -Hn, or the init system's \
                 nofile limit) to allow more",
                self.nofile
            )
        });
        (fit, warning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_beside_the_fixed_ones() {
        assert_eq!(conn_limit(512, 1024, 48), 488);
        assert_eq!(conn_limit(512, 1025, 48), 488, "half a connection is none");
        assert_eq!(conn_limit(512, 1_048_576, 48), 512, "the configured one");
        assert_eq!(conn_limit(512, 48 + 2 * 512, 48), 512);
        assert_eq!(conn_limit(512, 48 + 2 * 512 - 1, 48), 511);
        assert_eq!(conn_limit(512, 64, 48), 8);
        assert_eq!(conn_limit(512, 40, 48), 0, "nothing fits");
        assert_eq!(
            conn_limit(usize::MAX, u64::MAX, 0),
            usize::try_from(u64::MAX / 2).unwrap_or(usize::MAX)
        );
    }

    #[test]
    fn budget_counts_listeners_apart() {
        let b = Budget {
            nofile: 100,
            fixed: 40,
        };
        // (100 - 40 - 2) / 2 = 29: lowered, and said so.
        let (fit, w) = b.max_conns(512, 2);
        assert_eq!(fit, 29);
        let w = w.expect("a warning");
        assert!(
            w.starts_with("max_conns=512 lowered to 29: 100 descriptors"),
            "{w}"
        );
        assert!(w.contains("beside the 42 the daemon keeps"), "{w}");
        // Ten more listeners after a reload: five connections fewer.
        assert_eq!(b.max_conns(512, 12).0, 24);
        assert_eq!(b.max_conns(20, 2), (20, None), "fits: no warning");
        let b = Budget {
            nofile: 10,
            fixed: u64::MAX,
        };
        assert_eq!(b.max_conns(512, usize::MAX).0, 0);
    }

    #[test]
    fn fixed_counts_every_thread_and_the_reserve() {
        let workers = notify::WORKERS as u64;
        let lookups = resolve::MAX_THREADS as u64 * PER_LOOKUP;
        assert_eq!(
            fixed(4),
            4 + LOOP + LOG_REOPEN + workers + lookups + RESERVE
        );
        assert_eq!(fixed(u64::MAX), u64::MAX);
    }
}
