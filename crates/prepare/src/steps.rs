//! The offline preparation steps as library functions: profile activations over a calibration text,
//! calibrate thresholds, train predictors and pack the model; and the manifest that makes `prepare` resumable.

use std::path::Path;

use pinion_format::packed::{ExtraTensor, PackOptions, PackSummary, pack};
use pinion_format::{GgmlType, Gguf, GgufWriter, Value};
use pinion_io::MappedFile;
use pinion_predictor::train::{LayerReport, Masks, TrainConfig, train_layer};
use pinion_predictor::{ActivationProfile, LowRankPredictor};

use pinion_runtime::{
    Context, ContextParams, Model, PREDICTED_DENSITY_KEY, PREDICTOR_THRESHOLDS_KEY, SOURCE_BYTES_KEY,
    TARGET_SPARSITY_KEY, THRESHOLDS_KEY, predictor_tensor_names,
};

use crate::error::PrepareError;
use crate::files::{partial_path, write_atomic};
use crate::thresholds::Thresholds;

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
        ProfileOptions {
            max_tokens: 16384,
            chunk: 512,
            score_samples: 1 << 18,
            token_samples: 4096,
            threads: 2,
        }
    }
}

/// Runs the dense model over `text` in chunks and records every layer's activation statistics and token samples
/// (see [`ActivationProfile`]). `progress(done, total)` is called after each chunk, in tokens.
pub fn profile_activations(
    model: &Model,
    text: &str,
    opts: &ProfileOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActivationProfile, PrepareError> {
    let tok = model.tokenizer();
    let tokens = tok.encode(text, tok.add_bos(), false);
    let chunk = opts.chunk.min(model.config().n_ctx_train).max(1);
    if tokens.len() < chunk.min(opts.max_tokens) || tokens.is_empty() {
        return Err(PrepareError::CalibrationTooShort {
            tokens: tokens.len(),
            needed: chunk.min(opts.max_tokens),
        });
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

/// Per-layer thresholds for a target sparsity: calibrated on the profile's score samples for SiLU (CATS), and 0
/// (the activation's own zeros) for the ReLU family, whose achieved sparsity is then measured, not chosen.
pub fn calibrate(
    model: &Model,
    profile: &ActivationProfile,
    sparsity: f64,
) -> Result<Thresholds, PrepareError> {
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

fn check_shape(model: &Model, profile: &ActivationProfile) -> Result<(), PrepareError> {
    let c = model.config();
    if profile.n_layers() != c.n_layers || profile.n_ff() != c.n_ff {
        return Err(PrepareError::ProfileShape {
            got: (profile.n_layers(), profile.n_ff()),
            want: (c.n_layers, c.n_ff),
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
}

impl Default for PackStepOptions {
    fn default() -> PackStepOptions {
        PackStepOptions { cluster_neurons: 32, down_type: GgmlType::Q8_0, predicted_density: None }
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
    if thresholds.target_sparsity.is_finite() {
        metadata.push((TARGET_SPARSITY_KEY.to_string(), Value::F32(thresholds.target_sparsity as f32)));
    }
    let mut extra_tensors = Vec::new();
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
    let summary = pack(&gguf, &popts, &mut w, &mut |p| progress(p.layer + 1, p.n_layers))
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
    if profile.d_in() != c.d_model || profile.n_token_samples() < 2 {
        return Err(PrepareError::Training {
            layer: 0,
            why: format!(
                "the profile holds {} token samples of width {} (need at least 2 of width {})",
                profile.n_token_samples(),
                profile.d_in(),
                c.d_model
            ),
        });
    }
    let act = c.ffn_act;
    let mut out = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let t = thresholds.layers[l].0;
        let words = profile.sample_masks(l, t, |s, t| act.is_active(s, t));
        let masks = Masks::from_words(profile.n_token_samples(), c.n_ff, words)
            .map_err(|e| PrepareError::Training { layer: l, why: e.to_string() })?;
        let x = profile.sample_inputs(l);
        let (mut p, report) = train_layer(&x, c.d_model, &masks, cfg)
            .map_err(|e| PrepareError::Training { layer: l, why: e.to_string() })?;
        // A layer whose held-out split had no active neuron predicts none: keep the threshold finite.
        if !p.threshold().is_finite() {
            p.set_threshold(f32::MAX);
        }
        progress(l + 1, c.n_layers, &report);
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

/// The `format` field of a prepared directory's manifest.
pub const MANIFEST_FORMAT: &str = "pinion-prepared";
/// The manifest version written, and the only one read.
pub const MANIFEST_VERSION: u64 = 1;
/// The manifest's file name inside a prepared directory.
pub const MANIFEST_FILE: &str = "prepare.json";

/// The record of which preparation steps a directory holds, so that `cargo xtask prepare` resumes where it
/// stopped and redoes a step only when its inputs or settings changed.
///
/// Each step is recorded with a *key*: a digest of its settings and of the keys of the steps it depends on. A
/// step is done when its recorded key equals the key asked for and its output files exist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    steps: std::collections::BTreeMap<String, String>,
}

impl Manifest {
    /// Reads `dir`'s manifest; an absent one is empty, an unreadable or foreign one is an error.
    pub fn load(dir: &Path) -> Result<Manifest, PrepareError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(source) => return Err(PrepareError::Io { path, source }),
        };
        let bad = |why: &str| PrepareError::BadPreparedDir { path: path.clone(), why: why.into() };
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
        if v["format"] != MANIFEST_FORMAT || v["version"].as_u64() != Some(MANIFEST_VERSION) {
            return Err(bad("not a version 1 pinion-prepared manifest"));
        }
        let steps = v["steps"].as_object().ok_or_else(|| bad("no steps"))?;
        let steps = steps
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_string()))
                    .ok_or_else(|| bad("a step key is not a string"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Manifest { steps })
    }

    /// Whether `step` was done with `key` and all its `outputs` exist.
    pub fn is_done(&self, step: &str, key: &str, outputs: &[&Path]) -> bool {
        self.steps.get(step).is_some_and(|k| k == key) && outputs.iter().all(|p| p.exists())
    }

    /// Records `step` as done with `key` and writes the manifest (atomically) into `dir`.
    pub fn mark(&mut self, dir: &Path, step: &str, key: &str) -> Result<(), PrepareError> {
        self.steps.insert(step.to_string(), key.to_string());
        let v =
            serde_json::json!({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "steps": self.steps});
        write_atomic(
            &dir.join(MANIFEST_FILE),
            serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes(),
        )
    }
}

/// A step key: the hex SHA-256 of the parts, in order.
pub fn step_key(parts: &[&str]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies an input file for a step key: its path, length and modification time.
pub fn file_identity(path: &Path) -> Result<String, PrepareError> {
    let m =
        std::fs::metadata(path).map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}", path.display(), m.len(), mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_records_steps_and_resumes_only_matching_ones() {
        let dir = std::env::temp_dir().join(format!("pinion-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("profile.bin");
        let mut m = Manifest::load(&dir).unwrap();
        assert_eq!(m, Manifest::default(), "no manifest yet");
        let key = step_key(&["model:1:2", "calib", "16384 512"]);
        assert!(!m.is_done("profile", &key, &[&out]));
        m.mark(&dir, "profile", &key).unwrap();
        // Recorded, but the output is missing: not done.
        assert!(!m.is_done("profile", &key, &[&out]));
        std::fs::write(&out, b"x").unwrap();
        let again = Manifest::load(&dir).unwrap();
        assert!(again.is_done("profile", &key, &[&out]));
        // Another setting or another step is not done.
        assert!(!again.is_done("profile", &step_key(&["model:1:2", "calib", "8192 512"]), &[&out]));
        assert!(!again.is_done("pack", &key, &[&out]));
        // Keys separate their parts: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(step_key(&["ab", "c"]), step_key(&["a", "bc"]));
        // A foreign or corrupt manifest is a typed error, not an empty one.
        std::fs::write(dir.join(MANIFEST_FILE), br#"{"format": "other", "version": 1, "steps": {}}"#)
            .unwrap();
        assert!(matches!(Manifest::load(&dir), Err(PrepareError::BadPreparedDir { .. })));
        std::fs::write(dir.join(MANIFEST_FILE), b"{").unwrap();
        assert!(matches!(Manifest::load(&dir), Err(PrepareError::BadPreparedDir { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_identity_changes_with_the_file() {
        let dir = std::env::temp_dir().join(format!("pinion-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, b"one").unwrap();
        let a = file_identity(&f).unwrap();
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(file_identity(&f).unwrap(), a);
        assert!(matches!(file_identity(&dir.join("missing")), Err(PrepareError::Io { .. })));
        assert_eq!(partial_path(&f), dir.join("a.txt.partial"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
