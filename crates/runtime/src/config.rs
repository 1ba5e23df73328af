//! Model hyper-parameters read from GGUF metadata.

use pinion_exec_cpu::RopeMode;
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
    /// FFN neurons per layer (per expert for a mixture of experts).
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
    /// The FFN's gated activation.
    pub ffn_act: FfnActivation,
    /// What the architecture computes beyond llama's block.
    pub spec: ArchSpec,
    /// Scale of the attention scores (applied to the queries when [`ArchSpec::scale_queries`]).
    pub attn_scale: f32,
    /// Sliding-window attention: the window in positions (the layers that use it: [`ModelConfig::window`]).
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer (the last of each group of `n`) attends globally, the others through the window.
    pub swa_pattern: usize,
    /// RoPE base of the sliding-window layers.
    pub rope_freq_base_swa: f32,
    /// Linear RoPE scaling: positions are multiplied by this (`1 / rope.scaling.factor`, 1 without scaling;
    /// the sliding-window layers are not scaled: [`ModelConfig::rope_scale`]).
    pub rope_freq_scale: f32,
    /// Mixture of experts: every layer's FFN is `n_expert` experts of `n_ff` neurons each, `n_expert_used` of
    /// them run per token (`None`: a dense FFN of `n_ff` neurons).
    pub moe: Option<MoeConfig>,
}

/// The mixture-of-experts hyper-parameters of a model (every layer routed, no shared experts), as llama.cpp's
/// `build_moe_ffn` computes them: router logits `ffn_gate_inp · x`, their softmax over the experts, the
/// `n_expert_used` most probable experts (ties in llama.cpp's `argsort` order), their probabilities
/// renormalized to sum to 1 where [`MoeConfig::norm_weights`], each chosen expert's SwiGLU FFN scaled by its
/// weight and the results added in the order of the choice (most probable first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts per layer (`{arch}.expert_count`).
    pub n_expert: usize,
    /// Experts each token runs (`{arch}.expert_used_count`).
    pub n_expert_used: usize,
    /// The chosen experts' probabilities are divided by their sum ([`MoeSpec::norm_weights`]).
    pub norm_weights: bool,
}

/// How an architecture's mixture-of-experts FFN is computed, where it has one (the arguments llama.cpp's
/// graph of the architecture passes to `build_moe_ffn`). The gating function is a softmax for every
/// architecture pinion runs; others are refused at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeSpec {
    /// Every layer is a mixture of experts: a file without `expert_count` is refused (qwen3moe). Otherwise the
    /// file chooses (llama: Mixtral when it has experts).
    pub required: bool,
    /// The chosen experts' probabilities are renormalized to sum to 1 (`norm_w`; true for llama and qwen3moe).
    pub norm_weights: bool,
    /// The experts' FFN width is `{arch}.expert_feed_forward_length`, else `feed_forward_length /
    /// expert_used_count` (qwen3moe); without this, `feed_forward_length` (llama).
    pub expert_ff_key: bool,
}

/// How an architecture's decoder block differs from llama's: the one place the loader and the forward pass
/// learn it (no `if arch == ...` in the forward pass). Hyper-parameters come from the GGUF metadata; this says
/// only which computations exist.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArchSpec {
    /// How RoPE pairs dimensions.
    pub rope: RopeMode,
    /// Embeddings are multiplied by `sqrt(d_model)` (Gemma).
    pub scale_embeddings: bool,
    /// Per-head RMS norms of the queries and keys before RoPE (`attn_q_norm`, `attn_k_norm`: Gemma 3, Qwen3).
    pub qk_norm: bool,
    /// Biases added to the query, key and value projections (`attn_q.bias`, ...: Qwen2).
    pub qkv_bias: bool,
    /// RoPE frequency factors from `rope_freqs.weight` when the file has them (Llama 3.1 and later).
    pub rope_factors: bool,
    /// RMS norms of the attention and FFN outputs before each residual add (`post_attention_norm`,
    /// `post_ffw_norm`: Gemma 2 and 3).
    pub post_norms: bool,
    /// The queries are scaled before attention and the scores are not (Gemma 3, as llama.cpp computes it).
    pub scale_queries: bool,
    /// Sliding-window attention where the file sets a window: every `n`-th layer (the last of each group of
    /// `n`) attends globally, the others through the window (Gemma 3: 6, unless the file says otherwise).
    pub swa_pattern: Option<usize>,
    /// The FFN activation when the file does not name one.
    pub ffn_act: FfnActivation,
    /// The architecture's turn format, for files that carry no chat template (Jinja, as Hugging Face's).
    pub chat_template: Option<&'static str>,
    /// The mixture-of-experts FFN the architecture may have (`None`: a file with experts is refused).
    pub moe: Option<MoeSpec>,
}

