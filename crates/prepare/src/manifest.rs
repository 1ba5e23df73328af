//! The manifest of a prepared directory (`prepare.json`): which preparation steps it holds, each recorded with
//! the key of its settings and inputs, so that `prepare` resumes where it stopped and redoes a step only when
//! its inputs or settings changed or its output is gone.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::PrepareError;
use crate::files::{from_json, to_json, write_atomic};

/// The `format` field of a prepared directory's manifest.
pub const MANIFEST_FORMAT: &str = "pinion-prepared";
/// The manifest version written. Version 2 keeps the intermediate files in `intermediates/`; version 1 (read,
/// and migrated by [`prepare_dir`](crate::prepare_dir)) kept them beside the model.
pub const MANIFEST_VERSION: u64 = 2;
/// The oldest manifest version read.
pub const OLDEST_MANIFEST_VERSION: u64 = 1;
/// The manifest's file name inside a prepared directory.
pub const MANIFEST_FILE: &str = "prepare.json";

/// The record of which preparation steps a directory holds.
///
/// Each step is recorded with a *key*: a digest of its settings and of the keys of the steps it depends on
/// ([`step_key`]). A step is done when its recorded key equals the key asked for and its output files exist;
/// an intermediate step whose output was removed is still recorded, and is redone only if a later step needs
/// its output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    steps: BTreeMap<String, String>,
    version: Option<u64>,
}

/// The manifest file without its envelope.
#[derive(Serialize, Deserialize)]
struct ManifestBody {
    steps: BTreeMap<String, String>,
}

/// Why a step has to run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redo {
    /// `--force`: every step runs.
    Forced,
    /// The manifest has no record of the step.
    NotDone,
    /// The step was done with other inputs or settings.
    Changed,
    /// The step was done with these inputs and settings, but this output is gone (for an intermediate: removed
    /// when the preparation that made it finished).
    Removed(PathBuf),
    /// This output is of a version an older pinion wrote.
    Outdated(PathBuf),
}

impl fmt::Display for Redo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redo::Forced => f.write_str("forced"),
            Redo::NotDone => f.write_str("not done yet"),
            Redo::Changed => f.write_str("its inputs or settings changed"),
            Redo::Removed(p) => write!(f, "done before, but {} was removed", p.display()),
            Redo::Outdated(p) => write!(f, "{} is of an older version", p.display()),
        }
    }
}

impl Manifest {
    /// Reads `dir`'s manifest; an absent one is empty, an unreadable, foreign or corrupt one is
    /// [`PrepareError::BadPreparedDir`] (or [`PrepareError::Io`]).
    pub fn load(dir: &Path) -> Result<Manifest, PrepareError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(source) => return Err(PrepareError::Io { path, source }),
        };
        let (version, body) =
            from_json::<ManifestBody>(&bytes, MANIFEST_FORMAT, OLDEST_MANIFEST_VERSION..=MANIFEST_VERSION)
                .map_err(|why| PrepareError::BadPreparedDir { path, why })?;
        Ok(Manifest { steps: body.steps, version: Some(version) })
    }

    /// The version of the file it was read from (`None`: there was none).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// The key `step` was recorded with.
    pub fn key(&self, step: &str) -> Option<&str> {
        self.steps.get(step).map(String::as_str)
    }

    /// Why `step` has to run for `key` with `outputs`, or `None` if it was done with `key` and all its
    /// `outputs` exist.
    pub fn redo(&self, step: &str, key: &str, outputs: &[&Path]) -> Option<Redo> {
        match self.steps.get(step) {
            None => Some(Redo::NotDone),
            Some(k) if k != key => Some(Redo::Changed),
            Some(_) => outputs.iter().find(|p| !p.exists()).map(|p| Redo::Removed(p.to_path_buf())),
        }
    }

    /// Whether `step` was done with `key` and all its `outputs` exist.
    pub fn is_done(&self, step: &str, key: &str, outputs: &[&Path]) -> bool {
        self.redo(step, key, outputs).is_none()
    }

    /// Records `step` as done with `key` and writes the manifest (atomically, at the current version) into
    /// `dir`.
    pub fn mark(&mut self, dir: &Path, step: &str, key: &str) -> Result<(), PrepareError> {
        self.steps.insert(step.to_string(), key.to_string());
        self.save(dir)
    }

    /// Writes the manifest (atomically, at the current version) into `dir`.
    pub fn save(&mut self, dir: &Path) -> Result<(), PrepareError> {
        let body = ManifestBody { steps: self.steps.clone() };
        write_atomic(&dir.join(MANIFEST_FILE), &to_json(MANIFEST_FORMAT, MANIFEST_VERSION, &body))?;
        self.version = Some(MANIFEST_VERSION);
        Ok(())
    }
}

