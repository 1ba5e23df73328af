#!/usr/bin/env python3
"""Writes the reference fixtures of pinion-format's tests from gguf-py, an implementation independent of ours.

Run from anywhere:  python3 crates/format/tests/data/gen_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Needs `pip install gguf numpy` (checked with gguf 0.17 and 0.19, numpy 2.x). Output, next to this script:

- dequant_<type>.bin / dequant_<type>.f32: deterministic pseudo-random blocks (sane f16 scales, random quant
  bytes) and gguf-py's dequantization of them (little-endian f32);
- quant_input.f32 and quant_<type>.bin: pseudo-random rows and gguf-py's quantization of them;
- gguf_py_sample.gguf: a small file written by gguf-py's GGUFWriter, to check our reader on it and our writer's
  layout against it;
- smollm2_digest.txt (only if the model is found): for a few rows of real tensors, the first 64 dequantized
  values and digests of the whole row, as gguf-py dequantizes them.

Everything is little-endian; the generator is seeded, so rerunning it reproduces the files.
"""

import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20240607)
# The types added later (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K) draw from their own generator, so that the fixtures
# written before them come out byte for byte as they were.
rng_later = np.random.default_rng(20250312)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


EDGES = (0.0, -0.0, 6.1e-5, -3.0e-7, 1.0, 65504.0 / 256)  # zeros, smallest normal, subnormal, one, large


def sane_scales(n, lo=-4.0, hi=0.0, edges=EDGES, gen=None):
    """n f16 scales with random sign and magnitude 10^[lo, hi), the first ones replaced by `edges`."""
    gen = gen or rng
    mags = 10.0 ** gen.uniform(lo, hi, n)
    signs = gen.choice([-1.0, 1.0], n)
    s = (mags * signs).astype(np.float16)
    s[: len(edges)] = np.array(edges, dtype=np.float16)
    return s


def random_bytes(n_blocks, n, gen=None):
    return (gen or rng).integers(0, 256, size=(n_blocks, n), dtype=np.uint8)


def blocks_q4_0(n):
    return np.concatenate([f16_bytes(sane_scales(n)), random_bytes(n, 16)], axis=1)


def blocks_q4_1(n):
    return np.concatenate([f16_bytes(sane_scales(n)), f16_bytes(sane_scales(n, -3, 1)), random_bytes(n, 16)], axis=1)


def blocks_q8_0(n):
    return np.concatenate([f16_bytes(sane_scales(n)), random_bytes(n, 32)], axis=1)


def blocks_q4_k(n):
    # d and dmin are non-negative in files made by ggml, but the format does not require it: test both signs.
    return np.concatenate(
        [
            f16_bytes(sane_scales(n, -5, -1, edges=(0.0, -3.0e-7))),
            f16_bytes(sane_scales(n, -5, -1, edges=(1.0e-3, 0.0))),
            random_bytes(n, 12),
            random_bytes(n, 128),
        ],
        axis=1,
    )


def blocks_q6_k(n):
    return np.concatenate([random_bytes(n, 128), random_bytes(n, 64), random_bytes(n, 16), f16_bytes(sane_scales(n, -5, -1, edges=(-3.0e-7,)))], axis=1)


def blocks_q5_0(n):
    g = rng_later
    return np.concatenate([f16_bytes(sane_scales(n, gen=g)), random_bytes(n, 4, g), random_bytes(n, 16, g)], axis=1)


def blocks_q5_1(n):
    g = rng_later
    d, m = f16_bytes(sane_scales(n, gen=g)), f16_bytes(sane_scales(n, -3, 1, gen=g))
    return np.concatenate([d, m, random_bytes(n, 4, g), random_bytes(n, 16, g)], axis=1)


def blocks_q2_k(n):
    g = rng_later
    scales, qs = random_bytes(n, 16, g), random_bytes(n, 64, g)
    d = f16_bytes(sane_scales(n, -5, -1, edges=(0.0, -3.0e-7), gen=g))
    dmin = f16_bytes(sane_scales(n, -5, -1, edges=(1.0e-3, 0.0), gen=g))
    return np.concatenate([scales, qs, d, dmin], axis=1)


def blocks_q3_k(n):
    g = rng_later
    hmask, qs, scales = random_bytes(n, 32, g), random_bytes(n, 64, g), random_bytes(n, 12, g)
    d = f16_bytes(sane_scales(n, -5, -1, edges=(-3.0e-7,), gen=g))
    return np.concatenate([hmask, qs, scales, d], axis=1)


def blocks_q5_k(n):
    g = rng_later
    d = f16_bytes(sane_scales(n, -5, -1, edges=(0.0, -3.0e-7), gen=g))
    dmin = f16_bytes(sane_scales(n, -5, -1, edges=(1.0e-3, 0.0), gen=g))
    return np.concatenate([d, dmin, random_bytes(n, 12, g), random_bytes(n, 32, g), random_bytes(n, 128, g)], axis=1)


def half_words(n):
    """Random 16-bit patterns (every class: zeros, subnormals, normals, inf, NaN) with the specials up front."""
    w = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return w.view(np.uint8).reshape(-1, 2)


