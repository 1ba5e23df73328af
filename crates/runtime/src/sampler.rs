//! Token sampling: greedy, or llama.cpp's chain (repetition penalty, top-k, top-p, min-p, temperature) with a
//! seeded random draw.

/// Sampling settings. Defaults are llama.cpp's.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// Temperature; `0` or below means greedy (argmax, ties to the lower id).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0` keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; `1` keeps all.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's; `0` keeps all.
    pub min_p: f32,
    /// Penalty for tokens seen in the last `repeat_last_n` tokens; `1` disables it.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random draw.
    pub seed: u64,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerParams {
    /// Greedy decoding.
    pub fn greedy() -> SamplerParams {
        SamplerParams { temperature: 0.0, ..SamplerParams::default() }
    }
}

/// A sampler: settings, random state, and reusable candidate storage.
#[derive(Debug)]
pub struct Sampler {
    params: SamplerParams,
    rng: SplitMix64,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler with the given settings.
    pub fn new(params: SamplerParams) -> Sampler {
        let rng = SplitMix64(params.seed);
        Sampler { params, rng, candidates: Vec::new() }
    }

    /// The settings.
    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens so far (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let penalize = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let penalized = |id: u32, l: f32| {
            if penalize && recent.contains(&id) {
                if l <= 0.0 { l * p.repeat_penalty } else { l / p.repeat_penalty }
            } else {
                l
            }
        };
        if p.temperature <= 0.0 {
            return argmax(logits.iter().enumerate().map(|(i, &l)| penalized(i as u32, l)));
        }

        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, penalized(i as u32, l))));
        // Sort by logit, descending, ties to the lower id. With top-k, only the first k need ordering.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_logit);
            cands.truncate(p.top_k);
        }
        cands.sort_unstable_by(by_logit);

        // Softmax over the survivors.
        let softmax = |cands: &mut Vec<(u32, f32)>, temp: f32| -> Vec<f32> {
            let max = cands[0].1;
            let mut probs: Vec<f32> = cands.iter().map(|&(_, l)| ((l - max) / temp).exp()).collect();
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= sum);
            probs
        };
        // top-p and min-p act on probabilities at temperature 1, as in llama.cpp's default chain.
        let probs = softmax(cands, 1.0);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, &q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take(cands.len()).take_while(|&&q| q >= floor).count();
            cands.truncate(keep.max(1));
        }
        let probs = softmax(cands, p.temperature);
        let r = self.rng.next_f32();
        let mut cum = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            cum += q;
            if r < cum {
                return cands[i].0;
            }
        }
        cands[cands.len() - 1].0
    }
}

/// Index of the largest value, ties to the lower index.
pub fn argmax(values: impl Iterator<Item = f32>) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best.0
}

/// A small, fast, seedable generator (SplitMix64); sampling needs reproducibility, not cryptography.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_lower_id_on_ties() {
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]), 1);
        assert_eq!(s.sample(&[5.0, 3.0], &[]), 0);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let params = SamplerParams { repeat_penalty: 2.0, ..SamplerParams::greedy() };
        let mut s = Sampler::new(params);
        // Token 0 (logit 3) is penalized to 1.5, below token 1's 2.0.
        assert_eq!(s.sample(&[3.0, 2.0, -1.0], &[0]), 1);
        // A negative logit is multiplied, so it drops further.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let params = SamplerParams { top_k: 1, temperature: 5.0, ..SamplerParams::default() };
        let mut s = Sampler::new(params);
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.9, 0.95], &[]), 1);
        }
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        // p(0) ~ 0.98; with min_p 0.5 only token 0 survives.
        let params =
            SamplerParams { min_p: 0.5, top_k: 0, top_p: 1.0, temperature: 1.0, ..SamplerParams::default() };
        let mut s = Sampler::new(params);
        for _ in 0..200 {
            assert_eq!(s.sample(&[5.0, 1.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // Probabilities ~ [0.665, 0.245, 0.09]: top_p 0.8 keeps tokens 0 and 1, never 2.
        let params =
            SamplerParams { top_p: 0.8, top_k: 0, min_p: 0.0, temperature: 1.0, ..SamplerParams::default() };
        let mut s = Sampler::new(params);
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&[2.0, 1.0, 0.0], &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > seen[1] && seen[1] > 300, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let params = SamplerParams {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let mut s = Sampler::new(params.clone());
        let draws: Vec<u32> = (0..4000).map(|_| s.sample(&logits, &[])).collect();
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "share of token 1: {ones}");
        let mut again = Sampler::new(params);
        let replay: Vec<u32> = (0..4000).map(|_| again.sample(&logits, &[])).collect();
        assert_eq!(draws, replay, "same seed must give the same draws");
    }
}
