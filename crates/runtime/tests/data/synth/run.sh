#!/bin/bash
# Writes ARCH.tsv (the greedy.tsv format of ../gemma3) for synthetic models of each architecture: llama.cpp's
# greedy run (../gemma3/ref-greedy.cpp, 16 steps, n_ctx 512) on `cargo xtask synth --shape tiny --act silu
# --arch ARCH` (gemma3 with --act gelu, the activation llama.cpp runs it with, and --window 8, so that its local
# layers mask keys).
# usage: run.sh REF_GREEDY_BINARY   (from the workspace root)
set -e
B=$1
D=$(dirname "$0")
P='The capital of France is a city of many lights and'
for a in llama qwen2 qwen3 gemma3; do
  extra="--act silu"; [ $a = gemma3 ] && extra="--act gelu --window 8"
  cargo xtask synth --arch $a $extra --shape tiny --out /tmp/synth-$a.gguf
  O=/tmp/synth-$a.out
  $B -m /tmp/synth-$a.gguf -p "$P" -n 16 > $O 2>/dev/null
  get() { grep "^$1:" $O | sed "s/^$1: *//"; }
  { printf '# prompt\tprompt ids\tgreedy ids\tmin gap\tstep-0 top-10 (id:logit)\n'
    printf '%s\t%s\t%s\t%s\t%s\n' "$P" "$(get prompt_ids)" "$(get greedy_ids)" "$(get min_gap)" "$(get top10)"; } > $D/$a.tsv
done
