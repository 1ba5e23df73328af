//! Tests of the planner against brute force, simulation and its own invariants.

use proptest::prelude::*;

use crate::planner::{allocate, lru_hits, page_reads, pick_probability};
use crate::*;

/// A model of `n_layers` layers of `n_ff` neurons with Zipf-like frequencies that differ by layer.
fn input(n_layers: usize, n_ff: usize, predicting: bool) -> PlanInput {
    let layers: Vec<LayerShape> = (0..n_layers)
        .map(|l| {
            let frequency: Vec<f32> =
                (0..n_ff).map(|i| 0.9 / (1.0 + i as f32 / (4.0 + 3.0 * l as f32))).collect();
            let density = frequency.iter().map(|&f| f as f64).sum::<f64>() / n_ff as f64;
            LayerShape {
                n_ff,
                cluster_neurons: 16,
                gate_row_bytes: 576,
                bundle_bytes: 1152,
                stride: (16 * 1728u64).div_ceil(4096) * 4096,
                frequency,
                use_probability: 1.0,
                gate_density: if predicting { (1.5 * density).min(1.0) } else { 1.0 },
            }
        })
        .collect();
    PlanInput {
        model: "toy".into(),
        source_bytes: 64 << 20,
        process_bytes: 8 << 20,
        attention_bytes: 4 << 20,
        attention_tensors: 4 * n_layers,
        head: HeadShape { n_rows: 1000, row_bytes: 1088, tied: true },
        kv_bytes: 2 << 20,
        scratch_bytes: 1 << 20,
        predictor_bytes: if predicting { 1 << 20 } else { 0 },
        predicting,
        layers,
        cache: CacheCosts { entry_overhead: 48, key_overhead: 4, fixed_align: 64 },
        threads: 2,
    }
}

fn minimum(inp: &PlanInput) -> u64 {
    match plan(inp, &sample_profile(), &PlanOptions::new(1)) {
        Err(PlanError::BudgetTooSmall { budget: 1, minimum, .. }) => minimum,
        other => panic!("expected BudgetTooSmall, got {other:?}"),
    }
}

fn ffn_bytes(inp: &PlanInput) -> u64 {
    inp.layers.iter().map(|l| l.n_ff as u64 * (l.gate_row_bytes + l.bundle_bytes)).sum()
}

#[test]
fn budget_below_minimum_names_the_minimum_and_the_minimum_runs() {
    let inp = input(4, 512, true);
    let min = minimum(&inp);
    let err = plan(&inp, &sample_profile(), &PlanOptions::new(min - 1)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("at least {:.1} MiB", min as f64 / (1 << 20) as f64)), "{msg}");
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(min)).unwrap();
    assert_eq!(p.memory.minimum(), min);
    assert_eq!(p.memory.total(), min);
    assert_eq!(p.head_rows, 0);
    assert!(p.layers.iter().all(|l| l.pinned_bundles == 0 && l.pinned_gate_clusters == 0));
    // Everything is read: the whole head, every gate row the predictor picks and every firing bundle.
    assert!(p.predicted.mb_read_per_token > 1.0, "{:?}", p.predicted);
}

/// The kernel's page tables of the budget (a memory cgroup charges them) are kept out of what the plan spends.
#[test]
fn the_budget_keeps_its_page_tables() {
    let inp = input(4, 512, false);
    let budget = minimum(&inp) + ffn_bytes(&inp) / 2;
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(budget)).unwrap();
    assert_eq!(p.memory.page_tables, budget.div_ceil(512));
    assert!(p.memory.total() <= budget);
    assert!(p.memory.fixed_detail().contains("page tables"), "{}", p.memory.fixed_detail());
    // The minimum holds its own.
    let min = minimum(&inp);
    let at_min = plan(&inp, &sample_profile(), &PlanOptions::new(min)).unwrap();
    assert!(at_min.memory.page_tables >= min / 512 && at_min.memory.page_tables > 0);
}

