//! Threshold sparsity (CATS, arXiv 2404.08763) for SiLU/GELU-gated models.

/// The threshold `t` such that a share `sparsity` of the sampled magnitudes `|act(gate · x)|` fall below it.
///
/// `samples` are magnitudes collected over a calibration corpus for one layer (any order; NaNs are ignored).
/// Returns 0 for an empty sample or `sparsity <= 0`, and the largest magnitude for `sparsity >= 1`.
pub fn calibrate_threshold(samples: &[f32], sparsity: f64) -> f32 {
    let mut v: Vec<f32> = samples.iter().map(|x| x.abs()).filter(|x| !x.is_nan()).collect();
    if v.is_empty() || sparsity <= 0.0 {
        return 0.0;
    }
    v.sort_unstable_by(f32::total_cmp);
    threshold_of_sorted(&v, sparsity)
}

/// [`calibrate_threshold`] of values already sorted in ascending order (and free of NaNs): 0 for none or
/// `sparsity <= 0`, else the k-th smallest value with k = round(sparsity * n) (the largest for
/// `sparsity >= 1`), so that exactly k values lie strictly below it when values are distinct.
pub fn threshold_of_sorted(sorted: &[f32], sparsity: f64) -> f32 {
    if sorted.is_empty() || sparsity <= 0.0 {
        return 0.0;
    }
    let k = ((sparsity * sorted.len() as f64).round() as usize).min(sorted.len() - 1);
    sorted[k]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantile_of_known_values() {
        let s: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(calibrate_threshold(&s, 0.5), 51.0);
        assert_eq!(calibrate_threshold(&s, 0.1), 11.0);
        assert_eq!(calibrate_threshold(&s, 0.0), 0.0);
        assert_eq!(calibrate_threshold(&s, 1.0), 100.0);
        // Signs do not matter: magnitudes are what is compared.
        let neg: Vec<f32> = s.iter().map(|x| -x).collect();
        assert_eq!(calibrate_threshold(&neg, 0.5), 51.0);
        assert_eq!(calibrate_threshold(&[], 0.5), 0.0);
    }

    proptest! {
        #[test]
        fn achieved_sparsity_matches_target(
            xs in prop::collection::vec(-100.0f32..100.0, 10..500),
            target in 0.05f64..0.95,
        ) {
            let t = calibrate_threshold(&xs, target);
            let below = xs.iter().filter(|x| x.abs() < t).count() as f64 / xs.len() as f64;
            // With ties the share below can only be smaller; it never exceeds the target by more than 1/n.
            prop_assert!(below <= target + 1.0 / xs.len() as f64 + 1e-9, "below {below} target {target}");
            let at_or_below = xs.iter().filter(|x| x.abs() <= t).count() as f64 / xs.len() as f64;
            prop_assert!(at_or_below + 1.0 / xs.len() as f64 >= target - 1e-9);
        }
    }
}
