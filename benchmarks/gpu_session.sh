#!/usr/bin/env bash
# Issue 14's GPU measurements, prepared for a session that is lent the H200: 15 minutes of device time in all (the
# machine's start included: ~40 s in session 42, 1-2 minutes before), at most 600 s per command, at most 8 files
# back from $OUT per command.
#
#   here, once:    benchmarks/gpu_session.sh wheels     # .whl/ (git-ignored): what the device image lacks,
#                  # diffusers, open_clip_torch, ftfy, wcwidth, omegaconf, peft; .whl/ds/: DeepSpeed and its imports
#   here, before:  OMP_NUM_THREADS=1 pytest -q -m slow tests/test_gpu_scripts.py   # every --smoke mode (~3 min)
#   on the device, what is still unmeasured (after session 42: the engines part alone, ~2 minutes with the
#   wheels' install; the machine's start cost ~40 s of device time in session 42):
#     run(command="TOTAL_S=250 bash benchmarks/gpu_session.sh run", carry=[".whl"], timeout_s=290)
#   then, AT ONCE while the machine is warm (it goes back after ~30 s idle: no status call, no reading first; a
#   fresh start costs device time and none starts under 4 minutes left), any part to measure again, e.g.
#     run(command="TOTAL_S=<budget_left_s - 60> bash benchmarks/gpu_session.sh run compile",
#       carry=[".whl"], timeout_s=<TOTAL_S + 50>)
#   In session 38 a second command was refused ("no device machine could be started", then "paused") although
#   the first had just returned with the machine warm: put what matters most in the first command.
#   Copy $OUT's JSON to benchmarks/results/; $OUT/session.log holds every part's full log. A part that failed
#   alone is rerun by naming it: `run rest`.
#
# Parts, each one process, with the seconds it is given (its reserve) and its time on an H200, MEASURED (the
# part's line in session.log to the next, imports and data included; sessions 38 and 42); before the first part
# the wheels' install and the import check took 13-26 s. Default (`run` alone): engines.
#   lora        gpu_throughput.py sd15-lora: LoRA DPO 512 px x1-x32, pairs/s, peak, MFU     reserve 130  took 75
#   e2e         gpu_loop_e2e.py: every loop path, exports reloaded in plain diffusers      reserve 170  took 99
#   rest        gpu_throughput.py sdxl-lora (ckpt x1, x4) + sd15-full (x8)                 reserve 160  took 98
#   profile     step_profile.py: SD1.5 LoRA step x1, x8: GPU busy time, launches, syncs    reserve  80  took 72
#   levers      gpu_throughput.py sd15-lever: each speed lever at x8, sdpa-cudnn last      reserve 180  took 83
#   gen         gpu_sd15.py --only gen: generate() vs a plain pipeline() call              reserve  60  took 41
#   score       reward_throughput.py fp32: t2i-score batched vs one at a time              reserve 120  took 51
#   score-bf16  the same in bf16                                                            reserve  90  took 57
#   compile     gpu_throughput.py sd15-compile: LoRA x8 under inductor (compiles ~2 min)   reserve 300  took 154
#   full-levers gpu_throughput.py sd15-full-lever: full FT x8 baseline, fused AdamW, fp32  reserve  80  took 65
#   engines     gpu_engines.py: plain, FSDP2, DeepSpeed ZeRO-2 launches, each resumed      reserve 200  est. 150
#               (its failed try took 71 s: DeepSpeed's launch alone 38 s before its import error)
# One deadline for the command (TOTAL_S, default 480). In the order given, a part may run its reserve, or longer
# by what the parts after it do not need of what is left; never past the deadline (each under `timeout -k 15`, so
# the kill's grace is counted too). Parts late in a short command are skipped; the throughput parts skip rows
# that would end after their own limit, and every script rewrites its JSON after each row, so a part cut short
# keeps its finished rows. Each part writes one JSON, so a command takes at most 7 parts (8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
# peft: the version tested here, whatever the device image holds (pure Python, 0.5 MB)
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 omegaconf==2.4.0 peft==0.21.2)
# DeepSpeed (the engines part): the version tested here, built as a pure-Python wheel (PyPI has its source only),
# and what it imports that the device image may lack
ENGINE_WHEELS=(hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 ninja==1.13.2 pydantic==2.14.4
               pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 psutil==7.2.2
               typing_extensions==4.16.0)
PARTS=(lora e2e rest profile levers gen score score-bf16 compile full-levers engines)
declare -A RESERVE=([lora]=130 [e2e]=170 [rest]=160 [profile]=80 [levers]=180 [gen]=60 [score]=120 [score-bf16]=90
                    [compile]=300 [full-levers]=80 [engines]=200)
MUST=(engines)  # unmeasured after session 42 (results/*_h200.*)
REWARDS=(--device cuda --models vit-h-14,pickscore,imagereward --images 256 --batch-size 64)

wheels() {
  rm -rf .whl  # only the pinned versions, none left from an earlier pin
  mkdir -p .whl  # git-ignored (.gitignore), so it travels to the device only when `carry` names it
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}" || return 1
  # DeepSpeed apart (.whl/ds/, installed apart and seen by the engines part's DeepSpeed runs only): accelerate
  # imports an installed DeepSpeed in every run, so a DeepSpeed that fails there must not fail the other parts
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl/ds "${ENGINE_WHEELS[@]}" \
    || return 1
  # built with the project's Python, which has torch (DeepSpeed's setup imports it); no ops compiled
  local py=python3
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
  DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl/ds deepspeed==0.19.8 \
    || echo "no DeepSpeed wheel: the engines part will skip DeepSpeed"
}