#[test]
fn everything_fits_pins_everything_and_reads_nothing() {
    for predicting in [false, true] {
        let inp = input(3, 256, predicting);
        let budget = minimum(&inp) + ffn_bytes(&inp) + 1000 * 1088 + (1 << 20);
        let p = plan(&inp, &sample_profile(), &PlanOptions::new(budget)).unwrap();
        assert_eq!(p.head_rows, 1000);
        for l in &p.layers {
            assert_eq!((l.pinned_bundles, l.pinned_gate_clusters), (256, 16), "{l:?}");
            assert_eq!(l.cold_entries, 0);
        }
        assert_eq!(p.predicted.mb_read_per_token, 0.0);
        assert_eq!(p.predicted.hit_rate, 1.0);
        assert!((p.predicted.tokens_per_s - p.predicted.in_memory_tokens_per_s).abs() < 1e-9);
        assert!(p.memory.total() <= budget);
    }
}

#[test]
fn larger_budgets_pin_more_and_read_less() {
    for predicting in [false, true] {
        let inp = input(4, 512, predicting);
        let min = minimum(&inp);
        let span = ffn_bytes(&inp) + 1000 * 1088;
        let mut prev: Option<Plan> = None;
        for step in 0..=44 {
            let b = min + span * step / 40;
            let p = plan(&inp, &sample_profile(), &PlanOptions::new(b)).unwrap();
            assert!(p.memory.total() <= b, "step {step}: {} > {b}", p.memory.total());
            if let Some(q) = &prev {
                assert!(p.head_rows >= q.head_rows, "step {step}");
                // The plan minimizes token time (a layer may read a few more bytes in larger, faster reads).
                // Where a layer's unpinned share falls below WHOLE_RECORD_DENSITY it switches from whole
                // records to two-phase reads, with a round trip more: a small step down is allowed there.
                assert!(
                    p.predicted.tokens_per_s >= q.predicted.tokens_per_s * 0.95,
                    "step {step}: {} -> {} t/s",
                    q.predicted.tokens_per_s,
                    p.predicted.tokens_per_s
                );
            }
            prev = Some(p);
        }
        assert_eq!(prev.unwrap().predicted.mb_read_per_token, 0.0);
    }
}

#[test]
fn the_queue_depth_is_the_fastest_that_fits() {
    // A probe that rates depth 64 three times faster than depth 16 for every read size (as a noisy probe can).
    let mut deep = sample_profile();
    for r in deep.reads.iter_mut().filter(|r| r.queue_depth == 64) {
        r.mb_per_s *= 3.0;
    }
    let inp = input(4, 512, false);
    let at = |b: u64, qd: Option<usize>| {
        plan(&inp, &deep, &PlanOptions { queue_depth: qd, ..PlanOptions::new(b) })
    };
    let min_of = |qd: usize| match at(1, Some(qd)) {
        Err(PlanError::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!("expected BudgetTooSmall, got {other:?}"),
    };
    let (min4, min64) = (min_of(4), min_of(64));
    assert!(min4 < min64, "deeper queues hold more buffers: {min4} against {min64}");
    // Below every depth's minimum, the error names the smallest minimum; at it, the shallow queue runs.
    match at(1, None) {
        Err(PlanError::BudgetTooSmall { minimum, .. }) => assert_eq!(minimum, min4),
        other => panic!("expected BudgetTooSmall, got {other:?}"),
    }
    let tight = at(min4, None).unwrap().io_queue_depth;
    assert!(tight < 64 && min_of(tight) == min4, "depth {tight}");
    // With room for its buffers, the deep queue is taken where it predicts a faster token, and says why.
    let roomy = at(min64 + ffn_bytes(&inp) / 4, None).unwrap();
    assert_eq!(roomy.io_queue_depth, 64, "{:?}", roomy.reasoning);
    assert!(roomy.reasoning[0].starts_with("I/O depth 64"), "{:?}", roomy.reasoning);
    let shallow = at(min64 + ffn_bytes(&inp) / 4, Some(4)).unwrap();
    assert!(roomy.predicted.tokens_per_s > 1.1 * shallow.predicted.tokens_per_s);
    // On the sample profile (depth 64 at most 5% above 16), the deeper queue is not worth its buffers.
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(min64 + ffn_bytes(&inp) / 4)).unwrap();
    assert!(p.io_queue_depth <= 16, "{}", p.io_queue_depth);
}

