//! The listening sockets: the command port and the `[direct]` ports
//! (PROTOCOL.md "Listening"), bound at start, changed by a reload
//! (PROTOCOL.md "Lifecycle").
//!
//! In scope: binding; which listeners a configuration asks for (`wanted`);
//! the difference between those open and those wanted (`plan`, pure); a
//! reload's change carried out in two steps, `stage` (bind what is new,
//! change nothing) and `commit`. Out of scope: accepting and the tokens'
//! meaning (`event_loop.rs`), reading the configuration (`config.rs`).
//!
//! A reload keeps a listener whose address is unchanged, without rebinding
//! it (a connect in its backlog is not lost), and gives it its new role if
//! its `[direct]` target changed; it closes those no longer wanted and binds
//! the new ones. A new one that cannot be bound refuses the whole reload, as
//! a file that does not parse does: nothing changes, and the error is the one
//! line to log. One exception: an address whose port is held by a listener
//! that this reload closes (`ip` changed from `127.0.0.1` to `*`, the port
//! kept) can only be bound once that one is closed; if it still fails then,
//! it is logged and the rest stays applied.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use log::{error, info};
use mio::net::TcpListener;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::config::Config;
use crate::conn::reason;
use crate::protocol::ConnRequest;
use crate::selfcheck::OwnPorts;

/// PROTOCOL.md "Listening": room for a burst of connects.
const BACKLOG: i32 = 1024;

/// One listener a configuration asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// `ip` and the configured port (0 for `-p 0`: a free one at bind).
    pub addr: SocketAddr,
    /// `None`: the command port; else a `[direct]` listener's target.
    pub direct: Option<ConnRequest>,
}

pub struct Listener {
    pub sock: TcpListener,
    /// The address asked for: a reload compares it, not the bound one
    /// (`-p 0` keeps its port).
    pub want: SocketAddr,
    pub direct: Option<ConnRequest>,
    /// An accept retry is armed (one at a time).
    pub retrying: bool,
}

impl Listener {
    /// The one `listening on <addr> (<role>)` line (tests and people read
    /// the bound port from it).
    pub fn announce(&self) {
        let addr = self.bound();
        match &self.direct {
            None => info!("listening on {addr} (commands)"),
            Some(req) => info!("listening on {addr} (direct to {})", req.target),
        }
    }

    /// The bound address; the wanted one if the socket cannot say.
    pub fn bound(&self) -> SocketAddr {
        self.sock.local_addr().unwrap_or(self.want)
    }
}

/// The command port first, then every `[direct]` port, all on `ip`.
pub fn wanted(config: &Config) -> Vec<Wanted> {
    std::iter::once(Wanted {
        addr: SocketAddr::new(config.ip, config.port),
        direct: None,
    })
    .chain(config.direct.iter().map(|d| Wanted {
        addr: SocketAddr::new(config.ip, d.port),
        direct: Some(d.request.clone()),
    }))
    .collect()
}

