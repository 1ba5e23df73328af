//! The `pinion` binary: run, chat, bench, perplexity and tokenize, with llama.cpp-like flags and output.
//!
//! Generated text goes to stdout; progress, timings and diagnostics go to stderr, so that stdout can be piped.
//! Errors print one `error: ...` line and exit non-zero.

mod plot;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pinion_plan::Budget;
use pinion_prepare::registry;
use pinion_runtime::{
    BenchTest, CachePolicy, ChatMessage, Context, ContextParams, DenseChoice, GenerateParams, Model, Plan,
    PlanOptions, SamplerParams, StopReason, planning,
};

#[derive(Parser, Debug)]
#[command(name = "pinion", version, about = "Fast LLM inference for models larger than memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Chat interactively, using the model's chat template.
    Chat(ChatArgs),
    /// Measure prompt processing and generation speed the way llama-bench does.
    Bench(BenchArgs),
    /// Measure perplexity on a text file the way llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Print the tokens of a text.
    Tokenize(TokenizeArgs),
    /// Serve the OpenAI API (completions, chat completions, streaming) with continuous batching.
    Serve(ServeArgs),
    /// Convert a Hugging Face checkpoint (Llama, Qwen2, Qwen3; safetensors) to GGUF as llama.cpp's converter does.
    Convert(ConvertArgs),
    /// Fetch a known model into the models directory.
    Fetch {
        /// Model name.
        #[arg(default_value = "smollm2-135m")]
        name: String,
    },
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Model: a GGUF file, or a directory prepared by `cargo xtask prepare` (sparse, neuron-major). Default: the
    /// SmolLM2-135M model in models/, fetched if missing.
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Compute threads.
    #[arg(short = 't', long = "threads", default_value_t = default_threads())]
    threads: usize,
    /// Threshold sparsity: a thresholds file from `cargo xtask calibrate` (FFN neurons with small activations
    /// are skipped).
    #[arg(long = "thresholds")]
    thresholds: Option<PathBuf>,
    /// Prepared models: ignore the trained predictors (use the thresholds alone).
    #[arg(long = "no-predictors")]
    no_predictors: bool,
    /// Prepared models: let the trained predictors choose FFN neurons also on a SiLU model (they predict
    /// "above threshold"; the default there is thresholds alone).
    #[arg(long = "predictors", conflicts_with = "no_predictors")]
    predictors: bool,
    /// Prepared models: run the FFN densely (no thresholds, no predictors).
    #[arg(long = "dense", conflicts_with_all = ["thresholds", "predictors"])]
    dense: bool,
    /// Prepared models: run under this memory budget: bytes with an optional K/M/G/KiB/MiB/GiB suffix, or a
    /// percentage of the GGUF file the model was prepared from, like 50% (over 100% is allowed). The whole
    /// process (weights, KV cache, buffers) stays within it; weights that do not fit are read from storage as
    /// needed.
    #[arg(long = "mem-budget")]
    mem_budget: Option<Budget>,
    /// Offloaded runs: read a neuron's up row and down column separately (no bundles).
    #[arg(long = "no-bundle", requires = "mem_budget")]
    no_bundle: bool,
    /// Offloaded runs: keep no FFN neuron in memory (read every one every token).
    #[arg(long = "no-cache", requires = "mem_budget")]
    no_cache: bool,
    /// Offloaded runs: read everything a layer needs, then compute (no overlap of reads and compute).
    #[arg(long = "no-pipeline", requires = "mem_budget")]
    no_pipeline: bool,
    /// Offloaded runs: the neuron cache policy: powerinfer2 (hot neurons pinned, plus an LRU) or llmflash
    /// (LLM in a Flash: nothing pinned, a sliding window of the last 5 tokens' neurons).
    #[arg(long = "policy", value_enum, default_value_t = PolicyArg::Powerinfer2, requires = "mem_budget")]
    policy: PolicyArg,
    /// llama.cpp's approach, for comparison: the FFN dense over the memory-mapped file, the page cache as the
    /// only cache (a budget is then not enforced by pinion: run it under a cgroup memory limit).
    #[arg(long = "mmap-dense", conflicts_with_all = ["mem_budget", "thresholds", "predictors"])]
    mmap_dense: bool,
    /// The executor of dense batched work (prefill): cpu, or npu (PowerInfer-2's NPU role: graphs compiled
    /// for static shapes and batches; on this machine it runs the CPU kernels, with the same results).
    #[arg(long = "dense-backend", value_enum, default_value_t = DenseArg::Cpu)]
    dense_backend: DenseArg,
    /// Print more: the memory plan's reasoning.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Offloaded runs: skip the checksum check of the bytes read from storage (only to measure what checking
    /// costs; a damaged or changed file then gives wrong tokens instead of an error).
    #[arg(long = "no-verify", requires = "mem_budget", hide = true)]
    no_verify: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DenseArg {
    Cpu,
    Npu,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyArg {
    Powerinfer2,
    Llmflash,
}

impl ModelArgs {
    /// A context for `model`, with this run's thresholds applied.
    fn context<'m>(&self, model: &'m Model, n_ctx: usize) -> Result<Context<'m>> {
        self.context_with(model, n_ctx, 1, self.mem_budget)
    }

    /// The plan options of this run under `budget` bytes.
    fn offload_options(&self, budget: u64) -> PlanOptions {
        PlanOptions {
            bundle: !self.no_bundle,
            cache: !self.no_cache,
            pipeline: !self.no_pipeline,
            policy: match self.policy {
                PolicyArg::Powerinfer2 => CachePolicy::PowerInfer2,
                PolicyArg::Llmflash => CachePolicy::LlmFlash { window: 5 },
            },
            ..PlanOptions::new(budget)
        }
    }

    /// A context for `model` holding `n_seq` sequences of `n_ctx` tokens, under memory budget `budget` (as
    /// given on the command line), if any.
    fn context_with<'m>(
        &self,
        model: &'m Model,
        n_ctx: usize,
        n_seq: usize,
        budget: Option<Budget>,
    ) -> Result<Context<'m>> {
        let dense = match self.dense_backend {
            DenseArg::Cpu => DenseChoice::Cpu,
            DenseArg::Npu => DenseChoice::Npu,
        };
        let params = ContextParams {
            dense,
            verify_reads: !self.no_verify,
            n_seq,
            ..ContextParams::new(n_ctx, self.threads)
        };
        let mut ctx = match budget {
            Some(b) => {
                if !model.is_packed() {
                    bail!("--mem-budget needs a prepared model (cargo xtask prepare), not a GGUF file");
                }
                let device = planning::device_for(model.path())?;
                Context::new_offloaded(
                    model,
                    params,
                    self.offload_options(b.bytes(model.source_bytes())),
                    &device,
                )?
            }
            None => Context::new(model, params)?,
        };
        if self.mmap_dense {
            if !model.is_packed() {
                bail!("--mmap-dense needs a prepared model; a GGUF already runs dense over mmap");
            }
            ctx.set_ffn_rule(None)?;
            ctx.use_predictors(false)?;
            eprintln!(
                "pinion: --mmap-dense: dense FFN over the memory-mapped file; the page cache is the only cache"
            );
        }
        if let Some(p) = &self.thresholds {
            let t = pinion_prepare::Thresholds::load(p)?;
            eprintln!(
                "pinion: threshold sparsity {:.2} ({} rule) from {} ({} layers)",
                t.target_sparsity,
                t.rule_name(),
                p.display(),
                t.layers.len()
            );
            ctx.set_ffn_rule(Some(t.rule()))?;
        }
        if self.dense {
            ctx.set_ffn_rule(None)?;
        }
        if (self.no_predictors || self.dense) || self.predictors {
            let has = ctx.use_predictors(self.predictors)?;
            if self.predictors && !has {
                anyhow::bail!(
                    "--predictors: this model has no trained predictors (prepare it without --no-predictors)"
                );
            }
        }
        if model.is_packed() {
            let s = model.sparsity();
            eprintln!(
                "pinion: packed FFN; sparsity: {}{}",
                match (ctx.ffn_rule(), s.target_sparsity) {
                    (None, _) => "dense".to_string(),
                    (Some(r), Some(t)) => format!(
                        "thresholds for {t:.2} ({} rule{})",
                        if r.scales.is_some() { "weighted" } else { "CATS" },
                        match s.quality {
                            Some((got, max)) if Some(r) == s.rule.as_ref() => format!(
                                "; perplexity {:+.1}% on held-out calibration text when prepared, budget {:.1}%",
                                100.0 * got,
                                100.0 * max
                            ),
                            _ => String::new(),
                        }
                    ),
                    (Some(_), None) => "the activation's own zeros".to_string(),
                },
                if ctx.uses_predictors() { ", predictors choose neurons" } else { "" }
            );
        }
        // The plan as it stands once the predictors are chosen (choosing them plans an offloaded run anew).
        if let Some(plan) = ctx.plan() {
            match self.verbose {
                true => eprint!("pinion: {}", plan.render_with_reasoning()),
                false => eprint!("pinion: {}", plan.render()),
            }
        }
        if let Some(b) = ctx.offload_backend() {
            eprintln!("pinion: FFN and output head streamed from storage with {b}");
        }
        Ok(ctx)
    }
}

