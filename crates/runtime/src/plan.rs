//! The planner: a memory budget, the model's activation statistics and a measured [`DeviceProfile`] in; the hot
//! neurons pinned per layer, the cache segment sizes, the compute/I-O grain, thread counts and I/O depth out,
//! with the predicted speed and the reasoning behind each choice ([`plan`], [`Plan`]).
//!
//! The planner is a pure function of its inputs (no files, no clocks), so a plan can be reproduced and
//! tested. It follows PowerInfer-2's offline planner with a greedy hot set in place of its ILP: neurons are
//! pinned in order of expected activations per byte, each layer's pinned set a prefix of its hot order. Plans
//! are kept as versioned JSON (format `pinion-plan`, version 1).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::device::{DeviceProfile, Fields, write_json_atomic};

/// The `format` field of a plan file.
pub const PLAN_FORMAT: &str = "pinion-plan";
/// The version of the plan file this code writes and reads.
pub const PLAN_VERSION: u64 = 1;

/// Flash reads are aligned to and rounded up to this many bytes.
const BLOCK: u64 = 4096;
/// Reads at least this large count as "large" when choosing the runtime cluster grain.
const LARGE_READ: u64 = 64 << 10;
/// Share of the FFN bytes (beyond the pinned set) given to the dynamic (LRU) segments, in percent.
const DYNAMIC_PERCENT: u64 = 15;
/// Share of the dynamic bytes given to the hot (cluster LRU) segment, in percent; the rest is the cold
/// (neuron LRU) segment.
const HOT_SEGMENT_PERCENT: u64 = 40;
/// Fraction of the activation mass an LRU segment is credited with, relative to a static set of the same
/// neurons: LRU churn (a neuron evicted shortly before it fires again) costs hits. An estimate, not a
/// measurement.
const LRU_EFFICIENCY: f64 = 0.75;
/// Bytes of index per neuron (cache map entry, offsets) counted as overhead.
const INDEX_BYTES_PER_NEURON: u64 = 16;
/// Throughput ratio at which a larger runtime cluster grain is worth its coarser scheduling.
const GRAIN_SPEEDUP: f64 = 1.5;

/// Why a plan could not be made, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The budget does not cover what must always be in memory.
    #[error(
        "memory budget of {:.1} MiB is below the minimum of {:.1} MiB (resident weights, KV cache, scratch, \
         I/O buffers and index)",
        mib(*budget),
        mib(*minimum)
    )]
    BudgetTooSmall {
        /// The budget, bytes.
        budget: u64,
        /// The smallest budget that works, bytes.
        minimum: u64,
    },
    /// A budget string could not be parsed.
    #[error("cannot parse budget {input:?}: {why} (examples: 48MiB, 64M, 1.5GiB, 123456, 50%)")]
    BadBudget {
        /// The string.
        input: String,
        /// What is wrong.
        why: String,
    },
    /// The planner's input is inconsistent.
    #[error("invalid plan input: {why}")]
    BadInput {
        /// What is wrong.
        why: String,
    },
    /// The device profile lacks measurements the planner needs.
    #[error("device profile is incomplete: {why}")]
    IncompleteProfile {
        /// What is missing.
        why: String,
    },
    /// A file could not be read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a plan, or a field is missing or of the wrong type.
    #[error("{}: not a valid pinion plan: {why}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The file is a plan of another version.
    #[error("{}: plan version {found}, this pinion reads version {expected}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this code reads.
        expected: u64,
    },
}

/// One FFN layer's statistics (one expert's, for a mixture of experts).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    /// Neurons in the layer.
    pub n_ff: usize,
    /// Bytes of one neuron's gate row.
    pub gate_bytes: u64,
    /// Bytes of one neuron's up row and down column together.
    pub bundle_bytes: u64,
    /// Activation frequency per neuron, in the layer's hot order (descending).
    pub frequency: Vec<f32>,
    /// Share of the layer's neurons marked active per token by the predictor or threshold.
    pub predicted_density: f64,
}

/// What the planner knows about the model, independent of file formats.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    /// Model name, for the record.
    pub model: String,
    /// Bytes of the model file.
    pub file_bytes: u64,
    /// Bytes always in memory: embeddings, attention, norms, predictors.
    pub resident_bytes: u64,
    /// Bytes of the KV cache.
    pub kv_bytes: u64,
    /// Bytes of activations and other scratch buffers.
    pub scratch_bytes: u64,
    /// Neurons per packed record (the file's cluster).
    pub cluster_neurons: usize,
    /// Model width.
    pub d_model: usize,
    /// FFN layers.
    pub layers: Vec<LayerStats>,
    /// True: a predictor selects neurons, so only predicted neurons' gates are needed. False (threshold
    /// sparsity): every gate is computed, so the gate rows of all neurons not pinned are read each token.
    pub uses_predictor: bool,
}

/// A memory budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// The whole process: weights, KV cache, scratch and buffers.
    Bytes(u64),
    /// A share of the model file's bytes for the weights; the KV cache, scratch and buffers come on top.
    Percent(f64),
}

/// Parses a budget: a byte count with an optional binary suffix (`123456`, `64K`, `64M`, `48MiB`, `1.5GiB`,
/// `2G`; `KB`/`MB`/`GB` are decimal) or a percentage of the model file (`50%`).
pub fn parse_budget(s: &str) -> Result<Budget, PlanError> {
    let bad = |why: &str| PlanError::BadBudget { input: s.to_string(), why: why.to_string() };
    let t = s.trim();
    if let Some(num) = t.strip_suffix('%') {
        let p: f64 = num.trim().parse().map_err(|_| bad("not a number before %"))?;
        if !(p.is_finite() && p > 0.0 && p <= 100.0) {
            return Err(bad("a percentage must be in (0, 100]"));
        }
        return Ok(Budget::Percent(p));
    }
    parse_size(t).map(Budget::Bytes).map_err(|e| match e {
        PlanError::BadBudget { why, .. } => bad(&why),
        other => other,
    })
}