#[test]
fn thresholds_pin_gates_before_cold_bundles_and_predictors_pin_hot_neurons_first() {
    // With thresholds every gate row is read every token: a gate byte saves a read byte every token, a cold
    // bundle byte only when its neuron fires.
    let inp = input(2, 512, false);
    let min = minimum(&inp);
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(min + 1000 * 1088 + 300_000)).unwrap();
    assert!(p.memory.pinned_gates > p.memory.pinned_bundles, "{:?}", p.memory);
    // With predictors a gate row is read only when picked: the hottest neurons' rows and bundles go first.
    let inp = input(2, 512, true);
    let min = minimum(&inp);
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(min + 1000 * 1088 + 300_000)).unwrap();
    assert!(p.memory.pinned_bundles > 0 && p.memory.pinned_gates > 0, "{:?}", p.memory);
    for l in &p.layers {
        // The hottest neurons come first: nothing cold is pinned while a hotter one of its layer is not.
        assert!(l.pinned_bundles < 512 && l.pinned_gate_clusters < 32, "{l:?}");
    }
}

#[test]
fn switches_are_planned() {
    let inp = input(3, 256, false);
    let b = minimum(&inp) + ffn_bytes(&inp) / 2 + 1000 * 1088;
    let no_cache = PlanOptions { cache: false, ..PlanOptions::new(b) };
    let p = plan(&inp, &sample_profile(), &no_cache).unwrap();
    assert!(p.layers.iter().all(|l| l.pinned_bundles + l.pinned_gate_clusters + l.cold_entries == 0));
    let flash = PlanOptions { policy: CachePolicy::LlmFlash { window: 5 }, ..PlanOptions::new(b) };
    let p = plan(&inp, &sample_profile(), &flash).unwrap();
    assert!(p.layers.iter().all(|l| l.pinned_bundles + l.pinned_gate_clusters == 0));
    assert!(p.memory.cold > 0);
    let serial = PlanOptions { pipeline: false, ..PlanOptions::new(b) };
    let overlapped = plan(&inp, &sample_profile(), &PlanOptions::new(b)).unwrap();
    let serial = plan(&inp, &sample_profile(), &serial).unwrap();
    assert!(serial.predicted.tokens_per_s < overlapped.predicted.tokens_per_s);
    assert_eq!(serial.read_ahead_bytes, 0);
}

#[test]
fn predicted_speed_lies_between_serial_and_overlapped_bounds() {
    for predicting in [true, false] {
        let inp = input(4, 512, predicting);
        let d = sample_profile();
        let b = minimum(&inp) + ffn_bytes(&inp) / 3;
        let p = plan(&inp, &d, &PlanOptions::new(b)).unwrap();
        let t = 1.0 / p.predicted.tokens_per_s;
        let compute = 1.0 / p.predicted.in_memory_tokens_per_s;
        let best_io = p.predicted.mb_read_per_token / d.peak_read_mb_per_s();
        let worst_io = p.predicted.mb_read_per_token / d.read_throughput(4096, 1);
        assert!(t >= compute.max(best_io) - 1e-12, "{t} vs {compute} / {best_io}");
        assert!(t <= compute + worst_io + 4.0 * 0.01, "{t} vs {compute} + {worst_io}");
    }
}

