"""What a cached latent or text embedding depends on, so that changing any of it builds a new cache.

A cache entry is the output of (data, transforms) -> VAE -> latents and caption -> tokenizers + text encoders
-> embeddings. The key therefore holds: the data set identity and transforms (`PairDataset.identity`: files,
resolution, crop, flip, ties, max_pairs, seed if augmentation is random), and, from here, every model-side input:

- the folders the tensors come from: the pipeline's tokenizers and text encoders, and its VAE or the `model.vae`
  override (a different VAE makes different latents from the same pixels);
- `model.variant` (fp16 and fp32 weight files sit side by side in one folder) and `model.revision`;
- the dtypes the VAE and text encoders actually run in (the SDXL VAE is kept in fp32 whatever weight_dtype says);
- the family and the function that encodes prompts;
- `encoding`: settings of how text (or images) are encoded that live outside these objects. THE HOOK: a future
  text-encoding choice (e.g. {"text_encoding": "segments"} vs "clip77") goes in this dict, via
  `sources.encoding_settings(cfg)`.

Files up to `HASH_LIMIT` bytes (configs, tokenizer vocabularies, merges) are hashed by content; larger weight
files by size and mtime (hashing gigabytes on every start would be slow; rewriting a file changes its mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from ..errors import UserError

CACHE_FORMAT = 2
"""Bump when the cache layout or how tensors are computed (e.g. VAE sample vs mode) changes: old caches then get
a different key. 2: the model side of the key grew (VAE override, variant, tokenizers, actual dtypes)."""
HASH_LIMIT = 8 << 20
PIPELINE_PARTS = ("vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def cache_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-able key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _file_identity(path: Path, folder: Path) -> list:
    stat = path.stat()
    if stat.st_size <= HASH_LIMIT:
        return [str(path.relative_to(folder)), hashlib.sha256(path.read_bytes()).hexdigest()]
    return [str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns]


def model_identity(model_dir: str | Path, subfolders: Sequence[str] = PIPELINE_PARTS) -> Dict[str, Any]:
    """The folder plus every file of the given subfolders ("." = the folder itself): small files by content,
    large ones by size and mtime."""
    folder = Path(model_dir).resolve()
    files = sorted({p for sub in subfolders if (folder / sub).is_dir() for p in _files_under(folder / sub)})
    return {"model": str(folder), "files": [_file_identity(p, folder) for p in files]}


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file below `folder` (links to folders not followed, as rglob); a folder that cannot be listed is a
    UserError naming it: rglob skipped it silently, so a changed file in it would have reused stale latents."""
    def refuse(err: OSError) -> None:
        raise UserError(f"cannot list {err.filename} ({err.strerror or err}), a folder of the model whose files the "
                        "data cache's key covers: make it readable by this user (or remove it from the model folder)")

    for root, _, names in os.walk(folder, onerror=refuse):
        yield from (p for p in (Path(root, name) for name in names) if p.is_file())


def _dtype(module: torch.nn.Module) -> str:
    return str(next(iter(module.parameters()), torch.empty(0)).dtype)


def encoder_key_parts(model_dir: str | Path, family: str, vae_dtype: str, text_dtypes: Iterable[str],
                      vae_dir: Optional[str | Path] = None, variant: Optional[str] = None,
                      revision: Optional[str] = None, prompt_encoder: str = "",
                      encoding: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The model side of a cache key. `vae_dir`: a separate VAE folder (its own files, or a pipeline folder's
    vae/) replacing the pipeline's VAE; `encoding`: extra encoding settings (see the module docstring)."""
    parts = [p for p in PIPELINE_PARTS if vae_dir is None or p != "vae"]
    key: Dict[str, Any] = {"pipeline": model_identity(model_dir, parts), "family": family,
                           "variant": variant, "revision": revision, "vae_dtype": vae_dtype,
                           "text_dtypes": list(text_dtypes), "prompt_encoder": prompt_encoder,
                           "encoding": dict(encoding or {})}
    if vae_dir is not None:
        vae = Path(vae_dir)
        key["vae"] = model_identity(vae, ("vae",) if (vae / "vae").is_dir() else (".",))
    return key


def components_key_parts(model_cfg: Any, components: Any, encoding: Optional[Mapping[str, Any]] = None
                         ) -> Dict[str, Any]:
    """`encoder_key_parts` for loaded `models.Components` and the `model` config section they came from."""
    from ..models import resolve_pretrained

    vae_dir = resolve_pretrained(model_cfg.vae, pipeline=False, key="model.vae") if model_cfg.vae else None
    encode = components.spec.encode_prompts
    return encoder_key_parts(
        components.path, components.spec.name, _dtype(components.vae), [_dtype(m) for m in components.text_encoders],
        vae_dir=vae_dir, variant=model_cfg.variant, revision=model_cfg.revision,
        prompt_encoder=f"{encode.__module__}.{getattr(encode, '__qualname__', repr(encode))}", encoding=encoding)
