//! Integration tests of pinion-runtime, one binary: the real model against llama.cpp's reference outputs, and
//! every failure path of loading and generation.

mod common;
mod errors;
mod reference;
mod sparsity;
