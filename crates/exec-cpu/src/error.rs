//! The error type of `pinion-exec-cpu`.

use pinion_format::GgmlType;

/// What can go wrong setting up a CPU computation or calling a [`crate::DenseBackend`].
///
/// Kernels themselves do not fail: shapes are checked once, when a [`crate::QMatrix`] is built, and a mismatch
/// between already-validated operands passed to a kernel function such as [`crate::matmul()`] is a programming
/// error that panics. The [`crate::DenseBackend`] entry points check their operands instead and return these
/// errors.
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
    /// The activations were not quantized for the weights: another `vec_dot_type` or another width.
    #[error(
        "{weight_ty} weights of width {weight_cols} need activations of type {} and width {weight_cols}, \
         got {} of width {acts_cols}",
        type_name(*want),
        type_name(*acts_ty)
    )]
    ActsMismatch {
        /// The weight type.
        weight_ty: GgmlType,
        /// Values per weight row.
        weight_cols: usize,
        /// The activation type the weights need.
        want: Option<GgmlType>,
        /// The activation type held (`None` if never quantized).
        acts_ty: Option<GgmlType>,
        /// Values per activation row.
        acts_cols: usize,
    },
    /// The output slice does not hold one value per (activation row, weight row).
    #[error("{n_tokens} activation rows times {n_rows} weight rows need {expected} outputs, got {got}")]
    OutputLength {
        /// Activation rows.
        n_tokens: usize,
        /// Weight rows.
        n_rows: usize,
        /// Values the output needs.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A range of activation rows is not within the activations, or does not fit the padded row count.
    #[error("activation rows {start}..{end} of {n_rows} do not fit a batch of {padded_to} rows")]
    RowsOutOfRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows the activations hold.
        n_rows: usize,
        /// Rows the copy was to be padded to.
        padded_to: usize,
    },
    /// An accelerator backend failed in a way of its own (its error is the source).
    #[error("dense backend {backend} failed")]
    Backend {
        /// The backend's [`crate::DenseBackend::name`].
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// A type's name, or `none` for activations never quantized.
fn type_name(ty: Option<GgmlType>) -> &'static str {
    ty.map_or("none", GgmlType::name)
}
