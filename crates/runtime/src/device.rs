//! The device profile: what this machine's flash, memory and CPU kernels can do, measured once and kept in a
//! versioned JSON file (format `pinion-device`, version 1) for the planner ([`crate::plan`]) to read.
//!
//! [`measure`] writes a scratch file of real (non-zero, non-sparse) data, times O_DIRECT random reads over it
//! with `pinion_io::bench` for a grid of read sizes and queue depths, streams a large buffer for memory
//! bandwidth, and times the Q4_0 matrix-vector kernel for each thread count. [`DeviceProfile`] answers the
//! planner's questions from that grid: throughput at a read size and depth ([`DeviceProfile::read_throughput`]),
//! the depth worth using ([`DeviceProfile::best_queue_depth`]) and kernel speed
//! ([`DeviceProfile::kernel_gb_per_s`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pinion_exec_cpu::{QMatrix, QuantizedActs, SpinPool, matmul_on};
use pinion_format::quant::{BlockQ4_0, GgmlType, QK, quantize_row_q4_0};
use pinion_io::BackendChoice;
use pinion_io::bench::{BenchConfig, Limit, Pattern, run};
use serde_json::{Value, json};

/// The `format` field of a device profile file.
pub const DEVICE_FORMAT: &str = "pinion-device";
/// The version of the device profile file this code writes and reads.
pub const DEVICE_VERSION: u64 = 1;

/// Why a device profile could not be measured, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// A file could not be read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a device profile, or a field is missing or of the wrong type.
    #[error("{}: not a valid pinion device profile: {why}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The file is a device profile of another version.
    #[error("{}: device profile version {found}, this pinion reads version {expected}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this code reads.
        expected: u64,
    },
    /// The probe options cannot be run.
    #[error("invalid probe options: {why}")]
    Options {
        /// What is wrong.
        why: String,
    },
    /// A read benchmark failed.
    #[error("read benchmark at {block_bytes} B, queue depth {queue_depth}: {source}")]
    Bench {
        /// Read size.
        block_bytes: u64,
        /// Queue depth.
        queue_depth: usize,
        /// The benchmark's error.
        source: pinion_io::BenchError,
    },
    /// The kernel benchmark could not run.
    #[error("kernel benchmark: {why}")]
    Kernel {
        /// What failed.
        why: String,
    },
}

/// One measured cell of the read grid: O_DIRECT random reads of `block_bytes` with `queue_depth` in flight.
#[derive(Clone, Debug, PartialEq)]
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
#[derive(Clone, Debug, PartialEq)]
pub struct KernelPoint {
    /// Compute threads.
    pub threads: usize,
    /// GB (10^9 bytes) of Q4_0 weights processed per second, one activation row (decode).
    pub weight_gb_per_s: f64,
}

/// What this machine can do, as measured by [`measure`].
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProfile {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs available to this process.
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
}

impl DeviceProfile {
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

    /// The smallest measured queue depth whose throughput at `block_bytes` reaches 90% of the best; 1 when
    /// nothing was measured.
    pub fn best_queue_depth(&self, block_bytes: u64) -> usize {
        let mut depths: Vec<usize> = self.reads.iter().map(|r| r.queue_depth.max(1)).collect();
        depths.sort_unstable();
        depths.dedup();
        let best = depths.iter().map(|&d| self.read_throughput(block_bytes, d)).fold(0.0, f64::max);
        depths.into_iter().find(|&d| self.read_throughput(block_bytes, d) >= 0.9 * best).unwrap_or(1)
    }

    /// Kernel throughput (GB of weights per second) with `threads` threads: the measured point, or the nearest
    /// fewer threads' (extra threads beyond the measured ones are assumed to add nothing), or below the
    /// smallest measured count, that count's speed scaled by the thread ratio. 0 when nothing was measured.
    pub fn kernel_gb_per_s(&self, threads: usize) -> f64 {
        kernel_lookup(&self.kernels, threads)
    }

