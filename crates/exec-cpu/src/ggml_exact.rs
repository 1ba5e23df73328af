//! Arithmetic that reproduces ggml's CPU backend bit for bit where rounding differences change results:
//! flash attention for short batches and the SIMD SiLU used by SwiGLU. Small models amplify last-bit
//! differences (a flipped rounding of an activation before Q8 quantization moves a layer's output), so pinion
//! mirrors these to reproduce llama.cpp's logits and greedy tokens.
//!
//! llama.cpp's default CPU attention (`flash_attn = auto`) takes one of two paths per batch of queries:
//! - fewer than 64 queries (decode, short prompts): `ggml_compute_forward_flash_attn_ext_f16_one_chunk`. The
//!   query is rounded to f16, each score is an f16·f16 dot product accumulated in f32, and the softmax is
//!   online, with the value accumulator *stored in f16* after every key (`ggml_vec_mad_f16`,
//!   `ggml_vec_scale_f16`), converted to f32 and divided by the sum at the end;
//! - 64 queries or more (long prompts): a tiled path in f32 throughout, which [`crate::attention`] matches.
//!
//! The f16 accumulator loses about three decimal digits, and small models amplify such differences into
//! different greedy tokens, so pinion mirrors the first path exactly, including the order of the additions
//! of ggml's AVX-512 f16 dot product.

use std::cell::RefCell;

use half::f16;
use rayon::prelude::*;

use crate::pool::SpinPool;

/// Batches of at least this many queries use f32 attention (ggml's `GGML_FA_TILE_Q`).
pub const GGML_FA_TILE_Q: usize = 64;

thread_local! {
    static SCRATCH: RefCell<(Vec<f16>, Vec<f16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Causal grouped-query attention with the arithmetic of ggml's `one_chunk` flash-attention path.
///
/// Arguments as [`crate::attention`]. Runs on the current rayon pool, parallel over (token, head).
///
/// # Panics
/// On inconsistent shapes, as [`crate::attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_f16acc(
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    attention_f16acc_impl(
        None, q, n_tokens, first_pos, n_heads, n_kv_heads, head_dim, k, v, scale, window, out,
    );
}

/// [`attention_f16acc`] on a [`SpinPool`], each thread taking every `n`-th (token, head): for decode, where
/// the work is too short for a work-stealing pool's wake-ups.
///
/// # Panics
/// As [`attention_f16acc`].
#[allow(clippy::too_many_arguments)]
pub fn attention_f16acc_on(
    pool: &SpinPool,
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    attention_f16acc_impl(
        Some(pool),
        q,
        n_tokens,
        first_pos,
        n_heads,
        n_kv_heads,
        head_dim,
        k,
        v,
        scale,
        window,
        out,
    );
}

/// Output rows shared by the threads of a [`SpinPool`] job, each writing distinct rows.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: used only inside one `SpinPool::run` call whose threads write pairwise distinct rows of the
// `&mut [f32]` it was made from, which stays borrowed until `run` returns.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Row `row` of `width` values.
    ///
    /// # Safety
    /// No other thread may access the row while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, row: usize, width: usize) -> &mut [f32] {
        assert!((row + 1) * width <= self.len, "row {row} out of bounds");
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(row * width), width) }
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_f16acc_impl(
    pool: Option<&SpinPool>,
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: {n_heads} heads over {n_kv_heads}"
    );
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let n_kv = first_pos + n_tokens;
    assert_eq!(q.len(), n_tokens * q_dim, "attention: q length");
    assert_eq!(out.len(), n_tokens * q_dim, "attention: out length");
    assert!(
        k.len() >= n_kv * kv_dim && v.len() >= n_kv * kv_dim,
        "attention: KV cache shorter than {n_kv} rows"
    );
    let group = n_heads / n_kv_heads;

    let simd = head_dim.is_multiple_of(64) && avx512_ok();
    let one = |(idx, o): (usize, &mut [f32])| {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let kv_off = (h / group) * head_dim;
        let qh = &q[idx * head_dim..(idx + 1) * head_dim];
        let n_seen = first_pos + t + 1;
        // Keys masked by a sliding window are skipped, as ggml skips a mask entry of -inf.
        let first = window.map_or(0, |w| n_seen.saturating_sub(w.max(1)));
        SCRATCH.with(|s| {
            let (q16, acc) = &mut *s.borrow_mut();
            q16.clear();
            q16.resize(head_dim, f16::ZERO);
            acc.clear();
            acc.resize(head_dim, f16::ZERO);
            let head = Head { q: qh, k, v, kv_dim, kv_off, first, n_seen, scale };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `avx512_ok` confirmed AVX-512F, F16C and FMA at run time; `head_dim` is a multiple
                // of 64; the shape assertions above guarantee every row `pos * kv_dim + kv_off + head_dim`
                // for `pos < n_seen` lies inside `k` and `v`, and `q16`, `acc`, `o` have `head_dim` values.
                unsafe { avx512::head(&head, q16, acc, o) };
                return;
            }
            let _ = simd;
            head_scalar(&head, q16, acc, o);
        });
    };
    let n_rows = n_tokens * n_heads;
    match pool {
        Some(pool) if pool.n_threads() > 1 && n_rows > 1 => {
            let shared = SharedOut { ptr: out.as_mut_ptr(), len: out.len() };
            pool.run(&|idx, n| {
                for row in (idx..n_rows).step_by(n) {
                    // SAFETY: thread `idx` alone handles rows `idx, idx + n, ...`, so no two threads touch the
                    // same row, and `out` outlives the `run` call.
                    one((row, unsafe { shared.row(row, head_dim) }));
                }
            });
        }
        None if rayon::current_num_threads() > 1 && n_rows > 1 => {
            out.par_chunks_mut(head_dim).enumerate().for_each(one);
        }
        _ => out.chunks_mut(head_dim).enumerate().for_each(one),
    }
}

