"""A full pipeline folder written from a training run or a merge: every part in float32, the parts that did not
train as exact as their source, SD1.5's safety checker carried over, a PPD user branch beside unet/."""
from __future__ import annotations

import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import torch

from .errors import one_line
from .weight_files import check_loaded, write_keys_as_before

logger = logging.getLogger(__name__)
FROZEN_PARTS = ("text_encoder", "text_encoder_2", "vae")
"""Parts that never train: a full export writes them from their source, not from their training-dtype copies."""


def save_full_pipeline(pipeline, unet, folder: Path, exact_frozen: bool = False,
                       vae_dir: Optional[Path] = None) -> None:
    """save_pretrained with every component in float32 (`_all_float32`); a user branch leaves the UNet for it
    (diffusers would write it into unet/ with an ip_image_proj config that a plain load cannot rebuild) and comes
    back from its own file afterwards. `exact_frozen` (a training run's export): the frozen parts held in
    model.weight_dtype are written again from their source folders (`vae_dir`: model.vae's), so they equal the
    base's (from the fp16 copy the text encoder was 2e-4 off, 1e-3 in bf16)."""
    from .conditioning.users import has_user_branch, load_user_branch, remove_user_branch, save_user_branch

    with _all_float32(pipeline) as cast:
        if not has_user_branch(unet):
            pipeline.save_pretrained(str(folder), safe_serialization=True)
        else:
            branch = save_user_branch(folder, unet)
            remove_user_branch(unet)
            try:
                pipeline.save_pretrained(str(folder), safe_serialization=True)
            finally:
                load_user_branch(unet, branch.parent, branch.name)
    from .model_folders import carry_tokenizer_files
    from .sampling import pipeline_components

    source = pipeline_components(pipeline).path
    carry_tokenizer_files(source, folder)
    _carry_safety_checker(source, folder)
    if exact_frozen:
        for name in (n for n in FROZEN_PARTS if n in cast):
            _save_from_source(name, pipeline.components[name], source, folder, vae_dir if name == "vae" else None)
    for name in ("text_encoder", "text_encoder_2", "safety_checker"):  # loadable by transformers 4 too
        if (folder / name / "config.json").is_file():
            write_keys_as_before(folder / name)


def _save_from_source(name: str, used: torch.nn.Module, source: Path, folder: Path, vae_dir: Optional[Path]) -> None:
    """Part `name` loaded again from `source` (or the VAE from `vae_dir`) in float32 and saved over folder/name,
    if it is what the run used (`used`, its weights cast to the training dtype); a source gone or changed since the
    run started (moved, unmounted, downloaded again) leaves the copy the run used, rounded, with a warning."""
    from .models import _load_part, load_vae_folder, read_index
    from .weight_files import weights_variant

    try:
        if vae_dir is not None:
            part = load_vae_folder(str(vae_dir), lambda _: torch.float32, key="model.vae")
        else:
            variant = weights_variant(source / name, None, name, fallback=True, part="", warn=False)
            part = _load_part(source, read_index(source), name, variant=variant, dtype=torch.float32)
        part = part.float()
        _check_same(part, used)
    except Exception as err:
        logger.warning("warning: %s could not be read again from %s (%s): the export's %s/ holds the copy trained "
                       "beside, rounded to model.weight_dtype", name, vae_dir or source, one_line(err)[:200], name)
        return
    shutil.rmtree(folder / name)
    part.save_pretrained(str(folder / name), safe_serialization=True)


SAFETY_PARTS = ("safety_checker", "feature_extractor")


def _carry_safety_checker(source: Path, folder: Path) -> None:
    """SD1.5's safety checker, copied from the model folder `source` into the saved pipeline `folder`: training
    and sampling leave it out (it judges no image we make), but a plain `from_pretrained(folder)(prompt)` should
    filter as the source's did. Only when the source holds it with plain weights; otherwise a warning says the
    export has none. Loaded and saved again (not copied): a download's safety_checker/ also holds pickled .bin
    files and fp16 copies, and an export is safetensors in float32 only. One that fails to load (a git-lfs
    pointer left unpulled) is warned of too: training never read it, and the export must not be lost for it."""
    from .models import read_index
    from .weight_files import has_plain_weights

    index = read_index(source) if (source / "model_index.json").is_file() else {}
    if (index.get("safety_checker") or [None])[0] is None:
        return
    checker, why = None, "without plain weights to copy"
    if has_plain_weights(source / "safety_checker") and (source / "feature_extractor").is_dir():
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        try:  # only reading it: a failure to write the export (a full disk) still fails it
            loaded, info = StableDiffusionSafetyChecker.from_pretrained(
                str(source / "safety_checker"), use_safetensors=None, output_loading_info=True)
            check_loaded(source / "safety_checker", info)  # not a random checker (a flat one under transformers 4)
            checker = loaded
        except Exception as err:
            why = f"that could not be read ({one_line(err)[:200]})"
    if checker is None:
        # `folder` is the staged copy: the warning names what the user will find, the folder's final name
        staged = re.fullmatch(r"\.(.+)\.tmp-[^.]*", folder.name)  # files.staged_dir's name for it
        final = folder.parent / staged.group(1) if staged else folder
        logger.warning("warning: %s lists a safety checker %s: the pipeline saved to %s has none", source, why, final)
        return
    checker.float().save_pretrained(str(folder / "safety_checker"), safe_serialization=True)
    shutil.copytree(source / "feature_extractor", folder / "feature_extractor",
                    ignore=lambda _, names: [n for n in names if not n.endswith(".json")])  # the processor's config
    saved = read_index(folder)
    saved.update({part: index[part] for part in SAFETY_PARTS},
                 requires_safety_checker=index.get("requires_safety_checker", True))
    (folder / "model_index.json").write_text(json.dumps(saved, indent=2) + "\n")


def _check_same(part: torch.nn.Module, used: torch.nn.Module) -> None:
    """Raise unless `part` (float32) cast to `used`'s dtype is `used`, weight for weight."""
    theirs = used.state_dict()
    for key, value in part.state_dict().items():
        if key not in theirs or not torch.equal(value.to(theirs[key].dtype), theirs[key].detach().cpu()):
            raise ValueError(f"its {key} is not the weight the run used: the folder changed since the run started")


@contextmanager
def _all_float32(pipeline):
    """Every part float32 while saving, then back as it was: the frozen parts train in model.weight_dtype beside
    an fp32 UNet (under DeepSpeed bf16 the UNet is bf16 too), and transformers 5 loads each part in its saved
    dtype, so a folder of mixed dtypes failed at the first prompt of a plain `from_pretrained(final)`. A part is
    upcast on the CPU (an fp32 copy of SDXL's UNet on the GPU could run out of memory at the end of a run);
    fp16/bf16 -> fp32 -> back is exact."""
    modules = {name: m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    cast: Dict[str, tuple] = {}
    try:
        for name, module in modules.items():
            param = next(module.parameters(), None)
            if param is not None and param.dtype != torch.float32:
                cast[name] = (param.device, param.dtype)
                _plain_to(module, "cpu", torch.float32)
        yield cast
    finally:
        for name, (device, dtype) in cast.items():
            _plain_to(modules[name], device, dtype)


def _plain_to(module: torch.nn.Module, device, dtype) -> None:
    """torch's own Module.to (diffusers' override warns at every cast: "modules ... kept in float32: []"), the
    cast done on the CPU: to the CPU first, or back from it last."""
    for step in ((device, dtype) if str(device) == "cpu" else (dtype, device)):
        torch.nn.Module.to(module, step)
