//! The CPU side of PowerInfer-2's sparse FFN for one decode token: per-row dot products, down-column axpys,
//! cluster-by-cluster gate / up / down, and a deterministic per-cluster accumulator.
//!
//! A layer's neurons are cut into *clusters* (the packed format's records). For one token, a cluster's work is
//! [`cluster_gates`] (the gate rows of the neurons the predictor marks, then the threshold test) followed by
//! [`cluster_up_down`] (the up rows of the neurons that passed, the activation, and `h * down_column` added
//! into the cluster's own partial output). [`sparse_ffn_cluster`] does both at once; the offloaded engine calls
//! the two halves with its reads of the passing neurons' up rows and down columns in between.
//!
//! # Determinism
//!
//! Every cluster accumulates into its own slot of a [`ClusterSums`], in neuron order, and
//! [`ClusterSums::reduce_into`] adds the slots in cluster order. The output therefore does not depend on which
//! thread computed which cluster, nor on the order clusters became ready: an engine that computes clusters as
//! their reads complete gives the same bits as one that computes them from memory in order. Every kernel path
//! (scalar, AVX2, AVX-512) gives the same bits too: the dot products are the matmul's ([`row_dot`] equals
//! [`crate::matmul()`] for that row and token), and [`axpy_column`] computes `v = d * q` (exact in f32 for Q8_0,
//! a plain conversion for F16) and then `out = fma(a, v, out)` on every path.
//!
//! # Threshold semantics
//!
//! As the runtime's `FfnActivation`: a neuron's score is `|silu(g)|` for SiLU, `|gelu(g)|` for GELU, `relu(g)`
//! for ReLU and `relu(min(g, u))` for dReLU; it is active when `score >= t` (SiLU, GELU) or `score > t` (ReLU
//! family, so `t = 0` is the activation's own sparsity). The gate phase keeps SiLU, GELU and ReLU neurons whose
//! score passes, and dReLU neurons with `relu(g) > t` (necessary for `relu(min(g, u)) > t`); dReLU's up test
//! comes after the up row. The hidden activation is `silu(g) * u`, `gelu(g) * u`, `relu(g) * u` or
//! `relu(g) * relu(u)`.

use std::marker::PhantomData;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytemuck::Pod;
use pinion_format::GgmlType;
use pinion_format::quant::{
    self, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, QK_K,
};

use crate::acts::{QuantizedActs, vec_dot_type};
#[cfg(target_arch = "x86_64")]
use crate::kernels::avx512::BlockMajor;
use crate::kernels::{self, KQuant, KernelPath, scalar};
use crate::pool::{SpinPool, split_range};

/// Rows whose dot products are computed together (four AVX-512 row pairs, two AVX2 tiles of four).
const GROUP: usize = 8;

/// The typed rows `rows[..]` padded to `GROUP` by repeating the last one.
fn typed_group<'a, B: Pod>(ty: GgmlType, rows: &[&'a [u8]], nb: usize) -> [&'a [B]; GROUP] {
    std::array::from_fn(|i| {
        let r = rows[i.min(rows.len() - 1)];
        let b: &[B] = quant::blocks(r).unwrap_or_else(|e| panic!("{ty} row: {e}"));
        assert_eq!(b.len(), nb, "{ty} row of {} bytes for {nb} blocks", r.len());
        b
    })
}

/// Dot products of the `n <= GROUP` rows `w` (padded) with activation row `a` on AVX-512, in as few row pairs
/// as cover `n` rows.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_tile {
    ($tile:ident, $w:expr, $a:expr, $nb:expr, $n:expr, $out:expr) => {{
        let (w, a, nb, n, out) = ($w, $a, $nb, $n, $out);
        let mut res = [[0.0f32; 1]; GROUP];
        let bm = BlockMajor::NONE;
        // SAFETY: the path is AVX-512 and supported (every caller of `dot_group` checked it), every row holds
        // `nb` blocks (`typed_group`), and `res` holds `2 * P` outputs.
        unsafe {
            match n.div_ceil(2) {
                1 => kernels::avx512::$tile::<1, 1>([[w[0], w[1]]], [a], bm, nb, &mut res),
                2 => kernels::avx512::$tile::<2, 1>(
                    std::array::from_fn(|p| [w[2 * p], w[2 * p + 1]]),
                    [a],
                    bm,
                    nb,
                    &mut res,
                ),
                3 => kernels::avx512::$tile::<3, 1>(
                    std::array::from_fn(|p| [w[2 * p], w[2 * p + 1]]),
                    [a],
                    bm,
                    nb,
                    &mut res,
                ),
                _ => kernels::avx512::$tile::<4, 1>(
                    std::array::from_fn(|p| [w[2 * p], w[2 * p + 1]]),
                    [a],
                    bm,
                    nb,
                    &mut res,
                ),
            }
        }
        (0..n).for_each(|i| out[i] = res[i][0]);
    }};
}

