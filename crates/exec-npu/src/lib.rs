//! The dense static-shape executor: PowerInfer-2's NPU role, on the CPU until an NPU backend exists.
//!
//! A phone NPU runs only graphs compiled ahead of time for fixed tensor shapes. This crate models that
//! contract so that the runtime is written against it: a [`DenseGraph`] is compiled once for one weight matrix
//! shape and one static batch size, a [`DenseExecutor`] splits a variable number of activation rows into the
//! static batch sizes it has graphs for, zero-padding the last pass, and [`NpuDense`], the main type,
//! implements `pinion-exec-cpu`'s [`DenseBackend`] with them, so the runtime can hold it as a
//! `&dyn DenseBackend` in place of [`pinion_exec_cpu::CpuDense`]. It takes activation rows already quantized
//! ([`QuantizedActs`]) and runs `pinion-exec-cpu`'s batched matmul on each static batch, padding rows being
//! zero blocks, so its results equal the CPU backend's bit for bit. It is not a sparse engine (sparse, cold
//! neurons are the CPU's job) and holds no vendor SDK; a real NPU backend would replace the body of
//! [`DenseGraph`] and keep the rest.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard, PoisonError};

use pinion_exec_cpu::{
    DenseBackend, DenseShape, ExecError, QMatrix, QuantizedActs, check_operands, check_output, matmul,
};
use pinion_format::GgmlType;

#[cfg(test)]
mod tests;

/// [`NpuDense`]'s static batch sizes: powers of two up to 512.
///
/// 512 is the runtime's (and llama.cpp's) prefill batch, so a full prefill batch is one unpadded pass on the
/// caller's activations in place: pp512 does the CPU backend's one matmul. Powers of two let
/// [`DenseExecutor::passes`] cover any remainder with a few passes and little padding, from 10 graphs per
/// weight shape (a phone NPU compiles each graph ahead of time, so their number is kept small).
pub const DEFAULT_BUCKETS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

/// Padding rows [`DenseExecutor::passes`] always accepts rather than split a remainder into more passes: the
/// CPU kernels compute activation rows 8 at a time, so up to 7 padding rows cost nothing there. Above that,
/// a remainder is padded if the padding is at most an eighth of it.
pub const PAD_SLACK_ROWS: usize = 7;

/// What can go wrong compiling or running a dense graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpuError {
    /// The static batch sizes given to a [`DenseExecutor`] are empty, contain zero or are not ascending.
    #[error("static batch sizes must be non-empty, non-zero and ascending, got {buckets:?}")]
    BadBuckets {
        /// The sizes given.
        buckets: Vec<usize>,
    },
    /// A graph cannot be compiled for a shape with no rows, no columns or a zero batch.
    #[error("cannot compile a graph for {shape}: rows, columns and batch must be non-zero")]
    InvalidShape {
        /// The shape asked for.
        shape: StaticShape,
    },
    /// A graph was run with weights of another shape than it was compiled for.
    #[error("graph compiled for {graph} run with {ty} weights of {n_rows}x{n_cols}")]
    WeightMismatch {
        /// The graph's shape.
        graph: StaticShape,
        /// The weights' type.
        ty: GgmlType,
        /// The weights' rows.
        n_rows: usize,
        /// The weights' columns.
        n_cols: usize,
    },
    /// A graph was run with more activation rows than its static batch.
    #[error("{n} activation rows exceed the static batch of {batch}")]
    BatchTooLarge {
        /// Rows given.
        n: usize,
        /// The graph's batch.
        batch: usize,
    },
    /// The operands do not fit each other (checked by `pinion-exec-cpu`).
    #[error(transparent)]
    Exec(#[from] ExecError),
}

impl From<NpuError> for ExecError {
    /// Operand errors stay what they are; errors of the static-shape machinery become
    /// [`ExecError::Backend`] with the [`NpuError`] as source.
    fn from(e: NpuError) -> ExecError {
        match e {
            NpuError::Exec(e) => e,
            e => ExecError::Backend { backend: NpuDense::NAME, source: Box::new(e) },
        }
    }
}

