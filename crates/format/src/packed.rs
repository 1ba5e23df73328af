//! The packed neuron-cluster model format (version 3; versions 1 and 2 are still read): a GGUF llama model
//! rearranged so that a runtime keeps the resident weights in memory and streams FFN neurons from flash in 4
//! KiB-aligned reads. The FFN is cut into *units*, each laid out as one dense FFN: a layer's, or (version 3) one
//! expert's of a mixture-of-experts layer, unit `l * n_expert + e`; "layer" below means unit.
//!
//! # Layout
//!
//! All integers are little-endian; `docs/format.md` gives every byte.
//!
//! 1. **Header**, one 4096-byte page at offset 0: magic `PINIONPK`, version, the offsets and lengths of the
//!    three sections below, the layer count, the CRC-32 of the resident section and of the index, and the
//!    CRC-32 of the header fields themselves ([`PackedHeader`]).
//! 2. **Resident section**, at offset 4096: a complete GGUF v3 file holding the source model's metadata plus
//!    `pinion.packed.version` and any caller-supplied metadata, every source tensor except the FFN tensors
//!    `blk.{l}.ffn_gate`, `ffn_up` and `ffn_down` (bytes copied bit-exactly), and caller-supplied extra
//!    tensors such as predictor weights. [`Gguf::parse`] reads it as it is.
//! 3. **FFN section**, at the next 4096-aligned offset: layer after layer, the layer's neurons in a
//!    caller-given order (hot first) cut into clusters of `cluster_neurons` consecutive *positions*. Each
//!    cluster is one *record* starting on a page boundary:
//!    `[gate rows of its neurons][up row ++ down column of neuron 0][... of neuron 1]...`, zero padded to a
//!    page multiple. Records of a layer are `stride` bytes apart (the padded size of a full cluster), so record
//!    `k` is at `layer_offset + k * stride`; the last record may be shorter. Gate and up rows keep the
//!    source's quantization bit for bit; down columns (column `i` of `ffn_down` is neuron `i`'s output vector)
//!    are transposed and re-quantized to Q8_0, F16 or F32. An *up row ++ down column* pair is a *bundle*.
//! 4. **Index**, after the FFN section: per layer its shape, types, row sizes, offsets, the order (original
//!    neuron id at each position), the activation frequency at each position, and a CRC-32 of every gate
//!    block and every bundle ([`PackedLayer`]); then (version 2) the name, offset, length and CRC-32 of every
//!    resident tensor, and a CRC-32 of every row of the output head and the token embedding
//!    ([`ResidentChecksums`]).
//!
//! # Reading
//!
//! * A run of hot clusters is one sequential read of consecutive records ([`PackedLayer::record_range`]).
//! * A cold cluster loads in two phases: read its gate block ([`PackedLayer::gate_block_range`], rounded out
//!   to pages with [`page_span`]), evaluate the gates, then read only the bundles of the neurons that passed
//!   ([`PackedLayer::bundle_range`], each rounded out to pages and coalesced by the reader). No read is smaller
//!   than a page and nothing is read beyond the page rounding.
//!
//! [`PackedFile::parse`] checks a whole file held in memory (mapped by the caller). A runtime that reads with
//! I/O instead parses the header page with [`PackedHeader::parse`] and the index bytes with
//! [`parse_packed_index`], then checks each block it reads with [`PackedLayer::verify_gate_block`] and
//! [`PackedLayer::verify_bundle`], each resident tensor it copies with [`ResidentChecksums::verify_tensor`] and
//! each head or embedding row it reads with [`RowChecksums::verify`]: a byte that changed on disk after loading
//! is caught where it is used. [`pack`] writes a file, holding at most one layer's FFN in memory.
//!
//! ```
//! use pinion_format::Gguf;
//! use pinion_format::packed::{PackOptions, PackedFile, pack, page_span};
//! use pinion_format::synth::{SynthConfig, write_model};
//!
//! let mut cfg = SynthConfig::preset("tiny").unwrap();
//! (cfg.n_layers, cfg.d_model, cfg.n_ff, cfg.n_vocab) = (1, 64, 96, 300);
//! let src_bytes = write_model(&cfg, Vec::new(), &mut |_, _| {})?;
//! let src = Gguf::parse(&src_bytes)?;
//!
//! // Hottest neurons first: here simply reversed.
//! let opts = PackOptions { order: Some(vec![(0..96).rev().collect()]), ..PackOptions::default() };
//! let mut out = std::io::Cursor::new(Vec::new());
//! pack(&src, &opts, &mut out, &mut |p| assert_eq!(p.n_layers, 1))?;
//! let bytes = out.into_inner();
//!
//! let f = PackedFile::parse(&bytes)?;
//! let layer = f.layer(0);
//! assert_eq!((layer.n_clusters(), layer.cluster_len(2)), (3, 32));
//! // Original neuron 95 is at position 0: its gate row is the first row of the first record.
//! assert_eq!(layer.position_of(95), 0);
//! let gate = src.tensor("blk.0.ffn_gate.weight")?;
//! assert_eq!(&f.gate_block(0, 0)[..layer.gate_row_bytes()], gate.row(95));
//! // A cold read of neuron 95's bundle: the pages around it.
//! let r = layer.bundle_range(0);
//! assert!(page_span(r.clone()).start <= r.start && r.end <= page_span(r).end);
//! layer.verify_bundle(0, f.bundle(0, 0))?;
//! // Rows 7 and 8 of the output head, as a runtime streaming the head would read them.
//! let head = f.checksums().rows("output.weight").unwrap();
//! let at = (head.offset() + 7 * head.row_bytes() as u64) as usize;
//! head.verify(7, &bytes[at..at + 2 * head.row_bytes()])?;
//! Gguf::parse(f.resident())?.tensor("token_embd.weight")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashSet;
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;

use half::f16;

use crate::error::FormatError;
use crate::gguf::{Gguf, TensorView, Value};
use crate::quant::{self, BlockQ8_0, GgmlType};
use crate::writer::GgufWriter;

mod checksums;

pub use self::checksums::{ROW_CHECKSUMMED_TENSORS, ResidentChecksums, RowChecksums, TensorChecksum};

/// The first eight bytes of a packed file.
pub const PACKED_MAGIC: [u8; 8] = *b"PINIONPK";
/// The packed format version this crate writes (and the newest it reads).
pub const PACKED_VERSION: u32 = 3;
/// The oldest packed format version this crate reads. Version 1 lacks the resident section's checksums;
/// versions 1 and 2 hold dense FFNs only (version 3 adds mixture-of-experts units).
pub const OLDEST_SUPPORTED_PACKED_VERSION: u32 = 1;
/// The most experts a mixture-of-experts layer may have in a packed file (each is an FFN unit of the index).
pub const MAX_EXPERTS: usize = 1024;
/// The page size: the header's size and the alignment of the FFN section and of every record.
pub const PAGE: u64 = 4096;
/// The resident GGUF's metadata key holding the file's packed version (the header's; [`pack`] writes
/// [`PACKED_VERSION`]).
pub const PACKED_VERSION_KEY: &str = "pinion.packed.version";

/// Offset of the header CRC, which covers the header bytes before it.
pub(crate) const HEADER_CRC_AT: usize = 76;
/// Bytes of header fields; the rest of the page is zero.
const HEADER_FIELDS_LEN: usize = 80;
/// Bytes of the fixed part of one layer's index entry.
const LAYER_FIXED_LEN: u64 = 64;

