//! One proxied connection as a state machine without sockets: its state,
//! its buffers, its counters, its pacing, and every rule of command and echo
//! mode.
//!
//! In scope: what the connection does next. The loop asks `next(ready, now)`
//! and gets an `Act` (read or write a side, pass an end-of-stream on, send a
//! notification, connect, close and why); it performs the syscall and tells
//! the connection what it did (`read_client`, `write_remote`, `client_shut`,
//! ... with the read's or write's result), and asks again. `poll_at()` is the
//! one deadline the loop keeps for the connection; `on_deadline(now)` says
//! what happens when it comes. Out of scope: sockets, the `Registry`, the
//! slab (`session.rs`, `event_loop.rs`).
//!
//! ```text
//!  accept (command port)               accept ([direct] port)
//!        |                                     |
//!        v          CONN                       v
//!    Command ---------------------------> Connecting
//!     |  ^ NTFY BLKS RTIM PACE STAT ...     |      |  connect failed / timeout
//!     |  '--'                      connected|      '--(ERR CONN ...)--.
//!     | QUIT / ERR ... / idle / EOF         v                         |
//!     '------------------------------->  Echo -- RTIM, remote error -->+
//!                                         |                            v
//!              both ends shut, client     |                        Draining
//!              error, UDP client end      v                 (out, then the tail
//!                                       Closed <------------ toward the client,
//!                                                            our end, discard input)
//! ```
//! In echo mode each direction has its own `Flow`: `Open` (its source is
//! read), `Ended` (the source sent its end; buffered bytes still go on),
//! `Shut` (the end was passed on). Draining writes the last reply (and what
//! the remote sent before RTIM or an error), passes our end-of-stream on,
//! then reads and discards what the client still sends until its end or a
//! short bound, so the close never resets what was just written
//! (PROTOCOL.md "Echo mode").

use std::borrow::Cow;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::buffer::Buffer;
use crate::notify::Job;
use crate::protocol::{self, CmdError, Command, ConnRequest, Limits, Line, Settings, Transport};
use crate::stat::Row;

/// PROTOCOL.md "Command mode": no completed command for 30 s closes; after
/// STAT, a person is at a terminal: 100 minutes.
pub const COMMAND_IDLE: Duration = Duration::from_secs(30);
pub const STAT_IDLE: Duration = Duration::from_secs(100 * 60);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a last reply may take to reach a client that does not read.
pub const LINGER: Duration = Duration::from_secs(5);
/// After our end-of-stream, how long what the client still sends is read
/// and discarded before the close (a close with unread input resets).
pub const DISCARD: Duration = Duration::from_secs(2);
/// Replies queued beyond this stop the reading of further commands, so a
/// client pipelining STATs without reading cannot grow `out` without end.
pub const OUT_HIGH_WATER: usize = 64 * 1024;
/// Reply storage kept after `out` drains; a bigger one is given back, so a
/// burst of replies is not held for the connection's whole life.
const OUT_KEEP: usize = 1024;
/// Acts (reads, writes, command lines) per connection per loop turn; then
/// the loop serves the others and comes back (fairness).
pub const TURN_BUDGET: usize = 64;
/// Bytes read and dropped at once while discarding a client's input.
const DISCARD_CHUNK: usize = 512;

/// One direction of echo mode, named after where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The source is read while there is room toward the sink.
    Open,
    /// The source sent its end-of-stream; what is buffered still goes on.
    Ended,
    /// The end was passed on to the sink: this direction is done.
    Shut,
}

/// Echo mode: a remote is connected; bytes pass both ways.
pub struct Echo {
    /// Client to remote; its flow is `up`.
    pub to_remote: Buffer,
    /// Remote to client (after `out`); its flow is `down`.
    pub to_client: Buffer,
    pub up: Flow,
    pub down: Flow,
    /// The remote's address (UDP: datagrams from another host are dropped).
    pub peer: SocketAddr,
    /// When the remote last sent, or the daemon last stopped holding back
    /// reading it: RTIM counts the remote's silence from here.
    heard: Instant,
}

/// Draining: the last words toward the client, then the close.
pub struct Drain {
    /// What the remote sent before the end (RTIM, a remote error), written
    /// after `out`.
    tail: Buffer,
    deadline: Instant,
    /// Our end-of-stream is passed on; the client's input is discarded.
    shut: bool,
    why: Cow<'static, str>,
}

