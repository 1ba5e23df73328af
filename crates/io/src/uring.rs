//! Backend 1: one submission thread driving an io_uring.
//!
//! The thread owns the ring. It drains the request channel, takes a pool buffer for each read, pushes as many
//! reads as there are free slots (the queue depth), submits them with one `io_uring_enter`, and waits for at
//! least one completion only when there is nothing new to submit. Completions are handled in the order the
//! kernel posts them: a finished read is delivered at once; EINTR, EAGAIN and short reads are resubmitted for
//! the remaining bytes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{IoUring, Probe, opcode, types};

use crate::aligned::PoolBuf;
use crate::engine::{Completion, ReadOp, Shared, Step};
use crate::error::{FallbackReason, ReadErrorKind};

/// `user_data` of the poll on the wake-up eventfd; read slots use their index, which is always smaller.
const WAKE_TAG: u64 = u64::MAX;

/// Wakes the submission thread when it sleeps in `io_uring_enter` waiting for completions and new requests
/// arrive: the ring holds a poll on an eventfd, and submitters write to the eventfd only when the thread has said
/// it is about to sleep, so a busy thread costs them no system call.
pub(crate) struct Waker {
    efd: File,
    sleeping: AtomicBool,
}

impl Waker {
    fn new() -> std::io::Result<Waker> {
        // SAFETY: `eventfd` has no memory-safety preconditions; it returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let efd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Waker { efd, sleeping: AtomicBool::new(false) })
    }

    /// Called by submitters after queueing requests.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `run`: either the thread sees the new request before sleeping, or this sees
        // `sleeping` and writes the eventfd, which completes the poll and wakes the thread.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // EAGAIN (counter saturated) means a wake-up is already pending.
            let _ = (&self.efd).write(&1u64.to_ne_bytes());
        }
    }

    fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.efd).read(&mut b);
    }
}

/// Creates a ring with room for `depth` reads and the wake-up poll, and checks that it supports reads.
///
/// It asks for cooperative task work (Linux 5.19: completions are not signalled to the thread by interrupting
/// it), falling back to no flags. `IORING_SETUP_DEFER_TASKRUN` was measured and rejected: on the 2-vCPU VM of
/// docs/perf.md it cost 15-20% of 4 KiB random-read IOPS at depth 32, as completions then wait for this thread
/// to enter the kernel.
fn setup(depth: usize) -> Result<(IoUring, Arc<Waker>), FallbackReason> {
    let setup_err =
        |e: &std::io::Error| FallbackReason::IoUringSetup { errno: e.raw_os_error().unwrap_or(libc::ENOSYS) };
    let entries = depth as u32 + 1;
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| setup_err(&e))?;
    let mut probe = Probe::new();
    // Kernels without the probe interface (before 5.6) also lack IORING_OP_READ.
    if ring.submitter().register_probe(&mut probe).is_err()
        || !probe.is_supported(opcode::Read::CODE)
        || !probe.is_supported(opcode::PollAdd::CODE)
    {
        return Err(FallbackReason::ReadOpUnsupported);
    }
    let waker = Waker::new().map_err(|e| setup_err(&e))?;
    Ok((ring, Arc::new(waker)))
}

/// Why [`spawn`] failed.
pub(crate) enum SpawnError {
    /// The ring could not be set up (so the pread backend should be used).
    Setup(FallbackReason),
    /// The thread could not be started.
    Thread(std::io::Error),
}

/// Starts the submission thread, which sets up its ring (so that the ring's single issuer is that thread) and
/// reports the outcome before serving requests.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: Receiver<ReadOp>,
    tx: Sender<Completion>,
    depth: usize,
) -> Result<(JoinHandle<()>, Arc<Waker>), SpawnError> {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let t = std::thread::Builder::new()
        .name("pinion-io-uring".into())
        .spawn(move || match setup(depth) {
            Ok((ring, waker)) => {
                let _ = ready_tx.send(Ok(waker.clone()));
                run(ring, shared, waker, rx, tx, depth);
            }
            Err(reason) => {
                let _ = ready_tx.send(Err(reason));
            }
        })
        .map_err(SpawnError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(waker)) => Ok((t, waker)),
        Ok(Err(reason)) => {
            let _ = t.join();
            Err(SpawnError::Setup(reason))
        }
        Err(_) => {
            let _ = t.join();
            Err(SpawnError::Setup(FallbackReason::IoUringSetup { errno: libc::EFAULT }))
        }
    }
}

