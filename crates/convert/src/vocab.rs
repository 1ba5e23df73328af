//! The tokenizer metadata convert_hf_to_gguf.py writes for a byte-level BPE `tokenizer.json` (its
//! `_set_vocab_gpt2`, `get_vocab_base` and gguf-py's `SpecialVocab`): the token list with types, the merges, the
//! pre-tokenizer name, special token ids, whether BOS/EOS/SEP are added, and the chat template.

use std::collections::HashMap;
use std::path::Path;

use pinion_format::Value as Gv;
use serde_json::{Map, Value};

use crate::config::HfConfig;
use crate::error::ConvertError;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The pre-tokenizer configurations recognized, by the llama.cpp name they get. llama.cpp's converter names a
/// pre-tokenizer by hashing the token ids a known model's vocabulary gives a test string; pinion compares the
/// `pre_tokenizer` of tokenizer.json with these models' instead (the regexes are what decides the splitting).
const LLAMA3_PAT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PAT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The metadata entries, in the order the reference writes them.
pub(crate) fn vocab_metadata(cfg: &HfConfig, dir: &Path) -> Result<Vec<(String, Gv)>, ConvertError> {
    let bad = |why: String| ConvertError::Tokenizer { why };
    if dir.join("tokenizer.model").is_file() {
        return Err(ConvertError::Unsupported {
            what: format!("{} (a SentencePiece tokenizer)", dir.join("tokenizer.model").display()),
        });
    }
    let tok_path = dir.join("tokenizer.json");
    let tok = crate::read_json(&tok_path, "the tokenizer")?;
    let config_path = dir.join("tokenizer_config.json");
    let mut tc: Option<Map<String, Value>> = if config_path.is_file() {
        match crate::read_json(&config_path, "the tokenizer's settings")? {
            Value::Object(m) => Some(m),
            _ => return Err(bad("tokenizer_config.json is not a JSON object".into())),
        }
    } else {
        None
    };
    if tc.as_ref().and_then(|t| t.get("tokenizer_class")).and_then(Value::as_str)
        == Some("HybridDNATokenizer")
    {
        return Err(ConvertError::Unsupported { what: "tokenizer_class HybridDNATokenizer".into() });
    }
    let model = tok.get("model").and_then(Value::as_object).ok_or_else(|| bad("no model object".into()))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("?");
    if model_type != "BPE" {
        return Err(ConvertError::Unsupported {
            what: format!("tokenizer.json model type {model_type:?} (BPE only)"),
        });
    }
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(ConvertError::Unsupported {
            what: "tokenizer.json BPE with byte_fallback (a SentencePiece-style vocabulary)".into(),
        });
    }
    let pre = pre_name(&tok)?;
    if cfg.arch == crate::config::Arch::Llama && cfg.n_vocab == 32016 {
        return Err(ConvertError::Unsupported { what: "CodeLlama's vocabulary (vocab_size 32016)".into() });
    }

    // The vocabulary with the added tokens, as `AutoTokenizer(...).vocab`.
    let mut vocab: HashMap<String, i64> = HashMap::new();
    let base = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (k, v) in base {
        vocab.insert(k.clone(), v.as_i64().ok_or_else(|| bad(format!("vocab entry {k:?} has no id")))?);
    }
    struct Added {
        content: String,
        special: bool,
    }
    let empty = Vec::new();
    let added_json = tok.get("added_tokens").and_then(Value::as_array).unwrap_or(&empty);
    let mut added: HashMap<i64, Added> = HashMap::new();
    for a in added_json {
        let id = a.get("id").and_then(Value::as_i64).ok_or_else(|| bad("an added token has no id".into()))?;
        let content =
            a.get("content").and_then(Value::as_str).ok_or_else(|| bad(format!("added token {id}")))?;
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        vocab.insert(content.to_string(), id);
        added.insert(id, Added { content: content.to_string(), special });
    }
    let n_vocab = cfg.n_vocab;
    let mut reverse: Vec<Option<&str>> = vec![None; n_vocab];
    for (text, &id) in &vocab {
        if id < 0 || id as usize >= n_vocab {
            return Err(bad(format!("token {text:?} has id {id}, past vocab_size {n_vocab}")));
        }
        reverse[id as usize] = Some(text);
    }
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    let added_contents: std::collections::HashSet<&str> =
        added.values().map(|a| a.content.as_str()).collect();
    for (i, t) in reverse.iter().enumerate() {
        match t {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
            Some(text) if added_contents.contains(text) => {
                let special = added.get(&(i as i64)).is_some_and(|a| a.special);
                if special || looks_special(text) {
                    tokens.push(text.to_string());
                    types.push(CONTROL);
                } else {
                    tokens.push(text.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
            }
            Some(text) => {
                tokens.push(text.to_string());
                types.push(NORMAL);
            }
        }
    }

    let mut out: Vec<(String, Gv)> = Vec::new();
    if cfg.arch == crate::config::Arch::Llama {
        if let Some(b) = tc.as_ref().and_then(|t| t.get("add_prefix_space")).and_then(Value::as_bool) {
            out.push(("tokenizer.ggml.add_space_prefix".into(), Gv::Bool(b)));
        }
    }
    out.push(("tokenizer.ggml.model".into(), "gpt2".into()));
    out.push(("tokenizer.ggml.pre".into(), pre.into()));
    out.push(("tokenizer.ggml.tokens".into(), tokens.into()));
    out.push(("tokenizer.ggml.token_type".into(), types.into()));

    let special = SpecialVocab::load(&tok, tc.as_mut(), dir, &cfg.raw)?;
    if !special.merges.is_empty() {
        out.push(("tokenizer.ggml.merges".into(), special.merges.clone().into()));
    }
    for (typ, id) in &special.ids {
        let key = match typ.as_str() {
            "bos" => "bos_token_id",
            "eos" => "eos_token_id",
            "unk" => "unknown_token_id",
            "sep" => "seperator_token_id",
            "pad" => "padding_token_id",
            "mask" => "mask_token_id",
            _ => continue, // gguf-py has no writer for cls, eot and eom ids here, and skips them.
        };
        out.push((format!("tokenizer.ggml.{key}"), Gv::U32(*id)));
    }
    for (typ, add) in &special.add {
        if matches!(typ.as_str(), "bos" | "eos" | "sep") {
            out.push((format!("tokenizer.ggml.add_{typ}_token"), Gv::Bool(*add)));
        }
    }
    if let Some(t) = &special.chat_template {
        out.push(("tokenizer.chat_template".into(), t.as_str().into()));
    }
    if let Some(b) = special.lowercase {
        out.push(("tokenizer.ggml.normalizer.lowercase".into(), Gv::Bool(b)));
    }
    if let Some(b) = special.strip_accents {
        out.push(("tokenizer.ggml.normalizer.strip_accents".into(), Gv::Bool(b)));
    }
    if cfg.arch == crate::config::Arch::Llama && cfg.n_vocab == 49152 {
        // LlamaModel.set_vocab's rule for Granite's small models, which SmolLM's vocabulary size also meets:
        // no BOS (replacing the value in place if the tokenizer set one).
        match out.iter_mut().find(|(k, _)| k == "tokenizer.ggml.add_bos_token") {
            Some(e) => e.1 = Gv::Bool(false),
            None => out.push(("tokenizer.ggml.add_bos_token".into(), Gv::Bool(false))),
        }
    }
    Ok(out)
}

/// `TextModel.does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The llama.cpp pre-tokenizer name of tokenizer.json's `pre_tokenizer` (and normalizer), or an error naming
/// what it is.
fn pre_name(tok: &Value) -> Result<&'static str, ConvertError> {
    let pre = tok.get("pre_tokenizer").cloned().unwrap_or(Value::Null);
    let norm = tok.get("normalizer").cloned().unwrap_or(Value::Null);
    let list: Vec<Value> = match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => pre.get("pretokenizers").and_then(Value::as_array).cloned().unwrap_or_default(),
        Some(_) => vec![pre.clone()],
        None => Vec::new(),
    };
    let ty = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_string).unwrap_or_default();
    let byte_level = |v: &Value, regex: bool| {
        ty(v) == "ByteLevel"
            && v.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
            && v.get("use_regex").and_then(Value::as_bool) == Some(regex)
    };
    let split = |v: &Value, pat: &str| {
        ty(v) == "Split"
            && v.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str) == Some(pat)
            && v.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && v.get("invert").and_then(Value::as_bool) == Some(false)
    };
    let nfc = ty(&norm) == "NFC";
    let name = match list.as_slice() {
        [s, b] if split(s, LLAMA3_PAT) && byte_level(b, false) && norm.is_null() => Some("llama-bpe"),
        [s, b] if split(s, QWEN2_PAT) && byte_level(b, false) && nfc => Some("qwen2"),
        [d, b]
            if ty(d) == "Digits"
                && d.get("individual_digits").and_then(Value::as_bool) == Some(true)
                && byte_level(b, true)
                && norm.is_null() =>
        {
            Some("smollm")
        }
        _ => None,
    };
    name.ok_or_else(|| ConvertError::Unsupported {
        what: format!(
            "BPE pre-tokenizer {} with normalizer {} (known: Llama 3's llama-bpe, Qwen2's qwen2, SmolLM's smollm)",
            compact(&pre),
            compact(&norm)
        ),
    })
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 300 { format!("{}...", s.chars().take(300).collect::<String>()) } else { s }
}

