//! The offline preparation steps on synthetic models, whose planted activation frequencies are known.

use std::path::PathBuf;

use pinion_format::GgmlType;
use pinion_format::synth::{self, Activation, SynthConfig, pearson};
use pinion_predictor::train::TrainConfig;
use pinion_prepare::{self as prepare, PackStepOptions, ProfileOptions};
use pinion_runtime::{Context, ContextParams, FfnActivation, Logits, Model, PACKED_FILE_NAME, RuntimeError};

/// A temporary directory removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pinion-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a synthetic model to `dir/name.gguf`.
pub(crate) fn synth_model(dir: &TempDir, name: &str, cfg: &SynthConfig) -> PathBuf {
    let path = dir.0.join(format!("{name}.gguf"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    synth::write_model(cfg, &mut f, &mut |_, _| {}).unwrap();
    drop(f);
    path
}

#[test]
fn profiling_a_relu_model_finds_the_planted_frequencies() {
    let dir = TempDir::new("prep-profile");
    let cfg = SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() };
    let src = synth_model(&dir, "relu", &cfg);
    let model = Model::load(&src).unwrap();
    assert_eq!(model.config().ffn_act, FfnActivation::Relu);
    let opts =
        ProfileOptions { max_tokens: 1500, chunk: 256, token_samples: 300, ..ProfileOptions::default() };
    let mut calls = Vec::new();
    let profile = prepare::profile_activations(&model, &synth::sample_text(3000), &opts, &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    assert_eq!(profile.n_tokens(), 1500);
    assert_eq!(calls, [(1, 2), (2, 2)], "progress is reported per layer");
    assert_eq!(profile.n_token_samples(), 300);
    // Layer 0 fires as planted (the synthetic tokens are not uniform random embeddings, hence a loose bound).
    let planted = synth::target_frequencies(&cfg, 0, 0);
    let measured = profile.firing_frequency(0);
    let r = pearson(&planted, &measured);
    assert!(r > 0.9, "Pearson {r}");
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    assert!((mean - cfg.density).abs() < 0.05, "density {mean}");
    // The token samples agree with the full counts.
    let sampled = profile.sample_frequency(0, &[0.0], |s, t| s > t);
    assert!(pearson(&sampled, &measured) > 0.95);
    // ReLU: thresholds are 0 and the achieved sparsity is the measured one.
    let th = prepare::calibrate(&model, &profile, 0.5, prepare::Rule::default()).unwrap();
    for &(t, achieved) in &th.layers {
        assert_eq!(t, 0.0);
        assert!((achieved - (1.0 - cfg.density)).abs() < 0.06, "sparsity {achieved}");
    }
    // The profile file round-trips.
    let file = dir.0.join("profile.bin");
    prepare::save_profile(&profile, &file).unwrap();
    let back = prepare::load_profile(&file).unwrap();
    assert_eq!(back.sample_scores(1), profile.sample_scores(1));
    assert_eq!(back.firing_frequency(1), profile.firing_frequency(1));
    std::fs::write(&file, b"PINIONPF garbage").unwrap();
    assert!(matches!(prepare::load_profile(&file), Err(pinion_prepare::PrepareError::BadProfileFile { .. })));
}

#[test]
fn drelu_scores_need_both_gate_and_up() {
    let dir = TempDir::new("prep-drelu");
    let cfg = SynthConfig { n_layers: 1, act: Activation::Drelu, ..SynthConfig::preset("tiny").unwrap() };
    let model = Model::load(&synth_model(&dir, "drelu", &cfg)).unwrap();
    assert_eq!(model.config().ffn_act, FfnActivation::Drelu);
    let opts = ProfileOptions { max_tokens: 1000, chunk: 250, token_samples: 0, ..ProfileOptions::default() };
    let profile =
        prepare::profile_activations(&model, &synth::sample_text(2000), &opts, &mut |_, _| {}).unwrap();
    let measured = profile.firing_frequency(0);
    let planted = synth::target_frequencies(&cfg, 0, 0);
    let r = pearson(&planted, &measured);
    assert!(r > 0.85, "Pearson {r}");
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    assert!(mean < cfg.density * 1.6 && mean > cfg.density * 0.5, "density {mean}");
}

#[test]
fn a_short_calibration_text_is_an_error() {
    let dir = TempDir::new("prep-short");
    let cfg = SynthConfig { n_layers: 1, ..SynthConfig::preset("tiny").unwrap() };
    let model = Model::load(&synth_model(&dir, "m", &cfg)).unwrap();
    let e = prepare::profile_activations(&model, "alpha", &ProfileOptions::default(), &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(e, pinion_prepare::PrepareError::CalibrationTooShort { .. }), "{e}");
}

#[test]
fn a_packed_relu_model_computes_what_the_gguf_computes() {
    let dir = TempDir::new("prep-pack");
    let cfg = SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() };
    let src = synth_model(&dir, "relu", &cfg);
    let model = Model::load(&src).unwrap();
    let opts =
        ProfileOptions { max_tokens: 1024, chunk: 256, token_samples: 64, ..ProfileOptions::default() };
    let profile =
        prepare::profile_activations(&model, &synth::sample_text(2000), &opts, &mut |_, _| {}).unwrap();
    let th = prepare::calibrate(&model, &profile, 0.5, prepare::Rule::default()).unwrap();
    let freq = prepare::activation_frequencies(&model, &profile, &th).unwrap();
    let out = dir.0.join("prepared");
    std::fs::create_dir_all(&out).unwrap();
    let popts =
        PackStepOptions { cluster_neurons: 16, down_type: GgmlType::F32, ..PackStepOptions::default() };
    let mut layers_done = Vec::new();
    prepare::pack_model(&src, &out.join(PACKED_FILE_NAME), &freq, &th, None, &popts, &mut |l, n| {
        layers_done.push((l, n))
    })
    .unwrap();
    assert_eq!(layers_done, vec![(1, 2), (2, 2)]);
    assert!(!out.join(format!("{PACKED_FILE_NAME}.partial")).exists());

    // Loaded from the directory: hot neurons first, thresholds carried.
    let packed = Model::load(&out).unwrap();
    assert!(packed.is_packed());
    assert_eq!(packed.sparsity().rule.as_ref().map(|r| &r.thresholds[..]), Some(&[0.0, 0.0][..]));
    let tokens = packed.tokenizer().encode("some text to run through both models", true, false);
    let mut a = Context::new(&model, ContextParams::new(128, 2)).unwrap();
    let mut b = Context::new(&packed, ContextParams::new(128, 2)).unwrap();
    // Prefill (batched) and decode (one token) both agree with the dense GGUF. The dense path quantizes the
    // hidden activations to Q8_0 for the down matmul; the packed path uses f32 columns: close, not equal.
    let la = a.eval(&tokens, Logits::All).unwrap().to_vec();
    let lb = b.eval(&tokens, Logits::All).unwrap().to_vec();
    let scale = la.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = la.iter().zip(&lb).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 0.01 * scale, "max diff {diff} for logits up to {scale}");
    let da = a.eval(&[5], Logits::Last).unwrap().to_vec();
    let db = b.eval(&[5], Logits::Last).unwrap().to_vec();
    let diff = da.iter().zip(&db).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 0.01 * scale, "decode: max diff {diff}");
    // A packed model is not profiled again.
    let mut p = pinion_runtime::ActivationProfile::new(2, cfg.n_ff, 16);
    assert!(matches!(b.eval_profile(&tokens, &mut p), Err(RuntimeError::ProfilePacked)));
}

