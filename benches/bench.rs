//! `make bench`: measurements of the release daemon on loopback, printed as
//! markdown tables and written as JSON (`target/bench/latest.json`).
//!
//! # In scope
//! Starting `target/release/sockproxyd` (or `--bin`, or `SOCKPROXYD_BIN`), playing
//! every peer it talks to (a fake Luup, an echo device, bulk sources and sinks,
//! clients), running `socat` and `haproxy` as reference relays, and reading the
//! daemon's CPU time (`/proc/<pid>/stat` utime+stime), RSS and context switches
//! (`/proc/<pid>/status`). Phases: notification latency (quiet and under
//! traffic), 64-byte echo round trip, bulk throughput both ways at BLKS 2048,
//! 16384 and 65536 against direct/socat/haproxy, 100..10,000 concurrent
//! connections, idle cost, a notification storm, a connect burst, a slow reader,
//! and hostile load: peak RSS while clients with BLKS=1 MiB and their remotes flood
//! and never read, RSS per busy connection for the glibc and the x86_64 musl build
//! (`dist/`, from `make cross`; skipped when absent), and a fresh client's greeting
//! latency during a blank-line flood next to the same without it.
//!
//! # Out of scope
//! Pass/fail on times: targets are printed as met or MISSED and never change
//! the exit status. The exit status is 1 only when something broke (the
//! daemon did not start or died, bytes did not match, a phase errored).
//!
//! The load generator is std threads over blocking sockets with 1 MiB buffers,
//! one thread per direction, plus mio for the many-connection phases; it
//! reports its own CPU share (CLOCK_THREAD_CPUTIME_ID) next to every row.
//! Everything listens on and connects to 127.0.0.1 only.

use std::collections::{HashMap, VecDeque};
use std::fmt::{Display, Write as _};
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

mod common;
use common::{Res, err, fd_count, proc_cpu, proc_status, rss_kib};

const HOST: &str = "127.0.0.1";
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const SID: &str = "urn:bench-sockproxyd:serviceId:Bench1";
const ACTION: &str = "HandleReceive";
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: usize = 1024 * 1024;
/// Load generator buffer: large, so its own syscalls are few.
const GEN_BUF: usize = MIB;
const BLKS_DEFAULT: usize = 2048;
/// The default max_conns (512) would refuse most of the 10,000 connections
/// and half the burst of 1,000; everything else stays at its default.
const DAEMON_CONFIG: &str = "[host]\nmax_conns=20000\n";

// ---------------------------------------------------------------------------
// Sizes

