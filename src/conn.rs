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

use crate::buffer::{self, Buffer};
use crate::notify::Slot;
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
/// With the memory budget spent, replies beyond this wait for the client
/// before more commands run. (Drained, `out` gives its storage back.)
const OUT_KEEP: usize = 1024;
/// Acts (reads, writes, command lines) per connection per loop turn; then
/// the loop serves the others and comes back (fairness).
pub const TURN_BUDGET: usize = 64;
/// Bytes read and dropped at once while discarding a client's input.
const DISCARD_CHUNK: usize = 512;
/// Most input discarded before the close: a client still streaming toward
/// a remote that is gone learns it from the reset, rather than have its
/// bytes swallowed.
const DISCARD_BYTES: usize = 64 * 1024;

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
    /// Bytes of input discarded so far (`DISCARD_BYTES`).
    discarded: usize,
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
    Notify(Arc<Slot>),
    /// The connection is now `Connecting`: resolve or connect to this.
    /// (Boxed: the loop moves an `Act` around for every chunk of data, and a
    /// request would make every one of them big.)
    Connect(Box<ConnRequest>),
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
    job: Arc<Slot>,
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
    fn send(&mut self, now: Instant) -> Option<Arc<Slot>> {
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
    /// `out`'s storage as counted against the memory budget.
    out_counted: usize,
}

impl Drop for Conn {
    fn drop(&mut self) {
        buffer::refund(self.out_counted);
    }
}

