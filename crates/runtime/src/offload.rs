//! Running a packed model under a memory budget: the FFN neurons that do not fit stay on storage and are read,
//! a cluster at a time, while the CPU computes the clusters that are ready (PowerInfer-2's decode pipeline).
//!
//! # Memory
//!
//! [`MemoryPlan`] splits the budget. First what every token needs: the process as loaded (binary, tokenizer,
//! norms; measured), attention weights, KV cache, scratch, I/O buffers, one layer's staging buffer and the
//! predictors. A budget below that is refused with the minimum. The rest goes, in order, to the rows of the
//! output head (needed every token, and read at the very end of a token, where no compute can hide the read),
//! then to the FFN: with thresholds (SiLU) every gate row is needed every token, so gate blocks are pinned
//! first; then neuron bundles (up row and down column) in the order of their activation frequency, each layer a
//! prefix of its packed (hotness) order. 15% of the FFN share is a neuron-level LRU ([`NeuronCache`]) that
//! catches token-to-token reuse; the LLM-in-a-Flash policy gives it all of the share, with a sliding window.
//!
//! # The decode step of one layer (the five stages)
//!
//! *Pred*: the predictor's mask, if one is used. *GIO*: gate rows of clusters not pinned are read (with
//! thresholds, they are submitted before the layer's attention runs, so that the reads overlap it). *GC*: a
//! cluster's gates are computed as soon as its gate rows are in memory, and the neurons that pass are looked up
//! in the pinned store and the LRU. *UDIO*: the bundles of the missing ones are read. *UDC*: up rows and down
//! columns are computed when all of a cluster's bundles are in. Every compute thread takes whichever cluster is
//! ready, and drains completions between tasks; a thread blocks on the completion channel only when nothing is
//! ready (that wait is the I/O stall). Each cluster adds into its own slot of a `ClusterSums`, reduced in cluster
//! order, with the same kernels as the in-memory path: the result is bit-identical to running from memory.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use pinion_cache::{NeuronCache, Policy};
use pinion_exec_cpu::sparse::{self, ClusterGates, ClusterSums, SparseFfn, TokenActs, UpDown};
use pinion_exec_cpu::{QMatrix, QuantizedActs, SpinPool};
use pinion_format::packed::PackedLayer;
use pinion_format::quant;
use pinion_io::{BackendChoice, Completion, IoEngine, IoEngineBuilder, ReadRequest};

use crate::context::ContextParams;
use crate::error::{RuntimeError, mib};
use crate::model::Model;

/// Which cache policy the neuron cache follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// PowerInfer-2: hot neurons pinned by activation frequency, plus a neuron-level LRU.
    PowerInfer2,
    /// LLM in a Flash: nothing pinned; keep the neurons used in the last `window` tokens.
    LlmFlash {
        /// Tokens a neuron stays cached after its last use.
        window: u32,
    },
}

/// How an offloaded run works: its memory budget and which mechanisms are on (each can be switched off to
/// measure what it brings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffloadOptions {
    /// Bytes the whole process may use (resident set).
    pub budget: u64,
    /// Read a neuron's up row and down column together (one bundle); off: two separate, unmerged reads.
    pub bundle: bool,
    /// Keep FFN neurons in memory (pinned and LRU); off: every FFN byte is read every token.
    pub cache: bool,
    /// Overlap reads with compute, cluster by cluster; off: read a layer's gates, compute them, read its
    /// bundles, compute them.
    pub pipeline: bool,
    /// The cache policy.
    pub policy: CachePolicy,
    /// Reads kept in flight.
    pub queue_depth: usize,
}

impl OffloadOptions {
    /// Every mechanism on, PowerInfer-2's policy, queue depth 32.
    pub fn new(budget: u64) -> OffloadOptions {
        OffloadOptions {
            budget,
            bundle: true,
            cache: true,
            pipeline: true,
            policy: CachePolicy::PowerInfer2,
            queue_depth: 32,
        }
    }
}

/// Bytes kept aside for what the plan does not itemize (allocator slack, per-cluster lists, thread stacks).
const MARGIN: u64 = 2 << 20;
/// Bookkeeping bytes per LRU entry on top of its payload.
const LRU_ENTRY_OVERHEAD: u64 = 64;
/// Share of the FFN memory that goes to the LRU under PowerInfer-2's policy.
const LRU_SHARE: f64 = 0.15;
/// Largest read of a staged layer or a streamed head chunk.
const CHUNK: usize = 512 << 10;
/// Checks an idle compute thread spins before it yields its core at each check.
const SPINS_BEFORE_YIELD: u32 = 256;
/// Expected share of active neurons among a layer's unpinned ones above which its records are read whole.
const WHOLE_RECORD_DENSITY: f32 = 0.25;

/// How an offloaded run spends its memory budget.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// The budget.
    pub budget: u64,
    /// Resident set of the process once the model is loaded (binary, tokenizer, norms), measured before the
    /// context is made.
    pub process: u64,
    /// Attention weights.
    pub attention: u64,
    /// KV cache of the whole context.
    pub kv: u64,
    /// Activations, logits and per-cluster sums.
    pub scratch: u64,
    /// The I/O engine's buffer pool.
    pub io_buffers: u64,
    /// One layer's FFN records (prefill reads a whole layer; decode assembles its reads there).
    pub staging: u64,
    /// Decoded predictors, when used.
    pub predictors: u64,
    /// Output head rows kept in memory, in bytes, and the head's size.
    pub head: u64,
    /// Bytes of the whole output head.
    pub head_total: u64,
    /// Output head rows kept in memory.
    pub head_rows: usize,
    /// Pinned gate blocks.
    pub pinned_gates: u64,
    /// Pinned neuron bundles.
    pub pinned_bundles: u64,
    /// Neuron LRU (payload and bookkeeping).
    pub lru: u64,
    /// All FFN weight bytes (gate rows and bundles).
    pub ffn_total: u64,
    /// Per layer: clusters whose gate block is pinned (a prefix).
    pub pin_gate_clusters: Vec<usize>,
    /// Per layer: positions whose bundle is pinned (a prefix of the hotness order).
    pub pin_bundles: Vec<usize>,
    /// Per layer: LRU entries.
    pub lru_entries: Vec<usize>,
}

impl MemoryPlan {
    /// What a run needs before any weight is cached: the smallest budget that runs.
    pub fn minimum(&self) -> u64 {
        self.process
            + self.attention
            + self.kv
            + self.scratch
            + self.io_buffers
            + self.staging
            + self.predictors
            + MARGIN
    }

    /// Bytes planned in all.
    pub fn total(&self) -> u64 {
        self.minimum() + self.head + self.pinned_gates + self.pinned_bundles + self.lru
    }