versions() {  # imports every part needs, in seconds before any part runs (score's open_clip: its own part's),
              # and one line of versions for the results
  python3 - <<'EOF'
import torch, diffusers, accelerate, peft, transformers, huggingface_hub
import t2i_align.loop, reward_models.base
from importlib.metadata import PackageNotFoundError, version


def ver(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


names = ("diffusers", "accelerate", "peft", "transformers", "huggingface_hub", "timm", "open_clip_torch",
         "torchvision")
print("torch", torch.__version__, "cuda", torch.version.cuda, *(f"{n} {ver(n)}" for n in names))
EOF
}

left() { echo $(( DEADLINE - SECONDS )); }

say() { echo "$*" | tee -a "$OUT/session.log"; }

command_of() {  # command_of NAME LIMIT: sets CMD, part NAME's command when it may run LIMIT seconds
  local budget=$(( $2 - 25 ))  # throughput rows stop starting this long before the limit: save, exit, clean-up
  local throughput=(python3 benchmarks/gpu_throughput.py --steps 5 --warmup 2 --budget-s "$budget")
  case $1 in
    lora) CMD=("${throughput[@]}" --parts sd15-lora --json "$OUT/throughput_lora.json") ;;
    e2e) CMD=(python3 benchmarks/gpu_loop_e2e.py --json "$OUT/loop_e2e.json") ;;
    # SDXL first: never measured (sd15-full x8 has a hand-written-step H200 number), and last in line it was the
    # part a short budget skipped after paying its build
    rest) CMD=("${throughput[@]}" --parts sdxl-lora,sd15-full --json "$OUT/throughput_rest.json") ;;
    profile) CMD=(python3 benchmarks/step_profile.py --json "$OUT/step_profile.json") ;;
    levers) CMD=("${throughput[@]}" --parts sd15-lever --json "$OUT/throughput_levers.json") ;;
    gen) CMD=(python3 benchmarks/gpu_sd15.py --only gen --json "$OUT/generate.json") ;;
    score) CMD=(python3 benchmarks/reward_throughput.py "${REWARDS[@]}" --json "$OUT/reward_fp32.json") ;;
    score-bf16) CMD=(python3 benchmarks/reward_throughput.py "${REWARDS[@]}" --dtype bf16 \
                       --json "$OUT/reward_bf16.json") ;;
    # warm-up 3: the first steps compile (the median of the timed ones must not see it)
    compile) CMD=(python3 benchmarks/gpu_throughput.py --steps 5 --warmup 3 --budget-s "$budget" \
                    --parts sd15-compile --json "$OUT/throughput_compile.json") ;;
    full-levers) CMD=("${throughput[@]}" --parts sd15-full-lever --json "$OUT/throughput_full_levers.json") ;;
    engines) CMD=(python3 benchmarks/gpu_engines.py --json "$OUT/gpu_engines.json") ;;
  esac
}

part() {  # part NAME LATER: one part, leaving LATER seconds (the later parts' reserves) when it can
  local name=$1 later=$2 limit
  limit=$(( $(left) - 15 - later ))
  if [ "$limit" -lt "${RESERVE[$name]}" ]; then limit=${RESERVE[$name]}; fi
  if [ "$limit" -gt $(( $(left) - 15 )) ]; then limit=$(( $(left) - 15 )); fi
  if [ "$limit" -lt 40 ]; then say "=== $name: skipped, $(left) s left"; return; fi
  command_of "$name" "$limit"
  say "=== $name (may run $limit s of $(left) s left): ${CMD[*]}"
  # the full log (progress bars too) appended to session.log; the tool's output without the bars
  PYTHONUNBUFFERED=1 timeout -k 15 "$limit" "${CMD[@]}" 2>&1 | tee -a "$OUT/session.log" | tr '\r' '\n' \
    | grep --line-buffered -v -E '(it/s|s/it)'
  say "=== $name: exit ${PIPESTATUS[0]} ($(left) s left)"
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  DEADLINE=$(( SECONDS + ${TOTAL_S:-480} ))
  local parts=("$@") i name later
  if [ ${#parts[@]} -eq 0 ]; then parts=("${MUST[@]}"); fi
  for name in "${parts[@]}"; do
    if [ -z "${RESERVE[$name]:-}" ]; then echo "unknown part $name: use ${PARTS[*]}"; exit 2; fi
  done
  if [ ${#parts[@]} -gt 7 ]; then echo "at most 7 parts a command (one JSON each, 8 files come back)"; exit 2; fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing outside the machine answers
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  if [ -d .whl/ds ]; then  # gpu_engines.py puts it on the DeepSpeed runs' path only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-ds \
      .whl/ds/*.whl && export T2I_DEEPSPEED_SITE=/tmp/site-ds
  fi
  say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  versions 2>&1 | tee -a "$OUT/session.log"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then say "=== imports failed: nothing run"; exit 1; fi
  for i in "${!parts[@]}"; do
    later=0
    for name in "${parts[@]:i+1}"; do later=$(( later + RESERVE[$name] )); done
    part "${parts[i]}" "$later"
  done
  say "=== done, $(left) s of ${TOTAL_S:-480} left"
}

case ${1:-} in
  wheels) wheels ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 wheels | run [PART...]   (parts: ${PARTS[*]}; none: ${MUST[*]})"; exit 2 ;;
esac
