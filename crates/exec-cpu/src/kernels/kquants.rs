//! K-quant (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) x Q8_K dot products on x86-64: AVX2 tiles, and AVX-512BW tiles
//! that do the integer work two 32-value groups per instruction, both giving exactly the bits of
//! [`super::scalar`] (ggml's generic order).
//!
//! The scalar kernels sum a super-block's integer products into eight lanes, lane `l` taking the products at
//! positions `l mod 8`, scaled per sub-block. Integer sums are exact, so any order of the integer work gives
//! the same lanes; what matters is which products land in which lane. Both operands of every 32-value group
//! are therefore permuted so that 32-bit word `l` holds positions `l, l + 8, l + 16, l + 24` (the weights by
//! `perm32` as they are unpacked, the activations once when they are quantized, `super::permute_q8k`):
//! `maddubs` then adds the pairs `(l, l + 8)` and `(l + 16, l + 24)` (one per 16-value sub-block), and
//! `madd` with the two sub-block scales adds those into word `l`. The weights enter `maddubs` unsigned; Q3_K
//! and Q6_K, whose values are signed, are offset (`+4`, `+32`) and the offset times the activation pair sums
//! (computed once per activation block) is subtracted, which gives the same integers. The f32 part (per block
//! `sums[l] += d * lane[l]`, the minimum terms, the final additions) is then the scalar's, operation by
//! operation, with no fused multiply-add.
//!
//! The sub-block scales are decoded as ggml's x86 code does (32-bit masks and shifts for the 6-bit packings)
//! into sixteen i16, one per 16 values, and each group's pair of scales is picked with a 32-bit permute.

use std::arch::x86_64::*;

use bytemuck::Pod;
use half::f16;
use pinion_format::quant::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

use super::avx2::f16_to_f32;

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

/// A K-quant block type with x86 unpackers.
pub(crate) trait KBlock: Pod {
    /// Subtracted from the unsigned weight codes the unpackers produce to give the values.
    const OFFSET: i8;
    /// The shape of the f32 part.
    const KIND: Kind;
    /// The groups `unpack512` puts in the low and high halves of each of its four vectors.
    const PAIRS: [(usize, usize); 4];
    /// Super-block scale.
    fn d(&self) -> f16;
    /// Super-block scale of the minimums (unused for [`Kind::Lanes`]).
    fn dmin(&self) -> f16;
    /// The scale of each 16 values as sixteen i16, and the multipliers of the activation's sixteen `bsums`
    /// (the minimums; zeros for [`Kind::Lanes`]).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn scales(&self) -> (__m256i, __m256i);
    /// The eight 32-value groups as unsigned codes, each permuted by `perm32`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]);
    /// As `unpack256`, two groups per vector: vector `i` holds groups `PAIRS[i].0` and `PAIRS[i].1`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW and AVX2.
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]);
}

/// The byte shuffle of `perm32` within each 128-bit lane: a 4 x 4 transpose of 32-bit words.
const TRANSPOSE4: [i8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Permutes the 32 bytes of a group so that word `l` holds bytes `l, l + 8, l + 16, l + 24`: words
/// `0, 2, 4, 6` (bytes `0..4, 8..12, 16..20, 24..28`) go to the low lane, the odd ones to the high lane,
/// and each lane's 4 x 4 bytes are transposed.
#[target_feature(enable = "avx2")]
#[inline]
fn perm32(v: __m256i) -> __m256i {
    let v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    // SAFETY: `TRANSPOSE4` is 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(TRANSPOSE4.as_ptr().cast()) };
    _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(t))
}

/// `perm32` on both 256-bit halves.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn perm64(v: __m512i) -> __m512i {
    let idx = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    let v = _mm512_permutexvar_epi32(idx, v);
    // SAFETY: `TRANSPOSE4` is 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(TRANSPOSE4.as_ptr().cast()) };
    _mm512_shuffle_epi8(v, _mm512_broadcast_i32x4(t))
}

/// Loads 32 bytes.
///
/// # Safety
/// `p` must point to 32 readable bytes.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Loads 64 bytes.
///
/// # Safety
/// `p` must point to 64 readable bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load64(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes; the load is unaligned.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// Two 256-bit vectors as one 512-bit vector `[lo, hi]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
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

/// The 12 scale bytes of a Q3_K / Q4_K / Q5_K block as three little-endian words.
#[inline]
fn words3(s: &[u8; 12]) -> [u32; 3] {
    std::array::from_fn(|i| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]))
}

