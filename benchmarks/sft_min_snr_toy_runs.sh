#!/usr/bin/env bash
# README's min-SNR-γ row: SFT with objective.snr_gamma=5 (diffusers' usual value, fixed in advance: nothing is
# chosen) against plain SFT in the toy world, on the same best-vs-worst-of-8 pairs as the SePPO and noising tables
# (configs/toy/sft.yaml: LoRA r8, batch 16, LR 5e-4, 600 steps, training seed 0), judged on held-out seeds 0 and
# fresh seeds 100000. The two runs train side by side (one core each, ~15 min on the 2-core CPU), then ~2 min of
# judging per model and seed set.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=runs/sft-min-snr-toy
PAIRS=runs/toy-pairs-k8/pairs.parquet
[ -f $PAIRS ] || $PY -m t2i_align.toy pairs --out runs/toy-pairs-k8 --k 8 --seed 1 --pairing best-worst

train() {  # output_dir overrides...
  local out=$1; shift
  [ -f $out/final/pytorch_lora_weights.safetensors ] || \
    $PY train/train.py --config configs/toy/sft.yaml output_dir=$out data.path=$PAIRS train.max_steps=600 "$@"
}
train $R/sft & first=$!
train $R/sft-snr5 objective.snr_gamma=5 & second=$!
wait $first; wait $second  # each run's exit status (a bare wait would hide a failure)
for seed in 0 100000; do
  $PY benchmarks/toy_table.py --model sft-snr5=$R/sft-snr5/final --model sft=$R/sft/final \
    --baseline base --baseline sft --seed $seed --out $R/table-seed$seed.json
done
