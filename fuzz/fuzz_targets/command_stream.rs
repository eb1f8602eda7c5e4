//! `command_stream`: the command-mode state machine (`conn::Conn`) fed an
//! arbitrary byte stream in arbitrary chunks, the way `event_loop.rs` drives
//! it, with the loop's choices (connect or fail, STOP allowed or not, a
//! client that reads its replies at once or only when it must) taken from
//! the input.
//!
//! Input: `flags`, `limits`, `n`, then `n % 8 + 1` chunk-length bytes (used
//! in turn), then the stream. `flags`: bit 0 the connect succeeds, bit 1
//! STOP is allowed, bit 2 the client reads replies only when nothing else
//! can move, bit 3 the client ends its side after the stream, bit 4 the
//! loop connects as soon as CONN is parsed (else once the client has filled
//! the early buffer or the stream ends). `limits`: low nibble picks
//! `max_line`, high nibble `max_blks`.
//!
//! Checks: no panic; `out` only ever holds whole lines; the replies and the
//! steps are exactly those of a model that frames the whole stream at once
//! (so chunking changes nothing): one reply per command in order, every
//! reply one of the known forms, nothing after a close (our end passed on,
//! `Ev::Close`); the bytes behind the CONN line are all kept for the remote;
//! the settings after CONN and the deadline (`poll_at`) follow from what was
//! sent; a turn never does more than `TURN_BUDGET` acts; the state machine
//! never stops taking input while it still could make progress, and every
//! command is answered once the client reads (also those held back by the
//! reply limit).

#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sockproxyd::conn::{
    Act, COMMAND_IDLE, CONNECT_TIMEOUT, Conn, LINGER, OUT_HIGH_WATER, Ready, STAT_IDLE, State,
    TURN_BUDGET,
};
use sockproxyd::protocol::{
    self, CAPA_REPLY, Command, ConnRequest, HELP_REPLY, Limits, MAX_BLKS, MAX_LINE, OneLine,
    Settings, Transport, parse_command,
};
use sockproxyd::stat;

const ID: &str = "1a2b";
const VERA: &str = "http://127.0.0.1:3480";
const REFUSED: &str = "Connection refused";
/// What the loop would append for STAT (the real table is checked apart:
/// its times and counters are not the model's business).
const STAT_TEXT: &str =
    " ID           St  Idle    Up Client\n*1a2b         1  00m00 00m00 127.0.0.1\n";

const MAX_LINES: [usize; 16] = [
    MAX_LINE, 1, 2, 3, 4, 5, 8, 13, 16, 31, 64, 100, 255, 1000, 4095, 4097,
];
const MAX_BLKSES: [usize; 16] = [
    MAX_BLKS, 1, 2, 3, 16, 100, 512, 2048, 4096, 65536, 1, 2, 8, 1000, 2047, 2049,
];

struct Flags {
    connect_ok: bool,
    stop_allowed: bool,
    lazy_reader: bool,
    client_ends: bool,
    connect_at_once: bool,
}

#[derive(Debug, PartialEq)]
enum Ev {
    Connect(ConnRequest),
    Stat,
    Stop,
    Close,
}

/// What the connection must have done with the whole stream.
struct Expect {
    out: Vec<u8>,
    events: Vec<Ev>,
    /// Where the CONN line ended in the stream, and the settings it made.
    conn: Option<(usize, Settings)>,
    /// Draining at the end.
    closed: bool,
}

