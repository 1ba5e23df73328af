//! Writer/reader round trips: byte layout against hand-built files, every value and tensor type, alignment,
//! streaming, and property tests over random files.

use std::io::{self, Write};

use pinion_format::fuzz::same_value;
use pinion_format::{
    ALIGNMENT_KEY, FormatError, GgmlType, Gguf, GgufWriter, POWERINFER_MAGIC, TensorInfo, Value,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use crate::util::{Raw, Rng, every_value, small_file, tensor_bytes};

/// Asserts that `g` holds exactly `metadata` (floats by bits) in order.
fn assert_metadata(g: &Gguf<'_>, metadata: &[(String, Value)]) {
    assert_eq!(g.metadata.len(), metadata.len());
    for ((k1, v1), (k2, v2)) in g.metadata.iter().zip(metadata) {
        assert_eq!(k1, k2);
        assert!(same_value(v1, v2), "{k1}: read {v1:?}, wrote {v2:?}");
    }
}

#[test]
fn writer_layout_matches_hand_built_bytes() {
    for align in [1u32, 8, 32, 64, 4096] {
        let a: Vec<u8> = (0..12).collect();
        let b: Vec<u8> = (100..168).collect();
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", "llama").unwrap();
        w.add_metadata(ALIGNMENT_KEY, align).unwrap();
        w.add_tensor_data("a", GgmlType::F32, &[3], a.as_slice()).unwrap();
        w.add_tensor_data("b", GgmlType::Q8_0, &[32, 2], b.clone()).unwrap();
        let got = w.to_bytes().unwrap();

        let al = align as usize;
        let b_offset = 12usize.div_ceil(al) * al;
        let expected = Raw::header(b"GGUF", 3, 2, 2)
            .kv_str("general.architecture", "llama")
            .kv_u32(ALIGNMENT_KEY, align)
            .tensor("a", &[3], 0, 0)
            .tensor("b", &[32, 2], 8, b_offset as u64)
            .pad(al)
            .bytes(&a)
            .pad(al)
            .bytes(&b)
            .pad(al);
        assert_eq!(got, expected.0, "alignment {align}");
    }
}

#[test]
fn file_without_tensors_is_header_plus_padding() {
    let mut w = GgufWriter::new();
    w.add_metadata("k", 1u8).unwrap();
    let got = w.to_bytes().unwrap();
    assert_eq!(got, Raw::header(b"GGUF", 3, 0, 1).str("k").u32(0).u8(1).pad(32).0);
    let g = Gguf::parse(&got).unwrap();
    assert!(g.tensors.is_empty());
    assert_eq!(g.get("k"), Some(&Value::U8(1)));
}

#[test]
fn every_value_type_round_trips() {
    let mut w = GgufWriter::new();
    for (k, v) in every_value() {
        w.add_metadata(k, v).unwrap();
    }
    let written = w.metadata().to_vec();
    // Every GGUF value type id (0..=12) is present.
    let mut ids: Vec<u32> = written.iter().map(|(_, v)| v.type_id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, (0..=12).collect::<Vec<_>>());

    let bytes = w.to_bytes().unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_metadata(&g, &written);
    assert_eq!(g.get_str_array("t.strings").unwrap(), ["<s>", "</s>", "", "Ġthe"]);
    assert_eq!(g.get_i64_array("t.i32s").unwrap(), [1, -2, 3]);
    assert_eq!(g.get_f32_array("t.f32s").unwrap(), [0.5, -0.25]);
    assert_eq!(g.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_str("t.string").unwrap(), "héllo ✓");
    assert!(g.get_bool("t.bool").unwrap());
    assert_eq!(g.get_f32("t.f64").unwrap(), std::f64::consts::PI as f32);
    let Some(Value::F32(nan)) = g.get("t.nan") else { panic!("t.nan is not an f32") };
    assert_eq!(nan.to_bits(), 0x7fc0_1234, "NaN payloads are kept");
}

#[test]
fn every_tensor_type_and_rank_round_trips() {
    let mut rng = Rng(1);
    let mut w = GgufWriter::new();
    let mut expected = Vec::new();
    for ty in GgmlType::ALL {
        for dims in [vec![1], vec![3, 2], vec![1, 5, 2], vec![2, 1, 1, 3]] {
            let mut dims: Vec<u64> = dims;
            dims[0] *= ty.block_len() as u64;
            let name = format!("{ty}.{}d", dims.len());
            let data = tensor_bytes(&mut rng, ty, &dims);
            w.add_tensor_data(&name, ty, &dims, data.clone()).unwrap();
            expected.push((name, ty, dims, data));
        }
    }
    let infos = w.tensor_infos().unwrap();
    let (data_offset, file_len) = (w.data_offset(), w.file_len().unwrap());
    let bytes = w.to_bytes().unwrap();
    assert_eq!(bytes.len() as u64, file_len);

    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.tensors, infos, "tensor_infos() predicts the written directory");
    assert_eq!(g.data_offset, data_offset);
    assert_eq!(g.data_offset % 32, 0);
    let mut end_of_previous = g.data_offset as usize;
    for ((name, ty, dims, data), t) in expected.iter().zip(&g.tensors) {
        assert_eq!((&t.name, t.ty, &t.dims), (name, *ty, dims));
        assert_eq!(t.offset % 32, 0, "{name} is aligned");
        let view = g.tensor(name).unwrap();
        assert_eq!(view.data, data.as_slice(), "{name} data");
        // The gap before each tensor is zero padding shorter than the alignment.
        let start = (g.data_offset + t.offset) as usize;
        assert!(start - end_of_previous < 32);
        assert!(bytes[end_of_previous..start].iter().all(|&b| b == 0), "padding before {name} is zero");
        end_of_previous = start + data.len();
    }
    assert!(bytes.len() - end_of_previous < 32);
    assert!(bytes[end_of_previous..].iter().all(|&b| b == 0), "trailing padding is zero");
    assert_eq!(bytes.len() % 32, 0, "the last tensor is padded too");
}

