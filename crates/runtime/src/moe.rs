//! The mixture-of-experts FFN, as llama.cpp's `build_moe_ffn` computes it for the architectures pinion runs
//! (llama/Mixtral, qwen3moe; [`crate::MoeConfig`]).
//!
//! Per token: router logits `ffn_gate_inp · x` (a matmul like any other), their softmax over the experts (ggml's
//! `soft_max` as its AVX-512 build computes it: [`softmax_ggml`]), the experts sorted by probability with
//! ggml's CPU `argsort`, which is libstdc++'s `std::sort` (not stable: [`argsort_desc`] reproduces its order of
//! ties), the first `n_expert_used` kept, their probabilities divided by their sum (summed in f64, clamped
//! below at 2^-14, as `ggml_sum_rows`, `ggml_clamp`, `ggml_div`) where the architecture renormalizes, then each
//! chosen expert's FFN (SwiGLU) times its weight, added in the order of the choice: `((e0·w0 + e1·w1) + e2·w2)
//! ...`, each product and sum rounded to f32, as ggml's `mul` and chain of `add`s.
//!
//! A pass of several tokens (prefill, perplexity, a decode step of several sequences) runs each expert once
//! over the tokens routed to it: their rows are gathered, the expert's three matmuls run on them, and each
//! token's result goes to its (token, slot) place; the weighted sum is then formed per token in slot order.
//! Every product is per row (an activation row is quantized on its own, and a matmul's element does not depend
//! on the other rows, as ggml's `mul_mat_id`), so a token gets the bits it gets alone. One token (decode) is the
//! same code with one token per chosen expert: only the chosen experts' weights are read.

use pinion_exec_cpu::{self as exec, QMatrix, QuantizedActs};
use pinion_predictor::ActivationProfile;

use crate::config::{FfnActivation, MoeConfig};
use crate::error::RuntimeError;
use crate::model::{Model, MoeWeights};

/// The smallest weight sum llama.cpp divides by (`ggml_clamp` to the smallest normal f16, 2^-14).
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// Buffers of the mixture-of-experts FFN, sized once for a context's largest pass (nothing is allocated per
/// token).
#[derive(Default)]
pub(crate) struct MoeScratch {
    /// Router logits, then probabilities (`n x n_expert`).
    probs: Vec<f32>,
    /// The experts sorted by probability (one row's, `n_expert`).
    order: Vec<u32>,
    /// Per (token, slot): the chosen expert and its weight (`n x n_expert_used`).
    chosen: Vec<u32>,
    weights: Vec<f32>,
    /// Per (token, slot): the expert's output (`n x n_expert_used x d_model`).
    outs: Vec<f32>,
    /// The rows routed to one expert (`n x d_model`): its inputs gathered, and its outputs.
    rows: Vec<f32>,
    rows_out: Vec<f32>,
    /// Per row routed to one expert: the neurons it used.
    counts: Vec<u32>,
    /// Tokens of the pass last routed.
    n_tokens: usize,
    /// The (token, slot) pairs routed to one expert.
    members: Vec<(u32, u32)>,
    /// The routing record, when one is asked for ([`crate::Context::set_route_trace`]).
    pub(crate) trace: Option<RouteTrace>,
}

/// The routing of each mixture-of-experts FFN call, recorded while [`crate::Context::set_route_trace`] is on (for
/// measuring routing statistics; off by default, and then nothing is recorded). The calls are the layers in order,
/// pass after pass; a pass of one token (decode) makes one call per layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTrace {
    /// Per call, token of the call and slot (in order of choice): the chosen expert and how many of its neurons
    /// were non-zero after the activation.
    pub choices: Vec<(u32, u32)>,
    /// The number of tokens of each call.
    pub call_tokens: Vec<u32>,
}

