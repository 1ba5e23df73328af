//! Integration tests of `pinion-format`, built as one binary (`autotests = false`).
//!
//! Fixtures in `tests/data/` come from `tests/data/gen_reference.py`, which runs gguf-py, an implementation of
//! GGUF and the GGML quants independent of this crate, except `packed_v*.pinion`, the packed files of every
//! shipped packed version, which `compat::create_format` writes when the current version's is missing.

mod checksums;
mod compat;
mod errors;
mod fuzz_corpus;
mod packed;
mod quant_props;
mod real_model;
mod reference;
mod roundtrip;
mod synth;
mod util;
