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
//! The storage is held only while bytes wait: a read takes it, and `trim`
//! gives it back when nothing waits, at the end of the connection's turn
//! (not at every emptying: a busy connection keeps it from one chunk to the
//! next within its turn, without a trip to the spare list). An idle connection
//! then costs no buffer at all, which on a router with hundreds of quiet
//! device connections is most of the memory (musl's allocator spends about
//! 4 KiB on a 2 KiB buffer). Storage given back waits in a small per-thread
//! spare list, so a busy connection that empties its buffer on every write
//! reuses it instead of going to the allocator each time.
//!
//! All storage is counted against the memory budget (`[host] max_mem=`,
//! `set_budget`). A buffer takes storage of its whole capacity while the
//! budget allows; past it, a buffer bigger than `GUARANTEED` gets only
//! `GUARANTEED` bytes (it reads in small steps: backpressure, nothing is
//! dropped), and one that must hold whole datagrams or lines (`whole`)
//! still gets its capacity. So a connection always moves, and hostile
//! connections with huge BLKS hold at most what the budget let them take.

use std::cell::{Cell, RefCell};
use std::io;

use log::{info, warn};

use crate::pool::{CHUNK, Chunk};

/// What a buffer always gets, budget or not: the default BLKS.
pub const GUARANTEED: usize = crate::protocol::DEFAULT_BLKS;

/// Most bytes of storage kept spare for reuse (per thread: the loop's).
const SPARE_BYTES: usize = 128 * 1024;

thread_local! {
    static SPARE: RefCell<Spare> = const { RefCell::new(Spare { bufs: Vec::new(), bytes: 0 }) };
    static BUDGET: Cell<Budget> = const {
        Cell::new(Budget { limit: usize::MAX, used: 0, spent: false })
    };
}

/// The memory budget of the loop's thread: bytes of storage in use.
#[derive(Clone, Copy)]
struct Budget {
    limit: usize,
    used: usize,
    /// Logged as spent, not yet as available again.
    spent: bool,
}

/// Sets the budget (`[host] max_mem=`) for buffers on this thread.
pub fn set_budget(limit: usize) {
    BUDGET.with(|b| {
        let mut v = b.get();
        v.limit = limit;
        b.set(v);
    });
}

/// Bytes of storage in use on this thread (buffers and what `charge` adds).
pub fn budget_used() -> usize {
    BUDGET.with(|b| b.get().used)
}

/// Whether the budget is spent: storage beyond the guaranteed is refused.
pub fn budget_spent() -> bool {
    BUDGET.with(|b| {
        let v = b.get();
        v.used >= v.limit
    })
}

/// Counts `n` more bytes (reply queues, and buffers' storage); with
/// `only_within`, only if the budget allows them (then true).
fn count(n: usize, only_within: bool) -> bool {
    BUDGET.with(|b| {
        let mut v = b.get();
        let after = v.used.saturating_add(n);
        if only_within && after > v.limit {
            if !v.spent {
                v.spent = true;
                b.set(v);
                warn!(
                    "memory budget spent ({} of max_mem={} bytes in buffers): \
                     connections read in {GUARANTEED}-byte steps until it frees",
                    v.used, v.limit
                );
            }
            return false;
        }
        v.used = after;
        b.set(v);
        true
    })
}

/// Counts `n` more bytes whatever the budget says (what is guaranteed).
pub fn charge(n: usize) {
    count(n, false);
}

/// `n` bytes counted before are given back.
pub fn refund(n: usize) {
    BUDGET.with(|b| {
        let mut v = b.get();
        v.used = v.used.saturating_sub(n);
        if v.spent && v.used <= v.limit / 4 * 3 {
            v.spent = false;
            info!(
                "memory budget available again ({} of max_mem={} bytes in buffers)",
                v.used, v.limit
            );
        }
        b.set(v);
    });
}

struct Spare {
    bufs: Vec<Box<[u8]>>,
    bytes: usize,
}