    /// A one-line account of the fixed part.
    pub fn fixed_detail(&self) -> String {
        format!(
            "process {} + attention {} + KV {} + scratch {} + I/O buffers {} + staging {} + predictors {} + margin {}",
            mib(self.process),
            mib(self.attention),
            mib(self.kv),
            mib(self.scratch),
            mib(self.io_buffers),
            mib(self.staging),
            mib(self.predictors),
            mib(MARGIN)
        )
    }

    /// A few lines for the terminal.
    pub fn render(&self) -> String {
        let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
        let ffn_cached = self.pinned_gates + self.pinned_bundles;
        format!(
            "memory budget {}: fixed {} ({})\n  output head {} of {} in memory ({:.0}%), FFN pinned {} of {} ({:.0}%: gates {}, bundles {}), neuron LRU {}",
            mib(self.budget),
            mib(self.minimum()),
            self.fixed_detail(),
            mib(self.head),
            mib(self.head_total),
            pct(self.head, self.head_total),
            mib(ffn_cached),
            mib(self.ffn_total),
            pct(ffn_cached, self.ffn_total),
            mib(self.pinned_gates),
            mib(self.pinned_bundles),
            mib(self.lru),
        )
    }
}

/// The resident set of this process in bytes (`/proc/self/statm`), 0 where unavailable.
pub fn current_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// What an offloaded run holds besides its plan's own buffers: the process as measured before the context was
/// made, and the decoded predictors in memory (whether or not they choose the neurons).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) process: u64,
    pub(crate) predictor_bytes: u64,
    /// Predictors choose the neurons (gate rows are read after the prediction; thresholds need every gate).
    pub(crate) predicting: bool,
}

/// Plans the budget of an offloaded run of `model` (see the module documentation).
pub(crate) fn plan_memory(
    model: &Model,
    params: &ContextParams,
    opts: &OffloadOptions,
    held: Held,
) -> Result<MemoryPlan, RuntimeError> {
    let Held { process, predictor_bytes, predicting } = held;
    let c = model.config();
    let layers = model.packed_layers().ok_or(RuntimeError::NotPacked)?;
    let n_layers = layers.len();
    let attention: u64 =
        model.layers.iter().map(|l| l.wq.n_bytes() + l.wk.n_bytes() + l.wv.n_bytes() + l.wo.n_bytes()).sum();
    let max_clusters = layers.iter().map(|p| p.n_clusters()).max().unwrap_or(0);
    let max_c = layers.iter().map(|p| p.cluster_neurons).max().unwrap_or(0);
    let scratch = params.scratch_bytes(c)
        + (max_clusters * c.d_model * 4) as u64
        + (max_clusters * max_c * 16) as u64
        + 2 * c.n_vocab as u64 * 4;
    let staging = layers.iter().map(|p| p.layer_range().end - p.layer_range().start).max().unwrap_or(0);
    let gates_per_layer = layers.iter().map(|p| (p.n_ff * p.gate_row_bytes()) as u64).max().unwrap_or(0);
    // Room for one layer's prefetched gates plus a window of reads in flight.
    let io_buffers = (gates_per_layer + (opts.queue_depth * 128 * 1024) as u64).clamp(4 << 20, 64 << 20);
    let ffn_total: u64 =
        layers.iter().map(|p| (p.n_ff * (p.gate_row_bytes() + p.bundle_bytes())) as u64).sum();
    let head_total = model.output.n_bytes();
    let mut plan = MemoryPlan {
        budget: opts.budget,
        process,
        attention,
        kv: params.kv_bytes(c),
        scratch,
        io_buffers,
        staging,
        predictors: predictor_bytes,
        head_total,
        ffn_total,
        pin_gate_clusters: vec![0; n_layers],
        pin_bundles: vec![0; n_layers],
        lru_entries: vec![0; n_layers],
        ..MemoryPlan::default()
    };
    let minimum = plan.minimum();
    if opts.budget < minimum {
        return Err(RuntimeError::BudgetTooSmall {
            budget: opts.budget,
            minimum,
            detail: plan.fixed_detail(),
            kv: plan.kv,
        });
    }
    let mut avail = opts.budget - minimum;

    // The output head first: read at the end of a token, its misses stall everything.
    let row_bytes = head_total / c.n_vocab.max(1) as u64;
    plan.head_rows = ((avail / row_bytes.max(1)) as usize).min(c.n_vocab);
    plan.head = plan.head_rows as u64 * row_bytes;
    avail -= plan.head;
    if !opts.cache {
        return Ok(plan);
    }
    let lru_bytes = match opts.policy {
        CachePolicy::PowerInfer2 => (avail as f64 * LRU_SHARE) as u64,
        CachePolicy::LlmFlash { .. } => avail,
    };
    let mut pin = avail - lru_bytes;
    if !predicting {
        // Thresholds need every gate every token: gate blocks first, the same number of clusters per layer.
        let per_cluster_all: u64 =
            layers.iter().map(|p| (p.cluster_neurons * p.gate_row_bytes()) as u64).sum();
        let g = ((pin / per_cluster_all.max(1)) as usize).min(max_clusters);
        for (l, p) in layers.iter().enumerate() {
            plan.pin_gate_clusters[l] = g.min(p.n_clusters());
            let bytes: u64 =
                (0..plan.pin_gate_clusters[l]).map(|k| (p.cluster_len(k) * p.gate_row_bytes()) as u64).sum();
            plan.pinned_gates += bytes;
            pin -= bytes;
        }
    }
    // Then neurons by activation frequency across layers (with predictors, a neuron's gate row comes with it).
    let mut order: Vec<(f32, u32, u32)> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, p)| p.frequency.iter().enumerate().map(move |(pos, &f)| (f, l as u32, pos as u32)))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut next = vec![0usize; n_layers];
    for &(_, l, pos) in &order {
        let (l, pos) = (l as usize, pos as usize);
        let p = layers[l];
        if pos != next[l] {
            continue; // keep each layer a prefix of its order
        }
        // With predictors a neuron's gate row comes with it, and gate blocks are pinned whole: the first
        // neuron of a cluster pays for the cluster's block.
        let gate_cost = match (predicting, pos % p.cluster_neurons) {
            (true, 0) => (p.cluster_len(pos / p.cluster_neurons) * p.gate_row_bytes()) as u64,
            _ => 0,
        };
        let cost = p.bundle_bytes() as u64 + gate_cost;
        if cost > pin {
            break;
        }
        pin -= cost;
        next[l] += 1;
    }
    for (l, p) in layers.iter().enumerate() {
        plan.pin_bundles[l] = next[l];
        plan.pinned_bundles += (next[l] * p.bundle_bytes()) as u64;
        if predicting {
            let g = next[l].div_ceil(p.cluster_neurons);
            plan.pin_gate_clusters[l] = g;
            plan.pinned_gates += (0..g).map(|k| (p.cluster_len(k) * p.gate_row_bytes()) as u64).sum::<u64>();
        }
    }
    // The LRU gets its share plus what pinning left over, split evenly over the layers.
    let lru_total = avail.saturating_sub(plan.pinned_gates + plan.pinned_bundles);
    for (l, p) in layers.iter().enumerate() {
        let per_layer = lru_total / n_layers as u64;
        let entries = (per_layer / (p.bundle_bytes() as u64 + LRU_ENTRY_OVERHEAD)) as usize;
        plan.lru_entries[l] = entries.min(p.n_ff - plan.pin_bundles[l]);
        plan.lru += plan.lru_entries[l] as u64 * (p.bundle_bytes() as u64 + LRU_ENTRY_OVERHEAD);
    }
    Ok(plan)
}

