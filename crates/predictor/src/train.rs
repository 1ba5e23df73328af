//! Training per-layer low-rank activation predictors from recorded (input, active-mask) pairs.
//!
//! [`train_layer`] fits `logits = W2 · relu(W1 · x + b1) + b2` for one FFN layer with Adam on a weighted
//! binary cross-entropy, where positives (active neurons, usually the rare class) are up-weighted per neuron.
//! Inputs are standardized per dimension with statistics of the training split (LLM residual streams have a few
//! huge outlier dimensions), and the standardization is folded into `W1`/`b1` of the returned predictor, so the
//! runtime feeds raw inputs. A seeded shuffle puts the last `holdout` share of the samples aside; they are never
//! trained on, and serve for early stopping, for the decision threshold (the largest one whose micro recall
//! reaches the target) and for the report. Candidate ranks are tried in increasing order until one predicts
//! few enough neurons at the target recall.
//!
//! `W1` starts from the input directions that carry the labels (a spectral initialization, see
//! `spectral_init`), not from noise: with `d_in` in the thousands and only a few thousand samples, a random start
//! overfits before it finds them. Even so, accuracy is bounded by samples per input dimension: on isotropic
//! synthetic inputs (the `train_speed` example), about `6 d_in` training samples give a predicted density ~1.25x
//! the true one at 95% recall, while about `1.5 d_in` give ~3x. Collect several times `d_in` samples per layer.
//!
//! The matrix products use a packed-panel f32 kernel (module `gemm`) parallelized with rayon on a pool of
//! [`TrainConfig::threads`] threads; results are bitwise identical for any thread count.

use rayon::prelude::*;

use crate::gemm::{gemm, gemm_bt, transpose};
use crate::{LowRankPredictor, Metrics, PredictorError};

/// A row-major bit matrix: row `r` holds the active mask of sample `r`, one bit per neuron.
///
/// Each row takes `n_cols.div_ceil(64)` words; bit `c % 64` of word `c / 64` is column `c`, and the bits past
/// `n_cols` in a row's last word are always zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masks {
    n_rows: usize,
    n_cols: usize,
    words: Vec<u64>,
}

impl Masks {
    /// An all-zero mask matrix.
    pub fn new(n_rows: usize, n_cols: usize) -> Masks {
        Masks { n_rows, n_cols, words: vec![0; n_rows * n_cols.div_ceil(64)] }
    }

    /// Wraps `words` (row stride `n_cols.div_ceil(64)`), checking the length and that padding bits are zero.
    pub fn from_words(n_rows: usize, n_cols: usize, words: Vec<u64>) -> Result<Masks, PredictorError> {
        let stride = n_cols.div_ceil(64);
        let expected = n_rows * stride;
        if words.len() != expected {
            return Err(PredictorError::Shape { what: "mask words", got: words.len(), expected });
        }
        if n_cols % 64 != 0 {
            let pad = !((1u64 << (n_cols % 64)) - 1);
            if let Some(row) = (0..n_rows).find(|&r| words[r * stride + stride - 1] & pad != 0) {
                return Err(PredictorError::MaskPadding { row, n_cols });
            }
        }
        Ok(Masks { n_rows, n_cols, words })
    }

    fn stride(&self) -> usize {
        self.n_cols.div_ceil(64)
    }

    /// Sets bit (`r`, `c`). Panics when out of range.
    pub fn set(&mut self, r: usize, c: usize, v: bool) {
        assert!(r < self.n_rows && c < self.n_cols, "mask index ({r}, {c}) out of range");
        let i = r * self.stride() + c / 64;
        let w = &mut self.words[i];
        if v {
            *w |= 1 << (c % 64);
        } else {
            *w &= !(1 << (c % 64));
        }
    }

    /// Bit (`r`, `c`). Panics when out of range.
    pub fn get(&self, r: usize, c: usize) -> bool {
        assert!(r < self.n_rows && c < self.n_cols, "mask index ({r}, {c}) out of range");
        self.words[r * self.stride() + c / 64] >> (c % 64) & 1 == 1
    }

    /// The words of row `r`.
    pub fn row_words(&self, r: usize) -> &[u64] {
        let s = self.stride();
        &self.words[r * s..(r + 1) * s]
    }

    /// Number of rows (samples).
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    /// Number of columns (neurons).
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// All words, row after row.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Share of set bits (0 for an empty matrix).
    pub fn density(&self) -> f64 {
        self.count_ones() as f64 / (self.n_rows * self.n_cols).max(1) as f64
    }

    /// Per column, the share of rows with the bit set (0 when there are no rows).
    pub fn column_frequency(&self) -> Vec<f64> {
        let counts = self.column_counts();
        let n = self.n_rows.max(1) as f64;
        counts.iter().map(|&c| c as f64 / n).collect()
    }