/// How [`pack`] arranges the FFN.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Neurons per cluster (record), the same for every layer; at least 1.
    pub cluster_neurons: usize,
    /// Type of the transposed down columns: [`GgmlType::Q8_0`] (needs `d_model % 32 == 0`), `F16` or `F32`.
    pub down_type: GgmlType,
    /// Per layer, the original neuron id at each position (hottest first); each a permutation of `0..n_ff`.
    /// `None` keeps the original order.
    pub order: Option<Vec<Vec<u32>>>,
    /// Per layer, the activation frequency of each neuron, indexed by *original* neuron id; each in `[0, 1]`.
    /// `None` records 0 for every neuron.
    pub frequency: Option<Vec<Vec<f32>>>,
    /// Extra metadata for the resident GGUF. An entry replaces a source entry with the same key;
    /// [`PACKED_VERSION_KEY`] is always set last.
    pub metadata: Vec<(String, Value)>,
    /// Extra tensors for the resident GGUF (e.g. activation predictor weights), after the source tensors.
    pub extra_tensors: Vec<ExtraTensor>,
}

impl Default for PackOptions {
    fn default() -> PackOptions {
        PackOptions {
            cluster_neurons: 32,
            down_type: GgmlType::Q8_0,
            order: None,
            frequency: None,
            metadata: Vec::new(),
            extra_tensors: Vec::new(),
        }
    }
}

/// A tensor added to the resident GGUF.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraTensor {
    /// Tensor name; must not clash with a source tensor.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, `ne[0]` first.
    pub dims: Vec<u64>,
    /// Raw data, exactly as long as `ty` and `dims` require.
    pub data: Vec<u8>,
}

/// Reported by [`pack`] after each layer's FFN is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackProgress {
    /// The layer just written (0-based).
    pub layer: usize,
    /// Number of layers.
    pub n_layers: usize,
    /// Bytes of the file written so far (from the start of the packed file).
    pub bytes_written: u64,
}

/// What [`pack`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackSummary {
    /// Length of the whole file.
    pub file_len: u64,
    /// Length of the resident GGUF.
    pub resident_len: u64,
    /// Length of the FFN section.
    pub ffn_len: u64,
    /// Zero bytes written for page alignment after the resident section and inside FFN records (the header
    /// page's own padding is not counted).
    pub padding_bytes: u64,
}

/// The header page's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedHeader {
    /// Format version, [`OLDEST_SUPPORTED_PACKED_VERSION`] to [`PACKED_VERSION`].
    pub version: u32,
    /// Offset of the resident GGUF (always [`PAGE`]).
    pub resident_offset: u64,
    /// Length of the resident GGUF.
    pub resident_len: u64,
    /// Offset of the FFN section (page aligned, the first page boundary at or after the resident section's end).
    pub ffn_offset: u64,
    /// Length of the FFN section (a page multiple).
    pub ffn_len: u64,
    /// Offset of the index (`ffn_offset + ffn_len`).
    pub index_offset: u64,
    /// Length of the index; the file ends with the index.
    pub index_len: u64,
    /// Number of FFN units in the index: layers, or (version 3, mixture of experts) layers times experts.
    pub n_layers: u32,
    /// CRC-32 (IEEE) of the resident GGUF's bytes.
    pub resident_crc: u32,
    /// CRC-32 (IEEE) of the index bytes.
    pub index_crc: u32,
}

impl PackedHeader {
    /// Parses and checks the header from the file's first page (`page` may be longer; only the first
    /// [`PAGE`] bytes are read). Checks magic, version (one this build reads), the header CRC, that the padding is
    /// zero, and that the sections follow each other as versions 1 and 2 lay them out (with checked arithmetic).
    pub fn parse(page: &[u8]) -> Result<PackedHeader, FormatError> {
        if (page.len() as u64) < PAGE {
            return Err(FormatError::Truncated { offset: 0, need: PAGE, file_len: page.len() as u64 });
        }
        let u32_at = |at: usize| u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]]);
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&page[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&page[..8]);
        if magic != PACKED_MAGIC {
            return Err(FormatError::BadPackedMagic { found: magic });
        }
        let version = u32_at(8);
        if !(OLDEST_SUPPORTED_PACKED_VERSION..=PACKED_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedPackedVersion { version });
        }
        let expected = u32_at(HEADER_CRC_AT);
        let found = crc32fast::hash(&page[..HEADER_CRC_AT]);
        if expected != found {
            return Err(FormatError::Checksum { what: "header".into(), offset: 0, expected, found });
        }
        if let Some(i) = page[HEADER_FIELDS_LEN..PAGE as usize].iter().position(|&b| b != 0) {
            return Err(corrupt((HEADER_FIELDS_LEN + i) as u64, "header padding is not zero"));
        }
        let page_size = u32_at(12);
        if page_size as u64 != PAGE {
            return Err(corrupt(12, format!("page size is {page_size}, expected {PAGE}")));
        }
        let h = PackedHeader {
            version,
            resident_offset: u64_at(16),
            resident_len: u64_at(24),
            ffn_offset: u64_at(32),
            ffn_len: u64_at(40),
            index_offset: u64_at(48),
            index_len: u64_at(56),
            n_layers: u32_at(64),
            resident_crc: u32_at(68),
            index_crc: u32_at(72),
        };
        if h.resident_offset != PAGE {
            return Err(corrupt(16, format!("resident offset is {}, expected {PAGE}", h.resident_offset)));
        }
        let resident_end = h.resident_offset.checked_add(h.resident_len);
        match resident_end.and_then(round_up) {
            Some(ffn) if ffn == h.ffn_offset => {}
            _ => {
                return Err(corrupt(
                    32,
                    format!(
                        "FFN offset {} is not the first page boundary after the resident section ({} + {})",
                        h.ffn_offset, h.resident_offset, h.resident_len
                    ),
                ));
            }
        }
        if h.ffn_len % PAGE != 0 {
            return Err(corrupt(40, format!("FFN length {} is not a multiple of {PAGE}", h.ffn_len)));
        }
        if h.ffn_offset.checked_add(h.ffn_len) != Some(h.index_offset) {
            return Err(corrupt(
                48,
                format!(
                    "index offset {} is not FFN offset {} + length {}",
                    h.index_offset, h.ffn_offset, h.ffn_len
                ),
            ));
        }
        if h.index_offset.checked_add(h.index_len).is_none() {
            return Err(corrupt(56, format!("index length {} overflows", h.index_len)));
        }
        Ok(h)
    }

    /// The length of the whole file: the end of the index.
    pub fn file_len(&self) -> u64 {
        // `parse` checked that this does not overflow; saturate for a hand-built header.
        self.index_offset.saturating_add(self.index_len)
    }

    /// The header page: the fields, their CRC, and zero padding.
    pub fn to_page(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(PAGE as usize);
        p.extend_from_slice(&PACKED_MAGIC);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&(PAGE as u32).to_le_bytes());
        for v in [
            self.resident_offset,
            self.resident_len,
            self.ffn_offset,
            self.ffn_len,
            self.index_offset,
            self.index_len,
        ] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(&self.n_layers.to_le_bytes());
        p.extend_from_slice(&self.resident_crc.to_le_bytes());
        p.extend_from_slice(&self.index_crc.to_le_bytes());
        debug_assert_eq!(p.len(), HEADER_CRC_AT);
        let crc = crc32fast::hash(&p);
        p.extend_from_slice(&crc.to_le_bytes());
        p.resize(PAGE as usize, 0);
        p
    }

    /// Checks the resident GGUF's bytes against [`resident_crc`](Self::resident_crc).
    pub fn verify_resident(&self, resident: &[u8]) -> Result<(), FormatError> {
        self.verify_resident_chunked(resident, usize::MAX, |_| {})
    }

    /// [`verify_resident`](Self::verify_resident) `chunk` bytes at a time, calling `done` with each chunk's
    /// range (relative to `resident`) once it is hashed, so a caller reading through a memory map can drop the
    /// pages it no longer needs while it checks a large section.
    pub fn verify_resident_chunked(
        &self,
        resident: &[u8],
        chunk: usize,
        mut done: impl FnMut(Range<usize>),
    ) -> Result<(), FormatError> {
        let mut hasher = crc32fast::Hasher::new();
        let mut at = 0;
        while at < resident.len() {
            let end = resident.len().min(at.saturating_add(chunk.max(1)));
            hasher.update(&resident[at..end]);
            done(at..end);
            at = end;
        }
        let found = hasher.finalize();
        if found != self.resident_crc {
            let (what, offset, expected) =
                ("resident section".to_string(), self.resident_offset, self.resident_crc);
            return Err(FormatError::Checksum { what, offset, expected, found });
        }
        Ok(())
    }
}

