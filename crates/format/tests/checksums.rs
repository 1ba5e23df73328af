//! Packed format version 2's resident checksums: every resident tensor and every row of the output head and the
//! token embedding verifies after packing (the reference is the source GGUF's bytes); a byte that changed on
//! disk after the index was read is caught by exactly the tensor or row holding it, with its name and offset; a
//! tied head has only embedding rows; a corrupt checksum section (counts, caps, names, ranges, truncation) is a
//! typed error; and the fuzz invariants hold on mutations of it and of the version 1 fixture.

use std::io::Cursor;

use pinion_format::fuzz::{check_packed_parse, reseal_packed};
use pinion_format::packed::{
    PackOptions, PackedFile, PackedHeader, PackedIndex, ROW_CHECKSUMMED_TENSORS, ResidentChecksums, pack,
    parse_packed_index,
};
use pinion_format::synth::{self, SynthConfig};
use pinion_format::{FormatError, Gguf, GgufWriter, MAX_TENSORS};

use crate::util::{Rng, crc32_ref};

/// A 2-layer synthetic model (d_model 64, 64 neurons, vocabulary 300, Q4_0); `tied` drops `output.weight`, so
/// that the head is the embedding.
fn model(tied: bool) -> Vec<u8> {
    let mut cfg = SynthConfig::preset("tiny").unwrap();
    (cfg.n_layers, cfg.d_model, cfg.n_ff, cfg.n_vocab, cfg.n_ctx) = (2, 64, 64, 300, 64);
    let bytes = synth::write_model(&cfg, Vec::new(), &mut |_, _| {}).unwrap();
    if !tied {
        return bytes;
    }
    let g = Gguf::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.add_metadata(k.as_str(), v.clone()).unwrap();
    }
    for t in g.tensors.iter().filter(|t| t.name != "output.weight") {
        w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t).unwrap().to_vec()).unwrap();
    }
    w.to_bytes().unwrap()
}

fn pack_bytes(src: &[u8], opts: &PackOptions) -> Vec<u8> {
    let g = Gguf::parse(src).unwrap();
    let mut out = Cursor::new(Vec::new());
    pack(&g, opts, &mut out, &mut |_| {}).unwrap();
    out.into_inner()
}

fn slice(bytes: &[u8], r: std::ops::Range<u64>) -> &[u8] {
    &bytes[r.start as usize..r.end as usize]
}

/// The checksums as a runtime holds them: from the header page and the index alone.
fn index_only(bytes: &[u8]) -> PackedIndex {
    let h = PackedHeader::parse(&bytes[..4096]).unwrap();
    parse_packed_index(&h, slice(bytes, h.index_offset..h.file_len()), bytes.len() as u64).unwrap()
}

/// The resident tensors of a packed source: every source tensor but the FFN matrices.
fn resident_names(src: &Gguf<'_>) -> Vec<String> {
    let ffn = |n: &str| [".ffn_gate.", ".ffn_up.", ".ffn_down."].iter().any(|s| n.contains(s));
    src.tensors.iter().map(|t| t.name.clone()).filter(|n| !ffn(n)).collect()
}

fn check_round_trip(tied: bool) {
    let src_bytes = model(tied);
    let src = Gguf::parse(&src_bytes).unwrap();
    let bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let f = PackedFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    let idx = index_only(&bytes);
    assert!(&idx.checksums == f.checksums() && idx.layers == f.layers());
    let sums = &idx.checksums;
    assert!(!sums.is_empty());

    // One checksum per resident tensor, in the source's order, of exactly the source's bytes.
    let names = resident_names(&src);
    assert_eq!(sums.tensors().iter().map(|t| &t.name).collect::<Vec<_>>(), names.iter().collect::<Vec<_>>());
    for name in &names {
        let data = src.tensor(name).unwrap().data;
        assert_eq!(f.tensor_checksum(name), Some(crc32_ref(data)), "{name}");
        let t = sums.tensor(name).unwrap();
        assert!(slice(&bytes, t.range()) == data, "{name}: the recorded range holds the source bytes");
        sums.verify_tensor(name, data).unwrap();
    }

    // Row tables: the embedding always, the head when untied; each row's CRC is that of the source row.
    let tables: Vec<&str> = sums.row_tables().iter().map(|r| r.name()).collect();
    let want: Vec<&str> = if tied { vec!["token_embd.weight"] } else { ROW_CHECKSUMMED_TENSORS.to_vec() };
    assert_eq!(tables, want);
    assert_eq!(f.row_checksums("output.weight").is_some(), !tied);
    for name in want {
        let view = src.tensor(name).unwrap();
        let rows = f.row_checksums(name).unwrap();
        assert_eq!((rows.n_rows(), rows.row_bytes()), (300, 64 / 32 * 18));
        assert_eq!(rows.offset(), sums.tensor(name).unwrap().offset);
        for r in 0..view.n_rows() {
            assert_eq!(rows.checksum(r), Some(crc32_ref(view.row(r))), "{name} row {r}");
            rows.verify(r, view.row(r)).unwrap();
        }
        assert_eq!(rows.checksum(300), None);
        f.verify_rows(name, 0, view.data).unwrap();
        let rb = rows.row_bytes();
        f.verify_rows(name, 17, &view.data[17 * rb..40 * rb]).unwrap();
        f.verify_rows(name, 300, &[]).unwrap();
    }
    if tied {
        let e = f.verify_rows("output.weight", 0, &[0; 36]).unwrap_err();
        assert!(matches!(&e, FormatError::NoChecksum { what } if what.contains("output.weight")), "{e}");
    }
}

