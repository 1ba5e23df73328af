//! `cargo xtask profile-device`: measure this machine for the planner and write the device profile.
//!
//! A thin driver over `pinion_prepare::device::measure`: O_DIRECT random reads over a scratch file by read
//! size and queue depth, streaming memory bandwidth, and Q4_0 matrix-vector speed per thread count. Prints the
//! measured points as tables and writes the profile (format in docs/format.md) to `--out`. `--quick` measures
//! a few points on a 64 MiB file, for tests.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use pinion_plan::{DeviceProfile, parse_size};
use pinion_prepare::device::{ProbeOptions, measure};

use crate::progress::Progress;

#[derive(Args)]
pub(crate) struct DeviceArgs {
    /// Where to write the profile; default: target/pinion/device.json in the workspace.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory of the scratch file (on the device to profile); default: the output file's directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the scratch file (e.g. 1GiB, 512M).
    #[arg(long, default_value = "1GiB", value_parser = bytes)]
    file_size: u64,
    /// Largest thread count of the kernel benchmark; default: all CPUs.
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds per read measurement.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// A few points on a 64 MiB file with short measurements (for tests, not for planning).
    #[arg(long)]
    quick: bool,
}

fn bytes(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|_| format!("{s:?} is not a byte count (e.g. 1GiB, 512M, 67108864)"))
}

pub(crate) fn run(a: &DeviceArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("pinion").join("device.json")
    });
    let out_dir = out.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut opts = ProbeOptions::new(a.dir.clone().unwrap_or_else(|| out_dir.clone()));
    opts.file_bytes = a.file_size;
    opts.seconds_per_point = a.seconds;
    if let Some(t) = a.threads {
        if t == 0 {
            bail!("--threads must be positive");
        }
        opts.max_threads = t;
    }
    if a.quick {
        opts.file_bytes = 64 << 20;
        opts.block_sizes = vec![4 << 10, 64 << 10];
        opts.queue_depths = vec![1, 16];
        opts.seconds_per_point = 0.1;
        opts.working_set_bytes = 64 << 20;
    }
    eprintln!(
        "xtask profile-device: scratch file of {} MiB in {}, {} read sizes x {} depths, {} s each; memory and \
         kernels over {} MiB on 1..={} threads",
        opts.file_bytes >> 20,
        opts.dir.display(),
        opts.block_sizes.len(),
        opts.queue_depths.len(),
        opts.seconds_per_point,
        opts.working_set_bytes >> 20,
        opts.max_threads
    );
    if cfg!(debug_assertions) {
        eprintln!(
            "xtask profile-device: warning: this is a debug build, so kernel speeds are several times too low; \
             for a profile to plan with, run `cargo run --release -p pinion-xtask -- profile-device`"
        );
    }
    let t0 = Instant::now();
    let profile = measure_with_progress(&opts)?;
    eprintln!("xtask profile-device: measured in {:.1} s", t0.elapsed().as_secs_f64());
    print_profile(&profile);
    pinion_prepare::save_device(&profile, &out)?;
    eprintln!("xtask profile-device: wrote {}", out.display());
    Ok(())
}

/// Measures the device with one progress line or bar per measurement step.
pub(crate) fn measure_with_progress(opts: &ProbeOptions) -> Result<DeviceProfile> {
    let mut bar: Option<(String, Progress)> = None;
    let profile = measure(opts, &mut |step, done, total| {
        if bar.as_ref().is_none_or(|(s, _)| s != step) {
            if let Some((_, p)) = bar.take() {
                p.finish("done");
            }
            bar = Some((step.to_string(), Progress::new(step, "points")));
        }
        if let Some((_, p)) = bar.as_mut() {
            p.update(done as u64, total as u64, "");
        }
    })?;
    if let Some((_, p)) = bar.take() {
        p.finish("done");
    }
    Ok(profile)
}

/// Prints the measured points as markdown tables.
pub(crate) fn print_profile(p: &DeviceProfile) {
    println!(
        "{} ({} CPUs, {:.1} GiB), backend {}, O_DIRECT {}",
        p.cpu,
        p.n_cpus,
        p.mem_bytes as f64 / (1u64 << 30) as f64,
        p.backend,
        p.direct_io
    );
    println!();
    println!("| read size | QD | MB/s | IOPS | p50 µs | p99 µs |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &p.reads {
        println!(
            "| {} KiB | {} | {:.1} | {:.0} | {:.0} | {:.0} |",
            r.block_bytes / 1024,
            r.queue_depth,
            r.mb_per_s,
            r.iops,
            r.p50_us,
            r.p99_us
        );
    }
    println!();
    println!("memory read bandwidth: {:.1} GB/s", p.mem_bw_gb_per_s);
    println!();
    println!("| threads | Q4_0 matvec GB/s, from memory | in cache (LLC {} MiB) |", p.llc_bytes >> 20);
    println!("|---:|---:|---:|");
    for k in &p.kernels {
        let cached = p.kernels_in_cache.iter().find(|c| c.threads == k.threads).map(|c| c.weight_gb_per_s);
        println!("| {} | {:.1} | {:.1} |", k.threads, k.weight_gb_per_s, cached.unwrap_or(f64::NAN));
    }
    println!();
    for (threads, us) in &p.sync_us {
        println!("parallel step on {threads} threads: {us:.1} µs");
    }
}
