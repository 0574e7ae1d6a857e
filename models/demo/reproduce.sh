#!/bin/sh
# Rebuild models/tide-demo.gguf from nothing, exactly as it was built (models/demo/README.md):
# one seeded training run with train.py's defaults (16000 steps on one thread; 48 min on the
# 2-core Sapphire Rapids machine, the same bits), then the project's converter. The work folder
# (git-ignored) keeps state.pt, train_log.json and the HF checkpoint hf/.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=${WORK:-models/demo/work/clean}
$PY models/demo/train.py --fresh --work "$W"
$PY -m tide_cpp.convert "$W/hf" -o models/tide-demo.gguf --outtype bf16 --name tide-demo
$PY models/demo/evaluate.py models/tide-demo.gguf -n 500 --device sim --policies