#[test]
fn every_tensor_and_row_verifies_after_packing_untied_head() {
    check_round_trip(false);
}

#[test]
fn every_tensor_and_row_verifies_after_packing_tied_head() {
    check_round_trip(true);
}

/// Flips one byte of each resident tensor (its first, last and a random byte) in a copy of the file, as if the
/// disk changed after the index was read: exactly that tensor fails, naming it and its offset, and of the
/// checksummed rows exactly the row holding the byte fails, naming the tensor, the row and the row's offset.
#[test]
fn a_flipped_byte_fails_exactly_its_tensor_and_row() {
    for tied in [false, true] {
        let bytes = pack_bytes(&model(tied), &PackOptions { cluster_neurons: 16, ..PackOptions::default() });
        let sums = index_only(&bytes).checksums;
        let mut rng = Rng(21);
        let mut n_row_hits = 0;
        for (ti, t) in sums.tensors().iter().enumerate() {
            for at in [t.offset, t.offset + t.len - 1, t.offset + rng.below(t.len)] {
                let mut b = bytes.clone();
                b[at as usize] ^= 1 << rng.below(8);
                for (tj, u) in sums.tensors().iter().enumerate() {
                    match (sums.verify_tensor(&u.name, slice(&b, u.range())), ti == tj) {
                        (Ok(()), false) => {}
                        (Err(FormatError::Checksum { what, offset, .. }), true) => {
                            assert_eq!((what, offset), (format!("tensor {}", t.name), t.offset));
                        }
                        (res, _) => panic!("flip at {at} in {}: tensor {} gave {res:?}", t.name, u.name),
                    }
                }
                for rows in sums.row_tables() {
                    let rb = rows.row_bytes() as u64;
                    let hit = (rows.name() == t.name).then(|| ((at - t.offset) / rb) as usize);
                    let all = slice(&b, rows.offset()..rows.offset() + rows.n_rows() as u64 * rb);
                    match (rows.verify(0, all), hit) {
                        (Ok(()), None) => {}
                        (Err(FormatError::Checksum { what, offset, .. }), Some(r)) => {
                            assert_eq!(what, format!("{} row {r}", t.name));
                            assert_eq!(offset, rows.offset() + r as u64 * rb);
                            assert!(offset <= at && at < offset + rb);
                            n_row_hits += 1;
                        }
                        (res, _) => panic!("flip at {at}: rows of {} gave {res:?}", rows.name()),
                    }
                    // Row by row, and in runs that do or do not hold the row.
                    for r in 0..rows.n_rows() {
                        let one = &all[r * rb as usize..(r + 1) * rb as usize];
                        assert_eq!(rows.verify(r, one).is_err(), hit == Some(r), "row {r}");
                    }
                    if let Some(r) = hit {
                        let (lo, hi) = (r.saturating_sub(3), (r + 5).min(rows.n_rows()));
                        assert!(rows.verify(lo, &all[lo * rb as usize..hi * rb as usize]).is_err());
                        assert!(rows.verify(0, &all[..r * rb as usize]).is_ok());
                        assert!(rows.verify(r + 1, &all[(r + 1) * rb as usize..]).is_ok());
                    }
                }
            }
        }
        // The embedding, and the head when untied, were each hit three times.
        assert_eq!(n_row_hits, if tied { 3 } else { 6 });
    }
}