    fn column_counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.n_cols];
        for row in self.words.chunks_exact(self.stride().max(1)) {
            for (wi, &w) in row.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    counts[wi * 64 + w.trailing_zeros() as usize] += 1;
                    w &= w - 1;
                }
            }
        }
        counts
    }

    /// The rows listed in `rows`, in that order. Panics when an index is out of range.
    pub fn select_rows(&self, rows: &[usize]) -> Masks {
        let mut words = Vec::with_capacity(rows.len() * self.stride());
        for &r in rows {
            words.extend_from_slice(self.row_words(r));
        }
        Masks { n_rows: rows.len(), n_cols: self.n_cols, words }
    }
}

/// How [`train_layer`] trains and chooses a predictor.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Candidate hidden widths, tried in increasing order (each clipped to at most `2 * d_in`).
    pub ranks: Vec<usize>,
    /// Maximum passes over the training split.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Adam learning rate (cosine-decayed to a tenth over the run); betas 0.9/0.999, eps 1e-8.
    pub lr: f32,
    /// Decoupled (AdamW) weight decay on `W1` and `W2`.
    pub weight_decay: f32,
    /// Share of samples held out (the last ones after a seeded shuffle), in (0, 1).
    pub holdout: f64,
    /// Micro recall the threshold must reach on the held-out split, in (0, 1].
    pub target_recall: f64,
    /// The rank search stops at the first rank whose held-out predicted density is at most this times the
    /// true density.
    pub max_density_ratio: f64,
    /// Early stopping: stop after this many epochs without a lower held-out loss and keep the best epoch's
    /// weights. 0 disables it (all epochs run, the last weights are kept, and the held-out split then has no
    /// influence on the weights).
    pub patience: usize,
    /// Seed of the split, the initialization and the batch order.
    pub seed: u64,
    /// Worker threads; 0 uses rayon's default.
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            ranks: vec![32, 64, 128, 256],
            epochs: 24,
            batch: 64,
            lr: 1e-2,
            weight_decay: 0.3,
            holdout: 0.2,
            target_recall: 0.95,
            max_density_ratio: 1.5,
            patience: 3,
            seed: 0x5EED_F00D,
            threads: 0,
        }
    }
}

/// What [`train_layer`] chose and how it scores on the held-out split.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    /// Chosen hidden width.
    pub rank: usize,
    /// Held-out micro recall at the chosen threshold.
    pub recall: f64,
    /// Held-out precision at the chosen threshold.
    pub precision: f64,
    /// Share of held-out (sample, neuron) pairs predicted active.
    pub predicted_density: f64,
    /// Share of held-out (sample, neuron) pairs truly active.
    pub true_density: f64,
    /// The decision threshold on logits (`f32::INFINITY` when the held-out split has no active neuron).
    pub threshold: f32,
    /// Held-out weighted cross-entropy per (sample, neuron) of the kept weights.
    pub heldout_loss: f64,
    /// Epochs trained for the chosen rank.
    pub epochs_run: usize,
    /// Training samples.
    pub n_train: usize,
    /// Held-out samples.
    pub n_heldout: usize,
    /// Every rank tried, with its held-out recall and predicted density at its own threshold.
    pub tried: Vec<(usize, f64, f64)>,
}

/// The seeded split [`train_layer`] uses: `(train, heldout)` sample indices. The held-out part is the last
/// `round(n * holdout)` (at least 1, at most `n - 1`) indices of a seeded shuffle of `0..n`.
pub fn holdout_split(n: usize, holdout: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>), PredictorError> {
    if n < 2 {
        return Err(PredictorError::TooFewSamples { got: n, needed: 2 });
    }
    if !(holdout > 0.0 && holdout < 1.0) {
        return Err(PredictorError::Config { what: "holdout must be in (0, 1)" });
    }
    let mut perm: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0xA5A5_5A5A_0123_4567).shuffle(&mut perm);
    let n_held = ((n as f64 * holdout).round() as usize).clamp(1, n - 1);
    let held = perm.split_off(n - n_held);
    Ok((perm, held))
}

/// Trains one layer's predictor on `x` (`masks.n_rows() x d_in`, row-major) and the active masks.
///
/// Returns the chosen predictor, with standardization folded in and its threshold set, and its report.
pub fn train_layer(
    x: &[f32],
    d_in: usize,
    masks: &Masks,
    cfg: &TrainConfig,
) -> Result<(LowRankPredictor, LayerReport), PredictorError> {
    validate(cfg)?;
    let (n, n_out) = (masks.n_rows(), masks.n_cols());
    if d_in == 0 || n_out == 0 {
        return Err(PredictorError::Empty { d_in, rank: cfg.ranks[0], n_out });
    }
    if x.len() != n * d_in {
        return Err(PredictorError::Shape { what: "x", got: x.len(), expected: n * d_in });
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(PredictorError::Config { what: "x has non-finite values" });
    }
    let (train_idx, held_idx) = holdout_split(n, cfg.holdout, cfg.seed)?;
    let mut ranks: Vec<usize> = cfg.ranks.iter().map(|&r| r.min(2 * d_in)).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let run = || train_split(x, d_in, masks, &train_idx, &held_idx, &ranks, cfg);
    match rayon::ThreadPoolBuilder::new().num_threads(cfg.threads).build() {
        Ok(pool) => pool.install(run),
        // Without a private pool, the global one does the same work.
        Err(_) => run(),
    }
}

