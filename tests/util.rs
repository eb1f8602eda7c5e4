//! Test plumbing: starts the real `sockproxyd` binary and plays every peer it talks to.
//!
//! # In scope
//! - `Daemon`: spawns the binary (`SOCKPROXYD_BIN` overrides the path, `SOCKPROXYD_RUNNER`
//!   prefixes the command, as ripgrep's `cross_runner()`), waits for its
//!   `listening on ... (commands)` line, keeps its log, kills it on drop.
//! - `Client`: a command-port connection with deadline-bound reads.
//! - `Device`, `EchoDevice`, `NeverAccepts`: fake remotes that count what they saw.
//! - `FakeLuup`: the HTTP endpoint notifications go to; records every request.
//! - For the script tests: `lua()`, `have()`, `top()`, and `output_within` /
//!   `wait_within`, which run a command to its end or kill it at a deadline.
//! - Deadlines (`wait_until`, `dur`), payloads and an FNV-1a hash.
//!
//! # Out of scope
//! Assertions about the protocol: they live in the test modules.
//!
//! Everything listens on and connects to loopback only. Nothing waits with a bare sleep:
//! waits poll a condition until a deadline and fail with a message saying what was awaited.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{
    Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Time

/// Multiplier for every deadline: `SOCKPROXYD_TIME_SCALE`, default 1, or 4 under a
/// runner (qemu is slow). Lower bounds ("not before ...") are never scaled.
pub fn scale() -> u32 {
    if let Ok(s) = std::env::var("SOCKPROXYD_TIME_SCALE")
        && let Ok(n) = s.trim().parse::<u32>()
        && n > 0
    {
        return n;
    }
    if runner().is_empty() { 1 } else { 4 }
}

