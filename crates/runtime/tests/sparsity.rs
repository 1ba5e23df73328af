//! Threshold sparsity (CATS) in the forward pass, and activation profiling.

use pinion_runtime::{ActivationProfile, Context, ContextParams, FfnRule, Logits, Model, RuntimeError};

use crate::common::model_path;

#[test]
fn thresholds_select_neurons_and_profiles_record_activations() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    let c = model.config().clone();
    let toks = model.tokenizer().encode("The capital of France is", true, true);
    let mut ctx = Context::new(&model, ContextParams::new(64, 2)).unwrap();
    let dense = ctx.eval(&toks, Logits::Last).unwrap().to_vec();

    // Threshold 0 keeps every neuron: the same logits, bit for bit.
    let mut zero = Context::new(&model, ContextParams::new(64, 2)).unwrap();
    zero.set_ffn_rule(Some(FfnRule::cats(vec![0.0; c.n_layers]))).unwrap();
    assert_eq!(zero.eval(&toks, Logits::Last).unwrap(), &dense[..]);

    // A huge threshold removes every FFN: the logits change.
    let mut off = Context::new(&model, ContextParams::new(64, 2)).unwrap();
    off.set_ffn_rule(Some(FfnRule::cats(vec![1e9; c.n_layers]))).unwrap();
    let no_ffn = off.eval(&toks, Logits::Last).unwrap().to_vec();
    let diff = dense.iter().zip(&no_ffn).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff > 1.0, "removing the FFN changed logits by only {diff}");

    // A weighted rule compares |silu(g_i)| with t / c_i: under the huge threshold, scales of 1e30 keep every
    // neuron (the dense logits, bit for bit; silu(g) = 0 passes a threshold of 0 too), scales of 1 remove
    // every FFN as CATS does, and 1e30 on neuron 0 of each layer alone keeps that neuron only.
    let rule = |f: &dyn Fn(usize) -> f32| FfnRule {
        thresholds: vec![1e9; c.n_layers],
        scales: Some(vec![(0..c.n_ff).map(f).collect::<Vec<f32>>(); c.n_layers]),
    };
    let mut w = Context::new(&model, ContextParams::new(64, 2)).unwrap();
    w.set_ffn_rule(Some(rule(&|_| 1e30))).unwrap();
    assert_eq!(w.eval(&toks, Logits::Last).unwrap(), &dense[..]);
    w.truncate(0);
    w.set_ffn_rule(Some(rule(&|_| 1.0))).unwrap();
    assert_eq!(w.eval(&toks, Logits::Last).unwrap(), &no_ffn[..]);
    w.truncate(0);
    w.set_ffn_rule(Some(rule(&|i| if i == 0 { 1e30 } else { 1.0 }))).unwrap();
    let one = w.eval(&toks, Logits::Last).unwrap().to_vec();
    assert!(one != dense && one != no_ffn);
    // Scales must be positive and one per neuron.
    assert!(w.set_ffn_rule(Some(rule(&|i| if i == 3 { 0.0 } else { 1.0 }))).is_err());
    let short = FfnRule { scales: Some(vec![vec![1.0; c.n_ff - 1]; c.n_layers]), ..rule(&|_| 1.0) };
    assert!(matches!(w.set_ffn_rule(Some(short)), Err(RuntimeError::BadScales { .. })));

    // Wrong shapes are refused.
    let e = zero.set_ffn_rule(Some(FfnRule::cats(vec![0.0; c.n_layers - 1]))).unwrap_err();
    assert!(matches!(e, RuntimeError::BadThresholds { .. }), "{e}");
    assert!(zero.set_ffn_rule(Some(FfnRule::cats(vec![f32::NAN; c.n_layers]))).is_err());

    // A profile of the wrong shape is refused.
    let mut wrong = ActivationProfile::new(c.n_layers, c.n_ff + 1, 16);
    let e = off.eval_profile(&toks, &mut wrong).unwrap_err();
    assert!(matches!(e, RuntimeError::ProfileShape { .. }), "{e}");

    // Profiling records every layer of every token, and runs densely even with thresholds set.
    let mut profile = ActivationProfile::new(c.n_layers, c.n_ff, 4096);
    off.truncate(0);
    off.eval_profile(&toks, &mut profile).unwrap();
    assert_eq!(profile.n_tokens(), toks.len() as u64);
    // The thresholds are back in force afterwards.
    off.truncate(0);
    assert_eq!(off.eval(&toks, Logits::Last).unwrap(), &no_ffn[..]);
    for l in 0..c.n_layers {
        assert_eq!(profile.samples(l).len(), (toks.len() * c.n_ff).min(4096));
    }
    // Calibrated at 50%, about half of the sampled magnitudes fall below each layer's threshold.
    for (t, achieved) in profile.thresholds(0.5) {
        assert!(t > 0.0 && (achieved - 0.5).abs() < 0.01, "threshold {t} achieved {achieved}");
    }
}
