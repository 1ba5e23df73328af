//! AVX-512 (F, BW, VL) + VNNI kernels (x86-64).
//!
//! One 512-bit register holds the 8-lane accumulators of a *pair* of weight rows `(r0, r1)`: bytes
//! `[r0 0..32, r1 0..32]` meet the activation block broadcast to `[y, y]`, so each `vpdpbusd`, conversion and
//! FMA serves two rows, while every (row, activation) pair keeps exactly the per-lane arithmetic of ggml's
//! AVX2 code (and of [`super::scalar`]): the same integer lanes, the same `fma(d_x * d_y, lane, acc)`
//! sequence, the same final reduction. `vpdpbusd` multiplies unsigned by signed bytes, so signed weights are
//! offset into u8 (`+8` for Q4_0, `+128` for Q8_0) and the offset times the per-lane activation sum, computed
//! once per activation block, is subtracted: the integer lanes are identical.
//!
//! The f16 scales (and Q4_1 minimums) of all rows of a tile are converted together: the first four bytes of
//! each row's block are gathered into one vector and converted with one `vcvtph2ps`, giving `[d, m]` per row.
//!
//! Tiles with `C == 1` (decode) take the activation's scales from its blocks; tiles with `C == 8` (batches)
//! read them from the block-major f32 copies kept by `QuantizedActs` (`d_t`, `s_t`, `[b * t_pad + t]`).

use std::arch::x86_64::*;

use half::bf16;
use pinion_format::quant::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};

use super::avx2::{f16_to_f32, hsum_halves};

/// Most pairs per tile (the `[d, m]` gather holds eight rows).
const MAX_PAIRS: usize = 4;

/// Block-major f32 copies of the activations' `d` (and for Q8_1 `s`) for batched tiles.
#[derive(Clone, Copy)]
pub(crate) struct BlockMajor<'a> {
    pub(crate) d_t: &'a [f32],
    pub(crate) s_t: &'a [f32],
    pub(crate) t_pad: usize,
    /// First activation of the tile.
    pub(crate) c0: usize,
}

impl BlockMajor<'_> {
    /// No batched data (for `C == 1` tiles).
    pub(crate) const NONE: BlockMajor<'static> = BlockMajor { d_t: &[], s_t: &[], t_pad: 0, c0: 0 };
}

/// Unpacks the nibbles of two 4-bit blocks to `[r0 0..32, r1 0..32]` (low nibbles are elements 0..16).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn nibbles_pair(q0: &[u8; 16], q1: &[u8; 16]) -> __m512i {
    // SAFETY: each reference is 16 readable bytes; loads are unaligned.
    let (a, b) = unsafe { (_mm_loadu_si128(q0.as_ptr().cast()), _mm_loadu_si128(q1.as_ptr().cast())) };
    let t = _mm256_set_m128i(b, a);
    let u = _mm256_srli_epi16::<4>(t);
    // Quadwords [t0 t1 u0 u1 t2 t3 u2 u3]: r0's low and high nibbles, then r1's.
    let idx = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    let z = _mm512_permutex2var_epi64(_mm512_castsi256_si512(t), idx, _mm512_castsi256_si512(u));
    _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
}

/// Loads two 8-bit blocks as `[r0 0..32, r1 0..32]`.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn bytes_pair(q0: &[i8; 32], q1: &[i8; 32]) -> __m512i {
    // SAFETY: each reference is 32 readable bytes; loads are unaligned.
    let (a, b) = unsafe { (_mm256_loadu_si256(q0.as_ptr().cast()), _mm256_loadu_si256(q1.as_ptr().cast())) };
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// An activation block broadcast to `[y, y]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn act_pair(q: &[i8; 32]) -> __m512i {
    // SAFETY: `q` is 32 readable bytes; the load is unaligned.
    _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(q.as_ptr().cast()) })
}

/// Reduces the accumulators of one pair and activation to the `(r0, r1)` sums, as `hsum_float_8` each.
#[target_feature(enable = "avx512f,sse3")]
#[inline]
fn reduce_pair(v: __m512) -> (f32, f32) {
    let r0 = hsum_halves(_mm512_extractf32x4_ps::<0>(v), _mm512_extractf32x4_ps::<1>(v));
    let r1 = hsum_halves(_mm512_extractf32x4_ps::<2>(v), _mm512_extractf32x4_ps::<3>(v));
    (r0, r1)
}

