//! Architecture features on synthetic models: each architecture's block against llama.cpp, Gemma 3's sliding
//! window applied where the file says, and what pinion does not implement (RoPE scaling types, logit
//! soft-capping, unknown tensors) refused by name.

use pinion_format::synth::{self, Activation, SynthArch, SynthConfig};
use pinion_format::{Gguf, GgufWriter};
use pinion_runtime::{Context, ContextParams, Logits, Model, RuntimeError};

use crate::errors::{load_err, temp_file};

fn gemma3(window: u32) -> SynthConfig {
    SynthConfig {
        n_layers: 2,
        arch: SynthArch::Gemma3 { sliding_window: window, swa_pattern: 6 },
        act: Activation::Gelu,
        ..SynthConfig::preset("tiny").unwrap()
    }
}

fn synth_bytes(cfg: &SynthConfig) -> Vec<u8> {
    let mut out = Vec::new();
    synth::write_model(cfg, &mut out, &mut |_, _| {}).unwrap();
    out
}

/// Rewrites a GGUF with `extra` metadata and an extra F32 tensor `[n]` named `tensor`, if given.
fn with_extras(src: &[u8], extra: &[(&str, pinion_format::Value)], tensor: Option<(&str, usize)>) -> Vec<u8> {
    let g = Gguf::parse(src).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in &g.metadata {
        w.add_metadata(key.as_str(), value.clone()).unwrap();
    }
    for (key, value) in extra {
        w.add_metadata(*key, value.clone()).unwrap();
    }
    for t in &g.tensors {
        w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t).unwrap()).unwrap();
    }
    if let Some((name, n)) = tensor {
        w.add_tensor_data(name, pinion_format::GgmlType::F32, &[n as u64], vec![0u8; 4 * n]).unwrap();
    }
    w.to_bytes().unwrap()
}

fn all_logits(path: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let model = Model::load(path).unwrap();
    let mut ctx = Context::new(&model, ContextParams::new(64, 2)).unwrap();
    ctx.eval(tokens, Logits::All).unwrap().to_vec()
}

/// Two Gemma 3 models alike but for the window (7 positions, or more than the context): the logits of the
/// first 7 positions are the same bits (nothing is behind the window yet), and later ones differ.
#[test]
fn a_sliding_window_masks_keys_behind_it() {
    let tokens: Vec<u32> = (0..20).map(|i| 300 + 7 * i).collect();
    let narrow = all_logits(&temp_file("gemma3-w7.gguf", &synth_bytes(&gemma3(7))), &tokens);
    let wide = all_logits(&temp_file("gemma3-w4096.gguf", &synth_bytes(&gemma3(4096))), &tokens);
    let n_vocab = narrow.len() / tokens.len();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&narrow[..7 * n_vocab]), bits(&wide[..7 * n_vocab]));
    let row = |x: &[f32], t: usize| x[t * n_vocab..(t + 1) * n_vocab].to_vec();
    assert_ne!(bits(&row(&narrow, 19)), bits(&row(&wide, 19)), "the window changed nothing");
}

fn expect_unsupported(bytes: &[u8], name: &str, needle: &str) {
    let e = load_err(&temp_file(name, bytes));
    assert!(matches!(e, RuntimeError::Unsupported { .. }), "{name}: {e}");
    assert!(e.to_string().contains(needle), "{name}: {e}");
}

