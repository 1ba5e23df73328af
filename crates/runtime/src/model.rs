//! A llama-style model whose weights are borrowed from a memory-mapped GGUF file.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use pinion_exec_cpu::QMatrix;
use pinion_format::packed::{PACKED_MAGIC, PackedFile, PackedLayer};
use pinion_format::{GgmlType, Gguf, quant};
use pinion_io::MappedFile;
use pinion_predictor::LowRankPredictor;
use pinion_tokenizer::Tokenizer;

use crate::config::{ModelConfig, MoeConfig};
use crate::error::RuntimeError;
use crate::rule::FfnRule;

/// A weight matrix: where its bytes are in the mapped file, and its shape.
#[derive(Clone, Debug)]
pub(crate) struct WeightRef {
    pub(crate) ty: GgmlType,
    pub(crate) n_rows: usize,
    pub(crate) n_cols: usize,
    pub(crate) range: Range<usize>,
    /// The tensor's name (for checksums and messages).
    pub(crate) name: std::sync::Arc<str>,
}

impl WeightRef {
    /// Bytes of the matrix in the file.
    pub(crate) fn n_bytes(&self) -> u64 {
        (self.range.end - self.range.start) as u64
    }

    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        (self.range.end - self.range.start) / self.n_rows
    }
}

/// The weights of one transformer block.
#[derive(Debug)]
pub(crate) struct LayerWeights {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: WeightRef,
    pub(crate) wk: WeightRef,
    pub(crate) wv: WeightRef,
    pub(crate) wo: WeightRef,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) ffn: FfnWeights,
    /// Biases of the query, key and value projections ([`crate::ArchSpec::qkv_bias`]).
    pub(crate) qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head norms of the queries and keys ([`crate::ArchSpec::qk_norm`]).
    pub(crate) qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// Norms of the attention and FFN outputs ([`crate::ArchSpec::post_norms`]).
    pub(crate) post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

impl LayerWeights {
    /// The matrices an offloaded run keeps in its fixed region: the attention projections, and a packed mixture
    /// of experts' router.
    pub(crate) fn fixed_weights(&self) -> Vec<&WeightRef> {
        let mut w = vec![&self.wq, &self.wk, &self.wv, &self.wo];
        if let FfnWeights::PackedMoe(m) = &self.ffn {
            w.push(&m.router);
        }
        w
    }

    /// The FFN matrices a batch multiplies densely, for the dense executor's shapes: a GGUF layer's three, or
    /// a mixture of experts' router and one expert's three (none for a packed layer).
    pub(crate) fn dense_ffn(&self) -> Vec<WeightRef> {
        match &self.ffn {
            FfnWeights::Dense { gate, up, down } => vec![gate.clone(), up.clone(), down.clone()],
            FfnWeights::Moe(m) => {
                vec![m.router.clone(), m.expert(&m.gate, 0), m.expert(&m.up, 0), m.expert(&m.down, 0)]
            }
            FfnWeights::PackedMoe(m) => vec![m.router.clone()],
            FfnWeights::Packed(_) => Vec::new(),
        }
    }
}

/// Where a layer's FFN weights are.
#[derive(Debug)]
pub(crate) enum FfnWeights {
    /// The three matrices of a GGUF file.
    Dense { gate: WeightRef, up: WeightRef, down: WeightRef },
    /// Neuron-major records of a packed file (see `pinion_format::packed`); positions are in hotness order.
    Packed(PackedLayer),
    /// A mixture of experts of a GGUF file (see [`crate::MoeConfig`]).
    Moe(MoeWeights),
    /// A mixture of experts of a packed file: the router, and each expert as a packed FFN unit.
    PackedMoe(PackedMoe),
}

/// A packed mixture-of-experts layer: the router (resident) and one packed FFN unit per expert.
#[derive(Debug)]
pub(crate) struct PackedMoe {
    /// `ffn_gate_inp`: one row of `d_model` per expert.
    pub(crate) router: WeightRef,
    /// Expert `e`'s neuron-major records (FFN unit `l * n_expert + e`).
    pub(crate) experts: Vec<PackedLayer>,
    pub(crate) cfg: MoeConfig,
}

/// A mixture-of-experts FFN layer: the router and the experts' matrices, each expert's a contiguous block of
/// rows of its 3-D tensor (GGUF dims `[n_cols, rows per expert, n_expert]`).
#[derive(Debug)]
pub(crate) struct MoeWeights {
    /// `ffn_gate_inp`: one row of `d_model` per expert.
    pub(crate) router: WeightRef,
    /// `ffn_gate_exps`, `ffn_up_exps`: `n_ff` rows of `d_model` per expert.
    pub(crate) gate: WeightRef,
    pub(crate) up: WeightRef,
    /// `ffn_down_exps`: `d_model` rows of `n_ff` per expert.
    pub(crate) down: WeightRef,
    pub(crate) cfg: MoeConfig,
}

