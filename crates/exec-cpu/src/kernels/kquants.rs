//! K-quant (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) x Q8_K dot products on x86-64: AVX2 tiles, and AVX-512BW tiles
//! with a 512-bit integer core, both giving exactly the bits of [`super::scalar`] (ggml's generic order).
//!
//! The scalar kernels sum a super-block's integer products into eight lanes, lane `l` taking the products at
//! positions `l mod 8`, scaled per sub-block. Integer sums are exact, so any order of the integer work gives
//! the same lanes; what matters is which products land in which lane. Both operands of every 32-value group
//! are therefore permuted (`perm32`) so that 32-bit word `l` holds positions `l, l + 8, l + 16, l + 24`:
//! `maddubs` then adds the pairs `(l, l + 8)` and `(l + 16, l + 24)` (one per 16-value sub-block), and
//! `madd` with the two sub-block scales adds those into word `l`. The weights enter `maddubs` unsigned; Q3_K
//! and Q6_K, whose values are signed, are offset (`+4`, `+32`) and the offset times the activation pair sums
//! (computed once per activation block) is subtracted, which gives the same integers. The f32 part (per block
//! `sums[l] += d * lane[l]`, the minimum terms, the final additions) is then the scalar's, operation by
//! operation, with no fused multiply-add.

use std::arch::x86_64::*;

use bytemuck::Pod;
use half::f16;
use pinion_format::quant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K, q3k_scales};

use super::avx2::f16_to_f32;
use super::scalar::q4k_scales_mins;

/// How the f32 part of a K-quant dot product goes (see the scalar kernels).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Q2_K: `sumf += dall * isum - dmin * summs` per block, `isum` the total of the lanes.
    Q2,
    /// Q3_K and Q6_K: `sums[l] += d * lane[l]` per block, then `0 + sums[0] + ... + sums[7]`.
    Lanes,
    /// Q4_K and Q5_K: as `Lanes`, plus `sumf -= dmin * sumi` per block, and `sumf` starts the final sum.
    LanesMins,
}

/// A K-quant block type with an x86 unpacker.
pub(crate) trait KBlock: Pod {
    /// Subtracted from the unsigned weight codes `unpack` produces to give the values.
    const OFFSET: i8;
    /// The shape of the f32 part.
    const KIND: Kind;
    /// Super-block scale.
    fn d(&self) -> f16;
    /// Super-block scale of the minimums (unused for [`Kind::Lanes`]).
    fn dmin(&self) -> f16;
    /// The eight 32-value groups as unsigned codes, permuted by `perm32`, and for each group the i16 scales of
    /// its two 16-value halves, alternating (`[s_lo, s_hi, s_lo, ...]`).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]);
    /// The sixteen i16 multipliers of the activation's `bsums` (the minimums), or zeros.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn mins16(&self) -> __m256i;
}

/// Permutes the 32 bytes of a group so that word `l` holds bytes `l, l + 8, l + 16, l + 24`.
#[target_feature(enable = "avx2")]
#[inline]
fn perm32(v: __m256i) -> __m256i {
    let v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    let t = _mm256_setr_epi8(
        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7,
        11, 15,
    );
    _mm256_shuffle_epi8(v, t)
}

/// Loads 32 bytes.
///
/// # Safety
/// `p` must point to 32 readable bytes.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// An i16 vector alternating `lo, hi`.
#[target_feature(enable = "avx")]
#[inline]
fn pair16(lo: i32, hi: i32) -> __m256i {
    _mm256_set1_epi32((lo & 0xFFFF) | (hi << 16))
}

/// Sum of eight i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

impl KBlock for BlockQ2K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::Q2;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]) {
        let m3 = _mm256_set1_epi8(3);
        for k in 0..2 {
            // SAFETY: `qs` holds 64 bytes.
            let mut t = perm32(unsafe { load(self.qs.as_ptr().add(32 * k)) });
            for j in 0..4 {
                w[4 * k + j] = _mm256_and_si256(t, m3);
                t = _mm256_srli_epi16::<2>(t);
            }
        }
        for (g, s) in s.iter_mut().enumerate() {
            *s = pair16((self.scales[2 * g] & 0x0F) as i32, (self.scales[2 * g + 1] & 0x0F) as i32);
        }
    }
    #[target_feature(enable = "avx2")]
    unsafe fn mins16(&self) -> __m256i {
        // SAFETY: `scales` holds 16 bytes.
        let sc = unsafe { _mm_loadu_si128(self.scales.as_ptr().cast()) };
        _mm256_srli_epi16::<4>(_mm256_cvtepu8_epi16(sc))
    }
}

