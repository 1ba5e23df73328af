//! Small f32 matrix kernels for predictor training: `C = A · B` over row-major slices, and a transpose.
//!
//! `B` is packed into panels of [`NR`] columns, and a register tile of [`MR`] x [`NR`] accumulators sweeps each
//! panel: every step broadcasts one value of each of the `MR` rows of `A` against `NR` contiguous values of the
//! panel, a pattern LLVM vectorizes at the baseline ISA. Every element of `C` is the plain sequential sum over
//! the shared dimension, whichever path computes it, and rows of `C` are split over rayon tasks, so results do
//! not depend on shapes of the tiling or on the number of threads.

use rayon::prelude::*;

/// Rows of `A` per register tile.
const MR: usize = 4;
/// Columns of `B` per panel (two SSE registers per row of the tile).
const NR: usize = 8;

/// `c[i * n + j] = sum_l a[i * k + l] * b[l * n + j]` for `a: m x k`, `b: k x n`, `c: m x n`.
pub(crate) fn gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    gemm_any(a, b, false, c, m, n, k);
}

/// `c[i * n + j] = sum_l a[i * k + l] * bt[j * k + l]` for `a: m x k`, `bt: n x k` (`B` given transposed),
/// `c: m x n`; the same arithmetic as [`gemm`] on the transpose of `bt`, without forming it.
pub(crate) fn gemm_bt(a: &[f32], bt: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    gemm_any(a, bt, true, c, m, n, k);
}

fn gemm_any(a: &[f32], b: &[f32], b_transposed: bool, c: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(a.len(), m * k, "gemm: a");
    assert_eq!(b.len(), k * n, "gemm: b");
    assert_eq!(c.len(), m * n, "gemm: c");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let n_panels = n.div_ceil(NR);
    let len = n_panels * k * NR;
    // The packing buffer is reused across calls on this thread (training calls this a few times per step). A
    // rayon worker waiting inside one product may steal a task that starts another; that one gets its own.
    PACKED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut packed) => {
            packed.resize(len, 0.0);
            gemm_packed(a, b, b_transposed, c, &mut packed, m, n, k);
        }
        Err(_) => gemm_packed(a, b, b_transposed, c, &mut vec![0.0; len], m, n, k),
    });
}

thread_local! {
    static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn gemm_packed(
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
    c: &mut [f32],
    packed: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let pack = |(p, panel): (usize, &mut [f32])| {
        let (j0, w) = (p * NR, NR.min(n - p * NR));
        if b_transposed {
            // Panel column t is row j0 + t of bt.
            if w < NR {
                panel.fill(0.0);
            }
            for t in 0..w {
                let src = &b[(j0 + t) * k..(j0 + t + 1) * k];
                for (dst, &v) in panel.chunks_exact_mut(NR).zip(src) {
                    dst[t] = v;
                }
            }
        } else {
            for (l, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..w].copy_from_slice(&b[l * n + j0..l * n + j0 + w]);
                dst[w..].fill(0.0);
            }
        }
    };
    let threads = rayon::current_num_threads().max(1);
    if threads > 1 && k * n >= 1 << 15 {
        packed.par_chunks_mut(k * NR).enumerate().for_each(pack);
    } else {
        packed.chunks_mut(k * NR).enumerate().for_each(pack);
    }
    let packed = &*packed;
    // Enough tasks for load balance, each a multiple of MR rows and at least ~64k multiply-adds.
    let min_rows = (65_536 / (n * k)).max(1);
    let rows = m.div_ceil(threads * 4).max(min_rows).div_ceil(MR) * MR;
    if rows >= m {
        gemm_serial(a, packed, c, n, k);
        return;
    }
    c.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(c_blk, a_blk)| gemm_serial(a_blk, packed, c_blk, n, k));
}

fn gemm_serial(a: &[f32], packed: &[f32], c: &mut [f32], n: usize, k: usize) {
    let m = a.len() / k;
    for (p, panel) in packed.chunks_exact(k * NR).enumerate() {
        let (j0, w) = (p * NR, NR.min(n - p * NR));
        let mut i = 0;
        while i + MR <= m {
            let t = tile_4(&a[i * k..(i + MR) * k], panel, k);
            for (r, row) in t.iter().enumerate() {
                c[(i + r) * n + j0..(i + r) * n + j0 + w].copy_from_slice(&row[..w]);
            }
            i += MR;
        }
        while i < m {
            let t = tile_1(&a[i * k..(i + 1) * k], panel);
            c[i * n + j0..i * n + j0 + w].copy_from_slice(&t[..w]);
            i += 1;
        }
    }
}

#[inline(always)]
fn lanes(c: &[f32]) -> &[f32; NR] {
    c.try_into().expect("panel rows of NR")
}

