//! The inference context: KV cache, scratch buffers, thread pool, and the dense forward pass.

use std::borrow::Cow;

use pinion_exec_cpu::{CpuDense, DenseBackend, DenseShape, QuantizedActs, SpinPool};
use pinion_plan::{DeviceProfile, Plan, PlanOptions};
use pinion_predictor::{ActivationProfile, LowRankPredictor};

use crate::config::{ContextParams, DenseChoice};
use crate::error::RuntimeError;
use crate::ffn::PackedScratch;
use crate::forward::{Ffn, Kv, Logits, Par, Scratch, Segment, embed, forward, run_layers};
use crate::model::Model;
use crate::moe::{MoeScratch, RouteTrace};
use crate::offload::{Offload, OffloadStats};
use crate::planning::{current_rss, plan_run_with};
use crate::rule::FfnRule;

/// A model plus the state of its sequences: each one's KV cache and the number of tokens it holds. Most
/// contexts hold one sequence (`ContextParams::n_seq` is 1) and [`Context::eval`] runs it; a server's context
/// holds several, evaluated one at a time ([`Context::eval_seq`], prompts) or decoded together
/// ([`Context::decode_batch`]).
///
/// All buffers are allocated when the context is made; evaluating tokens allocates nothing (except the
/// all-token logits buffer, which grows once to its largest size, and, in an offloaded context, one list of
/// cluster locks per layer, the request lists of a layer's reads and the io engine's per-read bookkeeping).
pub struct Context<'m> {
    model: &'m Model,
    params: ContextParams,
    /// Most tokens in one forward pass: `params.n_ubatch`, or less for an offloaded run (see [`Context::chunks`]).
    chunk_cap: usize,
    /// The sequences' KV caches (`params.n_seq` of them).
    kv: Vec<Kv>,
    scratch: Scratch,
    /// Work-stealing pool for batches (prefill, perplexity).
    pool: rayon::ThreadPool,
    /// Spinning pool for single-token steps (decode), whose operations are too short for rayon's wake-ups.
    spin: SpinPool,
    /// The executor of dense batched products (prefill, perplexity).
    dense: Box<dyn DenseBackend>,
    /// The rule choosing FFN neurons (thresholds, and scales for a weighted rule). `None`: dense (SiLU, GELU)
    /// or the activation's own zeros (ReLU family).
    rule: Option<FfnRule>,
    /// The rule's per-neuron thresholds per layer, in the order of the layer's FFN weights (empty without
    /// scales).
    neuron_thresholds: Vec<Vec<f32>>,
    /// Per-layer predictors (packed models only): neurons they do not mark are skipped. Borrowed from the
    /// model unless set with [`Context::set_predictors`].
    predictors: Option<Cow<'m, [LowRankPredictor]>>,
    /// An offloaded run: the FFN streamed from storage under a memory budget.
    offload: Option<Offload>,
    /// What the offloaded run was planned with, to plan it again when the predictors change.
    offload_setup: Option<(PlanOptions, DeviceProfile, u64)>,
    /// The offloaded run could not be set up again (`set_predictors`): evaluating is refused rather than run
    /// from memory, over the budget.
    offload_lost: bool,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n_past: Vec<usize> = self.kv.iter().map(|k| k.n_past).collect();
        f.debug_struct("Context").field("params", &self.params).field("n_past", &n_past).finish()
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
        if params.n_seq == 0 {
            return Err(RuntimeError::BadSequence { seq: 0, n_seq: 0 });
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
        let dense: Box<dyn DenseBackend> = match params.dense {
            DenseChoice::Cpu => Box::new(CpuDense),
            DenseChoice::Npu => Box::new(pinion_exec_npu::NpuDense::new()),
        };
        let shapes: Vec<DenseShape> = model
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo].map(Clone::clone))
            .chain(model.layers.iter().flat_map(|l| l.dense_ffn()))
            .map(|w| DenseShape { ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols })
            .collect();
        dense.prepare(&shapes, params.n_ubatch.min(chunk_cap.max(3)))?;
        let params = ContextParams { n_ubatch: params.n_ubatch.clamp(1, params.n_ctx), ..params };
        let ub = params.n_ubatch.min(chunk_cap.max(3)).max(params.n_seq);
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
            head: vec![0.0; c.head_dim],
            moe: MoeScratch::new(c.moe, ub, d),
        };
        let mut ctx = Context {
            model,
            kv: (0..params.n_seq).map(|_| Kv::new(c.n_layers, params.n_ctx, c.kv_dim())).collect(),
            params,
            chunk_cap: ub,
            scratch,
            pool,
            spin,
            dense,
            rule: None,
            neuron_thresholds: Vec::new(),
            predictors: match c.ffn_act.is_relu_family() {
                true => model.predictors().map(Cow::Borrowed),
                false => None,
            },
            offload: None,
            offload_setup: None,
            offload_lost: false,
        };
        ctx.set_ffn_rule(model.sparsity().rule.clone())?;
        Ok(ctx)
    }

    /// Makes a context that runs packed `model` under the memory budget of `opts`: the run's [`Plan`] (made for
    /// this context's size, threads and predictors, on `device`) decides what stays in memory, and weights that
    /// do not fit are read from storage as needed. Refuses a budget below what the run needs in any case
    /// ([`RuntimeError::Plan`] with `PlanError::BudgetTooSmall`, naming the minimum). Forward passes are capped
    /// at [`OFFLOAD_CHUNK`] tokens to bound scratch; the results stay those of `n_ubatch`-token batches (see
    /// [`Context::chunks`]).
    pub fn new_offloaded(
        model: &'m Model,
        params: ContextParams,
        opts: PlanOptions,
        device: &DeviceProfile,
    ) -> Result<Context<'m>, RuntimeError> {
        if !model.is_packed() {
            return Err(RuntimeError::NotPacked);
        }
        pinion_io::bound_heap_retention();
        // The process's own memory: what it holds before the context, plus what making the context took beyond
        // its KV cache and scratch (which the plan itemizes, whether or not their pages are touched yet): its
        // threads and its rule's per-neuron thresholds (18 MiB for the 6,144 experts of the qwen3-30b-a3b shape,
        // which a measure taken before left out of the plan); less the model's decoded predictors if an earlier
        // context decoded them (the plan counts those as predictors; counted twice, they took 150 MiB from the
        // cache of every budget after the first of a sweep on the 7B shape).
        let before = current_rss();
        let mut ctx = Context::with_chunk_cap(model, params, OFFLOAD_CHUNK)?;
        let capped = ContextParams { n_ubatch: ctx.chunk_cap, ..ctx.params.clone() };
        let itemized = capped.kv_bytes(model.config()) + capped.scratch_bytes(model.config());
        let made = current_rss().saturating_sub(before).saturating_sub(itemized);
        let process = (before + made).saturating_sub(model.decoded_predictors().map_or(0, predictor_bytes));
        let plan = ctx.plan_offload(&opts, device, process)?;
        ctx.offload = Some(Offload::new(
            model,
            plan,
            ctx.predictors.is_some(),
            ctx.params.n_threads,
            ctx.params.verify_reads,
        )?);
        ctx.offload_setup = Some((opts, device.clone(), process));
        Ok(ctx)
    }

    /// The plan of this context's offloaded run with its current predictors, for a process of `process` bytes.
    fn plan_offload(
        &self,
        opts: &PlanOptions,
        device: &DeviceProfile,
        process: u64,
    ) -> Result<Plan, RuntimeError> {
        // The decoded predictors: the context's own, and the model's if they are decoded too.
        let own = match &self.predictors {
            Some(Cow::Owned(ps)) => predictor_bytes(ps),
            _ => 0,
        };
        let held = own + self.model.decoded_predictors().map_or(0, predictor_bytes);
        let params = ContextParams { n_ubatch: self.chunk_cap, ..self.params };
        plan_run_with(self.model, &params, opts, device, process, held, self.predictors.is_some())
    }

    /// The plan an offloaded context runs (`None` when the model runs from memory).
    pub fn plan(&self) -> Option<&Plan> {
        self.offload.as_ref().map(Offload::plan)
    }

    /// The neuron cache's counters per region of an offloaded run.
    pub fn cache_stats(&self) -> Option<pinion_cache::CacheStats> {
        self.offload.as_ref().map(Offload::cache_stats)
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

    /// Number of tokens in the KV cache (of the first sequence).
    pub fn n_past(&self) -> usize {
        self.kv[0].n_past
    }

    /// Number of sequences the context holds.
    pub fn n_seq(&self) -> usize {
        self.kv.len()
    }

    /// Number of tokens in sequence `seq`'s KV cache (0 for a sequence that does not exist).
    pub fn n_past_of(&self, seq: usize) -> usize {
        self.kv.get(seq).map_or(0, |k| k.n_past)
    }

    /// Forgets all tokens of sequence `seq` after the first `n`.
    pub fn truncate_seq(&mut self, seq: usize, n: usize) {
        if let Some(k) = self.kv.get_mut(seq) {
            k.n_past = k.n_past.min(n);
        }
    }

    /// Sets the rule choosing FFN neurons (see [`FfnRule`]): in layer `l`, neurons whose weighted score is
    /// below the layer's threshold contribute nothing. `None` runs the FFN densely (SiLU, GELU) or with the
    /// activation's own zeros (ReLU family).
    pub fn set_ffn_rule(&mut self, rule: Option<FfnRule>) -> Result<(), RuntimeError> {
        let c = self.model.config();
        if let Some(r) = &rule {
            r.check(c.n_units(), c.n_ff)?;
        }
        self.neuron_thresholds = match &rule {
            Some(r) if r.scales.is_some() => (0..c.n_units())
                .map(|u| {
                    let order = self.model.unit(u).map(|pl| &pl.order[..]);
                    r.neuron_thresholds(u, order).expect("a rule with scales")
                })
                .collect(),
            _ => Vec::new(),
        };
        self.rule = rule;
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
            if ps.len() != c.n_units() || ps.iter().any(|p| p.d_in() != c.d_model || p.n_out() != c.n_ff) {
                return Err(RuntimeError::BadPredictors { got: ps.len(), n_layers: c.n_units() });
            }
        }
        self.choose_predictors(predictors.map(Cow::Owned))
    }

    fn choose_predictors(&mut self, chosen: Option<Cow<'m, [LowRankPredictor]>>) -> Result<(), RuntimeError> {
        let previous = std::mem::replace(&mut self.predictors, chosen);
        let Some((opts, device, process)) = self.offload_setup.clone() else { return Ok(()) };
        let plan = match self.plan_offload(&opts, &device, process) {
            Ok(p) => p,
            Err(e) => {
                self.predictors = previous;
                return Err(e);
            }
        };
        drop(previous);
        self.offload = None; // its pinned weights go before the new ones are read
        match Offload::new(
            self.model,
            plan,
            self.predictors.is_some(),
            self.params.n_threads,
            self.params.verify_reads,
        ) {
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

    /// Starts (a fresh record) or stops recording each mixture-of-experts FFN call's routing: the chosen
    /// experts and their non-zero neurons, for routing statistics. Off by default; a dense model records nothing.
    pub fn set_route_trace(&mut self, on: bool) {
        self.scratch.moe.trace = on.then(RouteTrace::default);
    }

    /// The routing recorded since [`Context::set_route_trace`] or the last call (empty when recording is off).
    pub fn take_route_trace(&mut self) -> RouteTrace {
        self.scratch.moe.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The rule choosing FFN neurons in force.
    pub fn ffn_rule(&self) -> Option<&FfnRule> {
        self.rule.as_ref()
    }

    /// Evaluates `tokens` densely (whatever thresholds are set) and records every layer's FFN scores (see
    /// [`crate::FfnActivation::score`]) and FFN inputs into `profile`, for calibrating sparsity and training
    /// predictors. The tokens are appended to the cache like [`Context::eval`].
    pub fn eval_profile(
        &mut self,
        tokens: &[u32],
        profile: &mut ActivationProfile,
    ) -> Result<(), RuntimeError> {
        self.check_profile(profile)?;
        let saved = (self.rule.take(), std::mem::take(&mut self.neuron_thresholds), self.predictors.take());
        let res = self.eval_with(0, tokens, Logits::Last, Some(profile)).map(|_| ());
        (self.rule, self.neuron_thresholds, self.predictors) = saved;
        res
    }

    /// Records into `profile` what [`Context::eval_profile`] of each of `pieces` from an empty cache records,
    /// the same values, but layer by layer: every piece through block 0, then every piece through block 1, and
    /// so on, keeping the pieces' hidden states between blocks (`tokens x d_model` f32). Each block's weights
    /// are so read in one stretch, and `after_layer(l)` is called when block `l` is done (to drop its pages
    /// from memory: a model larger than memory is profiled reading it once). The output head is not run.
    /// The cache is left empty.
    pub fn eval_profile_by_layer(
        &mut self,
        pieces: &[&[u32]],
        profile: &mut ActivationProfile,
        after_layer: &mut dyn FnMut(usize),
    ) -> Result<(), RuntimeError> {
        let c = self.model.config();
        self.check_profile(profile)?;
        for piece in pieces {
            if piece.is_empty() {
                return Err(RuntimeError::EmptyPrompt);
            }
            self.check_fits(0, piece)?;
        }
        self.truncate(0);
        let d = c.d_model;
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut hidden = vec![0.0f32; total * d];
        let model = self.model;
        for l in 0..model.layers.len() {
            let mut at = 0;
            for piece in pieces {
                for (start, len, batch) in Context::chunks(piece.len(), self.params.n_ubatch, self.chunk_cap)
                {
                    let rows = (at + start) * d..(at + start + len) * d;
                    let (scratch, kv) = (&mut self.scratch, &mut self.kv);
                    match l {
                        0 => embed(model, None, scratch, &piece[start..start + len])?,
                        _ => scratch.x[..len * d].copy_from_slice(&hidden[rows.clone()]),
                    }
                    let segs = [Segment { seq: 0, pos: start, len }];
                    let mut ffn = Ffn {
                        thresholds: None,
                        neuron_thresholds: &[],
                        predictors: None,
                        profile: Some(&mut *profile),
                        offload: None,
                    };
                    let span = l..l + 1;
                    match len {
                        1 => run_layers(
                            model,
                            Par::Spin(&self.spin),
                            &mut ffn,
                            scratch,
                            kv,
                            &segs,
                            batch,
                            span,
                        )?,
                        _ => {
                            let par = Par::Batch(&*self.dense);
                            self.pool.install(|| {
                                run_layers(model, par, &mut ffn, scratch, kv, &segs, batch, span)
                            })?
                        }
                    }
                    hidden[rows].copy_from_slice(&scratch.x[..len * d]);
                }
                at += piece.len();
            }
            after_layer(l);
        }
        Ok(())
    }

    /// Refuses `tokens` after `n_past` of a sequence if they pass the context's end or one is not in the
    /// vocabulary.
    fn check_fits(&self, n_past: usize, tokens: &[u32]) -> Result<(), RuntimeError> {
        if n_past + tokens.len() > self.params.n_ctx {
            return Err(RuntimeError::ContextOverflow {
                prompt: n_past,
                generate: tokens.len(),
                n_ctx: self.params.n_ctx,
            });
        }
        let n_vocab = self.model.config().n_vocab;
        match tokens.iter().find(|&&t| t as usize >= n_vocab) {
            Some(&id) => Err(RuntimeError::BadToken { id, n_vocab }),
            None => Ok(()),
        }
    }

    /// Refuses a packed model, or a profile not shaped like the model's FFN units.
    fn check_profile(&self, profile: &ActivationProfile) -> Result<(), RuntimeError> {
        let c = self.model.config();
        if self.model.is_packed() {
            return Err(RuntimeError::ProfilePacked);
        }
        // A mixture of experts is profiled per FFN unit (expert), each keeping its own token samples.
        let d_in_ok = profile.d_in() == 0 || profile.d_in() == c.d_model;
        if profile.n_layers() != c.n_units() || profile.n_ff() != c.n_ff || !d_in_ok {
            return Err(RuntimeError::ProfileShape {
                got: (profile.n_layers(), profile.n_ff()),
                want: (c.n_units(), c.n_ff),
            });
        }
        Ok(())
    }

    /// Forgets all tokens after the first `n` (keeps the KV rows before them).
    pub fn truncate(&mut self, n: usize) {
        self.truncate_seq(0, n);
    }

    /// Evaluates `tokens` at positions `n_past..` and returns logits: the last token's (`n_vocab` values) or all
    /// tokens' (`tokens.len() * n_vocab` values, token-major).
    pub fn eval(&mut self, tokens: &[u32], which: Logits) -> Result<&[f32], RuntimeError> {
        self.eval_with(0, tokens, which, None)
    }

    /// [`Context::eval`] on sequence `seq`.
    pub fn eval_seq(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<&[f32], RuntimeError> {
        self.eval_with(seq, tokens, which, None)
    }

    /// One decode step of several sequences: `steps[i]` = (sequence, token) appends the token to that
    /// sequence, and row `i` of the result (`steps.len() x n_vocab`) is its next-token logits. Each row gets
    /// the bits a one-token [`Context::eval_seq`] of its sequence would give, whatever else is in the batch.
    /// The steps are one forward pass: every weight matrix is read once for all of them, and an offloaded
    /// context reads each layer's FFN records once for the step (as prefill does) where a lone token reads the
    /// neurons it uses.
    pub fn decode_batch(&mut self, steps: &[(usize, u32)]) -> Result<&[f32], RuntimeError> {
        let n_vocab = self.model.config().n_vocab;
        let n_seq = self.kv.len();
        for (i, &(seq, tok)) in steps.iter().enumerate() {
            if seq >= n_seq || steps[..i].iter().any(|&(s, _)| s == seq) {
                return Err(RuntimeError::BadSequence { seq, n_seq });
            }
            if tok as usize >= n_vocab {
                return Err(RuntimeError::BadToken { id: tok, n_vocab });
            }
            if self.kv[seq].n_past + 1 > self.params.n_ctx {
                let n_ctx = self.params.n_ctx;
                return Err(RuntimeError::ContextOverflow {
                    prompt: self.kv[seq].n_past,
                    generate: 1,
                    n_ctx,
                });
            }
        }
        if steps.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        self.scratch.logits.resize(self.scratch.logits.len().max(steps.len() * n_vocab), 0.0);
        if steps.len() == 1 {
            let mut rows = std::mem::take(&mut self.scratch.head_tmp);
            rows.clear();
            for &(seq, tok) in steps {
                let r = self.eval_with(seq, &[tok], Logits::Last, None);
                match r {
                    Ok(l) => rows.extend_from_slice(l),
                    Err(e) => {
                        self.scratch.head_tmp = rows;
                        return Err(e);
                    }
                }
            }
            self.scratch.logits[..rows.len()].copy_from_slice(&rows);
            self.scratch.head_tmp = rows;
            return Ok(&self.scratch.logits[..steps.len() * n_vocab]);
        }
        if self.offload_lost {
            return Err(RuntimeError::OffloadStopped(
                "the offloaded run could not be set up again; make a new context".into(),
            ));
        }
        let tokens: Vec<u32> = steps.iter().map(|&(_, t)| t).collect();
        let segs: Vec<Segment> =
            steps.iter().map(|&(seq, _)| Segment { seq, pos: self.kv[seq].n_past, len: 1 }).collect();
        let ffn = Ffn {
            thresholds: self.rule.as_ref().map(|r| &r.thresholds[..]),
            neuron_thresholds: &self.neuron_thresholds,
            predictors: self.predictors.as_deref(),
            profile: None,
            offload: self.offload.as_mut(),
        };
        let par = Par::Spin(&self.spin);
        forward(
            self.model,
            par,
            ffn,
            &mut self.scratch,
            &mut self.kv,
            &tokens,
            &segs,
            1,
            Logits::All,
            Some(0),
        )?;
        for &(seq, _) in steps {
            self.kv[seq].n_past += 1;
        }
        Ok(&self.scratch.logits[..steps.len() * n_vocab])
    }

    fn eval_with(
        &mut self,
        seq: usize,
        tokens: &[u32],
        which: Logits,
        mut profile: Option<&mut ActivationProfile>,
    ) -> Result<&[f32], RuntimeError> {
        if seq >= self.kv.len() {
            return Err(RuntimeError::BadSequence { seq, n_seq: self.kv.len() });
        }
        let n_vocab = self.model.config().n_vocab;
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        if self.offload_lost {
            return Err(RuntimeError::OffloadStopped(
                "the offloaded run could not be set up again; make a new context".into(),
            ));
        }
        self.check_fits(self.kv[seq].n_past, tokens)?;
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
            let segs = [Segment { seq, pos: self.kv[seq].n_past, len }];
            let (scratch, kv) = (&mut self.scratch, &mut self.kv);
            if let (Some(o), 1) = (self.offload.as_mut(), chunk.len()) {
                o.begin_token()?;
            }
            let ffn = Ffn {
                thresholds: self.rule.as_ref().map(|r| &r.thresholds[..]),
                neuron_thresholds: &self.neuron_thresholds,
                predictors: self.predictors.as_deref(),
                profile: profile.as_deref_mut(),
                offload: self.offload.as_mut(),
            };
            if chunk.len() == 1 {
                let par = Par::Spin(&self.spin);
                forward(model, par, ffn, scratch, kv, chunk, &segs, batch, which, want)?;
                if let Some(o) = self.offload.as_mut() {
                    o.end_token();
                }
            } else {
                let par = Par::Batch(&*self.dense);
                self.pool
                    .install(|| forward(model, par, ffn, scratch, kv, chunk, &segs, batch, which, want))?;
            }
            self.kv[seq].n_past += chunk.len();
        }
        Ok(match which {
            Logits::All => &self.scratch.logits[..tokens.len() * n_vocab],
            Logits::Last => &self.scratch.logits[..n_vocab],
        })
    }
}

/// Most tokens in one forward pass of an offloaded context: its scratch is sized for this many.
pub const OFFLOAD_CHUNK: usize = 64;

/// Bytes decoded predictors take in memory.
fn predictor_bytes(ps: &[LowRankPredictor]) -> u64 {
    ps.iter().map(LowRankPredictor::weight_bytes).sum()
}

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
