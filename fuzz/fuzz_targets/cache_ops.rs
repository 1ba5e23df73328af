//! Fuzzes the segmented cache: any fixed-region pushes and any sequence of gets, holds, inserts and token steps
//! on its LRU regions agree with the VecDeque reference model, byte for byte (`pinion_cache::fuzz::check_ops`
//! panics otherwise).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pinion_cache::fuzz::check_ops(data));