/// One layer's FFN as the index describes it, with the file offsets of its records.
///
/// A *position* is an index into the packed order (`0..n_ff`); position `p` holds original neuron
/// `order[p]`. Cluster `k` holds positions `k * cluster_neurons ..` up to `cluster_len(k)` of them. Methods
/// taking a cluster or position panic if it is out of range, as slice indexing does.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLayer {
    /// FFN neurons in the layer.
    pub n_ff: usize,
    /// Residual stream width: values per gate row, up row and down column.
    pub d_model: usize,
    /// Neurons per cluster (the last cluster may hold fewer).
    pub cluster_neurons: usize,
    /// Type of the gate rows (the source's).
    pub gate_ty: GgmlType,
    /// Type of the up rows (the source's).
    pub up_ty: GgmlType,
    /// Type of the down columns.
    pub down_ty: GgmlType,
    /// The original neuron id at each position.
    pub order: Vec<u32>,
    /// The activation frequency of the neuron at each position (0 when none was given).
    pub frequency: Vec<f32>,
    index: usize,
    gate_row_bytes: usize,
    up_row_bytes: usize,
    down_col_bytes: usize,
    offset: u64,
    stride: u64,
    len: u64,
    gate_crc: Vec<u32>,
    bundle_crc: Vec<u32>,
    /// Version 2: the CRC of each position's gate row (for reads of single predicted rows); empty in version 1.
    gate_row_crc: Vec<u32>,
    position: Vec<u32>,
}

impl PackedLayer {
    /// Number of clusters (records).
    pub fn n_clusters(&self) -> usize {
        self.n_ff.div_ceil(self.cluster_neurons)
    }

    /// Number of neurons in cluster `k`.
    pub fn cluster_len(&self, k: usize) -> usize {
        assert!(k < self.n_clusters(), "cluster {k} out of range (layer has {})", self.n_clusters());
        self.cluster_neurons.min(self.n_ff - k * self.cluster_neurons)
    }

    /// Bytes of one gate row.
    pub fn gate_row_bytes(&self) -> usize {
        self.gate_row_bytes
    }

    /// Bytes of one up row.
    pub fn up_row_bytes(&self) -> usize {
        self.up_row_bytes
    }

    /// Bytes of one down column.
    pub fn down_col_bytes(&self) -> usize {
        self.down_col_bytes
    }

    /// Bytes of one bundle: an up row followed by a down column.
    pub fn bundle_bytes(&self) -> usize {
        self.up_row_bytes + self.down_col_bytes
    }

    /// Distance between the starts of consecutive records (a page multiple).
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// Record `k`: page-aligned start, padded to a page multiple. Absolute file offsets.
    pub fn record_range(&self, k: usize) -> Range<u64> {
        let payload = (self.cluster_len(k) * (self.gate_row_bytes + self.bundle_bytes())) as u64;
        let start = self.offset + k as u64 * self.stride;
        start..start + payload.div_ceil(PAGE) * PAGE
    }

    /// The exact bytes of cluster `k`'s gate rows.
    pub fn gate_block_range(&self, k: usize) -> Range<u64> {
        let start = self.record_range(k).start;
        start..start + (self.cluster_len(k) * self.gate_row_bytes) as u64
    }

    /// The gate row at position `pos`.
    pub fn gate_row_range(&self, pos: usize) -> Range<u64> {
        let (k, j) = self.split(pos);
        let start = self.record_range(k).start + (j * self.gate_row_bytes) as u64;
        start..start + self.gate_row_bytes as u64
    }

    /// The bundle (up row ++ down column) at position `pos`, exact.
    pub fn bundle_range(&self, pos: usize) -> Range<u64> {
        let (k, j) = self.split(pos);
        let gate_end = self.gate_block_range(k).end;
        let start = gate_end + (j * self.bundle_bytes()) as u64;
        start..start + self.bundle_bytes() as u64
    }

    /// Every record of the layer, from the first record's start to the last record's padded end.
    pub fn layer_range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }

    /// The position of original neuron `neuron` (the inverse of [`order`](Self::order)).
    pub fn position_of(&self, neuron: u32) -> usize {
        self.position[neuron as usize] as usize
    }

    /// Checks the bytes of cluster `k`'s gate block against the recorded CRC: a mismatch is
    /// [`FormatError::Checksum`] with `what` = `"layer {l} cluster {k} gate block"` and the block's absolute file
    /// offset, a slice of the wrong length [`FormatError::BadBlockView`].
    pub fn verify_gate_block(&self, k: usize, bytes: &[u8]) -> Result<(), FormatError> {
        let r = self.gate_block_range(k);
        let what = || format!("layer {} cluster {k} gate block", self.index);
        check_len(&what, r.clone(), bytes)?;
        check_crc(&what, r.start, self.gate_crc[k], bytes)
    }

    /// Checks the bytes of the bundle at position `pos` against the recorded CRC (errors as
    /// [`verify_gate_block`](Self::verify_gate_block), with `what` =
    /// `"layer {l} bundle at position {pos} (neuron {n}, cluster {k})"`).
    pub fn verify_bundle(&self, pos: usize, bytes: &[u8]) -> Result<(), FormatError> {
        let r = self.bundle_range(pos);
        let what = || {
            let (l, n, k) = (self.index, self.order[pos], pos / self.cluster_neurons);
            format!("layer {l} bundle at position {pos} (neuron {n}, cluster {k})")
        };
        check_len(&what, r.clone(), bytes)?;
        check_crc(&what, r.start, self.bundle_crc[pos], bytes)
    }

    /// [`verify_bundle`](Self::verify_bundle) for a bundle read in two parts: its up row `up` and down column
    /// `down`, checked as if contiguous.
    pub fn verify_bundle_parts(&self, pos: usize, up: &[u8], down: &[u8]) -> Result<(), FormatError> {
        let r = self.bundle_range(pos);
        let what = || {
            let (l, n, k) = (self.index, self.order[pos], pos / self.cluster_neurons);
            format!("layer {l} bundle at position {pos} (neuron {n}, cluster {k})")
        };
        if up.len() != self.up_row_bytes || down.len() != self.down_col_bytes {
            return Err(FormatError::BadBlockView {
                len: up.len() + down.len(),
                block: self.bundle_bytes(),
                why: format!("{}: up {} + down {} bytes", what(), up.len(), down.len()),
            });
        }
        let mut h = crc32fast::Hasher::new();
        h.update(up);
        h.update(down);
        let found = h.finalize();
        if found != self.bundle_crc[pos] {
            return Err(FormatError::Checksum {
                what: what(),
                offset: r.start,
                expected: self.bundle_crc[pos],
                found,
            });
        }
        Ok(())
    }

    /// Whether single gate rows can be checked ([`verify_gate_row`](Self::verify_gate_row)): version 2 files
    /// record a CRC per gate row.
    pub fn has_gate_row_checksums(&self) -> bool {
        !self.gate_row_crc.is_empty()
    }

    /// Checks the gate row at position `pos` (read alone, for a predicted neuron) against its recorded CRC:
    /// `what` = `"layer {l} gate row at position {pos} (neuron {n}, cluster {k})"`; a version 1 file, which
    /// records none, is [`FormatError::NoChecksum`].
    pub fn verify_gate_row(&self, pos: usize, bytes: &[u8]) -> Result<(), FormatError> {
        let r = self.gate_row_range(pos);
        let what = || {
            let (l, n, k) = (self.index, self.order[pos], pos / self.cluster_neurons);
            format!("layer {l} gate row at position {pos} (neuron {n}, cluster {k})")
        };
        let Some(&expected) = self.gate_row_crc.get(pos) else {
            return Err(FormatError::NoChecksum { what: what() });
        };
        check_len(&what, r.clone(), bytes)?;
        check_crc(&what, r.start, expected, bytes)
    }

    /// (cluster, index within the cluster) of position `pos`.
    fn split(&self, pos: usize) -> (usize, usize) {
        assert!(pos < self.n_ff, "position {pos} out of range (layer has {} neurons)", self.n_ff);
        (pos / self.cluster_neurons, pos % self.cluster_neurons)
    }
}

