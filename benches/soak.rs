//! `make soak`: a long run of mixed traffic against the release daemon, to show that
//! its memory and descriptors stay flat and that no byte is ever lost.
//!
//! # In scope
//! Starting `target/release/sockproxyd` (or `--bin`, or `SOCKPROXYD_BIN`) on loopback,
//! playing every peer it talks to (a fake Luup that counts notifications per pid, an
//! echo device, a transfer device that checks what it receives), and running workers
//! side by side for `--minutes N` (default 30): short connections (QUIT, CAPA, hang-ups
//! without QUIT), long transfers both ways with byte-exact checks and FNV-1a hashes,
//! echo connections with notifications and PACE, STATs, and hang-ups (mid-transfer
//! resets, CONN to a closed port, a client gone while its CONN connects). Hostile
//! clients run among them (issue 12): a client flooding blank lines, one flooding
//! HELPs faster than it reads the replies, a client with BLKS=1 MiB whose remote floods
//! it while neither reads, and churn of short NTFY connections closed at once (their
//! final notifications are not checked: the daemon may merge or drop those).
//!
//! Every `--interval` seconds (default 60) the workers pause, the daemon is let go
//! idle (STAT shows only the asker, and no notification for a second), and its RSS
//! (/proc/<pid>/status VmRSS) and descriptor count (/proc/<pid>/fd) are printed
//! beside the maxima seen under traffic.
//!
//! # Verdict
//! Exit 0 only if: the idle descriptor count was the same at every sample, the idle
//! RSS grew by at most 1 MiB from the first sample to the last (the first sample
//! follows a full interval of traffic, so warm-up allocations are behind it), every
//! transfer's bytes and hash matched at both ends, every notified transfer was
//! notified, no operation got an unexpected answer, the daemon never went away and it
//! stopped with exit 0 on SIGTERM.
//!
//! With no arguments (as `cargo test --all-targets` runs harness = false benches) it
//! says how to run it and exits 0.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod common;
use common::{Res, err, fd_count, proc_cpu, rss_kib};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
const SID: &str = "urn:soak-sockproxyd:serviceId:Soak1";
const MIB: u64 = 1024 * 1024;
/// Idle RSS may grow by this much over the run (allocator noise), no more.
const RSS_SLACK_KIB: u64 = 1024;

// ---------------------------------------------------------------------------
// Data: a reproducible byte stream per (transfer, direction), and FNV-1a

/// xorshift64 bytes from a seed, generated on the fly (no big buffers).
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn seed_up(id: u64) -> u64 {
    id.wrapping_mul(2).wrapping_add(1)
}

fn seed_down(id: u64) -> u64 {
    id.wrapping_mul(2).wrapping_add(2)
}

/// Writes `len` bytes of `Pattern::new(seed)`; with `abort_at`, only that many and
/// then an abortive close (RST) instead of a FIN.
fn send_pattern(s: &mut TcpStream, seed: u64, len: u64, abort_at: Option<u64>) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let stop = abort_at.unwrap_or(len).min(len);
    let mut sent = 0u64;
    while sent < stop {
        // The stream is generated in 8-byte steps: keep chunks a multiple of 8.
        let n = (stop - sent).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    match abort_at {
        Some(_) => abort(s),
        None => s.shutdown(Shutdown::Write),
    }
}

/// Makes the close of `s` (when every handle on it is dropped) send RST: SO_LINGER 0.
fn abort(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a local.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What arrived, checked against `Pattern::new(seed)` as it came.
struct Received {
    len: u64,
    /// Every byte so far equals the pattern.
    same: bool,
    hash: u64,
    want_hash: u64,
    /// The stream ended in an error (reset) rather than EOF.
    error: Option<String>,
}

/// Reads `s` to EOF (or error), comparing with the pattern and hashing both.
fn receive_pattern(s: &mut TcpStream, seed: u64) -> Received {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    // Pattern bytes made but not yet compared (the pattern comes in 8-byte steps).
    let mut pending: Vec<u8> = Vec::new();
    let (mut got, mut exp) = (Fnv::new(), Fnv::new());
    let mut r = Received {
        len: 0,
        same: true,
        hash: 0,
        want_hash: 0,
        error: None,
    };
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                r.error = Some(e.to_string());
                break;
            }
        };
        while pending.len() < n {
            let k = (n - pending.len()).div_ceil(8) * 8;
            let k = k.min(want.len());
            p.fill(&mut want[..k]);
            pending.extend_from_slice(&want[..k]);
        }
        let expected: Vec<u8> = pending.drain(..n).collect();
        if buf[..n] != expected[..] {
            r.same = false;
        }
        got.update(&buf[..n]);
        exp.update(&expected);
        r.len += n as u64;
    }
    r.hash = got.0;
    r.want_hash = exp.0;
    r
}