struct Plan {
    latency_samples: usize,
    rtt_samples: usize,
    xfer_bytes: u64,
    /// Transfers per relay and row, taking turns; the median one is shown.
    xfer_reps: usize,
    scale: Vec<usize>,
    idle_secs: f64,
    storm_conns: usize,
    burst: usize,
    slow_bytes: usize,
    slow_pause: Duration,
    /// Clients of the hostile load (BLKS=1 MiB, nobody reads) and its length.
    hostile_conns: usize,
    hostile_secs: f64,
    /// Busy connections per build.
    busy_conns: usize,
    /// Greetings timed with and without a flood.
    greeting_samples: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                latency_samples: 200,
                rtt_samples: 500,
                xfer_bytes: 64 * MIB as u64,
                xfer_reps: 1,
                scale: vec![100, 1000],
                idle_secs: 3.0,
                storm_conns: 500,
                burst: 1000,
                slow_bytes: 8 * MIB,
                slow_pause: Duration::from_millis(300),
                hostile_conns: 100,
                hostile_secs: 5.0,
                busy_conns: 1000,
                greeting_samples: 50,
            }
        } else {
            Plan {
                latency_samples: 200,
                rtt_samples: 2000,
                xfer_bytes: 1024 * MIB as u64,
                xfer_reps: 3,
                scale: vec![100, 1000, 10_000],
                idle_secs: 10.0,
                storm_conns: 500,
                burst: 1000,
                slow_bytes: 32 * MIB,
                slow_pause: Duration::from_secs(1),
                hostile_conns: 200,
                hostile_secs: 10.0,
                busy_conns: 1000,
                greeting_samples: 50,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// JSON, just enough to write a report

enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn obj() -> J {
        J::Obj(Vec::new())
    }

    fn set(&mut self, k: &str, v: impl Into<J>) {
        if let J::Obj(m) = self {
            m.push((k.to_string(), v.into()));
        }
    }

    fn with(mut self, k: &str, v: impl Into<J>) -> J {
        self.set(k, v);
        self
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent + 1);
        let end = "  ".repeat(indent);
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(x) if x.is_finite() => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    let _ = write!(out, "{}", *x as i64);
                } else {
                    let _ = write!(out, "{}", round(*x, 4));
                }
            }
            J::Num(_) => out.push_str("null"),
            J::Str(s) => write_str(out, s),
            J::Arr(v) if v.is_empty() => out.push_str("[]"),
            J::Arr(v) => {
                out.push_str("[\n");
                for (i, x) in v.iter().enumerate() {
                    out.push_str(&pad);
                    x.write(out, indent + 1);
                    out.push_str(if i + 1 < v.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push(']');
            }
            J::Obj(m) if m.is_empty() => out.push_str("{}"),
            J::Obj(m) => {
                out.push_str("{\n");
                for (i, (k, x)) in m.iter().enumerate() {
                    out.push_str(&pad);
                    write_str(out, k);
                    out.push_str(": ");
                    x.write(out, indent + 1);
                    out.push_str(if i + 1 < m.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl From<f64> for J {
    fn from(x: f64) -> J {
        J::Num(x)
    }
}
impl From<u64> for J {
    fn from(x: u64) -> J {
        J::Num(x as f64)
    }
}
impl From<usize> for J {
    fn from(x: usize) -> J {
        J::Num(x as f64)
    }
}
impl From<i64> for J {
    fn from(x: i64) -> J {
        J::Num(x as f64)
    }
}
impl From<bool> for J {
    fn from(x: bool) -> J {
        J::Bool(x)
    }
}
impl From<&str> for J {
    fn from(x: &str) -> J {
        J::Str(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> J {
        J::Str(x)
    }
}
impl<T: Into<J>> From<Option<T>> for J {
    fn from(x: Option<T>) -> J {
        x.map_or(J::Null, Into::into)
    }
}
impl From<Vec<J>> for J {
    fn from(x: Vec<J>) -> J {
        J::Arr(x)
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

// ---------------------------------------------------------------------------
// Statistics and formatting

/// Nearest-rank percentile of microsecond samples.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(k - 1).copied().unwrap_or(f64::NAN)
}

struct Dist {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Dist {
    fn of(mut v: Vec<f64>) -> Dist {
        v.sort_by(f64::total_cmp);
        Dist {
            n: v.len(),
            p50: pct(&v, 50.0),
            p99: pct(&v, 99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn json(&self) -> J {
        J::obj()
            .with("samples", self.n)
            .with("p50_us", round(self.p50, 1))
            .with("p99_us", round(self.p99, 1))
            .with("max_us", round(self.max, 1))
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "-".into()
    }
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

fn opt2(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), f2)
}

/// Prints a markdown table (readable as is, pasteable into README.md).
fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let width = w.get(i).copied().unwrap_or(0);
            if i == 0 {
                let _ = write!(s, " {c:<width$} |");
            } else {
                let _ = write!(s, " {c:>width$} |");
            }
        }
        println!("{s}");
    };
    line(head.iter().map(|h| h.to_string()).collect());
    let mut sep = String::from("|");
    for (i, x) in w.iter().enumerate() {
        sep.push_str(if i == 0 { ":" } else { "-" });
        sep.push_str(&"-".repeat(*x));
        sep.push_str(if i == 0 { "-|" } else { ":|" });
    }
    println!("{sep}");
    for r in rows {
        line(r.clone());
    }
}

// ---------------------------------------------------------------------------
// /proc and the C library

/// Voluntary + involuntary context switches of every thread, by `tid/comm`.
fn ctxt_switches(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
        let Ok(st) = fs::read_to_string(p.join("status")) else {
            continue;
        };
        let n: u64 = st
            .lines()
            .filter_map(|l| {
                let v = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))?;
                v.trim().parse::<u64>().ok()
            })
            .sum();
        out.push((
            format!("{}/{}", e.file_name().to_string_lossy(), comm.trim()),
            n,
        ));
    }
    out.sort();
    out
}

/// CPU time of the calling thread.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Raises RLIMIT_NOFILE to `want` (the hard limit too, as root); returns
/// the soft limit in force, which the daemon inherits.
fn raise_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        if rl.rlim_cur >= want {
            return rl.rlim_cur;
        }
        let up = libc::rlimit {
            rlim_cur: want,
            rlim_max: rl.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) != 0 {
            let cap = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &cap);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

/// Waits until something listens on 127.0.0.1:`port` (without connecting,
/// which a one-shot relay would take for its one connection).
fn wait_listening(port: u16, timeout: Duration) -> bool {
    let want = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let tcp = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        }) {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

fn free_port() -> Res<u16> {
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    Ok(l.local_addr().map_err(err("local_addr"))?.port())
}

/// Waits for a child with wait4, returning its exit code and CPU seconds
/// (user + system, from the kernel's rusage); kills it after `timeout`.
fn reap(child: &mut Child, timeout: Duration) -> (Option<i32>, f64) {
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waiting for our own child; the pointers are to locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            let code = if libc::WIFEXITED(status) {
                Some(libc::WEXITSTATUS(status))
            } else {
                None
            };
            return (code, t(ru.ru_utime) + t(ru.ru_stime));
        }
        if r < 0 {
            return (None, f64::NAN);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
        }
        thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), for the slow reader's integrity check

struct Sha256 {
    h: [u32; 8],
    block: [u8; 64],
    used: usize,
    len: u64,
}

const K256: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

impl Sha256 {
    fn new() -> Sha256 {
        Sha256 {
            h: [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ],
            block: [0; 64],
            used: 0,
            len: 0,
        }
    }

    fn compress(h: &mut [u32; 8], block: &[u8; 64]) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = *h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K256[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let n = (64 - self.used).min(data.len());
            self.block[self.used..self.used + n].copy_from_slice(&data[..n]);
            self.used += n;
            data = &data[n..];
            if self.used == 64 {
                Sha256::compress(&mut self.h, &self.block);
                self.used = 0;
            }
        }
    }

    fn hex(mut self) -> String {
        let bits = self.len.wrapping_mul(8);
        self.update(&[0x80]);
        while self.used != 56 {
            self.update(&[0]);
        }
        self.update(&bits.to_be_bytes());
        self.h.iter().map(|x| format!("{x:08x}")).collect()
    }
}

/// FIPS 180-2, appendix B.1: SHA-256("abc").
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

/// Pseudo-random bytes (xorshift64*), so a shifted or repeated block shows.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// Fake Luup: answers every GET with 200, records when each request was in

struct Ev {
    at: Instant,
    dev: i64,
}

struct Luup {
    port: u16,
    q: Arc<(Mutex<VecDeque<Ev>>, Condvar)>,
    bad: Arc<AtomicUsize>,
}

impl Luup {
    fn spawn() -> Res<Luup> {
        let l = TcpListener::bind((HOST, 0)).map_err(err("fake Luup bind"))?;
        let port = l.local_addr().map_err(err("fake Luup"))?.port();
        let q: Arc<(Mutex<VecDeque<Ev>>, Condvar)> = Arc::default();
        let bad = Arc::new(AtomicUsize::new(0));
        let (q2, bad2) = (q.clone(), bad.clone());
        thread::Builder::new()
            .name("fake-luup".into())
            .spawn(move || {
                for s in l.incoming().flatten() {
                    match Luup::serve(s) {
                        Some(ev) => {
                            let (m, cv) = &*q2;
                            m.lock().unwrap_or_else(|e| e.into_inner()).push_back(ev);
                            cv.notify_all();
                        }
                        None => {
                            bad2.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .map_err(err("spawn"))?;
        Ok(Luup { port, q, bad })
    }

    /// Reads one request head, answers, returns when it was complete.
    fn serve(mut s: TcpStream) -> Option<Ev> {
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut buf = [0u8; 4096];
        let mut len = 0;
        let at = loop {
            let n = s.read(buf.get_mut(len..)?).ok()?;
            if n == 0 {
                return None;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break Instant::now();
            }
        };
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let head = String::from_utf8_lossy(&buf[..len]);
        if !head.starts_with("GET /data_request?id=action&") {
            return None;
        }
        let dev = head.split("DeviceNum=").nth(1)?;
        let dev: String = dev.chars().take_while(|c| c.is_ascii_digit()).collect();
        Some(Ev {
            at,
            dev: dev.parse().ok()?,
        })
    }

    /// The next notification for `dev` (others are dropped), within `timeout`.
    fn wait(&self, dev: i64, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.q;
        let mut q = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while let Some(ev) = q.pop_front() {
                if ev.dev == dev {
                    return Some(ev.at);
                }
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            q = cv
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn drain(&self) -> Vec<Ev> {
        let (m, _) = &*self.q;
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    fn pending(&self) -> usize {
        let (m, _) = &*self.q;
        m.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

// ---------------------------------------------------------------------------
// Echo device: one mio thread echoing any number of connections, in a child
// process (this binary with `--echo-device`) so that its descriptors do not
// count against this process's RLIMIT_NOFILE, which the 10,000 clients need.

struct Echo {
    port: u16,
    child: Child,
    /// Descriptors the child had with no connection open.
    base_fds: usize,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct EchoConn {
    sock: mio::net::TcpStream,
    pending: Vec<u8>,
}

impl Echo {
    fn spawn() -> Res<Echo> {
        let exe = std::env::current_exe().map_err(err("current_exe"))?;
        let mut child = Command::new(exe)
            .arg("--echo-device")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(err("start the echo device"))?;
        let mut out = child.stdout.take().ok_or("echo device: no stdout")?;
        let mut s = Vec::new();
        let mut b = [0u8; 1];
        while !s.ends_with(b"\n") && out.read(&mut b).map_err(err("echo device"))? == 1 {
            s.push(b[0]);
        }
        let port = String::from_utf8_lossy(&s)
            .trim()
            .parse()
            .map_err(|e| format!("echo device said {s:?}: {e}"))?;
        let mut e = Echo {
            port,
            child,
            base_fds: 0,
        };
        e.base_fds = e.fds();
        Ok(e)
    }

    fn fds(&self) -> usize {
        fd_count(self.child.id()).map_or(0, |n| n as usize)
    }

    /// Connections the echo device holds open.
    fn open(&self) -> usize {
        self.fds().saturating_sub(self.base_fds)
    }

    /// The child: serves until its stdin closes (the bench has ended).
    fn serve_in_this_process() -> Res<()> {
        let std_l = TcpListener::bind((HOST, 0)).map_err(err("echo bind"))?;
        // The default backlog (128) would drop SYNs in the 10,000-connection phase.
        // SAFETY: listen on a descriptor we own.
        unsafe { libc::listen(std_l.as_raw_fd(), 4096) };
        std_l.set_nonblocking(true).map_err(err("echo"))?;
        let port = std_l.local_addr().map_err(err("echo"))?.port();
        let mut l = mio::net::TcpListener::from_std(std_l);
        let mut poll = Poll::new().map_err(err("echo poll"))?;
        poll.registry()
            .register(&mut l, Token(usize::MAX), Interest::READABLE)
            .map_err(err("echo register"))?;
        thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut events = Events::with_capacity(1024);
                let mut conns: slab::Slab<EchoConn> = slab::Slab::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    if poll.poll(&mut events, None).is_err() {
                        continue;
                    }
                    for ev in events.iter() {
                        if ev.token() == Token(usize::MAX) {
                            while let Ok((mut s, _)) = l.accept() {
                                let _ = s.set_nodelay(true);
                                let e = conns.vacant_entry();
                                let tok = Token(e.key());
                                if poll
                                    .registry()
                                    .register(&mut s, tok, Interest::READABLE | Interest::WRITABLE)
                                    .is_ok()
                                {
                                    e.insert(EchoConn {
                                        sock: s,
                                        pending: Vec::new(),
                                    });
                                }
                            }
                            continue;
                        }
                        let key = ev.token().0;
                        let keep = match conns.get_mut(key) {
                            Some(c) => Echo::service(c, &mut buf),
                            None => continue,
                        };
                        if !keep {
                            let mut c = conns.remove(key);
                            let _ = poll.registry().deregister(&mut c.sock);
                        }
                    }
                }
            })
            .map_err(err("spawn"))?;
        println!("{port}");
        io::stdout().flush().map_err(err("stdout"))?;
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        Ok(())
    }

    /// Echoes until the socket would block; false when it is done.
    fn service(c: &mut EchoConn, buf: &mut [u8]) -> bool {
        loop {
            while !c.pending.is_empty() {
                match c.sock.write(&c.pending) {
                    Ok(n) => drop(c.pending.drain(..n)),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            match c.sock.read(buf) {
                Ok(0) => return false,
                Ok(n) => c.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Res<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The daemon

struct Daemon {
    child: Child,
    pid: u32,
    port: u16,
    tail: Arc<Mutex<VecDeque<String>>>,
    warnings: Arc<AtomicUsize>,
    start_rss_kib: u64,
}

impl Daemon {
    fn args(cfg: &Path, luup: u16) -> Vec<String> {
        let cfg = cfg.display().to_string();
        ["-c", &cfg, "-a", HOST, "-p", "0", "-N"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("http://{HOST}:{luup}")])
            .collect()
    }

    fn start(bin: &Path, cfg: &Path, luup: u16) -> Res<Daemon> {
        let mut child = Command::new(bin)
            .args(Daemon::args(cfg, luup))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let warnings = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (tail2, warn2) = (tail.clone(), warnings.clone());
        thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("[WARN]") || line.contains("[ERROR]") {
                    warn2.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(i) = line.find("listening on 127.0.0.1:") {
                    let p: String = line[i + 23..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    if line.contains("(commands)")
                        && let (Ok(p), Some(tx)) = (p.parse::<u16>(), tx.take())
                    {
                        let _ = tx.send(p);
                    }
                }
                let mut t = tail2.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() >= 50 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let t = tail.lock().unwrap_or_else(|e| e.into_inner());
                return Err(format!(
                    "the daemon did not report `listening on ... (commands)` within 5 s; stderr:\n  {}",
                    t.iter().cloned().collect::<Vec<_>>().join("\n  ")
                ));
            }
        };
        thread::sleep(Duration::from_millis(100));
        let start_rss_kib = rss_kib(pid).unwrap_or(0);
        Ok(Daemon {
            child,
            pid,
            port,
            tail,
            warnings,
            start_rss_kib,
        })
    }

    fn alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                Err(format!(
                    "the daemon exited ({st}); last log lines:\n  {}",
                    t.iter().cloned().collect::<Vec<_>>().join("\n  ")
                ))
            }
            Err(e) => Err(format!("try_wait: {e}")),
        }
    }

    fn cpu(&self) -> f64 {
        proc_cpu(self.pid).unwrap_or(f64::NAN)
    }

    /// The daemon's last log lines, for an error message.
    fn log_tail(&self, n: usize) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let skip = t.len().saturating_sub(n);
        let lines: Vec<&str> = t.iter().skip(skip).map(String::as_str).collect();
        format!("\n  daemon log, last lines:\n    {}", lines.join("\n    "))
    }

    /// WARN and ERROR lines it has logged so far.
    fn warnings(&self) -> usize {
        self.warnings.load(Ordering::Relaxed)
    }

    fn rss(&self) -> u64 {
        rss_kib(self.pid).unwrap_or(0)
    }

    /// Connects to the command port and sends CONN without waiting for the
    /// greeting (the daemon takes commands at once); `finish` reads replies.
    fn begin(&self, target_port: u16, opts: &str) -> Res<TcpStream> {
        let mut s = TcpStream::connect((HOST, self.port)).map_err(err("connect to the daemon"))?;
        s.set_nodelay(true).map_err(err("nodelay"))?;
        let sp = if opts.is_empty() { "" } else { " " };
        s.write_all(format!("CONN {HOST}:{target_port}{sp}{opts}\n").as_bytes())
            .map_err(err("send CONN"))?;
        Ok(s)
    }

    /// Reads the greeting and `OK CONN` byte by byte: nothing behind them
    /// may be consumed.
    fn finish(s: &mut TcpStream) -> Res<()> {
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(err("timeout"))?;
        let greeting = read_line(s).map_err(err("reading the greeting"))?;
        let reply = read_line(s).map_err(err("reading the CONN reply"))?;
        if !greeting.starts_with("OK TOGGLEDBITS-SOCKPROXY 1 ") || !reply.starts_with("OK CONN ") {
            return Err(format!("unexpected replies {greeting:?}, {reply:?}"));
        }
        Ok(())
    }

    fn conn(&self, target_port: u16, opts: &str) -> Res<TcpStream> {
        let mut s = self.begin(target_port, opts)?;
        Daemon::finish(&mut s)?;
        s.set_read_timeout(None).map_err(err("timeout"))?;
        Ok(s)
    }

    /// STOP (after reading the greeting: closing on unread bytes would
    /// reset the connection and lose the command), then the exit status;
    /// killed after 10 s.
    fn stop(mut self) -> Res<i32> {
        let said = TcpStream::connect((HOST, self.port))
            .map_err(|e| e.to_string())
            .and_then(|mut s| {
                s.set_read_timeout(Some(IO_TIMEOUT))
                    .map_err(|e| e.to_string())?;
                read_line(&mut s)?;
                s.write_all(b"STOP\n").map_err(|e| e.to_string())?;
                read_line(&mut s)
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return st.code().ok_or_else(|| format!("daemon: {st}")),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "the daemon did not exit within 10 s of STOP (reply: {said:?})"
                    ));
                }
            }
        }
    }
}

/// A daemon left behind by an error path is killed, not orphaned.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line, byte by byte (nothing behind it is consumed).
fn read_line(s: &mut TcpStream) -> Res<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&line))),
        }
    }
}

// ---------------------------------------------------------------------------
// Reference relays

struct Socat {
    child: Child,
    port: u16,
}

fn socat_cmd(b: impl Display, port: impl Display, target: impl Display) -> Vec<String> {
    vec![
        "-b".into(),
        b.to_string(),
        format!("TCP4-LISTEN:{port},bind={HOST},reuseaddr,nodelay"),
        format!("TCP4:{HOST}:{target},nodelay"),
    ]
}

impl Socat {
    /// One socat for one connection (no `fork`), so wait4 gives its CPU.
    fn spawn(b: usize, target: u16) -> Res<Socat> {
        let port = free_port()?;
        let child = Command::new("socat")
            .args(socat_cmd(b, port, target))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err("socat"))?;
        let mut s = Socat { child, port };
        if !wait_listening(port, Duration::from_secs(5)) {
            let _ = s.child.kill();
            reap(&mut s.child, Duration::from_secs(1));
            return Err(format!("socat did not listen on {port}"));
        }
        Ok(s)
    }

    /// Waits for socat to exit (its connection is over); its CPU seconds.
    fn finish(mut self) -> f64 {
        reap(&mut self.child, Duration::from_secs(10)).1
    }
}

struct Haproxy {
    child: Child,
    port: u16,
}

fn haproxy_cfg(bufsize: impl Display, port: impl Display, target: impl Display) -> String {
    format!(
        "global\n    nbthread 1\n    maxconn 1000\n    tune.bufsize {bufsize}\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
         listen relay\n    bind {HOST}:{port}\n    server remote {HOST}:{target}\n"
    )
}

impl Haproxy {
    fn start(dir: &Path, bufsize: usize, target: u16) -> Res<Haproxy> {
        let port = free_port()?;
        let cfg = dir.join(format!("haproxy-{bufsize}-{target}.cfg"));
        fs::write(&cfg, haproxy_cfg(bufsize, port, target)).map_err(err("haproxy config"))?;
        let log = fs::File::create(dir.join(format!("haproxy-{bufsize}-{target}.log")))
            .map_err(err("haproxy log"))?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(err("haproxy"))?;
        let mut h = Haproxy { child, port };
        if !wait_listening(port, Duration::from_secs(5)) {
            h.stop();
            return Err(format!(
                "haproxy did not listen on {port} (see {})",
                dir.display()
            ));
        }
        Ok(h)
    }

    fn cpu(&self) -> f64 {
        proc_cpu(self.child.id()).unwrap_or(f64::NAN)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        reap(&mut self.child, Duration::from_secs(5));
    }
}

fn have(tool: &str, arg: &str) -> Option<String> {
    let out = Command::new(tool).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.to_lowercase().contains("version"))
        .map(|l| l.trim().to_string())
}

// ---------------------------------------------------------------------------
// Context shared by the phases

struct Ctx {
    bin: PathBuf,
    plan: Plan,
    luup: Luup,
    echo: Echo,
    socat: Option<String>,
    haproxy: Option<String>,
    socat_why: String,
    haproxy_why: String,
    dir: PathBuf,
    /// RLIMIT_NOFILE in force (the daemon inherits it).
    nofile: u64,
    /// The daemon's configuration file (`-c`): DAEMON_CONFIG.
    cfg: PathBuf,
}

impl Ctx {
    fn daemon(&self) -> Res<Daemon> {
        Daemon::start(&self.bin, &self.cfg, self.luup.port)
    }

    fn print_skipped(&self) {
        for (tool, why) in [("socat", &self.socat_why), ("haproxy", &self.haproxy_why)] {
            if !why.is_empty() {
                println!("\n({tool} rows skipped: {why})");
            }
        }
    }
}

/// A way to reach a target port: straight, or through a relay.
enum Via<'a> {
    Direct,
    Proxy(&'a Daemon, usize),
    Socat(usize),
    Haproxy(&'a Haproxy, usize),
}

impl Via<'_> {
    fn name(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Proxy(_, b) => format!("sockproxyd BLKS={b}"),
            Via::Socat(b) => format!("socat -b {b}"),
            Via::Haproxy(_, b) => format!("haproxy bufsize={b}"),
        }
    }
}

