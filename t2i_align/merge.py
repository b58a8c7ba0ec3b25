"""Merge LoRA weights into their base model and save a full diffusers pipeline folder.

LongAlign's stage 2 starts from stage 1 with its LoRA merged (official code: `collapse_lora`, W += up @ down) and
trains a new LoRA on top (Liu et al. 2024, arXiv 2410.11817, Sec. 5.1). A merged folder is an ordinary
`model.pretrained` for the next stage; the text encoding the LoRA was tuned with is recorded in it
(t2i_align_text_encoding.json), so sampling it later uses that encoding too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .conditioning.text import write_text_encoding
from .files import replace_dir, temp_dir


def merge_lora(model: str | Path, lora: str | Path, out: str | Path, text_encoding: Optional[str] = None,
               overwrite: bool = False) -> Path:
    """Base `model` (a diffusers folder or "toy") + `lora` (pytorch_lora_weights.safetensors or its folder) ->
    `out`, a full pipeline folder with the LoRA fused into the UNet weights. Written whole (temporary folder,
    then rename); an existing non-empty `out` is replaced only with `overwrite`."""
    from .models import ModelLoadError
    from .sampling import load_pipeline, pipeline_components

    out = Path(out)
    _check_not_inputs(out, model, lora)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelLoadError(f"{out} exists and is not empty; pass overwrite (--overwrite) to replace it")
    pipe = load_pipeline(model, lora=lora, text_encoding=text_encoding)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    encoding = pipeline_components(pipe).text_encoding
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    pipe.save_pretrained(str(tmp))
    write_text_encoding(tmp, encoding.kind, encoding.token_budget)
    return replace_dir(tmp, out)


def _check_not_inputs(out: Path, model: str | Path, lora: str | Path) -> None:
    """Replacing `out` deletes it whole: refuse an `out` that is, or holds, the LoRA or the base model."""
    from .models import ModelLoadError

    lora_dir = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    inputs = {"--lora": lora_dir} if str(model) == "toy" else {"--lora": lora_dir, "--model": Path(model)}
    for flag, path in inputs.items():
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            raise ModelLoadError(f"--out {out} is or holds {flag} {path}: writing there would delete the input; "
                                 "choose another --out folder")