/// Q4_K / Q5_K scales and minimums with ggml's `utmp` masks: `([s0, s0, ..., s7, s7], [m0, m0, ..., m7, m7])`
/// as i16 (each 32-value scale covers two 16-value halves, each minimum two `bsums`).
#[target_feature(enable = "avx2")]
#[inline]
fn scales_k4(scales: &[u8; 12]) -> (__m256i, __m256i) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let [u0, u1, u2] = words3(scales);
    let m_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let m_lo = u1 & KMASK1;
    let s_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let s_lo = u0 & KMASK1;
    let sc = (s_lo as u64 | (s_hi as u64) << 32) as i64;
    let mn = (m_lo as u64 | (m_hi as u64) << 32) as i64;
    let v = _mm_set_epi64x(mn, sc);
    (_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v)), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v)))
}

impl KBlock for BlockQ2K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::Q2;
    const PAIRS: [(usize, usize); 4] = [(0, 4), (1, 5), (2, 6), (3, 7)];
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn scales(&self) -> (__m256i, __m256i) {
        // SAFETY: `scales` holds 16 bytes.
        let sc = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(self.scales.as_ptr().cast()) });
        (_mm256_and_si256(sc, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16::<4>(sc))
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]) {
        let m3 = _mm256_set1_epi8(3);
        for k in 0..2 {
            // SAFETY: `qs` holds 64 bytes.
            let mut t = perm32(unsafe { load32(self.qs.as_ptr().add(32 * k)) });
            for j in 0..4 {
                w[4 * k + j] = _mm256_and_si256(t, m3);
                t = _mm256_srli_epi16::<2>(t);
            }
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]) {
        let m3 = _mm512_set1_epi8(3);
        // SAFETY: `qs` holds 64 bytes.
        let mut t = perm64(unsafe { load64(self.qs.as_ptr()) });
        for w in w.iter_mut() {
            *w = _mm512_and_si512(t, m3);
            t = _mm512_srli_epi16::<2>(t);
        }
    }
}

impl KBlock for BlockQ3K {
    const OFFSET: i8 = 4;
    const KIND: Kind = Kind::Lanes;
    const PAIRS: [(usize, usize); 4] = [(0, 4), (1, 5), (2, 6), (3, 7)];
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        f16::ZERO
    }
    #[target_feature(enable = "avx2")]
    unsafe fn scales(&self) -> (__m256i, __m256i) {
        const KMASK1: u32 = 0x0303_0303;
        const KMASK2: u32 = 0x0f0f_0f0f;
        let [a0, a1, tmp] = words3(&self.scales);
        let w2 = ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
        let w3 = ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
        let w0 = (a0 & KMASK2) | ((tmp & KMASK1) << 4);
        let w1 = (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
        let v = _mm_setr_epi32(w0 as i32, w1 as i32, w2 as i32, w3 as i32);
        let v = _mm_sub_epi8(v, _mm_set1_epi8(32));
        (_mm256_cvtepi8_epi16(v), _mm256_setzero_si256())
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]) {
        let (m3, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
        // SAFETY: `hmask` holds 32 bytes.
        let mut h = perm32(unsafe { load32(self.hmask.as_ptr()) });
        for k in 0..2 {
            // SAFETY: `qs` holds 64 bytes.
            let mut t = perm32(unsafe { load32(self.qs.as_ptr().add(32 * k)) });
            for j in 0..4 {
                // Low two bits, plus 4 where the high bit is set: the value plus 4.
                let hi = _mm256_and_si256(_mm256_slli_epi16::<2>(h), m4);
                w[4 * k + j] = _mm256_or_si256(_mm256_and_si256(t, m3), hi);
                t = _mm256_srli_epi16::<2>(t);
                h = _mm256_srli_epi16::<1>(h);
            }
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]) {
        let (m3, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
        // SAFETY: `hmask` holds 32 bytes and `qs` 64.
        let (h, mut t) = unsafe { (perm32(load32(self.hmask.as_ptr())), perm64(load64(self.qs.as_ptr()))) };
        // The high half serves groups 4..8: its bits start 4 places further.
        let mut h = join(h, _mm256_srli_epi16::<4>(h));
        for w in w.iter_mut() {
            let hi = _mm512_and_si512(_mm512_slli_epi16::<2>(h), m4);
            *w = _mm512_or_si512(_mm512_and_si512(t, m3), hi);
            t = _mm512_srli_epi16::<2>(t);
            h = _mm512_srli_epi16::<1>(h);
        }
    }
}

impl KBlock for BlockQ4K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::LanesMins;
    const PAIRS: [(usize, usize); 4] = [(0, 2), (1, 3), (4, 6), (5, 7)];
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn scales(&self) -> (__m256i, __m256i) {
        scales_k4(&self.scales)
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]) {
        let m = _mm256_set1_epi8(0x0F);
        for c in 0..4 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm32(unsafe { load32(self.qs.as_ptr().add(32 * c)) });
            w[2 * c] = _mm256_and_si256(t, m);
            w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(t), m);
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]) {
        let m = _mm512_set1_epi8(0x0F);
        for c in 0..2 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm64(unsafe { load64(self.qs.as_ptr().add(64 * c)) });
            w[2 * c] = _mm512_and_si512(t, m);
            w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(t), m);
        }
    }
}

