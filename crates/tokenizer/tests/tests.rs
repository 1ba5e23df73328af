//! Integration tests of `pinion-tokenizer`, built as one binary.

mod common;
mod reference;
mod small_bpe;
mod small_spm;
