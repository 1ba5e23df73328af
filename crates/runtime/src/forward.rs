//! The forward pass of a batch of tokens through the model: embeddings, attention, FFN, output head.
//!
//! Where each weight comes from is decided in one place each: attention weights from the mapped file, or
//! from an offloaded run's fixed region ([`Weights`]); the FFN from a dense GGUF layer, a packed layer in memory,
//! or an offloaded packed layer ([`FfnSource`]). Dense batched products (prefill, perplexity) go through the
//! context's dense executor (`pinion_exec_cpu::DenseBackend`: the CPU, or the NPU-role static-shape executor);
//! a single token runs on the spin pool.

use half::f16;
use pinion_exec_cpu::{self as exec, DenseBackend, QMatrix, QuantizedActs, SpinPool};
use pinion_format::packed::PackedLayer;
use pinion_predictor::{ActivationProfile, LowRankPredictor};

use crate::error::RuntimeError;
use crate::ffn::{
    Mapped, PackedScratch, Selection, cluster_decode_rows, decode_inputs, packed_decode, packed_ffn,
    sparse_spec,
};
use crate::model::{FfnWeights, LayerWeights, Model, MoeWeights, WeightRef};
use crate::moe::{FfnBuffers, MoeScratch, moe_ffn};
use crate::offload::Offload;

/// What [`Context::eval`](crate::Context::eval) returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token of the input (generation).
    Last,
    /// Every token of the input (perplexity).
    All,
}

/// Scratch buffers of a forward pass.
pub(crate) struct Scratch {
    pub(crate) x: Vec<f32>,
    pub(crate) xn: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) acts: QuantizedActs,
    pub(crate) logits: Vec<f32>,
    pub(crate) packed: PackedScratch,
    /// Streamed output head rows of a batch.
    pub(crate) head_tmp: Vec<f32>,
    /// One attention head's values (per-head norms).
    pub(crate) head: Vec<f32>,
    /// The mixture-of-experts FFN's buffers (empty for a dense model).
    pub(crate) moe: MoeScratch,
}

/// One sequence's KV cache: keys and values per layer (f16, `n_ctx x kv_dim`), and how many tokens it holds.
pub(crate) struct Kv {
    pub(crate) k: Vec<Vec<f16>>,
    pub(crate) v: Vec<Vec<f16>>,
    pub(crate) n_past: usize,
}

impl Kv {
    /// An empty cache of `n_ctx` rows of `kv_dim` per layer. The allocations are zeroed, so pages are only
    /// backed by memory once the cache reaches them: a large context costs memory only as it fills.
    pub(crate) fn new(n_layers: usize, n_ctx: usize, kv_dim: usize) -> Kv {
        let rows = n_ctx * kv_dim;
        Kv {
            k: (0..n_layers).map(|_| bytemuck::allocation::zeroed_vec(rows)).collect(),
            v: (0..n_layers).map(|_| bytemuck::allocation::zeroed_vec(rows)).collect(),
            n_past: 0,
        }
    }
}

/// Consecutive rows of a forward pass that belong to one sequence, at positions `pos..pos + len` of it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segment {
    pub(crate) seq: usize,
    pub(crate) pos: usize,
    pub(crate) len: usize,
}

/// Which pool a forward pass runs its parallel operations on.
#[derive(Clone, Copy)]
pub(crate) enum Par<'a> {
    /// A batch: the dense executor, inside the rayon pool the pass was installed on.
    Batch(&'a dyn DenseBackend),
    /// One token: a spinning pool, driven from the calling thread.
    Spin(&'a SpinPool),
}

impl Par<'_> {
    fn matmul(self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) -> Result<(), RuntimeError> {
        match self {
            Par::Batch(d) => d.matmul(w, acts, out)?,
            Par::Spin(p) => exec::matmul_on(p, w, acts, out),
        }
        Ok(())
    }

    /// The output head's product: on the CPU for a batch (a static-shape executor would pad the
    /// vocabulary-wide output of every row).
    fn head_matmul(self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) {
        match self {
            Par::Batch(_) => exec::matmul(w, acts, out),
            Par::Spin(p) => exec::matmul_on(p, w, acts, out),
        }
    }
}

