//! `echo`: echo mode (`conn::Conn` after CONN, or a `[direct]` connection)
//! driven as `session.rs` drives it, with what the sockets do taken from the
//! input: which are ready, how much each peer sends, how much each write
//! takes, would-block, end-of-stream and errors on either side, time passing
//! (and the connection's timer firing), UDP datagrams from the remote's host
//! or another.
//!
//! Input: four header bytes, then operations of two bytes (`op`, `arg`).
//! Header: `flags` (bit 0 `[direct]`, bit 1 PRTO=udp, bit 2 RTIM, bit 3 NTFY,
//! bit 4 PACE, bit 5 NTFY with a pid, bits 6-7 PACE seconds - 1), `blks`
//! (below 224: 1..=64, else a bigger one), `rtim` (10 ms steps), `early`
//! (payload bytes the client sends behind its CONN line, or before a direct
//! connect completes). Operation `op % 16`: 0 the client sends `arg` bytes,
//! 1 the remote sends `arg` bytes (UDP: a datagram of `arg % 64` bytes; `arg
//! >> 6` picks the source: the remote, its host on another port, another
//! host), 2/3 the client/remote takes `arg` bytes per write (0 none, 255 any),
//! 4/5 the client/remote ends its stream, 6/7 the client/remote socket fails
//! (only with `arg < 8`, so rarely; bit 0: the kernel reports it too), 8 time
//! passes (then the timer fires if `poll_at` has come), 9 a stale timer fires,
//! 10 readiness edges (bits of `arg`), 11 the TCP connect completes, 12-15 a
//! turn. Ops 0-11 are followed by a turn unless bit 7 of `op` is set.
//!
//! Checks, as each act is carried out: nothing lost, duplicated or reordered
//! (the remote received a prefix of the client's payload; UDP datagrams are
//! at most BLKS and their concatenation is such a prefix; the client received
//! the greeting and `OK CONN`, then a prefix of what was read from the remote,
//! datagrams from another host left out); nothing read while the buffer
//! toward the other side is full (TCP) or not empty (UDP), and `wants_read`
//! agrees with what `next` asks; no `Wait` with a move that could be made;
//! an end-of-stream passed on only after the source's end and every byte
//! before it, once, and no write after it; a close only when both directions
//! are shut (TCP), the UDP client ended with everything sent, or for a reason
//! that matches an injected event (client or remote error, RTIM, connect
//! timeout, linger or discard bound); at most `TURN_BUDGET` I/O acts a turn;
//! `poll_at` as the model says (RTIM from the remote's last sign of life,
//! held back while the buffer toward the client is full; the linger and
//! discard bounds), never left in the past (`on_deadline` moves past it);
//! RTIM fires exactly when due; the first notification goes out at the end of
//! the first turn with news for the client (the job is never run, so later
//! ones coalesce), and `final_notify` only for a plugin never told and not
//! gone. Finally (liveness) every socket becomes ready, both peers read
//! everything and end, and the connection must close within a bounded number
//! of turns, every byte delivered both ways (TCP; UDP: the client's way).

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sockproxyd::conn::{
    Act, CONNECT_TIMEOUT, Conn, DISCARD, Flow, LINGER, Ready, State, TURN_BUDGET,
};
use sockproxyd::protocol::{self, Limits, parse_conn};

const ID: &str = "e1";
const PID: &str = "p9";
const VERA: &str = "http://127.0.0.1:3480";
const TARGET: &str = "10.0.0.1:23";
/// `conn.rs`'s bound on input discarded while draining (private there).
const DISCARD_BYTES: usize = 64 * 1024;
const BIG_BLKS: [usize; 8] = [100, 128, 255, 256, 1000, 2048, 4096, 65_507];

fn peer() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 23))
}

/// The client's payload, the remote's stream, and datagrams from a stranger:
/// bytes that differ by position, so a byte lost, doubled or moved shows.
fn pattern(seed: u64, i: usize) -> u8 {
    let x = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}
const CLIENT_SEED: u64 = 0;
const REMOTE_SEED: u64 = 0x5555_5555;
const STRANGER_SEED: u64 = 0xAAAA_AAAA_AAAA;

fn boom(who: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, format!("{who} boom"))
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

fn act_name(act: &Act) -> &'static str {
    match act {
        Act::ReadClient => "ReadClient",
        Act::WriteClient => "WriteClient",
        Act::ShutClient => "ShutClient",
        Act::ReadRemote => "ReadRemote",
        Act::WriteRemote => "WriteRemote",
        Act::ShutRemote => "ShutRemote",
        Act::Notify(_) => "Notify",
        Act::Connect(_) => "Connect",
        Act::Stat => "Stat",
        Act::Stop => "Stop",
        Act::Wait => "Wait",
        Act::Yield => "Yield",
        Act::Close(_) => "Close",
    }
}

