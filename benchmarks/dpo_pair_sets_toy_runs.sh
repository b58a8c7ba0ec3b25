#!/usr/bin/env bash
# How often does toy DPO's gain hold? One recipe (configs/toy/dpo.yaml: best-vs-worst-of-8 pairs, LoRA r8, β 500,
# 600 steps), five pair sets that share no noise with the judged images (pair seeds 500000 — the demo's —, 2000000,
# 3000000, 4000000, 5000000 (since session 28); image k of prompt i starts from seed + 10000k + i), each trained at
# seed 0, and the first two also at training seeds 1 and 2, so a failure can be told apart as the pairs' or the
# training run's. Every model
# is judged against the base on the 60 held-out prompts x 8 seeds at seed 0 (benchmarks/toy_table.py), and since
# session 28 at fresh seeds 100000 too; nothing here chooses a setting. About 4 min per pair set, 4 min per
# training, 1.5 min per judged model on the idle 2-core CPU (session 27: 2 h 20 min in all, the machine shared with
# test runs; session 28: the fifth pair set, the fresh-seed judging and every model judged again, its cache keyed
# anew).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=runs/dpo-pair-sets
MODELS=()
for pseed in 500000 2000000 3000000 4000000 5000000; do
  pairs=$R/pairs-$pseed/pairs.parquet
  [ -f $pairs ] || $PY -m t2i_align.toy pairs --out $R/pairs-$pseed --k 8 --seed $pseed --pairing best-worst
  tseeds="0"; [ $pseed -le 2000000 ] && tseeds="0 1 2"
  for tseed in $tseeds; do
    out=$R/p$pseed-t$tseed
    [ -f $out/final/pytorch_lora_weights.safetensors ] || \
      $PY train/train.py --config configs/toy/dpo.yaml data.path=$pairs train.max_steps=600 seed=$tseed output_dir=$out
    MODELS+=(--model "p$pseed-t$tseed=$out/final")
  done
done
$PY benchmarks/toy_table.py "${MODELS[@]}" --baseline base --seed 0 --out $R/table-seed0.json
# Session 28: the same models at fresh seeds (100000), which chose nothing, and what the judge says of each pair set's
# winners and losers (benchmarks/dpo_pair_sets_stats.py, seconds) beside its gain.
$PY benchmarks/toy_table.py "${MODELS[@]}" --baseline base --seed 100000 --out $R/table-seed100000.json
$PY benchmarks/dpo_pair_sets_stats.py --pairs-root $R --table $R/table-seed0.json --out $R/pair-set-stats.json
