//! [`ActivationProfile`]: what a dense run over a calibration text records about each FFN layer.

use crate::threshold::calibrate_threshold;

/// Per-layer statistics of FFN activations `act(gate · x)` over a calibration run.
///
/// For each layer it keeps a uniform random sample of activation magnitudes (reservoir sampling with a fixed
/// seed, bounded at `max_samples` values, so memory does not grow with the corpus) and, per neuron, how many
/// tokens gave it a positive gate pre-activation (its firing count for ReLU-family models).
#[derive(Clone, Debug)]
pub struct ActivationProfile {
    n_ff: usize,
    max_samples: usize,
    layers: Vec<LayerProfile>,
    n_tokens: u64,
    rng: u64,
}

#[derive(Clone, Debug, Default)]
struct LayerProfile {
    samples: Vec<f32>,
    seen: u64,
    positive: Vec<u32>,
}

impl ActivationProfile {
    /// An empty profile of `n_layers` layers of `n_ff` neurons, keeping at most `max_samples` magnitudes per
    /// layer.
    pub fn new(n_layers: usize, n_ff: usize, max_samples: usize) -> ActivationProfile {
        let layers = (0..n_layers)
            .map(|_| LayerProfile { samples: Vec::new(), seen: 0, positive: vec![0; n_ff] })
            .collect();
        ActivationProfile {
            n_ff,
            max_samples: max_samples.max(1),
            layers,
            n_tokens: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Neurons per layer.
    pub fn n_ff(&self) -> usize {
        self.n_ff
    }

    /// Tokens recorded (counted on layer 0).
    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Records one layer's activations for a batch: `pre` holds gate pre-activations (`tokens x n_ff`), and
    /// `act` maps a pre-activation to the activation whose magnitude is sampled (SiLU, GELU, ReLU ...).
    pub fn record(&mut self, layer: usize, pre: &[f32], act: &dyn Fn(f32) -> f32) {
        assert!(pre.len() % self.n_ff == 0, "profile: {} values are not rows of {}", pre.len(), self.n_ff);
        if layer == 0 {
            self.n_tokens += (pre.len() / self.n_ff) as u64;
        }
        let max = self.max_samples;
        let lp = &mut self.layers[layer];
        for row in pre.chunks_exact(self.n_ff) {
            for (count, &g) in lp.positive.iter_mut().zip(row) {
                *count += u32::from(g > 0.0);
            }
            for &g in row {
                let a = act(g).abs();
                lp.seen += 1;
                if lp.samples.len() < max {
                    lp.samples.push(a);
                } else {
                    // Reservoir sampling: keep each new value with probability max / seen.
                    self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = self.rng;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    let j = (z ^ (z >> 31)) % lp.seen;
                    if (j as usize) < max {
                        lp.samples[j as usize] = a;
                    }
                }
            }
        }
    }

    /// The sampled activation magnitudes of a layer.
    pub fn samples(&self, layer: usize) -> &[f32] {
        &self.layers[layer].samples
    }

    /// How often each neuron of a layer had a positive gate pre-activation, as a share of tokens.
    pub fn firing_frequency(&self, layer: usize) -> Vec<f64> {
        let n = self.n_tokens.max(1) as f64;
        self.layers[layer].positive.iter().map(|&c| c as f64 / n).collect()
    }

    /// Per-layer CATS thresholds for a target `sparsity`, with the sparsity each achieves on the samples.
    pub fn thresholds(&self, sparsity: f64) -> Vec<(f32, f64)> {
        self.layers
            .iter()
            .map(|lp| {
                let t = calibrate_threshold(&lp.samples, sparsity);
                let below =
                    lp.samples.iter().filter(|&&a| a < t).count() as f64 / lp.samples.len().max(1) as f64;
                (t, below)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_firing_and_bounds_samples() {
        let mut p = ActivationProfile::new(2, 3, 10);
        // 8 tokens: neuron 0 always positive, neuron 1 never, neuron 2 every other token.
        for t in 0..8 {
            let row = [1.0 + t as f32, -1.0, if t % 2 == 0 { 0.5 } else { -0.5 }];
            p.record(0, &row, &|x| x);
            p.record(1, &row, &|x| x.max(0.0));
        }
        assert_eq!(p.n_tokens(), 8);
        assert_eq!(p.firing_frequency(0), vec![1.0, 0.0, 0.5]);
        assert_eq!(p.samples(0).len(), 10, "reservoir is bounded");
        // Layer 1 recorded relu magnitudes: 2/3 of all values are 0 or positive-half.
        let th = p.thresholds(0.5);
        assert_eq!(th.len(), 2);
        for (t, achieved) in th {
            assert!(t >= 0.0 && (0.0..=1.0).contains(&achieved));
        }
    }

    #[test]
    fn reservoir_is_a_fair_sample() {
        // Values 0..100000 recorded once each into a reservoir of 5000: the sample's mean is near the mean.
        let mut p = ActivationProfile::new(1, 100, 5000);
        let pre: Vec<f32> = (0..100_000).map(|i| i as f32).collect();
        p.record(0, &pre, &|x| x);
        let s = p.samples(0);
        let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
        assert!((mean - 50_000.0).abs() < 2_000.0, "sample mean {mean}");
        // The 50% threshold splits the population near its median.
        let (t, _) = p.thresholds(0.5)[0];
        assert!((t - 50_000.0).abs() < 3_000.0, "median estimate {t}");
    }
}
