//! The event loop: one `mio::Poll` on the main thread owning the listeners,
//! the slab of connections and every socket.
//!
//! In scope: accepting, every read, write and (re)register, readiness and
//! interest, timers firing, signals, shutdown. Out of scope: parsing
//! (`protocol.rs`), what a connection does next (`conn.rs`), building URLs
//! and HTTP (`notify.rs`), name lookups (`resolve.rs`). Nothing here may
//! block: sockets are non-blocking, lookups and notifications are threads.
//!
//! Readiness is edge-triggered: each socket side remembers whether it is
//! known readable/writable, the loop drains it until `WouldBlock`, and a
//! connection that still has work after `ROUNDS` goes on the `ready` list
//! so one busy pair cannot starve the rest.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::acl::AddrList;
use crate::buffer::Buffer;
use crate::config::Config;
use crate::conn::{Conn, NotifyAt, State, Step};
use crate::logging::LogFile;
use crate::notify::Notifier;
use crate::protocol::{ConnRequest, Host, Limits};
use crate::ratelog::RateLog;
use crate::resolve::{self, Resolver};
use crate::stat;
use crate::timer::{Kind, Timers};

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
/// Listener `i` has token `LISTENERS + i`; connection `key` has tokens
/// `2 key` (client) and `2 key + 1` (remote).
const LISTENERS: usize = usize::MAX - 1 - (1 << 16);
/// PROTOCOL.md "Listening": room for a burst of connects.
const BACKLOG: i32 = 1024;
/// Read/write rounds per connection before others get their turn.
const ROUNDS: usize = 16;
/// Time left for final notifications at shutdown.
const FINAL_NOTIFY_WAIT: Duration = Duration::from_secs(5);
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// 2020-01-01T00:00:00Z: connection ids count milliseconds from here.
const ID_EPOCH: u64 = 1_577_836_800;

pub struct Listener {
    sock: TcpListener,
    /// `None`: the command port; else a `[direct]` listener's target.
    direct: Option<ConnRequest>,
}

/// Binds the command port and every `[direct]` port (PROTOCOL.md
/// "Listening"). The error is the one line to print before exiting.
pub fn bind(config: &Config) -> Result<Vec<Listener>, String> {
    let mut listeners = Vec::new();
    let ports = std::iter::once((config.port, None)).chain(
        config
            .direct
            .iter()
            .map(|d| (d.port, Some(d.request.clone()))),
    );
    for (port, direct) in ports {
        let addr = SocketAddr::new(config.ip, port);
        // mio sets SO_REUSEADDR (a restart binds at once) and listens with
        // a backlog of 128; listening again raises it.
        let sock = TcpListener::bind(addr)
            .and_then(|sock| {
                // SAFETY: a plain syscall on a descriptor we own.
                let rc = unsafe { libc::listen(sock.as_raw_fd(), BACKLOG) };
                if rc == 0 {
                    Ok(sock)
                } else {
                    Err(io::Error::last_os_error())
                }
            })
            .map_err(|e| format!("cannot listen on {addr}: {}", reason(&e)))?;
        listeners.push(Listener { sock, direct });
    }
    Ok(listeners)
}

/// An OS error as a person reads it: without "(os error N)".
fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text.get(..i).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// One end of a connection and what the loop knows of it.
struct Side<S> {
    sock: S,
    readable: bool,
    writable: bool,
    interest: Interest,
    /// End-of-stream read from it.
    eof: bool,
    /// The kernel reported an error (EPOLLERR): `take_error` says which.
    error: bool,
    /// End-of-stream passed on to it (`shutdown(Write)`).
    shut: bool,
}

impl<S: mio::event::Source> Side<S> {
    fn register(mut sock: S, registry: &Registry, token: Token) -> io::Result<Side<S>> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(&mut sock, token, interest)?;
        Ok(Side {
            sock,
            readable: false,
            writable: false,
            interest,
            eof: false,
            error: false,
            shut: false,
        })
    }

    /// Readable interest only while there is room to read into: the
    /// kernel's buffers and TCP flow control then hold the peer back
    /// (PROTOCOL.md "Echo mode": backpressure, nothing dropped).
    fn want_read(&mut self, registry: &Registry, token: Token, want: bool) {
        let interest = if want && !self.eof {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::WRITABLE
        };
        if interest != self.interest && registry.reregister(&mut self.sock, token, interest).is_ok()
        {
            self.interest = interest;
        }
    }

    fn mark(&mut self, event: &mio::event::Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.writable = true;
        }
        if event.is_error() {
            self.error = true;
        }
    }
}

