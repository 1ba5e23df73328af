//! Threshold-sparsity files: a calibrated rule choosing FFN neurons (per-layer thresholds, and for a weighted
//! rule per-neuron scales; see `pinion_runtime::FfnRule`), as a small versioned JSON file written and read with
//! serde.
//!
//! Format (version 2; version 1 files, which have no `rule` and no `scales`, are read as CATS), documented in
//! docs/format.md:
//! `{"format": "pinion-thresholds", "version": 2, "model": NAME, "target_sparsity": S, "calib_tokens": N,
//!   "rule": "cats" | "weighted", "quality": {"max_ppl_increase": P, "heldout_tokens": N, "base_ppl": B,
//!   "ppl": Q, "sparsity": S, "probes": [[S, PPL], ...]} (only when the sparsity was searched),
//!   "layers": [{"threshold": T, "achieved_sparsity": A, "scales": [c_0, c_1, ...]}, ...]}` with one entry per
//! layer, in order; `scales` (one per neuron, in the GGUF's order) only in a weighted rule.

use std::path::Path;

use pinion_runtime::FfnRule;
use serde::{Deserialize, Serialize};

use crate::error::{PrepareError, io_err};
use crate::files::{from_json, to_json, write_atomic};

/// The `format` field of a thresholds file.
pub const THRESHOLDS_FORMAT: &str = "pinion-thresholds";
/// The version written; versions 1 to this one are read.
pub const THRESHOLDS_VERSION: u64 = 2;

/// The `rule` of a file whose layers carry no scales.
const CATS: &str = "cats";
/// The `rule` of a file whose layers carry scales.
const WEIGHTED: &str = "weighted";

/// What `search_sparsity` found: the highest uniform sparsity whose held-out perplexity stays within the
/// budget, and what it measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// The budget: the largest relative perplexity increase allowed (0.03 is 3%).
    pub max_ppl_increase: f64,
    /// Held-out tokens the perplexity was measured on.
    pub heldout_tokens: usize,
    /// Dense perplexity on them.
    pub base_ppl: f64,
    /// Perplexity at the sparsity found.
    pub ppl: f64,
    /// The sparsity found.
    pub sparsity: f64,
    /// Every sparsity tried and its perplexity, in order.
    pub probes: Vec<(f64, f64)>,
}

impl Quality {
    /// The relative perplexity increase at the sparsity found.
    pub fn increase(&self) -> f64 {
        self.ppl / self.base_ppl - 1.0
    }
}

/// A calibrated rule: per-layer thresholds, and per-neuron scales for a weighted rule.
///
/// Serialized as the fields of the thresholds file (without its `format` and `version`): `target_sparsity` is
/// `null` when it is not finite (ReLU-family models), and deserializing refuses a threshold that is negative
/// or not finite, a scale that is not finite and positive, and scales on some layers only. Two values without
/// a target (NaN) are equal.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "ThresholdsBody", try_from = "ThresholdsBody")]
pub struct Thresholds {
    /// Name of the model they were calibrated on.
    pub model: String,
    /// The sparsity asked for (NaN when the thresholds are the activation's own zeros).
    pub target_sparsity: f64,
    /// Tokens of the calibration run.
    pub calib_tokens: u64,
    /// Per layer: the threshold and the sparsity it gave on the calibration samples.
    pub layers: Vec<(f32, f64)>,
    /// Per layer and neuron (GGUF order), the scales of a weighted rule; `None`: CATS.
    pub scales: Option<Vec<Vec<f32>>>,
    /// The quality budget the sparsity was searched under, and what it measured; `None`: a fixed sparsity.
    pub quality: Option<Quality>,
}

impl PartialEq for Thresholds {
    fn eq(&self, other: &Thresholds) -> bool {
        let no_target = self.target_sparsity.is_nan() && other.target_sparsity.is_nan();
        self.model == other.model
            && (no_target || self.target_sparsity == other.target_sparsity)
            && self.calib_tokens == other.calib_tokens
            && self.layers == other.layers
            && self.scales == other.scales
            && self.quality == other.quality
    }
}

/// The thresholds as the file holds them. `model`, `target_sparsity`, `calib_tokens` and `rule` may be absent
/// (files written by hand, version 1), `layers` may not.
#[derive(Serialize, Deserialize)]
struct ThresholdsBody {
    #[serde(default)]
    model: String,
    #[serde(default)]
    target_sparsity: Option<f64>,
    #[serde(default)]
    calib_tokens: u64,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quality: Option<Quality>,
    layers: Vec<LayerThreshold>,
}

#[derive(Serialize, Deserialize)]
struct LayerThreshold {
    threshold: f32,
    achieved_sparsity: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scales: Option<Vec<f32>>,
}

