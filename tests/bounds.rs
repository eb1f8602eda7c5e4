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

/// The daemon with RLIMIT_NOFILE `soft`/`hard`, as a shell's `ulimit -Sn`/`-Hn` leave it.
fn start_with_nofile(args: &[String], soft: u64, hard: u64) -> Daemon {
    use std::os::unix::process::CommandExt;
    let mut cmd = command(args);
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Daemon::spawn_command(cmd, None).unwrap_or_else(|f| panic!("{f:?}"))
}

/// `Max open files` of /proc/<pid>/limits: (soft, hard).
fn proc_nofile(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    // rlim_t is u32 on 32-bit glibc targets.
    #[allow(clippy::useless_conversion)]
    let hard = u64::from(own.rlim_max).min(4096);
    if hard <= 1024 {
        eprintln!("skipped: the hard descriptor limit here is {hard}");
        return;
    }
    let luup = FakeLuup::start();
    let d = start_with_nofile(&std_args(&luup.url()), 1024, hard);
    let line = d.wait_log(dur(5_000), "the descriptor limit", |l| {
        l.contains("INFO") && l.contains("descriptors:")
    });
    assert!(
        line.contains(&format!("raised from 1024 to {hard}")),
        "{line:?}"
    );
    if runner_line().is_empty() {
        assert_eq!(proc_nofile(d.pid()), Some((hard, hard)));
    }
    // Its connection limit is the configured one: nothing to warn about.
    assert!(
        d.warnings().iter().all(|l| !l.contains("max_conns")),
        "{:#?}",
        d.warnings()
    );
}

#[test]
fn at_1024_descriptors_clients_get_busy_before_they_run_out_and_notifications_go_on() {
    // Issue 12: with RLIMIT_NOFILE=1024, 506 echo connections used all 1,024
    // descriptors; a live plugin's next data batches produced no notification ("Too
    // many open files").
    const CLIENTS: usize = 600;
    let luup = FakeLuup::start();
    let d = Daemon::start_nofile(&std_args(&luup.url()), 1024);
    let dev = Device::listen();
    let (mut plugin, mut remote) = through(&d, &dev, "NTFY=7/urn:x:serviceId:P1/Recv/plug");

    let echo = EchoDevice::start();
    let (mut ok, mut busy, mut stuck) = (Vec::new(), 0, 0);
    for _ in 0..CLIENTS {
        let mut c = d.connect();
        match c.try_line(Instant::now() + dur(2_000)) {
            Ok(l) if l.starts_with("OK TOGGLEDBITS-SOCKPROXY 1 ") => {
                conn_ok(&mut c, &format!("CONN {}", echo.target()));
                ok.push(c);
            }
            Ok(l) if l == "ERR BUSY Too many connections" => busy += 1,
            other => {
                // Not accepted at all: the daemon has run out of descriptors.
                eprintln!("no greeting: {other:?}");
                stuck += 1;
                if stuck >= 3 {
                    break;
                }
            }
        }
    }
    eprintln!(
        "{} echo connections, {busy} busy, {stuck} without a greeting",
        ok.len()
    );
    assert_eq!(stuck, 0, "clients neither greeted nor refused");
    assert!(busy > 0, "no client was refused with ERR BUSY");
    // Every echo connection works.
    for c in ok.iter_mut() {
        c.send(b"e");
    }
    for c in ok.iter_mut() {
        assert_eq!(c.read_n(1, dur(5_000)), b"e");
    }
    // The plugin's data keeps being notified.
    for i in 1..=3 {
        remote.send(b"d");
        assert_eq!(plugin.read_n(1, dur(5_000)), b"d");
        luup.wait_pid("plug", i, dur(5_000));
    }
    let bad = |l: &str| l.contains("Too many open files") || l.contains("accept failed");
    assert_eq!(d.log_count(bad), 0, "{:#?}", d.warnings());
    // The log says why, with the numbers.
    let lowered = |l: &str| {
        l.contains("WARN") && l.contains(&format!("max_conns=512 lowered to {}", ok.len() + 1))
    };
    assert_eq!(d.log_count(lowered), 1, "{:#?}", d.warnings());
}
