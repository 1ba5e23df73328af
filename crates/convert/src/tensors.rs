//! Which GGUF tensors a checkpoint becomes: names (llama.cpp's tensor map for these architectures), shapes
//! checked against config.json, the element type of each, the Q/K row permutation of llama, Llama 3.1's RoPE
//! frequency factors; and the conversion of one tensor's values to its GGUF bytes.

use pinion_format::GgmlType;
use pinion_format::quant::{BlockQ4_0, BlockQ8_0, quantize_row_q4_0, quantize_row_q8_0};

use crate::OutType;
use crate::config::{Arch, HfConfig, RopeScaling};
use crate::error::ConvertError;
use crate::source::{Source, SrcTensor};

/// Where a GGUF tensor's values come from.
#[derive(Clone, Debug)]
pub(crate) enum Values {
    /// A safetensors tensor, its rows permuted for llama's RoPE when `permute_heads` is set.
    Src { index: usize, permute_heads: Option<usize> },
    /// Computed values (`rope_freqs.weight`).
    Computed(Vec<f32>),
}

/// One tensor of the output.
#[derive(Clone, Debug)]
pub(crate) struct OutTensor {
    pub(crate) name: String,
    pub(crate) ty: GgmlType,
    /// Innermost first (GGUF order).
    pub(crate) dims: Vec<u64>,
    pub(crate) values: Values,
}

impl OutTensor {
    pub(crate) fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The GGUF name of a Hugging Face tensor, `None` for tensors the reference converter drops, an error for names
/// it has no counterpart for.
fn gguf_name(cfg: &HfConfig, name: &str) -> Result<Option<String>, ConvertError> {
    if name.ends_with(".rotary_emb.inv_freq") || name.ends_with(".attention.masked_bias") {
        return Ok(None);
    }
    let unknown = || ConvertError::UnknownTensor { name: name.to_string(), arch: cfg.arch.name() };
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(Some(f.to_string()));
    }
    let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (bid, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let bid: usize = bid.parse().map_err(|_| unknown())?;
    if bid >= cfg.n_layer || bid.to_string().len() != name["model.layers.".len()..].find('.').unwrap_or(0) {
        return Err(unknown());
    }
    let (module, suffix) = match rest.rsplit_once('.') {
        Some((m, s @ ("weight" | "bias"))) => (m, s),
        _ => return Err(unknown()),
    };
    let base = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" if cfg.arch == Arch::Qwen3 => "attn_q_norm",
        "self_attn.k_norm" if cfg.arch == Arch::Qwen3 => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return Err(unknown()),
    };
    // Biases: Qwen2's Q/K/V only (llama.cpp converts others, e.g. llama's attention_bias or mlp_bias, but
    // pinion's runtime refuses them, so they are refused here, before anything is written).
    let qkv = matches!(base, "attn_q" | "attn_k" | "attn_v");
    if suffix == "bias" && !(cfg.arch == Arch::Qwen2 && qkv) {
        return Err(unknown());
    }
    Ok(Some(format!("blk.{bid}.{base}.{suffix}")))
}

/// The shape (outermost first) config.json implies for a GGUF tensor name.
fn expected_shape(cfg: &HfConfig, gguf: &str) -> Vec<usize> {
    let (e, v, f) = (cfg.n_embd, cfg.n_vocab, cfg.n_ff);
    let (q, kv) = (cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim);
    let (base, suffix) = match gguf.strip_prefix("blk.") {
        Some(rest) => {
            let rest = rest.split_once('.').map_or(rest, |(_, r)| r);
            rest.rsplit_once('.').unwrap_or((rest, ""))
        }
        None => gguf.rsplit_once('.').unwrap_or((gguf, "")),
    };
    let w = suffix == "weight";
    match base {
        "token_embd" | "output" => vec![v, e],
        "output_norm" | "attn_norm" | "ffn_norm" => vec![e],
        "attn_q_norm" | "attn_k_norm" => vec![cfg.head_dim],
        "attn_q" if w => vec![q, e],
        "attn_q" => vec![q],
        "attn_k" | "attn_v" if w => vec![kv, e],
        "attn_k" | "attn_v" => vec![kv],
        "attn_output" if w => vec![e, q],
        "attn_output" => vec![e],
        "ffn_gate" | "ffn_up" if w => vec![f, e],
        "ffn_gate" | "ffn_up" => vec![f],
        "ffn_down" if w => vec![e, f],
        "ffn_down" => vec![e],
        _ => Vec::new(),
    }
}