/// Parses a byte size, the non-percentage half of [`parse_budget`]'s grammar: a positive count with an
/// optional suffix (`K`/`M`/`G`/`T` and `KiB`..`TiB` binary, `KB`..`TB` decimal, `B`).
pub fn parse_size(s: &str) -> Result<u64, PlanError> {
    let bad = |why: &str| PlanError::BadBudget { input: s.to_string(), why: why.to_string() };
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = if num.contains('.') {
        let x: f64 = num.parse().map_err(|_| bad("not a number"))?;
        let b = (x * mul as f64).round();
        if !(b.is_finite() && b < u64::MAX as f64) {
            return Err(bad("too large"));
        }
        b as u64
    } else {
        num.parse::<u64>().map_err(|_| bad("too large"))?.checked_mul(mul).ok_or_else(|| bad("too large"))?
    };
    if bytes == 0 {
        return Err(bad("a budget must be positive"));
    }
    Ok(bytes)
}

/// Byte sizes of the three segments of the neuron cache (`pinion_cache::CacheConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    /// Pinned hot neurons.
    pub fixed_bytes: u64,
    /// Cluster-level LRU.
    pub hot_bytes: u64,
    /// Neuron-level LRU.
    pub cold_bytes: u64,
}

/// The planner's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Model name.
    pub model: String,
    /// The whole budget, bytes.
    pub budget_bytes: u64,
    /// Always-resident weights, bytes.
    pub resident_bytes: u64,
    /// KV cache, bytes.
    pub kv_bytes: u64,
    /// Scratch buffers, bytes.
    pub scratch_bytes: u64,
    /// I/O buffers, staging clusters, neuron index and rounding slack, bytes.
    pub overhead_bytes: u64,
    /// What is left of the budget for FFN weights, bytes.
    pub ffn_budget_bytes: u64,
    /// Per layer: the number of leading neurons (in hot order) pinned in memory.
    pub hot_neurons: Vec<usize>,
    /// Cache segment sizes.
    pub cache: CacheSizes,
    /// Compute and I/O grain of the runtime, neurons.
    pub cluster_neurons: usize,
    /// Compute threads (the I/O submission thread is extra).
    pub compute_threads: usize,
    /// Reads kept in flight.
    pub io_queue_depth: usize,
    /// Typical read size, bytes.
    pub read_block_bytes: u64,
    /// Expected flash reads per token, MB (10^6 bytes).
    pub expected_mb_read_per_token: f64,
    /// Expected share of active neurons found in memory (pinned or cached).
    pub expected_hit_rate: f64,
    /// Predicted decode speed with this plan.
    pub predicted_tokens_per_s: f64,
    /// Predicted decode speed with everything in memory.
    pub predicted_in_memory_tokens_per_s: f64,
    /// Why, step by step, with numbers.
    pub reasoning: Vec<String>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn round_block(b: u64) -> u64 {
    b.div_ceil(BLOCK) * BLOCK
}

/// A layer's per-neuron expected activations: the frequencies scaled so that they sum to
/// `predicted_density * n_ff` (the frequencies may come from another definition, e.g. a calibration run with
/// another threshold), each at most 1.
fn expected_activations(l: &LayerStats) -> Vec<f64> {
    let sum: f64 = l.frequency.iter().map(|&f| f as f64).sum();
    let target = l.predicted_density * l.n_ff as f64;
    let scale = if sum > 0.0 { target / sum } else { 0.0 };
    l.frequency.iter().map(|&f| (f as f64 * scale).min(1.0)).collect()
}

/// The global greedy order: all neurons, most expected activations per byte first, each layer's neurons in
/// its hot order (so any prefix of the order is a prefix of every layer). Ties go to the lower layer.
fn greedy_order(p: &[Vec<f64>], cost: &[u64]) -> Vec<(usize, usize)> {
    let n: usize = p.iter().map(Vec::len).sum();
    let mut next = vec![0usize; p.len()];
    let mut order = Vec::with_capacity(n);
    // A linear scan over layers per step would be O(n * layers); a heap keyed by density keeps it O(n log L).
    let key = |l: usize, i: usize| p[l][i] / cost[l].max(1) as f64;
    let mut heap: std::collections::BinaryHeap<HeapItem> =
        (0..p.len()).filter(|&l| !p[l].is_empty()).map(|l| HeapItem { key: key(l, 0), layer: l }).collect();
    while let Some(HeapItem { layer, .. }) = heap.pop() {
        let i = next[layer];
        order.push((layer, i));
        next[layer] += 1;
        if next[layer] < p[layer].len() {
            heap.push(HeapItem { key: key(layer, next[layer]), layer });
        }
    }
    order
}

#[derive(PartialEq)]
struct HeapItem {
    key: f64,
    layer: usize,
}

impl Eq for HeapItem {}

impl Ord for HeapItem {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.total_cmp(&other.key).then(other.layer.cmp(&self.layer))
    }
}

impl PartialOrd for HeapItem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Takes neurons in `order` while their costs fit in `budget`, stopping at the first that does not (so that
/// a larger budget always takes a superset). Returns the count taken from each layer and the bytes used.
fn take_prefix(
    order: &[(usize, usize)],
    cost: &[u64],
    n_layers: usize,
    budget: u64,
) -> (Vec<usize>, u64, usize) {
    let mut counts = vec![0usize; n_layers];
    let mut used = 0u64;
    let mut n = 0;
    for &(l, _) in order {
        if used + cost[l] > budget {
            break;
        }
        used += cost[l];
        counts[l] += 1;
        n += 1;
    }
    (counts, used, n)
}

fn validate(input: &PlanInput, device: &DeviceProfile) -> Result<(), PlanError> {
    let bad = |why: String| Err(PlanError::BadInput { why });
    if input.layers.is_empty() {
        return bad("no FFN layers".into());
    }
    if input.cluster_neurons == 0 || input.d_model == 0 {
        return bad("cluster_neurons and d_model must be positive".into());
    }
    for (i, l) in input.layers.iter().enumerate() {
        if l.n_ff == 0 || l.frequency.len() != l.n_ff {
            return bad(format!("layer {i}: {} frequencies for {} neurons", l.frequency.len(), l.n_ff));
        }
        if l.gate_bytes == 0 || l.bundle_bytes == 0 {
            return bad(format!("layer {i}: zero-sized neuron"));
        }
        if l.frequency.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return bad(format!("layer {i}: a frequency is negative or not finite"));
        }
        if l.frequency.windows(2).any(|w| w[0] < w[1]) {
            return bad(format!("layer {i}: frequencies are not in descending (hot) order"));
        }
        if !(l.predicted_density.is_finite() && (0.0..=1.0).contains(&l.predicted_density)) {
            return bad(format!("layer {i}: predicted density {} is not in [0, 1]", l.predicted_density));
        }
    }
    let ffn: u64 = input.layers.iter().map(|l| l.n_ff as u64 * (l.gate_bytes + l.bundle_bytes)).sum();
    if input.file_bytes < ffn {
        return bad(format!("file of {} B is smaller than its FFN weights ({ffn} B)", input.file_bytes));
    }
    if device.read_throughput(BLOCK, 1) <= 0.0 {
        return Err(PlanError::IncompleteProfile { why: "no read measurements".into() });
    }
    if device.kernel_gb_per_s(1) <= 0.0 {
        return Err(PlanError::IncompleteProfile { why: "no kernel measurements".into() });
    }
    Ok(())
}