/// Arms the poll on the wake-up eventfd.
fn arm_wake(ring: &mut IoUring, waker: &Waker) -> std::io::Result<()> {
    let entry = opcode::PollAdd::new(types::Fd(waker.efd.as_raw_fd()), libc::POLLIN as u32)
        .build()
        .user_data(WAKE_TAG);
    loop {
        // SAFETY: A poll entry references no user memory; the eventfd lives in `waker`, which the thread holds
        // for as long as the ring exists.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        submit(ring, 0)?;
    }
}

/// How a reaped read ended: its buffer, or where and why it failed.
type Outcome = Result<PoolBuf, (u64, ReadErrorKind)>;

/// A read the kernel may be writing into. Its buffer must stay alive, and untouched, until the read's
/// completion has been reaped.
struct Slot {
    op: ReadOp,
    buf: PoolBuf,
}

/// Pushes the read of `slot`'s remaining bytes, tagged with `idx`, submitting first if the queue is full.
fn push_read(ring: &mut IoUring, fd: types::Fd, idx: usize, slot: &mut Slot) -> std::io::Result<()> {
    let done = slot.op.done;
    let len = (slot.op.len - done) as u32;
    // SAFETY: `done < op.len <= buf.capacity()` (the buffer was taken for `op.len` bytes and `done` only grows
    // up to `op.len`, after which the read is finished and never pushed again), so the pointer stays inside the
    // allocation.
    let ptr = unsafe { slot.buf.as_mut_ptr().add(done) };
    let entry =
        opcode::Read::new(fd, ptr, len).offset(slot.op.offset + done as u64).build().user_data(idx as u64);
    loop {
        // SAFETY: The entry points to `len` writable bytes of `slot.buf`. The slot stays in the slot table, and
        // its buffer is neither read nor freed, until the completion tagged `idx` is reaped; if the ring breaks
        // down before that, the buffer is leaked rather than freed (see `run`). The file descriptor belongs to
        // `Shared::file`, which outlives this thread.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        // The submission queue is full: hand its entries to the kernel and try again.
        submit(ring, 0)?;
    }
}