/// The tensors the architecture cannot do without, by Hugging Face name.
fn required(cfg: &HfConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    if !cfg.tied {
        names.push("lm_head.weight".into());
    }
    for b in 0..cfg.n_layer {
        let mut modules = vec![
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        match cfg.arch {
            Arch::Qwen2 => {
                modules.extend(["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"])
            }
            Arch::Qwen3 => modules.extend(["self_attn.q_norm.weight", "self_attn.k_norm.weight"]),
            Arch::Llama => {}
        }
        names.extend(modules.iter().map(|m| format!("model.layers.{b}.{m}")));
    }
    names
}

/// The output tensors, in the reference converter's order (`rope_freqs.weight` first, then the safetensors
/// tensors as [`Source`] lists them), with the types of `--outtype f16` or `q8_0`. (`q4_0` is planned as the f16
/// file, then requantized: see [`q4_0_plan`].)
pub(crate) fn plan(cfg: &HfConfig, src: &Source, out_type: OutType) -> Result<Vec<OutTensor>, ConvertError> {
    let mut out = Vec::new();
    if let RopeScaling::Llama3 { .. } = cfg.rope {
        let factors = llama3_rope_factors(cfg);
        out.push(OutTensor {
            name: "rope_freqs.weight".into(),
            ty: GgmlType::F32,
            dims: vec![factors.len() as u64],
            values: Values::Computed(factors),
        });
    }
    let present: std::collections::BTreeSet<&str> = src.tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = required(cfg).into_iter().find(|n| !present.contains(n.as_str())) {
        return Err(ConvertError::MissingTensor { name: missing });
    }
    for (index, t) in src.tensors.iter().enumerate() {
        let Some(name) = gguf_name(cfg, &t.name)? else { continue };
        let expected = expected_shape(cfg, &name);
        if expected != t.shape {
            return Err(ConvertError::ShapeMismatch { name: t.name.clone(), expected, got: t.shape.clone() });
        }
        let permute_heads = match cfg.arch {
            Arch::Llama if name.contains(".attn_q.") => Some(cfg.n_head),
            Arch::Llama if name.contains(".attn_k.") => Some(cfg.n_head_kv),
            _ => None,
        };
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        out.push(OutTensor {
            ty: tensor_type(&name, &dims, out_type),
            name,
            dims,
            values: Values::Src { index, permute_heads },
        });
    }
    Ok(out)
}

/// The type convert_hf_to_gguf.py gives a tensor: F32 for vectors and norms, else the output type, F16 where a
/// row is not a whole number of Q8_0 blocks.
fn tensor_type(name: &str, dims: &[u64], out_type: OutType) -> GgmlType {
    if dims.len() <= 1 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
        return GgmlType::F32;
    }
    match out_type {
        OutType::Q8_0 if dims[0] % 32 == 0 => GgmlType::Q8_0,
        _ => GgmlType::F16,
    }
}

/// What `llama-quantize --pure FILE.f16.gguf OUT q4_0` makes of the f16 plan: every matrix named `*.weight`
/// (norms aside) in Q4_0 (F16 kept where a row is not a whole number of blocks), in llama.cpp's tensor order
/// (tensors outside the blocks first, then block by block, each by name).
pub(crate) fn q4_0_plan(mut f16: Vec<OutTensor>) -> Vec<OutTensor> {
    for t in &mut f16 {
        let quantize = t.dims.len() >= 2 && t.name.ends_with("weight") && !t.name.contains("_norm.weight");
        if quantize && t.dims[0] % 32 == 0 {
            t.ty = GgmlType::Q4_0;
        }
    }
    f16.sort_by(|a, b| (block_of(&a.name), &a.name).cmp(&(block_of(&b.name), &b.name)));
    f16
}

/// The block number of `blk.N.*` names, -1 for others (llama.cpp's `weight_name_comparer`).
fn block_of(name: &str) -> i64 {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or(-1)
}

