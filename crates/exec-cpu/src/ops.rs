//! Element-wise and row-wise operations: RMS norm, RoPE, activations, softmax.
//!
//! Each mirrors the arithmetic of the corresponding ggml CPU op where that matters for reproducing
//! llama.cpp's outputs; differences are noted per function.

use rayon::prelude::*;

/// Elements below which an element-wise op stays on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// RMS-normalizes each row of `x` (rows of `weight.len()` values) and multiplies by `weight`, as ggml's
/// `rms_norm` followed by `mul`: the sum of squares is accumulated in f64 from f32 squares, the mean
/// rounded to f32, then `scale = 1 / sqrt(mean + eps)` in f32 and `out = (x * scale) * weight`.
///
/// # Panics
/// If `weight` is empty, `x.len()` is not a multiple of `weight.len()`, or `out.len() != x.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rms_norm: {} values are not rows of {n}", x.len());
    assert_eq!(out.len(), x.len(), "rms_norm: output length");
    let norm_row = |(xr, or): (&[f32], &mut [f32])| {
        let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = (v * scale) * g;
        }
    };
    if x.len() >= PAR_MIN && x.len() > n {
        x.par_chunks(n).zip(out.par_chunks_mut(n)).for_each(norm_row);
    } else {
        x.chunks(n).zip(out.chunks_mut(n)).for_each(norm_row);
    }
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(x[2i], x[2i + 1])` (llama, GGUF-permuted Q/K).
    Norm,
    /// Split halves `(x[i], x[i + n_rot / 2])` (GPT-NeoX, Gemma, Qwen).
    Neox,
}

/// Largest `n_rot` supported (pairs are cached on the stack).
pub const MAX_ROT: usize = 1024;

/// Rotates the first `n_rot` dimensions of each of the `n_heads` heads of one token at position `pos`, in
/// place, as ggml's `rope_f32` without YaRN scaling: `theta_scale = powf(freq_base, -2 / n_rot)`,
/// `theta_i = pos * theta_scale^i` by repeated multiplication in f32, divided by `factors[i]` where given
/// (Llama 3's frequency factors, `rope_freqs`, as ggml's `freq_factors`), then multiplied by `freq_scale`
/// (linear RoPE scaling; 1 for none), and `cosf`/`sinf` of that.
///
/// # Panics
/// If `x.len() != n_heads * head_dim`, `n_rot` is odd, larger than `head_dim`, or larger than [`MAX_ROT`], or
/// `factors` holds fewer than `n_rot / 2` values.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    n_rot: usize,
    pos: usize,
    freq_base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
    mode: RopeMode,
) {
    assert_eq!(x.len(), n_heads * head_dim, "rope: length");
    assert!(factors.is_none_or(|f| f.len() >= n_rot / 2), "rope: fewer than {} frequency factors", n_rot / 2);
    assert!(n_rot.is_multiple_of(2) && n_rot <= head_dim && n_rot <= MAX_ROT, "rope: bad n_rot {n_rot}");
    let half = n_rot / 2;
    let mut cs = [(0.0f32, 0.0f32); MAX_ROT / 2];
    let theta_scale = freq_base.powf(-2.0 / n_rot as f32);
    let mut theta = pos as f32;
    for (i, c) in cs.iter_mut().take(half).enumerate() {
        let t = match factors {
            Some(f) => theta / f[i],
            None => theta,
        };
        let t = freq_scale * t;
        *c = (t.cos(), t.sin());
        theta *= theta_scale;
    }
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(cos, sin)) in cs.iter().enumerate().take(half) {
            let (a, b) = match mode {
                RopeMode::Norm => (2 * i, 2 * i + 1),
                RopeMode::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            // ggml's `rotate_pairs` as GCC compiles it (-ffp-contract=fast, checked in the disassembly of
            // libggml-cpu): one product rounded, the other fused.
            head[a] = x0.mul_add(cos, -(x1 * sin));
            head[b] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// `x * sigmoid(x)` as ggml's scalar `ggml_silu_f32`. (ggml's SIMD path uses its own `expf` approximation,
/// which can differ in the last bit.)
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation, as ggml's `ggml_gelu_f32` as GCC compiles it (-ffp-contract=fast fuses
/// `1 + a*x*x` into one multiply-add: checked against llama.cpp's GELU table, whose entries differ in the last
/// f16 bit for some inputs without the fusion). ggml's CPU rows use that table ([`crate::gelu_ggml`]).
#[inline]
pub fn gelu(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (GELU_COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// `max(x, 0)`.
#[inline]
pub fn relu(x: f32) -> f32 {
    x.max(0.0)
}

fn gated(gate: &mut [f32], up: &[f32], act: fn(f32) -> f32) {
    assert_eq!(gate.len(), up.len(), "gated activation: lengths differ");
    let f = |(g, u): (&mut [f32], &[f32])| {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = act(*g) * u;
        }
    };
    if gate.len() >= PAR_MIN {
        gate.par_chunks_mut(4096).zip(up.par_chunks(4096)).for_each(f);
    } else {
        f((gate, up));
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`.
///
/// # Panics
/// If the lengths differ.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gated(gate, up, silu);
}

/// `gate[i] = gelu(gate[i]) * up[i]`.
///
/// # Panics
/// If the lengths differ.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    gated(gate, up, gelu);
}

/// `gate[i] = relu(gate[i]) * up[i]` (ReLU-gated FFNs such as ReluLLaMA and TurboSparse).
///
/// # Panics
/// If the lengths differ.
pub fn reglu(gate: &mut [f32], up: &[f32]) {
    gated(gate, up, relu);
}

/// In-place softmax as ggml's `soft_max`: subtract the max, `expf`, sum in f64, multiply by the f32 of
/// `1 / sum`. An empty slice is left alone.
pub fn softmax(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let scale = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
}