#[test]
fn predictors_trained_on_a_synthetic_relu_model_reach_the_recall_goal() {
    let dir = TempDir::new("prep-train");
    let cfg = SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() };
    let src = synth_model(&dir, "relu", &cfg);
    let model = Model::load(&src).unwrap();
    let opts =
        ProfileOptions { max_tokens: 3000, chunk: 500, token_samples: 2500, ..ProfileOptions::default() };
    let profile =
        prepare::profile_activations(&model, &synth::sample_text(6000), &opts, &mut |_, _| {}).unwrap();
    let th = prepare::calibrate(&model, &profile, 0.5, prepare::Rule::default()).unwrap();
    let train =
        TrainConfig { target_recall: 0.99, ranks: vec![32, 64], threads: 2, ..TrainConfig::default() };
    let mut seen = 0;
    let trained = prepare::train_predictors(&model, &profile, &th, &train, &mut |l, n, _| {
        seen += 1;
        assert_eq!((l, n), (seen, 2));
    })
    .unwrap();
    // The acceptance goal: recall >= 0.99 on held-out tokens at a predicted density at most 1.5x the true one.
    for (l, (_, r)) in trained.iter().enumerate() {
        assert!(r.recall >= 0.99, "layer {l}: recall {}", r.recall);
        assert!(
            r.predicted_density <= 1.5 * r.true_density,
            "layer {l}: {} vs {}",
            r.predicted_density,
            r.true_density
        );
        assert!((r.true_density - cfg.density).abs() < 0.05, "layer {l}: true density {}", r.true_density);
    }

    // The predictors file round-trips, and a packed model carries them in position order.
    let ps: Vec<_> = trained.into_iter().map(|(p, _)| p).collect();
    let file = dir.0.join("predictors.gguf");
    prepare::save_predictors(&ps, &file).unwrap();
    assert_eq!(prepare::load_predictors(&file).unwrap(), ps);
    let freq = prepare::activation_frequencies(&model, &profile, &th).unwrap();
    let packed_path = dir.0.join("m.pinion");
    prepare::pack_model(
        &src,
        &packed_path,
        &freq,
        &th,
        Some(&ps),
        &PackStepOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let packed = Model::load(&packed_path).unwrap();
    let pp = packed.predictors().unwrap().to_vec();
    assert!(packed.sparsity().has_predictors);
    let order = &packed.packed_layers().unwrap()[0].order;
    let x: Vec<f32> = (0..cfg.d_model).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
    let (mut h, mut a, mut b) = (vec![0.0; ps[0].rank()], vec![0.0; cfg.n_ff], vec![0.0; cfg.n_ff]);
    ps[0].logits(&x, &mut h, &mut a);
    pp[0].logits(&x, &mut h, &mut b);
    for (pos, &n) in order.iter().enumerate() {
        assert_eq!(b[pos], a[n as usize], "position {pos} holds neuron {n}");
    }

    // Predictors are on by default for a ReLU model; one that predicts every neuron changes nothing, one that
    // predicts none removes the FFN.
    let tokens = packed.tokenizer().encode("the predictors choose the neurons", true, false);
    let run = |ps: Option<Vec<pinion_predictor::LowRankPredictor>>| {
        let mut ctx = Context::new(&packed, ContextParams::new(64, 2)).unwrap();
        assert!(ctx.uses_predictors());
        ctx.set_predictors(ps).unwrap();
        ctx.eval(&tokens, Logits::Last).unwrap().to_vec()
    };
    let with_threshold = |t: f32| {
        pp.iter()
            .cloned()
            .map(|mut p| {
                p.set_threshold(t);
                p
            })
            .collect::<Vec<_>>()
    };
    let free = run(None);
    assert_eq!(run(Some(with_threshold(f32::NEG_INFINITY))), free);
    let predicted = run(Some(pp.clone()));
    let none = run(Some(with_threshold(f32::INFINITY)));
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    // The predictors drop a few active neurons (recall 0.99): a small change, several times smaller than
    // dropping them all.
    let (d_pred, d_none) = (dist(&predicted, &free), dist(&none, &free));
    assert!(d_pred > 0.0 && d_none > 3.0 * d_pred, "predicted {d_pred} vs none {d_none}");
    // Wrong shapes are refused.
    let mut ctx = Context::new(&packed, ContextParams::new(64, 2)).unwrap();
    assert!(matches!(ctx.set_predictors(Some(pp[..1].to_vec())), Err(RuntimeError::BadPredictors { .. })));
}
