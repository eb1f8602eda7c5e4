//! The init scripts, run for real against the binary with every path in a scratch
//! directory, as root or not: `init-script.sh` (SysV/LSB, openLuup hosts) with
//! start-stop-daemon and with its nohup fallback; through a stand-in for OpenWrt's
//! rc.common (`tests/openwrt/rc.common`), the plain Vera script
//! (`openwrt/vera/sockproxyd.init`). The sample configuration file is one the daemon
//! takes without a warning. The OpenWrt procd script and its UCI settings:
//! `openwrt_uci.rs`.
//!
//! Under `SOCKPROXYD_RUNNER` the SysV script gets it as `RUNNER`, and the Vera script
//! a wrapper that execs the runner.

use crate::util::*;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sockproxyd-init-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("create dir");
        }
        fs::write(&p, text).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What a script run printed and how it ended.
struct Ran {
    code: Option<i32>,
    out: String,
}

/// Runs `cmd` with stdout and stderr in a file: the daemon a script starts must not
/// hold a pipe of ours open. Kills it after `timeout`.
#[track_caller]
fn run(mut cmd: Command, dir: &Scratch, timeout: Duration) -> Ran {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out_path = dir.path(&format!("out.{}", N.fetch_add(1, Ordering::SeqCst)));
    let f = File::create(&out_path).expect("output file");
    let f2 = f.try_clone().expect("clone");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (status, timed_out) = wait_within(&mut child, timeout);
    if timed_out {
        panic!(
            "{cmd:?} did not finish within {timeout:?}; it printed:\n{}",
            fs::read_to_string(&out_path).unwrap_or_default()
        );
    }
    Ran {
        code: status.code(),
        out: fs::read_to_string(&out_path).unwrap_or_default(),
    }
}

/// One installed service under test: how to run an action, and its files.
struct Service<'a> {
    what: &'static str,
    dir: &'a Scratch,
    action: Box<dyn Fn(&str) -> Command + 'a>,
    pidfile: PathBuf,
    logfile: PathBuf,
}

impl Service<'_> {
    #[track_caller]
    fn run(&self, action: &str) -> Ran {
        // start waits up to 10 s for readiness, stop up to 15 s for the exit.
        run((self.action)(action), self.dir, dur(40_000))
    }

    #[track_caller]
    fn expect(&self, action: &str, code: i32) -> Ran {
        let r = self.run(action);
        assert_eq!(
            r.code,
            Some(code),
            "{}: `{action}` exit code; it printed:\n{}\nthe log:\n{}",
            self.what,
            r.out,
            self.log()
        );
        r
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.logfile).unwrap_or_default()
    }

    fn pid(&self) -> Option<i32> {
        fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()
    }
}

