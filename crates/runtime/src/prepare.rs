//! The offline preparation steps (PowerInfer-2's offline half) as library functions: profile activations over a
//! calibration text, calibrate thresholds, train predictors, pack the model and plan it. `cargo xtask prepare`
//! and its single-step commands only drive these and show progress.

use std::path::Path;

use pinion_format::packed::{ExtraTensor, PackOptions, PackSummary, pack};
use pinion_format::{GgmlType, Gguf, Value};
use pinion_io::MappedFile;
use pinion_predictor::{ActivationProfile, LowRankPredictor};

use crate::context::{Context, ContextParams};
use crate::error::RuntimeError;
use crate::model::{
    Model, PREDICTOR_THRESHOLDS_KEY, TARGET_SPARSITY_KEY, THRESHOLDS_KEY, predictor_tensor_names,
};
use crate::sparsity::Thresholds;

/// Settings of [`profile_activations`].
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Most calibration tokens to run.
    pub max_tokens: usize,
    /// Tokens per forward pass; each chunk starts from an empty cache.
    pub chunk: usize,
    /// Scores sampled per layer for threshold calibration.
    pub score_samples: usize,
    /// Tokens whose FFN inputs and scores are kept for predictor training.
    pub token_samples: usize,
    /// Compute threads.
    pub threads: usize,
}

impl Default for ProfileOptions {
    fn default() -> ProfileOptions {
        ProfileOptions { max_tokens: 16384, chunk: 512, score_samples: 1 << 20, token_samples: 4096, threads: 2 }
    }
}

/// Runs the dense model over `text` in chunks and records every layer's activation statistics and token samples
/// (see [`ActivationProfile`]). `progress(done, total)` is called after each chunk, in tokens.
pub fn profile_activations(
    model: &Model,
    text: &str,
    opts: &ProfileOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActivationProfile, RuntimeError> {
    let tok = model.tokenizer();
    let tokens = tok.encode(text, tok.add_bos(), false);
    let chunk = opts.chunk.min(model.config().n_ctx_train).max(1);
    if tokens.len() < chunk.min(opts.max_tokens) || tokens.is_empty() {
        return Err(RuntimeError::CalibrationTooShort { tokens: tokens.len(), needed: chunk.min(opts.max_tokens) });
    }
    let total = tokens.len().min(opts.max_tokens);
    let c = model.config();
    let mut profile = ActivationProfile::new(c.n_layers, c.n_ff, opts.score_samples)
        .with_token_samples(c.d_model, opts.token_samples);
    let mut ctx = Context::new(model, ContextParams::new(chunk, opts.threads))?;
    let mut done = 0;
    for piece in tokens[..total].chunks(chunk) {
        ctx.truncate(0);
        ctx.eval_profile(piece, &mut profile)?;
        done += piece.len();
        progress(done, total);
    }
    Ok(profile)
}

/// Writes a profile file (versioned, checksummed; docs/format.md), to a temporary name renamed into place.
pub fn save_profile(profile: &ActivationProfile, path: &Path) -> Result<(), RuntimeError> {
    let io = |source| RuntimeError::Io { path: path.to_path_buf(), source };
    let tmp = partial_path(path);
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    profile.write_to(&mut w).map_err(io)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a profile file written by [`save_profile`].
pub fn load_profile(path: &Path) -> Result<ActivationProfile, RuntimeError> {
    let f = std::fs::File::open(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
    ActivationProfile::read_from(&mut std::io::BufReader::new(f))
        .map_err(|e| RuntimeError::BadProfileFile { path: path.to_path_buf(), why: e.to_string() })
}

/// Per-layer thresholds for a target sparsity: calibrated on the profile's score samples for SiLU (CATS), and 0
/// (the activation's own zeros) for the ReLU family, whose achieved sparsity is then measured, not chosen.
pub fn calibrate(model: &Model, profile: &ActivationProfile, sparsity: f64) -> Result<Thresholds, RuntimeError> {
    check_shape(model, profile)?;
    let act = model.config().ffn_act;
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
    })
}

fn check_shape(model: &Model, profile: &ActivationProfile) -> Result<(), RuntimeError> {
    let c = model.config();
    if profile.n_layers() != c.n_layers || profile.n_ff() != c.n_ff {
        return Err(RuntimeError::ProfileShape {
            got: (profile.n_layers(), profile.n_ff()),
            want: (c.n_layers, c.n_ff),
        });
    }
    Ok(())
}

/// `path` with `.partial` appended to its file name: where a file is written before it is renamed into place.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Settings of [`pack_model`].
#[derive(Clone, Debug)]
pub struct PackStepOptions {
    /// Neurons per packed record.
    pub cluster_neurons: usize,
    /// Type of the transposed down columns.
    pub down_type: GgmlType,
}

impl Default for PackStepOptions {
    fn default() -> PackStepOptions {
        PackStepOptions { cluster_neurons: 32, down_type: GgmlType::Q8_0 }
    }
}

/// Per layer, each neuron's activation frequency under the calibrated thresholds: on all profiled tokens for
/// the ReLU family (threshold 0), on the token samples for SiLU (whose thresholds come after profiling).
pub fn activation_frequencies(
    model: &Model,
    profile: &ActivationProfile,
    thresholds: &Thresholds,
) -> Result<Vec<Vec<f64>>, RuntimeError> {
    check_shape(model, profile)?;
    let act = model.config().ffn_act;
    Ok((0..profile.n_layers())
        .map(|l| match act.is_relu_family() {
            true => profile.firing_frequency(l),
            false => profile.sample_frequency(l, thresholds.layers[l].0, |s, t| act.is_active(s, t)),
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
) -> Result<PackSummary, RuntimeError> {
    let file = MappedFile::open(src).map_err(|source| RuntimeError::Io { path: src.to_path_buf(), source })?;
    let format_err = |source| RuntimeError::Format { path: src.to_path_buf(), source };
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
    ];
    if thresholds.target_sparsity.is_finite() {
        metadata.push((TARGET_SPARSITY_KEY.to_string(), Value::F32(thresholds.target_sparsity as f32)));
    }
    let mut extra_tensors = Vec::new();
    if let Some(ps) = predictors {
        let logit_t = ps.iter().map(|p| Value::F32(p.threshold())).collect();
        metadata.push((PREDICTOR_THRESHOLDS_KEY.to_string(), Value::Array(logit_t)));
        for (l, p) in ps.iter().enumerate() {
            let (d, r, n) = (p.d_in() as u64, p.rank() as u64, p.n_out() as u64);
            let [w1, b1, w2, b2] = predictor_tensor_names(l);
            for (name, dims, data) in
                [(w1, vec![d, r], p.w1()), (b1, vec![r], p.b1()), (w2, vec![r, n], p.w2()), (b2, vec![n], p.b2())]
            {
                let data = bytemuck::cast_slice(data).to_vec();
                extra_tensors.push(ExtraTensor { name, ty: GgmlType::F32, dims, data });
            }
        }
    }
    let frequency = Some(frequencies.iter().map(|f| f.iter().map(|&v| v.clamp(0.0, 1.0) as f32).collect()).collect());
    let popts = PackOptions {
        cluster_neurons: opts.cluster_neurons,
        down_type: opts.down_type,
        order: Some(order),
        frequency,
        metadata,
        extra_tensors,
    };
    let io = |source| RuntimeError::Io { path: out.to_path_buf(), source };
    let tmp = partial_path(out);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
    let summary = pack(&gguf, &popts, &mut w, &mut |p| progress(p.layer + 1, p.n_layers))
        .map_err(|source| RuntimeError::Format { path: out.to_path_buf(), source });
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
