//! Host-name lookups for `CONN`, off the loop: `getaddrinfo` blocks, so it
//! runs on resolver threads and the answers come back through a channel and
//! the loop's `Waker`.
//!
//! In scope: a small pool of threads, started on demand and leaving when
//! idle; the queue of lookups; the lookup function (injectable, for tests).
//! Up to `MAX_BUSY` lookups for connections that are still there run at
//! once, so one dead DNS name does not hold up a name that resolves at once.
//! A lookup whose client has gone (`cancel`) is not started, and one already
//! running no longer counts toward `MAX_BUSY` (it cannot be interrupted);
//! at most `MAX_THREADS` threads exist, abandoned lookups included. Out of
//! scope: sockets; literal addresses (the loop connects to those at once);
//! deciding whether an answer is still wanted (the loop matches `key` and
//! `serial` against its live connections).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use log::warn;
use mio::Waker;

pub type Lookup = Arc<dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync>;

/// Lookups for present clients running at once.
pub const MAX_BUSY: usize = 4;
/// Resolver threads at most, counting those still stuck in a lookup whose
/// client has gone. Each may hold a descriptor or two (a DNS socket,
/// /etc/hosts) while it runs.
pub const MAX_THREADS: usize = 8;
/// A thread with nothing to do for this long leaves.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// getaddrinfo needs little stack; the default 2 MiB per thread is address
/// space a 32-bit router can use better.
const STACK: usize = 256 * 1024;

/// The system resolver.
pub fn system_lookup() -> Lookup {
    Arc::new(|host, port| Ok((host, port).to_socket_addrs()?.collect()))
}

struct Query {
    key: usize,
    serial: u64,
    host: String,
    port: u16,
}

pub struct Answer {
    pub key: usize,
    pub serial: u64,
    pub result: io::Result<Vec<SocketAddr>>,
}

/// The pool's state, under one lock.
#[derive(Default)]
struct Work {
    waiting: VecDeque<Query>,
    /// (key, serial) of the running lookups whose client is still there.
    busy: Vec<(usize, u64)>,
    threads: usize,
    /// Threads started and not yet at work: each is meant for one waiting
    /// lookup, so `grow` must count it as busy already.
    starting: usize,
    idle: usize,
    /// A cancel freed a busy slot while lookups wait: `answers` (the loop's
    /// next turn) looks for a thread for them.
    regrow: bool,
    /// The resolver has been dropped: threads leave.
    closed: bool,
}

struct Shared {
    work: Mutex<Work>,
    ready: Condvar,
    lookup: Lookup,
    answers: Sender<Answer>,
    waker: Arc<Waker>,
}

pub struct Resolver {
    shared: Arc<Shared>,
    rx: Receiver<Answer>,
}