/// `out[i] = dot(rows[i], token)` for `rows.len() <= GROUP` rows of type `ty` (checked by the caller against
/// `acts`), with the kernels of [`crate::matmul()`].
fn dot_group(
    path: KernelPath,
    ty: GgmlType,
    rows: &[&[u8]],
    acts: &QuantizedActs,
    token: usize,
    out: &mut [f32],
) {
    let n = rows.len();
    debug_assert!(n <= GROUP && out.len() >= n);
    if n == 0 {
        return;
    }
    let k = acts.n_cols();
    let nb = k / ty.block_len();
    let t = token;
    match ty {
        GgmlType::Q4_1 => {
            let w = typed_group::<BlockQ4_1>(ty, rows, nb);
            let a: &[BlockQ8_1] = &acts.q8_1[t * nb..(t + 1) * nb];
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512 => {
                    avx512_tile!(tile_q4_1, w, a, nb, n, out);
                }
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2 => {
                    for h in 0..n.div_ceil(4) {
                        let mut res = [[0.0f32; 1]; 4];
                        let rs = std::array::from_fn(|i| w[4 * h + i]);
                        // SAFETY: as above.
                        unsafe { kernels::avx2::tile_q4_1::<4, 1>(rs, [a], nb, &mut res) };
                        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
                    }
                }
                _ => (0..n).for_each(|i| out[i] = scalar::vec_dot_q4_1_q8_1(w[i], a)),
            }
        }
        GgmlType::Q5_1 => {
            let w = typed_group::<BlockQ5_1>(ty, rows, nb);
            let a: &[BlockQ8_1] = &acts.q8_1[t * nb..(t + 1) * nb];
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512 => {
                    avx512_tile!(tile_q5_1, w, a, nb, n, out);
                }
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2 => {
                    for h in 0..n.div_ceil(4) {
                        let mut res = [[0.0f32; 1]; 4];
                        let rs = std::array::from_fn(|i| w[4 * h + i]);
                        // SAFETY: as above.
                        unsafe { kernels::avx2::tile_q5_1::<4, 1>(rs, [a], nb, &mut res) };
                        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
                    }
                }
                _ => (0..n).for_each(|i| out[i] = scalar::vec_dot_q5_1_q8_1(w[i], a)),
            }
        }
        GgmlType::Q4_0 => {
            let w = typed_group::<BlockQ4_0>(ty, rows, nb);
            let a: &[BlockQ8_0] = &acts.q8_0[t * nb..(t + 1) * nb];
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512 => {
                    avx512_tile!(tile_q4_0, w, a, nb, n, out);
                }
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2 => {
                    for h in 0..n.div_ceil(4) {
                        let mut res = [[0.0f32; 1]; 4];
                        let rs = std::array::from_fn(|i| w[4 * h + i]);
                        // SAFETY: as for Q4_1.
                        unsafe { kernels::avx2::tile_q4_0::<4, 1>(rs, [a], nb, &mut res) };
                        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
                    }
                }
                _ => (0..n).for_each(|i| out[i] = scalar::vec_dot_q4_0_q8_0(w[i], a)),
            }
        }
        GgmlType::Q5_0 => {
            let w = typed_group::<BlockQ5_0>(ty, rows, nb);
            let a: &[BlockQ8_0] = &acts.q8_0[t * nb..(t + 1) * nb];
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512 => {
                    avx512_tile!(tile_q5_0, w, a, nb, n, out);
                }
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2 => {
                    for h in 0..n.div_ceil(4) {
                        let mut res = [[0.0f32; 1]; 4];
                        let rs = std::array::from_fn(|i| w[4 * h + i]);
                        // SAFETY: as for Q4_1.
                        unsafe { kernels::avx2::tile_q5_0::<4, 1>(rs, [a], nb, &mut res) };
                        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
                    }
                }
                _ => (0..n).for_each(|i| out[i] = scalar::vec_dot_q5_0_q8_0(w[i], a)),
            }
        }
        GgmlType::Q8_0 => {
            let w = typed_group::<BlockQ8_0>(ty, rows, nb);
            let a: &[BlockQ8_0] = &acts.q8_0[t * nb..(t + 1) * nb];
            match path {
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512 => {
                    avx512_tile!(tile_q8_0, w, a, nb, n, out);
                }
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx2 => {
                    for h in 0..n.div_ceil(4) {
                        let mut res = [[0.0f32; 1]; 4];
                        let rs = std::array::from_fn(|i| w[4 * h + i]);
                        // SAFETY: as for Q4_1.
                        unsafe { kernels::avx2::tile_q8_0::<4, 1>(rs, [a], nb, &mut res) };
                        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
                    }
                }
                _ => (0..n).for_each(|i| out[i] = scalar::vec_dot_q8_0_q8_0(w[i], a)),
            }
        }
        GgmlType::Q2K => dot_group_k::<BlockQ2K>(path, ty, rows, acts, token, out),
        GgmlType::Q3K => dot_group_k::<BlockQ3K>(path, ty, rows, acts, token, out),
        GgmlType::Q4K => dot_group_k::<BlockQ4K>(path, ty, rows, acts, token, out),
        GgmlType::Q5K => dot_group_k::<BlockQ5K>(path, ty, rows, acts, token, out),
        GgmlType::Q6K => dot_group_k::<BlockQ6K>(path, ty, rows, acts, token, out),
        GgmlType::BF16 => {
            let w = typed_group::<half::bf16>(ty, rows, k);
            let a = &acts.bf16s[t * k..(t + 1) * k];
            (0..n).for_each(|i| out[i] = kernels::vec_dot_bf16(path, w[i], a));
        }
        GgmlType::F32 => {
            let w = typed_group::<f32>(ty, rows, k);
            let a = &acts.f32s[t * k..(t + 1) * k];
            (0..n).for_each(|i| out[i] = kernels::vec_dot_f32(path, w[i], a));
        }
        GgmlType::F16 => {
            let w = typed_group::<half::f16>(ty, rows, k);
            let a = &acts.f16s[t * k..(t + 1) * k];
            (0..n).for_each(|i| out[i] = kernels::vec_dot_f16(path, w[i], a));
        }
        _ => panic!("no CPU kernel for weights of type {ty}"),
    }
}