/// A buffer's storage: none, a chunk of the pool (the default size, see
/// `pool.rs` for why), or a box of any other size.
enum Storage {
    None,
    Chunk(Chunk),
    Boxed(Box<[u8]>),
}

impl Storage {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::None => &[],
            Storage::Chunk(c) => c.bytes(),
            Storage::Boxed(b) => b,
        }
    }

    #[inline(always)]
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::None => &mut [],
            Storage::Chunk(c) => c.bytes_mut(),
            Storage::Boxed(b) => b,
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        match self {
            Storage::None => 0,
            Storage::Chunk(_) => CHUNK,
            Storage::Boxed(b) => b.len(),
        }
    }
}

/// Storage of exactly `len` bytes: a pool chunk, a spare box, or a new box.
fn take(len: usize) -> Storage {
    if len == CHUNK
        && let Some(c) = Chunk::take()
    {
        return Storage::Chunk(c);
    }
    let reused = SPARE.with(|s| {
        let mut s = s.try_borrow_mut().ok()?;
        let i = s.bufs.iter().rposition(|b| b.len() == len)?;
        let b = s.bufs.swap_remove(i);
        s.bytes -= b.len();
        Some(b)
    });
    Storage::Boxed(reused.unwrap_or_else(|| vec![0; len].into_boxed_slice()))
}

/// Storage back: a chunk to the pool, a box to the spare list if it has
/// room (else freed); the budget counts it no more.
fn give_back(storage: Storage) {
    refund(storage.len());
    let Storage::Boxed(buf) = storage else {
        return; // a chunk goes back to the pool as it drops
    };
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
    buf: Storage,
    capacity: usize,
    start: usize,
    end: usize,
    /// Always takes storage of its whole capacity (a UDP datagram, a
    /// command line must fit in one piece).
    whole: bool,
}

