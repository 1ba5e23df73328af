//! A llama-style model whose weights are borrowed from a memory-mapped GGUF file.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use pinion_exec_cpu::QMatrix;
use pinion_format::{GgmlType, Gguf, quant};
use pinion_io::MappedFile;
use pinion_tokenizer::Tokenizer;

use crate::config::ModelConfig;
use crate::error::RuntimeError;

/// A weight matrix: where its bytes are in the mapped file, and its shape.
#[derive(Clone, Debug)]
pub(crate) struct WeightRef {
    pub(crate) ty: GgmlType,
    pub(crate) n_rows: usize,
    pub(crate) n_cols: usize,
    pub(crate) range: Range<usize>,
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
    pub(crate) w_gate: WeightRef,
    pub(crate) w_up: WeightRef,
    pub(crate) w_down: WeightRef,
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
}

impl Model {
    /// Maps and loads a GGUF model.
    pub fn load(path: &Path) -> Result<Model, RuntimeError> {
        if !path.exists() {
            return Err(RuntimeError::ModelNotFound { path: path.to_path_buf(), hint: None });
        }
        let file =
            MappedFile::open(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        let file = Arc::new(file);
        let gguf =
            Gguf::parse(&file).map_err(|source| RuntimeError::Format { path: path.to_path_buf(), source })?;
        let config = ModelConfig::from_gguf(&gguf)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let c = &config;

        let tok_embd = matrix_ref(&gguf, "token_embd.weight", c.d_model, c.n_vocab)?;
        let output = match gguf.tensor_info("output.weight") {
            Some(_) => matrix_ref(&gguf, "output.weight", c.d_model, c.n_vocab)?,
            None => tok_embd.clone(),
        };
        let output_norm = vector(&gguf, "output_norm.weight", c.d_model)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(LayerWeights {
                attn_norm: vector(&gguf, &name("attn_norm"), c.d_model)?,
                wq: matrix_ref(&gguf, &name("attn_q"), c.d_model, c.n_heads * c.head_dim)?,
                wk: matrix_ref(&gguf, &name("attn_k"), c.d_model, c.kv_dim())?,
                wv: matrix_ref(&gguf, &name("attn_v"), c.d_model, c.kv_dim())?,
                wo: matrix_ref(&gguf, &name("attn_output"), c.n_heads * c.head_dim, c.d_model)?,
                ffn_norm: vector(&gguf, &name("ffn_norm"), c.d_model)?,
                w_gate: matrix_ref(&gguf, &name("ffn_gate"), c.d_model, c.n_ff)?,
                w_up: matrix_ref(&gguf, &name("ffn_up"), c.d_model, c.n_ff)?,
                w_down: matrix_ref(&gguf, &name("ffn_down"), c.n_ff, c.d_model)?,
            });
        }
        drop(gguf);
        Ok(Model { file, config, tokenizer, tok_embd, output_norm, output, layers })
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

    /// Bytes of all weights (the sum of tensor sizes).
    pub fn n_params(&self) -> usize {
        let c = &self.config;
        let per_layer = 2 * c.d_model
            + c.d_model * (c.n_heads * c.head_dim) * 2
            + c.d_model * c.kv_dim() * 2
            + 3 * c.d_model * c.n_ff;
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

fn matrix_ref(g: &Gguf<'_>, name: &str, n_cols: usize, n_rows: usize) -> Result<WeightRef, RuntimeError> {
    let info =
        g.tensor_info(name).ok_or_else(|| pinion_format::FormatError::MissingTensor { name: name.into() })?;
    let expected = [n_cols as u64, n_rows as u64];
    if info.dims != expected {
        return Err(RuntimeError::BadTensor {
            name: name.to_string(),
            why: format!("shape {:?}, expected {:?}", info.dims, expected),
        });
    }
    let start = (g.data_offset + info.offset) as usize;
    let range = start..start + info.n_bytes() as usize;
    Ok(WeightRef { ty: info.ty, n_rows, n_cols, range })
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
