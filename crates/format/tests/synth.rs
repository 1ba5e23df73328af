//! Tests of `pinion_format::synth`: the synthetic models parse, carry the tensors and metadata llama.cpp
//! expects, are deterministic, stream exactly their declared size, and have the planted activation skew.

use pinion_format::synth::{self, Activation, SynthConfig, SynthError};
use pinion_format::{GgmlType, Gguf, quant};

fn tiny() -> SynthConfig {
    SynthConfig::preset("tiny").expect("tiny preset")
}

fn write(cfg: &SynthConfig) -> Vec<u8> {
    synth::write_model(cfg, Vec::new(), &mut |_, _| {}).expect("write synthetic model")
}

#[test]
fn tiny_model_has_llama_metadata_and_tensors() {
    let cfg = tiny();
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_str(synth::ACTIVATION_KEY).unwrap(), "relu");
    for (key, want) in [
        ("llama.block_count", 4),
        ("llama.embedding_length", 256),
        ("llama.feed_forward_length", 1024),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 4),
        ("llama.rope.dimension_count", 64),
        ("llama.vocab_size", 512),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
    ] {
        assert_eq!(g.get_u64(key).unwrap(), want, "{key}");
    }
    assert!(g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap() > 0.0);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "llama");
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 512);
    assert_eq!(&tokens[..3], ["<unk>", "<s>", "</s>"]);
    assert_eq!(tokens[3], "<0x00>");
    assert_eq!(tokens[258], "<0xFF>");
    let unique: std::collections::HashSet<_> = tokens.iter().collect();
    assert_eq!(unique.len(), tokens.len(), "token strings must be unique");
    let types = g.get_i64_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!((types[0], types[1], types[3], types[258], types[259]), (2, 3, 6, 6, 1));
    assert_eq!(g.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 512);

    // 2 global + 9 per layer + output_norm.
    assert_eq!(g.tensors.len(), 3 + 9 * 4);
    let shape = |name: &str| {
        let t = g.tensor(name).unwrap();
        (t.ty, t.dims.to_vec())
    };
    let q = GgmlType::Q4_0;
    assert_eq!(shape("token_embd.weight"), (q, vec![256, 512]));
    assert_eq!(shape("output.weight"), (q, vec![256, 512]));
    assert_eq!(shape("output_norm.weight"), (GgmlType::F32, vec![256]));
    for l in 0..4 {
        let s = |n: &str| shape(&format!("blk.{l}.{n}.weight"));
        assert_eq!(s("attn_norm"), (GgmlType::F32, vec![256]));
        assert_eq!(s("ffn_norm"), (GgmlType::F32, vec![256]));
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            assert_eq!(s(n), (q, vec![256, 256]), "{n}");
        }
        assert_eq!(s("ffn_gate"), (q, vec![256, 1024]));
        assert_eq!(s("ffn_up"), (q, vec![256, 1024]));
        assert_eq!(s("ffn_down"), (q, vec![1024, 256]));
    }
    assert_eq!(synth::tensor_specs(&cfg).len(), g.tensors.len());
}

#[test]
fn gqa_and_f32_models_have_the_right_shapes_and_bias_channel() {
    let cfg = SynthConfig { n_layers: 1, n_kv_heads: 2, ty: GgmlType::F32, n_vocab: 300, ..tiny() };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.tensor("blk.0.attn_k.weight").unwrap().dims, [256, 128]);
    assert_eq!(g.tensor("blk.0.attn_v.weight").unwrap().dims, [256, 128]);
    let e = g.tensor("token_embd.weight").unwrap();
    assert_eq!(e.ty, GgmlType::F32);
    let mut row = vec![0.0; 256];
    for t in [0, 17, 299] {
        quant::dequantize_row(e.ty, e.row(t), &mut row).unwrap();
        assert_eq!(row[0], cfg.bias_value() as f32, "token {t}'s bias channel");
        assert!(row[1..].iter().all(|v| v.abs() < 1.8));
    }
    let n = g.tensor("blk.0.ffn_norm.weight").unwrap();
    assert!(n.data.chunks(4).all(|c| f32::from_le_bytes(c.try_into().unwrap()) == 1.0));
}

#[test]
fn writing_is_deterministic_for_a_seed() {
    let cfg = SynthConfig { n_layers: 1, ..tiny() };
    let a = write(&cfg);
    assert_eq!(a, write(&cfg));
    let other = write(&SynthConfig { seed: 1, ..cfg.clone() });
    assert_eq!(a.len(), other.len());
    assert_ne!(a, other);
}

