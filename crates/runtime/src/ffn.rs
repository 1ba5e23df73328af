//! The sparse FFN over a packed (neuron-major) layer, computed from memory: the semantics the offloaded
//! pipeline must reproduce.
//!
//! For each token, a neuron (a *position* in the packed hotness order) takes part when the predictor, if any,
//! marks it, and its score passes the threshold (see [`FfnActivation::is_active`]). Gates are computed per
//! cluster (the gate rows of a cluster are contiguous), up rows only for neurons whose gate passed, and down as
//! an axpy of each active neuron's (transposed) down column into the output. Buffers are position-major
//! (`[position][token]`), so that clusters write disjoint ranges and run in parallel.

use pinion_exec_cpu::sparse::{
    ClusterRows, ClusterSums, Filter, SparseAct, SparseFfn, SparseScratch, TokenActs, sparse_ffn_on,
    sparse_ffn_rows_on,
};
use pinion_exec_cpu::{self as exec, QMatrix, QuantizedActs, SpinPool};
use pinion_format::packed::PackedLayer;
use pinion_format::quant;
use pinion_predictor::LowRankPredictor;
use rayon::prelude::*;

use crate::config::FfnActivation;

/// Where a packed layer's bytes are, for a batch: a gate block and a bundle at a time.
pub(crate) trait LayerBytes: Sync {
    /// Cluster `k`'s gate rows, back to back.
    fn gate_block(&self, pl: &PackedLayer, k: usize) -> &[u8];
    /// The bundle (up row and down column) at position `pos`.
    fn bundle(&self, pl: &PackedLayer, pos: usize) -> &[u8];
}

/// A packed layer in the memory-mapped file.
#[derive(Clone, Copy)]
pub(crate) struct Mapped<'a>(pub(crate) &'a [u8]);

impl Mapped<'_> {
    /// The bytes of file range `r`.
    fn get(&self, r: std::ops::Range<u64>) -> &[u8] {
        &self.0[r.start as usize..r.end as usize]
    }
}

impl LayerBytes for Mapped<'_> {
    fn gate_block(&self, pl: &PackedLayer, k: usize) -> &[u8] {
        self.get(pl.gate_block_range(k))
    }

    fn bundle(&self, pl: &PackedLayer, pos: usize) -> &[u8] {
        self.get(pl.bundle_range(pos))
    }
}

/// Reusable buffers of [`packed_ffn`].
#[derive(Default)]
pub(crate) struct PackedScratch {
    /// Gate pre-activations, then hidden activations, `[position][token]`.
    gate: Vec<f32>,
    /// Up pre-activations, `[position][token]`.
    up: Vec<f32>,
    /// Whether (position, token) is a candidate after the gate phase, then whether it is active.
    mask: Vec<bool>,
    /// The up activations and the predictor's buffers.
    pub(crate) inputs: TokenInputs,
    /// Decode: one partial output per cluster, and the kernels' per-thread state.
    sums: Option<ClusterSums>,
    sparse: SparseScratch,
    /// Decode steps of several tokens: each token's predictor mask and partial outputs.
    row_masks: Vec<Vec<bool>>,
    row_sums: Vec<ClusterSums>,
}

/// Reusable buffers of a token's inputs to a packed layer: its activations quantized for the up type, and the
/// predictor's hidden layer, logits and mask.
#[derive(Default)]
pub(crate) struct TokenInputs {
    hidden: Vec<f32>,
    logits: Vec<f32>,
    acts_up: QuantizedActs,
    predicted: Vec<bool>,
}

/// How a packed FFN layer chooses its neurons.
#[derive(Clone, Copy)]
pub(crate) struct Selection<'a> {
    pub(crate) act: FfnActivation,
    /// Score threshold; `None`: the activation's own (0 for the ReLU family, dense for SiLU).
    pub(crate) threshold: Option<f32>,
    /// Per-neuron thresholds in position order, replacing `threshold` in the gate test (a weighted rule).
    pub(crate) neurons: Option<&'a [f32]>,
    /// A predictor whose outputs are in position order.
    pub(crate) predictor: Option<&'a LowRankPredictor>,
}