// ---------------------------------------------------------------------------
// /proc

// ---------------------------------------------------------------------------
// Counters

#[derive(Default)]
struct Stats {
    /// Hostile operations done (floods, huge BLKS, NTFY churn).
    hostile: AtomicU64,
    short: AtomicU64,
    transfers: AtomicU64,
    transfer_bytes: AtomicU64,
    echoes: AtomicU64,
    stats: AtomicU64,
    hangups: AtomicU64,
    /// Transfers their client abandoned half-way (RST).
    abandoned: AtomicU64,
    /// Every failure, with what it was.
    failures: Mutex<Vec<String>>,
    /// Transfers whose bytes or hash did not match (either end).
    mismatches: AtomicU64,
    /// Pids of finished notified connections, checked against the fake Luup at
    /// each pause.
    notified_pids: Mutex<Vec<String>>,
    missed_notifications: AtomicU64,
}

impl Stats {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().expect("lock");
        if f.len() < 50 {
            eprintln!("soak: FAILURE: {what}");
        }
        f.push(what);
    }

    fn failure_count(&self) -> usize {
        self.failures.lock().expect("lock").len()
    }
}

// ---------------------------------------------------------------------------
// Fake Luup: answers 200 to everything, counts requests by Pid

#[derive(Default)]
struct Luup {
    by_pid: Mutex<HashMap<String, u64>>,
    total: AtomicU64,
    active: AtomicUsize,
}

impl Luup {
    fn start() -> Res<(Arc<Luup>, SocketAddr)> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(err("luup bind"))?;
        let addr = l.local_addr().map_err(err("luup addr"))?;
        let luup = Arc::new(Luup::default());
        let me = Arc::clone(&luup);
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                me.active.fetch_add(1, Ordering::SeqCst);
                let me2 = Arc::clone(&me);
                thread::spawn(move || {
                    me2.serve(s);
                    me2.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok((luup, addr))
    }

    fn serve(&self, mut s: TcpStream) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head);
        let target = text.split(' ').nth(1).unwrap_or("");
        let pid = target
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("Pid="))
            .unwrap_or("")
            .to_string();
        *self.by_pid.lock().expect("lock").entry(pid).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        let body = "{ \"u:HandleReceiveResponse\": {} }";
        let _ = s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read(&mut buf);
    }

    fn count(&self, pid: &str) -> u64 {
        self.by_pid
            .lock()
            .expect("lock")
            .get(pid)
            .copied()
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Devices

/// Echoes every connection; passes EOF back.
fn echo_device() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(err("echo bind"))?;
    let addr = l.local_addr().map_err(err("echo addr"))?;
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let Ok(mut w) = s.try_clone() else { return };
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
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
    Ok(addr)
}

/// A device that sends on every connection as fast as it can and never reads; a
/// connection ends when a write fails (the daemon closed it).
fn flood_device() -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(err("flood device bind"))?;
    let addr = l.local_addr().map_err(err("flood device addr"))?;
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                let chunk = vec![0x5a; 64 * 1024];
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    Ok(addr)
}

/// The transfer device: each connection starts with a 24-byte header (id, length,
/// flags: bit 0 = the client will hang up mid-way); the device then sends its own
/// pattern for `id` and checks the client's, both `length` bytes.
fn transfer_device(stats: Arc<Stats>, busy: Arc<AtomicUsize>) -> Res<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(err("device bind"))?;
    let addr = l.local_addr().map_err(err("device addr"))?;
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            busy.fetch_add(1, Ordering::SeqCst);
            let (stats, busy) = (Arc::clone(&stats), Arc::clone(&busy));
            thread::spawn(move || {
                device_conn(&mut s, &stats);
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(addr)
}

fn device_conn(s: &mut TcpStream, stats: &Stats) {
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut h = [0u8; 24];
    if let Err(e) = s.read_exact(&mut h) {
        // A client that hung up right after CONN sends no header.
        if e.kind() != ErrorKind::UnexpectedEof && e.kind() != ErrorKind::ConnectionReset {
            stats.fail(format!("device: header: {e}"));
        }
        return;
    }
    let word = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let (id, len, hangup) = (word(0), word(1), word(2) & 1 == 1);
    let Ok(mut w) = s.try_clone() else {
        stats.fail(format!("transfer {id}: device clone"));
        return;
    };
    let writer = thread::spawn(move || send_pattern(&mut w, seed_down(id), len, None));
    let r = receive_pattern(s, seed_up(id));
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("panic")));
    if hangup {
        // Only a prefix is due, and it must be right.
        if !r.same {
            stats.mismatches.fetch_add(1, Ordering::SeqCst);
            stats.fail(format!(
                "transfer {id} (hang-up): the device got {} bytes that differ from what was sent",
                r.len
            ));
        }
        return;
    }
    if !r.same || r.len != len || r.hash != r.want_hash || r.error.is_some() {
        stats.mismatches.fetch_add(1, Ordering::SeqCst);
        stats.fail(format!(
            "transfer {id}: device got {} of {len} bytes, same {}, hash {:016x} want {:016x}, error {:?}",
            r.len, r.same, r.hash, r.want_hash, r.error
        ));
    }
    if let Err(e) = wrote {
        stats.fail(format!("transfer {id}: device write: {e}"));
    }
}