#[test]
fn alignment_applies_to_header_and_every_tensor() {
    for align in [1u32, 2, 16, 64, 256, 1 << 20] {
        let mut rng = Rng(align as u64);
        let mut w = GgufWriter::new();
        w.add_tensor_data("x", GgmlType::F16, &[3], rng.bytes(6)).unwrap();
        w.add_metadata(ALIGNMENT_KEY, align).unwrap();
        w.add_tensor_data("y", GgmlType::Q4_1, &[64], rng.bytes(40)).unwrap();
        assert_eq!(w.alignment(), align as u64);
        let bytes = w.to_bytes().unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.alignment, align as u64);
        assert_eq!(g.data_offset % align as u64, 0);
        for t in &g.tensors {
            assert_eq!(t.offset % align as u64, 0);
        }
        assert_eq!(bytes.len() % align as usize, 0);
        assert_eq!(g.tensors[1].offset, 6u64.div_ceil(align as u64) * align as u64);
    }
}

#[test]
fn set_and_remove_metadata() {
    let mut w = GgufWriter::new();
    w.add_metadata("a", 1u32).unwrap();
    w.add_metadata("b", 2u32).unwrap();
    w.add_metadata("c", 3u32).unwrap();
    w.set_metadata("b", "two").unwrap();
    w.set_metadata("d", 4u64).unwrap();
    assert_eq!(w.remove_metadata("a"), Some(Value::U32(1)));
    assert_eq!(w.remove_metadata("a"), None);
    w.add_metadata(ALIGNMENT_KEY, 64u32).unwrap();
    assert_eq!(w.alignment(), 64);
    assert_eq!(w.remove_metadata(ALIGNMENT_KEY), Some(Value::U32(64)));
    assert_eq!(w.alignment(), 32);
    w.add_metadata("a", 5i8).unwrap();
    let bytes = w.to_bytes().unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let keys: Vec<&str> = g.metadata.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["b", "c", "d", "a"]);
    assert_eq!(g.get_str("b").unwrap(), "two");
    assert_eq!(g.get("a"), Some(&Value::I8(5)));
}

#[test]
fn from_gguf_turns_powerinfer_v2_into_gguf_v3_with_the_same_content() {
    let data: Vec<u8> = (0..128).collect();
    let raw = Raw::header(&POWERINFER_MAGIC, 2, 1, 1)
        .kv_str("general.architecture", "bamboo")
        .tensor("w", &[32], 0, 0)
        .pad(32)
        .bytes(&data);
    let g = Gguf::parse(&raw.0).unwrap();
    assert_eq!(g.version, 2);
    let bytes = GgufWriter::from_gguf(&g).unwrap().to_bytes().unwrap();
    assert_eq!(&bytes[..8], b"GGUF\x03\x00\x00\x00");
    // Apart from magic and version the layout is identical.
    assert_eq!(bytes[8..], raw.0[8..]);
}

