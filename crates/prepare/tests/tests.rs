//! Integration tests of pinion-prepare, one binary: the offline steps on synthetic models, and the offloaded
//! engine on models they prepared (its equality with the in-memory engine, its counters and refusals).

mod offload;
mod prepare;