fn validate(cfg: &TrainConfig) -> Result<(), PredictorError> {
    let bad = |what| Err(PredictorError::Config { what });
    if !(cfg.target_recall > 0.0 && cfg.target_recall <= 1.0) {
        return Err(PredictorError::TargetRecall(cfg.target_recall));
    }
    if cfg.ranks.is_empty() {
        return bad("no candidate ranks");
    }
    if cfg.ranks.contains(&0) {
        return bad("a candidate rank is 0");
    }
    if cfg.epochs == 0 {
        return bad("epochs must be positive");
    }
    if cfg.batch == 0 {
        return bad("batch must be positive");
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return bad("lr must be positive and finite");
    }
    if !(cfg.weight_decay >= 0.0 && cfg.weight_decay.is_finite()) {
        return bad("weight_decay must be non-negative and finite");
    }
    if !(cfg.holdout > 0.0 && cfg.holdout < 1.0) {
        return bad("holdout must be in (0, 1)");
    }
    if cfg.max_density_ratio.is_nan() || cfg.max_density_ratio <= 0.0 {
        return bad("max_density_ratio must be positive");
    }
    Ok(())
}

/// Scores `p` at its own threshold on inputs `x` (`masks.n_rows() x p.d_in()`) against `masks`.
///
/// The batched logits here are bitwise those of [`LowRankPredictor::logits`] (same summation order), so the
/// scores hold exactly for the runtime's per-token path.
pub fn evaluate(p: &LowRankPredictor, x: &[f32], masks: &Masks) -> Result<Metrics, PredictorError> {
    if masks.n_cols() != p.n_out() {
        return Err(PredictorError::Shape { what: "mask columns", got: masks.n_cols(), expected: p.n_out() });
    }
    let expected = masks.n_rows() * p.d_in();
    if x.len() != expected {
        return Err(PredictorError::Shape { what: "x", got: x.len(), expected });
    }
    let w =
        Weights { d: p.d_in(), r: p.rank(), n: p.n_out(), w1: p.w1(), b1: p.b1(), w2: p.w2(), b2: p.b2() };
    let mut m = Metrics::default();
    let mut s = Scratch::new(&w.dims(), EVAL_BLOCK);
    for (blk, xb) in x.chunks(EVAL_BLOCK * w.d).enumerate() {
        let rows = xb.len() / w.d;
        forward(&w, xb, rows, &mut s);
        let first = blk * EVAL_BLOCK;
        add_counts(&mut m, &s.z[..rows * w.n], w.n, |i| masks.row_words(first + i), p.threshold());
    }
    Ok(m)
}

/// Rows per forward block when evaluating.
const EVAL_BLOCK: usize = 256;

fn add_counts<'a>(
    m: &mut Metrics,
    logits: &[f32],
    n: usize,
    row: impl Fn(usize) -> &'a [u64] + Sync,
    t: f32,
) {
    let parts: Vec<[u64; 4]> = logits
        .par_chunks(n)
        .enumerate()
        .map(|(i, z)| {
            let words = row(i);
            let mut c = [0u64; 4];
            for (j, &v) in z.iter().enumerate() {
                let y = words[j / 64] >> (j % 64) & 1 == 1;
                c[usize::from(v >= t) * 2 + usize::from(y)] += 1;
            }
            c
        })
        .collect();
    for c in parts {
        m.true_neg += c[0];
        m.false_neg += c[1];
        m.false_pos += c[2];
        m.true_pos += c[3];
    }
}

/// The largest threshold whose micro recall over `logits` (`masks.n_rows() x n`) is at least `target`.
fn choose_threshold(logits: &[f32], n: usize, masks: &Masks, target: f64) -> f32 {
    let mut pos = Vec::new();
    for (i, z) in logits.chunks_exact(n).enumerate() {
        for (wi, &w) in masks.row_words(i).iter().enumerate() {
            let mut w = w;
            while w != 0 {
                pos.push(z[wi * 64 + w.trailing_zeros() as usize]);
                w &= w - 1;
            }
        }
    }
    if pos.is_empty() {
        return f32::INFINITY;
    }
    pos.sort_unstable_by(|a, b| b.total_cmp(a));
    let p = pos.len();
    // The fewest positives k with k / p >= target, computed exactly as Metrics::recall divides.
    let mut k = ((target * p as f64).ceil() as usize).clamp(1, p);
    while k > 1 && (k - 1) as f64 / p as f64 >= target {
        k -= 1;
    }
    while k < p && (k as f64 / p as f64) < target {
        k += 1;
    }
    pos[k - 1]
}

