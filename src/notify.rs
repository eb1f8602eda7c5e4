//! Notifications to Luup (PROTOCOL.md "Notifications"): the notifier thread,
//! its ureq agent, and `notify_url()`.
//!
//! In scope: building the URL, performing the GET (5 s timeout), judging
//! the answer (Vera: 401; openLuup: 200 with a body starting `ERROR:`) and
//! warning once per connection; a few workers so that a slow answer does not
//! hold up every other connection's notification. Out of scope: deciding
//! when to notify (coalescing and PACE are the loop's, through
//! `Job::claim`); connections.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::protocol::NotifyTarget;

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
/// still has at most one waiting (`Job::claim`).
const WORKERS: usize = 4;
/// ureq needs little stack; the default 2 MiB per thread is address space a
/// 32-bit router can use better.
const STACK: usize = 256 * 1024;

/// `Job::state`: nothing to do.
const IDLE: u8 = 0;
/// In the queue, not yet taken by a worker.
const QUEUED: u8 = 1;
/// A worker is performing the GET.
const RUNNING: u8 = 2;
/// A worker is performing the GET, and newer data needs another one after it.
const RUNNING_AGAIN: u8 = 3;

/// One connection's notification target, shared between the loop (which
/// claims it) and the workers (which run it). Per connection, one GET runs at
/// a time and at most one more waits (PROTOCOL.md "Notifications").
pub struct Job {
    pub conn: String,
    pub url: String,
    state: AtomicU8,
    warned: AtomicBool,
}

impl Job {
    pub fn new(conn: &str, vera: &str, target: &NotifyTarget) -> Arc<Job> {
        let pid = target.pid.as_deref().unwrap_or(conn);
        Arc::new(Job {
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

#[derive(Default)]
struct Jobs {
    waiting: VecDeque<Arc<Job>>,
    /// The loop has finished: workers leave once `waiting` is empty.
    finished: bool,
}

impl Queue {
    /// The next job; `None` once the loop has finished and nothing is left.
    fn next(&self) -> Option<Arc<Job>> {
        let mut jobs = self.jobs.lock().ok()?;
        loop {
            if let Some(job) = jobs.waiting.pop_front() {
                return Some(job);
            }
            if jobs.finished {
                return None;
            }
            jobs = self.ready.wait(jobs).ok()?;
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

    /// Queues a GET and wakes one idle worker; never blocks for longer than
    /// a worker takes to pop a job.
    pub fn send(&self, job: Arc<Job>) {
        // A worker that panicked while holding the lock poisons it; the loop
        // goes on without notifications rather than stopping.
        if let Ok(mut jobs) = self.queue.jobs.lock() {
            jobs.waiting.push_back(job);
            drop(jobs);
            self.queue.ready.notify_one();
        }
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
                    warn!("{}: notification failed: {why}: {}", job.conn, job.url)
                }
                Err(why) => debug!("{}: notification failed: {why}", job.conn),
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
        let job = Job::new("17a2c", "http://h:1", &t);
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
}
