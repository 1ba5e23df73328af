//! One test per failure path, each asserting the specific error variant (and, for file content, the offset).

use std::io::{self, Write};

use pinion_format::quant::{self, BlockQ8K};
use pinion_format::{
    ALIGNMENT_KEY, FormatError, GgmlType, Gguf, GgufWriter, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_KV,
    MAX_STRING_LEN, MAX_TENSORS, Value,
};

use crate::util::{Raw, small_file};

fn parse_err(bytes: &[u8]) -> FormatError {
    Gguf::parse(bytes).expect_err("the file must be rejected")
}

/// A file header with one metadata entry and one tensor entry (at offset 69), padded to 32; data goes after.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
    Raw::header(b"GGUF", 3, 1, 1)
        .kv_str("general.architecture", "llama")
        .tensor(name, dims, ty, offset)
        .pad(32)
}

// === Reader: file content ===

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = small_file();
    let g = Gguf::parse(&bytes).unwrap();
    let data_offset = g.data_offset as usize;
    for len in 0..bytes.len() {
        match Gguf::parse(&bytes[..len]) {
            Err(FormatError::Truncated { offset, need, file_len }) => {
                assert_eq!(file_len, len as u64);
                assert!(
                    offset <= len as u64 && offset + need > len as u64,
                    "len {len}: offset {offset} need {need}"
                );
                assert!(len < data_offset, "len {len}: truncated inside the data section reports Truncated");
            }
            Err(FormatError::TensorOutOfBounds { end, file_len, .. }) => {
                assert_eq!(file_len, len as u64);
                assert!(end > len as u64);
                assert!(len + 32 > data_offset, "len {len}: a truncated header reports TensorOutOfBounds");
            }
            other => panic!("len {len}: expected Truncated or TensorOutOfBounds, got {other:?}"),
        }
    }
    assert!(Gguf::parse(&bytes).is_ok());
}

#[test]
fn wrong_magic() {
    let raw = Raw::header(b"GGUG", 3, 0, 0);
    assert!(matches!(parse_err(&raw.0), FormatError::BadMagic { found } if &found == b"GGUG"));
    assert!(matches!(parse_err(b"\0\0\0\0"), FormatError::BadMagic { .. }));
}

#[test]
fn unsupported_version() {
    // 1 is the old format, 4 does not exist yet, 0x03000000 is version 3 written big-endian.
    for version in [0, 1, 4, 0x0300_0000] {
        let raw = Raw::header(b"GGUF", version, 0, 0);
        assert!(
            matches!(parse_err(&raw.0), FormatError::UnsupportedVersion { version: v } if v == version),
            "version {version}"
        );
    }
}

#[test]
fn absurd_tensor_count() {
    let raw = Raw::header(b"GGUF", 3, u64::MAX, 0);
    let e = parse_err(&raw.0);
    assert!(
        matches!(
            e,
            FormatError::TooMany { what: "tensor count", count: u64::MAX, cap: MAX_TENSORS, offset: 8 }
        ),
        "{e:?}"
    );
    // Under the cap but more than the file can hold: a truncation, found without reserving 65536 entries.
    let raw = Raw::header(b"GGUF", 3, MAX_TENSORS, 0);
    assert!(matches!(parse_err(&raw.0), FormatError::Truncated { offset: 24, .. }));
}

#[test]
fn absurd_metadata_count() {
    let raw = Raw::header(b"GGUF", 3, 0, MAX_KV + 1);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::TooMany { what: "metadata count", offset: 16, .. }), "{e:?}");
}

#[test]
fn absurd_string_length() {
    let raw = Raw::header(b"GGUF", 3, 0, 1).u64(1 << 40).bytes(b"key");
    let e = parse_err(&raw.0);
    assert!(
        matches!(e, FormatError::TooMany { what: "string length", count, cap: MAX_STRING_LEN, offset: 24 } if count == 1 << 40),
        "{e:?}"
    );
    // Under the cap but past the end of the file.
    let raw = Raw::header(b"GGUF", 3, 0, 2).kv_u32("a", 1).str("b").u32(8).u64(1000).bytes(b"short");
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::Truncated { need: 1000, .. }), "{e:?}");
}

