//! The read engine: requests, coalescing, completions, and the machinery shared by both backends.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Deref;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::aligned::{ALIGN, BufferPool, PoolBuf, align_down_u64, align_up};
use crate::error::{FallbackReason, OpenError, ReadError, ReadErrorKind, SubmitError};
use crate::stats::{IoStats, Stats};

/// Default number of reads kept in flight.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;
/// Default byte budget of the engine's buffer pool.
pub const DEFAULT_POOL_BYTES: usize = 64 << 20;
/// Default largest read that adjacent requests are merged into.
pub const DEFAULT_COALESCE_LIMIT: usize = 128 << 10;
/// How many times a read is retried after EINTR/EAGAIN before giving up.
pub(crate) const MAX_RETRIES: u32 = 64;

/// One read: `len` bytes at file `offset`, identified by the caller's `tag` in its [`Completion`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// File offset in bytes (any alignment).
    pub offset: u64,
    /// Length in bytes (any alignment, may be zero).
    pub len: usize,
    /// Opaque caller tag, returned with the completion.
    pub tag: u64,
}

/// The bytes of one completed request: a view into a 4 KiB-aligned pool buffer, exactly the range asked for.
///
/// Cloning is cheap (a reference count). The buffer goes back to the engine's pool when the last view of it is
/// dropped (requests coalesced into one read share one buffer).
#[derive(Clone)]
pub struct ReadBuf {
    buf: Arc<PoolBuf>,
    start: usize,
    len: usize,
    offset: u64,
}

impl ReadBuf {
    /// File offset of the first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBuf").field("offset", &self.offset).field("len", &self.len).finish()
    }
}

/// The outcome of one [`ReadRequest`], delivered on [`IoEngine::completions`] in completion order.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// The bytes, or why they could not be read.
    pub result: Result<ReadBuf, ReadError>,
}

/// The backend an engine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// One submission thread driving an io_uring.
    IoUring,
    /// A pool of threads doing blocking `pread(2)`.
    Pread,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io_uring",
            Backend::Pread => "pread",
        })
    }
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// io_uring with O_DIRECT where possible, otherwise the pread pool; see [`IoEngine::fallback_reason`].
    Auto,
    /// io_uring with O_DIRECT, or fail to open.
    IoUring,
    /// The pread pool (O_DIRECT where the file system allows it).
    Pread,
}

/// Configures and opens an [`IoEngine`].
#[derive(Clone, Debug)]
pub struct IoEngineBuilder {
    path: PathBuf,
    backend: BackendChoice,
    queue_depth: usize,
    pool_bytes: usize,
    coalesce_limit: usize,
    direct: bool,
    simulate_setup_failure: Option<i32>,
    simulate_direct_refused: bool,
}

impl IoEngineBuilder {
    /// Starts a configuration for reading `path` with the defaults: automatic backend, queue depth
    /// [`DEFAULT_QUEUE_DEPTH`], a pool of [`DEFAULT_POOL_BYTES`], coalescing up to [`DEFAULT_COALESCE_LIMIT`],
    /// O_DIRECT on.
    pub fn new(path: impl Into<PathBuf>) -> IoEngineBuilder {
        IoEngineBuilder {
            path: path.into(),
            backend: BackendChoice::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            pool_bytes: DEFAULT_POOL_BYTES,
            coalesce_limit: DEFAULT_COALESCE_LIMIT,
            direct: true,
            simulate_setup_failure: None,
            simulate_direct_refused: false,
        }
    }

    /// Selects the backend.
    pub fn backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }

    /// Reads kept in flight: the io_uring queue depth, or the number of pread threads.
    pub fn queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// Byte budget of the buffer pool that holds reads in flight and completions not yet dropped.
    pub fn pool_bytes(mut self, bytes: usize) -> Self {
        self.pool_bytes = bytes;
        self
    }

    /// Largest read that adjacent requests of one [`IoEngine::submit_batch`] are merged into; 0 disables merging.
    pub fn coalesce_limit(mut self, bytes: usize) -> Self {
        self.coalesce_limit = bytes;
        self
    }

    /// Whether to bypass the page cache with O_DIRECT (default on). With it off, reads are buffered.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// Makes io_uring setup fail with `errno`, as a kernel without io_uring or a seccomp filter would, so the
    /// fallback path can be tested.
    #[doc(hidden)]
    pub fn simulate_io_uring_setup_failure(mut self, errno: i32) -> Self {
        self.simulate_setup_failure = Some(errno);
        self
    }

    /// Makes the O_DIRECT open fail with EINVAL, as on file systems without direct I/O (tmpfs before Linux
    /// 6.6, some FUSE and network file systems), so the fallback path can be tested.
    #[doc(hidden)]
    pub fn simulate_direct_io_refused(mut self) -> Self {
        self.simulate_direct_refused = true;
        self
    }

    /// Opens the file and starts the backend's threads.
    pub fn build(self) -> Result<IoEngine, OpenError> {
        IoEngine::open_with(self)
    }
}

