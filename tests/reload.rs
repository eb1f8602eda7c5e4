//! Reload on SIGHUP (docs/PROTOCOL.md "Lifecycle"): the configuration file is edited,
//! the daemon re-reads its command line, and listeners, access lists, the Luup URL and
//! logging change for what comes next, while established connections keep passing bytes
//! with the settings they started with. A file that does not parse, or a port that
//! cannot be bound, changes nothing and is one log line.

use crate::util::*;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;

const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn is_outcome(l: &str) -> bool {
    l.contains("SIGHUP: configuration reloaded") || l.contains("SIGHUP: configuration not reloaded")
}

/// Writes `text` as the daemon's INI file, sends SIGHUP and waits for the reload's
/// outcome line (in `lines`, which reads wherever the log goes); returns it.
#[track_caller]
fn reload_with(
    d: &Daemon,
    ini: &ScratchFile,
    text: &str,
    lines: impl Fn() -> Vec<String>,
) -> String {
    let before = lines().iter().filter(|l| is_outcome(l)).count();
    std::fs::write(&ini.path, text).expect("rewrite the configuration");
    d.signal(libc::SIGHUP);
    let mut outcome = None;
    wait_until(dur(5_000), "the reload's outcome in the log", || {
        let all: Vec<String> = lines().into_iter().filter(|l| is_outcome(l)).collect();
        if all.len() > before {
            outcome = all.last().cloned();
        }
        outcome.is_some()
    });
    outcome.expect("found")
}

#[track_caller]
fn reload(d: &Daemon, ini: &ScratchFile, text: &str) -> String {
    reload_with(d, ini, text, || d.log_lines())
}

#[track_caller]
fn assert_reloaded(outcome: &str) {
    assert!(
        outcome.contains("SIGHUP: configuration reloaded"),
        "reload refused: {outcome}"
    );
}

/// A connection passing bytes through the daemon to an echo device, kept open across
/// reloads; `check` sends a fresh block and expects it back (both directions).
struct Held {
    c: Client,
    round: u64,
}

impl Held {
    #[track_caller]
    fn through_commands(d: &Daemon, echo: &EchoDevice) -> Held {
        let (mut c, _) = d.client();
        conn_ok(&mut c, &format!("CONN {}", echo.target()));
        Held::new(c)
    }

    #[track_caller]
    fn new(c: Client) -> Held {
        let mut h = Held { c, round: 0 };
        h.check();
        h
    }

