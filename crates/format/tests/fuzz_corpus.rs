//! Runs the fuzz invariants (`pinion_format::fuzz::check_parse`) over a deterministic corpus, so that CI
//! exercises them without a fuzzer: every truncation of a valid file and a few thousand seeded mutations.

use pinion_format::fuzz::check_parse;
use pinion_format::{Gguf, GgufWriter, Value};

use crate::util::{Raw, Rng, small_file};

#[test]
fn every_truncation_satisfies_the_invariants() {
    let bytes = small_file();
    for len in 0..=bytes.len() {
        check_parse(&bytes[..len]);
    }
}

/// Values that make interesting counts, lengths, offsets and type ids.
const INTERESTING_U64: [u64; 12] = [0, 1, 2, 3, 4, 9, 12, 13, 31, 32, 1 << 24, u64::MAX];

/// Applies one random mutation to `bytes`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        bytes.push(rng.next_u64() as u8);
        return;
    }
    let at = rng.below(bytes.len() as u64) as usize;
    match rng.below(7) {
        // Flip a bit.
        0 => bytes[at] ^= 1 << rng.below(8),
        // Set a byte to an edge value.
        1 => bytes[at] = [0x00, 0x01, 0x7F, 0x80, 0xFF][rng.below(5) as usize],
        // Overwrite a little-endian u64 (or u32) with an interesting value.
        2 | 3 => {
            let v = INTERESTING_U64[rng.below(INTERESTING_U64.len() as u64) as usize];
            let width = if rng.below(2) == 0 { 8 } else { 4 };
            for (i, b) in v.to_le_bytes().iter().take(width).enumerate() {
                if let Some(x) = bytes.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        // Truncate.
        4 => bytes.truncate(at),
        // Insert random bytes.
        5 => {
            let n = 1 + rng.below(8) as usize;
            let ins = rng.bytes(n);
            bytes.splice(at..at, ins);
        }
        // Remove a run of bytes.
        _ => {
            let n = (1 + rng.below(16) as usize).min(bytes.len() - at);
            bytes.drain(at..at + n);
        }
    }
}

/// Seeds for the mutations: the small file with every type, a file with nested arrays, and one with a
/// non-default alignment.
fn seeds() -> Vec<Vec<u8>> {
    let nested = {
        let mut w = GgufWriter::new();
        w.add_metadata("a", Value::Array(vec![Value::from(vec!["x", "y"]), Value::Array(vec![])])).unwrap();
        w.add_metadata("b", Value::from(vec![1.5f64, f64::NAN])).unwrap();
        w.add_tensor_data("t", pinion_format::GgmlType::Q4_0, &[32, 2], vec![7u8; 36]).unwrap();
        w.to_bytes().unwrap()
    };
    let aligned = Raw::header(b"PWRI", 2, 2, 1)
        .kv_u32("general.alignment", 8)
        .tensor("a", &[3], 0, 0)
        .tensor("b", &[2], 1, 16)
        .pad(8)
        .bytes(&[1; 20])
        .0;
    vec![small_file(), nested, aligned]
}

#[test]
fn seeded_mutations_satisfy_the_invariants() {
    let mut rng = Rng(0x5EED);
    let mut n_ok = 0;
    let seeds = seeds();
    for seed in &seeds {
        assert!(Gguf::parse(seed).is_ok(), "the seeds are valid files");
    }
    for i in 0..3000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut bytes);
        }
        check_parse(&bytes);
        n_ok += Gguf::parse(&bytes).is_ok() as usize;
    }
    // Mutations inside tensor data or padding leave the file valid; the corpus must hit both outcomes.
    assert!(n_ok > 100 && n_ok < 2900, "{n_ok} of 3000 mutants parse");
}
