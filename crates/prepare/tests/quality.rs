//! The quality budget on the real SmolLM2 model: the sparsity `calibrate_for_quality` finds keeps the
//! held-out perplexity within the budget, and one hundredth more does not (measured again here, in fresh
//! contexts).

use std::path::PathBuf;

use pinion_prepare::{self as prepare, LayerScores, ProfileOptions, Rule};
use pinion_runtime::{Context, ContextParams, FfnRule, Model};

/// The real SmolLM2 model (`PINION_MODEL`, else `models/`), or `None` with a note when it is absent and not
/// required (`PINION_REQUIRE_MODEL`, which `cargo xtask test` sets).
fn smollm2() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = std::env::var_os("PINION_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.is_file() {
        return Some(p);
    }
    assert!(std::env::var_os("PINION_REQUIRE_MODEL").is_none(), "the model is missing at {}", p.display());
    eprintln!("note: {} is absent; skipping", p.display());
    None
}

#[test]
fn a_quality_budget_gives_the_highest_sparsity_within_it() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/calib.txt");
    let text = std::fs::read_to_string(root).expect("../shared/corpus/calib.txt");
    let (chunk, holdout) = (256, 512);
    let opts =
        ProfileOptions { max_tokens: 1024, chunk, token_samples: 256, holdout, ..ProfileOptions::default() };
    let profile = prepare::profile_activations(&model, &text, &opts, &mut |_, _| {}).unwrap();
    let heldout = prepare::heldout_tokens(&model, &text, holdout).unwrap();
    assert_eq!(heldout.len(), holdout);
    let budget = 0.03;
    let mut probes = 0;
    let th = prepare::calibrate_for_quality(
        &model,
        &profile,
        Rule::Weighted,
        &heldout,
        chunk,
        2,
        budget,
        &mut |_, _, _| probes += 1,
    )
    .unwrap();
    let q = th.quality.clone().unwrap();
    assert_eq!(probes, q.probes.len());
    assert!(q.sparsity > 0.05 && q.sparsity < prepare::MAX_SEARCHED_SPARSITY, "{q:?}");
    assert_eq!(th.target_sparsity, q.sparsity);
    assert!(th.scales.is_some());

    let bos = model.tokenizer().added_bos();
    let ppl = |rule: Option<FfnRule>| {
        let mut ctx = Context::new(&model, ContextParams::new(chunk, 2)).unwrap();
        ctx.set_ffn_rule(rule).unwrap();
        pinion_runtime::perplexity(&mut ctx, &heldout, bos, None, &mut |_, _| true).unwrap().ppl()
    };
    let base = ppl(None);
    assert_eq!(base, q.base_ppl);
    let at = ppl(Some(th.rule()));
    assert_eq!(at, q.ppl);
    assert!(at <= base * (1.0 + budget), "{at} against {base}");
    let scores = LayerScores::new(&profile, Rule::Weighted).unwrap();
    let over = ppl(Some(scores.rule(q.sparsity + 0.01)));
    assert!(
        over > base * (1.0 + budget),
        "sparsity {:.2} gives {over}, within the budget",
        q.sparsity + 0.01
    );
}