impl KBlock for BlockQ3K {
    const OFFSET: i8 = 4;
    const KIND: Kind = Kind::Lanes;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        f16::ZERO
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]) {
        let (m3, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
        // SAFETY: `hmask` holds 32 bytes.
        let mut h = perm32(unsafe { load(self.hmask.as_ptr()) });
        for k in 0..2 {
            // SAFETY: `qs` holds 64 bytes.
            let mut t = perm32(unsafe { load(self.qs.as_ptr().add(32 * k)) });
            for j in 0..4 {
                // Low two bits, plus 4 where the high bit is set: the value plus 4.
                let hi = _mm256_and_si256(_mm256_slli_epi16::<2>(h), m4);
                w[4 * k + j] = _mm256_or_si256(_mm256_and_si256(t, m3), hi);
                t = _mm256_srli_epi16::<2>(t);
                h = _mm256_srli_epi16::<1>(h);
            }
        }
        let sc = q3k_scales(&self.scales);
        for (g, s) in s.iter_mut().enumerate() {
            *s = pair16(sc[2 * g] as i32, sc[2 * g + 1] as i32);
        }
    }
    #[target_feature(enable = "avx2")]
    unsafe fn mins16(&self) -> __m256i {
        _mm256_setzero_si256()
    }
}

impl KBlock for BlockQ4K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::LanesMins;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]) {
        let m = _mm256_set1_epi8(0x0F);
        for c in 0..4 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm32(unsafe { load(self.qs.as_ptr().add(32 * c)) });
            w[2 * c] = _mm256_and_si256(t, m);
            w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(t), m);
        }
        let (sc, _) = q4k_scales_mins(&self.scales);
        for (s, &sc) in s.iter_mut().zip(&sc) {
            *s = _mm256_set1_epi16(sc as i16);
        }
    }
    #[target_feature(enable = "avx2")]
    unsafe fn mins16(&self) -> __m256i {
        mins_k4(&self.scales)
    }
}

/// `[m0, m0, m1, m1, ..., m7, m7]` for the minimums of a Q4_K / Q5_K block.
#[target_feature(enable = "avx2")]
#[inline]
fn mins_k4(scales: &[u8; 12]) -> __m256i {
    let (_, mn) = q4k_scales_mins(scales);
    let m8 = _mm_set_epi64x(0, i64::from_le_bytes(mn));
    _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8))
}

impl KBlock for BlockQ5K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::LanesMins;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]) {
        let (m, m16) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        // SAFETY: `qh` holds 32 bytes.
        let mut h = perm32(unsafe { load(self.qh.as_ptr()) });
        for c in 0..4 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm32(unsafe { load(self.qs.as_ptr().add(32 * c)) });
            let lo = _mm256_and_si256(t, m);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(t), m);
            w[2 * c] = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16));
            h = _mm256_srli_epi16::<1>(h);
            w[2 * c + 1] = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16));
            h = _mm256_srli_epi16::<1>(h);
        }
        let (sc, _) = q4k_scales_mins(&self.scales);
        for (s, &sc) in s.iter_mut().zip(&sc) {
            *s = _mm256_set1_epi16(sc as i16);
        }
    }
    #[target_feature(enable = "avx2")]
    unsafe fn mins16(&self) -> __m256i {
        mins_k4(&self.scales)
    }
}

