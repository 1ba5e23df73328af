//! The small JSON reports of a preparation: the predictors' held-out quality (`predictors.json`, an
//! intermediate the pack step reads its predicted densities from) and the report a prepared directory keeps
//! (`report.json`: the sparsity rule and its quality, predictor quality and packed sizes, the evidence of how good the preparation is
//! once its intermediates are gone). Both are serde structs in the files' JSON envelope.

use std::path::Path;

use pinion_format::GgmlType;
use pinion_format::packed::PackSummary;
use pinion_predictor::train::LayerReport;
use serde::{Deserialize, Serialize};

use crate::error::{PrepareError, io_err};
use crate::files::{from_json, to_json, write_atomic};
use crate::thresholds::{Quality, Thresholds};

/// The `format` field of a predictors report (`predictors.json`).
pub const PREDICTORS_REPORT_FORMAT: &str = "pinion-predictors-report";
/// The predictors report version written, and the only one read.
pub const PREDICTORS_REPORT_VERSION: u64 = 1;
/// The `format` field of a preparation report (`report.json`).
pub const REPORT_FORMAT: &str = "pinion-prepare-report";
/// The preparation report version written, and the only one read.
pub const REPORT_VERSION: u64 = 2;

/// How well one layer's predictor does on its held-out tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictorQuality {
    /// Hidden width.
    pub rank: usize,
    /// Held-out micro recall.
    pub recall: f64,
    /// Held-out precision.
    pub precision: f64,
    /// Share of held-out (token, neuron) pairs predicted active.
    pub predicted_density: f64,
    /// Share truly active.
    pub true_density: f64,
    /// Logit threshold (`null` when the held-out split had no active neuron: the predictor marks none).
    pub threshold: Option<f32>,
    /// Training tokens.
    pub n_train: usize,
    /// Held-out tokens.
    pub n_heldout: usize,
}

impl From<&LayerReport> for PredictorQuality {
    fn from(r: &LayerReport) -> PredictorQuality {
        PredictorQuality {
            rank: r.rank,
            recall: r.recall,
            precision: r.precision,
            predicted_density: r.predicted_density,
            true_density: r.true_density,
            threshold: r.threshold.is_finite().then_some(r.threshold),
            n_train: r.n_train,
            n_heldout: r.n_heldout,
        }
    }
}

/// The trained predictors' held-out report, one entry per layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictorReport {
    /// The recall the logit thresholds were set for.
    pub target_recall: f64,
    /// Per layer, in order.
    pub layers: Vec<PredictorQuality>,
}

impl PredictorReport {
    /// Per layer, the share of neurons the predictor marks (what the planner is told to expect).
    pub fn predicted_density(&self) -> Vec<f32> {
        self.layers.iter().map(|l| l.predicted_density as f32).collect()
    }

    /// Writes `predictors.json`.
    pub fn save(&self, path: &Path) -> Result<(), PrepareError> {
        write_atomic(path, &to_json(PREDICTORS_REPORT_FORMAT, PREDICTORS_REPORT_VERSION, self))
    }

    /// Reads a file written by [`PredictorReport::save`] ([`PrepareError::BadPredictorsFile`] if malformed).
    pub fn load(path: &Path) -> Result<PredictorReport, PrepareError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        from_json(&bytes, PREDICTORS_REPORT_FORMAT, PREDICTORS_REPORT_VERSION..=PREDICTORS_REPORT_VERSION)
            .map(|(_, r)| r)
            .map_err(|why| PrepareError::BadPredictorsFile { path: path.to_path_buf(), why })
    }
}

/// Sizes of the packed model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackedSizes {
    /// The whole file.
    pub file_bytes: u64,
    /// The resident GGUF.
    pub resident_bytes: u64,
    /// The FFN records.
    pub ffn_bytes: u64,
    /// Alignment padding.
    pub padding_bytes: u64,
    /// Neurons per cluster record.
    pub cluster_neurons: usize,
    /// Type of the down columns (`Q8_0`, `F16`, `F32`).
    pub down_type: String,
}

impl PackedSizes {
    /// The sizes of a pack summary, with the settings it was packed with.
    pub fn new(s: &PackSummary, cluster_neurons: usize, down_type: GgmlType) -> PackedSizes {
        PackedSizes {
            file_bytes: s.file_len,
            resident_bytes: s.resident_len,
            ffn_bytes: s.ffn_len,
            padding_bytes: s.padding_bytes,
            cluster_neurons,
            down_type: format!("{down_type:?}"),
        }
    }
}

/// A calibrated rule as `report.json` keeps it: a thresholds file's fields, the rule by name instead of its
/// scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparsityReport {
    /// `cats` or `weighted` (for the ReLU family: thresholds of 0, where the rule does not apply).
    pub rule: String,
    /// The sparsity the thresholds were calibrated for (`null` for the ReLU family).
    pub target_sparsity: Option<f64>,
    /// Tokens of the calibration run.
    pub calib_tokens: u64,
    /// Per layer: the threshold and the sparsity it gave on the calibration samples.
    pub layers: Vec<(f32, f64)>,
    /// The quality budget and what it measured, if the sparsity was searched under one.
    pub quality: Option<Quality>,
}

impl From<&Thresholds> for SparsityReport {
    fn from(t: &Thresholds) -> SparsityReport {
        SparsityReport {
            rule: t.rule_name().into(),
            target_sparsity: t.target_sparsity.is_finite().then_some(t.target_sparsity),
            calib_tokens: t.calib_tokens,
            layers: t.layers.clone(),
            quality: t.quality.clone(),
        }
    }
}

/// What a prepared directory keeps about its preparation (`report.json`, written with the packed model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepareReport {
    /// The model the directory was prepared from (its path, as given).
    pub source: String,
    /// The calibrated rule, without the weighted rule's per-neuron scales (they are in the packed model).
    pub sparsity: SparsityReport,
    /// The predictors' held-out quality (`null` without predictors).
    pub predictors: Option<PredictorReport>,
    /// The packed model's sizes.
    pub packed: PackedSizes,
}

impl PrepareReport {
    /// Writes `report.json`.
    pub fn save(&self, path: &Path) -> Result<(), PrepareError> {
        write_atomic(path, &to_json(REPORT_FORMAT, REPORT_VERSION, self))
    }

    /// Reads a file written by [`PrepareReport::save`] ([`PrepareError::BadPreparedDir`] if malformed).
    pub fn load(path: &Path) -> Result<PrepareReport, PrepareError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        from_json(&bytes, REPORT_FORMAT, REPORT_VERSION..=REPORT_VERSION)
            .map(|(_, r)| r)
            .map_err(|why| PrepareError::BadPreparedDir { path: path.to_path_buf(), why })
    }
}
