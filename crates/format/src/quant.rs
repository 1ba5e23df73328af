//! Quantized block types of GGML and their reference (scalar) quantizers and dequantizers.
//!
//! The layouts are byte-for-byte those of ggml (`ggml-common.h`), checked at compile time, so that tensor data
//! in a GGUF file can be viewed as a slice of blocks without copying (see [`blocks`]). The arithmetic of the
//! quantizers follows ggml's `quantize_row_*_ref` so that a row quantized here matches llama.cpp's.

use std::borrow::Cow;

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::error::FormatError;

/// Values per block for the 32-wide formats.
pub const QK: usize = 32;
/// Values per super-block for the K-quants.
pub const QK_K: usize = 256;

/// A tensor element type, with the numeric ids GGUF uses on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half float (id 1).
    F16,
    /// [`BlockQ4_0`] (id 2).
    Q4_0,
    /// [`BlockQ4_1`] (id 3).
    Q4_1,
    /// [`BlockQ5_0`] (id 6).
    Q5_0,
    /// [`BlockQ5_1`] (id 7).
    Q5_1,
    /// [`BlockQ8_0`] (id 8).
    Q8_0,
    /// [`BlockQ8_1`] (id 9).
    Q8_1,
    /// [`BlockQ2K`] (id 10).
    Q2K,
    /// [`BlockQ3K`] (id 11).
    Q3K,
    /// [`BlockQ4K`] (id 12).
    Q4K,
    /// [`BlockQ5K`] (id 13).
    Q5K,
    /// [`BlockQ6K`] (id 14).
    Q6K,
    /// [`BlockQ8K`] (id 15).
    Q8K,
    /// bfloat16 (id 30).
    BF16,
}

impl GgmlType {
    /// Every supported type, by id.
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::BF16,
    ];

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// The type for a GGUF type id, or `None` for an id pinion does not support.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The name ggml gives the type (`q4_1`, `f32`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q8_1 => "q8_1",
            GgmlType::Q2K => "q2_K",
            GgmlType::Q3K => "q3_K",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
            GgmlType::Q8K => "q8_K",
            GgmlType::BF16 => "bf16",
        }
    }

    /// Number of values in one block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => QK,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K | GgmlType::Q8K => {
                QK_K
            }
        }
    }

    /// Number of bytes in one block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => size_of::<BlockQ4_0>(),
            GgmlType::Q4_1 => size_of::<BlockQ4_1>(),
            GgmlType::Q5_0 => size_of::<BlockQ5_0>(),
            GgmlType::Q5_1 => size_of::<BlockQ5_1>(),
            GgmlType::Q8_0 => size_of::<BlockQ8_0>(),
            GgmlType::Q8_1 => size_of::<BlockQ8_1>(),
            GgmlType::Q2K => size_of::<BlockQ2K>(),
            GgmlType::Q3K => size_of::<BlockQ3K>(),
            GgmlType::Q4K => size_of::<BlockQ4K>(),
            GgmlType::Q5K => size_of::<BlockQ5K>(),
            GgmlType::Q6K => size_of::<BlockQ6K>(),
            GgmlType::Q8K => size_of::<BlockQ8K>(),
        }
    }

    /// Bytes taken by a row of `n` values, or an error if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize, FormatError> {
        if n % self.block_len() != 0 {
            return Err(FormatError::RowNotBlockAligned { ty: self, len: n, block_len: self.block_len() });
        }
        Ok(n / self.block_len() * self.block_bytes())
    }
}

/// Every type id ggml defines (`enum ggml_type` in `ggml.h`, including ids it has since retired) with the
/// name ggml's enum gives it, supported by pinion or not.
const GGML_TYPE_NAMES: [(u32, &str); 43] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (4, "Q4_2"),
    (5, "Q4_3"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (31, "Q4_0_4_4"),
    (32, "Q4_0_4_8"),
    (33, "Q4_0_8_8"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (36, "IQ4_NL_4_4"),
    (37, "IQ4_NL_4_8"),
    (38, "IQ4_NL_8_8"),
    (39, "MXFP4"),
    (40, "NVFP4"),
    (41, "Q1_0"),
    (42, "Q2_0"),
];

/// The name of ggml type `id` as `ggml.h` spells it (`"IQ2_XXS"` for 16), whether pinion supports it or not;
/// `None` for an id ggml does not define.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    GGML_TYPE_NAMES.iter().find(|(i, _)| *i == id).map(|(_, name)| *name)
}

