//! The [`Tokenizer`]: vocabulary loading, special-token handling, encoding and decoding, following llama.cpp's
//! `llama-vocab.cpp` (`llama_vocab::impl::load`, `tokenize`, `tokenizer_st_partition`, `token_to_piece`,
//! `detokenize`).

use pinion_format::{FormatError, Gguf};

use crate::bpe::{self, BpeModel};
use crate::error::TokenizerError;
use crate::pretok::{PreConfig, PreTokenizer};
use crate::spm::{self, SpmVocab};
use crate::vocab::{ByteArena, StrTable, TooLarge};

/// The kind of tokenizer a vocabulary uses (GGUF `tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VocabKind {
    /// `"gpt2"`: byte-level BPE with ranked merges and a regex pre-tokenizer.
    Bpe,
    /// `"llama"`: SentencePiece-style BPE over characters, merges chosen by token score, byte fallback.
    Spm,
}

/// The type GGUF gives each token (`tokenizer.ggml.token_type`), llama.cpp's `llama_token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// The type for a GGUF `token_type` value; unknown values are [`TokenType::Undefined`], as in llama.cpp.
    pub fn from_gguf(value: i64) -> TokenType {
        match value {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    fn attr(self) -> u16 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => attr::NORMAL,
            TokenType::Unknown => attr::UNKNOWN,
            TokenType::Control => attr::CONTROL,
            TokenType::UserDefined => attr::USER_DEFINED,
            TokenType::Unused => attr::UNUSED,
            TokenType::Byte => attr::BYTE,
        }
    }
}

/// llama.cpp's `llama_token_attr` bits.
mod attr {
    pub(super) const UNKNOWN: u16 = 1 << 0;
    pub(super) const UNUSED: u16 = 1 << 1;
    pub(super) const NORMAL: u16 = 1 << 2;
    pub(super) const CONTROL: u16 = 1 << 3;
    pub(super) const USER_DEFINED: u16 = 1 << 4;
    pub(super) const BYTE: u16 = 1 << 5;
    pub(super) const LSTRIP: u16 = 1 << 7;
    pub(super) const RSTRIP: u16 = 1 << 8;
}

/// Special token ids. In [`TokenizerParts`] a field is the GGUF value (`None` when the key is absent); in a
/// built [`Tokenizer`] it is the id in use after llama.cpp's defaults and checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

/// A tokenizer's raw ingredients, as stored in GGUF metadata. [`Tokenizer::from_parts`] builds from these; tests
/// use it to build small vocabularies by hand. `None` means "absent", and gets llama.cpp's default.
#[derive(Clone, Debug)]
pub struct TokenizerParts {
    pub kind: VocabKind,
    /// `tokenizer.ggml.pre`, BPE only.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token texts, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`; all [`TokenType::Normal`] when absent.
    pub token_types: Option<Vec<TokenType>>,
    /// `tokenizer.ggml.scores`; all 0 when absent.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges`: `"left right"` lines in rank order. Required for BPE.
    pub merges: Option<Vec<String>>,
    pub special_ids: SpecialIds,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl TokenizerParts {
    /// Parts with the given tokens and every optional field absent.
    pub fn new(kind: VocabKind, tokens: Vec<String>) -> TokenizerParts {
        TokenizerParts {
            kind,
            pre: None,
            tokens,
            token_types: None,
            scores: None,
            merges: None,
            special_ids: SpecialIds::default(),
            add_bos: None,
            add_eos: None,
            add_space_prefix: None,
            chat_template: None,
        }
    }

    /// Reads the `tokenizer.*` metadata of a GGUF file.
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<TokenizerParts, TokenizerError> {
        let src = Source::from_gguf(gguf)?;
        Ok(TokenizerParts {
            kind: src.kind,
            pre: src.pre.map(str::to_string),
            tokens: src.tokens.into_iter().map(str::to_string).collect(),
            token_types: src.token_types,
            scores: src.scores,
            merges: src.merges.map(|m| m.into_iter().map(str::to_string).collect()),
            special_ids: src.special_ids,
            add_bos: src.add_bos,
            add_eos: src.add_eos,
            add_space_prefix: src.add_space_prefix,
            chat_template: src.chat_template.map(str::to_string),
        })
    }
}

/// [`TokenizerParts`] with its strings borrowed, from a GGUF file's metadata (so that building a tokenizer
/// from a file does not copy every token text and merge line into an allocation of its own first) or from a
/// `TokenizerParts`.
struct Source<'a> {
    kind: VocabKind,
    pre: Option<&'a str>,
    tokens: Vec<&'a str>,
    token_types: Option<Vec<TokenType>>,
    scores: Option<Vec<f32>>,
    merges: Option<Vec<&'a str>>,
    special_ids: SpecialIds,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    add_space_prefix: Option<bool>,
    chat_template: Option<&'a str>,
}

