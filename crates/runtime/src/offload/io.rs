//! The offloaded run's reads: one I/O engine over the packed file, completion tags, the stash of completions
//! that arrive before the step that uses them (read-ahead of later layers and of the output head, prefill's
//! next layer), and the checks that turn I/O and checksum failures into typed errors naming the file.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use pinion_format::FormatError;
use pinion_io::{BackendChoice, Completion, IoEngine, IoEngineBuilder, ReadBuf, ReadRequest};

use crate::error::RuntimeError;

/// A cluster's record (its gate block, or gate block and bundles), or a gate row the predictor picked.
pub(crate) const KIND_GATE: u64 = 1;
/// A bundle (or half of one, without bundling) of a neuron that passed its gate.
pub(crate) const KIND_BUNDLE: u64 = 2;
/// A piece of a range read whole (loading the fixed region, prefill's layers).
pub(crate) const KIND_STAGE: u64 = 3;
/// A chunk of output-head rows.
pub(crate) const KIND_HEAD: u64 = 4;
/// An embedding row.
pub(crate) const KIND_EMBD: u64 = 5;

/// Largest read adjacent requests are merged into: records read ahead lie back to back, and the device serves
/// reads of a few hundred KiB faster than tens of KiB at the same depth (the device profile's read grid).
pub(crate) const COALESCE: usize = 512 << 10;

/// How long a read may take before the run gives up on the device.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A completion tag: kind in the top 8 bits, then 24 bits of layer, then 32 bits of index.
pub(crate) fn tag(kind: u64, layer: usize, idx: usize) -> u64 {
    (kind << 56) | ((layer as u64 & 0xff_ffff) << 32) | (idx as u64 & 0xffff_ffff)
}

/// The parts of a [`tag`].
pub(crate) fn untag(t: u64) -> (u64, usize, usize) {
    (t >> 56, ((t >> 32) & 0xff_ffff) as usize, (t & 0xffff_ffff) as usize)
}

/// Requests covering file range `r` in pieces of `piece` bytes (the last one shorter), tagged `kind`, `layer`
/// and their index.
pub(crate) fn pieces(
    r: Range<u64>,
    piece: u64,
    kind: u64,
    layer: usize,
) -> impl Iterator<Item = ReadRequest> {
    (r.start..r.end).step_by(piece.max(1) as usize).enumerate().map(move |(i, offset)| ReadRequest {
        offset,
        len: piece.min(r.end - offset) as usize,
        tag: tag(kind, layer, i),
    })
}

/// Bytes read for a cluster: a view of the I/O engine's buffer, or (reading everything before computing,
/// without the pipeline) an owned copy, so that a layer's reads do not all hold pool buffers at once.
pub(crate) enum Piece {
    Shared(ReadBuf),
    Owned { offset: u64, bytes: Vec<u8> },
}

impl Piece {
    /// A copy of `buf` when `own`, else `buf` itself.
    pub(crate) fn new(buf: ReadBuf, own: bool) -> Piece {
        match own {
            true => Piece::Owned { offset: buf.offset(), bytes: buf.to_vec() },
            false => Piece::Shared(buf),
        }
    }

    /// File offset of the first byte.
    pub(crate) fn offset(&self) -> u64 {
        match self {
            Piece::Shared(b) => b.offset(),
            Piece::Owned { offset, .. } => *offset,
        }
    }
}

impl std::ops::Deref for Piece {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Piece::Shared(b) => b,
            Piece::Owned { bytes, .. } => bytes,
        }
    }
}

/// Completions that arrived before the step that uses them.
#[derive(Default)]
pub(crate) struct Stash {
    /// Per layer, per cluster: a record read ahead.
    pub(crate) records: Vec<Vec<Option<ReadBuf>>>,
    /// Output-head chunks read ahead, by chunk index.
    pub(crate) head: Vec<Option<ReadBuf>>,
    /// Pieces of a layer read ahead for prefill (the layer, and its pieces as they arrived).
    pub(crate) stage: Vec<ReadBuf>,
    pub(crate) stage_layer: Option<usize>,
}

impl Stash {
    /// Room for `n_layers` layers of `n_clusters` clusters and `n_head` head chunks.
    pub(crate) fn new(n_clusters: &[usize], n_head: usize) -> Stash {
        Stash {
            records: n_clusters.iter().map(|&n| vec![None; n]).collect(),
            head: vec![None; n_head],
            stage: Vec::new(),
            stage_layer: None,
        }
    }

    /// Keeps completion `buf` tagged `(kind, layer, idx)` for later; false if nothing stashes that kind.
    pub(crate) fn put(&mut self, kind: u64, layer: usize, idx: usize, buf: ReadBuf) -> bool {
        match kind {
            KIND_GATE => match self.records.get_mut(layer).and_then(|r| r.get_mut(idx)) {
                Some(slot) => {
                    *slot = Some(buf);
                    true
                }
                None => false,
            },
            KIND_HEAD => match self.head.get_mut(idx) {
                Some(slot) => {
                    *slot = Some(buf);
                    true
                }
                None => false,
            },
            KIND_STAGE if self.stage_layer == Some(layer) => {
                self.stage.push(buf);
                true
            }
            _ => false,
        }
    }
}

/// The I/O engine of an offloaded run and what it reads, for messages.
pub(crate) struct Reader {
    pub(crate) engine: IoEngine,
    pub(crate) path: PathBuf,
    /// Completions of reads made ahead of the step that uses them.
    pub(crate) stash: Mutex<Stash>,
}