/// An open path to `target`: the client socket, and the socat to reap.
fn open_via(via: &Via, target: u16) -> Res<(TcpStream, Option<Socat>)> {
    match via {
        Via::Direct => {
            let s = TcpStream::connect((HOST, target)).map_err(err("connect"))?;
            Ok((s, None))
        }
        Via::Proxy(d, b) => {
            let opts = if *b == BLKS_DEFAULT {
                String::new()
            } else {
                format!("BLKS={b}")
            };
            Ok((d.conn(target, &opts)?, None))
        }
        Via::Socat(b) => {
            let so = Socat::spawn(*b, target)?;
            let s = TcpStream::connect((HOST, so.port)).map_err(err("connect to socat"))?;
            Ok((s, Some(so)))
        }
        Via::Haproxy(h, _) => {
            let s = TcpStream::connect((HOST, h.port)).map_err(err("connect to haproxy"))?;
            Ok((s, None))
        }
    }
}

fn accept_timeout(l: &TcpListener, timeout: Duration) -> Res<TcpStream> {
    l.set_nonblocking(true).map_err(err("nonblocking"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(err("blocking"))?;
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Notification latency

/// Remote send -> Luup request complete, one message at a time, the client
/// reading each message before the next is sent. Also remote -> client.
fn notify_samples(d: &Daemon, luup: &Luup, dev: i64, n: usize) -> Res<(Vec<f64>, Vec<f64>)> {
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    let port = l.local_addr().map_err(err("addr"))?.port();
    let mut c = d.conn(port, &format!("NTFY={dev}/{SID}/{ACTION}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    let mut r = accept_timeout(&l, IO_TIMEOUT)?;
    let warm = 20;
    let (mut ntfy, mut fwd) = (Vec::new(), Vec::new());
    let mut got = [0u8; 10];
    for i in 0..warm + n {
        luup.drain();
        let msg = format!("m{i:08}\n");
        let t0 = Instant::now();
        r.write_all(msg.as_bytes()).map_err(err("remote send"))?;
        c.read_exact(&mut got).map_err(err("client read"))?;
        let t1 = Instant::now();
        if got != msg.as_bytes() {
            return Err(format!("sent {msg:?}, the client got {got:?}"));
        }
        let at = luup
            .wait(dev, Duration::from_secs(5))
            .ok_or_else(|| format!("no notification for sample {i} within 5 s"))?;
        if i >= warm {
            ntfy.push(us(at.saturating_duration_since(t0)));
            fwd.push(us(t1 - t0));
        }
    }
    drop(c);
    drop(r);
    thread::sleep(Duration::from_millis(50));
    luup.drain();
    Ok((ntfy, fwd))
}

/// The machine's floor for the same measure: a thread of this process that
/// blocks on the remote's socket and, on each message, sends the same GET
/// to the same fake Luup over a fresh connection (no proxy, no hand-off to a
/// worker, no client). What any notifier pays here for wake-ups and a TCP
/// handshake; the daemon's figure over this one is what the proxy adds.
fn floor_samples(luup: &Luup, dev: i64, n: usize) -> Res<Vec<f64>> {
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    let port = l.local_addr().map_err(err("addr"))?.port();
    let mut r = TcpStream::connect((HOST, port)).map_err(err("connect"))?;
    r.set_nodelay(true).map_err(err("nodelay"))?;
    let mut s = accept_timeout(&l, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    let luup_port = luup.port;
    let path = format!(
        "GET /data_request?id=action&output_format=json&DeviceNum={dev}&serviceId={SID}\
         &action={ACTION}&Pid=floor HTTP/1.1\r\nHost: {HOST}:{luup_port}\r\n\
         User-Agent: floor\r\nConnection: close\r\n\r\n"
    );
    let notifier = thread::spawn(move || -> Res<()> {
        let mut got = [0u8; 10];
        let mut answer = [0u8; 512];
        loop {
            match s.read_exact(&mut got) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(format!("floor read: {e}")),
            }
            let mut h = TcpStream::connect((HOST, luup_port)).map_err(err("floor connect"))?;
            h.set_nodelay(true).map_err(err("nodelay"))?;
            h.write_all(path.as_bytes()).map_err(err("floor GET"))?;
            while h.read(&mut answer).map_err(err("floor answer"))? > 0 {}
        }
    });
    let warm = 20;
    let mut out = Vec::new();
    for i in 0..warm + n {
        luup.drain();
        let t0 = Instant::now();
        r.write_all(format!("m{i:08}\n").as_bytes())
            .map_err(err("remote send"))?;
        let at = luup
            .wait(dev, Duration::from_secs(5))
            .ok_or_else(|| format!("floor: no GET for sample {i} within 5 s"))?;
        if i >= warm {
            out.push(us(at.saturating_duration_since(t0)));
        }
    }
    drop(r);
    notifier.join().map_err(|_| "floor thread panicked")??;
    thread::sleep(Duration::from_millis(50));
    luup.drain();
    Ok(out)
}

/// Background traffic: `k` proxied connections to the echo device, each
/// echoing 4 KiB every 2 ms (and notifying, PACE=1, as plugins do).
struct Traffic {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Res<()>>>,
}

impl Traffic {
    fn start(d: &Daemon, echo: u16, k: usize) -> Res<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for j in 0..k {
            let mut s = d.conn(echo, &format!("NTFY={}/{SID}/{ACTION} PACE=1", 900 + j))?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(err("timeout"))?;
            let (stop, bytes) = (stop.clone(), bytes.clone());
            threads.push(thread::spawn(move || {
                let out = vec![j as u8; 4096];
                let mut back = vec![0u8; 4096];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&out).map_err(err("traffic write"))?;
                    s.read_exact(&mut back).map_err(err("traffic read"))?;
                    if back != out {
                        return Err("traffic: echo mismatch".into());
                    }
                    bytes.fetch_add(8192, Ordering::Relaxed);
                    next += Duration::from_millis(2);
                    if let Some(w) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(w);
                    }
                }
                Ok(())
            }));
        }
        Ok(Traffic {
            stop,
            bytes,
            threads,
        })
    }

    fn finish(self) -> Res<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| "traffic thread panicked")??;
        }
        Ok(self.bytes.load(Ordering::Relaxed))
    }
}

fn phase_latency(cx: &Ctx, d: &Daemon) -> Res<J> {
    let n = cx.plan.latency_samples;
    println!("\n## 1. Notification latency\n");
    println!(
        "Remote send() -> fake Luup has the whole GET; {n} samples after 20 warm-up, one message \
         at a time, the client reads each message. \"Under traffic\": 16 other proxied \
         connections each echo 4 KiB every 2 ms (NTFY, PACE=1) meanwhile. \"Floor\": a \
         thread of the bench blocks on the remote's socket and sends the same GET itself over \
         a fresh connection: the wake-ups and handshake any notifier pays on this machine.\n"
    );
    let floor_quiet = floor_samples(&cx.luup, 3, n)?;
    let (quiet, fwd) = notify_samples(d, &cx.luup, 1, n)?;
    let tr = Traffic::start(d, cx.echo.port, 16)?;
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let loaded = notify_samples(d, &cx.luup, 2, n);
    let floor_loaded = floor_samples(&cx.luup, 4, n);
    let secs = t0.elapsed().as_secs_f64();
    let moved = tr.finish()?;
    let (loaded, fwd_loaded) = loaded?;
    let floor_loaded = floor_loaded?;
    let (q, f, l, fl, fq, fll) = (
        Dist::of(quiet),
        Dist::of(fwd),
        Dist::of(loaded),
        Dist::of(fwd_loaded),
        Dist::of(floor_quiet),
        Dist::of(floor_loaded),
    );
    let traffic_mbs = moved as f64 / secs / 1e6;
    let row = |name: &str, x: &Dist| {
        vec![
            name.to_string(),
            x.n.to_string(),
            f1(x.p50),
            f1(x.p99),
            f1(x.max),
        ]
    };
    table(
        &["measure", "samples", "p50 µs", "p99 µs", "max µs"],
        &[
            row("notification, quiet", &q),
            row("floor (no proxy), quiet", &fq),
            row("notification, under traffic", &l),
            row("floor (no proxy), under traffic", &fll),
            row("remote -> client data, quiet", &f),
            row("remote -> client data, under traffic", &fl),
        ],
    );
    println!(
        "\nnotification / floor: quiet p50 x{:.2}, p99 x{:.2}; under traffic p50 x{:.2}, p99 x{:.2}",
        q.p50 / fq.p50,
        q.p99 / fq.p99,
        l.p50 / fll.p50,
        l.p99 / fll.p99
    );
    println!(
        "(background traffic during the loaded runs: {traffic_mbs:.1} MB/s through the proxy)"
    );
    Ok(J::obj()
        .with("quiet", q.json())
        .with("under_traffic", l.json())
        .with("floor_quiet", fq.json())
        .with("floor_under_traffic", fll.json())
        .with("forward_quiet", f.json())
        .with("forward_under_traffic", fl.json())
        .with("traffic_mb_per_s", round(traffic_mbs, 1)))
}

// ---------------------------------------------------------------------------
// 2. Echo round trip

/// One 64-byte round trip on `s`, checked; its duration.
fn round_trip(s: &mut TcpStream, i: usize) -> Res<f64> {
    let mut out = [0u8; 64];
    let mut back = [0u8; 64];
    out[..8].copy_from_slice(&(i as u64).to_le_bytes());
    let t0 = Instant::now();
    s.write_all(&out).map_err(err("echo write"))?;
    s.read_exact(&mut back).map_err(err("echo read"))?;
    let dt = us(t0.elapsed());
    if back != out {
        return Err("echo mismatch".into());
    }
    Ok(dt)
}

fn phase_rtt(cx: &Ctx, d: &Daemon) -> Res<J> {
    let n = cx.plan.rtt_samples;
    println!("\n## 2. Echo round trip, 64 bytes\n");
    println!(
        "Client -> relay -> echo device and back, {n} samples per path after 100 warm-up, the \
         paths taking turns, TCP_NODELAY everywhere; added = p50 minus direct p50.\n"
    );
    let mut h = None;
    if cx.haproxy.is_some() {
        h = Some(Haproxy::start(&cx.dir, 16384, cx.echo.port)?);
    }
    let mut vias = vec![Via::Direct, Via::Proxy(d, BLKS_DEFAULT)];
    if cx.socat.is_some() {
        vias.push(Via::Socat(BLKS_DEFAULT));
    }
    if let Some(h) = &h {
        vias.push(Via::Haproxy(h, 16384));
    }
    // All paths open at once and sampled in turn, so that whatever else the
    // (shared) machine does at a moment hits every path alike.
    let mut paths = Vec::new();
    for via in &vias {
        let (s, socat) = open_via(via, cx.echo.port)?;
        s.set_nodelay(true).map_err(err("nodelay"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(err("timeout"))?;
        paths.push((via.name(), s, socat, Vec::with_capacity(n)));
    }
    for i in 0..100 + n {
        for (name, s, _, v) in paths.iter_mut() {
            let dt = round_trip(s, i).map_err(|e| format!("{name}: {e}"))?;
            if i >= 100 {
                v.push(dt);
            }
        }
    }
    let mut res = Vec::new();
    for (name, s, socat, v) in paths {
        drop(s);
        if let Some(so) = socat {
            so.finish();
        }
        res.push((name, Dist::of(v)));
    }
    if let Some(mut h) = h {
        h.stop();
    }
    let direct = res.first().map_or(f64::NAN, |r| r.1.p50);
    let mut rows = Vec::new();
    let mut j = J::obj();
    for (name, x) in &res {
        let added = x.p50 - direct;
        rows.push(vec![
            name.clone(),
            f1(x.p50),
            f1(x.p99),
            if name == "direct" {
                "-".into()
            } else {
                f1(added)
            },
        ]);
        j.set(name, x.json().with("added_p50_us", round(added, 1)));
    }
    table(&["path", "p50 µs", "p99 µs", "added p50 µs"], &rows);
    cx.print_skipped();
    Ok(j)
}

// ---------------------------------------------------------------------------
// 3. Throughput

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    ClientToRemote,
    RemoteToClient,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::ClientToRemote => "client->remote",
            Dir::RemoteToClient => "remote->client",
        }
    }
}

struct Xfer {
    mbps: f64,
    secs: f64,
    relay_cpu_per_gib: Option<f64>,
    writer_share: f64,
    reader_share: f64,
}

