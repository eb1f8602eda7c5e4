//! Address lists for access control (`[host] allow=`, `stop_from=`,
//! `connect_to=`): CIDRs, optionally with a port.
//!
//! In scope: parsing a list and asking whether an address (and port) is in
//! it. Out of scope: which list applies where (`event_loop.rs`), sockets.
//!
//! Syntax: items separated by blanks or commas; each item is an address, a
//! network `addr/len`, for IPv4 either followed by `:port`, for IPv6 in
//! brackets when a port follows (`[fd00::/8]:443`). IPv4-mapped IPv6
//! addresses match the IPv4 rules.

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
            let rule =
                parse_item(item).ok_or_else(|| format!("bad address or network \"{item}\""))?;
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

fn parse_item(item: &str) -> Option<Rule> {
    let (net, port) = if let Some(rest) = item.strip_prefix('[') {
        let (net, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(parse_port(p.strip_prefix(':')?)?),
        };
        (net, port)
    } else if item.matches(':').count() == 1 {
        let (net, p) = item.split_once(':')?;
        (net, Some(parse_port(p)?))
    } else {
        (item, None)
    };
    let (addr, len) = match net.split_once('/') {
        Some((a, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            (a, Some(l.parse::<u8>().ok()?))
        }
        Some(_) => return None,
        None => (net, None),
    };
    let net: IpAddr = addr.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return None;
    }
    Some(Rule {
        net: net.to_canonical(),
        len: if net.is_ipv4() || !net.to_canonical().is_ipv4() {
            len
        } else {
            len.saturating_sub(96)
        },
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
}
