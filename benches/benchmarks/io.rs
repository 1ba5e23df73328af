//! Read throughput of `pinion-io` by read size and queue depth, for both backends, with O_DIRECT.
//!
//! Reads a file named by `PINION_IO_BENCH_FILE` (use one larger than 4 GiB on the disk under test, as in
//! docs/perf.md), or else a 256 MiB file of random bytes created once in the system temporary directory. Each
//! iteration is one read; reads are at random offsets aligned to the read size, `queue_depth` kept in flight.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_io::BackendChoice;
use pinion_io::bench::{BenchConfig, Limit, Pattern, run};

fn bench_file() -> PathBuf {
    if let Some(p) = std::env::var_os("PINION_IO_BENCH_FILE") {
        return PathBuf::from(p);
    }
    let path = std::env::temp_dir().join("pinion-io-bench-256m.dat");
    let want = 256u64 << 20;
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(want) {
        let mut f = std::fs::File::create(&path).expect("create bench file");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..want >> 20 {
            for w in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).expect("write bench file");
        }
        f.sync_all().expect("sync bench file");
    }
    path
}

fn bench_io(c: &mut Criterion) {
    let path = bench_file();
    let mut g = c.benchmark_group("io_randread");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (backend, name) in [(BackendChoice::IoUring, "io_uring"), (BackendChoice::Pread, "pread")] {
        for read_size in [4usize << 10, 64 << 10, 1 << 20] {
            for queue_depth in [1usize, 8, 32] {
                g.throughput(Throughput::Bytes(read_size as u64));
                let id =
                    BenchmarkId::new(format!("{name}/bs{}k", read_size >> 10), format!("qd{queue_depth}"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let cfg = BenchConfig {
                            path: path.clone(),
                            read_size,
                            queue_depth,
                            backend,
                            pattern: Pattern::Random,
                            limit: Limit::Bytes(iters * read_size as u64),
                            pool_bytes: (queue_depth * read_size * 2).max(64 << 20),
                            direct: true,
                            seed: iters,
                        };
                        // The report's clock starts after the engine is set up and stops at the last completion.
                        run(&cfg).expect("io bench run").elapsed
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench_io);
