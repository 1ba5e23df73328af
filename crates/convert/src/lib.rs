//! Hugging Face checkpoints to GGUF: a model directory (config.json, `*.safetensors`, tokenizer.json,
//! tokenizer_config.json, chat_template.jinja, generation_config.json) becomes the GGUF file llama.cpp's
//! `convert_hf_to_gguf.py` writes for it (`--outtype f16` or `q8_0`), or the file `llama-quantize --pure`
//! makes of the f16 one (`q4_0`): the same metadata, tensor names, shapes, types and bytes, checked against
//! files the reference tools wrote (tests/data/hf).
//!
//! Supported: `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM` with F32, F16 or BF16 weights, tied or
//! untied embeddings, RoPE without scaling, linear, or Llama 3.1's (`rope_freqs.weight`, llama), and a byte-level
//! BPE tokenizer whose pre-tokenizer is Llama 3's, Qwen2's or SmolLM's. Anything else (another architecture, YaRN
//! or other RoPE scaling, quantized or MoE checkpoints, SentencePiece tokenizers, an unknown or missing tensor, a
//! truncated safetensors file) is a [`ConvertError`] naming it, found before the output is written; the output
//! is written to `FILE.partial` and renamed when complete, so a failed conversion leaves no file at `FILE`.
//!
//! ```no_run
//! use pinion_convert::{ConvertParams, OutType, convert};
//!
//! let summary = convert(&ConvertParams {
//!     model_dir: "models/SmolLM2-135M-Instruct".as_ref(),
//!     out: "models/smollm2.q8_0.gguf".as_ref(),
//!     out_type: OutType::Q8_0,
//! })?;
//! println!("{} tensors, {} bytes", summary.n_tensors, summary.n_bytes);
//! # Ok::<(), pinion_convert::ConvertError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod error;
mod metadata;
mod source;
mod tensors;
mod vocab;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use pinion_format::{GgufWriter, Value as Gv};

pub use crate::error::ConvertError;
use crate::error::io_err;

/// The tensor type of the output's matrices (vectors and norms are F32 in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    /// F16, as `convert_hf_to_gguf.py --outtype f16`.
    F16,
    /// Q8_0, as `convert_hf_to_gguf.py --outtype q8_0` (F16 for a matrix whose rows are not whole blocks).
    Q8_0,
    /// Q4_0, as `llama-quantize --pure` makes of the f16 file.
    Q4_0,
}

impl OutType {
    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            OutType::F16 => 1,
            OutType::Q4_0 => 2,
            OutType::Q8_0 => 7,
        }
    }
}

impl std::str::FromStr for OutType {
    type Err = String;

    fn from_str(s: &str) -> Result<OutType, String> {
        match s {
            "f16" => Ok(OutType::F16),
            "q8_0" => Ok(OutType::Q8_0),
            "q4_0" => Ok(OutType::Q4_0),
            _ => Err(format!("unknown output type {s:?} (f16, q8_0 or q4_0)")),
        }
    }
}

/// What to convert, and where to.
#[derive(Clone, Debug)]
pub struct ConvertParams<'a> {
    /// The Hugging Face model directory.
    pub model_dir: &'a Path,
    /// The GGUF file to write (replaced if it exists).
    pub out: &'a Path,
    /// The matrices' type.
    pub out_type: OutType,
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The GGUF architecture.
    pub arch: &'static str,
    /// Tensors written.
    pub n_tensors: usize,
    /// Parameters (elements of every tensor).
    pub n_params: u64,
    /// Length of the file.
    pub n_bytes: u64,
}

/// `FILE.partial` beside `FILE`: where [`convert`] writes before renaming.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Converts a model directory to a GGUF file. Everything is read and checked before the output is created; the
/// tensors are then converted and written one at a time.
pub fn convert(p: &ConvertParams<'_>) -> Result<Summary, ConvertError> {
    let dir = p.model_dir;
    let cfg = config::HfConfig::read(dir)?;
    refuse_reranker(&cfg, dir)?;
    let src = source::Source::open(dir)?;
    let plan_type = if p.out_type == OutType::Q4_0 { OutType::F16 } else { p.out_type };
    let mut plan = tensors::plan(&cfg, &src, plan_type)?;
    let n_params: u64 = plan.iter().map(tensors::OutTensor::n_elements).sum();

    let mut meta: Vec<(String, Gv)> = vec![
        ("general.architecture".into(), cfg.arch.name().into()),
        ("general.type".into(), "model".into()),
    ];
    meta.extend(metadata::general(dir, &cfg.raw, n_params));
    meta.extend(arch_metadata(&cfg, plan_type.file_type()));
    meta.push(("general.quantization_version".into(), Gv::U32(2)));
    meta.extend(vocab::vocab_metadata(&cfg, dir)?);
    if p.out_type == OutType::Q4_0 {
        // llama-quantize copies the f16 file's metadata, then sets these two again, which moves them last.
        meta.retain(|(k, _)| k != "general.quantization_version" && k != "general.file_type");
        meta.push(("general.quantization_version".into(), Gv::U32(2)));
        meta.push(("general.file_type".into(), Gv::U32(OutType::Q4_0.file_type())));
        plan = tensors::q4_0_plan(plan);
    }

    let mut w = GgufWriter::new();
    for (k, v) in meta {
        // gguf-py overwrites a repeated key in place.
        w.set_metadata(k, v)?;
    }
    for t in &plan {
        w.add_tensor(&t.name, t.ty, &t.dims)?;
    }
    let n_bytes = w.file_len()?;
    let tmp = partial_path(p.out);
    let res = write(w, &src, &plan, &tmp).and_then(|()| std::fs::rename(&tmp, p.out).map_err(io_err(p.out)));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Summary { arch: cfg.arch.name(), n_tensors: plan.len(), n_params, n_bytes })
}

