//! Synthetic llama-style GGUF models with random weights and planted activation skew, for testing and
//! benchmarking the sparse FFN path without downloading a model.
//!
//! [`write_model`] streams a model described by a [`SynthConfig`] to any `impl Write`, tensor by tensor and
//! row by row, so that the 7B shape (about 3.8 GB in Q4_0) is written with a buffer of one row. The file has
//! the metadata, tokenizer and tensor names llama.cpp's `llama` loader expects, so llama.cpp loads and runs it.
//! llama.cpp ignores the custom key `pinion.ffn_activation` (`relu`, `drelu` or `silu`) and always runs a llama
//! model with SiLU: its output is then meaningless, but its speed is that of a real model of the same shape,
//! which is what the file is for. Checked with llama.cpp build 0c1e570 (`llama-bench -p 16 -n 16`,
//! `llama-completion -p hello -n 8`): the tiny, small and 7b shapes, Q4_0 and F32, dense and MoE all load and run
//! (7b is reported as `llama 7B Q4_0`, 6.74 B parameters); so do the `mixtral-47b` (2 layers, `llama ?B Q4_0`)
//! and `qwen3-30b-a3b` (4 layers, `qwen3moe ?B Q4_0`) shapes written with fewer layers (`llama-bench -p 16 -n 16`,
//! `llama-simple -n 8 hello`).
//!
//! # The planted skew
//!
//! Real ReLU models (TurboSparse, ProSparse) show a power law of neuron activation frequency: a few hot neurons
//! fire for most tokens, most neurons rarely. The construction plants that, in closed form:
//!
//! * Dimension 0 of the residual stream is a constant *bias channel*: every token embedding has the value
//!   `B = bias_scale · √d` in dimension 0 and independent uniform values of variance 1 in the others. After
//!   RMSNorm (norm weights are 1) a token's input is `x = e / rms(e)`, with `x₀ = B / rms(e)`.
//! * The output projections (`attn_output`, `ffn_down`) are small (standard deviation `out_scale / √fan_in`),
//!   so each layer adds little to the residual and the bias channel survives RMSNorm through the layers.
//! * Each layer (and each expert) has target frequencies `f_i = min(f_max, c · (rank_i + 1)^-alpha)`, where
//!   `rank` is a random permutation of the neuron ids and `c` is solved for so that the mean of `f` is
//!   `density` (the planted fraction of active neurons).
//! * Gate row `i` is random except for its weight on dimension 0: off the bias channel it is a random
//!   combination of `gate_rank` directions shared by the layer plus a little independent noise (`gate_noise` of
//!   the squared norm), scaled to the norm of a uniform row of standard deviation `σ = 1/√d`. The low rank is
//!   the learnable structure: a predictor that sees those few directions knows the gates, as real models'
//!   activations are predictable from a low-rank projection (Deja Vu, PowerInfer). Its weight on dimension 0 is
//!   `w_i0 = σ · √(d-1) · Φ⁻¹(f_i) / B`. For a random token, `Σ_{j≥1} w_ij x_j` is close to normal with standard
//!   deviation `σ √(d-1) / rms(e)`, and `w_i0 x₀ = σ √(d-1) Φ⁻¹(f_i) / rms(e)`: the `rms` cancels and
//!   `P(gate_i · x > 0) = Φ(Φ⁻¹(f_i)) = f_i`. ([`probit`] is `Φ⁻¹`.)
//! * ReLU: neuron `i` is active when `gate_i · x > 0`, with frequency `f_i`. dReLU (`relu(gate) · relu(up)`):
//!   gate and up rows are both planted with `√f_i`, so that both are positive with frequency about `f_i`.
//!   SiLU: the gate is planted the same way, so `|silu(gate_i · x)|` is large for the hot neurons and small
//!   for the cold ones, a skew a threshold (CATS) can exploit.
//!
//! The exact frequencies are perturbed by Q4_0 quantization and, beyond layer 0, by what the layers add to the
//! residual stream; tests measure layer 0 against the targets.
//!
//! # The planted routing (mixtures of experts)
//!
//! A mixture of experts (`n_experts > 0`, architecture `llama` as Mixtral or `qwen3moe`) plants two routing
//! statistics, the same in every layer up to a per-layer permutation of the experts ([`expert_ranks`]):
//! first-choice popularity `p_r ∝ (r+1)^-expert_zipf` by rank `r` ([`expert_targets`]; Zipf 0.5 makes the most
//! popular of 8 experts 2.83 times as popular as the least), and the probability `expert_repeat` that consecutive
//! tokens share their first choice. Each expert's neurons get their own planted power law, as above.
//!
//! * The `head_dim` *routed dimensions* [`routed_dims`] (from 32, past the bias channel's Q4_0 block, which is
//!   zero in the embeddings) are the only ones the router reads; gate and up rows leave them (and the bias
//!   block) out, so routing and neuron activity are independent. Every embedding's token-specific part is scaled
//!   to the same RMS, so that the normalized bias channel `x₀ = B / rms` is the same for every token.
//! * Router row `e` is `s · u_e` on the routed dimensions, the `u_e` orthonormal (hence `n_experts ≤ head_dim`),
//!   plus a weight on the bias channel making the logit offset `o_rank(e)` in units of the standard deviation of
//!   the token-specific part. For independent isotropic token features the logits are then `o_r + g_r` with `g`
//!   independent (close to) standard normals, and up to the common RMS that divides every logit (which does not
//!   change their order) `P(first choice = r) = ∫ φ(y - o_r) Π_{j≠r} Φ(y - o_j) dy`. [`RoutingPlan`] solves for
//!   the offsets at write time by the damped fixed-point iteration `o_r += ln(p_r / P_r(o)) / √(2 ln n)`,
//!   computing the integral by quadrature, to a relative 1e-6.
//! * Independent token embeddings repeat the first choice `Σ p²` of the time (0.142 for 8 experts, 0.012 for
//!   128). For more, the routed features of token `t` are made `u_t + Σ_i c_i u_{t-i}` by *shift heads* in layer
//!   0: query head `i-1` attends to the token `i` positions back, its KV head's values copy the routed dimensions
//!   of the normalized input, and its output projection adds them back, times `c_i · rms`, to the same
//!   dimensions. Its query and key read only the bias channel, so its scores depend on positions only: with RoPE
//!   angles `θ_j` per pair, the key puts amplitude `a` on the first component of the `J` highest-frequency pairs
//!   and the query `R(-i θ_j)` of that, so the score at distance `Δ` is `peak · mean_j cos((i - Δ) θ_j)`, largest
//!   at `Δ = i`. `J` is chosen at write time to make the largest other value over the context (`κ`, about 0.8)
//!   smallest, and `peak = 12 / (1 - κ)` (the scale of `a` without Q/K norms; with qwen3moe's Q/K norms, norm
//!   weights `√(peak / √head_dim)` on the used pairs of layer 0), so every other position gets at most `e^-12`
//!   of the lag's weight. With equal gains `c` on `K` lags the features' lag-1 correlation is `(c + (K-1) c²) /
//!   (1 + K c²)`, at most `K / (K+1)`; [`RoutingPlan`] finds the correlation `ρ` that gives `expert_repeat` on the
//!   Gaussian model (Monte Carlo, [`REPEAT_SAMPLES`] token pairs with the same draws for every `ρ`, bisection),
//!   then the fewest lags that reach it and their gain. Mixtral's shape (8 experts): `ρ` 0.315, one head of gain
//!   0.355; Qwen3-30B-A3B's (128 experts): `ρ` 0.727, three heads of gain 0.861. The shift heads are in layer 0
//!   only: the later layers' small outputs leave the mix in the residual stream for every later router, whereas
//!   shift heads in every layer would compound it layer after layer.

