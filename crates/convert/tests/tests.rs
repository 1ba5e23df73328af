//! pinion-convert's integration tests: the fixtures of tests/data/hf (tiny checkpoints saved by `transformers`,
//! with the GGUF files llama.cpp's converter and llama-quantize made of them; make.py) converted again and
//! compared, run, and broken.

mod errors;
mod reference;
mod util;
