//! Shared helpers for pinion benchmarks.