/// Converts the two f16 at the start of block `b` of every row: lane `2k` holds row `k`'s `d`, lane `2k + 1`
/// its next f16 (`m` for Q4_1, unused otherwise). Row `k` is `w[k / 2][k % 2]`.
///
/// # Safety
/// The CPU must support AVX-512F/VL, AVX2 and F16C; every row must hold more than `b` blocks.
#[target_feature(enable = "avx512f,avx512vl,avx2,f16c")]
#[inline]
unsafe fn head_f16x2<B, const P: usize>(w: &[[&[B]; 2]; P], b: usize) -> __m512 {
    const { assert!(P <= MAX_PAIRS && size_of::<B>() >= 4) };
    let mut v = [0i32; 2 * MAX_PAIRS];
    for (k, x) in v.iter_mut().enumerate().take(2 * P) {
        // SAFETY: the caller guarantees block `b` exists; blocks are at least 4 bytes; the read is unaligned.
        *x = unsafe { w[k / 2][k % 2].as_ptr().add(b).cast::<i32>().read_unaligned() };
    }
    let lo = _mm_setr_epi32(v[0], v[1], v[2], v[3]);
    let hi = _mm_setr_epi32(v[4], v[5], v[6], v[7]);
    _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
}

/// Permutation indices giving, for pair `p`, `d` of row `2p` in lanes 0..8 and of row `2p + 1` in lanes 8..16.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair_scale_idx<const P: usize>() -> [__m512i; P] {
    let mut idx = [_mm512_setzero_si512(); P];
    for (p, x) in idx.iter_mut().enumerate() {
        let (a, b) = (4 * p as i32, 4 * p as i32 + 2);
        *x = _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
    }
    idx
}

/// The activation's scale for block `b` of activation `c` as a vector.
///
/// # Safety
/// The CPU must support AVX-512F and F16C. With `C > 1`, `bm` must cover block `b` and activations
/// `bm.c0..bm.c0 + C`; with `C == 1`, `d` must be the activation block's scale.
#[target_feature(enable = "avx512f,f16c")]
#[inline]
unsafe fn act_scale<const C: usize>(bm: &BlockMajor, b: usize, c: usize, d: half::f16) -> __m512 {
    if C == 1 {
        _mm512_set1_ps(f16_to_f32(d))
    } else {
        // SAFETY: in bounds by the caller's guarantee.
        _mm512_set1_ps(unsafe { *bm.d_t.get_unchecked(b * bm.t_pad + bm.c0 + c) })
    }
}

/// Checks a batched tile's block-major data.
fn check_block_major<const C: usize>(bm: &BlockMajor, nb: usize, need_s: bool) {
    if C > 1 {
        assert!(bm.c0 + C <= bm.t_pad && bm.d_t.len() >= nb * bm.t_pad);
        assert!(!need_s || bm.s_t.len() >= nb * bm.t_pad);
    }
}

