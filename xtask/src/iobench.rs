//! `cargo xtask io-bench`: the io crate's read throughput by read size, queue depth and backend, as a table.
//!
//! A thin driver over `pinion_io::bench::run`; the file should be larger than the page cache can help with
//! (reads use O_DIRECT unless `--buffered`), e.g. `dd if=/dev/urandom of=/work/iobench.dat bs=1M count=4608`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use pinion_io::BackendChoice;
use pinion_io::bench::{BenchConfig, Limit, Pattern, parse_size, run};

#[derive(Args)]
pub(crate) struct IoBenchArgs {
    /// File to read.
    path: PathBuf,
    /// Read sizes in bytes (K/M suffixes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M", value_parser = bytes)]
    bs: Vec<u64>,
    /// Queue depths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    qd: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Sequential instead of random offsets.
    #[arg(long)]
    sequential: bool,
    /// Buffer-pool budget of the engine (K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = bytes)]
    pool: u64,
    /// Go through the page cache (no O_DIRECT).
    #[arg(long)]
    buffered: bool,
}

fn bytes(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("{s:?} is not a byte count (e.g. 4096, 4K, 1M, 4G)"))
}

pub(crate) fn io_bench(a: &IoBenchArgs) -> Result<()> {
    let pattern = if a.sequential { Pattern::Sequential } else { Pattern::Random };
    eprintln!(
        "xtask io-bench: {} ({:?}, {} s per cell, {})",
        a.path.display(),
        pattern,
        a.secs,
        if a.buffered { "buffered" } else { "O_DIRECT" }
    );
    println!("| backend | read size | QD | IOPS | MB/s | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for backend in [BackendChoice::IoUring, BackendChoice::Pread] {
        for &bs in &a.bs {
            for &qd in &a.qd {
                let cfg = BenchConfig {
                    path: a.path.clone(),
                    read_size: bs as usize,
                    queue_depth: qd,
                    backend,
                    pattern,
                    limit: Limit::Time(Duration::from_secs_f64(a.secs)),
                    pool_bytes: a.pool as usize,
                    direct: !a.buffered,
                    seed: 1,
                };
                let r = run(&cfg).with_context(|| format!("{backend:?} bs {bs} qd {qd}"))?;
                let lat = &r.stats.latency;
                println!(
                    "| {:?} | {} | {qd} | {:.0} | {:.1} | {:.0} | {:.0} |",
                    r.backend,
                    bs,
                    r.iops(),
                    r.mb_per_s(),
                    lat.p50().as_secs_f64() * 1e6,
                    lat.p99().as_secs_f64() * 1e6
                );
            }
        }
    }
    Ok(())
}
