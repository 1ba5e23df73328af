//! pinion-exec-cpu (being built).
