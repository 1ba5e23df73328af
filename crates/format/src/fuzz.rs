//! Invariant checks for fuzzing: each takes arbitrary bytes and panics only when an invariant is broken.
//!
//! The fuzz targets in the top-level `fuzz/` crate are a few lines calling these, and the integration tests run
//! them over a deterministic corpus, so the invariants are exercised in CI without a fuzzer.

use crate::gguf::{Gguf, Value};
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
