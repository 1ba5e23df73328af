//! The device profile: what a machine's flash, memory and CPU kernels can do, as the planner needs it.
//!
//! `pinion-prepare` measures it (`cargo xtask profile-device`, or the `profile-device` step of `prepare`) and
//! keeps it as versioned JSON (`device.json`, format `pinion-device`); this module holds the data, the
//! questions the planner asks of it ([`DeviceProfile::read_throughput`], [`DeviceProfile::queue_depths`],
//! [`DeviceProfile::kernel_gb_per_s`]) and its (de)serialization. Where no measurement exists,
//! [`DeviceProfile::reference`] is a documented stand-in, and plans made with it say so.

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// The `format` field of a device profile file.
pub const DEVICE_FORMAT: &str = "pinion-device";
/// The version of the device profile this code writes and reads.
pub const DEVICE_VERSION: u64 = 2;

/// One measured cell of the read grid: O_DIRECT random reads of `block_bytes` with `queue_depth` in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadPoint {
    /// Bytes per read.
    pub block_bytes: u64,
    /// Reads kept in flight.
    pub queue_depth: usize,
    /// Throughput, MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// Reads per second.
    pub iops: f64,
    /// Median latency, µs (histogram bucket bound).
    pub p50_us: f64,
    /// 99th percentile latency, µs (histogram bucket bound).
    pub p99_us: f64,
}

/// Quantized matrix-vector speed at one thread count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelPoint {
    /// Compute threads.
    pub threads: usize,
    /// GB (10^9 bytes) of Q4_0 weights processed per second, one activation row (decode).
    pub weight_gb_per_s: f64,
}

/// What a machine can do (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs available to the process that measured.
    pub n_cpus: usize,
    /// Total memory, bytes.
    pub mem_bytes: u64,
    /// Whether the reads bypassed the page cache (O_DIRECT).
    pub direct_io: bool,
    /// The I/O backend that ran (`io_uring` or `pread`).
    pub backend: String,
    /// The read grid.
    pub reads: Vec<ReadPoint>,
    /// Streaming memory read bandwidth, GB/s.
    pub mem_bw_gb_per_s: f64,
    /// Kernel speed by thread count, weights streamed from memory (a working set larger than the last-level
    /// cache).
    pub kernels: Vec<KernelPoint>,
    /// Size of the largest CPU cache, bytes (0 if unknown).
    pub llc_bytes: u64,
    /// Kernel speed by thread count with the weights in the last-level cache (a few MiB of them).
    pub kernels_in_cache: Vec<KernelPoint>,
    /// Seconds one parallel step of a decode costs beyond its arithmetic (waking the compute threads and
    /// waiting for the last), by thread count.
    #[serde(default)]
    pub sync_us: Vec<(usize, f64)>,
    /// Where the figures come from: `measured` or `reference` (the stand-in of [`DeviceProfile::reference`]).
    pub source: String,
}

/// The file envelope: format and version around the profile.
#[derive(Serialize, Deserialize)]
struct DeviceFile {
    format: String,
    version: u64,
    #[serde(flatten)]
    profile: DeviceProfile,
}