#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.8)]
    temp: f32,
    /// Top-k sampling (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    top_k: usize,
    /// Top-p sampling (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    top_p: f32,
    /// Min-p sampling (0.0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for repeated tokens (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Number of recent tokens the repetition penalty considers.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed (default: from the clock).
    #[arg(short = 's', long = "seed")]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplerParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        SamplerParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OutputFormat {
    Text,
    Json,
}

/// Where the input text comes from.
#[derive(Args, Debug)]
struct PromptArgs {
    /// Prompt text.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
}

impl PromptArgs {
    fn read(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => {
                std::fs::read_to_string(f).with_context(|| format!("reading prompt file {}", f.display()))
            }
            (None, None) => bail!("no prompt: give -p TEXT or -f FILE"),
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: PromptArgs,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Context size in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating past end-of-generation tokens.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
    /// Stop when this string is generated (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Do not echo the prompt before the generated text.
    #[arg(long = "no-display-prompt")]
    no_display_prompt: bool,
    /// Output format: text streams tokens; json prints one JSON object at the end.
    #[arg(long = "output-format", value_enum, default_value_t = OutputFormat::Text)]
    output_format: OutputFormat,
}

#[derive(Args, Debug)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long = "system")]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
    /// Context size in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context size of each sequence, in tokens (every sequence's KV cache counts in a memory budget).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    ctx_size: usize,
    /// Address to listen on.
    #[arg(long = "host", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long = "port", default_value_t = 8080)]
    port: u16,
    /// Requests decoded together at most (sequence slots).
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: u16,
    /// Requests that may wait for a slot; beyond, requests get 503 with Retry-After.
    #[arg(long = "queue", default_value_t = 64)]
    queue: usize,
    /// The model's name in the API (default: the model file's name).
    #[arg(long = "alias")]
    alias: Option<String>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths to test (ppN).
    #[arg(short = 'p', long = "n-prompt", default_value = "512", value_delimiter = ',')]
    n_prompt: Vec<usize>,
    /// Generation lengths to test (tgN).
    #[arg(short = 'n', long = "n-reply", default_value = "128", value_delimiter = ',')]
    n_gen: Vec<usize>,
    /// Sequences decoded together: each S > 1 adds a test tgNxS per generation length (N tokens in each of S
    /// sequences, one batched step per token, as `pinion serve` decodes S requests).
    #[arg(long = "parallel", visible_alias = "npl", default_value = "1", value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Repetitions of each test, after one warm-up run.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,
    /// Output format: md prints a llama-bench table; json one object.
    #[arg(short = 'o', long = "output-format", value_enum, default_value_t = BenchFormat::Md)]
    output_format: BenchFormat,
    /// Measure generation speed at each of these memory budgets (comma-separated sizes or percentages, like
    /// 30%,50%,75%,100%) and print tokens/s against the budget (PowerInfer-2's Figure 10), with a PNG plot.
    #[arg(long = "sweep-budget", value_delimiter = ',', conflicts_with = "mem_budget")]
    sweep_budget: Vec<Budget>,
    /// Where --sweep-budget writes its plot.
    #[arg(long = "sweep-plot", default_value = "sweep-budget.png")]
    sweep_plot: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchFormat {
    Md,
    Json,
}

#[derive(Args, Debug)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Context size (chunk length) in tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,
    /// Score at most this many chunks.
    #[arg(long = "chunks")]
    chunks: Option<usize>,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: PromptArgs,
    /// Print only the ids, on one line.
    #[arg(long = "ids")]
    ids: bool,
    /// Add BOS/EOS as the model asks.
    #[arg(long = "add-special")]
    add_special: bool,
    /// Treat special-token text (like `<|im_start|>`) as plain text.
    #[arg(long = "no-parse-special")]
    no_parse_special: bool,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Perplexity(a) => cmd_perplexity(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Serve(a) => cmd_serve(a),
        Command::Convert(a) => cmd_convert(a),
        Command::Fetch { name } => cmd_fetch(&name).map(|_| ()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause after a colon, leaving out a cause the message before it
/// already shows (typed errors that put their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// The Hugging Face model directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
    hf_dir: PathBuf,
    /// The GGUF file to write (replaced; written to FILE.partial first).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Type of the matrices: f16 and q8_0 as llama.cpp's convert_hf_to_gguf.py, q4_0 as `llama-quantize --pure`
    /// of the f16 file.
    #[arg(long = "type", default_value = "f16")]
    ty: pinion_convert::OutType,
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let params = pinion_convert::ConvertParams { model_dir: &a.hf_dir, out: &a.out, out_type: a.ty };
    let s = pinion_convert::convert(&params).with_context(|| format!("converting {}", a.hf_dir.display()))?;
    eprintln!(
        "pinion: wrote {} ({}, {} tensors, {} parameters, {} bytes)",
        a.out.display(),
        s.arch,
        s.n_tensors,
        s.n_params,
        s.n_bytes
    );
    Ok(())
}

fn cmd_fetch(name: &str) -> Result<PathBuf> {
    let model = registry::known_model(name).with_context(|| {
        let names: Vec<_> = registry::KNOWN_MODELS.iter().map(|m| m.name).collect();
        format!("unknown model '{name}' (known: {})", names.join(", "))
    })?;
    Ok(registry::fetch(model, &registry::models_dir(), &mut |line| eprintln!("fetch: {line}"))?)
}

/// The model path: the one given, else the default, fetched if missing.
fn resolve_model(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        if !p.exists() {
            bail!("model file {} not found", p.display());
        }
        return Ok(p.clone());
    }
    let p = registry::default_model_path();
    if p.exists() {
        return Ok(p);
    }
    eprintln!(
        "pinion: default model {} is missing; fetching it (cargo xtask fetch smollm2-135m does the same)",
        p.display()
    );
    cmd_fetch(registry::SMOLLM2_135M.name)
}

fn load(args: &ModelArgs) -> Result<Model> {
    let path = resolve_model(&args.model)?;
    let t = Instant::now();
    let model = Model::load(&path)?;
    let c = model.config();
    let experts = match c.moe {
        Some(m) => format!(", {} experts of ff={}, {} used", m.n_expert, c.n_ff, m.n_expert_used),
        None => String::new(),
    };
    eprintln!(
        "pinion: loaded {} ({}, {} layers, d={}{experts}, {:.1} MiB) in {:.0} ms",
        path.display(),
        c.name.as_deref().unwrap_or(&c.arch),
        c.n_layers,
        c.d_model,
        model.file_size() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(model)
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let prompt = a.input.read()?;
    let model = load(&a.model)?;
    let tok = model.tokenizer();
    let prompt_tokens = tok.encode(&prompt, true, true);
    let mut ctx = a.model.context(&model, a.ctx_size)?;
    let params = GenerateParams {
        n_predict: a.n_predict,
        ignore_eos: a.ignore_eos,
        stop: a.stop.clone(),
        sampler: a.sampling.params(),
    };
    let json = a.output_format == OutputFormat::Json;
    let mut stdout = std::io::stdout().lock();
    if !json && !a.no_display_prompt {
        write!(stdout, "{prompt}")?;
        stdout.flush()?;
    }
    let result = pinion_runtime::generate(&mut ctx, &prompt_tokens, &params, &mut |text| {
        if !json {
            let _ = write!(stdout, "{text}");
            let _ = stdout.flush();
        }
        true
    })?;
    let t = result.timings;
    if json {
        let obj = serde_json::json!({
            "model": model.config().name,
            "prompt": prompt,
            "prompt_tokens": prompt_tokens,
            "tokens": result.tokens,
            "text": result.text,
            "stop_reason": stop_reason_name(&result.stop_reason),
            "timings": {
                "prompt_n": t.prompt_tokens,
                "prompt_ms": t.prompt.as_secs_f64() * 1e3,
                "prompt_per_second": t.prompt_tps(),
                "predicted_n": t.generated_tokens,
                "predicted_ms": t.generation.as_secs_f64() * 1e3,
                "predicted_per_second": t.generation_tps(),
            },
            "threads": a.model.threads,
            "n_ctx": a.ctx_size,
            "model_size_bytes": model.file_size(),
            "peak_rss_bytes": peak_rss_bytes(),
            "mem_budget_bytes": ctx.plan().map(|p| p.memory.budget),
        });
        let mut obj = obj;
        if let (Some(st), Some(map)) = (ctx.offload_stats(), obj.as_object_mut()) {
            map.extend(offload_json(st, ctx.plan(), ctx.model().config().experts_per_layer()));
        }
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
    }
    eprintln!();
    eprintln!(
        "prompt eval: {:>5} tokens in {:>8.2} ms ({:>8.2} tokens/s)",
        t.prompt_tokens,
        t.prompt.as_secs_f64() * 1e3,
        t.prompt_tps()
    );
    eprintln!(
        "generation:  {:>5} tokens in {:>8.2} ms ({:>8.2} tokens/s), stop: {}",
        t.generated_tokens,
        t.generation.as_secs_f64() * 1e3,
        t.generation_tps(),
        stop_reason_name(&result.stop_reason)
    );
    if let Some(st) = ctx.offload_stats() {
        eprint!(
            "{}",
            render_offload_stats(st, ctx.plan(), peak_rss_bytes(), ctx.model().config().experts_per_layer())
        );
    }
    Ok(())
}

fn stop_reason_name(r: &StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration => "eog",
        StopReason::Length => "length",
        StopReason::StopString(_) => "stop_string",
        StopReason::Cancelled => "cancelled",
    }
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let model = load(&a.model)?;
    let mut ctx = a.model.context(&model, a.ctx_size)?;
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage { role: "system".into(), content: s.clone() });
    }
    // Tokens currently in the KV cache, to reuse the common prefix between turns.
    let mut cached: Vec<u32> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    eprintln!("pinion chat: type a message and press Enter; an empty line or Ctrl-D quits.");
    loop {
        write!(stdout, "\n> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage { role: "user".into(), content: line.trim_end().to_string() });
        let all = model.encode_chat(&messages, true)?;
        let common = cached.iter().zip(&all).take_while(|(a, b)| a == b).count().min(all.len() - 1);
        ctx.truncate(common);
        cached.truncate(common);
        let room = a.ctx_size.saturating_sub(all.len());
        if room == 0 {
            bail!("the conversation ({} tokens) no longer fits the context of {}", all.len(), a.ctx_size);
        }
        let params = GenerateParams {
            n_predict: a.n_predict.min(room),
            ignore_eos: false,
            stop: Vec::new(),
            sampler: a.sampling.params(),
        };
        let reply = pinion_runtime::generate(&mut ctx, &all[common..], &params, &mut |t| {
            let _ = write!(stdout, "{t}");
            let _ = stdout.flush();
            true
        })?;
        writeln!(stdout)?;
        eprintln!(
            "[{} tokens, {:.1} tokens/s]",
            reply.timings.generated_tokens,
            reply.timings.generation_tps()
        );
        cached = all;
        cached.extend(&reply.tokens);
        // The KV cache holds the last sampled token only if it was fed back; keep the two in step.
        ctx.truncate(cached.len() - 1);
        cached.pop();
        messages.push(ChatMessage { role: "assistant".into(), content: reply.text });
    }
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let model = load(&a.model)?;
    let ctx = a.model.context_with(&model, a.ctx_size, a.parallel.into(), a.model.mem_budget);
    let mut ctx = ctx.map_err(|e| {
        let budget = matches!(
            e.downcast_ref::<pinion_runtime::RuntimeError>(),
            Some(pinion_runtime::RuntimeError::Plan(pinion_plan::PlanError::BudgetTooSmall { .. }))
        );
        match budget {
            true => e.context(format!(
                "{} sequences of {} tokens (each has its own KV cache: fewer with --parallel, shorter with -c)",
                a.parallel, a.ctx_size
            )),
            false => e,
        }
    })?;
    // The model's name: the GGUF's file stem, or the prepared directory's name.
    let id = a.alias.clone().unwrap_or_else(|| {
        let p = model.path();
        let name = match p.parent() {
            Some(dir) if p.ends_with(pinion_runtime::PACKED_FILE_NAME) => dir.file_name(),
            _ => p.file_stem(),
        };
        name.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    });
    let opts = pinion_serve::ServeOptions {
        host: a.host.clone(),
        port: a.port,
        queue: a.queue,
        ..pinion_serve::ServeOptions::new(id)
    };
    pinion_serve::serve(&mut ctx, &opts, &mut |addr| {
        eprintln!(
            "pinion serve: {} on http://{addr}/v1 ({} sequences of {} tokens, queue {}); Ctrl-C or SIGTERM stops",
            opts.model_id, a.parallel, a.ctx_size, opts.queue
        );
    })?;
    eprintln!("pinion serve: stopped");
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let model = load(&a.model)?;
    let mut tests: Vec<BenchTest> =
        a.n_prompt.iter().filter(|&&n| n > 0).map(|&n| BenchTest::Prompt(n)).collect();
    tests.extend(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| BenchTest::Generate(n)));
    for &seqs in a.parallel.iter().filter(|&&s| s > 1) {
        tests.extend(a.n_gen.iter().filter(|&&n| n > 0).map(|&n| BenchTest::Batched { n, seqs }));
    }
    let n_ctx = tests.iter().map(|t| match *t {
        BenchTest::Prompt(n) | BenchTest::Generate(n) | BenchTest::Batched { n, .. } => n,
    });
    let n_ctx = n_ctx.max().unwrap_or(512);
    if !a.sweep_budget.is_empty() {
        return bench_sweep(&a, &model, n_ctx);
    }
    let n_seq = a.parallel.iter().copied().max().unwrap_or(1).max(1);
    let mut ctx = a.model.context_with(&model, n_ctx, n_seq, a.model.mem_budget)?;
    let c = model.config();
    let size = format!("{:.2} MiB", model.file_size() as f64 / (1 << 20) as f64);
    let params = format!("{:.2} M", model.n_params() as f64 / 1e6);
    let name = format!("{} {}", c.arch, c.name.as_deref().unwrap_or(""));
    let backend = if ctx.plan().is_some() { "CPU+flash" } else { "CPU" };
    let mut results = Vec::new();
    let mut offload = None;
    if a.output_format == BenchFormat::Md {
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    }
    for test in tests {
        ctx.reset_offload_stats();
        let r = pinion_runtime::run_bench(&mut ctx, test, a.repetitions.max(1))?;
        if a.output_format == BenchFormat::Md {
            println!(
                "| {} | {size} | {params} | {backend} | {} | {} | {:.2} ± {:.2} |",
                name.trim(),
                a.model.threads,
                r.test,
                r.mean(),
                r.stdev()
            );
        }
        if matches!(test, BenchTest::Generate(_)) {
            offload = ctx.offload_stats().cloned();
        }
        results.push(r);
    }
    let peak = peak_rss_bytes();
    let budget = ctx.plan().map(|p| p.memory.budget);
    if a.output_format == BenchFormat::Md {
        if let Some(st) = &offload {
            println!();
            print!(
                "{}",
                render_offload_stats(st, ctx.plan(), peak, ctx.model().config().experts_per_layer())
            );
        }
    }
    if a.output_format == BenchFormat::Json {
        let tests: Vec<_> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "test": r.test.to_string(), "mean_tps": r.mean(), "stdev_tps": r.stdev(),
                    "median_tps": r.median(), "samples_tps": r.samples_tps,
                })
            })
            .collect();
        let tg = results.iter().rev().find(|r| matches!(r.test, BenchTest::Generate(_)));
        let mut obj = serde_json::json!({
            "model": name.trim(), "model_size_bytes": model.file_size(), "threads": a.model.threads,
            "tokens_per_s": tg.map(|r| r.median()),
            "peak_rss_bytes": peak,
            "mem_budget_bytes": budget,
            "tests": tests,
        });
        if let (Some(st), Some(map)) = (&offload, obj.as_object_mut()) {
            map.extend(offload_json(st, ctx.plan(), ctx.model().config().experts_per_layer()));
        }
        println!("{obj}");
    }
    Ok(())
}

