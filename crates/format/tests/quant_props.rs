//! Property tests of the quantizers and block layouts: per-block error bounds derived from each block's own
//! scale (and minimum), idempotence of re-quantizing dequantized rows, zero rows, and byte layouts.

use bytemuck::Zeroable;
use half::{bf16, f16};
use pinion_format::GgmlType;
use pinion_format::quant::{
    self, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, QK, QK_K,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Half the spacing of f16 values around `h`: the most that rounding an f32 to the nearest f16 `h` can have
/// moved it (an upper bound when `h` is a power of two, where the spacing below is smaller).
fn half_ulp(h: f16) -> f32 {
    let exp = ((h.to_bits() & 0x7fff) >> 10) as i32;
    if exp == 0 { 2f32.powi(-25) } else { 2f32.powi(exp - 26) }
}

/// Rows of 1 to 3 blocks whose values span a random binade (tiny ones underflow the f16 scale), with zeros,
/// repeated values and extremes mixed in.
fn row() -> impl Strategy<Value = Vec<f32>> {
    (1usize..4, -24i32..15).prop_flat_map(|(n_blocks, e)| {
        let s = 2f32.powi(e);
        vec(
            prop_oneof![
                8 => (-1.0f32..1.0).prop_map(move |v| v * s),
                1 => Just(0.0f32),
                1 => prop::sample::select(vec![-s, s, 0.5 * s, -0.75 * s]),
            ],
            n_blocks * QK,
        )
    })
}

fn dequant<B: bytemuck::Pod>(ty: GgmlType, blocks: &[B]) -> Vec<f32> {
    let mut out = vec![0.0; blocks.len() * ty.block_len()];
    quant::dequantize_row(ty, bytemuck::cast_slice(blocks), &mut out).unwrap();
    out
}

fn q4_0(x: &[f32]) -> Vec<BlockQ4_0> {
    let mut b = vec![BlockQ4_0::zeroed(); x.len() / QK];
    quant::quantize_row_q4_0(x, &mut b);
    b
}

fn q4_1(x: &[f32]) -> Vec<BlockQ4_1> {
    let mut b = vec![BlockQ4_1::zeroed(); x.len() / QK];
    quant::quantize_row_q4_1(x, &mut b);
    b
}

fn q8_0(x: &[f32]) -> Vec<BlockQ8_0> {
    let mut b = vec![BlockQ8_0::zeroed(); x.len() / QK];
    quant::quantize_row_q8_0(x, &mut b);
    b
}

fn q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    let mut b = vec![BlockQ8_1::zeroed(); x.len() / QK];
    quant::quantize_row_q8_1(x, &mut b);
    b
}

fn amax(xb: &[f32]) -> f32 {
    xb.iter().fold(0.0f32, |a, v| a.max(v.abs()))
}

fn nibbles(qs: &[u8; QK / 2]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = qs[j] & 0x0F;
        q[j + QK / 2] = qs[j] >> 4;
    }
    q
}

