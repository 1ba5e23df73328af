//! The resident section's checksums, new in packed format version 2: a CRC-32 of every tensor of the resident
//! GGUF, and of every row of the tensors a runtime streams row by row (the output head and the token embedding).
//!
//! They are stored in the index after the layer entries, so the index CRC covers them, and they carry each
//! tensor's name, absolute file offset and length: a reader holding only the header page and the index
//! ([`parse_packed_index`](super::parse_packed_index)) can check every tensor it copies and every row it reads,
//! at the grain it reads them, and name the tensor, row and file offset of a mismatch. `docs/format.md` gives the
//! byte layout.

use std::collections::HashMap;
use std::ops::Range;

use super::{IndexCursor, PackedHeader, corrupt};
use crate::error::FormatError;
use crate::gguf::{Gguf, MAX_STRING_LEN, MAX_TENSORS, TensorInfo};

/// The tensors whose rows [`pack`](super::pack) checksums one by one, when the model has them: the token
/// embedding (one row read per token) and the output head (streamed row by row by an offloading runtime; a model
/// without `output.weight` uses the embedding as its head).
pub const ROW_CHECKSUMMED_TENSORS: [&str; 2] = ["token_embd.weight", "output.weight"];

/// The recorded CRC-32 of one resident tensor's data bytes (exactly its data, no alignment padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorChecksum {
    /// The tensor's name in the resident GGUF.
    pub name: String,
    /// Absolute file offset of the tensor's first data byte.
    pub offset: u64,
    /// Bytes of data.
    pub len: u64,
    /// CRC-32 (IEEE) of the data.
    pub crc: u32,
}

impl TensorChecksum {
    /// The tensor's data in the file (absolute offsets).
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }

    /// Checks `bytes`, the tensor's whole data: a mismatch is [`FormatError::Checksum`] naming the tensor and its
    /// offset, a slice of the wrong length [`FormatError::BadBlockView`].
    pub fn verify(&self, bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.len() as u64 != self.len {
            return Err(FormatError::BadBlockView {
                len: bytes.len(),
                block: usize::try_from(self.len).unwrap_or(usize::MAX),
                why: format!("tensor {} is {} bytes (at offset {})", self.name, self.len, self.offset),
            });
        }
        let found = crc32fast::hash(bytes);
        if found != self.crc {
            let what = format!("tensor {}", self.name);
            return Err(FormatError::Checksum { what, offset: self.offset, expected: self.crc, found });
        }
        Ok(())
    }
}

/// The recorded CRC-32 of each row of one resident tensor (a row is `ne[0]` values, as GGUF lays rows out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowChecksums {
    name: String,
    offset: u64,
    row_bytes: usize,
    crc: Vec<u32>,
}