#[test]
fn wrong_lengths_and_rows_out_of_range_are_typed_errors() {
    let src_bytes = model(false);
    let src = Gguf::parse(&src_bytes).unwrap();
    let bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let f = PackedFile::parse(&bytes).unwrap();
    let head = src.tensor("output.weight").unwrap();
    let rows = f.row_checksums("output.weight").unwrap();
    let rb = rows.row_bytes();
    let view = |e: Result<(), FormatError>| matches!(e, Err(FormatError::BadBlockView { .. }));
    assert!(view(rows.verify(0, &head.data[..rb + 1])));
    assert!(view(rows.verify(299, &head.data[..2 * rb])));
    assert!(view(rows.verify(301, &[])));
    assert!(view(rows.verify(usize::MAX, head.row(0))));
    assert!(view(f.verify_tensor("output.weight", &head.data[1..])));
    let missing = |e: Result<(), FormatError>| matches!(e, Err(FormatError::NoChecksum { .. }));
    assert!(missing(f.verify_tensor("no.such.tensor", &[])));
    assert!(missing(f.verify_rows("blk.0.attn_q.weight", 0, &[])));
    assert_eq!(f.tensor_checksum("blk.0.ffn_up.weight"), None);
}

/// The absolute offset of the checksum section: after the layer entries, whose sizes the spec gives.
fn section_offset(f: &PackedFile<'_>) -> u64 {
    f.header().index_offset
        + f.layers().iter().map(|l| 64 + 16 * l.n_ff as u64 + 4 * l.n_clusters() as u64).sum::<u64>()
}

/// `bytes` with `new` written at `at` (replacing `old_len` bytes, so the file may grow or shrink), the header's
/// index length adjusted and the checksums resealed.
fn edit(bytes: &[u8], at: u64, old_len: usize, new: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.splice(at as usize..at as usize + old_len, new.iter().copied());
    let index_len = u64::from_le_bytes(b[56..64].try_into().unwrap());
    let index_len = (index_len as i64 + new.len() as i64 - old_len as i64) as u64;
    b[56..64].copy_from_slice(&index_len.to_le_bytes());
    assert!(reseal_packed(&mut b));
    b
}

/// The errors of the index-only parse and of the whole-file parse of `b`.
fn errors(b: &[u8]) -> (Option<FormatError>, Option<FormatError>) {
    let h = PackedHeader::parse(b).unwrap();
    let index_err = parse_packed_index(&h, slice(b, h.index_offset..h.file_len()), b.len() as u64).err();
    (index_err, PackedFile::parse(b).err())
}

