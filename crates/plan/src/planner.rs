//! The planner: a model's shape and activation statistics, a [`DeviceProfile`], a memory budget and the run's
//! switches in; the [`Plan`] the offloaded engine runs out: every memory segment in bytes, what is pinned per
//! layer, the cache regions, how each layer's neurons are read, the I/O depth and read-ahead, the threads, and
//! the predicted speed with its reasoning.
//!
//! Memory. What every token needs comes first (the process as loaded, attention weights, KV cache, scratch,
//! I/O buffers, predictors, cache bookkeeping, a margin); a budget below that is refused with the minimum. The
//! rest is spent by value: each byte kept in memory saves the bytes a token would otherwise read, so units
//! (output-head rows, gate blocks, neuron bundles) are taken in order of expected bytes saved per byte, each
//! layer's pinned set a prefix of its hotness order. Output-head rows and, with thresholds, gate blocks are read
//! every token; a bundle is read when its neuron fires, except in layers read whole (dense enough that one read
//! of a cluster's record costs less than reading its active bundles one by one). The neuron-level LRU regions
//! of layers read in two phases are sized by the hits an LRU of that size can expect (Che's approximation over
//! the per-token firing probabilities), with a floor for the reuse between consecutive tokens that the
//! statistics do not record. There is no cluster-level LRU: a static pinned set of the same bytes always beats
//! it under these statistics, and a layer read whole reads its records in the same order every token, which an
//! LRU smaller than the layer only thrashes.
//!
//! Speed. A token's compute is the weight bytes its kernels touch at the measured kernel speed plus the
//! threads' synchronisation and a measured per-layer cost; its reads are the expected bytes at the device's
//! measured throughput for their size and depth. Reads that do not depend on the token (output-head rows, and
//! with thresholds every gate block and every record of a layer read whole) stream ahead of compute, which hides
//! only part of the shorter of the two (measured); reads that depend on a layer's input (bundles of neurons that
//! pass the gate, rows the predictor picks) cost a round trip each layer.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::device::DeviceProfile;
use crate::error::{PlanError, mib};

/// The `format` field of a serialized plan.
pub const PLAN_FORMAT: &str = "pinion-plan";
/// The version of the serialized plan this code writes and reads.
pub const PLAN_VERSION: u64 = 3;

/// Bytes kept aside for what the plan does not itemize (allocator slack, thread stacks, per-read lists).
pub const MARGIN: u64 = 2 << 20;
/// Bytes kept aside per FFN unit beside `MARGIN`: the offloaded run's bookkeeping of each unit outside the
/// cache (its slots in the read stash, read-ahead lists, lists of pinned entries, counters). Measured on the
/// qwen3-30b-a3b shape (6,144 experts of 768 neurons): without it the resident set passed the budget by 12 to 26
/// MiB (2 to 4 KiB per unit); a dense model's few layers make it negligible.
const UNIT_MARGIN: u64 = 6 << 10;
/// The kernel's page tables of `bytes` of process memory: an 8-byte entry per 4 KiB page (x86-64 and AArch64
/// with 4 KiB pages; the upper levels are 1/512 of that again, within the margin).
fn page_tables(bytes: u64) -> u64 {
    bytes.div_ceil(512)
}

/// Flash reads are aligned to this many bytes.
const BLOCK: u64 = 4096;
/// Expected share of active neurons among a layer's unpinned ones at and above which its records are read
/// whole (gate rows and bundles in one read) rather than in two phases.
pub const WHOLE_RECORD_DENSITY: f64 = 0.25;
/// Shares of the FFN memory the planner tries for the LRU regions (it keeps the fastest).
const LRU_SHARES: [f64; 6] = [0.0, 0.05, 0.1, 0.15, 0.25, 0.4];
/// Least share of the FFN memory a neuron LRU gets when layers are read in two phases. The planner's hit
/// estimate (Che's approximation) takes tokens as independent, so it sees no use in an LRU a static pinned set
/// of the same bytes would not beat; but consecutive tokens share active neurons, which calibration statistics do
/// not record. Measured on the 7B shape at 50% of its GGUF (2 threads, tg16, two runs each): no LRU, 1.53 MB of
/// bundles read per token, 5.69 and 6.83 t/s; 15% of the FFN memory as an LRU, 0.38 MB, 7.10 and 6.99 t/s.
const REUSE_FLOOR: f64 = 0.15;
/// Largest read of a streamed output-head chunk or prefill piece.
pub const CHUNK: u64 = 512 << 10;
/// Largest read the offloaded engine's I/O merges adjacent requests into.
const COALESCE: u64 = 512 << 10;
/// Bytes per token the sparse kernels process at the matrix-vector kernel's speed, relative to it: a bundle
/// is one row dot product and one column axpy (dequantized), each on a short row.
const SPARSE_EFFICIENCY: f64 = 0.55;
/// Parallel steps of one layer's decode (norms, QKV, attention, output, gates, up/down, reductions).
const STEPS_PER_LAYER: f64 = 7.0;
/// Time a layer of the offloaded decode spends outside the weight kernels and the measured barrier: norms,
/// RoPE, the activations' quantization, cache lookups and the threads' wake-ups. Measured on SmolLM2 with
/// everything in memory (150% of its GGUF, 2 threads): 8.8-9.2 ms per token against 6.9 ms from its weight bytes
/// and barriers, about 70 us for each of its 30 layers. Negligible where reads bound the token.
const LAYER_OVERHEAD_S: f64 = 70e-6;
/// Shallowest I/O queue depth the planner considers: below it, the reads of a layer's active neurons wait on
/// one another.
const MIN_QUEUE_DEPTH: usize = 4;
/// Least gain in predicted tokens/s for which the planner takes a deeper I/O queue than a shallower one that
/// fits: the read probe's cells move by about this much between runs (512 KiB at depth 4 against 64, measured
/// twice an hour apart on this machine: 1,350 and 1,003 MB/s, 1,020 and 1,377 MB/s).
const DEPTH_GAIN: f64 = 0.1;
/// Share of the shorter of a token's compute and reads that the pipeline does not hide. Measured on SmolLM2 at
/// 80% and 120% of its GGUF, 1 and 2 threads, the plan's compute and read times against the run's token time
/// and I/O stall: 0.5-0.9 (the I/O thread's completions and checksums share the cores, and the read-ahead
/// restarts at each token), so reads and compute overlap far less than the ideal max(compute, reads).
const OVERLAP_LOSS: f64 = 0.7;

/// The output head's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadShape {
    /// Rows (the vocabulary).
    pub n_rows: usize,
    /// Bytes per row.
    pub row_bytes: u64,
    /// The head is the embedding table (its resident rows also serve embeddings).
    pub tied: bool,
}