/// The GGUF bytes of tensor `t`. `q4_0` tensors are quantized from the values an f16 file holds (rounded to
/// F16 and back), as llama-quantize reads them.
pub(crate) fn tensor_bytes(src: &Source, t: &OutTensor) -> Result<Vec<u8>, ConvertError> {
    let mut x = match &t.values {
        Values::Computed(v) => v.clone(),
        Values::Src { index, permute_heads } => {
            let st: &SrcTensor = &src.tensors[*index];
            let x = src.read_f32(st)?;
            match permute_heads {
                Some(h) => permute(&x, st.shape[0], st.n_elements() / st.shape[0], *h),
                None => x,
            }
        }
    };
    let row = t.dims[0] as usize;
    Ok(match t.ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => {
            let mut blocks = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; x.len() / 32];
            for (xr, br) in x.chunks_exact(row).zip(blocks.chunks_exact_mut(row / 32)) {
                quantize_row_q8_0(xr, br);
            }
            bytemuck::cast_slice(&blocks).to_vec()
        }
        GgmlType::Q4_0 => {
            for v in &mut x {
                *v = half::f16::from_f32(*v).to_f32();
            }
            let mut blocks = vec![BlockQ4_0 { d: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
            for (xr, br) in x.chunks_exact(row).zip(blocks.chunks_exact_mut(row / 32)) {
                quantize_row_q4_0(xr, br);
            }
            bytemuck::cast_slice(&blocks).to_vec()
        }
        other => unreachable!("the converter plans no {other:?} tensor"),
    })
}

/// convert_hf_to_gguf.py's `LlamaModel.permute`: within each of `n_head` heads, the rows of the first and second
/// halves are interleaved (`reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2)`), turning Hugging Face's
/// rotate-half RoPE layout into ggml's adjacent pairs.
fn permute(x: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0.0; x.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let from = h * 2 * half + j * half + i;
                let to = h * 2 * half + i * 2 + j;
                out[to * cols..(to + 1) * cols].copy_from_slice(&x[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3.1's RoPE frequency factors of the configuration.
fn llama3_rope_factors(cfg: &HfConfig) -> Vec<f32> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        cfg.rope
    else {
        return Vec::new();
    };
    let s = Llama3Scaling {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
        base: cfg.rope_theta.unwrap_or(10000.0),
        dim: cfg.head_dim,
    };
    rope_factors(&s)
}

/// The settings of Llama 3.1's RoPE scaling.
struct Llama3Scaling {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
    base: f64,
    dim: usize,
}

/// Llama 3.1's RoPE frequency factors as convert_hf_to_gguf.py computes them, in PyTorch's float32 arithmetic
/// step by step (`a / t` on a tensor is `t.reciprocal() * a`).
fn rope_factors(s: &Llama3Scaling) -> Vec<f32> {
    let base = s.base as f32;
    let dim = s.dim;
    let old_ctx = s.original_max_position_embeddings;
    let low_wavelen = old_ctx / s.low_freq_factor;
    let high_wavelen = old_ctx / s.high_freq_factor;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = (1.0 / base.powf(i as f32 / dim as f32)) * 1.0;
            let wavelen = (1.0 / freq) * two_pi;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if (wavelen as f64) > low_wavelen {
                s.factor as f32
            } else {
                let smooth = ((1.0 / wavelen) * old_ctx as f32 - s.low_freq_factor as f32)
                    / (s.high_freq_factor - s.low_freq_factor) as f32;
                1.0 / ((1.0 - smooth) / s.factor as f32 + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smooth band of Llama 3.1 8B's and Llama 3.2 1B's factors, bit for bit as PyTorch 2.15 computes them
    /// with the reference's code (the factors outside the band are 1 and `factor`).
    #[test]
    fn llama3_rope_factors_equal_pytorchs() {
        let s = |factor, dim| Llama3Scaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
            base: 500000.0,
            dim,
        };
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let f = bits(rope_factors(&s(8.0, 128)));
        assert_eq!(f[..29], [0x3f800000; 29]);
        assert_eq!(f[29..35], [0x3f9a8ed5, 0x3fc6d64a, 0x4001af1d, 0x402c732e, 0x406bcace, 0x40a83c06]);
        assert_eq!(f[35..], [0x41000000; 29]);
        let f = bits(rope_factors(&s(32.0, 64)));
        assert_eq!(f[..15], [0x3f800000; 15]);
        assert_eq!(f[15..18], [0x3fd35ec2, 0x4052b46f, 0x411aaaee]);
        assert_eq!(f[18..], [0x42000000; 14]);
    }
}
