//! The error type of `pinion-format`.

use crate::quant::GgmlType;

/// What can go wrong reading or writing a model file.
///
/// Every variant about file content carries the byte offset where the problem was found, so that a corrupt or
/// truncated file can be diagnosed from the message alone. Variants about misuse of [`crate::GgufWriter`] name
/// the key or tensor involved instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    // === Reading: file content ===
    /// The file ends before a field that should be at `offset`.
    #[error("file is truncated: need {need} bytes at offset {offset}, but the file has {file_len}")]
    Truncated {
        /// Where the field starts.
        offset: u64,
        /// How many bytes the field needs.
        need: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The first four bytes are neither `GGUF` nor `PWRI`.
    #[error("not a GGUF file: magic is {found:02x?} at offset 0 (expected \"GGUF\" or \"PWRI\")")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The version field (offset 4) is not 2 or 3.
    #[error("unsupported GGUF version {version} at offset 4 (pinion reads versions 2 and 3)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A count, length or nesting depth read from the file exceeds its named cap.
    #[error("corrupt file: {what} is {count} at offset {offset}, more than the limit of {cap}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The count found.
        count: u64,
        /// The cap (one of the `MAX_*` constants).
        cap: u64,
        /// Where the count was read.
        offset: u64,
    },
    /// A string is not valid UTF-8.
    #[error("corrupt file: string at offset {offset} is not valid UTF-8")]
    BadUtf8 {
        /// Where the string's bytes start.
        offset: u64,
    },
    /// A metadata value (or array element) type id is not one GGUF defines.
    #[error("corrupt file: unknown metadata value type {id} at offset {offset}")]
    UnknownValueType {
        /// The type id found.
        id: u32,
        /// Where the type id was read.
        offset: u64,
    },
    /// A tensor's type id is unknown or not supported by pinion. The message names the type (an IQ type,
    /// for example) and lists the supported ones (see [`crate::quant::unsupported_type_message`]).
    #[error("tensor '{name}' (type id at offset {offset}): {}", crate::quant::unsupported_type_message(*id))]
    UnknownTensorType {
        /// The tensor's name.
        name: String,
        /// The type id found.
        id: u32,
        /// Where the type id was read.
        offset: u64,
    },
    /// A tensor's data would extend past the end of the file.
    #[error("corrupt file: tensor '{name}' spans bytes {start}..{end}, beyond the file's {file_len} bytes")]
    TensorOutOfBounds {
        /// The tensor's name.
        name: String,
        /// Absolute offset of the data's first byte (saturated on overflow).
        start: u64,
        /// Absolute offset one past the data's last byte (saturated on overflow).
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A tensor's dimensions or data offset are invalid.
    #[error("corrupt file: tensor '{name}' (at offset {offset}) has a bad shape: {why}")]
    BadTensorShape {
        /// The tensor's name.
        name: String,
        /// Where the tensor's directory entry starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// Two tensors have the same name.
    #[error("corrupt file: tensor '{name}' appears twice (second at offset {offset})")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
        /// Where the second entry starts.
        offset: u64,
    },
    /// Two metadata entries have the same key.
    #[error("corrupt file: metadata key '{key}' appears twice (second at offset {offset})")]
    DuplicateKey {
        /// The repeated key.
        key: String,
        /// Where the second entry starts.
        offset: u64,
    },
    /// A metadata key is the empty string.
    #[error("corrupt file: metadata key at offset {offset} is empty")]
    EmptyKey {
        /// Where the key starts.
        offset: u64,
    },
    /// `general.alignment` is zero, not a power of two, or above [`crate::MAX_ALIGNMENT`].
    #[error("alignment {alignment} is not a power of two between 1 and 2^20 (key general.alignment)")]
    BadAlignment {
        /// The alignment found.
        alignment: u64,
    },

    // === Reading: packed files ===
    /// The first eight bytes are not `PINIONPK`.
    #[error("not a pinion packed file: magic is {found:02x?} at offset 0 (expected \"PINIONPK\")")]
    BadPackedMagic {
        /// The eight bytes found.
        found: [u8; 8],
    },
    /// The packed format version (offset 8) is not one this build reads.
    #[error(
        "unsupported packed format version {version} at offset 8 (pinion reads versions {oldest} to {newest})",
        oldest = crate::packed::OLDEST_SUPPORTED_PACKED_VERSION,
        newest = crate::packed::PACKED_VERSION
    )]
    UnsupportedPackedVersion {
        /// The version found.
        version: u32,
    },
    /// A field of a packed file's header or index is inconsistent with the rest of the file.
    #[error("corrupt packed file: {why} (at offset {offset})")]
    CorruptPacked {
        /// Where the field was read (absolute file offset).
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// Bytes do not match the CRC-32 the file records for them.
    #[error(
        "checksum mismatch in {what} at offset {offset}: recorded {expected:#010x}, computed {found:#010x}"
    )]
    Checksum {
        /// What was checked (e.g. `layer 3 cluster 0 gate block`, `output.weight row 31337`).
        what: String,
        /// Absolute file offset of the checked bytes.
        offset: u64,
        /// The CRC-32 recorded in the file.
        expected: u32,
        /// The CRC-32 of the bytes given.
        found: u32,
    },

    /// The caller asked to check bytes the file records no checksum for (a resident tensor of a packed file of
    /// version 1, or a tensor whose rows are not checksummed).
    #[error(
        "no checksum is recorded for {what} (packed files of version 1 record none for resident tensors)"
    )]
    NoChecksum {
        /// What the caller asked to check (e.g. `tensor output.weight`).
        what: String,
    },

    // === Reading: lookups by the caller ===
    /// A metadata key the caller asked for is absent.
    #[error("metadata key '{key}' is missing")]
    MissingKey {
        /// The key asked for.
        key: String,
    },
    /// A metadata value has a different type from the one asked for.
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongValueType {
        /// The key.
        key: String,
        /// The type asked for.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },
    /// A tensor the caller asked for is absent.
    #[error("tensor '{name}' is missing")]
    MissingTensor {
        /// The name asked for.
        name: String,
    },
    /// A tensor has a type or shape the caller cannot use.
    #[error("tensor '{name}' has type {ty} and shape {dims:?}, expected {expected}")]
    UnexpectedTensor {
        /// The tensor's name.
        name: String,
        /// Its type.
        ty: GgmlType,
        /// Its dimensions, `ne[0]` first.
        dims: Vec<u64>,
        /// What the caller expected.
        expected: String,
    },

    // === Quantized data ===
    /// A row length is not a whole number of blocks.
    #[error("a row of {len} values is not a whole number of {ty} blocks of {block_len}")]
    RowNotBlockAligned {
        /// The type.
        ty: GgmlType,
        /// The row length in values.
        len: usize,
        /// Values per block of `ty`.
        block_len: usize,
    },
    /// Bytes cannot be viewed as blocks (wrong length or alignment).
    #[error("cannot view {len} bytes as blocks of {block} bytes: {why}")]
    BadBlockView {
        /// The number of bytes.
        len: usize,
        /// Bytes per block.
        block: usize,
        /// What is wrong.
        why: String,
    },

    // === Packing ===
    /// The model cannot be packed (e.g. a mixture-of-experts FFN, or a shape the down type cannot hold).
    #[error("cannot pack: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },
    /// [`crate::packed::PackOptions`] are invalid for the model (zero cluster size, an order that is not a
    /// permutation, a frequency list of the wrong length, ...).
    #[error("invalid pack options: {why}")]
    InvalidPackOptions {
        /// What is wrong.
        why: String,
    },

    // === Writing ===
    /// Writing to the output failed.
    #[error("cannot write: {0}")]
    Write(#[from] std::io::Error),
    /// [`crate::GgufWriter`]: a metadata key was added twice.
    #[error("cannot write: metadata key '{key}' was already added")]
    KeyExists {
        /// The key.
        key: String,
    },
    /// [`crate::GgufWriter`]: a metadata key is the empty string (llama.cpp rejects such files).
    #[error("cannot write: metadata keys must not be empty")]
    KeyEmpty,
    /// [`crate::GgufWriter`]: a tensor was declared twice.
    #[error("cannot write: tensor '{name}' was already declared")]
    TensorExists {
        /// The tensor's name.
        name: String,
    },
    /// [`crate::GgufWriter`]: a count or length exceeds the cap the reader enforces, so the file could not be
    /// read back.
    #[error("cannot write: {what} is {count}, more than the limit of {cap}")]
    LimitExceeded {
        /// What was counted.
        what: &'static str,
        /// The count.
        count: u64,
        /// The cap (one of the `MAX_*` constants).
        cap: u64,
    },
    /// [`crate::GgufWriter`]: a metadata array mixes element types, which GGUF cannot store.
    #[error("cannot write metadata '{key}': array element {index} is {found}, but element 0 is {expected}")]
    MixedArray {
        /// The metadata key.
        key: String,
        /// Index of the first element of a different type (in the innermost array holding it).
        index: usize,
        /// Type of element 0.
        expected: &'static str,
        /// Type of element `index`.
        found: &'static str,
    },
    /// [`crate::GgufWriter`]: a tensor's dimensions cannot be stored or read back.
    #[error("cannot write tensor '{name}' with type {ty} and shape {dims:?}: {why}")]
    InvalidTensorShape {
        /// The tensor's name.
        name: String,
        /// Its type.
        ty: GgmlType,
        /// Its dimensions, `ne[0]` first.
        dims: Vec<u64>,
        /// What is wrong.
        why: &'static str,
    },
    /// [`crate::GgufStream`]: tensor data was supplied out of declaration order, twice, or for a tensor whose
    /// data was given in memory.
    #[error("cannot write data of tensor '{name}' now: {}", next_tensor_desc(.expected))]
    TensorOutOfOrder {
        /// The tensor whose data was supplied.
        name: String,
        /// The tensor whose data must come next, if any.
        expected: Option<String>,
    },
    /// Tensor data does not have the size the tensor's type and shape require.
    #[error("tensor '{name}' needs {expected} bytes of data, got {got}")]
    TensorSizeMismatch {
        /// The tensor's name.
        name: String,
        /// Bytes required.
        expected: u64,
        /// Bytes supplied (for a callback that wrote too much: bytes written plus the rejected write).
        got: u64,
    },
    /// [`crate::GgufWriter`]: the file was finished before all tensor data was supplied.
    #[error("cannot finish the file: no data was given for tensor '{name}'")]
    TensorDataMissing {
        /// The first tensor without data.
        name: String,
    },
    /// [`crate::GgufStream`]: an earlier error left the output incomplete; the file must be written again.
    #[error("cannot write: an earlier error left the output incomplete")]
    WriterFailed,
}

fn next_tensor_desc(expected: &Option<String>) -> String {
    match expected {
        Some(name) => format!("the next tensor to write is '{name}'"),
        None => "all tensor data has been written".to_string(),
    }
}