proptest! {
    #![proptest_config(crate::util::proptest_config(512))]

    /// Q8_0: `d` is amax/127 rounded to f16, and each value is within half a step (plus the f16 rounding of `d`
    /// times |q|) of the original.
    #[test]
    fn q8_0_error_is_within_half_a_step(x in row()) {
        let blocks = q8_0(&x);
        let y = dequant(GgmlType::Q8_0, &blocks);
        for (bi, (b, xb)) in blocks.iter().zip(x.chunks(QK)).enumerate() {
            let (d16, hu) = (b.d.to_f32(), half_ulp(b.d));
            let a = amax(xb);
            prop_assert!((d16 - a / 127.0).abs() <= hu, "block {bi}: d {d16} for amax {a}");
            if a > 0.0 {
                prop_assert!(b.qs.iter().any(|q| q.abs() == 127), "block {bi}: the largest value maps to ±127");
            }
            for j in 0..QK {
                let q = b.qs[j] as f32;
                prop_assert!(b.qs[j] >= -127);
                let bound = (d16 + hu) * (0.5 + 2e-5) + q.abs() * hu + a * 1e-6;
                let err = (xb[j] - y[bi * QK + j]).abs();
                prop_assert!(err <= bound, "block {bi} value {j}: x {} y {} err {err} > {bound}", xb[j], y[bi * QK + j]);
            }
        }
    }

    /// Q8_1: as Q8_0, plus `s` is d * sum(q).
    #[test]
    fn q8_1_error_and_sum(x in row()) {
        let blocks = q8_1(&x);
        let y = dequant(GgmlType::Q8_1, &blocks);
        for (bi, (b, xb)) in blocks.iter().zip(x.chunks(QK)).enumerate() {
            let (d16, hu) = (b.d.to_f32(), half_ulp(b.d));
            let a = amax(xb);
            prop_assert!((d16 - a / 127.0).abs() <= hu);
            for j in 0..QK {
                let bound = (d16 + hu) * (0.5 + 2e-5) + (b.qs[j] as f32).abs() * hu + a * 1e-6;
                prop_assert!((xb[j] - y[bi * QK + j]).abs() <= bound);
            }
            let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
            let exact_s = sum as f32 * d16;
            if exact_s.abs() > 65504.0 + half_ulp(f16::MAX) {
                // Beyond f16's range `s` overflows to infinity, as in ggml.
                prop_assert!(b.s.is_infinite() && b.s.is_sign_negative() == (sum < 0), "s {} sum {sum}", b.s);
            } else {
                let s_bound = half_ulp(b.s) + sum.unsigned_abs() as f32 * hu + a * 1e-5;
                prop_assert!((b.s.to_f32() - exact_s).abs() <= s_bound, "s {} sum {sum} d {d16}", b.s);
            }
        }
        // Same scale and values as Q8_0.
        let q80 = q8_0(&x);
        for (a, b) in blocks.iter().zip(&q80) {
            prop_assert_eq!((a.d, a.qs), (b.d, b.qs));
        }
    }

    /// Q4_0: `d` is (signed max)/-8 rounded to f16; a value is within half a step, except values beyond +7.5
    /// steps, which clamp to 7 and are within (t - 7) steps, i.e. at most one step.
    #[test]
    fn q4_0_error_is_within_half_a_step_except_the_clamped_end(x in row()) {
        let blocks = q4_0(&x);
        let y = dequant(GgmlType::Q4_0, &blocks);
        for (bi, (b, xb)) in blocks.iter().zip(x.chunks(QK)).enumerate() {
            let max = xb.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let (d16, hu) = (b.d.to_f32(), half_ulp(b.d));
            prop_assert!((d16 - d).abs() <= hu, "block {bi}: d {d16} for max {max}");
            let q = nibbles(&b.qs);
            if max != 0.0 {
                let i_max = xb.iter().position(|&v| v == max).unwrap();
                prop_assert_eq!(q[i_max], 0, "the signed max maps to -8");
            }
            for j in 0..QK {
                let t = if d != 0.0 { xb[j] as f64 / d as f64 } else { 0.0 };
                let steps = if t > 7.5 { t - 7.0 } else { 0.5 };
                let bound = (d16.abs() + hu) * (steps as f32 + 2e-5) + 8.0 * hu + amax(xb) * 1e-6;
                let err = (xb[j] - y[bi * QK + j]).abs();
                prop_assert!(err <= bound, "block {bi} value {j}: x {} y {} err {err} > {bound}", xb[j], y[bi * QK + j]);
            }
        }
    }

    /// Q4_1: `d` is (max - min)/15 and `m` is min, both rounded to f16; each value is within half a step plus
    /// the rounding of `d` (times q) and of `m`.
    #[test]
    fn q4_1_error_is_within_half_a_step(x in row()) {
        let blocks = q4_1(&x);
        let y = dequant(GgmlType::Q4_1, &blocks);
        for (bi, (b, xb)) in blocks.iter().zip(x.chunks(QK)).enumerate() {
            let min = xb.iter().copied().fold(f32::MAX, f32::min);
            let max = xb.iter().copied().fold(f32::MIN, f32::max);
            let (d16, hd) = (b.d.to_f32(), half_ulp(b.d));
            let (m16, hm) = (b.m.to_f32(), half_ulp(b.m));
            prop_assert!((d16 - (max - min) / 15.0).abs() <= hd);
            prop_assert!((m16 - min).abs() <= hm);
            let q = nibbles(&b.qs);
            for j in 0..QK {
                let bound = (d16 + hd) * (0.5 + 2e-5) + q[j] as f32 * hd + hm + amax(xb) * 1e-6;
                let err = (xb[j] - y[bi * QK + j]).abs();
                prop_assert!(err <= bound, "block {bi} value {j}: x {} y {} err {err} > {bound}", xb[j], y[bi * QK + j]);
            }
        }
    }

    /// Re-quantizing a dequantized row gives the same blocks: exactly for Q8_0 and Q4_0 when the scale is not
    /// zero; for Q4_1 when `q * d + m` is exact in f32 (otherwise the f32 sums drift by an ulp); for Q8_1 the
    /// scale and values (its `s` is rounded from the unrounded scale the first time). When the scale rounds to
    /// zero the values are still reproduced.
    #[test]
    fn requantizing_a_dequantized_row_is_idempotent(x in row()) {
        let b = q8_0(&x);
        let y = dequant(GgmlType::Q8_0, &b);
        let b2 = q8_0(&y);
        prop_assert_eq!(dequant(GgmlType::Q8_0, &b2), y.clone());
        for (a, c) in b.iter().zip(&b2) {
            if a.d.to_f32() != 0.0 { prop_assert_eq!(a, c); }
        }

        let b = q8_1(&x);
        let y = dequant(GgmlType::Q8_1, &b);
        let b2 = q8_1(&y);
        for (a, c) in b.iter().zip(&b2) {
            if a.d.to_f32() != 0.0 { prop_assert_eq!((a.d, a.qs), (c.d, c.qs)); }
        }

        let b = q4_0(&x);
        let y = dequant(GgmlType::Q4_0, &b);
        let b2 = q4_0(&y);
        prop_assert_eq!(dequant(GgmlType::Q4_0, &b2), y.clone());
        for (a, c) in b.iter().zip(&b2) {
            if a.d.to_f32() != 0.0 { prop_assert_eq!(a, c); }
        }

        let b = q4_1(&x);
        let y = dequant(GgmlType::Q4_1, &b);
        let b2 = q4_1(&y);
        for (bi, (a, c)) in b.iter().zip(&b2).enumerate() {
            let (d, m) = (a.d.to_f32(), a.m.to_f32());
            let exact = nibbles(&a.qs).iter().all(|&q| (q as f32 * d + m) as f64 == q as f64 * d as f64 + m as f64);
            if d != 0.0 && exact {
                prop_assert_eq!(a, c, "block {}", bi);
            }
        }
    }
}