/// Gemma's turn format (as Google's template: a system message opens the first user turn, the assistant is
/// `model`). The BOS token is left to the tokenizer, which adds it to every Gemma prompt.
const GEMMA_TEMPLATE: &str = "{% if messages and messages[0]['role'] == 'system' %}\
{% set system = messages[0]['content'] | trim ~ '\n\n' %}{% set turns = messages[1:] %}\
{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}\
{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}\
{{ '<start_of_turn>' ~ role ~ '\n' ~ (system if loop.first else '') ~ message['content'] | trim ~ '<end_of_turn>\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

impl ArchSpec {
    /// The architectures pinion runs, by `general.architecture`.
    pub fn of(arch: &str) -> Option<ArchSpec> {
        let llama = ArchSpec {
            rope: RopeMode::Norm,
            scale_embeddings: false,
            qk_norm: false,
            qkv_bias: false,
            rope_factors: true,
            post_norms: false,
            scale_queries: false,
            swa_pattern: None,
            ffn_act: FfnActivation::Silu,
            chat_template: None,
            moe: None,
        };
        let qwen3 = ArchSpec { rope: RopeMode::Neox, qk_norm: true, rope_factors: false, ..llama };
        match arch {
            // Mixtral is a llama file with experts (llama.cpp: `norm_w` true, softmax gating).
            "llama" => Some(ArchSpec {
                moe: Some(MoeSpec { required: false, norm_weights: true, expert_ff_key: false }),
                ..llama
            }),
            "mistral" | "smollm" | "granite" => Some(llama),
            "qwen2" => Some(ArchSpec { rope: RopeMode::Neox, qkv_bias: true, rope_factors: false, ..llama }),
            "qwen3" => Some(qwen3),
            "qwen3moe" => Some(ArchSpec {
                moe: Some(MoeSpec { required: true, norm_weights: true, expert_ff_key: true }),
                ..qwen3
            }),
            "gemma3" => Some(ArchSpec {
                rope: RopeMode::Neox,
                scale_embeddings: true,
                qk_norm: true,
                qkv_bias: false,
                rope_factors: false,
                post_norms: true,
                scale_queries: true,
                swa_pattern: Some(6),
                ffn_act: FfnActivation::Gelu,
                chat_template: Some(GEMMA_TEMPLATE),
                moe: None,
            }),
            _ => None,
        }
    }
}

/// The gated activation of a llama-style FFN: `down · (act(gate · x) ⊙ up · x)`.
///
/// Read from the key `pinion.ffn_activation` (written by pinion's synthetic models; absent means SiLU, which is
/// what llama.cpp runs for every `llama` model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnActivation {
    /// SwiGLU: `silu(gate) ⊙ up`. Dense; sparsity comes from thresholds (CATS).
    Silu,
    /// GeGLU: `gelu(gate) ⊙ up` (tanh approximation, as ggml computes it). Dense, as SiLU.
    Gelu,
    /// ReGLU: `relu(gate) ⊙ up`. A neuron is active when its gate is positive.
    Relu,
    /// dReLU (TurboSparse): `relu(gate) ⊙ relu(up)`. Active when both are positive.
    Drelu,
}

/// Values of a batch's FFN activations per parallel task (about 64 KiB of gates).
const PAR_ACT_CHUNK: usize = 16384;