#[test]
fn threads_are_capped_by_cpus() {
    let inp = PlanInput { threads: 64, ..input(2, 64, true) };
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(minimum(&inp) + (1 << 20))).unwrap();
    assert_eq!(p.compute_threads, 4);
    assert!(p.render().contains("4 compute threads"));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let d = sample_profile();
    let ok = PlanOptions::new(1 << 40);
    let mut inp = input(2, 64, true);
    inp.layers[0].frequency.pop();
    assert!(matches!(plan(&inp, &d, &ok), Err(PlanError::BadInput { .. })));
    let mut inp = input(2, 64, true);
    inp.layers[1].frequency[3] = 1.5;
    assert!(matches!(plan(&inp, &d, &ok), Err(PlanError::BadInput { .. })));
    let mut inp = input(2, 64, true);
    inp.layers[0].gate_density = f64::NAN;
    assert!(matches!(plan(&inp, &d, &ok), Err(PlanError::BadInput { .. })));
    let mut inp = input(2, 64, true);
    inp.layers[0].stride = 4096;
    assert!(matches!(plan(&inp, &d, &ok), Err(PlanError::BadInput { .. })));
    let inp = PlanInput { threads: 0, ..input(2, 64, true) };
    assert!(matches!(plan(&inp, &d, &PlanOptions::new(1 << 40)), Err(PlanError::BadInput { .. })));
    let inp = input(2, 64, true);
    let empty = DeviceProfile { reads: vec![], ..sample_profile() };
    assert!(matches!(plan(&inp, &empty, &ok), Err(PlanError::IncompleteProfile { .. })));
}

#[test]
fn json_round_trip_and_version_check() {
    let inp = input(3, 128, true);
    let p = plan(&inp, &sample_profile(), &PlanOptions::new(minimum(&inp) + (3 << 20))).unwrap();
    assert_eq!(Plan::from_json(&p.to_json(), "t").unwrap(), p);
    let mut v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
    v["version"] = serde_json::json!(1);
    assert!(matches!(
        Plan::from_json(&v.to_string(), "t"),
        Err(PlanError::Version { found: 1, expected: PLAN_VERSION, .. })
    ));
    v["version"] = serde_json::json!(PLAN_VERSION);
    v["format"] = serde_json::json!("pinion-device");
    assert!(matches!(Plan::from_json(&v.to_string(), "t"), Err(PlanError::BadFile { .. })));
}

#[test]
fn reference_profile_is_said() {
    let inp = input(2, 64, false);
    let d = DeviceProfile::reference();
    let min = match plan(&inp, &d, &PlanOptions::new(1)) {
        Err(PlanError::BudgetTooSmall { minimum, .. }) => minimum,
        other => panic!("{other:?}"),
    };
    let p = plan(&inp, &d, &PlanOptions::new(min + (1 << 20))).unwrap();
    assert_eq!(p.device, "reference");
    assert!(p.render().contains("no measured device profile"), "{}", p.render());
    assert!(p.reasoning.iter().any(|r| r.contains("no measured profile")));
}

/// An LRU of `c` entries over items requested independently each token with probabilities `a` (in a fixed
/// order within the token, as a decode step visits neurons), simulated: the hit share of each item.
fn simulate_lru(a: &[f64], c: usize, tokens: usize, seed: u64) -> Vec<f64> {
    let mut state = seed | 1;
    let mut rand = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut lru: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let (mut hits, mut reqs) = (vec![0u64; a.len()], vec![0u64; a.len()]);
    for t in 0..tokens {
        for (i, &p) in a.iter().enumerate() {
            if rand() >= p {
                continue;
            }
            let hit = if let Some(pos) = lru.iter().position(|&x| x == i) {
                lru.remove(pos);
                true
            } else {
                false
            };
            lru.push_front(i);
            lru.truncate(c);
            if t >= tokens / 10 {
                reqs[i] += 1;
                hits[i] += u64::from(hit);
            }
        }
    }
    hits.iter().zip(&reqs).map(|(&h, &r)| if r == 0 { 0.0 } else { h as f64 / r as f64 }).collect()
}

