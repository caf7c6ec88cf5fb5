#!/usr/bin/env bash
# The GPU checks as one prepared script, for a lent GPU machine (device tool `run`, carry [".devcarry"]):
#   1. bench_eigs on the MiniLM problem: hessrank vs scipy eigsh vs PyHessian, HVP/gradient ratio, on DEVICE;
#   2. qlora_grad_check: every LoRA tensor gets a gradient on 32-bit, LLM.int8, NF4, NF4-dq and FP4 weights;
#   3. the MiniLM-L6 / SST-2 case of validate_real.py end to end (analysis with bitsandbytes quantization,
#      advice, validation runs with QLoRA) until the deadline; a cut-off validation shows its finished runs.
#
#   bash benchmarks/gpu_carry.sh                                  # here, once: fills .devcarry (see there)
#   bash benchmarks/gpu_check.sh "$OUT" cuda                      # there
#   PY=.venv/bin/python bash benchmarks/gpu_check.sh runs/gpu-cpu cpu   # the same, here, on the carried weights
#
# DEADLINE (seconds after start, default 480) bounds stage 3, so that the files come back inside the call;
# STAGES (default "bench qlora case") picks stages, for a rerun of one of them.
# Outputs in OUT: gpu_check.log, bench_eigs.json, qlora_grad.json, real.tgz (the case's folder without weights).
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUT [DEVICE]}"
DEV="${2:-cuda}"
PY="${PY:-python3}"
CARRY="${CARRY:-.devcarry}"
DEADLINE="${DEADLINE:-480}"
STAGES=" ${STAGES:-bench qlora case} "
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
CARRY=$(cd "$CARRY" && pwd)
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
export HESSRANK_DATA_DIR="$CARRY/data" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s) at +$(($(date +%s) - t0)) s"
  local rc=0
  timeout "$limit" "$@" || rc=$?
  echo "== $name rc=$rc at +$(($(date +%s) - t0)) s"
}
{
  stage env 60 bash -c "nvidia-smi -L 2>/dev/null; $PY -c '
import platform, torch, transformers, peft, accelerate, scipy, bitsandbytes, pyhessian
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"transformers\", transformers.__version__, \"peft\", peft.__version__, \"accelerate\", accelerate.__version__,
      \"bitsandbytes\", bitsandbytes.__version__, \"scipy\", scipy.__version__)
print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu only\")'"
  [[ $STAGES == *" bench "* ]] && stage bench_eigs 240 "$PY" benchmarks/bench_eigs.py --device "$DEV" --json "$OUT/bench_eigs.json"
  [[ $STAGES == *" qlora "* ]] && stage qlora_grad 120 "$PY" benchmarks/qlora_grad_check.py --device "$DEV" --json "$OUT/qlora_grad.json"
  left=$((DEADLINE - ($(date +%s) - t0)))
  if [[ $STAGES != *" case "* ]]; then
    :
  elif [ "$left" -gt 30 ]; then
    stage minilm-sst2 "$left" "$PY" benchmarks/validate_real.py minilm-sst2 --out "$OUT/real"
  else
    echo "== minilm-sst2 skipped: ${left} s left before the deadline"
  fi
  stage summary 60 "$PY" benchmarks/validate_real.py summary --out "$OUT/real"
} 2>&1 | tee "$OUT/gpu_check.log"
if [ -d "$OUT/real" ]; then
  tar czf "$OUT/real.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='checkpoints' \
    -C "$OUT" real && rm -rf "$OUT/real"
fi
echo "gpu_check finished in $(($(date +%s) - t0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