/// A listening socket on `addr`, with the daemon's backlog.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    // mio sets SO_REUSEADDR (a restart binds at once) and listens with a
    // backlog of 128; listening again raises it.
    let sock = TcpListener::bind(addr)?;
    // SAFETY: a plain syscall on a descriptor we own.
    let rc = unsafe { libc::listen(sock.as_raw_fd(), BACKLOG) };
    if rc == 0 {
        Ok(sock)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds the command port and every `[direct]` port (PROTOCOL.md
/// "Listening"). The error is the one line to print before exiting.
pub fn bind(config: &Config) -> Result<Vec<Listener>, String> {
    wanted(config)
        .into_iter()
        .map(|w| {
            let sock = listen(w.addr)
                .map_err(|e| format!("cannot listen on {}: {}", w.addr, reason(&e)))?;
            Ok(Listener {
                sock,
                want: w.addr,
                direct: w.direct,
                retrying: false,
            })
        })
        .collect()
}

/// Our listeners as a destination never to relay to: on `ip`, at the bound
/// ports (`-p 0` is covered too).
pub fn own_ports(ip: std::net::IpAddr, listeners: &Slab<Listener>) -> OwnPorts {
    OwnPorts::new(
        ip,
        listeners.iter().map(|(_, l)| l.bound().port()).collect(),
    )
}

/// What a reload does to the listeners.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// Open listeners (by key) that stay, with their role from now on.
    pub keep: Vec<(usize, Option<ConnRequest>)>,
    /// Open listeners to close.
    pub close: Vec<usize>,
    /// Listeners to bind.
    pub open: Vec<Wanted>,
}

/// Matches the open listeners (`key`, wanted address) with the `wanted`
/// ones by address. `Err` when two wanted listeners share an address (the
/// command port is also a `[direct]` port): at start that is a failed bind.
pub fn plan(open: &[(usize, SocketAddr)], wanted: Vec<Wanted>) -> Result<Plan, String> {
    let mut plan = Plan {
        keep: Vec::new(),
        close: Vec::new(),
        open: Vec::new(),
    };
    for (i, w) in wanted.iter().enumerate() {
        if wanted
            .get(..i)
            .unwrap_or_default()
            .iter()
            .any(|o| o.addr == w.addr)
        {
            return Err(format!(
                "two listeners on {}: the command port and a [direct] port must differ",
                w.addr
            ));
        }
    }
    for &(key, addr) in open {
        if !wanted.iter().any(|w| w.addr == addr) {
            plan.close.push(key);
        }
    }
    for w in wanted {
        match open.iter().find(|(_, addr)| *addr == w.addr) {
            Some(&(key, _)) => plan.keep.push((key, w.direct)),
            None => plan.open.push(w),
        }
    }
    Ok(plan)
}

/// The new listeners of a reload, bound but not yet in use.
pub struct Staged {
    keep: Vec<(usize, Option<ConnRequest>)>,
    close: Vec<usize>,
    bound: Vec<Listener>,
    /// Addresses whose port a listener being closed still holds.
    deferred: Vec<Wanted>,
}

/// A bind that failed because its port is held by a listener about to be
/// closed: `ip` changed, the port did not.
fn clashes(e: &io::Error, addr: SocketAddr, closing: &[SocketAddr]) -> bool {
    e.kind() == io::ErrorKind::AddrInUse && closing.iter().any(|c| c.port() == addr.port())
}

/// Binds what `plan` opens. `Err` (the one line to log) if one cannot be
/// bound: what was bound is closed again and nothing has changed.
pub fn stage(listeners: &Slab<Listener>, plan: Plan) -> Result<Staged, String> {
    let closing: Vec<SocketAddr> = plan
        .close
        .iter()
        .filter_map(|&k| listeners.get(k))
        .map(Listener::bound)
        .collect();
    let mut staged = Staged {
        keep: plan.keep,
        close: plan.close,
        bound: Vec::new(),
        deferred: Vec::new(),
    };
    for w in plan.open {
        match listen(w.addr) {
            Ok(sock) => staged.bound.push(Listener {
                sock,
                want: w.addr,
                direct: w.direct,
                retrying: false,
            }),
            Err(e) if clashes(&e, w.addr, &closing) => staged.deferred.push(w),
            Err(e) => return Err(format!("cannot listen on {}: {}", w.addr, reason(&e))),
        }
    }
    Ok(staged)
}

/// How many listeners a commit opened and closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub opened: usize,
    pub closed: usize,
    pub retargeted: usize,
}

