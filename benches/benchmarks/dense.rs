//! The two `DenseBackend`s side by side: `CpuDense` (one `matmul` per call) and `NpuDense` (the static-shape
//! executor: the call split into zero-padded static batches of its default buckets, each a compiled graph),
//! both called through `&dyn DenseBackend` as the runtime will, on a 2-thread rayon pool (the machine's core
//! count, as the kernel benches).
//!
//! Shapes are SmolLM2-135M's FFN: gate/up (1536 x 576) and down (576 x 1536), Q4_1 weights built with
//! `pinion_format::quant`'s quantizer, Q8_1 activations quantized once outside the timed loop. Row counts:
//! 1 (decode), 7 (padded into the batch of 8), 64, 300 (split into 256 + 32 + 12 padded to 16) and 512 (a
//! full prefill batch, one unpadded pass: pp512). Each group reports multiply-accumulates per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_exec_cpu::{CpuDense, DenseBackend, DenseShape, QMatrix, QuantizedActs, cpu_features};
use pinion_exec_npu::NpuDense;
use pinion_format::GgmlType;
use pinion_format::quant::{BlockQ4_1, quantize_row_q4_1};

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

/// Q4_1 blocks of a random `n_rows x n_cols` matrix (a `Vec` of blocks is aligned for them).
fn weights(n_rows: usize, n_cols: usize, seed: u64) -> Vec<BlockQ4_1> {
    let x: Vec<f32> = values(n_rows * n_cols, seed).iter().map(|v| v * 0.1).collect();
    let mut b = vec![BlockQ4_1 { d: half::f16::ZERO, m: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
    quantize_row_q4_1(&x, &mut b);
    b
}

fn bench_dense(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("rayon pool");
    eprintln!("{}", cpu_features());
    let ty = GgmlType::Q4_1;
    let mats: Vec<(usize, usize, Vec<BlockQ4_1>)> =
        [(1536, 576), (576, 1536)].into_iter().map(|(r, k)| (r, k, weights(r, k, (r * k) as u64))).collect();
    let ws: Vec<QMatrix<'_>> = mats
        .iter()
        .map(|(r, k, b)| QMatrix::new(ty, *r, *k, bytemuck::cast_slice(b)).expect("matrix"))
        .collect();
    let shapes: Vec<DenseShape> = ws.iter().map(DenseShape::of).collect();
    let npu = NpuDense::new();
    let backends: [&dyn DenseBackend; 2] = [&CpuDense, &npu];
    for b in backends {
        b.prepare(&shapes, 512).expect("prepare");
    }
    for w in &ws {
        for n_t in [1, 7, 64, 300, 512] {
            let mut acts = QuantizedActs::new();
            acts.quantize(ty, &values(n_t * w.n_cols, 11), w.n_cols);
            let mut out = vec![0.0f32; n_t * w.n_rows];
            let mut group = c.benchmark_group(format!("dense/{ty}/{}x{}/t{n_t}", w.n_rows, w.n_cols));
            group.throughput(Throughput::Elements((w.n_rows * w.n_cols * n_t) as u64));
            if n_t >= 64 {
                group.sample_size(20);
            }
            for b in backends {
                group.bench_function(BenchmarkId::from_parameter(b.name()), |bench| {
                    bench.iter(|| pool.install(|| b.matmul(w, &acts, &mut out)).expect("matmul"))
                });
            }
            group.finish();
        }
    }
    eprintln!("NpuDense graphs: {}, {} KiB", npu.n_graphs(), npu.heap_bytes() / 1024);
}

criterion_group!(benches, bench_dense);
