//! Host-name lookups for `CONN`, off the loop: `getaddrinfo` blocks, so it
//! runs on a resolver thread and the answers come back through a channel
//! and the loop's `Waker`.
//!
//! In scope: the thread, the lookup function (injectable, for tests).
//! Out of scope: sockets; deciding whether an answer is still wanted (the
//! loop matches `key` and `serial` against its live connections).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use mio::Waker;

pub type Lookup = Box<dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send>;

/// The system resolver.
pub fn system_lookup() -> Lookup {
    Box::new(|host, port| Ok((host, port).to_socket_addrs()?.collect()))
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

pub struct Resolver {
    tx: Sender<Query>,
    rx: Receiver<Answer>,
}

impl Resolver {
    pub fn spawn(lookup: Lookup, waker: Arc<Waker>) -> io::Result<Resolver> {
        let (tx, queries) = mpsc::channel::<Query>();
        let (answers, rx) = mpsc::channel();
        thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                for q in queries {
                    let result = lookup(&q.host, q.port).and_then(|addrs| {
                        if addrs.is_empty() {
                            Err(io::Error::new(io::ErrorKind::NotFound, "host not found"))
                        } else {
                            Ok(addrs)
                        }
                    });
                    let answer = Answer {
                        key: q.key,
                        serial: q.serial,
                        result,
                    };
                    if answers.send(answer).is_err() || waker.wake().is_err() {
                        break;
                    }
                }
            })?;
        Ok(Resolver { tx, rx })
    }

    /// Queues a lookup; returns at once.
    pub fn submit(&self, key: usize, serial: u64, host: &str, port: u16) {
        let _ = self.tx.send(Query {
            key,
            serial,
            host: host.to_string(),
            port,
        });
    }

    /// Answers that have arrived, without waiting.
    pub fn answers(&self) -> impl Iterator<Item = Answer> + '_ {
        self.rx.try_iter()
    }
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
        let slow: Lookup = Box::new(move |host, port| {
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
}