/// The fixed shape a graph is compiled for: a weight of `n_rows x n_cols` and `batch` activation rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StaticShape {
    /// Storage type of the weights.
    pub ty: GgmlType,
    /// Weight rows.
    pub n_rows: usize,
    /// Weight columns.
    pub n_cols: usize,
    /// Activation rows per run.
    pub batch: usize,
}

impl StaticShape {
    /// The shape of `w` with `batch` activation rows.
    pub fn new(w: DenseShape, batch: usize) -> StaticShape {
        StaticShape { ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols, batch }
    }

    /// The weight shape.
    pub fn weights(&self) -> DenseShape {
        DenseShape { ty: self.ty, n_rows: self.n_rows, n_cols: self.n_cols }
    }
}

impl std::fmt::Display for StaticShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}x{} batch {}", self.ty, self.n_rows, self.n_cols, self.batch)
    }
}

/// A matmul compiled for one [`StaticShape`]: it always multiplies `batch` activation rows, the rows it is
/// given followed by zero rows.
///
/// Its activation buffer (`batch` quantized rows) is allocated when it is compiled; its output buffer
/// (`batch x n_rows` f32) on the first run with fewer rows than `batch` (a run of a full batch writes
/// straight into the caller's output). After that a run allocates nothing. A run whose rows are all of the
/// caller's activations and fill the batch uses them in place, without copying.
pub struct DenseGraph {
    shape: StaticShape,
    acts: QuantizedActs,
    output: Vec<f32>,
}

impl std::fmt::Debug for DenseGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseGraph").field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl DenseGraph {
    /// Compiles a graph for `shape`.
    ///
    /// # Errors
    /// [`NpuError::Exec`] with [`ExecError::UnsupportedType`] or [`ExecError::RowNotBlockAligned`] if no
    /// kernel handles the weights, [`NpuError::InvalidShape`] for a zero dimension.
    pub fn compile(shape: StaticShape) -> Result<DenseGraph, NpuError> {
        shape.weights().validate()?;
        if shape.batch == 0 || shape.n_rows == 0 || shape.n_cols == 0 {
            return Err(NpuError::InvalidShape { shape });
        }
        let mut acts = QuantizedActs::new();
        acts.quantize(shape.ty, &vec![0.0; shape.batch * shape.n_cols], shape.n_cols);
        Ok(DenseGraph { shape, acts, output: Vec::new() })
    }

    /// The shape the graph was compiled for.
    pub fn shape(&self) -> StaticShape {
        self.shape
    }

    /// Bytes of memory the graph's buffers hold.
    pub fn heap_bytes(&self) -> usize {
        self.acts.heap_bytes() + self.output.capacity() * size_of::<f32>()
    }

    /// Runs the graph on activation rows `rows` of `acts` (at most `batch` of them), writing
    /// `rows.len() * n_rows` values to `out`, token-major. The rows past them are zero padding, computed and
    /// discarded as a static-shape device would.
    ///
    /// # Errors
    /// [`NpuError::WeightMismatch`] if `w` is not the compiled shape, [`NpuError::BatchTooLarge`] for more
    /// rows than the batch, and [`NpuError::Exec`] if `acts` was not quantized for `w`
    /// ([`ExecError::ActsMismatch`]), `rows` is not within it ([`ExecError::RowsOutOfRange`]) or `out` has
    /// the wrong length ([`ExecError::OutputLength`]).
    pub fn run(
        &mut self,
        w: &QMatrix<'_>,
        acts: &QuantizedActs,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), NpuError> {
        let s = self.shape;
        if DenseShape::of(w) != s.weights() {
            return Err(NpuError::WeightMismatch { graph: s, ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols });
        }
        check_operands(w, acts)?;
        let n = rows.end.saturating_sub(rows.start);
        if n > s.batch {
            return Err(NpuError::BatchTooLarge { n, batch: s.batch });
        }
        check_output(n, s.n_rows, out)?;
        if n == s.batch && rows.start == 0 && n == acts.n_rows() {
            // The caller's activations are exactly one static batch: run on them in place (as a device
            // sharing memory with the host would map them), which keeps a full prefill batch as cheap as the
            // CPU backend's call.
            matmul(w, acts, out);
            return Ok(());
        }
        self.acts.copy_rows_padded(acts, rows, s.batch)?;
        if n == s.batch {
            matmul(w, &self.acts, out);
        } else {
            self.output.resize(s.batch * s.n_rows, 0.0);
            matmul(w, &self.acts, &mut self.output);
            out.copy_from_slice(&self.output[..out.len()]);
        }
        Ok(())
    }
}

