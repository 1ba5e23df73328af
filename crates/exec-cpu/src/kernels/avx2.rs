//! AVX2 + FMA + F16C kernels (x86-64).
//!
//! Each tile function computes the dot products of `R` weight rows with `C` activation rows, reusing each
//! unpacked weight block across the activations. The arithmetic per (row, activation) pair is exactly that of
//! [`super::scalar`] (and of ggml's AVX2 code): integer lanes of four products, `fma(d_x * d_y, lane, acc)` per
//! block, `hsum_float_8` at the end.

use std::arch::x86_64::*;

use half::{bf16, f16};
use pinion_format::quant::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, QK};

/// Converts one f16 to f32 with F16C.
#[target_feature(enable = "f16c")]
#[inline]
pub(crate) fn f16_to_f32(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

/// Reduces eight lanes in the order of ggml's `hsum_float_8`.
#[target_feature(enable = "avx")]
#[inline]
pub(crate) fn hsum8(x: __m256) -> f32 {
    hsum_halves(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x))
}

/// `hsum_float_8` of the lanes `lo ++ hi`.
#[target_feature(enable = "sse3")]
#[inline]
pub(crate) fn hsum_halves(lo: __m128, hi: __m128) -> f32 {
    let r = _mm_add_ps(hi, lo);
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Unpacks 16 bytes of nibbles into 32 bytes: low nibbles first, then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY: `qs` is 16 readable bytes; the load is unaligned.
    let t = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(t), t);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Sums of four u8 x i8 products per 32-bit lane. No saturation for `x` below 128.
#[target_feature(enable = "avx2")]
#[inline]
fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// Loads 32 signed bytes.
#[target_feature(enable = "avx")]
#[inline]
fn load32(q: &[i8; 32]) -> __m256i {
    // SAFETY: `q` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(q.as_ptr().cast()) }
}

/// Q4_1 x Q8_1 dot products of `R` weight rows with `C` activation rows over `nb` blocks, into `out[r][c]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_1<const R: usize, const C: usize>(
    w: [&[BlockQ4_1]; R],
    a: [&[BlockQ8_1]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0.0f32; C]; R];
    let next = super::NextTile::after(w[R - 1], R, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // AVX2/FMA/F16C, which the caller guarantees.
        unsafe {
            let mut qy = [_mm256_setzero_si256(); C];
            let mut dy = [0.0f32; C];
            let mut sy = [0.0f32; C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = load32(&by.qs);
                dy[c] = f16_to_f32(by.d);
                sy[c] = f16_to_f32(by.s);
            }
            for r in 0..R {
                let bx = w[r].get_unchecked(b);
                let dx = f16_to_f32(bx.d);
                let mx = f16_to_f32(bx.m);
                let qx = nibbles(&bx.qs);
                for c in 0..C {
                    summs[r][c] = mx.mul_add(sy[c], summs[r][c]);
                    let xy = _mm256_cvtepi32_ps(dot_u8_i8(qx, qy[c]));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy[c]), xy, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum8(acc[r][c]) + summs[r][c];
        }
    }
}

