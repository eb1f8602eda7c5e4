//! One connection's I/O: its client socket, its remote (looked up,
//! connecting, connected), and the turn that carries out what `conn.rs`
//! decides, one syscall per `Act`.
//!
//! In scope: connecting (resolver, addresses in turn, `connect_to`), the
//! turn (`advance`), readable interest, the connection's one timer. Out of
//! scope: the rules (`conn.rs`), the slab, accepting and the poll
//! (`event_loop.rs`).

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use log::{debug, info, warn};
use mio::net::{TcpStream, UdpSocket};
use mio::{Registry, Token};

use crate::acl::AddrList;
use crate::conn::{Act, Conn, Ready, State, reason};
use crate::notify::Notifier;
use crate::protocol::{ConnRequest, Host, Limits};
use crate::resolve::Resolver;
use crate::selfcheck::OwnPorts;
use crate::side::Side;
use crate::timer::{Kind, Timers};

pub enum Remote {
    None,
    /// A name lookup is on the resolver; `Session::serial` matches it.
    Resolving,
    /// Connecting (the conn is `Connecting`) or connected (`Echo`).
    Tcp(Side<TcpStream>),
    Udp(Side<UdpSocket>, SocketAddr),
}

pub struct Session {
    pub conn: Conn,
    pub client: Side<TcpStream>,
    pub remote: Remote,
    /// Addresses of the CONN target still to try, last first.
    addrs: Vec<SocketAddr>,
    /// Matches a resolver answer to the lookup this session asked for.
    pub serial: u64,
    /// On the loop's `ready` list.
    pub ready: bool,
    /// The deadline this session's timer is armed for, if any.
    pub armed: Option<Instant>,
}

/// What the loop must do with a session after its turn.
pub enum Verdict {
    Continue,
    Stat,
    Stop,
    Close(Cow<'static, str>),
}

/// Who may do what, and how much (`[host]` limits and address lists).
pub struct Policy {
    pub limits: Limits,
    pub max_conns: usize,
    pub allow: Option<AddrList>,
    pub stop_from: AddrList,
    pub connect_to: Option<AddrList>,
    /// Our own listening sockets: never a destination (PROTOCOL.md "Limits
    /// and access control": the proxy never relays to itself).
    pub own: OwnPorts,
}

/// Everything the sessions need besides each other.
pub struct Ctx {
    pub registry: Registry,
    pub policy: Policy,
    pub timers: Timers,
    pub notifier: Notifier,
    pub resolver: Resolver,
    pub vera: String,
    pub serial: u64,
    /// Sessions with work left after their turn.
    pub ready: Vec<usize>,
}

pub fn client_token(key: usize) -> Token {
    Token(key * 2)
}

pub fn remote_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

impl Session {
    pub fn new(conn: Conn, client: Side<TcpStream>) -> Session {
        Session {
            conn,
            client,
            remote: Remote::None,
            addrs: Vec::new(),
            serial: 0,
            ready: false,
            armed: None,
        }
    }

    #[inline(always)]
    fn ready(&self) -> Ready {
        let (remote_read, remote_write) = match &self.remote {
            Remote::Tcp(r) => (r.readable, r.writable),
            Remote::Udp(r, _) => (r.readable, r.writable),
            Remote::None | Remote::Resolving => (false, false),
        };
        Ready {
            client_read: self.client.readable,
            client_write: self.client.writable,
            remote_read,
            remote_write,
        }
    }

    pub fn mark_remote(&mut self, event: &mio::event::Event) {
        match &mut self.remote {
            Remote::Tcp(side) => side.mark(event),
            Remote::Udp(side, _) => side.mark(event),
            Remote::None | Remote::Resolving => {}
        }
    }