impl MoeWeights {
    /// Expert `e`'s rows of `w` (one of the experts' matrices).
    pub(crate) fn expert(&self, w: &WeightRef, e: usize) -> WeightRef {
        let rows = w.n_rows / self.cfg.n_expert;
        let bytes = rows * w.row_bytes();
        let start = w.range.start + e * bytes;
        WeightRef { n_rows: rows, range: start..start + bytes, ..w.clone() }
    }
}

/// The name of the packed model file inside a prepared directory.
pub const PACKED_FILE_NAME: &str = "model.pinion";

/// Metadata key of a packed model's per-layer CATS thresholds (array of f32).
pub const THRESHOLDS_KEY: &str = "pinion.sparsity.thresholds";
/// Metadata key of the target sparsity the thresholds were calibrated for (f32).
pub const TARGET_SPARSITY_KEY: &str = "pinion.sparsity.target";
/// Metadata key of a packed mixture of experts' routing frequencies: per FFN unit (expert `e` of layer `l` at
/// `l * n_expert + e`), the share of calibration tokens routed to it (array of f32).
pub const ROUTE_FREQUENCY_KEY: &str = "pinion.moe.route_frequency";
/// Metadata key of a packed model's per-layer predicted density (the share of neurons the predictor marks
/// per token, measured on held-out tokens at preparation; array of f32).
pub const PREDICTED_DENSITY_KEY: &str = "pinion.predictor.density";
/// Metadata key of the size in bytes of the GGUF a packed model was made from (u64): the base of percentage
/// budgets.
pub const SOURCE_BYTES_KEY: &str = "pinion.source.file_bytes";
/// Name of layer `l`'s per-neuron score scales in a packed model's resident section (F32, `n_ff` values in the
/// source GGUF's neuron order; see [`FfnRule`]): `blk.{l}.ffn_score_scale`. Absent: CATS.
pub fn score_scale_tensor(l: usize) -> String {
    format!("blk.{l}.{SCORE_SCALE_TENSOR}")
}

/// The per-layer tensor name of [`score_scale_tensor`], without its `blk.{l}.` prefix.
pub const SCORE_SCALE_TENSOR: &str = "ffn_score_scale";

/// Metadata key of the perplexity increase a prepared model's sparsity cost on held-out calibration text, as
/// measured when it was prepared (f32, 0.03 is 3%); absent when the sparsity was fixed rather than searched.
pub const PPL_INCREASE_KEY: &str = "pinion.sparsity.ppl_increase";
/// Metadata key of the quality budget the sparsity was searched under (f32, the largest increase allowed).
pub const MAX_PPL_INCREASE_KEY: &str = "pinion.sparsity.max_ppl_increase";

/// Metadata key of the predictors' per-layer logit thresholds (array of f32).
pub const PREDICTOR_THRESHOLDS_KEY: &str = "pinion.predictor.thresholds";

/// The names of layer `l`'s predictor tensors: `W1` (`[d_in, rank]`), `b1`, `W2` (`[rank, n_ff]`), `b2`, F32.
pub fn predictor_tensor_names(l: usize) -> [String; 4] {
    ["w1", "b1", "w2", "b2"].map(|p| format!("blk.{l}.ffn_pred_{p}"))
}

/// The sparsity a prepared model carries: the calibrated rule and trained predictors.
#[derive(Clone, Debug, Default)]
pub struct ModelSparsity {
    /// The rule choosing FFN neurons: per-layer thresholds (see [`crate::FfnActivation::is_active`]) and, for
    /// a weighted rule, per-neuron scales ([`SCORE_SCALE_TENSOR`]).
    pub rule: Option<FfnRule>,
    /// The sparsity the thresholds were calibrated for.
    pub target_sparsity: Option<f32>,
    /// Whether the model carries trained predictors ([`Model::predictors`]).
    pub has_predictors: bool,
    /// The perplexity increase the sparsity cost on held-out calibration text when the model was prepared, and
    /// the budget it was searched under ([`PPL_INCREASE_KEY`], [`MAX_PPL_INCREASE_KEY`]).
    pub quality: Option<(f32, f32)>,
}

/// Where a layer's predictor is in the mapped file: the byte ranges of `W1`, `b1`, `W2`, `b2` (F32), its rank
/// and logit threshold.
#[derive(Clone, Debug)]
struct PredictorRef {
    w1: Range<usize>,
    b1: Range<usize>,
    w2: Range<usize>,
    b2: Range<usize>,
    rank: usize,
    threshold: f32,
}