    #[track_caller]
    fn check(&mut self) {
        self.round += 1;
        let data = payload(4096, self.round);
        self.c.send(&data);
        let got = self.c.read_n(data.len(), dur(5_000));
        assert_eq!(
            fnv1a(&got),
            fnv1a(&data),
            "round {}: the echo came back different",
            self.round
        );
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Lines of the log saying `listening on 127.0.0.1:<port> (...)`.
fn listening_lines(d: &Daemon, port: u16) -> usize {
    d.log_count(|l| parse_listening(l).is_some_and(|(a, _)| a.port() == port))
}

#[track_caller]
fn expect_refused(addr: SocketAddr) {
    match TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("connect to {addr}: expected 'connection refused', got {other:?}"),
    }
}

#[test]
fn a_direct_listener_added_relays_and_one_removed_refuses() {
    let luup = FakeLuup::start();
    let (echo1, echo2) = (EchoDevice::start(), EchoDevice::start());
    let (p1, p2) = (free_port(), free_port());
    let one = format!("[direct]\n{p1}=CONN {}\n", echo1.target());
    let (args, ini) = args_with_ini(&luup.url(), "reload.ini", &one);
    let d = Daemon::start_args(&args);
    assert_eq!(d.direct_addr(&echo1.target()), local(p1));
    let mut held = Held::through_commands(&d, &echo1);
    let mut direct1 = Held::new(Client::connect(local(p1)));
    // Before the reload nothing listens on p2.
    expect_refused(local(p2));

    let both = format!("{one}{p2}=CONN {}\n", echo2.target());
    let outcome = reload(&d, &ini, &both);
    assert_reloaded(&outcome);
    assert!(
        outcome.contains("3 listeners (1 opened, 0 closed"),
        "{outcome}"
    );
    assert_eq!(d.direct_addr(&echo2.target()), local(p2));
    Held::new(Client::connect(local(p2)));
    assert_eq!(echo2.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The others were kept, not bound again.
    assert_eq!(listening_lines(&d, p1), 1, "p1 announced again");
    assert_eq!(
        listening_lines(&d, d.port()),
        1,
        "command port announced again"
    );
    held.check();
    direct1.check();

    let two = format!("[direct]\n{p2}=CONN {}\n", echo2.target());
    let outcome = reload(&d, &ini, &two);
    assert_reloaded(&outcome);
    assert!(
        outcome.contains("2 listeners (0 opened, 1 closed"),
        "{outcome}"
    );
    d.wait_log(dur(2_000), "the closed listener", |l| {
        l.contains(&format!(
            "closed listener 127.0.0.1:{p1} (direct to {})",
            echo1.target()
        ))
    });
    expect_refused(local(p1));
    // Accepted on p1 before it closed: still relaying.
    direct1.check();
    held.check();
    Held::new(Client::connect(local(p2)));
    assert_eq!(listening_lines(&d, p2), 1, "p2 announced again");
}

#[test]
fn a_changed_direct_target_takes_over_the_port_for_new_connections() {
    let luup = FakeLuup::start();
    let (echo1, dev2) = (EchoDevice::start(), Device::listen());
    let p = free_port();
    let (args, ini) = args_with_ini(
        &luup.url(),
        "retarget.ini",
        &format!("[direct]\n{p}=CONN {}\n", echo1.target()),
    );
    let d = Daemon::start_args(&args);
    let mut old = Held::new(Client::connect(local(p)));
    let outcome = reload(&d, &ini, &format!("[direct]\n{p}=CONN {}\n", dev2.target()));
    assert!(
        outcome.contains("(0 opened, 0 closed, 1 retargeted)"),
        "{outcome}"
    );
    assert_eq!(d.direct_addr(&dev2.target()), local(p));
    let mut c = Client::connect(local(p));
    let mut r = Client::from_stream(dev2.accept());
    c.send(b"to the new target");
    assert_eq!(r.read_n(17, dur(5_000)), b"to the new target");
    old.check();
}

#[test]
fn a_tightened_allow_list_refuses_new_clients_only() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    let (args, ini) = args_with_ini(&luup.url(), "allow.ini", "[host]\nallow=127.0.0.0/8\n");
    let d = Daemon::start_args(&args);
    let mut from_other = Client::connect_from(OTHER_HOST, d.addr);
    from_other.greet();
    conn_ok(&mut from_other, &format!("CONN {}", echo.target()));
    let mut from_other = Held::new(from_other);
    let mut held = Held::through_commands(&d, &echo);

    assert_reloaded(&reload(&d, &ini, "[host]\nallow=127.0.0.1\n"));
    let mut refused = Client::connect_from(OTHER_HOST, d.addr);
    refused.expect_silent_close(dur(5_000));
    d.wait_log(dur(2_000), "the refusal", |l| {
        l.contains("not in allow=127.0.0.1") && l.contains("127.0.0.2:")
    });
    // Established before: unaffected.
    from_other.check();
    held.check();
    let (_c, _) = d.client();

    // And loosened again.
    assert_reloaded(&reload(&d, &ini, "[host]\nallow=127.0.0.0/8\n"));
    Client::connect_from(OTHER_HOST, d.addr).greet();
    from_other.check();
}

#[test]
fn a_file_that_does_not_parse_changes_nothing_and_says_why_once() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    let p = free_port();
    let good = format!(
        "[host]\nallow=127.0.0.1\n[direct]\n{p}=CONN {}\n",
        echo.target()
    );
    let (args, ini) = args_with_ini(&luup.url(), "bad.ini", &good);
    let d = Daemon::start_args(&args);
    let mut held = Held::through_commands(&d, &echo);
    let mut direct = Held::new(Client::connect(local(p)));