/// Q4_1 x Q8_1 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks, into
/// `out[2p + i][c]` for row `i` of pair `p`.
///
/// The `m * s` terms are summed per row in vector lanes, each lane computing ggml's sequential
/// `summs = fma(m, s, summs)`: for `C == 1` in the odd lanes of the `[d, m]` vector, for `C == 8` eight
/// activations per vector from `bm.s_t`.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_1<const P: usize, const C: usize>(
    w: [[&[BlockQ4_1]; 2]; P],
    a: [&[BlockQ8_1]; C],
    bm: BlockMajor,
    nb: usize,
    out: &mut [[f32; C]],
) {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    assert!(C == 1 || C == 8);
    check_block_major::<C>(&bm, nb, true);
    let idx = pair_scale_idx::<P>();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let mut sums1 = _mm512_setzero_ps();
    let mut sums8 = [[_mm256_setzero_ps(); 2]; P];
    let next = super::NextTile::after(w[P - 1][1], 2 * P, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks (and `bm` to cover them); the
        // intrinsics need the features the caller guarantees.
        unsafe {
            let mut qy = [_mm512_setzero_si512(); C];
            let mut dy = [_mm512_setzero_ps(); C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = act_pair(&by.qs);
                dy[c] = act_scale::<C>(&bm, b, c, by.d);
            }
            let dm = head_f16x2(&w, b);
            if C == 1 {
                let sy = _mm512_set1_ps(f16_to_f32(a[0].get_unchecked(b).s));
                sums1 = _mm512_fmadd_ps(dm, sy, sums1);
            } else {
                let st = _mm256_loadu_ps(bm.s_t.as_ptr().add(b * bm.t_pad + bm.c0));
                let dm_lo = _mm512_castps512_ps256(dm);
                let dm_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(dm)));
                for (p, s) in sums8.iter_mut().enumerate() {
                    for (i, s) in s.iter_mut().enumerate() {
                        let k = 2 * (2 * p + i) + 1;
                        let half = if k < 8 { dm_lo } else { dm_hi };
                        let m = _mm256_permutevar8x32_ps(half, _mm256_set1_epi32((k % 8) as i32));
                        *s = _mm256_fmadd_ps(m, st, *s);
                    }
                }
            }
            for p in 0..P {
                let z = nibbles_pair(&w[p][0].get_unchecked(b).qs, &w[p][1].get_unchecked(b).qs);
                let wd = _mm512_permutexvar_ps(idx[p], dm);
                for c in 0..C {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), z, qy[c]));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, dy[c]), xy, acc[p][c]);
                }
            }
        }
    }
    assert!(out.len() >= 2 * P);
    let mut s1 = [0.0f32; 16];
    // SAFETY: `s1` holds 16 floats.
    unsafe { _mm512_storeu_ps(s1.as_mut_ptr(), sums1) };
    for p in 0..P {
        for i in 0..2 {
            let mut summs = [0.0f32; 8];
            if C == 1 {
                summs[0] = s1[2 * (2 * p + i) + 1];
            } else {
                // SAFETY: `summs` holds 8 floats.
                unsafe { _mm256_storeu_ps(summs.as_mut_ptr(), sums8[p][i]) };
            }
            for c in 0..C {
                let (r0, r1) = reduce_pair(acc[p][c]);
                out[2 * p + i][c] = if i == 0 { r0 } else { r1 } + summs[c];
            }
        }
    }
}

/// Q4_0 x Q8_0 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks, into
/// `out[2p + i][c]` for row `i` of pair `p`.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q4_0<const P: usize, const C: usize>(
    w: [[&[BlockQ4_0]; 2]; P],
    a: [&[BlockQ8_0]; C],
    bm: BlockMajor,
    nb: usize,
    out: &mut [[f32; C]],
) {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    check_block_major::<C>(&bm, nb, false);
    let idx = pair_scale_idx::<P>();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let next = super::NextTile::after(w[P - 1][1], 2 * P, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks (and `bm` to cover them); the
        // intrinsics need the features the caller guarantees.
        unsafe {
            // The weights of the block step first, then each activation against them: one activation's
            // vectors live at a time (with eight of them the accumulators and the activations did not fit the
            // registers); each accumulator still takes one product per block, in block order.
            let dm = head_f16x2(&w, b);
            let mut z = [_mm512_setzero_si512(); P];
            let mut wd = [_mm512_setzero_ps(); P];
            for p in 0..P {
                z[p] = nibbles_pair(&w[p][0].get_unchecked(b).qs, &w[p][1].get_unchecked(b).qs);
                wd[p] = _mm512_permutexvar_ps(idx[p], dm);
            }
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                let qy = act_pair(&by.qs);
                let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(8), qy);
                let negb = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
                let dy = act_scale::<C>(&bm, b, c, by.d);
                for p in 0..P {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(negb, z[p], qy));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd[p], dy), xy, acc[p][c]);
                }
            }
        }
    }
    finish(&acc, out)
}

/// Q8_0 x Q8_0 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks, into
/// `out[2p + i][c]` for row `i` of pair `p`.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q8_0<const P: usize, const C: usize>(
    w: [[&[BlockQ8_0]; 2]; P],
    a: [&[BlockQ8_0]; C],
    bm: BlockMajor,
    nb: usize,
    out: &mut [[f32; C]],
) {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    check_block_major::<C>(&bm, nb, false);
    let idx = pair_scale_idx::<P>();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let next = super::NextTile::after(w[P - 1][1], 2 * P, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks (and `bm` to cover them); the
        // intrinsics need the features the caller guarantees.
        unsafe {
            // As in `tile_q4_0`: the block step's weights first, then one activation at a time.
            let dm = head_f16x2(&w, b);
            let mut z = [_mm512_setzero_si512(); P];
            let mut wd = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let q = bytes_pair(&w[p][0].get_unchecked(b).qs, &w[p][1].get_unchecked(b).qs);
                // x + 128 as an unsigned byte.
                z[p] = _mm512_xor_si512(q, _mm512_set1_epi8(-128));
                wd[p] = _mm512_permutexvar_ps(idx[p], dm);
            }
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                let qy = act_pair(&by.qs);
                let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), qy);
                let negb = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
                let dy = act_scale::<C>(&bm, b, c, by.d);
                for p in 0..P {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(negb, z[p], qy));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd[p], dy), xy, acc[p][c]);
                }
            }
        }
    }
    finish(&acc, out)
}