/// Counters of an offloaded run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OffloadStats {
    /// Decode tokens counted.
    pub tokens: u64,
    /// Decode time of those tokens, in seconds.
    pub token_seconds: f64,
    /// Per-token decode latencies in seconds.
    pub latencies: Vec<f64>,
    /// Bytes read for FFN gates, bundles, the output head and embeddings during decode.
    pub gate_bytes: u64,
    /// Bundle bytes read.
    pub bundle_bytes: u64,
    /// Output head bytes read.
    pub head_bytes: u64,
    /// Embedding bytes read.
    pub embd_bytes: u64,
    /// Seconds the compute threads waited on reads with nothing else to do (mean over threads).
    pub stall_seconds: f64,
    /// Neuron uses served by the pinned store.
    pub pinned_hits: u64,
    /// Neuron uses served by the LRU.
    pub lru_hits: u64,
    /// Neuron uses read from storage.
    pub misses: u64,
    /// Gate blocks (or predicted rows' clusters) served from memory.
    pub gate_hits: u64,
    /// Gate blocks read.
    pub gate_misses: u64,
    /// Neurons computed (passed the gate phase) per layer, summed over tokens.
    pub neurons_per_layer: Vec<u64>,
    /// Reads issued to the OS during decode (requests after the I/O engine merged neighbours).
    pub disk_reads: u64,
    /// Bytes the OS transferred for them (whole aligned pages, so at least the bytes asked for).
    pub disk_bytes: u64,
}

impl OffloadStats {
    /// Reads issued to the OS per decode token.
    pub fn disk_reads_per_token(&self) -> f64 {
        self.disk_reads as f64 / self.tokens.max(1) as f64
    }

    /// All decode bytes read.
    pub fn bytes_read(&self) -> u64 {
        self.gate_bytes + self.bundle_bytes + self.head_bytes + self.embd_bytes
    }

    /// Megabytes (10^6) read per decode token.
    pub fn mb_read_per_token(&self) -> f64 {
        self.mb_per_token(self.bytes_read())
    }

    /// Read throughput over decode time, in MB (10^6) per second: near the disk's sequential rate, a run is
    /// bound by the bytes it reads, and only reading fewer of them (a larger budget) makes it faster.
    pub fn read_mb_per_s(&self) -> f64 {
        if self.token_seconds > 0.0 { self.bytes_read() as f64 / 1e6 / self.token_seconds } else { 0.0 }
    }

    /// Share of neuron uses served from memory (pinned or LRU).
    pub fn hit_rate(&self) -> f64 {
        self.pinned_hit_rate() + self.lru_hit_rate()
    }

    /// Share of neuron uses served by the pinned store.
    pub fn pinned_hit_rate(&self) -> f64 {
        self.pinned_hits as f64 / (self.pinned_hits + self.lru_hits + self.misses).max(1) as f64
    }

    /// Share of neuron uses served by the LRU.
    pub fn lru_hit_rate(&self) -> f64 {
        self.lru_hits as f64 / (self.pinned_hits + self.lru_hits + self.misses).max(1) as f64
    }

    /// Share of needed gate blocks that were in memory.
    pub fn gate_hit_rate(&self) -> f64 {
        self.gate_hits as f64 / (self.gate_hits + self.gate_misses).max(1) as f64
    }

    /// `bytes` in MB (10^6) per decode token.
    pub fn mb_per_token(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e6 / self.tokens.max(1) as f64
    }

    /// Neurons computed per token in each layer.
    pub fn neurons_per_layer_per_token(&self) -> Vec<f64> {
        self.neurons_per_layer.iter().map(|&n| n as f64 / self.tokens.max(1) as f64).collect()
    }

    /// Share of decode time the compute threads stalled on I/O.
    pub fn io_stall_share(&self) -> f64 {
        if self.token_seconds > 0.0 { (self.stall_seconds / self.token_seconds).min(1.0) } else { 0.0 }
    }

    /// Latency quantile `q` in seconds (0 without tokens).
    pub fn latency_quantile(&self, q: f64) -> f64 {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
    }
}

/// One layer's cached FFN bytes.
struct LayerStore {
    /// Gate blocks of clusters `0..n_gate_clusters`, back to back.
    gates: Vec<u8>,
    n_gate_clusters: usize,
    /// Bundles of positions `0..n_bundles`, `bundle_bytes` each.
    bundles: Vec<u8>,
    n_bundles: usize,
    lru: Option<NeuronCache>,
    /// Read whole records (gate rows and bundles in one read, before the gates are known) for clusters not
    /// pinned: with thresholds and a dense enough layer, two dependent reads per cluster cost more than the
    /// bundles of the neurons that turn out inactive.
    whole: bool,
}

// Completion tags: kind in the top bits, then the layer, then an index.
const KIND_GATE: u64 = 1;
const KIND_BUNDLE: u64 = 2;
const KIND_STAGE: u64 = 3;
const KIND_HEAD: u64 = 4;

fn tag(kind: u64, layer: usize, idx: usize) -> u64 {
    (kind << 56) | ((layer as u64) << 32) | idx as u64
}

fn untag(t: u64) -> (u64, usize, usize) {
    (t >> 56, ((t >> 32) & 0xff_ffff) as usize, (t & 0xffff_ffff) as usize)
}