/// Computes the FFN of a batch of `n` tokens (`xn`: their normalized inputs, `n x d`) over packed layer `pl`,
/// writing the FFN outputs to `out` (`n x d`, token-major), on rayon when `parallel`. Returns the number of
/// active (neuron, token) pairs. (One token from memory runs [`packed_decode`]'s cluster kernels instead.)
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_ffn(
    model: &dyn LayerBytes,
    pl: &PackedLayer,
    sel: Selection<'_>,
    parallel: bool,
    xn: &[f32],
    acts: &mut QuantizedActs,
    s: &mut PackedScratch,
    out: &mut [f32],
) -> usize {
    let (d, ff) = (pl.d_model, pl.n_ff);
    let n = xn.len() / d;
    s.gate.resize(ff * n, 0.0);
    s.up.resize(ff * n, 0.0);
    s.mask.resize(ff * n, false);

    // Gate, cluster by cluster: a cluster's gate rows are one contiguous block.
    acts.quantize(pl.gate_ty, xn, d);
    let c = pl.cluster_neurons;
    let acts_g = &*acts;
    let gate_cluster = |k: usize, g: &mut [f32], tmp: &mut Vec<f32>| {
        let rows = pl.cluster_len(k);
        let w = QMatrix { ty: pl.gate_ty, n_rows: rows, n_cols: d, data: model.gate_block(pl, k) };
        tmp.resize(rows * n, 0.0);
        exec::matmul(&w, acts_g, tmp);
        // `tmp` is [token][row]; `g` is [row][token].
        for t in 0..n {
            for r in 0..rows {
                g[r * n + t] = tmp[t * rows + r];
            }
        }
    };
    if parallel {
        s.gate
            .par_chunks_mut(c * n)
            .enumerate()
            .for_each_init(Vec::new, |tmp, (k, g)| gate_cluster(k, g, tmp));
    } else {
        let mut tmp = Vec::new();
        for (k, g) in s.gate.chunks_mut(c * n).enumerate() {
            gate_cluster(k, g, &mut tmp);
        }
    }

    // Candidates: predicted (if a predictor is used) and passing the gate phase of the threshold.
    let t = sel.threshold.unwrap_or(0.0);
    let dense = !sel.act.is_relu_family() && sel.threshold.is_none();
    for (i, (m, &g)) in s.mask.iter_mut().zip(&s.gate).enumerate() {
        let t = sel.neurons.map_or(t, |v| v[i / n]);
        *m = match sel.act {
            // dReLU: active when relu(min(g, u)) > t; up is checked after the up phase.
            FfnActivation::Drelu => g > t,
            act => dense || act.is_active(act.score(g, 0.0), t),
        };
    }
    if let Some(p) = sel.predictor {
        s.inputs.hidden.resize(p.rank(), 0.0);
        s.inputs.logits.resize(p.n_out(), 0.0);
        for tok in 0..n {
            p.logits(&xn[tok * d..(tok + 1) * d], &mut s.inputs.hidden, &mut s.inputs.logits);
            for (pos, &l) in s.inputs.logits.iter().enumerate() {
                if l < p.threshold() {
                    s.mask[pos * n + tok] = false;
                }
            }
        }
    }

    // Up rows of the neurons with a candidate token, then the activation.
    if pl.up_ty != pl.gate_ty {
        s.inputs.acts_up.quantize(pl.up_ty, xn, d);
    }
    let acts_u = if pl.up_ty != pl.gate_ty { &s.inputs.acts_up } else { &*acts };
    let up_row_bytes = pl.up_row_bytes();
    let (act, mask) = (sel.act, &mut s.mask);
    let up_neuron = |pos: usize, g: &mut [f32], u: &mut [f32], m: &mut [bool]| -> usize {
        if !m.iter().any(|&x| x) {
            g.fill(0.0);
            return 0;
        }
        let bundle = model.bundle(pl, pos);
        let w = QMatrix { ty: pl.up_ty, n_rows: 1, n_cols: d, data: &bundle[..up_row_bytes] };
        exec::matmul_rows(&w, acts_u, 0, 1, u);
        let mut active = 0;
        for ((g, &u), m) in g.iter_mut().zip(u.iter()).zip(m.iter_mut()) {
            if act == FfnActivation::Drelu && u <= t {
                *m = false;
            }
            if *m {
                *g = match act {
                    FfnActivation::Silu => exec::silu_ggml(*g) * u,
                    FfnActivation::Gelu => exec::gelu_ggml(*g) * u,
                    FfnActivation::Relu => g.max(0.0) * u,
                    FfnActivation::Drelu => g.max(0.0) * u.max(0.0),
                };
                active += 1;
            } else {
                *g = 0.0;
            }
        }
        active
    };
    let active: usize = if parallel {
        (s.gate.par_chunks_mut(n), s.up.par_chunks_mut(n), mask.par_chunks_mut(n))
            .into_par_iter()
            .enumerate()
            .map(|(pos, (g, u, m))| up_neuron(pos, g, u, m))
            .sum()
    } else {
        s.gate
            .chunks_mut(n)
            .zip(s.up.chunks_mut(n))
            .zip(mask.chunks_mut(n))
            .enumerate()
            .map(|(pos, ((g, u), m))| up_neuron(pos, g, u, m))
            .sum()
    };

    // Down: each active neuron adds its hidden activation times its down column.
    let down_ty = pl.down_ty;
    let down_at = up_row_bytes;
    let hidden = &s.gate;
    let add_neurons = |range: std::ops::Range<usize>, acc: &mut [f32], col: &mut Vec<f32>| {
        col.resize(d, 0.0);
        for pos in range {
            let h = &hidden[pos * n..(pos + 1) * n];
            if h.iter().all(|&v| v == 0.0) {
                continue;
            }
            let bundle = model.bundle(pl, pos);
            quant::dequantize_row(down_ty, &bundle[down_at..], col)
                .expect("packed down columns are whole blocks");
            for (tok, &a) in h.iter().enumerate() {
                if a != 0.0 {
                    for (o, &v) in acc[tok * d..(tok + 1) * d].iter_mut().zip(col.iter()) {
                        *o += a * v;
                    }
                }
            }
        }
    };
    out.fill(0.0);
    if parallel {
        let parts = rayon::current_num_threads() * 4;
        let sums = (0..parts)
            .into_par_iter()
            .map(|i| {
                let mut acc = vec![0.0f32; n * d];
                let mut col = Vec::new();
                add_neurons(exec::split_range(ff, i, parts, 1), &mut acc, &mut col);
                acc
            })
            .collect::<Vec<_>>();
        for acc in sums {
            for (o, v) in out.iter_mut().zip(acc) {
                *o += v;
            }
        }
    } else {
        let mut col = Vec::new();
        add_neurons(0..ff, out, &mut col);
    }
    active
}

