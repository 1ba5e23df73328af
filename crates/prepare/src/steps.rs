//! The offline preparation steps as library functions: profile activations over a calibration text,
//! calibrate thresholds, train predictors and pack the model.

use std::path::Path;

use pinion_format::packed::{ExtraTensor, PackOptions, PackSummary, pack};
use pinion_format::{GgmlType, Gguf, GgufWriter, Value};
use pinion_io::MappedFile;
use pinion_predictor::train::{LayerReport, Masks, TrainConfig, train_layer};
use pinion_predictor::{ActivationProfile, LowRankPredictor, threshold_of_sorted};

use pinion_runtime::{
    Context, ContextParams, FfnRule, MAX_PPL_INCREASE_KEY, Model, PPL_INCREASE_KEY, PREDICTED_DENSITY_KEY,
    PREDICTOR_THRESHOLDS_KEY, ROUTE_FREQUENCY_KEY, SOURCE_BYTES_KEY, TARGET_SPARSITY_KEY, THRESHOLDS_KEY,
    predictor_tensor_names, score_scale_tensor,
};

use crate::error::PrepareError;
use crate::files::{partial_path, write_atomic};
use crate::thresholds::{Quality, Thresholds};

/// Settings of [`profile_activations`].
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Most calibration tokens to run.
    pub max_tokens: usize,
    /// Tokens per forward pass; each chunk starts from an empty cache.
    pub chunk: usize,
    /// Scores sampled per layer for threshold calibration.
    pub score_samples: usize,
    /// Tokens whose FFN inputs and scores are kept for predictor training and for calibrating SiLU and GELU
    /// thresholds (0: none; `prepare_dir` keeps none when nothing uses them).
    pub token_samples: usize,
    /// Compute threads.
    pub threads: usize,
    /// Profile on uniformly random token ids (as `pinion bench` and llama-bench feed a model) instead of the
    /// calibration text: for synthetic models, whose activations depend on what they are fed and which have no
    /// text of their own.
    pub random_tokens: bool,
    /// Tokens at the end of the calibration text left out of the profile (the held-out split a quality budget
    /// is judged on, see [`heldout_tokens`]).
    pub holdout: usize,
}

impl Default for ProfileOptions {
    fn default() -> ProfileOptions {
        ProfileOptions {
            max_tokens: 16384,
            chunk: 512,
            score_samples: 1 << 18,
            token_samples: 4096,
            threads: 2,
            random_tokens: false,
            holdout: 0,
        }
    }
}

/// The fewest score samples an expert of a mixture of experts keeps (its share of
/// [`ProfileOptions::score_samples`] when that is more).
pub const MIN_UNIT_SCORE_SAMPLES: usize = 4096;
/// The fewest token samples an expert may keep (its share of [`ProfileOptions::token_samples`], by the experts
/// used per token, when that is more).
pub const MIN_UNIT_TOKEN_SAMPLES: usize = 256;

