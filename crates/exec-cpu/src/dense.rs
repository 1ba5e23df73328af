//! [`DenseBackend`]: the one interface the engine's dense batched work (prefill matmuls, dense clusters) goes
//! through, and [`CpuDense`], its implementation on this crate's [`matmul()`].
//!
//! An accelerator (PowerInfer-2's NPU role, `pinion-exec-npu`) is a second implementation of the same trait;
//! the runtime holds a `&dyn DenseBackend` and does not know which one it has.

use pinion_format::GgmlType;

use crate::acts::{QuantizedActs, vec_dot_type};
use crate::error::ExecError;
use crate::matmul::matmul;
use crate::matrix::{QMatrix, kernel_align};

/// The shape of a weight matrix a [`DenseBackend`] is asked to multiply: what a static-shape device compiles
/// a graph for (with a batch size of its choosing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DenseShape {
    /// Storage type of the weights.
    pub ty: GgmlType,
    /// Weight rows (outputs per activation row).
    pub n_rows: usize,
    /// Weight columns (values per activation row).
    pub n_cols: usize,
}

impl DenseShape {
    /// The shape of `w`.
    pub fn of(w: &QMatrix<'_>) -> DenseShape {
        DenseShape { ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols }
    }

    /// Checks that the CPU kernels have a dot product for `ty` and that a row is a whole number of blocks.
    ///
    /// # Errors
    /// [`ExecError::UnsupportedType`] or [`ExecError::RowNotBlockAligned`].
    pub fn validate(&self) -> Result<(), ExecError> {
        let ty = self.ty;
        if kernel_align(ty).is_none() {
            return Err(ExecError::UnsupportedType { ty });
        }
        ty.row_bytes(self.n_cols).map_err(|_| ExecError::RowNotBlockAligned {
            ty,
            n_cols: self.n_cols,
            block_len: ty.block_len(),
        })?;
        Ok(())
    }
}

/// Executes dense quantized matrix products: `out[t * w.n_rows + r] = dot(w.row(r), acts.row(t))`, exactly as
/// [`matmul()`] computes them.
///
/// `acts` holds `n` activation rows already quantized for `w.ty` (with [`QuantizedActs::quantize`]); the
/// caller quantizes once and passes the same activations for every matrix of the same `vec_dot_type` and
/// width (Q, K and V; gate and up). `out` is token-major, `n x w.n_rows`. Every implementation gives the same
/// bits as [`CpuDense`], so switching backends never changes a token.
///
/// Implementations run their host-side work on the caller's rayon pool (as [`matmul()`] does), are shared
/// between threads (`&dyn DenseBackend`) and check their operands: a mismatch is an [`ExecError`], never a
/// panic.
pub trait DenseBackend: Send + Sync {
    /// A short name for logs and errors (`"cpu"`, `"npu"`).
    fn name(&self) -> &'static str;

    /// Gets ready for products of the given weight shapes with up to `max_tokens` activation rows per call
    /// (the context's batch size): a static-shape device compiles its graphs here, once, so that no call
    /// pays for it. Called when a context is made; calling it again with shapes already prepared is cheap.
    /// Whether a later call with a shape not prepared fails or prepares it then is the implementation's
    /// choice and is documented on it.
    ///
    /// # Errors
    /// [`ExecError::UnsupportedType`] or [`ExecError::RowNotBlockAligned`] for a shape no kernel handles, or a
    /// backend's own failure ([`ExecError::Backend`]).
    fn prepare(&self, shapes: &[DenseShape], max_tokens: usize) -> Result<(), ExecError>;

    /// Multiplies `w` with every activation row of `acts` into `out` (`acts.n_rows() x w.n_rows`,
    /// token-major).
    ///
    /// # Errors
    /// As [`check_operands`] for `w` and `acts`, [`ExecError::OutputLength`] if `out` is not
    /// `acts.n_rows() * w.n_rows` long, or a backend's own failure ([`ExecError::Backend`]).
    fn matmul(&self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) -> Result<(), ExecError>;
}

/// Checks that `w` is a valid matrix of a type with a kernel (see [`QMatrix::validate`]) and that `acts` was
/// quantized for it: the checks every [`DenseBackend::matmul`] makes before computing.
///
/// # Errors
/// [`ExecError::UnsupportedType`], [`ExecError::RowNotBlockAligned`], [`ExecError::SizeMismatch`] or
/// [`ExecError::Misaligned`] for `w`, and [`ExecError::ActsMismatch`] if `acts` has another type or width.
pub fn check_operands(w: &QMatrix<'_>, acts: &QuantizedActs) -> Result<(), ExecError> {
    w.validate()?;
    let want = vec_dot_type(w.ty);
    if acts.ty() != want || acts.n_cols() != w.n_cols {
        return Err(ExecError::ActsMismatch {
            weight_ty: w.ty,
            weight_cols: w.n_cols,
            want,
            acts_ty: acts.ty(),
            acts_cols: acts.n_cols(),
        });
    }
    Ok(())
}

/// Checks that `out` holds `n_tokens * n_rows` values.
///
/// # Errors
/// [`ExecError::OutputLength`] otherwise.
pub fn check_output(n_tokens: usize, n_rows: usize, out: &[f32]) -> Result<(), ExecError> {
    let expected = n_tokens.saturating_mul(n_rows);
    if out.len() != expected {
        return Err(ExecError::OutputLength { n_tokens, n_rows, expected, got: out.len() });
    }
    Ok(())
}

/// The CPU [`DenseBackend`]: [`matmul()`] on the caller's rayon pool, parallel over weight rows.
///
/// It needs no preparation ([`DenseBackend::prepare`] only validates the shapes) and takes any valid shape
/// and any number of rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDense;

impl DenseBackend for CpuDense {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare(&self, shapes: &[DenseShape], _max_tokens: usize) -> Result<(), ExecError> {
        shapes.iter().try_for_each(DenseShape::validate)
    }

    fn matmul(&self, w: &QMatrix<'_>, acts: &QuantizedActs, out: &mut [f32]) -> Result<(), ExecError> {
        check_operands(w, acts)?;
        check_output(acts.n_rows(), w.n_rows, out)?;
        matmul(w, acts, out);
        Ok(())
    }
}
