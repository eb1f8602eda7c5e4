//! The OpenWrt package's procd script (`openwrt/files/sockproxyd.init`) with its UCI
//! settings (`sockproxyd.config`), run through stand-ins for rc.common, functions.sh,
//! procd.sh (`tests/openwrt/rc.common`) and procd's `validate_data`
//! (`tests/openwrt/validate_data`), under busybox ash where installed (as on a
//! router), else sh: every UCI option reaches the INI file, which the real daemon
//! then runs with; a bad value keeps the service from starting and the system log
//! names the option; a reload sends SIGHUP and keeps the running settings when the
//! new ones are bad. Also the feed Makefile's fields.

use crate::util::*;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A scratch directory playing the router's files, removed on drop.
struct Router {
    dir: PathBuf,
}

/// How a run of the init script ended, and what it printed.
struct Ran {
    code: Option<i32>,
    out: String,
}

impl Router {
    fn new(name: &str) -> Router {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sockproxyd-uci-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        let r = Router { dir };
        // PROG is one path: under a runner, a wrapper that execs it.
        let prog = if runner_line().is_empty() {
            bin_path()
        } else {
            let w = r.write(
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
        r.write(
            "overrides.sh",
            &format!("CONF='{}'\nPROG='{}'\n", s(&r.conf()), s(&prog)),
        );
        r
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
        p
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// Where the script writes the INI file (its CONF).
    fn conf(&self) -> PathBuf {
        self.path("var/etc/sockproxyd.conf")
    }

    fn ini(&self) -> Option<String> {
        fs::read_to_string(self.conf()).ok()
    }

    fn uci(&self, text: &str) {
        self.write("config/sockproxyd", text);
    }

    /// procd believes the service runs (`procd_running`).
    fn running(&self) {
        self.write("running", "");
    }

    /// Runs `/etc/init.d/sockproxyd <action>` through the stand-ins.
    #[track_caller]
    fn action(&self, action: &str) -> Ran {
        static N: AtomicUsize = AtomicUsize::new(0);
        let out = self.path(&format!("out.{}", N.fetch_add(1, Ordering::SeqCst)));
        let f = File::create(&out).expect("out file");
        let mut cmd = if have("busybox") {
            let mut c = Command::new("busybox");
            c.arg("sh");
            c
        } else {
            Command::new("sh")
        };
        let mut child = cmd
            .arg(top("tests/openwrt/rc.common"))
            .arg(top("openwrt/files/sockproxyd.init"))
            .arg(action)
            .env("MOCK_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f)
            .spawn()
            .expect("run the init script");
        let (status, timed_out) = wait_within(&mut child, dur(30_000));
        assert!(!timed_out, "{action} did not finish");
        Ran {
            code: status.code(),
            out: fs::read_to_string(&out).unwrap_or_default(),
        }
    }

    /// The procd calls, one a line, fields joined by `|`.
    fn procd(&self) -> Vec<String> {
        self.read("procd.log").lines().map(str::to_string).collect()
    }

    fn syslog(&self) -> String {
        self.read("syslog")
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A UCI file with every `[host]` key set, lists as lists, and direct sections
/// (one enabled, one disabled).
fn every_key(r: &Router, port: u16, direct: u16, target: &str) -> String {
    format!(
        "config sockproxyd 'main'\n\
         \toption enabled '1'\n\
         \toption ip '127.0.0.1'\n\
         \toption port '{port}'\n\
         \toption vera 'http://127.0.0.1:9'\n\
         \toption log '{log}'\n\
         \toption debug '1'\n\
         \tlist allow '127.0.0.1'\n\
         \tlist allow '192.168.1.0/24'\n\
         \tlist connect_to '127.0.0.0/8'\n\
         \tlist connect_to '10.0.0.5:80'\n\
         \tlist stop_from '127.0.0.1'\n\
         \tlist stop_from '::1'\n\
         \toption max_conns '64'\n\
         \toption max_line '2048'\n\
         \toption max_blks '65536'\n\
         \toption max_mem '16M'\n\
         \n\
         config direct\n\
         \toption port '{direct}'\n\
         \toption target '{target}'\n\
         \toption options 'RTIM=60000'\n\
         \n\
         config direct 'off'\n\
         \toption enabled '0'\n\
         \toption port '9000'\n\
         \toption target '127.0.0.1:9'\n",
        log = s(&r.path("log/sockproxyd.log")),
    )
}

#[test]
fn every_uci_option_reaches_the_ini_and_the_daemon_runs_with_it() {
    let r = Router::new("every");
    let dev = Device::listen();
    let (port, direct) = (free_port(), free_port());
    r.uci(&every_key(&r, port, direct, &dev.target()));
    let ran = r.action("start");
    assert_eq!(
        ran.code,
        Some(0),
        "start failed:\n{}\n{}",
        ran.out,
        r.syslog()
    );
    let ini = r.ini().expect("no INI file written");
    let want = format!(
        "; written by /etc/init.d/sockproxyd from /etc/config/sockproxyd: edit that\n\
         [host]\n\
         ip=127.0.0.1\n\
         port={port}\n\
         vera=http://127.0.0.1:9\n\
         log={log}\n\
         debug\n\
         max_conns=64\n\
         max_line=2048\n\
         max_blks=65536\n\
         max_mem=16M\n\
         allow=127.0.0.1 192.168.1.0/24\n\
         connect_to=127.0.0.0/8 10.0.0.5:80\n\
         stop_from=127.0.0.1 ::1\n\
         [direct]\n\
         {direct}=CONN {target} RTIM=60000\n",
        log = s(&r.path("log/sockproxyd.log")),
        target = dev.target(),
    );
    assert_eq!(ini, want);

    // procd: the daemon on that file, unprivileged, stderr to the log, time to stop.
    let procd = r.procd();
    let prog = r.read("overrides.sh");
    let prog = prog
        .lines()
        .find_map(|l| l.strip_prefix("PROG='"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("PROG");
    for want in [
        format!("param|command|{prog}|-c|{}", s(&r.conf())),
        "param|user|sockproxyd".to_string(),
        "param|respawn|3600|5|5".to_string(),
        "param|term_timeout|10".to_string(),
        "param|stderr|1".to_string(),
    ] {
        assert!(procd.contains(&want), "no {want:?} in {procd:#?}");
    }
    assert!(
        !procd.iter().any(|l| l.starts_with("param|file|")),
        "a file param would make procd restart the daemon instead of a reload"
    );
    // The log file is made the daemon's own.
    assert_eq!(
        r.read("chown").trim(),
        format!("sockproxyd:sockproxyd {}", s(&r.path("log/sockproxyd.log")))
    );
    assert!(r.path("log/sockproxyd.log").exists());

    // The daemon takes the file: the command port and the direct port listen.
    let args = ["-c", &s(&r.conf()), "-L", "-"].map(String::from);
    let d = Daemon::start_args(&args);
    assert_eq!(d.port(), port);
    assert_eq!(d.direct_addr(&dev.target()), loopback(direct));
    let _c = Client::connect(loopback(direct));
    dev.accept();
}

#[test]
fn default_uci_listens_on_loopback_and_the_daemon_takes_it_without_warnings() {
    let r = Router::new("defaults");
    let uci = fs::read_to_string(top("openwrt/files/sockproxyd.config")).expect("uci defaults");
    r.uci(&uci);
    let ran = r.action("start");
    assert_eq!(ran.code, Some(0), "{}\n{}", ran.out, r.syslog());
    let ini = r.ini().expect("no INI file written");
    let host: Vec<&str> = ini.lines().filter(|l| !l.starts_with(';')).collect();
    assert_eq!(
        host,
        [
            "[host]",
            "ip=127.0.0.1",
            "port=2504",
            "vera=http://127.0.0.1:3480",
            "[direct]"
        ],
        "{ini}"
    );
    assert!(r.read("chown").is_empty(), "no log file, nothing to chown");
    // Port 2504 may be taken here: the same file, then any port.
    let args = ["-c", &s(&r.conf()), "-p", "0"].map(String::from);
    let d = Daemon::start_args(&args);
    let warnings = d.warnings();
    assert!(warnings.is_empty(), "{warnings:#?}\n{ini}");

    // '*' (every IPv4 interface) is a value the old default had: still taken.
    r.uci(&uci.replace("option ip '127.0.0.1'", "option ip '*'"));
    let ran = r.action("start");
    assert_eq!(ran.code, Some(0), "{}\n{}", ran.out, r.syslog());
    assert!(r.ini().expect("INI").contains("\nip=*\n"));
}

/// Each bad value: start fails, no instance and no INI file, and the system log has
/// one daemon.err line naming the option.
#[test]
fn a_bad_value_keeps_the_service_from_starting_and_the_log_names_it() {
    let dev_target = "127.0.0.1:9";
    let cases: &[(&str, &str, &str)] = &[
        (
            "option port '",
            "option port '80'\n#",
            "option 'port': '80' is not a valid",
        ),
        (
            "option port '",
            "option port 'http'\n#",
            "option 'port': 'http'",
        ),
        (
            "option ip '",
            "option ip 'localhost'\n#",
            "option 'ip': 'localhost'",
        ),
        (
            "option vera '",
            "option vera 'ftp://x'\n#",
            "option 'vera': 'ftp://x' is not an http:// URL",
        ),
        (
            "option debug '",
            "option debug 'maybe'\n#",
            "option 'debug': 'maybe'",
        ),
        (
            "option max_conns '",
            "option max_conns '0'\n#",
            "option 'max_conns': '0'",
        ),
        (
            "option max_line '",
            "option max_line 'x'\n#",
            "option 'max_line': 'x'",
        ),
        (
            "option max_blks '",
            "option max_blks '99999999999'\n#",
            "option 'max_blks': '99999999999'",
        ),
        (
            "option max_mem '",
            "option max_mem 'lots'\n#",
            "option 'max_mem': 'lots'",
        ),
        (
            "list allow '192.168.1.0/24'",
            "list allow 'lan'",
            "option 'allow[1]': 'lan'",
        ),
        (
            "list stop_from '::1'",
            "list stop_from 'nobody'",
            "option 'stop_from[1]': 'nobody'",
        ),
        // Past what validate_data can tell: the daemon's own check names the key.
        (
            "list connect_to '10.0.0.5:80'",
            "list connect_to '10.0.0.5:99999'",
            "connect_to: bad address or network \"10.0.0.5:99999\"",
        ),
        (
            "\toption target '",
            "\toption target 'nowhere'\n#",
            "[direct] ",
        ),
        (
            "option options 'RTIM=60000'",
            "option options 'RTIM=x'",
            "[direct] ",
        ),
        (
            "\toption port '9000'",
            "\toption port 'x'",
            "section 'off', option 'port': 'x'",
        ),
    ];
    for (find, replace, says) in cases {
        let r = Router::new("bad");
        let good = every_key(&r, 2600, 2601, dev_target);
        assert!(good.contains(find), "case {find:?} matches nothing");
        r.uci(&good.replacen(find, replace, 1));
        let ran = r.action("start");
        assert_ne!(ran.code, Some(0), "{replace:?} was taken:\n{}", ran.out);
        assert!(
            !r.procd().iter().any(|l| l == "open"),
            "{replace:?}: an instance was opened: {:?}",
            r.procd()
        );
        assert!(r.ini().is_none(), "{replace:?}: an INI file was written");
        let log = r.syslog();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" daemon.err sockproxyd: "))
            .collect();
        assert_eq!(errors.len(), 1, "{replace:?}: {log}");
        assert!(errors[0].contains(says), "{replace:?}: {log}");
    }

    // A direct section without a target.
    let r = Router::new("half");
    r.uci(&format!(
        "{}\nconfig direct 'half'\n\toption port '9001'\n",
        every_key(&r, 2600, 2601, dev_target)
    ));
    assert_ne!(r.action("start").code, Some(0));
    assert!(
        r.syslog()
            .contains("direct section 'half' needs 'port' and 'target'"),
        "{}",
        r.syslog()
    );
}

#[test]
fn reload_sends_sighup_and_keeps_the_running_settings_when_the_new_are_bad() {
    let r = Router::new("reload");
    let uci = every_key(&r, 2600, 2601, "127.0.0.1:9");
    r.uci(&uci);
    assert_eq!(r.action("start").code, Some(0), "{}", r.syslog());
    r.running();
    let _ = fs::remove_file(r.path("procd.log"));

    // A good change: the file is rewritten, the daemon told, nothing restarted.
    r.uci(&uci.replace("option max_conns '64'", "option max_conns '32'"));
    let ran = r.action("reload");
    assert_eq!(ran.code, Some(0), "{}\n{}", ran.out, r.syslog());
    assert!(r.ini().expect("INI").contains("\nmax_conns=32\n"));
    assert_eq!(r.procd(), ["signal|sockproxyd|*|HUP"]);
    let before = r.ini();

    // A bad one: the file stays, no signal, the log names the option.
    let _ = fs::remove_file(r.path("procd.log"));
    r.uci(&uci.replace("option max_conns '64'", "option max_conns 'many'"));
    let ran = r.action("reload");
    assert_ne!(ran.code, Some(0));
    assert_eq!(r.ini(), before, "the running settings' file changed");
    assert!(r.procd().is_empty(), "{:?}", r.procd());
    assert!(
        r.syslog().contains("option 'max_conns': 'many'"),
        "{}",
        r.syslog()
    );

    // Disabled: stopped.
    r.uci(&uci.replace("option enabled '1'", "option enabled '0'"));
    assert_eq!(r.action("reload").code, Some(0));
    assert_eq!(r.procd(), ["stop"]);

    // Not running: a reload starts it.
    let _ = fs::remove_file(r.path("procd.log"));
    let _ = fs::remove_file(r.path("running"));
    r.uci(&uci);
    assert_eq!(r.action("reload").code, Some(0));
    assert!(r.procd().iter().any(|l| l == "open"), "{:?}", r.procd());
}

#[test]
fn disabled_starts_nothing_and_triggers_are_registered() {
    let r = Router::new("off");
    let uci = fs::read_to_string(top("openwrt/files/sockproxyd.config"))
        .expect("uci defaults")
        .replace("option enabled '1'", "option enabled '0'");
    r.uci(&uci);
    assert_eq!(r.action("start").code, Some(0));
    assert!(r.procd().is_empty(), "{:?}", r.procd());
    assert_eq!(r.action("triggers").code, Some(0));
    assert_eq!(
        r.procd(),
        [
            "reload_trigger|sockproxyd",
            "validation|validate_sockproxyd_section"
        ]
    );
}

/// The fields the packages feed asks for, the unprivileged user, and the tested
/// release profile put back over the feed's.
#[test]
fn feed_makefile_has_the_fields_and_the_tested_profile() {
    let mk = fs::read_to_string(top("openwrt/Makefile")).expect("Makefile");
    for want in [
        "\nPKG_MAINTAINER:=",
        "\n  URL:=",
        "\nPKG_LICENSE:=MIT OR Apache-2.0\n",
        "\nPKG_LICENSE_FILES:=LICENSE-MIT LICENSE-APACHE\n",
        "\n  USERID:=sockproxyd=",
        "CARGO_PROFILE_RELEASE_PANIC=abort",
        "CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=false",
    ] {
        assert!(mk.contains(want), "openwrt/Makefile lacks {want:?}");
    }
    let cargo = fs::read_to_string(top("Cargo.toml")).expect("Cargo.toml");
    for want in [
        "opt-level = \"z\"",
        "lto = true",
        "codegen-units = 1",
        "panic = \"abort\"",
    ] {
        assert!(
            cargo.contains(want),
            "Cargo.toml's release profile lacks {want}"
        );
    }
}