impl Conn {
    /// A connection on the command port: the greeting is queued.
    pub fn command(id: String, client: SocketAddr, limits: Limits, now: Instant) -> Conn {
        let out = protocol::greeting(&id).into_bytes();
        // Room for a longest line, its CR and its LF, in one piece.
        let input = Buffer::whole(limits.max_line.saturating_add(2));
        let mut conn = Conn::new(id, client, false, State::Command { input }, out, now);
        conn.limits = limits;
        conn.count_out();
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
            out_counted: 0,
        }
    }

    /// Brings the memory budget's count of `out` up to date.
    fn count_out(&mut self) {
        let cap = self.out.capacity();
        if cap > self.out_counted {
            buffer::charge(cap - self.out_counted);
        } else {
            buffer::refund(self.out_counted - cap);
        }
        self.out_counted = cap;
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

    pub fn is_udp(&self) -> bool {
        self.settings.transport == Transport::Udp
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
        let udp = self.is_udp();
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
                self.trim();
                return self.announce(now).unwrap_or(Act::Yield);
            }
            let act = match &self.state {
                State::Command { .. } => self.next_command(ready, now),
                State::Connecting { .. } => self.next_connecting(ready),
                State::Echo(_) => self.next_echo(ready),
                State::Draining(_) => self.next_draining(ready),
                // What reached the client this turn is announced before the
                // close (a transfer may end in the turn that wrote its last
                // bytes).
                State::Closed(_) => Some(self.announce(now).unwrap_or_else(|| match &self.state {
                    State::Closed(why) => Act::Close(why.clone()),
                    _ => Act::Wait,
                })),
            };
            // Every pass counts: an act handed out, a line handled, a
            // state left.
            self.acts += 1;
            match act {
                None => {}
                Some(Act::Wait) => {
                    self.trim();
                    return self.announce(now).unwrap_or(Act::Wait);
                }
                Some(act) => return act,
            }
        }
    }

    /// The turn is over: buffers with nothing waiting give their storage
    /// back (an idle connection holds none).
    fn trim(&mut self) {
        match &mut self.state {
            State::Command { input } => input.trim(),
            State::Connecting { early, .. } => early.trim(),
            State::Echo(e) => {
                e.to_remote.trim();
                e.to_client.trim();
            }
            State::Draining(d) => d.tail.trim(),
            State::Closed(_) => {}
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
        // With the memory budget spent, replies wait for the client once they
        // pass a small size (PROTOCOL.md "Limits": max_mem).
        let held = self.out.len() > OUT_HIGH_WATER
            || (self.out.len() > OUT_KEEP && buffer::budget_spent());
        if !held {
            // Bare line ends in a run go as one act: a flood of blank lines
            // must cost little (they get no reply, so a flooder need not read).
            let blank = blank_lines(input.data(), self.limits.max_line);
            if blank > 0 {
                input.consume(blank);
                return None;
            }
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
                // PROTOCOL.md "Echo mode", UDP: BLKS (perhaps from an
                // earlier BLKS command) must fit in a datagram.
                if let Err(e) = req.checked_settings(&self.settings) {
                    self.fail(&e.to_string(), now);
                    return None;
                }
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
                return Some(Act::Connect(Box::new(req)));
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
        let udp = self.is_udp();
        let out_empty = self.out.is_empty();
        let State::Echo(e) = &self.state else {
            return Some(Act::Wait);
        };
        if e.up == Flow::Shut && e.down == Flow::Shut {
            self.enter(State::Closed("both ends closed".into()));
            return None;
        }
        // The six moves that can be made now, one bit each, in the order
        // of a round: read the client, write the remote, pass the client's
        // end on, read the remote, write the client, pass the remote's end on.
        let to_remote_empty = e.to_remote.is_empty();
        let to_client_empty = e.to_client.is_empty();
        let can = u32::from(ready.client_read && e.up == Flow::Open && room(&e.to_remote, udp))
            | u32::from(ready.remote_write && !to_remote_empty) << 1
            | u32::from(e.up == Flow::Ended && to_remote_empty) << 2
            | u32::from(ready.remote_read && e.down == Flow::Open && room(&e.to_client, udp)) << 3
            | u32::from(ready.client_write && !(out_empty && to_client_empty)) << 4
            | u32::from(e.down == Flow::Ended && to_client_empty && out_empty) << 5;
        if can == 0 {
            return Some(Act::Wait);
        }
        // The first one at or after the cursor, round robin.
        let cursor = u32::from(self.cursor);
        let ring = (can >> cursor | can << (6 - cursor)) & 0x3f;
        let mut step = cursor + ring.trailing_zeros();
        if step >= 6 {
            step -= 6;
        }
        self.cursor = if step == 5 { 0 } else { step as u8 + 1 };
        Some(match step {
            0 => Act::ReadClient,
            1 => Act::WriteRemote,
            2 if udp => {
                // No half-close in UDP: the client is done, so is this.
                self.enter(State::Closed("client closed".into()));
                return None;
            }
            2 => Act::ShutRemote,
            3 => Act::ReadRemote,
            4 => Act::WriteClient,
            _ => Act::ShutClient,
        })
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
        if self.client_ended || d.discarded >= DISCARD_BYTES {
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
        let udp = self.is_udp();
        let blks = self.settings.blks;
        let result = match &mut self.state {
            State::Command { input } => input.read_with(usize::MAX, read),
            State::Connecting { early, .. } => early.read_with(usize::MAX, read),
            // PROTOCOL.md "Echo mode", UDP: one client read, one datagram.
            State::Echo(e) => e
                .to_remote
                .read_with(if udp { blks } else { usize::MAX }, read),
            State::Draining(d) => {
                let mut scratch = [0u8; DISCARD_CHUNK];
                let read = read(&mut scratch);
                if let Ok(n) = read {
                    d.discarded = d.discarded.saturating_add(n);
                }
                read
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
            // Drained: its storage goes (an echo connection sends no more
            // replies; command mode's next reply takes new storage).
            if self.out.is_empty() {
                self.out = Vec::new();
            }
            self.count_out();
            return;
        }
        let udp = self.is_udp();
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
        let udp = self.is_udp();
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
        if self.is_udp() {
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
        let used = if self.is_udp() {
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
                let passed = e.down == Flow::Shut;
                self.state = State::Echo(Echo {
                    to_remote: Buffer::new(0),
                    to_client: Buffer::new(0),
                    ..e
                });
                self.drain(why, e.to_client, now);
                // Our end already went to the client (and was announced):
                // only the discarding is left.
                if passed && let State::Draining(d) = &mut self.state {
                    d.shut = true;
                    d.deadline = d.deadline.min(now + DISCARD);
                }
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
            discarded: 0,
            why,
        }));
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.count_out();
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
        // UDP buffers hold whole datagrams, whatever the memory budget.
        let udp = self.is_udp();
        let new = |n| {
            if udp {
                Buffer::whole(n)
            } else {
                Buffer::new(n)
            }
        };
        let mut to_remote = new(blks.max(early.len()));
        to_remote.push(early.data());
        if !self.direct {
            let reply = protocol::ok_conn(self.notify_pid());
            self.reply(&reply);
        }
        self.notify = self.settings.ntfy.as_ref().map(|t| Notify {
            job: Slot::new(&self.id, vera, t),
            pace: self.settings.pace,
            last: None,
            held: false,
            end_passed: false,
            end_told: false,
        });
        self.last_active = now;
        self.enter(State::Echo(Echo {
            to_remote,
            to_client: new(blks),
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
        // After its end the remote has nothing more to say: its silence is
        // no sign of trouble (a half-closed connection goes on).
        if e.down != Flow::Open {
            return None;
        }
        if !room(&e.to_client, self.is_udp()) {
            return None;
        }
        e.heard.checked_add(rtim)
    }

    /// `poll_at` may have come: a held notification to send now, if any;
    /// the state moves on if its deadline has passed (the loop then asks
    /// `next` again).
    pub fn on_deadline(&mut self, now: Instant) -> Option<Arc<Slot>> {
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
    pub fn final_notify(&self) -> Option<Arc<Slot>> {
        let n = self.notify.as_ref()?;
        // One held by PACE is news the plugin has not had yet.
        if !n.held && (n.end_told || self.client_ended) {
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

/// How many bytes at the start of `data` are whole blank lines (blanks, a
/// CR right before the LF), none longer than `max_line`: PROTOCOL.md
/// "Command mode" ignores them (a longer one is `ERR LINE`, as any line).
fn blank_lines(data: &[u8], max_line: usize) -> usize {
    let mut end = 0;
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => end = i + 1,
            _ if i - end >= max_line => break,
            b' ' | b'\t' => {}
            b'\r' if data.get(i + 1) == Some(&b'\n') => {}
            _ => break,
        }
    }
    end
}

/// Room to read into: UDP reads one datagram into an empty buffer (a client
/// read is one datagram, a datagram one client write); TCP any free space.
#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;

    const VERA: &str = "http://luup:3480";

    fn peer() -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 23))
    }

    fn conn(now: Instant) -> Conn {
        let client = SocketAddr::from(([127, 0, 0, 1], 5000));
        Conn::command("abc".into(), client, Limits::default(), now)
    }

    /// The loop and both peers, without sockets: what each peer has sent
    /// and not yet been read, whether it ended, how much it takes per write,
    /// and everything it received.
    struct Sim {
        c: Conn,
        now: Instant,
        ready: Ready,
        client_sends: Vec<u8>,
        client_ends: bool,
        client_fails: bool,
        /// Bytes the client takes per write; 0: it does not read.
        client_takes: usize,
        client_got: Vec<u8>,
        client_saw_end: bool,
        remote_sends: Vec<u8>,
        remote_ends: bool,
        remote_fails: bool,
        remote_takes: usize,
        remote_got: Vec<u8>,
        remote_saw_end: bool,
        /// Datagram sources, for UDP: where the next `remote_sends` comes from.
        from: Option<SocketAddr>,
        datagrams: Vec<usize>,
        notified: usize,
        acts: usize,
    }

    impl Sim {
        fn new(c: Conn, now: Instant) -> Sim {
            Sim {
                c,
                now,
                ready: Ready {
                    client_read: true,
                    client_write: true,
                    remote_read: true,
                    remote_write: true,
                },
                client_sends: Vec::new(),
                client_ends: false,
                client_fails: false,
                client_takes: usize::MAX,
                client_got: Vec::new(),
                client_saw_end: false,
                remote_sends: Vec::new(),
                remote_ends: false,
                remote_fails: false,
                remote_takes: usize::MAX,
                remote_got: Vec::new(),
                remote_saw_end: false,
                from: None,
                datagrams: Vec::new(),
                notified: 0,
                acts: 0,
            }
        }

        /// An echo connection to `peer()` with these CONN options.
        fn echo(options: &str, now: Instant) -> Sim {
            let mut sim = Sim::new(conn(now), now);
            sim.client_sends = format!("CONN 10.0.0.1:23 {options}\n").into_bytes();
            assert!(matches!(sim.turn(), Act::Connect(_)));
            sim.c.connected(VERA, peer(), now);
            assert!(sim.c.is_echo());
            sim.turn();
            sim.client_got.clear();
            sim
        }

        fn read(
            pending: &mut Vec<u8>,
            ends: bool,
            fails: bool,
            ready: &mut bool,
            buf: &mut [u8],
        ) -> io::Result<usize> {
            if fails {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            if pending.is_empty() {
                if ends {
                    return Ok(0);
                }
                *ready = false;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(pending.len());
            buf[..n].copy_from_slice(&pending[..n]);
            pending.drain(..n);
            Ok(n)
        }

        /// Runs the connection until it waits, yields or needs the loop;
        /// returns that act.
        fn turn(&mut self) -> Act {
            self.c.begin_turn();
            self.ready.client_read = true;
            self.ready.remote_read = true;
            self.ready.client_write = self.client_takes > 0;
            self.ready.remote_write = self.remote_takes > 0;
            loop {
                let act = self.c.next(self.ready, self.now);
                self.acts += 1;
                assert!(self.acts < 1_000_000, "no end of acts");
                match act {
                    Act::ReadClient => {
                        let s = &mut *self;
                        let (p, e, f, r) = (
                            &mut s.client_sends,
                            s.client_ends,
                            s.client_fails,
                            &mut s.ready.client_read,
                        );
                        s.c.read_client(s.now, |buf| Sim::read(p, e, f, r, buf));
                    }
                    Act::WriteClient => {
                        let data = self.c.client_data();
                        assert!(!data.is_empty(), "write of nothing");
                        let n = data.len().min(self.client_takes);
                        self.client_got.extend_from_slice(&data[..n]);
                        if n < data.len() {
                            self.ready.client_write = false;
                        }
                        self.c.wrote_client(self.now, Ok(n));
                    }
                    Act::ShutClient => {
                        assert!(!self.client_saw_end, "shut twice");
                        self.client_saw_end = true;
                        self.c.client_shut(self.now);
                    }
                    Act::ReadRemote => {
                        let s = &mut *self;
                        let udp = s.c.is_udp();
                        let from = s.from.unwrap_or_else(peer);
                        let (p, e, f, r) = (
                            &mut s.remote_sends,
                            s.remote_ends && !udp,
                            s.remote_fails,
                            &mut s.ready.remote_read,
                        );
                        s.c.read_remote(s.now, |buf| {
                            let n = Sim::read(p, e, f, r, buf)?;
                            Ok((n, udp.then_some(from)))
                        });
                    }
                    Act::WriteRemote => {
                        let data = self.c.remote_data().to_vec();
                        assert!(!data.is_empty(), "write of nothing");
                        if self.remote_fails {
                            self.c
                                .wrote_remote(self.now, Err(io::ErrorKind::BrokenPipe.into()));
                            continue;
                        }
                        let n = data.len().min(self.remote_takes);
                        self.remote_got.extend_from_slice(&data[..n]);
                        self.datagrams.push(n);
                        if n < data.len() {
                            self.ready.remote_write = false;
                        }
                        self.c.wrote_remote(self.now, Ok(n));
                    }
                    Act::ShutRemote => {
                        assert!(!self.remote_saw_end, "shut twice");
                        self.remote_saw_end = true;
                        self.c.remote_shut();
                    }
                    Act::Notify(_) => self.notified += 1,
                    other => return other,
                }
            }
        }

        /// What has moved so far: a turn that moves nothing has settled.
        fn moved(&self) -> (usize, usize, usize, usize, bool, bool) {
            (
                self.client_got.len(),
                self.remote_got.len(),
                self.client_sends.len(),
                self.remote_sends.len(),
                self.client_saw_end,
                self.remote_saw_end,
            )
        }

        /// Turns (each a new readiness edge) until the connection only waits
        /// with nothing moving, or needs the loop.
        fn settle(&mut self) -> Act {
            for _ in 0..10_000 {
                let before = self.moved();
                match self.turn() {
                    Act::Yield => continue,
                    Act::Wait if self.moved() != before => continue,
                    other => return other,
                }
            }
            panic!("never settles");
        }

        fn at(&mut self, ms: u64, t0: Instant) {
            self.now = t0 + Duration::from_millis(ms);
        }
    }

    fn closed(act: &Act) -> Option<&str> {
        match act {
            Act::Close(why) => Some(why),
            _ => None,
        }
    }

    #[test]
    fn pipelined_commands_then_data_behind_conn() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends =
            b"NTFY 5 sid act p9\r\nBLKS 16\nCONN 10.0.0.1:23 RTIM=5\nhello, remote".to_vec();
        let Act::Connect(req) = sim.turn() else {
            panic!("expected Connect");
        };
        assert_eq!(req.target, "10.0.0.1:23");
        assert_eq!(
            sim.client_got,
            b"OK TOGGLEDBITS-SOCKPROXY 1 abc\nOK NTFY\nOK BLKS\n"
        );
        assert!(matches!(sim.turn(), Act::Wait));
        assert!(!sim.c.nothing_early());
        sim.c.connected(VERA, peer(), now);
        sim.remote_takes = 0;
        assert!(matches!(sim.turn(), Act::Wait));
        assert!(sim.client_got.ends_with(b"OK CONN p9\n"));
        let State::Echo(e) = &sim.c.state else {
            panic!("expected Echo");
        };
        assert_eq!(e.to_remote.data(), b"hello, remote");
        assert_eq!(e.to_client.capacity(), 16);
        assert_eq!(sim.c.poll_at(), Some(now + Duration::from_millis(5)));
        assert_eq!(sim.c.stat_row(true, now).notify, "5/sid/act/p9");
    }

    #[test]
    fn errors_close_and_ignore_the_rest() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"\n  \nBLKS x\nSTAT\n".to_vec();
        sim.client_ends = true;
        let act = sim.settle();
        assert_eq!(closed(&act), Some("error"));
        assert!(sim.client_got.ends_with(b"\nERR BLKS Invalid block size\n"));
        assert!(sim.client_saw_end, "our end passed on before the close");
    }

    #[test]
    fn too_long_line() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = vec![b'A'; protocol::MAX_LINE + 2];
        sim.settle();
        assert!(sim.client_got.ends_with(b"ERR LINE Too long\n"));
        let limits = Limits {
            max_line: 8,
            ..Limits::default()
        };
        let mut sim = Sim::new(Conn::command("abc".into(), peer(), limits, now), now);
        sim.client_sends = b"STAT\n".to_vec();
        assert!(matches!(sim.turn(), Act::Stat));
        sim.client_sends = b"BLKS 12345".to_vec();
        sim.settle();
        assert!(sim.client_got.ends_with(b"ERR LINE Too long\n"));
    }

    #[test]
    fn a_close_discards_unread_input_after_our_end() {
        // QUIT with more behind it: the reply, then our end, then what the
        // client still sends is read and dropped until its end, then close
        // (a close with unread input would reset the reply).
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"QUIT\nmore\nand more".to_vec();
        assert!(matches!(sim.settle(), Act::Wait));
        assert!(sim.client_got.ends_with(b"OK QUIT\n"));
        assert!(sim.client_saw_end);
        assert!(sim.client_sends.is_empty(), "unread input discarded");
        let at = sim.c.poll_at().expect("a bound on the discarding");
        assert!(at <= now + DISCARD);
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("QUIT"));
        // A client that never ends is closed at the bound.
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"QUIT\n".to_vec();
        sim.settle();
        assert!(sim.c.on_deadline(now + DISCARD).is_none());
        assert_eq!(closed(&sim.settle()), Some("QUIT"));
        // One that keeps sending is closed after a bounded amount.
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"QUIT\n".to_vec();
        sim.client_sends.resize(DISCARD_BYTES * 3, b'x');
        assert_eq!(closed(&sim.settle()), Some("QUIT"));
        assert!(
            sim.client_sends.len() >= DISCARD_BYTES,
            "stopped discarding"
        );
    }

    #[test]
    fn commands_held_back_by_unread_replies_run_when_the_client_reads() {
        // 150 HELP and a BILD in one write: once the replies pass the high
        // water the rest waits, and runs as the client reads, without any
        // new input (issue 13: 99 answers, then nothing).
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"HELP\n".repeat(150);
        sim.client_sends.extend_from_slice(b"BILD\n");
        sim.client_takes = 0;
        assert!(matches!(sim.settle(), Act::Wait));
        assert!(sim.c.out.len() > OUT_HIGH_WATER);
        assert!(sim.client_sends.is_empty(), "all input taken");
        sim.client_takes = usize::MAX;
        assert!(matches!(sim.settle(), Act::Wait));
        let text = String::from_utf8_lossy(&sim.client_got);
        assert_eq!(text.matches("OK HELP\n").count(), 150);
        assert!(text.ends_with(&protocol::ok_build()));
        assert_eq!(sim.c.out.capacity(), 0, "reply storage given back");
    }

    #[test]
    fn client_end_does_not_drop_commands_held_back_by_unread_replies() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"HELP\n".repeat(100);
        sim.client_sends.extend_from_slice(b"BILD\n");
        sim.client_ends = true;
        sim.client_takes = 0;
        assert!(matches!(sim.settle(), Act::Wait));
        sim.client_takes = usize::MAX;
        assert_eq!(closed(&sim.settle()), Some("client ended"));
        let text = String::from_utf8_lossy(&sim.client_got);
        assert_eq!(text.matches("OK HELP\n").count(), 100);
        assert!(text.ends_with(&protocol::ok_build()));
    }

    #[test]
    fn a_blank_line_flood_yields_its_turn() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = vec![b'\n'; 100_000];
        let mut turns = 0;
        while matches!(sim.turn(), Act::Yield) {
            turns += 1;
        }
        // Runs of bare LFs go a buffer at a time: cheap, and still in turns.
        assert!(turns <= 2, "{turns} turns for 100,000 bare line ends");
        assert!(sim.client_sends.is_empty());
        // Blank lines with blanks and CRs too; a lone CR is no blank line.
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b" \r\n\t\n".repeat(10_000);
        sim.client_sends.extend_from_slice(b"\r \nBILD\n");
        sim.settle();
        assert!(sim.client_got.ends_with(b"ERR INVALID COMMAND\n"));
        assert_eq!(blank_lines(b" \r\n\n\t\r\nX", 10), 7);
        assert_eq!(blank_lines(b"\r\r\n", 10), 0);
        assert_eq!(
            blank_lines(b"\n   \n", 3),
            5,
            "3 blanks: a line of max_line"
        );
        assert_eq!(blank_lines(b"\n    \n", 3), 1, "4 blanks: too long, left");
    }

    #[test]
    fn idle_limits() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        assert_eq!(sim.c.poll_at(), Some(now + COMMAND_IDLE));
        sim.at(3000, now);
        sim.client_sends = b"STAT\n".to_vec();
        assert!(matches!(sim.turn(), Act::Stat));
        assert_eq!(sim.c.poll_at(), Some(sim.now + STAT_IDLE));
        sim.c.on_deadline(sim.now + STAT_IDLE);
        assert_eq!(closed(&sim.turn()), Some("idle in command mode"));
    }

    #[test]
    fn connect_timeout_replies_and_closes() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"CONN 10.0.0.1:23\n".to_vec();
        assert!(matches!(sim.turn(), Act::Connect(_)));
        assert_eq!(sim.c.poll_at(), Some(now + CONNECT_TIMEOUT));
        assert!(sim.c.needs_remote());
        sim.c.on_deadline(now + CONNECT_TIMEOUT);
        assert!(!sim.c.needs_remote());
        sim.client_ends = true;
        sim.settle();
        assert!(sim.client_got.ends_with(b"ERR CONN Connection timed out\n"));
    }

    #[test]
    fn half_close_from_the_client_keeps_the_other_way_flowing() {
        let now = Instant::now();
        let mut sim = Sim::echo("", now);
        sim.client_sends = b"request".to_vec();
        sim.client_ends = true;
        sim.settle();
        assert_eq!(sim.remote_got, b"request");
        assert!(sim.remote_saw_end && !sim.client_saw_end);
        sim.remote_sends = b"answer".to_vec();
        assert!(matches!(sim.settle(), Act::Wait));
        assert_eq!(sim.client_got, b"answer");
        sim.remote_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
        assert!(sim.client_saw_end);
    }

    #[test]
    fn half_close_from_the_remote_then_both() {
        let now = Instant::now();
        let mut sim = Sim::echo("BLKS=4", now);
        sim.remote_sends = b"0123456789".to_vec();
        sim.remote_ends = true;
        sim.client_takes = 3;
        sim.settle();
        assert_eq!(sim.client_got, b"0123456789", "every byte before the end");
        assert!(sim.client_saw_end && !sim.remote_saw_end);
        sim.client_sends = b"late".to_vec();
        sim.settle();
        assert_eq!(sim.remote_got, b"late");
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
    }

    #[test]
    fn eof_with_bytes_still_buffered_waits_for_them() {
        let now = Instant::now();
        let mut sim = Sim::echo("BLKS=16", now);
        sim.remote_takes = 0;
        sim.client_sends = b"abcdefgh".to_vec();
        sim.client_ends = true;
        assert!(matches!(sim.settle(), Act::Wait));
        assert!(!sim.remote_saw_end, "no end before the bytes");
        let State::Echo(e) = &sim.c.state else {
            panic!("echo");
        };
        assert_eq!((e.up, e.to_remote.len()), (Flow::Ended, 8));
        sim.remote_takes = 3;
        sim.settle();
        assert_eq!(sim.remote_got, b"abcdefgh");
        assert!(sim.remote_saw_end);
    }

    #[test]
    fn nothing_is_read_into_a_full_buffer() {
        let now = Instant::now();
        let mut sim = Sim::echo("BLKS=4", now);
        sim.client_takes = 0;
        sim.remote_sends = b"0123456789".to_vec();
        assert!(matches!(sim.settle(), Act::Wait));
        assert_eq!(sim.remote_sends, b"456789", "the rest waits in the remote");
        assert_eq!(sim.c.wants_read(), (true, false));
    }

    #[test]
    fn rtim_counts_only_the_remotes_own_silence() {
        let t0 = Instant::now();
        let mut sim = Sim::echo("BLKS=4 RTIM=1000", t0);
        assert_eq!(sim.c.poll_at(), Some(t0 + Duration::from_millis(1000)));
        sim.at(500, t0);
        sim.remote_sends = b"0123456789".to_vec();
        sim.client_takes = 0;
        sim.settle();
        // Our buffer toward the client is full: we hold the remote back,
        // and that is not its silence.
        assert_eq!(sim.c.poll_at(), None);
        sim.at(5000, t0);
        assert!(sim.c.on_deadline(sim.now).is_none());
        assert!(sim.c.is_echo());
        sim.client_takes = usize::MAX;
        sim.settle();
        assert_eq!(sim.client_got, b"0123456789");
        assert_eq!(sim.c.poll_at(), Some(sim.now + Duration::from_millis(1000)));
        // Client bytes are no sign of life from the remote.
        sim.at(5900, t0);
        sim.client_sends = b"ping".to_vec();
        sim.settle();
        assert_eq!(sim.c.poll_at(), Some(t0 + Duration::from_millis(6000)));
    }

    #[test]
    fn rtim_writes_what_is_buffered_for_the_client_then_closes() {
        let t0 = Instant::now();
        let mut sim = Sim::echo("BLKS=8 RTIM=100 NTFY=7", t0);
        sim.remote_sends = b"last".to_vec();
        sim.client_takes = 0;
        sim.settle();
        sim.at(100, t0);
        sim.c.on_deadline(sim.now);
        assert!(!sim.c.needs_remote(), "the remote goes at RTIM");
        sim.client_takes = usize::MAX;
        sim.settle();
        assert_eq!(sim.client_got, b"last");
        assert!(sim.client_saw_end);
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("RTIM: remote silent"));
        // Told of the data and the end: no final notification.
        assert!(sim.notified >= 1);
        assert!(sim.c.final_notify().is_none());
    }

    #[test]
    fn remote_error_with_bytes_waiting_delivers_them() {
        let now = Instant::now();
        let mut sim = Sim::echo("BLKS=8", now);
        sim.client_takes = 0;
        sim.remote_sends = b"kept".to_vec();
        sim.settle();
        sim.remote_fails = true;
        sim.client_sends = b"x".to_vec();
        sim.settle();
        assert!(!sim.c.needs_remote());
        sim.client_takes = usize::MAX;
        sim.client_ends = true;
        let act = sim.settle();
        assert_eq!(sim.client_got, b"kept");
        assert!(closed(&act).is_some_and(|w| w.starts_with("remote: ")));
    }

    #[test]
    fn client_error_closes_at_once() {
        let now = Instant::now();
        let mut sim = Sim::echo("NTFY=3", now);
        sim.client_fails = true;
        let act = sim.settle();
        assert!(closed(&act).is_some_and(|w| w.starts_with("client: ")));
        assert!(
            sim.c.final_notify().is_none(),
            "a client that is gone is not notified"
        );
    }

    #[test]
    fn final_notification_only_when_the_plugin_does_not_know() {
        let now = Instant::now();
        // Closed before any end was passed on (shutdown, say): one final.
        let sim = Sim::echo("NTFY=3", now);
        assert!(sim.c.final_notify().is_some());
        assert!(sim.c.final_notify().is_none(), "coalesced: one waits");
        // The plugin closed its socket: nothing to tell it.
        let mut sim = Sim::echo("NTFY=3", now);
        sim.client_ends = true;
        sim.remote_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
        assert_eq!(sim.notified, 0, "no news for a client that has gone");
        assert!(sim.c.final_notify().is_none());
    }

    #[test]
    fn a_connection_that_ends_in_the_turn_of_its_last_bytes_still_notifies() {
        // Found by the soak: data, the remote's end and the client's end all in one
        // turn went straight to the close, and the plugin heard nothing at all.
        let now = Instant::now();
        let mut sim = Sim::echo("NTFY=3", now);
        sim.remote_sends = b"all of it".to_vec();
        sim.remote_ends = true;
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
        assert_eq!(sim.client_got, b"all of it");
        assert_eq!(sim.notified, 1, "the data (and the end) announced");
        // With PACE holding it, the final notification carries it.
        let mut sim = Sim::echo("NTFY=3 PACE=5", now);
        sim.remote_sends = b"first".to_vec();
        sim.settle();
        assert_eq!(sim.notified, 1);
        sim.remote_sends = b"last".to_vec();
        sim.remote_ends = true;
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
        assert_eq!(sim.notified, 1, "held by PACE");
        assert!(
            sim.c.notify.as_ref().is_some_and(|n| n.held),
            "news still held at the close"
        );
    }

    #[test]
    fn the_end_is_passed_to_the_client_once() {
        // Found by the echo fuzz target: with the remote's end already passed on, RTIM
        // or a remote error drained and passed our end on a second time (a second
        // "end" notification after the plugin had read "closed").
        let t0 = Instant::now();
        let mut sim = Sim::echo("RTIM=100 NTFY=3", t0);
        sim.remote_ends = true;
        sim.settle();
        assert!(sim.client_saw_end);
        sim.at(100, t0);
        sim.c.on_deadline(sim.now);
        assert!(
            sim.c.is_echo(),
            "RTIM counts no silence after the remote's end"
        );
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("both ends closed"));
        let mut sim = Sim::echo("", t0);
        sim.remote_ends = true;
        sim.settle();
        sim.remote_fails = true;
        sim.client_sends = b"x".to_vec();
        sim.settle();
        sim.client_ends = true;
        let act = sim.settle();
        assert!(closed(&act).is_some_and(|w| w.starts_with("remote: ")));
    }

    #[test]
    fn pace_holds_then_releases() {
        let t0 = Instant::now();
        let mut sim = Sim::echo("NTFY=1 PACE=1", t0);
        sim.remote_sends = b"a".to_vec();
        sim.settle();
        assert_eq!(sim.notified, 1, "the first at once");
        sim.at(100, t0);
        sim.remote_sends = b"b".to_vec();
        sim.settle();
        assert_eq!(sim.notified, 1, "held");
        assert_eq!(sim.c.poll_at(), Some(t0 + Duration::from_millis(1000)));
        sim.at(200, t0);
        sim.remote_sends = b"c".to_vec();
        sim.settle();
        let held = |c: &Conn| c.notify.as_ref().map(|n| (n.held, n.last));
        assert_eq!(held(&sim.c), Some((true, Some(t0))));
        sim.c.on_deadline(t0 + Duration::from_millis(999));
        assert_eq!(held(&sim.c), Some((true, Some(t0))), "never early");
        // (The job itself is still queued from the first: coalesced.)
        sim.c.on_deadline(t0 + Duration::from_millis(1000));
        let end = t0 + Duration::from_millis(1000);
        assert_eq!(held(&sim.c), Some((false, Some(end))), "released");
        assert_eq!(sim.c.poll_at(), None);
    }

    #[test]
    fn no_target_no_notifications() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"NTFY -1\nCONN 10.0.0.1:23\n".to_vec();
        assert!(matches!(sim.turn(), Act::Connect(_)));
        sim.c.connected(VERA, peer(), now);
        sim.remote_sends = b"x".to_vec();
        sim.settle();
        assert_eq!(
            sim.client_got,
            b"OK TOGGLEDBITS-SOCKPROXY 1 abc\nOK NTFY\nOK CONN abc\nx"
        );
        assert_eq!(sim.notified, 0);
        assert!(sim.c.final_notify().is_none());
    }

    #[test]
    fn udp_cuts_datagrams_at_blks_and_drops_foreign_sources() {
        let now = Instant::now();
        let mut sim = Sim::new(conn(now), now);
        sim.client_sends = b"CONN 10.0.0.1:23 PRTO=udp BLKS=4\n0123456789".to_vec();
        assert!(matches!(sim.turn(), Act::Connect(_)));
        sim.c.connected(VERA, peer(), now);
        sim.settle();
        // Early bytes beyond one block: cut at BLKS.
        assert_eq!(sim.datagrams, vec![4, 4, 2]);
        sim.datagrams.clear();
        sim.client_sends = b"abcdefg".to_vec();
        sim.settle();
        assert_eq!(sim.datagrams, vec![4, 3], "one client read, one datagram");
        let before = sim.client_got.len();
        sim.from = Some(SocketAddr::from(([10, 0, 0, 1], 9999)));
        sim.remote_sends = b"ok".to_vec();
        sim.settle();
        assert_eq!(&sim.client_got[before..], b"ok", "another port: accepted");
        sim.from = Some(SocketAddr::from(([10, 0, 0, 2], 23)));
        sim.remote_sends = b"evil".to_vec();
        sim.settle();
        assert_eq!(&sim.client_got[before..], b"ok", "another host: dropped");
        assert_eq!(sim.c.recv, 2);
        sim.client_ends = true;
        assert_eq!(closed(&sim.settle()), Some("client closed"));
    }
}