/// The offloaded part of a context: the I/O engine, the cached FFN bytes, the staging buffer and counters.
pub(crate) struct Offload {
    opts: OffloadOptions,
    plan: MemoryPlan,
    engine: IoEngine,
    layers: Vec<LayerStore>,
    staging: Vec<u8>,
    /// Per-cluster state and lists, reused across layers and tokens (a decode step allocates no per-cluster
    /// list).
    bufs: Vec<ClBufs>,
    /// Request lists and the embedding row, reused across tokens.
    reqs: Vec<ReadRequest>,
    prefetch_reqs: Vec<ReadRequest>,
    queue: VecDeque<Task>,
    embd_row: Vec<u8>,
    sums: Option<ClusterSums>,
    /// Layer whose gate reads were submitted ahead of its FFN.
    prefetched: Option<usize>,
    /// Uses predictors (gate reads depend on the prediction, so they cannot be issued early).
    predicting: bool,
    stats: OffloadStats,
    token_start: Option<Instant>,
    /// Stall nanoseconds summed over threads in the current token.
    stall_ns: u64,
    /// The I/O engine's OS reads and bytes transferred when the current token began.
    io_at_start: (u64, u64),
    tied: bool,
    broken: bool,
    /// Compute threads (a wait of the main thread idles all of them).
    n_threads: u64,
}

impl Offload {
    /// Plans the budget, opens the file for direct reads and loads the pinned neurons.
    pub(crate) fn new(
        model: &Model,
        params: &ContextParams,
        opts: OffloadOptions,
        held: Held,
    ) -> Result<Offload, RuntimeError> {
        let layers = model.packed_layers().ok_or(RuntimeError::NotPacked)?;
        let plan = plan_memory(model, params, &opts, held)?;
        let path = model.file().path().to_path_buf();
        let engine = IoEngineBuilder::new(&path)
            .backend(BackendChoice::Auto)
            .queue_depth(opts.queue_depth)
            .pool_bytes(plan.io_buffers as usize)
            .coalesce_limit(if opts.bundle { pinion_io::DEFAULT_COALESCE_LIMIT } else { 0 })
            .build()
            .map_err(|e| {
                RuntimeError::Offload(format!("cannot open {} for direct reads: {e}", path.display()))
            })?;
        let policy = match opts.policy {
            CachePolicy::PowerInfer2 => Policy::Segmented,
            CachePolicy::LlmFlash { window } => Policy::SlidingWindow { tokens: window.max(1) },
        };
        let mut stores = Vec::with_capacity(layers.len());
        for (l, p) in layers.iter().enumerate() {
            let g = plan.pin_gate_clusters[l];
            let nb = plan.pin_bundles[l];
            let mut gates = Vec::with_capacity(g * p.cluster_neurons * p.gate_row_bytes());
            let mut bundles = Vec::with_capacity(nb * p.bundle_bytes());
            let records = g.max(nb.div_ceil(p.cluster_neurons));
            if records > 0 {
                let start = p.record_range(0).start;
                let end = p.record_range(records - 1).end;
                let mut buf = vec![0u8; (end - start) as usize];
                read_into(&engine, start..end, &mut buf, &mut Vec::new())?;
                let at = |r: Range<u64>| &buf[(r.start - start) as usize..(r.end - start) as usize];
                for k in 0..g {
                    gates.extend_from_slice(at(p.gate_block_range(k)));
                }
                for pos in 0..nb {
                    bundles.extend_from_slice(at(p.bundle_range(pos)));
                }
            }
            let lru = (plan.lru_entries[l] > 0)
                .then(|| NeuronCache::new(p.bundle_bytes(), plan.lru_entries[l], p.n_ff, policy));
            let rest = &p.frequency[nb.min(p.n_ff)..];
            let density = rest.iter().sum::<f32>() / rest.len().max(1) as f32;
            let whole = !held.predicting && opts.bundle && density >= WHOLE_RECORD_DENSITY;
            stores.push(LayerStore { gates, n_gate_clusters: g, bundles, n_bundles: nb, lru, whole });
        }
        let n_layers = layers.len();
        Ok(Offload {
            staging: vec![0u8; plan.staging as usize],
            plan,
            engine,
            layers: stores,
            bufs: Vec::new(),
            reqs: Vec::new(),
            prefetch_reqs: Vec::new(),
            queue: VecDeque::new(),
            embd_row: Vec::new(),
            sums: None,
            prefetched: None,
            predicting: held.predicting,
            stats: OffloadStats { neurons_per_layer: vec![0; n_layers], ..OffloadStats::default() },
            token_start: None,
            stall_ns: 0,
            io_at_start: (0, 0),
            tied: model.output.range == model.tok_embd.range,
            broken: false,
            n_threads: params.n_threads as u64,
            opts,
        })
    }

    pub(crate) fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    pub(crate) fn options(&self) -> &OffloadOptions {
        &self.opts
    }

    pub(crate) fn stats(&self) -> &OffloadStats {
        &self.stats
    }

    pub(crate) fn reset_stats(&mut self) {
        let n = self.stats.neurons_per_layer.len();
        self.stats = OffloadStats { neurons_per_layer: vec![0; n], ..OffloadStats::default() };
    }

    /// I/O backend in use, for the banner.
    pub(crate) fn backend(&self) -> String {
        match self.engine.fallback_reason() {
            Some(r) => format!("{} ({r})", self.engine.backend()),
            None => format!(
                "{}{}",
                self.engine.backend(),
                if self.engine.direct_io() { ", O_DIRECT" } else { "" }
            ),
        }
    }

    fn check(&self) -> Result<(), RuntimeError> {
        if self.broken {
            return Err(RuntimeError::Offload("an earlier read failed; make a new context".into()));
        }
        Ok(())
    }

    /// Starts a decode token's clock.
    pub(crate) fn begin_token(&mut self) {
        self.token_start = Some(Instant::now());
        self.stall_ns = 0;
        let io = self.engine.stats();
        self.io_at_start = (io.reads, io.bytes_read);
    }

    /// Ends a decode token: counts it and advances the caches' token clocks.
    pub(crate) fn end_token(&mut self) {
        let n_threads = self.n_threads;
        if let Some(t0) = self.token_start.take() {
            let dt = t0.elapsed().as_secs_f64();
            self.stats.tokens += 1;
            self.stats.token_seconds += dt;
            self.stats.latencies.push(dt);
            self.stats.stall_seconds += self.stall_ns as f64 / 1e9 / n_threads.max(1) as f64;
            let io = self.engine.stats();
            self.stats.disk_reads += io.reads - self.io_at_start.0;
            self.stats.disk_bytes += io.bytes_read - self.io_at_start.1;
        }
        for s in &self.layers {
            if let Some(lru) = &s.lru {
                lru.advance_token();
            }
        }
    }

    fn decoding(&self) -> bool {
        self.token_start.is_some()
    }

