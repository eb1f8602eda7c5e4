//! One socket of a connection (the client's or the remote's) and what the
//! loop knows of it: readable / writable until a call would block
//! (edge-triggered readiness), the interest registered, an error reported.
//!
//! In scope: the syscalls on a connection's socket, each retried on `EINTR`
//! and turning `EAGAIN` into a cleared readiness flag. Out of scope: what
//! the bytes mean and when to move them (`conn.rs`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};

pub struct Side<S> {
    pub sock: S,
    pub readable: bool,
    pub writable: bool,
    interest: Interest,
    /// The kernel reported an error (EPOLLERR): `take_error` says which.
    error: bool,
}

/// Runs a syscall again while it is interrupted by a signal; one that would
/// block takes the readiness `flag` down until the next edge.
#[inline]
fn call<T>(flag: &mut bool, mut syscall: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match syscall() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *flag = false;
                return Err(e);
            }
            result => return result,
        }
    }
}

impl<S: mio::event::Source> Side<S> {
    pub fn register(mut sock: S, registry: &Registry, token: Token) -> io::Result<Side<S>> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(&mut sock, token, interest)?;
        Ok(Side {
            sock,
            readable: false,
            writable: false,
            interest,
            error: false,
        })
    }

    /// Readable interest only while the connection wants to read: the
    /// kernel's buffers and TCP flow control then hold the peer back
    /// (PROTOCOL.md "Echo mode": backpressure, nothing dropped).
    pub fn want_read(&mut self, registry: &Registry, token: Token, want: bool) {
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::WRITABLE
        };
        if interest != self.interest && registry.reregister(&mut self.sock, token, interest).is_ok()
        {
            self.interest = interest;
        }
    }

    pub fn mark(&mut self, event: &mio::event::Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.readable = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.writable = true;
        }
        if event.is_error() {
            self.error = true;
        }
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.sock);
    }

    /// The error the kernel reported on the socket, if any, taken once.
    pub fn reported_error(
        &mut self,
        take: impl Fn(&S) -> io::Result<Option<io::Error>>,
    ) -> io::Result<()> {
        if std::mem::take(&mut self.error)
            && let Some(e) = take(&self.sock)?
        {
            return Err(e);
        }
        Ok(())
    }
}

impl Side<TcpStream> {
    /// One read; `Ok(0)` is the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let sock = &mut self.sock;
        call(&mut self.readable, || sock.read(buf))
    }

    /// One write; a write of nothing into a socket that takes nothing is an
    /// error, never a silent `Ok(0)`.
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let sock = &mut self.sock;
        call(&mut self.writable, || match sock.write(data) {
            Ok(0) if !data.is_empty() => Err(io::ErrorKind::WriteZero.into()),
            result => result,
        })
    }

    /// Passes end-of-stream on; a peer that is already gone is no error.
    pub fn shut_write(&mut self) {
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

impl Side<UdpSocket> {
    /// One datagram and its source.
    pub fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let sock = &mut self.sock;
        call(&mut self.readable, || sock.recv_from(buf))
    }

    /// One datagram to `peer`.
    pub fn send_to(&mut self, data: &[u8], peer: SocketAddr) -> io::Result<usize> {
        let sock = &mut self.sock;
        call(&mut self.writable, || sock.send_to(data, peer))
    }
}
