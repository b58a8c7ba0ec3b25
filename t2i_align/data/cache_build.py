"""Building a latent cache (layout: cache.py), split over the processes of a run.

Each process encodes a contiguous slice of the rows (pairs, or image-caption rows) and of the unique captions into
its own part folder of the temporary cache folder; the main process then renames every part's shards into one
sequence (rank order, so the rows keep the data set's order whatever the number of processes) and writes the
marker files. Prompt ids are the order of first appearance over every row of the data set, so each process knows
them without the others; the price is an embedding for the caption of a row that turns out corrupt (rare; that row
itself is skipped). The latents are VAE posterior samples: their noise depends on the split, as on the batch size.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import UserError
from .pairs import PairDataset

SIZE_NAMES = ("original_size", "crop_top_left")  # per image, with the image's side suffix (_w, _l or none)
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
PromptEncoder = Callable[[List[str]], Dict[str, torch.Tensor]]


@dataclass
class Team:
    """The processes building one cache: this one's rank, their number, a barrier, `share(value)`, which returns
    the main process's `value` on every process, and `gather(value)`, every process's value in rank order, on
    every process. The default is one process alone."""
    rank: int = 0
    world: int = 1
    wait: Callable[[], None] = lambda: None
    share: Callable[[Any], Any] = lambda value: value
    gather: Callable[[Any], List[Any]] = lambda value: [value]

    def slice(self, n: int) -> range:
        """This process's contiguous share of n items (shares differ by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)


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


def _encode_rows(dataset: PairDataset, rows: range, prompt_ids: Mapping[str, int], encode_images: ImageEncoder,
                 writer: _ShardWriter, batch_size: int, progress: bool = False) -> tuple[int, List[Any]]:
    """Pass 1: latents of epoch 0's augmentation for every decodable row among `rows` (a pair's two images, or
    image-caption data's one: `dataset.SIDES`). Returns the number of corrupt rows and the cached rows' user ids
    (empty when the data has no user_id column)."""
    corrupt, users, epoch, sides = 0, [], dataset.epoch, dataset.SIDES
    dataset.set_epoch(0)
    try:
        from tqdm.auto import tqdm

        read = _items(dataset, rows)
        starts = range(rows.start, rows.stop, batch_size)
        for start in tqdm(starts, desc="caching latents", unit="batch", disable=not progress):
            items = list(islice(read, min(batch_size, rows.stop - start)))
            good = [(i, item) for i, item in items if item is not None]
            corrupt += len(items) - len(good)
            if not good:
                continue
            pixels = torch.cat([torch.stack([item[f"pixels{s}"] for _, item in good]) for s in sides])
            batch = {f"latents{s}": z for s, z in zip(sides, encode_images(pixels).chunk(len(sides)))}
            batch["row_id"] = torch.tensor([int(dataset.row_ids[i]) for i, _ in good])
            batch["prompt"] = torch.tensor([prompt_ids[dataset.caption(i)] for i, _ in good])
            batch.update({k + s: torch.tensor([item[k + s] for _, item in good]) for k in SIZE_NAMES for s in sides})
            users += [item["user_id"] for _, item in good if "user_id" in item]
            writer.add(batch)
        writer.flush()
    finally:
        dataset.set_epoch(epoch)
    return corrupt, users


def _items(dataset, rows: range) -> Iterator[Tuple[int, Any]]:
    """(index, item) for each row in order, read by the streaming reader in small record batches: a data set's
    random access keeps a whole row group's images in memory (a 460 MB group took 1.6 GB more)."""
    from .stream import RowReader

    for i, *raw in RowReader(dataset).rows(np.arange(rows.start, rows.stop)):
        yield i, dataset.item_from_raw(i, *raw)


def _encode_prompts(captions: List[str], encode_prompts: PromptEncoder, writer: _ShardWriter,
                    batch_size: int) -> None:
    """Pass 2: one embedding per caption."""
    for start in range(0, len(captions), batch_size):
        writer.add({k: v for k, v in encode_prompts(captions[start:start + batch_size]).items() if v is not None})
    writer.flush()