#[test]
fn absurd_array_length() {
    let raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(9).u32(8).u64(u64::MAX);
    let e = parse_err(&raw.0);
    let count_at = 24 + 8 + 1 + 4 + 4;
    assert!(
        matches!(e, FormatError::TooMany { what: "array length", cap: MAX_ARRAY_LEN, offset, .. } if offset == count_at),
        "{e:?}"
    );
    // Under the cap but more strings (8 bytes each at least) than the rest of the file holds.
    let raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(9).u32(8).u64(100).bytes(&[0u8; 799]);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::Truncated { need: 800, .. }), "{e:?}");
}

#[test]
fn array_nesting_too_deep() {
    let mut raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(9);
    for _ in 0..MAX_ARRAY_DEPTH {
        raw = raw.u32(9).u64(1);
    }
    let raw = raw.u32(0).u64(0);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::TooMany { what: "array nesting depth", .. }), "{e:?}");
}

#[test]
fn unknown_value_type() {
    let raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(13).u32(0);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::UnknownValueType { id: 13, offset: 33 }), "{e:?}");
    // An unknown element type is an error even in an empty array, as in llama.cpp.
    let raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(9).u32(0xFFFF_FFFF).u64(0);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::UnknownValueType { id: 0xFFFF_FFFF, offset: 37 }), "{e:?}");
}

#[test]
fn invalid_utf8() {
    let raw = Raw::header(b"GGUF", 3, 0, 1).str("a").u32(8).u64(2).bytes(&[0xC3, 0x28]);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::BadUtf8 { offset: 45 }), "{e:?}");
}

#[test]
fn empty_and_duplicate_keys() {
    let raw = Raw::header(b"GGUF", 3, 0, 1).kv_u32("", 1);
    assert!(matches!(parse_err(&raw.0), FormatError::EmptyKey { offset: 24 }));
    let raw = Raw::header(b"GGUF", 3, 0, 2).kv_u32("k", 1).kv_u32("k", 2);
    let e = parse_err(&raw.0);
    assert!(matches!(&e, FormatError::DuplicateKey { key, offset: 41 } if key == "k"), "{e:?}");
}

#[test]
fn bad_alignment() {
    for align in [0u32, 3, 48, 1 << 21] {
        let raw = Raw::header(b"GGUF", 3, 0, 1).kv_u32(ALIGNMENT_KEY, align);
        let e = parse_err(&raw.0);
        assert!(matches!(e, FormatError::BadAlignment { alignment } if alignment == align as u64), "{e:?}");
    }
    // llama.cpp requires a u32.
    let raw = Raw::header(b"GGUF", 3, 0, 1).str(ALIGNMENT_KEY).u32(10).u64(32);
    let e = parse_err(&raw.0);
    assert!(matches!(e, FormatError::WrongValueType { expected: "u32", found: "u64", .. }), "{e:?}");
}

