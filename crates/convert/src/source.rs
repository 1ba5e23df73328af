//! The safetensors files of a checkpoint: which files (model.safetensors.index.json, else every
//! `model*.safetensors`), each file's header (parsed and validated by the `safetensors` crate), and each tensor's
//! bytes, read when it is converted with a positioned read (one tensor in memory at a time).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::Metadata;
use serde_json::Value;

use crate::error::{ConvertError, io_err};

/// The largest safetensors header read (the `safetensors` crate's own cap).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// The element types read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SrcType {
    F32,
    F16,
    BF16,
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub(crate) struct SrcTensor {
    pub(crate) name: String,
    pub(crate) part: usize,
    /// Absolute offset of the data in the file.
    pub(crate) offset: u64,
    pub(crate) ty: SrcType,
    /// Outermost first, as safetensors and PyTorch give it.
    pub(crate) shape: Vec<usize>,
}

impl SrcTensor {
    pub(crate) fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The open safetensors files and their tensors, in the order the reference converter visits them: files in
/// name order, each file's tensors in name order.
#[derive(Debug)]
pub(crate) struct Source {
    files: Vec<(PathBuf, File)>,
    pub(crate) tensors: Vec<SrcTensor>,
}

impl Source {
    pub(crate) fn open(dir: &Path) -> Result<Source, ConvertError> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut from_index: Option<BTreeMap<String, String>> = None;
        let part_names: Vec<String> = if index_path.is_file() {
            let index = crate::read_json(&index_path, "the index of the safetensors files")?;
            let map = match index.get("weight_map") {
                Some(Value::Object(m)) => m,
                _ => return Err(ConvertError::BadIndex { why: "no weight_map object".into() }),
            };
            let mut wm = BTreeMap::new();
            for (k, v) in map {
                let file = v
                    .as_str()
                    .ok_or_else(|| ConvertError::BadIndex { why: format!("{k}: not a file name") })?;
                if file.contains('/') || file.contains("..") {
                    return Err(ConvertError::BadIndex {
                        why: format!("{k}: file {file:?} outside the directory"),
                    });
                }
                wm.insert(k.clone(), file.to_string());
            }
            let parts: BTreeSet<String> = wm.values().cloned().collect();
            from_index = Some(wm);
            parts.into_iter().collect()
        } else {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
                let name = entry.map_err(io_err(dir))?.file_name().to_string_lossy().into_owned();
                if name.starts_with("model") && name.ends_with(".safetensors") {
                    names.push(name);
                }
            }
            names.sort();
            names
        };
        if part_names.is_empty() {
            let bin = dir.join("pytorch_model.bin");
            if bin.is_file() {
                return Err(ConvertError::Unsupported {
                    what: format!("{} (PyTorch pickle weights; safetensors only)", bin.display()),
                });
            }
            return Err(ConvertError::MissingFile {
                path: dir.join("model.safetensors"),
                what: "the weights",
            });
        }
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut seen = BTreeSet::new();
        for (part, name) in part_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(io_err(&path))?;
            let mut part_tensors = read_header(&path, &file, part)?;
            part_tensors.sort_by(|a, b| a.name.cmp(&b.name));
            for t in part_tensors {
                if !seen.insert(t.name.clone()) {
                    return Err(ConvertError::DuplicateTensor { name: t.name });
                }
                tensors.push(t);
            }
            files.push((path, file));
        }
        if let Some(wm) = from_index {
            let in_index: BTreeSet<&String> = wm.keys().collect();
            let in_files: BTreeSet<&String> = seen.iter().collect();
            let missing: Vec<&&String> = in_index.difference(&in_files).collect();
            let extra: Vec<&&String> = in_files.difference(&in_index).collect();
            if !missing.is_empty() || !extra.is_empty() {
                return Err(ConvertError::BadIndex {
                    why: format!(
                        "tensors missing from the files: {missing:?}; tensors not in the index: {extra:?}"
                    ),
                });
            }
        }
        Ok(Source { files, tensors })
    }

    /// The tensor's values as f32 (BF16 and F16 widen exactly).
    pub(crate) fn read_f32(&self, t: &SrcTensor) -> Result<Vec<f32>, ConvertError> {
        let (path, file) = &self.files[t.part];
        let width = match t.ty {
            SrcType::F32 => 4,
            SrcType::F16 | SrcType::BF16 => 2,
        };
        let mut bytes = vec![0u8; t.n_elements() * width];
        file.read_exact_at(&mut bytes, t.offset).map_err(io_err(path))?;
        Ok(match t.ty {
            SrcType::F32 => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            SrcType::F16 => {
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            SrcType::BF16 => {
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
        })
    }
}

/// Parses the header of one file and checks that the file is exactly as long as the header says.
fn read_header(path: &Path, file: &File, part: usize) -> Result<Vec<SrcTensor>, ConvertError> {
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let bad = |why: String| ConvertError::BadSafetensors { path: path.to_path_buf(), why };
    if file_len < 8 {
        return Err(ConvertError::Truncated { path: path.to_path_buf(), expected: 8, got: file_len });
    }
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(io_err(path))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_LEN {
        return Err(bad(format!("header of {n} bytes (at most {MAX_HEADER_LEN})")));
    }
    if 8 + n > file_len {
        return Err(ConvertError::Truncated { path: path.to_path_buf(), expected: 8 + n, got: file_len });
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(io_err(path))?;
    let meta: Metadata = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + n;
    let expected = data_start + meta.data_len() as u64;
    if expected != file_len {
        return Err(ConvertError::Truncated { path: path.to_path_buf(), expected, got: file_len });
    }
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let ty = match info.dtype {
            Dtype::F32 => SrcType::F32,
            Dtype::F16 => SrcType::F16,
            Dtype::BF16 => SrcType::BF16,
            other => {
                return Err(ConvertError::UnsupportedDtype { tensor: name, dtype: format!("{other:?}") });
            }
        };
        out.push(SrcTensor {
            name,
            part,
            offset: data_start + info.data_offsets.0 as u64,
            ty,
            shape: info.shape.clone(),
        });
    }
    Ok(out)
}
