//! The SockProxy plugin for Vera and openLuup (`openwrt/vera/plugin/`): its
//! `L_SockProxy1.lua` run under `lua5.1` as Luup would run it, through a Luup stand-in
//! (`tests/vera_plugin/luup.lua`, driven by `run.lua`), against a scratch root that plays
//! the controller's file system (`SOCKPROXY_ENV.root`). The init scripts it writes run
//! for real through a stand-in for rc.common and procd (`tests/vera_plugin/rc.common`),
//! so the daemons they start are real: the test binary (`SOCKPROXYD_BIN`) is the
//! "uploaded" daemon, and an original install is played by `original-*.init` with a Lua
//! proxy that greets like the original (`tests/vera_plugin/sockproxyd.lua`).
//!
//! Every daemon listens on loopback at a port of its own, set in the root's
//! `etc/sockproxyd.conf`, which the plugin reads as the daemon does. Skipped, with the
//! reason printed, without `lua5.1` and LuaSocket; the checks that need `xmllint` or
//! `shellcheck` skip just that part. Under `SOCKPROXYD_RUNNER` (qemu) the upload is a
//! wrapper script that execs the runner.

use crate::util::*;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const SID: &str = "urn:toggledbits-com:serviceId:SockProxy1";
const DEVICE: u32 = 17;

/// The shell that runs init scripts: busybox ash, as on a Vera, where installed.
fn rc_shell() -> &'static str {
    if have("busybox") { "busybox sh" } else { "sh" }
}

/// What the plugin would find uploaded: the daemon itself, or under a runner a
/// script that runs it there.
fn upload_bytes() -> Vec<u8> {
    let r = runner_line();
    if r.is_empty() {
        fs::read(bin_path()).expect("read the daemon binary")
    } else {
        format!("#!/bin/sh\nexec {r} '{}' \"$@\"\n", s(&bin_path())).into_bytes()
    }
}

/// Whether process `pid` is alive (a zombie is not).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X') || state.is_empty())
        }
        Err(_) => false,
    }
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The greeting on 127.0.0.1:`port` and the answer to BILD, if something greets.
fn greet(port: u16) -> Option<(String, String)> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let s = TcpStream::connect_timeout(&addr, dur(2_000)).ok()?;
    s.set_read_timeout(Some(dur(3_000))).ok()?;
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut greeting = String::new();
    r.read_line(&mut greeting).ok()?;
    (&s).write_all(b"BILD\n").ok()?;
    let mut bild = String::new();
    let _ = r.read_line(&mut bild);
    Some((greeting.trim_end().to_string(), bild.trim_end().to_string()))
}

#[track_caller]
fn wait_greeting(port: u16, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut last = None;
    wait_until(dur(15_000), what, || {
        last = greet(port).map(|(g, _)| g);
        last.as_deref().is_some_and(&pred)
    });
    last.expect("greeting")
}