pub enum State {
    /// Reading command lines; the greeting and replies wait in `out`.
    Command {
        input: Buffer,
    },
    /// CONN accepted: resolving the host or connecting. `early` holds what
    /// the client sent behind the CONN line (PROTOCOL.md: kept, forwarded).
    Connecting {
        early: Buffer,
        deadline: Instant,
    },
    Echo(Echo),
    Draining(Drain),
    /// Nothing left to do: the loop closes the connection, saying why.
    Closed(Cow<'static, str>),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Command { .. } => "command",
            State::Connecting { .. } => "connecting",
            State::Echo(_) => "echo",
            State::Draining(_) => "draining",
            State::Closed(_) => "closed",
        }
    }
}

/// What the loop knows of its sockets: readable / writable until a call
/// would block (edge-triggered readiness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    pub client_read: bool,
    pub client_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

/// What the loop should do next for this connection.
pub enum Act {
    /// Read the client into `read_client`.
    ReadClient,
    /// Write `write_client`'s bytes to the client.
    WriteClient,
    /// `shutdown(Write)` the client, then `client_shut`.
    ShutClient,
    ReadRemote,
    WriteRemote,
    /// `shutdown(Write)` the remote, then `remote_shut`.
    ShutRemote,
    /// Hand this notification to the notifier.
    Notify(Arc<Job>),
    /// The connection is now `Connecting`: resolve or connect to this.
    Connect(ConnRequest),
    /// Append the STAT table with `stat_table`, then ask again.
    Stat,
    /// `STOP`: the loop decides whether this client may (`stop`).
    Stop,
    /// Nothing until a socket becomes ready or `poll_at` comes.
    Wait,
    /// This turn's budget is spent with work left: come back next turn.
    Yield,
    /// Close the connection now.
    Close(Cow<'static, str>),
}

/// Notifications of an echo connection (PROTOCOL.md "Notifications").
struct Notify {
    job: Arc<Job>,
    pace: Duration,
    last: Option<Instant>,
    /// One is held by PACE until `last + pace`.
    held: bool,
    /// The end of the stream was passed to the client.
    end_passed: bool,
    /// ... and a notification went out after it: the plugin knows.
    end_told: bool,
}

impl Notify {
    fn due(&self) -> Option<Instant> {
        self.last.and_then(|t| t.checked_add(self.pace))
    }

    /// A notification goes out now: the job, if none is waiting already.
    fn send(&mut self, now: Instant) -> Option<Arc<Job>> {
        self.last = Some(now);
        self.end_told |= self.end_passed;
        self.job.claim().then(|| Arc::clone(&self.job))
    }
}

pub struct Conn {
    pub id: String,
    pub client: SocketAddr,
    pub direct: bool,
    pub state: State,
    /// Greeting and replies, written before anything toward the client.
    pub out: Vec<u8>,
    /// Before CONN, what NTFY/BLKS/RTIM/PACE set; after, the CONN's own.
    pub settings: Settings,
    /// `host:port` as the client gave it, once it has sent CONN.
    pub target: Option<String>,
    pub started: Instant,
    /// When the last command completed (command mode's idle limit).
    pub last_active: Instant,
    stat_asked: bool,
    limits: Limits,
    /// Bytes received from / sent to the remote.
    pub recv: u64,
    pub xmit: u64,
    /// The client sent its end (or failed): nothing more comes from it, and
    /// a plugin that closed its socket has nothing left to be told.
    client_ended: bool,
    notify: Option<Notify>,
    /// Something new reached the client this turn (PROTOCOL.md
    /// "Notifications": announced once the turn is over).
    news: bool,
    /// Acts done this turn (`TURN_BUDGET`).
    acts: usize,
    /// Where echo mode's next scan of its six moves starts (round robin, so
    /// neither direction starves the other).
    cursor: u8,
}

impl Conn {
    /// A connection on the command port: the greeting is queued.
    pub fn command(id: String, client: SocketAddr, limits: Limits, now: Instant) -> Conn {
        let out = protocol::greeting(&id).into_bytes();
        // Room for a longest line, its CR and its LF.
        let input = Buffer::new(limits.max_line.saturating_add(2));
        let mut conn = Conn::new(id, client, false, State::Command { input }, out, now);
        conn.limits = limits;
        conn
    }

