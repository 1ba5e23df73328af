//! The pinion runtime: turns a model file into text. It assembles a llama-style model from a memory-mapped GGUF
//! file or a packed neuron-major file ([`Model`]), holds one sequence's KV cache and scratch buffers
//! ([`Context`], the main type), runs the forward pass on the CPU kernels of `pinion-exec-cpu` (a packed FFN
//! sparsely, choosing neurons by thresholds and predictors), samples tokens ([`Sampler`]) and drives generation
//! ([`generate`]), perplexity ([`perplexity()`]) and llama-bench-style speed tests ([`run_bench`]). Under a
//! memory budget it runs the plan `pinion-plan` makes for the run ([`planning`]).
//!
//! This crate is online only: it does not prepare models (that is `pinion-prepare`), parse files
//! (`pinion-format`), hold kernels (`pinion-exec-cpu`) or touch the terminal (the `pinion` binary does the
//! printing). It is the only crate that schedules threads.
#![deny(unsafe_code)]

mod bench;
mod config;
mod context;
mod error;
mod ffn;
mod forward;
mod generate;
mod model;
mod moe;
mod offload;
mod perplexity;
pub mod planning;
mod rule;
mod sampler;

pub use crate::bench::{BenchResult, BenchTest, random_tokens, run_bench};
pub use crate::config::{
    ArchSpec, ContextParams, DEFAULT_UBATCH, DenseChoice, FFN_ACTIVATION_KEY, FfnActivation, ModelConfig,
    MoeConfig, MoeSpec,
};
pub use crate::context::{Context, OFFLOAD_CHUNK};
pub use crate::error::RuntimeError;
pub use crate::forward::Logits;
pub use crate::generate::{GenerateParams, Generation, StopReason, TextStream, Timings, generate};
pub use crate::model::{
    MAX_PPL_INCREASE_KEY, Model, ModelSparsity, PACKED_FILE_NAME, PPL_INCREASE_KEY, PREDICTED_DENSITY_KEY,
    PREDICTOR_THRESHOLDS_KEY, ROUTE_FREQUENCY_KEY, SCORE_SCALE_TENSOR, SOURCE_BYTES_KEY, TARGET_SPARSITY_KEY,
    THRESHOLDS_KEY, predictor_tensor_names, score_scale_tensor,
};
pub use crate::moe::RouteTrace;
pub use crate::offload::OffloadStats;
pub use crate::perplexity::{PerplexityStats, perplexity};
pub use crate::rule::FfnRule;
pub use crate::sampler::{Sampler, SamplerParams, argmax};
pub use pinion_cache::CacheStats;
pub use pinion_plan::{Budget, CachePolicy, DeviceProfile, Plan, PlanOptions};
pub use pinion_predictor::ActivationProfile;
pub use pinion_tokenizer::{ChatMessage, Tokenizer};