/// One packed FFN unit as the planner sees it: a layer's FFN, or one expert of a mixture-of-experts layer
/// (which a token uses only when routed to it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Neurons.
    pub n_ff: usize,
    /// Neurons per packed cluster (record).
    pub cluster_neurons: usize,
    /// Bytes of one gate row.
    pub gate_row_bytes: u64,
    /// Bytes of one bundle (up row and down column).
    pub bundle_bytes: u64,
    /// Bytes from one record's start to the next (records are page aligned).
    pub stride: u64,
    /// Probability that each neuron fires in a token, in the layer's hot (packed) order (for an expert: that
    /// the token is routed to it and the neuron fires).
    pub frequency: Vec<f32>,
    /// Probability that a token uses the unit at all: 1 for a dense layer, the routing frequency of an expert.
    /// An expert's gates are read only when it is routed to, after the router (not ahead).
    #[serde(default = "one")]
    pub use_probability: f64,
    /// Share of the layer's gate rows a token needs: 1 with thresholds (every gate is computed), the
    /// predictor's density when a predictor chooses the neurons (for an expert: when it is routed to).
    pub gate_density: f64,
}

fn one() -> f64 {
    1.0
}

impl LayerShape {
    fn n_clusters(&self) -> usize {
        self.n_ff.div_ceil(self.cluster_neurons.max(1))
    }

    fn cluster_len(&self, k: usize) -> usize {
        let c = self.cluster_neurons.max(1);
        c.min(self.n_ff - k * c)
    }

    /// Bytes of the layer's records.
    pub fn layer_bytes(&self) -> u64 {
        let n = self.n_clusters() as u64;
        let last = self.cluster_len(n as usize - 1) as u64 * (self.gate_row_bytes + self.bundle_bytes);
        (n - 1) * self.stride + last.div_ceil(BLOCK) * BLOCK
    }
}

/// Bookkeeping costs of the cache regions (from `pinion-cache`), so that the plan charges what is allocated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheCosts {
    /// Bytes per LRU entry beyond its payload.
    pub entry_overhead: u64,
    /// Bytes per key of an LRU region (its key-to-slot table).
    pub key_overhead: u64,
    /// Alignment of fixed-region entries (each entry may take this much more).
    pub fixed_align: u64,
}

/// What the planner knows about a model and the process that runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    /// Model name, for the record.
    pub model: String,
    /// Bytes of the GGUF the model was prepared from (the base of percentage budgets).
    pub source_bytes: u64,
    /// Resident set of the process before the run's context is made (binary, tokenizer, norms), measured.
    pub process_bytes: u64,
    /// Weights every token reads besides the FFN and the output head (attention), kept in memory.
    pub attention_bytes: u64,
    /// Number of separate attention tensors (fixed-region entries).
    pub attention_tensors: usize,
    /// The output head.
    pub head: HeadShape,
    /// KV cache of the whole context.
    pub kv_bytes: u64,
    /// Activations, logits and per-cluster sums.
    pub scratch_bytes: u64,
    /// Decoded predictors held in memory.
    pub predictor_bytes: u64,
    /// Predictors choose the neurons (gate rows are read for predicted neurons only).
    pub predicting: bool,
    /// The FFN layers.
    pub layers: Vec<LayerShape>,
    /// Cache bookkeeping costs.
    pub cache: CacheCosts,
    /// Compute threads of the run.
    pub threads: usize,
}

/// The neuron cache's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CachePolicy {
    /// PowerInfer-2: hot neurons pinned by activation frequency, plus LRU regions.
    PowerInfer2,
    /// LLM in a Flash: nothing pinned; keep the neurons used in the last `window` tokens.
    LlmFlash {
        /// Tokens a neuron stays cached after its last use.
        window: u32,
    },
}

/// How a run is to work: its budget and which mechanisms are on (each can be switched off to measure what it
/// brings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Bytes the whole process may use (peak resident set).
    pub budget: u64,
    /// Read a neuron's up row and down column together (one bundle); off: two separate, unmerged reads.
    pub bundle: bool,
    /// Keep FFN neurons in memory (pinned and LRU); off: every FFN byte is read every token.
    pub cache: bool,
    /// Overlap reads with compute, and read ahead across layers; off: read, then compute.
    pub pipeline: bool,
    /// The cache policy.
    pub policy: CachePolicy,
    /// Reads kept in flight; `None`: the depth the device needs for the plan's read size.
    pub queue_depth: Option<usize>,
}

impl PlanOptions {
    /// Every mechanism on, PowerInfer-2's policy, the device's queue depth.
    pub fn new(budget: u64) -> PlanOptions {
        PlanOptions {
            budget,
            bundle: true,
            cache: true,
            pipeline: true,
            policy: CachePolicy::PowerInfer2,
            queue_depth: None,
        }
    }
}

/// How the budget is spent, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// The budget.
    pub budget: u64,
    /// Resident set of the process as loaded (measured).
    pub process: u64,
    /// Attention weights (fixed region).
    pub attention: u64,
    /// KV cache of the whole context.
    pub kv: u64,
    /// Activations, logits and per-cluster sums.
    pub scratch: u64,
    /// The I/O engine's buffer pool: reads in flight, read-ahead, and a prefill layer's records.
    pub io_buffers: u64,
    /// Without the pipeline: copies of a layer's reads, all held until its compute (none with the pipeline).
    pub staging: u64,
    /// Decoded predictors.
    pub predictors: u64,
    /// Cache bookkeeping (key tables, per-entry records, fixed-region alignment).
    pub cache_index: u64,
    /// Allocator slack and what the plan does not itemize.
    pub margin: u64,
    /// The kernel's page tables of the process's memory (8 bytes per 4 KiB page of the budget): not in the
    /// resident set, but charged to a memory cgroup, so a limit of the budget holds them too.
    #[serde(default)]
    pub page_tables: u64,
    /// Output-head rows kept in memory (fixed region).
    pub head: u64,
    /// Bytes of the whole output head.
    pub head_total: u64,
    /// Pinned gate blocks (fixed region).
    pub pinned_gates: u64,
    /// Pinned neuron bundles (fixed region).
    pub pinned_bundles: u64,
    /// Neuron-level LRU regions (payload).
    pub cold: u64,
    /// All FFN weight bytes (gate rows and bundles).
    pub ffn_total: u64,
}

impl Memory {
    /// What a run needs before any weight is cached: the smallest budget that runs.
    pub fn minimum(&self) -> u64 {
        self.process
            + self.attention
            + self.kv
            + self.scratch
            + self.io_buffers
            + self.staging
            + self.predictors
            + self.cache_index
            + self.margin
            + self.page_tables
    }

    /// Bytes planned in all (at most the budget).
    pub fn total(&self) -> u64 {
        self.minimum() + self.head + self.pinned_gates + self.pinned_bundles + self.cold
    }

