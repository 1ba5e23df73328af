//! The offline preparation drivers: `cargo xtask profile`, `calibrate`, `train`, `pack`, `plan` and `prepare`
//! (all of them in one resumable command). The work is in `pinion_runtime::prepare`; these parse arguments,
//! show progress and print reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pinion_runtime::prepare::{self, ProfileOptions};
use pinion_runtime::sparsity::Thresholds;
use pinion_runtime::{Model, registry};

/// A progress bar on stderr for `len` units of work.
pub(crate) fn bar(len: u64, what: &str, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template = format!("{{prefix:>10}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}}) {{msg}}");
    pb.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn load_model(path: &Option<PathBuf>) -> Result<(PathBuf, Model)> {
    let path = path.clone().unwrap_or_else(registry::default_model_path);
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    Ok((path, model))
}

#[derive(Args, Clone)]
pub(crate) struct ProfileArgs {
    /// Model (GGUF); default: the SmolLM2 model in models/.
    #[arg(long, short = 'm')]
    pub(crate) model: Option<PathBuf>,
    /// Calibration text.
    #[arg(long, default_value = "../shared/corpus/calib.txt")]
    pub(crate) calib: PathBuf,
    /// Most calibration tokens to run.
    #[arg(long, default_value_t = 16384)]
    pub(crate) calib_tokens: usize,
    /// Tokens per forward pass (each from an empty cache).
    #[arg(long, default_value_t = 512)]
    pub(crate) chunk: usize,
    /// Tokens whose FFN inputs and scores are kept for predictor training.
    #[arg(long, default_value_t = 4096)]
    pub(crate) token_samples: usize,
    /// Compute threads.
    #[arg(long, short = 't', default_value_t = 2)]
    pub(crate) threads: usize,
}

impl ProfileArgs {
    fn options(&self) -> ProfileOptions {
        ProfileOptions {
            max_tokens: self.calib_tokens,
            chunk: self.chunk,
            token_samples: self.token_samples,
            threads: self.threads,
            ..ProfileOptions::default()
        }
    }
}

/// Profiles `model` over the calibration text, with a progress bar.
fn run_profile(model: &Model, a: &ProfileArgs) -> Result<pinion_runtime::ActivationProfile> {
    let text = std::fs::read_to_string(&a.calib).with_context(|| format!("reading {}", a.calib.display()))?;
    let t0 = Instant::now();
    let pb = bar(0, "profile", "tokens");
    let profile = prepare::profile_activations(model, &text, &a.options(), &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    eprintln!(
        "profile: {} tokens in {:.1} s, {} token samples",
        profile.n_tokens(),
        t0.elapsed().as_secs_f64(),
        profile.n_token_samples()
    );
    Ok(profile)
}

#[derive(Args)]
pub(crate) struct ProfileCmd {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Output profile file.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// `cargo xtask profile`.
pub(crate) fn profile(a: &ProfileCmd) -> Result<()> {
    let (_, model) = load_model(&a.profile.model)?;
    let p = run_profile(&model, &a.profile)?;
    prepare::save_profile(&p, &a.out)?;
    print_firing(&model, &p);
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn print_firing(model: &Model, p: &pinion_runtime::ActivationProfile) {
    if !model.config().ffn_act.is_relu_family() {
        return;
    }
    println!("layer  firing density  hottest 10% of neurons carry");
    for l in 0..p.n_layers() {
        let mut f = p.firing_frequency(l);
        let density = f.iter().sum::<f64>() / f.len() as f64;
        f.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = f[..f.len().div_ceil(10)].iter().sum::<f64>() / f.iter().sum::<f64>().max(1e-12);
        println!("{l:>5}  {density:>14.4}  {:>5.1}% of activations", 100.0 * top);
    }
}

#[derive(Args)]
pub(crate) struct CalibrateCmd {
    /// A profile written by `cargo xtask profile`; without it the model is profiled first.
    #[arg(long)]
    from_profile: Option<PathBuf>,
    #[command(flatten)]
    profile: ProfileArgs,
    /// Target sparsities, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    sparsity: Vec<f64>,
    /// Output directory: one thresholds-S.json per sparsity.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// `cargo xtask calibrate`: per-layer CATS thresholds for each target sparsity.
pub(crate) fn calibrate(a: &CalibrateCmd) -> Result<()> {
    check_sparsity(&a.sparsity)?;
    let (_, model) = load_model(&a.profile.model)?;
    let profile = match &a.from_profile {
        Some(p) => prepare::load_profile(p)?,
        None => run_profile(&model, &a.profile)?,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for &s in &a.sparsity {
        let th = prepare::calibrate(&model, &profile, s)?;
        print_thresholds(&th);
        let file = a.out.join(format!("thresholds-{s:.2}.json"));
        th.save(&file)?;
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}

pub(crate) fn check_sparsity(s: &[f64]) -> Result<()> {
    if s.iter().any(|s| !(0.0..1.0).contains(s)) {
        bail!("sparsity must be in [0, 1): {s:?}");
    }
    Ok(())
}

pub(crate) fn print_thresholds(th: &Thresholds) {
    println!("\nsparsity {:.2}: layer, threshold, achieved sparsity on the calibration samples", th.target_sparsity);
    for (l, (t, got)) in th.layers.iter().enumerate() {
        println!("  {l:>3}  {t:>10.6}  {got:.4}");
    }
}