/// Q4_0 x Q8_0 dot products of `R` weight rows with `C` activation rows over `nb` blocks, into `out[r][c]`.
///
/// The weights enter `maddubs` unsigned (0..16) and `8 * sum(y)` is subtracted per lane, which gives the same
/// integer lanes as ggml's signed `(q - 8) * y`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_0<const R: usize, const C: usize>(
    w: [&[BlockQ4_0]; R],
    a: [&[BlockQ8_0]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let next = super::NextTile::after(w[R - 1], R, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // AVX2/FMA/F16C, which the caller guarantees.
        unsafe {
            let mut qy = [_mm256_setzero_si256(); C];
            let mut bias = [_mm256_setzero_si256(); C];
            let mut dy = [0.0f32; C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = load32(&by.qs);
                bias[c] = dot_u8_i8(_mm256_set1_epi8(8), qy[c]);
                dy[c] = f16_to_f32(by.d);
            }
            for r in 0..R {
                let bx = w[r].get_unchecked(b);
                let dx = f16_to_f32(bx.d);
                let qx = nibbles(&bx.qs);
                for c in 0..C {
                    let lanes = _mm256_sub_epi32(dot_u8_i8(qx, qy[c]), bias[c]);
                    let xy = _mm256_cvtepi32_ps(lanes);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy[c]), xy, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum8(acc[r][c]);
        }
    }
}

/// Q8_0 x Q8_0 dot products of `R` weight rows with `C` activation rows over `nb` blocks, with ggml's
/// sign trick (`|x| * sign(y, x)`), exact for weights in -128..128 and activations in -127..128.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_q8_0<const R: usize, const C: usize>(
    w: [&[BlockQ8_0]; R],
    a: [&[BlockQ8_0]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let next = super::NextTile::after(w[R - 1], R, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // AVX2/FMA/F16C, which the caller guarantees.
        unsafe {
            let mut qy = [_mm256_setzero_si256(); C];
            let mut dy = [0.0f32; C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = load32(&by.qs);
                dy[c] = f16_to_f32(by.d);
            }
            for r in 0..R {
                let bx = w[r].get_unchecked(b);
                let dx = f16_to_f32(bx.d);
                let qx = load32(&bx.qs);
                let ax = _mm256_sign_epi8(qx, qx);
                for c in 0..C {
                    let sy = _mm256_sign_epi8(qy[c], qx);
                    let xy = _mm256_cvtepi32_ps(dot_u8_i8(ax, sy));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy[c]), xy, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum8(acc[r][c]);
        }
    }
}

/// ggml's `bytes_from_bits_32`: byte `j` is `0xFF` where bit `j` of `x` is set, else 0.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn bytes_from_bits(x: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// The 32 unsigned 5-bit values of a Q5_0 / Q5_1 block, in element order.
#[target_feature(enable = "avx2")]
#[inline]
fn fives(qs: &[u8; 16], qh: [u8; 4]) -> __m256i {
    let hi = _mm256_and_si256(bytes_from_bits(u32::from_le_bytes(qh)), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(qs), hi)
}

/// Q5_0 x Q8_0 dot products of `R` weight rows with `C` activation rows over `nb` blocks, into `out[r][c]`.
///
/// The weights enter `maddubs` unsigned (0..32) and `16 * sum(y)` is subtracted per lane, which gives the same
/// integer lanes as ggml's signed `(q - 16) * y`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_q5_0<const R: usize, const C: usize>(
    w: [&[BlockQ5_0]; R],
    a: [&[BlockQ8_0]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let next = super::NextTile::after(w[R - 1], R, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // AVX2/FMA/F16C, which the caller guarantees.
        unsafe {
            let mut qy = [_mm256_setzero_si256(); C];
            let mut bias = [_mm256_setzero_si256(); C];
            let mut dy = [0.0f32; C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = load32(&by.qs);
                bias[c] = dot_u8_i8(_mm256_set1_epi8(16), qy[c]);
                dy[c] = f16_to_f32(by.d);
            }
            for r in 0..R {
                let bx = w[r].get_unchecked(b);
                let dx = f16_to_f32(bx.d);
                let qx = fives(&bx.qs, bx.qh);
                for c in 0..C {
                    let lanes = _mm256_sub_epi32(dot_u8_i8(qx, qy[c]), bias[c]);
                    let xy = _mm256_cvtepi32_ps(lanes);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy[c]), xy, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum8(acc[r][c]);
        }
    }
}

/// Q5_1 x Q8_1 dot products of `R` weight rows with `C` activation rows over `nb` blocks, into `out[r][c]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_q5_1<const R: usize, const C: usize>(
    w: [&[BlockQ5_1]; R],
    a: [&[BlockQ8_1]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0.0f32; C]; R];
    let next = super::NextTile::after(w[R - 1], R, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks; the intrinsics need
        // AVX2/FMA/F16C, which the caller guarantees.
        unsafe {
            let mut qy = [_mm256_setzero_si256(); C];
            let mut dy = [0.0f32; C];
            let mut sy = [0.0f32; C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = load32(&by.qs);
                dy[c] = f16_to_f32(by.d);
                sy[c] = f16_to_f32(by.s);
            }
            for r in 0..R {
                let bx = w[r].get_unchecked(b);
                let dx = f16_to_f32(bx.d);
                let mx = f16_to_f32(bx.m);
                let qx = fives(&bx.qs, bx.qh);
                for c in 0..C {
                    summs[r][c] = mx.mul_add(sy[c], summs[r][c]);
                    let xy = _mm256_cvtepi32_ps(dot_u8_i8(qx, qy[c]));
                    acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy[c]), xy, acc[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = hsum8(acc[r][c]) + summs[r][c];
        }
    }
}

/// Loads eight bf16 values as f32.
///
/// # Safety
/// The CPU must support AVX2; `p` must point to eight readable bf16 values.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let v = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
}

/// bf16 dot product in the order of [`super::scalar::vec_dot_bf16`] (ggml's AVX2 `ggml_vec_dot_bf16`).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn vec_dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n32 = x.len() / 32 * 32;
    let mut c = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < n32 {
        for (k, ck) in c.iter_mut().enumerate() {
            // SAFETY: `i + 8 * k + 8 <= n32 <= len` of both slices.
            unsafe {
                let (xv, yv) =
                    (load_bf16x8(x.as_ptr().add(i + 8 * k)), load_bf16x8(y.as_ptr().add(i + 8 * k)));
                *ck = _mm256_fmadd_ps(xv, yv, *ck);
            }
        }
        i += 32;
    }
    let v = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
    let mut sumf = hsum8(v) as f64;
    for (a, b) in x[n32..].iter().zip(&y[n32..]) {
        sumf += (a.to_f32() * b.to_f32()) as f64;
    }
    sumf as f32
}

/// Quantizes one block of 32 values: returns the rounded, converted integers and `(amax, d)`.
#[target_feature(enable = "avx2")]
#[inline]
fn quantize_block(x: &[f32]) -> ([__m256i; 4], f32) {
    assert!(x.len() >= QK);
    let mut v = [_mm256_setzero_ps(); 4];
    for (i, vi) in v.iter_mut().enumerate() {
        // SAFETY: `x` holds 32 readable f32 values; loads are unaligned.
        *vi = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) };
    }
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mul = _mm256_set1_ps(id);
    let mut q = [_mm256_setzero_si256(); 4];
    for i in 0..4 {
        let r =
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(v[i], mul));
        q[i] = _mm256_cvtps_epi32(r);
    }
    (q, amax)
}

