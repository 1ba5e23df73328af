//! Times `train_layer` on synthetic data of a given layer shape (default: SmolLM2-135M, d_in 576, n_out 1536,
//! 4096 samples, ranks 32/64/128) and prints seconds per layer and the report.
//!
//! Usage: `cargo run --release -p pinion-predictor --example train_speed -- [d_in n_out n_samples] [--all-ranks]
//! [--threads N] [--lr X] [--epochs N] [--batch N] [--ranks A,B,..] [--k N] [--wd X] [--target X]`. With
//! `--all-ranks` every rank is trained (the rank search never stops early), which is the worst case.
//!
//! The data is planted and learnable: neuron `i` fires when a bias (giving a power-law firing frequency, mean
//! ~0.15) plus a linear function of the input through a rank-`k` (default 32) shared basis, plus a little
//! per-sample noise, is positive; a few input dimensions are huge outliers, as in LLM residual streams.

use std::time::Instant;

use pinion_predictor::{Masks, TrainConfig, train_layer};

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn normal(&mut self) -> f64 {
        let u = 1.0 - (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Inverse of the standard normal CDF by bisection.
fn probit(p: f64) -> f64 {
    let cdf = |x: f64| 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < p { lo = mid } else { hi = mid }
    }
    0.5 * (lo + hi)
}

/// Abramowitz-Stegun 7.1.26.
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

/// CPU seconds (user + system) used by this process so far, from /proc (0 where unavailable).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command: state is field 3, utime 14, stime 15 (clock ticks, 100 Hz).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    if f.len() > 12 { (f[11] + f[12]) / 100.0 } else { 0.0 }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all_ranks = args.iter().any(|a| a == "--all-ranks");
    let mut threads = 0;
    let mut k = 32;
    let mut cfg = TrainConfig { ranks: vec![32, 64, 128], ..TrainConfig::default() };
    let mut nums = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--threads" {
            threads = it.next().and_then(|v| v.parse().ok()).expect("--threads N");
        } else if a == "--k" {
            k = it.next().and_then(|v| v.parse().ok()).expect("--k N");
        } else if a == "--wd" {
            cfg.weight_decay = it.next().and_then(|v| v.parse().ok()).expect("--wd X");
        } else if a == "--target" {
            cfg.target_recall = it.next().and_then(|v| v.parse().ok()).expect("--target X");
        } else if a == "--lr" {
            cfg.lr = it.next().and_then(|v| v.parse().ok()).expect("--lr X");
        } else if a == "--epochs" {
            cfg.epochs = it.next().and_then(|v| v.parse().ok()).expect("--epochs N");
        } else if a == "--batch" {
            cfg.batch = it.next().and_then(|v| v.parse().ok()).expect("--batch N");
        } else if a == "--ranks" {
            let v = it.next().expect("--ranks A,B,..");
            cfg.ranks = v.split(',').map(|r| r.parse().expect("rank")).collect();
        } else if let Ok(v) = a.parse::<usize>() {
            nums.push(v);
        }
    }
    let (d, n_out, n) = match nums[..] {
        [d, o, s, ..] => (d, o, s),
        _ => (576, 1536, 4096),
    };
    let mut rng = SplitMix(42);
    // Inputs: dimension 0 is a constant 1 (the planted bias rides on it), a few dimensions are huge outliers.
    let scale: Vec<f64> = (0..d)
        .map(|j| {
            if j == 0 {
                0.0
            } else if j % 97 == 1 {
                40.0
            } else {
                1.0
            }
        })
        .collect();
    let offset: Vec<f64> = (0..d)
        .map(|j| {
            if j == 0 {
                1.0
            } else if j % 97 == 1 {
                8.0
            } else {
                0.0
            }
        })
        .collect();
    // Neuron i fires when c_i + u_i · (B z) / sqrt(k) + noise > 0, where z = (x - offset) / scale is the
    // standardized input: a linear function of x through a rank-k basis B (k x d, column 0 unused).
    let basis: Vec<f64> = (0..k * d).map(|t| if t % d == 0 { 0.0 } else { rng.normal() }).collect();
    let gram: Vec<f64> = (0..k * k)
        .map(|ab| {
            let (a, b) = (ab / k, ab % k);
            (0..d).map(|j| basis[a * d + j] * basis[b * d + j]).sum()
        })
        .collect();
    let noise_sd = 0.05 * (d as f64).sqrt();
    let mut coef = vec![0.0f64; n_out * k];
    let mut bias = vec![0.0f64; n_out];
    for (i, (u, c)) in coef.chunks_exact_mut(k).zip(bias.iter_mut()).enumerate() {
        u.iter_mut().for_each(|v| *v = rng.normal() / (k as f64).sqrt());
        let var: f64 = (0..k * k).map(|ab| u[ab / k] * gram[ab] * u[ab % k]).sum();
        let sd = (var + noise_sd * noise_sd).sqrt();
        // Power-law firing frequency with mean ~0.15.
        let f = (0.9 * ((i % 1000) as f64 + 1.0).powf(-0.3)).clamp(0.01, 0.9);
        *c = sd * probit(f);
    }
    let mut x = vec![0.0f32; n * d];
    let mut masks = Masks::new(n, n_out);
    let mut z = vec![0.0f64; d];
    for (r, row) in x.chunks_exact_mut(d).enumerate() {
        for (j, (zj, o)) in z.iter_mut().zip(row.iter_mut()).enumerate() {
            *zj = if j == 0 { 0.0 } else { rng.normal() };
            *o = (offset[j] + scale[j] * *zj) as f32;
        }
        let proj: Vec<f64> =
            basis.chunks_exact(d).map(|b| b.iter().zip(&z).map(|(p, q)| p * q).sum()).collect();
        for (i, (u, c)) in coef.chunks_exact(k).zip(&bias).enumerate() {
            let logit: f64 =
                c + u.iter().zip(&proj).map(|(p, q)| p * q).sum::<f64>() + noise_sd * rng.normal();
            masks.set(r, i, logit > 0.0);
        }
    }
    cfg.threads = threads;
    if all_ranks {
        cfg.max_density_ratio = 1e-9;
    }
    println!("shape d_in {d} n_out {n_out} samples {n} density {:.3} ranks {:?}", masks.density(), cfg.ranks);
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let (p, report) = train_layer(&x, d, &masks, &cfg).expect("training");
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    println!("seconds per layer: {secs:.2} wall, {cpu:.2} cpu (rank chosen {})", p.rank());
    println!("{report:#?}");
}