/// Carries out a staged reload: roles changed, old listeners closed, new
/// ones registered (listener `key` with `token(key)`) and announced.
pub fn commit(
    listeners: &mut Slab<Listener>,
    staged: Staged,
    registry: &Registry,
    token: impl Fn(usize) -> Token,
) -> Changed {
    let mut changed = Changed::default();
    for (key, direct) in staged.keep {
        if let Some(l) = listeners.get_mut(key)
            && l.direct != direct
        {
            l.direct = direct;
            l.announce();
            changed.retargeted = changed.retargeted.saturating_add(1);
        }
    }
    for key in staged.close {
        if let Some(mut l) = listeners.try_remove(key) {
            let _ = registry.deregister(&mut l.sock);
            match &l.direct {
                None => info!("closed listener {} (commands)", l.bound()),
                Some(req) => info!("closed listener {} (direct to {})", l.bound(), req.target),
            }
            changed.closed = changed.closed.saturating_add(1);
        }
    }
    let mut bound = staged.bound;
    for w in staged.deferred {
        match listen(w.addr) {
            Ok(sock) => bound.push(Listener {
                sock,
                want: w.addr,
                direct: w.direct,
                retrying: false,
            }),
            Err(e) => error!(
                "cannot listen on {}: {}; the rest of the configuration is applied, \
                 reload again once the address is free",
                w.addr,
                reason(&e)
            ),
        }
    }
    for mut l in bound {
        let entry = listeners.vacant_entry();
        match registry.register(&mut l.sock, token(entry.key()), Interest::READABLE) {
            Ok(()) => {
                l.announce();
                entry.insert(l);
                changed.opened = changed.opened.saturating_add(1);
            }
            Err(e) => error!("cannot listen on {}: {}", l.bound(), reason(&e)),
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Host, Limits};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn req(target: &str) -> Option<ConnRequest> {
        let words: Vec<&str> = target.split_whitespace().collect();
        Some(crate::protocol::parse_conn(&words, &Limits::default()).expect("request"))
    }

    fn want(a: &str, target: Option<&str>) -> Wanted {
        Wanted {
            addr: addr(a),
            direct: target.and_then(req),
        }
    }

    #[test]
    fn wanted_lists_the_command_port_first() {
        let mut c = Config {
            ip: "127.0.0.1".parse().expect("ip"),
            port: 0,
            ..Config::default()
        };
        crate::config::apply_file(&mut c, "f", "[direct]\n9001=h:1\n9000=10.0.0.1:2\n")
            .expect("ok");
        let w = wanted(&c);
        assert_eq!(
            w.iter().map(|w| w.addr).collect::<Vec<_>>(),
            [
                addr("127.0.0.1:0"),
                addr("127.0.0.1:9001"),
                addr("127.0.0.1:9000")
            ]
        );
        assert_eq!(w.first().map(|w| w.direct.clone()), Some(None));
        let host = w.get(2).and_then(|w| w.direct.as_ref()).map(|r| &r.host);
        assert_eq!(host, Some(&Host::Ip("10.0.0.1".parse().expect("ip"))));
    }

    #[test]
    fn unchanged_listeners_are_kept_new_opened_gone_closed() {
        let open = [
            (0, addr("127.0.0.1:0")),
            (1, addr("127.0.0.1:9000")),
            (3, addr("127.0.0.1:9001")),
        ];
        let p = plan(
            &open,
            vec![
                want("127.0.0.1:0", None),
                want("127.0.0.1:9001", Some("h:2")),
                want("127.0.0.1:9002", Some("h:3")),
            ],
        )
        .expect("plan");
        assert_eq!(p.keep, [(0, None), (3, req("h:2"))]);
        assert_eq!(p.close, [1]);
        assert_eq!(p.open, [want("127.0.0.1:9002", Some("h:3"))]);
    }

    #[test]
    fn a_new_address_rebinds_everything() {
        let open = [(0, addr("127.0.0.1:2504")), (1, addr("127.0.0.1:9000"))];
        let p = plan(
            &open,
            vec![
                want("0.0.0.0:2504", None),
                want("0.0.0.0:9000", Some("h:1")),
            ],
        )
        .expect("plan");
        assert!(p.keep.is_empty());
        assert_eq!(p.close, [0, 1]);
        assert_eq!(p.open.len(), 2);
    }

    #[test]
    fn roles_may_swap_without_a_rebind() {
        // The command port moves to 9000, which was a [direct] port, and
        // 2504 becomes one.
        let open = [(0, addr("127.0.0.1:2504")), (1, addr("127.0.0.1:9000"))];
        let p = plan(
            &open,
            vec![
                want("127.0.0.1:9000", None),
                want("127.0.0.1:2504", Some("h:1")),
            ],
        )
        .expect("plan");
        assert_eq!(p.keep, [(1, None), (0, req("h:1"))]);
        assert!(p.close.is_empty() && p.open.is_empty());
    }

    #[test]
    fn one_address_twice_is_refused() {
        let e = plan(
            &[],
            vec![
                want("127.0.0.1:9000", None),
                want("127.0.0.1:9000", Some("h:1")),
            ],
        )
        .expect_err("twice");
        assert!(e.starts_with("two listeners on 127.0.0.1:9000"), "{e}");
    }

    #[test]
    fn only_a_port_held_by_a_closing_listener_waits() {
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        let closing = [addr("127.0.0.1:2504")];
        assert!(clashes(&in_use, addr("0.0.0.0:2504"), &closing));
        assert!(!clashes(&in_use, addr("0.0.0.0:2505"), &closing));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(!clashes(&denied, addr("0.0.0.0:2504"), &closing));
    }

    #[test]
    fn stage_and_commit_on_real_sockets() {
        let poll = mio::Poll::new().expect("poll");
        let registry = poll.registry();
        let token = |k: usize| Token(1000 + k);
        let mut listeners = Slab::new();
        let mut c = Config {
            ip: "127.0.0.1".parse().expect("ip"),
            port: 0,
            ..Config::default()
        };
        for mut l in bind(&c).expect("bind") {
            let e = listeners.vacant_entry();
            registry
                .register(&mut l.sock, token(e.key()), Interest::READABLE)
                .expect("register");
            e.insert(l);
        }
        let command = listeners.get(0).map(Listener::bound).expect("command port");
        // A port another socket holds: the reload is refused, nothing moves.
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = other.local_addr().expect("addr").port();
        crate::config::apply_file(&mut c, "f", &format!("[direct]\n{busy}=h:1\n")).expect("ok");
        let open: Vec<(usize, SocketAddr)> = listeners.iter().map(|(k, l)| (k, l.want)).collect();
        let p = plan(&open, wanted(&c)).expect("plan");
        let e = stage(&listeners, p).err().expect("refused");
        assert!(
            e.starts_with(&format!("cannot listen on 127.0.0.1:{busy}: ")),
            "{e}"
        );
        assert_eq!(listeners.len(), 1);
        drop(other);
        let p = plan(&open, wanted(&c)).expect("plan");
        let staged = stage(&listeners, p).expect("staged");
        let changed = commit(&mut listeners, staged, registry, token);
        assert_eq!(
            changed,
            Changed {
                opened: 1,
                closed: 0,
                retargeted: 0
            }
        );
        assert_eq!(
            listeners.get(0).map(Listener::bound),
            Some(command),
            "not rebound"
        );
        let own = own_ports(c.ip, &listeners);
        assert!(own.contains(addr(&format!("127.0.0.1:{busy}"))));
        assert!(own.contains(command));
    }
}
