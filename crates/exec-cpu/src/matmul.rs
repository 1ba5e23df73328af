//! Matrix products of quantized weights with quantized activations, parallel over weight rows.
//!
//! A task owns a contiguous range of weight rows and walks it in tiles of `R` rows; for each tile it loops
//! over the activation rows `C` at a time, so that an unpacked weight block is reused for `C` activations and
//! the tile's weights stay in L1 while the activations stream from L2 (prefill). With a single activation row
//! (decode) the tiles are taller (`R = 8` on AVX-512) to keep several independent FMA chains in flight.

use half::{bf16, f16};
use pinion_format::GgmlType;
use pinion_format::quant::{
    self, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0,
};
use rayon::prelude::*;

use crate::acts::{QuantizedActs, vec_dot_type};
#[cfg(target_arch = "x86_64")]
use crate::kernels::avx512::BlockMajor;
use crate::kernels::{self, KQuant, KernelPath, scalar};
use crate::matrix::QMatrix;
use crate::pool::{SpinPool, split_range};

/// Weights viewed as typed rows.
enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q4_0(&'a [BlockQ4_0]),
    Q4_1(&'a [BlockQ4_1]),
    Q5_0(&'a [BlockQ5_0]),
    Q5_1(&'a [BlockQ5_1]),
    Q8_0(&'a [BlockQ8_0]),
    Q2K(&'a [BlockQ2K]),
    Q3K(&'a [BlockQ3K]),
    Q4K(&'a [BlockQ4K]),
    Q5K(&'a [BlockQ5K]),
    Q6K(&'a [BlockQ6K]),
}

fn view<'a, B: bytemuck::Pod>(w: &QMatrix<'a>) -> &'a [B] {
    quant::blocks(w.data)
        .unwrap_or_else(|e| panic!("invalid {} matrix (build it with QMatrix::new): {e}", w.ty))
}

impl<'a> Weights<'a> {
    fn new(w: &QMatrix<'a>) -> Self {
        let expected = w.ty.row_bytes(w.n_cols).ok().and_then(|rb| rb.checked_mul(w.n_rows));
        assert_eq!(expected, Some(w.data.len()), "invalid {} matrix (build it with QMatrix::new)", w.ty);
        match w.ty {
            GgmlType::F32 => Weights::F32(view(w)),
            GgmlType::F16 => Weights::F16(view(w)),
            GgmlType::BF16 => Weights::BF16(view(w)),
            GgmlType::Q4_0 => Weights::Q4_0(view(w)),
            GgmlType::Q4_1 => Weights::Q4_1(view(w)),
            GgmlType::Q5_0 => Weights::Q5_0(view(w)),
            GgmlType::Q5_1 => Weights::Q5_1(view(w)),
            GgmlType::Q8_0 => Weights::Q8_0(view(w)),
            GgmlType::Q2K => Weights::Q2K(view(w)),
            GgmlType::Q3K => Weights::Q3K(view(w)),
            GgmlType::Q4K => Weights::Q4K(view(w)),
            GgmlType::Q5K => Weights::Q5K(view(w)),
            GgmlType::Q6K => Weights::Q6K(view(w)),
            ty => panic!("no CPU matmul kernel for weights of type {ty}"),
        }
    }
}

/// Shared output pointer for tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: an `OutPtr` is only used inside one `matmul_rows_with` call, whose tasks write pairwise disjoint
// elements (each task owns a distinct range of weight rows, i.e. of output columns) while the `&mut [f32]` it
// was made from is borrowed for the whole call.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `v` at `idx`.
    ///
    /// # Safety
    /// No other thread may access element `idx` during the call.
    #[inline]
    unsafe fn write(&self, idx: usize, v: f32) {
        assert!(idx < self.len);
        // SAFETY: `idx` is in bounds and the caller guarantees exclusive access to it.
        unsafe { self.ptr.add(idx).write(v) }
    }
}

/// Output placement of one call: element (activation `t`, weight row `r`) goes to `t * n_out + r - row_start`.
#[derive(Clone, Copy)]
struct Dest {
    out: OutPtr,
    row_start: usize,
    n_out: usize,
}

/// Walks rows `[r0, r1)` in tiles of `R` rows and all `n_t` activations `C` at a time. Partial tiles are
/// padded by repeating the last row or activation; the padding's results are dropped.
///
/// # Safety
/// No other thread may write the outputs of rows `[r0, r1)` during the call.
#[inline(always)]
unsafe fn drive<const R: usize, const C: usize>(
    r0: usize,
    r1: usize,
    n_t: usize,
    dest: &Dest,
    mut tile: impl FnMut([usize; R], [usize; C], &mut [[f32; C]; R]),
) {
    let mut res = [[0.0f32; C]; R];
    let mut r = r0;
    while r < r1 {
        let nr = R.min(r1 - r);
        let rows: [usize; R] = std::array::from_fn(|i| r + i.min(nr - 1));
        let mut t = 0;
        while t < n_t {
            let nc = C.min(n_t - t);
            let cols: [usize; C] = std::array::from_fn(|j| t + j.min(nc - 1));
            tile(rows, cols, &mut res);
            for (i, row) in res.iter().enumerate().take(nr) {
                for (j, &v) in row.iter().enumerate().take(nc) {
                    // SAFETY: row `r + i` is in `[r0, r1)`, which the caller owns exclusively.
                    unsafe { dest.out.write((t + j) * dest.n_out + r + i - dest.row_start, v) };
                }
            }
            t += C;
        }
        r += R;
    }
}

/// Row `i` of a matrix of `nb`-block rows.
#[inline(always)]
fn row<B>(m: &[B], nb: usize, i: usize) -> &[B] {
    &m[i * nb..(i + 1) * nb]
}

/// Splits `[i; 2P]` row indices into `P` pairs of row slices.
#[inline(always)]
fn pairs<'a, B, const P: usize>(m: &'a [B], nb: usize, rows: &[usize]) -> [[&'a [B]; 2]; P] {
    std::array::from_fn(|p| [row(m, nb, rows[2 * p]), row(m, nb, rows[2 * p + 1])])
}

/// The block-major activation scales of a batched tile starting at activation `c0`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn block_major(acts: &QuantizedActs, c0: usize) -> BlockMajor<'_> {
    BlockMajor { d_t: &acts.d_t, s_t: &acts.q8_1_s, t_pad: acts.t_pad(), c0 }
}

/// Computes the outputs of weight rows `[r0, r1)` for all activation rows.
///
/// # Safety
/// `path` must be supported by the CPU, and no other thread may write the outputs of rows `[r0, r1)`.
unsafe fn compute(
    path: KernelPath,
    w: &Weights,
    acts: &QuantizedActs,
    nb: usize,
    r0: usize,
    r1: usize,
    dest: &Dest,
) {
    let n_t = acts.n_rows();
    // The SAFETY argument of every kernel call below: `path` is supported (caller), each slice handed to a
    // kernel is a whole row of `nb` blocks (from `row`), and `drive`'s exclusivity is the caller's.
    match (w, path) {
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        (Weights::Q4_1(m), KernelPath::Avx512) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 8 {
                    drive::<4, 8>(r0, r1, n_t, dest, |rs, cs, res| {
                        let bm = block_major(acts, cs[0]);
                        kernels::avx512::tile_q4_1::<2, 8>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            bm,
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<8, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        let bm = BlockMajor::NONE;
                        kernels::avx512::tile_q4_1::<4, 1>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            bm,
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q5_1(m), KernelPath::Avx512) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 8 {
                    drive::<4, 8>(r0, r1, n_t, dest, |rs, cs, res| {
                        let bm = block_major(acts, cs[0]);
                        kernels::avx512::tile_q5_1::<2, 8>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            bm,
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<8, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        let bm = BlockMajor::NONE;
                        kernels::avx512::tile_q5_1::<4, 1>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            bm,
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        (Weights::Q4_0(m), KernelPath::Avx512) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 8 {
                    drive::<4, 8>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q4_0::<2, 8>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            block_major(acts, cs[0]),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<8, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q4_0::<4, 1>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            BlockMajor::NONE,
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q5_0(m), KernelPath::Avx512) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 8 {
                    drive::<4, 8>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q5_0::<2, 8>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            block_major(acts, cs[0]),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<8, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q5_0::<4, 1>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            BlockMajor::NONE,
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q8_0(m), KernelPath::Avx512) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 8 {
                    drive::<4, 8>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q8_0::<2, 8>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            block_major(acts, cs[0]),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<8, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx512::tile_q8_0::<4, 1>(
                            pairs(m, nb, &rs),
                            cs.map(|c| row(a, nb, c)),
                            BlockMajor::NONE,
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        (Weights::Q4_1(m), KernelPath::Avx2) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 2 {
                    drive::<4, 2>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q4_1(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q4_1(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q5_1(m), KernelPath::Avx2) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 2 {
                    drive::<4, 2>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q5_1(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q5_1(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        (Weights::Q4_0(m), KernelPath::Avx2) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 2 {
                    drive::<4, 2>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q4_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q4_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q5_0(m), KernelPath::Avx2) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 2 {
                    drive::<4, 2>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q5_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q5_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Q8_0(m), KernelPath::Avx2) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                if n_t >= 2 {
                    drive::<4, 2>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q8_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                } else {
                    drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                        kernels::avx2::tile_q8_0(
                            rs.map(|r| row(m, nb, r)),
                            cs.map(|c| row(a, nb, c)),
                            nb,
                            res,
                        )
                    })
                }
            }
        }
        (Weights::Q4_1(m), _) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = scalar::vec_dot_q4_1_q8_1(row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::Q4_0(m), _) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = scalar::vec_dot_q4_0_q8_0(row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::Q8_0(m), _) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = scalar::vec_dot_q8_0_q8_0(row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::Q5_1(m), _) => {
            let a = &acts.q8_1[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = scalar::vec_dot_q5_1_q8_1(row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::Q5_0(m), _) => {
            let a = &acts.q8_0[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = scalar::vec_dot_q5_0_q8_0(row(m, nb, r), row(a, nb, c));
                })
            }
        }
        // SAFETY: see above.
        (Weights::Q2K(m), _) => unsafe { compute_k(path, m, acts, nb, r0, r1, dest) },
        // SAFETY: see above.
        (Weights::Q3K(m), _) => unsafe { compute_k(path, m, acts, nb, r0, r1, dest) },
        // SAFETY: see above.
        (Weights::Q4K(m), _) => unsafe { compute_k(path, m, acts, nb, r0, r1, dest) },
        // SAFETY: see above.
        (Weights::Q5K(m), _) => unsafe { compute_k(path, m, acts, nb, r0, r1, dest) },
        // SAFETY: see above.
        (Weights::Q6K(m), _) => unsafe { compute_k(path, m, acts, nb, r0, r1, dest) },
        (Weights::BF16(m), _) => {
            let a = &acts.bf16s[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = kernels::vec_dot_bf16(path, row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::F32(m), _) => {
            let a = &acts.f32s[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = kernels::vec_dot_f32(path, row(m, nb, r), row(a, nb, c));
                })
            }
        }
        (Weights::F16(m), _) => {
            let a = &acts.f16s[..];
            // SAFETY: see above.
            unsafe {
                drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                    res[0][0] = kernels::vec_dot_f16(path, row(m, nb, r), row(a, nb, c));
                })
            }
        }
    }
}

/// [`compute`] for K-quant weights: tiles of 4 rows by 4 activations (batches) or 1 (decode); one row and one
/// activation at a time on the scalar path.
///
/// # Safety
/// As [`compute`].
unsafe fn compute_k<B: KQuant>(
    path: KernelPath,
    m: &[B],
    acts: &QuantizedActs,
    nb: usize,
    r0: usize,
    r1: usize,
    dest: &Dest,
) {
    let a = acts.q8k_for(path);
    let n_t = acts.n_rows();
    // SAFETY: the caller's guarantees (see `compute`); `tile_k` checks the row lengths.
    unsafe {
        if path == KernelPath::Scalar {
            drive::<1, 1>(r0, r1, n_t, dest, |[r], [c], res| {
                res[0][0] = B::vec_dot(row(m, nb, r), row(a, nb, c));
            })
        } else if n_t >= 4 {
            drive::<4, 4>(r0, r1, n_t, dest, |rs, cs, res| {
                kernels::tile_k(path, rs.map(|r| row(m, nb, r)), cs.map(|c| row(a, nb, c)), nb, res)
            })
        } else {
            drive::<4, 1>(r0, r1, n_t, dest, |rs, cs, res| {
                kernels::tile_k(path, rs.map(|r| row(m, nb, r)), cs.map(|c| row(a, nb, c)), nb, res)
            })
        }
    }
}

/// Multiply-accumulates below which a call runs on the calling thread alone.
const MIN_PARALLEL_WORK: usize = 1 << 16;
/// Multiply-accumulates a task should at least do, to amortize scheduling.
const MIN_TASK_WORK: usize = 1 << 15;

/// `out[t * w.n_rows + r] = dot(w.row(r), x_t)` for every activation row `t` of `acts`.
///
/// Runs on the current rayon pool, parallel over weight rows.
///
/// # Panics
/// If `acts` was not quantized for `w.ty` with `w.n_cols` columns, or `out.len() != acts.n_rows() * w.n_rows`.
pub fn matmul(w: &QMatrix, acts: &QuantizedActs, out: &mut [f32]) {
    matmul_rows(w, acts, 0, w.n_rows, out);
}

/// [`matmul`] restricted to weight rows `[row_start, row_end)`: `out` holds `row_end - row_start` values per
/// activation row.
///
/// # Panics
/// As [`matmul`], and if the range is not within `0..w.n_rows`.
pub fn matmul_rows(w: &QMatrix, acts: &QuantizedActs, row_start: usize, row_end: usize, out: &mut [f32]) {
    matmul_rows_with(kernels::chosen(), w, acts, row_start, row_end, out);
}

/// [`matmul_rows`] on a given kernel path, for tests and benchmarks.
///
/// # Panics
/// As [`matmul_rows`], and if the CPU does not support `path`.
pub fn matmul_rows_with(
    path: KernelPath,
    w: &QMatrix,
    acts: &QuantizedActs,
    row_start: usize,
    row_end: usize,
    out: &mut [f32],
) {
    let Some((weights, nb, dest)) = prepare(path, w, acts, row_start, row_end, out) else { return };
    let n_out = row_end - row_start;
    let n_t = acts.n_rows();
    let work_per_row = w.n_cols * n_t;
    let n_threads = rayon::current_num_threads();
    let run = |r0: usize, r1: usize| {
        // SAFETY: `path` was checked above; each call gets a distinct row range (below).
        unsafe { compute(path, &weights, acts, nb, r0, r1, &dest) }
    };
    if n_threads <= 1 || n_out * work_per_row < MIN_PARALLEL_WORK {
        run(row_start, row_end);
        return;
    }
    // About four tasks per thread, each a multiple of 8 rows (the tallest tile) and not too small.
    let by_count = n_out.div_ceil(4 * n_threads);
    let by_work = MIN_TASK_WORK.div_ceil(work_per_row);
    let chunk = by_count.max(by_work).div_ceil(8) * 8;
    let n_chunks = n_out.div_ceil(chunk);
    (0..n_chunks).into_par_iter().for_each(|ci| {
        let r0 = row_start + ci * chunk;
        run(r0, (r0 + chunk).min(row_end));
    });
}

/// Checks a call's shapes and builds the typed weights, block count and output placement; `None` if there
/// is nothing to compute.
fn prepare<'a>(
    path: KernelPath,
    w: &QMatrix<'a>,
    acts: &QuantizedActs,
    row_start: usize,
    row_end: usize,
    out: &mut [f32],
) -> Option<(Weights<'a>, usize, Dest)> {
    kernels::check(path);
    assert!(
        row_start <= row_end && row_end <= w.n_rows,
        "rows {row_start}..{row_end} out of 0..{}",
        w.n_rows
    );
    let want = vec_dot_type(w.ty);
    assert!(
        acts.ty() == want && acts.n_cols() == w.n_cols,
        "activations are {:?} x {} but {} weights of width {} need {want:?}",
        acts.ty(),
        acts.n_cols(),
        w.ty,
        w.n_cols
    );
    let n_out = row_end - row_start;
    let n_t = acts.n_rows();
    assert_eq!(out.len(), n_out * n_t, "output length");
    if n_out == 0 || n_t == 0 {
        return None;
    }
    let weights = Weights::new(w);
    let nb = w.n_cols / w.ty.block_len();
    let dest = Dest { out: OutPtr { ptr: out.as_mut_ptr(), len: out.len() }, row_start, n_out };
    Some((weights, nb, dest))
}

/// [`matmul`] on a [`SpinPool`]: the weight rows are split into one contiguous part per thread (on multiples
/// of 8 rows, the tallest tile). Meant for decode, where a matrix-vector product is too short for a
/// work-stealing pool's wake-ups.
///
/// # Panics
/// As [`matmul`].
pub fn matmul_on(pool: &SpinPool, w: &QMatrix, acts: &QuantizedActs, out: &mut [f32]) {
    let path = kernels::chosen();
    let Some((weights, nb, dest)) = prepare(path, w, acts, 0, w.n_rows, out) else { return };
    let work = w.n_rows * w.n_cols * acts.n_rows();
    if pool.n_threads() == 1 || work < MIN_PARALLEL_WORK {
        // SAFETY: `path` was checked by `prepare`; one call covers all rows.
        unsafe { compute(path, &weights, acts, nb, 0, w.n_rows, &dest) };
        return;
    }
    pool.run(&|idx, n| {
        let r = split_range(w.n_rows, idx, n, 8);
        if !r.is_empty() {
            // SAFETY: `path` was checked by `prepare`; `split_range` gives each thread a distinct row range,
            // so the output elements written are disjoint, and `out` is borrowed until `run` returns.
            unsafe { compute(path, &weights, acts, nb, r.start, r.end, &dest) };
        }
    });
}
