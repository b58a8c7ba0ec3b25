"""The GPU benchmark scripts' --smoke modes: every code path on tiny models on this CPU.

A GPU is lent rarely and for 15 minutes (benchmarks/gpu_session.sh); a script that broke since it was written
would waste that time, so each runs here (under `-m slow`, about 3 minutes: the scripts are for GPU sessions;
run `pytest -m slow tests/test_gpu_scripts.py` before one). Their numbers are not checked, only that every row ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

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
        assert run["export"].startswith("yes") and "vs base" in run["export"], run  # reloads, and trained
        assert run["s_per_step"] > 0


def test_throughput_smoke_counts_flops_and_fills_every_row(tmp_path):
    """Every part but sd15-compile (inductor takes minutes on a CPU; the compiled loop itself is tested in
    test_speed_levers.py). On a CPU two pinned SDPA kernels cannot run: their rows hold the error that names the
    setting; sdpa-cudnn is the lever part's last row (a hard CUDA error there would poison later rows)."""
    results = run_script(tmp_path, "gpu_throughput.py", "--parts", "sd15-lora,sd15-full,sdxl-lora,sd15-lever")
    rows = results["train"]
    assert [r["part"] for r in rows] == ["sd15-lora"] * 2 + ["sd15-full"] + ["sdxl-lora"] * 2 + ["sd15-lever"] * 11
    assert rows[-1]["row"] == "sdpa-cudnn"
    assert [r["row"] for r in rows if r["row"].startswith("full:")] == ["full: baseline", "full: adamw_fused",
                                                                           "full: frozen fp32"]
    for row in rows:
        if row["row"] in ("sdpa-efficient", "sdpa-cudnn"):
            assert "model.attention=" + row["row"] in row["error"], row
            continue
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


def test_step_flops_grow_linearly_with_the_micro_batch(tmp_path, monkeypatch):
    """MFU scales the FLOPs counted at micro-batch 1 by the micro-batch: true when every counted op runs per sample,
    as here (DPO with LoRA, tiny SD1.5 layout)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # the script blocks wandb on import; undone after this test
    import gpu_throughput as g

    folder = g.build_folder(tmp_path, smoke=True)
    data = g.write_pairs(tmp_path / "pairs.parquet", 8, 64)
    args = g.overrides(folder, data, tmp_path / "cache", 64, 1, 2, smoke=True)
    one, two = (g.step_flops("sd15/dpo_lora.yaml", args, g.torch.device("cpu"), 64, pairs=p)["step_flops_per_pair"]
                for p in (1, 2))
    assert one > 0 and two == one


def test_step_profile_smoke(tmp_path):
    """The GPU session's `profile` part: a profiled step's summary (on a CPU no kernels and no launches)."""
    rows = run_script(tmp_path, "step_profile.py")["rows"]
    assert [r["pairs"] for r in rows] == [1]
    assert rows[0]["wall_s"] > 0 and rows[0]["top_host_ms"] and rows[0]["launches"] == 0



def test_step_host_times_every_switch(tmp_path):
    """benchmarks/step_host.py (CPU only, no --smoke): each way of switching to the base model is timed, on the
    LoRA UNet and with PPD's user branch added."""
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_host.py"), "--steps", "2", "--json",
                           str(out)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    lora, ppd = result["switches"]["lora"], result["switches"]["lora+user_branch"]
    assert result["meta"]["step_ms"] > 0 and lora["lora_layers"] == ppd["lora_layers"] == 128
    assert "user_branch_off_ms" in ppd and "user_branch_off_ms" not in lora and ppd["modules"] > lora["modules"]


def test_engines_smoke_trains_resumes_and_compares_every_engine(tmp_path):
    """FSDP and DeepSpeed on two CPU processes (about 1.5 minutes), each against DDP, each resumed from step 2."""
    rows = run_script(tmp_path, "gpu_engines.py")["rows"]
    assert [r["engine"] for r in rows] == ["plain", "fsdp", "deepspeed"]
    for row in rows:
        if row.get("skipped"):  # deepspeed: the dev extra installs it
            continue
        assert row["ok"], row
        assert sorted(row["losses"]) == ["1", "2", "3", "4"] and sorted(row["resumed_losses"]) == ["3", "4"], row
        assert row["resume_vs_uninterrupted"] <= 1e-3
    assert rows[1]["loss_vs_plain"] <= 5e-2 and rows[1]["export_vs_plain"] is not None
