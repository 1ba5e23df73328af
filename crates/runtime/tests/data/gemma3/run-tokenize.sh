#!/bin/bash
# Writes tokenize.tsv: llama-tokenize's ids (special tokens parsed, no BOS) for every text of
# ../shared/reference/tokenize.tsv (SmolLM2's reference texts), on Gemma 3 270M.
# usage: run-tokenize.sh LLAMA_TOKENIZE MODEL   (from the workspace root)
set -e
TOK=$1; M=$2
D=$(dirname "$0"); OUT=$D/tokenize.tsv; W=$(mktemp -d)
printf '# text (escaped as in ../shared/reference/tokenize.tsv)\tllama-tokenize ids, no BOS\n' > $OUT
i=0
grep -v '^#' ../shared/reference/tokenize.tsv | cut -f1 | while IFS= read -r esc; do
  i=$((i+1))
  printf '%s' "$esc" | python3 -c 'import sys,re; s=sys.stdin.read(); m={"n":"\n","t":"\t","r":"\r","\\":"\\"}; sys.stdout.write(re.sub(r"\\(.)", lambda x: m.get(x.group(1), "\\"+x.group(1)), s))' > $W/t$i.txt
  ids=$($TOK -m $M -f $W/t$i.txt --no-escape --ids --no-bos --log-disable 2>/dev/null | tr -d '[],')
  printf '%s\t%s\n' "$esc" "$ids" >> $OUT
done
rm -rf $W