impl MoeScratch {
    /// Buffers for passes of up to `n` tokens of a model with experts `m` (empty for a dense model).
    pub(crate) fn new(m: Option<MoeConfig>, n: usize, d_model: usize) -> MoeScratch {
        let Some(m) = m else { return MoeScratch::default() };
        let k = m.n_expert_used;
        MoeScratch {
            probs: vec![0.0; n * m.n_expert],
            order: Vec::with_capacity(m.n_expert),
            chosen: vec![0; n * k],
            weights: vec![0.0; n * k],
            outs: vec![0.0; n * k * d_model],
            rows: vec![0.0; n * d_model],
            rows_out: vec![0.0; n * d_model],
            counts: vec![0; n],
            n_tokens: 0,
            members: Vec::with_capacity(n * k),
            trace: None,
        }
    }
}

/// A matrix product of the pass (the forward pass's batch executor or spin pool).
pub(crate) type Matmul<'a> = &'a dyn Fn(&QMatrix<'_>, &QuantizedActs, &mut [f32]) -> Result<(), RuntimeError>;

/// One expert's FFN over the rows routed to it: `(expert, the next expert this pass runs, inputs (m x d), outputs
/// (m x d), per row the number of neurons it used)`; the counts feed the route trace (the slice is empty when no
/// trace is recorded) and may be left alone.
pub(crate) type ExpertFfn<'a> =
    &'a mut dyn FnMut(usize, Option<usize>, &[f32], &mut [f32], &mut [u32]) -> Result<(), RuntimeError>;

/// Routes the `n` tokens of `xn` (`n x d`, FFN-normalized): router logits (`router`, through `matmul`),
/// softmax, top-k and weights into `s`, for [`run_experts`].
pub(crate) fn route(
    router: &QMatrix<'_>,
    matmul: Matmul<'_>,
    cfg: MoeConfig,
    xn: &[f32],
    s: &mut MoeScratch,
    acts: &mut QuantizedActs,
) -> Result<(), RuntimeError> {
    let (d, k, n_exp) = (router.n_cols, cfg.n_expert_used, cfg.n_expert);
    let n = xn.len() / d;
    acts.quantize(router.ty, xn, d);
    let probs = &mut s.probs[..n * n_exp];
    matmul(router, acts, probs)?;
    for t in 0..n {
        let p = &mut probs[t * n_exp..(t + 1) * n_exp];
        softmax_ggml(p);
        argsort_desc(p, &mut s.order);
        let (chosen, weights) = (&mut s.chosen[t * k..(t + 1) * k], &mut s.weights[t * k..(t + 1) * k]);
        for ((e, wt), &i) in chosen.iter_mut().zip(weights.iter_mut()).zip(&s.order) {
            (*e, *wt) = (i, p[i as usize]);
        }
        if cfg.norm_weights {
            let sum = weights.iter().map(|&v| v as f64).sum::<f64>() as f32;
            let sum = sum.max(MIN_WEIGHT_SUM);
            weights.iter_mut().for_each(|v| *v /= sum);
        }
    }
    s.n_tokens = n;
    Ok(())
}

/// Runs the experts [`route`] chose for the pass's `n` tokens (`xn`, `n x d`), each once over the tokens routed to
/// it (in expert order, through `expert`), and writes each token's weighted sum of its experts' outputs, in slot
/// order, to `out` (`n x d`).
pub(crate) fn run_experts(
    cfg: MoeConfig,
    xn: &[f32],
    s: &mut MoeScratch,
    expert: ExpertFfn<'_>,
    out: &mut [f32],
) -> Result<(), RuntimeError> {
    let (k, n_exp, n) = (cfg.n_expert_used, cfg.n_expert, s.n_tokens);
    let d = xn.len() / n.max(1);
    let trace_at = s.trace.as_mut().map(|tr| {
        tr.call_tokens.push(n as u32);
        tr.choices.extend(s.chosen[..n * k].iter().map(|&e| (e, 0)));
        tr.choices.len() - n * k
    });
    let used = |e: usize| s.chosen[..n * k].iter().any(|&c| c as usize == e);
    let mut next = (0..n_exp).find(|&e| used(e));
    while let Some(e) = next {
        next = (e + 1..n_exp).find(|&e| used(e));
        s.members.clear();
        for (i, &ch) in s.chosen[..n * k].iter().enumerate() {
            if ch as usize == e {
                s.members.push(((i / k) as u32, (i % k) as u32));
            }
        }
        let m = s.members.len();
        let rows = &mut s.rows[..m * d];
        for (r, &(t, _)) in rows.chunks_exact_mut(d).zip(&s.members) {
            r.copy_from_slice(&xn[t as usize * d..(t as usize + 1) * d]);
        }
        // The neurons each row used, for the route trace only (empty when none is recorded: nothing counted).
        let counts = &mut s.counts[..if s.trace.is_some() { m } else { 0 }];
        counts.fill(0);
        expert(e, next, rows, &mut s.rows_out[..m * d], counts)?;
        if let (Some(tr), Some(at)) = (s.trace.as_mut(), trace_at) {
            for (&cnt, &(t, slot)) in counts.iter().zip(&s.members) {
                tr.choices[at + t as usize * k + slot as usize].1 = cnt;
            }
        }
        for (r, &(t, slot)) in s.rows_out[..m * d].chunks_exact(d).zip(&s.members) {
            let at = (t as usize * k + slot as usize) * d;
            s.outs[at..at + d].copy_from_slice(r);
        }
    }
    // The weighted sum, in slot order.
    for (t, o) in out[..n * d].chunks_exact_mut(d).enumerate() {
        for slot in 0..k {
            let wt = s.weights[t * k + slot];
            let at = (t * k + slot) * d;
            let e = &s.outs[at..at + d];
            if slot == 0 {
                o.iter_mut().zip(e).for_each(|(o, &v)| *o = v * wt);
            } else {
                o.iter_mut().zip(e).for_each(|(o, &v)| *o += v * wt);
            }
        }
    }
    Ok(())
}

/// One expert of a GGUF's mixture of experts over `m` rows: its gate and up matmuls, the activation (with the
/// unit's thresholds, if a rule is set: `t`), its down matmul. Returns per row the neurons it used in `counts`;
/// with `record`, the rows' scores and up values go to the profile as FFN unit `record.1`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_expert(
    model: &Model,
    matmul: Matmul<'_>,
    w: &MoeWeights,
    e: usize,
    act: FfnActivation,
    t: Option<&[f32]>,
    record: Option<(&mut ActivationProfile, usize)>,
    rows: &[f32],
    b: FfnBuffers<'_>,
    out: &mut [f32],
    counts: &mut [u32],
) -> Result<(), RuntimeError> {
    let (d, ff) = (model.config().d_model, model.config().n_ff);
    let m = rows.len() / d;
    let (wg, wu, wd) = (
        model.matrix(&w.expert(&w.gate, e)),
        model.matrix(&w.expert(&w.up, e)),
        model.matrix(&w.expert(&w.down, e)),
    );
    let (gate, up) = (&mut b.gate[..m * ff], &mut b.up[..m * ff]);
    b.acts.quantize(wg.ty, rows, d);
    matmul(&wg, b.acts, gate)?;
    if wu.ty != wg.ty {
        b.acts.quantize(wu.ty, rows, d);
    }
    matmul(&wu, b.acts, up)?;
    if let Some((p, u)) = record {
        let scores: Vec<f32> = gate.iter().zip(up.iter()).map(|(&g, &v)| act.score(g, v)).collect();
        p.record_unit_scores(u, rows, &scores);
        p.record_up(u, up);
    }
    act.apply(gate, up, t);
    for (row, c) in gate.chunks_exact(ff).zip(counts.iter_mut()) {
        *c = row.iter().filter(|&&v| v != 0.0).count() as u32;
    }
    b.acts.quantize(wd.ty, gate, ff);
    matmul(&wd, b.acts, out)
}

