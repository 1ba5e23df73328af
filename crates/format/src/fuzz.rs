//! Invariant checks for fuzzing: each takes arbitrary bytes and panics only when an invariant is broken.
//!
//! The fuzz targets in the top-level `fuzz/` crate are a few lines calling these, and the integration tests run
//! them over a deterministic corpus, so the invariants are exercised in CI without a fuzzer.

use std::ops::Range;

use crate::error::FormatError;
use crate::gguf::{Gguf, Value};
use crate::packed::{
    HEADER_CRC_AT, PAGE, PackedFile, PackedHeader, PackedIndex, parse_index, parse_packed_index,
};
use crate::quant::dequantize_row;
use crate::writer::GgufWriter;

/// Rows longer than this are not dequantized by [`check_parse`], to keep each run fast.
const MAX_CHECKED_ROW: usize = 1 << 16;

/// Parses `data` as GGUF. If that succeeds, checks that:
///
/// - every metadata key and tensor can be looked up, every tensor view has its declared size, and the first
///   row of every tensor dequantizes;
/// - [`GgufWriter::from_gguf`] accepts the file and writes it, and the result parses to the same metadata
///   (floats compared bit for bit), tensor names, types, shapes and data;
/// - writing that result again gives identical bytes.
///
/// # Panics
///
/// When one of these invariants does not hold. Parse errors are not failures.
pub fn check_parse(data: &[u8]) {
    let Ok(g) = Gguf::parse(data) else { return };

    for (key, value) in &g.metadata {
        assert!(g.get(key).is_some_and(|v| same_value(v, value)), "metadata key {key:?} does not look up");
    }
    for t in &g.tensors {
        let view = g.tensor(&t.name).expect("a parsed tensor must have a view");
        assert_eq!(view.data.len() as u64, t.n_bytes(), "tensor {:?}: view size", t.name);
        assert_eq!(view.row_bytes() * view.n_rows(), view.data.len(), "tensor {:?}: rows", t.name);
        if view.row_len() <= MAX_CHECKED_ROW && view.n_rows() > 0 {
            let mut row = vec![0.0f32; view.row_len()];
            dequantize_row(view.ty, view.row(0), &mut row).expect("the first row must dequantize");
        }
    }

    let written = GgufWriter::from_gguf(&g)
        .and_then(GgufWriter::to_bytes)
        .expect("a file that parses must be writable");
    let g2 = Gguf::parse(&written).expect("a written file must parse");
    assert_eq!(g2.version, 3);
    assert_eq!(g2.alignment, g.alignment);
    assert_eq!(g2.metadata.len(), g.metadata.len());
    for ((k1, v1), (k2, v2)) in g.metadata.iter().zip(&g2.metadata) {
        assert_eq!(k1, k2);
        assert!(same_value(v1, v2), "metadata {k1:?}: {v1:?} became {v2:?}");
    }
    assert_eq!(g2.tensors.len(), g.tensors.len());
    for (t1, t2) in g.tensors.iter().zip(&g2.tensors) {
        assert_eq!((&t1.name, t1.ty, &t1.dims), (&t2.name, t2.ty, &t2.dims));
        let d1 = g.tensor(&t1.name).map(|v| v.data).ok();
        let d2 = g2.tensor(&t2.name).map(|v| v.data).ok();
        assert!(d1 == d2, "tensor {:?}: data differs after writing", t1.name);
    }

    let rewritten = GgufWriter::from_gguf(&g2)
        .and_then(GgufWriter::to_bytes)
        .expect("a written file must be writable again");
    assert!(rewritten == written, "writing is not idempotent");
}

/// Equality of metadata values with floats compared by their bits, so that a NaN equals itself.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        _ => a == b,
    }
}

