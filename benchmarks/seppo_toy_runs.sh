#!/usr/bin/env bash
# The runs behind README's SePPO toy table (seed 0 for training; judged on held-out seeds 0 and fresh seeds 100000).
# All from the same best-vs-worst-of-8 toy pairs, LoRA r8, batch 16, LR 5e-4, 600 steps; SePPO reads only the
# preferred images. About 3 h on one idle 2-core CPU (each SePPO run ~25 min with one thread, two side by side;
# ~45 min with 20 sampling steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=runs/seppo-toy
PAIRS=runs/toy-pairs-k8/pairs.parquet
[ -f $PAIRS ] || $PY -m t2i_align.toy pairs --out runs/toy-pairs-k8 --k 8 --seed 1 --pairing best-worst

train() {  # name config overrides...
  local name=$1 config=$2; shift 2
  $PY train/train.py --config $config output_dir=$R/$name data.path=$PAIRS train.max_steps=600 "$@"
}
# Session 7's pilot (README: 300 steps, SePPO 0.551 vs SFT 0.558 at seed 0) and the flipper against the judge on it.
# The later max_steps wins. Written down here in session 17 from the pilot's README commands.
train sft-300 configs/toy/sft.yaml train.max_steps=300
train seppo-300 configs/toy/seppo.yaml train.max_steps=300
$PY benchmarks/toy_table.py --model sft=$R/sft-300/final --model seppo=$R/seppo-300/final \
  --baseline base --baseline sft --seed 0 --out $R/table-300-seed0.json
$PY -m t2i_align.toy.flipper --lora $R/seppo-300/final --pairs $PAIRS --n 256

train sft configs/toy/sft.yaml
train dpo configs/toy/dpo.yaml
train seppo configs/toy/seppo.yaml                      # random reference, sign flip
train seppo-off configs/toy/seppo.yaml seppo.flip=off   # "w/o AAF": the reference sample is always the loser
train seppo-indicator configs/toy/seppo.yaml seppo.flip=indicator   # s in {1, 0}: winners-by-flipper dropped
train seppo-initial configs/toy/seppo.yaml seppo.reference=initial  # always the initial model (DITTO-like)
train seppo-latest configs/toy/seppo.yaml seppo.reference=latest    # the newest snapshot (SPIN-like)
train seppo-s20 configs/toy/seppo.yaml seppo.sample_steps=20        # reference samples with the eval's 20 steps

for seed in 0 100000; do
  $PY benchmarks/toy_table.py --model sft=$R/sft/final --model seppo=$R/seppo/final \
    --model seppo-off=$R/seppo-off/final \
    --model seppo-indicator=$R/seppo-indicator/final --model seppo-initial=$R/seppo-initial/final \
    --model seppo-latest=$R/seppo-latest/final --model seppo-s20=$R/seppo-s20/final \
    --model dpo=$R/dpo/final --baseline base --baseline sft --seed $seed --out $R/table-seed$seed.json
done

# Session 9: the flipper-less run anchored on the preferred images (judged at seed 0 only: it tied SFT there).
train seppo-off-sft50 configs/toy/seppo.yaml seppo.flip=off objective.sft_weight=50
$PY benchmarks/toy_table.py --model sft=$R/sft/final --model seppo-off-sft50=$R/seppo-off-sft50/final \
  --baseline base --baseline sft --seed 0 --out $R/table-offsft50-seed0.json
# Session 9: the flipper's d averaged over 4 (eps, t) draws (judged at seed 0 only: worse than SFT there).
train seppo-draws4 configs/toy/seppo.yaml seppo.anchor_draws=4
$PY benchmarks/toy_table.py --model sft=$R/sft/final --model seppo-draws4=$R/seppo-draws4/final \
  --baseline base --baseline sft --seed 0 --out $R/table-draws4-seed0.json
# Session 10: twice the steps (1200) for SFT and SePPO (random reference, sign flip), the next test session 9 named;
# judged at seed 0 (a tie with SFT there, so nothing to confirm at fresh seeds). The later max_steps wins.
train sft-1200 configs/toy/sft.yaml train.max_steps=1200
train seppo-1200 configs/toy/seppo.yaml train.max_steps=1200
$PY benchmarks/toy_table.py --model sft=$R/sft-1200/final --model seppo=$R/seppo-1200/final \
  --model sft600=$R/sft/final --baseline base --baseline sft --seed 0 --out $R/table-1200-seed0.json
# Session 35: the main run again after rows blanked by data.prompt_dropout (10 %) sample their reference image for
# their caption (before, from the blank caption); judged at both seed sets against the same SFT run (copied to
# benchmarks/results/seppo_captioned_table_seed*.json; 39 min on this 2-core CPU with the pairs and SFT).
train seppo-captioned configs/toy/seppo.yaml
for seed in 0 100000; do
  $PY benchmarks/toy_table.py --model sft=$R/sft/final --model seppo-captioned=$R/seppo-captioned/final \
    --baseline base --baseline sft --seed $seed --out $R/table-captioned-seed$seed.json
done
