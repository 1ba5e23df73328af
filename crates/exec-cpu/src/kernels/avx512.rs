//! AVX-512 (F, BW, VL) + VNNI kernels (x86-64).
//!
//! One 512-bit register holds the 8-lane accumulators of a *pair* of weight rows, so each `vpdpbusd`,
//! conversion and FMA serves two rows while every (row, activation) pair keeps exactly the per-lane arithmetic
//! of ggml's AVX2 code (and of [`super::scalar`]): the same integer lanes, the same `fma(d_x * d_y, lane, acc)`
//! sequence, the same final reduction. `vpdpbusd` multiplies unsigned by signed bytes, so signed weights are
//! offset into u8 (`+8` for Q4_0, `+128` for Q8_0) and the offset times the per-lane activation sum, computed
//! once per activation block, is subtracted: the integer lanes are identical.
//!
//! Two byte layouts are used for a pair `(r0, r1)` of 32-value blocks (128-bit chunks):
//! - 4-bit weights: `[r0 0..16, r1 0..16, r0 16..32, r1 16..32]`, which falls out of the nibble unpacking,
//!   with the activation permuted to `[y 0..16, y 0..16, y 16..32, y 16..32]`;
//! - 8-bit weights: `[r0 0..32, r1 0..32]` with the activation broadcast to `[y, y]`.

use std::arch::x86_64::*;

use pinion_format::quant::{BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};

use super::avx2::{f16_to_f32, hsum_halves};

/// Lane mask of `r1` in the 4-bit layout (chunks 1 and 3).
const MASK_Q4: __mmask16 = 0xF0F0;
/// Lane mask of `r1` in the 8-bit layout (chunks 2 and 3).
const MASK_Q8: __mmask16 = 0xFF00;

/// Unpacks the nibbles of two Q4 blocks into the 4-bit pair layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn nibbles_pair(q0: &[u8; 16], q1: &[u8; 16]) -> __m512i {
    // SAFETY: each reference is 16 readable bytes; loads are unaligned.
    let (a, b) = unsafe { (_mm_loadu_si128(q0.as_ptr().cast()), _mm_loadu_si128(q1.as_ptr().cast())) };
    let t = _mm256_set_m128i(b, a);
    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(t), _mm256_srli_epi16::<4>(t));
    _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
}

/// Loads an activation block in the 4-bit pair layout.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn act_q4_layout(q: &[i8; 32]) -> __m512i {
    // SAFETY: `q` is 32 readable bytes; the load is unaligned.
    let y = unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
    _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), _mm512_castsi256_si512(y))
}

/// Loads an activation block in the 8-bit pair layout.
#[target_feature(enable = "avx512f")]
#[inline]
fn act_q8_layout(q: &[i8; 32]) -> __m512i {
    // SAFETY: `q` is 32 readable bytes; the load is unaligned.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(q.as_ptr().cast()) })
}

/// Reduces the accumulators of one pair and activation to `(r0, r1)` sums in the 4-bit layout.
#[target_feature(enable = "avx512f,sse3")]
#[inline]
fn reduce_q4(v: __m512) -> (f32, f32) {
    let r0 = hsum_halves(_mm512_extractf32x4_ps::<0>(v), _mm512_extractf32x4_ps::<2>(v));
    let r1 = hsum_halves(_mm512_extractf32x4_ps::<1>(v), _mm512_extractf32x4_ps::<3>(v));
    (r0, r1)
}

/// Reduces the accumulators of one pair and activation to `(r0, r1)` sums in the 8-bit layout.
#[target_feature(enable = "avx512f,sse3")]
#[inline]
fn reduce_q8(v: __m512) -> (f32, f32) {
    let r0 = hsum_halves(_mm512_extractf32x4_ps::<0>(v), _mm512_extractf32x4_ps::<1>(v));
    let r1 = hsum_halves(_mm512_extractf32x4_ps::<2>(v), _mm512_extractf32x4_ps::<3>(v));
    (r0, r1)
}

/// Per-lane weight scales of a pair: `d0` in the lanes of `r0`, `d1` in those of `r1`.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair_scales(mask: __mmask16, d0: f32, d1: f32) -> __m512 {
    _mm512_mask_blend_ps(mask, _mm512_set1_ps(d0), _mm512_set1_ps(d1))
}

