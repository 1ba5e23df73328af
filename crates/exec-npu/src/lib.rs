//! pinion-exec-npu (being built).
