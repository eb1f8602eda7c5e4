//! Storage for buffers of the default size (`CHUNK` = the default BLKS),
//! carved from slabs of `PER_SLAB` chunks, on the loop's thread.
//!
//! In scope: taking and giving back one chunk. Out of scope: what a buffer
//! does with it (`buffer.rs`), the memory budget (also `buffer.rs`).
//!
//! Why: the router's allocator (musl's mallocng) puts a 2048-byte request in
//! a 2336-byte slot inside groups it maps and unmaps as they fill and empty;
//! measured on the x86_64 musl build, a busy connection's two buffers cost
//! 7.5 KiB of RSS instead of 4 (glibc: 3.8). A slab of 64 chunks is one
//! 128 KiB allocation, which both allocators map whole: the chunks then cost
//! their size. A slab goes back to the allocator once all its chunks are
//! free and another slab has room.
//!
//! This is the one place besides the signal code with `unsafe`: a chunk is a
//! pointer into its slab, so that buffers can own disjoint pieces of one
//! allocation. The rules that keep it sound are stated at each block.

use std::cell::RefCell;
use std::ptr::NonNull;

/// Bytes in a chunk: the default BLKS, the size most buffers have.
pub const CHUNK: usize = crate::protocol::DEFAULT_BLKS;
/// Chunks in a slab: 128 KiB, above both allocators' mmap threshold.
const PER_SLAB: usize = 64;

/// `PER_SLAB * CHUNK` bytes from the allocator, owned through `base` (taken
/// from a leaked box, so that chunk pointers derive from one raw pointer and
/// no reference to the whole slab is ever made while chunks are out).
struct Slab {
    base: NonNull<u8>,
    /// Chunks of this slab not handed out.
    free: usize,
}

impl Slab {
    fn new() -> Slab {
        let mem = Box::into_raw(vec![0u8; CHUNK * PER_SLAB].into_boxed_slice());
        Slab {
            // A box's pointer is never null; `dangling` is never used.
            base: NonNull::new(mem.cast::<u8>()).unwrap_or(NonNull::dangling()),
            free: PER_SLAB,
        }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // A slab with chunks still out is left to the process (only at a
        // thread's end, if ever): their owners may still read them.
        if self.free == PER_SLAB {
            let mem = std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), CHUNK * PER_SLAB);
            // SAFETY: `base` came from `Box::into_raw` of a boxed slice of
            // exactly this length in `Slab::new`, and is freed only here,
            // once, with no chunk of it out.
            drop(unsafe { Box::from_raw(mem) });
        }
    }
}

#[derive(Default)]
struct Pool {
    /// `None`: a slab given back; its index is reused.
    slabs: Vec<Option<Slab>>,
    /// Free chunks: (slab, index in the slab).
    free: Vec<(usize, usize)>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// One chunk of `CHUNK` bytes, owned alone until dropped. Not `Send`: it must
/// go back to the pool of the thread that took it (a raw pointer keeps the
/// compiler to that).
pub struct Chunk {
    ptr: NonNull<u8>,
    slab: usize,
}

impl Chunk {
    /// A chunk from the pool (a new slab if none is free); `None` if the
    /// pool cannot be reached (the thread is ending).
    pub fn take() -> Option<Chunk> {
        POOL.try_with(|p| {
            let mut p = p.try_borrow_mut().ok()?;
            if p.free.is_empty() {
                let slab = Slab::new();
                let at = match p.slabs.iter().position(Option::is_none) {
                    Some(i) => {
                        p.slabs[i] = Some(slab);
                        i
                    }
                    None => {
                        p.slabs.push(Some(slab));
                        p.slabs.len() - 1
                    }
                };
                p.free.extend((0..PER_SLAB).rev().map(|i| (at, i)));
            }
            let (slab, index) = p.free.pop()?;
            let s = p.slabs.get_mut(slab)?.as_mut()?;
            if index >= PER_SLAB {
                return None;
            }
            s.free -= 1;
            // SAFETY: `index < PER_SLAB` (checked), so the offset stays
            // inside the slab's allocation.
            let ptr = unsafe { s.base.add(index * CHUNK) };
            Some(Chunk { ptr, slab })
        })
        .ok()
        .flatten()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points at CHUNK bytes inside a slab's memory, which
        // does not move and is not freed while any of its chunks is out
        // (`Slab`'s drop frees it only with all its chunks back). The free
        // list hands each chunk to one owner, so no other chunk covers these
        // bytes, and `&self` here excludes `bytes_mut` on this one.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), CHUNK) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), CHUNK) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let _ = POOL.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return;
            };
            let Some(s) = p.slabs.get_mut(self.slab).and_then(Option::as_mut) else {
                return;
            };
            let base = s.base.as_ptr() as usize;
            let index = (self.ptr.as_ptr() as usize).saturating_sub(base) / CHUNK;
            s.free += 1;
            let all_free = s.free == PER_SLAB;
            p.free.push((self.slab, index));
            // A slab with nothing out goes back, if another has room.
            if all_free && p.free.len() > PER_SLAB {
                let slab = self.slab;
                p.free.retain(|&(s, _)| s != slab);
                if let Some(gone) = p.slabs.get_mut(slab) {
                    *gone = None;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slabs() -> (usize, usize) {
        POOL.with(|p| {
            let p = p.borrow();
            (p.slabs.iter().flatten().count(), p.free.len())
        })
    }

    #[test]
    fn chunks_are_disjoint_and_slabs_go_back() {
        let mut chunks: Vec<Chunk> = (0..PER_SLAB * 2 + 1)
            .map(|_| Chunk::take().expect("a chunk"))
            .collect();
        assert_eq!(slabs().0, 3);
        for (i, c) in chunks.iter_mut().enumerate() {
            c.bytes_mut().fill(i as u8);
        }
        for (i, c) in chunks.iter().enumerate() {
            assert!(
                c.bytes().iter().all(|&b| b == i as u8),
                "chunk {i} overwritten"
            );
        }
        // All back: one slab kept (free chunks of only one slab), the rest freed.
        chunks.clear();
        let (live, free) = slabs();
        assert!(live <= 2, "{live} slabs kept");
        assert_eq!(free, live * PER_SLAB);
        let c = Chunk::take().expect("a chunk again");
        assert_eq!(c.bytes().len(), CHUNK);
    }
}
