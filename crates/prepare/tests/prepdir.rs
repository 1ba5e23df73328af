//! `prepare_dir` on a tiny synthetic model: what a finished directory keeps, `keep_intermediates`, resuming an
//! interrupted preparation without redoing its finished steps, a rerun that is a no-op, a changed setting that
//! recomputes the removed intermediates it needs, a version 1 directory (and an outdated device profile), and
//! corrupt files as typed errors.
//!
//! What ran is checked twice, independently: by the events and by the files (a file rewritten is renamed into
//! place, so it gets a new inode).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use pinion_format::GgmlType;
use pinion_format::synth::{self, SynthConfig};
use pinion_plan::{Budget, DeviceProfile};
use pinion_predictor::train::TrainConfig;
use pinion_prepare::device::ProbeOptions;
use pinion_prepare::{
    self as prepare, Event, INTERMEDIATES_DIR, KEPT_FILES, MANIFEST_FILE, Manifest, PredictorReport,
    PrepareConfig, PrepareError, PrepareReport, Prepared, PreparedDir, ProfileOptions, Redo, SparsityReport,
    Step, Thresholds,
};
use pinion_runtime::{Context, ContextParams, Model};

use crate::prepare::{TempDir, synth_model};

/// A synthetic ReLU model, a calibration text and the settings of a quick preparation into `tmp/prepared`
/// (with a device profile already there, so that nothing is measured).
fn setup(tag: &str, predictors: bool) -> (TempDir, PrepareConfig) {
    let tmp = TempDir::new(tag);
    let model =
        synth_model(&tmp, "relu", &SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() });
    let calib = tmp.0.join("calib.txt");
    std::fs::write(&calib, synth::sample_text(2000)).unwrap();
    let out = tmp.0.join("prepared");
    std::fs::create_dir_all(&out).unwrap();
    prepare::save_device(&DeviceProfile::reference(), &PreparedDir::new(&out).device()).unwrap();
    let cfg = PrepareConfig {
        model,
        calib,
        out: out.clone(),
        profile: ProfileOptions {
            max_tokens: 768,
            chunk: 256,
            score_samples: 4096,
            token_samples: 256,
            threads: 2,
            random_tokens: false,
            holdout: 0,
        },
        sparsity: prepare::SparsityTarget::Fixed(0.5),
        rule: prepare::Rule::default(),
        train: predictors.then(|| TrainConfig {
            ranks: vec![16],
            epochs: 3,
            threads: 2,
            ..TrainConfig::default()
        }),
        cluster_neurons: 16,
        down_type: GgmlType::Q8_0,
        device: None,
        // A quick probe, for the test that measures the device.
        probe: ProbeOptions {
            dir: out.clone(),
            file_bytes: 4 << 20,
            block_sizes: vec![4096],
            queue_depths: vec![1],
            seconds_per_point: 0.02,
            max_threads: 1,
            working_set_bytes: 32 << 20,
        },
        mem_budget: Some(Budget::Bytes(1 << 30)),
        ctx: 64,
        keep_intermediates: false,
        force: false,
    };
    (tmp, cfg)
}

/// The events that say what was done.
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    UpToDate(Step),
    Ran(Step, Redo),
    Migrated(usize),
    Cleaned(u64),
}

