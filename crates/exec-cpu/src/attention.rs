//! Causal grouped-query attention over an f16 KV cache.

use std::cell::RefCell;

use half::f16;
use rayon::prelude::*;

use crate::kernels::{self, KernelPath};
use crate::ops::softmax;

thread_local! {
    /// Attention scores of the current (token, head), reused across calls on each thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal grouped-query attention for `n_tokens` new queries at positions `first_pos..first_pos + n_tokens`.
///
/// `q` is `[n_tokens][n_heads * head_dim]`; `k` and `v` are the KV cache, `[n_ctx][n_kv_heads * head_dim]`
/// in f16, whose rows `0..first_pos + n_tokens` are written; `out` is `[n_tokens][n_heads * head_dim]`.
/// Query head `h` reads KV head `h / (n_heads / n_kv_heads)`, and query `t` sees cache rows `0..=first_pos + t`,
/// or with a sliding `window` of `w` positions only the last `w` of them (rows `first_pos + t + 1 - w..`: a key
/// `w` or more positions behind the query is masked, as llama.cpp's standard sliding-window attention).
/// Scores are `scale * dot(q, k)` in f32, normalized by [`softmax`], and the values summed in f32.
///
/// Runs on the current rayon pool, parallel over (token, head); the score buffer is a per-thread `Vec`
/// that only grows.
///
/// # Panics
/// On inconsistent shapes: `n_kv_heads` zero or not dividing `n_heads`, or slices shorter than stated.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    attention_with(
        kernels::chosen(),
        q,
        n_tokens,
        first_pos,
        n_heads,
        n_kv_heads,
        head_dim,
        k,
        v,
        scale,
        window,
        out,
    );
}

/// [`attention`] on a given kernel path, for tests and benchmarks.
///
/// # Panics
/// As [`attention`], and if the CPU does not support `path`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    path: KernelPath,
    q: &[f32],
    n_tokens: usize,
    first_pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    k: &[f16],
    v: &[f16],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) {
    kernels::check(path);
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: {n_heads} heads over {n_kv_heads} KV heads"
    );
    assert!(head_dim > 0, "attention: head_dim is zero");
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let n_kv = first_pos + n_tokens;
    assert_eq!(q.len(), n_tokens * q_dim, "attention: q length");
    assert_eq!(out.len(), n_tokens * q_dim, "attention: out length");
    assert!(
        k.len() >= n_kv * kv_dim && v.len() >= n_kv * kv_dim,
        "attention: KV cache shorter than {n_kv} rows"
    );
    let group = n_heads / n_kv_heads;

    let one = |(idx, o): (usize, &mut [f32])| {
        let (t, h) = (idx / n_heads, idx % n_heads);
        let kv_off = (h / group) * head_dim;
        let qh = &q[idx * head_dim..(idx + 1) * head_dim];
        let n_seen = first_pos + t + 1;
        let first = window.map_or(0, |w| n_seen.saturating_sub(w.max(1)));
        let off = first * kv_dim + kv_off;
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            s.clear();
            s.resize(n_seen - first, 0.0);
            kernels::scores_f16(path, qh, &k[off..], kv_dim, &mut s);
            for x in s.iter_mut() {
                *x *= scale;
            }
            softmax(&mut s);
            kernels::wsum_f16(path, &s, &v[off..], kv_dim, o);
        });
    };
    if rayon::current_num_threads() > 1 && n_tokens * n_heads > 1 {
        out.par_chunks_mut(head_dim).enumerate().for_each(one);
    } else {
        out.chunks_mut(head_dim).enumerate().for_each(one);
    }
}
