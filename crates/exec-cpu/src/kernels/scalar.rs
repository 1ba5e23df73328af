//! Portable scalar kernels: the fallback on every CPU and the reference every SIMD path is tested against.
//!
//! The 32-wide dot products do not use ggml's `_generic` summation order but emulate its x86 AVX2 one, so that
//! every path here (scalar, AVX2, AVX-512) gives the same bits, and the same bits as llama.cpp's x86 build:
//! the integer products of a block are summed into eight 32-bit lanes of four consecutive values each, each
//! lane is converted to f32 and accumulated with a fused multiply-add by `d_x * d_y`, block after block, and the
//! eight lanes are reduced at the end in the order of ggml's `hsum_float_8`. Likewise the activation quantizers
//! follow ggml's x86 `quantize_row_q8_0/q8_1` (`id = 127 / amax`, round half to even), not the `_ref` ones
//! (`id = 1 / d`, round half away from zero), which can differ by one quantum.
//!
//! Q5_0 and Q5_1 follow the same AVX2 order as Q4_0 and Q4_1 (ggml's AVX2 code for them has the same shape).
//!
//! The K-quant dot products (Q2_K to Q6_K) follow ggml's `_generic` functions, without contracting any
//! multiply-add: per super-block an exact integer sum (Q2_K) or eight exact integer lanes, lane `l` holding the
//! products at positions `l mod 8` (Q3_K to Q6_K), then the same f32 operations in the same order.
//!
//! BF16 follows ggml's AVX2 `ggml_vec_dot_bf16`: four 8-lane accumulators over each 32 values (products of
//! two bf16 are exact in f32, so whether the compiler fuses the multiply-add makes no difference), combined as
//! `(c1 + c3) + (c2 + c4)`, reduced as `hsum_float_8`, then the tail added in f64.

use half::{bf16, f16};
use pinion_format::quant::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8_1, BlockQ8K, QK, QK_K, q3k_scales,
};

/// Reduces eight lanes in the order of ggml's `hsum_float_8`.
#[inline]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let t = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Max of |x| over a block, as the SIMD quantizers compute it.
#[inline]
fn amax(xb: &[f32]) -> f32 {
    xb.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantizes `x` to Q8_0 blocks with the arithmetic of ggml's x86 `quantize_row_q8_0`.
pub(crate) fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = amax(xb);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
        }
    }
}

/// Quantizes `x` to Q8_1 blocks with the arithmetic of ggml's x86 `quantize_row_q8_1`.
pub(crate) fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = amax(xb);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.s = f16::from_f32(d * sum as f32);
    }
}

/// Quantizes `x` to Q8_K blocks as ggml's `quantize_row_q8_K_ref` (which x86 uses too). Always inlined, so
/// that [`super::avx2::quantize_row_q8k`] compiles it with the rounding instruction.
#[inline(always)]
pub(crate) fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K);
    for (xb, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            // ggml's nearest_int rounds half to even.
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// The 32 weights of a 4-bit block in element order (low nibbles are elements 0..16, high ones 16..32).
#[inline]
fn nibbles(qs: &[u8; 16]) -> [i32; 32] {
    let mut w = [0i32; 32];
    for j in 0..16 {
        w[j] = (qs[j] & 0x0F) as i32;
        w[j + 16] = (qs[j] >> 4) as i32;
    }
    w
}

/// Integer dot products of a block, in the eight lanes of four values that ggml's AVX2 code produces.
#[inline]
fn lane_sums(w: &[i32; 32], y: &[i8; 32]) -> [i32; 8] {
    let mut l = [0i32; 8];
    for (i, s) in l.iter_mut().enumerate() {
        *s = (0..4).map(|k| w[4 * i + k] * y[4 * i + k] as i32).sum();
    }
    l
}

#[inline]
fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: &[i32; 8]) {
    for (a, &s) in acc.iter_mut().zip(lanes) {
        *a = d.mul_add(s as f32, *a);
    }
}

/// Dot product of a Q4_0 row with a Q8_0 row.
pub(crate) fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        let mut w = nibbles(&bx.qs);
        w.iter_mut().for_each(|v| *v -= 8);
        fma_lanes(&mut acc, d, &lane_sums(&w, &by.qs));
    }
    hsum8(&acc)
}

/// Dot product of a Q4_1 row with a Q8_1 row.
pub(crate) fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        // ggml writes `summs += m * s`, which GCC contracts to a fused multiply-add on FMA targets.
        summs = bx.m.to_f32().mul_add(by.s.to_f32(), summs);
        fma_lanes(&mut acc, d, &lane_sums(&nibbles(&bx.qs), &by.qs));
    }
    hsum8(&acc) + summs
}