def not_shared(folder: Path, rank: int, what: str) -> UserError:
    """The error of a process that does not see what the main process wrote under the cache folder."""
    return UserError(f"the cache folder {folder} is not shared: process {rank} does not see the {what} there. "
                     "Set data.cache_dir to a folder every machine mounts")


def write_part(dataset: PairDataset, encode_images: ImageEncoder, encode_prompts: PromptEncoder, tmp: Path,
               team: Team, batch_size: int, shard_size: int) -> None:
    """This process's share of both passes, in tmp/part-<rank>/ with a part.json saying what it holds."""
    if not tmp.is_dir():
        raise not_shared(tmp.parent, team.rank, "folder the main process made")
    part = tmp / f"part-{team.rank}"
    part.mkdir()
    prompt_ids = {caption: i for i, caption in enumerate(dict.fromkeys(dataset.captions))}
    pairs = _ShardWriter(part, "pairs", shard_size)
    corrupt, users = _encode_rows(dataset, team.slice(len(dataset)), prompt_ids, encode_images, pairs, batch_size,
                                  progress=team.rank == 0)  # the main process's share stands for all
    prompts, share = _ShardWriter(part, "prompts", shard_size), team.slice(len(prompt_ids))
    _encode_prompts(list(prompt_ids)[share.start:share.stop], encode_prompts, prompts, batch_size)
    (part / "part.json").write_text(json.dumps({"pair_shards": pairs.shards, "prompt_shards": prompts.shards,
                                                "corrupt": corrupt, "users": users}))


def merge_parts(dataset: PairDataset, stats: Any, encode_prompts: PromptEncoder, tmp: Path, key: str,
                parts: Mapping[str, Any], world: int) -> None:
    """Main process, after every part is written: one sequence of shards in rank order, then the marker files.
    `stats`: the data set's row counts before caching (PairStats or CaptionStats)."""
    shards: Dict[str, List[List[Any]]] = {"pairs": [], "prompts": []}
    corrupt, users, per_process = 0, [], []
    for rank in range(world):
        folder = tmp / f"part-{rank}"
        if not (folder / "part.json").is_file():
            raise RuntimeError(f"process {rank} wrote no share of the cache: it failed (see its error)")
        part = json.loads((folder / "part.json").read_text())
        for kind in shards:
            for name, n in part[f"{kind[:-1]}_shards"]:
                merged = f"{kind}-{len(shards[kind]):05d}.safetensors"
                os.replace(folder / name, tmp / merged)
                shards[kind].append([merged, n])
        corrupt, users = corrupt + part["corrupt"], users + part["users"]
        per_process.append(sum(n for _, n in part["pair_shards"]))
        (folder / "part.json").unlink()
        folder.rmdir()
    if not shards["pairs"]:
        raise UserError(f"no row of the data could be decoded to cache ({corrupt} undecodable; the log names the "
                        "first ones): check that the image columns hold image files' bytes (PNG, JPEG, WebP...)")
    empty = {k: v[:1].detach().cpu().contiguous() for k, v in encode_prompts([""]).items() if v is not None}
    save_file(empty, str(tmp / "empty_prompt.safetensors"))  # substituted for dropped prompts
    stats = stats.skipping(corrupt)
    (tmp / "captions.json").write_text(json.dumps(list(dict.fromkeys(dataset.captions))))
    if getattr(dataset, "user_ids", None) is not None:  # PPD: one user id per cached pair, in cache order
        (tmp / "users.json").write_text(json.dumps(users))
    marker = {"key": key, "parts": parts, "pairs": sum(per_process), "pair_shards": shards["pairs"],
              "prompt_shards": shards["prompts"], "stats": asdict(stats), "stats_kind": type(stats).__name__,
              "pairs_per_process": per_process,
              "shard_bytes": {name: (tmp / name).stat().st_size for name, _ in shards["pairs"] + shards["prompts"]}}
    (tmp / "complete.json").write_text(json.dumps(marker, indent=1))  # written last: its presence = complete
