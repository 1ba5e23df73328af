//! Fuzzes the GGUF reader: any bytes either fail to parse or survive a write/re-parse round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pinion_format::fuzz::check_parse(data));