/// One query head's view of the inputs.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f16],
    v: &'a [f16],
    kv_dim: usize,
    kv_off: usize,
    /// The first cache row the query sees (after a sliding window).
    first: usize,
    n_seen: usize,
    scale: f32,
}

/// ggml's one-chunk loop for one query head, in portable Rust.
fn head_scalar(h: &Head<'_>, q16: &mut [f16], acc: &mut [f16], out: &mut [f32]) {
    let hd = h.q.len();
    for (d, &x) in q16.iter_mut().zip(h.q) {
        *d = f16::from_f32(x);
    }
    let mut m = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    for pos in h.first..h.n_seen {
        let row = pos * h.kv_dim + h.kv_off;
        let s = dot_f16_ggml(&h.k[row..row + hd], q16) * h.scale;
        let mut ms = 1.0f32;
        let mut vs = 1.0f32;
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            for a in acc.iter_mut() {
                *a = f16::from_f32(a.to_f32() * ms);
            }
        } else {
            vs = (s - m).exp();
        }
        for (a, &x) in acc.iter_mut().zip(&h.v[row..row + hd]) {
            *a = f16::from_f32(x.to_f32().mul_add(vs, a.to_f32()));
        }
        // GCC contracts `S*ms + vs` into one fused multiply-add (-ffp-contract=fast), so ggml does too.
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = a.to_f32() * inv;
    }
}

