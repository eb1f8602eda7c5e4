//! `acl`: address lists (`[host] allow=`, `stop_from=`, `connect_to=`)
//! through `AddrList::parse` and `contains`.
//!
//! Input: one flag byte (bit 0: items may carry a port), the list text up to
//! the first NUL, then probes of 19 bytes each (a kind byte: IPv4, IPv6 or
//! IPv4-mapped IPv6; 16 address bytes; a 2-byte port, 0 for none). Each item
//! of the list adds its own probes too: its network address, an address
//! inside just past the prefix, one just outside it.
//!
//! Checks: no panic; the list is accepted exactly when every item parses by
//! an independent reading of the syntax in `acl.rs` (an IPv4-mapped network
//! must be /96 or longer, so no rule is wider than written); its text parses back to
//! the same list; `contains` agrees with a reference that compares prefixes
//! as 128-bit numbers, IPv4 as IPv4-mapped IPv6.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use sockproxyd::acl::AddrList;

/// One item as the reference reads it.
#[derive(Debug)]
struct Item {
    net: IpAddr,
    len: u8,
    port: Option<u16>,
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&p| p != 0)
}

/// `addr`, `addr/len`, `v4[/len]:port`, `[v6[/len]]` or `[v6[/len]]:port`.
fn item(s: &str) -> Option<Item> {
    let (net, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let close = rest.find(']')?;
            let (net, after) = (&rest[..close], &rest[close + 1..]);
            let port = if after.is_empty() {
                None
            } else {
                Some(port(after.strip_prefix(':')?)?)
            };
            (net, port)
        }
        None if s.bytes().filter(|&b| b == b':').count() == 1 => {
            let colon = s.find(':')?;
            (&s[..colon], Some(port(&s[colon + 1..])?))
        }
        None => (s, None),
    };
    let (addr, len) = match net.find('/') {
        Some(slash) => {
            let len = &net[slash + 1..];
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (&net[..slash], Some(len.parse::<u8>().ok()?))
        }
        None => (net, None),
    };
    let net: IpAddr = addr.parse().ok()?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    // An IPv4-mapped network shorter than /96 would reach into the ::ffff:
    // prefix: refused (issue 13; it used to match every IPv4 address).
    let mapped = matches!(net, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    (len <= max && !(mapped && len < 96)).then_some(Item { net, len, port })
}

/// IPv4 as IPv4-mapped IPv6, as a number.
fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The item's prefix length counted in IPv6 bits.
fn len128(i: &Item) -> u32 {
    match i.net {
        IpAddr::V4(_) => u32::from(i.len) + 96,
        IpAddr::V6(_) => u32::from(i.len),
    }
}

/// IPv4, written either way.
fn is_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    }
}

fn reference_contains(items: &[Item], addr: IpAddr, port: Option<u16>) -> bool {
    items.iter().any(|i| {
        if let (Some(want), Some(got)) = (i.port, port)
            && want != got
        {
            return false;
        }
        let len = len128(i);
        // acl.rs keeps the families apart ("IPv4-mapped IPv6 addresses match
        // the IPv4 rules"): a rule written as an IPv4-mapped address is an
        // IPv4 rule, so `::/0` matches no IPv4 client and `::ffff:0:0/80`
        // no plain IPv6 one.
        if is_v4(i.net) != is_v4(addr) {
            return false;
        }
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        bits(i.net) & mask == bits(addr) & mask
    })
}

fn probe(bytes: &[u8]) -> Option<(IpAddr, Option<u16>)> {
    let kind = *bytes.first()?;
    let a: [u8; 16] = bytes.get(1..17)?.try_into().ok()?;
    let p = u16::from_be_bytes(bytes.get(17..19)?.try_into().ok()?);
    let addr = match kind % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        1 => IpAddr::V6(Ipv6Addr::from(a)),
        _ => IpAddr::V6(Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_ipv6_mapped()),
    };
    Some((addr, (p != 0).then_some(p)))
}

/// The address `n` in the family of `like`.
fn same_family(n: u128, like: IpAddr) -> IpAddr {
    let v6 = Ipv6Addr::from(n);
    match like {
        IpAddr::V4(_) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        IpAddr::V6(_) => IpAddr::V6(v6),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let ports = flags & 1 == 1;
    let (text, probes) = match rest.iter().position(|&b| b == 0) {
        Some(nul) => (&rest[..nul], &rest[nul + 1..]),
        None => (rest, &[][..]),
    };
    // A list is the value of one INI line: UTF-8 (lossy), no LF.
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if text.contains('\n') {
        return;
    }

    let items: Option<Vec<Item>> = text
        .split([' ', '\t', ','])
        .filter(|s| !s.is_empty())
        .map(item)
        .collect();
    let items = items.filter(|items| ports || items.iter().all(|i| i.port.is_none()));
    let list = AddrList::parse(text, ports);
    let (list, items) = match (list, items) {
        (Ok(list), Some(items)) => (list, items),
        (Err(e), None) => {
            sockproxyd_fuzz::assert_one_line("acl error", &e);
            return;
        }
        (list, items) => panic!("{text:?}: acl.rs says {list:?}, the reference {items:?}"),
    };
    assert_eq!(
        AddrList::parse(&list.to_string(), ports).as_ref(),
        Ok(&list),
        "the list's text parses to another list"
    );

    let mut to_probe: Vec<(IpAddr, Option<u16>)> = probes.chunks(19).filter_map(probe).collect();
    for i in &items {
        let len = len128(i);
        let net = bits(i.net);
        let mut near = vec![net];
        if len < 128 {
            near.push(net ^ (1 << (127 - len))); // first host bit: inside
        }
        if len > 0 {
            near.push(net ^ (1 << (128 - len))); // last prefix bit: outside
        }
        for n in near {
            to_probe.push((same_family(n, i.net), i.port));
            to_probe.push((IpAddr::V6(Ipv6Addr::from(n)), None));
            to_probe.push((
                same_family(n, i.net),
                Some(i.port.map_or(1, |p| p ^ 1).max(1)),
            ));
        }
    }
    for (addr, port) in to_probe {
        assert_eq!(
            list.contains(addr, port),
            reference_contains(&items, addr, port),
            "{text:?} contains {addr} port {port:?}?"
        );
    }
});
