//! CPU kernels for dense inference of llama-style models: quantized matrix products, RMS norm, RoPE,
//! activations and causal grouped-query attention.
//!
//! The arithmetic mirrors ggml's x86 CPU backend so that pinion reproduces llama.cpp's greedy tokens:
//! activations are quantized once per row to the weight type's `vec_dot_type` ([`QuantizedActs`]), and each
//! dot product sums integer products per block and accumulates per block in f32 in ggml's order. Weights are
//! borrowed in place as a [`QMatrix`] (usually from an mmap); [`matmul()`] multiplies it with a batch of
//! quantized activation rows on the current rayon pool, reusing each weight block across the batch.
//! Kernels exist for every GGUF weight type pinion reads, each with a scalar path (the reference) and AVX2 and
//! AVX-512 paths giving its bits, chosen once at run time (see [`cpu_features`]): Q4_0, Q4_1, Q5_0, Q5_1 and
//! Q8_0 (AVX-512 with VNNI; the scalar path emulates ggml's AVX2 order), Q2_K to Q6_K (ggml's generic order,
//! AVX-512BW), F32, F16 and BF16 (F32 and F16 run their AVX2 code on the AVX-512 path).
//!
//! [`DenseBackend`] is the one interface for the engine's dense batched products (prefill matmuls, dense
//! clusters): [`CpuDense`] implements it with [`matmul()`], and an accelerator backend (`pinion-exec-npu`'s
//! `NpuDense`) is a second implementation giving the same bits; the runtime holds a `&dyn DenseBackend`.
//!
//! [`sparse`] holds the CPU side of PowerInfer-2's sparse FFN: per-row dots, down-column axpys, cluster-wise
//! gate / up / down for one decode token, and a per-cluster accumulator reduced in cluster order.
//!
//! This crate is not a model: it knows nothing about layers, KV-cache management, files or threads pools
//! (callers install the rayon pool), and it allocates nothing sized to the model except the reusable
//! buffers it is handed or keeps per thread.

mod acts;
mod attention;
mod dense;
mod error;
mod ggml_exact;
mod kernels;
mod matmul;
mod matrix;
mod ops;
mod pool;
pub mod sparse;

pub use crate::acts::{QuantizedActs, vec_dot_type};
pub use crate::attention::{attention, attention_with};
pub use crate::dense::{CpuDense, DenseBackend, DenseShape, check_operands, check_output};
pub use crate::error::ExecError;
pub use crate::ggml_exact::{
    GGML_FA_TILE_Q, attention_f16acc, attention_f16acc_on, dot_f16_ggml, expf_ggml, geglu_ggml,
    geglu_threshold, gelu_ggml, silu_ggml, swiglu_ggml, swiglu_threshold,
};
pub use crate::kernels::{CpuFeatures, KernelPath, cpu_features};
pub use crate::matmul::{matmul, matmul_on, matmul_rows, matmul_rows_with};
pub use crate::matrix::QMatrix;
pub use crate::ops::{MAX_ROT, RopeMode, geglu, gelu, reglu, relu, rms_norm, rope, silu, softmax, swiglu};
pub use crate::pool::{SpinPool, split_range};
pub use crate::sparse::{
    ClusterGates, ClusterRows, ClusterSums, Filter, SharedSlots, SparseAct, SparseFfn, SparseScratch,
    TokenActs, UpDown, axpy_column, cluster_gates, cluster_up_down, cluster_up_down_by, row_dot,
    sparse_ffn_cluster, sparse_ffn_on, sparse_ffn_rows_on,
};

#[cfg(test)]
mod tests;
