//! A prepared directory and the one resumable command that fills it, [`prepare_dir`]: profile, calibrate,
//! train and pack (their intermediate files kept in `DIR/intermediates/`), measure the device, plan, and
//! remove the intermediates once everything is done, so that a finished directory holds only what the
//! runtime needs (docs/format.md, "Prepared directory").
//!
//! What is done is decided from the manifest ([`Manifest`]) and the files present: a step runs only when a
//! later step needs its output and that output is not there with the same key. A finished directory is
//! therefore checked, not recomputed, even though its intermediates are gone; a changed setting recomputes
//! exactly the intermediates the steps after it need.

use std::fmt;
use std::path::{Path, PathBuf};

use pinion_format::GgmlType;
use pinion_format::packed::PackSummary;
use pinion_plan::{Budget, DeviceProfile, Plan, PlanError, PlanOptions};
use pinion_predictor::train::{LayerReport, TrainConfig};
use pinion_predictor::{ActivationProfile, LowRankPredictor};
use pinion_runtime::{ContextParams, Model, OFFLOAD_CHUNK, PACKED_FILE_NAME, RuntimeError};

use crate::device::{self, ProbeOptions};
use crate::error::{PrepareError, io_err};
use crate::files::{load_device, save_device, save_plan};
use crate::manifest::{Manifest, Redo, file_identity, step_key};
use crate::report::{PackedSizes, PredictorQuality, PredictorReport, PrepareReport, SparsityReport};
use crate::steps::{
    MAX_SEARCHED_SPARSITY, PackStepOptions, ProfileOptions, Rule, activation_frequencies, calibrate,
    calibrate_for_quality, heldout_tokens, load_predictors, load_profile, pack_model, profile_activations,
    route_frequencies, save_predictors, save_profile, train_predictors,
};
use crate::thresholds::Thresholds;

/// The subdirectory of a prepared directory holding the intermediate files.
pub const INTERMEDIATES_DIR: &str = "intermediates";
/// The activation profile (intermediate).
pub const PROFILE_FILE: &str = "profile.bin";
/// The thresholds file (intermediate).
pub const THRESHOLDS_FILE: &str = "thresholds.json";
/// The trained predictors (intermediate).
pub const PREDICTORS_FILE: &str = "predictors.gguf";
/// The predictors' held-out report (intermediate).
pub const PREDICTORS_REPORT_FILE: &str = "predictors.json";
/// The device profile.
pub const DEVICE_FILE: &str = "device.json";
/// The plan.
pub const PLAN_FILE: &str = "plan.json";
/// The preparation report.
pub const REPORT_FILE: &str = "report.json";
/// What a finished directory holds (`device.json` only when no other device profile was named).
pub const KEPT_FILES: [&str; 5] =
    [PACKED_FILE_NAME, DEVICE_FILE, PLAN_FILE, REPORT_FILE, crate::manifest::MANIFEST_FILE];

/// The intermediate files, which version 1 directories kept beside the model.
const INTERMEDIATE_FILES: [&str; 4] =
    [PROFILE_FILE, THRESHOLDS_FILE, PREDICTORS_FILE, PREDICTORS_REPORT_FILE];

/// The paths of a prepared directory's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedDir {
    root: PathBuf,
}

impl PreparedDir {
    /// The directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> PreparedDir {
        PreparedDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `intermediates/`, where the intermediate files live until the preparation finishes.
    pub fn intermediates(&self) -> PathBuf {
        self.root.join(INTERMEDIATES_DIR)
    }

    /// `intermediates/profile.bin`.
    pub fn profile(&self) -> PathBuf {
        self.intermediates().join(PROFILE_FILE)
    }

    /// `intermediates/thresholds.json`.
    pub fn thresholds(&self) -> PathBuf {
        self.intermediates().join(THRESHOLDS_FILE)
    }

    /// `intermediates/predictors.gguf`.
    pub fn predictors(&self) -> PathBuf {
        self.intermediates().join(PREDICTORS_FILE)
    }