    /// Kernel throughput for a model whose in-memory weights take `working_set_bytes`: the in-cache speed if
    /// they fit in the last-level cache (and it was measured), else [`DeviceProfile::kernel_gb_per_s`].
    pub fn kernel_gb_per_s_for(&self, threads: usize, working_set_bytes: u64) -> f64 {
        if working_set_bytes <= self.llc_bytes && !self.kernels_in_cache.is_empty() {
            kernel_lookup(&self.kernels_in_cache, threads)
        } else {
            self.kernel_gb_per_s(threads)
        }
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

    /// Writes the profile as JSON (to `FILE.partial`, then renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), DeviceError> {
        let reads: Vec<Value> = self
            .reads
            .iter()
            .map(|r| {
                json!({"block_bytes": r.block_bytes, "queue_depth": r.queue_depth, "mb_per_s": r.mb_per_s,
                       "iops": r.iops, "p50_us": r.p50_us, "p99_us": r.p99_us})
            })
            .collect();
        let kernels: Vec<Value> = self
            .kernels
            .iter()
            .map(|k| json!({"threads": k.threads, "weight_gb_per_s": k.weight_gb_per_s}))
            .collect();
        let kernels_in_cache: Vec<Value> = self
            .kernels_in_cache
            .iter()
            .map(|k| json!({"threads": k.threads, "weight_gb_per_s": k.weight_gb_per_s}))
            .collect();
        let v = json!({
            "format": DEVICE_FORMAT,
            "version": DEVICE_VERSION,
            "cpu": self.cpu,
            "n_cpus": self.n_cpus,
            "mem_bytes": self.mem_bytes,
            "direct_io": self.direct_io,
            "backend": self.backend,
            "mem_bw_gb_per_s": self.mem_bw_gb_per_s,
            "reads": reads,
            "kernels": kernels,
            "llc_bytes": self.llc_bytes,
            "kernels_in_cache": kernels_in_cache,
        });
        write_json_atomic(path, &v).map_err(|(path, source)| DeviceError::Io { path, source })
    }

