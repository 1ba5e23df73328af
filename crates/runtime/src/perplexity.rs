//! Perplexity the way llama.cpp's `llama-perplexity` measures it.
//!
//! The text is tokenized once (with the model's own BOS/EOS rule) and cut into chunks of `n_ctx` tokens; each
//! chunk is evaluated from an empty cache, with its first token replaced by BOS when the model adds BOS; only
//! the second half of each chunk is scored, so every scored token sees at least `n_ctx / 2` tokens of context.

use crate::context::Context;
use crate::error::RuntimeError;
use crate::forward::Logits;

/// Running totals of a perplexity computation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerplexityStats {
    /// Chunks scored so far.
    pub n_chunks: usize,
    /// Tokens scored so far.
    pub count: usize,
    nll: f64,
    nll2: f64,
}

impl PerplexityStats {
    /// The perplexity so far.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.count.max(1) as f64).exp()
    }

    /// The standard error of the perplexity, as llama.cpp computes it.
    pub fn ppl_error(&self) -> f64 {
        let n = self.count as f64;
        if self.count < 2 {
            return 0.0;
        }
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        if var > 0.0 { (var / (n - 1.0)).sqrt() * self.ppl() } else { 0.0 }
    }
}

/// Computes the perplexity of `tokens` in chunks of `ctx.n_ctx()` tokens.
///
/// `bos` is the token to put at the start of each chunk, if the model adds BOS. `max_chunks` limits the number
/// of chunks (`None`: all). `on_chunk` is called after each chunk with the running statistics and the chunk's
/// own perplexity, and may return `false` to stop early.
pub fn perplexity(
    ctx: &mut Context<'_>,
    tokens: &[u32],
    bos: Option<u32>,
    max_chunks: Option<usize>,
    on_chunk: &mut dyn FnMut(&PerplexityStats, f64) -> bool,
) -> Result<PerplexityStats, RuntimeError> {
    let n_ctx = ctx.n_ctx();
    if n_ctx < 4 {
        return Err(RuntimeError::BadContextSize { n_ctx, why: "perplexity needs at least 4 tokens".into() });
    }
    let available = tokens.len() / n_ctx;
    if available == 0 {
        return Err(RuntimeError::ContextOverflow { prompt: tokens.len(), generate: 0, n_ctx: 2 * n_ctx });
    }
    let n_chunks = max_chunks.map_or(available, |m| m.min(available));
    let n_vocab = ctx.model().config().n_vocab;
    let first = n_ctx / 2;
    let mut stats = PerplexityStats::default();
    let mut chunk_tokens = vec![0u32; n_ctx];
    for i in 0..n_chunks {
        let start = i * n_ctx;
        chunk_tokens.copy_from_slice(&tokens[start..start + n_ctx]);
        if let Some(b) = bos {
            chunk_tokens[0] = b;
        }
        ctx.truncate(0);
        let logits = ctx.eval(&chunk_tokens, Logits::All)?;
        let mut chunk_nll = 0.0;
        for j in first..n_ctx - 1 {
            let row = &logits[j * n_vocab..(j + 1) * n_vocab];
            let nll = -log_softmax_at(row, tokens[start + j + 1] as usize);
            chunk_nll += nll;
            stats.nll += nll;
            stats.nll2 += nll * nll;
        }
        stats.count += n_ctx - 1 - first;
        stats.n_chunks += 1;
        let chunk_ppl = (chunk_nll / (n_ctx - 1 - first) as f64).exp();
        if !on_chunk(&stats, chunk_ppl) {
            break;
        }
    }
    Ok(stats)
}

/// `log(softmax(logits)[i])`, computed in f64 as llama.cpp does.
fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[i] - max) as f64 - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_direct_formula() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for i in 0..3 {
            let want = ((logits[i] as f64).exp() / z).ln();
            assert!((log_softmax_at(&logits, i) - want).abs() < 1e-6);
        }
    }

    #[test]
    fn stats_give_ppl_and_error() {
        let mut s = PerplexityStats::default();
        for nll in [1.0f64, 2.0, 3.0] {
            s.nll += nll;
            s.nll2 += nll * nll;
            s.count += 1;
        }
        assert!((s.ppl() - 2.0f64.exp()).abs() < 1e-9);
        // Variance of {1,2,3} around 2 is 2/3; error = sqrt((2/3)/2) * e^2.
        let want = ((2.0f64 / 3.0) / 2.0).sqrt() * 2.0f64.exp();
        assert!((s.ppl_error() - want).abs() < 1e-9);
    }
}
