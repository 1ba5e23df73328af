//! GGUF writing: metadata and a tensor directory declared up front, then tensor data supplied in order, so that
//! a file of any size can be streamed to any `impl Write` without holding its tensors in memory.
//!
//! The layout is the one llama.cpp's `gguf.cpp` and gguf-py write: magic `GGUF`, version 3, the tensor and
//! metadata counts, the metadata, the tensor directory, zero padding up to the alignment, then each tensor's
//! data followed by zero padding up to the alignment (the last tensor too), in declaration order. A file whose
//! tensors were packed that way is written back byte for byte.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Write};

use crate::error::FormatError;
use crate::gguf::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_KV,
    MAX_STRING_LEN, MAX_TENSORS, TensorInfo, Value, alignment_from, tensor_n_bytes,
};
use crate::quant::GgmlType;

/// The GGUF version pinion writes.
pub const GGUF_WRITE_VERSION: u32 = 3;

/// The element type written for an empty metadata array, whose elements' type [`Value`] cannot tell (u8).
const EMPTY_ARRAY_ELEM_TYPE: u32 = 0;

/// Builds a GGUF file: collects metadata and tensor declarations, then writes the header and the data.
///
/// Declare everything first with [`add_metadata`](Self::add_metadata), [`add_tensor`](Self::add_tensor)
/// (data supplied later, streamed) and [`add_tensor_data`](Self::add_tensor_data) (data given now, borrowed
/// or owned). Then either [`write_to`](Self::write_to) / [`to_bytes`](Self::to_bytes) when every tensor's data
/// was given, or [`begin`](Self::begin), which writes the header and returns a [`GgufStream`] that takes the
/// remaining tensors' data one by one, in declaration order.
///
/// Every count, length and nesting depth is checked against the same caps [`Gguf::parse`] enforces, so any file
/// this writes can be read back. Misuse is a [`FormatError`], never a panic.
///
/// ```
/// use pinion_format::{GgmlType, Gguf, GgufWriter, Value};
///
/// let mut w = GgufWriter::new();
/// w.add_metadata("general.architecture", "llama")?;
/// w.add_metadata("tokenizer.ggml.tokens", vec!["<s>", "</s>"])?;
/// w.add_tensor_data("norm.weight", GgmlType::F32, &[2], 1.5f32.to_le_bytes().repeat(2))?;
/// w.add_tensor("big.weight", GgmlType::F16, &[64, 2])?;
///
/// let mut out = w.begin(Vec::new())?;
/// // Any `FnOnce(&mut dyn Write)` can produce the bytes, e.g. by copying from a reader chunk by chunk.
/// out.write_tensor_with("big.weight", |w| w.write_all(&[0u8; 256]))?;
/// let bytes = out.finish()?;
///
/// let g = Gguf::parse(&bytes)?;
/// assert_eq!(g.get_str_array("tokenizer.ggml.tokens")?, ["<s>", "</s>"]);
/// assert_eq!(g.tensor("big.weight")?.data.len(), 256);
/// # Ok::<(), pinion_format::FormatError>(())
/// ```
#[derive(Debug, Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<Declared<'a>>,
    tensor_index: HashMap<String, usize>,
    alignment: Option<u64>,
}

#[derive(Debug)]
struct Declared<'a> {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    n_bytes: u64,
    data: Option<Cow<'a, [u8]>>,
}