/// The 5-bit values of two Q5 blocks as `[r0 0..32, r1 0..32]`: nibbles plus `0x10` where the fifth bit is set.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn fives_pair(q0: (&[u8; 16], [u8; 4]), q1: (&[u8; 16], [u8; 4])) -> __m512i {
    let bits = u32::from_le_bytes(q0.1) as u64 | (u32::from_le_bytes(q1.1) as u64) << 32;
    let hi = _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10));
    _mm512_or_si512(nibbles_pair(q0.0, q1.0), hi)
}

/// Q5_0 x Q8_0 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks, into
/// `out[2p + i][c]` for row `i` of pair `p`. The weights enter `vpdpbusd` unsigned (0..32) and `16 * sum(y)`
/// per lane is subtracted, as for Q4_0.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q5_0<const P: usize, const C: usize>(
    w: [[&[BlockQ5_0]; 2]; P],
    a: [&[BlockQ8_0]; C],
    bm: BlockMajor,
    nb: usize,
    out: &mut [[f32; C]],
) {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    check_block_major::<C>(&bm, nb, false);
    let idx = pair_scale_idx::<P>();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let next = super::NextTile::after(w[P - 1][1], 2 * P, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks (and `bm` to cover them); the
        // intrinsics need the features the caller guarantees.
        unsafe {
            // As in `tile_q4_0`: the block step's weights first, then one activation at a time.
            let dm = head_f16x2(&w, b);
            let mut z = [_mm512_setzero_si512(); P];
            let mut wd = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let (b0, b1) = (w[p][0].get_unchecked(b), w[p][1].get_unchecked(b));
                z[p] = fives_pair((&b0.qs, b0.qh), (&b1.qs, b1.qh));
                wd[p] = _mm512_permutexvar_ps(idx[p], dm);
            }
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                let qy = act_pair(&by.qs);
                let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(16), qy);
                let negb = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
                let dy = act_scale::<C>(&bm, b, c, by.d);
                for p in 0..P {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(negb, z[p], qy));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd[p], dy), xy, acc[p][c]);
                }
            }
        }
    }
    finish(&acc, out)
}