/// Parses `data` as a packed file, twice: as given, and with its header, index and resident checksums
/// recomputed by [`reseal_packed`] (so that a fuzzer's mutations reach the checks behind the checksums). For
/// each parse that succeeds, checks that:
///
/// - [`PackedHeader::parse`] and [`parse_index`] on the header page and index bytes give the same layers, and
///   [`parse_packed_index`] the same layers and resident checksums;
/// - every layer lies in the FFN section, after the previous one; every record is page aligned, inside its
///   layer, and after the previous record; every position's gate row lies in its cluster's gate block, which
///   lies in the record, and its bundle lies in the record after the gate block and after the previous bundle;
/// - `position_of` inverts `order`; the in-memory accessors return slices of the ranges' lengths;
/// - a version 1 file has no resident checksums; a version 2 file has one per resident tensor, each naming that
///   tensor's data range, and row tables that tile their tensors, one for each of `token_embd.weight` and
///   `output.weight` present;
/// - a tensor's rows verify all at once exactly when they verify one by one, and a failure names a row inside
///   the tensor; a slice of the wrong length is refused with a typed error;
/// - [`PackedFile::verify_all`] returns (an error is not a failure).
///
/// # Panics
///
/// When one of these invariants does not hold. Parse errors are not failures.
pub fn check_packed_parse(data: &[u8]) {
    check_packed(data);
    let mut sealed = data.to_vec();
    if reseal_packed(&mut sealed) {
        check_packed(&sealed);
    }
}