    let fixed = format!(
        "[host]\nallow=127.0.0.0/8\n[direct]\n{p}=CONN {}\n",
        echo.target()
    );
    let bad = format!("{fixed}[host]\nport=x\n");
    let outcome = reload(&d, &ini, &bad);
    assert!(
        outcome.contains("SIGHUP: configuration not reloaded, the running one stays: ")
            && outcome.ends_with("line 6: bad port \"x\""),
        "{outcome}"
    );
    assert!(outcome.contains("WARN"), "{outcome}");
    assert_eq!(
        d.log_count(|l| l.contains("bad port")),
        1,
        "one line says why"
    );
    // The old settings: allow=127.0.0.1 still refuses 127.0.0.2.
    Client::connect_from(OTHER_HOST, d.addr).expect_silent_close(dur(5_000));
    held.check();
    direct.check();
    Held::new(Client::connect(local(p)));
    let (_c, _) = d.client();
    assert_eq!(d.log_count(|l| l.contains("closed listener")), 0);
    assert_eq!(listening_lines(&d, p), 1);

    // A file that has gone.
    std::fs::remove_file(&ini.path).expect("remove");
    d.signal(libc::SIGHUP);
    let gone = d.wait_log(dur(5_000), "the missing file", |l| {
        l.contains("not reloaded") && l.contains("config: cannot read ")
    });
    assert!(gone.contains(&ini.arg()), "{gone}");
    held.check();

    // Fixed: applied.
    let outcome = reload(&d, &ini, &fixed);
    assert_reloaded(&outcome);
    Client::connect_from(OTHER_HOST, d.addr).greet();
    held.check();
    direct.check();
    assert_eq!(d.log_count(|l| l.contains("not reloaded")), 2);
}

#[test]
fn a_port_that_cannot_be_bound_refuses_the_whole_reload() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    let (args, ini) = args_with_ini(&luup.url(), "busy.ini", "[host]\nallow=127.0.0.1\n");
    let d = Daemon::start_args(&args);
    let mut held = Held::through_commands(&d, &echo);
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = other.local_addr().expect("addr").port();
    let free = free_port();
    let text = format!(
        "[host]\nallow=127.0.0.0/8\n[direct]\n{free}=CONN {e}\n{busy}=CONN {e}\n",
        e = echo.target()
    );
    let outcome = reload(&d, &ini, &text);
    assert!(
        outcome.contains("not reloaded")
            && outcome.contains(&format!("cannot listen on 127.0.0.1:{busy}: ")),
        "{outcome}"
    );
    // Nothing of it applied: not the other listener, not the allow= list.
    expect_refused(local(free));
    Client::connect_from(OTHER_HOST, d.addr).expect_silent_close(dur(5_000));
    held.check();
    drop(other);
    assert_reloaded(&reload(&d, &ini, &text));
    Held::new(Client::connect(local(busy)));
    Held::new(Client::connect(local(free)));
    Client::connect_from(OTHER_HOST, d.addr).greet();
    held.check();
}