fn run(cfg: &PrepareConfig) -> (Result<Prepared, PrepareError>, Vec<Seen>) {
    let mut seen = Vec::new();
    let r = prepare::prepare_dir(cfg, &mut |e| match e {
        Event::UpToDate(s) => seen.push(Seen::UpToDate(s)),
        Event::Running { step, why } => seen.push(Seen::Ran(step, why.clone())),
        Event::Migrated { files } => seen.push(Seen::Migrated(files.len())),
        Event::Cleaned { bytes, .. } => seen.push(Seen::Cleaned(bytes)),
        _ => {}
    });
    (r, seen)
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn kept() -> Vec<String> {
    let mut v: Vec<String> = KEPT_FILES.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Each file of `dir` (not recursing) with its inode, length and modification time.
fn identities(dir: &Path) -> BTreeMap<String, (u64, u64, i64, i64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let m = e.metadata().unwrap();
            (e.file_name().to_string_lossy().into_owned(), (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

fn removed(p: PathBuf) -> Redo {
    Redo::Removed(p)
}

#[test]
fn a_finished_directory_keeps_what_the_runtime_needs_and_a_rerun_is_a_no_op() {
    let (_tmp, mut cfg) = setup("prepdir-finished", true);
    let dir = PreparedDir::new(&cfg.out);
    let (r, seen) = run(&cfg);
    let r = r.unwrap();
    assert_eq!(r.ran, [Step::Profile, Step::Calibrate, Step::Train, Step::Pack, Step::Plan]);
    assert!(r.removed_bytes > 0);
    assert_eq!(seen.last(), Some(&Seen::Cleaned(r.removed_bytes)));
    assert_eq!(names(dir.root()), kept());

    // The directory runs, and its report agrees with the packed model and the file system.
    let packed = Model::load(dir.root()).unwrap();
    assert!(packed.is_packed() && packed.sparsity().has_predictors);
    let report = PrepareReport::load(&dir.report()).unwrap();
    let thresholds: Vec<f32> = report.sparsity.layers.iter().map(|l| l.0).collect();
    assert_eq!(packed.sparsity().rule, Some(pinion_runtime::FfnRule::cats(thresholds)));
    assert_eq!(report.sparsity.rule, "cats");
    assert_eq!(report.packed.file_bytes, std::fs::metadata(dir.model()).unwrap().len());
    assert_eq!(report.predictors.as_ref().map(|p| p.layers.len()), Some(2));
    assert_eq!(report.packed.cluster_neurons, 16);
    prepare::load_plan(&dir.plan()).unwrap();
    let m = Manifest::load(dir.root()).unwrap();
    for step in ["profile", "calibrate", "train", "pack", "plan"] {
        assert!(m.key(step).is_some(), "{step} recorded");
    }

    // The same settings again: nothing runs, nothing is written, the intermediates are not recomputed.
    let before = identities(dir.root());
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap(), Prepared { ran: vec![], removed_bytes: 0 });
    assert_eq!(seen, [Seen::UpToDate(Step::Pack), Seen::UpToDate(Step::Plan)]);
    assert_eq!(identities(dir.root()), before);
    assert_eq!(names(dir.root()), kept());

    // Another cluster size: the removed intermediates are recomputed, and say so.
    cfg.cluster_neurons = 8;
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap().ran, [Step::Profile, Step::Calibrate, Step::Train, Step::Pack, Step::Plan]);
    assert_eq!(
        seen[..5],
        [
            Seen::Ran(Step::Profile, removed(dir.profile())),
            Seen::Ran(Step::Calibrate, removed(dir.thresholds())),
            Seen::Ran(Step::Train, removed(dir.predictors())),
            Seen::Ran(Step::Pack, Redo::Changed),
            Seen::Ran(Step::Plan, Redo::Changed),
        ]
    );
    assert_eq!(names(dir.root()), kept());
    assert_eq!(PrepareReport::load(&dir.report()).unwrap().packed.cluster_neurons, 8);
    assert_ne!(
        identities(dir.root())[pinion_runtime::PACKED_FILE_NAME],
        before[pinion_runtime::PACKED_FILE_NAME]
    );

    // --force redoes everything.
    cfg.force = true;
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap().ran, [Step::Profile, Step::Calibrate, Step::Train, Step::Pack, Step::Plan]);
    assert!(seen.iter().all(|s| !matches!(s, Seen::Ran(_, why) if *why != Redo::Forced)), "{seen:?}");
}

#[test]
fn keep_intermediates_keeps_them_until_a_run_without_it() {
    let (_tmp, mut cfg) = setup("prepdir-keep", true);
    let dir = PreparedDir::new(&cfg.out);
    cfg.keep_intermediates = true;
    let r = run(&cfg).0.unwrap();
    assert_eq!(r.removed_bytes, 0);
    let mut with_cache = kept();
    with_cache.push(INTERMEDIATES_DIR.to_string());
    with_cache.sort();
    assert_eq!(names(dir.root()), with_cache);
    let files = [dir.predictors(), dir.predictors_report(), dir.profile(), dir.thresholds()];
    assert_eq!(
        names(&dir.intermediates()),
        files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
    );

    // They are the files the single steps read, and agree with what was packed.
    let profile = prepare::load_profile(&dir.profile()).unwrap();
    assert_eq!((profile.n_layers(), profile.n_tokens(), profile.n_token_samples()), (2, 768, 256));
    let report = PrepareReport::load(&dir.report()).unwrap();
    assert_eq!(SparsityReport::from(&Thresholds::load(&dir.thresholds()).unwrap()), report.sparsity);
    assert_eq!(PredictorReport::load(&dir.predictors_report()).unwrap(), report.predictors.unwrap());
    let packed = Model::load(dir.root()).unwrap();
    let ps = prepare::load_predictors(&dir.predictors()).unwrap();
    let pp = packed.predictors().unwrap();
    assert_eq!(ps.len(), pp.len());
    assert_eq!(
        ps.iter().map(|p| p.threshold()).collect::<Vec<_>>(),
        pp.iter().map(|p| p.threshold()).collect::<Vec<_>>()
    );

    // Keeping them on a rerun keeps them; a rerun without the flag removes them, recomputing nothing.
    let (r, _) = run(&cfg);
    assert_eq!(r.unwrap().ran, []);
    assert!(dir.intermediates().is_dir());
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    cfg.keep_intermediates = false;
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap(), Prepared { ran: vec![], removed_bytes: bytes });
    assert_eq!(seen.last(), Some(&Seen::Cleaned(bytes)));
    assert_eq!(names(dir.root()), kept());
}

#[test]
fn an_interrupted_preparation_resumes_without_redoing_finished_steps() {
    let (_tmp, mut cfg) = setup("prepdir-resume", true);
    let dir = PreparedDir::new(&cfg.out);
    let good_train = cfg.train.clone();

    // Stopped in training (a recall it cannot be asked for): profile and thresholds are kept.
    cfg.train.as_mut().unwrap().target_recall = 2.0;
    let (r, seen) = run(&cfg);
    assert!(matches!(r, Err(PrepareError::Training { layer: 0, .. })), "{r:?}");
    assert_eq!(
        seen,
        [
            Seen::Ran(Step::Profile, Redo::NotDone),
            Seen::Ran(Step::Calibrate, Redo::NotDone),
            Seen::Ran(Step::Train, Redo::NotDone)
        ]
    );
    assert_eq!(names(&dir.intermediates()), [prepare::PROFILE_FILE, prepare::THRESHOLDS_FILE]);
    assert!(!dir.model().exists());
    let intermediates = identities(&dir.intermediates());

    // Resumed, and stopped again in planning (a budget below the minimum): profile and thresholds are read, not
    // recomputed; what was trained and packed is kept.
    cfg.train = good_train;
    cfg.mem_budget = Some(Budget::Bytes(1));
    let (r, seen) = run(&cfg);
    let e = r.unwrap_err();
    assert!(prepare::budget_minimum(&e).is_some(), "{e}");
    assert_eq!(
        seen,
        [
            Seen::UpToDate(Step::Calibrate),
            Seen::UpToDate(Step::Profile),
            Seen::Ran(Step::Train, Redo::NotDone),
            Seen::Ran(Step::Pack, Redo::NotDone),
            Seen::Ran(Step::Plan, Redo::NotDone),
        ]
    );
    let now = identities(&dir.intermediates());
    for f in [prepare::PROFILE_FILE, prepare::THRESHOLDS_FILE] {
        assert_eq!(now[f], intermediates[f], "{f} untouched");
    }
    assert!(dir.model().exists() && !dir.plan().exists());

    // Resumed with a budget that works: only the plan is made, then the intermediates go.
    cfg.mem_budget = None;
    let packed_before = identities(dir.root())[pinion_runtime::PACKED_FILE_NAME];
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap().ran, [Step::Plan]);
    assert_eq!(seen[..2], [Seen::UpToDate(Step::Pack), Seen::Ran(Step::Plan, Redo::NotDone)]);
    assert_eq!(identities(dir.root())[pinion_runtime::PACKED_FILE_NAME], packed_before);
    assert_eq!(names(dir.root()), kept());
}