/// Recomputes the resident and index checksums and then the header checksum of a packed file, from the
/// header's (unchecked) offsets and lengths. Returns `false`, leaving `bytes` unchanged, when the file is
/// shorter than a page or a section lies outside it. For tests and fuzzing: it makes corrupted content look
/// sealed, so that the structural checks behind the checksums can be exercised.
pub fn reseal_packed(bytes: &mut [u8]) -> bool {
    if (bytes.len() as u64) < PAGE {
        return false;
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let section = |b: &[u8], at: usize| -> Option<Range<usize>> {
        let (off, len) = (u64_at(b, at), u64_at(b, at + 8));
        let end = off.checked_add(len)?;
        (end <= b.len() as u64).then_some(off as usize..end as usize)
    };
    let (Some(resident), Some(index)) = (section(bytes, 16), section(bytes, 48)) else { return false };
    let resident_crc = crc32fast::hash(&bytes[resident]);
    let index_crc = crc32fast::hash(&bytes[index]);
    bytes[68..72].copy_from_slice(&resident_crc.to_le_bytes());
    bytes[72..76].copy_from_slice(&index_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&bytes[..HEADER_CRC_AT]);
    bytes[HEADER_CRC_AT..HEADER_CRC_AT + 4].copy_from_slice(&header_crc.to_le_bytes());
    true
}

fn check_packed(data: &[u8]) {
    let Ok(f) = PackedFile::parse(data) else { return };
    let h = f.header();
    let h2 = PackedHeader::parse(data).expect("the header of a parsed file must parse");
    assert_eq!(&h2, h);
    let index = &data[h.index_offset as usize..h.file_len() as usize];
    let layers = parse_index(h, index, data.len() as u64).expect("the index of a parsed file must parse");
    assert!(layers == f.layers(), "parse_index disagrees with PackedFile::parse");
    let PackedIndex { layers, checksums } =
        parse_packed_index(h, index, data.len() as u64).expect("the index of a parsed file must parse");
    assert!(layers == f.layers() && &checksums == f.checksums(), "parse_packed_index disagrees");
    assert_eq!(f.n_layers(), h.n_layers as usize);
    assert_eq!(f.resident().len() as u64, h.resident_len);
    assert!(Gguf::parse(f.resident()).is_ok(), "the resident section must parse");

    let mut prev_end = h.ffn_offset;
    for (l, layer) in f.layers().iter().enumerate() {
        let lr = layer.layer_range();
        assert_eq!(lr.start, prev_end, "layer {l} must follow the previous one");
        assert!(lr.end <= h.ffn_offset + h.ffn_len, "layer {l} must lie in the FFN section");
        prev_end = lr.end;
        let mut rec_end = lr.start;
        for k in 0..layer.n_clusters() {
            let r = layer.record_range(k);
            assert_eq!(r.start % PAGE, 0, "record must be page aligned");
            assert_eq!(r.end % PAGE, 0, "record must be padded to a page multiple");
            assert!(r.start >= rec_end && r.end <= lr.end, "records must be disjoint and inside the layer");
            rec_end = r.end;
            let gb = layer.gate_block_range(k);
            assert!(r.start == gb.start && gb.end <= r.end);
            assert_eq!(f.gate_block(l, k).len() as u64, gb.end - gb.start);
            let first = k * layer.cluster_neurons;
            let mut bundle_end = gb.end;
            for pos in first..first + layer.cluster_len(k) {
                let g = layer.gate_row_range(pos);
                assert!(gb.start <= g.start && g.end <= gb.end, "gate row must lie in its gate block");
                let b = layer.bundle_range(pos);
                assert!(
                    b.start >= bundle_end && b.end <= r.end,
                    "bundles must be disjoint and in the record"
                );
                bundle_end = b.end;
                assert_eq!(f.bundle(l, pos).len(), layer.bundle_bytes());
                assert_eq!(layer.position_of(layer.order[pos]), pos);
            }
        }
    }
    assert_eq!(prev_end, h.ffn_offset + h.ffn_len, "layers must fill the FFN section");
    check_resident_checksums(data, &f);
    let _ = f.verify_all();
}

fn check_resident_checksums(data: &[u8], f: &PackedFile<'_>) {
    let (h, g, sums) = (f.header(), f.resident_gguf(), f.checksums());
    if h.version == 1 {
        assert!(
            sums.is_empty() && sums.row_tables().is_empty(),
            "a version 1 file has no resident checksums"
        );
        return;
    }
    assert_eq!(sums.tensors().len(), g.tensors.len());
    for (t, info) in sums.tensors().iter().zip(&g.tensors) {
        let start = h.resident_offset + g.data_offset + info.offset;
        assert_eq!(
            (&t.name, t.range()),
            (&info.name, start..start + info.n_bytes()),
            "tensor checksum entry"
        );
        assert_eq!(f.tensor_checksum(&t.name), Some(t.crc));
    }
    for name in ["token_embd.weight", "output.weight"] {
        assert_eq!(g.tensor_info(name).is_some(), f.row_checksums(name).is_some(), "row table of {name}");
    }
    for rows in sums.row_tables() {
        let t = sums.tensor(rows.name()).expect("a row table names a tensor");
        assert_eq!(rows.offset(), t.offset);
        assert_eq!((rows.n_rows() * rows.row_bytes()) as u64, t.len, "rows tile the tensor");
        let bytes = &data[t.offset as usize..(t.offset + t.len) as usize];
        let whole = f.verify_rows(rows.name(), 0, bytes);
        let mut first_bad = None;
        for (r, row) in bytes.chunks_exact(rows.row_bytes()).enumerate() {
            match rows.verify(r, row) {
                Ok(()) => {}
                Err(FormatError::Checksum { offset, .. }) => {
                    assert_eq!(offset, t.offset + (r * rows.row_bytes()) as u64, "a row's offset");
                    first_bad.get_or_insert(offset);
                }
                Err(e) => panic!("row {r} of {}: {e}", rows.name()),
            }
        }
        match whole {
            Ok(()) => assert!(first_bad.is_none(), "all rows verify at once but not one by one"),
            Err(FormatError::Checksum { offset, .. }) => {
                assert_eq!(Some(offset), first_bad, "the first bad row")
            }
            Err(e) => panic!("rows of {}: {e}", rows.name()),
        }
        if rows.n_rows() > 0 {
            if rows.row_bytes() > 1 {
                let short = &bytes[..rows.row_bytes() - 1];
                assert!(matches!(rows.verify(0, short), Err(FormatError::BadBlockView { .. })));
            }
            let past = &bytes[..rows.row_bytes()];
            assert!(matches!(rows.verify(rows.n_rows(), past), Err(FormatError::BadBlockView { .. })));
            assert!(matches!(rows.verify(usize::MAX, past), Err(FormatError::BadBlockView { .. })));
        }
    }
}
