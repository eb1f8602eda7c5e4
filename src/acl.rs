//! Address lists for access control (`[host] allow=`, `stop_from=`,
//! `connect_to=`): CIDRs, optionally with a port.
//!
//! In scope: parsing a list and asking whether an address (and port) is in
//! it. Out of scope: which list applies where (`event_loop.rs`), sockets.
//!
//! Syntax: items separated by blanks or commas; each item is an address, a
//! network `addr/len`, for IPv4 either followed by `:port`, for IPv6 in
//! brackets when a port follows (`[fd00::/8]:443`). IPv4-mapped IPv6
//! addresses match the IPv4 rules. An IPv4-mapped network
//! (`::ffff:a.b.c.d/n`) is the IPv4 network `a.b.c.d/(n-96)` and must be
//! /96 or longer: a shorter one would reach into the `::ffff:` prefix and,
//! taken as IPv4, match every IPv4 address (PROTOCOL.md "Limits and access
//! control").

use std::fmt;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    net: IpAddr,
    len: u8,
    port: Option<u16>,
}

impl Rule {
    fn matches(&self, addr: IpAddr, port: Option<u16>) -> bool {
        if let (Some(want), Some(got)) = (self.port, port)
            && want != got
        {
            return false;
        }
        match (self.net, addr.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(&net.octets(), &a.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_eq(&net.octets(), &a.octets(), self.len),
            _ => false,
        }
    }
}

/// True if the first `len` bits of `a` and `b` agree.
fn prefix_eq(a: &[u8], b: &[u8], len: u8) -> bool {
    let mut bits = usize::from(len);
    for (x, y) in a.iter().zip(b) {
        if bits == 0 {
            return true;
        }
        let take = bits.min(8);
        let mask = !(0xffu8
            .checked_shr(u32::try_from(take).unwrap_or(8))
            .unwrap_or(0));
        if x & mask != y & mask {
            return false;
        }
        bits -= take;
    }
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddrList {
    rules: Vec<Rule>,
    text: String,
}

impl AddrList {
    /// Parses a list; `ports` says whether items may carry a port.
    pub fn parse(text: &str, ports: bool) -> Result<AddrList, String> {
        let mut rules = Vec::new();
        for item in text.split([' ', '\t', ',']).filter(|s| !s.is_empty()) {
            let rule = parse_item(item)?;
            if rule.port.is_some() && !ports {
                return Err(format!("no port allowed in \"{item}\""));
            }
            rules.push(rule);
        }
        Ok(AddrList {
            rules,
            text: text
                .split([' ', '\t', ','])
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Loopback only: `127.0.0.0/8` and `::1`.
    pub fn loopback() -> AddrList {
        // Both items are literals that parse.
        AddrList::parse("127.0.0.0/8 ::1", false).unwrap_or_default()
    }

    pub fn contains(&self, addr: IpAddr, port: Option<u16>) -> bool {
        self.rules.iter().any(|r| r.matches(addr, port))
    }
}

impl fmt::Display for AddrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_item(item: &str) -> Result<Rule, String> {
    let bad = || format!("bad address or network \"{item}\"");
    let (net, port) = if let Some(rest) = item.strip_prefix('[') {
        let (net, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').and_then(parse_port).ok_or_else(bad)?),
        };
        (net, port)
    } else if item.matches(':').count() == 1 {
        let (net, p) = item.split_once(':').ok_or_else(bad)?;
        (net, Some(parse_port(p).ok_or_else(bad)?))
    } else {
        (item, None)
    };
    let (addr, len) = match net.split_once('/') {
        Some((a, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            (a, Some(l.parse::<u8>().map_err(|_| bad())?))
        }
        Some(_) => return Err(bad()),
        None => (net, None),
    };
    let net: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(bad());
    }
    let canonical = net.to_canonical();
    let len = if net.is_ipv6() && canonical.is_ipv4() {
        // IPv4-mapped: the last 32 bits are the IPv4 network.
        len.checked_sub(96).ok_or_else(|| {
            format!("IPv4-mapped network \"{item}\" must be /96 or longer (it is /{len})")
        })?
    } else {
        len
    };
    Ok(Rule {
        net: canonical,
        len,
        port,
    })
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn networks_and_ports() {
        let l = AddrList::parse("192.168.1.0/24, 10.0.0.5:80 [fd00::/8]:443 ::1", true)
            .expect("parses");
        assert!(l.contains(ip("192.168.1.77"), Some(9)));
        assert!(!l.contains(ip("192.168.2.1"), Some(9)));
        assert!(l.contains(ip("10.0.0.5"), Some(80)));
        assert!(!l.contains(ip("10.0.0.5"), Some(81)));
        assert!(l.contains(ip("fd12::1"), Some(443)));
        assert!(!l.contains(ip("fd12::1"), Some(80)));
        assert!(l.contains(ip("::1"), Some(1)));
        assert!(l.contains(ip("::ffff:192.168.1.3"), None));
        assert_eq!(
            l.to_string(),
            "192.168.1.0/24 10.0.0.5:80 [fd00::/8]:443 ::1"
        );
    }

    #[test]
    fn loopback_and_odd_prefixes() {
        let l = AddrList::loopback();
        assert!(l.contains(ip("127.0.0.2"), None));
        assert!(l.contains(ip("::1"), None));
        assert!(!l.contains(ip("192.168.0.1"), None));
        let all = AddrList::parse("0.0.0.0/0 ::/0", false).expect("parses");
        assert!(all.contains(ip("8.8.8.8"), None) && all.contains(ip("2001:db8::1"), None));
        let odd = AddrList::parse("10.1.2.3/15", false).expect("parses");
        assert!(odd.contains(ip("10.0.255.255"), None));
        assert!(!odd.contains(ip("10.2.0.0"), None));
        let empty = AddrList::parse(" , ", false).expect("parses");
        assert!(!empty.contains(ip("127.0.0.1"), None));
    }

    #[test]
    fn bad_items() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.300",
            "host.lan",
            "10.0.0.1:0",
            "[::1",
            "::1/129",
            "1.2.3.4/",
            "1.2.3.4:x",
        ] {
            assert!(AddrList::parse(bad, true).is_err(), "{bad} accepted");
        }
        assert!(AddrList::parse("10.0.0.1:80", false).is_err());
    }

    #[test]
    fn ipv4_mapped_networks_are_96_or_longer() {
        // Issue 13: shorter ones used to match every IPv4 address.
        for bad in [
            "::ffff:10.0.0.0/8",
            "::ffff:192.168.1.0/24",
            "::ffff:0.0.0.0/0",
            "[::ffff:10.0.0.0/95]:80",
        ] {
            let e = AddrList::parse(bad, true).expect_err(bad);
            assert!(e.contains("/96 or longer"), "{bad}: {e}");
        }
        let l = AddrList::parse("::ffff:10.0.0.0/104", false).expect("parses");
        for (addr, inside) in [
            ("10.1.2.3", true),
            ("::ffff:10.255.0.1", true),
            ("11.0.0.1", false),
            ("127.0.0.2", false),
            ("::ffff:127.0.0.2", false),
            ("::a01:203", false),
        ] {
            assert_eq!(l.contains(ip(addr), None), inside, "{addr}");
        }
        let all = AddrList::parse("::ffff:0.0.0.0/96", false).expect("parses");
        assert!(all.contains(ip("127.0.0.2"), None) && !all.contains(ip("::1"), None));
        let one = AddrList::parse("[::ffff:127.0.0.1]:80", true).expect("parses");
        assert!(one.contains(ip("127.0.0.1"), Some(80)));
        assert!(!one.contains(ip("127.0.0.2"), Some(80)));
        // A plain IPv6 network that covers the mapped range is not an IPv4 rule.
        let v6 = AddrList::parse("::/64", false).expect("parses");
        assert!(!v6.contains(ip("10.0.0.1"), None) && v6.contains(ip("::2"), None));
    }
}
