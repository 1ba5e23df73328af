//! [`QuantizedActs`]: activation rows converted once to the format a weight type's dot product consumes.

use half::{bf16, f16};
use pinion_format::GgmlType;
use pinion_format::quant::{BlockQ8_0, BlockQ8_1, BlockQ8K, QK, QK_K};
use rayon::prelude::*;
use std::ops::Range;

use crate::error::ExecError;
use crate::kernels::{self, KernelPath, scalar};

/// The activation format ggml pairs with a weight type (its `vec_dot_type`), or `None` if there is no kernel.
pub fn vec_dot_type(weight_ty: GgmlType) -> Option<GgmlType> {
    Some(match weight_ty {
        GgmlType::F32 => GgmlType::F32,
        GgmlType::F16 => GgmlType::F16,
        GgmlType::BF16 => GgmlType::BF16,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => GgmlType::Q8_1,
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => GgmlType::Q8K,
        _ => return None,
    })
}

/// Rows per parallel task when quantizing many rows.
const ROWS_PER_TASK: usize = 16;

/// Activation rows quantized for one weight type: a reusable buffer that does not allocate once grown.
///
/// Quantize once per activation matrix, then pass it to [`crate::matmul()`] for every weight matrix of the same
/// `vec_dot_type` and width (for example Q, K and V, or gate and up).
#[derive(Default)]
pub struct QuantizedActs {
    ty: Option<GgmlType>,
    n_rows: usize,
    n_cols: usize,
    pub(crate) f32s: Vec<f32>,
    pub(crate) f16s: Vec<f16>,
    pub(crate) bf16s: Vec<bf16>,
    pub(crate) q8_0: Vec<BlockQ8_0>,
    pub(crate) q8_1: Vec<BlockQ8_1>,
    /// For Q8_1 with several rows: `s` of every block as f32, block-major, rows padded to a multiple of 8
    /// with zeros (`q8_1_s[b * t_pad + t]`), for the batched Q4_1 kernel.
    pub(crate) q8_1_s: Vec<f32>,
    /// For Q8_0 and Q8_1 with several rows: `d` of every block as f32, laid out as `q8_1_s`.
    pub(crate) d_t: Vec<f32>,
    pub(crate) q8k: Vec<BlockQ8K>,
    /// The Q8_K rows again, each 32-value group in the order the x86 K-quant tiles take it
    /// ([`kernels::permute_q8k`]): permuted once here rather than in every tile of rows. Empty elsewhere.
    pub(crate) q8k_simd: Vec<BlockQ8K>,
}

impl QuantizedActs {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of activation rows last quantized.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Values per row.
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// The activation format held (`None` before the first [`QuantizedActs::quantize`]).
    pub fn ty(&self) -> Option<GgmlType> {
        self.ty
    }

