//! The offloaded engine (`Context::new_offloaded`) against the in-memory one on the same packed synthetic model:
//! logits bit-identical in prefill and decode whatever the budget and switches, counters that add up, and the
//! refusals (a budget below the minimum, a GGUF, a damaged packed file).

use std::path::PathBuf;

use pinion_format::GgmlType;
use pinion_format::synth::{self, Activation, SynthArch, SynthConfig};
use pinion_plan::PlanError;
use pinion_predictor::LowRankPredictor;
use pinion_prepare::{self as prepare, PackStepOptions, ProfileOptions};
use pinion_runtime::{
    CachePolicy, Context, ContextParams, DeviceProfile, Logits, Model, PACKED_FILE_NAME, Plan, PlanOptions,
    RuntimeError, argmax,
};

use crate::prepare::{TempDir, synth_model};

const N_CTX: usize = 64;
const N_THREADS: usize = 2;
const N_PROMPT: usize = 20;
const N_DECODE: usize = 12;
/// How far the bytes left over the minimum may be from what a test asked for (the minimum counts this
/// process's resident set, which moves between measuring it and making the context).
const TOLERANCE: u64 = 8 << 10;

fn cfg() -> SynthConfig {
    SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() }
}

fn params() -> ContextParams {
    ContextParams::new(N_CTX, N_THREADS)
}

/// xorshift64: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A synthetic ReLU model packed at threshold sparsity 0.5, in its own directory.
struct Fixture {
    dir: TempDir,
    gguf: PathBuf,
    packed: PathBuf,
    /// Per layer, FFN inputs sampled while profiling (`n x d_model`).
    inputs: Vec<Vec<f32>>,
}

/// Profiles, calibrates and packs a fresh synthetic model; with `packed_predictors`, random predictors (see
/// [`random_predictors`]) are packed into the file.
fn fixture(tag: &str, down_type: GgmlType, packed_predictors: bool) -> Fixture {
    fixture_of(tag, &cfg(), down_type, packed_predictors)
}

/// [`fixture`] of a given synthetic model.
fn fixture_of(tag: &str, cfg: &SynthConfig, down_type: GgmlType, packed_predictors: bool) -> Fixture {
    let dir = TempDir::new(tag);
    let gguf = synth_model(&dir, cfg.act.name(), cfg);
    let model = Model::load(&gguf).unwrap();
    let opts = ProfileOptions { max_tokens: 768, chunk: 256, token_samples: 64, ..ProfileOptions::default() };
    let profile =
        prepare::profile_activations(&model, &synth::sample_text(1500), &opts, &mut |_, _| {}).unwrap();
    let th = prepare::calibrate(&model, &profile, 0.5, prepare::Rule::default()).unwrap();
    let freq = prepare::activation_frequencies(&model, &profile, &th).unwrap();
    // Per FFN unit (a layer, or an expert: its own routed tokens).
    let inputs: Vec<Vec<f32>> = (0..profile.n_layers()).map(|l| profile.sample_inputs(l)).collect();
    let ps = packed_predictors.then(|| random_predictors(&inputs, cfg.d_model, cfg.n_ff, 0x9e37_79b9));
    let packed = dir.0.join(PACKED_FILE_NAME);
    let route_frequency = prepare::route_frequencies(&model, &profile);
    let popts =
        PackStepOptions { cluster_neurons: 16, down_type, route_frequency, ..PackStepOptions::default() };
    prepare::pack_model(&gguf, &packed, &freq, &th, ps.as_deref(), &popts, &mut |_, _| {}).unwrap();
    Fixture { dir, gguf, packed, inputs }
}

/// Rank-8 predictors with pseudo-random weights, each threshold the 70th percentile of its logits over the
/// sampled FFN inputs: about 30% of the neurons predicted.
fn random_predictors(inputs: &[Vec<f32>], d: usize, n_ff: usize, seed: u64) -> Vec<LowRankPredictor> {
    const RANK: usize = 8;
    inputs
        .iter()
        .enumerate()
        .map(|(l, xs)| {
            let mut rng = Rng(seed + l as u64);
            let w1 = (0..RANK * d).map(|_| rng.sym() / (d as f32).sqrt()).collect();
            let b1 = (0..RANK).map(|_| 0.1 * rng.sym()).collect();
            let w2 = (0..n_ff * RANK).map(|_| rng.sym()).collect();
            let b2 = (0..n_ff).map(|_| 0.3 * rng.sym()).collect();
            let mut p = LowRankPredictor::new(d, RANK, n_ff, w1, b1, w2, b2).unwrap();
            let (mut h, mut out, mut all) = (vec![0.0; RANK], vec![0.0; n_ff], Vec::new());
            for x in xs.chunks_exact(d) {
                p.logits(x, &mut h, &mut out);
                all.extend_from_slice(&out);
            }
            all.sort_by(f32::total_cmp);
            p.set_threshold(all[all.len() * 7 / 10]);
            let share = all.iter().filter(|&&v| v >= p.threshold()).count() as f64 / all.len() as f64;
            assert!((0.2..0.4).contains(&share), "layer {l}: {share} of the neurons predicted");
            p
        })
        .collect()
}

/// The prompt: pseudo-random ids over the vocabulary.
fn prompt(n_vocab: usize) -> Vec<u32> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..N_PROMPT).map(|_| (rng.next_u64() % n_vocab as u64) as u32).collect()
}

/// The in-memory run: prefill logits of every prompt token, then greedy decode steps (the token fed, the logits).
struct Trace {
    prompt: Vec<u32>,
    prefill: Vec<f32>,
    steps: Vec<(u32, Vec<f32>)>,
}

fn reference(model: &Model, predictors: Option<&[LowRankPredictor]>) -> Trace {
    let mut ctx = Context::new(model, params()).unwrap();
    if let Some(ps) = predictors {
        ctx.set_predictors(Some(ps.to_vec())).unwrap();
    }
    let n_vocab = model.config().n_vocab;
    let prompt = prompt(n_vocab);
    let prefill = ctx.eval(&prompt, Logits::All).unwrap().to_vec();
    let mut next = argmax(prefill[prefill.len() - n_vocab..].iter().copied());
    let mut steps = Vec::new();
    for _ in 0..N_DECODE {
        let logits = ctx.eval(&[next], Logits::Last).unwrap().to_vec();
        steps.push((next, logits));
        next = argmax(steps.last().unwrap().1.iter().copied());
    }
    // Not a degenerate trajectory: the greedy tokens move.
    let mut distinct: Vec<u32> = steps.iter().map(|s| s.0).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 2, "greedy tokens {:?}", steps.iter().map(|s| s.0).collect::<Vec<_>>());
    Trace { prompt, prefill, steps }
}

