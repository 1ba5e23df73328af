//! pinion-cache (being built).
