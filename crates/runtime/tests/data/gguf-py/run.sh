#!/bin/bash
# Writes the gguf-py checkpoints (make.py) and llama.cpp's references on them:
# - NAME.tsv (the greedy.tsv format of ../gemma3): ref-greedy (../gemma3/ref-greedy.cpp, n_ctx 512, 32 steps) on
#   a short prompt and on a long one (the first paragraph of text.txt, 203 tokens, so that RoPE scaling acts on
#   distant positions). The long prompt and its 32 steps stay within 256 positions: beyond, llama.cpp's KV view
#   is 512 cells and its decode steps take another attention kernel (ggml-cpu ops.cpp, use_split_kv_path:
#   keys split among the threads, partial sums reduced), which pinion does not mirror: on llama-rope-freqs with
#   the first two paragraphs (399 tokens) pinion's decode-step logits are 0.074 from llama.cpp's on average
#   (at most 0.43), as far as llama.cpp's own are from it with flash attention off (0.071, at most 0.51);
# - ppl.tsv: llama-perplexity on text.txt, -c 128 for qwen2, qwen3 and the MoE files, -c 512 for the RoPE-scaling files, one
#   sequence per batch (-b = -c) as pinion evaluates it (llama-perplexity's default packs 16 sequences of 128
#   into a batch, which moves its own figure for qwen2 by 0.4%).
# usage: run.sh   (from the workspace root; B = ref-greedy binary, L = llama.cpp's build/bin)
set -e
B=${B:-/work/llamacpp/ref-greedy/ref-greedy}
L=${L:-/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
D=$(dirname "$0")
python3 $D/make.py $D
short='The miller kept a notebook of the river, and'
long=$(python3 -c 'import sys; print(open(sys.argv[1]).read().split("\n\n")[0])' $D/text.txt)
esc() { python3 -c 'import sys; print(sys.stdin.read().replace("\\","\\\\").replace("\n","\\n").replace("\t","\\t"), end="")'; }
printf '# file\tn_ctx\tchunks\tppl\n' > $D/ppl.tsv
for f in qwen2 qwen3 llama-rope-freqs llama-linear mixtral qwen3moe; do
  T=$D/$f.tsv
  printf '# prompt\tprompt ids\tgreedy ids\tmin gap\tstep-0 top-10 (id:logit)\n' > $T
  for p in "$short" "$long"; do
    O=/tmp/gguf-py-$f.out
    $B -m $D/$f.gguf -p "$p" -n 32 > $O 2>/dev/null
    get() { grep "^$1:" $O | sed "s/^$1: *//"; }
    printf '%s\t%s\t%s\t%s\t%s\n' "$(printf '%s' "$p" | esc)" "$(get prompt_ids)" "$(get greedy_ids)" "$(get min_gap)" \
      "$(get top10)" >> $T
  done
  c=128; case $f in llama-*) c=512 ;; esac
  # llama-perplexity's logger thread sometimes loses the last lines at exit: run it again until they are there.
  for try in 1 2 3 4 5 6 7 8; do
    $L/llama-perplexity -m $D/$f.gguf -f $D/text.txt -c $c -b $c -t 2 > /tmp/gguf-py-$f.ppl 2>&1
    grep -aq 'Final estimate' /tmp/gguf-py-$f.ppl && break
  done
  chunks=$(sed -n 's/.*calculating perplexity over \([0-9]*\) chunks.*/\1/p' /tmp/gguf-py-$f.ppl)
  ppl=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' /tmp/gguf-py-$f.ppl)
  [ -n "$ppl" ] || { echo "no perplexity for $f" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\n' $f $c $chunks $ppl >> $D/ppl.tsv
done