fn write(
    w: GgufWriter<'_>,
    src: &source::Source,
    plan: &[tensors::OutTensor],
    tmp: &Path,
) -> Result<(), ConvertError> {
    let file = File::create(tmp).map_err(io_err(tmp))?;
    let mut out = w.begin(BufWriter::new(file))?;
    for t in plan {
        let bytes = tensors::tensor_bytes(src, t)?;
        out.write_tensor_data(&t.name, &bytes)?;
    }
    let file = out
        .finish()?
        .into_inner()
        .map_err(|e| ConvertError::Io { path: tmp.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(io_err(tmp))?;
    drop(file);
    Ok(())
}

/// The architecture's hyperparameters, in the order convert_hf_to_gguf.py writes them (`TextModel`'s, then
/// `general.file_type`, then llama's vocabulary size and RoPE dimensions).
fn arch_metadata(cfg: &config::HfConfig, file_type: u32) -> Vec<(String, Gv)> {
    let a = cfg.arch.name();
    let mut out: Vec<(String, Gv)> = Vec::new();
    let u = |v: &serde_json::Value| v.as_u64().map(|n| Gv::U32(n as u32));
    let f = |v: &serde_json::Value| v.as_f64().map(|x| Gv::F32(x as f32));
    let mut put = |key: &str, v: Option<Gv>| {
        if let Some(v) = v {
            out.push((format!("{a}.{key}"), v));
        }
    };
    put("block_count", Some(Gv::U32(cfg.n_layer as u32)));
    let ctx_keys = [
        "max_position_embeddings",
        "n_ctx",
        "n_positions",
        "max_length",
        "max_sequence_length",
        "model_max_length",
    ];
    put("context_length", cfg.find(&ctx_keys).and_then(u));
    put("embedding_length", cfg.find(&["hidden_size", "n_embd", "dim"]).and_then(u));
    let ff_keys =
        ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner"];
    put("feed_forward_length", cfg.find(&ff_keys).and_then(u));
    put("attention.head_count", cfg.find(&["num_attention_heads", "n_head", "n_heads"]).and_then(u));
    put("attention.head_count_kv", cfg.find(&["num_key_value_heads", "n_kv_heads"]).and_then(u));
    if cfg.hparams.get("is_causal").and_then(serde_json::Value::as_bool) == Some(false) {
        put("attention.causal", Some(Gv::Bool(false)));
    }
    if let config::RopeScaling::Linear(factor) = cfg.rope {
        put("rope.scaling.type", Some("linear".into()));
        put("rope.scaling.factor", Some(Gv::F32(factor as f32)));
    }
    put("rope.freq_base", cfg.rope_theta.map(|t| Gv::F32(t as f32)));
    put("attention.layer_norm_rms_epsilon", cfg.find(&["rms_norm_eps", "norm_eps"]).and_then(f));
    let eps_keys = ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"];
    put("attention.layer_norm_epsilon", cfg.find(&eps_keys).and_then(f));
    if let Some(hd) = cfg.hparams.get("head_dim").and_then(u) {
        put("attention.key_length", Some(hd.clone()));
        put("attention.value_length", Some(hd));
    }
    out.push(("general.file_type".into(), Gv::U32(file_type)));
    if cfg.arch == config::Arch::Llama {
        out.push((format!("{a}.vocab_size"), Gv::U32(cfg.n_vocab as u32)));
        out.push((format!("{a}.rope.dimension_count"), Gv::U32(cfg.head_dim as u32)));
    }
    out
}

/// Qwen3 rerankers are converted to a classifier head by the reference, which pinion does not run.
fn refuse_reranker(cfg: &config::HfConfig, dir: &Path) -> Result<(), ConvertError> {
    if cfg.arch != config::Arch::Qwen3 {
        return Ok(());
    }
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default().to_lowercase();
    let hints = [
        dir.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default(),
        cfg.raw.get("_name_or_path").and_then(|v| v.as_str()).unwrap_or("").to_lowercase(),
    ];
    if readme.contains("# qwen3-reranker")
        || readme.contains("# qwen3-vl-reranker")
        || hints.iter().any(|h| h.contains("qwen3-reranker") || h.contains("qwen3-vl-reranker"))
    {
        return Err(ConvertError::Unsupported { what: "Qwen3 reranker (a classifier head)".into() });
    }
    Ok(())
}

/// Reads a JSON file, a missing file being [`ConvertError::MissingFile`].
pub(crate) fn read_json(path: &Path, what: &'static str) -> Result<serde_json::Value, ConvertError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConvertError::MissingFile { path: path.to_path_buf(), what });
        }
        Err(e) => return Err(ConvertError::Io { path: path.to_path_buf(), source: e }),
    };
    serde_json::from_str(&text).map_err(|source| ConvertError::Json { path: path.to_path_buf(), source })
}