impl<'a> Source<'a> {
    /// Borrows the strings of `parts`, taking its other fields.
    fn from_parts(parts: &'a mut TokenizerParts) -> Source<'a> {
        Source {
            kind: parts.kind,
            pre: parts.pre.as_deref(),
            tokens: parts.tokens.iter().map(String::as_str).collect(),
            token_types: parts.token_types.take(),
            scores: parts.scores.take(),
            merges: parts.merges.as_ref().map(|m| m.iter().map(String::as_str).collect()),
            special_ids: parts.special_ids,
            add_bos: parts.add_bos,
            add_eos: parts.add_eos,
            add_space_prefix: parts.add_space_prefix,
            chat_template: parts.chat_template.as_deref(),
        }
    }

    /// Reads the `tokenizer.*` metadata of a GGUF file.
    fn from_gguf(gguf: &'a Gguf<'_>) -> Result<Source<'a>, TokenizerError> {
        fn opt<'g, T>(
            gguf: &'g Gguf<'_>,
            key: &'static str,
            read: impl FnOnce(&'g Gguf<'_>, &'static str) -> Result<T, FormatError>,
        ) -> Result<Option<T>, TokenizerError> {
            if gguf.get(key).is_none() {
                return Ok(None);
            }
            read(gguf, key).map(Some).map_err(|source| TokenizerError::Metadata { key, source })
        }
        let id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            // An id beyond u32 is out of range for any vocabulary; it is rejected with the other bad ids.
            Ok(opt(gguf, key, |g, k| g.get_u64(k))?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
        };

        let model_key = "tokenizer.ggml.model";
        let model =
            gguf.get_str(model_key).map_err(|source| TokenizerError::Metadata { key: model_key, source })?;
        let kind = match model {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => return Err(TokenizerError::UnknownModel { name: other.to_string() }),
        };
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens = gguf
            .get_str_array(tokens_key)
            .map_err(|source| TokenizerError::Metadata { key: tokens_key, source })?;

        let mut special_ids = SpecialIds {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            sep: id("tokenizer.ggml.seperator_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            mask: id("tokenizer.ggml.mask_token_id")?,
            fim_pre: id("tokenizer.ggml.fim_pre_token_id")?,
            fim_suf: id("tokenizer.ggml.fim_suf_token_id")?,
            fim_mid: id("tokenizer.ggml.fim_mid_token_id")?,
            fim_pad: id("tokenizer.ggml.fim_pad_token_id")?,
            fim_rep: id("tokenizer.ggml.fim_rep_token_id")?,
            fim_sep: id("tokenizer.ggml.fim_sep_token_id")?,
        };
        // The deprecated FIM keys come after the new ones in llama.cpp's list, so they win when both are valid.
        let n_tokens = gguf.get_array(tokens_key).map(|a| a.len()).unwrap_or(0);
        for (key, slot) in [
            ("tokenizer.ggml.prefix_token_id", &mut special_ids.fim_pre),
            ("tokenizer.ggml.suffix_token_id", &mut special_ids.fim_suf),
            ("tokenizer.ggml.middle_token_id", &mut special_ids.fim_mid),
        ] {
            if let Some(v) = id(key)? {
                if (v as usize) < n_tokens || slot.is_none() {
                    *slot = Some(v);
                }
            }
        }

        Ok(Source {
            kind,
            pre: opt(gguf, "tokenizer.ggml.pre", |g, k| g.get_str(k))?,
            tokens,
            token_types: opt(gguf, "tokenizer.ggml.token_type", |g, k| g.get_i64_array(k))?
                .map(|v| v.into_iter().map(TokenType::from_gguf).collect()),
            scores: opt(gguf, "tokenizer.ggml.scores", |g, k| g.get_f32_array(k))?,
            merges: opt(gguf, "tokenizer.ggml.merges", |g, k| g.get_str_array(k))?,
            special_ids,
            add_bos: opt(gguf, "tokenizer.ggml.add_bos_token", |g, k| g.get_bool(k))?,
            add_eos: opt(gguf, "tokenizer.ggml.add_eos_token", |g, k| g.get_bool(k))?,
            add_space_prefix: opt(gguf, "tokenizer.ggml.add_space_prefix", |g, k| g.get_bool(k))?,
            chat_template: opt(gguf, "tokenizer.chat_template", |g, k| g.get_str(k))?,
        })
    }
}

/// Token texts that llama.cpp treats as end-of-generation wherever they appear in a vocabulary
/// (`llama_vocab::impl::load`, "maintain a list of tokens that cause end-of-generation").
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// A piece of input text after special-token partitioning.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    /// Bytes `start..end` of the input, still to be tokenized.
    Text(usize, usize),
    Token(u32),
}