/// The offload counters of a generation test, and what the plan predicted, as JSON fields.
fn offload_json(
    st: &pinion_runtime::OffloadStats,
    plan: Option<&Plan>,
    experts: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let predicted = plan.map(|p| &p.predicted);
    let v = serde_json::json!({
        "predicted_tokens_per_s": predicted.map(|p| p.tokens_per_s),
        "predicted_mb_read_per_token": predicted.map(|p| p.mb_read_per_token),
        "predicted_hit_rate": predicted.map(|p| p.hit_rate),
        "plan_device": plan.map(|p| p.device.clone()),
        "decode_tokens_per_s": st.tokens_per_s(),
        "verify_share": st.verify_share(),
        "mb_read_per_token": st.mb_read_per_token(),
        "read_mb_per_s": st.read_mb_per_s(),
        "disk_reads_per_token": st.disk_reads_per_token(),
        "disk_mb_per_token": st.mb_per_token(st.disk_bytes),
        "io_stall_share": st.io_stall_share(),
        "hit_rate": st.hit_rate(),
        "hit_rate_pinned": st.pinned_hit_rate(),
        "hit_rate_lru": st.lru_hit_rate(),
        "gate_hit_rate": st.gate_hit_rate(),
        "mb_read_per_token_gates": st.mb_per_token(st.gate_bytes),
        "mb_read_per_token_bundles": st.mb_per_token(st.bundle_bytes),
        "mb_read_per_token_head": st.mb_per_token(st.head_bytes),
        "mb_read_per_token_embeddings": st.mb_per_token(st.embd_bytes),
        "latency_ms_p50": st.latency_quantile(0.5) * 1e3,
        "latency_ms_p90": st.latency_quantile(0.9) * 1e3,
        "latency_ms_p99": st.latency_quantile(0.99) * 1e3,
        "decode_tokens": st.tokens,
        "neurons_per_layer": st.neurons_per_layer_per_token(experts),
        "experts_per_token": (experts > 1).then(|| st.units_per_token()),
        "expert_hit_rate": (experts > 1).then(|| st.unit_hit_rate()),
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a JSON object"),
    }
}

/// The offload counters of a generation test, for the terminal, with what the plan predicted.
fn render_offload_stats(
    st: &pinion_runtime::OffloadStats,
    plan: Option<&Plan>,
    peak: Option<u64>,
    experts: usize,
) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let per_layer = st.neurons_per_layer_per_token(experts);
    let (lo, hi) = per_layer.iter().fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    let mut out = String::new();
    out += &format!(
        "offloaded: budget {:.1} MiB, peak RSS {:.1} MiB, {} decode tokens\n",
        plan.map_or(0.0, |p| mib(p.memory.budget)),
        peak.map_or(0.0, mib),
        st.tokens
    );
    if let Some(p) = plan {
        out += &format!(
            "  speed: {:.2} tokens/s measured, {:.2} predicted by the plan ({:+.0}%){}\n",
            st.tokens_per_s(),
            p.predicted.tokens_per_s,
            100.0 * (p.predicted.tokens_per_s / st.tokens_per_s().max(1e-9) - 1.0),
            if p.device == "measured" { "" } else { " (reference device profile)" }
        );
    }
    out += &format!(
        "  latency per token: P50 {:.2} ms, P90 {:.2} ms, P99 {:.2} ms; I/O stall {:.1}% of token time; \
         checksums {:.1}%\n",
        st.latency_quantile(0.5) * 1e3,
        st.latency_quantile(0.9) * 1e3,
        st.latency_quantile(0.99) * 1e3,
        100.0 * st.io_stall_share(),
        100.0 * st.verify_share()
    );
    out += &format!(
        "  read per token: {:.2} MB (gates {:.2}, bundles {:.2}, output head {:.2}, embeddings {:.3}); {:.0} MB/s\n",
        st.mb_read_per_token(),
        st.mb_per_token(st.gate_bytes),
        st.mb_per_token(st.bundle_bytes),
        st.mb_per_token(st.head_bytes),
        st.mb_per_token(st.embd_bytes),
        st.read_mb_per_s()
    );
    out += &format!(
        "  disk per token: {:.0} reads after merging, {:.2} MB transferred (whole pages)\n",
        st.disk_reads_per_token(),
        st.mb_per_token(st.disk_bytes)
    );
    out += &format!(
        "  neuron hit rate {:.1}% (fixed {:.1}%, neuron LRU {:.1}%); gate blocks in memory {:.1}%\n",
        100.0 * st.hit_rate(),
        100.0 * st.pinned_hit_rate(),
        100.0 * st.lru_hit_rate(),
        100.0 * st.gate_hit_rate()
    );
    if experts > 1 {
        out += &format!(
            "  experts routed per token {:.1} (over all layers); served wholly from memory {:.1}%\n",
            st.units_per_token(),
            100.0 * st.unit_hit_rate()
        );
    }
    out += &format!(
        "  neurons computed per layer per token: mean {:.0} (min {:.0}, max {:.0})\n",
        per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64,
        if per_layer.is_empty() { 0.0 } else { lo },
        hi
    );
    out
}

