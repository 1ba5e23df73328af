//! Helpers shared by the integration tests: locating the real model and the reference files.

use std::path::PathBuf;

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real SmolLM2 model, or `None` (with a note) when it is absent and not required.
///
/// When `PINION_REQUIRE_MODEL` is set (as `cargo xtask test` sets it after fetching the model), a missing
/// model is a failure, so CI cannot pass without running these tests.
pub(crate) fn model_path() -> Option<PathBuf> {
    real_model("PINION_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real Gemma 3 270M model (`PINION_GEMMA_MODEL`, else `models/gemma-3-270m-q4_k_m.gguf`), as
/// [`model_path`].
pub(crate) fn gemma_path() -> Option<PathBuf> {
    real_model("PINION_GEMMA_MODEL", "gemma-3-270m-q4_k_m.gguf")
}

fn real_model(var: &str, file: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| root().join("models").join(file));
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("PINION_REQUIRE_MODEL").is_some() {
        panic!("PINION_REQUIRE_MODEL is set but the model is missing at {}", p.display());
    }
    eprintln!(
        "note: {} is absent; skipping (run `cargo xtask fetch` to test on the real model)",
        p.display()
    );
    None
}

/// The directory of llama.cpp's reference outputs (`../shared/reference` beside the workspace).
pub(crate) fn reference_dir() -> PathBuf {
    root().join("../shared/reference")
}

/// llama.cpp's outputs on Gemma 3 270M, made for these tests (see the README there).
pub(crate) fn gemma_reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3")
}

/// Unescapes the reference files' text column (`\n`, `\t`, `\r`, `\\`).
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Parses space-separated ids.
pub(crate) fn ids(s: &str) -> Vec<u32> {
    s.split_whitespace().map(|x| x.parse().expect("id")).collect()
}
