//! Benchmark modules, one per topic.

pub(crate) mod cache;
pub(crate) mod dense;
pub(crate) mod io;
pub(crate) mod kernels;
pub(crate) mod offload;
pub(crate) mod sparse;