/// A piece of a coalesced read that belongs to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) tag: u64,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    /// Offset of the request's first byte within the read's buffer.
    pub(crate) start: usize,
}

/// One aligned read covering one or more requests, with its progress.
#[derive(Debug)]
pub(crate) struct ReadOp {
    /// Aligned file offset of the read.
    pub(crate) offset: u64,
    /// Aligned length of the read.
    pub(crate) len: usize,
    pub(crate) parts: Vec<Part>,
    pub(crate) submitted: Instant,
    /// Bytes read so far.
    pub(crate) done: usize,
    /// Retries so far (EINTR/EAGAIN/short reads).
    pub(crate) attempts: u32,
}

/// What to do after a system call for a [`ReadOp`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read again from `op.offset + op.done`.
    Again,
    /// Finished; the first `op.done` bytes of the buffer are valid.
    Done,
    /// Failed at the given file offset.
    Failed(u64, ReadErrorKind),
}

impl ReadOp {
    /// Bytes from the buffer start that the requests need.
    pub(crate) fn needed(&self) -> usize {
        self.parts.iter().map(|p| p.start + p.len).max().unwrap_or(0)
    }

    /// Accounts for a system call result (`res` bytes, or `-errno`) and says what comes next.
    pub(crate) fn advance(&mut self, res: i64, stats: &Stats) -> Step {
        let at = self.offset + self.done as u64;
        if res > 0 {
            self.done += res as usize;
            stats.bytes_read.fetch_add(res as u64, Ordering::Relaxed);
            if self.done >= self.len || self.done >= self.needed() {
                return Step::Done;
            }
            // A short read: continue where it stopped.
            return self.retry(at);
        }
        if res == 0 {
            // End of file. Whatever is needed and not read is reported per request in `finish`.
            return Step::Done;
        }
        let errno = (-res) as i32;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            return self.retry(at);
        }
        Step::Failed(at, ReadErrorKind::Os { errno })
    }

    fn retry(&mut self, at: u64) -> Step {
        self.attempts += 1;
        if self.attempts > MAX_RETRIES {
            return Step::Failed(at, ReadErrorKind::RetriesExhausted { attempts: self.attempts });
        }
        Step::Again
    }
}

/// Groups requests into aligned reads, merging requests whose aligned ranges touch or overlap while the merged
/// read stays within `limit` bytes.
pub(crate) fn plan_reads(reqs: &[ReadRequest], limit: usize, now: Instant) -> Vec<ReadOp> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| reqs[i].offset);
    let mut ops: Vec<ReadOp> = Vec::new();
    for i in order {
        let r = reqs[i];
        let a_start = align_down_u64(r.offset);
        let a_end = align_up_u64(r.offset + r.len as u64).max(a_start + ALIGN as u64);
        if let Some(op) = ops.last_mut() {
            let op_end = op.offset + op.len as u64;
            let merged_len = a_end.max(op_end) - op.offset;
            if a_start <= op_end && merged_len <= limit as u64 {
                op.len = merged_len as usize;
                op.parts.push(Part {
                    tag: r.tag,
                    offset: r.offset,
                    len: r.len,
                    start: (r.offset - op.offset) as usize,
                });
                continue;
            }
        }
        ops.push(ReadOp {
            offset: a_start,
            len: (a_end - a_start) as usize,
            parts: vec![Part {
                tag: r.tag,
                offset: r.offset,
                len: r.len,
                start: (r.offset - a_start) as usize,
            }],
            submitted: now,
            done: 0,
            attempts: 0,
        });
    }
    ops
}

fn align_up_u64(n: u64) -> u64 {
    (n + ALIGN as u64 - 1) & !(ALIGN as u64 - 1)
}

/// A fault to inject into the read path (constructed by tests only).
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// Replace the result of the next `times` system calls at file offset `at` (`None`: any) by `-errno`.
    Errno { at: Option<u64>, errno: i32, times: u32 },
    /// Cut the next `times` results at `at` to at most `max` bytes.
    Short { at: Option<u64>, max: usize, times: u32 },
}

