//! The event loop: one `mio::Poll` on the main thread owning the listeners
//! and the slab of sessions.
//!
//! In scope: the poll and the dispatch of its events, accepting, timers
//! firing, resolver answers, signals, shutdown. Out of scope: a session's
//! I/O (`session.rs`), the sockets' syscalls (`side.rs`), what a connection
//! does next (`conn.rs`), HTTP (`notify.rs`), name lookups (`resolve.rs`),
//! the signal handlers (`signals.rs`). Nothing here may block: sockets are
//! non-blocking, lookups and notifications are threads.
//!
//! Readiness is edge-triggered: each socket side remembers whether it is
//! known readable/writable; a session's turn acts until it would block or
//! its budget is spent, and then it goes on the `ready` list, so one busy
//! connection cannot starve the rest.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::config::Config;
use crate::conn::{Conn, reason};
use crate::logging::LogFile;
use crate::notify::Notifier;
use crate::protocol::{self, ConnRequest};
use crate::ratelog::RateLog;
use crate::resolve::{self, Resolver};
use crate::selfcheck::OwnPorts;
use crate::session::{self, Ctx, Policy, Session, Verdict, client_token};
use crate::side::Side;
use crate::signals;
use crate::stat;
use crate::timer::{Kind, Timers};

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
/// Listener `i` has token `LISTENERS + i`; connection `key` has tokens
/// `2 key` (client) and `2 key + 1` (remote).
const LISTENERS: usize = usize::MAX - 1 - (1 << 16);
/// PROTOCOL.md "Listening": room for a burst of connects.
const BACKLOG: i32 = 1024;
/// Time left for final notifications at shutdown.
const FINAL_NOTIFY_WAIT: Duration = Duration::from_secs(5);
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// 2020-01-01T00:00:00Z: connection ids count milliseconds from here.
const ID_EPOCH: u64 = 1_577_836_800;

pub struct Listener {
    sock: TcpListener,
    /// `None`: the command port; else a `[direct]` listener's target.
    direct: Option<ConnRequest>,
    /// An accept retry is armed (one at a time).
    retrying: bool,
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
        listeners.push(Listener {
            sock,
            direct,
            retrying: false,
        });
    }
    Ok(listeners)
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
    /// At max_conns: logged once until a connection is let in again, then
    /// with the count of clients refused meanwhile.
    at_capacity: bool,
    busy_refused: u64,
    /// Clients refused by allow=: a line at most every 10 s.
    refused: RateLog,
}

/// Serves until STOP or a signal; `Err` only if the poll itself fails.
pub fn run(config: Config, listeners: Vec<Listener>, log: Option<LogFile>) -> io::Result<()> {
    // PROTOCOL.md "Limits": all buffer storage within max_mem.
    crate::buffer::set_budget(config.max_mem);
    let poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let resolver = Resolver::spawn(resolve::system_lookup(), waker)?;
    let notifier = Notifier::spawn()?;
    let signals = signals::install()?;
    registry.register(
        &mut SourceFd(&signals.as_raw_fd()),
        SIGNALS,
        Interest::READABLE,
    )?;
    let mut listeners = listeners;
    // The bound ports, so that `-p 0` is covered too.
    let own = OwnPorts::new(
        config.ip,
        listeners
            .iter()
            .filter_map(|l| l.sock.local_addr().ok())
            .map(|a| a.port())
            .collect(),
    );
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
                own,
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
        busy_refused: 0,
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
                                s.mark_remote(event);
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
            let Some(listener) = self.listeners.get_mut(index) else {
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
                    // stay queued; try again shortly rather than spin (one
                    // retry armed at a time), and say so once per episode.
                    if !self.accept_failing {
                        warn!("accept failed: {}; retrying every 100 ms", reason(&e));
                        self.accept_failing = true;
                    }
                    if !listener.retrying {
                        listener.retrying = true;
                        self.ctx.timers.arm(now + ACCEPT_RETRY, index, Kind::Accept);
                    }
                    return;
                }
            };
            if self.accept_failing {
                info!("accepting again");
                self.accept_failing = false;
            }
            let direct = listener.direct.clone();
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
                self.busy_refused += 1;
                if direct.is_none() {
                    // Where the greeting would go; the socket is new and
                    // empty, so this small write does not block.
                    let _ = (&stream).write(protocol::ERR_BUSY.as_bytes());
                }
                continue;
            }
            if self.at_capacity {
                info!(
                    "below max_conns again: accepting ({} clients refused with ERR BUSY meanwhile)",
                    std::mem::take(&mut self.busy_refused)
                );
                self.at_capacity = false;
            }
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
            let s = entry.insert(Session::new(conn, client));
            // Optimistic: the first turn finds out with a real syscall.
            s.client.readable = true;
            s.client.writable = true;
            if let Some(req) = direct {
                session::start_connect(s, &mut self.ctx, key, &req, now);
            }
            self.process(key, now);
        }
    }

    /// Gives a session its turn and carries out the verdict.
    fn process(&mut self, key: usize, now: Instant) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.conn.begin_turn();
        }
        loop {
            let Some(s) = self.sessions.get_mut(key) else {
                return;
            };
            match session::advance(s, &mut self.ctx, key, now) {
                Verdict::Continue => return s.settle(&mut self.ctx, key),
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
                        s.conn.stat_table(&table);
                    }
                }
            }
        }
    }

    fn close(&mut self, key: usize, why: &str, now: Instant) {
        let Some(mut s) = self.sessions.try_remove(key) else {
            return;
        };
        s.release(&mut self.ctx, key);
        let c = &s.conn;
        let up = stat::duration(now.saturating_duration_since(c.started));
        match &c.target {
            Some(target) if c.recv > 0 || c.xmit > 0 || c.is_echo() => info!(
                "{}: closed {} <-> {target} ({why}); {} bytes from remote, {} to it, up {up}",
                c.id, c.client, c.recv, c.xmit
            ),
            _ => debug!("{}: closed ({why}), up {up}", c.id),
        }
        // PROTOCOL.md "Notifications": one final notification so the
        // plugin reads "closed" (coalesced with one still waiting), unless
        // it already knows.
        if let Some(job) = c.final_notify() {
            self.ctx.notifier.send_final(job);
        }
    }

    fn on_timer(&mut self, key: usize, kind: Kind, now: Instant) {
        if kind == Kind::Accept {
            if let Some(l) = self.listeners.get_mut(key) {
                l.retrying = false;
            }
            return self.accept(key, now);
        }
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        s.armed = None;
        if let Some(job) = s.conn.on_deadline(now) {
            self.ctx.notifier.send(job);
        }
        self.process(key, now);
    }

    /// Resolver answers, through the waker.
    fn on_answers(&mut self, now: Instant) {
        let answers: Vec<resolve::Answer> = self.ctx.resolver.answers().collect();
        for answer in answers {
            let Some(s) = self.sessions.get_mut(answer.key) else {
                continue;
            };
            // The client may have gone and its slot been reused meanwhile.
            if s.serial != answer.serial || !matches!(s.remote, session::Remote::Resolving) {
                continue;
            }
            session::resolved(s, &mut self.ctx, answer.key, answer.result, now);
            self.process(answer.key, now);
        }
    }

    fn on_signals(&mut self) {
        for sig in signals::pending(&self.signals) {
            match sig {
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
                let result = s.client.write(s.conn.client_data());
                s.conn.wrote_client(now, result);
            }
            self.close(key, "shutting down", now);
        }
        self.ctx.notifier.finish(FINAL_NOTIFY_WAIT);
        info!("stopped");
    }
}