    /// Writes the embedding of `token` into `out`, from memory when its row is in the resident part of a tied
    /// head, else read from storage.
    pub(crate) fn embed(&mut self, model: &Model, token: u32, out: &mut [f32]) -> Result<(), RuntimeError> {
        self.check()?;
        if self.tied && (token as usize) < self.plan.head_rows {
            return model.embed(token, out);
        }
        let n_vocab = model.config().n_vocab;
        if token as usize >= n_vocab {
            return Err(RuntimeError::BadToken { id: token, n_vocab });
        }
        let w = &model.tok_embd;
        let rb = w.row_bytes();
        let start = (w.range.start + token as usize * rb) as u64;
        let t0 = Instant::now();
        self.embd_row.resize(rb, 0);
        let read = read_into(&self.engine, start..start + rb as u64, &mut self.embd_row, &mut self.reqs);
        if read.is_err() {
            self.broken = true;
        }
        read?;
        if self.decoding() {
            self.stall_ns += t0.elapsed().as_nanos() as u64 * self.n_threads;
            self.stats.embd_bytes += rb as u64;
        }
        quant::dequantize_row(w.ty, &self.embd_row, out)?;
        Ok(())
    }

    /// Submits layer `l`'s gate reads ahead of its FFN (thresholds only: with a predictor the rows needed are
    /// not known before the FFN input).
    pub(crate) fn prefetch_gates(&mut self, model: &Model, l: usize) -> Result<(), RuntimeError> {
        self.check()?;
        if self.predicting || !self.opts.pipeline {
            return Ok(());
        }
        let pl = packed(model, l);
        let store = &self.layers[l];
        let reqs = &mut self.prefetch_reqs;
        reqs.clear();
        reqs.extend((store.n_gate_clusters..pl.n_clusters()).map(|k| gate_request(pl, store, l, k)));
        if !reqs.is_empty() {
            if let Err(e) = self.engine.submit_batch(reqs) {
                return Err(self.fail(format!("submitting gate reads: {e}")));
            }
        }
        self.prefetched = Some(l);
        Ok(())
    }

    fn fail(&mut self, why: String) -> RuntimeError {
        self.broken = true;
        RuntimeError::Offload(why)
    }

