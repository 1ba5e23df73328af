//! The counters of an offloaded run, and the shares and rates reports are made of.

/// Counters of an offloaded run's decode tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OffloadStats {
    /// Decode tokens counted.
    pub tokens: u64,
    /// Decode time of those tokens, in seconds.
    pub token_seconds: f64,
    /// Per-token decode latencies in seconds.
    pub latencies: Vec<f64>,
    /// Gate bytes read (gate blocks, or predicted gate rows).
    pub gate_bytes: u64,
    /// Bundle bytes read.
    pub bundle_bytes: u64,
    /// Output head bytes read.
    pub head_bytes: u64,
    /// Embedding bytes read.
    pub embd_bytes: u64,
    /// Seconds the compute threads waited on reads with nothing else to do (mean over threads).
    pub stall_seconds: f64,
    /// Seconds spent checking read bytes against their checksums (summed over threads, divided by them).
    pub verify_seconds: f64,
    /// Neuron uses served by the fixed region (pinned).
    pub pinned_hits: u64,
    /// Neuron uses served by the neuron-level LRU region (cold).
    pub lru_hits: u64,
    /// Neuron uses read from storage.
    pub misses: u64,
    /// Gate blocks (or predicted rows' clusters) served from memory.
    pub gate_hits: u64,
    /// Gate blocks read.
    pub gate_misses: u64,
    /// Neurons computed (passed the gate phase) per FFN unit (a layer, or one expert of a mixture of experts),
    /// summed over tokens.
    pub neurons_per_layer: Vec<u64>,
    /// FFN units run by decode tokens (layers, or the routed experts of a mixture of experts).
    pub unit_uses: u64,
    /// Of those, the ones that read nothing from storage (every gate block and neuron they needed in memory).
    pub unit_hits: u64,
    /// Reads issued to the OS during decode (requests after the I/O engine merged neighbours).
    pub disk_reads: u64,
    /// Bytes the OS transferred for them (whole aligned pages, so at least the bytes asked for).
    pub disk_bytes: u64,
    /// Bytes read ahead of the compute that needs them (token-independent reads).
    pub ahead_bytes: u64,
    /// FFN bytes read for batched passes (prefill, and decode steps of several sequences), which read each
    /// layer's records once for all their tokens; not part of [`OffloadStats::bytes_read`].
    pub staged_bytes: u64,
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

    fn uses(&self) -> f64 {
        (self.pinned_hits + self.lru_hits + self.misses).max(1) as f64
    }

    /// Share of neuron uses served from memory (any region).
    pub fn hit_rate(&self) -> f64 {
        self.pinned_hit_rate() + self.lru_hit_rate()
    }

    /// Share of neuron uses served by the fixed region (pinned neurons).
    pub fn pinned_hit_rate(&self) -> f64 {
        self.pinned_hits as f64 / self.uses()
    }

    /// Share of neuron uses served by the neuron-level LRU region.
    pub fn lru_hit_rate(&self) -> f64 {
        self.lru_hits as f64 / self.uses()
    }

    /// Share of needed gate blocks that were in memory.
    pub fn gate_hit_rate(&self) -> f64 {
        self.gate_hits as f64 / (self.gate_hits + self.gate_misses).max(1) as f64
    }

    /// Share of FFN unit uses (for a mixture of experts: routed experts) that read nothing from storage.
    pub fn unit_hit_rate(&self) -> f64 {
        self.unit_hits as f64 / self.unit_uses.max(1) as f64
    }

    /// FFN units run per decode token (for a mixture of experts: experts routed to, over all layers).
    pub fn units_per_token(&self) -> f64 {
        self.unit_uses as f64 / self.tokens.max(1) as f64
    }

    /// `bytes` in MB (10^6) per decode token.
    pub fn mb_per_token(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e6 / self.tokens.max(1) as f64
    }

    /// Neurons computed per token in each layer, the units of a layer (its experts: `units_per_layer` of them)
    /// added up.
    pub fn neurons_per_layer_per_token(&self, units_per_layer: usize) -> Vec<f64> {
        let t = self.tokens.max(1) as f64;
        self.neurons_per_layer
            .chunks(units_per_layer.max(1))
            .map(|c| c.iter().sum::<u64>() as f64 / t)
            .collect()
    }

    /// Share of decode time the compute threads stalled on I/O.
    pub fn io_stall_share(&self) -> f64 {
        if self.token_seconds > 0.0 { (self.stall_seconds / self.token_seconds).min(1.0) } else { 0.0 }
    }

    /// Share of decode time spent checking checksums (per thread).
    pub fn verify_share(&self) -> f64 {
        if self.token_seconds > 0.0 { (self.verify_seconds / self.token_seconds).min(1.0) } else { 0.0 }
    }

    /// Decode tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        if self.token_seconds > 0.0 { self.tokens as f64 / self.token_seconds } else { 0.0 }
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
