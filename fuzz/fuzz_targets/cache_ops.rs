//! Fuzzes the segmented neuron cache: any operation sequence keeps budgets, states, LRU order, counters and
//! bytes in agreement with the reference model (`pinion_cache::fuzz::check_ops` panics otherwise).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pinion_cache::fuzz::check_ops(data));
