//! A read-throughput benchmark over one file, for `xtask io-bench`, the CLI and criterion to drive.
//!
//! [`run`] keeps `queue_depth` reads of `read_size` bytes in flight (random aligned offsets, or sequential) until
//! a byte count or a duration is reached, and reports IOPS, throughput and latency percentiles. It only reads.
//! Twice `queue_depth` requests are kept queued in the engine, so that the engine (not this loop's wake-ups)
//! decides the depth the device sees, as fio's `iodepth` does; latency percentiles therefore include the time a
//! request waits in the engine's queue.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::engine::{Backend, BackendChoice, IoEngineBuilder, ReadRequest};
use crate::error::{BenchError, FallbackReason};
use crate::stats::IoStats;

/// Where reads go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random offsets, aligned to the read size (like fio's `randread`).
    Random,
    /// Consecutive offsets from the start, wrapping at the end of the file (like fio's `read`).
    Sequential,
}

/// When to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// After this many bytes have been read.
    Bytes(u64),
    /// After this much time (reads already in flight are still completed).
    Time(Duration),
}

/// What to measure. There is deliberately no `Default`: every field is a choice.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The file to read (it should be larger than RAM's page cache share, or read with `direct`).
    pub path: PathBuf,
    /// Bytes per read.
    pub read_size: usize,
    /// Reads kept in flight.
    pub queue_depth: usize,
    /// Backend to use.
    pub backend: BackendChoice,
    /// Access pattern.
    pub pattern: Pattern,
    /// When to stop.
    pub limit: Limit,
    /// Byte budget of the engine's buffer pool; must hold `queue_depth` reads to reach full depth.
    pub pool_bytes: usize,
    /// Bypass the page cache.
    pub direct: bool,
    /// Seed of the random offsets.
    pub seed: u64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Backend that ran.
    pub backend: Backend,
    /// Why it is not io_uring with O_DIRECT, if it is not.
    pub fallback_reason: Option<FallbackReason>,
    /// Whether O_DIRECT was on.
    pub direct: bool,
    /// Bytes per read.
    pub read_size: usize,
    /// Reads kept in flight.
    pub queue_depth: usize,
    /// Access pattern.
    pub pattern: Pattern,
    /// Reads completed.
    pub reads: u64,
    /// Bytes delivered.
    pub bytes: u64,
    /// Wall time from first submission to last completion.
    pub elapsed: Duration,
    /// Highest number of bytes the buffer pool held.
    pub pool_peak_bytes: usize,
    /// The engine's counters at the end.
    pub stats: IoStats,
}

impl BenchReport {
    /// Reads per second.
    pub fn iops(&self) -> f64 {
        self.reads as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pat = match self.pattern {
            Pattern::Random => "rand",
            Pattern::Sequential => "seq",
        };
        write!(
            f,
            "{} {} bs={} qd={} direct={}: {:.0} IOPS, {:.1} MB/s, {} reads in {:.2} s, lat p50/p90/p99 \
             {:?}/{:?}/{:?}, peak in flight {}, pool peak {} MiB",
            self.backend,
            pat,
            self.read_size,
            self.queue_depth,
            self.direct,
            self.iops(),
            self.mb_per_s(),
            self.reads,
            self.elapsed.as_secs_f64(),
            self.stats.latency.p50(),
            self.stats.latency.p90(),
            self.stats.latency.p99(),
            self.stats.peak_in_flight,
            self.pool_peak_bytes >> 20,
        )?;
        if let Some(r) = &self.fallback_reason {
            write!(f, " (fallback: {r})")?;
        }
        Ok(())
    }
}

/// A small deterministic generator (xorshift64*) for offsets; not for anything that needs real randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Parses a byte count with an optional binary suffix (`4096`, `4K`, `64k`, `1M`, `4G`), as the benchmark
/// drivers take them; `None` for anything else or on overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Runs the benchmark described by `cfg`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    if cfg.read_size == 0 || cfg.queue_depth == 0 {
        return Err(BenchError::Config { what: "read size and queue depth must be positive".into() });
    }
    let engine = IoEngineBuilder::new(&cfg.path)
        .backend(cfg.backend)
        .queue_depth(cfg.queue_depth)
        .pool_bytes(cfg.pool_bytes)
        .coalesce_limit(0)
        .direct(cfg.direct)
        .build()?;
    let n_slots = engine.file_len() / cfg.read_size as u64;
    if n_slots == 0 {
        return Err(BenchError::Config {
            what: format!(
                "file of {} bytes is smaller than one read of {}",
                engine.file_len(),
                cfg.read_size
            ),
        });
    }
    let mut rng = Rng(cfg.seed | 1);
    let mut next_seq = 0u64;
    let mut next_offset = move || match cfg.pattern {
        Pattern::Random => (rng.next() % n_slots) * cfg.read_size as u64,
        Pattern::Sequential => {
            let off = (next_seq % n_slots) * cfg.read_size as u64;
            next_seq += 1;
            off
        }
    };
    let start = Instant::now();
    let done = |bytes: u64| match cfg.limit {
        Limit::Bytes(b) => bytes >= b,
        Limit::Time(t) => start.elapsed() >= t,
    };
    let (mut submitted_bytes, mut bytes, mut reads, mut in_flight) = (0u64, 0u64, 0u64, 0usize);
    let mut tag = 0u64;
    // Twice the queue depth is kept queued, so that the engine has the next read ready the moment a slot
    // frees, whatever this thread's wake-up latency; the engine still keeps at most `queue_depth` in flight.
    let outstanding = cfg.queue_depth * 2;
    let mut batch: Vec<ReadRequest> = Vec::with_capacity(outstanding);
    let mut stopped = false;
    loop {
        // Top the queue up to its depth in one batch (one wake-up of the submission thread).
        batch.clear();
        while !stopped && in_flight + batch.len() < outstanding {
            let stop = match cfg.limit {
                Limit::Bytes(_) => done(submitted_bytes),
                Limit::Time(_) => done(0),
            };
            if stop {
                stopped = true;
                break;
            }
            batch.push(ReadRequest { offset: next_offset(), len: cfg.read_size, tag });
            tag += 1;
            submitted_bytes += cfg.read_size as u64;
        }
        engine.submit_batch(&batch)?;
        in_flight += batch.len();
        if in_flight == 0 {
            break;
        }
        // Wait for one completion, then take whatever else has completed.
        let first = engine.completions().recv().map_err(|_| crate::error::SubmitError::Closed)?;
        for c in std::iter::once(first).chain(engine.completions().try_iter()) {
            in_flight -= 1;
            let buf = c.result?;
            bytes += buf.len() as u64;
            reads += 1;
        }
    }
    let elapsed = start.elapsed();
    Ok(BenchReport {
        backend: engine.backend(),
        fallback_reason: engine.fallback_reason().cloned(),
        direct: engine.direct_io(),
        read_size: cfg.read_size,
        queue_depth: cfg.queue_depth,
        pattern: cfg.pattern,
        reads,
        bytes,
        elapsed,
        pool_peak_bytes: engine.pool().stats().peak_allocated,
        stats: engine.stats(),
    })
}

#[cfg(test)]
mod parse_tests {
    use super::parse_size;

    #[test]
    fn sizes_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("18446744073709551615K"), None, "overflow is refused, not wrapped");
    }
}