/// C's `isspace` in the "C" locale, which llama.cpp uses to strip around special tokens.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// A tokenizer built from a GGUF vocabulary that produces the token ids llama.cpp produces.
///
/// Encoding follows `llama_tokenize`, decoding `llama_detokenize` and `llama_token_to_piece`, and the set of
/// end-of-generation tokens `llama_vocab::is_eog`. A `Tokenizer` is immutable and can be shared across threads.
#[derive(Debug)]
pub struct Tokenizer {
    kind: VocabKind,
    pre: Option<PreConfig>,
    /// Token texts, found by id and by text.
    tokens: StrTable,
    attrs: Vec<u16>,
    /// Token scores, SentencePiece only (empty for BPE, which does not use them); missing scores are 0.
    scores: Vec<f32>,
    bpe: Option<BpeModel>,
    spm_byte_tokens: [Option<u32>; 256],
    special: SpecialIds,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    ignore_merges: bool,
    /// Tokens matched in text before tokenizing (control, user-defined, unknown), longest text first.
    special_cache: Vec<u32>,
    /// End-of-generation ids, ascending.
    eog: Vec<u32>,
    /// Each token's piece with special tokens rendered (llama.cpp's `cache_token_to_piece`).
    pieces: ByteArena,
    pub(crate) chat_template: Option<String>,
    warnings: Vec<String>,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(gguf: &Gguf<'_>) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::build(Source::from_gguf(gguf)?)
    }

