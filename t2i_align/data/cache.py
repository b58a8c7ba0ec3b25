"""Precomputed VAE latents and text embeddings for offline pair training (safetensors only, never pickle).

Why: the official DPO code VAE-encodes two images every step; encoding once makes training steps UNet-only.

Layout: <cache_root>/<key>/ with pairs-NNNNN.safetensors (latents, sizes, crops, row ids, prompt index),
prompts-NNNNN.safetensors (one embedding per unique caption: Pick-a-Pic has ~14 pairs per prompt),
empty_prompt.safetensors, captions.json, users.json (each pair's user_id, when the data has one: PPD)
and complete.json (the key and counts). The key hashes the data set
identity (file paths, sizes, mtimes), resolution, crop, flip, ties, max_pairs (and the seed when augmentation is
random) plus the caller's `key_parts`: everything on the model side that changes a tensor (`cache_key.py`:
tokenizer, text encoder and VAE folders including a `model.vae` override, variant, revision, actual dtypes,
family, prompt encoder, and an `encoding` dict for future encoding choices). A different key is a different
folder. The cache is written to a temporary folder and renamed into place only
when complete, so a run interrupted midway never leaves something that is later taken as a cache.

Augmentations are FROZEN: with random crops or flips, each pair keeps the one augmentation drawn at caching time
(epoch 0). Users who want fresh augmentations every epoch must turn the cache off (data.cache=false).
Prompt dropout still works: the embedding of "" is cached once and substituted at load time, with the same
per-item seeded draw as the uncached PairDataset. Corrupt rows are skipped (and counted) at caching time.
Multi-process training: build on the main process first (accelerator.main_process_first()).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import plain_modes, temp_dir
from .cache_key import CACHE_FORMAT, cache_key, model_identity  # noqa: F401 (model_identity: API)
from .pairs import PairDataset, PairStats, collate_pairs, item_draws

logger = logging.getLogger(__name__)

SIZE_KEYS = ("original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l")
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
PromptEncoder = Callable[[List[str]], Dict[str, torch.Tensor]]

collate_cached = collate_pairs
"""Cached items collate like pixel items (tensors stacked, captions listed, sizes as [B, 2] int64)."""


class _ShardWriter:
    """Collects rows of named tensors and writes them `shard_size` rows per safetensors file.

    Rows are copied into one buffer per tensor and shard, allocated when the shard starts (large, so outside the
    malloc heap; untouched pages cost no memory). Keeping each batch's small tensors instead left them scattered
    between the large transient pixel batches, and glibc's heap grew by ~2.5 MB per pair cached (a 1,024-pair
    shard peaked at 4 GB RSS in benchmarks/pair_reading.py)."""

    def __init__(self, folder: Path, prefix: str, shard_size: int) -> None:
        self.folder, self.prefix, self.shard_size = folder, prefix, shard_size
        self.buffers: Dict[str, torch.Tensor] = {}
        self.rows, self.shards = 0, []  # rows pending; [file name, rows] written

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        n, done = len(next(iter(tensors.values()))), 0
        while done < n:
            take = min(n - done, self.shard_size - self.rows)
            for name, value in tensors.items():
                if name not in self.buffers:
                    self.buffers[name] = torch.empty((self.shard_size, *value.shape[1:]), dtype=value.dtype)
                self.buffers[name][self.rows:self.rows + take] = value[done:done + take].detach()
            self.rows, done = self.rows + take, done + take
            if self.rows == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.safetensors"
        save_file({k: v[:self.rows] for k, v in self.buffers.items()}, str(self.folder / name))
        self.shards.append([name, self.rows])
        self.buffers, self.rows = {}, 0


def _is_complete(folder: Path, key: str) -> bool:
    try:
        marker = json.loads((folder / "complete.json").read_text())
    except (OSError, ValueError):
        return False
    shards = marker.get("pair_shards", []) + marker.get("prompt_shards", [])
    return marker.get("key") == key and all((folder / name).is_file() for name, _ in shards)


def _encode_pairs(dataset: PairDataset, encode_images: ImageEncoder, out: Path, batch_size: int,
                  shard_size: int) -> tuple[_ShardWriter, List[str], int, List[Any]]:
    """Pass 1: latents of epoch 0's augmentation for every decodable pair. Returns writer, captions, corrupt and
    the cached pairs' user ids (empty when the data has no user_id column)."""
    writer, prompt_ids, corrupt, users = _ShardWriter(out, "pairs", shard_size), {}, 0, []
    epoch = dataset.epoch
    dataset.set_epoch(0)
    try:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            items = [(i, dataset[i]) for i in indices]
            good = [(i, item) for i, item in items if item is not None]
            corrupt += len(items) - len(good)
            if not good:
                continue
            pixels = torch.cat([torch.stack([item[f"pixels_{s}"] for _, item in good]) for s in "wl"])
            latents_w, latents_l = encode_images(pixels).chunk(2)
            rows = {"latents_w": latents_w, "latents_l": latents_l,
                    "row_id": torch.tensor([int(dataset.row_ids[i]) for i, _ in good]),
                    "prompt": torch.tensor([prompt_ids.setdefault(dataset.caption(i), len(prompt_ids))
                                            for i, _ in good])}
            rows.update({k: torch.tensor([item[k] for _, item in good]) for k in SIZE_KEYS})
            users += [item["user_id"] for _, item in good if "user_id" in item]
            writer.add(rows)
        writer.flush()
    finally:
        dataset.set_epoch(epoch)
    return writer, list(prompt_ids), corrupt, users


