//! The error type of `pinion-exec-cpu`.

use pinion_format::GgmlType;

/// What can go wrong setting up a CPU computation.
///
/// Kernels themselves do not fail: shapes are checked once, when a [`crate::QMatrix`] is built, and a mismatch
/// between already-validated operands passed to a kernel is a programming error that panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The weight type has no CPU kernel (for example `q8_1` or `q8_K`, which are activation-only formats).
    #[error("no CPU matmul kernel for weights of type {ty}")]
    UnsupportedType {
        /// The type asked for.
        ty: GgmlType,
    },
    /// A row length is not a whole number of blocks of the type.
    #[error("a row of {n_cols} values is not a whole number of {ty} blocks of {block_len}")]
    RowNotBlockAligned {
        /// The weight type.
        ty: GgmlType,
        /// Values per row.
        n_cols: usize,
        /// Values per block of `ty`.
        block_len: usize,
    },
    /// The data slice does not hold exactly `n_rows` rows of `n_cols` values.
    #[error("a {n_rows}x{n_cols} {ty} matrix takes {expected} bytes, but {got} were given")]
    SizeMismatch {
        /// The weight type.
        ty: GgmlType,
        /// Rows.
        n_rows: usize,
        /// Values per row.
        n_cols: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The data does not start at an address aligned for the type's blocks.
    #[error("{ty} data at address {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// The weight type.
        ty: GgmlType,
        /// Address of the first byte.
        addr: usize,
        /// Required alignment.
        align: usize,
    },
}