impl FfnActivation {
    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FfnActivation::Silu => "silu",
            FfnActivation::Gelu => "gelu",
            FfnActivation::Relu => "relu",
            FfnActivation::Drelu => "drelu",
        }
    }

    /// Parses [`FfnActivation::name`].
    pub fn from_name(s: &str) -> Option<FfnActivation> {
        match s {
            "silu" => Some(FfnActivation::Silu),
            "gelu" => Some(FfnActivation::Gelu),
            "relu" => Some(FfnActivation::Relu),
            "drelu" => Some(FfnActivation::Drelu),
            _ => None,
        }
    }

    /// Whether the activation is exactly zero for most inputs (ReLU family): then a neuron is active when its
    /// score is above 0 and needs no calibrated threshold.
    pub fn is_relu_family(self) -> bool {
        !matches!(self, FfnActivation::Silu | FfnActivation::Gelu)
    }

    /// A neuron's *score* for gate and up pre-activations `g`, `u`: the magnitude a threshold is compared with.
    /// SiLU: `|silu(g)|`; GELU: `|gelu(g)|`; ReLU: `relu(g)`; dReLU: `relu(min(g, u))` (zero unless both are
    /// positive).
    #[inline]
    pub fn score(self, g: f32, u: f32) -> f32 {
        match self {
            FfnActivation::Silu => pinion_exec_cpu::silu_ggml(g).abs(),
            FfnActivation::Gelu => pinion_exec_cpu::gelu_ggml(g).abs(),
            FfnActivation::Relu => g.max(0.0),
            FfnActivation::Drelu => g.min(u).max(0.0),
        }
    }

    /// Whether a neuron with score `s` is active under threshold `t`: `s >= t` for SiLU and GELU (CATS), `s > t`
    /// for the ReLU family (so that `t = 0` is the activation's own sparsity).
    #[inline]
    pub fn is_active(self, s: f32, t: f32) -> bool {
        if self.is_relu_family() { s > t } else { s >= t }
    }

    /// Applies the gated activation in place (`gate` becomes the FFN's hidden activations), zeroing neurons
    /// that are not active under thresholds `t` (`None`: dense): one per neuron of a row (`gate` is rows of
    /// `t.len()`), or one for all. Returns the number of active (neuron, token) pairs.
    ///
    /// Called on a worker of a rayon pool (a batch pass runs inside its context's pool), a large call is
    /// split over that pool in chunks of whole threshold rows and whole groups of 16 (where ggml's SIMD SiLU
    /// and its scalar tail meet), so every value is computed as in one call. Elsewhere (a decode step, whose
    /// threads are the spin pool's) it runs on the calling thread: never on rayon's global pool.
    pub fn apply(self, gate: &mut [f32], up: &[f32], t: Option<&[f32]>) -> usize {
        use rayon::prelude::*;
        let row = t.map_or(1, |t| t.len().max(1));
        let chunk = 16 * row * (PAR_ACT_CHUNK / (16 * row)).max(1);
        let in_pool = rayon::current_thread_index().is_some();
        if !in_pool || gate.len() < 2 * chunk || gate.len() != up.len() {
            return self.apply_serial(gate, up, t);
        }
        gate.par_chunks_mut(chunk).zip(up.par_chunks(chunk)).map(|(g, u)| self.apply_serial(g, u, t)).sum()
    }

    fn apply_serial(self, gate: &mut [f32], up: &[f32], t: Option<&[f32]>) -> usize {
        match (self, t) {
            (FfnActivation::Silu, None) => {
                pinion_exec_cpu::swiglu_ggml(gate, up);
                gate.len()
            }
            (FfnActivation::Silu, Some(t)) => pinion_exec_cpu::swiglu_threshold(gate, up, t),
            (FfnActivation::Gelu, None) => {
                pinion_exec_cpu::geglu_ggml(gate, up);
                gate.len()
            }
            (FfnActivation::Gelu, Some(t)) => pinion_exec_cpu::geglu_threshold(gate, up, t),
            (act, t) => {
                let t = t.unwrap_or(&[0.0]);
                assert!(!t.is_empty() && gate.len() % t.len() == 0, "thresholds for whole rows");
                let mut active = 0;
                for (i, (g, &u)) in gate.iter_mut().zip(up).enumerate() {
                    if act.is_active(act.score(*g, u), t[i % t.len()]) {
                        *g = g.max(0.0) * if act == FfnActivation::Drelu { u.max(0.0) } else { u };
                        active += 1;
                    } else {
                        *g = 0.0;
                    }
                }
                active
            }
        }
    }
}

/// The metadata key naming the FFN activation (see [`FfnActivation`]).
pub const FFN_ACTIVATION_KEY: &str = pinion_format::synth::ACTIVATION_KEY;