/// Whether the AVX-512 head kernel can run here (checked once).
fn avx512_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var("PINION_KERNELS").map_or(true, |k| k == "avx512")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Head, reduce16};

    /// ggml's one-chunk loop for one query head with AVX-512, in ggml's lane order (bit-identical to
    /// [`super::head_scalar`]).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, F16C and FMA. `h.q.len()` (the head size) must be a multiple of 64 and
    /// equal the lengths of `q16`, `acc` and `out`; for every `pos < h.n_seen`, `pos * h.kv_dim + h.kv_off +
    /// h.q.len()` must not exceed the lengths of `h.k` and `h.v`.
    #[target_feature(enable = "avx512f,f16c,fma")]
    pub(super) unsafe fn head(h: &Head<'_>, q16: &mut [f16], acc: &mut [f16], out: &mut [f32]) {
        let hd = h.q.len();
        let (qp, q16p, accp) = (h.q.as_ptr(), q16.as_mut_ptr() as *mut u16, acc.as_mut_ptr() as *mut u16);
        // Every access below reads or writes 16 lanes at an offset `i < hd` stepping by 16, inside slices of
        // `hd` values (the caller's contract), or inside the K/V row of `hd` values that starts at `row`, which
        // the caller guarantees lies inside `k` and `v`.
        for i in (0..hd).step_by(16) {
            // SAFETY: `i + 16 <= hd` (hd is a multiple of 16), inside `q` and `q16`.
            unsafe {
                let x = _mm512_loadu_ps(qp.add(i));
                _mm256_storeu_si256(
                    q16p.add(i) as *mut __m256i,
                    _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x),
                );
            }
        }
        let load16 = |p: *const u16| {
            // SAFETY: every call site passes a pointer to 16 readable f16 values (see above).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        };
        let (kp, vp) = (h.k.as_ptr() as *const u16, h.v.as_ptr() as *const u16);
        let mut m = f32::NEG_INFINITY;
        let mut sum = 0.0f32;
        for pos in h.first..h.n_seen {
            let row = pos * h.kv_dim + h.kv_off;
            // Score: four accumulators of 16 lanes over steps of 64, as ggml_vec_dot_f16.
            let mut a = [_mm512_setzero_ps(); 4];
            for base in (0..hd).step_by(64) {
                for (j, aj) in a.iter_mut().enumerate() {
                    let off = base + j * 16;
                    // SAFETY: `off + 16 <= hd`: inside the K row at `row` and inside `q16`.
                    unsafe {
                        let x = load16(kp.add(row + off));
                        let y = load16(q16p.add(off));
                        *aj = _mm512_fmadd_ps(x, y, *aj);
                    }
                }
            }
            let r = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            let mut lanes = [0.0f32; 16];
            // SAFETY: `lanes` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), r) };
            let s = reduce16(&lanes) * h.scale;
            let mut vs = 1.0f32;
            if s > m {
                let m_old = m;
                m = s;
                let ms = (m_old - m).exp();
                let msv = _mm512_set1_ps(ms);
                for i in (0..hd).step_by(16) {
                    // SAFETY: `i + 16 <= hd`, inside `acc`.
                    unsafe {
                        let y = _mm512_mul_ps(load16(accp.add(i)), msv);
                        _mm256_storeu_si256(
                            accp.add(i) as *mut __m256i,
                            _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y),
                        );
                    }
                }
                sum = sum.mul_add(ms, vs);
            } else {
                vs = (s - m).exp();
                sum = sum.mul_add(1.0, vs);
            }
            let vsv = _mm512_set1_ps(vs);
            for i in (0..hd).step_by(16) {
                // SAFETY: `i + 16 <= hd`, inside the V row at `row` and inside `acc`.
                unsafe {
                    let y = _mm512_fmadd_ps(load16(vp.add(row + i)), vsv, load16(accp.add(i)));
                    _mm256_storeu_si256(
                        accp.add(i) as *mut __m256i,
                        _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y),
                    );
                }
            }
        }
        let inv = _mm512_set1_ps(if sum == 0.0 { 0.0 } else { 1.0 / sum });
        let op = out.as_mut_ptr();
        for i in (0..hd).step_by(16) {
            // SAFETY: `i + 16 <= hd`, inside `acc` and `out`.
            unsafe { _mm512_storeu_ps(op.add(i), _mm512_mul_ps(load16(accp.add(i)), inv)) };
        }
    }
}