/// `bench --sweep-budget`: generation speed at each budget, as a table and a PNG plot.
fn bench_sweep(a: &BenchArgs, model: &Model, n_ctx: usize) -> Result<()> {
    let n_gen = a.n_gen.iter().copied().filter(|&n| n > 0).max().unwrap_or(64);
    let weights = model.source_bytes();
    let mut points = Vec::new();
    for &b in &a.sweep_budget {
        let bytes = b.bytes(weights);
        model.release_pages();
        let mut ctx = match a.model.context_with(model, n_ctx.max(n_gen), 1, Some(b)) {
            Ok(ctx) => ctx,
            Err(e) => {
                eprintln!("pinion: budget {b}: {e:#}; skipped");
                continue;
            }
        };
        ctx.reset_offload_stats();
        let r = pinion_runtime::run_bench(&mut ctx, BenchTest::Generate(n_gen), a.repetitions.max(1))?;
        let st = ctx.offload_stats().cloned().unwrap_or_default();
        let predicted = ctx.plan().map_or(0.0, |p| p.predicted.tokens_per_s);
        eprintln!("pinion: budget {b}: tg{n_gen} {:.2} t/s (plan: {predicted:.2})", r.median());
        points.push(plot::SweepPoint {
            budget_bytes: bytes,
            budget_share: bytes as f64 / weights as f64,
            tokens_per_s: r.median(),
            predicted_tokens_per_s: predicted,
            mb_read_per_token: st.mb_read_per_token(),
            hit_rate: st.hit_rate(),
            io_stall_share: st.io_stall_share(),
        });
    }
    if points.is_empty() {
        bail!("--sweep-budget: no budget could run (each was below the minimum)");
    }
    let title = format!("tokens/s against memory budget (tg{n_gen}, {} threads)", a.model.threads);
    if a.output_format == BenchFormat::Json {
        println!("{}", serde_json::json!({ "source_gguf_bytes": weights, "sweep": points }));
    } else {
        print!("{}", plot::render_sweep_table(&points));
    }
    plot::write_sweep_png(&a.sweep_plot, &title, &points, &[])?;
    eprintln!("pinion: plot written to {}", a.sweep_plot.display());
    Ok(())
}

