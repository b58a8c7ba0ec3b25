"""The loop under accelerate's engines on GPUs, launched as users launch it (issue 14's scale-out).

Each engine trains the same run: full Diffusion-DPO of an SD1.5-layout pipeline at tiny widths (gpu_sd15.py's
--smoke model: the engines' code paths do not depend on the widths) in bf16, 2 pairs per process, 4 steps, a
checkpoint every 2; then that run again, resumed from its step-2 checkpoint in a new folder. The engines:
`plain` (no engine: one process, or configs/accelerate/ddp.yaml over several), `fsdp` (configs/accelerate/fsdp.yaml:
FSDP2, sharded checkpoints) and `deepspeed` (configs/accelerate/deepspeed_zero2.yaml; skipped when deepspeed is not
installed). On one GPU the engines run as one process: their preparation, mixed precision, checkpoint files and
resume run, but nothing is sharded across processes.

Checked, per engine: every launch exits 0, 4 finite losses are logged, and the resumed run's first step (3: the
checkpoint's weights, optimizer, data position and random state) logs the uninterrupted run's loss (to 1e-3).
Read, not checked (bf16 engines cast at other places than autocast does, GPU kernels sum in varying order): the
resumed step 4 against the uninterrupted one, the losses against `plain`'s step by step (the largest relative
difference), and the exported UNet against `plain`'s: ||engine - plain|| / ||plain - base|| (how far they ended
apart, against how far training moved the weights). In this random model, whose gradient norms are in the hundreds
(clipped to 1), a difference in rounding grows about tenfold a step: fp32 FSDP against DDP on two CPU processes
(session 42) ended 6.5e-4 apart after one step (3e-5 with train.adam_epsilon=1e-2, where the update follows the
clipped gradient's size: the same clipping), 6.6e-3 after two and 0.29 after four, their losses 1.7e-2 apart at the
fourth.

    python benchmarks/gpu_engines.py [--processes N] [--json out.json]   # on GPUs; N: default all visible
    OMP_NUM_THREADS=1 python benchmarks/gpu_engines.py --smoke             # CPU: 2 gloo processes

--smoke runs every engine on two CPU processes through tests/multiprocess_train.py, which lifts accelerate's
GPU-only gates for FSDP and DeepSpeed as tests/test_fsdp.py and tests/test_deepspeed.py do. JSON goes to --json
(default $OUT/gpu_engines.json), rewritten after each engine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_loop_e2e import write_pairs  # noqa: E402  (this folder is on sys.path when run as a script)
from gpu_sd15 import build_folder  # noqa: E402
from t2i_align.files import write_json_atomic  # noqa: E402

UNET = "unet/diffusion_pytorch_model.safetensors"
CONFIGS = {"plain": None, "fsdp": ROOT / "configs/accelerate/fsdp.yaml",
           "deepspeed": ROOT / "configs/accelerate/deepspeed_zero2.yaml"}
CPU_ENV = {"plain": {"ACCELERATE_USE_CPU": "1"}, "fsdp": {"ACCELERATE_USE_CPU": "1", "T2I_TEST_FSDP_ON_CPU": "1"},
           "deepspeed": {"DS_ACCELERATOR": "cpu", "T2I_TEST_DEEPSPEED_ON_CPU": "1"}}
RESUME_LIMIT = 1e-3
DS_SITE = os.environ.get("T2I_DEEPSPEED_SITE")  # a folder holding deepspeed, for its runs only


def run_args(folder: Path, data: Path, smoke: bool) -> list:
    precision = "no" if smoke else "bf16"  # accelerate does not autocast bf16 on CPU processes here
    return [f"model.pretrained={folder}", f"data.path={data}", "data.resolution=64", "lora.enabled=false",
            "model.gradient_checkpointing=false", f"train.mixed_precision={precision}",
            f"model.weight_dtype={'fp32' if smoke else 'bf16'}", "train.batch_size=2", "train.grad_accum=1",
            "train.max_steps=4", "train.checkpoint_every=2", "train.learning_rate=1e-4", "train.scale_lr=false",
            "train.lr_warmup_steps=0", "train.log_every=1", "objective.beta=100", "data.prompt_dropout=0",
            "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1"]


def launch(engine: str, processes: int, smoke: bool, args: list) -> tuple:
    """(exit code, seconds, the output's tail) of one `accelerate launch`."""
    script = ROOT / ("tests/multiprocess_train.py" if smoke else "train/train.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    config = CONFIGS[engine] or (ROOT / "configs/accelerate/ddp.yaml" if processes > 1 else None)
    if config is not None:
        command += ["--config_file", str(config)]
    env = {**os.environ, **(CPU_ENV[engine] if smoke else {})}
    # the checkout, which the device machine does not install (session 42's first try: every launch failed on
    # `import t2i_align`), and DeepSpeed installed apart by gpu_session.sh, so that no other run imports it
    paths = [str(ROOT), DS_SITE if engine == "deepspeed" else None, env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    start = time.perf_counter()
    try:
        done = subprocess.run([*command, str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired as err:
        return "timeout", round(time.perf_counter() - start, 1), str(err.stderr or err.stdout or "")[-1500:]
    return done.returncode, round(time.perf_counter() - start, 1), (done.stdout + done.stderr)[-1500:]


def losses(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return {int(m["step"]): float(m["loss"]) for m in map(json.loads, lines) if "loss" in m}


def largest_relative(a: dict, b: dict) -> float | None:
    steps = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps) if steps else None


def distance(run: Path, plain: Path, base: Path) -> float | None:
    """||run - plain|| / ||plain - base|| over the exported UNet's tensors."""
    from safetensors.torch import load_file

    files = [p / ("final/" + UNET if p != base else UNET) for p in (run, plain, base)]
    if not all(f.is_file() for f in files):
        return None
    a, b, o = (load_file(f) for f in files)
    apart = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    moved = sum(float((b[k].double() - o[k].double()).pow(2).sum()) for k in b) ** 0.5
    return apart / moved


def engine_row(engine: str, tmp: Path, common: list, processes: int, smoke: bool, base: Path) -> dict:
    run, resumed = tmp / engine, tmp / f"{engine}-resumed"
    row = {"engine": engine, "processes": processes}
    row["exit"], row["wall_s"], tail = launch(engine, processes, smoke, [*common, f"output_dir={run}"])
    row["losses"] = losses(run)
    if row["exit"] == 0:
        code, row["resume_wall_s"], tail = launch(engine, processes, smoke, [
            *common, f"output_dir={resumed}", f"train.resume={run / 'checkpoints' / 'step-2'}"])
        # a run resumed from another folder copies the checkpoint's logged steps: only its own are compared
        row["resume_exit"], row["resumed_losses"] = code, {s: v for s, v in losses(resumed).items() if s > 2}
        row["resume_vs_uninterrupted"] = largest_relative(row["resumed_losses"], row["losses"])
        step3 = row["resumed_losses"].get(3)
        row["resumed_step3_vs_uninterrupted"] = None if step3 is None else largest_relative({3: step3}, row["losses"])
    plain = tmp / "plain"
    if engine != "plain":
        row["loss_vs_plain"] = largest_relative(row["losses"], losses(plain))
        row["export_vs_plain"] = distance(run, plain, base)
    row["ok"] = (row["exit"] == 0 and row.get("resume_exit") == 0 and len(row["losses"]) == 4
                 and all(map(math.isfinite, row["losses"].values())) and sorted(row["resumed_losses"]) == [3, 4]
                 and row["resumed_step3_vs_uninterrupted"] <= RESUME_LIMIT)
    if not row["ok"]:
        row["output_tail"] = tail
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=None, help="default: every visible GPU (--smoke: 2)")
    p.add_argument("--smoke", action="store_true", help="two CPU processes over gloo, the test gates lifted")
    p.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_engines.json")
    args = p.parse_args()
    processes = args.processes or (2 if args.smoke else max(torch.cuda.device_count(), 1))
    meta = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "processes": processes, "smoke": args.smoke}
    result = {"meta": meta, "rows": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = build_folder(tmp / "model", smoke=True)
        common = run_args(base, write_pairs(tmp / "pairs.parquet", n=8 * processes, px=64), args.smoke)
        for engine in CONFIGS:
            if engine == "deepspeed" and not _has_deepspeed():
                result["rows"].append({"engine": engine, "ok": None, "skipped": "deepspeed is not installed"})
                continue
            row = engine_row(engine, tmp, common, processes, args.smoke, base)
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("output_tail", "losses", "resumed_losses")}),
                  flush=True)
            write_json_atomic(args.json, result)
    write_json_atomic(args.json, result)
    sys.exit(0 if all(r["ok"] is not False for r in result["rows"]) else 1)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None or bool(DS_SITE and Path(DS_SITE, "deepspeed").is_dir())


if __name__ == "__main__":
    main()
