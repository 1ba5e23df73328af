//! The offline preparation drivers: `cargo xtask profile`, `calibrate`, `train`, `pack`, `plan` and `prepare`
//! (all of them in one resumable command, `pinion_prepare::prepare_dir`). The work, and the deciding of what
//! is done, is in `pinion_prepare` and the planning in `pinion_runtime::planning` (the same plan a run makes);
//! these parse arguments, show progress and print reports.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use pinion_format::GgmlType;
use pinion_plan::Budget;
use pinion_predictor::LowRankPredictor;
use pinion_predictor::train::{LayerReport, TrainConfig};
use pinion_prepare::device::ProbeOptions;
use pinion_prepare::{
    self as prepare, Event, PackStepOptions, PrepareConfig, ProfileOptions, Redo, Rule, SparsityTarget, Step,
    Thresholds, registry,
};
use pinion_runtime::{Model, PACKED_FILE_NAME};

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
    /// Profile on uniformly random token ids (what `pinion bench` feeds a model) instead of the calibration
    /// text: for synthetic models, which have no text of their own.
    #[arg(long)]
    pub(crate) calib_random: bool,
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
            random_tokens: self.calib_random,
            ..ProfileOptions::default()
        }
    }
}

/// Profiles `model` over the calibration text, with a progress bar.
fn run_profile(model: &Model, a: &ProfileArgs) -> Result<pinion_prepare::ActivationProfile> {
    let text = std::fs::read_to_string(&a.calib).with_context(|| format!("reading {}", a.calib.display()))?;
    let mut pb = Progress::new("profile", "layers");
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
    print_firing(model.config().ffn_act.is_relu_family(), &p, model.config().experts_per_layer());
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// The label of FFN unit `u` of a model of `experts` experts per layer: the layer, or `layer.expert`.
fn unit_label(u: usize, experts: usize) -> String {
    match experts {
        0 | 1 => u.to_string(),
        n => format!("{}.{}", u / n, u % n),
    }
}

/// The heading of a per-unit column: `layer`, or `layer.expert` for a mixture of experts.
fn unit_heading(experts: usize) -> &'static str {
    if experts > 1 { "layer.expert" } else { "layer" }
}

