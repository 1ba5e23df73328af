//! [`ActivationProfile`]: what a dense run over a calibration text records about each FFN layer, and its
//! versioned file format.

use std::io::{Read, Write};

use half::f16;

use crate::PredictorError;
use crate::threshold::calibrate_threshold;

/// Magic bytes of a profile file.
pub const PROFILE_MAGIC: [u8; 8] = *b"PINIONPF";
/// The profile file version written, and the only one read.
pub const PROFILE_VERSION: u32 = 3;

/// Upper bounds on a profile file's dimensions, so a corrupt file cannot ask for absurd allocations.
const MAX_LAYERS: u32 = 1024;
const MAX_WIDTH: u32 = 1 << 20;
const MAX_SAMPLES: u32 = 1 << 24;

/// Per-layer statistics of FFN activations over a calibration run.
///
/// Every recorded value is a neuron's *score*: the activation magnitude a sparsity threshold is compared with
/// (`|silu(g)|` for SwiGLU, `relu(g)` for ReGLU, `relu(min(g, u))` for dReLU; the runtime computes it). For each
/// layer the profile keeps:
///
/// * a uniform random sample of scores (reservoir sampling with a fixed seed, at most `max_samples`), from
///   which CATS thresholds are calibrated;
/// * per neuron, how many tokens gave it a positive score (its firing count, meaningful for ReLU-family
///   models, where a score of 0 means "off");
/// * optionally, *token samples* for predictor training: for up to `max_tokens` tokens chosen uniformly at
///   random (the same tokens in every layer), the FFN input `x` and every neuron's score, both stored as f16.
///   From them, [`ActivationProfile::sample_masks`] gives the (x, active-mask) pairs for any threshold.
///
/// Memory is bounded by the caps, not by the corpus length.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationProfile {
    n_ff: usize,
    d_in: usize,
    max_samples: usize,
    max_tokens: usize,
    layers: Vec<LayerProfile>,
    n_tokens: u64,
    /// The random stream that chooses token samples on layer 0 (each layer has its own for its scores), so that
    /// what a layer keeps does not depend on the order layers and batches are recorded in.
    rng: u64,
    /// Token samples: tokens seen so far (on layer 0), and where each of them is stored (`None`: not kept), for
    /// the later layers to store the same tokens whenever they record them.
    tokens_seen: u64,
    n_token_samples: usize,
    slots: Vec<Option<u32>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct LayerProfile {
    samples: Vec<f32>,
    seen: u64,
    positive: Vec<u32>,
    /// `n_token_samples x d_in`, f16.
    x: Vec<f16>,
    /// `n_token_samples x n_ff`, f16.
    scores: Vec<f16>,
    /// Per neuron, the sum of its squared up values over `up_tokens` tokens (empty before any is recorded).
    up_sq: Vec<f64>,
    up_tokens: u64,
    /// Tokens offered to this unit's own reservoir of token samples ([`ActivationProfile::record_unit_scores`]).
    offered: u64,
    /// This layer's own random stream (reservoirs of scores and of its own token samples).
    rng: u64,
}

/// The start of every random stream of a profile: layer `l`'s is `RNG_SEED + l + 1`, scrambled.
const RNG_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The `l`-th random stream's state before its first draw.
fn stream(l: usize) -> u64 {
    split_mix(RNG_SEED.wrapping_add(l as u64 + 1))
}

/// One step of SplitMix64: advances `state` and returns the next value.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    split_mix(*state)
}

/// Where a reservoir of at most `max` token samples, holding `held` and offered `seen` tokens so far, keeps the
/// next one: the next free row while it is not full, else a uniformly random row with probability
/// `max / (seen + 1)`, else nowhere.
fn reservoir_slot(rng: &mut u64, max: usize, held: usize, seen: u64) -> Option<usize> {
    if held < max {
        return Some(held);
    }
    let j = next_random(rng) % (seen + 1);
    (j < max as u64).then_some(j as usize)
}