use std::io::{self, Write};

mod routing;

pub use self::routing::{REPEAT_SAMPLES, RoutingPlan};
use crate::error::FormatError;
use crate::quant::{self, BlockQ4_0, GgmlType};
use crate::writer::GgufWriter;

/// Why a [`SynthConfig`] cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The configuration is inconsistent (a zero dimension, heads that do not divide the width, ...).
    #[error("invalid synthetic model config: {0}")]
    Config(String),
    /// Writing the GGUF file failed.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The FFN activation the synthetic model is meant to be run with (stored as `pinion.ffn_activation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `down · (relu(gate · x) ⊙ (up · x))`.
    Relu,
    /// dReLU (TurboSparse): `down · (relu(gate · x) ⊙ relu(up · x))`.
    Drelu,
    /// `down · (silu(gate · x) ⊙ (up · x))`, the llama default.
    Silu,
    /// `down · (gelu(gate · x) ⊙ (up · x))`, Gemma's.
    Gelu,
}

/// The architecture a synthetic model is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthArch {
    /// `llama`: the tensors and keys of llama.cpp's llama loader.
    Llama,
    /// `qwen2`: llama's tensors plus biases of the Q, K and V projections (small random values), NeoX RoPE.
    Qwen2,
    /// `qwen3`: llama's tensors plus per-head Q/K norms, NeoX RoPE.
    Qwen3,
    /// `qwen3moe`: qwen3's attention and a mixture of experts in every layer (`expert_feed_forward_length` is the
    /// experts' width, `feed_forward_length` that times the experts used, as Qwen3-30B-A3B's file).
    Qwen3Moe,
    /// `gemma3`: llama's tensors plus per-head Q/K norms and post-attention and post-FFN norms, NeoX RoPE,
    /// scaled embeddings, and sliding-window attention with `sliding_window` positions on every layer but the
    /// last of each `swa_pattern`.
    Gemma3 {
        /// `gemma3.attention.sliding_window`.
        sliding_window: u32,
        /// `gemma3.attention.sliding_window_pattern`.
        swa_pattern: u32,
    },
}

impl SynthArch {
    /// `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::Qwen3 => "qwen3",
            SynthArch::Qwen3Moe => "qwen3moe",
            SynthArch::Gemma3 { .. } => "gemma3",
        }
    }
}

impl Activation {
    /// The name stored in the file: `relu`, `drelu`, `silu` or `gelu`.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Drelu => "drelu",
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(s: &str) -> Option<Activation> {
        match s {
            "relu" => Some(Activation::Relu),
            "drelu" => Some(Activation::Drelu),
            "silu" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }
}

/// The custom metadata key holding the planted activation.
pub const ACTIVATION_KEY: &str = "pinion.ffn_activation";

/// The number of special and byte tokens at the start of the vocabulary: `<unk>`, `<s>`, `</s>` and the 256
/// byte tokens `<0x00>`..`<0xFF>`.
pub const N_BASE_TOKENS: usize = 3 + 256;

/// A synthetic model's shape, weight type and planted skew.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// `general.name`.
    pub name: String,
    /// The architecture the file declares.
    pub arch: SynthArch,
    /// Write Llama 3.1's RoPE frequency factors (`rope_freqs.weight`: factor 8, low and high frequency factors
    /// 1 and 4, original context 8192, computed as llama.cpp's converter does).
    pub rope_factors: bool,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// FFN neurons per layer (per expert for MoE).
    pub n_ff: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Vocabulary size, at least [`N_BASE_TOKENS`] + 1.
    pub n_vocab: usize,
    /// `llama.context_length`.
    pub n_ctx: usize,
    /// The planted activation.
    pub act: Activation,
    /// Experts per layer; 0 for a dense model.
    pub n_experts: usize,
    /// Experts each token is routed to (MoE only).
    pub n_experts_used: usize,
    /// Weight type of the matrices: `Q4_0` or `F32` (norms and the MoE router are always F32).
    pub ty: GgmlType,
    /// Seed of every random choice; the same config writes the same bytes.
    pub seed: u64,
    /// Power-law exponent of the activation frequencies.
    pub alpha: f64,
    /// Planted mean activation frequency (fraction of active neurons per token), in (0, f_max).
    pub density: f64,
    /// Frequency of the hottest neurons, in (0, 1).
    pub f_max: f64,
    /// Bias channel value as a multiple of `√d_model`.
    pub bias_scale: f64,
    /// Rank of the random part of gate (and, for dReLU, up) rows: each row's weights off the bias channel are a
    /// combination of `gate_rank` directions shared by the layer, plus noise. 0: independent random rows.
    pub gate_rank: usize,
    /// Share of a gate row's random part (in squared norm) that is independent noise rather than low-rank.
    pub gate_noise: f64,
    /// Scale of the output projections relative to a unit-variance init.
    pub out_scale: f64,
    /// Head dimension when it is not `d_model / n_heads` (Qwen3-30B-A3B: 128 with a width of 2048 and 32 heads),
    /// written as `attention.key_length` and `attention.value_length`.
    pub head_len: Option<usize>,
    /// Zipf exponent of expert popularity (MoE): in each layer the expert of rank `r` (a per-layer permutation) is
    /// a token's first choice with probability proportional to `(r+1)^-expert_zipf`.
    pub expert_zipf: f64,
    /// Planted probability that consecutive tokens have the same first-choice expert (MoE). At most the rate of
    /// independent tokens (`Σ p²`), no shift heads are written and tokens are routed independently.
    pub expert_repeat: f64,
}

