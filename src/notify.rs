//! Notifications to Luup (PROTOCOL.md "Notifications"): the notifier thread,
//! its ureq agent, and `notify_url()`.
//!
//! In scope: building the URL, performing the GET (5 s timeout), judging
//! the answer (Vera: 401; openLuup: 200 with a body starting `ERROR:`) and
//! warning once per connection; a few workers so that a slow answer does not
//! hold up every other connection's notification; the queues: open
//! connections' notifications first, then final ones of connections that
//! have gone, of which at most `FINALS_MAX` wait (beyond, the oldest is
//! dropped and counted in a rate-limited line), so that the queue's memory
//! is bounded whatever Luup does. Out of scope: deciding when to notify
//! (coalescing and PACE are the loop's, through `Slot::claim`); connections.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::protocol::{NotifyTarget, OneLine};
use crate::ratelog::RateLog;

const TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an answer's body is read to look for `ERROR:`.
const BODY_PEEK: u64 = 512;
/// ureq's buffer for an answer's header and the body we peek at (ureq does
/// not grow it: a longer header fails as "Peer disconnected", after Luup has
/// had the request). Vera's and openLuup's headers are ~200 bytes.
const INPUT_BUFFER: usize = 4096;
/// Room for the request line's fixed part and the headers around the URL.
const REQUEST_HEAD: usize = 512;
/// Notifications in flight at once: enough that 500 busy connections are
/// not served one GET at a time, few enough for a router. Each connection
/// still has at most one waiting (`Slot::claim`).
pub const WORKERS: usize = 4;
/// ureq needs little stack; the default 2 MiB per thread is address space a
/// 32-bit router can use better.
const STACK: usize = 256 * 1024;

/// `Slot::state`: nothing to do.
const IDLE: u8 = 0;
/// In the queue, not yet taken by a worker.
const QUEUED: u8 = 1;
/// A worker is performing the GET.
const RUNNING: u8 = 2;
/// A worker is performing the GET, and newer data needs another one after it.
const RUNNING_AGAIN: u8 = 3;

/// One connection's notification slot: its target URL and whether a GET is
/// waiting or running, shared between the loop (which claims it) and the
/// workers (which run it). Per connection, one GET runs at a time and at most
/// one more waits (PROTOCOL.md "Notifications").
pub struct Slot {
    pub conn: String,
    pub url: String,
    state: AtomicU8,
    warned: AtomicBool,
}

impl Slot {
    pub fn new(conn: &str, vera: &str, target: &NotifyTarget) -> Arc<Slot> {
        let pid = target.pid.as_deref().unwrap_or(conn);
        Arc::new(Slot {
            conn: conn.to_string(),
            url: notify_url(vera, target, pid),
            state: AtomicU8::new(IDLE),
            warned: AtomicBool::new(false),
        })
    }

    /// Asks for a notification. True if the caller must queue the job; false
    /// if one is already waiting (coalesced) or the worker running this job's
    /// GET has been told to run it once more when done.
    pub fn claim(&self) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (next, queue) = match state {
                IDLE => (QUEUED, true),
                RUNNING => (RUNNING_AGAIN, false),
                _ => return false, // QUEUED or RUNNING_AGAIN: one waits already
            };
            match self
                .state
                .compare_exchange(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return queue,
                Err(now) => state = now,
            }
        }
    }

    /// After a GET: true if another one was asked for meanwhile (and the
    /// job stays RUNNING), false if the job is IDLE again.
    fn again(&self) -> bool {
        match self
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => false,
            Err(_) => {
                self.state.store(RUNNING, Ordering::Release);
                true
            }
        }
    }
}

/// `<vera>/data_request?id=action&...` with sid, action and pid
/// percent-encoded.
pub fn notify_url(vera: &str, target: &NotifyTarget, pid: &str) -> String {
    format!(
        "{}/data_request?id=action&output_format=json&DeviceNum={}&serviceId={}&action={}&Pid={}",
        vera.trim_end_matches('/'),
        target.device,
        encode(&target.service),
        encode(&target.action),
        encode(pid)
    )
}