#[test]
fn unknown_tensor_type() {
    // 4 and 5 were Q4_2 and Q4_3, removed from ggml; 16..=23 and 29 are the IQ types; 99 never existed.
    let cases = [
        (4u32, "Q4_2 (id 4) is not supported"),
        (5, "Q4_3 (id 5) is not supported"),
        (16, "IQ2_XXS (id 16) is not supported"),
        (17, "IQ2_XS (id 17) is not supported"),
        (18, "IQ3_XXS (id 18) is not supported"),
        (19, "IQ1_S (id 19) is not supported"),
        (20, "IQ4_NL (id 20) is not supported"),
        (21, "IQ3_S (id 21) is not supported"),
        (22, "IQ2_S (id 22) is not supported"),
        (23, "IQ4_XS (id 23) is not supported"),
        (29, "IQ1_M (id 29) is not supported"),
        (24, "I8 (id 24) is not supported"),
        (34, "TQ1_0 (id 34) is not supported"),
        (39, "MXFP4 (id 39) is not supported"),
        (99, "type id 99 is not a ggml type"),
        (u32::MAX, "type id 4294967295 is not a ggml type"),
    ];
    for (id, what) in cases {
        let raw = one_tensor("w", &[32], id, 0).bytes(&[0; 64]);
        let e = parse_err(&raw.0);
        assert!(
            matches!(&e, FormatError::UnknownTensorType { name, id: i, offset: 90 } if name == "w" && *i == id),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.starts_with("tensor 'w' (type id at offset 90): "), "{msg}");
        assert!(msg.contains(what), "{msg}");
        // The message lists every supported type by the name ggml.h gives it, and nothing else.
        let listed = msg.split("; supported: ").nth(1).unwrap_or_default();
        let want: Vec<&str> = GgmlType::ALL.iter().map(|t| quant::ggml_type_name(t.id()).unwrap()).collect();
        assert_eq!(listed, want.join(", "), "{msg}");
        assert!(listed.contains("Q5_0") && listed.contains("Q2_K") && listed.contains("BF16"), "{msg}");
    }
    // Every supported type has a name, and the names agree with ours (`q4_K` is ggml's `Q4_K`).
    for ty in GgmlType::ALL {
        assert_eq!(quant::ggml_type_name(ty.id()).map(str::to_lowercase), Some(ty.name().to_lowercase()));
    }
}

#[test]
fn tensor_data_out_of_bounds() {
    // 34 bytes of Q8_0 data needed, 33 present.
    let raw = one_tensor("w", &[32], 8, 0).bytes(&[0; 33]);
    let data_offset = raw.len() as u64 - 33;
    let e = parse_err(&raw.0);
    assert!(
        matches!(&e, FormatError::TensorOutOfBounds { name, start, end, file_len }
            if name == "w" && *start == data_offset && *end == data_offset + 34 && *file_len == data_offset + 33),
        "{e:?}"
    );
    // An offset so large that start + size overflows.
    let raw = one_tensor("w", &[32], 8, u64::MAX - 31).bytes(&[0; 64]);
    assert!(matches!(parse_err(&raw.0), FormatError::TensorOutOfBounds { .. }));
}

#[test]
fn bad_tensor_shapes() {
    let cases: [(&[u64], u32, u64); 6] = [
        (&[], 0, 0),                             // no dimensions
        (&[31], 8, 0),                           // row not whole Q8_0 blocks
        (&[32, 0], 8, 0),                        // no values
        (&[1 << 32, 1 << 32, 1 << 32, 1], 0, 0), // element count overflows
        (&[1 << 62, 2], 0, 0),                   // fine count, byte size overflows
        (&[32], 8, 16),                          // offset not aligned
    ];
    for (dims, ty, offset) in cases {
        let raw = one_tensor("w", dims, ty, offset).bytes(&[0; 64]);
        let e = parse_err(&raw.0);
        assert!(
            matches!(&e, FormatError::BadTensorShape { name, offset: 69, .. } if name == "w"),
            "{dims:?}: {e:?}"
        );
    }
    let raw = one_tensor("w", &[1; 5], 0, 0);
    let e = parse_err(&raw.0);
    assert!(
        matches!(e, FormatError::TooMany { what: "tensor dimension count", count: 5, cap, .. } if cap == MAX_DIMS as u64)
    );
}

#[test]
fn duplicate_tensor() {
    let raw = Raw::header(b"GGUF", 3, 2, 0)
        .tensor("w", &[1], 0, 0)
        .tensor("w", &[1], 0, 32)
        .pad(32)
        .bytes(&[0; 64]);
    let e = parse_err(&raw.0);
    assert!(matches!(&e, FormatError::DuplicateTensor { name, offset: 57 } if name == "w"), "{e:?}");
}

// === Reader: lookups ===

#[test]
fn missing_tensor() {
    let bytes = small_file();
    let g = Gguf::parse(&bytes).unwrap();
    assert!(matches!(g.tensor("nope"), Err(FormatError::MissingTensor { name }) if name == "nope"));
    assert!(g.tensor_info("nope").is_none());
}

