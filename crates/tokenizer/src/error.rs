//! The error type of `pinion-tokenizer`.

use pinion_format::FormatError;

/// What can go wrong building a tokenizer or rendering a chat template.
///
/// Tokenizing and detokenizing never fail: every text has a tokenization and every id sequence a rendering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A GGUF metadata key is missing or has the wrong type.
    #[error("tokenizer metadata '{key}' cannot be read")]
    Metadata {
        key: &'static str,
        #[source]
        source: FormatError,
    },
    /// `tokenizer.ggml.model` names a tokenizer pinion does not implement.
    #[error("unknown tokenizer model '{name}' (pinion supports 'gpt2' and 'llama')")]
    UnknownModel { name: String },
    /// `tokenizer.ggml.pre` names a pre-tokenizer pinion does not implement (llama.cpp also refuses these).
    #[error("unknown pre-tokenizer type '{name}'")]
    UnknownPreTokenizer { name: String },
    /// The vocabulary has no tokens.
    #[error("the vocabulary is empty")]
    EmptyVocab,
    /// The same token text appears twice in the vocabulary.
    #[error("duplicate token in vocabulary: '{text}' has ids {first} and {second}")]
    DuplicateToken { text: String, first: u32, second: u32 },
    /// The vocabulary's texts (or the pieces they render to, or the merge symbols) take more than 4 GiB.
    #[error("the vocabulary is too large (its texts take more than 4 GiB)")]
    VocabTooLarge,
    /// A per-token array is shorter than the token list.
    #[error("'{key}' has {found} entries for {expected} tokens")]
    ShortArray { key: &'static str, expected: usize, found: usize },
    /// A byte-level BPE vocabulary has no merge list.
    #[error("BPE vocabulary has no merges ('tokenizer.ggml.merges')")]
    MissingMerges,
    /// The vocabulary asks for a special token to be added but does not say which token it is.
    #[error("'{flag}' is true, but '{id_key}' is not set")]
    MissingSpecialToken { flag: &'static str, id_key: &'static str },
    /// The chat template did not compile or failed while rendering.
    #[error("chat template failed to {stage}")]
    Template {
        /// `"compile"` or `"render"`.
        stage: &'static str,
        #[source]
        source: minijinja::Error,
    },
}
