//! Command line and INI file: exit codes, override order, INI syntax, `[direct]`
//! listeners, the log destination (PROTOCOL.md "Configuration", "Listening").

use crate::util::*;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

/// A scratch directory for config and log files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!(
            "sockproxyd-test-{}-{name}-{}",
            std::process::id(),
            fnv1a(format!("{:?}", std::time::Instant::now()).as_bytes()) & 0xffff_ffff
        ));
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p.to_string_lossy().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Checks the exit code of a run; `what` heads the failure message, with the output.
#[track_caller]
fn assert_exit(o: &std::process::Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}; output:\n{}", text(o));
}

#[test]
fn bad_command_line_exits_2_with_usage() {
    for a in [
        &["-x"][..],
        &["--bogus"],
        &["-p"],
        &["-c"],
        &["-a", "127.0.0.1", "-N"],
        &["-Q", "-p", "0"],
    ] {
        let o = run_to_exit(a, dur(5_000));
        assert_exit(&o, 2, &format!("exit code for {a:?}"));
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        assert!(
            err.contains("usage"),
            "stderr for {a:?} shows no usage:\n{err}"
        );
    }
}

#[test]
fn help_and_version_exit_0() {
    for a in ["-h", "--help"] {
        let o = run_to_exit(&[a], dur(5_000));
        assert_exit(&o, 0, &format!("exit code for {a}"));
        let t = text(&o);
        for opt in ["-c", "-a", "-p", "-L", "-N", "-D"] {
            assert!(t.contains(opt), "{a} output does not mention {opt}:\n{t}");
        }
    }
    let o = run_to_exit(&["--version"], dur(5_000));
    assert_exit(&o, 0, "--version exit code");
    assert!(
        text(&o).bytes().any(|b| b.is_ascii_digit()),
        "--version printed no version: {:?}",
        text(&o)
    );
}

#[test]
fn port_in_use_exits_1_with_a_clear_line() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port().to_string();
    let o = run_to_exit(
        &["-a", "127.0.0.1", "-p", &port, "-N", "http://127.0.0.1:9"],
        dur(10_000),
    );
    assert_exit(&o, 1, &format!("exit code with port {port} in use"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains(&port) || l.to_lowercase().contains("in use")),
        "no stderr line names port {port} or says 'in use':\n{err}"
    );
    assert!(
        !err.contains("(commands)"),
        "it reported itself ready first:\n{err}"
    );

    // The same for a [direct] listener's port.
    let s = Scratch::new("busydirect");
    let cfg = s.file("busy.ini", &format!("[direct]\n{port}=CONN 127.0.0.1:9\n"));
    let o = run_to_exit(
        &[
            "-a",
            "127.0.0.1",
            "-p",
            "0",
            "-N",
            "http://127.0.0.1:9",
            "-c",
            &cfg,
        ],
        dur(10_000),
    );
    assert_exit(
        &o,
        1,
        &format!("exit code with [direct] port {port} in use"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains(&port) || l.to_lowercase().contains("in use")),
        "no stderr line names port {port} or says 'in use':\n{err}"
    );
}

#[test]
fn bad_address_exits_non_zero_with_a_clear_line() {
    // A well-formed address the machine does not have: a startup failure, exit 1.
    let o = run_to_exit(
        &["-a", "192.0.2.1", "-p", "0", "-N", "http://127.0.0.1:9"],
        dur(10_000),
    );
    assert_exit(&o, 1, "exit code for -a 192.0.2.1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("192.0.2.1"),
        "no stderr line names the address:\n{err}"
    );
    assert!(
        !err.contains("(commands)"),
        "it reported itself ready first:\n{err}"
    );
    // Not an address at all: either a startup failure (1) or a bad option value (2).
    let o = run_to_exit(
        &["-a", "999.1.1.1", "-p", "0", "-N", "http://127.0.0.1:9"],
        dur(10_000),
    );
    assert!(
        matches!(o.status.code(), Some(1 | 2)),
        "exit code for -a 999.1.1.1; output:\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines().next().is_some_and(|l| l.contains("999.1.1.1")),
        "first stderr line does not name the address:\n{err}"
    );
}

