"""Shuffled pair reading that streams: the uncached training path at Pick-a-Pic size (~335 GB of parquet).

Why: parquet stores image bytes by row group, and reading one random row means reading its whole row group, so
a per-item shuffle (`dataset[perm[i]]`) reads about group-size times the data. Instead, for each epoch:

1. Blocks are row groups. A group holding more than 1/8 of one process's share is cut into blocks, so that a
   small data set written as one row group still mixes across processes and epochs; a block in the middle of a
   group costs reading the group from its start (logged once; at Pick-a-Pic scale no group is cut).
2. The blocks are permuted with (seed, epoch), the same permutation on every process, concatenated, and cut into
   `world` equal contiguous shares: process r reads share r, so the processes read disjoint rows and run the
   same number of micro-batches (len // world // batch_size, the tail of a share left for the next epoch).
3. Each process reads its share front to back and serves it shuffled within consecutive windows of `window`
   rows (permutation seeded by seed, epoch, rank). At most one window of raw image bytes is held in memory;
   decoding happens when a row is served (in DataLoader workers when data.num_workers > 0).

The order is a function of the metadata and the seeds only, so `micro_batches(start)` recomputes it, re-reads
the window it resumes in from the window's start, and serves exactly what an uninterrupted run would.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError
from .images import READ_ERRORS, checked_batches, scalar_value, unreadable
from .pairs import PairDataset, collate_pairs

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 512
"""Rows shuffled together: 512 Pick-a-Pic rows (~350 KB each) hold ~180 MB of image bytes."""
BLOCKS_PER_SHARE = 8
_BLOCK_TAG, _WINDOW_TAG = 0xB10C, 0x3D0
"""Distinct SeedSequence entries, so these streams never coincide with `item_draws(seed, epoch, row)`."""

RawPair = Tuple[int, Any, Any]
"""(pair index, jpg_0, jpg_1) as stored in the file."""


def make_blocks(file: np.ndarray, group: np.ndarray, max_rows: int) -> np.ndarray:
    """[n, 2] (start, end) pair-index ranges: each row group, cut into near-equal blocks of <= max_rows."""
    n = len(file)
    cuts = np.flatnonzero((np.diff(file) != 0) | (np.diff(group) != 0)) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, n]
    blocks = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        pieces = math.ceil((end - start) / max_rows)
        edges = np.round(np.linspace(start, end, pieces + 1)).astype(np.int64)
        blocks += list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    return np.array(blocks, dtype=np.int64).reshape(-1, 2)


@dataclass
class EpochPlan:
    """One process's epoch: `stream` = pair indices in reading order, `order` = the same in serving order."""

    stream: np.ndarray
    order: np.ndarray


def plan_epoch(blocks: np.ndarray, share: int, items: int, seed: int, epoch: int, rank: int, window: int
               ) -> EpochPlan:
    """Permute blocks by (seed, epoch); take rows [rank*share, rank*share + items); shuffle within windows."""
    perm = np.random.default_rng([seed % 2**63, epoch, _BLOCK_TAG, 0]).permutation(len(blocks))
    lengths = blocks[perm, 1] - blocks[perm, 0]
    ends = np.cumsum(lengths)
    lo, hi = rank * share, rank * share + items
    first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
    chosen = blocks[perm[first:last + 1]]
    stream = np.concatenate([np.arange(a, b) for a, b in chosen]) if len(chosen) else np.zeros(0, np.int64)
    skip = lo - (int(ends[first - 1]) if first else 0)
    stream = stream[skip:skip + items]
    rng = np.random.default_rng([seed % 2**63, epoch, _WINDOW_TAG, rank])
    order = np.concatenate([start + rng.permutation(min(window, items - start))
                            for start in range(0, items, window)]) if items else np.zeros(0, np.int64)
    return EpochPlan(stream, stream[order])


class RowReader:
    """Reads the image bytes of rows in the order given (`dataset.raw_columns(file)`: a pair's jpg_0 / jpg_1, or
    image-caption data's one column), one row group run at a time, in small record batches (bounded memory whatever
    the row group size; `buffer_size` bounds each column's read-ahead)."""

    def __init__(self, dataset, read_batch: int = 16, buffer_size: int = 1 << 20) -> None:
        self.files, self.columns = dataset.files, dataset.raw_columns
        self.file, self.group, self.offset = dataset.locations()
        self.read_batch, self.buffer_size = read_batch, buffer_size
        self.rows_read = 0  # rows decoded from parquet, including ones skipped to reach a needed row
        self._handle: Optional[Tuple[int, pq.ParquetFile]] = None

    def _open(self, fi: int) -> pq.ParquetFile:
        if self._handle is None or self._handle[0] != fi:
            try:  # a file replaced or truncated since the data set was opened
                self._handle = (fi, pq.ParquetFile(self.files[fi], buffer_size=self.buffer_size, pre_buffer=False))
            except READ_ERRORS as err:
                raise unreadable(self.files[fi], None, err) from err
        return self._handle[1]

    def rows(self, indices: np.ndarray) -> Iterator[RawPair]:
        """(index, *its raw columns) for each row index, e.g. (index, jpg_0, jpg_1) for pairs, in the given order
        (runs of consecutive indices within one row group are read in one sequential pass)."""
        idx = np.asarray(indices, dtype=np.int64)
        if not len(idx):
            return
        f, g = self.file[idx], self.group[idx]
        cuts = np.flatnonzero((np.diff(idx) != 1) | (np.diff(f) != 0) | (np.diff(g) != 0)) + 1
        for start, end in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(idx)].tolist()):
            run = idx[start:end]
            yield from self._read_run(int(f[start]), int(g[start]), self.offset[run], run)

    def _read_run(self, fi: int, group: int, offsets: np.ndarray, run: np.ndarray) -> Iterator[RawPair]:
        batches = self._open(fi).iter_batches(batch_size=self.read_batch, row_groups=[group],
                                              columns=self.columns(fi))
        k, row = 0, 0
        try:
            for record in checked_batches(batches, self.files[fi], group):
                self.rows_read += record.num_rows
                columns = record.columns
                while k < len(run) and offsets[k] < row + record.num_rows:
                    j = int(offsets[k]) - row
                    yield (int(run[k]), *(scalar_value(column[j]) for column in columns))
                    k += 1
                row += record.num_rows
                if k == len(run):
                    return  # stop before reading the rest of the group
        finally:
            batches.close()
        raise RuntimeError(f"{self.files[fi]} row group {group} has {row} rows, fewer than its metadata said when "
                           "the data set was opened: was the file rewritten during training? Restart the run.")