/// The 32 unsigned 5-bit values of a Q5_0 / Q5_1 block in element order: bit `j` of `qh` is the fifth bit of
/// element `j`.
#[inline]
fn fives(qs: &[u8; 16], qh: [u8; 4]) -> [i32; 32] {
    let h = u32::from_le_bytes(qh);
    let mut w = nibbles(qs);
    for (j, v) in w.iter_mut().enumerate() {
        *v |= (((h >> j) & 1) << 4) as i32;
    }
    w
}

/// Dot product of a Q5_0 row with a Q8_0 row.
pub(crate) fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        let mut w = fives(&bx.qs, bx.qh);
        w.iter_mut().for_each(|v| *v -= 16);
        fma_lanes(&mut acc, d, &lane_sums(&w, &by.qs));
    }
    hsum8(&acc)
}

/// Dot product of a Q5_1 row with a Q8_1 row.
pub(crate) fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        // As for Q4_1: `summs += m * s`, contracted by GCC.
        summs = bx.m.to_f32().mul_add(by.s.to_f32(), summs);
        fma_lanes(&mut acc, d, &lane_sums(&fives(&bx.qs, bx.qh), &by.qs));
    }
    hsum8(&acc) + summs
}

/// Dot product of a Q8_0 row with a Q8_0 row.
pub(crate) fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let d = bx.d.to_f32() * by.d.to_f32();
        let w: [i32; 32] = std::array::from_fn(|k| bx.qs[k] as i32);
        fma_lanes(&mut acc, d, &lane_sums(&w, &by.qs));
    }
    hsum8(&acc)
}

/// Dot product of f32 rows: eight lanes of fused multiply-adds over whole groups of eight, reduced as
/// [`hsum8`], then the tail added one product at a time. The AVX2 kernel computes the same bits.
pub(crate) fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, yc) in x[..n8].chunks_exact(8).zip(y[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = xc[l].mul_add(yc[l], acc[l]);
        }
    }
    let mut s = hsum8(&acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = a.mul_add(*b, s);
    }
    s
}

/// Dot product of f16 rows (F16 weights meet activations rounded to f16, as ggml's `vec_dot_type` says),
/// in the order of [`vec_dot_f32`].
pub(crate) fn vec_dot_f16(x: &[f16], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, yc) in x[..n8].chunks_exact(8).zip(y[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = xc[l].to_f32().mul_add(yc[l].to_f32(), acc[l]);
        }
    }
    let mut s = hsum8(&acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = a.to_f32().mul_add(b.to_f32(), s);
    }
    s
}

/// Dot product of an f32 row with an f16 row, for attention scores (K cache in f16).
pub(crate) fn dot_f32_f16(x: &[f32], y: &[f16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut acc = [0.0f32; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, yc) in x[..n8].chunks_exact(8).zip(y[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = xc[l].mul_add(yc[l].to_f32(), acc[l]);
        }
    }
    let mut s = hsum8(&acc);
    for (a, b) in x[n8..].iter().zip(&y[n8..]) {
        s = a.mul_add(b.to_f32(), s);
    }
    s
}

/// `y += a * x` with `x` in f16, for the attention value sum (V cache in f16).
pub(crate) fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    assert_eq!(x.len(), y.len());
    for (o, v) in y.iter_mut().zip(x) {
        *o = a.mul_add(v.to_f32(), *o);
    }
}

/// Attention scores `out[j] = dot_f32_f16(q, k[j * stride..][..q.len()])`.
pub(crate) fn scores_f16(q: &[f32], k: &[f16], stride: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f32_f16(q, &k[j * stride..j * stride + q.len()]);
    }
}

/// Attention output `out = sum_j p[j] * v[j * stride..][..out.len()]`, one fused multiply-add per element
/// and key, keys in order.
pub(crate) fn wsum_f16(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        axpy_f16(out, pj, &v[j * stride..j * stride + out.len()]);
    }
}