/// The FFN buffers a pass shares with the dense FFN: the quantized activations and the gate and up outputs
/// (each at least `n x n_ff`).
pub(crate) struct FfnBuffers<'a> {
    pub(crate) acts: &'a mut QuantizedActs,
    pub(crate) gate: &'a mut [f32],
    pub(crate) up: &'a mut [f32],
}

/// ggml's `soft_max` of one row (no mask, scale 1) as its AVX-512 build computes it: the maximum subtracted,
/// `exp` of 16 lanes at a time with ggml's polynomial ([`exec::expf_ggml`]), each group's sum reduced as
/// GCC's `_mm512_reduce_add_ps` does and added in f64, the remainder with libm's `expf`, then every value
/// multiplied by `1 / sum` rounded to f32.
pub(crate) fn softmax_ggml(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let mut chunks = x.chunks_exact_mut(16);
    for v in &mut chunks {
        v.iter_mut().for_each(|v| *v = exec::expf_ggml(*v - max));
        let t: [f32; 8] = std::array::from_fn(|j| v[j + 8] + v[j]);
        let t: [f32; 4] = std::array::from_fn(|j| t[j + 4] + t[j]);
        let t: [f32; 2] = std::array::from_fn(|j| t[j] + t[j + 2]);
        sum += (t[0] + t[1]) as f64;
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let scale = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= scale);
}