// ---------------------------------------------------------------------------
// The daemon

struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// WARN and ERROR lines (the first few kept).
    warnings: Arc<Mutex<Vec<String>>>,
    warning_count: Arc<AtomicU64>,
}

impl Daemon {
    fn start(bin: &PathBuf, luup: SocketAddr, log: &PathBuf) -> Res<Daemon> {
        let mut child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", "0", "-N"])
            .arg(format!("http://{luup}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(err(&format!("run {}", bin.display())))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut file = fs::File::create(log).map_err(err("daemon log file"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let warnings: Arc<Mutex<Vec<String>>> = Arc::default();
        let warning_count = Arc::new(AtomicU64::new(0));
        let (wl, wc) = (Arc::clone(&warnings), Arc::clone(&warning_count));
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("[WARN]") || line.contains("[ERROR]") {
                    wc.fetch_add(1, Ordering::SeqCst);
                    let mut w = wl.lock().expect("lock");
                    if w.len() < 20 {
                        w.push(line.clone());
                    }
                }
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(addr) = rest.strip_suffix(" (commands)")
                    && let Ok(addr) = addr.parse::<SocketAddr>()
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(addr) => Ok(Daemon {
                child,
                addr,
                warnings,
                warning_count,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("{} did not get ready", bin.display()))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A command-port connection with its greeting read.
fn open(d: SocketAddr) -> Res<(TcpStream, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&d, Duration::from_secs(5)).map_err(err("connect"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(err("timeout"))?;
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s.try_clone().map_err(err("clone"))?);
    let g = line(&mut r)?;
    if !g.starts_with("OK TOGGLEDBITS-SOCKPROXY 1 ") {
        return Err(format!("greeting {g:?}"));
    }
    Ok((s, r))
}

fn line(r: &mut BufReader<TcpStream>) -> Res<String> {
    let mut l = String::new();
    match r.read_line(&mut l) {
        Ok(0) => Err("EOF instead of a line".into()),
        Ok(_) => Ok(l.trim_end_matches('\n').to_string()),
        Err(e) => Err(format!("reading a line: {e}")),
    }
}

/// `STAT` on a fresh connection: the number of rows (connections). Returns after the
/// daemon has closed that connection (EOF after `OK QUIT`).
fn stat_rows(d: SocketAddr) -> Res<usize> {
    let (mut s, mut r) = open(d)?;
    s.write_all(b"STAT\nQUIT\n").map_err(err("STAT"))?;
    let mut rows = 0;
    let header = line(&mut r)?;
    if !header.contains("ID") {
        return Err(format!("STAT header {header:?}"));
    }
    loop {
        let l = line(&mut r)?;
        if l == "OK QUIT" {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).map_err(err("EOF after STAT"))?;
            return Ok(rows);
        }
        if !l.trim().is_empty() {
            rows += 1;
        }
    }
}

// ---------------------------------------------------------------------------
// Workers

/// Lets the coordinator stop the workers between operations.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, usize)>, // (paused, operations in progress)
    cv: Condvar,
    stop: AtomicBool,
}

impl Gate {
    /// Waits while paused; false once the run is over.
    fn enter(&self) -> bool {
        let mut st = self.state.lock().expect("lock");
        while st.0 && !self.stop.load(Ordering::SeqCst) {
            st = self.cv.wait(st).expect("lock");
        }
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        st.1 += 1;
        true
    }

    fn leave(&self) {
        let mut st = self.state.lock().expect("lock");
        st.1 -= 1;
        self.cv.notify_all();
    }

    /// Pauses and waits for operations in progress to finish.
    fn pause(&self) {
        let mut st = self.state.lock().expect("lock");
        st.0 = true;
        while st.1 > 0 {
            st = self.cv.wait(st).expect("lock");
        }
    }

    fn resume(&self) {
        self.state.lock().expect("lock").0 = false;
        self.cv.notify_all();
    }

    fn finish(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.pause();
        self.cv.notify_all();
    }
}

struct World {
    daemon: SocketAddr,
    echo: SocketAddr,
    device: SocketAddr,
    /// The flood device (`flood_device`).
    flood: SocketAddr,
    /// A port nothing listens on.
    closed: SocketAddr,
    stats: Arc<Stats>,
    next_id: AtomicU64,
}

/// A small deterministic random source per worker.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// One long transfer both ways through the daemon, optionally notified, optionally
/// abandoned by the client half-way (RST).
fn transfer(w: &World, rng: &mut Rng, hang_up: bool) -> Res<()> {
    let id = w.next_id.fetch_add(1, Ordering::SeqCst);
    let len = (1 + rng.below(8)) * MIB;
    let notify = rng.below(2) == 0;
    let pid = format!("x{id}");
    let (mut s, mut r) = open(w.daemon)?;
    let ntfy = if notify {
        format!(" NTFY=7/{SID}/HandleReceive/{pid}")
    } else {
        String::new()
    };
    let blks = [512, 2048, 16384, 65536][rng.below(4) as usize];
    s.write_all(format!("CONN {}{ntfy} BLKS={blks}\n", w.device).as_bytes())
        .map_err(err("CONN"))?;
    let reply = line(&mut r)?;
    if !reply.starts_with("OK CONN ") {
        return Err(format!("transfer {id}: CONN answered {reply:?}"));
    }
    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(&id.to_le_bytes());
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&u64::from(hang_up).to_le_bytes());
    s.write_all(&header).map_err(err("header"))?;
    if hang_up {
        // Send part of it, read a little, then vanish.
        let part = rng.below(len / 2).max(1);
        send_pattern(&mut s, seed_up(id), len, Some(part)).map_err(err("hang-up send"))?;
        w.stats.abandoned.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    let mut ws = s.try_clone().map_err(err("clone"))?;
    let _ = ws.set_write_timeout(Some(IO_TIMEOUT));
    let writer = thread::spawn(move || send_pattern(&mut ws, seed_up(id), len, None));
    // Whatever the BufReader already holds is nothing: the device speaks only after
    // the header, and the reply line was the last thing before it.
    let got = receive_pattern(&mut s, seed_down(id));
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("panic")));
    if !got.same || got.len != len || got.hash != got.want_hash || got.error.is_some() {
        w.stats.mismatches.fetch_add(1, Ordering::SeqCst);
        return Err(format!(
            "transfer {id}: client got {} of {len} bytes, same {}, hash {:016x} want {:016x}, error {:?}",
            got.len, got.same, got.hash, got.want_hash, got.error
        ));
    }
    wrote.map_err(err(&format!("transfer {id}: client write")))?;
    w.stats.transfers.fetch_add(1, Ordering::SeqCst);
    w.stats.transfer_bytes.fetch_add(2 * len, Ordering::SeqCst);
    if notify {
        w.stats.notified_pids.lock().expect("lock").push(pid);
    }
    Ok(())
}

/// A short connection: QUIT, CAPA then QUIT, BILD, or a hang-up without QUIT.
fn short(w: &World, rng: &mut Rng) -> Res<()> {
    let (mut s, mut r) = open(w.daemon)?;
    match rng.below(4) {
        0 => {
            s.write_all(b"QUIT\n").map_err(err("QUIT"))?;
            expect(&mut r, "OK QUIT")?;
        }
        1 => {
            s.write_all(b"CAPA\nQUIT\n").map_err(err("CAPA"))?;
            let l = line(&mut r)?;
            if !l.starts_with("OK CAPA ") {
                return Err(format!("CAPA answered {l:?}"));
            }
            expect(&mut r, "OK QUIT")?;
        }
        2 => {
            s.write_all(b"BILD\n").map_err(err("BILD"))?;
            let l = line(&mut r)?;
            if !l.starts_with("OK ") {
                return Err(format!("BILD answered {l:?}"));
            }
        }
        _ => {} // the health check's habit: greeting, then hang up
    }
    w.stats.short.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn expect(r: &mut BufReader<TcpStream>, want: &str) -> Res<()> {
    let l = line(r)?;
    if l == want {
        Ok(())
    } else {
        Err(format!("expected {want:?}, got {l:?}"))
    }
}

/// An echo connection with notifications (and sometimes PACE): a few messages there
/// and back, then a clean close.
fn echo(w: &World, rng: &mut Rng) -> Res<()> {
    let id = w.next_id.fetch_add(1, Ordering::SeqCst);
    let pid = format!("e{id}");
    let pace = if rng.below(2) == 0 { " PACE=0.2" } else { "" };
    let (mut s, mut r) = open(w.daemon)?;
    s.write_all(format!("CONN {} NTFY=8/{SID}/HandleReceive/{pid}{pace}\n", w.echo).as_bytes())
        .map_err(err("CONN"))?;
    let reply = line(&mut r)?;
    if !reply.starts_with("OK CONN ") {
        return Err(format!("echo CONN answered {reply:?}"));
    }
    for k in 0..(1 + rng.below(10)) {
        let msg = format!("message {k} of {pid}\n");
        s.write_all(msg.as_bytes()).map_err(err("echo send"))?;
        let back = line(&mut r)?;
        if back != msg.trim_end() {
            return Err(format!("echo {pid}: sent {msg:?}, got {back:?}"));
        }
    }
    s.shutdown(Shutdown::Write).map_err(err("shutdown"))?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).map_err(err("echo EOF"))?;
    if !rest.is_empty() {
        return Err(format!("echo {pid}: {} extra bytes", rest.len()));
    }
    w.stats.echoes.fetch_add(1, Ordering::SeqCst);
    w.stats.notified_pids.lock().expect("lock").push(pid);
    Ok(())
}

/// Hang-ups of other kinds: CONN to a closed port (ERR CONN), and a client that
/// leaves right after sending CONN.
fn hangup(w: &World, rng: &mut Rng) -> Res<()> {
    let (mut s, mut r) = open(w.daemon)?;
    if rng.below(2) == 0 {
        s.write_all(format!("CONN {}\n", w.closed).as_bytes())
            .map_err(err("CONN"))?;
        let l = line(&mut r)?;
        if !l.starts_with("ERR CONN ") {
            return Err(format!("CONN to a closed port answered {l:?}"));
        }
    } else {
        s.write_all(format!("CONN {}\n", w.echo).as_bytes())
            .map_err(err("CONN"))?;
        abort(&s).map_err(err("abort"))?;
    }
    w.stats.hangups.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Writes `chunk` to `s` over and over for `secs`, never reading; writes that block
/// (the daemon stopped reading) are retried until the time is up. Bytes written.
fn flood_for(s: &mut TcpStream, chunk: &[u8], secs: f64) -> Res<u64> {
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .map_err(err("write timeout"))?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        match s.write(chunk) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("flood write after {sent} bytes: {e}")),
        }
    }
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(err("write timeout"))?;
    Ok(sent)
}

