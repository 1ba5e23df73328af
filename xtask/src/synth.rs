//! `cargo xtask synth`: writes a synthetic llama-style GGUF model with random weights and planted activation
//! skew, a thin driver over `pinion_format::synth` (whose module docs describe the construction).
//!
//! `cargo xtask synth --shape tiny --act relu --type q4_0 --out /tmp/tiny.gguf` writes a few MB; `--shape 7b`
//! writes about 3.8 GB in a few minutes, streamed, with one line of progress per 5% on stderr. The mixture of
//! experts shapes (`--shape mixtral-47b --act drelu`, `--shape qwen3-30b-a3b --act silu`) carry the planted
//! routing of issue 13; `--layers 2` writes a shape with fewer layers.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use pinion_format::GgmlType;
use pinion_format::synth::{self, Activation, SynthArch, SynthConfig, pearson};

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Model shape: tiny (about 3 MB in Q4_0), small (about 100 MB), 7b (about 3.8 GB), mixtral-47b (8
    /// experts, about 26 GB) or qwen3-30b-a3b (qwen3moe, 128 experts, about 17 GB).
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Transformer blocks, instead of the shape's (a scaled-down file for tests).
    #[arg(long)]
    layers: Option<usize>,
    /// Planted FFN activation (stored as `pinion.ffn_activation`; llama.cpp runs every model with SiLU); the
    /// shape's by default (relu for the dense shapes, silu for the mixtures of experts).
    #[arg(long)]
    act: Option<String>,
    /// Architecture: llama, qwen2 (Q/K/V biases, NeoX RoPE), qwen3 (Q/K norms, NeoX RoPE), or gemma3 (Q/K
    /// norms, post-norms, NeoX RoPE, scaled embeddings, and sliding-window attention of --window positions on
    /// five layers of every six); the shape's by default (llama, or qwen3moe for qwen3-30b-a3b).
    #[arg(long)]
    arch: Option<String>,
    /// Write Llama 3.1's RoPE frequency factors (rope_freqs.weight), as its converter computes them.
    #[arg(long)]
    rope_factors: bool,
    /// Sliding window of a gemma3 model, in positions.
    #[arg(long, default_value_t = 512)]
    window: u32,
    /// Mixtral-style MoE with this many experts per layer (2 used per token), on a dense shape.
    #[arg(long)]
    moe: Option<usize>,
    /// Weight type of the matrices: q4_0 or f32.
    #[arg(long = "type", default_value = "q4_0")]
    ty: String,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights and of the neuron permutation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Planted mean fraction of active FFN neurons per token.
    #[arg(long, default_value_t = 0.15)]
    density: f64,
    /// Power-law exponent of the neuron activation frequencies.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
}

