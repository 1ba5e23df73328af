//! Read-only memory maps of model files.

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A file mapped read-only into memory.
///
/// The contract, inherited from `memmap2`: the file must not be truncated or written while it is mapped. Model
/// files are written once (by `xtask` or a download, to a temporary name and renamed into place) and then only
/// read, which is what makes mapping them sound in practice; a process that truncates a mapped model file under
/// pinion can make it fault, as with any mmap-based loader (llama.cpp included).
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            // Mapping an empty file fails on Linux; an empty slice is the honest view of it.
            return Ok(MappedFile {
                map: memmap2::MmapOptions::new().len(0).map_anon()?.make_read_only()?,
                path: path.to_path_buf(),
            });
        }
        // SAFETY: The map is read-only, and pinion's contract (documented on this type) is that model files are
        // not modified while mapped. Under that contract the mapped bytes stay valid and unchanging for the
        // lifetime of `map`, which owns the mapping.
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        Ok(MappedFile { map, path: path.to_path_buf() })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Advises the kernel that the mapping will be read at random (no read-ahead beyond what is touched).
    pub fn advise_random(&self) -> io::Result<()> {
        self.map.advise(memmap2::Advice::Random)
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_file_contents() {
        let dir = std::env::temp_dir().join(format!("pinion-io-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        std::fs::write(&p, b"hello mapped world").unwrap();
        let m = MappedFile::open(&p).unwrap();
        assert_eq!(&m[..], b"hello mapped world");
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert_eq!(MappedFile::open(&dir.join("empty")).unwrap().len(), 0);
        assert_eq!(MappedFile::open(&dir.join("missing")).unwrap_err().kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
