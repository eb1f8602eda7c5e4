//! Signals (PROTOCOL.md "Lifecycle"): a self-pipe the loop polls. All of the
//! daemon's `unsafe` signal code is here.
//!
//! In scope: installing the handlers for SIGTERM, SIGINT and SIGHUP, and
//! reading which signals came. Out of scope: what they mean (the loop).
//! STYLE.md "Daemon habits": the handler only writes the signal number to a
//! pipe (async-signal-safe), saving errno around it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: write(2) is async-signal-safe; errno is restored for the
    // code the signal interrupted.
    unsafe {
        let errno = *libc::__errno_location();
        let byte = u8::try_from(sig).unwrap_or(0);
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&raw const byte).cast(),
            1,
        );
        *libc::__errno_location() = errno;
    }
}

/// Installs the handlers; the descriptor becomes readable when a signal
/// has come (register it with the poll).
pub fn install() -> io::Result<OwnedFd> {
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: pipe2 fills the two descriptors it returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own from here on; the write end
    // lives as long as the process (the handler may use it at any time).
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with our handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(read)
}

/// The signals that came since the last call, in order.
pub fn pending(pipe: &OwnedFd) -> Vec<i32> {
    let mut sigs = Vec::new();
    let mut buf = [0u8; 16];
    loop {
        // SAFETY: reading into a local buffer from our own pipe.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => sigs.extend(
                buf.get(..n)
                    .unwrap_or_default()
                    .iter()
                    .map(|&b| i32::from(b)),
            ),
            _ => return sigs, // EAGAIN (drained) or end
        }
    }
}
