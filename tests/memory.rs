//! The memory budget (issue 12; PROTOCOL.md "Limits and access control": `max_mem`):
//! hostile connections with huge buffers cannot make the daemon hold more than the
//! budget, nothing is dropped to stay within it, and other clients keep working.

use crate::util::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: usize = 1024 * 1024;

/// Connection `i`'s stream: a 251-byte cycle starting at `i` (a prime, so a lost,
/// repeated or reordered piece shows), cheap to make and to check in a debug build.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k + i) % 251) as u8).collect()
}

/// `n` lines read one byte at a time.
fn lines_bytewise(s: &mut std::net::TcpStream, n: usize) -> Vec<String> {
    s.set_read_timeout(Some(dur(10_000))).expect("timeout");
    let mut lines = Vec::new();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while lines.len() < n {
        assert_eq!(
            s.read(&mut byte).expect("read a reply"),
            1,
            "EOF in a reply"
        );
        if byte[0] == b'\n' {
            lines.push(String::from_utf8_lossy(&line).into_owned());
            line.clear();
        } else {
            line.push(byte[0]);
        }
    }
    lines
}

/// A small send buffer, so a flooding remote blocks in its own kernel rather than ours.
fn small_sndbuf(s: &std::net::TcpStream) {
    let size: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt on a socket we own, with a pointer to a local int.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_SNDBUF");
}

#[test]
fn huge_buffers_stay_within_max_mem_and_lose_nothing() {
    // 200 clients `CONN ... BLKS=1048576` to remotes that flood and never read, the
    // clients not reading either: the release binary at 10703a5 grew ~1 MiB per
    // connection. With max_mem=4M the growth stays within the budget and a margin; a
    // fresh client still gets its greeting, CONN and echo; and once the clients read,
    // every byte arrives, in order.
    // Under an emulator (qemu) everything is ~20 times slower: fewer clients there.
    let clients_n: usize = if runner_line().is_empty() { 200 } else { 40 };
    // More than the kernel's buffers on the way (up to 4 MiB of the daemon's send
    // buffer toward each client) and ours: the remotes block on us.
    const STREAM: usize = 6 * MIB;
    const MAX_MEM: u64 = 4 * 1024 * KIB;
    let luup = FakeLuup::start();
    let (args, _f) = args_with_ini(&luup.url(), "mem.ini", "[host]\nmax_mem=4M\n");
    let d = Daemon::start_args(&args);
    let dev = Device::listen();
    let echo = EchoDevice::start();
    // Warm up, then the baseline.
    {
        let (mut c, _) = d.client();
        conn_ok(&mut c, &format!("CONN {}", echo.target()));
        c.send(b"warm");
        assert_eq!(c.read_n(4, dur(5_000)), b"warm");
    }
    let before = d.rss_kib();
    let t0 = std::time::Instant::now();

    let mut clients = Vec::new();
    let mut writers = Vec::new();
    for i in 0..clients_n {
        let mut c = connect_small_rcvbuf(d.addr, 4096);
        c.write_all(format!("CONN {} BLKS=1048576\n", dev.target()).as_bytes())
            .expect("send CONN");
        // The greeting and OK CONN, a byte at a time: nothing of the stream is taken.
        let lines = lines_bytewise(&mut c, 2);
        assert!(lines[1].starts_with("OK CONN "), "{lines:?}");
        let r = dev.accept();
        small_sndbuf(&r);
        writers.push(thread::spawn(move || {
            let mut r = r;
            // A whole number of cycles per piece, so the pieces join up.
            let piece = pattern(i, 251 * 4096);
            let mut left = STREAM;
            while left > 0 {
                let n = left.min(piece.len());
                r.write_all(&piece[..n])
                    .map_err(|e| format!("remote {i}: {e}"))?;
                left -= n;
            }
            r.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("remote {i}: {e}"))
        }));
        clients.push(c);
    }
    eprintln!("set up in {:?}", t0.elapsed());
    // Let every connection fill what it may, then take the peak over a second.
    let spent = |l: &str| l.contains("memory budget spent");
    let deadline = std::time::Instant::now() + dur(30_000);
    while d.log_count(spent) == 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("budget spent at {:?}", t0.elapsed());
    thread::sleep(dur(1_000));
    let mut peak = 0;
    for _ in 0..10 {
        peak = peak.max(d.rss_kib());
        thread::sleep(Duration::from_millis(100));
    }
    let grew = peak.saturating_sub(before);
    eprintln!("RSS {before} KiB -> peak {peak} KiB (+{grew} KiB) with max_mem=4M");
    // The budget, plus the guaranteed small buffers and the per-connection state of
    // 200 connections (~16 KiB each, counting the allocator's own overhead).
    let margin = clients_n as u64 * 16 * KIB;
    assert!(
        grew * KIB <= MAX_MEM + margin,
        "RSS grew {grew} KiB, more than max_mem ({} KiB) and a {} KiB margin",
        MAX_MEM / KIB,
        margin / KIB
    );
    // One line per episode (a budget that frees to 3/4 and fills again starts another):
    // logged, and not once per refused buffer.
    let episodes = d.log_count(spent);
    assert!(
        (1..=20).contains(&episodes),
        "{episodes} 'memory budget spent' lines"
    );

    // Meanwhile a fresh client is greeted, connects and echoes.
    let (mut c, _) = d.client();
    conn_ok(&mut c, &format!("CONN {}", echo.target()));
    let data = payload(64 * 1024, 7);
    c.send(&data);
    assert_eq!(fnv1a(&c.read_n(data.len(), dur(10_000))), fnv1a(&data));

    eprintln!("echo checked at {:?}", t0.elapsed());
    // The clients read: every byte, in order.
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                let mut got = Vec::with_capacity(STREAM);
                c.set_read_timeout(Some(dur(120_000))).expect("timeout");
                c.read_to_end(&mut got).expect("read to the end");
                let piece = pattern(i, 251 * 4096);
                let same =
                    got.len() == STREAM && got.chunks(piece.len()).all(|c| c == &piece[..c.len()]);
                (i, got.len(), same)
            })
        })
        .collect();
    for r in readers {
        let (i, len, same) = r.join().expect("reader thread");
        assert!(
            len == STREAM && same,
            "client {i}: {len} bytes, same: {same}"
        );
    }
    eprintln!("all read at {:?}", t0.elapsed());
    for w in writers {
        w.join().expect("writer thread").expect("remote write");
    }
}