#[test]
fn missing_key() {
    let bytes = small_file();
    let g = Gguf::parse(&bytes).unwrap();
    assert!(
        matches!(g.get_u64("llama.block_count"), Err(FormatError::MissingKey { key }) if key == "llama.block_count")
    );
    assert!(matches!(g.get_str("nope"), Err(FormatError::MissingKey { .. })));
    assert!(matches!(g.get_str_array("nope"), Err(FormatError::MissingKey { .. })));
    assert!(g.get("nope").is_none());
}

#[test]
fn wrong_value_type() {
    let bytes = small_file();
    let g = Gguf::parse(&bytes).unwrap();
    let wrong = |r: Result<(), FormatError>, want: &'static str, got: &'static str| match r {
        Err(FormatError::WrongValueType { expected, found, .. }) => {
            assert_eq!((expected, found), (want, got));
        }
        other => panic!("expected WrongValueType, got {other:?}"),
    };
    wrong(g.get_str("t.u32").map(drop), "string", "u32");
    wrong(g.get_u64("t.string").map(drop), "unsigned integer", "string");
    wrong(g.get_u64("t.i8").map(drop), "unsigned integer", "i8"); // negative
    wrong(g.get_f32("t.bool").map(drop), "number", "bool");
    wrong(g.get_bool("t.u8").map(drop), "bool", "u8");
    wrong(g.get_array("t.string").map(drop), "array", "string");
    wrong(g.get_str_array("t.i32s").map(drop), "array of strings", "i32");
    wrong(g.get_f32_array("t.strings").map(drop), "array of numbers", "string");
    wrong(g.get_i64_array("t.bools").map(drop), "array of integers", "bool");
}

// === Quantized data ===

#[test]
fn dequantize_row_rejects_bad_sizes() {
    let mut out = vec![0.0f32; 32];
    let e = quant::dequantize_row(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err();
    assert!(matches!(e, FormatError::BadBlockView { len: 33, block: 34, .. }), "{e:?}");
    let mut out = vec![0.0f32; 31];
    let e = quant::dequantize_row(GgmlType::Q4_0, &[0; 18], &mut out).unwrap_err();
    assert!(matches!(e, FormatError::RowNotBlockAligned { len: 31, block_len: 32, .. }), "{e:?}");
}

#[test]
fn blocks_view_rejects_bad_length_and_alignment() {
    let buf = vec![0u32; 200];
    let bytes: &[u8] = bytemuck::cast_slice(&buf);
    assert!(quant::blocks::<BlockQ8K>(&bytes[..292]).is_ok());
    assert!(matches!(
        quant::blocks::<BlockQ8K>(&bytes[..291]),
        Err(FormatError::BadBlockView { len: 291, block: 292, .. })
    ));
    assert!(matches!(quant::blocks::<BlockQ8K>(&bytes[1..293]), Err(FormatError::BadBlockView { .. })));
    // dequantize_row copies instead of failing on misaligned input.
    let mut out = vec![0.0f32; 256];
    quant::dequantize_row(GgmlType::Q8K, &bytes[1..293], &mut out).unwrap();
}

// === Writer misuse ===

#[test]
fn writer_rejects_duplicate_and_empty_keys() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", 1u32).unwrap();
    assert!(matches!(w.add_metadata("k", 2u32), Err(FormatError::KeyExists { key }) if key == "k"));
    assert!(matches!(w.add_metadata("", 2u32), Err(FormatError::KeyEmpty)));
    assert!(matches!(w.set_metadata("", 2u32), Err(FormatError::KeyEmpty)));
}

#[test]
fn writer_rejects_mixed_arrays() {
    let mut w = GgufWriter::new();
    let mixed = Value::Array(vec![Value::U8(1), Value::U8(2), Value::I8(3)]);
    let e = w.add_metadata("a", mixed).unwrap_err();
    assert!(
        matches!(&e, FormatError::MixedArray { key, index: 2, expected: "u8", found: "i8" } if key == "a"),
        "{e:?}"
    );
    let nested =
        Value::Array(vec![Value::from(vec!["x"]), Value::Array(vec![Value::from("y"), Value::U32(1)])]);
    let e = w.add_metadata("b", nested).unwrap_err();
    assert!(matches!(e, FormatError::MixedArray { index: 1, expected: "string", found: "u32", .. }), "{e:?}");
    assert!(w.metadata().is_empty(), "a rejected entry is not added");
}