/// `dot(x, y)` of f16 vectors in f32, in the order of ggml's AVX-512 `ggml_vec_dot_f16`: four 16-lane FMA
/// accumulators over steps of 64 elements, reduced pairwise (0+2, 1+3, then 0+1), then across lanes as a tree,
/// then a scalar tail.
pub fn dot_f16_ggml(x: &[f16], y: &[f16]) -> f32 {
    debug_assert_eq!(x.len(), y.len());
    let n = x.len();
    let np = n & !63;
    let mut acc = [[0.0f32; 16]; 4];
    for base in (0..np).step_by(64) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, lane) in a.iter_mut().enumerate() {
                let i = base + j * 16 + l;
                *lane = x[i].to_f32().mul_add(y[i].to_f32(), *lane);
            }
        }
    }
    let mut sum = 0.0f64;
    if np > 0 {
        let mut r = [0.0f32; 16];
        for l in 0..16 {
            let a02 = acc[0][l] + acc[2][l];
            let a13 = acc[1][l] + acc[3][l];
            r[l] = a02 + a13;
        }
        sum = reduce16(&r) as f64;
    }
    for i in np..n {
        sum += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    sum as f32
}

/// `exp(x)` as ggml's AVX-512 `ggml_v_expf` computes it (an ARM optimized-routines polynomial, at most 1.5 ulp
/// from the true value), lane by lane: the same fused multiply-adds in the same order. (Inlined into a function
/// compiled with FMA, each `mul_add` is one instruction; elsewhere it is a call to libm's `fmaf`: the same
/// bits. On the AVX2 and AVX-512 paths this runs the FMA build.)
pub fn expf_ggml(x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if with_fma() {
        // SAFETY: `with_fma` confirmed FMA.
        return unsafe { fma::expf(x) };
    }
    expf_body(x)
}

#[inline(always)]
fn expf_body(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0 = log2(e)
    let n = z - r;
    // b = x - n * ln2_hi - n * ln2_lo, as two fnmadds.
    let b = (-n).mul_add(f32::from_bits(0x35bf_be8e), (-n).mul_add(f32::from_bits(0x3f31_7200), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let p1 = f32::from_bits(0x3c07_2010).mul_add(b, f32::from_bits(0x3d2b_9f17)); // 0x1.0e4020p-7, 0x1.573e2ep-5
    let p2 = f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)); // 0x1.555e66p-3, 0x1.fffdb6p-2
    let p3 = f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0); // 0x1.ffffecp-1
    let j = p1.mul_add(u, p2).mul_add(u, p3);
    scalef(j, n)
}

/// `j * 2^n` for integral `n`, as `_mm512_scalef_ps` (one rounding, into the subnormals if need be).
#[inline]
fn scalef(j: f32, n: f32) -> f32 {
    let n = n as i32;
    if (-126..=127).contains(&n) {
        j * f32::from_bits(((n + 127) as u32) << 23)
    } else {
        (j as f64 * 2f64.powi(n)) as f32
    }
}

/// SiLU as ggml's AVX-512 `ggml_v_silu`: `x / (1 + expf_ggml(-x))` (on the AVX2 and AVX-512 paths, compiled
/// with FMA).
pub fn silu_ggml(x: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if with_fma() {
        // SAFETY: `with_fma` confirmed FMA.
        return unsafe { fma::silu(x) };
    }
    silu_body(x)
}

#[inline(always)]
fn silu_body(x: f32) -> f32 {
    x / (1.0 + expf_body(0.0 - x))
}

/// `gate[i] = silu(gate[i]) * up[i]`, as ggml's `ggml_vec_swiglu_f32` on an AVX-512 machine: the SIMD SiLU
/// for whole groups of 16, and the scalar `ggml_silu_f32` (libm `expf`) for the tail.
pub fn swiglu_ggml(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths");
    #[cfg(target_arch = "x86_64")]
    if with_fma() {
        // SAFETY: `with_fma` confirmed FMA.
        return unsafe { fma::swiglu(gate, up) };
    }
    swiglu_body(gate, up);
}

