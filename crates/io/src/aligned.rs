//! 4 KiB-aligned buffers and a budgeted pool of them.
//!
//! O_DIRECT reads need the destination address, the file offset and the length aligned to the device's logical
//! block size. [`ALIGN`] (4096) satisfies every block device pinion targets. [`BufferPool`] hands out
//! [`PoolBuf`]s and takes them back on drop, so that the memory held by reads in flight and by results the
//! caller has not yet dropped never exceeds the pool's byte budget.

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::PoolError;

/// Alignment of every buffer, file offset and read length used for direct I/O, in bytes.
pub const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`], or `None` on overflow.
pub(crate) fn align_up(n: usize) -> Option<usize> {
    n.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// Rounds `n` down to a multiple of [`ALIGN`].
pub(crate) fn align_down_u64(n: u64) -> u64 {
    n & !(ALIGN as u64 - 1)
}

/// A zero-initialised heap buffer whose address and capacity are multiples of [`ALIGN`].
///
/// The buffer is always fully initialised (it is zeroed when allocated), so it can be viewed as `&[u8]` at any
/// time; a read that fails leaves stale or zero bytes, never uninitialised memory.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Vec<u8>`); no other handle to the memory exists,
// so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: Shared references only give out `&[u8]`, which is safe to read from several threads at once.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of at least `len` bytes (rounded up to [`ALIGN`], and at least one block).
    ///
    /// Returns `None` if the size overflows or the allocator fails.
    pub fn new(len: usize) -> Option<AlignedBuf> {
        let cap = align_up(len.max(1))?;
        let layout = Layout::from_size_align(cap, ALIGN).ok()?;
        // SAFETY: `layout` has a non-zero size (cap >= ALIGN) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)?;
        Some(AlignedBuf { ptr, cap })
    }

    /// Capacity in bytes, a multiple of [`ALIGN`].
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The whole buffer as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap` initialised bytes owned by `self` (allocated zeroed in `new`), and the
        // returned borrow ties them to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: As in `as_slice`, and `&mut self` guarantees exclusive access for the borrow's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Raw pointer to the start of the buffer, for handing to the kernel. The caller must keep `self` alive and
    /// not touch the buffer through other paths while the kernel writes to it.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this layout (checked valid in `new`), and it
        // is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, ALIGN)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("capacity", &self.cap).finish()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// Counters of a [`BufferPool`], in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// The budget given at construction.
    pub budget: usize,
    /// Bytes currently allocated by the pool (in use plus idle).
    pub allocated: usize,
    /// Bytes currently lent out.
    pub in_use: usize,
    /// Highest value `allocated` has reached.
    pub peak_allocated: usize,
    /// Number of fresh allocations made so far (a steady state makes none).
    pub n_allocations: u64,
}

struct PoolState {
    /// Idle buffers by capacity.
    free: BTreeMap<usize, Vec<AlignedBuf>>,
    free_bytes: usize,
    stats: PoolStats,
    /// Threads waiting for a buffer; returns signal the condition variable only when there are some.
    n_waiting: usize,
}

struct PoolShared {
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that matters more
        // than losing the pool, so a poisoned lock is taken over rather than propagated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of [`AlignedBuf`]s with a hard byte budget.
///
/// Buffers come back to the pool when their [`PoolBuf`] is dropped and are reused by later requests of the same
/// or smaller size. The pool never holds more than its budget: when a request does not fit, idle buffers of
/// other sizes are freed first, and if that is not enough the request waits (or fails, for
/// [`try_acquire`](Self::try_acquire)) until buffers are returned. Cloning gives another handle to the same pool.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool").field("stats", &self.stats()).finish()
    }
}

impl BufferPool {
    /// Creates an empty pool that will never hold more than `budget` bytes (rounded down to [`ALIGN`]).
    pub fn new(budget: usize) -> BufferPool {
        let budget = budget & !(ALIGN - 1);
        BufferPool {
            shared: Arc::new(PoolShared {
                state: Mutex::new(PoolState {
                    free: BTreeMap::new(),
                    free_bytes: 0,
                    stats: PoolStats { budget, ..PoolStats::default() },
                    n_waiting: 0,
                }),
                returned: Condvar::new(),
            }),
        }
    }

    /// The pool's byte budget.
    pub fn budget(&self) -> usize {
        self.shared.lock().stats.budget
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats
    }

    /// Frees every idle buffer. For a caller about to hold many buffers at once (a whole layer's reads): idle
    /// buffers up to twice a request's size are reused for it, so a pool full of idle large buffers would lend
    /// them to smaller requests and run out of budget before the last of them.
    pub fn release_idle(&self) {
        let mut st = self.shared.lock();
        let idle = std::mem::take(&mut st.free);
        st.stats.allocated -= st.free_bytes;
        st.free_bytes = 0;
        drop(st);
        drop(idle);
    }

    /// Takes a buffer of at least `len` bytes, waiting as long as needed for other buffers to be returned.
    pub fn acquire(&self, len: usize) -> Result<PoolBuf, PoolError> {
        loop {
            if let Some(buf) = self.acquire_timeout(len, Duration::from_secs(3600))? {
                return Ok(buf);
            }
        }
    }

    /// Takes a buffer of at least `len` bytes if one fits in the budget now.
    pub fn try_acquire(&self, len: usize) -> Result<Option<PoolBuf>, PoolError> {
        self.acquire_timeout(len, Duration::ZERO)
    }

    /// Takes a buffer of at least `len` bytes, waiting at most `timeout` for room; `Ok(None)` on timeout.
    pub fn acquire_timeout(&self, len: usize, timeout: Duration) -> Result<Option<PoolBuf>, PoolError> {
        let cap = align_up(len.max(1)).ok_or(PoolError::TooLarge { requested: len, budget: usize::MAX })?;
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        if cap > st.stats.budget {
            return Err(PoolError::TooLarge { requested: len, budget: st.stats.budget });
        }
        loop {
            // Best fit among idle buffers: the smallest one that is large enough. Buffers more than twice the
            // size asked for are not used, so that small reads cannot pin down large buffers.
            let fit = st.free.range(cap..).next().map(|(&c, _)| c).filter(|&c| c <= cap.saturating_mul(2));
            if let Some(c) = fit {
                let buf = take_free(&mut st, c);
                st.stats.in_use += buf.capacity();
                return Ok(Some(PoolBuf { buf: Some(buf), pool: self.shared.clone() }));
            }
            let room = st.stats.budget - st.stats.in_use;
            if cap <= room {
                // Free idle buffers (largest first) until the new one fits under the budget.
                while st.stats.allocated + cap > st.stats.budget {
                    let Some((&c, _)) = st.free.iter().next_back() else { break };
                    let old = take_free(&mut st, c);
                    st.stats.allocated -= old.capacity();
                    drop(old);
                }
                st.stats.allocated += cap;
                st.stats.in_use += cap;
                st.stats.peak_allocated = st.stats.peak_allocated.max(st.stats.allocated);
                st.stats.n_allocations += 1;
                drop(st);
                let Some(buf) = AlignedBuf::new(cap) else {
                    let mut st = self.shared.lock();
                    st.stats.allocated -= cap;
                    st.stats.in_use -= cap;
                    let wake = st.n_waiting > 0;
                    drop(st);
                    if wake {
                        self.shared.returned.notify_all();
                    }
                    return Err(PoolError::AllocFailed { bytes: cap });
                };
                return Ok(Some(PoolBuf { buf: Some(buf), pool: self.shared.clone() }));
            }
            let now = Instant::now();
            let wait = match deadline {
                Some(d) if d > now => d - now,
                Some(_) => return Ok(None),
                None => Duration::from_secs(3600),
            };
            st.n_waiting += 1;
            st = self.shared.returned.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0;
            st.n_waiting -= 1;
        }
    }
}

fn take_free(st: &mut PoolState, cap: usize) -> AlignedBuf {
    let list = st.free.get_mut(&cap).expect("free-list key present");
    let buf = list.pop().expect("free lists are never left empty");
    if list.is_empty() {
        st.free.remove(&cap);
    }
    st.free_bytes -= cap;
    buf
}

/// A buffer lent by a [`BufferPool`]; it goes back to the pool when dropped.
pub struct PoolBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<PoolShared>,
}

impl PoolBuf {
    fn inner(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("PoolBuf holds its buffer until drop")
    }

    fn inner_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("PoolBuf holds its buffer until drop")
    }

    /// Capacity in bytes, a multiple of [`ALIGN`].
    pub fn capacity(&self) -> usize {
        self.inner().capacity()
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.inner_mut().as_mut_ptr()
    }
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuf").field("capacity", &self.capacity()).finish()
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.inner().as_slice()
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.inner_mut().as_mut_slice()
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut st = self.pool.lock();
            let cap = buf.capacity();
            st.stats.in_use -= cap;
            st.free_bytes += cap;
            st.free.entry(cap).or_default().push(buf);
            let wake = st.n_waiting > 0;
            drop(st);
            if wake {
                self.pool.returned.notify_all();
            }
        }
    }
}

/// Bounds the memory the C allocator keeps for itself, for a run under a memory budget:
/// - blocks of 64 KiB and more are mapped and unmapped on their own (glibc's `M_MMAP_THRESHOLD`, which glibc
///   otherwise raises as the program frees large blocks, after which they are carved from a heap that keeps its
///   pages), so I/O and staging buffers freed once do not stay in the resident set;
/// - one arena for all threads (`M_ARENA_MAX`): small blocks freed by one worker are reused by the others
///   instead of each worker's arena keeping its own free pages;
/// - the free pages the heap holds now (what loading a model allocated and dropped) are given back
///   (`malloc_trim`), so the resident set measured next is what the run keeps.
///
/// Returns whether the settings were applied (only on glibc).
pub fn bound_heap_retention() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes tuning parameters of glibc's allocator and malloc_trim only returns free
        // pages of its heaps to the system; both are thread-safe (they take the allocator's own locks) and do not
        // touch any memory the program holds.
        unsafe {
            let applied = libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1;
            libc::malloc_trim(0);
            applied
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.capacity() % ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn pool_reuses_and_respects_budget() {
        let pool = BufferPool::new(4 * ALIGN);
        let a = pool.acquire(ALIGN).unwrap();
        let b = pool.acquire(2 * ALIGN).unwrap();
        assert_eq!(pool.stats().in_use, 3 * ALIGN);
        assert!(pool.try_acquire(2 * ALIGN).unwrap().is_none(), "would exceed the budget");
        let c = pool.try_acquire(ALIGN).unwrap().unwrap();
        drop((a, c));
        // Both idle 4 KiB buffers get freed to make room for the 8 KiB one.
        let d = pool.try_acquire(2 * ALIGN).unwrap().unwrap();
        let s = pool.stats();
        assert!(s.allocated <= s.budget && s.peak_allocated <= s.budget, "{s:?}");
        drop((b, d));
        let n = pool.stats().n_allocations;
        for _ in 0..10 {
            let x = pool.acquire(2 * ALIGN).unwrap();
            let y = pool.acquire(2 * ALIGN).unwrap();
            drop((x, y));
        }
        assert_eq!(pool.stats().n_allocations, n, "steady state reuses buffers");
        assert_eq!(pool.stats().in_use, 0);
        assert!(matches!(pool.acquire(5 * ALIGN), Err(PoolError::TooLarge { .. })));
    }

    /// Idle buffers up to twice a request's size are lent to it: a pool left full of idle large buffers runs
    /// out of budget before smaller requests that fit it together are all served, unless its idle buffers are
    /// released first (what a caller about to hold a whole layer's reads does).
    #[test]
    fn releasing_idle_buffers_lets_smaller_requests_fill_the_budget() {
        let pool = BufferPool::new(8 * ALIGN);
        let big: Vec<PoolBuf> = (0..4).map(|_| pool.acquire(2 * ALIGN).unwrap()).collect();
        drop(big);
        assert_eq!((pool.stats().allocated, pool.stats().in_use), (8 * ALIGN, 0));
        let held: Vec<Option<PoolBuf>> = (0..8).map(|_| pool.try_acquire(ALIGN).unwrap()).collect();
        assert_eq!(held.iter().filter(|b| b.is_some()).count(), 4, "each took an idle 8 KiB buffer");
        drop(held);
        pool.release_idle();
        assert_eq!(pool.stats().allocated, 0);
        let held: Vec<PoolBuf> = (0..8).map(|_| pool.try_acquire(ALIGN).unwrap().unwrap()).collect();
        assert_eq!(pool.stats().in_use, 8 * ALIGN);
        drop(held);
    }

    #[test]
    fn acquire_waits_for_a_returned_buffer() {
        let pool = BufferPool::new(ALIGN);
        let held = pool.acquire(ALIGN).unwrap();
        assert!(pool.acquire_timeout(ALIGN, Duration::from_millis(10)).unwrap().is_none());
        let p2 = pool.clone();
        let t = std::thread::spawn(move || p2.acquire(ALIGN).map(|b| b.capacity()));
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert_eq!(t.join().unwrap().unwrap(), ALIGN);
    }
}