#[test]
fn streams_tensors_in_order_mixed_with_in_memory_ones() {
    let mut rng = Rng(3);
    let a = rng.bytes(4 * 7);
    let b = rng.bytes(18 * 4);
    let c = rng.bytes(2 * 5);
    let d = rng.bytes(34 * 3);
    let mut w = GgufWriter::new();
    w.add_tensor_data("a", GgmlType::F32, &[7], a.as_slice()).unwrap();
    w.add_tensor("b", GgmlType::Q4_0, &[64, 2]).unwrap();
    w.add_tensor_data("c", GgmlType::BF16, &[5], c.clone()).unwrap();
    w.add_tensor("d", GgmlType::Q8_0, &[96]).unwrap();

    let mut s = w.begin(Vec::new()).unwrap();
    assert_eq!(s.next_tensor(), Some("b"));
    s.write_tensor_data("b", &b).unwrap();
    assert_eq!(s.next_tensor(), Some("d"));
    // Chunked writes through the callback.
    s.write_tensor_with("d", |out| {
        for chunk in d.chunks(10) {
            out.write_all(chunk)?;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(s.next_tensor(), None);
    let bytes = s.finish().unwrap();

    let g = Gguf::parse(&bytes).unwrap();
    for (name, data) in [("a", &a), ("b", &b), ("c", &c), ("d", &d)] {
        assert_eq!(g.tensor(name).unwrap().data, data.as_slice(), "{name}");
    }
    // Streaming and writing from memory give the same bytes.
    let mut w = GgufWriter::new();
    w.add_tensor_data("a", GgmlType::F32, &[7], a).unwrap();
    w.add_tensor_data("b", GgmlType::Q4_0, &[64, 2], b).unwrap();
    w.add_tensor_data("c", GgmlType::BF16, &[5], c).unwrap();
    w.add_tensor_data("d", GgmlType::Q8_0, &[96], d).unwrap();
    assert_eq!(w.to_bytes().unwrap(), bytes);
}

/// Keeps the first `keep` bytes written and counts the rest.
struct HeadAndCount {
    head: Vec<u8>,
    keep: usize,
    count: u64,
}

impl Write for HeadAndCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.keep.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..room]);
        self.count += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn streams_a_tensor_larger_than_4_gib_with_a_small_buffer() {
    // 4.5 GiB of Q4_0, produced 1 MiB at a time: nothing near the file's size is ever held in memory.
    let rows = 256 * 1024 + 1;
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_tensor("huge", GgmlType::Q4_0, &[32 * 1024, rows]).unwrap();
    w.add_tensor_data("after", GgmlType::F32, &[8], vec![0u8; 32]).unwrap();
    let huge_bytes = 18 * 1024 * rows;
    let infos = w.tensor_infos().unwrap();
    assert_eq!(infos[1].offset, huge_bytes.div_ceil(32) * 32);
    assert!(infos[1].offset > u32::MAX as u64);
    let (data_offset, file_len) = (w.data_offset(), w.file_len().unwrap());

    let sink = HeadAndCount { head: Vec::new(), keep: data_offset as usize, count: 0 };
    let mut s = w.begin(sink).unwrap();
    let chunk = vec![0x11u8; 1 << 20];
    s.write_tensor_with("huge", |out| {
        let mut left = huge_bytes;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..k])?;
            left -= k as u64;
        }
        Ok(())
    })
    .unwrap();
    let sink = s.finish().unwrap();
    assert_eq!(sink.count, file_len);

    // The header alone parses up to the data bounds check, which sees the 64-bit offsets.
    match Gguf::parse(&sink.head) {
        Err(FormatError::TensorOutOfBounds { name, start, end, .. }) => {
            assert_eq!(name, "huge");
            assert_eq!((start, end), (data_offset, data_offset + huge_bytes));
        }
        other => panic!("expected TensorOutOfBounds, got {other:?}"),
    }
}

/// A file written by gguf-py (an independent writer): our reader gets its content, and our writer reproduces
/// it byte for byte.
#[test]
fn gguf_py_file_reads_and_rewrites_byte_for_byte() {
    let bytes = include_bytes!("data/gguf_py_sample.gguf");
    let g = Gguf::parse(bytes).unwrap();
    assert_eq!((g.version, g.alignment, g.metadata.len(), g.tensors.len()), (3, 32, 17, 5));
    let expected: Vec<(&str, Value)> = [("general.architecture", Value::from("llama"))]
        .into_iter()
        .chain(every_value().into_iter().filter(|(k, _)| {
            !["t.bool_false", "t.empty_string", "t.nan", "t.empty", "t.nested", "t.nested_strings"]
                .contains(k)
                && !k.ends_with('s')
        }))
        .chain([
            ("t.strings", Value::from(vec!["<s>", "</s>", "Ġthe"])),
            ("t.ints", Value::from(vec![1i32, -2, 3])),
            ("t.floats", Value::from(vec![0.5f32, -0.25])),
            ("t.bools", Value::from(vec![true, false])),
        ])
        .collect();
    let expected: Vec<(String, Value)> = expected.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    assert_metadata(&g, &expected);

    let f32s: Vec<f32> =
        g.tensor("f32").unwrap().data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(f32s, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let dims: Vec<(&str, GgmlType, &[u64])> =
        g.tensors.iter().map(|t| (t.name.as_str(), t.ty, t.dims.as_slice())).collect();
    assert_eq!(
        dims,
        [
            ("f32", GgmlType::F32, [3u64, 2].as_slice()),
            ("f16", GgmlType::F16, &[5]),
            ("q8_0", GgmlType::Q8_0, &[64, 2]),
            ("q4_1", GgmlType::Q4_1, &[64, 2]),
            ("bf16", GgmlType::BF16, &[3]),
        ]
    );
    let mut row = vec![0.0f32; 64];
    pinion_format::quant::dequantize_row(GgmlType::Q8_0, g.tensor("q8_0").unwrap().row(1), &mut row).unwrap();
    assert!((row[63] - 1.0).abs() < 1e-2 && (row[0] - 1.0 / 127.0).abs() < 1e-2, "{row:?}");

    let again = GgufWriter::from_gguf(&g).unwrap().to_bytes().unwrap();
    assert!(again == bytes, "our writer lays the file out as gguf-py does");
}

#[test]
fn small_file_rewrites_to_identical_bytes() {
    let bytes = small_file();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.tensors.len(), GgmlType::ALL.len() + 1);
    let again = GgufWriter::from_gguf(&g).unwrap().to_bytes().unwrap();
    assert!(again == bytes);
}