#[test]
fn a_corrupt_checksum_section_is_a_typed_error() {
    let src_bytes = model(false);
    let bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let f = PackedFile::parse(&bytes).unwrap();
    let sums: ResidentChecksums = f.checksums().clone();
    let n = sums.tensors().len() as u32;
    let s = section_offset(&f);
    assert_eq!(u32::from_le_bytes(bytes[s as usize..][..4].try_into().unwrap()), n);
    // The first tensor entry: name length, name, offset, length, CRC.
    let name0 = sums.tensors()[0].name.clone();
    let e0 = s + 4;
    let (off0, len0) = (e0 + 4 + name0.len() as u64, e0 + 12 + name0.len() as u64);
    // The row tables: after every tensor entry.
    let tables = s + 4 + sums.tensors().iter().map(|t| 24 + t.name.len() as u64).sum::<u64>();
    let t0 = tables + 4;
    let corrupt = |e: &Option<FormatError>| matches!(e, Some(FormatError::CorruptPacked { .. }));
    let typed = |e: &Option<FormatError>| {
        matches!(
            e,
            Some(
                FormatError::CorruptPacked { .. }
                    | FormatError::Truncated { .. }
                    | FormatError::TooMany { .. }
                    | FormatError::BadUtf8 { .. }
            )
        )
    };
    let u32b = |v: u32| v.to_le_bytes().to_vec();
    let u64b = |v: u64| v.to_le_bytes().to_vec();

    // Counts against their caps, and off by one either way.
    let (i, w) = errors(&edit(&bytes, s, 4, &u32b(MAX_TENSORS as u32 + 1)));
    assert!(matches!(i, Some(FormatError::TooMany { cap: MAX_TENSORS, .. })), "{i:?}");
    assert!(matches!(w, Some(FormatError::TooMany { .. })));
    for v in [n + 1, n - 1, 0, u32::MAX] {
        let (i, w) = errors(&edit(&bytes, s, 4, &u32b(v)));
        assert!(typed(&i) && typed(&w), "tensor count {v}: {i:?}");
    }
    let (i, _) = errors(&edit(&bytes, e0, 4, &u32b(u32::MAX)));
    assert!(matches!(i, Some(FormatError::TooMany { what: "tensor name length", .. })), "{i:?}");
    for v in [0, 1, name0.len() as u32 + 1] {
        let (i, w) = errors(&edit(&bytes, e0, 4, &u32b(v)));
        assert!(typed(&i) && typed(&w), "name length {v}: {i:?}");
    }
    // A name that is not UTF-8; a name that is valid but not the resident tensor's (only the whole file can
    // tell); a duplicate name.
    let (i, _) = errors(&edit(&bytes, e0 + 4, 1, &[0xFF]));
    assert!(matches!(i, Some(FormatError::BadUtf8 { .. })), "{i:?}");
    let (i, w) = errors(&edit(&bytes, e0 + 4, 1, b"X"));
    assert!(i.is_none() && corrupt(&w), "{i:?} {w:?}");
    let name1 = &sums.tensors()[1].name;
    let e1 = len0 + 12;
    let (i, _) = errors(&edit(
        &bytes,
        e1,
        4 + name1.len(),
        &[u32b(name0.len() as u32), name0.clone().into()].concat(),
    ));
    assert!(corrupt(&i), "{i:?}");
    // Offsets and lengths outside the resident section, overlapping, or not the tensor's.
    let h = f.header();
    for (at, v) in [
        (off0, 0),
        (off0, h.index_offset),
        (off0, u64::MAX),
        (len0, u64::MAX),
        (len0, h.resident_len),
        (off0, sums.tensors()[1].offset + 1),
    ] {
        let (i, _) = errors(&edit(&bytes, at, 8, &u64b(v)));
        assert!(corrupt(&i), "{at} = {v}: {i:?}");
    }
    // A tensor without a row table one byte shorter, or the embedding moved back: only the whole file can tell.
    let len1 = e1 + 12 + name1.len() as u64;
    for (at, v) in [(off0, sums.tensors()[0].offset - 32), (len1, sums.tensors()[1].len - 1)] {
        let (i, w) = errors(&edit(&bytes, at, 8, &u64b(v)));
        assert!(i.is_none() && corrupt(&w), "{at} = {v}: {i:?} {w:?}");
    }
    // Row tables: count, tensor index, row length and count.
    let embd = sums.tensors().iter().position(|t| t.name == "token_embd.weight").unwrap() as u32;
    for (at, v) in [(tables, n + 1), (tables, u32::MAX), (t0, n), (t0, u32::MAX)] {
        let (i, _) = errors(&edit(&bytes, at, 4, &u32b(v)));
        assert!(typed(&i), "{at} = {v}: {i:?}");
    }
    // Tables out of order (both naming the embedding), or naming another tensor of the same size.
    let t1 = t0 + 20 + 4 * 300;
    let (i, _) = errors(&edit(&bytes, t1, 4, &u32b(embd)));
    assert!(corrupt(&i), "{i:?}");
    let (i, w) = errors(&edit(&bytes, tables, 4, &u32b(1)));
    assert!(corrupt(&i) && corrupt(&w), "one table, bytes left over: {i:?}");
    for (at, v) in [(t0 + 4, 0), (t0 + 4, 37), (t0 + 4, u64::MAX), (t0 + 12, 301), (t0 + 12, u64::MAX)] {
        let (i, _) = errors(&edit(&bytes, at, 8, &u64b(v)));
        assert!(corrupt(&i), "{at} = {v}: {i:?}");
    }
    // Rows of another shape that still tile the tensor: only the resident GGUF's shape tells.
    let (rb, nr) = (36u64 / 2, 600u64);
    let b = edit(&bytes, t0 + 4, 16, &[u64b(rb), u64b(nr)].concat());
    let b = edit(&b, t0 + 20, 0, &vec![0u8; 4 * 300]);
    let (i, w) = errors(&b);
    assert!(i.is_none() && corrupt(&w), "{i:?} {w:?}");
    // No row table of the head or of the embedding.
    let head_table = t0 + 20 + 4 * 300;
    let b = edit(&bytes, head_table, 20 + 4 * 300, &[]);
    let b = edit(&b, tables, 4, &u32b(1));
    let (i, w) = errors(&b);
    assert!(i.is_none() && corrupt(&w), "{i:?} {w:?}");
    // Bytes after the section.
    let end = h.file_len();
    let (i, w) = errors(&edit(&bytes, end, 0, &[0; 4]));
    assert!(corrupt(&i) && corrupt(&w), "{i:?}");

    // Every truncation inside the section, as an index one byte shorter each time.
    for cut in s..end {
        let mut b = bytes[..cut as usize].to_vec();
        b[56..64].copy_from_slice(&(cut - h.index_offset).to_le_bytes());
        assert!(reseal_packed(&mut b));
        let (i, w) = errors(&b);
        assert!(matches!(i, Some(FormatError::Truncated { .. })), "cut at {cut}: {i:?}");
        assert!(matches!(w, Some(FormatError::Truncated { .. })), "cut at {cut}: {w:?}");
    }
}

