//! Packed-format compatibility: the checked-in files of every shipped packed version (`tests/data/packed_v*.pinion`)
//! still parse with this build and hold what their source model says, and `create_format` writes the file of the
//! current version when it is missing (tantivy's `compat_tests.rs` pattern), so that later versions must keep
//! reading it.
//!
//! Every fixture is packed from the same small synthetic model ([`fixture_source`]), which is regenerated here and
//! is the independent reference: gate and up rows must be the source's bytes, down columns the source's values
//! within Q8_0's rounding, and resident tensors the source's bytes.

use std::io::Cursor;
use std::path::PathBuf;

use pinion_format::packed::{PACKED_VERSION, PACKED_VERSION_KEY, PackOptions, PackedFile, pack};
use pinion_format::synth::{self, SynthConfig};
use pinion_format::{FormatError, Gguf, Value, quant};

use crate::util::crc32_ref;

/// The source of every packed fixture: 2 layers, d_model 64, 96 neurons, vocabulary 300, Q4_0, untied head.
fn fixture_source() -> Vec<u8> {
    let mut cfg = SynthConfig::preset("tiny").unwrap();
    (cfg.n_layers, cfg.d_model, cfg.n_ff, cfg.n_vocab, cfg.n_ctx) = (2, 64, 96, 300, 64);
    cfg.seed = 11;
    synth::write_model(&cfg, Vec::new(), &mut |_, _| {}).unwrap()
}

/// The options of every packed fixture: clusters of 40 (the last one 16), a fixed order and frequencies.
fn fixture_options() -> PackOptions {
    let order = (0..2u32).map(|l| (0..96u32).map(|p| (p * 37 + l * 5) % 96).collect()).collect();
    let frequency = (0..2).map(|l| (0..96).map(|i| ((i * 7 + l) % 97) as f32 / 96.0).collect()).collect();
    PackOptions {
        cluster_neurons: 40,
        order: Some(order),
        frequency: Some(frequency),
        metadata: vec![("pinion.test.fixture".into(), Value::from("compat"))],
        ..PackOptions::default()
    }
}

fn fixture_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/packed_v{version}.pinion"))
}

fn pack_fixture() -> Vec<u8> {
    let src = fixture_source();
    let g = Gguf::parse(&src).unwrap();
    let mut out = Cursor::new(Vec::new());
    pack(&g, &fixture_options(), &mut out, &mut |_| {}).unwrap();
    out.into_inner()
}

