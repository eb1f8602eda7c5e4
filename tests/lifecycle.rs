//! Shutdown by STOP and signals, restart on the same port, SIGHUP log reopening, and
//! sleeping when idle (PROTOCOL.md "Lifecycle", "Listening").

use crate::util::*;
use std::time::{Duration, Instant};

/// Starts a daemon with an echo connection that notifies (pid `fin`), a plain echo
/// connection without NTFY and an idle command connection; `stop` shuts it down; then
/// checks exit 0, every client and remote closed, and the final notification.
fn shuts_down_cleanly(stop: impl FnOnce(&Daemon)) {
    let luup = FakeLuup::start();
    let mut d = Daemon::start(&luup.url());
    let dev = Device::listen();
    let (mut a, _) = d.client();
    conn_ok(
        &mut a,
        &format!("CONN {} NTFY=3/urn:x:serviceId:Y1/Act/fin", dev.target()),
    );
    let mut ra = Client::from_stream(dev.accept());
    ra.send(b"x");
    luup.wait_pid("fin", 1, dur(5_000));
    assert_eq!(a.read_n(1, dur(5_000)), b"x");
    let (mut b, _) = d.client();
    conn_ok(&mut b, &format!("CONN {}", dev.target()));
    let mut rb = Client::from_stream(dev.accept());
    let (mut idle, _) = d.client();

    let t_stop = Instant::now();
    stop(&d);
    let st = d.wait_exit(dur(8_000));
    assert_eq!(st.code(), Some(0), "exit status after shutdown: {st:?}");
    a.expect_eof(dur(2_000));
    b.expect_eof(dur(2_000));
    idle.expect_eof(dur(2_000));
    ra.expect_eof(dur(2_000));
    rb.expect_eof(dur(2_000));
    // "send the final notifications that are due" before exiting.
    wait_until(
        dur(1_000),
        "the final notification sent at shutdown",
        || luup.for_pid("fin").iter().any(|r| r.at > t_stop),
    );
    assert!(
        luup.requests()
            .iter()
            .all(|r| r.param("Pid").as_deref() == Some("fin")),
        "a connection without NTFY was notified: {:#?}",
        luup.requests()
            .iter()
            .map(|r| r.line.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn stop_command_exits_0_after_final_notifications() {
    shuts_down_cleanly(|d| {
        let (mut c, _) = d.client();
        c.send(b"STOP\n");
        c.expect_line("OK STOP");
    });
}

#[test]
fn sigterm_exits_0_after_final_notifications() {
    shuts_down_cleanly(|d| d.signal(libc::SIGTERM));
}

#[test]
fn sigint_exits_0_after_final_notifications() {
    shuts_down_cleanly(|d| d.signal(libc::SIGINT));
}

#[test]
fn restart_binds_the_same_port_at_once() {
    let luup = FakeLuup::start();
    let mut d = Daemon::start(&luup.url());
    let port = d.port().to_string();
    let mut ids = std::collections::HashSet::new();
    // Connections the daemon closes first leave TIME_WAIT entries on its port.
    for _ in 0..3 {
        let (mut c, id) = d.client();
        ids.insert(id);
        c.send(b"QUIT\n");
        c.expect_line_then_eof("OK QUIT");
    }
    let (mut c, _) = d.client();
    c.send(b"STOP\n");
    c.expect_line("OK STOP");
    assert_eq!(d.wait_exit(dur(8_000)).code(), Some(0));
    let d2 = Daemon::spawn(
        &["-a", "127.0.0.1", "-p", &port, "-N", &luup.url(), "-D"].map(String::from),
        None,
    )
    .unwrap_or_else(|f| panic!("restart on port {port} failed: {f:?}"));
    assert_eq!(d2.port().to_string(), port);
    // Ids are unlikely to repeat across restarts (PROTOCOL.md "Greeting").
    let (_c, id) = d2.client();
    assert!(
        !ids.contains(&id),
        "id {id} of the previous run given again after a restart"
    );
}

#[test]
fn sighup_reopens_the_log_file() {
    let dir = std::env::temp_dir().join(format!("sockproxyd-test-{}-hup", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let log = dir.join("d.log");
    let rotated = dir.join("d.log.1");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&rotated);
    let d = Daemon::spawn(
        &[
            "-a",
            "127.0.0.1",
            "-p",
            "0",
            "-N",
            "http://127.0.0.1:9",
            "-D",
            "-L",
            &log.to_string_lossy(),
        ]
        .map(String::from),
        Some(&log),
    )
    .unwrap_or_else(|f| panic!("did not start with -L: {f:?}"));
    std::fs::rename(&log, &rotated).expect("rotate");
    d.signal(libc::SIGHUP);
    wait_until(
        dur(5_000),
        "the log file to be re-created after SIGHUP",
        || log.exists(),
    );
    // Routine events land in the new file, not the rotated one.
    wait_until(dur(5_000), "a log line in the reopened file", || {
        let (c, _) = d.client();
        drop(c);
        std::fs::read_to_string(&log).is_ok_and(|t| !t.trim().is_empty())
    });
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert!(
        old.contains("(commands)"),
        "rotated file lost its lines:\n{old}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sum of context switches of all the daemon's threads.
fn context_switches(pid: i32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += l.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

#[test]
fn idle_daemon_sleeps_without_periodic_wakeups() {
    if std::env::var_os("SOCKPROXYD_RUNNER").is_some() {
        eprintln!("skipping: under a runner the pid is the runner's");
        return;
    }
    let luup = FakeLuup::start();
    let d = Daemon::start(&luup.url());
    // Some traffic first, then all connections gone.
    d.stat();
    d.wait_no_other_connections(dur(5_000), "before the idle window");
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = context_switches(d.pid()).expect("read /proc");
    let window = Duration::from_millis(11_000);
    let t = Instant::now();
    while t.elapsed() < window {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = context_switches(d.pid()).expect("read /proc");
    assert!(
        after - before <= 1,
        "idle daemon switched context {} times in {window:?} (periodic wake-ups?)",
        after - before
    );
}

#[test]
fn an_open_echo_connection_leaves_no_timer_behind() {
    // Each connection has one timer for its next deadline; once in echo mode with no
    // RTIM or PACE it has none, and the timer armed for the connect (5 s) must go with
    // it rather than wake the idle daemon (make bench's idle phase: 0.1 wake-ups/s).
    if std::env::var_os("SOCKPROXYD_RUNNER").is_some() {
        eprintln!("skipping: under a runner the pid is the runner's");
        return;
    }
    let luup = FakeLuup::start();
    let d = Daemon::start(&luup.url());
    let echo = EchoDevice::start();
    let (mut c, _) = d.client();
    conn_ok(&mut c, &format!("CONN {}", echo.target()));
    c.send(b"ping");
    assert_eq!(c.read_n(4, dur(5_000)), b"ping");
    std::thread::sleep(Duration::from_millis(300));
    let before = context_switches(d.pid()).expect("read /proc");
    // Past the connect deadline (5 s) and the command-mode idle limit's share.
    std::thread::sleep(Duration::from_millis(6_500));
    let after = context_switches(d.pid()).expect("read /proc");
    assert_eq!(
        after - before,
        0,
        "the idle daemon woke with one echo connection open"
    );
    c.send(b"pong");
    assert_eq!(c.read_n(4, dur(5_000)), b"pong");
}
