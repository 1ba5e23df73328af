//! [`QMatrix`]: a borrowed, validated view of a weight matrix in one of GGML's storage types.

use pinion_format::GgmlType;
use pinion_format::quant::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
};

use crate::error::ExecError;

/// A row-major weight matrix stored in a GGML type, borrowed from the model file (usually an mmap).
///
/// Row `r` holds the `n_cols` weights that are dotted with an activation row to produce output `r`, as in a
/// GGML tensor of shape `[n_cols, n_rows]` (`ne0 = n_cols`).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// Storage type of the weights.
    pub ty: GgmlType,
    /// Number of rows (outputs).
    pub n_rows: usize,
    /// Number of columns (inputs), a multiple of the type's block length.
    pub n_cols: usize,
    /// `n_rows * ty.row_bytes(n_cols)` bytes.
    pub data: &'a [u8],
}

/// Alignment the typed views of `ty` need, or `None` for types without a kernel.
pub(crate) fn kernel_align(ty: GgmlType) -> Option<usize> {
    Some(match ty {
        GgmlType::F32 => align_of::<f32>(),
        GgmlType::F16 => align_of::<half::f16>(),
        GgmlType::BF16 => align_of::<half::bf16>(),
        GgmlType::Q4_0 => align_of::<BlockQ4_0>(),
        GgmlType::Q4_1 => align_of::<BlockQ4_1>(),
        GgmlType::Q5_0 => align_of::<BlockQ5_0>(),
        GgmlType::Q5_1 => align_of::<BlockQ5_1>(),
        GgmlType::Q8_0 => align_of::<BlockQ8_0>(),
        GgmlType::Q2K => align_of::<BlockQ2K>(),
        GgmlType::Q3K => align_of::<BlockQ3K>(),
        GgmlType::Q4K => align_of::<BlockQ4K>(),
        GgmlType::Q5K => align_of::<BlockQ5K>(),
        GgmlType::Q6K => align_of::<BlockQ6K>(),
        _ => return None,
    })
}

impl<'a> QMatrix<'a> {
    /// Checks that `data` holds exactly `n_rows` rows of `n_cols` values of `ty`, suitably aligned, and that
    /// the CPU kernels support `ty` (every weight type of [`GgmlType`]: all but the activation formats Q8_1 and
    /// Q8_K).
    pub fn new(ty: GgmlType, n_rows: usize, n_cols: usize, data: &'a [u8]) -> Result<Self, ExecError> {
        let align = kernel_align(ty).ok_or(ExecError::UnsupportedType { ty })?;
        let row_bytes = ty.row_bytes(n_cols).map_err(|_| ExecError::RowNotBlockAligned {
            ty,
            n_cols,
            block_len: ty.block_len(),
        })?;
        let expected = row_bytes.saturating_mul(n_rows);
        if data.len() != expected {
            return Err(ExecError::SizeMismatch { ty, n_rows, n_cols, expected, got: data.len() });
        }
        let addr = data.as_ptr() as usize;
        if !addr.is_multiple_of(align) {
            return Err(ExecError::Misaligned { ty, addr, align });
        }
        Ok(QMatrix { ty, n_rows, n_cols, data })
    }

    /// Checks a matrix built field by field (the fields are public) as [`QMatrix::new`] checks its arguments.
    pub fn validate(&self) -> Result<(), ExecError> {
        QMatrix::new(self.ty, self.n_rows, self.n_cols, self.data).map(|_| ())
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.n_cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// The raw bytes of row `i`.
    ///
    /// # Panics
    /// If `i >= n_rows`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        assert!(i < self.n_rows, "row {i} out of range for a matrix of {} rows", self.n_rows);
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }
}