/// Packs four vectors of eight i32 into 32 bytes in element order.
#[target_feature(enable = "avx2")]
#[inline]
fn pack_store(q: [__m256i; 4], out: &mut [i8; 32]) {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    let p = _mm256_packs_epi16(a, b);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `out` is 32 writable bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), p) }
}

/// AVX2 version of [`super::scalar::quantize_row_q8_0`] (same bits).
///
/// # Safety
/// [`super::scalar::quantize_row_q8k`] compiled for AVX2 (so SSE4.1's rounding instruction replaces a call to
/// libm's `rintf` per value): the same round-half-to-even results.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_row_q8k(x: &[f32], out: &mut [pinion_format::quant::BlockQ8K]) {
    super::scalar::quantize_row_q8k(x, out);
}

/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (q, amax) = quantize_block(xb);
        b.d = f16::from_f32(amax / 127.0);
        pack_store(q, &mut b.qs);
    }
}

/// AVX2 version of [`super::scalar::quantize_row_q8_1`] (same bits).
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (q, amax) = quantize_block(xb);
        let d = amax / 127.0;
        b.d = f16::from_f32(d);
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b10_11_00_01>(s4));
        b.s = f16::from_f32(d * _mm_cvtsi128_si32(s4) as f32);
        pack_store(q, &mut b.qs);
    }
}