/// [`dot_group`] for K-quant rows: tiles of four rows on the SIMD paths, one row at a time on the scalar one.
fn dot_group_k<B: KQuant>(
    path: KernelPath,
    ty: GgmlType,
    rows: &[&[u8]],
    acts: &QuantizedActs,
    token: usize,
    out: &mut [f32],
) {
    let n = rows.len();
    let nb = acts.n_cols() / QK_K;
    let w = typed_group::<B>(ty, rows, nb);
    let a: &[BlockQ8K] = &acts.q8k_for(path)[token * nb..(token + 1) * nb];
    if path == KernelPath::Scalar {
        (0..n).for_each(|i| out[i] = B::vec_dot(w[i], a));
        return;
    }
    for h in 0..n.div_ceil(4) {
        let mut res = [[0.0f32; 1]; 4];
        kernels::tile_k::<B, 4, 1>(path, std::array::from_fn(|i| w[4 * h + i]), [a], nb, &mut res);
        (4 * h..n.min(4 * h + 4)).for_each(|i| out[i] = res[i - 4 * h][0]);
    }
}

/// Panics unless `acts` holds token `token` quantized for weights of type `ty`.
fn check_acts(ty: GgmlType, acts: &QuantizedActs, token: usize) {
    let want = vec_dot_type(ty);
    assert!(
        want.is_some() && acts.ty() == want,
        "activations are {:?} but {ty} weights need {want:?}",
        acts.ty()
    );
    assert!(token < acts.n_rows(), "token {token} of {} quantized", acts.n_rows());
}

/// One quantized weight row (`row`: the row's bytes, `acts.n_cols()` values of type `ty`) against token `token`
/// of `acts`: the same bits as [`crate::matmul()`] gives for that row and token.
///
/// # Panics
/// If `acts` was not quantized for `ty`, `token` is out of range, `row` is not one row of `acts.n_cols()`
/// values (or not 2-byte aligned for block types, 4-byte for F32), or `ty` has no kernel.
pub fn row_dot(ty: GgmlType, row: &[u8], acts: &QuantizedActs, token: usize) -> f32 {
    row_dot_with(kernels::chosen(), ty, row, acts, token)
}

/// [`row_dot`] on a given kernel path (every path gives the same bits; for tests and benchmarks).
///
/// # Panics
/// As [`row_dot`], and if the CPU does not support `path`.
pub fn row_dot_with(path: KernelPath, ty: GgmlType, row: &[u8], acts: &QuantizedActs, token: usize) -> f32 {
    kernels::check(path);
    check_acts(ty, acts, token);
    let mut out = [0.0f32; 1];
    dot_group(path, ty, &[row], acts, token, &mut out);
    out[0]
}

/// Bytes of a down column of `d_model` values of type `ty` (Q8_0, F16 or F32), or `None` for another type or
/// a length Q8_0 cannot split.
pub fn column_bytes(ty: GgmlType, d_model: usize) -> Option<usize> {
    match ty {
        GgmlType::Q8_0 if d_model.is_multiple_of(32) => Some(d_model / 32 * scalar::Q8_0_BYTES),
        GgmlType::F16 => Some(2 * d_model),
        GgmlType::F32 => Some(4 * d_model),
        _ => None,
    }
}

/// `out += a * dequant(col)` for a down column of `out.len()` values stored as Q8_0, F16 or F32 (raw
/// little-endian bytes, any alignment).
///
/// Every path computes, per value, `v = dequant(q)` (for Q8_0 `d * q`, exact in f32) and then
/// `out = fma(a, v, out)`, so all paths give the same bits.
///
/// # Panics
/// If `ty` is not Q8_0, F16 or F32, or `col` does not hold exactly `out.len()` values.
pub fn axpy_column(ty: GgmlType, a: f32, col: &[u8], out: &mut [f32]) {
    axpy_column_with(kernels::chosen(), ty, a, col, out);
}