/// Why a tensor of type `id` cannot be loaded, naming the type and listing the supported ones:
/// `"IQ2_XXS (id 16) is not supported; supported: F32, F16, Q4_0, ..."`, or for an id ggml does not define,
/// `"type id 99 is not a ggml type; supported: ..."`. Meant for ids [`GgmlType::from_id`] rejects.
pub fn unsupported_type_message(id: u32) -> String {
    let supported: Vec<&str> = GgmlType::ALL.iter().filter_map(|t| ggml_type_name(t.id())).collect();
    let what = match ggml_type_name(id) {
        Some(name) => format!("{name} (id {id}) is not supported"),
        None => format!("type id {id} is not a ggml type"),
    };
    format!("{what}; supported: {}", supported.join(", "))
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// 32 weights as 4-bit values around 8 with one scale: `x = (q - 8) * d`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Low nibbles hold values 0..16, high nibbles values 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// 32 weights as 4-bit values with a scale and a minimum: `x = q * d + m`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Low nibbles hold values 0..16, high nibbles values 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// 32 weights as signed bytes with one scale: `x = q * d`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// 32 weights as 5-bit values around 16 with one scale: `x = (q - 16) * d`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bits: bit `j` of the little-endian `u32` belongs to value `j`.
    pub qh: [u8; 4],
    /// Low four bits: low nibbles hold values 0..16, high nibbles values 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// 32 weights as 5-bit values with a scale and a minimum: `x = q * d + m`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Fifth bits: bit `j` of the little-endian `u32` belongs to value `j`.
    pub qh: [u8; 4],
    /// Low four bits: low nibbles hold values 0..16, high nibbles values 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// Like [`BlockQ8_0`] plus `s = d * sum(qs)`, the activation format paired with Q4_1 weights.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * sum(qs)`.
    pub s: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}
const _: () = assert!(size_of::<BlockQ8_1>() == 36);

/// 256 weights in 16 sub-blocks of 16, 2-bit values, 4-bit sub-block scales and minimums:
/// `x = d * (sc & 15) * q - dmin * (sc >> 4)`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ2K {
    /// Scale (low nibble) and minimum (high nibble) of each sub-block of 16.
    pub scales: [u8; QK_K / 16],
    /// 2-bit values: each 32 bytes hold 128 values, bits `2j..2j + 2` of byte `l` being value `32j + l`.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block minimums.
    pub dmin: f16,
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// 256 weights in 16 sub-blocks of 16, 3-bit values, 6-bit signed sub-block scales:
/// `x = d * (sc - 32) * (q - 4 * !h)`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ3K {
    /// High bits, inverted: bit `j` of byte `l` is set when value `32j + l` is not lowered by 4.
    pub hmask: [u8; QK_K / 8],
    /// Low two bits, laid out as [`BlockQ2K::qs`].
    pub qs: [u8; QK_K / 4],
    /// Sixteen 6-bit scales (offset by 32), packed as ggml's `kmask` shuffle reads them.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// 256 weights in 8 sub-blocks of 32, 4-bit values, 6-bit sub-block scales and minimums.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed as ggml's `get_scale_min_k4` reads them.
    pub scales: [u8; 12],
    /// 4-bit values: each 32 bytes hold 64 values, low nibbles first.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// 256 weights in 8 sub-blocks of 32, 5-bit values, 6-bit sub-block scales and minimums.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5K {
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed as in [`BlockQ4K`].
    pub scales: [u8; 12],
    /// Fifth bits: bit `j` of byte `l` belongs to value `32j + l`.
    pub qh: [u8; QK_K / 8],
    /// Low four bits, laid out as [`BlockQ4K::qs`].
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// 256 weights in 16 sub-blocks of 16, 6-bit values, 8-bit sub-block scales.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    /// Low 4 bits of the values.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the values.
    pub qh: [u8; QK_K / 4],
    /// Signed 8-bit scales of the 16 sub-blocks.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// 256 activations as signed bytes with an f32 scale and sums of each 16, for K-quant dot products.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// Sums of each 16 consecutive `qs`.
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(size_of::<BlockQ8K>() == 292);