/// Upper bounds on hyper-parameters, so a corrupt file cannot ask for absurd allocations.
const MAX_LAYERS: u64 = 1024;
const MAX_WIDTH: u64 = 1 << 20;
const MAX_HEADS: u64 = 4096;

impl ModelConfig {
    /// Reads the config of a model of a supported architecture ([`ArchSpec::of`]) from its GGUF metadata.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<ModelConfig, RuntimeError> {
        let arch = g.get_str("general.architecture")?.to_string();
        let Some(spec) = ArchSpec::of(&arch) else {
            return Err(RuntimeError::UnsupportedArchitecture { arch });
        };
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
        let moe = moe_config(g, &arch, spec.moe)?;
        let n_ff = match moe {
            // qwen3moe: the experts' width, else the FFN width shared among the used experts (as llama.cpp).
            Some(m) if spec.moe.is_some_and(|s| s.expert_ff_key) => {
                let k = key("expert_feed_forward_length");
                if g.get(&k).is_some() && g.get_u64(&k)? != 0 {
                    bounded("expert_feed_forward_length", MAX_WIDTH)?
                } else {
                    match bounded("feed_forward_length", MAX_WIDTH)? / m.n_expert_used {
                        0 => {
                            return Err(RuntimeError::BadHyperParameter {
                                key: k,
                                value: "absent, and feed_forward_length / expert_used_count is 0".into(),
                            });
                        }
                        n => n,
                    }
                }
            }
            _ => bounded("feed_forward_length", MAX_WIDTH)?,
        };
        let n_heads = bounded("attention.head_count", MAX_HEADS)?;
        let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(_) => bounded("attention.head_count_kv", MAX_HEADS)?,
            None => n_heads,
        };
        // The head size is the key length where the file gives one (Gemma 3: 256 with a width of 640 and 4
        // heads), else the width over the heads.
        let head_dim = match g.get(&key("attention.key_length")) {
            Some(_) => bounded("attention.key_length", MAX_WIDTH)?,
            None if d_model % n_heads == 0 => d_model / n_heads,
            None => 0,
        };
        if head_dim == 0 || n_heads % n_kv_heads != 0 {
            return Err(RuntimeError::BadHyperParameter {
                key: key("attention.head_count"),
                value: format!("{n_heads} heads, {n_kv_heads} KV heads, width {d_model}"),
            });
        }
        if g.get(&key("attention.value_length")).is_some()
            && bounded("attention.value_length", MAX_WIDTH)? != head_dim
        {
            return Err(RuntimeError::Unsupported {
                what: format!("{} differing from the key length {head_dim}", key("attention.value_length")),
            });
        }
        let n_rot = match g.get(&key("rope.dimension_count")) {
            Some(_) => bounded("rope.dimension_count", head_dim as u64)?,
            None => head_dim,
        };
        let rope_freq_base = match g.get(&key("rope.freq_base")) {
            Some(_) => g.get_f32(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let rope_freq_scale = rope_freq_scale(g, &arch)?;
        let rms_eps = g.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let n_vocab = match g.get(&key("vocab_size")) {
            Some(_) => bounded("vocab_size", MAX_WIDTH * 4)?,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let n_ctx_train = bounded("context_length", 1 << 24)?;
        let name = g.get_str("general.name").ok().map(str::to_string);
        let ffn_act = match g.get(FFN_ACTIVATION_KEY) {
            None => spec.ffn_act,
            Some(_) => {
                let s = g.get_str(FFN_ACTIVATION_KEY)?;
                FfnActivation::from_name(s).ok_or_else(|| RuntimeError::BadHyperParameter {
                    key: FFN_ACTIVATION_KEY.into(),
                    value: format!("{s:?} (expected silu, gelu, relu or drelu)"),
                })?
            }
        };
        refuse_unimplemented(g, &arch)?;
        let sliding_window = match spec.swa_pattern {
            // As llama.cpp: no window (or 0) means every layer attends globally.
            Some(_) => match g.get(&key("attention.sliding_window")) {
                Some(_) if g.get_u64(&key("attention.sliding_window"))? == 0 => None,
                Some(_) => Some(bounded("attention.sliding_window", 1 << 24)?),
                None => None,
            },
            // Architectures without sliding-window layers: llama.cpp ignores a window their files may carry
            // (Mistral v0.1's in llama files, Qwen2's unused one), and so does pinion.
            None => None,
        };
        let swa_pattern = match g.get(&key("attention.sliding_window_pattern")) {
            None => spec.swa_pattern.unwrap_or(0),
            Some(_) => match g.get_u64(&key("attention.sliding_window_pattern")) {
                Ok(n) if n > 0 && n <= MAX_LAYERS => n as usize,
                _ => {
                    return Err(RuntimeError::Unsupported {
                        what: format!(
                            "{} other than a positive period",
                            key("attention.sliding_window_pattern")
                        ),
                    });
                }
            },
        };
        let rope_freq_base_swa = match g.get(&key("rope.freq_base_swa")) {
            Some(_) => g.get_f32(&key("rope.freq_base_swa"))?,
            // llama.cpp's default base of local layers.
            None => 10000.0,
        };
        // As llama.cpp: Gemma 3 27B (62 layers) scales by the width per head, the others by the head size.
        let attn_scale = match (spec.scale_queries, n_layers) {
            (true, 62) => 1.0 / ((d_model / n_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
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
            ffn_act,
            spec,
            attn_scale,
            sliding_window,
            swa_pattern,
            rope_freq_base_swa,
            rope_freq_scale,
            moe,
        })
    }

    /// The sliding window layer `l` attends through (`None`: the whole context).
    pub fn window(&self, l: usize) -> Option<usize> {
        match self.swa_pattern {
            n if n > 0 && (l + 1) % n != 0 => self.sliding_window,
            _ => None,
        }
    }

    /// The linear RoPE scaling of layer `l` (as llama.cpp, none on sliding-window layers).
    pub fn rope_scale(&self, l: usize) -> f32 {
        match self.window(l) {
            Some(_) => 1.0,
            None => self.rope_freq_scale,
        }
    }

    /// The RoPE base of layer `l`.
    pub fn rope_base(&self, l: usize) -> f32 {
        match self.window(l) {
            Some(_) => self.rope_freq_base_swa,
            None => self.rope_freq_base,
        }
    }

    /// Experts per layer: `n_expert` of a mixture of experts, 1 for a dense FFN.
    pub fn experts_per_layer(&self) -> usize {
        self.moe.map_or(1, |m| m.n_expert)
    }

    /// The FFN units: what sparsity rules, profiles, predictors, packed files and plans are kept per. One per
    /// layer for a dense FFN, one per (layer, expert) for a mixture of experts, unit `l * n_expert + e`
    /// ([`ModelConfig::unit`]).
    pub fn n_units(&self) -> usize {
        self.n_layers * self.experts_per_layer()
    }

    /// The FFN unit of expert `e` of layer `l` (`e` = 0 for a dense layer).
    pub fn unit(&self, l: usize, e: usize) -> usize {
        l * self.experts_per_layer() + e
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// The linear RoPE scaling of a file, as llama.cpp reads it: `1 / factor`, the factor from
/// `rope.scaling.factor` or else the older `rope.scale_linear`, 1 when neither is given (or is 0). A negative
/// or non-finite factor is refused.
fn rope_freq_scale(g: &Gguf<'_>, arch: &str) -> Result<f32, RuntimeError> {
    let key = |k: &str| format!("{arch}.{k}");
    let mut factor = 0.0;
    for k in ["rope.scaling.factor", "rope.scale_linear"] {
        if g.get(&key(k)).is_some() {
            factor = g.get_f32(&key(k))?;
            if !(factor.is_finite() && factor >= 0.0) {
                return Err(RuntimeError::Unsupported {
                    what: format!("RoPE scaling factor {factor} ({})", key(k)),
                });
            }
            break;
        }
    }
    Ok(if factor == 0.0 { 1.0 } else { 1.0 / factor })
}

/// Most experts per layer (llama.cpp's `LLAMA_MAX_EXPERTS`).
const MAX_EXPERTS: u64 = 1024;

/// Mixture-of-experts metadata pinion does not implement, refused by name when present with other than its
/// neutral value (0, or 1 for the expert group counts: one group is no grouping): what each asks for.
const MOE_UNIMPLEMENTED: &[(&str, &str)] = &[
    ("expert_shared_count", "shared experts"),
    ("expert_shared_feed_forward_length", "shared experts"),
    ("expert_group_count", "expert groups"),
    ("expert_group_used_count", "expert groups"),
    ("leading_dense_block_count", "leading dense layers"),
    ("moe_every_n_layers", "dense layers between expert layers"),
    ("interleave_moe_layer_step", "dense layers between expert layers"),
    ("expert_chunk_feed_forward_length", "chunked experts"),
    ("expert_latent_length", "latent experts"),
    ("moe_latent_size", "latent experts"),
    ("swiglu_clamp_exp", "clamped expert SwiGLU"),
    ("router_logit_softcapping", "router logit soft-capping"),
    ("expert_group_scale", "expert group scaling"),
];

/// The mixture of experts of a file (`None`: dense), checked against what the architecture computes
/// (`spec`): refused by name when the architecture has none, when it needs one and the file has none, or when
/// the file asks for routing pinion does not implement (shared experts, expert groups, a gating function
/// other than softmax, weights scaled or not renormalized where llama.cpp would, ...).
fn moe_config(g: &Gguf<'_>, arch: &str, spec: Option<MoeSpec>) -> Result<Option<MoeConfig>, RuntimeError> {
    let key = |k: &str| format!("{arch}.{k}");
    // llama.cpp reads an expert count of 0 as a dense model.
    let n_expert = match g.get(&key("expert_count")) {
        Some(_) => g.get_u64(&key("expert_count"))?,
        None => 0,
    };
    let Some(spec) = spec else {
        if n_expert > 0 {
            return Err(RuntimeError::UnsupportedArchitecture { arch: format!("{arch} with experts (MoE)") });
        }
        return Ok(None);
    };
    if n_expert == 0 {
        if spec.required {
            return Err(RuntimeError::BadHyperParameter {
                key: key("expert_count"),
                value: format!("{n_expert} (absent or 0; {arch} needs experts)"),
            });
        }
        return Ok(None);
    }
    let bad = |k: &str, value: String| RuntimeError::BadHyperParameter { key: key(k), value };
    if !(2..=MAX_EXPERTS).contains(&n_expert) {
        return Err(bad("expert_count", format!("{n_expert} (expected 2 to {MAX_EXPERTS})")));
    }
    let used = match g.get(&key("expert_used_count")) {
        Some(pinion_format::Value::Array(_)) => {
            return Err(RuntimeError::Unsupported {
                what: format!(
                    "a number of used experts per layer ({} is an array)",
                    key("expert_used_count")
                ),
            });
        }
        Some(_) => g.get_u64(&key("expert_used_count"))?,
        None => 0,
    };
    if used == 0 || used > n_expert {
        return Err(bad("expert_used_count", format!("{used} (expected 1 to expert_count, {n_expert})")));
    }
    for &(k, what) in MOE_UNIMPLEMENTED {
        let Some(v) = g.get(&key(k)) else { continue };
        let neutral = match v.as_f64() {
            Some(x) => x == 0.0 || (k.starts_with("expert_group_") && x == 1.0),
            None => false,
        };
        if !neutral {
            return Err(RuntimeError::Unsupported { what: format!("{what} ({})", key(k)) });
        }
    }
    // llama.cpp passes llama and qwen3moe's graphs a fixed softmax gating and renormalization; a file asking
    // for other routing was made for another model, whose outputs pinion would not reproduce.
    if let Some(v) = g.get(&key("expert_gating_func")) {
        if v.as_u64() != Some(1) {
            return Err(RuntimeError::Unsupported {
                what: format!(
                    "expert gating function {v:?} other than softmax ({})",
                    key("expert_gating_func")
                ),
            });
        }
    }
    if g.get(&key("expert_weights_norm")).is_some()
        && g.get_bool(&key("expert_weights_norm"))? != spec.norm_weights
    {
        return Err(RuntimeError::Unsupported {
            what: format!(
                "expert weights {}normalized, which {arch} does not do ({})",
                if spec.norm_weights { "not " } else { "" },
                key("expert_weights_norm")
            ),
        });
    }
    if let Some(v) = g.get(&key("expert_weights_scale")) {
        let s = v.as_f64();
        if s != Some(0.0) && s != Some(1.0) {
            return Err(RuntimeError::Unsupported {
                what: format!("expert weights scaled by {v:?} ({})", key("expert_weights_scale")),
            });
        }
    }
    Ok(Some(MoeConfig {
        n_expert: n_expert as usize,
        n_expert_used: used as usize,
        norm_weights: spec.norm_weights,
    }))
}

/// Refuses, by name, metadata for computations pinion does not implement (rather than ignoring them): RoPE
/// scaling other than none or linear (YaRN, LongRoPE, ...), and logit soft-capping.
fn refuse_unimplemented(g: &Gguf<'_>, arch: &str) -> Result<(), RuntimeError> {
    let key = |k: &str| format!("{arch}.{k}");
    if g.get(&key("rope.scaling.type")).is_some() {
        let ty = g.get_str(&key("rope.scaling.type"))?;
        if ty != "none" && ty != "linear" {
            let factor = match g.get(&key("rope.scaling.factor")) {
                Some(_) => g.get_f32(&key("rope.scaling.factor"))?,
                None => 1.0,
            };
            return Err(RuntimeError::Unsupported {
                what: format!("RoPE scaling {ty:?} (factor {factor}, {})", key("rope.scaling.type")),
            });
        }
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if g.get(&key(k)).is_some() {
            return Err(RuntimeError::Unsupported { what: format!("logit soft-capping ({})", key(k)) });
        }
    }
    Ok(())
}

/// Largest number of tokens evaluated in one forward pass (llama.cpp's default `n_ubatch`).
pub const DEFAULT_UBATCH: usize = 512;

/// Settings of a [`Context`](crate::Context).
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Context size in tokens (KV cache rows).
    pub n_ctx: usize,
    /// Compute threads.
    pub n_threads: usize,
    /// Most tokens per forward pass; longer inputs are split.
    pub n_ubatch: usize,
    /// The executor of dense batched products (prefill, perplexity).
    pub dense: DenseChoice,
    /// Offloaded runs: check every byte read from storage against its checksum before use (on by default; off
    /// only to measure what the checks cost).
    pub verify_reads: bool,
    /// Sequences the context holds at once, each with its own KV cache of `n_ctx` tokens (a server's parallel
    /// requests, decoded together by [`Context::decode_batch`](crate::Context::decode_batch)).
    pub n_seq: usize,
}

/// Which executor runs a context's dense batched products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenseChoice {
    /// The CPU kernels (`pinion_exec_cpu::CpuDense`).
    #[default]
    Cpu,
    /// The NPU-role static-shape executor (`pinion_exec_npu::NpuDense`: graphs compiled per shape and static
    /// batch, bit-identical to the CPU path; on this CPU it runs the same kernels).
    Npu,
}

impl ContextParams {
    /// Settings for a context of `n_ctx` tokens on `n_threads` threads, with the default batch size.
    pub fn new(n_ctx: usize, n_threads: usize) -> ContextParams {
        ContextParams {
            n_ctx,
            n_threads,
            n_ubatch: DEFAULT_UBATCH,
            dense: DenseChoice::Cpu,
            verify_reads: true,
            n_seq: 1,
        }
    }

    /// Bytes of the KV caches of full contexts (f16 keys and values for every layer, of every sequence).
    pub fn kv_bytes(&self, c: &ModelConfig) -> u64 {
        (2 * 2 * c.n_layers * self.n_ctx * c.kv_dim() * self.n_seq.max(1)) as u64
    }

    /// Bytes of the scratch buffers (activations, logits) a context allocates.
    pub fn scratch_bytes(&self, c: &ModelConfig) -> u64 {
        let ub = self.n_ubatch.clamp(1, self.n_ctx.max(1)).max(self.n_seq);
        let (d, qd) = (c.d_model, c.n_heads * c.head_dim);
        // A mixture of experts also keeps per token its router logits, chosen experts and weights, the chosen
        // experts' outputs, and a gathered input row.
        let moe = c.moe.map_or(0, |m| m.n_expert + m.n_expert_used * (d + 2) + d);
        let floats = ub * (3 * d + d.max(qd) + 2 * qd + 2 * c.kv_dim() + 4 * c.n_ff + moe)
            + c.n_vocab * self.n_seq.max(1);
        // f32 values, plus the quantized copy of the widest activation row.
        (4 * floats + ub * c.n_ff.max(d) * 2) as u64
    }
}
