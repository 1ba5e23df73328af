#!/bin/bash
# Writes greedy.tsv (the three prompts, n_ctx 512) and a fourth line: a prompt longer than Gemma 3's sliding
# window of 512 (the first 2,9xx characters of ../shared/corpus/eval.txt), n_ctx 1024, 16 steps.
set -e
M=${M:-/work/gemma/gemma-3-270m-q4_k_m.gguf}
R=${R:-/work/gemma/ref}
B=${B:-/work/llamacpp/ref-greedy/ref-greedy}
P[1]='The capital of France is'
P[2]='Once upon a time, there was a little robot who'
P[3]=$'<start_of_turn>user\nWhat is the boiling point of water in Celsius?<end_of_turn>\n<start_of_turn>model\n'
T=$R/greedy.tsv
printf '# prompt (\\n = newline)\tprompt ids\tgreedy ids\tmin gap\tstep-0 top-10 (id:logit)\n' > $T
esc() { python3 -c 'import sys; print(sys.stdin.read().replace("\\","\\\\").replace("\n","\\n").replace("\t","\\t"), end="")'; }
for n in 1 2 3 4; do
  O=/tmp/ref-out$n.txt
  if [ $n = 4 ]; then
    $B -m $M -f $R/long.txt -c 1024 -n 16 > $O 2>/dev/null
    text=$(esc < $R/long.txt)
  else
    $B -m $M -p "${P[$n]}" > $O 2>/dev/null
    text=$(printf '%s' "${P[$n]}" | esc)
  fi
  get() { grep "^$1:" $O | sed "s/^$1: *//"; }
  printf '%s\t%s\t%s\t%s\t%s\n' "$text" "$(get prompt_ids)" "$(get greedy_ids)" "$(get min_gap)" "$(get top10)" >> $T
done
