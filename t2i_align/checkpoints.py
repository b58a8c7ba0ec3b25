"""Resumable checkpoints (accelerate's save_state) and the final diffusers-loadable export.

Every checkpoint is written into a hidden temporary folder and renamed to `checkpoints/step-N` only once
complete (a marker file is written last), so a kill at any moment leaves a complete checkpoint or none.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .files import replace_dir

MARKER = "t2i_align_checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> List[Tuple[int, Path]]:
    """Complete checkpoints (named step-N and holding the marker), oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: Optional[str]) -> Optional[Path]:
    """None (fresh run), "latest" (newest complete checkpoint, or None if there is none) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint folder (no {MARKER}); "
                                f"use train.resume=latest or one of {checkpoints_dir(output_dir)}/step-N")
    return path


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / MARKER).read_text())["step"])


def save_only_trainable(accelerator) -> None:
    """LoRA runs: checkpoints keep only the trainable (adapter) weights; the frozen UNet is model.pretrained's.
    (accelerate would store the whole UNet: ~3.4 GB per SD1.5 checkpoint instead of a few MB.)"""
    def keep_trainable(models, weights, output_dir):
        for i, model in enumerate(models):
            names = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(keep_trainable)


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, trainable_only: bool) -> int:
    """Restore a checkpoint; with `trainable_only` its weights must cover every trainable parameter (a LoRA
    checkpoint with other targets or rank fails here, naming what is missing). Returns its step."""
    if trainable_only:
        from safetensors import safe_open

        wanted = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        wrong = sorted(n for n, shape in wanted.items() if stored.get(n) != shape)
        if wrong:
            raise RuntimeError(f"checkpoint {path} does not hold {len(wrong)} trainable weights of this run as "
                               f"shaped here (e.g. {wrong[0]}): was it written with other LoRA settings? Resume "
                               "with the run's own config, or start fresh without train.resume")
        accelerator.load_state(str(path), strict=False)
    else:
        accelerator.load_state(str(path))
    return checkpoint_step(path)


def all_finite(params) -> bool:
    return all(torch.isfinite(p.detach()).all().item() for p in params)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int, params) -> Optional[Path]:
    """Collective: every process calls it. Returns the checkpoint path (None if weights were non-finite)."""
    if not all_finite(params):
        accelerator.print(f"step {step}: non-finite weights, checkpoint NOT written")
        return None
    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def export_final(pipeline, unet, lora: bool, output_dir: str | os.PathLike) -> Path:
    """`final/`: pytorch_lora_weights.safetensors (LoRA, for `pipe.load_lora_weights`) or a full pipeline
    folder with the tuned unet/ (full fine-tune, for `DiffusionPipeline.from_pretrained`). Atomic rename."""
    out = Path(output_dir) / "final"
    tmp = Path(output_dir) / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from peft.utils import get_peft_model_state_dict

        # peft key names as they are: diffusers' convert_state_dict_to_diffusers rewrites only attention keys to
        # the old lora.up/down names, and a file mixing both formats silently loses the attention adapters.
        layers = get_peft_model_state_dict(unet)
        type(pipeline).save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True)
    else:
        pipeline.save_pretrained(str(tmp), safe_serialization=True)
    return replace_dir(tmp, out)
