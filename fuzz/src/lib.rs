//! Checks shared by the fuzz targets (`fuzz_targets/`): what must hold of
//! every `Config` the daemon accepts and of every message it prints.
//!
//! In scope: invariants, as assertions (a failed one is a crash to libFuzzer).
//! Out of scope: producing inputs (each target decodes its own).

use std::collections::HashSet;

use sockproxyd::config::{Config, ConfigError};
use sockproxyd::protocol::{self, Settings, Transport};

/// Bounds `config.rs` promises for `[host] max_line=`, `max_blks=`, `max_conns=`.
pub const MAX_MAX_LINE: usize = 1 << 20;
pub const MAX_MAX_BLKS: usize = 64 << 20;
pub const MAX_MAX_CONNS: usize = 1 << 20;

/// Bugs found by these targets, reported, and not yet fixed in `src/`
/// (fuzz/README.md "Known bugs"): their checks are skipped so that `make
/// fuzz` stays green meanwhile. Delete an entry with its fix.
const KNOWN_BUGS: &[&str] = &[
];

pub fn known_bug(name: &str) -> bool {
    KNOWN_BUGS.contains(&name)
}

/// A reply or a stderr line must be exactly one non-empty line
/// (STYLE.md 5: `Display` is the one line the user reads).
pub fn assert_one_line(what: &str, msg: &str) {
    assert!(!msg.is_empty(), "{what}: empty message");
    assert!(!msg.contains('\n'), "{what}: more than one line: {msg:?}");
}

pub fn check_error(e: &ConfigError) {
    assert_one_line("ConfigError", &e.to_string());
    match e {
        ConfigError::Usage(_) => assert_eq!(e.exit_code(), 2),
        ConfigError::File(_) => assert_eq!(e.exit_code(), 1),
    }
}

/// What every accepted configuration satisfies, whichever way it was built.
pub fn check_config(c: &Config) {
    // The notifier appends "/data_request?..." to `vera`: it must still be an
    // http:// URL with a host, and must not end in '/'.
    let rest = c.vera.strip_prefix("http://");
    assert!(
        known_bug("vera-without-host")
            || rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')),
        "vera {:?} is not an http:// URL with a host",
        c.vera
    );
    assert!(!c.vera.ends_with('/'), "vera {:?} ends in '/'", c.vera);
    assert!(
        (1..=MAX_MAX_LINE).contains(&c.limits.max_line),
        "max_line {}",
        c.limits.max_line
    );
    assert!(
        (1..=MAX_MAX_BLKS).contains(&c.limits.max_blks),
        "max_blks {}",
        c.limits.max_blks
    );
    assert!(
        (1..=MAX_MAX_CONNS).contains(&c.max_conns),
        "max_conns {}",
        c.max_conns
    );
    let mut ports = HashSet::new();
    for d in &c.direct {
        assert_ne!(d.port, 0, "[direct] on port 0");
        assert!(ports.insert(d.port), "[direct] {} twice", d.port);
        let r = &d.request;
        assert_eq!(
            protocol::parse_host_port(&r.target),
            Some((r.host.clone(), r.port)),
            "[direct] {}: target {:?} does not say where it goes",
            d.port,
            r.target
        );
        let s = r.settings(&Settings::default());
        assert!(
            (1..=MAX_MAX_BLKS).contains(&s.blks),
            "[direct] {}: BLKS={}",
            d.port,
            s.blks
        );
        // PRTO=udp: BLKS fits in one datagram (issue 13).
        assert!(
            s.transport == Transport::Tcp || s.blks <= protocol::MAX_UDP_BLKS,
            "[direct] {}: UDP with BLKS={}",
            d.port,
            s.blks
        );
    }
    for list in [&c.allow, &c.connect_to].into_iter().flatten() {
        assert!(!list.to_string().is_empty(), "an empty list is None");
    }
    for w in &c.warnings {
        assert_one_line("warning", w);
    }
}
