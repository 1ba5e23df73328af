//! Activation sparsity for pinion: which FFN neurons will fire for a given input.
//!
//! Two sources, as in PowerInfer-2: a trained low-rank predictor `logits = W2 · relu(W1 · x)` for ReLU-family
//! models ([`LowRankPredictor`], the main type), and threshold sparsity for SiLU/GELU-gated models (CATS: a
//! neuron is off when `|act(gate · x)|` is below a per-layer threshold, [`calibrate_threshold`]). [`Metrics`]
//! scores a prediction against the true active set. [`train::train_layer`] fits one layer's predictor from
//! recorded (input, active-mask) pairs ([`train::Masks`]), choosing its rank and decision threshold on a
//! held-out split. [`ActivationProfile`] records what a calibration run saw (score samples, firing counts and
//! token samples), and reads and writes its versioned file format through `impl Read`/`impl Write`. This crate
//! works on plain f32 data; it opens no files and does no cache work.
#![forbid(unsafe_code)]

mod gemm;
mod metrics;
mod profile;
mod threshold;
pub mod train;

pub use crate::metrics::Metrics;
pub use crate::profile::{ActivationProfile, PROFILE_MAGIC, PROFILE_VERSION};
pub use crate::threshold::{calibrate_threshold, threshold_of_sorted};
pub use crate::train::{LayerReport, Masks, TrainConfig, evaluate, holdout_split, train_layer};

/// What can go wrong building a predictor.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum PredictorError {
    #[error("{what} has {got} values, expected {expected}")]
    Shape { what: &'static str, got: usize, expected: usize },
    #[error("activation profile, at byte {offset}: {why}")]
    BadProfile { offset: u64, why: String },
    #[error("predictor dimensions must be non-zero (d_in {d_in}, rank {rank}, n_out {n_out})")]
    Empty { d_in: usize, rank: usize, n_out: usize },
    #[error("training needs at least {needed} samples, got {got}")]
    TooFewSamples { got: usize, needed: usize },
    #[error("target recall {0} is outside (0, 1]")]
    TargetRecall(f64),
    #[error("invalid training config: {what}")]
    Config { what: &'static str },
    #[error("mask row {row} has bits set past column {n_cols}")]
    MaskPadding { row: usize, n_cols: usize },
}

/// A per-layer activation predictor: a two-layer MLP with a ReLU in between and a low-rank hidden layer.
///
/// Neuron `i` is predicted active when `logits[i] >= threshold`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRankPredictor {
    d_in: usize,
    rank: usize,
    n_out: usize,
    /// `rank x d_in`, row-major.
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// `n_out x rank`, row-major.
    w2: Vec<f32>,
    b2: Vec<f32>,
    threshold: f32,
}

impl LowRankPredictor {
    /// Builds a predictor from its weights (row-major) and biases.
    pub fn new(
        d_in: usize,
        rank: usize,
        n_out: usize,
        w1: Vec<f32>,
        b1: Vec<f32>,
        w2: Vec<f32>,
        b2: Vec<f32>,
    ) -> Result<LowRankPredictor, PredictorError> {
        if d_in == 0 || rank == 0 || n_out == 0 {
            return Err(PredictorError::Empty { d_in, rank, n_out });
        }
        let check = |what, got: usize, expected| {
            if got == expected { Ok(()) } else { Err(PredictorError::Shape { what, got, expected }) }
        };
        check("w1", w1.len(), rank * d_in)?;
        check("b1", b1.len(), rank)?;
        check("w2", w2.len(), n_out * rank)?;
        check("b2", b2.len(), n_out)?;
        Ok(LowRankPredictor { d_in, rank, n_out, w1, b1, w2, b2, threshold: 0.0 })
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Hidden width.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of neurons predicted.
    pub fn n_out(&self) -> usize {
        self.n_out
    }

    /// First-layer weights, `rank x d_in`, row-major.
    pub fn w1(&self) -> &[f32] {
        &self.w1
    }

    /// First-layer biases (`rank`).
    pub fn b1(&self) -> &[f32] {
        &self.b1
    }

    /// Second-layer weights, `n_out x rank`, row-major.
    pub fn w2(&self) -> &[f32] {
        &self.w2
    }

    /// Second-layer biases (`n_out`).
    pub fn b2(&self) -> &[f32] {
        &self.b2
    }

    /// Bytes of its weights and biases (f32), what it holds in memory.
    pub fn weight_bytes(&self) -> u64 {
        4 * (self.w1.len() + self.b1.len() + self.w2.len() + self.b2.len()) as u64
    }

    /// The decision threshold on logits (default 0).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Sets the decision threshold.
    pub fn set_threshold(&mut self, t: f32) {
        self.threshold = t;
    }

    /// Computes the logits for input `x` into `out`, using `hidden` (length `rank`) as scratch.
    pub fn logits(&self, x: &[f32], hidden: &mut [f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.d_in, "predictor input width");
        assert_eq!(hidden.len(), self.rank, "predictor hidden width");
        assert_eq!(out.len(), self.n_out, "predictor output width");
        for (h, (row, b)) in hidden.iter_mut().zip(self.w1.chunks_exact(self.d_in).zip(&self.b1)) {
            *h = (dot(row, x) + b).max(0.0);
        }
        for (o, (row, b)) in out.iter_mut().zip(self.w2.chunks_exact(self.rank).zip(&self.b2)) {
            *o = dot(row, hidden) + b;
        }
    }

    /// Appends the indices of the neurons predicted active for `x` to `active` (cleared first).
    pub fn predict(&self, x: &[f32], hidden: &mut [f32], logits: &mut [f32], active: &mut Vec<u32>) {
        self.logits(x, hidden, logits);
        active.clear();
        active
            .extend(logits.iter().enumerate().filter(|&(_, &l)| l >= self.threshold).map(|(i, _)| i as u32));
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes() {
        let e =
            LowRankPredictor::new(2, 1, 3, vec![0.0; 2], vec![0.0], vec![0.0; 2], vec![0.0; 3]).unwrap_err();
        assert_eq!(e, PredictorError::Shape { what: "w2", got: 2, expected: 3 });
        let e = LowRankPredictor::new(0, 1, 3, vec![], vec![0.0], vec![0.0; 3], vec![0.0; 3]).unwrap_err();
        assert!(matches!(e, PredictorError::Empty { .. }));
    }

    #[test]
    fn logits_follow_the_formula_and_threshold_selects() {
        // hidden = relu([x0 - x1, x1]) ; logits = [h0 + h1, -h0, h1 - 1]
        let p = LowRankPredictor::new(
            2,
            2,
            3,
            vec![1.0, -1.0, 0.0, 1.0],
            vec![0.0, 0.0],
            vec![1.0, 1.0, -1.0, 0.0, 0.0, 1.0],
            vec![0.0, 0.0, -1.0],
        )
        .unwrap();
        let (mut h, mut l, mut act) = ([0.0; 2], [0.0; 3], Vec::new());
        p.predict(&[3.0, 2.0], &mut h, &mut l, &mut act);
        assert_eq!(h, [1.0, 2.0]);
        assert_eq!(l, [3.0, -1.0, 1.0]);
        assert_eq!(act, vec![0, 2]);
        // ReLU clips the negative hidden unit.
        p.predict(&[1.0, 2.0], &mut h, &mut l, &mut act);
        assert_eq!(h, [0.0, 2.0]);
        let mut p = p;
        p.set_threshold(1.5);
        p.predict(&[3.0, 2.0], &mut h, &mut l, &mut act);
        assert_eq!(act, vec![0]);
    }
}