    /// A one-line account of the fixed part.
    pub fn fixed_detail(&self) -> String {
        format!(
            "process {} + attention {} + KV {} + scratch {} + I/O buffers {}{} + predictors {} + cache index {} + margin {} + page tables {}",
            mib(self.process),
            mib(self.attention),
            mib(self.kv),
            mib(self.scratch),
            mib(self.io_buffers),
            match self.staging {
                0 => String::new(),
                s => format!(" + staging {}", mib(s)),
            },
            mib(self.predictors),
            mib(self.cache_index),
            mib(self.margin),
            mib(self.page_tables)
        )
    }
}

/// How one layer runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// Clusters whose gate block is pinned (a prefix).
    pub pinned_gate_clusters: usize,
    /// Positions whose bundle is pinned (a prefix of the hotness order).
    pub pinned_bundles: usize,
    /// Neuron-level LRU entries (single bundles).
    pub cold_entries: usize,
    /// Unpinned clusters are read whole (gate rows and bundles in one read), not in two phases.
    pub read_whole: bool,
    /// Expected neurons firing per token.
    pub expected_active: f64,
    /// Expected bytes read per token.
    pub expected_read_bytes: f64,
}

/// What the plan expects of a token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Decode tokens per second.
    pub tokens_per_s: f64,
    /// Decode tokens per second with every weight in memory.
    pub in_memory_tokens_per_s: f64,
    /// Megabytes (10^6) read per token.
    pub mb_read_per_token: f64,
    /// Of them, read ahead (not dependent on the token's activations).
    pub mb_streamed_per_token: f64,
    /// Share of firing neurons found in memory.
    pub hit_rate: f64,
    /// Compute time per token, ms.
    pub compute_ms: f64,
    /// Read time per token at the device's throughput, ms.
    pub io_ms: f64,
    /// Expected share of token time the compute threads wait for reads.
    pub io_stall_share: f64,
}

/// The planner's output: what the offloaded engine runs (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Model name.
    pub model: String,
    /// The options planned for.
    pub options: PlanOptions,
    /// Memory segments.
    pub memory: Memory,
    /// Output-head rows kept in memory (a prefix of the rows).
    pub head_rows: usize,
    /// Per layer.
    pub layers: Vec<LayerPlan>,
    /// Compute threads.
    pub compute_threads: usize,
    /// Reads kept in flight.
    pub io_queue_depth: usize,
    /// Bytes of token-independent reads submitted ahead of the compute that needs them.
    pub read_ahead_bytes: u64,
    /// Neurons per scheduled cluster (the packed cluster).
    pub cluster_neurons: usize,
    /// The expected speed.
    pub predicted: Prediction,
    /// `measured`, or `reference` when no device profile was measured (the plan's speed is then a guess).
    pub device: String,
    /// Why, step by step, with numbers.
    pub reasoning: Vec<String>,
}

/// The file envelope of a serialized plan.
#[derive(Serialize, Deserialize)]
struct PlanFile {
    format: String,
    version: u64,
    #[serde(flatten)]
    plan: Plan,
}

impl Plan {
    /// The plan as versioned JSON (format [`PLAN_FORMAT`], version [`PLAN_VERSION`]).
    pub fn to_json(&self) -> String {
        let file = PlanFile { format: PLAN_FORMAT.into(), version: PLAN_VERSION, plan: self.clone() };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    /// Reads [`Plan::to_json`]'s output, checking format and version; `what` names the source in errors.
    pub fn from_json(text: &str, what: &str) -> Result<Plan, PlanError> {
        let bad = |why: String| PlanError::BadFile { what: what.to_string(), why };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if v["format"] != PLAN_FORMAT {
            return Err(bad(format!("format is {}, not \"{PLAN_FORMAT}\"", v["format"])));
        }
        let found = v["version"].as_u64().ok_or_else(|| bad("no version".into()))?;
        if found != PLAN_VERSION {
            return Err(PlanError::Version { what: what.to_string(), found, expected: PLAN_VERSION });
        }
        let file: PlanFile = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        Ok(file.plan)
    }

    /// Pinned neurons in all layers.
    pub fn pinned_neurons(&self) -> usize {
        self.layers.iter().map(|l| l.pinned_bundles).sum()
    }

    /// The plan for people: the memory segments, what is pinned and cached, the predicted speed and the
    /// reasoning.
    pub fn render(&self) -> String {
        let m = &self.memory;
        let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
        let ffn_pinned = m.pinned_gates + m.pinned_bundles;
        let mut s = String::new();
        let _ =
            writeln!(s, "memory budget {}: fixed {} ({})", mib(m.budget), mib(m.minimum()), m.fixed_detail());
        let _ = writeln!(
            s,
            "  output head {} of {} in memory ({:.0}%), FFN pinned {} of {} ({:.0}%: gates {}, bundles {}), \
             neuron LRU {}",
            mib(m.head),
            mib(m.head_total),
            pct(m.head, m.head_total),
            mib(ffn_pinned),
            mib(m.ffn_total),
            pct(ffn_pinned, m.ffn_total),
            mib(m.pinned_gates),
            mib(m.pinned_bundles),
            mib(m.cold)
        );
        let whole = self.layers.iter().filter(|l| l.read_whole).count();
        let _ = writeln!(
            s,
            "  {} compute threads, I/O depth {}, read-ahead {}, {} of {} layers read whole",
            self.compute_threads,
            self.io_queue_depth,
            mib(self.read_ahead_bytes),
            whole,
            self.layers.len()
        );
        let p = &self.predicted;
        let _ = writeln!(
            s,
            "  predicted: {:.2} tokens/s ({:.2} in memory), {:.2} MB read per token ({:.2} read ahead), hit rate \
             {:.1}%, I/O stall {:.0}%{}",
            p.tokens_per_s,
            p.in_memory_tokens_per_s,
            p.mb_read_per_token,
            p.mb_streamed_per_token,
            100.0 * p.hit_rate,
            100.0 * p.io_stall_share,
            if self.device == "measured" {
                String::new()
            } else {
                " (no measured device profile: reference figures; run `cargo xtask profile-device`)".into()
            }
        );
        s
    }

    /// [`Plan::render`] followed by the reasoning.
    pub fn render_with_reasoning(&self) -> String {
        let mut s = self.render();
        let _ = writeln!(s, "reasoning:");
        for r in &self.reasoning {
            let _ = writeln!(s, "  - {r}");
        }
        s
    }
}

fn validate(input: &PlanInput, device: &DeviceProfile) -> Result<(), PlanError> {
    let bad = |why: String| Err(PlanError::BadInput { why });
    if input.layers.is_empty() {
        return bad("no FFN layers".into());
    }
    if input.head.n_rows == 0 || input.head.row_bytes == 0 {
        return bad("empty output head".into());
    }
    if input.threads == 0 {
        return bad("no compute threads".into());
    }
    for (i, l) in input.layers.iter().enumerate() {
        if l.n_ff == 0 || l.frequency.len() != l.n_ff || l.cluster_neurons == 0 {
            return bad(format!(
                "layer {i}: {} frequencies for {} neurons in clusters of {}",
                l.frequency.len(),
                l.n_ff,
                l.cluster_neurons
            ));
        }
        if l.gate_row_bytes == 0 || l.bundle_bytes == 0 {
            return bad(format!("layer {i}: zero-sized neuron"));
        }
        if l.stride < l.cluster_neurons.min(l.n_ff) as u64 * (l.gate_row_bytes + l.bundle_bytes) {
            return bad(format!("layer {i}: stride {} is shorter than a record", l.stride));
        }
        if l.frequency.iter().any(|f| !(f.is_finite() && (0.0..=1.0).contains(f))) {
            return bad(format!("layer {i}: a frequency is not in [0, 1]"));
        }
        if !(l.use_probability.is_finite() && (0.0..=1.0).contains(&l.use_probability)) {
            return bad(format!("layer {i}: use probability {} is not in [0, 1]", l.use_probability));
        }
        if !(l.gate_density.is_finite() && (0.0..=1.0).contains(&l.gate_density)) {
            return bad(format!("layer {i}: gate density {} is not in [0, 1]", l.gate_density));
        }
    }
    if device.read_throughput(BLOCK, 1) <= 0.0 {
        return Err(PlanError::IncompleteProfile { why: "no read measurements".into() });
    }
    if device.kernel_gb_per_s(1) <= 0.0 {
        return Err(PlanError::IncompleteProfile { why: "no kernel measurements".into() });
    }
    Ok(())
}

/// One unit of memory the greedy may spend on a layer: its next gate block or its next bundle.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    /// Gate block of the layer's next cluster.
    Gate(usize),
    /// Bundle of the layer's next position.
    Bundle(usize),
    /// The layer's next record, gate block and bundles (layers read whole).
    Record(usize),
}