impl Resolver {
    pub fn spawn(lookup: Lookup, waker: Arc<Waker>) -> io::Result<Resolver> {
        let (answers, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            work: Mutex::new(Work::default()),
            ready: Condvar::new(),
            lookup,
            answers,
            waker,
        });
        Ok(Resolver { shared, rx })
    }

    /// Queues a lookup; returns at once (starting a thread if none is free
    /// and the caps allow one).
    pub fn submit(&self, key: usize, serial: u64, host: &str, port: u16) {
        let Ok(mut work) = self.shared.work.lock() else {
            return;
        };
        work.waiting.push_back(Query {
            key,
            serial,
            host: host.to_string(),
            port,
        });
        self.grow(work);
    }

    /// The client of lookup (`key`, `serial`) has gone: a waiting lookup is
    /// dropped, a running one stops counting toward `MAX_BUSY`.
    pub fn cancel(&self, key: usize, serial: u64) {
        let Ok(mut work) = self.shared.work.lock() else {
            return;
        };
        let waiting = work.waiting.len();
        work.waiting.retain(|q| (q.key, q.serial) != (key, serial));
        if work.waiting.len() != waiting {
            return;
        }
        let busy = work.busy.len();
        work.busy.retain(|&b| b != (key, serial));
        if work.busy.len() != busy && !work.waiting.is_empty() {
            // Not at once: clients often go together (a plugin restarting),
            // and a thread started now would take a lookup whose cancel is
            // next in this turn, and then be stuck in it too.
            work.regrow = true;
            drop(work);
            let _ = self.shared.waker.wake();
        }
    }

    /// Wakes an idle thread, or starts one, for the lookups that wait.
    fn grow(&self, mut work: MutexGuard<'_, Work>) {
        if work.waiting.len() <= work.idle.saturating_add(work.starting) {
            drop(work);
            self.shared.ready.notify_one();
            return;
        }
        if work.busy.len().saturating_add(work.starting) >= MAX_BUSY || work.threads >= MAX_THREADS
        {
            return; // a running lookup takes the next when it is done
        }
        work.threads += 1;
        work.starting += 1;
        drop(work);
        let shared = Arc::clone(&self.shared);
        let spawned = thread::Builder::new()
            .name("resolver".into())
            .stack_size(STACK)
            .spawn(move || serve(&shared));
        if let Err(e) = spawned {
            warn!("cannot start a resolver thread: {e}");
            let Ok(mut work) = self.shared.work.lock() else {
                return;
            };
            work.threads = work.threads.saturating_sub(1);
            work.starting = work.starting.saturating_sub(1);
            if work.threads == 0 {
                // Nobody will take them: fail them rather than let them
                // wait for the connect timeout.
                let failed: Vec<Query> = work.waiting.drain(..).collect();
                drop(work);
                for q in failed {
                    let err = io::Error::new(e.kind(), "no resolver thread");
                    self.shared.answer(q.key, q.serial, Err(err));
                }
            }
        }
    }

    #[cfg(test)]
    fn threads(&self) -> usize {
        self.shared.work.lock().map(|w| w.threads).unwrap_or(0)
    }

    /// Lookups running for clients still there.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.shared.work.lock().map(|w| w.busy.len()).unwrap_or(0)
    }

    /// Answers that have arrived, without waiting.
    pub fn answers(&self) -> impl Iterator<Item = Answer> + '_ {
        if let Ok(mut work) = self.shared.work.lock()
            && std::mem::take(&mut work.regrow)
        {
            self.grow(work);
        }
        self.rx.try_iter()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Ok(mut work) = self.shared.work.lock() {
            work.closed = true;
        }
        self.shared.ready.notify_all();
    }
}

impl Shared {
    fn answer(&self, key: usize, serial: u64, result: io::Result<Vec<SocketAddr>>) {
        let _ = self.answers.send(Answer {
            key,
            serial,
            result,
        });
        let _ = self.waker.wake();
    }
}

