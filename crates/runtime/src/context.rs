//! The inference context: KV cache, scratch buffers, thread pool, and the dense forward pass.

use std::borrow::Cow;

use half::f16;
use pinion_exec_cpu::{self as exec, QMatrix, QuantizedActs, RopeMode, SpinPool};
use pinion_predictor::{ActivationProfile, LowRankPredictor};

use crate::error::RuntimeError;
use crate::ffn::{PackedScratch, Selection, decode_inputs, packed_ffn, sparse_spec};
use crate::model::{FfnWeights, Model};
use crate::offload::{Held, MemoryPlan, Offload, OffloadOptions, OffloadStats, current_rss, plan_memory};

/// Largest number of tokens evaluated in one forward pass (llama.cpp's default `n_ubatch`).
pub const DEFAULT_UBATCH: usize = 512;

/// Settings of a [`Context`].
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Context size in tokens (KV cache rows).
    pub n_ctx: usize,
    /// Compute threads.
    pub n_threads: usize,
    /// Most tokens per forward pass; longer inputs are split.
    pub n_ubatch: usize,
}

impl ContextParams {
    /// Settings for a context of `n_ctx` tokens on `n_threads` threads, with the default batch size.
    pub fn new(n_ctx: usize, n_threads: usize) -> ContextParams {
        ContextParams { n_ctx, n_threads, n_ubatch: DEFAULT_UBATCH }
    }

    /// Bytes of the KV cache of a full context (f16 keys and values for every layer).
    pub fn kv_bytes(&self, c: &crate::ModelConfig) -> u64 {
        (2 * 2 * c.n_layers * self.n_ctx * c.kv_dim()) as u64
    }

    /// Bytes of the scratch buffers (activations, logits) a context allocates.
    pub fn scratch_bytes(&self, c: &crate::ModelConfig) -> u64 {
        let ub = self.n_ubatch.clamp(1, self.n_ctx.max(1));
        let (d, qd) = (c.d_model, c.n_heads * c.head_dim);
        let floats = ub * (3 * d + d.max(qd) + 2 * qd + 2 * c.kv_dim() + 4 * c.n_ff) + c.n_vocab;
        // f32 values, plus the quantized copy of the widest activation row.
        (4 * floats + ub * c.n_ff.max(d) * 2) as u64
    }
}

/// What [`Context::eval`] returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token of the input (generation).
    Last,
    /// Every token of the input (perplexity).
    All,
}

struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: QuantizedActs,
    logits: Vec<f32>,
    packed: PackedScratch,
    /// Streamed output head rows of a batch.
    head_tmp: Vec<f32>,
}

/// A model plus the state of one sequence: the KV cache and the number of tokens it holds.
///
/// All buffers are allocated when the context is made; evaluating tokens allocates nothing (except the
/// all-token logits buffer, which grows once to its largest size, and, in an offloaded context, one list of
/// cluster locks per layer and the io engine's per-read bookkeeping).
pub struct Context<'m> {
    model: &'m Model,
    params: ContextParams,
    /// Most tokens in one forward pass: `params.n_ubatch`, or less for an offloaded run (see [`Context::chunks`]).
    chunk_cap: usize,
    k_cache: Vec<Vec<f16>>,
    v_cache: Vec<Vec<f16>>,
    n_past: usize,
    scratch: Scratch,
    /// Work-stealing pool for batches (prefill, perplexity).
    pool: rayon::ThreadPool,
    /// Spinning pool for single-token steps (decode), whose operations are too short for rayon's wake-ups.
    spin: SpinPool,
    /// Per-layer thresholds on neuron scores (CATS for SiLU): neurons below are skipped. `None`: dense.
    thresholds: Option<Vec<f32>>,
    /// Per-layer predictors (packed models only): neurons they do not mark are skipped. Borrowed from the
    /// model unless set with [`Context::set_predictors`].
    predictors: Option<Cow<'m, [LowRankPredictor]>>,
    /// An offloaded run: the FFN streamed from storage under a memory budget.
    offload: Option<Offload>,
    /// The offloaded run could not be set up again (`set_predictors`): evaluating is refused rather than run
    /// from memory, over the budget.
    offload_lost: bool,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("params", &self.params).field("n_past", &self.n_past).finish()
    }
}

