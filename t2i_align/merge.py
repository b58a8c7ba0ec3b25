"""Merge LoRA weights, a UNet-only checkpoint, or both into their base model and save a full diffusers pipeline
folder.

LongAlign's stage 2 starts from stage 1 with its LoRA merged (official code: `collapse_lora`, W += up @ down) and
trains a new LoRA on top (Liu et al. 2024, arXiv 2410.11817, Sec. 5.1). A released full fine-tune that holds
unet/ alone (the official Diffusion-DPO models) becomes a whole pipeline the same way (`unet_checkpoint.py`). A
merged folder is an ordinary `model.pretrained` for the next stage; the text encoding the LoRA was tuned with is
recorded in it (t2i_align_text_encoding.json), so sampling it later uses that encoding too.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .base_model import write_base_model
from .conditioning.text import write_text_encoding
from .files import check_output_path, check_replaceable_folder, given_path, staged_dir, write_json_atomic

MERGED_FILE = "t2i_align_merged.json"
"""Marks a folder merge_lora wrote (what it merged): --overwrite replaces no other (a run's final/ included)."""


def merge_lora(model: str | Path, lora: Optional[str | Path], out: str | Path, text_encoding: Optional[str] = None,
               overwrite: bool = False, unet: Optional[str | Path] = None, variant: Optional[str] = None,
               vae: Optional[str | Path] = None) -> Path:
    """Base `model` (a diffusers folder or "toy"), its UNet replaced by checkpoint `unet` if given, + `lora`
    (pytorch_lora_weights.safetensors or its folder) if given -> `out`, a full pipeline folder with the LoRA fused
    into the UNet weights (a PPD user branch and table, if any, beside it, as in a full PPD export), in float32
    whatever `variant` (of the base's weights) was read; `vae` (the `model.vae` a run trained with, which its LoRA
    export records) replaces the base's vae/. Written whole (temporary folder, then rename); an
    existing non-empty `out` is replaced only with `overwrite`."""
    from .checkpoints import save_full_pipeline
    from .models import ModelLoadError
    from .sampling import check_weights, load_pipeline, pipeline_components
    from .users.table import USER_TABLE_NAME

    if lora is None and unet is None:  # a full fine-tune's final/, given as --lora, is told to come as --model
        whole = f"--model {model} is a whole pipeline, used as it is (sample/generate.py --model {model}); " \
            if (Path(str(model)) / "model_index.json").is_file() else ""
        raise ModelLoadError(f"nothing to merge: {whole}give --lora, --unet or both to merge weights into a base")
    out = given_path(out, "--out")  # "" is no folder to replace, not the working directory
    check_replaceable_folder(out, "--out", "merge_lora.py")
    check_output_path(out, "--out", folder=True, inputs=_inputs(model, lora, unet, vae), replaces=[out],
                      overwrite=overwrite, made_by=MERGED_FILE)  # not the encoding record: exports have it too
    # errors name merge_lora.py's flags; the model's folder as loaded, where a PPD user table may be
    folder, _ = check_weights(model, lora, text_encoding, key="--model", unet=unet, variant=variant, vae=vae)
    pipe = load_pipeline(model, lora=lora, text_encoding=text_encoding, unet=unet, variant=variant, vae=vae)
    if lora is not None:
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    encoding = pipeline_components(pipe).text_encoding
    with staged_dir(out) as tmp:  # a full disk or Ctrl-C leaves no hidden pipeline-sized folder behind
        save_full_pipeline(pipe, pipe.unet, tmp)  # a PPD user branch beside unet/, as a full PPD export has it
        table = _user_table(folder, lora, unet)
        if table is not None:
            shutil.copy2(table, tmp / USER_TABLE_NAME)
        write_text_encoding(tmp, encoding.kind, encoding.token_budget)
        write_json_atomic(tmp / MERGED_FILE, {"model": str(model), "lora": _text(lora), "unet": _text(unet),
                                              "vae": _text(vae)})
        write_base_model(tmp, folder, str(model))  # what it was made from (sampling's default guidance follows it)
    return out


def _text(path: Optional[str | Path]) -> Optional[str]:
    return None if path is None else str(path)


def _user_table(folder: Path, lora: Optional[str | Path], unet: Optional[str | Path]) -> Optional[Path]:
    """PPD's user table, from where the user branch loads (`sampling.load_pipeline`): the LoRA folder's, else the
    UNet checkpoint's (a full PPD export), else the model's `folder` as loaded (a LoRA tuned on a full PPD export;
    a hub id's cached download: resolving it again fetched every .safetensors file of the repo)."""
    from .unet_checkpoint import checkpoint_folders
    from .users.table import USER_TABLE_NAME

    folders = [] if lora is None else [Path(lora) if Path(lora).is_dir() else Path(lora).parent]
    folders += checkpoint_folders(unet) + [folder]
    return next((f / USER_TABLE_NAME for f in folders if (f / USER_TABLE_NAME).is_file()), None)


def _inputs(model: str | Path, lora: Optional[str | Path], unet: Optional[str | Path],
            vae: Optional[str | Path] = None) -> dict:
    """What merging reads, which an --out replaced whole must not be or hold: for --unet, the folder holding the
    UNet (the checkpoint's unet/ when given its root: an --out there would replace the weights it reads)."""
    from .toy.assets import pipeline_dir
    from .unet_checkpoint import unet_folder

    given = {"--lora": lora, "--unet": None if unet is None else unet_folder(unet),
             "--model": pipeline_dir() if str(model) == "toy" else model,  # the shipped toy base, never replaced
             "--vae": vae}
    return {flag: path for flag, path in given.items() if path is not None}
