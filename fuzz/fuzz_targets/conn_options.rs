//! `conn_options`: one command line as `protocol::parse_command` gets it
//! (no LF), mostly `CONN host:port [KEY=value ...]`: an input that does not
//! start with an upper-case letter gets `CONN ` put in front of it.
//!
//! Checks: no panic; an error is one reply line starting `ERR `; `CONN`
//! parses exactly as `parse_conn` does on the line's blank-separated words;
//! an accepted request says where it goes (`parse_host_port(target)`), keeps
//! every setting in range, and survives being written out as a canonical
//! CONN line and parsed again; `NTFY=d/s/a/p` means what `NTFY d s a p` does.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sockproxyd::protocol::{
    self, CmdError, Command, ConnOption, ConnRequest, Host, Limits, Settings, Transport,
    parse_command, parse_conn,
};
use sockproxyd_fuzz::assert_one_line;

/// PROTOCOL.md "CONN": PACE above a day is refused.
const MAX_PACE: Duration = Duration::from_secs(86_400);

fn words(text: &str) -> Vec<&str> {
    text.split([' ', '\t']).filter(|w| !w.is_empty()).collect()
}

/// The request as a CONN line a plugin could have sent: every option
/// written in its plainest form.
fn canonical(req: &ConnRequest) -> String {
    let mut line = format!("CONN {}", req.target);
    for opt in &req.options {
        let word = match opt {
            ConnOption::Rtim(t) => format!("RTIM={}", t.map_or(0, |t| t.as_millis())),
            ConnOption::Blks(n) => format!("BLKS={n}"),
            ConnOption::Ntfy(None) => "NTFY=-1".to_string(),
            ConnOption::Ntfy(Some(t)) => format!("NTFY={t}"),
            ConnOption::Pace(p) => format!("PACE={}.{:09}", p.as_secs(), p.subsec_nanos()),
            ConnOption::Prto(Transport::Tcp) => "PRTO=tcp".to_string(),
            ConnOption::Prto(Transport::Udp) => "PRTO=udp".to_string(),
        };
        line.push(' ');
        line.push_str(&word);
    }
    line
}

/// Equal, but for PACE, whose decimal text goes through an f64 and may come
/// back a nanosecond off.
fn same_options(a: &[ConnOption], b: &[ConnOption]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (ConnOption::Pace(x), ConnOption::Pace(y)) => x.abs_diff(*y) <= Duration::from_nanos(1),
            (x, y) => x == y,
        })
}

fn check_request(req: &ConnRequest, words: &[&str], limits: &Limits) {
    assert_eq!(Some(&req.target.as_str()), words.first());
    assert_ne!(req.port, 0);
    assert_eq!(
        protocol::parse_host_port(&req.target),
        Some((req.host.clone(), req.port))
    );
    if let Host::Name(name) = &req.host {
        assert!(!name.is_empty() && name.len() <= 253, "host name {name:?}");
    }
    let s = req.settings(&Settings::default());
    assert!((1..=limits.max_blks).contains(&s.blks), "BLKS={}", s.blks);
    assert!(s.pace <= MAX_PACE, "PACE={:?}", s.pace);
    assert_ne!(s.rtim, Some(Duration::ZERO), "RTIM=0 means never");

    let line = canonical(req);
    match parse_command(line.as_bytes(), limits) {
        Ok(Command::Conn(again)) => {
            assert_eq!((&again.host, again.port), (&req.host, req.port), "{line}");
            assert!(
                same_options(&again.options, &req.options),
                "{line}: {:?} became {:?}",
                req.options,
                again.options
            );
        }
        other => panic!("canonical {line:?} parsed as {other:?}"),
    }

    // The last NTFY= (the one that counts), when all four parts are there and
    // plain, means what the NTFY command with those words means.
    let last_target = req.options.iter().rev().find_map(|o| match o {
        ConnOption::Ntfy(t) => Some(t),
        _ => None,
    });
    let last_value = words.iter().rev().find_map(|w| {
        w.get(..5)
            .filter(|k| k.eq_ignore_ascii_case("NTFY="))
            .and_then(|_| w.get(5..))
    });
    if let (Some(target), Some(value)) = (last_target, last_value) {
        let parts: Vec<&str> = value.splitn(4, '/').collect();
        if parts.len() == 4 && parts.iter().all(|p| !p.is_empty() && !p.contains('/')) {
            let cmd = format!("NTFY {}", parts.join(" "));
            assert_eq!(
                parse_command(cmd.as_bytes(), limits),
                Ok(Command::Ntfy(target.clone())),
                "NTFY={value} and {cmd:?} differ"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let line = if data.first().is_some_and(u8::is_ascii_uppercase) {
        data.to_vec()
    } else {
        [&b"CONN "[..], data].concat()
    };
    // A line never holds its LF; CR is stripped by the framing before this.
    if line.contains(&b'\n') {
        return;
    }
    let limits = Limits::default();
    let got = parse_command(&line, &limits);
    if let Err(e) = &got {
        let reply = e.to_string();
        assert_one_line("reply", &reply);
        assert!(reply.starts_with("ERR "), "{reply:?}");
    }
    let text = String::from_utf8_lossy(&line);
    let w = words(&text);
    if w.first() != Some(&"CONN") {
        return;
    }
    let args = w.get(1..).unwrap_or_default();
    let direct = parse_conn(args, &limits);
    assert_eq!(got, direct.clone().map(Command::Conn));
    match direct {
        Ok(req) => check_request(&req, args, &limits),
        Err(CmdError::Conn(reason)) => assert!(!reason.is_empty()),
        Err(e) => panic!("CONN failed with {e:?}"),
    }
});
