//! Writing the files of a prepared directory: never half-written (a temporary name, renamed into place), and
//! read back with typed errors.

use std::path::{Path, PathBuf};

use pinion_plan::{DeviceProfile, Plan};

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
