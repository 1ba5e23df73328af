//! Writing the files of a prepared directory: never half-written (a temporary name, renamed into place), and
//! read back with typed errors. JSON files share one envelope, `{"format": NAME, "version": N, ...fields}`,
//! written and read with serde ([`to_json`], [`from_json`]).

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use pinion_plan::{DeviceProfile, Plan};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{PrepareError, io_err};

/// Writes `bytes` to `path.partial`, then renames it to `path`: a reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PrepareError> {
    let tmp = partial_path(path);
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// `FILE.partial` beside `FILE`: where [`write_atomic`] writes before renaming.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes a device profile file (`device.json`).
pub fn save_device(profile: &DeviceProfile, path: &Path) -> Result<(), PrepareError> {
    write_atomic(path, profile.to_json().as_bytes())
}

/// Reads a device profile file.
pub fn load_device(path: &Path) -> Result<DeviceProfile, PrepareError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(DeviceProfile::from_json(&text, &path.display().to_string())?)
}

/// Writes a plan file (`plan.json`).
pub fn save_plan(plan: &Plan, path: &Path) -> Result<(), PrepareError> {
    write_atomic(path, plan.to_json().as_bytes())
}

/// Reads a plan file.
pub fn load_plan(path: &Path) -> Result<Plan, PrepareError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(Plan::from_json(&text, &path.display().to_string())?)
}

/// The envelope's own fields, read first so that a foreign file or another version is named as such rather
/// than as a missing field.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u64,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    format: &'a str,
    version: u64,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    #[serde(flatten)]
    body: T,
}

/// `body` as pretty JSON inside the envelope `{"format": format, "version": version, ...}`.
pub(crate) fn to_json<T: Serialize>(format: &str, version: u64, body: &T) -> Vec<u8> {
    let file = EnvelopeOut { format, version, body };
    // Serializing plain derived structs into a Vec cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec_pretty(&file).unwrap_or_default()
}

/// Reads a body written by [`to_json`]: the format must be `format` and the version in `versions`. Returns the
/// version found and the body; the error says what is wrong, for the caller's typed error.
pub(crate) fn from_json<T: DeserializeOwned>(
    bytes: &[u8],
    format: &str,
    versions: RangeInclusive<u64>,
) -> Result<(u64, T), String> {
    let h: Header = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a {format} file (no format and version: {e})"))?;
    if h.format != format {
        return Err(format!("format is \"{}\", not \"{format}\"", h.format));
    }
    if !versions.contains(&h.version) {
        let (lo, hi) = (versions.start(), versions.end());
        let reads = if lo == hi { format!("{lo}") } else { format!("{lo} to {hi}") };
        return Err(format!("version {} (this pinion reads {reads})", h.version));
    }
    let e: EnvelopeIn<T> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok((h.version, e.body))
}