impl From<Thresholds> for ThresholdsBody {
    fn from(t: Thresholds) -> ThresholdsBody {
        let rule = Some(if t.scales.is_some() { WEIGHTED } else { CATS }.to_string());
        let mut scales = t.scales.map(|s| s.into_iter().map(Some).collect::<Vec<_>>()).unwrap_or_default();
        scales.resize(t.layers.len(), None);
        ThresholdsBody {
            model: t.model,
            target_sparsity: t.target_sparsity.is_finite().then_some(t.target_sparsity),
            calib_tokens: t.calib_tokens,
            rule,
            quality: t.quality,
            layers: t
                .layers
                .into_iter()
                .zip(scales)
                .map(|((threshold, achieved_sparsity), scales)| LayerThreshold {
                    threshold,
                    achieved_sparsity,
                    scales,
                })
                .collect(),
        }
    }
}

impl TryFrom<ThresholdsBody> for Thresholds {
    type Error = String;

    fn try_from(b: ThresholdsBody) -> Result<Thresholds, String> {
        if let Some(l) = b.layers.iter().position(|l| !(l.threshold >= 0.0 && l.threshold.is_finite())) {
            return Err(format!(
                "layer {l}: the threshold {} is not finite and non-negative",
                b.layers[l].threshold
            ));
        }
        let weighted = match b.rule.as_deref() {
            None | Some(CATS) => false,
            Some(WEIGHTED) => true,
            Some(r) => return Err(format!("rule '{r}' (this pinion knows '{CATS}' and '{WEIGHTED}')")),
        };
        if let Some(l) = b.layers.iter().position(|l| l.scales.is_some() != weighted) {
            return Err(match weighted {
                true => format!("layer {l} has no scales, which a weighted rule needs"),
                false => format!("layer {l} has scales, which the rule '{CATS}' does not use"),
            });
        }
        for (l, layer) in b.layers.iter().enumerate() {
            let s = layer.scales.as_deref().unwrap_or_default();
            if let Some(i) = s.iter().position(|c| !(c.is_finite() && *c > 0.0)) {
                return Err(format!("layer {l} neuron {i}: the scale {} is not finite and positive", s[i]));
            }
            if s.len() != b.layers[0].scales.as_ref().map_or(0, Vec::len) {
                return Err(format!("layer {l}: {} scales, layer 0 has another count", s.len()));
            }
        }
        let mut scales = Vec::new();
        let mut layers = Vec::with_capacity(b.layers.len());
        for l in b.layers {
            layers.push((l.threshold, l.achieved_sparsity));
            scales.extend(l.scales);
        }
        Ok(Thresholds {
            model: b.model,
            target_sparsity: b.target_sparsity.unwrap_or(f64::NAN),
            calib_tokens: b.calib_tokens,
            layers,
            scales: weighted.then_some(scales),
            quality: b.quality,
        })
    }
}

impl Thresholds {
    /// The thresholds alone, one per layer.
    pub fn values(&self) -> Vec<f32> {
        self.layers.iter().map(|l| l.0).collect()
    }

    /// The rule the runtime runs.
    pub fn rule(&self) -> FfnRule {
        FfnRule { thresholds: self.values(), scales: self.scales.clone() }
    }

    /// Layer `l`'s thresholds as the runtime compares scores with them: one per neuron (GGUF order) for a
    /// weighted rule, the layer's alone for CATS.
    pub fn neuron_thresholds(&self, l: usize) -> Vec<f32> {
        self.rule().neuron_thresholds(l, None).unwrap_or_else(|| vec![self.layers[l].0])
    }

