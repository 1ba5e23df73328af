//! GGUF reading: metadata and tensor directory parsed from a byte slice, tensor data borrowed, never copied.
//!
//! The file is untrusted. Every count, length and offset is checked against a cap or the file size before it is
//! used, and every error names the offset where the problem was found.

use std::collections::HashMap;

use crate::error::FormatError;
use crate::quant::GgmlType;

/// The GGUF magic, `GGUF` in file order.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// PowerInfer's magic, accepted as GGUF.
pub const POWERINFER_MAGIC: [u8; 4] = *b"PWRI";
/// Alignment of the tensor data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most tensors a file may declare.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most metadata key-value pairs a file may declare.
pub const MAX_KV: u64 = 1 << 16;
/// Longest string (key, value or tensor name), in bytes.
pub const MAX_STRING_LEN: u64 = 1 << 24;
/// Most elements in one metadata array.
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Deepest nesting of metadata arrays: an array may hold arrays down to this many levels in total.
pub const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dimensions of a tensor.
pub const MAX_DIMS: u32 = 4;
/// Largest accepted `general.alignment`.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// The metadata key that sets the data section's alignment. Its value must be a [`Value::U32`], as llama.cpp
/// requires.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// Fewest bytes one metadata entry takes: an empty key (8), a type (4) and a one-byte value.
const MIN_KV_BYTES: u64 = 13;
/// Fewest bytes one tensor directory entry takes: an empty name (8), `n_dims` (4), one dimension (8), the
/// type (4) and the offset (8).
const MIN_TENSOR_BYTES: u64 = 32;

/// A metadata value.
///
/// Values compare with `==` as their Rust types do, so a NaN float is not equal to itself.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7, one byte; any non-zero byte reads as `true`.
    Bool(bool),
    /// GGUF type 8, UTF-8 with a u64 length.
    String(String),
    /// GGUF type 9: an element type, a u64 count and the elements, which all have the element type.
    Array(Vec<Value>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

/// The fewest bytes a value of GGUF type `id` takes in a file, or `None` if `id` is not a GGUF type.
pub(crate) fn min_value_bytes(id: u32) -> Option<u64> {
    Some(match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        // An array's element type (4) and count (8).
        9 => 12,
        _ => return None,
    })
}

/// The data section alignment a `general.alignment` value sets.
pub(crate) fn alignment_from(value: &Value) -> Result<u64, FormatError> {
    match *value {
        Value::U32(a) => {
            let a = a as u64;
            if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(FormatError::BadAlignment { alignment: a });
            }
            Ok(a)
        }
        ref v => Err(FormatError::WrongValueType {
            key: ALIGNMENT_KEY.to_string(),
            expected: "u32",
            found: v.type_name(),
        }),
    }
}

/// The number of data bytes of a tensor of type `ty` with dimensions `dims`, or why such a tensor is invalid.
///
/// pinion accepts 1 to [`MAX_DIMS`] dimensions, rows that are whole blocks, at least one value, and sizes that
/// fit in a u64; the reader and the writer share this rule so that whatever one accepts the other does too.
pub(crate) fn tensor_n_bytes(ty: GgmlType, dims: &[u64]) -> Result<u64, &'static str> {
    if dims.is_empty() {
        return Err("a tensor needs at least one dimension");
    }
    if dims.len() > MAX_DIMS as usize {
        return Err("a tensor has at most 4 dimensions");
    }
    if dims[0] % ty.block_len() as u64 != 0 {
        return Err("the row length (dims[0]) is not a multiple of the type's block length");
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or("the number of values overflows a u64")?;
    if n_elements == 0 {
        return Err("the dimensions hold no values");
    }
    (n_elements / ty.block_len() as u64)
        .checked_mul(ty.block_bytes() as u64)
        .ok_or("the size in bytes overflows a u64")
}