    /// Reads the whole of layer `l`'s records into the staging buffer and returns them as the FFN's byte source
    /// (prefill: every neuron is needed by some token).
    pub(crate) fn stage_layer(
        &mut self,
        model: &Model,
        l: usize,
    ) -> Result<crate::ffn::FfnBytes<'_>, RuntimeError> {
        self.check()?;
        let r = packed(model, l).layer_range();
        let len = (r.end - r.start) as usize;
        let read = read_into(&self.engine, r.clone(), &mut self.staging[..len], &mut self.reqs);
        if read.is_err() {
            self.broken = true;
        }
        read?;
        Ok(crate::ffn::FfnBytes { base: r.start, bytes: &self.staging[..len] })
    }

    /// The output head for the `n` rows of `acts` (quantized for the head's type): the resident rows through
    /// `matmul` from memory, the rest streamed from storage in chunks, each computed as it arrives. `out` is
    /// token-major (`n x n_vocab`).
    pub(crate) fn head(
        &mut self,
        model: &Model,
        matmul: &dyn Fn(&QMatrix<'_>, &QuantizedActs, &mut [f32]),
        acts: &QuantizedActs,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) -> Result<(), RuntimeError> {
        self.check()?;
        let w = &model.output;
        let n_vocab = w.n_rows;
        let n = acts.n_rows();
        let rb = w.row_bytes();
        let resident = self.plan.head_rows;
        let rows_into = |data: &[u8], row0: usize, rows: usize, out: &mut [f32], tmp: &mut Vec<f32>| {
            let m = QMatrix { ty: w.ty, n_rows: rows, n_cols: w.n_cols, data };
            if n == 1 {
                matmul(&m, acts, &mut out[row0..row0 + rows]);
            } else {
                tmp.resize(n * rows, 0.0);
                matmul(&m, acts, tmp);
                for t in 0..n {
                    out[t * n_vocab + row0..t * n_vocab + row0 + rows]
                        .copy_from_slice(&tmp[t * rows..(t + 1) * rows]);
                }
            }
        };
        if resident > 0 {
            let m = model.matrix(w);
            rows_into(&m.data[..resident * rb], 0, resident, out, tmp);
        }
        if resident == n_vocab {
            return Ok(());
        }
        let chunk_rows = (CHUNK / rb).max(1);
        let rows = (w.range.start + resident * rb) as u64..(w.range.start + n_vocab * rb) as u64;
        self.reqs.clear();
        self.reqs.extend(pieces(rows, (chunk_rows * rb) as u64, KIND_HEAD));
        if let Err(e) = self.engine.submit_batch(&self.reqs) {
            return Err(self.fail(format!("submitting head reads: {e}")));
        }
        let mut left = self.reqs.len();
        while left > 0 {
            let t0 = Instant::now();
            let c = self.recv()?;
            let waited = t0.elapsed().as_nanos() as u64;
            let (kind, _, i) = untag(c.tag);
            if kind != KIND_HEAD {
                return Err(
                    self.fail(format!("unexpected completion of kind {kind} while streaming the head"))
                );
            }
            let buf = c.result.map_err(|e| self.fail(format!("reading the output head: {e}")))?;
            if self.decoding() {
                // The main thread waited while the pool's other threads idled too.
                self.stall_ns += waited * self.n_threads;
                self.stats.head_bytes += buf.len() as u64;
            }
            let r0 = resident + i * chunk_rows;
            rows_into(&buf, r0, buf.len() / rb, out, tmp);
            left -= 1;
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Completion, RuntimeError> {
        match self.engine.completions().recv_timeout(Duration::from_secs(60)) {
            Ok(c) => Ok(c),
            Err(e) => Err(self.fail(format!("no read completed in 60 s ({e})"))),
        }
    }

    /// One decode token's FFN of packed layer `l`: the five-stage pipeline (or, without `pipeline`, its
    /// stages one after another). Returns the number of active neurons.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_ffn(
        &mut self,
        model: &Model,
        l: usize,
        spec: &SparseFfn,
        token: &TokenActs<'_>,
        mask: Option<&[bool]>,
        pool: &SpinPool,
        out: &mut [f32],
    ) -> Result<usize, RuntimeError> {
        self.check()?;
        let pl = packed(model, l);
        let nc = pl.n_clusters();
        let c = pl.cluster_neurons;
        let prefetched = self.prefetched.take() == Some(l);
        if self.sums.as_ref().is_none_or(|s| s.n_clusters() != nc || s.d_model() != pl.d_model) {
            self.sums = Some(ClusterSums::new(nc, pl.d_model));
        }
        self.bufs.resize_with(nc.max(self.bufs.len()), ClBufs::default);
        let base = pl.layer_range().start;
        let stride = pl.stride() as usize;
        let store = &self.layers[l];
        let engine = &self.engine;
        let (bundle, pipeline) = (self.opts.bundle, self.opts.pipeline);
        let len = (pl.layer_range().end - base) as usize;

        // Per cluster: its record in the staging buffer and its state (lists lent by `bufs`).
        let cls: Vec<Mutex<Cl<'_>>> = self.staging[..len]
            .chunks_mut(stride)
            .take(nc)
            .zip(self.bufs.iter_mut())
            .enumerate()
            .map(|(k, (rec, b))| {
                let lo = k * c;
                let need = mask.is_none_or(|m| m[lo..lo + pl.cluster_len(k)].contains(&true));
                Mutex::new(Cl {
                    rec,
                    b: std::mem::take(b),
                    need,
                    gate_pending: 0,
                    bundle_pending: 0,
                    full: false,
                })
            })
            .collect();
        let sums = self.sums.as_mut().expect("made above");
        sums.reset();
        let counters = Counters::default();
        let mut queue = std::mem::take(&mut self.queue);
        queue.clear();
        let sched = Mutex::new(Sched { queue, done: 0, error: None });
        let n_need = cls.iter().filter(|c| lock(c).need).count();

        let ctx = LayerRun {
            pl,
            l,
            spec,
            token,
            mask,
            store,
            engine,
            cls: &cls,
            sched: &sched,
            counters: &counters,
            bundle,
            defer: !pipeline,
            deferred: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
        };
        // GIO: gate reads of clusters not pinned (already submitted when prefetched).
        let gate_reqs = &mut self.reqs;
        gate_reqs.clear();
        for (k, cl) in cls.iter().enumerate() {
            let mut cl = lock(cl);
            if !cl.need {
                continue;
            }
            if k < store.n_gate_clusters {
                counters.gate_hits.fetch_add(1, Ordering::Relaxed);
                lock(&sched).queue.push_back(Task::Gate(k));
                continue;
            }
            counters.gate_misses.fetch_add(1, Ordering::Relaxed);
            let gb = pl.gate_block_range(k).end - pl.gate_block_range(k).start;
            if mask.is_none() {
                let req = gate_request(pl, store, l, k);
                counters.gate_bytes.fetch_add(gb, Ordering::Relaxed);
                counters.bundle_bytes.fetch_add(req.len as u64 - gb, Ordering::Relaxed);
                cl.full = store.whole;
                cl.gate_pending = 1;
                if !prefetched {
                    gate_reqs.push(req);
                }
                continue;
            }
            // With a predictor: the predicted rows only.
            let m = mask.expect("checked above");
            for i in 0..pl.cluster_len(k) {
                if m[k * c + i] {
                    let r = pl.gate_row_range(k * c + i);
                    let len = (r.end - r.start) as usize;
                    gate_reqs.push(ReadRequest { offset: r.start, len, tag: tag(KIND_GATE, l, k) });
                    counters.gate_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    cl.gate_pending += 1;
                }
            }
        }
        if !gate_reqs.is_empty() {
            engine
                .submit_batch(gate_reqs)
                .map_err(|e| RuntimeError::Offload(format!("submitting gate reads: {e}")))?;
        }
        // With prefetched gates for clusters that turned out not to be needed (never with thresholds), nothing
        // is left behind: thresholds need every cluster.
        let outstanding_gates: usize = cls.iter().map(|c| lock(c).gate_pending as usize).sum();
        ctx.in_flight.store(outstanding_gates, Ordering::Release);

        let result = if pipeline {
            let slots = sums.shared();
            pool.run(&|_, _| ctx.worker(&slots, n_need));
            lock(&sched).error.take().map_or(Ok(()), Err)
        } else {
            ctx.staged(pool, sums, outstanding_gates)
        };
        let active = counters.active.load(Ordering::Relaxed);
        // Put the per-cluster lists and the queue back for the next layer.
        drop(ctx);
        for (b, cl) in self.bufs.iter_mut().zip(cls) {
            *b = cl.into_inner().unwrap_or_else(|e| e.into_inner()).b;
        }
        self.queue = sched.into_inner().unwrap_or_else(|e| e.into_inner()).queue;
        if let Err(e) = result {
            self.broken = true;
            return Err(e);
        }
        self.sums.as_ref().expect("made above").reduce_into(out);
        let s = &mut self.stats;
        s.gate_bytes += counters.gate_bytes.load(Ordering::Relaxed);
        s.bundle_bytes += counters.bundle_bytes.load(Ordering::Relaxed);
        s.pinned_hits += counters.pinned.load(Ordering::Relaxed);
        s.lru_hits += counters.lru.load(Ordering::Relaxed);
        s.misses += counters.misses.load(Ordering::Relaxed);
        s.gate_hits += counters.gate_hits.load(Ordering::Relaxed);
        s.gate_misses += counters.gate_misses.load(Ordering::Relaxed);
        s.neurons_per_layer[l] += active as u64;
        self.stall_ns += counters.stall_ns.load(Ordering::Relaxed);
        Ok(active)
    }
}

/// The read of cluster `k`'s gate block, or of its whole record (gate rows and bundles) for a layer read whole.
fn gate_request(pl: &PackedLayer, store: &LayerStore, l: usize, k: usize) -> ReadRequest {
    let start = pl.gate_block_range(k).start;
    let end = match store.whole {
        true => pl.bundle_range(k * pl.cluster_neurons + pl.cluster_len(k) - 1).end,
        false => pl.gate_block_range(k).end,
    };
    ReadRequest { offset: start, len: (end - start) as usize, tag: tag(KIND_GATE, l, k) }
}

fn packed(model: &Model, l: usize) -> &PackedLayer {
    match &model.layers[l].ffn {
        crate::model::FfnWeights::Packed(pl) => pl,
        crate::model::FfnWeights::Dense { .. } => unreachable!("offloaded runs check the model is packed"),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Requests covering file range `r` in pieces of `piece` bytes (the last one shorter), tagged `kind` and their
/// index.
fn pieces(r: Range<u64>, piece: u64, kind: u64) -> impl Iterator<Item = ReadRequest> {
    (r.start..r.end).step_by(piece.max(1) as usize).enumerate().map(move |(i, offset)| ReadRequest {
        offset,
        len: piece.min(r.end - offset) as usize,
        tag: tag(kind, 0, i),
    })
}

/// Reads file range `r` into `out` (its length) with the engine, in chunks, waiting for all of them.
fn read_into(
    engine: &IoEngine,
    r: Range<u64>,
    out: &mut [u8],
    reqs: &mut Vec<ReadRequest>,
) -> Result<(), RuntimeError> {
    let chunk = CHUNK.min(engine.max_read().saturating_sub(8192)).max(4096) as u64;
    reqs.clear();
    reqs.extend(pieces(r.clone(), chunk, KIND_STAGE));
    engine.submit_batch(reqs).map_err(|e| RuntimeError::Offload(format!("submitting reads: {e}")))?;
    for _ in 0..reqs.len() {
        let c = engine
            .completions()
            .recv_timeout(Duration::from_secs(60))
            .map_err(|e| RuntimeError::Offload(format!("no read completed in 60 s ({e})")))?;
        if untag(c.tag).0 != KIND_STAGE {
            return Err(RuntimeError::Offload(format!("unexpected completion {:x} while staging", c.tag)));
        }
        let buf = c.result.map_err(|e| RuntimeError::Offload(format!("reading the model: {e}")))?;
        let at = (buf.offset() - r.start) as usize;
        out[at..at + buf.len()].copy_from_slice(&buf);
    }
    Ok(())
}

/// A cluster's state during one layer's decode.
struct Cl<'a> {
    /// Its record in the staging buffer: gate rows then bundles, as in the file.
    rec: &'a mut [u8],
    b: ClBufs,
    /// Whether the predictor marks any of its neurons.
    need: bool,
    gate_pending: u32,
    bundle_pending: u32,
    /// The whole record was read: every bundle is in `rec`.
    full: bool,
}

/// A cluster's gate-phase state and lists, kept by [`Offload`] between layers so that they are allocated once.
#[derive(Default)]
struct ClBufs {
    gates: ClusterGates,
    /// Positions in the cluster whose bundles were read this token (LRU inserts).
    read: Vec<u32>,
    /// Positions in the cluster served by the LRU (copied into the record).
    lru_hit: Vec<u32>,
    /// The bundle reads this cluster submits.
    reqs: Vec<ReadRequest>,
}

#[derive(Clone, Copy, Debug)]
enum Task {
    Gate(usize),
    UpDown(usize),
}

struct Sched {
    queue: VecDeque<Task>,
    done: usize,
    error: Option<RuntimeError>,
}

#[derive(Default)]
struct Counters {
    active: AtomicUsize,
    gate_bytes: AtomicU64,
    bundle_bytes: AtomicU64,
    pinned: AtomicU64,
    lru: AtomicU64,
    misses: AtomicU64,
    gate_hits: AtomicU64,
    gate_misses: AtomicU64,
    stall_ns: AtomicU64,
}

/// Everything the compute threads share while running one layer.
struct LayerRun<'a, 's> {
    pl: &'a PackedLayer,
    l: usize,
    spec: &'a SparseFfn,
    token: &'a TokenActs<'a>,
    mask: Option<&'a [bool]>,
    store: &'a LayerStore,
    engine: &'a IoEngine,
    cls: &'a [Mutex<Cl<'s>>],
    sched: &'a Mutex<Sched>,
    counters: &'a Counters,
    bundle: bool,
    /// Without the pipeline: bundle reads are collected and submitted together.
    defer: bool,
    deferred: Mutex<Vec<ReadRequest>>,
    /// Reads of this layer submitted and not yet delivered. A thread with nothing to do waits on the
    /// completion channel only while some are: otherwise the rest of the work is on other threads, and it
    /// keeps checking for it (a blocking wait would sleep past the end of the layer).
    in_flight: AtomicUsize,
}

impl LayerRun<'_, '_> {
    /// Offset of file range `r` inside cluster `k`'s record.
    fn in_rec(&self, k: usize, r: &Range<u64>) -> Range<usize> {
        let start = self.pl.record_range(k).start;
        (r.start - start) as usize..(r.end - start) as usize
    }

    /// Copies a completion into its cluster's record; returns the task it made ready, if any.
    fn deliver(&self, c: Completion) -> Result<Option<Task>, RuntimeError> {
        let (kind, layer, k) = untag(c.tag);
        if layer != self.l || !(kind == KIND_GATE || kind == KIND_BUNDLE) || k >= self.cls.len() {
            return Err(RuntimeError::Offload(format!(
                "unexpected completion (kind {kind}, layer {layer}, index {k}) in layer {}",
                self.l
            )));
        }
        let buf = c
            .result
            .map_err(|e| RuntimeError::Offload(format!("reading layer {} cluster {k}: {e}", self.l)))?;
        let at = self.in_rec(k, &(buf.offset()..buf.offset() + buf.len() as u64));
        let mut cl = lock(&self.cls[k]);
        cl.rec[at].copy_from_slice(&buf);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if kind == KIND_GATE {
            cl.gate_pending -= 1;
            Ok((cl.gate_pending == 0).then_some(Task::Gate(k)))
        } else {
            cl.bundle_pending -= 1;
            Ok((cl.bundle_pending == 0).then_some(Task::UpDown(k)))
        }
    }

    /// GC for cluster `k`: gates, then where each passing neuron's bundle comes from. Returns the up/down task
    /// when nothing has to be read.
    fn gate(&self, k: usize) -> Result<Option<Task>, RuntimeError> {
        let (pl, store) = (self.pl, self.store);
        let c = pl.cluster_neurons;
        let n = pl.cluster_len(k);
        let mut guard = lock(&self.cls[k]);
        let cl = &mut *guard;
        let m = self.mask.map(|m| &m[k * c..k * c + n]);
        let gb = c * pl.gate_row_bytes();
        let block: &[u8] = if k < store.n_gate_clusters {
            &store.gates[k * gb..k * gb + n * pl.gate_row_bytes()]
        } else {
            &cl.rec[..n * pl.gate_row_bytes()]
        };
        let b = &mut cl.b;
        sparse::cluster_gates(self.spec, self.token, block, m, &mut b.gates);
        b.read.clear();
        b.lru_hit.clear();
        b.reqs.clear();
        let (mut pinned, mut lru_hits, mut full_reads) = (0u64, 0u64, 0u64);
        for &i in b.gates.passed() {
            let pos = k * c + i as usize;
            if pos < store.n_bundles {
                pinned += 1;
                continue;
            }
            let r = pl.bundle_range(pos);
            if cl.full {
                full_reads += 1;
                continue;
            }
            if let Some(lru) = &store.lru {
                if let Some(got) = lru.get(pos as u32) {
                    let at = self.in_rec(k, &r);
                    cl.rec[at].copy_from_slice(&got);
                    b.lru_hit.push(i);
                    lru_hits += 1;
                    continue;
                }
            }
            b.read.push(i);
            let tag = tag(KIND_BUNDLE, self.l, k);
            if self.bundle {
                b.reqs.push(ReadRequest { offset: r.start, len: (r.end - r.start) as usize, tag });
            } else {
                let mid = r.start + pl.up_row_bytes() as u64;
                b.reqs.push(ReadRequest { offset: r.start, len: pl.up_row_bytes(), tag });
                b.reqs.push(ReadRequest { offset: mid, len: pl.down_col_bytes(), tag });
            }
        }
        let ctr = self.counters;
        ctr.pinned.fetch_add(pinned, Ordering::Relaxed);
        ctr.lru.fetch_add(lru_hits, Ordering::Relaxed);
        ctr.misses.fetch_add(b.read.len() as u64 + full_reads, Ordering::Relaxed);
        ctr.bundle_bytes.fetch_add(b.reqs.iter().map(|r| r.len as u64).sum(), Ordering::Relaxed);
        if b.reqs.is_empty() {
            return Ok(Some(Task::UpDown(k)));
        }
        cl.bundle_pending = b.reqs.len() as u32;
        // Counted before submitting so that no completion finds the count at zero; this cluster's completions
        // wait for its lock, held until the requests are out.
        self.in_flight.fetch_add(b.reqs.len(), Ordering::AcqRel);
        if self.defer {
            lock(&self.deferred).extend_from_slice(&b.reqs);
        } else {
            self.engine
                .submit_batch(&b.reqs)
                .map_err(|e| RuntimeError::Offload(format!("submitting bundle reads: {e}")))?;
        }
        Ok(None)
    }

    /// UDC for cluster `k` into its slot, then the LRU takes the bundles that were read.
    fn up_down(&self, k: usize, slot: &mut [f32]) {
        let (pl, store, spec) = (self.pl, self.store, self.spec);
        let c = pl.cluster_neurons;
        let (ub, bb) = (pl.up_row_bytes(), pl.bundle_bytes());
        let mut guard = lock(&self.cls[k]);
        let cl = &mut *guard;
        let rec_start = pl.record_range(k).start;
        let rec: &[u8] = cl.rec;
        let b = &mut cl.b;
        let bundle = |i: u32| {
            let pos = k * c + i as usize;
            let bytes = if pos < store.n_bundles {
                &store.bundles[pos * bb..(pos + 1) * bb]
            } else {
                let r = pl.bundle_range(pos);
                &rec[(r.start - rec_start) as usize..(r.end - rec_start) as usize]
            };
            UpDown { up: &bytes[..ub], down: &bytes[ub..] }
        };
        let active = sparse::cluster_up_down_by(spec, self.token, &mut b.gates, &bundle, slot);
        self.counters.active.fetch_add(active, Ordering::Relaxed);
        if let Some(lru) = &store.lru {
            for &i in &b.read {
                let pos = k * c + i as usize;
                let r = pl.bundle_range(pos);
                lru.insert(pos as u32, &rec[(r.start - rec_start) as usize..(r.end - rec_start) as usize]);
            }
        }
    }

    fn finish(&self) {
        lock(self.sched).done += 1;
    }

    fn run(&self, task: Task, slots: &sparse::SharedSlots<'_>) -> Result<(), RuntimeError> {
        let mut next = Some(task);
        while let Some(t) = next.take() {
            match t {
                Task::Gate(k) => next = self.gate(k)?,
                Task::UpDown(k) => {
                    self.up_down(k, slots.claim(k));
                    self.finish();
                }
            }
        }
        Ok(())
    }

    /// A compute thread of the pipeline: takes ready clusters, drains completions, waits only when idle.
    fn worker(&self, slots: &sparse::SharedSlots<'_>, n_need: usize) {
        let fail = |e: RuntimeError| {
            let mut s = lock(self.sched);
            s.error.get_or_insert(e);
        };
        let mut idle = 0u32;
        loop {
            // Completions first: they start more reads sooner.
            while let Ok(c) = self.engine.completions().try_recv() {
                match self.deliver(c) {
                    Ok(Some(t)) => lock(self.sched).queue.push_back(t),
                    Ok(None) => {}
                    Err(e) => return fail(e),
                }
            }
            let task = {
                let mut s = lock(self.sched);
                if s.error.is_some() || s.done == n_need {
                    return;
                }
                s.queue.pop_front()
            };
            if let Some(t) = task {
                if let Err(e) = self.run(t, slots) {
                    return fail(e);
                }
                continue;
            }
            if self.in_flight.load(Ordering::Acquire) == 0 {
                // No read to wait for: other threads hold the last clusters (or are about to submit reads).
                idle = idle.saturating_add(1);
                if idle < SPINS_BEFORE_YIELD {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            idle = 0;
            let t0 = Instant::now();
            let got = self.engine.completions().recv_timeout(Duration::from_micros(100));
            self.counters.stall_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match got {
                Ok(c) => match self.deliver(c) {
                    Ok(Some(t)) => {
                        if let Err(e) = self.run(t, slots) {
                            return fail(e);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return fail(e),
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return fail(RuntimeError::Offload("the I/O engine stopped".into()));
                }
            }
        }
    }

    /// Waits for `n` completions on this thread (everything else idle: all of it is stall).
    fn wait_for(&self, n: usize, stall_threads: u64) -> Result<(), RuntimeError> {
        for _ in 0..n {
            let t0 = Instant::now();
            let c = self
                .engine
                .completions()
                .recv_timeout(Duration::from_secs(60))
                .map_err(|e| RuntimeError::Offload(format!("no read completed in 60 s ({e})")))?;
            self.counters
                .stall_ns
                .fetch_add(t0.elapsed().as_nanos() as u64 * stall_threads, Ordering::Relaxed);
            self.deliver(c)?;
        }
        Ok(())
    }

    /// Without the pipeline: read the gates, compute them, read the bundles, compute them.
    fn staged(
        &self,
        pool: &SpinPool,
        sums: &mut ClusterSums,
        outstanding_gates: usize,
    ) -> Result<(), RuntimeError> {
        let threads = pool.n_threads() as u64;
        self.wait_for(outstanding_gates, threads)?;
        let needed: Vec<usize> = (0..self.cls.len()).filter(|&k| lock(&self.cls[k]).need).collect();
        let next = AtomicUsize::new(0);
        let err = Mutex::new(None);
        pool.run(&|_, _| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = needed.get(i) else { break };
                if let Err(e) = self.gate(k) {
                    lock(&err).get_or_insert(e);
                }
            }
        });
        if let Some(e) = lock(&err).take() {
            return Err(e);
        }
        let reqs = std::mem::take(&mut *lock(&self.deferred));
        if !reqs.is_empty() {
            self.engine
                .submit_batch(&reqs)
                .map_err(|e| RuntimeError::Offload(format!("submitting bundle reads: {e}")))?;
        }
        self.wait_for(reqs.len(), threads)?;
        let slots = sums.shared();
        let next = AtomicUsize::new(0);
        pool.run(&|_, _| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = needed.get(i) else { break };
                self.up_down(k, slots.claim(k));
            }
        });
        Ok(())
    }
}