/// Runs the dense model over `text` in chunks, each from an empty cache, and records every layer's activation
/// statistics and token samples (see [`ActivationProfile`]). The chunks go through the model layer by layer
/// ([`Context::eval_profile_by_layer`]): each layer's weights are read once, and their pages are dropped from
/// memory when the layer is done, so that a model larger than memory is profiled reading it once, its resident
/// set bounded by a layer's weights, the chunks' hidden states and the profile. `progress(done, total)` is
/// called after each layer.
pub fn profile_activations(
    model: &Model,
    text: &str,
    opts: &ProfileOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActivationProfile, PrepareError> {
    let tok = model.tokenizer();
    let tokens = match opts.random_tokens {
        false => tok.encode(text, tok.add_bos(), false),
        true => pinion_runtime::random_tokens(
            opts.max_tokens,
            0..model.config().n_vocab as u32,
            0x9e37_79b9_7f4a_7c15,
        ),
    };
    let chunk = opts.chunk.min(model.config().n_ctx_train).max(1);
    let tokens = &tokens[..tokens.len().saturating_sub(if opts.random_tokens { 0 } else { opts.holdout })];
    if tokens.len() < chunk.min(opts.max_tokens) || tokens.is_empty() {
        return Err(PrepareError::CalibrationTooShort {
            tokens: tokens.len(),
            needed: chunk.min(opts.max_tokens) + opts.holdout,
        });
    }
    let total = tokens.len().min(opts.max_tokens);
    let c = model.config();
    // A mixture of experts is profiled per FFN unit (expert): each its share of the score samples and its own
    // token samples, of the tokens routed to it (their share of the profiled tokens).
    let mut profile = match c.moe {
        Some(m) => {
            let per_unit = (opts.score_samples / m.n_expert).max(MIN_UNIT_SCORE_SAMPLES);
            let tokens = match opts.token_samples {
                0 => 0,
                n => (n * m.n_expert_used / m.n_expert).max(MIN_UNIT_TOKEN_SAMPLES),
            };
            ActivationProfile::new(c.n_units(), c.n_ff, per_unit).with_token_samples(c.d_model, tokens)
        }
        None => ActivationProfile::new(c.n_layers, c.n_ff, opts.score_samples)
            .with_token_samples(c.d_model, opts.token_samples),
    };
    let mut ctx = Context::new(model, ContextParams::new(chunk, opts.threads))?;
    let pieces: Vec<&[u32]> = tokens[..total].chunks(chunk).collect();
    let n_layers = c.n_layers;
    ctx.eval_profile_by_layer(&pieces, &mut profile, &mut |l| {
        model.release_pages();
        progress(l + 1, n_layers)
    })?;
    Ok(profile)
}

/// Writes a profile file (versioned, checksummed; docs/format.md), to a temporary name renamed into place.
pub fn save_profile(profile: &ActivationProfile, path: &Path) -> Result<(), PrepareError> {
    let io = |source| PrepareError::Io { path: path.to_path_buf(), source };
    let tmp = partial_path(path);
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    profile.write_to(&mut w).map_err(io)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a profile file written by [`save_profile`].
pub fn load_profile(path: &Path) -> Result<ActivationProfile, PrepareError> {
    let f =
        std::fs::File::open(path).map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })?;
    ActivationProfile::read_from(&mut std::io::BufReader::new(f))
        .map_err(|e| PrepareError::BadProfileFile { path: path.to_path_buf(), why: e.to_string() })
}

/// How a SiLU or GELU model's FFN neurons are chosen (see `pinion_runtime::FfnRule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rule {
    /// CATS: a neuron takes part when `|act(g_i)|` reaches the layer's threshold.
    Cats,
    /// Weighted (in the spirit of WINA, adapted to reading the gate first): `|act(g_i)| * c_i` with
    /// `c_i = rms(u_i)` over the profiled tokens (normalised to a mean of 1 per layer), so that the score is the
    /// expected size of the neuron's hidden activation `act(g_i) * u_i` given its gate, before its up row is
    /// read. (Weighing by the norm of the neuron's down column as well, as WINA weighs inputs by weight-column
    /// norms, did worse on SmolLM2: docs/perf.md.)
    #[default]
    Weighted,
}

impl Rule {
    /// The name on the command line and in thresholds files.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Cats => "cats",
            Rule::Weighted => "weighted",
        }
    }

    /// Parses [`Rule::name`].
    pub fn from_name(s: &str) -> Option<Rule> {
        [Rule::Cats, Rule::Weighted].into_iter().find(|r| r.name() == s)
    }
}

/// The layer-wise weighted scores of a profile's token samples under a rule (see [`calibrate`]).
pub struct LayerScores {
    layers: Vec<WeightedScores>,
    scales: Option<Vec<Vec<f32>>>,
}

impl LayerScores {
    /// The scores of `profile`'s token samples under `rule`.
    pub fn new(profile: &ActivationProfile, rule: Rule) -> Result<LayerScores, PrepareError> {
        if profile.n_token_samples() == 0 {
            return Err(PrepareError::ProfileLacks { what: "token samples" });
        }
        let scales = match rule {
            Rule::Weighted => Some(score_scales(profile)?),
            Rule::Cats => None,
        };
        let ones = vec![1.0; profile.n_ff()];
        let layers = (0..profile.n_layers())
            .map(|l| WeightedScores::new(profile, l, scales.as_ref().map_or(&ones, |s| &s[l])))
            .collect();
        Ok(LayerScores { layers, scales })
    }

    /// The rule with every layer's threshold at `sparsity`.
    pub fn rule(&self, sparsity: f64) -> FfnRule {
        let thresholds = self.layers.iter().map(|w| w.threshold(sparsity)).collect();
        FfnRule { thresholds, scales: self.scales.clone() }
    }