#[test]
fn lru_estimate_matches_a_simulated_lru() {
    // A Zipf-like tail of neuron firing probabilities.
    let a: Vec<f64> = (0..200).map(|i| 0.6 / (1.0 + i as f64 / 8.0)).collect();
    for c in [5, 10, 20, 40, 100] {
        let e = lru_hits(&a, c);
        let sim = simulate_lru(&a, c, 4000, 42 + c as u64);
        let s: f64 = sim.iter().zip(&a).map(|(h, p)| h * p).sum();
        assert!(
            (e - s).abs() <= 0.08 * s + 0.03,
            "capacity {c}: estimate {e:.3} vs simulated {s:.3} hits per token"
        );
    }
    // A cyclic scan (every item every token) larger than the LRU never hits; one that fits always does.
    let all = vec![1.0; 50];
    assert!(lru_hits(&all, 49) < 1e-6);
    assert!(simulate_lru(&all, 49, 50, 1).iter().all(|&h| h == 0.0));
    assert_eq!(lru_hits(&all, 50), 50.0);
}

/// The expected bytes a token does not read thanks to pinned units, with two-phase values: a gate row is worth
/// its bytes times the chance it is needed, a bundle its bytes times its neuron's firing probability.
fn saved(inp: &PlanInput, gates: &[usize], bundles: &[usize]) -> f64 {
    inp.layers
        .iter()
        .enumerate()
        .map(|(l, ls)| {
            let d = ls.frequency.iter().map(|&f| f as f64).sum::<f64>() / ls.n_ff as f64;
            let gp = |i: usize| {
                if inp.predicting { (ls.frequency[i] as f64 * ls.gate_density / d).min(1.0) } else { 1.0 }
            };
            let c = ls.cluster_neurons;
            let g: f64 = (0..(gates[l] * c).min(ls.n_ff)).map(gp).sum::<f64>() * ls.gate_row_bytes as f64;
            let b: f64 =
                ls.frequency[..bundles[l]].iter().map(|&f| f as f64).sum::<f64>() * ls.bundle_bytes as f64;
            g + b
        })
        .sum()
}

#[test]
fn greedy_pinning_is_within_one_unit_of_the_best() {
    for predicting in [false, true] {
        let mut inp = input(2, 32, predicting);
        for ls in &mut inp.layers {
            ls.cluster_neurons = 8;
        }
        let opts = PlanOptions::new(0);
        for budget in (0..=120_000u64).step_by(7_919) {
            let a = allocate(
                &inp,
                &freqs(&inp),
                &|l, i| gate_p(&inp, l, i),
                &[false; 2],
                budget + 1000 * 1088,
                0.0,
                &opts,
            );
            let used: u64 = (0..2).map(|l| a.gates[l] as u64 * 8 * 576 + a.bundles[l] as u64 * 1152).sum();
            assert!(used <= budget, "{used} > {budget}");
            let got = saved(&inp, &a.gates, &a.bundles);
            // Brute force over every pair of prefixes per layer.
            let mut best = 0.0f64;
            for g0 in 0..=4 {
                for g1 in 0..=4 {
                    for b0 in 0..=32 {
                        for b1 in 0..=32 {
                            let bytes = (g0 + g1) as u64 * 8 * 576 + (b0 + b1) as u64 * 1152;
                            if bytes <= budget {
                                best = best.max(saved(&inp, &[g0, g1], &[b0, b1]));
                            }
                        }
                    }
                }
            }
            // Greedy by value per byte is within one unit (the largest, a gate block) of the knapsack optimum.
            let unit = 8.0 * 576.0;
            assert!(
                got >= best - unit - 1e-6 && got <= best + 1e-6,
                "budget {budget}: greedy {got} vs best {best}"
            );
        }
    }
}

fn freqs(inp: &PlanInput) -> Vec<Vec<f64>> {
    inp.layers.iter().map(|l| l.frequency.iter().map(|&f| f as f64).collect()).collect()
}

