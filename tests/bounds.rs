//! Resource bounds under hostile or unlucky conditions (issue 12): name lookups that
//! stall, and the descriptor limit (README.md "Security").

use crate::util::*;
use std::path::PathBuf;
use std::time::Instant;

/// A `getaddrinfo` shim for LD_PRELOAD: names ending in `.slow` take 4 s and are not
/// found; everything else goes to the real one. `None` (with the reason printed) where
/// it cannot work: under a runner (qemu) or without a C compiler.
fn slow_dns_shim() -> Option<(ScratchFile, PathBuf)> {
    if !runner_line().is_empty() {
        eprintln!(
            "skipped: LD_PRELOAD does not reach a binary run by {}",
            runner_line()
        );
        return None;
    }
    if !have("cc") {
        eprintln!("skipped: no cc to build the getaddrinfo shim");
        return None;
    }
    let src = ScratchFile::new(
        "slowdns.c",
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <string.h>
#include <unistd.h>

int getaddrinfo(const char *node, const char *service,
                const struct addrinfo *hints, struct addrinfo **res) {
    static int (*real)(const char *, const char *, const struct addrinfo *,
                       struct addrinfo **);
    size_t n = node ? strlen(node) : 0;
    if (n >= 5 && strcmp(node + n - 5, ".slow") == 0) {
        sleep(4);
        return EAI_NONAME;
    }
    if (!real)
        real = dlsym(RTLD_NEXT, "getaddrinfo");
    return real(node, service, hints, res);
}
"#,
    );
    let so = src.path.with_file_name("slowdns.so");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src.path)
        .arg("-ldl")
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some((src, so))
}

#[test]
fn abandoned_slow_lookups_delay_neither_an_address_nor_a_fast_name() {
    // Issue 12: with a DNS server that takes 4 s, ten `CONN x.slow:80` whose clients
    // hung up at once made later `CONN localhost:PORT` fail after 5 s each: one
    // resolver thread, and abandoned lookups still ran in turn.
    let Some((_src, so)) = slow_dns_shim() else {
        return;
    };
    let luup = FakeLuup::start();
    let mut cmd = command(&std_args(&luup.url()));
    cmd.env("LD_PRELOAD", &so);
    let d = Daemon::spawn_command(cmd, None).unwrap_or_else(|f| panic!("{f:?}"));
    let dev = Device::listen();
    let mut gone = Vec::new();
    for i in 0..10 {
        let (mut c, _) = d.client();
        c.send(format!("CONN x{i}.slow:80\n").as_bytes());
        gone.push(c);
    }
    wait_until(dur(5_000), "ten lookups asked for", || {
        d.log_count(|l| l.contains(": CONN x") && l.contains(".slow:80")) == 10
    });
    drop(gone);
    d.wait_no_other_connections(dur(5_000), "the ten clients gone");

    let port = dev.addr.port();
    for target in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let (mut c, _) = d.client();
        let t = Instant::now();
        c.send(format!("CONN {target}\n").as_bytes());
        let reply = c.line_within(dur(10_000));
        let took = t.elapsed();
        assert!(reply.starts_with("OK CONN "), "CONN {target}: {reply:?}");
        assert!(took < dur(1_000), "CONN {target} answered after {took:?}");
        dev.accept_within(dur(1_000));
    }
}
