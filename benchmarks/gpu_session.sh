#!/usr/bin/env bash
# Issue 14's GPU measurements, prepared for a session that is lent the H200 (15 minutes of device time in all,
# at most 10 per command). Results are JSON under $OUT (copy them to benchmarks/results/), logs beside them.
#
#   here, once:        benchmarks/gpu_session.sh wheels        # .whl/: what the device image lacks (diffusers,
#                                                              # open_clip_torch, ftfy, wcwidth, omegaconf), git-ignored
#   on the device:     run(command="bash benchmarks/gpu_session.sh run e2e sd15", carry=[".whl"], timeout_s=590)
#
# Parts, in priority order, with ESTIMATED minutes on an H200 (none measured yet; the machine's start is extra):
#   e2e        benchmarks/gpu_loop_e2e.py: every loop path on a GPU, exports reloaded in diffusers     3-5
#   sd15       gpu_throughput.py sd15-lora + sd15-lever: pairs/s, peak memory, MFU, each lever          6-8
#   rest       gpu_throughput.py sd15-full + sdxl-lora                                                  4-6
#   gen        gpu_sd15.py --only gen: generate() vs a plain pipeline() call                            1-2
#   score      reward_throughput.py: t2i-score batched vs one at a time, fp32 then bf16                 2-4
# Each part runs under `timeout` (PART_S seconds, default 540) and writes its JSON as it goes, so a part cut
# short keeps its finished rows. Two parts fit one command only when their estimates add up to under ~9 min.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 omegaconf==2.4.0)

wheels() {
  mkdir -p .whl  # git-ignored (.gitignore), so it travels to the device only when `carry` names it
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
}

part() {  # part NAME COMMAND...: one measurement under a time limit, its log under $OUT
  local name=$1; shift
  echo "=== $name: $*"
  PYTHONUNBUFFERED=1 timeout "${PART_S:-540}" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v 'it/s]$'
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, accelerate, peft, open_clip; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" || exit 1
  for name in "$@"; do
    case $name in
      e2e) part e2e python3 benchmarks/gpu_loop_e2e.py ;;
      sd15) part sd15 python3 benchmarks/gpu_throughput.py --parts sd15-lora,sd15-lever \
              --json "$OUT/gpu_throughput_sd15.json" --budget-s $(( ${PART_S:-540} - 30 )) ;;
      rest) part rest python3 benchmarks/gpu_throughput.py --parts sd15-full,sdxl-lora \
              --json "$OUT/gpu_throughput_rest.json" --budget-s $(( ${PART_S:-540} - 30 )) ;;
      gen) part gen python3 benchmarks/gpu_sd15.py --only gen --json "$OUT/gpu_generate.json" ;;
      score) part score python3 benchmarks/reward_throughput.py --device cuda --models vit-h-14,pickscore,imagereward \
               --images 256 --batch-size 64 --json "$OUT/reward_throughput_fp32.json"
             part score_bf16 python3 benchmarks/reward_throughput.py --device cuda --dtype bf16 \
               --models vit-h-14,pickscore,imagereward --images 256 --batch-size 64 \
               --json "$OUT/reward_throughput_bf16.json" ;;
      *) echo "unknown part $name: use e2e, sd15, rest, gen, score"; exit 2 ;;
    esac
  done
}

case ${1:-} in
  wheels) wheels ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 wheels | run PART... (e2e sd15 rest gen score)"; exit 2 ;;
esac
