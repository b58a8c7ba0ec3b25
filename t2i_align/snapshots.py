"""SePPO's snapshot files: a full fine-tune's in output_dir/reference_pool/step-<N>.safetensors (each checkpoint
holding hard links to those it lists), a LoRA run's adapters inside each checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .checkpoints import CheckpointMismatch

POOL_DIR = "reference_pool"
"""Full fine-tune snapshots: output_dir/reference_pool/step-<N>.safetensors, and a checkpoint's links to them."""


def snapshot_files(output_dir: Path) -> Dict[int, Path]:
    """step -> the full fine-tune snapshot file of that step in output_dir."""
    return {int(path.stem.split("-")[1]): path for path in (Path(output_dir) / POOL_DIR).glob("step-*.safetensors")}


def read_lora_pool(path: Path, steps: List[int], unet) -> Dict[int, Dict[str, torch.Tensor]]:
    """The adapter snapshots of `steps`, each checked to hold every adapter tensor at its shape: `functional_call`
    fills a missing one from the live policy, so a damaged file made the reference the policy itself silently."""
    from safetensors.torch import load_file

    device = next(unet.parameters()).device
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    flat = load_file(str(path))
    pool: Dict[int, Dict[str, torch.Tensor]] = {s: {} for s in steps}
    for key, value in flat.items():
        step, name = key.split("/", 1)
        if int(step) in pool:
            pool[int(step)][name] = value.to(device)
    for step, tensors in pool.items():
        bad = sorted(set(params) ^ set(tensors)) or [n for n, p in params.items() if tensors[n].shape != p.shape]
        if bad:
            raise CheckpointMismatch(f"{path}: the snapshot of step {step} does not fit this run's adapters "
                                     f"({len(bad)} tensors missing, extra or of another shape, e.g. {bad[0]}): "
                                     "the file is damaged or from other LoRA settings; resume with the run's own "
                                     "settings, or from another checkpoint")
    return pool


def link_snapshots(files: Sequence[Path], where: Path) -> None:
    """Hard links (no space taken) to a checkpoint's snapshot files in its folder `where`: one archived or copied
    elsewhere resumes (`restore_snapshots`), and keep-last-K removing one that is a link does not take them along.
    Where hard links fail (another file system) the checkpoint lists them only."""
    where.mkdir(exist_ok=True)
    for path in files:
        try:
            os.link(path, where / path.name)
        except OSError:
            return


def restore_snapshots(resume: Path, out: Path) -> None:
    """The snapshots checkpoint `resume` holds (`link_snapshots`) and output_dir's pool lacks (an archived or copied
    checkpoint, or one whose run's pool dropped them) linked back into the pool, where the run reads them."""
    from .run_dir import link_or_copy

    held, pool = resume / POOL_DIR, out / POOL_DIR
    for snapshot in sorted(held.glob("step-*.safetensors")) if held.is_dir() else ():
        pool.mkdir(exist_ok=True)
        if not (pool / snapshot.name).exists():
            link_or_copy(snapshot, pool / snapshot.name)