    /// Reads a file written by [`DeviceProfile::save`], checking its format and version.
    pub fn load(path: &Path) -> Result<DeviceProfile, DeviceError> {
        let bytes =
            std::fs::read(path).map_err(|source| DeviceError::Io { path: path.to_path_buf(), source })?;
        let bad = |why: String| DeviceError::BadFile { path: path.to_path_buf(), why };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if v["format"] != DEVICE_FORMAT {
            return Err(bad(format!("format is {}, not \"{DEVICE_FORMAT}\"", v["format"])));
        }
        let found = v["version"].as_u64().ok_or_else(|| bad("no version".into()))?;
        if found != DEVICE_VERSION {
            return Err(DeviceError::Version { path: path.to_path_buf(), found, expected: DEVICE_VERSION });
        }
        let f = Fields(&v);
        let reads = f
            .array("reads")
            .map_err(&bad)?
            .iter()
            .map(|r| {
                let r = Fields(r);
                Ok(ReadPoint {
                    block_bytes: r.u64("block_bytes")?,
                    queue_depth: r.usize("queue_depth")?,
                    mb_per_s: r.f64("mb_per_s")?,
                    iops: r.f64("iops")?,
                    p50_us: r.f64("p50_us")?,
                    p99_us: r.f64("p99_us")?,
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(&bad)?;
        let kernel_points = |name: &str| {
            f.array(name)?
                .iter()
                .map(|k| {
                    let k = Fields(k);
                    Ok(KernelPoint {
                        threads: k.usize("threads")?,
                        weight_gb_per_s: k.f64("weight_gb_per_s")?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let kernels = kernel_points("kernels").map_err(&bad)?;
        let kernels_in_cache = kernel_points("kernels_in_cache").map_err(&bad)?;
        Ok(DeviceProfile {
            cpu: f.str("cpu").map_err(&bad)?,
            n_cpus: f.usize("n_cpus").map_err(&bad)?,
            mem_bytes: f.u64("mem_bytes").map_err(&bad)?,
            direct_io: f.bool("direct_io").map_err(&bad)?,
            backend: f.str("backend").map_err(&bad)?,
            reads,
            mem_bw_gb_per_s: f.f64("mem_bw_gb_per_s").map_err(&bad)?,
            kernels,
            llc_bytes: f.u64("llc_bytes").map_err(&bad)?,
            kernels_in_cache,
        })
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

/// Typed access to the fields of a JSON object, with errors naming the field.
pub(crate) struct Fields<'a>(pub(crate) &'a Value);

impl Fields<'_> {
    pub(crate) fn f64(&self, k: &str) -> Result<f64, String> {
        self.0[k]
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("field {k} is not a finite number"))
    }
    pub(crate) fn u64(&self, k: &str) -> Result<u64, String> {
        self.0[k].as_u64().ok_or_else(|| format!("field {k} is not a non-negative integer"))
    }
    pub(crate) fn usize(&self, k: &str) -> Result<usize, String> {
        self.u64(k).and_then(|x| usize::try_from(x).map_err(|_| format!("field {k} is too large")))
    }
    pub(crate) fn bool(&self, k: &str) -> Result<bool, String> {
        self.0[k].as_bool().ok_or_else(|| format!("field {k} is not a boolean"))
    }
    pub(crate) fn str(&self, k: &str) -> Result<String, String> {
        self.0[k].as_str().map(str::to_string).ok_or_else(|| format!("field {k} is not a string"))
    }
    pub(crate) fn array(&self, k: &str) -> Result<&Vec<Value>, String> {
        self.0[k].as_array().ok_or_else(|| format!("field {k} is not an array"))
    }
}

/// Writes `v` as pretty JSON to `path.partial` and renames it to `path`; on error, the path that failed.
pub(crate) fn write_json_atomic(path: &Path, v: &Value) -> Result<(), (PathBuf, std::io::Error)> {
    let tmp = crate::prepare::partial_path(path);
    let text = serde_json::to_vec_pretty(v).map_err(|e| (tmp.clone(), std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(|e| (tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| (path.to_path_buf(), e))
}

/// What [`measure`] measures.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Directory of the scratch file (on the flash device to profile); the file is deleted afterwards.
    pub dir: PathBuf,
    /// Size of the scratch file; larger than any read size, ideally larger than the device's own caches.
    pub file_bytes: u64,
    /// Read sizes to measure (multiples of 4096).
    pub block_sizes: Vec<u64>,
    /// Queue depths to measure.
    pub queue_depths: Vec<usize>,
    /// Seconds per read-grid cell.
    pub seconds_per_point: f64,
    /// Largest thread count of the kernel benchmark.
    pub max_threads: usize,
    /// Bytes the memory-bandwidth and kernel benchmarks stream through: more than the last-level cache, so
    /// that they measure memory as a large model's decode sees it.
    pub working_set_bytes: u64,
}

impl ProbeOptions {
    /// The full probe: a 1 GiB file, read sizes 4 KiB to 512 KiB, depths 1 to 64, half a second per cell,
    /// kernels on 1 to `available_parallelism` threads.
    pub fn new(dir: PathBuf) -> ProbeOptions {
        ProbeOptions {
            dir,
            file_bytes: 1 << 30,
            block_sizes: [4, 8, 16, 32, 64, 128, 512].iter().map(|k| k << 10).collect(),
            queue_depths: vec![1, 4, 16, 32, 64],
            seconds_per_point: 0.5,
            max_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            working_set_bytes: default_working_set(),
        }
    }
}

/// Twice the last-level cache, at least 256 MiB and at most 1 GiB.
fn default_working_set() -> u64 {
    (2 * llc_size()).clamp(256 << 20, 1 << 30)
}

/// The largest cache of CPU 0 (from sysfs), bytes; 0 if unknown.
fn llc_size() -> u64 {
    (0..8)
        .filter_map(|i| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size")).ok()
        })
        .filter_map(|s| parse_cache_size(s.trim()))
        .max()
        .unwrap_or(0)
}

/// Parses a sysfs cache size such as `32768K` or `260M`.
fn parse_cache_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Progress callback of [`measure`]: `(step, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Measures this machine. `progress` is called with a step name and its progress (`done` of `total`).
pub fn measure(opts: &ProbeOptions, progress: Progress<'_>) -> Result<DeviceProfile, DeviceError> {
    check_options(opts)?;
    let scratch = ScratchFile::create(opts, progress)?;
    let mut reads = Vec::new();
    let (mut backend, mut direct_io) = (String::from("none"), true);
    let n_cells = opts.block_sizes.len() * opts.queue_depths.len();
    for &bs in &opts.block_sizes {
        for &qd in &opts.queue_depths {
            progress("reads", reads.len(), n_cells);
            let cfg = BenchConfig {
                path: scratch.0.clone(),
                read_size: bs as usize,
                queue_depth: qd,
                backend: BackendChoice::Auto,
                pattern: Pattern::Random,
                limit: Limit::Time(Duration::from_secs_f64(opts.seconds_per_point)),
                pool_bytes: (bs as usize).saturating_mul(qd).saturating_mul(2).max(4 << 20),
                direct: true,
                seed: 0x9e37_79b9 ^ bs ^ qd as u64,
            };
            let r = run(&cfg).map_err(|source| DeviceError::Bench {
                block_bytes: bs,
                queue_depth: qd,
                source,
            })?;
            backend = r.backend.to_string();
            direct_io &= r.direct;
            let lat = &r.stats.latency;
            reads.push(ReadPoint {
                block_bytes: bs,
                queue_depth: qd,
                mb_per_s: r.mb_per_s(),
                iops: r.iops(),
                p50_us: lat.p50().as_secs_f64() * 1e6,
                p99_us: lat.p99().as_secs_f64() * 1e6,
            });
        }
    }
    progress("reads", n_cells, n_cells);
    drop(scratch);
    let mem_bw_gb_per_s = memory_bandwidth(opts.working_set_bytes, opts.max_threads, progress);
    let kernels = kernel_speeds(KERNEL_DIM, opts.working_set_bytes, opts.max_threads, "kernels", progress)?;
    // Two 1024 x 4096 matrices (4.5 MiB): in the last-level cache of most CPUs.
    let kernels_in_cache = kernel_speeds(1024, 0, opts.max_threads, "kernels (in cache)", progress)?;
    Ok(DeviceProfile {
        cpu: cpu_name(),
        n_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_bytes: mem_total(),
        direct_io,
        backend,
        reads,
        mem_bw_gb_per_s,
        kernels,
        llc_bytes: llc_size(),
        kernels_in_cache,
    })
}

fn check_options(opts: &ProbeOptions) -> Result<(), DeviceError> {
    let bad = |why: String| Err(DeviceError::Options { why });
    if opts.block_sizes.is_empty() || opts.queue_depths.is_empty() {
        return bad("no read sizes or no queue depths".into());
    }
    if let Some(b) = opts.block_sizes.iter().find(|&&b| b == 0 || b % 4096 != 0) {
        return bad(format!("read size {b} is not a positive multiple of 4096"));
    }
    let largest = opts.block_sizes.iter().copied().max().unwrap_or(0);
    if opts.file_bytes < largest.saturating_mul(16) {
        return bad(format!("a scratch file of {} B is too small for reads of {largest} B", opts.file_bytes));
    }
    if !(1 << 20..=16 << 30).contains(&opts.working_set_bytes) {
        return bad(format!("a working set of {} B is not between 1 MiB and 16 GiB", opts.working_set_bytes));
    }
    if opts.queue_depths.contains(&0) || opts.max_threads == 0 {
        return bad("queue depths and thread counts must be positive".into());
    }
    if !(opts.seconds_per_point.is_finite() && opts.seconds_per_point > 0.0) {
        return bad(format!("{} seconds per point", opts.seconds_per_point));
    }
    Ok(())
}

/// The scratch file of the read benchmark; deleted on drop.
struct ScratchFile(PathBuf);

impl ScratchFile {
    /// Writes `opts.file_bytes` of pseudo-random data (so neither the file system nor the device can skip
    /// it as a hole or compress it), synced to the device. O_DIRECT reads then bypass the page cache copy.
    fn create(opts: &ProbeOptions, progress: Progress<'_>) -> Result<ScratchFile, DeviceError> {
        let path = opts.dir.join(format!("pinion-device-probe-{}.tmp", std::process::id()));
        let io = |source| DeviceError::Io { path: path.clone(), source };
        let mut file = std::fs::File::create(&path).map_err(io)?;
        let scratch = ScratchFile(path.clone());
        let chunk_bytes = 1usize << 20;
        let n_chunks = opts.file_bytes.div_ceil(chunk_bytes as u64) as usize;
        let mut words = vec![0u64; chunk_bytes / 8];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut bytes = vec![0u8; chunk_bytes];
        for i in 0..n_chunks {
            if i % 16 == 0 {
                progress("scratch file", i, n_chunks);
            }
            for w in &mut words {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *w = state;
            }
            for (dst, w) in bytes.chunks_exact_mut(8).zip(&words) {
                dst.copy_from_slice(&w.to_le_bytes());
            }
            let left = opts.file_bytes - i as u64 * chunk_bytes as u64;
            let n = left.min(chunk_bytes as u64) as usize;
            file.write_all(&bytes[..n]).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        progress("scratch file", n_chunks, n_chunks);
        Ok(scratch)
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Streaming read bandwidth in GB/s: `n_threads` threads each sum their share of a buffer of `bytes`; the
/// best of five passes.
fn memory_bandwidth(bytes: u64, n_threads: usize, progress: Progress<'_>) -> f64 {
    const PASSES: usize = 5;
    let n_words = (bytes / 8) as usize;
    let total_bytes = n_words as f64 * 8.0;
    let buf: Vec<u64> = (0..n_words).map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).collect();
    let n_threads = n_threads.max(1);
    let part = buf.len().div_ceil(n_threads);
    let mut best = 0.0f64;
    for pass in 0..PASSES {
        progress("memory bandwidth", pass, PASSES);
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || sum_words(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, u64::wrapping_add)
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(total_bytes / 1e9 / secs.max(1e-9));
    }
    progress("memory bandwidth", PASSES, PASSES);
    best
}

/// A wrapping sum in eight independent lanes (so it vectorizes and is bound by memory, not by latency).
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, &w| a.wrapping_add(w));
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

/// Width (and height) of the Q4_0 matrices of the kernel benchmark.
const KERNEL_DIM: usize = 4096;
/// Q4_0 matrix-vector throughput of `n_rows x 4096` matrices for 1 to `max_threads` threads: weight bytes
/// over the median time. Copies of the matrix filling `working_set` bytes (at least two) are cycled through,
/// so that with a working set larger than the last-level cache the weights stream from memory, as a large
/// model's layers would.
fn kernel_speeds(
    n_rows: usize,
    working_set: u64,
    max_threads: usize,
    step: &str,
    progress: Progress<'_>,
) -> Result<Vec<KernelPoint>, DeviceError> {
    let kerr = |why: String| DeviceError::Kernel { why };
    let blocks_per_row = KERNEL_DIM / QK;
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut row = vec![0f32; KERNEL_DIM];
    let mut blocks = vec![BlockQ4_0 { d: half::f16::ZERO, qs: [0; QK / 2] }; blocks_per_row * n_rows];
    for out in blocks.chunks_exact_mut(blocks_per_row) {
        for x in &mut row {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *x = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        quantize_row_q4_0(&row, out);
    }
    let one: &[u8] = bytemuck::cast_slice(&blocks);
    let n_copies = (working_set / one.len() as u64).max(2) as usize;
    let data: Vec<Vec<u8>> = (0..n_copies).map(|_| one.to_vec()).collect();
    let mats = data
        .iter()
        .map(|d| QMatrix::new(GgmlType::Q4_0, n_rows, KERNEL_DIM, d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| kerr(e.to_string()))?;
    let x: Vec<f32> = (0..KERNEL_DIM).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut acts = QuantizedActs::new();
    acts.quantize(GgmlType::Q4_0, &x, KERNEL_DIM);
    let mut out = vec![0f32; n_rows];
    let mut points = Vec::new();
    for threads in 1..=max_threads.max(1) {
        progress(step, threads - 1, max_threads);
        let pool = SpinPool::new(threads).map_err(|e| kerr(format!("starting {threads} threads: {e}")))?;
        for m in &mats {
            matmul_on(&pool, m, &acts, &mut out);
        }
        let mut times = Vec::new();
        let t_start = Instant::now();
        while times.len() < 2 * n_copies
            || (t_start.elapsed() < Duration::from_millis(300) && times.len() < 4000)
        {
            let m = &mats[times.len() % mats.len()];
            let t0 = Instant::now();
            matmul_on(&pool, m, &acts, &mut out);
            times.push(t0.elapsed().as_secs_f64());
        }
        std::hint::black_box(&out);
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2].max(1e-9);
        points.push(KernelPoint { threads, weight_gb_per_s: one.len() as f64 / 1e9 / median });
    }
    progress(step, max_threads, max_threads);
    Ok(points)
}

/// The CPU's model name from /proc/cpuinfo, or the architecture name.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| {
                    l.starts_with("model name") || l.starts_with("Hardware") || l.starts_with("Processor")
                })
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Total memory from /proc/meminfo, bytes (0 if unknown).
fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

#[cfg(test)]
/// A profile of a made-up device: 4 KiB reads scale with depth, 64 KiB reads are faster.
pub(crate) fn sample_profile() -> DeviceProfile {
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
        let empty = DeviceProfile { reads: vec![], ..sample_profile() };
        assert_eq!(empty.read_throughput(4096, 4), 0.0);
    }

    #[test]
    fn best_queue_depth_is_the_smallest_within_ten_percent() {
        let d = sample_profile();
        // 4 KiB: best 320; 300 >= 288, so 16.
        assert_eq!(d.best_queue_depth(4096), 16);
        // 64 KiB: best 1050; 1000 >= 945, so 16; 600 is not.
        assert_eq!(d.best_queue_depth(65536), 16);
        let flat = DeviceProfile {
            reads: vec![ReadPoint {
                block_bytes: 4096,
                queue_depth: 1,
                mb_per_s: 100.0,
                ..sample_profile().reads[0].clone()
            }],
            ..sample_profile()
        };
        assert_eq!(flat.best_queue_depth(4096), 1);
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
    }

    #[test]
    fn save_load_round_trip_and_version_check() {
        let dir = std::env::temp_dir().join(format!("pinion-device-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("device.json");
        let d = sample_profile();
        d.save(&path).unwrap();
        assert!(!dir.join("device.json.partial").exists());
        assert_eq!(DeviceProfile::load(&path).unwrap(), d);

        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["version"] = json!(2);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        match DeviceProfile::load(&path) {
            Err(DeviceError::Version { found: 2, expected: 1, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
        v["version"] = json!(1);
        v["format"] = json!("pinion-plan");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(DeviceProfile::load(&path), Err(DeviceError::BadFile { .. })));
        v["format"] = json!(DEVICE_FORMAT);
        v["reads"][0]["mb_per_s"] = json!("fast");
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = DeviceProfile::load(&path).unwrap_err().to_string();
        assert!(err.contains("mb_per_s"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_sizes_from_sysfs() {
        assert_eq!(parse_cache_size("32768K"), Some(32 << 20));
        assert_eq!(parse_cache_size("260M"), Some(260 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("M"), None);
        assert_eq!(parse_cache_size("12Q"), None);
    }

    #[test]
    fn bad_probe_options_are_typed_errors() {
        let mut o = ProbeOptions::new(std::env::temp_dir());
        o.block_sizes = vec![6000];
        assert!(matches!(measure(&o, &mut |_, _, _| {}), Err(DeviceError::Options { .. })));
        let mut o = ProbeOptions::new(std::env::temp_dir());
        o.file_bytes = 1 << 20;
        assert!(matches!(measure(&o, &mut |_, _, _| {}), Err(DeviceError::Options { .. })));
    }

    #[test]
    fn tiny_probe_measures_every_cell() {
        let dir = std::env::temp_dir().join(format!("pinion-device-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let o = ProbeOptions {
            dir: dir.clone(),
            file_bytes: 4 << 20,
            block_sizes: vec![4096, 65536],
            queue_depths: vec![1, 4],
            seconds_per_point: 0.02,
            max_threads: 1,
            working_set_bytes: 32 << 20,
        };
        let mut steps = Vec::new();
        let d = measure(&o, &mut |s, _, _| steps.push(s.to_string())).unwrap();
        assert_eq!(d.reads.len(), 4);
        assert!(d.reads.iter().all(|r| r.mb_per_s > 0.0 && r.iops > 0.0));
        assert_eq!(d.kernels.len(), 1);
        assert_eq!(d.kernels_in_cache.len(), 1);
        assert!(d.kernels[0].weight_gb_per_s > 0.0 && d.mem_bw_gb_per_s > 0.0);
        assert!(steps.iter().any(|s| s == "reads") && steps.iter().any(|s| s == "kernels"));
        // The scratch file is gone.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
