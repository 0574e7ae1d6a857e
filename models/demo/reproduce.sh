#!/bin/sh
# Rebuild models/tide-demo.gguf from nothing, exactly as it was built (models/demo/README.md).
# Five stages, each starting from the weights of the one before; 6800 steps in all.
# Every stage is seeded, so the same commands give the same weights on the same torch build.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=models/demo/work
T="nice -n 5 $PY models/demo/train.py"

# 1. RoPE base 600000 (LLaDA2.0's), any answer pattern: 1200 steps of a 2400-step schedule
$T --work $W --seed 0 --steps 2400 --stop-at 1200 --answers varied
cp $W/state.pt $W/stage1_step1200.pt
# 2. one answer pattern per task: 1050 steps of a 2000-step schedule
$T --work $W/stage2 --seed 1 --steps 2000 --stop-at 1050 --eval-every 500 --answers fixed \
   --init-from $W/stage1_step1200.pt
cp $W/stage2/state.pt $W/stage2_step1050.pt
# 3. RoPE base 10000 (more position precision in 16 rotary dims): 750 steps of 1600
$T --work $W/stage3 --seed 2 --steps 1600 --stop-at 750 --eval-every 400 --answers fixed \
   --rope-theta 10000 --init-from $W/stage2_step1050.pt
cp $W/stage3/state.pt $W/stage3_step750.pt
# 4. half the sums and differences with small operands (the one-digit table): 2400 steps
$T --work $W/stage4 --seed 3 --steps 2400 --eval-every 400 --answers fixed --rope-theta 10000 \
   --curriculum 0.5 --init-from $W/stage3_step750.pt
cp $W/stage4/state.pt $W/stage4_step2400.pt
# 5. the same data at half the learning rate: 1400 steps
$T --work $W/stage5 --seed 4 --steps 1400 --lr 1e-3 --warmup 50 --eval-every 700 --answers fixed \
   --rope-theta 10000 --curriculum 0.5 --init-from $W/stage4_step2400.pt

$PY -m convert $W/stage5/hf -o models/tide-demo.gguf --outtype bf16 --name tide-demo
