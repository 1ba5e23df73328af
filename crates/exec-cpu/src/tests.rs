//! Unit tests: SIMD paths against the scalar one (bit for bit), the scalar kernels against dequantize-then-f32
//! references, and the other ops against direct f64 formulas.

use half::f16;
use pinion_format::GgmlType;
use pinion_format::quant::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1,
    BlockQ8K, QK, QK_K,
};

use crate::kernels::{self, KernelPath, scalar};
use crate::{QMatrix, QuantizedActs, RopeMode, vec_dot_type};

/// xorshift64*: deterministic, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Activation-like values: mostly small, some outliers, some exact zeros and ties.
    fn acts(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| match self.below(20) {
                0 => 0.0,
                1 => self.f() * 40.0,
                2 => (self.below(9) as f32 - 4.0) * 0.5,
                _ => self.f() * 2.0,
            })
            .collect()
    }
}

fn supported_simd_paths() -> Vec<KernelPath> {
    KernelPath::ALL.into_iter().filter(|p| *p != KernelPath::Scalar && p.is_supported()).collect()
}

/// Owned, 8-byte aligned matrix bytes.
struct Owned {
    buf: Vec<u64>,
    len: usize,
}

impl Owned {
    fn from_bytes(bytes: &[u8]) -> Self {
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
        Owned { buf, len: bytes.len() }
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.buf)[..self.len]
    }
}

