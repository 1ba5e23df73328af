//! What the planner (`pinion-plan`) needs to know about a loaded model and the process running it
//! ([`plan_input`]), and the plan of a run ([`plan_run`]): the one place a run's memory and speed are planned.

use pinion_plan::{
    CacheCosts, DeviceProfile, HeadShape, LayerShape, Plan, PlanError, PlanInput, PlanOptions,
};
use pinion_predictor::LowRankPredictor;

use crate::context::ContextParams;
use crate::error::RuntimeError;
use crate::model::Model;

/// Metadata key of a packed model's per-layer predicted density (the share of neurons the predictor marks
/// per token, measured on held-out tokens at preparation; array of f32).
pub const PREDICTED_DENSITY_KEY: &str = "pinion.predictor.density";
/// Metadata key of the size in bytes of the GGUF a packed model was made from (u64): the base of percentage
/// budgets.
pub const SOURCE_BYTES_KEY: &str = "pinion.source.file_bytes";

/// Bookkeeping bytes per LRU entry beyond its payload.
pub const LRU_ENTRY_OVERHEAD: u64 = 64;
/// Bookkeeping bytes per key of an LRU region.
pub const LRU_KEY_OVERHEAD: u64 = 4;
/// Alignment of fixed-region entries.
pub const FIXED_ALIGN: u64 = 64;

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
    let attention: u64 =
        model.layers.iter().map(|l| l.wq.n_bytes() + l.wk.n_bytes() + l.wv.n_bytes() + l.wo.n_bytes()).sum();
    let max_clusters = packed.iter().map(|p| p.n_clusters()).max().unwrap_or(0);
    let max_c = packed.iter().map(|p| p.cluster_neurons).max().unwrap_or(0);
    // The context's scratch, plus the offloaded decode's per-cluster sums and gate states, and the logits of a
    // streamed head.
    let scratch = params.scratch_bytes(c)
        + (max_clusters * c.d_model * 4) as u64
        + (max_clusters * max_c * 16) as u64
        + 2 * c.n_vocab as u64 * 4;
    let densities = model.predicted_density();
    let layers = packed
        .iter()
        .enumerate()
        .map(|(l, pl)| {
            let firing = pl.frequency.iter().map(|&f| f as f64).sum::<f64>() / pl.n_ff.max(1) as f64;
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
        attention_tensors: 4 * c.n_layers,
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
            entry_overhead: LRU_ENTRY_OVERHEAD,
            key_overhead: LRU_KEY_OVERHEAD,
            fixed_align: FIXED_ALIGN,
        },
    })
}

/// The bytes of decoded predictors.
pub(crate) fn predictor_bytes(ps: &[LowRankPredictor]) -> u64 {
    ps.iter().map(LowRankPredictor::weight_bytes).sum()
}

/// The plan of running `model` with `params` and `opts` on `device`, for a process of `process_bytes`: what
/// an offloaded context runs, and what `cargo xtask plan` and `pinion bench` print. Predictors are used as the
/// context would use them by default (ReLU-family models with trained predictors).
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
    let input = plan_input(model, params, process_bytes, predictors, predicting)?;
    pinion_plan::plan(&input, device, opts).map_err(RuntimeError::from)
}

impl From<PlanError> for RuntimeError {
    fn from(e: PlanError) -> RuntimeError {
        RuntimeError::Plan(e)
    }
}