/// [`axpy_column`] on a given kernel path (every path gives the same bits; for tests and benchmarks).
///
/// # Panics
/// As [`axpy_column`], and if the CPU does not support `path`.
pub fn axpy_column_with(path: KernelPath, ty: GgmlType, a: f32, col: &[u8], out: &mut [f32]) {
    kernels::check(path);
    let want = column_bytes(ty, out.len())
        .unwrap_or_else(|| panic!("no down-column kernel for {ty} columns of {} values", out.len()));
    assert_eq!(col.len(), want, "{ty} column of {} values", out.len());
    match (ty, path) {
        #[cfg(target_arch = "x86_64")]
        (GgmlType::Q8_0, KernelPath::Avx512) => {
            // SAFETY: the path is supported (checked above) and implies AVX-512F, AVX2, FMA and F16C.
            unsafe { kernels::avx512::axpy_q8_0(out, a, col) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::F16, KernelPath::Avx512) => {
            // SAFETY: as above.
            unsafe { kernels::avx512::axpy_f16_bytes(out, a, col) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::F32, KernelPath::Avx512) => {
            // SAFETY: as above.
            unsafe { kernels::avx512::axpy_f32_bytes(out, a, col) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::Q8_0, KernelPath::Avx2) => {
            // SAFETY: the path is supported (checked above) and implies AVX2, FMA and F16C.
            unsafe { kernels::avx2::axpy_q8_0(out, a, col) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::F16, KernelPath::Avx2) => {
            // SAFETY: as above.
            unsafe { kernels::avx2::axpy_f16_bytes(out, a, col) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::F32, KernelPath::Avx2) => {
            // SAFETY: as above.
            unsafe { kernels::avx2::axpy_f32_bytes(out, a, col) }
        }
        (GgmlType::Q8_0, _) => scalar::axpy_q8_0(out, a, col),
        (GgmlType::F16, _) => scalar::axpy_f16_bytes(out, a, col),
        _ => scalar::axpy_f32_bytes(out, a, col),
    }
}

/// The FFN's gated activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseAct {
    /// `silu(g) * u` (SwiGLU), active when `|silu(g)| >= t`.
    Silu,
    /// `gelu(g) * u` (GeGLU, ggml's f16-table GELU), active when `|gelu(g)| >= t`.
    Gelu,
    /// `relu(g) * u`, active when `relu(g) > t`.
    Relu,
    /// `relu(g) * relu(u)`, active when `relu(min(g, u)) > t`.
    Drelu,
}

/// The shape, types and selection rule of one sparse FFN layer.
#[derive(Clone, Copy, Debug)]
pub struct SparseFfn {
    /// The gated activation.
    pub act: SparseAct,
    /// The score threshold (see the module docs; `0.0` is dense for SiLU and the own sparsity of ReLU).
    pub threshold: f32,
    /// Width of the layer's input and output.
    pub d_model: usize,
    /// Type of the gate rows.
    pub gate_ty: GgmlType,
    /// Type of the up rows.
    pub up_ty: GgmlType,
    /// Type of the down columns (Q8_0, F16 or F32).
    pub down_ty: GgmlType,
}

impl SparseFfn {
    /// Bytes of one gate row.
    pub fn gate_row_bytes(&self) -> usize {
        self.gate_ty.row_bytes(self.d_model).expect("gate rows of d_model values")
    }

    /// Bytes of one up row.
    pub fn up_row_bytes(&self) -> usize {
        self.up_ty.row_bytes(self.d_model).expect("up rows of d_model values")
    }

    /// Bytes of one down column.
    pub fn down_col_bytes(&self) -> usize {
        column_bytes(self.down_ty, self.d_model)
            .unwrap_or_else(|| panic!("no down-column kernel for {} columns", self.down_ty))
    }

    /// Whether the gate pre-activation `g` passes the gate phase under threshold `t`.
    #[inline]
    fn gate_passes(&self, g: f32, t: f32) -> bool {
        match self.act {
            SparseAct::Silu => crate::silu_ggml(g).abs() >= t,
            SparseAct::Gelu => crate::gelu_ggml(g).abs() >= t,
            SparseAct::Relu | SparseAct::Drelu => g.max(0.0) > t,
        }
    }

    /// The hidden activation of a neuron that passed the gate phase, or `None` if the up value rules it out.
    #[inline]
    fn hidden(&self, g: f32, u: f32) -> Option<f32> {
        match self.act {
            SparseAct::Silu => Some(crate::silu_ggml(g) * u),
            SparseAct::Gelu => Some(crate::gelu_ggml(g) * u),
            SparseAct::Relu => Some(g.max(0.0) * u),
            SparseAct::Drelu => (g.min(u).max(0.0) > self.threshold).then(|| g.max(0.0) * u.max(0.0)),
        }
    }

    fn check(&self, acts: &TokenActs) {
        check_acts(self.gate_ty, acts.gate, acts.token);
        check_acts(self.up_ty, acts.up, acts.token);
        assert!(
            acts.gate.n_cols() == self.d_model && acts.up.n_cols() == self.d_model,
            "activations of width {} / {} for d_model {}",
            acts.gate.n_cols(),
            acts.up.n_cols(),
            self.d_model
        );
    }
}

/// One token's activations, quantized for the gate type and for the up type (the same buffer when both have
/// the same `vec_dot_type`).
#[derive(Clone, Copy)]
pub struct TokenActs<'a> {
    /// Quantized for [`SparseFfn::gate_ty`].
    pub gate: &'a QuantizedActs,
    /// Quantized for [`SparseFfn::up_ty`].
    pub up: &'a QuantizedActs,
    /// The token (activation row).
    pub token: usize,
}

/// A neuron's up row and down column.
#[derive(Clone, Copy, Debug)]
pub struct UpDown<'a> {
    /// The up row (`d_model` values of [`SparseFfn::up_ty`]).
    pub up: &'a [u8],
    /// The down column (`d_model` values of [`SparseFfn::down_ty`]).
    pub down: &'a [u8],
}

/// A cluster held in memory as the packed format stores a record: its neurons' gate rows back to back, then
/// one *bundle* (up row followed by down column) per neuron, `bundle_stride` bytes apart.
#[derive(Clone, Copy, Debug)]
pub struct ClusterRows<'a> {
    /// The gate rows of the cluster's neurons, back to back.
    pub gate: &'a [u8],
    /// The bundles: neuron `i`'s up row starts at `i * bundle_stride`, its down column right after it.
    pub bundles: &'a [u8],
    /// Distance between consecutive bundles (at least up row plus down column bytes).
    pub bundle_stride: usize,
}

impl<'a> ClusterRows<'a> {
    /// The up row and down column of neuron `i`.
    pub fn up_down(&self, spec: &SparseFfn, i: usize) -> UpDown<'a> {
        let (ub, db) = (spec.up_row_bytes(), spec.down_col_bytes());
        let b = &self.bundles[i * self.bundle_stride..];
        UpDown { up: &b[..ub], down: &b[ub..ub + db] }
    }
}

/// Which of a cluster's (or a layer's) neurons a token may use: the predictor's mask, and per-neuron gate
/// thresholds that replace [`SparseFfn::threshold`] in the gate test (a selection rule that weighs neurons,
/// such as the runtime's weight-informed one, is a threshold per neuron). Indexed like the neurons.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter<'a> {
    /// Neurons the predictor marks (`None`: all).
    pub mask: Option<&'a [bool]>,
    /// Per-neuron gate thresholds (`None`: [`SparseFfn::threshold`] for every neuron).
    pub thresholds: Option<&'a [f32]>,
}