/// Q5_1 x Q8_1 dot products of `P` pairs of weight rows with `C` activation rows over `nb` blocks, into
/// `out[2p + i][c]` for row `i` of pair `p`, with the `m * s` terms summed as in [`tile_q4_1`].
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/VNNI, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn tile_q5_1<const P: usize, const C: usize>(
    w: [[&[BlockQ5_1]; 2]; P],
    a: [&[BlockQ8_1]; C],
    bm: BlockMajor,
    nb: usize,
    out: &mut [[f32; C]],
) {
    assert!(w.iter().flatten().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    assert!(C == 1 || C == 8);
    check_block_major::<C>(&bm, nb, true);
    let idx = pair_scale_idx::<P>();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let mut sums1 = _mm512_setzero_ps();
    let mut sums8 = [[_mm256_setzero_ps(); 2]; P];
    let next = super::NextTile::after(w[P - 1][1], 2 * P, nb);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        // SAFETY: `b < nb` and every slice was checked to hold `nb` blocks (and `bm` to cover them); the
        // intrinsics need the features the caller guarantees.
        unsafe {
            let mut qy = [_mm512_setzero_si512(); C];
            let mut dy = [_mm512_setzero_ps(); C];
            for c in 0..C {
                let by = a[c].get_unchecked(b);
                qy[c] = act_pair(&by.qs);
                dy[c] = act_scale::<C>(&bm, b, c, by.d);
            }
            let dm = head_f16x2(&w, b);
            if C == 1 {
                let sy = _mm512_set1_ps(f16_to_f32(a[0].get_unchecked(b).s));
                sums1 = _mm512_fmadd_ps(dm, sy, sums1);
            } else {
                let st = _mm256_loadu_ps(bm.s_t.as_ptr().add(b * bm.t_pad + bm.c0));
                let dm_lo = _mm512_castps512_ps256(dm);
                let dm_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(dm)));
                for (p, s) in sums8.iter_mut().enumerate() {
                    for (i, s) in s.iter_mut().enumerate() {
                        let k = 2 * (2 * p + i) + 1;
                        let half = if k < 8 { dm_lo } else { dm_hi };
                        let m = _mm256_permutevar8x32_ps(half, _mm256_set1_epi32((k % 8) as i32));
                        *s = _mm256_fmadd_ps(m, st, *s);
                    }
                }
            }
            for p in 0..P {
                let (b0, b1) = (w[p][0].get_unchecked(b), w[p][1].get_unchecked(b));
                let z = fives_pair((&b0.qs, b0.qh), (&b1.qs, b1.qh));
                let wd = _mm512_permutexvar_ps(idx[p], dm);
                for c in 0..C {
                    let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), z, qy[c]));
                    acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(wd, dy[c]), xy, acc[p][c]);
                }
            }
        }
    }
    assert!(out.len() >= 2 * P);
    let mut s1 = [0.0f32; 16];
    // SAFETY: `s1` holds 16 floats.
    unsafe { _mm512_storeu_ps(s1.as_mut_ptr(), sums1) };
    for p in 0..P {
        for i in 0..2 {
            let mut summs = [0.0f32; 8];
            if C == 1 {
                summs[0] = s1[2 * (2 * p + i) + 1];
            } else {
                // SAFETY: `summs` holds 8 floats.
                unsafe { _mm256_storeu_ps(summs.as_mut_ptr(), sums8[p][i]) };
            }
            for c in 0..C {
                let (r0, r1) = reduce_pair(acc[p][c]);
                out[2 * p + i][c] = if i == 0 { r0 } else { r1 } + summs[c];
            }
        }
    }
}

/// bf16 dot product in the order of [`super::scalar::vec_dot_bf16`], with ggml's AVX2 accumulators `c1 | c2`
/// and `c3 | c4` held in two 512-bit registers (the same lanes, so the same bits).
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn vec_dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    assert_eq!(x.len(), y.len());
    let n32 = x.len() / 32 * 32;
    let load = |p: *const bf16| {
        // SAFETY: every call below passes a pointer to 16 readable bf16 values.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    };
    let (mut c12, mut c34) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i < n32 {
        // `i + 32 <= n32 <= len` of both slices.
        let (xp, yp) = (x[i..].as_ptr(), y[i..].as_ptr());
        // SAFETY: offsets 0 and 16 leave 16 values each within the 32 in bounds.
        let (x2, y2) = unsafe { (xp.add(16), yp.add(16)) };
        c12 = _mm512_fmadd_ps(load(xp), load(yp), c12);
        c34 = _mm512_fmadd_ps(load(x2), load(y2), c34);
        i += 32;
    }
    let s = _mm512_add_ps(c12, c34);
    let v = _mm256_add_ps(
        _mm512_castps512_ps256(s),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s))),
    );
    let mut sumf = super::avx2::hsum8(v) as f64;
    for (a, b) in x[n32..].iter().zip(&y[n32..]) {
        sumf += (a.to_f32() * b.to_f32()) as f64;
    }
    sumf as f32
}

/// Reduces every pair's accumulators into `out[2p + i]` (row `i` of pair `p`).
#[target_feature(enable = "avx512f,sse3")]
#[inline]
fn finish<const P: usize, const C: usize>(acc: &[[__m512; C]; P], out: &mut [[f32; C]]) {
    assert!(out.len() >= 2 * P);
    for p in 0..P {
        for c in 0..C {
            let (r0, r1) = reduce_pair(acc[p][c]);
            out[2 * p][c] = r0;
            out[2 * p + 1][c] = r1;
        }
    }
}

