//! The offline preparation steps on synthetic models, whose planted activation frequencies are known.

use std::path::PathBuf;

use pinion_format::GgmlType;
use pinion_format::synth::{self, Activation, SynthConfig};
use pinion_runtime::prepare::{self, PackStepOptions, ProfileOptions};
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

/// Pseudo-random text, so its tokens spread over the synthetic vocabulary (byte tokens and merges).
pub(crate) fn calib_text(n: usize) -> String {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn profiling_a_relu_model_finds_the_planted_frequencies() {
    let dir = TempDir::new("prep-profile");
    let cfg = SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() };
    let model = Model::load(&synth_model(&dir, "relu", &cfg)).unwrap();
    assert_eq!(model.config().ffn_act, FfnActivation::Relu);
    let opts =
        ProfileOptions { max_tokens: 1500, chunk: 256, token_samples: 300, ..ProfileOptions::default() };
    let mut calls = Vec::new();
    let profile =
        prepare::profile_activations(&model, &calib_text(3000), &opts, &mut |d, t| calls.push((d, t)))
            .unwrap();
    assert_eq!(profile.n_tokens(), 1500);
    assert_eq!(calls.last(), Some(&(1500, 1500)));
    assert_eq!(calls.len(), 1500usize.div_ceil(256));
    assert_eq!(profile.n_token_samples(), 300);
    // Layer 0 fires as planted (the synthetic tokens are not uniform random embeddings, hence a loose bound).
    let planted = synth::target_frequencies(&cfg, 0, 0);
    let measured = profile.firing_frequency(0);
    let r = pearson(&planted, &measured);
    assert!(r > 0.9, "Pearson {r}");
    let mean = measured.iter().sum::<f64>() / measured.len() as f64;
    assert!((mean - cfg.density).abs() < 0.05, "density {mean}");
    // The token samples agree with the full counts.
    let sampled = profile.sample_frequency(0, 0.0, |s, t| s > t);
    assert!(pearson(&sampled, &measured) > 0.95);
    // ReLU: thresholds are 0 and the achieved sparsity is the measured one.
    let th = prepare::calibrate(&model, &profile, 0.5).unwrap();
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
    assert!(matches!(prepare::load_profile(&file), Err(RuntimeError::BadProfileFile { .. })));
}

#[test]
fn drelu_scores_need_both_gate_and_up() {
    let dir = TempDir::new("prep-drelu");
    let cfg = SynthConfig { n_layers: 1, act: Activation::Drelu, ..SynthConfig::preset("tiny").unwrap() };
    let model = Model::load(&synth_model(&dir, "drelu", &cfg)).unwrap();
    assert_eq!(model.config().ffn_act, FfnActivation::Drelu);
    let opts = ProfileOptions { max_tokens: 1000, chunk: 250, token_samples: 0, ..ProfileOptions::default() };
    let profile = prepare::profile_activations(&model, &calib_text(2000), &opts, &mut |_, _| {}).unwrap();
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
    assert!(matches!(e, RuntimeError::CalibrationTooShort { .. }), "{e}");
}

#[test]
fn a_packed_relu_model_computes_what_the_gguf_computes() {
    let dir = TempDir::new("prep-pack");
    let cfg = SynthConfig { n_layers: 2, ..SynthConfig::preset("tiny").unwrap() };
    let src = synth_model(&dir, "relu", &cfg);
    let model = Model::load(&src).unwrap();
    let opts =
        ProfileOptions { max_tokens: 1024, chunk: 256, token_samples: 64, ..ProfileOptions::default() };
    let profile = prepare::profile_activations(&model, &calib_text(2000), &opts, &mut |_, _| {}).unwrap();
    let th = prepare::calibrate(&model, &profile, 0.5).unwrap();
    let freq = prepare::activation_frequencies(&model, &profile, &th).unwrap();
    let out = dir.0.join("prepared");
    std::fs::create_dir_all(&out).unwrap();
    let popts = PackStepOptions { cluster_neurons: 16, down_type: GgmlType::F32 };
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
    assert_eq!(packed.sparsity().thresholds.as_deref(), Some(&[0.0, 0.0][..]));
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