/// Splits activation row counts into the static batch sizes graphs exist for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseExecutor {
    buckets: Vec<usize>,
}

impl DenseExecutor {
    /// An executor with graphs for the given static batch sizes (ascending, non-zero).
    ///
    /// # Errors
    /// [`NpuError::BadBuckets`] otherwise.
    pub fn new(buckets: Vec<usize>) -> Result<DenseExecutor, NpuError> {
        let ascending = buckets.windows(2).all(|w| w[0] < w[1]);
        if buckets.first().is_none_or(|&b| b == 0) || !ascending {
            return Err(NpuError::BadBuckets { buckets });
        }
        Ok(DenseExecutor { buckets })
    }

    /// The static batch sizes.
    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// The static batch sizes [`DenseExecutor::passes`] can use for at most `max_tokens` rows: those up to
    /// the smallest one that holds `max_tokens` (all of them if none does).
    pub fn buckets_up_to(&self, max_tokens: usize) -> &[usize] {
        let n = self.buckets.iter().position(|&b| b >= max_tokens).map_or(self.buckets.len(), |i| i + 1);
        &self.buckets[..n]
    }

    /// The passes that cover `n` rows, in order: `(rows, static batch)` pairs. While at least the largest
    /// batch remains, a pass is a full largest batch. A remainder goes into the smallest batch that holds it
    /// if that pads it by at most [`PAD_SLACK_ROWS`] rows or an eighth of it (or if no batch is smaller);
    /// otherwise the largest batch it fills is a full pass and the rest is split the same way. Only the last
    /// pass is padded.
    pub fn passes(&self, n: usize) -> Passes<'_> {
        Passes { buckets: &self.buckets, rest: n }
    }
}

/// The iterator of [`DenseExecutor::passes`]; it allocates nothing.
#[derive(Clone, Debug)]
pub struct Passes<'a> {
    buckets: &'a [usize],
    rest: usize,
}

impl Iterator for Passes<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let rest = self.rest;
        let (&largest, _) = self.buckets.split_last()?;
        if rest == 0 {
            return None;
        }
        let pass = match self.buckets.iter().find(|&&b| b >= rest) {
            None => (largest, largest),
            Some(&up) => {
                let slack = PAD_SLACK_ROWS.max(rest / 8);
                match self.buckets.iter().rev().find(|&&b| b <= rest) {
                    Some(&down) if up - rest > slack => (down, down),
                    _ => (rest, up),
                }
            }
        };
        self.rest -= pass.0;
        Some(pass)
    }
}

/// The NPU-role [`DenseBackend`]: [`DenseGraph`]s per (weight shape, static batch), a call split into static
/// batches by a [`DenseExecutor`] ([`DEFAULT_BUCKETS`] unless built with [`NpuDense::with_buckets`]).
///
/// Graphs are compiled by [`DenseBackend::prepare`] for every batch a call of up to `max_tokens` rows can
/// use. A shape or batch not prepared is compiled on first use (an allocation on that call only) rather than
/// refused, so a caller that forgets a shape is slower once, not wrong. A call takes an idle graph of each
/// pass's shape and gives it back after the pass; no lock is held while computing, so calls from several
/// threads (or nested in rayon tasks) never wait on one another: a call that finds no idle graph compiles
/// another, so there are at most as many graphs per shape as concurrent calls. Once compiled, a call
/// allocates nothing.
///
/// Memory: a graph holds `batch` quantized activation rows, and once it has run a padded pass, `batch x
/// n_rows` f32 outputs ([`NpuDense::heap_bytes`]).
#[derive(Debug)]
pub struct NpuDense {
    executor: DenseExecutor,
    idle: Mutex<HashMap<StaticShape, Vec<DenseGraph>>>,
}

