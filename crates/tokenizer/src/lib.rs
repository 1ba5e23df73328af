//! pinion-tokenizer (being built).
