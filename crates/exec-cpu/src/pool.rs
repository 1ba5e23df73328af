//! [`SpinPool`]: a small thread pool for decode, whose workers spin between jobs instead of sleeping.
//!
//! A decode step of a small model is a few hundred short parallel operations (one matrix-vector product takes
//! tens of microseconds). A work-stealing pool that parks idle threads pays a futex wake-up per operation,
//! which is what kept two threads from being twice as fast as one; ggml avoids it with threads that spin on
//! an atomic between operations, and so does this pool. Workers spin for a bounded time and then block on a
//! condition variable, so an idle process (say, a chat waiting for input) does not burn a core.
//!
//! The job is a borrowed closure `Fn(thread_idx, n_threads)`: [`SpinPool::run`] runs it on every worker and on
//! the calling thread, and returns when all are done, which is what makes lending the closure to the workers
//! sound.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Busy spins before a waiting thread starts yielding its core at each check. Pure spinning is fastest when
/// every thread has a core; when the machine is oversubscribed (a build running beside pinion) a spinning
/// waiter would hold a core that the thread it waits for needs, so after this it calls `sched_yield`.
const SPINS_BEFORE_YIELD: u32 = 1 << 10;
/// Checks (spins, then yields) before a worker blocks on the condition variable: about a millisecond. Decode
/// operations follow each other within microseconds, so this costs the in-memory decode nothing, while an
/// offloaded decode, whose threads also wait for reads, gives the I/O thread its core back sooner (SmolLM2 at a
/// 46.9 MiB budget, 2 threads: 12.3 -> 13.1 t/s with 1 << 11 instead of 1 << 16).
const SPINS_BEFORE_SLEEP: u32 = 1 << 11;

/// One step of waiting: a spin hint while `spins` is small, a yield of the core after that.
#[inline]
fn backoff(spins: u32) {
    if spins < SPINS_BEFORE_YIELD {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    n_threads: usize,
    /// Bumped once per job; workers run the job when they see a new value.
    epoch: AtomicUsize,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// The current job, valid from an epoch bump until `done` reaches `n_threads - 1`.
    job: UnsafeCell<Option<*const Job>>,
    /// Workers blocked on `wake`.
    sleepers: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is written only by `run` before it publishes a new epoch (Release) and read by workers only
// after they observe that epoch (Acquire) and before they increment `done`; `run` does not write it again
// until every worker has incremented `done` (Acquire). The pointee is `Sync`. Every other field is a
// synchronization primitive.
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; the raw pointer is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

/// A fixed set of threads that run borrowed closures, spinning between jobs.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes `run` calls from different threads.
    running: Mutex<()>,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinPool").field("n_threads", &self.shared.n_threads).finish()
    }
}

impl SpinPool {
    /// A pool of `n_threads` threads in all: the caller of [`SpinPool::run`] plus `n_threads - 1` workers.
    pub fn new(n_threads: usize) -> std::io::Result<SpinPool> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            n_threads,
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(n_threads - 1);
        for idx in 1..n_threads {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("pinion-spin-{idx}"))
                    .spawn(move || worker(&s, idx))?,
            );
        }
        Ok(SpinPool { shared, workers, running: Mutex::new(()) })
    }

    /// Threads that run each job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_idx, n_threads)` once on each thread of the pool (index 0 on the caller) and returns when
    /// all calls have returned.
    ///
    /// # Panics
    /// If any call of `f` panicked.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let s = &*self.shared;
        if s.n_threads == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erasing the lifetime is sound because this function does not return before every worker has
        // finished with the job (the `done` wait below), and workers never touch the pointer after that.
        let job: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f) };
        // SAFETY: no worker reads `job` now: the previous job is finished (`done` was complete) and the new
        // epoch is not yet published.
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, s.n_threads)));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < s.n_threads - 1 {
            backoff(spins);
            spins = spins.saturating_add(1);
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a SpinPool job panicked on a worker thread");
        }
    }
}

fn worker(s: &Shared, idx: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen || s.shutdown.load(Ordering::Acquire) {
                break e;
            }
            spins += 1;
            if spins < SPINS_BEFORE_SLEEP {
                backoff(spins);
                continue;
            }
            let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
            spins = 0;
        };
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = epoch;
        // SAFETY: the epoch was published after `job` was written (Acquire pairs with run's Release), and `run`
        // keeps the closure alive until this worker increments `done` below.
        let job = unsafe { (*s.job.get()).expect("a published job") };
        // SAFETY: as above: the pointee outlives this call.
        let f = unsafe { &*job };
        if catch_unwind(AssertUnwindSafe(|| f(idx, s.n_threads))).is_err() {
            s.panicked.store(true, Ordering::Release);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _sleepers = self.shared.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The `idx`-th of `n` contiguous parts of `0..len`, with part boundaries on multiples of `align`.
pub fn split_range(len: usize, idx: usize, n: usize, align: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(align);
    let (q, r) = (units / n, units % n);
    let start = idx * q + idx.min(r);
    let end = start + q + usize::from(idx < r);
    (start * align).min(len)..(end * align).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_thread_runs_each_job_once() {
        for n in [1, 2, 3] {
            let pool = SpinPool::new(n).unwrap();
            for round in 0..2000u64 {
                let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                pool.run(&|idx, nt| {
                    assert_eq!(nt, n);
                    hits[idx].fetch_add(round + 1, Ordering::Relaxed);
                });
                for h in &hits {
                    assert_eq!(h.load(Ordering::Relaxed), round + 1);
                }
            }
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicU64::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let pool = SpinPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|idx, _| {
                if idx == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let count = AtomicU64::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn split_range_partitions() {
        for len in [0, 1, 7, 8, 9, 100, 576, 1536] {
            for n in 1..5 {
                let parts: Vec<_> = (0..n).map(|i| split_range(len, i, n, 8)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[n - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].end == len || w[0].end % 8 == 0);
                }
            }
        }
    }
}
