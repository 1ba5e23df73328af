//! What the planner (`pinion-plan`) needs to know about a loaded model and the process running it
//! ([`plan_input`]), and the plan of a run ([`plan_run`]): the one place a run's memory and speed are planned.

use pinion_plan::{
    CacheCosts, DeviceProfile, HeadShape, LayerShape, Plan, PlanError, PlanInput, PlanOptions,
};
use pinion_predictor::LowRankPredictor;

use crate::config::ContextParams;
use crate::error::RuntimeError;
use crate::model::Model;

/// What the planner needs of `model` run with `params` by a process of `process_bytes` (measured) holding
/// `predictor_bytes` of decoded predictors; `predicting`: predictors choose the neurons.
pub fn plan_input(
    model: &Model,
    params: &ContextParams,
    process_bytes: u64,
    predictor_bytes: u64,
    predicting: bool,
) -> Result<PlanInput, RuntimeError> {
    let c = model.config();
    let packed = model.packed_layers().ok_or(RuntimeError::NotPacked)?;
    let fixed = || model.layers.iter().flat_map(|l| l.fixed_weights());
    let attention: u64 = fixed().map(|w| w.n_bytes()).sum();
    let max_clusters = packed.iter().map(|p| p.n_clusters()).max().unwrap_or(0);
    let max_c = packed.iter().map(|p| p.cluster_neurons).max().unwrap_or(0);
    // The context's scratch, plus the offloaded decode's per-cluster sums and gate states, and the logits of a
    // streamed head.
    let scratch = params.scratch_bytes(c)
        + (max_clusters * c.d_model * 4) as u64
        + (max_clusters * max_c * 16) as u64
        + 2 * c.n_vocab as u64 * 4;
    let densities = model.predicted_density();
    let routes = model.route_frequency();
    let layers = packed
        .iter()
        .enumerate()
        .map(|(l, pl)| {
            let use_probability = routes.map_or(1.0, |r| r[l] as f64);
            // The share of the unit's neurons that fire when it is used (predictors are measured on those tokens).
            let firing = pl.frequency.iter().map(|&f| f as f64).sum::<f64>() / pl.n_ff.max(1) as f64;
            let firing = firing / use_probability.max(1e-9);
            let gate_density = match (predicting, &densities) {
                (false, _) => 1.0,
                (true, Some(d)) => (d[l] as f64).clamp(firing.min(1.0), 1.0),
                // No measured density: a predictor tuned for high recall marks about half again as many.
                (true, None) => (1.5 * firing).min(1.0),
            };
            LayerShape {
                n_ff: pl.n_ff,
                cluster_neurons: pl.cluster_neurons,
                gate_row_bytes: pl.gate_row_bytes() as u64,
                bundle_bytes: pl.bundle_bytes() as u64,
                stride: pl.stride(),
                frequency: pl.frequency.clone(),
                use_probability,
                gate_density,
            }
        })
        .collect();
    let output = &model.output;
    Ok(PlanInput {
        model: c.name.clone().unwrap_or_else(|| c.arch.clone()),
        source_bytes: model.source_bytes(),
        process_bytes,
        attention_bytes: attention,
        attention_tensors: fixed().count(),
        head: HeadShape {
            n_rows: c.n_vocab,
            row_bytes: output.row_bytes() as u64,
            tied: output.range == model.tok_embd.range,
        },
        kv_bytes: params.kv_bytes(c),
        scratch_bytes: scratch,
        predictor_bytes,
        predicting,
        layers,
        cache: CacheCosts {
            entry_overhead: pinion_cache::REGION_BYTES_PER_ENTRY as u64,
            key_overhead: pinion_cache::REGION_BYTES_PER_KEY as u64,
            fixed_align: pinion_cache::FIXED_ALIGN as u64,
        },
        threads: params.n_threads,
    })
}

/// The bytes of decoded predictors.
pub(crate) fn predictor_bytes(ps: &[LowRankPredictor]) -> u64 {
    ps.iter().map(LowRankPredictor::weight_bytes).sum()
}

/// The plan of running `model` with `params` and `opts` on `device`, for a process of `process_bytes`, using
/// predictors as a context does by default (ReLU-family models with trained predictors): what `cargo xtask plan`
/// prints, and what an offloaded context with default predictors runs.
pub fn plan_run(
    model: &Model,
    params: &ContextParams,
    opts: &PlanOptions,
    device: &DeviceProfile,
    process_bytes: u64,
) -> Result<Plan, RuntimeError> {
    let predicting = model.config().ffn_act.is_relu_family() && model.sparsity().has_predictors;
    let predictors = match predicting {
        true => model.predictors().map_or(0, predictor_bytes),
        false => 0,
    };
    plan_run_with(model, params, opts, device, process_bytes, predictors, predicting)
}

/// [`plan_run`] for a run holding `predictor_bytes` of decoded predictors, `predicting` whether they choose the
/// neurons: the one place a run is planned.
pub(crate) fn plan_run_with(
    model: &Model,
    params: &ContextParams,
    opts: &PlanOptions,
    device: &DeviceProfile,
    process_bytes: u64,
    predictor_bytes: u64,
    predicting: bool,
) -> Result<Plan, RuntimeError> {
    let input = plan_input(model, params, process_bytes, predictor_bytes, predicting)?;
    pinion_plan::plan(&input, device, opts).map_err(RuntimeError::from)
}

/// The device profile a run plans with: `device.json` in the directory of a prepared model (measured by
/// `cargo xtask prepare` or `profile-device`), else the documented reference stand-in
/// ([`DeviceProfile::reference`]), which the plan then names.
pub fn device_for(model_path: &std::path::Path) -> Result<DeviceProfile, RuntimeError> {
    let dir = if model_path.is_dir() { Some(model_path) } else { model_path.parent() };
    let Some(file) = dir.map(|d| d.join("device.json")).filter(|f| f.is_file()) else {
        return Ok(DeviceProfile::reference());
    };
    let text =
        std::fs::read_to_string(&file).map_err(|source| RuntimeError::Io { path: file.clone(), source })?;
    Ok(DeviceProfile::from_json(&text, &file.display().to_string())?)
}

/// The resident set of this process in bytes (`/proc/self/statm`), 0 where unavailable.
pub fn current_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

/// The peak resident set of this process in bytes (`VmHWM` of `/proc/self/status`), `None` where unavailable.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl From<PlanError> for RuntimeError {
    fn from(e: PlanError) -> RuntimeError {
        RuntimeError::Plan(e)
    }
}