/// Whether the chosen kernel path has FMA (the AVX2 and AVX-512 paths do), so that the SiLU's `mul_add`s can
/// be compiled as instructions rather than libm calls.
#[cfg(target_arch = "x86_64")]
fn with_fma() -> bool {
    crate::kernels::chosen() != crate::kernels::KernelPath::Scalar
}

/// `exp` and the SiLU compiled with FMA: the same operations, so the same bits, without a `fmaf` call per
/// multiply-add (9 per value: most of a decode step's SwiGLU time).
#[cfg(target_arch = "x86_64")]
mod fma {
    /// [`super::expf_body`] with FMA.
    ///
    /// # Safety
    /// The CPU must support FMA.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn expf(x: f32) -> f32 {
        super::expf_body(x)
    }

    /// [`super::silu_body`] with FMA.
    ///
    /// # Safety
    /// The CPU must support FMA.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn silu(x: f32) -> f32 {
        super::silu_body(x)
    }

    /// [`super::swiglu_body`] with FMA.
    ///
    /// # Safety
    /// The CPU must support FMA.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        super::swiglu_body(gate, up);
    }

    /// [`super::gated_threshold`] with the SiLU, with FMA.
    ///
    /// # Safety
    /// The CPU must support FMA.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn swiglu_threshold(gate: &mut [f32], up: &[f32], t: &[f32]) -> usize {
        super::gated_threshold(gate, up, t, super::silu_body)
    }
}

#[inline(always)]
fn swiglu_body(gate: &mut [f32], up: &[f32]) {
    let body = gate.len() & !15;
    for (g, &u) in gate[..body].iter_mut().zip(&up[..body]) {
        *g = silu_body(*g) * u;
    }
    for (g, &u) in gate[body..].iter_mut().zip(&up[body..]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Threshold-sparse SwiGLU (CATS, or any rule expressed as per-neuron thresholds): for rows of `t.len()`
/// neurons (one row per token), `gate[i] = silu(gate[i]) * up[i]` where `|silu(gate[i])| >= t[i % t.len()]`,
/// else 0.
///
/// The SiLU is [`silu_ggml`], so with thresholds of 0 this equals [`swiglu_ggml`] on AVX-512 machines up to
/// the tail. Returns how many (neuron, token) pairs were active.
///
/// # Panics
/// If the lengths differ or `gate` is not whole rows of `t.len()`.
pub fn swiglu_threshold(gate: &mut [f32], up: &[f32], t: &[f32]) -> usize {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths");
    #[cfg(target_arch = "x86_64")]
    if with_fma() {
        // SAFETY: `with_fma` confirmed FMA.
        return unsafe { fma::swiglu_threshold(gate, up, t) };
    }
    gated_threshold(gate, up, t, silu_body)
}

/// `gate[i] = act(gate[i]) * up[i]` where `|act(gate[i])| >= t[i % t.len()]`, else 0; how many were active.
#[inline(always)]
fn gated_threshold(gate: &mut [f32], up: &[f32], t: &[f32], act: impl Fn(f32) -> f32) -> usize {
    assert!(
        !t.is_empty() && gate.len().is_multiple_of(t.len()),
        "{} activations for rows of {} thresholds",
        gate.len(),
        t.len()
    );
    let mut active = 0;
    for (g_row, u_row) in gate.chunks_exact_mut(t.len()).zip(up.chunks_exact(t.len())) {
        for ((g, &u), &t) in g_row.iter_mut().zip(u_row).zip(t) {
            let a = act(*g);
            if a.abs() >= t {
                *g = a * u;
                active += 1;
            } else {
                *g = 0.0;
            }
        }
    }
    active
}

/// GELU as ggml's CPU backend computes it on f32 rows (`GGML_GELU_FP16`, on by default): 0 at or below -10,
/// the input at or above 10, and otherwise `ggml_table_gelu_f16`, the tanh approximation ([`crate::gelu`]) of
/// the input rounded to f16, itself rounded to f16. Like ggml, a table of all 65,536 f16 values (built on first
/// use, 128 KiB) is read rather than `tanh` computed: the same bits, a load instead of two libm calls.
#[inline]
pub fn gelu_ggml(x: f32) -> f32 {
    gelu_with(gelu_table(), x)
}

/// `ggml_table_gelu_f16`: for each f16 bit pattern, the f16 bits of its GELU.
fn gelu_table() -> &'static [u16; 1 << 16] {
    static TABLE: std::sync::OnceLock<Box<[u16; 1 << 16]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0u16; 1 << 16]);
        for (bits, v) in t.iter_mut().enumerate() {
            *v = f16::from_f32(crate::gelu(f16::from_bits(bits as u16).to_f32())).to_bits();
        }
        t
    })
}

