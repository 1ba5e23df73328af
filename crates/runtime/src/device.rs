//! The device profile: measured read throughput, memory bandwidth and kernel speed. In progress.
