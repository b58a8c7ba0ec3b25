"""Which weight files a diffusers pipeline folder holds: plain weights, or variants (`*.fp16.safetensors`...); and
whether their keys are the ones the installed transformers reads."""
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
_SINGLE = re.compile(rf"^{_WEIGHTS}(?:\.(\w+))?\.(safetensors|bin)$")  # unsharded: (variant, format)
_INDEX = re.compile(rf"^{_WEIGHTS}\.(safetensors|bin)(?:\.(\w+))?\.index(?:\.(\w+))?\.json$")  # a shard index
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


_FLAT_CLIP_TEXT = ("embeddings.", "encoder.", "final_layer_norm.")
_FLAT_CLIP_VISION = tuple("vision_model." + p for p in ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))
_AS_BEFORE = {"CLIPTextModel": (_FLAT_CLIP_TEXT, "text_model."),
              "StableDiffusionSafetyChecker": (_FLAT_CLIP_VISION, "vision_model.")}
"""Architectures whose keys transformers 5 writes flat (CLIPTextModel, CLIPVisionModel inside the safety checker):
(the flat keys' prefixes, what transformers 4 and the official checkpoints have in front of them)."""


def write_keys_as_before(folder: Path) -> None:
    """A CLIPTextModel or an SD safety checker saved by transformers 5 (`folder`: its config.json and weights)
    rewritten with the key layout of the official checkpoints (`text_model.embeddings...`,
    `vision_model.vision_model.embeddings...`): transformers 4 (setup.cfg allows it) does not map transformers 5's
    flat names, so it loaded every such weight as newly initialised (a warning, then a random encoder, or a random
    safety checker). Both versions load this layout. Other parts (CLIPTextModelWithProjection: SDXL's
    text_encoder_2) keep one layout in both: left as they are."""
    import json

    from safetensors.torch import load_file

    from .files import save_safetensors_atomic, write_json_atomic

    if _architecture(folder) not in _AS_BEFORE:
        return
    flat, prefix = _AS_BEFORE[_architecture(folder)]

    def before(key: str) -> str:
        return prefix + key if key.startswith(flat) else key

    for path in sorted(Path(folder).glob("model*.safetensors")):
        tensors = load_file(str(path))
        if any(key.startswith(flat) for key in tensors):
            save_safetensors_atomic(path, {before(k): v for k, v in tensors.items()}, {"format": "pt"})
    for index in _indexes(folder):  # variants' indexes too
        data = json.loads(index.read_text())
        data["weight_map"] = {before(k): v for k, v in data.get("weight_map", {}).items()}
        write_json_atomic(index, data)


def _architecture(folder: Path) -> Optional[str]:
    """The one class config.json names for the model in `folder` (None: none, several, or no readable config)."""
    import json

    try:
        names = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return names[0] if len(names) == 1 else None


def _indexes(folder: Path) -> list:
    """The shard indexes in `folder`, plain and variants' (model.safetensors.index.fp16.json ...)."""
    return sorted(Path(folder).glob("model*.safetensors*index*.json"))


def missing_shard(folder: Path, variant: Optional[str] = None, transformers: bool = False) -> Optional[str]:
    """What the shard index the loader would read names that is not in `folder` (a download stopped between
    shards), or None. It failed at load, as a FileNotFoundError, after the folder checks had passed. The set read
    is `variant`'s where the folder holds it, else the plain one (the loaders fall back); a folder of other variants
    only is refused when every one is broken. Within a set, as the loaders pick (diffusers 0.42, transformers 5):
    diffusers a safetensors index, then a safetensors file, then a .bin file (never a .bin index); transformers
    (`transformers`: a text encoder) a safetensors file, its index, a .bin file, its index."""
    folder = Path(folder)
    names = {f.name for f in folder.iterdir()}
    order = ("st_file", "st_index", "bin_file", "bin_index") if transformers else ("st_index", "st_file", "bin_file")
    picks: dict = {}  # variant (None: plain) -> (rank, file name) of what the loader reads
    for name in names:
        index, single = _INDEX.match(name), _SINGLE.match(name)
        if index:
            fmt, kind, found = index.group(1), "index", index.group(2) or index.group(3)
        elif single:
            fmt, kind, found = single.group(2), "file", single.group(1)
        else:
            continue
        kind = ("st_" if fmt == "safetensors" else "bin_") + kind
        if kind in order:
            picks[found] = min(picks.get(found, (9, "", "")), (order.index(kind), name, kind))
    broken = {v: _lost_shards(folder, name, names) for v, (_, name, kind) in picks.items() if kind.endswith("index")}
    broken = {v: why for v, why in broken.items() if why}
    read = variant if variant in picks else None
    if read in picks:
        return broken.get(read)
    return next(iter(broken.values())) if broken and len(broken) == len(picks) else None


def _lost_shards(folder: Path, index: str, names: set) -> Optional[str]:
    import json

    try:
        lost = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()) - names)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a damaged index: missing_files names it
        return None
    return f"{folder / index} names {len(lost)} missing shard file(s) (e.g. {lost[0]})" if lost else None


def check_clip_text_layout(path: Path) -> None:
    """Refuse pipeline `path` if a text encoder folder holds CLIPTextModel weights in transformers 5's key layout
    and the installed transformers is older: it would load them as random weights, with a warning only (training
    refuses them in `check_loaded`; `DiffusionPipeline.from_pretrained` reports nothing)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return
    for folder in (Path(path) / "text_encoder", Path(path) / "text_encoder_2"):
        if _architecture(folder) == "CLIPTextModel" and any(k.startswith(_FLAT_CLIP_TEXT) for k in _keys(folder)):
            _refuse_flat(folder, transformers.__version__)


def _keys(folder: Path) -> list:
    """The weight names in `folder`'s safetensors files and in its shard indexes (which name them too)."""
    import json

    from safetensors import safe_open

    keys = []
    for file in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys += list(f.keys())
    return keys + [k for index in _indexes(folder) for k in json.loads(index.read_text()).get("weight_map", {})]


def _refuse_flat(folder: Path, version: str) -> None:
    from .models import ModelLoadError

    raise ModelLoadError(f"{folder} was saved by transformers 5, whose text-encoder keys transformers {version} "
                         "loads as random weights: upgrade transformers, or rewrite the keys once (both versions "
                         "read them then) with `python -c \"from t2i_align.weight_files import "
                         f"write_keys_as_before as w; w('{folder}')\"`")


def from_pretrained_checked(cls, path: Path, name: str, **kwargs):
    """`cls.from_pretrained(path, subfolder=name)`; a transformers model's missing weights refused (`check_loaded`)."""
    from transformers import PreTrainedModel

    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return cls.from_pretrained(path, subfolder=name, **kwargs)
    model, info = cls.from_pretrained(path, subfolder=name, output_loading_info=True, **kwargs)
    check_loaded(Path(path) / name, info)
    return model


def check_loaded(folder: Path, info: dict) -> None:
    """transformers fills weights its file lacks with random ones and only warns: a text encoder saved by
    transformers 5 (`embeddings.*`) loaded that way, whole, in transformers 4 (`text_model.embeddings.*`)."""
    from .models import ModelLoadError

    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"{folder}: {len(missing)} weights are missing from its files (e.g. {missing[0]}), which "
                             "transformers would fill with random values: a file of another model, or saved by "
                             "transformers 5 and read by transformers 4 (export it again with this project, whose "
                             "exports both read, or upgrade transformers)")
