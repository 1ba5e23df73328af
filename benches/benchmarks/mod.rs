//! Benchmark modules, one per topic.

pub(crate) mod kernels;