/// Our daemon's greeting: the id is lowercase hex (the Lua stand-in's is `lua<n>`).
fn is_ours(greeting: &str) -> bool {
    greeting
        .strip_prefix("OK TOGGLEDBITS-SOCKPROXY 1 ")
        .is_some_and(|id| id.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_old_lua(greeting: &str) -> bool {
    greeting.starts_with("OK TOGGLEDBITS-SOCKPROXY 1 lua")
}

/// What a run of run.lua printed.
struct Ran {
    ok: bool,
    out: String,
    err: String,
}

impl Ran {
    fn startup(&self) -> Option<bool> {
        self.out
            .lines()
            .find_map(|l| l.strip_prefix("STARTUP "))
            .map(|r| r.starts_with("true"))
    }

    fn delays(&self) -> Vec<String> {
        self.out
            .lines()
            .filter_map(|l| l.strip_prefix("DELAY "))
            .map(str::to_string)
            .collect()
    }

    fn failures(&self) -> Vec<String> {
        self.out
            .lines()
            .filter_map(|l| l.strip_prefix("FAILURE "))
            .map(str::to_string)
            .collect()
    }
}

/// A scratch root playing the controller's file system; kills the daemons started
/// in it and removes it on drop.
struct Root {
    dir: PathBuf,
    port: u16,
    lua: String,
    children: Vec<Child>,
}

/// Files the plugin may change, with what identifies each version of them.
type Snapshot = BTreeMap<String, String>;

impl Root {
    fn new(name: &str, lua: &str) -> Root {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sockproxyd-vera-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        for d in [
            "etc/cmh-ludl",
            "etc/init.d",
            "etc/rc.d",
            "usr/bin",
            "tmp",
            "var/run",
        ] {
            fs::create_dir_all(dir.join(d)).expect("create scratch dirs");
        }
        let port = free_port();
        let root = Root {
            dir,
            port,
            lua: lua.to_string(),
            children: Vec::new(),
        };
        root.write(
            "etc/sockproxyd.conf",
            &format!("[host]\nip=127.0.0.1\nport={port}\n"),
        );
        root.config(false, None, &[]);
        root
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write scratch file");
        p
    }

    fn mock_dir(&self) -> PathBuf {
        self.path("mock")
    }

    /// The command prefix that runs an init script through the rc.common stand-in.
    fn rc(&self) -> String {
        format!(
            "MOCK_DIR='{}' {} '{}'",
            s(&self.mock_dir()),
            rc_shell(),
            s(&top("tests/vera_plugin/rc.common"))
        )
    }

    /// Writes test.lua: the plugin, the device, openLuup or not, SOCKPROXY_ENV.
    /// `port` overrides the configuration file's; `extra` adds env entries (Lua text).
    fn config(&self, openluup: bool, port: Option<u16>, extra: &[&str]) {
        let mut env = vec![
            format!("root = [==[{}]==]", s(&self.dir)),
            format!("rc = [==[{}]==]", self.rc()),
            format!("lzo = [==[{}]==]", s(&top("tests/vera_plugin/pluto-lzo"))),
            format!(
                "logread = [==[MOCK_DIR='{}' {} '{}']==]",
                s(&self.mock_dir()),
                rc_shell(),
                s(&top("tests/vera_plugin/logread"))
            ),
            format!("start_timeout = {}", 15 * scale()),
            format!("stop_timeout = {}", 3 * scale()),
            format!("check_timeout = {}", 5 * scale()),
        ];
        if let Some(p) = port {
            env.push(format!("port = {p}"));
        }
        env.extend(extra.iter().map(|e| e.to_string()));
        let text = format!(
            "return {{\n  plugin = [==[{}]==],\n  device = {DEVICE},\n  openluup = {openluup},\n  env = {{\n    {}\n  }},\n}}\n",
            s(&top("openwrt/vera/plugin/L_SockProxy1.lua")),
            env.join(",\n    ")
        );
        self.write("test.lua", &text);
    }

    /// Puts the daemon where Vera keeps uploads: as is, or "compressed" (.lzo).
    fn upload(&self, packed: bool) -> Vec<u8> {
        let bytes = upload_bytes();
        if packed {
            let mut v = b"FAKE-LZO\n".to_vec();
            v.extend_from_slice(&bytes);
            fs::write(self.path("etc/cmh-ludl/sockproxyd-mipsel.lzo"), v).expect("upload");
        } else {
            fs::write(self.path("etc/cmh-ludl/sockproxyd-mipsel"), &bytes).expect("upload");
        }
        bytes
    }

    fn procd(&self) {
        self.write("sbin/procd", "");
    }

    /// Runs run.lua with `steps`; its output goes to files (daemons it starts must
    /// not hold a pipe of ours).
    #[track_caller]
    fn run(&self, steps: &[&str]) -> Ran {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let out_path = self.path(&format!("run.{n}.out"));
        let err_path = self.path(&format!("run.{n}.err"));
        let mut child = Command::new(&self.lua)
            .arg(top("tests/vera_plugin/run.lua"))
            .arg(&self.dir)
            .args(steps)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("out file"))
            .stderr(File::create(&err_path).expect("err file"))
            .spawn()
            .expect("spawn lua");
        let (status, timed_out) = wait_within(&mut child, dur(120_000));
        if timed_out {
            panic!("run.lua {steps:?} did not finish within {:?}", dur(120_000));
        }
        let ran = Ran {
            ok: status.success(),
            out: fs::read_to_string(&out_path).unwrap_or_default(),
            err: fs::read_to_string(&err_path).unwrap_or_default(),
        };
        assert!(
            ran.ok,
            "run.lua {steps:?} failed ({status}):\n{}\n{}",
            ran.out, ran.err
        );
        ran
    }

    /// The device's variables (service SockProxy1) as the plugin left them.
    fn vars(&self) -> BTreeMap<String, String> {
        let text = fs::read_to_string(self.path("luup-state")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, '\t');
                let (dev, sid, name, value) = (f.next()?, f.next()?, f.next()?, f.next()?);
                (dev == DEVICE.to_string() && sid == SID).then(|| {
                    let v = value
                        .replace("\\n", "\n")
                        .replace("\\t", "\t")
                        .replace("\\\\", "\\");
                    (name.to_string(), v)
                })
            })
            .collect()
    }

    fn var(&self, name: &str) -> String {
        self.vars().get(name).cloned().unwrap_or_default()
    }

    fn luup_log(&self) -> String {
        fs::read_to_string(self.path("luup-log")).unwrap_or_default()
    }

    /// The actions the rc.common stand-in was asked for, in order.
    fn rc_calls(&self) -> Vec<String> {
        fs::read_to_string(self.mock_dir().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rc_links(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path("etc/rc.d"))
            .expect("read rc.d")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    /// The pid the daemon's pid file names (both init scripts and procd write it).
    fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.path("var/run/sockproxyd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Contents, modes, modification times and link targets of everything the
    /// installer may write.
    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::new();
        let mut files = vec![
            "usr/bin/sockproxyd".to_string(),
            "etc/init.d/sockproxyd".to_string(),
            "etc/sockproxyd.conf".to_string(),
        ];
        files.extend(self.rc_links().into_iter().map(|l| format!("etc/rc.d/{l}")));
        for rel in files {
            let p = self.path(&rel);
            let v = match fs::symlink_metadata(&p) {
                Err(_) => "absent".to_string(),
                Ok(m) if m.file_type().is_symlink() => format!(
                    "link to {} at {}.{}",
                    s(&fs::read_link(&p).expect("readlink")),
                    m.mtime(),
                    m.mtime_nsec()
                ),
                Ok(m) => format!(
                    "{} bytes, fnv {:x}, mode {:o}, at {}.{}",
                    m.len(),
                    fnv1a(&fs::read(&p).expect("read")),
                    m.permissions().mode(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            };
            snap.insert(rel, v);
        }
        snap
    }

    /// Sets up an install of the original plugin, as it left a controller: its Lua
    /// proxy unpacked beside the plugin, its init script (procd or plain) with the S80
    /// link, ConfigVersion 20140, the proxy running. Returns the proxy's pid.
    fn original_install(&self, procd: bool) -> i32 {
        let fixture = if procd {
            "original-procd.init"
        } else {
            "original-plain.init"
        };
        let text = fs::read_to_string(top(&format!("tests/vera_plugin/{fixture}")))
            .expect("fixture")
            .replace("@LUA@", &format!("'{}'", self.lua))
            .replace(
                "@PROG@",
                &format!("'{}'", s(&self.path("etc/cmh-ludl/sockproxyd.lua"))),
            )
            .replace("@PORT@", &self.port.to_string())
            .replace(
                "@LOGFILE@",
                &format!("'{}'", s(&self.path("tmp/sockproxyd.log"))),
            )
            .replace(
                "@PIDFILE@",
                &format!("'{}'", s(&self.path("var/run/sockproxyd.pid"))),
            );
        let init = self.write("etc/init.d/sockproxyd", &text);
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::copy(
            top("tests/vera_plugin/sockproxyd.lua"),
            self.path("etc/cmh-ludl/sockproxyd.lua"),
        )
        .expect("copy the Lua proxy");
        // What Vera keeps of the original's upload.
        self.write("etc/cmh-ludl/sockproxyd.lua.lzo", "(compressed original)\n");
        for l in ["S80sockproxyd", "K80sockproxyd"] {
            std::os::unix::fs::symlink("../init.d/sockproxyd", self.path(&format!("etc/rc.d/{l}")))
                .expect("symlink");
        }
        self.write(
            "luup-state",
            &format!("{DEVICE}\t{SID}\tConfigVersion\t20140\n{DEVICE}\t{SID}\tStatus\t1\n"),
        );
        self.rc_action("start");
        let g = wait_greeting(self.port, "the original's Lua proxy to greet", is_old_lua);
        assert!(is_old_lua(&g), "{g}");
        self.pid().expect("the original's pid file")
    }

    /// Runs the installed init script with `action` through the rc.common stand-in.
    fn rc_action(&self, action: &str) {
        let st = Command::new("sh")
            .args(["-c", &format!("{} \"$1\" \"$2\"", self.rc()), "sh"])
            .arg(self.path("etc/init.d/sockproxyd"))
            .arg(action)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run the init script");
        assert!(st.success(), "init script {action}: {st}");
    }

    /// A process of ours, to be killed on drop.
    fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Daemons the scripts started: each named by a pid file in this root and
        // running with this root in its command line.
        let root = s(&self.dir);
        for pf in ["var/run/sockproxyd.pid", "mock/procd.pid"] {
            let Ok(text) = fs::read_to_string(self.path(pf)) else {
                continue;
            };
            let Ok(pid) = text.trim().parse::<i32>() else {
                continue;
            };
            if pid > 1 && alive(pid) && cmdline(pid).contains(&root) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Checks the init script the plugin wrote: sh -n, and shellcheck if installed.
#[track_caller]
fn check_script(path: &Path) {
    let o = Command::new("sh")
        .arg("-n")
        .arg(path)
        .output()
        .expect("sh -n");
    assert!(
        o.status.success(),
        "sh -n {}: {}",
        s(path),
        String::from_utf8_lossy(&o.stderr)
    );
    if have("shellcheck") {
        let o = Command::new("shellcheck")
            .args(["-s", "sh"])
            .arg(path)
            .output()
            .expect("shellcheck");
        assert!(
            o.status.success(),
            "shellcheck {}:\n{}",
            s(path),
            String::from_utf8_lossy(&o.stdout)
        );
    } else {
        eprintln!("shellcheck is not installed (apt-get install shellcheck): syntax only");
    }
}

// ---------------------------------------------------------------------------------------
// Fresh installs, and starting again

/// A fresh install through the plain script: the binary in place, the script with its
/// links, the daemon started and greeting, ConfigVersion set; a second start changes
/// nothing; a dead daemon is restarted by the health check.
#[test]
fn fresh_install_plain_then_second_start_changes_nothing() {
    let Some(lua) = lua() else { return };
    let r = Root::new("plain", &lua);
    let uploaded = r.upload(false);

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(
        fs::read(r.path("usr/bin/sockproxyd")).expect("installed binary"),
        uploaded,
        "the installed daemon is the uploaded one"
    );
    let mode = fs::metadata(r.path("usr/bin/sockproxyd"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let init = fs::read_to_string(r.path("etc/init.d/sockproxyd")).expect("init script");
    assert!(init.starts_with("#!/bin/sh /etc/rc.common\n"), "{init}");
    assert!(
        !init.contains("USE_PROCD"),
        "a plain script without procd:\n{init}"
    );
    assert!(init.contains("\nSTART=45\n"), "{init}");
    assert!(
        init.contains(&format!("\nPROG='{}'\n", s(&r.path("usr/bin/sockproxyd")))),
        "{init}"
    );
    check_script(&r.path("etc/init.d/sockproxyd"));
    assert_eq!(r.rc_links(), ["K85sockproxyd", "S45sockproxyd"]);
    assert_eq!(
        fs::read_link(r.path("etc/rc.d/S45sockproxyd")).expect("readlink"),
        Path::new("../init.d/sockproxyd")
    );
    let g = wait_greeting(r.port, "the installed daemon to greet", is_ours);
    assert!(is_ours(&g));
    let version =
        String::from_utf8(run_to_exit(&["--version"], dur(10_000)).stdout).expect("utf-8");
    let version = version.trim();
    assert_eq!(r.var("ConfigVersion"), format!("{version}; init 2"));
    let msg = r.var("Message");
    assert!(msg.starts_with("Installed sockproxyd "), "Message: {msg}");
    assert!(
        ran.delays().contains(&"15 proxy_check ".to_string()),
        "first health check: {:?}",
        ran.delays()
    );
    assert_eq!(ran.failures(), ["0"]);
    let pid = r.pid().expect("pid file");
    // Under a runner the installed "daemon" is a script that execs it.
    let want = if runner_line().is_empty() {
        r.path("usr/bin/sockproxyd")
    } else {
        r.dir.clone()
    };
    assert!(cmdline(pid).contains(&s(&want)), "{}", cmdline(pid));

    // A second start (a Luup reload) finds everything as it should be.
    let before = r.snapshot();
    let calls = r.rc_calls();
    let ran = r.run(&["startup", "soon"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(r.snapshot(), before, "the second start changed files");
    assert_eq!(r.rc_calls(), calls, "the second start ran the init script");
    assert_eq!(r.pid(), Some(pid), "the second start restarted the daemon");
    assert!(alive(pid));
    assert_eq!(r.var("Status"), "1", "{}", r.var("Message"));
    assert!(
        r.var("Message").starts_with("Up; protocol 1, build "),
        "{}",
        r.var("Message")
    );
    assert!(r.luup_log().contains("installation is up to date"));

    // The daemon dies: the health check says so and restarts the service once.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(dur(5_000), "the daemon to die", || greet(r.port).is_none());
    let ran = r.run(&["check", "soon"]);
    assert!(
        r.rc_calls().ends_with(&["restart".to_string()]),
        "{:?}",
        r.rc_calls()
    );
    assert_eq!(r.var("Status"), "1", "{}\n{}", r.var("Message"), ran.err);
    let msg = r.var("Message");
    assert!(
        msg.contains("restarted after: cannot connect to 127.0.0.1:"),
        "{msg}"
    );
    assert!(is_ours(
        &greet(r.port).expect("greeting after the restart").0
    ));
}

/// A fresh install on procd firmware, from an upload Vera compressed: the procd script
/// (respawn, pid file), START below a Luup start link that comes early; a second start
/// changes nothing.
#[test]
fn fresh_install_procd_from_lzo_then_second_start_changes_nothing() {
    let Some(lua) = lua() else { return };
    let r = Root::new("procd", &lua);
    r.procd();
    let uploaded = r.upload(true);
    std::os::unix::fs::symlink("../init.d/cmh", r.path("etc/rc.d/S40cmh-ra")).expect("link");

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(
        fs::read(r.path("usr/bin/sockproxyd")).expect("installed"),
        uploaded
    );
    let init = fs::read_to_string(r.path("etc/init.d/sockproxyd")).expect("init script");
    assert!(init.contains("\nUSE_PROCD=1\n"), "{init}");
    assert!(init.contains("procd_set_param respawn"), "{init}");
    assert!(init.contains("\nSTART=39\n"), "before S40cmh-ra:\n{init}");
    check_script(&r.path("etc/init.d/sockproxyd"));
    assert_eq!(
        r.rc_links(),
        ["K85sockproxyd", "S39sockproxyd", "S40cmh-ra"]
    );
    let g = wait_greeting(r.port, "the installed daemon to greet", is_ours);
    assert!(is_ours(&g));
    let command = fs::read_to_string(r.mock_dir().join("command")).expect("procd command");
    assert_eq!(
        command.lines().collect::<Vec<_>>(),
        [
            s(&r.path("usr/bin/sockproxyd")).as_str(),
            "-c",
            s(&r.path("etc/sockproxyd.conf")).as_str(),
            "-L",
            s(&r.path("tmp/sockproxyd.log")).as_str()
        ]
    );
    assert!(r.var("ConfigVersion").starts_with("sockproxyd "));
    assert!(
        !r.path("tmp/sockproxyd.upload").exists(),
        "the unpacked upload was left"
    );
    // stderr to the system log (a bad setting's reason), time for final notifications.
    let params = fs::read_to_string(r.mock_dir().join("params")).expect("procd params");
    for want in ["stderr 1", "term_timeout 10"] {
        assert!(
            params.lines().any(|l| l == want),
            "no procd_set_param {want}:\n{params}"
        );
    }

    let before = r.snapshot();
    let pid = r.pid();
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(r.snapshot(), before, "the second start changed files");
    assert_eq!(
        r.rc_calls(),
        ["start"],
        "only the first start runs the service"
    );
    assert_eq!(r.pid(), pid);
}

// ---------------------------------------------------------------------------------------
// Upgrading the original plugin's install

#[track_caller]
fn upgrade_over_original(procd: bool) {
    let Some(lua) = lua() else { return };
    let r = Root::new(if procd { "up-procd" } else { "up-plain" }, &lua);
    if procd {
        r.procd();
    }
    let old_pid = r.original_install(procd);
    let uploaded = r.upload(false);

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    let g = wait_greeting(r.port, "the new daemon to greet", is_ours);
    assert!(is_ours(&g), "{g}");
    let (_, bild) = greet(r.port).expect("greeting");
    assert!(bild.starts_with("OK "), "BILD: {bild}");
    wait_until(dur(5_000), "the Lua proxy to be gone", || !alive(old_pid));
    assert_eq!(
        fs::read(r.path("usr/bin/sockproxyd")).expect("installed"),
        uploaded
    );
    let init = fs::read_to_string(r.path("etc/init.d/sockproxyd")).expect("init script");
    assert!(init.contains("sockproxyd-plugin-init 2"), "{init}");
    assert_eq!(init.contains("USE_PROCD=1"), procd, "{init}");
    assert_eq!(
        r.rc_links(),
        ["K85sockproxyd", "S45sockproxyd"],
        "S80 replaced"
    );
    let msg = r.var("Message");
    assert!(
        msg.contains("replaced the original Lua proxy"),
        "Message: {msg}"
    );
    assert!(
        r.var("ConfigVersion").starts_with("sockproxyd "),
        "{}",
        r.var("ConfigVersion")
    );
    assert_eq!(r.var("Version"), "1");
    assert!(
        r.path("etc/cmh-ludl/sockproxyd.lua.lzo").exists(),
        "the original's upload is kept (to go back)"
    );
    // The old service was stopped through its own script, the new one started.
    assert_eq!(r.rc_calls(), ["start", "stop", "start"]);

    let before = r.snapshot();
    let pid = r.pid();
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(r.snapshot(), before, "the second start changed files");
    assert_eq!(r.pid(), pid);
}

#[test]
fn upgrade_replaces_the_original_lua_proxy_plain() {
    upgrade_over_original(false);
}

#[test]
fn upgrade_replaces_the_original_lua_proxy_procd() {
    upgrade_over_original(true);
}

/// The old proxy runs, but no init script knows it (started by hand): the installer
/// finds it by its port and stops it.
#[test]
fn a_proxy_started_by_hand_is_found_by_its_port_and_stopped() {
    let Some(lua) = lua() else { return };
    let mut r = Root::new("by-hand", &lua);
    fs::copy(
        top("tests/vera_plugin/sockproxyd.lua"),
        r.path("etc/cmh-ludl/sockproxyd.lua"),
    )
    .expect("copy");
    let child = Command::new(&lua)
        .arg(r.path("etc/cmh-ludl/sockproxyd.lua"))
        .args(["-p", &r.port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the Lua proxy");
    r.adopt(child);
    wait_greeting(r.port, "the Lua proxy to greet", is_old_lua);
    r.upload(false);

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    let g = wait_greeting(r.port, "the new daemon to greet", is_ours);
    assert!(is_ours(&g));
    let st = r.children[0].try_wait().expect("try_wait");
    assert!(st.is_some(), "the Lua proxy still runs");
    assert!(r.luup_log().contains("still on port"), "{}", r.luup_log());
}

// ---------------------------------------------------------------------------------------
// Upgrades by content, settings

/// A daemon rebuilt with the same version line is a new daemon: installed and started.
/// The same bytes uploaded again (Vera keeps the upload; a user may upload it twice)
/// change nothing.
#[test]
fn a_rebuild_with_the_same_version_is_installed_the_same_file_is_not() {
    let Some(lua) = lua() else { return };
    let r = Root::new("rebuild", &lua);
    r.upload(false);
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    wait_greeting(r.port, "the first daemon to greet", is_ours);
    let first_pid = r.pid().expect("pid file");
    let config_version = r.var("ConfigVersion");

    // The same file again, written anew.
    let before = r.snapshot();
    r.upload(false);
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(r.snapshot(), before, "the same upload changed files");
    assert_eq!(
        r.rc_calls(),
        ["start"],
        "the same upload restarted the service"
    );
    assert_eq!(r.pid(), Some(first_pid));
    assert!(
        r.var("Message").starts_with("Up to date: sockproxyd "),
        "Message: {}",
        r.var("Message")
    );

    // A rebuild: other bytes, the same --version line (a script that runs the daemon).
    let rebuilt = format!(
        "#!/bin/sh\n# rebuilt\nexec {}'{}' \"$@\"\n",
        if runner_line().is_empty() {
            String::new()
        } else {
            format!("{} ", runner_line())
        },
        s(&bin_path())
    );
    let upload = r.write("etc/cmh-ludl/sockproxyd-mipsel", &rebuilt);
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(
        fnv1a(&fs::read(r.path("usr/bin/sockproxyd")).expect("installed")),
        fnv1a(&fs::read(&upload).expect("upload")),
        "the rebuild was not installed"
    );
    let msg = r.var("Message");
    assert!(
        msg.starts_with("Installed a rebuild of sockproxyd "),
        "Message: {msg}"
    );
    assert_eq!(r.var("ConfigVersion"), config_version, "same version line");
    assert_eq!(r.rc_calls(), ["start", "stop", "start"]);
    wait_greeting(r.port, "the rebuilt daemon to greet", is_ours);
    assert_ne!(r.pid(), Some(first_pid), "the old daemon still runs");
    assert!(!alive(first_pid));
}

/// A first install writes a settings file that listens on loopback only, and says how
/// to open it; the daemon then listens there.
#[test]
fn a_first_install_writes_loopback_settings() {
    let Some(lua) = lua() else { return };
    let r = Root::new("first-conf", &lua);
    fs::remove_file(r.path("etc/sockproxyd.conf")).expect("rm conf");
    // The port this test's daemon must use goes into the file the plugin writes.
    r.config(false, Some(r.port), &[]);
    r.upload(false);

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    let conf = fs::read_to_string(r.path("etc/sockproxyd.conf")).expect("settings written");
    let active: Vec<&str> = conf
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    assert_eq!(
        active,
        ["[host]", "ip=127.0.0.1", &format!("port={}", r.port)],
        "{conf}"
    );
    assert!(
        conf.contains(";   ip=*"),
        "no word on how to open it:\n{conf}"
    );
    assert!(conf.contains(";   allow="), "{conf}");
    let msg = r.var("Message");
    assert!(
        msg.contains(&format!(
            "wrote {} (listens on loopback only)",
            s(&r.path("etc/sockproxyd.conf"))
        )),
        "Message: {msg}"
    );
    wait_greeting(r.port, "the daemon to greet", is_ours);
    let log = fs::read_to_string(r.path("tmp/sockproxyd.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{} (commands)", r.port)),
        "{log}"
    );
    // The daemon takes the file as it is: no warning about it.
    assert!(!log.contains("WARN"), "{log}");
}

/// A settings file already there is the user's: a first install keeps it as it is.
#[test]
fn an_existing_settings_file_is_kept() {
    let Some(lua) = lua() else { return };
    let r = Root::new("keep-conf", &lua);
    let mine = format!(
        "; mine\n[host]\nip=127.0.0.1\nport={}\nmax_conns=64\n",
        r.port
    );
    r.write("etc/sockproxyd.conf", &mine);
    r.upload(false);
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert_eq!(
        fs::read_to_string(r.path("etc/sockproxyd.conf")).expect("conf"),
        mine
    );
    assert!(
        !r.var("Message").contains("sockproxyd.conf"),
        "{}",
        r.var("Message")
    );
    wait_greeting(r.port, "the daemon to greet", is_ours);
}

/// A setting the daemon refuses (after an edit, at a restart): the health check's
/// restart fails, and Message quotes the daemon's own words: from the log file under
/// the plain script, from stderr through the system log under procd.
#[track_caller]
fn config_error_reaches_message(procd: bool) {
    let Some(lua) = lua() else { return };
    let r = Root::new(if procd { "bad-procd" } else { "bad-plain" }, &lua);
    if procd {
        r.procd();
    }
    r.upload(false);
    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    wait_greeting(r.port, "the daemon to greet", is_ours);
    let pid = r.pid().expect("pid");

    r.write(
        "etc/sockproxyd.conf",
        &format!("[host]\nip=127.0.0.1\nport={}\nmax_conns=0\n", r.port),
    );
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(dur(5_000), "the daemon to die", || greet(r.port).is_none());
    // The recheck comes seconds after the restart on a Vera: time for the restarted
    // daemon to fail and say why (under an emulator that takes a while).
    let pause = format!("sleep={}", 1 + 2 * u32::from(!runner_line().is_empty()));
    let ran = r.run(&["check", &pause, "soon"]);
    assert_eq!(r.var("Status"), "0", "{}", ran.err);
    let msg = r.var("Message");
    assert!(msg.starts_with("Down after a restart: "), "Message: {msg}");
    assert!(
        msg.contains(&format!(
            "; the daemon said: sockproxyd: config {}: line 4: bad max_conns \"0\"",
            s(&r.path("etc/sockproxyd.conf"))
        )),
        "Message: {msg}"
    );
}

#[test]
fn a_config_error_reaches_message_plain() {
    config_error_reaches_message(false);
}

#[test]
fn a_config_error_reaches_message_procd() {
    config_error_reaches_message(true);
}

// ---------------------------------------------------------------------------------------
// Failures leave the previous proxy running

/// Something that is not a sockproxyd holds the port: it is left alone, nothing is
/// installed, and Message names it.
#[test]
fn a_port_held_by_another_program_is_left_alone() {
    let Some(lua) = lua() else { return };
    let mut r = Root::new("squatter", &lua);
    // Inline code: no path in its command line that could say "sockproxyd".
    let code = format!(
        "local s = assert(require('socket').bind('127.0.0.1', {})) while true do local c = s:accept() c:close() end",
        r.port
    );
    let child = Command::new(&lua)
        .args(["-e", &code])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the squatter");
    let squatter = child.id();
    r.adopt(child);
    wait_until(dur(10_000), "the squatter to listen", || {
        TcpStream::connect(("127.0.0.1", r.port)).is_ok()
    });
    r.upload(false);

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(false), "{}\n{}", ran.out, ran.err);
    let msg = r.var("Message");
    assert!(
        msg.contains(&format!(
            "cannot stop the running proxy: port {} is still in use by pid {squatter} (",
            r.port
        )),
        "Message: {msg}"
    );
    assert!(
        r.children[0].try_wait().expect("try_wait").is_none(),
        "the squatter was killed"
    );
    assert!(!r.path("usr/bin/sockproxyd").exists());
    assert!(!r.path("usr/bin/sockproxyd.new").exists());
    assert!(!r.path("etc/init.d/sockproxyd").exists());
    assert!(r.rc_links().is_empty());
}

/// An upload that is not a program for this box: nothing is touched, the original's
/// proxy keeps running, Message and the log say why.
#[test]
fn garbage_upload_leaves_the_original_install_untouched() {
    let Some(lua) = lua() else { return };
    let r = Root::new("garbage", &lua);
    let old_pid = r.original_install(false);
    fs::write(
        r.path("etc/cmh-ludl/sockproxyd-mipsel"),
        payload(64 * 1024, 7),
    )
    .expect("upload");
    let before = r.snapshot();

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(false), "{}\n{}", ran.out, ran.err);
    assert_eq!(r.snapshot(), before, "a failed install changed files");
    assert!(!r.path("usr/bin/sockproxyd").exists());
    assert!(alive(old_pid), "the original's proxy was stopped");
    assert!(is_old_lua(&greet(r.port).expect("greeting").0));
    assert_eq!(r.rc_calls(), ["start"], "the service was touched");
    let msg = r.var("Message");
    assert!(
        msg.contains("Not installed: sockproxyd-mipsel: it is not a program"),
        "Message: {msg}"
    );
    assert_eq!(r.var("ConfigVersion"), "20140");
    assert!(
        r.luup_log()
            .lines()
            .any(|l| l.starts_with("1\t") && l.contains("not a program")),
        "{}",
        r.luup_log()
    );
    assert_eq!(ran.failures(), ["1"]);
    // The health checks still come, and keep saying that the install failed.
    let ran = r.run(&["startup", "soon"]);
    assert_eq!(r.var("Status"), "1", "{}", ran.err);
    let msg = r.var("Message");
    assert!(
        msg.starts_with("Up; protocol 1; not installed: sockproxyd-mipsel: it is not a program"),
        "Message: {msg}"
    );
    assert!(alive(old_pid));
}

/// An ELF file for another architecture is refused without being run, naming both.
#[test]
fn a_daemon_for_another_architecture_is_refused_without_running_it() {
    let Some(lua) = lua() else { return };
    let r = Root::new("arch", &lua);
    // ELF header: 32-bit, big-endian, MIPS (e_machine 8); then garbage.
    let mut elf = vec![0x7f, b'E', b'L', b'F', 1, 2, 1, 0];
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&[0, 2, 0, 8]);
    elf.extend_from_slice(&payload(4096, 3));
    fs::write(r.path("etc/cmh-ludl/sockproxyd-mipsel"), elf).expect("upload");

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(false), "{}\n{}", ran.out, ran.err);
    let msg = r.var("Message");
    assert!(
        msg.contains("it is built for MIPS 32-bit big-endian and this controller is"),
        "Message: {msg}"
    );
    assert!(!r.path("usr/bin/sockproxyd").exists());
    assert!(!r.path("etc/init.d/sockproxyd").exists());
    assert!(r.rc_links().is_empty());
}

/// A daemon that answers --version but does not start: the previous install is put
/// back and started again, and Message says what happened.
#[test]
fn a_new_daemon_that_does_not_start_is_rolled_back() {
    let Some(lua) = lua() else { return };
    let r = Root::new("rollback", &lua);
    r.procd();
    r.config(false, None, &["start_timeout = 3"]);
    let old_pid = r.original_install(true);
    let old_init = fs::read(r.path("etc/init.d/sockproxyd")).expect("init");
    r.write(
        "etc/cmh-ludl/sockproxyd-mipsel",
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'sockproxyd 9.9.9 (build 99999)'; exit 0; }\necho 'config: line 1: bad' >&2\nexit 1\n",
    );

    let ran = r.run(&["startup"]);
    assert_eq!(ran.startup(), Some(false), "{}\n{}", ran.out, ran.err);
    let msg = r.var("Message");
    assert!(
        msg.contains("the new daemon did not start"),
        "Message: {msg}"
    );
    assert!(
        msg.contains("the previous proxy runs again"),
        "Message: {msg}"
    );
    // Its stderr, through procd's system log; not the old proxy's last log line.
    assert!(
        msg.contains("; the daemon said: config: line 1: bad"),
        "Message: {msg}"
    );
    assert!(!msg.contains("old lua proxy"), "a stale log line: {msg}");
    assert_eq!(
        fs::read(r.path("etc/init.d/sockproxyd")).expect("init"),
        old_init
    );
    assert_eq!(r.rc_links(), ["K80sockproxyd", "S80sockproxyd"]);
    assert!(
        !r.path("usr/bin/sockproxyd").exists(),
        "the failed binary was left"
    );
    assert!(!r.path("usr/bin/sockproxyd.old").exists());
    assert!(!r.path("etc/init.d/sockproxyd.new").exists());
    assert!(
        !alive(old_pid),
        "the old proxy was not stopped for the switch"
    );
    let g = wait_greeting(r.port, "the old proxy to greet again", is_old_lua);
    assert!(is_old_lua(&g));
    assert_eq!(r.var("ConfigVersion"), "20140");
}

// ---------------------------------------------------------------------------------------
// Health check

#[test]
fn health_check_is_up_against_the_real_daemon() {
    let Some(lua) = lua() else { return };
    let d = Daemon::start("http://127.0.0.1:9");
    let r = Root::new("up", &lua);
    r.config(false, Some(d.port()), &[]);
    let (mut c, _) = d.client();
    c.send(b"BILD\n");
    let bild = c.line();
    let build = bild.strip_prefix("OK ").expect("BILD answer").to_string();

    let ran = r.run(&["check"]);
    assert_eq!(r.var("Status"), "1", "{}\n{}", ran.out, ran.err);
    assert_eq!(r.var("Version"), "1");
    assert_eq!(r.var("Build"), build);
    assert_eq!(r.var("Message"), format!("Up; protocol 1, build {build}"));
    assert_eq!(ran.delays(), ["300 proxy_check "], "the next check");
    assert_eq!(ran.failures(), ["0"]);
}

#[test]
fn health_check_says_why_it_is_down_and_restarts_once() {
    let Some(lua) = lua() else { return };
    let r = Root::new("down", &lua);
    let port = free_port();
    r.config(false, Some(port), &[]);
    let init = r.write(
        "etc/init.d/sockproxyd",
        "#!/bin/sh /etc/rc.common\nstart() { :; }\nstop() { :; }\n",
    );
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).expect("chmod");

    let ran = r.run(&["check"]);
    assert_eq!(r.var("Status"), "0");
    let msg = r.var("Message");
    assert!(
        msg.starts_with(&format!(
            "Down: cannot connect to 127.0.0.1:{port} (connection refused); restarted the service"
        )),
        "Message: {msg}"
    );
    assert_eq!(r.rc_calls(), ["restart"]);
    assert_eq!(ran.delays(), ["300 proxy_check ", "15 proxy_check recheck"]);
    assert_eq!(ran.failures(), ["1"]);

    // The check after the restart: still down, said so, no second restart.
    let ran = r.run(&["check", "soon"]);
    let msg = r.var("Message");
    assert!(
        msg.contains("Down after a restart: cannot connect"),
        "Message: {msg}\n{}",
        ran.out
    );
    assert_eq!(
        r.rc_calls(),
        ["restart", "restart"],
        "one restart per failed check"
    );
}

// ---------------------------------------------------------------------------------------
// openLuup

#[test]
fn on_openluup_nothing_is_installed_and_the_check_restarts_nothing() {
    let Some(lua) = lua() else { return };
    let d = Daemon::start("http://127.0.0.1:9");
    let r = Root::new("openluup", &lua);
    r.config(true, Some(d.port()), &[]);
    r.upload(false);
    let ran = r.run(&["startup", "soon"]);
    assert_eq!(ran.startup(), Some(true), "{}\n{}", ran.out, ran.err);
    assert!(!r.path("usr/bin/sockproxyd").exists());
    assert!(!r.path("etc/init.d/sockproxyd").exists());
    assert!(r.rc_links().is_empty());
    assert_eq!(r.var("Status"), "1", "{}", r.var("Message"));
    assert!(r.var("ConfigVersion").is_empty());

    let down = free_port();
    r.config(true, Some(down), &[]);
    let init = r.write("etc/init.d/sockproxyd", "#!/bin/sh /etc/rc.common\n");
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).expect("chmod");
    let ran = r.run(&["check"]);
    assert_eq!(r.var("Status"), "0");
    assert_eq!(
        r.var("Message"),
        format!("Down: cannot connect to 127.0.0.1:{down} (connection refused)")
    );
    assert!(r.rc_calls().is_empty(), "openLuup: no restart");
    assert_eq!(ran.delays(), ["300 proxy_check "]);
}

// ---------------------------------------------------------------------------------------
// The plugin's files

#[test]
fn plugin_xml_and_json_files_parse() {
    let dir = top("openwrt/vera/plugin");
    let xml = ["D_SockProxy1.xml", "I_SockProxy1.xml", "S_SockProxy1.xml"];
    if have("xmllint") {
        for f in xml {
            let o = Command::new("xmllint")
                .arg("--noout")
                .arg(dir.join(f))
                .output()
                .expect("xmllint");
            assert!(
                o.status.success(),
                "{f}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    } else {
        eprintln!("xmllint is not installed (apt-get install libxml2-utils): XML not checked");
    }
    let json = fs::read_to_string(dir.join("D_SockProxy1.json")).expect("json");
    if let Err(at) = json_check(json.as_bytes()) {
        panic!(
            "D_SockProxy1.json: invalid JSON at byte {at}: {:?}",
            &json[at..(at + 40).min(json.len())]
        );
    }
    // The identity an existing device upgrades by.
    let d = fs::read_to_string(dir.join("D_SockProxy1.xml")).expect("D");
    for want in [
        "<deviceType>urn:schemas-toggledbits-com:device:SockProxy:1</deviceType>",
        "<serviceType>urn:schemas-toggledbits-com:service:SockProxy:1</serviceType>",
        "<serviceId>urn:toggledbits-com:serviceId:SockProxy1</serviceId>",
        "<SCPDURL>S_SockProxy1.xml</SCPDURL>",
        "<implementationFile>I_SockProxy1.xml</implementationFile>",
        "<staticJson>D_SockProxy1.json</staticJson>",
    ] {
        assert!(d.contains(want), "D_SockProxy1.xml lacks {want}");
    }
    let i = fs::read_to_string(dir.join("I_SockProxy1.xml")).expect("I");
    assert!(
        i.contains("<startup>startup</startup>") && i.contains("<files>L_SockProxy1.lua</files>")
    );
    let sv = fs::read_to_string(dir.join("S_SockProxy1.xml")).expect("S");
    assert!(sv.contains("<name>Message</name>") && sv.contains("<name>HandleReceive</name>"));
    assert!(sv.contains("<name>Pid</name>") && sv.contains("<direction>in</direction>"));
    assert!(json.contains("\"Variable\": \"Message\""));
}

/// Whether `b` is one JSON value (RFC 8259), or the byte offset where it stops being one.
fn json_check(b: &[u8]) -> Result<(), usize> {
    fn ws(b: &[u8], mut i: usize) -> usize {
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        }
        i
    }
    fn lit(b: &[u8], i: usize, word: &[u8]) -> Result<usize, usize> {
        if b.get(i..i + word.len()) == Some(word) {
            Ok(i + word.len())
        } else {
            Err(i)
        }
    }
    fn string(b: &[u8], mut i: usize) -> Result<usize, usize> {
        i += 1;
        while i < b.len() {
            match b[i] {
                b'"' => return Ok(i + 1),
                b'\\' => match b.get(i + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                    Some(b'u')
                        if b.get(i + 2..i + 6)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                    {
                        i += 6
                    }
                    _ => return Err(i),
                },
                c if c < 0x20 => return Err(i),
                _ => i += 1,
            }
        }
        Err(i)
    }
    fn number(b: &[u8], mut i: usize) -> Result<usize, usize> {
        let start = i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let digits = |b: &[u8], mut i: usize| {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            (i, i > s)
        };
        let (j, ok) = digits(b, i);
        if !ok || (b[i] == b'0' && j > i + 1) {
            return Err(start);
        }
        i = j;
        if b.get(i) == Some(&b'.') {
            let (j, ok) = digits(b, i + 1);
            if !ok {
                return Err(i);
            }
            i = j;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let (j, ok) = digits(b, i);
            if !ok {
                return Err(i);
            }
            i = j;
        }
        Ok(i)
    }
    fn value(b: &[u8], i: usize, depth: usize) -> Result<usize, usize> {
        let i = ws(b, i);
        if depth > 64 {
            return Err(i);
        }
        match b.get(i) {
            Some(b'{') => {
                let mut i = ws(b, i + 1);
                if b.get(i) == Some(&b'}') {
                    return Ok(i + 1);
                }
                loop {
                    if b.get(i) != Some(&b'"') {
                        return Err(i);
                    }
                    i = ws(b, string(b, i)?);
                    if b.get(i) != Some(&b':') {
                        return Err(i);
                    }
                    i = ws(b, value(b, i + 1, depth + 1)?);
                    match b.get(i) {
                        Some(b',') => i = ws(b, i + 1),
                        Some(b'}') => return Ok(i + 1),
                        _ => return Err(i),
                    }
                }
            }
            Some(b'[') => {
                let mut i = ws(b, i + 1);
                if b.get(i) == Some(&b']') {
                    return Ok(i + 1);
                }
                loop {
                    i = ws(b, value(b, i, depth + 1)?);
                    match b.get(i) {
                        Some(b',') => i += 1,
                        Some(b']') => return Ok(i + 1),
                        _ => return Err(i),
                    }
                }
            }
            Some(b'"') => string(b, i),
            Some(b't') => lit(b, i, b"true"),
            Some(b'f') => lit(b, i, b"false"),
            Some(b'n') => lit(b, i, b"null"),
            Some(b'-' | b'0'..=b'9') => number(b, i),
            _ => Err(i),
        }
    }
    let end = ws(b, value(b, 0, 0)?);
    if end == b.len() { Ok(()) } else { Err(end) }
}

#[test]
fn json_check_tells_valid_from_invalid() {
    for good in [
        "{}",
        "[1, -2.5e3, \"a\\u00e9\", true, null, {\"k\": []}]",
        " 0 ",
    ] {
        assert_eq!(json_check(good.as_bytes()), Ok(()), "{good}");
    }
    for bad in ["{", "{\"a\": 1,}", "[01]", "{'a': 1}", "[1] x", "\"\t\""] {
        assert!(json_check(bad.as_bytes()).is_err(), "{bad}");
    }
}