#[test]
fn unreadable_or_garbage_config_exits_1() {
    let s = Scratch::new("badcfg");
    let missing = s.path("missing.ini").to_string_lossy().to_string();
    let dir = s.0.to_string_lossy().to_string();
    let badport = s.file("badport.ini", "[host]\nport=notaport\n");
    let bigport = s.file("bigport.ini", "[host]\nport=70000\n");
    let baddirect = s.file("baddirect.ini", "[direct]\nnotaport=CONN 127.0.0.1:1\n");
    let badip = s.file("badip.ini", "[host]\nip=999.1.1.1\n");
    for f in [&missing, &dir, &badport, &bigport, &baddirect, &badip] {
        let o = run_to_exit(&["-a", "127.0.0.1", "-p", "0", "-c", f], dur(10_000));
        assert_exit(&o, 1, &format!("exit code for config {f}"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.trim().is_empty(), "nothing on stderr for config {f}");
        assert!(
            !err.contains("(commands)"),
            "ready before failing on {f}:\n{err}"
        );
    }
}

#[test]
fn command_line_and_config_apply_left_to_right() {
    let s = Scratch::new("order");
    let luup = FakeLuup::start();
    let fport = free_port();
    let cfg = s.file(
        "order.ini",
        &format!("[host]\nip=127.0.0.2\nport={fport}\nvera={}\n", luup.url()),
    );
    // -c first: the later -a/-p/-N win.
    let d = Daemon::start_args(&args(&[
        "-c",
        &cfg,
        "-a",
        "127.0.0.1",
        "-p",
        "0",
        "-N",
        "http://127.0.0.1:9",
        "-D",
    ]));
    assert_eq!(d.addr.ip().to_string(), "127.0.0.1", "-a after -c must win");
    assert_ne!(d.port(), fport, "-p 0 after -c must win");
    d.client();
    drop(d);

    // -c last: the file wins (address, port and vera).
    let d = match Daemon::spawn(
        &args(&[
            "-a",
            "127.0.0.1",
            "-p",
            "0",
            "-N",
            "http://127.0.0.1:9",
            "-D",
            "-c",
            &cfg,
        ]),
        None,
    ) {
        Ok(d) => d,
        Err(f) if f.log.iter().any(|l| l.contains("127.0.0.2")) && f.status.is_some() => {
            panic!(
                "could not bind 127.0.0.2:{fport} (port taken meanwhile?); log:\n{}",
                f.log.join("\n")
            )
        }
        Err(f) => panic!("daemon did not start: {f:?}"),
    };
    assert_eq!(
        d.addr,
        SocketAddr::from(([127, 0, 0, 2], fport)),
        "the file's ip/port after -a/-p"
    );
    let dev = Device::listen();
    let (mut c, id) = d.client();
    conn_ok(&mut c, &format!("CONN {} NTFY=5", dev.target()));
    let mut r = Client::from_stream(dev.accept());
    r.send(b"x");
    luup.wait_pid(&id, 1, dur(5_000)); // vera= from the file beat -N
}

#[test]
fn dash_v_is_an_alias_of_dash_n() {
    let luup = FakeLuup::start();
    let d = Daemon::start_args(&args(&["-a", "127.0.0.1", "-p", "0", "-V", &luup.url()]));
    let dev = Device::listen();
    let (mut c, id) = d.client();
    conn_ok(&mut c, &format!("CONN {} NTFY=5", dev.target()));
    let mut r = Client::from_stream(dev.accept());
    r.send(b"x");
    luup.wait_pid(&id, 1, dur(5_000));
}

#[test]
fn ini_comments_case_blanks_and_bare_debug() {
    let s = Scratch::new("ini");
    let luup = FakeLuup::start();
    let dev = Device::listen();
    let dport = free_port();
    let cfg = s.file(
        "case.ini",
        &format!(
            "; sockproxyd test configuration\n\
             ;port=1\n\
             \n\
             [HOST]\n\
             \x20 IP = 127.0.0.1  \n\
             Port=0\n\
             VERA = {}\n\
             ; debug=false would be a comment\n\
             Debug\n\
             \n\
             [Direct]\n\
             {dport} = CONN {} NTFY=5/urn:x:serviceId:Y1/HandleReceive\n",
            luup.url(),
            dev.target()
        ),
    );
    let d = Daemon::start_args(&args(&["-c", &cfg]));
    assert_eq!(d.addr.ip().to_string(), "127.0.0.1", "IP from [HOST]");
    let direct = d.direct_addr(&dev.target());
    assert_eq!(
        direct,
        SocketAddr::from(([127, 0, 0, 1], dport)),
        "[Direct] listener"
    );
    // Bare `Debug` turned debug logging on: routine events are logged at debug.
    let (c, _) = d.client();
    drop(c);
    d.wait_log(dur(5_000), "a [DEBUG] line", |l| l.contains("DEBUG"));
    // VERA from the file: the direct connection notifies the fake Luup.
    let mut c = Client::connect(direct);
    let mut r = Client::from_stream(dev.accept());
    r.send(b"hi");
    assert_eq!(c.read_n(2, dur(5_000)), b"hi");
    let n = luup.wait_for(1, dur(5_000), "from the direct listener", |_| true);
    assert_eq!(n[0].param("DeviceNum").as_deref(), Some("5"));
    assert_eq!(n[0].param("action").as_deref(), Some("HandleReceive"));
}

#[test]
fn no_debug_lines_without_debug() {
    let luup = FakeLuup::start();
    let d = Daemon::start_args(&args(&["-a", "127.0.0.1", "-p", "0", "-N", &luup.url()]));
    for _ in 0..3 {
        let (c, _) = d.client();
        drop(c);
    }
    d.stat();
    holds_for(
        Duration::from_millis(300),
        "no [DEBUG] lines without -D",
        || d.log_lines().iter().all(|l| !l.contains("[DEBUG]")),
    );
}

#[test]
fn unknown_ini_key_is_a_warning() {
    let s = Scratch::new("unknown");
    let cfg = s.file("unknown.ini", "[host]\nip=127.0.0.1\nport=0\nbogus_key=1\n");
    let d = Daemon::start_args(&args(&["-c", &cfg, "-N", "http://127.0.0.1:9"]));
    d.wait_log(dur(5_000), "a warning naming bogus_key", |l| {
        l.contains("WARN") && l.to_lowercase().contains("bogus_key")
    });
    d.client();
}

#[test]
fn direct_listeners_connect_at_once_without_greeting() {
    let s = Scratch::new("direct");
    let luup = FakeLuup::start();
    let dev1 = Device::listen();
    let dev2 = Device::listen();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let closed = format!("127.0.0.1:{}", free_port());
    let cfg = s.file(
        "direct.ini",
        &format!(
            "[direct]\n{p1}=CONN {} NTFY=5/urn:x:serviceId:Y1/HandleReceive\n{p2}={} RTIM=0\n{p3}=CONN {closed}\n",
            dev1.target(),
            dev2.target()
        ),
    );
    let mut a = std_args(&luup.url());
    a.extend(args(&["-c", &cfg]));
    let d = Daemon::start_args(&a);
    let l1 = d.direct_addr(&dev1.target());
    let l2 = d.direct_addr(&dev2.target());
    assert_eq!(l1.port(), p1);
    assert_eq!(l2.port(), p2);

    // Entry 1 ("CONN " prefix, with NTFY).
    let mut c = Client::connect(l1);
    let mut r = Client::from_stream(dev1.accept());
    assert_eq!(
        c.quiet_for(Duration::from_millis(300)),
        Ok(()),
        "a direct connection got a greeting"
    );
    let up = payload(100_000, 11);
    c.send(&up);
    assert_eq!(
        fnv1a(&r.read_n(up.len(), dur(10_000))),
        fnv1a(&up),
        "client to device"
    );
    let down = payload(100_000, 12);
    r.send(&down);
    assert_eq!(
        fnv1a(&c.read_n(down.len(), dur(10_000))),
        fnv1a(&down),
        "device to client"
    );
    let n = luup.wait_for(1, dur(5_000), "from direct entry 1", |_| true);
    assert_eq!(n[0].param("DeviceNum").as_deref(), Some("5"));
    assert_eq!(
        n[0].param("serviceId").as_deref(),
        Some("urn:x:serviceId:Y1")
    );
    assert_eq!(n[0].param("action").as_deref(), Some("HandleReceive"));
    let pid = n[0].param("Pid").unwrap_or_default();
    assert!(
        pid.starts_with('L'),
        "direct connection id {pid:?} should start with 'L'"
    );

    // STAT lists it in echo mode with its remote.
    let st = d.stat();
    let row = st
        .row(&pid)
        .unwrap_or_else(|| panic!("direct connection {pid} not in STAT:\n{}", st.text));
    assert_eq!(row.state(), "2", "{:?}", row.raw);
    assert!(row.raw.contains(&dev1.target()), "{:?}", row.raw);

    // Entry 2 (no prefix, no NTFY).
    let mut c2 = Client::connect(l2);
    let mut r2 = Client::from_stream(dev2.accept());
    c2.send(b"two");
    assert_eq!(r2.read_n(3, dur(5_000)), b"two");
    r2.send(b"owt");
    assert_eq!(c2.read_n(3, dur(5_000)), b"owt");
    // And the listener keeps accepting.
    let _c3 = Client::connect(l2);
    let _r3 = dev2.accept();

    // Entry 3: the remote refuses; nobody to tell, the client is just closed.
    let l3 = d.direct_addr(&closed);
    assert_eq!(l3.port(), p3);
    let mut c4 = Client::connect(l3);
    c4.expect_eof(dur(7_000));
}

/// Runs the daemon on 127.0.0.1 with `extra` arguments after `-c <ini>` and expects it
/// to exit 1 before getting ready; returns the first stderr line.
#[track_caller]
fn refused_at_start(ini: &str, extra: &[&str]) -> String {
    let s = Scratch::new("refused");
    let cfg = s.file("refused.ini", ini);
    let mut a = vec![
        "-a",
        "127.0.0.1",
        "-p",
        "0",
        "-N",
        "http://127.0.0.1:9",
        "-c",
    ];
    a.push(&cfg);
    a.extend_from_slice(extra);
    let o = run_to_exit(&a, dur(10_000));
    assert_exit(&o, 1, &format!("exit code for {ini:?} then {extra:?}"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("(commands)"),
        "ready before failing on {ini:?}:\n{err}"
    );
    err.lines().next().unwrap_or("").to_string()
}

#[test]
fn direct_udp_with_blks_above_a_datagram_is_a_config_error() {
    // Issue 13: PRTO=udp caps BLKS at 65507, the largest UDP payload.
    let first = refused_at_start(
        "[direct]\n; udp\n9100=CONN 127.0.0.1:9 PRTO=udp BLKS=65508\n",
        &[],
    );
    assert!(
        first.contains("line 3") && first.contains("[direct] 9100") && first.contains("65507"),
        "the first stderr line should name line 3, the entry and the limit: {first:?}"
    );
    // The limit itself is fine (the daemon starts and serves).
    let s = Scratch::new("udpok");
    let cfg = s.file(
        "ok.ini",
        &format!(
            "[direct]\n{}=CONN 127.0.0.1:9 PRTO=udp BLKS=65507\n",
            free_port()
        ),
    );
    let mut a = std_args("http://127.0.0.1:9");
    a.extend(args(&["-c", &cfg]));
    let d = Daemon::start_args(&a);
    d.direct_addr("127.0.0.1:9");
}

#[test]
fn direct_entry_pointing_at_our_own_port_is_a_config_error() {
    // Issue 13: a [direct] entry that relays to one of our own listeners hands its
    // client a connection from loopback (STOP, allow= and connect_to= see loopback).
    let (cmd, d1, d2) = (free_port(), free_port(), free_port());
    let cmd_s = cmd.to_string();
    for (ini, extra, own) in [
        // The command port, set on the command line after the file.
        (
            format!("[direct]\n; self\n{d1}=CONN 127.0.0.1:{cmd}\n"),
            vec!["-p", &cmd_s],
            cmd,
        ),
        // The same, set in the file after the entry, by name.
        (
            format!("[direct]\n\n{d1}=localhost:{cmd}\n[host]\nport={cmd}\n"),
            vec![],
            cmd,
        ),
        // Another [direct] port, written further down; 0.0.0.0 reaches 127.0.0.1.
        (
            format!("[direct]\n\n{d1}=CONN 0.0.0.0:{d2}\n{d2}=127.0.0.1:9\n"),
            vec![],
            d2,
        ),
        // Itself, through an IPv4-mapped address.
        (
            format!("[direct]\n\n{d1}=CONN [::ffff:127.0.0.1]:{d1}\n"),
            vec![],
            d1,
        ),
    ] {
        let first = refused_at_start(&ini, &extra);
        assert!(
            first.contains("line 3")
                && first.contains(&format!("[direct] {d1}"))
                && first.contains(&format!("our own port {own}")),
            "for {ini:?} then {extra:?}, the first stderr line should name line 3, \
             [direct] {d1} and our own port {own}: {first:?}"
        );
    }
    // Another loopback address with our port number is not us: 127.0.0.1 only.
    let s = Scratch::new("notself");
    let cfg = s.file("ok.ini", &format!("[direct]\n{d1}=CONN 127.0.0.2:{cmd}\n"));
    let a = args(&[
        "-a",
        "127.0.0.1",
        "-p",
        &cmd_s,
        "-N",
        "http://127.0.0.1:9",
        "-c",
        &cfg,
    ]);
    let d = Daemon::start_args(&a);
    d.direct_addr(&format!("127.0.0.2:{cmd}"));
}

#[test]
fn log_file_from_option_and_ini() {
    let s = Scratch::new("logfile");
    let log1 = s.path("opt.log");
    let d = Daemon::spawn(
        &args(&[
            "-a",
            "127.0.0.1",
            "-p",
            "0",
            "-N",
            "http://127.0.0.1:9",
            "-L",
            &log1.to_string_lossy(),
        ]),
        Some(&log1),
    )
    .unwrap_or_else(|f| panic!("did not start with -L: {f:?}"));
    let text = std::fs::read_to_string(&log1).expect("log file from -L");
    assert!(
        text.contains("(commands)"),
        "log file lacks the listening line:\n{text}"
    );
    d.client();
    drop(d);

    let log2 = s.path("ini.log");
    let cfg = s.file(
        "log.ini",
        &format!(
            "[host]\nip=127.0.0.1\nport=0\nlog={}\n",
            log2.to_string_lossy()
        ),
    );
    let d = Daemon::spawn(
        &args(&["-c", &cfg, "-N", "http://127.0.0.1:9"]),
        Some(&log2),
    )
    .unwrap_or_else(|f| panic!("did not start with log= in the file: {f:?}"));
    let text = std::fs::read_to_string(&log2).expect("log file from log=");
    assert!(
        text.contains("(commands)"),
        "log file lacks the listening line:\n{text}"
    );
    d.client();
}

/// The open-relay warnings in `d`'s log so far.
fn open_relay_warnings(d: &Daemon) -> Vec<String> {
    let mut w = d.warnings();
    w.retain(|l| l.contains("open relay"));
    w
}

#[test]
fn listening_beyond_loopback_without_allow_warns_once() {
    let s = Scratch::new("open-relay");
    // Beyond loopback with no allow= list: one WARN line naming both ways to close it.
    // connect_to= keeps the test's own daemon from relaying anywhere real meanwhile
    // (it does not silence the warning: anyone could still reach it and call Luup).
    let cfg = s.file("open.ini", "[host]\nconnect_to=127.0.0.1:9\nstop_from=\n");
    let d = Daemon::start_args(&args(&[
        "-c",
        &cfg,
        "-a",
        "0.0.0.0",
        "-p",
        "0",
        "-N",
        "http://127.0.0.1:9",
    ]));
    d.wait_log(dur(5_000), "the ready line", |l| l.contains(" ready;"));
    let w = open_relay_warnings(&d);
    assert_eq!(
        w.len(),
        1,
        "want one open-relay warning, log:\n{:#?}",
        d.log_lines()
    );
    for want in ["0.0.0.0", "allow=", "[host]", "-a 127.0.0.1"] {
        assert!(w[0].contains(want), "no {want:?} in the warning: {}", w[0]);
    }
    drop(d);

    // Loopback: nothing to warn about.
    let d = Daemon::start_args(&args(&[
        "-a",
        "127.0.0.1",
        "-p",
        "0",
        "-N",
        "http://127.0.0.1:9",
    ]));
    d.wait_log(dur(5_000), "the ready line", |l| l.contains(" ready;"));
    assert_eq!(open_relay_warnings(&d), Vec::<String>::new(), "on loopback");
    drop(d);

    // Beyond loopback with an allow= list: the operator has restricted it.
    let cfg = s.file("allow.ini", "[host]\nip=0.0.0.0\nport=0\nallow=127.0.0.1\n");
    let d = Daemon::start_args(&args(&["-c", &cfg, "-N", "http://127.0.0.1:9"]));
    d.wait_log(dur(5_000), "the ready line", |l| l.contains(" ready;"));
    assert_eq!(open_relay_warnings(&d), Vec::<String>::new(), "with allow=");
}