impl Drop for Service<'_> {
    fn drop(&mut self) {
        // A failed test must not leave its daemon behind.
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid our script started and recorded.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// A `[host]` section listening on 127.0.0.1:`port`.
fn host_ini(port: u16) -> String {
    format!("[host]\nip=127.0.0.1\nport={port}\nvera=http://127.0.0.1:9\n")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// start, status, start again, stop, status, stop again; the port must greet
/// while it runs and be closed once stop returns.
fn lifecycle(svc: &Service, port: u16) {
    let r = svc.expect("start", 0);
    // start returns once the daemon listens: no waiting here.
    let pid = svc
        .pid()
        .unwrap_or_else(|| panic!("{}: no pid file after start: {}", svc.what, r.out));
    let mut c = Client::connect(loopback(port));
    c.greet();

    let r = svc.expect("status", 0);
    assert!(
        r.out.contains("running") && r.out.contains(&pid.to_string()),
        "{}: status says {:?}",
        svc.what,
        r.out
    );

    svc.expect("start", 0);
    assert_eq!(
        svc.pid(),
        Some(pid),
        "{}: a second start changed the pid",
        svc.what
    );
    let mut c2 = Client::connect(loopback(port));
    c2.greet();

    svc.expect("stop", 0);
    assert!(
        !svc.pidfile.exists(),
        "{}: the pid file is still there after stop",
        svc.what
    );
    // stop returns once the daemon is gone: its connections closed, port shut.
    c.expect_eof(dur(2_000));
    c2.expect_eof(dur(2_000));
    assert!(
        TcpStream::connect_timeout(&loopback(port), Duration::from_millis(500)).is_err(),
        "{}: port {port} still accepts after stop",
        svc.what
    );
    assert!(
        svc.log().contains("stopping (SIGTERM)"),
        "{}: the daemon was not stopped with SIGTERM; its log:\n{}",
        svc.what,
        svc.log()
    );

    let r = svc.expect("status", 3);
    assert!(
        r.out.contains("not running"),
        "{}: status says {:?}",
        svc.what,
        r.out
    );
    svc.expect("stop", 0);
}

/// A start that must fail, saying `why` (from the daemon's last log line).
fn start_fails(svc: &Service, why: &str) {
    let r = svc.run("start");
    assert!(
        r.code.is_some_and(|c| c != 0),
        "{}: start succeeded ({:?}) though it should fail with {why:?}; it printed:\n{}",
        svc.what,
        r.code,
        r.out
    );
    assert!(
        r.out.contains(why),
        "{}: a failed start does not show {why:?}; it printed:\n{}\nthe log:\n{}",
        svc.what,
        r.out,
        svc.log()
    );
    assert!(
        !svc.pidfile.exists(),
        "{}: a failed start left its pid file",
        svc.what
    );
    svc.expect("status", 3);
}

// ---------------------------------------------------------------------------------------
// init-script.sh

/// `sh init-script.sh <action>` with everything in `dir`; `ssd` says whether it may
/// use start-stop-daemon. The settings come from the environment when `defaults_file`
/// is false, else from a defaults file (as /etc/default/sockproxyd).
fn sysv<'a>(dir: &'a Scratch, config: &Path, ssd: bool, defaults_file: bool) -> Service<'a> {
    let pidfile = dir.path("run/sockproxyd.pid");
    let logfile = dir.path("log/sockproxyd.log");
    let settings = [
        ("DAEMON", s(&bin_path())),
        ("CONFIG", s(config)),
        ("PIDFILE", s(&pidfile)),
        ("LOGFILE", s(&logfile)),
        ("RUNNER", runner_line()),
        ("START_TIMEOUT", (10 * scale()).to_string()),
        (
            "START_STOP_DAEMON",
            if ssd { "auto" } else { "no" }.to_string(),
        ),
    ];
    let defaults = dir.path("default-sockproxyd");
    if defaults_file {
        let text: String = settings
            .iter()
            .map(|(k, v)| format!("{k}='{v}'\n"))
            .collect();
        dir.write("default-sockproxyd", &text);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    Service {
        what: if ssd {
            "init-script.sh (start-stop-daemon)"
        } else {
            "init-script.sh (nohup)"
        },
        dir,
        action: Box::new(move |action| {
            let mut c = Command::new("sh");
            c.arg(top("init-script.sh"))
                .arg(action)
                .env_clear()
                .env("PATH", &path)
                .env("SOCKPROXYD_DEFAULTS", &defaults);
            if !defaults_file {
                c.envs(settings.iter().map(|(k, v)| (k, v)));
            }
            c
        }),
        pidfile,
        logfile,
    }
}

#[test]
fn sysv_start_status_stop_with_start_stop_daemon() {
    if !have_for_init_scripts("start-stop-daemon") {
        eprintln!("skipping: no start-stop-daemon (the nohup test covers the fallback)");
        return;
    }
    let dir = Scratch::new("ssd");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    lifecycle(&sysv(&dir, &conf, true, false), port);
}

#[test]
fn sysv_start_status_stop_with_nohup() {
    let dir = Scratch::new("nohup");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    lifecycle(&sysv(&dir, &conf, false, false), port);
}

#[test]
fn sysv_settings_from_the_defaults_file() {
    let dir = Scratch::new("defaults");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    lifecycle(&sysv(&dir, &conf, true, true), port);
}

#[test]
fn sysv_start_fails_on_a_bad_config() {
    for ssd in [true, false] {
        let dir = Scratch::new("badconf");
        let conf = dir.write("sockproxyd.conf", "[host]\nport=notaport\n");
        start_fails(&sysv(&dir, &conf, ssd, false), "bad port");
    }
}

#[test]
fn sysv_start_fails_when_the_port_is_in_use() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let dir = Scratch::new("busy");
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    start_fails(&sysv(&dir, &conf, true, false), "in use");
}

#[test]
fn sysv_reload_rereads_the_file_and_keeps_connections() {
    let dir = Scratch::new("reload");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    let svc = sysv(&dir, &conf, false, false);
    let r = svc.expect("reload", 7);
    assert!(r.out.contains("not running"), "{:?}", r.out);
    svc.expect("start", 0);
    let pid = svc.pid();
    let echo = EchoDevice::start();
    let mut c = Client::connect(loopback(port));
    c.greet();
    conn_ok(&mut c, &format!("CONN {}", echo.target()));
    let direct = free_port();
    dir.write(
        "sockproxyd.conf",
        &format!(
            "{}[direct]\n{direct}=CONN {}\n",
            host_ini(port),
            echo.target()
        ),
    );
    svc.expect("reload", 0);
    wait_until(dur(5_000), "the reload in the log", || {
        svc.log().contains("SIGHUP: configuration reloaded")
    });
    assert_eq!(svc.pid(), pid, "reload restarted the daemon");
    let mut d = Client::connect(loopback(direct));
    d.send(b"direct");
    assert_eq!(d.read_n(6, dur(5_000)), b"direct");
    c.send(b"kept");
    assert_eq!(c.read_n(4, dur(5_000)), b"kept");
    // force-reload: a reload while it runs, a start when it does not.
    svc.expect("force-reload", 0);
    wait_until(dur(5_000), "the second reload in the log", || {
        svc.log().matches("SIGHUP: configuration reloaded").count() == 2
    });
    assert_eq!(svc.pid(), pid, "force-reload restarted the daemon");
    c.send(b"still");
    assert_eq!(c.read_n(5, dur(5_000)), b"still");
    svc.expect("stop", 0);
    svc.expect("force-reload", 0);
    assert!(
        svc.pid().is_some_and(|p| Some(p) != pid),
        "force-reload did not start it"
    );
    Client::connect(loopback(direct)).shutdown_write();
    svc.expect("stop", 0);
}

