//! The numbers behind a synthetic mixture of experts' planted routing (see the parent module's docs, "The planted
//! routing"): the per-rank router offsets that give Zipf first-choice frequencies under a Gaussian model of the
//! logits, the logit correlation between consecutive tokens that gives the planted repeat rate, the gains of the
//! layer-0 shift heads that make that correlation, and the RoPE pattern of a head that attends to a fixed lag.

use super::{Rng, SynthError};

/// The routing a synthetic mixture of experts is written with, the same for every layer up to the per-layer
/// permutation of the experts' ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingPlan {
    /// Planted first-choice probability of the expert of popularity rank `r` (rank 0 is the most popular):
    /// `p_r ∝ (r+1)^-expert_zipf`, summing to 1.
    pub target: Vec<f64>,
    /// Router logit offset of rank `r`, in units of the standard deviation of the token-specific part of a logit:
    /// with logits `offset_r + g_r` (`g` independent standard normals), rank `r` is the largest with probability
    /// `target[r]`.
    pub offsets: Vec<f64>,
    /// First-choice probabilities the offsets give under that model (equal to `target` within a relative 1e-6).
    pub model_freq: Vec<f64>,
    /// The correlation of one expert's token-specific logit between consecutive tokens that makes the
    /// first-choice expert repeat with probability `expert_repeat` (0 when that is at most the rate of independent
    /// tokens, `Σ target²` up to sampling).
    pub rho: f64,
    /// The repeat rate the Gaussian model gives with `rho` (Monte Carlo, [`REPEAT_SAMPLES`] token pairs).
    pub model_repeat: f64,
    /// Gain of each layer-0 shift head: head `i` adds `gains[i]` times the token `i+1` positions back's
    /// routed features (empty when `rho` is 0).
    pub gains: Vec<f64>,
}

/// Token pairs of the Monte Carlo estimate of the repeat rate.
pub const REPEAT_SAMPLES: usize = 8192;