/// The error the kernel reported on a socket, if any, taken once.
fn reported_error<S>(
    side: &mut Side<S>,
    take: impl Fn(&S) -> io::Result<Option<io::Error>>,
) -> io::Result<()> {
    if std::mem::take(&mut side.error)
        && let Some(e) = take(&side.sock)?
    {
        return Err(e);
    }
    Ok(())
}

impl<S: Read> Side<S> {
    /// One read into `buf`, at most `limit` bytes; returns the count.
    fn read_into(&mut self, buf: &mut Buffer, limit: usize) -> io::Result<usize> {
        loop {
            let read = buf.read_with(limit, |space| {
                let n = self.sock.read(space)?;
                self.eof |= n == 0;
                Ok(n)
            });
            return match read {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Ok(0)
                }
                read => read,
            };
        }
    }
}

impl<S: Write> Side<S> {
    /// One write of `data`; returns the count written.
    fn write_from(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            return match self.sock.write(data) {
                Ok(0) if !data.is_empty() => Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    Ok(0)
                }
                Err(e) => Err(e),
            };
        }
    }
}

impl Side<TcpStream> {
    /// Passes end-of-stream on; a peer that is already gone is no error.
    fn shut_write(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Write);
        self.shut = true;
    }
}

enum Remote {
    None,
    Resolving,
    Tcp(Side<TcpStream>),
    Udp(Side<UdpSocket>, SocketAddr),
}

struct Session {
    conn: Conn,
    client: Side<TcpStream>,
    remote: Remote,
    /// Addresses of the CONN target still to try, last first.
    addrs: Vec<SocketAddr>,
    /// Matches a resolver answer to the lookup this session asked for.
    serial: u64,
    /// On the `ready` list.
    ready: bool,
}

/// What the loop must do with a session after advancing it.
enum Verdict {
    Continue,
    Stat,
    Stop,
    Close(String),
}

/// Who may do what, and how much (`[host]` limits and address lists).
struct Policy {
    limits: Limits,
    max_conns: usize,
    allow: Option<AddrList>,
    stop_from: AddrList,
    connect_to: Option<AddrList>,
}

/// Everything the sessions need besides each other.
struct Ctx {
    registry: Registry,
    policy: Policy,
    timers: Timers,
    notifier: Notifier,
    resolver: Resolver,
    vera: String,
    serial: u64,
    /// Sessions with work left after their rounds.
    ready: Vec<usize>,
}

fn client_token(key: usize) -> Token {
    Token(key * 2)
}

fn remote_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

pub struct EventLoop {
    poll: Poll,
    sessions: Slab<Session>,
    listeners: Vec<Listener>,
    ctx: Ctx,
    signals: OwnedFd,
    log: Option<LogFile>,
    next_id: u64,
    stopping: Option<String>,
    /// An accept failed (out of descriptors): logged once until one succeeds.
    accept_failing: bool,
    /// At max_conns: logged once until a connection is let in again.
    at_capacity: bool,
    /// Clients refused by allow=: a line at most every 10 s.
    refused: RateLog,
}

/// Serves until STOP or a signal; `Err` only if the poll itself fails.
pub fn run(config: Config, listeners: Vec<Listener>, log: Option<LogFile>) -> io::Result<()> {
    let poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let resolver = Resolver::spawn(resolve::system_lookup(), waker)?;
    let notifier = Notifier::spawn()?;
    let signals = install_signals()?;
    registry.register(
        &mut SourceFd(&signals.as_raw_fd()),
        SIGNALS,
        Interest::READABLE,
    )?;
    let mut listeners = listeners;
    for (i, l) in listeners.iter_mut().enumerate() {
        registry.register(&mut l.sock, Token(LISTENERS + i), Interest::READABLE)?;
        let addr = l.sock.local_addr()?;
        match &l.direct {
            None => info!("listening on {addr} (commands)"),
            Some(req) => info!("listening on {addr} (direct to {})", req.target),
        }
    }
    info!(
        "sockproxyd {} ready; notifying {}",
        env!("CARGO_PKG_VERSION"),
        config.vera
    );
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(ID_EPOCH))
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    let mut lp = EventLoop {
        poll,
        sessions: Slab::new(),
        listeners,
        ctx: Ctx {
            registry,
            policy: Policy {
                limits: config.limits,
                max_conns: config.max_conns,
                allow: config.allow,
                stop_from: config.stop_from,
                connect_to: config.connect_to,
            },
            timers: Timers::default(),
            notifier,
            resolver,
            vera: config.vera,
            serial: 0,
            ready: Vec::new(),
        },
        signals,
        log,
        next_id: seed,
        stopping: None,
        accept_failing: false,
        at_capacity: false,
        refused: RateLog::default(),
    };
    let result = lp.serve();
    lp.shutdown();
    result
}