/// A step key: the hex SHA-256 of the parts, in order.
pub fn step_key(parts: &[&str]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What identifies an input file for a step key: its path, length and modification time.
pub fn file_identity(path: &Path) -> Result<String, PrepareError> {
    let m =
        std::fs::metadata(path).map_err(|source| PrepareError::Io { path: path.to_path_buf(), source })?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{}:{}:{}", path.display(), m.len(), mtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::partial_path;

    #[test]
    fn manifest_records_steps_and_resumes_only_matching_ones() {
        let dir = std::env::temp_dir().join(format!("pinion-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("profile.bin");
        let mut m = Manifest::load(&dir).unwrap();
        assert_eq!(m, Manifest::default(), "no manifest yet");
        assert_eq!(m.version(), None);
        let key = step_key(&["model:1:2", "calib", "16384 512"]);
        assert_eq!(m.redo("profile", &key, &[&out]), Some(Redo::NotDone));
        m.mark(&dir, "profile", &key).unwrap();
        // Recorded, but the output is missing: not done.
        assert_eq!(m.redo("profile", &key, &[&out]), Some(Redo::Removed(out.clone())));
        std::fs::write(&out, b"x").unwrap();
        let again = Manifest::load(&dir).unwrap();
        assert_eq!(again.version(), Some(MANIFEST_VERSION));
        assert_eq!(again.key("profile"), Some(key.as_str()));
        assert!(again.is_done("profile", &key, &[&out]));
        // Another setting or another step is not done.
        let other = step_key(&["model:1:2", "calib", "8192 512"]);
        assert_eq!(again.redo("profile", &other, &[&out]), Some(Redo::Changed));
        assert_eq!(again.redo("pack", &key, &[&out]), Some(Redo::NotDone));
        // Keys separate their parts: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(step_key(&["ab", "c"]), step_key(&["a", "bc"]));
        // The file is the documented JSON.
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(v["format"], MANIFEST_FORMAT);
        assert_eq!(v["version"], MANIFEST_VERSION);
        assert_eq!(v["steps"]["profile"], key.as_str());
        // Version 1 is read (and written back as the current version).
        let v1 = format!(r#"{{"format": "pinion-prepared", "version": 1, "steps": {{"pack": "{key}"}}}}"#);
        std::fs::write(dir.join(MANIFEST_FILE), v1).unwrap();
        let mut old = Manifest::load(&dir).unwrap();
        assert_eq!((old.version(), old.key("pack")), (Some(1), Some(key.as_str())));
        old.save(&dir).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap().version(), Some(MANIFEST_VERSION));
        // A foreign, corrupt or future manifest is a typed error, not an empty one.
        for text in [
            &br#"{"format": "other", "version": 1, "steps": {}}"#[..],
            br#"{"format": "pinion-prepared", "version": 3, "steps": {}}"#,
            br#"{"format": "pinion-prepared", "version": 2, "steps": []}"#,
            br#"{"format": "pinion-prepared", "version": 2, "steps": {"pack": 7}}"#,
            br#"{"format": "pinion-prepared", "version": 2}"#,
            b"{",
            b"",
        ] {
            std::fs::write(dir.join(MANIFEST_FILE), text).unwrap();
            let e = Manifest::load(&dir);
            assert!(matches!(e, Err(PrepareError::BadPreparedDir { .. })), "{e:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_identity_changes_with_the_file() {
        let dir = std::env::temp_dir().join(format!("pinion-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        std::fs::write(&f, b"one").unwrap();
        let a = file_identity(&f).unwrap();
        std::fs::write(&f, b"three").unwrap();
        assert_ne!(file_identity(&f).unwrap(), a);
        assert!(matches!(file_identity(&dir.join("missing")), Err(PrepareError::Io { .. })));
        assert_eq!(partial_path(&f), dir.join("a.txt.partial"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