    /// Builds a tokenizer from its parts, applying llama.cpp's defaults and checks.
    pub fn from_parts(mut parts: TokenizerParts) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::build(Source::from_parts(&mut parts))
    }

    fn build(src: Source<'_>) -> Result<Tokenizer, TokenizerError> {
        crate::unicode::warm_up();
        let Source {
            kind,
            pre,
            tokens: raw_tokens,
            token_types,
            scores,
            merges,
            special_ids: given,
            add_bos,
            add_eos,
            add_space_prefix,
            chat_template,
        } = src;
        let n = raw_tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        let mut warnings = Vec::new();

        // Vocabulary type and the settings that follow from it.
        let mut special = match kind {
            VocabKind::Spm => {
                SpecialIds { bos: Some(1), eos: Some(2), unk: Some(0), ..SpecialIds::default() }
            }
            VocabKind::Bpe => SpecialIds { bos: Some(11), eos: Some(11), ..SpecialIds::default() },
        };
        let (pre_cfg, mut add_bos_v, mut add_space_prefix_v, clean_spaces, ignore_merges) = match kind {
            VocabKind::Bpe => {
                let cfg = match pre {
                    None => {
                        warnings.push(
                            "missing pre-tokenizer type, using 'default': generation quality will be degraded"
                                .to_string(),
                        );
                        PreTokenizer::config("default")
                    }
                    Some(name) => PreTokenizer::config(name),
                };
                let cfg = cfg.ok_or_else(|| TokenizerError::UnknownPreTokenizer {
                    name: pre.unwrap_or_default().to_string(),
                })?;
                (Some(cfg), cfg.add_bos, false, cfg.clean_spaces, cfg.ignore_merges)
            }
            VocabKind::Spm => (None, true, true, false, false),
        };
        if let Some(v) = add_space_prefix {
            add_space_prefix_v = v;
        }

        // Tokens, scores and types.
        let check_len = |key: &'static str, found: usize| {
            if found < n { Err(TokenizerError::ShortArray { key, expected: n, found }) } else { Ok(()) }
        };
        if let Some(s) = &scores {
            check_len("tokenizer.ggml.scores", s.len())?;
        }
        if let Some(t) = &token_types {
            check_len("tokenizer.ggml.token_type", t.len())?;
        }
        let too_large = |_: TooLarge| TokenizerError::VocabTooLarge;
        let mut tokens = StrTable::with_capacity(n, raw_tokens.iter().map(|t| t.len()).sum());
        for (i, &raw) in raw_tokens.iter().enumerate() {
            let placeholder;
            let text = if raw.is_empty() {
                warnings.push(format!("empty token at index {i}"));
                placeholder = format!("[EMPTY_{i}]");
                placeholder.as_str()
            } else {
                raw
            };
            let (id, added) = tokens.intern(text).map_err(too_large)?;
            if !added {
                return Err(TokenizerError::DuplicateToken {
                    text: text.to_string(),
                    first: id,
                    second: i as u32,
                });
            }
        }
        tokens.shrink_to_fit();
        drop(raw_tokens);
        let scores = match (kind, scores) {
            (VocabKind::Spm, Some(mut s)) => {
                s.truncate(n);
                s.shrink_to_fit();
                s
            }
            _ => Vec::new(),
        };
        let mut attrs: Vec<u16> = match &token_types {
            Some(t) => t[..n].iter().map(|t| t.attr()).collect(),
            None => vec![attr::NORMAL; n],
        };

        let bpe = match kind {
            VocabKind::Bpe => {
                let merges = merges.ok_or(TokenizerError::MissingMerges)?;
                Some(BpeModel::new(&tokens, &merges).map_err(too_large)?)
            }
            VocabKind::Spm => None,
        };

        // Special token ids: defaults out of range are disabled; GGUF values out of range are ignored.
        let mut check_id = |key: &str, default: Option<u32>, given: Option<u32>| -> Option<u32> {
            let mut id = default;
            if let Some(d) = default {
                if d as usize >= n {
                    warnings
                        .push(format!("default special token '{key}' = {d} out of vocab range, disabling"));
                    id = None;
                }
            }
            match given {
                Some(g) if (g as usize) < n => Some(g),
                Some(g) => {
                    warnings.push(format!("bad special token: '{key}' = {g}, using default id {id:?}"));
                    id
                }
                None => id,
            }
        };
        special = SpecialIds {
            bos: check_id("bos", special.bos, given.bos),
            eos: check_id("eos", special.eos, given.eos),
            eot: check_id("eot", special.eot, given.eot),
            eom: check_id("eom", special.eom, given.eom),
            unk: check_id("unk", special.unk, given.unk),
            sep: check_id("sep", special.sep, given.sep),
            pad: check_id("pad", special.pad, given.pad),
            mask: check_id("mask", special.mask, given.mask),
            fim_pre: check_id("fim_pre", special.fim_pre, given.fim_pre),
            fim_suf: check_id("fim_suf", special.fim_suf, given.fim_suf),
            fim_mid: check_id("fim_mid", special.fim_mid, given.fim_mid),
            fim_pad: check_id("fim_pad", special.fim_pad, given.fim_pad),
            fim_rep: check_id("fim_rep", special.fim_rep, given.fim_rep),
            fim_sep: check_id("fim_sep", special.fim_sep, given.fim_sep),
        };
        if let Some(v) = add_bos {
            add_bos_v = v;
        }
        let add_eos_v = add_eos.unwrap_or(false);
        if add_bos_v && special.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_bos_token",
                id_key: "tokenizer.ggml.bos_token_id",
            });
        }
        if add_eos_v && special.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_eos_token",
                id_key: "tokenizer.ggml.eos_token_id",
            });
        }

        // Special tokens found by their text. llama.cpp walks a hash map here, so when several tokens match one
        // role the one it picks is unspecified; pinion picks the lowest id.
        let promote = |attrs: &mut Vec<u16>, warnings: &mut Vec<String>, id: u32| {
            let a = &mut attrs[id as usize];
            if *a & attr::CONTROL == 0 {
                warnings.push(format!(
                    "control-looking token {id} '{}' was not control-type; its type is overridden",
                    tokens.text(id)
                ));
                *a |= attr::CONTROL;
            }
        };
        for (slot, texts) in [
            (&mut special.eot, EOT_TEXTS),
            (&mut special.eom, EOM_TEXTS),
            (&mut special.fim_pre, FIM_PRE_TEXTS),
            (&mut special.fim_suf, FIM_SUF_TEXTS),
            (&mut special.fim_mid, FIM_MID_TEXTS),
            (&mut special.fim_pad, FIM_PAD_TEXTS),
            (&mut special.fim_rep, FIM_REP_TEXTS),
            (&mut special.fim_sep, FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                if let Some(id) = (0..n as u32).find(|&id| texts.contains(&tokens.text(id))) {
                    *slot = Some(id);
                    promote(&mut attrs, &mut warnings, id);
                }
            }
        }

        // Control tokens whose text says "unused" are unused.
        for (id, a) in attrs.iter_mut().enumerate() {
            if *a & attr::CONTROL != 0 && tokens.text(id as u32).contains("unused") {
                *a |= attr::UNUSED;
            }
        }

        // End of generation.
        let mut eog = std::collections::BTreeSet::new();
        eog.extend(special.fim_pad);
        eog.extend(special.fim_rep);
        eog.extend(special.fim_sep);
        for id in 0..n as u32 {
            if EOG_TEXTS.contains(&tokens.text(id)) {
                eog.insert(id);
                promote(&mut attrs, &mut warnings, id);
            }
        }
        // gpt-oss: these are always rendered.
        for id in 0..n as u32 {
            if matches!(tokens.text(id), "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>") {
                attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        for id in [special.eos, special.eot, special.eom].into_iter().flatten() {
            if eog.insert(id) {
                warnings.push(format!("special token {id} is not in the end-of-generation set; added"));
            }
        }
        // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
        let eog_has = |eog: &std::collections::BTreeSet<u32>, text: &str| {
            eog.iter().find(|&&id| tokens.text(id) == text).copied()
        };
        let has_call = eog_has(&eog, "<|call|>").or(eog_has(&eog, "<|calls|>")).is_some();
        if let Some(end_id) = eog_has(&eog, "<|end|>") {
            if has_call && (eog_has(&eog, "<|return|>").is_some() || eog_has(&eog, "<|flush|>").is_some()) {
                eog.remove(&end_id);
                attrs[end_id as usize] = attr::USER_DEFINED;
            }
        }
        // Gemma 4 and PaddleOCR: "</s>" is not an end of generation there.
        if eog_has(&eog, "<|tool_response>").is_some() {
            if let Some(s_id) = eog_has(&eog, "</s>") {
                eog.remove(&s_id);
                attrs[s_id as usize] = attr::NORMAL;
            }
        }

        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&id| attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            .collect();
        special_cache.sort_by_key(|&id| std::cmp::Reverse(tokens.text(id).len()));

        let mut spm_byte_tokens = [None; 256];
        if kind == VocabKind::Spm {
            for (b, slot) in spm_byte_tokens.iter_mut().enumerate() {
                let hex = format!("<0x{b:02X}>");
                *slot = tokens.id(&hex).or_else(|| {
                    // llama.cpp then tries the byte itself as a token and throws if that fails too; pinion
                    // falls back to the unknown token instead.
                    let one = [b as u8];
                    std::str::from_utf8(&one).ok().and_then(|s| tokens.id(s)).or(special.unk)
                });
            }
        }

        let mut tok = Tokenizer {
            kind,
            pre: pre_cfg,
            tokens,
            attrs,
            scores,
            bpe,
            spm_byte_tokens,
            special,
            add_bos: add_bos_v,
            add_eos: add_eos_v,
            add_space_prefix: add_space_prefix_v,
            clean_spaces,
            ignore_merges,
            special_cache,
            eog: eog.into_iter().collect(),
            pieces: ByteArena::with_capacity(0, 0),
            chat_template: chat_template.map(str::to_string),
            warnings,
        };
        // A piece is at most as long as its text, except for BPE characters outside GPT-2's byte map.
        let mut pieces = ByteArena::with_capacity(n, tok.tokens.text_bytes());
        for id in 0..n as u32 {
            tok.build_piece(id, pieces.buffer());
            pieces.finish_item().map_err(too_large)?;
        }
        pieces.shrink_to_fit();
        tok.pieces = pieces;
        Ok(tok)
    }

    /// llama.cpp's `token_to_piece` with `special = true`, before caching, appended to `out`.
    fn build_piece(&self, id: u32, out: &mut Vec<u8>) {
        let a = self.attrs[id as usize];
        let text = self.tokens.text(id);
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        if a & attr::NORMAL != 0 {
            match (&self.bpe, self.kind) {
                (Some(bpe), VocabKind::Bpe) => {
                    for c in text.chars() {
                        match crate::unicode::char_to_byte(&bpe.byte_char, c) {
                            Some(b) => out.push(b),
                            None => {
                                let mut buf = [0u8; 4];
                                out.extend_from_slice(b"[UNK_BYTE_0x");
                                for b in c.encode_utf8(&mut buf).bytes() {
                                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                                }
                                out.extend_from_slice(text.as_bytes());
                                out.push(b']');
                            }
                        }
                    }
                }
                _ => {
                    for (i, part) in text.split('\u{2581}').enumerate() {
                        if i > 0 {
                            out.push(b' ');
                        }
                        out.extend_from_slice(part.as_bytes());
                    }
                }
            }
            return;
        }
        if a & attr::BYTE != 0 {
            out.push(token_to_byte(text));
        }
    }

    /// The kind of tokenizer.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// The pre-tokenizer family of a BPE vocabulary.
    pub fn pre_tokenizer(&self) -> Option<PreTokenizer> {
        self.pre.map(|p| p.kind)
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Number of BPE merge rules (0 for SentencePiece vocabularies).
    pub fn n_merges(&self) -> usize {
        self.bpe.as_ref().map_or(0, |b| b.n_merges())
    }

    /// The text of a token as stored in the vocabulary (byte-level BPE tokens are in GPT-2's encoding).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id)
    }

    /// The id of the token whose vocabulary text is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.id(text)
    }

    /// Whether a token is a control token (rendered only when asked, never produced from plain text).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The special token ids in use.
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// The end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// The BOS token `encode` with `add_special` prepends, if it prepends one (what a chunk scored on its own
    /// starts with).
    pub fn added_bos(&self) -> Option<u32> {
        self.bos_id().filter(|_| self.add_bos)
    }

    /// Whether `encode` with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode` with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether a token ends generation (llama.cpp's `llama_vocab::is_eog`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The end-of-generation tokens, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// The chat template stored with the vocabulary, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Bytes the tokenizer holds on the heap (token texts and pieces, lookup and merge tables, per-token
    /// attributes, chat template and warnings), counted by the capacity of its containers; what it costs the
    /// process beyond that is the allocator's bookkeeping of a few dozen allocations.
    pub fn heap_bytes(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(String::capacity).sum::<usize>();
        self.tokens.heap_bytes()
            + self.attrs.capacity() * size_of::<u16>()
            + self.scores.capacity() * size_of::<f32>()
            + self.bpe.as_ref().map_or(0, BpeModel::heap_bytes)
            + self.special_cache.capacity() * size_of::<u32>()
            + self.eog.capacity() * size_of::<u32>()
            + self.pieces.heap_bytes()
            + self.chat_template.as_ref().map_or(0, String::capacity)
            + self.warnings.capacity() * size_of::<String>()
            + strings(&self.warnings)
    }

    /// Things worth telling a user about the vocabulary, which llama.cpp logs as warnings while loading.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Tokenizes `text` as llama.cpp's `llama_tokenize` does.
    ///
    /// `add_special` adds BOS and EOS where the vocabulary asks for them. `parse_special` lets control and
    /// unknown-type tokens written in the text (such as `<|im_start|>`) become those tokens; user-defined tokens
    /// are always recognised.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.encode_parts(text, add_special, parse_special, &[])
    }

    /// [`Tokenizer::encode`] with special tokens parsed except inside the byte ranges `literal` (which must be
    /// on character boundaries): there, text that spells a control token stays text. For a chat whose template
    /// is trusted and whose messages are not.
    pub fn encode_with_literals(
        &self,
        text: &str,
        add_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Vec<u32> {
        self.encode_parts(text, add_special, true, literal)
    }

    fn encode_parts(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Vec<u32> {
        let fragments = self.partition(text, parse_special, literal);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        match self.kind {
            VocabKind::Bpe => {
                if add_special && self.add_bos {
                    out.extend(self.special.bos);
                }
                let mut words = Vec::new();
                let mut scratch = bpe::Scratch::default();
                let mut encoded = String::new();
                for f in fragments {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(s, e) => {
                            self.encode_bpe(&text[s..e], &mut words, &mut scratch, &mut encoded, &mut out)
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.special.eos);
                }
            }
            VocabKind::Spm => {
                let mut is_prev_special = true;
                if add_special && self.add_bos {
                    out.extend(self.special.bos);
                }
                let vocab = SpmVocab {
                    tokens: &self.tokens,
                    scores: &self.scores,
                    byte_tokens: &self.spm_byte_tokens,
                };
                let mut buf = String::new();
                for f in fragments {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            is_prev_special = true;
                        }
                        Fragment::Text(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && is_prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in text[s..e].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::encode(&vocab, &buf, &mut out);
                            is_prev_special = false;
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.special.eos);
                }
            }
        }
        out
    }

    fn encode_bpe(
        &self,
        text: &str,
        words: &mut Vec<std::ops::Range<usize>>,
        scratch: &mut bpe::Scratch,
        encoded: &mut String,
        out: &mut Vec<u32>,
    ) {
        let (Some(pre), Some(bpe)) = (self.pre, &self.bpe) else { return };
        words.clear();
        pre.kind.split(text, words);
        for w in words.iter() {
            let word = &text.as_bytes()[w.clone()];
            if self.ignore_merges {
                encoded.clear();
                encoded.extend(word.iter().map(|&b| bpe.byte_char[b as usize]));
                if let Some(id) = self.tokens.id(encoded) {
                    out.push(id);
                    continue;
                }
            }
            bpe.encode_word(word, scratch, out);
        }
    }

    /// Splits `text` around special tokens, as llama.cpp's `tokenizer_st_partition`: longest token text first,
    /// each occurrence left to right.
    /// Control and unknown-type tokens are not matched where they overlap a range of `literal`.
    fn partition(
        &self,
        text: &str,
        parse_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Vec<Fragment> {
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        let mut next = Vec::new();
        for &id in &self.special_cache {
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let pat = self.tokens.text(id);
            if !text.contains(pat) {
                continue;
            }
            next.clear();
            for &f in &frags {
                let Fragment::Text(mut start, end) = f else {
                    next.push(f);
                    continue;
                };
                let guarded = a & (attr::CONTROL | attr::UNKNOWN) != 0 && !literal.is_empty();
                loop {
                    // The next match, skipping those a literal range overlaps.
                    let mut from = start;
                    let found = loop {
                        let Some(rel) = text[from..end].find(pat) else { break None };
                        let m = from + rel;
                        if guarded && literal.iter().any(|r| m < r.end && r.start < m + pat.len()) {
                            from = m + pat.chars().next().map_or(1, char::len_utf8);
                            continue;
                        }
                        break Some(m);
                    };
                    let Some(m) = found else {
                        if end > start {
                            next.push(Fragment::Text(start, end));
                        }
                        break;
                    };
                    let mut left_end = m;
                    if a & attr::LSTRIP != 0 {
                        while left_end > start && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = m + pat.len();
                    if a & attr::RSTRIP != 0 {
                        while start < end && is_c_space(bytes[start]) {
                            start += 1;
                        }
                    }
                    if start >= end {
                        break;
                    }
                }
            }
            std::mem::swap(&mut frags, &mut next);
        }
        frags
    }

    /// The bytes a token renders to, as llama.cpp's `llama_token_to_piece` without stripping.
    ///
    /// Control and unknown-type tokens render as their text only when `special` is true, and as nothing
    /// otherwise. A piece can be part of a UTF-8 character. An id outside the vocabulary renders as nothing.
    pub fn token_to_piece(&self, id: u32, special: bool) -> &[u8] {
        let Some(a) = self.attrs.get(id as usize) else { return &[] };
        if !special && a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return &[];
        }
        self.pieces.get(id as usize).unwrap_or_default()
    }

    /// llama.cpp's `llama_detokenize` (`remove_special = false`), as bytes.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let mut piece = self.token_to_piece(id, special);
            if remove_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            remove_space = false;
            out.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        out
    }

    /// The text of `ids`, with control tokens left out (llama.cpp's `special = false`).
    ///
    /// Bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, false)).into_owned()
    }

    /// The text of `ids`, with control tokens written out (llama.cpp's `special = true`).
    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, true)).into_owned()
    }

    /// Whether the first piece of a detokenized sequence loses one leading space (SentencePiece's prefix).
    pub(crate) fn strips_first_space(&self) -> bool {
        self.add_space_prefix
    }
}

