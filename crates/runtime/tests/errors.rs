//! Every failure path of loading and generation gives a typed error, never a panic.

use std::path::{Path, PathBuf};

use pinion_format::FormatError;
use pinion_runtime::{
    Context, ContextParams, GenerateParams, Logits, Model, RuntimeError, SamplerParams, generate,
};

use crate::common::model_path;

pub(crate) fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pinion-runtime-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub(crate) fn load_err(p: &Path) -> RuntimeError {
    match Model::load(p) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_file_is_model_not_found() {
    let e = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(matches!(e, RuntimeError::ModelNotFound { .. }), "{e}");
}

#[test]
fn wrong_magic_is_a_format_error() {
    let p = temp_file("magic.gguf", b"NOPE\x03\x00\x00\x00 and more bytes here");
    let e = load_err(&p);
    assert!(matches!(e, RuntimeError::Format { source: FormatError::BadMagic { .. }, .. }), "{e}");
    assert!(e.to_string().contains("magic.gguf"), "error names the file: {e}");
}

#[test]
fn truncated_real_model_is_an_error_at_every_cut() {
    let Some(path) = model_path() else { return };
    let bytes = std::fs::read(&path).unwrap();
    // Cuts in the header, the metadata, the tensor directory, and the tensor data.
    for cut in [0, 3, 8, 23, 100, 1000, 300_000, 700_000, bytes.len() / 2, bytes.len() - 1] {
        let p = temp_file("truncated.gguf", &bytes[..cut]);
        let e = load_err(&p);
        assert!(
            matches!(
                e,
                RuntimeError::Format {
                    source: FormatError::Truncated { .. } | FormatError::TensorOutOfBounds { .. },
                    ..
                }
            ),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn context_overflow_is_reported_before_any_work() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    let mut ctx = Context::new(&model, ContextParams::new(16, 1)).unwrap();
    let prompt: Vec<u32> = (100..110).collect();
    let params =
        GenerateParams { n_predict: 10, ignore_eos: true, stop: vec![], sampler: SamplerParams::greedy() };
    let e = generate(&mut ctx, &prompt, &params, &mut |_| true).unwrap_err();
    assert!(matches!(e, RuntimeError::ContextOverflow { prompt: 10, generate: 10, n_ctx: 16 }), "{e}");
    assert_eq!(ctx.n_past(), 0, "nothing was evaluated");
    // A prompt alone longer than the context is refused by eval too.
    let long: Vec<u32> = (0..17).collect();
    assert!(matches!(ctx.eval(&long, Logits::Last), Err(RuntimeError::ContextOverflow { .. })));
    // Out-of-vocabulary ids are refused, not indexed.
    let e = ctx.eval(&[u32::MAX], Logits::Last).unwrap_err();
    assert!(matches!(e, RuntimeError::BadToken { .. }), "{e}");
    assert!(matches!(ctx.eval(&[], Logits::Last), Err(RuntimeError::EmptyPrompt)));
}

#[test]
fn bad_context_sizes_are_refused() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    assert!(matches!(
        Context::new(&model, ContextParams::new(0, 1)),
        Err(RuntimeError::BadContextSize { .. })
    ));
    assert!(matches!(
        Context::new(&model, ContextParams::new(1 << 30, 1)),
        Err(RuntimeError::BadContextSize { .. })
    ));
    assert!(matches!(Context::new(&model, ContextParams::new(64, 0)), Err(RuntimeError::Threads { .. })));
}

#[test]
fn generation_stops_on_eog_and_stop_strings() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    let tok = model.tokenizer();
    // SmolLM2's template adds its default system prompt; greedy, the model answers in a few words and ends.
    let chat =
        tok.apply_chat_template(&[pinion_runtime::ChatMessage::new("user", "Say hello.")], true).unwrap();
    assert!(
        chat.starts_with("<|im_start|>system\n") && chat.ends_with("<|im_start|>assistant\n"),
        "{chat:?}"
    );
    let prompt = tok.encode(&chat, true, true);
    let mut ctx = Context::new(&model, ContextParams::new(512, 2)).unwrap();
    let params =
        GenerateParams { n_predict: 200, ignore_eos: false, stop: vec![], sampler: SamplerParams::greedy() };
    let mut streamed = String::new();
    let g = generate(&mut ctx, &prompt, &params, &mut |t| {
        streamed.push_str(t);
        true
    })
    .unwrap();
    assert_eq!(g.stop_reason, pinion_runtime::StopReason::EndOfGeneration, "reply: {:?}", g.text);
    assert!(tok.is_eog(*g.tokens.last().unwrap()));
    assert_eq!(streamed, g.text, "streamed text equals the final text");
    assert!(!g.text.is_empty());

    // A stop string taken from the reply cuts it there, and is never streamed.
    let word = g.text.split_whitespace().nth(1).expect("reply has two words").to_string();
    let mut ctx = Context::new(&model, ContextParams::new(512, 2)).unwrap();
    let params = GenerateParams { stop: vec![word.clone()], ..params };
    let mut streamed = String::new();
    let g2 = generate(&mut ctx, &prompt, &params, &mut |t| {
        streamed.push_str(t);
        true
    })
    .unwrap();
    assert_eq!(g2.stop_reason, pinion_runtime::StopReason::StopString(word.clone()));
    assert!(!g2.text.contains(&word) && g.text.starts_with(&g2.text), "{:?} vs {:?}", g2.text, g.text);
    assert_eq!(streamed, g2.text);

    // ignore_eos generates exactly n_predict tokens.
    let mut ctx = Context::new(&model, ContextParams::new(512, 2)).unwrap();
    let params =
        GenerateParams { n_predict: 40, ignore_eos: true, stop: vec![], sampler: SamplerParams::greedy() };
    let g3 = generate(&mut ctx, &prompt, &params, &mut |_| true).unwrap();
    assert_eq!(g3.tokens.len(), 40);
    assert_eq!(g3.stop_reason, pinion_runtime::StopReason::Length);
}

/// A GGUF whose attention query weights are Q8_K (a type ggml uses for activations only, with no matrix
/// kernel in pinion) is refused when it loads, naming the tensor and the type, instead of panicking in the
/// first matrix product.
#[test]
fn a_weight_type_without_a_kernel_is_refused_at_load() {
    use pinion_format::synth::{self, SynthConfig};
    use pinion_format::{GgmlType, Gguf, GgufWriter};
    let cfg = SynthConfig { n_layers: 1, ..SynthConfig::preset("tiny").unwrap() };
    let mut src = Vec::new();
    synth::write_model(&cfg, &mut src, &mut |_, _| {}).unwrap();
    let g = Gguf::parse(&src).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in &g.metadata {
        w.add_metadata(key.as_str(), value.clone()).unwrap();
    }
    let name = "blk.0.attn_q.weight";
    for t in &g.tensors {
        if t.name == name {
            // d_model = 256: one Q8_K block (292 bytes, all zero) per row.
            let rows = t.dims[1] as usize;
            assert_eq!(t.dims[0], 256);
            w.add_tensor_data(&t.name, GgmlType::Q8K, &t.dims, vec![0u8; rows * 292]).unwrap();
        } else {
            w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t).unwrap()).unwrap();
        }
    }
    let p = temp_file("q8k.gguf", &w.to_bytes().unwrap());
    let e = load_err(&p);
    match &e {
        RuntimeError::UnsupportedWeightType { name: n, ty } => {
            assert_eq!(n, name);
            assert_eq!(*ty, GgmlType::Q8K);
        }
        other => panic!("expected UnsupportedWeightType, got {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(name) && msg.to_lowercase().contains("q8_k") && msg.contains("no kernel"), "{msg}");
    assert!(msg.contains("q4_0") || msg.contains("Q4_0"), "the message lists the supported types: {msg}");
}
