//! One proxied connection: its state, its buffers, its counters, its pacing.
//!
//! In scope: what the connection is doing and what it wants next. Out of
//! scope: sockets, the `Registry`, the slab (all `event_loop.rs`): the loop
//! moves bytes in and out of the buffers here and acts on the `Step`s and
//! deadlines this returns.
//!
//! ```text
//!  accept (command port)          accept ([direct] port)
//!        |                                |
//!        v         CONN                   v
//!    Command ------------------------> Connecting --- connect failed / timeout
//!     |  ^ NTFY BLKS RTIM PACE STAT ...     |               (ERR CONN ...)
//!     |  '--'                               | connected     |
//!     | QUIT / ERR ... / EOF                v               |
//!     '------------------> Draining <---- Echo              |
//!                             ^   (ends when both directions|
//!                             |    ended, error, RTIM)      |
//!                             '-----------------------------'
//! ```
//! Draining writes what is queued for the client (a last reply) and then
//! closes; an Echo connection that ends is closed by the loop directly.

use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buffer::Buffer;
use crate::notify::Job;
use crate::protocol::{
    self, CmdError, Command, ConnRequest, Limits, Line, OneLine, Settings, Transport,
};
use crate::stat::Row;

/// PROTOCOL.md "Command mode": no completed command for 30 s closes; after
/// STAT, a person is at a terminal: 100 minutes.
pub const COMMAND_IDLE: Duration = Duration::from_secs(30);
pub const STAT_IDLE: Duration = Duration::from_secs(100 * 60);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a last reply may take to reach a client that does not read.
pub const LINGER: Duration = Duration::from_secs(5);
/// Replies queued beyond this stop the reading of further commands, so a
/// client pipelining STATs without reading cannot grow `out` without end.
const OUT_HIGH_WATER: usize = 64 * 1024;

pub enum State {
    /// Reading command lines; the greeting and replies wait in `out`.
    Command { input: Buffer },
    /// CONN accepted: resolving the host or connecting. `early` holds what
    /// the client sent behind the CONN line (PROTOCOL.md: kept, forwarded).
    Connecting { early: Buffer, deadline: Instant },
    /// Passing bytes through, each direction through its own buffer.
    Echo {
        to_remote: Buffer,
        to_client: Buffer,
    },
    /// Writing what is left in `out`, then closing.
    Draining { deadline: Instant },
}

/// What command mode needs from the loop.
pub enum Step {
    /// Nothing until more input arrives.
    Wait,
    /// The connection is now `Connecting`: resolve or connect to this.
    Connect(ConnRequest),
    /// Append the STAT table to `out`, then ask again.
    Stat,
    /// The connection is now `Draining`.
    Close,
    /// `STOP`: the loop decides whether this client may (`stop`).
    Stop,
}

/// When a notification should go out.
#[derive(Debug, PartialEq, Eq)]
pub enum NotifyAt {
    Now,
    /// Held by PACE until then; a timer should be armed.
    Later(Instant),
    /// No target, or one is already held.
    Never,
}

