//! Source hygiene and layering checks, run by `cargo xtask test` and CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Every `.rs` file under `crates/`, `xtask/`, `benches/` and `fuzz/` opens with a `//!` line, and no test is
/// marked `#[should_panic]` or `#[ignore]` (assert on the `Err` instead; gate slow tests on an env var).
pub(crate) fn tidy(root: &Path) -> Result<()> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "benches", "fuzz"] {
        collect_rs(&root.join(dir), &mut files)?;
    }
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let rel = f.strip_prefix(root).unwrap_or(f).display().to_string();
        if !text.starts_with("//!") {
            problems.push(format!("{rel}: does not open with a //! comment"));
        }
        for (i, line) in text.lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("#[should_panic") || l.starts_with("#[ignore") {
                problems.push(format!("{rel}:{}: {l} (assert on the error instead)", i + 1));
            }
        }
    }
    if !problems.is_empty() {
        bail!("tidy found {} problem(s):\n  {}", problems.len(), problems.join("\n  "));
    }
    eprintln!("xtask tidy: {} files ok", files.len());
    Ok(())
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "corpus" && name != "artifacts" {
                collect_rs(&p, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The internal dependencies each package may have (normal dependencies only). Mirrors docs/architecture.md.
const ALLOWED: &[(&str, &[&str])] = &[
    ("pinion-format", &[]),
    ("pinion-io", &[]),
    ("pinion-tokenizer", &["pinion-format"]),
    ("pinion-cache", &["pinion-format", "pinion-io"]),
    ("pinion-exec-cpu", &["pinion-format"]),
    ("pinion-exec-npu", &["pinion-format", "pinion-exec-cpu"]),
    ("pinion-predictor", &["pinion-format", "pinion-exec-cpu"]),
    ("pinion-plan", &[]),
    (
        "pinion-runtime",
        &[
            "pinion-format",
            "pinion-io",
            "pinion-tokenizer",
            "pinion-cache",
            "pinion-exec-cpu",
            "pinion-exec-npu",
            "pinion-predictor",
            "pinion-plan",
        ],
    ),
    (
        "pinion-prepare",
        &[
            "pinion-format",
            "pinion-io",
            "pinion-exec-cpu",
            "pinion-predictor",
            "pinion-plan",
            "pinion-runtime",
        ],
    ),
    ("pinion-cli", &["pinion-runtime", "pinion-prepare", "pinion-plan"]),
];

/// Compares every workspace package's internal dependencies with [`ALLOWED`]. Tools (xtask, benches) may use
/// anything, and nothing may depend on them.
pub(crate) fn check_layering(root: &Path) -> Result<()> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"].as_array().context("cargo metadata: no packages")?;
    let names: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let tools = ["pinion-xtask", "pinion-benches"];
    let mut problems = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        for dep in p["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or("?");
            if !names.contains(dep_name) {
                continue;
            }
            if tools.contains(&dep_name) {
                problems.push(format!("{name} depends on the tool {dep_name}"));
                continue;
            }
            let normal = dep["kind"].is_null();
            if tools.contains(&name) || !normal {
                continue;
            }
            match allowed.get(name) {
                Some(ok) if ok.contains(&dep_name) => {}
                Some(_) => problems.push(format!("{name} may not depend on {dep_name}")),
                None => problems.push(format!("{name} is not in the layering table (xtask/src/tidy.rs)")),
            }
        }
    }
    if !problems.is_empty() {
        bail!("layering violations:\n  {}", problems.join("\n  "));
    }
    eprintln!("xtask check-layering: {} packages ok", names.len());
    Ok(())
}