/// llama.cpp's `token_to_byte`: the two hex digits of a `<0xXX>` token, as `strtol` reads them.
fn token_to_byte(text: &str) -> u8 {
    let digits = text.get(3..).unwrap_or("").chars().take(2).map_while(|c| c.to_digit(16));
    digits.fold(0u32, |acc, d| acc * 16 + d) as u8
}

/// llama.cpp's `clean_spaces` passes over a detokenized text, written as in llama.cpp (in place, index by index)
/// so that its edge cases carry over.
fn clean_up_spaces(text: &mut Vec<u8>) {
    // First pass: " ?", " !", " .", " ," lose the space.
    let total1 = text.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    // Second pass: a single apostrophe between spaces loses both spaces.
    let total2 = total;
    total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = text[i];
        if x == b'\'' && i + 1 < total2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    // Third pass: " 's", " 'm", " 're", " 've" lose the space.
    let total3 = total;
    total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = text[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if !(x1 == b't' || x1 == b'd') && i + 2 < total3 {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_spaces_matches_llama_cpp() {
        let clean = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_up_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it ' s"), "it's");
        assert_eq!(clean("we 're here , they 'll go"), "we're here, they 'll go");
        assert_eq!(clean("don 't"), "don 't");
        assert_eq!(clean(""), "");
        assert_eq!(clean(" ."), ".");
    }

    #[test]
    fn byte_token_text() {
        assert_eq!(token_to_byte("<0x0A>"), 10);
        assert_eq!(token_to_byte("<0xff>"), 255);
        assert_eq!(token_to_byte("<0x"), 0);
    }
}