/// Fault-injection hook consulted by both backends after every read system call.
#[derive(Default)]
pub(crate) struct Faults {
    armed: AtomicBool,
    list: Mutex<Vec<Fault>>,
}

impl Faults {
    #[cfg(test)]
    pub(crate) fn add(&self, f: Fault) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(f);
        self.armed.store(true, Ordering::Release);
    }

    /// Possibly rewrites the result `res` of a read at `at`.
    pub(crate) fn apply(&self, at: u64, res: i64) -> i64 {
        if !self.armed.load(Ordering::Acquire) {
            return res;
        }
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        for f in list.iter_mut() {
            match f {
                Fault::Errno { at: want, errno, times } if *times > 0 && want.is_none_or(|w| w == at) => {
                    *times -= 1;
                    return -(*errno as i64);
                }
                Fault::Short { at: want, max, times }
                    if *times > 0 && want.is_none_or(|w| w == at) && res > *max as i64 =>
                {
                    *times -= 1;
                    return *max as i64;
                }
                _ => {}
            }
        }
        res
    }
}

/// State shared by the engine handle and its worker threads.
pub(crate) struct Shared {
    pub(crate) file: File,
    pub(crate) stats: Stats,
    pub(crate) pool: BufferPool,
    pub(crate) faults: Faults,
    pub(crate) shutdown: AtomicBool,
}

impl Shared {
    /// Takes a buffer for `op`, waiting for the pool; `None` if the engine is shutting down.
    pub(crate) fn acquire_blocking(&self, op: &ReadOp) -> Option<Result<PoolBuf, ReadErrorKind>> {
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                return None;
            }
            match self.pool.acquire_timeout(op.len, Duration::from_millis(50)) {
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => continue,
                Err(e) => return Some(Err(ReadErrorKind::Pool(e))),
            }
        }
    }

    /// Delivers the completions of a finished read: every request whose bytes lie within the valid prefix gets
    /// them, the rest get an error. A buffer is never handed out past what was actually read.
    pub(crate) fn finish(
        &self,
        op: ReadOp,
        outcome: Result<PoolBuf, (u64, ReadErrorKind)>,
        tx: &Sender<Completion>,
    ) {
        let latency = op.submitted.elapsed();
        self.stats.record_latency(latency, op.parts.len() as u64);
        match outcome {
            Ok(buf) => {
                let buf = Arc::new(buf);
                for p in &op.parts {
                    let result = if p.start + p.len <= op.done {
                        Ok(ReadBuf { buf: buf.clone(), start: p.start, len: p.len, offset: p.offset })
                    } else {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        Err(ReadError {
                            offset: p.offset,
                            len: p.len,
                            failed_at: op.offset + op.done as u64,
                            kind: ReadErrorKind::UnexpectedEof { got: op.done.saturating_sub(p.start) },
                        })
                    };
                    // The receiver may be gone if the engine is being dropped; the result is then moot.
                    let _ = tx.send(Completion { tag: p.tag, result });
                }
            }
            Err((failed_at, kind)) => {
                for p in &op.parts {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let err = ReadError { offset: p.offset, len: p.len, failed_at, kind: kind.clone() };
                    let _ = tx.send(Completion { tag: p.tag, result: Err(err) });
                }
            }
        }
    }
}

/// Reads byte ranges of one file into aligned pool buffers, bypassing the page cache.
///
/// Submit [`ReadRequest`]s with [`submit`](Self::submit) or [`submit_batch`](Self::submit_batch) from any thread;
/// receive [`Completion`]s, in the order the reads finish, from [`completions`](Self::completions) (the receiver
/// can be cloned to several threads). Dropping the engine waits for reads in flight and stops its threads;
/// requests that had not started yet may then end without a completion.
pub struct IoEngine {
    shared: Arc<Shared>,
    path: PathBuf,
    file_len: u64,
    direct: bool,
    backend: Backend,
    fallback: Option<FallbackReason>,
    queue_depth: usize,
    coalesce_limit: usize,
    max_read: usize,
    ops_tx: Option<Sender<ReadOp>>,
    waker: Option<Arc<crate::uring::Waker>>,
    completions: Receiver<Completion>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine")
            .field("path", &self.path)
            .field("backend", &self.backend)
            .field("fallback", &self.fallback)
            .field("direct", &self.direct)
            .field("queue_depth", &self.queue_depth)
            .finish()
    }
}

fn open_file(path: &Path, direct: bool) -> Result<File, std::io::Error> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
}

impl IoEngine {
    /// Opens `path` with the default configuration (see [`IoEngineBuilder::new`]).
    pub fn open(path: impl Into<PathBuf>) -> Result<IoEngine, OpenError> {
        IoEngineBuilder::new(path).build()
    }