/// A random `n_rows x n_cols` weight matrix of type `ty`.
fn random_weights(ty: GgmlType, n_rows: usize, n_cols: usize, rng: &mut Rng) -> Owned {
    let n = n_rows * n_cols;
    let vals: Vec<f32> = (0..n).map(|_| rng.f() * 0.5).collect();
    let bytes: Vec<u8> = match ty {
        GgmlType::F32 => bytemuck::cast_slice(&vals).to_vec(),
        GgmlType::F16 => {
            let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        GgmlType::Q4_0 => {
            let mut b = vec![bytemuck::Zeroable::zeroed(); n / QK];
            quant::quantize_row_q4_0(&vals, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q4_1 => {
            let mut b = vec![bytemuck::Zeroable::zeroed(); n / QK];
            quant::quantize_row_q4_1(&vals, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q8_0 => {
            // Random bytes rather than quantized values, so that -128 (which ggml's quantizer never makes)
            // is covered too.
            let b: Vec<BlockQ8_0> = (0..n / QK)
                .map(|_| BlockQ8_0 {
                    d: f16::from_f32(rng.f().abs() * 0.01 + 1e-4),
                    qs: std::array::from_fn(|_| rng.next_u64() as i8),
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        // The K-quants with minimums get `dmin = d * E[q]`, so that their weights average about zero (as real
        // ones do) rather than all leaning one way.
        GgmlType::Q4K => {
            let b: Vec<BlockQ4K> = (0..n / QK_K)
                .map(|_| {
                    let d = rng.f().abs() * 0.01;
                    BlockQ4K {
                        d: f16::from_f32(d),
                        dmin: f16::from_f32(d * 7.5),
                        scales: std::array::from_fn(|_| rng.next_u64() as u8),
                        qs: std::array::from_fn(|_| rng.next_u64() as u8),
                    }
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::BF16 => {
            let h: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
            bytemuck::cast_slice(&h).to_vec()
        }
        GgmlType::Q5_0 => {
            let b: Vec<BlockQ5_0> = (0..n / QK)
                .map(|_| BlockQ5_0 {
                    d: f16::from_f32(rng.f() * 0.01),
                    qh: std::array::from_fn(|_| rng.next_u64() as u8),
                    qs: std::array::from_fn(|_| rng.next_u64() as u8),
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q5_1 => {
            let b: Vec<BlockQ5_1> = (0..n / QK)
                .map(|_| BlockQ5_1 {
                    d: f16::from_f32(rng.f().abs() * 0.01),
                    m: f16::from_f32(rng.f() * 0.1),
                    qh: std::array::from_fn(|_| rng.next_u64() as u8),
                    qs: std::array::from_fn(|_| rng.next_u64() as u8),
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q2K => {
            let b: Vec<BlockQ2K> = (0..n / QK_K)
                .map(|_| {
                    let d = rng.f().abs() * 0.01;
                    BlockQ2K {
                        scales: std::array::from_fn(|_| rng.next_u64() as u8),
                        qs: std::array::from_fn(|_| rng.next_u64() as u8),
                        d: f16::from_f32(d),
                        dmin: f16::from_f32(d * 1.5),
                    }
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q3K => {
            let b: Vec<BlockQ3K> = (0..n / QK_K)
                .map(|_| BlockQ3K {
                    hmask: std::array::from_fn(|_| rng.next_u64() as u8),
                    qs: std::array::from_fn(|_| rng.next_u64() as u8),
                    scales: std::array::from_fn(|_| rng.next_u64() as u8),
                    d: f16::from_f32(rng.f() * 0.01),
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q5K => {
            let b: Vec<BlockQ5K> = (0..n / QK_K)
                .map(|_| {
                    let d = rng.f().abs() * 0.01;
                    BlockQ5K {
                        d: f16::from_f32(d),
                        dmin: f16::from_f32(d * 15.5),
                        scales: std::array::from_fn(|_| rng.next_u64() as u8),
                        qh: std::array::from_fn(|_| rng.next_u64() as u8),
                        qs: std::array::from_fn(|_| rng.next_u64() as u8),
                    }
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q6K => {
            let b: Vec<BlockQ6K> = (0..n / QK_K)
                .map(|_| BlockQ6K {
                    ql: std::array::from_fn(|_| rng.next_u64() as u8),
                    qh: std::array::from_fn(|_| rng.next_u64() as u8),
                    scales: std::array::from_fn(|_| rng.next_u64() as i8),
                    d: f16::from_f32(rng.f().abs() * 0.01),
                })
                .collect();
            bytemuck::cast_slice(&b).to_vec()
        }
        _ => unreachable!(),
    };
    Owned::from_bytes(&bytes)
}

/// The activations a `QuantizedActs` holds, dequantized, plus the `m * s` magnitude scale for Q8_1.
fn dequant_acts(a: &QuantizedActs) -> Vec<f32> {
    let (n, k) = (a.n_rows(), a.n_cols());
    let mut out = vec![0.0; n * k];
    match a.ty().unwrap() {
        GgmlType::F32 => out.copy_from_slice(&a.f32s),
        GgmlType::F16 => out.iter_mut().zip(&a.f16s).for_each(|(o, h)| *o = h.to_f32()),
        GgmlType::BF16 => out.iter_mut().zip(&a.bf16s).for_each(|(o, h)| *o = h.to_f32()),
        GgmlType::Q8_0 => quant::dequantize_row_q8_0(&a.q8_0, &mut out),
        GgmlType::Q8_1 => quant::dequantize_row_q8_1(&a.q8_1, &mut out),
        GgmlType::Q8K => {
            for (b, y) in a.q8k.iter().zip(out.chunks_exact_mut(QK_K)) {
                for (o, &q) in y.iter_mut().zip(&b.qs) {
                    *o = q as f32 * b.d;
                }
            }
        }
        _ => unreachable!(),
    }
    out
}

/// Every weight type with a kernel.
const ALL_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// The row-length unit of tests for `ty`: 256 for the K-quants, 32 for the rest.
fn unit(ty: GgmlType) -> usize {
    if ty.block_len() == QK_K { QK_K } else { QK }
}

#[test]
fn every_weight_type_has_a_kernel() {
    for ty in GgmlType::ALL {
        let activation_only = matches!(ty, GgmlType::Q8_1 | GgmlType::Q8K);
        assert_eq!(vec_dot_type(ty).is_some(), !activation_only, "{ty}");
        assert_eq!(ALL_TYPES.contains(&ty), !activation_only, "{ty}");
    }
    // ggml's `type_traits_cpu[..].vec_dot_type`.
    for (w, a) in [
        (GgmlType::Q5_0, GgmlType::Q8_0),
        (GgmlType::Q5_1, GgmlType::Q8_1),
        (GgmlType::Q2K, GgmlType::Q8K),
        (GgmlType::Q3K, GgmlType::Q8K),
        (GgmlType::Q5K, GgmlType::Q8K),
        (GgmlType::BF16, GgmlType::BF16),
    ] {
        assert_eq!(vec_dot_type(w), Some(a), "{w}");
    }
}

// === Activation quantizers ===

#[test]
fn simd_quantizers_match_scalar_bit_for_bit() {
    let mut rng = Rng::new(1);
    for path in supported_simd_paths() {
        for n_blocks in [1, 2, 3, 18, 48] {
            for _ in 0..50 {
                let x = rng.acts(n_blocks * QK);
                let mut a = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; QK] }; n_blocks];
                let mut b = a.clone();
                scalar::quantize_row_q8_0(&x, &mut a);
                kernels::quantize_q8_0(path, &x, &mut b);
                assert_eq!(a, b, "q8_0 {path}");
                let mut a = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; QK] }; n_blocks];
                let mut b = a.clone();
                scalar::quantize_row_q8_1(&x, &mut a);
                kernels::quantize_q8_1(path, &x, &mut b);
                assert_eq!(a, b, "q8_1 {path}");
            }
        }
    }
}

#[test]
fn quantizers_are_within_one_quantum_of_ggml_ref() {
    let mut rng = Rng::new(2);
    let mut ties = 0;
    for i in 0..200 {
        let mut x = rng.acts(4 * QK);
        if i == 0 {
            // amax = 127 makes both scales 1: x = 0.5, 1.5, 2.5 are exact ties.
            x[..4].copy_from_slice(&[127.0, 0.5, 1.5, 2.5]);
            x[4..QK].fill(0.0);
        }
        let mut ours = vec![BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; QK] }; 4];
        let mut refr = ours.clone();
        scalar::quantize_row_q8_1(&x, &mut ours);
        quant::quantize_row_q8_1(&x, &mut refr);
        for (o, r) in ours.iter().zip(&refr) {
            assert_eq!(o.d, r.d);
            for (a, b) in o.qs.iter().zip(&r.qs) {
                assert!((*a as i32 - *b as i32).abs() <= 1);
                ties += (a != b) as usize;
            }
        }
    }
    // The inputs include exact halves, where round-half-even and round-half-away differ: make sure the test
    // exercises the difference it documents.
    assert!(ties > 0);
}

#[test]
fn q8k_quantizer_round_trips() {
    let mut rng = Rng::new(3);
    let x = rng.acts(3 * QK_K);
    let mut a = QuantizedActs::new();
    a.quantize(GgmlType::Q4K, &x, QK_K);
    let y = dequant_acts(&a);
    for (blk, (xs, ys)) in a.q8k.iter().zip(x.chunks(QK_K).zip(y.chunks(QK_K))) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (xv, yv) in xs.iter().zip(ys) {
            assert!((xv - yv).abs() <= amax / 127.0 * 0.5001 + 1e-6);
        }
        for (j, s) in blk.bsums.iter().enumerate() {
            assert_eq!(*s as i32, blk.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum::<i32>());
        }
    }
}

#[test]
fn batched_q8_1_keeps_block_sums_transposed() {
    let mut rng = Rng::new(4);
    let x = rng.acts(11 * 64);
    let mut a = QuantizedActs::new();
    a.quantize(GgmlType::Q4_1, &x, 64);
    assert_eq!((a.n_rows(), a.t_pad()), (11, 16));
    for t in 0..16 {
        for b in 0..2 {
            let want = if t < 11 { a.q8_1[t * 2 + b].s.to_f32() } else { 0.0 };
            assert_eq!(a.q8_1_s[b * 16 + t], want);
        }
    }
}

// === Dot products ===

/// Scalar kernel vs f32 dot of the dequantized operands, for every weight type.
#[test]
fn scalar_vec_dot_matches_dequantized_reference() {
    let mut rng = Rng::new(5);
    for ty in ALL_TYPES {
        let bl = unit(ty);
        for n_blocks in [1, 2, 5, 9] {
            let k = n_blocks * bl;
            let w = random_weights(ty, 1, k, &mut rng);
            let mut wf = vec![0.0; k];
            quant::dequantize_row(ty, w.bytes(), &mut wf).unwrap();
            let x = rng.acts(k);
            let mut a = QuantizedActs::new();
            a.quantize_with(KernelPath::Scalar, ty, &x, k);
            let af = dequant_acts(&a);
            let m = QMatrix::new(ty, 1, k, w.bytes()).unwrap();
            let mut got = [0.0f32];
            crate::matmul_rows_with(KernelPath::Scalar, &m, &a, 0, 1, &mut got);
            let want: f64 = wf.iter().zip(&af).map(|(&p, &q)| p as f64 * q as f64).sum();
            let mag: f64 = wf.iter().zip(&af).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            // Q4_1 and Q5_1 use s = f16(d * sum(q)) for the minimum term: allow for its rounding.
            let s_err = |m: &mut dyn Iterator<Item = f16>| -> f64 {
                m.zip(&a.q8_1).map(|(m, y)| (m.to_f32() * y.s.to_f32()).abs() as f64 * 1e-3).sum()
            };
            let s_err = match ty {
                GgmlType::Q4_1 => s_err(
                    &mut quant::blocks::<pinion_format::quant::BlockQ4_1>(w.bytes())
                        .unwrap()
                        .iter()
                        .map(|b| b.m),
                ),
                GgmlType::Q5_1 => {
                    s_err(&mut quant::blocks::<BlockQ5_1>(w.bytes()).unwrap().iter().map(|b| b.m))
                }
                _ => 0.0,
            };
            let tol = mag * 1e-5 + s_err + 1e-6;
            assert!(
                (got[0] as f64 - want).abs() <= tol,
                "{ty} k={k}: got {} want {want} (tol {tol})",
                got[0]
            );
        }
    }
}

/// Every SIMD path gives exactly the scalar path's bits, over many shapes: odd row counts, batch sizes that
/// leave partial tiles, and row sub-ranges.
#[test]
fn simd_matmul_matches_scalar_bit_for_bit() {
    let mut rng = Rng::new(6);
    for path in supported_simd_paths() {
        for ty in ALL_TYPES {
            let bl = unit(ty);
            for &(n_rows, n_blocks) in &[(1, 1), (3, 2), (8, 18), (13, 5), (37, 3), (64, 1)] {
                let k = n_blocks * bl;
                let w = random_weights(ty, n_rows, k, &mut rng);
                let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
                for n_t in [1, 2, 3, 7, 8, 9, 17] {
                    let x = rng.acts(n_t * k);
                    let mut a = QuantizedActs::new();
                    a.quantize_with(KernelPath::Scalar, ty, &x, k);
                    let (r0, r1) = if n_rows > 4 { (1, n_rows - 2) } else { (0, n_rows) };
                    for (lo, hi) in [(0, n_rows), (r0, r1)] {
                        let mut want = vec![0.0; n_t * (hi - lo)];
                        let mut got = vec![f32::NAN; n_t * (hi - lo)];
                        crate::matmul_rows_with(KernelPath::Scalar, &m, &a, lo, hi, &mut want);
                        crate::matmul_rows_with(path, &m, &a, lo, hi, &mut got);
                        let same = want.iter().zip(&got).all(|(p, q)| p.to_bits() == q.to_bits());
                        assert!(
                            same,
                            "{path} {ty} {n_rows}x{k} n_t={n_t} rows {lo}..{hi}:\n{want:?}\n{got:?}"
                        );
                    }
                }
            }
        }
    }
}

/// Overwrites the quantized values of `a` (keeping the scales): random values in -127..=127 (mode 0), all -127
/// (mode 1) or all 127 (mode 2), the extremes of the integer products every SIMD path sums (the activation
/// quantizers never make -128, and ggml's Q8_0 x Q8_0 sign trick, which pinion's Q8_0 kernels share, relies
/// on that). Q8_K block sums are recomputed.
fn overwrite_quants(a: &mut QuantizedActs, mode: usize, rng: &mut Rng) {
    let mut q = || match mode {
        0 => (rng.below(255) as i32 - 127) as i8,
        1 => -127,
        _ => 127,
    };
    a.q8_0.iter_mut().for_each(|b| b.qs = std::array::from_fn(|_| q()));
    a.q8_1.iter_mut().for_each(|b| b.qs = std::array::from_fn(|_| q()));
    for b in a.q8k.iter_mut() {
        b.qs = std::array::from_fn(|_| q());
        for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = qs.iter().map(|&v| v as i16).sum();
        }
    }
    a.permute_q8k();
}

/// Every SIMD path gives the scalar path's bits on activations at the ends of the quantizers' range (random
/// codes, and rows of all -127 or all 127), where an intermediate sum of a SIMD kernel would saturate or
/// overflow if its bounds were wrong.
#[test]
fn simd_matmul_matches_scalar_on_extreme_activations() {
    let mut rng = Rng::new(60);
    for path in supported_simd_paths() {
        for ty in ALL_TYPES {
            if matches!(vec_dot_type(ty), Some(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)) {
                continue;
            }
            let (n_rows, k) = (9, 3 * unit(ty));
            let w = random_weights(ty, n_rows, k, &mut rng);
            let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
            for n_t in [1, 5, 9] {
                let x = rng.acts(n_t * k);
                let mut a = QuantizedActs::new();
                a.quantize_with(KernelPath::Scalar, ty, &x, k);
                for mode in 0..3 {
                    overwrite_quants(&mut a, mode, &mut rng);
                    let mut want = vec![0.0; n_t * n_rows];
                    let mut got = vec![f32::NAN; n_t * n_rows];
                    crate::matmul_rows_with(KernelPath::Scalar, &m, &a, 0, n_rows, &mut want);
                    crate::matmul_rows_with(path, &m, &a, 0, n_rows, &mut got);
                    let same = want.iter().zip(&got).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{path} {ty} n_t={n_t} mode {mode}:\n{want:?}\n{got:?}");
                }
            }
        }
    }
}

/// The K-quant weights at their extremes (every code at its maximum, scales at the ends of their ranges)
/// against all -128 and all 127 activations: the largest integer sums the K-quant SIMD kernels make.
#[test]
fn k_quant_tiles_match_scalar_at_integer_extremes() {
    let mut rng = Rng::new(61);
    let acts: Vec<BlockQ8K> = [-128i8, 127, -128]
        .iter()
        .map(|&v| {
            let qs = [v; QK_K];
            BlockQ8K { d: 0.37, qs, bsums: [16 * v as i16; 16] }
        })
        .collect();
    let check = |path: KernelPath, ty: &str, scalar: f32, got: f32| {
        assert_eq!(scalar.to_bits(), got.to_bits(), "{path} {ty}: {scalar} vs {got}");
    };
    for path in supported_simd_paths() {
        for fill in [0xFFu8, 0x00, 0x80, 0x7F] {
            let d = f16::from_f32(0.001 + rng.f().abs() * 1e-3);
            let q2 = [BlockQ2K { scales: [fill; 16], qs: [0xFF; 64], d, dmin: d }; 3];
            let q3 = [BlockQ3K { hmask: [0xFF; 32], qs: [0xFF; 64], scales: [fill; 12], d }; 3];
            let q4 = [BlockQ4K { d, dmin: d, scales: [fill; 12], qs: [0xFF; 128] }; 3];
            let q5 = [BlockQ5K { d, dmin: d, scales: [fill; 12], qh: [0xFF; 32], qs: [0xFF; 128] }; 3];
            let q6 = [BlockQ6K { ql: [0xFF; 128], qh: [0xFF; 64], scales: [fill as i8; 16], d }; 3];
            let q3lo = [BlockQ3K { hmask: [0; 32], qs: [0; 64], scales: [fill; 12], d }; 3];
            let q6lo = [BlockQ6K { ql: [0; 128], qh: [0; 64], scales: [fill as i8; 16], d }; 3];
            for a in [&acts[..1], &acts[1..2], &acts[..]] {
                let nb = a.len();
                let mut out = [[0.0f32; 1]; 1];
                macro_rules! one {
                    ($w:expr, $name:literal) => {{
                        let w = &$w[..nb];
                        kernels::tile_k::<_, 1, 1>(path, [w], [a], nb, &mut out);
                        check(path, $name, kernels::KQuant::vec_dot(w, a), out[0][0]);
                    }};
                }
                one!(q2, "q2_K");
                one!(q3, "q3_K");
                one!(q3lo, "q3_K low");
                one!(q4, "q4_K");
                one!(q5, "q5_K");
                one!(q6, "q6_K");
                one!(q6lo, "q6_K low");
            }
        }
    }
}

/// The dispatched matmul against a naive f32 product of dequantized weights and dequantized activations,
/// on a rayon pool of 2 threads (so the parallel split is exercised).
#[test]
fn matmul_matches_naive_reference() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut rng = Rng::new(7);
    for ty in ALL_TYPES {
        let bl = unit(ty);
        let (n_rows, k) = (131, 4 * bl);
        let w = random_weights(ty, n_rows, k, &mut rng);
        let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
        let mut wf = vec![0.0; n_rows * k];
        for r in 0..n_rows {
            quant::dequantize_row(ty, m.row(r), &mut wf[r * k..(r + 1) * k]).unwrap();
        }
        for n_t in [1, 5, 24] {
            let x = rng.acts(n_t * k);
            let mut a = QuantizedActs::new();
            a.quantize(ty, &x, k);
            let af = dequant_acts(&a);
            let mut got = vec![0.0; n_t * n_rows];
            pool.install(|| crate::matmul(&m, &a, &mut got));
            for t in 0..n_t {
                for r in 0..n_rows {
                    let (wr, ar) = (&wf[r * k..(r + 1) * k], &af[t * k..(t + 1) * k]);
                    let want: f64 = wr.iter().zip(ar).map(|(&p, &q)| p as f64 * q as f64).sum();
                    let mag: f64 = wr.iter().zip(ar).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
                    let got = got[t * n_rows + r] as f64;
                    assert!((got - want).abs() <= mag * 2e-3 + 1e-5, "{ty} t={t} r={r}: {got} vs {want}");
                }
            }
            // Parallel and single-threaded runs agree exactly.
            let mut one = vec![0.0; n_t * n_rows];
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap()
                .install(|| crate::matmul(&m, &a, &mut one));
            assert_eq!(got, one, "{ty}: thread count changed the result");
        }
    }
}

#[test]
fn qmatrix_rejects_bad_shapes() {
    let data = vec![0u64; 64];
    let bytes = bytemuck::cast_slice::<u64, u8>(&data);
    assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, &bytes[..80]).is_ok());
    assert!(matches!(
        QMatrix::new(GgmlType::Q4_1, 2, 64, &bytes[..70]),
        Err(crate::ExecError::SizeMismatch { expected: 80, got: 70, .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q4_1, 2, 48, &bytes[..80]),
        Err(crate::ExecError::RowNotBlockAligned { .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_1, 1, 32, &bytes[..36]),
        Err(crate::ExecError::UnsupportedType { .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::F32, 1, 3, &bytes[1..13]),
        Err(crate::ExecError::Misaligned { .. })
    ));
    let m = QMatrix::new(GgmlType::Q4_1, 2, 64, &bytes[..80]).unwrap();
    assert_eq!(m.row(1).as_ptr(), bytes[40..].as_ptr());
}

// === Dense backend ===

/// Every buffer a `QuantizedActs` holds for its type, as bytes.
fn acts_bytes(a: &QuantizedActs) -> Vec<Vec<u8>> {
    let b = |v: &[u8]| v.to_vec();
    match a.ty().unwrap() {
        GgmlType::F32 => vec![b(bytemuck::cast_slice(&a.f32s))],
        GgmlType::F16 => vec![b(bytemuck::cast_slice(&a.f16s))],
        GgmlType::BF16 => vec![b(bytemuck::cast_slice(&a.bf16s))],
        GgmlType::Q8_0 if a.n_rows() > 1 => {
            vec![b(bytemuck::cast_slice(&a.q8_0)), b(bytemuck::cast_slice(&a.d_t))]
        }
        GgmlType::Q8_0 => vec![b(bytemuck::cast_slice(&a.q8_0))],
        GgmlType::Q8_1 if a.n_rows() > 1 => vec![
            b(bytemuck::cast_slice(&a.q8_1)),
            b(bytemuck::cast_slice(&a.d_t)),
            b(bytemuck::cast_slice(&a.q8_1_s)),
        ],
        GgmlType::Q8_1 => vec![b(bytemuck::cast_slice(&a.q8_1))],
        GgmlType::Q8K => vec![b(bytemuck::cast_slice(&a.q8k)), b(bytemuck::cast_slice(&a.q8k_simd))],
        _ => unreachable!(),
    }
}

/// A padded copy of some rows holds exactly what quantizing those rows followed by zero rows gives, and a
/// matmul gives the copied rows the bits it gives them in the original, on every kernel path.
#[test]
fn copy_rows_padded_equals_quantizing_the_rows_and_zeros() {
    let mut rng = Rng::new(20);
    let paths: Vec<KernelPath> = KernelPath::ALL.into_iter().filter(|p| p.is_supported()).collect();
    for ty in ALL_TYPES {
        let bl = unit(ty);
        let k = 3 * bl;
        let n_rows = 5;
        let w = random_weights(ty, n_rows, k, &mut rng);
        let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
        for n in [1, 2, 11] {
            let x = rng.acts(n * k);
            let mut src = QuantizedActs::new();
            src.quantize(ty, &x, k);
            let mut copy = QuantizedActs::new();
            for (lo, hi) in [(0, n), (0, 1), (n - 1, n), (n / 2, n), (n, n)] {
                for padded_to in [hi - lo, hi - lo + 1, 8, 17].into_iter().filter(|&p| p > 0 && p >= hi - lo)
                {
                    let mut padded = x[lo * k..hi * k].to_vec();
                    padded.resize(padded_to * k, 0.0);
                    let mut want = QuantizedActs::new();
                    want.quantize(ty, &padded, k);
                    copy.copy_rows_padded(&src, lo..hi, padded_to).unwrap();
                    let what = format!("{ty} n={n} rows {lo}..{hi} padded to {padded_to}");
                    assert_eq!(
                        (copy.ty(), copy.n_rows(), copy.n_cols()),
                        (want.ty(), padded_to, k),
                        "{what}"
                    );
                    assert!(acts_bytes(&copy) == acts_bytes(&want), "{what}: buffers differ");
                    // A second copy of the same size does not grow the buffers.
                    let held = copy.heap_bytes();
                    copy.copy_rows_padded(&src, lo..hi, padded_to).unwrap();
                    assert_eq!(copy.heap_bytes(), held, "{what}: buffers grew");
                    let act_row = vec_dot_type(ty).unwrap().row_bytes(k).unwrap();
                    assert!(held >= padded_to * act_row, "{what}: {held} heap bytes");
                    for &path in &paths {
                        let mut full = vec![0.0; n * n_rows];
                        let mut part = vec![f32::NAN; padded_to * n_rows];
                        crate::matmul_rows_with(path, &m, &src, 0, n_rows, &mut full);
                        crate::matmul_rows_with(path, &m, &copy, 0, n_rows, &mut part);
                        let want: Vec<u32> =
                            full[lo * n_rows..hi * n_rows].iter().map(|v| v.to_bits()).collect();
                        let got: Vec<u32> = part[..(hi - lo) * n_rows].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{what} {path}");
                    }
                }
            }
        }
    }
}

#[test]
fn copy_rows_padded_rejects_bad_ranges() {
    use crate::ExecError;
    let mut src = QuantizedActs::new();
    let mut dst = QuantizedActs::new();
    assert!(matches!(
        dst.copy_rows_padded(&src, 0..0, 1),
        Err(ExecError::RowsOutOfRange { start: 0, end: 0, n_rows: 0, padded_to: 1 })
    ));
    src.quantize(GgmlType::Q4_1, &[0.5; 3 * 64], 64);
    assert!(matches!(dst.copy_rows_padded(&src, 2..4, 8), Err(ExecError::RowsOutOfRange { end: 4, .. })));
    assert!(matches!(
        dst.copy_rows_padded(&src, 0..3, 2),
        Err(ExecError::RowsOutOfRange { padded_to: 2, .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 2..1;
    assert!(matches!(
        dst.copy_rows_padded(&src, backwards, 4),
        Err(ExecError::RowsOutOfRange { start: 2, .. })
    ));
    assert!(dst.copy_rows_padded(&src, 1..3, 2).is_ok());
}

/// `CpuDense` computes the product (against dequantized operands in f64) and turns every operand mismatch
/// into a typed error instead of the kernel's panic.
#[test]
fn cpu_dense_computes_the_product_and_checks_operands() {
    use crate::{CpuDense, DenseBackend, DenseShape, ExecError};
    let mut rng = Rng::new(21);
    let (ty, n_rows, k, n) = (GgmlType::Q4_0, 7, 64, 3);
    let w = random_weights(ty, n_rows, k, &mut rng);
    let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
    let x = rng.acts(n * k);
    let mut a = QuantizedActs::new();
    a.quantize(ty, &x, k);
    let mut out = vec![0.0; n * n_rows];
    CpuDense.matmul(&m, &a, &mut out).unwrap();
    let af = dequant_acts(&a);
    let mut wf = vec![0.0; n_rows * k];
    quant::dequantize_row(ty, w.bytes(), &mut wf).unwrap();
    for t in 0..n {
        for r in 0..n_rows {
            let (wr, ar) = (&wf[r * k..(r + 1) * k], &af[t * k..(t + 1) * k]);
            let want: f64 = wr.iter().zip(ar).map(|(&p, &q)| p as f64 * q as f64).sum();
            let mag: f64 = wr.iter().zip(ar).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            assert!((out[t * n_rows + r] as f64 - want).abs() <= mag * 1e-5 + 1e-6, "t={t} r={r}");
        }
    }

    assert!(matches!(
        CpuDense.matmul(&m, &a, &mut out[1..]),
        Err(ExecError::OutputLength { expected: 21, got: 20, .. })
    ));
    let mut q41 = QuantizedActs::new();
    q41.quantize(GgmlType::Q4_1, &x, k);
    assert!(matches!(
        CpuDense.matmul(&m, &q41, &mut out),
        Err(ExecError::ActsMismatch { want: Some(GgmlType::Q8_0), acts_ty: Some(GgmlType::Q8_1), .. })
    ));
    let mut narrow = QuantizedActs::new();
    narrow.quantize(ty, &x, 32);
    assert!(matches!(
        CpuDense.matmul(&m, &narrow, &mut out),
        Err(ExecError::ActsMismatch { acts_cols: 32, .. })
    ));
    assert!(matches!(
        CpuDense.matmul(&m, &QuantizedActs::new(), &mut []),
        Err(ExecError::ActsMismatch { acts_ty: None, .. })
    ));
    // Matrices built field by field are checked too.
    let q8_1 = QMatrix { ty: GgmlType::Q8_1, n_rows: 1, n_cols: 32, data: &w.bytes()[..36] };
    assert!(matches!(
        CpuDense.matmul(&q8_1, &a, &mut out),
        Err(ExecError::UnsupportedType { ty: GgmlType::Q8_1 })
    ));
    let short = QMatrix { data: &w.bytes()[..10], ..m };
    assert!(matches!(CpuDense.matmul(&short, &a, &mut out), Err(ExecError::SizeMismatch { got: 10, .. })));
    assert!(matches!(
        CpuDense.matmul(&QMatrix { n_cols: 48, ..m }, &a, &mut out),
        Err(ExecError::RowNotBlockAligned { .. })
    ));

    let ok = DenseShape::of(&m);
    assert!(CpuDense.prepare(&[ok], 512).is_ok());
    let q8k = DenseShape { ty: GgmlType::Q8K, ..ok };
    assert!(matches!(
        CpuDense.prepare(&[ok, q8k], 512),
        Err(ExecError::UnsupportedType { ty: GgmlType::Q8K })
    ));
    let ragged = DenseShape { n_cols: 40, ..ok };
    assert!(matches!(
        CpuDense.prepare(&[ragged], 512),
        Err(ExecError::RowNotBlockAligned { n_cols: 40, .. })
    ));
    assert_eq!(CpuDense.name(), "cpu");
}

// === Norms, RoPE, activations ===

#[test]
fn rms_norm_matches_formula() {
    let mut rng = Rng::new(8);
    let (n, rows) = (576, 3);
    let x = rng.acts(n * rows);
    let w: Vec<f32> = (0..n).map(|_| rng.f() + 1.0).collect();
    let mut out = vec![0.0; n * rows];
    crate::rms_norm(&x, &w, 1e-5, &mut out);
    for r in 0..rows {
        let xr = &x[r * n..(r + 1) * n];
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + 1e-5).sqrt();
        for i in 0..n {
            let want = xr[i] as f64 * s * w[i] as f64;
            assert!((out[r * n + i] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3));
        }
    }
}

#[test]
fn softmax_matches_formula() {
    let mut rng = Rng::new(9);
    for n in [1, 2, 7, 100] {
        let x: Vec<f32> = (0..n).map(|_| rng.f() * 30.0).collect();
        let mut y = x.clone();
        crate::softmax(&mut y);
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (a, b) in x.iter().zip(&y) {
            let want = (*a as f64 - max).exp() / sum;
            assert!((*b as f64 - want).abs() <= 1e-6 + 1e-5 * want);
        }
    }
    let mut empty: [f32; 0] = [];
    crate::softmax(&mut empty);
}

/// Frequency factors divide each angle before its cosine and sine (ggml's `freq_factors`): with every factor 2,
/// position 2k rotates exactly as position k without factors (halving is exact in binary floating point), and
/// so does a linear scaling of 1/2.
#[test]
fn rope_divides_each_angle_by_its_frequency_factor() {
    let mut rng = Rng::new(12);
    let (n_heads, head_dim, n_rot) = (2, 64, 64);
    let twos = vec![2.0f32; n_rot / 2];
    for mode in [RopeMode::Norm, RopeMode::Neox] {
        for k in [1, 7, 300] {
            let x: Vec<f32> = (0..n_heads * head_dim).map(|_| rng.f()).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            crate::rope(&mut a, n_heads, head_dim, n_rot, 2 * k, 10000.0, 1.0, Some(&twos), mode);
            crate::rope(&mut b, n_heads, head_dim, n_rot, k, 10000.0, 1.0, None, mode);
            assert_eq!(a, b, "{mode:?} k {k}");
            let mut c = x.clone();
            crate::rope(&mut c, n_heads, head_dim, n_rot, 2 * k, 10000.0, 1.0, None, mode);
            assert_ne!(a, c, "the factors changed nothing");
            // Linear scaling by 1/2 multiplies each angle by 1/2: position 2k as position k.
            let mut d = x.clone();
            crate::rope(&mut d, n_heads, head_dim, n_rot, 2 * k, 10000.0, 0.5, None, mode);
            assert_eq!(d, b, "{mode:?} k {k}: linear scaling");
        }
    }
}

#[test]
fn rope_matches_direct_formula() {
    let mut rng = Rng::new(10);
    let (n_heads, head_dim) = (3, 64);
    for mode in [RopeMode::Norm, RopeMode::Neox] {
        for (n_rot, pos) in [(64, 0), (64, 1), (64, 511), (32, 77)] {
            let x: Vec<f32> = (0..n_heads * head_dim).map(|_| rng.f()).collect();
            let mut y = x.clone();
            crate::rope(&mut y, n_heads, head_dim, n_rot, pos, 10000.0, 1.0, None, mode);
            for h in 0..n_heads {
                let xh = &x[h * head_dim..(h + 1) * head_dim];
                let yh = &y[h * head_dim..(h + 1) * head_dim];
                for i in 0..n_rot / 2 {
                    let theta = pos as f64 * 10000f64.powf(-2.0 * i as f64 / n_rot as f64);
                    let (a, b) = match mode {
                        RopeMode::Norm => (2 * i, 2 * i + 1),
                        RopeMode::Neox => (i, i + n_rot / 2),
                    };
                    let (c, s) = (theta.cos(), theta.sin());
                    let want_a = xh[a] as f64 * c - xh[b] as f64 * s;
                    let want_b = xh[a] as f64 * s + xh[b] as f64 * c;
                    // The iterated f32 theta drifts by a few ulp of theta per step.
                    let tol = 1e-6 + 1e-5 * pos as f64;
                    assert!((yh[a] as f64 - want_a).abs() <= tol, "{mode:?} pos {pos} i {i}");
                    assert!((yh[b] as f64 - want_b).abs() <= tol, "{mode:?} pos {pos} i {i}");
                }
                assert_eq!(&yh[n_rot..], &xh[n_rot..], "dimensions past n_rot are untouched");
            }
        }
    }
}

#[test]
fn activations_match_formulas() {
    for i in -200..=200 {
        let x = i as f32 * 0.05;
        let xd = x as f64;
        assert!((crate::silu(x) as f64 - xd / (1.0 + (-xd).exp())).abs() <= 1e-6 * (1.0 + xd.abs()));
        let g =
            0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd)).tanh());
        assert!((crate::gelu(x) as f64 - g).abs() <= 1e-6 * (1.0 + xd.abs()));
        assert_eq!(crate::relu(x), x.max(0.0));
    }
    let mut g = vec![1.0, -2.0, 3.0];
    crate::swiglu(&mut g, &[2.0, 2.0, 0.5]);
    assert_eq!(g, vec![2.0 * crate::silu(1.0), 2.0 * crate::silu(-2.0), 0.5 * crate::silu(3.0)]);
    let mut g = vec![1.0, -2.0];
    crate::geglu(&mut g, &[2.0, 2.0]);
    assert_eq!(g, vec![2.0 * crate::gelu(1.0), 2.0 * crate::gelu(-2.0)]);
    let mut g = vec![1.0, -2.0];
    crate::reglu(&mut g, &[2.0, 2.0]);
    assert_eq!(g, vec![2.0, 0.0]);
}

/// ggml's GELU (`GGML_GELU_FP16`) read from the table is the tanh formula on the input rounded to f16, rounded
/// to f16, for every f16 input and for f32 inputs between them, with ggml's cut-offs at -10 and 10.
#[test]
fn gelu_table_is_the_rounded_formula() {
    use half::f16;
    let direct = |x: f32| -> f32 {
        if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            f16::from_f32(crate::gelu(f16::from_f32(x).to_f32())).to_f32()
        }
    };
    for bits in 0..=u16::MAX {
        let x = f16::from_bits(bits).to_f32();
        if x.is_nan() {
            continue;
        }
        for x in [x, f32::from_bits(x.to_bits().wrapping_add(4096))] {
            assert_eq!(crate::gelu_ggml(x).to_bits(), direct(x).to_bits(), "x = {x}");
        }
    }
    let (mut g, u) = (vec![-11.0, -0.3, 0.7, 12.0], vec![2.0, 3.0, -1.0, 0.5]);
    crate::geglu_ggml(&mut g, &u);
    assert_eq!(g, vec![0.0, direct(-0.3) * 3.0, -direct(0.7), 6.0]);
}

// === Attention ===

#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    hd: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
) -> Vec<f64> {
    let (qd, kvd) = (n_heads * hd, n_kv_heads * hd);
    let mut out = vec![0.0f64; n_tokens * qd];
    for t in 0..n_tokens {
        for h in 0..n_heads {
            let g = h * n_kv_heads / n_heads;
            let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
            let n = first_pos + t + 1;
            let first = window.map_or(0, |w| n.saturating_sub(w));
            let s: Vec<f64> = (first..n)
                .map(|j| {
                    let kr = &k[j * kvd + g * hd..j * kvd + (g + 1) * hd];
                    qh.iter().zip(kr).map(|(&a, b)| a as f64 * b.to_f64()).sum::<f64>() * scale as f64
                })
                .collect();
            let max = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, p) in (first..n).zip(&e) {
                for d in 0..hd {
                    out[t * qd + h * hd + d] += p / sum * v[j * kvd + g * hd + d].to_f64();
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_reference() {
    let mut rng = Rng::new(11);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cases = [(9, 3, 64, None), (4, 4, 20, None), (6, 1, 8, None), (2, 1, 136, None), (4, 2, 64, Some(6))];
    for &(n_heads, n_kv_heads, hd, window) in &cases {
        for &(n_tokens, first_pos) in &[(1, 0), (1, 13), (5, 0), (4, 9), (3, 40)] {
            let n_ctx = first_pos + n_tokens + 3;
            let kvd = n_kv_heads * hd;
            let q: Vec<f32> = (0..n_tokens * n_heads * hd).map(|_| rng.f()).collect();
            let k: Vec<f16> = (0..n_ctx * kvd).map(|_| f16::from_f32(rng.f() * 2.0)).collect();
            // Rows past the causal limit hold huge values, so reading them would show.
            let mut v: Vec<f16> = (0..n_ctx * kvd).map(|_| f16::from_f32(rng.f())).collect();
            for x in &mut v[(first_pos + n_tokens) * kvd..] {
                *x = f16::from_f32(1000.0);
            }
            let scale = 1.0 / (hd as f32).sqrt();
            // Rows before a sliding window hold huge values too.
            if let Some(w) = window {
                for x in &mut v[..(first_pos + 1).saturating_sub(w) * kvd] {
                    *x = f16::from_f32(1000.0);
                }
            }
            let want =
                naive_attention(&q, n_tokens, first_pos, n_heads, n_kv_heads, hd, &k, &v, scale, window);
            let mut first: Option<Vec<f32>> = None;
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                let mut out = vec![0.0; q.len()];
                pool.install(|| {
                    crate::attention_with(
                        path, &q, n_tokens, first_pos, n_heads, n_kv_heads, hd, &k, &v, scale, window,
                        &mut out,
                    )
                });
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-5,
                        "{path} heads {n_heads}/{n_kv_heads} t {n_tokens}@{first_pos} [{i}]: {g} vs {w}"
                    );
                }
                // Every path gives the scalar path's bits.
                match &first {
                    None => first = Some(out),
                    Some(f) => assert_eq!(f, &out, "{path} differs from scalar"),
                }
            }
            // ggml's f16-accumulating kernel sees the same rows (a masked one would add its huge value).
            let mut out = vec![0.0; q.len()];
            pool.install(|| {
                crate::attention_f16acc(
                    &q, n_tokens, first_pos, n_heads, n_kv_heads, hd, &k, &v, scale, window, &mut out,
                )
            });
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-2,
                    "f16acc t {n_tokens}@{first_pos} window {window:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}

// === Sparse FFN ===

mod sparse_ffn {
    use super::*;
    use crate::sparse::{
        ClusterGates, ClusterRows, ClusterSums, Filter, SparseAct, SparseFfn, SparseScratch, TokenActs,
        UpDown, axpy_column_with, cluster_gates_with, cluster_up_down_with, row_dot_with,
        sparse_ffn_cluster_with, sparse_ffn_on, sparse_ffn_rows_on,
    };
    use crate::{SpinPool, silu_ggml};

    fn all_paths() -> Vec<KernelPath> {
        KernelPath::ALL.into_iter().filter(|p| p.is_supported()).collect()
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Down column bytes of `vals` in type `ty`.
    fn column(ty: GgmlType, vals: &[f32], rng: &mut Rng) -> Vec<u8> {
        match ty {
            GgmlType::Q8_0 => {
                let b: Vec<BlockQ8_0> = (0..vals.len() / QK)
                    .map(|_| BlockQ8_0 {
                        d: f16::from_f32(rng.f().abs() * 0.01 + 1e-4),
                        qs: std::array::from_fn(|_| rng.next_u64() as i8),
                    })
                    .collect();
                bytemuck::cast_slice(&b).to_vec()
            }
            GgmlType::F16 => vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            GgmlType::F32 => vals.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            _ => unreachable!(),
        }
    }

    /// A packed-like layer: per cluster a gate block and bundles at a stride, plus the dequantized weights.
    struct Layer {
        spec: SparseFfn,
        n_ff: usize,
        gate: Owned,
        up: Owned,
        /// Per cluster: (gate block, bundles).
        records: Vec<(Owned, Owned)>,
        stride: usize,
        /// Dequantized down columns, neuron-major.
        down_f: Vec<f32>,
    }

    impl Layer {
        fn new(spec: SparseFfn, n_ff: usize, cluster: usize, seed: u64) -> Layer {
            let mut rng = Rng::new(seed);
            let d = spec.d_model;
            let gate = random_weights(spec.gate_ty, n_ff, d, &mut rng);
            let up = random_weights(spec.up_ty, n_ff, d, &mut rng);
            let (grb, urb, db) = (spec.gate_row_bytes(), spec.up_row_bytes(), spec.down_col_bytes());
            let stride = (urb + db + 8).next_multiple_of(8);
            let mut down_f = vec![0.0; n_ff * d];
            let mut cols = Vec::new();
            for i in 0..n_ff {
                let vals: Vec<f32> = (0..d).map(|_| rng.f() * 0.3).collect();
                let c = column(spec.down_ty, &vals, &mut rng);
                quant::dequantize_row(spec.down_ty, &c, &mut down_f[i * d..(i + 1) * d]).unwrap();
                cols.push(c);
            }
            let mut records = Vec::new();
            for c0 in (0..n_ff).step_by(cluster) {
                let c1 = (c0 + cluster).min(n_ff);
                let g = gate.bytes()[c0 * grb..c1 * grb].to_vec();
                let mut b = vec![0xAAu8; (c1 - c0) * stride];
                for (i, col) in cols[c0..c1].iter().enumerate() {
                    let (at, n) = (i * stride, c0 + i);
                    b[at..at + urb].copy_from_slice(&up.bytes()[n * urb..(n + 1) * urb]);
                    b[at + urb..at + urb + db].copy_from_slice(col);
                }
                records.push((Owned::from_bytes(&g), Owned::from_bytes(&b)));
            }
            Layer { spec, n_ff, gate, up, records, stride, down_f }
        }

        fn clusters(&self) -> Vec<ClusterRows<'_>> {
            self.records
                .iter()
                .map(|(g, b)| ClusterRows { gate: g.bytes(), bundles: b.bytes(), bundle_stride: self.stride })
                .collect()
        }

        /// Dense gate and up pre-activations from `matmul` (scalar path).
        fn gate_up(&self, acts: &TokenActs) -> (Vec<f32>, Vec<f32>) {
            let d = self.spec.d_model;
            let mut out = Vec::new();
            for (ty, w, a) in
                [(self.spec.gate_ty, &self.gate, acts.gate), (self.spec.up_ty, &self.up, acts.up)]
            {
                let m = QMatrix::new(ty, self.n_ff, d, w.bytes()).unwrap();
                let mut all = vec![0.0; a.n_rows() * self.n_ff];
                crate::matmul_rows_with(KernelPath::Scalar, &m, a, 0, self.n_ff, &mut all);
                out.push(all[acts.token * self.n_ff..(acts.token + 1) * self.n_ff].to_vec());
            }
            let u = out.pop().unwrap();
            (out.pop().unwrap(), u)
        }

        /// The straightforward reference: dense gate/up, the selection rule written out, f64 sum of `h * down`.
        /// Returns (output, active count, sum of |h * down| per output for the tolerance).
        fn reference(&self, acts: &TokenActs, mask: Option<&[bool]>) -> (Vec<f64>, usize, Vec<f64>) {
            let d = self.spec.d_model;
            let t = self.spec.threshold;
            let (g, u) = self.gate_up(acts);
            let mut out = vec![0.0f64; d];
            let mut mag = vec![0.0f64; d];
            let mut active = 0;
            for i in 0..self.n_ff {
                if mask.is_some_and(|m| !m[i]) {
                    continue;
                }
                let (g, u) = (g[i], u[i]);
                let h = match self.spec.act {
                    SparseAct::Silu if silu_ggml(g).abs() >= t => silu_ggml(g) * u,
                    SparseAct::Relu if g.max(0.0) > t => g.max(0.0) * u,
                    SparseAct::Drelu if g.min(u).max(0.0) > t => g.max(0.0) * u.max(0.0),
                    _ => continue,
                };
                active += 1;
                for j in 0..d {
                    out[j] += h as f64 * self.down_f[i * d + j] as f64;
                    mag[j] += (h as f64 * self.down_f[i * d + j] as f64).abs();
                }
            }
            (out, active, mag)
        }

        /// Runs every cluster on `path` in the order `order`, into a fresh `ClusterSums`, and reduces.
        fn run_in_order(&self, path: KernelPath, acts: &TokenActs, order: &[usize]) -> (Vec<f32>, usize) {
            let cl = self.clusters();
            let mut sums = ClusterSums::new(cl.len(), self.spec.d_model);
            let mut gates = ClusterGates::new();
            let mut active = 0;
            for &k in order {
                let slot = sums.slot(k);
                active +=
                    sparse_ffn_cluster_with(path, &self.spec, acts, &cl[k], Filter::NONE, &mut gates, slot);
            }
            let mut out = vec![f32::NAN; self.spec.d_model];
            sums.reduce_into(&mut out);
            (out, active)
        }
    }

    fn spec(
        act: SparseAct,
        threshold: f32,
        tys: (GgmlType, GgmlType, GgmlType),
        d_model: usize,
    ) -> SparseFfn {
        SparseFfn { act, threshold, d_model, gate_ty: tys.0, up_ty: tys.1, down_ty: tys.2 }
    }

    const TYPE_SETS: [(GgmlType, GgmlType, GgmlType); 7] = [
        (GgmlType::Q4_1, GgmlType::Q4_1, GgmlType::Q8_0),
        (GgmlType::Q4_0, GgmlType::Q4_0, GgmlType::F16),
        (GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::F32),
        (GgmlType::F16, GgmlType::Q6K, GgmlType::Q8_0),
        (GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::F16),
        (GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q8_0),
        (GgmlType::BF16, GgmlType::Q3K, GgmlType::F32),
    ];

    /// Quantized activations of `n_t` tokens for the spec's gate and up types.
    fn quantized(spec: &SparseFfn, n_t: usize, rng: &mut Rng) -> (QuantizedActs, QuantizedActs) {
        let x = rng.acts(n_t * spec.d_model);
        let (mut g, mut u) = (QuantizedActs::new(), QuantizedActs::new());
        g.quantize_with(KernelPath::Scalar, spec.gate_ty, &x, spec.d_model);
        u.quantize_with(KernelPath::Scalar, spec.up_ty, &x, spec.d_model);
        (g, u)
    }

    #[test]
    fn row_dot_equals_matmul_bit_for_bit() {
        let mut rng = Rng::new(40);
        for ty in ALL_TYPES {
            let bl = unit(ty);
            let (n_rows, k, n_t) = (11, 3 * bl, 3);
            let w = random_weights(ty, n_rows, k, &mut rng);
            let m = QMatrix::new(ty, n_rows, k, w.bytes()).unwrap();
            let x = rng.acts(n_t * k);
            let mut a = QuantizedActs::new();
            a.quantize_with(KernelPath::Scalar, ty, &x, k);
            let mut want = vec![0.0; n_t * n_rows];
            crate::matmul_rows_with(KernelPath::Scalar, &m, &a, 0, n_rows, &mut want);
            for path in all_paths() {
                for t in 0..n_t {
                    for r in 0..n_rows {
                        let got = row_dot_with(path, ty, m.row(r), &a, t);
                        assert_eq!(got.to_bits(), want[t * n_rows + r].to_bits(), "{path} {ty} t={t} r={r}");
                    }
                }
            }
        }
    }

    #[test]
    fn axpy_column_paths_agree_and_follow_dequant_then_fma() {
        let mut rng = Rng::new(41);
        for ty in [GgmlType::Q8_0, GgmlType::F16, GgmlType::F32] {
            let lens: &[usize] = if ty == GgmlType::Q8_0 { &[32, 96, 576] } else { &[1, 7, 17, 40, 576] };
            for &d in lens {
                let vals: Vec<f32> = (0..d).map(|_| rng.f()).collect();
                let col = column(ty, &vals, &mut rng);
                let mut deq = vec![0.0; d];
                quant::dequantize_row(ty, &col, &mut deq).unwrap();
                let base: Vec<f32> = (0..d).map(|_| rng.f() * 3.0).collect();
                let a = rng.f() * 5.0;
                let want: Vec<f32> = base.iter().zip(&deq).map(|(&o, &v)| a.mul_add(v, o)).collect();
                // Also at an odd byte offset: columns need no alignment.
                let mut shifted = vec![0u8; col.len() + 1];
                shifted[1..].copy_from_slice(&col);
                for path in all_paths() {
                    for c in [&col[..], &shifted[1..]] {
                        let mut got = base.clone();
                        axpy_column_with(path, ty, a, c, &mut got);
                        assert_eq!(bits(&got), bits(&want), "{path} {ty} d={d}");
                    }
                }
            }
        }
    }

    #[test]
    fn sparse_layer_matches_f32_reference() {
        let mut rng = Rng::new(42);
        for (si, tys) in TYPE_SETS.into_iter().enumerate() {
            let d = if unit(tys.0) == QK_K || unit(tys.1) == QK_K { 256 } else { 96 };
            for (act, t) in [
                (SparseAct::Silu, 0.0),
                (SparseAct::Silu, 0.2),
                (SparseAct::Relu, 0.0),
                (SparseAct::Relu, 0.3),
                (SparseAct::Drelu, 0.0),
                (SparseAct::Drelu, 0.1),
            ] {
                let sp = spec(act, t, tys, d);
                let layer = Layer::new(sp, 75, 16, 100 + si as u64);
                let (ag, au) = quantized(&sp, 2, &mut rng);
                for token in 0..2 {
                    let acts = TokenActs { gate: &ag, up: &au, token };
                    let (want, want_active, mag) = layer.reference(&acts, None);
                    let order: Vec<usize> = (0..layer.records.len()).collect();
                    let (got, active) = layer.run_in_order(KernelPath::Scalar, &acts, &order);
                    assert_eq!(active, want_active, "{act:?} t={t} {tys:?}");
                    assert!(active > 0 && (active < 75 || t == 0.0), "{act:?} t={t}: {active} active");
                    if act == SparseAct::Silu && t == 0.0 {
                        assert_eq!(active, 75, "SiLU at threshold 0 is dense");
                    }
                    for j in 0..d {
                        let err = (got[j] as f64 - want[j]).abs();
                        assert!(
                            err <= 1e-5 * mag[j] + 1e-6,
                            "{act:?} t={t} {tys:?} j={j}: {} vs {}",
                            got[j],
                            want[j]
                        );
                    }
                }
            }
        }
    }

    /// Every kernel path, thread count and cluster order gives the same bits.
    #[test]
    fn sparse_layer_is_bit_identical_across_paths_threads_and_orders() {
        let mut rng = Rng::new(43);
        for tys in &TYPE_SETS[..3] {
            for act in [SparseAct::Silu, SparseAct::Relu, SparseAct::Drelu] {
                let t = if act == SparseAct::Silu { 0.05 } else { 0.0 };
                let sp = spec(act, t, *tys, 128);
                let layer = Layer::new(sp, 100, 8, 7);
                let (ag, au) = quantized(&sp, 1, &mut rng);
                let acts = TokenActs { gate: &ag, up: &au, token: 0 };
                let n_cl = layer.records.len();
                let order: Vec<usize> = (0..n_cl).collect();
                let (want, want_active) = layer.run_in_order(KernelPath::Scalar, &acts, &order);
                assert!(want.iter().any(|&v| v != 0.0));
                for path in all_paths() {
                    for shuffle_seed in 0..3 {
                        let mut ord = order.clone();
                        let mut r = Rng::new(shuffle_seed);
                        for i in (1..ord.len()).rev() {
                            ord.swap(i, r.below(i + 1));
                        }
                        let (got, active) = layer.run_in_order(path, &acts, &ord);
                        assert_eq!(bits(&got), bits(&want), "{path} {act:?} order {ord:?}");
                        assert_eq!(active, want_active);
                    }
                }
                // Threads claiming clusters in interleaved, reversed order through `shared`.
                let cl = layer.clusters();
                let mut sums = ClusterSums::new(n_cl, sp.d_model);
                {
                    let slots = sums.shared();
                    std::thread::scope(|s| {
                        for w in 0..3usize {
                            let (slots, cl, sp, acts) = (&slots, &cl, &sp, &acts);
                            s.spawn(move || {
                                let mut gates = ClusterGates::new();
                                for k in (0..n_cl).rev().filter(|k| k % 3 == w) {
                                    let slot = slots.claim(k);
                                    sparse_ffn_cluster(sp, acts, &cl[k], Filter::NONE, &mut gates, slot);
                                }
                            });
                        }
                    });
                }
                let mut got = vec![0.0; sp.d_model];
                sums.reduce_into(&mut got);
                assert_eq!(bits(&got), bits(&want), "scoped threads {act:?}");
                // The spin pool with 1, 2 and 3 threads.
                for n_threads in [1, 2, 3] {
                    let pool = SpinPool::new(n_threads).unwrap();
                    let mut sums = ClusterSums::new(n_cl, sp.d_model);
                    let mut scratch = SparseScratch::new();
                    let mut got = vec![f32::NAN; sp.d_model];
                    for _round in 0..2 {
                        let active = sparse_ffn_on(
                            &pool,
                            &sp,
                            &acts,
                            &cl,
                            Filter::NONE,
                            &mut sums,
                            &mut scratch,
                            &mut got,
                        );
                        assert_eq!(bits(&got), bits(&want), "{n_threads} threads {act:?}");
                        assert_eq!(active, want_active);
                    }
                }
            }
        }
    }

    /// Several tokens through `sparse_ffn_rows_on` (each with its own predictor mask, some with per-neuron
    /// thresholds) give each token the bits `sparse_ffn_on` gives it alone, on 1 to 3 threads.
    #[test]
    fn sparse_rows_are_bit_identical_to_each_token_alone() {
        let mut rng = Rng::new(44);
        for tys in &TYPE_SETS[..3] {
            for act in [SparseAct::Silu, SparseAct::Relu, SparseAct::Drelu] {
                let t = if act == SparseAct::Silu { 0.05 } else { 0.0 };
                let sp = spec(act, t, *tys, 128);
                let layer = Layer::new(sp, 100, 8, 7);
                let cl = layer.clusters();
                let n_t = 5;
                let (ag, au) = quantized(&sp, n_t, &mut rng);
                let acts: Vec<TokenActs> =
                    (0..n_t).map(|token| TokenActs { gate: &ag, up: &au, token }).collect();
                let masks: Vec<Vec<bool>> =
                    (0..n_t).map(|i| (0..100).map(|_| i == 0 || rng.below(3) > 0).collect()).collect();
                let per: Vec<f32> = (0..100).map(|i| if i % 7 == 0 { 10.0 } else { t }).collect();
                let filters: Vec<Filter> = (0..n_t)
                    .map(|i| Filter {
                        mask: (i != 1).then(|| &masks[i][..]),
                        thresholds: (i % 2 == 1).then_some(&per[..]),
                    })
                    .collect();
                for n_threads in [1, 2, 3] {
                    let pool = SpinPool::new(n_threads).unwrap();
                    let mut scratch = SparseScratch::new();
                    let mut want = vec![0.0; n_t * sp.d_model];
                    let mut want_active = 0;
                    for (i, w) in want.chunks_exact_mut(sp.d_model).enumerate() {
                        let mut sums = ClusterSums::new(cl.len(), sp.d_model);
                        want_active +=
                            sparse_ffn_on(&pool, &sp, &acts[i], &cl, filters[i], &mut sums, &mut scratch, w);
                    }
                    assert!(want.iter().any(|&v| v != 0.0));
                    let mut sums: Vec<ClusterSums> =
                        (0..n_t).map(|_| ClusterSums::new(cl.len(), sp.d_model)).collect();
                    for _round in 0..2 {
                        let mut got = vec![f32::NAN; n_t * sp.d_model];
                        let active = sparse_ffn_rows_on(
                            &pool,
                            &sp,
                            &acts,
                            &cl,
                            &filters,
                            &mut sums,
                            &mut scratch,
                            &mut got,
                        );
                        assert_eq!(bits(&got), bits(&want), "{n_threads} threads {act:?}");
                        assert_eq!(active, want_active);
                    }
                }
            }
        }
    }

    use crate::sparse::sparse_ffn_cluster;

    #[test]
    fn threshold_semantics() {
        let mut rng = Rng::new(44);
        let tys = (GgmlType::Q4_1, GgmlType::Q4_1, GgmlType::Q8_0);
        let base = spec(SparseAct::Relu, 0.0, tys, 64);
        let layer = Layer::new(base, 40, 40, 9);
        let (ag, au) = quantized(&base, 1, &mut rng);
        let acts = TokenActs { gate: &ag, up: &au, token: 0 };
        let (g, u) = layer.gate_up(&acts);
        let cl = layer.clusters();
        let count = |sp: &SparseFfn| {
            let mut gates = ClusterGates::new();
            let mut slot = vec![0.0; 64];
            sparse_ffn_cluster(sp, &acts, &cl[0], Filter::NONE, &mut gates, &mut slot)
        };
        let passed_with = |sp: &SparseFfn, f: Filter<'_>| {
            let mut gates = ClusterGates::new();
            crate::sparse::cluster_gates(sp, &acts, cl[0].gate, f, &mut gates);
            gates.passed().to_vec()
        };
        let passed = |sp: &SparseFfn| passed_with(sp, Filter::NONE);
        // ReLU at t = 0: exactly the positive gates.
        let pos: Vec<u32> = (0..40).filter(|&i| g[i as usize] > 0.0).collect();
        assert!(!pos.is_empty() && pos.len() < 40);
        assert_eq!(passed(&base), pos);
        assert_eq!(count(&base), pos.len());
        // A score exactly at the threshold: excluded for ReLU (`>`), included for SiLU (`>=`).
        let i0 = pos[0] as usize;
        let relu_at = SparseFfn { threshold: g[i0], ..base };
        assert!(!passed(&relu_at).contains(&(i0 as u32)));
        let s0 = silu_ggml(g[3]).abs();
        let silu_at = SparseFfn { act: SparseAct::Silu, threshold: s0, ..base };
        assert!(passed(&silu_at).contains(&3));
        let silu_above = SparseFfn { threshold: f32::from_bits(s0.to_bits() + 1), ..silu_at };
        assert!(!passed(&silu_above).contains(&3));
        // Per-neuron thresholds replace the layer's: neuron 3's at its score, every other one's above all.
        let mut per = vec![f32::INFINITY; 40];
        per[3] = s0;
        let f = Filter { mask: None, thresholds: Some(&per) };
        assert_eq!(passed_with(&silu_above, f), vec![3]);
        per[3] = f32::from_bits(s0.to_bits() + 1);
        assert!(passed_with(&silu_at, Filter { mask: None, thresholds: Some(&per) }).is_empty());
        // dReLU needs both gate and up above the threshold.
        let drelu = SparseFfn { act: SparseAct::Drelu, ..base };
        let both = (0..40).filter(|&i| g[i] > 0.0 && u[i] > 0.0).count();
        assert!(both > 0 && both < pos.len(), "the test needs neurons with g > 0 >= u");
        assert_eq!(passed(&drelu), pos, "the gate phase keeps every positive gate");
        assert_eq!(count(&drelu), both);
    }

    #[test]
    fn two_phase_equals_one_shot() {
        let mut rng = Rng::new(45);
        for act in [SparseAct::Silu, SparseAct::Relu, SparseAct::Drelu] {
            let t = if act == SparseAct::Silu { 0.1 } else { 0.0 };
            let sp = spec(act, t, TYPE_SETS[0], 96);
            let layer = Layer::new(sp, 50, 25, 11);
            let (ag, au) = quantized(&sp, 1, &mut rng);
            let acts = TokenActs { gate: &ag, up: &au, token: 0 };
            let mask: Vec<bool> = (0..25).map(|i| i % 3 != 1).collect();
            for path in all_paths() {
                for (k, c) in layer.clusters().iter().enumerate() {
                    for m in [None, Some(&mask[..])] {
                        let mut gates = ClusterGates::new();
                        let mut one = vec![0.5; 96];
                        let n1 = sparse_ffn_cluster_with(
                            path,
                            &sp,
                            &acts,
                            c,
                            Filter::mask(m),
                            &mut gates,
                            &mut one,
                        );
                        let mut gates = ClusterGates::new();
                        let n_pass =
                            cluster_gates_with(path, &sp, &acts, c.gate, Filter::mask(m), &mut gates);
                        assert_eq!(n_pass, gates.passed().len());
                        if let Some(m) = m {
                            assert!(gates.passed().iter().all(|&i| m[i as usize]));
                        }
                        // Only the passing neurons' bundles, copied elsewhere as an offloaded read would.
                        let reads: Vec<Vec<u8>> = gates
                            .passed()
                            .iter()
                            .map(|&i| {
                                let ud = c.up_down(&sp, i as usize);
                                [ud.up, ud.down].concat()
                            })
                            .collect();
                        let ub = sp.up_row_bytes();
                        let bundles: Vec<UpDown> =
                            reads.iter().map(|r| UpDown { up: &r[..ub], down: &r[ub..] }).collect();
                        let mut two = vec![0.5; 96];
                        let mut by = two.clone();
                        let passed = gates.passed().to_vec();
                        let mut gates_by = gates.clone();
                        let n2 = cluster_up_down_with(path, &sp, &acts, &mut gates, &bundles, &mut two);
                        assert_eq!(n1, n2, "{path} {act:?} cluster {k}");
                        assert_eq!(bits(&one), bits(&two), "{path} {act:?} cluster {k}");
                        // The same bundles found by neuron index (on the chosen path only).
                        if path == crate::kernels::chosen() {
                            let find = |i: u32| bundles[passed.iter().position(|&p| p == i).unwrap()];
                            let n3 = crate::cluster_up_down_by(&sp, &acts, &mut gates_by, &find, &mut by);
                            assert_eq!((n3, bits(&by)), (n1, bits(&one)), "{act:?} cluster {k} by index");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn masks_select_neurons_and_empty_inputs_give_zero() {
        let mut rng = Rng::new(46);
        let sp = spec(SparseAct::Silu, 0.0, TYPE_SETS[0], 64);
        let layer = Layer::new(sp, 48, 16, 12);
        let (ag, au) = quantized(&sp, 1, &mut rng);
        let acts = TokenActs { gate: &ag, up: &au, token: 0 };
        let cl = layer.clusters();
        let pool = SpinPool::new(2).unwrap();
        let mut scratch = SparseScratch::new();
        // No neuron predicted: no output, nothing active, no slot taken.
        let none = vec![false; 48];
        let mut sums = ClusterSums::new(cl.len(), 64);
        let mut out = vec![f32::NAN; 64];
        let n = sparse_ffn_on(
            &pool,
            &sp,
            &acts,
            &cl,
            Filter::mask(Some(&none)),
            &mut sums,
            &mut scratch,
            &mut out,
        );
        assert_eq!(n, 0);
        assert!(out.iter().all(|&v| v.to_bits() == 0), "{out:?}");
        assert!((0..cl.len()).all(|k| !sums.is_taken(k)));
        // A partial mask: the reference restricted to the predicted neurons.
        let mask: Vec<bool> = (0..48).map(|i| i % 5 < 2 || i >= 40).collect();
        let n = sparse_ffn_on(
            &pool,
            &sp,
            &acts,
            &cl,
            Filter::mask(Some(&mask)),
            &mut sums,
            &mut scratch,
            &mut out,
        );
        let (want, want_n, mag) = layer.reference(&acts, Some(&mask));
        assert_eq!(n, want_n);
        assert_eq!(n, mask.iter().filter(|&&m| m).count(), "SiLU at 0 keeps every predicted neuron");
        for j in 0..64 {
            assert!((out[j] as f64 - want[j]).abs() <= 1e-5 * mag[j] + 1e-6);
        }
        // No clusters at all.
        let mut sums0 = ClusterSums::new(0, 64);
        let n = sparse_ffn_on(&pool, &sp, &acts, &[], Filter::NONE, &mut sums0, &mut scratch, &mut out);
        assert_eq!(n, 0);
        assert!(out.iter().all(|&v| v.to_bits() == 0));
        // An empty cluster: nothing passes, the slot stays zero.
        let mut gates = ClusterGates::new();
        let empty = ClusterRows { gate: &[], bundles: &[], bundle_stride: layer.stride };
        let mut slot = vec![0.0; 64];
        assert_eq!(sparse_ffn_cluster(&sp, &acts, &empty, Filter::NONE, &mut gates, &mut slot), 0);
        assert!(gates.passed().is_empty() && slot.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn cluster_sums_give_each_slot_once_per_round() {
        let mut sums = ClusterSums::new(3, 4);
        sums.slot(2).copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        sums.slot(2)[0] += 1.0; // a second use in the round keeps the values
        {
            let slots = sums.shared();
            slots.claim(0).copy_from_slice(&[0.5; 4]);
            let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slots.claim(0).len()));
            assert!(again.is_err(), "a slot is claimed at most once per round");
        }
        let mut out = vec![0.0; 4];
        sums.reduce_into(&mut out);
        assert_eq!(out, [2.5, 2.5, 3.5, 4.5]);
        sums.reset();
        assert_eq!(sums.slot(1), &[0.0; 4]);
        sums.reduce_into(&mut out);
        assert_eq!(out, [0.0; 4]);
    }
}
