//! Tokenizers built from GGUF vocabularies that produce exactly the token ids llama.cpp produces.
//!
//! The main type is [`Tokenizer`], built with [`Tokenizer::from_gguf`] from a file's `tokenizer.*` metadata
//! (or [`Tokenizer::from_parts`] from plain data). It covers byte-level BPE (`tokenizer.ggml.model = "gpt2"`,
//! with the GPT-2, SmolLM, Llama-3 and Qwen2 pre-tokenizers) and SentencePiece-style BPE (`"llama"`), follows
//! llama.cpp's `llama_tokenize` for special tokens and BOS/EOS, its `llama_detokenize` for decoding, and its
//! `is_eog` for the end-of-generation set. [`StreamDecoder`] turns generated tokens into text without splitting
//! UTF-8 characters, and [`Tokenizer::apply_chat_template`] renders the model's Jinja chat template.
//!
//! It is not a general Hugging Face `tokenizers` replacement: there is no `tokenizer.json` loading, no WordPiece
//! or Unigram model, and no normalizers beyond what llama.cpp applies. It does no I/O; callers hand it a parsed
//! [`pinion_format::Gguf`].
//!
//! ```
//! use pinion_tokenizer::{Tokenizer, TokenizerParts, VocabKind};
//!
//! // A SentencePiece vocabulary small enough to write out; real ones come from `Tokenizer::from_gguf`.
//! // Pieces grow by merging neighbours whose concatenation is a token: "▁" + "h", then "▁h" + "i".
//! let tokens = ["<unk>", "<s>", "</s>", "\u{2581}", "h", "i", "\u{2581}h", "\u{2581}hi"];
//! let parts = TokenizerParts::new(VocabKind::Spm, tokens.map(String::from).to_vec());
//! let tok = Tokenizer::from_parts(parts)?;
//! let ids = tok.encode("hi hi", true, false);
//! assert_eq!(ids, [1, 7, 7]); // BOS, "▁hi", "▁hi"
//! assert_eq!(tok.decode(&ids[1..]), "hi hi");
//! assert!(tok.is_eog(2));
//! # Ok::<(), pinion_tokenizer::TokenizerError>(())
//! ```
#![forbid(unsafe_code)]

mod bpe;
mod chat;
mod error;
mod pretok;
mod spm;
mod stream;
mod tokenizer;
mod unicode;
mod vocab;

pub use crate::chat::{CHATML_TEMPLATE, ChatMessage, render_chat_template};
pub use crate::error::TokenizerError;
pub use crate::pretok::PreTokenizer;
pub use crate::stream::StreamDecoder;
pub use crate::tokenizer::{SpecialIds, TokenType, Tokenizer, TokenizerParts, VocabKind};
