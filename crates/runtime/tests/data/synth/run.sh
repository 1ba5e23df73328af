#!/bin/bash
# Writes ARCH.tsv (the greedy.tsv format of ../gemma3) for synthetic models of each architecture: llama.cpp's
# greedy run (../gemma3/ref-greedy.cpp, 16 steps, n_ctx 512) on `cargo xtask synth --shape tiny --act silu
# --arch ARCH` (gemma3 with --act gelu, the activation llama.cpp runs it with, and --window 8, so that its local
# layers mask keys; llama3 is llama with --rope-factors, Llama 3.1's RoPE frequency factors).
# usage: run.sh REF_GREEDY_BINARY   (from the workspace root)
set -e
B=$1
D=$(dirname "$0")
P='The capital of France is a city of many lights and'
for a in llama llama3 qwen2 qwen3 gemma3; do
  extra="--arch $a --act silu"
  [ $a = gemma3 ] && extra="--arch gemma3 --act gelu --window 8"
  [ $a = llama3 ] && extra="--arch llama --act silu --rope-factors"
  cargo xtask synth $extra --shape tiny --out /tmp/synth-$a.gguf
  O=/tmp/synth-$a.out
  # Llama 3's factors scale the slow frequencies, which only turn far from position 0: a prompt of 366 tokens.
  prompt="$P"; [ $a = llama3 ] && prompt="$P $P $P $P $P"
  $B -m /tmp/synth-$a.gguf -p "$prompt" -n 16 > $O 2>/dev/null
  get() { grep "^$1:" $O | sed "s/^$1: *//"; }
  { printf '# prompt\tprompt ids\tgreedy ids\tmin gap\tstep-0 top-10 (id:logit)\n'
    printf '%s\t%s\t%s\t%s\t%s\n' "$prompt" "$(get prompt_ids)" "$(get greedy_ids)" "$(get min_gap)" "$(get top10)"; } > $D/$a.tsv
done
