//! Text generation: prompt evaluation, the decode loop, stop conditions, streaming and timings.

use std::time::{Duration, Instant};

use pinion_tokenizer::StreamDecoder;

use crate::context::Context;
use crate::error::RuntimeError;
use crate::forward::Logits;
use crate::sampler::{Sampler, SamplerParams};

/// Settings of one generation.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub n_predict: usize,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Stop when the generated text contains one of these; the stop string is not part of the output.
    pub stop: Vec<String>,
    /// How to pick tokens.
    pub sampler: SamplerParams,
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `n_predict` tokens were generated.
    Length,
    /// A stop string appeared.
    StopString(String),
    /// The caller's callback asked to stop.
    Cancelled,
}

/// Wall-clock timings of a generation, as llama.cpp reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt: Duration,
    pub generated_tokens: usize,
    /// Time of the decode steps (sampling included), the first token's prompt pass excluded.
    pub generation: Duration,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        per_second(self.prompt_tokens, self.prompt)
    }

    /// Generated tokens per second.
    pub fn generation_tps(&self) -> f64 {
        per_second(self.generated_tokens, self.generation)
    }
}

fn per_second(n: usize, d: Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated token ids (the stop token, if any, included).
    pub tokens: Vec<u32>,
    /// The generated text, up to any stop string.
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// Generates text after `prompt`, which is appended to what `ctx` already holds.
///
/// `on_text` receives the text as it is produced (never half a UTF-8 character, never part of a stop string)
/// and returns `false` to stop. The whole generation must fit in the context: a prompt plus `n_predict` that do
/// not fit is a [`RuntimeError::ContextOverflow`] before any work is done.
pub fn generate(
    ctx: &mut Context<'_>,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation, RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::EmptyPrompt);
    }
    let needed = ctx.n_past() + prompt.len() + params.n_predict;
    if needed > ctx.n_ctx() {
        return Err(RuntimeError::ContextOverflow {
            prompt: ctx.n_past() + prompt.len(),
            generate: params.n_predict,
            n_ctx: ctx.n_ctx(),
        });
    }
    let tokenizer = ctx.model().tokenizer();
    let mut sampler = Sampler::new(params.sampler.clone());
    let mut history: Vec<u32> = prompt.to_vec();
    let mut out = Generation {
        tokens: Vec::with_capacity(params.n_predict),
        text: String::new(),
        stop_reason: StopReason::Length,
        timings: Timings { prompt_tokens: prompt.len(), ..Timings::default() },
    };
    let mut decoder = StreamDecoder::new();
    let mut emitted = 0usize; // Bytes of `out.text` already handed to `on_text`.

    let t0 = Instant::now();
    let mut next = {
        let logits = ctx.eval(prompt, Logits::Last)?;
        sampler.sample(logits, &history)
    };
    out.timings.prompt = t0.elapsed();

    let t1 = Instant::now();
    for i in 0..params.n_predict {
        out.tokens.push(next);
        history.push(next);
        if !params.ignore_eos && tokenizer.is_eog(next) {
            out.stop_reason = StopReason::EndOfGeneration;
            break;
        }
        out.text.push_str(&decoder.push(tokenizer, next));
        if let Some((at, s)) = find_stop(&out.text, &params.stop) {
            out.text.truncate(at);
            out.stop_reason = StopReason::StopString(s);
            break;
        }
        // Hold back a tail that could still become a stop string.
        let safe = out.text.len() - held_back(&out.text, &params.stop);
        if safe > emitted {
            if !on_text(&out.text[emitted..safe]) {
                emitted = safe;
                out.stop_reason = StopReason::Cancelled;
                break;
            }
            emitted = safe;
        }
        if i + 1 == params.n_predict {
            break;
        }
        let logits = ctx.eval(&[next], Logits::Last)?;
        next = sampler.sample(logits, &history);
    }
    if out.stop_reason == StopReason::Length || out.stop_reason == StopReason::EndOfGeneration {
        out.text.push_str(&decoder.flush());
    }
    if out.text.len() > emitted && !matches!(out.stop_reason, StopReason::Cancelled) {
        on_text(&out.text[emitted..]);
    }
    out.timings.generated_tokens = out.tokens.len();
    out.timings.generation = t1.elapsed();
    Ok(out)
}

/// The earliest stop string in `text`: its byte position and the string.
fn find_stop(text: &str, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s.clone())))
        .min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string, on a char boundary.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_held_back() {
        let stops = vec!["<end>".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc<end>def", &stops), Some((3, "<end>".into())));
        assert_eq!(find_stop("a\n\nb<end>", &stops), Some((1, "\n\n".into())));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(held_back("abc<en", &stops), 3);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("abcé", &["é!".to_string()]), 2);
    }
}