#[test]
fn writer_rejects_arrays_nested_too_deep() {
    let mut v = Value::Array(vec![]);
    for _ in 0..MAX_ARRAY_DEPTH - 1 {
        v = Value::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add_metadata("ok", v.clone()).unwrap();
    let e = w.add_metadata("deep", Value::Array(vec![v])).unwrap_err();
    assert!(matches!(e, FormatError::LimitExceeded { what: "array nesting depth", .. }), "{e:?}");
}

#[test]
fn writer_rejects_bad_alignment() {
    let mut w = GgufWriter::new();
    let e = w.add_metadata(ALIGNMENT_KEY, 64u64).unwrap_err();
    assert!(matches!(e, FormatError::WrongValueType { expected: "u32", found: "u64", .. }), "{e:?}");
    for a in [0u32, 24, 1 << 21] {
        assert!(matches!(w.add_metadata(ALIGNMENT_KEY, a), Err(FormatError::BadAlignment { .. })));
    }
    assert_eq!(w.alignment(), 32);
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut w = GgufWriter::new();
    w.add_tensor("t", GgmlType::F32, &[4]).unwrap();
    assert!(
        matches!(w.add_tensor("t", GgmlType::F32, &[4]), Err(FormatError::TensorExists { name }) if name == "t")
    );
    let bad: [(&[u64], GgmlType); 6] = [
        (&[], GgmlType::F32),
        (&[1, 1, 1, 1, 1], GgmlType::F32),
        (&[33], GgmlType::Q4_0),
        (&[256, 0], GgmlType::Q6K),
        (&[u64::MAX, 2], GgmlType::F32),
        (&[1 << 63], GgmlType::F32),
    ];
    for (dims, ty) in bad {
        let e = w.add_tensor("u", ty, dims).unwrap_err();
        assert!(matches!(&e, FormatError::InvalidTensorShape { name, .. } if name == "u"), "{dims:?}: {e:?}");
    }
    let e = w.add_tensor_data("v", GgmlType::Q8_0, &[64], vec![0u8; 67]).unwrap_err();
    assert!(matches!(e, FormatError::TensorSizeMismatch { expected: 68, got: 67, .. }), "{e:?}");
    assert_eq!(w.tensor_infos().unwrap().len(), 1, "rejected tensors are not added");
}

#[test]
fn writer_caps_the_tensor_count() {
    let mut w = GgufWriter::new();
    for i in 0..MAX_TENSORS {
        w.add_tensor(&i.to_string(), GgmlType::F32, &[1]).unwrap();
    }
    let e = w.add_tensor("one more", GgmlType::F32, &[1]).unwrap_err();
    assert!(matches!(e, FormatError::LimitExceeded { what: "tensor count", .. }), "{e:?}");
}

#[test]
fn write_to_needs_every_tensors_data() {
    let mut w = GgufWriter::new();
    w.add_tensor_data("a", GgmlType::F32, &[1], vec![0u8; 4]).unwrap();
    w.add_tensor("b", GgmlType::F32, &[1]).unwrap();
    let mut out = Vec::new();
    let e = w.write_to(&mut out).unwrap_err();
    assert!(matches!(&e, FormatError::TensorDataMissing { name } if name == "b"), "{e:?}");
    assert!(out.is_empty(), "nothing is written");
}

fn two_streamed() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.add_tensor("a", GgmlType::F32, &[2]).unwrap();
    w.add_tensor_data("m", GgmlType::F32, &[1], vec![0u8; 4]).unwrap();
    w.add_tensor("b", GgmlType::F16, &[2]).unwrap();
    w
}