/// Peak resident set size of this process (VmHWM), if the platform reports it.
fn peak_rss_bytes() -> Option<u64> {
    planning::peak_rss()
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let model = load(&a.model)?;
    let tok = model.tokenizer();
    let t = Instant::now();
    let tokens = tok.encode(&text, true, false);
    eprintln!(
        "perplexity: tokenized {} in {:.0} ms: {} tokens",
        a.file.display(),
        t.elapsed().as_secs_f64() * 1e3,
        tokens.len()
    );
    if tokens.len() < 2 * a.ctx_size {
        bail!(
            "{} has {} tokens; perplexity needs at least 2 * n_ctx = {} (lower -c)",
            a.file.display(),
            tokens.len(),
            2 * a.ctx_size
        );
    }
    let n_chunks = a.chunks.map_or(tokens.len() / a.ctx_size, |c| c.min(tokens.len() / a.ctx_size));
    eprintln!("perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={}", a.ctx_size);
    let mut ctx = a.model.context(&model, a.ctx_size)?;
    let bos = tok.added_bos();
    let t = Instant::now();
    let mut stderr = std::io::stderr().lock();
    let stats = pinion_runtime::perplexity(&mut ctx, &tokens, bos, a.chunks, &mut |s, _| {
        if s.n_chunks == 1 {
            let per_chunk = t.elapsed().as_secs_f64();
            let _ = writeln!(
                stderr,
                "perplexity: {:.2} seconds per pass - ETA {:.1} minutes",
                per_chunk,
                per_chunk * n_chunks as f64 / 60.0
            );
        }
        let _ = write!(stderr, "[{}]{:.4},", s.n_chunks, s.ppl());
        let _ = stderr.flush();
        true
    })?;
    eprintln!();
    println!("Final estimate: PPL = {:.4} ± {:.5}", stats.ppl(), stats.ppl_error());
    eprintln!(
        "perplexity: {} chunks, {} tokens scored, {:.1} s",
        stats.n_chunks,
        stats.count,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let text = a.input.read()?;
    let model = load(&a.model)?;
    let tok = model.tokenizer();
    let ids = tok.encode(&text, a.add_special, !a.no_parse_special);
    let mut out = std::io::stdout().lock();
    if a.ids {
        let s: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "[{}]", s.join(", "))?;
    } else {
        for id in ids {
            writeln!(out, "{id:>6} -> '{}'", String::from_utf8_lossy(tok.token_to_piece(id, true)))?;
        }
    }
    Ok(())
}