    /// A connection on a `[direct]` listener: connecting at once, no
    /// greeting, no reply.
    pub fn direct(id: String, client: SocketAddr, req: &ConnRequest, now: Instant) -> Conn {
        let settings = req.settings(&Settings::default());
        let state = State::Connecting {
            early: Buffer::new(settings.blks),
            deadline: now + CONNECT_TIMEOUT,
        };
        let mut conn = Conn::new(id, client, true, state, Vec::new(), now);
        conn.settings = settings;
        conn.target = Some(req.target.clone());
        conn
    }

    fn new(
        id: String,
        client: SocketAddr,
        direct: bool,
        state: State,
        out: Vec<u8>,
        now: Instant,
    ) -> Conn {
        Conn {
            id,
            client,
            direct,
            state,
            out,
            settings: Settings::default(),
            target: None,
            started: now,
            last_active: now,
            stat_asked: false,
            limits: Limits::default(),
            recv: 0,
            xmit: 0,
            client_ended: false,
            notify: None,
            news: false,
            acts: 0,
            cursor: 0,
        }
    }

    /// Moves to `next`, logging the transition; returns the old state.
    fn enter(&mut self, next: State) -> State {
        let old = self.take_state();
        self.state = next;
        debug!("{}: {} -> {}", self.id, old.name(), self.state.name());
        old
    }

    /// The state, for a transition that builds the next one from its data
    /// (then `enter`); `Closed` stands in meanwhile.
    fn take_state(&mut self) -> State {
        mem::replace(&mut self.state, State::Closed(Cow::Borrowed("")))
    }

    fn udp(&self) -> bool {
        self.settings.transport == Transport::Udp
    }

    pub fn is_udp(&self) -> bool {
        self.udp()
    }

    pub fn is_echo(&self) -> bool {
        matches!(self.state, State::Echo(_))
    }

    /// Whether the state still needs a remote socket (connecting or echo);
    /// once it does not, the loop lets it go.
    pub fn needs_remote(&self) -> bool {
        matches!(self.state, State::Connecting { .. } | State::Echo(_))
    }

    /// Whether the loop should read the client, and the remote, when they
    /// are readable: there is room and the source has not ended (readable
    /// interest follows it, so the kernel holds a peer we do not read).
    pub fn wants_read(&self) -> (bool, bool) {
        let open = !self.client_ended;
        let udp = self.udp();
        match &self.state {
            State::Command { input } => (open && !input.is_full(), false),
            State::Connecting { early, .. } => (open && !early.is_full(), false),
            State::Echo(e) => (
                e.up == Flow::Open && room(&e.to_remote, udp),
                e.down == Flow::Open && room(&e.to_client, udp),
            ),
            State::Draining(d) => (open && d.shut, false),
            State::Closed(_) => (false, false),
        }
    }

    /// A new loop turn for this connection: the budget starts again.
    pub fn begin_turn(&mut self) {
        self.acts = 0;
    }

    /// What the loop should do next, given what it knows of the sockets.
    pub fn next(&mut self, ready: Ready, now: Instant) -> Act {
        loop {
            if self.acts >= TURN_BUDGET {
                return self.announce(now).unwrap_or(Act::Yield);
            }
            let act = match &self.state {
                State::Command { .. } => self.next_command(ready, now),
                State::Connecting { .. } => self.next_connecting(ready),
                State::Echo(_) => self.next_echo(ready),
                State::Draining(_) => self.next_draining(ready),
                State::Closed(why) => Some(Act::Close(why.clone())),
            };
            match act {
                None => self.acts += 1, // a line handled or a state left: go on
                Some(Act::Wait) => return self.announce(now).unwrap_or(Act::Wait),
                Some(act) => {
                    if matches!(
                        act,
                        Act::ReadClient
                            | Act::WriteClient
                            | Act::ReadRemote
                            | Act::WriteRemote
                            | Act::ShutClient
                            | Act::ShutRemote
                    ) {
                        self.acts += 1;
                    }
                    return act;
                }
            }
        }
    }