    /// After a turn: the remote goes once the state no longer needs it,
    /// readable interest follows what the connection wants to read, and the
    /// timer is armed for the connection's next deadline.
    pub fn settle(&mut self, ctx: &mut Ctx, key: usize) {
        if !self.conn.needs_remote() {
            self.drop_remote(ctx, key);
        }
        let (client, remote) = self.conn.wants_read();
        self.client
            .want_read(&ctx.registry, client_token(key), client);
        match &mut self.remote {
            Remote::Tcp(side) => side.want_read(&ctx.registry, remote_token(key), remote),
            Remote::Udp(side, _) => side.want_read(&ctx.registry, remote_token(key), remote),
            Remote::None | Remote::Resolving => {}
        }
        // One timer per connection: a later deadline keeps the armed one
        // (it fires, finds nothing due, and is armed again: RTIM moves on
        // every read, and this keeps the wheel out of the data path), an
        // earlier one replaces it, and none cancels it (PROTOCOL.md
        // "Lifecycle": an idle daemon has no wake-ups).
        match (self.armed, self.conn.poll_at()) {
            (Some(armed), Some(at)) if at >= armed => {}
            (armed, at) => {
                if let Some(old) = armed {
                    ctx.timers.cancel(old, key, Kind::Conn);
                }
                if let Some(at) = at {
                    ctx.timers.arm(at, key, Kind::Conn);
                }
                self.armed = at;
            }
        }
    }

    /// The session is closing: its sockets and its timer go.
    pub fn release(&mut self, ctx: &mut Ctx, key: usize) {
        self.client.deregister(&ctx.registry);
        self.drop_remote(ctx, key);
        if let Some(at) = self.armed.take() {
            ctx.timers.cancel(at, key, Kind::Conn);
        }
    }

    /// Lets the remote go: its socket, or its lookup (a lookup whose
    /// client has gone is not made, PROTOCOL.md "Clients that hang up").
    pub fn drop_remote(&mut self, ctx: &Ctx, key: usize) {
        match &mut self.remote {
            Remote::Tcp(side) => side.deregister(&ctx.registry),
            Remote::Udp(side, _) => side.deregister(&ctx.registry),
            Remote::Resolving => ctx.resolver.cancel(key, self.serial),
            Remote::None => {}
        }
        self.remote = Remote::None;
    }