#[test]
fn a_version_1_directory_is_migrated_without_recomputing_its_intermediates() {
    let (_tmp, mut cfg) = setup("prepdir-v1", true);
    let dir = PreparedDir::new(&cfg.out);
    cfg.keep_intermediates = true;
    run(&cfg).0.unwrap();
    // Version 1: intermediates beside the model, a predictors report without envelope, no report.json.
    for name in names(&dir.intermediates()) {
        std::fs::rename(dir.intermediates().join(&name), dir.root().join(&name)).unwrap();
    }
    std::fs::remove_dir(dir.intermediates()).unwrap();
    let f = dir.root().join(prepare::PREDICTORS_REPORT_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("format");
    o.remove("version");
    std::fs::write(&f, serde_json::to_vec(&v).unwrap()).unwrap();
    let m = dir.root().join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    v["version"] = 1.into();
    std::fs::write(&m, serde_json::to_vec(&v).unwrap()).unwrap();
    std::fs::remove_file(dir.report()).unwrap();
    // And a device profile of an older version, which is measured again.
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.device()).unwrap()).unwrap();
    v["version"] = 1.into();
    std::fs::write(dir.device(), serde_json::to_vec(&v).unwrap()).unwrap();

    cfg.keep_intermediates = false;
    let (r, seen) = run(&cfg);
    assert_eq!(r.unwrap().ran, [Step::Pack, Step::Device, Step::Plan]);
    assert_eq!(
        seen[..7],
        [
            Seen::Migrated(4),
            Seen::UpToDate(Step::Calibrate),
            Seen::UpToDate(Step::Train),
            Seen::UpToDate(Step::Profile),
            Seen::Ran(Step::Pack, removed(dir.report())),
            Seen::Ran(Step::Device, Redo::Outdated(dir.device())),
            Seen::Ran(Step::Plan, Redo::Changed),
        ]
    );
    assert!(prepare::load_device(&dir.device()).unwrap().is_measured());
    assert_eq!(names(dir.root()), kept());
    assert_eq!(Manifest::load(dir.root()).unwrap().version(), Some(prepare::MANIFEST_VERSION));
}

