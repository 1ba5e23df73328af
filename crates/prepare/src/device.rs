//! Measuring the device: what this machine's flash, memory and CPU kernels can do, for the planner
//! (`pinion_plan::DeviceProfile`, kept as `device.json`).
//!
//! [`measure`] writes a scratch file of real (non-zero, non-sparse) data, times O_DIRECT random reads over it
//! with `pinion_io::bench` for a grid of read sizes and queue depths, streams a large buffer for memory
//! bandwidth, times the Q4_0 matrix-vector kernel for each thread count (weights from memory and from the
//! last-level cache), and times an empty parallel step of the decode thread pool (the synchronisation each
//! step of a decode pays).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pinion_exec_cpu::{QMatrix, QuantizedActs, SpinPool, matmul_on};
use pinion_format::quant::{BlockQ4_0, GgmlType, QK, quantize_row_q4_0};
use pinion_io::BackendChoice;
use pinion_io::bench::{BenchConfig, Limit, Pattern, run};
use pinion_plan::{DeviceProfile, KernelPoint, ReadPoint};

use crate::error::PrepareError;

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
pub fn measure(opts: &ProbeOptions, progress: Progress<'_>) -> Result<DeviceProfile, PrepareError> {
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
            let r = run(&cfg).map_err(|source| PrepareError::Bench {
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
    let sync_us = sync_costs(opts.max_threads, progress)?;
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
        sync_us,
        source: "measured".into(),
    })
}

/// The cost of one empty parallel step of the decode pool, in µs, for 1 to `max_threads` threads: the median
/// over many steps (waking the workers and waiting for the last, which every step of a decode pays).
fn sync_costs(max_threads: usize, progress: Progress<'_>) -> Result<Vec<(usize, f64)>, PrepareError> {
    let mut out = Vec::new();
    for threads in 1..=max_threads.max(1) {
        progress("thread synchronisation", threads - 1, max_threads);
        let pool = SpinPool::new(threads)
            .map_err(|e| PrepareError::Kernel { why: format!("starting {threads} threads: {e}") })?;
        let mut times = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t0 = Instant::now();
            pool.run(&|_, _| {});
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        out.push((threads, times[times.len() / 2]));
    }
    progress("thread synchronisation", max_threads, max_threads);
    Ok(out)
}

fn check_options(opts: &ProbeOptions) -> Result<(), PrepareError> {
    let bad = |why: String| Err(PrepareError::ProbeOptions { why });
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
    fn create(opts: &ProbeOptions, progress: Progress<'_>) -> Result<ScratchFile, PrepareError> {
        let path = opts.dir.join(format!("pinion-device-probe-{}.tmp", std::process::id()));
        let io = |source| PrepareError::Io { path: path.clone(), source };
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
) -> Result<Vec<KernelPoint>, PrepareError> {
    let kerr = |why: String| PrepareError::Kernel { why };
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
mod tests {
    use super::*;

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
        assert!(matches!(measure(&o, &mut |_, _, _| {}), Err(PrepareError::ProbeOptions { .. })));
        let mut o = ProbeOptions::new(std::env::temp_dir());
        o.file_bytes = 1 << 20;
        assert!(matches!(measure(&o, &mut |_, _, _| {}), Err(PrepareError::ProbeOptions { .. })));
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
        assert_eq!(d.sync_us.len(), 1);
        assert!(d.is_measured());
        assert!(d.kernels[0].weight_gb_per_s > 0.0 && d.mem_bw_gb_per_s > 0.0);
        assert!(steps.iter().any(|s| s == "reads") && steps.iter().any(|s| s == "kernels"));
        // The scratch file is gone, and the profile survives its file format.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let f = dir.join("device.json");
        crate::files::save_device(&d, &f).unwrap();
        assert_eq!(crate::files::load_device(&f).unwrap(), d);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
