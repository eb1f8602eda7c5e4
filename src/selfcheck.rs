//! Whether an address is one of our own listening sockets: the daemon never
//! relays to itself (PROTOCOL.md "Limits and access control"). A relayed
//! connection reaches us from loopback, so a client refused by `allow=` or
//! `stop_from=` could otherwise get in, and `STOP` us, through the proxy.
//!
//! In scope: the decision (`is_own_listener`, pure) and the host's interface
//! addresses (`local_ips`, one `getifaddrs`). Out of scope: when to ask
//! (`config.rs` for literal `[direct]` targets at start, `event_loop.rs` for
//! every resolved `CONN` and `[direct]` destination), sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// True when a TCP connect to `dest` would reach one of our listeners: they
/// listen on `listen_ip`, one per port in `ports`. `local_ips` are the host's
/// interface addresses (`local_ips()`); they matter only when `listen_ip` is
/// a wildcard.
///
/// Reached are: `listen_ip` itself; the unspecified address when we listen
/// on a loopback address (Linux connects `0.0.0.0` and `::` to loopback);
/// and, when we listen on a wildcard (`0.0.0.0` or `::`), any loopback
/// address (`127.0.0.0/8`, `::1`), the unspecified address and every
/// interface address. IPv4-mapped IPv6 addresses count as the IPv4 address
/// they map. Families are not told apart for a wildcard (an IPv6 wildcard
/// usually takes IPv4 too): refusing a relay to a port of ours that some
/// other program holds on the other family is the safe mistake.
pub fn is_own_listener(
    dest: SocketAddr,
    listen_ip: IpAddr,
    ports: &[u16],
    local_ips: &[IpAddr],
) -> bool {
    if !ports.contains(&dest.port()) {
        return false;
    }
    let d = dest.ip().to_canonical();
    let l = listen_ip.to_canonical();
    if l.is_unspecified() {
        d.is_loopback() || d.is_unspecified() || local_ips.iter().any(|ip| ip.to_canonical() == d)
    } else {
        d == l || (d.is_unspecified() && l.is_loopback())
    }
}

/// Our listeners, once bound: what the event loop asks on each connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnPorts {
    ip: IpAddr,
    ports: Vec<u16>,
}

impl OwnPorts {
    /// Listeners on `ip` (the configured listen address), one per port in
    /// `ports` (the bound ones: `-p 0` picks the command port at bind).
    pub fn new(ip: IpAddr, ports: Vec<u16>) -> OwnPorts {
        OwnPorts { ip, ports }
    }

    /// `is_own_listener` with the interface addresses read now, and only when
    /// they matter (our port, a wildcard listener, neither loopback nor
    /// unspecified): addresses come and go (a DHCP lease after start), and a
    /// `CONN` to one of our port numbers is rare.
    pub fn contains(&self, dest: SocketAddr) -> bool {
        if !self.ports.contains(&dest.port()) {
            return false;
        }
        let d = dest.ip().to_canonical();
        let need_interfaces =
            self.ip.to_canonical().is_unspecified() && !d.is_loopback() && !d.is_unspecified();
        let local = if need_interfaces {
            local_ips()
        } else {
            Vec::new()
        };
        is_own_listener(dest, self.ip, &self.ports, &local)
    }
}

/// Every IPv4 and IPv6 address of the host's interfaces (up or not). On
/// error an empty list: loopback and the unspecified address are decided
/// without it.
pub fn local_ips() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return ips;
    }
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list from getifaddrs, not yet freed.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says
        // which struct it is; each is read as the struct its family names.
        unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    ips.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    ips.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    const PORTS: &[u16] = &[2504, 2600];

    #[test]
    fn a_specific_listen_address() {
        let lo = ip("127.0.0.1");
        let own = |d: &str| is_own_listener(sa(d), lo, PORTS, &[ip("192.168.1.5")]);
        assert!(own("127.0.0.1:2504"));
        assert!(own("127.0.0.1:2600"));
        assert!(own("[::ffff:127.0.0.1]:2504"));
        // Linux connects the unspecified address to loopback.
        assert!(own("0.0.0.0:2504"));
        assert!(own("[::]:2600"));
        assert!(!own("127.0.0.1:2505"));
        assert!(!own("127.0.0.2:2504"));
        assert!(!own("[::1]:2504"));
        // An interface address: nothing of ours listens there.
        assert!(!own("192.168.1.5:2504"));

        let lan = ip("192.168.1.5");
        let own = |d: &str| is_own_listener(sa(d), lan, PORTS, &[lan]);
        assert!(own("192.168.1.5:2504"));
        assert!(own("[::ffff:192.168.1.5]:2600"));
        assert!(!own("127.0.0.1:2504"));
        assert!(!own("0.0.0.0:2504"));
        assert!(!own("192.168.1.6:2504"));
    }

    #[test]
    fn a_wildcard_listen_address() {
        let locals = [ip("127.0.0.1"), ip("192.168.1.5"), ip("fd00::5"), ip("::1")];
        for any in [ip("0.0.0.0"), ip("::")] {
            let own = |d: &str| is_own_listener(sa(d), any, PORTS, &locals);
            for d in [
                "127.0.0.1:2504",
                "127.3.4.5:2600",
                "[::1]:2504",
                "0.0.0.0:2504",
                "[::]:2504",
                "[::ffff:127.0.0.1]:2504",
                "[::ffff:0.0.0.0]:2504",
                "192.168.1.5:2600",
                "[::ffff:192.168.1.5]:2600",
                "[fd00::5]:2504",
            ] {
                assert!(own(d), "{d} with {any}");
            }
            for d in [
                "192.168.1.6:2504",
                "[fd00::6]:2504",
                "192.168.1.5:2505",
                "8.8.8.8:2504",
            ] {
                assert!(!own(d), "{d} with {any}");
            }
        }
        // Without the interface list, loopback and unspecified still count.
        let any = ip("0.0.0.0");
        assert!(is_own_listener(sa("127.0.0.9:2504"), any, PORTS, &[]));
        assert!(!is_own_listener(sa("192.168.1.5:2504"), any, PORTS, &[]));
        assert!(!is_own_listener(sa("127.0.0.1:2504"), any, &[], &locals));
    }

    #[test]
    fn own_ports_and_local_ips() {
        let ips = local_ips();
        // Every Linux host has a loopback interface.
        assert!(ips.iter().any(IpAddr::is_loopback), "{ips:?}");
        let own = OwnPorts::new(ip("0.0.0.0"), vec![2504, 9000]);
        assert!(own.contains(sa("127.0.0.1:9000")));
        assert!(!own.contains(sa("127.0.0.1:9001")));
        for a in &ips {
            assert!(own.contains(SocketAddr::new(*a, 2504)), "{a}");
        }
        let own = OwnPorts::new(ip("127.0.0.1"), vec![2504]);
        assert!(own.contains(sa("127.0.0.1:2504")));
        assert!(!own.contains(sa("127.0.0.2:2504")));
    }
}