fn gate_p(inp: &PlanInput, l: usize, i: usize) -> f64 {
    let ls = &inp.layers[l];
    let d = ls.frequency.iter().map(|&f| f as f64).sum::<f64>() / ls.n_ff as f64;
    if inp.predicting { (ls.frequency[i] as f64 * ls.gate_density / d).min(1.0) } else { 1.0 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the shapes, statistics and budget: the plan never spends more than the budget, pins
    /// prefixes within the layer, and its counts are in range.
    #[test]
    fn plans_respect_the_budget(
        n_layers in 1usize..5,
        n_ff in 1usize..300,
        c in 1usize..40,
        skew in 0.5f32..20.0,
        predicting in any::<bool>(),
        extra in 0u64..(4 << 20),
        flash in any::<bool>(),
    ) {
        let mut inp = input(n_layers, n_ff, predicting);
        for (l, ls) in inp.layers.iter_mut().enumerate() {
            ls.cluster_neurons = c;
            ls.stride = ((c.min(n_ff)) as u64 * 1728).div_ceil(4096) * 4096;
            ls.frequency = (0..n_ff).map(|i| 0.95 / (1.0 + i as f32 / (skew + l as f32))).collect();
        }
        let min = minimum(&inp);
        let policy = if flash { CachePolicy::LlmFlash { window: 3 } } else { CachePolicy::PowerInfer2 };
        let opts = PlanOptions { policy, ..PlanOptions::new(min + extra) };
        let p = plan(&inp, &sample_profile(), &opts).unwrap();
        prop_assert!(p.memory.total() <= min + extra);
        prop_assert!(p.head_rows <= 1000);
        for (l, lp) in p.layers.iter().enumerate() {
            prop_assert!(lp.pinned_bundles <= n_ff);
            prop_assert!(lp.pinned_gate_clusters <= n_ff.div_ceil(c));
            prop_assert!(lp.cold_entries <= n_ff - lp.pinned_bundles, "layer {}: {:?}", l, lp);
        }
        prop_assert!(p.predicted.tokens_per_s.is_finite() && p.predicted.tokens_per_s > 0.0);
        prop_assert!((0.0..=1.0).contains(&p.predicted.hit_rate));
    }
}

/// The I/O engine's merging (`pinion_io`'s `plan_reads`): requests sorted by offset, each widened to whole
/// pages, merged into the previous read when its pages touch or overlap it. Returns (bytes, reads).
fn merged_reads(mut reqs: Vec<(u64, u64)>) -> (u64, u64) {
    reqs.sort_unstable();
    let mut ops: Vec<(u64, u64)> = Vec::new();
    for (off, len) in reqs {
        let (start, end) = (off / 4096 * 4096, (off + len).div_ceil(4096) * 4096);
        match ops.last_mut() {
            Some(op) if start <= op.1 => op.1 = op.1.max(end),
            _ => ops.push((start, end)),
        }
    }
    (ops.iter().map(|o| o.1 - o.0).sum(), ops.len() as u64)
}

#[test]
fn page_reads_match_the_engines_merging() {
    // Gate rows of 2,304 bytes and bundles of 6,656 (the 7B shape's Q4_0 rows and Q8_0 down columns) and
    // SmolLM2's 648-byte rows, with skewed probabilities: the expectation against 20,000 sampled phases.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    for (base, len, n) in [(0u64, 2304u64, 32usize), (32 * 2304, 6656, 32), (0, 648, 16)] {
        let items: Vec<(u64, u64, f64)> =
            (0..n).map(|j| (base + j as u64 * len, len, 0.9 / (1.0 + j as f64 / 3.0))).collect();
        let (bytes, runs) = page_reads(&items, &mut Vec::new());
        let trials = 20_000;
        let (mut sb, mut sr) = (0u64, 0u64);
        for _ in 0..trials {
            let reqs: Vec<(u64, u64)> =
                items.iter().filter(|it| uniform() < it.2).map(|it| (it.0, it.1)).collect();
            let (b, r) = merged_reads(reqs);
            sb += b;
            sr += r;
        }
        let (mb, mr) = (sb as f64 / trials as f64, sr as f64 / trials as f64);
        assert!(
            (bytes - mb).abs() < 0.02 * mb,
            "{len} B items: {bytes:.0} bytes expected, {mb:.0} simulated"
        );
        assert!((runs - mr).abs() < 0.02 * mr, "{len} B items: {runs:.3} reads expected, {mr:.3} simulated");
    }
    // Nothing read, and one item always read.
    assert_eq!(page_reads(&[(100, 5000, 0.0)], &mut Vec::new()), (0.0, 0.0));
    assert_eq!(page_reads(&[(100, 5000, 1.0)], &mut Vec::new()), (8192.0, 1.0));
}