    /// Per layer, the sparsity each threshold of `rule` gives on the token samples.
    pub fn achieved(&self, rule: &FfnRule) -> Vec<f64> {
        self.layers.iter().zip(&rule.thresholds).map(|(w, &t)| w.sparsity(t)).collect()
    }

    /// The thresholds file of [`LayerScores::rule`] at `sparsity` for `model` profiled as `profile`, with the
    /// quality budget it was searched under, if any.
    fn thresholds(
        &self,
        model: &Model,
        profile: &ActivationProfile,
        sparsity: f64,
        quality: Option<Quality>,
    ) -> Thresholds {
        let r = self.rule(sparsity);
        Thresholds {
            model: model.config().name.clone().unwrap_or_default(),
            target_sparsity: sparsity,
            calib_tokens: profile.n_tokens(),
            layers: r.thresholds.iter().copied().zip(self.achieved(&r)).collect(),
            scales: r.scales,
            quality,
        }
    }
}

/// The held-out split of a calibration text: its last `n` tokens, or `None` if the text has fewer than twice
/// that many (the rest must leave something to profile).
pub fn heldout_tokens(model: &Model, text: &str, n: usize) -> Option<Vec<u32>> {
    let tok = model.tokenizer();
    let tokens = tok.encode(text, tok.add_bos(), false);
    (n > 0 && tokens.len() >= 2 * n).then(|| tokens[tokens.len() - n..].to_vec())
}

/// Highest sparsity searched by [`search_sparsity`].
pub const MAX_SEARCHED_SPARSITY: f64 = 0.9;

/// The highest uniform sparsity (to 0.01) under the rule of `scores` whose perplexity on `heldout` (chunks of
/// `chunk` tokens, scored as `pinion perplexity` scores them) is at most `1 + max_increase` times the dense
/// one: bisection on [0, [`MAX_SEARCHED_SPARSITY`]], perplexity taken as rising with sparsity.
/// `progress(probe, sparsity, ppl)` is called after each measurement (probe 0 is dense).
pub fn search_sparsity(
    model: &Model,
    scores: &LayerScores,
    heldout: &[u32],
    chunk: usize,
    threads: usize,
    max_increase: f64,
    progress: &mut dyn FnMut(usize, f64, f64),
) -> Result<Quality, PrepareError> {
    if !(max_increase.is_finite() && max_increase >= 0.0) {
        return Err(PrepareError::InvalidSetting {
            setting: "max-ppl-increase",
            why: format!("{max_increase} is not a finite share >= 0"),
        });
    }
    let mut ctx = Context::new(model, ContextParams::new(chunk, threads))?;
    let bos = model.tokenizer().added_bos();
    let mut probes = Vec::new();
    let mut ppl = |ctx: &mut Context<'_>, s: f64| -> Result<f64, PrepareError> {
        ctx.set_ffn_rule((s > 0.0).then(|| scores.rule(s)))?;
        let p = pinion_runtime::perplexity(ctx, heldout, bos, None, &mut |_, _| true)?.ppl();
        progress(probes.len(), s, p);
        probes.push((s, p));
        Ok(p)
    };
    let base = ppl(&mut ctx, 0.0)?;
    let limit = base * (1.0 + max_increase);
    // In hundredths: `lo` is within the budget, `hi` is not (or is the top of the range).
    let (mut lo, mut hi) = (0u32, (MAX_SEARCHED_SPARSITY * 100.0).round() as u32);
    let mut at_lo = base;
    let top = ppl(&mut ctx, f64::from(hi) / 100.0)?;
    if top <= limit {
        (lo, at_lo) = (hi, top);
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        let p = ppl(&mut ctx, f64::from(mid) / 100.0)?;
        if p <= limit {
            (lo, at_lo) = (mid, p);
        } else {
            hi = mid;
        }
    }
    Ok(Quality {
        max_ppl_increase: max_increase,
        heldout_tokens: heldout.len(),
        base_ppl: base,
        ppl: at_lo,
        sparsity: f64::from(lo) / 100.0,
        probes,
    })
}

