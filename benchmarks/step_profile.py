"""Where the time of a small DPO step goes on a GPU: host or device (issue 14's levers).

On an H200 the loop's SD1.5 LoRA step took the same ~0.25 s at 1, 4 and 8 pairs (results/
gpu_throughput_sd15_lora_h200.json); benchmarks/step_ops.py counts 3,442 kernel-launching ATen operations in it.
This script measures where the time goes (session 42 on the H200: results/step_profile_h200.json, README):
the SD1.5 random-weight pipeline (gpu_sd15.build_folder), configs/sd15/dpo_lora.yaml's step (compute_loss,
backward, AdamW; step_flops.prepared_step, the model loaded as the loop loads it) at micro-batch 1 and 8, bf16
autocast. Per row: wall time per step (median of --steps after 3 warm-ups, synchronised around each); then
--profile-steps under torch.profiler, synchronised only around them all (their mean wall time): per step the
GPU's kernel time (summed over kernels), kernel launches and the host's mean time per launch call, the step's own
synchronising calls (each stops the host until the GPU catches up), and the host operations with most self time.

    python benchmarks/step_profile.py [--json OUT]               # CUDA
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --smoke    # CPU: tiny widths, the code path only

Reading: GPU kernel time near the wall time = the device sets the pace (bigger micro-batches do not help); far
below it, with launch calls x their mean near the wall time = the host's launches do (`torch.compile` and CUDA
graphs are the levers); many synchronising calls = something waits on the device each step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15 import _device, _sync, build_folder  # noqa: E402
from step_flops import prepared_step  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # the host waits in each


def _steps(step, optimizer, n: int, dev, each: bool = True) -> list:
    """Seconds per step; `each`: synchronised around every step, else once after the last (profiled: besides that
    one, HARNESS_SYNCS, only the step's own synchronising calls happen inside), all getting the mean."""
    _sync(dev)
    times, start = [], time.perf_counter()
    for _ in range(n):
        begin = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if each:
            _sync(dev)
        times.append(time.perf_counter() - begin)
    if not each:
        _sync(dev)  # the GPU's queued tail counted too
        times = [(time.perf_counter() - start) / n] * n
    return times


HARNESS_SYNCS = {"cudaDeviceSynchronize": 1}
"""The profiled `_steps`' own synchronising calls inside the profile (the one after the last step)."""


def _summary(events, steps: int) -> dict:
    """Per step: the GPU's summed kernel (and copy) time, launches and their mean host time, synchronising calls,
    the host ops with most self time. Device-side annotations (`Optimizer.step#AdamW.step`) span kernels counted
    already: left out, as torch's own table leaves them. Kernels on several streams at once are summed."""
    def device_us(e):  # torch >= 2.4 names it device; before, cuda
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    kernels = [e for e in events if str(e.device_type).endswith("CUDA") and not getattr(e, "is_user_annotation", 0)]
    launches = [e for e in events if e.key in LAUNCHES]
    n_launch = sum(e.count for e in launches)
    host = sorted((e for e in events if not str(e.device_type).endswith("CUDA")),
                  key=lambda e: e.self_cpu_time_total, reverse=True)
    syncs = {e.key: round((e.count - HARNESS_SYNCS.get(e.key, 0)) / steps, 2) for e in events if e.key in SYNCS}
    return {"gpu_kernel_ms": round(sum(device_us(e) for e in kernels) / steps / 1e3, 2),
            "launches": round(n_launch / steps, 1),
            "launch_mean_us": round(sum(e.self_cpu_time_total for e in launches) / max(n_launch, 1), 1),
            "syncs": {key: n for key, n in syncs.items() if n},
            "top_host_ms": [(e.key, round(e.self_cpu_time_total / steps / 1e3, 2)) for e in host[:8]]}


def row(folder: Path, dev, pairs: int, steps: int, profile_steps: int, smoke: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    prec = ["train.mixed_precision='no'", "model.weight_dtype=fp32"] if smoke else \
        ["train.mixed_precision=bf16", "model.weight_dtype=bf16"]
    step, _, params = prepared_step("sd15/dpo_lora.yaml", [f"model.pretrained={folder}", *prec], dev,
                                    64 if smoke else 512, pairs)
    optimizer = torch.optim.AdamW(params, lr=1e-6)  # the loop's default optimizer (foreach on CUDA)
    _steps(step, optimizer, 3, dev)
    wall = statistics.median(_steps(step, optimizer, steps, dev))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = _steps(step, optimizer, profile_steps, dev, each=False)
    return {"pairs": pairs, "wall_s": round(wall, 4), "profiled_wall_s": round(profiled[0], 4),
            **_summary(prof.key_averages(), profile_steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths on CPU: checks the code path only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("step_profile.json"))
    args = parser.parse_args()
    dev = _device(args.smoke)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), args.smoke, dev)
        for pairs in (1, 8) if not args.smoke else (1,):
            rows.append(row(folder, dev, pairs, args.steps, args.profile_steps, args.smoke))
            print(json.dumps(rows[-1]), flush=True)
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
