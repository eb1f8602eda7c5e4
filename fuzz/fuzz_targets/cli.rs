//! `cli`: the command line (`config::parse_args`), arguments split from the
//! input on NUL bytes, so they may be anything but NUL, UTF-8 or not.
//!
//! `-c file` reads a file: the target runs in an empty directory of its own
//! holding a few small INI files (`a` to `e`) and skips any input whose `-c`
//! names a path with a '/', so a `-c` reads one of those, or fails on a name
//! that does not exist (or on `.`/`..`, directories).
//!
//! Checks: no panic; an error is one line with exit code 1 or 2; an accepted
//! configuration keeps the invariants of `sockproxyd_fuzz::check_config`;
//! later options win: `-p 1` appended to an accepted command line changes
//! the port and nothing else.

#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use sockproxyd::config::{Config, Parsed, parse_args};
use sockproxyd_fuzz::{check_config, check_error, known_bug};

/// The files a `-c` may name (the seed README's example is `e`).
const FILES: &[(&str, &str)] = &[
    (
        "a",
        "[host]\nport=2600\nip=127.0.0.2\ndebug\nvera=http://10.0.0.2:3480/\nlog=/tmp/x.log\nallow=127.0.0.1 ::1\n",
    ),
    (
        "b",
        "[direct]\n9000=CONN h:1 BLKS=8192 NTFY=5/s/a/p\n8125 = mail.example.com:25\n",
    ),
    (
        "c",
        "[Host]\nmax_blks=4096\nmax_line=100\nmax_conns=3\nconnect_to=10.0.0.0/8 [::1]:80\nstop_from=\n",
    ),
    ("d", "[host]\nport=x\n"),
    (
        "e",
        "; Sample sockproxyd configuration file.\n\n[host]\n; ip=*\n; port=2504\n; debug\n\n[direct]\n; 8125=CONN mail.example.com:25 NTFY=55/urn:example-com:serviceId:MailProxy1/HandleReceive/0\n",
    ),
];

fn setup() {
    let dir = std::env::temp_dir().join(format!("sockproxyd-fuzz-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, text) in FILES {
        std::fs::write(dir.join(name), text).expect("write temp file");
    }
    std::env::set_current_dir(&dir).expect("cd temp dir");
}

/// Walks `args` as `parse_args` does, far enough to see every `-c` it would
/// read; false if one names a path outside the current directory.
fn reads_only_known_files(args: &[OsString]) -> bool {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args.iter().cloned());
    loop {
        match p.next() {
            Ok(Some(Short('c'))) => match p.value() {
                Ok(v) if v.as_encoded_bytes().contains(&b'/') => return false,
                Ok(_) => {}
                Err(_) => return true,
            },
            Ok(Some(Short('a' | 'p' | 'L' | 'N' | 'V'))) => {
                if p.value().is_err() {
                    return true;
                }
            }
            Ok(Some(Short('D'))) => {}
            // Help, version, anything unexpected: parse_args stops there.
            Ok(Some(_) | None) | Err(_) => return true,
        }
    }
}

fn run(args: &[OsString]) -> Option<Config> {
    match parse_args(args.iter().cloned()) {
        Ok(Parsed::Run(c)) => {
            check_config(&c);
            for d in &c.direct {
                let blks = d
                    .request
                    .settings(&sockproxyd::protocol::Settings::default())
                    .blks;
                assert!(
                    blks <= c.limits.max_blks,
                    "[direct] {} over max_blks",
                    d.port
                );
            }
            Some(*c)
        }
        Ok(Parsed::Help | Parsed::Version) => None,
        Err(e) => {
            if known_bug("newline-in-args")
                && args.iter().any(|a| a.as_encoded_bytes().contains(&b'\n'))
            {
                assert!(matches!(e.exit_code(), 1 | 2));
            } else {
                check_error(&e);
            }
            None
        }
    }
}

fuzz_target!(init: setup(), |data: &[u8]| {
    let args: Vec<OsString> = if data.is_empty() {
        Vec::new()
    } else {
        data.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect()
    };
    if !reads_only_known_files(&args) {
        return;
    }
    let Some(config) = run(&args) else {
        return;
    };
    // After "--" everything is a stray argument.
    if args.iter().any(|a| a == "--") {
        return;
    }
    let mut more = args.clone();
    more.extend(["-p".into(), "1".into()]);
    let later = run(&more).expect("-p 1 appended to an accepted command line");
    assert_eq!(
        later,
        Config {
            port: 1,
            ..config
        },
        "-p 1 appended changed more than the port"
    );
});