/// The run with the median throughput.
fn median(mut runs: Vec<Xfer>) -> Option<Xfer> {
    runs.sort_by(|a, b| a.mbps.total_cmp(&b.mbps));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// Moves `bytes` one way through `via` into a fresh remote accepted on
/// `sink`: a writer thread (1 MiB writes, then shutdown) and a reader thread
/// (1 MiB reads until end-of-stream); time is first write to end-of-stream.
fn transfer(via: &Via, dir: Dir, bytes: u64, sink: &TcpListener) -> Res<Xfer> {
    let port = sink.local_addr().map_err(err("sink"))?.port();
    let (client, socat) = open_via(via, port)?;
    let remote = accept_timeout(sink, IO_TIMEOUT)?;
    let (tx, rx) = match dir {
        Dir::ClientToRemote => (client, remote),
        Dir::RemoteToClient => (remote, client),
    };
    rx.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(err("timeout"))?;
    let cpu0 = match via {
        Via::Proxy(d, _) => d.cpu(),
        Via::Haproxy(h, _) => h.cpu(),
        _ => 0.0,
    };
    let t0 = Instant::now();
    let writer = thread::spawn(move || -> Res<f64> {
        let c0 = thread_cpu();
        let mut tx = tx;
        let mut buf = vec![0u8; GEN_BUF];
        Pattern(0x1234_5678_9abc_def1).fill(&mut buf);
        let mut left = bytes;
        while left > 0 {
            let n = (left as usize).min(buf.len());
            tx.write_all(&buf[..n]).map_err(err("bulk write"))?;
            left -= n as u64;
        }
        tx.shutdown(Shutdown::Write).map_err(err("shutdown"))?;
        let c = thread_cpu() - c0;
        // Keep the socket open until the reader is done (no reset on close).
        let mut sink = [0u8; 64];
        let _ = tx.read(&mut sink);
        Ok(c)
    });
    let reader = thread::spawn(move || -> Res<(u64, f64, Instant)> {
        let c0 = thread_cpu();
        let mut rx = rx;
        let mut buf = vec![0u8; GEN_BUF];
        let mut got = 0u64;
        loop {
            match rx.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("bulk read after {got} bytes: {e}")),
            }
        }
        let end = Instant::now();
        Ok((got, thread_cpu() - c0, end))
    });
    let (got, rcpu, end) = reader.join().map_err(|_| "reader panicked")??;
    let wcpu = writer.join().map_err(|_| "writer panicked")??;
    let secs = (end - t0).as_secs_f64();
    let relay_cpu = match via {
        Via::Direct => None,
        Via::Proxy(d, _) => Some(d.cpu() - cpu0),
        Via::Haproxy(h, _) => Some(h.cpu() - cpu0),
        Via::Socat(_) => socat.map(Socat::finish),
    };
    if got != bytes {
        return Err(format!(
            "{} {}: sent {bytes} bytes, {got} arrived",
            via.name(),
            dir.name()
        ));
    }
    let gib = bytes as f64 / GIB;
    Ok(Xfer {
        mbps: bytes as f64 / secs / 1e6,
        secs,
        relay_cpu_per_gib: relay_cpu.map(|c| c / gib),
        writer_share: wcpu / secs,
        reader_share: rcpu / secs,
    })
}

fn phase_throughput(cx: &Ctx, d: &Daemon) -> Res<J> {
    let bytes = cx.plan.xfer_bytes;
    println!("\n## 3. Throughput, {} MiB each way\n", bytes / MIB as u64);
    println!(
        "One connection per transfer; relays take turns, {} transfer(s) each per row, the \
         median shown; MB/s = 10^6 bytes/s; CPU s/GiB = the relay process's \
         utime+stime (socat: wait4 rusage) per GiB moved; gen % = the load generator's \
         writer/reader thread CPU as a share of one core over the transfer.\n",
        cx.plan.xfer_reps
    );
    let sink = TcpListener::bind((HOST, 0)).map_err(err("sink bind"))?;
    let sink_port = sink.local_addr().map_err(err("sink"))?.port();
    let mut out = Vec::new();
    let mut rows = Vec::new();
    let mut j = Vec::new();
    let blks_list = [2048usize, 16384, 65536];
    for dir in [Dir::ClientToRemote, Dir::RemoteToClient] {
        let direct = transfer(&Via::Direct, dir, bytes, &sink)?;
        let dmb = direct.mbps;
        out.push((dir, "direct".to_string(), 0usize, Some(direct)));
        for &b in &blks_list {
            // The relays take turns, `xfer_reps` times, so that a slow spell
            // of a shared machine falls on all of them; each shows its median.
            let mut hp = if cx.haproxy.is_some() && b >= 16384 {
                Some(Haproxy::start(&cx.dir, b, sink_port)?)
            } else {
                None
            };
            let (mut ps, mut ss, mut hs) = (Vec::new(), Vec::new(), Vec::new());
            let mut turns = || -> Res<()> {
                for _ in 0..cx.plan.xfer_reps {
                    ps.push(transfer(&Via::Proxy(d, b), dir, bytes, &sink)?);
                    if cx.socat.is_some() {
                        ss.push(transfer(&Via::Socat(b), dir, bytes, &sink)?);
                    }
                    if let Some(hp) = &hp {
                        hs.push(transfer(&Via::Haproxy(hp, b), dir, bytes, &sink)?);
                    }
                }
                Ok(())
            };
            let done = turns();
            if let Some(hp) = &mut hp {
                hp.stop();
            }
            done?;
            let p = median(ps).ok_or("no proxy transfer")?;
            let s = median(ss);
            let h = median(hs);
            let (pm, pc) = (p.mbps, p.relay_cpu_per_gib);
            out.push((dir, format!("sockproxyd BLKS={b}"), b, Some(p)));
            let ratio_s = s.as_ref().map(|s| pm / s.mbps);
            let cpu_s = s.as_ref().and_then(|s| Some(pc? / s.relay_cpu_per_gib?));
            let ratio_h = h.as_ref().map(|h| pm / h.mbps);
            let cpu_h = h.as_ref().and_then(|h| Some(pc? / h.relay_cpu_per_gib?));
            j.push(
                J::obj()
                    .with("direction", dir.name())
                    .with("blks", b)
                    .with("proxy_mb_per_s", round(pm, 1))
                    .with("proxy_cpu_s_per_gib", pc.map(|x| round(x, 3)))
                    .with("direct_mb_per_s", round(dmb, 1))
                    .with("socat_mb_per_s", s.as_ref().map(|s| round(s.mbps, 1)))
                    .with(
                        "socat_cpu_s_per_gib",
                        s.as_ref()
                            .and_then(|s| s.relay_cpu_per_gib.map(|x| round(x, 3))),
                    )
                    .with("haproxy_mb_per_s", h.as_ref().map(|h| round(h.mbps, 1)))
                    .with(
                        "haproxy_cpu_s_per_gib",
                        h.as_ref()
                            .and_then(|h| h.relay_cpu_per_gib.map(|x| round(x, 3))),
                    )
                    .with("proxy_over_direct", round(pm / dmb, 3))
                    .with("proxy_over_socat", ratio_s.map(|x| round(x, 3)))
                    .with("proxy_over_haproxy", ratio_h.map(|x| round(x, 3)))
                    .with("cpu_proxy_over_socat", cpu_s.map(|x| round(x, 3)))
                    .with("cpu_proxy_over_haproxy", cpu_h.map(|x| round(x, 3))),
            );
            out.push((dir, format!("socat -b {b}"), b, s));
            if b >= 16384 {
                out.push((dir, format!("haproxy tune.bufsize {b}"), b, h));
            }
        }
    }
    // The table: one row per relay and direction, with the ratios on the
    // proxy's rows.
    let lookup = |dir: Dir, prefix: &str, b: usize| -> Option<f64> {
        out.iter()
            .find(|(d2, n, b2, _)| *d2 == dir && n.starts_with(prefix) && *b2 == b)
            .and_then(|r| r.3.as_ref().map(|x| x.mbps))
    };
    for (dir, name, b, x) in &out {
        let Some(x) = x else {
            continue;
        };
        let is_proxy = name.starts_with("sockproxyd");
        let direct = lookup(*dir, "direct", 0).unwrap_or(f64::NAN);
        let ratio = |other: Option<f64>| {
            if is_proxy {
                other.map_or_else(|| "-".into(), |o| f2(x.mbps / o))
            } else {
                String::new()
            }
        };
        rows.push(vec![
            dir.name().into(),
            name.clone(),
            format!("{:.0}", x.mbps),
            f2(x.secs),
            opt2(x.relay_cpu_per_gib),
            format!(
                "{:.0}/{:.0}",
                x.writer_share * 100.0,
                x.reader_share * 100.0
            ),
            ratio(Some(direct)),
            ratio(lookup(*dir, "socat", *b)),
            ratio(lookup(*dir, "haproxy", *b)),
        ]);
    }
    table(
        &[
            "direction",
            "path",
            "MB/s",
            "s",
            "CPU s/GiB",
            "gen % w/r",
            "/direct",
            "/socat",
            "/haproxy",
        ],
        &rows,
    );
    cx.print_skipped();
    Ok(J::Arr(j))
}

// ---------------------------------------------------------------------------
// 4. Scale

fn open_many(d: &Daemon, target: u16, n: usize) -> Res<Vec<TcpStream>> {
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    let batch = 500;
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        for k in i..end {
            conns.push(
                d.begin(target, "")
                    .map_err(|e| format!("connection {k}: {e}"))?,
            );
        }
        for (k, s) in conns.iter_mut().enumerate().skip(i) {
            Daemon::finish(s)
                .map_err(|e| format!("connection {k} of {n}: {e}{}", d.log_tail(8)))?;
        }
        i = end;
    }
    Ok(conns)
}

/// Sends a distinct 16-byte message on every connection and checks each
/// comes back; returns how many did.
fn verify_echo(conns: &mut [TcpStream]) -> usize {
    let mut ok = 0;
    for (b, chunk) in conns.chunks_mut(1000).enumerate() {
        for (k, s) in chunk.iter_mut().enumerate() {
            let m = format!("{:015}\n", b * 1000 + k);
            let _ = s.write_all(m.as_bytes());
        }
        for (k, s) in chunk.iter_mut().enumerate() {
            let m = format!("{:015}\n", b * 1000 + k);
            let mut back = [0u8; 16];
            if s.read_exact(&mut back).is_ok() && back == m.as_bytes() {
                ok += 1;
            }
        }
    }
    ok
}

fn phase_scale(cx: &Ctx) -> Res<J> {
    println!("\n## 4. Concurrent echo connections (BLKS={BLKS_DEFAULT})\n");
    println!(
        "N clients CONN through a fresh daemon (one per N) to the echo device, 500 at a time; \
         then each sends a distinct 16-byte message and must get it back. KiB/conn = (RSS \
         loaded - start-up RSS) / N; budget = start-up RSS + N x (2 x BLKS + 1 KiB).\n"
    );
    let mut rows = Vec::new();
    let mut j = Vec::new();
    // The daemon holds two descriptors per connection beside its own and a reserve
    // for notifications (README "Security"); it sizes max_conns to that, so stay
    // under it with room to spare.
    let cap = (cx.nofile.saturating_sub(128) / 2) as usize;
    for &wanted in &cx.plan.scale {
        let n = wanted.min(cap);
        if n < wanted {
            println!(
                "(N={wanted} capped at {n}: RLIMIT_NOFILE is {} and cannot be raised here, \
                 which needs CAP_SYS_RESOURCE; the daemon needs 2 descriptors per connection)\n",
                cx.nofile
            );
        }
        let d = cx.daemon()?;
        let start = d.start_rss_kib;
        let base = cx.echo.open();
        let t0 = Instant::now();
        let mut conns = open_many(&d, cx.echo.port, n)?;
        let open_s = t0.elapsed().as_secs_f64();
        wait_until(
            Duration::from_secs(20),
            "the echo device to hold every connection",
            || cx.echo.open() >= base + n,
        )?;
        let t1 = Instant::now();
        let ok = verify_echo(&mut conns);
        let verify_s = t1.elapsed().as_secs_f64();
        thread::sleep(Duration::from_millis(200));
        let rss = d.rss();
        let hwm = proc_status(d.pid, "VmHWM").unwrap_or(0);
        let fds = fd_count(d.pid).map_or(0, |n| n as usize);
        let per = (rss as f64 - start as f64) / n as f64;
        let budget = start as f64 + n as f64 * (2.0 * BLKS_DEFAULT as f64 + 1024.0) / 1024.0;
        drop(conns);
        wait_until(
            Duration::from_secs(30),
            "the daemon to close every connection",
            || cx.echo.open() <= base,
        )?;
        thread::sleep(Duration::from_millis(200));
        let after = d.rss();
        let code = d.stop()?;
        rows.push(vec![
            n.to_string(),
            format!("{ok}/{n}"),
            f2(open_s),
            f2(verify_s),
            start.to_string(),
            rss.to_string(),
            f2(per),
            format!("{budget:.0}"),
            after.to_string(),
            fds.to_string(),
        ]);
        j.push(
            J::obj()
                .with("wanted", wanted)
                .with("connections", n)
                .with("capped_by_rlimit_nofile", (n < wanted).then_some(cx.nofile))
                .with("verified", ok)
                .with("open_s", round(open_s, 3))
                .with("verify_s", round(verify_s, 3))
                .with("rss_start_kib", start)
                .with("rss_loaded_kib", rss)
                .with("hwm_kib", hwm)
                .with("rss_per_conn_kib", round(per, 2))
                .with("rss_budget_kib", round(budget, 0))
                .with("rss_after_close_kib", after)
                .with("daemon_fds", fds)
                .with("exit_status", code as i64),
        );
    }
    table(
        &[
            "conns",
            "verified",
            "open s",
            "verify s",
            "start RSS KiB",
            "loaded RSS KiB",
            "KiB/conn",
            "budget KiB",
            "RSS after close KiB",
            "daemon fds",
        ],
        &rows,
    );
    Ok(J::obj().with("runs", J::Arr(j)))
}