/// The indices of `x` sorted by decreasing value as ggml's CPU `argsort` sorts them: libstdc++'s `std::sort`
/// (introsort: median-of-three quicksort down to runs of 16, heapsort past a depth of `2 log2 n`, then
/// insertion sort) with the comparison `x[a] > x[b]`, so that ties come out in its order (for up to 16
/// values, index order; beyond, whatever the partitioning leaves). Its unguarded loops are bounded here, which
/// changes nothing for numbers (libstdc++ relies on the comparison's order to stop them) and keeps a NaN (a
/// corrupt router) from reading out of bounds, as it would in C++.
pub(crate) fn argsort_desc(x: &[f32], idx: &mut Vec<u32>) {
    idx.clear();
    idx.extend(0..x.len() as u32);
    let less = |a: u32, b: u32| x[a as usize] > x[b as usize];
    let n = idx.len();
    if n > 1 {
        introsort_loop(idx, 0, n, 2 * n.ilog2(), &less);
        final_insertion_sort(idx, &less);
    }
}

/// libstdc++'s `_S_threshold`.
const SORT_THRESHOLD: usize = 16;

fn introsort_loop(
    v: &mut [u32],
    first: usize,
    mut last: usize,
    mut depth: u32,
    less: &dyn Fn(u32, u32) -> bool,
) {
    while last - first > SORT_THRESHOLD {
        if depth == 0 {
            heap_sort(&mut v[first..last], less);
            return;
        }
        depth -= 1;
        // __unguarded_partition_pivot: the median of (first + 1, mid, last - 1) moved to first.
        let mid = first + (last - first) / 2;
        move_median_to_first(v, first, first + 1, mid, last - 1, less);
        let cut = unguarded_partition(v, first + 1, last, first, less);
        introsort_loop(v, cut, last, depth, less);
        last = cut;
    }
}

fn move_median_to_first(
    v: &mut [u32],
    result: usize,
    a: usize,
    b: usize,
    c: usize,
    less: &dyn Fn(u32, u32) -> bool,
) {
    let pick = if less(v[a], v[b]) {
        if less(v[b], v[c]) {
            b
        } else if less(v[a], v[c]) {
            c
        } else {
            a
        }
    } else if less(v[a], v[c]) {
        a
    } else if less(v[b], v[c]) {
        c
    } else {
        b
    };
    v.swap(result, pick);
}

