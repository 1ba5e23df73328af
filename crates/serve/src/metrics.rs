//! The server's counters, shared between the engine (which moves them) and `/metrics` (which renders them in
//! Prometheus' text format).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges of a running server.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Requests accepted into the queue.
    pub(crate) requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub(crate) rejected: AtomicU64,
    /// Requests waiting for a sequence slot.
    pub(crate) queued: AtomicU64,
    /// Sequences being prefilled or decoded.
    pub(crate) active: AtomicU64,
    /// Prompt tokens evaluated.
    pub(crate) prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub(crate) generated_tokens: AtomicU64,
    /// Decode steps (one forward pass over the decoding sequences) and their summed time.
    pub(crate) decode_steps: AtomicU64,
    pub(crate) decode_ns: AtomicU64,
    /// Prefill time.
    pub(crate) prefill_ns: AtomicU64,
    /// What only the engine writes, read whole.
    pub(crate) engine: Mutex<EngineFigures>,
}

/// Figures the engine updates as a whole.
#[derive(Clone, Debug, Default)]
pub(crate) struct EngineFigures {
    /// Bytes read from storage by an offloaded run.
    pub(crate) bytes_read: u64,
    /// Neuron uses served from memory and read from storage (offloaded runs).
    pub(crate) neuron_hits: u64,
    pub(crate) neuron_misses: u64,
    /// The memory budget in bytes (`None`: the model runs from memory).
    pub(crate) budget: Option<u64>,
    pub(crate) peak_rss: Option<u64>,
    /// Sequence slots (`--parallel`).
    pub(crate) slots: usize,
}

impl Metrics {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every figure.
    pub(crate) fn render(&self) -> String {
        let e = self.engine.lock().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone());
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP pinion_{name} {help}\n# TYPE pinion_{name} {kind}\npinion_{name} {value}"
            );
        };
        let g = Metrics::get;
        let decode_s = g(&self.decode_ns) as f64 / 1e9;
        put("requests_total", "counter", "Requests accepted.", g(&self.requests) as f64);
        put(
            "requests_rejected_total",
            "counter",
            "Requests refused with 503 (queue full).",
            g(&self.rejected) as f64,
        );
        put("queue_depth", "gauge", "Requests waiting for a sequence slot.", g(&self.queued) as f64);
        put("active_sequences", "gauge", "Sequences being prefilled or decoded.", g(&self.active) as f64);
        put("sequence_slots", "gauge", "Sequences decoded together at most (--parallel).", e.slots as f64);
        put("prompt_tokens_total", "counter", "Prompt tokens evaluated.", g(&self.prompt_tokens) as f64);
        put("generated_tokens_total", "counter", "Tokens generated.", g(&self.generated_tokens) as f64);
        put(
            "decode_steps_total",
            "counter",
            "Decode steps (one pass over all decoding sequences).",
            g(&self.decode_steps) as f64,
        );
        put("decode_seconds_total", "counter", "Time in decode steps.", decode_s);
        put(
            "prefill_seconds_total",
            "counter",
            "Time in prompt evaluation.",
            g(&self.prefill_ns) as f64 / 1e9,
        );
        let tps = if decode_s > 0.0 { g(&self.generated_tokens) as f64 / decode_s } else { 0.0 };
        put("tokens_per_second", "gauge", "Tokens generated per second of decode time.", tps);
        put(
            "bytes_read_total",
            "counter",
            "Bytes read from storage by the offloaded FFN and head.",
            e.bytes_read as f64,
        );
        let uses = e.neuron_hits + e.neuron_misses;
        let rate = if uses > 0 { e.neuron_hits as f64 / uses as f64 } else { 0.0 };
        put("neuron_hit_rate", "gauge", "Share of neuron uses served from memory (offloaded runs).", rate);
        if let Some(b) = e.budget {
            put("memory_budget_bytes", "gauge", "The memory budget the run is planned for.", b as f64);
        }
        if let Some(p) = e.peak_rss {
            put("peak_rss_bytes", "gauge", "Peak resident set of the process.", p as f64);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_figure_in_prometheus_text() {
        let m = Metrics::default();
        Metrics::add(&m.generated_tokens, 30);
        Metrics::add(&m.decode_ns, 2_000_000_000);
        m.engine.lock().unwrap().budget = Some(1 << 20);
        let text = m.render();
        assert!(text.contains("pinion_generated_tokens_total 30\n"), "{text}");
        assert!(text.contains("pinion_tokens_per_second 15\n"), "{text}");
        assert!(text.contains("# TYPE pinion_queue_depth gauge\npinion_queue_depth 0\n"), "{text}");
        assert!(text.contains("pinion_memory_budget_bytes 1048576\n"), "{text}");
        assert!(!text.contains("peak_rss"), "no figure where none is known");
    }
}