/// The allocation of the bytes above the minimum: the head, pinned units and LRU regions.
#[derive(Clone, Debug, Default)]
pub(crate) struct Allocation {
    pub(crate) head_rows: usize,
    pub(crate) gates: Vec<usize>,
    pub(crate) bundles: Vec<usize>,
    pub(crate) cold: Vec<usize>,
}

/// The hits an LRU of `c` entries can expect per token, over items requested independently each token with
/// probabilities `a`, in the same order every token (as a decode step visits a layer's neurons).
///
/// An item requested again `d` tokens later hits if fewer than `c` other distinct items were requested in
/// between, that is over exactly `d` tokens of requests; that count is a sum of independent Bernoulli variables
/// (item `j` appears with probability `1 - (1 - a_j)^d`), taken as normal. So the hits are
/// `sum over d >= 1 of P(count_d < c) * sum_i a_i^2 (1 - a_i)^(d-1)`: Che's approximation, with the variance
/// that decides small and cyclic cases (an item requested every token in a scan larger than the LRU never hits).
pub(crate) fn lru_hits(a: &[f64], c: usize) -> f64 {
    if c == 0 || a.is_empty() {
        return 0.0;
    }
    if c >= a.len() {
        // Everything fits: every request after the first hits.
        return a.iter().sum();
    }
    let c = c as f64;
    let mut total = 0.0;
    let mut d = 1.0f64;
    loop {
        let (mut mean, mut var, mut mass) = (0.0, 0.0, 0.0);
        for &x in a {
            let x = x.clamp(0.0, 1.0);
            let q = 1.0 - (1.0 - x).powf(d);
            mean += q;
            var += q * (1.0 - q);
            mass += x * x * (1.0 - x).powf(d - 1.0);
        }
        let sd = var.sqrt().max(1e-9);
        let p_hit = normal_cdf((c - 0.5 - mean) / sd);
        total += p_hit * mass;
        // Stop once no later reuse can hit, or the remaining reuses carry nothing.
        if mean - 6.0 * sd > c || mass < 1e-9 || d > 1e5 {
            break;
        }
        d += 1.0;
    }
    total
}

/// The standard normal distribution function (Abramowitz and Stegun 26.2.17, error below 1e-7).
fn normal_cdf(x: f64) -> f64 {
    if x < -12.0 {
        return 0.0;
    }
    if x > 12.0 {
        return 1.0;
    }
    let t = 1.0 / (1.0 + 0.231_641_9 * x.abs());
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782 + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    let tail = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly;
    if x >= 0.0 { 1.0 - tail } else { tail }
}