#[test]
fn zero_rows_give_zero_blocks() {
    let x = vec![0.0f32; 64];
    let zero_bytes = |b: &[u8]| b.iter().all(|&v| v == 0);
    assert!(zero_bytes(bytemuck::cast_slice(&q8_0(&x))));
    assert!(zero_bytes(bytemuck::cast_slice(&q8_1(&x))));
    assert!(zero_bytes(bytemuck::cast_slice(&q4_1(&x))));
    // Q4_0 stores zero as the middle code 8 (ggml does the same), with a zero scale. Its scale is max / -8,
    // which is -0.0 here, as in ggml.
    for b in q4_0(&x) {
        assert_eq!(b.d.to_f32(), 0.0);
        assert!(b.qs.iter().all(|&q| q == 0x88));
    }
    // Negative zeros: scales may come out as -0.0; values are all zero.
    for x in [x.clone(), vec![-0.0f32; 64]] {
        for (ty, y) in [
            (GgmlType::Q8_0, dequant(GgmlType::Q8_0, &q8_0(&x))),
            (GgmlType::Q8_1, dequant(GgmlType::Q8_1, &q8_1(&x))),
            (GgmlType::Q4_0, dequant(GgmlType::Q4_0, &q4_0(&x))),
            (GgmlType::Q4_1, dequant(GgmlType::Q4_1, &q4_1(&x))),
        ] {
            assert!(y.iter().all(|&v| v == 0.0), "{ty}");
        }
    }
}

#[test]
fn constant_rows_are_exact_when_representable() {
    // 0.75 is exact in f16: Q4_1 stores it as the minimum, the others at their largest code.
    let x = vec![0.75f32; 32];
    assert_eq!(dequant(GgmlType::Q4_1, &q4_1(&x)), x);
    let b = q8_0(&x);
    assert!(b[0].qs.iter().all(|&q| q == 127));
    let y = dequant(GgmlType::Q8_0, &b);
    assert!(y.iter().all(|&v| (v - 0.75).abs() <= 127.0 * half_ulp(b[0].d)));
    let b = q4_0(&x);
    assert!(nibbles(&b[0].qs).iter().all(|&q| q == 0), "all equal to the max: code 0, i.e. -8 * (-max/8)");
    assert_eq!(dequant(GgmlType::Q4_0, &b), x);
}

/// Bytes 0, 1, 2, ... viewed as a block, to check where each field sits.
fn counting<B: bytemuck::Pod>() -> B {
    let bytes: Vec<u8> = (0..size_of::<B>()).map(|i| i as u8).collect();
    bytemuck::pod_read_unaligned(&bytes)
}