impl EventLoop {
    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while self.stopping.is_none() {
            let now = Instant::now();
            // PROTOCOL.md "Lifecycle": with nothing due, sleep without a
            // timeout: no periodic wake-ups.
            let timeout = if self.ctx.ready.is_empty() {
                self.ctx
                    .timers
                    .next_deadline()
                    .map(|at| at.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER => self.on_answers(now),
                    SIGNALS => self.on_signals(),
                    Token(t) if t >= LISTENERS => self.accept(t - LISTENERS, now),
                    Token(t) => {
                        let key = t / 2;
                        if let Some(s) = self.sessions.get_mut(key) {
                            if t % 2 == 0 {
                                s.client.mark(event);
                            } else {
                                match &mut s.remote {
                                    Remote::Tcp(side) => side.mark(event),
                                    Remote::Udp(side, _) => side.mark(event),
                                    Remote::None | Remote::Resolving => {}
                                }
                            }
                            self.process(key, now);
                        }
                    }
                }
            }
            for (key, kind) in self.ctx.timers.expired(now) {
                self.on_timer(key, kind, now);
            }
            for key in std::mem::take(&mut self.ctx.ready) {
                if let Some(s) = self.sessions.get_mut(key) {
                    s.ready = false;
                    self.process(key, now);
                }
            }
        }
        Ok(())
    }

    fn new_id(&mut self, direct: bool) -> String {
        let n = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if direct {
            format!("L{n:x}")
        } else {
            format!("{n:x}")
        }
    }

    fn accept(&mut self, index: usize, now: Instant) {
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let (stream, addr) = match listener.sock.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    // Out of descriptors or memory: the pending connects
                    // stay queued; try again shortly rather than spin, and
                    // say so once per episode.
                    if !self.accept_failing {
                        warn!("accept failed: {}; retrying every 100 ms", reason(&e));
                        self.accept_failing = true;
                    }
                    self.ctx.timers.arm(now + ACCEPT_RETRY, index, Kind::Accept);
                    return;
                }
            };
            if self.accept_failing {
                info!("accepting again");
                self.accept_failing = false;
            }
            let policy = &self.ctx.policy;
            if let Some(allow) = &policy.allow
                && !allow.contains(addr.ip(), None)
            {
                debug!("refused connection from {addr}: not in allow={allow}");
                // A host knocking in a loop must not fill the log (in RAM
                // on a Vera): one line at most every 10 s, with the count.
                match self.refused.event(now) {
                    Some(1) => info!(
                        "refused a client not in allow={allow}: {addr} \
                         (such refusals are logged at most every 10 s)"
                    ),
                    Some(n) => info!(
                        "refused {n} clients not in allow={allow} since the last \
                         such line, the latest {addr}"
                    ),
                    None => {}
                }
                continue;
            }
            if self.sessions.len() >= policy.max_conns {
                if !self.at_capacity {
                    warn!(
                        "{} connections, the most allowed (max_conns): refusing new ones",
                        policy.max_conns
                    );
                    self.at_capacity = true;
                }
                debug!("refused connection from {addr}: busy");
                if listener.direct.is_none() {
                    // Where the greeting would go; the socket is new and
                    // empty, so this small write does not block.
                    let _ = (&stream).write(b"ERR BUSY Too many connections\n");
                }
                continue;
            }
            if self.at_capacity {
                info!("below max_conns again: accepting");
                self.at_capacity = false;
            }
            let direct = listener.direct.clone();
            let _ = stream.set_nodelay(true);
            let id = self.new_id(direct.is_some());
            let entry = self.sessions.vacant_entry();
            let key = entry.key();
            let client = match Side::register(stream, &self.ctx.registry, client_token(key)) {
                Ok(side) => side,
                Err(e) => {
                    warn!(
                        "{id}: cannot register connection from {addr}: {}",
                        reason(&e)
                    );
                    continue;
                }
            };
            let conn = match &direct {
                None => Conn::command(id, addr, self.ctx.policy.limits, now),
                Some(req) => Conn::direct(id, addr, req, now),
            };
            debug!("{}: accepted from {addr}", conn.id);
            let s = entry.insert(Session {
                conn,
                client,
                remote: Remote::None,
                addrs: Vec::new(),
                serial: 0,
                ready: false,
            });
            // Optimistic: the first round finds out with a real syscall.
            s.client.readable = true;
            s.client.writable = true;
            match direct {
                Some(req) => start_connect(s, &mut self.ctx, key, &req, now),
                None => {
                    if let Some(at) = s.conn.idle_deadline() {
                        self.ctx.timers.arm(at, key, Kind::Idle);
                    }
                }
            }
            self.process(key, now);
        }
    }

    /// Advances a session as far as it can go and carries out the verdict.
    fn process(&mut self, key: usize, now: Instant) {
        loop {
            let Some(s) = self.sessions.get_mut(key) else {
                return;
            };
            let verdict = match advance(s, &mut self.ctx, key, now) {
                Ok(v) => v,
                Err(e) => Verdict::Close(reason(&e)),
            };
            match verdict {
                Verdict::Continue => return update_interest(s, &self.ctx.registry, key),
                Verdict::Stop => {
                    info!("{}: STOP from {}", s.conn.id, s.conn.client);
                    self.stopping = Some("STOP".into());
                    return;
                }
                Verdict::Close(why) => return self.close(key, &why, now),
                Verdict::Stat => {
                    let rows: Vec<stat::Row> = self
                        .sessions
                        .iter()
                        .map(|(k, s)| s.conn.stat_row(k == key, now))
                        .collect();
                    let table = stat::table(&rows);
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.conn.out.extend_from_slice(table.as_bytes());
                    }
                }
            }
        }
    }

    fn close(&mut self, key: usize, why: &str, now: Instant) {
        let Some(mut s) = self.sessions.try_remove(key) else {
            return;
        };
        if matches!(s.remote, Remote::Resolving) {
            self.ctx.resolver.cancel(key, s.serial);
        }
        let _ = self.ctx.registry.deregister(&mut s.client.sock);
        drop_remote(&mut s, &self.ctx.registry);
        let c = &s.conn;
        let up = stat::duration(now.saturating_duration_since(c.started));
        match &c.target {
            Some(target) if c.is_echo() => info!(
                "{}: closed {} <-> {target} ({why}); {} bytes from remote, {} to it, up {up}",
                c.id, c.client, c.recv, c.xmit
            ),
            _ => debug!("{}: closed ({why}), up {up}", c.id),
        }
        // PROTOCOL.md "Notifications": one final notification so the
        // plugin reads "closed" (coalesced with one still waiting).
        if let Some(job) = c.claim_notify() {
            self.ctx.notifier.send_final(job);
        }
    }

    fn on_timer(&mut self, key: usize, kind: Kind, now: Instant) {
        if kind == Kind::Accept {
            return self.accept(key, now);
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let due = match kind {
            Kind::Idle => s.conn.idle_deadline(),
            Kind::Connect => s.conn.connect_deadline(),
            Kind::Rtim => s.conn.rtim_deadline(),
            Kind::Pace => match s.conn.pace_expired(now) {
                NotifyAt::Now => {
                    if let Some(job) = s.conn.claim_notify() {
                        self.ctx.notifier.send(job);
                    }
                    None
                }
                NotifyAt::Later(at) => Some(at),
                NotifyAt::Never => None,
            },
            Kind::Accept => None,
        };
        let Some(due) = due else {
            return;
        };
        if due > now {
            // Fired for an older deadline: look again at the real one.
            return self.ctx.timers.arm(due, key, kind);
        }
        match kind {
            Kind::Idle if matches!(s.conn.state, State::Command { .. }) => {
                self.close(key, "idle in command mode", now)
            }
            Kind::Idle => self.close(key, "client not reading", now),
            Kind::Connect => {
                let target = s.conn.target.clone().unwrap_or_default();
                info!("{}: connect to {target} timed out", s.conn.id);
                if matches!(s.remote, Remote::Resolving) {
                    self.ctx.resolver.cancel(key, s.serial);
                }
                drop_remote(s, &self.ctx.registry);
                s.conn.connect_failed("Connection timed out", now);
                self.process(key, now);
            }
            Kind::Rtim => self.close(key, "RTIM: remote silent", now),
            Kind::Pace | Kind::Accept => {}
        }
    }

    /// Resolver answers, through the waker.
    fn on_answers(&mut self, now: Instant) {
        let answers: Vec<resolve::Answer> = self.ctx.resolver.answers().collect();
        for answer in answers {
            let Some(s) = self.sessions.get_mut(answer.key) else {
                continue;
            };
            // The client may have gone and its slot been reused meanwhile.
            if s.serial != answer.serial || !matches!(s.remote, Remote::Resolving) {
                continue;
            }
            s.remote = Remote::None;
            match answer.result {
                Ok(mut addrs) => {
                    addrs.reverse();
                    s.addrs = addrs;
                    connect_next(s, &mut self.ctx, answer.key, now);
                }
                Err(e) => {
                    let target = s.conn.target.clone().unwrap_or_default();
                    info!("{}: cannot resolve {target}: {}", s.conn.id, reason(&e));
                    s.conn.connect_failed("Host not found", now);
                }
            }
            self.process(answer.key, now);
        }
    }

    fn on_signals(&mut self) {
        let mut buf = [0u8; 16];
        loop {
            // SAFETY: reading into a local buffer from our own pipe.
            let n =
                unsafe { libc::read(self.signals.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                return; // EAGAIN: drained
            };
            if n == 0 {
                return;
            }
            for &sig in buf.get(..n).unwrap_or_default() {
                match i32::from(sig) {
                    libc::SIGHUP => match &self.log {
                        Some(log) => match log.reopen() {
                            Ok(()) => info!("SIGHUP: log file {} reopened", log.path().display()),
                            Err(e) => warn!("SIGHUP: cannot reopen {}: {e}", log.path().display()),
                        },
                        None => info!("SIGHUP: logging to stderr, nothing to reopen"),
                    },
                    libc::SIGTERM => self.stopping = Some("SIGTERM".into()),
                    libc::SIGINT => self.stopping = Some("SIGINT".into()),
                    _ => {}
                }
            }
        }
    }

    /// PROTOCOL.md "Lifecycle": stop accepting, end every connection, send
    /// the final notifications that are due.
    fn shutdown(&mut self) {
        let why = self
            .stopping
            .clone()
            .unwrap_or_else(|| "poll failed".into());
        info!(
            "stopping ({why}); closing {} connections",
            self.sessions.len()
        );
        self.listeners.clear();
        let now = Instant::now();
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(s) = self.sessions.get_mut(key) {
                // A last reply (OK STOP) gets one try.
                let _ = s.client.write_from(&s.conn.out);
            }
            self.close(key, "shutting down", now);
        }
        self.ctx.notifier.finish(FINAL_NOTIFY_WAIT);
        info!("stopped");
    }
}