impl<'m> Context<'m> {
    /// Makes a context for `model`.
    pub fn new(model: &'m Model, params: ContextParams) -> Result<Context<'m>, RuntimeError> {
        Context::with_chunk_cap(model, params, usize::MAX)
    }

    /// [`Context::new`] with forward passes of at most `chunk_cap` tokens.
    fn with_chunk_cap(
        model: &'m Model,
        params: ContextParams,
        chunk_cap: usize,
    ) -> Result<Context<'m>, RuntimeError> {
        let c = model.config();
        if params.n_ctx == 0 {
            return Err(RuntimeError::BadContextSize { n_ctx: 0, why: "it must be at least 1".into() });
        }
        if params.n_ctx > c.n_ctx_train.max(1 << 16) {
            return Err(RuntimeError::BadContextSize {
                n_ctx: params.n_ctx,
                why: format!("the model was trained for {} tokens", c.n_ctx_train),
            });
        }
        if params.n_threads == 0 {
            return Err(RuntimeError::Threads { n: 0, why: "need at least one".into() });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(params.n_threads)
            .thread_name(|i| format!("pinion-compute-{i}"))
            .build()
            .map_err(|e| RuntimeError::Threads { n: params.n_threads, why: e.to_string() })?;
        let spin = SpinPool::new(params.n_threads)
            .map_err(|e| RuntimeError::Threads { n: params.n_threads, why: e.to_string() })?;
        let params = ContextParams { n_ubatch: params.n_ubatch.clamp(1, params.n_ctx), ..params };
        let ub = params.n_ubatch.min(chunk_cap.max(3));
        let kv = params.n_ctx * c.kv_dim();
        let d = c.d_model;
        let qd = c.n_heads * c.head_dim;
        let scratch = Scratch {
            x: vec![0.0; ub * d],
            xn: vec![0.0; ub * d.max(qd)],
            q: vec![0.0; ub * qd],
            k: vec![0.0; ub * c.kv_dim()],
            v: vec![0.0; ub * c.kv_dim()],
            attn: vec![0.0; ub * qd],
            tmp: vec![0.0; ub * d],
            gate: vec![0.0; ub * c.n_ff],
            up: vec![0.0; ub * c.n_ff],
            acts: QuantizedActs::new(),
            logits: vec![0.0; c.n_vocab],
            packed: PackedScratch::default(),
            head_tmp: Vec::new(),
        };
        Ok(Context {
            model,
            // Zeroed allocations: pages are only backed by memory once the cache reaches them, so a large
            // context costs memory only as it fills.
            k_cache: (0..c.n_layers).map(|_| bytemuck::allocation::zeroed_vec(kv)).collect(),
            v_cache: (0..c.n_layers).map(|_| bytemuck::allocation::zeroed_vec(kv)).collect(),
            params,
            chunk_cap: ub,
            n_past: 0,
            scratch,
            pool,
            spin,
            thresholds: model.sparsity().thresholds.clone(),
            predictors: match c.ffn_act.is_relu_family() {
                true => model.predictors().map(Cow::Borrowed),
                false => None,
            },
            offload: None,
            offload_lost: false,
        })
    }

    /// Makes a context that runs packed `model` under a memory budget (see `OffloadOptions`): weights that do
    /// not fit are read from storage as needed. Refuses a budget below what the run needs in any case
    /// ([`RuntimeError::BudgetTooSmall`], with the minimum). Forward passes are capped at [`OFFLOAD_CHUNK`]
    /// tokens to bound scratch; the results stay those of `n_ubatch`-token batches (see [`Context::chunks`]).
    pub fn new_offloaded(
        model: &'m Model,
        params: ContextParams,
        opts: OffloadOptions,
    ) -> Result<Context<'m>, RuntimeError> {
        if !model.is_packed() {
            return Err(RuntimeError::NotPacked);
        }
        pinion_io::bound_heap_retention();
        let process = current_rss();
        let mut ctx = Context::with_chunk_cap(model, params, OFFLOAD_CHUNK)?;
        ctx.offload = Some(Offload::new(model, &ctx.offload_params(), opts, ctx.held(process))?);
        Ok(ctx)
    }

