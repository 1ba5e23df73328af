//! pinion-runtime (being built).
