//! Fixture paths and conversion into a temporary directory.

use std::path::{Path, PathBuf};

use pinion_convert::{ConvertError, ConvertParams, OutType, Summary, convert};

/// The fixtures: model directory names under tests/data/hf.
pub(crate) const FIXTURES: [&str; 4] =
    ["Tiny-Llama3-v0.1", "tiny-qwen2.5-instruct", "tiny-qwen3-150K", "SmolLM2-tiny-Instruct"];

/// The output types, with the file suffix of the reference files.
pub(crate) const TYPES: [(OutType, &str); 3] =
    [(OutType::F16, "f16"), (OutType::Q8_0, "q8_0"), (OutType::Q4_0, "q4_0")];

pub(crate) fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf")
}

/// A directory of its own under the target directory, emptied.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("convert-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) fn run(model_dir: &Path, out: &Path, out_type: OutType) -> Result<Summary, ConvertError> {
    convert(&ConvertParams { model_dir, out, out_type })
}

/// Copies a fixture's directory (to be damaged), keeping its name.
pub(crate) fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(data().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}