fn split_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ActivationProfile {
    /// An empty profile of `n_layers` layers of `n_ff` neurons, keeping at most `max_samples` scores per layer
    /// and no token samples.
    pub fn new(n_layers: usize, n_ff: usize, max_samples: usize) -> ActivationProfile {
        let layers = (0..n_layers)
            .map(|l| LayerProfile { positive: vec![0; n_ff], rng: stream(l), ..LayerProfile::default() })
            .collect();
        ActivationProfile {
            n_ff,
            d_in: 0,
            max_samples: max_samples.max(1),
            max_tokens: 0,
            layers,
            n_tokens: 0,
            rng: RNG_SEED,
            tokens_seen: 0,
            n_token_samples: 0,
            slots: Vec::new(),
        }
    }

    /// Also keeps up to `max_tokens` token samples of the FFN input (width `d_in`) and all scores.
    pub fn with_token_samples(mut self, d_in: usize, max_tokens: usize) -> ActivationProfile {
        self.d_in = d_in;
        self.max_tokens = if d_in == 0 { 0 } else { max_tokens };
        self
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Neurons per layer.
    pub fn n_ff(&self) -> usize {
        self.n_ff
    }

    /// Width of the sampled FFN inputs (0 without token samples).
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Tokens recorded (counted on layer 0).
    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Token samples held: the same tokens in every layer, or, for a profile of FFN units recorded with
    /// [`ActivationProfile::record_unit_scores`], the most any unit holds (each its own tokens:
    /// [`ActivationProfile::layer_token_samples`]).
    pub fn n_token_samples(&self) -> usize {
        self.n_token_samples
    }

    /// Token samples layer (or unit) `layer` holds.
    pub fn layer_token_samples(&self, layer: usize) -> usize {
        self.layers[layer].scores.len() / self.n_ff.max(1)
    }

    /// Records one layer's scores for a batch of tokens: `scores` is `tokens x n_ff`, and `x` the FFN inputs
    /// (`tokens x d_in`; ignored, and may be empty, without token samples). Each layer records the batches in
    /// the same order, and layer 0 records a batch before any other layer does (it decides which of its tokens
    /// are sampled); the layers may take turns in any other order: batch by batch through all layers, or every
    /// batch through layer 0, then through layer 1, ... record the same profile.
    ///
    /// # Panics
    /// If the slices are not whole rows, or a layer after 0 records tokens layer 0 has not.
    pub fn record_scores(&mut self, layer: usize, x: &[f32], scores: &[f32]) {
        let n = self.score_rows(scores);
        // Where this batch starts among the tokens: the tokens the layer recorded before it.
        let first = self.layer_tokens(layer) as usize;
        if layer == 0 {
            self.n_tokens += n as u64;
            if self.max_tokens > 0 {
                for _ in 0..n {
                    let (held, seen) = (self.n_token_samples, self.tokens_seen);
                    let slot = reservoir_slot(&mut self.rng, self.max_tokens, held, seen);
                    if slot == Some(held) {
                        self.n_token_samples += 1;
                    }
                    self.tokens_seen += 1;
                    self.slots.push(slot.map(|s| s as u32));
                }
            }
        }
        if self.max_tokens > 0 {
            assert!(first + n <= self.slots.len(), "profile: layer {layer} records tokens layer 0 has not");
            assert_eq!(x.len(), n * self.d_in, "profile: inputs are not {n} rows of {}", self.d_in);
        }
        let (max, n_ff, d_in) = (self.max_samples, self.n_ff, self.d_in);
        for (t, row) in scores.chunks_exact(n_ff).enumerate() {
            if let Some(slot) = self.slots.get(first + t).copied().flatten() {
                self.store_sample(layer, slot as usize, &x[t * d_in..(t + 1) * d_in], row);
            }
            self.record_row(layer, row, max);
        }
    }

    /// Tokens in `scores`, rows of `n_ff`.
    ///
    /// # Panics
    /// If `scores` is not whole rows.
    fn score_rows(&self, scores: &[f32]) -> usize {
        assert!(
            scores.len() % self.n_ff == 0,
            "profile: {} scores are not rows of {}",
            scores.len(),
            self.n_ff
        );
        scores.len() / self.n_ff
    }

    /// Stores one token sample (`x` and its `scores`, as f16) in row `slot` of a layer's samples: appended when
    /// `slot` is the next row, else over the row there.
    fn store_sample(&mut self, layer: usize, slot: usize, x: &[f32], scores: &[f32]) {
        let (n_ff, d_in) = (self.n_ff, self.d_in);
        let lp = &mut self.layers[layer];
        let xs = x.iter().map(|&v| f16::from_f32(v));
        let ss = scores.iter().map(|&v| f16::from_f32(v));
        if slot * n_ff == lp.scores.len() {
            lp.x.extend(xs);
            lp.scores.extend(ss);
        } else {
            lp.x[slot * d_in..(slot + 1) * d_in].iter_mut().zip(xs).for_each(|(d, v)| *d = v);
            lp.scores[slot * n_ff..(slot + 1) * n_ff].iter_mut().zip(ss).for_each(|(d, v)| *d = v);
        }
    }

    /// Counts one token's scores of a layer: firing counts and the reservoir of scores.
    fn record_row(&mut self, layer: usize, row: &[f32], max: usize) {
        for (count, &s) in self.layers[layer].positive.iter_mut().zip(row) {
            *count += u32::from(s > 0.0);
        }
        for &a in row {
            self.layers[layer].seen += 1;
            let seen = self.layers[layer].seen;
            if self.layers[layer].samples.len() < max {
                self.layers[layer].samples.push(a);
            } else {
                // Reservoir sampling: keep each new value with probability max / seen.
                let j = next_random(&mut self.layers[layer].rng) % seen;
                if (j as usize) < max {
                    self.layers[layer].samples[j as usize] = a;
                }
            }
        }
    }

    /// Records the scores (`tokens x n_ff`) and FFN inputs (`tokens x d_in`; ignored without token samples) of
    /// the tokens a mixture of experts routed to FFN unit `unit` (one expert of a layer; the profile's "layers"
    /// are then units). Unlike [`ActivationProfile::record_scores`] it counts no tokens (the pass counts them
    /// once with [`ActivationProfile::add_tokens`]), so that a neuron's firing frequency is the share of all
    /// tokens that were routed to its expert and fired it; and each unit keeps its own uniform sample of the
    /// tokens routed to it (at most the profile's cap), which predictors of the expert are trained on.
    ///
    /// # Panics
    /// If the slices are not whole rows.
    pub fn record_unit_scores(&mut self, unit: usize, x: &[f32], scores: &[f32]) {
        let (n, n_ff, d_in) = (self.score_rows(scores), self.n_ff, self.d_in);
        if self.max_tokens > 0 {
            assert_eq!(x.len(), n * d_in, "profile: inputs are not {n} rows of {d_in}");
        }
        let max = self.max_samples;
        for (t, row) in scores.chunks_exact(n_ff).enumerate() {
            if self.max_tokens > 0 {
                let (held, max_tokens) = (self.layer_token_samples(unit), self.max_tokens);
                let lp = &mut self.layers[unit];
                let slot = reservoir_slot(&mut lp.rng, max_tokens, held, lp.offered);
                lp.offered += 1;
                if let Some(slot) = slot {
                    self.store_sample(unit, slot, &x[t * d_in..(t + 1) * d_in], row);
                    self.n_token_samples = self.n_token_samples.max(self.layer_token_samples(unit));
                }
            }
            self.record_row(unit, row, max);
        }
    }

    /// Counts `n` tokens profiled (for profiles recorded with [`ActivationProfile::record_unit_scores`]).
    pub fn add_tokens(&mut self, n: usize) {
        self.n_tokens += n as u64;
    }

    /// Tokens whose scores layer (or unit) `layer` recorded: for an expert, the tokens routed to it.
    pub fn layer_tokens(&self, layer: usize) -> u64 {
        self.layers[layer].seen / self.n_ff.max(1) as u64
    }

    /// The share of all tokens layer (or unit) `layer` recorded: 1 for a layer, an expert's routing share.
    pub fn token_share(&self, layer: usize) -> f64 {
        self.layer_tokens(layer) as f64 / self.n_tokens.max(1) as f64
    }

    /// Records one layer's up values (`tokens x n_ff`) for the neurons' RMS ([`ActivationProfile::up_rms`]).
    ///
    /// # Panics
    /// If `up` is not whole rows of `n_ff`.
    pub fn record_up(&mut self, layer: usize, up: &[f32]) {
        assert!(up.len() % self.n_ff == 0, "profile: up values are not rows of {}", self.n_ff);
        let lp = &mut self.layers[layer];
        lp.up_sq.resize(self.n_ff, 0.0);
        for row in up.chunks_exact(self.n_ff) {
            for (acc, &u) in lp.up_sq.iter_mut().zip(row) {
                *acc += f64::from(u) * f64::from(u);
            }
            lp.up_tokens += 1;
        }
    }

    /// Per neuron of a layer, the root mean square of its up value over the recorded tokens, or `None` if no
    /// up values were recorded.
    pub fn up_rms(&self, layer: usize) -> Option<Vec<f64>> {
        let lp = &self.layers[layer];
        (lp.up_tokens > 0).then(|| lp.up_sq.iter().map(|&s| (s / lp.up_tokens as f64).sqrt()).collect())
    }

    /// Records one layer's gate pre-activations `pre` (`tokens x n_ff`), scoring each with `act` (its
    /// magnitude is the score), without token samples.
    pub fn record(&mut self, layer: usize, pre: &[f32], act: &dyn Fn(f32) -> f32) {
        let scores: Vec<f32> = pre.iter().map(|&g| act(g).abs()).collect();
        self.record_scores(layer, &[], &scores);
    }

    /// The sampled scores of a layer.
    pub fn samples(&self, layer: usize) -> &[f32] {
        &self.layers[layer].samples
    }

    /// How often each neuron of a layer had a positive score, as a share of tokens.
    pub fn firing_frequency(&self, layer: usize) -> Vec<f64> {
        let n = self.n_tokens.max(1) as f64;
        self.layers[layer].positive.iter().map(|&c| c as f64 / n).collect()
    }

    /// The sampled FFN inputs of a layer, `n_token_samples x d_in`, as f32.
    pub fn sample_inputs(&self, layer: usize) -> Vec<f32> {
        self.layers[layer].x.iter().map(|v| v.to_f32()).collect()
    }

    /// The sampled scores of a layer, `n_token_samples x n_ff`.
    pub fn sample_scores(&self, layer: usize) -> &[f16] {
        &self.layers[layer].scores
    }

    /// The active masks of a layer's token samples under thresholds `t` (one for every neuron, or one per
    /// neuron): row `r` (a token), bit `i` (a neuron) is set when `active(score, t_i)`. Rows are
    /// `n_ff.div_ceil(64)` words.
    ///
    /// # Panics
    /// If `t` has neither 1 nor `n_ff` values.
    pub fn sample_masks(&self, layer: usize, t: &[f32], active: impl Fn(f32, f32) -> bool) -> Vec<u64> {
        let t = self.per_neuron(t);
        let words = self.n_ff.div_ceil(64);
        let mut out = vec![0u64; self.layer_token_samples(layer) * words];
        for (r, row) in self.layers[layer].scores.chunks_exact(self.n_ff).enumerate() {
            for (i, s) in row.iter().enumerate() {
                if active(s.to_f32(), t(i)) {
                    out[r * words + i / 64] |= 1 << (i % 64);
                }
            }
        }
        out
    }

    /// How often each neuron of a layer is active under thresholds `t` (as [`ActivationProfile::sample_masks`]),
    /// on the token samples.
    ///
    /// # Panics
    /// If `t` has neither 1 nor `n_ff` values.
    pub fn sample_frequency(&self, layer: usize, t: &[f32], active: impl Fn(f32, f32) -> bool) -> Vec<f64> {
        let t = self.per_neuron(t);
        let mut count = vec![0u32; self.n_ff];
        for row in self.layers[layer].scores.chunks_exact(self.n_ff) {
            for (i, (c, s)) in count.iter_mut().zip(row).enumerate() {
                *c += u32::from(active(s.to_f32(), t(i)));
            }
        }
        let n = self.layer_token_samples(layer).max(1) as f64;
        count.iter().map(|&c| c as f64 / n).collect()
    }

    /// Neuron `i`'s threshold of `t`: one for all, or one per neuron.
    fn per_neuron<'t>(&self, t: &'t [f32]) -> impl Fn(usize) -> f32 + 't {
        assert!(t.len() == 1 || t.len() == self.n_ff, "{} thresholds for {} neurons", t.len(), self.n_ff);
        move |i| t[if t.len() == 1 { 0 } else { i }]
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

    /// Writes the profile in the versioned binary format documented in docs/format.md ("Activation profile"):
    /// a header, then per layer its score samples, firing counts and token samples, then a CRC-32 of all
    /// preceding bytes.
    pub fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut w = CrcWriter { inner: w, crc: crc32fast::Hasher::new() };
        w.put(&PROFILE_MAGIC)?;
        w.put(&PROFILE_VERSION.to_le_bytes())?;
        for v in
            [self.layers.len(), self.n_ff, self.d_in, self.n_token_samples, self.max_samples, self.max_tokens]
        {
            w.put(&(v as u32).to_le_bytes())?;
        }
        w.put(&self.n_tokens.to_le_bytes())?;
        for lp in &self.layers {
            w.put(&(lp.samples.len() as u32).to_le_bytes())?;
            w.put(&lp.seen.to_le_bytes())?;
            w.put(bytemuck::cast_slice(&lp.samples))?;
            w.put(bytemuck::cast_slice(&lp.positive))?;
            w.put(&((lp.scores.len() / self.n_ff.max(1)) as u32).to_le_bytes())?;
            w.put(bytemuck::cast_slice(&lp.x))?;
            w.put(bytemuck::cast_slice(&lp.scores))?;
            w.put(&lp.up_tokens.to_le_bytes())?;
            if lp.up_tokens > 0 {
                w.put(bytemuck::cast_slice(&lp.up_sq))?;
            }
        }
        let crc = w.crc.clone().finalize();
        w.inner.write_all(&crc.to_le_bytes())
    }

    /// Reads a profile written by [`ActivationProfile::write_to`]. Every size is checked against its cap before
    /// anything is allocated; a wrong magic, version or checksum, or a short file, is a typed error.
    pub fn read_from(r: &mut dyn Read) -> Result<ActivationProfile, PredictorError> {
        let mut r = CrcReader { inner: r, crc: crc32fast::Hasher::new(), offset: 0 };
        let mut magic = [0u8; 8];
        r.get(&mut magic)?;
        if magic != PROFILE_MAGIC {
            return Err(PredictorError::BadProfile {
                offset: 0,
                why: "not a pinion activation profile".into(),
            });
        }
        let version = r.u32()?;
        if version != PROFILE_VERSION {
            return Err(PredictorError::BadProfile {
                offset: 8,
                why: format!("version {version} (this pinion reads {PROFILE_VERSION})"),
            });
        }
        let n_layers = r.bounded(MAX_LAYERS, "layer count")?;
        let n_ff = r.bounded(MAX_WIDTH, "n_ff")?;
        let d_in = r.bounded(MAX_WIDTH, "d_in")?;
        let n_token_samples = r.bounded(MAX_SAMPLES, "token samples")?;
        let max_samples = r.bounded(MAX_SAMPLES, "score sample cap")?;
        let max_tokens = r.bounded(MAX_SAMPLES, "token sample cap")?;
        if n_token_samples > max_tokens || (n_token_samples > 0 && d_in == 0) {
            return Err(PredictorError::BadProfile {
                offset: r.offset,
                why: "inconsistent token samples".into(),
            });
        }
        let n_tokens = r.u64()?;
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let n_samples = r.bounded(max_samples as u32, "score samples")?;
            let seen = r.u64()?;
            let samples = r.vec(n_samples)?;
            let positive = r.vec(n_ff)?;
            let held = r.bounded(n_token_samples as u32, "a layer's token samples")?;
            let mut lp = LayerProfile {
                samples,
                seen,
                positive,
                x: r.vec(held * d_in)?,
                scores: r.vec(held * n_ff)?,
                up_sq: Vec::new(),
                up_tokens: r.u64()?,
                offered: held as u64,
                rng: stream(l),
            };
            if lp.up_tokens > 0 {
                lp.up_sq = r.vec(n_ff)?;
            }
            layers.push(lp);
        }
        let expected = r.crc.clone().finalize();
        let at = r.offset;
        let mut crc = [0u8; 4];
        r.get(&mut crc)?;
        if u32::from_le_bytes(crc) != expected {
            return Err(PredictorError::BadProfile { offset: at, why: "checksum mismatch".into() });
        }
        Ok(ActivationProfile {
            n_ff,
            d_in,
            max_samples,
            max_tokens,
            layers,
            n_tokens,
            rng: RNG_SEED,
            tokens_seen: n_token_samples as u64,
            n_token_samples,
            slots: Vec::new(),
        })
    }
}

