//! Error types, one per operation: opening an engine, submitting a read, a read itself, taking a pool buffer,
//! running a benchmark.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Failure to take a buffer from a [`BufferPool`](crate::BufferPool).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The request is larger than the whole pool could ever hold.
    #[error("buffer of {requested} bytes exceeds the pool budget of {budget} bytes")]
    TooLarge {
        /// Bytes asked for.
        requested: usize,
        /// The pool's budget.
        budget: usize,
    },
    /// The allocator refused the memory.
    #[error("allocation of {bytes} aligned bytes failed")]
    AllocFailed {
        /// Bytes asked of the allocator.
        bytes: usize,
    },
}

/// Failure to open a file for reading or to set up an [`IoEngine`](crate::IoEngine).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// `open(2)` or `fstat(2)` failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// io_uring was required (not `Auto`) but could not be set up.
    #[error("io_uring required but unavailable for {path}: {reason}")]
    IoUringUnavailable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: FallbackReason,
    },
    /// A worker thread could not be started.
    #[error("cannot spawn I/O thread: {source}")]
    Spawn {
        /// The OS error.
        source: io::Error,
    },
    /// The configuration is invalid (zero queue depth, pool smaller than one block, ...).
    #[error("invalid I/O configuration: {what}")]
    Config {
        /// What is wrong.
        what: &'static str,
    },
}

/// Failure to queue a read request; nothing was queued for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The range ends past the end of the file (as it was when the engine opened it).
    #[error("read of {len} bytes at offset {offset} is past the end of the file ({file_len} bytes)")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
        /// File length.
        file_len: u64,
    },
    /// The range (widened to 4 KiB alignment) is larger than the buffer pool or the per-read limit.
    #[error("read of {len} bytes at offset {offset} exceeds the maximum read size of {max} bytes")]
    TooLarge {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
        /// The largest read this engine accepts.
        max: usize,
    },
    /// The engine's worker threads have stopped.
    #[error("the I/O engine has shut down")]
    Closed,
}

/// What went wrong with one read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadErrorKind {
    /// The OS reported an error (for example EIO); `errno` is the raw error number.
    Os {
        /// Raw OS error number.
        errno: i32,
    },
    /// The file ended before the requested range did (it was truncated after the engine opened it).
    UnexpectedEof {
        /// Bytes of the requested range that could be read.
        got: usize,
    },
    /// EINTR/EAGAIN kept coming back after the retry limit.
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// No buffer could be taken from the pool.
    Pool(PoolError),
}

impl fmt::Display for ReadErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadErrorKind::Os { errno } => write!(f, "{}", io::Error::from_raw_os_error(*errno)),
            ReadErrorKind::UnexpectedEof { got } => write!(f, "unexpected end of file after {got} bytes"),
            ReadErrorKind::RetriesExhausted { attempts } => {
                write!(f, "still interrupted after {attempts} attempts")
            }
            ReadErrorKind::Pool(e) => write!(f, "{e}"),
        }
    }
}

/// Failure of one read request. The request's bytes are not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("read of {len} bytes at file offset {offset} failed (at offset {failed_at}): {kind}")]
#[non_exhaustive]
pub struct ReadError {
    /// Offset of the request, as submitted.
    pub offset: u64,
    /// Length of the request, as submitted.
    pub len: usize,
    /// File offset of the system call that failed (aligned, and possibly inside a coalesced read).
    pub failed_at: u64,
    /// What went wrong.
    pub kind: ReadErrorKind,
}

impl ReadError {
    /// The raw OS error number, if the OS reported one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self.kind {
            ReadErrorKind::Os { errno } => Some(errno),
            _ => None,
        }
    }
}

/// Why the pread thread pool was chosen instead of io_uring.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FallbackReason {
    /// The caller asked for the pread backend.
    Requested,
    /// `io_uring_setup` failed (old kernel, seccomp filter, `kernel.io_uring_disabled`); `errno` says how.
    IoUringSetup {
        /// Raw OS error number.
        errno: i32,
    },
    /// The ring was created but does not support `IORING_OP_READ` (kernel older than 5.6).
    ReadOpUnsupported,
    /// The io_uring submission thread could not be started.
    ThreadSpawn {
        /// Raw OS error number.
        errno: i32,
    },
    /// The file system refused O_DIRECT (for example tmpfs: EINVAL); reads go through the page cache.
    DirectIoRefused {
        /// Raw OS error number.
        errno: i32,
    },
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackReason::Requested => write!(f, "pread backend requested"),
            FallbackReason::IoUringSetup { errno } => {
                write!(f, "io_uring setup failed: {}", io::Error::from_raw_os_error(*errno))
            }
            FallbackReason::ReadOpUnsupported => write!(f, "io_uring does not support IORING_OP_READ"),
            FallbackReason::ThreadSpawn { errno } => {
                write!(f, "cannot start the io_uring thread: {}", io::Error::from_raw_os_error(*errno))
            }
            FallbackReason::DirectIoRefused { errno } => write!(
                f,
                "O_DIRECT refused by the file system ({}); reading through the page cache",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

/// Failure of [`bench::run`](crate::bench::run).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The engine could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A read could not be submitted.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// A read failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The configuration cannot be run (file smaller than one read, zero read size, ...).
    #[error("invalid benchmark configuration: {what}")]
    Config {
        /// What is wrong.
        what: String,
    },
}
