#!/usr/bin/env bash
# Issue 14's GPU measurements, prepared for a session that is lent the H200 (15 minutes of device time in all,
# at most 10 per command). Results are JSON under $OUT (copy them to benchmarks/results/), logs beside them.
#
#   here, once:     benchmarks/gpu_session.sh wheels     # .whl/ (git-ignored): what the device image lacks,
#                                                        # diffusers, open_clip_torch, ftfy, wcwidth, omegaconf
#   here, before:   pytest -m slow tests/test_gpu_scripts.py   # every script's --smoke mode (about 3 minutes)
#   on the device:  run(command="bash benchmarks/gpu_session.sh run sd15 gen", carry=[".whl"], timeout_s=600)
#
# Parts, in priority order, with ESTIMATED minutes on an H200 (none measured yet; the machine's start is extra):
#   e2e        benchmarks/gpu_loop_e2e.py: every loop path on a GPU, exports reloaded in diffusers     3-5
#   sd15       gpu_throughput.py sd15-lora + sd15-lever: pairs/s, peak memory, MFU, each lever          6-8
#   rest       gpu_throughput.py sd15-full + sdxl-lora                                                  4-6
#   gen        gpu_sd15.py --only gen: generate() vs a plain pipeline() call                            1-2
#   score      reward_throughput.py: t2i-score batched vs one at a time, fp32 then bf16                 2-4
# One deadline for the whole command (TOTAL_S seconds, default 560, under the tool's 600 s limit): each part
# runs under `timeout` with what is left, the throughput parts skip rows that would end after it, and every
# script writes its JSON as it goes, so a part cut short keeps its finished rows. Start with the part that
# matters most; a later part gets only what the earlier ones left.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 omegaconf==2.4.0)

wheels() {
  mkdir -p .whl  # git-ignored (.gitignore), so it travels to the device only when `carry` names it
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
}

left() { echo $(( DEADLINE - SECONDS )); }

part() {  # part NAME COMMAND...: one measurement within the deadline; its log under $OUT, progress bars left out
  local name=$1; shift
  if [ "$(left)" -lt 30 ]; then echo "=== $name: skipped, deadline reached"; return; fi
  echo "=== $name ($(left) s left): $*"
  PYTHONUNBUFFERED=1 timeout "$(left)" "$@" 2>&1 | tee "$OUT/$name.log" | tr '\r' '\n' | grep -v -E '(it/s|s/it)'
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  DEADLINE=$(( SECONDS + ${TOTAL_S:-560} ))
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
              --json "$OUT/gpu_throughput_sd15.json" --budget-s $(( $(left) - 20 )) ;;
      rest) part rest python3 benchmarks/gpu_throughput.py --parts sd15-full,sdxl-lora \
              --json "$OUT/gpu_throughput_rest.json" --budget-s $(( $(left) - 20 )) ;;
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