impl SynthConfig {
    /// The preset shapes: `tiny` (4 layers, d 256, about 3 MB in Q4_0), `small` (12 layers, d 1024, about
    /// 100 MB in Q4_0) and `7b` (LLaMA-2-7B's shape, about 3.8 GB in Q4_0), dense ReLU; and two mixtures of
    /// experts with the planted routing of issue 13 (Zipf 0.5 popularity, first choice repeated by 25% of
    /// consecutive tokens): `mixtral-47b` (Mixtral 8x7B's shape, llama architecture, 8 experts of 14336, 2 used;
    /// about 26 GB in Q4_0) and `qwen3-30b-a3b` (Qwen3-30B-A3B's shape, qwen3moe, 128 experts of 768, 8 used, 32
    /// heads of 128 over a width of 2048, the real vocabulary of 151936; about 17 GB in Q4_0), both SiLU. Q4_0,
    /// seed 0.
    pub fn preset(shape: &str) -> Option<SynthConfig> {
        #[rustfmt::skip]
        let (arch, n_layers, d_model, n_ff, n_heads, n_kv_heads, n_vocab, n_ctx, experts, head_len) = match shape {
            "tiny" => (SynthArch::Llama, 4, 256, 1024, 4, 4, 512, 2048, (0, 0), None),
            "small" => (SynthArch::Llama, 12, 1024, 2816, 16, 16, 8000, 2048, (0, 0), None),
            "7b" => (SynthArch::Llama, 32, 4096, 11008, 32, 32, 32000, 4096, (0, 0), None),
            "mixtral-47b" => (SynthArch::Llama, 32, 4096, 14336, 32, 8, 32000, 4096, (8, 2), None),
            "qwen3-30b-a3b" => (SynthArch::Qwen3Moe, 48, 2048, 768, 32, 4, 151_936, 4096, (128, 8), Some(128)),
            _ => return None,
        };
        Some(SynthConfig {
            name: format!("pinion-synth-{shape}"),
            arch,
            rope_factors: false,
            n_layers,
            d_model,
            n_ff,
            n_heads,
            n_kv_heads,
            n_vocab,
            n_ctx,
            act: if experts.0 > 0 { Activation::Silu } else { Activation::Relu },
            n_experts: experts.0,
            n_experts_used: experts.1,
            ty: GgmlType::Q4_0,
            seed: 0,
            alpha: 1.0,
            density: 0.15,
            f_max: 0.95,
            bias_scale: 0.5,
            out_scale: 0.1,
            gate_rank: 16,
            gate_noise: 0.02,
            head_len,
            expert_zipf: 0.5,
            expert_repeat: 0.25,
        })
    }

    /// Checks the configuration; every error is [`SynthError::Config`].
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |m: String| Err(SynthError::Config(m));
        for (what, v) in [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("n_ff", self.n_ff),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("n_ctx", self.n_ctx),
        ] {
            if v == 0 {
                return bad(format!("{what} is 0"));
            }
        }
        if self.head_len.is_none() && self.d_model % self.n_heads != 0 {
            return bad(format!("n_heads {} does not divide d_model {}", self.n_heads, self.d_model));
        }
        if self.head_len == Some(0) {
            return bad("head_len is 0".into());
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("n_kv_heads {} does not divide n_heads {}", self.n_kv_heads, self.n_heads));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head dimension {} is odd (RoPE needs pairs)", self.head_dim()));
        }
        if !matches!(self.ty, GgmlType::Q4_0 | GgmlType::F32) {
            return bad(format!("weight type {} is not q4_0 or f32", self.ty.name()));
        }
        let block = self.ty.block_len();
        if self.d_model % block != 0 || self.n_ff % block != 0 || self.q_width() % block != 0 {
            return bad(format!(
                "d_model, n_ff and the query width must be multiples of {block} for {}",
                self.ty.name()
            ));
        }
        if self.d_model < 2 {
            return bad("d_model must be at least 2 (dimension 0 is the bias channel)".into());
        }
        if self.n_vocab <= N_BASE_TOKENS {
            return bad(format!(
                "n_vocab {} must exceed {N_BASE_TOKENS} (special and byte tokens)",
                self.n_vocab
            ));
        }
        if self.n_experts == 1 {
            return bad("n_experts is 1 (use 0 for a dense model)".into());
        }
        if self.n_experts > 0 && (self.n_experts_used == 0 || self.n_experts_used > self.n_experts) {
            return bad(format!("n_experts_used {} must be in 1..={}", self.n_experts_used, self.n_experts));
        }
        if self.arch == SynthArch::Qwen3Moe && self.n_experts == 0 {
            return bad("qwen3moe needs experts (n_experts > 0)".into());
        }
        if self.n_experts > 0 {
            if !matches!(self.arch, SynthArch::Llama | SynthArch::Qwen3Moe) {
                return bad(format!(
                    "a mixture of experts is written as llama or qwen3moe, not {}",
                    self.arch.name()
                ));
            }
            // The router reads head_dim routed dimensions with orthonormal rows; the gates the others.
            if self.n_experts > self.head_dim() {
                return bad(format!(
                    "n_experts {} exceeds the head dimension {} (the router's rows are orthonormal in head_dim \
                     routed dimensions)",
                    self.n_experts,
                    self.head_dim()
                ));
            }
            if self.d_model < FIRST_ROUTED_DIM + self.head_dim() + 1 + self.gate_rank {
                return bad(format!(
                    "d_model {} leaves no room for the gates beside the bias channel and {} routed dimensions",
                    self.d_model,
                    self.head_dim()
                ));
            }
            if !(self.expert_zipf >= 0.0 && self.expert_zipf.is_finite()) {
                return bad(format!("expert_zipf {} is not a finite non-negative number", self.expert_zipf));
            }
            if !(0.0..1.0).contains(&self.expert_repeat) {
                return bad(format!("expert_repeat {} is not in [0, 1)", self.expert_repeat));
            }
            routing_plan(self)?;
        }
        let unit = |x: f64| x > 0.0 && x < 1.0;
        if !unit(self.f_max) || !unit(self.density) || self.density >= self.f_max {
            return bad(format!("need 0 < density ({}) < f_max ({}) < 1", self.density, self.f_max));
        }
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return bad(format!("alpha {} is not a finite non-negative number", self.alpha));
        }
        if !(0.0..=1.0).contains(&self.gate_noise) {
            return bad(format!("gate_noise {} is not in [0, 1]", self.gate_noise));
        }
        if self.gate_rank >= self.d_model {
            return bad(format!("gate_rank {} must be below d_model {}", self.gate_rank, self.d_model));
        }
        if !(self.bias_scale > 0.0 && self.bias_scale.is_finite()) {
            return bad(format!("bias_scale {} is not positive", self.bias_scale));
        }
        if !(self.out_scale >= 0.0 && self.out_scale.is_finite()) {
            return bad(format!("out_scale {} is negative", self.out_scale));
        }
        Ok(())
    }

    /// Head dimension: [`head_len`](Self::head_len), else `d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_len.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Width of the queries (and of the attention output's input): `n_heads · head_dim`.
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim()
    }

    /// The bias channel value `B` of every token embedding.
    pub fn bias_value(&self) -> f64 {
        self.bias_scale * (self.d_model as f64).sqrt()
    }
}

