//! The `general.*` metadata convert_hf_to_gguf.py writes (gguf-py's `Metadata`): sampling defaults from
//! generation_config.json, and the name, basename, finetune, version and size label guessed from
//! config.json's `_name_or_path` and the model directory's name, with the same heuristics.
//!
//! A model card (README.md front matter: license, tags, languages, base models, datasets) is not read.

use std::path::Path;
use std::sync::LazyLock;

use pinion_format::Value as Gv;
use regex::Regex;
use serde_json::{Map, Value};

/// Name components of a model id (`get_model_id_components`).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct IdParts {
    pub(crate) full_name: Option<String>,
    pub(crate) org: Option<String>,
    pub(crate) basename: Option<String>,
    pub(crate) finetune: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) size_label: Option<String>,
}

static VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(v|iter)?\d+([.]\d+)*$").expect("regex"));
static QTYPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(i?q\d(_\w)*|b?fp?(16|32))$").expect("regex"));
static SIZE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)$").expect("regex")
});
static FINETUNE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^(chat|instruct|vision|lora)$").expect("regex"));
static TITLE_KEEP: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^(v\d+(?:\.\d+)*|\d.*)$").expect("regex"));

const BASENAME: u8 = 1;
const SIZE_LABEL: u8 = 2;
const FINETUNE_T: u8 = 4;
const VERSION_T: u8 = 8;
const TYPE_T: u8 = 16;

