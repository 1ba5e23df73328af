//! Locating the real model and llama.cpp's reference outputs.

use std::path::PathBuf;
use std::sync::OnceLock;

use pinion_format::Gguf;
use pinion_tokenizer::Tokenizer;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root (`crates/tokenizer/../..`).
pub(crate) fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Reports a missing input: a note when inputs are optional, a failure when `PINION_REQUIRE_MODEL` is set.
pub(crate) fn missing(what: &str, path: &std::path::Path) {
    if std::env::var_os("PINION_REQUIRE_MODEL").is_some() {
        panic!("PINION_REQUIRE_MODEL is set but {what} is missing at {}", path.display());
    }
    eprintln!(
        "note: {what} not found at {}; skipping this test (set PINION_REQUIRE_MODEL to make this fail)",
        path.display()
    );
}

/// SmolLM2's tokenizer, from `$PINION_MODEL` or `<workspace>/models/`, or `None` when the model is absent and
/// not required.
pub(crate) fn smollm() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var_os("PINION_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("models").join(MODEL_FILE));
        if !path.exists() {
            missing("the SmolLM2 model", &path);
            return None;
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let gguf = Gguf::parse(&bytes).expect("model parses as GGUF");
        let start = std::time::Instant::now();
        let tok = Tokenizer::from_gguf(&gguf).expect("SmolLM2 tokenizer loads");
        eprintln!("SmolLM2 tokenizer built in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
        Some(tok)
    })
    .as_ref()
}

/// The text of a file in `<workspace>/../shared/<rel>`, or `None` when absent and not required.
pub(crate) fn shared_file(rel: &str) -> Option<String> {
    let path = workspace().join("..").join("shared").join(rel);
    if !path.exists() {
        missing(rel, &path);
        return None;
    }
    Some(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// Undoes the reference files' escaping: `\n`, `\t`, `\r`, `\\`.
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => panic!("unknown escape \\{other} in reference file"),
            None => panic!("dangling backslash in reference file"),
        }
    }
    out
}

pub(crate) fn parse_ids(s: &str) -> Vec<u32> {
    s.split_whitespace().map(|t| t.parse().expect("reference id is an integer")).collect()
}

/// `(text, ids)` for every non-comment line of `reference/tokenize.tsv`.
pub(crate) fn tokenize_cases() -> Option<Vec<(String, Vec<u32>)>> {
    let text = shared_file("reference/tokenize.tsv")?;
    let cases: Vec<_> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (text, ids) = l.split_once('\t').expect("tokenize.tsv line has a tab");
            (unescape(text), parse_ids(ids))
        })
        .collect();
    assert!(cases.len() >= 20, "tokenize.tsv has only {} cases", cases.len());
    Some(cases)
}
