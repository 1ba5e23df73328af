//! Tests: `NpuDense` against `CpuDense` bit for bit (every weight type with a kernel, random shapes, row
//! counts past the largest static batch, default and random buckets), the pass planner's properties, graph
//! reuse, and every error path.

use half::f16;
use pinion_exec_cpu::{CpuDense, DenseBackend, DenseShape, ExecError, QMatrix, QuantizedActs};
use pinion_format::GgmlType;
use pinion_format::quant::{self, BlockQ4K, BlockQ6K, BlockQ8_0, QK, QK_K};
use proptest::prelude::*;

use crate::{DEFAULT_BUCKETS, DenseExecutor, DenseGraph, NpuDense, NpuError, PAD_SLACK_ROWS, StaticShape};

/// Every weight type the CPU kernels multiply.
const TYPES: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q6K,
];

/// xorshift64*: deterministic test data.
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
    /// Activation-like values: mostly small, some outliers and exact zeros.
    fn acts(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| match self.next_u64() % 16 {
                0 => 0.0,
                1 => self.f() * 40.0,
                _ => self.f() * 2.0,
            })
            .collect()
    }
}

/// Weight bytes in 8-byte aligned storage.
struct Weights {
    buf: Vec<u64>,
    len: usize,
}

impl Weights {
    /// A random `n_rows x n_cols` matrix of `ty`.
    fn random(ty: GgmlType, n_rows: usize, n_cols: usize, rng: &mut Rng) -> Weights {
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
                let mut b: Vec<BlockQ8_0> = vec![bytemuck::Zeroable::zeroed(); n / QK];
                quant::quantize_row_q8_0(&vals, &mut b);
                bytemuck::cast_slice(&b).to_vec()
            }
            GgmlType::Q4K => {
                let b: Vec<BlockQ4K> = (0..n / QK_K)
                    .map(|_| BlockQ4K {
                        d: f16::from_f32(rng.f().abs() * 0.01),
                        dmin: f16::from_f32(rng.f().abs() * 0.01),
                        scales: std::array::from_fn(|_| rng.next_u64() as u8),
                        qs: std::array::from_fn(|_| rng.next_u64() as u8),
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
            _ => unreachable!("no kernel for {ty}"),
        };
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(&bytes);
        Weights { buf, len: bytes.len() }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.buf)[..self.len]
    }
}

fn block_len(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) { QK_K } else { QK }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `backend` on `n` random activation rows for `w`; returns the output bits.
fn run(backend: &dyn DenseBackend, w: &QMatrix<'_>, acts: &QuantizedActs) -> Vec<u32> {
    let mut out = vec![f32::NAN; acts.n_rows() * w.n_rows];
    backend.matmul(w, acts, &mut out).unwrap();
    bits(&out)
}

/// `NpuDense` (built from `buckets`, or the default) equals `CpuDense` bit for bit on one random case, on a
/// 2-thread pool, twice (the second time on reused graphs).
fn check_equal(
    buckets: Option<Vec<usize>>,
    ty: GgmlType,
    n_rows: usize,
    n_blocks: usize,
    n: usize,
    seed: u64,
) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut rng = Rng::new(seed);
    let k = n_blocks * block_len(ty);
    let wb = Weights::random(ty, n_rows, k, &mut rng);
    let w = QMatrix::new(ty, n_rows, k, wb.bytes()).unwrap();
    let mut acts = QuantizedActs::new();
    acts.quantize(ty, &rng.acts(n * k), k);
    let npu = match buckets {
        Some(b) => NpuDense::with_buckets(b).unwrap(),
        None => NpuDense::new(),
    };
    pool.install(|| {
        let want = run(&CpuDense, &w, &acts);
        for round in 0..2 {
            assert!(
                run(&npu, &w, &acts) == want,
                "{ty} {n_rows}x{k} n={n} round {round}: NPU differs from CPU"
            );
        }
    });
}