/// `None` when every value has the same bits, else what differs.
fn bit_diff(got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} logits, {} in memory", got.len(), want.len()));
    }
    let diffs: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    let &first = diffs.first()?;
    let max = diffs.iter().map(|&i| (got[i] - want[i]).abs()).fold(0.0f32, f32::max);
    Some(format!(
        "{} of {} logits differ (first at {first}: {:e} vs {:e} in memory; max |diff| {max:e})",
        diffs.len(),
        got.len(),
        got[first],
        want[first]
    ))
}

/// Runs the trace's tokens through `ctx` (greedy as long as the logits agree, since each fed token is the argmax
/// of the logits before it); the first step whose logits are not bit-identical, if any.
fn replay(ctx: &mut Context<'_>, want: &Trace) -> Result<(), String> {
    let got = ctx.eval(&want.prompt, Logits::All).map_err(|e| format!("prefill: {e}"))?;
    if let Some(d) = bit_diff(got, &want.prefill) {
        return Err(format!("prefill: {d}"));
    }
    for (i, (tok, logits)) in want.steps.iter().enumerate() {
        let got = ctx.eval(&[*tok], Logits::Last).map_err(|e| format!("decode step {i}: {e}"))?;
        if let Some(d) = bit_diff(got, logits) {
            return Err(format!("decode step {i} (token {tok}): {d}"));
        }
    }
    Ok(())
}

/// Greedy prefill and decode on `ctx` and `mem` side by side; the first step whose logits differ, if any.
fn replay_against(ctx: &mut Context<'_>, mem: &mut Context<'_>, n_vocab: usize) -> Result<(), String> {
    let p = prompt(n_vocab);
    let want = mem.eval(&p, Logits::All).unwrap().to_vec();
    let got = ctx.eval(&p, Logits::All).map_err(|e| format!("prefill: {e}"))?;
    if let Some(d) = bit_diff(got, &want) {
        return Err(format!("prefill: {d}"));
    }
    let mut next = argmax(want[want.len() - n_vocab..].iter().copied());
    for i in 0..N_DECODE {
        let want = mem.eval(&[next], Logits::Last).unwrap().to_vec();
        let got = ctx.eval(&[next], Logits::Last).map_err(|e| format!("decode step {i}: {e}"))?;
        if let Some(d) = bit_diff(got, &want) {
            return Err(format!("decode step {i} (token {next}): {d}"));
        }
        next = argmax(want.iter().copied());
    }
    Ok(())
}

/// The option sets under test, by name.
const OPTION_SETS: [&str; 6] = ["default", "no-bundle", "no-cache", "no-pipeline", "llmflash-2", "none"];

fn options(set: &str) -> PlanOptions {
    let o = PlanOptions::new(0);
    match set {
        "default" => o,
        "no-bundle" => PlanOptions { bundle: false, ..o },
        "no-cache" => PlanOptions { cache: false, ..o },
        "no-pipeline" => PlanOptions { pipeline: false, ..o },
        "llmflash-2" => PlanOptions { policy: CachePolicy::LlmFlash { window: 2 }, ..o },
        "none" => PlanOptions { bundle: false, cache: false, pipeline: false, ..o },
        _ => unreachable!("{set}"),
    }
}

/// The smallest budget an offloaded context of `model` under `opts` is accepted with now: the minimum a
/// refusal of one byte names.
fn minimum(model: &Model, opts: &PlanOptions) -> u64 {
    match Context::new_offloaded(model, params(), PlanOptions { budget: 1, ..opts.clone() }, &device()) {
        Err(RuntimeError::Plan(PlanError::BudgetTooSmall { budget: 1, minimum, .. })) => minimum,
        Err(e) => panic!("a budget of 1 byte: {e}"),
        Ok(_) => panic!("a budget of 1 byte was accepted"),
    }
}

/// Bytes of a plan beyond its minimum.
fn over_minimum(plan: &Plan) -> u64 {
    plan.memory.budget - plan.memory.minimum()
}

/// The device profile the tests plan with (no measured one in a test's directory).
fn device() -> DeviceProfile {
    DeviceProfile::reference()
}

/// An offloaded context under `opts`, budget and all.
fn new_offloaded<'m>(
    model: &'m Model,
    p: ContextParams,
    opts: PlanOptions,
) -> Result<Context<'m>, RuntimeError> {
    Context::new_offloaded(model, p, opts, &device())
}

/// The minimum a refused budget names.
fn refused_minimum(e: &RuntimeError) -> Option<u64> {
    match e {
        RuntimeError::Plan(PlanError::BudgetTooSmall { minimum, .. }) => Some(*minimum),
        _ => None,
    }
}

/// An offloaded context of `model` with `extra` bytes over its minimum. The minimum counts the resident set of
/// this process, which other tests running beside this one move: measured again (a refusal names the minimum of
/// its moment) until the plan made is within [`TOLERANCE`] of `extra`; after many tries, whatever is accepted
/// next.
fn offloaded<'m>(model: &'m Model, opts: &PlanOptions, extra: u64) -> Context<'m> {
    const TRIES: usize = 50;
    let mut min = minimum(model, opts);
    for attempt in 0..=TRIES {
        let budget = min + extra;
        // No other context is alive while this one measures the process: a kept one would count in it.
        match new_offloaded(model, params(), PlanOptions { budget, ..opts.clone() }) {
            Ok(ctx) => {
                let plan = ctx.plan().expect("an offloaded context has a plan");
                check_plan(plan);
                if over_minimum(plan).abs_diff(extra) <= TOLERANCE || attempt == TRIES {
                    return ctx;
                }
                min = plan.memory.minimum();
            }
            Err(e) => match refused_minimum(&e) {
                Some(minimum) => {
                    min = minimum;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                None => panic!("budget {budget}: {e}"),
            },
        }
    }
    panic!("{extra} bytes over the minimum were refused {} times", TRIES + 1)
}

/// What every plan must satisfy.
fn check_plan(plan: &Plan) {
    let m = &plan.memory;
    assert!(m.total() <= m.budget, "plan of {} bytes over a budget of {}: {plan:?}", m.total(), m.budget);
    assert!(m.head <= m.head_total, "{plan:?}");
    assert!(m.pinned_gates + m.pinned_bundles <= m.ffn_total, "{plan:?}");
}