    /// Command mode: replies out first, then the next complete line, then
    /// more input. `None`: a line was handled, ask again.
    fn next_command(&mut self, ready: Ready, now: Instant) -> Option<Act> {
        if ready.client_write && !self.out.is_empty() {
            return Some(Act::WriteClient);
        }
        let State::Command { input } = &mut self.state else {
            return Some(Act::Wait);
        };
        // Unread replies past the high water hold further commands back
        // until the client reads (then `WriteClient` makes room and the
        // commands already in `input` go on without waiting for new input).
        if self.out.len() <= OUT_HIGH_WATER {
            let (parsed, used) = match protocol::next_line(input.data(), self.limits.max_line) {
                Line::Incomplete => (None, 0),
                Line::TooLong => (Some(Err(CmdError::TooLong)), input.len()),
                Line::Complete(line, used) => {
                    (Some(protocol::parse_command(line, &self.limits)), used)
                }
            };
            input.consume(used);
            if let Some(parsed) = parsed {
                return self.handle(parsed, now);
            }
            if self.client_ended {
                // Every complete command is answered: replies out, then close.
                self.drain("client ended".into(), Buffer::new(0), now);
                return None;
            }
        }
        if ready.client_read && !self.client_ended && !input.is_full() {
            return Some(Act::ReadClient);
        }
        Some(Act::Wait)
    }

    /// Carries out one parsed command line.
    fn handle(&mut self, parsed: Result<Command, CmdError>, now: Instant) -> Option<Act> {
        let cmd = match parsed {
            Ok(Command::Blank) => return None,
            Ok(cmd) => cmd,
            Err(e) => {
                self.fail(&e.to_string(), now);
                return None;
            }
        };
        self.last_active = now;
        match cmd {
            Command::Blank => {}
            Command::Conn(req) => {
                self.begin_connect(&req, now);
                // PROTOCOL.md "Clients that hang up": never connect for a
                // client that has gone (one that sent data behind its CONN
                // and then ended its side wants it delivered).
                if self.client_ended && self.nothing_early() {
                    self.enter(State::Closed(
                        "client hung up before its CONN completed".into(),
                    ));
                    return None;
                }
                return Some(Act::Connect(req));
            }
            Command::Ntfy(target) => {
                self.settings.ntfy = target;
                self.reply(protocol::OK_NTFY);
            }
            Command::Blks(n) => {
                self.settings.blks = n;
                self.reply(protocol::OK_BLKS);
            }
            Command::Rtim(t) => {
                self.settings.rtim = t;
                self.reply(protocol::OK_RTIM);
            }
            Command::Pace(p) => {
                self.settings.pace = p;
                self.reply(protocol::OK_PACE);
            }
            Command::Stat => {
                self.stat_asked = true;
                return Some(Act::Stat);
            }
            Command::Capa => self.reply(protocol::CAPA_REPLY),
            Command::Help => self.reply(protocol::HELP_REPLY),
            Command::Bild => self.reply(&protocol::ok_build()),
            Command::Quit => {
                self.reply(protocol::OK_QUIT);
                self.drain("QUIT".into(), Buffer::new(0), now);
            }
            Command::Stop => return Some(Act::Stop),
        }
        None
    }

    fn next_connecting(&mut self, ready: Ready) -> Option<Act> {
        if ready.client_write && !self.out.is_empty() {
            return Some(Act::WriteClient);
        }
        let State::Connecting { early, .. } = &self.state else {
            return Some(Act::Wait);
        };
        if self.client_ended && early.is_empty() {
            self.enter(State::Closed("client hung up while connecting".into()));
            return None;
        }
        if ready.client_read && !self.client_ended && !early.is_full() {
            return Some(Act::ReadClient);
        }
        Some(Act::Wait)
    }

