#!/usr/bin/env bash
# LongAlign's toy claims rerun and judged at seeds that chose nothing and that no earlier judgement used
# (SEED, default 1000000), with the prompt as the unit (`compare`'s per_prompt: the 60 scenes' mean differences).
# The settings are those README's table chose at seed 0 (configs/toy/longalign_*.yaml as shipped): stage 1 for
# 6000 steps, segments and the clip77 control; stage 2 with the toy Denscore and the KL anchor to stage 1.
# Run PART=segments (stage 1, then stage 2) and PART=control (the clip77 stage 1), side by side with
# OMP_NUM_THREADS=1 on a 2-core CPU, then PART=compare (stage 1 vs the control); PART=stage1 is PART=segments without
# stage 2. After a stop, rerun a part: its training runs resume from their newest checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=${R:-runs/longalign-recheck}
SEED=${SEED:-1000000}
mkdir -p $R
judge() {  # judge NAME [judge options...]: the held-out long captions x 8 seeds, with the toy Denscore's reward
  local name=$1; shift
  $PY benchmarks/longalign_toy.py judge --seed $SEED --reward --reward-checkpoint toy-denscore \
    --out $R/${name}_s$SEED.json "$@" > $R/${name}_s$SEED.summary.json
}
stage1() {  # stage1 ENCODING
  [ -f runs/longalign-captions/captions.parquet ] || \
    $PY -m t2i_align.toy captions --out runs/longalign-captions --per-scene 8 --overwrite
  $PY train/train.py --config configs/toy/longalign_stage1.yaml output_dir=$R/s1-$1 model.text_encoding.kind=$1 \
    train.resume=latest
}
segments1() {
  stage1 segments
  judge s1-segments --lora $R/s1-segments/final
}
case ${PART:?set PART=segments, stage1, control or compare} in
  stage1) segments1 ;;
  segments)
    segments1
    $PY train/merge_lora.py --lora $R/s1-segments/final --out $R/s1-segments/merged
    $PY train/train.py --config configs/toy/longalign_reward.yaml output_dir=$R/s2 model.pretrained=$R/s1-segments/merged \
      train.resume=latest
    judge s2 --model $R/s1-segments/merged --lora $R/s2/final
    $PY benchmarks/longalign_toy.py compare $R/s2_s$SEED.json $R/s1-segments_s$SEED.json > $R/s2_vs_s1_s$SEED.json ;;
  control)
    stage1 clip77
    judge s1-clip77 --lora $R/s1-clip77/final --text-encoding clip77 ;;
  compare)
    $PY benchmarks/longalign_toy.py compare $R/s1-segments_s$SEED.json $R/s1-clip77_s$SEED.json \
      > $R/segments_vs_clip77_s$SEED.json ;;
esac