#[test]
fn fuzz_invariants_hold_on_the_checksum_section_and_on_version_1() {
    let v2 = pack_bytes(&model(true), &PackOptions { cluster_neurons: 24, ..PackOptions::default() });
    let s = section_offset(&PackedFile::parse(&v2).unwrap()) as usize;
    let v1 = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/packed_v1.pinion")).unwrap();
    let v1_index = PackedFile::parse(&v1).unwrap().header().index_offset as usize;
    check_packed_parse(&v1);
    check_packed_parse(&v2);
    for len in (0..v1.len()).step_by(97) {
        check_packed_parse(&v1[..len]);
    }
    let mut rng = Rng(23);
    for (bytes, from) in [(&v2, s), (&v1, v1_index), (&v1, 0)] {
        for _ in 0..700 {
            let mut b = bytes.clone();
            for _ in 0..1 + rng.below(3) {
                let at = from + rng.below((b.len() - from) as u64) as usize;
                b[at] = match rng.below(4) {
                    0 => b[at] ^ (1 << rng.below(8)),
                    1 => 0,
                    2 => 0xFF,
                    _ => rng.below(256) as u8,
                };
            }
            check_packed_parse(&b);
        }
    }
}

#[test]
fn gate_rows_and_split_bundles_verify_and_one_flipped_byte_fails_only_its_row() {
    let src_bytes = model(false);
    let mut bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let f = PackedFile::parse(&bytes).unwrap();
    let layers = f.layers().to_vec();
    drop(f);
    for l in &layers {
        assert!(l.has_gate_row_checksums());
        for pos in 0..l.n_ff {
            l.verify_gate_row(pos, slice(&bytes, l.gate_row_range(pos))).unwrap();
            let b = l.bundle_range(pos);
            let mid = b.start + l.up_row_bytes() as u64;
            l.verify_bundle_parts(pos, slice(&bytes, b.start..mid), slice(&bytes, mid..b.end)).unwrap();
        }
    }
    // Flip one byte of layer 1's gate row at position 3: that row fails, naming it, at its offset; its
    // neighbours still verify; the split bundle check still catches a flipped down column byte.
    let l = &layers[1];
    let r = l.gate_row_range(3);
    bytes[r.start as usize + 5] ^= 0x40;
    match l.verify_gate_row(3, slice(&bytes, r.clone())) {
        Err(FormatError::Checksum { what, offset, .. }) => {
            assert_eq!(offset, r.start);
            assert!(what.starts_with("layer 1 gate row at position 3 (neuron "), "{what}");
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    l.verify_gate_row(2, slice(&bytes, l.gate_row_range(2))).unwrap();
    l.verify_gate_row(4, slice(&bytes, l.gate_row_range(4))).unwrap();
    let b = l.bundle_range(7);
    bytes[b.end as usize - 1] ^= 1;
    let mid = b.start + l.up_row_bytes() as u64;
    assert!(matches!(
        l.verify_bundle_parts(7, slice(&bytes, b.start..mid), slice(&bytes, mid..b.end)),
        Err(FormatError::Checksum { offset, .. }) if offset == b.start
    ));
    assert!(matches!(
        l.verify_bundle_parts(7, slice(&bytes, b.start..mid), &[]),
        Err(FormatError::BadBlockView { .. })
    ));
}