    /// The parameters an offloaded run plans with: its passes' size as the batch.
    fn offload_params(&self) -> ContextParams {
        ContextParams { n_ubatch: self.chunk_cap, ..self.params }
    }

    /// What an offloaded run of this context holds besides its plan's buffers, for a process of `process`
    /// bytes: the decoded predictors (the context's own, and the model's if they are decoded too).
    fn held(&self, process: u64) -> Held {
        let bytes = |ps: &[LowRankPredictor]| -> u64 { ps.iter().map(LowRankPredictor::weight_bytes).sum() };
        let own = match &self.predictors {
            Some(Cow::Owned(ps)) => bytes(ps),
            _ => 0,
        };
        let model = self.model.decoded_predictors().map_or(0, bytes);
        Held { process, predictor_bytes: own + model, predicting: self.predictors.is_some() }
    }

    /// How an offloaded context spends its budget (`None` when the model runs from memory).
    pub fn memory_plan(&self) -> Option<&MemoryPlan> {
        self.offload.as_ref().map(Offload::plan)
    }

    /// The offloaded run's options (`None` when the model runs from memory).
    pub fn offload_options(&self) -> Option<&OffloadOptions> {
        self.offload.as_ref().map(Offload::options)
    }

    /// Counters of an offloaded run's decode tokens since the last reset.
    pub fn offload_stats(&self) -> Option<&OffloadStats> {
        self.offload.as_ref().map(Offload::stats)
    }

    /// Zeroes the offload counters.
    pub fn reset_offload_stats(&mut self) {
        if let Some(o) = &mut self.offload {
            o.reset_stats();
        }
    }

    /// The I/O backend of an offloaded run, for display.
    pub fn offload_backend(&self) -> Option<String> {
        self.offload.as_ref().map(Offload::backend)
    }

    /// The model this context runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The context size in tokens.
    pub fn n_ctx(&self) -> usize {
        self.params.n_ctx
    }

    /// Number of compute threads.
    pub fn n_threads(&self) -> usize {
        self.params.n_threads
    }