/// Makes a plan for running `input`'s model on `device` within `budget` with up to `threads` compute threads.
pub fn plan(
    input: &PlanInput,
    device: &DeviceProfile,
    budget: Budget,
    threads: usize,
) -> Result<Plan, PlanError> {
    validate(input, device)?;
    let mut why = Vec::new();
    let n_layers = input.layers.len();
    let cn = input.cluster_neurons as u64;
    let neuron_bytes: Vec<u64> = input.layers.iter().map(|l| l.gate_bytes + l.bundle_bytes).collect();
    let total_ffn: u64 = input.layers.iter().zip(&neuron_bytes).map(|(l, &b)| l.n_ff as u64 * b).sum();
    let n_neurons: u64 = input.layers.iter().map(|l| l.n_ff as u64).sum();

    // Read sizes: a predicted neuron is one read of its whole record; with thresholds the gates are read by
    // cluster and the up/down part per active neuron.
    let neuron_read: Vec<u64> = input
        .layers
        .iter()
        .map(|l| {
            round_block(if input.uses_predictor { l.gate_bytes + l.bundle_bytes } else { l.bundle_bytes })
        })
        .collect();
    let read_block = neuron_read.iter().copied().max().unwrap_or(BLOCK);
    let qd = device.best_queue_depth(read_block);
    why.push(format!(
        "reads: one {} KiB read per missing neuron ({}); the device reaches 90% of its best throughput at \
         {} KiB from queue depth {qd} ({:.0} MB/s, {:.0} MB/s at depth 1)",
        read_block / 1024,
        if input.uses_predictor {
            "gate, up and down together"
        } else {
            "up and down; gates read by cluster"
        },
        read_block / 1024,
        device.read_throughput(read_block, qd),
        device.read_throughput(read_block, 1),
    ));

    // Runtime grain: the packed cluster, or a multiple of it if reads of 64 KiB or more are much faster.
    let record =
        input.layers.iter().map(|l| round_block(cn * (l.gate_bytes + l.bundle_bytes))).max().unwrap_or(BLOCK);
    let mut grain = input.cluster_neurons;
    if record < LARGE_READ {
        let m = LARGE_READ.div_ceil(record);
        let big = record * m;
        let tp_small = device.read_throughput(record, device.best_queue_depth(record));
        let tp_big = device.read_throughput(big, device.best_queue_depth(big));
        if tp_big >= GRAIN_SPEEDUP * tp_small {
            grain = input.cluster_neurons * m as usize;
            why.push(format!(
                "grain: packed clusters of {cn} neurons are {} KiB records; {m} of them ({} KiB) read at \
                 {tp_big:.0} MB/s vs {tp_small:.0} MB/s, so the runtime schedules clusters of {grain} neurons \
                 (cold misses are still read per neuron)",
                record / 1024,
                big / 1024
            ));
        } else {
            why.push(format!(
                "grain: packed clusters of {cn} neurons ({} KiB records); {} KiB reads would be only \
                 {:.2}x faster ({tp_big:.0} vs {tp_small:.0} MB/s), below the {GRAIN_SPEEDUP}x worth a coarser grain",
                record / 1024,
                big / 1024,
                tp_big / tp_small.max(1e-9)
            ));
        }
    } else {
        why.push(format!(
            "grain: packed clusters of {cn} neurons are {} KiB records, already large reads",
            record / 1024
        ));
    }
    let grain_bytes = input
        .layers
        .iter()
        .map(|l| round_block(grain as u64 * (l.gate_bytes + l.bundle_bytes)))
        .max()
        .unwrap_or(BLOCK);

    // Fixed costs.
    let staging = n_layers as u64 * grain_bytes;
    let io_bufs = 2 * qd as u64 * read_block;
    let index = n_neurons * INDEX_BYTES_PER_NEURON + n_layers as u64 * BLOCK;
    let overhead = staging + io_bufs + index;
    let minimum = input.resident_bytes + input.kv_bytes + input.scratch_bytes + overhead;
    let budget_bytes = match budget {
        Budget::Bytes(b) => b,
        Budget::Percent(p) => {
            if !(p.is_finite() && p > 0.0) {
                return Err(PlanError::BadBudget {
                    input: format!("{p}%"),
                    why: "not a positive percentage".into(),
                });
            }
            let weights = (input.file_bytes as f64 * p / 100.0).round() as u64;
            why.push(format!(
                "budget: {p}% of the {:.1} MiB model file is {:.1} MiB of weights, plus KV cache, scratch and \
                 buffers",
                mib(input.file_bytes),
                mib(weights)
            ));
            weights.saturating_add(minimum - input.resident_bytes)
        }
    };
    why.push(format!(
        "minimum: {:.1} MiB = resident weights {:.1} + KV cache {:.1} + scratch {:.1} + overhead {:.1} MiB \
         (one {} KiB staging cluster per layer, {qd} x 2 read buffers of {} KiB, a {} B/neuron index and 4 KiB \
         rounding slack per layer)",
        mib(minimum),
        mib(input.resident_bytes),
        mib(input.kv_bytes),
        mib(input.scratch_bytes),
        mib(overhead),
        grain_bytes / 1024,
        read_block / 1024,
        INDEX_BYTES_PER_NEURON
    ));
    if budget_bytes < minimum {
        return Err(PlanError::BudgetTooSmall { budget: budget_bytes, minimum });
    }
    let available = budget_bytes - minimum;

    // The hot set, then the dynamic segments.
    let p: Vec<Vec<f64>> = input.layers.iter().map(expected_activations).collect();
    let order = greedy_order(&p, &neuron_bytes);
    let (hot_neurons, hot_bytes, cold_bytes, dyn_mass);
    if available >= total_ffn {
        hot_neurons = input.layers.iter().map(|l| l.n_ff).collect::<Vec<_>>();
        (hot_bytes, cold_bytes) = (0, 0);
        dyn_mass = vec![0.0; n_layers];
        why.push(format!(
            "budget: {:.1} MiB for FFN weights covers all {:.1} MiB of them: every neuron is pinned, no reads",
            mib(available),
            mib(total_ffn)
        ));
    } else {
        let dynamic = available * DYNAMIC_PERCENT / 100;
        let pinned_budget = available - dynamic;
        let (counts, used, n_taken) = take_prefix(&order, &neuron_bytes, n_layers, pinned_budget);
        why.push(format!(
            "budget: {:.1} MiB for FFN weights of {:.1} MiB ({:.0}%); {}% ({:.1} MiB) goes to the dynamic LRU \
             segments to catch token-to-token reuse among the neurons not pinned, the rest ({:.1} MiB) pins \
             the neurons with the most expected activations per byte",
            mib(available),
            mib(total_ffn),
            100.0 * available as f64 / total_ffn as f64,
            DYNAMIC_PERCENT,
            mib(dynamic),
            mib(pinned_budget)
        ));
        why.push(format!(
            "pinned: {n_taken} of {n_neurons} neurons ({:.1} MiB), greedy over all layers, each layer a prefix of \
             its hot order",
            mib(used)
        ));
        // Dynamic: the hot segment holds whole clusters of the neurons right after the pinned ones, the cold
        // segment single neurons of the tail beyond; each neuron costs its share of a cache entry.
        let hot_seg = dynamic * HOT_SEGMENT_PERCENT / 100;
        let cold_seg = dynamic - hot_seg;
        let hot_cost: Vec<u64> =
            neuron_bytes.iter().map(|&b| round_block(grain as u64 * b).div_ceil(grain as u64)).collect();
        let rest = &order[n_taken..];
        let (in_hot, hot_used, n_hot) = take_prefix(rest, &hot_cost, n_layers, hot_seg);
        let (in_cold, cold_used, n_cold) = take_prefix(&rest[n_hot..], &neuron_read, n_layers, cold_seg);
        let all_cached = n_taken + n_hot + n_cold == order.len();
        hot_bytes = if all_cached { hot_used } else { hot_seg };
        cold_bytes = if all_cached { cold_used } else { cold_seg };
        let mut mass = vec![0.0; n_layers];
        for (l, m) in mass.iter_mut().enumerate() {
            let start = counts[l];
            let end = start + in_hot[l] + in_cold[l];
            *m = p[l][start..end].iter().sum::<f64>();
        }
        dyn_mass = mass;
        why.push(format!(
            "dynamic: hot segment (cluster LRU) {:.1} MiB = {HOT_SEGMENT_PERCENT}% for the next {n_hot} neurons \
             in whole clusters, cold segment (neuron LRU) {:.1} MiB for about {n_cold} single neurons; their hits \
             are estimated as {LRU_EFFICIENCY} of the activations of the neurons they can hold (an estimate: LRU \
             churn is not modelled)",
            mib(hot_bytes),
            mib(cold_bytes)
        ));
        hot_neurons = counts;
    }
    let fixed_bytes: u64 = input
        .layers
        .iter()
        .zip(&hot_neurons)
        .zip(&neuron_bytes)
        .map(|((_, &k), &b)| round_block(k as u64 * b))
        .sum();

    // Expected reads and hits per token.
    let (mut total_active, mut served, mut neuron_reads_bytes, mut gate_read_bytes) = (0.0, 0.0, 0.0, 0.0);
    let (mut compute_ffn, mut max_misses_per_layer, mut n_gate_clusters) = (0.0, 0.0f64, 0u64);
    let gate_cluster_bytes =
        input.layers.iter().map(|l| round_block(cn * l.gate_bytes)).max().unwrap_or(BLOCK);
    for (l, layer) in input.layers.iter().enumerate() {
        let e: f64 = p[l].iter().sum();
        let pinned: f64 = p[l][..hot_neurons[l]].iter().sum();
        let hits = LRU_EFFICIENCY * dyn_mass[l];
        let misses = (e - pinned - hits).max(0.0);
        total_active += e;
        served += e - misses;
        neuron_reads_bytes += misses * neuron_read[l] as f64;
        max_misses_per_layer = max_misses_per_layer.max(misses);
        let n_cold = (layer.n_ff - hot_neurons[l]) as u64;
        if !input.uses_predictor {
            let clusters = n_cold.div_ceil(cn);
            n_gate_clusters += clusters;
            gate_read_bytes += (clusters * round_block(cn * layer.gate_bytes)) as f64;
            compute_ffn += layer.n_ff as f64 * layer.gate_bytes as f64 + e * layer.bundle_bytes as f64;
        } else {
            compute_ffn += e * (layer.gate_bytes + layer.bundle_bytes) as f64;
        }
    }
    let hit_rate = if total_active > 0.0 { served / total_active } else { 1.0 };
    let read_bytes = neuron_reads_bytes + gate_read_bytes;
    why.push(format!(
        "per token: {total_active:.0} active neurons expected, {:.1}% of them in memory; {:.2} MB of neuron \
         reads{}",
        100.0 * hit_rate,
        neuron_reads_bytes / 1e6,
        if input.uses_predictor {
            String::new()
        } else {
            format!(
                " + {:.2} MB of gate rows ({n_gate_clusters} clusters of {} KiB: thresholds need every gate)",
                gate_read_bytes / 1e6,
                gate_cluster_bytes / 1024
            )
        }
    ));

    // Time per token.
    let compute_threads = threads.max(1).min(device.n_cpus.max(1));
    // Weights kept in memory all fit in the last-level cache: the kernel runs at its in-cache speed.
    let in_memory_weights = input.resident_bytes + fixed_bytes + hot_bytes + cold_bytes;
    let kernel = device.kernel_gb_per_s_for(compute_threads, in_memory_weights);
    let cache_note = if kernel != device.kernel_gb_per_s(compute_threads) {
        format!(
            " (in-cache speed: the {:.1} MiB of weights in memory fit in the {:.0} MiB last-level cache)",
            mib(in_memory_weights),
            mib(device.llc_bytes)
        )
    } else {
        " (weights streamed from memory)".to_string()
    };
    let compute_bytes = input.resident_bytes as f64 + compute_ffn;
    let compute_s = compute_bytes / (kernel * 1e9);
    // Depth is bounded by the reads a layer actually has in flight.
    let per_layer_reads = (max_misses_per_layer.ceil() as usize).max(1);
    let qd_eff = qd.min(per_layer_reads);
    let tp_neuron = device.read_throughput(read_block, qd_eff);
    let mut io_s = neuron_reads_bytes / (tp_neuron.max(1e-9) * 1e6);
    if gate_read_bytes > 0.0 {
        let gqd = device.best_queue_depth(gate_cluster_bytes);
        io_s += gate_read_bytes / (device.read_throughput(gate_cluster_bytes, gqd).max(1e-9) * 1e6);
    }
    let fill_s = if read_bytes > 0.0 {
        n_layers as f64 * read_block as f64 / (device.read_throughput(read_block, 1).max(1e-9) * 1e6)
    } else {
        0.0
    };
    let token_s = compute_s.max(io_s) + fill_s;
    why.push(format!(
        "threads: {compute_threads} compute (of {threads} asked, {} CPUs) plus one I/O submission thread; the \
         kernel processes {kernel:.1} GB/s of Q4 weights{cache_note}",
        device.n_cpus
    ));
    why.push(format!(
        "time per token: compute {:.2} ms ({:.1} MB of weights), I/O {:.2} ms ({:.0} MB/s at depth {qd_eff}, \
         about {per_layer_reads} reads per layer), pipeline fill {:.2} ms (one {} KiB read latency per layer): \
         {:.2} ms, {:.2} tokens/s ({:.2} tokens/s in memory)",
        compute_s * 1e3,
        compute_bytes / 1e6,
        io_s * 1e3,
        tp_neuron,
        fill_s * 1e3,
        read_block / 1024,
        token_s * 1e3,
        1.0 / token_s,
        1.0 / compute_s
    ));

    Ok(Plan {
        model: input.model.clone(),
        budget_bytes,
        resident_bytes: input.resident_bytes,
        kv_bytes: input.kv_bytes,
        scratch_bytes: input.scratch_bytes,
        overhead_bytes: overhead,
        ffn_budget_bytes: available,
        hot_neurons,
        cache: CacheSizes { fixed_bytes, hot_bytes, cold_bytes },
        cluster_neurons: grain,
        compute_threads,
        io_queue_depth: qd,
        read_block_bytes: read_block,
        expected_mb_read_per_token: read_bytes / 1e6,
        expected_hit_rate: hit_rate,
        predicted_tokens_per_s: 1.0 / token_s,
        predicted_in_memory_tokens_per_s: 1.0 / compute_s,
        reasoning: why,
    })
}