/// The budgets under test, as bytes over the minimum: almost nothing (16 KiB: most of the head streamed, no FFN
/// cached; the synthetic head is only 72 KiB, so 64 KiB would keep most of it), a quarter and a half of the FFN
/// and head, and all of it with room to spare.
fn extras(model: &Model) -> [(&'static str, u64); 4] {
    let ctx = offloaded(model, &PlanOptions::new(0), 16 << 10);
    let plan = ctx.plan().unwrap();
    let all = plan.memory.ffn_total + plan.memory.head_total;
    // The smallest budget does stream: the model is big enough for these tiers to mean something.
    assert!(plan.head_rows < model.config().n_vocab && plan.memory.pinned_bundles == 0, "{plan:?}");
    [("min+16KiB", 16 << 10), ("min+1/4", all / 4), ("min+1/2", all / 2), ("min+all+1MiB", all + (1 << 20))]
}

/// Every budget tier and option set against the in-memory trace, `predictors` set on both contexts; returns the
/// failures, one line each.
fn sweep(
    model: &Model,
    predictors: Option<&[LowRankPredictor]>,
    tiers: &[(&str, u64)],
    sets: &[&str],
    label: &str,
) -> Vec<String> {
    let want = reference(model, predictors);
    let mut failures = Vec::new();
    for &(tier, extra) in tiers {
        for &set in sets {
            // Predictors set on the context take memory of their own: the budget leaves room for them.
            let own: u64 = predictors.map_or(0, |ps| ps.iter().map(LowRankPredictor::weight_bytes).sum());
            let mut ctx = offloaded(model, &options(set), extra + own);
            if let Some(ps) = predictors {
                ctx.set_predictors(Some(ps.to_vec())).unwrap();
                let plan = ctx.plan().unwrap();
                check_plan(plan);
                assert_eq!(plan.memory.predictors, own, "the plan is made anew with the predictors");
            }
            assert_eq!(ctx.uses_predictors(), predictors.is_some() || model.predictors().is_some());
            if let Err(e) = replay(&mut ctx, &want) {
                let plan = ctx.plan().unwrap();
                let m = &plan.memory;
                failures.push(format!(
                    "{label}, budget {tier} ({} over the minimum: head rows {}, pinned gates {} bundles {}, LRU {}), options {set}: {e}",
                    over_minimum(plan),
                    plan.head_rows,
                    m.pinned_gates,
                    m.pinned_bundles,
                    m.cold
                ));
            }
        }
    }
    failures
}

fn assert_no_failures(failures: &[String], runs: usize) {
    assert!(
        failures.is_empty(),
        "{} of {runs} offloaded runs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn offloaded_threshold_decode_is_bit_identical_to_memory() {
    let f = fixture("offload-thresholds", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    assert_eq!(model.sparsity().rule.as_ref().map(|r| &r.thresholds[..]), Some(&[0.0, 0.0][..]));
    assert!(model.predictors().is_none());
    let tiers = extras(&model);
    let failures = sweep(&model, None, &tiers, &OPTION_SETS, "thresholds");
    assert_no_failures(&failures, tiers.len() * OPTION_SETS.len());
}

/// Gemma 3's block (per-head Q/K norms, post-norms, NeoX RoPE, scaled embeddings, GELU with weighted thresholds,
/// and on the first of the two layers a sliding window shorter than the prompt) runs the same bits offloaded as
/// in memory.
#[test]
fn gemma3_shape_offloaded_decode_is_bit_identical_to_memory() {
    let cfg = SynthConfig {
        arch: SynthArch::Gemma3 { sliding_window: 7, swa_pattern: 2 },
        act: Activation::Gelu,
        ..cfg()
    };
    let f = fixture_of("offload-gemma3", &cfg, GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let c = model.config();
    assert_eq!((c.arch.as_str(), c.window(0), c.window(1)), ("gemma3", Some(7), None));
    // The weighted rule (the default): per-neuron scales travel with the packed model.
    let rule = model.sparsity().rule.clone().unwrap();
    assert!(rule.thresholds.iter().all(|&t| t > 0.0) && rule.scales.is_some());
    let tiers = extras(&model);
    let failures = sweep(&model, None, &tiers, &OPTION_SETS, "thresholds");
    assert_no_failures(&failures, tiers.len() * OPTION_SETS.len());
}

/// A Mixtral-style mixture of experts (4 experts, 2 used, dReLU): each expert a packed FFN unit, the router in
/// the fixed region, the chosen experts' neurons read after the router; the same bits offloaded as in memory at
/// every budget and switch.
#[test]
fn moe_offloaded_decode_is_bit_identical_to_memory() {
    let cfg = moe_cfg(SynthArch::Llama, Activation::Drelu);
    let f = fixture_of("offload-moe", &cfg, GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let c = model.config();
    assert_eq!((c.moe.map(|m| m.n_expert), c.n_units()), (Some(4), 8));
    let routes = model.route_frequency().unwrap();
    for l in 0..2 {
        let sum: f32 = routes[l * 4..(l + 1) * 4].iter().sum();
        assert!(
            (sum - 2.0).abs() < 1e-3,
            "layer {l}: routing frequencies sum to {sum}, not the 2 experts used"
        );
    }
    let tiers = extras(&model);
    let failures = sweep(&model, None, &tiers, &OPTION_SETS, "moe");
    assert_no_failures(&failures, tiers.len() * OPTION_SETS.len());
    // Predictors per expert, trained on the tokens routed to it (here random ones over those tokens' inputs).
    let ps = random_predictors(&f.inputs, cfg.d_model, cfg.n_ff, 0x006d_6f65);
    assert_eq!(ps.len(), 8);
    let failures = sweep(&model, Some(&ps), &tiers, &OPTION_SETS, "moe predictors");
    assert_no_failures(&failures, tiers.len() * OPTION_SETS.len());
    // The counters of a MoE: per token, each layer's 2 routed experts; all served from memory when everything
    // fits, none at the smallest budget (gates are read); neurons counted per expert.
    for (tier, hits) in [(tiers[3].1, 1.0), (tiers[0].1, 0.0)] {
        let mut ctx = offloaded(&model, &PlanOptions::new(0), tier);
        let mut next = argmax(ctx.eval(&prompt(c.n_vocab), Logits::Last).unwrap().iter().copied());
        for _ in 0..N_DECODE {
            next = argmax(ctx.eval(&[next], Logits::Last).unwrap().iter().copied());
        }
        let s = ctx.offload_stats().unwrap();
        assert_eq!((s.units_per_token(), s.unit_hit_rate()), (4.0, hits), "{s:?}");
        assert_eq!(s.neurons_per_layer.len(), 8);
        assert_eq!(s.neurons_per_layer_per_token(4).len(), 2);
    }
}

/// qwen3moe's experts (SiLU, top-k weights renormalized, per-head Q/K norms) with weighted thresholds per expert,
/// offloaded at two budgets, and several sequences decoded together.
#[test]
fn qwen3moe_offloaded_decode_with_thresholds_is_bit_identical_to_memory() {
    let cfg = moe_cfg(SynthArch::Qwen3Moe, Activation::Silu);
    let f = fixture_of("offload-qwen3moe", &cfg, GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let rule = model.sparsity().rule.clone().unwrap();
    assert_eq!(rule.thresholds.len(), 8);
    // The weighted rule (the default) per expert: its scales from the expert's own token samples.
    assert!(rule.thresholds.iter().all(|&t| t > 0.0), "{:?}", rule.thresholds);
    assert!(rule.scales.as_ref().is_some_and(|s| s.len() == 8), "scales per expert");
    let tiers = extras(&model);
    let tiers = [tiers[0], tiers[2]];
    let failures = sweep(&model, None, &tiers, &["default", "no-pipeline"], "qwen3moe");
    assert_no_failures(&failures, tiers.len() * 2);
    // Several sequences decoded together: each gets the bits it gets alone, in memory and offloaded.
    let base = prompt(model.config().n_vocab);
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| base[i..N_PROMPT - 2 * i].to_vec()).collect();
    let with = |n_seq: usize| ContextParams { n_seq, ..params() };
    check_batched("qwen3moe packed", &|n| Context::new(&model, with(n)).unwrap(), &prompts);
    let offloaded = |n_seq: usize| {
        let tiny = PlanOptions { budget: 1, ..options("default") };
        let min = refused_minimum(&new_offloaded(&model, with(n_seq), tiny).unwrap_err()).unwrap();
        let opts = PlanOptions { budget: min + tiers[0].1 + (256 << 10), ..options("default") };
        new_offloaded(&model, with(n_seq), opts).unwrap()
    };
    check_batched("qwen3moe offloaded", &offloaded, &prompts);
}

/// A small mixture of experts of `arch`: 2 layers of 4 experts, 2 used per token.
fn moe_cfg(arch: SynthArch, act: Activation) -> SynthConfig {
    let head_len = matches!(arch, SynthArch::Qwen3Moe).then_some(64);
    SynthConfig { arch, act, n_experts: 4, n_experts_used: 2, head_len, ..cfg() }
}

#[test]
fn offloaded_predictor_decode_is_bit_identical_to_memory() {
    let f = fixture("offload-predictors", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let ps = random_predictors(&f.inputs, cfg().d_model, cfg().n_ff, 0x51_7cc1);
    let tiers = extras(&model);
    let failures = sweep(&model, Some(&ps), &tiers, &OPTION_SETS, "predictors set");
    assert_no_failures(&failures, tiers.len() * OPTION_SETS.len());
}

/// Predictors that do not fit the budget are refused with the minimum they need, and the context goes on
/// with what it had (same logits as a context never given them).
#[test]
fn predictors_over_the_budget_are_refused_and_the_context_goes_on() {
    let f = fixture("offload-predictors-refused", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let ps = random_predictors(&f.inputs, cfg().d_model, cfg().n_ff, 0x51_7cc2);
    let mut ctx = offloaded(&model, &options("default"), 0);
    let before = ctx.plan().unwrap().clone();
    match ctx.set_predictors(Some(ps)) {
        Err(RuntimeError::Plan(PlanError::BudgetTooSmall { budget, minimum, .. })) => {
            assert_eq!(budget, before.memory.budget);
            assert!(minimum > before.memory.minimum(), "{minimum} vs {}", before.memory.minimum());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!ctx.uses_predictors());
    assert_eq!(ctx.plan().unwrap(), &before);
    let mut mem = Context::new(&model, params()).unwrap();
    if let Err(e) = replay_against(&mut ctx, &mut mem, model.config().n_vocab) {
        panic!("after the refusal: {e}");
    }
}

/// F32 down columns, and predictors packed into the file (on by default, and in the plan): a few tiers and
/// option sets, with the predictors and with thresholds alone.
#[test]
fn offloaded_decode_with_f32_down_and_packed_predictors_is_bit_identical() {
    let f = fixture("offload-f32", GgmlType::F32, true);
    let model = Model::load(&f.packed).unwrap();
    assert!(model.predictors().is_some());
    let tiers = extras(&model);
    let tiers = [tiers[0], tiers[1], tiers[3]];
    let sets = ["default", "llmflash-2", "none"];
    let mut failures = sweep(&model, None, &tiers, &sets, "packed predictors");
    // Thresholds alone (the predictors switched off on both contexts).
    for &(tier, extra) in &tiers {
        let mut ctx = offloaded(&model, &options("default"), extra);
        ctx.use_predictors(false).unwrap();
        let mut mem = Context::new(&model, params()).unwrap();
        mem.use_predictors(false).unwrap();
        if let Err(e) = replay_against(&mut ctx, &mut mem, model.config().n_vocab) {
            failures.push(format!("F32 thresholds alone, budget {tier}, options default: {e}"));
        }
    }
    assert_no_failures(&failures, tiers.len() * (sets.len() + 1));
}

#[test]
fn offload_counters_add_up() {
    let f = fixture("offload-stats", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let c = model.config().clone();
    let layers = model.packed_layers().unwrap();
    let tiers = extras(&model);
    let prompt = prompt(c.n_vocab);
    let decode = |ctx: &mut Context<'_>| {
        let logits = ctx.eval(&prompt, Logits::Last).unwrap();
        let mut next = argmax(logits.iter().copied());
        assert_eq!(ctx.offload_stats().unwrap().tokens, 0, "prefill counts no decode token");
        for _ in 0..N_DECODE {
            next = argmax(ctx.eval(&[next], Logits::Last).unwrap().iter().copied());
        }
        ctx.offload_stats().unwrap().clone()
    };
    // An in-memory context has no counters.
    let mem = Context::new(&model, params()).unwrap();
    assert!(mem.offload_stats().is_none() && mem.plan().is_none());

    // Everything in memory: nothing read but the embeddings (this model's are not tied to the head, and the
    // offloaded run reads every embedding row it uses).
    let mut ctx = offloaded(&model, &PlanOptions::new(0), tiers[3].1);
    let plan = ctx.plan().unwrap().clone();
    assert_eq!(plan.head_rows, c.n_vocab, "{plan:?}");
    assert!(plan.layers.iter().all(|l| l.pinned_bundles == c.n_ff), "{plan:?}");
    assert_eq!(plan.memory.pinned_gates + plan.memory.pinned_bundles, plan.memory.ffn_total, "{plan:?}");
    let s = decode(&mut ctx);
    assert_eq!(s.tokens, N_DECODE as u64);
    assert_eq!(s.latencies.len(), N_DECODE);
    assert!(s.token_seconds > 0.0);
    assert_eq!((s.misses, s.lru_hits, s.gate_misses), (0, 0, 0), "{s:?}");
    assert!(s.pinned_hits > 0 && s.hit_rate() == 1.0, "{s:?}");
    assert_eq!((s.gate_bytes, s.bundle_bytes, s.head_bytes), (0, 0, 0), "{s:?}");
    let embd_row = s.embd_bytes / N_DECODE as u64;
    assert!(
        embd_row > 0 && s.embd_bytes == embd_row * N_DECODE as u64 && embd_row <= 4 * c.d_model as u64,
        "{s:?}"
    );
    assert!((s.mb_read_per_token() - embd_row as f64 / 1e6).abs() < 1e-12, "{s:?}");
    assert_eq!(s.gate_hits, (N_DECODE * layers.iter().map(|p| p.n_clusters()).sum::<usize>()) as u64);
    // The neurons computed: every pinned hit (with thresholds, each passing neuron is used once), a sparse share.
    assert_eq!(s.neurons_per_layer.len(), 2);
    assert_eq!(s.neurons_per_layer.iter().sum::<u64>(), s.pinned_hits, "{s:?}");
    assert_eq!(
        (s.unit_uses, s.unit_hits),
        (2 * N_DECODE as u64, 2 * N_DECODE as u64),
        "every layer from memory"
    );
    for (l, &n) in s.neurons_per_layer.iter().enumerate() {
        let share = n as f64 / (N_DECODE * c.n_ff) as f64;
        assert!((0.01..0.6).contains(&share), "layer {l}: {share} of the neurons computed");
    }
    ctx.reset_offload_stats();
    let z = ctx.offload_stats().unwrap();
    assert_eq!((z.tokens, z.bytes_read(), z.misses, z.pinned_hits), (0, 0, 0, 0));
    assert_eq!(z.neurons_per_layer, vec![0, 0]);

    // Almost nothing in memory: every neuron used is read, its gates with it, and the head partly streamed.
    let mut ctx = offloaded(&model, &PlanOptions::new(0), tiers[0].1);
    let plan = ctx.plan().unwrap().clone();
    assert!(
        plan.head_rows < c.n_vocab && plan.memory.pinned_gates + plan.memory.pinned_bundles == 0,
        "{plan:?}"
    );
    let s = decode(&mut ctx);
    assert_eq!(s.tokens, N_DECODE as u64);
    assert!(s.misses > 0 && s.hit_rate() < 1.0, "{s:?}");
    assert_eq!((s.unit_uses, s.unit_hits), (2 * N_DECODE as u64, 0), "every layer reads its gates");
    assert_eq!(s.pinned_hits, 0, "{s:?}");
    if plan.memory.cold == 0 {
        assert_eq!((s.lru_hits, s.hit_rate()), (0, 0.0), "{s:?}");
    }
    assert_eq!(s.misses + s.lru_hits, s.neurons_per_layer.iter().sum::<u64>(), "{s:?}");
    let bundle = layers[0].bundle_bytes() as u64;
    assert_eq!(s.bundle_bytes, s.misses * bundle, "{s:?}");
    let gates_per_token: u64 = layers.iter().map(|p| (p.n_ff * p.gate_row_bytes()) as u64).sum();
    assert_eq!(s.gate_bytes, N_DECODE as u64 * gates_per_token, "{s:?}");
    let head_row = plan.memory.head_total / c.n_vocab as u64;
    assert_eq!(s.head_bytes, N_DECODE as u64 * (c.n_vocab - plan.head_rows) as u64 * head_row, "{s:?}");
    assert!(s.mb_read_per_token() * 1e6 >= (gates_per_token + bundle) as f64, "{s:?}");
    // Without bundles the same neurons cost the same bytes, in twice the reads.
    let mut ctx = offloaded(&model, &options("no-bundle"), tiers[0].1);
    let s2 = decode(&mut ctx);
    assert_eq!((s2.misses, s2.bundle_bytes), (s.misses, s.bundle_bytes));
}

/// The plan stays within its budget across budgets, also just past the point where the whole head is in memory
/// and the first neurons get pinned. With predictors (here packed into the file, so the plan knows of them) a
/// pinned neuron is paid for with its bundle and one gate row, but its whole cluster's gate block is pinned.
#[test]
fn memory_plans_stay_within_the_budget() {
    let mut failures = Vec::new();
    for packed_predictors in [false, true] {
        let tag = if packed_predictors { "offload-plan-p" } else { "offload-plan-t" };
        let f = fixture(tag, GgmlType::Q8_0, packed_predictors);
        let model = Model::load(&f.packed).unwrap();
        let plan = offloaded(&model, &PlanOptions::new(0), 0).plan().unwrap().memory.clone();
        let mut extra = vec![0, 4096, plan.head_total - 1, plan.head_total, plan.ffn_total / 3];
        extra.extend((1..24).map(|i| plan.head_total + 250 * i));
        for e in extra {
            for set in ["default", "llmflash-2"] {
                let opts = options(set);
                let budget = minimum(&model, &opts) + e;
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    new_offloaded(&model, params(), PlanOptions { budget, ..opts })
                        .map(|ctx| ctx.plan().unwrap().memory.clone())
                }));
                let what =
                    format!("predictors packed: {packed_predictors}, options {set}, budget minimum + {e}");
                match made {
                    Ok(Ok(plan)) if plan.total() > plan.budget => failures.push(format!(
                        "{what}: plans {} bytes, {} over the budget (head {}, pinned gates {} bundles {}, LRU {})",
                        plan.total(),
                        plan.total() - plan.budget,
                        plan.head,
                        plan.pinned_gates,
                        plan.pinned_bundles,
                        plan.cold
                    )),
                    Ok(Ok(_)) | Ok(Err(RuntimeError::Plan(PlanError::BudgetTooSmall { .. }))) => {}
                    Ok(Err(err)) => failures.push(format!("{what}: {err}")),
                    Err(p) => failures.push(format!(
                        "{what}: Context::new_offloaded panicked: {}",
                        p.downcast_ref::<String>()
                            .map(String::as_str)
                            .or(p.downcast_ref::<&str>().copied())
                            .unwrap_or("?")
                    )),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} plans break their budget:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_budget_below_the_minimum_is_refused_with_the_minimum() {
    let f = fixture("offload-refuse", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let e = new_offloaded(&model, params(), PlanOptions::new(1)).unwrap_err();
    let RuntimeError::Plan(PlanError::BudgetTooSmall { budget, minimum, ref detail, kv }) = e else {
        panic!("{e}")
    };
    assert_eq!(budget, 1);
    // The process itself (test binary, model metadata) is part of the minimum.
    assert!(minimum > 2 << 20, "{minimum}");
    assert!(detail.contains("process") && detail.contains("KV"), "{detail}");
    assert!(kv > 0 && kv < minimum, "{kv} of {minimum}");
    // A context whose KV cache dominates the minimum is told so.
    let big = ContextParams::new(1 << 16, N_THREADS);
    let big_e = new_offloaded(&model, big, PlanOptions::new(1)).unwrap_err();
    let RuntimeError::Plan(PlanError::BudgetTooSmall { kv: big_kv, minimum: big_min, .. }) = big_e else {
        panic!("{big_e}")
    };
    assert!(big_kv * 3 >= big_min, "{big_kv} of {big_min}");
    assert!(big_e.to_string().contains("or lower the context with -c"), "{big_e}");
    assert!(!e.to_string().contains("lower the context"), "{e}");
    let msg = e.to_string();
    let min_mib = format!("{:.1} MiB", minimum as f64 / (1u64 << 20) as f64);
    assert!(
        msg.contains("too small") && msg.contains(&min_mib) && msg.contains("raise --mem-budget"),
        "{msg}"
    );
    // Half the minimum is refused too, and some MiB over it is accepted with a plan whose minimum is the one
    // named. (The process's resident set is part of it, and tests running in other threads of this process
    // move it: hence the slack.)
    let e = new_offloaded(&model, params(), PlanOptions::new(minimum / 2)).unwrap_err();
    assert!(refused_minimum(&e).is_some(), "{e}");
    const SLACK: u64 = 32 << 20;
    let ctx = new_offloaded(&model, params(), PlanOptions::new(minimum + SLACK)).unwrap();
    let plan = ctx.plan().unwrap();
    let m = &plan.memory;
    assert!(m.minimum().abs_diff(minimum) < SLACK, "{} vs {minimum}", m.minimum());
    assert_eq!(plan.options.budget, minimum + SLACK);
    assert!(plan.render().contains("memory budget"), "{}", plan.render());
}

#[test]
fn a_gguf_is_not_offloaded() {
    let f = fixture("offload-gguf", GgmlType::Q8_0, false);
    let gguf = Model::load(&f.gguf).unwrap();
    assert!(!gguf.is_packed());
    for budget in [1, 1 << 40] {
        let e = new_offloaded(&gguf, params(), PlanOptions::new(budget)).unwrap_err();
        assert!(matches!(e, RuntimeError::NotPacked), "{e}");
    }
}

/// Copies of the packed file cut short, grown, or with a byte flipped in the header, the resident section or the
/// index: each is an error when loaded, never a panic (the FFN section is checked as it is read, not at load).
#[test]
fn a_damaged_packed_file_is_an_error_at_load() {
    let f = fixture("offload-damaged", GgmlType::Q8_0, false);
    let bytes = std::fs::read(&f.packed).unwrap();
    let n = bytes.len();
    let header = pinion_format::packed::PackedHeader::parse(&bytes).unwrap();
    let (res, index) = (header.resident_offset as usize, header.index_offset as usize);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 7, 100, 4095, 4096, res + 100, n / 2, index, n - 1] {
        cases.push((format!("cut to {cut} bytes"), bytes[..cut].to_vec()));
    }
    cases.push(("one byte appended".into(), [&bytes[..], &[0]].concat()));
    for (what, at) in [
        ("magic", 0),
        ("version", 8),
        ("header field", 24),
        ("header padding", 1000),
        ("resident section start", res + 4),
        ("resident section middle", res + (header.resident_len as usize) / 2),
        ("index", index + 3),
        ("last byte", n - 1),
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        cases.push((format!("{what} (byte {at}) flipped"), b));
    }
    let damaged = f.dir.0.join("damaged.pinion");
    for (what, b) in cases {
        std::fs::write(&damaged, &b).unwrap();
        let res = std::panic::catch_unwind(|| Model::load(&damaged).map(|_| ()));
        match res {
            Ok(Err(RuntimeError::Format { ref path, .. } | RuntimeError::Io { ref path, .. })) => {
                assert_eq!(path, &damaged, "{what}");
            }
            Ok(Err(e)) => panic!("{what}: an untyped error: {e:?}"),
            Ok(Ok(())) => panic!("{what}: loaded"),
            Err(_) => panic!("{what}: panicked"),
        }
    }
    // The undamaged copy loads.
    std::fs::write(&damaged, &bytes).unwrap();
    assert!(Model::load(&damaged).is_ok());
}

/// A prompt longer than the offloaded context's 64-token passes: its prefill logits (and the decode after it)
/// are those of the in-memory context with the same `n_ubatch`, whose batches the offloaded context cuts into
/// passes (100 tokens: one batch in memory, f32 attention; two passes offloaded that must keep that kernel).
#[test]
fn a_long_prompt_prefills_as_in_memory() {
    let f = fixture("offload-long", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let n_vocab = model.config().n_vocab;
    let mut rng = Rng(77);
    let p: Vec<u32> = (0..200).map(|_| (rng.next_u64() % n_vocab as u64) as u32).collect();
    let params = |n_ubatch: usize| ContextParams { n_ubatch, ..ContextParams::new(256, N_THREADS) };
    // 100 tokens in one 512 batch; 200 tokens in 128-token batches (128 + 72, cut into 64 + 64 and 36 + 36);
    // 130 tokens in 65-token batches (each cut into 33 + 32).
    for (len, n_ubatch) in [(100, 512), (200, 128), (130, 65)] {
        let p = &p[..len];
        let mut off = new_offloaded(&model, params(n_ubatch), PlanOptions::new(1 << 40)).unwrap();
        let got = off.eval(p, Logits::All).unwrap().to_vec();
        let got_next = off.eval(&[5], Logits::Last).unwrap().to_vec();
        let mut mem = Context::new(&model, params(n_ubatch)).unwrap();
        let want = mem.eval(p, Logits::All).unwrap().to_vec();
        let want_next = mem.eval(&[5], Logits::Last).unwrap().to_vec();
        assert_eq!(bit_diff(&got, &want), None, "prefill of {len} tokens, n_ubatch {n_ubatch}");
        assert_eq!(bit_diff(&got_next, &want_next), None, "decode after {len} tokens, n_ubatch {n_ubatch}");
    }
}

/// The same logits with one read in flight at a time, and on one and three threads.
#[test]
fn offloaded_decode_is_bit_identical_with_one_read_in_flight_and_other_thread_counts() {
    let f = fixture("offload-qd", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let want = reference(&model, None);
    let mut failures = Vec::new();
    for set in ["default", "none"] {
        let opts = PlanOptions { queue_depth: Some(1), ..options(set) };
        let mut ctx = offloaded(&model, &opts, 16 << 10);
        if let Err(e) = replay(&mut ctx, &want) {
            failures.push(format!("queue depth 1, options {set}: {e}"));
        }
    }
    for n_threads in [1, 3] {
        let p = ContextParams::new(N_CTX, n_threads);
        let mut mem = Context::new(&model, p.clone()).unwrap();
        let mut off = new_offloaded(&model, p, PlanOptions::new(1 << 40)).unwrap();
        off.reset_offload_stats();
        if let Err(e) = replay_against(&mut off, &mut mem, model.config().n_vocab) {
            failures.push(format!("{n_threads} threads: {e}"));
        }
    }
    assert_no_failures(&failures, 4);
}

/// The model file cut short in its FFN section while an offloaded context reads it: the read that fails is a
/// typed read error naming the file (in prefill and in decode, whatever the switches), and the context refuses
/// to go on.
#[test]
fn a_model_file_cut_short_under_an_open_context_is_an_error() {
    let f = fixture("offload-cut", GgmlType::Q8_0, false);
    let copy = f.dir.0.join("copy.pinion");
    std::fs::copy(&f.packed, &copy).unwrap();
    let header = pinion_format::packed::PackedHeader::parse(&std::fs::read(&copy).unwrap()).unwrap();
    // The resident section (attention, norms, head) stays whole: the cut is in the FFN section.
    let cut = header.ffn_offset + header.ffn_len / 2;
    let model = Model::load(&copy).unwrap();
    let p = prompt(model.config().n_vocab);
    for set in OPTION_SETS {
        for decode in [false, true] {
            std::fs::copy(&f.packed, &copy).unwrap();
            let mut ctx = offloaded(&model, &options(set), 16 << 10);
            if decode {
                ctx.eval(&p, Logits::Last).unwrap();
            }
            std::fs::OpenOptions::new().write(true).open(&copy).unwrap().set_len(cut).unwrap();
            let e = match decode {
                true => ctx.eval(&[3], Logits::Last).map(|_| ()).unwrap_err(),
                false => ctx.eval(&p, Logits::Last).map(|_| ()).unwrap_err(),
            };
            assert!(
                matches!(e, RuntimeError::OffloadRead { ref path, .. } if path == &copy)
                    && e.to_string().contains("end of file"),
                "{set}: {e}"
            );
            let e = ctx.eval(&[4], Logits::Last).map(|_| ()).unwrap_err();
            assert!(e.to_string().contains("make a new context"), "{set}: {e}");
        }
    }
}

/// One byte flipped on disk in a gate block, in a bundle and in a streamed output-head row, after the model was
/// loaded and its context made: the read that brings it in fails with the checksum error naming the layer and
/// cluster, position or row, and its file offset; no logits come out of that step, and the context refuses to
/// go on.
#[test]
fn a_byte_flipped_on_disk_after_load_is_a_checksum_error() {
    let f = fixture("offload-flip", GgmlType::Q8_0, false);
    let copy = f.dir.0.join("flip.pinion");
    let n_vocab = {
        let m = Model::load(&f.packed).unwrap();
        m.config().n_vocab
    };
    let p = prompt(n_vocab);
    for target in ["gate block", "bundle", "head row"] {
        std::fs::copy(&f.packed, &copy).unwrap();
        let model = Model::load(&copy).unwrap();
        let pl = model.packed_layers().unwrap()[1].clone();
        let mut ctx = offloaded(&model, &options("default"), 16 << 10);
        let plan = ctx.plan().unwrap().clone();
        let lp = &plan.layers[1];
        // Prefill and one decode step read everything once and check it.
        let first = ctx.eval(&p, Logits::Last).unwrap();
        let mut next = argmax(first.iter().copied());
        next = argmax(ctx.eval(&[next], Logits::Last).unwrap().iter().copied());
        // What to damage: the first unpinned cluster's gate block; the hottest unpinned neuron's bundle (read
        // every token in a layer read whole, else whenever it fires); the last row of the head (never resident
        // at this budget).
        let (offset, what) = match target {
            "gate block" => {
                let k = lp.pinned_gate_clusters;
                (pl.gate_block_range(k).start + 3, format!("layer 1 cluster {k} gate block"))
            }
            "bundle" => {
                let pos = lp.pinned_bundles;
                (pl.bundle_range(pos).start + 1, format!("layer 1 bundle at position {pos} "))
            }
            _ => {
                assert!(plan.head_rows < n_vocab, "{plan:?}");
                let bytes = std::fs::read(&copy).unwrap();
                let file = pinion_format::packed::PackedFile::parse(&bytes).unwrap();
                let name = match file.row_checksums("output.weight") {
                    Some(_) => "output.weight",
                    None => "token_embd.weight",
                };
                let rows = file.row_checksums(name).unwrap();
                let row = n_vocab - 1;
                (rows.offset() + (row * rows.row_bytes()) as u64 + 2, format!("{name} row {row}"))
            }
        };
        {
            use std::io::{Read, Seek, SeekFrom, Write};
            let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&copy).unwrap();
            let mut b = [0u8; 1];
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.read_exact(&mut b).unwrap();
            b[0] ^= 0x81;
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&b).unwrap();
            file.sync_all().unwrap();
        }
        let mut failed = None;
        for step in 0..40 {
            match ctx.eval(&[next], Logits::Last) {
                Ok(l) => next = argmax(l.iter().copied()),
                Err(e) => {
                    failed = Some((step, e));
                    break;
                }
            }
        }
        let (step, e) =
            failed.unwrap_or_else(|| panic!("{target}: the flipped byte at {offset} was never read"));
        let RuntimeError::Corrupt {
            ref path,
            source: pinion_format::FormatError::Checksum { what: ref w, offset: at, .. },
        } = e
        else {
            panic!("{target}: step {step}: not a checksum error: {e}")
        };
        assert_eq!(path, &copy, "{target}");
        assert!(w.starts_with(&what), "{target}: {w:?} does not name {what:?}");
        assert!(at <= offset && offset < at + 4096, "{target}: offset {at} vs the flipped byte at {offset}");
        assert!(e.to_string().contains("prepare it again"), "{e}");
        let again = ctx.eval(&[next], Logits::Last).map(|_| ()).unwrap_err();
        assert!(again.to_string().contains("make a new context"), "{target}: {again}");
    }
}

/// Greedy decode of each of `prompts` alone, each in its own one-sequence context made by `make`: per prompt,
/// the tokens fed and the logits of each step (the first from the prompt's prefill).
fn alone<'m>(
    make: &dyn Fn(usize) -> Context<'m>,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Vec<(u32, Vec<f32>)>> {
    prompts
        .iter()
        .map(|p| {
            let mut ctx = make(1);
            let mut logits = ctx.eval(p, Logits::Last).unwrap().to_vec();
            let mut trace = Vec::new();
            for _ in 0..steps {
                let next = argmax(logits.iter().copied());
                logits = ctx.eval(&[next], Logits::Last).unwrap().to_vec();
                trace.push((next, logits.clone()));
            }
            trace
        })
        .collect()
}

/// The same prompts as sequences of one context, prefilled one at a time and then decoded together by
/// `decode_batch` (at some steps only some of them, in a shuffled order): the first step whose logits differ
/// from the sequence's run alone, if any.
fn batched(ctx: &mut Context<'_>, prompts: &[Vec<u32>], want: &[Vec<(u32, Vec<f32>)>]) -> Result<(), String> {
    let n_vocab = ctx.model().config().n_vocab;
    for (seq, p) in prompts.iter().enumerate() {
        ctx.eval_seq(seq, p, Logits::Last).map_err(|e| format!("prefill {seq}: {e}"))?;
    }
    let mut done = vec![0; prompts.len()];
    for step in 0.. {
        // Every third step leaves a sequence out; the order rotates.
        let mut seqs: Vec<usize> = (0..prompts.len()).filter(|&s| done[s] < want[s].len()).collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let k = step % seqs.len();
        seqs.rotate_left(k);
        if step % 3 == 2 && seqs.len() > 1 {
            seqs.pop();
        }
        let batch: Vec<(usize, u32)> = seqs.iter().map(|&s| (s, want[s][done[s]].0)).collect();
        let got = ctx.decode_batch(&batch).map_err(|e| format!("step {step}: {e}"))?.to_vec();
        for (i, &s) in seqs.iter().enumerate() {
            if let Some(d) = bit_diff(&got[i * n_vocab..(i + 1) * n_vocab], &want[s][done[s]].1) {
                return Err(format!("step {step}, sequence {s} (token {}): {d}", done[s]));
            }
            done[s] += 1;
        }
    }
    unreachable!()
}

/// Sequences decoded together (`Context::decode_batch`) get the bits each gets alone: from the GGUF with the
/// weighted rule, from the packed model in memory, and offloaded.
#[test]
fn batched_decode_is_bit_identical_to_each_sequence_alone() {
    let cfg = SynthConfig { act: Activation::Silu, ..cfg() };
    let f = fixture_of("offload-batch", &cfg, GgmlType::Q8_0, false);
    let packed = Model::load(&f.packed).unwrap();
    let gguf = Model::load(&f.gguf).unwrap();
    let rule = packed.sparsity().rule.clone().unwrap();
    assert!(rule.scales.is_some(), "a weighted rule");
    let n_vocab = packed.config().n_vocab;
    let base = prompt(n_vocab);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| base[i..N_PROMPT - 2 * i].to_vec()).collect();
    let with = |n_seq: usize| ContextParams { n_seq, ..params() };
    let from_gguf = |n_seq: usize| {
        let mut ctx = Context::new(&gguf, with(n_seq)).unwrap();
        ctx.set_ffn_rule(Some(rule.clone())).unwrap();
        ctx
    };
    let from_packed = |n_seq: usize| Context::new(&packed, with(n_seq)).unwrap();
    check_batched("gguf", &from_gguf, &prompts);
    check_batched("packed", &from_packed, &prompts);
    // The smallest budget (nothing pinned: every record read for a step), and one with part of the FFN pinned
    // (clusters from the fixed region beside clusters read). The minimum is of the moment: it counts this
    // process, which the other contexts grow.
    for (what, extra) in extras(&packed).into_iter().take(3) {
        let offloaded = |n_seq: usize| {
            let tiny = PlanOptions { budget: 1, ..options("default") };
            let min = refused_minimum(&new_offloaded(&packed, with(n_seq), tiny).unwrap_err()).unwrap();
            let opts = PlanOptions { budget: min + extra + (256 << 10), ..options("default") };
            let ctx = new_offloaded(&packed, with(n_seq), opts).unwrap();
            let m = &ctx.plan().unwrap().memory;
            assert!(m.pinned_bundles < m.ffn_total, "{what}: some of the FFN is read");
            ctx
        };
        check_batched(&format!("offloaded {what}"), &offloaded, &prompts);
    }
}

fn check_batched<'m>(what: &str, make: &dyn Fn(usize) -> Context<'m>, prompts: &[Vec<u32>]) {
    let want = alone(make, prompts, N_DECODE);
    let mut ctx = make(prompts.len());
    if let Err(e) = batched(&mut ctx, prompts, &want) {
        panic!("{what}: {e}");
    }
}

/// `decode_batch` refuses a sequence that does not exist or appears twice, and a full sequence, before any
/// work.
#[test]
fn decode_batch_refuses_bad_steps() {
    let f = fixture("offload-batch-errors", GgmlType::Q8_0, false);
    let model = Model::load(&f.packed).unwrap();
    let mut ctx =
        Context::new(&model, ContextParams { n_seq: 2, ..ContextParams::new(4, N_THREADS) }).unwrap();
    for bad in [&[(2, 1)][..], &[(0, 1), (0, 2)][..]] {
        let e = ctx.decode_batch(bad).unwrap_err();
        assert!(matches!(e, RuntimeError::BadSequence { n_seq: 2, .. }), "{bad:?}: {e}");
    }
    ctx.eval_seq(1, &[1, 2, 3, 4], Logits::Last).unwrap();
    let e = ctx.decode_batch(&[(0, 1), (1, 1)]).unwrap_err();
    assert!(matches!(e, RuntimeError::ContextOverflow { n_ctx: 4, .. }), "{e}");
    assert_eq!((ctx.n_past_of(0), ctx.n_past_of(1)), (0, 4), "nothing was evaluated");
    assert!(matches!(ctx.eval_seq(5, &[1], Logits::Last), Err(RuntimeError::BadSequence { seq: 5, .. })));
}

/// A packed mixture of experts whose recorded routing frequencies do not fit it (one per expert of every layer,
/// each in [0, 1]) is refused at load with a typed error naming the key.
#[test]
fn bad_routing_frequencies_are_refused_at_load() {
    let cfg = moe_cfg(SynthArch::Llama, Activation::Drelu);
    let f = fixture_of("offload-moe-bad-routes", &cfg, GgmlType::Q8_0, false);
    let model = Model::load(&f.gguf).unwrap();
    let th = prepare::calibrate(
        &model,
        &prepare::ActivationProfile::new(8, cfg.n_ff, 16),
        0.0,
        prepare::Rule::Cats,
    )
    .unwrap();
    let freq = vec![vec![0.1; cfg.n_ff]; 8];
    for (what, routes) in [("too few", vec![0.5f32; 7]), ("above 1", vec![1.5f32; 8])] {
        let out = f.dir.0.join(format!("bad-{}.pinion", routes.len()));
        let popts = PackStepOptions { route_frequency: Some(routes), ..PackStepOptions::default() };
        prepare::pack_model(&f.gguf, &out, &freq, &th, None, &popts, &mut |_, _| {}).unwrap();
        match Model::load(&out) {
            Err(RuntimeError::BadHyperParameter { key, .. }) => {
                assert_eq!(key, pinion_runtime::ROUTE_FREQUENCY_KEY, "{what}")
            }
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
}
