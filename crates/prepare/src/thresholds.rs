//! Threshold-sparsity files: per-layer CATS thresholds calibrated offline, as a small versioned JSON file
//! written and read with serde.
//!
//! Format (version 1), documented in docs/format.md:
//! `{"format": "pinion-thresholds", "version": 1, "model": NAME, "target_sparsity": S, "calib_tokens": N,
//!   "layers": [{"threshold": T, "achieved_sparsity": A}, ...]}` with one entry per layer, in order.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{PrepareError, io_err};
use crate::files::{from_json, to_json, write_atomic};

/// The `format` field of a thresholds file.
pub const THRESHOLDS_FORMAT: &str = "pinion-thresholds";
/// The version written, and the only one read.
pub const THRESHOLDS_VERSION: u64 = 1;

/// Calibrated per-layer thresholds.
///
/// Serialized as the fields of the thresholds file (without its `format` and `version`): `target_sparsity` is
/// `null` when it is not finite (ReLU-family models), and deserializing refuses a threshold that is negative
/// or not finite. Two values without a target (NaN) are equal.
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
}

impl PartialEq for Thresholds {
    fn eq(&self, other: &Thresholds) -> bool {
        let no_target = self.target_sparsity.is_nan() && other.target_sparsity.is_nan();
        self.model == other.model
            && (no_target || self.target_sparsity == other.target_sparsity)
            && self.calib_tokens == other.calib_tokens
            && self.layers == other.layers
    }
}

/// The thresholds as the file holds them. `model`, `target_sparsity` and `calib_tokens` may be absent (files
/// written by hand), `layers` may not.
#[derive(Serialize, Deserialize)]
struct ThresholdsBody {
    #[serde(default)]
    model: String,
    #[serde(default)]
    target_sparsity: Option<f64>,
    #[serde(default)]
    calib_tokens: u64,
    layers: Vec<LayerThreshold>,
}

#[derive(Serialize, Deserialize)]
struct LayerThreshold {
    threshold: f32,
    achieved_sparsity: f64,
}

impl From<Thresholds> for ThresholdsBody {
    fn from(t: Thresholds) -> ThresholdsBody {
        ThresholdsBody {
            model: t.model,
            target_sparsity: t.target_sparsity.is_finite().then_some(t.target_sparsity),
            calib_tokens: t.calib_tokens,
            layers: t
                .layers
                .into_iter()
                .map(|(threshold, achieved_sparsity)| LayerThreshold { threshold, achieved_sparsity })
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
        Ok(Thresholds {
            model: b.model,
            target_sparsity: b.target_sparsity.unwrap_or(f64::NAN),
            calib_tokens: b.calib_tokens,
            layers: b.layers.into_iter().map(|l| (l.threshold, l.achieved_sparsity)).collect(),
        })
    }
}

impl Thresholds {
    /// The thresholds alone, one per layer.
    pub fn values(&self) -> Vec<f32> {
        self.layers.iter().map(|l| l.0).collect()
    }

    /// Writes the file (to a temporary name, renamed into place, so it is never half-written).
    pub fn save(&self, path: &Path) -> Result<(), PrepareError> {
        write_atomic(path, &to_json(THRESHOLDS_FORMAT, THRESHOLDS_VERSION, self))
    }

    /// Reads a file written by [`Thresholds::save`]: another format or version, a missing or mistyped field,
    /// or a negative or non-finite threshold is [`PrepareError::BadThresholdsFile`].
    pub fn load(path: &Path) -> Result<Thresholds, PrepareError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        from_json(&bytes, THRESHOLDS_FORMAT, THRESHOLDS_VERSION..=THRESHOLDS_VERSION)
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
        assert!(bad(br#"{"format": "pinion-thresholds", "version": 2, "layers": []}"#).contains("version 2"));
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