/// Per-dimension standardization `(x - mean) * inv_std` fitted on the training rows.
struct Standardizer {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Standardizer {
    fn fit(x: &[f32], d: usize, rows: &[usize]) -> Standardizer {
        let mut sum = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for &r in rows {
            for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(&x[r * d..(r + 1) * d]) {
                *s += f64::from(v);
                *q += f64::from(v) * f64::from(v);
            }
        }
        let n = rows.len().max(1) as f64;
        let mut mean = Vec::with_capacity(d);
        let mut inv_std = Vec::with_capacity(d);
        for (s, q) in sum.iter().zip(&sq) {
            let mu = s / n;
            let sd = (q / n - mu * mu).max(0.0).sqrt();
            mean.push(mu as f32);
            // A (nearly) constant dimension carries nothing the bias cannot; leave its scale alone.
            inv_std.push(if sd > 1e-6 * (1.0 + mu.abs()) { (1.0 / sd) as f32 } else { 1.0 });
        }
        Standardizer { mean, inv_std }
    }

    fn apply_rows(&self, x: &[f32], d: usize, rows: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            out.extend(
                x[r * d..(r + 1) * d]
                    .iter()
                    .zip(&self.mean)
                    .zip(&self.inv_std)
                    .map(|((v, m), s)| (v - m) * s),
            );
        }
        out
    }
}

fn gather_rows(x: &[f32], d: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

fn train_split(
    x: &[f32],
    d_in: usize,
    masks: &Masks,
    train_idx: &[usize],
    held_idx: &[usize],
    ranks: &[usize],
    cfg: &TrainConfig,
) -> Result<(LowRankPredictor, LayerReport), PredictorError> {
    let n_out = masks.n_cols();
    let st = Standardizer::fit(x, d_in, train_idx);
    let data = Data {
        d: d_in,
        n: n_out,
        x_train: st.apply_rows(x, d_in, train_idx),
        m_train: masks.select_rows(train_idx),
        x_held: st.apply_rows(x, d_in, held_idx),
        m_held: masks.select_rows(held_idx),
        pos_weight: Vec::new(),
    };
    let counts = data.m_train.column_counts();
    let n_train = train_idx.len();
    let pos_weight: Vec<f32> = counts
        .iter()
        .map(|&c| {
            if c == 0 {
                MAX_POS_WEIGHT
            } else {
                ((n_train as u64 - c) as f32 / c as f32).clamp(1.0, MAX_POS_WEIGHT)
            }
        })
        .collect();
    let data = Data { pos_weight, ..data };
    let x_held_raw = gather_rows(x, d_in, held_idx);

    let mut best: Option<(LowRankPredictor, LayerReport)> = None;
    let mut tried = Vec::new();
    for &rank in ranks {
        let fit = fit_rank(&data, &counts, rank, cfg);
        let mut p = fold(&fit.params, &Dims { d: d_in, r: rank, n: n_out }, &st)?;
        let logits = batch_logits(&p, &x_held_raw);
        let t = choose_threshold(&logits, n_out, &data.m_held, cfg.target_recall);
        p.set_threshold(t);
        let mut m = Metrics::default();
        add_counts(&mut m, &logits, n_out, |i| data.m_held.row_words(i), t);
        let report = LayerReport {
            rank,
            recall: m.recall(),
            precision: m.precision(),
            predicted_density: m.predicted_density(),
            true_density: m.true_density(),
            threshold: t,
            heldout_loss: fit.heldout_loss,
            epochs_run: fit.epochs_run,
            n_train,
            n_heldout: held_idx.len(),
            tried: Vec::new(),
        };
        tried.push((rank, report.recall, report.predicted_density));
        let good = report.predicted_density <= cfg.max_density_ratio * report.true_density;
        if good || best.as_ref().is_none_or(|(_, b)| report.predicted_density < b.predicted_density) {
            best = Some((p, report));
        }
        if good {
            break;
        }
    }
    let (p, mut report) = best.expect("at least one rank is tried");
    report.tried = tried;
    Ok((p, report))
}

/// Positive-class weights are `negatives / positives` clipped to `[1, MAX_POS_WEIGHT]`.
const MAX_POS_WEIGHT: f32 = 20.0;

/// The standardized training and held-out data of one layer.
struct Data {
    d: usize,
    n: usize,
    x_train: Vec<f32>,
    m_train: Masks,
    x_held: Vec<f32>,
    m_held: Masks,
    pos_weight: Vec<f32>,
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    d: usize,
    r: usize,
    n: usize,
}

impl Dims {
    fn len(&self) -> usize {
        self.r * self.d + self.r + self.n * self.r + self.n
    }
}

/// Borrowed weights of a predictor.
struct Weights<'a> {
    d: usize,
    r: usize,
    n: usize,
    w1: &'a [f32],
    b1: &'a [f32],
    w2: &'a [f32],
    b2: &'a [f32],
}