/// One tensor of the model: its name, type and dims (ggml order, `ne[0]` first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name as llama.cpp expects it.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, `ne[0]` (the row length) first.
    pub dims: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Embed,
    Norm,
    /// Per-head Q or K norm (`head_dim` weights).
    QkNorm,
    /// Query, key and value projections (random, but for layer 0's shift heads in a mixture of experts).
    AttnQ,
    AttnK,
    AttnV,
    /// The attention output (an [`Kind::Out`], but for layer 0's shift heads in a mixture of experts).
    AttnOut,
    Plain,
    Bias,
    RopeFreqs,
    Out,
    Router,
    Gate,
    Up,
}

/// The tensors of a model, in file order.
pub fn tensor_specs(cfg: &SynthConfig) -> Vec<TensorSpec> {
    specs(cfg).into_iter().map(|(s, _)| s).collect()
}

fn specs(cfg: &SynthConfig) -> Vec<(TensorSpec, Kind)> {
    let (d, ff, v) = (cfg.d_model as u64, cfg.n_ff as u64, cfg.n_vocab as u64);
    let kv = (cfg.head_dim() * cfg.n_kv_heads) as u64;
    let qw = cfg.q_width() as u64;
    let ty = cfg.ty;
    let t =
        |name: String, ty: GgmlType, dims: &[u64], k: Kind| (TensorSpec { name, ty, dims: dims.to_vec() }, k);
    let mut out = vec![t("token_embd.weight".into(), ty, &[d, v], Kind::Embed)];
    if cfg.rope_factors {
        out.push(t("rope_freqs.weight".into(), GgmlType::F32, &[cfg.head_dim() as u64 / 2], Kind::RopeFreqs));
    }
    for l in 0..cfg.n_layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        out.push(t(b("attn_norm"), GgmlType::F32, &[d], Kind::Norm));
        out.push(t(b("attn_q"), ty, &[d, qw], Kind::AttnQ));
        out.push(t(b("attn_k"), ty, &[d, kv], Kind::AttnK));
        out.push(t(b("attn_v"), ty, &[d, kv], Kind::AttnV));
        out.push(t(b("attn_output"), ty, &[qw, d], Kind::AttnOut));
        if cfg.arch == SynthArch::Qwen2 {
            for (what, n) in [("attn_q", d), ("attn_k", kv), ("attn_v", kv)] {
                out.push(t(format!("blk.{l}.{what}.bias"), GgmlType::F32, &[n], Kind::Bias));
            }
        }
        if matches!(cfg.arch, SynthArch::Qwen3 | SynthArch::Qwen3Moe) {
            let hd = cfg.head_dim() as u64;
            out.push(t(b("attn_q_norm"), GgmlType::F32, &[hd], Kind::QkNorm));
            out.push(t(b("attn_k_norm"), GgmlType::F32, &[hd], Kind::QkNorm));
        }
        if let SynthArch::Gemma3 { .. } = cfg.arch {
            let hd = cfg.head_dim() as u64;
            out.push(t(b("attn_q_norm"), GgmlType::F32, &[hd], Kind::Norm));
            out.push(t(b("attn_k_norm"), GgmlType::F32, &[hd], Kind::Norm));
            out.push(t(b("post_attention_norm"), GgmlType::F32, &[d], Kind::Norm));
            out.push(t(b("post_ffw_norm"), GgmlType::F32, &[d], Kind::Norm));
        }
        out.push(t(b("ffn_norm"), GgmlType::F32, &[d], Kind::Norm));
        if cfg.n_experts == 0 {
            out.push(t(b("ffn_gate"), ty, &[d, ff], Kind::Gate));
            out.push(t(b("ffn_up"), ty, &[d, ff], Kind::Up));
            out.push(t(b("ffn_down"), ty, &[ff, d], Kind::Out));
        } else {
            let e = cfg.n_experts as u64;
            out.push(t(b("ffn_gate_inp"), GgmlType::F32, &[d, e], Kind::Router));
            out.push(t(b("ffn_gate_exps"), ty, &[d, ff, e], Kind::Gate));
            out.push(t(b("ffn_up_exps"), ty, &[d, ff, e], Kind::Up));
            out.push(t(b("ffn_down_exps"), ty, &[ff, d, e], Kind::Out));
        }
    }
    out.push(t("output_norm.weight".into(), GgmlType::F32, &[d], Kind::Norm));
    out.push(t("output.weight".into(), ty, &[d, v], Kind::Plain));
    out
}

