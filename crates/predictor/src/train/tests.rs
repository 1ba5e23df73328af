//! Tests of predictor training on planted, learnable synthetic data.

use super::*;

/// Inverse of the standard normal CDF by bisection (Abramowitz-Stegun 7.1.26 erf).
fn probit(p: f64) -> f64 {
    let erf = |x: f64| {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let y = 1.0
            - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
                + 0.254_829_592)
                * t
                * (-x * x).exp();
        if x >= 0.0 { y } else { -y }
    };
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * (1.0 + erf(mid / std::f64::consts::SQRT_2)) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Planted data: `x[0] = 1` (a bias input), the other dimensions Gaussian with two huge outliers; neuron `i`
/// fires when `g_i · x > 0`, where `g_i` is a rank-`k` shared part plus small noise plus a bias weight on
/// `x[0]` that makes its firing frequency follow a power law with mean about 0.15.
fn planted(n: usize, d: usize, n_out: usize, k: usize, seed: u64) -> (Vec<f32>, Masks) {
    let mut rng = Rng::new(seed);
    let scale: Vec<f64> = (0..d)
        .map(|j| {
            if j == 0 {
                0.0
            } else if j == 3 || j == 17 {
                30.0
            } else {
                1.0
            }
        })
        .collect();
    let offset: Vec<f64> = (0..d)
        .map(|j| {
            if j == 0 {
                1.0
            } else if j == 3 {
                6.0
            } else {
                0.0
            }
        })
        .collect();
    let basis: Vec<f64> = (0..k * d).map(|_| rng.normal()).collect();
    let mut freqs: Vec<f64> =
        (0..n_out).map(|i| (0.75 * (i as f64 + 1.0).powf(-0.35)).clamp(0.01, 0.9)).collect();
    rng.shuffle(&mut freqs);
    let mut gates = vec![0.0f64; n_out * d];
    for (g, &f) in gates.chunks_exact_mut(d).zip(&freqs) {
        let u: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
        for (j, gj) in g.iter_mut().enumerate().skip(1) {
            let low: f64 = (0..k).map(|t| u[t] * basis[t * d + j]).sum::<f64>() / (k as f64).sqrt();
            *gj = (low + 0.05 * rng.normal()) / scale[j];
        }
        let mean: f64 = g.iter().zip(&offset).skip(1).map(|(a, b)| a * b).sum();
        let sd = g.iter().zip(&scale).skip(1).map(|(a, s)| (a * s) * (a * s)).sum::<f64>().sqrt();
        g[0] = sd * probit(f) - mean;
    }
    let mut x = vec![0.0f32; n * d];
    let mut masks = Masks::new(n, n_out);
    let mut xr = vec![0.0f64; d];
    for (r, row) in x.chunks_exact_mut(d).enumerate() {
        for (j, (v, o)) in xr.iter_mut().zip(row.iter_mut()).enumerate() {
            *v = offset[j] + scale[j] * rng.normal();
            *o = *v as f32;
        }
        for (i, g) in gates.chunks_exact(d).enumerate() {
            let z: f64 = g.iter().zip(&xr).map(|(a, b)| a * b).sum();
            masks.set(r, i, z > 0.0);
        }
    }
    (x, masks)
}

fn small_cfg(target_recall: f64) -> TrainConfig {
    TrainConfig { ranks: vec![16, 32], target_recall, seed: 7, ..TrainConfig::default() }
}

#[test]
fn planted_data_reaches_high_recall_at_low_density() {
    let (d, n_out, n) = (64, 256, 5000);
    let (x, masks) = planted(n, d, n_out, 8, 1);
    let density = masks.density();
    assert!((0.08..0.25).contains(&density), "planted density {density}");
    let (p, r) = train_layer(&x, d, &masks, &small_cfg(0.99)).unwrap();
    eprintln!("{r:?}");
    assert!(r.recall >= 0.99, "{r:?}");
    assert!(r.predicted_density <= 1.5 * r.true_density, "{r:?}");
    assert_eq!(p.rank(), r.rank);
    assert_eq!(p.threshold(), r.threshold);
    assert_eq!((r.n_train, r.n_heldout), (4000, 1000));
    assert_eq!(r.tried.last().map(|t| t.0), Some(r.rank));

    // The report is what `evaluate` measures on the held-out split with the returned (folded) predictor.
    let (_, held) = holdout_split(n, 0.2, 7).unwrap();
    let m = evaluate(&p, &gather_rows(&x, d, &held), &masks.select_rows(&held)).unwrap();
    assert_eq!(m.recall(), r.recall);
    assert_eq!(m.predicted_density(), r.predicted_density);
    assert_eq!(m.precision(), r.precision);

    // The threshold is the largest meeting the target: one step up loses recall below it.
    let mut q = p.clone();
    q.set_threshold(next_up(p.threshold()));
    let m_up = evaluate(&q, &gather_rows(&x, d, &held), &masks.select_rows(&held)).unwrap();
    assert!(m_up.recall() < 0.99, "{} at {}", m_up.recall(), q.threshold());
}

