//! The engine loop: continuous batching of requests over one [`Context`] with a sequence slot per request.
//!
//! Each turn of the loop takes in new requests, gives waiting ones the free slots, evaluates one prompt chunk
//! (at most [`DEFAULT_UBATCH`] tokens of one sequence, so running streams keep flowing while a long prompt is
//! read), then one decode step over every sequence that has a token to feed ([`Context::decode_batch`]: from
//! memory, one forward pass for all of them). A request's tokens are the same whatever else runs beside it:
//! its prompt is cut into the same chunks, and each row of a decode step gets the bits it would get alone.
//! A request whose client went away (its event channel closed) is dropped at the next turn, its slot freed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use pinion_runtime::{
    Context, DEFAULT_UBATCH, GenerateParams, Logits, Sampler, StopReason, TextStream, planning,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{ApiError, Prompt, Request, finish_reason};
use crate::metrics::Metrics;

/// How long running streams may go on after a shutdown signal before they are cancelled.
pub(crate) const GRACE: Duration = Duration::from_secs(10);
/// How long an idle engine waits for a request before looking at the shutdown flag again.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// A request handed to the engine, and where its events go.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) request: Request,
    pub(crate) events: UnboundedSender<Event>,
}

/// What the engine tells a request's handler, in this order: `Started` or `Error`, then `Text`s, then `Done`
/// (or `Error`).
#[derive(Debug)]
pub(crate) enum Event {
    /// The request has a slot.
    Started,
    /// Generated text.
    Text(String),
    /// The generation ended.
    Done {
        finish: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(ApiError),
}

/// A request in a sequence slot.
struct Slot {
    job: Job,
    prompt: Vec<u32>,
    /// Prompt tokens evaluated so far.
    prefilled: usize,
    stream: TextStream,
    sampler: Sampler,
    history: Vec<u32>,
    /// The sampled token to feed at the next decode step.
    next: Option<u32>,
    /// When the request got its slot, and when its prompt was read.
    started: Instant,
    prefilled_at: Option<Instant>,
}

impl Slot {
    fn send(&self, e: Event) {
        let _ = self.job.events.send(e);
    }
}

/// The engine's state: the context and its slots (slot `i` is sequence `i` of the context).
pub(crate) struct Engine<'c, 'm> {
    ctx: &'c mut Context<'m>,
    metrics: Arc<Metrics>,
    slots: Vec<Option<Slot>>,
    waiting: VecDeque<Job>,
    /// The slot whose prompt the next prefill turn looks at first (round robin).
    prefill_turn: usize,
}

/// Runs requests from `jobs` on `ctx` until `shutdown` is set and the running ones are done (or cancelled
/// after [`GRACE`]), or every sender of `jobs` is gone.
pub(crate) fn run(ctx: &mut Context<'_>, jobs: &Receiver<Job>, metrics: Arc<Metrics>, shutdown: &AtomicBool) {
    let n = ctx.n_seq();
    let mut engine = Engine {
        ctx,
        metrics,
        slots: (0..n).map(|_| None).collect(),
        waiting: VecDeque::new(),
        prefill_turn: 0,
    };
    let mut deadline = None;
    loop {
        let busy = engine.slots.iter().any(Option::is_some) || !engine.waiting.is_empty();
        if !busy {
            match jobs.recv_timeout(IDLE_POLL) {
                Ok(j) => engine.waiting.push_back(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        engine.waiting.extend(jobs.try_iter());
        if shutdown.load(Ordering::Acquire) {
            engine.refuse_waiting();
            let at = *deadline.get_or_insert_with(|| Instant::now() + GRACE);
            if Instant::now() >= at {
                engine.cancel_all();
            }
            if engine.slots.iter().all(Option::is_none) {
                return;
            }
        }
        engine.admit();
        engine.drop_closed();
        let prefilled = engine.prefill_one();
        let decoded = engine.decode_step();
        if prefilled || decoded {
            engine.update_figures();
        }
    }
}

impl Engine<'_, '_> {
    /// Gives free slots to waiting requests, oldest first: their prompts are tokenized and checked against the
    /// context.
    fn admit(&mut self) {
        while let Some(i) = self.slots.iter().position(Option::is_none) {
            let Some(job) = self.waiting.pop_front() else { return };
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            match self.start(&job.request) {
                Ok((prompt, params)) => {
                    let slot = Slot {
                        job,
                        history: prompt.clone(),
                        prompt,
                        prefilled: 0,
                        stream: TextStream::new(&params),
                        sampler: Sampler::new(params.sampler),
                        next: None,
                        started: Instant::now(),
                        prefilled_at: None,
                    };
                    self.ctx.truncate_seq(i, 0);
                    Metrics::add(&self.metrics.active, 1);
                    Metrics::add(&self.metrics.prompt_tokens, slot.prompt.len() as u64);
                    slot.send(Event::Started);
                    self.slots[i] = Some(slot);
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e));
                }
            }
        }
    }

    /// A request's prompt tokens and generation settings, checked against the context: the prompt must fit
    /// with room for what the request asks to generate.
    fn start(&self, r: &Request) -> Result<(Vec<u32>, GenerateParams), ApiError> {
        let model = self.ctx.model();
        let prompt = match &r.prompt {
            Prompt::Text(t) => model.tokenizer().encode(t, true, true),
            Prompt::Chat(m) => match model.encode_chat(m, true) {
                Ok(p) => p,
                Err(e) => {
                    return Err(ApiError::invalid("messages", format!("the chat template: {e}")));
                }
            },
        };
        let n_ctx = self.ctx.n_ctx();
        let long = |message: String| ApiError {
            status: 400,
            message,
            param: Some(if matches!(r.prompt, Prompt::Chat(_)) { "messages" } else { "prompt" }.into()),
            code: Some("context_length_exceeded"),
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty (no tokens)"));
        }
        if prompt.len() >= n_ctx {
            return Err(long(format!(
                "the prompt is {} tokens; the context of each sequence is {n_ctx} (-c), with room for at least \
                 one generated token",
                prompt.len()
            )));
        }
        let room = n_ctx - prompt.len();
        let n_predict = match r.max_tokens {
            Some(m) if m > room => {
                return Err(long(format!(
                    "the prompt ({} tokens) and max_tokens ({m}) exceed the context of {n_ctx} tokens (-c)",
                    prompt.len()
                )));
            }
            Some(m) => m,
            None => room,
        };
        let params =
            GenerateParams { n_predict, ignore_eos: false, stop: r.stop.clone(), sampler: r.sampler.clone() };
        Ok((prompt, params))
    }

    /// Frees the slots of requests whose client is gone.
    fn drop_closed(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].as_ref().is_some_and(|s| s.job.events.is_closed()) {
                self.free(i);
            }
        }
    }

