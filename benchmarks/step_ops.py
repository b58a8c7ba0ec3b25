"""How many ATen operations one DPO step dispatches: the host's share of a GPU step. On an H200 the loop's SD1.5
LoRA step took the same ~0.25 s from 1 to 8 pairs (results/gpu_throughput_sd15_lora_h200.json), so the host, not
the GPU's arithmetic, set its pace there; each operation counted as launching a kernel is at least one on CUDA.

    OMP_NUM_THREADS=1 python benchmarks/step_ops.py [--json OUT]

CPU only: SD1.5's exact block layout (gpu_sd15.build_folder's smoke widths: the operations a step dispatches do
not depend on the widths, nor on the resolution, only their cost does), fp32, one compute_loss + backward of
configs/sd15/dpo_lora.yaml and dpo_full.yaml at micro-batch 1 and 2, counted under a TorchDispatchMode (below
autograd, so the backward's operations count too). Not counted: AdamW's update (foreach on CUDA: a few
multi-tensor kernels), the data loader and the loop's bookkeeping, and the casts bf16 autocast adds on a GPU (a
frozen fp32 weight is cast on every forward that reads it): the count is a floor.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15 import build_folder  # noqa: E402
from step_flops import prepared_step  # noqa: E402

CONFIGS = ("sd15/dpo_lora.yaml", "sd15/dpo_full.yaml")
H200_LORA_X1_S = 0.2556  # results/gpu_throughput_sd15_lora_h200.json, "LoRA r8 x1": s/step


NO_KERNEL = ("_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")
"""Operations that launch no kernel though torch does not mark them as views (metadata, or memory alone)."""


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched, and those that launch no kernel: views (by torch's alias
    annotation) and NO_KERNEL."""

    def __init__(self):
        super().__init__()
        self.ops, self.no_kernel = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        self.no_kernel += bool(getattr(func, "is_view", False)) or name in NO_KERNEL
        return func(*args, **(kwargs or {}))


def count(yaml: str, folder: Path, pairs: int) -> dict:
    args = [f"model.pretrained={folder}", "model.weight_dtype=fp32", "train.mixed_precision='no'"]
    step, _, params = prepared_step(yaml, args, torch.device("cpu"), 64, pairs)
    counter = OpCounter()
    with counter:
        step()
    total = sum(counter.ops.values())
    return {"config": yaml, "pairs": pairs, "trainable_tensors": len(params), "ops": total,
            "kernel_ops": total - counter.no_kernel, "top": counter.ops.most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), smoke=True)
        for yaml in CONFIGS:
            for pairs in (1, 2):
                rows.append(count(yaml, folder, pairs))
                r = rows[-1]
                print(f"{yaml} x{pairs}: {r['ops']} ops ({r['kernel_ops']} launching kernels), "
                      f"{r['trainable_tensors']} trainable tensors; most: {r['top'][:4]}", flush=True)
    lora = next(r for r in rows if r["config"] == CONFIGS[0] and r["pairs"] == 1)
    per_op = H200_LORA_X1_S / lora["kernel_ops"] * 1e6
    print(f"H200 LoRA x1 step {H200_LORA_X1_S} s over {lora['kernel_ops']} kernel-launching ops: {per_op:.1f} us each")
    if args.json:
        meta = {"torch": torch.__version__, "h200_lora_x1_s": H200_LORA_X1_S, "us_per_kernel_op": round(per_op, 1)}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
