"""A UNet-only checkpoint put into its base pipeline: a released full fine-tune often holds unet/ alone (the
official Diffusion-DPO models, mhdang/dpo-sd1.5-text2image-v1 and mhdang/dpo-sdxl-text2image-v1), and the
official training code starts from one with `--unet_init`. `train/merge_lora.py --unet` writes base + checkpoint
as one pipeline folder, which then samples, compares and trains (as `model.pretrained`) like any other."""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import List, Optional

import torch

from .errors import one_line

INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "encoder_hid_dim_type", "addition_embed_type",
             "addition_time_embed_dim", "projection_class_embeddings_input_dim", "class_embed_type",
             "num_class_embeds", "time_cond_proj_dim")
"""UNet config keys that must equal the base pipeline's: what the UNet takes in (latents, text, micro-conditioning,
class and guidance embeddings) and gives out. Its inside (blocks, widths, heads) is the checkpoint's own: a
distilled UNet (SSD-1B, BK-SDM) fits its teacher's pipeline."""


def unet_folder(given: str | Path) -> Path:
    """The folder holding the UNet's config.json: `given` itself, or its unet/ (a checkpoint's root folder)."""
    from .models import ModelLoadError

    if not Path(given).exists():
        raise ModelLoadError(f"--unet {given} does not exist: give a diffusers UNet folder, or a checkpoint folder "
                             "holding one as unet/")
    for folder in (Path(given), Path(given) / "unet"):
        if (folder / "config.json").is_file():
            return folder
    raise ModelLoadError(f"--unet {given}: no UNet there (no config.json in it or in its unet/ folder); give a "
                         "diffusers UNet folder, or a checkpoint folder holding one as unet/")


def checkpoint_folders(given: Optional[str | Path]) -> List[Path]:
    """Where a UNet checkpoint's companions (text-encoding record, PPD user branch and table) lie: beside its
    unet/ folder (a full export of ours, `RUN/final`), then in the UNet folder; [] for no checkpoint."""
    if given is None:
        return []
    folder = unet_folder(given)
    return [folder.parent, folder] if folder.name == "unet" else [folder]


def check_fits(folder: Path, base: torch.nn.Module) -> None:
    """The checkpoint's UNet has the base UNet's class and interface (read from config.json, before any weights
    load); else a ModelLoadError naming what differs. The prediction type is the base scheduler's, unchecked."""
    from .models import ModelLoadError

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({err}): the checkpoint is damaged; copy "
                             "it again") from None
    cls = type(base)
    if config.get("_class_name") != cls.__name__:
        raise ModelLoadError(f"{folder} holds a {config.get('_class_name')}, the base model a {cls.__name__}")
    defaults = inspect.signature(cls.__init__).parameters  # what a config.json that leaves a key out means
    differ = []
    for key in (k for k in INTERFACE if k in defaults):
        theirs, ours = config.get(key, defaults[key].default), base.config.get(key)
        if theirs != ours:
            differ.append(f"{key} {theirs} (base: {ours})")
    if differ:
        raise ModelLoadError(f"the UNet in {folder} does not fit the base model ({'; '.join(differ)}): give the base "
                             "pipeline it was fine-tuned from (its family: SD1.5, SDXL...) as --model")


def load_unet_checkpoint(given: str | Path, base: torch.nn.Module, variant: Optional[str] = None) -> torch.nn.Module:
    """The UNet of checkpoint `given`, checked against `base` (the pipeline's own UNet) and loaded in its dtype;
    `variant` where the checkpoint holds it, else its plain weights."""
    from .model_folders import missing_files
    from .models import ModelLoadError
    from .weight_files import weights_variant

    folder = unet_folder(given)
    missing = missing_files(folder, "unet")  # no weights, git-lfs pointers: a partial clone of a released UNet
    if missing:
        raise ModelLoadError(f"--unet {given}: {missing}")
    check_fits(folder, base)
    # --variant names the base's variant: a released UNet of plain weights beside it is expected, not told
    variant = weights_variant(folder, variant, "--variant", fallback=True, part="", warn=False)
    from .models import dtype_kwargs

    try:
        return type(base).from_pretrained(str(folder), **dtype_kwargs(base.dtype), variant=variant)
    except (OSError, ValueError) as err:  # a truncated weights file
        raise ModelLoadError(f"--unet {given}: could not load its weights ({one_line(err)[:300]}); the checkpoint may "
                             "be damaged: copy it again") from err