def _encode_prompts(captions: List[str], encode_prompts: PromptEncoder, out: Path, batch_size: int,
                    shard_size: int) -> _ShardWriter:
    """Pass 2: one embedding per unique caption, plus the empty prompt for dropout."""
    writer = _ShardWriter(out, "prompts", shard_size)
    for start in range(0, len(captions), batch_size):
        writer.add({k: v for k, v in encode_prompts(captions[start:start + batch_size]).items() if v is not None})
    writer.flush()
    empty = {k: v[:1].detach().cpu().contiguous() for k, v in encode_prompts([""]).items() if v is not None}
    save_file(empty, str(out / "empty_prompt.safetensors"))
    return writer


def _write_cache(dataset: PairDataset, encode_images: ImageEncoder, encode_prompts: PromptEncoder, out: Path,
                 key: str, parts: Mapping[str, Any], batch_size: int, shard_size: int) -> None:
    pairs, captions, corrupt, users = _encode_pairs(dataset, encode_images, out, batch_size, shard_size)
    if not pairs.shards:
        raise ValueError(f"no decodable pairs to cache ({corrupt} corrupt)")
    prompts = _encode_prompts(captions, encode_prompts, out, batch_size, shard_size)
    stats = PairStats(**asdict(dataset.stats))
    stats.corrupt += corrupt
    stats.used -= corrupt
    (out / "captions.json").write_text(json.dumps(captions))
    if getattr(dataset, "user_ids", None) is not None:  # PPD: one user id per cached pair, in cache order
        (out / "users.json").write_text(json.dumps(users))
    marker = {"key": key, "parts": parts, "pairs": sum(n for _, n in pairs.shards), "pair_shards": pairs.shards,
              "prompt_shards": prompts.shards, "stats": asdict(stats)}
    (out / "complete.json").write_text(json.dumps(marker, indent=1))  # written last: its presence = complete


def build_or_load_cache(dataset: PairDataset, encode_images: ImageEncoder, encode_prompts: PromptEncoder,
                        cache_root: str | Path, key_parts: Mapping[str, Any], batch_size: int = 8,
                        shard_size: int = 1024) -> "CachedPairDataset":
    """Load the cache for (dataset, key_parts) if a complete one exists, else encode everything and publish it.

    encode_images: pixels [2B,3,R,R] in [-1,1] (winners then losers) -> latents [2B,...], scaled as the UNet
    expects. encode_prompts: captions -> {"prompt_embeds": [B,L,D], optional "pooled_prompt_embeds": [B,D]}.
    """
    parts = {"format": CACHE_FORMAT, "data": dataset.identity(), **key_parts}
    key = cache_key(parts)
    root = Path(cache_root)
    folder = root / key
    if not _is_complete(folder, key):
        if folder.exists():  # only an unmarked folder can be here (e.g. hand-edited): never trust it
            shutil.rmtree(folder)
        root.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(root, f".tmp-{key}-")
        try:
            logger.info("building cache %s for %d pairs", folder, len(dataset))
            _write_cache(dataset, encode_images, encode_prompts, tmp, key, parts, batch_size, shard_size)
            plain_modes(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process published the same key first
                if not _is_complete(folder, key):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        logger.info("reusing cache %s", folder)
    return CachedPairDataset(folder, seed=dataset.seed, prompt_dropout=dataset.prompt_dropout)


class CachedPairDataset(torch.utils.data.Dataset):
    """Items: dict(latents_w, latents_l, prompt tensors (e.g. prompt_embeds, pooled_prompt_embeds), caption,
    original_size_w/l, crop_top_left_w/l, index). Shards are memory-mapped and read one row at a time."""

    def __init__(self, folder: str | Path, seed: int = 0, prompt_dropout: float = 0.0) -> None:
        self.folder = Path(folder)
        marker = json.loads((self.folder / "complete.json").read_text())
        self.key, self.stats = marker["key"], PairStats(**marker["stats"])
        self.seed, self.prompt_dropout, self.epoch = seed, prompt_dropout, 0
        self.captions: List[str] = json.loads((self.folder / "captions.json").read_text())
        users = self.folder / "users.json"
        self.user_ids: Optional[List[Any]] = json.loads(users.read_text()) if users.is_file() else None
        self._pair_shards, self._prompt_shards = marker["pair_shards"], marker["prompt_shards"]
        self._pair_ends = np.cumsum([n for _, n in self._pair_shards])
        self._prompt_ends = np.cumsum([n for _, n in self._prompt_shards])
        with safe_open(str(self.folder / "empty_prompt.safetensors"), framework="pt") as f:
            self._empty = {k: f.get_tensor(k)[0] for k in f.keys()}
        self._handles: Dict[str, Any] = {}

    def __getstate__(self) -> Dict[str, Any]:  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return int(self._pair_ends[-1]) if len(self._pair_ends) else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _row(self, shards: List, ends: np.ndarray, index: int, names: Optional[Sequence[str]] = None
             ) -> Dict[str, torch.Tensor]:
        s = int(np.searchsorted(ends, index, side="right"))
        offset = index - (int(ends[s - 1]) if s else 0)
        name = shards[s][0]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        f = self._handles[name]
        return {k: f.get_slice(k)[offset:offset + 1][0] for k in (names or f.keys())}

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row = self._row(self._pair_shards, self._pair_ends, index)
        dropped = item_draws(self.seed, self.epoch, int(row["row_id"]))[0] < self.prompt_dropout
        prompt_id = int(row["prompt"])
        embeds = self._empty if dropped else self._row(self._prompt_shards, self._prompt_ends, prompt_id)
        item: Dict[str, Any] = {"latents_w": row["latents_w"], "latents_l": row["latents_l"], **embeds,
                                "caption": "" if dropped else self.captions[prompt_id]}
        item.update({k: tuple(int(v) for v in row[k]) for k in SIZE_KEYS})
        item["index"] = index
        if self.user_ids is not None:
            item["user_id"] = self.user_ids[index]
        return item