#[test]
fn target_recall_095_is_met_with_fewer_predictions() {
    let (d, n_out, n) = (64, 256, 5000);
    let (x, masks) = planted(n, d, n_out, 8, 1);
    let (_, r95) = train_layer(&x, d, &masks, &small_cfg(0.95)).unwrap();
    assert!(r95.recall >= 0.95, "{r95:?}");
    assert!(r95.predicted_density <= 1.5 * r95.true_density, "{r95:?}");
    assert!(r95.precision > 0.6, "{r95:?}");
}

/// The smallest f32 above `t`.
fn next_up(t: f32) -> f32 {
    if t == 0.0 {
        f32::from_bits(1)
    } else if t > 0.0 {
        f32::from_bits(t.to_bits() + 1)
    } else {
        f32::from_bits(t.to_bits() - 1)
    }
}

#[test]
fn threshold_choice_is_exact_on_known_logits() {
    // One sample, six neurons; positives have logits 5, 4, 3, 3, 1.
    let logits = [5.0, 4.0, 3.0, 3.0, 1.0, 10.0];
    let mut m = Masks::new(1, 6);
    for c in 0..5 {
        m.set(0, c, true);
    }
    assert_eq!(choose_threshold(&logits, 6, &m, 0.6), 3.0);
    assert_eq!(choose_threshold(&logits, 6, &m, 0.8), 3.0);
    assert_eq!(choose_threshold(&logits, 6, &m, 0.4), 4.0);
    assert_eq!(choose_threshold(&logits, 6, &m, 0.2), 5.0);
    assert_eq!(choose_threshold(&logits, 6, &m, 1.0), 1.0);
    assert_eq!(choose_threshold(&logits, 6, &m, 0.81), 1.0);
    assert_eq!(choose_threshold(&logits, 6, &Masks::new(1, 6), 0.9), f32::INFINITY);
}

