//! Command-line driver of `pinion_io::bench::run`, for measuring by hand (and peak RSS with `/usr/bin/time -v`).
//!
//! Usage: `io_bench PATH [--bs BYTES] [--qd N] [--backend auto|uring|pread] [--pattern rand|seq]
//! [--bytes N | --secs S] [--pool BYTES] [--buffered] [--seed N]`. Sizes accept K, M and G suffixes.

use std::process::ExitCode;
use std::time::Duration;

use pinion_io::BackendChoice;
use pinion_io::bench::{BenchConfig, Limit, Pattern, parse_size, run};

fn parse(args: &[String]) -> Result<BenchConfig, String> {
    let mut it = args.iter();
    let path = it.next().ok_or("missing PATH")?.into();
    let mut cfg = BenchConfig {
        path,
        read_size: 4096,
        queue_depth: 32,
        backend: BackendChoice::Auto,
        pattern: Pattern::Random,
        limit: Limit::Time(Duration::from_secs(10)),
        pool_bytes: 64 << 20,
        direct: true,
        seed: 1,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        let size = |v: &String| parse_size(v).ok_or(format!("bad size {v:?}"));
        match flag.as_str() {
            "--bs" => cfg.read_size = size(val()?)? as usize,
            "--qd" => cfg.queue_depth = size(val()?)? as usize,
            "--bytes" => cfg.limit = Limit::Bytes(size(val()?)?),
            "--secs" => {
                let v = val()?;
                cfg.limit =
                    Limit::Time(Duration::from_secs_f64(v.parse().map_err(|_| format!("bad secs {v:?}"))?))
            }
            "--pool" => cfg.pool_bytes = size(val()?)? as usize,
            "--seed" => cfg.seed = size(val()?)?,
            "--buffered" => cfg.direct = false,
            "--backend" => {
                cfg.backend = match val()?.as_str() {
                    "auto" => BackendChoice::Auto,
                    "uring" => BackendChoice::IoUring,
                    "pread" => BackendChoice::Pread,
                    v => return Err(format!("unknown backend {v:?}")),
                }
            }
            "--pattern" => {
                cfg.pattern = match val()?.as_str() {
                    "rand" => Pattern::Random,
                    "seq" => Pattern::Sequential,
                    v => return Err(format!("unknown pattern {v:?}")),
                }
            }
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("io_bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(report) => {
            // An example binary's job is to print its report.
            #[allow(clippy::print_stdout)]
            {
                println!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("io_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