/// Runs the session's state machine until it waits for the network.
fn advance(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) -> io::Result<Verdict> {
    // PROTOCOL.md "Echo mode": the connection ends on an error on either
    // side, also one that comes when nothing is left to read or write there:
    // a client that closed answers the remote's next bytes with RST. (While
    // connecting, the remote's error is the connect's: `check_connect`.)
    reported_error(&mut s.client, TcpStream::take_error)?;
    if s.conn.is_echo() {
        match &mut s.remote {
            Remote::Tcp(side) => reported_error(side, TcpStream::take_error)?,
            Remote::Udp(side, _) => reported_error(side, UdpSocket::take_error)?,
            Remote::None | Remote::Resolving => {}
        }
    }
    loop {
        match &s.conn.state {
            State::Command { .. } => {
                write_out(s)?;
                read_client(s)?;
                let step = s.conn.next_step(now);
                let waiting = matches!(step, Step::Wait);
                match step {
                    Step::Wait | Step::Close => {}
                    Step::Stat => return Ok(Verdict::Stat),
                    Step::Stop => {
                        let allowed = ctx.policy.stop_from.contains(s.conn.client.ip(), None);
                        s.conn.stop(allowed, now);
                        write_out(s)?;
                        if allowed {
                            return Ok(Verdict::Stop);
                        }
                        warn!(
                            "{}: refused STOP from {}: not in stop_from={}",
                            s.conn.id, s.conn.client, ctx.policy.stop_from
                        );
                    }
                    Step::Connect(req) => {
                        if s.client.eof && s.conn.nothing_early() {
                            return Ok(Verdict::Close(
                                "client hung up before its CONN completed".into(),
                            ));
                        }
                        start_connect(s, ctx, key, &req, now);
                    }
                }
                // The input filled up before the socket was drained, and the
                // commands have made room: read on, as no new edge will come.
                if waiting
                    && s.client.readable
                    && !s.client.eof
                    && s.conn.client_input().is_some_and(|b| !b.is_full())
                {
                    continue;
                }
                if s.client.eof {
                    s.conn.client_ended(now);
                }
                write_out(s)?;
                if matches!(s.conn.state, State::Command { .. }) {
                    return Ok(Verdict::Continue);
                }
            }
            State::Connecting { .. } => {
                read_client(s)?;
                if s.client.eof && s.conn.nothing_early() {
                    return Ok(Verdict::Close("client hung up while connecting".into()));
                }
                if !check_connect(s, ctx, key, now) {
                    return Ok(Verdict::Continue);
                }
            }
            State::Echo { .. } => return pump(s, ctx, key, now),
            State::Draining { deadline } => {
                let deadline = *deadline;
                write_out(s)?;
                if s.conn.out.is_empty() {
                    return Ok(Verdict::Close("done".into()));
                }
                ctx.timers.arm(deadline, key, Kind::Idle);
                return Ok(Verdict::Continue);
            }
        }
    }
}