impl Reader {
    /// Opens `path` for direct reads with `queue_depth` reads in flight and a buffer pool of `pool_bytes`;
    /// `coalesce` merges adjacent requests into one read.
    pub(crate) fn open(
        path: &Path,
        queue_depth: usize,
        pool_bytes: u64,
        coalesce: bool,
    ) -> Result<Reader, RuntimeError> {
        let engine = IoEngineBuilder::new(path)
            .backend(BackendChoice::Auto)
            .queue_depth(queue_depth)
            .pool_bytes(pool_bytes as usize)
            .coalesce_limit(if coalesce { COALESCE } else { 0 })
            .build()
            .map_err(|source| RuntimeError::OffloadOpen { path: path.to_path_buf(), source })?;
        Ok(Reader { engine, path: path.to_path_buf(), stash: Mutex::new(Stash::default()) })
    }

    /// Queues `reqs`; `what` names them in an error.
    pub(crate) fn submit(&self, reqs: &[ReadRequest], what: &str) -> Result<(), RuntimeError> {
        if reqs.is_empty() {
            return Ok(());
        }
        self.engine
            .submit_batch(reqs)
            .map_err(|source| RuntimeError::OffloadSubmit { what: what.to_string(), source })
    }

    /// The next completion, waiting at most `timeout` (`Ok(None)` on timeout when `patient`, else an error).
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<Option<Completion>, RuntimeError> {
        match self.engine.completions().recv_timeout(timeout) {
            Ok(c) => Ok(Some(c)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(RuntimeError::OffloadStopped("the I/O engine stopped".into()))
            }
        }
    }

    /// The next completion; a read that takes longer than a minute is an error.
    pub(crate) fn recv(&self) -> Result<Completion, RuntimeError> {
        self.recv_timeout(READ_TIMEOUT)?.ok_or_else(|| {
            RuntimeError::OffloadStopped(format!("no read of {} completed in 60 s", self.path.display()))
        })
    }

    /// A completion's bytes, or its read error naming what was read.
    pub(crate) fn bytes(&self, c: Completion, what: &dyn Fn() -> String) -> Result<ReadBuf, RuntimeError> {
        c.result.map_err(|source| RuntimeError::OffloadRead { path: self.path.clone(), what: what(), source })
    }

    /// A checksum (or other format) failure of bytes read from this file.
    pub(crate) fn corrupt(&self, source: FormatError) -> RuntimeError {
        RuntimeError::Corrupt { path: self.path.clone(), source }
    }

    /// Waits for the completion tagged `want`, stashing the others that can wait; a completion nothing waits for
    /// is an error.
    pub(crate) fn wait_for(&self, want: u64, what: &dyn Fn() -> String) -> Result<ReadBuf, RuntimeError> {
        loop {
            let c = self.recv()?;
            if c.tag == want {
                return self.bytes(c, what);
            }
            self.stash_or_fail(c)?;
        }
    }

    /// Stashes a completion that arrived before its step.
    pub(crate) fn stash_or_fail(&self, c: Completion) -> Result<(), RuntimeError> {
        let (kind, layer, idx) = untag(c.tag);
        let what = || format!("read-ahead (kind {kind}, layer {layer}, index {idx})");
        let buf = self.bytes(c, &what)?;
        if lock(&self.stash).put(kind, layer, idx, buf) {
            Ok(())
        } else {
            Err(RuntimeError::OffloadStopped(format!(
                "unexpected read completion (kind {kind}, layer {layer}, index {idx})"
            )))
        }
    }

    /// Reads file range `r` in pieces of at most `piece` bytes, handing each piece to `each` as it arrives (in
    /// any order; a piece knows its offset).
    pub(crate) fn read_range(
        &self,
        r: Range<u64>,
        piece: u64,
        what: &str,
        each: &mut dyn FnMut(ReadBuf) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let reqs: Vec<Range<u64>> =
            pieces(r, piece, 0, 0).map(|q| q.offset..q.offset + q.len as u64).collect();
        self.read_many(&reqs, what, &mut |_, b| each(b))
    }

    /// Reads the file ranges `ranges` (each one request), handing each to `each(index, bytes)` as it arrives. Only
    /// read-ahead may be outstanding besides (it is stashed).
    pub(crate) fn read_many(
        &self,
        ranges: &[Range<u64>],
        what: &str,
        each: &mut dyn FnMut(usize, ReadBuf) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        let reqs: Vec<ReadRequest> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| ReadRequest {
                offset: r.start,
                len: (r.end - r.start) as usize,
                tag: tag(KIND_STAGE, SYNC, i),
            })
            .collect();
        self.submit(&reqs, what)?;
        let mut left = reqs.len();
        while left > 0 {
            let c = self.recv()?;
            let (kind, layer, i) = untag(c.tag);
            if kind == KIND_STAGE && layer == SYNC {
                let r = &ranges[i];
                each(i, self.bytes(c, &|| format!("{what} ({} bytes at {})", r.end - r.start, r.start))?)?;
                left -= 1;
            } else {
                self.stash_or_fail(c)?;
            }
        }
        Ok(())
    }

    /// The largest piece a range is read in.
    pub(crate) fn piece(&self) -> u64 {
        pinion_plan::CHUNK.min(self.engine.max_read() as u64).max(4096)
    }
}

/// The layer field of synchronous reads' tags (no layer has this index).
const SYNC: usize = 0xff_fffe;

/// Locks a mutex, taking over a poisoned one (nothing panics while holding these with state half-changed).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