    /// `intermediates/predictors.json`.
    pub fn predictors_report(&self) -> PathBuf {
        self.intermediates().join(PREDICTORS_REPORT_FILE)
    }

    /// `model.pinion`, what `pinion -m DIR` loads.
    pub fn model(&self) -> PathBuf {
        self.root.join(PACKED_FILE_NAME)
    }

    /// `report.json`.
    pub fn report(&self) -> PathBuf {
        self.root.join(REPORT_FILE)
    }

    /// `device.json`.
    pub fn device(&self) -> PathBuf {
        self.root.join(DEVICE_FILE)
    }

    /// `plan.json`.
    pub fn plan(&self) -> PathBuf {
        self.root.join(PLAN_FILE)
    }
}

/// A step of [`prepare_dir`], named in the manifest by [`Step::name`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Profile the dense model's activations over the calibration text (`intermediates/profile.bin`).
    Profile,
    /// Calibrate the thresholds (`intermediates/thresholds.json`).
    Calibrate,
    /// Train the predictors (`intermediates/predictors.gguf`, `predictors.json`).
    Train,
    /// Pack the model (`model.pinion`, `report.json`).
    Pack,
    /// Measure the device (`device.json`), when no device profile exists.
    Device,
    /// Plan (`plan.json`).
    Plan,
}

impl Step {
    /// The step's name in the manifest and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Step::Profile => "profile",
            Step::Calibrate => "calibrate",
            Step::Train => "train",
            Step::Pack => "pack",
            Step::Device => "device",
            Step::Plan => "plan",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`prepare_dir`] prepares, and how.
#[derive(Clone, Debug)]
pub struct PrepareConfig {
    /// The source model (GGUF).
    pub model: PathBuf,
    /// The calibration text.
    pub calib: PathBuf,
    /// The prepared directory (created if absent).
    pub out: PathBuf,
    /// Profiling settings; its thread count is also training's and the plan's.
    pub profile: ProfileOptions,
    /// What the thresholds of SiLU and GELU models aim at (ReLU-family models keep their own zeros).
    pub sparsity: SparsityTarget,
    /// How SiLU and GELU models' neurons are chosen.
    pub rule: Rule,
    /// Predictor training, or `None` for threshold sparsity only.
    pub train: Option<TrainConfig>,
    /// Neurons per packed cluster record.
    pub cluster_neurons: usize,
    /// Type of the packed down columns.
    pub down_type: GgmlType,
    /// A device profile to plan with; `None`: `DIR/device.json`. Either is measured and written when it does
    /// not exist, and `DIR/device.json` also when an older pinion wrote it (another version).
    pub device: Option<PathBuf>,
    /// How the device is measured, when it is ([`ProbeOptions::new`] with `DIR` for the scratch file is the
    /// full probe).
    pub probe: ProbeOptions,
    /// Memory budget of the plan; `None`: half the GGUF, or the smallest budget that works if that is more.
    pub mem_budget: Option<Budget>,
    /// Context size the plan reserves a KV cache for.
    pub ctx: usize,
    /// Keep `intermediates/` when the preparation finishes (it is removed otherwise).
    pub keep_intermediates: bool,
    /// Redo every step, even those already done.
    pub force: bool,
}

/// What the thresholds of a SiLU or GELU model aim at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparsityTarget {
    /// This sparsity in every layer, in [0, 1).
    Fixed(f64),
    /// The highest sparsity whose perplexity on the held-out end of the calibration text (the last
    /// `ProfileOptions::holdout` tokens, left out of the profile) is at most `1 + P` times the dense one
    /// (see `search_sparsity`).
    MaxPplIncrease(f64),
}

impl std::fmt::Display for SparsityTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SparsityTarget::Fixed(s) => write!(f, "sparsity {s}"),
            SparsityTarget::MaxPplIncrease(p) => write!(f, "perplexity increase at most {:.4}%", 100.0 * p),
        }
    }
}