impl<'a> Filter<'a> {
    /// No predictor, the layer's threshold for every neuron.
    pub const NONE: Filter<'static> = Filter { mask: None, thresholds: None };

    /// A predictor's mask and the layer's threshold.
    pub fn mask(mask: Option<&'a [bool]>) -> Filter<'a> {
        Filter { mask, thresholds: None }
    }

    /// The part of a layer's filter for neurons `r`.
    pub fn slice(&self, r: std::ops::Range<usize>) -> Filter<'a> {
        Filter { mask: self.mask.map(|m| &m[r.clone()]), thresholds: self.thresholds.map(|t| &t[r]) }
    }

    /// Whether the mask rules out every neuron.
    fn none_marked(&self) -> bool {
        self.mask.is_some_and(|m| !m.contains(&true))
    }

    fn check(&self, n: usize) {
        if let Some(m) = self.mask {
            assert_eq!(m.len(), n, "mask length for {n} neurons");
        }
        if let Some(t) = self.thresholds {
            assert_eq!(t.len(), n, "threshold count for {n} neurons");
        }
    }
}

/// Reusable per-thread state of one cluster's computation: which neurons passed the gate phase and their gate
/// values.
#[derive(Clone, Default, Debug)]
pub struct ClusterGates {
    /// Positions (in the cluster) of the neurons that passed, ascending.
    passed: Vec<u32>,
    /// Gate pre-activations of the passing neurons.
    gate: Vec<f32>,
    /// Up pre-activations of the passing neurons.
    up: Vec<f32>,
}

impl ClusterGates {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions in the cluster of the neurons that passed the last [`cluster_gates`], ascending.
    pub fn passed(&self) -> &[u32] {
        &self.passed
    }

    /// Gate pre-activations of the neurons in [`ClusterGates::passed`].
    pub fn gate_values(&self) -> &[f32] {
        &self.gate
    }
}

/// Gate phase of one cluster for one token: computes the gate rows of the neurons `filter`'s mask marks (all
/// if `None`; `mask[i]` is neuron `i`) and keeps in `gates` those passing the gate test (with the filter's
/// threshold for the neuron, if it has any). `gate_block` holds the cluster's gate rows back to back. Returns
/// the number of neurons that passed.
///
/// # Panics
/// If the activations do not fit `spec`, `gate_block` is not whole rows, or the filter has another length.
pub fn cluster_gates(
    spec: &SparseFfn,
    acts: &TokenActs,
    gate_block: &[u8],
    filter: Filter<'_>,
    gates: &mut ClusterGates,
) -> usize {
    cluster_gates_with(kernels::chosen(), spec, acts, gate_block, filter, gates)
}

/// [`cluster_gates`] on a given kernel path.
///
/// # Panics
/// As [`cluster_gates`], and if the CPU does not support `path`.
pub fn cluster_gates_with(
    path: KernelPath,
    spec: &SparseFfn,
    acts: &TokenActs,
    gate_block: &[u8],
    filter: Filter<'_>,
    gates: &mut ClusterGates,
) -> usize {
    kernels::check(path);
    spec.check(acts);
    let rb = spec.gate_row_bytes();
    assert!(gate_block.len().is_multiple_of(rb), "gate block of {} bytes, rows of {rb}", gate_block.len());
    let n = gate_block.len() / rb;
    filter.check(n);
    let (mask, thresholds) = (filter.mask, filter.thresholds);
    gates.passed.clear();
    gates.gate.clear();
    let mut idx = [0u32; GROUP];
    let mut rows: [&[u8]; GROUP] = [&[]; GROUP];
    let mut vals = [0.0f32; GROUP];
    let mut k = 0;
    let mut flush = |k: usize, idx: &[u32; GROUP], rows: &[&[u8]; GROUP], gates: &mut ClusterGates| {
        dot_group(path, spec.gate_ty, &rows[..k], acts.gate, acts.token, &mut vals);
        for (&i, &g) in idx[..k].iter().zip(&vals[..k]) {
            let t = thresholds.map_or(spec.threshold, |t| t[i as usize]);
            if spec.gate_passes(g, t) {
                gates.passed.push(i);
                gates.gate.push(g);
            }
        }
    };
    for i in 0..n {
        if mask.is_some_and(|m| !m[i]) {
            continue;
        }
        idx[k] = i as u32;
        rows[k] = &gate_block[i * rb..(i + 1) * rb];
        k += 1;
        if k == GROUP {
            flush(k, &idx, &rows, gates);
            k = 0;
        }
    }
    flush(k, &idx, &rows, gates);
    gates.passed.len()
}

/// Up/down phase of one cluster for one token, after [`cluster_gates`]: `bundles[j]` is the up row and down
/// column of the `j`-th passing neuron (`gates.passed()[j]`). Computes their up rows, the activation (dReLU
/// drops neurons whose up value fails the threshold), and adds `h * down_column` into `slot` in neuron order.
/// Returns the number of active neurons.
///
/// # Panics
/// If the activations do not fit `spec`, `bundles.len() != gates.passed().len()`, a row or column has the
/// wrong size, or `slot.len() != spec.d_model`.
pub fn cluster_up_down(
    spec: &SparseFfn,
    acts: &TokenActs,
    gates: &mut ClusterGates,
    bundles: &[UpDown],
    slot: &mut [f32],
) -> usize {
    cluster_up_down_with(kernels::chosen(), spec, acts, gates, bundles, slot)
}

