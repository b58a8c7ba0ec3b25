"""The GPU benchmark scripts' --smoke modes: every code path on tiny models on this CPU.

A GPU is lent rarely and for 15 minutes (benchmarks/gpu_session.sh); a script that broke since it was written
would waste that time, so each runs here in the suite. Their numbers are not checked, only that every row ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, script: str, *args: str) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_loop_end_to_end_smoke(tmp_path):
    runs = run_script(tmp_path, "gpu_loop_e2e.py")["runs"]
    assert len(runs) == 5
    for run in runs:
        assert run["ok"], run
        assert run["export"].startswith("yes"), run
        assert run["s_per_step"] > 0


def test_throughput_smoke_counts_flops_and_fills_every_row(tmp_path):
    results = run_script(tmp_path, "gpu_throughput.py", "--parts", "sd15-lora,sd15-full,sdxl-lora")
    rows = results["train"]
    assert [r["part"] for r in rows] == ["sd15-lora"] * 2 + ["sd15-full"] * 2 + ["sdxl-lora"] * 4
    for row in rows:
        assert "error" not in row, row
        assert row["pairs_per_s"] > 0 and "mfu" in row, row
    flops = results["flops"]
    assert set(flops) == {"sd15/dpo_lora.yaml", "sd15/dpo_full.yaml", "sdxl/dpo_lora.yaml"}
    # One DPO step = reference forward (2 latents per pair) + policy forward and backward: about 6-8 forwards.
    assert all(5 < f["step_over_fwd"] < 9 for f in flops.values()), flops
    assert flops["sd15/dpo_full.yaml"]["step_flops_per_pair"] > flops["sd15/dpo_lora.yaml"]["step_flops_per_pair"]


def test_sd15_step_and_generation_smoke(tmp_path):
    results = run_script(tmp_path, "gpu_sd15.py")
    assert len(results["train"]) == 4 and [r["caller"] for r in results["generate"]] == ["generate", "pipeline"]
    assert all("error" not in r for r in results["train"] + results["generate"])


def test_reward_throughput_smoke(tmp_path):
    models = ["vit-h-14", "pickscore", "imagereward"]
    rows = run_script(tmp_path, "reward_throughput.py", "--models", ",".join(models), "--images", "8",
                      "--batch-size", "4")
    assert [r["model"] for r in rows] == models
    assert all("error" not in r and r["speed_up"] > 0 for r in rows), rows