/// Percent-encodes everything but `A-Z a-z 0-9 _ . ~ -`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'~' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The jobs waiting for a worker; `ready` wakes one when a job comes.
#[derive(Default)]
struct Queue {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// Final notifications that may wait at once. Beyond it the oldest is
/// dropped: with Luup stalled, each gone connection would otherwise leave
/// ~400 bytes here for good. Above the default max_conns, so that a
/// shutdown keeps every connection's final notification.
pub const FINALS_MAX: usize = 1024;
/// The live queue is looked through for jobs of gone connections once it
/// is this long, then again at twice its length after the sweep.
const SWEEP_MIN: usize = 64;

#[derive(Default)]
struct Jobs {
    /// Notifications of open connections, served first: each connection has
    /// at most one waiting (`Slot::claim`).
    live: VecDeque<Arc<Slot>>,
    /// Final notifications of connections that have gone, at most
    /// `FINALS_MAX`; served when no live one waits.
    finals: VecDeque<Arc<Slot>>,
    /// `live.len()` at which the next sweep runs (`Jobs::push_live`).
    sweep_at: usize,
    /// Finals dropped at the cap, for the log.
    dropped: RateLog,
    /// The loop has finished: workers leave once both queues are empty.
    finished: bool,
}

impl Jobs {
    fn push_live(&mut self, job: Arc<Slot>, now: Instant) -> Option<String> {
        self.live.push_back(job);
        if self.live.len() < self.sweep_at.max(SWEEP_MIN) {
            return None;
        }
        // A job queued while its connection was open stays here when the
        // connection goes (its final notification is coalesced with it):
        // move those to the finals, under their cap. A job in a queue is
        // held by the queue and, while it is open, by its connection only
        // (workers hold the jobs they have taken out), so a count of one
        // means the connection has gone; it never rises again.
        let mut line = None;
        let (gone, open): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.live)
            .into_iter()
            .partition(|j| Arc::strong_count(j) == 1);
        self.live = open;
        for job in gone {
            line = self.push_final(job, now).or(line);
        }
        self.sweep_at = self.live.len().saturating_mul(2);
        line
    }

    /// Queues a final notification; at the cap, drops the oldest. Returns
    /// the log line to write (outside the lock), rate-limited.
    fn push_final(&mut self, job: Arc<Slot>, now: Instant) -> Option<String> {
        self.finals.push_back(job);
        if self.finals.len() <= FINALS_MAX {
            return None;
        }
        let old = self.finals.pop_front()?;
        let n = self.dropped.event(now)?;
        Some(format!(
            "Luup is not keeping up with final notifications: dropped {n} \
             (the latest for {}; at most {FINALS_MAX} wait)",
            old.conn
        ))
    }

    /// The next job: live ones first. The line, when the finals have run
    /// out after some were dropped, gives the count not logged yet.
    fn pop(&mut self) -> (Option<Arc<Slot>>, Option<String>) {
        if let Some(job) = self.live.pop_front() {
            return (Some(job), None);
        }
        let job = self.finals.pop_front();
        let line = if self.finals.is_empty() {
            self.dropped.end().map(|n| {
                format!("Luup is not keeping up with final notifications: dropped {n} more")
            })
        } else {
            None
        };
        (job, line)
    }
}

impl Queue {
    /// The next job; `None` once the loop has finished and nothing is left.
    fn next(&self) -> Option<Arc<Slot>> {
        let mut jobs = self.jobs.lock().ok()?;
        loop {
            let (job, line) = jobs.pop();
            if let Some(line) = line {
                warn!("{line}");
            }
            if job.is_some() {
                return job;
            }
            if jobs.finished {
                return None;
            }
            jobs = self.ready.wait(jobs).ok()?;
        }
    }

    fn push(&self, job: Arc<Slot>, push: fn(&mut Jobs, Arc<Slot>, Instant) -> Option<String>) {
        // A worker that panicked while holding the lock poisons it; the loop
        // goes on without notifications rather than stopping.
        let Ok(mut jobs) = self.jobs.lock() else {
            return;
        };
        let line = push(&mut jobs, job, Instant::now());
        drop(jobs);
        self.ready.notify_one();
        if let Some(line) = line {
            warn!("{line}");
        }
    }
}

pub struct Notifier {
    queue: Arc<Queue>,
    done: Receiver<()>,
}

