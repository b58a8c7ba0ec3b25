#!/usr/bin/env bash
# README's AI-feedback toy table: Diffusion-DPO on the best-vs-worst-of-8 toy pairs with the judge's labels (the
# ground truth, standing in for people) against DPO on the same pairs relabelled by toy-clip, a learned reward
# (`python -m t2i_align.data relabel`, Diffusion-DPO's --choice_model computed once); same config (LoRA r8, batch
# 16, LR 5e-4, 600 steps, seed 0). Judged on held-out seeds 0, fresh seeds 100000 and 1000000 (nothing was chosen:
# both runs take configs/toy/dpo.yaml with only the steps and data set here). About an hour on one idle 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=runs/ai-feedback-toy
PAIRS=runs/toy-pairs-k8/pairs.parquet
[ -f $PAIRS ] || $PY -m t2i_align.toy pairs --out runs/toy-pairs-k8 --k 8 --seed 1 --pairing best-worst
$PY -m t2i_align.data relabel --pairs $PAIRS --reward toy-clip --out $R/pairs-toy-clip --overwrite

train() {  # name data
  $PY train/train.py --config configs/toy/dpo.yaml output_dir=$R/$1 data.path=$2 train.max_steps=600
}
train dpo-judge $PAIRS
train dpo-toy-clip $R/pairs-toy-clip

for seed in 0 100000 1000000; do  # 1000000 added in session 22: no pair's noise
  $PY benchmarks/toy_table.py --model dpo-judge=$R/dpo-judge/final --model dpo-toy-clip=$R/dpo-toy-clip/final \
    --baseline base --baseline dpo-judge --seed $seed --out $R/table-seed$seed.json
done