/// One resolver thread: runs the waiting lookups, leaves after `IDLE_EXIT`
/// with nothing to do.
fn serve(shared: &Shared) {
    let Ok(mut work) = shared.work.lock() else {
        return;
    };
    work.starting = work.starting.saturating_sub(1);
    loop {
        if work.closed {
            break;
        }
        // Past MAX_BUSY a thread idles (its lookup is done) until a busy
        // one ends or is cancelled.
        if work.busy.len() < MAX_BUSY
            && let Some(q) = work.waiting.pop_front()
        {
            work.busy.push((q.key, q.serial));
            drop(work);
            let result = (shared.lookup)(&q.host, q.port).and_then(|addrs| {
                if addrs.is_empty() {
                    Err(io::Error::new(io::ErrorKind::NotFound, "host not found"))
                } else {
                    Ok(addrs)
                }
            });
            let Ok(mut again) = shared.work.lock() else {
                return;
            };
            let still_wanted = again.busy.len();
            again.busy.retain(|&b| b != (q.key, q.serial));
            let wanted = again.busy.len() != still_wanted;
            drop(again);
            if wanted {
                shared.answer(q.key, q.serial, result);
            }
            let Ok(next) = shared.work.lock() else {
                return;
            };
            work = next;
            continue;
        }
        work.idle += 1;
        let (next, timeout) = match shared.ready.wait_timeout(work, IDLE_EXIT) {
            Ok(r) => r,
            Err(_) => return,
        };
        work = next;
        work.idle = work.idle.saturating_sub(1);
        if timeout.timed_out() && work.waiting.is_empty() {
            break;
        }
    }
    work.threads = work.threads.saturating_sub(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A lookup that blocks until the test lets it go shows that `submit`
    /// (what the loop calls) does not wait for it, and that the answer
    /// arrives through the waker.
    #[test]
    fn lookups_run_off_the_caller() {
        let mut poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).expect("waker"));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let slow: Lookup = Arc::new(move |host, port| {
            let _ = gate.lock().map(|g| g.recv());
            assert_eq!(host, "device.lan");
            Ok(vec![SocketAddr::from(([10, 0, 0, 9], port))])
        });
        let resolver = Resolver::spawn(slow, waker).expect("spawn");
        resolver.submit(3, 42, "device.lan", 8080);
        // The lookup is still blocked, yet submit has returned: the loop
        // would be free to serve everyone else.
        assert_eq!(resolver.answers().count(), 0);
        release.send(()).expect("release");
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(10)))
            .expect("poll");
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(7)));
        let answers: Vec<Answer> = resolver.answers().collect();
        assert_eq!(answers.len(), 1);
        assert_eq!((answers[0].key, answers[0].serial), (3, 42));
        let addrs = answers[0].result.as_ref().expect("resolved");
        assert_eq!(addrs, &vec![SocketAddr::from(([10, 0, 0, 9], 8080))]);
    }

    /// Waits (bounded) for the waker, then returns what has arrived.
    fn wait_answers(poll: &mut Poll, resolver: &Resolver, n: usize, ms: u64) -> Vec<Answer> {
        let mut got = Vec::new();
        let mut events = Events::with_capacity(4);
        let deadline = std::time::Instant::now() + Duration::from_millis(ms);
        while got.len() < n && std::time::Instant::now() < deadline {
            let _ = poll.poll(&mut events, Some(Duration::from_millis(100)));
            got.extend(resolver.answers());
        }
        got
    }

    /// Lookups of a name that never answers, abandoned by their clients, do
    /// not hold up a name that resolves at once; ones still wanted hold at
    /// most `MAX_BUSY` threads, and the queue behind them waits.
    #[test]
    fn abandoned_lookups_do_not_hold_up_others() {
        let mut poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).expect("waker"));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let lookup: Lookup = Arc::new(move |host, port| {
            if host.ends_with(".slow") {
                let _ = gate.lock().map(|g| g.recv());
            }
            Ok(vec![SocketAddr::from(([10, 0, 0, 9], port))])
        });
        let resolver = Resolver::spawn(lookup, waker).expect("spawn");
        for n in 0..10 {
            resolver.submit(n, n as u64, "dead.slow", 80);
        }
        // Let the first ones start; all but MAX_BUSY wait.
        let t0 = std::time::Instant::now();
        while resolver.busy() < MAX_BUSY && t0.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resolver.busy(), MAX_BUSY);
        resolver.submit(20, 20, "fast.lan", 80);
        assert_eq!(resolver.threads(), MAX_BUSY, "no more threads than lookups");
        assert!(
            wait_answers(&mut poll, &resolver, 1, 300).is_empty(),
            "waits its turn"
        );
        for n in 0..10 {
            resolver.cancel(n, n as u64);
        }
        let got = wait_answers(&mut poll, &resolver, 1, 10_000);
        let keys: Vec<usize> = got.iter().map(|a| a.key).collect();
        assert_eq!(keys, [20], "only the fast lookup's answer");
        // The abandoned ones end with no answer.
        for _ in 0..MAX_BUSY {
            let _ = release.send(());
        }
        resolver.submit(21, 21, "fast2.lan", 80);
        let got = wait_answers(&mut poll, &resolver, 1, 10_000);
        let keys: Vec<usize> = got.iter().map(|a| a.key).collect();
        assert_eq!(keys, [21]);
    }
}
