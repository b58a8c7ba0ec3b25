"""Precomputed VAE latents and text embeddings for offline pair training and image-caption data (LongAlign's
stage 1) (safetensors only, never pickle).

Why: the official DPO code VAE-encodes two images every step; encoding once makes training steps UNet-only (and
spares LongAlign's segment encoding, several CLIP passes per long caption, at every step).

Layout: <cache_root>/<key>/ with pairs-NNNNN.safetensors (one row per pair or per image-caption row: latents,
sizes, crops, row ids, prompt index),
prompts-NNNNN.safetensors (one embedding per unique caption: Pick-a-Pic has ~14 pairs per prompt),
empty_prompt.safetensors, captions.json, users.json (each pair's user_id, when the data has one: PPD)
and complete.json (key, counts, shard sizes). The key hashes the data set identity (file paths, sizes, mtimes),
resolution, crop, flip, ties, max_pairs (image-caption data: its kind, image root and max_items; the seed when
augmentation is random) plus the caller's `key_parts`: everything on the model side that changes a tensor
(`cache_key.py`: tokenizer, text encoder and VAE folders including a `model.vae` override, variant, revision,
actual dtypes, family, prompt encoder, and an `encoding` dict for future encoding choices). A different key is a
different folder. The cache is written to a temporary folder and renamed into place only when complete, so a run
interrupted midway never leaves something that is later taken as a cache.

Augmentations are FROZEN: with random crops or flips, each row keeps the one augmentation drawn at caching time
(epoch 0). Users who want fresh augmentations every epoch must turn the cache off (data.cache=false).
Prompt dropout still works: the embedding of "" is cached once and substituted at load time, with the same
per-item seeded draw as the uncached data set. Corrupt rows are skipped (and counted) at caching time.
Multi-process training: every process encodes a share and the main process publishes (cache_build.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open

from ..errors import UserError, describe, raise_told
from ..files import fsync_path, plain_modes, sync_tree, temp_dir
from .cache_build import SIZE_NAMES, ImageEncoder, PromptEncoder, Team, merge_parts, not_shared, write_part
from .cache_key import CACHE_FORMAT, cache_key, model_identity  # noqa: F401 (model_identity: API)
from .captions import CaptionStats
from .pairs import PairDataset, PairStats, collate_pairs, dropout_captions, item_draws

logger = logging.getLogger(__name__)

collate_cached = collate_pairs
"""Cached items collate like pixel items (tensors stacked, captions listed, sizes as [B, 2] int64)."""


def _is_complete(folder: Path, key: str) -> bool:
    try:
        marker = json.loads((folder / "complete.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False  # any other OSError (no permission, a network file system's hiccup) is raised: a complete
        # cache is never deleted because its marker could not be read this once
    shards = marker.get("pair_shards", []) + marker.get("prompt_shards", [])
    strays = [name for name, _ in shards if not isinstance(name, str) or Path(name).name != name or name in ("..", "")]
    if strays:  # the builder writes plain file names: a marker naming others is not its own (an edited one)
        raise UserError(f"{folder / 'complete.json'} names shard {strays[0]!r}, which is not a file of that folder: "
                        "not a cache this project wrote; delete the folder to build it again")
    sizes = marker.get("shard_bytes", {})  # absent in caches built before sizes were recorded
    return marker.get("key") == key and all(_shard_intact(folder / name, sizes.get(name)) for name, _ in shards)


def _shard_intact(path: Path, size: Optional[int]) -> bool:
    """The shard is there, with the size recorded when it was built (a host crash can leave it truncated)."""
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except (FileNotFoundError, NotADirectoryError):  # others raised, as for the marker
        return False


class DataMismatch(UserError, ValueError):
    """The processes building one cache read different data rows."""


def build_or_load_cache(dataset: PairDataset, encode_images: ImageEncoder, encode_prompts: PromptEncoder,
                        cache_root: str | Path, key_parts: Mapping[str, Any], batch_size: int = 8,
                        shard_size: int = 1024, team: Optional[Team] = None) -> "CachedPairDataset":
    """Load the cache for (dataset, key_parts) if a complete one exists, else encode everything and publish it.
    Every process of `team` calls this: they split the encoding (cache_build.py), the main process publishes.

    `dataset`: a PairDataset or a CaptionDataset (LongAlign's image-caption data). encode_images: pixels
    [2B,3,R,R] in [-1,1] (pairs: winners then losers) -> latents [2B,...], scaled as the UNet expects.
    encode_prompts: captions -> {"prompt_embeds": [B,L,D], optional "pooled_prompt_embeds": [B,D]}.
    """
    team = team or Team()
    parts = {"format": CACHE_FORMAT, "data": dataset.identity(), **key_parts}
    key, root = cache_key(parts), Path(cache_root)
    main_key, tmp = _begin(root, key, team, rows_digest(dataset))
    folder = root / main_key
    if tmp is None:
        logger.info("reusing cache %s", folder)
    else:
        logger.info("building cache %s for %d rows on %d processes", folder, len(dataset), team.world)
        _build(dataset, encode_images, encode_prompts, Path(tmp), folder, main_key, parts, team, batch_size,
               shard_size)
    return _open_everywhere(folder, dataset, team)


def rows_digest(dataset) -> str:
    """What a process's data holds, whatever its files' paths and times: the rows' count, ids, captions, sides and
    users, which every process's copy must share (each encodes its slice of the rows by position)."""
    h = hashlib.sha256(f"{len(dataset)}".encode())
    h.update(np.asarray(dataset.row_ids, dtype=np.int64).tobytes())
    for caption in dataset.captions:
        h.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    for name in ("_swap", "user_ids"):  # absent or None: captions, pair data without users
        values = getattr(dataset, name, None)
        h.update(repr(None if values is None else [str(v) for v in values]).encode())
    return h.hexdigest()


def check_same_rows(digest: str, team: Team) -> None:
    """On every process: all stop, saying which process differs, when their data rows do (a copy on another
    machine with rows missing or reordered encoded its slice against the main process's captions and users)."""
    digests = team.gather(digest)
    other = next((rank for rank, d in enumerate(digests) if d != digests[0]), None)
    if other is not None:
        raise DataMismatch(f"process {other}'s data rows differ from the main process's (other rows, order, "
                           "captions or users, not just other file times): every machine must read the same "
                           "data; copy it whole to each")


def _begin(root: Path, key: str, team: Team, dataset_digest: str) -> Tuple[str, Optional[str]]:
    """(the main process's key, a fresh temporary folder to build in, or None when the cache is complete), on every
    process. The main process's key is everyone's: a copy of the data on another machine has other modification
    times, hence another key, but the same rows."""
    check_same_rows(dataset_digest, team)
    began, error = None, None
    if team.rank == 0:
        try:
            began = {"key": key, "tmp": _start_build(root / key, key)}
        except Exception as err:  # told to the others before raising, so that none waits for it
            began, error = {"error": describe(err)}, err
    began = team.share(began)
    if error is not None:
        raise error
    raise_told(began.get("error"), "the main process could not start building the cache")
    if began["key"] != key:
        logger.warning("process %d: its data identity (file paths, sizes, times) differs from the main process's; "
                       "using the main process's cache %s", team.rank, began["key"])
    return began["key"], began["tmp"]


def _open_everywhere(folder: Path, dataset, team: Team) -> "CachedPairDataset":
    """The cache, opened on every process, or an error on every process (a process that failed alone would leave
    the others waiting in the run's first collective)."""
    cached = problem = None
    try:
        if not folder.is_dir():  # complete where the main process looks, absent here
            raise not_shared(folder.parent, team.rank, "cache the main process made or found")
        cached = CachedPairDataset(folder, seed=dataset.seed, prompt_dropout=dataset.prompt_dropout)
    except Exception as err:
        problem = err
    others = [told for told in team.gather(describe(problem)) if told is not None]
    if problem is not None:
        raise problem
    raise_told(others[0] if others else None, "another process could not open the cache")
    return cached


def _start_build(folder: Path, key: str) -> Optional[str]:
    """Main process: None when a complete cache is there, else a fresh temporary folder to build it in."""
    if _is_complete(folder, key):
        return None
    if folder.exists():  # unmarked (e.g. hand-edited) or a shard missing or truncated: never trust it
        if _is_complete(folder, key):  # absent at the first look, published by another run since: keep it
            return None
        logger.warning("cache %s is incomplete (no marker, or a shard missing or of another size): rebuilding", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(folder.parent)
    return str(temp_dir(folder.parent, f".tmp-{key}-{_HOST}-{os.getpid()}-"))


def _host() -> str:
    """This machine and PID namespace: containers with host networking share a host name but not their process
    ids, so another container's live build looked dead (`os.kill` finds no such pid) and was deleted."""
    try:
        namespace = f"_ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux
        namespace = ""
    return (re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host") + namespace


_HOST = _host()


def _remove_dead_builds(root: Path) -> None:
    """Build folders left by a killed build (a kill, an out-of-memory kill, Ctrl-C) are near a whole cache's size
    each: those made on this machine by a process that is gone are removed, of any key (the settings may have
    changed since). Another machine's, or a live process's (a concurrent run), are left alone."""
    for path in root.glob(".tmp-*"):
        made = re.fullmatch(r"\.tmp-[0-9a-f]{24}-(.+)-(\d+)-[a-z0-9_]+", path.name)
        if made and made.group(1) == _HOST and not _alive(int(made.group(2))):
            logger.warning("removing %s, the folder of a cache build that was stopped", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _build(dataset, encode_images, encode_prompts, tmp: Path, folder: Path, key: str, parts, team: Team,
           batch_size: int, shard_size: int) -> None:
    """Every process writes its part; the main process merges and renames the result into place. Each process
    raises its own error, else the main process's: every process ends alike, and no temporary folder is left."""
    own = failure = None
    stats = copy.deepcopy(dataset.stats)  # before caching: the encoding pass counts a caption row's bad images
    try:
        write_part(dataset, encode_images, encode_prompts, tmp, team, batch_size, shard_size)
    except Exception as err:  # raised below, after the others have finished theirs
        own = err
    team.wait()
    if team.rank == 0:
        failure = own
        try:
            if own is None:
                merge_parts(dataset, stats, encode_prompts, tmp, key, parts, team.world)
                plain_modes(tmp)
                _publish(tmp, folder, key)
        except Exception as err:
            failure = err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    told = team.share(describe(failure))
    if own is not None or failure is not None:
        raise own or failure
    raise_told(told, "the main process could not build the cache")


def _publish(tmp: Path, folder: Path, key: str) -> None:
    sync_tree(tmp)  # on the disk before it is published: a host crash cannot leave a marked cache with empty files
    try:
        os.rename(tmp, folder)
    except OSError:  # another run published the same key first
        if not _is_complete(folder, key):
            raise
    fsync_path(folder.parent)  # the rename itself (best effort)


class CachedPairDataset(torch.utils.data.Dataset):
    """Items: dict(latents_w, latents_l, prompt tensors (e.g. prompt_embeds, pooled_prompt_embeds), caption,
    original_size_w/l, crop_top_left_w/l, index); for cached image-caption data latents, original_size and
    crop_top_left instead. Shards are memory-mapped and read one row at a time."""

    def __init__(self, folder: str | Path, seed: int = 0, prompt_dropout: float = 0.0) -> None:
        self.folder = Path(folder)
        marker = json.loads((self.folder / "complete.json").read_text())
        stats_kind = CaptionStats if marker.get("stats_kind") == "CaptionStats" else PairStats
        self.key, self.stats = marker["key"], stats_kind(**marker["stats"])
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
        item: Dict[str, Any] = {k: v for k, v in row.items() if k.startswith("latents")}
        item.update(embeds, **dropout_captions(self.captions[prompt_id], dropped))
        item.update({k: tuple(int(v) for v in value) for k, value in row.items() if k.startswith(SIZE_NAMES)})
        item["index"] = index
        if self.user_ids is not None:
            item["user_id"] = self.user_ids[index]
        return item
