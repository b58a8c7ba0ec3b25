#!/usr/bin/env bash
# README's noising table: Diffusion-DPO with input perturbation (objective.input_perturbation=0.1, Ning et al. 2023)
# and with offset noise (objective.noise_offset=0.1), diffusers' usual values, against plain DPO in the toy world.
# Same best-vs-worst-of-8 pairs and config as the AI-feedback runs (configs/toy/dpo.yaml: LoRA r8, batch 16, LR
# 5e-4, β 500, 600 steps, seed 0); plain DPO is that script's dpo-judge run (trained here if missing). Nothing is
# chosen: both values are fixed in advance; judged on held-out seeds 0 and fresh seeds 100000 and 1000000. About
# 15 min of training per run (the two run side by side, one core each) and 2 min of judging per model and seed set.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=runs/dpo-noising-toy
BASELINE=runs/ai-feedback-toy/dpo-judge
PAIRS=runs/toy-pairs-k8/pairs.parquet
[ -f $PAIRS ] || $PY -m t2i_align.toy pairs --out runs/toy-pairs-k8 --k 8 --seed 1 --pairing best-worst

train() {  # output_dir overrides...
  local out=$1; shift
  [ -f $out/final/pytorch_lora_weights.safetensors ] || \
    $PY train/train.py --config configs/toy/dpo.yaml output_dir=$out data.path=$PAIRS train.max_steps=600 "$@"
}
train $BASELINE
train $R/dpo-perturb01 objective.input_perturbation=0.1 & first=$!
train $R/dpo-offset01 objective.noise_offset=0.1 & second=$!
wait $first; wait $second  # each run's exit status (a bare wait would hide a failure)
for seed in 0 100000 1000000; do  # 1000000 added in session 22: no pair's noise
  $PY benchmarks/toy_table.py --model dpo-perturb01=$R/dpo-perturb01/final --model dpo-offset01=$R/dpo-offset01/final \
    --model dpo=$BASELINE/final --baseline base --baseline dpo --seed $seed --out $R/table-seed$seed.json
done
