//! The packed neuron-cluster format: round trips against the source GGUF, layout properties, checksums,
//! corruption and truncation, refusals, and the fuzz invariants over a deterministic corpus.

use std::io::Cursor;

use pinion_format::fuzz::{check_packed_parse, reseal_packed};
use pinion_format::packed::{
    ExtraTensor, PACKED_VERSION, PACKED_VERSION_KEY, PAGE, PackOptions, PackProgress, PackSummary,
    PackedFile, PackedHeader, PackedLayer, pack, page_span, parse_index,
};
use pinion_format::synth::{self, SynthConfig};
use pinion_format::{FormatError, GgmlType, Gguf, GgufWriter, Value, quant};
use proptest::prelude::*;

use crate::util::{Rng, proptest_config};

/// A 2-layer synthetic llama model: d_model 64, `n_ff` neurons, weights of type `ty`.
fn synth_small(ty: GgmlType, n_ff: usize) -> Vec<u8> {
    let mut cfg = SynthConfig::preset("tiny").unwrap();
    cfg.n_layers = 2;
    cfg.d_model = 64;
    cfg.n_ff = n_ff;
    cfg.n_vocab = 300;
    cfg.n_ctx = 64;
    cfg.ty = ty;
    synth_bytes(&cfg)
}

fn synth_bytes(cfg: &SynthConfig) -> Vec<u8> {
    synth::write_model(cfg, Vec::new(), &mut |_, _| {}).unwrap()
}

/// `x` quantized to `ty` (F32, F16, Q4_0 or Q8_0).
fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Q4_0 => {
            let mut b = vec![quant::BlockQ4_0 { d: half::f16::ZERO, qs: [0; 16] }; x.len() / 32];
            quant::quantize_row_q4_0(x, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        GgmlType::Q8_0 => {
            let mut b = vec![quant::BlockQ8_0 { d: half::f16::ZERO, qs: [0; 32] }; x.len() / 32];
            quant::quantize_row_q8_0(x, &mut b);
            bytemuck::cast_slice(&b).to_vec()
        }
        _ => unreachable!("test helper: unsupported type {ty}"),
    }
}

fn random_floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.below(2001) as f32 - 1000.0) / 1000.0).collect()
}

/// A minimal llama-shaped model built directly: every tensor the packer requires, FFN tensors of type `ty`
/// (gate/up/down may differ through `tys`), the rest F32. `skip` names a tensor to leave out.
fn custom_model(
    n_layers: usize,
    d: usize,
    n_ff: usize,
    tys: [GgmlType; 3],
    seed: u64,
    skip: &str,
) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama").unwrap();
    w.add_metadata("llama.block_count", n_layers as u32).unwrap();
    let mut add = |w: &mut GgufWriter<'_>, name: String, ty: GgmlType, dims: &[u64]| {
        if name == skip {
            return;
        }
        let n = dims.iter().product::<u64>() as usize;
        let data = quantize(ty, &random_floats(&mut rng, n));
        w.add_tensor_data(&name, ty, dims, data).unwrap();
    };
    let (d64, f64_) = (d as u64, n_ff as u64);
    add(&mut w, "token_embd.weight".into(), GgmlType::F32, &[d64, 5]);
    for l in 0..n_layers {
        for s in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"] {
            add(&mut w, format!("blk.{l}.{s}.weight"), GgmlType::F32, &[d64]);
        }
        add(&mut w, format!("blk.{l}.ffn_gate.weight"), tys[0], &[d64, f64_]);
        add(&mut w, format!("blk.{l}.ffn_up.weight"), tys[1], &[d64, f64_]);
        add(&mut w, format!("blk.{l}.ffn_down.weight"), tys[2], &[f64_, d64]);
    }
    add(&mut w, "output_norm.weight".into(), GgmlType::F32, &[d64]);
    w.to_bytes().unwrap()
}

fn try_pack(
    src: &[u8],
    opts: &PackOptions,
) -> Result<(Vec<u8>, PackSummary, Vec<PackProgress>), FormatError> {
    let g = Gguf::parse(src).unwrap();
    let mut out = Cursor::new(Vec::new());
    let mut progress = Vec::new();
    let summary = pack(&g, opts, &mut out, &mut |p| progress.push(p))?;
    Ok((out.into_inner(), summary, progress))
}

fn pack_bytes(src: &[u8], opts: &PackOptions) -> Vec<u8> {
    try_pack(src, opts).unwrap().0
}