/// The cluster kernels' description of layer `pl` under selection `sel`.
pub(crate) fn sparse_spec(pl: &PackedLayer, sel: Selection<'_>) -> SparseFfn {
    SparseFfn {
        act: match sel.act {
            FfnActivation::Silu => SparseAct::Silu,
            FfnActivation::Gelu => SparseAct::Gelu,
            FfnActivation::Relu => SparseAct::Relu,
            FfnActivation::Drelu => SparseAct::Drelu,
        },
        threshold: sel.threshold.unwrap_or(0.0),
        d_model: pl.d_model,
        gate_ty: pl.gate_ty,
        up_ty: pl.up_ty,
        down_ty: pl.down_ty,
    }
}

/// One decode token's inputs to the cluster kernels: its activations quantized for the gate and up types (into
/// `acts` and the scratch), and its filter: the predictor's mask of positions, if a predictor is used, and the
/// rule's per-neuron thresholds, if it has any.
pub(crate) fn decode_inputs<'s>(
    pl: &PackedLayer,
    sel: Selection<'s>,
    xn: &[f32],
    acts: &'s mut QuantizedActs,
    s: &'s mut TokenInputs,
) -> (TokenActs<'s>, Filter<'s>) {
    let d = pl.d_model;
    acts.quantize(pl.gate_ty, xn, d);
    if pl.up_ty != pl.gate_ty {
        s.acts_up.quantize(pl.up_ty, xn, d);
    }
    let acts_up = if pl.up_ty != pl.gate_ty { &s.acts_up } else { &*acts };
    let mask = match sel.predictor {
        Some(p) => {
            predict_mask(p, xn, &mut s.hidden, &mut s.logits, &mut s.predicted);
            Some(&s.predicted[..pl.n_ff])
        }
        None => None,
    };
    (TokenActs { gate: acts, up: acts_up, token: 0 }, Filter { mask, thresholds: sel.neurons })
}

/// The positions predictor `p` marks for one token's FFN input `x` (its logit at or above the threshold), into
/// `mask`; `hidden` and `logits` are its scratch.
fn predict_mask(
    p: &LowRankPredictor,
    x: &[f32],
    hidden: &mut Vec<f32>,
    logits: &mut Vec<f32>,
    mask: &mut Vec<bool>,
) {
    hidden.resize(p.rank(), 0.0);
    logits.resize(p.n_out(), 0.0);
    p.logits(x, hidden, logits);
    mask.clear();
    mask.extend(logits.iter().map(|&l| l >= p.threshold()));
}

