//! config.json: the architecture, the hyperparameters as `transformers`' `AutoConfig` completes them (its
//! defaults for keys the file leaves out, the older `rope_theta`/`rope_scaling` layout folded into
//! `rope_parameters`), and the refusal of what the converter does not handle.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::ConvertError;

/// The architectures the converter writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    /// The GGUF `general.architecture`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// `transformers`' defaults for the keys the converter reads (transformers 5: `LlamaConfig`, `Qwen2Config`,
    /// `Qwen3Config`). `head_dim` is derived for llama, absent for qwen2, 128 for qwen3.
    fn defaults(self) -> Value {
        let common = serde_json::json!({
            "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false,
        });
        let mut d = common.as_object().cloned().unwrap_or_default();
        let extra = match self {
            Arch::Llama => serde_json::json!({
                "vocab_size": 32000, "intermediate_size": 11008, "max_position_embeddings": 2048,
            }),
            Arch::Qwen2 => serde_json::json!({
                "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
            }),
            Arch::Qwen3 => serde_json::json!({
                "vocab_size": 151936, "intermediate_size": 22016, "max_position_embeddings": 32768,
                "head_dim": 128,
            }),
        };
        d.extend(extra.as_object().cloned().unwrap_or_default());
        Value::Object(d)
    }
}

/// The RoPE scaling the converter writes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RopeScaling {
    None,
    /// `rope.scaling.type` linear with this factor.
    Linear(f64),
    /// Llama 3.1's frequency factors (`rope_freqs.weight`), llama only.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// config.json read and completed.
#[derive(Debug)]
pub(crate) struct HfConfig {
    pub(crate) arch: Arch,
    /// The hyperparameters as `AutoConfig(...).to_dict()` gives them (the defaults, then the file's keys).
    pub(crate) hparams: Map<String, Value>,
    /// The file as written (special token ids and `_name_or_path` are read from it, as the reference does).
    pub(crate) raw: Map<String, Value>,
    pub(crate) n_layer: usize,
    pub(crate) n_embd: usize,
    pub(crate) n_ff: usize,
    pub(crate) n_head: usize,
    pub(crate) n_head_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) n_vocab: usize,
    pub(crate) tied: bool,
    pub(crate) rope_theta: Option<f64>,
    pub(crate) rope: RopeScaling,
}

