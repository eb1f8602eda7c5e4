//! A fixed-size byte buffer: the one place bytes wait between a read from
//! one socket and a write to the other.
//!
//! In scope: `data` (what is waiting), `space` (where the next read lands),
//! `fill` and `consume` to move the two marks. Out of scope: sockets, and
//! growing: the capacity is set at creation (BLKS, PROTOCOL.md "CONN") and
//! never changes, so a connection's memory is known the moment it starts.

/// Bytes `start..end` of `buf` are waiting; `end..` is free space.
pub struct Buffer {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
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
        self.len() == self.capacity()
    }

    /// Free space for the next read; moves waiting bytes to the front first
    /// (at most one buffer's worth), so the whole capacity is always usable.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Marks `n` bytes of `space()` as filled.
    pub fn fill(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Marks `n` bytes of `data()` as written.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Copies as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let space = self.space();
        let n = space.len().min(bytes.len());
        if let (Some(dst), Some(src)) = (space.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.fill(n);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::Buffer;

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
}