impl KBlock for BlockQ5K {
    const OFFSET: i8 = 0;
    const KIND: Kind = Kind::LanesMins;
    const PAIRS: [(usize, usize); 4] = [(0, 2), (1, 3), (4, 6), (5, 7)];
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        self.dmin
    }
    #[target_feature(enable = "avx2")]
    unsafe fn scales(&self) -> (__m256i, __m256i) {
        scales_k4(&self.scales)
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]) {
        let (m, m16) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        // SAFETY: `qh` holds 32 bytes.
        let mut h = perm32(unsafe { load32(self.qh.as_ptr()) });
        for c in 0..4 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm32(unsafe { load32(self.qs.as_ptr().add(32 * c)) });
            let lo = _mm256_and_si256(t, m);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(t), m);
            w[2 * c] = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16));
            h = _mm256_srli_epi16::<1>(h);
            w[2 * c + 1] = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16));
            h = _mm256_srli_epi16::<1>(h);
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]) {
        let (m, m16) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
        // SAFETY: `qh` holds 32 bytes.
        let h = perm32(unsafe { load32(self.qh.as_ptr()) });
        // Vector `i` pairs groups `g` and `g + 2`: the high half's bits start 2 places further.
        let mut h = join(h, _mm256_srli_epi16::<2>(h));
        for c in 0..2 {
            // SAFETY: `qs` holds 128 bytes.
            let t = perm64(unsafe { load64(self.qs.as_ptr().add(64 * c)) });
            let lo = _mm512_and_si512(t, m);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(t), m);
            w[2 * c] = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16::<4>(h), m16));
            h = _mm512_srli_epi16::<1>(h);
            w[2 * c + 1] = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16::<4>(h), m16));
            // From groups (1, 3) to (4, 6).
            h = _mm512_srli_epi16::<3>(h);
        }
    }
}

impl KBlock for BlockQ6K {
    const OFFSET: i8 = 32;
    const KIND: Kind = Kind::Lanes;
    const PAIRS: [(usize, usize); 4] = [(0, 1), (2, 3), (4, 5), (6, 7)];
    fn d(&self) -> f16 {
        self.d
    }
    fn dmin(&self) -> f16 {
        f16::ZERO
    }
    #[target_feature(enable = "avx2")]
    unsafe fn scales(&self) -> (__m256i, __m256i) {
        // SAFETY: `scales` holds 16 bytes.
        let sc = unsafe { _mm_loadu_si128(self.scales.as_ptr().cast()) };
        (_mm256_cvtepi8_epi16(sc), _mm256_setzero_si256())
    }
    #[target_feature(enable = "avx2")]
    unsafe fn unpack256(&self, w: &mut [__m256i; 8]) {
        let (m, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        for h in 0..2 {
            // SAFETY: `ql` holds 128 bytes and `qh` 64.
            let (a, b, q) = unsafe {
                (
                    perm32(load32(self.ql.as_ptr().add(64 * h))),
                    perm32(load32(self.ql.as_ptr().add(64 * h + 32))),
                    perm32(load32(self.qh.as_ptr().add(32 * h))),
                )
            };
            let hi = |x: __m256i| _mm256_and_si256(x, m30);
            w[4 * h] = _mm256_or_si256(_mm256_and_si256(a, m), hi(_mm256_slli_epi16::<4>(q)));
            w[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(b, m), hi(_mm256_slli_epi16::<2>(q)));
            w[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(a), m), hi(q));
            let b_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), m);
            w[4 * h + 3] = _mm256_or_si256(b_hi, hi(_mm256_srli_epi16::<2>(q)));
        }
    }
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn unpack512(&self, w: &mut [__m512i; 4]) {
        let (m, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        for h in 0..2 {
            // SAFETY: `ql` holds 128 bytes and `qh` 64.
            let (t, q) = unsafe {
                (perm64(load64(self.ql.as_ptr().add(64 * h))), perm32(load32(self.qh.as_ptr().add(32 * h))))
            };
            // `t` is `[a, b]`: low nibbles are groups (4h, 4h + 1), high nibbles (4h + 2, 4h + 3); their high
            // bits are bits (0, 2) and (4, 6) of `qh`.
            let q = join(q, _mm256_srli_epi16::<2>(q));
            w[2 * h] =
                _mm512_or_si512(_mm512_and_si512(t, m), _mm512_and_si512(_mm512_slli_epi16::<4>(q), m30));
            let t_hi = _mm512_and_si512(_mm512_srli_epi16::<4>(t), m);
            w[2 * h + 1] = _mm512_or_si512(t_hi, _mm512_and_si512(q, m30));
        }
    }
}