/// f32 dot product in the order of [`super::scalar::vec_dot_f32`] (same bits).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n8 = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        // SAFETY: `i + 8 <= n8 <= len` of both slices; loads are unaligned.
        unsafe {
            acc =
                _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(y.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    let mut s = hsum8(acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = a.mul_add(*b, s);
    }
    s
}

/// Loads eight f16 values as f32.
///
/// # Safety
/// The CPU must support AVX and F16C; `p` must point to eight readable f16 values.
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn load_f16x8(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// f16 dot product in the order of [`super::scalar::vec_dot_f16`] (same bits).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot_f16(x: &[f16], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n8 = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        // SAFETY: `i + 8 <= n8 <= len` of both slices.
        unsafe {
            acc = _mm256_fmadd_ps(load_f16x8(x.as_ptr().add(i)), load_f16x8(y.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    let mut s = hsum8(acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = f16_to_f32(*a).mul_add(f16_to_f32(*b), s);
    }
    s
}

/// f32 x f16 dot product in the order of [`super::scalar::dot_f32_f16`] (same bits).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32_f16(x: &[f32], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n8 = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        // SAFETY: `i + 8 <= n8 <= len` of both slices.
        unsafe {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), load_f16x8(y.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    let mut s = hsum8(acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = a.mul_add(f16_to_f32(*b), s);
    }
    s
}

/// Attention scores `out[j] = dot(q, k[j * stride..][..q.len()])` for `j < out.len()`, four keys at a time
/// (independent FMA chains); each dot is computed as [`dot_f32_f16`] computes it (same bits).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn scores_f16(q: &[f32], k: &[f16], stride: usize, out: &mut [f32]) {
    let hd = q.len();
    let n = out.len();
    assert!(n == 0 || k.len() >= (n - 1) * stride + hd);
    let n8 = hd / 8 * 8;
    let mut j = 0;
    while j + 4 <= n {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n8 {
            // SAFETY: `i + 8 <= hd` and key `j + u < n` starts at `(j + u) * stride`, within `k` (checked).
            unsafe {
                let qv = _mm256_loadu_ps(q.as_ptr().add(i));
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, load_f16x8(k.as_ptr().add((j + u) * stride + i)), *a);
                }
            }
            i += 8;
        }
        for (u, a) in acc.iter().enumerate() {
            let mut s = hsum8(*a);
            let kr = &k[(j + u) * stride..(j + u) * stride + hd];
            for (x, y) in q[n8..].iter().zip(&kr[n8..]) {
                s = x.mul_add(f16_to_f32(*y), s);
            }
            out[j + u] = s;
        }
        j += 4;
    }
    while j < n {
        // SAFETY: the features are enabled here.
        out[j] = unsafe { dot_f32_f16(q, &k[j * stride..j * stride + hd]) };
        j += 1;
    }
}

/// Attention output `out = sum_j p[j] * v[j * stride..][..out.len()]`, accumulated over `j` in order with one
/// fused multiply-add per element, as repeated [`super::scalar::axpy_f16`] from zero (same bits), but with the output held in
/// registers 64 values at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn wsum_f16(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    let n = p.len();
    assert!(n == 0 || v.len() >= (n - 1) * stride + hd);
    let n8 = hd / 8 * 8;
    let mut d0 = 0;
    while d0 < n8 {
        let w = ((n8 - d0) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            for (u, a) in acc.iter_mut().enumerate().take(w) {
                // SAFETY: `d0 + 8 * u + 8 <= n8 <= hd` and row `j < n` lies within `v` (checked).
                *a = _mm256_fmadd_ps(pv, unsafe { load_f16x8(v.as_ptr().add(j * stride + d0 + 8 * u)) }, *a);
            }
        }
        for (u, a) in acc.iter().enumerate().take(w) {
            // SAFETY: `d0 + 8 * u + 8 <= hd = out.len()`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * u), *a) };
        }
        d0 += 8 * w;
    }
    for d in n8..hd {
        let mut s = 0.0f32;
        for (j, &pj) in p.iter().enumerate() {
            s = pj.mul_add(f16_to_f32(v[j * stride + d]), s);
        }
        out[d] = s;
    }
}