fn unguarded_partition(
    v: &mut [u32],
    mut first: usize,
    mut last: usize,
    pivot: usize,
    less: &dyn Fn(u32, u32) -> bool,
) -> usize {
    let end = last;
    loop {
        while first + 1 < end && less(v[first], v[pivot]) {
            first += 1;
        }
        last -= 1;
        while last > pivot && less(v[pivot], v[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        v.swap(first, last);
        first += 1;
    }
}

fn final_insertion_sort(v: &mut [u32], less: &dyn Fn(u32, u32) -> bool) {
    if v.len() > SORT_THRESHOLD {
        insertion_sort(&mut v[..SORT_THRESHOLD], less);
        for i in SORT_THRESHOLD..v.len() {
            unguarded_linear_insert(v, i, less);
        }
    } else {
        insertion_sort(v, less);
    }
}

fn insertion_sort(v: &mut [u32], less: &dyn Fn(u32, u32) -> bool) {
    for i in 1..v.len() {
        if less(v[i], v[0]) {
            let val = v[i];
            v.copy_within(0..i, 1);
            v[0] = val;
        } else {
            unguarded_linear_insert(v, i, less);
        }
    }
}

fn unguarded_linear_insert(v: &mut [u32], mut last: usize, less: &dyn Fn(u32, u32) -> bool) {
    let val = v[last];
    while last > 0 && less(val, v[last - 1]) {
        v[last] = v[last - 1];
        last -= 1;
    }
    v[last] = val;
}

/// libstdc++'s `__partial_sort(first, last, last)`: `__make_heap`, then `__sort_heap`.
fn heap_sort(v: &mut [u32], less: &dyn Fn(u32, u32) -> bool) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, len, value, less);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
    let mut last = len;
    while last > 1 {
        last -= 1;
        // __pop_heap(first, last, last).
        let value = v[last];
        v[last] = v[0];
        adjust_heap(v, 0, last, value, less);
    }
}