pub struct Conn {
    pub id: String,
    pub client: SocketAddr,
    pub direct: bool,
    pub state: State,
    /// Greeting and replies, written before anything in `to_client`.
    pub out: Vec<u8>,
    /// Before CONN, what NTFY/BLKS/RTIM/PACE set; after, the CONN's own.
    pub settings: Settings,
    /// `host:port` as the client gave it, once it has sent CONN.
    pub target: Option<String>,
    pub started: Instant,
    /// Command mode: when the last command completed. Echo: when the
    /// remote last sent (STAT "idle", RTIM).
    pub last_active: Instant,
    stat_asked: bool,
    limits: Limits,
    /// Bytes received from / sent to the remote.
    pub recv: u64,
    pub xmit: u64,
    notify: Option<Arc<Job>>,
    last_notified: Option<Instant>,
    held: bool,
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
        let mut conn = Conn::new(
            id,
            client,
            true,
            State::Draining { deadline: now },
            Vec::new(),
            now,
        );
        conn.settings = req.settings(&Settings::default());
        conn.target = Some(req.target.clone());
        conn.state = State::Connecting {
            early: Buffer::new(conn.settings.blks),
            deadline: now + CONNECT_TIMEOUT,
        };
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
            notify: None,
            last_notified: None,
            held: false,
        }
    }

    /// The buffer client reads go to, if the state takes client bytes now.
    pub fn client_input(&mut self) -> Option<&mut Buffer> {
        match &mut self.state {
            State::Command { input } => Some(input),
            State::Connecting { early, .. } => Some(early),
            State::Echo { to_remote, .. } => Some(to_remote),
            State::Draining { .. } => None,
        }
    }

    /// Handles complete command lines in the input, in order, until one
    /// needs the loop or the input runs out.
    pub fn next_step(&mut self, now: Instant) -> Step {
        loop {
            if self.out.len() > OUT_HIGH_WATER {
                return Step::Wait;
            }
            let State::Command { input } = &mut self.state else {
                return Step::Wait;
            };
            let (parsed, used) = match protocol::next_line(input.data(), self.limits.max_line) {
                Line::Incomplete => return Step::Wait,
                Line::TooLong => (Err(CmdError::TooLong), input.len()),
                Line::Complete(line, used) => (protocol::parse_command(line, &self.limits), used),
            };
            input.consume(used);
            let cmd = match parsed {
                Ok(Command::Blank) => continue,
                Ok(cmd) => cmd,
                Err(e) => return self.fail(&e.to_string(), now),
            };
            self.last_active = now;
            match cmd {
                Command::Blank => {}
                Command::Conn(req) => {
                    // PROTOCOL.md "Echo mode", UDP: BLKS (perhaps from an
                    // earlier BLKS command) must fit in a datagram.
                    if let Err(e) = req.checked_settings(&self.settings) {
                        return self.fail(&e.to_string(), now);
                    }
                    self.begin_connect(&req, now);
                    return Step::Connect(req);
                }
                Command::Ntfy(target) => {
                    self.settings.ntfy = target;
                    self.reply("OK NTFY\n");
                }
                Command::Blks(n) => {
                    self.settings.blks = n;
                    self.reply("OK BLKS\n");
                }
                Command::Rtim(t) => {
                    self.settings.rtim = t;
                    self.reply("OK RTIM\n");
                }
                Command::Pace(p) => {
                    self.settings.pace = p;
                    self.reply("OK PACE\n");
                }
                Command::Stat => {
                    self.stat_asked = true;
                    return Step::Stat;
                }
                Command::Capa => self.reply(protocol::CAPA_REPLY),
                Command::Help => self.reply(protocol::HELP_REPLY),
                Command::Bild => self.reply(&format!("OK {}\n", protocol::BUILD)),
                Command::Quit => {
                    self.reply("OK QUIT\n");
                    self.drain(now);
                    return Step::Close;
                }
                Command::Stop => return Step::Stop,
            }
        }
    }

    /// Answers `STOP`: `OK STOP` if this client may stop the daemon
    /// (`[host] stop_from=`), else `ERR STOP Not allowed`; either way the
    /// connection then drains and closes.
    pub fn stop(&mut self, allowed: bool, now: Instant) {
        if allowed {
            self.reply("OK STOP\n");
            self.drain(now);
        } else {
            self.fail("ERR STOP Not allowed", now);
        }
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    fn drain(&mut self, now: Instant) {
        self.state = State::Draining {
            deadline: now + LINGER,
        };
    }

    /// Queues the error reply (one line) and drains.
    pub fn fail(&mut self, reply: &str, now: Instant) -> Step {
        self.reply(reply);
        self.reply("\n");
        self.drain(now);
        Step::Close
    }

    /// The client ended its side while in command mode: once every complete
    /// command it sent has been answered (some may wait while unread replies
    /// fill `out`), write the replies and close.
    pub fn client_ended(&mut self, now: Instant) {
        if let State::Command { input } = &self.state {
            if !matches!(
                protocol::next_line(input.data(), self.limits.max_line),
                Line::Incomplete
            ) {
                return;
            }
            self.drain(now);
        }
    }

    fn begin_connect(&mut self, req: &ConnRequest, now: Instant) {
        self.settings = req.settings(&self.settings);
        self.target = Some(req.target.clone());
        let early = match mem::replace(&mut self.state, State::Draining { deadline: now }) {
            State::Command { input } => input,
            _ => Buffer::new(self.settings.blks),
        };
        self.state = State::Connecting {
            early,
            deadline: now + CONNECT_TIMEOUT,
        };
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
    pub fn connected(&mut self, vera: &str, now: Instant) {
        let blks = self.settings.blks;
        let early = match mem::replace(&mut self.state, State::Draining { deadline: now }) {
            State::Connecting { early, .. } => early,
            _ => Buffer::new(blks),
        };
        // The client may have sent more than one block behind its CONN
        // line: the buffer toward the remote is made big enough to keep it.
        let mut to_remote = Buffer::new(blks.max(early.len()));
        to_remote.push(early.data());
        let pid = self.notify_pid().to_string();
        if !self.direct {
            // The pid is the client's own text: one printable line.
            self.reply(&format!("OK CONN {}\n", OneLine(&pid)));
        }
        self.notify = self
            .settings
            .ntfy
            .as_ref()
            .map(|t| Job::new(&self.id, vera, t));
        self.last_active = now;
        self.state = State::Echo {
            to_remote,
            to_client: Buffer::new(blks),
        };
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
        if !self.direct {
            self.reply(&format!("ERR CONN {reason}\n"));
        }
        self.drain(now);
    }

    pub fn is_udp(&self) -> bool {
        self.settings.transport == Transport::Udp
    }

    pub fn is_echo(&self) -> bool {
        matches!(self.state, State::Echo { .. })
    }

    /// When the timer of this kind is really due, if it is still wanted.
    pub fn idle_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Command { .. } => {
                let limit = if self.stat_asked {
                    STAT_IDLE
                } else {
                    COMMAND_IDLE
                };
                Some(self.last_active + limit)
            }
            State::Draining { deadline } => Some(*deadline),
            _ => None,
        }
    }

    pub fn connect_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    pub fn rtim_deadline(&self) -> Option<Instant> {
        match (&self.state, self.settings.rtim) {
            (State::Echo { .. }, Some(rtim)) => self.last_active.checked_add(rtim),
            _ => None,
        }
    }

    /// Something new was written toward the client (PROTOCOL.md
    /// "Notifications", PACE): decide when to tell the plugin.
    pub fn want_notify(&mut self, now: Instant) -> NotifyAt {
        if self.notify.is_none() || self.held {
            return NotifyAt::Never;
        }
        let pace = self.settings.pace;
        match self.last_notified.and_then(|t| t.checked_add(pace)) {
            Some(due) if !pace.is_zero() && now < due => {
                self.held = true;
                NotifyAt::Later(due)
            }
            _ => {
                self.last_notified = Some(now);
                NotifyAt::Now
            }
        }
    }

    /// The PACE timer fired: `Now` if the held notification may go,
    /// `Later` if the timer fired early, `Never` if nothing is held.
    pub fn pace_expired(&mut self, now: Instant) -> NotifyAt {
        if !self.held {
            return NotifyAt::Never;
        }
        match self
            .last_notified
            .and_then(|t| t.checked_add(self.settings.pace))
        {
            Some(due) if now < due => NotifyAt::Later(due),
            _ => {
                self.held = false;
                self.last_notified = Some(now);
                NotifyAt::Now
            }
        }
    }

    /// The notification job, if the connection notifies and none of its
    /// notifications is already waiting to be sent.
    pub fn claim_notify(&self) -> Option<Arc<Job>> {
        self.notify.as_ref().filter(|j| j.claim()).cloned()
    }

    pub fn stat_row(&self, me: bool, now: Instant) -> Row {
        Row {
            me,
            id: self.id.clone(),
            state: if self.is_echo() { 2 } else { 1 },
            idle: now.saturating_duration_since(self.last_active),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(now: Instant) -> Conn {
        let client = SocketAddr::from(([127, 0, 0, 1], 5000));
        Conn::command("abc".into(), client, Limits::default(), now)
    }

    fn feed(c: &mut Conn, bytes: &[u8]) {
        if let Some(input) = c.client_input() {
            assert_eq!(input.push(bytes), bytes.len());
        }
    }

    fn take_out(c: &mut Conn) -> String {
        String::from_utf8(mem::take(&mut c.out)).expect("utf-8 replies")
    }

    #[test]
    fn pipelined_commands_then_data_behind_conn() {
        let now = Instant::now();
        let mut c = conn(now);
        assert_eq!(take_out(&mut c), "OK TOGGLEDBITS-SOCKPROXY 1 abc\n");
        feed(
            &mut c,
            b"NTFY 5 sid act p9\r\nBLKS 16\nCONN 10.0.0.1:23 RTIM=5\nhello, remote",
        );
        let Step::Connect(req) = c.next_step(now) else {
            panic!("expected Connect");
        };
        assert_eq!(req.target, "10.0.0.1:23");
        assert_eq!(take_out(&mut c), "OK NTFY\nOK BLKS\n");
        assert!(!c.nothing_early());
        c.connected("http://luup:3480", now);
        assert_eq!(take_out(&mut c), "OK CONN p9\n");
        let State::Echo {
            to_remote,
            to_client,
        } = &c.state
        else {
            panic!("expected Echo");
        };
        assert_eq!(to_remote.data(), b"hello, remote");
        assert_eq!(to_client.capacity(), 16);
        assert_eq!(c.rtim_deadline(), Some(now + Duration::from_millis(5)));
        assert_eq!(c.stat_row(true, now).notify, "5/sid/act/p9");
    }

    #[test]
    fn errors_close_and_ignore_the_rest() {
        let now = Instant::now();
        let mut c = conn(now);
        take_out(&mut c);
        feed(&mut c, b"\n  \nBLKS x\nSTAT\n");
        assert!(matches!(c.next_step(now), Step::Close));
        assert_eq!(take_out(&mut c), "ERR BLKS Invalid block size\n");
        assert!(matches!(c.next_step(now), Step::Wait));
        assert!(matches!(c.state, State::Draining { .. }));
    }

    #[test]
    fn too_long_line() {
        let now = Instant::now();
        let mut c = conn(now);
        take_out(&mut c);
        feed(&mut c, &[b'A'; protocol::MAX_LINE + 2]);
        assert!(matches!(c.next_step(now), Step::Close));
        assert_eq!(take_out(&mut c), "ERR LINE Too long\n");
        let limits = Limits {
            max_line: 8,
            ..Limits::default()
        };
        let mut c = Conn::command("abc".into(), c.client, limits, now);
        take_out(&mut c);
        feed(&mut c, b"STAT\n");
        assert!(matches!(c.next_step(now), Step::Stat));
        feed(&mut c, b"BLKS 12345");
        assert!(matches!(c.next_step(now), Step::Close));
        assert_eq!(take_out(&mut c), "ERR LINE Too long\n");
    }

    #[test]
    fn client_end_does_not_drop_commands_held_back_by_unread_replies() {
        // Found by reading the code during fuzzing: HELP x100 + BILD, then EOF,
        // lost BILD once the replies passed OUT_HIGH_WATER.
        let now = Instant::now();
        let mut c = conn(now);
        take_out(&mut c);
        let mut cmds = b"HELP\n".repeat(100);
        cmds.extend_from_slice(b"BILD\n");
        feed(&mut c, &cmds);
        assert!(matches!(c.next_step(now), Step::Wait));
        c.client_ended(now);
        let mut replies = take_out(&mut c);
        while !matches!(c.state, State::Draining { .. }) {
            assert!(matches!(c.next_step(now), Step::Wait));
            c.client_ended(now);
            replies.push_str(&take_out(&mut c));
        }
        replies.push_str(&take_out(&mut c));
        assert_eq!(replies.matches("OK HELP\n").count(), 100);
        assert!(replies.ends_with(&format!("OK {}\n", protocol::BUILD)));
    }

    #[test]
    fn idle_limits() {
        let now = Instant::now();
        let mut c = conn(now);
        assert_eq!(c.idle_deadline(), Some(now + COMMAND_IDLE));
        feed(&mut c, b"STAT\n");
        let later = now + Duration::from_secs(3);
        assert!(matches!(c.next_step(later), Step::Stat));
        assert_eq!(c.idle_deadline(), Some(later + STAT_IDLE));
    }

    #[test]
    fn pace_holds_then_releases() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = conn(t0);
        feed(&mut c, b"CONN 10.0.0.1:23 NTFY=1 PACE=1\n");
        assert!(matches!(c.next_step(t0), Step::Connect(_)));
        c.connected("http://luup:3480", t0);
        assert_eq!(c.want_notify(s(0)), NotifyAt::Now);
        assert_eq!(c.want_notify(s(100)), NotifyAt::Later(s(1000)));
        assert_eq!(c.want_notify(s(200)), NotifyAt::Never);
        assert_eq!(c.pace_expired(s(999)), NotifyAt::Later(s(1000)));
        assert_eq!(c.pace_expired(s(1000)), NotifyAt::Now);
        assert_eq!(c.pace_expired(s(1001)), NotifyAt::Never);
        assert_eq!(c.want_notify(s(2500)), NotifyAt::Now);
    }

    #[test]
    fn no_target_no_notifications() {
        let now = Instant::now();
        let mut c = conn(now);
        feed(&mut c, b"NTFY -1\nCONN 10.0.0.1:23\n");
        assert!(matches!(c.next_step(now), Step::Connect(_)));
        c.connected("http://luup:3480", now);
        assert_eq!(
            take_out(&mut c),
            "OK TOGGLEDBITS-SOCKPROXY 1 abc\nOK NTFY\nOK CONN abc\n"
        );
        assert_eq!(c.want_notify(now), NotifyAt::Never);
        assert!(c.claim_notify().is_none());
    }
}