impl Notifier {
    pub fn spawn() -> std::io::Result<Notifier> {
        let queue = Arc::new(Queue::default());
        let (done_tx, done) = mpsc::channel();
        for n in 0..WORKERS {
            let queue = Arc::clone(&queue);
            let done_tx = done_tx.clone();
            thread::Builder::new()
                .name(format!("notifier{n}"))
                .stack_size(STACK)
                .spawn(move || {
                    work(&queue);
                    let _ = done_tx.send(());
                })?;
        }
        Ok(Notifier { queue, done })
    }

    /// Queues a GET for an open connection and wakes one idle worker; never
    /// blocks for longer than a worker takes to pop a job.
    pub fn send(&self, job: Arc<Slot>) {
        self.queue.push(job, Jobs::push_live);
    }

    /// Queues the final notification of a connection that has gone
    /// (PROTOCOL.md "Notifications"): after every live one, and dropped
    /// (oldest first, logged) beyond `FINALS_MAX` waiting.
    pub fn send_final(&self, job: Arc<Slot>) {
        self.queue.push(job, Jobs::push_final);
    }

    /// Lets the workers send what is queued, waiting at most `wait`.
    pub fn finish(&mut self, wait: Duration) {
        if let Ok(mut jobs) = self.queue.jobs.lock() {
            jobs.finished = true;
        }
        self.queue.ready.notify_all();
        let deadline = Instant::now() + wait;
        for _ in 0..WORKERS {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return;
            }
        }
    }
}

/// One worker: takes the next job from the shared queue until the loop has
/// finished and the queue is empty.
fn work(queue: &Queue) {
    // The 5 s bound per phase rather than `timeout_global`: with a global
    // timeout ureq resolves every host, even 127.0.0.1, on a thread of its
    // own per request (~20 extra syscalls per notification, measured).
    // ureq's default 128 KiB input and output buffers, zeroed for every
    // connection, cost more CPU than the GET itself (measured: 340 -> 180
    // µs of CPU per notification); `get` sizes the output buffer to the
    // request.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_send_request(Some(TIMEOUT))
        .timeout_recv_response(Some(TIMEOUT))
        .timeout_recv_body(Some(TIMEOUT))
        .http_status_as_error(false)
        .user_agent("sockproxyd-1")
        .max_idle_connections(0)
        .input_buffer_size(INPUT_BUFFER)
        .build()
        .into();
    while let Some(job) = queue.next() {
        // Data that arrives while the GET is in flight earns a fresh
        // notification, sent by this worker right after it (`again`).
        job.state.store(RUNNING, Ordering::Release);
        loop {
            match get(&agent, &job.url) {
                Ok(()) => debug!("{}: notified {}", job.conn, job.url),
                Err(why) if !job.warned.swap(true, Ordering::Relaxed) => {
                    warn!(
                        "{}: notification failed: {}: {}",
                        job.conn,
                        OneLine(&why),
                        job.url
                    )
                }
                Err(why) => debug!("{}: notification failed: {}", job.conn, OneLine(&why)),
            }
            if !job.again() {
                break;
            }
        }
    }
}