pub(crate) fn synth(args: &SynthArgs) -> Result<()> {
    let mut cfg = SynthConfig::preset(&args.shape).with_context(|| {
        format!("unknown shape '{}' (tiny, small, 7b, mixtral-47b, qwen3-30b-a3b)", args.shape)
    })?;
    if let Some(act) = &args.act {
        cfg.act = Activation::from_name(act)
            .with_context(|| format!("unknown activation '{act}' (relu, drelu, silu, gelu)"))?;
    }
    if let Some(arch) = &args.arch {
        cfg.arch = match arch.as_str() {
            "llama" => SynthArch::Llama,
            "qwen2" => SynthArch::Qwen2,
            "qwen3" => SynthArch::Qwen3,
            "qwen3moe" => SynthArch::Qwen3Moe,
            "gemma3" => SynthArch::Gemma3 { sliding_window: args.window, swa_pattern: 6 },
            other => bail!("unknown architecture '{other}' (llama, qwen2, qwen3, qwen3moe, gemma3)"),
        };
    }
    if let Some(n) = args.layers {
        cfg.n_layers = n;
        cfg.name = format!("{}-{n}l", cfg.name);
    }
    cfg.ty = match args.ty.as_str() {
        "q4_0" => GgmlType::Q4_0,
        "f32" => GgmlType::F32,
        other => bail!("unknown type '{other}' (q4_0, f32)"),
    };
    if let Some(n) = args.moe {
        cfg.n_experts = n;
        cfg.n_experts_used = n.min(2);
        cfg.name = format!("{}-moe{n}", cfg.name);
    }
    cfg.seed = args.seed;
    cfg.rope_factors = args.rope_factors;
    cfg.density = args.density;
    cfg.alpha = args.alpha;
    cfg.validate()?;
    if let Some(plan) = synth::routing_plan(&cfg)? {
        eprintln!(
            "xtask synth: {} experts, {} used; first-choice popularity Zipf {} (most/least popular {:.2}); \
             repeat {:.3} planted with {} shift head(s) of gain {:.3} (logit correlation {:.3})",
            cfg.n_experts,
            cfg.n_experts_used,
            cfg.expert_zipf,
            plan.target[0] / plan.target[cfg.n_experts - 1],
            plan.model_repeat,
            plan.gains.len(),
            plan.gains.first().copied().unwrap_or(0.0),
            plan.rho,
        );
    }
    let total = synth::file_len(&cfg)?;
    eprintln!(
        "xtask synth: {} ({}, {} layers, d {}, ff {}, {} experts, {}, {}) -> {} ({:.1} MB)",
        cfg.name,
        cfg.arch.name(),
        cfg.n_layers,
        cfg.d_model,
        cfg.n_ff,
        cfg.n_experts,
        cfg.act.name(),
        cfg.ty.name(),
        args.out.display(),
        total as f64 / 1e6
    );
    // Written under a temporary name and renamed into place, so a failed run never leaves a half-written model.
    let tmp = args.out.with_extension("gguf.partial");
    let res = write_to(&cfg, &tmp);
    match res {
        Ok(()) => std::fs::rename(&tmp, &args.out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), args.out.display()))?,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("writing {}", args.out.display())));
        }
    }
    Ok(())
}

fn write_to(cfg: &SynthConfig, path: &std::path::Path) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut last = 0u64;
    let out = synth::write_model(cfg, BufWriter::with_capacity(1 << 20, file), &mut |done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= last + 5 || done == total {
            eprintln!("xtask synth: {pct:3}% ({:.1} / {:.1} MB)", done as f64 / 1e6, total as f64 / 1e6);
            last = pct;
        }
    })?;
    let file = out.into_inner().context("flushing the output")?;
    file.sync_all().context("syncing the output")?;
    Ok(())
}

#[derive(Args)]
pub(crate) struct SynthStatsArgs {
    /// A synthetic mixture of experts written by `cargo xtask synth` (a scaled-down one: it runs in memory).
    #[arg(long)]
    model: PathBuf,
    /// Tokens of each sequence (random token ids, then the model's greedy continuation of BOS).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The synth seed, Zipf exponent and repeat rate the file was written with (the planted per-expert targets
    /// are recomputed from them).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0.5)]
    zipf: f64,
    #[arg(long, default_value_t = 0.25)]
    repeat: f64,
}

/// `cargo xtask synth-stats`: runs a synthetic mixture of experts with pinion, recording the routing
/// (`Context::set_route_trace`), on random token ids and on its own greedy continuation, and prints per layer the
/// first-choice frequencies against the planted Zipf targets, the first-choice repeat rate between consecutive
/// tokens, and the fraction of non-zero neurons per expert.
pub(crate) fn synth_stats(args: &SynthStatsArgs) -> Result<()> {
    use pinion_runtime::{Context, ContextParams, Logits, Model};
    let model = Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let c = model.config();
    let moe = c.moe.context("not a mixture of experts")?;
    let (n_layers, n_exp, k, n_ff) = (c.n_layers, moe.n_expert, moe.n_expert_used, c.n_ff);
    let cfg = SynthConfig {
        seed: args.seed,
        n_experts: n_exp,
        n_experts_used: k,
        n_heads: c.n_heads,
        expert_zipf: args.zipf,
        expert_repeat: args.repeat,
        ..SynthConfig::preset("tiny").context("tiny preset")?
    };
    let plan = synth::routing_plan(&cfg)?.context("no routing plan")?;
    let sum_sq: f64 = plan.target.iter().map(|p| p * p).sum();
    eprintln!(
        "synth-stats: {} ({n_layers} layers, {n_exp} experts, {k} used, act {:?}); planted: Zipf {} (most/least {:.2}), \
         repeat {} (independent tokens: {sum_sq:.3})",
        args.model.display(),
        c.ffn_act,
        args.zipf,
        plan.target[0] / plan.target[n_exp - 1],
        args.repeat
    );
    let n = args.tokens;
    let params = ContextParams::new(n + 2, args.threads);
    // Random token ids past the special and byte tokens, as `pinion bench` and llama-bench feed.
    let ids = synth::N_BASE_TOKENS as u32..c.n_vocab as u32;
    let random = pinion_runtime::random_tokens(n, ids, 0x9e37_79b9_7f4a_7c15 ^ args.seed);
    let mut ctx = Context::new(&model, params.clone())?;
    ctx.set_route_trace(true);
    ctx.eval(&random, Logits::Last)?;
    let trace = ctx.take_route_trace();
    report("random ids", &trace, n_layers, k, n_ff, &cfg, &random);
    // The greedy continuation of BOS, one token at a time.
    let mut ctx = Context::new(&model, params)?;
    ctx.set_route_trace(true);
    let mut seq = vec![model.tokenizer().bos_id().unwrap_or(1)];
    while seq.len() < n {
        let logits = ctx.eval(&seq[seq.len() - 1..], Logits::Last)?;
        seq.push(pinion_runtime::argmax(logits.iter().copied()));
    }
    ctx.eval(&seq[n - 1..], Logits::Last)?;
    let trace = ctx.take_route_trace();
    report("greedy continuation", &trace, n_layers, k, n_ff, &cfg, &seq);
    Ok(())
}