/// `Metadata.get_model_id_components`.
pub(crate) fn model_id_components(model_id: &str, total_params: i64) -> IdParts {
    if model_id.contains(' ') {
        return IdParts { full_name: Some(model_id.to_string()), ..IdParts::default() };
    }
    let (mut org, full) = match model_id.split_once('/') {
        Some((o, f)) => (Some(o.to_string()), f.to_string()),
        None => (None, model_id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        org = None;
    }
    let mut parts: Vec<String> = full.split('-').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let mut types = vec![0u8; parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if VERSION.is_match(&part) {
            types[i] |= VERSION_T;
        } else if QTYPE.is_match(&part) {
            types[i] |= TYPE_T;
            parts[i] = part.to_uppercase();
        } else if i > 0 && SIZE.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            if p.last().is_some_and(|c| c.is_ascii_digit()) && p.len() >= 2 {
                let n = p.len();
                let (a, b) = (p[n - 2], p[n - 1]);
                p.truncate(n - 2);
                p.extend(['.', b, a]);
            }
            let n = p.len();
            if n > 1 && p[n - 2].is_ascii_digit() && "kmbt".contains(p[n - 1]) {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total_params != 0 {
                let head: String = p[..p.len() - 1].iter().collect();
                if let Ok(x) = head.parse::<f64>() {
                    let unit = " KMBT".find(p[p.len() - 1]).map_or(-1, |u| u as i32);
                    let label = x * 1000f64.powi(unit);
                    let context_length = if total_params < 0 {
                        label < (total_params.abs() / 8) as f64
                    } else {
                        (label - total_params as f64).abs() > (7 * total_params).div_euclid(8) as f64
                    };
                    if context_length {
                        types[i] |= FINETUNE_T;
                        let last = p.len() - 1;
                        p[last] = p[last].to_ascii_lowercase();
                    }
                }
            }
            if types[i] == 0 {
                types[i] |= SIZE_LABEL;
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && FINETUNE.is_match(&part) {
            if total_params < 0 && part.eq_ignore_ascii_case("lora") {
                types[i] |= TYPE_T;
            } else {
                types[i] |= FINETUNE_T;
            }
        }
    }
    let numeric_size =
        parts.iter().zip(&types).any(|(p, t)| t & SIZE_LABEL != 0 && p.chars().any(|c| c.is_ascii_digit()));
    if numeric_size {
        for (p, t) in parts.iter().zip(types.iter_mut()) {
            if *t & SIZE_LABEL != 0 && p.chars().all(char::is_alphabetic) {
                *t &= !SIZE_LABEL;
            }
        }
    }
    let mut at_start = true;
    for (p, t) in parts.iter().zip(types.iter_mut()) {
        let starts_alpha = p.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((*t == 0 && starts_alpha) || *t & VERSION_T != 0) {
            *t |= BASENAME;
        } else {
            at_start = false;
            if *t == 0 {
                *t |= FINETUNE_T;
            }
        }
    }
    for t in types.iter_mut().rev() {
        if *t & BASENAME != 0 && *t != BASENAME {
            *t &= !BASENAME;
        } else {
            break;
        }
    }
    let join = |f: &dyn Fn(u8) -> bool| -> Option<String> {
        let mut seen: Vec<&str> = Vec::new();
        for (p, &t) in parts.iter().zip(&types) {
            if f(t) {
                seen.push(p);
            }
        }
        if seen.is_empty() { None } else { Some(seen.join("-")) }
    };
    let mut basename = join(&|t| t & BASENAME != 0);
    let size_label = {
        let mut labels: Vec<&str> = Vec::new();
        for (p, &t) in parts.iter().zip(&types) {
            if t & SIZE_LABEL != 0 && !labels.contains(&p.as_str()) {
                labels.push(p);
            }
        }
        if labels.is_empty() { None } else { Some(labels.join("-")) }
    };
    let finetune = join(&|t| t & FINETUNE_T != 0);
    let version = join(&|t| t & VERSION_T != 0 && t & BASENAME == 0);
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        basename = None;
    }
    IdParts { full_name: Some(full), org, basename, finetune, version, size_label }
}

/// `Metadata.id_to_title`: words title-cased unless they are acronyms or version numbers.
pub(crate) fn id_to_title(s: &str) -> String {
    s.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| if is_lower(w) && !TITLE_KEEP.is_match(w) { title(w) } else { w.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Python's `str.islower`: some cased character, none uppercase.
fn is_lower(w: &str) -> bool {
    w.chars().any(|c| c.is_lowercase() || c.is_uppercase()) && !w.chars().any(char::is_uppercase)
}

/// Python's `str.title`: a cased character after an uncased one is uppercased, others lowercased.
fn title(w: &str) -> String {
    let mut out = String::new();
    let mut prev_cased = false;
    for c in w.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if cased && !prev_cased {
            out.extend(c.to_uppercase());
        } else if cased {
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
        prev_cased = cased;
    }
    out
}

/// gguf-py's `size_label` for a dense model: the parameter count with two significant digits and a suffix.
pub(crate) fn size_label(total_params: u64) -> String {
    let n = total_params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let int_digits = format!("{}", scaled.round_ties_even() as i64);
    let fix = 2usize.saturating_sub(int_digits.trim_start_matches('0').len());
    format!("{scaled:.fix$}{suffix}")
}

/// The `general.*` entries after `general.architecture` and `general.type`, in the reference's order.
pub(crate) fn general(dir: &Path, raw_config: &Map<String, Value>, total_params: u64) -> Vec<(String, Gv)> {
    let total = total_params as i64;
    let mut name: Option<String> = None;
    let mut org: Option<String> = None;
    let mut basename: Option<String> = None;
    let mut finetune: Option<String> = None;
    let mut version: Option<String> = None;
    let mut size: Option<String> = None;
    let mut apply = |id: &str| {
        let p = model_id_components(id, total);
        if name.is_none() {
            name = p.full_name.as_deref().map(id_to_title);
        }
        if org.is_none() {
            org = p.org.as_deref().map(id_to_title);
        }
        basename = basename.take().or(p.basename);
        finetune = finetune.take().or(p.finetune);
        version = version.take().or(p.version);
        size = size.take().or(p.size_label);
    };
    if let Some(Value::String(id)) = raw_config.get("_name_or_path") {
        if id.matches('/').count() <= 1 {
            apply(id);
        }
    }
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    apply(&dir_name);
    let name = name.unwrap_or(dir_name);
    let size = size.or_else(|| (total_params > 0).then(|| size_label(total_params)));

    let mut out: Vec<(String, Gv)> = sampling(dir);
    out.push(("general.name".into(), name.into()));
    if let Some(v) = version {
        out.push(("general.version".into(), v.into()));
    }
    if let Some(v) = org {
        out.push(("general.organization".into(), v.into()));
    }
    if let Some(v) = finetune {
        out.push(("general.finetune".into(), v.into()));
    }
    if let Some(v) = basename {
        out.push(("general.basename".into(), v.into()));
    }
    if let Some(v) = size {
        out.push(("general.size_label".into(), v.into()));
    }
    out
}

/// `general.sampling.*` from generation_config.json (ignored when it does not parse, as the reference does).
fn sampling(dir: &Path) -> Vec<(String, Gv)> {
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else { return Vec::new() };
    let Ok(Value::Object(g)) = serde_json::from_str::<Value>(&text) else { return Vec::new() };
    let mut out = Vec::new();
    let int = |k: &str| g.get(k).and_then(Value::as_i64).map(|v| Gv::I32(v as i32));
    let float = |k: &str| g.get(k).and_then(Value::as_f64).map(|v| Gv::F32(v as f32));
    let repeat = match g.get("penalty_repeat") {
        Some(v) => v.as_f64().map(|v| Gv::F32(v as f32)),
        None => float("repetition_penalty"),
    };
    let entries = [
        ("sequence", g.get("sequence").and_then(Value::as_str).map(|s| Gv::String(s.to_string()))),
        ("top_k", int("top_k")),
        ("top_p", float("top_p")),
        ("min_p", float("min_p")),
        ("xtc_probability", float("xtc_probability")),
        ("xtc_threshold", float("xtc_threshold")),
        ("temp", float("temperature")),
        ("penalty_last_n", int("penalty_last_n")),
        ("penalty_repeat", repeat),
        ("mirostat", int("mirostat")),
        ("mirostat_tau", float("mirostat_tau")),
        ("mirostat_eta", float("mirostat_eta")),
    ];
    for (k, v) in entries {
        if let Some(v) = v {
            out.push((format!("general.sampling.{k}"), v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_split_as_gguf_py_does() {
        let p = model_id_components("Tiny-Llama3-v0.1", 123_000);
        assert_eq!(p.basename.as_deref(), Some("Tiny-Llama3"));
        assert_eq!(p.version.as_deref(), Some("v0.1"));
        let p = model_id_components("Qwen/Qwen2.5-7B-Instruct", 7_600_000_000);
        assert_eq!(p.org.as_deref(), Some("Qwen"));
        assert_eq!(p.basename.as_deref(), Some("Qwen2.5"));
        assert_eq!(p.size_label.as_deref(), Some("7B"));
        assert_eq!(p.finetune.as_deref(), Some("Instruct"));
        let p = model_id_components("Mistral-7B-Instruct-v0.2-32k", 7_000_000_000);
        assert_eq!(p.size_label.as_deref(), Some("7B"));
        assert_eq!(p.version.as_deref(), Some("v0.2"));
        assert_eq!(id_to_title("tiny-qwen2.5-instruct"), "Tiny Qwen2.5 Instruct");
        assert_eq!(size_label(123_456), "123K");
        assert_eq!(size_label(1_234_567), "1.2M");
        assert_eq!(size_label(7_615_616_512), "7.6B");
    }
}