fn print_firing(relu_family: bool, p: &pinion_prepare::ActivationProfile, experts: usize) {
    if !relu_family {
        return;
    }
    println!("{}  firing density  hottest 10% of neurons carry", unit_heading(experts));
    for l in 0..p.n_layers() {
        let mut f = p.firing_frequency(l);
        let density = f.iter().sum::<f64>() / f.len() as f64;
        f.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = f[..f.len().div_ceil(10)].iter().sum::<f64>() / f.iter().sum::<f64>().max(1e-12);
        println!("{:>5}  {density:>14.4}  {:>5.1}% of activations", unit_label(l, experts), 100.0 * top);
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
    /// How SiLU and GELU neurons are chosen: weighted (|act(g)| times the neuron's calibrated scale) or cats.
    #[arg(long, default_value = "weighted", value_parser = rule)]
    rule: Rule,
    /// Output directory: one thresholds-S.json per sparsity.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// Calibration tokens held out of the profile to judge a quality budget on: four chunks of 512.
const HOLDOUT_TOKENS: usize = 2048;

/// Parses a share: `3%` or `0.03`.
pub(crate) fn share(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    };
    match v {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a share such as 3% or 0.03")),
    }
}

/// Parses `--rule`.
pub(crate) fn rule(s: &str) -> Result<Rule, String> {
    Rule::from_name(s).ok_or_else(|| format!("unknown rule '{s}' (cats, weighted)"))
}

/// `cargo xtask calibrate`: per-layer thresholds (and the weighted rule's scales) for each target sparsity.
pub(crate) fn calibrate(a: &CalibrateCmd) -> Result<()> {
    check_sparsity(&a.sparsity)?;
    let (_, model) = load_model(&a.profile.model)?;
    let profile = match &a.from_profile {
        Some(p) => prepare::load_profile(p)?,
        None => run_profile(&model, &a.profile)?,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for &s in &a.sparsity {
        let th = prepare::calibrate(&model, &profile, s, a.rule)?;
        print_thresholds(&th, model.config().experts_per_layer());
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

pub(crate) fn print_thresholds(th: &Thresholds, experts: usize) {
    let what = match th.target_sparsity.is_finite() {
        true => format!("sparsity {:.2}", th.target_sparsity),
        false => "ReLU-family model, thresholds 0 (the activation's own zeros)".to_string(),
    };
    if let Some(q) = &th.quality {
        println!(
            "\nquality budget {:.1}%: sparsity {:.2}, perplexity {:.3} dense and {:.3} sparse ({:+.2}%) on the \
             {} held-out calibration tokens",
            100.0 * q.max_ppl_increase,
            q.sparsity,
            q.base_ppl,
            q.ppl,
            100.0 * q.increase(),
            q.heldout_tokens
        );
    }
    println!(
        "\n{what}, rule {}: {}, threshold, achieved sparsity on the calibration samples",
        th.rule_name(),
        unit_heading(experts)
    );
    for (l, (t, got)) in th.layers.iter().enumerate() {
        println!("  {:>3}  {t:>10.6}  {got:.4}", unit_label(l, experts));
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
    /// The rule of those thresholds (cats or weighted).
    #[arg(long, default_value = "weighted", value_parser = rule)]
    rule: Rule,
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
    let th = prepare::calibrate(&model, &profile, a.sparsity, a.rule)?;
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
    let reports: Vec<_> = trained.iter().map(|(_, r)| r.clone()).collect();
    print_train_report(&reports, profile.n_token_samples(), cfg.target_recall);
    Ok(trained)
}

/// Prints the predictors' per-layer held-out report.
fn print_train_report(reports: &[LayerReport], n_token_samples: usize, target_recall: f64) {
    let Some(first) = reports.first() else { return };
    println!(
        "\npredictors (held-out {} of {n_token_samples} token samples, target recall {target_recall}): layer, rank, recall, precision, predicted density, true density",
        first.n_heldout,
    );
    for (l, r) in reports.iter().enumerate() {
        println!(
            "  {l:>3}  {:>4}  {:.4}  {:.4}  {:.4}  {:.4}",
            r.rank, r.recall, r.precision, r.predicted_density, r.true_density
        );
    }
    let n = reports.len() as f64;
    let mean = |f: &dyn Fn(&LayerReport) -> f64| reports.iter().map(f).sum::<f64>() / n;
    println!(
        "  mean  recall {:.4}, predicted density {:.4}, true density {:.4}",
        mean(&|r| r.recall),
        mean(&|r| r.predicted_density),
        mean(&|r| r.true_density),
    );
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
    /// A fixed sparsity for the thresholds of SiLU and GELU models, in [0, 1) (ReLU models keep their own
    /// zeros). Default: the highest within --max-ppl-increase.
    #[arg(long)]
    sparsity: Option<f64>,
    /// Quality budget of SiLU and GELU models: the highest sparsity whose perplexity on the held-out end of the
    /// calibration text (its last 2,048 tokens, left out of the profile) rises by at most this much: 3% or 0.03.
    /// Ignored with --sparsity.
    #[arg(long, default_value = "3%", value_parser = share)]
    max_ppl_increase: f64,
    /// How SiLU and GELU neurons are chosen: weighted (|act(g)| times the neuron's calibrated scale) or cats.
    #[arg(long, default_value = "weighted", value_parser = rule)]
    rule: Rule,
    /// Memory budget of the plan recorded in plan.json: bytes (48MiB, 1.5GiB) or a share of the GGUF file
    /// (50%), for the whole process (weights, KV cache, scratch, neuron cache). Default: 50%, or the smallest
    /// budget that works if that is more. Runs plan anew for the budget they are given.
    #[arg(long)]
    mem_budget: Option<Budget>,
    /// Context size the plan reserves a KV cache for.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Skip predictor training (threshold sparsity only). Predictors are trained by default for ReLU-family
    /// models only (see --predictors).
    #[arg(long, conflicts_with = "predictors")]
    no_predictors: bool,
    /// Train predictors for a SiLU or GELU model too (off by default: on SmolLM2 they read more, at recall
    /// 0.95 and predicted density 0.78 against 0.50 above threshold, and cost perplexity; docs/perf.md).
    #[arg(long)]
    predictors: bool,
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
    /// Keep DIR/intermediates/ (profile, thresholds, predictors and their report) when done; without it they
    /// are removed once the directory is prepared.
    #[arg(long)]
    keep_intermediates: bool,
}

/// `cargo xtask prepare`: profile, calibrate, train, pack, measure the device and plan, resuming from the steps
/// a previous run finished; the intermediates are removed at the end unless `--keep-intermediates`.
pub(crate) fn prepare_all(a: &PrepareCmd) -> Result<()> {
    let t0 = Instant::now();
    let model = a.profile.model.clone().unwrap_or_else(registry::default_model_path);
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        model.with_file_name(format!("{stem}.prepared"))
    });
    let relu_family = Model::load(&model)
        .with_context(|| format!("loading {}", model.display()))?
        .config()
        .ffn_act
        .is_relu_family();
    let train = !a.no_predictors && (relu_family || a.predictors);
    let mut profile = a.profile.options();
    if a.sparsity.is_none() && !relu_family {
        profile.holdout = HOLDOUT_TOKENS;
    }
    let cfg = PrepareConfig {
        model,
        calib: a.profile.calib.clone(),
        out: out.clone(),
        profile,
        sparsity: match a.sparsity {
            Some(s) => SparsityTarget::Fixed(s),
            None => SparsityTarget::MaxPplIncrease(a.max_ppl_increase),
        },
        rule: a.rule,
        train: train.then(|| a.train.config(a.profile.threads)),
        cluster_neurons: a.cluster,
        down_type: a.down_type,
        device: a.device.clone(),
        probe: ProbeOptions::new(out.clone()),
        mem_budget: a.mem_budget,
        ctx: a.ctx,
        keep_intermediates: a.keep_intermediates,
        force: a.force,
    };
    let mut shown = Shown { model: cfg.model.clone(), out: cfg.out.clone(), bar: None, experts: 1 };
    let done = prepare::prepare_dir(&cfg, &mut |e| shown.event(e))
        .with_context(|| format!("preparing {}", cfg.out.display()))?;
    let what = match done.ran.is_empty() {
        true => "already prepared with these settings".to_string(),
        false => format!("done in {:.1} s", t0.elapsed().as_secs_f64()),
    };
    let what = match pinion_runtime::planning::peak_rss() {
        Some(b) => format!("{what}, peak resident set {:.1} MiB", b as f64 / (1 << 20) as f64),
        None => what,
    };
    eprintln!("prepare: {what}; run it with `pinion run -m {}`", cfg.out.display());
    Ok(())
}

/// Shows `prepare_dir`'s events: progress bars on stderr, tables and the plan on stdout.
struct Shown {
    model: PathBuf,
    out: PathBuf,
    bar: Option<(String, Progress)>,
    /// Experts per layer of the model (1: dense), for the labels of per-unit reports.
    experts: usize,
}

impl Shown {
    /// Ends the current progress bar with `line`.
    fn finish(&mut self, line: &str) {
        if let Some((_, pb)) = self.bar.take() {
            pb.finish(line);
        }
    }

    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Started { model, source_bytes } => {
                self.experts = model.config().experts_per_layer();
                eprintln!(
                    "prepare: {} ({}, {} layers{}, {} FFN, {:.1} MiB) into {}",
                    self.model.display(),
                    model.config().name.as_deref().unwrap_or("?"),
                    model.config().n_layers,
                    match self.experts {
                        1 => String::new(),
                        n => format!(" of {n} experts, each prepared as its own FFN unit"),
                    },
                    model.config().ffn_act.name(),
                    mib(source_bytes),
                    self.out.display()
                )
            }
            Event::Migrated { files } => eprintln!(
                "prepare: a version 1 directory: moved {} intermediate files into {}/",
                files.len(),
                prepare::INTERMEDIATES_DIR
            ),
            Event::UpToDate(step) => eprintln!("{step}: up to date, skipped"),
            Event::Running { step, why } => match why {
                Redo::NotDone => {}
                Redo::Removed(p) if p.starts_with(self.out.join(prepare::INTERMEDIATES_DIR)) => eprintln!(
                    "{step}: recomputing {}: it was removed when the last preparation finished (keep it with \
                     --keep-intermediates)",
                    p.display()
                ),
                why => eprintln!("{step}: redoing: {why}"),
            },
            Event::Progress { step, part, done, total, note } => {
                let name = if part.is_empty() { step.name() } else { part };
                if self.bar.as_ref().is_none_or(|(n, _)| n != name) {
                    self.finish("done");
                    let unit = match step {
                        Step::Profile => "layers",
                        Step::Device => "points",
                        Step::Calibrate => "perplexity probes",
                        _ if self.experts > 1 => "FFN units",
                        _ => "layers",
                    };
                    self.bar = Some((name.to_string(), Progress::new(name, unit)));
                }
                if let Some((_, pb)) = self.bar.as_mut() {
                    pb.update(done as u64, total as u64, note);
                }
            }
            Event::Profiled { profile, relu_family } => {
                self.finish(&format!(
                    "{} tokens, {} token samples",
                    profile.n_tokens(),
                    profile.n_token_samples()
                ));
                print_firing(relu_family, profile, self.experts);
            }
            Event::Calibrated(th) => print_thresholds(th, self.experts),
            Event::Trained { reports, n_token_samples, target_recall } => {
                self.finish(&format!("{} predictors", reports.len()));
                print_train_report(reports, n_token_samples, target_recall);
            }
            Event::Packed(s) => self.finish(&format!(
                "{:.1} MiB ({:.1} MiB resident, {:.1} MiB FFN, {:.1} MiB padding)",
                mib(s.file_len),
                mib(s.resident_len),
                mib(s.ffn_len),
                mib(s.padding_bytes)
            )),
            Event::DeviceFrom(p) => eprintln!("device: using {}", p.display()),
            Event::DeviceMeasured(_) => self.finish("done"),
            Event::BudgetRaised { refused, budget } => eprintln!(
                "plan: {refused}; planning for {:.1} MiB instead (pass --mem-budget to choose)",
                mib(budget)
            ),
            Event::Planned(plan) => println!("\n{}", plan.render_with_reasoning()),
            Event::Cleaned { dir, bytes } => eprintln!(
                "prepare: removed {} ({:.1} MiB of intermediates; --keep-intermediates keeps them)",
                dir.display(),
                mib(bytes)
            ),
            _ => {}
        }
    }
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
    let device = prepare::load_device(
        &a.device.clone().unwrap_or_else(|| prepare::PreparedDir::new(&a.prepared).device()),
    )?;
    let mut failed = None;
    for b in &a.mem_budget {
        let budget = b.bytes(source_bytes);
        println!("\n## --mem-budget {b} ({:.1} MiB of a {:.1} MiB GGUF)\n", mib(budget), mib(source_bytes));
        match prepare::plan_prepared(&a.prepared, &device, budget, a.ctx, a.threads) {
            Ok(p) => println!("{}", p.render_with_reasoning()),
            Err(e) => {
                println!("error: {e:#}");
                failed = Some(anyhow::Error::from(e));
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
    let route_frequency = prepare::route_frequencies(&model, &profile);
    drop(profile);
    let predictors = a.predictors.as_deref().map(prepare::load_predictors).transpose()?;
    let out = if a.out.is_dir() { a.out.join(PACKED_FILE_NAME) } else { a.out.clone() };
    let opts = PackStepOptions {
        cluster_neurons: a.cluster,
        down_type: a.down_type,
        predicted_density: None,
        route_frequency,
    };
    let mut pb = Progress::new("pack", "layers");
    let s = prepare::pack_model(&path, &out, &freq, &th, predictors.as_deref(), &opts, &mut |l, n| {
        pb.update(l as u64, n as u64, "")
    })?;
    pb.finish(&format!("{:.1} MiB written to {}", mib(s.file_len), out.display()));
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}