impl<'a> GgufWriter<'a> {
    /// An empty file: no metadata, no tensors, alignment [`DEFAULT_ALIGNMENT`].
    pub fn new() -> GgufWriter<'a> {
        GgufWriter::default()
    }

    /// A writer holding all of `g`'s metadata and tensors, in file order, with the tensor data borrowed from
    /// `g`'s bytes. Writing it gives a version 3 file with the same content.
    pub fn from_gguf(g: &Gguf<'a>) -> Result<GgufWriter<'a>, FormatError> {
        let mut w = GgufWriter::new();
        for (key, value) in &g.metadata {
            w.add_metadata(key.as_str(), value.clone())?;
        }
        for t in &g.tensors {
            w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t)?)?;
        }
        Ok(w)
    }

    /// Adds a metadata entry. Keys must be unique and non-empty.
    ///
    /// `general.alignment` sets the data alignment; its value must be a `Value::U32` power of two no larger
    /// than [`crate::MAX_ALIGNMENT`]. Arrays must hold elements of a single type (nested arrays may differ in
    /// their own element types) and nest at most [`MAX_ARRAY_DEPTH`] deep. An empty array is written with
    /// element type u8.
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<Value>,
    ) -> Result<(), FormatError> {
        let key = key.into();
        if self.meta_index.contains_key(&key) {
            return Err(FormatError::KeyExists { key });
        }
        self.insert_metadata(key, value.into())
    }

    /// Sets a metadata entry, replacing the value (in place, keeping its position) if the key exists.
    pub fn set_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<Value>,
    ) -> Result<(), FormatError> {
        self.insert_metadata(key.into(), value.into())
    }

    /// Removes a metadata entry, returning its value. Later entries keep their order.
    pub fn remove_metadata(&mut self, key: &str) -> Option<Value> {
        let i = self.meta_index.remove(key)?;
        let (_, value) = self.metadata.remove(i);
        for j in self.meta_index.values_mut() {
            if *j > i {
                *j -= 1;
            }
        }
        if key == ALIGNMENT_KEY {
            self.alignment = None;
        }
        Some(value)
    }

    fn insert_metadata(&mut self, key: String, value: Value) -> Result<(), FormatError> {
        if key.is_empty() {
            return Err(FormatError::KeyEmpty);
        }
        check_string_len(&key)?;
        check_value(&key, &value, 0)?;
        let alignment = if key == ALIGNMENT_KEY { Some(alignment_from(&value)?) } else { None };
        match self.meta_index.get(&key) {
            Some(&i) => self.metadata[i].1 = value,
            None => {
                check_count("metadata count", self.metadata.len() as u64 + 1, MAX_KV)?;
                self.meta_index.insert(key.clone(), self.metadata.len());
                self.metadata.push((key, value));
            }
        }
        if alignment.is_some() {
            self.alignment = alignment;
        }
        Ok(())
    }

    /// Declares a tensor whose data will be supplied after [`begin`](Self::begin), through the returned
    /// [`GgufStream`]. `dims` are innermost first (`ne[0]`, the row length, first).
    pub fn add_tensor(&mut self, name: &str, ty: GgmlType, dims: &[u64]) -> Result<(), FormatError> {
        self.declare(name, ty, dims, None)
    }

    /// Declares a tensor together with its data, which must be exactly the size its type and shape require.
    /// The data may be borrowed (`&'a [u8]`) or owned (`Vec<u8>`).
    pub fn add_tensor_data(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<(), FormatError> {
        self.declare(name, ty, dims, Some(data.into()))
    }

    fn declare(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: Option<Cow<'a, [u8]>>,
    ) -> Result<(), FormatError> {
        if self.tensor_index.contains_key(name) {
            return Err(FormatError::TensorExists { name: name.to_string() });
        }
        check_string_len(name)?;
        check_count("tensor count", self.tensors.len() as u64 + 1, MAX_TENSORS)?;
        let n_bytes = tensor_n_bytes(ty, dims).map_err(|why| FormatError::InvalidTensorShape {
            name: name.to_string(),
            ty,
            dims: dims.to_vec(),
            why,
        })?;
        if let Some(data) = &data {
            if data.len() as u64 != n_bytes {
                return Err(FormatError::TensorSizeMismatch {
                    name: name.to_string(),
                    expected: n_bytes,
                    got: data.len() as u64,
                });
            }
        }
        self.tensor_index.insert(name.to_string(), self.tensors.len());
        self.tensors.push(Declared { name: name.to_string(), ty, dims: dims.to_vec(), n_bytes, data });
        Ok(())
    }

    /// The alignment of the data section and of each tensor.
    pub fn alignment(&self) -> u64 {
        self.alignment.unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The metadata added so far, in order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The tensor directory as it will be written: declaration order, with each tensor's data offset.
    pub fn tensor_infos(&self) -> Result<Vec<TensorInfo>, FormatError> {
        let offsets = self.data_layout()?.0;
        Ok(self
            .tensors
            .iter()
            .zip(offsets)
            .map(|(t, offset)| TensorInfo { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty, offset })
            .collect())
    }

    /// The length of the header including its padding: the absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        let len = self.header_unpadded_len();
        len.div_ceil(self.alignment()) * self.alignment()
    }

    /// The length of the whole file.
    pub fn file_len(&self) -> Result<u64, FormatError> {
        let data_len = self.data_layout()?.1;
        self.data_offset().checked_add(data_len).ok_or(FormatError::LimitExceeded {
            what: "file length",
            count: u64::MAX,
            cap: u64::MAX,
        })
    }

    /// Each tensor's offset in the data section, and the data section's length.
    fn data_layout(&self) -> Result<(Vec<u64>, u64), FormatError> {
        let align = self.alignment();
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut end = 0u64;
        for t in &self.tensors {
            offsets.push(end);
            end = end.checked_add(padding(t.n_bytes, align)).and_then(|e| e.checked_add(t.n_bytes)).ok_or(
                FormatError::LimitExceeded { what: "data section length", count: u64::MAX, cap: u64::MAX },
            )?;
        }
        Ok((offsets, end))
    }

    fn header_unpadded_len(&self) -> u64 {
        let mut len = 4 + 4 + 8 + 8;
        for (key, value) in &self.metadata {
            len += 8 + key.len() as u64 + 4 + value_len(value);
        }
        for t in &self.tensors {
            len += 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8;
        }
        len
    }

    /// Serializes the header and its padding.
    fn header(&self, offsets: &[u64]) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.data_offset() as usize);
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&GGUF_WRITE_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut h, key);
            h.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut h, value);
        }
        for (t, &offset) in self.tensors.iter().zip(offsets) {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for &d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
        }
        let pad = padding(h.len() as u64, self.alignment());
        h.resize(h.len() + pad as usize, 0);
        h
    }

    /// Writes the header (metadata, tensor directory, padding) to `out` and returns a [`GgufStream`] that takes
    /// the tensor data.
    ///
    /// Wrap a file in a `std::io::BufWriter`: the stream issues one write per tensor plus small padding writes.
    pub fn begin<W: Write>(self, mut out: W) -> Result<GgufStream<'a, W>, FormatError> {
        let offsets = self.data_layout()?.0;
        out.write_all(&self.header(&offsets))?;
        Ok(GgufStream {
            out,
            alignment: self.alignment(),
            tensors: self.tensors,
            index: self.tensor_index,
            next: 0,
            failed: false,
        })
    }

    /// Writes the whole file to `out` and returns `out`. Every tensor's data must have been given with
    /// [`add_tensor_data`](Self::add_tensor_data), else this fails with [`FormatError::TensorDataMissing`]
    /// before writing anything.
    pub fn write_to<W: Write>(self, out: W) -> Result<W, FormatError> {
        self.check_all_data()?;
        self.begin(out)?.finish()
    }

    /// The whole file as bytes; see [`write_to`](Self::write_to).
    pub fn to_bytes(self) -> Result<Vec<u8>, FormatError> {
        self.check_all_data()?;
        // Every tensor is in memory already, so the file fits too (the cap only guards a bad estimate).
        let hint = self.file_len()?.min(1 << 32) as usize;
        self.write_to(Vec::with_capacity(hint))
    }

    fn check_all_data(&self) -> Result<(), FormatError> {
        match self.tensors.iter().find(|t| t.data.is_none()) {
            Some(t) => Err(FormatError::TensorDataMissing { name: t.name.clone() }),
            None => Ok(()),
        }
    }
}