impl RowChecksums {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Absolute file offset of row 0; row `r` starts `r * row_bytes()` bytes later.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes per row (at least 1).
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.crc.len()
    }

    /// The recorded CRC of row `row`, if the tensor has that row.
    pub fn checksum(&self, row: usize) -> Option<u32> {
        self.crc.get(row).copied()
    }

    /// Checks `bytes`, a whole number of consecutive rows starting at row `first_row`, row by row. The first row
    /// that does not match is [`FormatError::Checksum`] with `what` = `"{name} row {r}"` and the row's absolute
    /// offset; a length that is not a whole number of rows, or rows past the last, is
    /// [`FormatError::BadBlockView`]. Allocates nothing unless it fails.
    pub fn verify(&self, first_row: usize, bytes: &[u8]) -> Result<(), FormatError> {
        let rb = self.row_bytes;
        let n = bytes.len() / rb;
        let crcs = match first_row.checked_add(n) {
            Some(end) if bytes.len() % rb == 0 => self.crc.get(first_row..end),
            _ => None,
        };
        let Some(crcs) = crcs else {
            return Err(FormatError::BadBlockView {
                len: bytes.len(),
                block: rb,
                why: format!(
                    "rows of {} are {rb} bytes, and it has {} (asked from row {first_row})",
                    self.name,
                    self.crc.len()
                ),
            });
        };
        for (i, (row, &expected)) in bytes.chunks_exact(rb).zip(crcs).enumerate() {
            let found = crc32fast::hash(row);
            if found != expected {
                let r = first_row + i;
                return Err(FormatError::Checksum {
                    what: format!("{} row {r}", self.name),
                    offset: self.offset + r as u64 * rb as u64,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }
}

/// The resident section's checksums recorded in a version 2 index: one per tensor, in the resident GGUF's tensor
/// order, and one per row of the [`ROW_CHECKSUMMED_TENSORS`] the model has. A version 1 file has none
/// ([`is_empty`](Self::is_empty)), and every lookup answers `None` or [`FormatError::NoChecksum`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResidentChecksums {
    tensors: Vec<TensorChecksum>,
    by_name: HashMap<String, usize>,
    rows: Vec<RowChecksums>,
    /// Per row table, the index of its tensor in `tensors`.
    row_tensor: Vec<usize>,
    /// Absolute offsets of each tensor entry and each row table in the index, for error messages.
    tensor_at: Vec<u64>,
    row_at: Vec<u64>,
}

impl ResidentChecksums {
    /// Whether no checksum is recorded (a version 1 file).
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every tensor's checksum, in the resident GGUF's tensor order.
    pub fn tensors(&self) -> &[TensorChecksum] {
        &self.tensors
    }

    /// The checksum of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorChecksum> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The row checksums of tensor `name`, if its rows are checksummed.
    pub fn rows(&self, name: &str) -> Option<&RowChecksums> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// Every row table, in tensor order.
    pub fn row_tables(&self) -> &[RowChecksums] {
        &self.rows
    }

    /// Checks the whole data of tensor `name` (see [`TensorChecksum::verify`]); a tensor without a recorded
    /// checksum is [`FormatError::NoChecksum`].
    pub fn verify_tensor(&self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        self.tensor(name).ok_or_else(|| no_checksum(format!("tensor {name}")))?.verify(bytes)
    }

    /// Checks rows `first_row..` of tensor `name` (see [`RowChecksums::verify`]); a tensor without row checksums
    /// is [`FormatError::NoChecksum`].
    pub fn verify_rows(&self, name: &str, first_row: usize, bytes: &[u8]) -> Result<(), FormatError> {
        self.rows(name).ok_or_else(|| no_checksum(format!("the rows of {name}")))?.verify(first_row, bytes)
    }

    /// Parses the checksum section at `c` (after the layer entries of a version 2 index), checking counts against
    /// their caps and the bytes left, names (UTF-8, unique), that tensors lie in the resident section in
    /// ascending order without overlapping, and that each row table names a tensor (in ascending order) whose
    /// length is its row count times its row length (at least 1 byte).
    pub(super) fn parse(c: &mut IndexCursor<'_>, h: &PackedHeader) -> Result<ResidentChecksums, FormatError> {
        let resident_end = h.resident_offset + h.resident_len;
        let n_at = c.offset();
        let n = c.u32()? as u64;
        if n > MAX_TENSORS {
            let what = "resident tensor checksums";
            return Err(FormatError::TooMany { what, count: n, cap: MAX_TENSORS, offset: n_at });
        }
        let mut s = ResidentChecksums::default();
        let mut prev_end = h.resident_offset;
        for i in 0..n as usize {
            let at = c.offset();
            let name_len = c.u32()? as u64;
            if name_len > MAX_STRING_LEN {
                let what = "tensor name length";
                return Err(FormatError::TooMany { what, count: name_len, cap: MAX_STRING_LEN, offset: at });
            }
            let name = std::str::from_utf8(c.take(name_len)?)
                .map_err(|_| FormatError::BadUtf8 { offset: at + 4 })?
                .to_string();
            let offset = c.u64()?;
            let len = c.u64()?;
            let crc = c.u32()?;
            match offset.checked_add(len) {
                Some(end) if offset >= prev_end && end <= resident_end => prev_end = end,
                _ => {
                    return Err(corrupt(
                        at,
                        format!(
                            "tensor checksum {i} ({name}): bytes {offset} + {len} are not in the resident section \
                             ({} .. {resident_end}) after the previous tensor's end {prev_end}",
                            h.resident_offset
                        ),
                    ));
                }
            }
            if s.by_name.insert(name.clone(), i).is_some() {
                return Err(corrupt(at, format!("tensor checksum {i}: tensor {name} appears twice")));
            }
            s.tensors.push(TensorChecksum { name, offset, len, crc });
            s.tensor_at.push(at);
        }
        let n_rows_at = c.offset();
        let n_tables = c.u32()? as u64;
        if n_tables > n {
            return Err(corrupt(n_rows_at, format!("{n_tables} row tables for {n} tensors")));
        }
        for j in 0..n_tables as usize {
            let at = c.offset();
            let t = c.u32()? as usize;
            let row_bytes = c.u64()?;
            let n_rows = c.u64()?;
            if s.row_tensor.last().is_some_and(|&prev| t <= prev) || t >= s.tensors.len() {
                return Err(corrupt(
                    at,
                    format!("row table {j}: tensor {t} is not after the previous table's and below {n}"),
                ));
            }
            let tc = &s.tensors[t];
            let sizes_ok = row_bytes >= 1 && row_bytes.checked_mul(n_rows) == Some(tc.len);
            let (Some(rb), Some(nr)) = (usize::try_from(row_bytes).ok(), usize::try_from(n_rows).ok()) else {
                return Err(corrupt(at, format!("row table {j}: {n_rows} rows of {row_bytes} bytes")));
            };
            if !sizes_ok {
                return Err(corrupt(
                    at,
                    format!(
                        "row table {j} ({}): {n_rows} rows of {row_bytes} bytes do not make its {} bytes",
                        tc.name, tc.len
                    ),
                ));
            }
            let (name, offset) = (tc.name.clone(), tc.offset);
            let crc = c.u32s(nr)?;
            s.rows.push(RowChecksums { name, offset, row_bytes: rb, crc });
            s.row_tensor.push(t);
            s.row_at.push(at);
        }
        Ok(s)
    }

    /// Checks the checksums against the resident GGUF they describe, which starts at absolute offset `base`: the
    /// same tensors in the same order, each entry's offset and length those of the tensor's data, each row table's
    /// row length and count the tensor's, and a row table for each of the [`ROW_CHECKSUMMED_TENSORS`] present.
    pub(super) fn check_against(
        &self,
        g: &Gguf<'_>,
        base: u64,
        index_offset: u64,
    ) -> Result<(), FormatError> {
        if self.tensors.len() != g.tensors.len() {
            return Err(corrupt(
                index_offset,
                format!(
                    "the index has checksums of {} tensors, the resident GGUF has {}",
                    self.tensors.len(),
                    g.tensors.len()
                ),
            ));
        }
        for ((tc, t), &at) in self.tensors.iter().zip(&g.tensors).zip(&self.tensor_at) {
            let offset = base.checked_add(g.data_offset).and_then(|o| o.checked_add(t.offset));
            if tc.name != t.name || offset != Some(tc.offset) || tc.len != t.n_bytes() {
                return Err(corrupt(
                    at,
                    format!(
                        "the checksum entry of tensor {} ({} bytes at {}) is not the resident GGUF's tensor {} \
                         ({} bytes at {offset:?})",
                        tc.name,
                        tc.len,
                        tc.offset,
                        t.name,
                        t.n_bytes()
                    ),
                ));
            }
        }
        for ((rows, &t), &at) in self.rows.iter().zip(&self.row_tensor).zip(&self.row_at) {
            let info = &g.tensors[t];
            let want = row_shape(info);
            if want != Some((rows.row_bytes, rows.crc.len())) {
                return Err(corrupt(
                    at,
                    format!(
                        "the row table of {} has {} rows of {} bytes, the tensor's shape {:?} of {} gives {want:?}",
                        info.name,
                        rows.crc.len(),
                        rows.row_bytes,
                        info.dims,
                        info.ty
                    ),
                ));
            }
        }
        for name in ROW_CHECKSUMMED_TENSORS {
            if g.tensor_info(name).is_some() && self.rows(name).is_none() {
                return Err(corrupt(index_offset, format!("the index has no row checksums of {name}")));
            }
        }
        Ok(())
    }
}

/// (bytes per row, number of rows) of a tensor: rows of `ne[0]` values.
fn row_shape(t: &TensorInfo) -> Option<(usize, usize)> {
    let row_bytes = t.ty.row_bytes(usize::try_from(*t.dims.first()?).ok()?).ok()?;
    let n_rows = t.dims.iter().skip(1).try_fold(1u64, |a, &d| a.checked_mul(d))?;
    Some((row_bytes, usize::try_from(n_rows).ok()?))
}

fn no_checksum(what: String) -> FormatError {
    FormatError::NoChecksum { what }
}

/// Appends the checksum section of the resident GGUF to `index`: `tensors` are its directory (offsets relative to
/// its data section, which starts at absolute file offset `data_start`) and `data` each tensor's bytes, in the
/// same order.
pub(super) fn write_section(
    tensors: &[TensorInfo],
    data: &[&[u8]],
    data_start: u64,
    index: &mut Vec<u8>,
) -> Result<(), FormatError> {
    debug_assert_eq!(tensors.len(), data.len());
    index.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for (t, d) in tensors.iter().zip(data) {
        index.extend_from_slice(&(t.name.len() as u32).to_le_bytes());
        index.extend_from_slice(t.name.as_bytes());
        index.extend_from_slice(&(data_start + t.offset).to_le_bytes());
        index.extend_from_slice(&(d.len() as u64).to_le_bytes());
        index.extend_from_slice(&crc32fast::hash(d).to_le_bytes());
    }
    let tables: Vec<usize> =
        (0..tensors.len()).filter(|&i| ROW_CHECKSUMMED_TENSORS.contains(&tensors[i].name.as_str())).collect();
    index.extend_from_slice(&(tables.len() as u32).to_le_bytes());
    for i in tables {
        let t = &tensors[i];
        let (row_bytes, n_rows) =
            row_shape(t).filter(|&(rb, _)| rb > 0).ok_or_else(|| FormatError::Unsupported {
                what: format!("tensor {} of shape {:?} cannot be cut into rows", t.name, t.dims),
            })?;
        index.extend_from_slice(&(i as u32).to_le_bytes());
        index.extend_from_slice(&(row_bytes as u64).to_le_bytes());
        index.extend_from_slice(&(n_rows as u64).to_le_bytes());
        for row in data[i].chunks_exact(row_bytes) {
            index.extend_from_slice(&crc32fast::hash(row).to_le_bytes());
        }
    }
    Ok(())
}