/// Writes queued replies to the client.
fn write_out(s: &mut Session) -> io::Result<()> {
    while !s.conn.out.is_empty() && s.client.writable {
        let n = s.client.write_from(&s.conn.out)?;
        s.conn.out.drain(..n);
    }
    Ok(())
}

/// Reads the client into whatever the state reads into, until it would
/// block, ends, or the buffer is full.
fn read_client(s: &mut Session) -> io::Result<()> {
    while s.client.readable && !s.client.eof {
        let Some(buf) = s.conn.client_input() else {
            return Ok(());
        };
        if buf.is_full() {
            return Ok(());
        }
        s.client.read_into(buf, usize::MAX)?;
    }
    Ok(())
}

fn start_connect(s: &mut Session, ctx: &mut Ctx, key: usize, req: &ConnRequest, now: Instant) {
    if let Some(at) = s.conn.connect_deadline() {
        ctx.timers.arm(at, key, Kind::Connect);
    }
    debug!("{}: CONN {}", s.conn.id, req.target);
    match &req.host {
        Host::Ip(ip) => {
            s.addrs = vec![SocketAddr::new(*ip, req.port)];
            connect_next(s, ctx, key, now);
        }
        Host::Name(name) => {
            ctx.serial += 1;
            s.serial = ctx.serial;
            s.remote = Remote::Resolving;
            ctx.resolver.submit(key, s.serial, name, req.port);
        }
    }
}