/// One token's FFN over a packed layer in memory with the cluster kernels on the spin pool: the predictor's
/// mask (if any), then per cluster gates, threshold, up and down into the cluster's own partial sum, reduced in
/// cluster order (a result that does not depend on thread timing).
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_decode(
    model: Mapped<'_>,
    pl: &PackedLayer,
    sel: Selection<'_>,
    pool: &SpinPool,
    xn: &[f32],
    acts: &mut QuantizedActs,
    s: &mut PackedScratch,
    out: &mut [f32],
) -> usize {
    let clusters: Vec<ClusterRows<'_>> = (0..pl.n_clusters()).map(|k| model.cluster_rows(pl, k)).collect();
    cluster_decode(&clusters, pl, sel, pool, xn, acts, s, out)
}

/// [`packed_decode`] over the layer's clusters wherever their bytes are (mapped, or staged by an offloaded
/// batch): the same kernels on the same bytes, so the same bits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cluster_decode(
    clusters: &[ClusterRows<'_>],
    pl: &PackedLayer,
    sel: Selection<'_>,
    pool: &SpinPool,
    xn: &[f32],
    acts: &mut QuantizedActs,
    s: &mut PackedScratch,
    out: &mut [f32],
) -> usize {
    let d = pl.d_model;
    let spec = sparse_spec(pl, sel);
    let (token, filter) = decode_inputs(pl, sel, xn, acts, &mut s.inputs);
    if s.sums.as_ref().is_none_or(|c| c.n_clusters() != clusters.len() || c.d_model() != d) {
        s.sums = Some(ClusterSums::new(clusters.len(), d));
    }
    let sums = s.sums.as_mut().expect("just made");
    sparse_ffn_on(pool, &spec, &token, clusters, filter, sums, &mut s.sparse, out)
}

/// Several decode tokens' FFN (`xn`: `n x d_model`) over a layer's clusters, each token's output row with the
/// bits [`cluster_decode`] gives it alone: the same inputs per token (activations quantized row by row, its own
/// predictor mask, the rule's thresholds), the cluster kernels run cluster by cluster for all tokens
/// (`sparse_ffn_rows_on`), so each cluster's weights are fetched once per step. Returns the number of active
/// (neuron, token) pairs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cluster_decode_rows(
    clusters: &[ClusterRows<'_>],
    pl: &PackedLayer,
    sel: Selection<'_>,
    pool: &SpinPool,
    xn: &[f32],
    acts: &mut QuantizedActs,
    s: &mut PackedScratch,
    out: &mut [f32],
) -> usize {
    let d = pl.d_model;
    let n = xn.len() / d;
    let spec = sparse_spec(pl, sel);
    acts.quantize(pl.gate_ty, xn, d);
    if pl.up_ty != pl.gate_ty {
        s.inputs.acts_up.quantize(pl.up_ty, xn, d);
    }
    let acts_up = if pl.up_ty != pl.gate_ty { &s.inputs.acts_up } else { &*acts };
    s.row_masks.resize_with(n, Vec::new);
    if let Some(p) = sel.predictor {
        for (x, m) in xn.chunks_exact(d).zip(&mut s.row_masks) {
            predict_mask(p, x, &mut s.inputs.hidden, &mut s.inputs.logits, m);
        }
    }
    let filters: Vec<Filter<'_>> = s.row_masks[..n]
        .iter()
        .map(|m| Filter { mask: sel.predictor.map(|_| &m[..pl.n_ff]), thresholds: sel.neurons })
        .collect();
    if s.row_sums.len() < n || s.row_sums.iter().any(|c| c.n_clusters() != clusters.len() || c.d_model() != d)
    {
        s.row_sums = (0..n).map(|_| ClusterSums::new(clusters.len(), d)).collect();
    }
    let tokens: Vec<TokenActs<'_>> =
        (0..n).map(|token| TokenActs { gate: acts, up: acts_up, token }).collect();
    sparse_ffn_rows_on(pool, &spec, &tokens, clusters, &filters, &mut s.row_sums[..n], &mut s.sparse, out)
}

impl<'a> Mapped<'a> {
    /// Cluster `k`'s gate block and bundles in the mapped file.
    pub(crate) fn cluster_rows(&self, pl: &PackedLayer, k: usize) -> ClusterRows<'a> {
        let first = pl.bundle_range(k * pl.cluster_neurons);
        let last = pl.bundle_range(k * pl.cluster_neurons + pl.cluster_len(k) - 1);
        let bytes = self.0;
        let get = |r: std::ops::Range<u64>| &bytes[r.start as usize..r.end as usize];
        ClusterRows {
            gate: get(pl.gate_block_range(k)),
            bundles: get(first.start..last.end),
            bundle_stride: pl.bundle_bytes(),
        }
    }
}