fn random_perm(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

fn n_layers(src: &Gguf<'_>) -> usize {
    src.get_u64("llama.block_count").unwrap() as usize
}

fn slice(bytes: &[u8], r: std::ops::Range<u64>) -> &[u8] {
    &bytes[r.start as usize..r.end as usize]
}

/// Layer `l`'s source down matrix dequantized: `d_model` rows of `n_ff` values.
fn source_down(src: &Gguf<'_>, l: usize) -> Vec<f32> {
    let down = src.tensor(&format!("blk.{l}.ffn_down.weight")).unwrap();
    let n_ff = down.row_len();
    let mut m = vec![0.0f32; n_ff * down.n_rows()];
    for (r, row) in m.chunks_exact_mut(n_ff).enumerate() {
        quant::dequantize_row(down.ty, down.row(r), row).unwrap();
    }
    m
}

/// Checks gate and up rows bit-exactly and returns, per layer and position, the packed down column
/// dequantized alongside the source column.
fn check_rows(src: &Gguf<'_>, bytes: &[u8], f: &PackedFile<'_>) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut cols = Vec::new();
    for l in 0..n_layers(src) {
        let layer = f.layer(l);
        let gate = src.tensor(&format!("blk.{l}.ffn_gate.weight")).unwrap();
        let up = src.tensor(&format!("blk.{l}.ffn_up.weight")).unwrap();
        let down = source_down(src, l);
        assert_eq!((layer.n_ff, layer.d_model), (gate.n_rows(), gate.row_len()));
        assert_eq!((layer.gate_ty, layer.up_ty), (gate.ty, up.ty));
        for pos in 0..layer.n_ff {
            let i = layer.order[pos] as usize;
            assert_eq!(layer.position_of(i as u32), pos);
            assert_eq!(slice(bytes, layer.gate_row_range(pos)), gate.row(i), "layer {l} gate row at {pos}");
            let k = pos / layer.cluster_neurons;
            let j = pos % layer.cluster_neurons;
            let g = layer.gate_row_bytes();
            assert_eq!(&f.gate_block(l, k)[j * g..][..g], gate.row(i));
            let b = f.bundle(l, pos);
            assert_eq!(&b[..layer.up_row_bytes()], up.row(i), "layer {l} up row at {pos}");
            let mut packed = vec![0.0f32; layer.d_model];
            quant::dequantize_row(layer.down_ty, &b[layer.up_row_bytes()..], &mut packed).unwrap();
            cols.push((packed, down.iter().skip(i).step_by(layer.n_ff).copied().collect()));
        }
    }
    cols
}