/// Starts a connect to the next address; on running out, fails the CONN.
fn connect_next(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) {
    let mut last_err = None;
    while let Some(addr) = s.addrs.pop() {
        if let Some(allowed) = &ctx.policy.connect_to
            && !allowed.contains(addr.ip(), Some(addr.port()))
        {
            info!(
                "{}: refused CONN from {} to {addr}: not in connect_to={allowed}",
                s.conn.id, s.conn.client
            );
            last_err = Some(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "Destination not allowed",
            ));
            continue;
        }
        let token = remote_token(key);
        let result = if s.conn.is_udp() {
            let any = match addr {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            UdpSocket::bind(SocketAddr::new(any, 0))
                .and_then(|sock| Side::register(sock, &ctx.registry, token))
                .map(|side| Remote::Udp(side, addr))
        } else {
            TcpStream::connect(addr)
                .and_then(|sock| Side::register(sock, &ctx.registry, token))
                .map(Remote::Tcp)
        };
        match result {
            Ok(remote) => {
                s.remote = remote;
                if let Remote::Udp(..) = s.remote {
                    // PROTOCOL.md "CONN": for UDP, ready is connected.
                    connected(s, ctx, key, now);
                }
                return;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let why = last_err
        .map(|e| reason(&e))
        .unwrap_or_else(|| "Host not found".into());
    let target = s.conn.target.clone().unwrap_or_default();
    info!("{}: cannot connect to {target}: {why}", s.conn.id);
    s.conn.connect_failed(&why, now);
}

/// A TCP connect in progress: true once it has succeeded or failed (the
/// state has moved on), false while it is still pending.
fn check_connect(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) -> bool {
    let Remote::Tcp(side) = &mut s.remote else {
        return false; // resolving, or nothing yet
    };
    if !side.writable {
        return false;
    }
    let failed = match side.sock.take_error() {
        Ok(Some(e)) | Err(e) => Some(e),
        Ok(None) => match side.sock.peer_addr() {
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                side.writable = false;
                return false;
            }
            Err(e) => Some(e),
        },
    };
    match failed {
        None => connected(s, ctx, key, now),
        Some(e) => {
            debug!("{}: connect failed: {}", s.conn.id, reason(&e));
            drop_remote(s, &ctx.registry);
            if s.addrs.is_empty() {
                let target = s.conn.target.clone().unwrap_or_default();
                info!("{}: cannot connect to {target}: {}", s.conn.id, reason(&e));
                s.conn.connect_failed(&reason(&e), now);
            } else {
                connect_next(s, ctx, key, now);
                return !matches!(s.conn.state, State::Connecting { .. });
            }
        }
    }
    true
}

fn connected(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) {
    if let Some(at) = s.conn.connect_deadline() {
        ctx.timers.cancel(at, key, Kind::Connect);
    }
    s.conn.connected(&ctx.vera, now);
    match &mut s.remote {
        Remote::Tcp(side) => {
            let _ = side.sock.set_nodelay(true);
            side.readable = true;
            side.writable = true;
        }
        Remote::Udp(side, _) => {
            side.readable = true;
            side.writable = true;
        }
        Remote::None | Remote::Resolving => {}
    }
    let target = s.conn.target.clone().unwrap_or_default();
    info!(
        "{}: {} connected to {target}{}",
        s.conn.id,
        s.conn.client,
        if s.conn.is_udp() { " (udp)" } else { "" }
    );
    if let Some(at) = s.conn.rtim_deadline() {
        ctx.timers.arm(at, key, Kind::Rtim);
    }
}

fn drop_remote(s: &mut Session, registry: &Registry) {
    match &mut s.remote {
        Remote::Tcp(side) => drop(registry.deregister(&mut side.sock)),
        Remote::Udp(side, _) => drop(registry.deregister(&mut side.sock)),
        Remote::None | Remote::Resolving => {}
    }
    s.remote = Remote::None;
}

/// Echo mode: moves bytes both ways until nothing more can move now.
fn pump(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) -> io::Result<Verdict> {
    let Session {
        conn,
        client: c,
        remote,
        ready,
        ..
    } = s;
    let blks = conn.settings.blks;
    let Conn {
        state,
        out,
        recv,
        xmit,
        last_active,
        ..
    } = conn;
    let State::Echo {
        to_remote,
        to_client,
    } = state
    else {
        return Ok(Verdict::Continue);
    };
    let mut wrote_client = false;
    let mut more = true;
    for _ in 0..ROUNDS {
        let mut progress = false;
        // Client to remote.
        match remote {
            Remote::Tcp(r) => {
                if c.readable && !c.eof && !to_remote.is_full() {
                    progress |= c.read_into(to_remote, usize::MAX)? > 0 || c.eof;
                }
                if r.writable && !to_remote.is_empty() {
                    let n = r.write_from(to_remote.data())?;
                    to_remote.consume(n);
                    *xmit += n as u64;
                    progress |= n > 0;
                }
                if c.eof && to_remote.is_empty() && !r.shut {
                    r.shut_write();
                }
                if r.readable && !r.eof && !to_client.is_full() {
                    let n = r.read_into(to_client, usize::MAX)?;
                    if n > 0 {
                        *recv += n as u64;
                        *last_active = now;
                    }
                    progress |= n > 0 || r.eof;
                }
            }
            Remote::Udp(r, peer) => {
                // PROTOCOL.md "Echo mode", UDP: one client read, one datagram.
                if c.readable && !c.eof && to_remote.is_empty() {
                    progress |= c.read_into(to_remote, blks)? > 0 || c.eof;
                }
                if r.writable && !to_remote.is_empty() {
                    let data = to_remote.data();
                    let datagram = data.get(..blks.min(data.len())).unwrap_or(data);
                    match r.sock.send_to(datagram, *peer) {
                        Ok(n) => {
                            to_remote.consume(datagram.len());
                            *xmit += n as u64;
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => r.writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if c.eof && to_remote.is_empty() {
                    // No half-close in UDP: the client is done, so is this.
                    return Ok(Verdict::Close("client closed".into()));
                }
                if r.readable && to_client.is_empty() {
                    // A datagram from elsewhere is read and dropped (kept: 0).
                    let mut dropped = None;
                    let read = to_client.read_with(usize::MAX, |space| {
                        let (n, from) = r.sock.recv_from(space)?;
                        if from.ip() == peer.ip() {
                            return Ok(n);
                        }
                        dropped = Some((n, from));
                        Ok(0)
                    });
                    match read {
                        Ok(n) => {
                            if let Some((n, from)) = dropped {
                                debug!("{}: dropped a {n}-byte datagram from {from}", conn.id);
                            } else {
                                *recv += n as u64;
                                *last_active = now;
                            }
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => r.readable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Remote::None | Remote::Resolving => return Ok(Verdict::Continue),
        }
        // Toward the client: replies (OK CONN) first, then remote data.
        if c.writable && !out.is_empty() {
            let n = c.write_from(out)?;
            out.drain(..n);
            progress |= n > 0;
        }
        if c.writable && out.is_empty() && !to_client.is_empty() {
            let n = c.write_from(to_client.data())?;
            to_client.consume(n);
            wrote_client |= n > 0;
            progress |= n > 0;
        }
        if let Remote::Tcp(r) = remote
            && r.eof
            && to_client.is_empty()
            && out.is_empty()
            && !c.shut
        {
            c.shut_write();
            // The end of the stream is news for the plugin too.
            wrote_client = true;
        }
        if !progress {
            more = false;
            break;
        }
    }
    if more && !*ready {
        *ready = true;
        ctx.ready.push(key);
    }
    if wrote_client {
        match conn.want_notify(now) {
            NotifyAt::Now => {
                if let Some(job) = conn.claim_notify() {
                    ctx.notifier.send(job);
                }
            }
            NotifyAt::Later(at) => ctx.timers.arm(at, key, Kind::Pace),
            NotifyAt::Never => {}
        }
    }
    if let Remote::Tcp(r) = remote
        && c.shut
        && r.shut
    {
        return Ok(Verdict::Close("both ends closed".into()));
    }
    Ok(Verdict::Continue)
}

/// Sets readable interest on each socket to whether there is room to read.
fn update_interest(s: &mut Session, registry: &Registry, key: usize) {
    let (client_room, remote_room) = match &mut s.conn.state {
        State::Command { input } => (!input.is_full(), false),
        State::Connecting { early, .. } => (!early.is_full(), false),
        State::Echo {
            to_remote,
            to_client,
        } => {
            if matches!(s.remote, Remote::Udp(..)) {
                (to_remote.is_empty(), to_client.is_empty())
            } else {
                (!to_remote.is_full(), !to_client.is_full())
            }
        }
        State::Draining { .. } => (false, false),
    };
    s.client.want_read(registry, client_token(key), client_room);
    match &mut s.remote {
        Remote::Tcp(side) => side.want_read(registry, remote_token(key), remote_room),
        Remote::Udp(side, _) => side.want_read(registry, remote_token(key), remote_room),
        Remote::None | Remote::Resolving => {}
    }
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// STYLE.md "Daemon habits": the handler only writes the signal number to
/// a pipe the loop polls (async-signal-safe), saving errno around it.
extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: write(2) is async-signal-safe; errno is restored for the
    // code the signal interrupted.
    unsafe {
        let errno = *libc::__errno_location();
        let byte = u8::try_from(sig).unwrap_or(0);
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        );
        *libc::__errno_location() = errno;
    }
}

fn install_signals() -> io::Result<OwnedFd> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 fills the two descriptors it returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own from here on; the write end
    // lives as long as the process (the handler may use it at any time).
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with our handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(read)
}