fn phase(c: &Conn) -> &'static str {
    match c.state {
        State::Command { .. } => "command",
        State::Connecting { .. } => "connecting",
        State::Echo(_) => "echo",
        State::Draining(_) => "draining",
        State::Closed(_) => "closed",
    }
}

/// One end of the proxied connection, as the kernel and the peer see it.
#[derive(Default)]
struct Peer {
    /// Bytes it has sent toward the proxy (its stream's length so far).
    sent: usize,
    /// ... and of those, read by the proxy.
    taken: usize,
    /// Its end-of-stream follows `sent`.
    ended: bool,
    /// The proxy read that end (`Ok(0)`).
    eof_seen: bool,
    /// Its socket is broken: every call fails.
    failed: bool,
    /// The kernel reports the error (EPOLLERR) at the next turn.
    report: bool,
    /// Bytes it takes per write; 0: none (would block).
    takes: usize,
    /// What it received from the proxy.
    got: Vec<u8>,
    /// Our end-of-stream reached it.
    shut_seen: bool,
    /// The loop's readiness flags (edge-triggered: down on would-block).
    readable: bool,
    writable: bool,
}

/// What draining must do: its cause and its bound.
struct DrainModel {
    cause: String,
    deadline: Instant,
}

struct Sim {
    conn: Conn,
    now: Instant,
    udp: bool,
    direct: bool,
    blks: usize,
    rtim: Option<Duration>,
    ntfy: bool,
    pace: bool,
    /// The CONN line the client sends first (empty when direct).
    line: Vec<u8>,
    /// What must reach the client before the remote's bytes.
    head: Vec<u8>,
    pid: String,
    client: Peer,
    remote: Peer,
    /// UDP: datagrams the remote side has queued, and their sources.
    datagrams: VecDeque<(Vec<u8>, SocketAddr)>,
    stranger_bytes: usize,
    /// What the connection took from the remote and owes the client.
    down: Vec<u8>,
    /// Client bytes read while draining (dropped by design).
    discarded: usize,
    /// The TCP connect is in progress (the connection is `Connecting`).
    connect_since: Option<Instant>,
    connected: bool,
    /// The session let the remote socket go.
    remote_gone: bool,
    /// The remote's last sign of life, for RTIM.
    heard: Instant,
    drain: Option<DrainModel>,
    /// `on_deadline` closed the connection, with this reason.
    deadline_close: Option<String>,
    notifies: usize,
    closed: Option<String>,
    turns: usize,
}

impl Sim {
    fn line_len(&self) -> usize {
        self.line.len()
    }

    /// Payload bytes the connection took to pass on (not discarded).
    fn up_read(&self) -> usize {
        self.client.taken.saturating_sub(self.line_len()) - self.discarded
    }

    fn client_ended(&self) -> bool {
        self.client.eof_seen
    }

    fn remote_present(&self) -> bool {
        self.connected && !self.remote_gone
    }

    fn ready(&self) -> Ready {
        let remote = self.remote_present();
        Ready {
            client_read: self.client.readable,
            client_write: self.client.writable,
            remote_read: remote && self.remote.readable,
            remote_write: remote && self.remote.writable,
        }
    }

    /// Room toward the client: RTIM counts only then.
    fn down_room(&self) -> Option<bool> {
        let State::Echo(e) = &self.conn.state else {
            return None;
        };
        Some(if self.udp {
            e.to_client.is_empty()
        } else {
            !e.to_client.is_full()
        })
    }

    fn rtim_due(&self) -> Option<Instant> {
        // Held back by a full buffer, or the remote has ended: no silence.
        if self.down_room() != Some(true) || self.remote.eof_seen {
            return None;
        }
        self.rtim.map(|r| self.heard + r)
    }

    /// The client's bytes from `from` on are the replies, then what was read
    /// from the remote, in order (the replies only grow before any payload).
    fn check_client_got(&self, from: usize) {
        let head = self.head.len();
        for (i, &b) in self.client.got.iter().enumerate().skip(from) {
            let want = match i.checked_sub(head) {
                None => self.head[i],
                Some(k) => *self.down.get(k).unwrap_or_else(|| {
                    panic!("client byte {i}: more than the replies and the remote's bytes")
                }),
            };
            assert_eq!(
                b,
                want,
                "client byte {i} (replies: {head}) lost, doubled or moved; got {:?}",
                String::from_utf8_lossy(&self.client.got[..head.min(self.client.got.len())])
            );
        }
    }