/// Per-layer thresholds under a quality budget: the highest uniform sparsity under `rule` whose perplexity on
/// `heldout` stays within `1 + max_increase` times the dense one ([`search_sparsity`]), with what was measured
/// in [`Thresholds::quality`]. SiLU and GELU models only (the ReLU family keeps its own zeros: [`calibrate`]).
#[allow(clippy::too_many_arguments)]
pub fn calibrate_for_quality(
    model: &Model,
    profile: &ActivationProfile,
    rule: Rule,
    heldout: &[u32],
    chunk: usize,
    threads: usize,
    max_increase: f64,
    progress: &mut dyn FnMut(usize, f64, f64),
) -> Result<Thresholds, PrepareError> {
    check_shape(model, profile)?;
    let scores = LayerScores::new(profile, rule)?;
    let q = search_sparsity(model, &scores, heldout, chunk, threads, max_increase, progress)?;
    Ok(scores.thresholds(model, profile, q.sparsity, Some(q)))
}

/// Per-layer thresholds for a target `sparsity` under `rule`: for SiLU and GELU, each layer's threshold is the
/// `sparsity` quantile of the weighted scores of the profile's token samples (CATS: of its score samples);
/// for the ReLU family, 0 (the activation's own zeros), whose achieved sparsity is then measured, not chosen,
/// and the rule does not apply.
pub fn calibrate(
    model: &Model,
    profile: &ActivationProfile,
    sparsity: f64,
    rule: Rule,
) -> Result<Thresholds, PrepareError> {
    check_shape(model, profile)?;
    let act = model.config().ffn_act;
    if !act.is_relu_family() && sparsity <= 0.0 && profile.n_token_samples() == 0 {
        // Every neuron is kept: thresholds of 0 need no samples (a profile made for no sparsity keeps none).
        let scales = match rule {
            Rule::Weighted => Some(score_scales(profile)?),
            Rule::Cats => None,
        };
        return Ok(Thresholds {
            model: model.config().name.clone().unwrap_or_default(),
            target_sparsity: 0.0,
            calib_tokens: profile.n_tokens(),
            layers: vec![(0.0, 0.0); profile.n_layers()],
            scales,
            quality: None,
        });
    }
    if !act.is_relu_family() && rule == Rule::Weighted {
        return Ok(LayerScores::new(profile, rule)?.thresholds(model, profile, sparsity, None));
    }
    let layers = if act.is_relu_family() {
        (0..profile.n_layers())
            .map(|l| {
                let s = profile.samples(l);
                let off = s.iter().filter(|&&v| !act.is_active(v, 0.0)).count();
                (0.0, off as f64 / s.len().max(1) as f64)
            })
            .collect()
    } else {
        profile.thresholds(sparsity)
    };
    Ok(Thresholds {
        model: model.config().name.clone().unwrap_or_default(),
        target_sparsity: if act.is_relu_family() { f64::NAN } else { sparsity },
        calib_tokens: profile.n_tokens(),
        layers,
        scales: None,
        quality: None,
    })
}

/// The weighted rule's per-neuron scales `c_i = rms(u_i)`, normalised to a mean of 1 per layer and floored at
/// 1e-6 of it (a scale must be positive).
pub fn score_scales(profile: &ActivationProfile) -> Result<Vec<Vec<f32>>, PrepareError> {
    (0..profile.n_layers())
        .map(|l| {
            let rms = profile.up_rms(l).ok_or(PrepareError::ProfileLacks { what: "up values" })?;
            let mean = rms.iter().sum::<f64>() / rms.len().max(1) as f64;
            let mean = if mean > 0.0 && mean.is_finite() { mean } else { 1.0 };
            Ok(rms.iter().map(|&c| (c / mean).max(1e-6) as f32).collect())
        })
        .collect()
}

/// A layer's weighted scores on the profile's token samples, sorted: `|act(g_i)| * c_i` in the comparison
/// the runtime makes (`|act(g_i)| >= t / c_i`).
struct WeightedScores {
    sorted: Vec<f32>,
}

impl WeightedScores {
    fn new(profile: &ActivationProfile, l: usize, scales: &[f32]) -> WeightedScores {
        let mut sorted: Vec<f32> = profile
            .sample_scores(l)
            .chunks_exact(profile.n_ff())
            .flat_map(|row| row.iter().zip(scales).map(|(s, &c)| s.to_f32() * c))
            .collect();
        sorted.sort_by(f32::total_cmp);
        WeightedScores { sorted }
    }