// ---------------------------------------------------------------------------
// 5. Idle cost

fn phase_idle(cx: &Ctx) -> Res<J> {
    let secs = cx.plan.idle_secs;
    println!("\n## 5. Idle cost\n");
    println!(
        "A fresh daemon; 100 echo connections (no traffic) open; after 1 s to settle, the \
         daemon's context switches (all threads) and CPU over {secs} s.\n"
    );
    let d = cx.daemon()?;
    let start = d.start_rss_kib;
    let mut conns = open_many(&d, cx.echo.port, 100)?;
    let ok = verify_echo(&mut conns);
    thread::sleep(Duration::from_secs(1));
    let (a, c0) = (ctxt_switches(d.pid), d.cpu());
    thread::sleep(Duration::from_secs_f64(secs));
    let (b, c1) = (ctxt_switches(d.pid), d.cpu());
    let total: u64 = b.iter().map(|x| x.1).sum::<u64>() - a.iter().map(|x| x.1).sum::<u64>();
    let per_thread: Vec<String> = b
        .iter()
        .map(|(k, v)| {
            let before = a.iter().find(|x| &x.0 == k).map_or(0, |x| x.1);
            format!("{k}={}", v - before)
        })
        .collect();
    let rss = d.rss();
    drop(conns);
    table(
        &["measure", "value"],
        &[
            vec!["RSS at start, KiB".into(), start.to_string()],
            vec!["RSS with 100 idle connections, KiB".into(), rss.to_string()],
            vec![format!("context switches in {secs} s"), total.to_string()],
            vec!["wake-ups per second".into(), f2(total as f64 / secs)],
            vec![format!("CPU seconds in {secs} s"), f2(c1 - c0)],
            vec!["connections verified".into(), format!("{ok}/100")],
        ],
    );
    println!("\n(per thread: {})", per_thread.join(", "));
    let code = d.stop()?;
    Ok(J::obj()
        .with("seconds", secs)
        .with("rss_start_kib", start)
        .with("rss_100_idle_kib", rss)
        .with("ctxt_switches", total)
        .with("wakeups_per_s", round(total as f64 / secs, 3))
        .with("cpu_s", round(c1 - c0, 3))
        .with("per_thread", per_thread.join(", "))
        .with("exit_status", code as i64))
}

// ---------------------------------------------------------------------------
// 6. Notification storm

struct Storm {
    messages: usize,
    notifications: usize,
    max_per_conn: usize,
    longest_wait_ms: f64,
    p99_wait_ms: f64,
    unannounced: usize,
    secs: f64,
}

fn storm(d: &Daemon, luup: &Luup, n: usize, pace: &str, dev0: i64) -> Res<Storm> {
    let msgs = 20;
    let gap = Duration::from_millis(10);
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    // SAFETY: listen on a descriptor we own (room for the 500 connects).
    unsafe { libc::listen(l.as_raw_fd(), 1024) };
    let port = l.local_addr().map_err(err("addr"))?.port();
    let mut clients = Vec::with_capacity(n);
    let mut remotes = Vec::with_capacity(n);
    for i in 0..n {
        let c = d.conn(
            port,
            &format!("NTFY={}/{SID}/{ACTION} PACE={pace}", dev0 + i as i64),
        )?;
        remotes.push(accept_timeout(&l, IO_TIMEOUT)?);
        clients.push(c);
    }
    thread::sleep(Duration::from_millis(200));
    luup.drain();
    let msg = b"storm message, 32 bytes long..\r\n";
    let total = (n * msgs * msg.len()) as u64;
    // The clients read everything, as plugins do when notified.
    let reader = thread::spawn(move || -> Res<u64> {
        let mut poll = Poll::new().map_err(err("poll"))?;
        let mut socks = Vec::new();
        for (i, c) in clients.into_iter().enumerate() {
            c.set_nonblocking(true).map_err(err("nonblocking"))?;
            let mut s = mio::net::TcpStream::from_std(c);
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE)
                .map_err(err("register"))?;
            socks.push(s);
        }
        let mut events = Events::with_capacity(1024);
        let mut got = 0u64;
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < total && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(err("poll"))?;
            for ev in events.iter() {
                let Some(s) = socks.get_mut(ev.token().0) else {
                    continue;
                };
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => got += k as u64,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
        Ok(got)
    });
    let t0 = Instant::now();
    let mut sent: Vec<Vec<Instant>> = vec![Vec::with_capacity(msgs); n];
    for k in 0..msgs {
        if let Some(w) = (t0 + gap * k as u32).checked_duration_since(Instant::now()) {
            thread::sleep(w);
        }
        for (i, r) in remotes.iter_mut().enumerate() {
            r.write_all(msg).map_err(err("storm send"))?;
            sent[i].push(Instant::now());
        }
    }
    let last_send = Instant::now();
    let got = reader.join().map_err(|_| "storm reader panicked")??;
    if got != total {
        return Err(format!("storm: the clients got {got} of {total} bytes"));
    }
    // Let held (PACE) and queued notifications go out: quiet for 500 ms
    // after the pace window.
    let pace_s: f64 = pace.parse().unwrap_or(0.0);
    let settle = last_send + Duration::from_secs_f64(pace_s) + Duration::from_millis(300);
    let mut evs = Vec::new();
    let mut last_ev = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let more = luup.drain();
        if !more.is_empty() {
            last_ev = Instant::now();
        }
        evs.extend(more);
        if Instant::now() > settle && last_ev.elapsed() > Duration::from_millis(500) {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let secs = (last_ev.max(last_send) - t0).as_secs_f64();
    let mut by_dev: HashMap<i64, Vec<Instant>> = HashMap::new();
    for e in &evs {
        by_dev.entry(e.dev).or_default().push(e.at);
    }
    let mut waits = Vec::new();
    let mut unannounced = 0;
    let mut max_per_conn = 0;
    for (i, times) in sent.iter().enumerate() {
        let mut ntf = by_dev.remove(&(dev0 + i as i64)).unwrap_or_default();
        ntf.sort();
        max_per_conn = max_per_conn.max(ntf.len());
        for t in times {
            match ntf.iter().find(|a| *a >= t) {
                Some(a) => waits.push(us(*a - *t) / 1000.0),
                None => unannounced += 1,
            }
        }
    }
    let stray = by_dev.values().map(Vec::len).sum::<usize>();
    drop(remotes);
    thread::sleep(Duration::from_millis(300));
    luup.drain();
    let w = Dist::of(waits);
    Ok(Storm {
        messages: n * msgs,
        notifications: evs.len() - stray,
        max_per_conn,
        longest_wait_ms: w.max,
        p99_wait_ms: w.p99,
        unannounced,
        secs,
    })
}

fn phase_storm(cx: &Ctx) -> Res<(J, Vec<Storm>)> {
    let n = cx.plan.storm_conns;
    println!("\n## 6. Notification storm\n");
    println!(
        "{n} connections (fresh daemon), each receiving 20 messages of 32 bytes 10 ms apart, the \
         clients reading everything. wait = from a message's send to the first notification for \
         its connection received after it; coalesced = messages - notifications.\n"
    );
    let d = cx.daemon()?;
    let mut rows = Vec::new();
    let mut j = J::obj();
    let mut out = Vec::new();
    for (pace, dev0) in [("0", 10_000i64), ("1", 20_000)] {
        let s = storm(&d, &cx.luup, n, pace, dev0)?;
        rows.push(vec![
            format!("PACE={pace}"),
            s.messages.to_string(),
            s.notifications.to_string(),
            (s.messages as i64 - s.notifications as i64).to_string(),
            s.max_per_conn.to_string(),
            f1(s.p99_wait_ms),
            f1(s.longest_wait_ms),
            s.unannounced.to_string(),
            f2(s.secs),
        ]);
        j.set(
            &format!("pace_{pace}"),
            J::obj()
                .with("messages", s.messages)
                .with("notifications", s.notifications)
                .with("coalesced", s.messages as i64 - s.notifications as i64)
                .with("max_notifications_per_conn", s.max_per_conn)
                .with("p99_wait_ms", round(s.p99_wait_ms, 2))
                .with("longest_wait_ms", round(s.longest_wait_ms, 2))
                .with("unannounced_messages", s.unannounced)
                .with("seconds", round(s.secs, 3)),
        );
        out.push(s);
    }
    table(
        &[
            "pace",
            "messages",
            "notifications",
            "coalesced",
            "max/conn",
            "p99 wait ms",
            "longest wait ms",
            "unannounced",
            "s",
        ],
        &rows,
    );
    let code = d.stop()?;
    j.set("exit_status", code as i64);
    Ok((j, out))
}

// ---------------------------------------------------------------------------
// 7. Connect burst and slow reader

fn phase_burst(cx: &Ctx, d: &Daemon) -> Res<(J, usize)> {
    let n = cx.plan.burst;
    let addr: SocketAddr = format!("{HOST}:{}", d.port)
        .parse()
        .map_err(err("address"))?;
    let mut poll = Poll::new().map_err(err("poll"))?;
    let mut socks = Vec::with_capacity(n);
    let mut refused = 0;
    let t0 = Instant::now();
    for i in 0..n {
        match mio::net::TcpStream::connect(addr) {
            Ok(mut s) => {
                poll.registry()
                    .register(&mut s, Token(i), Interest::READABLE)
                    .map_err(err("register"))?;
                socks.push(Some((s, Vec::new())));
            }
            Err(_) => {
                refused += 1;
                socks.push(None);
            }
        }
    }
    let issued = t0.elapsed();
    let mut greeted = Vec::new();
    let mut bad = 0;
    let mut events = Events::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    while greeted.len() + bad + refused < n && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(err("poll"))?;
        for ev in events.iter() {
            let Some(slot) = socks.get_mut(ev.token().0) else {
                continue;
            };
            let Some((s, line)) = slot else {
                continue;
            };
            let mut done = None;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        done = Some(false);
                        break;
                    }
                    Ok(k) => {
                        line.extend_from_slice(&buf[..k]);
                        if line.contains(&b'\n') {
                            done = Some(line.starts_with(b"OK TOGGLEDBITS-SOCKPROXY 1 "));
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        done = Some(false);
                        break;
                    }
                }
            }
            match done {
                Some(true) => greeted.push(us(t0.elapsed()) / 1000.0),
                Some(false) => bad += 1,
                None => continue,
            }
            *slot = None;
        }
    }
    drop(socks);
    let g = greeted.len();
    let dist = Dist::of(greeted);
    Ok((
        J::obj()
            .with("clients", n)
            .with("greeted", g)
            .with("refused_or_failed", refused + bad)
            .with("connects_issued_ms", round(us(issued) / 1000.0, 2))
            .with("greeting_p50_ms", round(dist.p50, 2))
            .with("greeting_p99_ms", round(dist.p99, 2))
            .with("all_greeted_ms", round(dist.max, 2)),
        g,
    ))
}

struct Slow {
    c2r: u64,
    r2c: u64,
    c2r_ok: bool,
    r2c_ok: bool,
    secs: f64,
}

/// Sends `size` pseudo-random bytes, returns their sha256.
fn slow_send(mut s: TcpStream, size: usize, seed: u64) -> Res<String> {
    let mut h = Sha256::new();
    let mut p = Pattern(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        s.write_all(&buf[..n])
            .map_err(err("slow-reader test: write"))?;
        left -= n;
    }
    s.shutdown(Shutdown::Write).map_err(err("shutdown"))?;
    Ok(h.hex())
}

/// Pauses, then one read of at most 64 KiB every 2 ms until end-of-stream.
fn slow_read(mut s: TcpStream, pause: Duration) -> Res<(u64, String)> {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(err("timeout"))?;
    thread::sleep(pause);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut next = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("slow read after {got} bytes: {e}")),
        }
        next += Duration::from_millis(2);
        if let Some(w) = next.checked_duration_since(Instant::now()) {
            thread::sleep(w);
        }
    }
    Ok((got, h.hex()))
}