#[test]
fn folded_standardization_gives_the_explicit_logits() {
    let (d, n_out, n) = (24, 40, 50);
    let (x, _) = planted(n, d, n_out, 4, 3);
    let rows: Vec<usize> = (0..n).collect();
    let st = Standardizer::fit(&x, d, &rows);
    // The outlier dimension really is rescaled.
    assert!(st.inv_std[3] < 0.1 && st.inv_std[5] > 0.5, "{:?}", &st.inv_std[..6]);
    let xs = st.apply_rows(&x, d, &rows);
    let dims = Dims { d, r: 8, n: n_out };
    let mut rng = Rng::new(9);
    let params: Vec<f32> = (0..dims.len()).map(|_| rng.normal() as f32 * 0.5).collect();
    let p = fold(&params, &dims, &st).unwrap();
    let folded = batch_logits(&p, &x);
    let mut s = Scratch::new(&dims, n);
    let w = Weights::from_flat(&dims, &params);
    forward(&w, &xs, n, &mut s);
    for (a, b) in folded.iter().zip(&s.z[..n * n_out]) {
        assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // The per-sample path of the predictor (what the runtime calls) sums in the same order as the batched one,
    // so a threshold chosen on batched logits means exactly the same there.
    let (mut h, mut l) = (vec![0.0; 8], vec![0.0; n_out]);
    for r in 0..n {
        p.logits(&x[r * d..(r + 1) * d], &mut h, &mut l);
        assert_eq!(l, folded[r * n_out..(r + 1) * n_out], "sample {r}");
    }
}

#[test]
fn fast_sigmoid_and_softplus_match_the_exact_ones() {
    for i in -2000..=2000 {
        let z = i as f32 * 0.05;
        let exact = 1.0 / (1.0 + (-f64::from(z)).exp());
        let got = f64::from(sigmoid(z));
        assert!((got - exact).abs() <= 1e-5 * exact + 1e-30, "sigmoid({z}) = {got}, want {exact}");
    }
    assert_eq!(sigmoid(f32::INFINITY), 1.0);
    assert!(sigmoid(-200.0) < 1e-37);
    assert!((f64::from(exp_nonpositive(-1.0)) - (-1.0f64).exp()).abs() < 1e-6);
    for i in -2000..=2000 {
        let z = i as f32 * 0.05;
        let exact = bce(z, false, 1.0);
        let got = f64::from(softplus(z));
        assert!((got - exact).abs() <= 2e-6 * (1.0 + exact), "softplus({z}) = {got}, want {exact}");
    }
    assert_eq!(sum_f32(&[1.0; 19]), 19.0);
}

#[test]
fn gradient_matches_finite_differences() {
    let dims = Dims { d: 5, r: 3, n: 7 };
    let rows = 6;
    let mut rng = Rng::new(11);
    let params: Vec<f32> = (0..dims.len()).map(|_| rng.normal() as f32 * 0.7).collect();
    let x: Vec<f32> = (0..rows * dims.d).map(|_| rng.normal() as f32).collect();
    let mut m = Masks::new(rows, dims.n);
    for r in 0..rows {
        for c in 0..dims.n {
            m.set(r, c, rng.uniform() < 0.3);
        }
    }
    let labels: Vec<&[u64]> = (0..rows).map(|r| m.row_words(r)).collect();
    let pw: Vec<f32> = (0..dims.n).map(|i| 1.0 + i as f32).collect();
    let mut s = Scratch::with_backward(&dims, rows);
    let mut grad = vec![0.0f32; dims.len()];
    let loss = loss_grad(&dims, &params, &x, &labels, &pw, &mut s, &mut grad, true);
    assert!(loss > 0.0);
    let mut scratch = vec![0.0f32; dims.len()];
    let mut eval = |p: &[f32]| loss_grad(&dims, p, &x, &labels, &pw, &mut s, &mut scratch, true);
    let eps = 1e-2f32;
    let mut checked = 0;
    for i in 0..dims.len() {
        let mut p = params.clone();
        p[i] += eps;
        let up = eval(&p);
        p[i] -= 2.0 * eps;
        let down = eval(&p);
        let num = (up - down) / (2.0 * f64::from(eps));
        let ana = f64::from(grad[i]);
        assert!((num - ana).abs() <= 1e-2 * (1.0 + ana.abs()), "param {i}: numeric {num} analytic {ana}");
        checked += usize::from(ana.abs() > 1e-3);
    }
    // Most parameters have a real gradient, so the check is not vacuous.
    assert!(checked > dims.len() / 2, "{checked}");
}

#[test]
fn training_is_deterministic_and_thread_independent() {
    let (d, n_out, n) = (32, 96, 600);
    let (x, masks) = planted(n, d, n_out, 4, 5);
    let cfg = TrainConfig { ranks: vec![8, 16], epochs: 4, seed: 3, threads: 1, ..TrainConfig::default() };
    let a = train_layer(&x, d, &masks, &cfg).unwrap();
    let b = train_layer(&x, d, &masks, &TrainConfig { threads: 2, ..cfg.clone() }).unwrap();
    assert_eq!(a, b);
    let c = train_layer(&x, d, &masks, &TrainConfig { seed: 4, ..cfg }).unwrap();
    assert_ne!(a.0, c.0);
}

#[test]
fn heldout_samples_never_reach_the_weights() {
    let (d, n_out, n) = (32, 96, 500);
    let (x, masks) = planted(n, d, n_out, 4, 6);
    let cfg = TrainConfig { ranks: vec![16], epochs: 3, patience: 0, seed: 21, ..TrainConfig::default() };
    let (train, held) = holdout_split(n, cfg.holdout, cfg.seed).unwrap();
    assert_eq!((train.len(), held.len()), (400, 100));
    let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
    // Scramble the held-out inputs and flip their labels.
    let (mut x2, mut m2) = (x.clone(), masks.clone());
    for &r in &held {
        for j in 0..d {
            x2[r * d + j] = -3.0 * x[r * d + j] + 1.0;
        }
        for c in 0..n_out {
            m2.set(r, c, !masks.get(r, c));
        }
    }
    let (p1, r1) = train_layer(&x, d, &masks, &cfg).unwrap();
    let (p2, r2) = train_layer(&x2, d, &m2, &cfg).unwrap();
    assert_eq!((p1.w1(), p1.b1(), p1.w2(), p1.b2()), (p2.w1(), p2.b1(), p2.w2(), p2.b2()));
    // Only the held-out measurements differ: they are taken on the flipped labels.
    assert_eq!(r1.epochs_run, 3);
    assert!((r1.true_density + r2.true_density - 1.0).abs() < 1e-12, "{r1:?} {r2:?}");
    assert_ne!(r1.threshold, r2.threshold);
}

#[test]
fn rank_search_stops_early_or_keeps_the_sparsest() {
    let (d, n_out, n) = (32, 96, 600);
    let (x, masks) = planted(n, d, n_out, 4, 8);
    let base = TrainConfig { ranks: vec![16, 4, 8], epochs: 3, seed: 1, ..TrainConfig::default() };
    let (p, r) =
        train_layer(&x, d, &masks, &TrainConfig { max_density_ratio: 100.0, ..base.clone() }).unwrap();
    assert_eq!((p.rank(), r.tried.len()), (4, 1));
    let (p, r) = train_layer(&x, d, &masks, &TrainConfig { max_density_ratio: 1e-9, ..base }).unwrap();
    assert_eq!(r.tried.iter().map(|t| t.0).collect::<Vec<_>>(), vec![4, 8, 16]);
    let sparsest = r.tried.iter().min_by(|a, b| a.2.total_cmp(&b.2)).unwrap();
    assert_eq!(p.rank(), sparsest.0);
    assert_eq!(r.predicted_density, sparsest.2);
    // Ranks are clipped to twice the input width.
    let (p, _) = train_layer(
        &x[..600 * 3],
        3,
        &masks,
        &TrainConfig { ranks: vec![64], epochs: 1, ..TrainConfig::default() },
    )
    .unwrap();
    assert_eq!(p.rank(), 6);
}

#[test]
fn masks_store_bits_and_count() {
    let mut m = Masks::new(3, 70);
    m.set(0, 0, true);
    m.set(0, 69, true);
    m.set(2, 64, true);
    m.set(2, 1, true);
    m.set(2, 1, false);
    assert!(m.get(0, 69) && m.get(2, 64) && !m.get(2, 1) && !m.get(1, 0));
    assert_eq!(m.row_words(0), &[1, 1 << 5]);
    assert_eq!(m.count_ones(), 3);
    assert!((m.density() - 3.0 / 210.0).abs() < 1e-12);
    let f = m.column_frequency();
    assert_eq!((f[0], f[64], f[69], f[1]), (1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0));
    let s = m.select_rows(&[2, 0]);
    assert!(s.get(0, 64) && s.get(1, 69) && s.n_rows() == 2);
    assert_eq!(Masks::from_words(3, 70, m.words().to_vec()).unwrap(), m);
    assert_eq!(
        Masks::from_words(3, 70, vec![0; 5]).unwrap_err(),
        PredictorError::Shape { what: "mask words", got: 5, expected: 6 }
    );
    assert_eq!(
        Masks::from_words(1, 70, vec![0, 1 << 6]).unwrap_err(),
        PredictorError::MaskPadding { row: 0, n_cols: 70 }
    );
    assert_eq!(Masks::new(0, 0).density(), 0.0);
}

#[test]
fn bad_input_gives_typed_errors() {
    let (d, n_out, n) = (8, 16, 40);
    let (x, masks) = planted(n, d, n_out, 2, 2);
    let cfg = TrainConfig { ranks: vec![4], epochs: 1, ..TrainConfig::default() };
    let e = |x: &[f32], d, m: &Masks, c: &TrainConfig| train_layer(x, d, m, c).unwrap_err();
    assert_eq!(
        e(&x[1..], d, &masks, &cfg),
        PredictorError::Shape { what: "x", got: n * d - 1, expected: n * d }
    );
    assert!(matches!(e(&[], 0, &Masks::new(0, 16), &cfg), PredictorError::Empty { .. }));
    assert!(matches!(e(&x, d, &Masks::new(n, 0), &cfg), PredictorError::Empty { .. }));
    assert_eq!(
        e(&x[..d], d, &masks.select_rows(&[0]), &cfg),
        PredictorError::TooFewSamples { got: 1, needed: 2 }
    );
    for t in [0.0, -0.5, 1.5, f64::NAN] {
        let err = e(&x, d, &masks, &TrainConfig { target_recall: t, ..cfg.clone() });
        assert!(matches!(err, PredictorError::TargetRecall(v) if v.to_bits() == t.to_bits()), "{err:?}");
    }
    for bad in [
        TrainConfig { ranks: vec![], ..cfg.clone() },
        TrainConfig { ranks: vec![4, 0], ..cfg.clone() },
        TrainConfig { epochs: 0, ..cfg.clone() },
        TrainConfig { batch: 0, ..cfg.clone() },
        TrainConfig { lr: -1.0, ..cfg.clone() },
        TrainConfig { holdout: 1.0, ..cfg.clone() },
        TrainConfig { holdout: 0.0, ..cfg.clone() },
        TrainConfig { max_density_ratio: f64::NAN, ..cfg.clone() },
    ] {
        assert!(matches!(e(&x, d, &masks, &bad), PredictorError::Config { .. }), "{bad:?}");
    }
    let mut xn = x.clone();
    xn[5] = f32::NAN;
    assert!(matches!(e(&xn, d, &masks, &cfg), PredictorError::Config { .. }));

    let (p, _) = train_layer(&x, d, &masks, &cfg).unwrap();
    assert_eq!(
        evaluate(&p, &x, &Masks::new(n, 15)).unwrap_err(),
        PredictorError::Shape { what: "mask columns", got: 15, expected: 16 }
    );
    assert_eq!(
        evaluate(&p, &x[..d], &masks).unwrap_err(),
        PredictorError::Shape { what: "x", got: d, expected: n * d }
    );
    assert_eq!(holdout_split(1, 0.2, 0).unwrap_err(), PredictorError::TooFewSamples { got: 1, needed: 2 });
}

#[test]
fn gram_schmidt_gives_orthonormal_columns() {
    let (d, p) = (20, 5);
    let mut rng = Rng::new(4);
    let mut q: Vec<f32> = (0..d * p).map(|_| rng.normal() as f32).collect();
    // Make column 3 a copy of column 1: it must come out zero, not NaN.
    for j in 0..d {
        q[j * p + 3] = q[j * p + 1];
    }
    orthonormalize_columns(&mut q, d, p);
    for a in 0..p {
        for b in 0..p {
            let dot: f32 = (0..d).map(|j| q[j * p + a] * q[j * p + b]).sum();
            let want = if a == b && a != 3 { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-5, "columns {a} {b}: {dot}");
        }
    }
}

#[test]
fn spectral_init_points_w1_at_the_label_subspace() {
    // Labels depend on x only through dimensions 1 and 2: W1 rows must start (almost) inside that plane.
    let (d, n_out, n) = (16, 40, 800);
    let mut rng = Rng::new(12);
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let mut masks = Masks::new(n, n_out);
    for r in 0..n {
        for c in 0..n_out {
            let a = (c as f32 * 0.7).cos() * x[r * d + 1] + (c as f32 * 0.7).sin() * x[r * d + 2];
            masks.set(r, c, a > 0.5);
        }
    }
    let rows: Vec<usize> = (0..n).collect();
    let st = Standardizer::fit(&x, d, &rows);
    let data = Data {
        d,
        n: n_out,
        x_train: st.apply_rows(&x, d, &rows),
        m_train: masks.clone(),
        x_held: Vec::new(),
        m_held: Masks::new(0, n_out),
        pos_weight: vec![1.0; n_out],
    };
    let dims = Dims { d, r: 4, n: n_out };
    let mut params = vec![0.0f32; dims.len()];
    spectral_init(&data, &masks.column_counts(), &dims, &mut params, &mut Rng::new(1));
    for row in params[..4 * d].chunks_exact(d) {
        let norm2: f32 = row.iter().map(|v| v * v).sum();
        let plane = row[1] * row[1] + row[2] * row[2];
        assert!((norm2 - 1.0).abs() < 1e-4 && plane > 0.9, "row {row:?}");
    }
}