fn le16(lo: usize) -> u16 {
    u16::from_le_bytes([lo as u8, (lo + 1) as u8])
}

#[test]
fn block_layouts_match_ggml() {
    assert_eq!(
        [18, 20, 34, 36, 144, 210, 292],
        [
            size_of::<BlockQ4_0>(),
            size_of::<BlockQ4_1>(),
            size_of::<BlockQ8_0>(),
            size_of::<BlockQ8_1>(),
            size_of::<BlockQ4K>(),
            size_of::<BlockQ6K>(),
            size_of::<BlockQ8K>()
        ]
    );
    let b: BlockQ4_0 = counting();
    assert_eq!((b.d.to_bits(), b.qs[0], b.qs[15]), (le16(0), 2, 17));
    let b: BlockQ4_1 = counting();
    assert_eq!((b.d.to_bits(), b.m.to_bits(), b.qs[0]), (le16(0), le16(2), 4));
    let b: BlockQ8_0 = counting();
    assert_eq!((b.d.to_bits(), b.qs[0], b.qs[31]), (le16(0), 2, 33));
    let b: BlockQ8_1 = counting();
    assert_eq!((b.d.to_bits(), b.s.to_bits(), b.qs[0]), (le16(0), le16(2), 4));
    let b: BlockQ4K = counting();
    assert_eq!(
        (b.d.to_bits(), b.dmin.to_bits(), b.scales[0], b.qs[0], b.qs[127]),
        (le16(0), le16(2), 4, 16, 143)
    );
    // Fields of the types added with the K-quant kernels, at ggml-common.h's offsets.
    assert_eq!(
        [22, 24, 84, 110, 176],
        [
            size_of::<BlockQ5_0>(),
            size_of::<BlockQ5_1>(),
            size_of::<BlockQ2K>(),
            size_of::<BlockQ3K>(),
            size_of::<BlockQ5K>()
        ]
    );
    let b: BlockQ5_0 = counting();
    assert_eq!((b.d.to_bits(), b.qh, b.qs[0], b.qs[15]), (le16(0), [2, 3, 4, 5], 6, 21));
    let b: BlockQ5_1 = counting();
    assert_eq!((b.d.to_bits(), b.m.to_bits(), b.qh[0], b.qs[0], b.qs[15]), (le16(0), le16(2), 4, 8, 23));
    let b: BlockQ2K = counting();
    assert_eq!(
        (b.scales[0], b.qs[0], b.qs[63], b.d.to_bits(), b.dmin.to_bits()),
        (0, 16, 79, le16(80), le16(82))
    );
    let b: BlockQ3K = counting();
    assert_eq!((b.hmask[0], b.qs[0], b.scales[0], b.scales[11], b.d.to_bits()), (0, 32, 96, 107, le16(108)));
    let b: BlockQ5K = counting();
    assert_eq!(
        (b.d.to_bits(), b.dmin.to_bits(), b.scales[0], b.qh[0], b.qs[0], b.qs[127]),
        (le16(0), le16(2), 4, 16, 48, 175)
    );
    let b: BlockQ6K = counting();
    assert_eq!((b.ql[0], b.qh[0], b.scales[0], b.d.to_bits()), (0, 128, -64, le16(208)));
    let b: BlockQ8K = counting();
    assert_eq!(b.d.to_bits(), u32::from_le_bytes([0, 1, 2, 3]));
    // bsums starts at byte 260; bytes 260 and 261 hold 4 and 5 (260 mod 256).
    assert_eq!((b.qs[0], b.bsums[0]), (4, i16::from_le_bytes([4, 5])));
    // The type table agrees with the structs.
    for (ty, len, bytes) in [
        (GgmlType::F32, 1, 4),
        (GgmlType::F16, 1, 2),
        (GgmlType::BF16, 1, 2),
        (GgmlType::Q4_0, 32, 18),
        (GgmlType::Q4_1, 32, 20),
        (GgmlType::Q5_0, 32, 22),
        (GgmlType::Q5_1, 32, 24),
        (GgmlType::Q8_0, 32, 34),
        (GgmlType::Q8_1, 32, 36),
        (GgmlType::Q2K, 256, 84),
        (GgmlType::Q3K, 256, 110),
        (GgmlType::Q4K, 256, 144),
        (GgmlType::Q5K, 256, 176),
        (GgmlType::Q6K, 256, 210),
        (GgmlType::Q8K, 256, 292),
    ] {
        assert_eq!((ty.block_len(), ty.block_bytes()), (len, bytes), "{ty}");
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    // GGUF ids, from ggml.h.
    let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30]);
}