impl Buffer {
    /// A buffer of `capacity` bytes; its storage is taken at the first
    /// read, as big as the memory budget allows (at least `GUARANTEED`).
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            buf: Storage::None,
            capacity,
            start: 0,
            end: 0,
            whole: false,
        }
    }

    /// A buffer whose storage is always its whole capacity.
    pub fn whole(capacity: usize) -> Buffer {
        let mut b = Buffer::new(capacity);
        b.whole = true;
        b
    }

    #[inline(always)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bytes waiting to be written.
    #[inline(always)]
    pub fn data(&self) -> &[u8] {
        self.buf
            .bytes()
            .get(self.start..self.end)
            .unwrap_or_default()
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// No room for another byte: the storage taken is full (it may be less
    /// than the capacity while the memory budget is spent).
    #[inline(always)]
    pub fn is_full(&self) -> bool {
        self.capacity == 0 || (self.holds_storage() && self.end - self.start == self.buf.len())
    }

    /// Whether storage is held.
    #[inline(always)]
    fn holds_storage(&self) -> bool {
        !matches!(self.buf, Storage::None)
    }

    /// One read into the free space: `read` gets at most `limit` bytes of it
    /// and returns how many it filled. The storage taken for it stays until
    /// `trim`, whatever `read` returns. A full buffer
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
        if let Ok(n) = got {
            self.fill(n);
        }
        got
    }

    /// Free space for the next read; moves waiting bytes to the front first
    /// (at most one buffer's worth), so the whole capacity is always usable.
    fn space(&mut self) -> &mut [u8] {
        if !self.holds_storage() && self.capacity > 0 {
            let size = if self.whole || self.capacity <= GUARANTEED || count(self.capacity, true) {
                if self.whole || self.capacity <= GUARANTEED {
                    charge(self.capacity);
                }
                self.capacity
            } else {
                charge(GUARANTEED);
                GUARANTEED
            };
            self.buf = take(size);
        }
        if self.start > 0 {
            self.buf.bytes_mut().copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.bytes_mut().get_mut(self.end..).unwrap_or_default()
    }

    /// Marks `n` bytes of `space()` as filled.
    #[inline(always)]
    fn fill(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Marks `n` bytes of `data()` as written.
    #[inline(always)]
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Gives the storage back if nothing waits (at the end of a turn).
    pub fn trim(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.holds_storage() {
                give_back(std::mem::replace(&mut self.buf, Storage::None));
            }
        }
    }

    /// Copies as much of `bytes` as fits in the whole capacity; returns how
    /// much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let whole = std::mem::replace(&mut self.whole, true);
        let space = self.space();
        let n = space.len().min(bytes.len());
        if let (Some(dst), Some(src)) = (space.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.fill(n);
        self.whole = whole;
        n
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.holds_storage() {
            give_back(std::mem::replace(&mut self.buf, Storage::None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Buffer, SPARE, SPARE_BYTES};
    use std::io;

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
        b.trim();
        assert!(!b.holds_storage());
        // A read that found nothing: space taken, nothing filled, given back
        // at the end of the turn.
        assert_eq!(b.read_with(usize::MAX, |_| Ok(0)).ok(), Some(0));
        assert!(b.holds_storage(), "kept within the turn");
        b.trim();
        assert!(!b.holds_storage());
        let err = b.read_with(usize::MAX, |_| Err(io::ErrorKind::WouldBlock.into()));
        assert!(err.is_err());
        b.trim();
        assert!(!b.holds_storage());
        assert_eq!(b.push(b"abc"), 3);
        assert!(b.holds_storage());
        b.consume(2);
        b.trim();
        assert!(b.holds_storage(), "a byte waits");
        assert_eq!(b.data(), b"c");
        b.consume(1);
        assert!(b.holds_storage() && b.is_empty());
        b.trim();
        assert!(!b.holds_storage());
        assert_eq!(b.push(&[7; 20]), 16, "the capacity stays fixed");
        assert!(b.is_full());
    }

    #[test]
    fn past_the_budget_big_buffers_get_the_guaranteed_storage() {
        // Each test runs on a thread of its own: its own budget.
        use super::{GUARANTEED, budget_spent, budget_used, set_budget};
        set_budget(100_000);
        let base = budget_used();
        let mut big = Buffer::new(64 * 1024);
        assert_eq!(big.push(&[1; 10]), 10, "push takes the whole capacity");
        assert_eq!(budget_used(), base + 64 * 1024);
        let mut second = Buffer::new(64 * 1024);
        // Reads get what the budget allows: the guaranteed storage only.
        let n = second
            .read_with(usize::MAX, |space| Ok(space.len()))
            .unwrap_or(0);
        assert_eq!(n, GUARANTEED);
        assert!(second.is_full(), "full at its storage: no more reading");
        assert_eq!(budget_used(), base + 64 * 1024 + GUARANTEED);
        // Whole buffers get their capacity, budget or not.
        let mut whole = Buffer::whole(50_000);
        let n = whole
            .read_with(usize::MAX, |space| Ok(space.len()))
            .unwrap_or(0);
        assert_eq!(n, 50_000);
        assert!(budget_spent());
        // Given back: room again, and the next read gets the whole capacity.
        drop(whole);
        big.consume(10);
        second.consume(GUARANTEED);
        big.trim();
        second.trim();
        assert_eq!(budget_used(), base);
        assert!(!budget_spent());
        let n = second
            .read_with(usize::MAX, |space| Ok(space.len()))
            .unwrap_or(0);
        assert_eq!(n, 64 * 1024);
        set_budget(usize::MAX);
    }

    #[test]
    fn spare_storage_is_reused_and_bounded() {
        let spare = || SPARE.with(|s| (s.borrow().bufs.len(), s.borrow().bytes));
        let before = spare();
        let mut a = Buffer::new(1000);
        a.push(b"x");
        a.consume(1);
        a.trim();
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