/// What [`prepare_dir`] reports as it goes, for a driver to show.
#[non_exhaustive]
pub enum Event<'a> {
    /// The source model is loaded; the steps begin.
    Started {
        /// The source model.
        model: &'a Model,
        /// Its file's size.
        source_bytes: u64,
    },
    /// A version 1 directory's intermediate files were moved into `intermediates/`.
    Migrated {
        /// Where they are now.
        files: &'a [PathBuf],
    },
    /// A step was done with the same inputs and settings and its outputs exist: not run.
    UpToDate(Step),
    /// A step runs, and why.
    Running {
        /// The step.
        step: Step,
        /// Why it runs.
        why: &'a Redo,
    },
    /// Progress inside a step: `done` of `total` (tokens for the profile, layers for training and packing,
    /// points of the device probe's `part`).
    Progress {
        /// The step.
        step: Step,
        /// The part of the step (the device probe's measurement), or "".
        part: &'a str,
        /// Work done.
        done: usize,
        /// Work in all.
        total: usize,
        /// A note on the last piece of work, or "".
        note: &'a str,
    },
    /// The profile step finished.
    Profiled {
        /// The profile.
        profile: &'a ActivationProfile,
        /// Whether the model's activation is of the ReLU family (firing counts are meaningful).
        relu_family: bool,
    },
    /// The calibrate step finished.
    Calibrated(&'a Thresholds),
    /// The train step finished.
    Trained {
        /// Per layer, the held-out report.
        reports: &'a [LayerReport],
        /// Token samples of the profile.
        n_token_samples: usize,
        /// The recall the predictors were tuned for.
        target_recall: f64,
    },
    /// The pack step finished.
    Packed(&'a PackSummary),
    /// The plan uses the device profile in this existing file.
    DeviceFrom(&'a Path),
    /// The device was measured.
    DeviceMeasured(&'a DeviceProfile),
    /// No budget was given and the default one is below the minimum: the plan is for the minimum (with a MiB
    /// of headroom) instead.
    BudgetRaised {
        /// The planner's refusal of the last budget tried.
        refused: &'a PrepareError,
        /// The budget tried next, bytes.
        budget: u64,
    },
    /// The plan step finished.
    Planned(&'a Plan),
    /// The intermediates were removed.
    Cleaned {
        /// The directory removed.
        dir: &'a Path,
        /// Bytes it held.
        bytes: u64,
    },
}

/// What a [`prepare_dir`] call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The steps that ran, in order (empty when the directory was already prepared with these settings).
    pub ran: Vec<Step>,
    /// Bytes of intermediates removed at the end (0 with `keep_intermediates`, or when there were none).
    pub removed_bytes: u64,
}

/// The keys of the steps, from the settings and the input files' identities.
struct Keys {
    profile: String,
    calibrate: String,
    train: Option<String>,
    pack: String,
}

impl Keys {
    fn new(cfg: &PrepareConfig, o: &ProfileOptions) -> Result<Keys, PrepareError> {
        let profile = step_key(&[
            &file_identity(&cfg.model)?,
            &file_identity(&cfg.calib)?,
            &format!(
                "{} {} {} {}{}",
                o.max_tokens,
                o.chunk,
                o.score_samples,
                o.token_samples,
                if o.random_tokens { " random tokens" } else { "" }
            ),
            &format!("holdout {}", o.holdout),
            &format!("profile v{}", pinion_predictor::PROFILE_VERSION),
        ]);
        let calibrate = step_key(&[&profile, &cfg.sparsity.to_string(), cfg.rule.name()]);
        let train = cfg.train.as_ref().map(|t| step_key(&[&calibrate, &format!("{t:?}")]));
        // The packed format's version is part of the key: a directory packed by an older pinion is packed again.
        let pack = step_key(&[
            &calibrate,
            train.as_deref().unwrap_or("no predictors"),
            &format!("{} {:?}", cfg.cluster_neurons, cfg.down_type),
            &format!(
                "packed v{} report v{}",
                pinion_format::packed::PACKED_VERSION,
                crate::report::REPORT_VERSION
            ),
        ]);
        Ok(Keys { profile, calibrate, train, pack })
    }
}

/// Profiles, calibrates, trains and packs `cfg.model` into `cfg.out`, measures the device if needed and plans,
/// resuming from what the directory already holds (see the module documentation); then removes
/// `intermediates/` unless `cfg.keep_intermediates`. A failed call keeps everything it wrote, so the next one
/// resumes. `on_event` is told what happens.
pub fn prepare_dir(
    cfg: &PrepareConfig,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Prepared, PrepareError> {
    check_config(cfg)?;
    let dir = PreparedDir::new(cfg.out.clone());
    std::fs::create_dir_all(dir.root()).map_err(io_err(dir.root()))?;
    let mut manifest = Manifest::load(dir.root())?;
    let model = Model::load(&cfg.model)?;
    let profile_opts = profile_options(cfg, &model);
    let keys = Keys::new(cfg, &profile_opts)?;
    let source_bytes = std::fs::metadata(&cfg.model).map_err(io_err(&cfg.model))?.len();
    on_event(Event::Started { model: &model, source_bytes });
    if manifest.version() == Some(1) {
        let moved = migrate_v1(&dir)?;
        manifest.save(dir.root())?;
        on_event(Event::Migrated { files: &moved });
    }
    if cfg.force {
        manifest = Manifest::default();
        manifest.save(dir.root())?;
    }
    let profile = &profile_opts;
    let mut run =
        Run { cfg, profile, dir: &dir, model: &model, keys: &keys, manifest, on_event, ran: Vec::new() };
    pack_step(&mut run)?;
    let Run { mut manifest, mut ran, on_event, .. } = run;
    // The plan counts this process's resident memory as pinion's: the source model goes first.
    drop(model);

    let f_device = cfg.device.clone().unwrap_or_else(|| dir.device());
    let found = match f_device.exists() {
        false => Err(Redo::NotDone),
        true => match load_device(&f_device) {
            Ok(d) => Ok(d),
            // The directory's own profile, measured by an older pinion: measured again.
            Err(PrepareError::Plan(PlanError::Version { .. })) if cfg.device.is_none() => {
                Err(Redo::Outdated(f_device.clone()))
            }
            Err(e) => return Err(e),
        },
    };
    let device = match found {
        Ok(d) => {
            on_event(Event::DeviceFrom(&f_device));
            // A profile given from elsewhere goes into the directory too: runs plan with the directory's.
            if f_device != dir.device() {
                save_device(&d, &dir.device())?;
            }
            d
        }
        Err(why) => {
            on_event(Event::Running { step: Step::Device, why: &why });
            let d = device::measure(&cfg.probe, &mut |part, done, total| {
                on_event(Event::Progress { step: Step::Device, part, done, total, note: "" })
            })?;
            save_device(&d, &f_device)?;
            ran.push(Step::Device);
            on_event(Event::DeviceMeasured(&d));
            d
        }
    };

    let budget_arg = cfg.mem_budget.unwrap_or(Budget::Percent(50.0));
    let threads = cfg.profile.threads;
    let k_plan = step_key(&[
        &keys.pack,
        &budget_arg.to_string(),
        &cfg.ctx.to_string(),
        &threads.to_string(),
        &file_identity(&f_device)?,
    ]);
    match redo(cfg, &manifest, Step::Plan, &k_plan, &[&dir.plan()]) {
        None => on_event(Event::UpToDate(Step::Plan)),
        Some(why) => {
            on_event(Event::Running { step: Step::Plan, why: &why });
            let budget = budget_arg.bytes(source_bytes);
            let plan = plan_with_fallback(cfg, dir.root(), &device, budget, on_event)?;
            save_plan(&plan, &dir.plan())?;
            manifest.mark(dir.root(), Step::Plan.name(), &k_plan)?;
            ran.push(Step::Plan);
            on_event(Event::Planned(&plan));
        }
    }

    let removed_bytes = match cfg.keep_intermediates {
        true => 0,
        false => {
            let bytes = remove_intermediates(dir.root())?;
            if bytes > 0 {
                on_event(Event::Cleaned { dir: &dir.intermediates(), bytes });
            }
            bytes
        }
    };
    Ok(Prepared { ran, removed_bytes })
}

/// The profile's settings: `cfg.profile`, keeping no token samples when nothing uses them: no predictors are
/// trained, and the model is of the ReLU family (its thresholds are 0) or keeps every neuron (sparsity 0). They
/// are most of a mixture of experts' profile (9.7 GB for the mixtral-47b shape's 256 experts at 1,024 tokens).
fn profile_options(cfg: &PrepareConfig, model: &Model) -> ProfileOptions {
    let keeps_all = matches!(cfg.sparsity, SparsityTarget::Fixed(s) if s <= 0.0);
    let needed = cfg.train.is_some() || !(model.config().ffn_act.is_relu_family() || keeps_all);
    ProfileOptions {
        token_samples: if needed { cfg.profile.token_samples } else { 0 },
        ..cfg.profile.clone()
    }
}

/// How many times a refused default budget is raised before giving up.
const BUDGET_RAISES: usize = 3;

/// Plans for `budget`. When no budget was given and the default is refused as too small, plans for the minimum
/// the planner names instead, plus a MiB, rounded up to whole MiB: the minimum counts this process's resident
/// set, which grows a little as each attempt loads the packed model, so planning for exactly the minimum can
/// be refused again (it was, by 0.1 MiB, preparing SmolLM2).
fn plan_with_fallback(
    cfg: &PrepareConfig,
    dir: &Path,
    device: &DeviceProfile,
    mut budget: u64,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Plan, PrepareError> {
    let mut raised = 0;
    loop {
        match plan_prepared(dir, device, budget, cfg.ctx, cfg.profile.threads) {
            Err(e) if cfg.mem_budget.is_none() && raised < BUDGET_RAISES => {
                let Some(minimum) = budget_minimum(&e) else { return Err(e) };
                budget = (minimum + (1 << 20)).next_multiple_of(1 << 20);
                raised += 1;
                on_event(Event::BudgetRaised { refused: &e, budget });
            }
            r => return r,
        }
    }
}

fn check_config(cfg: &PrepareConfig) -> Result<(), PrepareError> {
    let bad = |setting, why: String| Err(PrepareError::InvalidSetting { setting, why });
    match cfg.sparsity {
        SparsityTarget::Fixed(s) if !(0.0..1.0).contains(&s) => {
            return bad("sparsity", format!("{s} is not in [0, 1)"));
        }
        SparsityTarget::MaxPplIncrease(p) if !(p.is_finite() && p >= 0.0) => {
            return bad("max-ppl-increase", format!("{p} is not a finite share >= 0"));
        }
        SparsityTarget::MaxPplIncrease(_) if cfg.profile.holdout == 0 || cfg.profile.random_tokens => {
            return bad(
                "max-ppl-increase",
                "needs held-out calibration text (ProfileOptions::holdout)".into(),
            );
        }
        _ => {}
    }
    if cfg.cluster_neurons == 0 {
        return bad("cluster_neurons", "must be positive".into());
    }
    if cfg.ctx == 0 || cfg.profile.threads == 0 {
        return bad("ctx and threads", "must be positive".into());
    }
    Ok(())
}

/// Removes `dir`'s `intermediates/` (if any) and returns the bytes its files held.
pub fn remove_intermediates(dir: &Path) -> Result<u64, PrepareError> {
    let cache = PreparedDir::new(dir).intermediates();
    if !cache.exists() {
        return Ok(0);
    }
    let bytes = tree_bytes(&cache)?;
    std::fs::remove_dir_all(&cache).map_err(io_err(&cache))?;
    Ok(bytes)
}

/// Bytes of the files under `path`.
fn tree_bytes(path: &Path) -> Result<u64, PrepareError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut sum = 0;
    for entry in std::fs::read_dir(path).map_err(io_err(path))? {
        sum += tree_bytes(&entry.map_err(io_err(path))?.path())?;
    }
    Ok(sum)
}

/// Moves a version 1 directory's intermediates (beside the model) into `intermediates/`. Its predictors report
/// had no envelope: it is rewritten with one, or dropped (so that training is redone) if it cannot be read.
fn migrate_v1(dir: &PreparedDir) -> Result<Vec<PathBuf>, PrepareError> {
    let mut moved = Vec::new();
    for name in INTERMEDIATE_FILES {
        let from = dir.root().join(name);
        if !from.is_file() {
            continue;
        }
        let cache = dir.intermediates();
        std::fs::create_dir_all(&cache).map_err(io_err(&cache))?;
        let to = cache.join(name);
        if name == PREDICTORS_REPORT_FILE {
            let bytes = std::fs::read(&from).map_err(io_err(&from))?;
            std::fs::remove_file(&from).map_err(io_err(&from))?;
            match serde_json::from_slice::<PredictorReport>(&bytes) {
                Ok(r) => r.save(&to)?,
                Err(_) => continue,
            }
        } else {
            std::fs::rename(&from, &to).map_err(io_err(&to))?;
        }
        moved.push(to);
    }
    Ok(moved)
}

/// Why `step` must run (`None`: it is up to date).
fn redo(cfg: &PrepareConfig, manifest: &Manifest, step: Step, key: &str, outputs: &[&Path]) -> Option<Redo> {
    let why = manifest.redo(step.name(), key, outputs)?;
    Some(if cfg.force { Redo::Forced } else { why })
}

/// The state of the steps up to packing.
struct Run<'a, 'e> {
    cfg: &'a PrepareConfig,
    /// The profile's settings ([`profile_options`]).
    profile: &'a ProfileOptions,
    dir: &'a PreparedDir,
    model: &'a Model,
    keys: &'a Keys,
    manifest: Manifest,
    on_event: &'e mut dyn FnMut(Event<'_>),
    ran: Vec<Step>,
}

impl Run<'_, '_> {
    fn redo(&self, step: Step, key: &str, outputs: &[&Path]) -> Option<Redo> {
        redo(self.cfg, &self.manifest, step, key, outputs)
    }

    fn emit(&mut self, e: Event<'_>) {
        (self.on_event)(e)
    }

    /// Records `step` as done.
    fn done(&mut self, step: Step, key: &str) -> Result<(), PrepareError> {
        self.manifest.mark(self.dir.root(), step.name(), key)?;
        self.ran.push(step);
        Ok(())
    }

    fn make_intermediates(&self) -> Result<(), PrepareError> {
        let cache = self.dir.intermediates();
        std::fs::create_dir_all(&cache).map_err(io_err(&cache))
    }
}

/// Packs the model, if it is not packed with these settings: the thresholds, predictors and profile it needs
/// are read from `intermediates/` or recomputed.
fn pack_step(run: &mut Run<'_, '_>) -> Result<(), PrepareError> {
    let (f_model, f_report) = (run.dir.model(), run.dir.report());
    let Some(why) = run.redo(Step::Pack, &run.keys.pack, &[&f_model, &f_report]) else {
        run.emit(Event::UpToDate(Step::Pack));
        return Ok(());
    };
    let mut profile = None;
    let th = thresholds(run, &mut profile)?;
    let predictors = match &run.cfg.train {
        Some(train) => Some(predictors(run, &mut profile, &th, train)?),
        None => None,
    };
    let p = profile_of(run, &mut profile)?;
    let freq = activation_frequencies(run.model, p, &th)?;
    let route_frequency = route_frequencies(run.model, p);
    // The profile is the largest thing held (hundreds of MB for a small model): packing does not need it.
    drop(profile);
    run.emit(Event::Running { step: Step::Pack, why: &why });
    let cfg = run.cfg;
    let opts = PackStepOptions {
        cluster_neurons: cfg.cluster_neurons,
        down_type: cfg.down_type,
        predicted_density: predictors.as_ref().map(|(_, r)| r.predicted_density()),
        route_frequency,
    };
    let on_event = &mut *run.on_event;
    let summary = pack_model(
        &cfg.model,
        &f_model,
        &freq,
        &th,
        predictors.as_ref().map(|(p, _)| p.as_slice()),
        &opts,
        &mut |done, total| on_event(Event::Progress { step: Step::Pack, part: "", done, total, note: "" }),
    )?;
    let report = PrepareReport {
        source: cfg.model.display().to_string(),
        sparsity: SparsityReport::from(&th),
        predictors: predictors.map(|(_, r)| r),
        packed: PackedSizes::new(&summary, cfg.cluster_neurons, cfg.down_type),
    };
    report.save(&f_report)?;
    run.done(Step::Pack, &run.keys.pack)?;
    run.emit(Event::Packed(&summary));
    Ok(())
}

/// The profile, read from `intermediates/` or made (once per call of [`prepare_dir`]: `slot` holds it).
fn profile_of<'s>(
    run: &mut Run<'_, '_>,
    slot: &'s mut Option<ActivationProfile>,
) -> Result<&'s ActivationProfile, PrepareError> {
    let p = match slot.take() {
        Some(p) => p,
        None => {
            let f = run.dir.profile();
            match run.redo(Step::Profile, &run.keys.profile, &[&f]) {
                None => {
                    run.emit(Event::UpToDate(Step::Profile));
                    load_profile(&f)?
                }
                Some(why) => {
                    run.emit(Event::Running { step: Step::Profile, why: &why });
                    let calib = &run.cfg.calib;
                    let text = std::fs::read_to_string(calib).map_err(io_err(calib))?;
                    let on_event = &mut *run.on_event;
                    let p = profile_activations(run.model, &text, run.profile, &mut |done, total| {
                        on_event(Event::Progress { step: Step::Profile, part: "", done, total, note: "" })
                    })?;
                    run.make_intermediates()?;
                    save_profile(&p, &f)?;
                    run.done(Step::Profile, &run.keys.profile)?;
                    let relu_family = run.model.config().ffn_act.is_relu_family();
                    run.emit(Event::Profiled { profile: &p, relu_family });
                    p
                }
            }
        }
    };
    Ok(slot.insert(p))
}

/// The thresholds, read from `intermediates/` or calibrated.
fn thresholds(
    run: &mut Run<'_, '_>,
    profile: &mut Option<ActivationProfile>,
) -> Result<Thresholds, PrepareError> {
    let f = run.dir.thresholds();
    let Some(why) = run.redo(Step::Calibrate, &run.keys.calibrate, &[&f]) else {
        run.emit(Event::UpToDate(Step::Calibrate));
        return Thresholds::load(&f);
    };
    let p = profile_of(run, profile)?;
    run.emit(Event::Running { step: Step::Calibrate, why: &why });
    let cfg = run.cfg;
    let th = match cfg.sparsity {
        SparsityTarget::MaxPplIncrease(max) if !run.model.config().ffn_act.is_relu_family() => {
            let text = std::fs::read_to_string(&cfg.calib).map_err(io_err(&cfg.calib))?;
            let n = cfg.profile.holdout;
            let heldout = heldout_tokens(run.model, &text, n)
                .ok_or(PrepareError::CalibrationTooShort { tokens: 0, needed: 2 * n })?;
            let chunk = cfg.profile.chunk.min(heldout.len());
            // Bisection on hundredths of [0, MAX_SEARCHED_SPARSITY]: dense, the top, then halvings.
            let total = 2 + (MAX_SEARCHED_SPARSITY * 100.0).log2().ceil() as usize;
            let on_event = &mut *run.on_event;
            calibrate_for_quality(
                run.model,
                p,
                cfg.rule,
                &heldout,
                chunk,
                cfg.profile.threads,
                max,
                &mut |i, s, ppl| {
                    let note = format!("sparsity {s:.2}: perplexity {ppl:.3}");
                    on_event(Event::Progress {
                        step: Step::Calibrate,
                        part: "",
                        done: i + 1,
                        total,
                        note: &note,
                    })
                },
            )?
        }
        SparsityTarget::MaxPplIncrease(_) => calibrate(run.model, p, 0.0, cfg.rule)?,
        SparsityTarget::Fixed(s) => calibrate(run.model, p, s, cfg.rule)?,
    };
    run.make_intermediates()?;
    th.save(&f)?;
    run.done(Step::Calibrate, &run.keys.calibrate)?;
    run.emit(Event::Calibrated(&th));
    Ok(th)
}

/// The predictors and their report, read from `intermediates/` or trained.
fn predictors(
    run: &mut Run<'_, '_>,
    profile: &mut Option<ActivationProfile>,
    th: &Thresholds,
    train: &TrainConfig,
) -> Result<(Vec<LowRankPredictor>, PredictorReport), PrepareError> {
    let (f, f_report) = (run.dir.predictors(), run.dir.predictors_report());
    let key = run.keys.train.clone().unwrap_or_default();
    let Some(why) = run.redo(Step::Train, &key, &[&f, &f_report]) else {
        run.emit(Event::UpToDate(Step::Train));
        return Ok((load_predictors(&f)?, PredictorReport::load(&f_report)?));
    };
    let p = profile_of(run, profile)?;
    run.emit(Event::Running { step: Step::Train, why: &why });
    let on_event = &mut *run.on_event;
    let trained = train_predictors(run.model, p, th, train, &mut |done, total, r| {
        let note = format!("last: rank {}, recall {:.3}", r.rank, r.recall);
        on_event(Event::Progress { step: Step::Train, part: "", done, total, note: &note })
    })?;
    let n_token_samples = p.n_token_samples();
    let (predictors, reports): (Vec<_>, Vec<_>) = trained.into_iter().unzip();
    let report = PredictorReport {
        target_recall: train.target_recall,
        layers: reports.iter().map(PredictorQuality::from).collect(),
    };
    run.make_intermediates()?;
    save_predictors(&predictors, &f)?;
    report.save(&f_report)?;
    run.done(Step::Train, &key)?;
    run.emit(Event::Trained { reports: &reports, n_token_samples, target_recall: train.target_recall });
    Ok((predictors, report))
}

/// The plan of running the packed model in `dir` under `budget` bytes with a context of `ctx` tokens on
/// `threads` threads: what `pinion run --mem-budget` plans for the same inputs, with this process's measured
/// resident set standing in for pinion's.
pub fn plan_prepared(
    dir: &Path,
    device: &DeviceProfile,
    budget: u64,
    ctx: usize,
    threads: usize,
) -> Result<Plan, PrepareError> {
    let packed = Model::load(dir)?;
    let params = ContextParams { n_ubatch: OFFLOAD_CHUNK, ..ContextParams::new(ctx, threads) };
    // Measured as a run measures itself: after the heap gives back what earlier steps freed.
    pinion_io::bound_heap_retention();
    let process = pinion_runtime::planning::current_rss();
    let opts = PlanOptions::new(budget);
    Ok(pinion_runtime::planning::plan_run(&packed, &params, &opts, device, process)?)
}

/// The minimum of a refused budget, if that is why planning failed.
pub fn budget_minimum(e: &PrepareError) -> Option<u64> {
    match e {
        PrepareError::Runtime(RuntimeError::Plan(PlanError::BudgetTooSmall { minimum, .. }))
        | PrepareError::Plan(PlanError::BudgetTooSmall { minimum, .. }) => Some(*minimum),
        _ => None,
    }
}
