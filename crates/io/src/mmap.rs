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

    /// Drops the pages of `range` (clamped to the file, widened to whole pages) from this process's resident
    /// set (`madvise(MADV_DONTNEED)`): a later read of them faults them in again from the file, with the same
    /// bytes. This is how a caller that had to read a large part of the map once (to check a checksum, say)
    /// keeps it from counting against its memory budget afterwards. The page cache is not touched.
    pub fn release(&self, range: std::ops::Range<usize>) -> io::Result<()> {
        let end = range.end.min(self.map.len());
        let page = 4096;
        let start = range.start / page * page;
        if start >= end {
            return Ok(());
        }
        // SAFETY: the map is a read-only, shared mapping of a file (`MmapOptions::map`), never written through.
        // For such a mapping MADV_DONTNEED only unmaps the pages: the next access faults them in again from the
        // file, so every outstanding `&[u8]` into the map keeps reading the same bytes (the file is not modified
        // while mapped: the contract on this type). The range is inside the map (clamped above; `start` is
        // rounded down to a page, which the mapping's page-aligned start keeps inside it).
        unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) }
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

    /// Pages of the map resident in this process (from /proc/self/smaps), in KiB.
    fn mapped_rss_kib(m: &MappedFile) -> u64 {
        let start = m.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, _)) = range.split_once('-') {
                    if let Ok(a) = usize::from_str_radix(a, 16) {
                        inside = a == start;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("Rss:") {
                    return v.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("map not found in smaps")
    }

    #[test]
    fn release_drops_pages_from_the_resident_set_and_keeps_the_bytes() {
        let dir = std::env::temp_dir().join(format!("pinion-io-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let m = MappedFile::open(&p).unwrap();
        assert_eq!(&m[..], &data[..]);
        let before = mapped_rss_kib(&m);
        assert!(before >= 1000, "{before} KiB resident after reading 1 MiB");
        m.release(100..m.len() + 5).unwrap();
        let after = mapped_rss_kib(&m);
        assert!(after <= 4, "{after} KiB resident after release");
        assert_eq!(&m[..], &data[..], "bytes after release");
        m.release(10..10).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
