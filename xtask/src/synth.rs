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
use pinion_format::synth::{self, Activation, SynthArch, SynthConfig};

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
