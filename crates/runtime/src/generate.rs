//! Text generation: prompt evaluation, the decode loop, stop conditions, streaming and timings.

use std::time::{Duration, Instant};

use pinion_tokenizer::{StreamDecoder, Tokenizer};

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

/// The text side of a generation: sampled tokens in, text out (never half a UTF-8 character, never part of a
/// stop string), and the reason to stop: an end-of-generation token (unless `ignore_eos`), a stop string, or
/// `n_predict` tokens. Shared by [`generate`] and servers that decode many sequences at once.
#[derive(Debug)]
pub struct TextStream {
    decoder: StreamDecoder,
    stop: Vec<String>,
    ignore_eos: bool,
    n_predict: usize,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    reason: Option<StopReason>,
}

impl TextStream {
    /// A stream with the stop conditions of `params` (its sampler is not used here).
    pub fn new(params: &GenerateParams) -> TextStream {
        TextStream {
            decoder: StreamDecoder::new(),
            stop: params.stop.clone(),
            ignore_eos: params.ignore_eos,
            n_predict: params.n_predict,
            tokens: Vec::new(),
            text: String::new(),
            emitted: 0,
            reason: (params.n_predict == 0).then_some(StopReason::Length),
        }
    }

    /// Takes the next sampled token and returns the text that became safe to show (all that is left once
    /// the stream stops). Tokens after a stop are ignored.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> &str {
        let start = self.emitted;
        if self.reason.is_some() {
            return "";
        }
        self.tokens.push(token);
        if !self.ignore_eos && tokenizer.is_eog(token) {
            self.finish(StopReason::EndOfGeneration);
        } else {
            self.text.push_str(&self.decoder.push(tokenizer, token));
            if let Some((at, s)) = find_stop(&self.text, &self.stop) {
                self.text.truncate(at.max(start));
                self.reason = Some(StopReason::StopString(s));
            } else if self.tokens.len() >= self.n_predict {
                self.finish(StopReason::Length);
            }
        }
        let safe = match self.reason {
            Some(_) => self.text.len(),
            // Hold back a tail that could still become a stop string.
            None => self.text.len() - held_back(&self.text, &self.stop),
        };
        self.emitted = safe.max(start);
        &self.text[start..self.emitted]
    }

    fn finish(&mut self, reason: StopReason) {
        self.text.push_str(&self.decoder.flush());
        self.reason = Some(reason);
    }

    /// Stops the stream where it is ([`StopReason::Cancelled`]): text held back is dropped.
    pub fn cancel(&mut self) {
        if self.reason.is_none() {
            self.text.truncate(self.emitted);
            self.reason = Some(StopReason::Cancelled);
        }
    }

    /// Why the stream stopped (`None` while it goes on).
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.reason.as_ref()
    }

    /// The tokens taken so far (a stop token included).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The tokens, the text (up to any stop string) and why it stopped (`Length` if it has not).
    pub fn into_parts(self) -> (Vec<u32>, String, StopReason) {
        (self.tokens, self.text, self.reason.unwrap_or(StopReason::Length))
    }
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
    let mut stream = TextStream::new(params);

    let t0 = Instant::now();
    let mut next = {
        let logits = ctx.eval(prompt, Logits::Last)?;
        sampler.sample(logits, &history)
    };
    let prompt_time = t0.elapsed();

    let t1 = Instant::now();
    while stream.stop_reason().is_none() {
        history.push(next);
        let text = stream.push(tokenizer, next);
        if !text.is_empty() && !on_text(text) {
            stream.cancel();
        }
        if stream.stop_reason().is_some() {
            break;
        }
        let logits = ctx.eval(&[next], Logits::Last)?;
        next = sampler.sample(logits, &history);
    }
    let generation = t1.elapsed();
    let (tokens, text, stop_reason) = stream.into_parts();
    let timings = Timings {
        prompt_tokens: prompt.len(),
        prompt: prompt_time,
        generated_tokens: tokens.len(),
        generation,
    };
    Ok(Generation { tokens, text, stop_reason, timings })
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
