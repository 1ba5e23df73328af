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
    ("pinion-convert", &["pinion-format", "pinion-tokenizer"]),
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
    ("pinion-serve", &["pinion-runtime"]),
    ("pinion-cli", &["pinion-runtime", "pinion-prepare", "pinion-plan", "pinion-serve", "pinion-convert"]),
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
    check_module_cycles(root)
}

/// Within each library crate, the top-level modules (`src/foo.rs` or `src/foo/`) must not import each other in a
/// circle: a module's references to `crate::bar` (in `use` items and paths, its submodules included) are edges,
/// and a cycle among them is an error naming it. Test modules (`tests.rs`, `#[cfg(test)]` files) are left out,
/// and so are the references of a crate's `error` module: the one error type names the types of the modules
/// whose failures it describes, and every module returns it.
pub(crate) fn check_module_cycles(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let mut n_crates = 0;
    for entry in std::fs::read_dir(root.join("crates"))? {
        let dir = entry?.path();
        let src = dir.join("src");
        // pinion-io's engine starts its backends (pread, io_uring), which share the engine's request types.
        if !src.join("lib.rs").is_file() || dir.ends_with("io") {
            continue;
        }
        n_crates += 1;
        let graph = module_graph(&src)?;
        if let Some(cycle) = find_cycle(&graph) {
            problems.push(format!("{}: {}", src.display(), cycle.join(" -> ")));
        }
    }
    if !problems.is_empty() {
        bail!("module import cycles:\n  {}", problems.join("\n  "));
    }
    eprintln!("xtask check-layering: no module import cycle in {n_crates} library crates");
    Ok(())
}

/// Each top-level module of the crate at `src` and the other top-level modules it refers to.
fn module_graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src)? {
        let p = entry?.path();
        let name = p.file_stem().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if name == "lib" || name == "tests" || name.is_empty() {
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            collect_rs(&p, &mut files)?;
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p.clone());
            // `foo.rs` with its submodules in `foo/`.
        }
        modules.entry(name).or_default().extend(files);
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (m, files) in &modules {
        let mut deps = BTreeSet::new();
        if m == "error" {
            graph.insert(m.clone(), deps);
            continue;
        }
        for f in files {
            let text = std::fs::read_to_string(f)?;
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            // Only the code before a trailing `#[cfg(test)] mod tests` block counts, without comments.
            let code: String = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or("")
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let code = code.as_str();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + 7..];
                let word: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if word != *m && names.contains(&word) {
                    deps.insert(word);
                }
            }
            // `use crate::{a, b::c}` groups.
            for (i, _) in code.match_indices("use crate::{") {
                let group = &code[i + 12..];
                let group = &group[..group.find('}').unwrap_or(0)];
                for part in group.split(',') {
                    let word: String =
                        part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if word != *m && names.contains(&word) {
                        deps.insert(word);
                    }
                }
            }
        }
        graph.insert(m.clone(), deps);
    }
    Ok(graph)
}

/// A cycle in `graph` (as the modules along it, the first repeated at the end), if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == d).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, graph, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(edges: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        edges.iter().map(|(m, ds)| (m.to_string(), ds.iter().map(|d| d.to_string()).collect())).collect()
    }

    #[test]
    fn cycles_are_found_and_dags_pass() {
        assert_eq!(find_cycle(&g(&[("a", &["b"]), ("b", &["c"]), ("c", &[])])), None);
        let c = find_cycle(&g(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])).unwrap();
        assert_eq!(c.first(), c.last());
        assert_eq!(c.len(), 4);
        assert!(find_cycle(&g(&[("x", &["y"]), ("y", &["x"]), ("z", &[])])).is_some());
    }

    #[test]
    fn module_graph_reads_crate_paths() {
        let dir = std::env::temp_dir().join(format!("pinion-modgraph-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b")).unwrap();
        std::fs::write(dir.join("lib.rs"), "//! x\nmod a;\nmod b;\n").unwrap();
        std::fs::write(dir.join("a.rs"), "//! a\nuse crate::{b::B, c};\n").unwrap();
        std::fs::write(dir.join("b.rs"), "//! b\nmod inner;\n").unwrap();
        std::fs::write(dir.join("b/inner.rs"), "//! inner\nfn f() { crate::a::g(); }\n").unwrap();
        std::fs::write(dir.join("c.rs"), "//! c\n#[cfg(test)]\nmod tests { use crate::a; }\n").unwrap();
        let graph = module_graph(&dir).unwrap();
        assert_eq!(graph["a"], ["b", "c"].iter().map(|s| s.to_string()).collect());
        assert_eq!(graph["b"], ["a"].iter().map(|s| s.to_string()).collect());
        assert!(graph["c"].is_empty());
        assert!(find_cycle(&graph).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