/// One activation block made ready for the K-quant cores: its eight groups (permuted as `perm32` permutes,
/// when the activations were quantized: `super::permute_q8k`), the offset corrections `maddubs(OFFSET, y)`,
/// its `bsums` as sixteen i16 and its scale.
#[derive(Clone, Copy)]
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
        // SAFETY: `qs` holds 256 bytes (already permuted: `super::permute_q8k`).
        y[g] = unsafe { load32(by.qs.as_ptr().add(32 * g).cast()) };
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

/// For each group, its two i16 scales repeated in every 32-bit word: word `g` of `scales16`.
#[target_feature(enable = "avx2")]
#[inline]
fn group_scales(scales16: __m256i) -> [__m256i; 8] {
    std::array::from_fn(|g| _mm256_permutevar8x32_epi32(scales16, _mm256_set1_epi32(g as i32)))
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
    let next = super::NextTile::after(w[R - 1], R, nb);
    // Filled in place per block (an array built by `from_fn` per block went through an out-of-line closure
    // and a copy).
    let mut acts = [Act::zero(); C];
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        for c in 0..C {
            acts[c] = prep_act::<B>(&a[c][b]);
        }
        for r in 0..R {
            let bx = &w[r][b];
            // SAFETY: the caller guarantees AVX2.
            let (scales16, mins16) = unsafe {
                bx.unpack256(&mut wv);
                bx.scales()
            };
            let sv = group_scales(scales16);
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

/// [`Act`] with its groups joined in `B::PAIRS` for the 512-bit core.
#[derive(Clone, Copy)]
struct Act512 {
    y: [__m512i; 4],
    corr: [__m512i; 4],
}

impl Act {
    #[target_feature(enable = "avx")]
    #[inline]
    fn zero() -> Act {
        let z = _mm256_setzero_si256();
        Act { y: [z; 8], corr: [z; 8], bsums: z, d: 0.0 }
    }
}

impl Act512 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn zero() -> Act512 {
        let z = _mm512_setzero_si512();
        Act512 { y: [z; 4], corr: [z; 4] }
    }
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

/// An activation block's groups paired as `unpack512` pairs the weights'.
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn act512<B: KBlock>(act: &Act) -> Act512 {
    let pick = |v: &[__m256i; 8], i: usize| join(v[B::PAIRS[i].0], v[B::PAIRS[i].1]);
    Act512 { y: std::array::from_fn(|i| pick(&act.y, i)), corr: std::array::from_fn(|i| pick(&act.corr, i)) }
}

/// For each of `unpack512`'s vectors, the indices giving its two groups' scales.
#[target_feature(enable = "avx512f")]
#[inline]
fn pair_indices<B: KBlock>() -> [__m512i; 4] {
    std::array::from_fn(|i| {
        let (lo, hi) = (B::PAIRS[i].0 as i32, B::PAIRS[i].1 as i32);
        _mm512_setr_epi32(lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi)
    })
}

/// The f16 at the start of four rows' block `b` as f32 (`d` with `dmin == false`, else the `dmin` after it).
#[target_feature(enable = "avx2,f16c")]
#[inline]
fn scales4<B: KBlock>(w: &[&[B]; 4], b: usize, dmin: bool) -> __m128 {
    let h = |r: usize| i32::from(if dmin { w[r][b].dmin() } else { w[r][b].d() }.to_bits());
    _mm_cvtph_ps(_mm_setr_epi32(h(0) | h(1) << 16, h(2) | h(3) << 16, 0, 0))
}

/// [`tile_avx512`] for four rows of a kind with lanes (not Q2_K): the same operations per (row, activation),
/// with what is per row done for the four rows at once where the results cannot differ: the `bsums x mins`
/// sums (integers) of the four rows reduced together, their `d` and `dmin` converted together, and the scalar
/// chain `sumf -= dmin * sumi` of the four rows in the lanes of one vector (a product, then a difference, per
/// lane, as the scalar chain computes them).
///
/// # Safety
/// As [`tile_avx512`].
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tile4_avx512<B: KBlock, const C: usize>(
    w: [&[B]; 4],
    a: [&[BlockQ8K]; C],
    nb: usize,
    out: &mut [[f32; C]; 4],
) {
    let mut sums = [[_mm256_setzero_ps(); C]; 4];
    let mut sumf = [_mm_setzero_ps(); C];
    let mut wv = [_mm512_setzero_si512(); 4];
    let pair_idx = pair_indices::<B>();
    let next = super::NextTile::after(w[3], 4, nb);
    let (mut acts, mut acts512) = ([Act::zero(); C], [Act512::zero(); C]);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        for c in 0..C {
            acts[c] = prep_act::<B>(&a[c][b]);
            acts512[c] = act512::<B>(&acts[c]);
        }
        let mut d = [0.0f32; 4];
        // SAFETY: `d` holds 4 floats.
        unsafe { _mm_storeu_ps(d.as_mut_ptr(), scales4(&w, b, false)) };
        let mut mins = [_mm256_setzero_si256(); 4];
        for r in 0..4 {
            // SAFETY: the caller guarantees AVX-512F/BW and AVX2.
            let (scales16, mins16) = unsafe {
                w[r][b].unpack512(&mut wv);
                w[r][b].scales()
            };
            mins[r] = mins16;
            let s512 = _mm512_castsi256_si512(scales16);
            let sv: [__m512i; 4] = std::array::from_fn(|i| _mm512_permutexvar_epi32(pair_idx[i], s512));
            for c in 0..C {
                let lanes = lanes512::<B>(&wv, &sv, &acts512[c]);
                let dd = d[r] * acts[c].d;
                sums[r][c] =
                    _mm256_add_ps(sums[r][c], _mm256_mul_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(lanes)));
            }
        }
        if B::KIND == Kind::LanesMins {
            let dmin = scales4(&w, b, true);
            for c in 0..C {
                let m: [__m256i; 4] = std::array::from_fn(|r| _mm256_madd_epi16(acts[c].bsums, mins[r]));
                // Per 128-bit half, lane r holds half of row r's sum; adding the halves gives row r's sum.
                let t = _mm256_hadd_epi32(_mm256_hadd_epi32(m[0], m[1]), _mm256_hadd_epi32(m[2], m[3]));
                let sumi = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                let dm = _mm_mul_ps(dmin, _mm_set1_ps(acts[c].d));
                sumf[c] = _mm_sub_ps(sumf[c], _mm_mul_ps(dm, _mm_cvtepi32_ps(sumi)));
            }
        }
    }
    for c in 0..C {
        let mut f = [0.0f32; 4];
        // SAFETY: `f` holds 4 floats.
        unsafe { _mm_storeu_ps(f.as_mut_ptr(), sumf[c]) };
        for r in 0..4 {
            out[r][c] = finish::<B>(&Acc { sums: sums[r][c], sumf: f[r] });
        }
    }
}

