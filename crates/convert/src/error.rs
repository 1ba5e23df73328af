//! The one error type of the converter.

use std::path::PathBuf;

use pinion_format::FormatError;

/// Why a checkpoint could not be converted. Nothing is left at the output path when a conversion fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// Reading an input file or writing the output failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A JSON file (config.json, tokenizer.json, ...) does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A file the conversion needs is not in the model directory.
    #[error("{}: missing ({what})", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What it would have given.
        what: &'static str,
    },
    /// `architectures` in config.json names a model class this converter does not handle.
    #[error(
        "architecture {name:?} is not supported (supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnsupportedArchitecture {
        /// The Hugging Face class name.
        name: String,
    },
    /// The checkpoint uses a feature the converter (or pinion's runtime) does not implement, named.
    #[error("unsupported: {what}")]
    Unsupported {
        /// The feature, with the configuration value or file that asks for it.
        what: String,
    },
    /// A configuration value is missing, of the wrong type, or out of range.
    #[error("config.json: {key}: {why}")]
    BadConfig {
        /// The key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// A safetensors file's header is malformed.
    #[error("{}: bad safetensors header: {why}", path.display())]
    BadSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A safetensors file is shorter (or longer) than its header says.
    #[error("{}: {got} bytes, the header describes {expected} (truncated or corrupt)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The length the header implies.
        expected: u64,
        /// The file's length.
        got: u64,
    },
    /// A tensor's element type is not one the converter reads (F32, F16, BF16).
    #[error("tensor {tensor}: element type {dtype} is not supported (F32, F16 and BF16 are)")]
    UnsupportedDtype {
        /// The Hugging Face tensor name.
        tensor: String,
        /// The safetensors dtype.
        dtype: String,
    },
    /// A tensor whose name has no GGUF counterpart for the architecture.
    #[error("tensor {name}: not a tensor of {arch} this converter knows")]
    UnknownTensor {
        /// The Hugging Face tensor name.
        name: String,
        /// The GGUF architecture.
        arch: &'static str,
    },
    /// A tensor the architecture needs is in no safetensors file.
    #[error("tensor {name} is missing")]
    MissingTensor {
        /// The Hugging Face tensor name.
        name: String,
    },
    /// The same tensor is in two safetensors files.
    #[error("tensor {name} is in more than one safetensors file")]
    DuplicateTensor {
        /// The Hugging Face tensor name.
        name: String,
    },
    /// The index file and the safetensors files disagree on the tensors.
    #[error("model.safetensors.index.json: {why}")]
    BadIndex {
        /// The tensors missing or extra, and the files.
        why: String,
    },
    /// A tensor's shape is not the one config.json implies.
    #[error("tensor {name}: shape {got:?}, config.json implies {expected:?}")]
    ShapeMismatch {
        /// The Hugging Face tensor name.
        name: String,
        /// The shape from the configuration (outermost first, as safetensors).
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// tokenizer.json or tokenizer_config.json is not what the converter can read.
    #[error("tokenizer: {why}")]
    Tokenizer {
        /// What is wrong or unsupported.
        why: String,
    },
    /// Writing the GGUF failed (a metadata value or tensor the writer refuses).
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// A closure making [`ConvertError::Io`] for `path`.
pub(crate) fn io_err(path: &std::path::Path) -> impl Fn(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io { path: path.to_path_buf(), source }
}