fn phase_slow(cx: &Ctx, d: &Daemon) -> Res<Slow> {
    let size = cx.plan.slow_bytes;
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    let port = l.local_addr().map_err(err("addr"))?.port();
    let c = d.conn(port, "")?;
    let r = accept_timeout(&l, IO_TIMEOUT)?;
    let pause = cx.plan.slow_pause;
    let t0 = Instant::now();
    let (c2, r2) = (
        c.try_clone().map_err(err("clone"))?,
        r.try_clone().map_err(err("clone"))?,
    );
    let cw = thread::spawn(move || slow_send(c2, size, 0xfeed_beef_0000_0001));
    let rw = thread::spawn(move || slow_send(r2, size, 0xfeed_beef_0000_0002));
    let rr = thread::spawn(move || slow_read(r, pause));
    let cr = thread::spawn(move || slow_read(c, pause));
    let join = |t: thread::JoinHandle<Res<String>>| t.join().map_err(|_| "panicked".to_string());
    let sent_c = join(cw)??;
    let sent_r = join(rw)??;
    let (got_r, hash_r) = rr.join().map_err(|_| "panicked")??;
    let (got_c, hash_c) = cr.join().map_err(|_| "panicked")??;
    Ok(Slow {
        c2r: got_r,
        r2c: got_c,
        c2r_ok: hash_r == sent_c && got_r == size as u64,
        r2c_ok: hash_c == sent_r && got_c == size as u64,
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn phase_burst_slow(cx: &Ctx) -> Res<(J, usize, Slow)> {
    println!("\n## 7. Connect burst and slow reader\n");
    let n = cx.plan.burst;
    let mb = cx.plan.slow_bytes / MIB;
    println!(
        "Burst: {n} non-blocking connects issued back to back to a fresh daemon, each must get \
         the greeting. Slow reader: one connection (BLKS={BLKS_DEFAULT}) carrying {mb} MiB each \
         way at once; both readers pause {:?}, then read at most 64 KiB every 2 ms; sha256 \
         compared.\n",
        cx.plan.slow_pause
    );
    let d = cx.daemon()?;
    let (jb, greeted) = phase_burst(cx, &d)?;
    let slow = phase_slow(cx, &d)?;
    let code = d.stop()?;
    let get = |k: &str| -> String {
        if let J::Obj(m) = &jb
            && let Some((_, J::Num(x))) = m.iter().find(|(kk, _)| kk == k)
        {
            return format!("{x}");
        }
        "-".into()
    };
    table(
        &["measure", "value"],
        &[
            vec!["burst: greeted".into(), format!("{greeted}/{n}")],
            vec![
                "burst: connects issued in, ms".into(),
                get("connects_issued_ms"),
            ],
            vec!["burst: greeting p50, ms".into(), get("greeting_p50_ms")],
            vec!["burst: greeting p99, ms".into(), get("greeting_p99_ms")],
            vec!["burst: all greeted after, ms".into(), get("all_greeted_ms")],
            vec![
                "slow reader: client->remote bytes, sha256".into(),
                format!(
                    "{} / {}, {}",
                    slow.c2r,
                    cx.plan.slow_bytes,
                    if slow.c2r_ok { "intact" } else { "MISMATCH" }
                ),
            ],
            vec![
                "slow reader: remote->client bytes, sha256".into(),
                format!(
                    "{} / {}, {}",
                    slow.r2c,
                    cx.plan.slow_bytes,
                    if slow.r2c_ok { "intact" } else { "MISMATCH" }
                ),
            ],
            vec!["slow reader: seconds".into(), f2(slow.secs)],
        ],
    );
    let j = J::obj()
        .with("burst", jb)
        .with(
            "slow_reader",
            J::obj()
                .with("bytes_each_way", cx.plan.slow_bytes)
                .with("client_to_remote_bytes", slow.c2r)
                .with("remote_to_client_bytes", slow.r2c)
                .with("client_to_remote_sha256_ok", slow.c2r_ok)
                .with("remote_to_client_sha256_ok", slow.r2c_ok)
                .with("seconds", round(slow.secs, 3)),
        )
        .with("exit_status", code as i64);
    Ok((j, greeted, slow))
}

// ---------------------------------------------------------------------------
// 8. Hostile load: memory under non-reading floods, busy connections per
// build, greeting latency during a blank-line flood

/// The x86_64 musl build (`make cross`): the router's allocator, run natively.
const MUSL_BIN: &str = "dist/sockproxyd-x86_64-unknown-linux-musl";
/// BLKS of the hostile clients: the largest a client may ask for.
const HOSTILE_BLKS: usize = MIB;
/// `max_mem=` given to the daemon under hostile load, when it knows the key.
const HOSTILE_MAX_MEM_MIB: u64 = 16;
/// `max_mem=` for the busy-connection rows: more than they need, so the rows show
/// what a connection costs, not the budget.
const BUSY_MAX_MEM_MIB: u64 = 64;
/// Peak RSS under hostile load may exceed start-up RSS + max_mem by this much.
const HOSTILE_MARGIN_KIB: u64 = 2048;
/// Kernel buffers of the bench's own ends of flooded connections: small, so that the
/// kernel does not hold gigabytes for peers that never read.
const PEER_SOCKBUF: i32 = 64 * 1024;

/// Whether `bin` knows `[host] max_mem=`: a file with a bad value is an error for a
/// daemon that knows the key and an ignored unknown key (a warning) for one that does
/// not; `--version` after `-c` makes it exit either way without listening.
fn knows_max_mem(bin: &Path, dir: &Path) -> bool {
    let probe = dir.join("max-mem-probe.ini");
    if fs::write(&probe, "[host]\nmax_mem=not-a-size\n").is_err() {
        return false;
    }
    match Command::new(bin)
        .arg("-c")
        .arg(&probe)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("max_mem"),
        Err(_) => false,
    }
}

/// A daemon from `bin` with DAEMON_CONFIG plus `max_mem=<mib>M` when it knows the key;
/// the max_mem in force (`None`: the binary has no such key).
fn daemon_with_max_mem(cx: &Ctx, bin: &Path, name: &str, mib: u64) -> Res<(Daemon, Option<u64>)> {
    let known = knows_max_mem(bin, &cx.dir);
    let cfg = cx.dir.join(format!("sockproxyd-bench-{name}.ini"));
    let extra = if known {
        format!("max_mem={mib}M\n")
    } else {
        String::new()
    };
    fs::write(&cfg, format!("{DAEMON_CONFIG}{extra}")).map_err(err("write a configuration"))?;
    Ok((
        Daemon::start(bin, &cfg, cx.luup.port)?,
        known.then_some(mib),
    ))
}

/// SO_SNDBUF and SO_RCVBUF of `s` to `bytes` (the kernel doubles them).
fn small_bufs(s: &TcpStream, bytes: i32) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own, with a pointer to a local i32.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

/// `n` connections through `d` to a listener of ours, `CONN ... <opts>`, 100 at a
/// time: every (client, remote) pair, both ends with small kernel buffers.
fn open_pairs(d: &Daemon, n: usize, opts: &str) -> Res<Vec<(TcpStream, TcpStream)>> {
    let l = TcpListener::bind((HOST, 0)).map_err(err("bind"))?;
    let port = l.local_addr().map_err(err("addr"))?.port();
    let mut pairs = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + 100).min(n);
        let mut batch = Vec::new();
        for k in i..end {
            let s = d
                .begin(port, opts)
                .map_err(|e| format!("connection {k}: {e}"))?;
            small_bufs(&s, PEER_SOCKBUF);
            batch.push(s);
        }
        for (k, mut s) in batch.into_iter().enumerate() {
            Daemon::finish(&mut s)
                .map_err(|e| format!("connection {} of {n}: {e}{}", i + k, d.log_tail(8)))?;
            let r = accept_timeout(&l, IO_TIMEOUT)?;
            small_bufs(&r, PEER_SOCKBUF);
            pairs.push((s, r));
        }
        i = end;
    }
    Ok(pairs)
}

/// Peers that send whenever they can and never read: one mio thread writing `chunk`
/// to every socket it holds until stopped. Most of what they send waits in the
/// daemon's kernel buffers (autotuned up to tcp_rmem/tcp_wmem: several MiB per
/// direction on loopback) before its BLKS buffers fill: the run reports the
/// machine's TCP memory, which the kernel bounds (tcp_mem).
struct Pump {
    written: Arc<AtomicU64>,
    /// Sockets whose writes failed (the daemon closed them).
    failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<mio::net::TcpStream>>>,
}

impl Pump {
    fn start(socks: Vec<TcpStream>, chunk: Vec<u8>) -> Res<Pump> {
        let mut poll = Poll::new().map_err(err("poll"))?;
        let mut ms = Vec::with_capacity(socks.len());
        for (i, s) in socks.into_iter().enumerate() {
            s.set_nonblocking(true).map_err(err("nonblocking"))?;
            let mut m = mio::net::TcpStream::from_std(s);
            poll.registry()
                .register(&mut m, Token(i), Interest::WRITABLE)
                .map_err(err("register"))?;
            ms.push(m);
        }
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, f, st) = (written.clone(), failed.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("pump".into())
            .spawn(move || {
                let mut ready = vec![true; ms.len()];
                let mut events = Events::with_capacity(1024);
                while !st.load(Ordering::Relaxed) {
                    for (s, r) in ms.iter_mut().zip(ready.iter_mut()) {
                        // A bounded number of writes per socket and round.
                        for _ in 0..16 {
                            if !*r {
                                break;
                            }
                            match s.write(&chunk) {
                                Ok(k) => {
                                    w.fetch_add(k as u64, Ordering::Relaxed);
                                }
                                Err(e) if e.kind() == ErrorKind::WouldBlock => *r = false,
                                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                                Err(_) => {
                                    f.fetch_add(1, Ordering::Relaxed);
                                    *r = false;
                                    let _ = poll.registry().deregister(s);
                                }
                            }
                        }
                    }
                    let timeout = if ready.iter().any(|&r| r) {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(50)
                    };
                    if poll.poll(&mut events, Some(timeout)).is_err() {
                        continue;
                    }
                    for ev in events.iter() {
                        if let Some(r) = ready.get_mut(ev.token().0) {
                            *r = true;
                        }
                    }
                }
                ms
            })
            .map_err(err("spawn"))?;
        Ok(Pump {
            written,
            failed,
            stop,
            thread: Some(thread),
        })
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Waits until nothing more goes in for `quiet` (every peer blocked); false if
    /// that did not happen within `timeout`.
    fn settle(&self, quiet: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (mut last, mut since) = (self.written(), Instant::now());
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            let now = self.written();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }

    /// Stops writing; the sockets are closed.
    fn stop(mut self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
        (self.written(), self.failed.load(Ordering::Relaxed))
    }
}

/// The machine's TCP buffer memory (`TCP: ... mem <pages>` of /proc/net/sockstat).
fn tcp_mem_kib() -> Option<u64> {
    let s = fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut f = line.split_whitespace();
    f.find(|w| *w == "mem")?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096);
    Some(f.next()?.parse::<u64>().ok()? * page / 1024)
}

/// A fresh client's CONN to the echo device and a 16 KiB echo: milliseconds, or
/// what went wrong.
fn fresh_echo(d: &Daemon, echo: u16, seed: usize) -> Res<f64> {
    let t = Instant::now();
    let mut s = d.conn(echo, "")?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    let msg: Vec<u8> = (0..16 * 1024).map(|i| (i * 7 + seed) as u8).collect();
    s.write_all(&msg).map_err(err("echo send"))?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(err("echo read"))?;
    if back != msg {
        return Err("the echo came back different".into());
    }
    Ok(us(t.elapsed()) / 1000.0)
}

/// Peak RSS while N clients (BLKS=1 MiB) and their remotes all send and never read.
fn hostile_load(cx: &Ctx) -> Res<J> {
    let n = cx.plan.hostile_conns;
    let secs = cx.plan.hostile_secs;
    let (d, max_mem) = daemon_with_max_mem(cx, &cx.bin, "hostile", HOSTILE_MAX_MEM_MIB)?;
    let start = d.start_rss_kib;
    let pairs = open_pairs(&d, n, &format!("BLKS={HOSTILE_BLKS}"))?;
    let socks: Vec<TcpStream> = pairs.into_iter().flat_map(|(c, r)| [c, r]).collect();
    let pump = Pump::start(socks, vec![0x5a; 64 * 1024])?;
    let t0 = Instant::now();
    let mut peak = start;
    let mut echoes = Vec::new();
    let mut echo_errors = Vec::new();
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(d.rss());
        // A fresh client's CONN and echo, a few times during the load.
        let due = echoes.len() + echo_errors.len();
        if due < 3 && t0.elapsed().as_secs_f64() >= (due as f64 + 1.0) * secs / 4.0 {
            match fresh_echo(&d, cx.echo.port, due) {
                Ok(ms) => echoes.push(ms),
                Err(e) => echo_errors.push(e),
            }
        }
    }
    let hwm = proc_status(d.pid, "VmHWM").unwrap_or(0).max(peak);
    let tcp_mem = tcp_mem_kib();
    let (written, failed) = pump.stop();
    let code = d.stop()?;
    let budget = max_mem.map(|m| start + m * 1024 + HOSTILE_MARGIN_KIB);
    let worst_echo = echoes.iter().copied().fold(f64::NAN, f64::max);
    let mut rows = vec![
        vec!["clients (BLKS=1048576)".into(), n.to_string()],
        vec!["seconds of load".into(), f1(secs)],
        vec![
            "max_mem".into(),
            max_mem.map_or_else(|| "not known to this binary".into(), |m| format!("{m} MiB")),
        ],
        vec!["RSS at start, KiB".into(), start.to_string()],
        vec!["peak RSS (VmHWM), KiB".into(), hwm.to_string()],
        vec![
            "peak RSS - start, KiB".into(),
            hwm.saturating_sub(start).to_string(),
        ],
        vec![
            "bytes the peers got in, MiB".into(),
            f1(written as f64 / MIB as f64),
        ],
        vec!["peers cut off by the daemon".into(), failed.to_string()],
        vec![
            "the machine's TCP memory at the end, MiB".into(),
            tcp_mem.map_or_else(|| "-".into(), |k| f1(k as f64 / 1024.0)),
        ],
        vec![
            "fresh client CONN + 16 KiB echo, worst ms".into(),
            format!("{} ({} of 3 ok)", f1(worst_echo), echoes.len()),
        ],
    ];
    if let Some(b) = budget {
        rows.push(vec![
            format!("budget: start + max_mem + {HOSTILE_MARGIN_KIB} KiB"),
            b.to_string(),
        ]);
    }
    table(&["hostile load", "value"], &rows);
    if !echo_errors.is_empty() {
        return Err(format!(
            "a fresh client failed under hostile load: {}",
            echo_errors.join("; ")
        ));
    }
    Ok(J::obj()
        .with("clients", n)
        .with("blks", HOSTILE_BLKS)
        .with("seconds", secs)
        .with("max_mem_mib", max_mem)
        .with("rss_start_kib", start)
        .with("rss_peak_kib", hwm)
        .with("rss_budget_kib", budget)
        .with("peer_bytes_in", written)
        .with("peers_cut_off", failed)
        .with("tcp_mem_kib", tcp_mem)
        .with("fresh_echo_worst_ms", round(worst_echo, 2))
        .with("fresh_echo_ok", echoes.len())
        .with("exit_status", code as i64))
}