/// Unpacks the 6-bit scales and mins of a Q4_K block as ggml's `utmp` shuffle does: `(scales, mins)`.
pub(crate) fn q4k_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Dot product of a Q4_K row with a Q8_K row, as ggml's `ggml_vec_dot_q4_K_q8_K_generic`.
pub(crate) fn vec_dot_q4k_q8k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let mut a = [0i8; QK_K];
        for (j, q4) in bx.qs.chunks_exact(32).enumerate() {
            for l in 0..32 {
                a[64 * j + l] = (q4[l] & 0x0F) as i8;
                a[64 * j + 32 + l] = (q4[l] >> 4) as i8;
            }
        }
        let (scales, mins) = q4k_scales_mins(&bx.scales);
        let sumi: i32 = (0..QK_K / 16).map(|j| by.bsums[j] as i32 * mins[j / 2] as i32).sum();
        let mut aux32 = [0i32; 8];
        for (j, &scale) in scales.iter().enumerate() {
            let scale = scale as i32;
            for k in 0..4 {
                let o = 32 * j + 8 * k;
                for l in 0..8 {
                    let aux16 = (by.qs[o + l] as i16) * (a[o + l] as i16);
                    aux32[l] += scale * aux16 as i32;
                }
            }
        }
        let d = bx.d.to_f32() * by.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = bx.dmin.to_f32() * by.d;
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Dot product of a Q6_K row with a Q8_K row, as ggml's `ggml_vec_dot_q6_K_q8_K_generic`.
pub(crate) fn vec_dot_q6k_q8k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sums = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let mut a = [0i8; QK_K];
        for half in 0..2 {
            let q4 = &bx.ql[64 * half..];
            let qh = &bx.qh[32 * half..];
            let a = &mut a[128 * half..];
            for l in 0..32 {
                a[l] = ((q4[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
                a[l + 32] = ((q4[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                a[l + 64] = ((q4[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                a[l + 96] = ((q4[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let mut aux32 = [0i32; 8];
        for (j, &scale) in bx.scales.iter().enumerate() {
            let scale = scale as i32;
            for k in 0..2 {
                let o = 16 * j + 8 * k;
                for l in 0..8 {
                    let aux16 = (by.qs[o + l] as i16) * (a[o + l] as i16);
                    aux32[l] += scale * aux16 as i32;
                }
            }
        }
        let d = bx.d.to_f32() * by.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

/// `aux32[l] += scale * q8[o + l] * a[o + l]` for `l < 8`, as ggml's generic K-quant loops (the product is
/// formed in 16 bits, as their `aux16`).
#[inline]
fn add_scaled8(aux32: &mut [i32; 8], scale: i32, q8: &[i8], a: &[i8]) {
    for l in 0..8 {
        let aux16 = (q8[l] as i16) * (a[l] as i16);
        aux32[l] += scale * aux16 as i32;
    }
}

/// Dot product of a Q2_K row with a Q8_K row, as ggml's `ggml_vec_dot_q2_K_q8_K_generic`.
pub(crate) fn vec_dot_q2k_q8k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let sc = &bx.scales;
        let summs: i32 = (0..16).map(|j| by.bsums[j] as i32 * (sc[j] >> 4) as i32).sum();
        let dall = by.d * bx.d.to_f32();
        let dmin = by.d * bx.dmin.to_f32();
        let mut isum = 0i32;
        // Sub-block `s` of 16 values: group `g = s / 2` of 32, bits `2 * (g % 4)` of bytes `32 * (g / 4)..`.
        for (s, (&sc, q8)) in sc.iter().zip(by.qs.chunks_exact(16)).enumerate() {
            let (g, half) = (s / 2, s % 2);
            let q2 = &bx.qs[32 * (g / 4) + 16 * half..][..16];
            let shift = 2 * (g % 4);
            let isuml: i32 = q2.iter().zip(q8).map(|(&q, &y)| y as i32 * ((q >> shift) & 3) as i32).sum();
            isum += (sc & 0x0F) as i32 * isuml;
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Dot product of a Q3_K row with a Q8_K row, as ggml's `ggml_vec_dot_q3_K_q8_K_generic`.
pub(crate) fn vec_dot_q3k_q8k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sums = [0.0f32; 8];
    for (bx, by) in x.iter().zip(y) {
        let mut a = [0i8; QK_K];
        for (g, a) in a.chunks_exact_mut(32).enumerate() {
            let q3 = &bx.qs[32 * (g / 4)..][..32];
            let shift = 2 * (g % 4);
            for l in 0..32 {
                a[l] = ((q3[l] >> shift) & 3) as i8 - if bx.hmask[l] & (1 << g) != 0 { 0 } else { 4 };
            }
        }
        let scales = q3k_scales(&bx.scales);
        let mut aux32 = [0i32; 8];
        for (j, &scale) in scales.iter().enumerate() {
            for k in 0..2 {
                let o = 16 * j + 8 * k;
                add_scaled8(&mut aux32, scale as i32, &by.qs[o..], &a[o..]);
            }
        }
        let d = bx.d.to_f32() * by.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0.0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Dot product of a Q5_K row with a Q8_K row, as ggml's `ggml_vec_dot_q5_K_q8_K_generic`.
pub(crate) fn vec_dot_q5k_q8k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    assert_eq!(x.len(), y.len());
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (bx, by) in x.iter().zip(y) {
        let mut a = [0i8; QK_K];
        for (j, q4) in bx.qs.chunks_exact(32).enumerate() {
            for l in 0..32 {
                let h1 = if bx.qh[l] & (1 << (2 * j)) != 0 { 16 } else { 0 };
                let h2 = if bx.qh[l] & (1 << (2 * j + 1)) != 0 { 16 } else { 0 };
                a[64 * j + l] = (q4[l] & 0x0F) as i8 + h1;
                a[64 * j + 32 + l] = (q4[l] >> 4) as i8 + h2;
            }
        }
        let (scales, mins) = q4k_scales_mins(&bx.scales);
        let sumi: i32 = (0..QK_K / 16).map(|j| by.bsums[j] as i32 * mins[j / 2] as i32).sum();
        let mut aux32 = [0i32; 8];
        for (j, &scale) in scales.iter().enumerate() {
            for k in 0..4 {
                let o = 32 * j + 8 * k;
                add_scaled8(&mut aux32, scale as i32, &by.qs[o..], &a[o..]);
            }
        }
        let d = bx.d.to_f32() * by.d;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
        let dmin = bx.dmin.to_f32() * by.d;
        sumf -= dmin * sumi as f32;
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Converts an f32 to bf16 as ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN made quiet.
#[inline]
pub(crate) fn f32_to_bf16(x: f32) -> bf16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return bf16::from_bits(((u >> 16) | 64) as u16);
    }
    bf16::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16)
}

/// Converts a row of activations to bf16 (BF16 weights meet bf16 activations, ggml's `vec_dot_type`).
pub(crate) fn quantize_row_bf16(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len());
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_bf16(v);
    }
}

/// Dot product of bf16 rows in the order of ggml's AVX2 `ggml_vec_dot_bf16` (see the module docs).
pub(crate) fn vec_dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n32 = x.len() / 32 * 32;
    let mut c = [[0.0f32; 8]; 4];
    for (xc, yc) in x[..n32].chunks_exact(32).zip(y[..n32].chunks_exact(32)) {
        for (k, ck) in c.iter_mut().enumerate() {
            for (l, a) in ck.iter_mut().enumerate() {
                *a = xc[8 * k + l].to_f32().mul_add(yc[8 * k + l].to_f32(), *a);
            }
        }
    }
    let v: [f32; 8] = std::array::from_fn(|l| (c[0][l] + c[2][l]) + (c[1][l] + c[3][l]));
    let mut sumf = hsum8(&v) as f64;
    for (a, b) in x[n32..].iter().zip(&y[n32..]) {
        sumf += (a.to_f32() * b.to_f32()) as f64;
    }
    sumf as f32
}

/// Bytes of a Q8_0 block (f16 scale, 32 signed bytes).
pub(crate) const Q8_0_BYTES: usize = 2 + QK;

/// `out += a * dequant(col)` for a Q8_0 column given as raw little-endian bytes (no alignment needed): per
/// value `v = d * q` (exact in f32: an 8-bit integer times an f16) and `out = fma(a, v, out)`.
pub(crate) fn axpy_q8_0(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len() / Q8_0_BYTES * QK, out.len());
    for (blk, o) in col.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for (o, &q) in o.iter_mut().zip(&blk[2..]) {
            *o = a.mul_add(d * f32::from(q as i8), *o);
        }
    }
}

/// `out += a * col` for an F16 column given as raw little-endian bytes: `out = fma(a, f32(v), out)`.
pub(crate) fn axpy_f16_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 2 * out.len());
    for (o, v) in out.iter_mut().zip(col.chunks_exact(2)) {
        *o = a.mul_add(f16::from_le_bytes([v[0], v[1]]).to_f32(), *o);
    }
}

/// `out += a * col` for an F32 column given as raw little-endian bytes: `out = fma(a, v, out)`.
pub(crate) fn axpy_f32_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 4 * out.len());
    for (o, v) in out.iter_mut().zip(col.chunks_exact(4)) {
        *o = a.mul_add(f32::from_le_bytes([v[0], v[1], v[2], v[3]]), *o);
    }
}