    /// Echo mode: the first of the six moves, in round-robin order, that
    /// can be made now (PROTOCOL.md "Echo mode").
    fn next_echo(&mut self, ready: Ready) -> Option<Act> {
        let udp = self.udp();
        let out_empty = self.out.is_empty();
        let State::Echo(e) = &self.state else {
            return Some(Act::Wait);
        };
        if e.up == Flow::Shut && e.down == Flow::Shut {
            self.enter(State::Closed("both ends closed".into()));
            return None;
        }
        let room = |b: &Buffer| room(b, udp);
        for i in 0..6 {
            let step = (self.cursor + i) % 6;
            let act = match step {
                0 if ready.client_read && e.up == Flow::Open && room(&e.to_remote) => {
                    Act::ReadClient
                }
                1 if ready.remote_write && !e.to_remote.is_empty() => Act::WriteRemote,
                2 if e.up == Flow::Ended && e.to_remote.is_empty() => {
                    if udp {
                        // No half-close in UDP: the client is done, so is this.
                        self.enter(State::Closed("client closed".into()));
                        return None;
                    }
                    Act::ShutRemote
                }
                3 if ready.remote_read && e.down == Flow::Open && room(&e.to_client) => {
                    Act::ReadRemote
                }
                4 if ready.client_write && !(out_empty && e.to_client.is_empty()) => {
                    Act::WriteClient
                }
                5 if e.down == Flow::Ended && e.to_client.is_empty() && out_empty => {
                    Act::ShutClient
                }
                _ => continue,
            };
            self.cursor = (step + 1) % 6;
            return Some(act);
        }
        Some(Act::Wait)
    }

    fn next_draining(&mut self, ready: Ready) -> Option<Act> {
        let State::Draining(d) = &mut self.state else {
            return Some(Act::Wait);
        };
        if !d.shut {
            if self.out.is_empty() && d.tail.is_empty() {
                return Some(Act::ShutClient);
            }
            return Some(if ready.client_write {
                Act::WriteClient
            } else {
                Act::Wait
            });
        }
        if self.client_ended {
            let why = mem::take(&mut d.why);
            self.enter(State::Closed(why));
            return None;
        }
        Some(if ready.client_read {
            Act::ReadClient
        } else {
            Act::Wait
        })
    }

    /// At the end of a turn: the notification for what reached the client
    /// (PROTOCOL.md "Notifications", PACE).
    fn announce(&mut self, now: Instant) -> Option<Act> {
        if !mem::take(&mut self.news) {
            return None;
        }
        let n = self.notify.as_mut()?;
        if n.held {
            return None; // goes when the PACE window ends (`poll_at`)
        }
        match n.due() {
            Some(due) if !n.pace.is_zero() && now < due => {
                n.held = true;
                None
            }
            _ => n.send(now).map(Act::Notify),
        }
    }

    /// The loop read the client: `read` fills the slice it is given and
    /// returns the count (0: end of stream), or the socket's error.
    pub fn read_client(&mut self, now: Instant, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) {
        let udp = self.udp();
        let blks = self.settings.blks;
        let result = match &mut self.state {
            State::Command { input } => input.read_with(usize::MAX, read),
            State::Connecting { early, .. } => early.read_with(usize::MAX, read),
            // PROTOCOL.md "Echo mode", UDP: one client read, one datagram.
            State::Echo(e) => e
                .to_remote
                .read_with(if udp { blks } else { usize::MAX }, read),
            State::Draining(_) => {
                let mut scratch = [0u8; DISCARD_CHUNK];
                read(&mut scratch)
            }
            State::Closed(_) => return,
        };
        match result {
            Ok(0) => {
                self.client_ended = true;
                if let State::Echo(e) = &mut self.state
                    && e.up == Flow::Open
                {
                    e.up = Flow::Ended;
                }
            }
            Ok(_) => {}
            Err(e) => self.client_failed(&e, now),
        }
    }

    /// The bytes to write to the client next: replies first.
    pub fn client_data(&self) -> &[u8] {
        if !self.out.is_empty() {
            return &self.out;
        }
        match &self.state {
            State::Echo(e) => e.to_client.data(),
            State::Draining(d) => d.tail.data(),
            _ => &[],
        }
    }

    /// The loop wrote `client_data()` to the client: the count written, or
    /// the socket's error.
    pub fn wrote_client(&mut self, now: Instant, result: io::Result<usize>) {
        let n = match result {
            Ok(n) => n,
            Err(e) => return self.client_failed(&e, now),
        };
        if !self.out.is_empty() {
            let n = n.min(self.out.len());
            self.out.drain(..n);
            if self.out.is_empty() && self.out.capacity() > OUT_KEEP {
                self.out = Vec::new();
            }
            return;
        }
        let udp = self.udp();
        match &mut self.state {
            State::Echo(e) => {
                // A full buffer toward the client held the remote back: that
                // was our silence, not the remote's (PROTOCOL.md "RTIM").
                let held = !room(&e.to_client, udp);
                e.to_client.consume(n);
                if held && n > 0 {
                    e.heard = now;
                }
            }
            State::Draining(d) => d.tail.consume(n),
            _ => return,
        }
        self.news |= n > 0;
    }

