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
        };
        match arch {
            "llama" | "mistral" | "smollm" | "granite" => Some(llama),
            "qwen2" => Some(ArchSpec { rope: RopeMode::Neox, qkv_bias: true, rope_factors: false, ..llama }),
            "qwen3" => Some(ArchSpec { rope: RopeMode::Neox, qk_norm: true, rope_factors: false, ..llama }),
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
    pub fn apply(self, gate: &mut [f32], up: &[f32], t: Option<&[f32]>) -> usize {
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
        let n_ff = bounded("feed_forward_length", MAX_WIDTH)?;
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
        if g.get(&key("expert_count")).is_some() {
            return Err(RuntimeError::UnsupportedArchitecture { arch: format!("{arch} with experts (MoE)") });
        }
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
        let floats =
            ub * (3 * d + d.max(qd) + 2 * qd + 2 * c.kv_dim() + 4 * c.n_ff) + c.n_vocab * self.n_seq.max(1);
        // f32 values, plus the quantized copy of the widest activation row.
        (4 * floats + ub * c.n_ff.max(d) * 2) as u64
    }
}