    /// The threshold below which a share `sparsity` of the scores lies (the smallest score above that many).
    fn threshold(&self, sparsity: f64) -> f32 {
        threshold_of_sorted(&self.sorted, sparsity)
    }

    /// The share of scores below `t`.
    fn sparsity(&self, t: f32) -> f64 {
        self.sorted.partition_point(|&s| s < t) as f64 / self.sorted.len().max(1) as f64
    }
}

fn check_shape(model: &Model, profile: &ActivationProfile) -> Result<(), PrepareError> {
    let c = model.config();
    if profile.n_layers() != c.n_units() || profile.n_ff() != c.n_ff {
        return Err(PrepareError::ProfileShape {
            got: (profile.n_layers(), profile.n_ff()),
            want: (c.n_units(), c.n_ff),
        });
    }
    Ok(())
}

/// Settings of [`pack_model`].
#[derive(Clone, Debug)]
pub struct PackStepOptions {
    /// Neurons per packed record.
    pub cluster_neurons: usize,
    /// Type of the transposed down columns.
    pub down_type: GgmlType,
    /// Per layer, the share of neurons the predictors mark per token on held-out tokens (recorded for the
    /// planner).
    pub predicted_density: Option<Vec<f32>>,
    /// Per FFN unit of a mixture of experts, the share of calibration tokens routed to it
    /// ([`route_frequencies`]; recorded for the planner).
    pub route_frequency: Option<Vec<f32>>,
}

/// Per FFN unit of a mixture of experts profiled as `profile`, the share of its tokens routed to the unit's
/// expert; `None` for a dense model.
pub fn route_frequencies(model: &Model, profile: &ActivationProfile) -> Option<Vec<f32>> {
    model.config().moe?;
    Some((0..profile.n_layers()).map(|u| profile.token_share(u).min(1.0) as f32).collect())
}

impl Default for PackStepOptions {
    fn default() -> PackStepOptions {
        PackStepOptions {
            cluster_neurons: 32,
            down_type: GgmlType::Q8_0,
            predicted_density: None,
            route_frequency: None,
        }
    }
}

/// Per layer, each neuron's activation frequency under the calibrated thresholds: on all profiled tokens for
/// the ReLU family (threshold 0), on the token samples for SiLU (whose thresholds come after profiling).
pub fn activation_frequencies(
    model: &Model,
    profile: &ActivationProfile,
    thresholds: &Thresholds,
) -> Result<Vec<Vec<f64>>, PrepareError> {
    check_shape(model, profile)?;
    let act = model.config().ffn_act;
    Ok((0..profile.n_layers())
        .map(|l| match act.is_relu_family() {
            true => profile.firing_frequency(l),
            // No token samples: the thresholds are 0 (a profile keeps none otherwise), and a neuron is active
            // when its score is positive, which the firing counts (over all tokens) record.
            false if profile.n_token_samples() == 0 => profile.firing_frequency(l),
            // On the token samples, which are the layer's tokens, or an expert's routed ones: times the share of
            // all tokens the layer (1) or expert saw.
            false => {
                let used = profile.token_share(l);
                let t = thresholds.neuron_thresholds(l);
                let f = profile.sample_frequency(l, &t, |s, t| act.is_active(s, t));
                f.into_iter().map(|f| (f * used).min(1.0)).collect()
            }
        })
        .collect())
}