#[test]
fn the_command_port_moves_and_a_new_ip_rebinds() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    let (p, q) = (free_port(), free_port());
    let (args, ini) = args_with_ini(&luup.url(), "port.ini", &format!("[host]\nport={p}\n"));
    let d = Daemon::start_args(&args);
    assert_eq!(d.port(), p);
    let mut held = Held::through_commands(&d, &echo);
    // A command connection that has not sent CONN yet stays too.
    let (mut idle, _) = d.client();

    assert_reloaded(&reload(&d, &ini, &format!("[host]\nport={q}\n")));
    d.wait_log(dur(2_000), "the new command port", |l| {
        l.contains(&format!("listening on 127.0.0.1:{q} (commands)"))
    });
    expect_refused(local(p));
    Client::connect(local(q)).greet();
    held.check();
    assert_eq!(
        d.warnings()
            .iter()
            .filter(|l| l.contains("open relay"))
            .count(),
        0
    );

    // Every interface, the same port: bound once the loopback one is closed. Beyond
    // loopback with no allow=: the open-relay warning.
    assert_reloaded(&reload(&d, &ini, &format!("[host]\nport={q}\nip=*\n")));
    d.wait_log(dur(2_000), "the wildcard command port", |l| {
        l.contains(&format!("listening on 0.0.0.0:{q} (commands)"))
    });
    Client::connect(SocketAddr::from((OTHER_HOST, q))).greet();
    assert_eq!(
        d.warnings()
            .iter()
            .filter(|l| l.contains("open relay"))
            .count(),
        1
    );
    held.check();
    // And back to loopback only (the wildcard closed first, then the port bound).
    assert_reloaded(&reload(&d, &ini, &format!("[host]\nport={q}\n")));
    d.wait_log(dur(2_000), "the loopback command port again", |l| {
        l.contains(&format!("closed listener 0.0.0.0:{q} (commands)"))
    });
    Client::connect(local(q)).greet();
    expect_refused(SocketAddr::from((OTHER_HOST, q)));
    assert_eq!(listening_lines(&d, q), 3);
    held.check();
    idle.send(b"STAT\n");
    assert!(idle.line().trim_start().starts_with("ID "), "STAT header");
}

#[test]
fn new_connections_notify_the_new_luup_established_ones_the_old() {
    let (luup1, luup2) = (FakeLuup::start(), FakeLuup::start());
    let dev = Device::listen();
    let (args, ini) = args_with_ini(&luup1.url(), "vera.ini", "");
    let d = Daemon::start_args(&args);
    let (mut old, mut old_r) = through(&d, &dev, "NTFY=3/urn:x:serviceId:Y1/Act/old");
    old_r.send(b"1");
    luup1.wait_pid("old", 1, dur(5_000));
    assert_eq!(old.read_n(1, dur(5_000)), b"1");

    let outcome = reload(&d, &ini, &format!("[host]\nvera={}\n", luup2.url()));
    assert!(
        outcome.contains(&format!("notifying {}", luup2.url())),
        "{outcome}"
    );
    let (mut new, mut new_r) = through(&d, &dev, "NTFY=3/urn:x:serviceId:Y1/Act/new");
    new_r.send(b"2");
    luup2.wait_pid("new", 1, dur(5_000));
    assert_eq!(new.read_n(1, dur(5_000)), b"2");
    old_r.send(b"3");
    luup1.wait_pid("old", 2, dur(5_000));
    assert_eq!(old.read_n(1, dur(5_000)), b"3");
    assert!(
        luup2.for_pid("old").is_empty(),
        "an established connection changed Luup"
    );
    assert!(
        luup1.for_pid("new").is_empty(),
        "a new connection notified the old Luup"
    );
}