    /// The loop passed our end-of-stream on to the client.
    pub fn client_shut(&mut self, now: Instant) {
        match &mut self.state {
            State::Echo(e) => {
                e.down = Flow::Shut;
                // The end of the stream is news for the plugin too, unless
                // it has closed its own socket.
                if !self.client_ended {
                    self.news = true;
                    if let Some(n) = &mut self.notify {
                        n.end_passed = true;
                    }
                }
            }
            State::Draining(d) => {
                d.shut = true;
                d.deadline = d.deadline.min(now + DISCARD);
                if self.notify.is_some() && !self.client_ended {
                    self.news = true;
                    if let Some(n) = &mut self.notify {
                        n.end_passed = true;
                    }
                }
            }
            _ => {}
        }
    }

    /// The client's socket failed (a read, a write, or an error the kernel
    /// reported): nothing more can reach it; close.
    pub fn client_failed(&mut self, e: &io::Error, _now: Instant) {
        if e.kind() == io::ErrorKind::WouldBlock {
            return;
        }
        self.client_ended = true;
        self.enter(State::Closed(format!("client: {}", reason(e)).into()));
    }

    /// The loop read the remote: `read` fills the slice and returns the
    /// count and, for UDP, the datagram's source.
    pub fn read_remote(
        &mut self,
        now: Instant,
        read: impl FnOnce(&mut [u8]) -> io::Result<(usize, Option<SocketAddr>)>,
    ) {
        let udp = self.udp();
        let State::Echo(e) = &mut self.state else {
            return;
        };
        let peer = e.peer;
        let mut dropped = None;
        let result = e.to_client.read_with(usize::MAX, |space| {
            let (n, from) = read(space)?;
            match from {
                // PROTOCOL.md "Echo mode", UDP: another port of the same
                // host is the device; another host is dropped.
                Some(from) if udp && from.ip() != peer.ip() => {
                    dropped = Some((n, from));
                    Ok(0)
                }
                _ => Ok(n),
            }
        });
        match result {
            Ok(n) if n > 0 => {
                self.recv += n as u64;
                e.heard = now;
            }
            Ok(_) if udp => {
                if let Some((n, from)) = dropped {
                    debug!("{}: dropped a {n}-byte datagram from {from}", self.id);
                }
            }
            Ok(_) => e.down = Flow::Ended,
            Err(err) => self.remote_failed(&err, now),
        }
    }

    /// The bytes to send to the remote next (UDP: one datagram, at most
    /// BLKS).
    pub fn remote_data(&self) -> &[u8] {
        let State::Echo(e) = &self.state else {
            return &[];
        };
        let data = e.to_remote.data();
        if self.udp() {
            data.get(..self.settings.blks.min(data.len()))
                .unwrap_or(data)
        } else {
            data
        }
    }

    /// The loop sent `remote_data()` to the remote: the count, or the error.
    pub fn wrote_remote(&mut self, now: Instant, result: io::Result<usize>) {
        let n = match result {
            Ok(n) => n,
            Err(e) => return self.remote_failed(&e, now),
        };
        // A datagram goes whole or not at all.
        let used = if self.udp() {
            self.remote_data().len()
        } else {
            n
        };
        if let State::Echo(e) = &mut self.state {
            e.to_remote.consume(used);
            self.xmit += n as u64;
        }
    }

    /// The loop passed the client's end-of-stream on to the remote.
    pub fn remote_shut(&mut self) {
        if let State::Echo(e) = &mut self.state {
            e.up = Flow::Shut;
        }
    }

    /// The remote's socket failed: what it sent before still reaches the
    /// client, then the connection ends (as at the remote's end).
    pub fn remote_failed(&mut self, e: &io::Error, now: Instant) {
        if e.kind() == io::ErrorKind::WouldBlock {
            return;
        }
        let why = format!("remote: {}", reason(e));
        self.end_remote(why.into(), now);
    }