/// A check of the resident section's bytes against the header (see [`PackedFile::parse_checking`]).
pub type ResidentCheck<'c> = dyn FnMut(&PackedHeader, &[u8]) -> Result<(), FormatError> + 'c;

/// A packed file held in memory (typically mapped by the caller), checked by [`parse`](Self::parse).
#[derive(Debug)]
pub struct PackedFile<'a> {
    bytes: &'a [u8],
    header: PackedHeader,
    layers: Vec<PackedLayer>,
    checksums: ResidentChecksums,
    resident: Gguf<'a>,
}

impl<'a> PackedFile<'a> {
    /// Parses a whole packed file. Checks the magic, version and header CRC, the section bounds against
    /// `bytes.len()` (the file must end with the index), the index CRC and every index entry's consistency
    /// (see [`parse_packed_index`]), the resident CRC, that the resident section parses as GGUF and carries
    /// [`PACKED_VERSION_KEY`] equal to the header's version, and (version 2) that the index's tensor and row
    /// checksum entries describe the resident GGUF's tensors. Gate blocks, bundles, tensors and rows are not
    /// checked against their CRCs here: see [`verify_all`](Self::verify_all). Any content gives a
    /// [`FormatError`], never a panic.
    pub fn parse(bytes: &'a [u8]) -> Result<PackedFile<'a>, FormatError> {
        Self::parse_checking(bytes, &mut |h: &PackedHeader, resident: &[u8]| h.verify_resident(resident))
    }

    /// [`parse`](Self::parse) with the resident CRC checked by `verify` (given the header and the resident
    /// section's bytes) instead, e.g. with [`PackedHeader::verify_resident_chunked`] to bound the pages a memory
    /// map keeps resident while checking.
    pub fn parse_checking(
        bytes: &'a [u8],
        verify: &mut ResidentCheck<'_>,
    ) -> Result<PackedFile<'a>, FormatError> {
        let header = PackedHeader::parse(bytes)?;
        let file_len = bytes.len() as u64;
        let end = header.file_len();
        if file_len < end {
            return Err(FormatError::Truncated {
                offset: header.index_offset,
                need: header.index_len,
                file_len,
            });
        }
        if file_len > end {
            return Err(corrupt(end, format!("{} bytes after the end of the index", file_len - end)));
        }
        let index = &bytes[header.index_offset as usize..end as usize];
        let PackedIndex { layers, checksums } = parse_packed_index(&header, index, file_len)?;
        let resident_end = header.resident_offset + header.resident_len;
        let resident_bytes = &bytes[header.resident_offset as usize..resident_end as usize];
        verify(&header, resident_bytes)?;
        let resident = Gguf::parse(resident_bytes).map_err(|e| {
            corrupt(header.resident_offset, format!("the resident section is not a valid GGUF file: {e}"))
        })?;
        match resident.get(PACKED_VERSION_KEY).and_then(Value::as_u64) {
            Some(v) if v == header.version as u64 => {}
            other => {
                return Err(corrupt(
                    header.resident_offset,
                    format!(
                        "resident metadata {PACKED_VERSION_KEY} is {other:?}, the header's version {}",
                        header.version
                    ),
                ));
            }
        }
        if header.version >= 2 {
            checksums.check_against(&resident, header.resident_offset, header.index_offset)?;
        }
        Ok(PackedFile { bytes, header, layers, checksums, resident })
    }

    /// The header.
    pub fn header(&self) -> &PackedHeader {
        &self.header
    }

    /// The resident GGUF's bytes.
    pub fn resident(&self) -> &'a [u8] {
        self.resident.bytes()
    }

    /// The resident GGUF, parsed.
    pub fn resident_gguf(&self) -> &Gguf<'a> {
        &self.resident
    }

    /// Offset of the resident GGUF in the file.
    pub fn resident_offset(&self) -> u64 {
        self.header.resident_offset
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `l`. Panics if `l >= n_layers()`.
    pub fn layer(&self, l: usize) -> &PackedLayer {
        &self.layers[l]
    }

    /// Every layer.
    pub fn layers(&self) -> &[PackedLayer] {
        &self.layers
    }

    /// The exact bytes of layer `l`'s cluster `k` gate block.
    pub fn gate_block(&self, l: usize, cluster: usize) -> &'a [u8] {
        self.slice(self.layers[l].gate_block_range(cluster))
    }

    /// The bytes of layer `l`'s bundle at position `pos`: the up row, then the down column.
    pub fn bundle(&self, l: usize, pos: usize) -> &'a [u8] {
        self.slice(self.layers[l].bundle_range(pos))
    }

    /// The resident section's tensor and row checksums (empty for a version 1 file).
    pub fn checksums(&self) -> &ResidentChecksums {
        &self.checksums
    }

    /// The recorded CRC-32 of resident tensor `name`'s data; `None` if the file records none (version 1) or has
    /// no such tensor.
    pub fn tensor_checksum(&self, name: &str) -> Option<u32> {
        self.checksums.tensor(name).map(|t| t.crc)
    }

    /// Checks `bytes`, the whole data of resident tensor `name`, against its CRC (see
    /// [`ResidentChecksums::verify_tensor`]).
    pub fn verify_tensor(&self, name: &str, bytes: &[u8]) -> Result<(), FormatError> {
        self.checksums.verify_tensor(name, bytes)
    }

    /// The row checksums of resident tensor `name` (`output.weight`, `token_embd.weight`), if recorded.
    pub fn row_checksums(&self, name: &str) -> Option<&RowChecksums> {
        self.checksums.rows(name)
    }

    /// Checks `bytes`, whole rows of resident tensor `name` from row `first_row` on, row by row (see
    /// [`RowChecksums::verify`]).
    pub fn verify_rows(&self, name: &str, first_row: usize, bytes: &[u8]) -> Result<(), FormatError> {
        self.checksums.verify_rows(name, first_row, bytes)
    }

    /// Checks every gate block and bundle, and (version 2) every resident tensor and checksummed row, against
    /// its CRC; the first mismatch is the error.
    pub fn verify_all(&self) -> Result<(), FormatError> {
        for (l, layer) in self.layers.iter().enumerate() {
            for k in 0..layer.n_clusters() {
                layer.verify_gate_block(k, self.gate_block(l, k))?;
            }
            for pos in 0..layer.n_ff {
                layer.verify_bundle(pos, self.bundle(l, pos))?;
            }
        }
        for t in self.checksums.tensors() {
            t.verify(self.slice(t.range()))?;
        }
        for rows in self.checksums.row_tables() {
            let len = (rows.n_rows() * rows.row_bytes()) as u64;
            rows.verify(0, self.slice(rows.offset()..rows.offset() + len))?;
        }
        Ok(())
    }

    fn slice(&self, r: Range<u64>) -> &'a [u8] {
        // `parse_packed_index` checked that every record and tensor lies inside the file.
        &self.bytes[r.start as usize..r.end as usize]
    }
}

