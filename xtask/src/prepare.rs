//! The offline preparation drivers: `cargo xtask profile`, `calibrate`, `train`, `pack`, `plan` and `prepare`
//! (all of them in one resumable command). The work is in `pinion_prepare` and the planning in
//! `pinion_runtime::planning` (the same plan a run makes); these parse arguments, show progress and print
//! reports.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use pinion_format::GgmlType;
use pinion_plan::{Budget, DeviceProfile, PlanOptions};
use pinion_predictor::LowRankPredictor;
use pinion_predictor::train::{LayerReport, TrainConfig};
use pinion_prepare::device::ProbeOptions;
use pinion_prepare::{
    self as prepare, Manifest, PackStepOptions, ProfileOptions, Thresholds, registry, step_key,
};
use pinion_runtime::{ContextParams, Model, OFFLOAD_CHUNK, PACKED_FILE_NAME};

use crate::progress::Progress;

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
fn run_profile(model: &Model, a: &ProfileArgs) -> Result<pinion_prepare::ActivationProfile> {
    let text = std::fs::read_to_string(&a.calib).with_context(|| format!("reading {}", a.calib.display()))?;
    let mut pb = Progress::new("profile", "tokens");
    let profile = prepare::profile_activations(model, &text, &a.options(), &mut |done, total| {
        pb.update(done as u64, total as u64, "");
    })?;
    pb.finish(&format!("{} tokens, {} token samples", profile.n_tokens(), profile.n_token_samples()));
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

fn print_firing(model: &Model, p: &pinion_prepare::ActivationProfile) {
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
    let what = match th.target_sparsity.is_finite() {
        true => format!("sparsity {:.2}", th.target_sparsity),
        false => "ReLU-family model, thresholds 0 (the activation's own zeros)".to_string(),
    };
    println!("\n{what}: layer, threshold, achieved sparsity on the calibration samples");
    for (l, (t, got)) in th.layers.iter().enumerate() {
        println!("  {l:>3}  {t:>10.6}  {got:.4}");
    }
}

#[derive(Args, Clone)]
pub(crate) struct TrainArgs {
    /// Micro recall the predictor must reach on held-out tokens.
    #[arg(long, default_value_t = 0.95)]
    pub(crate) target_recall: f64,
    /// Candidate predictor ranks, comma-separated (the smallest meeting the density goal is kept).
    #[arg(long, value_delimiter = ',', default_value = "32,64,128")]
    pub(crate) ranks: Vec<usize>,
    /// Most training epochs per rank.
    #[arg(long, default_value_t = 24)]
    pub(crate) epochs: usize,
}

impl TrainArgs {
    pub(crate) fn config(&self, threads: usize) -> TrainConfig {
        TrainConfig {
            target_recall: self.target_recall,
            ranks: self.ranks.clone(),
            epochs: self.epochs,
            threads,
            ..TrainConfig::default()
        }
    }
}

#[derive(Args)]
pub(crate) struct TrainCmd {
    /// Model (GGUF) the profile was made on; default: the SmolLM2 model in models/.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// A profile written by `cargo xtask profile`.
    #[arg(long)]
    from_profile: PathBuf,
    /// Target sparsity of the thresholds whose "above threshold" the predictors learn (SiLU models).
    #[arg(long, default_value_t = 0.5)]
    sparsity: f64,
    #[command(flatten)]
    train: TrainArgs,
    /// Compute threads.
    #[arg(long, short = 't', default_value_t = 2)]
    threads: usize,
    /// Output predictors file (GGUF).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// `cargo xtask train`: one predictor per layer from a profile's token samples.
pub(crate) fn train(a: &TrainCmd) -> Result<()> {
    check_sparsity(&[a.sparsity])?;
    let (_, model) = load_model(&a.model)?;
    let profile = prepare::load_profile(&a.from_profile)?;
    let th = prepare::calibrate(&model, &profile, a.sparsity)?;
    let trained = run_train(&model, &profile, &th, &a.train.config(a.threads))?;
    let ps: Vec<_> = trained.into_iter().map(|(p, _)| p).collect();
    prepare::save_predictors(&ps, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Trains the predictors with a progress bar and prints the per-layer report.
pub(crate) fn run_train(
    model: &Model,
    profile: &pinion_prepare::ActivationProfile,
    th: &Thresholds,
    cfg: &TrainConfig,
) -> Result<Vec<(LowRankPredictor, LayerReport)>> {
    let mut pb = Progress::new("train", "layers");
    let trained = prepare::train_predictors(model, profile, th, cfg, &mut |done, total, r| {
        pb.update(done as u64, total as u64, &format!("last: rank {}, recall {:.3}", r.rank, r.recall));
    })?;
    pb.finish(&format!("{} predictors", trained.len()));
    println!(
        "\npredictors (held-out {} of {} token samples, target recall {}): layer, rank, recall, precision, predicted density, true density",
        trained[0].1.n_heldout,
        profile.n_token_samples(),
        cfg.target_recall
    );
    for (l, (_, r)) in trained.iter().enumerate() {
        println!(
            "  {l:>3}  {:>4}  {:.4}  {:.4}  {:.4}  {:.4}",
            r.rank, r.recall, r.precision, r.predicted_density, r.true_density
        );
    }
    let n = trained.len() as f64;
    let mean = |f: &dyn Fn(&LayerReport) -> f64| trained.iter().map(|(_, r)| f(r)).sum::<f64>() / n;
    println!(
        "  mean  recall {:.4}, predicted density {:.4}, true density {:.4}",
        mean(&|r| r.recall),
        mean(&|r| r.predicted_density),
        mean(&|r| r.true_density),
    );
    Ok(trained)
}

/// `--down-type`: the type of the packed (transposed) down columns.
fn down_type(s: &str) -> Result<GgmlType, String> {
    match s.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlType::Q8_0),
        "f16" => Ok(GgmlType::F16),
        "f32" => Ok(GgmlType::F32),
        _ => Err(format!("{s:?}: expected q8_0, f16 or f32")),
    }
}

#[derive(Args)]
pub(crate) struct PrepareCmd {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Output directory (default: models/NAME.prepared beside the model).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Target sparsity of the CATS thresholds (SiLU models; ReLU models keep their own).
    #[arg(long, default_value_t = 0.5)]
    sparsity: f64,
    /// Memory budget of the plan recorded in plan.json: bytes (48MiB, 1.5GiB) or a share of the GGUF file
    /// (50%), for the whole process (weights, KV cache, scratch, neuron cache). Default: 50%, or the smallest
    /// budget that works if that is more. Runs plan anew for the budget they are given.
    #[arg(long)]
    mem_budget: Option<Budget>,
    /// Context size the plan reserves a KV cache for.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Skip predictor training (threshold sparsity only).
    #[arg(long)]
    no_predictors: bool,
    #[command(flatten)]
    train: TrainArgs,
    /// Neurons per packed record.
    #[arg(long, default_value_t = 32)]
    cluster: usize,
    /// Type of the transposed down columns: q8_0, f16 or f32.
    #[arg(long, default_value = "q8_0", value_parser = down_type)]
    down_type: GgmlType,
    /// A device profile from `cargo xtask profile-device`; default: measure into DIR/device.json.
    #[arg(long)]
    device: Option<PathBuf>,
    /// Redo every step, even those already done.
    #[arg(long)]
    force: bool,
}

/// `cargo xtask prepare`: profile, calibrate, train, pack, measure the device and plan, resuming from the steps
/// a previous run finished.
pub(crate) fn prepare_all(a: &PrepareCmd) -> Result<()> {
    check_sparsity(&[a.sparsity])?;
    let t0 = Instant::now();
    let (path, model) = load_model(&a.profile.model)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        path.with_file_name(format!("{stem}.prepared"))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut manifest = if a.force { Manifest::default() } else { prepare::Manifest::load(&out)? };
    let source_bytes = std::fs::metadata(&path)?.len();
    let act = model.config().ffn_act;
    let budget_arg = a.mem_budget.unwrap_or(Budget::Percent(50.0));
    let budget = budget_arg.bytes(source_bytes);
    eprintln!(
        "prepare: {} ({}, {} layers, {} FFN, {:.1} MiB) into {}",
        path.display(),
        model.config().name.as_deref().unwrap_or("?"),
        model.config().n_layers,
        act.name(),
        source_bytes as f64 / (1 << 20) as f64,
        out.display()
    );
    let skip = |step: &str| eprintln!("{step}: up to date, skipped");

    // 1. Profile.
    let f_profile = out.join("profile.bin");
    let o = a.profile.options();
    let k_profile = step_key(&[
        &prepare::file_identity(&path)?,
        &prepare::file_identity(&a.profile.calib)?,
        &format!("{} {} {} {}", o.max_tokens, o.chunk, o.score_samples, o.token_samples),
    ]);
    // The profile is large (hundreds of MB): loaded only by the steps that run.
    let mut profile = None;
    if manifest.is_done("profile", &k_profile, &[&f_profile]) {
        skip("profile");
    } else {
        let p = run_profile(&model, &a.profile)?;
        prepare::save_profile(&p, &f_profile)?;
        manifest.mark(&out, "profile", &k_profile)?;
        print_firing(&model, &p);
        profile = Some(p);
    }
    let mut profile = LazyProfile { path: f_profile.clone(), profile };

    // 2. Thresholds.
    let f_thresholds = out.join("thresholds.json");
    let k_thresholds = step_key(&[&k_profile, &a.sparsity.to_string()]);
    let th = if manifest.is_done("calibrate", &k_thresholds, &[&f_thresholds]) {
        skip("calibrate");
        Thresholds::load(&f_thresholds)?
    } else {
        let th = prepare::calibrate(&model, profile.get()?, a.sparsity)?;
        th.save(&f_thresholds)?;
        manifest.mark(&out, "calibrate", &k_thresholds)?;
        th
    };
    print_thresholds(&th);

    // 3. Predictors.
    let f_pred = out.join("predictors.gguf");
    let f_pred_report = out.join("predictors.json");
    let cfg = a.train.config(a.profile.threads);
    let k_train = step_key(&[&k_thresholds, &format!("{cfg:?}")]);
    let predictors = if a.no_predictors {
        None
    } else if manifest.is_done("train", &k_train, &[&f_pred, &f_pred_report]) {
        skip("train");
        Some(prepare::load_predictors(&f_pred)?)
    } else {
        let trained = run_train(&model, profile.get()?, &th, &cfg)?;
        let report: Vec<_> = trained
            .iter()
            .map(|(_, r)| {
                serde_json::json!({"rank": r.rank, "recall": r.recall, "precision": r.precision,
                    "predicted_density": r.predicted_density, "true_density": r.true_density,
                    "threshold": r.threshold, "n_train": r.n_train, "n_heldout": r.n_heldout})
            })
            .collect();
        let ps: Vec<_> = trained.into_iter().map(|(p, _)| p).collect();
        prepare::save_predictors(&ps, &f_pred)?;
        let json = serde_json::json!({"target_recall": cfg.target_recall, "layers": report});
        prepare::write_atomic(&f_pred_report, &serde_json::to_vec_pretty(&json)?)?;
        manifest.mark(&out, "train", &k_train)?;
        Some(ps)
    };

    // 4. Pack.
    let f_model = out.join(PACKED_FILE_NAME);
    let k_pack = step_key(&[
        &k_thresholds,
        if a.no_predictors { "no predictors" } else { &k_train },
        &format!("{} {:?}", a.cluster, a.down_type),
    ]);
    if manifest.is_done("pack", &k_pack, &[&f_model]) {
        skip("pack");
    } else {
        let freq = prepare::activation_frequencies(&model, profile.get()?, &th)?;
        let opts = PackStepOptions {
            cluster_neurons: a.cluster,
            down_type: a.down_type,
            predicted_density: predicted_density(&f_pred_report, predictors.is_some())?,
        };
        let mut pb = Progress::new("pack", "layers");
        let s =
            prepare::pack_model(&path, &f_model, &freq, &th, predictors.as_deref(), &opts, &mut |l, n| {
                pb.update(l as u64, n as u64, "")
            })?;
        pb.finish(&format!(
            "{:.1} MiB ({:.1} MiB resident, {:.1} MiB FFN, {:.1} MiB padding)",
            mib(s.file_len),
            mib(s.resident_len),
            mib(s.ffn_len),
            mib(s.padding_bytes)
        ));
        manifest.mark(&out, "pack", &k_pack)?;
    }
    drop((model, profile));

    // 5. Device profile.
    let f_device = a.device.clone().unwrap_or_else(|| out.join("device.json"));
    let device = if f_device.exists() {
        eprintln!("device: using {}", f_device.display());
        prepare::load_device(&f_device)?
    } else {
        let d = crate::device::measure_with_progress(&ProbeOptions::new(out.clone()))?;
        prepare::save_device(&d, &f_device)?;
        d
    };

    // 6. Plan: the plan a run under this budget would make (a run plans anew for the budget it is given).
    let plan = match make_plan(&out, &device, budget, a.ctx, a.profile.threads) {
        Err(e) if a.mem_budget.is_none() => match minimum_of(&e) {
            Some(minimum) => {
                eprintln!("plan: {e:#}; planning for that minimum instead (pass --mem-budget to choose)");
                make_plan(&out, &device, minimum, a.ctx, a.profile.threads)?
            }
            None => return Err(e),
        },
        r => r?,
    };
    println!("\n{}", plan.render_with_reasoning());
    prepare::save_plan(&plan, &out.join("plan.json"))?;
    manifest.mark(&out, "plan", &step_key(&[&k_pack, &budget_arg.to_string(), &a.ctx.to_string()]))?;
    eprintln!(
        "prepare: done in {:.1} s; run it with `pinion run -m {}`",
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

/// The minimum of a refused budget, if that is why planning failed.
fn minimum_of(e: &anyhow::Error) -> Option<u64> {
    match e.downcast_ref::<pinion_runtime::RuntimeError>() {
        Some(pinion_runtime::RuntimeError::Plan(pinion_plan::PlanError::BudgetTooSmall {
            minimum, ..
        })) => Some(*minimum),
        _ => None,
    }
}

/// The plan of running the packed model in `dir` under `budget` bytes with a context of `ctx` tokens on
/// `threads` threads: what `pinion run --mem-budget` plans for the same inputs, with this process's measured
/// resident set standing in for pinion's.
fn make_plan(
    dir: &std::path::Path,
    device: &DeviceProfile,
    budget: u64,
    ctx: usize,
    threads: usize,
) -> Result<pinion_plan::Plan> {
    let packed = Model::load(dir)?;
    let params = ContextParams { n_ubatch: OFFLOAD_CHUNK, ..ContextParams::new(ctx, threads) };
    let process = pinion_runtime::planning::current_rss();
    let opts = PlanOptions::new(budget);
    Ok(pinion_runtime::planning::plan_run(&packed, &params, &opts, device, process)?)
}

#[derive(Args)]
pub(crate) struct PlanCmd {
    /// A directory made by `cargo xtask prepare`.
    #[arg(long, short = 'p')]
    prepared: PathBuf,
    /// Memory budgets, comma-separated: bytes (48MiB) or shares of the GGUF the model was made from (50%).
    #[arg(long, value_delimiter = ',', default_value = "50%")]
    mem_budget: Vec<Budget>,
    /// Context size the plan reserves a KV cache for.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// A device profile; default: DIR/device.json.
    #[arg(long)]
    device: Option<PathBuf>,
    /// Compute threads.
    #[arg(long, short = 't', default_value_t = 2)]
    threads: usize,
}

/// `cargo xtask plan`: print the plan for each budget (a budget below the minimum is reported, not fatal,
/// when several are asked for).
pub(crate) fn plan_cmd(a: &PlanCmd) -> Result<()> {
    let source_bytes = Model::load(&a.prepared)?.source_bytes();
    let device = prepare::load_device(&a.device.clone().unwrap_or_else(|| a.prepared.join("device.json")))?;
    let mut failed = None;
    for b in &a.mem_budget {
        let budget = b.bytes(source_bytes);
        println!("\n## --mem-budget {b} ({:.1} MiB of a {:.1} MiB GGUF)\n", mib(budget), mib(source_bytes));
        match make_plan(&a.prepared, &device, budget, a.ctx, a.threads) {
            Ok(p) => println!("{}", p.render_with_reasoning()),
            Err(e) => {
                println!("error: {e:#}");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) if a.mem_budget.len() == 1 => Err(e),
        _ => Ok(()),
    }
}

#[derive(Args)]
pub(crate) struct PackCmd {
    /// Model (GGUF); default: the SmolLM2 model in models/.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// A profile written by `cargo xtask profile` (for the hotness order).
    #[arg(long)]
    from_profile: PathBuf,
    /// A thresholds file written by `cargo xtask calibrate`.
    #[arg(long)]
    thresholds: PathBuf,
    /// A predictors file written by `cargo xtask train`.
    #[arg(long)]
    predictors: Option<PathBuf>,
    /// Neurons per packed record.
    #[arg(long, default_value_t = 32)]
    cluster: usize,
    /// Type of the transposed down columns: q8_0, f16 or f32.
    #[arg(long, default_value = "q8_0", value_parser = down_type)]
    down_type: GgmlType,
    /// Output packed file (or a directory, which gets `model.pinion`).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// `cargo xtask pack`: the neuron-cluster file from a GGUF, a profile and thresholds (and predictors).
pub(crate) fn pack_cmd(a: &PackCmd) -> Result<()> {
    let (path, model) = load_model(&a.model)?;
    let profile = prepare::load_profile(&a.from_profile)?;
    let th = Thresholds::load(&a.thresholds)?;
    let freq = prepare::activation_frequencies(&model, &profile, &th)?;
    drop(profile);
    let predictors = a.predictors.as_deref().map(prepare::load_predictors).transpose()?;
    let out = if a.out.is_dir() { a.out.join(PACKED_FILE_NAME) } else { a.out.clone() };
    let opts =
        PackStepOptions { cluster_neurons: a.cluster, down_type: a.down_type, predicted_density: None };
    let mut pb = Progress::new("pack", "layers");
    let s = prepare::pack_model(&path, &out, &freq, &th, predictors.as_deref(), &opts, &mut |l, n| {
        pb.update(l as u64, n as u64, "")
    })?;
    pb.finish(&format!("{:.1} MiB written to {}", mib(s.file_len), out.display()));
    Ok(())
}

/// A profile file read on first use.
struct LazyProfile {
    path: PathBuf,
    profile: Option<pinion_prepare::ActivationProfile>,
}

impl LazyProfile {
    fn get(&mut self) -> Result<&pinion_prepare::ActivationProfile> {
        if self.profile.is_none() {
            self.profile = Some(prepare::load_profile(&self.path)?);
        }
        Ok(self.profile.as_ref().expect("just loaded"))
    }
}

/// Each layer's predicted density from a `predictors.json` report (when predictors were trained).
fn predicted_density(report: &std::path::Path, trained: bool) -> Result<Option<Vec<f32>>> {
    if !trained {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let layers = v["layers"].as_array().context("predictors.json has no layers")?;
    let d = layers
        .iter()
        .map(|l| {
            l["predicted_density"]
                .as_f64()
                .map(|x| x as f32)
                .context("predictors.json: a layer without predicted_density")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(d))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
