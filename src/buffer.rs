//! A fixed-size byte buffer: the one place bytes wait between a read from
//! one socket and a write to the other.
//!
//! In scope: `data` (what is waiting), `read_with` (one read into the free
//! space), `push` and `consume` to move the two marks, and the storage
//! behind them.
//! Out of scope: sockets, and growing: the capacity is set at creation
//! (BLKS, PROTOCOL.md "CONN") and never changes, so a connection's memory
//! is known the moment it starts.
//!
//! The storage is held only while bytes wait: a read takes it, and gives it
//! back if it found nothing; `consume` gives it back when the last byte goes. An idle connection
//! then costs no buffer at all, which on a router with hundreds of quiet
//! device connections is most of the memory (musl's allocator spends about
//! 4 KiB on a 2 KiB buffer). Storage given back waits in a small per-thread
//! spare list, so a busy connection that empties its buffer on every write
//! reuses it instead of going to the allocator each time.

use std::cell::RefCell;
use std::io;

/// Most bytes of storage kept spare for reuse (per thread: the loop's).
const SPARE_BYTES: usize = 128 * 1024;

thread_local! {
    static SPARE: RefCell<Spare> = const { RefCell::new(Spare { bufs: Vec::new(), bytes: 0 }) };
}

struct Spare {
    bufs: Vec<Box<[u8]>>,
    bytes: usize,
}

/// Storage of exactly `len` bytes: a spare one if there is, else new.
fn take(len: usize) -> Box<[u8]> {
    let reused = SPARE.with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        let i = s.bufs.iter().rposition(|b| b.len() == len)?;
        let b = s.bufs.swap_remove(i);
        s.bytes -= b.len();
        Some(b)
    });
    reused.unwrap_or_else(|| vec![0; len].into_boxed_slice())
}

/// Keeps `buf` for reuse if the spare list has room; frees it otherwise.
fn give_back(buf: Box<[u8]>) {
    SPARE.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut()
            && s.bytes + buf.len() <= SPARE_BYTES
        {
            s.bytes += buf.len();
            s.bufs.push(buf);
        }
    });
}

/// Bytes `start..end` of `buf` are waiting; `end..` is free space. `buf` is
/// empty (no storage) while nothing waits.
pub struct Buffer {
    buf: Box<[u8]>,
    capacity: usize,
    start: usize,
    end: usize,
}

impl Buffer {
    /// A buffer of `capacity` bytes; its storage is taken at the first
    /// `space`.
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            buf: Box::default(),
            capacity,
            start: 0,
            end: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes waiting to be written.
    pub fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn is_full(&self) -> bool {
        self.len() == self.capacity
    }

    /// Whether storage is held.
    fn holds_storage(&self) -> bool {
        !self.buf.is_empty()
    }

    /// One read into the free space: `read` gets at most `limit` bytes of it
    /// and returns how many it filled. Whatever `read` returns, the storage
    /// taken for it is given back if nothing waits afterwards. A full buffer
    /// (or a `limit` of 0) calls nothing and gives `Ok(0)`, so `read` may take
    /// its own `Ok(0)` for an end-of-stream.
    pub fn read_with(
        &mut self,
        limit: usize,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let space = self.space();
        let got = match space.get_mut(..limit.min(space.len())) {
            Some(space) if !space.is_empty() => read(space),
            _ => Ok(0),
        };
        match got {
            Ok(n) => self.fill(n),
            Err(_) => self.idle(),
        }
        got
    }

    /// Free space for the next read; moves waiting bytes to the front first
    /// (at most one buffer's worth), so the whole capacity is always usable.
    fn space(&mut self) -> &mut [u8] {
        if self.buf.is_empty() && self.capacity > 0 {
            self.buf = take(self.capacity);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Marks `n` bytes of `space()` as filled.
    fn fill(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
        self.idle();
    }

    /// Marks `n` bytes of `data()` as written.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        self.idle();
    }

    /// Gives the storage back if nothing waits.
    fn idle(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.holds_storage() {
                give_back(std::mem::take(&mut self.buf));
            }
        }
    }

    /// Copies as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let space = self.space();
        let n = space.len().min(bytes.len());
        if let (Some(dst), Some(src)) = (space.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.fill(n);
        n
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.holds_storage() {
            give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Buffer, SPARE, SPARE_BYTES};

    #[test]
    fn fill_consume_and_compact() {
        let mut b = Buffer::new(8);
        assert_eq!(b.push(b"abcdef"), 6);
        assert_eq!(b.data(), b"abcdef");
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        // Only 2 bytes free at the end: space() compacts to offer 6.
        assert_eq!(b.space().len(), 6);
        assert_eq!(b.push(b"ghijklmn"), 6);
        assert_eq!(b.data(), b"efghijkl");
        assert!(b.is_full());
        assert_eq!(b.push(b"x"), 0);
        b.consume(100);
        assert!(b.is_empty());
        assert_eq!(b.space().len(), 8);
    }

    #[test]
    fn storage_is_held_only_while_bytes_wait() {
        let mut b = Buffer::new(16);
        assert!(!b.holds_storage() && b.is_empty() && !b.is_full());
        assert_eq!(b.capacity(), 16);
        assert_eq!(b.data(), b"");
        b.consume(5);
        assert!(!b.holds_storage());
        // A read that found nothing: space taken, nothing filled, given back.
        assert_eq!(b.space().len(), 16);
        b.fill(0);
        assert!(!b.holds_storage());
        assert_eq!(b.push(b"abc"), 3);
        assert!(b.holds_storage());
        b.consume(2);
        assert!(b.holds_storage());
        assert_eq!(b.data(), b"c");
        b.consume(1);
        assert!(!b.holds_storage() && b.is_empty());
        assert_eq!(b.push(&[7; 20]), 16, "the capacity stays fixed");
        assert!(b.is_full());
    }

    #[test]
    fn spare_storage_is_reused_and_bounded() {
        let spare = || SPARE.with(|s| (s.borrow().bufs.len(), s.borrow().bytes));
        let before = spare();
        let mut a = Buffer::new(1000);
        a.push(b"x");
        a.consume(1);
        assert_eq!(spare(), (before.0 + 1, before.1 + 1000));
        let mut b = Buffer::new(1000);
        b.push(b"y");
        assert_eq!(spare(), before, "taken again");
        drop(b);
        assert_eq!(
            spare(),
            (before.0 + 1, before.1 + 1000),
            "given back on drop"
        );
        // Never more than SPARE_BYTES kept.
        let mut big: Vec<Buffer> = (0..40).map(|_| Buffer::new(8192)).collect();
        for x in &mut big {
            x.push(b"z");
        }
        drop(big);
        assert!(spare().1 <= SPARE_BYTES);
    }
}