impl<'a> Weights<'a> {
    /// Views flat parameters laid out as `[w1 | b1 | w2 | b2]`.
    fn from_flat(dims: &Dims, p: &'a [f32]) -> Weights<'a> {
        let (w1, rest) = p.split_at(dims.r * dims.d);
        let (b1, rest) = rest.split_at(dims.r);
        let (w2, b2) = rest.split_at(dims.n * dims.r);
        Weights { d: dims.d, r: dims.r, n: dims.n, w1, b1, w2, b2 }
    }

    fn dims(&self) -> Dims {
        Dims { d: self.d, r: self.r, n: self.n }
    }
}

fn split_flat_mut<'a>(dims: &Dims, p: &'a mut [f32]) -> [&'a mut [f32]; 4] {
    let (w1, rest) = p.split_at_mut(dims.r * dims.d);
    let (b1, rest) = rest.split_at_mut(dims.r);
    let (w2, b2) = rest.split_at_mut(dims.n * dims.r);
    [w1, b1, w2, b2]
}

/// Work buffers for a batch of up to `rows` samples.
struct Scratch {
    h: Vec<f32>,
    z: Vec<f32>,
    gt: Vec<f32>,
    dh: Vec<f32>,
    dht: Vec<f32>,
}

impl Scratch {
    fn new(dims: &Dims, rows: usize) -> Scratch {
        Scratch {
            h: vec![0.0; rows * dims.r],
            z: vec![0.0; rows * dims.n],
            gt: Vec::new(),
            dh: Vec::new(),
            dht: Vec::new(),
        }
    }

    fn with_backward(dims: &Dims, rows: usize) -> Scratch {
        Scratch {
            gt: vec![0.0; rows * dims.n],
            dh: vec![0.0; rows * dims.r],
            dht: vec![0.0; rows * dims.r],
            ..Scratch::new(dims, rows)
        }
    }
}

/// Logits of `rows` inputs `x` into `s.z[..rows * n]` (hidden activations in `s.h`).
fn forward(w: &Weights<'_>, x: &[f32], rows: usize, s: &mut Scratch) {
    let h = &mut s.h[..rows * w.r];
    gemm_bt(x, w.w1, h, rows, w.r, w.d);
    for row in h.chunks_exact_mut(w.r) {
        for (v, b) in row.iter_mut().zip(w.b1) {
            *v = (*v + b).max(0.0);
        }
    }
    let z = &mut s.z[..rows * w.n];
    gemm_bt(h, w.w2, z, rows, w.n, w.r);
    for row in z.chunks_exact_mut(w.n) {
        for (v, b) in row.iter_mut().zip(w.b2) {
            *v += b;
        }
    }
}

/// Weighted binary cross-entropy of logit `z` with label `y`, in the stable softplus form.
fn bce(z: f32, y: bool, pos_weight: f32) -> f64 {
    let tail = f64::from((-z.abs()).exp()).ln_1p();
    if y { f64::from(pos_weight) * (f64::from((-z).max(0.0)) + tail) } else { f64::from(z.max(0.0)) + tail }
}

/// `ln(1 + e^z)` in f32, branch-free so that loops over it vectorize (absolute error about 1e-6).
#[inline(always)]
fn softplus(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    // ln(1 + e) for e in (0, 1] as 2 atanh(s) with s = e / (2 + e) <= 1/3.
    let s = e / (2.0 + e);
    let s2 = s * s;
    let ln1p = 2.0
        * s
        * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 / 11.0)))));
    z.max(0.0) + ln1p
}

/// Sum with eight independent accumulators.
fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The logistic function, branch-free so that loops over it vectorize.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    let r = 1.0 / (1.0 + e);
    if z >= 0.0 { r } else { e * r }
}

/// `exp(x)` for `x <= 0` (relative error about 1e-6 for moderate `x`; values below `2^-126` become that),
/// written with float bit tricks instead of a libm call or an int conversion so that loops over it vectorize.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    let t = (x * std::f32::consts::LOG2_E).max(-126.0);
    let r = t + MAGIC;
    let i = r.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let u = (t - (r - MAGIC)) * std::f32::consts::LN_2;
    // e^u for u in [-ln 2 / 2, ln 2 / 2], Taylor to degree 7.
    let p = 1.0
        + u * (1.0
            + u * (1.0 / 2.0
                + u * (1.0 / 6.0
                    + u * (1.0 / 24.0 + u * (1.0 / 120.0 + u * (1.0 / 720.0 + u * (1.0 / 5040.0)))))));
    f32::from_bits(((i + 127) as u32) << 23) * p
}

