#!/usr/bin/env bash
# Does pooling pair sets make toy DPO's gain hold? benchmarks/dpo_pair_sets_toy_runs.sh found that the recipe
# (configs/toy/dpo.yaml, 600 steps) gains on two of five 300-pair sets and not on three. Here the five sets are
# pooled (1,500 pairs, one folder of five parquet files) and trained with the same recipe and number of steps
# (so each pair is seen a fifth as often), at training seed 0; judged against the base on the 60 held-out prompts
# x 8 seeds at seed 0 and at fresh seeds 100000, as the single sets were. Nothing here chooses a setting. Reuses
# the pair sets of the other script if they are there (about 4 min per pair set, 4 min of training, 1.5 min per
# judged model on the idle 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=runs/dpo-pair-sets
mkdir -p $R/pooled
for pseed in 500000 2000000 3000000 4000000 5000000; do
  pairs=$R/pairs-$pseed/pairs.parquet
  [ -f $pairs ] || $PY -m t2i_align.toy pairs --out $R/pairs-$pseed --k 8 --seed $pseed --pairing best-worst
  cp -n $pairs $R/pooled/pairs-$pseed.parquet
done
out=$R/pooled-t0
[ -f $out/final/pytorch_lora_weights.safetensors ] || \
  $PY train/train.py --config configs/toy/dpo.yaml data.path=$R/pooled train.max_steps=600 seed=0 output_dir=$out
for seed in 0 100000; do
  $PY benchmarks/toy_table.py --model pooled-t0=$out/final --baseline base --seed $seed --out $R/pooled-table-seed$seed.json
done
# what the judge reads of the base's and the pooled model's samples (a bias towards common values? a colour loss
# the judge's edge pixels make?)
$PY benchmarks/toy_predictions.py --model pooled=$out/final --seed 0 --out $R/predictions-seed0.json