    /// The rule's name in the file: `cats` or `weighted`.
    pub fn rule_name(&self) -> &'static str {
        if self.scales.is_some() { WEIGHTED } else { CATS }
    }

    /// The mean over layers of the sparsity each achieved on the calibration samples.
    pub fn mean_sparsity(&self) -> f64 {
        self.layers.iter().map(|l| l.1).sum::<f64>() / self.layers.len().max(1) as f64
    }

    /// Writes the file (to a temporary name, renamed into place, so it is never half-written).
    pub fn save(&self, path: &Path) -> Result<(), PrepareError> {
        write_atomic(path, &to_json(THRESHOLDS_FORMAT, THRESHOLDS_VERSION, self))
    }

    /// Reads a file written by [`Thresholds::save`] (or by a pinion writing version 1): another format or
    /// version, a missing or mistyped field, or a bad threshold or scale is [`PrepareError::BadThresholdsFile`].
    pub fn load(path: &Path) -> Result<Thresholds, PrepareError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        from_json(&bytes, THRESHOLDS_FORMAT, 1..=THRESHOLDS_VERSION)
            .map(|(_, t)| t)
            .map_err(|why| PrepareError::BadThresholdsFile { path: path.to_path_buf(), why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("pinion-thresholds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.json");
        let t = Thresholds {
            model: "m".into(),
            target_sparsity: 0.5,
            calib_tokens: 1024,
            layers: vec![(0.25, 0.5), (0.125, 0.49)],
            scales: None,
            quality: None,
        };
        t.save(&p).unwrap();
        assert_eq!(Thresholds::load(&p).unwrap(), t);
        assert_eq!(t.values(), vec![0.25, 0.125]);
        // The file is the documented JSON, read here without serde's derive.
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["format"], THRESHOLDS_FORMAT);
        assert_eq!(v["version"], THRESHOLDS_VERSION);
        assert_eq!(v["layers"][1]["threshold"], 0.125);
        assert_eq!(v["layers"][0]["achieved_sparsity"], 0.5);
        assert_eq!(v["target_sparsity"], 0.5);
        assert_eq!(v["rule"], "cats");
        assert!(v["layers"][0].get("scales").is_none());
        // A weighted rule: scales per layer and neuron.
        let quality = Quality {
            max_ppl_increase: 0.03,
            heldout_tokens: 2048,
            base_ppl: 20.0,
            ppl: 20.5,
            sparsity: 0.5,
            probes: vec![(0.0, 20.0), (0.9, 80.0), (0.5, 20.5)],
        };
        let w = Thresholds {
            scales: Some(vec![vec![1.0, 0.5, 2.0], vec![0.25, 1.0, 4.0]]),
            quality: Some(quality),
            ..t.clone()
        };
        w.save(&p).unwrap();
        assert_eq!(Thresholds::load(&p).unwrap(), w);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["rule"], "weighted");
        assert_eq!(v["layers"][1]["scales"][2], 4.0);
        assert_eq!(v["quality"]["ppl"], 20.5);
        assert_eq!(w.rule().neuron_thresholds(1, None).unwrap(), vec![0.5, 0.125, 0.03125]);
        assert_ne!(w, t);
        // ReLU-family thresholds have no target: null in the file, NaN in memory.
        let relu = Thresholds { target_sparsity: f64::NAN, ..t.clone() };
        relu.save(&p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert!(v["target_sparsity"].is_null());
        assert!(Thresholds::load(&p).unwrap().target_sparsity.is_nan());
        assert_eq!(Thresholds::load(&p).unwrap(), relu);
        assert_ne!(relu, t);
        // A hand-written file needs only the envelope and the layers.
        std::fs::write(
            &p,
            br#"{"format": "pinion-thresholds", "version": 1, "layers": [{"threshold": 0.5, "achieved_sparsity": 0.4}]}"#,
        )
        .unwrap();
        assert_eq!(Thresholds::load(&p).unwrap().layers, vec![(0.5, 0.4)]);

        let bad = |text: &[u8]| {
            std::fs::write(&p, text).unwrap();
            match Thresholds::load(&p) {
                Err(PrepareError::BadThresholdsFile { why, .. }) => why,
                other => panic!("{other:?}"),
            }
        };
        assert!(bad(br#"{"format": "pinion-thresholds", "version": 3, "layers": []}"#).contains("version 3"));
        let l = r#""threshold": 0.5, "achieved_sparsity": 0.4"#;
        let v2 = |rule: &str, layers: &str| {
            format!(
                r#"{{"format": "pinion-thresholds", "version": 2, "rule": {rule}, "layers": [{layers}]}}"#
            )
        };
        assert!(bad(v2(r#""magic""#, &format!("{{{l}}}")).as_bytes()).contains("rule 'magic'"));
        assert!(bad(v2(r#""weighted""#, &format!("{{{l}}}")).as_bytes()).contains("no scales"));
        assert!(
            bad(v2(r#""cats""#, &format!(r#"{{{l}, "scales": [1]}}"#)).as_bytes()).contains("has scales")
        );
        let zero = v2(r#""weighted""#, &format!(r#"{{{l}, "scales": [1, 0]}}"#));
        assert!(bad(zero.as_bytes()).contains("neuron 1"));
        let ragged = v2(r#""weighted""#, &format!(r#"{{{l}, "scales": [1, 2]}}, {{{l}, "scales": [1]}}"#));
        assert!(bad(ragged.as_bytes()).contains("layer 1"));
        // Version 1 with scales is refused: version 1 knew no rule but CATS.
        let v1 =
            format!(r#"{{"format": "pinion-thresholds", "version": 1, "layers": [{{{l}, "scales": [1]}}]}}"#);
        assert!(bad(v1.as_bytes()).contains("has scales"));
        assert!(bad(br#"{"format": "pinion-plan", "version": 1, "layers": []}"#).contains("pinion-plan"));
        bad(b"{not json");
        bad(b"");
        bad(br#"{"format": "pinion-thresholds", "version": 1}"#);
        bad(br#"{"format": "pinion-thresholds", "version": 1, "layers": [{"threshold": -1, "achieved_sparsity": 0}]}"#);
        bad(br#"{"format": "pinion-thresholds", "version": 1, "layers": [{"threshold": 1e60, "achieved_sparsity": 0}]}"#);
        bad(br#"{"format": "pinion-thresholds", "version": 1, "layers": [{"threshold": "x", "achieved_sparsity": 0}]}"#);
        bad(br#"{"format": "pinion-thresholds", "version": 1, "layers": {}}"#);
        assert!(matches!(Thresholds::load(&dir.join("missing.json")), Err(PrepareError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