proptest! {
    #![proptest_config(crate::util::proptest_config(256))]

    /// Dequantizing a row equals dequantizing each block on its own and concatenating: blocks are independent.
    #[test]
    fn blocks_dequantize_independently(ty_idx in 0..GgmlType::ALL.len(), n_blocks in 1usize..4, seed: u64) {
        let ty = GgmlType::ALL[ty_idx];
        let mut rng = crate::util::Rng(seed);
        let bytes = rng.bytes(n_blocks * ty.block_bytes());
        let mut whole = vec![0.0f32; n_blocks * ty.block_len()];
        quant::dequantize_row(ty, &bytes, &mut whole).unwrap();
        for (i, (chunk, out)) in bytes.chunks(ty.block_bytes()).zip(whole.chunks(ty.block_len())).enumerate() {
            let mut one = vec![0.0f32; ty.block_len()];
            quant::dequantize_row(ty, chunk, &mut one).unwrap();
            let same = one.iter().zip(out).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same, "{} block {}", ty, i);
        }
    }

    /// Floats dequantize exactly: F32 keeps its bits, F16 and BF16 convert back to the same bits (NaN aside).
    #[test]
    fn float_types_convert_exactly(bits in vec(any::<u32>(), 1..64)) {
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut out = vec![0.0f32; bits.len()];
        quant::dequantize_row(GgmlType::F32, &bytes, &mut out).unwrap();
        prop_assert!(out.iter().zip(&bits).all(|(v, b)| v.to_bits() == *b));

        let mut out = vec![0.0f32; bits.len() * 2];
        quant::dequantize_row(GgmlType::F16, &bytes, &mut out).unwrap();
        for (v, c) in out.iter().zip(bytes.chunks(2)) {
            let h = f16::from_le_bytes([c[0], c[1]]);
            if !h.is_nan() { prop_assert_eq!(f16::from_f32(*v).to_bits(), h.to_bits()); } else { prop_assert!(v.is_nan()); }
        }
        quant::dequantize_row(GgmlType::BF16, &bytes, &mut out).unwrap();
        for (v, c) in out.iter().zip(bytes.chunks(2)) {
            let h = bf16::from_le_bytes([c[0], c[1]]);
            if !h.is_nan() { prop_assert_eq!(v.to_bits(), (h.to_bits() as u32) << 16); } else { prop_assert!(v.is_nan()); }
        }
    }

    /// Q4_K: with the super-block scales zeroed every value is zero; each value otherwise lies in
    /// [-dmin * 63, d * 63 * 15] for non-negative d and dmin, the range the 6-bit scales and 4-bit values allow.
    #[test]
    fn q4k_values_stay_in_the_range_of_their_scales(seed: u64, d in 0.0f32..1.0, dmin in 0.0f32..1.0) {
        let mut rng = crate::util::Rng(seed);
        let mut b: BlockQ4K = bytemuck::pod_read_unaligned(&rng.bytes(size_of::<BlockQ4K>()));
        let mut out = vec![0.0f32; QK_K];
        b.d = f16::ZERO;
        b.dmin = f16::ZERO;
        quant::dequantize_row_q4k(&[b], &mut out);
        prop_assert!(out.iter().all(|&v| v == 0.0));
        b.d = f16::from_f32(d);
        b.dmin = f16::from_f32(dmin);
        quant::dequantize_row_q4k(&[b], &mut out);
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        prop_assert!(out.iter().all(|&v| v >= -dmin * 63.0 && v <= d * 63.0 * 15.0));
    }

    /// Q6_K: values are d * scale * q with q in -32..32, so |v| <= |d| * 128 * 32, and zero when d is zero.
    #[test]
    fn q6k_values_stay_in_the_range_of_their_scales(seed: u64, d in -1.0f32..1.0) {
        let mut rng = crate::util::Rng(seed);
        let mut b: BlockQ6K = bytemuck::pod_read_unaligned(&rng.bytes(size_of::<BlockQ6K>()));
        b.d = f16::from_f32(d);
        let mut out = vec![0.0f32; QK_K];
        quant::dequantize_row_q6k(&[b], &mut out);
        let d = b.d.to_f32();
        for (i, &v) in out.iter().enumerate() {
            let sc = b.scales[i / 16] as f32;
            prop_assert!(v.abs() <= (d * sc).abs() * 32.0, "value {} = {} with scale {}", i, v, sc);
        }
    }
}