/// A loaded model: config, tokenizer, and weights viewed in place in the mapped file.
///
/// Quantized matrices are never copied: [`Model::matrix`] hands out views into the map. Only the small norm
/// vectors are decoded to f32 at load time.
#[derive(Debug)]
pub struct Model {
    file: Arc<MappedFile>,
    pub(crate) config: ModelConfig,
    tokenizer: Tokenizer,
    pub(crate) tok_embd: WeightRef,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) output: WeightRef,
    pub(crate) layers: Vec<LayerWeights>,
    /// Llama 3's RoPE frequency factors (`rope_freqs.weight`, `n_rot / 2` values), if the file has them.
    pub(crate) rope_factors: Option<Vec<f32>>,
    sparsity: ModelSparsity,
    predictor_refs: Vec<PredictorRef>,
    /// The predictors, decoded on first use (a SiLU model that never uses them never pays their memory).
    predictors: std::sync::OnceLock<Vec<LowRankPredictor>>,
    packed: bool,
    /// Bytes of the GGUF the model was made from (the file itself for a GGUF).
    source_bytes: u64,
    /// Per layer, the share of neurons the predictor marks per token, measured at preparation.
    predicted_density: Option<Vec<f32>>,
    /// Per FFN unit of a mixture of experts, the share of tokens routed to it ([`Model::route_frequency`]).
    route_frequency: Option<Vec<f32>>,
    /// A packed file's format version and its resident checksums (empty for version 1 and GGUF files).
    packed_version: u32,
    checksums: pinion_format::packed::ResidentChecksums,
}