struct CrcWriter<'a> {
    inner: &'a mut dyn Write,
    crc: crc32fast::Hasher,
}

impl CrcWriter<'_> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.inner.write_all(b)
    }
}

struct CrcReader<'a> {
    inner: &'a mut dyn Read,
    crc: crc32fast::Hasher,
    offset: u64,
}

impl CrcReader<'_> {
    fn get(&mut self, b: &mut [u8]) -> Result<(), PredictorError> {
        self.inner.read_exact(b).map_err(|e| PredictorError::BadProfile {
            offset: self.offset,
            why: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "truncated".into()
            } else {
                e.to_string()
            },
        })?;
        self.crc.update(b);
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Reads `n` values. The buffer grows as bytes arrive, so a corrupt count on a short file fails at the end
    /// of the file rather than allocating what the count asks for.
    fn vec<T: bytemuck::Pod>(&mut self, n: usize) -> Result<Vec<T>, PredictorError> {
        let len = n
            .checked_mul(size_of::<T>())
            .ok_or(PredictorError::BadProfile { offset: self.offset, why: format!("{n} values overflow") })?;
        let mut buf = Vec::new();
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| PredictorError::BadProfile { offset: self.offset, why: e.to_string() })?;
        if got != len {
            return Err(PredictorError::BadProfile {
                offset: self.offset + got as u64,
                why: "truncated".into(),
            });
        }
        self.crc.update(&buf);
        self.offset += len as u64;
        Ok(bytemuck::pod_collect_to_vec(&buf))
    }

    fn u32(&mut self) -> Result<u32, PredictorError> {
        let mut b = [0u8; 4];
        self.get(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, PredictorError> {
        let mut b = [0u8; 8];
        self.get(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn bounded(&mut self, cap: u32, what: &str) -> Result<usize, PredictorError> {
        let at = self.offset;
        let v = self.u32()?;
        if v > cap {
            return Err(PredictorError::BadProfile { offset: at, why: format!("{what} {v} exceeds {cap}") });
        }
        Ok(v as usize)
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
            p.record(0, &row, &|x| x.max(0.0));
            p.record(1, &row, &|x| x.max(0.0));
        }
        assert_eq!(p.n_tokens(), 8);
        assert_eq!(p.firing_frequency(0), vec![1.0, 0.0, 0.5]);
        assert_eq!(p.samples(0).len(), 10, "reservoir is bounded");
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

    /// A profile of 2 layers, 4 neurons, inputs of width 3, where token `k` has input `[k, k, k]` and, in layer
    /// `l`, scores `[k + l, 0, k % 2, 100]`.
    fn recorded(max_tokens: usize, n_tokens: usize, batch: usize) -> ActivationProfile {
        recorded_in_order(max_tokens, n_tokens, batch, false)
    }

    /// [`recorded`], each batch through both layers in turn, or (`by_layer`) every batch through layer 0 first.
    fn recorded_in_order(
        max_tokens: usize,
        n_tokens: usize,
        batch: usize,
        by_layer: bool,
    ) -> ActivationProfile {
        let mut p = ActivationProfile::new(2, 4, 64).with_token_samples(3, max_tokens);
        let toks: Vec<usize> = (0..n_tokens).collect();
        let mut record = |l: usize, b: &[usize]| {
            let x: Vec<f32> = b.iter().flat_map(|&k| [k as f32; 3]).collect();
            let s: Vec<f32> = b.iter().flat_map(|&k| [(k + l) as f32, 0.0, (k % 2) as f32, 100.0]).collect();
            p.record_scores(l, &x, &s);
        };
        match by_layer {
            false => toks.chunks(batch).for_each(|b| (0..2).for_each(|l| record(l, b))),
            true => (0..2).for_each(|l| toks.chunks(batch).for_each(|b| record(l, b))),
        }
        p
    }

    /// The order layers take turns in does not change what they keep (each layer has its own random stream,
    /// and the tokens layer 0 sampled are remembered for the others).
    #[test]
    fn recording_layer_by_layer_keeps_what_batch_by_batch_keeps() {
        let (a, b) = (recorded_in_order(16, 200, 7, false), recorded_in_order(16, 200, 7, true));
        assert!(a == b);
        assert_eq!(a.sample_inputs(1), b.sample_inputs(1));
        // A layer after 0 recording tokens layer 0 has not is a caller's bug.
        let mut p = ActivationProfile::new(2, 4, 64).with_token_samples(3, 4);
        let r = std::panic::catch_unwind(move || p.record_scores(1, &[0.0; 3], &[0.0; 4]));
        assert!(r.is_err());
    }

    #[test]
    fn token_samples_are_the_same_tokens_in_every_layer() {
        let p = recorded(16, 200, 7);
        assert_eq!(p.n_token_samples(), 16);
        let (x, s0, s1) = (p.sample_inputs(0), p.sample_scores(0), p.sample_scores(1));
        let mut ks: Vec<usize> = Vec::new();
        for r in 0..16 {
            let k = x[r * 3] as usize;
            assert_eq!(&x[r * 3..r * 3 + 3], &[k as f32; 3]);
            assert_eq!(p.sample_inputs(1)[r * 3], k as f32, "layer 1 sampled the same token");
            assert_eq!(s0[r * 4].to_f32(), f16::from_f32(k as f32).to_f32());
            assert_eq!(s1[r * 4].to_f32(), f16::from_f32((k + 1) as f32).to_f32());
            ks.push(k);
        }
        // A uniform sample of 200 tokens, not just the first 16.
        assert!(ks.iter().any(|&k| k >= 100), "{ks:?}");
        ks.sort_unstable();
        ks.dedup();
        assert_eq!(ks.len(), 16, "no token sampled twice");
        // Masks and frequencies at threshold 0.5 (strictly above): neuron 0 when k + l > 0.5, neuron 2 for odd
        // k, neuron 3 always, neuron 1 never.
        let masks = p.sample_masks(0, &[0.5], |s, t| s > t);
        let freq = p.sample_frequency(0, &[0.5], |s, t| s > t);
        let odd = ks.iter().filter(|&&k| k % 2 == 1).count() as f64 / 16.0;
        assert_eq!(freq[1], 0.0);
        assert_eq!(freq[3], 1.0);
        assert!((freq[2] - odd).abs() < 1e-12);
        for r in 0..16 {
            let k = x[r * 3] as usize;
            assert_eq!(masks[r] & 0b1111, u64::from(k > 0) | (((k % 2) as u64) << 2) | 0b1000, "token {k}");
        }
    }

    #[test]
    fn file_round_trip_and_corruption() {
        let mut p = recorded(8, 40, 5);
        // Up values of layer 1 only: two tokens, RMS per neuron sqrt((a^2 + b^2) / 2).
        p.record_up(1, &[3.0, 0.0, -1.0, 2.0, 4.0, 0.0, 1.0, -2.0]);
        assert_eq!(p.up_rms(0), None);
        assert_eq!(p.up_rms(1).unwrap(), vec![12.5f64.sqrt(), 0.0, 1.0, 2.0]);
        let mut bytes = Vec::new();
        p.write_to(&mut bytes).unwrap();
        let q = ActivationProfile::read_from(&mut bytes.as_slice()).unwrap();
        assert_eq!(q.up_rms(1), p.up_rms(1));
        assert_eq!(q.up_rms(0), None);
        assert_eq!(q.sample_scores(1), p.sample_scores(1));
        assert_eq!(q.sample_inputs(0), p.sample_inputs(0));
        assert_eq!(q.samples(1), p.samples(1));
        assert_eq!(q.firing_frequency(0), p.firing_frequency(0));
        assert_eq!((q.n_tokens(), q.n_token_samples(), q.d_in()), (40, 8, 3));
        // Every truncation and every flipped byte is an error, never a panic or a silent misread.
        for cut in 0..bytes.len() {
            assert!(ActivationProfile::read_from(&mut &bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(ActivationProfile::read_from(&mut b.as_slice()).is_err(), "flipped byte {i}");
        }
        let mut b = bytes.clone();
        b[8] = 1;
        let e = ActivationProfile::read_from(&mut b.as_slice()).unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
    }
}