impl KBlock for BlockQ6K {
    const OFFSET: i8 = 32;
    const KIND: Kind = Kind::Lanes;
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        f16::ZERO
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self, w: &mut [__m256i; 8], s: &mut [__m256i; 8]) {
        let (m, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        for h in 0..2 {
            // SAFETY: `ql` holds 128 bytes and `qh` 64.
            let (a, b, q) = unsafe {
                (
                    perm32(load(self.ql.as_ptr().add(64 * h))),
                    perm32(load(self.ql.as_ptr().add(64 * h + 32))),
                    perm32(load(self.qh.as_ptr().add(32 * h))),
                )
            };
            let hi = |x: __m256i| _mm256_and_si256(x, m30);
            w[4 * h] = _mm256_or_si256(_mm256_and_si256(a, m), hi(_mm256_slli_epi16::<4>(q)));
            w[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b, m), hi(_mm256_slli_epi16::<2>(q)));
            w[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(a), m), hi(q));
            w[4 * h + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(b), m),
                hi(_mm256_srli_epi16::<2>(q)),
            );
        }
        for (g, s) in s.iter_mut().enumerate() {
            *s = pair16(self.scales[2 * g] as i32, self.scales[2 * g + 1] as i32);
        }
    }
    #[target_feature(enable = "avx2")]
    unsafe fn mins16(&self) -> __m256i {
        _mm256_setzero_si256()
    }
}

/// One activation block made ready for the K-quant cores: its eight groups permuted by `perm32`, the
/// offset corrections `maddubs(OFFSET, y)`, its `bsums` as sixteen i16 and its scale.
struct Act {
    y: [__m256i; 8],
    corr: [__m256i; 8],
    bsums: __m256i,
    d: f32,
}

/// Prepares an activation block for weights of type `B`.
#[target_feature(enable = "avx2")]
#[inline]
fn prep_act<B: KBlock>(by: &BlockQ8K) -> Act {
    let mut y = [_mm256_setzero_si256(); 8];
    let mut corr = [_mm256_setzero_si256(); 8];
    let off = _mm256_set1_epi8(B::OFFSET);
    for g in 0..8 {
        // SAFETY: `qs` holds 256 bytes.
        y[g] = perm32(unsafe { load(by.qs.as_ptr().add(32 * g).cast()) });
        if B::OFFSET != 0 {
            corr[g] = _mm256_maddubs_epi16(off, y[g]);
        }
    }
    // SAFETY: `bsums` holds 16 i16.
    let bsums = unsafe { _mm256_loadu_si256(by.bsums.as_ptr().cast()) };
    Act { y, corr, bsums, d: by.d }
}

/// Per (row, activation) f32 state: the eight lane sums and the scalar chain.
#[derive(Clone, Copy)]
struct Acc {
    sums: __m256,
    sumf: f32,
}

/// Adds one block's integer lanes (`lanes`, ggml's `aux32`) to `acc` as the scalar kernel does.
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn add_block<B: KBlock>(acc: &mut Acc, bx: &B, mins16: __m256i, act: &Act, lanes: __m256i) {
    match B::KIND {
        Kind::Q2 => {
            let isum = hsum_i32(lanes);
            let summs = hsum_i32(_mm256_madd_epi16(act.bsums, mins16));
            let dall = act.d * f16_to_f32(bx.d());
            let dmin = act.d * f16_to_f32(bx.dmin());
            acc.sumf += dall * isum as f32 - dmin * summs as f32;
        }
        Kind::Lanes | Kind::LanesMins => {
            let d = f16_to_f32(bx.d()) * act.d;
            acc.sums = _mm256_add_ps(acc.sums, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes)));
            if B::KIND == Kind::LanesMins {
                let sumi = hsum_i32(_mm256_madd_epi16(act.bsums, mins16));
                let dmin = f16_to_f32(bx.dmin()) * act.d;
                acc.sumf -= dmin * sumi as f32;
            }
        }
    }
}

/// The dot product from the final state, as the scalar kernel ends.
#[target_feature(enable = "avx")]
#[inline]
fn finish<B: KBlock>(acc: &Acc) -> f32 {
    if B::KIND == Kind::Q2 {
        return acc.sumf;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc.sums) };
    let mut sumf = acc.sumf;
    for s in lanes {
        sumf += s;
    }
    sumf
}

/// Integer lanes of one (weight block, activation block) pair, 256 bits at a time.
#[target_feature(enable = "avx2")]
#[inline]
fn lanes256<B: KBlock>(w: &[__m256i; 8], s: &[__m256i; 8], act: &Act) -> __m256i {
    let mut acc = _mm256_setzero_si256();
    for g in 0..8 {
        let mut p = _mm256_maddubs_epi16(w[g], act.y[g]);
        if B::OFFSET != 0 {
            p = _mm256_sub_epi16(p, act.corr[g]);
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, s[g]));
    }
    acc
}

