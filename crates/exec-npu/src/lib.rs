//! The dense executor: PowerInfer-2's NPU role, on the CPU until an NPU backend exists.
//!
//! A phone NPU runs only graphs compiled ahead of time for fixed tensor shapes. This crate models that
//! contract so that the runtime is written against it: a [`DenseGraph`] is compiled once for one weight matrix
//! shape and one static batch size (buffers allocated at compile time, nothing at run time), and a
//! [`DenseExecutor`] splits a variable number of tokens into the static batch sizes it has graphs for,
//! padding the last one, exactly as a prefill on an NPU must. The arithmetic is `pinion-exec-cpu`'s batched
//! quantized matmul, so results equal the CPU path bit for bit. It is not a sparse engine (sparse, cold
//! neurons are the CPU's job) and holds no vendor SDK; a real NPU backend would implement the same two types.
#![forbid(unsafe_code)]

use pinion_exec_cpu::{QMatrix, QuantizedActs, matmul, vec_dot_type};
use pinion_format::GgmlType;

/// What can go wrong compiling or running a dense graph.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NpuError {
    #[error("no dense kernel for weight type {0}")]
    UnsupportedType(GgmlType),
    #[error("static batch sizes must be non-empty, non-zero and ascending, got {0:?}")]
    BadBuckets(Vec<usize>),
    #[error("graph compiled for {expected}, called with {got}")]
    ShapeMismatch { expected: String, got: String },
    #[error("{n} tokens exceed the static batch of {batch}")]
    BatchTooLarge { n: usize, batch: usize },
}

/// The fixed shape a graph is compiled for: a weight of `n_rows x n_cols` and `batch` activation rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StaticShape {
    pub ty: GgmlType,
    pub n_rows: usize,
    pub n_cols: usize,
    pub batch: usize,
}

/// A matmul compiled for one [`StaticShape`]: its input, activation and output buffers are allocated once.
pub struct DenseGraph {
    shape: StaticShape,
    input: Vec<f32>,
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
    pub fn compile(shape: StaticShape) -> Result<DenseGraph, NpuError> {
        if vec_dot_type(shape.ty).is_none() {
            return Err(NpuError::UnsupportedType(shape.ty));
        }
        if shape.batch == 0 || shape.n_rows == 0 || !shape.n_cols.is_multiple_of(shape.ty.block_len()) {
            return Err(NpuError::ShapeMismatch {
                expected: "non-empty shape with whole blocks per row".into(),
                got: format!("{shape:?}"),
            });
        }
        Ok(DenseGraph {
            shape,
            input: vec![0.0; shape.batch * shape.n_cols],
            acts: QuantizedActs::new(),
            output: vec![0.0; shape.batch * shape.n_rows],
        })
    }

    /// The shape the graph was compiled for.
    pub fn shape(&self) -> StaticShape {
        self.shape
    }

    /// Runs the graph on `n <= batch` activation rows `x` (`n * n_cols` values), writing `n * n_rows` values
    /// to `out`. Rows past `n` are zero padding, computed and discarded as a static-shape device would.
    pub fn run(&mut self, w: &QMatrix<'_>, x: &[f32], out: &mut [f32]) -> Result<(), NpuError> {
        let s = self.shape;
        if w.ty != s.ty || w.n_rows != s.n_rows || w.n_cols != s.n_cols {
            return Err(NpuError::ShapeMismatch {
                expected: format!("{} {}x{}", s.ty, s.n_rows, s.n_cols),
                got: format!("{} {}x{}", w.ty, w.n_rows, w.n_cols),
            });
        }
        if !x.len().is_multiple_of(s.n_cols) || out.len() != x.len() / s.n_cols * s.n_rows {
            return Err(NpuError::ShapeMismatch {
                expected: format!("rows of {} in, rows of {} out", s.n_cols, s.n_rows),
                got: format!("{} values in, {} out", x.len(), out.len()),
            });
        }
        let n = x.len() / s.n_cols;
        if n > s.batch {
            return Err(NpuError::BatchTooLarge { n, batch: s.batch });
        }
        self.input[..x.len()].copy_from_slice(x);
        self.input[x.len()..].fill(0.0);
        self.acts.quantize(s.ty, &self.input, s.n_cols);
        matmul(w, &self.acts, &mut self.output);
        out.copy_from_slice(&self.output[..n * s.n_rows]);
        Ok(())
    }
}

/// Splits token counts into the static batch sizes graphs exist for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenseExecutor {
    buckets: Vec<usize>,
}