/// Views raw tensor bytes as a slice of blocks without copying.
///
/// Fails if the length is not a whole number of blocks or the bytes are not aligned for `B`.
pub fn blocks<B: Pod>(bytes: &[u8]) -> Result<&[B], FormatError> {
    bytemuck::try_cast_slice(bytes).map_err(|e| FormatError::BadBlockView {
        len: bytes.len(),
        block: size_of::<B>(),
        why: e.to_string(),
    })
}

/// Quantizes `x` to Q4_0 as ggml's `quantize_row_q4_0_ref` does. `x.len()` must be `32 * out.len()`.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q4_0: length mismatch");
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for j in 0..QK / 2 {
            let x0 = xb[j] * id;
            let x1 = xb[QK / 2 + j] * id;
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Quantizes `x` to Q4_1 as ggml's `quantize_row_q4_1_ref` does.
pub fn quantize_row_q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q4_1: length mismatch");
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let min = xb.iter().copied().fold(f32::MAX, f32::min);
        let max = xb.iter().copied().fold(f32::MIN, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        b.m = f16::from_f32(min);
        for j in 0..QK / 2 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[QK / 2 + j] - min) * id;
            let q0 = ((x0 + 0.5) as i8).min(15) as u8;
            let q1 = ((x1 + 0.5) as i8).min(15) as u8;
            b.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Quantizes `x` to Q8_0 as ggml's `quantize_row_q8_0_ref` does.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q8_0: length mismatch");
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes `x` to Q8_1 as ggml's `quantize_row_q8_1_ref` does.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), out.len() * QK, "quantize_row_q8_1: length mismatch");
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.s = f16::from_f32(sum as f32 * d);
    }
}

