//! Tests on the real SmolLM2-135M-Instruct Q4_1 model, when it is present.
//!
//! The model is looked for at `models/SmolLM2-135M-Instruct.Q4_1.gguf` (git-ignored), then at `$PINION_MODEL`.
//! Without it these tests print a note and pass, unless `PINION_REQUIRE_MODEL` is set (as in CI, which fetches
//! the model first), in which case they fail.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use pinion_format::{GgmlType, Gguf, GgufWriter, Value, fuzz, quant};

fn model_path() -> Option<PathBuf> {
    let default =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if default.is_file() {
        return Some(default);
    }
    std::env::var_os("PINION_MODEL").map(PathBuf::from).filter(|p| p.is_file())
}

/// The model's bytes, read once for all tests, or `None` (after a note) when it is absent and not required.
fn model() -> Option<&'static [u8]> {
    static MODEL: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let bytes = MODEL.get_or_init(|| {
        let path = model_path()?;
        Some(std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())))
    });
    if bytes.is_none() {
        assert!(
            std::env::var_os("PINION_REQUIRE_MODEL").is_none(),
            "PINION_REQUIRE_MODEL is set, but SmolLM2-135M-Instruct.Q4_1.gguf is neither in models/ nor at \
             $PINION_MODEL"
        );
        eprintln!(
            "note: SmolLM2-135M-Instruct.Q4_1.gguf not found in models/ or at $PINION_MODEL; skipping the \
             real-model test (set PINION_REQUIRE_MODEL to make this a failure)"
        );
    }
    bytes.as_deref()
}

#[test]
fn smollm2_header_and_directory() {
    let Some(bytes) = model() else { return };
    let g = Gguf::parse(bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.metadata.len(), 33);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(g.get_i64_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    assert_eq!(g.get_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert!(matches!(g.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(_))));

    assert_eq!(g.tensors.len(), 272);
    let mut by_type: HashMap<GgmlType, usize> = HashMap::new();
    for t in &g.tensors {
        *by_type.entry(t.ty).or_default() += 1;
    }
    assert_eq!(by_type[&GgmlType::Q4_1], 210);
    assert_eq!(by_type[&GgmlType::F32], 61);
    assert_eq!(by_type[&GgmlType::Q8_0], 1);
    let emb = g.tensor("token_embd.weight").unwrap();
    assert_eq!((emb.ty, emb.dims), (GgmlType::Q8_0, [576, 49152].as_slice()));
    assert_eq!((emb.row_len(), emb.n_rows(), emb.row_bytes()), (576, 49152, 18 * 34));
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.dims), (GgmlType::Q4_1, [576, 576].as_slice()));
}

/// Checks every byte written against the expected file as it streams past, without a second copy.
struct CompareWith<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl Write for CompareWith<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.pos + buf.len();
        assert!(end <= self.expected.len(), "wrote past the original's end ({end} bytes)");
        if buf != &self.expected[self.pos..end] {
            let i = buf.iter().zip(&self.expected[self.pos..end]).position(|(a, b)| a != b).unwrap();
            panic!("byte {} differs from the original file", self.pos + i);
        }
        self.pos = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn smollm2_streams_back_byte_for_byte() {
    let Some(bytes) = model() else { return };
    let g = Gguf::parse(bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.add_metadata(k.as_str(), v.clone()).unwrap();
    }
    for t in &g.tensors {
        w.add_tensor(&t.name, t.ty, &t.dims).unwrap();
    }
    assert_eq!(w.data_offset(), g.data_offset);
    assert_eq!(w.tensor_infos().unwrap(), g.tensors);
    let mut s = w.begin(CompareWith { expected: bytes, pos: 0 }).unwrap();
    for t in &g.tensors {
        let data = g.tensor(&t.name).unwrap().data;
        // Feed the big ones in pieces, as a converter would.
        s.write_tensor_with(&t.name, |out| data.chunks(1 << 16).try_for_each(|c| out.write_all(c))).unwrap();
    }
    let sink = s.finish().unwrap();
    assert_eq!(sink.pos, bytes.len(), "the rewrite is as long as the original");
}

#[test]
fn smollm2_rows_dequantize_like_gguf_py() {
    let Some(bytes) = model() else { return };
    let g = Gguf::parse(bytes).unwrap();
    let digest = include_str!("data/smollm2_digest.txt");
    let mut n_rows = 0;
    for line in digest.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, row, ty, n) = (f[0], f[1].parse::<usize>().unwrap(), f[2], f[3].parse::<usize>().unwrap());
        let (sum, bits_sum) = (f[4].parse::<f64>().unwrap(), f[5].parse::<u64>().unwrap());
        let head: Vec<u32> = f[6..].iter().map(|h| u32::from_str_radix(h, 16).unwrap()).collect();
        assert_eq!(head.len(), 64);

        let t = g.tensor(name).unwrap();
        assert_eq!(t.ty.name().to_uppercase(), ty, "{name}: type");
        assert_eq!(t.row_len(), n, "{name}: row length");
        let mut out = vec![0.0f32; n];
        quant::dequantize_row(t.ty, t.row(row), &mut out).unwrap();
        for (i, (got, want)) in out.iter().zip(&head).enumerate() {
            assert_eq!(
                got.to_bits(),
                *want,
                "{name} row {row} value {i}: {got} vs gguf-py {}",
                f32::from_bits(*want)
            );
        }
        let got_bits = out.iter().fold(0u64, |acc, v| acc.wrapping_add(v.to_bits() as u64));
        assert_eq!(got_bits, bits_sum, "{name} row {row}: some value past the first 64 differs from gguf-py");
        // numpy sums pairwise and we sum in order, so the f64 sums may differ in the last bits.
        let got_sum: f64 = out.iter().map(|&v| v as f64).sum();
        assert!(
            (got_sum - sum).abs() <= 1e-9 * (1.0 + sum.abs()),
            "{name} row {row}: sum {got_sum} vs {sum}"
        );
        n_rows += 1;
    }
    assert_eq!(n_rows, 10);
}

#[test]
fn smollm2_satisfies_the_fuzz_invariants() {
    let Some(bytes) = model() else { return };
    fuzz::check_parse(bytes);
}