/// Blank lines as fast as it can for 2 s (no reply is due), then QUIT: the daemon
/// must have read every one to answer it.
fn blank_flood(w: &World) -> Res<()> {
    let (mut s, mut r) = open(w.daemon)?;
    let sent = flood_for(&mut s, &[b'\n'; 64 * 1024], 2.0)?;
    // A write cut short by its timeout may have left a part of a chunk: all newlines.
    s.write_all(b"QUIT\n")
        .map_err(err("QUIT after the flood"))?;
    expect(&mut r, "OK QUIT").map_err(|e| format!("blank-line flood of {sent} bytes: {e}"))?;
    w.stats.hostile.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// 2,000 HELPs in one write (1.4 MB of replies, far over the daemon's reply
/// high-water mark), read back more slowly than they come, then the end of input:
/// every HELP is answered, then EOF.
fn help_flood(w: &World) -> Res<()> {
    const HELPS: u64 = 2000;
    let (mut s, r) = open(w.daemon)?;
    let reader = thread::spawn(move || -> Res<u64> {
        let mut r = r;
        let mut n = 0u64;
        loop {
            // A slow reader: the daemon's reply queue reaches its high-water mark.
            thread::sleep(Duration::from_millis(1));
            let mut l = String::new();
            for _ in 0..100 {
                l.clear();
                match r.read_line(&mut l) {
                    Ok(0) => return Ok(n),
                    Ok(_) if l == "OK HELP\n" => n += 1,
                    Ok(_) if l.starts_with("ERR") => return Err(format!("HELP flood: {l:?}")),
                    Ok(_) => {}
                    Err(e) => return Err(format!("HELP flood: reading replies: {e}")),
                }
            }
        }
    });
    s.write_all(&b"HELP\n".repeat(HELPS as usize))
        .map_err(err("HELP flood"))?;
    s.shutdown(Shutdown::Write).map_err(err("shutdown"))?;
    let helps = HELPS;
    let answered = reader
        .join()
        .map_err(|_| "HELP flood: reader panicked".to_string())??;
    if answered != helps {
        return Err(format!(
            "HELP flood: {helps} HELPs sent, {answered} answered"
        ));
    }
    w.stats.hostile.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// CONN BLKS=1048576 to the flood device; the client floods too and neither reads,
/// for 2 s; then the client resets the connection.
fn huge_blks(w: &World) -> Res<()> {
    let (mut s, mut r) = open(w.daemon)?;
    s.write_all(format!("CONN {} BLKS=1048576\n", w.flood).as_bytes())
        .map_err(err("CONN"))?;
    let reply = line(&mut r)?;
    if !reply.starts_with("OK CONN ") {
        return Err(format!("huge BLKS CONN answered {reply:?}"));
    }
    flood_for(&mut s, &[0xa5; 64 * 1024], 2.0)?;
    abort(&s).map_err(err("abort"))?;
    w.stats.hostile.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Ten short NTFY connections closed at once: final notifications by the dozen.
fn ntfy_churn(w: &World) -> Res<()> {
    for _ in 0..10 {
        let id = w.next_id.fetch_add(1, Ordering::SeqCst);
        let (mut s, mut r) = open(w.daemon)?;
        s.write_all(format!("CONN {} NTFY=9/{SID}/HandleReceive/c{id}\n", w.echo).as_bytes())
            .map_err(err("CONN"))?;
        let reply = line(&mut r)?;
        if !reply.starts_with("OK CONN ") {
            return Err(format!("churn CONN answered {reply:?}"));
        }
    }
    w.stats.hostile.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Transfer,
    Short,
    Echo,
    Stat,
    Hangup,
    BlankFlood,
    HelpFlood,
    HugeBlks,
    NtfyChurn,
}

fn worker(w: Arc<World>, gate: Arc<Gate>, kind: Kind, seed: u64) {
    let mut rng = Rng(seed | 1);
    while gate.enter() {
        let res = match kind {
            Kind::Transfer => {
                let hang = rng.below(5) == 0;
                transfer(&w, &mut rng, hang)
            }
            Kind::Short => short(&w, &mut rng),
            Kind::Echo => echo(&w, &mut rng),
            Kind::Stat => stat_rows(w.daemon).map(|_| {
                w.stats.stats.fetch_add(1, Ordering::SeqCst);
            }),
            Kind::Hangup => hangup(&w, &mut rng),
            Kind::BlankFlood => blank_flood(&w),
            Kind::HelpFlood => help_flood(&w),
            Kind::HugeBlks => huge_blks(&w),
            Kind::NtfyChurn => ntfy_churn(&w),
        };
        if let Err(e) = res {
            w.stats.fail(e);
        }
        gate.leave();
        // The pace of each kind of client (not a wait for a result).
        let pause = match kind {
            Kind::Transfer => 50,
            Kind::Short => 5,
            Kind::Echo => 20,
            Kind::Stat => 1000,
            Kind::Hangup => 100,
            Kind::BlankFlood | Kind::HelpFlood | Kind::HugeBlks => 1000,
            Kind::NtfyChurn => 50,
        };
        thread::sleep(Duration::from_millis(pause));
    }
}

// ---------------------------------------------------------------------------
// The run

struct Sample {
    minute: f64,
    rss_idle: u64,
    fds_idle: u64,
    rss_max: u64,
    fds_max: u64,
    cpu: f64,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench soak -- [--minutes N] [--interval SECONDS] [--bin PATH]\n\
         (make soak MINUTES=N)"
    );
    std::process::exit(2);
}

fn main() {
    if std::env::args().len() == 1 {
        println!("soak: not run (use `make soak` or `cargo bench --bench soak`)");
        return;
    }
    let mut minutes = 30.0f64;
    let mut interval = 60.0f64;
    let mut bin = std::env::var_os("SOCKPROXYD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sockproxyd")));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || -> f64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &f64| v > 0.0)
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--minutes" => minutes = num(),
            "--interval" => interval = num(),
            "--bin" => bin = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--bench" => {} // cargo bench passes it to harness = false targets
            _ => usage(),
        }
    }
    match run(&bin, minutes, interval) {
        Ok(true) => println!("soak: PASSED"),
        Ok(false) => {
            println!("soak: FAILED");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("soak: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn run(bin: &PathBuf, minutes: f64, interval: f64) -> Res<bool> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    fs::create_dir_all(&dir).map_err(err("target/soak"))?;
    let log = dir.join("daemon.log");
    let stats = Arc::new(Stats::default());
    let device_busy = Arc::new(AtomicUsize::new(0));
    let (luup, luup_addr) = Luup::start()?;
    let echo = echo_device()?;
    let device = transfer_device(Arc::clone(&stats), Arc::clone(&device_busy))?;
    let flood = flood_device()?;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
        l.local_addr().map_err(err("addr"))?
    };
    let mut d = Daemon::start(bin, luup_addr, &log)?;
    let pid = d.pid();
    println!(
        "soak: {} (pid {pid}) on {} for {minutes} min, a sample every {interval} s; daemon log in {}",
        bin.display(),
        d.addr,
        log.display()
    );
    let world = Arc::new(World {
        daemon: d.addr,
        echo,
        device,
        flood,
        closed,
        stats: Arc::clone(&stats),
        next_id: AtomicU64::new(1),
    });
    let gate = Arc::new(Gate::default());
    let kinds = [
        Kind::Transfer,
        Kind::Transfer,
        Kind::Transfer,
        Kind::Short,
        Kind::Short,
        Kind::Echo,
        Kind::Echo,
        Kind::Stat,
        Kind::Hangup,
        Kind::BlankFlood,
        Kind::HelpFlood,
        Kind::HugeBlks,
        Kind::NtfyChurn,
    ];
    let workers: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let (w, g) = (Arc::clone(&world), Arc::clone(&gate));
            thread::spawn(move || worker(w, g, k, 0x5eed + i as u64 * 7919))
        })
        .collect();

    // Peaks under traffic, sampled every second by their own thread.
    let peaks = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampling = Arc::new(AtomicBool::new(true));
    {
        let (peaks, sampling) = (Arc::clone(&peaks), Arc::clone(&sampling));
        thread::spawn(move || {
            while sampling.load(Ordering::SeqCst) {
                if let (Some(r), Some(f)) = (rss_kib(pid), fd_count(pid)) {
                    peaks.0.fetch_max(r, Ordering::SeqCst);
                    peaks.1.fetch_max(f, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_secs(1));
            }
        });
    }

    println!(
        "\n{:>6} {:>10} {:>10} {:>6} {:>6} {:>8} {:>7} {:>9} {:>7} {:>6} {:>6} {:>7} {:>8} {:>7} {:>5}",
        "minute",
        "RSS idle",
        "RSS peak",
        "fds",
        "peak",
        "CPU s",
        "xfers",
        "MiB",
        "short",
        "echo",
        "STAT",
        "hangup",
        "notified",
        "hostile",
        "fail"
    );
    let start = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut alive = true;
    let mut next = Duration::from_secs_f64(interval.min(minutes * 60.0));
    loop {
        // Not a wait for a result: the run is as long as asked.
        while start.elapsed() < next && alive {
            thread::sleep(Duration::from_millis(200));
            alive = d.alive();
        }
        if !alive {
            stats.fail("the daemon went away".into());
            break;
        }
        gate.pause();
        let s = idle_sample(&world, &luup, &device_busy, pid, &peaks, start)?;
        check_notifications(&stats, &luup);
        print_row(&s, &stats, &luup);
        samples.push(s);
        if start.elapsed() + Duration::from_secs(1) >= total {
            break;
        }
        next = (next + Duration::from_secs_f64(interval)).min(total);
        gate.resume();
    }
    gate.finish();
    for w in workers {
        let _ = w.join();
    }
    sampling.store(false, Ordering::SeqCst);

    // SIGTERM: a graceful stop, exit 0.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        match d.child.try_wait() {
            Ok(Some(st)) => break st.code(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = d.child.kill();
                let _ = d.child.wait();
                break None;
            }
        }
    };
    Ok(verdict(&samples, &stats, &d, alive, code))
}