/// [`cluster_up_down`] on a given kernel path.
///
/// # Panics
/// As [`cluster_up_down`], and if the CPU does not support `path`.
pub fn cluster_up_down_with(
    path: KernelPath,
    spec: &SparseFfn,
    acts: &TokenActs,
    gates: &mut ClusterGates,
    bundles: &[UpDown],
    slot: &mut [f32],
) -> usize {
    kernels::check(path);
    spec.check(acts);
    assert_eq!(bundles.len(), gates.passed.len(), "one bundle per passing neuron");
    up_down(path, spec, acts, gates, &|j| bundles[j], slot)
}

/// [`cluster_up_down`] with each passing neuron's bundle from `bundle(i)`, `i` its index in the cluster (an
/// entry of `gates.passed()`), instead of a list: a caller whose bundles live in several places finds them
/// without building one.
///
/// # Panics
/// As [`cluster_up_down`].
pub fn cluster_up_down_by<'b>(
    spec: &SparseFfn,
    acts: &TokenActs,
    gates: &mut ClusterGates,
    bundle: &dyn Fn(u32) -> UpDown<'b>,
    slot: &mut [f32],
) -> usize {
    spec.check(acts);
    up_down_passed(kernels::chosen(), spec, acts, gates, bundle, slot)
}

/// The up/down phase with each passing neuron's bundle from `bundle(i)`, `i` its index in the cluster.
fn up_down_passed<'b>(
    path: KernelPath,
    spec: &SparseFfn,
    acts: &TokenActs,
    gates: &mut ClusterGates,
    bundle: impl Fn(u32) -> UpDown<'b>,
    slot: &mut [f32],
) -> usize {
    let passed = std::mem::take(&mut gates.passed);
    let n = up_down(path, spec, acts, gates, &|j| bundle(passed[j]), slot);
    gates.passed = passed;
    n
}

/// The up/down phase with bundle `j` of the `j`-th passing neuron from `bundle`.
fn up_down<'b>(
    path: KernelPath,
    spec: &SparseFfn,
    acts: &TokenActs,
    gates: &mut ClusterGates,
    bundle: &dyn Fn(usize) -> UpDown<'b>,
    slot: &mut [f32],
) -> usize {
    assert_eq!(slot.len(), spec.d_model, "slot length");
    // `gates.passed` may be lent out by the caller; `gates.gate` has one value per passing neuron.
    let n = gates.gate.len();
    let (ub, db) = (spec.up_row_bytes(), spec.down_col_bytes());
    gates.up.resize(n, 0.0);
    let mut rows: [&[u8]; GROUP] = [&[]; GROUP];
    for j0 in (0..n).step_by(GROUP) {
        let k = GROUP.min(n - j0);
        for (i, r) in rows[..k].iter_mut().enumerate() {
            *r = bundle(j0 + i).up;
            assert_eq!(r.len(), ub, "up row bytes");
        }
        dot_group(path, spec.up_ty, &rows[..k], acts.up, acts.token, &mut gates.up[j0..j0 + k]);
    }
    // Down columns in neuron order, `AXPY_BATCH` at a time (the same bits as one by one).
    let mut active = 0;
    let mut hs = [0.0f32; AXPY_BATCH];
    let mut cols: [&[u8]; AXPY_BATCH] = [&[]; AXPY_BATCH];
    let mut k = 0;
    for j in 0..n {
        if let Some(h) = spec.hidden(gates.gate[j], gates.up[j]) {
            let col = bundle(j).down;
            assert_eq!(col.len(), db, "down column bytes");
            (hs[k], cols[k]) = (h, col);
            k += 1;
            if k == AXPY_BATCH {
                axpy_columns(path, spec.down_ty, &hs, &cols, slot);
                k = 0;
            }
            active += 1;
        }
    }
    axpy_columns(path, spec.down_ty, &hs[..k], &cols[..k], slot);
    active
}

/// Down columns added in one pass over the slot.
const AXPY_BATCH: usize = 4;

/// `slot += a[i] * cols[i]` for `i` in order (each column checked by the caller): the same bits as
/// [`axpy_column_with`] column by column, since every value sees the same chain of FMAs.
fn axpy_columns(path: KernelPath, ty: GgmlType, a: &[f32], cols: &[&[u8]], slot: &mut [f32]) {
    match (ty, path, a.len()) {
        #[cfg(target_arch = "x86_64")]
        (GgmlType::Q8_0, KernelPath::Avx512, AXPY_BATCH) => {
            let (a, c) = (std::array::from_fn(|i| a[i]), std::array::from_fn(|i| cols[i]));
            // SAFETY: the path is supported (checked by every caller) and implies AVX-512F, AVX2, FMA, F16C.
            unsafe { kernels::avx512::axpy_q8_0_n::<AXPY_BATCH>(slot, a, c) }
        }
        #[cfg(target_arch = "x86_64")]
        (GgmlType::Q8_0, KernelPath::Avx2, AXPY_BATCH) => {
            let (a, c) = (std::array::from_fn(|i| a[i]), std::array::from_fn(|i| cols[i]));
            // SAFETY: the path is supported (checked by every caller) and implies AVX2, FMA and F16C.
            unsafe { kernels::avx2::axpy_q8_0_n::<AXPY_BATCH>(slot, a, c) }
        }
        _ => {
            for (&a, col) in a.iter().zip(cols) {
                axpy_column_with(path, ty, a, col, slot);
            }
        }
    }
}