impl DeviceProfile {
    /// The profile as versioned JSON (format [`DEVICE_FORMAT`], version [`DEVICE_VERSION`]).
    pub fn to_json(&self) -> String {
        let file =
            DeviceFile { format: DEVICE_FORMAT.into(), version: DEVICE_VERSION, profile: self.clone() };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    /// Reads [`DeviceProfile::to_json`]'s output, checking format and version; `what` names the source in errors.
    pub fn from_json(text: &str, what: &str) -> Result<DeviceProfile, PlanError> {
        let bad = |why: String| PlanError::BadFile { what: what.to_string(), why };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if v["format"] != DEVICE_FORMAT {
            return Err(bad(format!("format is {}, not \"{DEVICE_FORMAT}\"", v["format"])));
        }
        let found = v["version"].as_u64().ok_or_else(|| bad("no version".into()))?;
        if found != DEVICE_VERSION {
            return Err(PlanError::Version { what: what.to_string(), found, expected: DEVICE_VERSION });
        }
        let file: DeviceFile = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let p = file.profile;
        let finite = p.reads.iter().all(|r| r.mb_per_s.is_finite() && r.mb_per_s >= 0.0)
            && p.kernels.iter().chain(&p.kernels_in_cache).all(|k| k.weight_gb_per_s.is_finite())
            && p.sync_us.iter().all(|s| s.1.is_finite() && s.1 >= 0.0);
        if !finite {
            return Err(bad("a measurement is negative or not finite".into()));
        }
        Ok(p)
    }

    /// A stand-in for a machine that was not measured: the figures of the 2-core AMD EPYC (Zen 4) development
    /// machine of docs/perf.md (O_DIRECT over io_uring on a virtio disk: about 1.1 GB/s for large reads, 72K
    /// IOPS at 4 KiB and depth 64; Q4 matrix-vector 9 GB/s per thread from memory, 16 GB/s in cache). A plan
    /// made with it says so; measure the device (`cargo xtask profile-device`) for real figures.
    pub fn reference() -> DeviceProfile {
        let grid: [(u64, [f64; 5]); 7] = [
            (4 << 10, [62.0, 122.0, 226.0, 242.0, 294.0]),
            (8 << 10, [101.0, 228.0, 378.0, 386.0, 506.0]),
            (16 << 10, [202.0, 419.0, 579.0, 615.0, 650.0]),
            (32 << 10, [326.0, 588.0, 717.0, 856.0, 816.0]),
            (64 << 10, [490.0, 750.0, 880.0, 933.0, 943.0]),
            (128 << 10, [788.0, 1132.0, 1208.0, 1126.0, 1021.0]),
            (512 << 10, [1081.0, 1145.0, 952.0, 934.0, 945.0]),
        ];
        let depths = [1usize, 4, 16, 32, 64];
        let reads = grid
            .iter()
            .flat_map(|&(b, t)| {
                depths.iter().zip(t).map(move |(&qd, mb)| ReadPoint {
                    block_bytes: b,
                    queue_depth: qd,
                    mb_per_s: mb,
                    iops: mb * 1e6 / b as f64,
                    p50_us: 0.0,
                    p99_us: 0.0,
                })
            })
            .collect();
        DeviceProfile {
            cpu: "reference (AMD EPYC Zen 4, 2 cores)".into(),
            n_cpus: 2,
            mem_bytes: 24 << 30,
            direct_io: true,
            backend: "io_uring".into(),
            reads,
            mem_bw_gb_per_s: 32.7,
            kernels: vec![
                KernelPoint { threads: 1, weight_gb_per_s: 9.0 },
                KernelPoint { threads: 2, weight_gb_per_s: 18.8 },
            ],
            llc_bytes: 32 << 20,
            kernels_in_cache: vec![
                KernelPoint { threads: 1, weight_gb_per_s: 15.9 },
                KernelPoint { threads: 2, weight_gb_per_s: 31.7 },
            ],
            sync_us: vec![(1, 0.3), (2, 2.0)],
            source: "reference".into(),
        }
    }

    /// Whether the figures were measured on this kind of machine (not the [`DeviceProfile::reference`] stand-in).
    pub fn is_measured(&self) -> bool {
        self.source == "measured"
    }

    /// Random-read throughput in MB/s at `block_bytes` and `queue_depth`, interpolated on the measured grid
    /// (linearly in the logarithms of read size and depth). Outside the grid: the nearest depth; above the
    /// largest size, that size's throughput; below the smallest size, that size's IOPS (throughput scales down
    /// with the read size). 0 when nothing was measured.
    pub fn read_throughput(&self, block_bytes: u64, queue_depth: usize) -> f64 {
        let sizes = self.block_sizes();
        let (Some(&lo), Some(&hi)) = (sizes.first(), sizes.last()) else { return 0.0 };
        let qd = queue_depth.max(1) as f64;
        let b = block_bytes.max(1);
        if b <= lo {
            return self.throughput_at_size(lo, qd) * b as f64 / lo as f64;
        }
        if b >= hi {
            return self.throughput_at_size(hi, qd);
        }
        let i = sizes.partition_point(|&s| s <= b);
        let (s0, s1) = (sizes[i - 1], sizes[i]);
        let (t0, t1) = (self.throughput_at_size(s0, qd), self.throughput_at_size(s1, qd));
        lerp_log(s0 as f64, t0, s1 as f64, t1, b as f64)
    }

    /// The best throughput any measured read size and depth reached, MB/s: the device's bandwidth ceiling.
    pub fn peak_read_mb_per_s(&self) -> f64 {
        self.reads.iter().map(|r| r.mb_per_s).fold(0.0, f64::max)
    }

    /// The measured queue depths, ascending (empty when no read was measured).
    pub fn queue_depths(&self) -> Vec<usize> {
        let mut depths: Vec<usize> = self.reads.iter().map(|r| r.queue_depth.max(1)).collect();
        depths.sort_unstable();
        depths.dedup();
        depths
    }

    /// Kernel throughput (GB of weights per second) with `threads` threads: the measured point, or the nearest
    /// fewer threads' (extra threads beyond the measured ones are assumed to add nothing), or below the
    /// smallest measured count, that count's speed scaled by the thread ratio. 0 when nothing was measured.
    pub fn kernel_gb_per_s(&self, threads: usize) -> f64 {
        kernel_lookup(&self.kernels, threads)
    }

    /// Kernel throughput for weights of `working_set_bytes` touched each token: the in-cache speed if they fit
    /// in the last-level cache (and it was measured), else [`DeviceProfile::kernel_gb_per_s`].
    pub fn kernel_gb_per_s_for(&self, threads: usize, working_set_bytes: u64) -> f64 {
        if working_set_bytes <= self.llc_bytes && !self.kernels_in_cache.is_empty() {
            kernel_lookup(&self.kernels_in_cache, threads)
        } else {
            self.kernel_gb_per_s(threads)
        }
    }

    /// Seconds of synchronisation per parallel step with `threads` threads (nearest measured count at or below;
    /// 0 when unmeasured).
    pub fn sync_seconds(&self, threads: usize) -> f64 {
        let below = self.sync_us.iter().filter(|s| s.0 <= threads.max(1)).max_by_key(|s| s.0);
        below.or_else(|| self.sync_us.iter().min_by_key(|s| s.0)).map_or(0.0, |s| s.1 * 1e-6)
    }

    /// The measured read sizes, ascending.
    fn block_sizes(&self) -> Vec<u64> {
        let mut sizes: Vec<u64> = self.reads.iter().map(|r| r.block_bytes).filter(|&b| b > 0).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// Throughput at one measured read size, interpolated over the depths measured for it.
    fn throughput_at_size(&self, block_bytes: u64, qd: f64) -> f64 {
        let mut pts: Vec<(f64, f64)> = self
            .reads
            .iter()
            .filter(|r| r.block_bytes == block_bytes)
            .map(|r| (r.queue_depth.max(1) as f64, r.mb_per_s))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (Some(&first), Some(&last)) = (pts.first(), pts.last()) else { return 0.0 };
        if qd <= first.0 {
            return first.1;
        }
        if qd >= last.0 {
            return last.1;
        }
        let i = pts.partition_point(|p| p.0 <= qd);
        let ((d0, t0), (d1, t1)) = (pts[i - 1], pts[i]);
        lerp_log(d0, t0, d1, t1, qd)
    }
}

/// See [`DeviceProfile::kernel_gb_per_s`].
fn kernel_lookup(points: &[KernelPoint], threads: usize) -> f64 {
    let threads = threads.max(1);
    let below = points.iter().filter(|k| k.threads <= threads).max_by_key(|k| k.threads);
    if let Some(k) = below {
        return k.weight_gb_per_s;
    }
    match points.iter().min_by_key(|k| k.threads) {
        Some(k) => k.weight_gb_per_s * threads as f64 / k.threads.max(1) as f64,
        None => 0.0,
    }
}

/// Linear interpolation of `y` in `ln(x)` between `(x0, y0)` and `(x1, y1)`.
fn lerp_log(x0: f64, y0: f64, x1: f64, y1: f64, x: f64) -> f64 {
    let span = x1.ln() - x0.ln();
    if span <= 0.0 {
        return y0;
    }
    let t = ((x.ln() - x0.ln()) / span).clamp(0.0, 1.0);
    y0 + (y1 - y0) * t
}

/// A profile of a made-up device: 4 KiB reads scale with depth, 64 KiB reads are faster. For tests.
#[doc(hidden)]
pub fn sample_profile() -> DeviceProfile {
    let pt = |block_bytes: u64, queue_depth: usize, mb_per_s: f64| ReadPoint {
        block_bytes,
        queue_depth,
        mb_per_s,
        iops: mb_per_s * 1e6 / block_bytes as f64,
        p50_us: 100.0,
        p99_us: 400.0,
    };
    DeviceProfile {
        cpu: "test cpu".into(),
        n_cpus: 4,
        mem_bytes: 8 << 30,
        direct_io: true,
        backend: "io_uring".into(),
        reads: vec![
            pt(4096, 1, 50.0),
            pt(4096, 4, 150.0),
            pt(4096, 16, 300.0),
            pt(4096, 64, 320.0),
            pt(65536, 1, 200.0),
            pt(65536, 4, 600.0),
            pt(65536, 16, 1000.0),
            pt(65536, 64, 1050.0),
        ],
        mem_bw_gb_per_s: 30.0,
        kernels: vec![
            KernelPoint { threads: 1, weight_gb_per_s: 10.0 },
            KernelPoint { threads: 2, weight_gb_per_s: 18.0 },
        ],
        llc_bytes: 32 << 20,
        kernels_in_cache: vec![
            KernelPoint { threads: 1, weight_gb_per_s: 20.0 },
            KernelPoint { threads: 2, weight_gb_per_s: 40.0 },
        ],
        sync_us: vec![(1, 0.5), (2, 3.0)],
        source: "measured".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_throughput_on_and_between_grid_points() {
        let d = sample_profile();
        assert_eq!(d.read_throughput(4096, 4), 150.0);
        assert_eq!(d.read_throughput(65536, 16), 1000.0);
        // Depth 8 is halfway between 4 and 16 in log2.
        assert!((d.read_throughput(4096, 8) - 225.0).abs() < 1e-9);
        // 16 KiB is halfway between 4 KiB and 64 KiB in log2.
        assert!((d.read_throughput(16384, 16) - 650.0).abs() < 1e-9);
        // Outside the grid: nearest depth, largest size, and constant IOPS below the smallest size.
        assert_eq!(d.read_throughput(4096, 256), 320.0);
        assert_eq!(d.read_throughput(4096, 0), 50.0);
        assert_eq!(d.read_throughput(1 << 20, 16), 1000.0);
        assert!((d.read_throughput(2048, 16) - 150.0).abs() < 1e-9);
        assert_eq!(d.peak_read_mb_per_s(), 1050.0);
        let empty = DeviceProfile { reads: vec![], ..sample_profile() };
        assert_eq!(empty.read_throughput(4096, 4), 0.0);
    }

    #[test]
    fn queue_depths_are_the_measured_ones() {
        let d = sample_profile();
        let mut want: Vec<usize> = d.reads.iter().map(|r| r.queue_depth).collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(d.queue_depths(), want);
        assert!(DeviceProfile { reads: vec![], ..sample_profile() }.queue_depths().is_empty());
    }

    #[test]
    fn kernel_speed_by_threads() {
        let d = sample_profile();
        assert_eq!(d.kernel_gb_per_s(1), 10.0);
        assert_eq!(d.kernel_gb_per_s(2), 18.0);
        assert_eq!(d.kernel_gb_per_s(8), 18.0);
        assert_eq!(d.kernel_gb_per_s(0), 10.0);
        let two = DeviceProfile {
            kernels: vec![KernelPoint { threads: 2, weight_gb_per_s: 18.0 }],
            ..sample_profile()
        };
        assert_eq!(two.kernel_gb_per_s(1), 9.0);
        // In the last-level cache (32 MiB) the in-cache points apply.
        assert_eq!(d.kernel_gb_per_s_for(2, 32 << 20), 40.0);
        assert_eq!(d.kernel_gb_per_s_for(2, (32 << 20) + 1), 18.0);
        let unknown = DeviceProfile { kernels_in_cache: vec![], ..sample_profile() };
        assert_eq!(unknown.kernel_gb_per_s_for(1, 1), 10.0);
        assert_eq!(d.sync_seconds(2), 3e-6);
        assert_eq!(d.sync_seconds(7), 3e-6);
    }

    #[test]
    fn json_round_trip_and_version_check() {
        for d in [sample_profile(), DeviceProfile::reference()] {
            assert_eq!(DeviceProfile::from_json(&d.to_json(), "t").unwrap(), d);
        }
        assert!(!DeviceProfile::reference().is_measured());
        let mut v: serde_json::Value = serde_json::from_str(&sample_profile().to_json()).unwrap();
        v["version"] = serde_json::json!(1);
        match DeviceProfile::from_json(&v.to_string(), "t") {
            Err(PlanError::Version { found: 1, expected: DEVICE_VERSION, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
        v["version"] = serde_json::json!(DEVICE_VERSION);
        v["format"] = serde_json::json!("pinion-plan");
        assert!(matches!(DeviceProfile::from_json(&v.to_string(), "t"), Err(PlanError::BadFile { .. })));
        v["format"] = serde_json::json!(DEVICE_FORMAT);
        v["reads"][0]["mb_per_s"] = serde_json::json!("fast");
        let err = DeviceProfile::from_json(&v.to_string(), "t").unwrap_err().to_string();
        assert!(err.contains("mb_per_s") || err.contains("invalid type"), "{err}");
        assert!(matches!(DeviceProfile::from_json("{", "t"), Err(PlanError::BadFile { .. })));
    }
}