/// Prints the statistics of one sequence's routing record: per layer, the tokens' first choices.
fn report(
    what: &str,
    trace: &pinion_runtime::RouteTrace,
    n_layers: usize,
    k: usize,
    n_ff: usize,
    cfg: &SynthConfig,
    tokens: &[u32],
) {
    let n_exp = cfg.n_experts;
    // Calls are the layers in order, pass after pass: gather each layer's (token, slot) choices in token order.
    let mut per_layer: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n_layers];
    let mut at = 0;
    for (call, &nt) in trace.call_tokens.iter().enumerate() {
        let len = nt as usize * k;
        per_layer[call % n_layers].extend_from_slice(&trace.choices[at..at + len]);
        at += len;
    }
    let distinct = tokens.iter().collect::<std::collections::BTreeSet<_>>().len();
    eprintln!("{what}: {} tokens ({distinct} distinct)", tokens.len());
    for (l, ch) in per_layer.iter().enumerate() {
        let n_tok = ch.len() / k;
        let first: Vec<usize> = ch.chunks_exact(k).map(|c| c[0].0 as usize).collect();
        let mut freq = vec![0.0f64; n_exp];
        for &e in &first {
            freq[e] += 1.0 / n_tok as f64;
        }
        let target = synth::expert_targets(cfg, l);
        let t_max = target.iter().copied().fold(0.0, f64::max);
        let t_min = target.iter().copied().fold(1.0, f64::min);
        let worst = freq.iter().zip(&target).map(|(f, t)| (f - t).abs()).fold(0.0, f64::max);
        let r = pearson(&freq, &target);
        let mut sorted = freq.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let repeat = first.windows(2).filter(|w| w[0] == w[1]).count() as f64 / (n_tok.max(2) - 1) as f64;
        let (mut active, mut routed) = (vec![0u64; n_exp], vec![0u64; n_exp]);
        for &(e, a) in ch {
            active[e as usize] += a as u64;
            routed[e as usize] += 1;
        }
        let dens: Vec<f64> = (0..n_exp)
            .filter(|&e| routed[e] > 0)
            .map(|e| active[e] as f64 / (routed[e] * n_ff as u64) as f64)
            .collect();
        let mean = dens.iter().sum::<f64>() / dens.len().max(1) as f64;
        let (lo, hi) = dens.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
        eprintln!(
            "  layer {l}: first choice vs planted: pearson {r:.3}, max |difference| {worst:.3} (binomial sd of the largest {:.3}); \
             measured most popular {:.3} (planted {:.3}), least {:.3} (planted {:.3}); repeat {repeat:.3}; \
             non-zero neurons per expert {lo:.3}..{hi:.3} (mean {mean:.3})",
            (t_max * (1.0 - t_max) / n_tok as f64).sqrt(),
            sorted[0],
            t_max,
            sorted[n_exp - 1],
            t_min,
        );
    }
}