/// Writes the fixture of the current version if it is missing (to a temporary name, then renamed, so that a test
/// reading it at the same time sees all of it or nothing); a present file is left alone.
fn ensure_current_fixture() {
    let path = fixture_path(PACKED_VERSION);
    if !path.exists() {
        let tmp =
            path.with_extension(format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        std::fs::write(&tmp, pack_fixture()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
}

/// Creates the current version's fixture if it is missing, and checks that a present one is what this build writes
/// (the writer's output may change only with a new version).
#[test]
fn create_format() {
    ensure_current_fixture();
    let path = fixture_path(PACKED_VERSION);
    assert!(
        std::fs::read(&path).unwrap() == pack_fixture(),
        "{} differs from what this build writes",
        path.display()
    );
}

/// Checks a packed fixture of version `version` against the regenerated source model.
fn check_fixture(version: u32) {
    if version == PACKED_VERSION {
        ensure_current_fixture();
    }
    let bytes = std::fs::read(fixture_path(version)).unwrap();
    let f = PackedFile::parse(&bytes).unwrap();
    assert_eq!(f.header().version, version);
    f.verify_all().unwrap();
    let src_bytes = fixture_source();
    let src = Gguf::parse(&src_bytes).unwrap();
    let opts = fixture_options();
    let order = opts.order.as_ref().unwrap();
    assert_eq!(f.n_layers(), 2);
    for (l, layer) in f.layers().iter().enumerate() {
        assert_eq!(layer.order, order[l]);
        assert_eq!((layer.n_ff, layer.d_model, layer.cluster_neurons, layer.n_clusters()), (96, 64, 40, 3));
        let gate = src.tensor(&format!("blk.{l}.ffn_gate.weight")).unwrap();
        let up = src.tensor(&format!("blk.{l}.ffn_up.weight")).unwrap();
        let down = src.tensor(&format!("blk.{l}.ffn_down.weight")).unwrap();
        let mut down_rows = vec![0.0f32; 96 * 64];
        for (r, row) in down_rows.chunks_exact_mut(96).enumerate() {
            quant::dequantize_row(down.ty, down.row(r), row).unwrap();
        }
        for pos in 0..96 {
            let i = layer.order[pos] as usize;
            assert_eq!(layer.frequency[pos], opts.frequency.as_ref().unwrap()[l][i]);
            let g = layer.gate_row_bytes();
            let (k, j) = (pos / 40, pos % 40);
            assert_eq!(&f.gate_block(l, k)[j * g..][..g], gate.row(i), "layer {l} gate row at {pos}");
            let b = f.bundle(l, pos);
            assert_eq!(&b[..layer.up_row_bytes()], up.row(i), "layer {l} up row at {pos}");
            let mut col = vec![0.0f32; 64];
            quant::dequantize_row(layer.down_ty, &b[layer.up_row_bytes()..], &mut col).unwrap();
            for (r, v) in col.iter().enumerate() {
                let want = down_rows[r * 96 + i];
                // Q8_0: half a step of a block whose largest value is at most 1 in magnitude, with slack.
                assert!((v - want).abs() <= 0.5 / 127.0 + 1e-3, "layer {l} down column at {pos}, row {r}");
            }
        }
    }
    let r = f.resident_gguf();
    assert_eq!(r.get_u64(PACKED_VERSION_KEY).unwrap(), version as u64);
    assert_eq!(r.get_str("pinion.test.fixture").unwrap(), "compat");
    for t in &src.tensors {
        if !t.name.contains(".ffn_gate.") && !t.name.contains(".ffn_up.") && !t.name.contains(".ffn_down.") {
            assert!(r.tensor(&t.name).unwrap().data == src.tensor(&t.name).unwrap().data, "{}", t.name);
        }
    }
}

#[test]
fn packed_v1_fixture_still_reads() {
    check_fixture(1);
    let bytes = std::fs::read(fixture_path(1)).unwrap();
    let f = PackedFile::parse(&bytes).unwrap();
    assert!(f.checksums().is_empty(), "version 1 records no resident checksums");
    assert_eq!(f.tensor_checksum("output.weight"), None);
    assert!(f.row_checksums("token_embd.weight").is_none());
    let head = f.resident_gguf().tensor("output.weight").unwrap();
    assert!(matches!(f.verify_tensor("output.weight", head.data), Err(FormatError::NoChecksum { .. })));
    assert!(matches!(f.verify_rows("output.weight", 0, head.row(0)), Err(FormatError::NoChecksum { .. })));
    let l = &f.layers()[0];
    assert!(!l.has_gate_row_checksums());
    let row = &bytes[l.gate_row_range(0).start as usize..l.gate_row_range(0).end as usize];
    assert!(matches!(l.verify_gate_row(0, row), Err(FormatError::NoChecksum { .. })));
}

#[test]
fn packed_v2_fixture_still_reads() {
    check_fixture(2);
    let bytes = std::fs::read(fixture_path(2)).unwrap();
    let f = PackedFile::parse(&bytes).unwrap();
    let src_bytes = fixture_source();
    let src = Gguf::parse(&src_bytes).unwrap();
    let r = f.resident_gguf();
    assert_eq!(f.checksums().tensors().len(), r.tensors.len());
    for t in &r.tensors {
        let data = src.tensor(&t.name).unwrap().data;
        assert_eq!(f.tensor_checksum(&t.name), Some(crc32_ref(data)), "{}", t.name);
    }
    for name in ["token_embd.weight", "output.weight"] {
        let view = src.tensor(name).unwrap();
        let rows = f.row_checksums(name).unwrap();
        assert_eq!(rows.n_rows(), 300);
        for i in 0..300 {
            assert_eq!(rows.checksum(i), Some(crc32_ref(view.row(i))), "{name} row {i}");
        }
        f.verify_rows(name, 0, view.data).unwrap();
    }
}