/// Dequantizes Q4_0 blocks into `out` (`32 * blocks.len()` values).
pub fn dequantize_row_q4_0(blocks: &[BlockQ4_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q4_0: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            y[j] = ((b.qs[j] & 0x0F) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Dequantizes Q4_1 blocks into `out`.
pub fn dequantize_row_q4_1(blocks: &[BlockQ4_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q4_1: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        let m = b.m.to_f32();
        for j in 0..QK / 2 {
            y[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            y[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// Dequantizes Q5_0 blocks into `out`, as ggml's `dequantize_row_q5_0`.
pub fn dequantize_row_q5_0(blocks: &[BlockQ5_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q5_0: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((b.qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + QK / 2] = (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Dequantizes Q5_1 blocks into `out`, as ggml's `dequantize_row_q5_1` (without contracting `q * d + m`).
pub fn dequantize_row_q5_1(blocks: &[BlockQ5_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q5_1: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        let m = b.m.to_f32();
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..QK / 2 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = ((b.qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
            y[j + QK / 2] = ((b.qs[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// Dequantizes Q8_0 blocks into `out`.
pub fn dequantize_row_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q8_0: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// Dequantizes Q8_1 blocks into `out`.
pub fn dequantize_row_q8_1(blocks: &[BlockQ8_1], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK, "dequantize_row_q8_1: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantizes Q2_K super-blocks into `out` (`256 * blocks.len()` values), as ggml's `dequantize_row_q2_K`.
pub fn dequantize_row_q2k(blocks: &[BlockQ2K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q2k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let min = b.dmin.to_f32();
        // Sub-block `s` (16 values) is group `s / 2` of 32: bits `2 * (g % 4)` of bytes `32 * (g / 4)..`.
        for (s, (&sc, ys)) in b.scales.iter().zip(y.chunks_exact_mut(16)).enumerate() {
            let (g, half) = (s / 2, s % 2);
            let q = &b.qs[32 * (g / 4) + 16 * half..][..16];
            let shift = 2 * (g % 4);
            let dl = d * (sc & 0x0F) as f32;
            let ml = min * (sc >> 4) as f32;
            for (o, &q) in ys.iter_mut().zip(q) {
                *o = dl * ((q >> shift) & 3) as f32 - ml;
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K block, minus 32, as ggml's `kmask` shuffle unpacks them.
pub fn q3k_scales(s: &[u8; 12]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Dequantizes Q3_K super-blocks into `out`, as ggml's `dequantize_row_q3_K`.
pub fn dequantize_row_q3k(blocks: &[BlockQ3K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q3k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d_all = b.d.to_f32();
        let scales = q3k_scales(&b.scales);
        for (s, ys) in y.chunks_exact_mut(16).enumerate() {
            let (g, half) = (s / 2, s % 2);
            let q = &b.qs[32 * (g / 4) + 16 * half..][..16];
            let hm = &b.hmask[16 * half..][..16];
            let shift = 2 * (g % 4);
            let dl = d_all * scales[s] as f32;
            for ((o, &q), &h) in ys.iter_mut().zip(q).zip(hm) {
                let low = ((q >> shift) & 3) as i8;
                let v = low - if h & (1 << g) != 0 { 0 } else { 4 };
                *o = dl * v as f32;
            }
        }
    }
}

/// Dequantizes Q4_K super-blocks into `out` (`256 * blocks.len()` values), as ggml's `dequantize_row_q4_K`.
pub fn dequantize_row_q4k(blocks: &[BlockQ4K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q4k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let dmin = b.dmin.to_f32();
        for (chunk, (q, ys)) in b.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            for l in 0..32 {
                ys[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                ys[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// Dequantizes Q5_K super-blocks into `out`, as ggml's `dequantize_row_q5_K`.
pub fn dequantize_row_q5k(blocks: &[BlockQ5K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q5k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let dmin = b.dmin.to_f32();
        for (chunk, (q, ys)) in b.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
            for l in 0..32 {
                let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                ys[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
                ys[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
            }
        }
    }
}

/// Dequantizes Q6_K super-blocks into `out`, as ggml's `dequantize_row_q6_K`.
pub fn dequantize_row_q6k(blocks: &[BlockQ6K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q6k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        for half in 0..2 {
            let ql = &b.ql[64 * half..];
            let qh = &b.qh[32 * half..];
            let sc = &b.scales[8 * half..];
            let ys = &mut y[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                ys[l] = d * sc[is] as f32 * q1 as f32;
                ys[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                ys[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                ys[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

/// Dequantizes Q8_K blocks into `out`, as ggml's `dequantize_row_q8_K`.
pub fn dequantize_row_q8k(blocks: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK_K, "dequantize_row_q8k: length mismatch");
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = b.d * q as f32;
        }
    }
}

/// Dequantizes one row of raw tensor bytes of type `ty` into `out`.
///
/// `bytes` must hold exactly `out.len()` values of `ty`, else this returns an error; it need not be aligned.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let need = ty.row_bytes(out.len())?;
    if bytes.len() != need {
        return Err(FormatError::BadBlockView {
            len: bytes.len(),
            block: ty.block_bytes(),
            why: format!("{} values of {ty} take {need} bytes", out.len()),
        });
    }
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => dequantize_row_q4_0(&blocks_or_copy(bytes), out),
        GgmlType::Q4_1 => dequantize_row_q4_1(&blocks_or_copy(bytes), out),
        GgmlType::Q5_0 => dequantize_row_q5_0(&blocks_or_copy(bytes), out),
        GgmlType::Q5_1 => dequantize_row_q5_1(&blocks_or_copy(bytes), out),
        GgmlType::Q8_0 => dequantize_row_q8_0(&blocks_or_copy(bytes), out),
        GgmlType::Q8_1 => dequantize_row_q8_1(&blocks_or_copy(bytes), out),
        GgmlType::Q2K => dequantize_row_q2k(&blocks_or_copy(bytes), out),
        GgmlType::Q3K => dequantize_row_q3k(&blocks_or_copy(bytes), out),
        GgmlType::Q4K => dequantize_row_q4k(&blocks_or_copy(bytes), out),
        GgmlType::Q5K => dequantize_row_q5k(&blocks_or_copy(bytes), out),
        GgmlType::Q6K => dequantize_row_q6k(&blocks_or_copy(bytes), out),
        GgmlType::Q8K => dequantize_row_q8k(&blocks_or_copy(bytes), out),
    }
    Ok(())
}

/// `bytes` (a whole number of blocks) as blocks: borrowed when aligned for `B`, else copied into an aligned
/// buffer. Tensor data inside a mapped GGUF file is aligned, but a row handed over from elsewhere (a `Vec<u8>`,
/// an `include_bytes!`, an odd offset) need not be.
fn blocks_or_copy<B: Pod>(bytes: &[u8]) -> Cow<'_, [B]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(b) => Cow::Borrowed(b),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}
