"""Prompt batches for objectives that need only captions (reward-gradient methods: LongAlign stage 2).

Prompts come from a text file (one per line) or a toy prompt set ("toy:train-long" ...), as
`t2i_align.prompts.read_prompts` reads them. The order follows `OfflineSource` (`data/sources.py`): epoch e is
the permutation seeded by (seed, e), process r of `world` takes every world-th prompt of it, the tail that does
not fill a batch on every process is dropped, so every process runs the same number of micro-batches and the
order is a function of (seed, epoch, rank, world) only. A resumed run skips exactly the `start` micro-batches
already consumed.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from ..config import ConfigError


class PromptSource:
    """Micro-batches {"caption": [...], "resolution": R} of `batch_size` prompts per process, forever."""

    def __init__(self, prompts: List[str], batch_size: int, seed: int, rank: int, world: int, resolution: int,
                 spec: str = "data.path"):
        self.prompts, self.batch_size, self.seed = list(prompts), int(batch_size), int(seed)
        self.rank, self.world, self.resolution = int(rank), int(world), int(resolution)
        self.data_rows = len(self.prompts)  # what the order is drawn from: a resume checks it is unchanged
        self.batches_per_epoch = len(self.prompts) // world // self.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{spec}: {len(self.prompts)} prompts are too few for train.batch_size="
                              f"{batch_size} on {world} process(es); lower train.batch_size or add prompts")

    def epoch_indices(self, epoch: int) -> List[int]:
        """This process's prompt indices of epoch `epoch`, in order (whole batches only)."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.prompts), generator=gen)
        return perm[self.rank::self.world][: self.batches_per_epoch * self.batch_size].tolist()

    def micro_batches(self, start: int = 0) -> Iterator[Dict]:
        """Micro-batches forever, beginning after the first `start` ones."""
        epoch, skip = divmod(int(start), self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(skip, self.batches_per_epoch):
                chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
                yield {"caption": [self.prompts[i] for i in chunk], "index": chunk, "resolution": self.resolution}
            epoch, skip = epoch + 1, 0

    def sample_captions(self, n: int) -> List[str]:
        """The first n distinct prompts (validation prompts when none are configured)."""
        return list(dict.fromkeys(self.prompts))[:n]

    def metrics(self) -> Dict[str, float]:
        return {}


def read_prompt_data(data) -> List[str]:
    """The prompts of data.path (data.kind = prompts), the first data.max_pairs of them if set."""
    from ..prompts import PROMPT_FILES, read_prompts

    if not data.path:
        raise ConfigError(f"data.path is empty: with data.kind=prompts give {PROMPT_FILES}, a parquet file with a "
                          "caption column, or a toy prompt set such as toy:train-long")
    prompts = read_prompts(data.path, "data.path")
    return prompts[:data.max_pairs] if data.max_pairs else prompts


def build_prompt_source(cfg, accelerator) -> PromptSource:
    """The prompt source of `cfg.data` (data.kind = prompts, data.path = a prompts file or a toy prompt set)."""
    prompts = read_prompt_data(cfg.data)
    return PromptSource(prompts, cfg.train.batch_size, cfg.seed, accelerator.process_index,
                        accelerator.num_processes, cfg.data.resolution)
