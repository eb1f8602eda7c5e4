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

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::config::{self, Config};
use crate::conn::{Conn, reason};
use crate::limits::Budget;
use crate::listen::{self, Listener};
use crate::logging::{self, Log};
use crate::notify::Notifier;
use crate::protocol;
use crate::ratelog::RateLog;
use crate::resolve::{self, Resolver};
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
/// Time left for final notifications at shutdown.
const FINAL_NOTIFY_WAIT: Duration = Duration::from_secs(5);
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// 2020-01-01T00:00:00Z: connection ids count milliseconds from here.
const ID_EPOCH: u64 = 1_577_836_800;

pub struct EventLoop {
    poll: Poll,
    sessions: Slab<Session>,
    /// Listener `key` has token `LISTENERS + key`; a reload leaves holes.
    listeners: Slab<Listener>,
    ctx: Ctx,
    signals: OwnedFd,
    log: Log,
    /// What a reload reads and sizes against.
    restart: Restart,
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

/// What a reload (SIGHUP) needs from the start.
pub struct Restart {
    /// The command line after the program name, read again at each reload.
    pub args: Vec<OsString>,
    /// `None` when the descriptor limit could not be read: `max_conns` is
    /// then taken as configured.
    pub budget: Option<Budget>,
}

fn listener_token(key: usize) -> Token {
    Token(LISTENERS.saturating_add(key))
}

/// The rules for connections accepted from now on.
fn policy(config: &Config, max_conns: usize, listeners: &Slab<Listener>) -> Policy {
    Policy {
        limits: config.limits,
        max_conns,
        allow: config.allow.clone(),
        stop_from: config.stop_from.clone(),
        connect_to: config.connect_to.clone(),
        own: listen::own_ports(config.ip, listeners),
    }
}

/// Serves until STOP or a signal; `Err` only if the poll itself fails.
pub fn run(config: Config, listeners: Vec<Listener>, log: Log, restart: Restart) -> io::Result<()> {
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
    let mut listeners: Slab<Listener> = listeners.into_iter().enumerate().collect();
    for (key, l) in listeners.iter_mut() {
        registry.register(&mut l.sock, listener_token(key), Interest::READABLE)?;
        l.announce();
    }
    let policy = policy(&config, config.max_conns, &listeners);
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
            policy,
            timers: Timers::default(),
            notifier,
            resolver,
            vera: config.vera,
            serial: 0,
            ready: Vec::new(),
        },
        signals,
        log,
        restart,
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
            // New clients after this batch's others: a connection that ended
            // in the same instant frees its place first (at max_conns).
            let mut accepts = Vec::new();
            for event in events.iter() {
                match event.token() {
                    WAKER => self.on_answers(now),
                    SIGNALS => self.on_signals(),
                    Token(t) if t >= LISTENERS => accepts.push(t - LISTENERS),
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
            for index in accepts {
                self.accept(index, now);
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
            // A reload may have closed it meanwhile.
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
                libc::SIGHUP => self.reload(),
                libc::SIGTERM => self.stopping = Some("SIGTERM".into()),
                libc::SIGINT => self.stopping = Some("SIGINT".into()),
                _ => {}
            }
        }
    }

    /// PROTOCOL.md "Lifecycle": SIGHUP reads the command line the daemon
    /// started with again (its files anew) and applies it to what comes
    /// next: listeners (`listen.rs`), limits and access lists, the Luup URL,
    /// the log file and level. Established connections keep what they
    /// have: their limits, their notification URL (built at connect).
    /// A configuration that does not parse, or a listener that cannot be
    /// bound, changes nothing and is one line in the log; the log file is
    /// reopened either way (log rotation).
    fn reload(&mut self) {
        let prepared = config::reparse(&self.restart.args)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let open: Vec<_> = self.listeners.iter().map(|(k, l)| (k, l.want)).collect();
                let plan = listen::plan(&open, listen::wanted(&config))?;
                let staged = listen::stage(&self.listeners, plan)?;
                let log = self.log.prepare_reload(config.log.as_deref())?;
                Ok((config, staged, log))
            });
        let (config, staged, log) = match prepared {
            Ok(p) => p,
            Err(why) => {
                self.log.reopen_logged();
                warn!(
                    "SIGHUP: configuration not reloaded, the running one stays: {}",
                    protocol::OneLine(&why)
                );
                return;
            }
        };
        if let Some(to) = log {
            self.log.switch_logged(to);
        }
        logging::set_debug(config.debug);
        for w in &config.warnings {
            warn!("{w}");
        }
        let changed = listen::commit(
            &mut self.listeners,
            staged,
            &self.ctx.registry,
            listener_token,
        );
        let max_conns = match &self.restart.budget {
            Some(budget) => {
                let (fit, warning) = budget.max_conns(config.max_conns, self.listeners.len());
                if let Some(w) = warning {
                    warn!("{w}");
                }
                fit
            }
            None => config.max_conns,
        };
        self.ctx.policy = policy(&config, max_conns, &self.listeners);
        self.ctx.vera = config.vera.clone();
        // A smaller budget takes effect as buffers are given back and taken
        // again: nothing already held is dropped.
        crate::buffer::set_budget(config.max_mem);
        if let Some(w) = config.open_relay_warning() {
            warn!("{w}");
        }
        info!(
            "SIGHUP: configuration reloaded: {} listeners ({} opened, {} closed, {} retargeted), \
             max_conns={max_conns}, notifying {}; established connections keep their settings",
            self.listeners.len(),
            changed.opened,
            changed.closed,
            changed.retargeted,
            config.vera
        );
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