/// Held-out loss per (sample, neuron) of the flat parameters.
fn heldout_loss(dims: &Dims, params: &[f32], data: &Data, s: &mut Scratch, block: usize) -> f64 {
    let w = Weights::from_flat(dims, params);
    let n_rows = data.m_held.n_rows();
    let mut total = 0.0;
    for (blk, xb) in data.x_held.chunks(block * dims.d).enumerate() {
        let rows = xb.len() / dims.d;
        forward(&w, xb, rows, s);
        let parts: Vec<f64> = s.z[..rows * dims.n]
            .par_chunks_mut(dims.n)
            .enumerate()
            .map(|(i, z)| {
                // The set bits, a small share, first add their positive-minus-negative loss difference; then
                // every neuron's negative-label loss is summed in a vectorized pass.
                let mut pos = 0.0f64;
                for (wi, &w) in data.m_held.row_words(blk * block + i).iter().enumerate() {
                    let mut w = w;
                    while w != 0 {
                        let j = wi * 64 + w.trailing_zeros() as usize;
                        pos += bce(z[j], true, data.pos_weight[j]) - bce(z[j], false, 1.0);
                        w &= w - 1;
                    }
                }
                for v in z.iter_mut() {
                    *v = softplus(*v);
                }
                pos + f64::from(sum_f32(z))
            })
            .collect();
        total += parts.iter().sum::<f64>();
    }
    total / (n_rows * dims.n).max(1) as f64
}

/// Gradient of `(1 / rows) * sum over the batch and neurons of bce` into `grad` (flat layout); returns that
/// loss when `want_loss`, else 0.
#[allow(clippy::too_many_arguments)]
fn loss_grad(
    dims: &Dims,
    params: &[f32],
    x: &[f32],
    labels: &[&[u64]],
    pos_weight: &[f32],
    s: &mut Scratch,
    grad: &mut [f32],
    want_loss: bool,
) -> f64 {
    let Dims { d, r, n } = *dims;
    let rows = labels.len();
    let w = Weights::from_flat(dims, params);
    forward(&w, x, rows, s);
    let scale = 1.0 / rows as f32;
    // Logits become dL/dz in place.
    let g = &mut s.z[..rows * n];
    let parts: Vec<f64> = g
        .par_chunks_mut(n)
        .zip(labels.par_iter())
        .map(|(z, words)| {
            let mut loss = 0.0;
            if want_loss {
                for (j, (&v, &pw)) in z.iter().zip(pos_weight).enumerate() {
                    loss += bce(v, words[j / 64] >> (j % 64) & 1 == 1, pw);
                }
            }
            // Every neuron gets the negative-label gradient sigmoid(z) (a branch-free, vectorized pass), then
            // the set bits, a small share, are turned into the positive-label gradient w * (sigmoid(z) - 1).
            for v in z.iter_mut() {
                *v = sigmoid(*v) * scale;
            }
            for (wi, &w) in words.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    let j = wi * 64 + w.trailing_zeros() as usize;
                    z[j] = pos_weight[j] * (z[j] - scale);
                    w &= w - 1;
                }
            }
            loss
        })
        .collect();
    let [gw1, gb1, gw2, gb2] = split_flat_mut(dims, grad);
    gb2.fill(0.0);
    for row in g.chunks_exact(n) {
        for (a, b) in gb2.iter_mut().zip(row) {
            *a += b;
        }
    }
    let h = &s.h[..rows * r];
    let gt = &mut s.gt[..rows * n];
    transpose(g, gt, rows, n);
    gemm(gt, h, gw2, n, r, rows);
    let dh = &mut s.dh[..rows * r];
    gemm(g, w.w2, dh, rows, r, n);
    for (v, hv) in dh.iter_mut().zip(h) {
        if *hv <= 0.0 {
            *v = 0.0;
        }
    }
    gb1.fill(0.0);
    for row in dh.chunks_exact(r) {
        for (a, b) in gb1.iter_mut().zip(row) {
            *a += b;
        }
    }
    let dht = &mut s.dht[..rows * r];
    transpose(dh, dht, rows, r);
    gemm(dht, x, gw1, r, d, rows);
    parts.iter().sum::<f64>() / rows as f64
}

struct Fit {
    params: Vec<f32>,
    heldout_loss: f64,
    epochs_run: usize,
}

fn init_params(dims: &Dims, counts: &[u64], n_train: usize, pos_weight: &[f32], rng: &mut Rng) -> Vec<f32> {
    let mut p = vec![0.0f32; dims.len()];
    let [w1, b1, w2, b2] = split_flat_mut(dims, &mut p);
    let s1 = (2.0 / dims.d as f64).sqrt();
    w1.iter_mut().for_each(|v| *v = (rng.normal() * s1) as f32);
    b1.fill(0.0);
    let s2 = 0.1 * (1.0 / dims.r as f64).sqrt();
    w2.iter_mut().for_each(|v| *v = (rng.normal() * s2) as f32);
    // Start every neuron at the loss-optimal constant logit, ln(w * p / (1 - p)).
    for ((b, &c), &pw) in b2.iter_mut().zip(counts).zip(pos_weight) {
        let f = (c as f64 + 0.5) / (n_train as f64 + 1.0);
        *b = (f64::from(pw) * f / (1.0 - f)).ln().clamp(-10.0, 10.0) as f32;
    }
    p
}

