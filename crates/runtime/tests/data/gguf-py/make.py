#!/usr/bin/env python3
"""Writes tiny random-weight checkpoints with gguf-py's GGUFWriter (not pinion's writer), the metadata keys and
tensors convert_hf_to_gguf.py writes for each architecture, deterministic (numpy RandomState):

  qwen2.gguf             Qwen2: Q/K/V biases, tied embeddings, ChatML special tokens, no BOS
  qwen3.gguf             Qwen3: per-head Q/K RMS norms, head_dim 32 with a width of 64 (key_length and
                         value_length, queries twice as wide as the model, as Qwen3 0.6B's)
  llama-rope-freqs.gguf  Llama 3.1: rope_freqs.weight, the frequency factors convert_hf_to_gguf.py computes for
                         rope_type "llama3" (factor 8, low 1, high 4, original context 1024 at this scale)
  llama-linear.gguf      Llama with rope.scaling.type linear, factor 4
  mixtral.gguf           Mixtral: a llama file with experts (expert_count 4, expert_used_count 2; ffn_gate_inp
                         F32, the 3-D ffn_{gate,up,down}_exps)
  qwen3moe.gguf          Qwen3 MoE: qwen3's attention, 8 experts of expert_feed_forward_length 64, 3 used

Every file ties the output to the embeddings (no output.weight), as Qwen2.5 0.5B, Qwen3 0.6B and Llama 3.2 1B do.
The tokenizer of every file is a byte-level BPE (tokenizer.ggml.model gpt2) of 509 tokens (256 bytes, 253
merges learnt from text.txt) and 3 special tokens, with the architecture's pre-tokenizer (qwen2, llama-bpe).
Weights are Q8_0 (matrices) and F32 (norms, biases, factors). The embeddings are small (std 0.02) so that the
layers, not the current token's embedding, decide the output, and the output norm is large (20), so that the
logits are peaked: top logits 11-18, top-2 gaps mostly above 0.1. The MoE routers (F32, as convert_hf_to_gguf.py
keeps them) are scaled (std 2.5 of the logits) so that routing is decisive, most tokens' chosen experts well
apart in probability, yet every expert is chosen for some tokens. Larger is not better: every rounding
difference between the engines (a Q8_0 activation rounded the other way) moves the logits in proportion, and
at 40 the perplexities of the two engines were up to 0.4% apart.

usage: make.py OUT_DIR
"""

import collections
import math
import os
import re
import sys

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
N_VOCAB = 512