    /// Leaves echo mode without the remote: the bytes owed to the client
    /// are written, then our end, then the close.
    fn end_remote(&mut self, why: Cow<'static, str>, now: Instant) {
        match self.take_state() {
            State::Echo(e) => {
                self.state = State::Echo(Echo {
                    to_remote: Buffer::new(0),
                    to_client: Buffer::new(0),
                    ..e
                });
                self.drain(why, e.to_client, now);
            }
            other => self.state = other,
        }
    }

    /// To `Draining`: `out`, then `tail`, then our end, then the close.
    fn drain(&mut self, why: Cow<'static, str>, tail: Buffer, now: Instant) {
        self.enter(State::Draining(Drain {
            tail,
            deadline: now + LINGER,
            shut: false,
            why,
        }));
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// Queues the error reply (one line) and drains.
    pub fn fail(&mut self, reply: &str, now: Instant) {
        self.reply(reply);
        self.reply("\n");
        self.drain("error".into(), Buffer::new(0), now);
    }

    /// Answers `STOP`: `OK STOP` if this client may stop the daemon
    /// (`[host] stop_from=`), else `ERR STOP Not allowed`; either way the
    /// connection then drains and closes.
    pub fn stop(&mut self, allowed: bool, now: Instant) {
        if allowed {
            self.reply(protocol::OK_STOP);
            self.drain("STOP".into(), Buffer::new(0), now);
        } else {
            self.reply(protocol::ERR_STOP);
            self.drain("STOP not allowed".into(), Buffer::new(0), now);
        }
    }

    /// Appends the STAT table (`Act::Stat`).
    pub fn stat_table(&mut self, table: &str) {
        self.reply(table);
    }

    fn begin_connect(&mut self, req: &ConnRequest, now: Instant) {
        self.settings = req.settings(&self.settings);
        self.target = Some(req.target.clone());
        let blks = self.settings.blks;
        let early = match self.take_state() {
            State::Command { input } => input,
            _ => Buffer::new(blks),
        };
        self.state = State::Command {
            input: Buffer::new(0),
        };
        self.enter(State::Connecting {
            early,
            deadline: now + CONNECT_TIMEOUT,
        });
    }

    /// True while connecting and nothing was sent behind the CONN line: a
    /// client that hangs up now has given up (PROTOCOL.md "Clients that
    /// hang up"); one that sent data and then shut down its side wants it
    /// delivered.
    pub fn nothing_early(&self) -> bool {
        matches!(&self.state, State::Connecting { early, .. } if early.is_empty())
    }

    /// The remote is connected (or, for UDP, its socket is ready): queue
    /// `OK CONN` and start passing bytes. `vera` is the Luup base URL.
    pub fn connected(&mut self, vera: &str, peer: SocketAddr, now: Instant) {
        let blks = self.settings.blks;
        let (early, deadline) = match self.take_state() {
            State::Connecting { early, deadline } => (early, deadline),
            other => {
                self.state = other;
                return;
            }
        };
        // Back in place for the moment, so that the transition logs as one.
        self.state = State::Connecting {
            early: Buffer::new(0),
            deadline,
        };
        // The client may have sent more than one block behind its CONN
        // line: the buffer toward the remote is made big enough to keep it.
        let mut to_remote = Buffer::new(blks.max(early.len()));
        to_remote.push(early.data());
        if !self.direct {
            let reply = protocol::ok_conn(self.notify_pid());
            self.reply(&reply);
        }
        self.notify = self.settings.ntfy.as_ref().map(|t| Notify {
            job: Job::new(&self.id, vera, t),
            pace: self.settings.pace,
            last: None,
            held: false,
            end_passed: false,
            end_told: false,
        });
        self.last_active = now;
        self.enter(State::Echo(Echo {
            to_remote,
            to_client: Buffer::new(blks),
            // A client that ended behind its CONN data: pass the end on
            // once the data is out.
            up: if self.client_ended {
                Flow::Ended
            } else {
                Flow::Open
            },
            down: Flow::Open,
            peer,
            heard: now,
        }));
    }

    /// The pid notifications and `OK CONN` carry: NTFY's, else the id.
    pub fn notify_pid(&self) -> &str {
        self.settings
            .ntfy
            .as_ref()
            .and_then(|t| t.pid.as_deref())
            .unwrap_or(&self.id)
    }

    /// The connect failed: `ERR CONN <reason>`, then close (a direct
    /// connection has nobody to tell and just closes).
    pub fn connect_failed(&mut self, reason: &str, now: Instant) {
        if !matches!(self.state, State::Connecting { .. }) {
            return;
        }
        if !self.direct {
            self.reply(&protocol::err_conn(reason));
        }
        self.drain("connect failed".into(), Buffer::new(0), now);
    }

    /// The one time the loop must come back without traffic: command-mode
    /// idle, connect timeout, RTIM, PACE, linger.
    pub fn poll_at(&self) -> Option<Instant> {
        let state = match &self.state {
            State::Command { .. } => {
                let limit = if self.stat_asked {
                    STAT_IDLE
                } else {
                    COMMAND_IDLE
                };
                self.last_active.checked_add(limit)
            }
            State::Connecting { deadline, .. } => Some(*deadline),
            State::Echo(e) => self.rtim_due(e),
            State::Draining(d) => Some(d.deadline),
            State::Closed(_) => None,
        };
        let pace = self
            .notify
            .as_ref()
            .filter(|n| n.held)
            .and_then(Notify::due);
        match (state, pace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When RTIM ends the connection: the remote's silence counts only
    /// while the daemon is ready to read it (PROTOCOL.md "CONN", RTIM).
    fn rtim_due(&self, e: &Echo) -> Option<Instant> {
        let rtim = self.settings.rtim?;
        if !room(&e.to_client, self.udp()) {
            return None;
        }
        e.heard.checked_add(rtim)
    }

    /// `poll_at` may have come: a held notification to send now, if any;
    /// the state moves on if its deadline has passed (the loop then asks
    /// `next` again).
    pub fn on_deadline(&mut self, now: Instant) -> Option<Arc<Job>> {
        let job = match &mut self.notify {
            Some(n) if n.held && n.due().is_none_or(|due| due <= now) => {
                n.held = false;
                n.send(now)
            }
            _ => None,
        };
        match &self.state {
            State::Command { .. } if self.poll_at().is_some_and(|at| at <= now) => {
                self.enter(State::Closed("idle in command mode".into()));
            }
            State::Connecting { deadline, .. } if *deadline <= now => {
                let target = self.target.clone().unwrap_or_default();
                info!("{}: connect to {target} timed out", self.id);
                self.connect_failed("Connection timed out", now);
            }
            State::Echo(e) if self.rtim_due(e).is_some_and(|at| at <= now) => {
                self.end_remote("RTIM: remote silent".into(), now);
            }
            State::Draining(d) if d.deadline <= now => {
                let why = if d.shut {
                    d.why.clone()
                } else {
                    "client not reading".into()
                };
                self.enter(State::Closed(why));
            }
            _ => {}
        }
        job
    }

    /// The final notification, when the connection is closed (PROTOCOL.md
    /// "Notifications"): only for a plugin not yet told of the end, and
    /// that has not closed its own socket.
    pub fn final_notify(&self) -> Option<Arc<Job>> {
        let n = self.notify.as_ref()?;
        if n.end_told || self.client_ended {
            return None;
        }
        n.job.claim().then(|| Arc::clone(&n.job))
    }

    pub fn stat_row(&self, me: bool, now: Instant) -> Row {
        let since = match &self.state {
            State::Echo(e) => e.heard,
            _ => self.last_active,
        };
        Row {
            me,
            id: self.id.clone(),
            state: if self.is_echo() { 2 } else { 1 },
            idle: now.saturating_duration_since(since),
            uptime: now.saturating_duration_since(self.started),
            client: self.client.ip().to_string(),
            remote: self.target.clone().unwrap_or_default(),
            recv: self.recv,
            xmit: self.xmit,
            notify: match &self.settings.ntfy {
                Some(t) => format!(
                    "{}/{}/{}/{}",
                    t.device,
                    t.service,
                    t.action,
                    self.notify_pid()
                ),
                None => String::new(),
            },
        }
    }
}

/// Room to read into: UDP reads one datagram into an empty buffer (a client
/// read is one datagram, a datagram one client write); TCP any free space.
fn room(b: &Buffer, udp: bool) -> bool {
    if udp { b.is_empty() } else { !b.is_full() }
}

/// An OS error as a person reads it: without "(os error N)".
pub fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text.get(..i).unwrap_or(&text).to_string(),
        None => text,
    }
}