// === Property tests ===

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<f32>().prop_map(Value::F32),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,16}".prop_map(Value::String),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        any::<f64>().prop_map(Value::F64),
    ]
    .boxed()
}

fn array_of_scalars() -> BoxedStrategy<Value> {
    prop_oneof![
        vec(any::<u8>(), 0..6).prop_map(Value::from),
        vec(any::<i16>(), 0..6).prop_map(Value::from),
        vec(any::<u32>(), 0..6).prop_map(Value::from),
        vec(any::<i64>(), 0..6).prop_map(Value::from),
        vec(any::<f32>(), 0..6).prop_map(Value::from),
        vec(any::<f64>(), 0..6).prop_map(Value::from),
        vec(any::<bool>(), 0..6).prop_map(Value::from),
        vec("\\PC{0,8}", 0..6).prop_map(Value::from),
    ]
    .boxed()
}

fn value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => scalar(),
        2 => array_of_scalars(),
        1 => vec(array_of_scalars(), 0..4).prop_map(Value::Array),
        1 => vec(vec(array_of_scalars(), 0..3).prop_map(Value::Array), 0..3).prop_map(Value::Array),
    ]
    .boxed()
}

/// Tensors as (type index, dims in blocks, data seed).
fn tensors() -> impl Strategy<Value = Vec<(usize, Vec<u64>, u64)>> {
    vec((0..GgmlType::ALL.len(), vec(1u64..4, 1..=4), any::<u64>()), 0..6)
}

proptest! {
    #![proptest_config(crate::util::proptest_config(256))]

    #[test]
    fn random_files_round_trip(
        metadata in btree_map("[a-z][a-z._]{0,11}", value(), 0..10),
        tensors in tensors(),
        align in prop::option::of(prop::sample::select(vec![1u32, 2, 8, 32, 64, 512])),
    ) {
        let mut w = GgufWriter::new();
        for (k, v) in &metadata {
            w.add_metadata(k.as_str(), v.clone()).unwrap();
        }
        if let Some(a) = align {
            w.add_metadata(ALIGNMENT_KEY, a).unwrap();
        }
        let mut expected = Vec::new();
        for (i, (ty_idx, mut dims, seed)) in tensors.into_iter().enumerate() {
            let ty = GgmlType::ALL[ty_idx];
            dims[0] *= ty.block_len() as u64;
            let data = tensor_bytes(&mut Rng(seed), ty, &dims);
            let name = format!("tensor.{i}");
            w.add_tensor_data(&name, ty, &dims, data.clone()).unwrap();
            expected.push((name, ty, dims, data));
        }
        let written = w.metadata().to_vec();
        let infos: Vec<TensorInfo> = w.tensor_infos().unwrap();
        let bytes = w.to_bytes().unwrap();

        let g = Gguf::parse(&bytes).unwrap();
        assert_metadata(&g, &written);
        prop_assert_eq!(&g.tensors, &infos);
        let align = align.unwrap_or(32) as u64;
        prop_assert_eq!(g.alignment, align);
        prop_assert_eq!(bytes.len() as u64 % align, 0);
        for (name, ty, dims, data) in &expected {
            let v = g.tensor(name).unwrap();
            prop_assert_eq!((v.ty, v.dims), (*ty, dims.as_slice()));
            prop_assert_eq!(v.data, data.as_slice());
        }
        // Writing what was read gives the same bytes.
        let again = GgufWriter::from_gguf(&g).unwrap().to_bytes().unwrap();
        prop_assert!(again == bytes);
    }
}
