//! Tests of `pinion_format::synth`: the synthetic models parse, carry the tensors and metadata llama.cpp
//! expects, are deterministic, stream exactly their declared size, and have the planted activation skew.

use pinion_format::synth::{self, Activation, SynthConfig, SynthError, pearson};
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

/// A one-layer mixture of experts on the tiny shape: `n_experts` experts, 2 used, a vocabulary of 8000 (each token
/// embedding is one draw of the routed features: fewer distinct tokens would add their own sampling noise).
fn tiny_moe(n_experts: usize) -> SynthConfig {
    SynthConfig { n_layers: 1, n_vocab: 8000, n_experts, n_experts_used: 2, act: Activation::Drelu, ..tiny() }
}

/// The same with qwen3moe's attention: Q/K norms, NeoX RoPE, 4 heads of 128 over a width of 256.
fn tiny_qwen3moe(n_experts: usize) -> SynthConfig {
    SynthConfig {
        arch: synth::SynthArch::Qwen3Moe,
        head_len: Some(128),
        n_kv_heads: 2,
        act: Activation::Silu,
        ..tiny_moe(n_experts)
    }
}

/// `n` pseudo-random token ids below `n_vocab`, past the special and byte tokens.
fn random_tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<usize> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            synth::N_BASE_TOKENS + (x % (n_vocab - synth::N_BASE_TOKENS) as u64) as usize
        })
        .collect()
}

/// Rows `first..first + n` of `tensor`, dequantized, row-major.
fn rows(g: &Gguf, tensor: &str, first: usize, n: usize) -> Vec<f32> {
    let t = g.tensor(tensor).unwrap();
    let d = t.row_len();
    let mut w = vec![0.0f32; n * d];
    for (i, row) in w.chunks_mut(d).enumerate() {
        quant::dequantize_row(t.ty, t.row(first + i), row).unwrap();
    }
    w
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn rms_normalized(x: &[f32]) -> Vec<f32> {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-5).sqrt();
    x.iter().map(|v| v / rms).collect()
}

/// Layer 0's FFN inputs of `tokens` as the shift heads plant them: each token's embedding plus, for shift head
/// `h` (lag `h+1`), the attention output projection of its value of the token `h+1` back, read from the file's
/// `attn_v` and `attn_output` (the other heads' small outputs left out; `shift_heads_attend_to_their_lag`
/// checks the attention pattern itself). `with_shift` false leaves the embeddings alone. RMS-normalized.
fn layer0_ffn_inputs(g: &Gguf, cfg: &SynthConfig, tokens: &[usize], with_shift: bool) -> Vec<Vec<f32>> {
    let d = cfg.d_model;
    let hd = cfg.head_dim();
    let n_shift = synth::routing_plan(cfg).unwrap().unwrap().gains.len();
    let group = cfg.n_heads / cfg.n_kv_heads;
    let embeds: Vec<Vec<f32>> = tokens.iter().map(|&t| rows(g, "token_embd.weight", t, 1)).collect();
    let out = rows(g, "blk.0.attn_output.weight", 0, d);
    let values: Vec<Vec<f32>> =
        (0..n_shift).map(|h| rows(g, "blk.0.attn_v.weight", h / group * hd, hd)).collect();
    let qw = cfg.q_width();
    (0..tokens.len())
        .map(|t| {
            let mut x = embeds[t].clone();
            for (h, v) in values.iter().enumerate().filter(|_| with_shift) {
                let Some(src) = t.checked_sub(h + 1) else { continue };
                let val = matvec(v, &rms_normalized(&embeds[src]));
                for (i, xi) in x.iter_mut().enumerate() {
                    let o = &out[i * qw + h * hd..i * qw + (h + 1) * hd];
                    *xi += o.iter().zip(&val).map(|(a, b)| a * b).sum::<f32>();
                }
            }
            rms_normalized(&x)
        })
        .collect()
}

