//! Storage I/O for pinion: read-only file mapping, 4 KiB-aligned buffers, and page-cache-bypassing reads of
//! byte ranges.
//!
//! The main type is [`IoEngine`]: it reads `(offset, len, tag)` ranges of one file with O_DIRECT into buffers
//! from a byte-budgeted [`BufferPool`] and delivers [`Completion`]s on a channel in completion order. It runs on
//! io_uring (one submission thread, configurable queue depth, batched submits) and falls back to a pool of
//! pread threads when io_uring cannot be set up or the file system refuses O_DIRECT; the choice and its reason
//! are reported by [`IoEngine::backend`] and [`IoEngine::fallback_reason`], never made silently. Adjacent
//! requests of one batch are merged into one read, unaligned ranges are widened internally, and the caller gets
//! exactly the bytes asked for. [`MappedFile`] maps a file read-only for the parts of a model that are read
//! whole.
//!
//! This crate knows nothing about models or caching policy: it moves bytes from files into memory and counts what
//! it did ([`IoStats`]). All of pinion's file-related `unsafe` code lives here, each block with a `// SAFETY:`
//! comment.
//!
//! ```no_run
//! use pinion_io::{IoEngineBuilder, ReadRequest};
//! let engine = IoEngineBuilder::new("/data/model.bundles").queue_depth(32).build()?;
//! println!("backend: {} ({:?})", engine.backend(), engine.fallback_reason());
//! engine.submit_batch(&[ReadRequest { offset: 0, len: 100, tag: 7 }])?;
//! let c = engine.completions().recv().expect("engine alive");
//! assert_eq!((c.tag, c.result?.len()), (7, 100));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod aligned;
pub mod bench;
mod engine;
mod error;
mod mmap;
mod pread;
mod stats;
#[cfg(test)]
mod tests;
mod uring;

pub use crate::aligned::{ALIGN, AlignedBuf, BufferPool, PoolBuf, PoolStats, bound_heap_retention};
pub use crate::engine::{
    Backend, BackendChoice, Completion, DEFAULT_COALESCE_LIMIT, DEFAULT_POOL_BYTES, DEFAULT_QUEUE_DEPTH,
    IoEngine, IoEngineBuilder, ReadBuf, ReadRequest,
};
pub use crate::error::{
    BenchError, FallbackReason, OpenError, PoolError, ReadError, ReadErrorKind, SubmitError,
};
pub use crate::mmap::MappedFile;
pub use crate::stats::{IoStats, LatencyHistogram, N_LATENCY_BUCKETS};