    fn free(&mut self, i: usize) {
        drop(self.release(i));
    }

    /// Takes slot `i`'s request out and frees the slot (the counters too): done before the request's last
    /// event is sent, so a client that has its answer sees the slot free.
    fn release(&mut self, i: usize) -> Option<Slot> {
        let slot = self.slots[i].take()?;
        self.ctx.truncate_seq(i, 0);
        self.metrics.active.fetch_sub(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Fails slot `i`'s request with a server error.
    fn fail(&mut self, i: usize, e: &pinion_runtime::RuntimeError) {
        if let Some(s) = self.release(i) {
            s.send(Event::Error(ApiError::status(500, "engine_error", e.to_string())));
        }
    }

    /// Evaluates the next chunk of one prompt (round robin over the slots being prefilled); whether there was
    /// one.
    fn prefill_one(&mut self) -> bool {
        let n = self.slots.len();
        let Some(i) = (0..n)
            .map(|k| (self.prefill_turn + k) % n)
            .find(|&i| self.slots[i].as_ref().is_some_and(|s| s.prefilled < s.prompt.len()))
        else {
            return false;
        };
        self.prefill_turn = (i + 1) % n;
        let t = Instant::now();
        let slot = self.slots[i].as_mut().expect("found above");
        let end = (slot.prefilled + DEFAULT_UBATCH).min(slot.prompt.len());
        let chunk = &slot.prompt[slot.prefilled..end];
        let next = match self.ctx.eval_seq(i, chunk, Logits::Last) {
            Ok(logits) if end == slot.prompt.len() => Some(slot.sampler.sample(logits, &slot.history)),
            Ok(_) => None,
            Err(e) => {
                self.fail(i, &e);
                return true;
            }
        };
        slot.prefilled = end;
        if end == slot.prompt.len() {
            slot.prefilled_at = Some(Instant::now());
        }
        Metrics::add(&self.metrics.prefill_ns, t.elapsed().as_nanos() as u64);
        if let Some(tok) = next {
            self.take(i, tok);
        }
        true
    }

    /// One decode step over every slot with a token to feed; whether there was one.
    fn decode_step(&mut self) -> bool {
        let steps: Vec<(usize, u32)> =
            self.slots.iter().enumerate().filter_map(|(i, s)| Some((i, s.as_ref()?.next?))).collect();
        if steps.is_empty() {
            return false;
        }
        let t = Instant::now();
        let n_vocab = self.ctx.model().config().n_vocab;
        let sampled: Vec<u32> = match self.ctx.decode_batch(&steps) {
            Ok(logits) => steps
                .iter()
                .zip(logits.chunks_exact(n_vocab))
                .map(|(&(i, _), row)| {
                    let s = self.slots[i].as_mut().expect("a step's slot");
                    s.sampler.sample(row, &s.history)
                })
                .collect(),
            Err(e) => {
                for &(i, _) in &steps {
                    self.fail(i, &e);
                }
                return true;
            }
        };
        Metrics::add(&self.metrics.decode_steps, 1);
        Metrics::add(&self.metrics.decode_ns, t.elapsed().as_nanos() as u64);
        for (&(i, _), tok) in steps.iter().zip(sampled) {
            self.take(i, tok);
        }
        true
    }

    /// Slot `i`'s next sampled token: its text goes out, and the request ends or the token waits to be fed.
    fn take(&mut self, i: usize, tok: u32) {
        let model = self.ctx.model();
        let Some(slot) = self.slots[i].as_mut() else { return };
        slot.next = None;
        slot.history.push(tok);
        let text = slot.stream.push(model.tokenizer(), tok);
        if !text.is_empty() {
            let _ = slot.job.events.send(Event::Text(text.to_string()));
        }
        let Some(reason) = slot.stream.stop_reason().cloned() else {
            Metrics::add(&self.metrics.generated_tokens, 1);
            slot.next = Some(tok);
            return;
        };
        let reason = &reason;
        // The end-of-generation token is not part of the completion.
        let completion = slot.stream.tokens().len() - usize::from(*reason == StopReason::EndOfGeneration);
        Metrics::add(&self.metrics.generated_tokens, u64::from(*reason != StopReason::EndOfGeneration));
        let Some(slot) = self.release(i) else { return };
        slot.send(Event::Done {
            finish: finish_reason(reason),
            prompt_tokens: slot.prompt.len(),
            completion_tokens: completion,
        });
        // A log line per request, as llama-server prints its slots' timings.
        let read = slot.prefilled_at.unwrap_or(slot.started);
        let (prompt_s, gen_s) =
            (read.duration_since(slot.started).as_secs_f64(), read.elapsed().as_secs_f64());
        eprintln!(
            "pinion serve: slot {i}: prompt {} tokens in {:.0} ms, generated {completion} tokens in {:.0} ms \
             ({:.1} tokens/s), finish: {}",
            slot.prompt.len(),
            prompt_s * 1e3,
            gen_s * 1e3,
            if gen_s > 0.0 { completion as f64 / gen_s } else { 0.0 },
            finish_reason(reason)
        );
    }

    /// Refuses the requests still waiting for a slot (the server is shutting down).
    fn refuse_waiting(&mut self) {
        for job in self.waiting.drain(..) {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let e = ApiError::status(503, "shutting_down", "the server is shutting down");
            let _ = job.events.send(Event::Error(e));
        }
    }

    /// Cancels every running request (the shutdown's grace period is over).
    fn cancel_all(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(s) = self.release(i) {
                let e = ApiError::status(503, "shutting_down", "cancelled: the server is shutting down");
                s.send(Event::Error(e));
            }
        }
    }

    /// Moves an offloaded run's counters into the metrics (and resets them, so they do not grow), and the
    /// peak resident set.
    fn update_figures(&mut self) {
        let mut e = self.metrics.engine.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(st) = self.ctx.offload_stats() {
            e.bytes_read += st.bytes_read() + st.staged_bytes;
            e.neuron_hits += st.pinned_hits + st.lru_hits;
            e.neuron_misses += st.misses;
            drop(e);
            self.ctx.reset_offload_stats();
            e = self.metrics.engine.lock().unwrap_or_else(|p| p.into_inner());
        }
        e.peak_rss = planning::peak_rss();
    }
}