/// The declared writer: metadata and tensor directory, no data yet.
fn declare(cfg: &SynthConfig) -> Result<GgufWriter<'static>, SynthError> {
    cfg.validate()?;
    let u = |x: usize| x as u32;
    let mut w = GgufWriter::new();
    let arch = cfg.arch.name();
    let k = |key: &str| format!("{arch}.{key}");
    w.add_metadata("general.architecture", arch)?;
    w.add_metadata("general.name", cfg.name.as_str())?;
    w.add_metadata("general.file_type", if cfg.ty == GgmlType::F32 { 0u32 } else { 2u32 })?;
    w.add_metadata(k("vocab_size"), u(cfg.n_vocab))?;
    w.add_metadata(k("context_length"), u(cfg.n_ctx))?;
    w.add_metadata(k("embedding_length"), u(cfg.d_model))?;
    w.add_metadata(k("block_count"), u(cfg.n_layers))?;
    let ff_len = if cfg.arch == SynthArch::Qwen3Moe { cfg.n_ff * cfg.n_experts_used } else { cfg.n_ff };
    w.add_metadata(k("feed_forward_length"), u(ff_len))?;
    w.add_metadata(k("attention.head_count"), u(cfg.n_heads))?;
    w.add_metadata(k("attention.head_count_kv"), u(cfg.n_kv_heads))?;
    w.add_metadata(k("rope.dimension_count"), u(cfg.head_dim()))?;
    w.add_metadata(k("rope.freq_base"), rope_base(cfg) as f32)?;
    w.add_metadata(k("attention.layer_norm_rms_epsilon"), 1e-5f32)?;
    match cfg.arch {
        SynthArch::Llama | SynthArch::Qwen2 | SynthArch::Qwen3 | SynthArch::Qwen3Moe => {
            if cfg.head_len.is_some() {
                w.add_metadata(k("attention.key_length"), u(cfg.head_dim()))?;
                w.add_metadata(k("attention.value_length"), u(cfg.head_dim()))?;
            }
        }
        SynthArch::Gemma3 { sliding_window, swa_pattern } => {
            w.add_metadata(k("attention.key_length"), u(cfg.head_dim()))?;
            w.add_metadata(k("attention.value_length"), u(cfg.head_dim()))?;
            w.add_metadata(k("attention.sliding_window"), sliding_window)?;
            w.add_metadata(k("attention.sliding_window_pattern"), swa_pattern)?;
        }
    }
    if cfg.n_experts > 0 {
        w.add_metadata(k("expert_count"), u(cfg.n_experts))?;
        w.add_metadata(k("expert_used_count"), u(cfg.n_experts_used))?;
        if cfg.arch == SynthArch::Qwen3Moe {
            w.add_metadata(k("expert_feed_forward_length"), u(cfg.n_ff))?;
        }
        w.add_metadata("pinion.synth.expert_zipf", cfg.expert_zipf as f32)?;
        w.add_metadata("pinion.synth.expert_repeat", cfg.expert_repeat as f32)?;
    }
    w.add_metadata(ACTIVATION_KEY, cfg.act.name())?;
    w.add_metadata("pinion.synth.seed", cfg.seed)?;
    w.add_metadata("pinion.synth.density", cfg.density as f32)?;
    w.add_metadata("pinion.synth.alpha", cfg.alpha as f32)?;

    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for i in tokens.len()..cfg.n_vocab {
        tokens.push(format!("\u{2581}t{i}"));
        types.push(1);
    }
    let scores: Vec<f32> =
        (0..cfg.n_vocab).map(|i| if i < N_BASE_TOKENS { 0.0 } else { -(i as f32) }).collect();
    w.add_metadata("tokenizer.ggml.model", "llama")?;
    w.add_metadata("tokenizer.ggml.tokens", tokens)?;
    w.add_metadata("tokenizer.ggml.scores", scores)?;
    w.add_metadata("tokenizer.ggml.token_type", types)?;
    w.add_metadata("tokenizer.ggml.unknown_token_id", 0u32)?;
    w.add_metadata("tokenizer.ggml.bos_token_id", 1u32)?;
    w.add_metadata("tokenizer.ggml.eos_token_id", 2u32)?;
    w.add_metadata("tokenizer.ggml.add_bos_token", true)?;
    w.add_metadata("tokenizer.ggml.add_eos_token", false)?;

    for (s, _) in specs(cfg) {
        w.add_tensor(&s.name, s.ty, &s.dims)?;
    }
    Ok(w)
}

/// The size in bytes of the file [`write_model`] writes for `cfg`.
pub fn file_len(cfg: &SynthConfig) -> Result<u64, SynthError> {
    Ok(declare(cfg)?.file_len()?)
}

