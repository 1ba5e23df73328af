//! Model file formats for pinion: GGUF reading and writing, GGML's quantized block types, and pinion's packed
//! neuron-cluster format ([`packed`]).
//!
//! This crate parses from byte slices and writes to `impl Write`; it does no file I/O of its own, starts no
//! threads and holds no unsafe code. Callers map the file (see `pinion-io`) and hand the bytes to [`Gguf::parse`],
//! the main entry point, which borrows tensor data in place rather than copying it. Every length, count and
//! offset read from a file is checked against a named cap or the file size before use, so a corrupt file is a
//! [`FormatError`] that names the offset, never a panic. [`GgufWriter`] writes GGUF files laid out as llama.cpp
//! writes them, streaming tensor data so that a file larger than memory can be written.
//!
//! ```
//! use pinion_format::{GgmlType, Gguf, GgufWriter, quant};
//!
//! let row: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) / 64.0).collect();
//! let mut blocks = vec![quant::BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; 2];
//! quant::quantize_row_q8_0(&row, &mut blocks);
//!
//! let mut w = GgufWriter::new();
//! w.add_metadata("general.architecture", "llama")?;
//! w.add_metadata("llama.block_count", 30u32)?;
//! w.add_tensor_data("w", GgmlType::Q8_0, &[64], bytemuck::cast_slice::<_, u8>(&blocks))?;
//! let bytes = w.to_bytes()?;
//!
//! let g = Gguf::parse(&bytes)?;
//! assert_eq!(g.get_u64("llama.block_count")?, 30);
//! let t = g.tensor("w")?;
//! let mut out = vec![0.0; 64];
//! quant::dequantize_row(t.ty, t.row(0), &mut out)?;
//! assert!(out.iter().zip(&row).all(|(a, b)| (a - b).abs() < 0.01));
//! # Ok::<(), pinion_format::FormatError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod error;
pub mod fuzz;
mod gguf;
pub mod packed;
pub mod quant;
pub mod synth;
mod writer;

pub use crate::error::FormatError;
pub use crate::gguf::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN,
    MAX_DIMS, MAX_KV, MAX_STRING_LEN, MAX_TENSORS, POWERINFER_MAGIC, TensorInfo, TensorView, Value,
};
pub use crate::quant::GgmlType;
pub use crate::writer::{GGUF_WRITE_VERSION, GgufStream, GgufWriter};