/// Points the first layer at the input directions that carry the labels.
///
/// For neuron `c`, `m_c` is the mean standardized input over the training samples where it fired; for
/// threshold-like neurons it lies along the neuron's gate. The top `rank / 2` right singular vectors of
/// `M = [m_c]` (found by three rounds of subspace iteration, without forming `M`) become the rows of `W1`, each
/// once with each sign so that the ReLU passes both halves. Training then starts in the subspace that matters,
/// which needs far fewer samples than finding it from a random start when `d_in` is large.
fn spectral_init(data: &Data, counts: &[u64], dims: &Dims, params: &mut [f32], rng: &mut Rng) {
    let Dims { d, r, n } = *dims;
    let n_train = data.m_train.n_rows();
    let p = r / 2;
    if p == 0 || n_train == 0 {
        return;
    }
    let inv_count: Vec<f32> = counts.iter().map(|&c| if c == 0 { 0.0 } else { 1.0 / c as f32 }).collect();
    let mut xt = vec![0.0f32; d * n_train];
    transpose(&data.x_train, &mut xt, n_train, d);
    // q: d x p, random start.
    let mut q: Vec<f32> = (0..d * p).map(|_| rng.normal() as f32).collect();
    orthonormalize_columns(&mut q, d, p);
    let mut a = vec![0.0f32; n_train * p];
    let mut z = vec![0.0f32; n * p];
    let mut w = vec![0.0f32; n_train * p];
    for _ in 0..3 {
        // a = X q (N x p); z = diag(1 / count) Y^T a (n x p).
        gemm(&data.x_train, &q, &mut a, n_train, p, d);
        z.fill(0.0);
        for (sidx, arow) in a.chunks_exact(p).enumerate() {
            for_each_set_bit(data.m_train.row_words(sidx), |c| {
                for (zv, av) in z[c * p..(c + 1) * p].iter_mut().zip(arow) {
                    *zv += av;
                }
            });
        }
        for (zrow, &ic) in z.chunks_exact_mut(p).zip(&inv_count) {
            zrow.iter_mut().for_each(|v| *v *= ic * ic);
        }
        // w = Y z (N x p); q = orth(X^T w) (d x p), so q <- orth(M^T M q).
        w.par_chunks_mut(p).enumerate().for_each(|(sidx, wrow)| {
            wrow.fill(0.0);
            for_each_set_bit(data.m_train.row_words(sidx), |c| {
                for (wv, zv) in wrow.iter_mut().zip(&z[c * p..(c + 1) * p]) {
                    *wv += zv;
                }
            });
        });
        gemm(&xt, &w, &mut q, d, p, n_train);
        orthonormalize_columns(&mut q, d, p);
    }
    let [w1, b1, _, _] = split_flat_mut(dims, params);
    for k in 0..2 * p {
        let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
        for (j, v) in w1[k * d..(k + 1) * d].iter_mut().enumerate() {
            *v = sign * q[j * p + k / 2];
        }
    }
    b1.fill(0.0);
}

fn for_each_set_bit(words: &[u64], mut f: impl FnMut(usize)) {
    for (wi, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            f(wi * 64 + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

/// Modified Gram-Schmidt on the `p` columns of `q` (`d x p`, row-major); a column that vanishes is left zero.
fn orthonormalize_columns(q: &mut [f32], d: usize, p: usize) {
    let mut cols = vec![0.0f64; d * p];
    for (j, row) in q.chunks_exact(p).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            cols[k * d + j] = f64::from(v);
        }
    }
    for k in 0..p {
        let (done, rest) = cols.split_at_mut(k * d);
        let col = &mut rest[..d];
        for prev in done.chunks_exact(d) {
            let dotp: f64 = prev.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
            col.iter_mut().zip(prev).for_each(|(c, a)| *c -= dotp * a);
        }
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        let inv = if norm > 1e-12 { 1.0 / norm } else { 0.0 };
        col.iter_mut().for_each(|v| *v *= inv);
    }
    for (j, row) in q.chunks_exact_mut(p).enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = cols[k * d + j] as f32;
        }
    }
}