fn get(agent: &ureq::Agent, url: &str) -> Result<(), String> {
    let mut resp = agent
        .get(url)
        .header("Connection", "close")
        .config()
        .output_buffer_size(url.len() + REQUEST_HEAD)
        .build()
        .call()
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = Vec::new();
    // A body we cannot read is no reason to doubt a 200.
    let _ = resp
        .body_mut()
        .as_reader()
        .take(BODY_PEEK)
        .read_to_end(&mut body);
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let body = String::from_utf8_lossy(&body);
    if body.trim_start().starts_with("ERROR:") {
        return Err(body.lines().next().unwrap_or_default().to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DEFAULT_ACTION, DEFAULT_SERVICE};

    #[test]
    fn url_fields() {
        let t = NotifyTarget {
            device: 0,
            service: DEFAULT_SERVICE.into(),
            action: DEFAULT_ACTION.into(),
            pid: None,
        };
        assert_eq!(
            notify_url("http://127.0.0.1:3480/", &t, "17a2b"),
            "http://127.0.0.1:3480/data_request?id=action&output_format=json&DeviceNum=0\
             &serviceId=urn%3Atoggledbits-com%3AserviceId%3ASockProxy1\
             &action=HandleReceiveData&Pid=17a2b"
        );
        let t = NotifyTarget {
            device: 7,
            service: "a b/c".into(),
            action: "Do_it.~-".into(),
            pid: Some("x&y=z%".into()),
        };
        let job = Slot::new("17a2c", "http://h:1", &t);
        assert!(
            job.url
                .ends_with("DeviceNum=7&serviceId=a%20b%2Fc&action=Do_it.~-&Pid=x%26y%3Dz%25")
        );
        assert!(job.claim());
        assert!(!job.claim(), "one already waits");
        job.state.store(RUNNING, Ordering::Release);
        assert!(!job.claim(), "runs again after the GET instead");
        assert!(!job.claim(), "and only once");
        assert!(job.again());
        assert!(!job.again());
        assert!(job.claim(), "idle: queue a new one");
    }

    fn job(conn: &str) -> Arc<Slot> {
        let t = NotifyTarget {
            device: 1,
            service: "s".into(),
            action: "a".into(),
            pid: None,
        };
        Slot::new(conn, "http://h:1", &t)
    }

    fn conns(q: &VecDeque<Arc<Slot>>) -> Vec<&str> {
        q.iter().map(|j| j.conn.as_str()).collect()
    }

    #[test]
    fn live_jobs_go_before_finals() {
        let now = Instant::now();
        let mut jobs = Jobs::default();
        let open = job("open");
        assert_eq!(jobs.push_final(job("gone1"), now), None);
        assert_eq!(jobs.push_final(job("gone2"), now), None);
        assert_eq!(jobs.push_live(Arc::clone(&open), now), None);
        let order: Vec<String> = std::iter::from_fn(|| jobs.pop().0)
            .map(|j| j.conn.clone())
            .collect();
        assert_eq!(order, ["open", "gone1", "gone2"]);
    }

    #[test]
    fn finals_beyond_the_cap_drop_the_oldest_and_say_so_once() {
        let now = Instant::now();
        let mut jobs = Jobs::default();
        let mut lines = Vec::new();
        for i in 0..FINALS_MAX + 500 {
            lines.extend(jobs.push_final(job(&format!("g{i}")), now));
        }
        assert_eq!(jobs.finals.len(), FINALS_MAX);
        assert_eq!(jobs.finals.front().map(|j| j.conn.as_str()), Some("g500"));
        assert_eq!(lines.len(), 1, "one line for the episode: {lines:?}");
        assert!(lines[0].contains("dropped 1 "), "{}", lines[0]);
        // A summary comes with the next drop after the interval...
        let later = now + crate::ratelog::INTERVAL;
        let line = jobs.push_final(job("late"), later);
        assert!(
            line.as_deref().is_some_and(|l| l.contains("dropped 500 ")),
            "{line:?}"
        );
        lines.clear();
        jobs.push_final(job("late2"), later);
        // ...and when the finals have all gone out, the rest of the count.
        while let (Some(_), line) = jobs.pop() {
            lines.extend(line);
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].ends_with("dropped 1 more"), "{}", lines[0]);
    }

    #[test]
    fn live_jobs_of_gone_connections_move_to_the_finals() {
        let now = Instant::now();
        let mut jobs = Jobs::default();
        // Connections keep their own handle on their job while open.
        let mut open = Vec::new();
        for i in 0..SWEEP_MIN * 3 {
            let j = job(&format!("c{i}"));
            jobs.push_live(Arc::clone(&j), now);
            if i % 3 == 0 {
                open.push(j);
            }
        }
        assert_eq!(
            jobs.live.len() + jobs.finals.len(),
            SWEEP_MIN * 3,
            "nothing lost"
        );
        assert!(!jobs.finals.is_empty(), "a sweep has run");
        assert!(
            jobs.finals.iter().all(|j| Arc::strong_count(j) == 1),
            "only gone connections' jobs among the finals: {:?}",
            conns(&jobs.finals)
        );
        assert!(
            open.iter()
                .all(|j| jobs.live.iter().any(|l| Arc::ptr_eq(j, l))),
            "every open connection's job still in the live queue"
        );
        assert!(jobs.live.len() < SWEEP_MIN * 2, "{}", jobs.live.len());
        drop(open);
    }
}
