//! One decode-step FFN layer (one token) computed sparsely with `pinion_exec_cpu::sparse_ffn_on` at densities
//! 0.1, 0.25, 0.5 and 1.0, next to the dense `matmul_on` path (gate, up, SwiGLU, down) as the baseline, on a
//! 2-thread `SpinPool`. Shapes: SmolLM2-135M (d_model 576, n_ff 1536, Q4_1 gate/up, Q8_0 down) and LLaMA-7B
//! (4096, 11008, Q4_0 gate/up, Q8_0 down).
//!
//! The sparse layer is laid out as the packed format stores it in memory (per cluster of 32 neurons: the gate
//! rows, then up row ++ down column per neuron), and the density is set by a predicted mask choosing that
//! fraction of the neurons (spread over all clusters) with SiLU at threshold 0, so exactly the predicted
//! neurons run gate, up and down. Each group reports weight bytes touched per second.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_exec_cpu::{
    ClusterRows, ClusterSums, Filter, QMatrix, QuantizedActs, SparseAct, SparseFfn, SparseScratch, SpinPool,
    TokenActs, cpu_features, matmul_on, sparse_ffn_on, swiglu_ggml,
};
use pinion_format::GgmlType;
use pinion_format::quant::{
    BlockQ4_0, BlockQ4_1, BlockQ8_0, quantize_row_q4_0, quantize_row_q4_1, quantize_row_q8_0,
};

/// Neurons per cluster (the packed format's default).
const CLUSTER: usize = 32;

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

/// Bytes of a random `n_rows x n_cols` matrix of `ty` (Q4_0, Q4_1 or Q8_0), 8-byte aligned.
fn weights(ty: GgmlType, n_rows: usize, n_cols: usize, seed: u64) -> Vec<u64> {
    let x: Vec<f32> = values(n_rows * n_cols, seed).iter().map(|v| v * 0.1).collect();
    let bytes: Vec<u8> = match ty {
        GgmlType::Q4_0 => {
            let mut b = vec![BlockQ4_0 { d: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
            quantize_row_q4_0(&x, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
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
    };
    aligned(&bytes)
}

fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut buf = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut buf)[..bytes.len()].copy_from_slice(bytes);
    buf
}

fn bytes(buf: &[u64], len: usize) -> &[u8] {
    &bytemuck::cast_slice::<u64, u8>(buf)[..len]
}

/// A dense layer and its packed-like copy: the records of all clusters back to back (each 8-byte aligned).
struct Layer {
    spec: SparseFfn,
    gate: Vec<u64>,
    up: Vec<u64>,
    /// `d_model x n_ff`, Q8_0.
    down: Vec<u64>,
    /// Packed records, and per cluster (offset, gate bytes, bundle bytes).
    packed: Vec<u64>,
    records: Vec<(usize, usize, usize)>,
}

impl Layer {
    fn new(d: usize, n_ff: usize, ty: GgmlType) -> Layer {
        let spec = SparseFfn {
            act: SparseAct::Silu,
            threshold: 0.0,
            d_model: d,
            gate_ty: ty,
            up_ty: ty,
            down_ty: GgmlType::Q8_0,
        };
        let gate = weights(ty, n_ff, d, 1);
        let up = weights(ty, n_ff, d, 2);
        let down = weights(GgmlType::Q8_0, d, n_ff, 3);
        // Down columns: column i of the d x n_ff matrix, re-quantized to Q8_0.
        let down_f = values(d * n_ff, 3);
        let (grb, urb, db) = (spec.gate_row_bytes(), spec.up_row_bytes(), spec.down_col_bytes());
        let (gb, ub) = (bytes(&gate, grb * n_ff), bytes(&up, urb * n_ff));
        let mut out = Vec::new();
        let mut records = Vec::new();
        let mut col = vec![0.0f32; d];
        let mut colq = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; d / 32];
        for c0 in (0..n_ff).step_by(CLUSTER) {
            let c1 = (c0 + CLUSTER).min(n_ff);
            let start = out.len();
            out.extend_from_slice(&gb[c0 * grb..c1 * grb]);
            for i in c0..c1 {
                out.extend_from_slice(&ub[i * urb..(i + 1) * urb]);
                for (j, v) in col.iter_mut().enumerate() {
                    *v = down_f[j * n_ff + i] * 0.1;
                }
                quantize_row_q8_0(&col, &mut colq);
                out.extend_from_slice(bytemuck::cast_slice(&colq));
            }
            records.push((start, (c1 - c0) * grb, (c1 - c0) * (urb + db)));
            out.resize(out.len().next_multiple_of(8), 0);
        }
        let packed = aligned(&out);
        Layer { spec, gate, up, down, packed, records }
    }

    fn clusters(&self) -> Vec<ClusterRows<'_>> {
        let all = bytemuck::cast_slice::<u64, u8>(&self.packed);
        let stride = self.spec.up_row_bytes() + self.spec.down_col_bytes();
        self.records
            .iter()
            .map(|&(at, g, b)| ClusterRows {
                gate: &all[at..at + g],
                bundles: &all[at + g..at + g + b],
                bundle_stride: stride,
            })
            .collect()
    }

    /// Weight bytes of one neuron (gate row, up row, down column).
    fn neuron_bytes(&self) -> usize {
        self.spec.gate_row_bytes() + self.spec.up_row_bytes() + self.spec.down_col_bytes()
    }
}

