//! Integration tests of pinion-prepare, one binary: the offline steps on synthetic models, the prepared
//! directory (`prepare_dir`: what it keeps, resuming, reruns), and the offloaded engine on models they prepared
//! (its equality with the in-memory engine, its counters and refusals).

mod offload;
mod prepare;
mod prepdir;
mod quality;
