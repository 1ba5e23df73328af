//! pinion's one planner: a model's shape and activation statistics, a measured [`DeviceProfile`], a memory
//! [`Budget`] and the run's switches in; the [`Plan`] the offloaded engine runs out (every memory segment in
//! bytes, what is pinned per layer, the cache regions, how each layer is read, the I/O depth and read-ahead,
//! threads, and the predicted speed with its reasoning). [`plan`] is the main function.
//!
//! This crate is pure: no files, no clocks, no threads, no unsafe. It does not measure the device (that is
//! `pinion-prepare`), build the model's statistics (the runtime does, from a loaded model) or run anything: the
//! runtime makes a plan when a run starts, for the budget and context it was given, and runs exactly that plan;
//! `cargo xtask plan`, `pinion run -v` and `pinion bench` print the same plan for the same inputs.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod budget;
mod device;
mod error;
mod planner;
#[cfg(test)]
mod tests;

pub use crate::budget::{Budget, parse_size};
pub use crate::device::{
    DEVICE_FORMAT, DEVICE_VERSION, DeviceProfile, KernelPoint, ReadPoint, sample_profile,
};
pub use crate::error::PlanError;
pub use crate::planner::{
    CHUNK, CacheCosts, CachePolicy, HeadShape, LayerPlan, LayerShape, MARGIN, Memory, PLAN_FORMAT,
    PLAN_VERSION, Plan, PlanInput, PlanOptions, Prediction, WHOLE_RECORD_DENSITY, plan,
};