def f16_patterns(n):
    w = half_words(n).view(np.uint16).reshape(-1)
    w[:8] = [0x0000, 0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7E00, 0x7BFF]
    return w.view(np.uint8).reshape(-1, 2)


def bf16_patterns(n):
    w = half_words(n).view(np.uint16).reshape(-1)
    w[:8] = [0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F]
    return w.view(np.uint8).reshape(-1, 2)


DEQUANT = {
    "q4_0": (T.Q4_0, blocks_q4_0, 16),
    "q4_1": (T.Q4_1, blocks_q4_1, 16),
    "q8_0": (T.Q8_0, blocks_q8_0, 16),
    "q4_k": (T.Q4_K, blocks_q4_k, 8),
    "q6_k": (T.Q6_K, blocks_q6_k, 8),
    "f16": (T.F16, f16_patterns, 512),
    "bf16": (T.BF16, bf16_patterns, 512),
    # Drawn from rng_later (see above).
    "q5_0": (T.Q5_0, blocks_q5_0, 16),
    "q5_1": (T.Q5_1, blocks_q5_1, 16),
    "q2_k": (T.Q2_K, blocks_q2_k, 8),
    "q3_k": (T.Q3_K, blocks_q3_k, 8),
    "q5_k": (T.Q5_K, blocks_q5_k, 8),
}


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(np.ascontiguousarray(data).tobytes())


def gen_dequant():
    for name, (qtype, make, n) in DEQUANT.items():
        raw = make(n)
        with np.errstate(all="ignore"):
            out = dequantize(raw.reshape(-1), qtype).astype("<f4")
        write(f"dequant_{name}.bin", raw)
        write(f"dequant_{name}.f32", out)


def gen_quant():
    # 16 rows of 64 values: varied magnitudes, a zero block, a constant block, a block with a lone outlier, and
    # exact ties (k + 0.5) * 2^-3 that exercise rounding.
    rows = rng.standard_normal((16, 64)).astype(np.float32) * (10.0 ** rng.uniform(-3, 3, (16, 1))).astype(np.float32)
    rows[1, :32] = 0.0
    rows[2, :32] = 0.75
    rows[3, :32] = 1e-3
    rows[3, 7] = 40.0
    rows[4, :32] = (np.arange(32, dtype=np.float32) - 16.0 + 0.5) / 8.0
    rows[5, :32] = -rows[4, :32]
    rows = rows.astype("<f4")
    write("quant_input.f32", rows)
    for name, qtype in [("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q8_0", T.Q8_0)]:
        write(f"quant_{name}.bin", quantize(rows, qtype))


def gen_gguf_sample():
    """A small GGUF file written by gguf-py's GGUFWriter: metadata of every scalar type and arrays, tensors of
    several types and sizes that need padding."""
    path = os.path.join(HERE, "gguf_py_sample.gguf")
    w = GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", -1.25e-3)
    w.add_bool("t.bool", True)
    w.add_string("t.string", "héllo ✓")
    w.add_uint64("t.u64", 2**64 - 2)
    w.add_int64("t.i64", -(2**63) + 1)
    w.add_float64("t.f64", 3.141592653589793)
    w.add_array("t.strings", ["<s>", "</s>", "Ġthe"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -0.25])
    w.add_array("t.bools", [True, False])
    w.add_tensor("f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("f16", np.arange(5, dtype=np.float16))
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    w.add_tensor("q8_0", quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("q4_1", quantize(x, T.Q4_1), raw_dtype=T.Q4_1)
    w.add_tensor("bf16", quantize(np.arange(3, dtype=np.float32), T.BF16), raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_model_digest(path):
    r = GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    picks = [
        ("token_embd.weight", [0, 1, 100, 49151]),
        ("blk.0.attn_q.weight", [0, 575]),
        ("blk.0.ffn_down.weight", [0, 575]),
        ("blk.29.ffn_up.weight", [1535]),
        ("output_norm.weight", [0]),
    ]
    lines = [
        "# gguf-py dequantization of rows of SmolLM2-135M-Instruct.Q4_1.gguf, written by gen_reference.py.",
        "# tensor row type n sum_f64 bits_sum_u64 first_64_values_as_f32_bit_patterns...",
        "# bits_sum_u64 is the wrapping sum of the f32 bit patterns of the whole row, so it checks every value.",
    ]
    for name, rows in picks:
        t = by_name[name]
        deq = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
        for row in rows:
            v = np.ascontiguousarray(deq[row], dtype="<f4")
            bits = v.view(np.uint32).astype(np.uint64)
            bits_sum = int(bits.sum(dtype=np.uint64))
            s = float(v.astype(np.float64).sum())
            head = " ".join(f"{b:08x}" for b in v[:64].view(np.uint32))
            lines.append(f"{name} {row} {t.tensor_type.name} {v.size} {s!r} {bits_sum} {head}")
    with open(os.path.join(HERE, "smollm2_digest.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    gen_dequant()
    gen_quant()
    gen_gguf_sample()
    model = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PINION_MODEL")
    if not model:
        model = os.path.join(HERE, "../../../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(model):
        gen_model_digest(model)
    else:
        print(f"model not found at {model}: smollm2_digest.txt not regenerated", file=sys.stderr)


if __name__ == "__main__":
    main()