    /// The remote's bytes from `from` on are the client's payload, in order.
    fn check_remote_got(&self, from: usize) {
        for (i, &b) in self.remote.got.iter().enumerate().skip(from) {
            assert_eq!(
                b,
                pattern(CLIENT_SEED, i),
                "remote byte {i} is not the client's (lost, doubled or moved)"
            );
        }
        assert!(self.remote.got.len() <= self.up_read());
    }

    /// More replies for the client: only before any of the remote's bytes.
    fn reply(&mut self, text: &str) {
        assert!(self.client.got.len() <= self.head.len());
        self.head.extend_from_slice(text.as_bytes());
    }

    fn connected_now(&mut self) {
        self.conn.connected(VERA, peer(), self.now);
        assert!(self.conn.is_echo(), "not in echo mode after connected");
        self.connect_since = None;
        self.connected = true;
        self.heard = self.now;
        self.remote.readable = true;
        self.remote.writable = true;
        if !self.direct {
            self.reply(&protocol::ok_conn(&self.pid));
        }
        let State::Echo(e) = &self.conn.state else {
            unreachable!()
        };
        assert_eq!(e.to_client.capacity(), self.blks);
        assert!(e.to_remote.capacity() >= self.blks);
        let early = self.up_read();
        assert_eq!(e.to_remote.len(), early, "early bytes lost");
        for (i, &b) in e.to_remote.data().iter().enumerate() {
            assert_eq!(b, pattern(CLIENT_SEED, i), "early byte {i} changed");
        }
        assert_eq!(e.up == Flow::Ended, self.client_ended());
    }

    /// The connection entered draining for `cause`.
    fn drained(&mut self, cause: &str) {
        assert!(
            matches!(self.conn.state, State::Draining(_)),
            "{cause}: not draining but {}",
            phase(&self.conn)
        );
        assert!(self.drain.is_none(), "drained twice");
        // With our end already passed to the client, only the discarding is
        // left, bounded by DISCARD.
        let bound = if self.client.shut_seen { DISCARD } else { LINGER };
        self.drain = Some(DrainModel {
            cause: cause.to_string(),
            deadline: self.now + bound,
        });
        self.remote_gone = true;
    }

    /// A socket error reported by the kernel (`session.rs` `take_errors`).
    fn take_errors(&mut self) {
        if self.client.failed && std::mem::take(&mut self.client.report) {
            self.conn.client_failed(&boom("client"), self.now);
        }
        if self.remote.failed && self.conn.is_echo() && std::mem::take(&mut self.remote.report) {
            self.conn.remote_failed(&boom("remote"), self.now);
            self.drained("remote: remote boom");
        }
    }