/// [`super::scalar::axpy_q8_0`] with AVX2: the same `d * q` then `fma(a, v, out)` per value.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_q8_0(out: &mut [f32], a: f32, col: &[u8]) {
    use super::scalar::Q8_0_BYTES;
    assert_eq!(col.len() / Q8_0_BYTES * QK, out.len());
    let va = _mm256_set1_ps(a);
    for (blk, o) in col.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = _mm256_set1_ps(f16_to_f32(f16::from_le_bytes([blk[0], blk[1]])));
        for j in 0..4 {
            // SAFETY: `blk` holds 34 bytes, so bytes `2 + 8j .. 2 + 8j + 8` are in bounds, and `o` holds 32
            // floats; unaligned loads and stores; the features are the caller's guarantee.
            unsafe {
                let q = _mm_loadl_epi64(blk.as_ptr().add(2 + 8 * j).cast());
                let v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                let p = o.as_mut_ptr().add(8 * j);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(p)));
            }
        }
    }
}

/// [`super::scalar::axpy_f16_bytes`] with AVX2 and F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 2 * out.len());
    let va = _mm256_set1_ps(a);
    let body = out.len() / 8 * 8;
    for i in (0..body).step_by(8) {
        // SAFETY: `i + 8 <= out.len()` and `col` holds `2 * out.len()` bytes; unaligned loads and stores.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(col.as_ptr().add(2 * i).cast()));
            let p = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(p)));
        }
    }
    super::scalar::axpy_f16_bytes(&mut out[body..], a, &col[2 * body..]);
}

/// [`super::scalar::axpy_f32_bytes`] with AVX2 and FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy_f32_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 4 * out.len());
    let va = _mm256_set1_ps(a);
    let body = out.len() / 8 * 8;
    for i in (0..body).step_by(8) {
        // SAFETY: `i + 8 <= out.len()` and `col` holds `4 * out.len()` bytes; unaligned loads and stores.
        unsafe {
            let v = _mm256_loadu_ps(col.as_ptr().add(4 * i).cast());
            let p = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_fmadd_ps(va, v, _mm256_loadu_ps(p)));
        }
    }
    super::scalar::axpy_f32_bytes(&mut out[body..], a, &col[4 * body..]);
}

/// `N` [`axpy_q8_0`]s in one pass over `out`, with the same per-value chain of FMAs as `N` calls in order.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_q8_0_n<const N: usize>(out: &mut [f32], a: [f32; N], cols: [&[u8]; N]) {
    use super::scalar::Q8_0_BYTES;
    let nb = out.len() / QK;
    assert!(out.len() == nb * QK && cols.iter().all(|c| c.len() == nb * Q8_0_BYTES));
    let va = a.map(|a| _mm256_set1_ps(a));
    for b in 0..nb {
        let d: [__m256; N] = std::array::from_fn(|i| {
            let blk = &cols[i][b * Q8_0_BYTES..];
            _mm256_set1_ps(f16_to_f32(f16::from_le_bytes([blk[0], blk[1]])))
        });
        for j in 0..4 {
            // SAFETY: block `b` of every column holds 34 bytes, so bytes `2 + 8j ..+ 8` are in bounds, and `out`
            // holds `32 * nb` floats; unaligned loads and stores; the features are the caller's guarantee.
            unsafe {
                let p = out.as_mut_ptr().add(QK * b + 8 * j);
                let mut acc = _mm256_loadu_ps(p);
                for i in 0..N {
                    let q = _mm_loadl_epi64(cols[i].as_ptr().add(b * Q8_0_BYTES + 2 + 8 * j).cast());
                    let v = _mm256_mul_ps(d[i], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                    acc = _mm256_fmadd_ps(va[i], v, acc);
                }
                _mm256_storeu_ps(p, acc);
            }
        }
    }
}
