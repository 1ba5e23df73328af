//! Scoring predicted active sets against true ones.

/// Confusion counts of predicted versus true activations, accumulated over many tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    pub true_pos: u64,
    pub false_pos: u64,
    pub false_neg: u64,
    pub true_neg: u64,
}

impl Metrics {
    /// Adds one token's prediction (`predicted[i]`) against the truth (`actual[i]`).
    pub fn add(&mut self, predicted: &[bool], actual: &[bool]) {
        assert_eq!(predicted.len(), actual.len(), "metrics: mask lengths differ");
        for (&p, &a) in predicted.iter().zip(actual) {
            match (p, a) {
                (true, true) => self.true_pos += 1,
                (true, false) => self.false_pos += 1,
                (false, true) => self.false_neg += 1,
                (false, false) => self.true_neg += 1,
            }
        }
    }

    /// Share of truly active neurons that were predicted (1 when nothing was active).
    pub fn recall(&self) -> f64 {
        let pos = self.true_pos + self.false_neg;
        if pos == 0 { 1.0 } else { self.true_pos as f64 / pos as f64 }
    }

    /// Share of predicted neurons that were truly active (1 when nothing was predicted).
    pub fn precision(&self) -> f64 {
        let pred = self.true_pos + self.false_pos;
        if pred == 0 { 1.0 } else { self.true_pos as f64 / pred as f64 }
    }

    /// Share of neurons predicted active.
    pub fn predicted_density(&self) -> f64 {
        (self.true_pos + self.false_pos) as f64 / self.total().max(1) as f64
    }

    /// Share of neurons truly active.
    pub fn true_density(&self) -> f64 {
        (self.true_pos + self.false_neg) as f64 / self.total().max(1) as f64
    }

    fn total(&self) -> u64 {
        self.true_pos + self.false_pos + self.false_neg + self.true_neg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_ratios() {
        let mut m = Metrics::default();
        m.add(&[true, true, false, false], &[true, false, true, false]);
        m.add(&[true, false, false, false], &[true, false, false, false]);
        assert_eq!(m, Metrics { true_pos: 2, false_pos: 1, false_neg: 1, true_neg: 4 });
        assert!((m.recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.precision() - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.predicted_density() - 3.0 / 8.0).abs() < 1e-12);
        assert!((m.true_density() - 3.0 / 8.0).abs() < 1e-12);
        assert_eq!(Metrics::default().recall(), 1.0);
    }
}