#[test]
fn a_predictors_picks_add_up_and_spread_over_the_cold_neurons() {
    let p: Vec<f64> = (0..1000).map(|i| 0.95 / (1.0 + i as f64 / 20.0)).collect();
    let firing = p.iter().sum::<f64>() / p.len() as f64;
    for picked in [0.5 * firing, firing, 2.0 * firing, 0.5, 1.0] {
        let q: Vec<f64> = p.iter().map(|&pi| pick_probability(pi, picked, firing)).collect();
        let total = q.iter().sum::<f64>() / q.len() as f64;
        assert!((total - picked).abs() < 1e-9, "picked {picked}: {total}");
        assert!(q.iter().all(|&x| (0.0..=1.0).contains(&x)));
        if picked >= firing {
            // Every neuron is picked at least as often as it fires, and the coldest get the extra picks too.
            assert!(q.iter().zip(&p).all(|(&x, &pi)| x >= pi - 1e-12));
            assert!(q[999] - p[999] >= 0.9 * (picked - firing), "{} against {}", q[999], p[999]);
        }
    }
}

/// Experts: units a token uses only when routed to them. Four experts, each routed 1/4 of the time with the
/// neurons of a dense layer firing as often once routed, read (at the minimum, nothing pinned) a quarter of the
/// bytes per token of four dense layers, and pinning goes to the most used experts first.
#[test]
fn experts_are_read_and_pinned_by_how_often_they_are_routed() {
    let dense = input(4, 256, false);
    let mut moe = dense.clone();
    let use_p = [0.4, 0.3, 0.2, 0.1];
    for (l, p) in moe.layers.iter_mut().zip(use_p) {
        l.frequency = dense.layers[0].frequency.iter().map(|&f| f * p as f32).collect();
        l.use_probability = p;
    }
    let mut dense4 = dense.clone();
    for l in &mut dense4.layers {
        l.frequency = dense.layers[0].frequency.clone();
    }
    let min = minimum(&moe);
    let at_min = |inp: &PlanInput| plan(inp, &sample_profile(), &PlanOptions::new(min)).unwrap().predicted;
    let (m, d) = (at_min(&moe), at_min(&dense4));
    let head = 1000.0 * 1088.0 / 1e6;
    let ratio = (m.mb_read_per_token - head) / (d.mb_read_per_token - head);
    assert!((ratio - 0.25).abs() < 0.02, "experts read {ratio} of the dense layers' bytes: {m:?} {d:?}");
    // With room for some of the FFN beside the head, the most routed expert gets the most pinned.
    let budget = min + 1000 * 1088 + ffn_bytes(&moe) / 4;
    let p = plan(&moe, &sample_profile(), &PlanOptions::new(budget)).unwrap();
    let pinned: Vec<usize> =
        p.layers.iter().map(|l| l.pinned_bundles + 16 * l.pinned_gate_clusters).collect();
    assert!(pinned.windows(2).all(|w| w[0] >= w[1]) && pinned[0] > pinned[3], "{pinned:?}");
    // A use probability outside [0, 1] is refused.
    let mut bad = moe.clone();
    bad.layers[1].use_probability = 1.5;
    assert!(matches!(
        plan(&bad, &sample_profile(), &PlanOptions::new(budget)),
        Err(PlanError::BadInput { .. })
    ));
}