    /// Number of tokens in the KV cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Sets per-layer threshold sparsity (CATS): in layer `l`, FFN neurons whose `|silu(gate · x)|` is below
    /// `thresholds[l]` contribute nothing. `None` runs the FFN densely.
    pub fn set_ffn_thresholds(&mut self, thresholds: Option<Vec<f32>>) -> Result<(), RuntimeError> {
        let n_layers = self.model.config().n_layers;
        if let Some(t) = &thresholds {
            if t.len() != n_layers || t.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(RuntimeError::BadThresholds { got: t.len(), n_layers });
            }
        }
        self.thresholds = thresholds;
        Ok(())
    }

    /// Uses (or, with `false`, stops using) the model's trained predictors to choose FFN neurons. They are on by
    /// default for ReLU-family packed models; on SiLU models they predict "above threshold" and skip the rest.
    /// Returns whether the model has predictors. An offloaded context is planned anew (see
    /// [`Context::set_predictors`]).
    pub fn use_predictors(&mut self, on: bool) -> Result<bool, RuntimeError> {
        let chosen = if on { self.model.predictors().map(Cow::Borrowed) } else { None };
        self.choose_predictors(chosen)?;
        Ok(self.model.sparsity().has_predictors)
    }

    /// Sets per-layer predictors (outputs in the model's packed position order, as
    /// [`Model::predictors`] gives them); `None` stops using predictors. An offloaded context is planned anew:
    /// predictors take memory and change what is pinned; a budget they do not fit in is refused
    /// ([`RuntimeError::BudgetTooSmall`]) and the context keeps its previous predictors.
    pub fn set_predictors(&mut self, predictors: Option<Vec<LowRankPredictor>>) -> Result<(), RuntimeError> {
        let c = self.model.config();
        if let Some(ps) = &predictors {
            if !self.model.is_packed() {
                return Err(RuntimeError::NotPacked);
            }
            if ps.len() != c.n_layers || ps.iter().any(|p| p.d_in() != c.d_model || p.n_out() != c.n_ff) {
                return Err(RuntimeError::BadPredictors { got: ps.len(), n_layers: c.n_layers });
            }
        }
        self.choose_predictors(predictors.map(Cow::Owned))
    }

    fn choose_predictors(&mut self, chosen: Option<Cow<'m, [LowRankPredictor]>>) -> Result<(), RuntimeError> {
        let previous = std::mem::replace(&mut self.predictors, chosen);
        let Some(old) = &self.offload else { return Ok(()) };
        let (opts, process) = (old.options().clone(), old.plan().process);
        let params = self.offload_params();
        if let Err(e) = plan_memory(self.model, &params, &opts, self.held(process)) {
            self.predictors = previous;
            return Err(e);
        }
        drop(previous);
        self.offload = None; // its pinned weights go before the new ones are read
        match Offload::new(self.model, &params, opts, self.held(process)) {
            Ok(o) => self.offload = Some(o),
            Err(e) => {
                self.offload_lost = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether predictors choose the FFN neurons.
    pub fn uses_predictors(&self) -> bool {
        self.predictors.is_some()
    }

    /// The per-layer thresholds in force.
    pub fn ffn_thresholds(&self) -> Option<&[f32]> {
        self.thresholds.as_deref()
    }

    /// Evaluates `tokens` densely (whatever thresholds are set) and records every layer's FFN scores (see
    /// [`crate::FfnActivation::score`]) and FFN inputs into `profile`, for calibrating sparsity and training
    /// predictors. The tokens are appended to the cache like [`Context::eval`].
    pub fn eval_profile(
        &mut self,
        tokens: &[u32],
        profile: &mut ActivationProfile,
    ) -> Result<(), RuntimeError> {
        let c = self.model.config();
        if self.model.is_packed() {
            return Err(RuntimeError::ProfilePacked);
        }
        let d_in_ok = profile.d_in() == 0 || profile.d_in() == c.d_model;
        if profile.n_layers() != c.n_layers || profile.n_ff() != c.n_ff || !d_in_ok {
            return Err(RuntimeError::ProfileShape {
                got: (profile.n_layers(), profile.n_ff()),
                want: (c.n_layers, c.n_ff),
            });
        }
        let saved = (self.thresholds.take(), self.predictors.take());
        let res = self.eval_with(tokens, Logits::Last, Some(profile)).map(|_| ());
        (self.thresholds, self.predictors) = saved;
        res
    }

    /// Forgets all tokens after the first `n` (keeps the KV rows before them).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Evaluates `tokens` at positions `n_past..` and returns logits: the last token's (`n_vocab` values) or all
    /// tokens' (`tokens.len() * n_vocab` values, token-major).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32], RuntimeError> {
        self.eval_with(tokens, which, None)
    }

    fn eval_with(
        &mut self,
        tokens: &[u32],
        which: Logits,
        mut profile: Option<&mut ActivationProfile>,
    ) -> Result<&[f32], RuntimeError> {
        let n_vocab = self.model.config().n_vocab;
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if self.offload_lost {
            return Err(RuntimeError::Offload(
                "the offloaded run could not be set up again; make a new context".into(),
            ));
        }
        if self.n_past + tokens.len() > self.params.n_ctx {
            return Err(RuntimeError::ContextOverflow {
                prompt: self.n_past,
                generate: tokens.len(),
                n_ctx: self.params.n_ctx,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(RuntimeError::BadToken { id, n_vocab });
        }
        if which == Logits::All {
            self.scratch.logits.resize(tokens.len() * n_vocab, 0.0);
        }
        let n_tokens = tokens.len();
        for (start, len, batch) in Context::chunks(n_tokens, self.params.n_ubatch, self.chunk_cap) {
            let chunk = &tokens[start..start + len];
            let want = match which {
                Logits::All => Some(start * n_vocab),
                Logits::Last if start + len == n_tokens => Some(0),
                Logits::Last => None,
            };
            let model = self.model;
            let (scratch, k_cache, v_cache, n_past) =
                (&mut self.scratch, &mut self.k_cache, &mut self.v_cache, self.n_past);
            if let (Some(o), 1) = (self.offload.as_mut(), chunk.len()) {
                o.begin_token();
            }
            let ffn = Ffn {
                thresholds: self.thresholds.as_deref(),
                predictors: self.predictors.as_deref(),
                profile: profile.as_deref_mut(),
                offload: self.offload.as_mut(),
            };
            if chunk.len() == 1 {
                let par = Par::Spin(&self.spin);
                forward(model, par, ffn, scratch, k_cache, v_cache, chunk, n_past, batch, which, want)?;
                if let Some(o) = self.offload.as_mut() {
                    o.end_token();
                }
            } else {
                self.pool.install(|| {
                    forward(
                        model,
                        Par::Rayon,
                        ffn,
                        scratch,
                        k_cache,
                        v_cache,
                        chunk,
                        n_past,
                        batch,
                        which,
                        want,
                    )
                })?;
            }
            self.n_past += chunk.len();
        }
        Ok(match which {
            Logits::All => &self.scratch.logits[..tokens.len() * n_vocab],
            Logits::Last => &self.scratch.logits[..n_vocab],
        })
    }
}

/// Most tokens in one forward pass of an offloaded context: its scratch is sized for this many.
pub const OFFLOAD_CHUNK: usize = 64;

impl Context<'_> {
    /// Splits `n` tokens into forward passes: `(start, len, batch)` where `batch` is the length of the
    /// `n_ubatch`-token batch the pass belongs to. Batches are `n_ubatch` tokens (the last one shorter), as
    /// llama.cpp splits them; a batch longer than `cap` (at least 3) is cut into near-equal passes of at most
    /// `cap` tokens, each at least 2.
    /// Attention chooses its kernel by `batch`, not by the pass's length, and no pass of a longer batch is a
    /// single token (that would take the decode path), so the results do not depend on `cap`.
    fn chunks(n: usize, n_ubatch: usize, cap: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        let ub = n_ubatch.max(1);
        let cap = cap.clamp(3, ub.max(3));
        (0..n.div_ceil(ub)).flat_map(move |b| {
            let b_start = b * ub;
            let batch = ub.min(n - b_start);
            let parts = batch.div_ceil(cap);
            (0..parts).map(move |i| {
                let (lo, hi) = (i * batch / parts, (i + 1) * batch / parts);
                (b_start + lo, hi - lo, batch)
            })
        })
    }
}

/// Which pool a forward pass runs its parallel operations on.
#[derive(Clone, Copy)]
enum Par<'a> {
    /// The rayon pool the pass was installed on.
    Rayon,
    /// A spinning pool, driven from the calling thread.
    Spin(&'a SpinPool),
}

impl Par<'_> {
    fn matmul(self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) {
        match self {
            Par::Rayon => exec::matmul(w, acts, out),
            Par::Spin(p) => exec::matmul_on(p, w, acts, out),
        }
    }
}

/// How the FFN runs: densely, or with per-layer thresholds; and whether its activations are recorded.
struct Ffn<'a> {
    thresholds: Option<&'a [f32]>,
    predictors: Option<&'a [LowRankPredictor]>,
    profile: Option<&'a mut ActivationProfile>,
    offload: Option<&'a mut Offload>,
}

