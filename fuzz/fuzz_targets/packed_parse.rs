//! Fuzzes the packed-format reader: any bytes (as given, and with their checksums resealed) either fail to
//! parse with a typed error or give a file whose layout invariants hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pinion_format::fuzz::check_packed_parse(data));
