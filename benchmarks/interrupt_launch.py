"""Ctrl-C under `accelerate launch`: how often a toy DPO run ends with its resume line, and what it leaves.

Each trial launches a toy LoRA DPO run (32 px, a checkpoint every step, so a Ctrl-C often lands in a checkpoint
write), sends SIGINT to the launch's whole process group after DELAY seconds (as a terminal's Ctrl-C does), and
reports the exit code, whether "stopped (Ctrl-C). The newest complete checkpoint is ..." was printed, and what
checkpoints/ holds (a `.step-N.tmp` is a half-written one). accelerate's one-process launcher sends SIGTERM to the
run right after the Ctrl-C, torchrun's agent (--processes 2) SIGINT again: see `t2i_align.errors._stop_once`.

    python benchmarks/interrupt_launch.py --processes 1 --delays 15.3 15.6 15.9 16.2 --out benchmarks/results/x.json

About 20 s per trial on 2 CPU cores (the delays must cover the launch and model load, ~10-15 s here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]


def _pairs(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_rendered_pairs

    return write_rendered_pairs(folder / "pairs.parquet", n=16)


def trial(delay: float, processes: int, pairs: Path, out: Path) -> dict:
    """One launch, Ctrl-C'd after `delay` seconds: its exit, resume line and checkpoints."""
    shutil.rmtree(out, ignore_errors=True)
    launch = ["--num_processes", "1"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "train/train.py", "--config",
           "configs/toy/dpo.yaml", "model.pretrained=toy", f"data.path={pairs}", f"output_dir={out}",
           "train.max_steps=100000", "train.checkpoint_every=1", "tracking.wandb=off", "train.batch_size=2",
           "data.resolution=32"]
    log = out.with_suffix(".log")
    with open(log, "wb") as sink:  # SIGINT at its default: a background shell's launch would ignore it
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = "hung"
    time.sleep(1)
    left = subprocess.run(["pkill", "-9", "-f", f"output_dir={out}"]).returncode == 0  # a process outliving it
    text = log.read_bytes().decode(errors="replace")
    held = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    return {"delay_s": delay, "exit": code, "resume_line": "stopped (Ctrl-C). The newest complete checkpoint" in text,
            "traceback": "Traceback" in text, "process_left": left, "checkpoints": held}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=1, help="processes of the launch (1: no torchrun)")
    p.add_argument("--delays", type=float, nargs="+", default=[15.3, 15.6, 15.9, 16.2],
                   help="seconds from the launch to each trial's Ctrl-C")
    p.add_argument("--out", help="write the trials as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = _pairs(Path(tmp))
        trials = [trial(d, args.processes, pairs, Path(tmp) / f"run-{i}")
                  for i, d in enumerate(tqdm(args.delays, desc="Ctrl-C trials", file=sys.stderr))]
    result = {"processes": args.processes, "trials": trials,
              "resume_lines": f"{sum(t['resume_line'] for t in trials)} of {len(trials)}"}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