/// `io_uring_enter`, retrying on EINTR; EBUSY/EAGAIN (completion queue pressure) count as success, since the
/// caller reaps completions next.
fn submit(ring: &mut IoUring, want: usize) -> std::io::Result<()> {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The submission thread's loop; returns when the request channel is closed and nothing is in flight.
fn run(
    mut ring: IoUring,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    rx: Receiver<ReadOp>,
    tx: Sender<Completion>,
    depth: usize,
) {
    let fd = types::Fd(shared.file.as_raw_fd());
    let mut fatal = arm_wake(&mut ring, &waker).err();
    let mut slots: Vec<Option<Slot>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut pending: VecDeque<ReadOp> = VecDeque::new();
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(depth * 2);
    // Reads reaped but not yet delivered: they are delivered after the freed slots have been refilled and
    // submitted, so the device queue is topped up before this thread wakes a consumer (which may then take
    // this CPU).
    let mut finished: Vec<(ReadOp, Outcome)> = Vec::with_capacity(depth);
    let mut open = true;
    let wake_below = (depth / 4).max(1);
    loop {
        // Gather requests, blocking only when there is nothing else to do.
        if free.len() == depth && pending.is_empty() && finished.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(op) => pending.push_back(op),
                Err(_) => {
                    open = false;
                    continue;
                }
            }
        }
        while open {
            match rx.try_recv() {
                Ok(op) => pending.push_back(op),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }

        // Fill free slots.
        let mut pool_blocked = false;
        while let (Some(&idx), Some(op)) = (free.last(), pending.front()) {
            let buf = match shared.pool.try_acquire(op.len) {
                Ok(Some(b)) => b,
                Ok(None) if free.len() < depth || !finished.is_empty() => {
                    // Completions will return buffers (once the caller drops them); wait for those, or deliver
                    // the finished reads first, instead of blocking here while holding their buffers.
                    pool_blocked = true;
                    break;
                }
                Ok(None) => match shared.acquire_blocking(op) {
                    Some(Ok(b)) => b,
                    Some(Err(kind)) => {
                        let op = pending.pop_front().expect("front exists");
                        let at = op.offset;
                        shared.finish(op, Err((at, kind)), &tx);
                        continue;
                    }
                    None => {
                        // Shutting down with the pool exhausted: nobody is left to receive these.
                        pending.clear();
                        break;
                    }
                },
                Err(e) => {
                    let op = pending.pop_front().expect("front exists");
                    let at = op.offset;
                    shared.finish(op, Err((at, ReadErrorKind::Pool(e))), &tx);
                    continue;
                }
            };
            let op = pending.pop_front().expect("front exists");
            free.pop();
            let slot = slots[idx].insert(Slot { op, buf });
            shared.stats.issue();
            if let Err(e) = push_read(&mut ring, fd, idx, slot) {
                fatal = Some(e);
                break;
            }
        }

        if fatal.is_none() && free.len() < depth {
            let mut want = usize::from(finished.is_empty());
            let in_flight = depth - free.len();
            if !pool_blocked && !free.is_empty() && in_flight < wake_below {
                // Free slots and buffers, and few reads in flight: sleep only if no request is waiting, and
                // announce it first (see `Waker`). With many reads in flight the next completion comes soon
                // and new requests are picked up then, which saves submitters a system call and this thread a
                // wake-up per request.
                waker.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if !pending.is_empty() || !rx.is_empty() {
                    want = 0;
                }
            }
            fatal = submit(&mut ring, want).err();
            waker.sleeping.store(false, Ordering::SeqCst);
        }
        if let Some(e) = fatal {
            // The ring is unusable. Fail every read it holds and leak their buffers: the kernel may still own
            // some of them, and freeing memory it could write into would be unsound.
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            for (op, outcome) in finished.drain(..) {
                shared.finish(op, outcome, &tx);
            }
            for slot in slots.iter_mut().filter_map(Option::take) {
                let Slot { op, buf } = slot;
                std::mem::forget(buf);
                shared.stats.retire();
                let at = op.offset + op.done as u64;
                shared.finish(op, Err((at, ReadErrorKind::Os { errno })), &tx);
            }
            for op in pending.drain(..).chain(rx.try_iter()) {
                let at = op.offset;
                shared.finish(op, Err((at, ReadErrorKind::Os { errno })), &tx);
            }
            return;
        }
        for (op, outcome) in finished.drain(..) {
            shared.finish(op, outcome, &tx);
        }
        if free.len() == depth {
            continue;
        }

        // Reap completions in the order the kernel posted them.
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(tag, res) in &cqes {
            if tag == WAKE_TAG {
                waker.drain();
                if let Err(e) = arm_wake(&mut ring, &waker) {
                    fatal = Some(e);
                }
                continue;
            }
            let idx = tag as usize;
            let slot = slots[idx].as_mut().expect("completion for an occupied slot");
            let at = slot.op.offset + slot.op.done as u64;
            match slot.op.advance(shared.faults.apply(at, i64::from(res)), &shared.stats) {
                Step::Again => {
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = push_read(&mut ring, fd, idx, slot) {
                        let Slot { op, buf } = slots[idx].take().expect("occupied");
                        // The entry was never queued, so the kernel does not own the buffer.
                        drop(buf);
                        free.push(idx);
                        shared.stats.retire();
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        finished.push((op, Err((at, ReadErrorKind::Os { errno }))));
                    }
                }
                Step::Done => {
                    let Slot { op, buf } = slots[idx].take().expect("occupied");
                    free.push(idx);
                    shared.stats.retire();
                    finished.push((op, Ok(buf)));
                }
                Step::Failed(at, kind) => {
                    let Slot { op, buf } = slots[idx].take().expect("occupied");
                    drop(buf);
                    free.push(idx);
                    shared.stats.retire();
                    finished.push((op, Err((at, kind))));
                }
            }
        }
    }
}