#[test]
fn streamed_size_equals_declared_size_and_progress_reaches_it() {
    for cfg in [tiny(), SynthConfig { n_experts: 4, n_experts_used: 2, n_layers: 1, ..tiny() }] {
        let declared = synth::file_len(&cfg).unwrap();
        let mut calls = Vec::new();
        let bytes = synth::write_model(&cfg, Vec::new(), &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(bytes.len() as u64, declared);
        assert_eq!(calls.len(), 1 + synth::tensor_specs(&cfg).len());
        assert!(calls.windows(2).all(|w| w[0].0 < w[1].0), "progress must increase");
        assert_eq!(*calls.last().unwrap(), (declared, declared));
    }
}

#[test]
fn moe_model_has_3d_expert_tensors() {
    let cfg = SynthConfig { n_experts: 4, n_experts_used: 2, n_layers: 2, act: Activation::Silu, ..tiny() };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.get_u64("llama.expert_count").unwrap(), 4);
    assert_eq!(g.get_u64("llama.expert_used_count").unwrap(), 2);
    assert_eq!(g.get_str(synth::ACTIVATION_KEY).unwrap(), "silu");
    for l in 0..2 {
        let t = |n: &str| g.tensor(&format!("blk.{l}.{n}.weight")).unwrap();
        assert_eq!((t("ffn_gate_inp").ty, t("ffn_gate_inp").dims), (GgmlType::F32, &[256u64, 4][..]));
        assert_eq!(t("ffn_gate_exps").dims, [256, 1024, 4]);
        assert_eq!(t("ffn_up_exps").dims, [256, 1024, 4]);
        assert_eq!(t("ffn_down_exps").dims, [1024, 256, 4]);
        assert_eq!(t("ffn_gate_exps").ty, GgmlType::Q4_0);
        assert!(g.tensor_info(&format!("blk.{l}.ffn_gate.weight")).is_none());
    }
}

#[test]
fn bad_configs_are_typed_errors() {
    let bad = [
        SynthConfig { d_model: 0, ..tiny() },
        SynthConfig { n_layers: 0, ..tiny() },
        SynthConfig { n_heads: 3, ..tiny() },
        SynthConfig { n_kv_heads: 3, ..tiny() },
        SynthConfig { n_ff: 1000, ..tiny() },
        SynthConfig { n_vocab: 100, ..tiny() },
        SynthConfig { ty: GgmlType::Q8_0, ..tiny() },
        SynthConfig { n_experts: 4, n_experts_used: 5, ..tiny() },
        SynthConfig { density: 0.99, ..tiny() },
        SynthConfig { alpha: f64::NAN, ..tiny() },
    ];
    for cfg in bad {
        let err = synth::write_model(&cfg, Vec::new(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, SynthError::Config(_)), "{cfg:?}: {err}");
    }
    assert!(SynthConfig::preset("13b").is_none());
    for shape in ["tiny", "small", "7b"] {
        SynthConfig::preset(shape).unwrap().validate().unwrap();
    }
}

/// The rms-normalized embeddings of `tokens` (norm weights are 1), each `d` long, concatenated.
fn normalized_embeddings(g: &Gguf, tokens: impl Iterator<Item = usize>) -> Vec<f32> {
    let e = g.tensor("token_embd.weight").unwrap();
    let d = e.row_len();
    let mut xs = Vec::new();
    let mut x = vec![0.0f32; d];
    for t in tokens {
        quant::dequantize_row(e.ty, e.row(t), &mut x).unwrap();
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-5).sqrt();
        xs.extend(x.iter().map(|v| v / rms));
    }
    xs
}

/// For each token (row of `xs`) and each of `n` rows of `tensor` from `first`: is the row's dot product with the
/// token positive? Token-major.
fn positive(g: &Gguf, tensor: &str, first: usize, n: usize, xs: &[f32]) -> Vec<bool> {
    let t = g.tensor(tensor).unwrap();
    let d = t.row_len();
    let mut w = vec![0.0f32; n * d];
    for (i, row) in w.chunks_mut(d).enumerate() {
        quant::dequantize_row(t.ty, t.row(first + i), row).unwrap();
    }
    let mut out = Vec::with_capacity(xs.len() / d * n);
    for x in xs.chunks(d) {
        out.extend(w.chunks(d).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() > 0.0));
    }
    out
}

