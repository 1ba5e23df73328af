//! pinion's offline preparation (PowerInfer-2's offline half) as library functions: profile a model's
//! activations over a calibration text ([`profile_activations`]), calibrate thresholds ([`calibrate`]), train
//! predictors ([`train_predictors`]), pack the model neuron-major ([`pack_model`]), measure the device
//! ([`device::measure`]), fetch known models ([`registry`]), and fill a prepared directory with all of it,
//! resumably ([`prepare_dir`]: intermediates in `DIR/intermediates/`, removed when it finishes, and a
//! [`Manifest`] of what is done). `cargo xtask prepare` and its single-step commands drive these and show
//! progress.
//!
//! This crate is not the engine: it loads models through `pinion-runtime` to profile them, and writes what the
//! runtime reads, but nothing online depends on it except the CLI's `pinion fetch` and `--thresholds`. Its
//! error type is [`PrepareError`].
#![forbid(unsafe_code)]

pub mod device;
mod dir;
mod error;
mod files;
mod manifest;
pub mod registry;
mod report;
mod steps;
mod thresholds;

pub use crate::dir::{
    DEVICE_FILE, Event, INTERMEDIATES_DIR, KEPT_FILES, PLAN_FILE, PREDICTORS_FILE, PREDICTORS_REPORT_FILE,
    PROFILE_FILE, PrepareConfig, Prepared, PreparedDir, REPORT_FILE, SparsityTarget, Step, THRESHOLDS_FILE,
    budget_minimum, plan_prepared, prepare_dir, remove_intermediates,
};
pub use crate::error::PrepareError;
pub use crate::files::{load_device, load_plan, partial_path, save_device, save_plan, write_atomic};
pub use crate::manifest::{
    MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest, OLDEST_MANIFEST_VERSION, Redo, file_identity,
    step_key,
};
pub use crate::report::{
    PREDICTORS_REPORT_FORMAT, PREDICTORS_REPORT_VERSION, PackedSizes, PredictorQuality, PredictorReport,
    PrepareReport, REPORT_FORMAT, REPORT_VERSION, SparsityReport,
};
pub use crate::steps::{
    LayerScores, MAX_SEARCHED_SPARSITY, MIN_UNIT_SCORE_SAMPLES, MIN_UNIT_TOKEN_SAMPLES, PackStepOptions,
    ProfileOptions, Rule, activation_frequencies, calibrate, calibrate_for_quality, heldout_tokens,
    load_predictors, load_profile, pack_model, predictor_tensors, profile_activations, route_frequencies,
    save_predictors, save_profile, score_scales, search_sparsity, train_predictors,
};
pub use crate::thresholds::{Quality, THRESHOLDS_FORMAT, THRESHOLDS_VERSION, Thresholds};
pub use pinion_predictor::ActivationProfile;