#[test]
fn sysv_unknown_action_exits_2() {
    let dir = Scratch::new("usage");
    let conf = dir.path("none.conf");
    let svc = sysv(&dir, &conf, true, false);
    let r = svc.expect("bogus", 2);
    assert!(r.out.contains("Usage"), "no usage: {:?}", r.out);
}

// ---------------------------------------------------------------------------------------
// OpenWrt and Vera, through tests/openwrt/rc.common

/// `sh tests/openwrt/rc.common <script> <action>` with MOCK_DIR = `dir`.
fn rc_common(shell: &str, dir: &Scratch, script: &str, action: &str) -> Command {
    let mut c = Command::new(shell);
    if shell == "busybox" {
        c.arg("sh");
    }
    c.arg(top("tests/openwrt/rc.common"))
        .arg(top(script))
        .arg(action)
        .env("MOCK_DIR", &dir.0);
    c
}

/// The Vera script with its paths in `dir` (set by the mock's overrides.sh).
fn vera<'a>(dir: &'a Scratch, config: &Path, shell: &'static str) -> Service<'a> {
    let pidfile = dir.path("sockproxyd.pid");
    let logfile = dir.path("sockproxyd.log");
    let prog = if runner_line().is_empty() {
        bin_path()
    } else {
        // PROG is one path: a wrapper named like the binary, which execs the runner.
        let w = dir.write(
            "wrap/sockproxyd",
            &format!(
                "#!/bin/sh\nexec {} '{}' \"$@\"\n",
                runner_line(),
                s(&bin_path())
            ),
        );
        fs::set_permissions(&w, fs::Permissions::from_mode(0o755)).expect("chmod");
        w
    };
    dir.write(
        "overrides.sh",
        &format!(
            "PROG='{}'\nCONFIG='{}'\nPIDFILE='{}'\nLOGFILE='{}'\n",
            s(&prog),
            s(config),
            s(&pidfile),
            s(&logfile)
        ),
    );
    Service {
        what: if shell == "busybox" {
            "vera/sockproxyd.init (busybox ash)"
        } else {
            "vera/sockproxyd.init"
        },
        dir,
        action: Box::new(move |action| {
            rc_common(shell, dir, "openwrt/vera/sockproxyd.init", action)
        }),
        pidfile,
        logfile,
    }
}

#[test]
fn vera_start_status_stop() {
    let dir = Scratch::new("vera");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    lifecycle(&vera(&dir, &conf, "sh"), port);
}

#[test]
fn vera_start_status_stop_under_busybox_ash() {
    if !have_for_init_scripts("busybox") {
        eprintln!("skipping: no busybox (apt-get install busybox) to run the Vera script in ash");
        return;
    }
    let dir = Scratch::new("vera-ash");
    let port = free_port();
    let conf = dir.write("sockproxyd.conf", &host_ini(port));
    lifecycle(&vera(&dir, &conf, "busybox"), port);
}

#[test]
fn vera_start_fails_on_a_bad_config() {
    let dir = Scratch::new("vera-bad");
    let conf = dir.write("sockproxyd.conf", "[host]\nport=notaport\n");
    start_fails(&vera(&dir, &conf, "sh"), "bad port");
}

#[track_caller]
fn assert_no_warnings(d: &Daemon, ini: &str) {
    let warnings = d.warnings();
    assert!(
        warnings.is_empty(),
        "the INI draws warnings: {warnings:#?}\n{ini}"
    );
}

#[test]
fn sample_config_is_accepted_without_warnings() {
    let sample = top("openwrt/files/sockproxyd.conf.sample");
    let ini = fs::read_to_string(&sample).expect("sample config");
    let args = ["-c", &s(&sample), "-a", "127.0.0.1", "-p", "0"].map(String::from);
    assert_no_warnings(&Daemon::start_args(&args), &ini);
}