#[test]
fn unimplemented_features_are_refused_by_name() {
    let llama = synth_bytes(&SynthConfig { n_layers: 1, ..SynthConfig::preset("tiny").unwrap() });
    // Frequency factors of zero (the extra tensor's data) are refused.
    let zeros = with_extras(&llama, &[], Some(("rope_freqs.weight", 32)));
    let e = load_err(&temp_file("rope-freqs-zero.gguf", &zeros));
    assert!(matches!(&e, RuntimeError::BadTensor { name, .. } if name == "rope_freqs.weight"), "{e}");
    // On an architecture without them, the tensor is refused by name.
    let qwen3 = synth_bytes(&SynthConfig {
        n_layers: 1,
        arch: SynthArch::Qwen3,
        ..SynthConfig::preset("tiny").unwrap()
    });
    expect_unsupported(
        &with_extras(&qwen3, &[], Some(("rope_freqs.weight", 32))),
        "qwen3-rope-freqs.gguf",
        "rope_freqs",
    );
    expect_unsupported(
        &with_extras(&llama, &[("llama.rope.scaling.type", "yarn".into())], None),
        "yarn.gguf",
        "yarn",
    );
    expect_unsupported(
        &with_extras(&llama, &[], Some(("blk.0.attn_q_norm.weight", 64))),
        "qnorm-on-llama.gguf",
        "blk.0.attn_q_norm.weight",
    );
    let gemma = synth_bytes(&gemma3(7));
    expect_unsupported(
        &with_extras(&gemma, &[("gemma3.final_logit_softcapping", 30.0f32.into())], None),
        "softcap.gguf",
        "final_logit_softcapping",
    );
    // A linear RoPE scaling of factor 1 changes nothing, and loads.
    let linear1 = with_extras(
        &llama,
        &[("llama.rope.scaling.type", "linear".into()), ("llama.rope.scaling.factor", 1.0f32.into())],
        None,
    );
    Model::load(&temp_file("linear1.gguf", &linear1)).unwrap();
}

/// Each architecture's block as llama.cpp computes it, on synthetic models (random Q4_0 weights, the tiny
/// shape, the activation llama.cpp runs each with: SiLU, GELU for gemma3, whose window of 8 positions is shorter
/// than the 48-token prompt; llama3 is llama with Llama 3.1's RoPE frequency factors): greedy ids and step-0
/// logits against llama.cpp's on the same files (tests/data/synth, made by run.sh there). llama.cpp runs Q4_0
/// products on weights repacked for its 8x8 kernels (another summation order): our top-10 logits are within
/// 0.002-0.005 of its. A wrong block moves them by more: GELU run as SiLU by 0.06, Llama 3's frequency factors
/// left out (on the 366-token llama3 prompt) by 0.0085.
#[test]
fn synthetic_architectures_match_llama_cpp() {
    use crate::reference::{Tolerance, greedy_matches};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/synth");
    let tol = Tolerance { logit: 0.005, top_ranks: 3, noise_gap: 0.02 };
    for (name, arch, rope_factors) in [
        ("llama", SynthArch::Llama, false),
        ("llama3", SynthArch::Llama, true),
        ("qwen2", SynthArch::Qwen2, false),
        ("qwen3", SynthArch::Qwen3, false),
        ("gemma3", SynthArch::Gemma3 { sliding_window: 8, swa_pattern: 6 }, false),
    ] {
        let act = if name == "gemma3" { Activation::Gelu } else { Activation::Silu };
        let cfg = SynthConfig { arch, act, rope_factors, ..SynthConfig::preset("tiny").unwrap() };
        let path = temp_file(&format!("synth-{name}.gguf"), &synth_bytes(&cfg));
        greedy_matches(Some(path), &dir.join(format!("{name}.tsv")), &tol);
    }
}

/// A Gemma file without a chat template (as Gemma 3 270M's) is rendered in Gemma's turn format, as Google's
/// template renders it (the system message opens the first user turn, the assistant is `model`; the BOS token is
/// the tokenizer's); a llama file without one gets ChatML.
#[test]
fn files_without_a_template_get_their_architectures_turn_format() {
    use pinion_runtime::ChatMessage;
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Bye"),
    ];
    let gemma = Model::load(&temp_file("gemma3-chat.gguf", &synth_bytes(&gemma3(7)))).unwrap();
    assert_eq!(
        gemma.apply_chat_template(&msgs, true).unwrap(),
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    let llama = synth_bytes(&SynthConfig { n_layers: 1, ..SynthConfig::preset("tiny").unwrap() });
    let llama = Model::load(&temp_file("llama-chat.gguf", &llama)).unwrap();
    assert!(
        llama.apply_chat_template(&msgs[1..2], true).unwrap().starts_with("<|im_start|>user\nHi<|im_end|>")
    );
}