fn bench_sparse(c: &mut Criterion) {
    eprintln!("{}", cpu_features());
    let pool = SpinPool::new(2).expect("spin pool");
    for (name, d, n_ff, ty) in
        [("smollm2-135m", 576, 1536, GgmlType::Q4_1), ("llama-7b", 4096, 11008, GgmlType::Q4_0)]
    {
        let layer = Layer::new(d, n_ff, ty);
        let spec = layer.spec;
        let x = values(d, 11);
        let mut acts = QuantizedActs::new();
        acts.quantize(ty, &x, d);
        let mut group = c.benchmark_group(format!("sparse_ffn/{name}"));

        // Dense baseline: gate, up, SwiGLU, quantize, down.
        let gm = QMatrix::new(ty, n_ff, d, bytes(&layer.gate, spec.gate_row_bytes() * n_ff)).expect("gate");
        let um = QMatrix::new(ty, n_ff, d, bytes(&layer.up, spec.up_row_bytes() * n_ff)).expect("up");
        let down_bytes = GgmlType::Q8_0.row_bytes(n_ff).expect("row") * d;
        let dm = QMatrix::new(GgmlType::Q8_0, d, n_ff, bytes(&layer.down, down_bytes)).expect("down");
        let (mut g, mut u, mut out) = (vec![0.0f32; n_ff], vec![0.0f32; n_ff], vec![0.0f32; d]);
        let mut acts_h = QuantizedActs::new();
        group.throughput(Throughput::Bytes((layer.neuron_bytes() * n_ff) as u64));
        group.bench_function(BenchmarkId::new("dense-matmul_on", "1.0"), |b| {
            b.iter(|| {
                matmul_on(&pool, &gm, &acts, &mut g);
                matmul_on(&pool, &um, &acts, &mut u);
                swiglu_ggml(&mut g, &u);
                acts_h.quantize(GgmlType::Q8_0, &g, n_ff);
                matmul_on(&pool, &dm, &acts_h, &mut out);
            })
        });

        // Sparse at each density: a mask choosing that fraction of neurons, spread over every cluster.
        let clusters = layer.clusters();
        let mut sums = ClusterSums::new(clusters.len(), d);
        let mut scratch = SparseScratch::new();
        let r = values(n_ff, 5);
        let token = TokenActs { gate: &acts, up: &acts, token: 0 };
        for density in [0.1f32, 0.25, 0.5, 1.0] {
            let mask: Vec<bool> = r.iter().map(|&v| (v + 1.0) * 0.5 < density).collect();
            let n_active = mask.iter().filter(|&&m| m).count();
            group.throughput(Throughput::Bytes((layer.neuron_bytes() * n_active) as u64));
            group.bench_function(BenchmarkId::new("sparse_ffn_on", density), |b| {
                b.iter(|| {
                    let n = sparse_ffn_on(
                        &pool,
                        &spec,
                        &token,
                        &clusters,
                        Filter::mask(Some(&mask)),
                        &mut sums,
                        &mut scratch,
                        &mut out,
                    );
                    assert_eq!(n, n_active);
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_sparse);
