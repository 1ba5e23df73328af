//! Read statistics: counters, in-flight depth and a log2 latency histogram, all lock-free.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Number of log2 latency buckets. Bucket `i` counts latencies in `[2^i, 2^(i+1))` nanoseconds (bucket 0 also
/// holds zero).
pub const N_LATENCY_BUCKETS: usize = 40;

/// A log2 histogram of latencies in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Counts per bucket; see [`N_LATENCY_BUCKETS`].
    pub buckets: [u64; N_LATENCY_BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: [0; N_LATENCY_BUCKETS] }
    }
}

pub(crate) fn bucket_of(ns: u64) -> usize {
    let b = 63 - (ns | 1).leading_zeros() as usize;
    b.min(N_LATENCY_BUCKETS - 1)
}

impl LatencyHistogram {
    /// Total number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.buckets[bucket_of(d.as_nanos().min(u64::MAX as u128) as u64)] += 1;
    }

    /// The `q` quantile (0..=1) as the upper bound of its bucket, so it overestimates by at most 2x; zero when
    /// empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(1u64 << (i + 1));
            }
        }
        Duration::from_nanos(1u64 << N_LATENCY_BUCKETS)
    }

    /// Median latency (bucket upper bound).
    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    /// 90th percentile latency (bucket upper bound).
    pub fn p90(&self) -> Duration {
        self.quantile(0.90)
    }

    /// 99th percentile latency (bucket upper bound).
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }
}

/// A copy of an engine's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Read requests accepted (as submitted by the caller).
    pub requests: u64,
    /// Reads issued to the OS after coalescing (one per coalesced group, not counting retries).
    pub reads: u64,
    /// Bytes the caller asked for.
    pub bytes_requested: u64,
    /// Bytes transferred by the OS (aligned, so at least `bytes_requested` minus overlaps).
    pub bytes_read: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// System calls repeated after EINTR, EAGAIN or a short read.
    pub retries: u64,
    /// Reads currently issued to the OS and not yet completed.
    pub in_flight: u64,
    /// The largest `in_flight` seen.
    pub peak_in_flight: u64,
    /// Latency from submission to completion of each request.
    pub latency: LatencyHistogram,
}

pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) bytes_requested: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) retries: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    latency: [AtomicU64; N_LATENCY_BUCKETS],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            bytes_requested: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
    pub(crate) fn issue(&self) {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Relaxed);
        self.reads.fetch_add(1, Relaxed);
    }

    pub(crate) fn retire(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub(crate) fn record_latency(&self, d: Duration, n: u64) {
        let b = bucket_of(d.as_nanos().min(u64::MAX as u128) as u64);
        self.latency[b].fetch_add(n, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> IoStats {
        let mut latency = LatencyHistogram::default();
        for (dst, src) in latency.buckets.iter_mut().zip(&self.latency) {
            *dst = src.load(Relaxed);
        }
        IoStats {
            requests: self.requests.load(Relaxed),
            reads: self.reads.load(Relaxed),
            bytes_requested: self.bytes_requested.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            peak_in_flight: self.peak_in_flight.load(Relaxed),
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.p50(), Duration::ZERO);
        for _ in 0..90 {
            h.record(Duration::from_nanos(1000)); // bucket 9: [512, 1024)
        }
        for _ in 0..9 {
            h.record(Duration::from_micros(100)); // bucket 16: [65536, 131072)
        }
        h.record(Duration::from_millis(10)); // bucket 23
        assert_eq!(h.count(), 100);
        assert_eq!(h.p50(), Duration::from_nanos(1024));
        assert_eq!(h.p90(), Duration::from_nanos(1024));
        assert_eq!(h.quantile(0.95), Duration::from_nanos(131072));
        assert_eq!(h.p99(), Duration::from_nanos(131072));
        assert_eq!(h.quantile(1.0), Duration::from_nanos(1 << 24));
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), N_LATENCY_BUCKETS - 1);
    }
}