/// PROTOCOL.md "Command mode", framed and answered line by line over the
/// whole stream; parsing itself is `parse_command`'s (fuzzed on its own).
fn model(stream: &[u8], limits: &Limits, f: &Flags) -> Expect {
    let mut e = Expect {
        out: protocol::greeting(ID).into_bytes(),
        events: Vec::new(),
        conn: None,
        closed: true,
    };
    let mut settings = Settings::default();
    let mut pos = 0;
    let reply = |e: &mut Expect, text: &str| e.out.extend_from_slice(text.as_bytes());
    loop {
        let rest = &stream[pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > limits.max_line + 1 {
                reply(&mut e, "ERR LINE Too long\n");
                e.events.push(Ev::Close);
            } else if f.client_ends {
                // Every command answered, then our end ("client ended").
                e.events.push(Ev::Close);
            } else {
                e.closed = false;
            }
            return e;
        };
        let line = &rest[..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += lf + 1;
        if line.len() > limits.max_line {
            reply(&mut e, "ERR LINE Too long\n");
            e.events.push(Ev::Close);
            return e;
        }
        let cmd = match parse_command(line, limits) {
            Ok(cmd) => cmd,
            Err(err) => {
                reply(&mut e, &format!("{err}\n"));
                e.events.push(Ev::Close);
                return e;
            }
        };
        match cmd {
            Command::Blank => {}
            Command::Conn(req) => {
                let s = req.settings(&settings);
                // PROTOCOL.md "Echo mode": a UDP datagram carries at most
                // 65507 bytes, whichever of BLKS and CONN set the size.
                if s.transport == Transport::Udp && s.blks > 65_507 {
                    reply(&mut e, "ERR CONN BLKS above 65507 for UDP\n");
                    e.events.push(Ev::Close);
                    return e;
                }
                if f.connect_ok {
                    let pid = s.ntfy.as_ref().and_then(|t| t.pid.as_deref()).unwrap_or(ID);
                    // The pid is quoted input: one printable line.
                    reply(&mut e, &format!("OK CONN {}\n", OneLine(pid)));
                    e.closed = false;
                } else {
                    reply(&mut e, &format!("ERR CONN {REFUSED}\n"));
                }
                e.events.push(Ev::Connect(req));
                if !f.connect_ok {
                    e.events.push(Ev::Close);
                }
                e.conn = Some((pos, s));
                return e;
            }
            Command::Ntfy(t) => {
                settings.ntfy = t;
                reply(&mut e, "OK NTFY\n");
            }
            Command::Blks(n) => {
                settings.blks = n;
                reply(&mut e, "OK BLKS\n");
            }
            Command::Rtim(t) => {
                settings.rtim = t;
                reply(&mut e, "OK RTIM\n");
            }
            Command::Pace(p) => {
                settings.pace = p;
                reply(&mut e, "OK PACE\n");
            }
            Command::Stat => {
                e.events.push(Ev::Stat);
                reply(&mut e, STAT_TEXT);
            }
            Command::Capa => reply(&mut e, CAPA_REPLY),
            Command::Help => reply(&mut e, HELP_REPLY),
            Command::Bild => reply(&mut e, &format!("OK {}\n", protocol::BUILD)),
            Command::Quit => {
                reply(&mut e, "OK QUIT\n");
                e.events.push(Ev::Close);
                return e;
            }
            Command::Stop => {
                e.events.push(Ev::Stop);
                if f.stop_allowed {
                    reply(&mut e, "OK STOP\n");
                } else {
                    reply(&mut e, "ERR STOP Not allowed\n");
                }
                e.events.push(Ev::Close);
                return e;
            }
        }
    }
}

/// The event loop's side of the conversation, and what it saw.
struct Loop {
    conn: Conn,
    f: Flags,
    limits: Limits,
    now: Instant,
    /// Everything the client has read, in order.
    read: Vec<u8>,
    events: Vec<Ev>,
    /// What the client has sent that the connection has not read yet.
    pending: Vec<u8>,
    /// The client ended its side after `pending`.
    ended: bool,
    /// Reads from the socket take whole chunks (else at most 7 bytes each).
    whole: bool,
    /// Stream bytes the connection took.
    fed: usize,
    /// CONN parsed, connect not yet done, and when.
    connecting_since: Option<Instant>,
    connected_at: Option<Instant>,
    stat_seen: bool,
    shut: bool,
    /// The connection read the client's end (a full buffer toward the
    /// remote, which never takes anything here, can keep it unread).
    eof_read: bool,
}

impl Loop {
    fn check_out(&self) {
        assert!(
            self.conn.out.is_empty() || self.conn.out.ends_with(b"\n"),
            "out holds a partial line: {:?}",
            String::from_utf8_lossy(&self.conn.out)
        );
        // A reply is at most a HELP text, a STAT table or an error that
        // quotes a line (lossy UTF-8: three bytes per bad byte).
        let bound = OUT_HIGH_WATER + 3 * self.limits.max_line + 4096;
        assert!(
            self.conn.out.len() <= bound,
            "out grew to {}",
            self.conn.out.len()
        );
    }

    /// What a turn changes without I/O: input framed, replies queued, state.
    fn mark(&self) -> (Option<usize>, usize, bool) {
        let input = match &self.conn.state {
            State::Command { input } => Some(input.len()),
            _ => None,
        };
        (input, self.conn.out.len(), self.conn.is_echo())
    }

    fn connect(&mut self) {
        if self.connecting_since.take().is_none() {
            return;
        }
        if self.f.connect_ok {
            self.conn.connected(VERA, REMOTE.parse().unwrap(), self.now);
            self.connected_at = Some(self.now);
        } else {
            self.conn.connect_failed(REFUSED, self.now);
        }
        self.check_out();
    }

    /// Turns of `session::advance`, until the connection waits. `reading`:
    /// the client reads its replies now.
    fn steps(&mut self, reading: bool) {
        let mut ready = Ready {
            client_read: true,
            client_write: reading,
            remote_read: false,
            remote_write: false,
        };
        let mut acts = 0;
        let mut mark = self.mark();
        self.conn.begin_turn();
        loop {
            let act = self.conn.next(ready, self.now);
            self.check_out();
            match act {
                Act::ReadClient => {
                    acts += 1;
                    let (pending, ended, whole) = (&mut self.pending, self.ended, self.whole);
                    let mut got = 0;
                    let mut eof = false;
                    self.conn.read_client(self.now, |space| {
                        if pending.is_empty() {
                            eof = ended;
                            return if ended {
                                Ok(0)
                            } else {
                                Err(std::io::ErrorKind::WouldBlock.into())
                            };
                        }
                        let n = space.len().min(pending.len());
                        let n = if whole { n } else { n.min(7) };
                        space[..n].copy_from_slice(&pending[..n]);
                        pending.drain(..n);
                        got = n;
                        Ok(n)
                    });
                    self.eof_read |= eof;
                    if matches!(
                        self.conn.state,
                        State::Command { .. } | State::Connecting { .. }
                    ) {
                        self.fed += got;
                    }
                    if got == 0 && !self.ended {
                        // Would block: the flag goes down until the next
                        // edge (side.rs), and the turn goes on with what
                        // else can move (the replies, OK CONN among them).
                        ready.client_read = false;
                    }
                }
                Act::WriteClient => {
                    acts += 1;
                    assert!(reading, "a write to a client that is not writable");
                    let data = self.conn.client_data().to_vec();
                    assert!(!data.is_empty(), "a write of nothing");
                    assert!(!self.shut, "a write after our end");
                    self.read.extend_from_slice(&data);
                    self.conn.wrote_client(self.now, Ok(data.len()));
                }
                Act::ShutClient => {
                    acts += 1;
                    assert!(!self.shut, "our end passed on twice");
                    assert!(self.conn.out.is_empty(), "our end before the last reply");
                    self.shut = true;
                    self.events.push(Ev::Close);
                    self.conn.client_shut(self.now);
                }
                Act::Connect(req) => {
                    assert!(matches!(self.conn.state, State::Connecting { .. }));
                    assert_eq!(self.conn.target.as_deref(), Some(req.target.as_str()));
                    assert_eq!(self.conn.poll_at(), Some(self.now + CONNECT_TIMEOUT));
                    self.events.push(Ev::Connect(req));
                    self.connecting_since = Some(self.now);
                    if self.f.connect_at_once {
                        self.connect();
                    }
                }
                Act::Stat => {
                    assert!(matches!(self.conn.state, State::Command { .. }));
                    self.events.push(Ev::Stat);
                    self.stat_seen = true;
                    let table = stat::table(&[self.conn.stat_row(true, self.now)]);
                    assert_eq!(table.lines().count(), 2, "STAT table {table:?}");
                    assert!(table.ends_with('\n'));
                    assert!(
                        table
                            .lines()
                            .nth(1)
                            .is_some_and(|l| l.starts_with("*1a2b "))
                    );
                    self.conn.stat_table(STAT_TEXT);
                }
                Act::Stop => {
                    assert!(matches!(self.conn.state, State::Command { .. }));
                    self.events.push(Ev::Stop);
                    self.conn.stop(self.f.stop_allowed, self.now);
                    assert!(matches!(self.conn.state, State::Draining(_)));
                }
                Act::Yield => {
                    // The budget counts command lines too (a blank-line
                    // flood yields without any I/O).
                    assert!(acts > 0 || self.mark() != mark, "yielded with nothing done");
                    acts = 0;
                    mark = self.mark();
                    self.conn.begin_turn();
                }
                Act::Wait | Act::Close(_) => break,
                Act::Notify(_) => {}
                Act::ReadRemote | Act::WriteRemote | Act::ShutRemote => {
                    assert!(self.conn.is_echo(), "remote I/O outside echo mode");
                    break;
                }
            }
            assert!(acts <= TURN_BUDGET, "{acts} acts in one turn");
        }
        self.check_deadlines();
    }

    fn check_deadlines(&self) {
        let c = &self.conn;
        assert!(c.last_active <= self.now);
        let at = c.poll_at();
        match &c.state {
            State::Command { .. } => {
                let idle = if self.stat_seen {
                    STAT_IDLE
                } else {
                    COMMAND_IDLE
                };
                assert_eq!(at, Some(c.last_active + idle));
            }
            State::Connecting { .. } => {
                assert_eq!(at, self.connecting_since.map(|t| t + CONNECT_TIMEOUT))
            }
            State::Echo(_) => {
                let since = self.connected_at.expect("connected");
                assert_eq!(at, c.settings.rtim.and_then(|r| since.checked_add(r)));
            }
            State::Draining(_) => assert!(at.is_some_and(|at| at <= self.now + LINGER)),
            State::Closed(_) => assert_eq!(at, None),
        }
    }

    /// One chunk from the client, as far as the connection takes it; the
    /// client reads its replies at once unless it is a lazy reader, which
    /// reads only when nothing else moves.
    fn feed(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        self.steps(!self.f.lazy_reader);
        if self.pending.is_empty() {
            return;
        }
        match self.conn.state {
            State::Command { .. } => {
                // Full: only a client that reads its replies can help.
                self.steps(true);
                if let State::Command { input } = &self.conn.state {
                    assert!(
                        !input.is_full() || self.pending.is_empty(),
                        "command mode stuck with a full input buffer"
                    );
                }
            }
            State::Connecting { .. } => {
                assert!(self.connecting_since.is_some());
                self.connect();
                self.steps(!self.f.lazy_reader);
            }
            _ => {}
        }
    }
}

const REMOTE: &str = "10.0.0.1:23";

fuzz_target!(|data: &[u8]| {
    let [flags, limits, n, rest @ ..] = data else {
        return;
    };
    let count = usize::from(n % 8) + 1;
    if rest.len() < count {
        return;
    }
    let (lens, stream) = rest.split_at(count);
    let lens: Vec<usize> = lens
        .iter()
        .map(|&b| match b {
            0..128 => usize::from(b) + 1,
            _ => (usize::from(b) - 127) * 64,
        })
        .collect();
    let f = Flags {
        connect_ok: flags & 1 != 0,
        stop_allowed: flags & 2 != 0,
        lazy_reader: flags & 4 != 0,
        client_ends: flags & 8 != 0,
        connect_at_once: flags & 16 != 0,
    };
    let limits = Limits {
        max_line: MAX_LINES[usize::from(limits & 15)],
        max_blks: MAX_BLKSES[usize::from(limits >> 4)],
    };
    let expect = model(stream, &limits, &f);

    let t0 = Instant::now();
    let client = SocketAddr::from(([127, 0, 0, 1], 5000));
    let mut lp = Loop {
        conn: Conn::command(ID.into(), client, limits, t0),
        f,
        limits,
        now: t0,
        read: Vec::new(),
        events: Vec::new(),
        pending: Vec::new(),
        ended: false,
        whole: flags & 32 == 0,
        fed: 0,
        connecting_since: None,
        connected_at: None,
        stat_seen: false,
        shut: false,
        eof_read: false,
    };
    lp.check_out();

    let mut pos = 0;
    for &len in lens.iter().cycle() {
        if pos >= stream.len() || lp.shut {
            break;
        }
        let chunk = &stream[pos..stream.len().min(pos + len)];
        pos += chunk.len();
        lp.now += Duration::from_millis(1);
        lp.feed(chunk);
    }
    // The stream is over: the client reads what is left (every command
    // already sent gets its answer, also those held back by the reply
    // limit), then the connect completes, then the client may end.
    lp.steps(true);
    if let (Some((conn_end, _)), State::Connecting { .. }) = (&expect.conn, &lp.conn.state) {
        assert_eq!(lp.conn.nothing_early(), lp.fed == *conn_end);
    }
    lp.connect();
    lp.steps(true);
    if lp.f.client_ends {
        lp.ended = true;
        lp.steps(true);
    }
    // A lazy reader may have left unsent input behind a close: the model
    // frames the whole stream, the connection only what it took.
    if !lp.shut {
        assert!(lp.conn.out.is_empty(), "replies left unwritten");
    }

    assert_eq!(
        lp.events,
        expect.events,
        "steps differ from the model's; read so far: {:?}",
        String::from_utf8_lossy(&lp.read)
    );
    assert!(
        lp.read == expect.out,
        "replies differ from the model's:\n got: {:?}\nwant: {:?}",
        String::from_utf8_lossy(&lp.read),
        String::from_utf8_lossy(&expect.out)
    );
    for line in String::from_utf8_lossy(&lp.read).lines() {
        let known = line.starts_with("OK ")
            || line.starts_with("ERR ")
            || HELP_REPLY.lines().any(|h| h == line)
            || STAT_TEXT.lines().any(|s| s == line);
        assert!(known, "unknown reply line {line:?}");
    }

    // Closed means closed: our end went after the last reply, and nothing
    // more is answered.
    let closing = matches!(lp.conn.state, State::Draining(_) | State::Closed(_));
    assert_eq!(closing, expect.closed, "closing state: {}", lp.shut);
    if expect.closed {
        assert!(lp.conn.out.is_empty());
        return;
    }
    let Some((conn_end, settings)) = expect.conn else {
        assert!(matches!(lp.conn.state, State::Command { .. }));
        return;
    };
    // Echo: every byte the client sent behind its CONN line waits for the
    // remote (PROTOCOL.md "CONN": kept and forwarded once connected).
    assert_eq!(lp.conn.settings, settings);
    let State::Echo(e) = &lp.conn.state else {
        panic!("not in echo mode after OK CONN");
    };
    assert_eq!(e.to_client.capacity(), settings.blks);
    assert!(e.to_remote.capacity() >= settings.blks);
    let behind = &stream[conn_end..lp.fed.max(conn_end)];
    assert!(
        e.to_remote.data().starts_with(behind),
        "early bytes lost or changed: {} kept of {}",
        e.to_remote.len(),
        behind.len()
    );
    // PROTOCOL.md "Notifications": a plugin not told of any end gets a final
    // one at the close; one that closed its own socket does not.
    assert!(!lp.eof_read || lp.f.client_ends);
    let final_one = lp.conn.final_notify().is_some();
    assert_eq!(final_one, settings.ntfy.is_some() && !lp.eof_read);
    assert!(
        lp.conn.final_notify().is_none(),
        "two notifications waiting"
    );
});
