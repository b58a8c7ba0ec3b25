"""Batch sources for the training loop: offline pair data (optionally cached), sharded across processes.

The order is ours, not the DataLoader's: epoch e uses the permutation seeded by (seed, e), process r takes every
world-th index of it, and a resumed run skips exactly the micro-batches already consumed. So a resumed run sees
the same batches as an uninterrupted one, on any number of processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Subset

from ..config import ConfigError
from .cache import build_or_load_cache, collate_cached, model_identity
from .pairs import collate_pairs, load_pairs


class OfflineSource:
    def __init__(self, dataset, collate: Callable, batch_size: int, seed: int, rank: int, world: int,
                 num_workers: int = 0):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_workers = num_workers
        self.per_rank = len(dataset) // world
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} usable pairs are too few for batch_size={batch_size} on {world} "
                             "process(es); lower train.batch_size or add data")

    def _epoch_indices(self, epoch: int) -> List[int]:
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[self.rank::self.world][: self.batches_per_epoch * self.batch_size].tolist()

    def micro_batches(self, start: int = 0) -> Iterator[Optional[Dict]]:
        """Micro-batches forever, beginning after the first `start` ones."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            self.dataset.set_epoch(epoch)
            indices = self._epoch_indices(epoch)[skip * self.batch_size:]
            # Own generator: creating a loader iterator must not draw from the global RNG (noise, timesteps),
            # or a resumed run would see different noise than an uninterrupted one.
            loader = DataLoader(Subset(self.dataset, indices), batch_size=self.batch_size, shuffle=False,
                                collate_fn=self.collate, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, skip = epoch + 1, 0

    def sample_captions(self, n: int) -> List[str]:
        """The first n distinct non-empty captions (validation prompts when none are configured)."""
        return first_captions(self.dataset, n)

    def metrics(self) -> Dict[str, float]:
        """Source figures for the logs (online sources report their rounds; offline data has none)."""
        return {}


def first_captions(dataset, n: int) -> List[str]:
    seen: List[str] = []
    uncached = hasattr(dataset, "caption")  # a cache stores each distinct caption once, in `captions`
    for caption in (dataset.caption(i) for i in range(len(dataset))) if uncached else dataset.captions:
        if caption and caption not in seen:
            seen.append(caption)
        if len(seen) == n:
            break
    return seen


def _cache_encoders(components, device):
    from ..batches import encode_images
    from ..conditioning.text import encode_prompts

    def images(pixels):
        return encode_images(components, pixels.to(device))

    def prompts(captions):
        embeds = encode_prompts(components, captions)
        return {"prompt_embeds": embeds.prompt_embeds, "pooled_prompt_embeds": embeds.pooled_prompt_embeds}

    return images, prompts


def build_data_source(cfg, components, accelerator, batch_kind: str = "pairs"):
    """Online RAFT batches when cfg.raft.enabled; else pairs from cfg.data (cached when cfg.data.cache, built by
    the main process while the others wait)."""
    if cfg.raft.enabled:
        from .online import OnlineSource

        return OnlineSource(cfg, components, accelerator, batch_kind)
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to a Pick-a-Pic-format parquet file or folder "
                         "(for the toy world: python -m t2i_align.toy pairs --out DIR)")
    dataset, collate = load_pairs(cfg.data, cfg.seed), collate_pairs
    if cfg.data.cache:
        root = Path(cfg.data.cache_dir or Path(cfg.output_dir).parent / "cache")
        key = {"model": model_identity(components.path), "weight_dtype": cfg.model.weight_dtype,
               "family": components.spec.name}
        enc_images, enc_prompts = _cache_encoders(components, accelerator.device)
        with accelerator.main_process_first():
            dataset = build_or_load_cache(dataset, enc_images, enc_prompts, root, key)
        dataset.prompt_dropout = cfg.data.prompt_dropout
        collate = collate_cached
    return OfflineSource(dataset, collate, cfg.train.batch_size, cfg.seed, accelerator.process_index,
                         accelerator.num_processes, cfg.data.num_workers)
