//! Comparisons against gguf-py, an independent implementation: dequantization of every type it shares with us,
//! and the Q4_0 / Q4_1 / Q8_0 reference quantizers. Fixtures come from `tests/data/gen_reference.py`.
//!
//! Results must be bit-exact. gguf-py computes in f32 with the same operation order as ggml's reference C code
//! (e.g. `(d * sc) * q - dmin * m` for Q4_K) and numpy does not fuse multiply-adds, so there is no rounding
//! difference to allow for. The one exception is NaN: only "is NaN" is compared, because converting a NaN from
//! f16 may or may not set the quiet bit depending on whether the conversion uses F16C instructions.

use pinion_format::GgmlType;
use pinion_format::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0};

macro_rules! data {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/", $name)).as_slice()
    };
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn check_dequant(ty: GgmlType, input: &[u8], expected: &[u8]) {
    let expected = f32s(expected);
    assert_eq!(input.len(), ty.row_bytes(expected.len()).unwrap(), "{ty}: fixture sizes");
    // include_bytes! data need not be aligned for the block type; dequantize_row copies when it is not.
    let mut out = vec![0.0f32; expected.len()];
    quant::dequantize_row(ty, input, &mut out).unwrap();
    let mut n_nan = 0;
    for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
        if want.is_nan() {
            assert!(got.is_nan(), "{ty} value {i}: got {got}, gguf-py gives NaN");
            n_nan += 1;
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{ty} value {i}: got {got:e}, gguf-py gives {want:e}");
        }
    }
    // The fixtures are meant to hold ordinary values; a few NaNs only in the float types' special patterns.
    assert!(n_nan * 20 < expected.len(), "{ty}: too many NaNs ({n_nan}) for a meaningful comparison");
    assert!(expected.iter().filter(|v| **v != 0.0).count() * 2 > expected.len(), "{ty}: mostly zeros");
}

#[test]
fn q4_0_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q4_0, data!("dequant_q4_0.bin"), data!("dequant_q4_0.f32"));
}

#[test]
fn q4_1_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q4_1, data!("dequant_q4_1.bin"), data!("dequant_q4_1.f32"));
}

#[test]
fn q8_0_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q8_0, data!("dequant_q8_0.bin"), data!("dequant_q8_0.f32"));
}

#[test]
fn q4_k_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q4K, data!("dequant_q4_k.bin"), data!("dequant_q4_k.f32"));
}

#[test]
fn q5_0_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q5_0, data!("dequant_q5_0.bin"), data!("dequant_q5_0.f32"));
}

#[test]
fn q5_1_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q5_1, data!("dequant_q5_1.bin"), data!("dequant_q5_1.f32"));
}

#[test]
fn q2_k_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q2K, data!("dequant_q2_k.bin"), data!("dequant_q2_k.f32"));
}

#[test]
fn q3_k_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q3K, data!("dequant_q3_k.bin"), data!("dequant_q3_k.f32"));
}

#[test]
fn q5_k_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q5K, data!("dequant_q5_k.bin"), data!("dequant_q5_k.f32"));
}

#[test]
fn q6_k_dequantizes_like_gguf_py() {
    check_dequant(GgmlType::Q6K, data!("dequant_q6_k.bin"), data!("dequant_q6_k.f32"));
}

#[test]
fn f16_converts_like_gguf_py() {
    check_dequant(GgmlType::F16, data!("dequant_f16.bin"), data!("dequant_f16.f32"));
}

#[test]
fn bf16_converts_like_gguf_py() {
    check_dequant(GgmlType::BF16, data!("dequant_bf16.bin"), data!("dequant_bf16.f32"));
}

/// gguf-py's Q4_0, Q4_1 and Q8_0 quantizers follow ggml's `quantize_row_*_ref` in f32 (Q8_0's is documented as
/// "bit-exact" with it), so ours must give the same bytes.
#[test]
fn quantizers_match_gguf_py() {
    let x = f32s(data!("quant_input.f32"));
    assert_eq!(x.len(), 16 * 64);

    let mut b = vec![BlockQ4_0 { d: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
    quant::quantize_row_q4_0(&x, &mut b);
    assert_blocks_eq("q4_0", bytemuck::cast_slice(&b), data!("quant_q4_0.bin"), 18);

    let mut b = vec![BlockQ4_1 { d: half::f16::ZERO, m: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
    quant::quantize_row_q4_1(&x, &mut b);
    assert_blocks_eq("q4_1", bytemuck::cast_slice(&b), data!("quant_q4_1.bin"), 20);

    let mut b = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; x.len() / 32];
    quant::quantize_row_q8_0(&x, &mut b);
    assert_blocks_eq("q8_0", bytemuck::cast_slice(&b), data!("quant_q8_0.bin"), 34);
}

fn assert_blocks_eq(what: &str, got: &[u8], want: &[u8], block: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.chunks(block).zip(want.chunks(block)).enumerate() {
        assert_eq!(g, w, "{what}: block {i} differs from gguf-py");
    }
}