/// What the mixture-of-experts FFN does not implement is refused by name: shared experts, expert groups,
/// leading dense layers, a gating function other than softmax, weights scaled or not renormalized, experts on
/// an architecture without them, a shared expert's tensor; other MoE architectures are unknown ones. The
/// neutral values of those keys load.
#[test]
fn unimplemented_moe_features_are_refused_by_name() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf-py");
    let mixtral = std::fs::read(dir.join("mixtral.gguf")).unwrap();
    let qwen3moe = std::fs::read(dir.join("qwen3moe.gguf")).unwrap();
    let refused: [(&[u8], &str, pinion_format::Value); 7] = [
        (&mixtral, "llama.expert_shared_count", 1u32.into()),
        (&mixtral, "llama.expert_group_count", 2u32.into()),
        (&mixtral, "llama.leading_dense_block_count", 1u32.into()),
        (&qwen3moe, "qwen3moe.expert_gating_func", 2u32.into()),
        (&qwen3moe, "qwen3moe.expert_weights_scale", 2.5f32.into()),
        (&qwen3moe, "qwen3moe.expert_weights_norm", false.into()),
        (&qwen3moe, "qwen3moe.expert_shared_feed_forward_length", 64u32.into()),
    ];
    for (i, (src, key, value)) in refused.into_iter().enumerate() {
        let name = key.split_once('.').unwrap().1;
        expect_unsupported(&with_extras(src, &[(key, value)], None), &format!("moe-{i}.gguf"), name);
    }
    expect_unsupported(
        &with_extras(&mixtral, &[], Some(("blk.0.ffn_gate_shexp.weight", 64))),
        "moe-shexp.gguf",
        "blk.0.ffn_gate_shexp.weight",
    );
    // Experts on an architecture that has none in pinion.
    let qwen3 = synth_bytes(&SynthConfig {
        n_layers: 1,
        arch: SynthArch::Qwen3,
        ..SynthConfig::preset("tiny").unwrap()
    });
    let e = load_err(&temp_file(
        "qwen3-experts.gguf",
        &with_extras(&qwen3, &[("qwen3.expert_count", 4u32.into())], None),
    ));
    assert!(matches!(&e, RuntimeError::UnsupportedArchitecture { arch } if arch.contains("experts")), "{e}");
    // Another MoE architecture (shared experts) is an unknown one, named.
    let g = Gguf::parse(&qwen3moe).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in &g.metadata {
        let key = key.replace("qwen3moe.", "qwen2moe.");
        let value = if key == "general.architecture" { "qwen2moe".into() } else { value.clone() };
        w.add_metadata(key.as_str(), value).unwrap();
    }
    for t in &g.tensors {
        w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t).unwrap()).unwrap();
    }
    let e = load_err(&temp_file("qwen2moe.gguf", &w.to_bytes().unwrap()));
    assert!(matches!(&e, RuntimeError::UnsupportedArchitecture { arch } if arch == "qwen2moe"), "{e}");
    // Neutral values load.
    let neutral = with_extras(
        &qwen3moe,
        &[
            ("qwen3moe.expert_gating_func", 1u32.into()),
            ("qwen3moe.expert_weights_norm", true.into()),
            ("qwen3moe.expert_shared_count", 0u32.into()),
            ("qwen3moe.expert_group_count", 1u32.into()),
        ],
        None,
    );
    let model = Model::load(&temp_file("moe-neutral.gguf", &neutral)).unwrap();
    let moe = model.config().moe.unwrap();
    assert_eq!((moe.n_expert, moe.n_expert_used, model.config().n_ff), (8, 3, 64));
}

