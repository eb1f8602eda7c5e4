#!/usr/bin/env python3
"""Core metrics of sockproxyd, measured on loopback (Python 3.11, stdlib only).

    python3 benches/core_metrics.py [--bin target/release/sockproxyd]

Starts the daemon (`-a 127.0.0.1 -p 0 -N http://127.0.0.1:<fake Luup>`),
with a fake Luup HTTP endpoint and fake devices in this process, and measures:

1. Notification latency: device send() -> the fake Luup's accept() plus the
   first bytes of the GET (one message at a time; the client reads each
   message, the device waits for each notification). For a baseline, the raw
   device -> client forwarding latency through the proxy (a connection
   without NTFY) and over a direct loopback socket pair.
2. Idle wake-ups: voluntary + nonvoluntary context switches, summed over all
   the daemon's threads, across 10 s with one idle echo connection.
3. Memory: VmRSS at startup, then with 1,000 simultaneous echo connections,
   then after they have all closed.

Then STOP, and the daemon must exit 0. Prints a report and, last, a one-line
JSON summary. Exit status: 0 on success, 1 if anything broke (the reason is
printed on stderr), 2 on bad usage. Percentiles are nearest-rank.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import queue
import re
import resource
import selectors
import signal
import socket
import subprocess
import traceback
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "target" / "release" / "sockproxyd"

HOST = "127.0.0.1"
IO_TIMEOUT = 5.0  # any single socket operation
NOTIFY_TIMEOUT = 5.0  # waiting for one notification
GLOBAL_TIMEOUT = 120  # the whole run, a last resort (normal runs take ~15 s)

WARMUP = 5
SAMPLES = 100
IDLE_SECONDS = 10.0
IDLE_TARGET = 5
N_CONNS = 1000
RT_SAMPLE_EVERY = 40  # round-trip a byte on every 40th connection (+ the last)

LAT_DEV = 101  # NTFY device of the latency connection
IDLE_DEV = 102  # NTFY device of the idle connection
SID = "urn:bench-sockproxyd:serviceId:Bench1"
ACTION = "HandleReceive"

LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(commands\)")
DEVNUM_RE = re.compile(r"[?&]DeviceNum=(-?\d+)")


class BenchError(Exception):
    pass


def now() -> float:
    return time.perf_counter()


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(1, math.ceil(p / 100.0 * len(s)))
    return s[k - 1]


def ms(x: float) -> float:
    return round(x * 1000.0, 3)


def nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int, timeout: float = IO_TIMEOUT) -> bytes:
    deadline = now() + timeout
    buf = bytearray()
    while len(buf) < n:
        left = deadline - now()
        if left <= 0:
            raise BenchError(f"timed out reading {n} bytes (got {bytes(buf)!r})")
        s.settimeout(left)
        try:
            chunk = s.recv(n - len(buf))
        except socket.timeout:
            raise BenchError(f"timed out reading {n} bytes (got {bytes(buf)!r})") from None
        if not chunk:
            raise BenchError(f"connection closed after {len(buf)} of {n} bytes: {bytes(buf)!r}")
        buf += chunk
    return bytes(buf)


class LineSock:
    """A client socket to the daemon, read line by line."""

    def __init__(self, port: int):
        try:
            self.sock = nodelay(socket.create_connection((HOST, port), timeout=IO_TIMEOUT))
        except OSError as e:
            raise BenchError(f"cannot connect to the daemon on port {port}: {e}") from None
        self.buf = b""

    def readline(self, timeout: float = IO_TIMEOUT) -> str:
        deadline = now() + timeout
        while b"\n" not in self.buf:
            left = deadline - now()
            if left <= 0:
                raise BenchError(f"timed out waiting for a line from the daemon (have {self.buf!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError as e:
                raise BenchError(f"reading from the daemon: {e} (have {self.buf!r})") from None
            if not chunk:
                raise BenchError(f"the daemon closed the connection (have {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("latin-1").rstrip("\r")

    def send(self, data: bytes) -> None:
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.sendall(data)

    def greeting(self) -> str:
        line = self.readline()
        parts = line.split()
        if len(parts) != 4 or parts[:3] != ["OK", "TOGGLEDBITS-SOCKPROXY", "1"]:
            raise BenchError(f"unexpected greeting {line!r}")
        return parts[3]

    def conn(self, target: str, opts: str = "") -> str:
        """Greeting, CONN, `OK CONN <id>`: returns the id."""
        gid = self.greeting()
        self.send(f"CONN {target}{' ' + opts if opts else ''}\n".encode())
        line = self.readline()
        if not line.startswith("OK CONN "):
            raise BenchError(f"CONN {target} {opts}: got {line!r}")
        if self.buf:
            raise BenchError(f"unexpected bytes after OK CONN: {self.buf!r}")
        return gid

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- fake Luup


class FakeLuup:
    """Answers every GET with 200 and an empty body; queues what it saw."""

    def __init__(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, 0))
        self.lsock.listen(1024)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.events: queue.Queue[dict] = queue.Queue()
        self.bad: list[str] = []
        self.total = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="fake-luup", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t_accept = now()
            try:
                self.serve(c, t_accept)
            except Exception as e:  # noqa: BLE001 - keep serving
                self.bad.append(f"serving a notification: {e}")
            finally:
                c.close()

    def serve(self, c: socket.socket, t_accept: float) -> None:
        c.settimeout(IO_TIMEOUT)
        data = c.recv(65536)
        t_first = now()
        while data and b"\r\n\r\n" not in data and len(data) < 65536:
            more = c.recv(65536)
            if not more:
                break
            data += more
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        lines = head.split("\r\n")
        request = lines[0] if lines else ""
        headers = {}
        for h in lines[1:]:
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.total += 1
        parts = request.split(" ")
        path = parts[1] if len(parts) == 3 else ""
        m = DEVNUM_RE.search(path)
        if not (request.startswith("GET /data_request?id=action&") and m):
            self.bad.append(f"unexpected request {request!r}")
        if headers.get("user-agent") != "sockproxyd-1" or headers.get("connection", "").lower() != "close":
            self.bad.append(f"unexpected headers {headers!r}")
        self.events.put(
            {
                "t_accept": t_accept,
                "t_first": t_first,
                "dev": int(m.group(1)) if m else None,
                "path": path,
            }
        )

    def wait(self, dev: int, timeout: float = NOTIFY_TIMEOUT) -> tuple[dict, int]:
        """The next notification for `dev`; also how many others were skipped."""
        deadline = now() + timeout
        skipped = 0
        while True:
            left = deadline - now()
            if left <= 0:
                raise BenchError(f"no notification for device {dev} within {timeout} s")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["dev"] == dev:
                return ev, skipped
            skipped += 1

    def drain(self, settle: float = 0.0) -> list[dict]:
        if settle:
            time.sleep(settle)
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.lsock.close()


# ------------------------------------------------------------- echo device


class EchoDevice:
    """A fake device that accepts any number of connections, holds them and
    echoes whatever it receives; closes its side at end-of-stream."""

    def __init__(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((HOST, 0))
        self.lsock.listen(2048)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.open = 0
        self.accepted = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="echo-device", daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return self.open

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for key, _ in self.sel.select(timeout=0.2):
                    if key.data is None:
                        self.accept()
                    else:
                        self.echo(key.fileobj)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.errors.append(f"echo device: {e!r}")

    def accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except BlockingIOError:
                return
            nodelay(c)
            c.setblocking(False)
            self.sel.register(c, selectors.EVENT_READ, "conn")
            with self.lock:
                self.open += 1
                self.accepted += 1

    def echo(self, c: socket.socket) -> None:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                c.setblocking(True)
                c.settimeout(IO_TIMEOUT)
                c.sendall(data)
            except OSError as e:
                self.errors.append(f"echo device send: {e}")
            finally:
                c.setblocking(False)
            return
        self.sel.unregister(c)
        c.close()
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


# ------------------------------------------------------------------ daemon


class Daemon:
    def __init__(self, binary: Path, luup_port: int):
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise BenchError(f"no executable daemon at {binary} (build it with `cargo build --release`, or pass --bin)")
        self.binary = binary
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.notable: list[str] = []  # WARN / ERROR lines
        self.port: int | None = None
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [str(binary), "-a", HOST, "-p", "0", "-N", f"http://{HOST}:{luup_port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self.drain, name="daemon-stderr", daemon=True)
        self.reader.start()
        if not self.ready.wait(IO_TIMEOUT) or self.port is None:
            rc = self.proc.poll()
            tail = "\n  ".join(list(self.log)[-10:]) or "(nothing)"
            raise BenchError(
                f"the daemon did not report `listening on ... (commands)` within {IO_TIMEOUT} s"
                f" (exit status {rc}); its stderr:\n  {tail}"
            )

    def drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            if "[WARN]" in line or "[ERROR]" in line:
                self.notable.append(line)
            if self.port is None:
                m = LISTEN_RE.search(line)
                if m:
                    self.port = int(m.group(1))
                    self.ready.set()
        self.ready.set()

    def alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            tail = "\n  ".join(list(self.log)[-10:])
            raise BenchError(f"the daemon exited unexpectedly with status {rc}; last log lines:\n  {tail}")

    def status(self, field: str) -> int:
        """A `kB` or count field of /proc/<pid>/status."""
        self.alive()
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise BenchError(f"no {field} in /proc/{self.pid}/status")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def ctxt(self) -> dict[str, int]:
        """Per thread (`tid comm`): voluntary + nonvoluntary switches."""
        self.alive()
        out = {}
        base = f"/proc/{self.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/comm") as f:
                    comm = f.read().strip()
                total = 0
                with open(f"{base}/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
            except FileNotFoundError:
                continue  # the thread just ended
            out[f"{tid} {comm}"] = total
        return out

    def stop(self) -> int:
        """STOP on a command connection; the exit status."""
        self.alive()
        c = LineSock(self.port)
        try:
            c.greeting()
            c.send(b"STOP\n")
            line = c.readline()
            if line != "OK STOP":
                raise BenchError(f"STOP: got {line!r}")
        finally:
            c.close()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            raise BenchError("the daemon did not exit within 15 s of STOP") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


# ------------------------------------------------------------------ phases


def accept_one(lsock: socket.socket, what: str) -> socket.socket:
    lsock.settimeout(IO_TIMEOUT)
    try:
        s, _ = lsock.accept()
    except socket.timeout:
        raise BenchError(f"{what}: the daemon did not connect to the fake device within {IO_TIMEOUT} s") from None
    return nodelay(s)


def forward_samples(dev: socket.socket, client: socket.socket, tag: str, n: int) -> list[float]:
    """device send -> client recv, one small message at a time."""
    out = []
    for i in range(n):
        msg = f"{tag}{i:05d}\n".encode()
        t0 = now()
        dev.sendall(msg)
        got = recv_exact(client, len(msg))
        t1 = now()
        if got != msg:
            raise BenchError(f"{tag}: sent {msg!r}, the client got {got!r}")
        out.append(t1 - t0)
    return out


def phase_latency(d: Daemon, luup: FakeLuup, res: dict) -> None:
    print("== 1. latency ==", flush=True)
    devl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    devl.bind((HOST, 0))
    devl.listen(16)
    dport = devl.getsockname()[1]
    opened: list = []
    try:
        # --- notification latency
        c = LineSock(d.port)
        opened.append(c)
        c.conn(f"{HOST}:{dport}", f"NTFY={LAT_DEV}/{SID}/{ACTION}")
        dev = accept_one(devl, "latency connection")
        opened.append(dev)
        if luup.drain(0.2):
            res.setdefault("oddities", []).append("notification(s) before any data on the latency connection")
        lat_first, lat_accept, fwd_in_notify, skipped = [], [], [], 0
        for i in range(WARMUP + SAMPLES):
            stray = luup.drain()
            skipped += len(stray)
            msg = f"n{i:05d}\n".encode()
            t0 = now()
            dev.sendall(msg)
            got = recv_exact(c.sock, len(msg))
            t1 = now()
            if got != msg:
                raise BenchError(f"notify sample {i}: sent {msg!r}, the client got {got!r}")
            ev, sk = luup.wait(LAT_DEV)
            skipped += sk
            if i >= WARMUP:
                lat_first.append(ev["t_first"] - t0)
                lat_accept.append(ev["t_accept"] - t0)
                fwd_in_notify.append(t1 - t0)
        extra = luup.drain(0.3)
        dev.close()
        c.close()
        # PROTOCOL.md: the device's end-of-stream is news for the plugin,
        # and the connection's end earns one final notification; the two
        # may coalesce, so 1 or 2 arrive.
        final, _ = luup.wait(LAT_DEV)
        at_close = 1 + len([e for e in luup.drain(0.3) if e["dev"] == LAT_DEV])
        res["notifications_at_close"] = at_close
        if extra or skipped or at_close > 2:
            res.setdefault("oddities", []).append(
                f"unexpected notifications: {len(extra)} after the last sample, {skipped} stray during"
                f" sampling, {at_close} at close (expected 1 or 2)"
            )

        # --- raw forwarding through the proxy (no NTFY)
        c2 = LineSock(d.port)
        opened.append(c2)
        c2.conn(f"{HOST}:{dport}")
        dev2 = accept_one(devl, "forwarding connection")
        opened.append(dev2)
        forward_samples(dev2, c2.sock, "w", WARMUP)
        proxied = forward_samples(dev2, c2.sock, "p", SAMPLES)
        dev2.close()
        c2.close()

        # --- direct socket pair, same loopback path
        a = nodelay(socket.create_connection((HOST, dport), timeout=IO_TIMEOUT))
        opened.append(a)
        b = accept_one(devl, "direct pair")
        opened.append(b)
        forward_samples(b, a, "w", WARMUP)
        direct = forward_samples(b, a, "d", SAMPLES)
    finally:
        for s in opened:
            s.close()
        devl.close()

    def stats(v: list[float]) -> dict:
        return {"p50_ms": ms(pct(v, 50)), "p99_ms": ms(pct(v, 99)), "max_ms": ms(max(v))}

    res["notify_latency"] = stats(lat_first)
    res["notify_latency"]["accept_p50_ms"] = ms(pct(lat_accept, 50))
    res["notify_latency"]["samples"] = len(lat_first)
    res["forward_proxy"] = stats(proxied)
    res["forward_direct"] = stats(direct)
    res["forward_proxy_with_ntfy"] = stats(fwd_in_notify)
    dp50 = pct(direct, 50)
    res["ratio_p50"] = {
        "proxy_over_direct": round(pct(proxied, 50) / dp50, 2),
        "notify_over_direct": round(pct(lat_first, 50) / dp50, 2),
    }
    n = res["notify_latency"]
    print(f"  notification (send -> Luup GET bytes), {SAMPLES} samples after {WARMUP} warm-up:")
    print(f"    p50 {n['p50_ms']:.3f} ms   p99 {n['p99_ms']:.3f} ms   max {n['max_ms']:.3f} ms"
          f"   (accept() alone: p50 {n['accept_p50_ms']:.3f} ms)")
    for label, key in (
        ("forwarding via proxy, no NTFY", "forward_proxy"),
        ("forwarding via proxy, with NTFY", "forward_proxy_with_ntfy"),
        ("direct socket pair (baseline)", "forward_direct"),
    ):
        r = res[key]
        print(f"  {label:32} p50 {r['p50_ms']:.3f} ms   p99 {r['p99_ms']:.3f} ms   max {r['max_ms']:.3f} ms")
    r = res["ratio_p50"]
    print(f"  p50 ratios to direct: proxy x{r['proxy_over_direct']}, notification x{r['notify_over_direct']}")
    print(f"  notifications at close (EOF + final, may coalesce): {res['notifications_at_close']}"
          f" (Pid={final['path'].split('&Pid=')[-1]})", flush=True)


def phase_idle(d: Daemon, echo: EchoDevice, res: dict) -> LineSock:
    print(f"== 2. idle wake-ups ({IDLE_SECONDS:.0f} s, one idle echo connection) ==", flush=True)
    c = LineSock(d.port)
    before_open = echo.count()
    c.conn(f"{HOST}:{echo.port}", f"NTFY={IDLE_DEV}/{SID}/{ACTION}")
    deadline = now() + IO_TIMEOUT
    while echo.count() <= before_open:
        if now() > deadline:
            raise BenchError("idle connection: the echo device never saw it")
        time.sleep(0.01)
    time.sleep(0.5)  # let everything settle
    a = d.ctxt()
    time.sleep(IDLE_SECONDS)
    b = d.ctxt()
    per_thread = {}
    for k in sorted(set(a) | set(b)):
        per_thread[k] = b.get(k, 0) - a.get(k, 0)
    total = sum(b.values()) - sum(a.values())
    res["idle"] = {
        "seconds": IDLE_SECONDS,
        "ctxt_switches": total,
        "target": f"< {IDLE_TARGET}",
        "ok": total < IDLE_TARGET,
        "threads": per_thread,
    }
    print(f"  context switches, all threads: {total} (target < {IDLE_TARGET}: {'ok' if total < IDLE_TARGET else 'MISSED'})")
    print("  per thread: " + ", ".join(f"{k}={v}" for k, v in per_thread.items()), flush=True)
    if set(a) != set(b):
        res.setdefault("oddities", []).append(f"threads changed while idle: {sorted(a)} -> {sorted(b)}")
    return c


def wait_for(what: str, timeout: float, cond) -> None:
    deadline = now() + timeout
    while not cond():
        if now() > deadline:
            raise BenchError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def phase_memory(d: Daemon, echo: EchoDevice, luup: FakeLuup, res: dict, rss_start: int) -> None:
    print(f"== 3. memory ({N_CONNS} echo connections) ==", flush=True)
    time.sleep(0.2)
    rss_pre = d.status("VmRSS")
    fds_pre = d.fds()
    dev_pre = echo.count()
    conns: list[LineSock] = []
    t0 = now()
    try:
        for i in range(N_CONNS):
            try:
                c = LineSock(d.port)
                conns.append(c)
                c.conn(f"{HOST}:{echo.port}")
            except BenchError as e:
                raise BenchError(f"echo connection {i + 1} of {N_CONNS}: {e}") from None
        t_open = now() - t0
        wait_for(f"the echo device to hold all {N_CONNS} connections", 10,
                 lambda: echo.count() >= dev_pre + N_CONNS)
        sample = sorted(set(range(0, N_CONNS, RT_SAMPLE_EVERY)) | {N_CONNS - 1})
        for j, i in enumerate(sample):
            b = bytes([0x41 + j % 26])
            conns[i].send(b)
            got = recv_exact(conns[i].sock, 1)
            if got != b:
                raise BenchError(f"round-trip on connection {i + 1}: sent {b!r}, got {got!r}")
        time.sleep(0.5)
        rss_loaded = d.status("VmRSS")
        hwm_loaded = d.status("VmHWM")
        fds_loaded = d.fds()
        threads_loaded = d.status("Threads")
    finally:
        t1 = now()
        for c in conns:
            c.close()
    wait_for("the daemon to close every echo connection", 15,
             lambda: echo.count() <= dev_pre and d.fds() <= fds_pre)
    t_close = now() - t1
    time.sleep(0.5)
    rss_after = d.status("VmRSS")
    per_conn = (rss_loaded - rss_pre) / N_CONNS
    res["memory"] = {
        "rss_startup_kib": rss_start,
        "rss_before_kib": rss_pre,
        "rss_loaded_kib": rss_loaded,
        "rss_after_close_kib": rss_after,
        "hwm_loaded_kib": hwm_loaded,
        "per_conn_kib": round(per_conn, 2),
        "retained_after_close_kib": rss_after - rss_pre,
        "conns_ok": len(conns),
        "round_trips_ok": len(sample),
        "fds_before": fds_pre,
        "fds_loaded": fds_loaded,
        "threads_loaded": threads_loaded,
        "open_s": round(t_open, 3),
        "close_s": round(t_close, 3),
    }
    m = res["memory"]
    print(f"  VmRSS at startup {rss_start} KiB; before {rss_pre} KiB; with {N_CONNS} connections"
          f" {rss_loaded} KiB; after closing {rss_after} KiB")
    print(f"  per connection {m['per_conn_kib']:.2f} KiB; retained after close {m['retained_after_close_kib']} KiB;"
          f" VmHWM {hwm_loaded} KiB")
    print(f"  {len(conns)}/{N_CONNS} got OK CONN in {t_open:.2f} s; {len(sample)} byte round-trips ok;"
          f" daemon fds {fds_pre} -> {fds_loaded}; threads {threads_loaded}; all closed in {t_close:.2f} s",
          flush=True)
    late = luup.drain()
    if late:
        res.setdefault("oddities", []).append(f"{len(late)} notification(s) during the memory phase (no NTFY set)")


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if want < need:
        raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(DEFAULT_BIN), help=f"daemon binary (default {DEFAULT_BIN})")
    args = ap.parse_args()
    binary = Path(args.bin).resolve()

    def on_alarm(signum, frame):
        raise BenchError(f"the whole run took longer than {GLOBAL_TIMEOUT} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(GLOBAL_TIMEOUT)

    res: dict = {"bin": str(binary)}
    started = now()
    luup = echo = d = None
    idle_conn = None
    try:
        # 1,000 clients + 1,000 device ends here, 2,000 + a few in the
        # daemon (which inherits the limit).
        raise_nofile(2 * N_CONNS + 512)
        luup = FakeLuup()
        echo = EchoDevice()
        d = Daemon(binary, luup.port)
        res["pid"] = d.pid
        with open("/proc/loadavg") as f:
            res["loadavg_1m"] = float(f.read().split()[0])
        print(f"sockproxyd {binary} pid {d.pid}, command port {d.port}, fake Luup port {luup.port}"
              f" ({os.cpu_count()} CPUs, load average {res['loadavg_1m']})", flush=True)
        if res["loadavg_1m"] > 0.5 * (os.cpu_count() or 1):
            print("  (busy host: expect noisy latency tails)", flush=True)
        time.sleep(0.3)
        rss_start = d.status("VmRSS")

        phase_latency(d, luup, res)
        idle_conn = phase_idle(d, echo, res)
        phase_memory(d, echo, luup, res, rss_start)

        print("== STOP ==", flush=True)
        luup.drain()
        rc = d.stop()
        res["exit_status"] = rc
        final = [e for e in luup.drain(0.2) if e["dev"] == IDLE_DEV]
        res["final_notify_at_stop"] = len(final)
        print(f"  exit status {rc}; final notifications for the open connection at STOP: {len(final)}")
        if len(final) != 1:
            res.setdefault("oddities", []).append(
                f"{len(final)} final notification(s) for the idle connection at STOP (expected 1)")
        if rc != 0:
            raise BenchError(f"the daemon exited with status {rc} after STOP")
        for errs in (echo.errors, luup.bad):
            if errs:
                raise BenchError("; ".join(errs[:5]))
    except BenchError as e:
        signal.alarm(0)
        print(f"core_metrics: FAILED: {e}", file=sys.stderr)
        if d is not None and d.notable:
            print("daemon warnings/errors:\n  " + "\n  ".join(d.notable[-10:]), file=sys.stderr)
        return 1
    except (Exception, KeyboardInterrupt) as e:  # a bug here, a socket error, ^C
        signal.alarm(0)
        traceback.print_exc()
        print(f"core_metrics: FAILED: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if idle_conn is not None:
            idle_conn.close()
        if d is not None:
            d.kill()
        for x in (echo, luup):
            if x is not None:
                x.close()

    res["daemon_warnings"] = len(d.notable)
    if d.notable:
        print("daemon warnings/errors:\n  " + "\n  ".join(d.notable[-10:]))
    for o in res.get("oddities", []):
        print(f"NOTE: {o}")
    res["runtime_s"] = round(now() - started, 2)
    print(f"done in {res['runtime_s']:.1f} s")
    summary = {
        "notify_p50_ms": res["notify_latency"]["p50_ms"],
        "notify_p99_ms": res["notify_latency"]["p99_ms"],
        "notify_max_ms": res["notify_latency"]["max_ms"],
        "fwd_proxy_p50_ms": res["forward_proxy"]["p50_ms"],
        "fwd_proxy_p99_ms": res["forward_proxy"]["p99_ms"],
        "fwd_direct_p50_ms": res["forward_direct"]["p50_ms"],
        "fwd_direct_p99_ms": res["forward_direct"]["p99_ms"],
        "proxy_over_direct_p50": res["ratio_p50"]["proxy_over_direct"],
        "notify_over_direct_p50": res["ratio_p50"]["notify_over_direct"],
        "idle_ctxt_switches_10s": res["idle"]["ctxt_switches"],
        "idle_ok": res["idle"]["ok"],
        "rss_startup_kib": res["memory"]["rss_startup_kib"],
        "rss_1000_kib": res["memory"]["rss_loaded_kib"],
        "rss_after_close_kib": res["memory"]["rss_after_close_kib"],
        "per_conn_kib": res["memory"]["per_conn_kib"],
        "exit_status": res["exit_status"],
        "oddities": len(res.get("oddities", [])),
        "loadavg_1m": res["loadavg_1m"],
        "runtime_s": res["runtime_s"],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