/// Per-neuron frequency of `fired` (token-major, `n` neurons).
fn frequencies(fired: &[bool], n: usize) -> Vec<f64> {
    let n_tokens = fired.len() / n;
    let mut f = vec![0.0; n];
    for tok in fired.chunks(n) {
        for (f, &b) in f.iter_mut().zip(tok) {
            *f += b as u8 as f64 / n_tokens as f64;
        }
    }
    f
}

/// Measured firing frequency of each layer-0 gate neuron over the rms-normalized embeddings of `tokens`.
fn measured_frequencies(g: &Gguf, tokens: impl Iterator<Item = usize>) -> (Vec<f64>, usize) {
    let xs = normalized_embeddings(g, tokens);
    let gate = g.tensor("blk.0.ffn_gate.weight").unwrap();
    let n = gate.n_rows();
    let fired = positive(g, "blk.0.ffn_gate.weight", 0, n, &xs);
    (frequencies(&fired, n), xs.len() / gate.row_len())
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
fn planted_skew_shows_in_layer_0() {
    // A one-layer tiny model with a larger vocabulary, so that there are enough distinct token embeddings.
    let cfg = SynthConfig { n_layers: 1, n_vocab: 3000, seed: 7, ..tiny() };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    let target = synth::target_frequencies(&cfg, 0, 0);
    let (measured, n) = measured_frequencies(&g, 0..cfg.n_vocab);
    assert_eq!(n, 3000);
    let r = pearson(&measured, &target);
    let density = measured.iter().sum::<f64>() / measured.len() as f64;
    let target_density = target.iter().sum::<f64>() / target.len() as f64;
    assert!((target_density - cfg.density).abs() < 1e-6);
    assert!(r > 0.95, "pearson {r}");
    assert!((density - cfg.density).abs() < 0.03, "measured density {density}, planted {}", cfg.density);
    // The skew is a power law: the hottest 10% of neurons account for much more than 10% of the firings.
    let mut sorted = measured.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let top = sorted[..sorted.len() / 10].iter().sum::<f64>() / sorted.iter().sum::<f64>();
    eprintln!(
        "layer 0: pearson {r:.4}, density {density:.4} (planted {}), top-10% share {top:.3}",
        cfg.density
    );
    assert!(top > 0.4, "top 10% of neurons fire {top} of the time");

    // Without the planted weights on the bias channel every neuron would fire half the time: check that the
    // correlation is not an artefact by comparing against a different seed's targets.
    let other = synth::target_frequencies(&SynthConfig { seed: 8, ..cfg.clone() }, 0, 0);
    assert!(pearson(&measured, &other).abs() < 0.3);
}

#[test]
fn drelu_gate_and_up_fire_jointly_with_the_planted_frequency() {
    let cfg = SynthConfig { n_layers: 1, n_vocab: 2000, act: Activation::Drelu, seed: 11, ..tiny() };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    let xs = normalized_embeddings(&g, 0..cfg.n_vocab);
    let gate = positive(&g, "blk.0.ffn_gate.weight", 0, cfg.n_ff, &xs);
    let up = positive(&g, "blk.0.ffn_up.weight", 0, cfg.n_ff, &xs);
    let both: Vec<bool> = gate.iter().zip(&up).map(|(a, b)| *a && *b).collect();
    let measured = frequencies(&both, cfg.n_ff);
    let target = synth::target_frequencies(&cfg, 0, 0);
    let r = pearson(&measured, &target);
    let density = measured.iter().sum::<f64>() / measured.len() as f64;
    eprintln!("drelu layer 0: pearson {r:.4}, joint density {density:.4} (planted {})", cfg.density);
    assert!(r > 0.9, "pearson {r}");
    assert!((density - cfg.density).abs() < 0.03, "joint density {density}");
}

#[test]
fn each_moe_expert_has_its_own_planted_skew() {
    let cfg = SynthConfig { n_layers: 1, n_vocab: 2000, n_experts: 2, n_experts_used: 1, ..tiny() };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    let xs = normalized_embeddings(&g, 0..cfg.n_vocab);
    let t0 = synth::target_frequencies(&cfg, 0, 0);
    let t1 = synth::target_frequencies(&cfg, 0, 1);
    for (expert, target, other) in [(0, &t0, &t1), (1, &t1, &t0)] {
        let fired = positive(&g, "blk.0.ffn_gate_exps.weight", expert * cfg.n_ff, cfg.n_ff, &xs);
        let measured = frequencies(&fired, cfg.n_ff);
        let r = pearson(&measured, target);
        assert!(r > 0.95, "expert {expert}: pearson {r}");
        assert!(pearson(&measured, other).abs() < 0.3, "expert {expert} follows the other expert's targets");
    }
}