class _RawPairs(torch.utils.data.Dataset):
    """DataLoader view whose 'indices' are (index, jpg_0, jpg_1): the bytes travel with the index, so workers
    decode and augment while the main process does the sequential reading."""

    def __init__(self, dataset: PairDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: RawPair) -> Optional[Dict[str, Any]]:
        return self.dataset.item_from_raw(*key)


class StreamingPairSource:
    """Micro-batches of uncached pairs for the training loop (same interface as `sources.OfflineSource`)."""

    def __init__(self, dataset: PairDataset, batch_size: int, seed: int, rank: int, world: int,
                 num_workers: int = 0, window: int = DEFAULT_WINDOW, collate: Callable = collate_pairs) -> None:
        if window < 1:
            raise ValueError(f"shuffle window={window}: must be at least 1 row")
        self.dataset, self.collate, self.window = dataset, collate, window
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_workers = num_workers
        self.per_rank = len(dataset) // world
        self.data_rows = len(dataset)  # what the order is drawn from: a resume checks it is unchanged
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{len(dataset)} usable pairs are too few for batch_size={batch_size} on {world} "
                             "process(es); lower train.batch_size or add data")
        file, group, _ = dataset.locations()
        max_rows = max(1, math.ceil(self.per_rank / BLOCKS_PER_SHARE))
        self.blocks = make_blocks(file, group, max_rows)
        groups = len(np.flatnonzero((np.diff(file) != 0) | (np.diff(group) != 0))) + 1
        if len(self.blocks) > groups:
            logger.info("%d row groups cut into %d blocks of <= %d pairs so that each process's share mixes; "
                        "a block in the middle of a group is read from the group's start. For large data, "
                        "write row groups of ~100-1,000 rows (pyarrow: row_group_size=)", groups,
                        len(self.blocks), max_rows)
        self.reader = RowReader(dataset)
        self.rows_served = 0

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.blocks, self.per_rank, self.batches_per_epoch * self.batch_size, self.seed, epoch,
                          self.rank, self.window)

    def raw_batches(self, epoch: int, skip: int = 0) -> Iterator[List[RawPair]]:
        """Epoch `epoch`'s micro-batches of raw rows, after the first `skip`; holds at most one window of rows."""
        plan = self.plan(epoch)
        first = skip * self.batch_size
        window_start = first - first % self.window
        served_before = set(plan.order[window_start:first].tolist())  # re-read on resume, not served again
        rows = self.reader.rows(plan.stream[window_start:])
        pending: Dict[int, Tuple[Any, Any]] = {}
        batch: List[RawPair] = []
        try:
            for index in plan.order[first:].tolist():
                while index not in pending:
                    got = next(rows, None)
                    if got is None:
                        raise RuntimeError(f"pair {index} was planned but never read (epoch {epoch}); a bug")
                    if got[0] not in served_before:
                        pending[got[0]] = got[1:]
                batch.append((index, *pending.pop(index)))
                if len(batch) == self.batch_size:
                    self.rows_served += len(batch)
                    yield batch
                    batch = []
        finally:
            rows.close()

    def micro_batches(self, start: int = 0) -> Iterator[Optional[Dict]]:
        """Micro-batches forever, beginning after the first `start` ones (None: all of a batch's rows corrupt)."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            self.dataset.set_epoch(epoch)  # before the loader pickles the dataset into its workers
            # Own generator: creating a loader iterator must not draw from the global RNG (noise, timesteps).
            loader = DataLoader(_RawPairs(self.dataset), batch_sampler=self.raw_batches(epoch, skip),
                                collate_fn=self.collate, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, skip = epoch + 1, 0

    def sample_captions(self, n: int) -> List[str]:
        """The first n distinct non-empty captions (validation prompts when none are configured)."""
        from .sources import first_captions

        return first_captions(self.dataset, n)

    def metrics(self) -> Dict[str, float]:
        """Rows decoded from parquet per pair served: ~1 when streaming works (plus ties and dropped rows)."""
        return {"data_rows_read_per_pair": self.reader.rows_read / max(1, self.rows_served)}