    fn open_with(cfg: IoEngineBuilder) -> Result<IoEngine, OpenError> {
        if cfg.queue_depth == 0 || cfg.queue_depth > 4096 {
            return Err(OpenError::Config { what: "queue depth must be in 1..=4096" });
        }
        if cfg.pool_bytes < ALIGN {
            return Err(OpenError::Config { what: "buffer pool must hold at least one 4 KiB block" });
        }
        let path = cfg.path.clone();
        let open_err = |source| OpenError::Open { path: path.clone(), source };
        let mut fallback = None;
        let mut direct = cfg.direct;
        let first = if direct && cfg.simulate_direct_refused {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            open_file(&path, direct)
        };
        let file = match first {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                let reason = FallbackReason::DirectIoRefused { errno: libc::EINVAL };
                if cfg.backend == BackendChoice::IoUring {
                    return Err(OpenError::IoUringUnavailable { path, reason });
                }
                direct = false;
                fallback = Some(reason);
                open_file(&path, false).map_err(open_err)?
            }
            Err(e) => return Err(open_err(e)),
        };
        let file_len = file.metadata().map_err(open_err)?.len();
        let pool = BufferPool::new(cfg.pool_bytes);
        let max_read = pool.budget().min(1 << 30);
        let shared = Arc::new(Shared {
            file,
            stats: Stats::default(),
            pool,
            faults: Faults::default(),
            shutdown: AtomicBool::new(false),
        });
        let (ops_tx, ops_rx) = crossbeam_channel::unbounded::<ReadOp>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();