/// Makes the plan for running `input`'s model on `device` with `opts` (see the module documentation).
///
/// The I/O queue depth is `opts.queue_depth` if given; otherwise each measured depth (from
/// `MIN_QUEUE_DEPTH`) is planned and the fastest predicted plan within the budget is kept, a deeper queue
/// only where it is `DEPTH_GAIN` faster than a shallower one: its buffers come out of the same budget as the
/// cache, so a depth the probe rates slightly faster can cost tens of MiB of pinned neurons.
pub fn plan(input: &PlanInput, device: &DeviceProfile, opts: &PlanOptions) -> Result<Plan, PlanError> {
    validate(input, device)?;
    let depths: Vec<usize> = match opts.queue_depth {
        Some(qd) => vec![qd.max(1)],
        None => {
            let measured: Vec<usize> =
                device.queue_depths().into_iter().filter(|&d| d >= MIN_QUEUE_DEPTH).collect();
            if measured.is_empty() { vec![MIN_QUEUE_DEPTH] } else { measured }
        }
    };
    let mut best: Option<Plan> = None;
    let mut too_small: Option<PlanError> = None;
    for &qd in &depths {
        match plan_at_depth(input, device, opts, qd) {
            Ok(p) => {
                let faster =
                    |b: &Plan| p.predicted.tokens_per_s > b.predicted.tokens_per_s * (1.0 + DEPTH_GAIN);
                if best.as_ref().is_none_or(faster) {
                    best = Some(p);
                }
            }
            Err(e @ PlanError::BudgetTooSmall { minimum, .. }) => {
                let smaller = |t: &PlanError| match t {
                    PlanError::BudgetTooSmall { minimum: m, .. } => minimum < *m,
                    _ => false,
                };
                if too_small.as_ref().is_none_or(smaller) {
                    too_small = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    let Some(mut plan) = best else {
        return Err(too_small.expect("every depth was planned"));
    };
    if depths.len() > 1 {
        let qd = plan.io_queue_depth;
        let line = format!(
            "I/O depth {qd}: the fastest predicted token of depths {depths:?} within the budget (a deeper queue \
             holds more buffers and is taken only if {:.0}% faster)",
            100.0 * DEPTH_GAIN
        );
        plan.reasoning.insert(0, line);
    }
    Ok(plan)
}

/// [`plan`] for one I/O queue depth.
fn plan_at_depth(
    input: &PlanInput,
    device: &DeviceProfile,
    opts: &PlanOptions,
    qd: usize,
) -> Result<Plan, PlanError> {
    let mut why = Vec::new();
    let n_layers = input.layers.len();
    let layers = &input.layers;
    let head = &input.head;
    let head_total = head.n_rows as u64 * head.row_bytes;
    let ffn_total: u64 = layers.iter().map(|l| l.n_ff as u64 * (l.gate_row_bytes + l.bundle_bytes)).sum();
    let compute_threads = input.threads.min(device.n_cpus.max(1)).max(1);
    let llmflash = matches!(opts.policy, CachePolicy::LlmFlash { .. });

    // How each layer is read: with thresholds, a layer dense enough is read whole (a cluster's gate rows and
    // bundles in one read, merged with its neighbours'); otherwise gates first, then the bundles of the neurons
    // that pass.
    let whole: Vec<bool> = layers
        .iter()
        .map(|l| {
            let density = l.frequency.iter().map(|&f| f as f64).sum::<f64>() / l.n_ff as f64;
            let density = density / l.use_probability.max(1e-9);
            !input.predicting && opts.bundle && opts.cache && !llmflash && density >= WHOLE_RECORD_DENSITY
        })
        .collect();
    // Reads: their size (records read whole are merged into reads of up to the coalescing limit) and the depth
    // the device wants for it.
    let record = layers.iter().map(|l| l.stride).max().unwrap_or(BLOCK);
    let small = layers.iter().map(|l| round_block(l.bundle_bytes)).max().unwrap_or(BLOCK);
    let typical = match (input.predicting, whole.iter().any(|&w| w)) {
        (true, _) => small,
        (false, true) => COALESCE.max(record),
        (false, false) => record,
    };

    // I/O buffers: reads in flight, the read-ahead window (reads in flight and a layer's records waiting for
    // their turn), and a prefill layer's records.
    let max_layer = layers.iter().map(LayerShape::layer_bytes).max().unwrap_or(0);
    let in_flight = qd as u64 * typical;
    let read_ahead = if opts.pipeline { (in_flight + max_layer).clamp(2 << 20, 64 << 20) } else { 0 };
    let io_buffers = (in_flight + read_ahead).max(max_layer).max(4 << 20);
    // Bookkeeping: the LRU key tables of every layer (present whether or not entries are planned), and the
    // fixed region's alignment slack for attention tensors, the head and two pinned spans per layer.
    let keys: u64 = layers.iter().map(|l| (l.n_ff + l.n_clusters()) as u64).sum();
    let fixed_entries = input.attention_tensors as u64 + 1 + 2 * n_layers as u64;
    let index_base = keys * input.cache.key_overhead + fixed_entries * input.cache.fixed_align;
    let mut memory = Memory {
        budget: opts.budget,
        process: input.process_bytes,
        attention: input.attention_bytes,
        kv: input.kv_bytes,
        scratch: input.scratch_bytes,
        io_buffers,
        staging: if opts.pipeline { 0 } else { max_layer },
        predictors: input.predictor_bytes,
        cache_index: index_base,
        margin: MARGIN + UNIT_MARGIN * n_layers as u64,
        head_total,
        ffn_total,
        ..Memory::default()
    };
    // Page tables map whatever the budget holds: the budget's, or (refused) the minimum's own.
    memory.page_tables = page_tables(opts.budget.max(memory.minimum() + page_tables(memory.minimum())));
    let minimum = memory.minimum();
    if opts.budget < minimum {
        return Err(PlanError::BudgetTooSmall {
            budget: opts.budget,
            minimum,
            detail: memory.fixed_detail(),
            kv: memory.kv,
        });
    }
    why.push(format!(
        "minimum {}: {}; the I/O pool holds {qd} reads of about {} KiB in flight, {} of read-ahead and a \
         prefill layer's records ({})",
        mib(minimum),
        memory.fixed_detail(),
        typical / 1024,
        mib(read_ahead),
        mib(max_layer)
    ));
    let avail = opts.budget - minimum;

    // The per-token access probabilities of each layer's neurons (bundles) and gate rows.
    let p: Vec<Vec<f64>> = layers.iter().map(|l| l.frequency.iter().map(|&f| f as f64).collect()).collect();
    let density: Vec<f64> = p.iter().map(|v| v.iter().sum::<f64>() / v.len() as f64).collect();
    // With a predictor, a neuron's gate row is read when it is picked: the predictor picks about `gate_density`
    // of the rows, the firing ones first. Picks beyond the firing neurons (false positives) fall on the
    // non-firing ones alike, whatever their frequency: `p + f (1 - p)`. (Scaling `p` instead put them on the
    // hot neurons, capped at 1, and lost the rest: on the 7B shape prepared on random tokens, whose predictor
    // picks 50% of the rows for 15% firing, that expected 1,000 unpinned rows per layer at 70% of the GGUF where
    // the engine read 1,630.)
    let gate_p = |l: usize, pos: usize| -> f64 {
        match input.predicting {
            // An expert's predictor runs only when it is routed to: its picks, given that, times how often.
            true => {
                let u = layers[l].use_probability.max(1e-12);
                u * pick_probability(p[l][pos] / u, layers[l].gate_density, density[l] / u)
            }
            false => layers[l].use_probability,
        }
    };

    // Candidate allocations: pinned units by value, with a share of the FFN memory for the LRU regions.
    let mut best: Option<(f64, Allocation, Estimate)> = None;
    // Layers read in two phases get at least REUSE_FLOOR of the FFN memory as a neuron LRU (see its doc), unless
    // everything can be pinned.
    let fits = avail >= head_total + ffn_total;
    let two_phase = whole.iter().any(|&w| !w) && !fits;
    let floored: Vec<f64> = LRU_SHARES.iter().map(|&s| s.max(REUSE_FLOOR)).collect();
    let shares: &[f64] = match (opts.cache, llmflash, two_phase) {
        (false, _, _) => &[0.0],
        (true, true, _) => &[1.0],
        (true, false, true) => &floored,
        (true, false, false) => &[0.0],
    };
    for &share in shares {
        let alloc = allocate(input, &p, &gate_p, &whole, avail, share, opts);
        let est = estimate(input, device, opts, &alloc, &p, &gate_p, &whole, qd, compute_threads);
        if best.as_ref().is_none_or(|b| est.token_s < b.0 - 1e-12) {
            best = Some((est.token_s, alloc, est));
        }
    }
    let (_, alloc, est) = best.expect("at least one share is tried");

    // Memory of the chosen allocation.
    memory.head = alloc.head_rows as u64 * head.row_bytes;
    let mut plans = Vec::with_capacity(n_layers);
    for (l, ls) in layers.iter().enumerate() {
        let g = alloc.gates[l];
        memory.pinned_gates += (0..g).map(|k| ls.cluster_len(k) as u64 * ls.gate_row_bytes).sum::<u64>();
        memory.pinned_bundles += alloc.bundles[l] as u64 * ls.bundle_bytes;
        memory.cold += alloc.cold[l] as u64 * ls.bundle_bytes;
        memory.cache_index += alloc.cold[l] as u64 * input.cache.entry_overhead;
        plans.push(LayerPlan {
            pinned_gate_clusters: g,
            pinned_bundles: alloc.bundles[l],
            cold_entries: alloc.cold[l],
            read_whole: est.whole[l],
            expected_active: est.active[l],
            expected_read_bytes: est.read_bytes[l],
        });
    }
    debug_assert!(memory.total() <= opts.budget, "{} > {}", memory.total(), opts.budget);
    why.push(format!(
        "spending {} above the minimum: output head {} of {} ({} rows), gate blocks {}, bundles {}, \
         neuron LRU {}{}",
        mib(avail),
        mib(memory.head),
        mib(head_total),
        alloc.head_rows,
        mib(memory.pinned_gates),
        mib(memory.pinned_bundles),
        mib(memory.cold),
        match (opts.cache, llmflash) {
            (false, _) => "; --no-cache: no FFN neuron is kept".to_string(),
            (true, true) =>
                "; LLM in a Flash: nothing pinned, the whole FFN share is a sliding window".into(),
            (true, false) => format!(
                "; each byte goes where it saves the most reads per token, and the LRU share ({:.0}% of the \
                 FFN memory) is the one of {:?} with the fastest predicted token",
                100.0 * est.share,
                LRU_SHARES
            ),
        }
    ));
    let whole = est.whole.iter().filter(|&&w| w).count();
    why.push(format!(
        "reads: {whole} of {n_layers} layers are dense enough (at least {:.0}% of their unpinned neurons fire) \
         to read each cluster's record whole; {}",
        100.0 * WHOLE_RECORD_DENSITY,
        if input.predicting {
            "the predictor's rows are read after its prediction, bundles after the gates".to_string()
        } else {
            "thresholds need every gate, so gate blocks (and whole records) are read ahead, in the order the \
             layers use them"
                .to_string()
        }
    ));
    why.push(est.reasoning.clone());
    if !device.is_measured() {
        why.push(format!(
            "device: {} (no measured profile; the speed is a guess until `cargo xtask profile-device` runs)",
            device.cpu
        ));
    }
    Ok(Plan {
        model: input.model.clone(),
        options: opts.clone(),
        memory,
        head_rows: alloc.head_rows,
        layers: plans,
        compute_threads,
        io_queue_depth: qd,
        read_ahead_bytes: read_ahead,
        cluster_neurons: layers[0].cluster_neurons,
        predicted: est.prediction,
        device: device.source.clone(),
        reasoning: why,
    })
}

/// Expected bytes and reads of one phase of reads within a record (which starts at a page boundary): `items`
/// are `(offset in the record, bytes, probability of being read)`, ascending and independent. The I/O engine
/// reads whole pages and merges reads whose pages touch or overlap, so a phase costs the pages any read item
/// covers, in one read per run of touched pages (exact under independence). `untouched` is scratch space.
pub(crate) fn page_reads(items: &[(u64, u64, f64)], untouched: &mut Vec<(f64, f64)>) -> (f64, f64) {
    let Some(last) = items.last() else { return (0.0, 0.0) };
    let n_pages = (last.0 + last.1).div_ceil(BLOCK) as usize;
    // Per page: probability that no item covering it is read, and that no item covering both it and the page
    // before it is read (the part the two share).
    untouched.clear();
    untouched.resize(n_pages, (1.0, 1.0));
    for &(at, len, q) in items {
        if len == 0 || q <= 0.0 {
            continue;
        }
        let (first, end) = ((at / BLOCK) as usize, (at + len).div_ceil(BLOCK) as usize);
        for (p, u) in untouched.iter_mut().enumerate().take(end).skip(first) {
            u.0 *= 1.0 - q.min(1.0);
            if p > first {
                u.1 *= 1.0 - q.min(1.0);
            }
        }
    }
    let (mut pages, mut runs) = (0.0, 0.0);
    let mut before = 1.0;
    for &(none, shared) in untouched.iter() {
        pages += 1.0 - none;
        // P(this page touched, the one before not) = P(before not) - P(neither), and P(neither) is the product
        // over the items covering either page.
        let neither = before * none / shared.max(1e-300);
        runs += (before - neither).max(0.0);
        before = none;
    }
    (pages * BLOCK as f64, runs)
}

/// Probability that a predictor picking `picked` of a layer's neurons, where `firing` of them fire on average,
/// picks a neuron that fires with probability `p`: the firing ones first, and the picks beyond them spread
/// evenly over the neurons that do not fire, so that the layer's picks add up to `picked`.
pub(crate) fn pick_probability(p: f64, picked: f64, firing: f64) -> f64 {
    if picked <= firing {
        p * picked / firing.max(1e-9)
    } else {
        let f = ((picked - firing) / (1.0 - firing).max(1e-9)).min(1.0);
        p + f * (1.0 - p)
    }
}

fn round_block(b: u64) -> u64 {
    b.div_ceil(BLOCK) * BLOCK
}

/// Spends `avail` bytes: `share` of what goes to the FFN is for the LRU regions, the rest (and the head) by
/// expected bytes saved per token per byte, each layer a prefix of its order.
pub(crate) fn allocate(
    input: &PlanInput,
    p: &[Vec<f64>],
    gate_p: &dyn Fn(usize, usize) -> f64,
    whole: &[bool],
    avail: u64,
    share: f64,
    opts: &PlanOptions,
) -> Allocation {
    let layers = &input.layers;
    let n_layers = layers.len();
    let head = &input.head;
    let mut a = Allocation {
        gates: vec![0; n_layers],
        bundles: vec![0; n_layers],
        cold: vec![0; n_layers],
        ..Allocation::default()
    };
    let mut left = avail;
    let llmflash = matches!(opts.policy, CachePolicy::LlmFlash { .. });
    // The head first: every row is read every token, at the end of it.
    a.head_rows = ((left / head.row_bytes) as usize).min(head.n_rows);
    left -= a.head_rows as u64 * head.row_bytes;
    if !opts.cache {
        return a;
    }
    let lru_bytes = (left as f64 * share) as u64;
    let mut pin = left - lru_bytes;
    if !llmflash {
        // Greedy by value per byte over the next unit of every layer (gate block of the next cluster, or bundle
        // of the next position; in a layer read whole, the next record, every byte of which is read every
        // token, so that the records left to read stay back to back); values within a layer never increase, so
        // prefixes stay optimal.
        let mut next_gate = vec![0usize; n_layers];
        let mut next_bundle = vec![0usize; n_layers];
        loop {
            let mut pick: Option<(f64, Unit, u64)> = None;
            for (l, ls) in layers.iter().enumerate() {
                let k = next_gate[l];
                if whole[l] {
                    if k < ls.n_clusters() {
                        let bytes = ls.cluster_len(k) as u64 * (ls.gate_row_bytes + ls.bundle_bytes);
                        let v = ls.use_probability;
                        if bytes <= pin && pick.is_none_or(|b| v > b.0) {
                            pick = Some((v, Unit::Record(l), bytes));
                        }
                    }
                    continue;
                }
                if k < ls.n_clusters() {
                    let c = ls.cluster_neurons;
                    let n = ls.cluster_len(k);
                    let bytes = n as u64 * ls.gate_row_bytes;
                    let value: f64 =
                        (0..n).map(|i| gate_p(l, k * c + i)).sum::<f64>() * ls.gate_row_bytes as f64;
                    let v = value / bytes as f64;
                    if bytes <= pin && pick.is_none_or(|b| v > b.0) {
                        pick = Some((v, Unit::Gate(l), bytes));
                    }
                }
                let pos = next_bundle[l];
                if pos < ls.n_ff {
                    let bytes = ls.bundle_bytes;
                    let v = p[l][pos];
                    if bytes <= pin && pick.is_none_or(|b| v > b.0) {
                        pick = Some((v, Unit::Bundle(l), bytes));
                    }
                }
            }
            let Some((_, unit, bytes)) = pick else { break };
            pin -= bytes;
            match unit {
                Unit::Gate(l) => next_gate[l] += 1,
                Unit::Bundle(l) => next_bundle[l] += 1,
                Unit::Record(l) => {
                    next_bundle[l] += layers[l].cluster_len(next_gate[l]);
                    next_gate[l] += 1;
                }
            }
        }
        a.gates = next_gate;
        a.bundles = next_bundle;
    }
    // The LRU share (and what pinning left) goes to the layers read in two phases by their expected misses (a
    // layer read whole reads every unpinned bundle with its record: a neuron LRU saves it nothing).
    let lru_total = lru_bytes + pin;
    let misses: Vec<f64> = (0..n_layers)
        .map(|l| match whole[l] {
            true => 0.0,
            false => p[l][a.bundles[l].min(p[l].len())..].iter().sum::<f64>(),
        })
        .collect();
    let total_misses: f64 = misses.iter().sum();
    if total_misses > 0.0 {
        for (l, ls) in layers.iter().enumerate() {
            let bytes = (lru_total as f64 * misses[l] / total_misses) as u64;
            let per = ls.bundle_bytes + input.cache.entry_overhead;
            a.cold[l] = ((bytes / per) as usize).min(ls.n_ff - a.bundles[l]);
        }
    }
    a
}

/// What the speed model expects of an allocation.
#[derive(Clone, Debug, Default)]
struct Estimate {
    token_s: f64,
    share: f64,
    whole: Vec<bool>,
    active: Vec<f64>,
    read_bytes: Vec<f64>,
    prediction: Prediction,
    reasoning: String,
}

#[allow(clippy::too_many_arguments)]
fn estimate(
    input: &PlanInput,
    device: &DeviceProfile,
    opts: &PlanOptions,
    a: &Allocation,
    p: &[Vec<f64>],
    gate_p: &dyn Fn(usize, usize) -> f64,
    whole: &[bool],
    qd: usize,
    threads: usize,
) -> Estimate {
    let layers = &input.layers;
    let head = &input.head;
    let mut e = Estimate {
        whole: vec![false; layers.len()],
        active: vec![0.0; layers.len()],
        read_bytes: vec![0.0; layers.len()],
        ..Estimate::default()
    };
    let (mut streamed, mut dependent, mut dep_reads, mut dep_layers) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut active_all, mut served, mut units_used) = (0.0f64, 0.0f64, 0.0f64);
    let mut compute_bytes = input.attention_bytes as f64 + (head.n_rows as u64 * head.row_bytes) as f64;
    let mut bundle_compute = 0.0f64;
    let head_missing = (head.n_rows - a.head_rows) as f64 * head.row_bytes as f64;
    streamed += head_missing;
    let (mut items, mut scratch) = (Vec::new(), Vec::new());
    for (l, ls) in layers.iter().enumerate() {
        let c = ls.cluster_neurons;
        let nb = a.bundles[l];
        let g = a.gates[l];
        let tail = &p[l][nb.min(ls.n_ff)..];
        let tail_active: f64 = tail.iter().sum();
        let all_active: f64 = p[l].iter().sum();
        active_all += all_active;
        let whole = whole[l];
        e.whole[l] = whole;
        let hits = lru_hits(tail, a.cold[l]).min(tail_active);
        let miss = if whole { 1.0 } else { 1.0 - hits / tail_active.max(1e-12) };
        // Per cluster, what is read from storage: with thresholds, the gate block whole when not pinned; with a
        // predictor, the picked gate rows not pinned, in a phase of their own. Then (layers in two phases) the
        // firing bundles neither pinned nor in the LRU. Reads are page-rounded and merged where pages touch
        // (see `page_reads`); with --no-bundle the up row and down column are separate, unmerged reads.
        let (mut gate_read, mut gate_runs, mut bundle_read, mut bundle_runs) = (0.0, 0.0, 0.0, 0.0);
        let (g_bytes, b_bytes) = (ls.gate_row_bytes, ls.bundle_bytes);
        for k in 0..ls.n_clusters() {
            let n = ls.cluster_len(k);
            let first = k * c;
            items.clear();
            items.extend((0..n).map(|j| (j as u64 * g_bytes, g_bytes, gate_p(l, first + j))));
            let rows: f64 = items.iter().map(|it| it.2).sum();
            compute_bytes += rows * g_bytes as f64;
            if k >= g {
                if input.predicting {
                    let (bytes, runs) = page_reads(&items, &mut scratch);
                    gate_read += bytes;
                    gate_runs += runs;
                } else {
                    gate_read += round_block(n as u64 * g_bytes) as f64 * ls.use_probability;
                    gate_runs += ls.use_probability;
                }
            }
            if whole || first + n <= nb {
                continue;
            }
            let at = |j: usize| n as u64 * g_bytes + j as u64 * b_bytes;
            let q = |j: usize| if first + j < nb { 0.0 } else { p[l][first + j] * miss };
            if opts.bundle {
                items.clear();
                items.extend((0..n).map(|j| (at(j), b_bytes, q(j))));
                let (bytes, runs) = page_reads(&items, &mut scratch);
                bundle_read += bytes;
                bundle_runs += runs;
            } else {
                let up = b_bytes / 2;
                for j in 0..n {
                    for (off, len) in [(at(j), up), (at(j) + up, b_bytes - up)] {
                        // One read alone: the pages it spans.
                        let pages = (off + len).div_ceil(BLOCK) - off / BLOCK;
                        bundle_read += q(j) * (pages * BLOCK) as f64;
                        bundle_runs += q(j);
                    }
                }
            }
        }
        bundle_compute += all_active * b_bytes as f64;
        if whole {
            // Whole records: every unpinned bundle, in the records streamed with the gates.
            bundle_read = tail.len() as f64 * b_bytes as f64 * ls.use_probability;
        }
        served += all_active - tail_active + if whole { 0.0 } else { hits };
        let l_read = gate_read + bundle_read;
        e.active[l] = all_active;
        e.read_bytes[l] = l_read;
        units_used += ls.use_probability;
        if input.predicting || ls.use_probability < 1.0 {
            // Reads that wait for the predictor, or for the router (an expert's, whole records included).
            dependent += l_read;
            dep_reads += gate_runs + bundle_runs;
            dep_layers += ls.use_probability;
        } else if whole {
            streamed += l_read;
        } else {
            streamed += gate_read;
            dependent += bundle_read;
            dep_reads += bundle_runs;
            dep_layers += 1.0;
        }
    }
    // Compute: dense weights at the matrix-vector speed, bundles at the sparse kernels' speed, plus the
    // threads' synchronisation at every parallel step.
    let kernel = device.kernel_gb_per_s_for(threads, (compute_bytes + bundle_compute) as u64) * 1e9;
    let sync = units_used * (STEPS_PER_LAYER * device.sync_seconds(threads) + LAYER_OVERHEAD_S);
    let compute_s = compute_bytes / kernel + bundle_compute / (kernel * SPARSE_EFFICIENCY) + sync;
    // Reads: streamed ones at the device's throughput for records (or head chunks), dependent ones at the
    // throughput of small reads at the depth a layer's reads reach, plus a round trip per layer.
    // Records of a layer read whole lie back to back and are merged into reads of up to the I/O engine's
    // coalescing limit; gate blocks alone are separate reads.
    let any_whole = e.whole.iter().any(|&w| w);
    let stream_size = match (streamed > head_missing, any_whole) {
        (false, _) => CHUNK,
        (true, true) => COALESCE.max(layers.iter().map(|l| l.stride).max().unwrap_or(BLOCK)),
        (true, false) => layers
            .iter()
            .map(|l| round_block(l.cluster_neurons as u64 * l.gate_row_bytes))
            .max()
            .unwrap_or(BLOCK),
    };
    let tp_stream = device.read_throughput(stream_size, qd).max(1e-3) * 1e6;
    let per_layer_reads = (dep_reads / dep_layers.max(1.0)).max(1.0);
    let dep_qd = qd.min(per_layer_reads.ceil() as usize).max(1);
    let dep_size = match dep_reads > 0.0 {
        true => round_block((dependent / dep_reads) as u64).clamp(BLOCK, COALESCE),
        false => layers.iter().map(|l| round_block(l.bundle_bytes)).max().unwrap_or(BLOCK),
    };
    let tp_dep = device.read_throughput(dep_size, dep_qd).max(1e-3) * 1e6;
    let stream_s = streamed / tp_stream;
    let dep_s = dependent / tp_dep;
    // One round trip per layer with dependent reads: a read's latency at that depth (Little's law).
    let rtt = dep_qd as f64 * dep_size as f64 / tp_dep;
    let dep_rtt = if dependent > 0.0 { dep_layers * rtt } else { 0.0 };
    let io_s = stream_s + dep_s;
    let token_s = match opts.pipeline {
        true => compute_s.max(io_s) + OVERLAP_LOSS * compute_s.min(io_s) + dep_rtt,
        false => compute_s + io_s + dep_rtt,
    };
    e.token_s = token_s;
    e.share = {
        let lru: u64 = a.cold.iter().zip(layers).map(|(&n, l)| n as u64 * l.bundle_bytes).sum();
        let ffn: u64 = lru
            + a.bundles.iter().zip(layers).map(|(&n, l)| n as u64 * l.bundle_bytes).sum::<u64>()
            + a.gates
                .iter()
                .zip(layers)
                .map(|(&g, l)| (0..g).map(|k| l.cluster_len(k) as u64 * l.gate_row_bytes).sum::<u64>())
                .sum::<u64>();
        if ffn == 0 { 0.0 } else { lru as f64 / ffn as f64 }
    };
    let read = streamed + dependent;
    e.prediction = Prediction {
        tokens_per_s: 1.0 / token_s,
        in_memory_tokens_per_s: 1.0 / compute_s,
        mb_read_per_token: read / 1e6,
        mb_streamed_per_token: streamed / 1e6,
        hit_rate: if active_all > 0.0 { served / active_all } else { 1.0 },
        compute_ms: compute_s * 1e3,
        io_ms: io_s * 1e3,
        io_stall_share: ((token_s - compute_s) / token_s).clamp(0.0, 1.0),
    };
    e.reasoning = format!(
        "time per token: compute {:.2} ms ({:.1} MB of weights at {:.1} GB/s, bundles at {:.0}% of that, \
         {:.2} ms of thread synchronisation and per-layer work); reads {:.2} MB ahead at {:.0} MB/s ({:.2} ms) and {:.2} MB after \
         the gates at {:.0} MB/s ({:.2} ms, plus {:.2} ms of round trips){}: {:.2} ms, {:.2} tokens/s \
         ({:.2} in memory)",
        compute_s * 1e3,
        (compute_bytes + bundle_compute) / 1e6,
        kernel / 1e9,
        100.0 * SPARSE_EFFICIENCY,
        sync * 1e3,
        streamed / 1e6,
        tp_stream / 1e6,
        stream_s * 1e3,
        dependent / 1e6,
        tp_dep / 1e6,
        dep_s * 1e3,
        dep_rtt * 1e3,
        if opts.pipeline {
            format!(", overlapped with compute ({:.0}% of the shorter hidden)", 100.0 * (1.0 - OVERLAP_LOSS))
        } else {
            ", after compute (no pipeline)".to_string()
        },
        token_s * 1e3,
        1.0 / token_s,
        1.0 / compute_s
    );
    e
}