/// `n` characters of deterministic pseudo-random printable ASCII: calibration text whose tokens spread over a
/// synthetic model's vocabulary (its byte tokens and merges), for profiling one without a corpus.
pub fn sample_text(n: usize) -> String {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

/// Writes the model described by `cfg` to `out` and returns `out`, calling `progress(done, total)` (bytes of
/// the file) after the header and after each tensor. Memory use is bounded by one row of the widest tensor.
///
/// Wrap a file in a `std::io::BufWriter`: data is written one row at a time.
pub fn write_model<W: Write>(
    cfg: &SynthConfig,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<W, SynthError> {
    let w = declare(cfg)?;
    let shift = ShiftHeads::of(cfg)?;
    let total = w.file_len()?;
    let mut done = w.data_offset();
    let align = w.alignment();
    let mut stream = w.begin(out)?;
    progress(done, total);
    for (spec, kind) in specs(cfg) {
        stream.write_tensor_with(&spec.name, |w| write_tensor(cfg, shift.as_ref(), &spec, kind, w))?;
        let n = spec.ty.row_bytes(spec.dims[0] as usize)? as u64 * spec.dims[1..].iter().product::<u64>();
        done += n.div_ceil(align) * align;
        progress(done.min(total), total);
    }
    Ok(stream.finish()?)
}

/// The routing plan of a mixture of experts (`None` for a dense model): the same for every layer up to the
/// permutation of [`expert_targets`].
pub fn routing_plan(cfg: &SynthConfig) -> Result<Option<RoutingPlan>, SynthError> {
    if cfg.n_experts == 0 {
        return Ok(None);
    }
    RoutingPlan::new(cfg.n_experts, cfg.expert_zipf, cfg.expert_repeat, cfg.n_heads, cfg.seed).map(Some)
}

/// The popularity rank of each expert of layer `layer` (0 is the most popular), indexed by expert id: a
/// per-layer random permutation.
pub fn expert_ranks(cfg: &SynthConfig, layer: usize) -> Vec<usize> {
    permutation(cfg.n_experts, &mut Rng::new(cfg.seed, &format!("experts.{layer}")))
}

/// A random permutation of `0..n` (Fisher-Yates, drawing from `rng`).
fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The planted first-choice probability of each expert of layer `layer`, indexed by expert id (empty for a dense
/// model or an invalid config).
pub fn expert_targets(cfg: &SynthConfig, layer: usize) -> Vec<f64> {
    match routing_plan(cfg) {
        Ok(Some(plan)) => expert_ranks(cfg, layer).iter().map(|&r| plan.target[r]).collect(),
        _ => Vec::new(),
    }
}

/// The RoPE base the file declares.
fn rope_base(cfg: &SynthConfig) -> f64 {
    if let SynthArch::Gemma3 { .. } = cfg.arch { 1_000_000.0 } else { 10000.0 }
}

/// The target score gap of a shift head between its lag and any other position (softmax weight `e^-12` of the
/// peak's for each other position).
const SHIFT_GAP: f64 = 12.0;

/// Layer 0's shift heads of a mixture of experts and the router construction (see the module docs).
struct ShiftHeads {
    plan: RoutingPlan,
    /// Gain of query head `i` (lag `i+1`), for query heads `0..gains.len()`.
    gains: Vec<f64>,
    /// Query heads per KV head.
    group: usize,
    /// The key pattern (`head_dim` values: amplitude on the cosine half of the used RoPE pairs).
    key: Vec<f64>,
    /// The query pattern of lag `i+1`.
    queries: Vec<Vec<f64>>,
    /// The Q/K norm weight of each head dimension (Q/K-normed architectures).
    qk_norm: Vec<f32>,
    /// `B / rms` of a typical embedding: the bias channel after the attention norm.
    x0: f64,
    /// RMS of a typical embedding.
    rms0: f64,
    /// RMS of a typical FFN input of layer 0 (the routed dimensions carry the shift heads' additions).
    rms_h: f64,
}

impl ShiftHeads {
    fn of(cfg: &SynthConfig) -> Result<Option<ShiftHeads>, SynthError> {
        let Some(plan) = routing_plan(cfg)? else { return Ok(None) };
        let (d, hd) = (cfg.d_model as f64, cfg.head_dim());
        let b = cfg.bias_value();
        // The embeddings' token-specific dimensions, of variance 1 (see `Kind::Embed`).
        let n_tok = d - FIRST_ROUTED_DIM as f64;
        let rms0 = ((b * b + n_tok) / d).sqrt();
        let v = plan.feature_variance();
        let rms_h = ((b * b + n_tok + hd as f64 * (v - 1.0)) / d).sqrt();
        let (n_pairs, worst) = routing::shift_pattern(hd, rope_base(cfg), cfg.n_ctx);
        let peak = SHIFT_GAP / (1.0 - worst);
        let qk_normed = cfg.arch == SynthArch::Qwen3Moe;
        // Without Q/K norms the scores scale with the squared amplitude; with them the amplitude is normalized
        // away and the norm weights on the used pairs set the peak (`n² √hd`).
        let amp = if qk_normed { 1.0 } else { (peak * (hd as f64).sqrt() / n_pairs as f64).sqrt() };
        let neox = cfg.arch != SynthArch::Llama;
        let dims = |j: usize| if neox { (j, j + hd / 2) } else { (2 * j, 2 * j + 1) };
        let theta = |j: usize| rope_base(cfg).powf(-2.0 * j as f64 / hd as f64);
        let mut key = vec![0.0; hd];
        let mut qk_norm = vec![1.0f32; hd];
        let gain = (peak / (hd as f64).sqrt()).sqrt() as f32;
        for j in 0..n_pairs {
            key[dims(j).0] = amp;
            qk_norm[dims(j).0] = gain;
            qk_norm[dims(j).1] = gain;
        }
        let queries = (1..=plan.gains.len())
            .map(|lag| {
                let mut q = vec![0.0; hd];
                for j in 0..n_pairs {
                    // R(-lag θ) applied to (amp, 0): the score q · R(-Δθ) k peaks at Δ = lag.
                    let a = lag as f64 * theta(j);
                    q[dims(j).0] = amp * a.cos();
                    q[dims(j).1] = -amp * a.sin();
                }
                q
            })
            .collect();
        Ok(Some(ShiftHeads {
            gains: plan.gains.clone(),
            plan,
            group: cfg.n_heads / cfg.n_kv_heads,
            key,
            queries,
            qk_norm,
            x0: b / rms0,
            rms0,
            rms_h,
        }))
    }

    /// Is KV head `kh` shared by a shift head?
    fn hosts(&self, kh: usize) -> bool {
        kh * self.group < self.gains.len()
    }
}

/// The planted activation frequency of each FFN neuron of layer `layer` (expert `expert`, 0 for a dense
/// model), indexed by neuron id. For dReLU this is the joint frequency; gate and up are each planted with its
/// square root.
pub fn target_frequencies(cfg: &SynthConfig, layer: usize, expert: usize) -> Vec<f64> {
    let n = cfg.n_ff;
    let perm = permutation(n, &mut Rng::new(cfg.seed, &format!("perm.{layer}.{expert}")));
    let by_rank = power_law(n, cfg.alpha, cfg.density, cfg.f_max);
    let mut f = vec![0.0; n];
    for (neuron, &rank) in perm.iter().enumerate() {
        f[neuron] = by_rank[rank];
    }
    f
}

/// Llama 3.1's RoPE frequency factors for a head of `dim` values and base `base`, as llama.cpp's converter
/// computes them (`LlamaModel.generate_extra_tensors`): factor 8, low and high frequency factors 1 and 4,
/// original context 8192.
pub fn llama3_rope_factors(dim: usize, base: f64) -> Vec<f32> {
    let (factor, low, high, old_ctx) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Pearson's correlation of `a` and `b` (equal lengths): how well a measured statistic of a synthetic model
/// follows the planted one (NaN when either is constant).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// `min(f_max, c · (r+1)^-alpha)` for ranks `r` in `0..n`, with `c` chosen so that the mean is `density`.
fn power_law(n: usize, alpha: f64, density: f64, f_max: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|r| ((r + 1) as f64).powf(-alpha)).collect();
    let mean = |c: f64| raw.iter().map(|&p| (c * p).min(f_max)).sum::<f64>() / n as f64;
    // mean(c) is continuous and non-decreasing, from 0 to f_max > density: bisect on c.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while mean(hi) < density && hi < 1e30 {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mean(mid) < density {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    raw.iter().map(|&p| (hi * p).min(f_max)).collect()
}

/// Writes one tensor's data, row by row.
fn write_tensor(
    cfg: &SynthConfig,
    shift: Option<&ShiftHeads>,
    spec: &TensorSpec,
    kind: Kind,
    w: &mut dyn Write,
) -> io::Result<()> {
    let row_len = spec.dims[0] as usize;
    let n_rows: usize = spec.dims[1..].iter().product::<u64>() as usize;
    let mut rng = Rng::new(cfg.seed, &spec.name);
    let mut row = vec![0.0f32; row_len];
    let mut blocks = vec![BlockQ4_0 { d: half::f16::ZERO, qs: [0; 16] }; row_len / 32];
    let d = cfg.d_model as f64;
    let sigma = 1.0 / (row_len as f64).sqrt();
    let b = cfg.bias_value();
    // Planted frequencies of the current expert (rows of a gate/up tensor are neurons, n_ff per expert).
    let mut freqs: Vec<f64> = Vec::new();
    // The layer's shared directions of gate rows (`gate_rank` rows of `d_model`), and a noise row.
    let mut dirs: Vec<f32> = Vec::new();
    let mut noise = vec![0.0f32; row_len];
    let layer = layer_of(&spec.name);
    // Layer 0's shift heads, and the router of every layer (mixtures of experts).
    let shift0 = shift.filter(|_| layer == 0);
    let hd = cfg.head_dim();
    let mut router: Vec<f32> = Vec::new();
    for r in 0..n_rows {
        match kind {
            Kind::Norm => row.fill(1.0),
            Kind::QkNorm => match shift0 {
                Some(sh) => row.copy_from_slice(&sh.qk_norm),
                None => row.fill(1.0),
            },
            Kind::AttnQ | Kind::AttnK => {
                rng.fill_uniform(&mut row, sigma);
                let (head, c) = (r / hd, r % hd);
                let pattern = match (shift0, kind) {
                    (Some(sh), Kind::AttnQ) if head < sh.gains.len() => Some(&sh.queries[head]),
                    (Some(sh), Kind::AttnK) if sh.hosts(head) => Some(&sh.key),
                    _ => None,
                };
                if let Some((sh, p)) = shift0.zip(pattern) {
                    row.fill(0.0);
                    row[0] = (p[c] / sh.x0) as f32;
                }
            }
            Kind::AttnV => {
                rng.fill_uniform(&mut row, sigma);
                if shift0.is_some_and(|sh| sh.hosts(r / hd)) {
                    row.fill(0.0);
                    row[FIRST_ROUTED_DIM + r % hd] = 1.0;
                }
            }
            Kind::AttnOut => {
                rng.fill_uniform(&mut row, sigma * cfg.out_scale);
                if let Some(sh) = shift0 {
                    for (head, &g) in sh.gains.iter().enumerate() {
                        let cols = &mut row[head * hd..(head + 1) * hd];
                        cols.fill(0.0);
                        if routed_dims(cfg).contains(&r) {
                            cols[r - FIRST_ROUTED_DIM] = (g * sh.rms0) as f32;
                        }
                    }
                }
            }
            Kind::Embed => {
                rng.fill_uniform(&mut row, 1.0);
                if cfg.n_experts > 0 {
                    // Every token gets the same RMS (so that the shift heads' scores, which scale with the bias
                    // channel after the norm, do not vary from token to token), and the rest of the bias
                    // channel's block is 0 (Q4_0 would round it to a few levels).
                    row[1..FIRST_ROUTED_DIM].fill(0.0);
                    let tail = &mut row[FIRST_ROUTED_DIM..];
                    let norm2: f64 = tail.iter().map(|&v| v as f64 * v as f64).sum();
                    let scale = ((tail.len() as f64) / norm2).sqrt() as f32;
                    tail.iter_mut().for_each(|v| *v *= scale);
                }
                row[0] = b as f32;
            }
            Kind::Plain => rng.fill_uniform(&mut row, sigma),
            Kind::Router => match shift {
                Some(sh) => {
                    if r == 0 {
                        router = router_rows(cfg, layer, sh, &mut rng);
                    }
                    row.copy_from_slice(&router[r * row_len..(r + 1) * row_len]);
                }
                None => rng.fill_uniform(&mut row, sigma),
            },
            Kind::Bias => rng.fill_uniform(&mut row, 0.1),
            Kind::RopeFreqs => row.copy_from_slice(&llama3_rope_factors(cfg.head_dim(), 10000.0)),
            Kind::Out => rng.fill_uniform(&mut row, sigma * cfg.out_scale),
            Kind::Gate | Kind::Up => {
                let (expert, neuron) = (r / cfg.n_ff, r % cfg.n_ff);
                if neuron == 0 {
                    freqs = target_frequencies(cfg, layer, expert);
                    dirs = directions(cfg, layer, expert);
                }
                planted_random_part(cfg, &dirs, &mut rng, sigma, &mut row, &mut noise);
                let f = match (kind, cfg.act) {
                    (_, Activation::Drelu) => Some(freqs[neuron].sqrt()),
                    (Kind::Gate, _) => Some(freqs[neuron]),
                    _ => None,
                };
                row[0] = match f {
                    Some(f) => (sigma * (d - 1.0).sqrt() * probit(f) / b) as f32,
                    None => 0.0,
                };
            }
        }
        if spec.ty == GgmlType::F32 {
            for v in &row {
                w.write_all(&v.to_le_bytes())?;
            }
        } else {
            quant::quantize_row_q4_0(&row, &mut blocks);
            w.write_all(bytemuck::cast_slice(&blocks))?;
        }
    }
    Ok(())
}

/// A layer's router rows (`n_experts x d_model`, row-major): orthonormal random directions in the routed
/// dimensions, scaled so that the token-specific part of a logit has standard deviation 1 for a
/// typical layer-0 FFN input, and on the bias channel the offset of the expert's rank in those units.
fn router_rows(cfg: &SynthConfig, layer: usize, sh: &ShiftHeads, rng: &mut Rng) -> Vec<f32> {
    let (d, hd, n) = (cfg.d_model, cfg.head_dim(), cfg.n_experts);
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut v = vec![0.0f32; hd];
    while basis.len() < n {
        rng.fill_uniform(&mut v, 1.0);
        let mut u: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        // Gram-Schmidt, twice for accuracy.
        for _ in 0..2 {
            for b in &basis {
                let dot: f64 = u.iter().zip(b).map(|(x, y)| x * y).sum();
                u.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
            }
        }
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        // A draw (almost) inside the span of the others is drawn again; n <= hd makes room for all.
        if norm > 1e-3 {
            basis.push(u.iter().map(|x| x / norm).collect());
        }
    }
    let scale = sh.rms_h / sh.plan.feature_variance().sqrt();
    let ranks = expert_ranks(cfg, layer);
    let mut rows = vec![0.0f32; n * d];
    for ((row, b), &rank) in rows.chunks_exact_mut(d).zip(&basis).zip(&ranks) {
        row[0] = (sh.plan.offsets[rank] * sh.rms_h / cfg.bias_value()) as f32;
        for (r, &x) in row[routed_dims(cfg)].iter_mut().zip(b) {
            *r = (x * scale) as f32;
        }
    }
    rows
}

/// The first routed dimension: the second block of 32, because the first shares its Q4_0 scale with the bias
/// channel, which rounds an embedding's other values there to a few levels (to 0 for a width of 4096).
pub const FIRST_ROUTED_DIM: usize = 32;

/// The routed dimensions of a mixture of experts, `head_dim` of them from [`FIRST_ROUTED_DIM`]: what the router
/// reads and the shift heads copy.
pub fn routed_dims(cfg: &SynthConfig) -> std::ops::Range<usize> {
    FIRST_ROUTED_DIM..FIRST_ROUTED_DIM + cfg.head_dim()
}

/// Zeroes what a gate row leaves out: the bias channel and, in a mixture of experts, the rest of its block
/// (zero in the embeddings) and the routed dimensions (so that routing and neuron activity are independent, and
/// the shift heads' additions to the routed dimensions leave the planted neuron frequencies alone).
fn zero_gate_excluded(cfg: &SynthConfig, row: &mut [f32]) {
    let end = if cfg.n_experts > 0 { routed_dims(cfg).end } else { 1 };
    row[..end].fill(0.0);
}

/// The `gate_rank` shared directions of a layer's (expert's) gate and up rows, row-major, zero on the bias
/// channel (and the routed dimensions of a mixture of experts). Gate and up share them, so that one low-rank
/// predictor can see both (dReLU).
fn directions(cfg: &SynthConfig, layer: usize, expert: usize) -> Vec<f32> {
    let mut rng = Rng::new(cfg.seed, &format!("dirs.{layer}.{expert}"));
    let mut dirs = vec![0.0f32; cfg.gate_rank * cfg.d_model];
    for dir in dirs.chunks_exact_mut(cfg.d_model) {
        rng.fill_uniform(dir, 1.0);
        zero_gate_excluded(cfg, dir);
    }
    dirs
}

/// Fills `row` with a gate row's random part: a random combination of the shared directions plus independent
/// noise (`gate_noise` of the squared norm), scaled so the squared norm off the bias channel is `(d-1)·σ²`,
/// that of an independent uniform row of standard deviation `σ`, on which the frequency planting relies.
/// `row[0]` is left 0 for the caller.
fn planted_random_part(
    cfg: &SynthConfig,
    dirs: &[f32],
    rng: &mut Rng,
    sigma: f64,
    row: &mut [f32],
    noise: &mut [f32],
) {
    let d = row.len();
    if cfg.gate_rank == 0 {
        rng.fill_uniform(row, sigma);
        zero_gate_excluded(cfg, row);
        return;
    }
    let mut coef = vec![0.0f32; cfg.gate_rank];
    rng.fill_uniform(&mut coef, 1.0);
    row.fill(0.0);
    for (c, dir) in coef.iter().zip(dirs.chunks_exact(d)) {
        for (r, &v) in row.iter_mut().zip(dir) {
            *r += c * v;
        }
    }
    rng.fill_uniform(noise, 1.0);
    zero_gate_excluded(cfg, row);
    zero_gate_excluded(cfg, noise);
    let norm2 = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
    let target = (d as f64 - 1.0) * sigma * sigma;
    let (low, high) = (norm2(row), norm2(noise));
    let a = if low > 0.0 { ((1.0 - cfg.gate_noise) * target / low).sqrt() } else { 0.0 };
    let b = if high > 0.0 { (cfg.gate_noise * target / high).sqrt() } else { 0.0 };
    for (r, &n) in row.iter_mut().zip(noise.iter()) {
        *r = (a * *r as f64 + b * n as f64) as f32;
    }
}

/// The layer number of a `blk.N.…` tensor name (0 otherwise).
fn layer_of(name: &str) -> usize {
    name.strip_prefix("blk.").and_then(|s| s.split('.').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The standard normal quantile function `Φ⁻¹(p)` for `p` in (0, 1) (Acklam's rational approximation, relative
/// error below 1.2e-9). Returns ±infinity at 0 and 1 and NaN outside [0, 1].
pub fn probit(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let p_low = 0.02425;
    if p < p_low {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - p_low {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// xoshiro256++ seeded through SplitMix64 from the model seed and a tensor name, so each tensor's values
/// depend only on the seed and its name.
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64, name: &str) -> Rng {
        // FNV-1a of the name, mixed with the seed.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let mut x = seed ^ h.rotate_left(17);
        let mut split = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng { s: [split(), split(), split(), split()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Fills `out` with independent standard normal values (Box-Muller).
    fn fill_normal(&mut self, out: &mut [f64]) {
        for pair in out.chunks_mut(2) {
            // 53 random bits to (0, 1].
            let u1 = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt();
            let a = 2.0 * std::f64::consts::PI * u2;
            pair[0] = r * a.cos();
            if let Some(v) = pair.get_mut(1) {
                *v = r * a.sin();
            }
        }
    }

    /// Fills `out` with independent uniform values of mean 0 and standard deviation `sd`.
    fn fill_uniform(&mut self, out: &mut [f32], sd: f64) {
        let a = (sd * 3f64.sqrt()) as f32;
        for v in out {
            // 24 random bits to [-1, 1).
            let u = (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 23) as f32) - 1.0;
            *v = u * a;
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn probit_inverts_the_normal_cdf() {
        for &(p, x) in &[
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.01, -2.326_347_874_040_841),
            (0.9, 1.281_551_565_544_6),
        ] {
            assert!((probit(p) - x).abs() < 1e-8, "probit({p}) = {} not {x}", probit(p));
        }
    }

    #[test]
    fn power_law_has_the_asked_mean() {
        let f = power_law(1000, 1.0, 0.15, 0.95);
        let mean = f.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.15).abs() < 1e-6);
        assert!(f[0] == 0.95 && f[999] < 0.05);
    }
}
