"""Which weight files a diffusers pipeline folder holds: plain weights, or variants (`*.fp16.safetensors`...)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

_WEIGHTS = r"(?:diffusion_pytorch_model|model|pytorch_model)"
_SHARD = r"-\d{5}-of-\d{5}"
# diffusers' variant names (pipeline_loading_utils.variant_compatible_siblings): model.fp16.safetensors,
# model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json, and the legacy
# model-00001-of-00002.fp16.safetensors and model.safetensors.fp16.index.json
_VARIANT_FILES = [re.compile(p) for p in (
    rf"^{_WEIGHTS}\.(\w+?)(?:{_SHARD})?\.(?:safetensors|bin)$",
    rf"^{_WEIGHTS}\.(?:safetensors|bin)\.index\.(\w+)\.json$",
    rf"^{_WEIGHTS}{_SHARD}\.(\w+)\.(?:safetensors|bin)$",
    rf"^{_WEIGHTS}\.(?:safetensors|bin)\.(\w+)\.index\.json$")]
_PLAIN_FILE = re.compile(rf"^{_WEIGHTS}(?:{_SHARD})?\.(?:safetensors|bin)(?:\.index\.json)?$")


def weights_variant(path: Path, requested: Optional[str] = None, key: str = "model.variant",
                    fallback: bool = False, part: str = "unet", warn: bool = True) -> Optional[str]:
    """The weight variant to load from pipeline folder `path`: `requested` (named by setting or flag `key`), which
    unet/ must hold (with `fallback`, a folder without it but with plain weights loads those: sample/'s --variant
    applies to a base and a tuned export alike); else None when unet/ holds plain weights; else the one variant it
    holds (a folder saved with variant="fp16" only, where a plain load failed with "no file named
    model.safetensors ... in <the folder>"). `part` "": `path` is the UNet's own folder."""
    unet = Path(path) / part
    if not unet.is_dir():
        return requested
    names = [f.name for f in unet.iterdir()]
    plain = any(_PLAIN_FILE.match(n) for n in names)
    found = sorted({m.group(1) for n in names for m in (p.match(n) for p in _VARIANT_FILES) if m})
    if requested and requested not in found:
        if fallback and plain:  # said: a typo'd --variant fp61 loaded the plain weights without a word
            import warnings

            if warn:
                warnings.warn(f"{unet} holds no {requested} weights ({_named(key, requested)}): its plain weights "
                              "load", stacklevel=2)
            return None
        held = ", ".join(([f"plain ({key}=null)" if key == "model.variant" else "plain"] if plain else []) + found)
        from .models import ModelLoadError

        raise ModelLoadError(f"{_named(key, requested)}, but {unet} holds no {requested} weights; it holds: "
                             f"{held or 'no weights'} (choose one of those)")
    if requested or plain:
        return requested
    if len(found) > 1:
        from .models import ModelLoadError

        raise ModelLoadError(f"{unet} holds only variant weights, of several variants ({', '.join(found)}): choose "
                             f"one with {_named(key, found[0])}")
    return found[0] if found else None


def part_variant(path: Path, part: str, variant: Optional[str]) -> Optional[str]:
    """`variant` for component `part` of pipeline folder `path` where its folder holds it, else None (its plain
    weights), as diffusers' pipeline loading falls back per part: the variant is chosen from unet/, and a folder
    with fp16 UNet files beside plain text encoders loaded in diffusers but not here."""
    folder = Path(path) / part
    if variant is None or not folder.is_dir():
        return variant
    names = [f.name for f in folder.iterdir()]
    held = {m.group(1) for n in names for m in (p.match(n) for p in _VARIANT_FILES) if m}
    return variant if variant in held or not any(_PLAIN_FILE.match(n) for n in names) else None


def _named(key: str, value: str) -> str:
    """How the user names a variant: `model.variant='fp16'` (a setting) or `--variant fp16` (a flag)."""
    return f"{key} {value}" if key.startswith("--") else f"{key}={value!r}"


def has_plain_weights(folder: Path) -> bool:
    """Whether `folder` (one component's) holds non-variant weight files."""
    return Path(folder).is_dir() and any(_PLAIN_FILE.match(f.name) for f in Path(folder).iterdir())
