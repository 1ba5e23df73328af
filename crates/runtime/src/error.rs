//! The error type of `pinion-runtime`.

use std::path::PathBuf;

/// What can go wrong loading a model or generating with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The plan of an offloaded run could not be made (a budget below the minimum names the minimum).
    #[error(transparent)]
    Plan(pinion_plan::PlanError),
    #[error("offloaded run: cannot open {} for direct reads: {source}", path.display())]
    OffloadOpen { path: PathBuf, source: pinion_io::OpenError },
    #[error("offloaded run: {what}: {source}")]
    OffloadSubmit { what: String, source: pinion_io::SubmitError },
    #[error("{}: reading {what}: {source}", path.display())]
    OffloadRead { path: PathBuf, what: String, source: pinion_io::ReadError },
    /// Bytes read from a prepared model do not match their recorded checksum: the file changed on disk or is
    /// damaged. `source` is `FormatError::Checksum`, naming the layer, neuron or row and the file offset.
    #[error("{}: {source}; the prepared model is damaged or changed on disk (prepare it again)", path.display())]
    Corrupt { path: PathBuf, source: pinion_format::FormatError },
    #[error(
        "{}: packed format version {version} records no checksums for the rows and tensors an offloaded run \
         reads; prepare the model again with this pinion (cargo xtask prepare)",
        path.display()
    )]
    NotVerifiable { path: PathBuf, version: u32 },
    #[error("offloaded run: {0}")]
    OffloadStopped(String),
    #[error("offloaded run: neuron cache: {0}")]
    Cache(#[from] pinion_cache::CacheError),
    #[error("dense executor: {0}")]
    Dense(#[from] pinion_exec_cpu::ExecError),
    #[error("model file {path} not found{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    ModelNotFound { path: PathBuf, hint: Option<String> },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: pinion_format::FormatError },
    #[error(transparent)]
    Metadata(#[from] pinion_format::FormatError),
    #[error(
        "architecture '{arch}' is not supported (pinion runs llama (and Mixtral), mistral, smollm, granite, qwen2, qwen3, qwen3moe and gemma3 models)"
    )]
    UnsupportedArchitecture { arch: String },
    /// The file asks for a computation pinion does not implement (named), rather than having it ignored.
    #[error("not supported: {what}")]
    Unsupported { what: String },
    #[error("bad hyper-parameter {key} = {value}")]
    BadHyperParameter { key: String, value: String },
    #[error("tensor '{name}': {why}")]
    BadTensor { name: String, why: String },
    #[error(
        "tensor '{name}' is {ty}, which pinion has no kernel for (weights it computes with: {})",
        supported_weight_types()
    )]
    UnsupportedWeightType { name: String, ty: pinion_format::GgmlType },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] pinion_tokenizer::TokenizerError),
    #[error(
        "context overflow: {prompt} prompt tokens + {generate} to generate = {} > context size {n_ctx} (raise -c or shorten the prompt)",
        prompt + generate
    )]
    ContextOverflow { prompt: usize, generate: usize, n_ctx: usize },
    #[error("context size {n_ctx} is invalid: {why}")]
    BadContextSize { n_ctx: usize, why: String },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("sequence {seq} does not exist (the context holds {n_seq}), or appears twice in one batch")]
    BadSequence { seq: usize, n_seq: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("cannot start {n} threads: {why}")]
    Threads { n: usize, why: String },
    #[error(
        "sparsity thresholds: got {got} layers, the model has {n_layers} (and each must be finite, >= 0)"
    )]
    BadThresholds { got: usize, n_layers: usize },
    #[error("sparsity scales: {why}")]
    BadScales { why: String },
    #[error(
        "activation profile has (FFN units, neurons) = {got:?}, the model has {want:?} (a mixture of experts is profiled per expert)"
    )]
    ProfileShape { got: (usize, usize), want: (usize, usize) },
    #[error("predictors: got {got} layers for a model of {n_layers}, or a predictor of the wrong width")]
    BadPredictors { got: usize, n_layers: usize },
    #[error("this needs a packed model (prepare one with `cargo xtask prepare`)")]
    NotPacked,
    #[error("a packed model cannot be profiled (its FFN is sparse); profile the GGUF it was made from")]
    ProfilePacked,
}

/// The weight types the CPU kernels compute with, for messages.
fn supported_weight_types() -> String {
    let types: Vec<String> = pinion_format::GgmlType::ALL
        .iter()
        .filter(|t| pinion_exec_cpu::vec_dot_type(**t).is_some())
        .map(|t| t.to_string())
        .collect();
    types.join(", ")
}
