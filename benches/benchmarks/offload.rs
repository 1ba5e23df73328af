//! One decode token of a whole model, from memory and offloaded under memory budgets, side by side: the
//! `offload/decode` group times `Context::eval` of one token at a fixed position (the context is truncated back
//! before each step, so every step is the same work) for
//! - `memory`: the in-memory sparse engine;
//! - `all-pinned`: offloaded with room for every weight (no reads: the pipeline's own overhead);
//! - `quarter`: offloaded with a quarter of the FFN and head bytes over the minimum;
//! - `minimum`: offloaded at the smallest budget the run accepts plus 1 MiB (almost everything read).
//!
//! The model is the `small` synthetic ReLU shape (12 layers, d_model 1024, n_ff 2816, Q4_0, about 100 MB),
//! profiled on 256 tokens, calibrated at threshold sparsity 0.5 and packed in a temporary directory at the
//! start of the run (about half a minute). Reads use O_DIRECT, so the page cache does not hide them; the
//! disk's speed is part of what the offloaded rows measure.

use std::path::{Path, PathBuf};

use criterion::{BenchmarkId, Criterion, criterion_group};
use pinion_format::synth::{self, SynthConfig};
use pinion_plan::PlanError;
use pinion_prepare::{self as prepare, PackStepOptions, ProfileOptions};
use pinion_runtime::{
    Context, ContextParams, DeviceProfile, Logits, Model, PACKED_FILE_NAME, PlanOptions, RuntimeError,
};

/// Prompt tokens before the timed decode position.
const PROMPT: usize = 32;

/// Writes, profiles and packs the synthetic model into `dir`; returns the packed file.
fn prepare_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("bench directory");
    let gguf = dir.join("small.gguf");
    let cfg = SynthConfig::preset("small").expect("preset");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&gguf).expect("create gguf"));
    synth::write_model(&cfg, &mut f, &mut |_, _| {}).expect("write synthetic model");
    drop(f);
    let model = Model::load(&gguf).expect("load synthetic model");
    let opts = ProfileOptions { max_tokens: 256, chunk: 128, token_samples: 0, ..ProfileOptions::default() };
    let profile = prepare::profile_activations(&model, &synth::sample_text(1200), &opts, &mut |_, _| {})
        .expect("profile");
    let th = prepare::calibrate(&model, &profile, 0.5, prepare::Rule::default()).expect("calibrate");
    let freq = prepare::activation_frequencies(&model, &profile, &th).expect("frequencies");
    let packed = dir.join(PACKED_FILE_NAME);
    prepare::pack_model(&gguf, &packed, &freq, &th, None, &PackStepOptions::default(), &mut |_, _| {})
        .expect("pack");
    packed
}

/// The smallest budget an offloaded run of `model` accepts now (the minimum a one-byte budget's refusal names).
fn minimum(model: &Model, params: &ContextParams) -> u64 {
    match Context::new_offloaded(model, params.clone(), PlanOptions::new(1), &DeviceProfile::reference()) {
        Err(RuntimeError::Plan(PlanError::BudgetTooSmall { minimum, .. })) => minimum,
        other => panic!("a one-byte budget: {:?}", other.map(|_| ())),
    }
}

fn bench_offload(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("pinion-bench-offload-{}", std::process::id()));
    let packed = prepare_model(&dir);
    let model = Model::load(&packed).expect("load packed model");
    let params = ContextParams::new(256, 2);
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 3 + i * 7 % 500).collect();
    let mut g = c.benchmark_group("offload/decode");
    g.sample_size(20);
    let mut step = |name: &str, ctx: &mut Context<'_>| {
        ctx.eval(&prompt, Logits::Last).expect("prompt");
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                ctx.truncate(PROMPT);
                ctx.eval(&[42], Logits::Last).expect("decode").len()
            })
        });
    };
    let mut mem = Context::new(&model, params.clone()).expect("in-memory context");
    step("memory", &mut mem);
    drop(mem);
    // The in-memory run faulted the whole file in: drop its pages, as an offloaded run's process never has them.
    model.release_pages();
    let min = minimum(&model, &params);
    let weights: u64 = {
        let device = DeviceProfile::reference();
        let probe =
            Context::new_offloaded(&model, params.clone(), PlanOptions::new(min + (1 << 20)), &device)
                .expect("probe");
        let plan = probe.plan().expect("plan");
        plan.memory.ffn_total + plan.memory.head_total + plan.memory.attention
    };
    // Each budget is its extra over the minimum measured just before (the process's resident set moves).
    for (name, extra) in [("all-pinned", 2 * weights), ("quarter", weights / 4), ("minimum", 1 << 20)] {
        model.release_pages();
        let budget = minimum(&model, &params) + extra;
        let device = DeviceProfile::reference();
        let mut ctx = Context::new_offloaded(&model, params.clone(), PlanOptions::new(budget), &device)
            .expect("offloaded");
        step(name, &mut ctx);
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_offload);