    /// Errors the kernel reported (EPOLLERR) go to the connection: an error
    /// on either side ends it, also one that comes when nothing is left to
    /// read or write there (a client that closed answers the remote's next
    /// bytes with RST). While connecting, the remote's error is the
    /// connect's (`check_connect`).
    fn take_errors(&mut self, now: Instant) {
        if let Err(e) = self.client.reported_error(TcpStream::take_error) {
            self.conn.client_failed(&e, now);
        }
        if self.conn.is_echo() {
            let reported = match &mut self.remote {
                Remote::Tcp(side) => side.reported_error(TcpStream::take_error),
                Remote::Udp(side, _) => side.reported_error(UdpSocket::take_error),
                Remote::None | Remote::Resolving => Ok(()),
            };
            if let Err(e) = reported {
                self.conn.remote_failed(&e, now);
            }
        }
    }
}

/// Carries out the connection's acts until it waits, yields its turn, or
/// needs the loop (STAT, STOP, close).
pub fn advance(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) -> Verdict {
    s.take_errors(now);
    check_connect(s, ctx, key, now);
    loop {
        match s.conn.next(s.ready(), now) {
            Act::ReadClient => {
                let client = &mut s.client;
                s.conn.read_client(now, |buf| client.read(buf));
            }
            Act::WriteClient => {
                let result = s.client.write(s.conn.client_data());
                s.conn.wrote_client(now, result);
            }
            Act::ShutClient => {
                s.client.shut_write();
                s.conn.client_shut(now);
            }
            Act::ReadRemote => match &mut s.remote {
                Remote::Tcp(r) => s.conn.read_remote(now, |buf| Ok((r.read(buf)?, None))),
                Remote::Udp(r, _) => s.conn.read_remote(now, |buf| {
                    let (n, from) = r.recv_from(buf)?;
                    Ok((n, Some(from)))
                }),
                Remote::None | Remote::Resolving => return Verdict::Continue,
            },
            Act::WriteRemote => {
                let result = match &mut s.remote {
                    Remote::Tcp(r) => r.write(s.conn.remote_data()),
                    Remote::Udp(r, peer) => r.send_to(s.conn.remote_data(), *peer),
                    Remote::None | Remote::Resolving => return Verdict::Continue,
                };
                s.conn.wrote_remote(now, result);
            }
            Act::ShutRemote => {
                if let Remote::Tcp(r) = &mut s.remote {
                    r.shut_write();
                }
                s.conn.remote_shut();
            }
            Act::Notify(job) => ctx.notifier.send(job),
            Act::Connect(req) => start_connect(s, ctx, key, &req, now),
            Act::Stat => return Verdict::Stat,
            Act::Stop => {
                let allowed = ctx.policy.stop_from.contains(s.conn.client.ip(), None);
                s.conn.stop(allowed, now);
                if allowed {
                    let result = s.client.write(s.conn.client_data());
                    s.conn.wrote_client(now, result);
                    return Verdict::Stop;
                }
                warn!(
                    "{}: refused STOP from {}: not in stop_from={}",
                    s.conn.id, s.conn.client, ctx.policy.stop_from
                );
            }
            Act::Wait => return Verdict::Continue,
            Act::Yield => {
                if !s.ready {
                    s.ready = true;
                    ctx.ready.push(key);
                }
                return Verdict::Continue;
            }
            Act::Close(why) => return Verdict::Close(why),
        }
    }
}

pub fn start_connect(s: &mut Session, ctx: &mut Ctx, key: usize, req: &ConnRequest, now: Instant) {
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

/// The resolver answered this session's lookup.
pub fn resolved(
    s: &mut Session,
    ctx: &mut Ctx,
    key: usize,
    result: io::Result<Vec<SocketAddr>>,
    now: Instant,
) {
    s.remote = Remote::None;
    match result {
        Ok(mut addrs) => {
            addrs.reverse();
            s.addrs = addrs;
            connect_next(s, ctx, key, now);
        }
        Err(e) => {
            let target = s.conn.target.clone().unwrap_or_default();
            info!("{}: cannot resolve {target}: {}", s.conn.id, reason(&e));
            s.conn.connect_failed("Host not found", now);
        }
    }
}

/// Starts a connect to the next address; on running out, fails the CONN.
fn connect_next(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) {
    let mut last_err = None;
    while let Some(addr) = s.addrs.pop() {
        // A relayed connection comes from loopback: through it a refused
        // host could reach STOP, or a destination connect_to forbids.
        if !s.conn.is_udp() && ctx.policy.own.contains(addr) {
            info!(
                "{}: refused CONN from {} to {addr}: that is this proxy",
                s.conn.id, s.conn.client
            );
            last_err = Some(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "Destination is this proxy",
            ));
            continue;
        }
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
                    connected(s, ctx, addr, now);
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

/// A TCP connect in progress that has become writable: connected, or on
/// to the next address, or failed.
fn check_connect(s: &mut Session, ctx: &mut Ctx, key: usize, now: Instant) {
    if !matches!(s.conn.state, State::Connecting { .. }) {
        return;
    }
    let Remote::Tcp(side) = &mut s.remote else {
        return; // resolving, or nothing yet
    };
    if !side.writable {
        return;
    }
    let e = match side.sock.take_error() {
        Ok(Some(e)) | Err(e) => e,
        Ok(None) => match side.sock.peer_addr() {
            Ok(peer) => return connected(s, ctx, peer, now),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                side.writable = false;
                return;
            }
            Err(e) => e,
        },
    };
    debug!("{}: connect failed: {}", s.conn.id, reason(&e));
    s.drop_remote(ctx, key);
    if s.addrs.is_empty() {
        let target = s.conn.target.clone().unwrap_or_default();
        info!("{}: cannot connect to {target}: {}", s.conn.id, reason(&e));
        s.conn.connect_failed(&reason(&e), now);
    } else {
        connect_next(s, ctx, key, now);
    }
}

fn connected(s: &mut Session, ctx: &mut Ctx, peer: SocketAddr, now: Instant) {
    s.conn.connected(&ctx.vera, peer, now);
    // The addresses not tried are not needed any more (nor their storage).
    s.addrs = Vec::new();
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
}