#[test]
fn corrupt_files_and_bad_settings_are_typed_errors() {
    let (_tmp, mut cfg) = setup("prepdir-corrupt", false);
    let dir = PreparedDir::new(&cfg.out);
    let manifest = dir.root().join(MANIFEST_FILE);

    std::fs::write(&manifest, b"{\"format\": \"pinion-prepared\", \"version\": 2, \"steps\": [1]}").unwrap();
    let (r, seen) = run(&cfg);
    assert!(matches!(r, Err(PrepareError::BadPreparedDir { ref path, .. }) if *path == manifest), "{r:?}");
    assert!(seen.is_empty());
    std::fs::write(&manifest, b"\x00\x01").unwrap();
    assert!(matches!(run(&cfg).0, Err(PrepareError::BadPreparedDir { .. })));
    std::fs::remove_file(&manifest).unwrap();

    // A corrupt intermediate that a step needs.
    cfg.keep_intermediates = true;
    run(&cfg).0.unwrap();
    std::fs::write(dir.thresholds(), b"{\"format\": \"pinion-thresholds\", \"version\": 1, \"layers\": 3}")
        .unwrap();
    cfg.cluster_neurons = 32;
    let (r, _) = run(&cfg);
    assert!(
        matches!(r, Err(PrepareError::BadThresholdsFile { ref path, .. }) if *path == dir.thresholds()),
        "{r:?}"
    );

    // Corrupt reports.
    std::fs::write(dir.report(), b"{\"format\": \"pinion-prepare-report\", \"version\": 1}").unwrap();
    assert!(matches!(PrepareReport::load(&dir.report()), Err(PrepareError::BadPreparedDir { .. })));
    std::fs::write(dir.predictors_report(), b"[]").unwrap();
    assert!(matches!(
        PredictorReport::load(&dir.predictors_report()),
        Err(PrepareError::BadPredictorsFile { .. })
    ));

    // Settings out of range are refused before anything runs.
    for bad in [
        PrepareConfig { sparsity: prepare::SparsityTarget::Fixed(1.0), ..cfg.clone() },
        PrepareConfig { cluster_neurons: 0, ..cfg.clone() },
        PrepareConfig { ctx: 0, ..cfg.clone() },
    ] {
        let (r, seen) = run(&bad);
        assert!(matches!(r, Err(PrepareError::InvalidSetting { .. })), "{r:?}");
        assert!(seen.is_empty());
    }
}