#[test]
fn debug_lines_follow_the_debug_setting() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    // The usual arguments have -D; the file, read after it, turns it off.
    let (args, ini) = args_with_ini(&luup.url(), "debug.ini", "[host]\ndebug=0\n");
    let d = Daemon::start_args(&args);
    let mut held = Held::through_commands(&d, &echo);
    let accepted = |id: &str| d.log_count(|l| l.contains(&format!("{id}: accepted from")));
    // The log comes through a pipe read by another thread: an INFO line logged after
    // the client's accept (a reload with the file as it is), once seen, says that
    // the accept's DEBUG line would have been seen too.
    let settled = |text: &str| assert_reloaded(&reload(&d, &ini, text));
    let (_c, id) = d.client();
    settled("[host]\ndebug=0\n");
    assert_eq!(accepted(&id), 0, "a debug line with debug=0");

    settled("[host]\ndebug=1\n");
    let (_c, id) = d.client();
    d.wait_log(dur(5_000), "the accept's debug line after debug=1", |l| {
        l.contains(&format!("{id}: accepted from"))
    });
    held.check();

    settled("[host]\ndebug=0\n");
    let debug_lines = d.log_count(|l| l.contains("DEBUG"));
    let (_c, id) = d.client();
    held.check();
    settled("[host]\ndebug=0\n");
    assert_eq!(accepted(&id), 0, "a debug line after debug=0 again");
    assert_eq!(d.log_count(|l| l.contains("DEBUG")), debug_lines);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn the_log_moves_to_another_file_and_back_to_stderr() {
    let luup = FakeLuup::start();
    let echo = EchoDevice::start();
    let scratch = ScratchFile::new("logs", "");
    let dir = scratch.path.parent().expect("dir").to_path_buf();
    let (a, b) = (dir.join("a.log"), dir.join("b.log"));
    let ini = ScratchFile::new("log.ini", &format!("[host]\nlog={}\n", s(&a)));
    let mut args = std_args(&luup.url());
    args.extend(["-c".into(), ini.arg()]);
    let d = Daemon::spawn(&args, Some(&a)).unwrap_or_else(|f| panic!("no start: {f:?}"));
    let mut held = Held::through_commands(&d, &echo);
    let in_a = || read(&a).lines().map(str::to_string).collect::<Vec<_>>();
    let in_b = || read(&b).lines().map(str::to_string).collect::<Vec<_>>();

    let outcome = reload_with(&d, &ini, &format!("[host]\nlog={}\n", s(&b)), in_b);
    assert_reloaded(&outcome);
    assert!(read(&b).contains(&format!("the log continued from {}", s(&a))));
    let a_text = read(&a);
    assert!(
        a_text
            .trim_end()
            .ends_with(&format!("the log continues in {}", s(&b))),
        "a.log goes on after the switch:\n{a_text}"
    );
    let (_c, id) = d.client();
    held.check();
    wait_until(dur(2_000), "the new client in b.log", || {
        read(&b).contains(&id)
    });
    assert_eq!(read(&a), a_text, "a.log written to after the switch");

    // Rotated and reloaded with the same path: reopened, as before.
    let rotated = dir.join("b.log.1");
    std::fs::rename(&b, &rotated).expect("rotate");
    let outcome = reload_with(&d, &ini, &format!("[host]\nlog={}\n", s(&b)), in_b);
    assert_reloaded(&outcome);
    assert!(read(&b).contains(&format!("log file {} reopened", s(&b))));

    // Back to stderr (log=- as -L - says).
    let stderr_lines = || {
        let file = in_a();
        let mut all = d.log_lines();
        all.truncate(all.len() - file.len());
        all
    };
    let before_b = read(&b);
    let outcome = reload_with(&d, &ini, "[host]\nlog=-\n", stderr_lines);
    assert_reloaded(&outcome);
    assert!(before_b.len() < read(&b).len(), "b.log not told");
    assert!(read(&b).contains("the log continues in stderr"));
    let (_c, id) = d.client();
    wait_until(dur(2_000), "the new client on stderr", || {
        stderr_lines().iter().any(|l| l.contains(&id))
    });
    assert!(!read(&b).contains(&id), "b.log written to after the switch");
    held.check();
    // A log file that cannot be opened: refused, the log stays on stderr.
    let outcome = reload_with(
        &d,
        &ini,
        "[host]\nlog=/nonexistent/dir/x.log\nallow=127.0.0.1\n",
        stderr_lines,
    );
    assert!(
        outcome.contains("not reloaded")
            && outcome.contains("cannot open log file /nonexistent/dir/x.log"),
        "{outcome}"
    );
    Client::connect_from(OTHER_HOST, d.addr).greet();
    held.check();
}
