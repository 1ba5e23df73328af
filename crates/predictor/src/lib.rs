//! pinion-predictor (being built).
