//! pinion's offline preparation (PowerInfer-2's offline half) as library functions: profile a model's
//! activations over a calibration text ([`profile_activations`]), calibrate thresholds ([`calibrate`]), train
//! predictors ([`train_predictors`]), pack the model neuron-major ([`pack_model`]), measure the device
//! ([`device::measure`]), fetch known models ([`registry`]), and keep a prepared directory's files and
//! resumable [`Manifest`]. `cargo xtask prepare` and its single-step commands drive these and show progress.
//!
//! This crate is not the engine: it loads models through `pinion-runtime` to profile them, and writes what the
//! runtime reads, but nothing online depends on it except the CLI's `pinion fetch`. Its error type is
//! [`PrepareError`].
#![forbid(unsafe_code)]

pub mod device;
mod error;
mod files;
pub mod registry;
mod steps;
mod thresholds;

pub use crate::error::PrepareError;
pub use crate::files::{load_device, load_plan, partial_path, save_device, save_plan, write_atomic};
pub use crate::steps::{
    MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, Manifest, PackStepOptions, ProfileOptions,
    activation_frequencies, calibrate, file_identity, load_predictors, load_profile, pack_model,
    predictor_tensors, profile_activations, save_predictors, save_profile, step_key, train_predictors,
};
pub use crate::thresholds::{THRESHOLDS_FORMAT, THRESHOLDS_VERSION, Thresholds};
pub use pinion_predictor::ActivationProfile;