fn adjust_heap(v: &mut [u32], mut hole: usize, len: usize, value: u32, less: &dyn Fn(u32, u32) -> bool) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if less(v[child], v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len & 1 == 0 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    // __push_heap.
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && less(v[parent], value) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ties keep index order up to 16 values (insertion sort), as libstdc++ leaves them.
    #[test]
    fn argsort_small_ties_in_index_order() {
        let x = [0.25, 0.5, 0.25, 0.5, 0.1, 0.5];
        let mut idx = Vec::new();
        argsort_desc(&x, &mut idx);
        assert_eq!(idx, [1, 3, 5, 0, 2, 4]);
    }

    /// Beyond 16 values ties come out in introsort's order: these are what g++ 12's `std::sort` gives with
    /// ggml's comparison (`x[a] > x[b]`) on the same values (the same program agreed on 24 arrays of 5 to 1000
    /// values with 1 to 251 distinct values).
    #[test]
    fn argsort_ties_as_libstdcxx() {
        let cases: [(&[u8], &[u32]); 2] = [
            (
                &[1, 1, 0, 1, 1, 1, 1, 2, 2, 0, 0, 1, 2, 1, 2, 0, 0],
                &[14, 12, 8, 7, 1, 13, 11, 6, 5, 4, 3, 0, 9, 10, 2, 15, 16],
            ),
            (
                &[
                    0, 2, 2, 0, 1, 2, 2, 1, 1, 2, 0, 2, 1, 2, 1, 1, 1, 2, 2, 2, 1, 0, 1, 1, 2, 2, 1, 2, 2, 0,
                    2, 1, 2,
                ],
                &[
                    1, 32, 30, 28, 27, 25, 24, 19, 18, 17, 13, 11, 2, 9, 5, 6, 12, 31, 4, 26, 23, 22, 20, 7,
                    8, 16, 15, 14, 21, 3, 29, 10, 0,
                ],
            ),
        ];
        for (x, want) in cases {
            let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let mut idx = Vec::new();
            argsort_desc(&x, &mut idx);
            assert_eq!(idx, want);
        }
    }

    /// A batched pass (each expert run once over the tokens routed to it, results scattered to their (token,
    /// slot) places) gives every token the logits of the token-by-token decode, bit for bit; so do a decode
    /// step of several sequences and the NPU-role dense executor. On qwen3moe.gguf (8 experts, 3 used), a prompt of 40 tokens: every expert gets
    /// several tokens of each pass.
    #[test]
    fn batched_experts_equal_token_by_token() {
        use crate::{Context, ContextParams, Logits, Model};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf-py/qwen3moe.gguf");
        let model = Model::load(&path).unwrap();
        let n_vocab = model.config().n_vocab;
        let text =
            "The old mill stood at the bend of the river, where the water ran fast over a shelf of stone.";
        let tokens = model.tokenizer().encode(text, true, false);
        assert!(tokens.len() >= 20 && tokens.len() < 64, "{} tokens", tokens.len());
        let mut batched = Context::new(&model, ContextParams::new(128, 2)).unwrap();
        assert_eq!(batched.take_route_trace(), crate::RouteTrace::default(), "recording is off by default");
        batched.set_route_trace(true);
        let all = batched.eval(&tokens, Logits::All).unwrap().to_vec();
        let trace = batched.take_route_trace();
        let mut single = Context::new(&model, ContextParams::new(128, 2)).unwrap();
        single.set_route_trace(true);
        for (t, &tok) in tokens.iter().enumerate() {
            let got = single.eval(&[tok], Logits::Last).unwrap();
            assert!(got == &all[t * n_vocab..(t + 1) * n_vocab], "token {t}: the batched logits differ");
        }
        // The routing record: one call per layer and pass, the same choices and active neurons (SiLU: all of
        // them) batched (layer-major) as token by token (token-major).
        let (n, n_layers, k) = (tokens.len(), model.config().n_layers, 3);
        assert_eq!(trace.call_tokens, vec![n as u32; n_layers]);
        let by_token = single.take_route_trace();
        assert_eq!(by_token.call_tokens, vec![1; n * n_layers]);
        for (t, l, slot) in
            (0..n).flat_map(|t| (0..n_layers).flat_map(move |l| (0..k).map(move |j| (t, l, j))))
        {
            let want = trace.choices[(l * n + t) * k + slot];
            assert_eq!(
                by_token.choices[(t * n_layers + l) * k + slot],
                want,
                "token {t} layer {l} slot {slot}"
            );
            assert_eq!(want.1 as usize, model.config().n_ff);
        }
        // The NPU-role dense executor gives the CPU's bits on the experts' products too.
        let npu = ContextParams { dense: crate::DenseChoice::Npu, ..ContextParams::new(128, 2) };
        let mut on_npu = Context::new(&model, npu).unwrap();
        assert!(on_npu.eval(&tokens, Logits::All).unwrap() == &all[..]);
        // Two sequences decoded together: each row as its own one-token step.
        let params = ContextParams { n_seq: 2, ..ContextParams::new(128, 2) };
        let mut two = Context::new(&model, params).unwrap();
        let half = tokens.len() / 2;
        two.eval_seq(0, &tokens[..half], Logits::Last).unwrap();
        two.eval_seq(1, &tokens[..half + 1], Logits::Last).unwrap();
        let rows = two.decode_batch(&[(0, tokens[half]), (1, tokens[half + 1])]).unwrap().to_vec();
        assert!(rows[..n_vocab] == all[half * n_vocab..(half + 1) * n_vocab]);
        assert!(rows[n_vocab..] == all[(half + 1) * n_vocab..(half + 2) * n_vocab]);
    }

    /// NaNs (a corrupt router) sort somehow, without a panic.
    #[test]
    fn argsort_survives_nan() {
        for n in [3, 16, 17, 40, 300] {
            let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { f32::NAN } else { (i % 7) as f32 }).collect();
            let mut idx = Vec::new();
            argsort_desc(&x, &mut idx);
            let mut sorted = idx.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        for n in [4, 8, 16, 20, 64, 128] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.0).collect();
            let want: Vec<f64> = {
                let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s).collect()
            };
            softmax_ggml(&mut x);
            for (a, b) in x.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-6, "{n}: {a} vs {b}");
            }
        }
    }
}
