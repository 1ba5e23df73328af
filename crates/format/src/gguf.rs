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
/// Deepest nesting of metadata arrays.
pub const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dimensions of a tensor.
pub const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
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

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost (row length, ggml's `ne[0]`) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of values in the tensor.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of bytes the tensor's data takes.
    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ty.block_len() as u64 * self.ty.block_bytes() as u64
    }
}

/// A borrowed view of one tensor: its type, shape and raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    pub dims: &'a [u64],
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
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor directory in file order.
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
    fn take(&mut self, n: u64) -> Result<&'a [u8], FormatError> {
        let file_len = self.bytes.len() as u64;
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= file_len);
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(FormatError::Truncated { offset: self.pos as u64, need: n, file_len }),
        }
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
        let offset = self.pos as u64;
        let n = self.u64()?;
        if n > cap {
            return Err(FormatError::TooMany { what, count: n, cap, offset });
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, FormatError> {
        let len = self.count("string length", MAX_STRING_LEN)?;
        let offset = self.pos as u64;
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| FormatError::BadUtf8 { offset })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, FormatError> {
        let offset = self.pos as u64;
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
                        offset,
                    });
                }
                let elem_ty = self.u32()?;
                let n = self.count("array length", MAX_ARRAY_LEN)?;
                // Each element takes at least one byte: a count beyond the bytes left is corrupt, and checking
                // it here keeps a crafted count from reserving memory the file cannot back.
                let left = (self.bytes.len() - self.pos) as u64;
                if n > left {
                    return Err(FormatError::Truncated {
                        offset: self.pos as u64,
                        need: n,
                        file_len: self.bytes.len() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            id => return Err(FormatError::UnknownValueType { id, offset }),
        })
    }
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor directory of a GGUF file held in `bytes`.
    ///
    /// Tensor data is not touched beyond checking that every tensor lies inside `bytes`.
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

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let value = c.value(ty, 0)?;
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            Some(&i) => metadata[i].1.as_u64().unwrap_or(0),
            None => DEFAULT_ALIGNMENT,
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(FormatError::BadAlignment { alignment });
        }

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut index = HashMap::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let entry_offset = c.pos as u64;
            let name = c.string()?;
            let n_dims_offset = c.pos as u64;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
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
            let ty_offset = c.pos as u64;
            let ty_id = c.u32()?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| FormatError::UnknownTensorType {
                name: name.clone(),
                id: ty_id,
                offset: ty_offset,
            })?;
            let offset = c.u64()?;
            let bad_shape =
                |why: String| FormatError::BadTensorShape { name: name.clone(), offset: entry_offset, why };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= file_len.saturating_mul(8))
                .ok_or_else(|| {
                    bad_shape(format!("dimensions {dims:?} hold more values than the file can"))
                })?;
            if dims[0] % ty.block_len() as u64 != 0 {
                return Err(bad_shape(format!(
                    "row length {} is not a multiple of {ty}'s block of {}",
                    dims[0],
                    ty.block_len()
                )));
            }
            if n_elements == 0 {
                return Err(bad_shape(format!("dimensions {dims:?} hold no values")));
            }
            if offset % alignment != 0 {
                return Err(bad_shape(format!("data offset {offset} is not aligned to {alignment}")));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(FormatError::DuplicateTensor { name, offset: entry_offset });
            }
            tensors.push(TensorInfo { name, dims, ty, offset });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes()));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {}
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
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A borrowed view of a tensor's data.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, FormatError> {
        let t =
            self.tensor_info(name).ok_or_else(|| FormatError::MissingTensor { name: name.to_string() })?;
        let start = (self.data_offset + t.offset) as usize;
        let end = start + t.n_bytes() as usize;
        Ok(TensorView { name: &t.name, ty: t.ty, dims: &t.dims, data: &self.bytes[start..end] })
    }
}