    /// The Q8_K rows in the layout the kernels of `path` take: permuted groups on the x86 SIMD paths.
    pub(crate) fn q8k_for(&self, path: KernelPath) -> &[BlockQ8K] {
        match path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::Avx512 => &self.q8k_simd,
            _ => &self.q8k,
        }
    }

    /// Sets `q8k_simd` from `q8k` (x86-64 only).
    pub(crate) fn permute_q8k(&mut self) {
        #[cfg(target_arch = "x86_64")]
        {
            self.q8k_simd.clear();
            self.q8k_simd.extend(self.q8k.iter().map(kernels::permute_q8k));
        }
    }

    /// Rows padded to a multiple of 8, the row stride of `q8_1_s`.
    pub(crate) fn t_pad(&self) -> usize {
        self.n_rows.div_ceil(8) * 8
    }

    /// Converts `x` (`x.len() / n_cols` rows of `n_cols` values) to the `vec_dot_type` of `weight_ty`.
    ///
    /// # Panics
    /// If `weight_ty` has no kernel, `n_cols` is zero or not a whole number of blocks of the activation
    /// format, or `x.len()` is not a multiple of `n_cols`. These are shape errors of the caller; weight shapes
    /// are validated by [`crate::QMatrix::new`].
    pub fn quantize(&mut self, weight_ty: GgmlType, x: &[f32], n_cols: usize) {
        self.quantize_with(kernels::chosen(), weight_ty, x, n_cols);
    }

    /// [`QuantizedActs::quantize`] on a given kernel path (every path gives the same bits; for tests and
    /// benchmarks).
    ///
    /// # Panics
    /// As [`QuantizedActs::quantize`], and if the CPU does not support `path`.
    pub fn quantize_with(&mut self, path: KernelPath, weight_ty: GgmlType, x: &[f32], n_cols: usize) {
        kernels::check(path);
        let ty = vec_dot_type(weight_ty)
            .unwrap_or_else(|| panic!("no CPU kernel for weights of type {weight_ty}"));
        assert!(
            n_cols > 0 && n_cols.is_multiple_of(ty.block_len()),
            "{n_cols} columns do not split into {ty} blocks"
        );
        assert!(x.len().is_multiple_of(n_cols), "{} values do not split into rows of {n_cols}", x.len());
        let n_rows = x.len() / n_cols;
        self.ty = Some(ty);
        self.n_rows = n_rows;
        self.n_cols = n_cols;
        let parallel = n_rows >= 2 * ROWS_PER_TASK && rayon::current_num_threads() > 1;
        match ty {
            GgmlType::F32 => {
                self.f32s.clear();
                self.f32s.extend_from_slice(x);
            }
            GgmlType::F16 => {
                self.f16s.clear();
                self.f16s.extend(x.iter().map(|&v| f16::from_f32(v)));
            }
            GgmlType::BF16 => {
                self.bf16s.clear();
                self.bf16s.resize(x.len(), bf16::ZERO);
                scalar::quantize_row_bf16(x, &mut self.bf16s);
            }
            GgmlType::Q8_0 => {
                let nb = n_cols / QK;
                self.q8_0.resize(n_rows * nb, bytemuck::Zeroable::zeroed());
                let f = |(xr, out): (&[f32], &mut [BlockQ8_0])| {
                    for (xr, out) in xr.chunks_exact(n_cols).zip(out.chunks_exact_mut(nb)) {
                        kernels::quantize_q8_0(path, xr, out);
                    }
                };
                let (xs, outs) = (n_cols * ROWS_PER_TASK, nb * ROWS_PER_TASK);
                if parallel {
                    x.par_chunks(xs).zip(self.q8_0.par_chunks_mut(outs)).for_each(f);
                } else {
                    x.chunks(xs).zip(self.q8_0.chunks_mut(outs)).for_each(f);
                }
                if n_rows > 1 {
                    let t_pad = self.t_pad();
                    transpose_into(&mut self.d_t, &self.q8_0, nb, t_pad, |b| b.d.to_f32());
                }
            }
            GgmlType::Q8_1 => {
                let nb = n_cols / QK;
                self.q8_1.resize(n_rows * nb, bytemuck::Zeroable::zeroed());
                let f = |(xr, out): (&[f32], &mut [BlockQ8_1])| {
                    for (xr, out) in xr.chunks_exact(n_cols).zip(out.chunks_exact_mut(nb)) {
                        kernels::quantize_q8_1(path, xr, out);
                    }
                };
                let (xs, outs) = (n_cols * ROWS_PER_TASK, nb * ROWS_PER_TASK);
                if parallel {
                    x.par_chunks(xs).zip(self.q8_1.par_chunks_mut(outs)).for_each(f);
                } else {
                    x.chunks(xs).zip(self.q8_1.chunks_mut(outs)).for_each(f);
                }
                if n_rows > 1 {
                    let t_pad = self.t_pad();
                    transpose_into(&mut self.d_t, &self.q8_1, nb, t_pad, |b| b.d.to_f32());
                    transpose_into(&mut self.q8_1_s, &self.q8_1, nb, t_pad, |b| b.s.to_f32());
                }
            }
            GgmlType::Q8K => {
                let nb = n_cols / QK_K;
                self.q8k.resize(n_rows * nb, bytemuck::Zeroable::zeroed());
                for (xr, out) in x.chunks_exact(n_cols).zip(self.q8k.chunks_exact_mut(nb)) {
                    kernels::quantize_q8k(path, xr, out);
                }
                self.permute_q8k();
            }
            _ => unreachable!("vec_dot_type returned {ty}"),
        }
    }
}