impl Plan {
    /// The plan for people: sizes in MiB, the hot set per layer, predictions and the reasoning.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "plan for {}: budget {:.1} MiB", self.model, mib(self.budget_bytes));
        let rows = [
            ("resident weights", self.resident_bytes),
            ("KV cache", self.kv_bytes),
            ("scratch", self.scratch_bytes),
            ("overhead", self.overhead_bytes),
            ("FFN budget", self.ffn_budget_bytes),
            ("  fixed (pinned)", self.cache.fixed_bytes),
            ("  hot (cluster LRU)", self.cache.hot_bytes),
            ("  cold (neuron LRU)", self.cache.cold_bytes),
        ];
        for (name, b) in rows {
            let _ = writeln!(s, "  {name:<20} {:>10.1} MiB", mib(b));
        }
        let pinned: usize = self.hot_neurons.iter().sum();
        if self.hot_neurons.len() <= 16 {
            let _ = writeln!(s, "  pinned neurons per layer: {:?} ({pinned} in all)", self.hot_neurons);
        } else {
            let min = self.hot_neurons.iter().min().copied().unwrap_or(0);
            let max = self.hot_neurons.iter().max().copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "  pinned neurons per layer: {min} to {max}, {:.0} on average over {} layers ({pinned} in all)",
                pinned as f64 / self.hot_neurons.len() as f64,
                self.hot_neurons.len()
            );
        }
        let _ = writeln!(
            s,
            "  grain {} neurons, {} compute threads, I/O depth {}, reads of {} KiB",
            self.cluster_neurons,
            self.compute_threads,
            self.io_queue_depth,
            self.read_block_bytes / 1024
        );
        let _ = writeln!(
            s,
            "  expected: {:.2} MB read per token, hit rate {:.1}%, {:.2} tokens/s ({:.2} in memory)",
            self.expected_mb_read_per_token,
            100.0 * self.expected_hit_rate,
            self.predicted_tokens_per_s,
            self.predicted_in_memory_tokens_per_s
        );
        let _ = writeln!(s, "reasoning:");
        for r in &self.reasoning {
            let _ = writeln!(s, "  - {r}");
        }
        s
    }

    /// Writes the plan as JSON (to `FILE.partial`, then renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), PlanError> {
        let v = json!({
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes,
            "kv_bytes": self.kv_bytes,
            "scratch_bytes": self.scratch_bytes,
            "overhead_bytes": self.overhead_bytes,
            "ffn_budget_bytes": self.ffn_budget_bytes,
            "hot_neurons": self.hot_neurons,
            "cache": {"fixed_bytes": self.cache.fixed_bytes, "hot_bytes": self.cache.hot_bytes,
                      "cold_bytes": self.cache.cold_bytes},
            "cluster_neurons": self.cluster_neurons,
            "compute_threads": self.compute_threads,
            "io_queue_depth": self.io_queue_depth,
            "read_block_bytes": self.read_block_bytes,
            "expected_mb_read_per_token": self.expected_mb_read_per_token,
            "expected_hit_rate": self.expected_hit_rate,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "predicted_in_memory_tokens_per_s": self.predicted_in_memory_tokens_per_s,
            "reasoning": self.reasoning,
        });
        write_json_atomic(path, &v).map_err(|(path, source)| PlanError::Io { path, source })
    }

    /// Reads a file written by [`Plan::save`], checking its format and version.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let bytes =
            std::fs::read(path).map_err(|source| PlanError::Io { path: path.to_path_buf(), source })?;
        let bad = |why: String| PlanError::BadFile { path: path.to_path_buf(), why };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if v["format"] != PLAN_FORMAT {
            return Err(bad(format!("format is {}, not \"{PLAN_FORMAT}\"", v["format"])));
        }
        let found = v["version"].as_u64().ok_or_else(|| bad("no version".into()))?;
        if found != PLAN_VERSION {
            return Err(PlanError::Version { path: path.to_path_buf(), found, expected: PLAN_VERSION });
        }
        let f = Fields(&v);
        let c = Fields(&v["cache"]);
        let hot_neurons = f
            .array("hot_neurons")
            .map_err(&bad)?
            .iter()
            .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("hot_neurons holds a value that is not a count".into()))?;
        let reasoning = f
            .array("reasoning")
            .map_err(&bad)?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("reasoning holds a value that is not a string".into()))?;
        let g = || -> Result<Plan, String> {
            Ok(Plan {
                model: f.str("model")?,
                budget_bytes: f.u64("budget_bytes")?,
                resident_bytes: f.u64("resident_bytes")?,
                kv_bytes: f.u64("kv_bytes")?,
                scratch_bytes: f.u64("scratch_bytes")?,
                overhead_bytes: f.u64("overhead_bytes")?,
                ffn_budget_bytes: f.u64("ffn_budget_bytes")?,
                hot_neurons,
                cache: CacheSizes {
                    fixed_bytes: c.u64("fixed_bytes")?,
                    hot_bytes: c.u64("hot_bytes")?,
                    cold_bytes: c.u64("cold_bytes")?,
                },
                cluster_neurons: f.usize("cluster_neurons")?,
                compute_threads: f.usize("compute_threads")?,
                io_queue_depth: f.usize("io_queue_depth")?,
                read_block_bytes: f.u64("read_block_bytes")?,
                expected_mb_read_per_token: f.f64("expected_mb_read_per_token")?,
                expected_hit_rate: f.f64("expected_hit_rate")?,
                predicted_tokens_per_s: f.f64("predicted_tokens_per_s")?,
                predicted_in_memory_tokens_per_s: f.f64("predicted_in_memory_tokens_per_s")?,
                reasoning,
            })
        };
        g().map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sample_profile;

    /// A small model: `n_layers` layers of `n_ff` neurons with Zipf-like frequencies that differ by layer.
    fn input(n_layers: usize, n_ff: usize, uses_predictor: bool) -> PlanInput {
        let layers: Vec<LayerStats> = (0..n_layers)
            .map(|l| {
                let frequency: Vec<f32> =
                    (0..n_ff).map(|i| 0.9 / (1.0 + i as f32 / (4.0 + 3.0 * l as f32))).collect();
                LayerStats { n_ff, gate_bytes: 576, bundle_bytes: 1152, frequency, predicted_density: 0.1 }
            })
            .collect();
        let ffn: u64 = layers.iter().map(|l| l.n_ff as u64 * 1728).sum();
        PlanInput {
            model: "toy".into(),
            file_bytes: ffn + ffn / 8,
            resident_bytes: ffn / 8,
            kv_bytes: ffn / 16,
            scratch_bytes: 64 << 10,
            cluster_neurons: 16,
            d_model: 1024,
            layers,
            uses_predictor,
        }
    }

    fn minimum(inp: &PlanInput) -> u64 {
        match plan(inp, &sample_profile(), Budget::Bytes(1), 2) {
            Err(PlanError::BudgetTooSmall { budget: 1, minimum }) => minimum,
            other => panic!("expected BudgetTooSmall, got {other:?}"),
        }
    }

    #[test]
    fn budget_below_minimum_is_a_typed_error_naming_the_minimum() {
        let inp = input(4, 512, true);
        let min = minimum(&inp);
        assert!(min > inp.resident_bytes + inp.kv_bytes + inp.scratch_bytes, "got {min}");
        let err = plan(&inp, &sample_profile(), Budget::Bytes(min - 1), 2).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("minimum of {:.1} MiB", mib(min))), "{msg}");
        let p = plan(&inp, &sample_profile(), Budget::Bytes(min), 2).unwrap();
        assert_eq!(p.hot_neurons, vec![0; 4]);
        assert_eq!(p.ffn_budget_bytes, 0);
        assert_eq!(p.budget_bytes, p.resident_bytes + p.kv_bytes + p.scratch_bytes + p.overhead_bytes);
    }

    /// The best total expected activations over all per-layer prefix counts that fit in `budget`.
    fn brute_force(p: &[Vec<f64>], cost: &[u64], budget: u64) -> f64 {
        fn go(p: &[Vec<f64>], cost: &[u64], l: usize, left: u64) -> f64 {
            if l == p.len() {
                return 0.0;
            }
            let mut best = 0.0f64;
            let mut mass = 0.0;
            for k in 0..=p[l].len() {
                if k > 0 {
                    mass += p[l][k - 1];
                }
                let c = k as u64 * cost[l];
                if c > left {
                    break;
                }
                best = best.max(mass + go(p, cost, l + 1, left - c));
            }
            best
        }
        go(p, cost, 0, budget)
    }

    #[test]
    fn greedy_hot_set_is_a_prefix_and_optimal_for_equal_costs() {
        let p: Vec<Vec<f64>> = vec![
            vec![0.9, 0.5, 0.2, 0.1, 0.05],
            vec![0.95, 0.7, 0.6, 0.01],
            vec![0.4, 0.3, 0.3, 0.2, 0.1, 0.0],
        ];
        let cost = vec![10u64, 10, 10];
        let order = greedy_order(&p, &cost);
        assert_eq!(order.len(), 15);
        for budget in 0..=160 {
            let (counts, used, _) = take_prefix(&order, &cost, 3, budget);
            assert!(used <= budget);
            let mass: f64 = counts.iter().enumerate().map(|(l, &k)| p[l][..k].iter().sum::<f64>()).sum();
            let best = brute_force(&p, &cost, budget);
            assert!((mass - best).abs() < 1e-12, "budget {budget}: greedy {mass} vs best {best}");
        }
        // With unequal costs greedy is within one item of the optimum (the fractional-knapsack bound).
        let cost = vec![10u64, 25, 7];
        let order = greedy_order(&p, &cost);
        for budget in 0..=200 {
            let (counts, used, _) = take_prefix(&order, &cost, 3, budget);
            assert!(used <= budget);
            let mass: f64 = counts.iter().enumerate().map(|(l, &k)| p[l][..k].iter().sum::<f64>()).sum();
            let best = brute_force(&p, &cost, budget);
            assert!(mass <= best + 1e-12 && mass >= best - 0.95 - 1e-12, "budget {budget}: {mass} vs {best}");
        }
    }

    #[test]
    fn plan_pins_the_greedy_prefix() {
        let inp = input(3, 64, true);
        let min = minimum(&inp);
        let p = plan(&inp, &sample_profile(), Budget::Bytes(min + 100_000), 2).unwrap();
        // 85% of the FFN bytes pin neurons of 1728 B each.
        let pinned_budget = p.ffn_budget_bytes - p.ffn_budget_bytes * DYNAMIC_PERCENT / 100;
        let acts: Vec<Vec<f64>> = inp.layers.iter().map(expected_activations).collect();
        let mass: f64 =
            p.hot_neurons.iter().enumerate().map(|(l, &k)| acts[l][..k].iter().sum::<f64>()).sum();
        let best = brute_force(&acts, &[1728, 1728, 1728], pinned_budget);
        assert!((mass - best).abs() < 1e-9, "{mass} vs {best}");
        assert!(p.hot_neurons.iter().sum::<usize>() as u64 == pinned_budget / 1728);
        // Layers with a flatter (higher) frequency curve get more pinned neurons.
        assert!(p.hot_neurons[0] < p.hot_neurons[2], "{:?}", p.hot_neurons);
        assert!(
            p.cache.fixed_bytes + p.cache.hot_bytes + p.cache.cold_bytes <= p.ffn_budget_bytes + 3 * 4096
        );
    }

    #[test]
    fn larger_budgets_pin_more_and_read_less() {
        for uses_predictor in [true, false] {
            let inp = input(4, 512, uses_predictor);
            let min = minimum(&inp);
            let ffn: u64 = 4 * 512 * 1728;
            let mut prev: Option<Plan> = None;
            for step in 0..=50 {
                let b = min + ffn * step / 40;
                let p = plan(&inp, &sample_profile(), Budget::Bytes(b), 2).unwrap();
                if let Some(q) = &prev {
                    for (a, b) in q.hot_neurons.iter().zip(&p.hot_neurons) {
                        assert!(b >= a, "step {step}: {:?} -> {:?}", q.hot_neurons, p.hot_neurons);
                    }
                    assert!(
                        p.expected_mb_read_per_token <= q.expected_mb_read_per_token + 1e-12,
                        "step {step}"
                    );
                    assert!(p.expected_hit_rate >= q.expected_hit_rate - 1e-12, "step {step}");
                }
                prev = Some(p);
            }
            let last = prev.unwrap();
            assert_eq!(last.hot_neurons, vec![512; 4]);
            assert_eq!(last.expected_mb_read_per_token, 0.0);
        }
    }

    #[test]
    fn full_budget_pins_everything_and_reads_nothing() {
        let inp = input(4, 512, false);
        let p = plan(&inp, &sample_profile(), Budget::Percent(100.0), 2).unwrap();
        assert_eq!(p.hot_neurons, vec![512; 4]);
        assert_eq!(p.expected_mb_read_per_token, 0.0);
        assert_eq!(p.expected_hit_rate, 1.0);
        assert_eq!((p.cache.hot_bytes, p.cache.cold_bytes), (0, 0));
        assert_eq!(p.cache.fixed_bytes, 4 * round_block(512 * 1728));
        assert_eq!(p.predicted_tokens_per_s, p.predicted_in_memory_tokens_per_s);
        // Half the weights: something is read.
        let half = plan(&inp, &sample_profile(), Budget::Percent(50.0), 2).unwrap();
        assert!(half.expected_mb_read_per_token > 0.0 && half.expected_hit_rate < 1.0);
        assert!(half.hot_neurons.iter().all(|&k| k < 512));
    }

    #[test]
    fn predicted_speed_lies_between_serial_and_overlapped_bounds() {
        for uses_predictor in [true, false] {
            let inp = input(4, 512, uses_predictor);
            let d = sample_profile();
            let p = plan(&inp, &d, Budget::Percent(30.0), 2).unwrap();
            let tps = p.predicted_tokens_per_s;
            assert!(tps.is_finite() && tps > 0.0);
            assert!(tps < p.predicted_in_memory_tokens_per_s);
            // Slower than serial I/O at the device's best throughput would be impossible; faster than
            // compute plus I/O at depth 1 plus fill, too.
            let compute = 1.0 / p.predicted_in_memory_tokens_per_s;
            let io_fast = p.expected_mb_read_per_token / d.read_throughput(1 << 20, 64);
            let io_slow = p.expected_mb_read_per_token / d.read_throughput(4096, 1);
            let fill_max = 4.0 * p.read_block_bytes as f64 / (d.read_throughput(4096, 1) * 1e6);
            assert!(tps <= 1.0 / compute.max(io_fast) + 1e-9, "{tps}");
            assert!(tps >= 1.0 / (compute + io_slow + fill_max) - 1e-9, "{tps}");
            assert_eq!(p.compute_threads, 2);
        }
        // Threshold sparsity reads the gates of every neuron not pinned, so it reads more.
        let a = plan(&input(4, 512, true), &sample_profile(), Budget::Percent(30.0), 2).unwrap();
        let b = plan(&input(4, 512, false), &sample_profile(), Budget::Percent(30.0), 2).unwrap();
        assert!(b.expected_mb_read_per_token > a.expected_mb_read_per_token);
    }

    #[test]
    fn threads_are_capped_by_cpus() {
        let p = plan(&input(2, 64, true), &sample_profile(), Budget::Percent(50.0), 64).unwrap();
        assert_eq!(p.compute_threads, 4);
        assert!(p.render().contains("4 compute threads"));
    }

    #[test]
    fn models_that_fit_in_the_last_level_cache_use_the_in_cache_kernel_speed() {
        let inp = input(2, 256, true);
        let small = DeviceProfile { llc_bytes: 1 << 30, ..sample_profile() };
        let big = DeviceProfile { llc_bytes: 4096, ..sample_profile() };
        let a = plan(&inp, &small, Budget::Percent(100.0), 2).unwrap();
        let b = plan(&inp, &big, Budget::Percent(100.0), 2).unwrap();
        let ratio = a.predicted_in_memory_tokens_per_s / b.predicted_in_memory_tokens_per_s;
        assert!((ratio - 40.0 / 18.0).abs() < 1e-9, "{ratio}");
        assert!(a.reasoning.iter().any(|r| r.contains("in-cache speed")), "{:?}", a.reasoning);
    }

    #[test]
    fn small_records_get_a_coarser_grain_when_large_reads_are_faster() {
        // 16 neurons x 1728 B = 27 KiB, rounded to 28 KiB; 3 of them are 84 KiB at 1000 vs about 700 MB/s.
        let p = plan(&input(2, 256, true), &sample_profile(), Budget::Percent(50.0), 2).unwrap();
        assert_eq!(p.cluster_neurons, 16, "{:?}", p.reasoning);
        // 4 neurons of 1728 B = 8 KiB records: 8 of them (64 KiB) read at 1000 vs 475 MB/s.
        let mut inp = input(2, 256, true);
        inp.cluster_neurons = 4;
        let p = plan(&inp, &sample_profile(), Budget::Percent(50.0), 2).unwrap();
        assert_eq!(p.cluster_neurons, 32, "{:?}", p.reasoning);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let d = sample_profile();
        let mut inp = input(2, 64, true);
        inp.layers[1].frequency.swap(0, 5);
        assert!(matches!(plan(&inp, &d, Budget::Percent(50.0), 2), Err(PlanError::BadInput { .. })));
        let mut inp = input(2, 64, true);
        inp.layers[0].frequency.pop();
        assert!(matches!(plan(&inp, &d, Budget::Percent(50.0), 2), Err(PlanError::BadInput { .. })));
        let mut inp = input(2, 64, true);
        inp.layers[0].predicted_density = f64::NAN;
        assert!(matches!(plan(&inp, &d, Budget::Percent(50.0), 2), Err(PlanError::BadInput { .. })));
        let empty = DeviceProfile { reads: vec![], ..sample_profile() };
        assert!(matches!(
            plan(&input(2, 64, true), &empty, Budget::Percent(50.0), 2),
            Err(PlanError::IncompleteProfile { .. })
        ));
    }

    #[test]
    fn parse_budget_cases() {
        assert_eq!(parse_budget("48MiB").unwrap(), Budget::Bytes(48 << 20));
        assert_eq!(parse_budget("64M").unwrap(), Budget::Bytes(64 << 20));
        assert_eq!(parse_budget("1.5GiB").unwrap(), Budget::Bytes(3 << 29));
        assert_eq!(parse_budget("123456").unwrap(), Budget::Bytes(123456));
        assert_eq!(parse_budget("50%").unwrap(), Budget::Percent(50.0));
        assert_eq!(parse_budget(" 12.5 % ").unwrap(), Budget::Percent(12.5));
        assert_eq!(parse_budget("2g").unwrap(), Budget::Bytes(2 << 30));
        assert_eq!(parse_budget("3MB").unwrap(), Budget::Bytes(3_000_000));
        assert_eq!(parse_budget("4096B").unwrap(), Budget::Bytes(4096));
        for bad in ["", "MiB", "abc", "-5M", "5X", "0", "0%", "150%", "x%", "1.2.3M", "99999999999999999999T"]
        {
            match parse_budget(bad) {
                Err(PlanError::BadBudget { input, .. }) => assert_eq!(input, bad),
                other => panic!("{bad:?}: expected BadBudget, got {other:?}"),
            }
        }
    }

    #[test]
    fn save_load_round_trip_and_version_check() {
        let p = plan(&input(3, 128, true), &sample_profile(), Budget::Percent(40.0), 2).unwrap();
        let dir = std::env::temp_dir().join(format!("pinion-plan-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        p.save(&path).unwrap();
        assert_eq!(Plan::load(&path).unwrap(), p);
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["version"] = json!(7);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        match Plan::load(&path) {
            Err(PlanError::Version { found: 7, expected: 1, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
        v["version"] = json!(1);
        v["format"] = json!("pinion-device");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(Plan::load(&path), Err(PlanError::BadFile { .. })));
        v["format"] = json!(PLAN_FORMAT);
        v["hot_neurons"] = json!([1, -2]);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(Plan::load(&path), Err(PlanError::BadFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn render_shows_sizes_and_reasoning() {
        let p = plan(&input(2, 128, true), &sample_profile(), Budget::Percent(40.0), 2).unwrap();
        let r = p.render();
        assert!(r.contains(&format!("  {:<20} {:>10.1} MiB", "KV cache", mib(p.kv_bytes))), "{r}");
        assert!(r.contains("reasoning:") && r.contains("minimum:"), "{r}");
        assert_eq!(r.matches("\n  - ").count(), p.reasoning.len());
        assert!(r.contains(&format!("pinned neurons per layer: {:?}", p.hot_neurons)), "{r}");
        let many = Plan { hot_neurons: (0..32).collect(), ..p };
        assert!(many.render().contains("0 to 31, 16 on average over 32 layers (496 in all)"));
    }
}
