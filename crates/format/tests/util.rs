//! Test helpers: a hand-rolled GGUF byte builder (independent of `GgufWriter`), a seeded RNG, and small files.

use pinion_format::{GgmlType, GgufWriter, Value};
use proptest::test_runner::{Config, FileFailurePersistence};

/// Proptest settings: `cases` cases, failing inputs saved to `tests/proptest-regressions.txt` (the default
/// location needs a `lib.rs` beside the test, which a `tests/` binary lacks) and replayed first on later runs.
pub(crate) fn proptest_config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proptest-regressions.txt"))),
        ..Config::default()
    }
}

/// Builds GGUF bytes field by field, so tests can write both valid files (to check the writer's layout against)
/// and corrupt ones.
#[derive(Clone, Debug, Default)]
pub(crate) struct Raw(pub(crate) Vec<u8>);

impl Raw {
    /// Magic, version, tensor count and metadata count.
    pub(crate) fn header(magic: &[u8; 4], version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default().bytes(magic).u32(version).u64(n_tensors).u64(n_kv)
    }

    pub(crate) fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn u8(self, v: u8) -> Raw {
        self.bytes(&[v])
    }

    pub(crate) fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }

    pub(crate) fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }

    /// A GGUF string: u64 length, then the bytes.
    pub(crate) fn str(self, s: &str) -> Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// A u32 metadata entry.
    pub(crate) fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.str(key).u32(4).u32(v)
    }

    /// A string metadata entry.
    pub(crate) fn kv_str(self, key: &str, v: &str) -> Raw {
        self.str(key).u32(8).str(v)
    }

    /// A tensor directory entry.
    pub(crate) fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }

    /// Zero bytes up to a multiple of `align`.
    pub(crate) fn pad(mut self, align: usize) -> Raw {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// SplitMix64: a tiny seeded generator, so that tests are reproducible without a `rand` dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Metadata with one value of every GGUF type, including arrays of strings, nested and empty arrays.
pub(crate) fn every_value() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(-1.25e-3)),
        ("t.bool", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.string", Value::String("héllo ✓".to_string())),
        ("t.empty_string", Value::String(String::new())),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 1)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.nan", Value::F32(f32::from_bits(0x7fc0_1234))),
        ("t.strings", Value::from(vec!["<s>", "</s>", "", "Ġthe"])),
        ("t.i32s", Value::from(vec![1i32, -2, 3])),
        ("t.f32s", Value::from(vec![0.5f32, -0.25])),
        ("t.bools", Value::from(vec![true, false, true])),
        ("t.empty", Value::Array(vec![])),
        (
            "t.nested",
            Value::Array(vec![Value::from(vec![1u8, 2]), Value::from(vec![3u8]), Value::Array(vec![])]),
        ),
        ("t.nested_strings", Value::Array(vec![Value::from(vec!["a"]), Value::from(vec!["b", "c"])])),
    ]
}

/// Deterministic random bytes, as many as a tensor of `ty` with `dims` holds.
pub(crate) fn tensor_bytes(rng: &mut Rng, ty: GgmlType, dims: &[u64]) -> Vec<u8> {
    let n: u64 = dims.iter().product();
    let len = (n / ty.block_len() as u64) as usize * ty.block_bytes();
    rng.bytes(len)
}

/// A small valid file: metadata of every type, one tensor of every type, default alignment. The last tensor's
/// size is a multiple of 32, so the file has no trailing padding and every strict prefix is invalid.
pub(crate) fn small_file() -> Vec<u8> {
    let mut rng = Rng(7);
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    for (k, v) in every_value() {
        w.add_metadata(k, v).unwrap();
    }
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let dims = [ty.block_len() as u64 * 2, 3];
        w.add_tensor_data(&format!("t{i}.{ty}"), ty, &dims, tensor_bytes(&mut rng, ty, &dims)).unwrap();
    }
    // 32 f32 values: 128 bytes, a multiple of the alignment.
    w.add_tensor_data("last", GgmlType::F32, &[32], rng.bytes(128)).unwrap();
    w.to_bytes().unwrap()
}

/// CRC-32/IEEE (the zlib polynomial, reflected, initial and final XOR `0xFFFFFFFF`), bit by bit: an
/// implementation independent of `crc32fast`, which the crate uses.
pub(crate) fn crc32_ref(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn crc32_ref_matches_the_standard_check_value() {
    // The check value of CRC-32/ISO-HDLC (the catalogue of parametrised CRC algorithms).
    assert_eq!(crc32_ref(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32_ref(b""), 0);
}