/// Q4_1 x Q8_1 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks.
///
/// With `C == 1` the `m * s` terms are summed in scalar code. With `C == 8`, they are summed eight activations
/// at a time from `s_t`, the activations' `s` values in block-major order (`s_t[b * t_pad + t]`), starting at
/// activation `c0`; each lane still computes ggml's sequential `summs = fma(m, s, summs)`.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_1<const P: usize, const C: usize>(
    w: [[&[BlockQ4_1]; 2]; P],
    a: [&[BlockQ8_1]; C],
    s_t: &[f32],
    t_pad: usize,
    c0: usize,
    nb: usize,
) -> [[[f32; C]; 2]; P] {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    assert!(C == 1 || (C == 8 && c0 + 8 <= t_pad && s_t.len() >= nb * t_pad));
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let mut summs1 = [[0.0f32; 2]; P];
    for b in 0..nb {
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // the features the caller guarantees.
        unsafe {
            let mut qy = [_mm512_setzero_si512(); C];
            let mut dy = [_mm512_setzero_ps(); C];
            let mut sy = 0.0f32;
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = act_q4_layout(&by.qs);
                dy[c] = _mm512_set1_ps(f16_to_f32(by.d));
                if C == 1 {
                    sy = f16_to_f32(by.s);
                }
            }
            for p in 0..P {
                let b0 = w[p][0].get_unchecked(b);
                let b1 = w[p][1].get_unchecked(b);
                let z = nibbles_pair(&b0.qs, &b1.qs);
                let wd = pair_scales(MASK_Q4, f16_to_f32(b0.d), f16_to_f32(b1.d));
                if C == 1 {
                    summs1[p][0] = f16_to_f32(b0.m).mul_add(sy, summs1[p][0]);
                    summs1[p][1] = f16_to_f32(b1.m).mul_add(sy, summs1[p][1]);
                }
                for c in 0..C {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), z, qy[c]));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, dy[c]), xy, acc[p][c]);
                }
            }
        }
    }
    // The `m * s` sums of the batched case, eight activations per vector, all rows' chains interleaved.
    let mut sv = [[_mm256_setzero_ps(); 2]; P];
    if C != 1 {
        for b in 0..nb {
            // SAFETY: `b * t_pad + c0 + 8 <= nb * t_pad <= s_t.len()` (checked above); the rows hold `nb`
            // blocks; FMA/AVX are enabled here.
            unsafe {
                let st = _mm256_loadu_ps(s_t.as_ptr().add(b * t_pad + c0));
                for p in 0..P {
                    for i in 0..2 {
                        let m = _mm256_set1_ps(f16_to_f32(w[p][i].get_unchecked(b).m));
                        sv[p][i] = _mm256_fmadd_ps(m, st, sv[p][i]);
                    }
                }
            }
        }
    }
    let mut out = [[[0.0f32; C]; 2]; P];
    for p in 0..P {
        let mut summs = [[0.0f32; C]; 2];
        if C == 1 {
            summs[0][0] = summs1[p][0];
            summs[1][0] = summs1[p][1];
        } else {
            for (s, v) in summs.iter_mut().zip(&sv[p]) {
                // SAFETY: `s` holds `C == 8` floats; AVX is enabled here.
                unsafe { _mm256_storeu_ps(s.as_mut_ptr(), *v) };
            }
        }
        for c in 0..C {
            let (r0, r1) = reduce_q4(acc[p][c]);
            out[p][0][c] = r0 + summs[0][c];
            out[p][1][c] = r1 + summs[1][c];
        }
    }
    out
}

/// Q4_0 x Q8_0 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_0<const P: usize, const C: usize>(
    w: [[&[BlockQ4_0]; 2]; P],
    a: [&[BlockQ8_0]; C],
    nb: usize,
) -> [[[f32; C]; 2]; P] {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    for b in 0..nb {
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // the features the caller guarantees.
        unsafe {
            let mut qy = [_mm512_setzero_si512(); C];
            let mut negb = [_mm512_setzero_si512(); C];
            let mut dy = [_mm512_setzero_ps(); C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = act_q4_layout(&by.qs);
                let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(8), qy[c]);
                negb[c] = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
                dy[c] = _mm512_set1_ps(f16_to_f32(by.d));
            }
            for p in 0..P {
                let b0 = w[p][0].get_unchecked(b);
                let b1 = w[p][1].get_unchecked(b);
                let z = nibbles_pair(&b0.qs, &b1.qs);
                let wd = pair_scales(MASK_Q4, f16_to_f32(b0.d), f16_to_f32(b1.d));
                for c in 0..C {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(negb[c], z, qy[c]));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, dy[c]), xy, acc[p][c]);
                }
            }
        }
    }
    let mut out = [[[0.0f32; C]; 2]; P];
    for p in 0..P {
        for c in 0..C {
            let (r0, r1) = reduce_q4(acc[p][c]);
            out[p][0][c] = r0;
            out[p][1][c] = r1;
        }
    }
    out
}

/// Q8_0 x Q8_0 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q8_0<const P: usize, const C: usize>(
    w: [[&[BlockQ8_0]; 2]; P],
    a: [&[BlockQ8_0]; C],
    nb: usize,
) -> [[[f32; C]; 2]; P] {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    for b in 0..nb {
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // the features the caller guarantees.
        unsafe {
            let mut qy = [_mm512_setzero_si512(); C];
            let mut negb = [_mm512_setzero_si512(); C];
            let mut dy = [_mm512_setzero_ps(); C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = act_q8_layout(&by.qs);
                let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), qy[c]);
                negb[c] = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
                dy[c] = _mm512_set1_ps(f16_to_f32(by.d));
            }
            for p in 0..P {
                let b0 = w[p][0].get_unchecked(b);
                let b1 = w[p][1].get_unchecked(b);
                let x0 = _mm256_loadu_si256(b0.qs.as_ptr().cast());
                let x1 = _mm256_loadu_si256(b1.qs.as_ptr().cast());
                let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(x0), x1);
                // x + 128 as an unsigned byte.
                let z = _mm512_xor_si512(z, _mm512_set1_epi8(-128));
                let wd = pair_scales(MASK_Q8, f16_to_f32(b0.d), f16_to_f32(b1.d));
                for c in 0..C {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(negb[c], z, qy[c]));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, dy[c]), xy, acc[p][c]);
                }
            }
        }
    }
    let mut out = [[[0.0f32; C]; 2]; P];
    for p in 0..P {
        for c in 0..C {
            let (r0, r1) = reduce_q8(acc[p][c]);
            out[p][0][c] = r0;
            out[p][1][c] = r1;
        }
    }
    out
}