impl RoutingPlan {
    /// The plan of `n_experts` experts with Zipf exponent `zipf` and planted repeat rate `repeat`, shift heads
    /// limited to `max_heads`.
    pub(crate) fn new(
        n_experts: usize,
        zipf: f64,
        repeat: f64,
        max_heads: usize,
        seed: u64,
    ) -> Result<RoutingPlan, SynthError> {
        let raw: Vec<f64> = (0..n_experts).map(|r| ((r + 1) as f64).powf(-zipf)).collect();
        let sum: f64 = raw.iter().sum();
        let target: Vec<f64> = raw.iter().map(|p| p / sum).collect();
        let (offsets, model_freq) = solve_offsets(&target);
        let mut rng = Rng::new(seed, "routing.repeat");
        let sample_seed = rng.next_u64();
        let rate = |rho: f64| repeat_rate(&offsets, rho, sample_seed);
        let independent = rate(0.0);
        let (rho, model_repeat) = if repeat <= independent {
            (0.0, independent)
        } else {
            if repeat >= rate(0.99) {
                return Err(SynthError::Config(format!(
                    "expert_repeat {repeat} is out of reach (a logit correlation of 0.99 gives {:.3})",
                    rate(0.99)
                )));
            }
            let (mut lo, mut hi) = (0.0f64, 0.99f64);
            for _ in 0..30 {
                let mid = 0.5 * (lo + hi);
                if rate(mid) < repeat {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let rho = 0.5 * (lo + hi);
            (rho, rate(rho))
        };
        let gains = shift_gains(rho, max_heads)?;
        Ok(RoutingPlan { target, offsets, model_freq, rho, model_repeat, gains })
    }

    /// The lag-1 correlation the gains give: the routed features of token `t` are `u_t + Σ_i gains[i] ·
    /// u_{t-i-1}` with independent isotropic `u`.
    pub fn gains_correlation(&self) -> f64 {
        correlation(&self.gains)
    }

    /// `1 + Σ gains²`: the variance of the routed features relative to an embedding's.
    pub fn feature_variance(&self) -> f64 {
        1.0 + self.gains.iter().map(|g| g * g).sum::<f64>()
    }
}

/// Lag-1 autocorrelation of `u_t + Σ_i c_i u_{t-i-1}`.
fn correlation(c: &[f64]) -> f64 {
    let taps: Vec<f64> = std::iter::once(1.0).chain(c.iter().copied()).collect();
    let var: f64 = taps.iter().map(|x| x * x).sum();
    let cov: f64 = taps.windows(2).map(|w| w[0] * w[1]).sum();
    cov / var
}

/// Gains of `K` shift heads (lags 1..=K, equal gains `a`) whose features have lag-1 correlation `rho`: the
/// smallest `K` with `K/(K+1) > rho` (the correlation of equal gains 1), then `a` in [0, 1] by bisection
/// (`(a + (K-1)a²) / (1 + K a²)` increases on [0, 1]).
fn shift_gains(rho: f64, max_heads: usize) -> Result<Vec<f64>, SynthError> {
    if rho <= 0.0 {
        return Ok(Vec::new());
    }
    let k = (1..=max_heads).find(|&k| k as f64 / (k + 1) as f64 > rho).ok_or_else(|| {
        SynthError::Config(format!(
            "a routing correlation of {rho:.3} needs more than {max_heads} shift heads"
        ))
    })?;
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if correlation(&vec![mid; k]) < rho {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(vec![0.5 * (lo + hi); k])
}

/// Offsets `o` (mean 0) such that `argmax_r (o_r + g_r)` with independent standard normal `g` is `r` with
/// probability `target[r]`, by the damped fixed-point iteration `o_r += ln(target_r / P_r(o)) / √(2 ln n)` (the
/// maximum of `n` normals sits near `√(2 ln n)`, where `P_r` grows about as `e^{√(2 ln n) o_r}`: an undamped step
/// overshoots and diverges for many experts), where `P_r(o) = ∫ φ(y -
/// o_r) Π_{j≠r} Φ(y - o_j) dy` is computed by the trapezoid rule on a grid of step 0.01 (the product over all
/// `j` once per grid point, then divided by rank `r`'s own factor, so an iteration costs O(experts x grid)).
/// Returns the offsets and the probabilities they give.
fn solve_offsets(target: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = target.len();
    let mut o = vec![0.0f64; n];
    let mut p = argmax_probabilities(&o);
    let step = 1.0 / (2.0 * (n.max(2) as f64).ln()).sqrt().max(1.0);
    for _ in 0..2000 {
        let worst = target.iter().zip(&p).map(|(t, p)| (p / t - 1.0).abs()).fold(0.0, f64::max);
        if worst < 1e-6 {
            break;
        }
        for ((o, t), p) in o.iter_mut().zip(target).zip(&p) {
            *o += step * (t / p).ln();
        }
        let mean = o.iter().sum::<f64>() / n as f64;
        o.iter_mut().for_each(|v| *v -= mean);
        p = argmax_probabilities(&o);
    }
    (o, p)
}

/// `P(argmax_r (o_r + g_r) = r)` for independent standard normal `g`.
pub(crate) fn argmax_probabilities(o: &[f64]) -> Vec<f64> {
    let (lo, hi) = o.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let h = 0.01;
    let n_grid = ((hi - lo + 18.0) / h).ceil() as usize + 1;
    let mut p = vec![0.0f64; o.len()];
    for i in 0..n_grid {
        let y = lo - 9.0 + i as f64 * h;
        let w = if i == 0 || i + 1 == n_grid { 0.5 * h } else { h };
        let log_all: f64 = o.iter().map(|&oj| ln_normal_cdf(y - oj)).sum();
        for (p, &or) in p.iter_mut().zip(o) {
            let z = y - or;
            let density = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
            *p += w * density * (log_all - ln_normal_cdf(z)).exp();
        }
    }
    p
}

/// How often `argmax(o + a) == argmax(o + rho·a + √(1-rho²)·b)` over [`REPEAT_SAMPLES`] draws of independent
/// standard normal vectors `a`, `b` (the same draws for every `rho`, from `seed`).
pub(crate) fn repeat_rate(o: &[f64], rho: f64, seed: u64) -> f64 {
    let mut rng = Rng::new(seed, "routing.samples");
    let n = o.len();
    let (mut a, mut b) = (vec![0.0f64; n], vec![0.0f64; n]);
    let s = (1.0 - rho * rho).sqrt();
    let mut same = 0usize;
    for _ in 0..REPEAT_SAMPLES {
        rng.fill_normal(&mut a);
        rng.fill_normal(&mut b);
        let first = argmax(o.iter().zip(&a).map(|(o, a)| o + a));
        let next = argmax(o.iter().zip(&a).zip(&b).map(|((o, a), b)| o + rho * a + s * b));
        same += (first == next) as usize;
    }
    same as f64 / REPEAT_SAMPLES as f64
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in v.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// `ln Φ(x)`, accurate in the far left tail (from the complementary error function of Numerical Recipes'
/// `erfcc`, fractional error below 1.2e-7 everywhere).
pub(crate) fn ln_normal_cdf(x: f64) -> f64 {
    // Φ(x) = erfc(-x/√2) / 2.
    let z = -x / std::f64::consts::SQRT_2;
    let za = z.abs();
    let t = 1.0 / (1.0 + 0.5 * za);
    let poly = -za * za - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    // erfc(za) = t · e^poly.
    if z >= 0.0 {
        std::f64::consts::LN_2.mul_add(-1.0, t.ln() + poly)
    } else {
        (1.0 - 0.5 * t * poly.exp()).ln()
    }
}

/// The RoPE frequency pairs a shift head uses and its peak score: the number `J` of highest-frequency pairs (of
/// the `head_dim / 2`, angle `base^(-2j/head_dim)` per position) whose mean `cos(m θ_j)` has the smallest maximum
/// over distances `m` in `1..n_ctx` off the peak, and that maximum. A head whose query and key put equal
/// amplitude on those pairs, the query rotated by `-L θ_j` from the key, scores `peak · mean_j cos((L - Δ)
/// θ_j)` at distance `Δ`: the largest at `Δ = L`, and at most `peak · max` elsewhere.
pub(crate) fn shift_pattern(head_dim: usize, base: f64, n_ctx: usize) -> (usize, f64) {
    let theta: Vec<f64> = (0..head_dim / 2).map(|j| base.powf(-2.0 * j as f64 / head_dim as f64)).collect();
    let mut best = (1, f64::INFINITY);
    for n_pairs in 2..=(head_dim / 4).max(2).min(theta.len()) {
        let th = &theta[..n_pairs];
        let worst = (1..n_ctx.max(2))
            .map(|m| th.iter().map(|t| (m as f64 * t).cos()).sum::<f64>() / n_pairs as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        if worst < best.1 {
            best = (n_pairs, worst);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_normal_cdf_matches_known_values() {
        for (x, want) in [(0.0, 0.5f64), (1.0, 0.841_344_746_068_543), (-3.0, 1.349_898_031_630_094_5e-3)] {
            let got = ln_normal_cdf(x).exp();
            assert!((got / want - 1.0).abs() < 1e-6, "Φ({x}) = {got}, not {want}");
        }
        // Far in the left tail, ln Φ(x) ≈ -x²/2 - ln(-x √(2π)).
        let x = -30.0f64;
        let approx = -x * x / 2.0 - (-x * (2.0 * std::f64::consts::PI).sqrt()).ln();
        assert!((ln_normal_cdf(x) - approx).abs() < 1e-2, "{}", ln_normal_cdf(x));
    }

    #[test]
    fn offsets_reproduce_the_targets_and_equal_offsets_are_uniform() {
        let p = argmax_probabilities(&[0.0; 8]);
        assert!(p.iter().all(|&v| (v - 0.125).abs() < 1e-7), "{p:?}");
        let plan = RoutingPlan::new(8, 0.5, 0.0, 4, 0).unwrap();
        for (t, m) in plan.target.iter().zip(&plan.model_freq) {
            assert!((t / m - 1.0).abs() < 1e-6, "{t} vs {m}");
        }
        assert!((plan.target[0] / plan.target[7] - 8f64.sqrt()).abs() < 1e-9);
        assert!(plan.offsets.windows(2).all(|w| w[0] > w[1]));
        assert!(plan.gains.is_empty());
        // Independent tokens repeat their first choice about Σp² of the time.
        let sum_sq: f64 = plan.target.iter().map(|p| p * p).sum();
        assert!((plan.model_repeat - sum_sq).abs() < 0.015, "{} vs {sum_sq}", plan.model_repeat);
    }

    #[test]
    fn repeat_rate_is_reached_with_shift_heads() {
        for (n, heads) in [(8, 1), (128, 3)] {
            let plan = RoutingPlan::new(n, 0.5, 0.25, 8, 0).unwrap();
            assert!((plan.model_repeat - 0.25).abs() < 0.01, "{n}: {}", plan.model_repeat);
            assert_eq!(plan.gains.len(), heads, "{n}: {:?}", plan.gains);
            assert!((plan.gains_correlation() - plan.rho).abs() < 1e-9);
        }
        let e = RoutingPlan::new(128, 0.5, 0.25, 2, 0).unwrap_err();
        assert!(matches!(e, SynthError::Config(_)), "{e}");
    }

    #[test]
    fn shift_pattern_peaks_alone() {
        let (n_pairs, worst) = shift_pattern(128, 10000.0, 4096);
        assert!(n_pairs >= 4 && worst < 0.85, "{n_pairs} pairs, worst {worst}");
    }
}