/// `r` rounded out to page boundaries: the start down, the end up. An empty range stays empty (at its start
/// rounded down). The end saturates at `u64::MAX` within the last page, which no file reaches.
pub fn page_span(r: Range<u64>) -> Range<u64> {
    let start = r.start / PAGE * PAGE;
    if r.end <= r.start {
        return start..start;
    }
    start..r.end.div_ceil(PAGE).saturating_mul(PAGE)
}

/// What a packed file's index holds: the FFN layers and the resident section's checksums.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedIndex {
    /// The FFN layers, in order.
    pub layers: Vec<PackedLayer>,
    /// The resident section's tensor and row checksums (empty for a version 1 file).
    pub checksums: ResidentChecksums,
}

/// The layers of the index: [`parse_packed_index`] without the resident checksums.
pub fn parse_index(h: &PackedHeader, index: &[u8], file_len: u64) -> Result<Vec<PackedLayer>, FormatError> {
    parse_packed_index(h, index, file_len).map(|i| i.layers)
}

/// Parses and checks the index bytes `index` of a file of `file_len` bytes whose header is `h`: all a reader
/// needs, with the header, to check every block, tensor and row it reads.
///
/// Checks: `index` is `h.index_len` bytes, the file is exactly `h.file_len()` bytes, the index CRC; per
/// layer: nonzero sizes, known types, row sizes that match the types, the cluster count, the stride and layer
/// length (checked arithmetic), that layers are contiguous from `h.ffn_offset` and fill the FFN section
/// exactly, that the order is a permutation, that frequencies are in `[0, 1]`; for version 2 the checksum
/// section (see [`ResidentChecksums`]: counts against caps, tensors inside the resident section, row tables
/// that tile their tensors); and that nothing follows. Allocation is bounded by the index's length. Checking the
/// checksum entries against the resident GGUF's directory needs the resident section: [`PackedFile::parse`] does.
pub fn parse_packed_index(h: &PackedHeader, index: &[u8], file_len: u64) -> Result<PackedIndex, FormatError> {
    if index.len() as u64 != h.index_len {
        return Err(FormatError::Truncated {
            offset: h.index_offset,
            need: h.index_len,
            file_len: index.len() as u64,
        });
    }
    if file_len != h.file_len() {
        return Err(corrupt(48, format!("the file is {file_len} bytes, the header says {}", h.file_len())));
    }
    check_crc(&|| "index".to_string(), h.index_offset, h.index_crc, index)?;
    let n_layers = h.n_layers as u64;
    if n_layers.saturating_mul(LAYER_FIXED_LEN) > h.index_len {
        return Err(corrupt(
            64,
            format!("{n_layers} layers cannot fit in an index of {} bytes", h.index_len),
        ));
    }
    let mut c = IndexCursor { bytes: index, pos: 0, base: h.index_offset };
    let mut layers = Vec::with_capacity(n_layers as usize);
    let ffn_end = h.ffn_offset + h.ffn_len;
    let mut next = h.ffn_offset;
    for l in 0..n_layers as usize {
        let layer = parse_layer(&mut c, l, next, ffn_end, h.version)?;
        next = layer.offset + layer.len;
        layers.push(layer);
    }
    if next != ffn_end {
        return Err(corrupt(40, format!("layers end at {next}, the FFN section at {ffn_end}")));
    }
    let checksums = match h.version {
        1 => ResidentChecksums::default(),
        _ => ResidentChecksums::parse(&mut c, h)?,
    };
    if c.pos != index.len() {
        let after = if h.version == 1 { "the last layer" } else { "the checksums" };
        return Err(corrupt(c.offset(), format!("{} bytes after {after}", index.len() - c.pos)));
    }
    Ok(PackedIndex { layers, checksums })
}