/// A mixture of experts keeps its sparsity rule and its profile per FFN unit (one per expert of each layer): a
/// rule of one threshold per layer is refused, one per expert runs; a profile records each expert's routed
/// tokens (in all, `n_expert_used` per token and layer) and keeps each expert's own token samples. A GGUF is
/// not offloaded.
#[test]
fn moe_rules_and_profiles_are_per_expert() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf-py/mixtral.gguf");
    let model = Model::load(&path).unwrap();
    let c = model.config();
    let (n_exp, k) = (c.moe.unwrap().n_expert, c.moe.unwrap().n_expert_used);
    assert_eq!(c.n_units(), c.n_layers * n_exp);
    let params = ContextParams::new(64, 2);
    let mut ctx = Context::new(&model, params.clone()).unwrap();
    let per_layer = pinion_runtime::FfnRule { thresholds: vec![0.1; c.n_layers], scales: None };
    let e = ctx.set_ffn_rule(Some(per_layer)).unwrap_err();
    assert!(matches!(e, RuntimeError::BadThresholds { .. }), "{e}");
    let dense = ctx.eval(&[1, 2, 3], Logits::Last).unwrap().to_vec();
    ctx.truncate(0);
    let per_unit = pinion_runtime::FfnRule { thresholds: vec![0.05; c.n_units()], scales: None };
    ctx.set_ffn_rule(Some(per_unit)).unwrap();
    let sparse = ctx.eval(&[1, 2, 3], Logits::Last).unwrap().to_vec();
    assert_ne!(dense, sparse, "the thresholds are applied to the experts");
    let mut per_layer = pinion_runtime::ActivationProfile::new(c.n_layers, c.n_ff, 16);
    let e = ctx.eval_profile(&[1, 2, 3], &mut per_layer).unwrap_err();
    assert!(matches!(e, RuntimeError::ProfileShape { .. }), "{e}");
    let mut profile =
        pinion_runtime::ActivationProfile::new(c.n_units(), c.n_ff, 16).with_token_samples(c.d_model, 2);
    ctx.truncate(0);
    ctx.eval_profile(&[1, 2, 3, 4, 5], &mut profile).unwrap();
    assert_eq!(profile.n_tokens(), 5);
    for l in 0..c.n_layers {
        let routed: u64 = (0..n_exp).map(|e| profile.layer_tokens(c.unit(l, e))).sum();
        assert_eq!(routed, 5 * k as u64, "layer {l}");
        for e in 0..n_exp {
            // Each expert's own sample of the tokens routed to it, up to the cap.
            let u = c.unit(l, e);
            assert_eq!(profile.layer_token_samples(u), (profile.layer_tokens(u) as usize).min(2), "unit {u}");
        }
    }
    let opts = pinion_runtime::PlanOptions::new(1 << 30);
    let device = pinion_runtime::DeviceProfile::reference();
    let e = Context::new_offloaded(&model, params, opts, &device).unwrap_err();
    assert!(matches!(e, RuntimeError::NotPacked), "{e}");
}

/// Profiling layer by layer (every piece through block 0, then through block 1, ...: how a model larger than
/// memory is profiled) records exactly what profiling each piece through the whole model from an empty cache
/// records: the same scores, firing counts, token samples and routed tokens, for a dense model and for both
/// mixtures of experts; and each block is announced once, in order.
#[test]
fn profiling_layer_by_layer_records_what_piece_by_piece_does() {
    for name in ["qwen3.gguf", "mixtral.gguf", "qwen3moe.gguf"] {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf-py").join(name);
        let model = Model::load(&path).unwrap();
        let c = model.config();
        let profile = || {
            pinion_runtime::ActivationProfile::new(c.n_units(), c.n_ff, 64).with_token_samples(c.d_model, 6)
        };
        // Pieces longer than a batch (several passes), of one token, and of a few.
        let n_vocab = c.n_vocab as u32;
        let tokens: Vec<u32> = (0..40u32).map(|i| (i * 7919 + 13) % n_vocab).collect();
        let pieces: Vec<&[u32]> = vec![&tokens[..23], &tokens[23..24], &tokens[24..40]];
        let params = ContextParams { n_ubatch: 8, ..ContextParams::new(32, 2) };
        let mut ctx = Context::new(&model, params).unwrap();
        let mut by_piece = profile();
        for piece in &pieces {
            ctx.truncate(0);
            ctx.eval_profile(piece, &mut by_piece).unwrap();
        }
        let mut by_layer = profile();
        let mut done = Vec::new();
        ctx.eval_profile_by_layer(&pieces, &mut by_layer, &mut |l| done.push(l)).unwrap();
        assert_eq!(done, (0..c.n_layers).collect::<Vec<_>>(), "{name}");
        assert_eq!(by_layer.n_tokens(), 40, "{name}");
        assert!(by_layer.n_token_samples() > 0, "{name}");
        assert!(by_layer == by_piece, "{name}: the profiles differ");
        // A piece the context cannot hold is refused before anything is recorded.
        let mut p = profile();
        let long = vec![1u32; 33];
        let e = ctx.eval_profile_by_layer(&[&long], &mut p, &mut |_| {}).unwrap_err();
        assert!(matches!(e, RuntimeError::ContextOverflow { .. }), "{e}");
        assert!(p == profile(), "{name}: nothing recorded");
    }
}