/// The data section of a GGUF file being written: takes each streamed tensor's bytes, in declaration order.
///
/// Tensors whose data was given to [`GgufWriter::add_tensor_data`] are written automatically when their turn
/// comes. After any error that may have left partial output, every later call returns
/// [`FormatError::WriterFailed`]: the file must be written again from the start.
pub struct GgufStream<'a, W: Write> {
    out: W,
    alignment: u64,
    tensors: Vec<Declared<'a>>,
    index: HashMap<String, usize>,
    /// The first tensor whose data has not been written.
    next: usize,
    failed: bool,
}

impl<W: Write> std::fmt::Debug for GgufStream<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufStream")
            .field("alignment", &self.alignment)
            .field("n_tensors", &self.tensors.len())
            .field("n_written", &self.next)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<'a, W: Write> GgufStream<'a, W> {
    /// The name of the next tensor whose data must be supplied, or `None` if no streamed tensor is left.
    pub fn next_tensor(&self) -> Option<&str> {
        self.tensors[self.next..].iter().find(|t| t.data.is_none()).map(|t| t.name.as_str())
    }

    /// Writes the data of tensor `name`, which must be the next tensor without in-memory data and must be
    /// exactly as long as the tensor's type and shape require.
    pub fn write_tensor_data(&mut self, name: &str, data: &[u8]) -> Result<(), FormatError> {
        let n_bytes = self.start_tensor(name)?;
        if data.len() as u64 != n_bytes {
            return Err(FormatError::TensorSizeMismatch {
                name: name.to_string(),
                expected: n_bytes,
                got: data.len() as u64,
            });
        }
        let res = self.out.write_all(data).map_err(FormatError::from);
        self.end_tensor(res)
    }

    /// Writes the data of tensor `name` (the next tensor without in-memory data) by calling `f` with a writer
    /// that takes exactly the tensor's size: writing more fails inside `f` and writing less fails after it,
    /// both with [`FormatError::TensorSizeMismatch`]. An error `f` returns becomes [`FormatError::Write`].
    pub fn write_tensor_with<F>(&mut self, name: &str, f: F) -> Result<(), FormatError>
    where
        F: FnOnce(&mut dyn Write) -> io::Result<()>,
    {
        let n_bytes = self.start_tensor(name)?;
        let mut budget = Budget { inner: &mut self.out, left: n_bytes, written: 0, rejected: None };
        let res = f(&mut budget);
        let (written, rejected) = (budget.written, budget.rejected);
        let res = match (rejected, res) {
            (Some(extra), _) => Err(FormatError::TensorSizeMismatch {
                name: name.to_string(),
                expected: n_bytes,
                got: written.saturating_add(extra),
            }),
            (None, Err(e)) => Err(FormatError::Write(e)),
            (None, Ok(())) if written != n_bytes => Err(FormatError::TensorSizeMismatch {
                name: name.to_string(),
                expected: n_bytes,
                got: written,
            }),
            (None, Ok(())) => Ok(()),
        };
        self.end_tensor(res)
    }

    /// Writes any remaining in-memory tensors, flushes, and returns the output. Fails with
    /// [`FormatError::TensorDataMissing`] if a streamed tensor's data was never supplied.
    pub fn finish(mut self) -> Result<W, FormatError> {
        if self.failed {
            return Err(FormatError::WriterFailed);
        }
        self.write_in_memory()?;
        if let Some(t) = self.tensors.get(self.next) {
            return Err(FormatError::TensorDataMissing { name: t.name.clone() });
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Writes in-memory tensors up to the next streamed one, then checks that `name` is that one and returns
    /// its size.
    fn start_tensor(&mut self, name: &str) -> Result<u64, FormatError> {
        if self.failed {
            return Err(FormatError::WriterFailed);
        }
        self.write_in_memory()?;
        if !self.index.contains_key(name) {
            return Err(FormatError::MissingTensor { name: name.to_string() });
        }
        match self.tensors.get(self.next) {
            Some(t) if t.name == name => Ok(t.n_bytes),
            _ => Err(FormatError::TensorOutOfOrder {
                name: name.to_string(),
                expected: self.next_tensor().map(str::to_string),
            }),
        }
    }

    /// After a tensor's data was written (with result `res`): pads it, moves on, or marks the stream failed.
    fn end_tensor(&mut self, res: Result<(), FormatError>) -> Result<(), FormatError> {
        let n_bytes = self.tensors[self.next].n_bytes;
        let res = res.and_then(|()| write_zeros(&mut self.out, padding(n_bytes, self.alignment)));
        match res {
            Ok(()) => {
                self.next += 1;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn write_in_memory(&mut self) -> Result<(), FormatError> {
        while let Some(Declared { data: Some(data), n_bytes, .. }) = self.tensors.get(self.next) {
            let res = self
                .out
                .write_all(data)
                .map_err(FormatError::from)
                .and_then(|()| write_zeros(&mut self.out, padding(*n_bytes, self.alignment)));
            if let Err(e) = res {
                self.failed = true;
                return Err(e);
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// A writer that passes through at most `left` bytes and rejects any write that would exceed them.
struct Budget<'w> {
    inner: &'w mut dyn Write,
    left: u64,
    written: u64,
    /// The length of a rejected write, if any.
    rejected: Option<u64>,
}

impl Write for Budget<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() as u64 > self.left {
            self.rejected = Some(buf.len() as u64);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "more bytes than the tensor holds"));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes of zero padding after `len` bytes to reach a multiple of `align` (a power of two).
fn padding(len: u64, align: u64) -> u64 {
    len.wrapping_neg() & (align - 1)
}

fn write_zeros(out: &mut dyn Write, mut n: u64) -> Result<(), FormatError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn check_count(what: &'static str, count: u64, cap: u64) -> Result<(), FormatError> {
    if count > cap {
        return Err(FormatError::LimitExceeded { what, count, cap });
    }
    Ok(())
}

fn check_string_len(s: &str) -> Result<(), FormatError> {
    check_count("string length", s.len() as u64, MAX_STRING_LEN)
}

/// Checks that `value` (under `key`, nested in `depth` arrays) can be written and read back.
fn check_value(key: &str, value: &Value, depth: u32) -> Result<(), FormatError> {
    match value {
        Value::String(s) => check_string_len(s),
        Value::Array(items) => {
            check_count("array nesting depth", depth as u64 + 1, MAX_ARRAY_DEPTH as u64)?;
            check_count("array length", items.len() as u64, MAX_ARRAY_LEN)?;
            let Some(first) = items.first() else { return Ok(()) };
            for (index, item) in items.iter().enumerate() {
                if item.type_id() != first.type_id() {
                    return Err(FormatError::MixedArray {
                        key: key.to_string(),
                        index,
                        expected: first.type_name(),
                        found: item.type_name(),
                    });
                }
                check_value(key, item, depth + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Bytes `value`'s payload takes (after its type id).
fn value_len(value: &Value) -> u64 {
    match value {
        Value::U8(_) | Value::I8(_) | Value::Bool(_) => 1,
        Value::U16(_) | Value::I16(_) => 2,
        Value::U32(_) | Value::I32(_) | Value::F32(_) => 4,
        Value::U64(_) | Value::I64(_) | Value::F64(_) => 8,
        Value::String(s) => 8 + s.len() as u64,
        Value::Array(items) => 4 + 8 + items.iter().map(value_len).sum::<u64>(),
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// Appends `value`'s payload (after its type id).
fn put_value(h: &mut Vec<u8>, value: &Value) {
    match *value {
        Value::U8(x) => h.push(x),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
        Value::Bool(x) => h.push(x as u8),
        Value::String(ref s) => put_str(h, s),
        Value::Array(ref items) => {
            let elem_ty = items.first().map_or(EMPTY_ARRAY_ELEM_TYPE, Value::type_id);
            h.extend_from_slice(&elem_ty.to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_rounds_up_to_alignment() {
        assert_eq!(padding(0, 32), 0);
        assert_eq!(padding(1, 32), 31);
        assert_eq!(padding(32, 32), 0);
        assert_eq!(padding(33, 32), 31);
        assert_eq!(padding(5, 1), 0);
        assert_eq!(padding(u64::MAX, 32), 1);
    }

    #[test]
    fn header_len_matches_serialized_header() {
        let mut w = GgufWriter::new();
        w.add_metadata("a", Value::Array(vec![Value::Array(vec![1u8.into()]), Value::Array(vec![])]))
            .unwrap();
        w.add_metadata("b", "hello").unwrap();
        w.add_metadata("c", 1.5f64).unwrap();
        w.add_tensor("t", GgmlType::Q4_0, &[32, 3]).unwrap();
        let offsets = w.data_layout().unwrap().0;
        let h = w.header(&offsets);
        assert_eq!(h.len() as u64, w.data_offset());
        assert_eq!(w.header_unpadded_len().div_ceil(32) * 32, h.len() as u64);
    }
}