/// A mixture of experts prepares per expert: a profile per FFN unit (each expert's own token samples of the
/// tokens routed to it), thresholds of the weighted rule per expert found under the quality budget, each
/// expert's routing frequency recorded, a predictor per expert, one packed unit per expert; the packed model
/// runs, in memory and offloaded alike.
#[test]
fn a_moe_model_prepares_per_expert() {
    let (tmp, cfg) = setup("prepdir-moe", true);
    let moe = tiny_moe();
    let model = synth_model(&tmp, "moe", &moe);
    let cfg = PrepareConfig {
        model,
        sparsity: prepare::SparsityTarget::MaxPplIncrease(0.05),
        profile: ProfileOptions { holdout: 256, ..cfg.profile.clone() },
        ..cfg
    };
    let (r, seen) = run(&cfg);
    r.unwrap();
    assert!(seen.iter().any(|s| matches!(s, Seen::Ran(Step::Train, _))), "{seen:?}");
    let packed = Model::load(&cfg.out).unwrap();
    let c = packed.config();
    assert_eq!((c.n_units(), packed.packed_layers().unwrap().len()), (8, 8));
    let routes = packed.route_frequency().unwrap();
    for l in 0..2 {
        let sum: f32 = routes[l * 4..(l + 1) * 4].iter().sum();
        assert!((sum - 2.0).abs() < 1e-3, "layer {l}: routing frequencies {routes:?}");
    }
    let rule = packed.sparsity().rule.clone().unwrap();
    assert!(rule.scales.as_ref().is_some_and(|s| s.len() == 8) && rule.thresholds.len() == 8, "{rule:?}");
    assert_eq!(packed.predictors().map(<[_]>::len), Some(8));
    let (ppl, max) = packed.sparsity().quality.unwrap();
    assert!(ppl <= max + 1e-6, "{ppl} over the budget {max}");
    // Each unit's neurons are in hotness order, each frequency within its expert's routing frequency.
    for (u, pl) in packed.packed_layers().unwrap().iter().enumerate() {
        assert!(pl.frequency.windows(2).all(|w| w[0] >= w[1]), "unit {u}");
        assert!(pl.frequency.iter().all(|&f| f <= routes[u] + 1e-6), "unit {u}");
    }
    let mut ctx = Context::new(&packed, ContextParams::new(64, 2)).unwrap();
    let tokens: Vec<u32> = (1..20).collect();
    let want = ctx.eval(&tokens, pinion_runtime::Logits::All).unwrap().to_vec();
    // Half of the model's weights over the minimum (this test process alone is more than the tiny model).
    let device = pinion_runtime::planning::device_for(&cfg.out).unwrap();
    let params = || ContextParams::new(64, 2);
    let minimum =
        match Context::new_offloaded(&packed, params(), pinion_runtime::PlanOptions::new(1), &device) {
            Err(pinion_runtime::RuntimeError::Plan(pinion_plan::PlanError::BudgetTooSmall {
                minimum,
                ..
            })) => minimum,
            other => panic!("a budget of one byte: {:?}", other.err()),
        };
    let opts = pinion_runtime::PlanOptions::new(minimum + packed.weight_bytes() / 2);
    let mut off = Context::new_offloaded(&packed, params(), opts, &device).unwrap();
    assert!(off.plan().unwrap().memory.pinned_bundles < off.plan().unwrap().memory.ffn_total);
    let got = off.eval(&tokens, pinion_runtime::Logits::All).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "offloaded logits differ");
}

