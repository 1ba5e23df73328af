//! The forward pass of a batch of tokens through the model: embeddings, attention, FFN, output head.
//!
//! Where each weight comes from is decided in one place each: attention weights from the mapped file, or
//! from an offloaded run's fixed region ([`Weights`]); the FFN from a dense GGUF layer, a packed layer in memory,
//! or an offloaded packed layer; a mixture of experts' experts likewise, each a dense GGUF expert or a packed
//! FFN unit ([`packed_unit`]). Dense batched products (prefill, perplexity) go through the
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
use crate::model::{FfnWeights, LayerWeights, Model, WeightRef};
use crate::moe::{self, FfnBuffers, MoeScratch};
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
    debug_assert_eq!(segs.iter().map(|g| g.len).sum::<usize>(), tokens.len(), "segments cover the tokens");
    embed(model, ffn.offload.as_deref_mut(), s, tokens)?;
    run_layers(model, par, &mut ffn, s, kv, segs, batch, 0..model.layers.len())?;
    head(model, par, ffn.offload, s, tokens.len(), which, logits_offset)
}

/// The embeddings of `tokens` (scaled where the architecture scales them) into `s.x`.
pub(crate) fn embed(
    model: &Model,
    mut offload: Option<&mut Offload>,
    s: &mut Scratch,
    tokens: &[u32],
) -> Result<(), RuntimeError> {
    let d = model.config().d_model;
    let x = &mut s.x[..tokens.len() * d];
    for (t, &tok) in tokens.iter().enumerate() {
        match offload.as_deref_mut() {
            Some(o) => o.embed(model, tok, &mut x[t * d..(t + 1) * d])?,
            None => model.embed(tok, &mut x[t * d..(t + 1) * d])?,
        }
    }
    if model.config().spec.scale_embeddings {
        let k = (d as f32).sqrt();
        x.iter_mut().for_each(|v| *v *= k);
    }
    Ok(())
}

/// Runs the hidden states of the rows of `segs` (in `s.x`) through the transformer blocks `layers`: each
/// block's keys and values go to the rows' sequences' caches in `kv` (see [`forward`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_layers(
    model: &Model,
    par: Par<'_>,
    ffn: &mut Ffn<'_>,
    s: &mut Scratch,
    kv: &mut [Kv],
    segs: &[Segment],
    batch: usize,
    layers: std::ops::Range<usize>,
) -> Result<(), RuntimeError> {
    let c = model.config();
    let n = segs.iter().map(|g| g.len).sum::<usize>();
    let (d, kvd, qd, ff) = (c.d_model, c.kv_dim(), c.n_heads * c.head_dim, c.n_ff);
    let x = &mut s.x[..n * d];
    let spec = c.spec;
    // Scores are scaled in attention, or the queries before it (and the scores by 1).
    let scale = if spec.scale_queries { 1.0 } else { c.attn_scale };
    for l in layers {
        let layer = &model.layers[l];
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
        let (thresholds, neuron_thresholds, predictors) =
            (ffn.thresholds, ffn.neuron_thresholds, ffn.predictors);
        let sel = |u: usize| Selection {
            act: c.ffn_act,
            threshold: thresholds.map(|t| t[u]),
            neurons: neuron_thresholds.get(u).map(|t| &t[..]),
            predictor: predictors.map(|p| &p[u]),
        };
        // The rule's thresholds of unit `u` for the dense paths: per neuron, or the unit's one.
        let rule = |u: usize| thresholds.map(|t| sel(u).neurons.unwrap_or(std::slice::from_ref(&t[u])));
        let out = &mut s.tmp[..n * d];
        let matmul = |w: &QMatrix<'_>, a: &QuantizedActs, o: &mut [f32]| par.matmul(w, a, o);
        match &layer.ffn {
            FfnWeights::Dense { gate, up, down } => {
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
                c.ffn_act.apply(&mut s.gate[..n * ff], &s.up[..n * ff], rule(l));
                s.acts.quantize(wd.ty, &s.gate[..n * ff], ff);
                par.matmul(&wd, &s.acts, out)?;
            }
            FfnWeights::Moe(mw) => {
                moe::route(&model.matrix(&mw.router), &matmul, mw.cfg, xn, &mut s.moe, &mut s.acts)?;
                let mut profile = ffn.profile.as_deref_mut();
                if let Some(p) = profile.as_deref_mut().filter(|_| l == 0) {
                    p.add_tokens(n);
                }
                let (acts, gate, up) = (&mut s.acts, &mut s.gate, &mut s.up);
                let mut expert =
                    |e: usize, _: Option<usize>, rows: &[f32], o: &mut [f32], cnt: &mut [u32]| {
                        let b = FfnBuffers { acts: &mut *acts, gate: &mut gate[..], up: &mut up[..] };
                        let u = c.unit(l, e);
                        let rec = profile.as_deref_mut().map(|p| (p, u));
                        moe::dense_expert(model, &matmul, mw, e, c.ffn_act, rule(u), rec, rows, b, o, cnt)
                    };
                moe::run_experts(mw.cfg, xn, &mut s.moe, &mut expert, out)?;
            }
            FfnWeights::Packed(pl) => {
                let next = (l + 1 < model.layers.len()).then_some(l + 1);
                let o = ffn.offload.as_deref_mut();
                let unit = Unit { u: l, pl, sel: sel(l), next, step: n == 1 };
                packed_unit(model, par, o, unit, xn, &mut s.acts, &mut s.packed, out)?;
            }
            FfnWeights::PackedMoe(pm) => {
                if ffn.profile.is_some() {
                    return Err(RuntimeError::ProfilePacked);
                }
                let w = Weights { model, offload: ffn.offload.as_deref() };
                moe::route(&w.matrix(&pm.router), &matmul, pm.cfg, xn, &mut s.moe, &mut s.acts)?;
                let (acts, packed, mut offload) = (&mut s.acts, &mut s.packed, ffn.offload.as_deref_mut());
                let mut expert =
                    |e: usize, next: Option<usize>, rows: &[f32], o: &mut [f32], cnt: &mut [u32]| {
                        let u = c.unit(l, e);
                        let next = next.map(|e| c.unit(l, e));
                        let unit = Unit { u, pl: &pm.experts[e], sel: sel(u), next, step: n == 1 };
                        let active =
                            packed_unit(model, par, offload.as_deref_mut(), unit, rows, acts, packed, o)?;
                        if let [one] = cnt {
                            *one = active as u32;
                        }
                        Ok(())
                    };
                moe::run_experts(pm.cfg, xn, &mut s.moe, &mut expert, out)?;
            }
        }
        continue_layer(&mut s.tmp[..n * d], &mut s.xn[..n * d], layer, c.rms_eps, x);
    }
    Ok(())
}