/// RSS per connection with `n` connections whose buffers both hold bytes: client and
/// remote send until the daemon stops reading them (neither reads).
fn busy_conns(cx: &Ctx, label: &str, bin: &Path, n: usize) -> Res<(J, Vec<String>)> {
    let (d, max_mem) = daemon_with_max_mem(cx, bin, "busy", BUSY_MAX_MEM_MIB)?;
    let start = d.start_rss_kib;
    let pairs = open_pairs(&d, n, "")?;
    let socks: Vec<TcpStream> = pairs.into_iter().flat_map(|(c, r)| [c, r]).collect();
    let pump = Pump::start(socks, vec![0xa5; 4096])?;
    let settled = pump.settle(Duration::from_millis(500), Duration::from_secs(30));
    thread::sleep(Duration::from_millis(200));
    let rss = d.rss();
    let written = pump.written();
    let (_, failed) = pump.stop();
    let code = d.stop()?;
    if !settled {
        return Err(format!(
            "{label}: the peers of {n} connections never stopped sending"
        ));
    }
    let per = (rss as f64 - start as f64) / n as f64;
    let budget = (2.0 * BLKS_DEFAULT as f64 + 1024.0) / 1024.0;
    let row = vec![
        label.to_string(),
        n.to_string(),
        start.to_string(),
        rss.to_string(),
        f2(per),
        f2(budget),
        f1(written as f64 / MIB as f64),
        failed.to_string(),
    ];
    let j = J::obj()
        .with("build", label)
        .with("binary", bin.display().to_string())
        .with("connections", n)
        .with("max_mem_mib", max_mem)
        .with("rss_start_kib", start)
        .with("rss_loaded_kib", rss)
        .with("rss_per_conn_kib", round(per, 2))
        .with("budget_per_conn_kib", round(budget, 2))
        .with("peer_bytes_in", written)
        .with("peers_cut_off", failed)
        .with("exit_status", code as i64);
    Ok((j, row))
}

/// Milliseconds from connect to the greeting, `n` fresh clients one after another.
fn greetings(d: &Daemon, n: usize) -> Res<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        // Spread over a second: each lands somewhere in the flooder's turns.
        thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let mut s = TcpStream::connect((HOST, d.port)).map_err(err("connect"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(err("timeout"))?;
        let g = read_line(&mut s)?;
        if !g.starts_with("OK TOGGLEDBITS-SOCKPROXY 1 ") {
            return Err(format!("greeting {g:?}"));
        }
        v.push(us(t.elapsed()) / 1000.0);
    }
    Ok(v)
}

/// Greeting latency without and with one client flooding blank lines.
fn greeting_under_flood(cx: &Ctx) -> Res<J> {
    let n = cx.plan.greeting_samples;
    let d = cx.daemon()?;
    let quiet = greetings(&d, n)?;
    let mut flooder = TcpStream::connect((HOST, d.port)).map_err(err("connect"))?;
    flooder
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    read_line(&mut flooder)?;
    let mut w = flooder.try_clone().map_err(err("clone"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let (st, fl) = (stop.clone(), flooded.clone());
    let writer = thread::spawn(move || {
        let chunk = vec![b'\n'; MIB];
        while !st.load(Ordering::Relaxed) {
            if w.write_all(&chunk).is_err() {
                return !st.load(Ordering::Relaxed);
            }
            fl.fetch_add(MIB as u64, Ordering::Relaxed);
        }
        false
    });
    wait_until(Duration::from_secs(10), "the flood to start", || {
        flooded.load(Ordering::Relaxed) > 0
    })?;
    let t0 = Instant::now();
    let during = greetings(&d, n);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = flooder.shutdown(Shutdown::Both);
    let cut_off = writer.join().unwrap_or(true);
    let during = during?;
    let code = d.stop()?;
    let mib = flooded.load(Ordering::Relaxed) as f64 / MIB as f64;
    let (q, f) = (Dist::of(quiet), Dist::of(during));
    let row = |what: &str, x: &Dist| {
        vec![
            what.to_string(),
            x.n.to_string(),
            format!("{:.2}", x.p50),
            format!("{:.2}", x.p99),
            format!("{:.2}", x.max),
        ]
    };
    table(
        &[
            "fresh client's greeting",
            "samples",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
        &[row("quiet", &q), row("during a blank-line flood", &f)],
    );
    println!(
        "\n(the flooder wrote {mib:.0} MiB of newlines in 1 MiB writes over the {secs:.2} s of \
         the flooded samples{})",
        if cut_off {
            "; its writes failed before the end"
        } else {
            ""
        }
    );
    let ms = |x: &Dist| {
        J::obj()
            .with("samples", x.n)
            .with("p50_ms", round(x.p50, 3))
            .with("p99_ms", round(x.p99, 3))
            .with("max_ms", round(x.max, 3))
    };
    Ok(J::obj()
        .with("quiet", ms(&q))
        .with("blank_line_flood", ms(&f))
        .with("flood_mib", round(mib, 1))
        .with("flood_seconds", round(secs, 3))
        .with("flooder_cut_off", cut_off)
        .with("exit_status", code as i64))
}

/// Every part runs even when one fails: the report, and what broke.
fn phase_hostile(cx: &Ctx) -> (J, Vec<String>) {
    println!("\n## 8. Hostile load\n");
    let n = cx.plan.hostile_conns;
    println!(
        "Memory: {n} clients CONN BLKS={HOSTILE_BLKS} through a fresh daemon (`max_mem=\
         {HOSTILE_MAX_MEM_MIB}M` added to its configuration when it knows the key) to remotes \
         of ours; clients and remotes send 64 KiB writes whenever they can and never read, for {} s; peak RSS = VmHWM. Meanwhile a fresh client CONNs to the echo device and echoes \
         16 KiB, 3 times.\n",
        cx.plan.hostile_secs
    );
    let mut j = J::obj();
    let mut broken = Vec::new();
    match hostile_load(cx) {
        Ok(x) => j.set("load", x),
        Err(e) => broken.push(format!("hostile load: {e}")),
    }
    let busy = cx.plan.busy_conns;
    println!(
        "\nBusy connections: {busy} connections at the default BLKS={BLKS_DEFAULT} (fresh daemon, \
         `max_mem={BUSY_MAX_MEM_MIB}M` when known); client and remote send until the daemon stops reading them, neither reads, so both buffers of every connection hold bytes; \
         RSS read once nothing has moved for 0.5 s. KiB/conn = (RSS - start-up RSS) / N, \
         against the budget 2 x BLKS + 1 KiB.\n"
    );
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let musl = root.join(MUSL_BIN);
    let builds: [(&str, PathBuf, &str); 2] = [
        ("glibc", cx.bin.clone(), ""),
        (
            "x86_64 musl",
            musl.clone(),
            "absent: build it with `make cross` or `sh cross/build.sh x86_64-unknown-linux-musl`",
        ),
    ];
    for (label, bin, absent) in builds {
        if !bin.is_file() {
            println!("({label} row skipped: {} {absent})", bin.display());
            runs.push(
                J::obj()
                    .with("build", label)
                    .with("binary", bin.display().to_string())
                    .with("skipped", format!("{} {absent}", bin.display())),
            );
            continue;
        }
        match busy_conns(cx, label, &bin, busy) {
            Ok((x, row)) => {
                runs.push(x);
                rows.push(row);
            }
            Err(e) => broken.push(format!("busy connections, {label}: {e}")),
        }
    }
    table(
        &[
            "build",
            "conns",
            "start RSS KiB",
            "loaded RSS KiB",
            "KiB/conn",
            "budget KiB/conn",
            "peers got in MiB",
            "cut off",
        ],
        &rows,
    );
    j.set("busy", J::Arr(runs));
    println!(
        "\nGreeting latency: {} fresh clients, one every 20 ms, read their greeting; then the \
         same while another client writes newlines in 1 MiB writes as fast as it can.\n",
        cx.plan.greeting_samples
    );
    match greeting_under_flood(cx) {
        Ok(x) => j.set("greeting", x),
        Err(e) => broken.push(format!("greeting under a flood: {e}")),
    }
    (j, broken)
}

// ---------------------------------------------------------------------------
// Targets

struct Target {
    what: String,
    value: String,
    met: Option<bool>,
}

fn find<'a>(j: &'a J, path: &[&str]) -> Option<&'a J> {
    let mut cur = j;
    for k in path {
        let J::Obj(m) = cur else { return None };
        cur = &m.iter().find(|(kk, _)| kk == k)?.1;
    }
    Some(cur)
}

fn num(j: &J, path: &[&str]) -> Option<f64> {
    match find(j, path)? {
        J::Num(x) => Some(*x),
        _ => None,
    }
}

fn targets(report: &J) -> Vec<Target> {
    let mut t = Vec::new();
    let mut add =
        |what: String, value: String, met: Option<bool>| t.push(Target { what, value, met });
    if let Some(J::Arr(rows)) = find(report, &["throughput"]) {
        for r in rows {
            let dir = match find(r, &["direction"]) {
                Some(J::Str(s)) => s.clone(),
                _ => String::new(),
            };
            let b = num(r, &["blks"]).unwrap_or(0.0);
            if let Some(x) = num(r, &["proxy_over_socat"]) {
                add(
                    format!("throughput >= socat, {dir}, BLKS={b}"),
                    format!("x{x:.2}"),
                    Some(x >= 1.0),
                );
            }
            if let Some(x) = num(r, &["proxy_over_haproxy"]) {
                add(
                    format!("throughput >= haproxy, {dir}, {b}"),
                    format!("x{x:.2}"),
                    Some(x >= 1.0),
                );
            }
            if let Some(x) = num(r, &["cpu_proxy_over_socat"]) {
                add(
                    format!("relay CPU/GiB <= socat's, {dir}, BLKS={b}"),
                    format!(
                        "{:.3} vs {:.3} s (x{x:.2})",
                        num(r, &["proxy_cpu_s_per_gib"]).unwrap_or(f64::NAN),
                        num(r, &["socat_cpu_s_per_gib"]).unwrap_or(f64::NAN)
                    ),
                    Some(x <= 1.0),
                );
            }
        }
    }
    for (k, label) in [("quiet", "quiet"), ("under_traffic", "under traffic")] {
        if let Some(x) = num(report, &["notification_latency", k, "p99_us"]) {
            add(
                format!("notification p99 < 1 ms, {label}"),
                format!("{x:.0} µs"),
                Some(x < 1000.0),
            );
        }
    }
    let added = |k: &str| num(report, &["echo_rtt", k, "added_p50_us"]);
    if let (Some(p), Some(s)) = (
        added(&format!("sockproxyd BLKS={BLKS_DEFAULT}")),
        added(&format!("socat -b {BLKS_DEFAULT}")),
    ) {
        add(
            "added echo round trip p50 <= socat's".into(),
            format!("{p:.1} vs {s:.1} µs"),
            Some(p <= s),
        );
    }
    if let Some(J::Arr(runs)) = find(report, &["scale", "runs"])
        && let Some(last) = runs.last()
    {
        let n = num(last, &["connections"]).unwrap_or(0.0);
        let wanted = num(last, &["wanted"]).unwrap_or(0.0);
        let ok = num(last, &["verified"]).unwrap_or(0.0);
        let rss = num(last, &["rss_loaded_kib"]).unwrap_or(f64::NAN);
        let budget = num(last, &["rss_budget_kib"]).unwrap_or(f64::NAN);
        let capped = if n < wanted {
            format!(" ({wanted} wanted, capped by RLIMIT_NOFILE)")
        } else {
            String::new()
        };
        add(
            format!("{n} connections all served{capped}"),
            format!("{ok}/{n} verified"),
            Some(ok == n),
        );
        add(
            format!("RSS with {n} connections <= start-up + N x (2 x BLKS + 1 KiB)"),
            format!("{rss:.0} vs {budget:.0} KiB"),
            Some(rss <= budget),
        );
    }
    if let Some(g) = num(report, &["burst_slow", "burst", "greeted"]) {
        let n = num(report, &["burst_slow", "burst", "clients"]).unwrap_or(0.0);
        add(
            format!("burst of {n} connects all greeted"),
            format!("{g}/{n}"),
            Some(g == n),
        );
    }
    if let Some(load) = find(report, &["hostile", "load"]) {
        let peak = num(load, &["rss_peak_kib"]).unwrap_or(f64::NAN);
        let n = num(load, &["clients"]).unwrap_or(0.0);
        match num(load, &["rss_budget_kib"]) {
            Some(b) => add(
                format!(
                    "peak RSS, {n} hostile clients <= start-up + max_mem + {HOSTILE_MARGIN_KIB} KiB"
                ),
                format!("{peak:.0} vs {b:.0} KiB"),
                Some(peak <= b),
            ),
            None => add(
                format!("peak RSS, {n} hostile clients <= start-up + max_mem + margin"),
                format!("{peak:.0} KiB (no max_mem in this binary)"),
                None,
            ),
        }
    }
    if let Some(J::Arr(runs)) = find(report, &["hostile", "busy"]) {
        for r in runs {
            let build = match find(r, &["build"]) {
                Some(J::Str(s)) => s.clone(),
                _ => String::new(),
            };
            let n = num(r, &["connections"]).unwrap_or(0.0);
            let label = format!("RSS per busy connection <= 2 x BLKS + 1 KiB, {build}");
            match (num(r, &["rss_per_conn_kib"]), find(r, &["skipped"])) {
                (Some(per), _) => {
                    let b = num(r, &["budget_per_conn_kib"]).unwrap_or(f64::NAN);
                    add(
                        format!("{label} ({n} conns)"),
                        format!("{per:.2} vs {b:.2} KiB"),
                        Some(per <= b),
                    );
                }
                (None, Some(_)) => add(label, "skipped (no binary)".into(), None),
                (None, None) => {}
            }
        }
    }
    if let (Some(q), Some(f)) = (
        num(report, &["hostile", "greeting", "quiet", "p99_ms"]),
        num(
            report,
            &["hostile", "greeting", "blank_line_flood", "p99_ms"],
        ),
    ) {
        add(
            "greeting p99 during a blank-line flood <= quiet p99 + 5 ms".into(),
            format!("{f:.2} vs {q:.2} ms"),
            Some(f <= q + 5.0),
        );
    }
    if let Some(w) = num(report, &["idle", "wakeups_per_s"]) {
        add(
            "0 wake-ups per second when idle".into(),
            format!("{w:.2}/s"),
            Some(w == 0.0),
        );
    }
    if let (Some(J::Bool(a)), Some(J::Bool(b))) = (
        find(
            report,
            &["burst_slow", "slow_reader", "client_to_remote_sha256_ok"],
        ),
        find(
            report,
            &["burst_slow", "slow_reader", "remote_to_client_sha256_ok"],
        ),
    ) {
        add(
            "0 bytes lost to a slow reader".into(),
            if *a && *b {
                "all bytes, sha256 intact".into()
            } else {
                "LOST or corrupted".into()
            },
            Some(*a && *b),
        );
    }
    t
}

// ---------------------------------------------------------------------------
// main

fn machine() -> J {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let load = fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let mem = proc_status_meminfo();
    J::obj()
        .with(
            "cores",
            thread::available_parallelism().map_or(0, |n| n.get()),
        )
        .with("cpu", cpu)
        .with("kernel", kernel)
        .with("mem_total_kib", mem)
        .with("loadavg", load)
}

fn proc_status_meminfo() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const PHASES: [&str; 8] = [
    "latency",
    "rtt",
    "throughput",
    "scale",
    "idle",
    "storm",
    "burst",
    "hostile",
];

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench bench -- [--quick] [--json PATH] [--bin PATH] [--only PHASES]\n\
         PHASES: comma-separated, of {}",
        PHASES.join(",")
    );
    std::process::exit(2);
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut quick = false;
    let mut only: Vec<String> = PHASES.iter().map(|p| p.to_string()).collect();
    let mut json = root.join("target/bench/latest.json");
    let mut bin = std::env::var_os("SOCKPROXYD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sockproxyd")));
    if std::env::args().len() == 1 {
        // `cargo test --all-targets` runs harness = false benches with no
        // arguments (cargo bench passes --bench): check, don't measure.
        let mut sha = Sha256::new();
        sha.update(b"abc");
        let ok = sha.hex() == SHA256_ABC;
        println!(
            "bench: not run (use `make bench` or `cargo bench --bench bench`); self-check ok: {ok}"
        );
        std::process::exit(i32::from(!ok));
    }
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--echo-device" => {
                if let Err(e) = Echo::serve_in_this_process() {
                    eprintln!("echo device: {e}");
                    std::process::exit(1);
                }
                std::process::exit(0);
            }
            "--quick" => quick = true,
            "--only" => {
                only = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if only.iter().any(|p| !PHASES.contains(&p.as_str())) {
                    usage();
                }
            }
            "--json" => json = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--bin" => bin = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let started = Instant::now();
    let code = match run(quick, &json, &bin, &only) {
        Ok(broken) => i32::from(broken),
        Err(e) => {
            eprintln!("bench: FAILED: {e}");
            1
        }
    };
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    std::process::exit(code);
}