/// One cluster's whole sparse FFN for one token: [`cluster_gates`] then the up/down phase with the bundles
/// of `rows`, accumulating into `slot` (which is not cleared). Returns the number of active neurons.
///
/// # Panics
/// As [`cluster_gates`] and [`cluster_up_down`].
pub fn sparse_ffn_cluster(
    spec: &SparseFfn,
    acts: &TokenActs,
    rows: &ClusterRows,
    filter: Filter<'_>,
    gates: &mut ClusterGates,
    slot: &mut [f32],
) -> usize {
    sparse_ffn_cluster_with(kernels::chosen(), spec, acts, rows, filter, gates, slot)
}

/// [`sparse_ffn_cluster`] on a given kernel path.
///
/// # Panics
/// As [`sparse_ffn_cluster`], and if the CPU does not support `path`.
pub fn sparse_ffn_cluster_with(
    path: KernelPath,
    spec: &SparseFfn,
    acts: &TokenActs,
    rows: &ClusterRows,
    filter: Filter<'_>,
    gates: &mut ClusterGates,
    slot: &mut [f32],
) -> usize {
    cluster_gates_with(path, spec, acts, rows.gate, filter, gates);
    up_down_passed(path, spec, acts, gates, |i| rows.up_down(spec, i as usize), slot)
}

/// One partial output vector (`d_model` f32) per cluster of a layer, summed in cluster order.
///
/// A *round* (one token of one layer) starts with [`ClusterSums::reset`]; each cluster's slot is taken once
/// per round, zeroed when taken, either with [`ClusterSums::slot`] (`&mut self`) or from several threads with
/// [`ClusterSums::shared`]; [`ClusterSums::reduce_into`] then adds the taken slots in cluster order. Clusters
/// never taken (no neuron predicted) contribute nothing, and a slot that stayed zero changes nothing either
/// (`x + 0.0 == x`), so the result depends only on the values of the slots, not on who computed them or when.
#[derive(Debug)]
pub struct ClusterSums {
    d_model: usize,
    data: Vec<f32>,
    taken: Vec<AtomicBool>,
}

impl ClusterSums {
    /// Slots for `n_clusters` clusters of output width `d_model`, none taken.
    pub fn new(n_clusters: usize, d_model: usize) -> Self {
        ClusterSums {
            d_model,
            data: vec![0.0; n_clusters * d_model],
            taken: (0..n_clusters).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Number of clusters.
    pub fn n_clusters(&self) -> usize {
        self.taken.len()
    }

    /// Output width.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Starts a new round: no slot is taken.
    pub fn reset(&mut self) {
        for t in &mut self.taken {
            *t.get_mut() = false;
        }
    }

    /// Cluster `k`'s slot: zeroed if this is its first use in the round, else as left.
    ///
    /// # Panics
    /// If `k` is out of range.
    pub fn slot(&mut self, k: usize) -> &mut [f32] {
        let d = self.d_model;
        let first = !std::mem::replace(self.taken[k].get_mut(), true);
        let s = &mut self.data[k * d..(k + 1) * d];
        if first {
            s.fill(0.0);
        }
        s
    }

    /// A handle giving each slot once to whichever thread claims it first.
    pub fn shared(&mut self) -> SharedSlots<'_> {
        let (ptr, len) = (self.data.as_mut_ptr(), self.data.len());
        SharedSlots { taken: &self.taken, d_model: self.d_model, ptr, len, _borrow: PhantomData }
    }

    /// Whether cluster `k`'s slot was taken in this round.
    pub fn is_taken(&self, k: usize) -> bool {
        self.taken[k].load(Ordering::Acquire)
    }

    /// `out = sum of the taken slots`, added in cluster order starting from `+0.0`.
    ///
    /// # Panics
    /// If `out.len() != d_model`.
    pub fn reduce_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.d_model, "output length");
        out.fill(0.0);
        for (k, s) in self.data.chunks_exact(self.d_model.max(1)).enumerate() {
            if self.taken[k].load(Ordering::Acquire) {
                for (o, &v) in out.iter_mut().zip(s) {
                    *o += v;
                }
            }
        }
    }
}

/// Slots of a [`ClusterSums`] claimed concurrently: each at most once per handle, from any thread.
///
/// It holds the slot vector's pointer, taken once from `&mut ClusterSums` and borrowed mutably for `'a`, so no
/// reference to the vector exists while slots are handed out: each claim makes a reference to its own slot
/// only.
pub struct SharedSlots<'a> {
    taken: &'a [AtomicBool],
    d_model: usize,
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the pointer is only used by `claim`, which gives each disjoint slot to exactly one caller (an atomic
// swap decides), so sharing the handle between threads creates no aliasing `&mut`; `f32` is `Send`.
unsafe impl Sync for SharedSlots<'_> {}

impl<'a> SharedSlots<'a> {
    /// Claims cluster `k`'s slot, zeroed.
    ///
    /// # Panics
    /// If `k` is out of range or its slot was already taken in this round.
    pub fn claim(&self, k: usize) -> &'a mut [f32] {
        assert!(!self.taken[k].swap(true, Ordering::AcqRel), "cluster {k} claimed twice in one round");
        let d = self.d_model;
        assert!((k + 1) * d <= self.len, "slot {k} out of range");
        // SAFETY: `ptr..ptr + len` is the slot vector, mutably borrowed for `'a` by this handle (so neither
        // resized nor read elsewhere); the swap above succeeded for exactly one caller, so this is the only
        // reference to the disjoint range `k * d..(k + 1) * d`, which the assert keeps in bounds.
        let slot = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(k * d), d) };
        slot.fill(0.0);
        slot
    }
}