/// `ms` milliseconds, scaled for slow targets.
pub fn dur(ms: u64) -> Duration {
    Duration::from_millis(ms * u64::from(scale()))
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Checks that `cond` keeps holding for the whole of `window` (for "nothing more
/// happens" assertions, which need some window to be meaningful).
#[track_caller]
pub fn holds_for(window: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(cond(), "{what} stopped holding");
        thread::sleep(Duration::from_millis(10));
    }
    assert!(cond(), "{what} stopped holding");
}

// ---------------------------------------------------------------------------------------
// Data

/// FNV-1a, 64 bit: enough to compare megabytes without printing them.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `len` bytes: every byte value 0..=255, then CR/LF mixtures and command-like text,
/// then pseudo-random bytes from `seed`.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    v.extend_from_slice(b"\r\n\n\r\r\nQUIT\nSTOP\r\nOK CONN x\n\0\0\xff");
    let mut x = seed | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A port that was free a moment ago, for a listener the daemon opens itself (direct
/// ports, `-p` in script tests) or for a port that must stay closed.
///
/// Ports come from below the kernel's ephemeral range, each handed out once per test
/// process (starting at an offset drawn from the process id), and only if TCP and UDP
/// can both bind it on every address. A port from `bind(":0")` would do once, but the
/// kernel may give that same port to another test's `:0` listener or outgoing
/// connection before the daemon binds it ("Address in use" under a loaded CI runner).
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.clamp(10_000 + 1_000, 65_536));
    let span = high - low;
    let start = std::process::id() as usize * 7919;
    for _ in 0..span {
        let port = (low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = TcpListener::bind(("0.0.0.0", port));
        let udp = std::net::UdpSocket::bind(("0.0.0.0", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}")
}

/// Percent-decodes a query value (`%XX` only; `+` is kept as is).
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(hex) = std::str::from_utf8(&b[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// True when `s` is a valid percent-encoded value of the strict kind PROTOCOL.md asks for:
/// only `A-Z a-z 0-9 _ . ~ -` raw, everything else as `%XX`.
pub fn is_strictly_encoded(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphanumeric() || b"_.~-".contains(&c) {
            i += 1;
        } else if c == b'%'
            && b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
        {
            i += 3;
        } else {
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// The binary, the tree and the tools

/// `SOCKPROXYD_RUNNER` as written (trimmed): the shell text that runs a target binary,
/// empty without a runner. Init scripts and wrapper scripts get it as is.
pub fn runner_line() -> String {
    std::env::var("SOCKPROXYD_RUNNER")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `SOCKPROXYD_RUNNER` split into the program and its arguments (empty without one).
fn runner() -> Vec<String> {
    runner_line()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The daemon under test: `SOCKPROXYD_BIN`, else the binary cargo built.
pub fn bin_path() -> PathBuf {
    match std::env::var_os("SOCKPROXYD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_sockproxyd")),
    }
}

/// `rel` in the source tree (scripts, fixtures).
pub fn top(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A path as text, for scripts and command lines.
pub fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// Whether `sh` finds `cmd` on the test's own PATH.
pub fn have(cmd: &str) -> bool {
    sh_finds(cmd, "command -v \"$1\"")
}

/// Whether `sh` finds `cmd`, looking where init scripts look too (`/sbin`, `/usr/sbin`
/// before PATH), for the tools an init script may call (start-stop-daemon).
pub fn have_for_init_scripts(cmd: &str) -> bool {
    sh_finds(cmd, "PATH=/sbin:/usr/sbin:$PATH command -v \"$1\"")
}

fn sh_finds(cmd: &str, script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script, "sh", cmd])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Lua interpreter with LuaSocket (`LUA`, default `lua5.1`), or `None` with the
/// reason printed, for tests that skip without it.
pub fn lua() -> Option<String> {
    let lua = std::env::var("LUA").unwrap_or_else(|_| "lua5.1".to_string());
    match Command::new(&lua).args(["-e", "require 'socket'"]).output() {
        Ok(o) if o.status.success() => Some(lua),
        Ok(o) => {
            eprintln!(
                "skipping: {lua} cannot load LuaSocket (apt-get install lua-socket): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            None
        }
        Err(e) => {
            eprintln!("skipping: cannot run {lua} (apt-get install lua5.1 lua-socket): {e}");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running a command to its end

/// Waits for `child` to exit, polling; kills and reaps it once `timeout` has passed.
/// Returns its exit status and whether it was killed for the timeout; what a timeout
/// means is the caller's to say.
pub fn wait_within(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return (st, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("wait after kill"), true);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` with no stdin, collecting stdout and stderr (each read on a thread of its
/// own, so neither pipe fills); kills it after `timeout`. Returns what it left and
/// whether it was killed for the timeout. After a kill the output is what arrived
/// within another second: a process it started may hold the pipes open for longer.
/// `Err` when it cannot be started.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> io::Result<(Output, bool)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = chunks_on_thread(child.stdout.take().expect("stdout"));
    let err = chunks_on_thread(child.stderr.take().expect("stderr"));
    let (status, timed_out) = wait_within(&mut child, timeout);
    let until = timed_out.then(|| Instant::now() + Duration::from_secs(1));
    let output = Output {
        status,
        stdout: collect_chunks(&out, until),
        stderr: collect_chunks(&err, until),
    };
    Ok((output, timed_out))
}

/// Reads `r` to EOF on a thread of its own, passing each chunk on as it comes.
fn chunks_on_thread(mut r: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// The chunks from `rx` up to the reader's EOF, or only those that came by `until`.
fn collect_chunks(rx: &Receiver<Vec<u8>>, until: Option<Instant>) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let chunk = match until {
            None => rx.recv().ok(),
            Some(t) => rx
                .recv_timeout(t.saturating_duration_since(Instant::now()))
                .ok(),
        };
        match chunk {
            Some(c) => v.extend_from_slice(&c),
            None => return v,
        }
    }
}

/// The command that runs the daemon with `args`, under the runner if one is set.
pub fn command(args: &[String]) -> Command {
    let mut r = runner();
    let mut cmd = if r.is_empty() {
        Command::new(bin_path())
    } else {
        let mut c = Command::new(r.remove(0));
        c.args(r).arg(bin_path());
        c
    };
    cmd.args(args);
    cmd
}

/// Runs the daemon to completion (for options that make it exit at once); kills it
/// after `timeout`.
#[track_caller]
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (output, timed_out) = output_within(&mut command(&args), timeout)
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", bin_path()));
    if timed_out {
        panic!("sockproxyd {args:?} did not exit within {timeout:?}");
    }
    output
}

// ---------------------------------------------------------------------------------------
// Daemon

/// The daemon's log: stderr lines as they arrive, plus a log file if it writes one.
#[derive(Default)]
pub struct Log {
    lines: Mutex<Vec<String>>,
    cv: Condvar,
    file: Mutex<Option<PathBuf>>,
    /// The stderr reader reached EOF.
    stderr_done: std::sync::atomic::AtomicBool,
}

impl Log {
    /// Every line so far: stderr first, then the log file if there is one.
    pub fn lines(&self) -> Vec<String> {
        let mut v = self.lines.lock().expect("log lock").clone();
        if let Some(p) = self.file.lock().expect("log lock").as_ref()
            && let Ok(text) = std::fs::read_to_string(p)
        {
            v.extend(text.lines().map(str::to_string));
        }
        v
    }
}

pub struct Daemon {
    child: Child,
    /// The command port, from the `(commands)` line.
    pub addr: SocketAddr,
    pub log: Arc<Log>,
    name: String,
}

/// Why a daemon did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub log: Vec<String>,
}

/// Parses `listening on <addr> (<what>)` out of a log line.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, String)> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let (addr, what) = rest.split_once(" (")?;
    let addr: SocketAddr = addr.trim().parse().ok()?;
    let what = what.trim_end().strip_suffix(')')?;
    Some((addr, what.to_string()))
}

/// The usual arguments: loopback, ephemeral port, notifications to `luup`, debug log.
pub fn std_args(luup: &str) -> Vec<String> {
    ["-a", "127.0.0.1", "-p", "0", "-N", luup, "-D"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Daemon {
    /// Starts a daemon whose notifications go to `luup` (a URL).
    pub fn start(luup: &str) -> Daemon {
        Self::start_args(&std_args(luup))
    }

    /// Starts a daemon with exactly `args`; panics with its log if it does not get ready.
    #[track_caller]
    pub fn start_args(args: &[String]) -> Daemon {
        Self::spawn(args, None).unwrap_or_else(|f| {
            panic!(
                "sockproxyd {args:?} did not get ready (exit status {:?}); its log:\n{}",
                f.status,
                f.log.join("\n")
            )
        })
    }

    /// Starts the daemon with `args`. Its log is read from stderr, and also from
    /// `log_file` when the arguments send the log there. Ready means a
    /// `listening on <ip:port> (commands)` line; an exit before that is a `StartFailure`.
    pub fn spawn(args: &[String], log_file: Option<&Path>) -> Result<Daemon, StartFailure> {
        Self::spawn_command(command(args), log_file)
    }

    /// `spawn` with a command of the caller's making (from `command`, e.g. with a
    /// `pre_exec` hook added).
    pub fn spawn_command(
        mut cmd: Command,
        log_file: Option<&Path>,
    ) -> Result<Daemon, StartFailure> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", bin_path()));
        let log = Arc::new(Log::default());
        *log.file.lock().expect("log lock") = log_file.map(Path::to_path_buf);
        let stderr = child.stderr.take().expect("stderr piped");
        let log2 = Arc::clone(&log);
        thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        log2.lines.lock().expect("log lock").push(line);
                        log2.cv.notify_all();
                    }
                }
            }
            log2.stderr_done.store(true, Ordering::SeqCst);
        });
        let deadline = Instant::now() + dur(15_000);
        loop {
            let lines = log.lines();
            if let Some((addr, _)) = lines
                .iter()
                .filter_map(|l| parse_listening(l))
                .find(|(_, what)| what == "commands")
            {
                let name = format!("sockproxyd[{}]@{addr}", child.id());
                return Ok(Daemon {
                    child,
                    addr,
                    log,
                    name,
                });
            }
            if let Some(st) = child.try_wait().expect("try_wait") {
                // Let the stderr thread catch the last words.
                let t = Instant::now();
                while !log.stderr_done.load(Ordering::SeqCst) && t.elapsed() < dur(2_000) {
                    thread::sleep(Duration::from_millis(10));
                }
                return Err(StartFailure {
                    status: Some(st),
                    log: log.lines(),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartFailure {
                    status: None,
                    log: log.lines(),
                });
            }
            let g = log.lines.lock().expect("log lock");
            let _ = log.cv.wait_timeout(g, Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// All log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The log's WARN lines so far.
    pub fn warnings(&self) -> Vec<String> {
        let mut lines = self.log_lines();
        lines.retain(|l| l.contains("WARN"));
        lines
    }

    /// Waits for a log line matching `pred`, returns it.
    #[track_caller]
    pub fn wait_log(&self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        wait_until(timeout, &format!("a log line: {what}"), || {
            found = self.log_lines().into_iter().find(|l| pred(l));
            found.is_some()
        });
        found.expect("found")
    }

    /// The address of the `[direct]` listener to `target` (from its `listening on` line).
    #[track_caller]
    pub fn direct_addr(&self, target: &str) -> SocketAddr {
        let want = format!("direct to {target}");
        let mut found = None;
        wait_until(
            dur(5_000),
            &format!("a 'listening on ... ({want})' line"),
            || {
                found = self
                    .log_lines()
                    .iter()
                    .filter_map(|l| parse_listening(l))
                    .find(|(_, what)| *what == want)
                    .map(|(a, _)| a);
                found.is_some()
            },
        );
        found.expect("found")
    }

    /// A new connection to the command port (greeting not yet read).
    #[track_caller]
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// A new connection with its greeting read; returns it and its id.
    #[track_caller]
    pub fn client(&self) -> (Client, String) {
        let mut c = self.connect();
        let id = c.greet();
        (c, id)
    }

    /// Runs `STAT` on a fresh connection: the header and the rows.
    #[track_caller]
    pub fn stat(&self) -> Stat {
        let (mut c, id) = self.client();
        c.send(b"STAT\nQUIT\n");
        let all = c.read_to_eof(dur(5_000));
        let text = String::from_utf8_lossy(&all).to_string();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let end = lines
            .iter()
            .position(|l| *l == "OK QUIT")
            .unwrap_or_else(|| panic!("STAT + QUIT: no 'OK QUIT' line in {text:?}"));
        lines.truncate(end);
        assert!(!lines.is_empty(), "STAT printed no header line: {text:?}");
        let header = lines.remove(0).to_string();
        let rows = lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| StatRow::parse(l))
            .collect();
        Stat {
            header,
            rows,
            asker: id,
            text,
        }
    }

    /// Polls STAT until only the asking connection is left.
    #[track_caller]
    pub fn wait_no_other_connections(&self, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.stat();
            if st.rows.len() == 1 && st.rows[0].mine {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: after {timeout:?} STAT still shows other connections:\n{}",
                    st.text
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    #[track_caller]
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Waits for the daemon to exit; panics after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- log of {} ----", self.name);
            for l in self.log_lines() {
                eprintln!("{l}");
            }
            eprintln!("---- end of log ----");
        }
    }
}

pub struct Stat {
    pub header: String,
    pub rows: Vec<StatRow>,
    /// Id of the connection that asked.
    pub asker: String,
    pub text: String,
}

impl Stat {
    pub fn row(&self, id: &str) -> Option<&StatRow> {
        self.rows.iter().find(|r| r.id == id)
    }
}

#[derive(Debug, Clone)]
pub struct StatRow {
    /// The row was marked `*` (the asking connection).
    pub mine: bool,
    pub id: String,
    /// Whitespace-separated fields after the marker: id, state, idle, uptime, client,
    /// and for echo rows remote, #recv, #xmit and notify.
    pub fields: Vec<String>,
    pub raw: String,
}

impl StatRow {
    fn parse(line: &str) -> StatRow {
        let mine = line.starts_with('*');
        assert!(
            mine || line.starts_with(' '),
            "STAT row does not start with '*' or a space: {line:?}"
        );
        let fields: Vec<String> = line[1..].split_whitespace().map(str::to_string).collect();
        assert!(!fields.is_empty(), "empty STAT row {line:?}");
        StatRow {
            mine,
            id: fields[0].clone(),
            fields,
            raw: line.to_string(),
        }
    }

    pub fn state(&self) -> &str {
        self.fields.get(1).map(String::as_str).unwrap_or("")
    }
}

// ---------------------------------------------------------------------------------------
// Client

/// Why a read ended early.
#[derive(Debug)]
pub enum ReadEnd {
    Eof(Vec<u8>),
    Timeout(Vec<u8>),
    Error(io::Error, Vec<u8>),
}

/// A connection to the daemon. Reads keep what they did not consume in `buf`.
pub struct Client {
    pub stream: TcpStream,
    pub buf: VecDeque<u8>,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, dur(5_000))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        let _ = stream.set_nodelay(true);
        Client {
            stream,
            buf: VecDeque::new(),
        }
    }

    /// Reads whatever arrives next into `buf`; Ok(0) on EOF.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline"));
        }
        self.stream
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
        let mut tmp = [0u8; 65536];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(io::Error::new(ErrorKind::TimedOut, "deadline"));
                }
                // A reset after the daemon closed with our bytes unread: same as EOF here.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next line without its LF, or why there is none.
    pub fn try_line(&mut self, deadline: Instant) -> Result<String, ReadEnd> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line[..line.len() - 1]).to_string());
            }
            match self.fill(deadline) {
                Ok(0) => return Err(ReadEnd::Eof(self.buf.drain(..).collect())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::TimedOut => {
                    return Err(ReadEnd::Timeout(self.buf.iter().copied().collect()));
                }
                Err(e) => return Err(ReadEnd::Error(e, self.buf.drain(..).collect())),
            }
        }
    }

    /// The next line (without LF) within `timeout`, or a panic saying what came instead.
    #[track_caller]
    pub fn line_within(&mut self, timeout: Duration) -> String {
        match self.try_line(Instant::now() + timeout) {
            Ok(l) => l,
            Err(ReadEnd::Eof(rest)) => {
                panic!(
                    "expected a line, got EOF (after {:?})",
                    String::from_utf8_lossy(&rest)
                )
            }
            Err(ReadEnd::Timeout(rest)) => panic!(
                "expected a line within {timeout:?}, got only {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(ReadEnd::Error(e, rest)) => {
                panic!(
                    "expected a line, got error {e} (after {:?})",
                    String::from_utf8_lossy(&rest)
                )
            }
        }
    }

    /// The next line within the usual 5 s.
    #[track_caller]
    pub fn line(&mut self) -> String {
        self.line_within(dur(5_000))
    }

    /// Reads one line and checks it is exactly `want`.
    #[track_caller]
    pub fn expect_line(&mut self, want: &str) {
        let got = self.line();
        assert_eq!(got, want, "reply line");
    }

    /// Reads the greeting, checks its form, returns the id.
    #[track_caller]
    pub fn greet(&mut self) -> String {
        let g = self.line();
        let id = g
            .strip_prefix("OK TOGGLEDBITS-SOCKPROXY 1 ")
            .unwrap_or_else(|| panic!("greeting {g:?} is not 'OK TOGGLEDBITS-SOCKPROXY 1 <id>'"));
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "greeting id {id:?} is not lowercase hex (greeting {g:?})"
        );
        id.to_string()
    }

    #[track_caller]
    pub fn send(&mut self, data: &[u8]) {
        self.stream
            .write_all(data)
            .unwrap_or_else(|e| panic!("send {} bytes: {e}", data.len()));
    }

    /// Exactly `n` bytes within `timeout`.
    #[track_caller]
    pub fn read_n(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        while self.buf.len() < n {
            match self.fill(deadline) {
                Ok(0) => panic!("EOF after {} of {n} expected bytes", self.buf.len()),
                Ok(_) => {}
                Err(e) => panic!(
                    "{e} after {} of {n} expected bytes (within {timeout:?})",
                    self.buf.len()
                ),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Everything up to EOF within `timeout`.
    #[track_caller]
    pub fn read_to_eof(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.fill(deadline) {
                Ok(0) => return self.buf.drain(..).collect(),
                Ok(_) => {}
                Err(e) => panic!(
                    "{e} waiting for EOF within {timeout:?}; {} bytes so far: {:?}",
                    self.buf.len(),
                    String::from_utf8_lossy(
                        &self.buf.iter().copied().take(200).collect::<Vec<_>>()
                    )
                ),
            }
        }
    }

    /// Reads to EOF and checks that nothing else arrived.
    #[track_caller]
    pub fn expect_eof(&mut self, timeout: Duration) {
        let rest = self.read_to_eof(timeout);
        assert!(
            rest.is_empty(),
            "expected EOF, got {:?} first",
            String::from_utf8_lossy(&rest)
        );
    }

    /// Reads one line, checks it, then checks the connection is closed.
    #[track_caller]
    pub fn expect_line_then_eof(&mut self, want: &str) {
        self.expect_line(want);
        self.expect_eof(dur(5_000));
    }

    /// Whether the connection is still open after `window` with nothing received.
    pub fn quiet_for(&mut self, window: Duration) -> Result<(), String> {
        match self.fill(Instant::now() + window) {
            Err(e) if e.kind() == ErrorKind::TimedOut => Ok(()),
            Ok(0) => Err("EOF".into()),
            Ok(n) => Err(format!("{n} unexpected bytes: {:?}", self.buf)),
            Err(e) => Err(e.to_string()),
        }
    }

    #[track_caller]
    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
    }

    /// A second handle on the socket (for a writer thread), with nothing buffered.
    pub fn writer(&self) -> TcpStream {
        self.stream.try_clone().expect("try_clone")
    }
}

/// `CONN` then `OK CONN`: returns the pid in the reply. Fails on anything else.
#[track_caller]
pub fn conn_ok(c: &mut Client, line: &str) -> String {
    c.send(format!("{line}\n").as_bytes());
    let r = c.line_within(dur(8_000));
    r.strip_prefix("OK CONN ")
        .unwrap_or_else(|| panic!("{line:?} answered {r:?}, expected 'OK CONN <pid>'"))
        .to_string()
}

/// Connects a client through the daemon to `dev` with `CONN <dev> <options>`; returns
/// the client and the device's side of the connection (as a `Client`, for its
/// deadline-bound reads).
#[track_caller]
pub fn through(d: &Daemon, dev: &Device, options: &str) -> (Client, Client) {
    let (mut c, _) = d.client();
    conn_ok(
        &mut c,
        format!("CONN {} {options}", dev.target()).trim_end(),
    );
    let r = Client::from_stream(dev.accept());
    (c, r)
}

/// A TCP connection with a small receive buffer (set before connect, so the window is
/// small from the start): a slow reader whose kernel cannot hide the slowness.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    let fd = socket_with_rcvbuf(rcvbuf);
    // SAFETY: plain socket calls on a fd we own; it is handed to TcpStream at the end.
    unsafe {
        let sa = sockaddr_in(v4);
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect {addr}: {}", io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// A new IPv4 TCP socket (close-on-exec) with SO_RCVBUF set to `rcvbuf`; the caller
/// owns the fd.
fn socket_with_rcvbuf(rcvbuf: i32) -> RawFd {
    // SAFETY: socket(2) and setsockopt(2) with a pointer to a live i32 and its size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let r = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
        fd
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

// ---------------------------------------------------------------------------------------
// Fake devices

/// A TCP listener that hands each accepted connection to the test and counts them.
pub struct Device {
    pub addr: SocketAddr,
    rx: Mutex<Receiver<TcpStream>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Device {
    pub fn listen() -> Device {
        Self::listen_on("127.0.0.1:0")
    }

    pub fn listen_on(addr: impl ToSocketAddrs) -> Device {
        Self::from_listener(TcpListener::bind(addr).expect("device bind"))
    }

    /// A device whose connections have a small receive buffer (set on the listening
    /// socket, so accepted ones inherit it from the start): a slow reader whose
    /// kernel cannot hide the slowness.
    pub fn listen_small_rcvbuf(rcvbuf: i32) -> Device {
        let fd = socket_with_rcvbuf(rcvbuf);
        // SAFETY: plain socket calls on a fd we own; it is handed to TcpListener.
        let l = unsafe {
            let sa = sockaddr_in(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let r = libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len);
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            let r = libc::listen(fd, 16);
            assert_eq!(r, 0, "listen: {}", io::Error::last_os_error());
            TcpListener::from_raw_fd(fd)
        };
        Self::from_listener(l)
    }

    fn from_listener(l: TcpListener) -> Device {
        let addr = l.local_addr().expect("local_addr");
        let (tx, rx) = channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = Arc::clone(&accepted);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        Device {
            addr,
            rx: Mutex::new(rx),
            accepted,
        }
    }

    /// `host:port` for a CONN line.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The next accepted connection, or a panic after `timeout`.
    #[track_caller]
    pub fn accept_within(&self, timeout: Duration) -> TcpStream {
        let s = self
            .rx
            .lock()
            .expect("device lock")
            .recv_timeout(timeout)
            .unwrap_or_else(|_| {
                panic!("device {} saw no connection within {timeout:?}", self.addr)
            });
        let _ = s.set_nodelay(true);
        s
    }

    #[track_caller]
    pub fn accept(&self) -> TcpStream {
        self.accept_within(dur(5_000))
    }

    /// The next accepted connection, if one comes within `timeout`.
    pub fn try_accept(&self, timeout: Duration) -> Option<TcpStream> {
        self.rx
            .lock()
            .expect("device lock")
            .recv_timeout(timeout)
            .ok()
    }

    pub fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A device that echoes every byte on every connection, and passes a client's EOF
/// back as its own EOF. Counts bytes.
pub struct EchoDevice {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicUsize>,
}

impl EchoDevice {
    pub fn start() -> EchoDevice {
        let l = TcpListener::bind("127.0.0.1:0").expect("echo bind");
        let addr = l.local_addr().expect("local_addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (acc, by) = (Arc::clone(&accepted), Arc::clone(&bytes));
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                let by = Arc::clone(&by);
                thread::spawn(move || {
                    let mut w = s.try_clone().expect("clone");
                    let mut buf = [0u8; 32768];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                by.fetch_add(n, Ordering::SeqCst);
                                if w.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown(Shutdown::Write);
                });
            }
        });
        EchoDevice {
            addr,
            accepted,
            bytes,
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

/// A loopback listener whose accept queue is full (`listen(fd, 0)` plus a filler
/// connection): further connects to it never complete, they just wait for a SYN-ACK.
pub struct NeverAccepts {
    fd: RawFd,
    pub addr: SocketAddr,
    _fillers: Vec<TcpStream>,
}

impl NeverAccepts {
    pub fn new() -> NeverAccepts {
        // SAFETY: plain socket calls on a fd we own and close on drop.
        let (fd, addr) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            let sa = sockaddr_in(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let r = libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len);
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            let r = libc::listen(fd, 0);
            assert_eq!(r, 0, "listen: {}", io::Error::last_os_error());
            let mut out: libc::sockaddr_in = std::mem::zeroed();
            let mut olen = len;
            let r = libc::getsockname(fd, (&mut out as *mut libc::sockaddr_in).cast(), &mut olen);
            assert_eq!(r, 0, "getsockname: {}", io::Error::last_os_error());
            let port = u16::from_be(out.sin_port);
            (
                fd,
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
            )
        };
        // The first connect fills the queue; later ones hang (and time out here).
        let mut fillers = Vec::new();
        for _ in 0..3 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                fillers.push(s);
            }
        }
        assert!(
            !fillers.is_empty(),
            "could not fill the accept queue of {addr}"
        );
        // Check that a connect now really hangs.
        let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            probe.is_err(),
            "a connect to the full listener {addr} still completed"
        );
        NeverAccepts {
            fd,
            addr,
            _fillers: fillers,
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for NeverAccepts {
    fn drop(&mut self) {
        // SAFETY: closing the fd we opened.
        unsafe {
            libc::close(self.fd);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fake Luup

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LuupMode {
    /// `200 OK` with a small JSON body.
    Ok,
    /// `401 Unauthorized`, as Vera answers an unknown service/action.
    Unauthorized,
    /// `200 OK` with body `ERROR: No implementation`, as openLuup does.
    ErrorBody,
    /// `200 OK` with an `ERROR:` body holding an escape sequence and a CR.
    ErrorBodyControl,
    /// Read the request, then never answer (until `release_stalled`).
    Stall,
    /// `500 Internal Server Error`.
    ServerError,
    /// Bytes that are not HTTP at all, then close.
    Garbage,
}

#[derive(Clone, Debug)]
pub struct Request {
    /// e.g. `GET /data_request?... HTTP/1.1`
    pub line: String,
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// When the request's headers were complete.
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The raw query pairs, in order.
    pub fn query(&self) -> Vec<(String, String)> {
        let q = self.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.to_string(), String::new()),
            })
            .collect()
    }

    /// A query value, raw (still percent-encoded).
    pub fn raw(&self, key: &str) -> Option<String> {
        self.query()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// A query value, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        self.raw(key)
            .map(|v| String::from_utf8_lossy(&percent_decode(&v)).to_string())
    }
}

#[derive(Default)]
struct LuupState {
    mode: Mutex<Option<LuupMode>>,
    /// How long each answer waits after its request (`set_delay`).
    delay: Mutex<Duration>,
    reqs: Mutex<Vec<Request>>,
    stalled: Mutex<Vec<TcpStream>>,
}

/// The Luup HTTP endpoint: records every request, answers as `mode` says.
pub struct FakeLuup {
    pub addr: SocketAddr,
    state: Arc<LuupState>,
}

impl FakeLuup {
    pub fn start() -> FakeLuup {
        Self::with_mode(LuupMode::Ok)
    }

    pub fn with_mode(mode: LuupMode) -> FakeLuup {
        let l = TcpListener::bind("127.0.0.1:0").expect("luup bind");
        let addr = l.local_addr().expect("local_addr");
        let state = Arc::new(LuupState::default());
        *state.mode.lock().expect("lock") = Some(mode);
        let st = Arc::clone(&state);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let st = Arc::clone(&st);
                thread::spawn(move || serve(s, &st));
            }
        });
        FakeLuup { addr, state }
    }

    /// The base URL to give the daemon with `-N`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, m: LuupMode) {
        *self.state.mode.lock().expect("lock") = Some(m);
    }

    /// Every later answer waits `d` after its request has come (a slow Luup).
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().expect("lock") = d;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.reqs.lock().expect("lock").clone()
    }

    /// Requests whose `Pid` is `pid`.
    pub fn for_pid(&self, pid: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.param("Pid").as_deref() == Some(pid))
            .collect()
    }

    /// Waits until at least `n` requests match `pred`; returns those.
    #[track_caller]
    pub fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Request) -> bool,
    ) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Request> = self.requests().into_iter().filter(|r| pred(r)).collect();
            if got.len() >= n {
                return got;
            }
            if Instant::now() >= deadline {
                let all: Vec<String> = self.requests().iter().map(|r| r.line.clone()).collect();
                panic!(
                    "timed out after {timeout:?} waiting for {n} notification(s) {what}; got {}; all requests: {all:#?}",
                    got.len()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `n` notifications with `Pid=pid`.
    #[track_caller]
    pub fn wait_pid(&self, pid: &str, n: usize, timeout: Duration) -> Vec<Request> {
        self.wait_for(n, timeout, &format!("with Pid={pid}"), |r| {
            r.param("Pid").as_deref() == Some(pid)
        })
    }

    /// Answers (200) and closes every stalled request.
    pub fn release_stalled(&self) {
        for mut s in self.state.stalled.lock().expect("lock").drain(..) {
            let _ = s.write_all(&response(LuupMode::Ok));
        }
    }
}

fn response(mode: LuupMode) -> Vec<u8> {
    let (status, body) = match mode {
        LuupMode::Ok | LuupMode::Stall => ("200 OK", "{ \"u:HandleReceiveResponse\": {} }"),
        LuupMode::Unauthorized => ("401 Unauthorized", "Invalid Service"),
        LuupMode::ErrorBody => ("200 OK", "ERROR: No implementation"),
        LuupMode::ErrorBodyControl => ("200 OK", "ERROR: x\x1b[31my\rz"),
        LuupMode::ServerError => ("500 Internal Server Error", "Lua error"),
        LuupMode::Garbage => return b"\x00\xffSSH-2.0-not-http\r\n\x1b[0m\r\n\r\n".to_vec(),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(mut s: TcpStream, st: &LuupState) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&tmp[..n]),
        }
    };
    let at = Instant::now();
    let head = String::from_utf8_lossy(&data[..end]).to_string();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("").to_string();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mode = st.mode.lock().expect("lock").unwrap_or(LuupMode::Ok);
    st.reqs.lock().expect("lock").push(Request {
        line,
        method,
        target,
        headers,
        at,
    });
    if mode == LuupMode::Stall {
        st.stalled.lock().expect("lock").push(s);
        return;
    }
    let delay = *st.delay.lock().expect("lock");
    if !delay.is_zero() {
        thread::sleep(delay); // Luup taking its time, not a wait for a condition
    }
    let _ = s.write_all(&response(mode));
    let _ = s.shutdown(Shutdown::Write);
    // Let the client read the answer before the socket goes away.
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.read(&mut tmp);
}

// ---------------------------------------------------------------------------------------
// Other hosts, resource limits, /proc (access and fault tests)

/// A TCP connection to `dst` from the local address `src` (port chosen by the kernel).
/// The whole of 127.0.0.0/8 is local, so a client bound to 127.0.0.2 is another host
/// as far as `allow=` and `stop_from=` are concerned.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        return Err(io::Error::new(ErrorKind::InvalidInput, "IPv4 only"));
    };
    // SAFETY: plain socket calls on a fd we own; it is handed to TcpStream (which closes
    // it) or closed here on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = sockaddr_in(SocketAddrV4::new(src, 0));
        if libc::bind(fd, (&sa as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let sa = sockaddr_in(dst);
        if libc::connect(fd, (&sa as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

impl Client {
    /// `connect` from the local address `src`.
    #[track_caller]
    pub fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> Client {
        let s = connect_from(src, addr).unwrap_or_else(|e| panic!("connect {src} -> {addr}: {e}"));
        Client::from_stream(s)
    }

    /// Reads until EOF and checks that not one byte came (no greeting, no error line).
    /// A reset counts as EOF.
    #[track_caller]
    pub fn expect_silent_close(&mut self, timeout: Duration) {
        let got = self.read_to_eof(timeout);
        assert!(
            got.is_empty(),
            "expected a close with nothing sent, got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}

/// The first IPv4 address of this machine outside 127.0.0.0/8 (an interface that is
/// up), if there is one: a source address that is not loopback at all.
pub fn non_loopback_ipv4() -> Option<Ipv4Addr> {
    let mut found = None;
    // SAFETY: getifaddrs/freeifaddrs as documented; the list is only read in between.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return None;
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            let up = ifa.ifa_flags & (libc::IFF_UP as libc::c_uint) != 0;
            if !up || ifa.ifa_addr.is_null() {
                continue;
            }
            if i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() && !ip.is_unspecified() {
                found = Some(ip);
                break;
            }
        }
        libc::freeifaddrs(head);
    }
    found
}

/// Sends RST instead of FIN: SO_LINGER with a zero timeout, then close.
#[track_caller]
pub fn abort(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(s);
}

impl Daemon {
    /// Starts a daemon with `args` whose descriptor limit (RLIMIT_NOFILE, soft and
    /// hard) is `nofile`, as `ulimit -n` would set it.
    #[track_caller]
    pub fn start_nofile(args: &[String], nofile: u64) -> Daemon {
        Self::start_nofile_soft_hard(args, nofile, nofile)
    }

    /// Starts a daemon with RLIMIT_NOFILE `soft`/`hard`, as a shell's `ulimit -Sn`/`-Hn`
    /// leave it.
    #[track_caller]
    pub fn start_nofile_soft_hard(args: &[String], soft: u64, hard: u64) -> Daemon {
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
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::spawn_command(cmd, None).unwrap_or_else(|f| {
            panic!(
                "sockproxyd {args:?} (nofile {soft}/{hard}) did not get ready (exit status {:?}); its log:\n{}",
                f.status,
                f.log.join("\n")
            )
        })
    }

    /// How many log lines so far match `pred`.
    pub fn log_count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.log_lines().iter().filter(|l| pred(l)).count()
    }

    /// Resident memory (`VmRSS` of /proc/<pid>/status), KiB.
    #[track_caller]
    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid()).unwrap_or_else(|| panic!("no VmRSS for {}", self.name))
    }

    /// CPU time used so far (user + system, /proc/<pid>/stat).
    #[track_caller]
    pub fn cpu_time(&self) -> Duration {
        proc_cpu_time(self.pid()).unwrap_or_else(|| panic!("no /proc stat for {}", self.name))
    }

    /// Open descriptors (/proc/<pid>/fd).
    #[track_caller]
    pub fn fd_count(&self) -> usize {
        proc_fd_count(self.pid()).unwrap_or_else(|| panic!("no /proc fd for {}", self.name))
    }
}

/// `VmRSS` of a process, KiB.
pub fn proc_rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat, after the
/// parenthesised command name, which may hold blanks).
pub fn proc_cpu_time(pid: i32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Entries in /proc/<pid>/fd.
pub fn proc_fd_count(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A scratch file (an INI configuration, say), removed with its directory on drop.
pub struct ScratchFile {
    dir: PathBuf,
    pub path: PathBuf,
}

impl ScratchFile {
    pub fn new(name: &str, text: &str) -> ScratchFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sockproxyd-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        ScratchFile { dir, path }
    }

    pub fn arg(&self) -> String {
        self.path.to_string_lossy().to_string()
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The usual arguments plus `-c <ini>` with `text` as the INI file. Keep the
/// `ScratchFile` alive while the daemon may read it.
pub fn args_with_ini(luup: &str, name: &str, text: &str) -> (Vec<String>, ScratchFile) {
    let f = ScratchFile::new(name, text);
    let mut a = std_args(luup);
    a.push("-c".into());
    a.push(f.arg());
    (a, f)
}