/// The output head over the last hidden states of a pass of `n` rows (in `s.x`), for the rows `which` asks
/// for, into `s.logits[logits_offset..]` (nothing without an offset).
fn head(
    model: &Model,
    par: Par<'_>,
    offload: Option<&mut Offload>,
    s: &mut Scratch,
    n: usize,
    which: Logits,
    logits_offset: Option<usize>,
) -> Result<(), RuntimeError> {
    let Some(offset) = logits_offset else { return Ok(()) };
    let (c, d) = (model.config(), model.config().d_model);
    let x = &s.x[..n * d];
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
    match offload {
        Some(o) => {
            o.head(model, &|w, a, out| par.head_matmul(w, a, out), &s.acts, logits, &mut s.head_tmp)?
        }
        None => par.head_matmul(&model.matrix(&model.output), &s.acts, logits),
    }
    Ok(())
}

/// One packed FFN unit of a pass: unit `u` (a layer's FFN, or one expert's), its records, how it chooses its
/// neurons, the unit the pass runs next (read ahead by an offloaded prefill), and whether the pass is one
/// token's decode step (an expert given one row of a pass of several is not: that pass stages its units).
struct Unit<'a> {
    u: usize,
    pl: &'a PackedLayer,
    sel: Selection<'a>,
    next: Option<usize>,
    step: bool,
}

/// A packed FFN unit over the rows of `xn` (`out`: as many rows): from the mapped file, or offloaded. One row on
/// the spin pool is a decode step (the cluster pipeline when offloaded); several rows on the spin pool are decode
/// steps of several sequences (the unit's records read once, then each row as its own step); a batch runs the
/// batched sparse FFN. Returns the neurons used (one row), else 0.
#[allow(clippy::too_many_arguments)]
fn packed_unit(
    model: &Model,
    par: Par<'_>,
    offload: Option<&mut Offload>,
    unit: Unit<'_>,
    xn: &[f32],
    acts: &mut QuantizedActs,
    packed: &mut PackedScratch,
    out: &mut [f32],
) -> Result<usize, RuntimeError> {
    let Unit { u, pl, sel, next, step } = unit;
    Ok(match (offload, par) {
        (None, Par::Spin(pool)) if step => {
            packed_decode(Mapped(model.ffn_bytes()), pl, sel, pool, xn, acts, packed, out)
        }
        (None, Par::Spin(pool)) => {
            // Decode steps of several sequences: each row as its own step would compute it.
            let bytes = Mapped(model.ffn_bytes());
            let clusters: Vec<_> = (0..pl.n_clusters()).map(|k| bytes.cluster_rows(pl, k)).collect();
            cluster_decode_rows(&clusters, pl, sel, pool, xn, acts, packed, out);
            0
        }
        (None, Par::Batch(_)) => {
            packed_ffn(&Mapped(model.ffn_bytes()), pl, sel, true, xn, acts, packed, out);
            0
        }
        (Some(o), Par::Spin(pool)) if step => {
            let spec = sparse_spec(pl, sel);
            let (token, filter) = decode_inputs(pl, sel, xn, acts, &mut packed.inputs);
            o.decode_ffn(model, u, &spec, &token, filter, pool, out)?
        }
        (Some(o), Par::Spin(pool)) => {
            // Decode steps of several sequences: the unit is read once for all of them (the union of their
            // neurons is nearly all of them), then each row runs the cluster kernels on it.
            let staged = o.stage_layer(model, u, next)?;
            let clusters: Vec<_> = (0..pl.n_clusters()).map(|k| staged.cluster_rows(pl, k)).collect();
            cluster_decode_rows(&clusters, pl, sel, pool, xn, acts, packed, out);
            0
        }
        (Some(o), Par::Batch(_)) => {
            let bytes = o.stage_layer(model, u, next)?;
            packed_ffn(&bytes, pl, sel, true, xn, acts, packed, out);
            0
        }
    })
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