/// A device profile given with `device` (measured elsewhere) is copied into the directory, so that runs of the
/// directory plan with it as `plan.json` was planned.
#[test]
fn a_given_device_profile_is_kept_in_the_directory() {
    let (tmp, cfg) = setup("prepdir-device", false);
    let dir = PreparedDir::new(&cfg.out);
    std::fs::remove_file(dir.device()).unwrap();
    let elsewhere = tmp.0.join("device-elsewhere.json");
    let mut device = DeviceProfile::reference();
    device.cpu = "measured elsewhere".into();
    prepare::save_device(&device, &elsewhere).unwrap();
    let (r, _) = run(&PrepareConfig { device: Some(elsewhere), ..cfg.clone() });
    r.unwrap();
    assert_eq!(prepare::load_device(&dir.device()).unwrap(), device);
}

/// The profile keeps token samples only when something uses them: predictors, or thresholds of a SiLU or GELU
/// model at a sparsity above 0. A ReLU model without predictors, and a SiLU mixture of experts keeping every
/// neuron, are profiled without them (they are most of a large mixture of experts' profile) and prepared all
/// the same; with predictors the same ReLU model keeps them.
#[test]
fn token_samples_are_kept_only_when_used() {
    let (tmp, base) = setup("prepdir-samples", false);
    let samples = |cfg: &PrepareConfig| {
        let (r, _) = run(cfg);
        r.unwrap();
        let p = prepare::load_profile(&PreparedDir::new(&cfg.out).profile()).unwrap();
        assert!(p.n_tokens() > 0);
        p.n_token_samples()
    };
    let relu = PrepareConfig { keep_intermediates: true, ..base.clone() };
    assert_eq!(samples(&relu), 0, "ReLU without predictors");
    let (_tmp2, trained) = setup("prepdir-samples-trained", true);
    let trained = PrepareConfig { keep_intermediates: true, ..trained };
    assert!(samples(&trained) > 0, "ReLU with predictors");
    let moe = tiny_moe();
    let dense_experts = PrepareConfig {
        model: synth_model(&tmp, "moe-silu", &moe),
        sparsity: prepare::SparsityTarget::Fixed(0.0),
        keep_intermediates: true,
        force: true,
        ..base
    };
    assert_eq!(samples(&dense_experts), 0, "SiLU experts keeping every neuron");
    let packed = Model::load(&dense_experts.out).unwrap();
    let rule = packed.sparsity().rule.clone().unwrap();
    assert!(rule.thresholds.iter().all(|&t| t == 0.0), "{rule:?}");
    // Every neuron of an expert fires whenever the expert is routed: its frequency is the expert's routing
    // frequency (what the planner spends memory by).
    let routes = packed.route_frequency().unwrap();
    for (u, pl) in packed.packed_layers().unwrap().iter().enumerate() {
        let off = pl.frequency.iter().map(|&f| (f - routes[u]).abs()).fold(0.0f32, f32::max);
        assert!(
            routes[u] > 0.0 && off < 1e-3,
            "unit {u}: frequencies {:?} against {}",
            &pl.frequency[..4],
            routes[u]
        );
    }
    // Every neuron kept: the packed model computes what the GGUF computes densely.
    let gguf = Model::load(&dense_experts.model).unwrap();
    let tokens: Vec<u32> = (1..12).collect();
    let logits = |m: &Model| {
        let mut ctx = Context::new(m, ContextParams::new(32, 2)).unwrap();
        ctx.eval(&tokens, pinion_runtime::Logits::Last).unwrap().to_vec()
    };
    let (a, b) = (logits(&packed), logits(&gguf));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff < 0.05, "max logit difference {diff}");
}

/// A tiny SiLU mixture of experts: 2 layers of 4 experts, 2 used.
fn tiny_moe() -> SynthConfig {
    SynthConfig {
        n_layers: 2,
        n_experts: 4,
        n_experts_used: 2,
        act: synth::Activation::Silu,
        ..SynthConfig::preset("tiny").unwrap()
    }
}