/// Sets a key of the tokenizer config, when there is one.
fn set(tc: &mut Option<&mut Map<String, Value>>, key: &str, value: Value) {
    if let Some(m) = tc.as_deref_mut() {
        m.insert(key.to_string(), value);
    }
}

/// Python's truthiness of a JSON value.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
    }
}

/// gguf-py's `SpecialVocab(dir, load_merges=True)`, ported step by step.
#[derive(Default)]
struct SpecialVocab {
    merges: Vec<String>,
    /// Special token ids by type, in insertion order.
    ids: Vec<(String, u32)>,
    /// Whether a type's token is added, in insertion order.
    add: Vec<(String, bool)>,
    chat_template: Option<String>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
    types: Vec<String>,
}

impl SpecialVocab {
    fn load(
        tok: &Value,
        mut tc: Option<&mut Map<String, Value>>,
        dir: &Path,
        config: &Map<String, Value>,
    ) -> Result<SpecialVocab, ConvertError> {
        let mut sv = SpecialVocab {
            types: ["bos", "eos", "unk", "sep", "pad", "cls", "mask"].map(String::from).to_vec(),
            ..SpecialVocab::default()
        };
        sv.merges = merges(tok)?;
        if let Some(n) = tok.get("normalizer") {
            sv.parse_normalizer(n);
        }
        let empty = Vec::new();
        let added_tokens = tok.get("added_tokens").and_then(Value::as_array).unwrap_or(&empty);
        sv.post_processor(tok, tc.as_deref_mut());
        if let Some(tc) = tc {
            sv.chat_template = chat_template(tc, dir)?;
            for typ in sv.types.clone() {
                if let Some(add) = tc.get(&format!("add_{typ}_token")).and_then(Value::as_bool) {
                    sv.set_add_default(&typ, add);
                }
                let content = match tc.get(&format!("{typ}_token")) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Object(o)) => match o.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        _ => continue,
                    },
                    _ => continue,
                };
                let id = added_tokens
                    .iter()
                    .find(|a| a.get("content").and_then(Value::as_str) == Some(content.as_str()))
                    .and_then(|a| a.get("id"));
                sv.set_id(&typ, id)?;
            }
        }
        for typ in sv.types.clone() {
            let id = config.get(&format!("{typ}_token_id"));
            sv.set_id(&typ, id)?;
        }
        Ok(sv)
    }

    /// `_set_special_token`: integer ids only, the first one set wins.
    fn set_id(&mut self, typ: &str, id: Option<&Value>) -> Result<(), ConvertError> {
        let Some(id) = id.and_then(Value::as_i64) else { return Ok(()) };
        if id < 0 || id > u32::MAX as i64 {
            return Err(ConvertError::Tokenizer { why: format!("invalid id {id} for the {typ} token") });
        }
        if !self.ids.iter().any(|(t, _)| t == typ) {
            self.ids.push((typ.to_string(), id as u32));
        }
        Ok(())
    }

    fn set_add(&mut self, typ: &str, v: bool) {
        match self.add.iter_mut().find(|(t, _)| t == typ) {
            Some(e) => e.1 = v,
            None => self.add.push((typ.to_string(), v)),
        }
    }

    fn set_add_default(&mut self, typ: &str, v: bool) {
        if !self.add.iter().any(|(t, _)| t == typ) {
            self.add.push((typ.to_string(), v));
        }
    }

    fn parse_normalizer(&mut self, n: &Value) {
        match n.get("type").and_then(Value::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.lowercase = v.as_bool();
                }
                if let Some(v) = n.get("strip_accents") {
                    self.strip_accents = v.as_bool();
                }
            }
            Some("Sequence") => {
                for m in n.get("normalizers").and_then(Value::as_array).into_iter().flatten() {
                    self.parse_normalizer(m);
                }
            }
            _ => {}
        }
    }

    /// The post-processor part of `_try_load_from_tokenizer_json` (ByteLevel, RobertaProcessing,
    /// TemplateProcessing), which may also rewrite the tokenizer config's special tokens, as it does there.
    fn post_processor(&mut self, tok: &Value, mut tc: Option<&mut Map<String, Value>>) {
        let get = |tc: &Option<&mut Map<String, Value>>, k: &str| tc.as_ref().and_then(|m| m.get(k)).cloned();
        let mut special_bos = get(&tc, "bos_token");
        let mut special_cls = get(&tc, "cls_token");
        let mut special_eos = get(&tc, "eos_token");
        let mut special_sep = get(&tc, "sep_token");
        let tc_truthy = |tc: &Option<&mut Map<String, Value>>| tc.as_ref().is_some_and(|m| !m.is_empty());
        if !truthy(special_bos.as_ref()) && truthy(special_cls.as_ref()) && tc_truthy(&tc) {
            special_bos = special_cls.clone();
            set(&mut tc, "bos_token", special_bos.clone().unwrap_or_default());
        }
        if !truthy(special_eos.as_ref()) && truthy(special_sep.as_ref()) && tc_truthy(&tc) {
            special_eos = special_sep.clone();
            set(&mut tc, "eos_token", special_eos.clone().unwrap_or_default());
        }
        let Some(pp) = tok.get("post_processor").filter(|p| truthy(Some(p))) else { return };
        let processors: Vec<Value> = match pp.get("processors").and_then(Value::as_array) {
            Some(list) => list.clone(),
            None => vec![pp.clone()],
        };
        let s = |x: &str| Some(Value::String(x.to_string()));
        for p in &processors {
            match p.get("type").and_then(Value::as_str) {
                Some("ByteLevel") => {
                    self.set_add_default("bos", false);
                    self.set_add_default("eos", false);
                }
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                    if !truthy(special_cls.as_ref()) && tc_truthy(&tc) {
                        special_cls = p.get("cls").and_then(|c| c.get(0)).cloned().or(special_bos.clone());
                        set(&mut tc, "cls_token", special_cls.clone().unwrap_or_default());
                    }
                    if !truthy(special_sep.as_ref()) && tc_truthy(&tc) {
                        special_sep = p.get("sep").and_then(|c| c.get(0)).cloned().or(special_eos.clone());
                        set(&mut tc, "sep_token", special_sep.clone().unwrap_or_default());
                    }
                }
                Some("TemplateProcessing") => {
                    let empty = Vec::new();
                    let single = p.get("single").and_then(Value::as_array).unwrap_or(&empty);
                    let pair = p.get("pair").and_then(Value::as_array).unwrap_or(&empty);
                    let special_id = |e: &Value| {
                        e.get("SpecialToken")
                            .and_then(|t| t.get("id"))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    };
                    let mut special_first: Option<String> = None;
                    let mut special_last: Option<String> = None;
                    if single.len() > 1 {
                        special_first = special_id(&single[0]).filter(|x| !x.is_empty());
                        if let Some(first) = &special_first {
                            let first_v = s(first);
                            if !tc_truthy(&tc) {
                                special_bos = first_v.clone();
                            } else if first_v != special_bos && first_v != special_cls {
                                if !truthy(special_bos.as_ref()) {
                                    special_bos = first_v.clone();
                                    set(&mut tc, "bos_token", Value::String(first.clone()));
                                }
                                if !truthy(special_cls.as_ref()) {
                                    special_cls = first_v.clone();
                                    set(&mut tc, "cls_token", Value::String(first.clone()));
                                }
                            }
                            let add = first_v == special_bos || first_v == special_cls;
                            self.set_add("bos", add);
                        }
                        special_last = special_id(&single[single.len() - 1]).filter(|x| !x.is_empty());
                        if let Some(last) = &special_last {
                            let last_v = s(last);
                            if !tc_truthy(&tc) {
                                special_eos = last_v.clone();
                            } else if last_v != special_eos {
                                if !self.types.iter().any(|t| t == "eot") {
                                    self.types.push("eot".into());
                                    set(&mut tc, "eot_token", special_eos.clone().unwrap_or_default());
                                } else if !self.types.iter().any(|t| t == "eom") {
                                    self.types.push("eom".into());
                                    set(&mut tc, "eom_token", special_eos.clone().unwrap_or_default());
                                }
                                special_eos = last_v.clone();
                                set(&mut tc, "eos_token", Value::String(last.clone()));
                            }
                            let add = last_v == special_eos;
                            self.set_add("eos", add);
                        }
                    }
                    if !pair.is_empty() {
                        let start =
                            usize::from(special_first.is_some() && special_id(&pair[0]) == special_first);
                        let stop_trim =
                            special_last.is_some() && special_id(&pair[pair.len() - 1]) == special_last;
                        let end = if stop_trim { pair.len() - 1 } else { pair.len() };
                        let mid: &[Value] = if start < end { &pair[start..end] } else { &[] };
                        if !mid.is_empty() {
                            let seq_id = |e: &Value| {
                                e.get("Sequence")
                                    .and_then(|t| t.get("id"))
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            };
                            let a = seq_id(&mid[0]);
                            let b = seq_id(&mid[mid.len() - 1]);
                            if a.as_deref() == Some("A") && b.as_deref() == Some("B") && mid.len() > 2 {
                                let inner = &mid[1..mid.len() - 1];
                                let mut add_sep = false;
                                if let Some(entry) = special_id(&inner[0]).filter(|x| !x.is_empty()) {
                                    let v = s(&entry);
                                    if (v == special_sep || v == special_eos) && special_last.is_none() {
                                        add_sep = true;
                                    }
                                }
                                if inner.len() == 2 {
                                    if let Some(entry) = special_id(&inner[1]).filter(|x| !x.is_empty()) {
                                        let v = s(&entry);
                                        if v == special_sep || v == special_eos {
                                            add_sep = true;
                                        }
                                    }
                                }
                                self.set_add("sep", add_sep);
                                if add_sep && !truthy(special_sep.as_ref()) && tc_truthy(&tc) {
                                    set(&mut tc, "sep_token", special_eos.clone().unwrap_or_default());
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// `model.merges` as strings `"a b"` (pairs of the newer format joined, a space inside a part written as U+0120
/// as gguf-py does).
fn merges(tok: &Value) -> Result<Vec<String>, ConvertError> {
    let Some(list) = tok.get("model").and_then(|m| m.get("merges")).and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        match m {
            Value::String(s) => out.push(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &Value| -> Result<String, ConvertError> {
                    let s = v
                        .as_str()
                        .ok_or_else(|| ConvertError::Tokenizer { why: "a merge is not text".into() })?;
                    Ok(s.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect())
                };
                out.push(format!("{} {}", part(&pair[0])?, part(&pair[1])?));
            }
            _ => return Err(ConvertError::Tokenizer { why: "unknown merges format".into() }),
        }
    }
    Ok(out)
}

/// The chat template: tokenizer_config.json's `chat_template`, else chat_template.jinja, else
/// chat_template.json's. Named templates (a list, or additional_chat_templates/) are refused.
fn chat_template(tc: &Map<String, Value>, dir: &Path) -> Result<Option<String>, ConvertError> {
    let jinja = dir.join("chat_template.jinja");
    let json = dir.join("chat_template.json");
    let alt: Option<Value> = if jinja.is_file() {
        if dir.join("additional_chat_templates").is_dir() {
            return Err(ConvertError::Unsupported {
                what: "additional_chat_templates (named chat templates)".into(),
            });
        }
        Some(Value::String(std::fs::read_to_string(&jinja).map_err(crate::error::io_err(&jinja))?))
    } else if json.is_file() {
        crate::read_json(&json, "the chat template")?.get("chat_template").cloned()
    } else {
        None
    };
    let t = match tc.get("chat_template") {
        Some(v) => Some(v.clone()),
        None => alt,
    };
    match t {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Array(_)) => {
            Err(ConvertError::Unsupported { what: "named chat templates (a list)".into() })
        }
        Some(_) => Ok(None),
    }
}