#[allow(clippy::too_many_arguments)]
fn forward(
    model: &Model,
    par: Par<'_>,
    mut ffn: Ffn<'_>,
    s: &mut Scratch,
    k_cache: &mut [Vec<f16>],
    v_cache: &mut [Vec<f16>],
    tokens: &[u32],
    n_past: usize,
    batch: usize,
    which: Logits,
    logits_offset: Option<usize>,
) -> Result<(), RuntimeError> {
    let c = model.config();
    let n = tokens.len();
    let (d, kvd, qd, ff) = (c.d_model, c.kv_dim(), c.n_heads * c.head_dim, c.n_ff);
    let x = &mut s.x[..n * d];
    for (t, &tok) in tokens.iter().enumerate() {
        match ffn.offload.as_deref_mut() {
            Some(o) => o.embed(model, tok, &mut x[t * d..(t + 1) * d])?,
            None => model.embed(tok, &mut x[t * d..(t + 1) * d])?,
        }
    }
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    for (l, layer) in model.layers.iter().enumerate() {
        // An offloaded decode step reads this layer's gates while its attention runs.
        if let (Some(o), 1) = (ffn.offload.as_deref_mut(), n) {
            o.prefetch_gates(model, l)?;
        }
        // Attention.
        let xn = &mut s.xn[..n * d];
        for t in 0..n {
            exec::rms_norm(&x[t * d..(t + 1) * d], &layer.attn_norm, c.rms_eps, &mut xn[t * d..(t + 1) * d]);
        }
        let (wq, wk, wv) = (model.matrix(&layer.wq), model.matrix(&layer.wk), model.matrix(&layer.wv));
        s.acts.quantize(wq.ty, xn, d);
        par.matmul(&wq, &s.acts, &mut s.q[..n * qd]);
        if wk.ty != wq.ty {
            s.acts.quantize(wk.ty, xn, d);
        }
        par.matmul(&wk, &s.acts, &mut s.k[..n * kvd]);
        if wv.ty != wk.ty {
            s.acts.quantize(wv.ty, xn, d);
        }
        par.matmul(&wv, &s.acts, &mut s.v[..n * kvd]);
        for t in 0..n {
            let pos = n_past + t;
            let q = &mut s.q[t * qd..(t + 1) * qd];
            exec::rope(q, c.n_heads, c.head_dim, c.n_rot, pos, c.rope_freq_base, RopeMode::Norm);
            let k = &mut s.k[t * kvd..(t + 1) * kvd];
            exec::rope(k, c.n_kv_heads, c.head_dim, c.n_rot, pos, c.rope_freq_base, RopeMode::Norm);
            let kc = &mut k_cache[l][pos * kvd..(pos + 1) * kvd];
            for (dst, &src) in kc.iter_mut().zip(k.iter()) {
                *dst = f16::from_f32(src);
            }
            let vc = &mut v_cache[l][pos * kvd..(pos + 1) * kvd];
            for (dst, &src) in vc.iter_mut().zip(&s.v[t * kvd..(t + 1) * kvd]) {
                *dst = f16::from_f32(src);
            }
        }
        let attn = &mut s.attn[..n * qd];
        // Mirror llama.cpp's choice: f16-accumulating flash attention for short batches, f32 for long ones. The
        // batch is the `n_ubatch` batch this pass is part of (`Context::chunks`).
        let (q, kc, vc) = (&s.q[..n * qd], &k_cache[l][..], &v_cache[l][..]);
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        match par {
            Par::Spin(p) => exec::attention_f16acc_on(p, q, n, n_past, nh, nkv, hd, kc, vc, scale, attn),
            Par::Rayon if batch < exec::GGML_FA_TILE_Q => {
                exec::attention_f16acc(q, n, n_past, nh, nkv, hd, kc, vc, scale, attn)
            }
            Par::Rayon => exec::attention(q, n, n_past, nh, nkv, hd, kc, vc, scale, attn),
        }
        let wo = model.matrix(&layer.wo);
        s.acts.quantize(wo.ty, attn, qd);
        par.matmul(&wo, &s.acts, &mut s.tmp[..n * d]);
        add_assign(x, &s.tmp[..n * d]);

        // Feed-forward.
        let xn = &mut s.xn[..n * d];
        for t in 0..n {
            exec::rms_norm(&x[t * d..(t + 1) * d], &layer.ffn_norm, c.rms_eps, &mut xn[t * d..(t + 1) * d]);
        }
        let (wg, wu, wd) = match &layer.ffn {
            FfnWeights::Dense { gate, up, down } => {
                (model.matrix(gate), model.matrix(up), model.matrix(down))
            }
            FfnWeights::Packed(pl) => {
                let sel = Selection {
                    act: c.ffn_act,
                    threshold: ffn.thresholds.map(|t| t[l]),
                    predictor: ffn.predictors.map(|p| &p[l]),
                };
                let (parallel, spin) = match par {
                    Par::Rayon => (true, None),
                    Par::Spin(p) => (false, Some(p)),
                };
                let out = &mut s.tmp[..n * d];
                match (ffn.offload.as_deref_mut(), spin) {
                    (Some(o), Some(pool)) if n == 1 => {
                        let spec = sparse_spec(pl, sel);
                        let (token, mask) = decode_inputs(pl, sel, xn, &mut s.acts, &mut s.packed.inputs);
                        o.decode_ffn(model, l, &spec, &token, mask, pool, out)?;
                    }
                    (Some(o), _) => {
                        let bytes = o.stage_layer(model, l)?;
                        packed_ffn(bytes, pl, sel, parallel, spin, xn, &mut s.acts, &mut s.packed, out);
                    }
                    (None, _) => {
                        packed_ffn(
                            model.ffn_bytes(),
                            pl,
                            sel,
                            parallel,
                            spin,
                            xn,
                            &mut s.acts,
                            &mut s.packed,
                            out,
                        );
                    }
                }
                add_assign(x, &s.tmp[..n * d]);
                continue;
            }
        };
        s.acts.quantize(wg.ty, xn, d);
        par.matmul(&wg, &s.acts, &mut s.gate[..n * ff]);
        if wu.ty != wg.ty {
            s.acts.quantize(wu.ty, xn, d);
        }
        par.matmul(&wu, &s.acts, &mut s.up[..n * ff]);
        if let Some(p) = ffn.profile.as_deref_mut() {
            let act = c.ffn_act;
            let scores: Vec<f32> =
                s.gate[..n * ff].iter().zip(&s.up[..n * ff]).map(|(&g, &u)| act.score(g, u)).collect();
            p.record_scores(l, &s.xn[..n * d], &scores);
        }
        c.ffn_act.apply(&mut s.gate[..n * ff], &s.up[..n * ff], ffn.thresholds.map(|t| t[l]));
        s.acts.quantize(wd.ty, &s.gate[..n * ff], ff);
        par.matmul(&wd, &s.acts, &mut s.tmp[..n * d]);
        add_assign(x, &s.tmp[..n * d]);
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
    let wout = model.matrix(&model.output);
    s.acts.quantize(wout.ty, xn, d);
    let logits = &mut s.logits[offset..offset + n_out * c.n_vocab];
    match ffn.offload {
        Some(o) => o.head(model, &|w, a, out| par.matmul(w, a, out), &s.acts, logits, &mut s.head_tmp)?,
        None => par.matmul(&wout, &s.acts, logits),
    }
    Ok(())
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes cover the tokens in order, stay within the cap, never cut a batch into a single-token pass, and
    /// name the `n_ubatch` batch they belong to.
    #[test]
    fn chunks_split_batches_without_single_token_passes() {
        for n in 1..300 {
            for ub in [1, 2, 3, 5, 64, 65, 128, 512] {
                for cap in [3, 4, 7, 64, usize::MAX] {
                    let mut next = 0;
                    for (start, len, batch) in Context::chunks(n, ub, cap) {
                        assert_eq!(start, next, "n={n} ub={ub} cap={cap}");
                        assert!(
                            len >= 1 && len <= cap.max(3).min(ub.max(3)),
                            "n={n} ub={ub} cap={cap}: {len}"
                        );
                        assert_eq!(
                            batch,
                            ub.min(n - start / ub * ub),
                            "n={n} ub={ub} cap={cap} start={start}"
                        );
                        assert!(
                            len > 1 || batch == 1,
                            "n={n} ub={ub} cap={cap}: a one-token pass of a batch"
                        );
                        next += len;
                    }
                    assert_eq!(next, n, "n={n} ub={ub} cap={cap}");
                }
            }
        }
    }
}
