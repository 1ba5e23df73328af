//! CPU kernels of `pinion-exec-cpu` on SmolLM2-135M shapes: Q4_1 FFN matrices at decode (1 activation row)
//! and prefill (512 rows), and the Q8_0 tied output matrix (49152 x 576, and Gemma 3 270M's 262144 x 640) at
//! decode, scalar against the
//! dispatched SIMD path, on a 2-thread rayon pool (the machine's core count, as llama-bench `-t 2`); decode
//! also on one thread.
//!
//! Decode groups report weight bytes per second (the matvec is bound by memory bandwidth); prefill groups
//! report multiply-accumulates per second.
//!
//! `matvec/{type}/2048x2048` times the matrix-vector product for every weight type with a kernel, on one
//! thread, on every kernel path this CPU supports (scalar, avx2, avx512), reporting weight bytes per second.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_exec_cpu::{KernelPath, QMatrix, QuantizedActs, cpu_features, matmul_rows_with};
use pinion_format::GgmlType;
use pinion_format::quant::{BlockQ4_1, BlockQ8_0, quantize_row_q4_1, quantize_row_q8_0};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Weight bytes of a random matrix of `ty` (Q4_1 or Q8_0).
fn weights(ty: GgmlType, n_rows: usize, n_cols: usize) -> Vec<u8> {
    let x = values(n_rows * n_cols, 7);
    match ty {
        GgmlType::Q4_1 => {
            let mut b = vec![BlockQ4_1 { d: half::f16::ZERO, m: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
            quantize_row_q4_1(&x, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q8_0 => {
            let mut b = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; x.len() / 32];
            quantize_row_q8_0(&x, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        _ => unreachable!(),
    }
}

fn bench_matmul(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("rayon pool");
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("rayon pool");
    let simd = cpu_features().path;
    eprintln!("{}", cpu_features());
    let shapes: [(GgmlType, usize, usize, &[usize]); 4] = [
        (GgmlType::Q4_1, 1536, 576, &[1, 512]),
        (GgmlType::Q4_1, 576, 1536, &[1, 512]),
        (GgmlType::Q8_0, 49152, 576, &[1]),
        // Gemma 3 270M's tied output head: 178 MB read per token, half of its decode time.
        (GgmlType::Q8_0, 262144, 640, &[1]),
    ];
    for (ty, n_rows, n_cols, batches) in shapes {
        let data = weights(ty, n_rows, n_cols);
        let w = QMatrix::new(ty, n_rows, n_cols, &data).expect("matrix");
        for &n_t in batches {
            let x = values(n_t * n_cols, 11);
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &x, n_cols);
            let mut out = vec![0.0f32; n_t * n_rows];
            let mut group = c.benchmark_group(format!("matmul/{ty}/{n_rows}x{n_cols}/t{n_t}"));
            if n_t == 1 {
                group.throughput(Throughput::Bytes(data.len() as u64));
            } else {
                group.throughput(Throughput::Elements((n_rows * n_cols * n_t) as u64));
                group.sample_size(10);
            }
            let mut paths = vec![simd];
            if simd != KernelPath::Scalar {
                paths.push(KernelPath::Scalar);
            }
            for path in paths {
                group.bench_function(BenchmarkId::from_parameter(path), |b| {
                    b.iter(|| pool.install(|| matmul_rows_with(path, &w, &acts, 0, n_rows, &mut out)))
                });
            }
            if n_t == 1 {
                group.bench_function(BenchmarkId::from_parameter(format!("{simd}-1thread")), |b| {
                    b.iter(|| pool1.install(|| matmul_rows_with(simd, &w, &acts, 0, n_rows, &mut out)))
                });
            }
            group.finish();
        }
    }
}

/// Bytes of `n` values of `ty` with random codes and sane scales: random bytes, then every f16 scale field of
/// each block overwritten with a small positive value (random bytes there could be NaN or subnormal, which
/// would time something else).
fn random_matrix(ty: GgmlType, n: usize) -> Vec<u8> {
    let vals = values(n, 3);
    let mut bits = values(n * 2, 5).into_iter().map(|v| v.to_bits());
    match ty {
        GgmlType::F32 => return bytemuck::cast_slice(&vals).to_vec(),
        GgmlType::F16 => {
            let h: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
            return bytemuck::cast_slice(&h).to_vec();
        }
        GgmlType::BF16 => {
            let h: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
            return bytemuck::cast_slice(&h).to_vec();
        }
        _ => {}
    }
    // Byte offsets of the f16 scales in a block (ggml-common.h).
    let scales: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => unreachable!("{ty} is not a weight type"),
    };
    let mut bytes: Vec<u8> =
        (0..ty.row_bytes(n).expect("whole blocks")).map(|_| bits.next().unwrap_or(7) as u8).collect();
    for (i, block) in bytes.chunks_exact_mut(ty.block_bytes()).enumerate() {
        for &o in scales {
            let d = half::f16::from_f32(1e-3 * (1.0 + (i % 7) as f32));
            block[o..o + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    bytes
}

/// The matrix-vector product at 2048 x 2048 for every weight type, on one thread, every supported path.
fn bench_matvec_types(c: &mut Criterion) {
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("rayon pool");
    let (n_rows, n_cols) = (2048, 2048);
    let types = [
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
    let paths: Vec<KernelPath> = KernelPath::ALL.into_iter().filter(|p| p.is_supported()).collect();
    for ty in types {
        let data = random_matrix(ty, n_rows * n_cols);
        let w = QMatrix::new(ty, n_rows, n_cols, &data).expect("matrix");
        let x = values(n_cols, 11);
        let mut acts = QuantizedActs::new();
        acts.quantize(ty, &x, n_cols);
        let mut out = vec![0.0f32; n_rows];
        let mut group = c.benchmark_group(format!("matvec/{ty}/{n_rows}x{n_cols}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(2));
        group.sample_size(20);
        for &path in &paths {
            group.bench_function(BenchmarkId::from_parameter(path), |b| {
                b.iter(|| pool1.install(|| matmul_rows_with(path, &w, &acts, 0, n_rows, &mut out)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_matmul, bench_matvec_types);