    /// One turn of `session::advance`; true if the connection closed.
    fn turn(&mut self) -> bool {
        if self.closed.is_some() {
            return true;
        }
        self.turns += 1;
        self.conn.begin_turn();
        self.take_errors();
        let notifies = self.notifies;
        let mut news = false;
        let mut io_acts = 0;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10 * TURN_BUDGET, "a turn without end");
            let ready = self.ready();
            let act = self.conn.next(ready, self.now);
            let before = phase(&self.conn);
            if matches!(
                act,
                Act::ReadClient
                    | Act::WriteClient
                    | Act::ReadRemote
                    | Act::WriteRemote
                    | Act::ShutClient
                    | Act::ShutRemote
            ) {
                io_acts += 1;
                assert!(io_acts <= TURN_BUDGET, "{io_acts} I/O acts in one turn");
            }
            match act {
                Act::ReadClient => self.read_client(ready),
                Act::WriteClient => news |= self.write_client(ready),
                Act::ShutClient => {
                    self.shut_client();
                    // (Notifications begin with echo mode.)
                    news |= self.connected && !self.client_ended();
                }
                Act::ReadRemote => self.read_remote(ready),
                Act::WriteRemote => self.write_remote(ready),
                Act::ShutRemote => self.shut_remote(),
                Act::Notify(_) => {
                    assert!(self.ntfy, "a notification without NTFY");
                    assert!(news, "a notification with nothing new for the client");
                    self.notifies += 1;
                    assert_eq!(self.notifies, 1, "a second job queued: not coalesced");
                }
                Act::Connect(req) => {
                    assert!(
                        !self.direct && before == "connecting",
                        "Connect in {before}"
                    );
                    assert_eq!(req.target, TARGET);
                    assert!(self.connect_since.is_none() && !self.connected);
                    assert_eq!(self.conn.poll_at(), Some(self.now + CONNECT_TIMEOUT));
                    self.connect_since = Some(self.now);
                    if self.udp {
                        // session.rs: a UDP socket is ready at once.
                        self.connected_now();
                    }
                }
                Act::Stat | Act::Stop => panic!("{} in {before}", act_name(&act)),
                Act::Wait | Act::Yield => {
                    if matches!(act, Act::Wait) {
                        self.check_wait(ready);
                    }
                    if self.ntfy && news && notifies == 0 {
                        assert_eq!(self.notifies, 1, "no notification after news");
                    }
                    self.after_turn();
                    return self.closed.is_some();
                }
                Act::Close(why) => {
                    self.close(&why);
                    return true;
                }
            }
            if self.connected && !self.conn.needs_remote() {
                self.remote_gone = true;
            }
        }
    }

    /// `Wait` with a move that could be made is a stall.
    fn check_wait(&self, ready: Ready) {
        let (want_client, want_remote) = self.conn.wants_read();
        assert!(
            !(ready.client_read && want_client),
            "Wait with the client readable and wanted"
        );
        assert!(
            !(ready.remote_read && want_remote),
            "Wait with the remote readable and wanted"
        );
        assert!(
            !ready.client_write || self.conn.client_data().is_empty(),
            "Wait with the client writable and bytes for it"
        );
        assert!(
            !ready.remote_write || self.conn.remote_data().is_empty(),
            "Wait with the remote writable and bytes for it"
        );
        if let State::Echo(e) = &self.conn.state {
            assert!(
                !(e.up == Flow::Ended && e.to_remote.is_empty()),
                "Wait with the client's end to pass on"
            );
            assert!(
                !(e.down == Flow::Ended && e.to_client.is_empty() && self.conn.out.is_empty()),
                "Wait with the remote's end to pass on"
            );
        }
    }

    /// After a turn: the session lets the remote go once it is not needed;
    /// the deadline is the model's and never in the past.
    fn after_turn(&mut self) {
        if self.connected && !self.conn.needs_remote() {
            self.remote_gone = true;
        }
        let pace = self.ntfy && self.pace;
        let at = self.conn.poll_at();
        let want = match &self.conn.state {
            State::Connecting { .. } => self.connect_since.map(|t| t + CONNECT_TIMEOUT),
            State::Echo(_) => self.rtim_due(),
            State::Draining(_) => self.drain.as_ref().map(|d| d.deadline),
            _ => at,
        };
        if pace {
            // A held notification may come first.
            if let Some(want) = want {
                assert!(
                    at.is_some_and(|at| at <= want),
                    "poll_at {at:?} after {want:?}"
                );
            }
        } else {
            assert_eq!(at, want, "poll_at in {}", phase(&self.conn));
        }
        if let Some(at) = at {
            assert!(at > self.now, "poll_at in the past after a turn");
        }
    }

    fn read_client(&mut self, ready: Ready) {
        assert!(ready.client_read, "ReadClient while not readable");
        assert!(!self.client.eof_seen, "ReadClient after the client's end");
        assert!(
            self.conn.wants_read().0,
            "ReadClient that wants_read denies"
        );
        let state = phase(&self.conn);
        if let State::Echo(e) = &self.conn.state {
            assert_eq!(e.up, Flow::Open);
            if self.udp {
                assert!(e.to_remote.is_empty(), "UDP read into a non-empty buffer");
            } else {
                assert!(!e.to_remote.is_full(), "read into a full buffer");
            }
        }
        let (udp_echo, blks) = (self.udp && state == "echo", self.blks);
        let pending = self.client.sent - self.client.taken;
        let mut got = 0;
        let mut eof = false;
        let start = self.client.taken;
        let line = self.line.clone();
        let (failed, ended) = (self.client.failed, self.client.ended);
        let mut readable = true;
        self.conn.read_client(self.now, |space| {
            if udp_echo {
                assert!(space.len() <= blks, "UDP client read above BLKS");
            }
            assert!(!space.is_empty(), "a read into nothing");
            if failed {
                return Err(boom("client"));
            }
            if pending == 0 {
                if ended {
                    eof = true;
                    return Ok(0);
                }
                readable = false;
                return Err(would_block());
            }
            let n = space.len().min(pending);
            for (k, b) in space[..n].iter_mut().enumerate() {
                let i = start + k;
                *b = match line.get(i) {
                    Some(&c) => c,
                    None => pattern(CLIENT_SEED, i - line.len()),
                };
            }
            got = n;
            Ok(n)
        });
        self.client.readable = readable;
        self.client.taken += got;
        if state == "draining" {
            self.discarded += got;
        }
        if eof {
            self.client.eof_seen = true;
        }
        if failed {
            self.client.report = false;
            assert_eq!(phase(&self.conn), "closed", "a client error did not close");
        }
    }

    /// Returns whether remote bytes reached the client (news).
    fn write_client(&mut self, ready: Ready) -> bool {
        assert!(ready.client_write, "WriteClient while not writable");
        assert!(
            !self.client.shut_seen,
            "a write to the client after our end"
        );
        let replies = !self.conn.out.is_empty();
        let data = self.conn.client_data().to_vec();
        assert!(!data.is_empty(), "a write of nothing");
        let held = self.down_room() == Some(false);
        if self.client.failed {
            self.client.report = false;
            self.conn.wrote_client(self.now, Err(boom("client")));
            assert_eq!(phase(&self.conn), "closed", "a client error did not close");
            return false;
        }
        if self.client.takes == 0 {
            self.client.writable = false;
            self.conn.wrote_client(self.now, Err(would_block()));
            return false;
        }
        let n = data.len().min(self.client.takes);
        if n < data.len() {
            self.client.writable = false;
        }
        let from = self.client.got.len();
        self.client.got.extend_from_slice(&data[..n]);
        self.conn.wrote_client(self.now, Ok(n));
        self.check_client_got(from);
        if !replies && held {
            // Our silence, not the remote's.
            self.heard = self.now;
        }
        !replies
    }

    fn shut_client(&mut self) {
        assert!(!self.client.shut_seen, "our end passed to the client twice");
        assert!(self.conn.out.is_empty(), "our end before the replies");
        assert!(
            self.conn.client_data().is_empty(),
            "our end before the data"
        );
        assert_eq!(
            self.client.got.len(),
            self.head.len() + self.down.len(),
            "our end before every byte from the remote"
        );
        match &self.conn.state {
            State::Echo(e) => {
                assert!(!self.udp, "UDP has no end to pass on");
                assert!(self.remote.eof_seen, "our end before the remote's");
                assert_eq!(e.down, Flow::Ended);
            }
            State::Draining(_) => assert!(self.drain.is_some()),
            _ => panic!("ShutClient in {}", phase(&self.conn)),
        }
        self.client.shut_seen = true;
        self.conn.client_shut(self.now);
        if let Some(d) = &mut self.drain {
            d.deadline = d.deadline.min(self.now + DISCARD);
        }
    }

    fn read_remote(&mut self, ready: Ready) {
        assert!(ready.remote_read, "ReadRemote while not readable");
        assert!(!self.remote.eof_seen, "ReadRemote after the remote's end");
        assert!(
            self.conn.wants_read().1,
            "ReadRemote that wants_read denies"
        );
        let State::Echo(e) = &self.conn.state else {
            panic!("ReadRemote in {}", phase(&self.conn));
        };
        assert_eq!(e.down, Flow::Open);
        if self.udp {
            assert!(e.to_client.is_empty(), "UDP read into a non-empty buffer");
        } else {
            assert!(!e.to_client.is_full(), "read into a full buffer");
        }
        let (udp, blks, failed, ended) =
            (self.udp, self.blks, self.remote.failed, self.remote.ended);
        let pending = self.remote.sent - self.remote.taken;
        let start = self.remote.taken;
        let mut readable = true;
        let mut eof = false;
        // (bytes, accepted) of what the read returned.
        let mut got: Option<(Vec<u8>, bool)> = None;
        let datagrams = &mut self.datagrams;
        self.conn.read_remote(self.now, |space| {
            assert!(!space.is_empty(), "a read into nothing");
            if failed {
                return Err(boom("remote"));
            }
            if udp {
                assert_eq!(space.len(), blks, "UDP remote read into less than BLKS");
                let Some((d, from)) = datagrams.pop_front() else {
                    readable = false;
                    return Err(would_block());
                };
                // recv_from cuts a longer datagram at the buffer.
                let n = d.len().min(space.len());
                space[..n].copy_from_slice(&d[..n]);
                got = Some((d[..n].to_vec(), from.ip() == peer().ip()));
                return Ok((n, Some(from)));
            }
            if pending == 0 {
                if ended {
                    eof = true;
                    return Ok((0, None));
                }
                readable = false;
                return Err(would_block());
            }
            let n = space.len().min(pending);
            for (k, b) in space[..n].iter_mut().enumerate() {
                *b = pattern(REMOTE_SEED, start + k);
            }
            got = Some((space[..n].to_vec(), true));
            Ok((n, None))
        });
        self.remote.readable = readable;
        if failed {
            self.remote.report = false;
            self.drained("remote: remote boom");
            return;
        }
        if eof {
            self.remote.eof_seen = true;
            let State::Echo(e) = &self.conn.state else {
                panic!("the remote's end left echo mode");
            };
            assert_eq!(e.down, Flow::Ended);
        }
        if let Some((bytes, accepted)) = got {
            if !udp {
                self.remote.taken += bytes.len();
            }
            if accepted {
                if !bytes.is_empty() {
                    self.heard = self.now;
                }
                self.down.extend_from_slice(&bytes);
            }
            let State::Echo(e) = &self.conn.state else {
                panic!("a read left echo mode");
            };
            let waiting = self.down.len() + self.head.len() - self.client.got.len();
            assert_eq!(
                e.to_client.len() + self.conn.out.len(),
                waiting,
                "bytes toward the client lost or made up"
            );
        }
    }

    fn write_remote(&mut self, ready: Ready) {
        assert!(ready.remote_write, "WriteRemote while not writable");
        assert!(
            !self.remote.shut_seen,
            "a write to the remote after our end"
        );
        assert!(self.conn.is_echo(), "WriteRemote in {}", phase(&self.conn));
        let data = self.conn.remote_data().to_vec();
        assert!(!data.is_empty(), "a write of nothing");
        if self.udp {
            assert!(data.len() <= self.blks, "a datagram above BLKS");
        }
        if self.remote.failed {
            self.remote.report = false;
            self.conn.wrote_remote(self.now, Err(boom("remote")));
            self.drained("remote: remote boom");
            return;
        }
        if self.remote.takes == 0 {
            self.remote.writable = false;
            self.conn.wrote_remote(self.now, Err(would_block()));
            return;
        }
        // A datagram goes whole.
        let n = if self.udp {
            data.len()
        } else {
            data.len().min(self.remote.takes)
        };
        if n < data.len() {
            self.remote.writable = false;
        }
        let from = self.remote.got.len();
        self.remote.got.extend_from_slice(&data[..n]);
        self.conn.wrote_remote(self.now, Ok(n));
        self.check_remote_got(from);
    }

    fn shut_remote(&mut self) {
        assert!(!self.udp, "ShutRemote for UDP");
        assert!(!self.remote.shut_seen, "our end passed to the remote twice");
        assert!(self.client.eof_seen, "our end before the client's");
        assert_eq!(
            self.remote.got.len(),
            self.up_read(),
            "our end before every client byte"
        );
        let State::Echo(e) = &self.conn.state else {
            panic!("ShutRemote in {}", phase(&self.conn));
        };
        assert_eq!(e.up, Flow::Ended);
        assert!(e.to_remote.is_empty());
        self.remote.shut_seen = true;
        self.conn.remote_shut();
    }

    /// The connection's timer fires (`event_loop.rs` `on_timer`), then its
    /// turn.
    fn fire(&mut self) {
        let before = phase(&self.conn);
        let rtim_due = self.rtim_due();
        let room = self.down_room();
        let job = self.conn.on_deadline(self.now);
        if job.is_some() {
            assert!(self.ntfy && self.pace, "a notification from the timer");
            self.notifies += 1;
            assert_eq!(self.notifies, 1, "a second job queued: not coalesced");
        }
        let after = phase(&self.conn);
        match before {
            "connecting" => {
                if self
                    .connect_since
                    .is_some_and(|t| t + CONNECT_TIMEOUT <= self.now)
                {
                    if !self.direct {
                        self.reply(&protocol::err_conn("Connection timed out"));
                    }
                    self.connect_since = None;
                    self.drained("connect failed");
                } else {
                    assert_eq!(after, "connecting", "connect timeout before its time");
                }
            }
            "echo" => {
                if rtim_due.is_some_and(|t| t <= self.now) {
                    assert_eq!(room, Some(true));
                    self.drained("RTIM: remote silent");
                } else {
                    assert_eq!(after, "echo", "RTIM fired early or while held back");
                }
            }
            "draining" => {
                let d = self.drain.as_ref().expect("a drain model");
                if d.deadline <= self.now {
                    assert_eq!(after, "closed", "the drain bound passed");
                    let why = if self.client.shut_seen {
                        d.cause.clone()
                    } else {
                        "client not reading".to_string()
                    };
                    self.deadline_close = Some(why);
                } else {
                    assert_eq!(after, "draining", "drain closed early");
                }
            }
            _ => assert_eq!(after, before),
        }
        if let Some(at) = self.conn.poll_at() {
            assert!(at > self.now, "on_deadline left poll_at in the past");
        }
        self.turn();
    }

    fn close(&mut self, why: &str) {
        let up_all = self.remote.got.len() == self.up_read();
        let ok = match why {
            "both ends closed" => {
                !self.udp
                    && self.client.shut_seen
                    && self.remote.shut_seen
                    && up_all
                    && self.client.eof_seen
                    && self.remote.eof_seen
                    && self.client.got.len() == self.head.len() + self.down.len()
            }
            "client closed" => self.udp && self.client.eof_seen && up_all,
            "client: client boom" => self.client.failed,
            "client hung up while connecting" => {
                !self.connected && self.client.eof_seen && self.up_read() == 0
            }
            w if self.deadline_close.as_deref() == Some(w) => true,
            w if self.drain.as_ref().is_some_and(|d| d.cause == w) => {
                self.client.shut_seen && (self.client.eof_seen || self.discarded >= DISCARD_BYTES)
            }
            _ => false,
        };
        assert!(
            ok,
            "close {why:?} without its cause (client: shut {} eof {} failed {}; remote: \
             shut {} eof {} failed {}; drain {:?})",
            self.client.shut_seen,
            self.client.eof_seen,
            self.client.failed,
            self.remote.shut_seen,
            self.remote.eof_seen,
            self.remote.failed,
            self.drain.as_ref().map(|d| &d.cause)
        );
        assert!(!self.conn.needs_remote());
        // PROTOCOL.md "Notifications": a final one only for a plugin never
        // told and still there.
        let gone = self.client.eof_seen || why.starts_with("client: ");
        let final_one = self.conn.final_notify().is_some();
        assert_eq!(
            final_one,
            self.ntfy && self.connected && self.notifies == 0 && !gone,
            "final notification (gone {gone}, told {})",
            self.notifies
        );
        self.closed = Some(why.to_string());
    }

    #[allow(clippy::type_complexity)]
    fn progress(&self) -> (usize, usize, usize, usize, usize, [bool; 4], &'static str) {
        (
            self.client.taken,
            self.client.got.len(),
            self.remote.taken + self.datagrams.len(),
            self.remote.got.len(),
            self.discarded,
            [
                self.client.shut_seen,
                self.remote.shut_seen,
                self.client.eof_seen,
                self.remote.eof_seen,
            ],
            phase(&self.conn),
        )
    }

    /// Every socket ready, both peers reading everything and ending, no more
    /// time: the connection must close, every byte delivered.
    fn finish(&mut self) {
        if self.closed.is_some() {
            return;
        }
        if matches!(self.conn.state, State::Connecting { .. }) {
            self.connected_now();
        }
        self.client.ended = true;
        self.client.takes = usize::MAX;
        self.remote.ended = !self.udp;
        self.remote.takes = usize::MAX;
        let owed = self.client.sent + self.remote.sent + self.down.len() + 64;
        let bound = 16 + 4 * owed / TURN_BUDGET + owed / self.blks.max(1);
        for _ in 0..bound {
            self.client.readable = true;
            self.client.writable = true;
            self.remote.readable = true;
            self.remote.writable = true;
            let before = self.progress();
            if self.turn() {
                break;
            }
            assert!(before != self.progress(), "stuck in {}", phase(&self.conn));
        }
        let why = self
            .closed
            .clone()
            .expect("no close after everything ended");
        let troubled = self.client.failed || self.remote.failed || self.drain.is_some();
        if troubled {
            return;
        }
        assert_eq!(
            why,
            if self.udp {
                "client closed"
            } else {
                "both ends closed"
            }
        );
        assert_eq!(
            self.remote.got.len(),
            self.client.sent - self.line_len(),
            "client bytes never delivered"
        );
        if !self.udp {
            assert_eq!(
                self.client.got.len(),
                self.head.len() + self.remote.sent,
                "remote bytes never delivered"
            );
        }
    }

    fn op(&mut self, op: u8, arg: u8) {
        let mut then_turn = op & 0x80 == 0;
        match op % 16 {
            0 => {
                if !self.client.ended {
                    self.client.sent += usize::from(arg);
                }
                self.client.readable = true;
            }
            1 if self.udp => {
                let len = usize::from(arg % 64);
                let from = match arg >> 6 {
                    0 | 1 => peer(),
                    2 => SocketAddr::from(([10, 0, 0, 1], 9999)),
                    _ => SocketAddr::from(([10, 0, 0, 2], 23)),
                };
                let d = if from.ip() == peer().ip() {
                    let start = self.remote.sent;
                    self.remote.sent += len;
                    (start..start + len)
                        .map(|i| pattern(REMOTE_SEED, i))
                        .collect()
                } else {
                    let start = self.stranger_bytes;
                    self.stranger_bytes += len;
                    (start..start + len)
                        .map(|i| pattern(STRANGER_SEED, i))
                        .collect()
                };
                self.datagrams.push_back((d, from));
                self.remote.readable = true;
            }
            1 => {
                if !self.remote.ended {
                    self.remote.sent += usize::from(arg);
                }
                self.remote.readable = true;
            }
            2 | 3 => {
                let takes = match arg {
                    255 => usize::MAX,
                    n => usize::from(n),
                };
                let peer = if op % 16 == 2 {
                    &mut self.client
                } else {
                    &mut self.remote
                };
                peer.takes = takes;
                if takes > 0 {
                    peer.writable = true;
                }
            }
            4 => {
                self.client.ended = true;
                self.client.readable = true;
            }
            5 => {
                if !self.udp {
                    self.remote.ended = true;
                }
                self.remote.readable = true;
            }
            6 if arg < 8 => {
                self.client.failed = true;
                self.client.report = arg & 1 == 1;
                self.client.readable = true;
                self.client.writable = true;
            }
            7 if arg < 8 => {
                if self.remote_present() {
                    self.remote.failed = true;
                    self.remote.report = arg & 1 == 1;
                    self.remote.readable = true;
                    self.remote.writable = true;
                }
            }
            8 => {
                let ms = if arg < 200 {
                    u64::from(arg) * 10
                } else {
                    u64::from(arg - 199) * 500
                };
                self.now += Duration::from_millis(ms);
                if self.conn.poll_at().is_some_and(|at| at <= self.now) {
                    self.fire();
                    then_turn = false;
                }
            }
            9 => {
                // A stale timer: nothing is due, nothing changes.
                if self.conn.poll_at().is_none_or(|at| at > self.now) {
                    let before = phase(&self.conn);
                    let at = self.conn.poll_at();
                    assert!(self.conn.on_deadline(self.now).is_none());
                    assert_eq!(phase(&self.conn), before, "a stale timer changed the state");
                    assert_eq!(self.conn.poll_at(), at);
                }
            }
            10 => {
                self.client.readable |= arg & 1 != 0;
                self.client.writable |= arg & 2 != 0;
                self.remote.readable |= arg & 4 != 0;
                self.remote.writable |= arg & 8 != 0;
            }
            11 => {
                if self.connect_since.is_some() && !self.connected {
                    // check_connect: the socket became writable, connected.
                    self.connected_now();
                }
            }
            _ => then_turn = true,
        }
        if then_turn {
            self.turn();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [flags, blks, rtim, early, ops @ ..] = data else {
        return;
    };
    let direct = flags & 1 != 0;
    let udp = flags & 2 != 0;
    let blks = match blks {
        0..224 => usize::from(blks % 64) + 1,
        _ => BIG_BLKS[usize::from(blks % 8)],
    };
    let rtim = (flags & 4 != 0).then(|| Duration::from_millis((u64::from(*rtim) + 1) * 10));
    let ntfy = flags & 8 != 0;
    let pace = ntfy && flags & 16 != 0;
    let pid = ntfy && flags & 32 != 0;
    let mut words = vec![TARGET.to_string(), format!("BLKS={blks}")];
    if udp {
        words.push("PRTO=udp".into());
    }
    if let Some(r) = rtim {
        words.push(format!("RTIM={}", r.as_millis()));
    }
    if ntfy {
        words.push(if pid {
            format!("NTFY=5/sid/act/{PID}")
        } else {
            "NTFY=5".into()
        });
    }
    if pace {
        words.push(format!("PACE={}", 1 + (flags >> 6)));
    }
    let t0 = Instant::now();
    let client = SocketAddr::from(([127, 0, 0, 1], 5000));
    let (conn, line, head) = if direct {
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let req = parse_conn(&refs, &Limits::default()).expect("a valid CONN");
        let conn = Conn::direct(ID.into(), client, &req, t0);
        (conn, Vec::new(), Vec::new())
    } else {
        let conn = Conn::command(ID.into(), client, Limits::default(), t0);
        let line = format!("CONN {}\n", words.join(" ")).into_bytes();
        (conn, line, protocol::greeting(ID).into_bytes())
    };
    let mut sim = Sim {
        conn,
        now: t0,
        udp,
        direct,
        blks,
        rtim,
        ntfy,
        pace,
        line,
        head,
        pid: if pid { PID.into() } else { ID.into() },
        client: Peer {
            takes: usize::MAX,
            readable: true,
            writable: true,
            ..Peer::default()
        },
        remote: Peer {
            takes: usize::MAX,
            ..Peer::default()
        },
        datagrams: VecDeque::new(),
        stranger_bytes: 0,
        down: Vec::new(),
        discarded: 0,
        connect_since: None,
        connected: false,
        remote_gone: false,
        heard: t0,
        drain: None,
        deadline_close: None,
        notifies: 0,
        closed: None,
        turns: 0,
    };
    sim.client.sent = sim.line_len() + usize::from(*early);
    if direct {
        sim.connect_since = Some(t0);
        if udp {
            sim.connected_now();
        }
    }
    sim.turn();
    assert!(
        matches!(sim.conn.state, State::Connecting { .. } | State::Echo(_)),
        "after the CONN line: {}",
        phase(&sim.conn)
    );
    assert_eq!(sim.conn.is_udp(), udp);
    for pair in ops.chunks_exact(2) {
        if sim.closed.is_some() {
            break;
        }
        sim.op(pair[0], pair[1]);
    }
    sim.finish();
});
