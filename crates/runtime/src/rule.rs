//! [`FfnRule`]: which FFN neurons of a SiLU- or GELU-gated model a token uses. One rule, one place: every
//! FFN path (dense GGUF, packed in memory, offloaded) gets its per-neuron thresholds from
//! [`FfnRule::neuron_thresholds`].
//!
//! A neuron's *weighted score* is its activation magnitude (`|act(g_i)|`, [`crate::FfnActivation::score`])
//! times its scale `c_i`; the neuron takes part when the weighted score reaches the layer's threshold `t_l`.
//! Without scales (`c_i = 1`) this is CATS. With scales calibrated offline (for example `c_i` = RMS of the
//! neuron's up value times the norm of its down column: the expected size of what the neuron adds to the
//! output per unit of activation, in the spirit of WINA) the rule keeps the neurons that matter most and
//! still needs nothing but the gate row before the neuron's up and down weights are read. The comparison is
//! evaluated as `|act(g_i)| >= t_l / c_i`: the per-neuron threshold is computed once, in f32, here.

use crate::error::RuntimeError;

/// Per-layer thresholds and optional per-neuron scales (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct FfnRule {
    /// Per layer, the threshold `t_l` weighted scores are compared with (finite, >= 0).
    pub thresholds: Vec<f32>,
    /// Per layer and neuron, in the source GGUF's neuron order, the scale `c_i` (finite, > 0). `None`: every
    /// scale is 1 (CATS).
    pub scales: Option<Vec<Vec<f32>>>,
}

impl FfnRule {
    /// CATS: per-layer thresholds on the activation magnitude.
    pub fn cats(thresholds: Vec<f32>) -> FfnRule {
        FfnRule { thresholds, scales: None }
    }

    /// Checks the rule against a model of `n_layers` layers of `n_ff` neurons.
    pub fn check(&self, n_layers: usize, n_ff: usize) -> Result<(), RuntimeError> {
        let t = &self.thresholds;
        if t.len() != n_layers || t.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(RuntimeError::BadThresholds { got: t.len(), n_layers });
        }
        if let Some(s) = &self.scales {
            if s.len() != n_layers {
                return Err(RuntimeError::BadScales {
                    why: format!("{} layers, the model has {n_layers}", s.len()),
                });
            }
            for (l, s) in s.iter().enumerate() {
                if s.len() != n_ff {
                    return Err(RuntimeError::BadScales {
                        why: format!("layer {l}: {} neurons, the model has {n_ff}", s.len()),
                    });
                }
                if let Some(i) = s.iter().position(|c| !(c.is_finite() && *c > 0.0)) {
                    return Err(RuntimeError::BadScales {
                        why: format!("layer {l} neuron {i}: {} is not finite and positive", s[i]),
                    });
                }
            }
        }
        Ok(())
    }

    /// Layer `l`'s per-neuron thresholds `t_l / c_i`, in the order `order` gives (position `p` holds neuron
    /// `order[p]`; `None`: the GGUF's order), or `None` when the rule has no scales (the layer's threshold
    /// applies to every neuron).
    pub fn neuron_thresholds(&self, l: usize, order: Option<&[u32]>) -> Option<Vec<f32>> {
        let s = &self.scales.as_ref()?[l];
        let t = self.thresholds[l];
        let at = |i: usize| if t == 0.0 { 0.0 } else { t / s[i] };
        Some(match order {
            Some(o) => o.iter().map(|&i| at(i as usize)).collect(),
            None => (0..s.len()).map(at).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neuron_thresholds_divide_by_the_scale_in_the_given_order() {
        let r =
            FfnRule { thresholds: vec![0.5, 0.0], scales: Some(vec![vec![1.0, 2.0, 0.25], vec![3.0; 3]]) };
        r.check(2, 3).unwrap();
        assert_eq!(r.neuron_thresholds(0, None).unwrap(), vec![0.5, 0.25, 2.0]);
        assert_eq!(r.neuron_thresholds(0, Some(&[2, 0, 1])).unwrap(), vec![2.0, 0.5, 0.25]);
        assert_eq!(r.neuron_thresholds(1, None).unwrap(), vec![0.0; 3], "threshold 0 keeps every neuron");
        assert_eq!(FfnRule::cats(vec![0.5, 0.5]).neuron_thresholds(0, None), None);
    }

    #[test]
    fn bad_rules_are_refused() {
        let ok = FfnRule { thresholds: vec![0.5], scales: Some(vec![vec![1.0, 2.0]]) };
        assert!(ok.check(1, 2).is_ok());
        assert!(ok.check(2, 2).is_err());
        assert!(ok.check(1, 3).is_err());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let r = FfnRule { scales: Some(vec![vec![1.0, bad]]), ..ok.clone() };
            assert!(r.check(1, 2).unwrap_err().to_string().contains("neuron 1"), "{bad}");
        }
        assert!(FfnRule::cats(vec![-0.1]).check(1, 2).is_err());
    }
}