/// Row counts at and around the batch edges (a whole batch in place, a full batch then a remainder) for
/// every type.
#[test]
fn npu_equals_cpu_at_batch_edges() {
    for (i, ty) in TYPES.into_iter().enumerate() {
        for n in [1, 2, 8, 9, 511, 512, 513, 1024] {
            check_equal(None, ty, 5, 1, n, (i * 10_000 + n) as u64);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The default buckets, rows past the largest (512) static batch.
    #[test]
    fn npu_equals_cpu_bit_for_bit(
        ty_idx in 0..TYPES.len(),
        n_rows in 1usize..20,
        n_blocks in 1usize..4,
        n in prop_oneof![1usize..=80, 80usize..=1100],
        seed in any::<u64>(),
    ) {
        check_equal(None, TYPES[ty_idx], n_rows, n_blocks, n, seed);
    }

    /// Random small bucket sets, so that calls take many full passes and every kind of remainder.
    #[test]
    fn npu_equals_cpu_with_any_buckets(
        ty_idx in 0..TYPES.len(),
        buckets in proptest::collection::btree_set(1usize..24, 1..5),
        n_rows in 1usize..12,
        n in 1usize..100,
        seed in any::<u64>(),
    ) {
        check_equal(Some(buckets.into_iter().collect()), TYPES[ty_idx], n_rows, 1, n, seed);
    }

    /// Passes cover every row once, in batches that exist; only the last is padded, into the smallest batch
    /// that holds it, by at most the slack (unless no smaller batch could take part of it).
    #[test]
    fn passes_cover_every_row_with_bounded_padding(
        buckets in proptest::collection::btree_set(1usize..700, 1..8),
        n in 0usize..3000,
    ) {
        let buckets: Vec<usize> = buckets.into_iter().collect();
        let ex = DenseExecutor::new(buckets.clone()).unwrap();
        let passes: Vec<(usize, usize)> = ex.passes(n).collect();
        prop_assert_eq!(passes.iter().map(|p| p.0).sum::<usize>(), n);
        for (i, &(rows, batch)) in passes.iter().enumerate() {
            prop_assert!(rows > 0 && rows <= batch && buckets.contains(&batch), "{:?}", passes);
            if rows < batch {
                prop_assert_eq!(i, passes.len() - 1, "padded pass not last: {:?}", passes);
                let smallest = *buckets.iter().find(|&&b| b >= rows).unwrap();
                prop_assert_eq!(batch, smallest);
                let split_possible = buckets[0] <= rows;
                prop_assert!(
                    batch - rows <= PAD_SLACK_ROWS.max(rows / 8) || !split_possible,
                    "{:?}", passes
                );
            }
        }
        // Every batch a call of up to n rows uses is one `buckets_up_to(n)` lists.
        prop_assert!(passes.iter().all(|p| ex.buckets_up_to(n).contains(&p.1)));
    }
}

#[test]
fn default_passes() {
    let ex = DenseExecutor::new(DEFAULT_BUCKETS.to_vec()).unwrap();
    let plan = |n| ex.passes(n).collect::<Vec<_>>();
    assert_eq!(plan(512), [(512, 512)]);
    assert_eq!(plan(7), [(7, 8)]);
    assert_eq!(plan(1), [(1, 1)]);
    assert_eq!(plan(500), [(500, 512)]);
    assert_eq!(plan(300), [(256, 256), (32, 32), (12, 16)]);
    assert_eq!(plan(1100), [(512, 512), (512, 512), (64, 64), (12, 16)]);
    assert_eq!(ex.buckets_up_to(64), [1, 2, 4, 8, 16, 32, 64]);
    assert_eq!(ex.buckets_up_to(65), &DEFAULT_BUCKETS[..8]);
    assert_eq!(ex.buckets_up_to(4096), DEFAULT_BUCKETS);
}

/// `prepare` compiles each (shape, batch) once; calls reuse the graphs and, after the first round, hold no
/// more memory.
#[test]
fn graphs_are_compiled_once_and_reused() {
    let mut rng = Rng::new(3);
    let (ty, k) = (GgmlType::Q4_1, 64);
    let wbs = [Weights::random(ty, 24, k, &mut rng), Weights::random(ty, 8, k, &mut rng)];
    let ws: Vec<QMatrix<'_>> =
        wbs.iter().zip([24, 8]).map(|(b, r)| QMatrix::new(ty, r, k, b.bytes()).unwrap()).collect();
    let shapes: Vec<DenseShape> = ws.iter().map(DenseShape::of).collect();
    let npu = NpuDense::new();
    npu.prepare(&shapes, 64).unwrap();
    assert_eq!(npu.n_graphs(), 2 * 7);
    npu.prepare(&shapes, 600).unwrap();
    assert_eq!(npu.n_graphs(), 2 * DEFAULT_BUCKETS.len());
    npu.prepare(&shapes, 600).unwrap();
    assert_eq!(npu.n_graphs(), 2 * DEFAULT_BUCKETS.len());
    let mut held = Vec::new();
    for _round in 0..3 {
        for n in [1, 7, 64, 100, 300, 512, 777] {
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &rng.acts(n * k), k);
            for w in &ws {
                let mut out = vec![0.0; n * w.n_rows];
                npu.matmul(w, &acts, &mut out).unwrap();
            }
        }
        assert_eq!(npu.n_graphs(), 2 * DEFAULT_BUCKETS.len());
        held.push(npu.heap_bytes());
    }
    assert!(held[0] > 0 && held[1] == held[0] && held[2] == held[0], "{held:?}");
}

/// Operand errors are the same typed errors as the CPU backend's; the static-shape machinery's own errors
/// are `NpuError`s, carried as `ExecError::Backend` through the trait.
#[test]
fn errors_are_typed() {
    let mut rng = Rng::new(4);
    let (ty, n_rows, k) = (GgmlType::Q4_0, 8, 64);
    let wb = Weights::random(ty, n_rows, k, &mut rng);
    let w = QMatrix::new(ty, n_rows, k, wb.bytes()).unwrap();
    let mut acts = QuantizedActs::new();
    acts.quantize(ty, &rng.acts(3 * k), k);
    let npu = NpuDense::new();
    let backends: [&dyn DenseBackend; 2] = [&CpuDense, &npu];
    for b in backends {
        let name = b.name();
        let mut out = vec![0.0; 3 * n_rows];
        assert!(
            matches!(
                b.matmul(&w, &acts, &mut out[1..]),
                Err(ExecError::OutputLength { expected: 24, got: 23, .. })
            ),
            "{name}"
        );
        let mut other = QuantizedActs::new();
        other.quantize(GgmlType::F16, &rng.acts(3 * k), k);
        assert!(matches!(b.matmul(&w, &other, &mut out), Err(ExecError::ActsMismatch { .. })), "{name}");
        let q8_1 = QMatrix { ty: GgmlType::Q8_1, n_rows: 1, n_cols: 32, data: &wb.bytes()[..36] };
        assert!(matches!(b.matmul(&q8_1, &acts, &mut out), Err(ExecError::UnsupportedType { .. })), "{name}");
        let short = QMatrix { data: &wb.bytes()[..18], ..w };
        assert!(matches!(b.matmul(&short, &acts, &mut out), Err(ExecError::SizeMismatch { .. })), "{name}");
        let bad = DenseShape { ty: GgmlType::Q8K, n_rows: 4, n_cols: 256 };
        assert!(
            matches!(b.prepare(&[bad], 8), Err(ExecError::UnsupportedType { ty: GgmlType::Q8K })),
            "{name}"
        );
        let ragged = DenseShape { ty, n_rows: 4, n_cols: 40 };
        assert!(matches!(b.prepare(&[ragged], 8), Err(ExecError::RowNotBlockAligned { .. })), "{name}");
        // Zero activation rows: nothing to compute.
        let mut none = QuantizedActs::new();
        none.quantize(ty, &[], k);
        assert!(b.matmul(&w, &none, &mut []).is_ok(), "{name}");
    }
    assert_eq!(npu.name(), "npu");
    assert!(matches!(NpuDense::with_buckets(vec![]), Err(NpuError::BadBuckets { .. })));
    assert!(matches!(NpuDense::with_buckets(vec![0, 4]), Err(NpuError::BadBuckets { .. })));
    assert!(
        matches!(DenseExecutor::new(vec![8, 4]), Err(NpuError::BadBuckets { buckets }) if buckets == [8, 4])
    );
    assert!(matches!(DenseExecutor::new(vec![4, 4]), Err(NpuError::BadBuckets { .. })));

    let shape = StaticShape::new(DenseShape::of(&w), 2);
    assert!(matches!(
        DenseGraph::compile(StaticShape { batch: 0, ..shape }),
        Err(NpuError::InvalidShape { .. })
    ));
    assert!(matches!(
        DenseGraph::compile(StaticShape { ty: GgmlType::Q8K, ..shape }),
        Err(NpuError::Exec(ExecError::UnsupportedType { .. }))
    ));
    let mut g = DenseGraph::compile(shape).unwrap();
    assert_eq!(g.shape(), shape);
    let mut out = vec![0.0; 3 * n_rows];
    assert!(matches!(g.run(&w, &acts, 0..3, &mut out), Err(NpuError::BatchTooLarge { n: 3, batch: 2 })));
    assert!(matches!(
        g.run(&w, &acts, 2..4, &mut out[..2 * n_rows]),
        Err(NpuError::Exec(ExecError::RowsOutOfRange { end: 4, .. }))
    ));
    assert!(matches!(g.run(&w, &acts, 0..2, &mut out), Err(NpuError::Exec(ExecError::OutputLength { .. }))));
    let half_w = QMatrix::new(ty, 4, k, &wb.bytes()[..4 * 36]).unwrap();
    let e = g.run(&half_w, &acts, 0..2, &mut out[..8]).unwrap_err();
    assert!(matches!(e, NpuError::WeightMismatch { n_rows: 4, .. }), "{e}");
    // Through the trait, the machinery's errors are the backend's, with the NpuError as source.
    match ExecError::from(e) {
        ExecError::Backend { backend: "npu", source } => {
            assert!(matches!(source.downcast_ref::<NpuError>(), Some(NpuError::WeightMismatch { .. })));
        }
        other => panic!("not a backend error: {other}"),
    }
    assert!(matches!(
        ExecError::from(NpuError::Exec(ExecError::UnsupportedType { ty })),
        ExecError::UnsupportedType { .. }
    ));
    // A run within the batch gives the CPU's bits.
    g.run(&w, &acts, 1..3, &mut out[..2 * n_rows]).unwrap();
    let mut want = vec![0.0; 3 * n_rows];
    CpuDense.matmul(&w, &acts, &mut want).unwrap();
    assert_eq!(bits(&out[..2 * n_rows]), bits(&want[n_rows..]));
}
