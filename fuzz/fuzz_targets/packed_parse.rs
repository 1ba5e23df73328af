//! Fuzzes the packed-format reader: any bytes (as given, and with their checksums resealed) either fail to
//! parse with a typed error or give a file whose layout invariants hold, and (version 2) whose tensor and row
//! checksum tables match the resident GGUF and verify consistently row by row and all at once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pinion_format::fuzz::check_packed_parse(data));
