//! Model file formats for pinion: GGUF reading and writing, GGML's quantized block types, and (later) pinion's
//! packed neuron-cluster format.
//!
//! This crate parses from byte slices and writes to `impl Write`; it does no file I/O of its own, starts no
//! threads and holds no unsafe code. Callers map the file (see `pinion-io`) and hand the bytes to [`Gguf::parse`],
//! the main entry point, which borrows tensor data in place rather than copying it. Every length, count and
//! offset read from a file is checked against a named cap or the file size before use, so a corrupt file is a
//! [`FormatError`] that names the offset, never a panic.
#![forbid(unsafe_code)]

mod error;
mod gguf;
pub mod quant;

pub use crate::error::FormatError;
pub use crate::gguf::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_KV, MAX_STRING_LEN,
    MAX_TENSORS, POWERINFER_MAGIC, TensorInfo, TensorView, Value,
};
pub use crate::quant::GgmlType;