#[test]
fn round_trip_f32_down_is_exact_and_resident_holds_everything_else() {
    let src_bytes = synth_small(GgmlType::F32, 100);
    let src = Gguf::parse(&src_bytes).unwrap();
    let mut rng = Rng(1);
    let order: Vec<Vec<u32>> = (0..2).map(|_| random_perm(&mut rng, 100)).collect();
    let frequency: Vec<Vec<f32>> =
        (0..2).map(|l| (0..100).map(|i| (i + l) as f32 / 200.0).collect()).collect();
    let extra = ExtraTensor {
        name: "pinion.predictor.0".into(),
        ty: GgmlType::F32,
        dims: vec![4, 2],
        data: (0..8).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect(),
    };
    let opts = PackOptions {
        cluster_neurons: 7,
        down_type: GgmlType::F32,
        order: Some(order.clone()),
        frequency: Some(frequency.clone()),
        metadata: vec![
            ("pinion.test.note".into(), Value::from("hello")),
            ("general.name".into(), "renamed".into()),
        ],
        extra_tensors: vec![extra.clone()],
    };
    let (bytes, summary, _) = try_pack(&src_bytes, &opts).unwrap();
    let f = PackedFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    assert_eq!(summary.file_len, bytes.len() as u64);
    assert_eq!(summary.resident_len, f.header().resident_len);
    assert_eq!(summary.ffn_len, f.header().ffn_len);

    for l in 0..2 {
        let layer = f.layer(l);
        assert_eq!(layer.order, order[l]);
        assert_eq!(layer.cluster_neurons, 7);
        assert_eq!(layer.n_clusters(), 15);
        assert_eq!(layer.cluster_len(14), 2);
        assert_eq!(layer.down_ty, GgmlType::F32);
        for pos in 0..100 {
            assert_eq!(layer.frequency[pos], frequency[l][order[l][pos] as usize]);
        }
    }
    for (packed, source) in check_rows(&src, &bytes, &f) {
        assert_eq!(
            packed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            source.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    // The resident GGUF: every non-FFN tensor byte-identical, the extra tensor, the metadata.
    let r = Gguf::parse(&bytes[PAGE as usize..][..summary.resident_len as usize]).unwrap();
    assert_eq!(f.resident(), r.bytes());
    assert_eq!(f.resident_offset(), PAGE);
    let mut n_copied = 0;
    for t in &src.tensors {
        let is_ffn =
            ["ffn_gate", "ffn_up", "ffn_down"].iter().any(|s| t.name.ends_with(&format!(".{s}.weight")));
        match r.tensor(&t.name) {
            Ok(v) => {
                assert!(!is_ffn, "{} must not be resident", t.name);
                assert_eq!((v.ty, v.dims), (t.ty, t.dims.as_slice()));
                assert!(v.data == src.tensor(&t.name).unwrap().data, "{} differs", t.name);
                n_copied += 1;
            }
            Err(_) => assert!(is_ffn, "{} is missing from the resident section", t.name),
        }
    }
    assert_eq!(n_copied, src.tensors.len() - 6);
    assert_eq!(r.tensors.len(), n_copied + 1);
    let e = r.tensor("pinion.predictor.0").unwrap();
    assert_eq!((e.ty, e.dims, e.data), (extra.ty, extra.dims.as_slice(), extra.data.as_slice()));
    assert_eq!(r.get_u64(PACKED_VERSION_KEY).unwrap(), PACKED_VERSION as u64);
    assert_eq!(r.get_str("pinion.test.note").unwrap(), "hello");
    assert_eq!(r.get_str("general.name").unwrap(), "renamed");
    for (k, v) in &src.metadata {
        if k != "general.name" {
            assert!(r.get(k).is_some_and(|x| pinion_format::fuzz::same_value(x, v)), "metadata {k}");
        }
    }
    assert_eq!(r.metadata.len(), src.metadata.len() + 2);
}

/// The error bound of a Q8_0 round trip of `x` (one block): half a quantization step, plus the scale's f16
/// rounding (relative 2^-11, or absolute 2^-25 when subnormal) times the largest quant (127), plus f32 slack.
fn q8_0_bound(x: &[f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    0.5 * d + 127.0 * (d / 2048.0).max(2f32.powi(-25)) + amax * 1e-6
}

#[test]
fn round_trip_q8_0_down_is_within_the_quantization_bound() {
    // The tiny preset: 4 layers, d_model 256, n_ff 1024, Q4_0; default options but a random order.
    let src_bytes = synth_bytes(&SynthConfig::preset("tiny").unwrap());
    let src = Gguf::parse(&src_bytes).unwrap();
    let mut rng = Rng(2);
    let order: Vec<Vec<u32>> = (0..4).map(|_| random_perm(&mut rng, 1024)).collect();
    let opts = PackOptions { order: Some(order), ..PackOptions::default() };
    assert_eq!((opts.cluster_neurons, opts.down_type), (32, GgmlType::Q8_0));
    let bytes = pack_bytes(&src_bytes, &opts);
    let f = PackedFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    assert_eq!(f.layer(0).down_col_bytes(), 256 / 32 * 34);
    let mut max_err = 0.0f32;
    for (packed, source) in check_rows(&src, &bytes, &f) {
        for (p, s) in packed.chunks(32).zip(source.chunks(32)) {
            let bound = q8_0_bound(s);
            for (a, b) in p.iter().zip(s) {
                let err = (a - b).abs();
                assert!(err <= bound, "error {err} above bound {bound}");
                max_err = max_err.max(err);
            }
        }
    }
    assert!(max_err > 0.0, "Q8_0 down columns should not be exact");
}

#[test]
fn round_trip_f16_down_and_mixed_source_types() {
    let src_bytes = custom_model(3, 96, 64, [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F32], 3, "");
    let src = Gguf::parse(&src_bytes).unwrap();
    let opts = PackOptions { cluster_neurons: 5, down_type: GgmlType::F16, ..PackOptions::default() };
    let bytes = pack_bytes(&src_bytes, &opts);
    let f = PackedFile::parse(&bytes).unwrap();
    f.verify_all().unwrap();
    assert_eq!(f.layer(2).order, (0..64).collect::<Vec<u32>>());
    assert_eq!(f.layer(2).frequency, vec![0.0; 64]);
    assert_eq!(
        (f.layer(0).gate_ty, f.layer(0).up_ty, f.layer(0).down_ty),
        (GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::F16)
    );
    for (packed, source) in check_rows(&src, &bytes, &f) {
        for (a, b) in packed.iter().zip(&source) {
            assert_eq!(*a, half::f16::from_f32(*b).to_f32());
        }
    }
}

/// Checks the layout properties of a parsed file.
fn check_layout(f: &PackedFile<'_>) {
    let h = f.header();
    let ffn = h.ffn_offset..h.ffn_offset + h.ffn_len;
    assert_eq!(ffn.start % PAGE, 0);
    assert!(ffn.start >= h.resident_offset + h.resident_len);
    let mut prev_end = ffn.start;
    for layer in f.layers() {
        let lr = layer.layer_range();
        assert_eq!(lr.start, prev_end);
        let mut owner = vec![0usize; layer.n_ff];
        for k in 0..layer.n_clusters() {
            let r = layer.record_range(k);
            assert_eq!(r.start % PAGE, 0, "record start aligned");
            assert_eq!(r.end % PAGE, 0, "record end padded");
            assert_eq!(r.start, lr.start + k as u64 * layer.stride(), "constant stride");
            assert!(
                r.start >= prev_end && r.end <= lr.end && r.end <= ffn.end,
                "records disjoint, in the section"
            );
            prev_end = r.end;
            let gb = layer.gate_block_range(k);
            assert_eq!(gb.start, r.start);
            assert_eq!(gb.end - gb.start, (layer.cluster_len(k) * layer.gate_row_bytes()) as u64);
            let mut bundle_end = gb.end;
            for pos in k * layer.cluster_neurons..k * layer.cluster_neurons + layer.cluster_len(k) {
                *owner.get_mut(pos).expect("position in range") += 1;
                let g = layer.gate_row_range(pos);
                assert!(gb.start <= g.start && g.end <= gb.end);
                let b = layer.bundle_range(pos);
                assert_eq!(b.start, bundle_end, "bundles follow the gate block, packed");
                assert!(b.end <= r.end);
                bundle_end = b.end;
                for range in [g, b, gb.clone(), r.clone()] {
                    let s = page_span(range.clone());
                    assert!(s.start <= range.start && range.end <= s.end);
                    assert_eq!((s.start % PAGE, s.end % PAGE), (0, 0));
                    assert!(s.end - s.start < (range.end - range.start) + 2 * PAGE);
                }
            }
            assert!(r.end - bundle_end < PAGE, "padding is less than a page");
        }
        assert!(owner.iter().all(|&n| n == 1), "every position in exactly one cluster");
        assert_eq!(prev_end, lr.end);
    }
    assert_eq!(prev_end, ffn.end);
    assert_eq!(h.index_offset, ffn.end);
}

const TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::Q4_0, GgmlType::Q8_0];
const DOWN_TYPES: [GgmlType; 3] = [GgmlType::Q8_0, GgmlType::F16, GgmlType::F32];

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn layout_properties_hold(
        n_layers in 1usize..=3,
        d_blocks in 1usize..=8,
        n_ff_raw in 1usize..=300,
        cluster in 1usize..=80,
        tys in [0usize..3, 0..3, 0..3],
        down in 0usize..3,
        seed in any::<u64>(),
    ) {
        let tys = tys.map(|i| TYPES[i]);
        let d = 32 * d_blocks;
        // Down rows hold n_ff values, so a quantized down type needs whole blocks.
        let n_ff = if tys[2] == GgmlType::F32 { n_ff_raw } else { n_ff_raw.div_ceil(32) * 32 };
        let src_bytes = custom_model(n_layers, d, n_ff, tys, seed, "");
        let src = Gguf::parse(&src_bytes).unwrap();
        let mut rng = Rng(seed);
        let order = (0..n_layers).map(|_| random_perm(&mut rng, n_ff)).collect();
        let opts = PackOptions {
            cluster_neurons: cluster,
            down_type: DOWN_TYPES[down],
            order: Some(order),
            ..PackOptions::default()
        };
        let (bytes, summary, progress) = try_pack(&src_bytes, &opts).unwrap();
        let f = PackedFile::parse(&bytes).unwrap();
        f.verify_all().unwrap();
        check_layout(&f);
        check_packed_parse(&bytes);
        prop_assert_eq!(progress.len(), n_layers);
        let payload: u64 = f.layers().iter().map(|l| (l.n_ff * (l.gate_row_bytes() + l.bundle_bytes())) as u64).sum();
        prop_assert_eq!(
            summary.padding_bytes,
            summary.file_len - PAGE - summary.resident_len - payload - f.header().index_len
        );
        // The header page and index alone give the same layers.
        let h = PackedHeader::parse(&bytes[..PAGE as usize]).unwrap();
        let index = &bytes[h.index_offset as usize..];
        prop_assert!(parse_index(&h, index, bytes.len() as u64).unwrap() == f.layers());
        for (packed, source) in check_rows(&src, &bytes, &f) {
            if opts.down_type == GgmlType::F32 {
                prop_assert_eq!(packed, source);
            }
        }
    }
}

#[test]
fn flipped_byte_in_any_gate_block_or_bundle_is_caught() {
    let src_bytes = synth_small(GgmlType::Q4_0, 96);
    let opts = PackOptions { cluster_neurons: 10, ..PackOptions::default() };
    let bytes = pack_bytes(&src_bytes, &opts);
    let layers: Vec<PackedLayer> = PackedFile::parse(&bytes).unwrap().layers().to_vec();
    let mut rng = Rng(4);
    let mut n_checked = 0;
    for (l, layer) in layers.iter().enumerate() {
        for k in 0..layer.n_clusters() {
            let gb = layer.gate_block_range(k);
            let first = k * layer.cluster_neurons;
            let last_bundle = layer.bundle_range(first + layer.cluster_len(k) - 1);
            // First and last byte of the record's payload, plus random bytes in it.
            let mut at = vec![gb.start, gb.end - 1, gb.end, last_bundle.end - 1];
            at.extend((0..6).map(|_| gb.start + rng.below(last_bundle.end - gb.start)));
            for a in at {
                let mut b = bytes.clone();
                b[a as usize] ^= 1 << rng.below(8);
                let f = PackedFile::parse(&b).unwrap();
                assert!(
                    matches!(f.verify_all(), Err(FormatError::Checksum { .. })),
                    "flip at {a} not caught"
                );
                let (hit, want_what, want_offset) = if a < gb.end {
                    let hit = f.layer(l).verify_gate_block(k, f.gate_block(l, k));
                    (hit, format!("layer {l} cluster {k} gate block"), gb.start)
                } else {
                    let pos = (first..first + layer.cluster_len(k))
                        .find(|&p| layer.bundle_range(p).contains(&a))
                        .unwrap();
                    let hit = f.layer(l).verify_bundle(pos, f.bundle(l, pos));
                    let n = layer.order[pos];
                    let what = format!("layer {l} bundle at position {pos} (neuron {n}, cluster {k})");
                    (hit, what, layer.bundle_range(pos).start)
                };
                match hit {
                    Err(FormatError::Checksum { what, offset, .. }) => {
                        assert_eq!((what, offset), (want_what, want_offset));
                        assert!(offset <= a);
                    }
                    other => panic!("flip at {a}: expected a checksum error, got {other:?}"),
                }
                n_checked += 1;
            }
        }
    }
    assert_eq!(n_checked, 2 * 10 * 10);
    // A wrong length is an error too, not a panic.
    let layer = &layers[0];
    let r = layer.bundle_range(0);
    assert!(layer.verify_bundle(0, &bytes[r.start as usize..r.end as usize - 1]).is_err());
}

#[test]
fn flipped_byte_in_header_index_or_resident_fails_parse() {
    let src_bytes = synth_small(GgmlType::Q4_0, 64);
    let bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let h = PackedFile::parse(&bytes).unwrap().header().clone();
    let mut rng = Rng(5);
    let mut at: Vec<u64> = (0..80).collect();
    at.extend([80, 1000, PAGE - 1]);
    at.extend(h.index_offset..h.file_len());
    at.extend([h.resident_offset, h.resident_offset + h.resident_len - 1]);
    at.extend((0..200).map(|_| h.resident_offset + rng.below(h.resident_len)));
    for a in at {
        let mut b = bytes.clone();
        b[a as usize] ^= 1 << rng.below(8);
        let err = PackedFile::parse(&b).err();
        assert!(
            matches!(
                err,
                Some(
                    FormatError::Checksum { .. }
                        | FormatError::BadPackedMagic { .. }
                        | FormatError::UnsupportedPackedVersion { .. }
                        | FormatError::CorruptPacked { .. }
                )
            ),
            "flip at {a}: {err:?}"
        );
    }
}

/// Sets the little-endian u32 at `at`, reseals the checksums, and returns the parse error.
fn parse_err_after(bytes: &[u8], at: u64, v: u32) -> FormatError {
    let mut b = bytes.to_vec();
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
    assert!(reseal_packed(&mut b));
    PackedFile::parse(&b).err().unwrap_or_else(|| panic!("setting {at} to {v} should fail"))
}

#[test]
fn resealed_inconsistent_index_is_a_typed_error() {
    let src_bytes = synth_small(GgmlType::F32, 40);
    let bytes = pack_bytes(&src_bytes, &PackOptions { cluster_neurons: 8, ..PackOptions::default() });
    let f = PackedFile::parse(&bytes).unwrap();
    let mut sealed = bytes.clone();
    assert!(reseal_packed(&mut sealed));
    assert!(sealed == bytes, "resealing a valid file changes nothing");
    let i = f.header().index_offset;
    let n_ff = 40u64;
    let corrupt = |e: &FormatError| matches!(e, FormatError::CorruptPacked { .. });
    // n_ff, d_model, cluster_neurons, types, row sizes, n_clusters, offset, stride, length.
    for (field, v) in [
        (0, 41),
        (0, 0),
        (4, 32),
        (8, 0),
        (8, 9),
        (12, 99),
        (20, 2),
        (24, 7),
        (36, 4),
        (40, 0),
        (48, 4096),
        (56, 8192),
    ] {
        let e = parse_err_after(&bytes, i + field, v);
        assert!(corrupt(&e) || matches!(e, FormatError::Truncated { .. }), "field {field} = {v}: {e:?}");
    }
    // A duplicate in the order, a frequency above 1, a NaN frequency.
    let order = i + 64;
    let e = parse_err_after(&bytes, order, 1);
    assert!(corrupt(&e), "{e:?}");
    let freq = order + 4 * n_ff;
    assert!(corrupt(&parse_err_after(&bytes, freq + 8, 2.0f32.to_bits())));
    assert!(corrupt(&parse_err_after(&bytes, freq, f32::NAN.to_bits())));
    // Header: layer count, page size, FFN length.
    assert!(matches!(
        parse_err_after(&bytes, 64, 3),
        FormatError::CorruptPacked { .. } | FormatError::Truncated { .. }
    ));
    assert!(matches!(parse_err_after(&bytes, 64, u32::MAX), FormatError::CorruptPacked { .. }));
    assert!(corrupt(&parse_err_after(&bytes, 12, 512)));
    assert!(corrupt(&parse_err_after(&bytes, 40, 4095)));
    // The resident section no longer a GGUF.
    assert!(corrupt(&parse_err_after(&bytes, PAGE, 0)));
}

#[test]
fn truncated_or_extended_file_is_a_typed_error() {
    let src_bytes = synth_small(GgmlType::Q4_0, 64);
    let bytes = pack_bytes(&src_bytes, &PackOptions::default());
    let h = PackedFile::parse(&bytes).unwrap().header().clone();
    let mut lens: Vec<u64> = (0..bytes.len() as u64).step_by(61).collect();
    for edge in [PAGE, h.ffn_offset, h.index_offset, h.file_len()] {
        lens.extend([edge - 1, edge.saturating_sub(2)]);
    }
    lens.extend([0, 1, 8, 12, 79, 80, h.resident_offset + h.resident_len]);
    for len in lens {
        let err = PackedFile::parse(&bytes[..len as usize]).err();
        assert!(matches!(err, Some(FormatError::Truncated { .. })), "length {len}: {err:?}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(PackedFile::parse(&longer), Err(FormatError::CorruptPacked { .. })));
    // parse_index on a short index slice.
    let index = &bytes[h.index_offset as usize..];
    assert!(matches!(
        parse_index(&h, &index[..index.len() - 1], bytes.len() as u64),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn pack_reports_progress_once_per_layer() {
    let src_bytes = synth_bytes(&SynthConfig::preset("tiny").unwrap());
    let (bytes, summary, progress) = try_pack(&src_bytes, &PackOptions::default()).unwrap();
    let f = PackedFile::parse(&bytes).unwrap();
    assert_eq!(progress.len(), 4);
    for (l, p) in progress.iter().enumerate() {
        assert_eq!((p.layer, p.n_layers), (l, 4));
        assert_eq!(p.bytes_written, f.layer(l).layer_range().end);
    }
    assert_eq!(progress[3].bytes_written, f.header().index_offset);
    assert_eq!(summary.file_len, bytes.len() as u64);
}

#[test]
fn pack_writes_at_the_current_position() {
    let src_bytes = synth_small(GgmlType::F32, 33);
    let g = Gguf::parse(&src_bytes).unwrap();
    let mut out = Cursor::new(vec![0xAAu8; 100]);
    out.set_position(100);
    let summary = pack(&g, &PackOptions::default(), &mut out, &mut |_| {}).unwrap();
    assert_eq!(out.position(), 100 + summary.file_len);
    let all = out.into_inner();
    assert_eq!(&all[..100], &[0xAA; 100][..]);
    assert!(all[100..] == pack_bytes(&src_bytes, &PackOptions::default()));
}

#[test]
fn pack_refuses_what_it_cannot_pack() {
    let dense = synth_small(GgmlType::F32, 64);
    let err = |src: &[u8], opts: PackOptions| try_pack(src, &opts).expect_err("pack should fail");

    // A shared expert (qwen2moe's) is not an FFN pack knows.
    let mut shared = custom_model(1, 32, 32, [GgmlType::F32; 3], 6, "");
    {
        let g = Gguf::parse(&shared).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in &g.metadata {
            w.add_metadata(k.as_str(), v.clone()).unwrap();
        }
        for t in &g.tensors {
            w.add_tensor_data(&t.name, t.ty, &t.dims, g.tensor_data(t).unwrap()).unwrap();
        }
        w.add_tensor_data("blk.0.ffn_gate_shexp.weight", GgmlType::F32, &[32, 32], vec![0u8; 4096]).unwrap();
        shared = w.to_bytes().unwrap();
    }
    let e = err(&shared, PackOptions::default());
    assert!(matches!(&e, FormatError::Unsupported { what } if what.contains("ffn_gate_shexp")), "{e:?}");

    let missing = custom_model(2, 32, 32, [GgmlType::F32; 3], 6, "blk.1.ffn_up.weight");
    assert!(
        matches!(err(&missing, PackOptions::default()), FormatError::MissingTensor { name } if name == "blk.1.ffn_up.weight")
    );
    let missing = custom_model(2, 32, 32, [GgmlType::F32; 3], 6, "blk.0.attn_q.weight");
    assert!(matches!(err(&missing, PackOptions::default()), FormatError::MissingTensor { .. }));

    let zero = PackOptions { cluster_neurons: 0, ..PackOptions::default() };
    assert!(matches!(err(&dense, zero), FormatError::InvalidPackOptions { .. }));

    let mut dup: Vec<u32> = (0..64).collect();
    dup[5] = 4;
    for order in [
        vec![(0..64).collect(), dup],
        vec![(0..64).collect(), (0..63).collect()],
        vec![(0..64).collect()],
        vec![(0..64).collect(), (1..65).collect()],
    ] {
        let opts = PackOptions { order: Some(order), ..PackOptions::default() };
        assert!(matches!(err(&dense, opts), FormatError::InvalidPackOptions { .. }));
    }
    for freq in [
        vec![vec![0.5; 64], vec![1.5; 64]],
        vec![vec![0.5; 64], vec![f32::NAN; 64]],
        vec![vec![0.5; 64], vec![0.5; 3]],
    ] {
        let opts = PackOptions { frequency: Some(freq), ..PackOptions::default() };
        assert!(matches!(err(&dense, opts), FormatError::InvalidPackOptions { .. }));
    }

    // Q8_0 down columns need d_model % 32 == 0.
    let odd = custom_model(1, 48, 32, [GgmlType::F32; 3], 7, "");
    assert!(matches!(err(&odd, PackOptions::default()), FormatError::Unsupported { .. }));
    assert!(try_pack(&odd, &PackOptions { down_type: GgmlType::F16, ..PackOptions::default() }).is_ok());
    let q4 = PackOptions { down_type: GgmlType::Q4_0, ..PackOptions::default() };
    assert!(matches!(err(&dense, q4), FormatError::Unsupported { .. }));

    // An extra tensor may not clash with a source or FFN tensor name.
    for name in ["token_embd.weight", "blk.0.ffn_gate.weight"] {
        let extra = ExtraTensor { name: name.into(), ty: GgmlType::F32, dims: vec![1], data: vec![0; 4] };
        let opts = PackOptions { extra_tensors: vec![extra], ..PackOptions::default() };
        assert!(matches!(err(&dense, opts), FormatError::TensorExists { .. }));
    }
}

#[test]
fn fuzz_invariants_hold_on_truncations_and_mutations() {
    let src_bytes = custom_model(2, 32, 20, [GgmlType::F32; 3], 8, "");
    let bytes = pack_bytes(&src_bytes, &PackOptions { cluster_neurons: 3, ..PackOptions::default() });
    check_packed_parse(&bytes);
    for len in (0..bytes.len()).step_by(37) {
        check_packed_parse(&bytes[..len]);
    }
    let mut rng = Rng(9);
    let index_offset = PackedFile::parse(&bytes).unwrap().header().index_offset as usize;
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(3) {
            // Mostly the header fields and the index, where the structure is.
            let at = match rng.below(3) {
                0 => rng.below(80) as usize,
                1 => index_offset + rng.below((b.len() - index_offset) as u64) as usize,
                _ => rng.below(b.len() as u64) as usize,
            };
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

/// A mixture of experts packs into one FFN unit per (layer, expert), layer-major: unit `l * n_expert + e` holds
/// expert `e`'s gate and up rows (bit for bit) and its down columns, with the router left resident.
#[test]
fn pack_writes_one_unit_per_expert() {
    let mut cfg = SynthConfig::preset("tiny").unwrap();
    (cfg.n_layers, cfg.n_experts, cfg.n_experts_used, cfg.d_model, cfg.n_ff, cfg.n_vocab) =
        (2, 4, 2, 128, 96, 300);
    let src_bytes = synth_bytes(&cfg);
    let src = Gguf::parse(&src_bytes).unwrap();
    let n_units = 2 * 4;
    let mut rng = Rng(5);
    let order: Vec<Vec<u32>> = (0..n_units).map(|_| random_perm(&mut rng, 96)).collect();
    let opts = PackOptions { cluster_neurons: 20, order: Some(order.clone()), ..PackOptions::default() };
    let (bytes, _, progress) = try_pack(&src_bytes, &opts).unwrap();
    assert_eq!(progress.len(), n_units);
    let f = PackedFile::parse(&bytes).unwrap();
    assert_eq!((f.header().version, f.n_layers()), (PACKED_VERSION, n_units));
    let resident = f.resident_gguf();
    for l in 0..2 {
        assert!(resident.tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_ok());
        for s in ["gate", "up", "down"] {
            assert!(resident.tensor(&format!("blk.{l}.ffn_{s}_exps.weight")).is_err());
        }
        let gate = src.tensor(&format!("blk.{l}.ffn_gate_exps.weight")).unwrap();
        let up = src.tensor(&format!("blk.{l}.ffn_up_exps.weight")).unwrap();
        let down = src.tensor(&format!("blk.{l}.ffn_down_exps.weight")).unwrap();
        for e in 0..4 {
            let u = l * 4 + e;
            let unit = f.layer(u);
            assert_eq!((unit.n_ff, unit.d_model, &unit.order), (96, 128, &order[u]));
            let mut src_down = vec![0.0f32; 128 * 96];
            for (r, row) in src_down.chunks_exact_mut(96).enumerate() {
                quant::dequantize_row(down.ty, down.row(e * 128 + r), row).unwrap();
            }
            for pos in 0..96 {
                let i = unit.order[pos] as usize;
                assert_eq!(
                    slice(&bytes, unit.gate_row_range(pos)),
                    gate.row(e * 96 + i),
                    "unit {u} gate {pos}"
                );
                let b = f.bundle(u, pos);
                assert_eq!(&b[..unit.up_row_bytes()], up.row(e * 96 + i), "unit {u} up {pos}");
                let mut col = vec![0.0f32; 128];
                quant::dequantize_row(unit.down_ty, &b[unit.up_row_bytes()..], &mut col).unwrap();
                let want: Vec<f32> = src_down.iter().skip(i).step_by(96).copied().collect();
                for (got, want) in col.chunks(32).zip(want.chunks(32)) {
                    let amax = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    for (g, w) in got.iter().zip(want) {
                        assert!((g - w).abs() <= amax / 127.0 + 1e-6, "unit {u} down column at {pos}");
                    }
                }
            }
        }
    }
    f.verify_all().unwrap();
    // Options are per unit.
    let opts = PackOptions { order: Some(order[..2].to_vec()), ..PackOptions::default() };
    assert!(matches!(try_pack(&src_bytes, &opts), Err(FormatError::InvalidPackOptions { .. })));
}