fn parse_layer(
    c: &mut IndexCursor<'_>,
    l: usize,
    expected_offset: u64,
    ffn_end: u64,
    version: u32,
) -> Result<PackedLayer, FormatError> {
    let at = c.offset();
    let n_ff = c.u32()? as usize;
    let d_model = c.u32()? as usize;
    let cluster_neurons = c.u32()? as usize;
    if n_ff == 0 || d_model == 0 || cluster_neurons == 0 {
        return Err(corrupt(
            at,
            format!(
                "layer {l}: n_ff {n_ff}, d_model {d_model} and cluster_neurons {cluster_neurons} must be nonzero"
            ),
        ));
    }
    let mut tys = [GgmlType::F32; 3];
    for ty in &mut tys {
        let ty_at = c.offset();
        let id = c.u32()?;
        *ty = GgmlType::from_id(id)
            .ok_or_else(|| corrupt(ty_at, format!("layer {l}: unknown type id {id}")))?;
    }
    let [gate_ty, up_ty, down_ty] = tys;
    let mut sizes = [0usize; 3];
    for (size, ty) in sizes.iter_mut().zip(tys) {
        let size_at = c.offset();
        *size = c.u32()? as usize;
        match ty.row_bytes(d_model) {
            Ok(n) if n == *size => {}
            _ => {
                return Err(corrupt(
                    size_at,
                    format!("layer {l}: {size} bytes is not the size of {d_model} values of {ty}"),
                ));
            }
        }
    }
    let [gate_row_bytes, up_row_bytes, down_col_bytes] = sizes;
    let n_clusters_at = c.offset();
    let n_clusters = c.u32()? as usize;
    if n_clusters != n_ff.div_ceil(cluster_neurons) {
        return Err(corrupt(
            n_clusters_at,
            format!(
                "layer {l}: {n_clusters} clusters, but {n_ff} neurons in clusters of {cluster_neurons} need {}",
                n_ff.div_ceil(cluster_neurons)
            ),
        ));
    }
    let offset_at = c.offset();
    let offset = c.u64()?;
    let stride = c.u64()?;
    let len = c.u64()?;
    if offset != expected_offset {
        return Err(corrupt(offset_at, format!("layer {l} starts at {offset}, expected {expected_offset}")));
    }
    let per_neuron = gate_row_bytes as u64 + up_row_bytes as u64 + down_col_bytes as u64;
    let full = cluster_neurons.min(n_ff) as u64;
    let last = (n_ff - (n_clusters - 1) * cluster_neurons) as u64;
    let want_stride = per_neuron.checked_mul(full).and_then(round_up);
    let want_len = want_stride.and_then(|s| {
        let last_rec = per_neuron.checked_mul(last).and_then(round_up)?;
        s.checked_mul(n_clusters as u64 - 1)?.checked_add(last_rec)
    });
    if want_stride != Some(stride) || want_len != Some(len) {
        return Err(corrupt(
            offset_at + 8,
            format!(
                "layer {l}: stride {stride} and length {len} do not match its shape ({want_stride:?}, {want_len:?})"
            ),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= ffn_end => {}
        _ => {
            return Err(corrupt(
                offset_at,
                format!("layer {l} ({offset} + {len}) extends past the FFN section's end {ffn_end}"),
            ));
        }
    }
    let order_at = c.offset();
    let order = c.u32s(n_ff)?;
    let mut position = vec![u32::MAX; n_ff];
    for (p, &i) in order.iter().enumerate() {
        match position.get_mut(i as usize) {
            Some(slot) if *slot == u32::MAX => *slot = p as u32,
            _ => {
                return Err(corrupt(
                    order_at + 4 * p as u64,
                    format!("layer {l}: order is not a permutation (neuron {i} at position {p})"),
                ));
            }
        }
    }
    let freq_at = c.offset();
    let frequency: Vec<f32> = c.u32s(n_ff)?.into_iter().map(f32::from_bits).collect();
    if let Some(p) = frequency.iter().position(|f| !(0.0..=1.0).contains(f)) {
        return Err(corrupt(
            freq_at + 4 * p as u64,
            format!("layer {l}: frequency {} at position {p} is not in [0, 1]", frequency[p]),
        ));
    }
    let gate_crc = c.u32s(n_clusters)?;
    let bundle_crc = c.u32s(n_ff)?;
    let gate_row_crc = if version >= 2 { c.u32s(n_ff)? } else { Vec::new() };
    Ok(PackedLayer {
        n_ff,
        d_model,
        cluster_neurons,
        gate_ty,
        up_ty,
        down_ty,
        order,
        frequency,
        index: l,
        gate_row_bytes,
        up_row_bytes,
        down_col_bytes,
        offset,
        stride,
        len,
        gate_crc,
        bundle_crc,
        gate_row_crc,
        position,
    })
}

/// Reads little-endian fields from the index, reporting absolute file offsets.
struct IndexCursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> IndexCursor<'a> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], FormatError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(FormatError::Truncated {
                offset: self.offset(),
                need: n,
                file_len: self.base + self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// `n` u32s; fails before allocating if the index has fewer than `4 * n` bytes left.
    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, FormatError> {
        let b = self.take((n as u64).saturating_mul(4))?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

// === Writing ===

/// One FFN unit (a dense layer's FFN, or one expert of a layer), validated.
struct LayerPlan<'s> {
    /// The layer's tensors (an expert's are 3-D: its rows are a block of them).
    gate: TensorView<'s>,
    up: TensorView<'s>,
    down: TensorView<'s>,
    /// The expert (0 for a dense layer): gate and up rows `expert * n_ff ..`, down rows `expert * d_model ..`.
    expert: usize,
    n_ff: usize,
    d_model: usize,
    order: Vec<u32>,
    /// By position.
    frequency: Vec<f32>,
}

/// Writes `src` as a packed file of version [`PACKED_VERSION`] to `out`, starting at `out`'s current position
/// (offsets in the file are relative to it), and leaves `out` positioned after the file. Calls `progress` once
/// per layer, after the layer's records are written. The index's resident checksums ([`ResidentChecksums`]) are
/// computed from the source tensors' bytes, which the resident GGUF copies unchanged.
///
/// Everything is validated before the first byte is written: the model must be dense llama-style (per layer
/// `ffn_gate` and `ffn_up` of shape `[d_model, n_ff]` and `ffn_down` of shape `[n_ff, d_model]`, any other
/// `blk.{l}.ffn_*` tensor but `ffn_norm` is [`FormatError::Unsupported`]), and the options must fit it
/// ([`FormatError::InvalidPackOptions`]). Memory use is one layer's down matrix as f32 plus one record; the
/// rest is streamed. Wrap a file in a `std::io::BufWriter`.
pub fn pack<W: Write + Seek>(
    src: &Gguf<'_>,
    opts: &PackOptions,
    mut out: W,
    progress: &mut dyn FnMut(PackProgress),
) -> Result<PackSummary, FormatError> {
    let plans = plan(src, opts)?;
    let (resident, resident_data) = resident_writer(src, opts)?;
    let resident_tensors = resident.tensor_infos()?;
    let resident_data_start = PAGE + resident.data_offset();

    let base = out.stream_position()?;
    write_zeros(&mut out, PAGE)?;
    let mut cw = CrcWriter { inner: &mut out, hasher: crc32fast::Hasher::new(), n: 0 };
    resident.write_to(&mut cw)?;
    let (resident_len, resident_crc) = (cw.n, cw.hasher.finalize());
    let resident_end = PAGE + resident_len;
    let ffn_offset = round_up(resident_end).ok_or_else(too_big)?;
    let mut padding_bytes = ffn_offset - resident_end;
    write_zeros(&mut out, padding_bytes)?;

    let mut index = Vec::new();
    let mut pos = ffn_offset;
    let n_layers = plans.len();
    for (l, p) in plans.iter().enumerate() {
        let len = write_layer(p, opts, pos, &mut out, &mut index, &mut padding_bytes)?;
        pos = pos.checked_add(len).ok_or_else(too_big)?;
        progress(PackProgress { layer: l, n_layers, bytes_written: pos });
    }
    let ffn_len = pos - ffn_offset;
    checksums::write_section(&resident_tensors, &resident_data, resident_data_start, &mut index)?;
    out.write_all(&index)?;
    let index_len = index.len() as u64;
    let header = PackedHeader {
        version: PACKED_VERSION,
        resident_offset: PAGE,
        resident_len,
        ffn_offset,
        ffn_len,
        index_offset: pos,
        index_len,
        n_layers: n_layers as u32,
        resident_crc,
        index_crc: crc32fast::hash(&index),
    };
    let file_len = pos.checked_add(index_len).ok_or_else(too_big)?;
    out.seek(SeekFrom::Start(base))?;
    out.write_all(&header.to_page())?;
    out.seek(SeekFrom::Start(base + file_len))?;
    out.flush()?;
    Ok(PackSummary { file_len, resident_len, ffn_len, padding_bytes })
}

fn plan<'s>(src: &'s Gguf<'_>, opts: &PackOptions) -> Result<Vec<LayerPlan<'s>>, FormatError> {
    let bad = |why: String| FormatError::InvalidPackOptions { why };
    let unsupported = |what: String| FormatError::Unsupported { what };
    if opts.cluster_neurons == 0 || opts.cluster_neurons > u32::MAX as usize {
        return Err(bad(format!("cluster_neurons is {}, must be in 1..=2^32-1", opts.cluster_neurons)));
    }
    if !matches!(opts.down_type, GgmlType::Q8_0 | GgmlType::F16 | GgmlType::F32) {
        return Err(unsupported(format!("down type {} (use q8_0, f16 or f32)", opts.down_type)));
    }
    let arch = src.get_str("general.architecture")?;
    let n_layers = src.get_u64(&format!("{arch}.block_count"))?;
    if n_layers > u32::MAX as u64 {
        return Err(unsupported(format!("{n_layers} layers")));
    }
    let n_layers = n_layers as usize;
    for t in &src.tensors {
        if let Some(rest) = t.name.strip_prefix("blk.") {
            let sub = rest.split_once('.').map_or("", |(_, s)| s);
            let known = [
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
                "ffn_gate_inp.weight",
                "ffn_gate_exps.weight",
                "ffn_up_exps.weight",
                "ffn_down_exps.weight",
            ];
            if sub.starts_with("ffn_") && !known.contains(&sub) {
                return Err(unsupported(format!(
                    "tensor '{}': only dense FFNs (ffn_gate, ffn_up, ffn_down) and experts without shared \
                     experts or biases (ffn_gate_inp, ffn_gate_exps, ffn_up_exps, ffn_down_exps) can be packed",
                    t.name
                )));
            }
        }
    }
    for name in ["token_embd.weight", "output_norm.weight"] {
        src.tensor(name)?;
    }
    // The FFN units: one per dense layer, one per expert of a mixture-of-experts layer.
    let mut units: Vec<(usize, TensorView<'s>, TensorView<'s>, TensorView<'s>, usize)> = Vec::new();
    for l in 0..n_layers {
        let b = |s: &str| format!("blk.{l}.{s}.weight");
        for s in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"] {
            src.tensor(&b(s))?;
        }
        let shape_err = |t: &TensorView<'_>, expected: String| FormatError::UnexpectedTensor {
            name: t.name.to_string(),
            ty: t.ty,
            dims: t.dims.to_vec(),
            expected,
        };
        let moe = src.tensors.iter().any(|t| t.name == b("ffn_gate_exps"));
        let (gate, up, down) = match moe {
            true => (
                src.tensor(&b("ffn_gate_exps"))?,
                src.tensor(&b("ffn_up_exps"))?,
                src.tensor(&b("ffn_down_exps"))?,
            ),
            false => (src.tensor(&b("ffn_gate"))?, src.tensor(&b("ffn_up"))?, src.tensor(&b("ffn_down"))?),
        };
        let dims = if moe { 3 } else { 2 };
        if gate.dims.len() != dims {
            let what =
                if moe { "3 dimensions [d_model, n_ff, n_expert]" } else { "2 dimensions [d_model, n_ff]" };
            return Err(shape_err(&gate, what.into()));
        }
        let (d_model, n_ff) = (gate.dims[0], gate.dims[1]);
        let n_expert = if moe { gate.dims[2] } else { 1 };
        if d_model == 0 || n_ff == 0 || d_model > u32::MAX as u64 || n_ff > u32::MAX as u64 {
            return Err(shape_err(&gate, "d_model and n_ff in 1..2^32".into()));
        }
        if n_expert == 0 || n_expert > MAX_EXPERTS as u64 {
            return Err(shape_err(&gate, format!("1 to {MAX_EXPERTS} experts")));
        }
        let tail: &[u64] = if moe { &gate.dims[2..] } else { &[] };
        let want = |a: u64, b: u64| [&[a, b][..], tail].concat();
        if up.dims != want(d_model, n_ff) {
            return Err(shape_err(&up, format!("shape {:?} like its gate", want(d_model, n_ff))));
        }
        if down.dims != want(n_ff, d_model) {
            return Err(shape_err(&down, format!("shape {:?} (its gate transposed)", want(n_ff, d_model))));
        }
        if moe {
            let router = src.tensor(&b("ffn_gate_inp"))?;
            if router.dims != [d_model, n_expert] {
                return Err(shape_err(&router, format!("shape [{d_model}, {n_expert}] (the router)")));
            }
        }
        let d_model = d_model as usize;
        if opts.down_type.row_bytes(d_model).is_err() {
            return Err(unsupported(format!(
                "layer {l}: d_model {d_model} is not a multiple of {} as down type {} needs",
                opts.down_type.block_len(),
                opts.down_type
            )));
        }
        for e in 0..n_expert as usize {
            units.push((n_ff as usize, gate, up, down, e));
        }
    }
    for (what, list) in
        [("order", opts.order.as_ref().map(Vec::len)), ("frequency", opts.frequency.as_ref().map(Vec::len))]
    {
        if let Some(n) = list {
            if n != units.len() {
                return Err(bad(format!("{what} has {n} FFN units, the model {}", units.len())));
            }
        }
    }
    let mut plans = Vec::with_capacity(units.len());
    for (l, (n_ff, gate, up, down, expert)) in units.into_iter().enumerate() {
        let d_model = gate.dims[0] as usize;
        let order = match &opts.order {
            Some(o) => {
                let o = &o[l];
                if o.len() != n_ff {
                    return Err(bad(format!(
                        "order of unit {l} has {} entries, the unit {n_ff} neurons",
                        o.len()
                    )));
                }
                let mut seen = vec![false; n_ff];
                for &i in o {
                    match seen.get_mut(i as usize) {
                        Some(s) if !*s => *s = true,
                        _ => {
                            return Err(bad(format!(
                                "order of unit {l} is not a permutation of 0..{n_ff} (neuron {i})"
                            )));
                        }
                    }
                }
                o.clone()
            }
            None => (0..n_ff as u32).collect(),
        };
        let frequency = match &opts.frequency {
            Some(f) => {
                let f = &f[l];
                if f.len() != n_ff {
                    return Err(bad(format!(
                        "frequency of unit {l} has {} entries, the unit {n_ff} neurons",
                        f.len()
                    )));
                }
                if let Some(i) = f.iter().position(|x| !(0.0..=1.0).contains(x)) {
                    return Err(bad(format!("frequency of unit {l}, neuron {i} is {}, not in [0, 1]", f[i])));
                }
                order.iter().map(|&i| f[i as usize]).collect()
            }
            None => vec![0.0; n_ff],
        };
        plans.push(LayerPlan { gate, up, down, expert, n_ff, d_model, order, frequency });
    }
    Ok(plans)
}

/// The resident GGUF: source metadata and non-FFN tensors, the caller's extras, the version key; and each
/// tensor's data, in the writer's tensor order.
fn resident_writer<'w>(
    src: &Gguf<'w>,
    opts: &'w PackOptions,
) -> Result<(GgufWriter<'w>, Vec<&'w [u8]>), FormatError> {
    let ffn: HashSet<String> = src
        .tensors
        .iter()
        .filter(|t| {
            let sub = t.name.strip_prefix("blk.").and_then(|r| r.split_once('.')).map_or("", |(_, s)| s);
            let streamed =
                ["ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];
            streamed.iter().any(|s| sub.strip_suffix(".weight") == Some(s))
        })
        .map(|t| t.name.clone())
        .collect();
    let mut w = GgufWriter::new();
    for (key, value) in &src.metadata {
        w.add_metadata(key.as_str(), value.clone())?;
    }
    for (key, value) in &opts.metadata {
        w.set_metadata(key.as_str(), value.clone())?;
    }
    w.set_metadata(PACKED_VERSION_KEY, PACKED_VERSION)?;
    let mut data = Vec::new();
    for t in &src.tensors {
        if !ffn.contains(&t.name) {
            let d = src.tensor_data(t)?;
            w.add_tensor_data(&t.name, t.ty, &t.dims, d)?;
            data.push(d);
        }
    }
    for e in &opts.extra_tensors {
        if ffn.contains(&e.name) {
            return Err(FormatError::TensorExists { name: e.name.clone() });
        }
        w.add_tensor_data(&e.name, e.ty, &e.dims, e.data.as_slice())?;
        data.push(e.data.as_slice());
    }
    Ok((w, data))
}

/// Writes one layer's records at file offset `offset`, appends its index entry, and returns its length.
fn write_layer<W: Write>(
    p: &LayerPlan<'_>,
    opts: &PackOptions,
    offset: u64,
    out: &mut W,
    index: &mut Vec<u8>,
    padding_bytes: &mut u64,
) -> Result<u64, FormatError> {
    let (n_ff, d) = (p.n_ff, p.d_model);
    let cols = transposed_down(p)?;
    let c = opts.cluster_neurons.min(n_ff);
    let g = p.gate.row_bytes();
    let u = p.up.row_bytes();
    let dn = opts.down_type.row_bytes(d)?;
    let per_neuron = (g + u + dn) as u64;
    let stride = per_neuron.checked_mul(c as u64).and_then(round_up).ok_or_else(too_big)?;
    let n_clusters = n_ff.div_ceil(c);
    let mut rec = vec![0u8; usize::try_from(stride).map_err(|_| too_big())?];
    let mut q8 = vec![BlockQ8_0 { d: f16::ZERO, qs: [0; 32] }; d / quant::QK];
    let mut gate_crc = Vec::with_capacity(n_clusters);
    let mut bundle_crc = Vec::with_capacity(n_ff);
    let mut gate_row_crc = Vec::with_capacity(n_ff);
    let mut len = 0u64;
    for k in 0..n_clusters {
        let first = k * c;
        let clen = c.min(n_ff - first);
        let payload = clen * (g + u + dn);
        rec[..payload].fill(0);
        for j in 0..clen {
            let i = p.order[first + j] as usize;
            let row = p.expert * n_ff + i;
            rec[j * g..][..g].copy_from_slice(p.gate.row(row));
            gate_row_crc.push(crc32fast::hash(p.gate.row(row)));
            let b = &mut rec[clen * g + j * (u + dn)..][..u + dn];
            b[..u].copy_from_slice(p.up.row(row));
            encode_col(opts.down_type, &cols[i * d..][..d], &mut b[u..], &mut q8);
            bundle_crc.push(crc32fast::hash(b));
        }
        gate_crc.push(crc32fast::hash(&rec[..clen * g]));
        let rec_len = (payload as u64).div_ceil(PAGE) * PAGE;
        rec[payload..rec_len as usize].fill(0);
        out.write_all(&rec[..rec_len as usize])?;
        *padding_bytes += rec_len - payload as u64;
        len += rec_len;
    }

    for v in [n_ff, d, opts.cluster_neurons] {
        index.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for ty in [p.gate.ty, p.up.ty, opts.down_type] {
        index.extend_from_slice(&ty.id().to_le_bytes());
    }
    for v in [g, u, dn, n_clusters] {
        index.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for v in [offset, stride, len] {
        index.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert!(index.len() as u64 % 4 == 0);
    for &i in &p.order {
        index.extend_from_slice(&i.to_le_bytes());
    }
    for &f in &p.frequency {
        index.extend_from_slice(&f.to_bits().to_le_bytes());
    }
    for crc in gate_crc.iter().chain(&bundle_crc).chain(&gate_row_crc) {
        index.extend_from_slice(&crc.to_le_bytes());
    }
    Ok(len)
}

/// The layer's down matrix dequantized and transposed: neuron `i`'s column is `cols[i * d_model..][..d_model]`.
fn transposed_down(p: &LayerPlan<'_>) -> Result<Vec<f32>, FormatError> {
    const TILE: usize = 16;
    let (n_ff, d) = (p.n_ff, p.d_model);
    let n = n_ff.checked_mul(d).ok_or_else(too_big)?;
    let mut cols = vec![0.0f32; n];
    let mut rows = vec![0.0f32; TILE * n_ff];
    for r0 in (0..d).step_by(TILE) {
        let t = TILE.min(d - r0);
        for (j, row) in rows.chunks_exact_mut(n_ff).take(t).enumerate() {
            quant::dequantize_row(p.down.ty, p.down.row(p.expert * d + r0 + j), row)?;
        }
        for i in 0..n_ff {
            let col = &mut cols[i * d + r0..][..t];
            for (j, v) in col.iter_mut().enumerate() {
                *v = rows[j * n_ff + i];
            }
        }
    }
    Ok(cols)
}

/// Encodes `col` as `ty` (Q8_0, F16 or F32, checked by `plan`) into `out`.
fn encode_col(ty: GgmlType, col: &[f32], out: &mut [u8], q8: &mut [BlockQ8_0]) {
    match ty {
        GgmlType::Q8_0 => {
            quant::quantize_row_q8_0(col, q8);
            out.copy_from_slice(bytemuck::cast_slice(q8));
        }
        GgmlType::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(col) {
                o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        _ => {
            for (o, &v) in out.chunks_exact_mut(4).zip(col) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Passes writes through, counting bytes and computing their CRC-32.
struct CrcWriter<'w, W: Write> {
    inner: &'w mut W,
    hasher: crc32fast::Hasher,
    n: u64,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_zeros<W: Write>(out: &mut W, mut n: u64) -> Result<(), FormatError> {
    const ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];
    while n > 0 {
        let k = n.min(PAGE) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// `x` rounded up to a page multiple, or `None` on overflow.
fn round_up(x: u64) -> Option<u64> {
    Some(x.checked_add(PAGE - 1)? / PAGE * PAGE)
}

fn too_big() -> FormatError {
    FormatError::LimitExceeded { what: "packed file length", count: u64::MAX, cap: u64::MAX }
}

fn corrupt(offset: u64, why: impl Into<String>) -> FormatError {
    FormatError::CorruptPacked { offset, why: why.into() }
}

/// Checks that `bytes` is as long as `r`; `what` names the bytes, and is formatted only on failure.
fn check_len(what: &dyn Fn() -> String, r: Range<u64>, bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.len() as u64 != r.end - r.start {
        return Err(FormatError::BadBlockView {
            len: bytes.len(),
            block: (r.end - r.start) as usize,
            why: format!("{} is {} bytes (at offset {})", what(), r.end - r.start, r.start),
        });
    }
    Ok(())
}

/// Checks the CRC of `bytes`; `what` names them, and is formatted only on failure.
fn check_crc(what: &dyn Fn() -> String, offset: u64, expected: u32, bytes: &[u8]) -> Result<(), FormatError> {
    let found = crc32fast::hash(bytes);
    if found != expected {
        return Err(FormatError::Checksum { what: what(), offset, expected, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_span_rounds_out() {
        assert_eq!(page_span(0..1), 0..4096);
        assert_eq!(page_span(4096..8192), 4096..8192);
        assert_eq!(page_span(4095..4097), 0..8192);
        assert_eq!(page_span(5000..5000), 4096..4096);
        assert_eq!(page_span(u64::MAX - 1..u64::MAX), u64::MAX / PAGE * PAGE..u64::MAX);
    }

    #[test]
    fn header_page_round_trips() {
        let h = PackedHeader {
            version: PACKED_VERSION,
            resident_offset: PAGE,
            resident_len: 5000,
            ffn_offset: 3 * PAGE,
            ffn_len: 10 * PAGE,
            index_offset: 13 * PAGE,
            index_len: 777,
            n_layers: 3,
            resident_crc: 0xdead_beef,
            index_crc: 0x1234_5678,
        };
        let page = h.to_page();
        assert_eq!(page.len(), PAGE as usize);
        assert_eq!(&page[..8], b"PINIONPK");
        assert_eq!(page[HEADER_FIELDS_LEN..].iter().filter(|&&b| b != 0).count(), 0);
        assert_eq!(PackedHeader::parse(&page).unwrap(), h);
        assert_eq!(h.file_len(), 13 * PAGE + 777);
    }
}
