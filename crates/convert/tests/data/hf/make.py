#!/usr/bin/env python3
"""Writes the Hugging Face fixtures of pinion-convert's tests and the GGUF files llama.cpp makes of them.

Each fixture is a tiny random checkpoint saved by `transformers` (config.json, model.safetensors,
generation_config.json) with a tiny byte-level BPE tokenizer trained by `tokenizers` on
../../../../runtime/tests/data/gguf-py/text.txt (tokenizer.json, tokenizer_config.json), whose pre-tokenizer,
normalizer, post-processor and special tokens are those of the model family it stands for:

  Tiny-Llama3-v0.1       LlamaForCausalLM, bf16: Llama 3's pre-tokenizer (llama-bpe) and BOS template, untied
                         output, rope_type llama3 (rope_freqs.weight), Q/K permuted by the converter
  tiny-qwen2.5-instruct  Qwen2ForCausalLM, f16: Qwen2's pre-tokenizer (qwen2) and NFC normalizer, ChatML,
                         Q/K/V biases, tied embeddings, a config.json in the older layout (rope_theta at the top,
                         no rope_parameters), vocab_size past the tokenizer's ([PAD] tokens)
  tiny-qwen3-150K        Qwen3ForCausalLM, f32: per-head Q/K norms, head_dim 32 (queries wider than the model),
                         untied output, non-special added tokens (<think>), sampling defaults in
                         generation_config.json
  SmolLM2-tiny-Instruct  LlamaForCausalLM, bf16, as SmolLM2: SmolLM's pre-tokenizer (smollm: digits split, then
                         GPT-2's byte-level regex), special tokens first in the vocabulary, add_prefix_space in
                         tokenizer_config.json, tied embeddings

Then, for each, llama.cpp's converter (convert_hf_to_gguf.py of LLAMA_CPP) writes NAME.f16.gguf and
NAME.q8_0.gguf, and `llama-quantize --pure` writes NAME.q4_0.gguf from the f16 file.

The converter is run unchanged but for one function: it names the BPE pre-tokenizer by hashing the token ids a
real model's vocabulary gives a test string (get_vocab_base_pre), and a tiny vocabulary has no known hash, so
`get_vocab_base_pre` is replaced by one returning the name of the model family whose pre-tokenizer the fixture
copies (the hash it computed is printed). pinion's converter names it from the pre-tokenizer's configuration.

usage: make.py [NAME...]   (every fixture by default; python with torch, transformers, tokenizers, numpy; the
                           environment variable LLAMA_CPP names llama.cpp's source directory, with
                           build/bin/llama-quantize; default /work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp)
"""

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "../../../../runtime/tests/data/gguf-py/text.txt")
LLAMA_CPP = os.environ.get("LLAMA_CPP", "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(kind, n_vocab, specials=()):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "smollm":
        tok = Tokenizer(models.BPE(byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=n_vocab, show_progress=False, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        with open(TEXT, encoding="utf-8") as f:
            tok.train_from_iterator([f.read()], trainer)
        return tok
    if kind == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
        pat, trim = LLAMA3_PAT, True
    else:
        tok = Tokenizer(models.BPE(byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        pat, trim = QWEN2_PAT, False
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    tok.train_from_iterator([text], trainer)
    return tok


def make_llama(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import processors

    tok = train_tokenizer("llama3", 380)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT
    fast.save_pretrained(out)
    n_vocab = tok.get_vocab_size()
    cfg = LlamaConfig(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=tok.token_to_id("<|eot_id|>"),
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    )
    save_model(LlamaForCausalLM, cfg, out, torch.bfloat16, seed=1)


def make_smollm(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import processors

    # SmolLM2's special tokens come first (ids 0, 1, 2), as the trainer places them.
    tok = train_tokenizer("smollm", 360, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        c = json.load(f)
    c["add_prefix_space"] = False
    with open(path, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    save_model(LlamaForCausalLM, cfg, out, torch.bfloat16, seed=4)


def make_qwen(out, arch):
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from tokenizers import AddedToken, processors

    tok = train_tokenizer("qwen2", 400)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if arch == "qwen3":
        tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                        AddedToken("</think>", special=False, normalized=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    n_tok = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    if arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=(n_tok + 63) // 64 * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            tie_word_embeddings=True, bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=eos,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        save_model(Qwen2ForCausalLM, cfg, out, torch.float16, seed=2)
        # The layout of the configs published before transformers 5: rope_theta at the top.
        path = os.path.join(out, "config.json")
        with open(path) as f:
            c = json.load(f)
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["rope_scaling"] = None
        with open(path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
    else:
        cfg = Qwen3Config(
            vocab_size=n_tok, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=tok.token_to_id("<|endoftext|>"),
            eos_token_id=eos, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        save_model(Qwen3ForCausalLM, cfg, out, torch.float32, seed=3,
                   generation={"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95})


def save_model(cls, cfg, out, dtype, seed, generation=None):
    import torch

    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    if generation:
        for k, v in generation.items():
            setattr(model.generation_config, k, v)
    model.to(dtype).save_pretrained(out, safe_serialization=True)


def convert(model_dir, outtype, out, pre):
    code = f"""
import sys, runpy, logging
sys.path.insert(0, {LLAMA_CPP!r})
import conversion.base as base
real = base.TextModel.get_vocab_base_pre
def named_pre(self, tokenizer):
    try:
        return real(self, tokenizer)
    except NotImplementedError:
        logging.getLogger("make.py").warning("pre-tokenizer given by make.py: %s", {pre!r})
        return {pre!r}
base.TextModel.get_vocab_base_pre = named_pre
sys.argv = ["convert_hf_to_gguf.py", {model_dir!r}, "--outtype", {outtype!r}, "--outfile", {out!r}]
runpy.run_path({os.path.join(LLAMA_CPP, "convert_hf_to_gguf.py")!r}, run_name="__main__")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def main():
    fixtures = [
        ("Tiny-Llama3-v0.1", make_llama, "llama-bpe"),
        ("tiny-qwen2.5-instruct", lambda d: make_qwen(d, "qwen2"), "qwen2"),
        ("tiny-qwen3-150K", lambda d: make_qwen(d, "qwen3"), "qwen2"),
        ("SmolLM2-tiny-Instruct", make_smollm, "smollm"),
    ]
    only = sys.argv[1:]
    quantize = os.path.join(LLAMA_CPP, "build/bin/llama-quantize")
    for name, make, pre in fixtures:
        if only and name not in only:
            continue
        d = os.path.join(HERE, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        make(d)
        for t in ["f16", "q8_0"]:
            convert(d, t, os.path.join(HERE, f"{name}.{t}.gguf"), pre)
        subprocess.run([quantize, "--pure", os.path.join(HERE, f"{name}.f16.gguf"),
                        os.path.join(HERE, f"{name}.q4_0.gguf"), "q4_0"], check=True)


if __name__ == "__main__":
    main()