/// Each token's first-choice expert of layer 0's router.
fn first_choices(g: &Gguf, cfg: &SynthConfig, xs: &[Vec<f32>]) -> Vec<usize> {
    let router = rows(g, "blk.0.ffn_gate_inp.weight", 0, cfg.n_experts);
    xs.iter()
        .map(|x| {
            let logits = matvec(&router, x);
            (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap()
        })
        .collect()
}

fn repeat_rate(first: &[usize]) -> f64 {
    first.windows(2).filter(|w| w[0] == w[1]).count() as f64 / (first.len() - 1) as f64
}

#[test]
fn planted_expert_popularity_and_repeat_rate_show_in_layer_0() {
    for cfg in [tiny_moe(8), tiny_qwen3moe(16)] {
        let bytes = write(&cfg);
        let g = Gguf::parse(&bytes).unwrap();
        let tokens = random_tokens(8000, cfg.n_vocab, 3);
        let xs = layer0_ffn_inputs(&g, &cfg, &tokens, true);
        let first = first_choices(&g, &cfg, &xs);
        let mut freq = vec![0.0f64; cfg.n_experts];
        for &e in &first {
            freq[e] += 1.0 / first.len() as f64;
        }
        let target = synth::expert_targets(&cfg, 0);
        let worst = freq.iter().zip(&target).map(|(f, t)| (f - t).abs()).fold(0.0, f64::max);
        let repeat = repeat_rate(&first);
        let alone = repeat_rate(&first_choices(&g, &cfg, &layer0_ffn_inputs(&g, &cfg, &tokens, false)));
        eprintln!(
            "{} x{}: first-choice frequencies {freq:.3?} vs targets {target:.3?} (worst {worst:.4}); repeat \
             {repeat:.3} (without the shift heads {alone:.3})",
            cfg.arch.name(),
            cfg.n_experts
        );
        // Zipf 0.5 over 8 experts: 0.19 for the most popular, 0.067 for the least; binomial noise on 6000
        // tokens is about 0.005.
        assert!(worst < 0.02, "first-choice frequencies {freq:?} vs {target:?}");
        // The check can fail: another layer's permutation of the same targets does not fit.
        let other = synth::expert_targets(&cfg, 1);
        let worst_other = freq.iter().zip(&other).map(|(f, t)| (f - t).abs()).fold(0.0, f64::max);
        assert!(worst_other > 0.04, "layer 1's targets fit too: {worst_other}");
        assert!((repeat - cfg.expert_repeat).abs() < 0.03, "repeat rate {repeat}");
        // Without the previous tokens' features, tokens are routed independently: about Σ p².
        let sum_sq: f64 = target.iter().map(|p| p * p).sum();
        assert!((alone - sum_sq).abs() < 0.03, "independent repeat rate {alone} vs Σp² {sum_sq}");
    }
}

/// Rotates `x` (one head) to position `pos` as llama.cpp's RoPE does: pairs `(2j, 2j+1)`, or `(j, j + hd/2)`
/// for NeoX, by `pos · 10000^(-2j/hd)`.
fn rope(x: &mut [f32], pos: usize, neox: bool) {
    let hd = x.len();
    for j in 0..hd / 2 {
        let (a, b) = if neox { (j, j + hd / 2) } else { (2 * j, 2 * j + 1) };
        let angle = pos as f64 * 10000f64.powf(-2.0 * j as f64 / hd as f64);
        let (s, c) = (angle.sin() as f32, angle.cos() as f32);
        (x[a], x[b]) = (x[a] * c - x[b] * s, x[a] * s + x[b] * c);
    }
}

#[test]
fn shift_heads_attend_to_their_lag() {
    for cfg in [tiny_moe(8), tiny_qwen3moe(16)] {
        let bytes = write(&cfg);
        let g = Gguf::parse(&bytes).unwrap();
        let (hd, d) = (cfg.head_dim(), cfg.d_model);
        let neox = cfg.arch != synth::SynthArch::Llama;
        let n_shift = synth::routing_plan(&cfg).unwrap().unwrap().gains.len();
        assert!(n_shift >= 1);
        let group = cfg.n_heads / cfg.n_kv_heads;
        let qk_norm = |name: &str, v: Vec<f32>| match g.tensor_info(&format!("blk.0.{name}.weight")) {
            Some(_) => {
                let w = rows(&g, &format!("blk.0.{name}.weight"), 0, 1);
                rms_normalized(&v).iter().zip(&w).map(|(a, b)| a * b).collect()
            }
            None => v,
        };
        let tokens = random_tokens(300, cfg.n_vocab, 5);
        let xs: Vec<Vec<f32>> =
            tokens.iter().map(|&t| rms_normalized(&rows(&g, "token_embd.weight", t, 1))).collect();
        assert_eq!(xs[0].len(), d);
        for h in 0..n_shift {
            let (wq, wk) = (
                rows(&g, "blk.0.attn_q.weight", h * hd, hd),
                rows(&g, "blk.0.attn_k.weight", h / group * hd, hd),
            );
            let keys: Vec<Vec<f32>> = xs
                .iter()
                .enumerate()
                .map(|(s, x)| {
                    let mut k = qk_norm("attn_k_norm", matvec(&wk, x));
                    rope(&mut k, s, neox);
                    k
                })
                .collect();
            let mut worst = 1.0f64;
            for (t, x) in xs.iter().enumerate().skip(h + 1) {
                let mut q = qk_norm("attn_q_norm", matvec(&wq, x));
                rope(&mut q, t, neox);
                let scores: Vec<f64> = keys[..=t]
                    .iter()
                    .map(|k| q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                worst = worst.min((scores[t - h - 1] - max).exp() / sum);
            }
            eprintln!("{} head {h}: least attention weight on lag {} is {worst:.5}", cfg.arch.name(), h + 1);
            assert!(worst > 0.99, "head {h} puts {worst} on lag {}", h + 1);
        }
    }
}

#[test]
fn qwen3moe_has_the_keys_and_tensors_of_llama_cpp_loader() {
    let cfg = SynthConfig { n_layers: 2, ..tiny_qwen3moe(16) };
    let bytes = write(&cfg);
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "qwen3moe");
    for (key, want) in [
        ("qwen3moe.expert_count", 16),
        ("qwen3moe.expert_used_count", 2),
        ("qwen3moe.expert_feed_forward_length", 1024),
        ("qwen3moe.feed_forward_length", 2048),
        ("qwen3moe.attention.key_length", 128),
        ("qwen3moe.attention.value_length", 128),
        ("qwen3moe.rope.dimension_count", 128),
        ("qwen3moe.attention.head_count", 4),
        ("qwen3moe.attention.head_count_kv", 2),
    ] {
        assert_eq!(g.get_u64(key).unwrap(), want, "{key}");
    }
    for l in 0..2 {
        let t = |n: &str| g.tensor(&format!("blk.{l}.{n}.weight")).unwrap().dims.to_vec();
        assert_eq!(t("attn_q"), [256, 512]);
        assert_eq!(t("attn_k"), [256, 256]);
        assert_eq!(t("attn_output"), [512, 256]);
        assert_eq!(t("attn_q_norm"), [128]);
        assert_eq!(t("attn_k_norm"), [128]);
        assert_eq!(t("ffn_gate_inp"), [256, 16]);
        assert_eq!(t("ffn_gate_exps"), [256, 1024, 16]);
        assert_eq!(t("ffn_down_exps"), [1024, 256, 16]);
    }
    // A dense qwen3moe, more experts than routed dimensions, and an unreachable repeat rate are refused.
    for bad in [
        SynthConfig { n_experts: 0, n_experts_used: 0, ..cfg.clone() },
        SynthConfig { n_experts: 129, ..cfg.clone() },
        SynthConfig { expert_repeat: 0.999, ..cfg.clone() },
        SynthConfig { expert_zipf: -1.0, ..cfg.clone() },
        SynthConfig { n_experts: 4, arch: synth::SynthArch::Qwen2, ..tiny_moe(4) },
    ] {
        let err = synth::write_model(&bad, Vec::new(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, SynthError::Config(_)), "{bad:?}: {err}");
    }
}