/// Four rows of `A` (`4 x k`) times one panel (`k x NR`).
#[inline(always)]
fn tile_4(a: &[f32], panel: &[f32], k: usize) -> [[f32; NR]; MR] {
    let (a0, rest) = a.split_at(k);
    let (a1, rest) = rest.split_at(k);
    let (a2, a3) = rest.split_at(k);
    let (mut c0, mut c1, mut c2, mut c3) = ([0.0f32; NR], [0.0f32; NR], [0.0f32; NR], [0.0f32; NR]);
    for ((((bl, &x0), &x1), &x2), &x3) in panel.chunks_exact(NR).zip(a0).zip(a1).zip(a2).zip(a3) {
        let bl = lanes(bl);
        for t in 0..NR {
            c0[t] += x0 * bl[t];
            c1[t] += x1 * bl[t];
            c2[t] += x2 * bl[t];
            c3[t] += x3 * bl[t];
        }
    }
    [c0, c1, c2, c3]
}

/// One row of `A` times one panel, in the same order as [`tile_4`].
#[inline(always)]
fn tile_1(a: &[f32], panel: &[f32]) -> [f32; NR] {
    let mut c0 = [0.0f32; NR];
    for (bl, &x0) in panel.chunks_exact(NR).zip(a) {
        let bl = lanes(bl);
        for t in 0..NR {
            c0[t] += x0 * bl[t];
        }
    }
    c0
}

/// Writes the transpose of `a` (`rows x cols`) into `out` (`cols x rows`), in parallel over blocks of output
/// rows when the matrix is large.
pub(crate) fn transpose(a: &[f32], out: &mut [f32], rows: usize, cols: usize) {
    assert_eq!(a.len(), rows * cols, "transpose: a");
    assert_eq!(out.len(), rows * cols, "transpose: out");
    const T: usize = 32;
    if rows == 0 || cols == 0 {
        return;
    }
    // One block holds output rows j0..j0 + T, that is input columns j0..j0 + T.
    let block = |(bi, blk): (usize, &mut [f32])| {
        let j0 = bi * T;
        let j1 = j0 + blk.len() / rows;
        for i0 in (0..rows).step_by(T) {
            let i1 = (i0 + T).min(rows);
            for i in i0..i1 {
                let src = &a[i * cols + j0..i * cols + j1];
                for (jj, &v) in src.iter().enumerate() {
                    blk[jj * rows + i] = v;
                }
            }
        }
    };
    if rows * cols >= 1 << 15 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(T * rows).enumerate().for_each(block);
    } else {
        out.chunks_mut(T * rows).enumerate().for_each(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] =
                    (0..k).map(|l| f64::from(a[i * k + l]) * f64::from(b[l * n + j])).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_on_ragged_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (5, 3, 7), (9, 17, 13), (64, 130, 33), (300, 7, 9), (4, 2, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let mut c = vec![f32::NAN; m * n];
            gemm(&a, &b, &mut c, m, n, k);
            let want = naive(&a, &b, m, n, k);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_path_or_the_row_count() {
        let (n, k) = (9, 23);
        let a: Vec<f32> = (0..13 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 3.0).collect();
        let mut full = vec![0.0; 13 * n];
        gemm(&a, &b, &mut full, 13, n, k);
        for i in 0..13 {
            let mut one = vec![0.0; n];
            gemm(&a[i * k..(i + 1) * k], &b, &mut one, 1, n, k);
            assert_eq!(one, full[i * n..(i + 1) * n], "row {i}");
            // The plain sequential sum, exactly.
            let mut want = vec![0.0f32; n];
            for (j, w) in want.iter_mut().enumerate() {
                for l in 0..k {
                    *w += a[i * k + l] * b[l * n + j];
                }
            }
            assert_eq!(one, want, "row {i}");
        }
    }

    #[test]
    fn gemm_bt_is_gemm_on_the_transpose() {
        for &(m, n, k) in &[(5, 3, 7), (9, 17, 13), (64, 130, 33)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let mut b = vec![0.0; n * k];
            transpose(&bt, &mut b, n, k);
            let (mut c1, mut c2) = (vec![0.0; m * n], vec![f32::NAN; m * n]);
            gemm(&a, &b, &mut c1, m, n, k);
            gemm_bt(&a, &bt, &mut c2, m, n, k);
            assert_eq!(c1, c2, "{m}x{n}x{k}");
        }
    }

    #[test]
    fn transpose_round_trips() {
        let a: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let mut t = vec![0.0; a.len()];
        transpose(&a, &mut t, 35, 70);
        assert_eq!(t[3 * 35 + 2], a[2 * 70 + 3]);
        let mut back = vec![0.0; a.len()];
        transpose(&t, &mut back, 70, 35);
        assert_eq!(back, a);
    }
}