/// [`tile_avx2`] with the integer work on 512-bit vectors (AVX-512BW), two groups per vector: the same bits.
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
    if R == 4 && B::KIND != Kind::Q2 {
        let w4: [&[B]; 4] = std::array::from_fn(|r| w[r]);
        let mut out4 = [[0.0f32; C]; 4];
        // SAFETY: the caller's guarantees, passed on.
        unsafe { tile4_avx512::<B, C>(w4, a, nb, &mut out4) };
        for (o, v) in out.iter_mut().zip(out4) {
            *o = v;
        }
        return;
    }
    let mut acc = [[Acc { sums: _mm256_setzero_ps(), sumf: 0.0 }; C]; R];
    let mut wv = [_mm512_setzero_si512(); 4];
    let pair_idx = pair_indices::<B>();
    let next = super::NextTile::after(w[R - 1], R, nb);
    let (mut acts, mut acts512) = ([Act::zero(); C], [Act512::zero(); C]);
    for b in 0..nb {
        if C == 1 {
            next.prefetch(b);
        }
        for c in 0..C {
            acts[c] = prep_act::<B>(&a[c][b]);
            acts512[c] = act512::<B>(&acts[c]);
        }
        for r in 0..R {
            let bx = &w[r][b];
            // SAFETY: the caller guarantees AVX-512F/BW and AVX2.
            let (scales16, mins16) = unsafe {
                bx.unpack512(&mut wv);
                bx.scales()
            };
            let s512 = _mm512_castsi256_si512(scales16);
            let sv: [__m512i; 4] = std::array::from_fn(|i| _mm512_permutexvar_epi32(pair_idx[i], s512));
            for c in 0..C {
                let lanes = lanes512::<B>(&wv, &sv, &acts512[c]);
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