/// Packs the GGUF at `src` into the neuron-cluster format at `out` (written to a temporary name and renamed):
/// neurons ordered by activation frequency (hottest first), the thresholds and predictors carried in the
/// resident section. `progress(layer, n_layers)` is called after each layer.
pub fn pack_model(
    src: &Path,
    out: &Path,
    frequencies: &[Vec<f64>],
    thresholds: &Thresholds,
    predictors: Option<&[LowRankPredictor]>,
    opts: &PackStepOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PackSummary, PrepareError> {
    let file =
        MappedFile::open(src).map_err(|source| PrepareError::Io { path: src.to_path_buf(), source })?;
    let format_err = |source| PrepareError::Format { path: src.to_path_buf(), source };
    let gguf = Gguf::parse(&file).map_err(format_err)?;
    let order: Vec<Vec<u32>> = frequencies
        .iter()
        .map(|f| {
            let mut ids: Vec<u32> = (0..f.len() as u32).collect();
            ids.sort_by(|&a, &b| f[b as usize].total_cmp(&f[a as usize]).then(a.cmp(&b)));
            ids
        })
        .collect();
    let mut metadata = vec![
        (THRESHOLDS_KEY.to_string(), Value::Array(thresholds.values().into_iter().map(Value::F32).collect())),
        (SOURCE_BYTES_KEY.to_string(), Value::U64(file.len() as u64)),
    ];
    if let (Some(d), Some(_)) = (&opts.predicted_density, predictors) {
        metadata.push((
            PREDICTED_DENSITY_KEY.to_string(),
            Value::Array(d.iter().map(|&x| Value::F32(x)).collect()),
        ));
    }
    if let Some(r) = &opts.route_frequency {
        metadata.push((
            ROUTE_FREQUENCY_KEY.to_string(),
            Value::Array(r.iter().map(|&x| Value::F32(x)).collect()),
        ));
    }
    if thresholds.target_sparsity.is_finite() {
        metadata.push((TARGET_SPARSITY_KEY.to_string(), Value::F32(thresholds.target_sparsity as f32)));
    }
    if let Some(q) = &thresholds.quality {
        metadata.push((PPL_INCREASE_KEY.to_string(), Value::F32(q.increase() as f32)));
        metadata.push((MAX_PPL_INCREASE_KEY.to_string(), Value::F32(q.max_ppl_increase as f32)));
    }
    let mut extra_tensors = Vec::new();
    for (l, scales) in thresholds.scales.iter().flatten().enumerate() {
        extra_tensors.push(ExtraTensor {
            name: score_scale_tensor(l),
            ty: GgmlType::F32,
            dims: vec![scales.len() as u64],
            data: bytemuck::cast_slice(scales).to_vec(),
        });
    }
    if let Some(ps) = predictors {
        let logit_t = ps.iter().map(|p| Value::F32(p.threshold())).collect();
        metadata.push((PREDICTOR_THRESHOLDS_KEY.to_string(), Value::Array(logit_t)));
        for (l, p) in ps.iter().enumerate() {
            extra_tensors.extend(predictor_tensors(l, p));
        }
    }
    let frequency =
        Some(frequencies.iter().map(|f| f.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect()).collect());
    let popts = PackOptions {
        cluster_neurons: opts.cluster_neurons,
        down_type: opts.down_type,
        order: Some(order),
        frequency,
        metadata,
        extra_tensors,
    };
    let io = |source| PrepareError::Io { path: out.to_path_buf(), source };
    let tmp = partial_path(out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
    // Each FFN unit's weights are read once: their pages are dropped from memory after it, so that packing a
    // model larger than memory keeps a unit's weights in the resident set, not the model.
    let summary = pack(&gguf, &popts, &mut w, &mut |p| {
        let _ = file.release(0..file.len());
        progress(p.layer + 1, p.n_layers)
    })
    .map_err(|source| PrepareError::Format { path: out.to_path_buf(), source });
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            drop(w);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(summary)
}

/// Trains one predictor per layer on the profile's token samples: inputs are the FFN inputs, labels the neurons
/// active under the calibrated thresholds. `progress(layer, n_layers, report)` is called after each layer.
pub fn train_predictors(
    model: &Model,
    profile: &ActivationProfile,
    thresholds: &Thresholds,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(usize, usize, &LayerReport),
) -> Result<Vec<(LowRankPredictor, LayerReport)>, PrepareError> {
    check_shape(model, profile)?;
    let c = model.config();
    let act = c.ffn_act;
    let n = c.n_units();
    let mut out = Vec::with_capacity(n);
    for l in 0..n {
        if profile.d_in() != c.d_model || profile.layer_token_samples(l) < 2 {
            return Err(PrepareError::Training {
                layer: l,
                why: format!(
                    "the profile holds {} token samples of width {} for this FFN unit (need at least 2 of width \
                     {}; an expert needs tokens routed to it: profile more tokens)",
                    profile.layer_token_samples(l),
                    profile.d_in(),
                    c.d_model
                ),
            });
        }
        let t = thresholds.neuron_thresholds(l);
        let words = profile.sample_masks(l, &t, |s, t| act.is_active(s, t));
        let masks = Masks::from_words(profile.layer_token_samples(l), c.n_ff, words)
            .map_err(|e| PrepareError::Training { layer: l, why: e.to_string() })?;
        let x = profile.sample_inputs(l);
        let (mut p, report) = train_layer(&x, c.d_model, &masks, cfg)
            .map_err(|e| PrepareError::Training { layer: l, why: e.to_string() })?;
        // A layer whose held-out split had no active neuron predicts none: keep the threshold finite.
        if !p.threshold().is_finite() {
            p.set_threshold(f32::MAX);
        }
        progress(l + 1, n, &report);
        out.push((p, report));
    }
    Ok(out)
}

/// Writes trained predictors as a small GGUF (the tensors of [`predictor_tensor_names`] and the logit
/// thresholds under [`PREDICTOR_THRESHOLDS_KEY`]), to a temporary name renamed into place.
pub fn save_predictors(predictors: &[LowRankPredictor], path: &Path) -> Result<(), PrepareError> {
    let mut w = GgufWriter::new();
    let logit_t = predictors.iter().map(|p| Value::F32(p.threshold())).collect();
    let format_err = |source| PrepareError::Format { path: path.to_path_buf(), source };
    w.add_metadata(PREDICTOR_THRESHOLDS_KEY, Value::Array(logit_t)).map_err(format_err)?;
    for (l, p) in predictors.iter().enumerate() {
        for t in predictor_tensors(l, p) {
            w.add_tensor_data(&t.name, t.ty, &t.dims, t.data).map_err(format_err)?;
        }
    }
    write_atomic(path, &w.to_bytes().map_err(format_err)?)
}

/// Reads predictors written by [`save_predictors`] (outputs in neuron id order).
pub fn load_predictors(path: &Path) -> Result<Vec<LowRankPredictor>, PrepareError> {
    let bytes =
        std::fs::read(path).map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })?;
    let g =
        Gguf::parse(&bytes).map_err(|source| PrepareError::Format { path: path.to_path_buf(), source })?;
    let bad = |why: String| PrepareError::BadPredictorsFile { path: path.to_path_buf(), why };
    let logit_t = g
        .get_array(PREDICTOR_THRESHOLDS_KEY)
        .map_err(|source| PrepareError::Format { path: path.to_path_buf(), source })?;
    let mut out = Vec::with_capacity(logit_t.len());
    for (l, t) in logit_t.iter().enumerate() {
        let Value::F32(t) = *t else { return Err(bad(format!("layer {l}: threshold is not f32"))) };
        let [w1, b1, w2, b2] = predictor_tensor_names(l).map(|n| g.tensor(&n));
        let fe = |source| PrepareError::Format { path: path.to_path_buf(), source };
        let (w1, b1, w2, b2) = (w1.map_err(fe)?, b1.map_err(fe)?, w2.map_err(fe)?, b2.map_err(fe)?);
        let (d_in, rank) = (w1.dims[0] as usize, w1.dims.get(1).copied().unwrap_or(0) as usize);
        let n_out = b2.dims[0] as usize;
        let f32s = |t: &pinion_format::TensorView<'_>| -> Result<Vec<f32>, PrepareError> {
            if t.ty != GgmlType::F32 {
                return Err(bad(format!("layer {l}: predictor tensors must be F32")));
            }
            Ok(bytemuck::pod_collect_to_vec(t.data))
        };
        let mut p = LowRankPredictor::new(d_in, rank, n_out, f32s(&w1)?, f32s(&b1)?, f32s(&w2)?, f32s(&b2)?)
            .map_err(|e| bad(format!("layer {l}: {e}")))?;
        p.set_threshold(t);
        out.push(p);
    }
    Ok(out)
}

/// A predictor's four tensors, as stored in predictor files and packed models.
pub fn predictor_tensors(l: usize, p: &LowRankPredictor) -> Vec<ExtraTensor> {
    let (d, r, n) = (p.d_in() as u64, p.rank() as u64, p.n_out() as u64);
    let [w1, b1, w2, b2] = predictor_tensor_names(l);
    [(w1, vec![d, r], p.w1()), (b1, vec![r], p.b1()), (w2, vec![r, n], p.w2()), (b2, vec![n], p.b2())]
        .into_iter()
        .map(|(name, dims, data)| ExtraTensor {
            name,
            ty: GgmlType::F32,
            dims,
            data: bytemuck::cast_slice(data).to_vec(),
        })
        .collect()
}