/// Per-thread buffers of [`sparse_ffn_on`].
#[derive(Debug, Default)]
pub struct SparseScratch {
    per_thread: Vec<Mutex<ClusterGates>>,
}

impl SparseScratch {
    /// Empty buffers (they grow on first use).
    pub fn new() -> Self {
        Self::default()
    }
}

/// A whole layer's sparse FFN for one token on `pool`: cluster `k` of `clusters` is computed (with
/// `filter`'s part for it: neurons `k * c..` where `c` is the first cluster's neuron count) into slot
/// `k` of `sums`, clusters split statically into one contiguous range per thread, then the slots are reduced
/// in cluster order into `out`. Returns the number of active neurons.
///
/// # Panics
/// As [`sparse_ffn_cluster`], if `sums` does not have one slot per cluster, or the filter does not cover every
/// neuron.
#[allow(clippy::too_many_arguments)]
pub fn sparse_ffn_on(
    pool: &SpinPool,
    spec: &SparseFfn,
    acts: &TokenActs,
    clusters: &[ClusterRows],
    filter: Filter<'_>,
    sums: &mut ClusterSums,
    scratch: &mut SparseScratch,
    out: &mut [f32],
) -> usize {
    let path = kernels::chosen();
    assert_eq!(sums.n_clusters(), clusters.len(), "one slot per cluster");
    assert_eq!(sums.d_model(), spec.d_model, "slot width");
    let rb = spec.gate_row_bytes();
    let len = |k: usize| clusters[k].gate.len() / rb;
    let c0 = if clusters.is_empty() { 0 } else { len(0) };
    filter.check((0..clusters.len()).map(len).sum::<usize>());
    let n_threads = pool.n_threads();
    scratch.per_thread.resize_with(n_threads, || Mutex::new(ClusterGates::new()));
    let per_thread = &scratch.per_thread;
    sums.reset();
    let active = std::sync::atomic::AtomicUsize::new(0);
    {
        let slots = sums.shared();
        pool.run(&|idx, n| {
            let mut gates = per_thread[idx].lock().unwrap_or_else(|e| e.into_inner());
            let mut mine = 0;
            for k in split_range(clusters.len(), idx, n, 1) {
                let f = filter.slice(k * c0..k * c0 + len(k));
                if f.none_marked() {
                    continue;
                }
                let slot = slots.claim(k);
                mine += sparse_ffn_cluster_with(path, spec, acts, &clusters[k], f, &mut gates, slot);
            }
            active.fetch_add(mine, Ordering::Relaxed);
        });
    }
    sums.reduce_into(out);
    active.into_inner()
}

/// [`sparse_ffn_on`] for several tokens at once (decode steps of several sequences): token `r` has activations
/// `acts[r]`, filter `filters[r]`, slots `sums[r]` and output row `r` of `out` (`acts.len() x d_model`). Each
/// thread takes its clusters one at a time and computes them for every token in turn, so a cluster's weights
/// are fetched from memory once for all of them; each token's slots and their reduction are exactly
/// [`sparse_ffn_on`]'s, so each output row has the bits that token gets alone. Returns the number of active
/// (neuron, token) pairs.
///
/// # Panics
/// As [`sparse_ffn_on`], and if `acts`, `filters` and `sums` differ in length or `out` is not one row per
/// token.
#[allow(clippy::too_many_arguments)]
pub fn sparse_ffn_rows_on(
    pool: &SpinPool,
    spec: &SparseFfn,
    acts: &[TokenActs],
    clusters: &[ClusterRows],
    filters: &[Filter<'_>],
    sums: &mut [ClusterSums],
    scratch: &mut SparseScratch,
    out: &mut [f32],
) -> usize {
    let path = kernels::chosen();
    let n = acts.len();
    assert!(filters.len() == n && sums.len() == n, "one filter and one set of slots per token");
    assert_eq!(out.len(), n * spec.d_model, "one output row per token");
    let rb = spec.gate_row_bytes();
    let len = |k: usize| clusters[k].gate.len() / rb;
    let c0 = if clusters.is_empty() { 0 } else { len(0) };
    let n_neurons = (0..clusters.len()).map(len).sum::<usize>();
    for (f, s) in filters.iter().zip(sums.iter()) {
        f.check(n_neurons);
        assert_eq!(s.n_clusters(), clusters.len(), "one slot per cluster");
        assert_eq!(s.d_model(), spec.d_model, "slot width");
    }
    let n_threads = pool.n_threads();
    scratch.per_thread.resize_with(n_threads, || Mutex::new(ClusterGates::new()));
    let per_thread = &scratch.per_thread;
    sums.iter_mut().for_each(ClusterSums::reset);
    let active = std::sync::atomic::AtomicUsize::new(0);
    {
        let slots: Vec<SharedSlots<'_>> = sums.iter_mut().map(ClusterSums::shared).collect();
        let slots = &slots[..];
        pool.run(&|idx, n_parts| {
            let mut gates = per_thread[idx].lock().unwrap_or_else(|e| e.into_inner());
            let mut mine = 0;
            for k in split_range(clusters.len(), idx, n_parts, 1) {
                for r in 0..n {
                    let f = filters[r].slice(k * c0..k * c0 + len(k));
                    if f.none_marked() {
                        continue;
                    }
                    let slot = slots[r].claim(k);
                    mine += sparse_ffn_cluster_with(path, spec, &acts[r], &clusters[k], f, &mut gates, slot);
                }
            }
            active.fetch_add(mine, Ordering::Relaxed);
        });
    }
    for (s, o) in sums.iter().zip(out.chunks_exact_mut(spec.d_model.max(1))) {
        s.reduce_into(o);
    }
    active.into_inner()
}