impl Model {
    /// Maps and loads a model: a GGUF file, a packed file (`pinion_format::packed`), or a directory prepared by
    /// `cargo xtask prepare` (its [`PACKED_FILE_NAME`]).
    pub fn load(path: &Path) -> Result<Model, RuntimeError> {
        let path = &if path.is_dir() { path.join(PACKED_FILE_NAME) } else { path.to_path_buf() };
        if !path.exists() {
            return Err(RuntimeError::ModelNotFound { path: path.to_path_buf(), hint: None });
        }
        let file =
            MappedFile::open(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        let file = Arc::new(file);
        let format_err = |source| RuntimeError::Format { path: path.to_path_buf(), source };
        if file.get(..8) == Some(&PACKED_MAGIC[..]) {
            // The resident section is checked 4 MiB at a time, each chunk's pages dropped from the resident set
            // once hashed: a run under a memory budget must not peak at the whole section (mostly an embedding
            // table it may never keep in memory) while loading.
            let release = |r: Range<usize>| {
                let _ = file.release(r);
            };
            let packed = PackedFile::parse_checking(&file, &mut |h, resident| {
                let base = h.resident_offset as usize;
                h.verify_resident_chunked(resident, 4 << 20, |r| release(base + r.start..base + r.end))
            })
            .map_err(format_err)?;
            let base = packed.resident_offset() as usize;
            let layers = packed.layers().to_vec();
            let (packed_version, checksums) = (packed.header().version, packed.checksums().clone());
            let mut model = Model::from_gguf(&file, packed.resident_gguf(), base, Some(layers))?;
            (model.sparsity, model.predictor_refs) = read_sparsity(packed.resident_gguf(), base, &model)?;
            (model.packed_version, model.checksums) = (packed_version, checksums);
            let g = packed.resident_gguf();
            // Prepared before the source size was recorded: the weights as stored are the closest stand-in.
            model.source_bytes = match g.get(SOURCE_BYTES_KEY) {
                Some(_) => g.get_u64(SOURCE_BYTES_KEY).map_err(format_err)?,
                None => model.weight_bytes(),
            };
            model.predicted_density = match g.get(PREDICTED_DENSITY_KEY) {
                Some(_) => {
                    let d = g.get_f32_array(PREDICTED_DENSITY_KEY).map_err(format_err)?;
                    if d.len() != model.config.n_units() || d.iter().any(|x| !(0.0..=1.0).contains(x)) {
                        return Err(RuntimeError::BadHyperParameter {
                            key: PREDICTED_DENSITY_KEY.into(),
                            value: format!("{} values (one in [0, 1] per FFN unit expected)", d.len()),
                        });
                    }
                    Some(d)
                }
                None => None,
            };
            if g.get(ROUTE_FREQUENCY_KEY).is_some() {
                let r = g.get_f32_array(ROUTE_FREQUENCY_KEY).map_err(format_err)?;
                if model.config.moe.is_none()
                    || r.len() != model.config.n_units()
                    || r.iter().any(|x| !(0.0..=1.0).contains(x))
                {
                    return Err(RuntimeError::BadHyperParameter {
                        key: ROUTE_FREQUENCY_KEY.into(),
                        value: format!(
                            "{} values (one in [0, 1] per expert of a mixture of experts expected)",
                            r.len()
                        ),
                    });
                }
                model.route_frequency = Some(r);
            }
            // Everything read so far (header, index, metadata) was copied out; weights fault in on first use.
            let _ = file.release(0..file.len());
            return Ok(model);
        }
        let gguf = Gguf::parse(&file).map_err(format_err)?;
        Model::from_gguf(&file, &gguf, 0, None)
    }

    /// Assembles a model from a GGUF (at byte `base` of `file`), with the FFN of a packed file if given.
    fn from_gguf(
        file: &Arc<MappedFile>,
        gguf: &Gguf<'_>,
        base: usize,
        packed: Option<Vec<PackedLayer>>,
    ) -> Result<Model, RuntimeError> {
        let config = ModelConfig::from_gguf(gguf)?;
        let tokenizer = Tokenizer::from_gguf(gguf)?;
        let c = &config;
        let matrix_ref = |name: &str, n_cols, n_rows| matrix_ref(gguf, base, name, n_cols, n_rows);

        let tok_embd = matrix_ref("token_embd.weight", c.d_model, c.n_vocab)?;
        let output = match gguf.tensor_info("output.weight") {
            Some(_) => matrix_ref("output.weight", c.d_model, c.n_vocab)?,
            None => tok_embd.clone(),
        };
        let output_norm = vector(gguf, "output_norm.weight", c.d_model)?;
        let rope_factors = match gguf.tensor_info("rope_freqs.weight") {
            Some(_) if c.spec.rope_factors => {
                let f = vector(gguf, "rope_freqs.weight", c.n_rot / 2)?;
                if f.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                    return Err(RuntimeError::BadTensor {
                        name: "rope_freqs.weight".into(),
                        why: "a frequency factor is not a positive number".into(),
                    });
                }
                Some(f)
            }
            _ => None,
        };
        let is_packed = packed.is_some();
        if let Some(p) = packed.as_ref().filter(|p| p.len() != c.n_units()) {
            return Err(RuntimeError::BadTensor {
                name: "ffn".into(),
                why: format!(
                    "the packed file has {} FFN units, the model {} ({} layers of {} experts)",
                    p.len(),
                    c.n_units(),
                    c.n_layers,
                    c.experts_per_layer()
                ),
            });
        }
        if !is_packed {
            check_tensor_names(gguf, c)?;
        }
        let mut packed = packed.map(Vec::into_iter);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = match packed.as_mut() {
                Some(it) => {
                    let mut unit = |e: usize| -> Result<PackedLayer, RuntimeError> {
                        let pl = it.next().ok_or_else(|| RuntimeError::BadTensor {
                            name: format!("blk.{i}.ffn"),
                            why: "the packed file has fewer FFN units than the model".into(),
                        })?;
                        check_packed_unit(&pl, c, i, e)?;
                        Ok(pl)
                    };
                    match c.moe {
                        Some(cfg) => FfnWeights::PackedMoe(PackedMoe {
                            router: matrix_ref(&name("ffn_gate_inp"), c.d_model, cfg.n_expert)?,
                            experts: (0..cfg.n_expert).map(&mut unit).collect::<Result<_, _>>()?,
                            cfg,
                        }),
                        None => FfnWeights::Packed(unit(0)?),
                    }
                }
                None => match c.moe {
                    Some(cfg) => {
                        let experts = |what: &str, n_cols: usize, n_rows: usize| {
                            experts_ref(gguf, base, &name(what), n_cols, n_rows, cfg.n_expert)
                        };
                        FfnWeights::Moe(MoeWeights {
                            router: matrix_ref(&name("ffn_gate_inp"), c.d_model, cfg.n_expert)?,
                            gate: experts("ffn_gate_exps", c.d_model, c.n_ff)?,
                            up: experts("ffn_up_exps", c.d_model, c.n_ff)?,
                            down: experts("ffn_down_exps", c.n_ff, c.d_model)?,
                            cfg,
                        })
                    }
                    None => FfnWeights::Dense {
                        gate: matrix_ref(&name("ffn_gate"), c.d_model, c.n_ff)?,
                        up: matrix_ref(&name("ffn_up"), c.d_model, c.n_ff)?,
                        down: matrix_ref(&name("ffn_down"), c.n_ff, c.d_model)?,
                    },
                },
            };
            layers.push(LayerWeights {
                attn_norm: vector(gguf, &name("attn_norm"), c.d_model)?,
                wq: matrix_ref(&name("attn_q"), c.d_model, c.n_heads * c.head_dim)?,
                wk: matrix_ref(&name("attn_k"), c.d_model, c.kv_dim())?,
                wv: matrix_ref(&name("attn_v"), c.d_model, c.kv_dim())?,
                wo: matrix_ref(&name("attn_output"), c.n_heads * c.head_dim, c.d_model)?,
                ffn_norm: vector(gguf, &name("ffn_norm"), c.d_model)?,
                ffn,
                qkv_bias: match c.spec.qkv_bias {
                    true => Some([
                        bias(gguf, i, "attn_q", c.n_heads * c.head_dim)?,
                        bias(gguf, i, "attn_k", c.kv_dim())?,
                        bias(gguf, i, "attn_v", c.kv_dim())?,
                    ]),
                    false => None,
                },
                qk_norm: match c.spec.qk_norm {
                    true => Some((
                        vector(gguf, &name("attn_q_norm"), c.head_dim)?,
                        vector(gguf, &name("attn_k_norm"), c.head_dim)?,
                    )),
                    false => None,
                },
                post_norms: match c.spec.post_norms {
                    true => Some((
                        vector(gguf, &name("post_attention_norm"), c.d_model)?,
                        vector(gguf, &name("post_ffw_norm"), c.d_model)?,
                    )),
                    false => None,
                },
            });
        }
        let route_frequency = c.moe.map(|m| vec![m.n_expert_used as f32 / m.n_expert as f32; c.n_units()]);
        Ok(Model {
            file: Arc::clone(file),
            config,
            tokenizer,
            tok_embd,
            output_norm,
            output,
            layers,
            rope_factors,
            sparsity: ModelSparsity::default(),
            predictor_refs: Vec::new(),
            predictors: std::sync::OnceLock::new(),
            packed: is_packed,
            source_bytes: file.len() as u64,
            predicted_density: None,
            route_frequency,
            packed_version: 0,
            checksums: Default::default(),
        })
    }

    /// Bytes of the GGUF file the model was made from: the base of percentage budgets (`--mem-budget 50%`).
    pub fn source_bytes(&self) -> u64 {
        self.source_bytes
    }

    /// Per FFN unit, the share of tokens that use it ([`ModelConfig::unit`]): for a mixture of experts, the
    /// routing frequency of each expert measured at preparation (`pinion.moe.route_frequency`), or
    /// `n_expert_used / n_expert` when the file has none; `None` for a dense model (every token uses every
    /// layer).
    pub fn route_frequency(&self) -> Option<&[f32]> {
        self.route_frequency.as_deref()
    }

    /// Per layer, the share of neurons the predictors mark per token, as measured at preparation (`None` when
    /// the model has no predictors or was prepared before it was recorded).
    pub fn predicted_density(&self) -> Option<&[f32]> {
        self.predicted_density.as_deref()
    }

    /// The sparsity a prepared (packed) model carries; empty for a GGUF.
    pub fn sparsity(&self) -> &ModelSparsity {
        &self.sparsity
    }

    /// The trained predictors of a packed model, one per layer, outputs in the packed (position) order and
    /// logit thresholds set; decoded from the file on the first call. `None` when the model has none.
    pub fn predictors(&self) -> Option<&[LowRankPredictor]> {
        if self.predictor_refs.is_empty() {
            return None;
        }
        let c = &self.config;
        let built = self.predictors.get_or_init(|| {
            let f32s = |r: &Range<usize>| -> Vec<f32> { bytemuck::pod_collect_to_vec(&self.file[r.clone()]) };
            self.predictor_refs
                .iter()
                .enumerate()
                .map(|(u, pr)| {
                    let (w2, b2) = (f32s(&pr.w2), f32s(&pr.b2));
                    // Reorder the outputs (rows of W2, entries of b2) from neuron ids to packed positions.
                    let order: Vec<u32> = match self.unit(u) {
                        Some(pl) => pl.order.clone(),
                        None => (0..c.n_ff as u32).collect(),
                    };
                    let r = pr.rank;
                    let w2p: Vec<f32> = order
                        .iter()
                        .flat_map(|&n| &w2[n as usize * r..(n as usize + 1) * r])
                        .copied()
                        .collect();
                    let b2p: Vec<f32> = order.iter().map(|&n| b2[n as usize]).collect();
                    let mut p =
                        LowRankPredictor::new(c.d_model, r, c.n_ff, f32s(&pr.w1), f32s(&pr.b1), w2p, b2p)
                            .expect("predictor shapes were checked at load");
                    p.set_threshold(pr.threshold);
                    // The file's pages were copied out: drop them from the resident set.
                    for r in [&pr.w1, &pr.b1, &pr.w2, &pr.b2] {
                        let _ = self.file.release(r.clone());
                    }
                    p
                })
                .collect()
        });
        Some(built)
    }

    /// The predictors if [`Model::predictors`] has decoded them (they then take memory).
    pub(crate) fn decoded_predictors(&self) -> Option<&[LowRankPredictor]> {
        self.predictors.get().map(Vec::as_slice)
    }

    /// Whether the FFN is in the packed neuron-major layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Bytes of the weights that stay in memory whatever the FFN does: embeddings, output head, attention and
    /// norms (and, for a GGUF, nothing of the FFN; for a packed model, not its predictors).
    pub fn resident_weight_bytes(&self) -> u64 {
        let c = &self.config;
        let len = WeightRef::n_bytes;
        let mut total = len(&self.tok_embd) + 4 * c.d_model as u64;
        if self.output.range != self.tok_embd.range {
            total += len(&self.output);
        }
        for l in &self.layers {
            total += len(&l.wq) + len(&l.wk) + len(&l.wv) + len(&l.wo) + 8 * c.d_model as u64;
        }
        total
    }

    /// Bytes of the model's weights as stored: [`resident_weight_bytes`](Self::resident_weight_bytes) plus the
    /// FFN (gate rows, up rows, down columns; without a packed file's padding and predictors). A memory budget
    /// given as a percentage is a percentage of this.
    pub fn weight_bytes(&self) -> u64 {
        let len = WeightRef::n_bytes;
        let ffn: u64 = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FfnWeights::Packed(pl) => (pl.n_ff * (pl.gate_row_bytes() + pl.bundle_bytes())) as u64,
                FfnWeights::Dense { gate, up, down } => len(gate) + len(up) + len(down),
                FfnWeights::Moe(m) => len(&m.router) + len(&m.gate) + len(&m.up) + len(&m.down),
                FfnWeights::PackedMoe(m) => {
                    let units: usize =
                        m.experts.iter().map(|pl| pl.n_ff * (pl.gate_row_bytes() + pl.bundle_bytes())).sum();
                    len(&m.router) + units as u64
                }
            })
            .sum();
        self.resident_weight_bytes() + ffn
    }

    /// Renders a conversation with the model's chat template: the file's own, else its architecture's turn
    /// format (a GGUF may carry none: Gemma 3 270M's does not), else ChatML.
    pub fn apply_chat_template(
        &self,
        messages: &[pinion_tokenizer::ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        let fallback = self.config.spec.chat_template.unwrap_or(pinion_tokenizer::CHATML_TEMPLATE);
        Ok(self.tokenizer.apply_chat_template_or(fallback, messages, add_generation_prompt)?)
    }

    /// The tokens of a conversation in the model's chat template (chosen as [`Model::apply_chat_template`]
    /// chooses it), BOS as [`pinion_tokenizer::Tokenizer::encode`] adds it; text in the messages that spells a
    /// special token stays text.
    pub fn encode_chat(
        &self,
        messages: &[pinion_tokenizer::ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, RuntimeError> {
        let fallback = self.config.spec.chat_template.unwrap_or(pinion_tokenizer::CHATML_TEMPLATE);
        Ok(self.tokenizer.encode_chat_or(fallback, messages, add_generation_prompt)?)
    }

    /// The packed FFN units, in unit order ([`ModelConfig::unit`]): one per layer, or one per expert of a
    /// mixture of experts (`None` for a GGUF).
    pub fn packed_layers(&self) -> Option<Vec<&PackedLayer>> {
        let mut units = Vec::with_capacity(self.config.n_units());
        for l in &self.layers {
            match &l.ffn {
                FfnWeights::Packed(pl) => units.push(pl),
                FfnWeights::PackedMoe(m) => units.extend(&m.experts),
                FfnWeights::Dense { .. } | FfnWeights::Moe(_) => return None,
            }
        }
        Some(units)
    }

    /// Packed FFN unit `u` ([`ModelConfig::unit`]); `None` for a GGUF or a unit past the last.
    pub(crate) fn unit(&self, u: usize) -> Option<&PackedLayer> {
        let per = self.config.experts_per_layer();
        match &self.layers.get(u / per)?.ffn {
            FfnWeights::Packed(pl) => Some(pl),
            FfnWeights::PackedMoe(m) => m.experts.get(u % per),
            FfnWeights::Dense { .. } | FfnWeights::Moe(_) => None,
        }
    }

    /// The whole mapped file as the packed FFN's byte source.
    pub(crate) fn ffn_bytes(&self) -> &[u8] {
        &self.file
    }

    /// Drops the model file's mapped pages from the resident set (they fault in again when used): between
    /// runs under different memory budgets in one process, so one run's pages do not count against the next.
    pub fn release_pages(&self) {
        let _ = self.file.release(0..self.file.len());
    }

    /// The path of the model file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The mapped file.
    pub(crate) fn file(&self) -> &MappedFile {
        &self.file
    }

    /// The packed format version of a packed model (0 for a GGUF).
    pub(crate) fn packed_version(&self) -> u32 {
        self.packed_version
    }

    /// The resident tensors' and rows' recorded checksums of a packed model (empty for version 1 and GGUF).
    pub(crate) fn checksums(&self) -> &pinion_format::packed::ResidentChecksums {
        &self.checksums
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Size of the model file in bytes.
    pub fn file_size(&self) -> usize {
        self.file.len()
    }

    /// Number of parameters (weights) of the model, all experts counted.
    pub fn n_params(&self) -> usize {
        let c = &self.config;
        let ffn = match c.moe {
            Some(m) => m.n_expert * (3 * c.d_model * c.n_ff + c.d_model),
            None => 3 * c.d_model * c.n_ff,
        };
        let per_layer =
            2 * c.d_model + c.d_model * (c.n_heads * c.head_dim) * 2 + c.d_model * c.kv_dim() * 2 + ffn;
        c.n_vocab * c.d_model + c.d_model + per_layer * c.n_layers
    }

    /// A view of a weight matrix in the mapped file.
    pub(crate) fn matrix(&self, w: &WeightRef) -> QMatrix<'_> {
        QMatrix { ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols, data: &self.file[w.range.clone()] }
    }

    /// Writes the embedding of `token` into `out`.
    pub(crate) fn embed(&self, token: u32, out: &mut [f32]) -> Result<(), RuntimeError> {
        let n_vocab = self.config.n_vocab;
        if token as usize >= n_vocab {
            return Err(RuntimeError::BadToken { id: token, n_vocab });
        }
        let m = self.matrix(&self.tok_embd);
        quant::dequantize_row(m.ty, m.row(token as usize), out)?;
        Ok(())
    }
}

/// Checks packed FFN unit `pl` (expert `e` of layer `l`, or the layer's FFN) against the model: types with
/// kernels, and the model's shape.
fn check_packed_unit(pl: &PackedLayer, c: &ModelConfig, l: usize, e: usize) -> Result<(), RuntimeError> {
    let name = |what: &str| match c.moe {
        Some(_) => format!("blk.{l}.ffn_{what}_exps expert {e} (packed)"),
        None => format!("blk.{l}.ffn_{what} (packed)"),
    };
    for (what, ty) in [("gate", pl.gate_ty), ("up", pl.up_ty)] {
        if pinion_exec_cpu::vec_dot_type(ty).is_none() {
            return Err(RuntimeError::UnsupportedWeightType { name: name(what), ty });
        }
    }
    if !matches!(pl.down_ty, GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32) {
        return Err(RuntimeError::UnsupportedWeightType { name: name("down"), ty: pl.down_ty });
    }
    if pl.n_ff != c.n_ff || pl.d_model != c.d_model {
        return Err(RuntimeError::BadTensor {
            name: name("gate"),
            why: format!("packed unit is {}x{}, expected {}x{}", pl.n_ff, pl.d_model, c.n_ff, c.d_model),
        });
    }
    Ok(())
}

/// Refuses a GGUF holding a tensor the forward pass would not use (a computation pinion does not implement
/// would otherwise be silently skipped), naming it.
fn check_tensor_names(g: &Gguf<'_>, c: &ModelConfig) -> Result<(), RuntimeError> {
    let mut per_layer = vec!["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"];
    match c.moe {
        Some(_) => per_layer.extend(["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]),
        None => per_layer.extend(["ffn_gate", "ffn_up", "ffn_down"]),
    }
    if c.spec.qk_norm {
        per_layer.extend(["attn_q_norm", "attn_k_norm"]);
    }
    if c.spec.post_norms {
        per_layer.extend(["post_attention_norm", "post_ffw_norm"]);
    }
    let biases: &[&str] = if c.spec.qkv_bias { &["attn_q", "attn_k", "attn_v"] } else { &[] };
    for t in &g.tensors {
        let name = t.name.as_str();
        let known = match name {
            "token_embd.weight" | "output_norm.weight" | "output.weight" => true,
            "rope_freqs.weight" => c.spec.rope_factors,
            _ => name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
                .is_some_and(|(l, rest)| {
                    l < c.n_layers
                        && (rest.strip_suffix(".weight").is_some_and(|r| per_layer.contains(&r))
                            || rest.strip_suffix(".bias").is_some_and(|r| biases.contains(&r)))
                }),
        };
        if !known {
            return Err(RuntimeError::Unsupported {
                what: format!("tensor '{name}', which pinion's {} model does not compute with", c.arch),
            });
        }
    }
    Ok(())
}

fn matrix_ref(
    g: &Gguf<'_>,
    base: usize,
    name: &str,
    n_cols: usize,
    n_rows: usize,
) -> Result<WeightRef, RuntimeError> {
    weight_ref(g, base, name, &[n_cols as u64, n_rows as u64], n_rows, n_cols)
}

/// The 3-D tensor `name` of `n_expert` experts' matrices of `n_rows` rows of `n_cols` (GGUF dims `[n_cols,
/// n_rows, n_expert]`), as one matrix of `n_expert * n_rows` rows (expert `e`: [`MoeWeights::expert`]).
fn experts_ref(
    g: &Gguf<'_>,
    base: usize,
    name: &str,
    n_cols: usize,
    n_rows: usize,
    n_expert: usize,
) -> Result<WeightRef, RuntimeError> {
    let dims = [n_cols as u64, n_rows as u64, n_expert as u64];
    weight_ref(g, base, name, &dims, n_rows * n_expert, n_cols)
}

/// The tensor `name`, of GGUF dims `dims` (row length first) and a type with a kernel, as one matrix of
/// `n_rows` rows of `n_cols` values.
fn weight_ref(
    g: &Gguf<'_>,
    base: usize,
    name: &str,
    dims: &[u64],
    n_rows: usize,
    n_cols: usize,
) -> Result<WeightRef, RuntimeError> {
    let info =
        g.tensor_info(name).ok_or_else(|| pinion_format::FormatError::MissingTensor { name: name.into() })?;
    if info.dims != dims {
        return Err(RuntimeError::BadTensor {
            name: name.to_string(),
            why: format!("shape {:?}, expected {:?}", info.dims, dims),
        });
    }
    if pinion_exec_cpu::vec_dot_type(info.ty).is_none() {
        return Err(RuntimeError::UnsupportedWeightType { name: name.to_string(), ty: info.ty });
    }
    let start = base + (g.data_offset + info.offset) as usize;
    let range = start..start + info.n_bytes() as usize;
    Ok(WeightRef { ty: info.ty, n_rows, n_cols, range, name: name.into() })
}

/// Layer `l`'s bias of projection `what` (`blk.{l}.{what}.bias`), `n` values.
fn bias(g: &Gguf<'_>, l: usize, what: &str, n: usize) -> Result<Vec<f32>, RuntimeError> {
    vector(g, &format!("blk.{l}.{what}.bias"), n)
}

fn vector(g: &Gguf<'_>, name: &str, n: usize) -> Result<Vec<f32>, RuntimeError> {
    let t = g.tensor(name)?;
    if t.dims != [n as u64] {
        return Err(RuntimeError::BadTensor {
            name: name.to_string(),
            why: format!("shape {:?}, expected [{n}]", t.dims),
        });
    }
    let mut out = vec![0.0; n];
    quant::dequantize_row(t.ty, t.data, &mut out)?;
    Ok(out)
}

/// Reads a packed model's thresholds, and finds and checks its predictor tensors (`base`: the resident GGUF's
/// offset in the file).
fn read_sparsity(
    g: &Gguf<'_>,
    base: usize,
    model: &Model,
) -> Result<(ModelSparsity, Vec<PredictorRef>), RuntimeError> {
    let c = &model.config;
    let f32_array = |key: &str| -> Result<Option<Vec<f32>>, RuntimeError> {
        if g.get(key).is_none() {
            return Ok(None);
        }
        let bad = || RuntimeError::BadHyperParameter {
            key: key.into(),
            value: format!("not {} finite f32 values (one per FFN unit)", c.n_units()),
        };
        let v: Vec<f32> = g
            .get_array(key)?
            .iter()
            .map(|v| match v {
                pinion_format::Value::F32(x) if x.is_finite() => Ok(*x),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?;
        if v.len() != c.n_units() {
            return Err(bad());
        }
        Ok(Some(v))
    };
    let thresholds = f32_array(THRESHOLDS_KEY)?;
    let target_sparsity = match g.get(TARGET_SPARSITY_KEY) {
        Some(_) => Some(g.get_f32(TARGET_SPARSITY_KEY)?),
        None => None,
    };
    let mut refs = Vec::new();
    if let Some(logit_t) = f32_array(PREDICTOR_THRESHOLDS_KEY)? {
        for (l, &threshold) in logit_t.iter().enumerate() {
            let names = predictor_tensor_names(l);
            let rank = g.tensor_info(&names[0]).and_then(|t| t.dims.get(1).copied()).unwrap_or(0) as usize;
            let (d, n, r) = (c.d_model as u64, c.n_ff as u64, rank as u64);
            let mut ranges = Vec::with_capacity(4);
            for (name, dims) in names.iter().zip([vec![d, r], vec![r], vec![r, n], vec![n]]) {
                let info = g
                    .tensor_info(name)
                    .ok_or_else(|| pinion_format::FormatError::MissingTensor { name: name.clone() })?;
                if info.ty != GgmlType::F32 || info.dims != dims || rank == 0 {
                    return Err(RuntimeError::BadTensor {
                        name: name.clone(),
                        why: format!("{:?} {:?}, expected F32 {dims:?} (rank > 0)", info.ty, info.dims),
                    });
                }
                let start = base + (g.data_offset + info.offset) as usize;
                ranges.push(start..start + info.n_bytes() as usize);
            }
            let [w1, b1, w2, b2] = <[Range<usize>; 4]>::try_from(ranges).expect("four ranges");
            refs.push(PredictorRef { w1, b1, w2, b2, rank, threshold });
        }
    }
    let scales = match g.tensor_info(&score_scale_tensor(0)) {
        None => None,
        Some(_) => Some(
            (0..c.n_units())
                .map(|u| vector(g, &score_scale_tensor(u), c.n_ff))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let rule = match (thresholds, scales) {
        (Some(thresholds), scales) => {
            let r = FfnRule { thresholds, scales };
            r.check(c.n_units(), c.n_ff)?;
            Some(r)
        }
        (None, Some(_)) => {
            return Err(RuntimeError::BadScales { why: "score scales without thresholds".into() });
        }
        (None, None) => None,
    };
    let quality = match (g.get(PPL_INCREASE_KEY), g.get(MAX_PPL_INCREASE_KEY)) {
        (Some(_), Some(_)) => Some((g.get_f32(PPL_INCREASE_KEY)?, g.get_f32(MAX_PPL_INCREASE_KEY)?)),
        _ => None,
    };
    let sparsity = ModelSparsity { rule, target_sparsity, has_predictors: !refs.is_empty(), quality };
    Ok((sparsity, refs))
}