/// K-quant x Q8_K dot products of `R` weight rows with `C` activation rows over `nb` blocks, into
/// `out[r][c]`, with AVX2.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_avx2<B: KBlock, const R: usize, const C: usize>(
    w: [&[B]; R],
    a: [&[BlockQ8K]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[Acc { sums: _mm256_setzero_ps(), sumf: 0.0 }; C]; R];
    let mut wv = [_mm256_setzero_si256(); 8];
    let mut sv = [_mm256_setzero_si256(); 8];
    for b in 0..nb {
        let acts: [Act; C] = std::array::from_fn(|c| prep_act::<B>(&a[c][b]));
        for r in 0..R {
            let bx = &w[r][b];
            // SAFETY: the caller guarantees AVX2.
            let mins16 = unsafe {
                bx.unpack(&mut wv, &mut sv);
                bx.mins16()
            };
            for c in 0..C {
                let lanes = lanes256::<B>(&wv, &sv, &acts[c]);
                add_block(&mut acc[r][c], bx, mins16, &acts[c], lanes);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = finish::<B>(&acc[r][c]);
        }
    }
}

/// Two 256-bit vectors as one 512-bit vector `[lo, hi]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// [`Act`] with its groups joined in pairs (`[y0, y1], [y2, y3], ...`) for the 512-bit core.
struct Act512 {
    y: [__m512i; 4],
    corr: [__m512i; 4],
}

/// Integer lanes of one (weight block, activation block) pair, two groups per 512-bit operation; the two
/// halves are added at the end (integers, so the order does not matter).
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
fn lanes512<B: KBlock>(w: &[__m512i; 4], s: &[__m512i; 4], act: &Act512) -> __m256i {
    let mut acc = _mm512_setzero_si512();
    for i in 0..4 {
        let mut p = _mm512_maddubs_epi16(w[i], act.y[i]);
        if B::OFFSET != 0 {
            p = _mm512_sub_epi16(p, act.corr[i]);
        }
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p, s[i]));
    }
    _mm256_add_epi32(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64::<1>(acc))
}

/// [`tile_avx2`] with the integer work on 512-bit vectors (AVX-512BW), the same bits.
///
/// # Safety
/// The CPU must support AVX-512F/BW, AVX2, FMA and F16C. Every slice must hold at least `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(crate) unsafe fn tile_avx512<B: KBlock, const R: usize, const C: usize>(
    w: [&[B]; R],
    a: [&[BlockQ8K]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    assert!(w.iter().all(|r| r.len() >= nb) && a.iter().all(|r| r.len() >= nb));
    let mut acc = [[Acc { sums: _mm256_setzero_ps(), sumf: 0.0 }; C]; R];
    let mut wv = [_mm256_setzero_si256(); 8];
    let mut sv = [_mm256_setzero_si256(); 8];
    for b in 0..nb {
        let acts: [Act; C] = std::array::from_fn(|c| prep_act::<B>(&a[c][b]));
        let acts512: [Act512; C] = std::array::from_fn(|c| Act512 {
            y: std::array::from_fn(|i| join(acts[c].y[2 * i], acts[c].y[2 * i + 1])),
            corr: std::array::from_fn(|i| join(acts[c].corr[2 * i], acts[c].corr[2 * i + 1])),
        });
        for r in 0..R {
            let bx = &w[r][b];
            // SAFETY: the caller guarantees AVX2.
            let mins16 = unsafe {
                bx.unpack(&mut wv, &mut sv);
                bx.mins16()
            };
            let w2: [__m512i; 4] = std::array::from_fn(|i| join(wv[2 * i], wv[2 * i + 1]));
            let s2: [__m512i; 4] = std::array::from_fn(|i| join(sv[2 * i], sv[2 * i + 1]));
            for c in 0..C {
                let lanes = lanes512::<B>(&w2, &s2, &acts512[c]);
                add_block(&mut acc[r][c], bx, mins16, &acts[c], lanes);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = finish::<B>(&acc[r][c]);
        }
    }
}

const _: () = assert!(QK_K == 256);