impl QuantizedActs {
    /// Makes `self` hold rows `rows` of `src` followed by zero rows, `padded_to` rows in all: a static-shape
    /// batch cut out of a larger one. The copied rows are `src`'s bits, and a zero row is all-zero blocks
    /// (what quantizing zeros gives), so [`crate::matmul()`] gives every copied row the result it gives the
    /// same row of `src`. Does not allocate once `self` has held `padded_to` rows of this type and width.
    ///
    /// # Errors
    /// [`ExecError::RowsOutOfRange`] if `rows` is not within `src`'s rows or is longer than `padded_to`, or
    /// `src` was never quantized.
    pub fn copy_rows_padded(
        &mut self,
        src: &QuantizedActs,
        rows: Range<usize>,
        padded_to: usize,
    ) -> Result<(), ExecError> {
        let bad =
            ExecError::RowsOutOfRange { start: rows.start, end: rows.end, n_rows: src.n_rows, padded_to };
        let Some(ty) = src.ty else { return Err(bad) };
        if rows.start > rows.end || rows.end > src.n_rows || rows.len() > padded_to {
            return Err(bad);
        }
        let n_cols = src.n_cols;
        self.ty = Some(ty);
        self.n_rows = padded_to;
        self.n_cols = n_cols;
        match ty {
            GgmlType::F32 => copy_padded(&mut self.f32s, &src.f32s, n_cols, &rows, padded_to),
            GgmlType::F16 => copy_padded(&mut self.f16s, &src.f16s, n_cols, &rows, padded_to),
            GgmlType::BF16 => copy_padded(&mut self.bf16s, &src.bf16s, n_cols, &rows, padded_to),
            GgmlType::Q8_0 => {
                let nb = n_cols / QK;
                copy_padded(&mut self.q8_0, &src.q8_0, nb, &rows, padded_to);
                if padded_to > 1 {
                    let t_pad = self.t_pad();
                    transpose_into(&mut self.d_t, &self.q8_0, nb, t_pad, |b| b.d.to_f32());
                }
            }
            GgmlType::Q8_1 => {
                let nb = n_cols / QK;
                copy_padded(&mut self.q8_1, &src.q8_1, nb, &rows, padded_to);
                if padded_to > 1 {
                    let t_pad = self.t_pad();
                    transpose_into(&mut self.d_t, &self.q8_1, nb, t_pad, |b| b.d.to_f32());
                    transpose_into(&mut self.q8_1_s, &self.q8_1, nb, t_pad, |b| b.s.to_f32());
                }
            }
            GgmlType::Q8K => {
                copy_padded(&mut self.q8k, &src.q8k, n_cols / QK_K, &rows, padded_to);
                self.permute_q8k();
            }
            _ => unreachable!("QuantizedActs holds {ty}"),
        }
        Ok(())
    }

    /// Bytes of heap memory the buffers hold (their capacity), for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        fn bytes<T>(v: &Vec<T>) -> usize {
            v.capacity() * size_of::<T>()
        }
        bytes(&self.f32s)
            + bytes(&self.f16s)
            + bytes(&self.bf16s)
            + bytes(&self.q8_0)
            + bytes(&self.q8_1)
            + bytes(&self.q8_1_s)
            + bytes(&self.d_t)
            + bytes(&self.q8k)
            + bytes(&self.q8k_simd)
    }
}

/// Sets `dst` to rows `rows` of `src` (rows of `per_row` elements) followed by zeroed rows, `padded_to` rows
/// in all.
fn copy_padded<T: bytemuck::Zeroable + Copy>(
    dst: &mut Vec<T>,
    src: &[T],
    per_row: usize,
    rows: &Range<usize>,
    padded_to: usize,
) {
    dst.clear();
    dst.extend_from_slice(&src[rows.start * per_row..rows.end * per_row]);
    dst.resize(padded_to * per_row, T::zeroed());
}

/// Writes `f` of every block of `blocks` (rows of `nb` blocks) block-major into `out[b * t_pad + t]`, zero
/// padded.
fn transpose_into<B>(out: &mut Vec<f32>, blocks: &[B], nb: usize, t_pad: usize, f: impl Fn(&B) -> f32) {
    out.clear();
    out.resize(nb * t_pad, 0.0);
    for (t, row) in blocks.chunks_exact(nb).enumerate() {
        for (b, blk) in row.iter().enumerate() {
            out[b * t_pad + t] = f(blk);
        }
    }
}
