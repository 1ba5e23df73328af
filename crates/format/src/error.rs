//! The error type of `pinion-format`.

use crate::quant::GgmlType;

/// What can go wrong reading or writing a model file.
///
/// Every variant about file content carries the byte offset where the problem was found, so that a corrupt or
/// truncated file can be diagnosed from the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("file is truncated: need {need} bytes at offset {offset}, but the file has {file_len}")]
    Truncated { offset: u64, need: u64, file_len: u64 },
    #[error("not a GGUF file: magic is {found:02x?} at offset 0 (expected \"GGUF\" or \"PWRI\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} (pinion reads versions 2 and 3)")]
    UnsupportedVersion { version: u32 },
    #[error("corrupt file: {what} is {count} at offset {offset}, more than the limit of {cap}")]
    TooMany { what: &'static str, count: u64, cap: u64, offset: u64 },
    #[error("corrupt file: string at offset {offset} is not valid UTF-8")]
    BadUtf8 { offset: u64 },
    #[error("corrupt file: unknown metadata value type {id} at offset {offset}")]
    UnknownValueType { id: u32, offset: u64 },
    #[error("tensor '{name}' has unknown or unsupported type id {id} (at offset {offset})")]
    UnknownTensorType { name: String, id: u32, offset: u64 },
    #[error("corrupt file: tensor '{name}' spans bytes {start}..{end}, beyond the file's {file_len} bytes")]
    TensorOutOfBounds { name: String, start: u64, end: u64, file_len: u64 },
    #[error("corrupt file: tensor '{name}' (at offset {offset}) has a bad shape: {why}")]
    BadTensorShape { name: String, offset: u64, why: String },
    #[error("corrupt file: tensor '{name}' appears twice (second at offset {offset})")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("corrupt file: alignment {alignment} is not a power of two")]
    BadAlignment { alignment: u64 },
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongValueType { key: String, expected: &'static str, found: &'static str },
    #[error("tensor '{name}' is missing")]
    MissingTensor { name: String },
    #[error("tensor '{name}' has type {ty} and shape {dims:?}, expected {expected}")]
    UnexpectedTensor { name: String, ty: GgmlType, dims: Vec<u64>, expected: String },
    #[error("a row of {len} values is not a whole number of {ty} blocks of {block_len}")]
    RowNotBlockAligned { ty: GgmlType, len: usize, block_len: usize },
    #[error("cannot view {len} bytes as blocks of {block} bytes: {why}")]
    BadBlockView { len: usize, block: usize, why: String },
    #[error("cannot write: {0}")]
    Write(#[from] std::io::Error),
}