/// Runs every phase; `Ok(true)` when some phase broke (reported on stderr).
fn run(quick: bool, json: &Path, bin: &Path, only: &[String]) -> Res<bool> {
    let want = |p: &str| only.iter().any(|o| o == p);
    let plan = Plan::new(quick);
    // 10,000 clients + 10,000 echo ends here, 20,000 + a few in the daemon,
    // which inherits the limit.
    let max_conns = plan
        .scale
        .iter()
        .copied()
        .chain([plan.busy_conns])
        .max()
        .unwrap_or(0) as u64;
    let nofile = raise_nofile(2 * max_conns + 1024);
    if !bin.is_file() {
        return Err(format!(
            "no daemon at {} (build it: cargo build --release)",
            bin.display()
        ));
    }
    let dir = json
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    fs::create_dir_all(&dir).map_err(err("create the output directory"))?;
    let cfg = dir.join("sockproxyd-bench.ini");
    fs::write(&cfg, DAEMON_CONFIG).map_err(err("write the daemon's configuration"))?;
    let (socat, socat_why) = match have("socat", "-V") {
        Some(v) => (Some(v), String::new()),
        None => (
            None,
            "socat not found (make bench installs it as root)".into(),
        ),
    };
    let (haproxy, haproxy_why) = match have("haproxy", "-v") {
        Some(v) => (Some(v), String::new()),
        None => (
            None,
            "haproxy not found (make bench installs it as root)".into(),
        ),
    };
    let cx = Ctx {
        bin: bin.to_path_buf(),
        plan,
        luup: Luup::spawn()?,
        echo: Echo::spawn()?,
        socat,
        haproxy,
        socat_why,
        haproxy_why,
        dir,
        nofile,
        cfg,
    };
    let m = machine();
    let mode = if quick { " --quick" } else { "" };
    println!("# sockproxyd bench{}", if quick { " (quick)" } else { "" });
    println!();
    if let J::Obj(kv) = &m {
        for (k, v) in kv {
            let mut s = String::new();
            v.write(&mut s, 0);
            println!("- {k}: {}", s.trim_matches('"'));
        }
    }
    println!("- RLIMIT_NOFILE: {nofile}");
    println!(
        "- repeat: `make bench{}` = `cargo build --release && cargo bench --bench bench --{mode}`",
        if quick { " QUICK=1" } else { "" }
    );
    println!(
        "- daemon: `{} {}` (a fresh one per phase group), {}: `{}`",
        bin.display(),
        Daemon::args(&cx.cfg, cx.luup.port).join(" "),
        cx.cfg.display(),
        DAEMON_CONFIG.trim_end().replace('\n', " / ")
    );
    println!(
        "- socat: {}",
        cx.socat.as_deref().map_or_else(
            || format!("skipped: {}", cx.socat_why),
            |v| format!(
                "{v}; one per connection, no fork: `socat {}`",
                socat_cmd("<BLKS>", "<port>", "<target>").join(" ")
            )
        )
    );
    println!(
        "- haproxy: {}",
        cx.haproxy.as_deref().map_or_else(
            || format!("skipped: {}", cx.haproxy_why),
            |v| format!(
                "{v}; `haproxy -db -f <cfg>`, cfg: `{}`",
                haproxy_cfg("<BLKS>", "<port>", "<target>")
                    .trim_end()
                    .replace("\n    ", "; ")
                    .replace('\n', " / ")
            )
        )
    );
    let mut sha = Sha256::new();
    sha.update(b"abc");
    if sha.hex() != SHA256_ABC {
        return Err("the bench's own sha256 is wrong".into());
    }

    let mut report = J::obj()
        .with("quick", quick)
        .with("machine", m)
        .with("daemon", bin.display().to_string())
        .with("socat", cx.socat.clone())
        .with("haproxy", cx.haproxy.clone());
    let mut broken = false;
    let mut fail = |name: &str, e: String, report: &mut J| {
        eprintln!("bench: phase {name} FAILED: {e}");
        println!("\n**{name}: FAILED: {e}**");
        report.set(&format!("{name}_error"), e);
        broken = true;
    };

    // Latency, echo round trip and throughput share one daemon.
    let shared = ["latency", "rtt", "throughput"].iter().any(|p| want(p));
    match cx.daemon() {
        Ok(mut d) if shared => {
            report.set("start_rss_kib", d.start_rss_kib);
            if want("latency") {
                match phase_latency(&cx, &d) {
                    Ok(j) => report.set("notification_latency", j),
                    Err(e) => fail("notification_latency", e, &mut report),
                }
            }
            if want("rtt") {
                match phase_rtt(&cx, &d) {
                    Ok(j) => report.set("echo_rtt", j),
                    Err(e) => fail("echo_rtt", e, &mut report),
                }
            }
            if want("throughput") {
                match phase_throughput(&cx, &d) {
                    Ok(j) => report.set("throughput", j),
                    Err(e) => fail("throughput", e, &mut report),
                }
            }
            report.set("daemon_warnings", d.warnings());
            if let Err(e) = d.alive() {
                fail("daemon", e, &mut report);
            } else {
                match d.stop() {
                    Ok(0) => {}
                    Ok(c) => fail("daemon", format!("exit status {c} after STOP"), &mut report),
                    Err(e) => fail("daemon", e, &mut report),
                }
            }
        }
        // Started anyway: the start-up RSS is reported in every run.
        Ok(d) => {
            report.set("start_rss_kib", d.start_rss_kib);
            if let Err(e) = d.stop() {
                fail("daemon", e, &mut report);
            }
        }
        Err(e) => fail("daemon", e, &mut report),
    }
    if want("scale") {
        match phase_scale(&cx) {
            Ok(j) => report.set("scale", j),
            Err(e) => fail("scale", e, &mut report),
        }
    }
    if want("idle") {
        match phase_idle(&cx) {
            Ok(j) => report.set("idle", j),
            Err(e) => fail("idle", e, &mut report),
        }
    }
    if want("storm") {
        match phase_storm(&cx) {
            Ok((j, _)) => report.set("storm", j),
            Err(e) => fail("storm", e, &mut report),
        }
    }
    if want("burst") {
        match phase_burst_slow(&cx) {
            Ok((j, _, _)) => report.set("burst_slow", j),
            Err(e) => fail("burst_slow", e, &mut report),
        }
    }
    if want("hostile") {
        let (j, broken) = phase_hostile(&cx);
        report.set("hostile", j);
        if !broken.is_empty() {
            fail("hostile", broken.join("; "), &mut report);
        }
    }
    let bad_requests = cx.luup.bad.load(Ordering::Relaxed);
    if bad_requests > 0 {
        fail(
            "fake_luup",
            format!("{bad_requests} malformed notification request(s)"),
            &mut report,
        );
    }
    let _ = cx.luup.pending();

    println!("\n## Targets (read, never asserted)\n");
    let ts = targets(&report);
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.what.clone(),
                t.value.clone(),
                match t.met {
                    Some(true) => "met".into(),
                    Some(false) => "MISSED".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    table(&["target", "measured", ""], &rows);
    report.set(
        "targets",
        J::Arr(
            ts.iter()
                .map(|t| {
                    J::obj()
                        .with("target", t.what.clone())
                        .with("measured", t.value.clone())
                        .with("met", t.met)
                })
                .collect(),
        ),
    );
    let mut text = String::new();
    report.write(&mut text, 0);
    text.push('\n');
    fs::write(json, text).map_err(err("write the JSON report"))?;
    println!("\nJSON: {}", json.display());
    Ok(broken)
}
