//! The error type of `pinion-runtime`.

use std::path::PathBuf;

/// What can go wrong loading a model or generating with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(
        "memory budget {} is too small: this model needs at least {} ({detail}); raise --mem-budget to {} or more{}",
        mib(*budget), mib(*minimum), mib(*minimum), context_hint(*kv, *minimum)
    )]
    BudgetTooSmall {
        budget: u64,
        minimum: u64,
        detail: String,
        /// The KV cache's part of the minimum (the part a smaller context shrinks).
        kv: u64,
    },
    #[error("offloaded run: {0}")]
    Offload(String),
    #[error(transparent)]
    Plan(pinion_plan::PlanError),
    #[error("model file {path} not found{}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    ModelNotFound { path: PathBuf, hint: Option<String> },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: pinion_format::FormatError },
    #[error(transparent)]
    Metadata(#[from] pinion_format::FormatError),
    #[error("architecture '{arch}' is not supported (pinion runs llama-style models)")]
    UnsupportedArchitecture { arch: String },
    #[error("bad hyper-parameter {key} = {value}")]
    BadHyperParameter { key: String, value: String },
    #[error("tensor '{name}': {why}")]
    BadTensor { name: String, why: String },
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
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("cannot start {n} threads: {why}")]
    Threads { n: usize, why: String },
    #[error(
        "sparsity thresholds: got {got} layers, the model has {n_layers} (and each must be finite, >= 0)"
    )]
    BadThresholds { got: usize, n_layers: usize },
    #[error("activation profile has (layers, neurons) = {got:?}, the model has {want:?}")]
    ProfileShape { got: (usize, usize), want: (usize, usize) },
    #[error("predictors: got {got} layers for a model of {n_layers}, or a predictor of the wrong width")]
    BadPredictors { got: usize, n_layers: usize },
    #[error("this needs a packed model (prepare one with `cargo xtask prepare`)")]
    NotPacked,
    #[error("a packed model cannot be profiled (its FFN is sparse); profile the GGUF it was made from")]
    ProfilePacked,
}

/// `bytes` in MiB with one decimal, for messages.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// When the KV cache is a third or more of an offloaded run's minimum, the other way out: a smaller context.
fn context_hint(kv: u64, minimum: u64) -> String {
    match kv * 3 >= minimum {
        true => format!(", or lower the context with -c (its KV cache takes {})", mib(kv)),
        false => String::new(),
    }
}