/// [`super::scalar::axpy_q8_0`] with AVX-512F: the same `d * q` then `fma(a, v, out)` per value, 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn axpy_q8_0(out: &mut [f32], a: f32, col: &[u8]) {
    use super::scalar::Q8_0_BYTES;
    assert_eq!(col.len() / Q8_0_BYTES * 32, out.len());
    let va = _mm512_set1_ps(a);
    for (blk, o) in col.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(32)) {
        let d = _mm512_set1_ps(f16_to_f32(half::f16::from_le_bytes([blk[0], blk[1]])));
        for j in 0..2 {
            // SAFETY: `blk` holds 34 bytes, so bytes `2 + 16j .. 2 + 16j + 16` are in bounds, and `o` holds 32
            // floats; unaligned loads and stores; the features are the caller's guarantee.
            unsafe {
                let q = _mm_loadu_si128(blk.as_ptr().add(2 + 16 * j).cast());
                let v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
                let p = o.as_mut_ptr().add(16 * j);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(va, v, _mm512_loadu_ps(p)));
            }
        }
    }
}

/// [`super::scalar::axpy_f16_bytes`] with AVX-512F, 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 2 * out.len());
    let va = _mm512_set1_ps(a);
    let body = out.len() / 16 * 16;
    for i in (0..body).step_by(16) {
        // SAFETY: `i + 16 <= out.len()` and `col` holds `2 * out.len()` bytes; unaligned loads and stores.
        unsafe {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(col.as_ptr().add(2 * i).cast()));
            let p = out.as_mut_ptr().add(i);
            _mm512_storeu_ps(p, _mm512_fmadd_ps(va, v, _mm512_loadu_ps(p)));
        }
    }
    // SAFETY: the caller guarantees AVX2, FMA and F16C.
    unsafe { super::avx2::axpy_f16_bytes(&mut out[body..], a, &col[2 * body..]) };
}

/// [`super::scalar::axpy_f32_bytes`] with AVX-512F, 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn axpy_f32_bytes(out: &mut [f32], a: f32, col: &[u8]) {
    assert_eq!(col.len(), 4 * out.len());
    let va = _mm512_set1_ps(a);
    let body = out.len() / 16 * 16;
    for i in (0..body).step_by(16) {
        // SAFETY: `i + 16 <= out.len()` and `col` holds `4 * out.len()` bytes; unaligned loads and stores.
        unsafe {
            let v = _mm512_loadu_ps(col.as_ptr().add(4 * i).cast());
            let p = out.as_mut_ptr().add(i);
            _mm512_storeu_ps(p, _mm512_fmadd_ps(va, v, _mm512_loadu_ps(p)));
        }
    }
    // SAFETY: the caller guarantees AVX2 and FMA.
    unsafe { super::avx2::axpy_f32_bytes(&mut out[body..], a, &col[4 * body..]) };
}

/// `N` [`axpy_q8_0`]s in one pass over `out`: per value the same chain
/// `out = fma(a[N-1], v[N-1], ... fma(a[0], v[0], out))` as `N` calls in order, so the same bits, with `out`
/// loaded and stored once.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn axpy_q8_0_n<const N: usize>(out: &mut [f32], a: [f32; N], cols: [&[u8]; N]) {
    use super::scalar::Q8_0_BYTES;
    let nb = out.len() / 32;
    assert!(out.len() == nb * 32 && cols.iter().all(|c| c.len() == nb * Q8_0_BYTES));
    let va = a.map(|a| _mm512_set1_ps(a));
    for b in 0..nb {
        let d: [__m512; N] = std::array::from_fn(|i| {
            let blk = &cols[i][b * Q8_0_BYTES..];
            _mm512_set1_ps(f16_to_f32(half::f16::from_le_bytes([blk[0], blk[1]])))
        });
        for j in 0..2 {
            // SAFETY: block `b` of every column holds 34 bytes, so bytes `2 + 16j ..+ 16` are in bounds, and
            // `out` holds `32 * nb` floats; unaligned loads and stores; the features are the caller's guarantee.
            unsafe {
                let p = out.as_mut_ptr().add(32 * b + 16 * j);
                let mut acc = _mm512_loadu_ps(p);
                for i in 0..N {
                    let q = _mm_loadu_si128(cols[i].as_ptr().add(b * Q8_0_BYTES + 2 + 16 * j).cast());
                    let v = _mm512_mul_ps(d[i], _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)));
                    acc = _mm512_fmadd_ps(va[i], v, acc);
                }
                _mm512_storeu_ps(p, acc);
            }
        }
    }
}
