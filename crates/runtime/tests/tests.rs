//! Integration tests of pinion-runtime, one binary: the real models against llama.cpp's reference outputs, the
//! architectures' features on synthetic models, and every failure path of loading and generation.

mod arch;
mod common;
mod errors;
mod gguf_py;
mod reference;
mod sparsity;
