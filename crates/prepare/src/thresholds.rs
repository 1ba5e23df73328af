//! Threshold-sparsity files: per-layer CATS thresholds calibrated offline, as a small versioned JSON file.
//!
//! Format (version 1), documented in docs/format.md:
//! `{"format": "pinion-thresholds", "version": 1, "model": NAME, "target_sparsity": S, "calib_tokens": N,
//!   "layers": [{"threshold": T, "achieved_sparsity": A}, ...]}` with one entry per layer, in order.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{PrepareError, io_err};
use crate::files::write_atomic;

/// The `format` field of a thresholds file.
pub const THRESHOLDS_FORMAT: &str = "pinion-thresholds";
/// The version written, and the only one read.
pub const THRESHOLDS_VERSION: u64 = 1;

/// Calibrated per-layer thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    /// Name of the model they were calibrated on.
    pub model: String,
    /// The sparsity asked for.
    pub target_sparsity: f64,
    /// Tokens of the calibration run.
    pub calib_tokens: u64,
    /// Per layer: the threshold and the sparsity it gave on the calibration samples.
    pub layers: Vec<(f32, f64)>,
}

impl Thresholds {
    /// The thresholds alone, one per layer.
    pub fn values(&self) -> Vec<f32> {
        self.layers.iter().map(|l| l.0).collect()
    }

    /// Writes the file (to a temporary name, renamed into place, so it is never half-written).
    pub fn save(&self, path: &Path) -> Result<(), PrepareError> {
        let layers: Vec<Value> =
            self.layers.iter().map(|&(t, a)| json!({"threshold": t, "achieved_sparsity": a})).collect();
        let v = json!({
            "format": THRESHOLDS_FORMAT,
            "version": THRESHOLDS_VERSION,
            "model": self.model,
            "target_sparsity": self.target_sparsity,
            "calib_tokens": self.calib_tokens,
            "layers": layers,
        });
        write_atomic(path, serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes())
    }

    /// Reads a file written by [`Thresholds::save`].
    pub fn load(path: &Path) -> Result<Thresholds, PrepareError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let bad =
            |why: &str| PrepareError::BadThresholdsFile { path: path.to_path_buf(), why: why.to_string() };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
        if v["format"] != THRESHOLDS_FORMAT {
            return Err(bad("not a pinion thresholds file"));
        }
        if v["version"].as_u64() != Some(THRESHOLDS_VERSION) {
            return Err(bad(&format!("version {} (this pinion reads {THRESHOLDS_VERSION})", v["version"])));
        }
        let layers = v["layers"].as_array().ok_or_else(|| bad("no layers"))?;
        let layers = layers
            .iter()
            .map(|l| match (l["threshold"].as_f64(), l["achieved_sparsity"].as_f64()) {
                (Some(t), Some(a)) if t >= 0.0 && t.is_finite() => Ok((t as f32, a)),
                _ => Err(bad("a layer without a finite, non-negative threshold")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Thresholds {
            model: v["model"].as_str().unwrap_or_default().to_string(),
            target_sparsity: v["target_sparsity"].as_f64().unwrap_or(f64::NAN),
            calib_tokens: v["calib_tokens"].as_u64().unwrap_or(0),
            layers,
        })
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
        std::fs::write(&p, br#"{"format": "pinion-thresholds", "version": 2, "layers": []}"#).unwrap();
        let e = Thresholds::load(&p).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(Thresholds::load(&p), Err(PrepareError::BadThresholdsFile { .. })));
        std::fs::write(
            &p,
            br#"{"format": "pinion-thresholds", "version": 1, "layers": [{"threshold": -1}]}"#,
        )
        .unwrap();
        assert!(matches!(Thresholds::load(&p), Err(PrepareError::BadThresholdsFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