#[inline]
fn gelu_with(table: &[u16; 1 << 16], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32()
    }
}

/// `gate[i] = gelu(gate[i]) * up[i]` as ggml's `ggml_vec_geglu_f32` ([`gelu_ggml`]).
///
/// # Panics
/// If the lengths differ.
pub fn geglu_ggml(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "geglu: lengths");
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_with(table, *g) * u;
    }
}

/// Threshold-sparse GeGLU (as [`swiglu_threshold`] on a GELU-gated FFN): `gate[i] = gelu(gate[i]) * up[i]`
/// where `|gelu(gate[i])| >= t[i % t.len()]`, else 0; with thresholds of 0 this equals [`geglu_ggml`]. Returns
/// how many (neuron, token) pairs were active.
///
/// # Panics
/// If the lengths differ or `gate` is not whole rows of `t.len()`.
pub fn geglu_threshold(gate: &mut [f32], up: &[f32], t: &[f32]) -> usize {
    assert_eq!(gate.len(), up.len(), "geglu: lengths");
    gated_threshold(gate, up, t, gelu_ggml)
}

/// Tree reduction of 16 lanes as `_mm512_reduce_add_ps`: halves added until one lane is left.
fn reduce16(r: &[f32; 16]) -> f32 {
    let mut v = *r;
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            v[l] += v[l + width];
        }
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn ggml_constants_are_the_hex_floats_of_the_source() {
        // Each bit pattern above must be the f32 of the C hex-float literal in ggml's vec.h, 0x1.<frac>p<exp>.
        let hexf = |frac: &str, exp: i32| {
            let m = u64::from_str_radix(frac, 16).unwrap() as f64 / 16f64.powi(frac.len() as i32);
            ((1.0 + m) * 2f64.powi(exp)) as f32
        };
        let table = [
            (0x4b40_0000, "8", 23),
            (0x3fb8_aa3b, "715476", 0),
            (0x3f31_7200, "62e4", -1),
            (0x35bf_be8e, "7f7d1c", -20),
            (0x3c07_2010, "0e4020", -7),
            (0x3d2b_9f17, "573e2e", -5),
            (0x3e2a_af33, "555e66", -3),
            (0x3eff_fedb, "fffdb6", -2),
            (0x3f7f_fff6, "ffffec", -1),
        ];
        for (bits, frac, exp) in table {
            assert_eq!(f32::from_bits(bits), hexf(frac, exp), "0x1.{frac}p{exp}");
        }
    }

    #[test]
    fn expf_ggml_is_within_two_ulp_of_exp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = expf_ggml(x) as f64;
            let ulp = f32::EPSILON as f64 * want;
            assert!((got - want).abs() <= 2.0 * ulp, "exp({x}) = {got}, want {want}");
            x += 0.037;
        }
        assert_eq!(expf_ggml(0.0), 1.0);
        assert_eq!(expf_ggml(-200.0), 0.0);
        assert_eq!(expf_ggml(200.0), f32::INFINITY);
    }

    #[test]
    fn swiglu_ggml_matches_the_formula() {
        let mut st = 3;
        let gate: Vec<f32> = (0..37).map(|_| lcg(&mut st) * 8.0).collect();
        let up: Vec<f32> = (0..37).map(|_| lcg(&mut st)).collect();
        let mut got = gate.clone();
        swiglu_ggml(&mut got, &up);
        for i in 0..37 {
            let g = gate[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            assert!((got[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "{i}: {} vs {want}", got[i]);
        }
    }

    /// The FMA-compiled `exp`, SiLU and SiLU loops (the chosen path's) give the bits of the portable ones
    /// (`mul_add` as libm `fmaf` calls), over inputs from the subnormal outputs to the infinite ones.
    #[test]
    fn swiglu_with_fma_is_the_portable_swiglu() {
        let mut st = 11;
        let mut gate: Vec<f32> =
            (0..20_000).map(|i| lcg(&mut st) * [0.01, 1.0, 10.0, 100.0, 200.0][i % 5]).collect();
        gate.extend([0.0, -0.0, 88.7, -88.7, 103.9, -103.9, 1e-30, -1e-30, f32::MAX, f32::MIN]);
        let up: Vec<f32> = (0..gate.len()).map(|_| lcg(&mut st) * 3.0).collect();
        let (mut got, mut want) = (gate.clone(), gate.clone());
        swiglu_ggml(&mut got, &up);
        swiglu_body(&mut want, &up);
        for i in 0..gate.len() {
            assert_eq!(got[i].to_bits(), want[i].to_bits(), "swiglu({}): {} vs {}", gate[i], got[i], want[i]);
        }
        let t: Vec<f32> = (0..gate.len()).map(|i| [0.0, 0.01, 0.5][i % 3]).collect();
        let (mut got, mut want) = (gate.clone(), gate.clone());
        let n_got = swiglu_threshold(&mut got, &up, &t);
        let n_want = gated_threshold(&mut want, &up, &t, silu_body);
        assert_eq!(n_got, n_want);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "thresholded swiglu");
        for &x in &gate {
            assert_eq!(silu_ggml(x).to_bits(), silu_body(x).to_bits(), "silu({x})");
            assert_eq!(expf_ggml(x).to_bits(), expf_body(x).to_bits(), "exp({x})");
        }
    }

    #[test]
    fn swiglu_threshold_zeroes_small_activations_only() {
        let gate = [-6.0f32, -0.1, 0.05, 0.3, 4.0, 0.0];
        let up = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let t = 0.1;
        let mut got = gate;
        let active = swiglu_threshold(&mut got, &up, &[t]);
        for i in 0..gate.len() {
            let a = silu_ggml(gate[i]);
            let want = if a.abs() >= t { a * up[i] } else { 0.0 };
            assert_eq!(got[i], want, "{i}");
        }
        // silu(-6) = -0.0148, silu(-0.1) = -0.0475, silu(0.05) = 0.0256, silu(0) = 0: only 0.3 and 4.0 pass.
        assert_eq!(active, 2);
        let mut all = gate;
        assert_eq!(swiglu_threshold(&mut all, &up, &[0.0; 6]), gate.len());
        // Per-neuron thresholds, rows of three (two tokens): neuron 0's threshold keeps -6 out and lets 0.3
        // pass, neuron 1's lets -0.1 and 4.0 pass, neuron 2's keeps 0.05 and 0 out.
        let mut rows = gate;
        assert_eq!(swiglu_threshold(&mut rows, &up, &[0.02, 0.01, 5.0]), 3);
        assert_eq!(rows[0], 0.0);
        assert_eq!(rows[1], silu_ggml(-0.1) * 2.0);
        assert_eq!(rows[2], 0.0);
        assert_eq!(rows[3], silu_ggml(0.3) * 4.0);
        assert_eq!(rows[4], silu_ggml(4.0) * 5.0);
        assert_eq!(rows[5], 0.0);
    }

    #[test]
    fn avx512_head_is_bit_identical_to_scalar() {
        if !avx512_ok() {
            eprintln!("note: no AVX-512 here; the SIMD head kernel is not tested");
            return;
        }
        let mut st = 11;
        for (hd, kv_dim, n_seen) in [(64, 192, 1), (64, 192, 37), (128, 256, 300)] {
            let q: Vec<f32> = (0..hd).map(|_| lcg(&mut st) * 3.0).collect();
            let k: Vec<f16> = (0..n_seen * kv_dim).map(|_| f16::from_f32(lcg(&mut st))).collect();
            let v: Vec<f16> = (0..n_seen * kv_dim).map(|_| f16::from_f32(lcg(&mut st))).collect();
            let h = Head {
                q: &q,
                k: &k,
                v: &v,
                kv_dim,
                kv_off: kv_dim - hd,
                first: n_seen / 3,
                n_seen,
                scale: 0.125,
            };
            let (mut q16, mut acc, mut want) = (vec![f16::ZERO; hd], vec![f16::ZERO; hd], vec![0.0f32; hd]);
            head_scalar(&h, &mut q16, &mut acc, &mut want);
            let (mut q16, mut acc, mut got) = (vec![f16::ZERO; hd], vec![f16::ZERO; hd], vec![0.0f32; hd]);
            // SAFETY: avx512_ok() checked the CPU; hd is a multiple of 64 and the rows fit (built above).
            unsafe { avx512::head(&h, &mut q16, &mut acc, &mut got) };
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "hd {hd} n_seen {n_seen}");
        }
    }

    #[test]
    fn dot_matches_f64_within_f32_rounding() {
        let mut st = 1;
        for n in [1, 7, 63, 64, 65, 128, 200] {
            let x: Vec<f16> = (0..n).map(|_| f16::from_f32(lcg(&mut st))).collect();
            let y: Vec<f16> = (0..n).map(|_| f16::from_f32(lcg(&mut st))).collect();
            let want: f64 = x.iter().zip(&y).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
            let got = dot_f16_ggml(&x, &y) as f64;
            assert!((got - want).abs() < 1e-5 * n as f64, "n {n}: {got} vs {want}");
        }
    }

    #[test]
    fn f16_accumulating_attention_is_close_to_exact_attention() {
        let (n_heads, n_kv_heads, hd, first_pos, n_tokens) = (4, 2, 64, 5, 3);
        let n_kv = first_pos + n_tokens;
        let mut st = 7;
        let q: Vec<f32> = (0..n_tokens * n_heads * hd).map(|_| lcg(&mut st) * 2.0).collect();
        let k: Vec<f16> = (0..n_kv * n_kv_heads * hd).map(|_| f16::from_f32(lcg(&mut st))).collect();
        let v: Vec<f16> = (0..n_kv * n_kv_heads * hd).map(|_| f16::from_f32(lcg(&mut st))).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut got = vec![0.0; q.len()];
        attention_f16acc(&q, n_tokens, first_pos, n_heads, n_kv_heads, hd, &k, &v, scale, None, &mut got);
        // Exact reference in f64, causal, grouped.
        let kvd = n_kv_heads * hd;
        for t in 0..n_tokens {
            for h in 0..n_heads {
                let kh = h / (n_heads / n_kv_heads);
                let qv = &q[(t * n_heads + h) * hd..][..hd];
                let seen = first_pos + t + 1;
                let scores: Vec<f64> = (0..seen)
                    .map(|p| {
                        let kr = &k[p * kvd + kh * hd..][..hd];
                        qv.iter().zip(kr).map(|(a, b)| *a as f64 * b.to_f64()).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = w.iter().sum();
                for d in 0..hd {
                    let want: f64 =
                        (0..seen).map(|p| w[p] * v[p * kvd + kh * hd + d].to_f64()).sum::<f64>() / z;
                    let g = got[(t * n_heads + h) * hd + d] as f64;
                    // f16 accumulation: a few units of f16 precision (2^-11) relative to the magnitudes summed.
                    assert!((g - want).abs() < 4e-3, "t {t} h {h} d {d}: {g} vs {want}");
                }
            }
        }
    }
}