/// How the FFN chooses its neurons, and whether its activations are recorded.
pub(crate) struct Ffn<'a> {
    /// Per layer, the rule's threshold (`None`: no rule).
    pub(crate) thresholds: Option<&'a [f32]>,
    /// Per layer, the rule's per-neuron thresholds in the order of the layer's weights (empty: none).
    pub(crate) neuron_thresholds: &'a [Vec<f32>],
    pub(crate) predictors: Option<&'a [LowRankPredictor]>,
    pub(crate) profile: Option<&'a mut ActivationProfile>,
    pub(crate) offload: Option<&'a mut Offload>,
}

/// Where the weights of a pass come from: the mapped model, or an offloaded run's fixed region.
struct Weights<'a> {
    model: &'a Model,
    offload: Option<&'a Offload>,
}

impl Weights<'_> {
    fn matrix(&self, w: &WeightRef) -> QMatrix<'_> {
        match self.offload {
            Some(o) => o.matrix(w),
            None => self.model.matrix(w),
        }
    }
}

/// Where one layer's FFN comes from for this pass.
enum FfnSource<'a> {
    /// The three dense matrices of a GGUF.
    Dense { gate: &'a WeightRef, up: &'a WeightRef, down: &'a WeightRef },
    /// A packed layer in the mapped file.
    Packed(&'a PackedLayer),
    /// A packed layer of an offloaded run.
    Offloaded(&'a PackedLayer),
    /// A mixture of experts of a GGUF (in memory only).
    Moe(&'a MoeWeights),
}

impl<'a> FfnSource<'a> {
    fn of(layer: &'a LayerWeights, offloaded: bool) -> FfnSource<'a> {
        match (&layer.ffn, offloaded) {
            (FfnWeights::Dense { gate, up, down }, _) => FfnSource::Dense { gate, up, down },
            (FfnWeights::Packed(pl), false) => FfnSource::Packed(pl),
            (FfnWeights::Packed(pl), true) => FfnSource::Offloaded(pl),
            (FfnWeights::Moe(m), _) => FfnSource::Moe(m),
        }
    }
}

/// Runs `tokens` through the model: the rows of each of `segs` (in order, covering `tokens`) go to their
/// sequence's KV cache in `kv` at their positions and attend to it. `batch` is the length of the `n_ubatch`
/// batch a one-segment pass belongs to (attention chooses its kernel by it); a pass of several segments runs
/// on the spin pool, each row as a one-token step of its sequence would (the same bits). Logits of the rows
/// `which` asks for go to `s.logits[logits_offset..]` when `logits_offset` is given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    model: &Model,
    par: Par<'_>,
    mut ffn: Ffn<'_>,
    s: &mut Scratch,
    kv: &mut [Kv],
    tokens: &[u32],
    segs: &[Segment],
    batch: usize,
    which: Logits,
    logits_offset: Option<usize>,
) -> Result<(), RuntimeError> {
    let c = model.config();
    let n = tokens.len();
    debug_assert_eq!(segs.iter().map(|g| g.len).sum::<usize>(), n, "segments cover the tokens");
    let (d, kvd, qd, ff) = (c.d_model, c.kv_dim(), c.n_heads * c.head_dim, c.n_ff);
    let x = &mut s.x[..n * d];
    for (t, &tok) in tokens.iter().enumerate() {
        match ffn.offload.as_deref_mut() {
            Some(o) => o.embed(model, tok, &mut x[t * d..(t + 1) * d])?,
            None => model.embed(tok, &mut x[t * d..(t + 1) * d])?,
        }
    }
    let spec = c.spec;
    if spec.scale_embeddings {
        let k = (d as f32).sqrt();
        x.iter_mut().for_each(|v| *v *= k);
    }
    // Scores are scaled in attention, or the queries before it (and the scores by 1).
    let scale = if spec.scale_queries { 1.0 } else { c.attn_scale };
    for (l, layer) in model.layers.iter().enumerate() {
        let (rope_base, rope_scale, window) = (c.rope_base(l), c.rope_scale(l), c.window(l));
        // Attention.
        let w = Weights { model, offload: ffn.offload.as_deref() };
        let xn = &mut s.xn[..n * d];
        for t in 0..n {
            exec::rms_norm(&x[t * d..(t + 1) * d], &layer.attn_norm, c.rms_eps, &mut xn[t * d..(t + 1) * d]);
        }
        let (wq, wk, wv) = (w.matrix(&layer.wq), w.matrix(&layer.wk), w.matrix(&layer.wv));
        s.acts.quantize(wq.ty, xn, d);
        par.matmul(&wq, &s.acts, &mut s.q[..n * qd])?;
        if wk.ty != wq.ty {
            s.acts.quantize(wk.ty, xn, d);
        }
        par.matmul(&wk, &s.acts, &mut s.k[..n * kvd])?;
        if wv.ty != wk.ty {
            s.acts.quantize(wv.ty, xn, d);
        }
        par.matmul(&wv, &s.acts, &mut s.v[..n * kvd])?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            for (out, b) in [(&mut s.q[..n * qd], bq), (&mut s.k[..n * kvd], bk), (&mut s.v[..n * kvd], bv)] {
                for row in out.chunks_exact_mut(b.len()) {
                    add_assign(row, b);
                }
            }
        }
        let rows = segs.iter().flat_map(|g| (0..g.len).map(move |i| (g.seq, g.pos + i)));
        for (t, (seq, pos)) in rows.enumerate() {
            let q = &mut s.q[t * qd..(t + 1) * qd];
            let k = &mut s.k[t * kvd..(t + 1) * kvd];
            if let Some((qn, kn)) = &layer.qk_norm {
                for (x, w) in q
                    .chunks_exact_mut(c.head_dim)
                    .map(|h| (h, qn))
                    .chain(k.chunks_exact_mut(c.head_dim).map(|h| (h, kn)))
                {
                    exec::rms_norm(x, w, c.rms_eps, &mut s.head);
                    x.copy_from_slice(&s.head);
                }
            }
            let factors = model.rope_factors.as_deref();
            exec::rope(q, c.n_heads, c.head_dim, c.n_rot, pos, rope_base, rope_scale, factors, spec.rope);
            exec::rope(k, c.n_kv_heads, c.head_dim, c.n_rot, pos, rope_base, rope_scale, factors, spec.rope);
            if spec.scale_queries {
                q.iter_mut().for_each(|v| *v *= c.attn_scale);
            }
            let kc = &mut kv[seq].k[l][pos * kvd..(pos + 1) * kvd];
            for (dst, &src) in kc.iter_mut().zip(k.iter()) {
                *dst = f16::from_f32(src);
            }
            let vc = &mut kv[seq].v[l][pos * kvd..(pos + 1) * kvd];
            for (dst, &src) in vc.iter_mut().zip(&s.v[t * kvd..(t + 1) * kvd]) {
                *dst = f16::from_f32(src);
            }
        }
        // Mirror llama.cpp's choice: f16-accumulating flash attention for short batches, f32 for long ones. The
        // batch is the `n_ubatch` batch this pass is part of (`Context::chunks`).
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let mut r0 = 0;
        for g in segs {
            let (rows, at) = (r0 * qd..(r0 + g.len) * qd, g.pos);
            let (q, attn) = (&s.q[rows.clone()], &mut s.attn[rows]);
            let (kc, vc, m) = (&kv[g.seq].k[l][..], &kv[g.seq].v[l][..], g.len);
            match par {
                Par::Spin(p) => {
                    exec::attention_f16acc_on(p, q, m, at, nh, nkv, hd, kc, vc, scale, window, attn)
                }
                Par::Batch(_) if batch < exec::GGML_FA_TILE_Q => {
                    exec::attention_f16acc(q, m, at, nh, nkv, hd, kc, vc, scale, window, attn)
                }
                Par::Batch(_) => exec::attention(q, m, at, nh, nkv, hd, kc, vc, scale, window, attn),
            }
            r0 += g.len;
        }
        let attn = &s.attn[..n * qd];
        let wo = w.matrix(&layer.wo);
        s.acts.quantize(wo.ty, attn, qd);
        par.matmul(&wo, &s.acts, &mut s.tmp[..n * d])?;
        if let Some((post_attn, _)) = &layer.post_norms {
            norm_rows(&mut s.tmp[..n * d], &mut s.xn[..n * d], post_attn, c.rms_eps);
        }
        add_assign(x, &s.tmp[..n * d]);

        // Feed-forward.
        let xn = &mut s.xn[..n * d];
        for t in 0..n {
            exec::rms_norm(&x[t * d..(t + 1) * d], &layer.ffn_norm, c.rms_eps, &mut xn[t * d..(t + 1) * d]);
        }
        let neurons = ffn.neuron_thresholds.get(l).map(|t| &t[..]);
        let sel = |_: &PackedLayer| Selection {
            act: c.ffn_act,
            threshold: ffn.thresholds.map(|t| t[l]),
            neurons,
            predictor: ffn.predictors.map(|p| &p[l]),
        };
        let out = &mut s.tmp[..n * d];
        match (FfnSource::of(layer, ffn.offload.is_some()), par) {
            (FfnSource::Dense { gate, up, down }, _) => {
                let (wg, wu, wd) = (model.matrix(gate), model.matrix(up), model.matrix(down));
                s.acts.quantize(wg.ty, xn, d);
                par.matmul(&wg, &s.acts, &mut s.gate[..n * ff])?;
                if wu.ty != wg.ty {
                    s.acts.quantize(wu.ty, xn, d);
                }
                par.matmul(&wu, &s.acts, &mut s.up[..n * ff])?;
                if let Some(p) = ffn.profile.as_deref_mut() {
                    let act = c.ffn_act;
                    let scores: Vec<f32> = s.gate[..n * ff]
                        .iter()
                        .zip(&s.up[..n * ff])
                        .map(|(&g, &u)| act.score(g, u))
                        .collect();
                    p.record_scores(l, &s.xn[..n * d], &scores);
                    p.record_up(l, &s.up[..n * ff]);
                }
                let t = ffn.thresholds.map(|t| neurons.unwrap_or(std::slice::from_ref(&t[l])));
                c.ffn_act.apply(&mut s.gate[..n * ff], &s.up[..n * ff], t);
                s.acts.quantize(wd.ty, &s.gate[..n * ff], ff);
                par.matmul(&wd, &s.acts, out)?;
            }
            (FfnSource::Moe(mw), _) => {
                if ffn.profile.is_some() {
                    return Err(RuntimeError::MoeInMemoryOnly { what: "profiling activations" });
                }
                let b = FfnBuffers { acts: &mut s.acts, gate: &mut s.gate, up: &mut s.up };
                let matmul = |w: &QMatrix<'_>, a: &QuantizedActs, o: &mut [f32]| par.matmul(w, a, o);
                moe_ffn(model, &matmul, mw, c.ffn_act, xn, &mut s.moe, b, out)?;
            }
            (FfnSource::Packed(pl), Par::Spin(pool)) if n == 1 => {
                packed_decode(
                    Mapped(model.ffn_bytes()),
                    pl,
                    sel(pl),
                    pool,
                    xn,
                    &mut s.acts,
                    &mut s.packed,
                    out,
                );
            }
            (FfnSource::Packed(pl), Par::Spin(pool)) => {
                // Decode steps of several sequences: each row as its own step would compute it.
                let bytes = Mapped(model.ffn_bytes());
                let clusters: Vec<_> = (0..pl.n_clusters()).map(|k| bytes.cluster_rows(pl, k)).collect();
                cluster_decode_rows(&clusters, pl, sel(pl), pool, xn, &mut s.acts, &mut s.packed, out);
            }
            (FfnSource::Packed(pl), Par::Batch(_)) => {
                let bytes = Mapped(model.ffn_bytes());
                packed_ffn(&bytes, pl, sel(pl), true, xn, &mut s.acts, &mut s.packed, out);
            }
            (FfnSource::Offloaded(pl), Par::Spin(pool)) => {
                let o = ffn.offload.as_deref_mut().ok_or(RuntimeError::NotPacked)?;
                if n > 1 {
                    // Decode steps of several sequences: the layer is read once for all of them (the union of
                    // their neurons is nearly all of them), then each row runs the cluster kernels on it.
                    let staged = o.stage_layer(model, l)?;
                    let clusters: Vec<_> = (0..pl.n_clusters()).map(|k| staged.cluster_rows(pl, k)).collect();
                    cluster_decode_rows(&clusters, pl, sel(pl), pool, xn, &mut s.acts, &mut s.packed, out);
                    continue_layer(&mut s.tmp[..n * d], &mut s.xn[..n * d], layer, c.rms_eps, x);
                    continue;
                }
                let spec = sparse_spec(pl, sel(pl));
                let (token, filter) = decode_inputs(pl, sel(pl), xn, &mut s.acts, &mut s.packed.inputs);
                o.decode_ffn(model, l, &spec, &token, filter, pool, out)?;
            }
            (FfnSource::Offloaded(pl), Par::Batch(_)) => {
                let o = ffn.offload.as_deref_mut().ok_or(RuntimeError::NotPacked)?;
                let bytes = o.stage_layer(model, l)?;
                packed_ffn(&bytes, pl, sel(pl), true, xn, &mut s.acts, &mut s.packed, out);
            }
        }
        continue_layer(&mut s.tmp[..n * d], &mut s.xn[..n * d], layer, c.rms_eps, x);
    }

    // Output head, only for the rows whose logits are wanted.
    let Some(offset) = logits_offset else { return Ok(()) };
    let rows = match which {
        Logits::All => 0..n,
        Logits::Last => n - 1..n,
    };
    let n_out = rows.len();
    let xn = &mut s.xn[..n_out * d];
    for (i, t) in rows.enumerate() {
        exec::rms_norm(&x[t * d..(t + 1) * d], &model.output_norm, c.rms_eps, &mut xn[i * d..(i + 1) * d]);
    }
    s.acts.quantize(model.output.ty, xn, d);
    let logits = &mut s.logits[offset..offset + n_out * c.n_vocab];
    match ffn.offload {
        Some(o) => {
            o.head(model, &|w, a, out| par.head_matmul(w, a, out), &s.acts, logits, &mut s.head_tmp)?
        }
        None => par.head_matmul(&model.matrix(&model.output), &s.acts, logits),
    }
    Ok(())
}

/// The end of a layer: the FFN output `out` (post-normalized where the architecture asks, `tmp` its scratch)
/// added to the residual stream `x`.
fn continue_layer(out: &mut [f32], tmp: &mut [f32], layer: &LayerWeights, eps: f32, x: &mut [f32]) {
    if let Some((_, post_ffn)) = &layer.post_norms {
        norm_rows(out, tmp, post_ffn, eps);
    }
    add_assign(x, out);
}

/// RMS-normalizes each row of `x` in place with weights `w` (`tmp`: scratch of `x`'s length).
fn norm_rows(x: &mut [f32], tmp: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for (row, t) in x.chunks_exact_mut(d).zip(tmp.chunks_exact_mut(d)) {
        exec::rms_norm(row, w, eps, t);
        row.copy_from_slice(t);
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
