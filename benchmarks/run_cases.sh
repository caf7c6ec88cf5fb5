#!/usr/bin/env bash
# Every validation case of benchmarks/validate_real.py, one after the other (each resumes where it stopped),
# then the report. Logs: runs/real/<case>.log. On 2 CPU cores: ~40 min per MiniLM case, hours per SmolLM2 case.
#   bash benchmarks/run_cases.sh                        # all five
#   CASES="minilm-sst2 smollm2-movie" bash benchmarks/run_cases.sh
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs/real
for c in ${CASES:-minilm-sst2 minilm-agnews minilm-movie-all smollm2-movie smollm2-gsm8k}; do
  echo "=== $c $(date -u +%FT%TZ)"
  .venv/bin/python benchmarks/validate_real.py "$c" > "runs/real/$c.log" 2>&1
  echo "=== $c done rc=$? $(date -u +%FT%TZ)"
done
.venv/bin/python benchmarks/validate_real.py cost
