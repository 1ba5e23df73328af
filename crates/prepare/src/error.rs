//! The error type of `pinion-prepare`.

use std::path::PathBuf;

/// What can go wrong preparing a model: profiling, calibrating, training, packing, measuring the device,
/// fetching, or reading and writing the files of a prepared directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrepareError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Runtime(#[from] pinion_runtime::RuntimeError),
    /// A file could not be read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A model, packed or predictor file is malformed, or packing refused the model.
    #[error("{}: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format error.
        source: pinion_format::FormatError,
    },
    /// A device profile or plan file is malformed, or the planner refused its input.
    #[error(transparent)]
    Plan(#[from] pinion_plan::PlanError),
    /// The activation profile does not fit the model.
    #[error("activation profile has (layers, neurons) = {got:?}, the model has {want:?}")]
    ProfileShape {
        /// The profile's shape.
        got: (usize, usize),
        /// The model's.
        want: (usize, usize),
    },
    /// The activation profile lacks what a step needs (made by an older pinion, or without that record).
    #[error("the activation profile has no {what}: profile the model again")]
    ProfileLacks {
        /// What is missing.
        what: &'static str,
    },
    /// An activation profile file is malformed.
    #[error("{}: {why}", path.display())]
    BadProfileFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thresholds file is malformed.
    #[error("{}: {why}", path.display())]
    BadThresholdsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A predictors file is malformed.
    #[error("{}: {why}", path.display())]
    BadPredictorsFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A prepared directory's manifest or report is malformed.
    #[error("{}: {why}", path.display())]
    BadPreparedDir {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A setting of the preparation is out of range.
    #[error("invalid {setting}: {why}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The calibration text is too short.
    #[error("the calibration text has {tokens} tokens; at least {needed} are needed")]
    CalibrationTooShort {
        /// Tokens it has.
        tokens: usize,
        /// Tokens needed.
        needed: usize,
    },
    /// Training a layer's predictor failed.
    #[error("training the predictor of layer {layer}: {why}")]
    Training {
        /// The layer.
        layer: usize,
        /// What failed.
        why: String,
    },
    /// The step needs a packed model.
    #[error("this needs a packed model (prepare one with `cargo xtask prepare`)")]
    NotPacked,
    /// Fetching a known model failed.
    #[error("fetching model '{name}': {why}")]
    Fetch {
        /// The model.
        name: String,
        /// What failed.
        why: String,
    },
    /// The device probe's options cannot be run.
    #[error("invalid probe options: {why}")]
    ProbeOptions {
        /// What is wrong.
        why: String,
    },
    /// A read benchmark of the device probe failed.
    #[error("read benchmark at {block_bytes} B, queue depth {queue_depth}: {source}")]
    Bench {
        /// Read size.
        block_bytes: u64,
        /// Queue depth.
        queue_depth: usize,
        /// The benchmark's error.
        source: pinion_io::BenchError,
    },
    /// The kernel benchmark of the device probe could not run.
    #[error("kernel benchmark: {why}")]
    Kernel {
        /// What failed.
        why: String,
    },
}

/// Shorthand for [`PrepareError::Io`].
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PrepareError + '_ {
    move |source| PrepareError::Io { path: path.to_path_buf(), source }
}