        let mut backend = Backend::Pread;
        let mut threads = Vec::new();
        let mut waker = None;
        if cfg.backend == BackendChoice::Pread {
            fallback.get_or_insert(FallbackReason::Requested);
        }
        if fallback.is_none() {
            let started = match cfg.simulate_setup_failure {
                Some(errno) => Err(FallbackReason::IoUringSetup { errno }),
                None => crate::uring::spawn(shared.clone(), ops_rx.clone(), done_tx.clone(), cfg.queue_depth)
                    .map_err(|e| match e {
                        crate::uring::SpawnError::Setup(reason) => reason,
                        crate::uring::SpawnError::Thread(source) => FallbackReason::ThreadSpawn {
                            errno: source.raw_os_error().unwrap_or(libc::EAGAIN),
                        },
                    }),
            };
            match started {
                Ok((t, w)) => {
                    waker = Some(w);
                    threads.push(t);
                    backend = Backend::IoUring;
                }
                Err(reason) => {
                    if cfg.backend == BackendChoice::IoUring {
                        return Err(OpenError::IoUringUnavailable { path, reason });
                    }
                    fallback = Some(reason);
                }
            }
        }
        if backend == Backend::Pread {
            for i in 0..cfg.queue_depth {
                let (sh, rx, tx) = (shared.clone(), ops_rx.clone(), done_tx.clone());
                let t = std::thread::Builder::new()
                    .name(format!("pinion-io-pread-{i}"))
                    .spawn(move || crate::pread::run(sh, rx, tx))
                    .map_err(|source| OpenError::Spawn { source })?;
                threads.push(t);
            }
        }
        Ok(IoEngine {
            shared,
            path,
            file_len,
            direct,
            backend,
            fallback,
            queue_depth: cfg.queue_depth,
            coalesce_limit: cfg.coalesce_limit.min(max_read),
            max_read,
            ops_tx: Some(ops_tx),
            waker,
            completions: done_rx,
            threads,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why the pread backend is in use instead of io_uring, or why O_DIRECT is off; `None` when the engine runs
    /// io_uring with O_DIRECT as asked.
    pub fn fallback_reason(&self) -> Option<&FallbackReason> {
        self.fallback.as_ref()
    }

    /// Whether reads bypass the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads kept in flight at most (ring depth or pread threads).
    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    /// Largest single request accepted, in bytes (bounded by the pool budget).
    pub fn max_read(&self) -> usize {
        self.max_read
    }

    /// The pool that reads are buffered in.
    pub fn pool(&self) -> &BufferPool {
        &self.shared.pool
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> IoStats {
        self.shared.stats.snapshot()
    }

    /// The completions of submitted requests, in completion order.
    pub fn completions(&self) -> &Receiver<Completion> {
        &self.completions
    }

    /// Queues one read.
    pub fn submit(&self, req: ReadRequest) -> Result<(), SubmitError> {
        self.submit_batch(std::slice::from_ref(&req))
    }

    /// Queues several reads at once, merging adjacent ones (see [`IoEngineBuilder::coalesce_limit`]). All
    /// requests are checked first: if one is invalid, none is queued.
    pub fn submit_batch(&self, reqs: &[ReadRequest]) -> Result<(), SubmitError> {
        let tx = self.ops_tx.as_ref().ok_or(SubmitError::Closed)?;
        let mut bytes = 0u64;
        for r in reqs {
            let end = r.offset.checked_add(r.len as u64);
            if end.is_none_or(|e| e > self.file_len) {
                return Err(SubmitError::OutOfBounds {
                    offset: r.offset,
                    len: r.len,
                    file_len: self.file_len,
                });
            }
            let widened = (r.offset - align_down_u64(r.offset)) as usize + r.len;
            if align_up(widened).is_none_or(|w| w > self.max_read) {
                return Err(SubmitError::TooLarge { offset: r.offset, len: r.len, max: self.max_read });
            }
            bytes += r.len as u64;
        }
        let ops = plan_reads(reqs, self.coalesce_limit, Instant::now());
        for op in ops {
            tx.send(op).map_err(|_| SubmitError::Closed)?;
        }
        if let Some(w) = &self.waker {
            w.notify();
        }
        self.shared.stats.requests.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        self.shared.stats.bytes_requested.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn faults(&self) -> &Faults {
        &self.shared.faults
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        // Closing the channel tells the workers to finish what is in flight and exit.
        self.ops_tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(offset: u64, len: usize, tag: u64) -> ReadRequest {
        ReadRequest { offset, len, tag }
    }

    #[test]
    fn plan_widens_and_merges() {
        let now = Instant::now();
        let ops = plan_reads(&[req(100, 10, 0)], 1 << 20, now);
        assert_eq!((ops[0].offset, ops[0].len), (0, 4096));
        assert_eq!(ops[0].parts[0].start, 100);

        // Unsorted, adjacent and overlapping requests merge; a gap splits.
        let reqs = [req(8192, 4096, 2), req(0, 5000, 0), req(5000, 100, 1), req(20000, 1, 3)];
        let ops = plan_reads(&reqs, 1 << 20, now);
        assert_eq!(ops.len(), 2);
        assert_eq!((ops[0].offset, ops[0].len), (0, 12288));
        let tags: Vec<u64> = ops[0].parts.iter().map(|p| p.tag).collect();
        assert_eq!(tags, [0, 1, 2]);
        assert_eq!(ops[0].parts[2].start, 8192);
        assert_eq!((ops[1].offset, ops[1].len, ops[1].parts[0].start), (16384, 4096, 3616));

        // The limit caps merged reads.
        let ops = plan_reads(&[req(0, 4096, 0), req(4096, 4096, 1), req(8192, 4096, 2)], 8192, now);
        assert_eq!(ops.iter().map(|o| o.len).collect::<Vec<_>>(), [8192, 4096]);
        // A limit of zero disables merging, and a zero-length request still reads a block.
        let ops = plan_reads(&[req(0, 0, 0), req(0, 4096, 1)], 0, now);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].len, 4096);
    }

    #[test]
    fn advance_handles_short_reads_eintr_and_errors() {
        let stats = Stats::default();
        let mut op = plan_reads(&[req(0, 8192, 0)], 0, Instant::now()).pop().unwrap();
        assert_eq!(op.advance(4096, &stats), Step::Again);
        assert_eq!(op.advance(-(libc::EINTR as i64), &stats), Step::Again);
        assert_eq!(op.advance(4096, &stats), Step::Done);
        assert_eq!(op.done, 8192);

        let mut op = plan_reads(&[req(4096, 100, 0)], 0, Instant::now()).pop().unwrap();
        assert_eq!(
            op.advance(-(libc::EIO as i64), &stats),
            Step::Failed(4096, ReadErrorKind::Os { errno: libc::EIO })
        );

        // The needed prefix is enough even when the aligned read is cut short by end of file.
        let mut op = plan_reads(&[req(0, 100, 0)], 0, Instant::now()).pop().unwrap();
        assert_eq!(op.advance(100, &stats), Step::Done);

        let mut op = plan_reads(&[req(0, 100, 0)], 0, Instant::now()).pop().unwrap();
        let mut last = Step::Again;
        for _ in 0..=MAX_RETRIES {
            last = op.advance(-(libc::EAGAIN as i64), &stats);
        }
        assert!(matches!(last, Step::Failed(0, ReadErrorKind::RetriesExhausted { .. })), "{last:?}");
    }
}