impl Default for NpuDense {
    fn default() -> Self {
        NpuDense::new()
    }
}

impl NpuDense {
    /// The backend's name in logs and errors.
    pub const NAME: &'static str = "npu";

    /// A backend with [`DEFAULT_BUCKETS`].
    pub fn new() -> NpuDense {
        NpuDense { executor: DenseExecutor { buckets: DEFAULT_BUCKETS.to_vec() }, idle: Mutex::default() }
    }

    /// A backend with the given static batch sizes.
    ///
    /// # Errors
    /// [`NpuError::BadBuckets`] unless they are non-empty, non-zero and ascending.
    pub fn with_buckets(buckets: Vec<usize>) -> Result<NpuDense, NpuError> {
        Ok(NpuDense { executor: DenseExecutor::new(buckets)?, idle: Mutex::default() })
    }

    /// How calls are split into static batches.
    pub fn executor(&self) -> &DenseExecutor {
        &self.executor
    }

    /// Graphs compiled and not in use (all of them while no call runs).
    pub fn n_graphs(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    /// Bytes of memory held by the graphs not in use (all of them while no call runs).
    pub fn heap_bytes(&self) -> usize {
        self.idle().values().flatten().map(DenseGraph::heap_bytes).sum()
    }

    /// The idle graphs. A panic while the lock was held cannot leave a graph half-updated (graphs are
    /// moved in and out whole), so a poisoned lock is used as is.
    fn idle(&self) -> MutexGuard<'_, HashMap<StaticShape, Vec<DenseGraph>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle graph of `shape`, compiled if there is none.
    fn take(&self, shape: StaticShape) -> Result<DenseGraph, NpuError> {
        let idle = self.idle().get_mut(&shape).and_then(Vec::pop);
        match idle {
            Some(g) => Ok(g),
            None => DenseGraph::compile(shape),
        }
    }

    /// Returns a graph to the idle ones.
    fn give_back(&self, graph: DenseGraph) {
        self.idle().entry(graph.shape).or_default().push(graph);
    }
}

impl DenseBackend for NpuDense {
    fn name(&self) -> &'static str {
        NpuDense::NAME
    }

    /// Compiles a graph for every shape and every batch a call of up to `max_tokens` rows can use
    /// ([`DenseExecutor::buckets_up_to`]), unless one exists.
    fn prepare(&self, shapes: &[DenseShape], max_tokens: usize) -> Result<(), ExecError> {
        for &w in shapes {
            w.validate()?;
            if w.n_rows == 0 || w.n_cols == 0 {
                continue;
            }
            for &batch in self.executor.buckets_up_to(max_tokens) {
                let shape = StaticShape::new(w, batch);
                let exists = self.idle().get(&shape).is_some_and(|v| !v.is_empty());
                if !exists {
                    // Compiled without holding the lock: quantizing may run rayon tasks.
                    let graph = DenseGraph::compile(shape)?;
                    self.give_back(graph);
                }
            }
        }
        Ok(())
    }

    fn matmul(&self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) -> Result<(), ExecError> {
        check_operands(w, acts)?;
        let n = acts.n_rows();
        check_output(n, w.n_rows, out)?;
        if n == 0 || w.n_rows == 0 {
            return Ok(());
        }
        let shape = DenseShape::of(w);
        let mut start = 0;
        for (rows, batch) in self.executor.passes(n) {
            let mut graph = self.take(StaticShape::new(shape, batch))?;
            let done = graph.run(
                w,
                acts,
                start..start + rows,
                &mut out[start * w.n_rows..(start + rows) * w.n_rows],
            );
            self.give_back(graph);
            done?;
            start += rows;
        }
        Ok(())
    }
}