fn fit_rank(data: &Data, counts: &[u64], rank: usize, cfg: &TrainConfig) -> Fit {
    let dims = Dims { d: data.d, r: rank, n: data.n };
    let n_train = data.m_train.n_rows();
    let mut rng = Rng::new(cfg.seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut params = init_params(&dims, counts, n_train, &data.pos_weight, &mut rng);
    spectral_init(data, counts, &dims, &mut params, &mut rng);
    let mut grad = vec![0.0f32; dims.len()];
    let mut adam = Adam::new(dims.len());
    let batch = cfg.batch.min(n_train);
    let mut s = Scratch::with_backward(&dims, batch.max(EVAL_BLOCK));
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut xb = vec![0.0f32; batch * dims.d];
    let total_steps = (cfg.epochs * n_train.div_ceil(batch)) as f64;
    let mut step = 0usize;
    let mut best = (f64::INFINITY, params.clone());
    let mut since_best = 0;
    let mut last_loss = f64::INFINITY;
    let mut epochs_run = 0;
    for _ in 0..cfg.epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(batch) {
            let xb = &mut xb[..chunk.len() * dims.d];
            for (dst, &i) in xb.chunks_exact_mut(dims.d).zip(chunk) {
                dst.copy_from_slice(&data.x_train[i * dims.d..(i + 1) * dims.d]);
            }
            let labels: Vec<&[u64]> = chunk.iter().map(|&i| data.m_train.row_words(i)).collect();
            loss_grad(&dims, &params, xb, &labels, &data.pos_weight, &mut s, &mut grad, false);
            let progress = step as f64 / total_steps;
            let lr = cfg.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32;
            step += 1;
            adam.update(&dims, &mut params, &grad, lr, cfg.weight_decay);
        }
        epochs_run += 1;
        last_loss = heldout_loss(&dims, &params, data, &mut s, EVAL_BLOCK);
        if cfg.patience == 0 {
            continue;
        }
        if last_loss < best.0 {
            best.0 = last_loss;
            best.1.copy_from_slice(&params);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    if cfg.patience == 0 {
        Fit { params, heldout_loss: last_loss, epochs_run }
    } else {
        Fit { params: best.1, heldout_loss: best.0, epochs_run }
    }
}

/// Adam with decoupled weight decay on the weight matrices.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    fn new(len: usize) -> Adam {
        Adam { m: vec![0.0; len], v: vec![0.0; len], t: 0 }
    }

    fn update(&mut self, dims: &Dims, params: &mut [f32], grad: &[f32], lr: f32, weight_decay: f32) {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t);
        let c2 = 1.0 - Self::B2.powi(self.t);
        let step = lr / c1;
        let inv_c2 = 1.0 / c2;
        // Weight decay applies to w1 (first segment) and w2 (third); biases are not decayed.
        let w1_end = dims.r * dims.d;
        let w2_start = w1_end + dims.r;
        let w2_end = w2_start + dims.n * dims.r;
        const CHUNK: usize = 8192;
        params
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(self.m.par_chunks_mut(CHUNK))
            .zip(self.v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(ci, (((p, g), m), v))| {
                for (k, (((p, &g), m), v)) in
                    p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).enumerate()
                {
                    let idx = ci * CHUNK + k;
                    *m = Self::B1 * *m + (1.0 - Self::B1) * g;
                    *v = Self::B2 * *v + (1.0 - Self::B2) * g * g;
                    let decay =
                        if idx < w1_end || (w2_start..w2_end).contains(&idx) { weight_decay } else { 0.0 };
                    *p -= step * *m / ((*v * inv_c2).sqrt() + Self::EPS) + lr * decay * *p;
                }
            });
    }
}

/// Folds the standardization into the first layer: `W1 · ((x - mean) * inv_std) + b1 = W1' · x + b1'`.
fn fold(params: &[f32], dims: &Dims, st: &Standardizer) -> Result<LowRankPredictor, PredictorError> {
    let w = Weights::from_flat(dims, params);
    let mut w1 = Vec::with_capacity(w.w1.len());
    let mut b1 = Vec::with_capacity(w.r);
    for (row, &b) in w.w1.chunks_exact(w.d).zip(w.b1) {
        let mut shift = 0.0f64;
        for ((&v, &s), &m) in row.iter().zip(&st.inv_std).zip(&st.mean) {
            let folded = v * s;
            shift += f64::from(folded) * f64::from(m);
            w1.push(folded);
        }
        b1.push((f64::from(b) - shift) as f32);
    }
    LowRankPredictor::new(w.d, w.r, w.n, w1, b1, w.w2.to_vec(), w.b2.to_vec())
}

/// Logits of every row of `x` (raw inputs) under `p`, `rows x n_out`.
fn batch_logits(p: &LowRankPredictor, x: &[f32]) -> Vec<f32> {
    let w =
        Weights { d: p.d_in(), r: p.rank(), n: p.n_out(), w1: p.w1(), b1: p.b1(), w2: p.w2(), b2: p.b2() };
    let rows = x.len() / w.d;
    let mut out = vec![0.0f32; rows * w.n];
    let mut s = Scratch::new(&w.dims(), EVAL_BLOCK);
    for (xb, ob) in x.chunks(EVAL_BLOCK * w.d).zip(out.chunks_mut(EVAL_BLOCK * w.n)) {
        let r = xb.len() / w.d;
        forward(&w, xb, r, &mut s);
        ob.copy_from_slice(&s.z[..r * w.n]);
    }
    out
}

/// SplitMix64: a tiny seeded generator for initialization and shuffles.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests;