#[test]
fn stream_rejects_out_of_order_and_unknown_tensors() {
    let mut s = two_streamed().begin(Vec::new()).unwrap();
    let e = s.write_tensor_data("b", &[0; 4]).unwrap_err();
    assert!(
        matches!(&e, FormatError::TensorOutOfOrder { name, expected: Some(x) } if name == "b" && x == "a"),
        "{e:?}"
    );
    let e = s.write_tensor_data("zz", &[0; 4]).unwrap_err();
    assert!(matches!(e, FormatError::MissingTensor { .. }), "{e:?}");
    // Out-of-order calls do not spoil the stream.
    s.write_tensor_data("a", &[0; 8]).unwrap();
    let e = s.write_tensor_data("a", &[0; 8]).unwrap_err();
    assert!(matches!(&e, FormatError::TensorOutOfOrder { expected: Some(x), .. } if x == "b"), "{e:?}");
    let e = s.write_tensor_data("m", &[0; 4]).unwrap_err();
    assert!(matches!(e, FormatError::TensorOutOfOrder { .. }), "in-memory data cannot be streamed: {e:?}");
    s.write_tensor_data("b", &[0; 4]).unwrap();
    let e = s.write_tensor_data("b", &[0; 4]).unwrap_err();
    assert!(matches!(e, FormatError::TensorOutOfOrder { expected: None, .. }), "{e:?}");
    let bytes = s.finish().unwrap();
    assert_eq!(Gguf::parse(&bytes).unwrap().tensors.len(), 3);
}

#[test]
fn stream_rejects_wrong_sizes() {
    let mut s = two_streamed().begin(Vec::new()).unwrap();
    let e = s.write_tensor_data("a", &[0; 7]).unwrap_err();
    assert!(matches!(e, FormatError::TensorSizeMismatch { expected: 8, got: 7, .. }), "{e:?}");
    // Nothing was written, so the stream goes on.
    s.write_tensor_data("a", &[0; 8]).unwrap();

    let mut s = two_streamed().begin(Vec::new()).unwrap();
    let e = s.write_tensor_with("a", |w| w.write_all(&[0; 9])).unwrap_err();
    assert!(matches!(e, FormatError::TensorSizeMismatch { expected: 8, got: 9, .. }), "{e:?}");
    assert!(matches!(s.write_tensor_data("a", &[0; 8]), Err(FormatError::WriterFailed)));
    assert!(matches!(s.finish(), Err(FormatError::WriterFailed)));

    let mut s = two_streamed().begin(Vec::new()).unwrap();
    let e = s.write_tensor_with("a", |w| w.write_all(&[0; 5])).unwrap_err();
    assert!(matches!(e, FormatError::TensorSizeMismatch { expected: 8, got: 5, .. }), "{e:?}");
    assert!(matches!(s.finish(), Err(FormatError::WriterFailed)));
}

#[test]
fn stream_finish_needs_every_tensor() {
    let mut s = two_streamed().begin(Vec::new()).unwrap();
    s.write_tensor_data("a", &[0; 8]).unwrap();
    let e = s.finish().unwrap_err();
    assert!(matches!(&e, FormatError::TensorDataMissing { name } if name == "b"), "{e:?}");
}

/// Accepts `left` bytes, then fails.
struct FailAfter {
    left: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn io_errors_are_reported_and_stop_the_stream() {
    let e = two_streamed().begin(FailAfter { left: 10 }).unwrap_err();
    assert!(matches!(e, FormatError::Write(_)), "{e:?}");

    let header_len = two_streamed().data_offset() as usize;
    let mut s = two_streamed().begin(FailAfter { left: header_len + 4 }).unwrap();
    let e = s.write_tensor_data("a", &[0; 8]).unwrap_err();
    assert!(matches!(e, FormatError::Write(_)), "{e:?}");
    assert!(matches!(s.write_tensor_data("a", &[0; 8]), Err(FormatError::WriterFailed)));

    // An error from the callback itself.
    let mut s = two_streamed().begin(Vec::new()).unwrap();
    let e = s.write_tensor_with("a", |_| Err(io::Error::other("source failed"))).unwrap_err();
    assert!(matches!(e, FormatError::Write(_)), "{e:?}");
    assert!(matches!(s.finish(), Err(FormatError::WriterFailed)));
}