impl HfConfig {
    pub(crate) fn read(dir: &Path) -> Result<HfConfig, ConvertError> {
        let path = dir.join("config.json");
        let raw = match crate::read_json(&path, "the model's configuration")? {
            Value::Object(m) => m,
            _ => return Err(bad("(file)", "not a JSON object")),
        };
        let hf_arch = match raw.get("architectures") {
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(bad("architectures", "empty or not a list of names")),
            },
            _ => return Err(bad("architectures", "missing")),
        };
        let arch = match hf_arch.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            _ => return Err(ConvertError::UnsupportedArchitecture { name: hf_arch }),
        };
        for key in ["text_config", "quantization_config", "num_local_experts", "num_experts"] {
            if raw.get(key).is_some_and(|v| !v.is_null()) {
                return Err(ConvertError::Unsupported { what: format!("config.json: {key}") });
            }
        }
        let mut hparams = match arch.defaults() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for (k, v) in &raw {
            // AutoConfig fills in a key the file gives as null with its default.
            if !(v.is_null() && hparams.contains_key(k)) {
                hparams.insert(k.clone(), v.clone());
            }
        }
        normalize_rope(&mut hparams);
        fn get(hparams: &Map<String, Value>, key: &str) -> Result<usize, ConvertError> {
            match hparams.get(key) {
                Some(v) => {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| bad(key, "not a non-negative integer"))
                }
                None => Err(bad(key, "missing")),
            }
        }
        let n_layer = get(&hparams, "num_hidden_layers")?;
        let n_embd = get(&hparams, "hidden_size")?;
        let n_ff = get(&hparams, "intermediate_size")?;
        let n_head = get(&hparams, "num_attention_heads")?;
        let n_vocab = get(&hparams, "vocab_size")?;
        if hparams.get("num_key_value_heads").is_none_or(|v| v.is_null()) {
            hparams.insert("num_key_value_heads".into(), n_head.into());
        }
        let n_head_kv = get(&hparams, "num_key_value_heads")?;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(bad("num_key_value_heads", &format!("{n_head_kv} does not divide {n_head} heads")));
        }
        if arch == Arch::Llama && hparams.get("head_dim").is_none_or(|v| v.is_null()) {
            hparams.insert("head_dim".into(), (n_embd / n_head).into());
        }
        let head_dim = match hparams.get("head_dim") {
            Some(v) if !v.is_null() => get(&hparams, "head_dim")?,
            _ => n_embd / n_head,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad("head_dim", &format!("{head_dim} is not a positive even number")));
        }
        let tied = hparams.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
        let rope_params =
            hparams.get("rope_parameters").and_then(Value::as_object).cloned().unwrap_or_default();
        let rope_theta = rope_params.get("rope_theta").and_then(Value::as_f64);
        let rope = rope_scaling(arch, &rope_params)?;
        for (key, what) in [("use_sliding_window", "sliding-window attention")] {
            if hparams.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(ConvertError::Unsupported { what: format!("{what} (config.json: {key})") });
            }
        }
        Ok(HfConfig {
            arch,
            hparams,
            raw,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            tied,
            rope_theta,
            rope,
        })
    }

    /// The first of `keys` present in the hyperparameters (`find_hparam`).
    pub(crate) fn find(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.hparams.get(*k)).filter(|v| !v.is_null())
    }
}

fn bad(key: &str, why: &str) -> ConvertError {
    ConvertError::BadConfig { key: key.to_string(), why: why.to_string() }
}

/// Folds the older layout into `rope_parameters`, as transformers 5 does when it reads a config: the
/// `rope_scaling` entries, `rope_theta` (default 10000) and `rope_type` (from `type`, else "default").
fn normalize_rope(h: &mut Map<String, Value>) {
    let mut p = match h.get("rope_parameters") {
        Some(Value::Object(m)) => m.clone(),
        _ => match h.get("rope_scaling") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        },
    };
    if !p.contains_key("rope_theta") {
        let theta = h.get("rope_theta").filter(|v| v.is_number()).cloned().unwrap_or(Value::from(10000.0));
        p.insert("rope_theta".into(), theta);
    }
    if !p.contains_key("rope_type") {
        let ty = p.get("type").cloned().unwrap_or(Value::from("default"));
        p.insert("rope_type".into(), ty);
    }
    h.remove("rope_theta");
    h.remove("rope_scaling");
    h.insert("rope_parameters".into(), Value::Object(p));
}

fn rope_scaling(arch: Arch, p: &Map<String, Value>) -> Result<RopeScaling, ConvertError> {
    let ty = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str, default: f64| p.get(k).and_then(Value::as_f64).unwrap_or(default);
    let refuse = |why: &str| ConvertError::Unsupported {
        what: format!("RoPE scaling {ty:?} (config.json rope_parameters / rope_scaling){why}"),
    };
    match ty.to_ascii_lowercase().as_str() {
        "default" => Ok(RopeScaling::None),
        "linear" => match p.get("factor").and_then(Value::as_f64) {
            Some(f) => Ok(RopeScaling::Linear(f)),
            None => Err(refuse(" without a factor")),
        },
        "llama3" if arch == Arch::Llama => Ok(RopeScaling::Llama3 {
            factor: num("factor", 8.0),
            low_freq_factor: num("low_freq_factor", 1.0),
            high_freq_factor: num("high_freq_factor", 4.0),
            original_max_position_embeddings: num("original_max_position_embeddings", 8192.0),
        }),
        "llama3" => Err(refuse(&format!(" for {}", arch.name()))),
        _ => Err(refuse("")),
    }
}
