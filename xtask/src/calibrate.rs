//! `cargo xtask calibrate`: profile FFN activations over a calibration text and write CATS thresholds.
//!
//! Runs the dense model over the text in chunks of `--ctx` tokens (each from an empty cache, as perplexity
//! does), samples every layer's `|silu(gate · x)|` into a `pinion_predictor::ActivationProfile`, and writes one
//! thresholds file per target sparsity (`DIR/thresholds-0.50.json`, format in docs/format.md), printing per
//! layer the threshold and the sparsity it achieves on the calibration samples.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use pinion_runtime::sparsity::Thresholds;
use pinion_runtime::{ActivationProfile, Context, ContextParams, Model, registry};

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    /// Model (GGUF); default: the SmolLM2 model in models/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Calibration text.
    #[arg(long, default_value = "../shared/corpus/calib.txt")]
    calib: PathBuf,
    /// Target sparsities, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    sparsity: Vec<f64>,
    /// Most calibration tokens to run.
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Chunk length (context size) of the profiling passes.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Magnitudes sampled per layer.
    #[arg(long, default_value_t = 1 << 20)]
    samples: usize,
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn calibrate(a: &CalibrateArgs) -> Result<()> {
    if a.sparsity.iter().any(|s| !(0.0..1.0).contains(s)) {
        bail!("sparsity must be in [0, 1): {:?}", a.sparsity);
    }
    let path = a.model.clone().unwrap_or_else(registry::default_model_path);
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = std::fs::read_to_string(&a.calib).with_context(|| format!("reading {}", a.calib.display()))?;
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, tok.add_bos(), false);
    let n_chunks = (tokens.len().min(a.tokens) / a.ctx).max(1);
    if tokens.len() < a.ctx {
        bail!("{} has {} tokens, fewer than one chunk of {}", a.calib.display(), tokens.len(), a.ctx);
    }
    let c = model.config();
    let mut profile = ActivationProfile::new(c.n_layers, c.n_ff, a.samples);
    let mut ctx = Context::new(&model, ContextParams::new(a.ctx, a.threads))?;
    let t0 = Instant::now();
    for (i, chunk) in tokens.chunks_exact(a.ctx).take(n_chunks).enumerate() {
        ctx.truncate(0);
        ctx.eval_profile(chunk, &mut profile)?;
        eprint!("\rxtask calibrate: profiled {}/{} chunks of {} tokens", i + 1, n_chunks, a.ctx);
    }
    eprintln!(" in {:.1} s", t0.elapsed().as_secs_f64());
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for &s in &a.sparsity {
        let layers = profile.thresholds(s);
        println!("\nsparsity {s:.2}: layer, threshold, achieved sparsity on the calibration samples");
        for (l, (t, got)) in layers.iter().enumerate() {
            println!("  {l:>3}  {t:>10.6}  {got:.4}");
        }
        let file = a.out.join(format!("thresholds-{s:.2}.json"));
        let th =
            Thresholds { model: name.clone(), target_sparsity: s, calib_tokens: profile.n_tokens(), layers };
        th.save(&file)?;
        eprintln!("xtask calibrate: wrote {}", file.display());
    }
    Ok(())
}