impl Value {
    /// The GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v as f64),
            Value::I16(v) => Some(v as f64),
            Value::I32(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(
            impl From<$t> for Value {
                fn from(x: $t) -> Value {
                    Value::$v(x)
                }
            }
        )*
    };
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, bool => Bool,
    String => String, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Value {
        Value::Array(v.into_iter().map(Into::into).collect())
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (row length, ggml's `ne[0]`) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of values in the tensor (saturating at `u64::MAX`; a parsed tensor never gets near it).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Number of bytes the tensor's data takes (saturating at `u64::MAX`).
    pub fn n_bytes(&self) -> u64 {
        (self.n_elements() / self.ty.block_len() as u64).saturating_mul(self.ty.block_bytes() as u64)
    }
}

/// A borrowed view of one tensor: its type, shape and raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, `ne[0]` first.
    pub dims: &'a [u64],
    /// The tensor's raw data, exactly [`TensorInfo::n_bytes`] long.
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Values per row (`ne[0]`).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of the outer dimensions).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.n_rows().max(1)
    }

    /// The raw bytes of row `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.n_rows()`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }
}

/// A parsed GGUF file: metadata, tensor directory, and the bytes it was parsed from.
#[derive(Debug)]
pub struct Gguf<'a> {
    bytes: &'a [u8],
    /// The file's GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order. Keys are unique and non-empty.
    pub metadata: Vec<(String, Value)>,
    /// Tensor directory in file order. Names are unique.
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    meta_index: HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Alignment of the data section.
    pub alignment: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// How many of `n` items of at least `min_bytes` each the rest of the file can hold: the most capacity
    /// worth reserving for them.
    fn max_items(&self, n: u64, min_bytes: u64) -> usize {
        n.min(self.left() / min_bytes) as usize
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], FormatError> {
        if n > self.left() {
            return Err(FormatError::Truncated { offset: self.offset(), need: n, file_len: self.file_len() });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, what: &'static str, cap: u64) -> Result<u64, FormatError> {
        let offset = self.offset();
        let n = self.u64()?;
        if n > cap {
            return Err(FormatError::TooMany { what, count: n, cap, offset });
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, FormatError> {
        let len = self.count("string length", MAX_STRING_LEN)?;
        let offset = self.offset();
        let s = self.take(len)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(FormatError::BadUtf8 { offset }),
        }
    }

    /// Reads a value of type `ty`, whose type id was read at `ty_offset`, nested in `depth` arrays.
    fn value(&mut self, ty: u32, ty_offset: u64, depth: u32) -> Result<Value, FormatError> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(FormatError::TooMany {
                        what: "array nesting depth",
                        count: depth as u64 + 1,
                        cap: MAX_ARRAY_DEPTH as u64,
                        offset: self.offset(),
                    });
                }
                let elem_offset = self.offset();
                let elem_ty = self.u32()?;
                // Checked even for an empty array, as llama.cpp does.
                let min_bytes = min_value_bytes(elem_ty)
                    .ok_or(FormatError::UnknownValueType { id: elem_ty, offset: elem_offset })?;
                let n = self.count("array length", MAX_ARRAY_LEN)?;
                // Each element takes at least `min_bytes`: a count beyond what the rest of the file can hold is
                // corrupt, and checking it here keeps a crafted count from reserving memory the file cannot back.
                let need = n * min_bytes;
                if need > self.left() {
                    return Err(FormatError::Truncated {
                        offset: self.offset(),
                        need,
                        file_len: self.file_len(),
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, elem_offset, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            id => return Err(FormatError::UnknownValueType { id, offset: ty_offset }),
        })
    }
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor directory of a GGUF file held in `bytes`.
    ///
    /// Tensor data is not touched beyond checking that every tensor lies inside `bytes`. The file is untrusted:
    /// any content gives either a `Gguf` or a [`FormatError`] naming the offset of the problem, never a panic.
    /// Memory allocated while parsing is bounded by the file's size: every count is checked against the bytes
    /// left before anything is reserved, and the parsed form of a value takes at most 32 bytes per byte it
    /// takes in the file (the worst case being an array of u8).
    ///
    /// Besides the GGUF format itself, this enforces what llama.cpp's `gguf.cpp` does (unique, non-empty keys;
    /// unique tensor names; `general.alignment` a power-of-two u32; at most 4 dimensions; whole blocks per row)
    /// plus pinion's caps (`MAX_*`). It is more lenient than llama.cpp in two ways: tensor names may be longer
    /// than 63 bytes, and tensor data need not be packed in directory order. It is stricter in one: a tensor
    /// must hold at least one value.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, FormatError> {
        let file_len = bytes.len() as u64;
        let mut c = Cursor { bytes, pos: 0 };
        let magic: [u8; 4] = c.array()?;
        if magic != GGUF_MAGIC && magic != POWERINFER_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let n_tensors = c.count("tensor count", MAX_TENSORS)?;
        let n_kv = c.count("metadata count", MAX_KV)?;

        let cap = c.max_items(n_kv, MIN_KV_BYTES);
        let mut metadata = Vec::with_capacity(cap);
        let mut meta_index = HashMap::with_capacity(cap);
        for _ in 0..n_kv {
            let key_offset = c.offset();
            let key = c.string()?;
            if key.is_empty() {
                return Err(FormatError::EmptyKey { offset: key_offset });
            }
            if meta_index.contains_key(&key) {
                return Err(FormatError::DuplicateKey { key, offset: key_offset });
            }
            let ty_offset = c.offset();
            let ty = c.u32()?;
            let value = c.value(ty, ty_offset, 0)?;
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get(ALIGNMENT_KEY) {
            Some(&i) => alignment_from(&metadata[i].1)?,
            None => DEFAULT_ALIGNMENT,
        };

        let cap = c.max_items(n_tensors, MIN_TENSOR_BYTES);
        let mut tensors = Vec::with_capacity(cap);
        let mut index = HashMap::with_capacity(cap);
        for _ in 0..n_tensors {
            let entry_offset = c.offset();
            let name = c.string()?;
            if index.contains_key(&name) {
                return Err(FormatError::DuplicateTensor { name, offset: entry_offset });
            }
            let n_dims_offset = c.offset();
            let n_dims = c.u32()?;
            if n_dims == 0 {
                return Err(FormatError::BadTensorShape {
                    name,
                    offset: entry_offset,
                    why: "it has no dimensions".to_string(),
                });
            }
            if n_dims > MAX_DIMS {
                return Err(FormatError::TooMany {
                    what: "tensor dimension count",
                    count: n_dims as u64,
                    cap: MAX_DIMS as u64,
                    offset: n_dims_offset,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let ty_offset = c.offset();
            let ty_id = c.u32()?;
            let Some(ty) = GgmlType::from_id(ty_id) else {
                return Err(FormatError::UnknownTensorType { name, id: ty_id, offset: ty_offset });
            };
            let offset = c.u64()?;
            if let Err(why) = tensor_n_bytes(ty, &dims) {
                let why = format!("{why} (type {ty}, dimensions {dims:?})");
                return Err(FormatError::BadTensorShape { name, offset: entry_offset, why });
            }
            if offset % alignment != 0 {
                let why = format!("data offset {offset} is not aligned to {alignment}");
                return Err(FormatError::BadTensorShape { name, offset: entry_offset, why });
            }
            index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo { name, dims, ty, offset });
        }

        // The data section starts at the next multiple of the alignment. With no tensors the padding may be
        // absent, as llama.cpp allows.
        let data_offset = c.offset().div_ceil(alignment) * alignment;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes()));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(FormatError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset.saturating_add(t.offset).saturating_add(t.n_bytes()),
                        file_len,
                    });
                }
            }
        }

        Ok(Gguf { bytes, version, metadata, tensors, index, meta_index, data_offset, alignment })
    }

    /// The whole file's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, FormatError> {
        self.get(key).ok_or_else(|| FormatError::MissingKey { key: key.to_string() })
    }

    /// A non-negative integer metadata value of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64, FormatError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| FormatError::WrongValueType {
            key: key.to_string(),
            expected: "unsigned integer",
            found: v.type_name(),
        })
    }

    /// A numeric metadata value as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, FormatError> {
        let v = self.require(key)?;
        v.as_f64().map(|f| f as f32).ok_or_else(|| FormatError::WrongValueType {
            key: key.to_string(),
            expected: "number",
            found: v.type_name(),
        })
    }

    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Result<bool, FormatError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(FormatError::WrongValueType {
                key: key.to_string(),
                expected: "bool",
                found: v.type_name(),
            }),
        }
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, FormatError> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(FormatError::WrongValueType {
                key: key.to_string(),
                expected: "string",
                found: v.type_name(),
            }),
        }
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[Value], FormatError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(FormatError::WrongValueType {
                key: key.to_string(),
                expected: "array",
                found: v.type_name(),
            }),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, FormatError> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(FormatError::WrongValueType {
                    key: key.to_string(),
                    expected: "array of strings",
                    found: v.type_name(),
                }),
            })
            .collect()
    }

    /// An array of numbers as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, FormatError> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_f64().map(|f| f as f32).ok_or_else(|| FormatError::WrongValueType {
                    key: key.to_string(),
                    expected: "array of numbers",
                    found: v.type_name(),
                })
            })
            .collect()
    }

    /// An array of integers as i64.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, FormatError> {
        self.get_array(key)?
            .iter()
            .map(|v| match *v {
                Value::I8(x) => Ok(x as i64),
                Value::I16(x) => Ok(x as i64),
                Value::I32(x) => Ok(x as i64),
                Value::I64(x) => Ok(x),
                ref v => v.as_u64().map(|x| x as i64).ok_or_else(|| FormatError::WrongValueType {
                    key: key.to_string(),
                    expected: "array of integers",
                    found: v.type_name(),
                }),
            })
            .collect()
    }

    /// The directory entry of a tensor, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// A borrowed view of a tensor's data.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, FormatError> {
        let t =
            self.tensor_info(name).ok_or_else(|| FormatError::MissingTensor { name: name.to_string() })?;
        Ok(TensorView { name: &t.name, ty: t.ty, dims: &t.dims, data: self.tensor_data(t)? })
    }

    /// The raw data of a tensor of this file's directory.
    ///
    /// `parse` checked every tensor's bounds; checking again here keeps a caller who edits the public
    /// `tensors` field from turning a bad entry into a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&'a [u8], FormatError> {
        let file_len = self.bytes.len() as u64;
        let start = self.data_offset.saturating_add(t.offset);
        let end = start.saturating_add(t.n_bytes());
        if end > file_len {
            return Err(FormatError::TensorOutOfBounds { name: t.name.clone(), start, end, file_len });
        }
        Ok(&self.bytes[start as usize..end as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_values_take_at_most_32_bytes_per_file_byte() {
        // The bound `Gguf::parse` documents: one `Value` per element, and an element takes at least one byte.
        assert!(size_of::<Value>() <= 32);
        for id in 0..=12 {
            assert!(min_value_bytes(id).is_some_and(|n| n >= 1));
        }
        assert_eq!(min_value_bytes(13), None);
    }

    #[test]
    fn min_value_bytes_matches_what_the_reader_consumes() {
        // Parse the smallest value of each scalar type and check how far the cursor moved.
        for (id, bytes) in
            [(0u32, 1usize), (1, 1), (2, 2), (3, 2), (4, 4), (5, 4), (6, 4), (7, 1), (8, 8), (10, 8)]
        {
            let buf = vec![0u8; 16];
            let mut c = Cursor { bytes: &buf, pos: 0 };
            c.value(id, 0, 0).unwrap();
            assert_eq!(c.pos, bytes, "type {id}");
            assert_eq!(min_value_bytes(id), Some(bytes as u64), "type {id}");
        }
        let buf = vec![0u8; 16];
        let mut c = Cursor { bytes: &buf, pos: 0 };
        c.value(9, 0, 0).unwrap();
        assert_eq!(c.pos as u64, min_value_bytes(9).unwrap(), "empty array");
    }
}