impl DenseExecutor {
    /// An executor with graphs for the given static batch sizes (ascending, non-zero).
    pub fn new(buckets: Vec<usize>) -> Result<DenseExecutor, NpuError> {
        let ascending = buckets.windows(2).all(|w| w[0] < w[1]);
        if buckets.is_empty() || buckets[0] == 0 || !ascending {
            return Err(NpuError::BadBuckets(buckets));
        }
        Ok(DenseExecutor { buckets })
    }

    /// The static batch sizes.
    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// The passes that cover `n` tokens: `(tokens, static batch)` pairs. Full passes use the largest batch;
    /// the remainder uses the smallest batch that holds it, so padding is never more than that bucket's size.
    pub fn plan(&self, n: usize) -> Vec<(usize, usize)> {
        let largest = *self.buckets.last().expect("buckets are non-empty");
        let mut passes = vec![(largest, largest); n / largest];
        let rest = n % largest;
        if rest > 0 {
            let b = *self.buckets.iter().find(|&&b| b >= rest).expect("largest bucket holds any remainder");
            passes.push((rest, b));
        }
        passes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinion_format::quant::{BlockQ4_1, quantize_row_q4_1};
    use proptest::prelude::*;

    fn weights(n_rows: usize, n_cols: usize) -> Vec<u8> {
        let x: Vec<f32> = (0..n_rows * n_cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut blocks =
            vec![BlockQ4_1 { d: Default::default(), m: Default::default(), qs: [0; 16] }; x.len() / 32];
        quantize_row_q4_1(&x, &mut blocks);
        blocks.iter().flat_map(bytemuck_bytes).collect()
    }

    fn bytemuck_bytes(b: &BlockQ4_1) -> Vec<u8> {
        let mut v = b.d.to_le_bytes().to_vec();
        v.extend(b.m.to_le_bytes());
        v.extend(b.qs);
        v
    }

    #[test]
    fn padded_static_graph_equals_the_cpu_matmul() {
        let (rows, cols, batch) = (24, 64, 8);
        let data = weights(rows, cols);
        let w = QMatrix::new(GgmlType::Q4_1, rows, cols, &data).unwrap();
        let mut g =
            DenseGraph::compile(StaticShape { ty: GgmlType::Q4_1, n_rows: rows, n_cols: cols, batch })
                .unwrap();
        for n in 1..=batch {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let mut got = vec![0.0; n * rows];
            g.run(&w, &x, &mut got).unwrap();
            let mut acts = QuantizedActs::new();
            acts.quantize(GgmlType::Q4_1, &x, cols);
            let mut want = vec![0.0; n * rows];
            matmul(&w, &acts, &mut want);
            assert_eq!(got, want, "n = {n}");
        }
    }

    #[test]
    fn shape_errors_are_typed() {
        let data = weights(8, 32);
        let w = QMatrix::new(GgmlType::Q4_1, 8, 32, &data).unwrap();
        let mut g =
            DenseGraph::compile(StaticShape { ty: GgmlType::Q4_1, n_rows: 8, n_cols: 32, batch: 2 }).unwrap();
        let mut out = vec![0.0; 24];
        assert_eq!(g.run(&w, &[0.0; 96], &mut out), Err(NpuError::BatchTooLarge { n: 3, batch: 2 }));
        assert!(matches!(g.run(&w, &[0.0; 33], &mut out), Err(NpuError::ShapeMismatch { .. })));
        let mut other =
            DenseGraph::compile(StaticShape { ty: GgmlType::Q4_1, n_rows: 4, n_cols: 32, batch: 2 }).unwrap();
        assert!(matches!(other.run(&w, &[0.0; 32], &mut out[..4]), Err(NpuError::ShapeMismatch { .. })));
        assert_eq!(DenseExecutor::new(vec![]), Err(NpuError::BadBuckets(vec![])));
        assert_eq!(DenseExecutor::new(vec![8, 4]), Err(NpuError::BadBuckets(vec![8, 4])));
    }

    proptest! {
        #[test]
        fn plan_covers_every_token_with_bounded_padding(n in 0usize..5000) {
            let ex = DenseExecutor::new(vec![1, 8, 32, 128, 512]).unwrap();
            let plan = ex.plan(n);
            prop_assert_eq!(plan.iter().map(|p| p.0).sum::<usize>(), n);
            for &(tokens, batch) in &plan {
                prop_assert!(tokens <= batch && ex.buckets().contains(&batch));
                // The smallest bucket that fits was chosen.
                let smallest = *ex.buckets().iter().find(|&&b| b >= tokens).unwrap();
                prop_assert_eq!(batch, smallest);
            }
        }
    }
}
