//! Model hyper-parameters read from GGUF metadata.

use pinion_format::Gguf;

use crate::error::RuntimeError;

/// The hyper-parameters of a llama-style decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture`, e.g. `llama`.
    pub arch: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Number of dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub n_vocab: usize,
    /// The context length the model was trained for.
    pub n_ctx_train: usize,
}

/// Architectures whose tensors and hyper-parameters follow llama's names.
const LLAMA_LIKE: &[&str] = &["llama", "mistral", "smollm", "granite"];

/// Upper bounds on hyper-parameters, so a corrupt file cannot ask for absurd allocations.
const MAX_LAYERS: u64 = 1024;
const MAX_WIDTH: u64 = 1 << 20;
const MAX_HEADS: u64 = 4096;

impl ModelConfig {
    /// Reads the config of a llama-architecture model from its GGUF metadata.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<ModelConfig, RuntimeError> {
        let arch = g.get_str("general.architecture")?.to_string();
        if !LLAMA_LIKE.contains(&arch.as_str()) {
            return Err(RuntimeError::UnsupportedArchitecture { arch });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let bounded = |k: &str, cap: u64| -> Result<usize, RuntimeError> {
            let v = g.get_u64(&key(k))?;
            if v == 0 || v > cap {
                return Err(RuntimeError::BadHyperParameter { key: key(k), value: v.to_string() });
            }
            Ok(v as usize)
        };
        let n_layers = bounded("block_count", MAX_LAYERS)?;
        let d_model = bounded("embedding_length", MAX_WIDTH)?;
        let n_ff = bounded("feed_forward_length", MAX_WIDTH)?;
        let n_heads = bounded("attention.head_count", MAX_HEADS)?;
        let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(_) => bounded("attention.head_count_kv", MAX_HEADS)?,
            None => n_heads,
        };
        if d_model % n_heads != 0 || n_heads % n_kv_heads != 0 {
            return Err(RuntimeError::BadHyperParameter {
                key: key("attention.head_count"),
                value: format!("{n_heads} heads, {n_kv_heads} KV heads, width {d_model}"),
            });
        }
        let head_dim = d_model / n_heads;
        let n_rot = match g.get(&key("rope.dimension_count")) {
            Some(_) => bounded("rope.dimension_count", head_dim as u64)?,
            None => head_dim,
        };
        let rope_freq_base = match g.get(&key("rope.freq_base")) {
            Some(_) => g.get_f32(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let rms_eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let n_vocab = match g.get(&key("vocab_size")) {
            Some(_) => bounded("vocab_size", MAX_WIDTH * 4)?,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let n_ctx_train = bounded("context_length", 1 << 24)?;
        let name = g.get_str("general.name").ok().map(str::to_string);
        Ok(ModelConfig {
            arch,
            name,
            n_layers,
            d_model,
            n_ff,
            n_heads,
            n_kv_heads,
            head_dim,
            n_rot,
            rope_freq_base,
            rms_eps,
            n_vocab,
            n_ctx_train,
        })
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