/// Waits for the daemon to be idle, then samples it; resets the peaks.
///
/// Idle means STAT lists only the asker, no device connection is open, and no
/// notification has reached Luup or been in progress for a second: final
/// notifications go out after their connection has left STAT (PACE holds them up to
/// 0.2 s here), and a notifier's socket counts among the daemon's descriptors.
fn idle_sample(
    w: &World,
    luup: &Luup,
    device_busy: &AtomicUsize,
    pid: u32,
    peaks: &(AtomicU64, AtomicU64),
    start: Instant,
) -> Res<Sample> {
    const QUIET: Duration = Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since: Option<(Instant, u64)> = None;
    loop {
        let rows = stat_rows(w.daemon)?;
        let idle = rows == 1
            && device_busy.load(Ordering::SeqCst) == 0
            && luup.active.load(Ordering::SeqCst) == 0;
        // Luup's request count while idle; quiet once it holds for QUIET.
        let notified = idle.then(|| luup.total.load(Ordering::SeqCst));
        match quiet_since {
            Some((t, n)) if notified == Some(n) => {
                if t.elapsed() >= QUIET {
                    break;
                }
            }
            _ => quiet_since = notified.map(|n| (Instant::now(), n)),
        }
        if Instant::now() >= deadline {
            w.stats.fail(format!(
                "not idle 30 s after pausing: {rows} STAT rows, {} device connections",
                device_busy.load(Ordering::SeqCst)
            ));
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(Sample {
        minute: start.elapsed().as_secs_f64() / 60.0,
        rss_idle: rss_kib(pid).ok_or("no RSS")?,
        fds_idle: fd_count(pid).ok_or("no fd count")?,
        rss_max: peaks.0.swap(0, Ordering::SeqCst),
        fds_max: peaks.1.swap(0, Ordering::SeqCst),
        cpu: proc_cpu(pid).unwrap_or(f64::NAN),
    })
}

/// Every finished notified connection must have had at least one notification
/// (the final one, if nothing else). Checked when idle; the last final notifications
/// may still be queued in the daemon's notifier, so they get 10 s.
fn check_notifications(stats: &Stats, luup: &Luup) {
    let pids: Vec<String> = std::mem::take(&mut *stats.notified_pids.lock().expect("lock"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && pids.iter().any(|p| luup.count(p) == 0) {
        thread::sleep(Duration::from_millis(50));
    }
    for p in pids {
        if luup.count(&p) == 0 {
            stats.missed_notifications.fetch_add(1, Ordering::SeqCst);
            stats.fail(format!("no notification for {p}"));
        }
    }
}

fn print_row(s: &Sample, st: &Stats, luup: &Luup) {
    println!(
        "{:>6.1} {:>6} KiB {:>6} KiB {:>6} {:>6} {:>8.1} {:>7} {:>9} {:>7} {:>6} {:>6} {:>7} {:>8} {:>7} {:>5}",
        s.minute,
        s.rss_idle,
        s.rss_max,
        s.fds_idle,
        s.fds_max,
        s.cpu,
        st.transfers.load(Ordering::SeqCst),
        st.transfer_bytes.load(Ordering::SeqCst) / MIB,
        st.short.load(Ordering::SeqCst),
        st.echoes.load(Ordering::SeqCst),
        st.stats.load(Ordering::SeqCst),
        st.hangups.load(Ordering::SeqCst) + st.abandoned.load(Ordering::SeqCst),
        luup.total.load(Ordering::SeqCst),
        st.hostile.load(Ordering::SeqCst),
        st.failure_count()
    );
}

fn verdict(samples: &[Sample], stats: &Stats, d: &Daemon, alive: bool, code: Option<i32>) -> bool {
    println!();
    let mut ok = alive;
    if samples.len() < 2 {
        println!("- fewer than 2 samples: run longer than one interval to judge flatness");
        ok = false;
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let fds_flat = samples.iter().all(|s| s.fds_idle == first.fds_idle);
        let rss_max = samples.iter().map(|s| s.rss_idle).max().unwrap_or(0);
        let rss_flat = rss_max <= first.rss_idle + RSS_SLACK_KIB;
        if fds_flat {
            println!(
                "- descriptors when idle: {} at every sample: flat",
                first.fds_idle
            );
        } else {
            println!(
                "- descriptors when idle: {} at the first sample, not at every one: NOT FLAT",
                first.fds_idle
            );
            let series: Vec<String> = samples.iter().map(|s| s.fds_idle.to_string()).collect();
            println!("  series: {}", series.join(" "));
        }
        println!(
            "- RSS when idle: {} KiB first, {} KiB last, {} KiB highest (allowed: +{RSS_SLACK_KIB} KiB): {}",
            first.rss_idle,
            last.rss_idle,
            rss_max,
            if rss_flat { "flat" } else { "NOT FLAT" }
        );
        ok &= fds_flat && rss_flat;
    }
    let mism = stats.mismatches.load(Ordering::SeqCst);
    println!(
        "- transfers: {} complete ({} MiB both ways), {} abandoned by their client; bytes or hash mismatches: {mism}",
        stats.transfers.load(Ordering::SeqCst),
        stats.transfer_bytes.load(Ordering::SeqCst) / MIB,
        stats.abandoned.load(Ordering::SeqCst),
    );
    println!(
        "- hostile operations (blank-line and HELP floods, BLKS=1 MiB floods, NTFY churn): {}",
        stats.hostile.load(Ordering::SeqCst)
    );
    let missed = stats.missed_notifications.load(Ordering::SeqCst);
    println!("- notified connections without any notification: {missed}");
    let fails = stats.failure_count();
    println!("- failed operations: {fails}");
    for f in stats.failures.lock().expect("lock").iter().take(10) {
        println!("    {f}");
    }
    let warns = d.warning_count.load(Ordering::SeqCst);
    println!("- WARN/ERROR lines in the daemon's log: {warns}");
    for l in d.warnings.lock().expect("lock").iter().take(5) {
        println!("    {l}");
    }
    println!(
        "- daemon {} the run; exit status after SIGTERM: {}",
        if alive { "survived" } else { "DIED during" },
        code.map_or("none (killed)".into(), |c| c.to_string())
    );
    ok && mism == 0 && missed == 0 && fails == 0 && code == Some(0)
}
