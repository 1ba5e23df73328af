//! Speed measurement the way `llama-bench` does it: `ppN` evaluates N prompt tokens in one batch from an empty
//! cache, `tgN` generates N tokens one at a time; each test runs once to warm up and then `repetitions` times.
//! `tgNxS` (as `llama-batched-bench`'s generation of S sequences) decodes N tokens in each of S sequences
//! together, one [`Context::decode_batch`] step per token: what a server's continuous batching runs.

use std::time::Instant;

use crate::context::Context;
use crate::error::RuntimeError;
use crate::forward::Logits;

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchTest {
    /// Prompt processing of N tokens in one batch.
    Prompt(usize),
    /// Generation of N tokens, one per forward pass.
    Generate(usize),
    /// Generation of `n` tokens in each of `seqs` sequences decoded together (the context must hold them).
    Batched { n: usize, seqs: usize },
}

impl std::fmt::Display for BenchTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchTest::Prompt(n) => write!(f, "pp{n}"),
            BenchTest::Generate(n) => write!(f, "tg{n}"),
            BenchTest::Batched { n, seqs } => write!(f, "tg{n}x{seqs}"),
        }
    }
}

/// The result of one test: tokens per second of each repetition (all sequences' tokens, for `tgNxS`).
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    pub test: BenchTest,
    pub samples_tps: Vec<f64>,
}

impl BenchResult {
    /// Mean tokens per second.
    pub fn mean(&self) -> f64 {
        self.samples_tps.iter().sum::<f64>() / self.samples_tps.len().max(1) as f64
    }

    /// Sample standard deviation of tokens per second.
    pub fn stdev(&self) -> f64 {
        let n = self.samples_tps.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples_tps.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64).sqrt()
    }

    /// Median tokens per second.
    pub fn median(&self) -> f64 {
        let mut v = self.samples_tps.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// `n` token ids in `ids`, drawn deterministically from `seed` (an xorshift generator; a seed of 0 gives
/// `ids.start` only): the random tokens speed tests and profiles of synthetic models are fed, as llama-bench
/// feeds random tokens.
pub fn random_tokens(n: usize, ids: std::ops::Range<u32>, seed: u64) -> Vec<u32> {
    let span = u64::from(ids.end.saturating_sub(ids.start)).max(1);
    let mut state = seed;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ids.start + (state % span) as u32
        })
        .collect()
}

/// Runs `test` once to warm up, then `repetitions` times, on a context of at least the test's size.
///
/// Token ids are drawn deterministically from the vocabulary (as llama-bench uses random tokens).
pub fn run_bench(
    ctx: &mut Context<'_>,
    test: BenchTest,
    repetitions: usize,
) -> Result<BenchResult, RuntimeError> {
    let n_vocab = ctx.model().config().n_vocab as u32;
    let (n, seqs) = match test {
        BenchTest::Prompt(n) | BenchTest::Generate(n) => (n, 1),
        BenchTest::Batched { n, seqs } => (n, seqs),
    };
    if seqs == 0 || seqs > ctx.n_seq() {
        return Err(RuntimeError::BadSequence { seq: seqs.saturating_sub(1), n_seq: ctx.n_seq() });
    }
    if n == 0 || n > ctx.n_ctx() {
        return Err(RuntimeError::ContextOverflow { prompt: 0, generate: n, n_ctx: ctx.n_ctx() });
    }
    let tokens = random_tokens(n, 0..n_vocab, 0x2545_F491_4F6C_DD1D);
    let mut samples = Vec::with_capacity(repetitions);
    let mut steps = Vec::with_capacity(seqs);
    for rep in 0..=repetitions {
        for s in 0..seqs {
            ctx.truncate_seq(s, 0);
        }
        let t = Instant::now();
        match test {
            BenchTest::Prompt(_) => {
                ctx.eval(&tokens, Logits::Last)?;
            }
            BenchTest::Generate(_) => {
                for &tok in &tokens {
                    ctx.eval(&[tok], Logits::Last)?;
                }
            }
            BenchTest::Batched { .. } => {
                // Each sequence its own tokens: the same list, shifted.
                for i in 0..n {
                    steps.clear();
                    steps.extend((0..seqs).map(|s| (s, tokens[(i + 7 * s) % n])));
                    ctx.decode_batch(&steps)?;
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if rep > 0 {
            samples.push((n * seqs) as f64 / secs);
        }
    }
    Ok(BenchResult { test, samples_tps: samples })
}