def bytes_to_unicode():
    """GPT-2's map of bytes to printable characters, in its order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def train_bpe(text, n_merges):
    """Byte-level BPE merges learnt from `text` (words split roughly as the qwen2 and llama3 patterns split them;
    the engines tokenize with their own pre-tokenizers)."""
    b2u = dict(bytes_to_unicode())
    words = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", text)
    counts = collections.Counter("".join(b2u[b] for b in w.encode()) for w in words)
    seqs = {w: list(w) for w in counts}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in counts.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        # Most frequent pair, ties broken by the pair's text, so that the result is deterministic.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def tokenizer(w, pre, specials, bos, eos, pad, add_bos):
    text = open(os.path.join(HERE, "text.txt"), encoding="utf-8").read()
    merges = train_bpe(text, N_VOCAB - 256 - len(specials))
    tokens = [u for _, u in bytes_to_unicode()] + [a + b for a, b in merges] + specials
    assert len(tokens) == len(set(tokens)) == N_VOCAB
    types = [gguf.TokenType.NORMAL] * (N_VOCAB - len(specials)) + [gguf.TokenType.CONTROL] * len(specials)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(tokens.index(bos))
    w.add_eos_token_id(tokens.index(eos))
    if pad is not None:
        w.add_pad_token_id(tokens.index(pad))
    w.add_add_bos_token(add_bos)


class Weights:
    def __init__(self, seed):
        self.rng = np.random.RandomState(seed)

    def matrix(self, n_out, n_in, scale=1.0):
        """A [n_out, n_in] weight (GGUF dims [n_in, n_out]), std scale/sqrt(n_in)."""
        m = self.rng.standard_normal((n_out, n_in)).astype(np.float32) * np.float32(scale / math.sqrt(n_in))
        return m

    def norm(self, n, mean=1.0, spread=0.2):
        return (mean * (1.0 + spread * self.rng.standard_normal(n))).astype(np.float32)

    def vector(self, n, std):
        return (std * self.rng.standard_normal(n)).astype(np.float32)


def q8(w, name, m):
    w.add_tensor(name, gguf.quants.quantize(m, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def write(path, arch, seed, *, d_model, n_heads, n_kv_heads, head_dim, n_ff, n_layers=2, out_scale=20.0, qk_scale=1.0,
          qkv_bias=False, qk_norm=False, rope_base=10000.0, rope_freqs=None, linear=None, head_dim_keys=False,
          n_expert=0, n_expert_used=0, n_ff_exp=None, router_scale=2.5):
    w = gguf.GGUFWriter(path, arch)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_block_count(n_layers)
    w.add_context_length(8192)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(n_ff)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
    if n_ff_exp is not None:
        w.add_expert_feed_forward_length(n_ff_exp)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    if head_dim_keys:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        w.add_vocab_size(N_VOCAB)
        w.add_rope_dimension_count(head_dim)
        tokenizer(w, "llama-bpe", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                  "<|begin_of_text|>", "<|eot_id|>", None, True)
    else:
        tokenizer(w, "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  "<|endoftext|>", "<|im_end|>", "<|endoftext|>", False)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    r = Weights(seed)
    qd, kvd = n_heads * head_dim, n_kv_heads * head_dim
    q8(w, "token_embd.weight", r.rng.standard_normal((N_VOCAB, d_model)).astype(np.float32) * np.float32(0.02))
    w.add_tensor("output_norm.weight", r.norm(d_model, mean=out_scale))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for i in range(n_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", r.norm(d_model))
        q8(w, b + "attn_q.weight", r.matrix(qd, d_model, qk_scale))
        q8(w, b + "attn_k.weight", r.matrix(kvd, d_model, qk_scale))
        q8(w, b + "attn_v.weight", r.matrix(kvd, d_model))
        if qkv_bias:
            w.add_tensor(b + "attn_q.bias", r.vector(qd, 1.0))
            w.add_tensor(b + "attn_k.bias", r.vector(kvd, 1.0))
            w.add_tensor(b + "attn_v.bias", r.vector(kvd, 0.5))
        if qk_norm:
            w.add_tensor(b + "attn_q_norm.weight", r.norm(head_dim, spread=0.3))
            w.add_tensor(b + "attn_k_norm.weight", r.norm(head_dim, spread=0.3))
        q8(w, b + "attn_output.weight", r.matrix(d_model, qd))
        w.add_tensor(b + "ffn_norm.weight", r.norm(d_model))
        if n_expert:
            ff = n_ff if n_ff_exp is None else n_ff_exp
            w.add_tensor(b + "ffn_gate_inp.weight", r.matrix(n_expert, d_model, router_scale))
            q8(w, b + "ffn_gate_exps.weight", np.stack([r.matrix(ff, d_model) for _ in range(n_expert)]))
            q8(w, b + "ffn_up_exps.weight", np.stack([r.matrix(ff, d_model) for _ in range(n_expert)]))
            q8(w, b + "ffn_down_exps.weight", np.stack([r.matrix(d_model, ff) for _ in range(n_expert)]))
        else:
            q8(w, b + "ffn_gate.weight", r.matrix(n_ff, d_model))
            q8(w, b + "ffn_up.weight", r.matrix(n_ff, d_model))
            q8(w, b + "ffn_down.weight", r.matrix(d_model, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama3_rope_factors(base, dim, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=1024):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type "llama3" (torch replaced by
    numpy, same f32 frequencies)."""
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else HERE
    llama = dict(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, n_ff=256)
    # Seeds: of 1-12, the one whose two greedy runs (run.sh) have the largest smallest top-2 gap.
    write(os.path.join(out, "qwen2.gguf"), "qwen2", 11, qkv_bias=True, rope_base=1000000.0, **llama)
    write(os.path.join(out, "qwen3.gguf"), "qwen3", 9, qk_norm=True, rope_base=1000000.0, head_dim_keys=True,
          d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, n_ff=256)
    write(os.path.join(out, "llama-rope-freqs.gguf"), "llama", 4, rope_freqs=llama3_rope_factors(10000.0, 32),
          **llama)
    write(os.path.join(out, "llama-linear.gguf"), "llama", 8, linear=4.0, **llama)
    # Seeds of 1-8 chosen as above (MOE_SEEDS=mixtral,qwen3moe overrides them, to search).
    seeds = [int(x) for x in os.environ.get("MOE_SEEDS", "4,2").split(",")]
    write(os.path.join(out, "mixtral.gguf"), "llama", seeds[0], d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
          n_ff=128, n_expert=4, n_expert_used=2)
    write(os.path.join(out, "qwen3moe.gguf"), "qwen3moe", seeds[1], qk_norm=True, rope_base=1000000.0,
          head_dim_keys=True, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, n_ff=192, n_expert=8,
          n_expert_used=3, n_ff_exp=64)


if __name__ == "__main__":
    main()
