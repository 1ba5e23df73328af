//! Small f32 matrix kernels for predictor training: `C = A · Bᵀ` over row-major slices, and a transpose.
//!
//! Every product is written in the "dot" form (both operands row-major with the shared dimension contiguous),
//! so the inner loop runs over contiguous slices that LLVM vectorizes at the baseline ISA. Rows of `C` are split
//! over rayon tasks in fixed chunks, and each element is always summed in the same order, so results do not
//! depend on the number of threads.

use rayon::prelude::*;

/// Rows of `A` handled together by the micro-kernel.
const MR: usize = 4;
/// Bytes of `B` kept hot while a block of `A` rows sweeps over it.
const B_TILE_BYTES: usize = 96 * 1024;

/// `c[i * n + j] = sum_l a[i * k + l] * b[j * k + l]` for `a: m x k`, `b: n x k`, `c: m x n`.
pub(crate) fn gemm_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(a.len(), m * k, "gemm_nt: a");
    assert_eq!(b.len(), n * k, "gemm_nt: b");
    assert_eq!(c.len(), m * n, "gemm_nt: c");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // Enough tasks for load balance, each a multiple of MR rows; at least ~64k multiply-adds per task.
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (65_536 / (n * k).max(1)).max(1);
    let rows = m.div_ceil(threads * 4).max(min_rows).div_ceil(MR) * MR;
    if rows >= m {
        gemm_nt_serial(a, b, c, n, k);
        return;
    }
    c.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(c_blk, a_blk)| gemm_nt_serial(a_blk, b, c_blk, n, k));
}

fn gemm_nt_serial(a: &[f32], b: &[f32], c: &mut [f32], n: usize, k: usize) {
    let m = a.len() / k;
    let tile = (B_TILE_BYTES / (4 * k)).max(2);
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + tile).min(n);
        let mut i = 0;
        while i + MR <= m {
            let ar = [
                &a[i * k..(i + 1) * k],
                &a[(i + 1) * k..(i + 2) * k],
                &a[(i + 2) * k..(i + 3) * k],
                &a[(i + 3) * k..(i + 4) * k],
            ];
            let mut j = j0;
            while j + 2 <= j1 {
                let r = kernel_4x2(ar, &b[j * k..(j + 1) * k], &b[(j + 1) * k..(j + 2) * k]);
                for (t, rt) in r.iter().enumerate() {
                    c[(i + t) * n + j] = rt[0];
                    c[(i + t) * n + j + 1] = rt[1];
                }
                j += 2;
            }
            if j < j1 {
                let bj = &b[j * k..(j + 1) * k];
                for (t, at) in ar.iter().enumerate() {
                    c[(i + t) * n + j] = dot(at, bj);
                }
            }
            i += MR;
        }
        while i < m {
            let ai = &a[i * k..(i + 1) * k];
            for j in j0..j1 {
                c[i * n + j] = dot(ai, &b[j * k..(j + 1) * k]);
            }
            i += 1;
        }
        j0 = j1;
    }
}

/// Four rows of `A` against two rows of `B`: eight dot products sharing their loads.
#[inline(always)]
fn kernel_4x2(a: [&[f32]; 4], b0: &[f32], b1: &[f32]) -> [[f32; 2]; 4] {
    const L: usize = 4;
    let k = b0.len();
    let kl = k / L * L;
    let mut acc = [[[0.0f32; L]; 2]; 4];
    let (a0, a1, a2, a3) = (&a[0][..kl], &a[1][..kl], &a[2][..kl], &a[3][..kl]);
    let (p0, p1) = (&b0[..kl], &b1[..kl]);
    for (((((x0, x1), x2), x3), y0), y1) in a0
        .chunks_exact(L)
        .zip(a1.chunks_exact(L))
        .zip(a2.chunks_exact(L))
        .zip(a3.chunks_exact(L))
        .zip(p0.chunks_exact(L))
        .zip(p1.chunks_exact(L))
    {
        for t in 0..L {
            acc[0][0][t] += x0[t] * y0[t];
            acc[0][1][t] += x0[t] * y1[t];
            acc[1][0][t] += x1[t] * y0[t];
            acc[1][1][t] += x1[t] * y1[t];
            acc[2][0][t] += x2[t] * y0[t];
            acc[2][1][t] += x2[t] * y1[t];
            acc[3][0][t] += x3[t] * y0[t];
            acc[3][1][t] += x3[t] * y1[t];
        }
    }
    let mut out = [[0.0f32; 2]; 4];
    for (r, (o, ar)) in out.iter_mut().zip(acc.iter()).enumerate() {
        for (s, (ov, lanes)) in o.iter_mut().zip(ar.iter()).enumerate() {
            let bs = if s == 0 { b0 } else { b1 };
            let mut v = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
            for l in kl..k {
                v += a[r][l] * bs[l];
            }
            *ov = v;
        }
    }
    out
}

/// Dot product with the same four-lane accumulation and reduction order as [`kernel_4x2`], so every element of a
/// product is bitwise the same whichever path computed it.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 4;
    let k = a.len().min(b.len());
    let kl = k / L * L;
    let mut acc = [0.0f32; L];
    for (x, y) in a[..kl].chunks_exact(L).zip(b[..kl].chunks_exact(L)) {
        for t in 0..L {
            acc[t] += x[t] * y[t];
        }
    }
    let mut v = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for l in kl..k {
        v += a[l] * b[l];
    }
    v
}

/// Writes the transpose of `a` (`rows x cols`) into `out` (`cols x rows`).
pub(crate) fn transpose(a: &[f32], out: &mut [f32], rows: usize, cols: usize) {
    assert_eq!(a.len(), rows * cols, "transpose: a");
    assert_eq!(out.len(), rows * cols, "transpose: out");
    const T: usize = 32;
    for i0 in (0..rows).step_by(T) {
        let i1 = (i0 + T).min(rows);
        for j0 in (0..cols).step_by(T) {
            let j1 = (j0 + T).min(cols);
            for i in i0..i1 {
                for j in j0..j1 {
                    out[j * rows + i] = a[i * cols + j];
                }
            }
        }
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
                    (0..k).map(|l| f64::from(a[i * k + l]) * f64::from(b[j * k + l])).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn gemm_nt_matches_naive_on_ragged_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (5, 3, 7), (9, 17, 13), (64, 130, 33), (300, 7, 9), (4, 2, 0)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let b: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
            let mut c = vec![f32::NAN; m * n];
            gemm_nt(&a, &b, &mut c, m, n, k);
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
        gemm_nt(&a, &b, &mut full, 13, n, k);
        for i in 0..13 {
            let mut one = vec![0.0; n];
            gemm_nt(&a[i * k..(i + 1) * k], &b, &mut one, 1, n, k);
            assert_eq!(one, full[i * n..(i + 1) * n], "row {i}");
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
